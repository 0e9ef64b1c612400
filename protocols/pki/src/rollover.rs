//! CA rollover (`docs/protocols/certificates.md#rolling-over-the-ca`): a **handover**
//! from the consortium CA to its successor, signed by both CA keys, and the walk a site
//! (or an auditor) makes from the CAs it trusts along the handovers it is shown.
//!
//! A handover's statement is [`CA_HANDOVER_DOMAIN`] then the consortium, the old CA's
//! fingerprint and the new CA's fingerprint (SHA-256 of the DER certificates, hex), one
//! per line, each signed with ECDSA P-256 (SHA-256, ASN.1). The old key's signature says
//! the CA everyone trusts vouches for its successor; the new key's signature proves the
//! successor's key is held. The successor is a self-signed CA certificate with its own
//! subject (`Maeum <consortium> CA <generation>`), never a cross-certificate: the old
//! CA's path length 0 stays true, and TLS chains stay one link long.
//!
//! Pure: ring, rcgen and x509-parser over the caller's bytes.

use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::identity::{Ca, IdentityError, fingerprint, parse_cert, pem_to_der};

/// Domain separation: a CA handover signature never passes for anything else the CA
/// keys sign (certificates are DER `TBSCertificate`s, never this text).
pub const CA_HANDOVER_DOMAIN: &[u8] = b"maeum/ca-handover/v1\n";

/// The most handovers a walk follows in one call (a hostile chain costs a verifier at
/// most this many pairs of signature checks).
pub const MAX_HANDOVERS: usize = 64;

/// A handover from the CA whose certificate has fingerprint `old_ca` to the CA in
/// `new_ca_pem`. Public material only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaHandover {
    /// SHA-256 of the old CA certificate (DER), lowercase hex.
    pub old_ca: String,
    /// The new CA certificate, PEM (exactly one certificate).
    pub new_ca_pem: String,
    /// The old CA key's signature over [`CaHandover::statement`], hex.
    pub old_signature: String,
    /// The new CA key's signature over the same statement, hex.
    pub new_signature: String,
}

fn invalid(reason: impl Into<String>) -> IdentityError {
    IdentityError::Untrusted { who: "CA handover".into(), reason: reason.into() }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, IdentityError> {
    if !s.len().is_multiple_of(2) || s.len() > 512 {
        return Err(invalid("a signature is not hex of a plausible length"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid("a signature is not hex"))
}

/// The CA certificate's public key bits (an uncompressed P-256 point).
fn public_key(der: &[u8]) -> Result<Vec<u8>, IdentityError> {
    Ok(parse_cert(der)?.public_key().subject_public_key.data.to_vec())
}

/// Whether `cert_der` was issued (signed) by the CA certificate `ca_der`: its issuer is
/// the CA's subject and its signature verifies under the CA's key. Says nothing about
/// validity dates or identities (the TLS verifiers check those).
pub fn issued_by(cert_der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok(cert), Ok(ca)) = (parse_cert(cert_der), parse_cert(ca_der)) else { return false };
    cert.issuer().as_raw() == ca.subject().as_raw()
        && UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, ca.public_key().subject_public_key.data.as_ref())
            .verify(cert.tbs_certificate.as_ref(), cert.signature_value.data.as_ref())
            .is_ok()
}

impl Ca {
    /// The successor of this CA for a rollover: a new key, the subject
    /// `Maeum <consortium> CA <generation>` (generation ≥ 2), `validity_days` long.
    pub fn successor(consortium: &str, generation: u32, validity_days: u32) -> Result<Ca, IdentityError> {
        crate::identity::validate_name(consortium)?;
        if generation < 2 {
            return Err(invalid("a successor CA's generation is 2 or more"));
        }
        Ca::generate_named(&format!("Maeum {consortium} CA {generation}"), validity_days)
    }

    /// Signs `message` with the CA key (ECDSA P-256, ASN.1 DER signature).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, IdentityError> {
        use rcgen::SigningKey as _;
        self.issuer
            .key()
            .sign(message)
            .map_err(|cause| IdentityError::Generate { what: "signing a CA handover", cause })
    }

    /// The DER of this CA's certificate.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, IdentityError> {
        pem_to_der(self.cert_pem())?.into_iter().next().ok_or_else(|| invalid("no CA certificate"))
    }
}

impl CaHandover {
    /// The signed text.
    pub fn statement(consortium: &str, old_ca: &str, new_ca: &str) -> Vec<u8> {
        let mut s = CA_HANDOVER_DOMAIN.to_vec();
        s.extend_from_slice(format!("{consortium}\n{old_ca}\n{new_ca}\n").as_bytes());
        s
    }

    /// The handover from `old` to `new`, signed by both.
    pub fn make(consortium: &str, old: &Ca, new: &Ca) -> Result<CaHandover, IdentityError> {
        let old_ca = fingerprint(&old.cert_der()?);
        let statement = Self::statement(consortium, &old_ca, &fingerprint(&new.cert_der()?));
        Ok(CaHandover {
            old_ca,
            new_ca_pem: new.cert_pem().to_string(),
            old_signature: hex(&old.sign(&statement)?),
            new_signature: hex(&new.sign(&statement)?),
        })
    }

    /// The new CA certificate, DER.
    pub fn new_ca_der(&self) -> Result<CertificateDer<'static>, IdentityError> {
        let mut certs = pem_to_der(&self.new_ca_pem)?;
        if certs.len() != 1 {
            return Err(invalid("the new CA must be exactly one certificate"));
        }
        Ok(certs.remove(0))
    }

    /// SHA-256 of the new CA certificate, hex.
    pub fn new_ca(&self) -> Result<String, IdentityError> {
        Ok(fingerprint(&self.new_ca_der()?))
    }

    /// Checks this handover from the CA certificate `old_der`: it names `old_der`'s
    /// fingerprint; the new certificate is a self-signed CA certificate with a subject
    /// of its own; both signatures verify. Returns the new CA certificate.
    pub fn verify(&self, consortium: &str, old_der: &[u8]) -> Result<CertificateDer<'static>, IdentityError> {
        if fingerprint(old_der) != self.old_ca {
            return Err(invalid(format!(
                "it hands over from CA {}…, not this one",
                self.old_ca.get(..16).unwrap_or("")
            )));
        }
        let new_der = self.new_ca_der()?;
        let new = parse_cert(&new_der)?;
        if !new.is_ca() {
            return Err(invalid("the new certificate is not a CA certificate"));
        }
        if !issued_by(&new_der, &new_der) {
            return Err(invalid("the new CA certificate is not self-signed"));
        }
        if new.subject().as_raw() == parse_cert(old_der)?.subject().as_raw() {
            return Err(invalid("the new CA has the old CA's subject"));
        }
        let statement = Self::statement(consortium, &self.old_ca, &fingerprint(&new_der));
        let check = |key: &[u8], sig: &str, who: &str| {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
                .verify(&statement, &unhex(sig)?)
                .map_err(|_| invalid(format!("the {who} CA's signature does not verify")))
        };
        check(&public_key(old_der)?, &self.old_signature, "old")?;
        check(&public_key(&new_der)?, &self.new_signature, "new")?;
        Ok(new_der)
    }
}

/// Walks `served` from the CA in effect, the last of `trusted` (DER, oldest first):
/// takes the handover from it, verifies it under both CA keys, makes its CA the one in
/// effect, and goes on. Returns the handovers taken with their new CAs, in order.
///
/// The walk is linear, as an auditor's (AUD-23): a handover from a CA that was already
/// rolled over to another CA, two handovers from one CA to different CAs, or one back
/// to a CA already trusted is a fork, and an error, as is one from the CA in effect
/// that does not verify (the coordinator showed a forged rollover). A retired CA's key
/// that leaked therefore cannot hand the consortium over to another CA. Handovers
/// between CAs this site never trusted, or to one it trusts, change nothing and are
/// passed over.
pub fn follow(
    consortium: &str,
    trusted: &[CertificateDer<'_>],
    served: &[CaHandover],
) -> Result<Vec<(CaHandover, CertificateDer<'static>)>, IdentityError> {
    if served.len() > MAX_HANDOVERS {
        return Err(invalid(format!("{} handovers, more than {MAX_HANDOVERS}", served.len())));
    }
    let mut known: Vec<CertificateDer<'static>> = trusted.iter().map(|c| c.clone().into_owned()).collect();
    let short = |print: &str| print.get(..16).unwrap_or(print).to_string();
    let mut taken = Vec::new();
    loop {
        let Some(tip) = known.last().cloned() else { return Err(invalid("no CA is trusted")) };
        let tip_print = fingerprint(&tip);
        let mut next: Option<(&CaHandover, String)> = None;
        for h in served.iter().filter(|h| h.old_ca == tip_print) {
            let new_print = h.new_ca()?;
            match &next {
                Some((_, taken_print)) if *taken_print != new_print => {
                    return Err(invalid(format!(
                        "two rollovers from CA {}… to different CAs ({}… and {}…): a fork",
                        short(&tip_print),
                        short(taken_print),
                        short(&new_print)
                    )));
                }
                Some(_) => {}
                None => next = Some((h, new_print)),
            }
        }
        let Some((h, new_print)) = next else { break };
        if known.iter().any(|c| fingerprint(c) == new_print) {
            return Err(invalid(format!("a rollover from CA {}… back to a CA already trusted", short(&tip_print))));
        }
        let new = h.verify(consortium, &tip)?;
        known.push(new.clone());
        taken.push((h.clone(), new));
    }
    // Every trusted CA but the one in effect was rolled over: a handover from one of
    // them to a CA not trusted is a fork.
    let retired: Vec<String> = known[..known.len() - 1].iter().map(|c| fingerprint(c)).collect();
    for h in served.iter().filter(|h| retired.contains(&h.old_ca)) {
        let new_print = h.new_ca()?;
        if !known.iter().any(|c| fingerprint(c) == new_print) {
            return Err(invalid(format!(
                "a rollover from CA {}…, which was already rolled over, to CA {}…: a fork",
                short(&h.old_ca),
                short(&new_print)
            )));
        }
    }
    Ok(taken)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::identity::{PeerId, site_request, verify_peer_cert};

    #[test]
    fn a_handover_verifies_under_the_old_ca_and_only_there() {
        let old = Ca::generate("heart", 30).unwrap();
        let new = Ca::successor("heart", 2, 30).unwrap();
        let h = CaHandover::make("heart", &old, &new).unwrap();
        let got = h.verify("heart", &old.cert_der().unwrap()).unwrap();
        assert_eq!(got, new.cert_der().unwrap());
        // Another consortium, another old CA.
        assert!(h.verify("lung", &old.cert_der().unwrap()).is_err());
        let other = Ca::generate("heart", 30).unwrap();
        assert!(h.verify("heart", &other.cert_der().unwrap()).unwrap_err().to_string().contains("hands over from"));
    }

    #[test]
    fn forged_handovers_are_refused() {
        let old = Ca::generate("heart", 30).unwrap();
        let new = Ca::successor("heart", 2, 30).unwrap();
        let mallory = Ca::successor("heart", 2, 30).unwrap();
        let old_der = old.cert_der().unwrap();
        // Signed by the new CA only (the old signature by another key).
        let mut h = CaHandover::make("heart", &mallory, &new).unwrap();
        h.old_ca = fingerprint(&old_der);
        assert!(h.verify("heart", &old_der).unwrap_err().to_string().contains("old CA's signature"));
        // The new CA swapped after signing.
        let mut h = CaHandover::make("heart", &old, &new).unwrap();
        h.new_ca_pem = mallory.cert_pem().to_string();
        assert!(h.verify("heart", &old_der).is_err());
        // A flipped signature byte.
        let mut h = CaHandover::make("heart", &old, &new).unwrap();
        let last = h.new_signature.pop().unwrap();
        h.new_signature.push(if last == '0' { '1' } else { '0' });
        assert!(h.verify("heart", &old_der).unwrap_err().to_string().contains("new CA's signature"));
        // Not hex.
        let mut h = CaHandover::make("heart", &old, &new).unwrap();
        h.old_signature = "zz".into();
        assert!(h.verify("heart", &old_der).is_err());
        // A successor with the old CA's subject.
        let twin = Ca::generate("heart", 30).unwrap();
        let h = CaHandover::make("heart", &old, &twin).unwrap();
        assert!(h.verify("heart", &old_der).unwrap_err().to_string().contains("subject"));
    }

    /// A CA and two successors of the consortium "heart".
    fn three_generations() -> (Ca, Ca, Ca) {
        (
            Ca::generate("heart", 30).unwrap(),
            Ca::successor("heart", 2, 30).unwrap(),
            Ca::successor("heart", 3, 30).unwrap(),
        )
    }

    #[test]
    fn follow_walks_a_chain_in_any_order_and_stops_at_a_forgery() {
        let (a, b, c) = three_generations();
        let ab = CaHandover::make("heart", &a, &b).unwrap();
        let bc = CaHandover::make("heart", &b, &c).unwrap();
        let a_der = a.cert_der().unwrap();
        let taken = follow("heart", std::slice::from_ref(&a_der), &[bc.clone(), ab.clone()]).unwrap();
        let names: Vec<_> = taken.iter().map(|(h, _)| h.clone()).collect();
        assert_eq!(names, vec![ab.clone(), bc.clone()]);
        // Already trusting b: only c is new; trusting an unrelated CA: nothing.
        let both = [a_der.clone(), b.cert_der().unwrap()];
        assert_eq!(follow("heart", &both, &[ab.clone(), bc.clone()]).unwrap().len(), 1);
        let other = Ca::generate("heart", 30).unwrap().cert_der().unwrap();
        assert!(follow("heart", &[other], &[ab.clone(), bc.clone()]).unwrap().is_empty());
        let mut forged = bc.clone();
        forged.old_signature = ab.old_signature.clone();
        assert!(follow("heart", std::slice::from_ref(&a_der), &[ab.clone(), forged]).is_err());
        // The same rollover served twice is one.
        assert_eq!(follow("heart", std::slice::from_ref(&a_der), &[ab.clone(), ab.clone()]).unwrap().len(), 1);
    }

    #[test]
    fn follow_refuses_a_fork_even_when_both_keys_signed_it() {
        let (a, b, c) = three_generations();
        let (a_der, b_der) = (a.cert_der().unwrap(), b.cert_der().unwrap());
        let ab = CaHandover::make("heart", &a, &b).unwrap();
        // a's key leaked after the rollover to b: a → c verifies, but a is retired.
        let ac = CaHandover::make("heart", &a, &c).unwrap();
        let both = [a_der.clone(), b_der.clone()];
        let err = follow("heart", &both, &[ab.clone(), ac.clone()]).unwrap_err().to_string();
        assert!(err.contains("already rolled over") && err.contains("fork"), "{err}");
        // Two rollovers from the CA in effect: neither is taken.
        let err = follow("heart", std::slice::from_ref(&a_der), &[ab.clone(), ac]).unwrap_err().to_string();
        assert!(err.contains("two rollovers"), "{err}");
        // Back to a CA already trusted.
        let ba = CaHandover::make("heart", &b, &a).unwrap();
        let err = follow("heart", &both, &[ab, ba]).unwrap_err().to_string();
        assert!(err.contains("back to a CA already trusted"), "{err}");
    }

    #[test]
    fn issued_by_tells_the_issuing_ca() {
        let old = Ca::generate("heart", 30).unwrap();
        let new = Ca::successor("heart", 2, 30).unwrap();
        let (_, csr) = site_request("a").unwrap();
        let (_, pem) = new.sign_site_request(&csr, Some("a"), 30).unwrap();
        let der = pem_to_der(&pem).unwrap().remove(0);
        assert!(issued_by(&der, &new.cert_der().unwrap()));
        assert!(!issued_by(&der, &old.cert_der().unwrap()));
        assert!(!issued_by(b"not a certificate", &new.cert_der().unwrap()));
        // A bundle of both CAs verifies a certificate of either.
        let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
        verify_peer_cert(&bundle, &der, &PeerId::site("a").unwrap()).unwrap();
    }
}
