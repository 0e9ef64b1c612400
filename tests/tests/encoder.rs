//! A federated job on a pretrained encoder (issue 18), end to end: real processes,
//! mTLS, secure aggregation, the real corpus (a subset: each site embeds its records
//! with all-MiniLM-L6-v2 on the CPU) and the real encoder fetched by
//! `scripts/fetch_encoder.py`. Only the head travels; each site runs the encoder only
//! from files it holds with the job's digests, caches its records' vectors owner-only,
//! installs the signed release and classifies offline.

use std::process::Command;
use std::time::Duration;

use maeum_e2e::{Federation, bin, corpus_subset, encoder_dir};

const MIN: Duration = Duration::from_secs(60);

fn site(fed: &Federation, id: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin("maeum-site")).args(args).arg("--home").arg(fed.site_home(id)).output().expect("maeum-site")
}

/// Waits (a minute at most) until every one of `sites` has installed release v1.
fn wait_installed(fed: &Federation, sites: &[&str]) {
    let until = std::time::Instant::now() + MIN;
    for s in sites {
        loop {
            let list = site(fed, s, &["models", "list", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
            if v["current"] == 1 {
                break;
            }
            assert!(std::time::Instant::now() < until, "{s} did not install v1: {v:#}\n{}", fed.log_text(s));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Runs `job` for 2 rounds needing 3 sites; checks it completed with 3 contributors
/// in each round, and returns its status.
fn run_two_rounds(fed: &Federation, name: &str, job: &str) -> serde_json::Value {
    let id = fed.submit(name, 2, 3, job);
    let status = fed.wait_job(&id, 6 * MIN);
    assert_eq!(status["state"], "completed", "{status:#}\n{}", fed.log_text("coordinator"));
    let history = status["history"].as_array().expect("history");
    assert_eq!(history.len(), 2, "{status:#}");
    for r in history {
        assert_eq!(r["contributors"].as_array().map(Vec::len), Some(3), "{r:#}");
        assert_eq!(r["secure_aggregation"], true, "{r:#}");
    }
    status
}

#[test]
fn an_encoder_head_job_trains_under_secure_aggregation_and_every_site_predicts_offline() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let data = corpus_subset(data_dir.path(), 10);
    let mut fed = Federation::with_data(4, &data);
    // site-1 and site-2 install the encoder into their homes; site-3 points at a shared
    // read-only folder; site-4 holds none and must refuse the job.
    for s in ["site-1", "site-2"] {
        let out = Command::new(bin("maeum-site"))
            .args(["encoders", "add", "--home"])
            .arg(fed.site_home(s))
            .arg(encoder_dir())
            .output()
            .expect("encoders add");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("weights and tokenizer digests verified"));
    }
    let toml = fed.site_home("site-3").join("site.toml");
    let text = std::fs::read_to_string(&toml).expect("site.toml");
    let shared = encoder_dir().parent().expect("encoders").display().to_string();
    assert!(text.contains("\n[encoders]\n"), "site.toml: {text}");
    std::fs::write(&toml, text.replace("\n[encoders]\n", &format!("\n[encoders]\ndir = {shared:?}\n")))
        .expect("site.toml");
    let listed = site(&fed, "site-3", &["encoders", "list", "--json"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed[0]["status"], "ok", "{listed:#}");

    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4"]);
    fed.wait_online(4);
    let job = "[model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\nhidden = 32\n\
               [train]\nepochs = 5\nlearning_rate = 0.01\n";
    // Secure aggregation was on, 3 sites in each round.
    let status = run_two_rounds(&fed, "enc", job);

    // site-4 said why, before round 1.
    let d = status["decisions"].as_array().and_then(|d| d.iter().find(|d| d["site"] == "site-4").cloned());
    let d = d.unwrap_or_else(|| panic!("no decision from site-4: {status:#}"));
    assert_eq!(d["accept"], false);
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("encoder \"all-minilm-l6-v2\" is not installed at this site"), "{reason}");

    // The global model is the head alone: 384×32 + 32 + 32×27 + 27 parameters, about
    // 53 kB of f32 per update.
    let out = fed.cli(&["models", "promote", "v1", "--override-gate", "--reason", "e2e test on 270 posts"]);
    // Promoted whether or not a model trained on 40 posts a site passes the gates.
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = fed.cli_json(&["models", "show", "v1"]);
    let card = &shown["card"]["model"];
    assert_eq!(card["kind"], "encoder-head", "{shown:#}");
    assert_eq!(card["parameters"], 384 * 32 + 32 + 32 * 27 + 27, "{shown:#}");
    assert_eq!(card["encoder"]["sha256"], "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db");
    assert!(shown["model_size"].as_u64().is_some_and(|n| n < 100_000), "only the head is in the model: {shown:#}");

    // Each site cached its own records' vectors, owner-only, one entry per record.
    for s in ["site-1", "site-2", "site-3"] {
        let dir = fed.site_home(s).join("cache/vectors");
        let files: Vec<_> = std::fs::read_dir(&dir).expect("vector cache").map(|e| e.expect("entry").path()).collect();
        assert_eq!(files.len(), 1, "{s}: {files:?}");
        let len = std::fs::metadata(&files[0]).expect("meta").len();
        assert!(len > 0 && len % (32 + 4 * 384) == 0, "{s}: {len} bytes");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files[0]).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{s}");
        }
    }

    // Every participating site installs the release and classifies offline with it.
    wait_installed(&fed, &["site-1", "site-2", "site-3"]);
    fed.kill_coordinator();
    for s in ["site-1", "site-3"] {
        let out = site(&fed, s, &["predict", "--text", "I feel like ending it all tonight, I wrote a note", "--json"]);
        assert!(out.status.success(), "{s}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert!(fed.labels.iter().any(|l| v["label"] == l.as_str()), "{v:#}");
        assert!(v["crisis"]["flag"].is_boolean(), "{v:#}");
    }

    // Personalisation runs the same encoder on the site's own records (from its cache).
    let out = site(&fed, "site-1", &["finetune", "--epochs", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v.to_string().contains("accuracy"), "{v:#}");

    // A site whose encoder files were altered refuses to run the model, naming the file.
    let altered = fed.site_home("site-2").join("encoders/all-minilm-l6-v2/tokenizer.json");
    let mut text = std::fs::read_to_string(&altered).expect("tokenizer");
    text.push(' ');
    std::fs::write(&altered, text).expect("alter");
    let out = site(&fed, "site-2", &["predict", "--text", "hello", "--json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokenizer.json: SHA-256 is") && err.contains("not the encoder the model names"), "{err}");
}

/// A linear encoder head (`hidden = 0`, the head for differential privacy) trained with
/// the distributed DP mode: one weight matrix travels, masked, each round; the card states
/// the guarantee; every site installs the release and classifies offline with it.
#[test]
fn a_linear_encoder_head_trains_with_distributed_dp_and_every_site_predicts_with_it() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let data = corpus_subset(data_dir.path(), 10);
    let mut fed = Federation::with_data(3, &data);
    let shared = encoder_dir().parent().expect("encoders").display().to_string();
    for s in ["site-1", "site-2", "site-3"] {
        let toml = fed.site_home(s).join("site.toml");
        let text = std::fs::read_to_string(&toml).expect("site.toml");
        std::fs::write(&toml, text.replace("\n[encoders]\n", &format!("\n[encoders]\ndir = {shared:?}\n")))
            .expect("site.toml");
    }
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    let job = "[model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\nhidden = 0\n\
               [strategy]\nkind = \"fedadam\"\nserver_learning_rate = 0.04\n\
               [privacy]\nmode = \"distributed\"\nepsilon = 3.0\nsample_rate = 1.0\n";
    let status = run_two_rounds(&fed, "lin", job);
    for r in status["history"].as_array().expect("history") {
        assert!(r["refused"].as_str().is_none_or(str::is_empty), "round refused: {r:#}");
    }
    let epsilon = status["privacy"]["plan"]["epsilon"].as_f64().expect("planned ε");
    assert!(epsilon <= 3.0 && epsilon > 2.99, "{status:#}");

    let out = fed.cli(&["models", "promote", "v1", "--override-gate", "--reason", "e2e test on 270 posts"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = fed.cli_json(&["models", "show", "v1"]);
    let card = &shown["card"]["model"];
    // One 384 × 27 matrix: no hidden layer, no bias.
    assert_eq!(
        (card["kind"].as_str(), card["parameters"].as_u64()),
        (Some("encoder-head"), Some(384 * 27)),
        "{shown:#}"
    );
    assert_eq!(shown["card"]["privacy"]["mechanism"], "dp-sgd-distributed-skellam", "{shown:#}");

    wait_installed(&fed, &["site-1", "site-2", "site-3"]);
    fed.kill_coordinator();
    for s in ["site-1", "site-2", "site-3"] {
        let out = site(&fed, s, &["predict", "--text", "I cannot sleep and I feel hopeless every day", "--json"]);
        assert!(out.status.success(), "{s}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert!(fed.labels.iter().any(|l| v["label"] == l.as_str()), "{v:#}");
    }
}

/// An `encoder-lora` job (FFA-LoRA on the top layer): what travels is the adapters' `B`
/// and the head, never the encoder; the card names the encoder and the adapters; every
/// site installs the release and classifies offline through its own encoder files.
#[test]
fn an_encoder_lora_job_sends_only_the_adapters_and_head_and_every_site_predicts_offline() {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let data = corpus_subset(data_dir.path(), 6);
    let mut fed = Federation::with_data(3, &data);
    let sites = ["site-1", "site-2", "site-3"];
    for s in sites {
        let out = site(&fed, s, &["encoders", "add", &encoder_dir().display().to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    fed.start_coordinator();
    fed.start_sites(&sites);
    fed.wait_online(3);
    let job = "seed = 21\n[model]\nkind = \"encoder-lora\"\nencoder = \"all-minilm-l6-v2\"\nhidden = 32\n\
               lora_layers = 1\nlora_rank = 4\n[train]\nepochs = 2\nlearning_rate = 0.01\n";
    run_two_rounds(&fed, "lora", job);
    let out = fed.cli(&["models", "promote", "v1", "--override-gate", "--reason", "e2e test on 162 posts"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = fed.cli_json(&["models", "show", "v1"]);
    let card = &shown["card"]["model"];
    assert_eq!(card["kind"], "encoder-lora", "{shown:#}");
    // B for query, key, value and attention output of one layer at rank 4, and the head.
    assert_eq!(card["parameters"], 4 * 4 * 384 + 384 * 32 + 32 + 32 * 27 + 27, "{shown:#}");
    assert_eq!(card["encoder"]["sha256"], "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db");
    assert_eq!(card["adapter"], serde_json::json!({"layers": 1, "rank": 4, "alpha": 32.0, "seed": 21}), "{shown:#}");
    assert!(shown["model_size"].as_u64().is_some_and(|n| n < 200_000), "no encoder weights in the model: {shown:#}");

    wait_installed(&fed, &sites);
    fed.kill_coordinator();
    let out =
        site(&fed, "site-2", &["predict", "--text", "I feel like ending it all tonight, I wrote a note", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(fed.labels.iter().any(|l| v["label"] == l.as_str()), "{v:#}");
    let shown = site(&fed, "site-2", &["models", "show"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("adapters    FFA-LoRA on the top 1 layers, rank 4"), "{text}");
    // Personalisation fine-tunes the same adapters and head on the site's own records.
    let out = site(&fed, "site-3", &["finetune", "--epochs", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v.to_string().contains("accuracy"), "{v:#}");
}
