//! Rolling the consortium CA over (issue 20, `docs/protocols/certificates.md#rolling-over-the-ca`):
//! real processes, mTLS, the real corpus.
//!
//! The lead makes a successor CA while the coordinator serves; the next start applies
//! it (logged as `ca_rotated`). Every site trusts the new CA once the log proves the
//! rollover, renews its certificate onto it without a restart, and the coordinator
//! switches its own certificate once every site holds one of the new CA. A secure job
//! then runs on certificates of the new CA only, a site enrolled after the rollover
//! joins, and an auditor pinning nothing but the log verifies the whole chain. Once the
//! coordinator has moved, each site accepts its certificate from the new CA only: the
//! retired CA's key, played as leaked, cannot impersonate the coordinator.

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
    // Sites ask which CA the coordinator's certificate comes from every half second
    // instead of every minute (only between the rollover and the coordinator's move).
    let probe = [("MAEUM_SITE_TEST_CA_PROBE_MS", "500")];
    for s in SITES {
        fed.start_site_with(s, &probe);
    }
    fed.wait_online(SITES.len());

    // Made while the coordinator serves; a second one waits for the first.
    let r = fed.cli_json(&["ca", "rotate"]);
    let new_print = r["new_ca"].as_str().expect("new_ca").to_string();
    assert_eq!(r["applied"].as_bool(), Some(false), "{r:#}");
    let again = fed.cli(&["ca", "rotate"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already waiting"));
    assert_eq!(std::fs::read_to_string(home.join("ca.pem")).expect("ca.pem"), old_ca, "nothing applied yet");

    // Applied at the next start: the new CA issues, both are trusted. The retired CA's
    // key is kept here to play its leak at the end.
    let (retired_cert, retired_key) = (old_ca.clone(), std::fs::read_to_string(home.join("ca.key")).expect("ca.key"));
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
    // Each site sees it (a handshake trusting only the new CA) and from then on accepts
    // the coordinator's certificate from the new CA only.
    for s in SITES {
        let floor = fed.site_home(s).join("coordinator-ca.txt");
        wait(&format!("{s} accepts the coordinator's certificate from the new CA only"), MIN, || {
            std::fs::read_to_string(&floor).is_ok_and(|f| f.trim() == new_print)
        });
        assert_eq!(trusted(&fed.site_home(s).join("ca.pem")), 2, "{s} still holds both CAs (the log's chain)");
    }
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

    // The attacker holds the retired CA's key: it stands up a server with a certificate
    // of that CA for the coordinator's name and address, in the coordinator's place.
    assert!(fed.terminate_coordinator(MIN).is_some(), "the coordinator stops");
    let (attempts, completed, valid) = impersonate(&fed, &retired_cert, &retired_key, Duration::from_secs(6));
    assert!(valid, "the forged certificate verifies under the retired CA (a site still trusting it would accept it)");
    assert!(attempts >= 3, "the sites kept dialling the coordinator's address ({attempts} connections)");
    assert_eq!(completed, 0, "a site completed a handshake with the retired CA's certificate");
}

/// Serves a certificate issued by the retired CA (`cert`, `key`) for the coordinator's
/// name at its address for `period`: the TCP connections the sites opened, the TLS
/// handshakes they completed, and whether the forged certificate verifies under the
/// retired CA (checked with the sites' own probe).
fn impersonate(fed: &Federation, cert: &str, key: &str, period: Duration) -> (usize, usize, bool) {
    use maeum_pki::identity::{Ca, SecretPem};
    use maeum_pki::tls;
    let enrolment: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fed.site_home("site-1").join("enrolment.json")).expect("enrolment"))
            .expect("enrolment json");
    let field = |k: &str| enrolment[k].as_str().expect(k).to_string();
    let (address, name, consortium) = (field("coordinator_address"), field("coordinator_name"), field("consortium"));
    let retired = Ca::from_pem(cert, &SecretPem::new(key.to_owned())).expect("the retired CA");
    let forged = retired.issue_server(&consortium, std::slice::from_ref(&name), 30).expect("forged certificate");
    let trusted = std::fs::read_to_string(fed.coordinator_home().join("ca-retired.pem")).expect("retired")
        + &std::fs::read_to_string(fed.coordinator_home().join("ca.pem")).expect("ca.pem");
    let config = tls::server_config(
        &trusted,
        &tls::ServerCertificate::new(&forged).expect("server certificate"),
        tls::Revocations::new(Vec::<String>::new()),
    )
    .expect("server config");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind(&address).await.expect("bind the coordinator's address");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (attempts, completed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let serve = async {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                attempts.fetch_add(1, Ordering::SeqCst);
                let (acceptor, completed) = (acceptor.clone(), completed.clone());
                tokio::spawn(async move {
                    if acceptor.accept(tcp).await.is_ok() {
                        completed.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        };
        let _ = tokio::time::timeout(period, serve).await;
        // The sites' own probe, trusting the retired CA only, accepts the forgery.
        let site = fed.site_home("site-1");
        let me = maeum_pki::identity::CertifiedKey {
            cert_pem: std::fs::read_to_string(site.join("site.pem")).expect("site.pem"),
            key: SecretPem::new(std::fs::read_to_string(site.join("site.key")).expect("site.key")),
        };
        let (attempts, before) = (attempts.load(Ordering::SeqCst), completed.load(Ordering::SeqCst));
        let served = async {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let _ = acceptor.accept(tcp).await;
            }
        };
        let retired_der = maeum_pki::identity::CertificateDer::from(leaf_der(cert).expect("retired CA"));
        let valid = tokio::select! {
            v = tls::serves_certificate_of(&address, &name, &retired_der, &me) => v.expect("probe"),
            () = served => unreachable!("the accept loop never ends"),
        };
        (attempts, before, valid)
    })
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
