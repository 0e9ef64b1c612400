//! The release key kept apart from the serving host (issue 20,
//! `docs/protocols/releases.md#two-keys`): real processes, mTLS, the real corpus.
//!
//! The lead moves `HOME/release.key` off the coordinator's host. A finished job's
//! release then waits for it: promotion is refused. A compromised host (a coordinator
//! that plays `forge-release`: it promotes anyway, "signing" with the log key it holds)
//! gets nothing installed: every site refuses. Signed where the key is (`models sign`),
//! the release is promoted and installed everywhere.

use std::time::Duration;

use maeum_e2e::releases::{current_at, release_everywhere, site_cli as site_cmd, wait};
use maeum_e2e::{Federation, SMALL_MODEL, bin};

const MIN: Duration = Duration::from_secs(60);
const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];

fn events(fed: &Federation, site: &str) -> String {
    std::fs::read_to_string(fed.site_home(site).join("releases/events.jsonl")).unwrap_or_default()
}

#[test]
fn a_host_without_the_release_key_cannot_get_a_release_installed() {
    let mut fed = Federation::new(SITES.len());
    let home = fed.coordinator_home();
    // The enrolment bundles carry the release key's public half.
    let release_pub = std::fs::read_to_string(home.join("release.pub")).expect("release.pub");
    for s in SITES {
        let enrolment = std::fs::read_to_string(fed.site_home(s).join("enrolment.json")).expect("enrolment.json");
        assert!(enrolment.contains(release_pub.trim()), "{s} pinned the release key: {enrolment}");
    }
    let offline = fed.dir.path().join("lead-workstation-release.key");
    std::fs::rename(home.join("release.key"), &offline).expect("moving release.key off the host");

    fed.start_coordinator();
    fed.start_sites(&SITES);
    fed.wait_online(SITES.len());
    let id = fed.submit("pending", 1, 3, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    assert_eq!(fed.wait_job(&id, 3 * MIN)["state"], "completed");
    let shown = fed.cli_json(&["models", "show", "v1"]);
    assert_eq!(shown["version"], 1, "{shown:#}");
    assert_eq!(shown["release_key_signed"], false, "{shown:#}");
    let text = String::from_utf8_lossy(&fed.cli(&["models", "show", "v1"]).stdout).into_owned();
    assert!(text.contains("waits for the release key (`maeum-coordinator models sign 1`)"), "{text}");
    let reason = ["--override-gate", "--reason", "e2e: a one-round model"];
    let out = fed.cli(&[&["models", "promote", "v1"][..], &reason[..]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unsigned release was promoted");
    assert!(err.contains("not signed with the consortium's release key") && err.contains("models sign 1"), "{err}");

    // The compromised host promotes it anyway, with a signature by the log key.
    assert!(fed.terminate_coordinator(MIN).is_some(), "the coordinator stops");
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "forge-release")]);
    let v = fed.cli_json(&[&["models", "promote", "v1"][..], &reason[..]].concat());
    assert_eq!(v["current"], true, "{v:#}");
    for s in SITES {
        wait(&format!("{s} refuses the forged release"), MIN, || events(&fed, s).contains("release key"));
        let log = events(&fed, s);
        assert!(log.contains("does not verify under the consortium's release key"), "{s}: {log}");
        assert!(current_at(&fed, s).is_null(), "{s} installed nothing");
    }

    // The lead signs where the key is; promoted again, every site installs it.
    assert!(fed.terminate_coordinator(MIN).is_some(), "the coordinator stops");
    fed.start_coordinator();
    // The forged signature the compromised host stored does not count.
    let out = fed.cli(&[&["models", "promote", "v1"][..], &reason[..]].concat());
    assert!(!out.status.success(), "a forged release signature passed the coordinator's own check");
    let out = fed.cli(&["models", "sign", "1", "--key", offline.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("signed release v1"));
    // A signature by another key (another consortium's) is refused.
    let other = fed.dir.path().join("other-consortium");
    maeum_e2e::run_ok(
        std::process::Command::new(bin("maeum-coordinator"))
            .args(["init", "--name", "other", "--address", "127.0.0.1:1", "--home"])
            .arg(&other),
    );
    let stranger = other.join("release.key");
    let out = fed.cli(&["models", "sign", "1", "--key", stranger.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not verify under the consortium's release key"), "{err}");
    assert_eq!(fed.cli_json(&["models", "show", "v1"])["release_key_signed"], true);
    let v = fed.cli_json(&[&["models", "promote", "v1"][..], &reason[..]].concat());
    assert_eq!(v["current"], true, "{v:#}");
    for s in SITES {
        wait(&format!("{s} installs v1"), MIN, || current_at(&fed, s) == 1);
    }

    // An auditor checks the exported release against the log and the release key.
    let (out_dir, log) = (fed.dir.path().join("export"), fed.dir.path().join("audit.json"));
    let export = fed.cli(&["models", "export", "1", "--out", out_dir.to_str().expect("utf-8")]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let audit = fed.cli(&["audit", "export", "--out", log.to_str().expect("utf-8")]);
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stderr));
    let auditor = |key: &str| audit_release(&out_dir, &log, key);
    let ok = auditor(release_pub.trim());
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains(release_pub.trim()),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let other_pub = std::fs::read_to_string(other.join("release.pub")).expect("release.pub");
    let wrong = auditor(other_pub.trim());
    assert_eq!(wrong.status.code(), Some(1), "{}", String::from_utf8_lossy(&wrong.stderr));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("REL-4b"), "{}", String::from_utf8_lossy(&wrong.stderr));
}

/// `maeum-audit release DIR --log LOG --release-key KEY`.
fn audit_release(dir: &std::path::Path, log: &std::path::Path, key: &str) -> std::process::Output {
    std::process::Command::new(bin("maeum-audit"))
        .arg("release")
        .arg(dir)
        .arg("--log")
        .arg(log)
        .args(["--release-key", key])
        .output()
        .expect("maeum-audit runs")
}

/// Rotation (`docs/protocols/releases.md#rotating-the-release-key`): the lead hands the
/// release key over twice; a compromised host cannot hand it over to a key of its own;
/// every site walks both real handovers, installs the next release, and still verifies
/// the release it installed under the first key; an auditor holding only the first key
/// follows the log's rotations to the release's key.
#[test]
fn the_release_key_rotates_and_every_site_follows_the_handover() {
    let mut fed = Federation::new(SITES.len());
    let home = fed.coordinator_home();
    let first = std::fs::read_to_string(home.join("release.pub")).expect("release.pub").trim().to_string();
    fed.start_coordinator();
    fed.start_sites(&SITES);
    fed.wait_online(SITES.len());
    release_everywhere(&fed, "before", 1, &SITES);
    let (job, reason) = (maeum_e2e::releases::one_round_job(), maeum_e2e::releases::OVERRIDE);

    // Two rotations, made where the key is; the current release is signed again each time.
    let keys = fed.dir.path().join("lead-workstation");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let (k0, k1, k2) = (home.join("release.key"), keys.join("k1.key"), keys.join("k2.key"));
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let r1 = fed.cli_json(&["release-key", "rotate", "--key", &path(&k0), "--new-key", &path(&k1)]);
    assert_eq!((r1["rotations"].as_u64(), r1["resigned"].as_u64()), (Some(1), Some(1)), "{r1:#}");
    // A handover from a key that is no longer current is refused.
    let stale = fed.cli(&["release-key", "rotate", "--key", &path(&k0), "--new-key", &path(&keys.join("x.key"))]);
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success() && err.contains("but the consortium's release key is"), "{err}");
    let r2 = fed.cli_json(&["release-key", "rotate", "--key", &path(&k1), "--new-key", &path(&k2)]);
    assert_eq!(r2["rotations"].as_u64(), Some(2), "{r2:#}");
    let shown = fed.cli_json(&["release-key", "show"]);
    assert_eq!((shown["first"].as_str(), shown["rotations"].as_array().map(Vec::len)), (Some(first.as_str()), Some(2)));
    assert!(shown["private_key"].as_str().unwrap_or_default().contains("retired"), "{shown:#}");
    assert_eq!(fed.cli_json(&["models", "show", "v1"])["release_key_signed"], true);

    // A new release waits for the new key (the key in HOME is retired) and is signed with it.
    let id = fed.submit("after", 1, 3, &job);
    assert_eq!(fed.wait_job(&id, 3 * MIN)["state"], "completed");
    assert_eq!(fed.cli_json(&["models", "show", "v2"])["release_key_signed"], false);
    let out = fed.cli(&["models", "sign", "2", "--key", &path(&k2)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The compromised host serves a handover to a key of its own: every site refuses.
    assert!(fed.terminate_coordinator(MIN).is_some(), "the coordinator stops");
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "forge-handover")]);
    fed.cli_json(&[&["models", "promote", "v2"][..], &reason[..]].concat());
    for s in SITES {
        wait(&format!("{s} refuses the forged handover"), MIN, || events(&fed, s).contains("handover"));
        let log = events(&fed, s);
        assert!(log.contains("is not signed by the release key it hands over from"), "{s}: {log}");
        assert_eq!(current_at(&fed, s), 1, "{s} keeps v1 in service");
        assert!(!fed.site_home(s).join("release-keys.json").exists(), "{s} moved its pin on a forged chain");
    }

    // The honest coordinator again: promoted once more, every site follows both rotations.
    assert!(fed.terminate_coordinator(MIN).is_some(), "the coordinator stops");
    fed.start_coordinator();
    fed.cli_json(&[&["models", "promote", "v2"][..], &reason[..]].concat());
    for s in SITES {
        wait(&format!("{s} installs v2"), MIN, || current_at(&fed, s) == 2);
        let followed: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fed.site_home(s).join("release-keys.json")).expect("release-keys.json"),
        )
        .expect("json");
        assert_eq!(followed.as_array().map(Vec::len), Some(2), "{s}: {followed:#}");
        let doctor = String::from_utf8_lossy(&site_cmd(&fed, s, &["doctor"]).stdout).into_owned();
        assert!(doctor.contains("by 2 rotations this site followed"), "{s}: {doctor}");
        // v1, installed under the first key, still verifies offline.
        let verify = site_cmd(&fed, s, &["models", "verify"]);
        assert!(verify.status.success(), "{s}: {}", String::from_utf8_lossy(&verify.stderr));
    }

    // The auditor knows only the first key; the log's rotations lead to the release's.
    let (out_dir, log) = (fed.dir.path().join("export"), fed.dir.path().join("audit.json"));
    assert!(fed.cli(&["models", "export", "2", "--out", &path(&out_dir)]).status.success());
    assert!(fed.cli(&["audit", "export", "--out", &path(&log)]).status.success());
    let auditor = |key: &str| audit_release(&out_dir, &log, key);
    let ok = auditor(&first);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(text.contains("2 logged rotation(s) from --release-key"), "{text}");
    let log_text = std::fs::read_to_string(&log).expect("audit.json");
    assert_eq!(log_text.matches("release_key_rotated").count(), 2, "both rotations are logged");
    let stranger = "ab".repeat(32);
    let wrong = auditor(&stranger);
    assert_eq!(wrong.status.code(), Some(1), "{}", String::from_utf8_lossy(&wrong.stderr));
}
