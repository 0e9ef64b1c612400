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
    for f in
        ["summary.json", "job.toml", "logs/coordinator.log", "logs/site-3.log", "coordinator/state", "site-1/site.pem"]
    {
        assert!(work.join(f).exists(), "{f} missing from the work dir");
    }
}
