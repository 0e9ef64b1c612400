//! The production identity adapter: a site signs its secure-aggregation messages with
//! the ECDSA P-256 key of its enrolled certificate ([`EcdsaSigner`]), and every party
//! checks the others' signatures with the public keys of the certificates relayed for
//! the session ([`SessionVerifier`]). The certificates themselves are checked against
//! the consortium CA by the caller (`identity::verify_peer_cert`) before a
//! [`Session`] is built from them.

use std::fmt;

use ring::rand::SecureRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair, UnparsedPublicKey,
};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;

use super::{Session, Signer, Verifier};

/// Why an identity key or certificate could not be used. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the site key is not a PKCS#8 PEM document: {0}")]
    Pem(String),
    #[error("the site key is not an ECDSA P-256 key")]
    Key,
    #[error("unreadable certificate: {0}")]
    Certificate(String),
}

/// Signs with the site's ECDSA P-256 identity key (ASN.1 DER signatures, SHA-256).
/// ECDSA needs fresh randomness for every signature: it comes from the caller's `R`
/// (in the site agent, `ring::rand::SystemRandom`).
pub struct EcdsaSigner<R> {
    key: EcdsaKeyPair,
    rng: R,
}

impl<R> fmt::Debug for EcdsaSigner<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EcdsaSigner").field("algorithm", &"ECDSA P-256 SHA-256").finish_non_exhaustive()
    }
}

impl<R: SecureRandom> EcdsaSigner<R> {
    /// From the site's key file: a PEM "PRIVATE KEY" (PKCS#8) block, signing with
    /// randomness from `rng`.
    pub fn from_pkcs8_pem(pem: &str, rng: R) -> Result<EcdsaSigner<R>, SignError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| SignError::Pem(e.to_string()))?;
        EcdsaSigner::from_pkcs8_der(der.secret_pkcs8_der(), rng)
    }

    /// From a DER PKCS#8 document, signing with randomness from `rng`.
    pub fn from_pkcs8_der(der: &[u8], rng: R) -> Result<EcdsaSigner<R>, SignError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng).map_err(|_| SignError::Key)?;
        Ok(EcdsaSigner { key, rng })
    }

    /// The public key (uncompressed point), as a certificate for this key carries it.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }
}

impl<R: SecureRandom> Signer for EcdsaSigner<R> {
    /// ECDSA needs fresh randomness; should the caller's generator fail, the signature is
    /// empty and every verifier refuses it (the stage then fails with SA-03/SA-09).
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(&self.rng, message).map(|s| s.as_ref().to_vec()).unwrap_or_default()
    }
}

/// Verifies the participants' signatures with the identity keys in the [`Session`]
/// (each the subject public key of that site's certificate).
#[derive(Debug, Clone)]
pub struct SessionVerifier {
    /// Identity key of party i at position i-1.
    keys: Vec<Vec<u8>>,
}

impl SessionVerifier {
    pub fn new(session: &Session) -> SessionVerifier {
        SessionVerifier { keys: session.participants.iter().map(|p| p.identity_key.clone()).collect() }
    }
}

impl Verifier for SessionVerifier {
    fn verify(&self, party: u16, message: &[u8], signature: &[u8]) -> bool {
        let Some(key) = usize::from(party).checked_sub(1).and_then(|i| self.keys.get(i)) else {
            return false;
        };
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key).verify(message, signature).is_ok()
    }
}

/// The identity key a [`super::Participant`] carries: the subject public key bits of a
/// DER certificate (for P-256, the uncompressed point).
pub fn identity_key_from_cert(der: &[u8]) -> Result<Vec<u8>, SignError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| SignError::Certificate(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use maeum_pki::identity::{Ca, pem_to_der, site_request};
    use ring::rand::SystemRandom;

    use crate::{Participant, SessionParams};

    fn session(key: Vec<u8>) -> Session {
        Session {
            consortium: "c".into(),
            job_id: "j".into(),
            round: 1,
            attempt: 0,
            participants: vec![
                Participant { index: 1, site_id: "site-a".into(), identity_key: key },
                Participant { index: 2, site_id: "site-b".into(), identity_key: vec![4; 65] },
            ],
            params: SessionParams { threshold: 2, degree: 0, vector_len: 1, clip: 1.0, max_weight: 1 },
            binding: [9; 32],
        }
    }

    #[test]
    fn enrolled_site_key_signs_and_its_certificate_verifies() {
        let ca = Ca::generate("consortium", 30).unwrap();
        let (key, csr) = site_request("site-a").unwrap();
        let (_, cert_pem) = ca.sign_site_request(&csr, Some("site-a"), 30).unwrap();
        let der = pem_to_der(&cert_pem).unwrap().remove(0);
        let identity = identity_key_from_cert(&der).unwrap();

        let signer = EcdsaSigner::from_pkcs8_pem(key.expose(), SystemRandom::new()).unwrap();
        assert_eq!(signer.public_key(), identity);
        assert!(!format!("{signer:?}").contains("BEGIN"));
        let verifier = SessionVerifier::new(&session(identity));
        let message = b"maeum/secagg/v1/advertise test";
        let mut signature = signer.sign(message);
        assert!(verifier.verify(1, message, &signature));
        assert!(!verifier.verify(2, message, &signature), "another party's key");
        assert!(!verifier.verify(3, message, &signature), "not a participant");
        assert!(!verifier.verify(0, message, &signature), "not a participant");
        let mut tampered = message.to_vec();
        tampered[3] ^= 1;
        assert!(!verifier.verify(1, &tampered, &signature), "a flipped message byte");
        let last = signature.len() - 1;
        signature[last] ^= 1;
        assert!(!verifier.verify(1, message, &signature), "a flipped signature byte");
    }

    #[test]
    fn unusable_keys_and_certificates_are_refused() {
        assert!(matches!(EcdsaSigner::from_pkcs8_pem("not a key", SystemRandom::new()), Err(SignError::Pem(_))));
        assert!(matches!(EcdsaSigner::from_pkcs8_der(&[0x30, 0x00], SystemRandom::new()), Err(SignError::Key)));
        assert!(matches!(identity_key_from_cert(&[1, 2, 3]), Err(SignError::Certificate(_))));
    }
}
