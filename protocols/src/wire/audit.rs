//! Audit-log messages on the wire (`pb::Audit*`): conversions to the sans-IO core's
//! types (`maeum_tlog`). Hashes are 32 bytes, log signatures 64, lists are bounded;
//! anything else is a [`WireError`] naming the field.

use super::{WireError, invalid, pb};
use maeum_pki::rollover::CaHandover;
use maeum_tlog::{Checkpoint, Cosignature, Entry, Hash, SignedCheckpoint, hex};

/// Longest proof accepted (a tree of 2^64 leaves needs fewer).
pub const MAX_PROOF: usize = 130;
/// Most checkpoints in one reply's `since`.
pub const MAX_SINCE: usize = 64;
/// Most cosignatures on one tree head (one per site; at most 255 sites).
pub const MAX_COSIGNATURES: usize = 255;
/// Most entries in one `AuditProve` reply.
pub const MAX_PROVEN: usize = 512;
/// Largest certificate PEM, entry, or cosignature accepted.
const MAX_CERT_PEM: usize = 16 << 10;
const MAX_ENTRY: usize = 64 << 10;
const MAX_SIGNATURE: usize = 128;

/// A signed checkpoint and the cosignatures collected for it, each with the witness's
/// certificate (PEM) to check under the consortium CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    pub signed: SignedCheckpoint,
    pub cosignatures: Vec<(Cosignature, String)>,
}

/// What a witness gets: the latest checkpoint, the consistency proof to it from the
/// size it knew, and the checkpoints since then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReply {
    pub latest: TreeHead,
    pub consistency: Vec<Hash>,
    pub since: Vec<TreeHead>,
    /// Every rotation of the log key, oldest first.
    pub handovers: Vec<maeum_tlog::handover::KeyHandover>,
    /// Every rollover of the consortium CA, oldest first.
    pub ca_handovers: Vec<CaHandover>,
}

/// Largest CA certificate a handover may carry (DER).
pub const MAX_CA_DER: usize = 8 * 1024;

/// A CA handover for the wire.
pub fn ca_handover_to_pb(h: &CaHandover) -> pb::CaHandover {
    let bytes = |s: &str| maeum_tlog::unhex(s).unwrap_or_default();
    pb::CaHandover {
        old_ca: bytes(&h.old_ca),
        new_ca_der: h.new_ca_der().map(|d| d.to_vec()).unwrap_or_default(),
        old_signature: bytes(&h.old_signature),
        new_signature: bytes(&h.new_signature),
    }
}

/// A CA handover from the wire, its sizes checked (its signatures are the site's to
/// check: `maeum_pki::rollover::follow`).
pub fn ca_handover_from_pb(h: pb::CaHandover) -> Result<CaHandover, WireError> {
    let field = "checkpoint.ca_handovers";
    if h.old_ca.len() != 32 {
        return Err(invalid(field, format!("old_ca: expected 32 bytes, got {}", h.old_ca.len())));
    }
    if h.new_ca_der.is_empty() || h.new_ca_der.len() > MAX_CA_DER {
        return Err(invalid(field, format!("new_ca_der: 1 to {MAX_CA_DER} bytes, got {}", h.new_ca_der.len())));
    }
    for (what, sig) in [("old_signature", &h.old_signature), ("new_signature", &h.new_signature)] {
        if sig.is_empty() || sig.len() > 80 {
            return Err(invalid(field, format!("{what}: 1 to 80 bytes, got {}", sig.len())));
        }
    }
    Ok(CaHandover {
        old_ca: hex(&h.old_ca),
        new_ca_pem: maeum_tlog::checkpoint::canonical_pem(&h.new_ca_der),
        old_signature: hex(&h.old_signature),
        new_signature: hex(&h.new_signature),
    })
}

/// One entry with its inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenEntry {
    pub seq: u64,
    pub entry: Entry,
    pub proof: Vec<Hash>,
}

fn hash(field: &'static str, bytes: &[u8]) -> Result<Hash, WireError> {
    bytes.try_into().map_err(|_| invalid(field, format!("must be 32 bytes, got {}", bytes.len())))
}

fn hashes(field: &'static str, list: &[Vec<u8>]) -> Result<Vec<Hash>, WireError> {
    if list.len() > MAX_PROOF {
        return Err(invalid(field, format!("at most {MAX_PROOF} hashes, got {}", list.len())));
    }
    list.iter().map(|h| hash(field, h)).collect()
}

impl TreeHead {
    pub fn to_pb(&self) -> pb::AuditTreeHead {
        pb::AuditTreeHead {
            size: self.signed.checkpoint.size,
            root: self.signed.checkpoint.root.to_vec(),
            signature: self.signed.signature.to_vec(),
            cosignatures: self
                .cosignatures
                .iter()
                .map(|(c, cert_pem)| pb::AuditCosignature {
                    site: c.site.clone(),
                    signature: c.signature.clone(),
                    cert_pem: cert_pem.clone(),
                })
                .collect(),
        }
    }

    /// Checks the shapes (not the signatures) of a tree head of log `origin`.
    pub fn from_pb(origin: &str, h: pb::AuditTreeHead) -> Result<TreeHead, WireError> {
        let root = hash("tree_head.root", &h.root)?;
        let signature: [u8; 64] = h
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| invalid("tree_head.signature", format!("must be 64 bytes, got {}", h.signature.len())))?;
        if h.cosignatures.len() > MAX_COSIGNATURES {
            return Err(invalid("tree_head.cosignatures", format!("at most {MAX_COSIGNATURES}")));
        }
        let mut cosignatures = Vec::with_capacity(h.cosignatures.len());
        for c in h.cosignatures {
            maeum_pki::identity::validate_name(&c.site)
                .map_err(|e| invalid("tree_head.cosignatures.site", e.to_string()))?;
            if c.signature.is_empty() || c.signature.len() > MAX_SIGNATURE {
                return Err(invalid("tree_head.cosignatures.signature", format!("1..={MAX_SIGNATURE} bytes")));
            }
            if c.cert_pem.len() > MAX_CERT_PEM {
                return Err(invalid("tree_head.cosignatures.cert_pem", format!("at most {MAX_CERT_PEM} bytes")));
            }
            cosignatures.push((Cosignature { site: c.site, signature: c.signature }, c.cert_pem));
        }
        Ok(TreeHead {
            signed: SignedCheckpoint {
                checkpoint: Checkpoint { origin: origin.to_owned(), size: h.size, root },
                signature,
            },
            cosignatures,
        })
    }
}

impl CheckpointReply {
    pub fn to_pb(&self, origin: &str) -> pb::AuditCheckpointReply {
        pb::AuditCheckpointReply {
            origin: origin.to_owned(),
            latest: Some(self.latest.to_pb()),
            consistency: self.consistency.iter().map(|h| h.to_vec()).collect(),
            since: self.since.iter().map(TreeHead::to_pb).collect(),
            log_key_handovers: self.handovers.iter().map(super::release::handover_to_pb).collect(),
            ca_handovers: self.ca_handovers.iter().map(ca_handover_to_pb).collect(),
        }
    }

    /// Checks the reply is of log `origin` and well formed (signatures are the
    /// witness's to check).
    pub fn from_pb(origin: &str, r: pb::AuditCheckpointReply) -> Result<CheckpointReply, WireError> {
        if r.origin != origin {
            return Err(invalid("checkpoint.origin", format!("is {:?}, expected {origin:?}", r.origin)));
        }
        if r.since.len() > MAX_SINCE {
            return Err(invalid("checkpoint.since", format!("at most {MAX_SINCE} tree heads, got {}", r.since.len())));
        }
        Ok(CheckpointReply {
            latest: TreeHead::from_pb(origin, r.latest.ok_or(WireError::Missing { field: "checkpoint.latest" })?)?,
            consistency: hashes("checkpoint.consistency", &r.consistency)?,
            since: r.since.into_iter().map(|h| TreeHead::from_pb(origin, h)).collect::<Result<_, _>>()?,
            handovers: super::release::handovers_from_pb("checkpoint.log_key_handovers", r.log_key_handovers)?,
            ca_handovers: {
                if r.ca_handovers.len() > maeum_pki::rollover::MAX_HANDOVERS {
                    return Err(invalid("checkpoint.ca_handovers", "too many handovers".to_string()));
                }
                r.ca_handovers.into_iter().map(ca_handover_from_pb).collect::<Result<_, _>>()?
            },
        })
    }
}

impl ProvenEntry {
    pub fn to_pb(&self) -> pb::AuditProvenEntry {
        pb::AuditProvenEntry {
            seq: self.seq,
            entry: self.entry.encode(),
            proof: self.proof.iter().map(|h| h.to_vec()).collect(),
        }
    }

    /// Decodes the entry (canonical bytes only) and checks it is the one at `seq`.
    pub fn from_pb(e: pb::AuditProvenEntry) -> Result<ProvenEntry, WireError> {
        if e.entry.len() > MAX_ENTRY {
            return Err(invalid("proven.entry", format!("at most {MAX_ENTRY} bytes")));
        }
        let entry = Entry::decode(&e.entry).map_err(|err| invalid("proven.entry", err.to_string()))?;
        if entry.seq != e.seq {
            return Err(invalid("proven.seq", format!("is {} but the entry's seq is {}", e.seq, entry.seq)));
        }
        Ok(ProvenEntry { seq: e.seq, entry, proof: hashes("proven.proof", &e.proof)? })
    }
}

/// Checks a cosignature request's shapes: the root (32 bytes) and signature size.
pub fn cosign_request(r: &pb::AuditCosignRequest) -> Result<Hash, WireError> {
    if r.signature.is_empty() || r.signature.len() > MAX_SIGNATURE {
        return Err(invalid("cosign.signature", format!("1..={MAX_SIGNATURE} bytes")));
    }
    if r.size == 0 {
        return Err(invalid("cosign.size", "must be at least 1"));
    }
    hash("cosign.root", &r.root)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use maeum_tlog::Event;

    fn head() -> TreeHead {
        TreeHead {
            signed: SignedCheckpoint {
                checkpoint: Checkpoint { origin: "maeum/heart".into(), size: 7, root: [3; 32] },
                signature: [9; 64],
            },
            cosignatures: vec![(Cosignature { site: "a".into(), signature: vec![1; 70] }, "PEM".into())],
        }
    }

    /// A real handover, with the new CA in the PEM spelling the wire gives back.
    fn ca_handover() -> CaHandover {
        use maeum_pki::identity::Ca;
        let (old, new) = (Ca::generate("heart", 30).unwrap(), Ca::successor("heart", 2, 30).unwrap());
        let mut h = CaHandover::make("heart", &old, &new).unwrap();
        h.new_ca_pem = maeum_tlog::checkpoint::canonical_pem(&h.new_ca_der().unwrap());
        h
    }

    #[test]
    fn checkpoint_reply_round_trips_and_bad_shapes_name_the_field() {
        let reply = CheckpointReply {
            latest: head(),
            consistency: vec![[5; 32]; 3],
            since: vec![head()],
            handovers: Vec::new(),
            ca_handovers: vec![ca_handover()],
        };
        let back = CheckpointReply::from_pb("maeum/heart", reply.to_pb("maeum/heart")).unwrap();
        assert_eq!(back, reply);
        type Change = fn(&mut pb::CaHandover);
        let changes: [(&str, Change); 4] = [
            ("old_ca", |h| h.old_ca.truncate(31)),
            ("new_ca_der", |h| h.new_ca_der = vec![0; MAX_CA_DER + 1]),
            ("old_signature", |h| h.old_signature.clear()),
            ("new_signature", |h| h.new_signature = vec![1; 81]),
        ];
        for (what, change) in changes {
            let mut bad = reply.to_pb("maeum/heart");
            change(&mut bad.ca_handovers[0]);
            let e = CheckpointReply::from_pb("maeum/heart", bad).unwrap_err().to_string();
            assert!(e.contains("checkpoint.ca_handovers") && e.contains(what), "{e}");
        }
        let e = CheckpointReply::from_pb("maeum/other", reply.to_pb("maeum/heart")).unwrap_err();
        assert!(e.to_string().starts_with("checkpoint.origin"), "{e}");
        let mut bad = reply.to_pb("maeum/heart");
        bad.consistency[1].pop();
        assert!(CheckpointReply::from_pb("maeum/heart", bad).unwrap_err().to_string().contains("32 bytes"));
        let mut bad = reply.to_pb("maeum/heart");
        bad.latest.as_mut().unwrap().signature.push(0);
        assert!(CheckpointReply::from_pb("maeum/heart", bad).unwrap_err().to_string().contains("64 bytes"));
        let mut bad = reply.to_pb("maeum/heart");
        bad.since = vec![head().to_pb(); MAX_SINCE + 1];
        assert!(CheckpointReply::from_pb("maeum/heart", bad).is_err());
        let mut bad = reply.to_pb("maeum/heart");
        bad.latest.as_mut().unwrap().cosignatures[0].site = "A B".into();
        assert!(CheckpointReply::from_pb("maeum/heart", bad).is_err());
        let mut bad = reply.to_pb("maeum/heart");
        bad.latest = None;
        assert!(CheckpointReply::from_pb("maeum/heart", bad).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn proven_entries_must_be_canonical_and_at_their_seq() {
        let entry = Entry { seq: 4, time_ms: 1, event: Event::JobFinished { job_id: "j".into(), state: "x".into() } };
        let proven = ProvenEntry { seq: 4, entry: entry.clone(), proof: vec![[1; 32]] };
        assert_eq!(ProvenEntry::from_pb(proven.to_pb()).unwrap(), proven);
        let mut moved = proven.to_pb();
        moved.seq = 5;
        assert!(ProvenEntry::from_pb(moved).unwrap_err().to_string().contains("seq"));
        let mut spaced = proven.to_pb();
        spaced.entry.push(b' ');
        assert!(ProvenEntry::from_pb(spaced).is_err());
    }

    #[test]
    fn cosign_requests_are_checked() {
        let ok = pb::AuditCosignRequest { size: 3, root: vec![0; 32], signature: vec![1; 70] };
        assert_eq!(cosign_request(&ok).unwrap(), [0; 32]);
        for bad in [
            pb::AuditCosignRequest { size: 0, ..ok.clone() },
            pb::AuditCosignRequest { root: vec![0; 31], ..ok.clone() },
            pb::AuditCosignRequest { signature: vec![], ..ok.clone() },
            pb::AuditCosignRequest { signature: vec![0; 129], ..ok.clone() },
        ] {
            assert!(cosign_request(&bad).is_err());
        }
    }
}
