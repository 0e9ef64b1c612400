//! Log entries and their canonical encoding.
//!
//! An entry is one JSON object, fields in a fixed order, no whitespace, version first:
//!
//! ```text
//! {"v":1,"seq":3,"time_ms":1764299521000,"event":{"kind":"site_revoked","site":"b","reason":"key lost"}}
//! ```
//!
//! The encoding is unique: [`Entry::decode`] refuses any bytes that differ from the
//! re-encoding of what they decode to (other key order, whitespace, escapes such as
//! `\u0041`, unknown fields, `1.0` for `1`), so every entry has exactly one leaf hash.
//!
//! # What entries may hold
//!
//! Entries are published to every auditor and kept forever. They carry identifiers
//! (site ids, job ids, operator names from certificates), digests, counts, states and
//! short reasons written by software — never key material, shares, seeds, model
//! weights, records or any personal data. Free-text reasons come from the agents and
//! the coordinator, not from data subjects; callers must keep them that way.

use serde::{Deserialize, Serialize};

use super::AuditError;
use super::merkle::{Hash, leaf_hash};

/// The version of the entry encoding this code writes and reads.
pub const ENTRY_VERSION: u32 = 1;

/// One log entry: the `seq`-th leaf of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, from 0.
    pub seq: u64,
    /// When the coordinator appended it, milliseconds since the Unix epoch (the
    /// coordinator's clock: a claim, not a proof).
    pub time_ms: i64,
    /// What happened.
    pub event: Event,
}

/// What an entry records. Tagged by `kind` in `snake_case`; the fields of each
/// variant are encoded in declaration order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// The first entry of every log: which consortium, its CA and the log's key.
    ConsortiumInit {
        /// The consortium name.
        consortium: String,
        /// SHA-256 (hex) of the consortium CA certificate (DER).
        ca_fingerprint: String,
        /// The log's Ed25519 public key (hex): it signs every checkpoint.
        log_key: String,
    },
    /// A site's certificate request was signed.
    SiteApproved {
        /// The site id.
        site: String,
        /// SHA-256 (hex) of the issued certificate (DER).
        cert_fingerprint: String,
        /// The certificate's `notAfter`, milliseconds since the Unix epoch.
        not_after_ms: i64,
    },
    /// A site's certificate was revoked.
    SiteRevoked {
        /// The site id.
        site: String,
        /// Why, as the operator gave it.
        reason: String,
    },
    /// An operator approved a new key for an existing site (`sites approve --replace`):
    /// the old certificate is revoked, the new one is the site's from this entry on.
    SiteKeyReplaced {
        /// The site id.
        site: String,
        /// SHA-256 (hex) of the replaced certificate (DER); revoked from here on.
        old_cert_fingerprint: String,
        /// SHA-256 (hex) of the new certificate (DER).
        new_cert_fingerprint: String,
        /// The new certificate's `notAfter`, milliseconds since the Unix epoch.
        not_after_ms: i64,
        /// Who approved the replacement.
        operator: String,
    },
    /// A lead submitted a job.
    JobSubmitted {
        /// The job id.
        job_id: String,
        /// The job's name from its file.
        name: String,
        /// SHA-256 (hex) of the job file as submitted.
        spec_sha256: String,
        /// Who submitted it (operator name from the certificate).
        operator: String,
    },
    /// A site accepted or refused a job.
    JobDecision {
        /// The job id.
        job_id: String,
        /// The site id.
        site: String,
        /// Whether the site takes part.
        accepted: bool,
        /// The site's reason.
        reason: String,
    },
    /// A job started: enough sites accepted, and this is the model its first round
    /// trains (so every model of the job traces back to a logged digest).
    JobStarted {
        /// The job id.
        job_id: String,
        /// SHA-256 (hex) of the initial model blob.
        initial_model: String,
        /// The sites that accepted.
        sites: Vec<String>,
    },
    /// A round attempt started with these sites.
    RoundStarted {
        /// The job id.
        job_id: String,
        /// The round number.
        round: u32,
        /// The attempt number (a round is retried after a failure).
        attempt: u32,
        /// The selected sites.
        sites: Vec<String>,
        /// Whether updates are combined by secure aggregation.
        secure_aggregation: bool,
    },
    /// The outcome of a secure-aggregation session.
    RoundSecagg {
        /// The job id.
        job_id: String,
        /// The round number.
        round: u32,
        /// The attempt number.
        attempt: u32,
        /// Sites whose masked inputs were summed.
        survivors: Vec<String>,
        /// Sites that dropped out.
        dropped: Vec<String>,
    },
    /// A round attempt failed.
    RoundFailed {
        /// The job id.
        job_id: String,
        /// The round number.
        round: u32,
        /// The attempt number.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// A site refused what the coordinator asked of it in a round attempt (a session,
    /// a survivor set, an unmask request) under its privacy policy, and said why.
    SiteRefused {
        /// The job id.
        job_id: String,
        /// The round number.
        round: u32,
        /// The attempt number.
        attempt: u32,
        /// The site id.
        site: String,
        /// The rule: a `[policy]` key of the site (`min_cohort`, …) or a protocol rule
        /// (`reveal_once`, `base_model`, …).
        rule: String,
        /// What the site said, as sent (at most 500 characters).
        detail: String,
    },
    /// A site charged its privacy ledger for a round of a differentially private job,
    /// before training (`docs/protocols/privacy.md`). Numbers are decimal strings (Rust's
    /// shortest round-trip form of an f64), so entries stay byte-exact.
    PrivacyCharged {
        /// The job id.
        job_id: String,
        /// The round number.
        round: u32,
        /// The site id.
        site: String,
        /// `dp-sgd-local`.
        mechanism: String,
        /// ε per record of the job at this site after this round.
        epsilon: String,
        /// δ of the guarantee.
        delta: String,
        /// Clipping norm C.
        clip: String,
        /// Noise multiplier σ.
        noise_multiplier: String,
        /// Poisson sampling rate q.
        sample_rate: String,
        /// DP-SGD steps of the job charged so far at this site.
        steps: u64,
    },
    /// A round's aggregate was applied to the model.
    RoundCommitted {
        /// The job id.
        job_id: String,
        /// The round number.
        round: u32,
        /// SHA-256 (hex) of the unmasked aggregate.
        aggregate_sha256: String,
        /// SHA-256 (hex) of the resulting model blob.
        model: String,
        /// The sites whose updates are in the aggregate.
        contributors: Vec<String>,
    },
    /// A model version was released from a job.
    ModelRelease {
        /// The job id.
        job_id: String,
        /// The round the model comes from.
        round: u32,
        /// SHA-256 (hex) of the released model.
        version_sha256: String,
        /// SHA-256 (hex) of its model card.
        card_sha256: String,
    },
    /// A released version was promoted (made the one sites install).
    ReleasePromoted {
        /// SHA-256 (hex) of the version.
        version_sha256: String,
        /// Who promoted it.
        operator: String,
    },
    /// A lead promoted a release that fails one of the consortium's release gates,
    /// with an explicit override and a reason (one entry per failed gate, just before
    /// the `release_promoted` entry it allows).
    ReleaseGateOverridden {
        /// SHA-256 (hex) of the release's model.
        version_sha256: String,
        /// The gate, e.g. `min_crisis_recall`.
        gate: String,
        /// The value on the model card, 4 decimals (`none` when the card has none).
        measured: String,
        /// The gate's threshold, 4 decimals.
        threshold: String,
        /// Who overrode it.
        operator: String,
        /// The lead's reason, as given.
        reason: String,
    },
    /// A site verified and installed a release, or refused it (and kept the model it
    /// had in service).
    ReleaseInstall {
        /// The site id.
        site: String,
        /// SHA-256 (hex) of the release's model.
        version_sha256: String,
        /// Whether the site installed it.
        installed: bool,
        /// Why the site refused it (empty when installed).
        reason: String,
    },
    /// An operator command and its result.
    OperatorCommand {
        /// Who ran it.
        operator: String,
        /// The command, e.g. `jobs abort j-3`.
        command: String,
        /// `ok` or the error shown to the operator.
        result: String,
    },
    /// The consortium's release key was rotated (`release-key rotate`): the handover,
    /// signed by the old and the new key (`maeum_tlog::handover`).
    ReleaseKeyRotated {
        /// Who rotated it (the operator certificate's name).
        operator: String,
        /// The release key handing over (hex).
        old_key: String,
        /// The release key taking over (hex).
        new_key: String,
        /// The old key's signature over the handover statement (hex).
        old_signature: String,
        /// The new key's signature over the same statement (hex).
        new_signature: String,
    },
    /// The log's signing key was rotated (`signing-key rotate`, applied when the
    /// coordinator starts): checkpoints of a size beyond this entry's seq are signed by
    /// the new key (`maeum_tlog::handover`, role `Log`).
    LogKeyRotated {
        /// Who asked for it (the operator on the coordinator's host).
        operator: String,
        /// The log key handing over (hex).
        old_key: String,
        /// The log key taking over (hex).
        new_key: String,
        /// The old key's signature over the handover statement (hex).
        old_signature: String,
        /// The new key's signature over the same statement (hex).
        new_signature: String,
    },
    /// The consortium CA rolled over to a successor (`ca rotate`, applied when the
    /// coordinator starts): the handover signed by both CA keys
    /// (`maeum_pki::rollover`). Certificates issued by the new CA are valid from here
    /// on; those of the old CA stay valid until they expire.
    CaRotated {
        /// Who asked for it (the operator on the coordinator's host).
        operator: String,
        /// SHA-256 of the CA certificate handing over (hex).
        old_ca: String,
        /// SHA-256 of the new CA certificate (hex).
        new_ca: String,
        /// The new CA certificate (PEM): auditors check certificates it issued with it.
        new_ca_pem: String,
        /// The old CA key's signature over the handover statement (hex).
        old_signature: String,
        /// The new CA key's signature over the same statement (hex).
        new_signature: String,
    },
    /// A job reached a final state.
    JobFinished {
        /// The job id.
        job_id: String,
        /// `completed`, `aborted` or `failed`.
        state: String,
    },
    /// The log signed a checkpoint at `size` leaves; recorded as the next entry, so
    /// every checkpoint but the latest is itself in the log (leaf `size`).
    Checkpoint {
        /// The checkpoint's tree size.
        size: u64,
        /// Its root (hex).
        root: String,
    },
}

impl Event {
    /// The `kind` tag, e.g. `round_started`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::ConsortiumInit { .. } => "consortium_init",
            Event::SiteApproved { .. } => "site_approved",
            Event::SiteRevoked { .. } => "site_revoked",
            Event::SiteKeyReplaced { .. } => "site_key_replaced",
            Event::JobSubmitted { .. } => "job_submitted",
            Event::JobDecision { .. } => "job_decision",
            Event::JobStarted { .. } => "job_started",
            Event::RoundStarted { .. } => "round_started",
            Event::RoundSecagg { .. } => "round_secagg",
            Event::RoundFailed { .. } => "round_failed",
            Event::SiteRefused { .. } => "site_refused",
            Event::PrivacyCharged { .. } => "privacy_charged",
            Event::RoundCommitted { .. } => "round_committed",
            Event::ModelRelease { .. } => "model_release",
            Event::ReleasePromoted { .. } => "release_promoted",
            Event::ReleaseGateOverridden { .. } => "release_gate_overridden",
            Event::ReleaseInstall { .. } => "release_install",
            Event::OperatorCommand { .. } => "operator_command",
            Event::ReleaseKeyRotated { .. } => "release_key_rotated",
            Event::LogKeyRotated { .. } => "log_key_rotated",
            Event::CaRotated { .. } => "ca_rotated",
            Event::JobFinished { .. } => "job_finished",
            Event::Checkpoint { .. } => "checkpoint",
        }
    }

    /// Every `kind` tag, for command-line filters.
    pub const KINDS: [&'static str; 23] = [
        "consortium_init",
        "site_approved",
        "site_revoked",
        "site_key_replaced",
        "job_submitted",
        "job_decision",
        "job_started",
        "round_started",
        "round_secagg",
        "round_failed",
        "site_refused",
        "privacy_charged",
        "round_committed",
        "model_release",
        "release_promoted",
        "release_gate_overridden",
        "release_install",
        "operator_command",
        "release_key_rotated",
        "log_key_rotated",
        "ca_rotated",
        "job_finished",
        "checkpoint",
    ];

    /// The job this event is about, if any.
    pub fn job(&self) -> Option<&str> {
        match self {
            Event::JobSubmitted { job_id, .. }
            | Event::JobDecision { job_id, .. }
            | Event::JobStarted { job_id, .. }
            | Event::RoundStarted { job_id, .. }
            | Event::RoundSecagg { job_id, .. }
            | Event::RoundFailed { job_id, .. }
            | Event::SiteRefused { job_id, .. }
            | Event::PrivacyCharged { job_id, .. }
            | Event::RoundCommitted { job_id, .. }
            | Event::ModelRelease { job_id, .. }
            | Event::JobFinished { job_id, .. } => Some(job_id),
            _ => None,
        }
    }

    /// Whether this event names `site` (as the subject, a participant, a survivor, a
    /// dropout or a contributor).
    pub fn involves_site(&self, site: &str) -> bool {
        let any = |list: &[String]| list.iter().any(|s| s == site);
        match self {
            Event::SiteApproved { site: s, .. }
            | Event::SiteRevoked { site: s, .. }
            | Event::SiteKeyReplaced { site: s, .. }
            | Event::JobDecision { site: s, .. }
            | Event::SiteRefused { site: s, .. }
            | Event::PrivacyCharged { site: s, .. }
            | Event::ReleaseInstall { site: s, .. } => s == site,
            Event::JobStarted { sites, .. } | Event::RoundStarted { sites, .. } => any(sites),
            Event::RoundSecagg { survivors, dropped, .. } => any(survivors) || any(dropped),
            Event::RoundCommitted { contributors, .. } => any(contributors),
            _ => false,
        }
    }

    /// The model blob (SHA-256, hex) this event brings into being, if any: a job's
    /// initial model, a round's result, a release.
    pub fn model(&self) -> Option<&str> {
        match self {
            Event::JobStarted { initial_model: m, .. }
            | Event::RoundCommitted { model: m, .. }
            | Event::ModelRelease { version_sha256: m, .. } => Some(m),
            _ => None,
        }
    }
}

/// The wire form, fields in encoding order.
#[derive(Serialize)]
struct WireRef<'a> {
    v: u32,
    seq: u64,
    time_ms: i64,
    event: &'a Event,
}

#[derive(Deserialize)]
struct Wire {
    v: u32,
    seq: u64,
    time_ms: i64,
    event: Event,
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireRef { v: ENTRY_VERSION, seq: self.seq, time_ms: self.time_ms, event: &self.event }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        let wire = Wire::deserialize(d)?;
        if wire.v != ENTRY_VERSION {
            return Err(serde::de::Error::custom(format!(
                "entry encoding version {} is not supported (expected {ENTRY_VERSION})",
                wire.v
            )));
        }
        Ok(Entry { seq: wire.seq, time_ms: wire.time_ms, event: wire.event })
    }
}

impl Entry {
    /// The canonical encoding: the bytes whose leaf hash is this entry's.
    pub fn encode(&self) -> Vec<u8> {
        // INVARIANT: the entry is plain strings, integers, booleans and lists, which
        // serde_json always serialises.
        serde_json::to_vec(self).expect("an entry always serialises")
    }

    /// Decodes canonical bytes; refuses anything else (see the module docs).
    pub fn decode(bytes: &[u8]) -> Result<Entry, AuditError> {
        let entry: Entry = serde_json::from_slice(bytes)
            .map_err(|e| AuditError::Malformed { what: "entry".into(), reason: e.to_string() })?;
        super::check_canonical("entry", bytes, &entry.encode())?;
        Ok(entry)
    }

    /// `SHA-256(0x00 || encode())`: this entry's leaf in the tree.
    pub fn leaf_hash(&self) -> Hash {
        leaf_hash(&self.encode())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::hex;

    fn entry(seq: u64, event: Event) -> Entry {
        Entry { seq, time_ms: 1_764_299_521_000 + seq as i64, event }
    }

    /// Storage stability: these bytes and leaf hashes are what the log holds on disk and
    /// in exports. A change here breaks every existing log: add a version instead.
    #[test]
    fn encoding_is_stable() {
        let cases = [
            (
                entry(
                    0,
                    Event::ConsortiumInit {
                        consortium: "heart".into(),
                        ca_fingerprint: "ab".repeat(32),
                        log_key: "cd".repeat(32),
                    },
                ),
                concat!(
                    r#"{"v":1,"seq":0,"time_ms":1764299521000,"event":{"kind":"consortium_init","consortium":"heart","#,
                    r#""ca_fingerprint":"abababababababababababababababababababababababababababababababab","#,
                    r#""log_key":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"}}"#
                ),
                "f2af2342be344d445fa391e42ee12ded3b7ec831e88af59649a7218a06ce9cb3",
            ),
            (
                entry(
                    1,
                    Event::RoundStarted {
                        job_id: "j-1".into(),
                        round: 2,
                        attempt: 1,
                        sites: vec!["a".into(), "b".into()],
                        secure_aggregation: true,
                    },
                ),
                concat!(
                    r#"{"v":1,"seq":1,"time_ms":1764299521001,"event":{"kind":"round_started","job_id":"j-1","#,
                    r#""round":2,"attempt":1,"sites":["a","b"],"secure_aggregation":true}}"#
                ),
                "701a27ad1c922d31de1abeb61e0fbd25fc04e70ac53497233aef9ec67cbb2591",
            ),
            (
                entry(
                    2,
                    Event::JobDecision {
                        job_id: "j-1".into(),
                        site: "b".into(),
                        accepted: false,
                        reason: "label \"x\" missing — ünïcode".into(),
                    },
                ),
                concat!(
                    r#"{"v":1,"seq":2,"time_ms":1764299521002,"event":{"kind":"job_decision","job_id":"j-1","#,
                    r#""site":"b","accepted":false,"reason":"label \"x\" missing — ünïcode"}}"#
                ),
                "4eda28db28a2189973cf0fe21db6a0dbe7f215ddf023e309b9ddc943c8d5b9c2",
            ),
            (
                entry(3, Event::Checkpoint { size: 3, root: "00".repeat(32) }),
                concat!(
                    r#"{"v":1,"seq":3,"time_ms":1764299521003,"event":{"kind":"checkpoint","size":3,"#,
                    r#""root":"0000000000000000000000000000000000000000000000000000000000000000"}}"#
                ),
                "c9bfa60b8cc51b2a03498c22a1657919250d9325a7241769176080d1cfc5ba73",
            ),
            (
                entry(
                    4,
                    Event::JobStarted {
                        job_id: "j-1".into(),
                        initial_model: "ef".repeat(32),
                        sites: vec!["a".into(), "b".into()],
                    },
                ),
                concat!(
                    r#"{"v":1,"seq":4,"time_ms":1764299521004,"event":{"kind":"job_started","job_id":"j-1","#,
                    r#""initial_model":"efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef","#,
                    r#""sites":["a","b"]}}"#
                ),
                "e682895630845c661bb541502632fba7550598d5a643b9011217515c10bb9b02",
            ),
            (
                entry(
                    5,
                    Event::ReleaseInstall {
                        site: "b".into(),
                        version_sha256: "ab".repeat(32),
                        installed: false,
                        reason: "the release signature does not verify".into(),
                    },
                ),
                concat!(
                    r#"{"v":1,"seq":5,"time_ms":1764299521005,"event":{"kind":"release_install","site":"b","#,
                    r#""version_sha256":"abababababababababababababababababababababababababababababababab","#,
                    r#""installed":false,"reason":"the release signature does not verify"}}"#
                ),
                "e91ff2066c894e96d722356a7d74aeab7f4c3fc7a371077f7350066c0bfd92a4",
            ),
            (
                entry(
                    6,
                    Event::SiteKeyReplaced {
                        site: "b".into(),
                        old_cert_fingerprint: "ab".repeat(32),
                        new_cert_fingerprint: "cd".repeat(32),
                        not_after_ms: 1_798_499_521_000,
                        operator: "lead".into(),
                    },
                ),
                concat!(
                    r#"{"v":1,"seq":6,"time_ms":1764299521006,"event":{"kind":"site_key_replaced","site":"b","#,
                    r#""old_cert_fingerprint":"abababababababababababababababababababababababababababababababab","#,
                    r#""new_cert_fingerprint":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","#,
                    r#""not_after_ms":1798499521000,"operator":"lead"}}"#
                ),
                "8b5476afbc232917408171866c4a2a342da145e9fe573850c753149a9fb559fa",
            ),
            (
                entry(
                    7,
                    Event::ReleaseGateOverridden {
                        version_sha256: "ab".repeat(32),
                        gate: "min_crisis_recall".into(),
                        measured: "0.2700".into(),
                        threshold: "0.5000".into(),
                        operator: "lead".into(),
                        reason: "pilot at one site, every case reviewed".into(),
                    },
                ),
                concat!(
                    r#"{"v":1,"seq":7,"time_ms":1764299521007,"event":{"kind":"release_gate_overridden","#,
                    r#""version_sha256":"abababababababababababababababababababababababababababababababab","#,
                    r#""gate":"min_crisis_recall","measured":"0.2700","threshold":"0.5000","operator":"lead","#,
                    r#""reason":"pilot at one site, every case reviewed"}}"#
                ),
                "08b0ab19f2bc8c2d1ba2c0b8470709228ed607adbee00431aefb7cb276f4e2dd",
            ),
        ];
        let vectors: Vec<serde_json::Value> = serde_json::from_str(VECTORS).unwrap();
        assert_eq!(vectors.len(), cases.len());
        for ((entry, bytes, leaf), vector) in cases.iter().zip(&vectors) {
            assert_eq!(String::from_utf8(entry.encode()).unwrap(), *bytes);
            assert_eq!(&Entry::decode(bytes.as_bytes()).unwrap(), entry);
            assert_eq!(hex(&entry.leaf_hash()), *leaf);
            assert_eq!(vector["entry"], *bytes, "test-vectors file agrees");
            assert_eq!(vector["leaf_hash"], *leaf, "test-vectors file agrees");
        }
    }

    /// The same vectors as a file for other implementations (and the docs).
    const VECTORS: &str = include_str!("../../test-vectors/audit-entries.json");

    fn refused(bytes: &str) -> String {
        Entry::decode(bytes.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn non_canonical_encodings_are_refused() {
        let good = r#"{"v":1,"seq":7,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-1","state":"completed"}}"#;
        Entry::decode(good.as_bytes()).unwrap();
        for (bad, why) in [
            (
                r#"{"v":1, "seq":7,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-1","state":"completed"}}"#,
                "canonical",
            ),
            (
                r#"{"seq":7,"v":1,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-1","state":"completed"}}"#,
                "canonical",
            ),
            (
                r#"{"v":1,"seq":7,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-\u0031","state":"completed"}}"#,
                "canonical",
            ),
            (
                r#"{"v":1,"seq":7,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-1","state":"completed","x":1}}"#,
                "canonical",
            ),
            (
                r#"{"v":1,"seq":7,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-1","state":"completed"}} "#,
                "canonical",
            ),
            (
                r#"{"v":2,"seq":7,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-1","state":"completed"}}"#,
                "version 2",
            ),
            (
                r#"{"v":1,"seq":7.0,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-1","state":"completed"}}"#,
                "invalid type",
            ),
            (r#"{"v":1,"seq":7,"time_ms":5,"event":{"kind":"job_exploded","job_id":"j-1"}}"#, "unknown variant"),
            (r#"{"v":1,"seq":7,"time_ms":5,"event":{"kind":"job_finished","job_id":"j-1"}}"#, "missing field"),
        ] {
            let e = refused(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
