//! Secure-aggregation messages on the wire: conversions between `pb::SecAgg*` and the
//! sans-IO core's types (`maeum_secagg`). Byte fields have fixed lengths and indices
//! are 1..=255; anything else is a [`WireError`] naming the field, never its bytes.

use super::{WireError, invalid, pb};
use maeum_secagg::{
    AdvertiseKeys, EncryptedShare, GraphReveal, GraphReveals, KeyRoster, Participant, RevealedShare, Session,
    SessionParams, ShareKeys, SharesFor, SurvivorProof, SurvivorSet, SurvivorSignature, UnmaskShares,
};

/// The session a coordinator announces in a train task. Participants are named with
/// their certificates so that every site can check them against the consortium CA
/// before trusting the keys they sign.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    pub consortium: String,
    pub params: SessionParams,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub index: u16,
    pub site_id: String,
    pub certificate_der: Vec<u8>,
}

/// What a round's session is bound to besides its numbers: SHA-256 over
/// "maeum/secagg/v1/round-binding", the SHA-256 of the job file as submitted (as the
/// audit log's `job_submitted` entry has it) and the digest of the round's base model.
/// Every site computes it from what it was itself given, so a coordinator that hands
/// sites different models (or job files) splits them into sessions whose ids differ,
/// and the signatures that bind every stage to the session id stop verifying.
pub fn round_binding(spec_sha256: &super::Digest, base_model: &super::Digest) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [b"maeum/secagg/v1/round-binding".as_slice(), &spec_sha256.0, &base_model.0] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl SessionInfo {
    /// The session for one round attempt, with each member's identity key taken from
    /// its certificate by `identity_key` (which is where the caller checks the chain),
    /// bound to `binding` ([`round_binding`]).
    pub fn to_session<E>(
        &self,
        job_id: &str,
        round: u32,
        attempt: u32,
        binding: [u8; 32],
        mut identity_key: impl FnMut(&Member) -> Result<Vec<u8>, E>,
    ) -> Result<Session, E> {
        let participants = self
            .members
            .iter()
            .map(|m| Ok(Participant { index: m.index, site_id: m.site_id.clone(), identity_key: identity_key(m)? }))
            .collect::<Result<Vec<_>, E>>()?;
        Ok(Session {
            consortium: self.consortium.clone(),
            job_id: job_id.to_string(),
            round,
            attempt,
            participants,
            params: self.params.clone(),
            binding,
        })
    }
}

/// A site's stage message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageMessage {
    Advertise(AdvertiseKeys),
    /// SecAgg+ only: the site's graph nonce, after the roster.
    GraphReveal(GraphReveal),
    ShareKeys(ShareKeys),
    /// The site's masked input is uploaded; it waits for the survivor set.
    AwaitSurvivors {
        session_id: [u8; 32],
        index: u16,
    },
    SurvivorSignature(SurvivorSignature),
    Unmask(UnmaskShares),
}

impl StageMessage {
    pub fn name(&self) -> &'static str {
        match self {
            StageMessage::Advertise(_) => "advertise keys",
            StageMessage::GraphReveal(_) => "reveal graph nonce",
            StageMessage::ShareKeys(_) => "share keys",
            StageMessage::AwaitSurvivors { .. } => "await survivors",
            StageMessage::SurvivorSignature(_) => "consistency check",
            StageMessage::Unmask(_) => "unmask",
        }
    }

    pub fn index(&self) -> u16 {
        match self {
            StageMessage::Advertise(m) => m.index,
            StageMessage::GraphReveal(m) => m.index,
            StageMessage::ShareKeys(m) => m.index,
            StageMessage::AwaitSurvivors { index, .. } => *index,
            StageMessage::SurvivorSignature(m) => m.index,
            StageMessage::Unmask(m) => m.index,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    pub message: StageMessage,
}

/// The coordinator's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The stage has not closed yet: resend the identical request.
    Pending {
        retry_after_ms: u32,
    },
    Roster(KeyRoster),
    /// SecAgg+ only: every roster party's graph nonce.
    Reveals(GraphReveals),
    Shares(SharesFor),
    Survivors(SurvivorSet),
    Proof(SurvivorProof),
    Done,
}

fn bytes32(field: &'static str, b: &[u8]) -> Result<[u8; 32], WireError> {
    b.try_into().map_err(|_| invalid(field, format!("must be 32 bytes, got {}", b.len())))
}

fn index(field: &'static str, i: u32) -> Result<u16, WireError> {
    if (1..=255).contains(&i) { Ok(i as u16) } else { Err(invalid(field, format!("party index {i} not in 1..=255"))) }
}

fn indices(field: &'static str, v: Vec<u32>) -> Result<Vec<u16>, WireError> {
    v.into_iter().map(|i| index(field, i)).collect()
}

fn signature(field: &'static str, s: Vec<u8>) -> Result<Vec<u8>, WireError> {
    if s.is_empty() || s.len() > 512 {
        return Err(invalid(field, format!("signature of {} bytes", s.len())));
    }
    Ok(s)
}

impl TryFrom<pb::SecAggSession> for SessionInfo {
    type Error = WireError;
    fn try_from(s: pb::SecAggSession) -> Result<Self, WireError> {
        let narrow =
            |field: &'static str, v: u32| u16::try_from(v).map_err(|_| invalid(field, format!("{v} is out of range")));
        let members = s
            .participants
            .into_iter()
            .map(|p| {
                Ok(Member {
                    index: index("secagg.participants.index", p.index)?,
                    site_id: p.site_id,
                    certificate_der: p.certificate_der,
                })
            })
            .collect::<Result<Vec<_>, WireError>>()?;
        Ok(SessionInfo {
            consortium: s.consortium,
            params: SessionParams {
                threshold: narrow("secagg.threshold", s.threshold)?,
                degree: narrow("secagg.degree", s.degree)?,
                vector_len: s.vector_len,
                clip: s.clip,
                max_weight: s.max_weight,
            },
            members,
        })
    }
}

impl From<&SessionInfo> for pb::SecAggSession {
    fn from(s: &SessionInfo) -> Self {
        pb::SecAggSession {
            consortium: s.consortium.clone(),
            threshold: u32::from(s.params.threshold),
            degree: u32::from(s.params.degree),
            vector_len: s.params.vector_len,
            clip: s.params.clip,
            max_weight: s.params.max_weight,
            participants: s
                .members
                .iter()
                .map(|m| pb::SecAggParticipant {
                    index: u32::from(m.index),
                    site_id: m.site_id.clone(),
                    certificate_der: m.certificate_der.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::SecAggAdvertise> for AdvertiseKeys {
    type Error = WireError;
    fn try_from(m: pb::SecAggAdvertise) -> Result<Self, WireError> {
        Ok(AdvertiseKeys {
            session_id: bytes32("advertise.session_id", &m.session_id)?,
            index: index("advertise.index", m.index)?,
            cipher_pk: bytes32("advertise.cipher_pk", &m.cipher_pk)?,
            mask_pk: bytes32("advertise.mask_pk", &m.mask_pk)?,
            graph_commitment: bytes32("advertise.graph_commitment", &m.graph_commitment)?,
            signature: signature("advertise.signature", m.signature)?,
        })
    }
}

impl From<&AdvertiseKeys> for pb::SecAggAdvertise {
    fn from(m: &AdvertiseKeys) -> Self {
        pb::SecAggAdvertise {
            session_id: m.session_id.to_vec(),
            index: u32::from(m.index),
            cipher_pk: m.cipher_pk.to_vec(),
            mask_pk: m.mask_pk.to_vec(),
            signature: m.signature.clone(),
            graph_commitment: m.graph_commitment.to_vec(),
        }
    }
}

fn reveal_in(field: &'static str, m: pb::SecAggGraphReveal) -> Result<GraphReveal, WireError> {
    Ok(GraphReveal {
        session_id: bytes32(field, &m.session_id)?,
        index: index(field, m.index)?,
        nonce: bytes32(field, &m.nonce)?,
    })
}

fn reveal_out(m: &GraphReveal) -> pb::SecAggGraphReveal {
    pb::SecAggGraphReveal { session_id: m.session_id.to_vec(), index: u32::from(m.index), nonce: m.nonce.to_vec() }
}

fn shares_in(field: &'static str, v: Vec<pb::SecAggEncryptedShare>) -> Result<Vec<EncryptedShare>, WireError> {
    v.into_iter()
        .map(|s| {
            if s.ciphertext.is_empty() || s.ciphertext.len() > 1024 {
                return Err(invalid(field, format!("ciphertext of {} bytes", s.ciphertext.len())));
            }
            Ok(EncryptedShare { from: index(field, s.from)?, to: index(field, s.to)?, ciphertext: s.ciphertext })
        })
        .collect()
}

fn shares_out(v: &[EncryptedShare]) -> Vec<pb::SecAggEncryptedShare> {
    v.iter()
        .map(|s| pb::SecAggEncryptedShare {
            from: u32::from(s.from),
            to: u32::from(s.to),
            ciphertext: s.ciphertext.clone(),
        })
        .collect()
}

fn revealed_in(field: &'static str, v: Vec<pb::SecAggRevealedShare>) -> Result<Vec<RevealedShare>, WireError> {
    v.into_iter()
        .map(|s| Ok(RevealedShare { owner: index(field, s.owner)?, share: bytes32(field, &s.share)? }))
        .collect()
}

fn revealed_out(v: &[RevealedShare]) -> Vec<pb::SecAggRevealedShare> {
    v.iter().map(|s| pb::SecAggRevealedShare { owner: u32::from(s.owner), share: s.share.to_vec() }).collect()
}

fn survivor_signature_in(m: pb::SecAggSurvivorSignature) -> Result<SurvivorSignature, WireError> {
    Ok(SurvivorSignature {
        session_id: bytes32("survivor_signature.session_id", &m.session_id)?,
        index: index("survivor_signature.index", m.index)?,
        signature: signature("survivor_signature.signature", m.signature)?,
    })
}

fn survivor_signature_out(m: &SurvivorSignature) -> pb::SecAggSurvivorSignature {
    pb::SecAggSurvivorSignature {
        session_id: m.session_id.to_vec(),
        index: u32::from(m.index),
        signature: m.signature.clone(),
    }
}

impl TryFrom<pb::SecAggRequest> for Request {
    type Error = WireError;
    fn try_from(r: pb::SecAggRequest) -> Result<Self, WireError> {
        use pb::sec_agg_request::Stage;
        let message = match r.stage.ok_or(WireError::Missing { field: "secagg.stage" })? {
            Stage::Advertise(m) => StageMessage::Advertise(m.try_into()?),
            Stage::GraphReveal(m) => StageMessage::GraphReveal(reveal_in("graph_reveal", m)?),
            Stage::ShareKeys(m) => StageMessage::ShareKeys(ShareKeys {
                session_id: bytes32("share_keys.session_id", &m.session_id)?,
                index: index("share_keys.index", m.index)?,
                self_mask_commitment: bytes32("share_keys.self_mask_commitment", &m.self_mask_commitment)?,
                shares: shares_in("share_keys.shares", m.shares)?,
            }),
            Stage::AwaitSurvivors(m) => StageMessage::AwaitSurvivors {
                session_id: bytes32("await_survivors.session_id", &m.session_id)?,
                index: index("await_survivors.index", m.index)?,
            },
            Stage::SurvivorSignature(m) => StageMessage::SurvivorSignature(survivor_signature_in(m)?),
            Stage::Unmask(m) => StageMessage::Unmask(UnmaskShares {
                session_id: bytes32("unmask.session_id", &m.session_id)?,
                index: index("unmask.index", m.index)?,
                self_mask_shares: revealed_in("unmask.self_mask_shares", m.self_mask_shares)?,
                mask_key_shares: revealed_in("unmask.mask_key_shares", m.mask_key_shares)?,
            }),
        };
        Ok(Request { job_id: super::job_id("secagg.job_id", r.job_id)?, round: r.round, attempt: r.attempt, message })
    }
}

impl From<&Request> for pb::SecAggRequest {
    fn from(r: &Request) -> Self {
        use pb::sec_agg_request::Stage;
        let stage = match &r.message {
            StageMessage::Advertise(m) => Stage::Advertise(m.into()),
            StageMessage::GraphReveal(m) => Stage::GraphReveal(reveal_out(m)),
            StageMessage::ShareKeys(m) => Stage::ShareKeys(pb::SecAggShareKeys {
                session_id: m.session_id.to_vec(),
                index: u32::from(m.index),
                self_mask_commitment: m.self_mask_commitment.to_vec(),
                shares: shares_out(&m.shares),
            }),
            StageMessage::AwaitSurvivors { session_id, index } => Stage::AwaitSurvivors(pb::SecAggAwaitSurvivors {
                session_id: session_id.to_vec(),
                index: u32::from(*index),
            }),
            StageMessage::SurvivorSignature(m) => Stage::SurvivorSignature(survivor_signature_out(m)),
            StageMessage::Unmask(m) => Stage::Unmask(pb::SecAggUnmask {
                session_id: m.session_id.to_vec(),
                index: u32::from(m.index),
                self_mask_shares: revealed_out(&m.self_mask_shares),
                mask_key_shares: revealed_out(&m.mask_key_shares),
            }),
        };
        pb::SecAggRequest { job_id: r.job_id.clone(), round: r.round, attempt: r.attempt, stage: Some(stage) }
    }
}

impl TryFrom<pb::SecAggReply> for Reply {
    type Error = WireError;
    fn try_from(r: pb::SecAggReply) -> Result<Self, WireError> {
        use pb::sec_agg_reply::Reply as R;
        Ok(match r.reply.ok_or(WireError::Missing { field: "secagg.reply" })? {
            R::Pending(p) => Reply::Pending { retry_after_ms: p.retry_after_ms },
            R::Roster(m) => Reply::Roster(KeyRoster {
                session_id: bytes32("roster.session_id", &m.session_id)?,
                keys: m.keys.into_iter().map(AdvertiseKeys::try_from).collect::<Result<_, _>>()?,
            }),
            R::Reveals(m) => Reply::Reveals(GraphReveals {
                session_id: bytes32("reveals.session_id", &m.session_id)?,
                reveals: m.reveals.into_iter().map(|r| reveal_in("reveals.reveals", r)).collect::<Result<_, _>>()?,
            }),
            R::Shares(m) => Reply::Shares(SharesFor {
                session_id: bytes32("shares.session_id", &m.session_id)?,
                recipient: index("shares.recipient", m.recipient)?,
                sharers: indices("shares.sharers", m.sharers)?,
                shares: shares_in("shares.shares", m.shares)?,
            }),
            R::Survivors(m) => Reply::Survivors(SurvivorSet {
                session_id: bytes32("survivors.session_id", &m.session_id)?,
                survivors: indices("survivors.survivors", m.survivors)?,
            }),
            R::Proof(m) => Reply::Proof(SurvivorProof {
                session_id: bytes32("proof.session_id", &m.session_id)?,
                survivors: indices("proof.survivors", m.survivors)?,
                signatures: m.signatures.into_iter().map(survivor_signature_in).collect::<Result<_, _>>()?,
            }),
            R::Done(_) => Reply::Done,
        })
    }
}

impl From<&Reply> for pb::SecAggReply {
    fn from(r: &Reply) -> Self {
        use pb::sec_agg_reply::Reply as R;
        let reply = match r {
            Reply::Pending { retry_after_ms } => R::Pending(pb::SecAggPending { retry_after_ms: *retry_after_ms }),
            Reply::Roster(m) => R::Roster(pb::SecAggKeyRoster {
                session_id: m.session_id.to_vec(),
                keys: m.keys.iter().map(Into::into).collect(),
            }),
            Reply::Reveals(m) => R::Reveals(pb::SecAggGraphReveals {
                session_id: m.session_id.to_vec(),
                reveals: m.reveals.iter().map(reveal_out).collect(),
            }),
            Reply::Shares(m) => R::Shares(pb::SecAggSharesFor {
                session_id: m.session_id.to_vec(),
                recipient: u32::from(m.recipient),
                sharers: m.sharers.iter().map(|&i| u32::from(i)).collect(),
                shares: shares_out(&m.shares),
            }),
            Reply::Survivors(m) => R::Survivors(pb::SecAggSurvivorSet {
                session_id: m.session_id.to_vec(),
                survivors: m.survivors.iter().map(|&i| u32::from(i)).collect(),
            }),
            Reply::Proof(m) => R::Proof(pb::SecAggSurvivorProof {
                session_id: m.session_id.to_vec(),
                survivors: m.survivors.iter().map(|&i| u32::from(i)).collect(),
                signatures: m.signatures.iter().map(survivor_signature_out).collect(),
            }),
            Reply::Done => R::Done(pb::Ack {}),
        };
        pb::SecAggReply { reply: Some(reply) }
    }
}

/// Byte encodings (protobuf) for storing what the coordinator must keep across a
/// restart in the unmask stage (`coordinator/src/resume.rs`); decoding checks every
/// field as on the wire.
pub mod stored {
    use prost::Message;

    use super::super::{WireError, invalid, pb};
    use super::{Reply, Request, SessionInfo};

    fn decode<M: Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, WireError> {
        M::decode(bytes).map_err(|e| invalid(what, format!("does not decode: {e}")))
    }

    pub fn session_to_bytes(s: &SessionInfo) -> Vec<u8> {
        pb::SecAggSession::from(s).encode_to_vec()
    }

    pub fn session_from_bytes(bytes: &[u8]) -> Result<SessionInfo, WireError> {
        decode::<pb::SecAggSession>("stored session", bytes)?.try_into()
    }

    pub fn reply_to_bytes(r: &Reply) -> Vec<u8> {
        pb::SecAggReply::from(r).encode_to_vec()
    }

    pub fn reply_from_bytes(bytes: &[u8]) -> Result<Reply, WireError> {
        decode::<pb::SecAggReply>("stored reply", bytes)?.try_into()
    }

    pub fn request_to_bytes(r: &Request) -> Vec<u8> {
        pb::SecAggRequest::from(r).encode_to_vec()
    }

    pub fn request_from_bytes(bytes: &[u8]) -> Result<Request, WireError> {
        decode::<pb::SecAggRequest>("stored request", bytes)?.try_into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session_id() -> [u8; 32] {
        [7; 32]
    }

    #[test]
    fn every_stage_message_round_trips() {
        let adv = AdvertiseKeys {
            session_id: session_id(),
            index: 2,
            cipher_pk: [1; 32],
            mask_pk: [2; 32],
            graph_commitment: [8; 32],
            signature: vec![9; 70],
        };
        let reveal = GraphReveal { session_id: session_id(), index: 2, nonce: [6; 32] };
        let messages = [
            StageMessage::Advertise(adv.clone()),
            StageMessage::GraphReveal(reveal.clone()),
            StageMessage::ShareKeys(ShareKeys {
                session_id: session_id(),
                index: 2,
                self_mask_commitment: [3; 32],
                shares: vec![EncryptedShare { from: 2, to: 1, ciphertext: vec![5; 84] }],
            }),
            StageMessage::AwaitSurvivors { session_id: session_id(), index: 2 },
            StageMessage::SurvivorSignature(SurvivorSignature {
                session_id: session_id(),
                index: 2,
                signature: vec![1; 64],
            }),
            StageMessage::Unmask(UnmaskShares {
                session_id: session_id(),
                index: 2,
                self_mask_shares: vec![RevealedShare { owner: 1, share: [4; 32] }],
                mask_key_shares: vec![RevealedShare { owner: 3, share: [6; 32] }],
            }),
        ];
        for message in messages {
            let r = Request { job_id: "j-1".into(), round: 2, attempt: 3, message };
            assert_eq!(Request::try_from(pb::SecAggRequest::from(&r)), Ok(r));
        }
        let replies = [
            Reply::Pending { retry_after_ms: 5 },
            Reply::Roster(KeyRoster { session_id: session_id(), keys: vec![adv] }),
            Reply::Reveals(GraphReveals { session_id: session_id(), reveals: vec![reveal] }),
            Reply::Shares(SharesFor { session_id: session_id(), recipient: 1, sharers: vec![1, 2], shares: vec![] }),
            Reply::Survivors(SurvivorSet { session_id: session_id(), survivors: vec![1, 2] }),
            Reply::Proof(SurvivorProof { session_id: session_id(), survivors: vec![1], signatures: vec![] }),
            Reply::Done,
        ];
        for r in replies {
            assert_eq!(Reply::try_from(pb::SecAggReply::from(&r)), Ok(r));
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        let mut m = pb::SecAggAdvertise::from(&AdvertiseKeys {
            session_id: session_id(),
            index: 1,
            cipher_pk: [1; 32],
            mask_pk: [2; 32],
            graph_commitment: [3; 32],
            signature: vec![1],
        });
        m.cipher_pk.pop();
        assert_eq!(
            AdvertiseKeys::try_from(m.clone()).expect_err("short key").to_string(),
            "advertise.cipher_pk: must be 32 bytes, got 31"
        );
        m.cipher_pk.push(0);
        m.index = 0;
        assert!(AdvertiseKeys::try_from(m.clone()).expect_err("index 0").to_string().contains("party index 0"));
        m.index = 1;
        m.signature.clear();
        assert!(AdvertiseKeys::try_from(m).is_err());
        let r = pb::SecAggRequest { job_id: "j-1".into(), round: 1, attempt: 1, stage: None };
        assert_eq!(Request::try_from(r), Err(WireError::Missing { field: "secagg.stage" }));
    }
}
