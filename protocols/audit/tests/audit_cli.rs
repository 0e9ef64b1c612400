//! `maeum-audit` as an auditor runs it: the real binary on export files in a temp dir,
//! checking exit codes and what it prints.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod audit_fixture;

use std::path::Path;
use std::process::Command;

use audit_fixture::realistic;
use maeum_tlog::checkpoint::log_public_key;
use maeum_tlog::{Event, hex};

/// Runs `maeum-audit ARGS`; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_maeum-audit")).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_auditor_verifies_shows_proves_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = realistic();
    let key = hex(&log_public_key(&c.key));
    let old = dir.path().join("old.json");
    std::fs::write(&old, c.export().encode()).unwrap();
    let key_file = dir.path().join("signing.pub");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();

    let (code, out, err) = run(&["verify", path(&old), "--trust", &key]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("entries     30") && out.contains("checkpoints 3, 6 cosignatures"), "{out}");
    assert!(out.contains("witnesses   a,b,c"), "{out}");
    let (code, out, _) = run(&["verify", path(&old), "--trust", path(&key_file), "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"entries\": 30"), "{out}");
    let (code, _, err) = run(&["verify", path(&old), "--trust", &"ab".repeat(32)]);
    assert_eq!(code, 1);
    assert!(err.starts_with("FAILED: AUD-05"), "{err}");

    let (code, out, _) = run(&["show", path(&old), "--job", "j-1", "--kind", "round_started"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[1].contains("round_started job=j-1 round=2 attempt=1 sites=a,b,c secure_aggregation=yes"), "{out}");
    let (_, out, _) = run(&["show", path(&old), "--site", "c", "--kind", "round_secagg"]);
    assert!(out.lines().all(|l| l.contains("c")) && out.lines().count() == 3, "{out}");
    let (_, out, _) = run(&["show", path(&old), "--json", "--kind", "model_release"]);
    assert!(out.starts_with("{\"v\":1,"), "{out}");
    let (code, _, err) = run(&["show", path(&old), "--kind", "nonsense"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not one of"), "{err}");

    let proof = dir.path().join("proof.json");
    let (code, out, err) = run(&["prove", path(&old), "--entry", "12"]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(&proof, &out).unwrap();
    let (code, out, err) = run(&["verify-inclusion", path(&proof), "--trust", &key]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("OK: entry 12 is in log maeum/heart at tree size 30"), "{out}");
    let forged = std::fs::read_to_string(&proof).unwrap().replacen("\"round\":1", "\"round\":7", 1);
    std::fs::write(&proof, forged).unwrap();
    let (code, _, err) = run(&["verify-inclusion", path(&proof)]);
    assert_eq!(code, 1);
    assert!(err.contains("AUD-15 entry 12 is not proven"), "{err}");
    let (code, _, err) = run(&["prove", path(&old), "--entry", "99"]);
    assert_eq!(code, 1);
    assert!(err.contains("no entry 99"), "{err}");

    // The log grows; the new export extends the old one and the kept checkpoint.
    let seen = dir.path().join("seen.json");
    let (code, out, _) = run(&["checkpoint", path(&old)]);
    assert_eq!(code, 0);
    std::fs::write(&seen, out).unwrap();
    c.append(Event::JobFinished { job_id: "j-2".into(), state: "aborted".into() });
    c.checkpoint(&["a", "b"]);
    let new = dir.path().join("new.json");
    std::fs::write(&new, c.export().encode()).unwrap();
    for old in [&old, &seen] {
        let (code, out, err) = run(&["consistency", path(old), path(&new), "--trust", &key]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("(size 32) extends") && out.contains("(size 30)"), "{out}");
    }
    let (code, _, err) = run(&["consistency", path(&new), path(&old)]);
    assert_eq!(code, 1);
    assert!(err.contains("AUD-17"), "{err}");

    // A tampered export fails with the first bad place named; a missing file is exit 2.
    let text = std::fs::read_to_string(&new).unwrap().replacen("\"accepted\":true", "\"accepted\":false", 1);
    let tampered = dir.path().join("tampered.json");
    std::fs::write(&tampered, text).unwrap();
    let (code, _, err) = run(&["verify", path(&tampered)]);
    assert_eq!(code, 1);
    assert!(err.contains("AUD-08 checkpoint #1"), "{err}");
    let (code, _, err) = run(&["verify", path(&dir.path().join("missing.json"))]);
    assert_eq!(code, 2);
    assert!(err.contains("reading"), "{err}");
}

/// A released model as `maeum-coordinator models export` writes it, for `release`.
struct Exported {
    dir: std::path::PathBuf,
    seq: u64,
}

/// Writes a tiny real model, its card and its signed release file into `dir`, and
/// logs the release (`log_it`), a promotion and two sites' reports. `card_labels`
/// lets a test give the card other labels than the model has (signed all the same).
fn export_release(c: &mut audit_fixture::Consortium, dir: &Path, card_labels: &[&str], log_it: bool) -> Exported {
    use maeum_models::data::LabelSet;
    use maeum_models::features::FeatureConfig;
    use maeum_models::model::{ModelSpec, TextClassifierConfig};
    use maeum_tlog::release::{
        CARD_FORMAT, CardJob, CardModel, CardSecAgg, Manifest, ModelCard, ReleaseFile, evaluation,
    };
    let sha256_hex = |bytes: &[u8]| hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());

    std::fs::create_dir_all(dir).unwrap();
    let labels = vec!["anxiety".to_string(), "suicidewatch".to_string()];
    let spec = ModelSpec::TextClassifier {
        config: TextClassifierConfig {
            features: FeatureConfig { buckets: 64, word_ngrams: [1, 1], char_ngrams: [0, 0], max_chars: 100 },
            embed_dim: 4,
            hidden: 4,
        },
        labels: LabelSet::new(labels.clone()).unwrap(),
    };
    let params = spec.init(3).unwrap();
    let model_path = dir.join("model-v1.safetensors");
    spec.save(&model_path, &params, std::collections::HashMap::new()).unwrap();
    let model = std::fs::read(&model_path).unwrap();
    let card_labels: Vec<String> = card_labels.iter().map(|s| (*s).to_owned()).collect();
    let card = ModelCard {
        format: CARD_FORMAT.into(),
        consortium: "heart".into(),
        version: 1,
        parent_version: None,
        model: CardModel {
            sha256: sha256_hex(&model),
            size: model.len() as u64,
            layout_digest: spec.layout().digest().to_string(),
            kind: "text-classifier".into(),
            parameters: params.values().len() as u64,
            labels: card_labels.clone(),
            encoder: None,
            adapter: None,
        },
        job: CardJob {
            id: "j-1".into(),
            name: "readmission".into(),
            spec_sha256: "ab".repeat(32),
            rounds: 3,
            config: serde_json::json!({"rounds": 3}),
        },
        round: 3,
        released_ms: 1,
        secure_aggregation: CardSecAgg { enabled: true, threshold: 0, neighbours: 0, clip: 5.0, max_weight: 100 },
        initial_evaluation: None,
        rounds: Vec::new(),
        evaluation: Some(evaluation(&card_labels, &[vec![8, 2], vec![1, 3]], 2)),
        crisis_flag: None,
        privacy: None,
    };
    let card = card.encode();
    std::fs::write(dir.join("card-v1.json"), &card).unwrap();
    let manifest = Manifest {
        consortium: "heart".into(),
        version: 1,
        model_sha256: sha256_hex(&model),
        model_size: model.len() as u64,
        layout_digest: spec.layout().digest().to_string(),
        card_sha256: sha256_hex(&card),
    };
    if log_it {
        c.append(Event::ModelRelease {
            job_id: "j-1".into(),
            round: 3,
            version_sha256: manifest.model_sha256.clone(),
            card_sha256: manifest.card_sha256.clone(),
        });
        c.append(Event::ReleasePromoted { version_sha256: manifest.model_sha256.clone(), operator: "lead".into() });
        for (site, installed) in [("a", true), ("b", false)] {
            c.append(Event::ReleaseInstall {
                site: site.into(),
                version_sha256: manifest.model_sha256.clone(),
                installed,
                reason: if installed { String::new() } else { "the coordinator closed the connection".into() },
            });
        }
        c.checkpoint(&["a", "b"]);
    }
    let entries = c.export().entries;
    let seq = entries
        .iter()
        .find(|e| matches!(&e.event, Event::ModelRelease { version_sha256, .. } if *version_sha256 == manifest.model_sha256))
        .map_or(entries.len() as u64, |e| e.seq);
    let file = ReleaseFile::new(manifest.clone(), &manifest.sign(&c.key), &log_public_key(&c.key), seq);
    std::fs::write(dir.join("release-v1.json"), file.encode()).unwrap();
    Exported { dir: dir.to_owned(), seq }
}

/// A change made to one file of a copied release.
type Change = Box<dyn FnOnce(&mut Vec<u8>)>;

/// Copies an exported release into `to` and applies `change` to one of its files.
fn tampered(from: &Path, to: &Path, name: &str, change: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in ["model-v1.safetensors", "card-v1.json", "release-v1.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(to.join(name)).unwrap();
    change(&mut bytes);
    std::fs::write(to.join(name), bytes).unwrap();
    to.to_owned()
}

#[test]
fn an_auditor_checks_an_exported_release_against_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = realistic();
    let key = hex(&log_public_key(&c.key));
    let before = dir.path().join("before.json");
    std::fs::write(&before, c.export().encode()).unwrap();
    let labels = ["anxiety", "suicidewatch"];
    let good = export_release(&mut c, &dir.path().join("v1"), &labels, true);
    let log = dir.path().join("audit.json");
    std::fs::write(&log, c.export().encode()).unwrap();

    let (code, out, err) = run(&["release", path(&good.dir), "--log", path(&log), "--trust", &key]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("OK: release v1 of consortium heart verifies"), "{out}");
    assert!(out.contains(&format!("logged      entry #{} model_release", good.seq)), "{out}");
    assert!(out.contains("(cosigned by a,b)") && out.contains("(matches --trust)"), "{out}");
    assert!(out.contains("suicidewatch recall 0.7500") && out.contains("current     yes"), "{out}");
    assert!(out.contains("installed   a\n") && out.contains("refused     b (#"), "{out}");
    // The file itself works as the argument too; JSON for tools.
    let file = good.dir.join("release-v1.json");
    let (code, out, err) = run(&["release", path(&file), "--log", path(&log), "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["logged"]["seq"], good.seq);
    assert_eq!(json["installed_by"], serde_json::json!(["a"]));
    assert_eq!(json["refused_by"][0]["site"], "b");
    assert_eq!(json["signing_public_key"], key.as_str());

    // Each tampering fails with the rule it breaks.
    let t = |name: &str, file: &str, change: Change| tampered(&good.dir, &dir.path().join(name), file, change);
    let cases: Vec<(std::path::PathBuf, &Path, &str)> = vec![
        (t("card", "card-v1.json", Box::new(|b| b[20] ^= 0x01)), &log, "REL-5: the model card does not match"),
        (t("blob", "model-v1.safetensors", Box::new(|b| *b.last_mut().unwrap() ^= 1)), &log, "REL-7: the model blob"),
        (
            t(
                "sig",
                "release-v1.json",
                Box::new(|b| {
                    *b = String::from_utf8_lossy(b).replacen("\"model_size\": ", "\"model_size\": 1", 1).into_bytes()
                }),
            ),
            &log,
            "REL-4: the release signature does not verify",
        ),
        (good.dir.clone(), &before, "REL-9: the release is not in the audit log"),
    ];
    for (release, against, want) in cases {
        let (code, out, err) = run(&["release", path(&release), "--log", path(against)]);
        assert_eq!(code, 1, "{want}: {out}{err}");
        assert!(err.starts_with(&format!("FAILED: {want}")), "{want}: {err}");
    }
    // Signed, logged, but the card's labels are not the model's: REL-8.
    let mut c2 = realistic();
    let odd = export_release(&mut c2, &dir.path().join("odd"), &["calm", "crisis"], true);
    let log2 = dir.path().join("audit2.json");
    std::fs::write(&log2, c2.export().encode()).unwrap();
    let (code, _, err) = run(&["release", path(&odd.dir), "--log", path(&log2)]);
    assert_eq!(code, 1);
    assert!(err.starts_with("FAILED: REL-8") && err.contains("labels"), "{err}");
    // A release signed by another consortium's key, checked against this log: REL-4.
    let (code, _, err) = run(&["release", path(&odd.dir), "--log", path(&log)]);
    assert_eq!(code, 1);
    assert!(err.starts_with("FAILED: REL-4"), "{err}");
    // A log that is not the trusted one: AUD-05 before anything else.
    let (code, _, err) = run(&["release", path(&good.dir), "--log", path(&log), "--trust", &"ab".repeat(32)]);
    assert_eq!(code, 1);
    assert!(err.starts_with("FAILED: AUD-05"), "{err}");
    // A folder with two releases, or none, cannot be checked: exit 2, saying why.
    std::fs::copy(file, dir.path().join("card").join("release-v2.json")).unwrap();
    let (code, _, err) = run(&["release", path(&dir.path().join("card")), "--log", path(&log)]);
    assert_eq!(code, 2);
    assert!(err.contains("several releases (release-v1.json, release-v2.json)"), "{err}");
    let (code, _, err) = run(&["release", path(dir.path()), "--log", path(&log)]);
    assert_eq!(code, 2);
    assert!(err.contains("holds no release-vN.json"), "{err}");
}

/// `maeum-audit show audit.json | head -1`: a reader that stops early ends the tool
/// quietly with status 141 (as SIGPIPE would), not with a panic report.
#[test]
fn a_closed_stdout_ends_the_tool_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.json");
    std::fs::write(&file, realistic().export().encode()).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_maeum-audit"))
        .args(["show", path(&file)])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
