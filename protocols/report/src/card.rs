//! A model card for people: what the model is, how well it does (crisis classes
//! first), how it was trained, what it guarantees, and where it stands (signature, log
//! inclusion, promotions, installs). Used by the console's release page, the
//! `report.html` that `models export` writes, and the auditor's report.

use maeum_tlog::release::{self, CardEvaluation, ModelCard};
use maud::{Markup, html};

use crate::chart::{BarChart, LineChart, Series, confusion, num};
use crate::{Tone, badge, short_digest, time};

/// What the renderer was told about a release besides its card.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    /// The Ed25519 signature over the manifest: `Ok(detail)` verified, `Err(why)` not.
    pub signature: Option<Result<String, String>>,
    /// Inclusion in the audit log: `Ok(detail)` (e.g. the entry), `Err(why)`.
    pub logged: Option<Result<String, String>>,
    /// Whether it is the consortium's current release.
    pub current: bool,
    /// Promotions and rollbacks: (time ms, what, operator).
    pub history: Vec<(i64, String, String)>,
    /// Release gates overridden to promote it: (gate, measured, threshold, operator, reason).
    pub overrides: Vec<(String, String, String, String, String)>,
    /// Gates the release does not pass (would need an override to promote).
    pub gate_failures: Vec<String>,
    /// Sites' last reports on it: (site, installed, reason).
    pub installs: Vec<(String, bool, String)>,
}

fn check(c: &Option<Result<String, String>>, ok: &str, bad: &str) -> Markup {
    html! {
        @match c {
            Some(Ok(detail)) => { (badge(Tone::Ok, ok)) " " (detail) },
            Some(Err(why)) => { (badge(Tone::Bad, bad)) " " (why) },
            None => { (badge(Tone::Neutral, "not checked")) },
        }
    }
}

/// The metrics of one evaluation as tiles.
pub fn metric_tiles(e: &CardEvaluation) -> Markup {
    html! {
        div.grid {
            div.tile { span.big { (num(Some(e.accuracy))) } "accuracy" }
            div.tile { span.big { (num(Some(e.macro_f1))) } "macro-F1" }
            div.tile {
                span.big { (num(release::crisis_recall(e))) }
                "crisis-class recall (lowest over the crisis classes)"
            }
            div.tile { span.big { (e.examples) } "held-out examples, from " (e.evaluated_by) " sites" }
        }
    }
}

/// Accuracy, macro-F1 and crisis recall per round, from (round, evaluation) pairs.
pub fn metrics_chart(id: &str, rounds: &[(u32, Option<&CardEvaluation>)]) -> LineChart {
    let series = |key: &str, label: &str, f: &dyn Fn(&CardEvaluation) -> Option<f64>| Series {
        key: key.into(),
        label: label.into(),
        points: rounds.iter().map(|(r, e)| (*r, e.and_then(f))).collect(),
    };
    let mut s = vec![
        series("accuracy", "Accuracy", &|e| Some(e.accuracy)),
        series("macro_f1", "Macro-F1", &|e| Some(e.macro_f1)),
    ];
    if rounds.iter().any(|(_, e)| e.is_some_and(|e| e.recall.iter().any(|c| c.crisis))) {
        s.push(series("crisis_recall", "Crisis-class recall", &release::crisis_recall));
    }
    LineChart {
        id: id.into(),
        title: "Federated evaluation per round (0 = the initial model)".into(),
        x_label: "round".into(),
        series: s,
    }
}

/// Sites per round: contributed, dropped.
pub fn participation_chart(id: &str, rounds: &[(u32, u64, u64)]) -> BarChart {
    BarChart {
        id: id.into(),
        title: "Sites per round".into(),
        x_label: "round".into(),
        stacks: vec![("contributed".into(), "contributed".into()), ("dropped".into(), "dropped out".into())],
        bars: rounds.iter().map(|(r, c, d)| (*r, vec![*c, *d])).collect(),
    }
}

/// Recall per class, crisis classes first.
pub fn recall_table(e: &CardEvaluation) -> Markup {
    html! {
        div.scroll {
            table {
                caption { "Recall per class (crisis classes first)" }
                thead { tr { th scope="col" { "class" } th.num scope="col" { "recall" } } }
                tbody {
                    @for c in &e.recall {
                        tr class=[c.crisis.then_some("crisis")] {
                            th scope="row" { (c.label) @if c.crisis { " " span.tag { "crisis" } } }
                            td.num { (num(c.recall)) }
                        }
                    }
                }
            }
        }
    }
}

/// The whole card.
pub fn render(card: &ModelCard, standing: &Standing) -> Markup {
    let rounds: Vec<(u32, Option<&CardEvaluation>)> = std::iter::once((0, card.initial_evaluation.as_ref()))
        .chain(card.rounds.iter().map(|r| (r.round, r.evaluation.as_ref())))
        .collect();
    let participation: Vec<(u32, u64, u64)> =
        card.rounds.iter().map(|r| (r.round, u64::from(r.contributors), u64::from(r.dropped))).collect();
    html! {
        section aria-labelledby="standing" {
            h2 #standing { "Standing" }
            dl.facts {
                dt { "Signature" } dd #signature { (check(&standing.signature, "verified", "does not verify")) }
                dt { "Audit log" } dd #logged { (check(&standing.logged, "logged", "not in the log")) }
                dt { "In service" } dd { @if standing.current { (badge(Tone::Ok, "current release")) } @else { "no" } }
                @if !standing.gate_failures.is_empty() {
                    dt { "Release gates" } dd { (badge(Tone::Bad, "fails")) " " (standing.gate_failures.join("; ")) }
                }
            }
            @if !standing.overrides.is_empty() {
                div.alert role="note" {
                    strong { "Promoted below the consortium's release gates." }
                    ul { @for (gate, measured, threshold, operator, reason) in &standing.overrides {
                        li { "Gate " code { (gate) } ": measured " (measured) ", threshold " (threshold) "; overridden by " (operator) ": “" (reason) "”" }
                    } }
                }
            }
            @if !standing.history.is_empty() {
                h3 { "Promotions and rollbacks" }
                ul { @for (t, what, who) in &standing.history { li { (time(*t)) ": " (what) " by " (who) } } }
            }
            @if !standing.installs.is_empty() {
                h3 { "At the sites" }
                div.scroll { table #installs {
                    thead { tr { th scope="col" { "site" } th scope="col" { "last report" } } }
                    tbody { @for (site, installed, reason) in &standing.installs {
                        tr class=[(!installed).then_some("bad")] {
                            th scope="row" { (site) }
                            td { @if *installed { (badge(Tone::Ok, "installed")) } @else { (badge(Tone::Bad, "refused")) " " (reason) } }
                        }
                    } }
                } }
            }
        }
        section aria-labelledby="what" {
            h2 #what { "The model" }
            dl.facts {
                dt { "Consortium" } dd { (card.consortium) }
                dt { "Version" } dd { (card.version) @if let Some(p) = card.parent_version { " (supersedes version " (p) ")" } }
                dt { "Kind" } dd { (card.model.kind) ", " (card.model.parameters) " parameters, " (card.model.labels.len()) " classes" }
                @if let Some(enc) = &card.model.encoder {
                    dt { "Encoder" } dd { (enc.name) " (" (enc.dim) "-dim, " (enc.max_tokens) " tokens; weights " (short_digest(&enc.sha256)) ")" }
                }
                dt { "Model SHA-256" } dd { code { (card.model.sha256) } }
                dt { "Released" } dd { (time(card.released_ms)) }
                dt { "Job" } dd { (card.job.name) " (" code { (card.job.id) } "), round " (card.round) " of " (card.job.rounds) }
                dt { "Job file SHA-256" } dd { code { (card.job.spec_sha256) } }
                dt { "Secure aggregation" } dd {
                    @if card.secure_aggregation.enabled {
                        (badge(Tone::Ok, "on")) " threshold "
                        @if card.secure_aggregation.threshold == 0 { "by the default rule" } @else { (card.secure_aggregation.threshold) }
                        ", " @if card.secure_aggregation.neighbours == 0 { "every pair masks" } @else { "SecAgg+ with " (card.secure_aggregation.neighbours) " neighbours" }
                    } @else { (badge(Tone::Bad, "off")) " plaintext updates (a debugging job)" }
                }
            }
        }
        section aria-labelledby="quality" {
            h2 #quality { "How well it does" }
            @match &card.evaluation {
                Some(e) => {
                    p { "Federated evaluation of this model on the sites' held-out records (summed counts; no site's own numbers)." }
                    (metric_tiles(e))
                    @if let Some(f) = &card.crisis_flag {
                        h3 { "Crisis flag" }
                        p {
                            @match f.threshold {
                                Some(t) => { "Flags a possible crisis when any crisis class's probability is at least " strong { (format!("{t:.2}")) }
                                    ": recall " (num(f.recall)) ", precision " (num(f.precision)) " on " (f.crisis_examples) " crisis examples of " (f.examples)
                                    " (target recall " (format!("{:.2}", f.target_recall)) ")." },
                                None => { "No operating threshold could be chosen (no held-out crisis example was reported); sites use their own setting." },
                            }
                        }
                    }
                    (recall_table(e))
                    (confusion("confusion", &card.model.labels, &e.confusion, release::is_crisis_label))
                },
                None => { p.alert { "This model was not evaluated: nothing is known about how well it does." } },
            }
        }
        section aria-labelledby="training" {
            h2 #training { "How it was trained" }
            div.charts {
                (metrics_chart("chart-metrics", &rounds).render())
                (participation_chart("chart-sites", &participation).render())
            }
        }
        @if let Some(p) = &card.privacy {
            section aria-labelledby="privacy" {
                h2 #privacy { "Differential privacy" }
                p { "Every training record is protected at " strong { "ε = " (format!("{:.3}", p.epsilon)) } ", δ = " (format!("{:e}", p.delta))
                    " (" (p.mechanism) ", clip " (p.clip) ", noise multiplier " (format!("{:.3}", p.noise_multiplier)) ", "
                    (p.sampling) " sampling at " (p.sample_rate) ", " (p.steps_per_round) " steps × " (p.rounds) " rounds)." }
                @if !p.epsilon_per_site.is_empty() {
                    div.scroll { table {
                        caption { "ε each site charged to its own ledger (as logged)" }
                        thead { tr { th scope="col" { "site" } th.num scope="col" { "ε" } } }
                        tbody { @for (s, e) in &p.epsilon_per_site { tr { th scope="row" { (s) } td.num { (e) } } } }
                    } }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maeum_tlog::release::{CardJob, CardModel, CardRound, CardSecAgg};

    pub(crate) fn card() -> ModelCard {
        let labels: Vec<String> = ["suicidewatch", "lonely", "adhd"].iter().map(|s| (*s).to_owned()).collect();
        let eval = |d: u64| release::evaluation(&labels, &[vec![d, 1, 0], vec![1, 5, 0], vec![0, 0, 4]], 3);
        ModelCard {
            format: release::CARD_FORMAT.into(),
            consortium: "seoul <mental health>".into(),
            version: 2,
            parent_version: Some(1),
            model: CardModel {
                sha256: "ab".repeat(32),
                size: 10,
                layout_digest: "cd".repeat(32),
                kind: "text-classifier".into(),
                parameters: 1234,
                labels: labels.clone(),
                encoder: None,
                adapter: None,
            },
            job: CardJob {
                id: "job-1".into(),
                name: "triage".into(),
                spec_sha256: "ef".repeat(32),
                rounds: 2,
                config: serde_json::json!({}),
            },
            round: 2,
            released_ms: 1_700_000_000_000,
            secure_aggregation: CardSecAgg { enabled: true, threshold: 0, neighbours: 0, clip: 1.0, max_weight: 10 },
            initial_evaluation: Some(eval(0)),
            rounds: (1..=2)
                .map(|r| CardRound {
                    round: r,
                    contributors: 3,
                    dropped: r - 1,
                    total_weight: 100,
                    secure_aggregation: true,
                    secagg_threshold: 2,
                    aggregate_sha256: String::new(),
                    model_sha256: String::new(),
                    evaluation: Some(eval(u64::from(r) * 3)),
                })
                .collect(),
            evaluation: Some(eval(6)),
            crisis_flag: None,
            privacy: None,
        }
    }

    #[test]
    fn the_card_shows_standing_metrics_and_charts() {
        let standing = Standing {
            signature: Some(Ok("Ed25519 under 12ab…".into())),
            logged: Some(Err("no model_release entry".into())),
            overrides: vec![(
                "min_crisis_recall".into(),
                "0.5".into(),
                "0.8".into(),
                "lead".into(),
                "pilot <only>".into(),
            )],
            installs: vec![
                ("hospital-a".into(), true, String::new()),
                ("hospital-b".into(), false, "layout differs".into()),
            ],
            ..Standing::default()
        };
        let html = render(&card(), &standing).into_string();
        assert!(html.contains("badge ok\">verified"));
        assert!(html.contains("badge bad\">not in the log"));
        assert!(html.contains("pilot &lt;only&gt;"));
        assert!(html.contains("seoul &lt;mental health&gt;"));
        // Three rounds (0, 1, 2) × three series.
        assert_eq!(html.matches("class=\"pt\" data-series=\"crisis_recall\"").count(), 3, "{html}");
        assert!(html.contains("id=\"confusion\""));
        assert!(html.contains("<tr class=\"bad\"><th scope=\"row\">hospital-b</th>"));
    }

    #[test]
    fn an_unevaluated_card_says_so() {
        let mut c = card();
        c.evaluation = None;
        assert!(render(&c, &Standing::default()).into_string().contains("was not evaluated"));
    }
}
