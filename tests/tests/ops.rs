//! Operations end to end: the ops endpoints of a running coordinator and sites during a
//! real job (Prometheus metrics whose round counters move, health and readiness), the
//! doctors, a graceful stop on SIGTERM, and on-premises inference afterwards.

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use maeum_e2e::ops::{free_port, get, scrape, value};
use maeum_e2e::{Federation, SMALL_MODEL, bin};

const MIN: Duration = Duration::from_secs(60);

#[test]
fn metrics_move_during_a_job_doctors_pass_and_sigterm_stops_cleanly() {
    let sites = ["site-1", "site-2"];
    let mut fed = Federation::new(2);
    for s in sites {
        // Two sites: below the default cohort floor of 3, so the sites allow it.
        fed.set_policy(s, "min_cohort", "2");
    }
    let coord_ops = free_port();
    fed.start_coordinator_with(&[("MAEUM_OPS_LISTEN", coord_ops.as_str())]);
    let site_ops: Vec<String> = sites.iter().map(|_| free_port()).collect();
    for (s, addr) in sites.iter().zip(&site_ops) {
        fed.start_site_with(s, &[("MAEUM_OPS_LISTEN", addr.as_str())]);
    }
    assert_eq!(get(&coord_ops, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(&coord_ops, "/readyz").0, 200);
    let committed = "maeum_coordinator_rounds_total{outcome=\"committed\"}";
    assert_eq!(value(&scrape(&coord_ops), committed), 0.0);

    let id = fed.submit("watched", 2, 2, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    // Mid-job: the first round's commit shows before the job ends.
    fed.wait_for(&id, 3 * MIN, |j| j["history"].as_array().is_some_and(|h| !h.is_empty()));
    let mid = scrape(&coord_ops);
    assert!(value(&mid, committed) >= 1.0, "{mid}");
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");

    let text = scrape(&coord_ops);
    assert_eq!(value(&text, committed), 2.0, "{text}");
    assert_eq!(value(&text, "maeum_coordinator_stage_seconds_count{stage=\"train\"}"), 2.0, "{text}");
    assert_eq!(value(&text, "maeum_coordinator_stage_seconds_count{stage=\"evaluate\"}"), 1.0, "{text}");
    assert_eq!(value(&text, "maeum_coordinator_sites_online"), 2.0, "{text}");
    // Heartbeat intervals are timed from each site's second heartbeat (one a second).
    let idle = "maeum_coordinator_heartbeat_interval_seconds_count{stage=\"idle\"}";
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while value(&scrape(&coord_ops), idle) < 2.0 {
        assert!(std::time::Instant::now() < until, "no heartbeat intervals timed:\n{}", scrape(&coord_ops));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(value(&text, "maeum_coordinator_received_bytes_total") > 0.0, "{text}");
    assert!(value(&text, "maeum_coordinator_sent_bytes_total") > 0.0, "{text}");
    assert!(value(&text, "maeum_coordinator_audit_entries") > 10.0, "{text}");
    for addr in &site_ops {
        let text = scrape(addr);
        // Two rounds, and the final evaluation's masked input (a session of its own).
        assert_eq!(value(&text, "maeum_site_rounds_total{outcome=\"delivered\"}"), 3.0, "{text}");
        assert_eq!(value(&text, "maeum_site_connected"), 1.0, "{text}");
        assert!(value(&text, "maeum_site_sent_bytes_total") > 0.0, "{text}");
        assert!(value(&text, "maeum_site_received_bytes_total") > 0.0, "{text}");
        assert!(value(&text, "maeum_site_stage_seconds_count{stage=\"train\"}") >= 2.0, "{text}");
        assert!(value(&text, "maeum_site_checkpoints_witnessed_total") >= 1.0, "{text}");
        assert_eq!(get(addr, "/readyz").0, 200);
    }

    // The doctors: a healthy home passes, a broken one names the problem.
    let out = fed.cli(&["doctor"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let doctor = |fed: &Federation, id: &str| {
        Command::new(bin("maeum-site"))
            .args(["doctor", "--json", "--home"])
            .arg(fed.site_home(id))
            .output()
            .expect("doctor")
    };
    let out = doctor(&fed, "site-1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let level = |r: &serde_json::Value, name: &str| {
        r["checks"].as_array().and_then(|c| c.iter().find(|x| x["name"] == name)).map(|x| x["level"].clone())
    };
    assert_eq!(level(&report, "coordinator"), Some("ok".into()), "{report:#}");
    assert_eq!(level(&report, "release key"), Some("ok".into()), "the bundle pinned it: {report:#}");
    let toml = fed.site_home("site-2").join("site.toml");
    let text = std::fs::read_to_string(&toml).expect("site.toml");
    std::fs::write(&toml, text.replace("train.jsonl", "missing.jsonl")).expect("write");
    let out = doctor(&fed, "site-2");
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(level(&report, "local data"), Some("fail".into()), "{report:#}");
    // The doctor's probe reaches the coordinator but does not make a stopped site count
    // as online (it could be selected for a round otherwise).
    fed.kill_site("site-2");
    std::thread::sleep(Duration::from_secs(fed.heartbeat_timeout + 1));
    let report: serde_json::Value = serde_json::from_slice(&doctor(&fed, "site-2").stdout).expect("json");
    assert_eq!(level(&report, "coordinator"), Some("ok".into()), "{report:#}");
    let online = |id: &str| {
        fed.cli_json(&["sites", "list"])
            .as_array()
            .and_then(|a| a.iter().find(|s| s["site_id"] == id))
            .map(|s| s["online"].clone())
    };
    assert_eq!(online("site-2"), Some(false.into()));
    assert_eq!(online("site-1"), Some(true.into()));

    // SIGTERM: the coordinator stops accepting work, finishes what is in flight, signs a
    // last checkpoint, flushes, and exits 0 within the units' stop timeout.
    let status = fed.terminate_coordinator(Duration::from_secs(60)).expect("the coordinator stopped in time");
    assert!(status.success(), "exit status {status}");
    let log = fed.log_text("coordinator");
    assert!(log.contains("coordinator stopped"), "{log}");
    assert!(TcpStream::connect(&coord_ops).is_err(), "the ops endpoint closed");

    // With the coordinator gone, each site classifies its own test split with the final
    // model, and together they reproduce the federated accuracy reported for it.
    let last = job["history"].as_array().and_then(|h| h.last()).expect("rounds");
    let model = last["model"].as_str().expect("model digest");
    let (mut correct, mut labelled) = (0u64, 0u64);
    for s in last["evaluated_by"].as_array().expect("evaluated_by") {
        let s = s.as_str().expect("site");
        let test = fed.dir.path().join("data").join(s).join("test.jsonl");
        let out = Command::new(bin("maeum-site"))
            .args(["predict", "--json", "--model", model, "--home"])
            .arg(fed.site_home(s))
            .arg("--file")
            .arg(&test)
            .output()
            .expect("predict");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let summary: serde_json::Value = serde_json::from_str(text.lines().last().expect("summary")).expect("json");
        correct += summary["summary"]["correct"].as_u64().expect("correct");
        labelled += summary["summary"]["labelled"].as_u64().expect("labelled");
        assert_eq!(text.lines().count() as u64, summary["summary"]["inputs"].as_u64().expect("inputs") + 1);
    }
    let reported = last["evaluation"]["accuracy"].as_f64().expect("accuracy");
    let reproduced = correct as f64 / labelled as f64;
    assert!((reported - reproduced).abs() < 1e-9, "reported {reported}, predict gives {reproduced}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// Issue 19's storage trial, end to end. A state directory that lost its newest commits
/// (a backup of `HOME/state` alone, or sled dropping a corrupted tail on its own, as 48
/// of 100 single flipped bytes did in docs/benchmarks.md) made the coordinator re-run a
/// finished job. Now `serve` refuses to start on it, `doctor` names it, and the state
/// that goes with the seal serves again with the job still completed.
#[test]
fn a_rolled_back_state_is_refused_at_start_and_named_by_the_doctor() {
    let mut fed = Federation::new(3);
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    let id = fed.submit("rollback", 2, 3, SMALL_MODEL);
    fed.wait_for(&id, 2 * MIN, |j| j["completed_rounds"].as_u64().is_some_and(|n| n >= 1));
    let home = fed.coordinator_home();
    let state = home.join("state");
    let older = home.with_extension("state-older");
    let newer = home.with_extension("state-newer");
    assert!(fed.terminate_coordinator(MIN).is_some_and(|s| s.success()), "SIGTERM");
    copy_dir(&state, &older);
    fed.start_coordinator();
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    assert!(fed.terminate_coordinator(MIN).is_some_and(|s| s.success()), "SIGTERM");
    std::fs::rename(&state, &newer).expect("keep the newer state");
    copy_dir(&older, &state);

    let stderr = fed.serve_refused();
    assert!(stderr.contains("the state database was rolled back"), "{stderr}");
    let out = fed.cli(&["doctor", "--json"]);
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let check = report["checks"].as_array().and_then(|c| c.iter().find(|x| x["name"] == "state database")).cloned();
    let check = check.unwrap_or_else(|| panic!("no state check: {report:#}"));
    assert_eq!(check["level"], "fail", "{report:#}");
    assert!(check["detail"].as_str().is_some_and(|d| d.contains("rolled back")), "{report:#}");

    std::fs::remove_dir_all(&state).expect("rm");
    std::fs::rename(&newer, &state).expect("restore the state that goes with the seal");
    let out = fed.cli(&["doctor"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    fed.start_coordinator();
    assert_eq!(fed.job(&id)["state"], "completed", "the finished job is not re-run");
}
