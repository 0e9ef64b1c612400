//! The trials behind docs/benchmarks.md's "One sick site" section (issue 20), its
//! 2^26-parameter load test (issue 19) and its 100M-parameter adapter stand-in job
//! (issue 20), on real processes with real mTLS: run on demand (about 8 minutes; the
//! load test holds a 268 MB model in 8 processes, the stand-in a 400 MB one in 4), so
//! not in every CI run:
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

use maeum_e2e::ops::{free_port, peak_rss, scrape, value};
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

/// Issue 20's adapter-sized job: a 100M-parameter adapter stand-in (400 MB a transfer)
/// through 3 real sites under secure aggregation for 2 rounds, released and installed.
/// Every released value is checked against the cohort's closed form
/// (`maeum_models::standin`); the sites' download and upload throughput is compared with
/// a raw TCP copy of the same file on loopback, made in the same run; peak memory of the
/// coordinator and the sites is printed for `docs/benchmarks.md`.
#[test]
fn trial_a_100m_parameter_adapter_stand_in_end_to_end() {
    if !enabled("trial_a_100m_parameter_adapter_stand_in_end_to_end") {
        return;
    }
    const PARAMS: usize = 100_000_000;
    let mut fed = Federation::new(3);
    let sites = ["site-1", "site-2", "site-3"];
    for s in sites {
        fed.set_policy(s, "allowed_models", "[\"adapter-stand-in\"]");
        fed.set_policy(s, "max_params", "268435456");
    }
    let ops = free_port();
    fed.start_coordinator_with(&[("MAEUM_OPS_LISTEN", ops.as_str())]);
    let site_ops: Vec<String> = sites.iter().map(|_| free_port()).collect();
    for (s, o) in sites.iter().zip(&site_ops) {
        fed.start_site_with(s, &[("MAEUM_OPS_LISTEN", o.as_str())]);
    }
    fed.wait_online(3);
    let job = format!(
        "[model]\nkind = \"adapter-stand-in\"\nparams = {PARAMS}\n[train]\nlearning_rate = 0.5\n\
         [secure_aggregation]\nclip = 4.0\n[deadlines]\ntrain = 1200\nsecagg = 600\n"
    );
    let started = Instant::now();
    let id = fed.submit("adapter", 2, 3, &job);
    let status = fed.wait_job(&id, Duration::from_secs(40 * 60));
    let wall = started.elapsed();
    assert_eq!(status["state"], "completed", "{status:#}\n{}", fed.log_text("coordinator"));
    for r in status["history"].as_array().expect("history") {
        assert_eq!(r["contributors"].as_array().map(Vec::len), Some(3), "a site dropped out: {r:#}");
        assert_eq!(r["secure_aggregation"], true, "{r:#}");
    }
    let coordinator_rss = fed.coordinator_pid().and_then(peak_rss).unwrap_or_default();
    let out = fed.cli(&["models", "promote", "v1", "--override-gate", "--reason", "adapter-sized trial"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let until = Instant::now() + Duration::from_secs(600);
    for s in sites {
        wait_log(&fed, s, "and in service", 1, until.saturating_duration_since(Instant::now()));
    }

    // Every released value where the closed form puts it.
    let export = fed.dir.path().join("export");
    let out = fed.cli(&["models", "export", "1", "--out", export.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = export.join("model-v1.safetensors");
    let (_, released, _) = maeum_models::model::ModelSpec::load(&file).expect("the release");
    let labels_toml: Vec<String> = fed.labels.iter().map(|l| format!("{l:?}")).collect();
    let spec = format!("name = \"adapter\"\nlabels = [{}]\nrounds = 2\nmin_sites = 3\n{job}", labels_toml.join(", "));
    let init =
        maeum_protocols::job::JobSpec::from_toml("job.toml", &spec).expect("job").initial_params().expect("init");
    let l = fed.labels.len();
    let mut cohort = vec![0f64; l];
    for s in sites {
        let path = fed.dir.path().join("data").join(s).join("train.jsonl");
        for line in std::fs::read_to_string(&path).expect("train.jsonl").lines().filter(|x| !x.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).expect("jsonl");
            let label = v["label"].as_str().expect("label");
            cohort[fed.labels.iter().position(|x| x == label).expect("a job label")] += 1.0;
        }
    }
    let n: f64 = cohort.iter().sum();
    let step: Vec<f64> = cohort.iter().map(|c| 2.0 * 0.5 * (c / n - 1.0 / l as f64)).collect();
    let worst = released.values()[l..].iter().zip(&init.values()[l..]).enumerate().fold(0f64, |w, (j, (g, s))| {
        let want = f64::from(*s) + f64::from(maeum_models::standin::sign(j)) * step[j % l];
        w.max((f64::from(*g) - want).abs())
    });
    drop((released, init));
    assert!(worst < 2e-5, "largest deviation from the expected aggregate: {worst}");

    // A raw TCP copy of the same bytes on loopback, file to file with an fsync, as the
    // site's download does; and memory to memory.
    let bytes = std::fs::metadata(&file).expect("size").len();
    let raw = |to_disk: bool| -> f64 {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let source = file.clone();
        let sink = fed.dir.path().join("raw-copy");
        let t = Instant::now();
        let sender = std::thread::spawn(move || {
            let mut stream = std::net::TcpStream::connect(addr).expect("connect");
            let mut f = std::fs::File::open(&source).expect("open");
            std::io::copy(&mut f, &mut stream).expect("send");
        });
        let (mut stream, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut out = to_disk.then(|| std::fs::File::create(&sink).expect("create"));
        loop {
            let k = stream.read(&mut buf).expect("receive");
            if k == 0 {
                break;
            }
            if let Some(f) = out.as_mut() {
                f.write_all(&buf[..k]).expect("write");
            }
        }
        if let Some(f) = out {
            f.sync_data().expect("fsync");
        }
        sender.join().expect("sender");
        let secs = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&sink);
        secs
    };
    let (raw_disk, raw_mem) = (raw(true), raw(false));

    // One stream alone, the sites stopped: site-1's identity downloads the release's
    // model through the coordinator's real server path (mTLS, HTTP/2, chunk digests),
    // into a file with the site's checks (each chunk's digest, the whole file's, an
    // fsync), and into nothing (the transport alone).
    let digest = maeum_protocols::wire::Digest::of(&std::fs::read(&file).expect("model"));
    let site_metrics: Vec<(String, u64)> = sites
        .iter()
        .zip(&site_ops)
        .map(|(s, o)| (scrape(o), fed.site_pid(s).and_then(peak_rss).unwrap_or_default()))
        .collect();
    for s in sites {
        fed.kill_site(s);
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let one_stream = |to_disk: bool| -> f64 {
        use maeum_protocols::wire::{self, Hasher, pb};
        use std::io::Write;
        rt.block_on(async {
            let mut c = maeum_e2e::site_client(&fed, "site-1").await;
            let sink = fed.dir.path().join("one-stream");
            let t = Instant::now();
            let request = pb::DownloadRequest { digest: digest.hex(), offset: 0 };
            let mut stream = c.download(request).await.expect("download").into_inner();
            let mut out = to_disk.then(|| std::fs::File::create(&sink).expect("create"));
            let (mut hasher, mut offset) = (Hasher::default(), 0u64);
            while let Some(chunk) = stream.message().await.expect("chunk") {
                if let Some(f) = out.as_mut() {
                    wire::check_chunk(offset, bytes, chunk.offset, &chunk.data, &chunk.sha256).expect("chunk digest");
                    f.write_all(&chunk.data).expect("write");
                    hasher.update(&chunk.data);
                }
                offset += chunk.data.len() as u64;
            }
            if let Some(f) = out {
                f.sync_data().expect("fsync");
                assert_eq!(hasher.finish(), digest);
            }
            assert_eq!(offset, bytes);
            let secs = t.elapsed().as_secs_f64();
            let _ = std::fs::remove_file(&sink);
            secs
        })
    };
    let (alone_disk, alone_mem) = (one_stream(true), one_stream(false));

    let sum = |text: &str, series: &str| value(text, series);
    eprintln!("job {id}: {:.0} s for 2 rounds; model file {bytes} bytes", wall.as_secs_f64());
    eprintln!("coordinator peak RSS {:.0} MB", coordinator_rss as f64 / 1e6);
    let ctext = scrape(&ops);
    for line in ctext.lines().filter(|l| l.starts_with("maeum_coordinator_stage_seconds_sum")) {
        eprintln!("{line}");
    }
    eprintln!(
        "raw TCP copy on loopback: file to file {:.2} s ({:.0} MB/s), memory to memory {:.2} s ({:.0} MB/s)",
        raw_disk,
        bytes as f64 / raw_disk / 1e6,
        raw_mem,
        bytes as f64 / raw_mem / 1e6
    );
    eprintln!(
        "one download alone over mTLS: into a file with the site's checks {:.2} s ({:.0} MB/s, {:.2}× the raw file \
         copy), transport alone {:.2} s ({:.0} MB/s, {:.2}× the raw memory copy)",
        alone_disk,
        bytes as f64 / alone_disk / 1e6,
        raw_disk / alone_disk,
        alone_mem,
        bytes as f64 / alone_mem / 1e6,
        raw_mem / alone_mem
    );
    for (s, (text, rss)) in sites.iter().zip(&site_metrics) {
        let (dn, dc) = (
            sum(text, "maeum_site_stage_seconds_sum{stage=\"download\"}"),
            sum(text, "maeum_site_stage_seconds_count{stage=\"download\"}"),
        );
        let (un, uc) = (
            sum(text, "maeum_site_stage_seconds_sum{stage=\"upload\"}"),
            sum(text, "maeum_site_stage_seconds_count{stage=\"upload\"}"),
        );
        let (tn, tc) = (
            sum(text, "maeum_site_stage_seconds_sum{stage=\"train\"}"),
            sum(text, "maeum_site_stage_seconds_count{stage=\"train\"}"),
        );
        eprintln!(
            "{s}: peak RSS {:.0} MB; {dc} downloads {:.2} s each ({:.0} MB/s, {:.2}× the raw file copy); \
             {uc} uploads {:.2} s each ({:.0} MB/s); {tc} trainings {:.2} s each",
            *rss as f64 / 1e6,
            dn / dc,
            bytes as f64 * dc / dn / 1e6,
            raw_disk / (dn / dc),
            un / uc,
            bytes as f64 * uc / un / 1e6,
            tn / tc
        );
    }
}

/// CPU seconds a live process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Issue 20's fleet simulator: N real site daemons (processes, each with its own
/// identity, key, home and mTLS connection) on an adapter stand-in of M parameters,
/// whose training is one pass over the vector, so that the coordinator's side of a
/// round is what is measured. Every pair masks up to 50 sites; beyond, SecAgg+ with 8
/// neighbours. Set the size with `MAEUM_FLEET_N` (default 10), `MAEUM_FLEET_M` (default
/// 10,000,000) and `MAEUM_FLEET_MODE` (`secagg`, the default, or `plain`):
///
/// ```sh
/// MAEUM_TRIALS=1 MAEUM_FLEET_N=50 cargo test -p maeum-e2e --test trials trial_fleet -- --nocapture
/// ```
#[test]
fn trial_fleet_of_stand_in_sites() {
    if !enabled("trial_fleet_of_stand_in_sites") {
        return;
    }
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (n, m) = (env("MAEUM_FLEET_N", 10), env("MAEUM_FLEET_M", 10_000_000));
    let plain = std::env::var("MAEUM_FLEET_MODE").is_ok_and(|v| v == "plain");
    let mut fed = Federation::new(n);
    // N sites' masking shares 2 cores here, not one machine each: a site starved for
    // seconds is not offline.
    fed.heartbeat_timeout = 60;
    let sites: Vec<String> = (1..=n).map(|i| format!("site-{i}")).collect();
    for s in &sites {
        fed.set_policy(s, "allowed_models", "[\"adapter-stand-in\"]");
        fed.set_policy(s, "max_params", "268435456");
        if plain {
            fed.set_policy(s, "allow_plaintext", "true");
        }
    }
    let ops = free_port();
    // As the deploy files run it (deploy/systemd/maeum-coordinator.service).
    fed.start_coordinator_with(&[("MAEUM_OPS_LISTEN", ops.as_str()), ("MALLOC_ARENA_MAX", "2")]);
    fed.start_sites(&sites.iter().map(String::as_str).collect::<Vec<_>>());
    fed.wait_online(n);
    let aggregation = if plain {
        "insecure_plaintext_aggregation_for_debugging = true\n".to_string()
    } else if n > 50 {
        "neighbours = 8\n".to_string()
    } else {
        String::new()
    };
    let job = format!(
        "[model]\nkind = \"adapter-stand-in\"\nparams = {m}\n[train]\nlearning_rate = 0.5\n\
         [secure_aggregation]\nclip = 4.0\n{aggregation}[deadlines]\njoin = 600\ntrain = 3600\nsecagg = 3600\nevaluate = 3600\n"
    );
    let pid = fed.coordinator_pid().expect("coordinator");
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let id = fed.submit("fleet", 2, n, &job);
    let status = fed.wait_job(&id, Duration::from_secs(3 * 3600));
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    assert_eq!(status["state"], "completed", "{status:#}\n{}", fed.log_text("coordinator"));
    for r in status["history"].as_array().expect("history") {
        assert_eq!(r["contributors"].as_array().map(Vec::len), Some(n), "a site dropped out: {r:#}");
        assert_eq!(r["secure_aggregation"], !plain, "{r:#}");
    }
    let rss = peak_rss(pid).unwrap_or_default() as f64 / 1e6;
    let site_rss: Vec<f64> =
        sites.iter().filter_map(|s| fed.site_pid(s)).filter_map(peak_rss).map(|b| b as f64 / 1e6).collect();
    let text = scrape(&ops);
    let model_mb = (m + fed.labels.len()) as f64 * 4.0 / 1e6;
    eprintln!(
        "fleet N = {n}, M = {m} ({model_mb:.0} MB), {}: 2 rounds in {wall:.0} s; coordinator {cpu:.1} CPU-s, \
         peak RSS {rss:.0} MB = 2 x model + {:.0} MB",
        if plain {
            "plaintext"
        } else if n > 50 {
            "SecAgg+ k = 8"
        } else {
            "SecAgg, every pair"
        },
        rss - 2.0 * model_mb
    );
    for line in text.lines().filter(|l| l.starts_with("maeum_coordinator_stage_seconds_sum")) {
        eprintln!("{line}");
    }
    let sent = value(&text, "maeum_coordinator_sent_bytes_total");
    let received = value(&text, "maeum_coordinator_received_bytes_total");
    eprintln!(
        "per site: {:.0} MB sent to it, {:.0} MB received from it; site peak RSS max {:.0} MB, mean {:.0} MB",
        sent / n as f64 / 1e6,
        received / n as f64 / 1e6,
        site_rss.iter().copied().fold(0.0, f64::max),
        site_rss.iter().sum::<f64>() / site_rss.len().max(1) as f64
    );
}
