//! `maeum-site train-local` and `data` commands, run as real processes on the real corpus.

use std::process::Command;

use maeum_e2e::{bin, rmhd, run_ok};

#[test]
fn train_local_on_the_real_corpus_meets_the_accuracy_bar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_ok(
        Command::new(bin("maeum-site"))
            .args(["train-local", "--test-fraction", "0.2", "--seed", "7", "--json", "--data"])
            .arg(rmhd())
            .arg("--out")
            .arg(dir.path().join("model")),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let acc = v["accuracy"].as_f64().expect("accuracy");
    let f1 = v["macro_f1"].as_f64().expect("macro_f1");
    assert_eq!(v["n_train"], 5616);
    assert_eq!(v["n_test"], 1404);
    assert_eq!(v["per_class_recall"].as_object().map(|o| o.len()), Some(27));
    assert!(acc >= 0.60, "accuracy {acc} below the 0.60 bar (macro-F1 {f1})");
    assert!(dir.path().join("model/model.safetensors").exists());
    assert!(dir.path().join("model/model.json").exists());
}

#[test]
fn adapter_flags_with_another_model_are_refused_not_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    for model in ["text-classifier", "encoder-head"] {
        let out = Command::new(bin("maeum-site"))
            .args(["train-local", "--model", model, "--lora-rank", "4", "--data"])
            .arg(rmhd())
            .arg("--out")
            .arg(dir.path().join("model"))
            .output()
            .expect("spawn");
        assert_eq!(out.status.code(), Some(1), "{model}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("apply only to --model encoder-lora, not {model}")), "{err}");
        assert!(!dir.path().join("model").exists(), "nothing written");
    }
}

#[test]
fn bad_line_fails_with_file_and_line_then_skip_invalid_counts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("site.jsonl");
    let mut lines = String::new();
    for i in 0..30 {
        lines.push_str(&format!("{{\"text\":\"calm day number {i}\",\"label\":\"calm\"}}\n"));
        lines.push_str(&format!("{{\"text\":\"cannot cope {i}\",\"label\":\"distress\"}}\n"));
    }
    lines.push_str("{\"text\": \"oops\"\n");
    std::fs::write(&data, lines).expect("write fixture");

    let out =
        Command::new(bin("maeum-site")).arg("data").arg("check").arg("--data").arg(&data).output().expect("spawn");
    assert_eq!(out.status.code(), Some(3), "invalid data exits with 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site.jsonl:61: bad JSON"), "{err}");

    let out = run_ok(
        Command::new(bin("maeum-site")).args(["data", "check", "--skip-invalid", "--json", "--data"]).arg(&data),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["valid"], 60);
    assert_eq!(v["skipped"], 1);
    assert_eq!(v["skipped_by_kind"]["bad_json"], 1);
}

#[test]
fn split_writes_reproducible_non_iid_sites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let split = |out: &std::path::Path| {
        let o = run_ok(
            Command::new(bin("maeum-site"))
                .args(["data", "split", "--sites", "7", "--alpha", "0.5", "--seed", "11", "--json", "--data"])
                .arg(rmhd())
                .arg("--out")
                .arg(out),
        );
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let a = split(&dir.path().join("a"));
    let b = split(&dir.path().join("b"));
    assert_eq!(a["shards"], b["shards"]);
    let shards = a["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 7);
    let total: u64 = shards.iter().map(|s| s["train"].as_u64().unwrap_or(0) + s["test"].as_u64().unwrap_or(0)).sum();
    assert_eq!(total, 7020);
    for s in 1..=7 {
        let f = std::fs::read(dir.path().join(format!("a/site-{s}/train.jsonl"))).expect("train file");
        assert_eq!(f, std::fs::read(dir.path().join(format!("b/site-{s}/train.jsonl"))).expect("train file"));
    }
}

#[test]
fn the_corpus_fetch_reports_its_phases_on_stderr_without_redraws_when_not_a_terminal() {
    rmhd();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_ok(
        Command::new("python3")
            .arg(maeum_e2e::root().join("scripts/fetch_rmhd.py"))
            .arg("--out")
            .arg(dir.path().join("rmhd.jsonl"))
            .arg("--cache")
            .arg(maeum_e2e::root().join("data/cache")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    // A cached wheel or a fresh download: either way the user is told which, with sizes.
    assert!(err.contains("using the cached wheel") || err.contains("downloaded "), "{err}");
    assert!(err.contains(" MB"), "sizes are shown: {err}");
    assert!(err.contains("SHA-256 matches"), "{err}");
    // Piped stderr (a CI log): no carriage-return progress redraws.
    assert!(!err.contains('\r'), "{err:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote 7020 posts"));
}
