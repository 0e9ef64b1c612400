//! The wire boundary: the only module that names generated prost/tonic types.
//!
//! Generated code lives in [`pb`]; everything else in Maeum uses the domain types here,
//! converted with `TryFrom` so that a malformed message from a peer becomes a
//! [`WireError`] (and then an `InvalidArgument` status) at the edge, never a panic or a
//! half-checked value deeper in.

use std::fmt;

use maeum_models::metrics::{CrisisHistogram, HISTOGRAM_BINS};
use ring::digest::{SHA256, digest};

pub mod audit;
pub mod release;
pub mod secagg;

/// Generated code for package `maeum.v1` (`proto/maeum/v1/*.proto`).
#[allow(clippy::all, missing_debug_implementations, missing_docs)]
pub mod pb {
    tonic::include_proto!("maeum.v1");
}

/// Bytes per transfer chunk. Far below tonic's 4 MiB message limit, so any object size
/// moves as a stream of chunks.
pub const CHUNK_SIZE: usize = 1 << 20;

/// The HTTP/2 frame size a receiver of chunks allows (SETTINGS_MAX_FRAME_SIZE): a chunk
/// crosses in two frames, not 64 of the default 16 KiB, each of which costs the sender
/// a wake-up and a flush (docs/benchmarks.md "Transfer throughput").
pub const H2_MAX_FRAME: u32 = 1 << 20;
/// A site's HTTP/2 receive window per stream: eight chunks in flight on a download.
pub const H2_SITE_STREAM_WINDOW: u32 = 8 << 20;
/// A site's receive window for its one connection.
pub const H2_SITE_CONNECTION_WINDOW: u32 = 16 << 20;
/// The coordinator's receive window per stream (uploads): two chunks in flight. Kept
/// small: it bounds what N sites uploading at once may leave unread in its memory
/// (N × [`H2_COORDINATOR_CONNECTION_WINDOW`] at worst).
pub const H2_COORDINATOR_STREAM_WINDOW: u32 = 2 << 20;
/// The coordinator's receive window per connection (one a site).
pub const H2_COORDINATOR_CONNECTION_WINDOW: u32 = 4 << 20;

/// The `SiteStatus.stage` of a connectivity probe (`maeum-site doctor`): the
/// coordinator checks the certificate and answers, but does not count the site online.
pub const PROBE_STAGE: &str = "doctor";

/// The stages a site agent reports in `SiteStatus.stage`, by their first word (the rest
/// of the text is detail: `secagg: share keys`, `waiting for the admin: job …`).
pub const STAGES: [&str; 9] =
    ["idle", "waiting", "downloading", "embedding", "evaluating", "training", "uploading", "secagg", "stopped"];

/// The stage a `SiteStatus.stage` text names, as one of [`STAGES`] (or `other`): a
/// bounded label for metrics, whatever a site sends.
pub fn stage_label(stage: &str) -> &'static str {
    let first = stage.split([' ', ':']).next().unwrap_or_default();
    STAGES.iter().find(|s| **s == first).copied().unwrap_or("other")
}

/// Largest parameter vector a job may exchange (2^31 f32 = 8 GiB).
pub const MAX_PARAMS: u64 = 1 << 31;

/// Largest label set in a confusion matrix.
pub const MAX_LABELS: u32 = 1000;

/// A malformed or inconsistent message. Messages name the field, never its content when
/// the content could be sensitive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("{field}: missing")]
    Missing { field: &'static str },
    #[error("{field}: {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error("chunk at offset {offset}: SHA-256 does not match its data")]
    ChunkDigest { offset: u64 },
    #[error("chunk at offset {offset}: expected offset {expected}")]
    ChunkOffset { offset: u64, expected: u64 },
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> WireError {
    WireError::Invalid { field, problem: problem.into() }
}

/// A SHA-256 digest (of a blob, a payload, a layout or a chunk).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, bytes).as_ref());
        Self(out)
    }

    /// Parses 64 lowercase or uppercase hex digits.
    pub fn parse(field: &'static str, hex: &str) -> Result<Self, WireError> {
        if hex.is_empty() {
            return Err(WireError::Missing { field });
        }
        if hex.len() != 64 {
            return Err(invalid(field, format!("expected 64 hex digits, got {}", hex.len())));
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| invalid(field, "not hex"))?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| invalid(field, "not hex"))?;
        }
        Ok(Self(out))
    }

    pub fn hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_string()[..12])
    }
}

/// Streaming SHA-256 for whole objects moved in chunks.
pub struct Hasher(ring::digest::Context);

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self(ring::digest::Context::new(&SHA256))
    }
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        Digest(out)
    }

    /// SHA-256 of a file, read in [`CHUNK_SIZE`] pieces (memory bounded, any size).
    pub fn file(path: &std::path::Path) -> std::io::Result<Digest> {
        let mut hasher = Hasher::default();
        let mut file = std::fs::File::open(path)?;
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf)?;
            if n == 0 {
                return Ok(hasher.finish());
            }
            hasher.update(&buf[..n]);
        }
    }
}

/// A content-addressed model blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub digest: Digest,
    pub size: u64,
    pub layout_digest: Digest,
}

impl TryFrom<pb::ModelRef> for ModelRef {
    type Error = WireError;
    fn try_from(m: pb::ModelRef) -> Result<Self, WireError> {
        Ok(Self {
            digest: Digest::parse("model.digest", &m.digest)?,
            size: m.size,
            layout_digest: Digest::parse("model.layout_digest", &m.layout_digest)?,
        })
    }
}

impl From<&ModelRef> for pb::ModelRef {
    fn from(m: &ModelRef) -> Self {
        Self { digest: m.digest.hex(), size: m.size, layout_digest: m.layout_digest.hex() }
    }
}

/// Confusion-matrix counts, `counts[truth * n_labels + predicted]`: the only form in which
/// evaluation results leave a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionCounts {
    pub n_labels: u32,
    pub counts: Vec<u64>,
}

impl ConfusionCounts {
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts.chunks(self.n_labels.max(1) as usize).map(<[u64]>::to_vec).collect()
    }

    pub fn from_rows(rows: &[Vec<u64>]) -> Self {
        Self { n_labels: rows.len() as u32, counts: rows.iter().flatten().copied().collect() }
    }
}

impl TryFrom<pb::Confusion> for ConfusionCounts {
    type Error = WireError;
    fn try_from(c: pb::Confusion) -> Result<Self, WireError> {
        if c.n_labels < 2 || c.n_labels > MAX_LABELS {
            return Err(invalid("confusion.n_labels", format!("must be in 2..={MAX_LABELS}, got {}", c.n_labels)));
        }
        let want = (c.n_labels as usize).pow(2);
        if c.counts.len() != want {
            return Err(invalid("confusion.counts", format!("expected {want} counts, got {}", c.counts.len())));
        }
        Ok(Self { n_labels: c.n_labels, counts: c.counts })
    }
}

impl From<&ConfusionCounts> for pb::Confusion {
    fn from(c: &ConfusionCounts) -> Self {
        Self { n_labels: c.n_labels, counts: c.counts.clone() }
    }
}

/// A site's federated evaluation of a model: confusion counts and, when the job has a
/// crisis class, the crisis-probability histograms (aggregates only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvaluationReport {
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    pub model_digest: Digest,
    pub confusion: ConfusionCounts,
    pub crisis_histogram: Option<CrisisHistogram>,
}

impl TryFrom<pb::EvaluationReport> for EvaluationReport {
    type Error = WireError;
    fn try_from(r: pb::EvaluationReport) -> Result<Self, WireError> {
        let confusion = ConfusionCounts::try_from(r.confusion.ok_or(WireError::Missing { field: "confusion" })?)?;
        let crisis_histogram = r
            .crisis_histogram
            .map(|h| {
                for (field, bins) in [("crisis_histogram.crisis", &h.crisis), ("crisis_histogram.other", &h.other)] {
                    if bins.len() != HISTOGRAM_BINS {
                        return Err(invalid(field, format!("expected {HISTOGRAM_BINS} bins, got {}", bins.len())));
                    }
                }
                let sum = |v: &[u64]| v.iter().try_fold(0u64, |a, b| a.checked_add(*b));
                let total = sum(&h.crisis)
                    .zip(sum(&h.other))
                    .and_then(|(a, b)| a.checked_add(b))
                    .ok_or_else(|| invalid("crisis_histogram", "the counts overflow"))?;
                let examples =
                    sum(&confusion.counts).ok_or_else(|| invalid("confusion.counts", "the counts overflow"))?;
                if total != examples {
                    return Err(invalid(
                        "crisis_histogram",
                        format!("counts {total} examples, the confusion matrix {examples}"),
                    ));
                }
                Ok(CrisisHistogram { crisis: h.crisis, other: h.other })
            })
            .transpose()?;
        Ok(Self {
            job_id: r.job_id,
            round: r.round,
            attempt: r.attempt,
            model_digest: Digest::parse("model_digest", &r.model_digest)?,
            confusion,
            crisis_histogram,
        })
    }
}

impl From<&EvaluationReport> for pb::EvaluationReport {
    fn from(r: &EvaluationReport) -> Self {
        Self {
            job_id: r.job_id.clone(),
            round: r.round,
            attempt: r.attempt,
            model_digest: r.model_digest.hex(),
            confusion: Some((&r.confusion).into()),
            crisis_histogram: r
                .crisis_histogram
                .as_ref()
                .map(|h| pb::CrisisHistogram { crisis: h.crisis.clone(), other: h.other.clone() }),
        }
    }
}

/// A round's training assignment for one site.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTask {
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    pub model: ModelRef,
    pub deadline_ms: i64,
    pub evaluate_first: bool,
    /// The secure-aggregation session; `None` only for a job that set
    /// `insecure_plaintext_aggregation_for_debugging`.
    pub secagg: Option<secagg::SessionInfo>,
    /// A secure job's final evaluation: evaluate, do not train.
    pub evaluate_only: bool,
}

impl TrainTask {
    /// The header of this task's update: a plaintext update of `num_params` values with
    /// `weight`, or a masked input (`weight` 0, the weight travels inside).
    pub fn upload_header(&self, num_params: u64, weight: u64, sha256: Digest, masked: bool) -> UploadHeader {
        UploadHeader {
            job_id: self.job_id.clone(),
            round: self.round,
            attempt: self.attempt,
            base_digest: self.model.digest,
            layout_digest: self.model.layout_digest,
            num_params,
            weight,
            sha256,
            masked,
        }
    }
}

/// A final evaluation assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvaluateTask {
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    pub model: ModelRef,
    pub deadline_ms: i64,
}

/// The rules a site may name when it refuses something (`ReportRefusal`): the keys of
/// its `[policy]` table and the protocol rules every site enforces. Anything else is
/// counted as `other`.
pub const REFUSAL_RULES: [&str; 20] = [
    // Not a refusal: the site failed its work item (disk full, a crash in training);
    // the detail says what, and the coordinator drops it from the attempt at once.
    "local_failure",
    "allow_plaintext",
    "min_cohort",
    "min_threshold",
    "members",
    "allowed_models",
    "max_params",
    "max_rounds",
    "allowed_strategies",
    "spec_hash",
    "reveal_once",
    "base_model",
    "roster",
    "session",
    "halted",
    "share_auth",
    "privacy.allow_non_dp",
    "privacy.max_epsilon",
    "privacy.max_delta",
    "privacy.budget",
];

/// What [`pb::fleet_client::FleetClient::poll`] hands a site.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    Idle {
        retry_after_ms: u32,
    },
    /// `spec_toml` is the job file as submitted; `spec_sha256` its hash (as logged).
    Offer {
        job_id: String,
        spec_json: String,
        spec_sha256: Digest,
        spec_toml: String,
    },
    Train(TrainTask),
    Evaluate(EvaluateTask),
}

/// Checks a job id from the network ([a-z0-9-], 1–64 characters).
pub fn job_id(field: &'static str, id: String) -> Result<String, WireError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(id) } else { Err(invalid(field, "not a job id ([a-z0-9-], 1–64 chars)")) }
}

impl TryFrom<pb::Work> for Work {
    type Error = WireError;
    fn try_from(w: pb::Work) -> Result<Self, WireError> {
        use pb::work::Kind;
        Ok(match w.kind.ok_or(WireError::Missing { field: "work.kind" })? {
            Kind::Idle(i) => Work::Idle { retry_after_ms: i.retry_after_ms },
            Kind::Offer(o) => Work::Offer {
                job_id: job_id("offer.job_id", o.job_id)?,
                spec_json: o.spec_json,
                spec_sha256: Digest::parse("offer.spec_sha256", &o.spec_sha256)?,
                spec_toml: o.spec_toml,
            },
            Kind::Train(t) => Work::Train(TrainTask {
                job_id: job_id("train.job_id", t.job_id)?,
                round: t.round,
                attempt: t.attempt,
                model: t.model.ok_or(WireError::Missing { field: "train.model" })?.try_into()?,
                deadline_ms: t.deadline_ms,
                evaluate_first: t.evaluate_first,
                secagg: t.secagg.map(secagg::SessionInfo::try_from).transpose()?,
                evaluate_only: t.evaluate_only,
            }),
            Kind::Evaluate(t) => Work::Evaluate(EvaluateTask {
                job_id: job_id("evaluate.job_id", t.job_id)?,
                round: t.round,
                attempt: t.attempt,
                model: t.model.ok_or(WireError::Missing { field: "evaluate.model" })?.try_into()?,
                deadline_ms: t.deadline_ms,
            }),
        })
    }
}

impl From<&Work> for pb::Work {
    fn from(w: &Work) -> Self {
        use pb::work::Kind;
        let kind = match w {
            Work::Idle { retry_after_ms } => Kind::Idle(pb::Idle { retry_after_ms: *retry_after_ms }),
            Work::Offer { job_id, spec_json, spec_sha256, spec_toml } => Kind::Offer(pb::JobOffer {
                job_id: job_id.clone(),
                spec_json: spec_json.clone(),
                spec_sha256: spec_sha256.hex(),
                spec_toml: spec_toml.clone(),
            }),
            Work::Train(t) => Kind::Train(pb::TrainTask {
                job_id: t.job_id.clone(),
                round: t.round,
                attempt: t.attempt,
                model: Some((&t.model).into()),
                deadline_ms: t.deadline_ms,
                evaluate_first: t.evaluate_first,
                secagg: t.secagg.as_ref().map(Into::into),
                evaluate_only: t.evaluate_only,
            }),
            Work::Evaluate(t) => Kind::Evaluate(pb::EvaluateTask {
                job_id: t.job_id.clone(),
                round: t.round,
                attempt: t.attempt,
                model: Some((&t.model).into()),
                deadline_ms: t.deadline_ms,
            }),
        };
        pb::Work { kind: Some(kind) }
    }
}

/// Announces one site's update for one round attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadHeader {
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    pub base_digest: Digest,
    pub layout_digest: Digest,
    pub num_params: u64,
    /// The aggregation weight of a plaintext update; 0 for a masked input.
    pub weight: u64,
    pub sha256: Digest,
    /// A secure-aggregation masked input (`num_params + 1` u32 words) rather than a
    /// plaintext update (`num_params` f32 values).
    pub masked: bool,
}

impl UploadHeader {
    /// Words in the payload: the parameters, plus the weight word of a masked input.
    pub fn words(&self) -> u64 {
        self.num_params + u64::from(self.masked)
    }

    /// Payload bytes: four per word (little-endian f32 or u32).
    pub fn payload_len(&self) -> u64 {
        self.words() * 4
    }
}

impl TryFrom<pb::UploadHeader> for UploadHeader {
    type Error = WireError;
    fn try_from(h: pb::UploadHeader) -> Result<Self, WireError> {
        if h.num_params == 0 || h.num_params > MAX_PARAMS {
            return Err(invalid("upload.num_params", format!("must be in 1..={MAX_PARAMS}, got {}", h.num_params)));
        }
        if h.masked && h.weight != 0 {
            return Err(invalid("upload.weight", "must be 0 for a masked input (the weight is inside, masked)"));
        }
        if !h.masked && h.weight == 0 {
            return Err(invalid("upload.weight", "must be positive"));
        }
        Ok(Self {
            job_id: job_id("upload.job_id", h.job_id)?,
            round: h.round,
            attempt: h.attempt,
            base_digest: Digest::parse("upload.base_digest", &h.base_digest)?,
            layout_digest: Digest::parse("upload.layout_digest", &h.layout_digest)?,
            num_params: h.num_params,
            weight: h.weight,
            sha256: Digest::parse("upload.sha256", &h.sha256)?,
            masked: h.masked,
        })
    }
}

impl From<&UploadHeader> for pb::UploadHeader {
    fn from(h: &UploadHeader) -> Self {
        Self {
            job_id: h.job_id.clone(),
            round: h.round,
            attempt: h.attempt,
            base_digest: h.base_digest.hex(),
            layout_digest: h.layout_digest.hex(),
            num_params: h.num_params,
            weight: h.weight,
            sha256: h.sha256.hex(),
            masked: h.masked,
        }
    }
}

/// Builds a chunk message for `data` at `offset`.
pub fn chunk(offset: u64, data: Vec<u8>) -> pb::Chunk {
    let sha256 = Digest::of(&data).hex();
    pb::Chunk { offset, data: data.into(), sha256 }
}

/// Checks a received chunk: it starts where the previous one ended, fits in `total`
/// bytes, and its data matches its digest.
pub fn check_chunk(expected_offset: u64, total: u64, offset: u64, data: &[u8], sha256: &str) -> Result<(), WireError> {
    if offset != expected_offset {
        return Err(WireError::ChunkOffset { offset, expected: expected_offset });
    }
    if data.is_empty() || data.len() > 2 * CHUNK_SIZE {
        return Err(invalid("chunk.data", format!("length {} outside 1..={}", data.len(), 2 * CHUNK_SIZE)));
    }
    if offset + data.len() as u64 > total {
        return Err(invalid(
            "chunk.data",
            format!("ends at {} past the object's {total} bytes", offset + data.len() as u64),
        ));
    }
    if Digest::parse("chunk.sha256", sha256)? != Digest::of(data) {
        return Err(WireError::ChunkDigest { offset });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_stage_maps_onto_a_fixed_label() {
        for (stage, label) in [
            ("idle", "idle"),
            ("secagg: share keys", "secagg"),
            ("waiting for the admin: job j-1 (`maeum-site jobs show j-1`)", "waiting"),
            ("embedding local records", "embedding"),
            ("stopped: coordinator's audit log forked", "stopped"),
            ("anything a site invents", "other"),
            ("", "other"),
        ] {
            assert_eq!(stage_label(stage), label, "{stage:?}");
        }
    }

    #[test]
    fn digest_hex_round_trip_and_known_answer() {
        let d = Digest::of(b"abc");
        assert_eq!(d.hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Digest::parse("x", &d.hex()), Ok(d));
        assert_eq!(Digest::parse("x", &d.hex().to_uppercase()), Ok(d));
        assert!(matches!(Digest::parse("x", "ab"), Err(WireError::Invalid { field: "x", .. })));
        assert!(matches!(Digest::parse("x", &"g".repeat(64)), Err(WireError::Invalid { .. })));
        assert_eq!(Digest::parse("x", ""), Err(WireError::Missing { field: "x" }));
    }

    fn model() -> ModelRef {
        ModelRef { digest: Digest::of(b"m"), size: 9, layout_digest: Digest::of(b"l") }
    }

    #[test]
    fn work_round_trips() {
        let cases = [
            Work::Idle { retry_after_ms: 5 },
            Work::Offer {
                job_id: "job-1".into(),
                spec_json: "{}".into(),
                spec_sha256: Digest::of(b"t"),
                spec_toml: "name = \"t\"".into(),
            },
            Work::Train(TrainTask {
                job_id: "job-1".into(),
                round: 3,
                attempt: 1,
                model: model(),
                deadline_ms: 99,
                evaluate_first: true,
                secagg: None,
                evaluate_only: true,
            }),
            Work::Evaluate(EvaluateTask { job_id: "j".into(), round: 4, attempt: 0, model: model(), deadline_ms: 1 }),
        ];
        for w in cases {
            assert_eq!(Work::try_from(pb::Work::from(&w)), Ok(w));
        }
    }

    #[test]
    fn malformed_work_is_refused_with_the_field() {
        let check = |w: pb::Work, field: &str| {
            let e = Work::try_from(w).expect_err("must fail");
            assert!(e.to_string().starts_with(field), "{e}");
        };
        check(pb::Work { kind: None }, "work.kind");
        let mut t = pb::Work::from(&Work::Train(TrainTask {
            job_id: "j".into(),
            round: 1,
            attempt: 0,
            model: model(),
            deadline_ms: 0,
            evaluate_first: false,
            secagg: None,
            evaluate_only: false,
        }));
        if let Some(pb::work::Kind::Train(t)) = &mut t.kind {
            t.job_id = "../etc".into();
        }
        check(t, "train.job_id");
    }

    #[test]
    fn upload_header_checks() {
        let h = UploadHeader {
            job_id: "j".into(),
            round: 1,
            attempt: 0,
            base_digest: Digest::of(b"a"),
            layout_digest: Digest::of(b"b"),
            num_params: 10,
            weight: 3,
            sha256: Digest::of(b"c"),
            masked: false,
        };
        assert_eq!(UploadHeader::try_from(pb::UploadHeader::from(&h)), Ok(h.clone()));
        assert_eq!(h.payload_len(), 40);
        let masked = UploadHeader { weight: 0, masked: true, ..h.clone() };
        assert_eq!(UploadHeader::try_from(pb::UploadHeader::from(&masked)), Ok(masked.clone()));
        assert_eq!(masked.payload_len(), 44, "a masked input carries the weight word");
        let mut bad = pb::UploadHeader::from(&masked);
        bad.weight = 5;
        assert!(UploadHeader::try_from(bad).expect_err("weight").to_string().contains("must be 0 for a masked input"));
        let mut bad = pb::UploadHeader::from(&h);
        bad.num_params = MAX_PARAMS + 1;
        assert!(UploadHeader::try_from(bad).is_err());
        let mut bad = pb::UploadHeader::from(&h);
        bad.weight = 0;
        assert_eq!(UploadHeader::try_from(bad).expect_err("weight").to_string(), "upload.weight: must be positive");
    }

    #[test]
    fn confusion_dimensions_are_checked() {
        let ok = pb::Confusion { n_labels: 2, counts: vec![1, 2, 3, 4] };
        let c = ConfusionCounts::try_from(ok).expect("ok");
        assert_eq!(c.rows(), vec![vec![1, 2], vec![3, 4]]);
        assert_eq!(ConfusionCounts::from_rows(&c.rows()), c);
        assert!(ConfusionCounts::try_from(pb::Confusion { n_labels: 2, counts: vec![1] }).is_err());
        assert!(ConfusionCounts::try_from(pb::Confusion { n_labels: 5000, counts: vec![] }).is_err());
    }

    #[test]
    fn chunks_are_checked() {
        let c = chunk(10, vec![1, 2, 3]);
        assert_eq!(check_chunk(10, 13, c.offset, &c.data, &c.sha256), Ok(()));
        assert_eq!(
            check_chunk(0, 13, c.offset, &c.data, &c.sha256),
            Err(WireError::ChunkOffset { offset: 10, expected: 0 })
        );
        assert!(check_chunk(10, 12, c.offset, &c.data, &c.sha256).is_err());
        assert_eq!(check_chunk(10, 13, c.offset, &[1, 2, 4], &c.sha256), Err(WireError::ChunkDigest { offset: 10 }));
    }

    #[test]
    fn evaluation_reports_check_the_crisis_histograms() {
        let report = |crisis: Vec<u64>, other: Vec<u64>| pb::EvaluationReport {
            job_id: "j-1".into(),
            round: 1,
            attempt: 0,
            model_digest: "ab".repeat(32),
            confusion: Some(pb::Confusion { n_labels: 2, counts: vec![3, 1, 2, 4] }),
            crisis_histogram: Some(pb::CrisisHistogram { crisis, other }),
        };
        let mut crisis = vec![0u64; 100];
        let mut other = vec![0u64; 100];
        crisis[70] = 6;
        other[3] = 4;
        let ok = EvaluationReport::try_from(report(crisis.clone(), other.clone())).expect("consistent");
        assert_eq!(ok.crisis_histogram.as_ref().map(|h| h.total()), Some(10));
        assert_eq!(EvaluationReport::try_from(pb::EvaluationReport::from(&ok)), Ok(ok));
        // Wrong bin counts.
        let e = EvaluationReport::try_from(report(vec![10], other.clone())).expect_err("1 bin");
        assert_eq!(e.to_string(), "crisis_histogram.crisis: expected 100 bins, got 1");
        let e = EvaluationReport::try_from(report(crisis.clone(), vec![0; 101])).expect_err("101 bins");
        assert!(e.to_string().starts_with("crisis_histogram.other: expected 100 bins"), "{e}");
        // Counts that disagree with the confusion total.
        let mut more = crisis.clone();
        more[0] = 1;
        let e = EvaluationReport::try_from(report(more, other.clone())).expect_err("11 vs 10");
        assert_eq!(e.to_string(), "crisis_histogram: counts 11 examples, the confusion matrix 10");
        // Overflow is an error, not a panic.
        let mut huge = crisis.clone();
        huge[1] = u64::MAX;
        assert!(EvaluationReport::try_from(report(huge, other.clone())).is_err());
        // No histogram (a job without a crisis class): fine.
        let mut none = report(crisis, other);
        none.crisis_histogram = None;
        assert_eq!(EvaluationReport::try_from(none).expect("ok").crisis_histogram, None);
    }
}
