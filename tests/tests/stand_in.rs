//! The adapter stand-in (issue 20), end to end: real processes, mTLS, secure
//! aggregation, the real corpus. Its update is known in closed form
//! (`maeum_models::standin`), so the released model can be checked against the cohort's
//! label counts position by position: every value streamed, masked, folded, unmasked,
//! averaged, released and installed lands where it belongs.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use maeum_e2e::{Federation, bin};
use maeum_models::model::ModelSpec;
use maeum_models::standin::sign;
use maeum_protocols::job::JobSpec;

const MIN: Duration = Duration::from_secs(60);
const PARAMS: usize = 1 << 20;
const ROUNDS: u32 = 2;
const LR: f64 = 0.5;

fn site(fed: &Federation, id: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin("maeum-site")).args(args).arg("--home").arg(fed.site_home(id)).output().expect("maeum-site")
}

/// Label counts of a site's training file (JSONL with a `label` field).
fn train_counts(fed: &Federation, id: &str) -> BTreeMap<String, u64> {
    let path = fed.dir.path().join("data").join(id).join("train.jsonl");
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(&path).expect("train.jsonl").lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).expect("jsonl");
        *counts.entry(v["label"].as_str().expect("label").to_string()).or_default() += 1;
    }
    counts
}

#[test]
fn a_stand_in_job_releases_exactly_the_cohorts_expected_update_and_a_default_site_refuses_it() {
    let mut fed = Federation::new(4);
    // A test fleet opts in; site-4 keeps the default policy, under which the stand-in
    // (whose update is the site's label frequencies) is not an allowed model.
    for s in ["site-1", "site-2", "site-3"] {
        fed.set_policy(s, "allowed_models", "[\"adapter-stand-in\"]");
    }
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4"]);
    fed.wait_online(4);
    // The prior's first step is η · ln(1 / 27) ≈ −1.6: the per-coordinate clip must allow it.
    let job = format!(
        "[model]\nkind = \"adapter-stand-in\"\nparams = {PARAMS}\n[train]\nlearning_rate = {LR}\n\
         [secure_aggregation]\nclip = 4.0\n"
    );
    let id = fed.submit("stand-in", ROUNDS, 3, &job);
    let status = fed.wait_job(&id, 5 * MIN);
    assert_eq!(status["state"], "completed", "{status:#}\n{}", fed.log_text("coordinator"));
    for r in status["history"].as_array().expect("history") {
        assert_eq!(r["contributors"].as_array().map(Vec::len), Some(3), "{r:#}");
        assert_eq!(r["secure_aggregation"], true, "{r:#}");
    }
    let d = status["decisions"].as_array().and_then(|d| d.iter().find(|d| d["site"] == "site-4").cloned());
    let d = d.unwrap_or_else(|| panic!("no decision from site-4: {status:#}"));
    assert_eq!(d["accept"], false, "{d:#}");
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("allowed_models") && reason.contains("adapter-stand-in"), "{reason}");

    // The release, as exported (signature and digests verified by the export).
    let out = fed.dir.path().join("export");
    let export = fed.cli(&["models", "export", "1", "--out", out.to_str().expect("utf-8")]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let (spec, released, _) = ModelSpec::load(&out.join("model-v1.safetensors")).expect("the released model");
    let ModelSpec::AdapterStandIn { params, labels } = &spec else { panic!("a stand-in: {spec:?}") };
    assert_eq!(*params, PARAMS);

    // Expected: init + ROUNDS · η · s(j) · (N_{j mod L} / N − 1 / L) over the three
    // sites' training records (FedAvg weighs each site by its record count).
    let labels_toml: Vec<String> = fed.labels.iter().map(|l| format!("{l:?}")).collect();
    let spec_toml =
        format!("name = \"stand-in\"\nlabels = [{}]\nrounds = {ROUNDS}\nmin_sites = 3\n{job}", labels_toml.join(", "));
    let init = JobSpec::from_toml("job.toml", &spec_toml).expect("job").initial_params().expect("init");
    let l = labels.len();
    let per_site: Vec<Vec<u64>> = ["site-1", "site-2", "site-3"]
        .iter()
        .map(|s| {
            let mut counts = vec![0u64; l];
            for (label, n) in train_counts(&fed, s) {
                counts[labels.index(&label).expect("a job label")] += n;
            }
            counts
        })
        .collect();
    let cohort: Vec<u64> = (0..l).map(|i| per_site.iter().map(|c| c[i]).sum()).collect();
    let n = cohort.iter().sum::<u64>() as f64;
    let step: Vec<f64> = cohort.iter().map(|&c| f64::from(ROUNDS) * LR * (c as f64 / n - 1.0 / l as f64)).collect();
    let (got, start) = (&released.values()[l..], &init.values()[l..]);
    let mut worst = 0f64;
    for (j, (g, s)) in got.iter().zip(start).enumerate() {
        let want = f64::from(*s) + f64::from(sign(j)) * step[j % l];
        worst = worst.max((f64::from(*g) - want).abs());
    }
    // Quantisation for secure aggregation (step ≈ n·max_weight·clip / 2^31 per
    // weighted unit) and f32 sums leave ~1e-6; a misplaced value would be off by ~1e-2.
    assert!(worst < 2e-5, "largest deviation from the expected aggregate: {worst}");
    assert!(step.iter().any(|s| s.abs() > 1e-3), "the check is not vacuous: {step:?}");

    // The prior: each round moves it by η toward the weighted mean of the sites'
    // smoothed log frequencies t̄, so from 0 it ends at t̄ · (1 − (1 − η)^rounds).
    let target: Vec<f64> = (0..l)
        .map(|i| {
            per_site
                .iter()
                .map(|c| {
                    let ni = c.iter().sum::<u64>() as f64;
                    ni / n * ((c[i] as f64 + 1.0) / (ni + l as f64)).ln()
                })
                .sum::<f64>()
        })
        .collect();
    let shrink = 1.0 - (1.0 - LR).powi(ROUNDS as i32);
    for (i, (g, t)) in released.values()[..l].iter().zip(&target).enumerate() {
        assert!((f64::from(*g) - t * shrink).abs() < 1e-4, "logit {i}: {g} vs {}", t * shrink);
    }

    // A prior is no classifier: it fails the consortium's release gates, so the lead
    // promotes it by override. Then every participant installs it, and it predicts the
    // prior's most likely label.
    let out = fed.cli(&["models", "promote", "v1", "--override-gate", "--reason", "stand-in test fleet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mode = (0..l).max_by(|&a, &b| target[a].total_cmp(&target[b])).expect("labels");
    for s in ["site-1", "site-2", "site-3"] {
        let until = std::time::Instant::now() + MIN;
        loop {
            let list = site(&fed, s, &["models", "list", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
            if v["current"] == 1 {
                break;
            }
            assert!(std::time::Instant::now() < until, "{s} did not install v1: {v:#}\n{}", fed.log_text(s));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let out = site(&fed, "site-2", &["predict", "--text", "any text at all", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["label"], fed.labels[mode].as_str(), "{v:#}");
}
