//! Rotation of the log's signing key (issue 20, `docs/protocols/audit-log.md#rotating-the-log-key`):
//! real processes, mTLS, the real corpus.
//!
//! The lead rotates the key while the coordinator serves; the next start applies it
//! (logged as `log_key_rotated`). Every site walks the handover with the next
//! checkpoint it witnesses, installs a release signed by the new key, and still
//! verifies the release it installed under the old one; an auditor who pins only the
//! first key verifies the whole log, and a site's witnessed checkpoint against it.

use std::time::Duration;

use maeum_e2e::releases::{OVERRIDE, current_at, one_round_job, release_everywhere, site_cli as site_cmd, wait};
use maeum_e2e::{Federation, bin};

const MIN: Duration = Duration::from_secs(60);
const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];

fn witnessed_key(fed: &Federation, site: &str) -> String {
    let text = std::fs::read_to_string(fed.site_home(site).join("audit/checkpoint.json")).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default()["log_public_key"].as_str().unwrap_or("").into()
}

#[test]
fn the_log_signing_key_rotates_and_every_site_and_auditor_follows() {
    let mut fed = Federation::new(SITES.len());
    let home = fed.coordinator_home();
    let first = std::fs::read_to_string(home.join("signing.pub")).expect("signing.pub").trim().to_string();
    fed.start_coordinator();
    fed.start_sites(&SITES);
    fed.wait_online(SITES.len());
    release_everywhere(&fed, "before", 1, &SITES);

    // Made while the coordinator serves; a second one waits for the first.
    let r = fed.cli_json(&["signing-key", "rotate"]);
    let new_key = r["new_key"].as_str().expect("new_key").to_string();
    assert_eq!((r["old_key"].as_str(), r["applied"].as_bool()), (Some(first.as_str()), Some(false)), "{r:#}");
    let again = fed.cli(&["signing-key", "rotate"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already waiting"));
    assert_eq!(std::fs::read_to_string(home.join("signing.pub")).expect("signing.pub").trim(), first);

    // Applied at the next start.
    assert!(fed.terminate_coordinator(MIN).is_some(), "the coordinator stops");
    fed.start_coordinator();
    assert_eq!(std::fs::read_to_string(home.join("signing.pub")).expect("signing.pub").trim(), new_key);
    let shown = fed.cli_json(&["signing-key", "show"]);
    assert_eq!(shown["rotations"].as_array().map(Vec::len), Some(1), "{shown:#}");
    assert!(shown["waiting"].is_null(), "{shown:#}");
    for s in SITES {
        wait(&format!("{s} witnesses a checkpoint by the new key"), MIN, || witnessed_key(&fed, s) == new_key);
        let followed = std::fs::read_to_string(fed.site_home(s).join("signing-keys.json")).expect("signing-keys.json");
        assert!(followed.contains(&new_key) && followed.contains("checkpoint of"), "{s}: {followed}");
    }

    // A site enrolled after the rotation pins the new key, learns the key before it from
    // the chain (logged), and installs v1, which the old key signed.
    fed.enrol("site-4", &fed.dir.path().join("data/site-1"));
    let enrolment = std::fs::read_to_string(fed.site_home("site-4").join("enrolment.json")).expect("enrolment");
    assert!(enrolment.contains(&new_key), "{enrolment}");
    fed.start_sites(&["site-4"]);
    wait("site-4 installs v1", MIN, || current_at(&fed, "site-4") == 1);
    wait("site-4 witnesses the log", MIN, || witnessed_key(&fed, "site-4") == new_key);
    let learnt = std::fs::read_to_string(fed.site_home("site-4").join("signing-keys.json")).expect("signing-keys");
    assert!(learnt.contains(&first), "site-4 learnt the first key: {learnt}");

    // A release signed by the new log key installs everywhere; v1 still verifies.
    let id = fed.submit("after", 1, 3, &one_round_job());
    assert_eq!(fed.wait_job(&id, 3 * MIN)["state"], "completed");
    fed.cli_json(&[&["models", "promote", "v2"][..], &OVERRIDE[..]].concat());
    for s in SITES.iter().copied().chain(["site-4"]) {
        wait(&format!("{s} installs v2"), MIN, || current_at(&fed, s) == 2);
        let verify = site_cmd(&fed, s, &["models", "verify"]);
        assert!(verify.status.success(), "{s}: {}", String::from_utf8_lossy(&verify.stderr));
        let doctor = String::from_utf8_lossy(&site_cmd(&fed, s, &["doctor"]).stdout).into_owned();
        let line = doctor.lines().find(|l| l.contains("log key")).unwrap_or_default();
        let how = if s == "site-4" { "1 earlier key(s) known" } else { "by 1 rotation this site followed" };
        assert!(line.contains(&new_key[..16]) && line.contains(how), "{s}: {doctor}");
    }

    // The auditor pins the first key: the whole log verifies, the rotation is in it, and
    // a site's witnessed checkpoint (by the new key) is consistent with it.
    let log = fed.dir.path().join("audit.json");
    let out = fed.cli(&["audit", "export", "--out", log.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&log).expect("audit.json");
    assert_eq!(text.matches("\"log_key_rotated\"").count(), 1, "the rotation is logged once");
    let audit =
        |args: &[&str]| std::process::Command::new(bin("maeum-audit")).args(args).output().expect("maeum-audit");
    let ok = audit(&["verify", log.to_str().expect("utf-8"), "--trust", &first]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let said = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(said.contains("rotated 1 time(s)") && said.contains(&new_key), "{said}");
    let cp = fed.site_home("site-1").join("audit/checkpoint.json");
    let ok = audit(&["consistency", cp.to_str().expect("utf-8"), log.to_str().expect("utf-8")]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // Both releases export and pass the auditor: v1 under the first key, v2 the new.
    for v in ["1", "2"] {
        let dir = fed.dir.path().join(format!("export-v{v}"));
        let out = fed.cli(&["models", "export", v, "--out", dir.to_str().expect("utf-8")]);
        assert!(out.status.success(), "v{v}: {}", String::from_utf8_lossy(&out.stderr));
        let ok =
            audit(&["release", dir.to_str().expect("utf-8"), "--log", log.to_str().expect("utf-8"), "--trust", &first]);
        assert!(ok.status.success(), "v{v}: {}", String::from_utf8_lossy(&ok.stderr));
    }
    // The new key is not the log's first key: pinning it alone fails (AUD-05).
    let wrong = audit(&["verify", log.to_str().expect("utf-8"), "--trust", &new_key]);
    assert!(!wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("AUD-05"));
}

/// The serving host holds the log key, so it can sign a valid handover to a key of its
/// own. What it cannot do is hand sites over unseen: a site follows a rotation only
/// once a checkpoint it verified proves the `log_key_rotated` entry
/// (`unlogged-log-rotation` plays the host that shows the rotation without logging it).
#[test]
fn a_coordinator_cannot_hand_sites_over_to_a_log_key_it_does_not_log() {
    let sites = ["site-1", "site-2"];
    let mut fed = Federation::new(sites.len());
    let first = std::fs::read_to_string(fed.coordinator_home().join("signing.pub")).expect("signing.pub");
    let first = first.trim().to_string();
    // The sites witness the honest log first.
    fed.start_coordinator();
    fed.start_sites(&sites);
    fed.wait_online(sites.len());
    for s in sites {
        wait(&format!("{s} witnesses the log"), MIN, || witnessed_key(&fed, s) == first);
    }
    assert!(fed.terminate_coordinator(MIN).is_some(), "the coordinator stops");
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "unlogged-log-rotation")]);
    // New entries, so the next checkpoint is larger than what the sites hold.
    fed.submit("grow-the-log", 1, sites.len(), &one_round_job());
    let refusal = "with a rotation its audit log does not record";
    for s in sites {
        wait(&format!("{s} refuses the unlogged rotation"), 2 * MIN, || fed.log_text(s).contains(refusal));
        assert!(!fed.site_home(s).join("signing-keys.json").exists(), "{s} followed an unlogged rotation");
        assert_eq!(witnessed_key(&fed, s), first, "{s} stored a checkpoint by the host's own key");
    }
}
