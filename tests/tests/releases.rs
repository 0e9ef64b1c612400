//! Signed model releases end to end, with the real binaries over mTLS on the real data:
//! a completed job is released (signed, logged); promote makes every site verify and
//! install it; a tampered blob, a tampered card, a wrong signature and a release
//! missing from the audit log are each refused with a clear reason while the previous
//! release keeps serving; rollback returns the sites to the previous release; every
//! promotion, rollback, install and refusal is in the audit log; `maeum-site predict`
//! works with the coordinator stopped and reproduces the metrics the site reported;
//! `maeum-site finetune` keeps a local model beside the release. Crisis safety: promote
//! refuses a release below the consortium's crisis-recall gate unless the lead overrides
//! with a reason (logged, shown by `models show`); the card carries the crisis flag's
//! threshold and `predict --json` flags with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use maeum_e2e::{Federation, SMALL_MODEL, bin, run_ok};

const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];
const MIN: Duration = Duration::from_secs(60);

fn site(fed: &Federation, id: &str, args: &[&str]) -> Output {
    Command::new(bin("maeum-site"))
        .args(args)
        .arg("--home")
        .arg(fed.site_home(id))
        .output()
        .expect("running maeum-site")
}

fn site_json(fed: &Federation, id: &str, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = site(fed, id, &args);
    assert!(out.status.success(), "{id} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{id} {args:?}: not JSON ({e})"))
}

/// The site's test split (from its site.toml).
fn test_split(fed: &Federation, id: &str) -> PathBuf {
    let text = std::fs::read_to_string(fed.site_home(id).join("site.toml")).expect("site.toml");
    let line = text.lines().find_map(|l| l.strip_prefix("test = ")).expect("[data] test in site.toml");
    PathBuf::from(serde_json::from_str::<String>(line).expect("a quoted path"))
}

/// `predict --file FILE --json`'s summary line.
fn predict_summary(fed: &Federation, id: &str, file: &Path, model: Option<&str>) -> serde_json::Value {
    let mut args = vec!["predict", "--json", "--file", file.to_str().unwrap_or_default()];
    if let Some(m) = model {
        args.extend(["--model", m]);
    }
    let out = site(fed, id, &args);
    assert!(out.status.success(), "{id} predict: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().expect("a summary line");
    serde_json::from_str::<serde_json::Value>(last).expect("json")["summary"].clone()
}

/// What each site last reported for `version` at the coordinator.
fn installs(fed: &Federation, version: &str) -> serde_json::Value {
    fed.cli_json(&["models", "show", version])["installs"].clone()
}

/// Waits until every site's report for `version` satisfies `ok`.
fn wait_installs(fed: &Federation, version: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let until = Instant::now() + MIN;
    loop {
        let v = installs(fed, version);
        let done = SITES.iter().all(|s| v.as_array().and_then(|a| a.iter().find(|i| i["site"] == *s)).is_some_and(&ok));
        if done {
            return;
        }
        assert!(
            Instant::now() < until,
            "sites did not report {what} for {version}: {v:#}\n--- coordinator log\n{}\n--- site-1 log\n{}",
            fed.log_text("coordinator"),
            fed.log_text("site-1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The version each site has in service (from `models list`).
fn serving(fed: &Federation) -> Vec<u64> {
    SITES.iter().map(|s| site_json(fed, s, &["models", "list"])["current"].as_u64().unwrap_or(0)).collect()
}

/// Waits until every site serves `version`.
fn wait_serving(fed: &Federation, version: u64) {
    let until = Instant::now() + MIN;
    while serving(fed).iter().any(|v| *v != version) {
        assert!(Instant::now() < until, "sites serve {:?}, expected v{version}", serving(fed));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn promote(fed: &Federation, version: &str) {
    let v = fed.cli_json(&["models", "promote", version]);
    assert_eq!(v["current"], true, "{v:#}");
}

fn model_of(fed: &Federation, version: &str) -> String {
    fed.cli_json(&["models", "show", version])["model_sha256"].as_str().expect("model").to_string()
}

/// `models export --layout torch`, loaded by an independent numpy implementation of the
/// documented featuriser and forward pass (scripts/torch_predict.py, `safetensors` +
/// `numpy`), gives `maeum-site predict`'s probabilities to 1e-5.
fn torch_export_reproduces_predict(fed: &Federation, model: &str) {
    // Its own folder: check_export later exports into `export` and wants one release there.
    let out = fed.dir.path().join("export-torch");
    let v = fed.cli_json(&["models", "export", "v1", "--layout", "torch", "--out", out.to_str().unwrap_or_default()]);
    let torch = out.join("model-v1.torch.safetensors");
    assert!(v["files"].as_array().is_some_and(|f| f.iter().any(|f| f == torch.to_str().unwrap_or_default())), "{v:#}");
    // The signed model file is still written as signed: its digest is the release's.
    let signed = std::fs::read(out.join("model-v1.safetensors")).expect("signed model");
    assert_eq!(maeum_protocols::wire::Digest::of(&signed).to_string(), model);

    let texts = [
        "I feel like ending it all tonight, I wrote a note",
        "My anxiety before exams is getting worse and I can't sleep",
        "요즘 너무 우울해서 아무것도 하기 싫어요",
        "Has anyone tried the new pasta recipe? It's GREAT!!",
        "!!! ...", // no features at all: the bag is zero
    ];
    let mut python = Command::new("python3");
    python.arg(maeum_e2e::root().join("scripts/torch_predict.py")).arg(&torch);
    for t in texts {
        python.arg("--text").arg(t);
    }
    let out = python.output().expect("running python3");
    assert!(
        out.status.success(),
        "scripts/torch_predict.py failed (it needs `python3 -m pip install --user safetensors numpy`, which .ci/run \
         does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per text"))
        .collect();
    assert_eq!(reference.len(), texts.len());
    for (text, py) in texts.iter().zip(&reference) {
        let rust = site_json(fed, "site-1", &["predict", "--model", "v1", "--text", text]);
        let (rust_p, py_p) =
            (rust["probabilities"].as_object().expect("probs"), py["probabilities"].as_object().expect("probs"));
        assert_eq!(rust_p.len(), py_p.len(), "{text:?}");
        for (label, p) in rust_p {
            let (a, b) = (p.as_f64().expect("f64"), py_p[label].as_f64().expect("f64"));
            assert!((a - b).abs() < 1e-5, "{text:?} {label}: predict {a}, numpy on the torch export {b}");
        }
        assert_eq!(rust["label"], py["label"], "{text:?}");
    }
}

#[test]
fn sites_install_only_verified_releases_and_keep_the_previous_one_in_service() {
    let mut fed = Federation::new(3);
    let tamper = fed.dir.path().join("tamper-mode");
    std::fs::write(&tamper, "").expect("tamper file");
    let tamper_env = tamper.to_str().expect("utf-8 path").to_string();
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_TEST_TAMPER_RELEASE_FILE", &tamper_env)]);
    for s in SITES {
        fed.start_site(s);
    }
    let job_toml = format!("{SMALL_MODEL}[train]\nepochs = 1\n");

    // A completed job makes a signed, logged release; nothing is current until promoted.
    let first = fed.submit("first", 2, 3, &job_toml);
    assert_eq!(fed.wait_job(&first, 3 * MIN)["state"], "completed");
    let list = fed.cli_json(&["models", "list"]);
    assert_eq!(list["releases"].as_array().map(Vec::len), Some(1), "{list:#}");
    assert!(list["current"].is_null(), "{list:#}");
    let v1 = model_of(&fed, "v1");

    // Release gates: the card's federated crisis-class recall against consortium.json.
    let shown = fed.cli_json(&["models", "show", "v1"]);
    let measured = shown["crisis_recall"].as_f64().expect("the labels hold suicidewatch, and held-out examples");
    assert!(measured < 1.0, "a small two-round model is not perfect on suicidewatch: {measured}");
    let flag = &shown["card"]["crisis_flag"];
    assert_eq!(flag["classes"], serde_json::json!(["suicidewatch"]), "{flag:#}");
    assert_eq!(flag["target_recall"], 0.9, "the default target recall");
    let threshold = flag["threshold"].as_f64().expect("a threshold chosen from the sites' histograms");
    assert!(flag["recall"].as_f64().expect("recall") >= 0.9, "{flag:#}");
    set_gates(&fed, serde_json::json!({"min_crisis_recall": 1.0}));
    let out = fed.cli(&["models", "promote", "v1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promoted below the gate");
    assert!(
        err.contains("gate min_crisis_recall") && err.contains(&format!("{measured:.4}")) && err.contains("1.0000"),
        "names the gate, the measured value and the threshold: {err}"
    );
    assert!(err.contains("--override-gate"), "{err}");
    assert!(fed.cli_json(&["models", "list"])["current"].is_null(), "nothing was promoted");
    let out = fed.cli(&["models", "promote", "v1", "--override-gate"]);
    assert!(!out.status.success(), "an override needs a reason");
    let reason = "e2e: pilot with every flagged case reviewed by a counsellor";
    let v = fed.cli_json(&["models", "promote", "v1", "--override-gate", "--reason", reason]);
    assert_eq!(v["current"], true, "{v:#}");
    let overrides = &fed.cli_json(&["models", "show", "v1"])["gate_overrides"];
    assert_eq!(overrides.as_array().map(Vec::len), Some(1), "{overrides:#}");
    assert_eq!(overrides[0]["gate"], "min_crisis_recall");
    assert_eq!(overrides[0]["reason"], reason);
    assert_eq!(overrides[0]["measured"], format!("{measured:.4}"));
    assert_eq!(overrides[0]["threshold"], "1.0000");
    let human = fed.cli(&["models", "show", "v1"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("gate min_crisis_recall OVERRIDDEN by lead") && human.contains(reason), "{human}");
    assert!(human.contains("FAILS gate min_crisis_recall"), "{human}");
    // The rest of this test is about installs: gates at 0 pass everything.
    set_gates(&fed, serde_json::json!({"min_crisis_recall": 0.0}));
    wait_installs(&fed, "v1", "installed", |i| i["installed"] == true);
    wait_serving(&fed, 1);

    for s in SITES {
        // Re-verified offline: signature, digests, layout, log inclusion.
        let verify = site_json(&fed, s, &["models", "verify"]);
        assert_eq!(verify["failed"], 0, "{s}: {verify:#}");
        // Predictions on the site's own test split reproduce what it reported for v1.
        let reported = site_json(&fed, s, &["models", "show", "v1"]);
        let mine = &reported["reported_by_this_site"];
        let summary = predict_summary(&fed, s, &test_split(&fed, s), None);
        assert_eq!(summary["model"], v1.as_str(), "the release in service is used by default");
        assert_eq!(summary["confusion"], mine["confusion"], "{s}: predict reproduces the reported counts");
        assert_eq!(summary["accuracy"], mine["accuracy"], "{s}");
        assert_eq!(summary["macro_f1"], mine["macro_f1"], "{s}");
    }
    torch_export_reproduces_predict(&fed, &v1);

    // Personalisation: a local model beside the release, compared on the local test
    // split; the release stays in service and the local model is usable by digest.
    let tuned = site_json(&fed, "site-1", &["finetune", "--epochs", "1"]);
    assert_eq!(tuned["base_model"], v1.as_str(), "{tuned:#}");
    let local = tuned["model"].as_str().expect("local model digest").to_string();
    assert_ne!(local, v1);
    let base_reported = &site_json(&fed, "site-1", &["models", "show", "v1"])["reported_by_this_site"];
    assert_eq!(tuned["base"]["confusion"], base_reported["confusion"], "the base is scored on the same split");
    let summary = predict_summary(&fed, "site-1", &test_split(&fed, "site-1"), Some(&local[..12]));
    assert_eq!(summary["confusion"], tuned["finetuned"]["confusion"], "predict agrees with finetune's report");
    assert_eq!(serving(&fed)[0], 1, "finetune leaves the release in service");
    let list = site_json(&fed, "site-1", &["models", "list"]);
    assert_eq!(list["local_models"], serde_json::json!([local]), "{list:#}");

    // A second job: v2, not current until promoted.
    let second = fed.submit("second", 1, 3, &job_toml);
    assert_eq!(fed.wait_job(&second, 3 * MIN)["state"], "completed");
    let v2 = model_of(&fed, "v2");
    assert_eq!(fed.cli_json(&["models", "list"])["current"], 1);

    // Each kind of tampering is refused with its reason; v1 keeps serving.
    let cases = [
        ("blob", "model blob does not match the signed model digest"),
        ("card", "model card does not match the signed card digest"),
        ("signature", "signature does not verify"),
        ("unlogged", "not in the audit log"),
    ];
    for (mode, expected) in cases {
        std::fs::write(&tamper, mode).expect("tamper mode");
        for s in SITES {
            // The sites evaluated v2 in the job and hold its blob; a site that did not
            // (one that joined later) downloads it, and that is where the blob is forged.
            let _ = std::fs::remove_file(fed.site_home(s).join(format!("models/{v2}.safetensors")));
        }
        promote(&fed, "v2");
        wait_installs(&fed, "v2", mode, |i| {
            i["installed"] == false && i["reason"].as_str().is_some_and(|r| r.contains(expected))
        });
        assert_eq!(serving(&fed), vec![1, 1, 1], "{mode}: the previous release stays in service");
        for s in SITES {
            let list = site_json(&fed, s, &["models", "list"]);
            let refusals = list["refusals"].as_array().expect("refusals");
            assert!(refusals.iter().any(|r| r["reason"].as_str().is_some_and(|r| r.contains(expected))), "{list:#}");
            let summary = predict_summary(&fed, s, &test_split(&fed, s), None);
            assert_eq!(summary["model"], v1.as_str(), "{s} {mode}: predict still uses v1");
        }
        let out = fed.cli(&["models", "rollback"]);
        assert!(out.status.success(), "rollback: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(fed.cli_json(&["models", "list"])["current"], 1);
    }

    // Untampered, v2 installs; a rollback returns every site to v1.
    std::fs::write(&tamper, "").expect("tamper mode");
    promote(&fed, "v2");
    wait_installs(&fed, "v2", "installed", |i| i["installed"] == true);
    wait_serving(&fed, 2);
    assert_eq!(predict_summary(&fed, "site-1", &test_split(&fed, "site-1"), None)["model"], v2.as_str());
    let out = fed.cli(&["models", "rollback"]);
    assert!(out.status.success(), "rollback: {}", String::from_utf8_lossy(&out.stderr));
    wait_serving(&fed, 1);
    // Nothing left to roll back to.
    let out = fed.cli(&["models", "rollback"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to roll back to"));

    // The audit log holds every release, promotion, rollback, install and refusal.
    let audit = fed.dir.path().join("audit.json");
    run_ok(
        Command::new(bin("maeum-coordinator"))
            .args(["audit", "export", "--home"])
            .arg(fed.coordinator_home())
            .arg("--out")
            .arg(&audit),
    );
    run_ok(Command::new(bin("maeum-audit")).arg("verify").arg(&audit));
    let export = maeum_tlog::export::Export::decode(&std::fs::read(&audit).expect("export")).expect("decodes");
    let count = |kind: &str| export.entries.iter().filter(|e| e.event.kind() == kind).count();
    assert_eq!(count("model_release"), 2);
    let overridden: Vec<_> = export
        .entries
        .iter()
        .filter_map(|e| match &e.event {
            maeum_tlog::Event::ReleaseGateOverridden { version_sha256, gate, reason, operator, .. } => {
                Some((version_sha256.clone(), gate.clone(), reason.clone(), operator.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(overridden, vec![(v1.clone(), "min_crisis_recall".into(), reason.into(), "lead".into())]);
    // v1; v2 four times refused and rolled back; v2; rollback.
    assert_eq!(count("release_promoted"), 1 + 4 * 2 + 1 + 1);
    let refusals = export
        .entries
        .iter()
        .filter(|e| matches!(&e.event, maeum_tlog::Event::ReleaseInstall { installed: false, .. }))
        .count();
    assert_eq!(refusals, 4 * SITES.len(), "one refusal entry per site and tampering");

    // Export v2: verified files for people and tools.
    let out_dir = fed.dir.path().join("export");
    let exported = fed.cli_json(&["models", "export", "v2", "--out", out_dir.to_str().unwrap_or_default()]);
    assert_eq!(exported["files"].as_array().map(Vec::len), Some(6), "{exported:#}");
    // The card for a browser: self-contained, the verified signature, the installs.
    let html = std::fs::read_to_string(out_dir.join("report-v2.html")).expect("report-v2.html");
    assert!(
        html.contains("badge ok\">verified") && html.contains("id=\"installs\""),
        "report-v2.html lacks its standing"
    );
    assert!(!html.contains("<script") && !html.contains("src=\"http"), "report-v2.html fetches or runs something");
    let (card, report) = check_export(&fed, &out_dir, &audit, 2);
    assert_eq!(report["version"], 2);
    assert_eq!(report["installed_by"], serde_json::json!(SITES), "{report:#}");
    assert_eq!(report["refused_by"], serde_json::json!([]), "the last report of every site is its install");
    assert_eq!(report["current"], false, "rolled back to v1");
    assert_eq!(report["promotions"].as_array().map(Vec::len), Some(5), "four refused promotions and one install");
    // A card altered after export is caught offline too.
    let card_path = out_dir.join("card-v2.json");
    let original = std::fs::read(&card_path).expect("card");
    std::fs::write(
        &card_path,
        String::from_utf8_lossy(&original).replacen("\"round\": 1", "\"round\": 2", 1).as_bytes(),
    )
    .expect("write");
    let out =
        Command::new(bin("maeum-audit")).arg("release").arg(&out_dir).arg("--log").arg(&audit).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("FAILED: REL-5"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&card_path, original).expect("restore");
    assert_eq!(card.model.sha256, v2);
    assert_eq!(card.parent_version, Some(1));
    assert_eq!(card.rounds.len(), 1);
    let svg = std::fs::read_to_string(out_dir.join("curve-v2.svg")).expect("svg");
    assert!(svg.contains("<polyline"), "the curve has lines");
    let md = std::fs::read_to_string(out_dir.join("card-v2.md")).expect("markdown");
    assert!(md.contains(&v2) && md.contains("| Class | Recall |"), "{md}");

    // With the coordinator stopped, the site still predicts with its verified release.
    fed.kill_coordinator();
    let out = site(&fed, "site-1", &["predict", "--text", "I can't see a way out anymore"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    // The crisis flag uses the threshold on v1's card (v1 is in service again).
    let p = site_json(&fed, "site-1", &["predict", "--text", "I can't see a way out anymore"]);
    let crisis = &p["crisis"];
    assert_eq!(crisis["threshold"], threshold, "{p:#}");
    let classes = crisis["classes"].as_array().expect("classes");
    assert_eq!(classes.len(), 1, "{p:#}");
    assert_eq!(classes[0]["label"], "suicidewatch");
    let prob = classes[0]["probability"].as_f64().expect("probability");
    assert_eq!(crisis["flag"], prob >= threshold, "{p:#}");
    assert_eq!(p["probabilities"]["suicidewatch"], classes[0]["probability"]);
    let summary = predict_summary(&fed, "site-2", &test_split(&fed, "site-2"), Some("v1"));
    assert_eq!(summary["model"], v1.as_str());

    // A model file altered on the site's disk is refused at use, and by `models verify`.
    let blob = fed.site_home("site-3").join(format!("models/{v1}.safetensors"));
    let mut bytes = std::fs::read(&blob).expect("blob");
    let at = bytes.len() - 1;
    bytes[at] ^= 1;
    std::fs::write(&blob, bytes).expect("write");
    let out = site(&fed, "site-3", &["models", "verify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED"), "{}", String::from_utf8_lossy(&out.stdout));
    let out = site(&fed, "site-3", &["predict", "--text", "hello"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match its digest"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks an export the way an auditor does, with `maeum-audit release` against the
/// audit-log export and the consortium key: signature, card, model (digest, layout,
/// labels) and its `model_release` entry. Returns the card and the JSON report.
fn check_export(
    fed: &Federation,
    dir: &Path,
    audit: &Path,
    version: u32,
) -> (maeum_tlog::release::ModelCard, serde_json::Value) {
    let out = Command::new(bin("maeum-audit"))
        .arg("release")
        .arg(dir)
        .arg("--log")
        .arg(audit)
        .arg("--trust")
        .arg(fed.coordinator_home().join("signing.pub"))
        .arg("--json")
        .output()
        .expect("maeum-audit runs");
    assert!(out.status.success(), "maeum-audit release: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let card = std::fs::read(dir.join(format!("card-v{version}.json"))).expect("card");
    (maeum_tlog::release::ModelCard::decode(&card).expect("card"), report)
}

/// Writes the consortium's `release_gates` (read at each promotion).
fn set_gates(fed: &Federation, gates: serde_json::Value) {
    let path = fed.coordinator_home().join("consortium.json");
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("consortium.json")).expect("json");
    c["release_gates"] = gates;
    std::fs::write(&path, serde_json::to_vec_pretty(&c).expect("json")).expect("write consortium.json");
}
