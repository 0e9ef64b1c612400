//! Conversions for signed model releases (see [`maeum_tlog::release`]).

use super::{Digest, ModelRef, WireError, invalid, pb};
use maeum_tlog::handover::KeyHandover;
use maeum_tlog::release::{CardAdapter, MAX_CARD_BYTES, Manifest};
use maeum_tlog::{hex, unhex};

/// At most this many rotations of the release key travel with a release.
pub const MAX_HANDOVERS: usize = 256;

/// What a model card says of `spec`'s adapters (`encoder-lora`), or `None`: the one
/// mapping the coordinator writes into a card and a site checks a card against.
pub fn card_adapter(spec: &maeum_models::model::ModelSpec) -> Option<CardAdapter> {
    let maeum_models::model::ModelSpec::EncoderLora { lora, .. } = spec else { return None };
    Some(CardAdapter {
        layers: u32::try_from(lora.layers).unwrap_or(u32::MAX),
        rank: u32::try_from(lora.rank).unwrap_or(u32::MAX),
        alpha: lora.alpha,
        seed: lora.seed,
    })
}

/// A release as it travels: the signed manifest, its signature, the card's bytes and
/// where the log records it. Parsing checks shapes only; [`maeum_tlog::release`] checks
/// the signature, the card and the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseMsg {
    pub manifest: Manifest,
    pub signature: Vec<u8>,
    /// By the release key (empty: none); see `pb::Release.release_signature`.
    pub release_signature: Vec<u8>,
    pub card: Vec<u8>,
    pub audit_seq: u64,
    /// Every rotation of the release key, oldest first (see `pb::Release`).
    pub handovers: Vec<KeyHandover>,
    /// Every rotation of the log key, oldest first.
    pub log_handovers: Vec<KeyHandover>,
}

/// A handover on the wire (bytes) from its stored form (hex). The stored form comes
/// from the coordinator's own file and log, so a field that is not hex is its error.
pub fn handover_to_pb(h: &KeyHandover) -> pb::KeyHandover {
    let bytes = |s: &str| unhex(s).unwrap_or_default();
    pb::KeyHandover {
        old_key: bytes(&h.old_key),
        new_key: bytes(&h.new_key),
        old_signature: bytes(&h.old_signature),
        new_signature: bytes(&h.new_signature),
    }
}

/// A handover from the wire, its lengths checked (its signatures are not: see
/// [`maeum_tlog::handover`]).
pub fn handover_from_pb(field: &'static str, h: pb::KeyHandover) -> Result<KeyHandover, WireError> {
    for (what, len, want) in [
        ("old_key", h.old_key.len(), 32),
        ("new_key", h.new_key.len(), 32),
        ("old_signature", h.old_signature.len(), 64),
        ("new_signature", h.new_signature.len(), 64),
    ] {
        if len != want {
            return Err(invalid(field, format!("{what}: expected {want} bytes, got {len}")));
        }
    }
    Ok(KeyHandover {
        old_key: hex(&h.old_key),
        new_key: hex(&h.new_key),
        old_signature: hex(&h.old_signature),
        new_signature: hex(&h.new_signature),
    })
}

/// A list of handovers from the wire, at most [`MAX_HANDOVERS`].
pub fn handovers_from_pb(field: &'static str, list: Vec<pb::KeyHandover>) -> Result<Vec<KeyHandover>, WireError> {
    if list.len() > MAX_HANDOVERS {
        return Err(invalid(field, format!("{} handovers; at most {MAX_HANDOVERS}", list.len())));
    }
    list.into_iter().map(|h| handover_from_pb(field, h)).collect()
}

impl ReleaseMsg {
    /// The model as a download reference.
    pub fn model(&self) -> Result<ModelRef, WireError> {
        Ok(ModelRef {
            digest: Digest::parse("release.model.digest", &self.manifest.model_sha256)?,
            size: self.manifest.model_size,
            layout_digest: Digest::parse("release.model.layout_digest", &self.manifest.layout_digest)?,
        })
    }

    pub fn to_pb(&self) -> pb::Release {
        let m = &self.manifest;
        pb::Release {
            consortium: m.consortium.clone(),
            version: m.version,
            model: Some(pb::ModelRef {
                digest: m.model_sha256.clone(),
                size: m.model_size,
                layout_digest: m.layout_digest.clone(),
            }),
            card_sha256: m.card_sha256.clone(),
            signature: self.signature.clone(),
            card: self.card.clone(),
            audit_seq: self.audit_seq,
            release_signature: self.release_signature.clone(),
            release_key_handovers: self.handovers.iter().map(handover_to_pb).collect(),
            log_key_handovers: self.log_handovers.iter().map(handover_to_pb).collect(),
        }
    }

    pub fn from_pb(r: pb::Release) -> Result<ReleaseMsg, WireError> {
        let model: ModelRef = r.model.ok_or(WireError::Missing { field: "release.model" })?.try_into()?;
        if r.version == 0 {
            return Err(invalid("release.version", "must be at least 1"));
        }
        if r.consortium.is_empty() || r.consortium.len() > 63 {
            return Err(invalid("release.consortium", "must be 1 to 63 characters"));
        }
        let card_sha256 = Digest::parse("release.card_sha256", &r.card_sha256)?;
        if r.signature.len() != 64 {
            return Err(invalid("release.signature", format!("expected 64 bytes, got {}", r.signature.len())));
        }
        if !matches!(r.release_signature.len(), 0 | 64) {
            return Err(invalid(
                "release.release_signature",
                format!("expected 0 or 64 bytes, got {}", r.release_signature.len()),
            ));
        }
        if r.card.is_empty() || r.card.len() > MAX_CARD_BYTES {
            return Err(invalid("release.card", format!("{} bytes; expected 1 to {MAX_CARD_BYTES}", r.card.len())));
        }
        if model.size == 0 || model.size > super::MAX_PARAMS * 4 + (64 << 20) {
            return Err(invalid("release.model.size", format!("{} bytes is not a model size", model.size)));
        }
        Ok(ReleaseMsg {
            manifest: Manifest {
                consortium: r.consortium,
                version: r.version,
                model_sha256: model.digest.hex(),
                model_size: model.size,
                layout_digest: model.layout_digest.hex(),
                card_sha256: card_sha256.hex(),
            },
            signature: r.signature,
            release_signature: r.release_signature,
            card: r.card,
            audit_seq: r.audit_seq,
            handovers: handovers_from_pb("release.release_key_handovers", r.release_key_handovers)?,
            log_handovers: handovers_from_pb("release.log_key_handovers", r.log_key_handovers)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> ReleaseMsg {
        ReleaseMsg {
            manifest: Manifest {
                consortium: "c".into(),
                version: 1,
                model_sha256: "ab".repeat(32),
                model_size: 100,
                layout_digest: "cd".repeat(32),
                card_sha256: "ef".repeat(32),
            },
            signature: vec![1; 64],
            release_signature: vec![2; 64],
            card: b"{}".to_vec(),
            audit_seq: 9,
            handovers: vec![KeyHandover {
                old_key: "01".repeat(32),
                new_key: "02".repeat(32),
                old_signature: "03".repeat(64),
                new_signature: "04".repeat(64),
            }],
            log_handovers: Vec::new(),
        }
    }

    #[test]
    fn a_release_round_trips_and_malformed_ones_are_refused() {
        assert_eq!(ReleaseMsg::from_pb(msg().to_pb()), Ok(msg()));
        let mut p = msg().to_pb();
        p.release_key_handovers[0].new_signature.pop();
        let err = ReleaseMsg::from_pb(p).expect_err("refused").to_string();
        assert!(err.contains("release.release_key_handovers") && err.contains("new_signature"), "{err}");
        let mut p = msg().to_pb();
        p.release_key_handovers = vec![p.release_key_handovers[0].clone(); MAX_HANDOVERS + 1];
        assert!(ReleaseMsg::from_pb(p).is_err());
        let mut p = msg().to_pb();
        p.signature.pop();
        assert!(ReleaseMsg::from_pb(p).expect_err("refused").to_string().contains("release.signature"));
        let mut p = msg().to_pb();
        p.model = None;
        assert_eq!(ReleaseMsg::from_pb(p), Err(WireError::Missing { field: "release.model" }));
        let mut p = msg().to_pb();
        p.card = vec![b' '; MAX_CARD_BYTES + 1];
        assert!(ReleaseMsg::from_pb(p).expect_err("refused").to_string().contains("release.card"));
        let mut p = msg().to_pb();
        p.card_sha256 = "zz".into();
        assert!(ReleaseMsg::from_pb(p).is_err());
        let mut p = msg().to_pb();
        p.version = 0;
        assert!(ReleaseMsg::from_pb(p).is_err());
    }
}
