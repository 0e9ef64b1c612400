//! The README's first command, `maeum-coordinator demo`, at a reduced size: the whole
//! path (split, consortium, enrolment, processes over mTLS, job, baselines, summary).

use std::process::Command;

use maeum_e2e::{bin, rmhd, run_ok};

#[test]
fn the_demo_runs_a_federation_and_reports_the_comparison() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("demo");
    bin("maeum-site"); // built beside the coordinator
    let out = run_ok(
        Command::new(bin("maeum-coordinator"))
            .args(["demo", "--sites", "3", "--rounds", "3", "--json", "--data"])
            .arg(rmhd())
            .arg("--work-dir")
            .arg(&work)
            // Not under `cargo run`: the binaries are already built.
            .env_remove("CARGO"),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["sites"], 3);
    assert_eq!(v["rounds"], 3);
    assert_eq!(v["secure_aggregation"], true, "the demo runs secure aggregation");
    let fed = v["federated"]["accuracy"].as_f64().expect("federated.accuracy");
    let central = v["centralized"]["accuracy"].as_f64().expect("centralized.accuracy");
    let local = v["local_only"]["mean_accuracy"].as_f64().expect("local_only.mean_accuracy");
    assert!(v["federated"]["macro_f1"].as_f64().is_some());
    assert_eq!(v["federated"]["per_round"].as_array().map(Vec::len), Some(3));
    assert!(fed > local, "federated {fed} should beat local-only {local} (centralized {central})");
    assert_eq!(v["work_dir"].as_str().map(std::path::PathBuf::from), Some(work.clone()));
    for f in [
        "summary.json",
        "job.toml",
        "logs/coordinator.log",
        "logs/site-3.log",
        "coordinator/state",
        "site-1/site.pem",
        "audit.json",
    ] {
        assert!(work.join(f).exists(), "{f} missing from the work dir");
    }
    // Each site keeps only the served release's model; the summary says what is left.
    let models: Vec<_> = std::fs::read_dir(work.join("site-1/models")).expect("site models").flatten().collect();
    assert_eq!(models.len(), 1, "only the release in service stays: {models:?}");
    assert!(v["disk"]["pruned_site_caches_bytes"].as_u64().is_some_and(|n| n > 0), "{}", v["disk"]);
    assert!(v["disk"]["left_bytes"].as_u64().is_some_and(|n| n > 0), "{}", v["disk"]);
    assert!(v["disk"]["cleaned_bytes"].is_null(), "{}", v["disk"]);

    // The audit export verifies offline against the log key, and tells the job's story.
    let audit = work.join("audit.json");
    let trust = work.join("coordinator/signing.pub");
    let out = run_ok(Command::new(bin("maeum-audit")).arg("verify").arg(&audit).arg("--trust").arg(&trust));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"), "{}", String::from_utf8_lossy(&out.stdout));
    let story =
        String::from_utf8_lossy(&run_ok(Command::new(bin("maeum-audit")).arg("show").arg(&audit)).stdout).into_owned();
    for kind in [
        "consortium_init",
        "site_approved",
        "job_submitted",
        "job_decision",
        "round_started",
        "round_secagg",
        "round_committed",
        "job_finished",
    ] {
        assert!(story.contains(kind), "{kind} missing from the demo's audit story:\n{story}");
    }
    assert_eq!(story.matches("round_committed").count(), 3, "{story}");
    assert!(v["audit"]["entries"].as_u64().is_some_and(|n| n > 10), "{}", v["audit"]);
}
