//! Consent (issue 16): with `[policy] auto_accept = false`, the default outside the demo
//! and the test federations, a job offer waits until the site's admin answers with
//! `maeum-site jobs accept|refuse`; the site journals the hash of the job file it
//! accepted, which is the hash the audit log's `job_submitted` entry carries.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use maeum_e2e::{Federation, SMALL_MODEL, bin};

const MIN: Duration = Duration::from_secs(60);

fn site(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("maeum-site")).args(args).arg("--home").arg(home).output().expect("running maeum-site")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn an_offer_waits_for_the_admin_and_runs_once_accepted() {
    let mut fed = Federation::new(3);
    fed.set_policy("site-1", "auto_accept", "false");
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    let id = fed.submit("consent", 1, 3, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    let home = fed.site_home("site-1");
    let until = Instant::now() + MIN;
    while !fed.site_status("site-1")["stage"].as_str().is_some_and(|s| s.starts_with("waiting for the admin")) {
        assert!(Instant::now() < until, "site-1 never waited for consent: {:#}", fed.site_status("site-1"));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nothing was decided for site-1 meanwhile, and the job cannot start without it.
    std::thread::sleep(Duration::from_secs(3));
    let job = fed.job(&id);
    assert!(
        !job["decisions"].as_array().expect("decisions").iter().any(|d| d["site"] == "site-1"),
        "site-1 answered without its admin: {job:#}"
    );
    assert_eq!(job["state"], "pending", "{job:#}");

    let listed: serde_json::Value =
        serde_json::from_slice(&site(&home, &["jobs", "list", "--json"]).stdout).expect("json");
    assert_eq!(listed[0]["job_id"], id.as_str(), "{listed:#}");
    assert_eq!(listed[0]["state"], "waiting", "{listed:#}");
    let shown = text(&site(&home, &["jobs", "show", &id]));
    for words in
        ["secure aggregation    on", "cohort                at least 3 sites", "your policy           allows it"]
    {
        assert!(shown.contains(words), "`jobs show` lacks {words:?}:\n{shown}");
    }
    let no_reason = site(&home, &["jobs", "refuse", &id, "--reason", " "]);
    assert!(!no_reason.status.success() && text(&no_reason).contains("--reason is required"), "{}", text(&no_reason));
    let accepted = site(&home, &["jobs", "accept", &id]);
    assert!(accepted.status.success(), "{}", text(&accepted));
    let again = site(&home, &["jobs", "accept", &id]);
    assert!(!again.status.success() && text(&again).contains("already accepted"), "{}", text(&again));

    let job = fed.wait_job(&id, 3 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));
    // The journal names the job file the admin accepted: the logged one.
    let journal = std::fs::read_to_string(home.join("audit/journal.jsonl")).expect("journal");
    let sha = job["spec_sha256"].as_str().expect("spec_sha256");
    assert!(
        journal.lines().any(|l| l.contains("\"kind\":\"decision\"") && l.contains(sha)),
        "no decision with {sha} in:\n{journal}"
    );

    // An offer the policy refuses never waits for the admin, and `jobs list` still shows
    // it, with who refused and why.
    let plain = fed.submit(
        "plain",
        1,
        3,
        &format!("{SMALL_MODEL}[secure_aggregation]\ninsecure_plaintext_aggregation_for_debugging = true\n"),
    );
    let until = Instant::now() + MIN;
    let refused = loop {
        let listed: serde_json::Value =
            serde_json::from_slice(&site(&home, &["jobs", "list", "--json"]).stdout).expect("json");
        if let Some(l) = listed.as_array().and_then(|a| a.iter().find(|l| l["job_id"] == plain.as_str())) {
            break l.clone();
        }
        assert!(Instant::now() < until, "the refused offer {plain} is not listed: {listed:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(refused["state"], "refused", "{refused:#}");
    assert_eq!(refused["by"], "this site (policy or data)", "{refused:#}");
    assert!(refused["reason"].as_str().is_some_and(|r| r.contains("allow_plaintext")), "{refused:#}");
    let table = text(&site(&home, &["jobs", "list"]));
    assert!(table.contains(&format!("{plain}: refused by this site's policy")), "{table}");
    // The offer the admin accepted is still listed as the admin's answer.
    let listed: serde_json::Value =
        serde_json::from_slice(&site(&home, &["jobs", "list", "--json"]).stdout).expect("json");
    let first = listed.as_array().and_then(|a| a.iter().find(|l| l["job_id"] == id.as_str())).cloned();
    assert_eq!(first.as_ref().map(|l| l["state"].clone()), Some("accepted".into()), "{listed:#}");
}

/// Issue 22: an offer that waited for the admin while the lead aborted the job is
/// listed as withdrawn, not waiting forever, and cannot be answered any more.
#[test]
fn an_aborted_offer_is_withdrawn_not_left_waiting() {
    let mut fed = Federation::new(3);
    fed.set_policy("site-1", "auto_accept", "false");
    fed.start_coordinator();
    fed.start_sites(&["site-1", "site-2", "site-3"]);
    let id = fed.submit("withdrawn", 1, 3, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    let home = fed.site_home("site-1");
    let state = |home: &Path| -> serde_json::Value {
        let listed: serde_json::Value =
            serde_json::from_slice(&site(home, &["jobs", "list", "--json"]).stdout).expect("json");
        listed.as_array().and_then(|l| l.iter().find(|o| o["job_id"] == id.as_str()).cloned()).unwrap_or_default()
    };
    let until = Instant::now() + MIN;
    while state(&home)["state"] != "waiting" {
        assert!(Instant::now() < until, "site-1 never kept the offer: {:#}", state(&home));
        std::thread::sleep(Duration::from_millis(200));
    }
    let aborted = fed.cli(&["jobs", "abort", &id]);
    assert!(aborted.status.success(), "{}", text(&aborted));
    let until = Instant::now() + MIN;
    while state(&home)["state"] != "withdrawn" {
        assert!(Instant::now() < until, "the aborted offer stayed {:#}", state(&home));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(state(&home)["reason"].as_str().is_some_and(|r| r.contains("stopped offering it")), "{:#}", state(&home));
    let late = site(&home, &["jobs", "accept", &id]);
    assert!(!late.status.success() && text(&late).contains("no longer offered"), "{}", text(&late));
}
