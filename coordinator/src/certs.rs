//! Certificates renewed while everything runs (`docs/protocols/certificates.md`).
//!
//! - **Sites.** A heartbeat tells a site when the certificate it presents expires within
//!   `home::RENEW_DAYS`; the site asks `RenewCertificate` with a request for the key it
//!   already has. The coordinator signs it only for the calling site's own identity and
//!   key, with `sites approve`'s own rules (`home::approve_with`): a new key stays a lead's
//!   decision (`sites approve --replace`). The new certificate is logged
//!   (`site_approved`) before the site gets it, so other sites find it in the log when
//!   they check a secure-aggregation roster.
//! - **The coordinator.** [`keep_server_certificate`] looks at `HOME/server.pem` every
//!   hour: a certificate put there by an operator is served from the next handshake on,
//!   and one that expires within `home::RENEW_DAYS` is reissued by the consortium CA for
//!   the same key and host names. Neither needs a restart. After a CA rollover
//!   (`crate::ca_rollover`) it is reissued by the new CA once every approved site holds
//!   a certificate of it.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{info, warn};

use maeum_pki::identity::{self, CertifiedKey};
use maeum_pki::tls::ServerCertificate;

use crate::home::{self, Approval, CERT_DAYS, Home, due};
use crate::server::Coord;

/// How often the coordinator looks at its own certificate.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// One renewal at a time: a site's two calls, or a call and `sites approve`'s watcher,
/// must not both sign.
static RENEWING: Mutex<()> = Mutex::new(());

/// Why [`renew_site`] did not renew.
#[derive(Debug)]
pub enum RenewError {
    /// The request is not one the coordinator signs for this caller (another site,
    /// another key, no approved record); the reason is for the site.
    Refused(String),
    /// Something at the coordinator failed (its log has the detail).
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for RenewError {
    fn from(e: anyhow::Error) -> Self {
        RenewError::Failed(e)
    }
}

/// Largest certificate request `RenewCertificate` reads (a P-256 request is < 1 KiB).
pub const MAX_REQUEST: usize = 16 * 1024;

/// `RenewCertificate` for `site` (the caller's verified identity): signs `csr_pem` when
/// it names `site` with the key of the site's approved certificate and that certificate
/// is due; otherwise returns the approved certificate as it is. Logs a new certificate
/// (`site_approved`) before returning it. Blocking (files, the state database).
pub fn renew_site(coord: &Coord, site: &str, csr_pem: &str) -> Result<(String, bool), RenewError> {
    if csr_pem.len() > MAX_REQUEST {
        return Err(RenewError::Refused(format!("the certificate request is over {MAX_REQUEST} bytes")));
    }
    let _one = RENEWING.lock().unwrap_or_else(PoisonError::into_inner);
    let record = coord.home.sites().join(format!("{site}.pem"));
    if !record.exists() {
        // A site with a valid certificate but no record was approved by another home or
        // had its record removed: a person must look, not this call.
        return Err(RenewError::Refused(format!(
            "site {site} has no approved certificate at the coordinator; the lead must approve its request again"
        )));
    }
    // Signed only for the caller's own identity and approved key; `approve_with` writes
    // nothing for a request it refuses.
    let (bundle, approval) = match home::approve_with(&coord.home, csr_pem, Some(site), false) {
        Ok(approved) => approved,
        Err(e) if e.downcast_ref::<home::OtherKey>().is_some() => {
            return Err(RenewError::Refused(format!(
                "the request carries another key than site {site}'s approved certificate; renewal keeps the key, \
                 and a new key needs the lead (`sites approve --replace`)"
            )));
        }
        Err(e) => match e.downcast_ref::<identity::IdentityError>() {
            Some(
                refused @ (identity::IdentityError::RequestRefused { .. } | identity::IdentityError::WrongSite { .. }),
            ) => {
                return Err(RenewError::Refused(refused.to_string()));
            }
            _ => return Err(e.into()),
        },
    };
    let renewed = match approval {
        Approval::Renewed => true,
        Approval::AlreadyApproved => false,
        Approval::New | Approval::Replaced { .. } => {
            return Err(anyhow::anyhow!("renewing site {site} approved a new site or key").into());
        }
    };
    if renewed {
        let der = identity::leaf_der(&bundle.cert_pem).map_err(anyhow::Error::from)?;
        info!(
            site,
            fingerprint = %identity::fingerprint(&der),
            not_after = identity::not_after_unix(&der).map_err(anyhow::Error::from)?,
            "renewed a site's certificate (same key)"
        );
        coord.metrics.certificates_renewed.inc("site");
        coord.sync_approvals().context("logging the renewed certificate")?;
        // Signed now, so that sites can prove the new certificate in a session roster.
        coord.audit.checkpoint().context("signing a checkpoint after the renewal")?;
        coord.notify();
    }
    Ok((bundle.cert_pem, renewed))
}

/// Serves what `HOME/server.pem` holds and renews it when due, at start and every
/// [`CHECK_EVERY`] (a test's shorter period in fault-injection builds). Never returns.
pub async fn keep_server_certificate(coord: Arc<Coord>, cert: Arc<ServerCertificate>) {
    let every = crate::attack::test_env("MAEUM_COORDINATOR_TEST_CERT_CHECK_MS")
        .and_then(|ms| ms.parse().ok())
        .map_or(CHECK_EVERY, Duration::from_millis);
    loop {
        let (c, s) = (coord.clone(), cert.clone());
        match tokio::task::spawn_blocking(move || check_server(&c.home, &s, &c.metrics, &c.revocations)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %format!("{e:#}"), "checking the coordinator's TLS certificate"),
            Err(e) => warn!(error = %e, "checking the coordinator's TLS certificate"),
        }
        coord.metrics.server_certificate_expiry.set(cert.not_after());
        tokio::time::sleep(every).await;
    }
}

/// One look at `HOME/server.pem`: serve a changed one, renew a due one, and after a CA
/// rollover reissue it from the new CA once every approved site holds a certificate of
/// that CA (each such site trusts it: it checked its renewed certificate with it).
pub fn check_server(
    home: &Home,
    cert: &ServerCertificate,
    metrics: &crate::metrics::CoordMetrics,
    revocations: &maeum_pki::tls::Revocations,
) -> Result<()> {
    let _one = RENEWING.lock().unwrap_or_else(PoisonError::into_inner);
    let on_disk = home.identity("server")?;
    if on_disk.cert_pem != cert.cert_pem() {
        cert.replace(&on_disk).context("HOME/server.pem changed, and cannot be served (the old one stays)")?;
        info!(fingerprint = %cert.fingerprint(), not_after = cert.not_after(), "serving the new HOME/server.pem");
    }
    let ca = home.ca_der()?;
    let moved = !maeum_pki::rollover::issued_by(&identity::leaf_der(&on_disk.cert_pem)?, &ca) && {
        let (moved, total) = crate::ca_rollover::sites_moved(home, &|site| revocations.is_revoked(site))?;
        if moved < total {
            info!(moved, total, "serving the certificate of the retired CA until every site holds one of the new CA");
        }
        moved == total
    };
    if !due(cert.not_after()) && !moved {
        return Ok(());
    }
    if moved {
        info!("every approved site holds a certificate of the new CA: reissuing the coordinator's from it");
    }
    let renewed = home.ca()?.reissue(&on_disk.cert_pem, &on_disk.key, CERT_DAYS)?;
    let next = CertifiedKey { cert_pem: renewed, key: on_disk.key };
    let old = cert.fingerprint();
    // Served only once it is on disk: a restart then finds the same certificate.
    home::write_file(&home.path("server.pem"), next.cert_pem.as_bytes(), false)?;
    cert.replace(&next)?;
    metrics.certificates_renewed.inc("server");
    info!(old = %old, fingerprint = %cert.fingerprint(), not_after = cert.not_after(), "renewed the coordinator's TLS certificate (same key)");
    Ok(())
}
