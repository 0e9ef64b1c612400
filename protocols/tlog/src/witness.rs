//! A site as a witness of the log: it remembers the latest checkpoint it verified,
//! accepts a new one only if it extends that one, and only then cosigns it.
//!
//! The checks, in order: the checkpoint is of the expected log (AUD-18) and signed by
//! the log key (AUD-09); it is not smaller than the one seen (AUD-17); at the same size
//! its root is the same (else AUD-16, a fork: the coordinator showed two different logs
//! of one size); at a larger size the consistency proof verifies (AUD-10). A witness
//! that cosigns only through [`Consistent`] never signs two roots for one size, so a
//! coordinator that shows different logs to different sites is caught as soon as two
//! views meet (an auditor, or a site comparing cosigned checkpoints).

use ring::rand::SecureRandom;

use super::checkpoint::cosign;
use super::merkle::{Hash, verify_consistency};
use super::{AuditError, Checkpoint, SignedCheckpoint, hex};
use maeum_pki::identity::SecretPem;

/// A witness's state: which log, its key, and the latest checkpoint verified.
#[derive(Debug, Clone)]
pub struct Witness {
    origin: String,
    log_key: [u8; 32],
    latest: Option<SignedCheckpoint>,
}

/// Proof that a checkpoint passed the witness's checks; the only way to cosign.
#[derive(Debug)]
#[must_use = "a verified checkpoint is meant to be cosigned"]
pub struct Consistent {
    checkpoint: Checkpoint,
}

impl Consistent {
    /// The verified checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Cosigns it with the site's PKCS#8 PEM identity key (ECDSA P-256).
    pub fn cosign(&self, site_key: &SecretPem, rng: &dyn SecureRandom) -> Result<Vec<u8>, AuditError> {
        cosign(&self.checkpoint, site_key, rng)
    }
}

impl Witness {
    /// A witness of log `origin` whose checkpoints verify under `log_key`, starting
    /// from `latest` (the checkpoint it kept, verified again here) or from nothing.
    pub fn new(origin: String, log_key: [u8; 32], latest: Option<SignedCheckpoint>) -> Result<Witness, AuditError> {
        let witness = Witness { origin, log_key, latest: None };
        if let Some(cp) = &latest {
            witness.check_signed(cp)?;
        }
        Ok(Witness { latest, ..witness })
    }

    /// Checks new checkpoints under `log_key` from now on: the log key rotated, and the
    /// caller verified the handover (`crate::handover::walk`). The latest checkpoint
    /// stays, signed by the key of its time.
    pub fn set_log_key(&mut self, log_key: [u8; 32]) {
        self.log_key = log_key;
    }

    /// The latest checkpoint verified (to persist and to compare with others).
    pub fn latest(&self) -> Option<&SignedCheckpoint> {
        self.latest.as_ref()
    }

    /// The size from which the log must prove consistency for the next checkpoint.
    pub fn known_size(&self) -> u64 {
        self.latest.as_ref().map_or(0, |c| c.checkpoint.size)
    }

    fn check_signed(&self, new: &SignedCheckpoint) -> Result<(), AuditError> {
        if new.checkpoint.origin != self.origin {
            return Err(AuditError::Origin { expected: self.origin.clone(), found: new.checkpoint.origin.clone() });
        }
        new.verify(&self.log_key)
    }

    /// Verifies `new` against the latest checkpoint with `proof` (the consistency
    /// proof from [`Witness::known_size`] to `new`'s size; empty at the same size or
    /// for the first checkpoint). On success `new` becomes the latest and the returned
    /// token can cosign it; on failure nothing changes.
    pub fn observe(&mut self, new: &SignedCheckpoint, proof: &[Hash]) -> Result<Consistent, AuditError> {
        self.check_signed(new)?;
        let cp = &new.checkpoint;
        if let Some(old) = self.latest.as_ref().map(|c| &c.checkpoint) {
            if cp.size < old.size {
                return Err(AuditError::Rollback { old: old.size, new: cp.size });
            }
            if cp.size == old.size && cp.root != old.root {
                return Err(AuditError::Fork { size: cp.size, known: hex(&old.root[..8]), new: hex(&cp.root[..8]) });
            }
            verify_consistency(old.size, cp.size, &old.root, &cp.root, proof)
                .map_err(|reason| AuditError::Inconsistent { old: old.size, new: cp.size, reason })?;
        }
        self.latest = Some(new.clone());
        Ok(Consistent { checkpoint: cp.clone() })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::checkpoint::{log_key_pair, log_public_key, single_cert, verify_cosignature, witness_key};
    use crate::{Event, Log};
    use maeum_pki::identity::{Ca, site_request};
    use ring::rand::SystemRandom;
    use ring::signature::Ed25519KeyPair;

    fn event(n: u32) -> Event {
        Event::JobFinished { job_id: format!("j-{n}"), state: "completed".into() }
    }

    fn setup() -> (Ed25519KeyPair, Witness, Log) {
        let key = log_key_pair(Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap().as_ref()).unwrap();
        let witness = Witness::new("maeum/heart".into(), log_public_key(&key), None).unwrap();
        (key, witness, Log::new("maeum/heart".into()).unwrap())
    }

    #[test]
    fn witness_follows_a_growing_log_and_cosigns() {
        let (key, mut witness, mut log) = setup();
        let ca = Ca::generate("heart", 30).unwrap();
        let (site_key, csr) = site_request("a").unwrap();
        let (_, cert) = ca.sign_site_request(&csr, Some("a"), 30).unwrap();
        let rng = SystemRandom::new();
        for batch in 0..4 {
            for n in 0..=batch {
                log.append(1, event(n));
            }
            let cp = log.checkpoint(&key).unwrap();
            let proof = log.consistency_proof(witness.known_size(), cp.checkpoint.size).unwrap();
            let token = witness.observe(&cp, &proof).unwrap();
            let sig = token.cosign(&site_key, &rng).unwrap();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
            let bits =
                witness_key(&[single_cert(ca.cert_pem()).unwrap()], &single_cert(&cert).unwrap(), "a", now).unwrap();
            verify_cosignature(&cp.checkpoint, &bits, &sig).unwrap();
            // Seeing the same checkpoint again is fine.
            let _ = witness.observe(&cp, &[]).unwrap();
        }
    }

    #[test]
    fn fork_at_the_same_size_is_detected() {
        let (key, mut witness, mut log) = setup();
        let mut forked = log.clone();
        log.append(1, event(0));
        forked.append(1, event(99));
        let honest = log.checkpoint(&key).unwrap();
        let other = forked.checkpoint(&key).unwrap();
        let _ = witness.observe(&honest, &[]).unwrap();
        let e = witness.observe(&other, &[]).unwrap_err();
        assert!(matches!(e, AuditError::Fork { size: 1, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("AUD-16 FORK: two checkpoints of size 1"), "{msg}");
        assert!(msg.contains(&hex(&honest.checkpoint.root[..8])) && msg.contains(&hex(&other.checkpoint.root[..8])));
        assert_eq!(witness.latest(), Some(&honest), "a refused checkpoint changes nothing");
    }

    #[test]
    fn fork_at_a_larger_size_fails_the_consistency_proof() {
        let (key, mut witness, mut log) = setup();
        let mut forked = log.clone();
        log.append(1, event(0));
        let _ = witness.observe(&log.checkpoint(&key).unwrap(), &[]).unwrap();
        forked.append(1, event(99));
        forked.append(1, event(100));
        let cp = forked.checkpoint(&key).unwrap();
        let proof = forked.consistency_proof(1, 2).unwrap();
        let e = witness.observe(&cp, &proof).unwrap_err();
        assert!(matches!(e, AuditError::Inconsistent { old: 1, new: 2, .. }), "{e}");
    }

    #[test]
    fn rollback_foreign_log_and_bad_signature_are_refused() {
        let (key, mut witness, mut log) = setup();
        log.append(1, event(0));
        let small = log.checkpoint(&key).unwrap();
        log.append(1, event(1));
        let big = log.checkpoint(&key).unwrap();
        let _ = witness.observe(&big, &[]).unwrap();
        assert!(matches!(witness.observe(&small, &[]), Err(AuditError::Rollback { old: 3, new: 1 })));
        let mut forged = big.clone();
        forged.signature[0] ^= 1;
        assert!(matches!(witness.observe(&forged, &[]), Err(AuditError::LogSignature { .. })));
        let mut other = Log::new("maeum/other".into()).unwrap();
        other.append(1, event(0));
        assert!(matches!(witness.observe(&other.checkpoint(&key).unwrap(), &[]), Err(AuditError::Origin { .. })));
    }
}
