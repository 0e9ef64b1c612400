//! Checkpoints: the log's signed tree heads, and the sites' cosignatures on them.
//!
//! The body is the C2SP tlog-checkpoint note text (<https://c2sp.org/tlog-checkpoint>),
//! three lines, no extension lines:
//!
//! ```text
//! maeum/heart          origin: which log
//! 12                   tree size, decimal, no leading zeros
//! 3lKx…wE=             root hash, standard base64 with padding
//! ```
//!
//! The log signs the body bytes with its Ed25519 key (the coordinator's `signing.key`).
//! Maeum does not use the signed-note envelope (key names and key hashes): the export
//! and the wire carry the signature beside the body, and the key is fixed per log.
//!
//! A witness (a site) cosigns `maeum/witness/v1\n` followed by the same body with its
//! ECDSA P-256 identity key; the prefix keeps a cosignature from being mistaken for any
//! other signature the site key makes (TLS handshakes, secure-aggregation messages).
//! A cosignature is checked against the site's certificate, which must chain to the
//! consortium CA and name `maeum://site/<id>`.

use std::time::Duration;

use ring::rand::SecureRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime};

use super::merkle::Hash;
use super::{AuditError, base64, unbase64};
use maeum_pki::identity::{self, PeerId, SecretPem};

/// Prefixed to the checkpoint body in what a witness signs.
pub const WITNESS_PREFIX: &str = "maeum/witness/v1\n";

/// A tree head: which log, how many entries, and their root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name; printable ASCII without spaces or `+` (a note key name).
    pub origin: String,
    /// The number of entries.
    pub size: u64,
    /// The root of the tree of those entries.
    pub root: Hash,
}

/// A checkpoint with the log's Ed25519 signature over its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// What is signed.
    pub checkpoint: Checkpoint,
    /// Ed25519 signature of [`Checkpoint::body`].
    pub signature: [u8; 64],
}

/// A witness's cosignature on a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cosignature {
    /// The witness site id.
    pub site: String,
    /// ECDSA P-256 / SHA-256 signature (ASN.1 DER) of [`Checkpoint::witness_message`].
    pub signature: Vec<u8>,
}

/// Checks an origin: 1–255 printable ASCII characters, no space and no `+` (the
/// signed-note key-name rules, so the origin can name the log's key).
pub fn validate_origin(origin: &str) -> Result<(), AuditError> {
    let ok = !origin.is_empty() && origin.len() <= 255 && origin.bytes().all(|b| b.is_ascii_graphic() && b != b'+');
    if ok {
        Ok(())
    } else {
        Err(AuditError::Malformed {
            what: "origin".into(),
            reason: format!("{origin:?} must be 1-255 printable ASCII characters without spaces or '+'"),
        })
    }
}

impl Checkpoint {
    /// The note text: `ORIGIN\nSIZE\nBASE64(ROOT)\n`.
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, base64(&self.root))
    }

    /// Parses a note text, refusing every other spelling of the same checkpoint
    /// (extension lines, leading zeros, non-canonical base64).
    pub fn parse_body(text: &str) -> Result<Checkpoint, AuditError> {
        let bad = |reason: &str| AuditError::Malformed { what: "checkpoint body".into(), reason: reason.to_owned() };
        let lines: Vec<&str> =
            text.strip_suffix('\n').ok_or_else(|| bad("must end with a newline"))?.split('\n').collect();
        let [origin, size, root] = lines.as_slice() else {
            return Err(bad("expected exactly three lines"));
        };
        validate_origin(origin)?;
        let size: u64 = size.parse().map_err(|_| bad("size is not a decimal number"))?;
        let root = unbase64(root)?.try_into().map_err(|_| bad("root is not 32 bytes"))?;
        let checkpoint = Checkpoint { origin: (*origin).to_owned(), size, root };
        super::check_canonical("checkpoint body", text.as_bytes(), checkpoint.body().as_bytes())?;
        Ok(checkpoint)
    }

    /// Signs the body with the log key.
    pub fn sign(self, log_key: &Ed25519KeyPair) -> SignedCheckpoint {
        let mut signature = [0u8; 64];
        signature.copy_from_slice(log_key.sign(self.body().as_bytes()).as_ref());
        SignedCheckpoint { checkpoint: self, signature }
    }

    /// What a witness signs: [`WITNESS_PREFIX`] then the body.
    pub fn witness_message(&self) -> Vec<u8> {
        format!("{WITNESS_PREFIX}{}", self.body()).into_bytes()
    }
}

impl SignedCheckpoint {
    /// Checks the log's signature with its raw Ed25519 public key.
    pub fn verify(&self, log_key: &[u8; 32]) -> Result<(), AuditError> {
        signature::UnparsedPublicKey::new(&signature::ED25519, log_key)
            .verify(self.checkpoint.body().as_bytes(), &self.signature)
            .map_err(|_| AuditError::LogSignature { index: 0, size: self.checkpoint.size })
    }
}

/// Loads the log's signing key from Ed25519 PKCS#8 (the coordinator's `signing.key`).
pub fn log_key_pair(pkcs8: &[u8]) -> Result<Ed25519KeyPair, AuditError> {
    Ed25519KeyPair::from_pkcs8(pkcs8)
        .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8))
        .map_err(|_| AuditError::Key { what: "the log signing key (Ed25519 PKCS#8)" })
}

/// The raw public key of a log key pair.
pub fn log_public_key(pair: &Ed25519KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(pair.public_key().as_ref());
    out
}

/// Signs `checkpoint` as a witness with the site's PKCS#8 PEM identity key. Reached
/// through [`super::witness::Consistent::cosign`], after the witness's checks.
pub(crate) fn cosign(
    checkpoint: &Checkpoint,
    site_key: &SecretPem,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, AuditError> {
    let key_der = PrivatePkcs8KeyDer::from_pem_slice(site_key.expose().as_bytes())
        .map_err(|_| AuditError::Key { what: "the site identity key (PKCS#8 PEM)" })?;
    let pair = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key_der.secret_pkcs8_der(),
        rng,
    )
    .map_err(|_| AuditError::Key { what: "the site identity key (ECDSA P-256)" })?;
    let sig = pair
        .sign(rng, &checkpoint.witness_message())
        .map_err(|_| AuditError::Random { what: "cosigning a checkpoint" })?;
    Ok(sig.as_ref().to_vec())
}

/// Checks a cosignature with a witness's public key bits (an uncompressed P-256
/// point, as [`witness_key`] returns).
pub fn verify_cosignature(checkpoint: &Checkpoint, witness_key: &[u8], signature: &[u8]) -> Result<(), String> {
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, witness_key)
        .verify(&checkpoint.witness_message(), signature)
        .map_err(|_| "signature does not verify under the site's certificate".to_owned())
}

/// The one certificate in `pem`, if the PEM text is exactly its canonical spelling
/// (see [`canonical_pem`]): an export must not be changeable without changing a
/// certificate.
pub fn single_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    let mut certs = identity::pem_to_der(pem).map_err(|e| e.to_string())?;
    if certs.len() != 1 {
        return Err(format!("expected exactly one certificate, found {}", certs.len()));
    }
    let der = certs.remove(0);
    if canonical_pem(&der) != pem {
        return Err("PEM text is not in canonical form (64-column base64, LF line ends)".to_owned());
    }
    Ok(der)
}

/// `-----BEGIN CERTIFICATE-----`, base64 in lines of 64, `-----END CERTIFICATE-----`,
/// each line ending in LF: the form rcgen writes.
pub fn canonical_pem(der: &[u8]) -> String {
    let body = base64(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Checks that `cert` is a client certificate issued by one of the consortium's CAs
/// `cas` (more than one after a rollover), valid at `at_ms` (milliseconds since the
/// Unix epoch, taken from the log), naming `maeum://site/<site>`. Returns its public
/// key bits.
pub fn witness_key(
    cas: &[CertificateDer<'_>],
    cert: &CertificateDer<'_>,
    site: &str,
    at_ms: i64,
) -> Result<Vec<u8>, String> {
    use rustls::server::WebPkiClientVerifier;
    let expected = PeerId::site(site).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone().into_owned()).map_err(|e| format!("CA certificate: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let at = UnixTime::since_unix_epoch(Duration::from_millis(u64::try_from(at_ms).unwrap_or(0)));
    verifier
        .verify_client_cert(&cert.clone().into_owned(), &[], at)
        .map_err(|e| format!("not valid under the consortium CA at {}: {e}", super::rfc3339(at_ms)))?;
    let found = PeerId::from_cert_der(cert).map_err(|e| e.to_string())?;
    if found != expected {
        return Err(format!("certificate names {found}"));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    Ok(parsed.public_key().subject_public_key.data.to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use maeum_pki::identity::{Ca, site_request};
    use ring::rand::SystemRandom;

    fn now_ms() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
    }

    #[test]
    fn body_round_trips_and_only_one_spelling_parses() {
        let cp = Checkpoint { origin: "maeum/heart".into(), size: 12, root: [7; 32] };
        let body = cp.body();
        assert_eq!(body, "maeum/heart\n12\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n");
        assert_eq!(Checkpoint::parse_body(&body).unwrap(), cp);
        for bad in [
            "maeum/heart\n012\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "maeum/heart\n12\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
            "maeum/heart\n12\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\nextra\n",
            "maeum heart\n12\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "maeum/heart\n+12\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
            "maeum/heart\n12\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwd=\n",
        ] {
            assert!(Checkpoint::parse_body(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_signature_verifies_only_for_the_same_body_and_key() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = log_key_pair(pkcs8.as_ref()).unwrap();
        let public = log_public_key(&key);
        let signed = Checkpoint { origin: "maeum/heart".into(), size: 3, root: [1; 32] }.sign(&key);
        signed.verify(&public).unwrap();
        let mut other = signed.clone();
        other.checkpoint.size = 4;
        assert!(other.verify(&public).is_err());
        let other_key = log_key_pair(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
        assert!(signed.verify(&log_public_key(&other_key)).is_err());
        assert!(log_key_pair(b"not a key").is_err());
    }

    #[test]
    fn cosignature_verifies_under_the_site_certificate_only() {
        let rng = SystemRandom::new();
        let ca = Ca::generate("heart", 30).unwrap();
        let (key, csr) = site_request("a").unwrap();
        let (_, cert_pem) = ca.sign_site_request(&csr, Some("a"), 30).unwrap();
        let ca_der = single_cert(ca.cert_pem()).unwrap();
        let cert_der = single_cert(&cert_pem).unwrap();
        let cp = Checkpoint { origin: "maeum/heart".into(), size: 3, root: [1; 32] };
        let sig = cosign(&cp, &key, &rng).unwrap();
        let now = now_ms();
        let bits = witness_key(std::slice::from_ref(&ca_der), &cert_der, "a", now).unwrap();
        verify_cosignature(&cp, &bits, &sig).unwrap();
        let other = Checkpoint { size: 4, ..cp.clone() };
        assert!(verify_cosignature(&other, &bits, &sig).is_err());
        let e = witness_key(std::slice::from_ref(&ca_der), &cert_der, "b", now).unwrap_err();
        assert!(e.contains("names site/a"), "{e}");
        let e = witness_key(std::slice::from_ref(&ca_der), &cert_der, "a", now + 40 * 86_400_000).unwrap_err();
        assert!(e.contains("not valid under the consortium CA"), "{e}");
        let other_ca = Ca::generate("heart", 30).unwrap();
        let other_der = single_cert(other_ca.cert_pem()).unwrap();
        assert!(witness_key(&[other_der], &cert_der, "a", now).is_err());
    }

    #[test]
    fn certificates_must_be_in_canonical_pem() {
        let ca = Ca::generate("heart", 30).unwrap();
        let der = single_cert(ca.cert_pem()).unwrap();
        assert_eq!(canonical_pem(&der), ca.cert_pem(), "rcgen writes the canonical form");
        assert!(single_cert(&ca.cert_pem().replace('\n', "\r\n")).is_err());
        assert!(single_cert(&format!("{}{}", ca.cert_pem(), ca.cert_pem())).is_err());
    }
}
