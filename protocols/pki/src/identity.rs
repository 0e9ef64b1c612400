//! The consortium PKI: one CA per consortium, and certificates that name who holds them.
//!
//! # Threat model
//!
//! Every party authenticates with a certificate from the consortium CA; nothing else is
//! trusted. A host name says where a machine is, not who it is, so identities live in a
//! subject-alternative-name URI — `maeum://site/<id>`, `maeum://operator/<name>`,
//! `maeum://coordinator/<consortium>` — which the CA checks before it signs and
//! [`PeerId::from_cert_der`] reads back after the TLS layer has verified the chain.
//! Each certificate carries exactly one such URI, so a certificate can never speak for
//! two identities.
//!
//! A site's private key never leaves the site: [`site_request`] makes a key and a CSR on
//! the site, and [`Ca::sign_site_request`] takes only the identity and the public key from
//! it. Everything else the request asks for (CA flag, key usages, other names) is ignored,
//! and site certificates are for client authentication only, so a site cannot obtain a
//! certificate that passes as the coordinator's server certificate or as a CA.
//!
//! Keys are ECDSA P-256. Private keys travel as [`SecretPem`], which never prints.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
/// The DER certificate type of every function here (rustls' own).
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;

/// The scheme of identity URIs in certificates.
const URI_PREFIX: &str = "maeum://";

/// Longest validity we issue; also keeps date arithmetic far from overflow.
const MAX_VALIDITY_DAYS: u32 = 36_525;

/// How far back `notBefore` is set, so a peer whose clock runs a little behind still
/// accepts a certificate issued a moment ago.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Errors of the consortium PKI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A site id, operator name or consortium name breaks the naming rules.
    #[error("invalid name {name:?}: {rule}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A `maeum://` URI is malformed.
    #[error("invalid identity URI {uri:?}: {reason}")]
    InvalidUri {
        /// The offending URI.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A certificate has no `maeum://` URI subject alternative name.
    #[error("certificate carries no maeum:// identity URI")]
    NoIdentity,
    /// A certificate has more than one `maeum://` URI subject alternative name.
    #[error("certificate carries {count} maeum:// identity URIs, expected exactly one")]
    AmbiguousIdentity {
        /// How many it carries.
        count: usize,
    },
    /// A certificate signing request asks for something the CA does not sign.
    #[error("certificate request refused: {reason}")]
    RequestRefused {
        /// Why.
        reason: String,
    },
    /// A certificate signing request names another site than the one expected.
    #[error("certificate request is for {found}, expected site/{expected}")]
    WrongSite {
        /// The site id the caller expected.
        expected: String,
        /// The identity the request carries.
        found: PeerId,
    },
    /// A server certificate was requested without any host.
    #[error("a server certificate needs at least one host name or IP address")]
    NoHosts,
    /// A server host is neither an IP address nor a valid DNS name.
    #[error("invalid server host {host:?}: not an IP address or DNS name")]
    InvalidHost {
        /// The offending host.
        host: String,
    },
    /// The requested validity is longer than 100 years (36525 days).
    #[error("validity of {days} days exceeds the maximum of 36525 days")]
    ValidityTooLong {
        /// The requested validity.
        days: u32,
    },
    /// A CA certificate and key cannot be used together to issue certificates.
    #[error("unusable CA: {reason}")]
    UnusableCa {
        /// Why.
        reason: &'static str,
    },
    /// A private key PEM could not be read (the content is deliberately not shown).
    #[error("{what} is not a valid private key PEM")]
    BadKey {
        /// Which key.
        what: &'static str,
    },
    /// A certificate or PEM document could not be parsed.
    #[error("parsing {what}: {reason}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// rcgen failed while generating a key, a request or a certificate.
    #[error("{what}: {cause}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// rcgen's error.
        cause: rcgen::Error,
    },
    /// The system random number generator failed.
    #[error("system random number generator failed while {what}")]
    Random {
        /// What needed the randomness.
        what: &'static str,
    },
    /// A certificate does not chain to the consortium CA, or has expired.
    #[error("certificate of {who} is not valid under the consortium CA: {reason}")]
    Untrusted {
        /// Whose certificate.
        who: String,
        /// What webpki reported.
        reason: String,
    },
}

/// The kind of party a certificate belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A data-holding participant (hospital, bank, ...).
    Site,
    /// A person who administers the consortium.
    Operator,
    /// The coordinator server of a consortium.
    Coordinator,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Operator => "operator",
            Role::Coordinator => "coordinator",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        [Role::Site, Role::Operator, Role::Coordinator].into_iter().find(|role| role.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a peer is, as its certificate says: displayed as `site/hospital-a`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerId {
    /// The kind of party.
    pub role: Role,
    /// The site id, operator name or consortium name; follows [`validate_name`].
    pub name: String,
}

impl PeerId {
    /// `site/<id>`, if `id` is a valid name.
    pub fn site(id: &str) -> Result<PeerId, IdentityError> {
        PeerId::new(Role::Site, id)
    }

    /// `operator/<name>`, if `name` is a valid name.
    pub fn operator(name: &str) -> Result<PeerId, IdentityError> {
        PeerId::new(Role::Operator, name)
    }

    /// `coordinator/<consortium>`, if `consortium` is a valid name.
    pub fn coordinator(consortium: &str) -> Result<PeerId, IdentityError> {
        PeerId::new(Role::Coordinator, consortium)
    }

    fn new(role: Role, name: &str) -> Result<PeerId, IdentityError> {
        validate_name(name)?;
        Ok(PeerId { role, name: name.to_owned() })
    }

    /// The URI that carries this identity in a certificate: `maeum://site/<id>`.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{self}")
    }

    fn from_uri(uri: &str) -> Result<PeerId, IdentityError> {
        let invalid = |reason| IdentityError::InvalidUri { uri: uri.to_owned(), reason };
        let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(|| invalid("does not start with maeum://"))?;
        let (role, name) = rest.split_once('/').ok_or_else(|| invalid("expected maeum://<role>/<name>"))?;
        let role = Role::parse(role).ok_or_else(|| invalid("role is not site, operator or coordinator"))?;
        if let Some(rule) = name_rule_broken(name) {
            return Err(invalid(rule));
        }
        Ok(PeerId { role, name: name.to_owned() })
    }

    /// Reads the identity from a DER certificate: exactly one `maeum://` URI SAN required.
    ///
    /// This does not verify the certificate; call it on certificates the TLS layer (or the
    /// CA itself) has already checked.
    pub fn from_cert_der(der: &[u8]) -> Result<PeerId, IdentityError> {
        let cert = parse_cert(der)?;
        let sans = cert.subject_alternative_name().map_err(|e| IdentityError::Parse {
            what: "certificate subject alternative names",
            reason: e.to_string(),
        })?;
        let uris: Vec<&str> = sans
            .iter()
            .flat_map(|ext| &ext.value.general_names)
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::NoIdentity),
            [uri] => PeerId::from_uri(uri),
            _ => Err(IdentityError::AmbiguousIdentity { count: uris.len() }),
        }
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// Checks a site id, operator name or consortium name: 1–63 characters of `[a-z0-9-]`,
/// starting with a letter or digit. The error names the rule that is broken.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    match name_rule_broken(name) {
        None => Ok(()),
        Some(rule) => Err(IdentityError::InvalidName { name: name.to_owned(), rule }),
    }
}

fn name_rule_broken(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > 63 {
        Some("must be at most 63 characters")
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Some("may only contain a-z, 0-9 and '-'")
    } else if name.starts_with('-') {
        Some("must start with a letter or digit")
    } else {
        None
    }
}

/// A private key in PEM form. `Debug` prints `SecretPem(***)`; the text is overwritten
/// when the value is dropped (best effort: copies made by the caller are not).
#[derive(Clone)]
pub struct SecretPem(String);

impl SecretPem {
    /// Wraps a PEM private key, e.g. one read from disk.
    pub fn new(pem: String) -> SecretPem {
        SecretPem(pem)
    }

    /// The PEM text, for writing to a key file or handing to a TLS library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(***)")
    }
}

impl Drop for SecretPem {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.fill(0);
        std::hint::black_box(&bytes);
    }
}

/// A certificate and its private key.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key: SecretPem,
}

/// The consortium certificate authority.
#[derive(Debug)]
pub struct Ca {
    cert_pem: String,
    key: SecretPem,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Generates a self-signed CA for `consortium`: CN `Maeum <consortium> CA`, basic
    /// constraints CA with path length 0 (it signs leaves only), key usages keyCertSign
    /// and cRLSign.
    pub fn generate(consortium: &str, validity_days: u32) -> Result<Ca, IdentityError> {
        validate_name(consortium)?;
        Ca::generate_named(&format!("Maeum {consortium} CA"), validity_days)
    }

    /// [`Ca::generate`] with the common name `cn` (a rollover's successor names its
    /// generation, so that no two of the consortium's CAs share a subject).
    pub(crate) fn generate_named(cn: &str, validity_days: u32) -> Result<Ca, IdentityError> {
        let key = generate_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, validity_days)?;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|cause| IdentityError::Generate { what: "self-signing the CA certificate", cause })?;
        Ok(Ca { cert_pem: cert.pem(), key: SecretPem(key.serialize_pem()), issuer: Issuer::new(params, key) })
    }

    /// Reloads a CA saved as [`Ca::cert_pem`] and [`Ca::key`]. Refuses a certificate that
    /// is not a CA or a key that does not belong to the certificate.
    pub fn from_pem(cert_pem: &str, key: &SecretPem) -> Result<Ca, IdentityError> {
        let key_pair = KeyPair::from_pem(key.expose()).map_err(|_| IdentityError::BadKey { what: "CA key" })?;
        let der = pem_to_der(cert_pem)?;
        let [der] = der.as_slice() else {
            return Err(IdentityError::UnusableCa { reason: "CA certificate PEM must hold exactly one certificate" });
        };
        let cert = parse_cert(der)?;
        if !cert.is_ca() {
            return Err(IdentityError::UnusableCa { reason: "certificate is not a CA certificate" });
        }
        if cert.public_key().subject_public_key.data.as_ref() != key_pair.der_bytes() {
            return Err(IdentityError::UnusableCa { reason: "key does not belong to the CA certificate" });
        }
        let issuer = Issuer::from_ca_cert_der(der, key_pair)
            .map_err(|cause| IdentityError::Generate { what: "loading the CA certificate", cause })?;
        Ok(Ca { cert_pem: cert_pem.to_owned(), key: key.clone(), issuer })
    }

    /// The CA certificate, PEM: the trust root every party is given.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM: for saving the CA; keep it offline.
    pub fn key(&self) -> &SecretPem {
        &self.key
    }

    /// Issues the coordinator's server certificate (serverAuth): one IP SAN for each host
    /// that parses as an IP address, one DNS SAN for each other host, and the identity
    /// `maeum://coordinator/<consortium>`.
    pub fn issue_server(
        &self,
        consortium: &str,
        hosts: &[String],
        validity_days: u32,
    ) -> Result<CertifiedKey, IdentityError> {
        let peer = PeerId::coordinator(consortium)?;
        if hosts.is_empty() {
            return Err(IdentityError::NoHosts);
        }
        let host_sans = hosts.iter().map(|host| host_san(host)).collect::<Result<Vec<_>, _>>()?;
        self.issue(&peer, host_sans, ExtendedKeyUsagePurpose::ServerAuth, validity_days)
    }

    /// Issues an operator's client certificate (clientAuth) with a fresh key.
    pub fn issue_operator(&self, name: &str, validity_days: u32) -> Result<CertifiedKey, IdentityError> {
        let peer = PeerId::operator(name)?;
        self.issue(&peer, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, validity_days)
    }

    /// Signs a site's CSR. Refuses a CSR whose SAN is not exactly one valid
    /// `maeum://site/<id>` URI, or whose id differs from `expected` when given.
    /// clientAuth EKU. Returns the id and the cert PEM.
    ///
    /// Only the identity and the public key are taken from the request; the CA decides
    /// everything else.
    pub fn sign_site_request(
        &self,
        csr_pem: &str,
        expected: Option<&str>,
        validity_days: u32,
    ) -> Result<(PeerId, String), IdentityError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IdentityError::RequestRefused { reason: format!("unreadable certificate request: {e}") })?;
        let peer = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => {
                PeerId::from_uri(uri.as_ref()).map_err(|e| IdentityError::RequestRefused { reason: e.to_string() })?
            }
            sans => {
                return Err(IdentityError::RequestRefused {
                    reason: format!(
                        "expected exactly one maeum://site/<id> URI as subject alternative \
                         name, found {} names",
                        sans.len()
                    ),
                });
            }
        };
        if peer.role != Role::Site {
            return Err(IdentityError::RequestRefused {
                reason: format!("requests {peer}; only site certificates are signed"),
            });
        }
        if let Some(expected) = expected
            && expected != peer.name
        {
            return Err(IdentityError::WrongSite { expected: expected.to_owned(), found: peer });
        }
        let params = leaf_params(&peer, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, validity_days)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|cause| IdentityError::Generate { what: "signing the site certificate", cause })?;
        Ok((peer, cert.pem()))
    }

    fn issue(
        &self,
        peer: &PeerId,
        extra_sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        validity_days: u32,
    ) -> Result<CertifiedKey, IdentityError> {
        let key = generate_key()?;
        let params = leaf_params(peer, extra_sans, usage, validity_days)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|cause| IdentityError::Generate { what: "signing a certificate", cause })?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key: SecretPem(key.serialize_pem()) })
    }
}

/// Site side: a fresh key and a CSR carrying `maeum://site/<id>` (the key never leaves
/// the site). Returns the key and the CSR PEM.
pub fn site_request(site_id: &str) -> Result<(SecretPem, String), IdentityError> {
    let peer = PeerId::site(site_id)?;
    let key = generate_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, peer.to_string());
    params.subject_alt_names = vec![uri_san(&peer)?];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|cause| IdentityError::Generate { what: "writing the certificate request", cause })?;
    Ok((SecretPem(key.serialize_pem()), csr))
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert_der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A DER certificate's `notAfter`, in seconds since the Unix epoch.
pub fn not_after_unix(cert_der: &[u8]) -> Result<i64, IdentityError> {
    Ok(parse_cert(cert_der)?.validity().not_after.timestamp())
}

/// Whether two DER certificates certify the same public key (`sites approve` tells a
/// repeated request from a new key for the same site this way).
pub fn same_public_key(a_der: &[u8], b_der: &[u8]) -> Result<bool, IdentityError> {
    Ok(parse_cert(a_der)?.public_key().raw == parse_cert(b_der)?.public_key().raw)
}

/// Whether `cert_der` certifies the public half of `key` (a site checks its enrolment
/// bundle against the key it generated before installing it).
pub fn key_matches_cert(key: &SecretPem, cert_der: &[u8]) -> Result<bool, IdentityError> {
    let pair = KeyPair::from_pem(key.expose()).map_err(|_| IdentityError::BadKey { what: "private key" })?;
    Ok(parse_cert(cert_der)?.public_key().subject_public_key.data.as_ref() == pair.public_key_raw())
}

/// Checks that `cert_der` is a currently valid client certificate issued by the CA in
/// `ca_pem` and that it names `expected` (a site checks the certificates the
/// coordinator relays for a secure-aggregation session this way, so the coordinator
/// cannot invent participants). Returns the certificate's public key bits.
pub fn verify_peer_cert(ca_pem: &str, cert_der: &[u8], expected: &PeerId) -> Result<Vec<u8>, IdentityError> {
    use rustls::server::WebPkiClientVerifier;
    let untrusted = |reason: String| IdentityError::Untrusted { who: expected.to_string(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_to_der(ca_pem)? {
        roots.add(ca).map_err(|e| untrusted(format!("CA certificate: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| untrusted(e.to_string()))?;
    let leaf = CertificateDer::from(cert_der.to_vec());
    verifier
        .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
        .map_err(|e| untrusted(e.to_string()))?;
    let found = PeerId::from_cert_der(cert_der)?;
    if &found != expected {
        return Err(untrusted(format!("it names {found}")));
    }
    Ok(parse_cert(cert_der)?.public_key().subject_public_key.data.to_vec())
}

/// An enrolment bundle (`bundle-SITE.json`): what `maeum-coordinator sites approve`
/// gives a site so it can reach and trust the coordinator. Public material only.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Bundle {
    /// File format version (1).
    pub format: u32,
    pub consortium: String,
    pub site_id: String,
    /// `HOST:PORT` the site dials.
    pub coordinator_address: String,
    /// The name the coordinator's certificate is verified against.
    pub coordinator_name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    /// Ed25519 key (hex) that signs audit checkpoints (and, as a second signature,
    /// releases).
    pub signing_public_key: String,
    /// Ed25519 key (hex) that must sign every release this site installs, kept apart
    /// from the serving host (`docs/protocols/releases.md`); empty in bundles of
    /// consortiums created before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release_public_key: String,
}

/// The first (leaf) certificate of a PEM document, DER; an error if there is none.
pub fn leaf_der(pem: &str) -> Result<Vec<u8>, IdentityError> {
    let leaf = pem_to_der(pem)?.into_iter().next();
    leaf.map(|c| c.to_vec())
        .ok_or(IdentityError::Parse { what: "certificate PEM", reason: "no CERTIFICATE block found".into() })
}

/// Every certificate in a PEM document, in order; an error if there is none.
pub fn pem_to_der(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Parse { what: "certificate PEM", reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(IdentityError::Parse { what: "certificate PEM", reason: "no CERTIFICATE block found".to_owned() });
    }
    Ok(certs)
}

pub(crate) fn parse_cert(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, IdentityError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| IdentityError::Parse { what: "DER certificate", reason: e.to_string() })
}

fn generate_key() -> Result<KeyPair, IdentityError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|cause| IdentityError::Generate { what: "generating an ECDSA P-256 key", cause })
}

pub(crate) fn uri_san(peer: &PeerId) -> Result<SanType, IdentityError> {
    let uri =
        peer.uri().try_into().map_err(|cause| IdentityError::Generate { what: "encoding the identity URI", cause })?;
    Ok(SanType::URI(uri))
}

pub(crate) fn host_san(host: &str) -> Result<SanType, IdentityError> {
    let invalid = || IdentityError::InvalidHost { host: host.to_owned() };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // The same check the client's TLS library applies to the name it connects to.
    match ServerName::try_from(host) {
        Ok(ServerName::DnsName(_)) => host.to_owned().try_into().map(SanType::DnsName).map_err(|_| invalid()),
        _ => Err(invalid()),
    }
}

/// Parameters shared by every leaf certificate: CN and URI SAN from `peer`, a random
/// serial, digitalSignature and one extended key usage, authority key identifier.
pub(crate) fn leaf_params(
    peer: &PeerId,
    extra_sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    validity_days: u32,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, peer.to_string());
    params.subject_alt_names = extra_sans;
    params.subject_alt_names.push(uri_san(peer)?);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, validity_days)?;
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), IdentityError> {
    if days > MAX_VALIDITY_DAYS {
        return Err(IdentityError::ValidityTooLong { days });
    }
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + Duration::from_secs(u64::from(days) * 86_400)).into();
    Ok(())
}

/// 16 random bytes, positive: rcgen would otherwise derive the serial from the public
/// key, and a renewed certificate for the same key would repeat it.
fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Random { what: "choosing a certificate serial number" })?;
    bytes[0] &= 0x7f; // at most 16 bytes once DER-encoded as a positive INTEGER
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;
    use rustls::server::WebPkiClientVerifier;
    use std::sync::Arc;

    const DAYS: u32 = 30;

    fn der(pem: &str) -> CertificateDer<'static> {
        pem_to_der(pem).unwrap().remove(0)
    }

    fn site_cert(ca: &Ca, id: &str) -> String {
        let (_key, csr) = site_request(id).unwrap();
        ca.sign_site_request(&csr, Some(id), DAYS).unwrap().1
    }

    /// Verifies `leaf_pem` as a client certificate against `ca_pem` with webpki.
    fn chains_to(leaf_pem: &str, ca_pem: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(ca_pem)).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier.verify_client_cert(&der(leaf_pem), &[], UnixTime::now()).is_ok()
    }

    #[test]
    fn verify_peer_cert_checks_chain_and_name() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let other = Ca::generate("heart", DAYS).unwrap();
        let pem = site_cert(&ca, "s1");
        let leaf = der(&pem);
        let key = verify_peer_cert(ca.cert_pem(), &leaf, &PeerId::site("s1").unwrap()).unwrap();
        assert_eq!(key.len(), 65, "an uncompressed P-256 point");
        let e = verify_peer_cert(ca.cert_pem(), &leaf, &PeerId::site("s2").unwrap()).unwrap_err();
        assert!(e.to_string().contains("it names site/s1"), "{e}");
        let e = verify_peer_cert(other.cert_pem(), &leaf, &PeerId::site("s1").unwrap()).unwrap_err();
        assert!(e.to_string().starts_with("certificate of site/s1 is not valid under the consortium CA"), "{e}");
    }

    #[test]
    fn each_role_round_trips_through_a_certificate() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let server = ca.issue_server("heart", &["coord.example.org".to_owned(), "10.0.0.7".to_owned()], DAYS).unwrap();
        let operator = ca.issue_operator("alice", DAYS).unwrap();
        let site = site_cert(&ca, "hospital-a");
        for (pem, expected) in [
            (&server.cert_pem, "coordinator/heart"),
            (&operator.cert_pem, "operator/alice"),
            (&site, "site/hospital-a"),
        ] {
            let peer = PeerId::from_cert_der(&der(pem)).unwrap();
            assert_eq!(peer.to_string(), expected);
            assert_eq!(peer.uri(), format!("maeum://{expected}"));
        }
        assert!(chains_to(&operator.cert_pem, ca.cert_pem()));
        assert!(chains_to(&site, ca.cert_pem()));
    }

    #[test]
    fn server_certificate_names_its_hosts() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let server = ca.issue_server("heart", &["localhost".to_owned(), "10.0.0.7".to_owned()], DAYS).unwrap();
        let cert_der = der(&server.cert_pem);
        let cert = parse_cert(&cert_der).unwrap();
        let names = cert.subject_alternative_name().unwrap().unwrap();
        let shown: Vec<String> = names
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => format!("dns {dns}"),
                GeneralName::IPAddress([a, b, c, d]) => format!("ip {}", IpAddr::from([*a, *b, *c, *d])),
                GeneralName::URI(uri) => format!("uri {uri}"),
                other => format!("unexpected {other}"),
            })
            .collect();
        assert_eq!(shown, ["dns localhost", "ip 10.0.0.7", "uri maeum://coordinator/heart"]);
        assert!(matches!(ca.issue_server("heart", &[], DAYS), Err(IdentityError::NoHosts)));
        assert!(matches!(
            ca.issue_server("heart", &["bad host".to_owned()], DAYS),
            Err(IdentityError::InvalidHost { .. })
        ));
    }

    #[test]
    fn sign_site_request_refuses_another_id() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let (_key, csr) = site_request("hospital-b").unwrap();
        let err = ca.sign_site_request(&csr, Some("hospital-a"), DAYS).unwrap_err();
        assert_eq!(err.to_string(), "certificate request is for site/hospital-b, expected site/hospital-a");
        let (peer, _) = ca.sign_site_request(&csr, None, DAYS).unwrap();
        assert_eq!(peer, PeerId::site("hospital-b").unwrap());
    }

    #[test]
    fn sign_site_request_refuses_a_request_without_the_site_uri() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let key = generate_key().unwrap();
        let request = |sans: Vec<SanType>| {
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            params.serialize_request(&key).unwrap().pem().unwrap()
        };
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());
        let site_a = uri("maeum://site/a");
        for (sans, reason) in [
            (vec![], "found 0 names"),
            (vec![SanType::DnsName("a.example".try_into().unwrap())], "found 1 names"),
            (vec![site_a.clone(), site_a.clone()], "found 2 names"),
            (vec![uri("https://site/a")], "does not start with maeum://"),
            (vec![uri("maeum://site/A")], "may only contain"),
            (vec![uri("maeum://operator/a")], "only site certificates"),
        ] {
            let err = ca.sign_site_request(&request(sans), None, DAYS).unwrap_err();
            assert!(err.to_string().contains(reason), "{err} lacks {reason:?}");
        }
    }

    #[test]
    fn site_certificate_ignores_what_the_request_asks_beyond_identity() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let key = generate_key().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI("maeum://site/a".try_into().unwrap())];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let (_, pem) = ca.sign_site_request(&csr, Some("a"), DAYS).unwrap();
        let cert_der = der(&pem);
        let cert = parse_cert(&cert_der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn reloaded_ca_signs_certificates_that_chain_to_the_original() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let reloaded = Ca::from_pem(ca.cert_pem(), ca.key()).unwrap();
        let operator = reloaded.issue_operator("bob", DAYS).unwrap();
        assert!(chains_to(&operator.cert_pem, ca.cert_pem()));
        assert!(chains_to(&site_cert(&reloaded, "b"), ca.cert_pem()));
        let other = Ca::generate("heart", DAYS).unwrap();
        assert!(!chains_to(&operator.cert_pem, other.cert_pem()));
    }

    #[test]
    fn from_pem_refuses_a_foreign_key_or_a_leaf() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let other = Ca::generate("heart", DAYS).unwrap();
        let err = Ca::from_pem(ca.cert_pem(), other.key()).unwrap_err();
        assert_eq!(err.to_string(), "unusable CA: key does not belong to the CA certificate");
        let leaf = ca.issue_operator("alice", DAYS).unwrap();
        let err = Ca::from_pem(&leaf.cert_pem, &leaf.key).unwrap_err();
        assert_eq!(err.to_string(), "unusable CA: certificate is not a CA certificate");
        let err = Ca::from_pem(ca.cert_pem(), &SecretPem::new("garbage".to_owned())).unwrap_err();
        assert_eq!(err.to_string(), "CA key is not a valid private key PEM");
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let issued = ca.issue_operator("alice", DAYS).unwrap();
        let secret = issued.key.expose();
        assert!(secret.contains("PRIVATE KEY"));
        assert_eq!(format!("{:?}", issued.key), "SecretPem(***)");
        let body = secret.lines().nth(1).unwrap();
        assert!(!format!("{issued:?}").contains(body));
        assert!(!format!("{ca:?}").contains(ca.key().expose().lines().nth(1).unwrap()));
    }

    #[test]
    fn fingerprint_and_expiry() {
        let ca = Ca::generate("heart", DAYS).unwrap();
        let cert_der = der(ca.cert_pem());
        let print = fingerprint(&cert_der);
        assert_eq!(print.len(), 64);
        assert!(print.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        let expected = now + i64::from(DAYS) * 86_400;
        assert!((not_after_unix(&cert_der).unwrap() - expected).abs() < 60);
        assert!(matches!(Ca::generate("heart", MAX_VALIDITY_DAYS + 1), Err(IdentityError::ValidityTooLong { .. })));
    }

    #[test]
    fn pem_without_certificates_is_an_error() {
        let err = pem_to_der("hello").unwrap_err();
        assert_eq!(err.to_string(), "parsing certificate PEM: no CERTIFICATE block found");
    }

    fn check(name: &str, expected: Option<&str>) {
        let got = validate_name(name).err().map(|e| e.to_string());
        let expected = expected.map(|rule| format!("invalid name {name:?}: {rule}"));
        assert_eq!(got, expected, "name {name:?}");
    }

    #[test]
    fn validate_name_cases() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        check("hospital-a", None);
        check("0", None);
        check("9lives", None);
        check("trailing-", None);
        check(&long, None);
        check("", Some("must not be empty"));
        check(&too_long, Some("must be at most 63 characters"));
        check("Hospital", Some("may only contain a-z, 0-9 and '-'"));
        check("a_b", Some("may only contain a-z, 0-9 and '-'"));
        check("a/b", Some("may only contain a-z, 0-9 and '-'"));
        check("é", Some("may only contain a-z, 0-9 and '-'"));
        check("-a", Some("must start with a letter or digit"));
    }
}
