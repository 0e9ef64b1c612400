//! Secure aggregation end to end: real processes, mTLS, the real corpus.
//!
//! Sites keep their own quantised input (MAEUM_SITE_DEBUG_KEEP_PLAIN_INPUT, on their
//! own disk) so the test can check that the coordinator's unmasked aggregate is exactly
//! the plain sum over the round's survivors, and that no site's input appears anywhere
//! in what the coordinator stores.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use maeum_e2e::{Federation, SMALL_MODEL, wait_log};

const MIN: Duration = Duration::from_secs(60);
const KEEP: (&str, &str) = ("MAEUM_SITE_DEBUG_KEEP_PLAIN_INPUT", "1");

fn strs(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

fn words(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect()
}

/// The plain input `site` kept for `job` round `round` (the last training attempt it
/// took part in: a final evaluation, which runs under the last round's number, holds
/// no parameters and is left out).
fn plain_input(fed: &Federation, site: &str, job: &str, round: u64) -> PathBuf {
    let dir = fed.site_home(site).join("debug");
    let prefix = format!("{job}-r{round}-a");
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let attempt = name.strip_prefix(&prefix)?.strip_suffix(".plain-input")?.parse().ok()?;
            let evaluation_only = e.metadata().ok()?.len() as usize == 4 * (1 + evaluation_words(fed));
            (!evaluation_only).then(|| (attempt, e.path()))
        })
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("{site} kept no input for {job} round {round}")).1
}

/// Words of secure evaluation after the weight word (`JobSpec::evaluation_words`).
fn evaluation_words(fed: &Federation) -> usize {
    let l = fed.labels.len();
    let crisis = fed.labels.iter().any(|x| maeum_tlog::release::is_crisis_label(x));
    l * l + if crisis { 200 } else { 0 }
}

/// The confusion rows `site` kept for the model it evaluated in `job` round `round`
/// attempt `attempt` (HOME/evaluations.jsonl: its own counts, never sent in plaintext).
fn kept_confusion(fed: &Federation, site: &str, job: &str, round: u64, attempt: u64) -> Vec<u64> {
    let text = std::fs::read_to_string(fed.site_home(site).join("evaluations.jsonl")).expect("evaluations.jsonl");
    let line = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["job_id"] == job && v["round"].as_u64() == Some(round) && v["attempt"].as_u64() == Some(attempt))
        .unwrap_or_else(|| panic!("{site} kept no evaluation of {job} round {round} attempt {attempt}:\n{text}"));
    line["confusion"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| r.as_array().expect("row").clone())
        .map(|c| c.as_u64().expect("count"))
        .collect()
}

/// Checks every round: the aggregate blob equals the wrapping sum of the contributors'
/// plain inputs, its weight word is the round's Σw, and its evaluation words are
/// exactly the sum of the confusion counts each contributor kept for itself (secure
/// evaluation: the coordinator's metrics are those of the plaintext counts).
fn check_exact_sums(fed: &Federation, job: &serde_json::Value) {
    let id = job["job_id"].as_str().expect("id");
    for r in job["history"].as_array().expect("history") {
        let round = r["round"].as_u64().expect("round");
        assert_eq!(r["secure_aggregation"], true, "{r:#}");
        let digest = r["aggregate_sha256"].as_str().expect("aggregate");
        let aggregate = words(&fed.coordinator_home().join("blobs").join(digest));
        let mut sum = vec![0u32; aggregate.len()];
        for site in strs(&r["contributors"]) {
            let input = words(&plain_input(fed, &site, id, round));
            assert_eq!(input.len(), sum.len(), "{site} round {round}");
            sum.iter_mut().zip(&input).for_each(|(s, x)| *s = s.wrapping_add(*x));
        }
        assert!(sum == aggregate, "round {round}: the unmasked aggregate is not the survivors' plain sum");
        let e = evaluation_words(fed);
        let weight_at = aggregate.len() - 1 - e;
        assert_eq!(
            u64::from(aggregate[weight_at]),
            r["total_weight"].as_u64().expect("weight"),
            "the word after the parameters is the summed weight"
        );
        let contributors = strs(&r["contributors"]);
        let attempt = attempt_of(fed, &contributors[0], id, round);
        let l = fed.labels.len();
        let mut confusion = vec![0u64; l * l];
        for site in strs(&r["contributors"]) {
            let kept = kept_confusion(fed, &site, id, round, attempt);
            confusion.iter_mut().zip(&kept).for_each(|(s, x)| *s += x);
        }
        let summed: Vec<u64> = aggregate[weight_at + 1..weight_at + 1 + l * l].iter().map(|&w| u64::from(w)).collect();
        assert_eq!(summed, confusion, "round {round}: the secure evaluation is not the sum of the sites' own counts");
    }
}

/// The attempt of round `round` of `job` whose input `site` (a contributor) kept last:
/// the committed one.
fn attempt_of(fed: &Federation, site: &str, job: &str, round: u64) -> u64 {
    let input = plain_input(fed, site, job, round);
    let name = input.file_name().expect("name").to_string_lossy().into_owned();
    name.strip_prefix(&format!("{job}-r{round}-a"))
        .and_then(|s| s.strip_suffix(".plain-input"))
        .and_then(|a| a.parse().ok())
        .expect("attempt in the file name")
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { files_under(&p, out) } else { out.push(p) }
    }
}

/// No 32-byte window of any site's plain input (taken where the input is busy) occurs
/// in any file the coordinator keeps, its logs included.
fn check_inputs_not_stored(fed: &Federation, job: &serde_json::Value) {
    let id = job["job_id"].as_str().expect("id");
    let mut stored = Vec::new();
    files_under(&fed.coordinator_home(), &mut stored);
    stored.push(fed.dir.path().join("coordinator.log"));
    let haystacks: Vec<Vec<u8>> = stored.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    let mut probes = 0;
    for r in job["history"].as_array().expect("history") {
        let round = r["round"].as_u64().expect("round");
        for site in strs(&r["contributors"]) {
            let bytes = std::fs::read(plain_input(fed, &site, id, round)).expect("input");
            // Windows whose words are mostly non-zero (sparse updates have long runs of 0).
            for start in (0..bytes.len().saturating_sub(32)).step_by(4096) {
                let w = &bytes[start..start + 32];
                if w.chunks_exact(4).filter(|c| c.iter().any(|b| *b != 0)).count() < 6 {
                    continue;
                }
                probes += 1;
                for (h, p) in haystacks.iter().zip(&stored) {
                    assert!(!h.windows(32).any(|x| x == w), "{site}'s round-{round} input occurs in {}", p.display());
                }
                if probes % 8 == 0 {
                    break;
                }
            }
        }
    }
    assert!(probes > 0, "no busy window to probe");
}

/// One site is SIGKILLed in each of the five stages, one stage per round; with 5 sites
/// and the default threshold 4 every round still completes with the exact sum over its
/// survivors.
#[test]
fn sites_killed_in_each_stage_leave_the_exact_survivor_sum() {
    let mut fed = Federation::new(5);
    fed.start_coordinator();
    let plan = ["advertise", "share", "masked-input", "consistency", "unmask"];
    for (i, stage) in plan.iter().enumerate() {
        let site = format!("site-{}", i + 1);
        let stall = format!("{stage}@{}", i + 1);
        fed.start_site_with(&site, &[KEEP, ("MAEUM_SITE_TEST_STALL_AT", &stall)]);
    }
    fed.wait_online(5);
    let id = fed.submit("secagg-kills", 5, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 30\n"));
    for (i, stage) in plan.iter().enumerate() {
        let site = format!("site-{}", i + 1);
        wait_log(&fed, &site, "test hook: stalling", 1, 3 * MIN);
        fed.kill_site(&site);
        // Back once the coordinator has noticed the silence and dropped it.
        wait_log(&fed, "coordinator", "dropped from the round", i + 1, MIN);
        fed.start_site_with(&site, &[KEEP]);
        let round = (i + 1) as u64;
        fed.wait_for(&id, 2 * MIN, |j| j["completed_rounds"].as_u64().is_some_and(|n| n >= round));
        eprintln!("round {round}: {site} killed in the {stage} stage");
    }
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    assert_eq!(job["secure_aggregation"], true);
    let history = job["history"].as_array().expect("history");
    assert_eq!(history.len(), 5);
    // Killed before its masked input was complete: left out of the sum. Killed after:
    // its input is in the sum, and the others' shares unmask it.
    // (A site killed in round r may still be restarting when round r+1 selects its
    // sites, so later rounds can have 4 parties; the threshold follows.)
    for (i, r) in history.iter().enumerate() {
        let site = format!("site-{}", i + 1);
        let contributors = strs(&r["contributors"]);
        let dropped = strs(&r["dropped"]);
        let n = contributors.len() + dropped.len();
        if i < 3 {
            assert!(dropped.contains(&site) && !contributors.contains(&site), "round {}: {r:#}", i + 1);
        } else {
            assert!(contributors.contains(&site), "round {}: {r:#}", i + 1);
        }
        assert_eq!(r["secagg_threshold"].as_u64(), Some((2 * n as u64) / 3 + 1), "round {}: {r:#}", i + 1);
    }
    assert_eq!(strs(&history[0]["contributors"]).len(), 4, "all five took part in round 1");
    check_exact_sums(&fed, &job);
    check_inputs_not_stored(&fed, &job);
}

/// A site killed just after its masked input and restarted at once is online again,
/// so only its stage's deadline used to end the wait for it (issue 20: 60 s stalls).
/// Its new agent instance now tells the coordinator it lost its part: the unmask stage
/// closes with the others' shares, long before the 300 s deadline.
#[test]
fn a_site_restarted_mid_session_is_dropped_at_once() {
    let mut fed = Federation::new(4);
    fed.start_coordinator();
    for i in 1..=3 {
        fed.start_site_with(&format!("site-{i}"), &[KEEP]);
    }
    fed.start_site_with("site-4", &[KEEP, ("MAEUM_SITE_TEST_STALL_AT", "unmask@1")]);
    fed.wait_online(4);
    let id = fed.submit("restart", 1, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 300\n"));
    wait_log(&fed, "site-4", "test hook: stalling", 1, 2 * MIN);
    fed.kill_site("site-4");
    let restarted = Instant::now();
    fed.start_site_with("site-4", &[KEEP]);
    let job = fed.wait_job(&id, 2 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    assert!(restarted.elapsed() < Duration::from_secs(120), "waited {:?} for the restarted site", restarted.elapsed());
    let coordinator = fed.log_text("coordinator");
    assert!(coordinator.contains("site restarted mid-session; dropped from the round"), "{coordinator}");
    let r = &job["history"][0];
    // Its masked input was in: it counts, and the others' shares unmask it.
    assert!(strs(&r["contributors"]).contains(&"site-4".to_string()), "{r:#}");
    check_exact_sums(&fed, &job);
}

/// SecAgg+ end to end: with `neighbours = 2` every site masks with two neighbours of a
/// graph whose seed all five sites draw together after the key roster (commit in the
/// signed keys, reveal after: SA-13), and the sum is still exactly the survivors' plain
/// sum with the secure evaluation in it.
#[test]
fn secagg_plus_draws_its_graph_from_every_site_and_sums_exactly() {
    let mut fed = Federation::new(5);
    fed.start_coordinator();
    for i in 1..=5 {
        fed.start_site_with(&format!("site-{i}"), &[KEEP]);
    }
    fed.wait_online(5);
    let extra = format!("{SMALL_MODEL}[secure_aggregation]\nneighbours = 2\n[deadlines]\nsecagg = 30\n");
    let id = fed.submit("secagg-plus", 2, 3, &extra);
    let job = fed.wait_job(&id, 4 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));
    for r in job["history"].as_array().expect("history") {
        // A neighbourhood of 3 (the site and its 2 neighbours): t = 3.
        assert_eq!(r["secagg_threshold"].as_u64(), Some(3), "{r:#}");
        assert_eq!(strs(&r["contributors"]).len(), 5, "{r:#}");
    }
    check_exact_sums(&fed, &job);
    check_inputs_not_stored(&fed, &job);
    let log = fed.log_text("coordinator");
    assert!(log.contains("reveal graph nonce"), "the graph-nonce stage never closed:\n{log}");
}

/// Reveal once per round, with the coordinator SIGKILLed after sites revealed: site-4
/// sends its shares 15 s late, so the unmask stage is open with the other three sites'
/// shares in (and stored: the coordinator writes the session down before it hands out
/// the survivor proof, and each revealed message before it answers). The restarted
/// coordinator restores the session, takes site-4's shares when they come, and commits
/// round 1 from that same attempt: one attempt, the exact sum, no site refusing.
/// (Before, a restarted coordinator retried the round with a new attempt.)
#[test]
fn a_coordinator_killed_after_the_reveal_commits_that_attempt() {
    let mut fed = Federation::new(4);
    fed.start_coordinator();
    for site in ["site-1", "site-2", "site-3"] {
        fed.start_site_with(site, &[KEEP]);
    }
    fed.start_site_with("site-4", &[KEEP, ("MAEUM_SITE_TEST_LATE_UNMASK", "15000@1")]);
    fed.wait_online(4);
    let id = fed.submit("reveal-kill", 2, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 60\n"));
    let stored = fed.coordinator_home().join("secagg-resume/unmasks.log");
    let until = Instant::now() + 3 * MIN;
    while std::fs::read_to_string(&stored).unwrap_or_default().lines().count() < 3 {
        assert!(Instant::now() < until, "three revealed messages were never stored:\n{}", fed.log_text("coordinator"));
        std::thread::sleep(Duration::from_millis(50));
    }
    fed.kill_coordinator();
    fed.start_coordinator();
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    let round1 = &job["history"][0];
    assert_eq!(round1["attempts"], 1, "round 1 was retried: {round1:#}");
    assert_eq!(strs(&round1["contributors"]).len(), 4, "{round1:#}");
    check_exact_sums(&fed, &job);
    let log = fed.log_text("coordinator");
    assert!(log.contains("restarted in the unmask stage of a revealed attempt"), "{log}");
    for site in ["site-1", "site-2", "site-3", "site-4"] {
        assert!(!fed.log_text(site).contains("reveal_once"), "{site} refused:\n{}", fed.log_text(site));
    }
    assert!(!fed.coordinator_home().join("secagg-resume").exists(), "the stored session outlived its round");
}

/// Below the threshold the attempt fails cleanly (SA-05) and the round is retried with a
/// new session once enough sites are back.
#[test]
fn below_the_threshold_the_round_is_retried_with_a_new_session() {
    let mut fed = Federation::new(3);
    fed.start_coordinator();
    fed.start_site_with("site-1", &[KEEP]);
    fed.start_site_with("site-2", &[KEEP]);
    fed.start_site_with("site-3", &[KEEP, ("MAEUM_SITE_TEST_STALL_AT", "masked-input@1")]);
    fed.wait_online(3);
    let id = fed.submit("secagg-threshold", 2, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 30\n"));
    wait_log(&fed, "site-3", "test hook: stalling", 1, 3 * MIN);
    fed.kill_site("site-3");
    wait_log(&fed, "coordinator", "SA-05", 1, MIN);
    fed.start_site_with("site-3", &[KEEP]);
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    let first = &job["history"][0];
    assert!(first["attempts"].as_u64().is_some_and(|a| a >= 2), "{first:#}");
    assert_eq!(strs(&first["contributors"]).len(), 3, "{first:#}");
    let log = fed.log_text("coordinator");
    assert!(log.contains("retrying the round with a new session"), "{log}");
    check_exact_sums(&fed, &job);
}

/// A site that restarts in the middle of a round, before the coordinator notices it was
/// gone, comes back without the session's keys (they live only in memory): its first
/// call carries a new agent instance, so it is dropped from that attempt at once and
/// the round is retried with a new session, instead of stalling until the 10-minute
/// training deadline. (The heartbeat timeout is long here so that only this path can
/// end the stall. A restarted site that advertises keys for a session it had joined is
/// refused as well, `SecAggRound`'s own check, should its status come second.)
#[test]
fn a_site_restarted_mid_round_is_dropped_at_once_and_the_round_retried() {
    let mut fed = Federation::new(3);
    fed.heartbeat_timeout = 120;
    fed.start_coordinator();
    fed.start_site_with("site-1", &[KEEP]);
    fed.start_site_with("site-2", &[KEEP]);
    fed.start_site_with("site-3", &[KEEP, ("MAEUM_SITE_TEST_STALL_AT", "masked-input@1")]);
    fed.wait_online(3);
    // Default deadlines: the masked-input stage waits up to the 600 s training deadline.
    let id = fed.submit("secagg-restart", 1, 3, SMALL_MODEL);
    wait_log(&fed, "site-3", "test hook: stalling", 1, 3 * MIN);
    fed.kill_site("site-3");
    fed.start_site_with("site-3", &[KEEP]);
    wait_log(&fed, "coordinator", "site restarted mid-session; dropped from the round", 1, MIN);
    let job = fed.wait_job(&id, 2 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    let first = &job["history"][0];
    assert!(first["attempts"].as_u64().is_some_and(|a| a >= 2), "{first:#}");
    assert_eq!(strs(&first["contributors"]).len(), 3, "all three in the retried attempt: {first:#}");
    check_exact_sums(&fed, &job);
}

/// Issue 22: a survivor that sends its unmask shares after the coordinator closed the
/// stage without them (it missed the deadline; the others' shares were enough) is
/// answered `Done` by the coordinator, which remembers the closed session; the site
/// no longer reads an error message's wording to decide that.
#[test]
fn late_unmask_shares_for_a_closed_session_are_answered_done() {
    let mut fed = Federation::new(4);
    fed.start_coordinator();
    for site in ["site-1", "site-2", "site-3"] {
        fed.start_site_with(site, &[KEEP]);
    }
    fed.start_site_with("site-4", &[KEEP, ("MAEUM_SITE_TEST_LATE_UNMASK", "8000@1")]);
    fed.wait_online(4);
    let id = fed.submit("late-unmask", 2, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 3\n"));
    wait_log(&fed, "site-4", "test hook: sending the unmask shares late", 1, 3 * MIN);
    wait_log(&fed, "coordinator", "late unmask shares for a closed session: answered done", 1, MIN);
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    let log = fed.log_text("site-4");
    let after = &log[log.find("sending the unmask shares late").unwrap_or(0)..];
    assert!(!after.contains("work item failed"), "site-4 treated the closed session as a failure:\n{after}");
    // Its masked input was in round 1's sum (it was a survivor; the others' shares
    // unmasked it). Round 2 may run while it still waits (then it is dropped there).
    let round1 = &job["history"][0];
    assert!(round1["contributors"].as_array().is_some_and(|c| c.iter().any(|s| s == "site-4")), "{job:#}");
}
