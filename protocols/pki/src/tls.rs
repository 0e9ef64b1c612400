//! mTLS for the coordinator and its clients: rustls configurations, site revocation, and
//! an accept loop that hands tonic connections with verified peer identities.
//!
//! # Threat model
//!
//! Only holders of a certificate from the consortium CA may talk to the coordinator, and
//! every request must be attributable to one identity. rustls' WebPKI verifier proves
//! that a client certificate chains to the CA and is meant for client authentication; it
//! knows nothing of Maeum identities or of revocation. The coordinator's verifier wraps
//! it and, in the same handshake, refuses certificates that carry no `maeum://`
//! identity and certificates of revoked sites — so a refused peer never reaches a gRPC
//! handler, and the reason is logged with its address.
//!
//! Revocation also reaches connections that are already open: [`Revocations::revoke`]
//! cuts every live connection of the site, even an idle one that would otherwise stay up
//! for as long as HTTP/2 keeps it alive. [`Revocations::revoke_certificate`] does the
//! same for one certificate of a site (its key was replaced), leaving the others.
//!
//! Clients verify the coordinator by host name or IP address like any TLS client, but
//! against the consortium CA only. The CA gives server authentication only to the
//! coordinator (site and operator certificates are client-only), so no other consortium
//! member can pose as it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::identity::{CertifiedKey, IdentityError, PeerId, Role, fingerprint, not_after_unix, pem_to_der};

mod probe;
mod server_cert;
pub use probe::serves_certificate_of;
pub use server_cert::ServerCertificate;

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Established connections waiting for the server to take them.
const QUEUE: usize = 64;

/// Errors of the TLS layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate PEM could not be read.
    #[error("reading the {what}: {cause}")]
    Certificate {
        /// Which certificate.
        what: &'static str,
        /// What is wrong with it.
        cause: IdentityError,
    },
    /// The server's private key could not be read (the content is deliberately not shown).
    #[error("the server key is not a valid private key PEM")]
    BadKey,
    /// rustls refused the CA certificate, the server certificate or its key.
    #[error("building the TLS server config: {0}")]
    Config(rustls::Error),
    /// rustls could not build the client certificate verifier.
    #[error("building the client certificate verifier: {0}")]
    Verifier(VerifierBuilderError),
    /// A client certificate chains to the CA but carries no usable `maeum://` identity.
    #[error("client certificate has no usable identity: {0}")]
    NoIdentity(IdentityError),
    /// Asking a server which CA its certificate comes from failed
    /// ([`serves_certificate_of`]).
    #[error("probing the coordinator's certificate: {0}")]
    Probe(String),
    /// A client certificate belongs to a revoked site.
    #[error("certificate for {0} is revoked")]
    Revoked(PeerId),
    /// This certificate of a site was revoked when the site's key was replaced.
    #[error("certificate {fingerprint} of {peer} was replaced by a new key and is revoked")]
    Replaced {
        /// The site.
        peer: PeerId,
        /// The revoked certificate's SHA-256, hex.
        fingerprint: String,
    },
    /// The TLS handshake failed (including every refusal by the verifier).
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    /// The client did not complete its handshake in time.
    #[error("TLS handshake not completed within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout,
}

/// Revoked site ids, shared by the TLS verifier and the live connections. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    registry: Arc<Mutex<Registry>>,
}

#[derive(Debug, Default)]
struct Registry {
    revoked: HashSet<String>,
    /// Fingerprints of single revoked certificates (replaced keys).
    revoked_certs: HashSet<String>,
    /// Live connections by site id, then by connection number, with the certificate's
    /// fingerprint.
    live: HashMap<String, HashMap<u64, (String, Arc<Cut>)>>,
    next_connection: u64,
}

impl Revocations {
    /// Starts with `ids` revoked, e.g. as loaded from the coordinator's store.
    pub fn new(ids: impl IntoIterator<Item = String>) -> Self {
        let registry = Registry { revoked: ids.into_iter().collect(), ..Registry::default() };
        Revocations { registry: Arc::new(Mutex::new(registry)) }
    }

    /// Whether site `id` is revoked.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.lock().revoked.contains(id)
    }

    /// Whether the certificate with SHA-256 `fingerprint` (hex) is revoked on its own.
    pub fn is_certificate_revoked(&self, fingerprint: &str) -> bool {
        self.lock().revoked_certs.contains(fingerprint)
    }

    /// Revokes one certificate of site `id` (its key was replaced): new handshakes with
    /// it are refused and the site's open connections that use it are cut; the site's
    /// other certificates keep working.
    pub fn revoke_certificate(&self, id: &str, fingerprint: &str) {
        let cuts: Vec<Arc<Cut>> = {
            let mut registry = self.lock();
            if !registry.revoked_certs.insert(fingerprint.to_owned()) {
                return;
            }
            registry
                .live
                .get(id)
                .map(|conns| conns.values().filter(|(f, _)| f == fingerprint).map(|(_, c)| Arc::clone(c)).collect())
                .unwrap_or_default()
        };
        tracing::info!(site = id, open_connections = cuts.len(), "site certificate revoked");
        for cut in cuts {
            cut.trigger();
        }
    }

    /// Marks `id` revoked: new handshakes with that identity are refused, and every open
    /// connection whose peer is `id` is cut (its next read fails) within milliseconds,
    /// even if idle.
    pub fn revoke(&self, id: &str) {
        let cuts: Vec<Arc<Cut>> = {
            let mut registry = self.lock();
            registry.revoked.insert(id.to_owned());
            registry.live.get(id).map(|conns| conns.values().map(|(_, c)| Arc::clone(c)).collect()).unwrap_or_default()
        };
        tracing::info!(site = id, open_connections = cuts.len(), "site revoked");
        for cut in cuts {
            cut.trigger();
        }
    }

    /// Registers a live connection of site `id` with the certificate `fingerprint`,
    /// unless the site or that certificate has been revoked since its handshake was
    /// verified.
    fn register(&self, id: &str, fingerprint: &str) -> Option<Registration> {
        let mut registry = self.lock();
        if registry.revoked.contains(id) || registry.revoked_certs.contains(fingerprint) {
            return None;
        }
        let number = registry.next_connection;
        registry.next_connection += 1;
        let cut = Arc::new(Cut::default());
        registry.live.entry(id.to_owned()).or_default().insert(number, (fingerprint.to_owned(), Arc::clone(&cut)));
        Some(Registration { revocations: self.clone(), site: id.to_owned(), number, cut })
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the sets half-updated.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The kill switch of one connection, and the wakers of its pending read and write.
#[derive(Debug, Default)]
struct Cut {
    cut: AtomicBool,
    read_waker: Mutex<Option<Waker>>,
    write_waker: Mutex<Option<Waker>>,
}

impl Cut {
    /// Remembers `cx`'s waker in `slot`, then reports whether the connection is cut.
    /// Storing first means a `trigger` racing with this call still wakes the task.
    fn is_cut(&self, slot: &Mutex<Option<Waker>>, cx: &Context<'_>) -> bool {
        let mut stored = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if !stored.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *stored = Some(cx.waker().clone());
        }
        drop(stored);
        self.cut.load(Ordering::SeqCst)
    }

    fn trigger(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for slot in [&self.read_waker, &self.write_waker] {
            let waker = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// A site connection's entry in the registry; removes it when the connection drops.
#[derive(Debug)]
struct Registration {
    revocations: Revocations,
    site: String,
    number: u64,
    cut: Arc<Cut>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = self.revocations.lock();
        if let Some(conns) = registry.live.get_mut(&self.site) {
            conns.remove(&self.number);
            if conns.is_empty() {
                registry.live.remove(&self.site);
            }
        }
    }
}

/// The coordinator's client certificate verifier: WebPKI against the consortium CA, then
/// a `maeum://` identity, then revocation.
#[derive(Debug)]
struct IdentityVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

impl IdentityVerifier {
    fn check_identity(&self, end_entity: &CertificateDer<'_>) -> Result<(), TlsError> {
        let peer = PeerId::from_cert_der(end_entity).map_err(TlsError::NoIdentity)?;
        if peer.role == Role::Site && self.revocations.is_revoked(&peer.name) {
            return Err(TlsError::Revoked(peer));
        }
        let print = fingerprint(end_entity);
        if peer.role == Role::Site && self.revocations.is_certificate_revoked(&print) {
            return Err(TlsError::Replaced { peer, fingerprint: print });
        }
        Ok(())
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = match self.webpki.verify_client_cert(end_entity, intermediates, now) {
            Err(e) if is_expired(&e) => match expired_within_grace(end_entity, now) {
                // Everything else checked as of the moment before it expired: the
                // handlers then serve this connection nothing but its renewal.
                Some(then) => self.webpki.verify_client_cert(end_entity, intermediates, then)?,
                None => return Err(e),
            },
            other => other?,
        };
        self.check_identity(end_entity).map_err(|e| rustls::Error::Other(OtherError(Arc::new(e))))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// How long after its expiry a **site** certificate still opens a connection, on which
/// the coordinator serves only its renewal (`docs/protocols/certificates.md`): a site
/// offline past its renewal window renews itself when it returns instead of waiting for
/// the lead. Operator and coordinator certificates get no grace.
pub const EXPIRED_GRACE_DAYS: i64 = 90;

fn is_expired(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
        )
    )
}

/// For a site certificate that expired less than [`EXPIRED_GRACE_DAYS`] before `now`:
/// the last moment it was valid.
fn expired_within_grace(cert: &CertificateDer<'_>, now: UnixTime) -> Option<UnixTime> {
    if PeerId::from_cert_der(cert).ok()?.role != Role::Site {
        return None;
    }
    let not_after = u64::try_from(not_after_unix(cert).ok()?).ok()?;
    let now_s = now.as_secs();
    (now_s > not_after && now_s - not_after <= EXPIRED_GRACE_DAYS as u64 * 86_400)
        .then(|| UnixTime::since_unix_epoch(Duration::from_secs(not_after)))
}

/// Server config: TLS 1.3/1.2 with ring, ALPN "h2", client certificate mandatory,
/// verified by rustls' WebPkiClientVerifier against the consortium CA, wrapped in a
/// verifier that additionally refuses (a) certificates without a `maeum://` identity and
/// (b) revoked site ids, with an error that names the reason ("certificate for site/x
/// is revoked"). The server's own certificate comes from `server` at each handshake, so
/// [`ServerCertificate::replace`] renews it without a restart.
pub fn server_config(
    ca_pem: &str,
    server: &Arc<ServerCertificate>,
    revocations: Revocations,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in pem_to_der(ca_pem).map_err(|cause| TlsError::Certificate { what: "CA certificate", cause })? {
        roots.add(ca).map_err(TlsError::Config)?;
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(IdentityVerifier { webpki, revocations }))
        .with_cert_resolver(server.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Client side for tonic: `tonic::transport::ClientTlsConfig` with the CA as the only
/// root, our identity, and `server_name` as the domain to verify.
///
/// Nothing is parsed here; tonic reports bad PEM when the channel connects.
pub fn client_tls(ca_pem: &str, me: &CertifiedKey, server_name: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&me.cert_pem, me.key.expose()))
        .domain_name(server_name)
}

/// What tonic handlers see of a connection: `request.extensions().get::<PeerInfo>()`.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The identity in the client's certificate.
    pub peer: PeerId,
    /// SHA-256 of the client's certificate, lowercase hex.
    pub fingerprint: String,
    /// The client certificate's `notAfter`, Unix seconds.
    pub not_after: i64,
    /// The client certificate (DER).
    pub certificate: CertificateDer<'static>,
}

/// An established mTLS connection; implements `AsyncRead + AsyncWrite + Unpin +
/// tonic::transport::server::Connected<ConnectInfo = PeerInfo>`.
///
/// A site's connection fails every read and write with
/// [`io::ErrorKind::ConnectionAborted`] once the site is revoked.
pub struct PeerStream {
    tls: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Present for sites, the only revocable peers.
    registration: Option<Registration>,
}

impl PeerStream {
    /// Returns a "site revoked" error if this connection has been cut.
    fn check_cut(&self, read: bool, cx: &Context<'_>) -> io::Result<()> {
        let Some(registration) = &self.registration else {
            return Ok(());
        };
        let cut = &registration.cut;
        let slot = if read { &cut.read_waker } else { &cut.write_waker };
        if cut.is_cut(slot, cx) {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "site revoked"));
        }
        Ok(())
    }
}

impl fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerStream").field("info", &self.info).finish_non_exhaustive()
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut(true, cx)?;
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut(false, cx)?;
        Pin::new(&mut this.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_cut(false, cx)?;
        Pin::new(&mut this.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_cut(false, cx)?;
        Pin::new(&mut this.tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// Accepts TCP connections, runs each TLS handshake in its own task (10 s timeout), logs
/// refused handshakes at WARN with the remote address and the reason, and yields
/// established connections for `tonic::transport::Server::serve_with_incoming`.
///
/// The stream never yields `Err`: failed accepts are logged and retried. Accepting stops
/// when the stream is dropped.
///
/// # Panics
///
/// Outside a Tokio runtime (it spawns the accept loop).
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    revocations: Revocations,
) -> impl Stream<Item = io::Result<PeerStream>> + Send + 'static {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), revocations, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    revocations: Revocations,
    tx: mpsc::Sender<io::Result<PeerStream>>,
) {
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a TCP connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (acceptor, revocations, tx) = (acceptor.clone(), revocations.clone(), tx.clone());
        tokio::spawn(async move {
            match handshake(&acceptor, tcp, remote, &revocations).await {
                // The send fails only when the server has stopped; the connection drops.
                Ok(stream) => drop(tx.send(Ok(stream)).await),
                Err(e) => tracing::warn!(%remote, reason = %e, "refused TLS handshake"),
            }
        });
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    revocations: &Revocations,
) -> Result<PeerStream, TlsError> {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(%remote, error = %e, "could not set TCP_NODELAY");
    }
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| TlsError::HandshakeTimeout)?
        .map_err(TlsError::Handshake)?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(TlsError::NoIdentity(IdentityError::NoIdentity))?;
    let peer = PeerId::from_cert_der(cert).map_err(TlsError::NoIdentity)?;
    let info = PeerInfo {
        remote,
        fingerprint: fingerprint(cert),
        not_after: not_after_unix(cert).map_err(TlsError::NoIdentity)?,
        certificate: cert.clone().into_owned(),
        peer,
    };
    let registration = match info.peer.role {
        Role::Site => Some(
            // A resumed TLS session skips the certificate verifier, so say here too
            // whether the site or only this (replaced) certificate is revoked.
            revocations.register(&info.peer.name, &info.fingerprint).ok_or_else(|| {
                if !revocations.is_revoked(&info.peer.name) && revocations.is_certificate_revoked(&info.fingerprint) {
                    TlsError::Replaced { peer: info.peer.clone(), fingerprint: info.fingerprint.clone() }
                } else {
                    TlsError::Revoked(info.peer.clone())
                }
            })?,
        ),
        Role::Operator | Role::Coordinator => None,
    };
    Ok(PeerStream { tls, info, registration })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::identity::{Ca, SecretPem, site_request};
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::ServerName;
    use rustls::pki_types::pem::PemObject;
    use std::pin::pin;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream as ClientStream;
    use tokio_stream::StreamExt;

    const DAYS: u32 = 1;

    struct Pki {
        ca: Ca,
        server: CertifiedKey,
        cert: Arc<ServerCertificate>,
    }

    impl Pki {
        fn new() -> Pki {
            let ca = Ca::generate("test", DAYS).unwrap();
            let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
            let server = ca.issue_server("test", &hosts, DAYS).unwrap();
            let cert = ServerCertificate::new(&server).unwrap();
            Pki { ca, server, cert }
        }

        fn site(&self, id: &str) -> CertifiedKey {
            let (key, csr) = site_request(id).unwrap();
            let (_, cert_pem) = self.ca.sign_site_request(&csr, Some(id), DAYS).unwrap();
            CertifiedKey { cert_pem, key }
        }

        /// A server on loopback; returns its address and its stream of connections.
        async fn serve(
            &self,
            revocations: &Revocations,
        ) -> (SocketAddr, impl Stream<Item = io::Result<PeerStream>> + use<>) {
            let config = server_config(self.ca.cert_pem(), &self.cert, revocations.clone()).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            (addr, incoming(listener, config, revocations.clone()))
        }

        /// Connects as `me`, trusting this consortium's CA for the server.
        async fn connect(&self, addr: SocketAddr, me: &CertifiedKey) -> io::Result<ClientStream<TcpStream>> {
            let mut roots = RootCertStore::empty();
            roots.add(pem_to_der(self.ca.cert_pem()).unwrap().remove(0)).unwrap();
            let key = PrivateKeyDer::from_pem_slice(me.key.expose().as_bytes()).unwrap();
            let config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_client_auth_cert(pem_to_der(&me.cert_pem).unwrap(), key)
                    .unwrap();
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost").unwrap();
            TlsConnector::from(Arc::new(config)).connect(name, tcp).await
        }
    }

    /// Connects and exchanges one byte each way; returns what the server saw.
    async fn established(
        pki: &Pki,
        addr: SocketAddr,
        conns: &mut (impl Stream<Item = io::Result<PeerStream>> + Unpin),
        me: &CertifiedKey,
    ) -> (ClientStream<TcpStream>, PeerStream) {
        let mut client = pki.connect(addr, me).await.unwrap();
        let mut server = tokio::time::timeout(Duration::from_secs(5), conns.next()).await.unwrap().unwrap().unwrap();
        client.write_all(b"?").await.unwrap();
        let mut byte = [0u8];
        server.read_exact(&mut byte).await.unwrap();
        server.write_all(b"!").await.unwrap();
        client.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"!");
        (client, server)
    }

    /// Asserts that a connection as `me` is refused: the handshake or the first read
    /// fails, and the server yields no connection.
    async fn assert_refused(
        pki: &Pki,
        addr: SocketAddr,
        conns: &mut (impl Stream<Item = io::Result<PeerStream>> + Unpin),
        me: &CertifiedKey,
    ) {
        // In TLS 1.3 the client finishes before the server has judged its certificate;
        // the server's alert arrives on the first read.
        if let Ok(mut client) = pki.connect(addr, me).await {
            let mut byte = [0u8];
            let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await.unwrap();
            assert!(matches!(read, Err(_) | Ok(0)), "refused client read {read:?}");
        }
        let next = tokio::time::timeout(Duration::from_millis(200), conns.next()).await;
        assert!(next.is_err(), "the server yielded a refused connection");
    }

    fn live_connections(revocations: &Revocations) -> usize {
        revocations.lock().live.values().map(HashMap::len).sum()
    }

    #[tokio::test]
    async fn site_handshakes_and_is_named_in_peer_info() {
        let pki = Pki::new();
        let revocations = Revocations::default();
        let (addr, conns) = pki.serve(&revocations).await;
        let mut conns = pin!(conns);
        let site = pki.site("a");
        let (_client, server) = established(&pki, addr, &mut conns, &site).await;
        let info = server.connect_info();
        assert_eq!(info.peer.to_string(), "site/a");
        let der = pem_to_der(&site.cert_pem).unwrap().remove(0);
        assert_eq!(info.fingerprint, fingerprint(&der));
        assert_eq!(info.not_after, not_after_unix(&der).unwrap());
        assert_eq!(info.remote.ip(), addr.ip());
        assert_eq!(live_connections(&revocations), 1);
    }

    #[tokio::test]
    async fn a_replaced_server_certificate_serves_the_next_handshake_and_open_connections_stay() {
        let pki = Pki::new();
        let (addr, conns) = pki.serve(&Revocations::default()).await;
        let mut conns = pin!(conns);
        let site = pki.site("a");
        let presented = |c: &ClientStream<TcpStream>| fingerprint(&c.get_ref().1.peer_certificates().unwrap()[0]);
        let (mut before, mut before_server) = established(&pki, addr, &mut conns, &site).await;
        assert_eq!(presented(&before), pki.cert.fingerprint());
        let old = pki.cert.fingerprint();
        let renewed = pki.ca.reissue(&pki.server.cert_pem, &pki.server.key, 2).unwrap();
        pki.cert.replace(&CertifiedKey { cert_pem: renewed.clone(), key: pki.server.key.clone() }).unwrap();
        assert_ne!(pki.cert.fingerprint(), old);
        assert_eq!(pki.cert.cert_pem(), renewed);
        let (after, _after_server) = established(&pki, addr, &mut conns, &site).await;
        assert_eq!(presented(&after), pki.cert.fingerprint());
        // The connection made before the swap still carries data.
        before.write_all(b"?").await.unwrap();
        let mut byte = [0u8];
        before_server.read_exact(&mut byte).await.unwrap();
        // A key that does not belong to the certificate is refused; the one in service stays.
        let stranger = Pki::new().server;
        let mismatched = CertifiedKey { cert_pem: renewed, key: stranger.key };
        assert!(pki.cert.replace(&mismatched).is_err());
        assert_eq!(presented(&established(&pki, addr, &mut conns, &site).await.0), pki.cert.fingerprint());
    }

    #[tokio::test]
    async fn operator_connects() {
        let pki = Pki::new();
        let (addr, conns) = pki.serve(&Revocations::default()).await;
        let mut conns = pin!(conns);
        let operator = pki.ca.issue_operator("alice", DAYS).unwrap();
        let (_client, server) = established(&pki, addr, &mut conns, &operator).await;
        assert_eq!(server.connect_info().peer.to_string(), "operator/alice");
    }

    #[tokio::test]
    async fn certificate_from_another_ca_is_refused() {
        let pki = Pki::new();
        let (addr, conns) = pki.serve(&Revocations::default()).await;
        let mut conns = pin!(conns);
        let stranger = Pki::new().site("a");
        assert_refused(&pki, addr, &mut conns, &stranger).await;
    }

    #[tokio::test]
    async fn certificate_without_identity_is_refused() {
        let pki = Pki::new();
        let (addr, conns) = pki.serve(&Revocations::default()).await;
        let mut conns = pin!(conns);
        let ca_key = KeyPair::from_pem(pki.ca.key().expose()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(pki.ca.cert_pem(), ca_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let anonymous = CertifiedKey {
            cert_pem: params.signed_by(&key, &issuer).unwrap().pem(),
            key: SecretPem::new(key.serialize_pem()),
        };
        assert_refused(&pki, addr, &mut conns, &anonymous).await;
    }

    /// A certificate for `peer` that expired `days_ago` days ago (valid for a year before).
    fn expired(pki: &Pki, peer: &PeerId, days_ago: u64) -> CertifiedKey {
        let ca_key = KeyPair::from_pem(pki.ca.key().expose()).unwrap();
        let issuer = Issuer::from_ca_cert_pem(pki.ca.cert_pem(), ca_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            crate::identity::leaf_params(peer, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, DAYS).unwrap();
        let now = std::time::SystemTime::now();
        params.not_after = (now - Duration::from_secs(days_ago * 86_400)).into();
        params.not_before = (now - Duration::from_secs((days_ago + 365) * 86_400)).into();
        CertifiedKey {
            cert_pem: params.signed_by(&key, &issuer).unwrap().pem(),
            key: SecretPem::new(key.serialize_pem()),
        }
    }

    #[tokio::test]
    async fn an_expired_site_certificate_connects_within_the_grace_and_nothing_else_does() {
        let pki = Pki::new();
        let (addr, conns) = pki.serve(&Revocations::default()).await;
        let mut conns = pin!(conns);
        let site = PeerId::site("a").unwrap();
        let recent = expired(&pki, &site, 10);
        let (_client, server) = established(&pki, addr, &mut conns, &recent).await;
        let now_s = i64::try_from(UnixTime::now().as_secs()).unwrap();
        assert!(server.connect_info().not_after < now_s, "the handlers see that it expired");
        assert_refused(&pki, addr, &mut conns, &expired(&pki, &site, EXPIRED_GRACE_DAYS as u64 + 1)).await;
        let operator = PeerId::operator("lead").unwrap();
        assert_refused(&pki, addr, &mut conns, &expired(&pki, &operator, 1)).await;
        // Still from the consortium's CA only.
        assert_refused(&pki, addr, &mut conns, &expired(&Pki::new(), &site, 10)).await;
    }

    #[tokio::test]
    async fn revoked_site_is_refused() {
        let pki = Pki::new();
        let revocations = Revocations::new(["a".to_owned()]);
        let (addr, conns) = pki.serve(&revocations).await;
        let mut conns = pin!(conns);
        assert_refused(&pki, addr, &mut conns, &pki.site("a")).await;
        established(&pki, addr, &mut conns, &pki.site("b")).await;
    }

    #[tokio::test]
    async fn revoking_a_site_cuts_its_idle_connection() {
        let pki = Pki::new();
        let revocations = Revocations::default();
        let (addr, conns) = pki.serve(&revocations).await;
        let mut conns = pin!(conns);
        let (mut client_a, mut server_a) = established(&pki, addr, &mut conns, &pki.site("a")).await;
        let (mut client_b, mut server_b) = established(&pki, addr, &mut conns, &pki.site("b")).await;
        assert_eq!(live_connections(&revocations), 2);

        // Like hyper, the server keeps a read pending on the idle connection.
        let pending = tokio::spawn(async move {
            let mut byte = [0u8];
            let read = server_a.read(&mut byte).await;
            drop(server_a);
            read
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        revocations.revoke("a");
        assert!(revocations.is_revoked("a"));

        let server_read = tokio::time::timeout(Duration::from_secs(2), pending).await.unwrap().unwrap();
        let error = server_read.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(error.to_string(), "site revoked");
        let mut byte = [0u8];
        let client_read = tokio::time::timeout(Duration::from_secs(2), client_a.read(&mut byte)).await.unwrap();
        assert!(matches!(client_read, Err(_) | Ok(0)), "{client_read:?}");

        // Site b is untouched, and the cut connection left the registry.
        client_b.write_all(b"?").await.unwrap();
        server_b.read_exact(&mut byte).await.unwrap();
        assert_eq!(live_connections(&revocations), 1);
        drop(server_b);
        assert_eq!(live_connections(&revocations), 0);
    }

    #[tokio::test]
    async fn revoking_one_certificate_cuts_it_and_keeps_the_sites_new_key() {
        let pki = Pki::new();
        let revocations = Revocations::default();
        let (addr, conns) = pki.serve(&revocations).await;
        let mut conns = pin!(conns);
        let (old, new) = (pki.site("a"), pki.site("a"));
        let (mut client_old, mut server_old) = established(&pki, addr, &mut conns, &old).await;
        let (_client_new, _server_new) = established(&pki, addr, &mut conns, &new).await;
        let print = fingerprint(&pem_to_der(&old.cert_pem).unwrap().remove(0));
        revocations.revoke_certificate("a", &print);
        assert!(revocations.is_certificate_revoked(&print) && !revocations.is_revoked("a"));
        let mut byte = [0u8];
        let error = server_old.read(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        drop(server_old);
        let client_read = tokio::time::timeout(Duration::from_secs(2), client_old.read(&mut byte)).await.unwrap();
        assert!(matches!(client_read, Err(_) | Ok(0)), "{client_read:?}");
        assert_eq!(live_connections(&revocations), 1, "the new key's connection stays");
        assert_refused(&pki, addr, &mut conns, &old).await;
        established(&pki, addr, &mut conns, &new).await;
        assert_eq!(
            TlsError::Replaced { peer: PeerId::site("a").unwrap(), fingerprint: print.clone() }.to_string(),
            format!("certificate {print} of site/a was replaced by a new key and is revoked")
        );
    }

    #[test]
    fn verifier_names_the_reason_for_a_refusal() {
        let pki = Pki::new();
        let mut roots = RootCertStore::empty();
        roots.add(pem_to_der(pki.ca.cert_pem()).unwrap().remove(0)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = IdentityVerifier {
            webpki: WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap(),
            revocations: Revocations::new(["a".to_owned()]),
        };
        let check = |cert: &CertifiedKey, expected: Option<&str>| {
            let der = pem_to_der(&cert.cert_pem).unwrap().remove(0);
            let got = verifier.verify_client_cert(&der, &[], UnixTime::now()).err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), expected);
        };
        check(&pki.site("a"), Some("other error: certificate for site/a is revoked"));
        check(&pki.site("b"), None);
        check(
            &pki.server,
            Some(
                "invalid peer certificate: certificate does not allow extended key usage for client authentication, allows server authentication",
            ),
        );
    }
}
