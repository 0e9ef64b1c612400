//! The operator CLI's side of the control service: `jobs …` and `sites …` commands,
//! with human output by default and `--json` for scripts.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use comfy_table::Table;
use tonic::transport::{Channel, Endpoint};

use maeum_models::metrics::Confusion;
use maeum_pki::tls;
use maeum_protocols::wire::pb::{self, control_client::ControlClient};

use crate::home::Home;

/// Connects to the coordinator named in HOME/consortium.json with the operator
/// certificate in HOME.
pub async fn connect(home: &Path) -> Result<ControlClient<Channel>> {
    let home = Home::new(home);
    let consortium = home.consortium()?;
    let tls = tls::client_tls(&home.trusted_cas_pem()?, &home.identity("operator")?, consortium.host());
    let channel = Endpoint::from_shared(format!("https://{}", consortium.address))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(maeum_protocols::wire::H2_SITE_STREAM_WINDOW)
        .initial_connection_window_size(maeum_protocols::wire::H2_SITE_CONNECTION_WINDOW)
        .max_frame_size(maeum_protocols::wire::H2_MAX_FRAME)
        .connect()
        .await
        .with_context(|| format!("connecting to the coordinator at {}", consortium.address))?;
    Ok(ControlClient::new(channel).max_decoding_message_size(64 << 20))
}

/// A reported confusion matrix as `models`' type; `None` if its dimensions are wrong.
pub fn confusion(c: &pb::Confusion) -> Option<Confusion> {
    let n = c.n_labels as usize;
    (n > 0 && c.counts.len() == n * n).then(|| Confusion { counts: c.counts.chunks(n).map(<[u64]>::to_vec).collect() })
}

/// Accuracy and macro-F1 of a reported confusion matrix.
pub fn scores(c: &pb::Confusion) -> Option<(f64, f64)> {
    let m = confusion(c)?.metrics();
    Some((m.accuracy, m.macro_f1))
}

/// One line per round for humans.
pub fn print_job(j: &pb::JobInfo) {
    println!(
        "{}  {}  round {}/{}{}",
        j.job_id,
        j.state,
        j.completed_rounds,
        j.rounds,
        if j.activity.is_empty() { String::new() } else { format!("  ({})", j.activity) }
    );
    if j.secure_aggregation {
        let t = j.history.last().map(|r| r.secagg_threshold).unwrap_or(0);
        let threshold = if t > 0 { format!(" (threshold {t} in the latest round)") } else { String::new() };
        println!("  secure aggregation: on{threshold}");
    } else {
        println!(
            "  secure aggregation: OFF (insecure_plaintext_aggregation_for_debugging: the coordinator sees every update)"
        );
    }
    if let Some(p) = privacy_plan(j) {
        println!(
            "  differential privacy: ε = {:.3} per record per site at δ = {:e} after {} rounds; {}",
            p.epsilon,
            p.delta,
            p.rounds,
            p.describe()
        );
    }
    if !j.decisions.is_empty() {
        let refused: Vec<String> =
            j.decisions.iter().filter(|d| !d.accept).map(|d| format!("{} ({})", d.site_id, d.reason)).collect();
        println!(
            "  sites: {} accepted{}",
            j.decisions.iter().filter(|d| d.accept).count(),
            if refused.is_empty() { String::new() } else { format!(", refused: {}", refused.join("; ")) }
        );
    }
    if !j.excluded.is_empty() {
        println!("  excluded from later attempts: {}", j.excluded.join("; "));
    }
    for r in &j.refusals {
        println!("  refused by a site: {r}");
    }
    for r in j.history.iter().filter(|r| !r.refused.is_empty()) {
        println!("  round {}: aggregate refused, committed without an update ({})", r.round, r.refused);
    }
    let rounds = rounds_table(j);
    if !rounds.is_empty() {
        println!("{rounds}");
    }
    if let Some(first) = j.history.first().filter(|r| r.round > 1) {
        println!(
            "  rounds {}–{} of {} shown; `jobs status {} --before {}` shows earlier ones",
            first.round,
            j.history.last().map_or(first.round, |r| r.round),
            j.completed_rounds,
            j.job_id,
            first.round
        );
    }
    if let Some(c) = j.history.last().filter(|r| r.round == j.completed_rounds).and_then(|r| r.evaluation.as_ref()) {
        let parts: Vec<String> = recall(c, &j.labels)
            .into_iter()
            .map(|(l, r)| format!("{l} {}", r.as_f64().map_or("-".into(), |r| format!("{r:.2}"))))
            .collect();
        println!("  per-class recall (final model): {}", parts.join(", "));
    }
    if !j.error.is_empty() {
        println!("  error: {}", j.error);
    }
}

/// The job's rounds (round 0 is the initial model's evaluation) as a table.
/// The job's differential-privacy plan, when it has one.
pub fn privacy_plan(j: &pb::JobInfo) -> Option<maeum_protocols::job::PrivacyPlan> {
    serde_json::from_str(&j.privacy_plan).ok()
}

fn rounds_table(j: &pb::JobInfo) -> Table {
    let plan = privacy_plan(j);
    let mut header = vec!["round", "accuracy", "macro-F1", "sites", "dropped"];
    if plan.is_some() {
        header.push("ε");
    }
    let mut t = maeum_runtime::table::table(&header, &[0, 1, 2, 3, 5]);
    let cells = |c: Option<&pb::Confusion>| {
        c.and_then(scores)
            .map_or(["pending".to_string(), "pending".to_string()], |(a, f)| [format!("{a:.4}"), format!("{f:.4}")])
    };
    // Round 0 (the initial model) heads the table when the rounds shown start at 1.
    if let Some(c) = j.initial_evaluation.as_ref().filter(|_| j.history.first().is_none_or(|r| r.round == 1)) {
        let [a, f] = cells(Some(c));
        let mut row = vec!["0".to_string(), a, f, "-".into(), "(initial model)".into()];
        if plan.is_some() {
            row.push("0".into());
        }
        t.add_row(row);
    }
    for r in &j.history {
        let [a, f] = cells(r.evaluation.as_ref());
        let dropped = if r.dropped.is_empty() { "-".to_string() } else { r.dropped.join(",") };
        let mut row = vec![r.round.to_string(), a, f, r.contributors.len().to_string(), dropped];
        if let Some(p) = &plan {
            row.push(format!("{:.3}", p.epsilon_after(r.round)));
        }
        t.add_row(row);
    }
    t
}

/// Per-class recall of a reported confusion matrix, keyed by label.
pub fn recall(c: &pb::Confusion, labels: &[String]) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let Some(conf) = confusion(c).filter(|m| m.counts.len() == labels.len()) else { return out };
    for (i, row) in conf.counts.iter().enumerate() {
        let total: u64 = row.iter().sum();
        // A class with no held-out examples has no recall (null), not a recall of 0.
        let r = if total == 0 { serde_json::Value::Null } else { (row[i] as f64 / total as f64).into() };
        out.insert(labels[i].clone(), r);
    }
    out
}

pub fn job_json(j: &pb::JobInfo) -> serde_json::Value {
    let score = |c: &Option<pb::Confusion>| {
        c.as_ref().and_then(|c| {
            scores(c).map(|(a, f)| {
                serde_json::json!({"accuracy": a, "macro_f1": f, "per_class_recall": recall(c, &j.labels), "examples": c.counts.iter().sum::<u64>()})
            })
        })
    };
    serde_json::json!({
        "job_id": j.job_id, "name": j.name, "state": j.state, "rounds": j.rounds,
        "completed_rounds": j.completed_rounds, "activity": j.activity, "error": j.error,
        "spec_sha256": j.spec_sha256, "labels": j.labels, "secure_aggregation": j.secure_aggregation,
        "decisions": j.decisions.iter().map(|d| serde_json::json!({"site": d.site_id, "accept": d.accept, "reason": d.reason})).collect::<Vec<_>>(),
        "initial_evaluation": score(&j.initial_evaluation),
        "history": j.history.iter().map(|r| serde_json::json!({
            "round": r.round, "model": r.model.as_ref().map(|m| &m.digest), "contributors": r.contributors,
            "dropped": r.dropped, "total_weight": r.total_weight, "attempts": r.attempts,
            "secure_aggregation": r.secure_aggregation, "secagg_threshold": r.secagg_threshold,
            "aggregate_sha256": r.aggregate_sha256, "refused": r.refused,
            "evaluation": score(&r.evaluation), "evaluated_by": r.evaluated_by,
        })).collect::<Vec<_>>(),
        "excluded": j.excluded,
        "refusals": j.refusals,
        "privacy": privacy_plan(j).map(|p| serde_json::json!({
            "plan": p,
            "epsilon_per_round": j.history.iter().map(|r| serde_json::json!({"round": r.round, "epsilon": p.epsilon_after(r.round)})).collect::<Vec<_>>(),
        })),
    })
}

/// The audit export from the running coordinator at `home`.
pub async fn export_audit(home: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let mut stream = connect(home).await?.export_audit(pb::ExportAuditRequest {}).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(piece) = stream.message().await? {
        bytes.extend_from_slice(&piece.data);
    }
    Ok(bytes)
}

pub fn site_json(s: &pb::SiteInfo) -> serde_json::Value {
    serde_json::json!({
        "site_id": s.site_id, "online": s.online, "revoked": s.revoked, "stage": s.stage,
        "last_seen_ms": s.last_seen_ms, "rounds_contributed": s.rounds_contributed,
        "cert_fingerprint": s.cert_fingerprint, "cert_not_after_ms": s.cert_not_after_ms,
    })
}

pub fn print_sites(sites: &[pb::SiteInfo]) {
    println!("{}", sites_table(sites, crate::home::now_ms()));
}

fn sites_table(sites: &[pb::SiteInfo], now_ms: i64) -> Table {
    let mut t = maeum_runtime::table::table(&["site", "online", "stage", "rounds", "last seen"], &[3]);
    for s in sites {
        let seen = if s.last_seen_ms == 0 {
            "never".to_string()
        } else {
            format!("{}s ago", (now_ms - s.last_seen_ms).max(0) / 1000)
        };
        let online = if s.revoked {
            "REVOKED"
        } else if s.online {
            "yes"
        } else {
            "no"
        };
        let stage = if s.stage.is_empty() { "-" } else { &s.stage };
        t.add_row(vec![s.site_id.clone(), online.into(), stage.into(), s.rounds_contributed.to_string(), seen]);
    }
    t
}

/// `jobs list` for people.
pub fn jobs_table(jobs: &[pb::JobInfo]) -> Table {
    let mut t = maeum_runtime::table::table(&["job", "state", "rounds", "activity"], &[2]);
    for j in jobs {
        t.add_row(vec![
            j.job_id.clone(),
            j.state.clone(),
            format!("{}/{}", j.completed_rounds, j.rounds),
            j.activity.clone(),
        ]);
    }
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn site(id: &str, online: bool, stage: &str, rounds: u32) -> pb::SiteInfo {
        pb::SiteInfo {
            site_id: id.into(),
            online,
            stage: stage.into(),
            rounds_contributed: rounds,
            last_seen_ms: if online { 9_000 } else { 0 },
            ..Default::default()
        }
    }

    #[test]
    fn tables_align_with_long_and_korean_cells() {
        let sites = [site("site-1", true, "train", 3), site("서울-병원-정신건강의학과", false, "", 120)];
        maeum_runtime::table::assert_aligned(&sites_table(&sites, 12_000));
        let job = |id: &str, state: &str, activity: &str| pb::JobInfo {
            job_id: id.into(),
            state: state.into(),
            rounds: 10,
            completed_rounds: 3,
            activity: activity.into(),
            ..Default::default()
        };
        maeum_runtime::table::assert_aligned(&jobs_table(&[
            job("triage-1", "running", "round 4: training"),
            job("우울-분류-2", "completed", ""),
        ]));
        let mut j = job("triage-1", "running", "");
        j.history = vec![
            pb::RoundInfo { round: 1, contributors: vec!["a".into()], ..Default::default() },
            pb::RoundInfo {
                round: 12,
                contributors: vec!["a".into(), "b".into()],
                dropped: vec!["site-3".into()],
                ..Default::default()
            },
        ];
        maeum_runtime::table::assert_aligned(&rounds_table(&j));
    }

    #[test]
    fn numbers_are_right_aligned() {
        let text = sites_table(&[site("a", true, "train", 7), site("b", true, "train", 1234)], 12_000).to_string();
        let end =
            |row: &str, n: &str| text.lines().find(|l| l.starts_with(row)).and_then(|l| l.find(n)).map(|i| i + n.len());
        assert_eq!(end(" a ", " 7 "), end(" b ", "1234 "), "{text}");
    }
}
