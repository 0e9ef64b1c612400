//! Differential privacy with a budget each site enforces (issue 17), end to end: real
//! processes, mTLS and the real corpus. A job with `[privacy] mode = "local"` runs
//! DP-SGD at every site; each site charges its own ledger before it trains and the
//! coordinator logs the charges; the release's card states the guarantee and
//! `maeum-audit release` checks it against the log (REL-10). Sites whose policy demands
//! more than the job offers refuse it by rule name.

use std::process::Command;
use std::time::Duration;

use maeum_e2e::{Federation, SMALL_MODEL, bin};
use maeum_tlog::{Event, export::Export};

const MIN: Duration = Duration::from_secs(60);

fn dp_job(epsilon: f64) -> String {
    format!(
        "{SMALL_MODEL}[train]\nepochs = 1\n[privacy]\nmode = \"local\"\nepsilon = {epsilon:?}\nsample_rate = 0.25\n"
    )
}

/// Why `site` refused the job (it must have).
fn refusal_reason(job: &serde_json::Value, site: &str) -> String {
    let d = job["decisions"].as_array().expect("decisions").iter().find(|d| d["site"] == site).cloned();
    let d = d.unwrap_or_else(|| panic!("no decision from {site}: {job:#}"));
    assert_eq!(d["accept"], false, "{site} took the job: {d:#}");
    d["reason"].as_str().unwrap_or_default().to_string()
}

/// `maeum-site privacy --json` of `site`.
fn ledger_of(fed: &Federation, site: &str) -> serde_json::Value {
    let out = Command::new(bin("maeum-site"))
        .args(["privacy", "--json", "--home"])
        .arg(fed.site_home(site))
        .output()
        .expect("maeum-site privacy");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The audit log exported to a file, and decoded.
fn export_log(fed: &Federation) -> (std::path::PathBuf, Export) {
    let audit = fed.dir.path().join("audit.json");
    let out = fed.cli(&["audit", "export", "--out", audit.to_str().unwrap_or_default()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let export = Export::decode(&std::fs::read(&audit).expect("export")).expect("decodes");
    (audit, export)
}

/// Release v1 exported to a folder, its card, and `maeum-audit release --json` against
/// the log (which must pass).
fn audited_release(fed: &Federation, audit: &std::path::Path) -> (maeum_tlog::release::ModelCard, serde_json::Value) {
    let out_dir = fed.dir.path().join("export");
    let exported = fed.cli_json(&["models", "export", "v1", "--out", out_dir.to_str().unwrap_or_default()]);
    assert!(exported["files"].is_array(), "{exported:#}");
    let card = maeum_tlog::release::ModelCard::decode(&std::fs::read(out_dir.join("card-v1.json")).expect("card"))
        .expect("card");
    let report = Command::new(bin("maeum-audit"))
        .arg("release")
        .arg(&out_dir)
        .arg("--log")
        .arg(audit)
        .arg("--json")
        .output()
        .expect("maeum-audit runs");
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    (card, serde_json::from_slice(&report.stdout).expect("json"))
}

#[test]
fn sites_run_dp_sgd_charge_their_ledgers_and_the_release_states_the_guarantee() {
    let mut fed = Federation::new(5);
    // site-4 requires ε ≤ 1 and refuses jobs without DP; site-5 has 1 unit of budget.
    fed.set_policy("site-4", "max_epsilon", "1.0");
    fed.set_policy("site-4", "allow_non_dp", "false");
    fed.set_policy("site-5", "budget", "1.0");
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4", "site-5"]);
    fed.wait_online(5);
    let id = fed.submit("dp", 2, 3, &dp_job(2.0));
    let job = fed.wait_job(&id, 4 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));

    // The plan: ε ≤ 2 after both rounds, and the status shows ε per round.
    let plan = &job["privacy"]["plan"];
    let epsilon = plan["epsilon"].as_f64().expect("planned ε");
    assert!(epsilon <= 2.0 && epsilon > 1.99, "{job:#}");
    assert_eq!(plan["steps_per_round"], 4, "⌈1 epoch / q 0.25⌉");
    let per_round = job["privacy"]["epsilon_per_round"].as_array().expect("ε per round");
    assert_eq!(per_round.len(), 2);
    assert!(per_round[0]["epsilon"].as_f64() < per_round[1]["epsilon"].as_f64(), "{per_round:?}");

    // The strict sites refused by rule name, with the numbers.
    let r4 = refusal_reason(&job, "site-4");
    assert!(r4.contains("[policy] privacy.max_epsilon") && r4.contains("above this site's limit of 1"), "{r4}");
    let r5 = refusal_reason(&job, "site-5");
    assert!(r5.contains("[policy] privacy.budget") && r5.contains("remaining 1.000"), "{r5}");

    // Each site's own ledger holds both rounds, within the plan.
    for s in ["site-1", "site-2", "site-3"] {
        let v = ledger_of(&fed, s);
        let j = &v["jobs"][0];
        assert_eq!(j["job_id"], id.as_str(), "{v:#}");
        assert_eq!((j["rounds_charged"].as_u64(), j["rounds_planned"].as_u64()), (Some(2), Some(2)), "{v:#}");
        let spent = j["spent"].as_f64().expect("spent");
        assert!((spent - epsilon).abs() < 1e-9, "{s} spent {spent}, plan {epsilon}");
        assert!((v["total_epsilon"].as_f64().expect("total") - epsilon).abs() < 1e-9, "{v:#}");
    }
    // The refusing sites spent nothing.
    let out = Command::new(bin("maeum-site"))
        .args(["privacy", "--home"])
        .arg(fed.site_home("site-5"))
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no differentially private job has used this site's records"), "{text}");
    assert!(text.contains("budget 1 leaves ε = 1.000"), "{text}");

    // The log holds every charge: site, job, mechanism, ε, δ.
    let (audit, export) = export_log(&fed);
    let mut charges: Vec<(String, u32)> = export
        .entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::PrivacyCharged { job_id, site, round, mechanism, delta, .. } if *job_id == id => {
                assert_eq!((mechanism.as_str(), delta.as_str()), ("dp-sgd-local", "0.00001"));
                Some((site.clone(), *round))
            }
            _ => None,
        })
        .collect();
    charges.sort();
    let want: Vec<(String, u32)> =
        ["site-1", "site-2", "site-3"].iter().flat_map(|s| [(s.to_string(), 1), (s.to_string(), 2)]).collect();
    assert_eq!(charges, want);

    // The release's card states the mechanism and the guarantee; the auditor checks it.
    let (card, report) = audited_release(&fed, &audit);
    let p = card.privacy.clone().expect("the card states the privacy");
    assert_eq!((p.mechanism.as_str(), p.sampling.as_str(), p.rounds), ("dp-sgd-local", "poisson", 2));
    assert!((p.epsilon - epsilon).abs() < 1e-12);
    assert_eq!(p.epsilon_per_site.keys().collect::<Vec<_>>(), ["site-1", "site-2", "site-3"]);
    assert_eq!(report["privacy"]["charges"], 6, "{report:#}");

    // A card that claims less than the sites logged fails REL-10 offline. (The card is
    // covered by the signature too; REL-5 catches an edit first, so the claim is
    // checked by the library on the decoded card.)
    let mut understated = card.clone();
    if let Some(p) = understated.privacy.as_mut() {
        p.epsilon /= 2.0;
    }
    let err = maeum_tlog::release::check_card_privacy(&understated, &export.entries).expect_err("REL-10");
    assert_eq!(err.code(), "REL-10", "{err}");

    // A job without DP is refused by the site that requires it.
    let plain = fed.submit("plain", 1, 3, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    let decided = fed
        .wait_for(&plain, MIN, |j| j["decisions"].as_array().is_some_and(|d| d.iter().any(|d| d["site"] == "site-4")));
    let d = decided["decisions"].as_array().and_then(|d| d.iter().find(|d| d["site"] == "site-4").cloned());
    let d = d.expect("site-4's decision");
    assert_eq!(d["accept"], false);
    assert!(d["reason"].as_str().is_some_and(|r| r.contains("[policy] privacy.allow_non_dp")), "{d:#}");
}

#[test]
fn a_site_killed_while_training_with_dp_keeps_its_charge_and_is_not_charged_twice() {
    let mut fed = Federation::new(4);
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4"]);
    fed.wait_online(4);
    // The demo's model (4.2 M parameters): a round of DP-SGD lasts long enough to kill a
    // site inside it.
    let id = fed.submit(
        "dp-kill",
        3,
        3,
        "[train]\nepochs = 1\n[privacy]\nmode = \"local\"\nepsilon = 4.0\nsample_rate = 0.1\n",
    );
    let until = std::time::Instant::now() + 3 * MIN;
    let round = loop {
        let s = fed.site_status("site-1");
        if s["stage"].as_str().is_some_and(|st| st.starts_with("training (DP-SGD)")) && s["job_id"] == id.as_str() {
            break s["round"].as_u64().expect("round") as u32;
        }
        assert!(std::time::Instant::now() < until, "site-1 never trained with DP: {s:#}");
        std::thread::sleep(Duration::from_millis(20));
    };
    fed.kill_site("site-1");
    let home = fed.site_home("site-1");
    // The charge was durable before training began.
    let ledger = std::fs::read_to_string(home.join("privacy/ledger.jsonl")).expect("ledger");
    let charged = |text: &str| -> Vec<(u64, String)> {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "charge" && v["job_id"] == id.as_str())
            .map(|v| (v["round"].as_u64().unwrap_or(0), v["base_model"].as_str().unwrap_or_default().to_string()))
            .collect()
    };
    assert!(charged(&ledger).iter().any(|(r, _)| *r == u64::from(round)), "no charge for round {round}:\n{ledger}");
    fed.start_site("site-1");
    let job = fed.wait_job(&id, 5 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));

    // Every (round, base model) is charged once; the job's spend stays within its plan.
    let ledger = std::fs::read_to_string(home.join("privacy/ledger.jsonl")).expect("ledger");
    let mut lines = charged(&ledger);
    let n = lines.len();
    lines.sort();
    lines.dedup();
    assert_eq!(lines.len(), n, "a round charged twice:\n{ledger}");
    let out = Command::new(bin("maeum-site")).args(["privacy", "--json", "--home"]).arg(&home).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let plan = job["privacy"]["plan"]["epsilon"].as_f64().expect("plan");
    assert!(v["jobs"][0]["spent"].as_f64().expect("spent") <= plan + 1e-9, "{v:#}");
    // And the auditor sees the charge of the round the site died in.
    let audit = fed.dir.path().join("audit.json");
    let out = fed.cli(&["audit", "export", "--out", audit.to_str().unwrap_or_default()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let export = Export::decode(&std::fs::read(&audit).expect("export")).expect("decodes");
    assert!(
        export.entries.iter().any(|e| matches!(&e.event,
            Event::PrivacyCharged { site, round: r, job_id, .. } if site == "site-1" && *r == round && *job_id == id)),
        "no privacy_charged entry for site-1 round {round}"
    );
}

/// The `distributed` mode: each round is one DP-SGD step over the union of the sites'
/// records; every site adds only its share of Skellam noise to integer words that
/// travel masked, so only the secure sum carries the whole noise. Sites whose policy
/// does not trust the split refuse by rule; the rest charge their ledgers per round
/// with the Skellam accountant; the coordinator decodes the sum and steps the model
/// with it (no round refused by the bounds); the card names the mechanism and the
/// noise floor, and REL-10 holds against the log.
#[test]
fn distributed_dp_splits_the_noise_among_the_sites_and_each_site_still_enforces_it() {
    let mut fed = Federation::new(5);
    fed.set_policy("site-4", "allow_distributed", "false");
    fed.set_policy("site-5", "min_colluders", "1");
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4", "site-5"]);
    fed.wait_online(5);
    let job_toml = format!(
        "{SMALL_MODEL}[strategy]\nkind = \"fedadam\"\n[privacy]\nmode = \"distributed\"\nepsilon = 4.0\n\
         sample_rate = 1.0\n"
    );
    let id = fed.submit("ddp", 2, 3, &job_toml);
    let job = fed.wait_job(&id, 4 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));

    // The plan: one step a round, the noise in 3 shares (min_sites 3, no colluders).
    let plan = &job["privacy"]["plan"];
    assert_eq!((plan["mode"].as_str(), plan["steps_per_round"].as_u64()), (Some("distributed"), Some(1)), "{job:#}");
    assert_eq!(plan["noise_shares"], 3, "{job:#}");
    let epsilon = plan["epsilon"].as_f64().expect("planned ε");
    assert!(epsilon <= 4.0 && epsilon > 3.99, "{job:#}");

    // Each round's sum was decoded and applied: none refused by the aggregate's bounds.
    let history = job["history"].as_array().expect("history");
    assert_eq!(history.len(), 2, "{job:#}");
    for r in history {
        assert!(r["refused"].as_str().is_none_or(str::is_empty), "round refused: {r:#}");
        assert_eq!(r["contributors"].as_array().map(Vec::len), Some(3), "{r:#}");
    }

    // The sites that do not take the split refused by rule.
    let r4 = refusal_reason(&job, "site-4");
    assert!(r4.contains("[policy] privacy.allow_distributed"), "{r4}");
    let r5 = refusal_reason(&job, "site-5");
    assert!(r5.contains("[policy] privacy.min_colluders") && r5.contains("this site requires 1"), "{r5}");

    // Each taking site charged both rounds with the Skellam accountant.
    for s in ["site-1", "site-2", "site-3"] {
        let v = ledger_of(&fed, s);
        let j = &v["jobs"][0];
        assert_eq!(j["mechanism"], "dp-sgd-distributed-skellam", "{v:#}");
        assert_eq!((j["rounds_charged"].as_u64(), j["steps"].as_u64()), (Some(2), Some(2)), "{v:#}");
        assert!((j["spent"].as_f64().expect("spent") - epsilon).abs() < 1e-9, "{s}: {v:#}");
    }

    // The log holds each charge; the card states the mechanism and the noise floor.
    let (audit, export) = export_log(&fed);
    let mut charges: Vec<(String, u32)> = export
        .entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::PrivacyCharged { job_id, site, round, mechanism, .. } if *job_id == id => {
                assert_eq!(mechanism, "dp-sgd-distributed-skellam");
                Some((site.clone(), *round))
            }
            _ => None,
        })
        .collect();
    charges.sort();
    charges.dedup();
    assert_eq!(charges.len(), 6, "{charges:?}");
    let (card, report) = audited_release(&fed, &audit);
    assert_eq!(report["privacy"]["charges"].as_u64().map(|c| c >= 6), Some(true), "{report:#}");
    let p = card.privacy.expect("the card states the privacy");
    assert_eq!((p.mechanism.as_str(), p.steps_per_round, p.noise_shares), ("dp-sgd-distributed-skellam", 1, Some(3)));
    assert!((p.epsilon - epsilon).abs() < 1e-12);
}
