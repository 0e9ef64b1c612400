//! The coordinator as the adversary: each test runs a real federation (processes, mTLS,
//! the real corpus) whose coordinator plays one attack from issue 16 through the
//! `fault-injection` feature (`coordinator/src/attack.rs`), and asserts what the honest
//! sites do about it: they refuse with the rule's name, reveal nothing that would
//! unmask their input, and the coordinator ends up holding no sum over fewer sites than
//! their floor. `docs/protocols/threat-model.md` lists each attack with its test.
//!
//! Where a site's `[policy]` can switch the defence off, the same test also runs the
//! attack against a site that did so, to show that the attack is real.

use std::time::{Duration, Instant};

use maeum_e2e::{Federation, SMALL_MODEL};
use maeum_tlog::{Event, export::Export};

const MIN: Duration = Duration::from_secs(60);

/// Every event in the coordinator's audit log.
fn events(fed: &Federation) -> Vec<Event> {
    let to = fed.dir.path().join("audit-export.json");
    let out = fed.cli(&["audit", "export", "--out", to.to_str().unwrap_or_default()]);
    assert!(
        out.status.success(),
        "export: {}\n--- coordinator log\n{}",
        String::from_utf8_lossy(&out.stderr),
        fed.log_text("coordinator")
    );
    Export::decode(&std::fs::read(&to).expect("export file"))
        .expect("export decodes")
        .entries
        .into_iter()
        .map(|e| e.event)
        .collect()
}

/// The `site_refused` entries as (site, rule).
fn refusals(fed: &Federation) -> Vec<(String, String)> {
    events(fed)
        .into_iter()
        .filter_map(|e| match e {
            Event::SiteRefused { site, rule, .. } => Some((site, rule)),
            _ => None,
        })
        .collect()
}

/// Polls the audit log until `cond` holds; panics after `timeout`.
fn wait_events(fed: &Federation, timeout: Duration, what: &str, cond: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let until = Instant::now() + timeout;
    loop {
        let all = events(fed);
        if cond(&all) {
            return all;
        }
        assert!(
            Instant::now() < until,
            "{what}: not seen in {timeout:?}\n--- events\n{all:#?}\n--- coordinator log\n{}",
            fed.log_text("coordinator")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Sums the coordinator unmasked: (round, attempt, survivors).
fn unmasked(all: &[Event]) -> Vec<(u32, u32, Vec<String>)> {
    all.iter()
        .filter_map(|e| match e {
            Event::RoundSecagg { round, attempt, survivors, .. } => Some((*round, *attempt, survivors.clone())),
            _ => None,
        })
        .collect()
}

fn decision<'a>(job: &'a serde_json::Value, site: &str) -> &'a serde_json::Value {
    job["decisions"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["site"] == site))
        .unwrap_or_else(|| panic!("no decision of {site}: {job:#}"))
}

fn journal(fed: &Federation, site: &str) -> String {
    std::fs::read_to_string(fed.site_home(site).join("audit/journal.jsonl")).unwrap_or_default()
}

/// Attack 1, downgrade: a job that turns secure aggregation off with min_sites = 1,
/// submitted as it is (the lead may), and a tampered offer of a secure job under the
/// logged hash. Default sites refuse both, naming the rule; a site that opted in to
/// plaintext takes the honest plaintext job (the downgrade is real where allowed).
#[test]
fn downgrade_to_plaintext_is_refused_by_the_sites_policy() {
    let mut fed = Federation::new(3);
    fed.set_policy("site-3", "allow_plaintext", "true");
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    let plain = format!("{SMALL_MODEL}[secure_aggregation]\ninsecure_plaintext_aggregation_for_debugging = true\n");
    let id = fed.submit("downgrade", 1, 1, &format!("{plain}[deadlines]\njoin = 10\n"));
    let job = fed.wait_for(&id, MIN, |j| j["decisions"].as_array().is_some_and(|d| d.len() == 3));
    for s in ["site-1", "site-2"] {
        let d = decision(&job, s);
        assert_eq!(d["accept"], false, "{s}: {job:#}");
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("[policy] allow_plaintext"), "{s} names the rule: {reason}");
    }
    assert_eq!(decision(&job, "site-3")["accept"], true, "the opted-in site takes the plaintext job: {job:#}");
    let job = fed.wait_job(&id, 3 * MIN);
    // Only the opted-in site's update was ever seen in plaintext.
    for r in job["history"].as_array().expect("history") {
        let contributors: Vec<&str> =
            r["contributors"].as_array().expect("contributors").iter().filter_map(|s| s.as_str()).collect();
        assert_eq!(contributors, ["site-3"], "{r:#}");
    }
    for s in ["site-1", "site-2"] {
        assert!(!journal(&fed, s).contains("\"secure\":false"), "{s} sent a plain update");
    }
}

#[test]
fn a_tampered_job_offer_is_refused_against_the_logged_hash() {
    let mut fed = Federation::new(3);
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "tamper-offer")]);
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    let id = fed.submit("tampered", 1, 3, &format!("{SMALL_MODEL}[deadlines]\njoin = 10\n"));
    let job = fed.wait_for(&id, MIN, |j| j["decisions"].as_array().is_some_and(|d| d.len() == 3));
    for d in job["decisions"].as_array().expect("decisions") {
        let s = &d["site"];
        assert_eq!(d["accept"], false, "{s}: {job:#}");
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("[policy] spec_hash"), "{s}: {reason}");
    }
}

/// The same lie under its own hash: the hash matches the file, but the audit log has
/// no `job_submitted` entry with it, and sites refuse before deciding. (Plaintext is
/// allowed here so that only the log check stands in the way.)
#[test]
fn an_offer_the_audit_log_does_not_show_is_refused() {
    let mut fed = Federation::new(3);
    for s in ["site-1", "site-2", "site-3"] {
        fed.set_policy(s, "allow_plaintext", "true");
    }
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "unlogged-offer")]);
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    let id = fed.submit("unlogged", 1, 3, &format!("{SMALL_MODEL}[deadlines]\njoin = 10\n"));
    let job = fed.wait_for(&id, MIN, |j| j["decisions"].as_array().is_some_and(|d| d.len() == 3));
    for d in job["decisions"].as_array().expect("decisions") {
        let s = &d["site"];
        assert_eq!(d["accept"], false, "{s}: {job:#}");
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("[policy] spec_hash") && reason.contains("no job_submitted entry"), "{s}: {reason}");
    }
}

/// Attack 2, isolation: the coordinator puts the target in a session of two (with a
/// sybil the lead could mint, the other input is known and the sum is the target's
/// update). The target refuses before advertising keys; a site that lowered its floor
/// to 2 is isolated, which is what the floor prevents.
#[test]
fn a_session_of_two_is_refused_before_any_key_is_advertised() {
    let mut fed = Federation::new(3);
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "isolate:site-1")]);
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    let id = fed.submit("isolate", 1, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 10\n"));
    let all = wait_events(&fed, 3 * MIN, "site-1 refuses the session of two", |all| {
        all.iter()
            .any(|e| matches!(e, Event::SiteRefused { site, rule, .. } if site == "site-1" && rule == "min_cohort"))
    });
    assert!(unmasked(&all).is_empty(), "a sum was unmasked: {:?}", unmasked(&all));
    assert!(!journal(&fed, "site-1").contains("\"kind\":\"contribution\""), "site-1 contributed");
    assert!(fed.log_text("site-1").contains("[policy] min_cohort"), "the site log names the rule");
    let status = fed.site_status("site-1");
    assert!(status["last_refusal"].as_str().is_some_and(|r| r.contains("min_cohort")), "{status:#}");
    let job = fed.job(&id);
    assert!(job["history"].as_array().is_some_and(|h| h.is_empty()), "no round committed: {job:#}");
    // The lead sees why in `jobs status`, not only a stage waiting for keys.
    assert!(
        job["refusals"].as_array().is_some_and(|r| r
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.starts_with("site-1 round 1") && r.contains("min_cohort")))),
        "{job:#}"
    );
}

#[test]
fn a_site_that_lowers_its_floor_to_two_can_be_isolated() {
    let mut fed = Federation::new(3);
    for s in ["site-1", "site-2", "site-3"] {
        fed.set_policy(s, "min_cohort", "2");
    }
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "isolate:site-1")]);
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    // min_sites = 2 as well: the sites check the survivor set against it too.
    fed.submit("isolate-weak", 1, 2, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 10\n"));
    let all = wait_events(&fed, 3 * MIN, "a two-site sum", |all| !unmasked(all).is_empty());
    let (_, _, survivors) = &unmasked(&all)[0];
    assert_eq!(survivors.len(), 2, "the attack works without the floor: {survivors:?}");
    assert!(survivors.contains(&"site-1".to_string()));
}

/// Sybils: the lead holds the CA key and can sign a certificate no `sites approve`
/// logged. Every site proves each member's certificate against the log before
/// advertising keys, and refuses (`roster`).
#[test]
fn a_member_whose_certificate_the_log_never_approved_is_refused() {
    let mut fed = Federation::new(3);
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "sybil:site-3")]);
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    fed.submit("sybil", 1, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 10\n"));
    let all = wait_events(&fed, 3 * MIN, "roster refusals", |all| {
        ["site-1", "site-2"].iter().all(|s| {
            all.iter().any(|e| matches!(e, Event::SiteRefused { site, rule, .. } if site == s && rule == "roster"))
        }) || !unmasked(all).is_empty()
    });
    assert!(unmasked(&all).is_empty(), "a sum was unmasked: {:?}", unmasked(&all));
    // What the honest sites proved: themselves, approved by site_approved entries.
    let out = std::process::Command::new(maeum_e2e::bin("maeum-site"))
        .args(["audit", "sites", "--json", "--home"])
        .arg(fed.site_home("site-1"))
        .output()
        .expect("maeum-site audit sites");
    let roster: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(roster["site-1"]["approved_by"], "site_approved", "{roster:#}");
    assert!(roster.get("site-3").is_none(), "the sybil certificate is not on the roster: {roster:#}");
}

/// Attack 3, differencing: after the round's sum over four sites is unmasked, the
/// coordinator pretends the attempt failed and retries without the target. The other
/// sites refuse to reveal for a second, different sum of the same round; the
/// coordinator then skips the round (it cannot get another sum of it), and the job
/// goes on.
#[test]
fn a_second_sum_of_the_same_round_is_never_unmasked() {
    second_sum_is_never_unmasked("");
}

/// The same attack on a `distributed` DP job, where it matters most: the difference of
/// two sums would be one site's words, which carry only that site's share of the noise
/// (a third of it here). The sites reveal once per round, so it never exists.
#[test]
fn a_distributed_dp_round_cannot_be_differenced_down_to_one_noise_share() {
    second_sum_is_never_unmasked(
        "[strategy]\nkind = \"fedadam\"\n[privacy]\nmode = \"distributed\"\nepsilon = 8.0\nsample_rate = 1.0\n",
    );
}

fn second_sum_is_never_unmasked(extra: &str) {
    let mut fed = Federation::new(4);
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "difference:site-4")]);
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4"]);
    fed.wait_online(4);
    let id = fed.submit("difference", 1, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 10\n{extra}"));
    // The attack's goal: a sum of round 1 over the three others, to subtract.
    let differenced =
        |all: &[Event]| unmasked(all).iter().any(|(r, _, s)| *r == 1 && !s.contains(&"site-4".to_string()));
    // Until the sites refuse, or the attack succeeds.
    let all = wait_events(&fed, 4 * MIN, "reveal_once refusals", |all| {
        all.iter().filter(|e| matches!(e, Event::SiteRefused { rule, .. } if rule == "reveal_once")).count() >= 2
            || differenced(all)
    });
    assert!(!differenced(&all), "a second sum of round 1 without site-4 was unmasked: {:?}", unmasked(&all));
    let refused: Vec<(String, String)> = refusals(&fed).into_iter().filter(|(_, r)| r == "reveal_once").collect();
    assert!(refused.iter().all(|(s, _)| s != "site-4"), "{refused:?}");
    // The round is skipped without an update and the job completes.
    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}");
    let r = &job["history"][0];
    assert!(r["refused"].as_str().is_some_and(|w| w.contains("reveal once per round")), "{r:#}");
    assert!(!differenced(&events(&fed)), "{:?}", unmasked(&events(&fed)));
}

/// Attack 4, divergent models: every site but the target gets a different base model
/// (with dead units the others' updates are zero and the sum is the target's). Those
/// sites find no audit-log entry committing it and refuse (`base_model`); the session
/// id binds the base model as well, so signatures would not verify across the split.
/// Nothing is unmasked.
#[test]
fn sites_handed_different_models_never_reach_a_sum() {
    let mut fed = Federation::new(3);
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "divergent:site-1")]);
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.wait_online(3);
    fed.submit("divergent", 1, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 10\n"));
    // Until two attempts failed, or the attack succeeds (a sum is unmasked).
    let all = wait_events(&fed, 3 * MIN, "two failed attempts", |all| {
        all.iter().filter(|e| matches!(e, Event::RoundFailed { .. })).count() >= 2 || !unmasked(all).is_empty()
    });
    assert!(unmasked(&all).is_empty(), "a sum was unmasked: {:?}", unmasked(&all));
    let refused = refusals(&fed);
    for s in ["site-2", "site-3"] {
        assert!(refused.contains(&(s.to_string(), "base_model".to_string())), "{s} did not refuse: {refused:?}");
    }
    for s in ["site-1", "site-2", "site-3"] {
        assert!(!journal(&fed, s).contains("\"kind\":\"contribution\""), "{s} delivered a masked input");
    }
}

/// Attack 2c, grinding the SecAgg+ graph: the coordinator, having seen every site's
/// graph nonce, relays to site-1 a substitute nonce for another site, chosen so that
/// site-1's two neighbours are the ones it prefers. Site-1 refuses (SA-13: the nonce
/// does not open that site's signed commitment) before dealing a single share, so it
/// never masks with the neighbourhood the coordinator picked and no sum holds its input.
#[test]
fn a_coordinator_cannot_choose_the_secagg_plus_graph() {
    let mut fed = Federation::new(4);
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "graph-seed:site-1")]);
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4"]);
    fed.wait_online(4);
    let extra = format!("{SMALL_MODEL}[secure_aggregation]\nneighbours = 2\n[deadlines]\nsecagg = 10\n");
    fed.submit("grind", 1, 3, &extra);
    let all = wait_events(&fed, 3 * MIN, "two failed attempts", |all| {
        all.iter().filter(|e| matches!(e, Event::RoundFailed { .. })).count() >= 2
            || unmasked(all).iter().any(|(_, _, s)| s.iter().any(|s| s == "site-1"))
    });
    let with_site_1: Vec<_> = unmasked(&all).into_iter().filter(|(_, _, s)| s.iter().any(|s| s == "site-1")).collect();
    assert!(with_site_1.is_empty(), "a sum holding site-1's input was unmasked: {with_site_1:?}");
    let log = fed.log_text("site-1");
    assert!(log.contains("SA-13"), "site-1 did not refuse the ground graph:\n{log}");
    assert!(fed.log_text("coordinator").contains("relaying a ground graph nonce"), "the attack did not run");
    assert!(!journal(&fed, "site-1").contains("\"kind\":\"contribution\""), "site-1 delivered a masked input");
}

/// Attack 6, poisoning: one enrolled site claims a weight far above max_weight (it can
/// put any words in its masked input). The coordinator refuses the out-of-bounds
/// aggregate: the round is committed without an update (the model stays), and the job
/// goes on and completes rather than failing or stalling.
#[test]
fn an_inflated_weight_is_refused_without_failing_the_job() {
    let mut fed = Federation::new(4);
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.start_site_with("site-4", &[("MAEUM_SITE_ATTACK", "inflate-weight")]);
    fed.wait_online(4);
    let id = fed.submit("poison", 2, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 10\n"));
    let job = fed.wait_job(&id, 4 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));
    let history = job["history"].as_array().expect("history");
    let initial = events(&fed)
        .into_iter()
        .find_map(|e| match e {
            Event::JobStarted { initial_model, .. } => Some(initial_model),
            _ => None,
        })
        .expect("job_started");
    for r in history {
        let refused = r["refused"].as_str().unwrap_or_default();
        assert!(refused.contains("aggregate weight"), "every round with site-4 in it is refused: {r:#}");
        assert_eq!(r["model"], initial.as_str(), "a refused round leaves the model as it was: {r:#}");
    }
}

/// Attack 6, denial by garbage shares: site-5 seals shares that do not authenticate for
/// every holder. Each honest recipient catches it (SA-06), leaves the attempt and
/// names the sender; a sender two sites name is excluded from the job's later attempts,
/// so the job completes without it instead of retrying the same cohort forever.
#[test]
fn a_site_sending_garbage_shares_is_excluded_and_the_job_goes_on() {
    let mut fed = Federation::new(5);
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4"]);
    fed.start_site_with("site-5", &[("MAEUM_SITE_ATTACK", "garbage-shares")]);
    fed.wait_online(5);
    let id = fed.submit("garbage", 1, 3, &format!("{SMALL_MODEL}[deadlines]\nsecagg = 10\n"));
    let job = fed.wait_job(&id, 4 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));
    let excluded = job["excluded"].to_string();
    assert!(excluded.contains("site-5") && excluded.contains("SA-06"), "site-5 was not excluded: {job:#}");
    let accusers: Vec<String> =
        refusals(&fed).into_iter().filter(|(_, rule)| rule == "share_auth").map(|(site, _)| site).collect();
    assert!(accusers.len() >= 2 && !accusers.contains(&"site-5".to_string()), "{accusers:?}");
    let round = &job["history"][0];
    let contributors = round["contributors"].to_string();
    assert!(!contributors.contains("site-5"), "{round:#}");
}

/// Attack 6, scaling: one site multiplies its update by 1000 and skips the job's L2
/// bound (`clip_norm`); the per-coordinate clip alone lets that through, the norm
/// bound on the aggregate does not. An honest cohort under the same bound is applied.
#[test]
fn a_scaled_update_is_refused_by_the_norm_bound_and_an_honest_one_is_not() {
    let job = format!("{SMALL_MODEL}[secure_aggregation]\nclip_norm = 1.0\n[deadlines]\nsecagg = 10\n");
    {
        let mut fed = Federation::new(3);
        fed.start_coordinator();
        fed.start_sites(&["site-1", "site-2", "site-3"]);
        fed.wait_online(3);
        let id = fed.submit("honest-norm", 1, 3, &job);
        let done = fed.wait_job(&id, 3 * MIN);
        assert_eq!(done["state"], "completed", "{done:#}");
        let r = &done["history"][0];
        assert_eq!(r["refused"], "", "an honest cohort under the bound is applied: {r:#}");
    }
    let mut fed = Federation::new(4);
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    fed.start_site_with("site-4", &[("MAEUM_SITE_ATTACK", "scale-update")]);
    fed.wait_online(4);
    let id = fed.submit("scaled", 1, 3, &job);
    let done = fed.wait_job(&id, 3 * MIN);
    assert_eq!(done["state"], "completed", "{done:#}");
    let r = &done["history"][0];
    assert!(r["refused"].as_str().is_some_and(|w| w.contains("L2 norm")), "the scaled round is refused: {r:#}");
}
