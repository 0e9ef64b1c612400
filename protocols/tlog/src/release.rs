//! Signed model releases: the manifest the coordinator signs, the model card it
//! commits to, and the checks a site runs before it installs a release.
//!
//! A release is three things bound together:
//!
//! - the **model blob** (safetensors), named by its SHA-256;
//! - the **model card** (JSON, [`ModelCard`]), named by the SHA-256 of its exact bytes;
//! - the **manifest** ([`Manifest`]): consortium, version number, the two digests and
//!   the model's size and layout digest, signed with the coordinator's Ed25519 key
//!   (the key that signs audit checkpoints, which every site received at enrolment)
//!   under the domain-separation prefix [`RELEASE_DOMAIN`], so a checkpoint signature
//!   can never pass for a release signature or the other way round.
//!
//! The audit log's `model_release` entry names the same two digests. A site installs a
//! release only if the signature verifies ([`Manifest::verify`]), the card's bytes
//! hash to the signed card digest and say what the manifest says ([`check_card`]), the
//! blob hashes to the signed model digest, and a `model_release` entry naming both
//! digests ([`is_release_entry`]) is included in a checkpoint the site witnessed.
//! Sans-IO: the caller hashes the blob and fetches the proofs.

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::export::Verified;
use crate::{Event, hex, unhex};

mod card;

pub use card::*;

/// Prefix of every signed release manifest.
pub const RELEASE_DOMAIN: &[u8] = b"maeum/release/v1\n";
/// `format` of a model card this code writes and reads.
pub const CARD_FORMAT: &str = "maeum-model-card/v1";
/// Largest model card a site accepts (bytes).
pub const MAX_CARD_BYTES: usize = 4 << 20;
/// `format` of the release file (`release-vN.json`) that `models export` writes.
pub const RELEASE_FILE_FORMAT: &str = "maeum-release/v1";
/// Largest release file read (bytes); a real one is about 1 KiB.
pub const MAX_RELEASE_FILE_BYTES: usize = 64 << 10;

/// Why a release was refused. Messages name what failed, never key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseError {
    #[error("the release signature does not verify under the consortium's signing key (from enrolment)")]
    Signature,
    #[error("the model card does not match the signed card digest (got {got}, signed {signed})")]
    CardDigest { got: String, signed: String },
    #[error("the model card is malformed: {0}")]
    CardMalformed(String),
    #[error("the model card disagrees with the signed manifest: {0}")]
    CardMismatch(String),
    #[error("the model blob does not match the signed model digest (got {got}, signed {signed})")]
    BlobDigest { got: String, signed: String },
    #[error("the release is not in the audit log: {0}")]
    NotLogged(String),
    #[error("the release file is malformed: {0}")]
    Malformed(String),
    #[error("the release is of consortium {release:?}, the log's consortium is {expected:?}")]
    Consortium { release: String, expected: String },
    #[error("the model does not match its signed layout and card: {0}")]
    Layout(String),
    #[error("the model card's privacy claim does not hold against the audit log: {0}")]
    Privacy(String),
}

impl ReleaseError {
    /// The check that failed, as numbered in `docs/protocols/releases.md` (REL-1 …
    /// REL-10), so that a site's refusal and an auditor's failure name the same rule.
    pub fn code(&self) -> &'static str {
        match self {
            ReleaseError::Malformed(_) | ReleaseError::CardMalformed(_) => "REL-1",
            ReleaseError::Consortium { .. } => "REL-3",
            ReleaseError::Signature => "REL-4",
            ReleaseError::CardDigest { .. } => "REL-5",
            ReleaseError::CardMismatch(_) => "REL-6",
            ReleaseError::BlobDigest { .. } => "REL-7",
            ReleaseError::Layout(_) => "REL-8",
            ReleaseError::NotLogged(_) => "REL-9",
            ReleaseError::Privacy(_) => "REL-10",
        }
    }
}

/// What the coordinator signs for a release, in this field order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The consortium name.
    pub consortium: String,
    /// The release number, from 1.
    pub version: u32,
    /// SHA-256 (hex) of the model blob.
    pub model_sha256: String,
    /// The blob's size in bytes.
    pub model_size: u64,
    /// SHA-256 (hex) of the parameter layout.
    pub layout_digest: String,
    /// SHA-256 (hex) of the model card's bytes.
    pub card_sha256: String,
}

impl Manifest {
    /// The bytes the signature covers: [`RELEASE_DOMAIN`] then the manifest as JSON.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = RELEASE_DOMAIN.to_vec();
        // INVARIANT: strings and integers always serialise.
        out.extend(serde_json::to_vec(self).expect("a manifest serialises"));
        out
    }

    /// Signs the manifest (the coordinator).
    pub fn sign(&self, key: &Ed25519KeyPair) -> Vec<u8> {
        key.sign(&self.signed_bytes()).as_ref().to_vec()
    }

    /// Checks `signature` under the consortium's Ed25519 public key.
    pub fn verify(&self, public_key: &[u8; 32], signature: &[u8]) -> Result<(), ReleaseError> {
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&self.signed_bytes(), signature)
            .map_err(|_| ReleaseError::Signature)
    }

    /// Checks a blob's SHA-256 (the caller hashes it) against the signed one.
    pub fn check_blob(&self, got_sha256: &[u8; 32]) -> Result<(), ReleaseError> {
        let got = hex(got_sha256);
        if got != self.model_sha256 {
            return Err(ReleaseError::BlobDigest { got, signed: self.model_sha256.clone() });
        }
        Ok(())
    }
}

/// Parses JSON of at most `limit` bytes whose `format` (read by `format_of`) is
/// `expected`; `malformed` makes the error.
fn decode_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
    expected: &str,
    format_of: impl Fn(&T) -> &str,
    malformed: fn(String) -> ReleaseError,
) -> Result<T, ReleaseError> {
    if bytes.len() > limit {
        return Err(malformed(format!("{} bytes, limit {limit}", bytes.len())));
    }
    let value: T = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    if format_of(&value) != expected {
        return Err(malformed(format!("format {:?}, expected {expected:?}", format_of(&value))));
    }
    Ok(value)
}

/// Checks card bytes against a manifest: digest, then that the card describes the
/// signed release (consortium, version, model digest, size, layout).
pub fn check_card(manifest: &Manifest, card_bytes: &[u8]) -> Result<ModelCard, ReleaseError> {
    let got = sha256_hex(card_bytes);
    if got != manifest.card_sha256 {
        return Err(ReleaseError::CardDigest { got, signed: manifest.card_sha256.clone() });
    }
    let card = ModelCard::decode(card_bytes)?;
    let mismatch = |what: &str, card: String, signed: String| {
        Err(ReleaseError::CardMismatch(format!("{what}: card says {card}, manifest says {signed}")))
    };
    if card.consortium != manifest.consortium {
        return mismatch("consortium", card.consortium, manifest.consortium.clone());
    }
    if card.version != manifest.version {
        return mismatch("version", card.version.to_string(), manifest.version.to_string());
    }
    if card.model.sha256 != manifest.model_sha256 {
        return mismatch("model digest", card.model.sha256, manifest.model_sha256.clone());
    }
    if card.model.size != manifest.model_size {
        return mismatch("model size", card.model.size.to_string(), manifest.model_size.to_string());
    }
    if card.model.layout_digest != manifest.layout_digest {
        return mismatch("layout digest", card.model.layout_digest, manifest.layout_digest.clone());
    }
    check_card_numbers(&card)?;
    Ok(card)
}

/// The card's numbers that sites act on are in range: a crisis-flag threshold outside
/// [0, 1] would silently never (or always) flag a possible crisis at `predict`, and a
/// privacy claim must be a finite, non-negative ε at a δ in (0, 1).
fn check_card_numbers(card: &ModelCard) -> Result<(), ReleaseError> {
    let bad = |what: String| Err(ReleaseError::CardMismatch(what));
    if let Some(f) = &card.crisis_flag {
        let unit = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        for (name, value) in [
            ("threshold", f.threshold),
            ("recall", f.recall),
            ("precision", f.precision),
            ("target_recall", Some(f.target_recall)),
        ] {
            if let Some(v) = value.filter(|v| !unit(*v)) {
                return bad(format!("crisis_flag.{name} is {v}, outside [0, 1]"));
            }
        }
    }
    if let Some(p) = &card.privacy {
        let ok = p.epsilon.is_finite()
            && p.epsilon >= 0.0
            && p.delta > 0.0
            && p.delta < 1.0
            && p.clip.is_finite()
            && p.clip > 0.0
            && p.noise_multiplier.is_finite()
            && p.noise_multiplier >= 0.0
            && p.sample_rate > 0.0
            && p.sample_rate <= 1.0;
        if !ok {
            return bad(format!(
                "privacy: ε {}, δ {}, clip {}, noise multiplier {}, sample rate {} are not a valid claim",
                p.epsilon, p.delta, p.clip, p.noise_multiplier, p.sample_rate
            ));
        }
    }
    Ok(())
}

/// How people name a release on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `3` or `v3`.
    Version(u32),
    /// At least 8 hex digits of the model digest, lower-cased.
    DigestPrefix(String),
}

impl Selector {
    /// `v3`, a number of up to 7 digits, or 8+ hex digits of a model digest. A digest
    /// prefix can be all decimal digits, so 8 or more digits always mean a digest.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let s = text.trim().to_ascii_lowercase();
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        let number = match s.strip_prefix('v') {
            Some(n) if digits(n) => Some(n),
            _ if digits(&s) && s.len() < 8 => Some(s.as_str()),
            _ => None,
        };
        if let Some(n) = number {
            return n.parse().map(Selector::Version).map_err(|_| format!("{text:?}: release number too large"));
        }
        if s.len() >= 8 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Selector::DigestPrefix(s));
        }
        Err(format!("{text:?} is neither a release number (3 or v3) nor 8+ hex digits of a model digest"))
    }
}

/// Whether a log event is the `model_release` entry of this manifest.
pub fn is_release_entry(event: &Event, manifest: &Manifest) -> bool {
    matches!(event, Event::ModelRelease { version_sha256, card_sha256, .. }
        if *version_sha256 == manifest.model_sha256 && *card_sha256 == manifest.card_sha256)
}

/// The audit-log entry a release file points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntryRef {
    /// The entry's seq.
    pub seq: u64,
    /// Always `model_release`.
    pub kind: String,
}

/// `release-vN.json`, written by `maeum-coordinator models export` beside the model
/// and the card: the signed manifest, the signature and where the log records it,
/// for people and for `maeum-audit release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseFile {
    /// [`RELEASE_FILE_FORMAT`].
    pub format: String,
    /// What is signed.
    pub manifest: Manifest,
    /// What the signature covers, in words ([`ReleaseFile::SIGNED_BYTES`]).
    pub signed_bytes: String,
    /// The Ed25519 signature, hex.
    pub signature_ed25519: String,
    /// The consortium's signing key (also the audit log's key), hex.
    pub signing_public_key: String,
    /// The `model_release` entry of this release.
    pub audit_log_entry: LogEntryRef,
    /// The release key's signature over the same bytes, hex (absent: a consortium
    /// without a release key).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release_signature_ed25519: String,
    /// The release key (hex) whose signature the release carries, when it carries one.
    /// Compare it with the key in the sites' enrolment bundles, or let `maeum-audit
    /// release --release-key` walk the log's rotations to it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release_public_key: String,
}

impl ReleaseFile {
    /// The value of [`ReleaseFile::signed_bytes`].
    pub const SIGNED_BYTES: &str =
        "\"maeum/release/v1\\n\" followed by the manifest as compact JSON, fields in this order";

    pub fn new(manifest: Manifest, signature: &[u8], signing_public_key: &[u8; 32], audit_seq: u64) -> ReleaseFile {
        ReleaseFile {
            format: RELEASE_FILE_FORMAT.into(),
            manifest,
            signed_bytes: Self::SIGNED_BYTES.into(),
            signature_ed25519: hex(signature),
            signing_public_key: hex(signing_public_key),
            audit_log_entry: LogEntryRef { seq: audit_seq, kind: "model_release".into() },
            release_signature_ed25519: String::new(),
            release_public_key: String::new(),
        }
    }

    /// With the release key's signature and public key (both empty: none).
    pub fn with_release_key(mut self, signature: &[u8], public_key: &str) -> ReleaseFile {
        if !signature.is_empty() {
            self.release_signature_ed25519 = hex(signature);
            self.release_public_key = public_key.to_owned();
        }
        self
    }

    /// Pretty JSON (people read it).
    pub fn encode(&self) -> Vec<u8> {
        // INVARIANT: strings and integers always serialise.
        serde_json::to_vec_pretty(self).expect("a release file serialises")
    }

    /// Parses a release file (size-limited, format checked).
    pub fn decode(bytes: &[u8]) -> Result<ReleaseFile, ReleaseError> {
        decode_json(
            bytes,
            MAX_RELEASE_FILE_BYTES,
            RELEASE_FILE_FORMAT,
            |f: &ReleaseFile| &f.format,
            ReleaseError::Malformed,
        )
    }

    /// The signature's bytes.
    pub fn signature(&self) -> Result<Vec<u8>, ReleaseError> {
        let sig = unhex(&self.signature_ed25519)
            .map_err(|_| ReleaseError::Malformed("signature_ed25519 is not hex".into()))?;
        if sig.len() != 64 {
            return Err(ReleaseError::Malformed(format!("signature_ed25519 has {} bytes, expected 64", sig.len())));
        }
        Ok(sig)
    }
}

/// SHA-256 of `bytes`, in lowercase hex as manifests and cards name digests.
fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The model file of an exported release, as the caller read it.
#[derive(Debug, Clone)]
pub struct ModelFile {
    /// SHA-256 of the file's bytes.
    pub sha256: [u8; 32],
    /// The layout digest and labels of the model the file loads as, or why it does not
    /// load.
    pub loaded: Result<(String, Vec<String>), String>,
}

/// Where the log records a release, and the first checkpoint that commits to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedAt {
    pub seq: u64,
    pub time_ms: i64,
    /// Size of the first signed checkpoint whose tree holds the entry.
    pub checkpoint_size: u64,
    /// The sites that cosigned that checkpoint.
    pub cosigned_by: Vec<String>,
    /// Size of the export's latest checkpoint (it extends the first one).
    pub latest_checkpoint_size: u64,
    /// The sites that cosigned the latest checkpoint.
    pub latest_cosigned_by: Vec<String>,
}

/// One promotion (or rollback) of the release, as logged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Promotion {
    pub seq: u64,
    pub time_ms: i64,
    pub operator: String,
}

/// A release gate a lead overrode to promote the release, as logged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedOverride {
    pub seq: u64,
    pub time_ms: i64,
    pub gate: String,
    pub measured: String,
    pub threshold: String,
    pub operator: String,
    pub reason: String,
}

/// A site's last recorded refusal of the release.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    pub site: String,
    pub seq: u64,
    pub reason: String,
}

/// What [`audit_release`] found: the release checks out, and what the log says
/// happened to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReleaseAudit {
    pub consortium: String,
    pub version: u32,
    pub model_sha256: String,
    pub model_size: u64,
    pub layout_digest: String,
    pub card_sha256: String,
    /// The key the signature verified under (the log's key).
    pub signing_public_key: String,
    /// The release key the second signature verified under (`None`: the release carries
    /// none).
    pub release_public_key: Option<String>,
    pub job_id: String,
    pub job_name: String,
    pub round: u32,
    pub rounds: u32,
    pub labels: Vec<String>,
    /// The card's federated evaluation of the released model.
    pub evaluation: Option<CardEvaluation>,
    pub logged: LoggedAt,
    /// Every promotion or rollback that made it current, in log order.
    pub promotions: Vec<Promotion>,
    /// Every release gate overridden to promote it, in log order.
    pub gate_overrides: Vec<LoggedOverride>,
    /// Whether it is the current release at the end of the log (the last promotion).
    pub current: bool,
    /// Sites whose last report on this release is an install.
    pub installed_by: Vec<String>,
    /// Sites whose last report on this release is a refusal.
    pub refused_by: Vec<Refusal>,
    /// The card's differential-privacy claim, checked against the log (REL-10).
    pub privacy: Option<PrivacyAudit>,
}

/// REL-10: the card's privacy claim and the sites' logged charges behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrivacyAudit {
    pub mechanism: String,
    /// ε per record the card claims, and its δ.
    pub epsilon: f64,
    pub delta: f64,
    /// `privacy_charged` entries of the job up to the released round.
    pub charges: usize,
    /// The largest ε any site logged (at most `epsilon`).
    pub max_site_epsilon: f64,
}

/// REL-10: every `privacy_charged` entry of the card's job up to its round spends at
/// most the card's ε at no larger δ, and the card's per-site table is what the log says.
pub fn check_card_privacy(
    card: &ModelCard,
    entries: &[crate::entry::Entry],
) -> Result<Option<PrivacyAudit>, ReleaseError> {
    let Some(p) = &card.privacy else {
        return Ok(None);
    };
    let mismatch = |what: String| Err(ReleaseError::Privacy(what));
    let mut per_site: BTreeMap<&str, (f64, &str)> = BTreeMap::new();
    let mut charges = 0;
    for e in entries {
        if let Event::PrivacyCharged { job_id, round, site, epsilon, delta, .. } = &e.event
            && *job_id == card.job.id
            && *round <= card.round
        {
            charges += 1;
            let (Ok(eps), Ok(d)) = (epsilon.parse::<f64>(), delta.parse::<f64>()) else {
                return mismatch(format!("entry #{} holds an unreadable ε or δ", e.seq));
            };
            if eps > p.epsilon * (1.0 + 1e-9) || d > p.delta * (1.0 + 1e-9) {
                return mismatch(format!(
                    "site {site} logged ε = {epsilon} at δ = {delta} for round {round} (entry #{}), beyond the card's \
                     ε = {} at δ = {}",
                    e.seq, p.epsilon, p.delta
                ));
            }
            if per_site.get(site.as_str()).is_none_or(|(best, _)| eps > *best) {
                per_site.insert(site, (eps, epsilon));
            }
        }
    }
    let logged: BTreeMap<String, String> =
        per_site.iter().map(|(s, (_, e))| ((*s).to_owned(), (*e).to_owned())).collect();
    if logged != p.epsilon_per_site {
        return mismatch(format!(
            "the card's ε per site {:?} is not what the log's privacy_charged entries say {logged:?}",
            p.epsilon_per_site
        ));
    }
    Ok(Some(PrivacyAudit {
        mechanism: p.mechanism.clone(),
        epsilon: p.epsilon,
        delta: p.delta,
        charges,
        max_site_epsilon: per_site.values().map(|(e, _)| *e).fold(0.0, f64::max),
    }))
}

/// An auditor's check of an exported release against a verified audit-log export:
/// REL-1 (the file), REL-3 (the log's consortium), REL-4 (the signature under the log
/// key), REL-5/REL-6 (the card), REL-7 (the model's digest), REL-8 (its layout and
/// labels), REL-9 (a `model_release` entry naming both digests, with the card's job
/// and round, is in the log, which the verified export's last checkpoint covers).
/// The first failed check is the error.
pub fn audit_release(
    file: &ReleaseFile,
    card_bytes: &[u8],
    model: &ModelFile,
    log: &Verified,
) -> Result<ReleaseAudit, ReleaseError> {
    let m = &file.manifest;
    let signature = file.signature()?;
    if m.consortium != log.report.consortium {
        return Err(ReleaseError::Consortium {
            release: m.consortium.clone(),
            expected: log.report.consortium.clone(),
        });
    }
    // Signed by one of the log's keys (the one in effect when it was made; a rotated
    // log key stays good for the releases it signed), and the file names that key.
    let Some(log_key) = log.log_keys.iter().map(|(_, k)| *k).find(|k| m.verify(k, &signature).is_ok()) else {
        return Err(ReleaseError::Signature);
    };
    let log_key = hex(&log_key);
    if file.signing_public_key != log_key {
        return Err(ReleaseError::Malformed(format!(
            "it names signing key {}, but the signature is by the log's key {log_key}",
            file.signing_public_key
        )));
    }
    let release_public_key = match (file.release_signature_ed25519.is_empty(), file.release_public_key.is_empty()) {
        (true, true) => None,
        (false, false) => {
            let key = crate::unhex32(&file.release_public_key)
                .map_err(|_| ReleaseError::Malformed("release_public_key is not 32 bytes of hex".into()))?;
            let sig = unhex(&file.release_signature_ed25519)
                .map_err(|_| ReleaseError::Malformed("release_signature_ed25519 is not hex".into()))?;
            m.verify(&key, &sig).map_err(|e| {
                ReleaseError::Malformed(format!(
                    "the release-key signature does not verify under the key it names: {e}"
                ))
            })?;
            Some(file.release_public_key.clone())
        }
        _ => {
            return Err(ReleaseError::Malformed(
                "it names a release key without a release signature, or the other way round".into(),
            ));
        }
    };
    let card = check_card(m, card_bytes)?;
    m.check_blob(&model.sha256)?;
    let (layout, labels) = model.loaded.clone().map_err(ReleaseError::Layout)?;
    if layout != m.layout_digest {
        return Err(ReleaseError::Layout(format!("its layout is {layout}, the signed layout is {}", m.layout_digest)));
    }
    if labels != card.model.labels {
        return Err(ReleaseError::Layout(format!("its labels are {labels:?}, the card's are {:?}", card.model.labels)));
    }

    let entries = &log.export.entries;
    let Some(entry) = entries.iter().find(|e| is_release_entry(&e.event, m)) else {
        let releases = entries.iter().filter(|e| matches!(e.event, Event::ModelRelease { .. })).count();
        return Err(ReleaseError::NotLogged(format!(
            "none of the log's {releases} model_release entries names model {} and card {}",
            m.model_sha256, m.card_sha256
        )));
    };
    if let Event::ModelRelease { job_id, round, .. } = &entry.event
        && (*job_id != card.job.id || *round != card.round)
    {
        return Err(ReleaseError::CardMismatch(format!(
            "the log's model_release entry #{} says job {job_id} round {round}, the card says job {} round {}",
            entry.seq, card.job.id, card.round
        )));
    }
    if file.audit_log_entry.seq != entry.seq {
        return Err(ReleaseError::Malformed(format!(
            "it points at audit-log entry #{}, but this release's model_release entry is #{}",
            file.audit_log_entry.seq, entry.seq
        )));
    }
    // A verified export's last checkpoint covers every entry (AUD-11).
    let checkpoint = log
        .export
        .checkpoints
        .iter()
        .find(|c| c.size > entry.seq)
        .ok_or_else(|| ReleaseError::NotLogged(format!("entry #{} is in no signed checkpoint", entry.seq)))?;
    let latest = log.export.checkpoints.last().unwrap_or(checkpoint);
    let sites = |c: &crate::export::ExportedCheckpoint| c.cosignatures.iter().map(|c| c.site.clone()).collect();

    let mut promotions = Vec::new();
    let mut gate_overrides = Vec::new();
    let mut current = None;
    let mut reports: std::collections::BTreeMap<&str, (bool, u64, &str)> = std::collections::BTreeMap::new();
    for e in entries {
        match &e.event {
            Event::ReleasePromoted { version_sha256, operator } => {
                current = Some(version_sha256);
                if *version_sha256 == m.model_sha256 {
                    promotions.push(Promotion { seq: e.seq, time_ms: e.time_ms, operator: operator.clone() });
                }
            }
            Event::ReleaseGateOverridden { version_sha256, gate, measured, threshold, operator, reason }
                if *version_sha256 == m.model_sha256 =>
            {
                gate_overrides.push(LoggedOverride {
                    seq: e.seq,
                    time_ms: e.time_ms,
                    gate: gate.clone(),
                    measured: measured.clone(),
                    threshold: threshold.clone(),
                    operator: operator.clone(),
                    reason: reason.clone(),
                });
            }
            Event::ReleaseInstall { site, version_sha256, installed, reason } if *version_sha256 == m.model_sha256 => {
                reports.insert(site, (*installed, e.seq, reason));
            }
            _ => {}
        }
    }
    let installed_by = reports.iter().filter(|(_, r)| r.0).map(|(s, _)| (*s).to_owned()).collect();
    let refused_by = reports
        .iter()
        .filter(|(_, r)| !r.0)
        .map(|(s, r)| Refusal { site: (*s).to_owned(), seq: r.1, reason: r.2.to_owned() })
        .collect();
    let privacy = check_card_privacy(&card, entries)?;

    Ok(ReleaseAudit {
        consortium: m.consortium.clone(),
        version: m.version,
        model_sha256: m.model_sha256.clone(),
        model_size: m.model_size,
        layout_digest: m.layout_digest.clone(),
        card_sha256: m.card_sha256.clone(),
        signing_public_key: log_key,
        release_public_key,
        job_id: card.job.id.clone(),
        job_name: card.job.name.clone(),
        round: card.round,
        rounds: card.job.rounds,
        labels: card.model.labels.clone(),
        evaluation: card.evaluation.clone(),
        logged: LoggedAt {
            seq: entry.seq,
            time_ms: entry.time_ms,
            checkpoint_size: checkpoint.size,
            cosigned_by: sites(checkpoint),
            latest_checkpoint_size: latest.size,
            latest_cosigned_by: sites(latest),
        },
        promotions,
        gate_overrides,
        current: current == Some(&m.model_sha256),
        installed_by,
        refused_by,
        privacy,
    })
}

/// Whether a label names a crisis class (suicidality, self-harm, acute crisis): these
/// come first in a card's recall table, the number a clinical reviewer looks at first.
pub fn is_crisis_label(label: &str) -> bool {
    let l = label.to_ascii_lowercase();
    ["crisis", "suicid", "self-harm", "selfharm", "self_harm"].iter().any(|k| l.contains(k))
}

/// Metrics of a confusion matrix (`rows[true][predicted]`) in card form, computed
/// as everywhere else in Maeum (`maeum_models::metrics::Confusion::metrics`: macro-F1
/// over the classes present in the truth). Computed here from the counts alone, so
/// that this crate (and the auditor) need not link the models.
pub fn evaluation(labels: &[String], rows: &[Vec<u64>], evaluated_by: u32) -> CardEvaluation {
    let m = ConfusionMetrics::of(rows);
    let mut recall: Vec<ClassRecall> = labels
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let support: u64 = rows.get(i).map_or(0, |r| r.iter().sum());
            ClassRecall {
                label: label.clone(),
                recall: (support > 0).then(|| m.per_class_recall.get(i).copied().unwrap_or(0.0)),
                crisis: is_crisis_label(label),
            }
        })
        .collect();
    // Crisis classes first, each group in label order (a stable sort).
    recall.sort_by_key(|c| !c.crisis);
    CardEvaluation {
        examples: m.n,
        evaluated_by,
        accuracy: m.accuracy,
        macro_f1: m.macro_f1,
        recall,
        confusion: rows.to_vec(),
    }
}

/// Accuracy, macro-F1 and per-class recall of a confusion matrix.
struct ConfusionMetrics {
    n: u64,
    accuracy: f64,
    macro_f1: f64,
    per_class_recall: Vec<f64>,
}

impl ConfusionMetrics {
    fn of(rows: &[Vec<u64>]) -> ConfusionMetrics {
        let k = rows.len();
        let cell = |i: usize, j: usize| rows.get(i).and_then(|r| r.get(j)).copied().unwrap_or(0);
        let n: u64 = rows.iter().flatten().sum();
        let correct: u64 = (0..k).map(|i| cell(i, i)).sum();
        let mut per_class_recall = Vec::with_capacity(k);
        let mut f1_present = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let tp = cell(i, i) as f64;
            let actual: u64 = row.iter().sum();
            let predicted: u64 = (0..k).map(|j| cell(j, i)).sum();
            let p = if predicted == 0 { 0.0 } else { tp / predicted as f64 };
            let r = if actual == 0 { 0.0 } else { tp / actual as f64 };
            per_class_recall.push(r);
            // Macro-F1 over the classes present in the truth.
            if actual > 0 {
                f1_present.push(if p + r == 0.0 { 0.0 } else { 2.0 * p * r / (p + r) });
            }
        }
        let macro_f1 =
            if f1_present.is_empty() { 0.0 } else { f1_present.iter().sum::<f64>() / f1_present.len() as f64 };
        let accuracy = if n == 0 { 0.0 } else { correct as f64 / n as f64 };
        ConfusionMetrics { n, accuracy, macro_f1, per_class_recall }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_metrics_known_answer() {
        // The same matrix and answers as maeum_models::metrics' known-answer test:
        // truth 0: 3 right, 1 as 1; truth 1: 2 right, 2 as 0.
        let m = ConfusionMetrics::of(&[vec![3, 1], vec![2, 2]]);
        assert_eq!(m.n, 8);
        assert!((m.accuracy - 5.0 / 8.0).abs() < 1e-12);
        assert!((m.per_class_recall[0] - 0.75).abs() < 1e-12);
        assert!((m.per_class_recall[1] - 0.5).abs() < 1e-12);
        let f0 = 2.0 * 0.6 * 0.75 / 1.35;
        let f1 = 2.0 * (2.0 / 3.0) * 0.5 / (2.0 / 3.0 + 0.5);
        assert!((m.macro_f1 - (f0 + f1) / 2.0).abs() < 1e-12);
        // A class absent from the truth does not count in macro-F1.
        let absent = ConfusionMetrics::of(&[vec![3, 1, 0], vec![2, 2, 0], vec![0, 0, 0]]);
        assert!((absent.macro_f1 - m.macro_f1).abs() < 1e-12);
    }

    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).expect("key")
    }

    fn public(k: &Ed25519KeyPair) -> [u8; 32] {
        use ring::signature::KeyPair;
        let mut out = [0u8; 32];
        out.copy_from_slice(k.public_key().as_ref());
        out
    }

    fn card() -> ModelCard {
        let labels = vec!["calm".to_string(), "suicidewatch".to_string()];
        ModelCard {
            format: CARD_FORMAT.into(),
            consortium: "c".into(),
            version: 2,
            parent_version: Some(1),
            model: CardModel {
                sha256: "ab".repeat(32),
                size: 10,
                layout_digest: "cd".repeat(32),
                kind: "text-classifier".into(),
                parameters: 3,
                labels: labels.clone(),
                encoder: None,
                adapter: None,
            },
            job: CardJob {
                id: "j-1".into(),
                name: "j".into(),
                spec_sha256: "ef".repeat(32),
                rounds: 1,
                config: serde_json::json!({"rounds": 1}),
            },
            round: 1,
            released_ms: 1,
            secure_aggregation: CardSecAgg { enabled: true, threshold: 0, neighbours: 0, clip: 5.0, max_weight: 100 },
            initial_evaluation: None,
            rounds: Vec::new(),
            evaluation: Some(evaluation(&labels, &[vec![8, 2], vec![1, 3]], 2)),
            crisis_flag: None,
            privacy: None,
        }
    }

    fn manifest(card: &[u8]) -> Manifest {
        Manifest {
            consortium: "c".into(),
            version: 2,
            model_sha256: "ab".repeat(32),
            model_size: 10,
            layout_digest: "cd".repeat(32),
            card_sha256: sha256_hex(card),
        }
    }

    #[test]
    fn selectors_tell_release_numbers_from_digest_prefixes() {
        assert_eq!(Selector::parse("3"), Ok(Selector::Version(3)));
        assert_eq!(Selector::parse(" V12 "), Ok(Selector::Version(12)));
        assert_eq!(Selector::parse("v95148370"), Ok(Selector::Version(95_148_370)));
        // An all-digit digest prefix is a digest, not release 95,148,370.
        assert_eq!(Selector::parse("95148370"), Ok(Selector::DigestPrefix("95148370".into())));
        assert_eq!(Selector::parse("ABCDEF0123"), Ok(Selector::DigestPrefix("abcdef0123".into())));
        for bad in ["", "v", "abc", "v3x", "ghijklmno", "v99999999999"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_signed_release_verifies_and_any_change_is_refused() {
        let k = key();
        let bytes = card().encode();
        let m = manifest(&bytes);
        let sig = m.sign(&k);
        m.verify(&public(&k), &sig).expect("verifies");
        check_card(&m, &bytes).expect("card matches");

        let mut bad = sig.clone();
        bad[5] ^= 1;
        assert_eq!(m.verify(&public(&k), &bad), Err(ReleaseError::Signature));
        let mut other = m.clone();
        other.version = 3;
        assert_eq!(other.verify(&public(&k), &sig), Err(ReleaseError::Signature));
        // A checkpoint-style signature over the bare JSON (no domain) does not pass.
        let bare = k.sign(&serde_json::to_vec(&m).expect("json"));
        assert_eq!(m.verify(&public(&k), bare.as_ref()), Err(ReleaseError::Signature));

        let mut tampered = bytes.clone();
        let at = tampered.len() / 2;
        tampered[at] ^= 0x20;
        assert!(matches!(check_card(&m, &tampered), Err(ReleaseError::CardDigest { .. })));
    }

    #[test]
    fn a_card_that_describes_another_release_is_refused_even_if_its_digest_is_signed() {
        let mut c = card();
        c.model.sha256 = "00".repeat(32);
        let bytes = c.encode();
        let m = manifest(&bytes);
        let err = check_card(&m, &bytes).expect_err("mismatch");
        assert!(err.to_string().contains("model digest"), "{err}");
    }

    #[test]
    fn a_crisis_threshold_or_privacy_claim_out_of_range_is_refused() {
        // A coordinator could otherwise switch the crisis flag off with a threshold
        // above 1 (no probability reaches it), on a card it signs.
        for t in [1.5, -0.1] {
            let mut c = card();
            c.crisis_flag = Some(CardCrisisFlag {
                classes: vec!["suicidewatch".into()],
                target_recall: 0.9,
                threshold: Some(t),
                recall: Some(0.9),
                precision: Some(0.3),
                examples: 10,
                crisis_examples: 2,
            });
            let bytes = c.encode();
            let err = check_card(&manifest(&bytes), &bytes).expect_err("out of range");
            assert_eq!(err.code(), "REL-6");
            assert!(err.to_string().contains("crisis_flag.threshold is"), "{err}");
        }
        let mut c = card();
        c.privacy = Some(CardPrivacy {
            mechanism: "dp-sgd-local".into(),
            clip: 1.0,
            noise_multiplier: 1.0,
            sampling: "poisson".into(),
            sample_rate: 0.05,
            steps_per_round: 20,
            rounds: 1,
            delta: 2.0,
            epsilon: 1.0,
            epsilon_per_site: Default::default(),
            noise_shares: None,
        });
        let bytes = c.encode();
        let err = check_card(&manifest(&bytes), &bytes).expect_err("δ = 2");
        assert!(err.to_string().contains("not a valid claim"), "{err}");
    }

    #[test]
    fn the_blob_and_the_log_entry_must_name_the_signed_digests() {
        let bytes = card().encode();
        let m = manifest(&bytes);
        assert!(m.check_blob(&[0; 32]).is_err());
        assert!(m.check_blob(&[0xab; 32]).is_ok());
        let entry = Event::ModelRelease {
            job_id: "j-1".into(),
            round: 1,
            version_sha256: m.model_sha256.clone(),
            card_sha256: m.card_sha256.clone(),
        };
        assert!(is_release_entry(&entry, &m));
        let other = Event::ModelRelease {
            job_id: "j-1".into(),
            round: 1,
            version_sha256: m.model_sha256.clone(),
            card_sha256: "0".repeat(64),
        };
        assert!(!is_release_entry(&other, &m));
    }

    #[test]
    fn card_metrics_put_the_crisis_class_first() {
        let labels = vec!["anxiety".to_string(), "depression".to_string(), "suicidewatch".to_string()];
        let e = evaluation(&labels, &[vec![5, 0, 0], vec![1, 3, 0], vec![0, 2, 2]], 3);
        assert_eq!(e.recall[0].label, "suicidewatch");
        assert!(e.recall[0].crisis);
        assert_eq!(e.recall[0].recall, Some(0.5));
        assert_eq!(e.recall[1].label, "anxiety");
        assert_eq!(e.examples, 13);
        assert!((e.accuracy - 10.0 / 13.0).abs() < 1e-12);
        let empty = evaluation(&labels, &[vec![0, 0, 0], vec![0, 0, 0], vec![0, 0, 0]], 0);
        assert_eq!(empty.recall[0].recall, None);
    }

    #[test]
    fn a_card_round_trips_and_junk_is_refused() {
        let bytes = card().encode();
        assert_eq!(ModelCard::decode(&bytes).expect("decodes"), card());
        assert!(matches!(ModelCard::decode(b"{"), Err(ReleaseError::CardMalformed(_))));
        let mut c = card();
        c.format = "other".into();
        assert!(ModelCard::decode(&c.encode()).is_err());
    }

    #[test]
    fn gates_refuse_a_low_crisis_recall_and_name_the_gate() {
        let mut c = card();
        // suicidewatch recall 3/4 = 0.75.
        assert_eq!(c.evaluation.as_ref().and_then(crisis_recall), Some(0.75));
        assert!(ReleaseGates::default().check(&c).is_empty(), "0.75 >= 0.5");
        let strict = ReleaseGates { min_crisis_recall: 0.8, min_macro_f1: Some(0.9) };
        let failures = strict.check(&c);
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert_eq!(failures[0].gate, "min_crisis_recall");
        assert_eq!(failures[0].measured, Some(0.75));
        let text = failures[0].to_string();
        assert!(text.contains("min_crisis_recall") && text.contains("0.7500") && text.contains("0.8000"), "{text}");
        assert!(text.contains("suicidewatch"), "{text}");
        assert_eq!(failures[1].gate, "min_macro_f1");
        // No evaluation: the gate cannot be shown to pass.
        c.evaluation = None;
        let f = ReleaseGates::default().check(&c);
        assert_eq!((f.len(), f[0].measured), (1, None));
        // No crisis class: the crisis gate does not apply.
        c.model.labels = vec!["calm".into(), "anxiety".into()];
        assert!(ReleaseGates::default().check(&c).is_empty());
        assert!(ReleaseGates { min_crisis_recall: 1.5, min_macro_f1: None }.validate().is_err());
        // Gates in consortium.json: defaults for what is absent.
        let g: ReleaseGates = serde_json::from_str(r#"{"min_macro_f1": 0.3}"#).expect("gates");
        assert_eq!(g, ReleaseGates { min_crisis_recall: 0.5, min_macro_f1: Some(0.3) });
    }

    #[test]
    fn cards_with_and_without_the_crisis_flag_parse() {
        // A card written before the field existed has no `crisis_flag` key.
        let old = card().encode();
        assert!(!String::from_utf8_lossy(&old).contains("crisis_flag"));
        assert_eq!(ModelCard::decode(&old).expect("old card").crisis_flag, None);
        // An operating point as `maeum_models::metrics::CrisisHistogram::choose_threshold` gives it.
        let h = CrisisMeasure { point: Some((0.4, 0.75, Some(0.75))), examples: 11, crisis_examples: 4 };
        let labels = card().model.labels;
        let flag = CardCrisisFlag::choose(&labels, Some(h), 0.75).expect("a crisis class");
        assert_eq!(flag.classes, vec!["suicidewatch".to_string()]);
        assert_eq!(flag.threshold, Some(0.4));
        assert_eq!((flag.recall, flag.precision), (Some(0.75), Some(0.75)));
        assert_eq!((flag.examples, flag.crisis_examples), (11, 4));
        let mut c = card();
        c.crisis_flag = Some(flag);
        let bytes = c.encode();
        assert_eq!(ModelCard::decode(&bytes).expect("new card"), c);
        // Without histograms: a flag without a threshold; without a crisis class: none.
        assert_eq!(CardCrisisFlag::choose(&labels, None, 0.9).expect("flag").threshold, None);
        assert_eq!(CardCrisisFlag::choose(&["a".into(), "b".into()], Some(h), 0.9), None);
    }
}
