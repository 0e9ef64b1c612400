//! The site's certificate, renewed while the daemon runs
//! (`docs/protocols/certificates.md`).
//!
//! When a heartbeat says the certificate this site presents is due, the daemon asks the
//! coordinator for a new one with a request for the key it already has (`site.key`
//! never changes and never leaves). It checks what comes back as it checks an enrolment
//! bundle, and more: issued by the consortium CA, valid now, naming this site, for this
//! key, and lasting longer than the one it replaces. Only then is `site.pem` replaced
//! (atomically), and the daemon dials again, so every later call presents the new
//! certificate. Nothing restarts. A coordinator that answers anything else gets nothing
//! from this site but a warning in its log, and the next attempt waits. A certificate
//! that expired while the site was away (at most `maeum_pki::tls::EXPIRED_GRACE_DAYS`)
//! still opens a connection that may only renew it: the heartbeat fails, and the site
//! renews at once ([`expired`]).
//!
//! After a CA rollover the site trusts the retired CAs beside the new one, so that the
//! coordinator's certificate of a retired CA still verifies until the coordinator moves.
//! While that lasts, the daemon asks (a handshake trusting the CA in effect only,
//! [`maeum_pki::tls::serves_certificate_of`], at most every [`PROBE_EVERY`]) whether
//! the coordinator serves a certificate of the new CA yet; once it does, the site
//! records it (`crate::keys::SERVER_CA`) and dials again, accepting the coordinator's
//! certificate from the new CA only. A retired CA's key, leaked, then cannot
//! impersonate the coordinator to this site.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::{debug, info, warn};

use maeum_pki::identity::{self, CertificateDer, CertifiedKey, PeerId};
use maeum_pki::renewal::renewal_request;
use maeum_protocols::wire::pb;

use super::{Agent, Client, connect, describe};

/// The daemon's certificate upkeep.
#[derive(Default)]
pub(crate) struct Upkeep {
    /// A renewal is in flight; after a failed one, not before this time.
    renewing: AtomicBool,
    renew_after: std::sync::Mutex<Option<Instant>>,
    /// A probe of the coordinator's CA is in flight; the next not before this time.
    probing: AtomicBool,
    probe_after: std::sync::Mutex<Option<Instant>>,
}

/// How often a site whose coordinator still serves a retired CA's certificate asks again
/// (a TLS handshake; only between a rollover and the coordinator's move to the new CA).
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(60);

/// After a failed attempt, the next waits this long (the old certificate is good for
/// weeks still; a coordinator that cannot sign now is asked again later).
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(600);

/// Whether this site's certificate (HOME/site.pem) has expired.
pub(crate) fn expired(home: &crate::enrol::Home) -> bool {
    home.read("site.pem")
        .ok()
        .and_then(|pem| identity::leaf_der(&pem).ok())
        .and_then(|der| identity::not_after_unix(&der).ok())
        .is_some_and(|t| t < crate::now_ms() / 1000)
}

/// Starts a renewal unless one runs or a failed one is waiting out [`RETRY_AFTER`].
pub(crate) fn maybe_renew(agent: &Arc<Agent>, client: &Client) {
    let up = &agent.upkeep;
    let waiting = super::lock(&up.renew_after).is_some_and(|t| Instant::now() < t);
    if waiting || up.renewing.swap(true, Ordering::SeqCst) {
        return;
    }
    let (agent, client) = (agent.clone(), client.clone());
    tokio::spawn(async move {
        match renew(&agent, client).await {
            Ok(()) => *super::lock(&agent.upkeep.renew_after) = None,
            Err(e) => {
                warn!(
                    error = %format!("{e:#}"),
                    retry_in_s = RETRY_AFTER.as_secs(),
                    "renewing this site's certificate failed; the current one stays in use"
                );
                agent.metrics.errors.inc("certificate_renewal");
                *super::lock(&agent.upkeep.renew_after) = Some(Instant::now() + RETRY_AFTER);
            }
        }
        agent.upkeep.renewing.store(false, Ordering::SeqCst);
    });
}

/// After a CA rollover, until the coordinator is seen serving a certificate of the new
/// CA: asks it (one handshake) unless a probe runs or the last was under
/// [`PROBE_EVERY`] ago.
pub(crate) fn maybe_probe_ca(agent: &Arc<Agent>) {
    let Ok(Some(ca)) = crate::keys::server_ca_pending(&agent.home) else { return };
    let up = &agent.upkeep;
    let waiting = super::lock(&up.probe_after).is_some_and(|t| Instant::now() < t);
    if waiting || up.probing.swap(true, Ordering::SeqCst) {
        return;
    }
    let agent = agent.clone();
    tokio::spawn(async move {
        if let Err(e) = probe_ca(&agent, &ca).await {
            debug!(error = %format!("{e:#}"), "probing which CA the coordinator's certificate comes from failed");
        }
        let every = crate::secure::test_env("MAEUM_SITE_TEST_CA_PROBE_MS")
            .and_then(|v| v.parse().ok())
            .map_or(PROBE_EVERY, Duration::from_millis);
        *super::lock(&agent.upkeep.probe_after) = Some(Instant::now() + every);
        agent.upkeep.probing.store(false, Ordering::SeqCst);
    });
}

async fn probe_ca(agent: &Agent, ca: &CertificateDer<'static>) -> Result<()> {
    let home = &agent.home;
    let enrolment = home.enrolment()?;
    let me = home.identity()?;
    if !maeum_pki::tls::serves_certificate_of(&enrolment.coordinator_address, &enrolment.coordinator_name, ca, &me)
        .await?
    {
        debug!("the coordinator still serves a certificate of a retired CA");
        return Ok(());
    }
    let retired = crate::keys::trusted_cas(home)?.len() - 1;
    crate::keys::set_server_ca(home, ca)?;
    agent.set_client(connect(home).await?);
    info!(
        ca = %&identity::fingerprint(ca)[..16],
        retired,
        "the coordinator serves a certificate of the CA in effect: its certificates of the retired CAs are no \
         longer accepted from it"
    );
    Ok(())
}

async fn renew(agent: &Agent, mut client: Client) -> Result<()> {
    let home = &agent.home;
    let current = home.identity()?;
    let csr_pem = renewal_request(&agent.site_id, &current.key).context("making the renewal request")?;
    let reply = client
        .renew_certificate(pb::RenewCertificateRequest { csr_pem })
        .await
        .map_err(|e| anyhow::anyhow!("the coordinator answered: {}", describe(&e)))?
        .into_inner();
    let new = identity::leaf_der(&reply.cert_pem).unwrap_or_default();
    if !crate::keys::trusted_cas(home)?.iter().any(|ca| maeum_pki::rollover::issued_by(&new, ca)) {
        // Issued by a CA this site does not trust (yet): the consortium may have rolled
        // its CA over. Witnessing the latest checkpoint follows a rollover the log
        // proves (`crate::keys::follow_cas`); anything else is refused below.
        super::witnessing::witness_now(agent, &client).await;
    }
    let Some(new_der) = accept(&home.read("ca.pem")?, &agent.site_id, &current, &reply.cert_pem)? else {
        // Not due by the coordinator's clock after all: a heartbeat that keeps saying
        // otherwise is asked again only after RETRY_AFTER, not every second.
        bail!("the coordinator asked for a renewal but holds no newer certificate for this site");
    };
    let new_until = identity::not_after_unix(&new_der)?;
    let path = home.path("site.pem");
    maeum_models::write_file(&path, reply.cert_pem.as_bytes(), false)
        .with_context(|| format!("writing {}", path.display()))?;
    // Dial again: calls from here on present the new certificate, and the connection
    // with the old one closes once its calls in flight are done.
    agent.set_client(connect(home).await?);
    info!(
        fingerprint = %identity::fingerprint(&new_der),
        days_left = (new_until - crate::now_ms() / 1000) / 86_400,
        "renewed this site's certificate (same key); site.pem replaced, no restart"
    );
    agent.metrics.certificate_renewals.inc();
    Ok(())
}

/// Checks the certificate the coordinator sent (`new_pem`) against the one in use:
/// `None` when it is the same, its DER when it may replace it.
fn accept(ca_pem: &str, site_id: &str, current: &CertifiedKey, new_pem: &str) -> Result<Option<Vec<u8>>> {
    let now_der = identity::leaf_der(&current.cert_pem).context("site.pem")?;
    let new_der = identity::leaf_der(new_pem).context("the coordinator's answer")?;
    if new_der == now_der {
        return Ok(None);
    }
    identity::verify_peer_cert(ca_pem, &new_der, &PeerId::site(site_id)?).context("the certificate it sent")?;
    if !identity::key_matches_cert(&current.key, &new_der)? {
        bail!("the certificate it sent is not for this site's key");
    }
    let (now_until, new_until) = (identity::not_after_unix(&now_der)?, identity::not_after_unix(&new_der)?);
    if new_until <= now_until {
        bail!("the certificate it sent expires no later than the one in use ({new_until} <= {now_until})");
    }
    Ok(Some(new_der))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use maeum_pki::identity::{Ca, site_request};

    #[test]
    fn a_site_takes_only_a_longer_certificate_for_its_own_key_and_identity_from_its_ca() {
        let ca = Ca::generate("heart", 3650).unwrap();
        let (key, csr) = site_request("a").unwrap();
        let (_, short) = ca.sign_site_request(&csr, Some("a"), 20).unwrap();
        let current = CertifiedKey { cert_pem: short.clone(), key: key.clone() };
        let renew = renewal_request("a", &key).unwrap();
        let (_, long) = ca.sign_site_request(&renew, Some("a"), 397).unwrap();
        assert!(accept(ca.cert_pem(), "a", &current, &long).unwrap().is_some());
        assert!(accept(ca.cert_pem(), "a", &current, &short).unwrap().is_none());
        let refused = |pem: &str, why: &str| {
            let e = format!("{:#}", accept(ca.cert_pem(), "a", &current, pem).unwrap_err());
            assert!(e.contains(why), "{e}");
        };
        // Shorter than the one in use.
        let (_, shorter) = ca.sign_site_request(&renew, Some("a"), 10).unwrap();
        refused(&shorter, "expires no later");
        // Another key (the coordinator's choice, not this site's).
        let (_, other_csr) = site_request("a").unwrap();
        let (_, other_key) = ca.sign_site_request(&other_csr, Some("a"), 397).unwrap();
        refused(&other_key, "not for this site's key");
        // Another site's identity for this key.
        let (_, b) = ca.sign_site_request(&renewal_request("b", &key).unwrap(), Some("b"), 397).unwrap();
        refused(&b, "names site/b");
        // Another CA.
        let stranger = Ca::generate("heart", 3650).unwrap();
        let (_, foreign) = stranger.sign_site_request(&renew, Some("a"), 397).unwrap();
        refused(&foreign, "not valid under the consortium CA");
        refused("junk", "the coordinator's answer");
    }
}
