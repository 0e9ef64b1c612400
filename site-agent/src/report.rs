//! `maeum-site report`: this site's own view for its privacy officer, as one
//! self-contained HTML file (no network, no script): the jobs offered and how the site
//! answered, what left the site and in what form, the privacy spent against the
//! budget, and the releases installed or refused. Everything comes from files the site
//! keeps in HOME (the audit journal, the offers and answers, the privacy ledger, the
//! release events); nothing is asked of the coordinator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use maud::html;

use maeum_protocols::job::JobSpec;
use maeum_report::chart::num;
use maeum_report::{Page, Tone, badge, time};

use crate::enrol::Home;
use crate::witness::Record;

/// What left the site for one job round attempt, in plain words. `floor` is the
/// smallest cohort whose sum this site lets be unmasked: its policy's `min_cohort`, or
/// the job's `min_sites` when larger (`Policy::check_survivors`).
fn form_of(secure: bool, floor: usize) -> String {
    if secure {
        format!(
            "masked for secure aggregation (the coordinator can remove the masks only from a sum over a cohort of at \
             least {floor} sites, which this site checks before it reveals its shares): the model update, the count \
             of training records and this site's evaluation counts"
        )
    } else {
        "in plaintext (a debugging job without secure aggregation): the model update and the count of training \
         records; evaluation counts in plaintext too"
            .into()
    }
}

/// Writes the report to `out` (default `HOME/reports/site-report.html`); returns the path.
pub fn write(dir: &Path, out: Option<PathBuf>) -> Result<PathBuf> {
    crate::enrol::check_home(dir)?;
    let home = Home::new(dir);
    let html = render(&home, maeum_runtime::runtime::now_ms())?;
    let out = out.unwrap_or_else(|| home.path("reports/site-report.html"));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    maeum_models::write_atomic(&out, html.as_bytes()).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// The report's HTML.
pub fn render(home: &Home, now_ms: i64) -> Result<String> {
    let site_id = home.site_id()?;
    let enrolment = home.enrolment().ok();
    let offers = crate::consent::listed(home)?;
    let journal = crate::witness::read_journal(home)?;
    let ledger = crate::ledger::Ledger::read(home)?;
    let policy = home.config()?.policy;
    let (total, total_delta) = ledger.total();
    let events = crate::releases::events(home)?;
    let current = crate::releases::current(home)?;
    let specs: BTreeMap<String, JobSpec> = offers
        .iter()
        .filter_map(|o| {
            let text = home.read(&format!("jobs/{}.json", o.job_id)).ok()?;
            Some((o.job_id.clone(), JobSpec::from_json(&text).ok()?))
        })
        .collect();
    let floor = |job_id: &str| {
        let min_sites = specs.get(job_id).map_or(0, |s| s.min_sites as usize);
        usize::from(policy.min_cohort).max(min_sites)
    };
    let contributions: Vec<&Record> = journal.iter().filter(|r| matches!(r, Record::Contribution { .. })).collect();
    let refusals: Vec<&Record> = journal.iter().filter(|r| matches!(r, Record::Refusal { .. })).collect();
    let plaintext = contributions.iter().filter(|r| matches!(r, Record::Contribution { secure: false, .. })).count();
    let consortium = enrolment.as_ref().map_or_else(|| "(not enrolled)".to_owned(), |e| e.consortium.clone());
    let subtitle = format!("Site {site_id} in consortium {consortium}");
    let body = html! {
        div.grid {
            div.tile { span.big { (offers.iter().filter(|o| o.state == "accepted").count()) " / " (offers.len()) } "job offers accepted" }
            div.tile { span.big { (contributions.len()) } "contributions sent" @if plaintext > 0 { ", " strong { (plaintext) " in plaintext" } } }
            div.tile { span.big { "ε " (format!("{total:.3}")) } "privacy spent in all"
                @if policy.privacy.budget > 0.0 { " of a budget of " (policy.privacy.budget) } @else { " (no total budget set)" } }
            div.tile { span.big { @match &current { Some(c) => { "v" (c.version) }, None => { "—" } } } "release in service" }
        }
        @if plaintext > 0 {
            p.alert { strong { "This site sent " (plaintext) " update(s) in plaintext." } " The coordinator saw those updates and record counts as they were (jobs with the plaintext debugging switch)." }
        }
        h2 { "Job offers and answers" }
        @if offers.is_empty() { p.muted { "No job was offered yet." } }
        @else {
            div.scroll { table #offers {
                thead { tr { th scope="col" { "job" } th scope="col" { "received" } th scope="col" { "answer" } th scope="col" { "by" } th scope="col" { "reason" } th scope="col" { "job file SHA-256" } } }
                tbody { @for o in &offers {
                    tr class=[(o.state == "refused").then_some("bad")] {
                        th scope="row" { (o.name) br; small { code { (o.job_id) } } }
                        td { (time(o.received_ms)) }
                        td { (badge(match o.state.as_str() { "accepted" => Tone::Ok, "refused" => Tone::Bad, _ => Tone::Warn }, &o.state)) }
                        td { (o.by) }
                        td { (o.reason) }
                        td { (maeum_report::short_digest(&o.spec_sha256)) }
                    }
                } }
            } }
        }
        h2 { "What left this site" }
        p { "Records never leave the site. Per training round the site sends one contribution; besides it, only the answers to offers, "
            "refusals under its policy (with their reasons), the ε it charged, release install reports and audit-log cosignatures." }
        @if contributions.is_empty() { p.muted { "No contribution was sent." } }
        @else {
            div.scroll { table #sent {
                thead { tr { th scope="col" { "when" } th scope="col" { "job" } th.num scope="col" { "round" } th.num scope="col" { "attempt" } th scope="col" { "in what form" } } }
                tbody { @for r in &contributions {
                    @if let Record::Contribution { job_id, round, attempt, secure, time_ms } = r {
                        tr class=[(!secure).then_some("bad")] {
                            td { (time(*time_ms)) } td { code { (job_id) } } td.num { (round) } td.num { (attempt) }
                            td { @if *secure { (badge(Tone::Ok, "masked")) } @else { (badge(Tone::Bad, "plaintext")) } " " (form_of(*secure, floor(job_id))) }
                        }
                    }
                } }
            } }
        }
        @if !refusals.is_empty() {
            h3 { "Refused under this site's policy" }
            ul #refusals { @for r in &refusals {
                @if let Record::Refusal { job_id, round, attempt, rule, detail, time_ms } = r {
                    li { (time(*time_ms)) ": job " code { (job_id) } " round " (round) " attempt " (attempt) " — " code { (rule) } ": " (detail) }
                }
            } }
        }
        h2 { "Differential privacy" }
        @if ledger.jobs.is_empty() { p.muted { "No differentially private job has used this site's records." } }
        @else {
            div.scroll { table #ledger {
                thead { tr { th scope="col" { "job" } th scope="col" { "mechanism" } th.num scope="col" { "rounds" } th.num scope="col" { "ε spent" } th.num scope="col" { "ε reserved" } th.num scope="col" { "δ" } } }
                tbody { @for j in &ledger.jobs {
                    tr { th scope="row" { code { (j.job_id) } } td { (j.mechanism) } td.num { (j.rounds_charged) " / " (j.rounds_planned) }
                        td.num { (num(Some(j.spent))) } td.num { (num(Some(j.reserved))) } td.num { (format!("{:e}", j.delta)) } }
                } }
            } }
            p { "In all: ε = " (format!("{total:.3}")) " at δ = " (format!("{total_delta:e}")) " (the smaller of basic composition and the composed Rényi bound)."
                @if policy.privacy.budget > 0.0 { " Budget " (policy.privacy.budget) ", leaving ε = " (format!("{:.3}", (policy.privacy.budget - total).max(0.0))) "." } }
        }
        p.muted { "Policy: jobs without DP " @if policy.privacy.allow_non_dp { "allowed" } @else { "refused" }
            "; at most ε = " (policy.privacy.max_epsilon) " and δ = " (format!("{:e}", policy.privacy.max_delta)) " per job." }
        h2 { "Releases" }
        @if events.is_empty() { p.muted { "No release was installed or refused yet." } }
        @else {
            div.scroll { table #releases {
                thead { tr { th scope="col" { "when" } th scope="col" { "release" } th scope="col" { "outcome" } th scope="col" { "model SHA-256" } } }
                tbody { @for e in &events {
                    tr class=[(!e.installed).then_some("bad")] {
                        td { (time(e.time_ms)) } th scope="row" { "v" (e.version) }
                        td { @if e.installed { (badge(Tone::Ok, "installed")) } @else { (badge(Tone::Bad, "refused")) " " (e.reason) } }
                        td { (maeum_report::short_digest(&e.model)) }
                    }
                } }
            } }
        }
        h2 { "Where this comes from" }
        dl.facts {
            dt { "Home" } dd { code { (home.dir.display()) } }
            dt { "Contributions, refusals" } dd { code { "audit/journal.jsonl" } " (checked against the consortium's log by " code { "maeum-site audit prove" } ")" }
            dt { "Offers and answers" } dd { code { "jobs/offers/" } ", " code { "jobs/consent/" } }
            dt { "Privacy" } dd { code { (crate::ledger::LEDGER) } }
            dt { "Releases" } dd { code { "releases/events.jsonl" } }
        }
    };
    Ok(Page {
        title: "Site report",
        subtitle: &subtitle,
        nav: &[],
        current: "",
        live: false,
        generated_ms: now_ms,
        generator: concat!("maeum-site ", env!("CARGO_PKG_VERSION")),
        body,
    }
    .render())
}
