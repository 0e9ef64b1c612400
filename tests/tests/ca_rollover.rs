//! Rolling the consortium CA over (issue 20, `docs/protocols/certificates.md#rolling-over-the-ca`):
//! real processes, mTLS, the real corpus.
//!
//! The lead makes a successor CA while the coordinator serves; the next start applies
//! it (logged as `ca_rotated`). Every site trusts the new CA once the log proves the
//! rollover, renews its certificate onto it without a restart, and the coordinator
//! switches its own certificate once every site holds one of the new CA. A secure job
//! then runs on certificates of the new CA only, a site enrolled after the rollover
//! joins, and an auditor pinning nothing but the log verifies the whole chain.

use std::time::Duration;

use maeum_e2e::releases::{one_round_job, wait};
use maeum_e2e::{Federation, bin};
use maeum_pki::identity::{leaf_der, pem_to_der};
use maeum_pki::rollover::issued_by;

const MIN: Duration = Duration::from_secs(60);
const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];

/// The CAs a site (or the coordinator) trusts: certificates in its ca.pem.
fn trusted(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).ok().and_then(|p| pem_to_der(&p).ok()).map_or(0, |c| c.len())
}

/// Whether the certificate file `cert` was issued by the CA file `ca` (its first).
fn by(cert: &std::path::Path, ca: &std::path::Path) -> bool {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).ok().and_then(|pem| leaf_der(&pem).ok());
    matches!((read(cert), read(ca)), (Some(c), Some(a)) if issued_by(&c, &a))
}

#[test]
fn the_ca_rolls_over_and_every_site_follows_renews_and_keeps_working() {
    let mut fed = Federation::new(SITES.len());
    let home = fed.coordinator_home();
    let old_ca = std::fs::read_to_string(home.join("ca.pem")).expect("ca.pem");
    // The coordinator looks at its own certificate every second instead of every hour.
    let check = [("MAEUM_COORDINATOR_TEST_CERT_CHECK_MS", "1000")];
    fed.start_coordinator_with(&check);
    fed.start_sites(&SITES);
    fed.wait_online(SITES.len());

    // Made while the coordinator serves; a second one waits for the first.
    let r = fed.cli_json(&["ca", "rotate"]);
    let new_print = r["new_ca"].as_str().expect("new_ca").to_string();
    assert_eq!(r["applied"].as_bool(), Some(false), "{r:#}");
    let again = fed.cli(&["ca", "rotate"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already waiting"));
    assert_eq!(std::fs::read_to_string(home.join("ca.pem")).expect("ca.pem"), old_ca, "nothing applied yet");

    // Applied at the next start: the new CA issues, both are trusted.
    assert!(fed.terminate_coordinator(MIN).is_some(), "the coordinator stops");
    fed.start_coordinator_with(&check);
    assert_ne!(std::fs::read_to_string(home.join("ca.pem")).expect("ca.pem"), old_ca);
    assert_eq!(trusted(&home.join("ca-retired.pem")), 1);
    let shown = fed.cli_json(&["ca", "show"]);
    assert_eq!(shown["current"].as_str(), Some(new_print.as_str()), "{shown:#}");
    assert!(shown["waiting"].is_null(), "{shown:#}");

    // Every site trusts the new CA (the log proved it), renews onto it without a
    // restart, and then the coordinator serves a certificate of the new CA.
    for s in SITES {
        let site = fed.site_home(s);
        wait(&format!("{s} trusts the new CA"), MIN, || trusted(&site.join("ca.pem")) == 2);
        let followed = std::fs::read_to_string(site.join("ca-handovers.json")).expect("ca-handovers.json");
        assert!(followed.contains("checkpoint of"), "{s}: {followed}");
        wait(&format!("{s} renews onto the new CA"), MIN, || by(&site.join("site.pem"), &home.join("ca.pem")));
    }
    wait("the coordinator serves a certificate of the new CA", MIN, || {
        by(&home.join("server.pem"), &home.join("ca.pem"))
    });
    let shown = fed.cli_json(&["ca", "show"]);
    assert_eq!((shown["sites_on_current_ca"].as_u64(), shown["sites"].as_u64()), (Some(3), Some(3)), "{shown:#}");
    let doctor = maeum_e2e::releases::site_cli(&fed, "site-1", &["doctor"]);
    let said = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(said.contains("2 CAs trusted"), "{said}");

    // A site enrolled now gets both CAs and a certificate of the new one.
    fed.enrol("site-4", &fed.dir.path().join("data/site-1"));
    let site4 = fed.site_home("site-4");
    assert_eq!(trusted(&site4.join("ca.pem")), 2);
    let first = |p: &std::path::Path| std::fs::read_to_string(p).ok().and_then(|pem| leaf_der(&pem).ok());
    assert_eq!(first(&site4.join("ca.pem")), leaf_der(&old_ca).ok(), "bundles list the published CA first");
    assert!(by(&site4.join("site.pem"), &home.join("ca.pem")));
    fed.start_sites(&["site-4"]);
    fed.wait_online(SITES.len() + 1);

    // A secure job on the new CA's certificates: sites check each other's in the roster.
    let id = fed.submit("after-rollover", 1, SITES.len() + 1, &one_round_job());
    assert_eq!(fed.wait_job(&id, 3 * MIN)["state"], "completed");

    // The auditor verifies the whole log from the init entry's CA along the rollover.
    let log = fed.dir.path().join("audit.json");
    let out = fed.cli(&["audit", "export", "--out", log.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&log).expect("audit.json");
    assert_eq!(text.matches("\"ca_rotated\"").count(), 1, "the rollover is logged once");
    let ok = std::process::Command::new(bin("maeum-audit"))
        .args(["verify", log.to_str().expect("utf-8")])
        .output()
        .expect("maeum-audit");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let said = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(said.contains("rolled over 1 time(s)") && said.contains(&new_print), "{said}");
}

/// The serving host holds the CA key, so it can sign a valid handover to a CA of its
/// own. What it cannot do is make sites trust that CA unseen: a site follows a
/// rollover only once a checkpoint it verified proves the `ca_rotated` entry
/// (`unlogged-ca-rotation` plays the host that shows the rollover without logging it).
#[test]
fn a_coordinator_cannot_make_sites_trust_a_ca_it_does_not_log() {
    let sites = SITES;
    let mut fed = Federation::new(sites.len());
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_ATTACK", "unlogged-ca-rotation")]);
    fed.start_sites(&sites);
    fed.wait_online(sites.len());
    // New entries, so the sites witness (and are shown the rollover) again.
    let id = fed.submit("grow-the-log", 1, sites.len(), &one_round_job());
    let refusal = "that its audit log does not record";
    for s in sites {
        wait(&format!("{s} refuses the unlogged rollover"), 2 * MIN, || fed.log_text(s).contains(refusal));
    }
    // The federation goes on; nothing the sites trust changed.
    assert_eq!(fed.wait_job(&id, 3 * MIN)["state"], "completed");
    for s in sites {
        assert_eq!(trusted(&fed.site_home(s).join("ca.pem")), 1, "{s} trusts a CA the log does not record");
        assert!(!fed.site_home(s).join("ca-handovers.json").exists(), "{s} followed an unlogged rollover");
    }
}
