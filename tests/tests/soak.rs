//! The soak run (issue 20, "Long life"): one secure-aggregation job of many rounds on an
//! adapter stand-in, with sites killed and restarted at random throughout, and the
//! coordinator's and a site's resident memory, open file descriptors and disk use
//! sampled at every committed round. Asserts that memory and descriptors stay flat and
//! that disk grows by no more than the models the design keeps (one global model a
//! round at the coordinator; a bounded few at a site).
//!
//! Gated (a few minutes): `MAEUM_SOAK=1`; `MAEUM_SOAK_ROUNDS` sets the rounds (200).
//! In every CI run: the coordinator keeps the blobs of a job's latest rounds only
//! (`retention.round_blobs`), and what a release or a kept round names.
//!
//! ```sh
//! MAEUM_SOAK=1 cargo test -p maeum-e2e --test soak -- --nocapture
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use maeum_e2e::Federation;

const SITES: usize = 6;
const PARAMS: usize = 1 << 16;
/// Site-1 is never killed: its process is the one whose memory is sampled.
const STEADY: &str = "site-1";

/// Bytes under `dir` (files only; a missing directory is 0).
fn disk(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

fn files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

/// Resident memory now (`VmRSS`), bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1));
    kb.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
}

fn fds(pid: u32) -> usize {
    files(Path::new(&format!("/proc/{pid}/fd")))
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    round: u64,
    coordinator_rss: u64,
    coordinator_fds: usize,
    site_rss: u64,
    site_fds: usize,
    blobs: u64,
    state: u64,
    uploads: u64,
    site_models: u64,
    site_work: u64,
    site_total: u64,
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// A cheap xorshift: which site to kill, and when, differs run to run only by seed.
struct Churn(u64);

impl Churn {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn soak_rounds_with_site_churn_keep_memory_descriptors_and_disk_flat() {
    if std::env::var("MAEUM_SOAK").map_or(true, |v| v != "1") {
        eprintln!("soak: run it with MAEUM_SOAK=1 (see the file's header)");
        return;
    }
    let rounds: u64 = std::env::var("MAEUM_SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mut fed = Federation::new(SITES);
    fed.heartbeat_timeout = 10;
    let sites: Vec<String> = (1..=SITES).map(|i| format!("site-{i}")).collect();
    for s in &sites {
        fed.set_policy(s, "allowed_models", "[\"adapter-stand-in\"]");
    }
    fed.start_coordinator_with(&[("MALLOC_ARENA_MAX", "2")]);
    fed.start_sites(&sites.iter().map(String::as_str).collect::<Vec<_>>());
    fed.wait_online(SITES);
    let job = format!(
        "[model]\nkind = \"adapter-stand-in\"\nparams = {PARAMS}\n[train]\nlearning_rate = 0.1\n\
         [secure_aggregation]\nclip = 4.0\n[deadlines]\nsecagg = 30\ntrain = 60\n"
    );
    let id = fed.submit("soak", u32::try_from(rounds).expect("rounds"), 3, &job);
    let coordinator = fed.coordinator_pid().expect("coordinator");
    let (home, site_home) = (fed.coordinator_home(), fed.site_home(STEADY));
    let mut churn = Churn(0x9e37_79b9_7f4a_7c15);
    let (mut samples, mut kills, mut down): (Vec<Sample>, u32, Vec<(String, Instant)>) = (Vec::new(), 0, Vec::new());
    let mut next_kill = Instant::now() + Duration::from_secs(5);
    let started = Instant::now();
    let limit = Duration::from_secs(rounds * 20 + 600);
    let status = loop {
        assert!(started.elapsed() < limit, "the soak did not finish within {limit:?}\n{}", fed.log_text("coordinator"));
        // Churn: one of site-2..N down at a time, back 2–6 s later, the next 2–9 s after.
        if down.is_empty() && Instant::now() >= next_kill {
            let victim = format!("site-{}", 2 + churn.next(SITES as u64 - 1));
            fed.kill_site(&victim);
            kills += 1;
            down.push((victim, Instant::now() + Duration::from_secs(2 + churn.next(5))));
        }
        if let Some((s, back)) = down.first().cloned()
            && Instant::now() >= back
        {
            fed.start_site(&s);
            down.clear();
            next_kill = Instant::now() + Duration::from_secs(2 + churn.next(8));
        }
        let status = fed.job(&id);
        let done = status["completed_rounds"].as_u64().unwrap_or(0);
        if samples.last().map_or(0, |s: &Sample| s.round) < done {
            let site = fed.site_pid(STEADY).expect("site-1 runs throughout");
            samples.push(Sample {
                round: done,
                coordinator_rss: rss(coordinator),
                coordinator_fds: fds(coordinator),
                site_rss: rss(site),
                site_fds: fds(site),
                blobs: disk(&home.join("blobs")),
                state: disk(&home.join("state")),
                uploads: disk(&home.join("uploads")),
                site_models: disk(&site_home.join("models")),
                site_work: disk(&site_home.join("work")),
                site_total: disk(&site_home),
            });
        }
        if !matches!(status["state"].as_str(), Some("pending" | "running")) {
            break status;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(status["state"], "completed", "{status:#}\n{}", fed.log_text("coordinator"));
    assert_eq!(fed.coordinator_pid(), Some(coordinator), "the coordinator never restarted");

    let model = (PARAMS + fed.labels.len()) as u64 * 4;
    let record = serde_json::to_vec(&status).map_or(0, |v| v.len());
    eprintln!("the job's status (its record and latest rounds of {rounds}): {record} bytes of JSON");
    eprintln!(
        "soak: {rounds} rounds in {wall:.0} s ({:.1} s a round), {kills} site kills; model {model} B",
        wall / rounds as f64
    );
    eprintln!(
        "round  coord RSS MB  fds  site RSS MB  fds  blobs MB  state MB  uploads KB  site models MB  work KB  site MB"
    );
    let every = (samples.len() / 10).max(1);
    let shown = samples.iter().enumerate().filter(|(i, _)| i % every == 0 || *i + 1 == samples.len());
    for (_, s) in shown {
        eprintln!(
            "{:>5}  {:>12.1}  {:>3}  {:>11.1}  {:>3}  {:>8.1}  {:>8.1}  {:>10.0}  {:>14.1}  {:>7.0}  {:>7.1}",
            s.round,
            s.coordinator_rss as f64 / 1e6,
            s.coordinator_fds,
            s.site_rss as f64 / 1e6,
            s.site_fds,
            s.blobs as f64 / 1e6,
            s.state as f64 / 1e6,
            s.uploads as f64 / 1e3,
            s.site_models as f64 / 1e6,
            s.site_work as f64 / 1e3,
            s.site_total as f64 / 1e6,
        );
    }
    // Flat: the last fifth against the second fifth (the first warms caches and pools).
    let fifth = (samples.len() / 5).max(1);
    let (early, late) = (&samples[fifth..2 * fifth], &samples[samples.len() - fifth..]);
    let med = |part: &[Sample], f: fn(&Sample) -> u64| median(part.iter().map(f).collect());
    let max = |part: &[Sample], f: fn(&Sample) -> usize| part.iter().map(f).max().unwrap_or(0);
    let grew = |what: &str, early: u64, late: u64, slack: u64| {
        eprintln!("{what}: {early} -> {late}");
        assert!(late <= early + early / 4 + slack, "{what} grew from {early} to {late}");
    };
    grew(
        "coordinator RSS (median, bytes)",
        med(early, |s| s.coordinator_rss),
        med(late, |s| s.coordinator_rss),
        16 << 20,
    );
    grew("site RSS (median, bytes)", med(early, |s| s.site_rss), med(late, |s| s.site_rss), 16 << 20);
    grew("coordinator fds (max)", max(early, |s| s.coordinator_fds) as u64, max(late, |s| s.coordinator_fds) as u64, 8);
    grew("site fds (max)", max(early, |s| s.site_fds) as u64, max(late, |s| s.site_fds) as u64, 8);
    // Disk: a site keeps a bounded set of models; the coordinator one a round, and
    // nothing in uploads/ once the job is over.
    grew(
        "site models/ (max, bytes)",
        early.iter().map(|s| s.site_models).max().unwrap_or(0),
        late.iter().map(|s| s.site_models).max().unwrap_or(0),
        4 * model,
    );
    grew(
        "site work/ (max, bytes)",
        early.iter().map(|s| s.site_work).max().unwrap_or(0),
        late.iter().map(|s| s.site_work).max().unwrap_or(0),
        4 * model,
    );
    let (first, last) = (samples[0], samples[samples.len() - 1]);
    let per_round = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / (last.round - first.round).max(1) as f64;
    let blobs_per_round = per_round(first.blobs, last.blobs);
    let state_per_round = per_round(first.state, last.state);
    eprintln!(
        "coordinator blobs/: {blobs_per_round:.0} B a round (model {model} B); state/: {state_per_round:.0} B a round"
    );
    assert!(blobs_per_round <= 2.5 * model as f64, "blobs/ grows {blobs_per_round:.0} B a round");
    assert!(state_per_round <= 512.0 * 1024.0, "state/ grows {state_per_round:.0} B a round");
    assert_eq!(
        files(&home.join("uploads")),
        0,
        "uploads/ is empty after the job: {:?}",
        std::fs::read_dir(home.join("uploads")).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
}

/// Every CI run: with `retention.round_blobs = 2`, a 6-round job leaves the blobs of
/// rounds 5 and 6 (model and aggregate), the initial model and the released one; the
/// older rounds' blobs are gone, their digests still in the history, and the release
/// still exports.
#[test]
fn the_coordinator_keeps_the_blobs_of_a_jobs_latest_rounds_only() {
    let mut fed = Federation::new(3);
    let sites = ["site-1", "site-2", "site-3"];
    for s in sites {
        fed.set_policy(s, "allowed_models", "[\"adapter-stand-in\"]");
    }
    let path = fed.coordinator_home().join("consortium.json");
    let mut consortium: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("consortium.json")).expect("json");
    consortium["retention"] = serde_json::json!({ "round_blobs": 2 });
    std::fs::write(&path, serde_json::to_vec_pretty(&consortium).expect("json")).expect("consortium.json");
    fed.start_coordinator();
    fed.start_sites(&sites);
    fed.wait_online(3);
    let job = "[model]\nkind = \"adapter-stand-in\"\nparams = 4096\n[train]\nlearning_rate = 0.5\n\
               [secure_aggregation]\nclip = 4.0\n";
    let id = fed.submit("retention", 6, 3, job);
    let status = fed.wait_job(&id, Duration::from_secs(180));
    assert_eq!(status["state"], "completed", "{status:#}\n{}", fed.log_text("coordinator"));
    let blobs = fed.coordinator_home().join("blobs");
    let held = |digest: &serde_json::Value| blobs.join(digest.as_str().expect("a digest")).is_file();
    let history = status["history"].as_array().expect("history");
    assert_eq!(history.len(), 6);
    for r in history {
        let kept = r["round"].as_u64() >= Some(5);
        assert_eq!(held(&r["model"]), kept, "round {} model: {r:#}", r["round"]);
        assert_eq!(held(&r["aggregate_sha256"]), kept, "round {} aggregate: {r:#}", r["round"]);
    }
    let out = fed.dir.path().join("export");
    let export = fed.cli(&["models", "export", "1", "--out", out.to_str().expect("utf-8")]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let log = fed.log_text("coordinator");
    assert!(log.contains("removed the blobs of rounds outside the retention window"), "{log}");
}
