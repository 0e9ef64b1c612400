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

/// Issue 21: `demo --serve-console` prints the console's URL, serves it during the job
/// and after it, and stops, coordinator included, at Ctrl-C.
#[test]
fn the_demo_serves_its_console_until_interrupted() {
    use std::io::{BufRead as _, Read as _, Write as _};
    let dir = tempfile::tempdir().expect("tempdir");
    bin("maeum-site");
    let mut child = Command::new(bin("maeum-coordinator"))
        .args(["demo", "--sites", "3", "--rounds", "1", "--no-baselines", "--serve-console", "127.0.0.1:0", "--data"])
        .arg(rmhd())
        .arg("--work-dir")
        .arg(dir.path().join("demo"))
        .env_remove("CARGO")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the demo");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| -> String {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("the demo never printed {needle:?}:\n{}", seen.join("\n")),
            }
        }
    };
    let line = wait_for("console: http://");
    let url = line.split_whitespace().nth(1).expect("a URL").trim_end_matches('/').to_owned();
    let addr = url.strip_prefix("http://").expect("http").to_owned();
    assert!(!addr.ends_with(":0"), "the demo printed the port it asked for, not the real one: {line}");
    let get = |path: &str| -> String {
        let mut s = std::net::TcpStream::connect(&addr).expect("the console answers");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .expect("request");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(get("/").starts_with("HTTP/1.1 200"), "the console serves during the run");
    wait_for("the console is still serving at");
    let release = get("/releases/1");
    assert!(release.starts_with("HTTP/1.1 200") && release.contains("badge ok\">verified"), "{release}");
    run_ok(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting") {
            break s;
        }
        assert!(std::time::Instant::now() < until, "the demo did not stop at Ctrl-C");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "the demo exits 0 at Ctrl-C: {status}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the coordinator stopped with the demo");
}
