//! The trials behind docs/benchmarks.md's "One sick site" section (issue 20) and its
//! 2^26-parameter load test (issue 19), on real processes with real mTLS: run on demand
//! (about 6 minutes; the load test holds a 268 MB model in 8 processes), so not in
//! every CI run:
//!
//! ```sh
//! MAEUM_TRIALS=1 cargo test -p maeum-e2e --test trials -- --nocapture --test-threads=1
//! ```
//!
//! Without `MAEUM_TRIALS=1` each test prints how to run it and returns. The behaviours
//! they measure are asserted in every CI run by `federation.rs`
//! (`a_site_that_keeps_failing_…`, `a_job_that_needs_a_failing_site_…`) and `secagg.rs`
//! (`a_site_restarted_mid_session_is_dropped_at_once`).

use std::time::{Duration, Instant};

use maeum_e2e::ops::{free_port, scrape, value};
use maeum_e2e::{Federation, SMALL_MODEL, corpus_subset, wait_log};

const KEEP: (&str, &str) = ("MAEUM_SITE_DEBUG_KEEP_PLAIN_INPUT", "1");

fn enabled(name: &str) -> bool {
    let on = std::env::var("MAEUM_TRIALS").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("{name}: a trial; run it with MAEUM_TRIALS=1 (see the file's header)");
    }
    on
}

/// The issue's first trial: one site whose every work item fails, in a job that needs
/// every site, watched for 104 s (the issue saw 23 attempts in that time).
#[test]
fn trial_one_failing_site_in_a_job_that_needs_it() {
    if !enabled("trial_one_failing_site_in_a_job_that_needs_it") {
        return;
    }
    let mut fed = Federation::new(3);
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2"]);
    fed.start_site_with("site-3", &[("MAEUM_SITE_TEST_FAIL_TRAIN", "1")]);
    fed.wait_online(3);
    let id = fed.submit("needs-all", 1, 3, SMALL_MODEL);
    let started = Instant::now();
    wait_log(&fed, "coordinator", "round started with secure aggregation", 1, Duration::from_secs(120));
    let first = started.elapsed();
    std::thread::sleep(Duration::from_secs(104).saturating_sub(first));
    let log = fed.log_text("coordinator");
    let attempts = log.matches("round started with secure aggregation").count();
    let failed = log.matches("retrying the round").count();
    let benched = log.matches("site keeps failing; it sits out the next attempts").count();
    let job = fed.job(&id);
    println!(
        "TRIAL sick site: {attempts} attempts and {failed} failed in 104 s after the first started at {:.1} s; \
         site-3 benched {benched} times; activity: {}",
        first.as_secs_f64(),
        job["activity"]
    );
    assert!(attempts <= 8, "{attempts} attempts in 104 s");
    assert!(fed.cli(&["jobs", "abort", &id]).status.success());
}

/// The issue's second trial: a site killed just after its masked input (stalled at the
/// unmask stage, then SIGKILLed) and restarted at once, ten times, one per round. The
/// issue saw 3 of 10 such kills stall the round for the whole 60 s stage deadline.
#[test]
fn trial_ten_sites_restarted_just_after_their_masked_input() {
    if !enabled("trial_ten_sites_restarted_just_after_their_masked_input") {
        return;
    }
    let mut fed = Federation::new(4);
    fed.start_coordinator();
    for i in 1..=3 {
        fed.start_site_with(&format!("site-{i}"), &[KEEP]);
    }
    let stall = [KEEP, ("MAEUM_SITE_TEST_STALL_AT", "unmask")];
    fed.start_site_with("site-4", &stall);
    fed.wait_online(4);
    let rounds = 10u64;
    let id = fed.submit("restarts", rounds as u32, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 60\n"));
    let mut waits = Vec::new();
    for round in 1..=rounds {
        // The log is appended to across restarts: the round-th stall.
        wait_log(&fed, "site-4", "test hook: stalling", round as usize, Duration::from_secs(180));
        fed.kill_site("site-4");
        let restarted = Instant::now();
        // The restarted site stalls again in the next round's unmask stage.
        fed.start_site_with("site-4", &stall);
        fed.wait_for(&id, Duration::from_secs(180), |j| j["completed_rounds"].as_u64().is_some_and(|n| n >= round));
        waits.push(restarted.elapsed().as_secs_f64());
    }
    let job = fed.wait_job(&id, Duration::from_secs(180));
    assert_eq!(job["state"], "completed", "{job:#}");
    let stalled = waits.iter().filter(|w| **w >= 30.0).count();
    let mean = waits.iter().sum::<f64>() / waits.len() as f64;
    let max = waits.iter().copied().fold(0.0, f64::max);
    println!(
        "TRIAL restarts: {} kills; restart to round committed: mean {mean:.1} s, max {max:.1} s; {stalled} of {} waited \
         30 s or more; each: {waits:.1?}",
        waits.len(),
        waits.len()
    );
    assert_eq!(stalled, 0, "{waits:?}");
}

/// Issue 19's load test: a 2^26-parameter model (the text classifier with 2^20 buckets
/// × 64: 268 MB a transfer) and 7 sites under secure aggregation. Folding, unmasking and
/// committing O(model) work must not stall the coordinator's runtime: every heartbeat
/// arrives within 3 s of the previous one (sites send one a second), measured by the
/// coordinator's `heartbeat_interval_seconds` histogram, and no site drops out.
#[test]
fn trial_a_2_26_parameter_model_with_seven_sites_misses_no_heartbeat() {
    if !enabled("trial_a_2_26_parameter_model_with_seven_sites_misses_no_heartbeat") {
        return;
    }
    let data_dir = tempfile::tempdir().expect("tempdir");
    let mut fed = Federation::with_data(7, &corpus_subset(data_dir.path(), 10));
    let sites: Vec<String> = (1..=7).map(|i| format!("site-{i}")).collect();
    for s in &sites {
        // The default ceiling is 2^26 parameters; this model is 2^26 and a small head.
        fed.set_policy(s, "max_params", "268435456");
    }
    let ops = free_port();
    fed.start_coordinator_with(&[("MAEUM_OPS_LISTEN", ops.as_str())]);
    fed.start_sites(&sites.iter().map(String::as_str).collect::<Vec<_>>());
    fed.wait_online(7);
    let job = "[model]\nbuckets = 1048576\nembed_dim = 64\nhidden = 8\n\
               [train]\noptimizer = \"sgd\"\nlearning_rate = 0.5\nepochs = 1\n\
               [deadlines]\ntrain = 1200\nsecagg = 600\n";
    let started = Instant::now();
    let id = fed.submit("load", 2, 7, job);
    let status = fed.wait_job(&id, Duration::from_secs(40 * 60));
    let wall = started.elapsed();
    assert_eq!(status["state"], "completed", "{status:#}\n{}", fed.log_text("coordinator"));
    let history = status["history"].as_array().expect("history");
    for r in history {
        assert_eq!(r["contributors"].as_array().map(Vec::len), Some(7), "a site dropped out: {r:#}");
    }
    let text = scrape(&ops);
    let hwm = fed
        .coordinator_pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .unwrap_or_default();
    let series: Vec<&str> = text.lines().filter(|l| l.contains("heartbeat_interval_seconds")).collect();
    eprintln!("job {id}: {:.0} s for 2 rounds; coordinator {hwm}", wall.as_secs_f64());
    for line in text.lines().filter(|l| l.starts_with("maeum_coordinator_stage_seconds_sum")) {
        eprintln!("{line}");
    }
    for line in &series {
        eprintln!("{line}");
    }
    let stages: Vec<&str> = series
        .iter()
        .filter_map(|l| l.strip_prefix("maeum_coordinator_heartbeat_interval_seconds_count{stage=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert!(!stages.is_empty(), "no heartbeat was timed:\n{text}");
    for stage in stages {
        let total = value(&text, &format!("maeum_coordinator_heartbeat_interval_seconds_count{{stage=\"{stage}\"}}"));
        let within = value(
            &text,
            &format!("maeum_coordinator_heartbeat_interval_seconds_bucket{{le=\"3.0\",stage=\"{stage}\"}}"),
        );
        assert_eq!(
            within,
            total,
            "{stage}: {} of {total} heartbeats came more than 3 s after the previous one",
            total - within
        );
    }
}
