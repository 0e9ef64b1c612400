//! Which CA the coordinator's own certificate comes from, as a site sees it.
//!
//! After a CA rollover a site trusts the retired CAs and the new one, so that the
//! coordinator's certificate of the retired CA still verifies until the coordinator
//! moves to the new one. Whoever holds a retired CA key could mint a certificate for the
//! coordinator's name that such a site accepts. A site therefore asks, with a handshake
//! that trusts only the CA in effect, whether the coordinator serves a certificate of
//! it; once it does, the site accepts the coordinator's certificate from that CA on only
//! (`docs/protocols/certificates.md#rolling-over-the-ca`).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{CertificateError, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::TlsError;
use crate::identity::{CertifiedKey, pem_to_der};

/// How long a probe may take, connection and handshake together.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the server at `address` (`host:port`) presents a certificate for
/// `server_name` issued by `ca`, in a full mTLS handshake presenting `me`.
/// `Ok(false)`: it presented a certificate of another CA. `Err`: it could not be asked
/// (unreachable, not TLS, too slow, or it refused `me`).
pub async fn serves_certificate_of(
    address: &str,
    server_name: &str,
    ca: &CertificateDer<'static>,
    me: &CertifiedKey,
) -> Result<bool, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(TlsError::Config)?;
    let chain = pem_to_der(&me.cert_pem).map_err(|cause| TlsError::Certificate { what: "site certificate", cause })?;
    let key = rcgen::KeyPair::from_pem(me.key.expose()).map_err(|_| TlsError::BadKey)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| TlsError::Probe(format!("{server_name:?} is not a server name")))?;
    let probe = async {
        let tcp = TcpStream::connect(address).await.map_err(|e| TlsError::Probe(format!("connecting: {e}")))?;
        match TlsConnector::from(Arc::new(config)).connect(name, tcp).await {
            Ok(_) => Ok(true),
            Err(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                )) => Ok(false),
                _ => Err(TlsError::Probe(format!("the handshake failed: {e}"))),
            },
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err(TlsError::Probe(format!("no handshake within {} s", PROBE_TIMEOUT.as_secs()))))
}
