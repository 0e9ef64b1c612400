//! The release key kept apart from the serving host (issue 20,
//! `docs/protocols/releases.md#two-keys`): real processes, mTLS, the real corpus.
//!
//! The lead moves `HOME/release.key` off the coordinator's host. A finished job's
//! release then waits for it: promotion is refused. A compromised host (a coordinator
//! that plays `forge-release`: it promotes anyway, "signing" with the log key it holds)
//! gets nothing installed: every site refuses. Signed where the key is (`models sign`),
//! the release is promoted and installed everywhere.

use std::time::{Duration, Instant};

use maeum_e2e::{Federation, SMALL_MODEL, bin};

const MIN: Duration = Duration::from_secs(60);
const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];

fn current_at(fed: &Federation, site: &str) -> serde_json::Value {
    let out = std::process::Command::new(bin("maeum-site"))
        .args(["models", "list", "--json", "--home"])
        .arg(fed.site_home(site))
        .output()
        .expect("maeum-site models list");
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()["current"].clone()
}

fn events(fed: &Federation, site: &str) -> String {
    std::fs::read_to_string(fed.site_home(site).join("releases/events.jsonl")).unwrap_or_default()
}

fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
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
    let auditor = |key: &str| {
        std::process::Command::new(bin("maeum-audit"))
            .arg("release")
            .arg(&out_dir)
            .arg("--log")
            .arg(&log)
            .args(["--release-key", key])
            .output()
            .expect("maeum-audit runs")
    };
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
