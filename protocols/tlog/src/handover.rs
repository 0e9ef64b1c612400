//! Release-key rotation: a **handover** from the consortium's release key to a new one,
//! signed by both, and the walk a site (or an auditor) makes from the key it pinned at
//! enrolment along a chain of handovers (`docs/protocols/releases.md#rotating-the-release-key`).
//!
//! A handover's statement is [`HANDOVER_DOMAIN`] then `consortium`, the old key and the
//! new key (hex), one per line. The old key's signature says the key the sites trust
//! hands over; the new key's signature proves that someone holds the new key (a typo'd
//! or unheld key would leave the consortium unable to release). A serving host without
//! the old release key cannot make one, so it cannot move a site's pin to a key it
//! holds. The walk is strict: from the pinned key it takes the one link whose old key is
//! the current one, verifies it, and moves on; two links from one key (a fork) or a
//! link back to a key already walked (a cycle) stop it with an error.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use maeum_pki::identity::fingerprint;
use maeum_pki::rollover::CaHandover;
use rustls::pki_types::CertificateDer;

use crate::{hex, unhex, unhex32};

/// Domain separation: a handover signature can never pass for a release or a
/// checkpoint signature, nor one key's handover for the other's (their prefixes differ).
pub const HANDOVER_DOMAIN: &[u8] = b"maeum/release-key-handover/v1\n";
/// The log signing key's handovers (`docs/protocols/audit-log.md#rotating-the-log-key`).
pub const LOG_HANDOVER_DOMAIN: &[u8] = b"maeum/log-key-handover/v1\n";

/// Which of the consortium's Ed25519 keys a handover moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The release key (a release's second signature).
    Release,
    /// The log's signing key (checkpoints and a release's first signature).
    Log,
}

impl Role {
    /// The statement's prefix.
    pub fn domain(self) -> &'static [u8] {
        match self {
            Role::Release => HANDOVER_DOMAIN,
            Role::Log => LOG_HANDOVER_DOMAIN,
        }
    }

    /// The key's name in messages: `release` or `log`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Release => "release",
            Role::Log => "log",
        }
    }
}

/// One rotation of the release key, as stored at the coordinator
/// (`HOME/release-keys.json`), served to sites with every release, kept by each site
/// that followed it, and logged (`release_key_rotated`). Keys and signatures are hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyHandover {
    /// The release key handing over (Ed25519 public key).
    pub old_key: String,
    /// The release key taking over.
    pub new_key: String,
    /// The old key's signature over [`KeyHandover::statement`].
    pub old_signature: String,
    /// The new key's signature over the same statement.
    pub new_signature: String,
}

/// Why a handover or a walk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandoverError {
    /// A field is not the right length of hex.
    #[error("malformed release-key handover: {0}")]
    Malformed(String),
    /// The old key's signature does not verify: not made by the key sites trust.
    #[error("the {what}-key handover {old}… → {new}… is not signed by the {what} key it hands over from")]
    OldSignature {
        /// Which key (`release`, `log`).
        what: &'static str,
        /// The old key (16 hex digits).
        old: String,
        /// The new key (16 hex digits).
        new: String,
    },
    /// The new key's signature does not verify: nobody proved they hold it.
    #[error("the {what}-key handover {old}… → {new}… is not signed by the key it hands over to")]
    NewSignature {
        /// Which key (`release`, `log`).
        what: &'static str,
        /// The old key (16 hex digits).
        old: String,
        /// The new key (16 hex digits).
        new: String,
    },
    /// A handover to the key it comes from.
    #[error("a key handover from {0}… hands over to itself")]
    SameKey(String),
    /// Two handovers from one key.
    #[error("two key handovers leave the key {0}… (a fork): refusing both")]
    Fork(String),
    /// A handover back to a key already walked.
    #[error("the key handovers lead back to the key {0}… (a cycle)")]
    Cycle(String),
}

fn short(key: &[u8; 32]) -> String {
    hex(&key[..8])
}

impl KeyHandover {
    /// The bytes both keys sign.
    pub fn statement(role: Role, consortium: &str, old: &[u8; 32], new: &[u8; 32]) -> Vec<u8> {
        let mut out = role.domain().to_vec();
        out.extend_from_slice(format!("{consortium}\n{}\n{}\n", hex(old), hex(new)).as_bytes());
        out
    }

    /// A handover from `old` to `new`, signed by both (where the old key is).
    pub fn make(role: Role, consortium: &str, old: &Ed25519KeyPair, new: &Ed25519KeyPair) -> KeyHandover {
        let key = |k: &Ed25519KeyPair| -> [u8; 32] {
            // INVARIANT: an Ed25519 public key is 32 bytes.
            k.public_key().as_ref().try_into().expect("32-byte Ed25519 public key")
        };
        let (o, n) = (key(old), key(new));
        let statement = Self::statement(role, consortium, &o, &n);
        KeyHandover {
            old_key: hex(&o),
            new_key: hex(&n),
            old_signature: hex(old.sign(&statement).as_ref()),
            new_signature: hex(new.sign(&statement).as_ref()),
        }
    }

    /// The old and new keys, parsed.
    pub fn keys(&self) -> Result<([u8; 32], [u8; 32]), HandoverError> {
        let key = |what: &str, h: &str| {
            unhex32(h).map_err(|_| HandoverError::Malformed(format!("{what} is not 32 bytes of hex")))
        };
        Ok((key("old_key", &self.old_key)?, key("new_key", &self.new_key)?))
    }

    /// Checks both signatures for `consortium`; returns the old and new keys.
    pub fn verify(&self, role: Role, consortium: &str) -> Result<([u8; 32], [u8; 32]), HandoverError> {
        let (old, new) = self.keys()?;
        if old == new {
            return Err(HandoverError::SameKey(short(&old)));
        }
        let statement = Self::statement(role, consortium, &old, &new);
        let signature = |what: &str, h: &str| -> Result<Vec<u8>, HandoverError> {
            let sig = unhex(h).map_err(|_| HandoverError::Malformed(format!("{what} is not hex")))?;
            if sig.len() != 64 {
                return Err(HandoverError::Malformed(format!("{what}: expected 64 bytes, got {}", sig.len())));
            }
            Ok(sig)
        };
        let (old_sig, new_sig) =
            (signature("old_signature", &self.old_signature)?, signature("new_signature", &self.new_signature)?);
        let (o, n) = (short(&old), short(&new));
        UnparsedPublicKey::new(&ED25519, &old)
            .verify(&statement, &old_sig)
            .map_err(|_| HandoverError::OldSignature { what: role.name(), old: o.clone(), new: n.clone() })?;
        UnparsedPublicKey::new(&ED25519, &new)
            .verify(&statement, &new_sig)
            .map_err(|_| HandoverError::NewSignature { what: role.name(), old: o, new: n })?;
        Ok((old, new))
    }
}

/// Walks `chain` from `pinned`: returns the links taken, in order (empty: `pinned` is
/// still the release key, or the chain does not reach it). Links that do not start at
/// a key on the walk are ignored (a chain may begin before a site's enrolment); every
/// link taken is verified, and a fork or a cycle on the walk is an error.
pub fn walk(
    role: Role,
    consortium: &str,
    pinned: &[u8; 32],
    chain: &[KeyHandover],
) -> Result<Vec<KeyHandover>, HandoverError> {
    follow(role, consortium, pinned, chain, Direction::Forward)
}

/// Walks `chain` backwards from `pinned`: the links that hand over *to* the current key,
/// each verified, newest first. A site enrolled after a rotation learns from them the
/// keys that signed what came before it (older checkpoints, older releases): each
/// was handed over from by a key it trusts. A fork (two links to one key) or a cycle
/// is an error.
pub fn predecessors(
    role: Role,
    consortium: &str,
    pinned: &[u8; 32],
    chain: &[KeyHandover],
) -> Result<Vec<KeyHandover>, HandoverError> {
    follow(role, consortium, pinned, chain, Direction::Backward)
}

/// Which way [`follow`] goes: from a link's old key to its new one, or back.
#[derive(Debug, Clone, Copy)]
enum Direction {
    Forward,
    Backward,
}

/// The one walk behind [`walk`] and [`predecessors`]: from `pinned`, the single link
/// leaving the current key in `direction`, verified, then on from its other key.
fn follow(
    role: Role,
    consortium: &str,
    pinned: &[u8; 32],
    chain: &[KeyHandover],
    direction: Direction,
) -> Result<Vec<KeyHandover>, HandoverError> {
    let edges: Vec<([u8; 32], [u8; 32], &KeyHandover)> = chain
        .iter()
        .map(|h| {
            let (old, new) = h.keys()?;
            Ok(match direction {
                Direction::Forward => (old, new, h),
                Direction::Backward => (new, old, h),
            })
        })
        .collect::<Result<_, HandoverError>>()?;
    let mut current = *pinned;
    let mut seen = vec![current];
    let mut taken = Vec::new();
    loop {
        let mut here = edges.iter().filter(|(from, _, _)| *from == current);
        let Some((_, to, link)) = here.next() else { return Ok(taken) };
        if here.any(|(_, other, _)| other != to) {
            return Err(HandoverError::Fork(short(&current)));
        }
        link.verify(role, consortium)?;
        if seen.contains(to) {
            return Err(HandoverError::Cycle(short(to)));
        }
        seen.push(*to);
        taken.push((*link).clone());
        current = *to;
    }
}

/// The handover an entry records, if it records one of `role`'s
/// (`release_key_rotated`, `log_key_rotated`).
pub fn in_entry(role: Role, e: &crate::Entry) -> Option<KeyHandover> {
    let (old_key, new_key, old_signature, new_signature) = match (&e.event, role) {
        (crate::Event::ReleaseKeyRotated { old_key, new_key, old_signature, new_signature, .. }, Role::Release)
        | (crate::Event::LogKeyRotated { old_key, new_key, old_signature, new_signature, .. }, Role::Log) => {
            (old_key, new_key, old_signature, new_signature)
        }
        _ => return None,
    };
    Some(KeyHandover {
        old_key: old_key.clone(),
        new_key: new_key.clone(),
        old_signature: old_signature.clone(),
        new_signature: new_signature.clone(),
    })
}

/// The rotations of `role`'s key an audit log records, in log order.
pub fn logged(role: Role, entries: &[crate::Entry]) -> Vec<KeyHandover> {
    entries.iter().filter_map(|e| in_entry(role, e)).collect()
}

/// The keys reached from `pinned` along `chain`, `pinned` first.
pub fn reached(
    role: Role,
    consortium: &str,
    pinned: &[u8; 32],
    chain: &[KeyHandover],
) -> Result<Vec<[u8; 32]>, HandoverError> {
    let mut keys = vec![*pinned];
    for h in walk(role, consortium, pinned, chain)? {
        keys.push(h.keys()?.1);
    }
    Ok(keys)
}

/// The CA handover a `ca_rotated` entry records, and the new CA's fingerprint the entry
/// names.
pub fn ca_in_entry(e: &crate::Entry) -> Option<(CaHandover, &str)> {
    let crate::Event::CaRotated { old_ca, new_ca, new_ca_pem, old_signature, new_signature, .. } = &e.event else {
        return None;
    };
    let h = CaHandover {
        old_ca: old_ca.clone(),
        new_ca_pem: new_ca_pem.clone(),
        old_signature: old_signature.clone(),
        new_signature: new_signature.clone(),
    };
    Some((h, new_ca))
}

/// The consortium's CAs from `first` (the init entry's CA) on, oldest first (AUD-23):
/// a `ca_rotated` entry must name its new CA's fingerprint, verify under both CA keys
/// and hand over from the CA in effect (the same rollover logged again, after a crash,
/// is skipped).
pub fn ca_chain(
    consortium: &str,
    first: CertificateDer<'static>,
    entries: &[crate::Entry],
) -> Result<Vec<CertificateDer<'static>>, crate::AuditError> {
    let mut cas = vec![first];
    for e in entries {
        let Some((h, named)) = ca_in_entry(e) else { continue };
        let bad = |reason: String| crate::AuditError::CaRotation { seq: e.seq, reason };
        let new_print = h.new_ca().map_err(|err| bad(err.to_string()))?;
        if named != new_print {
            return Err(bad(format!("it names the new CA {named}, but its certificate is {new_print}")));
        }
        // INVARIANT: `cas` starts with `first` and only grows.
        let current = fingerprint(&cas[cas.len() - 1]);
        if current == new_print {
            continue;
        }
        if h.old_ca != current {
            return Err(bad(format!(
                "it hands over from CA {}…, but the CA in effect is {}…",
                h.old_ca.get(..16).unwrap_or(&h.old_ca),
                &current[..16]
            )));
        }
        let new = h.verify(consortium, &cas[cas.len() - 1]).map_err(|err| bad(err.to_string()))?;
        cas.push(new);
    }
    Ok(cas)
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;

    use super::*;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("keygen");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("parse")
    }

    fn public(k: &Ed25519KeyPair) -> [u8; 32] {
        k.public_key().as_ref().try_into().expect("32 bytes")
    }

    #[test]
    fn a_handover_verifies_and_any_change_is_refused() {
        let (a, b) = (key(), key());
        let h = KeyHandover::make(Role::Release, "c", &a, &b);
        assert_eq!(h.verify(Role::Release, "c"), Ok((public(&a), public(&b))));
        // Another consortium's statement differs.
        assert!(matches!(h.verify(Role::Release, "d"), Err(HandoverError::OldSignature { .. })));
        // Swapping in another new key breaks the old key's signature.
        let mut forged = h.clone();
        forged.new_key = hex(&public(&key()));
        assert!(matches!(forged.verify(Role::Release, "c"), Err(HandoverError::OldSignature { .. })));
        // Signed by the new key only: the old key's signature is what counts.
        let mallory = key();
        let mut by_mallory = KeyHandover::make(Role::Release, "c", &mallory, &b);
        by_mallory.old_key = h.old_key.clone();
        assert!(matches!(by_mallory.verify(Role::Release, "c"), Err(HandoverError::OldSignature { .. })));
        // A new key nobody proved to hold.
        let mut unheld = h.clone();
        unheld.new_signature = h.old_signature.clone();
        assert!(matches!(unheld.verify(Role::Release, "c"), Err(HandoverError::NewSignature { .. })));
        let mut short_sig = h.clone();
        short_sig.old_signature.truncate(10);
        assert!(matches!(short_sig.verify(Role::Release, "c"), Err(HandoverError::Malformed(_))));
        // A log-key handover is no release-key handover, and the other way round.
        let log = KeyHandover::make(Role::Log, "c", &a, &b);
        assert_eq!(log.verify(Role::Log, "c"), Ok((public(&a), public(&b))));
        assert!(matches!(log.verify(Role::Release, "c"), Err(HandoverError::OldSignature { what: "release", .. })));
        assert!(matches!(h.verify(Role::Log, "c"), Err(HandoverError::OldSignature { what: "log", .. })));
        let to_itself = KeyHandover::make(Role::Release, "c", &a, &a);
        assert!(matches!(to_itself.verify(Role::Release, "c"), Err(HandoverError::SameKey(_))));
    }

    #[test]
    fn a_walk_follows_the_chain_from_the_pinned_key_only() {
        let (a, b, c, d) = (key(), key(), key(), key());
        let chain = vec![
            KeyHandover::make(Role::Release, "x", &a, &b),
            KeyHandover::make(Role::Release, "x", &b, &c),
            KeyHandover::make(Role::Release, "x", &c, &d),
        ];
        let walked = walk(Role::Release, "x", &public(&a), &chain).expect("walk from a");
        assert_eq!(walked.len(), 3);
        assert_eq!(walked.last().map(|h| h.new_key.clone()), Some(hex(&public(&d))));
        // A site enrolled after the first rotation starts at b.
        assert_eq!(walk(Role::Release, "x", &public(&b), &chain).expect("walk from b").len(), 2);
        // Order in the list does not matter; the pinned key at the end walks nothing.
        let reversed: Vec<_> = chain.iter().rev().cloned().collect();
        assert_eq!(walk(Role::Release, "x", &public(&a), &reversed).expect("reversed").len(), 3);
        assert!(walk(Role::Release, "x", &public(&d), &chain).expect("at the end").is_empty());
        // A key the chain never names walks nothing (the release then fails REL-4b).
        assert!(walk(Role::Release, "x", &public(&key()), &chain).expect("stranger").is_empty());
    }

    #[test]
    fn a_key_enrolled_after_rotations_learns_the_keys_before_it() {
        let (a, b, c) = (key(), key(), key());
        let chain = vec![KeyHandover::make(Role::Log, "x", &a, &b), KeyHandover::make(Role::Log, "x", &b, &c)];
        let before = predecessors(Role::Log, "x", &public(&c), &chain).expect("back from c");
        assert_eq!(
            before.iter().map(|h| h.old_key.clone()).collect::<Vec<_>>(),
            vec![hex(&public(&b)), hex(&public(&a))]
        );
        assert!(predecessors(Role::Log, "x", &public(&a), &chain).expect("nothing before a").is_empty());
        // A forged link to the pinned key is refused, not learnt.
        let mut forged = chain.clone();
        forged[1].old_signature = forged[0].old_signature.clone();
        assert!(matches!(predecessors(Role::Log, "x", &public(&c), &forged), Err(HandoverError::OldSignature { .. })));
        let fork = vec![KeyHandover::make(Role::Log, "x", &a, &c), KeyHandover::make(Role::Log, "x", &b, &c)];
        assert!(matches!(predecessors(Role::Log, "x", &public(&c), &fork), Err(HandoverError::Fork(_))));
    }

    #[test]
    fn a_walk_refuses_forks_cycles_and_a_bad_link_on_its_way() {
        let (a, b, c) = (key(), key(), key());
        let fork = vec![KeyHandover::make(Role::Release, "x", &a, &b), KeyHandover::make(Role::Release, "x", &a, &c)];
        assert!(matches!(walk(Role::Release, "x", &public(&a), &fork), Err(HandoverError::Fork(_))));
        let cycle = vec![KeyHandover::make(Role::Release, "x", &a, &b), KeyHandover::make(Role::Release, "x", &b, &a)];
        assert!(matches!(walk(Role::Release, "x", &public(&a), &cycle), Err(HandoverError::Cycle(_))));
        let mut bad =
            vec![KeyHandover::make(Role::Release, "x", &a, &b), KeyHandover::make(Role::Release, "x", &b, &c)];
        bad[1].new_signature = bad[1].old_signature.clone();
        assert!(matches!(walk(Role::Release, "x", &public(&a), &bad), Err(HandoverError::NewSignature { .. })));
        // A bad link off the walk is not looked at; one that names no key is malformed.
        assert_eq!(walk(Role::Release, "x", &public(&c), &bad).expect("off the walk").len(), 0);
        bad[0].old_key = "zz".into();
        assert!(matches!(walk(Role::Release, "x", &public(&a), &bad), Err(HandoverError::Malformed(_))));
    }
}
