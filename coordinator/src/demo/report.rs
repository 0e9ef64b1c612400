//! What the demo prints and writes at the end: scores, the comparison tables, the
//! baselines, each site's policy and privacy spend.

use super::*;

#[derive(Debug, Serialize)]
pub(super) struct Score {
    pub(super) accuracy: f64,
    pub(super) macro_f1: f64,
}

pub(super) fn score(c: &Confusion) -> Score {
    let m = c.metrics();
    Score { accuracy: m.accuracy, macro_f1: m.macro_f1 }
}

pub(super) const MACRO_F1_NOTE: &str = "macro-F1: the F1 score (harmonic mean of precision and recall) of each label, averaged \
with equal weight, so a small class such as a crisis label counts as much as a large one; accuracy alone can hide \
a missed small class.";

/// Why a round may count fewer sites than the demo started: the coordinator starts a
/// job once `min_sites` accepted and every connected site has decided
/// (`rounds::join`), and each round takes the accepted sites that are online then.
/// The `[policy]` each site enforced, as its site.toml says.
pub(super) fn site_policies(work: &Path, sites: &[String]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for s in sites {
        let policy = std::fs::read_to_string(work.join(s).join("site.toml"))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| t.get("policy").cloned())
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or(serde_json::Value::Null);
        out.insert(s.clone(), policy);
    }
    serde_json::Value::Object(out)
}

/// ε per record each site charged for `job_id`, as the audit log records it
/// (`privacy_charged` entries in the run's export): the largest per site, or null.
pub(super) fn logged_privacy_spent(export: &[u8], sites: &[String], job_id: &str) -> serde_json::Value {
    let mut out: serde_json::Map<String, serde_json::Value> =
        sites.iter().map(|s| (s.clone(), serde_json::Value::Null)).collect();
    let entries = maeum_tlog::export::Export::decode(export).map(|e| e.entries).unwrap_or_default();
    for e in entries {
        if let maeum_tlog::Event::PrivacyCharged { job_id: j, site, epsilon, .. } = e.event
            && j == job_id
            && let Ok(eps) = epsilon.parse::<f64>()
        {
            let slot = out.entry(site).or_insert(serde_json::Value::Null);
            if slot.as_f64().is_none_or(|best| eps > best) {
                *slot = eps.into();
            }
        }
    }
    serde_json::Value::Object(out)
}

pub(super) fn fewer_sites_note(min_sites: usize) -> String {
    format!(
        "fewer sites in a round: the job starts as soon as {min_sites} sites (min_sites) have accepted and every \
connected site has decided; sites still starting up then accept when they connect and train from the next round \
on. A site that drops out of a round is left out of it."
    )
}

/// The per-round table and the comparison table, for people.
pub(super) fn tables(
    per_round: &[serde_json::Value],
    fed: &Score,
    centralized: Option<&Score>,
    local_mean: Option<(f64, f64)>,
) -> (comfy_table::Table, comfy_table::Table) {
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.4}"));
    let dp = per_round.iter().any(|r| r["epsilon"].is_number());
    let mut header = vec!["round", "accuracy", "macro-F1", "crisis recall", "sites"];
    if dp {
        header.push("ε");
    }
    let mut rounds = maeum_runtime::table::table(&header, &[0, 1, 2, 3, 4, 5]);
    for r in per_round {
        let mut row = vec![
            r["round"].to_string(),
            num(&r["accuracy"]),
            num(&r["macro_f1"]),
            num(&r["crisis_recall"]),
            r["sites"].to_string(),
        ];
        if dp {
            row.push(r["epsilon"].as_f64().map_or("-".into(), |e| format!("{e:.3}")));
        }
        rounds.add_row(row);
    }
    let mut comparison = maeum_runtime::table::table(&["", "accuracy", "macro-F1"], &[1, 2]);
    let mut row = |name: &str, acc: f64, f1: f64| {
        comparison.add_row(vec![name.to_string(), format!("{acc:.4}"), format!("{f1:.4}")]);
    };
    row("federated", fed.accuracy, fed.macro_f1);
    if let Some(c) = centralized {
        row("centralized (pooled data)", c.accuracy, c.macro_f1);
    }
    if let Some((acc, f1)) = local_mean {
        row("local-only (mean of sites)", acc, f1);
    }
    (rounds, comparison)
}

/// Centralized and local-only baselines. With `encoder` (the encoders folder, the work
/// dir and the encoder's name), the model is the encoder-head and the sentence vectors come from each
/// site's own cache (the sites embedded their records during the job), so nothing is
/// embedded twice.
pub(super) fn baselines(
    dir: &Path,
    sites: &[String],
    labels: Vec<String>,
    encoder: Option<(PathBuf, PathBuf, String)>,
) -> Result<(Score, Vec<Score>)> {
    let labels = LabelSet::new(labels).map_err(anyhow::Error::msg)?;
    let spec = match &encoder {
        Some((_, _, name)) => ModelSpec::EncoderHead {
            encoder: maeum_models::encoder::known(name).context("the demo's encoder is known")?,
            hidden: maeum_protocols::job::ModelTable::default().hidden,
            labels,
        },
        None => ModelSpec::TextClassifier { config: TextClassifierConfig::default(), labels },
    };
    let mut trains = Vec::new();
    let mut tests = Vec::new();
    for s in sites {
        let (train, test) = (read(&dir.join(s).join("train.jsonl"))?, read(&dir.join(s).join("test.jsonl"))?);
        // Each site's own cache (HOME/cache/vectors) holds exactly its records' vectors.
        let mut encoders = encoder.as_ref().map(|(enc_dir, work, _)| {
            maeum_models::encoder::Encoders::new(
                enc_dir,
                Some(work.join(s).join(maeum_models::encoder::SITE_VECTOR_CACHE)),
            )
        });
        let mut prepare = |examples: &[Example]| match encoders.as_mut() {
            Some(e) => spec.prepare_text_in(examples, e, &mut |_, _| {}),
            None => spec.prepare_text(examples),
        };
        trains.push(prepare(&train)?);
        tests.push(prepare(&test)?);
    }
    let test = Prepared::concat(&tests).context("joining the sites' test sets")?;
    let cfg = TrainConfig::default();
    let fit = |data: &Prepared| -> Result<Score> {
        let (params, _) = spec.train(&spec.init(cfg.seed)?, data, &cfg, &mut ())?;
        Ok(score(&spec.evaluate(&params, &test)?))
    };
    let centralized = fit(&Prepared::concat(&trains).context("joining the sites' training sets")?)?;
    let local = trains.iter().map(fit).collect::<Result<Vec<_>>>()?;
    Ok((centralized, local))
}

/// The crisis-class recall (the lowest among the crisis classes) of a reported
/// confusion matrix; `None` without a crisis class or crisis examples.
pub(super) fn crisis_recall(labels: &[String], c: &pb::Confusion) -> Option<f64> {
    let rows = client::confusion(c)?.counts;
    maeum_tlog::release::crisis_recall(&maeum_tlog::release::evaluation(labels, &rows, 0))
}
