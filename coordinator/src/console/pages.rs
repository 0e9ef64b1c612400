//! The console's pages: overview, jobs and one job, sites, releases and one release,
//! and the audit log with its search, rendered from the coordinator's state.

use super::*;
use crate::store::Rounds;

/// Rounds a job's page shows (its table and charts), the latest ones; `jobs status
/// --before` pages further back.
const ROUNDS_ON_PAGE: u32 = 200;

pub(super) fn render(c: &Coord, path: &str, query: &str) -> Result<Option<View>> {
    let consortium = c.home.consortium()?.name;
    let sub = format!("Consortium {consortium}");
    let path = path.trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    Ok(match parts.as_slice() {
        [] | [""] => Some(View::new("Overview", &sub, overview(c)?)),
        ["jobs"] => Some(View::new("Jobs", &sub, jobs(c)?)),
        ["jobs", id] => match c.store.job(id, Rounds::Latest(ROUNDS_ON_PAGE))? {
            Some(j) => Some(View::new(&format!("Job {}", j.spec.name), &format!("{sub} · job {}", j.id), job(c, &j)?)),
            None => None,
        },
        ["sites"] => Some(View::new("Sites", &sub, sites(c)?)),
        ["releases"] => Some(View::new("Releases", &sub, releases(c)?)),
        ["releases", v] => {
            match v.trim_start_matches('v').parse::<u32>().ok().map(|v| c.registry.get(v)).transpose()?.flatten() {
                Some(r) => Some(View::new(&format!("Release v{}", r.version), &sub, release_page(c, &r)?)),
                None => None,
            }
        }
        ["audit"] => {
            Some(View::new("Audit log", &sub, audit(c, &query_param(query, "q"), &query_param(query, "kind"))?))
        }
        _ => None,
    })
}

pub(super) fn entries(c: &Coord) -> Result<Vec<Entry>> {
    (0..c.audit.size()).map(|seq| c.audit.entry(seq)).collect()
}

pub(super) fn state_badge(state: &str) -> Markup {
    let tone = match state {
        "completed" => Tone::Ok,
        "failed" | "aborted" => Tone::Bad,
        "running" | "pending" | "paused" => Tone::Warn,
        _ => Tone::Neutral,
    };
    badge(tone, state)
}

pub(super) fn overview(c: &Coord) -> Result<Markup> {
    let jobs = c.store.jobs(Rounds::LISTED)?;
    let sites = c.site_infos()?;
    let online = sites.iter().filter(|s| s.online).count();
    let current = c.registry.current()?;
    let latest = c.audit.latest();
    let current_job = crate::server::lock(&c.current_job).clone();
    Ok(html! {
        div.grid {
            div.tile { span.big { (online) " / " (sites.len()) } a href="/sites" { "sites online" } }
            div.tile {
                span.big { (jobs.iter().filter(|j| j.state.is_active()).count()) }
                a href="/jobs" { "jobs running or waiting" } " (" (jobs.len()) " in all)"
            }
            div.tile {
                @match &current { Some((r, _)) => { span.big { "v" (r.version) } a href=(format!("/releases/{}", r.version)) { "current release" } },
                    None => { span.big { "—" } "no release promoted yet" } }
            }
            div.tile {
                span.big { (c.audit.size()) } a href="/audit" { "audit-log entries" }
                @if let Some(cp) = &latest { ", checkpoint " (cp.checkpoint.size) }
            }
        }
        @if let Some(id) = current_job {
            @if let Some(j) = c.store.job(&id, Rounds::Latest(ROUNDS_ON_PAGE))? {
                h2 { "Now" }
                p { "Job " a href=(format!("/jobs/{}", j.id)) { (j.spec.name) } " " (state_badge(j.state.as_str())) ": round "
                    (j.completed_rounds()) " of " (j.spec.rounds) " done. " (crate::server::lock(&c.activity).clone()) }
                div.charts { (metrics_chart(&j).render()) (participation_chart(&j).render()) }
            }
        }
        h2 { "Jobs" }
        (jobs_table(&jobs))
    })
}

pub(super) fn jobs_table(jobs: &[JobRecord]) -> Markup {
    html! {
        @if jobs.is_empty() { p.muted { "No job submitted yet (" code { "maeum-coordinator jobs submit JOB.toml" } ")." } }
        @else {
            div.scroll { table #jobs {
                thead { tr { th scope="col" { "job" } th scope="col" { "state" } th.num scope="col" { "rounds" } th.num scope="col" { "accuracy" }
                    th.num scope="col" { "macro-F1" } th.num scope="col" { "crisis recall" } th scope="col" { "submitted" } } }
                tbody { @for j in jobs.iter().rev() {
                    @let e = last_evaluation(j);
                    tr {
                        th scope="row" { a href=(format!("/jobs/{}", j.id)) { (j.spec.name) } br; small { code { (j.id) } } }
                        td { (state_badge(j.state.as_str())) }
                        td.num { (j.completed_rounds()) " / " (j.spec.rounds) }
                        td.num { (num(e.as_ref().map(|e| e.accuracy))) }
                        td.num { (num(e.as_ref().map(|e| e.macro_f1))) }
                        td.num { (num(e.as_ref().and_then(release::crisis_recall))) }
                        td { (time(j.submitted_ms)) }
                    }
                } }
            } }
        }
    }
}

pub(super) fn evaluation_of(j: &JobRecord, rows: &[Vec<u64>], by: usize) -> CardEvaluation {
    release::evaluation(&j.spec.labels, rows, u32::try_from(by).unwrap_or(u32::MAX))
}

pub(super) fn last_evaluation(j: &JobRecord) -> Option<CardEvaluation> {
    j.history.iter().rev().find_map(|h| h.evaluation.as_ref().map(|e| evaluation_of(j, e, h.evaluated_by.len())))
}

pub(super) fn round_evaluations(j: &JobRecord) -> Vec<(u32, Option<CardEvaluation>)> {
    // Round 0 (the initial model) only when the history shown starts at round 1.
    let initial = (j.rounds_before() == 0).then(|| (0, j.initial_evaluation.as_ref().map(|e| evaluation_of(j, e, 0))));
    initial
        .into_iter()
        .chain(
            j.history
                .iter()
                .map(|h| (h.round, h.evaluation.as_ref().map(|e| evaluation_of(j, e, h.evaluated_by.len())))),
        )
        .collect()
}

pub(super) fn metrics_chart(j: &JobRecord) -> maeum_report::chart::LineChart {
    let evals = round_evaluations(j);
    let refs: Vec<(u32, Option<&CardEvaluation>)> = evals.iter().map(|(r, e)| (*r, e.as_ref())).collect();
    cardview::metrics_chart("chart-metrics", &refs)
}

pub(super) fn participation_chart(j: &JobRecord) -> maeum_report::chart::BarChart {
    let rows: Vec<(u32, u64, u64)> =
        j.history.iter().map(|h| (h.round, h.contributors.len() as u64, h.dropped.len() as u64)).collect();
    cardview::participation_chart("chart-sites", &rows)
}

/// Per round, from the log: (started, secure-aggregation inputs closed, committed) of
/// the attempt that committed, and the largest ε a site logged for it (each site logs
/// the job's ε so far: cumulative).
#[derive(Debug, Default, Clone)]
pub(super) struct RoundLog {
    started_ms: i64,
    secagg_ms: i64,
    committed_ms: i64,
    attempts_failed: Vec<String>,
    refusals: Vec<(String, String, String)>,
    epsilon: Option<f64>,
}

pub(super) fn round_logs(entries: &[Entry], job_id: &str) -> BTreeMap<u32, RoundLog> {
    let mut out: BTreeMap<u32, RoundLog> = BTreeMap::new();
    // (started, inputs closed) of each round's latest attempt; a round's final
    // evaluation runs as one more attempt after its commit and does not count.
    let mut pending: HashMap<u32, (i64, i64)> = HashMap::new();
    for e in entries {
        match &e.event {
            Event::RoundStarted { job_id: j, round, .. } if j == job_id => {
                pending.insert(*round, (e.time_ms, 0));
            }
            Event::RoundSecagg { job_id: j, round, .. } if j == job_id => {
                if let Some(p) = pending.get_mut(round) {
                    p.1 = e.time_ms;
                }
            }
            Event::RoundCommitted { job_id: j, round, .. } if j == job_id => {
                let (started, secagg) = pending.get(round).copied().unwrap_or_default();
                let r = out.entry(*round).or_default();
                (r.started_ms, r.secagg_ms, r.committed_ms) = (started, secagg, e.time_ms);
            }
            Event::RoundFailed { job_id: j, round, attempt, reason } if j == job_id => {
                out.entry(*round).or_default().attempts_failed.push(format!("attempt {attempt}: {reason}"));
            }
            Event::SiteRefused { job_id: j, round, site, rule, detail, .. } if j == job_id => {
                out.entry(*round).or_default().refusals.push((site.clone(), rule.clone(), detail.clone()));
            }
            Event::PrivacyCharged { job_id: j, round, epsilon, .. } if j == job_id => {
                if let Ok(eps) = epsilon.parse::<f64>() {
                    let r = out.entry(*round).or_default();
                    r.epsilon = Some(r.epsilon.map_or(eps, |m: f64| m.max(eps)));
                }
            }
            _ => {}
        }
    }
    out
}

pub(super) fn jobs(c: &Coord) -> Result<Markup> {
    Ok(jobs_table(&c.store.jobs(Rounds::LISTED)?))
}

pub(super) fn job(c: &Coord, j: &JobRecord) -> Result<Markup> {
    let entries = entries(c)?;
    let logs = round_logs(&entries, &j.id);
    let current = crate::server::lock(&c.current_job).as_deref() == Some(j.id.as_str());
    let activity = if current { crate::server::lock(&c.activity).clone() } else { String::new() };
    let last = last_evaluation(j);
    let dp = (j.spec.privacy.mode != maeum_protocols::job::PrivacyMode::None).then_some(&j.spec.privacy);
    let spent = logs.values().filter_map(|l| l.epsilon).fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
    let refused: Vec<(&String, &crate::store::Decision)> = j.decisions.iter().filter(|(_, d)| !d.accept).collect();
    Ok(html! {
        div.grid {
            div.tile { span.big { (state_badge(j.state.as_str())) } "state" @if !activity.is_empty() { ": " (activity) } }
            div.tile { span.big #rounds-done { (j.completed_rounds()) " / " (j.spec.rounds) } "rounds done" }
            div.tile { span.big { (num(last.as_ref().map(|e| e.accuracy))) } "accuracy (latest evaluated round)" }
            div.tile { span.big { (num(last.as_ref().and_then(release::crisis_recall))) } "crisis-class recall" }
            div.tile {
                span.big { @if j.spec.secure_aggregation.enabled() { (badge(Tone::Ok, "secure aggregation")) } @else { (badge(Tone::Bad, "plaintext")) } }
                @if j.spec.secure_aggregation.enabled() { "the coordinator sees only sums" } @else { "a debugging job: updates in plaintext" }
            }
            @if dp.is_some() {
                div.tile { span.big { "ε " (num(spent)) } "ε per record spent so far (record-level DP; the largest any site logged)" }
            }
        }
        @if !j.error.is_empty() { p.alert { strong { "Error: " } (j.error) } }
        h2 { "Rounds" }
        @if j.rounds_before() > 0 {
            p.muted #rounds-shown { "The latest " (j.history.len()) " of " (j.completed_rounds()) " rounds; "
                code { "maeum-coordinator jobs status " (j.id) " --before " (j.rounds_before() + 1) } " shows earlier ones." }
        }
        div.charts { (metrics_chart(j).render()) (participation_chart(j).render()) }
        div.scroll { table #round-table {
            caption { "Each round: who took part, the secure-aggregation session, and how long its stages took (from the audit log's times)" }
            thead { tr {
                th.num scope="col" { "round" } th scope="col" { "contributed" } th scope="col" { "dropped" } th.num scope="col" { "threshold" }
                th.num scope="col" { "records" } th.num scope="col" { "attempts" } th.num scope="col" { "train + mask" } th.num scope="col" { "unmask + apply" }
                @if dp.is_some() { th.num scope="col" { "ε so far" } }
                th scope="col" { "notes" }
            } }
            tbody { @for h in &j.history {
                @let l = logs.get(&h.round).cloned().unwrap_or_default();
                tr class=[(!h.refused.is_empty()).then_some("bad")] {
                    th.num scope="row" { (h.round) }
                    td { (h.contributors.len()) ": " (h.contributors.join(", ")) }
                    td { @if h.dropped.is_empty() { "—" } @else { (h.dropped.len()) ": " (h.dropped.join(", ")) } }
                    td.num { @if h.secure_aggregation { (h.secagg_threshold) " of " (h.contributors.len() + h.dropped.len()) } @else { "plaintext" } }
                    td.num { (h.total_weight) }
                    td.num { (h.attempts) }
                    td.num { (if l.secagg_ms > 0 { duration(l.secagg_ms - l.started_ms) } else { "—".into() }) }
                    td.num { (if l.secagg_ms > 0 && l.committed_ms > 0 { duration(l.committed_ms - l.secagg_ms) } else { "—".into() }) }
                    @if dp.is_some() { td.num { (num(l.epsilon)) } }
                    td {
                        @if !h.refused.is_empty() { "aggregate refused: " (h.refused) br; }
                        @for f in &l.attempts_failed { (f) br; }
                        @for (site, rule, detail) in &l.refusals { (site) " refused (" (rule) "): " (detail) br; }
                    }
                }
            } }
        } }
        h2 { "Sites" }
        @if !refused.is_empty() {
            div.alert #refusals { strong { (refused.len()) " site(s) refused this job:" }
                ul { @for (site, d) in &refused { li { strong { (site) } ": " span.reason { (d.reason) } } } } }
        }
        div.scroll { table #decisions {
            thead { tr { th scope="col" { "site" } th scope="col" { "answer" } th scope="col" { "reason" } th scope="col" { "when" } } }
            tbody { @for (site, d) in &j.decisions {
                tr class=[(!d.accept).then_some("bad")] {
                    th scope="row" { (site) }
                    td { @if d.accept { (badge(Tone::Ok, "joined")) } @else { (badge(Tone::Bad, "refused")) } }
                    td { (d.reason) }
                    td { (time(d.at_ms)) }
                }
            } }
        } }
        @if !j.excluded.is_empty() {
            h3 { "Left out of later attempts" }
            ul { @for (s, why) in &j.excluded { li { strong { (s) } ": " (why) } } }
        }
        h2 { "The job" }
        dl.facts {
            dt { "Model" } dd { (model_kind(j)) ", " (j.spec.labels.len()) " classes" }
            dt { "Job file SHA-256" } dd { code { (j.spec_sha256) } }
            dt { "Submitted" } dd { (time(j.submitted_ms)) }
        }
    })
}

pub(super) fn model_kind(j: &JobRecord) -> String {
    let kind =
        serde_json::to_value(j.spec.model.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    if j.spec.model.encoder.is_empty() { kind } else { format!("{kind} on {}", j.spec.model.encoder) }
}

pub(super) fn sites(c: &Coord) -> Result<Markup> {
    let infos = c.site_infos()?;
    let versions = c.agent_versions();
    let entries = entries(c)?;
    let releases = c.registry.releases()?;
    let version_of: HashMap<&str, u32> = releases.iter().map(|r| (r.model.digest.as_str(), r.version)).collect();
    // Last release report, last refusal (job or release) per site.
    let mut installed: HashMap<String, u32> = HashMap::new();
    let mut refusal: HashMap<String, (i64, String)> = HashMap::new();
    for e in &entries {
        match &e.event {
            Event::ReleaseInstall { site, version_sha256, installed: true, .. } => {
                if let Some(v) = version_of.get(version_sha256.as_str()) {
                    installed.insert(site.clone(), *v);
                }
            }
            Event::ReleaseInstall { site, version_sha256, installed: false, reason } => {
                let v = version_of
                    .get(version_sha256.as_str())
                    .map_or_else(|| "a release".to_owned(), |v| format!("release v{v}"));
                refusal.insert(site.clone(), (e.time_ms, format!("refused {v}: {reason}")));
            }
            Event::JobDecision { job_id, site, accepted: false, reason } => {
                refusal.insert(site.clone(), (e.time_ms, format!("refused job {job_id}: {reason}")));
            }
            Event::SiteRefused { job_id, round, site, rule, detail, .. } => {
                refusal.insert(
                    site.clone(),
                    (e.time_ms, format!("refused round {round} of job {job_id} ({rule}): {detail}")),
                );
            }
            _ => {}
        }
    }
    // The largest checkpoint each site cosigned.
    let mut witnessed: HashMap<String, u64> = HashMap::new();
    for cp in c.audit.checkpoints()? {
        for cs in &cp.cosignatures {
            let w = witnessed.entry(cs.site.clone()).or_default();
            *w = (*w).max(cp.size);
        }
    }
    let log_size = c.audit.latest().map_or(0, |cp| cp.checkpoint.size);
    let forks = c.fork_evidence();
    Ok(html! {
        @if !forks.is_empty() {
            div.alert role="alert" #forks {
                strong { "Fork evidence: " }
                "a site cosigned a checkpoint this log never signed. The site saw a different log than this coordinator's; investigate before trusting either."
                ul { @for (site, what) in &forks { li { strong { (site) } ": " (what) } } }
            }
        }
        div.scroll { table #sites {
            thead { tr {
                th scope="col" { "site" } th scope="col" { "status" } th scope="col" { "last seen" } th scope="col" { "agent" }
                th scope="col" { "release in service" } th.num scope="col" { "rounds" } th.num scope="col" { "witnessed" } th scope="col" { "last refusal" }
                th scope="col" { "certificate until" }
            } }
            tbody { @for s in &infos {
                @let fork = forks.get(&s.site_id);
                @let w = witnessed.get(&s.site_id).copied().unwrap_or(0);
                tr class=[(s.revoked || fork.is_some()).then_some("bad")] data-site=(s.site_id) {
                    th scope="row" { (s.site_id) }
                    td {
                        @if s.revoked { (badge(Tone::Bad, "revoked")) }
                        @else if s.online { (badge(Tone::Ok, "online")) @if !s.stage.is_empty() && s.stage != "idle" { " " (s.stage) } }
                        @else if s.last_seen_ms == 0 { (badge(Tone::Neutral, "never connected")) }
                        @else { (badge(Tone::Warn, "offline")) }
                    }
                    td { (time(s.last_seen_ms)) }
                    td { (versions.get(&s.site_id).map_or("—", String::as_str)) }
                    td { @match installed.get(&s.site_id) { Some(v) => a href=(format!("/releases/{v}")) { "v" (v) }, None => "—" } }
                    td.num { (s.rounds_contributed) }
                    td.num {
                        @if let Some(f) = fork { (badge(Tone::Bad, "fork")) " " (f) }
                        @else { (w) @if w < log_size { " of " (log_size) } }
                    }
                    td.refusal { @if let Some((t, why)) = refusal.get(&s.site_id) { (why) br; small { (time(*t)) } } @else { "—" } }
                    td { (time(s.cert_not_after_ms)) }
                }
            } }
        } }
        p.muted { "“Witnessed” is the largest audit-log checkpoint the site cosigned after checking it extends what it saw before." }
    })
}

pub(super) fn releases(c: &Coord) -> Result<Markup> {
    let list = c.registry.releases()?;
    let current = c.registry.current()?.map(|(r, _)| r.version);
    Ok(html! {
        @if list.is_empty() { p.muted { "No release yet: a job that completes releases its final model." } }
        @else {
            div.scroll { table #releases {
                thead { tr { th scope="col" { "version" } th scope="col" { "job" } th.num scope="col" { "accuracy" } th.num scope="col" { "macro-F1" }
                    th.num scope="col" { "crisis recall" } th scope="col" { "installed at" } th scope="col" { "released" } } }
                tbody { @for r in list.iter().rev() {
                    @let card = ModelCard::decode(r.card.as_bytes()).ok();
                    @let e = card.as_ref().and_then(|c| c.evaluation.clone());
                    tr {
                        th scope="row" { a href=(format!("/releases/{}", r.version)) { "v" (r.version) } @if current == Some(r.version) { " " (badge(Tone::Ok, "current")) } }
                        td { a href=(format!("/jobs/{}", r.job_id)) { (r.job_id) } ", round " (r.round) }
                        td.num { (num(e.as_ref().map(|e| e.accuracy))) }
                        td.num { (num(e.as_ref().map(|e| e.macro_f1))) }
                        td.num { (num(e.as_ref().and_then(release::crisis_recall))) }
                        td { (r.installs.values().filter(|i| i.installed).count()) " sites" }
                        td { (time(r.released_ms)) }
                    }
                } }
            } }
        }
    })
}

pub(super) fn release_page(c: &Coord, r: &crate::registry::ReleaseRecord) -> Result<Markup> {
    let consortium = c.home.consortium()?.name;
    let card = ModelCard::decode(r.card.as_bytes()).with_context(|| format!("release v{}'s stored card", r.version))?;
    let key = maeum_tlog::unhex32(c.home.read("signing.pub")?.trim()).context("HOME/signing.pub")?;
    let manifest = r.manifest(&consortium);
    let signature = match maeum_tlog::unhex(&r.signature) {
        Ok(sig) => match manifest.verify(&key, &sig) {
            Ok(()) => {
                Ok(format!("Ed25519, under the consortium key {}…", c.audit.public_key().get(..16).unwrap_or("")))
            }
            Err(e) => Err(e.to_string()),
        },
        Err(_) => Err("the stored signature is not hex".into()),
    };
    let logged = match c.audit.entry(r.audit_seq) {
        Ok(e) if release::is_release_entry(&e.event, &manifest) => {
            Ok(format!("entry #{} (model_release, {})", e.seq, time(e.time_ms)))
        }
        Ok(e) => Err(format!("entry #{} is a {}, not this release", e.seq, e.event.kind())),
        Err(e) => Err(format!("entry #{}: {e:#}", r.audit_seq)),
    };
    let current = c.registry.current()?.is_some_and(|(cur, _)| cur.version == r.version);
    let promotions = c.registry.promotions()?;
    let history = promotions
        .iter()
        .filter(|p| p.version == r.version)
        .map(|p| {
            (
                p.at_ms,
                if p.action == "rollback" {
                    "made current again by a rollback".to_owned()
                } else {
                    "promoted".to_owned()
                },
                p.operator.clone(),
            )
        })
        .collect();
    let overrides = promotions
        .iter()
        .filter(|p| p.version == r.version)
        .flat_map(|p| {
            p.gate_overrides.iter().map(|g| {
                (g.gate.clone(), g.measured_text(), format!("{:.4}", g.threshold), p.operator.clone(), g.reason.clone())
            })
        })
        .collect();
    let gate_failures = crate::registry::gate_failures(c, r)?.iter().map(ToString::to_string).collect();
    let installs = r.installs.iter().map(|(s, i)| (s.clone(), i.installed, i.reason.clone())).collect();
    let standing = Standing {
        signature: Some(signature),
        logged: Some(logged),
        current,
        history,
        overrides,
        gate_failures,
        installs,
    };
    Ok(html! {
        p { "Export it for people and tools with " code { "maeum-coordinator models export " (r.version) " --out DIR" } "; an auditor checks it offline with " code { "maeum-audit release" } "." }
        (cardview::render(&card, &standing))
        h2 { "Digests" }
        dl.facts {
            dt { "Card SHA-256" } dd { code { (r.card_sha256) } }
            dt { "Layout digest" } dd { (short_digest(&r.model.layout_digest)) }
        }
    })
}

pub(super) fn audit(c: &Coord, q: &str, kind: &str) -> Result<Markup> {
    let entries = entries(c)?;
    let latest = c.audit.latest();
    let checkpoints = c.audit.checkpoints()?;
    let latest_cp = checkpoints.last();
    let needle = q.to_lowercase();
    let matches: Vec<&Entry> = entries
        .iter()
        .rev()
        .filter(|e| kind.is_empty() || e.event.kind() == kind)
        .filter(|e| {
            needle.is_empty() || serde_json::to_string(&e.event).unwrap_or_default().to_lowercase().contains(&needle)
        })
        .collect();
    let mut kinds: Vec<&str> = entries.iter().map(|e| e.event.kind()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    Ok(html! {
        div.grid {
            div.tile { span.big { (entries.len()) } "entries" }
            div.tile { span.big { @match &latest { Some(cp) => { (cp.checkpoint.size) }, None => { "—" } } } "latest signed checkpoint (size)" }
            div.tile {
                span.big { (latest_cp.map_or(0, |cp| cp.cosignatures.len())) }
                "sites cosigned the latest checkpoint"
                @if let Some(cp) = latest_cp { @if !cp.cosignatures.is_empty() { ": " (cp.cosignatures.iter().map(|s| s.site.as_str()).collect::<Vec<_>>().join(", ")) } }
            }
        }
        @if let Some(cp) = latest_cp {
            p { "Root " code { (cp.root) } ". Log key " code { (c.audit.public_key()) } ". Export it with "
                code { "maeum-coordinator audit export --out FILE" } " and verify offline with " code { "maeum-audit verify FILE" } "." }
        }
        h2 { "Checkpoints" }
        div.scroll { table #checkpoints {
            thead { tr { th.num scope="col" { "size" } th scope="col" { "root" } th scope="col" { "cosigned by" } } }
            tbody { @for cp in checkpoints.iter().rev().take(10) {
                tr { td.num { (cp.size) } td { (short_digest(&cp.root)) }
                    td { @if cp.cosignatures.is_empty() { "—" } @else { (cp.cosignatures.iter().map(|s| s.site.as_str()).collect::<Vec<_>>().join(", ")) } } }
            } }
        } }
        h2 { "Entries" }
        form.search method="get" action="/audit" role="search" {
            label for="q" { "Search" }
            input #q type="search" name="q" value=(q) placeholder="site, job, reason…";
            label for="kind" { "Kind" }
            select #kind name="kind" {
                option value="" selected[kind.is_empty()] { "any" }
                @for k in &kinds { option value=(k) selected[*k == kind] { (k) } }
            }
            button type="submit" { "Filter" }
        }
        p #matches { (matches.len()) " matching entries" @if matches.len() > AUDIT_PAGE { ", the newest " (AUDIT_PAGE) " shown" } "." }
        div.scroll { table #entries {
            thead { tr { th.num scope="col" { "#" } th scope="col" { "time" } th scope="col" { "kind" } th scope="col" { "details" } } }
            tbody { @for e in matches.iter().take(AUDIT_PAGE) {
                tr class=[entry_is_bad(&e.event).then_some("bad")] {
                    td.num { (e.seq) } td { (time(e.time_ms)) } td { code { (e.event.kind()) } }
                    td { (maeum_report::entry_fields(&e.event)) }
                }
            } }
        } }
    })
}

pub(super) fn entry_is_bad(e: &Event) -> bool {
    matches!(
        e,
        Event::SiteRevoked { .. }
            | Event::RoundFailed { .. }
            | Event::SiteRefused { .. }
            | Event::ReleaseGateOverridden { .. }
            | Event::JobDecision { accepted: false, .. }
            | Event::ReleaseInstall { installed: false, .. }
    )
}
