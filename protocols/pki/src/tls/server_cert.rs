//! The coordinator's own certificate, replaceable while it serves.
//!
//! Every handshake asks [`ServerCertificate`] for the current certificate, so a renewed
//! one (or one an operator put in place) is used from the next connection on; the
//! connections already open keep theirs until they close. Nothing restarts.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign;

use super::TlsError;
use crate::identity::{CertifiedKey, fingerprint, not_after_unix, pem_to_der};

/// What the coordinator presents in each TLS handshake. Cheap to share (`Arc`).
pub struct ServerCertificate {
    current: RwLock<Current>,
}

#[derive(Clone)]
struct Current {
    key: Arc<sign::CertifiedKey>,
    cert_pem: String,
    fingerprint: String,
    not_after: i64,
}

impl ServerCertificate {
    /// Checks that `server`'s key belongs to its certificate and serves it.
    pub fn new(server: &CertifiedKey) -> Result<Arc<ServerCertificate>, TlsError> {
        Ok(Arc::new(ServerCertificate { current: RwLock::new(load(server)?) }))
    }

    /// Serves `server` from the next handshake on. Checked first as in [`Self::new`]:
    /// on error the certificate in service stays.
    pub fn replace(&self, server: &CertifiedKey) -> Result<(), TlsError> {
        let next = load(server)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    /// The certificate in service, PEM.
    pub fn cert_pem(&self) -> String {
        self.read().cert_pem
    }

    /// SHA-256 of the certificate in service, lowercase hex.
    pub fn fingerprint(&self) -> String {
        self.read().fingerprint
    }

    /// `notAfter` of the certificate in service, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.read().not_after
    }

    fn read(&self) -> Current {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

fn load(server: &CertifiedKey) -> Result<Current, TlsError> {
    let chain =
        pem_to_der(&server.cert_pem).map_err(|cause| TlsError::Certificate { what: "server certificate", cause })?;
    let leaf = chain.first().ok_or(TlsError::Certificate {
        what: "server certificate",
        cause: crate::identity::IdentityError::Parse { what: "server certificate", reason: "empty PEM".into() },
    })?;
    let (fingerprint, not_after) = (
        fingerprint(leaf),
        not_after_unix(leaf).map_err(|cause| TlsError::Certificate { what: "server certificate", cause })?,
    );
    let key = PrivateKeyDer::from_pem_slice(server.key.expose().as_bytes()).map_err(|_| TlsError::BadKey)?;
    let key = sign::CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(TlsError::Config)?;
    Ok(Current { key: Arc::new(key), cert_pem: server.cert_pem.clone(), fingerprint, not_after })
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).key.clone())
    }
}

impl fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.read();
        f.debug_struct("ServerCertificate")
            .field("fingerprint", &current.fingerprint)
            .field("not_after", &current.not_after)
            .finish_non_exhaustive()
    }
}
