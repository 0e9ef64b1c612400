//! The log itself, sans-IO: the tree of leaf hashes and the latest checkpoint. The
//! coordinator persists what [`Log::next_entries`] returns, then [`Log::apply`]s it.
//!
//! Checkpoint records: the first append after a checkpoint of size `s` first appends
//! `checkpoint {size: s, root}` as entry `s`. So every checkpoint except the latest is
//! itself committed to by the log, and an export missing any checkpoint fails to
//! verify (AUD-12), as does one missing the latest (AUD-11: its entries are uncovered).

use ring::signature::Ed25519KeyPair;

use super::checkpoint::validate_origin;
use super::merkle::{Hash, MerkleTree};
use super::{AuditError, Checkpoint, Entry, Event, SignedCheckpoint, hex};

/// An append-only log in memory.
#[derive(Debug, Clone)]
pub struct Log {
    origin: String,
    tree: MerkleTree,
    latest: Option<SignedCheckpoint>,
}

impl Log {
    /// An empty log named `origin`.
    pub fn new(origin: String) -> Result<Log, AuditError> {
        validate_origin(&origin)?;
        Ok(Log { origin, tree: MerkleTree::new(), latest: None })
    }

    /// A log reloaded from storage: its leaf hashes in order and its latest checkpoint.
    /// Refuses a checkpoint that is not of this log, larger than it or of another root.
    pub fn restore(origin: String, leaves: &[Hash], latest: Option<SignedCheckpoint>) -> Result<Log, AuditError> {
        validate_origin(&origin)?;
        let tree = MerkleTree::from_leaves(leaves);
        if let Some(cp) = &latest {
            let cp = &cp.checkpoint;
            if cp.origin != origin {
                return Err(AuditError::Origin { expected: origin, found: cp.origin.clone() });
            }
            let root = tree.root_at(cp.size).map_err(|e| AuditError::Range(format!("stored checkpoint: {e}")))?;
            if root != cp.root {
                return Err(AuditError::RootMismatch {
                    index: 0,
                    size: cp.size,
                    claimed: hex(&cp.root),
                    computed: hex(&root),
                });
            }
        }
        Ok(Log { origin, tree, latest })
    }

    /// The log's name.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The number of entries.
    pub fn size(&self) -> u64 {
        self.tree.size()
    }

    /// The tree of all entries.
    pub fn tree(&self) -> &MerkleTree {
        &self.tree
    }

    /// The latest signed checkpoint.
    pub fn latest(&self) -> Option<&SignedCheckpoint> {
        self.latest.as_ref()
    }

    /// The entries that appending `event` adds: the record of the latest checkpoint
    /// if it is not in the log yet, then the event. Changes nothing.
    pub fn next_entries(&self, time_ms: i64, event: Event) -> Vec<Entry> {
        let mut seq = self.size();
        let mut out = Vec::with_capacity(2);
        if let Some(cp) = self.latest.as_ref().map(|c| &c.checkpoint).filter(|c| c.size == seq) {
            out.push(Entry { seq, time_ms, event: Event::Checkpoint { size: cp.size, root: hex(&cp.root) } });
            seq += 1;
        }
        out.push(Entry { seq, time_ms, event });
        out
    }

    /// Adds entries (as returned by [`Log::next_entries`], once persisted).
    pub fn apply(&mut self, entries: &[Entry]) -> Result<(), AuditError> {
        for (i, entry) in entries.iter().enumerate() {
            let expected = self.size() + i as u64;
            if entry.seq != expected {
                return Err(AuditError::Sequence { position: expected, seq: entry.seq });
            }
        }
        for entry in entries {
            self.tree.push(entry.leaf_hash());
        }
        Ok(())
    }

    /// [`Log::next_entries`] and [`Log::apply`] together, for logs kept in memory.
    /// Returns the event's seq.
    pub fn append(&mut self, time_ms: i64, event: Event) -> u64 {
        let entries = self.next_entries(time_ms, event);
        let seq = self.size() + entries.len() as u64 - 1;
        for entry in &entries {
            self.tree.push(entry.leaf_hash());
        }
        seq
    }

    /// The checkpoint of the current size, signed: a new one if entries were added
    /// since the latest, else the latest. Does not change the log; call
    /// [`Log::set_latest`] once it is persisted.
    pub fn sign_checkpoint(&self, key: &Ed25519KeyPair) -> Result<SignedCheckpoint, AuditError> {
        if self.size() == 0 {
            return Err(AuditError::Range("the log is empty: nothing to checkpoint".into()));
        }
        if let Some(latest) = self.latest.as_ref().filter(|c| c.checkpoint.size == self.size()) {
            return Ok(latest.clone());
        }
        Ok(Checkpoint { origin: self.origin.clone(), size: self.size(), root: self.tree.root() }.sign(key))
    }

    /// Records `checkpoint` as the latest (it must be of this log's current state).
    pub fn set_latest(&mut self, checkpoint: SignedCheckpoint) -> Result<(), AuditError> {
        let cp = &checkpoint.checkpoint;
        if cp.origin != self.origin || cp.size != self.size() || cp.root != self.tree.root() {
            return Err(AuditError::Range(format!(
                "checkpoint of size {} is not of the log's current state (size {})",
                cp.size,
                self.size()
            )));
        }
        self.latest = Some(checkpoint);
        Ok(())
    }

    /// [`Log::sign_checkpoint`] and [`Log::set_latest`] together, for logs in memory.
    pub fn checkpoint(&mut self, key: &Ed25519KeyPair) -> Result<SignedCheckpoint, AuditError> {
        let signed = self.sign_checkpoint(key)?;
        self.latest = Some(signed.clone());
        Ok(signed)
    }

    /// The inclusion proof of entry `seq` in the tree of `size` entries.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        self.tree.inclusion_proof(seq, size).map_err(|e| AuditError::Range(e.to_string()))
    }

    /// The consistency proof from the tree of `old` entries to that of `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, AuditError> {
        self.tree.consistency_proof(old, new).map_err(|e| AuditError::Range(e.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::checkpoint::log_key_pair;
    use ring::rand::SystemRandom;

    fn key() -> Ed25519KeyPair {
        log_key_pair(Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap().as_ref()).unwrap()
    }

    fn finished(n: u32) -> Event {
        Event::JobFinished { job_id: format!("j-{n}"), state: "completed".into() }
    }

    #[test]
    fn the_first_append_after_a_checkpoint_records_it() {
        let key = key();
        let mut log = Log::new("maeum/heart".into()).unwrap();
        assert!(log.checkpoint(&key).is_err(), "an empty log has no checkpoint");
        assert_eq!(log.append(1, finished(0)), 0);
        assert_eq!(log.append(2, finished(1)), 1);
        let cp = log.checkpoint(&key).unwrap();
        assert_eq!(log.checkpoint(&key).unwrap(), cp, "no new entries: the same checkpoint");
        let entries = log.next_entries(3, finished(2));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].event, Event::Checkpoint { size: 2, root: hex(&cp.checkpoint.root) });
        assert_eq!(entries[0].seq, 2);
        assert_eq!(entries[1].seq, 3);
        log.apply(&entries).unwrap();
        assert_eq!(log.next_entries(4, finished(3)).len(), 1, "recorded once");
        assert!(log.apply(&entries).is_err(), "entries apply once, in order");
    }

    #[test]
    fn restore_checks_the_stored_checkpoint() {
        let key = key();
        let mut log = Log::new("maeum/heart".into()).unwrap();
        for n in 0..5 {
            log.append(i64::from(n), finished(n));
        }
        let cp = log.checkpoint(&key).unwrap();
        let leaves: Vec<Hash> = (0..5).map(|i| *log.tree().leaf(i).unwrap()).collect();
        let restored = Log::restore("maeum/heart".into(), &leaves, Some(cp.clone())).unwrap();
        assert_eq!(restored.tree().root(), log.tree().root());
        assert!(Log::restore("maeum/heart".into(), &leaves[..4], Some(cp.clone())).is_err());
        let mut changed = leaves.clone();
        changed[1][0] ^= 1;
        assert!(Log::restore("maeum/heart".into(), &changed, Some(cp.clone())).is_err());
        assert!(Log::restore("maeum/other".into(), &leaves, Some(cp)).is_err());
        assert!(Log::new("bad origin".into()).is_err());
    }
}
