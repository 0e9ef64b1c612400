//! Certificates renewed while the federation runs (issue 20, `docs/protocols/certificates.md`):
//! real processes on loopback, mTLS, the real corpus. Certificates near expiry are made
//! the way 377 days would: the consortium CA reissues them for 20 days.

use std::sync::Arc;
use std::time::{Duration, Instant};

use maeum_e2e::Federation;
use maeum_pki::identity::{self, Ca, CertifiedKey, SecretPem};
use maeum_pki::renewal::renewal_request;
use maeum_protocols::wire::pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};

const MIN: Duration = Duration::from_secs(60);
const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn der(pem: &str) -> Vec<u8> {
    identity::pem_to_der(pem).expect("pem").remove(0).to_vec()
}

fn days_left(pem: &str) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    (identity::not_after_unix(&der(pem)).expect("notAfter") - now as i64) / 86_400
}

fn ca(fed: &Federation) -> Ca {
    let home = fed.coordinator_home();
    Ca::from_pem(&read(&home.join("ca.pem")), &SecretPem::new(read(&home.join("ca.key")))).expect("CA")
}

/// The fingerprint of the certificate the coordinator presents to a new connection.
async fn presented(fed: &Federation) -> String {
    let home = fed.site_home("site-1");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity::pem_to_der(&read(&home.join("ca.pem"))).expect("ca").remove(0)).expect("root");
    let key = PrivateKeyDer::from_pem_slice(read(&home.join("site.key")).as_bytes()).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(identity::pem_to_der(&read(&home.join("site.pem"))).expect("site.pem"), key)
        .expect("client config");
    let tcp = tokio::net::TcpStream::connect(&fed.address).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("handshake");
    identity::fingerprint(&tls.get_ref().1.peer_certificates().expect("server certificate")[0])
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool, fed: &Federation) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}\n{}", fed.log_text("coordinator"));
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn sites_and_the_coordinator_renew_their_certificates_without_a_restart() {
    let mut fed = Federation::new(SITES.len());
    let ca = ca(&fed);
    let coordinator = fed.coordinator_home();
    // Three sites whose certificates have 20 days left.
    let mut short = Vec::new();
    for s in SITES {
        let (_, pem) =
            ca.sign_site_request(&read(&fed.site_home(s).join("request.csr.pem")), Some(s), 20).expect("sign");
        std::fs::write(coordinator.join("sites").join(format!("{s}.pem")), &pem).expect("sites/ID.pem");
        std::fs::write(fed.site_home(s).join("site.pem"), &pem).expect("site.pem");
        short.push(identity::fingerprint(&der(&pem)));
        fed.set_policy(s, "allowed_models", "[\"adapter-stand-in\"]");
    }
    fed.start_coordinator_with(&[("MAEUM_COORDINATOR_TEST_CERT_CHECK_MS", "500")]);
    fed.start_sites(&SITES);
    fed.wait_online(SITES.len());
    let pids: Vec<_> = SITES.iter().map(|s| fed.site_pid(s)).collect();
    let coordinator_pid = fed.coordinator_pid();

    // Each site renews on a heartbeat's word: same key, 397 days, logged.
    for (s, old) in SITES.iter().zip(&short) {
        let home = fed.site_home(s);
        wait_until(&format!("{s} renews"), MIN, || days_left(&read(&home.join("site.pem"))) > 390, &fed);
        let pem = read(&home.join("site.pem"));
        assert_ne!(&identity::fingerprint(&der(&pem)), old);
        let key = SecretPem::new(read(&home.join("site.key")));
        assert!(identity::key_matches_cert(&key, &der(&pem)).expect("key check"), "{s} kept its key");
        assert_eq!(read(&coordinator.join("sites").join(format!("{s}.pem"))), pem, "the coordinator's record of {s}");
        let log = fed.log_text(s);
        assert!(log.contains("renewed this site's certificate"), "{s}:\n{log}");
    }

    // The coordinator's own certificate: one with 20 days left is put in place while it
    // runs (as time would); it serves it, reissues it, and the next handshake shows that.
    let server = CertifiedKey {
        cert_pem: read(&coordinator.join("server.pem")),
        key: SecretPem::new(read(&coordinator.join("server.key"))),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let original = rt.block_on(presented(&fed));
    assert_eq!(original, identity::fingerprint(&der(&server.cert_pem)));
    let due = ca.reissue(&server.cert_pem, &server.key, 20).expect("reissue");
    std::fs::write(coordinator.join("server.pem"), &due).expect("server.pem");
    wait_until(
        "the coordinator renews its certificate",
        MIN,
        || {
            let now = read(&coordinator.join("server.pem"));
            now != due && days_left(&now) > 390
        },
        &fed,
    );
    let renewed = read(&coordinator.join("server.pem"));
    let fingerprint = identity::fingerprint(&der(&renewed));
    assert!(![original.clone(), identity::fingerprint(&der(&due))].contains(&fingerprint));
    wait_until("the renewed certificate is served", MIN, || rt.block_on(presented(&fed)) == fingerprint, &fed);
    let log = fed.log_text("coordinator");
    assert!(log.contains("renewed the coordinator's TLS certificate"), "{log}");

    // Attacker's view, as a site: no renewal for another identity or another key, and
    // asking before it is due changes nothing.
    rt.block_on(async {
        let mut client = maeum_e2e::site_client(&fed, "site-1").await;
        let key = SecretPem::new(read(&fed.site_home("site-1").join("site.key")));
        let ask = |csr_pem: String| pb::RenewCertificateRequest { csr_pem };
        let other =
            client.renew_certificate(ask(renewal_request("site-2", &key).expect("csr"))).await.expect_err("refused");
        assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
        assert!(other.message().contains("expected site/site-1"), "{other:?}");
        let (fresh, csr) = identity::site_request("site-1").expect("csr");
        drop(fresh);
        let new_key = client.renew_certificate(ask(csr)).await.expect_err("refused");
        assert!(new_key.message().contains("another key"), "{new_key:?}");
        let huge = client.renew_certificate(ask("x".repeat(20_000))).await.expect_err("refused");
        assert_eq!(huge.code(), tonic::Code::PermissionDenied, "{huge:?}");
        let again = client.renew_certificate(ask(renewal_request("site-1", &key).expect("csr"))).await.expect("renew");
        let again = again.into_inner();
        assert!(!again.renewed, "not due: nothing is signed");
        assert_eq!(again.cert_pem, read(&fed.site_home("site-1").join("site.pem")));
    });

    // Nobody restarted, and a secure-aggregation job runs on the renewed certificates:
    // every site proves every other's new certificate against the log.
    assert_eq!(SITES.iter().map(|s| fed.site_pid(s)).collect::<Vec<_>>(), pids);
    assert_eq!(fed.coordinator_pid(), coordinator_pid);
    // The lead renews the operator certificate offline; the next CLI call uses it.
    let before = read(&coordinator.join("operator.pem"));
    let out = maeum_e2e::run_ok(
        std::process::Command::new(maeum_e2e::bin("maeum-coordinator"))
            .args(["operator", "renew", "--json", "--home"])
            .arg(&coordinator),
    );
    let renewal: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(renewal["operator"], "lead", "{renewal}");
    let after = read(&coordinator.join("operator.pem"));
    assert_ne!(before, after);
    assert!(identity::same_public_key(&der(&before), &der(&after)).expect("keys"), "the operator keeps its key");
    let job = "[model]\nkind = \"adapter-stand-in\"\nparams = 4096\n[train]\nlearning_rate = 0.5\n\
               [secure_aggregation]\nclip = 4.0\n";
    let id = fed.submit("after-renewal", 2, SITES.len(), job);
    let status = fed.wait_job(&id, 3 * MIN);
    assert_eq!(status["state"], "completed", "{status:#}\n{}", fed.log_text("coordinator"));
    for r in status["history"].as_array().expect("history") {
        assert_eq!(r["contributors"].as_array().map(Vec::len), Some(SITES.len()), "{r:#}");
    }
    let roster = std::process::Command::new(maeum_e2e::bin("maeum-site"))
        .args(["audit", "sites", "--json", "--home"])
        .arg(fed.site_home("site-1"))
        .output()
        .expect("maeum-site audit sites");
    let roster: serde_json::Value = serde_json::from_slice(&roster.stdout).expect("json");
    for s in SITES {
        let now = identity::fingerprint(&der(&read(&fed.site_home(s).join("site.pem"))));
        assert_eq!(roster[s]["cert_fingerprint"], now.as_str(), "{roster:#}");
        assert_eq!(roster[s]["approved_by"], "site_approved", "{roster:#}");
    }
}

/// `site`'s certificate for its own key, signed by the consortium CA, that expired
/// `days_ago` days ago (what a site finds after months switched off).
fn expired(fed: &Federation, site: &str, days_ago: u64) -> String {
    let (home, site_home) = (fed.coordinator_home(), fed.site_home(site));
    let ca_key = rcgen::KeyPair::from_pem(&read(&home.join("ca.key"))).expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read(&home.join("ca.pem")), ca_key).expect("CA");
    let key = SecretPem::new(read(&site_home.join("site.key")));
    let csr = renewal_request(site, &key).expect("request");
    let mut request = rcgen::CertificateSigningRequestParams::from_pem(&csr).expect("parse request");
    let now = std::time::SystemTime::now();
    request.params.not_after = (now - Duration::from_secs(days_ago * 86_400)).into();
    request.params.not_before = (now - Duration::from_secs((days_ago + 300) * 86_400)).into();
    request.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    request.params.use_authority_key_identifier_extension = true;
    request.signed_by(&issuer).expect("sign").pem()
}

/// A site switched off past its certificate's expiry used to need the lead (a new
/// approval and enrolment). Within 90 days of expiry its connection still opens, the
/// coordinator serves it nothing but `RenewCertificate`, and the site renews itself
/// when it comes back: no person involved, nothing else served on the expired one.
#[test]
fn a_site_back_after_its_certificate_expired_renews_itself_within_the_grace() {
    let mut fed = Federation::new(SITES.len());
    let old = expired(&fed, "site-1", 10);
    std::fs::write(fed.site_home("site-1").join("site.pem"), &old).expect("site.pem");
    std::fs::write(fed.coordinator_home().join("sites/site-1.pem"), &old).expect("the approval record");
    assert!(days_left(&old) < 0);
    fed.start_coordinator();
    // On the expired certificate the coordinator serves the renewal and nothing else.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let refused = rt.block_on(async {
        let mut client = maeum_e2e::site_client(&fed, "site-1").await;
        client.heartbeat(pb::SiteStatus::default()).await.expect_err("a heartbeat on an expired certificate")
    });
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("may only renew it"), "{refused:?}");
    fed.start_sites(&SITES);
    fed.wait_online(SITES.len());
    let renewed = read(&fed.site_home("site-1").join("site.pem"));
    assert!(days_left(&renewed) > 300, "site-1 renewed itself: {} days left", days_left(&renewed));
    assert_eq!(
        identity::leaf_der(&renewed).ok(),
        identity::leaf_der(&read(&fed.coordinator_home().join("sites/site-1.pem"))).ok()
    );
    let log = fed.log_text("site-1");
    assert!(log.contains("renewed this site's certificate"), "{log}");
    // Past the grace (unit test `an_expired_site_certificate_connects_within_the_grace_and_nothing_else_does`)
    // the handshake itself is refused, and the lead approves the site again.
}
