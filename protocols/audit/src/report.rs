//! `maeum-audit report LOG --html FILE`: the auditor's report as one self-contained HTML
//! file: whether the export verified (and against which key), who cosigned what, every
//! job with its participation, every release with its promotions and the sites'
//! installs, and every entry. With `--release DIR` (repeatable) each exported release
//! is checked against the log as `maeum-audit release` does, and its model card is
//! rendered. A log that does not verify gets a report that says so and shows nothing
//! the log claims.

use std::collections::BTreeMap;

use maud::{Markup, html};

use maeum_report::card::{self as cardview, Standing};
use maeum_report::chart::BarChart;
use maeum_report::{Page, Tone, badge, entry_fields, short_digest, time};
use maeum_tlog::export::Verified;
use maeum_tlog::release::{ModelCard, ReleaseAudit};
use maeum_tlog::{Entry, Event};

/// A release checked with `--release`: the audit and its card, or why it failed.
pub type CheckedRelease = (String, Result<(ReleaseAudit, ModelCard), String>);

/// The whole report. `verified` is the export's verification; `pinned`, whether it was
/// checked against a trusted key.
pub fn render(
    log_name: &str,
    verified: &Result<Verified, String>,
    pinned: bool,
    releases: &[CheckedRelease],
    now_ms: i64,
) -> String {
    let body = match verified {
        Err(why) => html! {
            div.alert role="alert" #verdict {
                strong { "FAILED: the log does not verify." } " " (why)
                p { "Nothing the log claims is shown: an export that fails a check proves nothing about what happened." }
            }
        },
        Ok(v) => verified_body(v, pinned, releases),
    };
    Page {
        title: "Audit report",
        subtitle: &format!("The audit-log export {log_name}"),
        nav: &[],
        current: "",
        live: false,
        generated_ms: now_ms,
        generator: concat!("maeum-audit ", env!("CARGO_PKG_VERSION")),
        body,
    }
    .render()
}

fn verified_body(v: &Verified, pinned: bool, releases: &[CheckedRelease]) -> Markup {
    let r = &v.report;
    let entries = &v.export.entries;
    html! {
        div.note #verdict {
            (badge(Tone::Ok, "verified")) " "
            strong { "Every check passed" } " (AUD-01 … AUD-14): canonical entries numbered from 0, the init entry and its CA, every checkpoint's root, "
            "signature and consistency with the one before, every witness certificate and cosignature."
            @if pinned { " The log key matches the key you trust (" code { "--trust" } ")." }
            @else { " " (badge(Tone::Warn, "key not pinned")) " Pass " code { "--trust KEY" } " to check the log key against one you got another way." }
        }
        dl.facts {
            dt { "Log" } dd { (r.origin) " (consortium " (r.consortium) ")" }
            dt { "Log key" } dd { code { (r.log_public_key) } }
            dt { "Entries" } dd { (r.entries) ", " (time(r.first_time_ms)) " to " (time(r.last_time_ms)) }
            dt { "Root" } dd { code { (r.root) } }
            dt { "Checkpoints" } dd { (r.checkpoints) " with " (r.cosignatures) " cosignatures" }
        }
        h2 { "Witnesses" }
        (witnesses(v))
        h2 { "Jobs" }
        (jobs(entries))
        h2 { "Releases" }
        (release_entries(entries))
        @for (name, checked) in releases {
            h2 { "Release " (name) }
            @match checked {
                Err(why) => div.alert role="alert" { (badge(Tone::Bad, "does not check out")) " " (why) },
                Ok((a, card)) => (cardview::render(card, &standing(a))),
            }
        }
        h2 { "Every entry" }
        details #all-entries {
            summary { (entries.len()) " entries, oldest first" }
            div.scroll { table {
                thead { tr { th.num scope="col" { "#" } th scope="col" { "time" } th scope="col" { "kind" } th scope="col" { "details" } } }
                tbody { @for e in entries {
                    tr { td.num { (e.seq) } td { (time(e.time_ms)) } td { code { (e.event.kind()) } } td { (entry_fields(&e.event)) } }
                } }
            } }
        }
    }
}

fn standing(a: &ReleaseAudit) -> Standing {
    Standing {
        signature: Some(Ok(format!("Ed25519 under the log's key {}…", a.signing_public_key.get(..16).unwrap_or("")))),
        logged: Some(Ok(format!(
            "entry #{} ({}), in checkpoint {} cosigned by {}",
            a.logged.seq,
            time(a.logged.time_ms),
            a.logged.checkpoint_size,
            if a.logged.cosigned_by.is_empty() { "no site".to_owned() } else { a.logged.cosigned_by.join(", ") }
        ))),
        current: a.current,
        history: a
            .promotions
            .iter()
            .map(|p| (p.time_ms, format!("made current (entry #{})", p.seq), p.operator.clone()))
            .collect(),
        overrides: a
            .gate_overrides
            .iter()
            .map(|o| (o.gate.clone(), o.measured.clone(), o.threshold.clone(), o.operator.clone(), o.reason.clone()))
            .collect(),
        gate_failures: Vec::new(),
        installs: a
            .installed_by
            .iter()
            .map(|s| (s.clone(), true, String::new()))
            .chain(a.refused_by.iter().map(|r| (r.site.clone(), false, r.reason.clone())))
            .collect(),
    }
}

fn witnesses(v: &Verified) -> Markup {
    let mut per_site: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for cp in &v.export.checkpoints {
        for c in &cp.cosignatures {
            let w = per_site.entry(c.site.as_str()).or_default();
            w.0 += 1;
            w.1 = w.1.max(cp.size);
        }
    }
    let latest = v.export.checkpoints.last().map_or(0, |c| c.size);
    html! {
        @if per_site.is_empty() { p.alert { "No site cosigned any checkpoint: nobody outside the coordinator vouches for this log." } }
        @else {
            div.scroll { table #witnesses {
                thead { tr { th scope="col" { "site" } th.num scope="col" { "checkpoints cosigned" } th.num scope="col" { "largest cosigned" } } }
                tbody { @for (site, (n, max)) in &per_site {
                    tr { th scope="row" { (site) } td.num { (n) } td.num { (max) @if *max < latest { " of " (latest) } } }
                } }
            } }
        }
        details {
            summary { "Checkpoints and their cosigners" }
            div.scroll { table {
                thead { tr { th.num scope="col" { "size" } th scope="col" { "root" } th scope="col" { "cosigned by" } } }
                tbody { @for cp in &v.export.checkpoints {
                    tr { td.num { (cp.size) } td { (short_digest(&cp.root)) }
                        td { @if cp.cosignatures.is_empty() { "—" } @else { (cp.cosignatures.iter().map(|c| c.site.as_str()).collect::<Vec<_>>().join(", ")) } } }
                } }
            } }
        }
    }
}

#[derive(Default)]
struct JobView<'a> {
    name: &'a str,
    operator: &'a str,
    spec: &'a str,
    submitted_ms: i64,
    decisions: Vec<(&'a str, bool, &'a str)>,
    /// Per committed round: contributors, and the dropped of its last secure-aggregation session.
    rounds: BTreeMap<u32, (u64, u64)>,
    dropped: BTreeMap<u32, u64>,
    failed: usize,
    refusals: Vec<(u32, &'a str, &'a str, &'a str)>,
    charges: usize,
    finished: Option<&'a str>,
}

fn jobs(entries: &[Entry]) -> Markup {
    let mut jobs: BTreeMap<&str, JobView<'_>> = BTreeMap::new();
    for e in entries {
        match &e.event {
            Event::JobSubmitted { job_id, name, spec_sha256, operator } => {
                let j = jobs.entry(job_id).or_default();
                (j.name, j.operator, j.spec, j.submitted_ms) = (name, operator, spec_sha256, e.time_ms);
            }
            Event::JobDecision { job_id, site, accepted, reason } => {
                jobs.entry(job_id).or_default().decisions.push((site, *accepted, reason));
            }
            Event::RoundSecagg { job_id, round, dropped, .. } => {
                jobs.entry(job_id).or_default().dropped.insert(*round, dropped.len() as u64);
            }
            Event::RoundCommitted { job_id, round, contributors, .. } => {
                let j = jobs.entry(job_id).or_default();
                let dropped = j.dropped.get(round).copied().unwrap_or(0);
                j.rounds.insert(*round, (contributors.len() as u64, dropped));
            }
            Event::RoundFailed { job_id, .. } => jobs.entry(job_id).or_default().failed += 1,
            Event::SiteRefused { job_id, round, site, rule, detail, .. } => {
                jobs.entry(job_id).or_default().refusals.push((*round, site, rule, detail));
            }
            Event::PrivacyCharged { job_id, .. } => jobs.entry(job_id).or_default().charges += 1,
            Event::JobFinished { job_id, state } => jobs.entry(job_id).or_default().finished = Some(state),
            _ => {}
        }
    }
    html! {
        @if jobs.is_empty() { p.muted { "No job in this log." } }
        @for (id, j) in &jobs {
            h3 { "Job " (j.name) " (" code { (id) } ")" }
            dl.facts {
                dt { "Submitted" } dd { (time(j.submitted_ms)) " by " (j.operator) "; job file SHA-256 " (short_digest(j.spec)) }
                dt { "Outcome" } dd { @match j.finished { Some(s) => (badge(if s == "completed" { Tone::Ok } else { Tone::Bad }, s)), None => (badge(Tone::Warn, "not finished in this log")) }
                    " " (j.rounds.len()) " rounds committed, " (j.failed) " attempts failed"
                    @if j.charges > 0 { ", " (j.charges) " privacy charges logged" } }
                dt { "Answers" } dd {
                    @for (site, ok, reason) in &j.decisions {
                        (site) " " @if *ok { (badge(Tone::Ok, "joined")) } @else { (badge(Tone::Bad, "refused")) " “" (reason) "”" } "; "
                    }
                }
            }
            @let bars: Vec<(u32, u64, u64)> = j.rounds.iter().map(|(r, (c, d))| (*r, *c, *d)).collect();
            div.charts { (BarChart { id: format!("sites-{id}"), ..cardview::participation_chart("", &bars) }.render()) }
            @if !j.refusals.is_empty() {
                p { strong { "Refusals under a site's policy:" } }
                ul { @for (round, site, rule, detail) in &j.refusals { li { "round " (round) ": " (site) " (" code { (rule) } "): " (detail) } } }
            }
        }
    }
}

fn release_entries(entries: &[Entry]) -> Markup {
    // version digest → (release entry, promotions, overrides, last report per site)
    struct R<'a> {
        entry: &'a Entry,
        promoted: Vec<(i64, &'a str)>,
        overrides: Vec<&'a Event>,
        installs: BTreeMap<&'a str, (bool, &'a str)>,
    }
    let mut releases: Vec<R<'_>> = Vec::new();
    let find = |rs: &mut Vec<R<'_>>, v: &str| {
        rs.iter()
            .position(|r| matches!(&r.entry.event, Event::ModelRelease { version_sha256, .. } if version_sha256 == v))
    };
    for e in entries {
        match &e.event {
            Event::ModelRelease { .. } => {
                releases.push(R { entry: e, promoted: Vec::new(), overrides: Vec::new(), installs: BTreeMap::new() })
            }
            Event::ReleasePromoted { version_sha256, operator } => {
                if let Some(i) = find(&mut releases, version_sha256) {
                    releases[i].promoted.push((e.time_ms, operator));
                }
            }
            Event::ReleaseGateOverridden { version_sha256, .. } => {
                if let Some(i) = find(&mut releases, version_sha256) {
                    releases[i].overrides.push(&e.event);
                }
            }
            Event::ReleaseInstall { site, version_sha256, installed, reason } => {
                if let Some(i) = find(&mut releases, version_sha256) {
                    releases[i].installs.insert(site, (*installed, reason));
                }
            }
            _ => {}
        }
    }
    html! {
        @if releases.is_empty() { p.muted { "No release in this log." } }
        @else {
            div.scroll { table #release-entries {
                thead { tr { th.num scope="col" { "entry" } th scope="col" { "model SHA-256" } th scope="col" { "job, round" } th scope="col" { "promoted" } th scope="col" { "sites" } } }
                tbody { @for r in &releases {
                    @if let Event::ModelRelease { job_id, round, version_sha256, .. } = &r.entry.event {
                        tr class=[(!r.overrides.is_empty()).then_some("bad")] {
                            td.num { (r.entry.seq) }
                            td { (short_digest(version_sha256)) }
                            td { code { (job_id) } ", " (round) }
                            td {
                                @if r.promoted.is_empty() { "never" }
                                @for (t, who) in &r.promoted { (time(*t)) " by " (who) br; }
                                @for o in &r.overrides { @if let Event::ReleaseGateOverridden { gate, measured, threshold, operator, reason, .. } = o {
                                    (badge(Tone::Bad, "gate overridden")) " " (gate) " " (measured) " < " (threshold) " by " (operator) ": “" (reason) "”" br;
                                } }
                            }
                            td {
                                @for (site, (ok, reason)) in &r.installs {
                                    (site) " " @if *ok { (badge(Tone::Ok, "installed")) } @else { (badge(Tone::Bad, "refused")) " " (reason) } br;
                                }
                            }
                        }
                    }
                } }
            } }
        }
    }
}
