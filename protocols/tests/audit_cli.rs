//! `maeum-audit` as an auditor runs it: the real binary on export files in a temp dir,
//! checking exit codes and what it prints.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod audit_fixture;

use std::path::Path;
use std::process::Command;

use audit_fixture::realistic;
use maeum_protocols::audit::checkpoint::log_public_key;
use maeum_protocols::audit::{Event, hex};

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
