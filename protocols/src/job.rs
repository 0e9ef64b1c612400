//! Training jobs as the consortium lead writes them: a TOML file (`docs/jobs.md` is the
//! reference), parsed and validated into a [`JobSpec`].
//!
//! A minimal job is `name`, `labels` and `rounds`; every other key has a default. Every
//! table refuses unknown keys, so a typo is an error naming the key, not a silently
//! ignored setting. After parsing, the strategy's defaults for its kind are written out
//! (see [`StrategySpec::with_defaults`]), so the stored job and its wire form
//! ([`JobSpec::to_json`]) record every value the federation uses.

use maeum_models::data::LabelSet;
use maeum_models::features::FeatureConfig;
use maeum_models::lora::LoraConfig;
use maeum_models::model::{ModelError, ModelSpec, TextClassifierConfig};
use maeum_models::nn::{Optimizer, TrainConfig};
use maeum_models::params::FlatParams;
use serde::{Deserialize, Serialize};

use crate::strategy::{StrategyError, StrategySpec};

mod privacy;
pub use privacy::{DEFAULT_MAX_BATCH, MAX_NOISE_MULTIPLIER, PrivacyMode, PrivacyPlan, PrivacyTable, rdp_of};

/// Most rounds a job may ask for.
pub const MAX_ROUNDS: u32 = 10_000;
/// Most labels a job may have.
pub const MAX_LABELS: usize = 1000;
/// Longest deadline, in seconds (7 days): larger values are almost surely a unit mistake.
pub const MAX_DEADLINE_SECS: u64 = 7 * 24 * 60 * 60;
/// Most parameters a federated model may have (2²⁸: 1 GiB of f32 per copy; the
/// coordinator holds several copies).
pub const MAX_PARAMS: u64 = 1 << 28;
/// Longest job name.
pub const MAX_NAME_LEN: usize = 63;

/// A training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `[a-z0-9-]`, 1–63 characters, not starting with `-`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The label set; the order is the model's class index order.
    pub labels: Vec<String>,
    /// Number of federated rounds (1–10,000).
    pub rounds: u32,
    /// A round needs at least this many site updates (default 3).
    #[serde(default = "default_min_sites")]
    pub min_sites: u32,
    /// The initial model and every site's per-round training seed derive from it (default 7).
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub model: ModelTable,
    #[serde(default)]
    pub train: TrainTable,
    #[serde(default)]
    pub strategy: StrategySpec,
    #[serde(default)]
    pub deadlines: Deadlines,
    #[serde(default)]
    pub secure_aggregation: SecAggTable,
    /// Record-level differential privacy (`docs/protocols/privacy.md`); off by default.
    #[serde(default, skip_serializing_if = "PrivacyTable::is_off")]
    pub privacy: PrivacyTable,
}

fn default_min_sites() -> u32 {
    3
}

fn default_seed() -> u64 {
    7
}

/// Model kinds a job file may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    #[default]
    TextClassifier,
    /// A frozen pretrained encoder (`[model] encoder`) and a trained MLP head.
    EncoderHead,
    /// A pretrained encoder whose top layers are fine-tuned with FFA-LoRA adapters
    /// (`[model] lora_layers`, `lora_rank`, `lora_alpha`), and an MLP head.
    EncoderLora,
    /// A flat vector of `[model] params` values with synthetic training, the size of a
    /// large model's adapters: for scale tests and benchmarks, never for care
    /// (`docs/models.md#the-adapter-stand-in`).
    AdapterStandIn,
    /// Recognised, but refused by validation: not yet supported for federated jobs.
    TabularMlp,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::TextClassifier => "text-classifier",
            ModelKind::EncoderHead => "encoder-head",
            ModelKind::EncoderLora => "encoder-lora",
            ModelKind::AdapterStandIn => "adapter-stand-in",
            ModelKind::TabularMlp => "tabular-mlp",
        }
    }
}

/// The `[model]` table: the architecture and featuriser. Defaults are those of
/// [`TextClassifierConfig`] and [`FeatureConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelTable {
    pub kind: ModelKind,
    /// Hash buckets of the featuriser (a power of two ≥ 16).
    pub buckets: u32,
    /// Word n-gram orders `[lo, hi]` (`[0, 0]` = none).
    pub word_ngrams: [u8; 2],
    /// Character n-gram orders `[lo, hi]` (`[0, 0]` = none).
    pub char_ngrams: [u8; 2],
    /// Characters of a document used.
    pub max_chars: u32,
    pub embed_dim: usize,
    pub hidden: usize,
    /// `encoder-head` only: the pretrained encoder, by name (`maeum_models::encoder::known`);
    /// its digests come from that table and travel in the model spec.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub encoder: String,
    /// `encoder-lora` only: how many of the encoder's top layers carry adapters
    /// (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_layers: Option<usize>,
    /// `encoder-lora` only: the adapters' rank (default 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// `encoder-lora` only: the adapters' scale is `lora_alpha / lora_rank` (default 32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<u32>,
    /// `adapter-stand-in` only (and required there): the adapter vector's length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub params: Option<u64>,
}

impl Default for ModelTable {
    fn default() -> Self {
        let TextClassifierConfig { features, embed_dim, hidden } = TextClassifierConfig::default();
        let FeatureConfig { buckets, word_ngrams, char_ngrams, max_chars } = features;
        Self {
            kind: ModelKind::TextClassifier,
            buckets,
            word_ngrams,
            char_ngrams,
            max_chars,
            embed_dim,
            hidden,
            encoder: String::new(),
            lora_layers: None,
            lora_rank: None,
            lora_alpha: None,
            params: None,
        }
    }
}

impl ModelTable {
    fn features(&self) -> FeatureConfig {
        FeatureConfig {
            buckets: self.buckets,
            word_ngrams: self.word_ngrams,
            char_ngrams: self.char_ngrams,
            max_chars: self.max_chars,
        }
    }

    /// The first key of the n-gram featuriser set to other than its default, if any.
    fn featuriser_key_set(&self) -> Option<&'static str> {
        let d = ModelTable::default();
        [
            ("buckets", self.buckets != d.buckets),
            ("word_ngrams", self.word_ngrams != d.word_ngrams),
            ("char_ngrams", self.char_ngrams != d.char_ngrams),
            ("max_chars", self.max_chars != d.max_chars),
            ("embed_dim", self.embed_dim != d.embed_dim),
        ]
        .into_iter()
        .find_map(|(key, set)| set.then_some(key))
    }

    /// The adapters of an `encoder-lora` model; `A` is drawn from the job's `seed`.
    fn lora(&self, seed: u64) -> LoraConfig {
        let d = LoraConfig::default();
        LoraConfig {
            layers: self.lora_layers.unwrap_or(d.layers),
            rank: self.lora_rank.unwrap_or(d.rank),
            alpha: self.lora_alpha.map_or(d.alpha, |a| a as f32),
            seed,
        }
    }
}

/// The `[train]` table: each site's local training in every round. Defaults are those
/// of [`TrainConfig`], except one epoch per round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainTable {
    pub epochs: u32,
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub dropout: f64,
}

impl Default for TrainTable {
    fn default() -> Self {
        let t = TrainConfig::default();
        Self {
            epochs: 1,
            optimizer: t.optimizer,
            learning_rate: t.learning_rate,
            // The models default is 32; saturating keeps this panic-free.
            batch_size: u32::try_from(t.batch_size).unwrap_or(u32::MAX),
            dropout: t.dropout,
        }
    }
}

/// The `[secure_aggregation]` table (`docs/protocols/secagg.md` explains each
/// trade-off). Secure aggregation is always on unless the loudly named debugging
/// switch is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecAggTable {
    /// Sites needed at every stage and shares needed to unmask; 0 = the smallest t
    /// above 2/3 of the round's sites (or of a neighbourhood, with `neighbours`).
    pub threshold: u16,
    /// 0 = every pair of sites masks (SecAgg); an even k = each site masks with k
    /// neighbours of a random k-regular graph (SecAgg+), for large federations.
    pub neighbours: u16,
    /// Each coordinate of a site's update is clipped to [-clip, clip].
    pub clip: f32,
    /// A site scales its update down to this L2 norm before masking; the coordinator
    /// refuses an aggregate whose norm exceeds Σw·clip_norm. 0 = no norm bound (only
    /// the per-coordinate `clip`). Bounds one site's influence on the mean.
    pub clip_norm: f32,
    /// A site's weight (training records) is capped at this.
    pub max_weight: u32,
    /// Plaintext aggregation: the coordinator sees every site's update. For debugging
    /// only; recorded in the job and shown by `jobs status`.
    pub insecure_plaintext_aggregation_for_debugging: bool,
}

impl Default for SecAggTable {
    fn default() -> Self {
        Self {
            threshold: 0,
            neighbours: 0,
            clip: 1.0,
            clip_norm: 0.0,
            max_weight: 100_000,
            insecure_plaintext_aggregation_for_debugging: false,
        }
    }
}

/// Largest `max_weight`: 255 sites × 2^24 stays below 2^32.
pub const MAX_SECAGG_WEIGHT: u32 = 1 << 24;

impl SecAggTable {
    pub fn enabled(&self) -> bool {
        !self.insecure_plaintext_aggregation_for_debugging
    }

    /// The session parameters for a round with `n` sites and models of `num_params`
    /// parameters; the coordinator proposes them and every site recomputes them, so a
    /// coordinator cannot quietly lower the threshold. The threshold is the largest of
    /// the automatic value (the smallest above 2/3 of the group), the job's `min_sites`
    /// (as far as the group allows) and an explicit `threshold`: an explicit value can
    /// only raise it. `Err` says why `n` sites cannot run a session (e.g. fewer than the
    /// threshold).
    ///
    /// `num_params` counts every word before the weight; `extra_words` the words after
    /// it (the secure evaluation, [`JobSpec::evaluation_words`]).
    pub fn session_params(
        &self,
        n: usize,
        num_params: u64,
        extra_words: u64,
        min_sites: u32,
    ) -> Result<maeum_secagg::SessionParams, String> {
        use maeum_secagg::SessionParams;
        let k = usize::from(self.neighbours);
        // A graph with k ≥ n-1 is the complete graph.
        let degree = if k == 0 || k + 1 >= n { 0 } else { self.neighbours };
        let group = if degree == 0 { n } else { k + 1 };
        let floor = SessionParams::default_threshold(group).max(min_sites.min(group as u32) as u16);
        let threshold = self.threshold.max(floor);
        if usize::from(threshold) > group {
            return Err(format!("threshold {threshold} needs at least {threshold} sites, only {n} are taking part"));
        }
        Ok(SessionParams {
            threshold,
            degree,
            vector_len: num_params + 1 + extra_words,
            clip: self.clip,
            max_weight: self.max_weight,
        })
    }

    fn check(&self) -> Result<(), Invalid> {
        let key = |k: &str| format!("[secure_aggregation] {k}");
        if usize::from(self.threshold) > maeum_secagg::params::MAX_PARTIES {
            return Err(Invalid::new(key("threshold"), format!("must be at most 255, got {}", self.threshold)));
        }
        if self.threshold == 1 {
            return Err(Invalid::new(key("threshold"), "must be 0 (automatic) or at least 2, got 1"));
        }
        if !self.neighbours.is_multiple_of(2) || usize::from(self.neighbours) >= maeum_secagg::params::MAX_PARTIES {
            return Err(Invalid::new(
                key("neighbours"),
                format!("must be 0 or an even number below 255, got {}", self.neighbours),
            ));
        }
        if self.threshold != 0 && self.neighbours != 0 && self.threshold > self.neighbours + 1 {
            return Err(Invalid::new(
                key("threshold"),
                format!("{} exceeds a neighbourhood ({} neighbours + the site)", self.threshold, self.neighbours),
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0 && self.clip <= 1e6) {
            return Err(Invalid::new(key("clip"), format!("must be in (0, 1e6], got {}", self.clip)));
        }
        if !(self.clip_norm.is_finite() && (0.0..=1e9).contains(&self.clip_norm)) {
            return Err(Invalid::new(
                key("clip_norm"),
                format!("must be 0 (off) or in (0, 1e9], got {}", self.clip_norm),
            ));
        }
        if !(1..=MAX_SECAGG_WEIGHT).contains(&self.max_weight) {
            return Err(Invalid::new(
                key("max_weight"),
                format!("must be in 1..={MAX_SECAGG_WEIGHT}, got {}", self.max_weight),
            ));
        }
        Ok(())
    }
}

/// The `[deadlines]` table, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Deadlines {
    /// Sites must accept the job within this, counted from when `min_sites` are online.
    pub join: u64,
    /// Per round: download, evaluate, train and upload. Later sites are stragglers,
    /// left out of that round.
    pub train: u64,
    /// The final federated evaluation stage.
    pub evaluate: u64,
    /// Each short secure-aggregation stage (advertise keys, share keys, consistency
    /// check, unmask). Sites that miss it drop out of the round.
    pub secagg: u64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self { join: 120, train: 600, evaluate: 300, secagg: 60 }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The text is not a job: bad TOML/JSON, a wrong type, an unknown or missing key.
    #[error("{origin}{}: {message}", location(*.line, *.column))]
    Parse { origin: String, line: Option<usize>, column: Option<usize>, message: String },
    /// A value is out of range; `key` is its path, e.g. `[strategy] tau`.
    #[error("{origin}: {key} {problem}")]
    Invalid { origin: String, key: String, problem: String },
    /// The job is valid but its model cannot be built (a bug in one of the two checks).
    #[error("job {name:?}: {error}")]
    Model { name: String, error: ModelError },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// A validation failure before it learns where the job came from.
struct Invalid {
    key: String,
    problem: String,
}

impl Invalid {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { key: key.into(), problem: problem.into() }
    }

    fn at(self, origin: &str) -> JobError {
        JobError::Invalid { origin: origin.to_owned(), key: self.key, problem: self.problem }
    }
}

impl JobSpec {
    /// Parses and validates a job file. `source_name` (usually the path) starts every
    /// error; parse errors carry the line and column.
    pub fn from_toml(source_name: &str, text: &str) -> Result<JobSpec, JobError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => line_column(text, span.start),
                None => (None, None),
            };
            JobError::Parse { origin: source_name.to_owned(), line, column, message: e.message().trim().to_owned() }
        })?;
        spec.resolved(source_name)
    }

    /// Parses and validates the wire form written by [`JobSpec::to_json`].
    pub fn from_json(s: &str) -> Result<JobSpec, JobError> {
        const ORIGIN: &str = "job JSON";
        let spec: JobSpec = serde_json::from_str(s).map_err(|e| JobError::Parse {
            origin: ORIGIN.into(),
            line: Some(e.line()),
            column: Some(e.column()),
            message: e.to_string(),
        })?;
        spec.resolved(ORIGIN)
    }

    /// The canonical wire form: `serde_json` of the struct (field order as declared, no
    /// whitespace). Sites refuse unknown keys, so a newer job format is refused by an
    /// older site rather than half-understood.
    pub fn to_json(&self) -> String {
        // INVARIANT: the struct has only string keys and plain values; serde_json cannot fail.
        serde_json::to_string(self).expect("JobSpec serialises to JSON")
    }

    fn resolved(mut self, origin: &str) -> Result<JobSpec, JobError> {
        self.strategy = self.strategy.with_defaults();
        self.check().map_err(|e| e.at(origin))?;
        Ok(self)
    }

    /// Checks every value's range (see `docs/jobs.md`); errors name the key.
    pub fn validate(&self) -> Result<(), JobError> {
        self.check().map_err(|e| e.at(&format!("job {:?}", self.name)))
    }

    fn check(&self) -> Result<(), Invalid> {
        let name_ok = (1..=MAX_NAME_LEN).contains(&self.name.len())
            && !self.name.starts_with('-')
            && self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(Invalid::new(
                "name",
                format!(
                    "must be 1–{MAX_NAME_LEN} characters of a-z, 0-9 and '-', not starting with '-', got {:?}",
                    self.name
                ),
            ));
        }
        self.check_labels()?;
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return Err(Invalid::new("rounds", format!("must be in 1..={MAX_ROUNDS}, got {}", self.rounds)));
        }
        if self.min_sites == 0 {
            return Err(Invalid::new("min_sites", "must be at least 1, got 0"));
        }
        self.check_model()?;

        let t = &self.train;
        if t.epochs == 0 {
            return Err(Invalid::new("[train] epochs", "must be at least 1, got 0"));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return Err(Invalid::new("[train] learning_rate", format!("must be > 0, got {}", t.learning_rate)));
        }
        if t.batch_size == 0 {
            return Err(Invalid::new("[train] batch_size", "must be at least 1, got 0"));
        }
        if !(0.0..1.0).contains(&t.dropout) {
            return Err(Invalid::new("[train] dropout", format!("must be in [0, 1), got {}", t.dropout)));
        }

        self.strategy.validate().map_err(|e| match e {
            StrategyError::InvalidSpec { key, problem } => Invalid::new(format!("[strategy] {key}"), problem),
            other => Invalid::new("[strategy]", other.to_string()),
        })?;

        self.secure_aggregation.check()?;
        self.privacy.check()?;
        if self.privacy.mode == PrivacyMode::Distributed && !self.secure_aggregation.enabled() {
            return Err(Invalid::new(
                "[privacy] mode",
                "\"distributed\" needs secure aggregation: each site's share of the noise protects nothing alone",
            ));
        }
        self.privacy
            .plan(self.rounds, self.train.epochs, self.dimension()?, self.min_sites)
            .map_err(|problem| Invalid::new("[privacy]", problem))?;

        let d = &self.deadlines;
        for (key, secs) in [("join", d.join), ("train", d.train), ("evaluate", d.evaluate), ("secagg", d.secagg)] {
            if !(1..=MAX_DEADLINE_SECS).contains(&secs) {
                return Err(Invalid::new(
                    format!("[deadlines] {key}"),
                    format!("must be 1..={MAX_DEADLINE_SECS} seconds, got {secs}"),
                ));
            }
        }
        Ok(())
    }

    fn check_labels(&self) -> Result<(), Invalid> {
        let n = self.labels.len();
        if !(2..=MAX_LABELS).contains(&n) {
            return Err(Invalid::new("labels", format!("must have 2 to {MAX_LABELS} entries, got {n}")));
        }
        let mut seen = std::collections::HashMap::new();
        for (i, label) in self.labels.iter().enumerate() {
            if label.trim().is_empty() {
                return Err(Invalid::new(format!("labels[{i}]"), "is empty"));
            }
            if label.trim() != label {
                // Data readers trim labels, so this one could never match a record.
                return Err(Invalid::new(
                    format!("labels[{i}]"),
                    format!("{label:?} has leading or trailing whitespace"),
                ));
            }
            if let Some(first) = seen.insert(label.as_str(), i) {
                return Err(Invalid::new(format!("labels[{i}]"), format!("{label:?} repeats labels[{first}]")));
            }
        }
        Ok(())
    }

    fn check_model(&self) -> Result<(), Invalid> {
        let m = &self.model;
        if m.kind != ModelKind::EncoderLora {
            for (key, set) in [
                ("lora_layers", m.lora_layers.is_some()),
                ("lora_rank", m.lora_rank.is_some()),
                ("lora_alpha", m.lora_alpha.is_some()),
            ] {
                if set {
                    return Err(Invalid::new(
                        format!("[model] {key}"),
                        format!("applies only to kind \"encoder-lora\", not {:?}", m.kind.as_str()),
                    ));
                }
            }
        }
        if m.kind != ModelKind::AdapterStandIn && m.params.is_some() {
            return Err(Invalid::new(
                "[model] params",
                format!("applies only to kind \"adapter-stand-in\", not {:?}", m.kind.as_str()),
            ));
        }
        if matches!(m.kind, ModelKind::EncoderHead | ModelKind::EncoderLora) {
            return self.check_encoder_model();
        }
        if !m.encoder.is_empty() {
            return Err(Invalid::new(
                "[model] encoder",
                format!("applies only to kinds \"encoder-head\" and \"encoder-lora\", not {:?}", m.kind.as_str()),
            ));
        }
        if m.kind == ModelKind::AdapterStandIn {
            return self.check_stand_in();
        }
        if m.kind != ModelKind::TextClassifier {
            return Err(Invalid::new(
                "[model] kind",
                format!("{:?} is not yet supported for federated jobs (use \"text-classifier\")", m.kind.as_str()),
            ));
        }
        // FeatureConfig's messages start with the key name.
        m.features().validate().map_err(|problem| Invalid::new("[model]", problem))?;
        for (key, value) in [("embed_dim", m.embed_dim), ("hidden", m.hidden)] {
            if value == 0 {
                return Err(Invalid::new(format!("[model] {key}"), "must be at least 1, got 0"));
            }
        }
        // Embedding, hidden and output layers with biases, in u128 so nothing overflows.
        let (b, e, h, l) = (m.buckets as u128, m.embed_dim as u128, m.hidden as u128, self.labels.len() as u128);
        let params = b * e + e * h + h + h * l + l;
        if params > u128::from(MAX_PARAMS) {
            return Err(Invalid::new(
                "[model]",
                format!(
                    "buckets = {}, embed_dim = {}, hidden = {} make {params} parameters, more than the limit of {MAX_PARAMS}",
                    m.buckets, m.embed_dim, m.hidden
                ),
            ));
        }
        Ok(())
    }

    fn check_encoder_model(&self) -> Result<(), Invalid> {
        let m = &self.model;
        let kind = m.kind.as_str();
        let Some(encoder) = maeum_models::encoder::known(&m.encoder) else {
            let problem = if m.encoder.is_empty() {
                format!("is required for kind {kind:?}")
            } else {
                format!("{:?} is not a known encoder", m.encoder)
            };
            return Err(Invalid::new(
                "[model] encoder",
                format!("{problem} (known: {})", maeum_models::encoder::known_names()),
            ));
        };
        // The n-gram featuriser's keys mean nothing to an encoder model: refuse them
        // rather than ignore them.
        if let Some(key) = m.featuriser_key_set() {
            return Err(Invalid::new(
                format!("[model] {key}"),
                format!("applies only to kind \"text-classifier\", not {kind:?}"),
            ));
        }
        // hidden = 0: a linear head on the sentence vectors (`encoder-head` only).
        if m.hidden == 0 && m.kind == ModelKind::EncoderLora {
            return Err(Invalid::new("[model] hidden", "must be at least 1 for kind \"encoder-lora\", got 0"));
        }
        let (e, h, l) = (encoder.dim as u128, m.hidden as u128, self.labels.len() as u128);
        let mut params = if h == 0 { e * l } else { e * h + h + h * l + l };
        if m.kind == ModelKind::EncoderLora {
            let lora = m.lora(self.seed);
            lora.validate().map_err(|problem| Invalid::new("[model]", problem))?;
            // The catalogue's encoders are 6 layers deep; the site checks its own copy.
            if lora.layers > 6 {
                return Err(Invalid::new(
                    "[model] lora_layers",
                    format!("{} is more than the encoder's 6 layers", lora.layers),
                ));
            }
            if !self.privacy.is_off() {
                return Err(Invalid::new(
                    "[privacy] mode",
                    "differential privacy is not available for kind \"encoder-lora\" (use \"encoder-head\")",
                ));
            }
            params += (lora.layers * maeum_models::lora::PROJECTIONS.len() * lora.rank) as u128 * e;
        }
        if params > u128::from(MAX_PARAMS) {
            return Err(Invalid::new(
                "[model] hidden",
                format!("{} makes {params} parameters, more than the limit of {MAX_PARAMS}", m.hidden),
            ));
        }
        Ok(())
    }

    /// `adapter-stand-in`: `params` is required and nothing else of the `[model]` table
    /// applies; its update is not a gradient, so there is no differential privacy.
    fn check_stand_in(&self) -> Result<(), Invalid> {
        let m = &self.model;
        let hidden = (m.hidden != ModelTable::default().hidden).then_some("hidden");
        if let Some(key) = m.featuriser_key_set().or(hidden) {
            return Err(Invalid::new(
                format!("[model] {key}"),
                "does not apply to kind \"adapter-stand-in\" (it has only `params`)",
            ));
        }
        let params =
            m.params.ok_or_else(|| Invalid::new("[model] params", "is required for kind \"adapter-stand-in\""))?;
        let total = u128::from(params) + self.labels.len() as u128;
        if params == 0 || total > u128::from(MAX_PARAMS) {
            return Err(Invalid::new(
                "[model] params",
                format!(
                    "must be 1..={} (with one prior logit per label), got {params}",
                    MAX_PARAMS - self.labels.len() as u64
                ),
            ));
        }
        if !self.privacy.is_off() {
            return Err(Invalid::new(
                "[privacy] mode",
                "differential privacy is not available for kind \"adapter-stand-in\" (its update is not a gradient)",
            ));
        }
        Ok(())
    }

    /// The model this job trains (validates the job first).
    pub fn model_spec(&self) -> Result<ModelSpec, JobError> {
        self.validate()?;
        self.spec_of_checked_model().map_err(|e| e.at(&format!("job {:?}", self.name)))
    }

    /// [`JobSpec::model_spec`] once the `[model]` table and the labels are checked.
    fn spec_of_checked_model(&self) -> Result<ModelSpec, Invalid> {
        let labels = LabelSet::new(self.labels.clone()).map_err(|problem| Invalid::new("labels", problem))?;
        if matches!(self.model.kind, ModelKind::EncoderHead | ModelKind::EncoderLora) {
            let encoder = maeum_models::encoder::known(&self.model.encoder)
                .ok_or_else(|| Invalid::new("[model] encoder", format!("unknown: {:?}", self.model.encoder)))?;
            let hidden = self.model.hidden;
            if self.model.kind == ModelKind::EncoderLora {
                return Ok(ModelSpec::EncoderLora { encoder, lora: self.model.lora(self.seed), hidden, labels });
            }
            return Ok(ModelSpec::EncoderHead { encoder, hidden, labels });
        }
        if let (ModelKind::AdapterStandIn, Some(params)) = (self.model.kind, self.model.params) {
            let params =
                usize::try_from(params).map_err(|_| Invalid::new("[model] params", "too large for this machine"))?;
            return Ok(ModelSpec::AdapterStandIn { params, labels });
        }
        let config = TextClassifierConfig {
            features: self.model.features(),
            embed_dim: self.model.embed_dim,
            hidden: self.model.hidden,
        };
        Ok(ModelSpec::TextClassifier { config, labels })
    }

    /// Parameters of the job's model (the distributed mode's d).
    fn dimension(&self) -> Result<u64, Invalid> {
        Ok(self.spec_of_checked_model()?.layout().numel() as u64)
    }

    /// The initial global model: [`JobSpec::model_spec`] initialised with `seed`, so a
    /// local run with the same seed starts from the same parameters.
    pub fn initial_params(&self) -> Result<FlatParams, JobError> {
        self.model_spec()?.init(self.seed).map_err(|error| JobError::Model { name: self.name.clone(), error })
    }

    /// Words of federated evaluation that follow the weight in every masked input of a
    /// secure job, so the coordinator learns the cohort's counts, never a site's: the
    /// confusion counts (labels × labels, row-major: true label, then predicted) and,
    /// when the job has a crisis class, the crisis-probability histogram (its
    /// `crisis` bins, then its `other` bins). Each is a plain count, summed mod 2^32.
    pub fn evaluation_words(&self) -> u64 {
        let l = self.labels.len() as u64;
        let crisis = self.labels.iter().any(|x| maeum_tlog::release::is_crisis_label(x));
        l * l + if crisis { 2 * maeum_models::metrics::HISTOGRAM_BINS as u64 } else { 0 }
    }

    /// The job's DP-SGD plan (`None` without `[privacy]`); validates the job first.
    pub fn privacy_plan(&self) -> Result<Option<PrivacyPlan>, JobError> {
        self.validate()?;
        let dimension = self.dimension().map_err(|e| e.at(&format!("job {:?}", self.name)))?;
        self.privacy
            .plan(self.rounds, self.train.epochs, dimension, self.min_sites)
            .map_err(|problem| Invalid::new("[privacy]", problem).at(&format!("job {:?}", self.name)))
    }

    /// Local training config for `attempt` of `round` at a site. The seed is derived
    /// from the job's seed, the round, the attempt and `site_salt` (a value stable for
    /// the site, chosen by the caller, e.g. from its identity), so every site, round and
    /// attempt draws differently and a rerun draws the same. (With the attempt in it, two
    /// attempts of one round give two different sums; sites reveal only one of them.)
    /// `prox_mu` is set for `fedprox`, 0 otherwise.
    pub fn train_config(&self, round: u32, attempt: u32, site_salt: u64) -> TrainConfig {
        let t = &self.train;
        TrainConfig {
            optimizer: t.optimizer,
            learning_rate: t.learning_rate,
            epochs: t.epochs as usize,
            batch_size: t.batch_size as usize,
            seed: derive_seed(b"train", self.seed, round, attempt, site_salt),
            prox_mu: self.strategy.prox_mu(),
            dropout: t.dropout,
            head_only: false,
        }
    }
}

/// A seed for `purpose`: the first 8 bytes (little-endian) of SHA-256 over
/// `"maeum/job-seed/v2\0"`, `purpose`, `"\0"`, then `seed`, `round`, `attempt` and
/// `salt` in little-endian. Fixed and documented, so every build derives the same seeds.
fn derive_seed(purpose: &[u8], seed: u64, round: u32, attempt: u32, salt: u64) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        b"maeum/job-seed/v2\0".as_slice(),
        purpose,
        b"\0",
        &seed.to_le_bytes(),
        &round.to_le_bytes(),
        &attempt.to_le_bytes(),
        &salt.to_le_bytes(),
    ] {
        ctx.update(part);
    }
    let digest = ctx.finish();
    let mut first = [0; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (Option<usize>, Option<usize>) {
    let Some(before) = text.get(..at) else {
        return (None, None);
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (Some(line), Some(column))
}

/// Lowercase hex SHA-256 of `bytes`: the hash of a job file as submitted (kept with the job).
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::StrategyKind;

    /// A job file: `extra` plus whichever of `name`, `labels`, `rounds` it does not set.
    /// Top-level keys in `extra` must come before its first table.
    fn job(extra: &str) -> String {
        let mut out = String::new();
        for (key, line) in
            [("name", "name = \"t\"\n"), ("labels", "labels = [\"a\", \"b\"]\n"), ("rounds", "rounds = 5\n")]
        {
            if !extra.lines().any(|l| l.starts_with(&format!("{key} ="))) {
                out.push_str(line);
            }
        }
        out.push_str(extra);
        out
    }

    /// Parses `job(extra)` and compares the error message (`None` = valid).
    fn check(extra: &str, expected: Option<&str>) {
        let got = JobSpec::from_toml("job.toml", &job(extra)).err().map(|e| e.to_string());
        assert_eq!(got.as_deref(), expected, "job:\n{}", job(extra));
    }

    #[test]
    fn minimal_job_gets_defaults() {
        let spec =
            JobSpec::from_toml("job.toml", "name = \"t\"\nlabels = [\"a\", \"b\"]\nrounds = 5\n").expect("valid");
        let expected = JobSpec {
            name: "t".into(),
            description: None,
            labels: vec!["a".into(), "b".into()],
            rounds: 5,
            min_sites: 3,
            seed: 7,
            model: ModelTable {
                kind: ModelKind::TextClassifier,
                buckets: 65536,
                word_ngrams: [1, 2],
                char_ngrams: [3, 5],
                max_chars: 4000,
                embed_dim: 64,
                hidden: 128,
                encoder: String::new(),
                lora_layers: None,
                lora_rank: None,
                lora_alpha: None,
                params: None,
            },
            train: TrainTable {
                epochs: 1,
                optimizer: Optimizer::Adam,
                learning_rate: 0.002,
                batch_size: 32,
                dropout: 0.5,
            },
            strategy: StrategySpec { server_learning_rate: Some(1.0), ..Default::default() },
            deadlines: Deadlines { join: 120, train: 600, evaluate: 300, secagg: 60 },
            secure_aggregation: SecAggTable {
                threshold: 0,
                neighbours: 0,
                clip: 1.0,
                clip_norm: 0.0,
                max_weight: 100_000,
                insecure_plaintext_aggregation_for_debugging: false,
            },
            privacy: PrivacyTable::default(),
        };
        assert_eq!(spec, expected);
        assert_eq!(spec.privacy_plan().expect("plan"), None, "no differential privacy unless asked");
        assert!(spec.secure_aggregation.enabled(), "secure aggregation is the default");
    }

    #[test]
    fn privacy_table_is_checked_and_planned() {
        check(
            "[privacy]\nmode = \"local\"\nepsilon = 0.0\n",
            Some("job.toml: [privacy] epsilon must be in (0, 100], got 0"),
        );
        check(
            "[privacy]\nmode = \"local\"\nepsilon = 8.0\ndelta = 0.01\n",
            Some("job.toml: [privacy] delta must be in (0, 1e-3], got 0.01"),
        );
        check(
            "[privacy]\nmode = \"local\"\nepsilon = 8.0\nsample_rate = 0.0\n",
            Some("job.toml: [privacy] sample_rate must be in [0.0001, 1], got 0"),
        );
        check(
            "[privacy]\nepsilon = 8.0\n",
            Some(
                "job.toml: [privacy] mode is \"none\" (the default), but epsilon set: add mode = \"local\" or \"distributed\", or remove them",
            ),
        );
        let err = JobSpec::from_toml("job.toml", &job("[privacy]\nmode = \"central\"\n")).expect_err("unknown");
        assert!(err.to_string().contains("unknown variant `central`, expected one of"), "{err}");
        check(
            "[privacy]\nmode = \"local\"\nepsilon = 8.0\ncolluders = 1\n",
            Some("job.toml: [privacy] mode is \"local\": colluders and max_batch apply to \"distributed\""),
        );
        // A target no noise can meet in this many steps is refused with the numbers.
        let err = JobSpec::from_toml(
            "job.toml",
            "name = \"t\"\nlabels = [\"a\", \"b\"]\nrounds = 1000\n[train]\nepochs = 5\n[privacy]\nmode = \"local\"\nepsilon = 0.01\nsample_rate = 1.0\n",
        )
        .expect_err("infeasible");
        assert!(err.to_string().contains("needs a noise multiplier above 50"), "{err}");

        let spec = JobSpec::from_toml(
            "job.toml",
            "name = \"t\"\nlabels = [\"a\", \"b\"]\nrounds = 10\n[train]\nepochs = 2\n[privacy]\nmode = \"local\"\nepsilon = 8.0\n",
        )
        .expect("job");
        let plan = spec.privacy_plan().expect("valid").expect("a plan");
        assert_eq!(plan.steps_per_round, 40, "⌈2 epochs / q 0.05⌉");
        assert!(plan.epsilon <= 8.0 && plan.epsilon > 7.99, "calibrated to the target: {}", plan.epsilon);
        // The smallest such σ: 1% less noise overshoots.
        let less =
            maeum_models::accountant::dp_sgd_epsilon(0.05, plan.noise_multiplier * 0.99, 400, 1e-5).expect("eps");
        assert!(less > 8.0, "{less}");
        assert!((plan.epsilon_after(10) - plan.epsilon).abs() < 1e-12);
        assert!(plan.epsilon_after(5) < plan.epsilon);
        // The plan survives the JSON the coordinator stores.
        assert_eq!(JobSpec::from_json(&spec.to_json()).expect("json").privacy_plan().expect("plan"), Some(plan));
    }

    #[test]
    fn the_distributed_mode_is_planned_per_round_and_needs_secure_aggregation() {
        let base = "name = \"t\"\nlabels = [\"a\", \"b\"]\nrounds = 50\nmin_sites = 4\n\
                    [model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\n";
        let ddp = "[privacy]\nmode = \"distributed\"\nepsilon = 8.0\nsample_rate = 1.0\ncolluders = 1\n";
        let spec = JobSpec::from_toml("job.toml", &format!("{base}{ddp}")).expect("job");
        let plan = spec.privacy_plan().expect("valid").expect("a plan");
        let d = spec.model_spec().expect("spec").layout().numel() as u64;
        assert_eq!((plan.mode, plan.steps_per_round, plan.rounds), (PrivacyMode::Distributed, 1, 50));
        assert_eq!((plan.dimension, plan.noise_shares, plan.max_batch), (d, 3, DEFAULT_MAX_BATCH));
        assert!(plan.epsilon <= 8.0 && plan.epsilon > 7.99, "calibrated: {}", plan.epsilon);
        let mut less = plan;
        less.noise_multiplier *= 0.99;
        assert!(less.epsilon_after(50) > 8.0, "the smallest z meets the target");
        let m = plan.distributed().expect("mechanism");
        assert!(m.max_parties() >= 4);
        assert_eq!(PrivacyPlan::mode_of_mechanism(plan.mode.mechanism()), Some(PrivacyMode::Distributed));
        assert_eq!(JobSpec::from_json(&spec.to_json()).expect("json").privacy_plan().expect("plan"), Some(plan));
        // Plans written before the distributed mode read back as local.
        let old = r#"{"clip":1.0,"noise_multiplier":1.0,"sample_rate":0.05,"steps_per_round":20,"rounds":2,"delta":1e-5,"epsilon":3.0}"#;
        assert_eq!(serde_json::from_str::<PrivacyPlan>(old).expect("old plan").mode, PrivacyMode::Local);

        let plaintext =
            format!("{base}{ddp}[secure_aggregation]\ninsecure_plaintext_aggregation_for_debugging = true\n");
        let err = JobSpec::from_toml("job.toml", &plaintext).expect_err("plaintext");
        assert!(err.to_string().contains("\"distributed\" needs secure aggregation"), "{err}");
        let err = JobSpec::from_toml("job.toml", &format!("{base}{ddp}").replace("colluders = 1", "colluders = 4"))
            .expect_err("no honest share");
        assert!(err.to_string().contains("colluders = 4 leaves no honest noise share among min_sites = 4"), "{err}");
        // The 4.2 M-parameter text classifier at B = 65536 could wrap 32 bits with 4 sites.
        let text = "name = \"t\"\nlabels = [\"a\", \"b\"]\nrounds = 5\nmin_sites = 4\n\
                    [privacy]\nmode = \"distributed\"\nepsilon = 8.0\nmax_batch = 65536\n";
        let err = JobSpec::from_toml("job.toml", text).expect_err("wraps");
        assert!(err.to_string().contains("could wrap 32 bits"), "{err}");
    }

    #[test]
    fn secure_aggregation_table_is_checked() {
        check(
            "[secure_aggregation]\nthreshold = 1\n",
            Some("job.toml: [secure_aggregation] threshold must be 0 (automatic) or at least 2, got 1"),
        );
        check(
            "[secure_aggregation]\nneighbours = 3\n",
            Some("job.toml: [secure_aggregation] neighbours must be 0 or an even number below 255, got 3"),
        );
        check(
            "[secure_aggregation]\nneighbours = 4\nthreshold = 6\n",
            Some("job.toml: [secure_aggregation] threshold 6 exceeds a neighbourhood (4 neighbours + the site)"),
        );
        check(
            "[secure_aggregation]\nclip = 0.0\n",
            Some("job.toml: [secure_aggregation] clip must be in (0, 1e6], got 0"),
        );
        check(
            "[secure_aggregation]\nclip_norm = -1.0\n",
            Some("job.toml: [secure_aggregation] clip_norm must be 0 (off) or in (0, 1e9], got -1"),
        );
        check(
            "[secure_aggregation]\nmax_weight = 0\n",
            Some("job.toml: [secure_aggregation] max_weight must be in 1..=16777216, got 0"),
        );
        check(
            "[secure_aggregation]\nplaintext = true\n",
            Some(
                "job.toml:5:1: unknown field `plaintext`, expected one of `threshold`, `neighbours`, `clip`, `clip_norm`, `max_weight`, `insecure_plaintext_aggregation_for_debugging`",
            ),
        );
        check("[secure_aggregation]\ninsecure_plaintext_aggregation_for_debugging = true\n", None);
    }

    #[test]
    fn session_params_follow_the_table() {
        let t = SecAggTable::default();
        let p = t.session_params(7, 100, 0, 3).expect("7 sites");
        assert_eq!((p.threshold, p.degree, p.vector_len), (5, 0, 101));
        assert_eq!(t.session_params(3, 1, 0, 3).expect("3 sites").threshold, 3);
        let plus = SecAggTable { neighbours: 4, ..SecAggTable::default() };
        let p = plus.session_params(20, 1, 0, 3).expect("20 sites");
        assert_eq!((p.threshold, p.degree), (4, 4), "a neighbourhood of 5 needs 4");
        assert_eq!(plus.session_params(5, 1, 0, 3).expect("5 sites").degree, 0, "k ≥ n-1 is every pair");
        let high = SecAggTable { threshold: 6, ..SecAggTable::default() };
        assert_eq!(
            high.session_params(5, 1, 0, 3).expect_err("too few"),
            "threshold 6 needs at least 6 sites, only 5 are taking part"
        );
        // min_sites raises the threshold (within the group); an explicit lower one does not lower it.
        assert_eq!(t.session_params(10, 1, 0, 9).expect("10 sites").threshold, 9);
        assert_eq!(plus.session_params(20, 1, 0, 9).expect("20 sites").threshold, 5, "capped at the neighbourhood");
        let low = SecAggTable { threshold: 2, ..SecAggTable::default() };
        assert_eq!(low.session_params(7, 1, 0, 1).expect("7 sites").threshold, 5);
    }

    #[test]
    fn adaptive_strategy_defaults_are_written_out() {
        let spec = JobSpec::from_toml("job.toml", &job("[strategy]\nkind = \"fedyogi\"\n")).expect("valid");
        assert_eq!(
            spec.strategy,
            StrategySpec {
                kind: StrategyKind::FedYogi,
                prox_mu: None,
                server_learning_rate: Some(0.01),
                beta1: Some(0.9),
                beta2: Some(0.99),
                tau: Some(0.001),
            }
        );
    }

    #[test]
    fn valid_variations() {
        check("description = \"x\"\nmin_sites = 1\nseed = 0\n", None);
        check("[train]\noptimizer = \"sgd\"\nlearning_rate = 1\ndropout = 0\n", None);
        check("[strategy]\nkind = \"fedavg\"\nserver_learning_rate = 0.5\n", None);
        check("[strategy]\nkind = \"fedprox\"\nprox_mu = 0.01\n", None);
        check("[strategy]\nkind = \"fedadam\"\nserver_learning_rate = 0.1\nbeta1 = 0\ntau = 1e-9\n", None);
        check("[model]\nbuckets = 16\nembed_dim = 1\nhidden = 1\nchar_ngrams = [0, 0]\n", None);
        check("[model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\nhidden = 64\n", None);
        check("name = \"a\"\nrounds = 10000\n[deadlines]\njoin = 1\ntrain = 604800\n", None);
    }

    #[test]
    fn an_encoder_head_job_names_the_encoder_by_its_digests_and_sends_only_the_head() {
        let spec = JobSpec::from_toml(
            "job.toml",
            &job("[model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\nhidden = 32\n"),
        )
        .expect("valid");
        let model = spec.model_spec().expect("model");
        let ModelSpec::EncoderHead { encoder, hidden, labels } = &model else { panic!("encoder-head expected") };
        assert_eq!(encoder.sha256, "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db");
        assert_eq!((encoder.dim, encoder.max_tokens, *hidden), (384, 128, 32));
        let n = labels.len();
        assert_eq!(spec.initial_params().expect("init").values().len(), 384 * 32 + 32 + 32 * n + n);
        // The spec round-trips through JSON (the form sites store and hash).
        let again = JobSpec::from_json(&spec.to_json()).expect("json");
        assert_eq!(again.model_spec().expect("model"), model);
    }

    #[test]
    fn an_encoder_head_with_hidden_0_is_a_linear_head_without_bias() {
        let spec = JobSpec::from_toml(
            "job.toml",
            &job("[model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\nhidden = 0\n"),
        )
        .expect("valid");
        let init = spec.initial_params().expect("init");
        let names: Vec<&str> = init.layout().tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["output.weight"]);
        assert_eq!(init.values().len(), 384 * spec.labels.len());
    }

    #[test]
    fn an_encoder_lora_job_draws_a_from_the_job_seed_and_sends_b_and_the_head() {
        let spec = JobSpec::from_toml(
            "job.toml",
            &job("seed = 99\n[model]\nkind = \"encoder-lora\"\nencoder = \"all-minilm-l6-v2\"\nhidden = 32\nlora_rank = 4\n"),
        )
        .expect("valid");
        let model = spec.model_spec().expect("model");
        let ModelSpec::EncoderLora { encoder, lora, hidden, labels } = &model else { panic!("encoder-lora expected") };
        assert_eq!(encoder.sha256, "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db");
        let d = LoraConfig::default();
        assert_eq!(*lora, LoraConfig { layers: d.layers, rank: 4, alpha: d.alpha, seed: 99 });
        let n = labels.len();
        let b = d.layers * 4 * 4 * 384;
        assert_eq!(spec.initial_params().expect("init").values().len(), b + 384 * hidden + hidden + hidden * n + n);
        let again = JobSpec::from_json(&spec.to_json()).expect("json");
        assert_eq!(again.model_spec().expect("model"), model);
        // Jobs of other kinds serialise exactly as before (no lora keys).
        let plain = JobSpec::from_toml("job.toml", &job("")).expect("valid");
        assert!(!plain.to_json().contains("lora"), "{}", plain.to_json());
    }

    #[test]
    fn an_adapter_stand_in_job_has_params_and_refuses_every_other_model_key() {
        let spec = JobSpec::from_toml("job.toml", &job("[model]\nkind = \"adapter-stand-in\"\nparams = 1000\n"))
            .expect("valid");
        let model = spec.model_spec().expect("model");
        let ModelSpec::AdapterStandIn { params, labels } = &model else { panic!("adapter-stand-in expected") };
        assert_eq!(*params, 1000);
        assert_eq!(spec.initial_params().expect("init").values().len(), 1000 + labels.len());
        assert_eq!(JobSpec::from_json(&spec.to_json()).expect("json").model_spec().expect("model"), model);
        assert!(!JobSpec::from_toml("job.toml", &job("")).expect("valid").to_json().contains("params"));
        for (extra, key, says) in [
            ("", "[model] params", "is required"),
            ("params = 0\n", "[model] params", "must be 1..="),
            ("params = 268435456\n", "[model] params", "must be 1..="),
            ("params = 10\nhidden = 4\n", "[model] hidden", "does not apply"),
            ("params = 10\nbuckets = 1024\n", "[model] buckets", "does not apply"),
            ("params = 10\nencoder = \"all-minilm-l6-v2\"\n", "[model] encoder", "applies only"),
        ] {
            let text = job(&format!("[model]\nkind = \"adapter-stand-in\"\n{extra}"));
            let err = JobSpec::from_toml("job.toml", &text).expect_err(extra).to_string();
            assert!(err.contains(key) && err.contains(says), "{extra:?}: {err}");
        }
        let err = JobSpec::from_toml("job.toml", &job("[model]\nparams = 10\n")).expect_err("text").to_string();
        assert!(err.contains("[model] params") && err.contains("adapter-stand-in"), "{err}");
        let dp = "[model]\nkind = \"adapter-stand-in\"\nparams = 10\n[privacy]\nmode = \"local\"\nepsilon = 3.0\n";
        let err = JobSpec::from_toml("job.toml", &job(dp)).expect_err("dp").to_string();
        assert!(err.contains("[privacy] mode") && err.contains("adapter-stand-in"), "{err}");
    }

    #[test]
    fn validation_errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("name = \"\"\n", "name must be 1–63 characters of a-z, 0-9 and '-', not starting with '-', got \"\""),
            (
                "name = \"Triage\"\n",
                "name must be 1–63 characters of a-z, 0-9 and '-', not starting with '-', got \"Triage\"",
            ),
            ("name = \"-x\"\n", "name must be 1–63 characters of a-z, 0-9 and '-', not starting with '-', got \"-x\""),
            ("labels = [\"a\"]\n", "labels must have 2 to 1000 entries, got 1"),
            ("labels = [\"a\", \" \"]\n", "labels[1] is empty"),
            ("labels = [\"a\", \"b \"]\n", "labels[1] \"b \" has leading or trailing whitespace"),
            ("labels = [\"a\", \"b\", \"a\"]\n", "labels[2] \"a\" repeats labels[0]"),
            ("rounds = 0\n", "rounds must be in 1..=10000, got 0"),
            (
                "[model]\nkind = \"encoder-head\"\n",
                "[model] encoder is required for kind \"encoder-head\" (known: all-minilm-l6-v2, multilingual-e5-small)",
            ),
            (
                "[model]\nkind = \"encoder-head\"\nencoder = \"bert-large\"\n",
                "[model] encoder \"bert-large\" is not a known encoder (known: all-minilm-l6-v2, multilingual-e5-small)",
            ),
            (
                "[model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\nbuckets = 1024\n",
                "[model] buckets applies only to kind \"text-classifier\", not \"encoder-head\"",
            ),
            (
                "[model]\nencoder = \"all-minilm-l6-v2\"\n",
                "[model] encoder applies only to kinds \"encoder-head\" and \"encoder-lora\", not \"text-classifier\"",
            ),
            (
                "[model]\nkind = \"encoder-lora\"\nencoder = \"all-minilm-l6-v2\"\nhidden = 0\n",
                "[model] hidden must be at least 1 for kind \"encoder-lora\", got 0",
            ),
            (
                "[model]\nkind = \"encoder-head\"\nencoder = \"all-minilm-l6-v2\"\nlora_rank = 4\n",
                "[model] lora_rank applies only to kind \"encoder-lora\", not \"encoder-head\"",
            ),
            (
                "[model]\nkind = \"encoder-lora\"\n",
                "[model] encoder is required for kind \"encoder-lora\" (known: all-minilm-l6-v2, multilingual-e5-small)",
            ),
            (
                "[model]\nkind = \"encoder-lora\"\nencoder = \"all-minilm-l6-v2\"\nlora_rank = 0\n",
                "[model] lora rank must be in 1..=256, got 0",
            ),
            (
                "[model]\nkind = \"encoder-lora\"\nencoder = \"all-minilm-l6-v2\"\nlora_layers = 7\n",
                "[model] lora_layers 7 is more than the encoder's 6 layers",
            ),
            (
                "[model]\nkind = \"encoder-lora\"\nencoder = \"all-minilm-l6-v2\"\n[privacy]\nmode = \"local\"\nepsilon = 8.0\n",
                "[privacy] mode differential privacy is not available for kind \"encoder-lora\" (use \"encoder-head\")",
            ),
            ("rounds = 10001\n", "rounds must be in 1..=10000, got 10001"),
            ("min_sites = 0\n", "min_sites must be at least 1, got 0"),
            (
                "[model]\nkind = \"tabular-mlp\"\n",
                "[model] kind \"tabular-mlp\" is not yet supported for federated jobs (use \"text-classifier\")",
            ),
            ("[model]\nbuckets = 100\n", "[model] buckets must be a power of two ≥ 16, got 100"),
            ("[model]\nbuckets = 0\n", "[model] buckets must be a power of two ≥ 16, got 0"),
            (
                "[model]\nword_ngrams = [2, 1]\n",
                "[model] word_ngrams must be [lo, hi] with 1 ≤ lo ≤ hi ≤ 8 or [0, 0], got [2, 1]",
            ),
            (
                "[model]\nword_ngrams = [0, 0]\nchar_ngrams = [0, 0]\n",
                "[model] at least one of word_ngrams and char_ngrams must be enabled",
            ),
            ("[model]\nmax_chars = 0\n", "[model] max_chars must be positive"),
            ("[model]\nembed_dim = 0\n", "[model] embed_dim must be at least 1, got 0"),
            ("[model]\nhidden = 0\n", "[model] hidden must be at least 1, got 0"),
            (
                "[model]\nbuckets = 1048576\nembed_dim = 1024\n",
                "[model] buckets = 1048576, embed_dim = 1024, hidden = 128 make 1073873282 parameters, more than the limit of 268435456",
            ),
            ("[train]\nepochs = 0\n", "[train] epochs must be at least 1, got 0"),
            ("[train]\nlearning_rate = 0\n", "[train] learning_rate must be > 0, got 0"),
            ("[train]\nlearning_rate = -0.1\n", "[train] learning_rate must be > 0, got -0.1"),
            ("[train]\nlearning_rate = inf\n", "[train] learning_rate must be > 0, got inf"),
            ("[train]\nlearning_rate = nan\n", "[train] learning_rate must be > 0, got NaN"),
            ("[train]\nbatch_size = 0\n", "[train] batch_size must be at least 1, got 0"),
            ("[train]\ndropout = 1.0\n", "[train] dropout must be in [0, 1), got 1"),
            ("[train]\ndropout = -0.5\n", "[train] dropout must be in [0, 1), got -0.5"),
            ("[strategy]\nserver_learning_rate = -1\n", "[strategy] server_learning_rate must be > 0, got -1"),
            ("[strategy]\nkind = \"fedprox\"\n", "[strategy] prox_mu is required for kind \"fedprox\" (try 0.01)"),
            ("[strategy]\nkind = \"fedprox\"\nprox_mu = -1\n", "[strategy] prox_mu must be > 0, got -1"),
            ("[strategy]\nprox_mu = 0.1\n", "[strategy] prox_mu applies only to kind \"fedprox\", not \"fedavg\""),
            (
                "[strategy]\ntau = 0.1\n",
                "[strategy] tau applies only to kinds \"fedadam\" and \"fedyogi\", not \"fedavg\"",
            ),
            ("[strategy]\nkind = \"fedadam\"\nbeta1 = 1\n", "[strategy] beta1 must be in [0, 1), got 1"),
            ("[strategy]\nkind = \"fedyogi\"\nbeta2 = -0.1\n", "[strategy] beta2 must be in [0, 1), got -0.1"),
            ("[strategy]\nkind = \"fedyogi\"\ntau = 0\n", "[strategy] tau must be > 0, got 0"),
            ("[deadlines]\njoin = 0\n", "[deadlines] join must be 1..=604800 seconds, got 0"),
            ("[deadlines]\ntrain = 604801\n", "[deadlines] train must be 1..=604800 seconds, got 604801"),
            ("[deadlines]\nevaluate = 0\n", "[deadlines] evaluate must be 1..=604800 seconds, got 0"),
        ];
        for (extra, message) in cases {
            check(extra, Some(&format!("job.toml: {message}")));
        }
    }

    #[test]
    fn parse_errors_name_the_key_and_line() {
        let cases: &[(&str, &str)] = &[
            ("[strategy]\nprox_muu = 0.1\n", "job.toml:5:1: unknown field `prox_muu`, expected one of"),
            ("epoch = 3\n", "job.toml:4:1: unknown field `epoch`, expected one of"),
            ("[train]\nepochs = 1\nbatchsize = 3\n", "job.toml:6:1: unknown field `batchsize`"),
            ("[strategy]\nkind = \"fedavgg\"\n", "job.toml:5:8: unknown variant `fedavgg`, expected one of `fedavg`"),
            ("[train]\noptimizer = \"adamw\"\n", "job.toml:5:13: unknown variant `adamw`, expected `sgd` or `adam`"),
            (
                "[model]\nkind = \"cnn\"\n",
                "job.toml:5:8: unknown variant `cnn`, expected one of `text-classifier`, `encoder-head`, `encoder-lora`, `adapter-stand-in`, `tabular-mlp`",
            ),
            ("rounds = \"5\"\n", "job.toml:3:10: invalid type: string \"5\", expected u32"),
            ("rounds = -1\n", "job.toml:3:10: invalid value: integer `-1`, expected u32"),
            ("[train\n", "job.toml:4:7: "),
        ];
        for (extra, want) in cases {
            let err = JobSpec::from_toml("job.toml", &job(extra)).expect_err(want).to_string();
            assert!(err.starts_with(want), "{err:?} does not start with {want:?}");
        }
        let err = JobSpec::from_toml("job.toml", "name = \"t\"\nrounds = 1\n").expect_err("no labels").to_string();
        assert!(err.contains("missing field `labels`"), "{err}");
    }

    #[test]
    fn json_round_trip_and_validation() {
        let spec =
            JobSpec::from_toml("job.toml", &job("[strategy]\nkind = \"fedprox\"\nprox_mu = 0.01\n")).expect("valid");
        let json = spec.to_json();
        assert_eq!(JobSpec::from_json(&json).expect("round trip"), spec);
        assert_eq!(JobSpec::from_json(&json).expect("round trip").to_json(), json, "canonical");
        let err = JobSpec::from_json(&json.replace("\"rounds\":5", "\"rounds\":0")).expect_err("invalid").to_string();
        assert_eq!(err, "job JSON: rounds must be in 1..=10000, got 0");
        let err = JobSpec::from_json(&json.replace("\"rounds\":5", "\"rounds\":5,\"extra\":1")).expect_err("unknown");
        assert!(err.to_string().starts_with("job JSON:1:"), "{err}");
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn validate_names_the_job() {
        let mut spec = JobSpec::from_toml("job.toml", &job("")).expect("valid");
        spec.train.dropout = 1.5;
        assert_eq!(
            spec.validate().expect_err("invalid").to_string(),
            "job \"t\": [train] dropout must be in [0, 1), got 1.5"
        );
        assert!(spec.model_spec().is_err(), "model_spec validates");
    }

    #[test]
    fn model_spec_and_initial_params() {
        let spec =
            JobSpec::from_toml("job.toml", &job("[model]\nbuckets = 64\nembed_dim = 4\nhidden = 3\n")).expect("valid");
        let model = spec.model_spec().expect("model");
        let ModelSpec::TextClassifier { config, labels } = &model else { panic!("text classifier expected") };
        assert_eq!(config.features.buckets, 64);
        assert_eq!((config.embed_dim, config.hidden), (4, 3));
        assert_eq!(labels.names(), ["a", "b"]);
        let params = spec.initial_params().expect("init");
        assert_eq!(params.values().len(), 64 * 4 + 4 * 3 + 3 + 3 * 2 + 2);
        assert_eq!(params, model.init(7).expect("init"), "the initial model uses the job seed");
    }

    #[test]
    fn train_config_seeds_differ_per_round_attempt_and_site() {
        let spec =
            JobSpec::from_toml("job.toml", &job("[strategy]\nkind = \"fedprox\"\nprox_mu = 0.05\n")).expect("valid");
        let mut seeds = std::collections::BTreeSet::new();
        for round in 0..4 {
            for attempt in 1..3 {
                for site in [1, 2, 3] {
                    let seed = spec.train_config(round, attempt, site).seed;
                    assert!(seeds.insert(seed), "round {round} attempt {attempt} site {site}");
                }
            }
        }
        assert_eq!(spec.train_config(2, 1, 3), spec.train_config(2, 1, 3), "deterministic");
        let mut reseeded = spec.clone();
        reseeded.seed = 8;
        assert_ne!(reseeded.train_config(0, 1, 1).seed, spec.train_config(0, 1, 1).seed);
        let c = spec.train_config(0, 1, 1);
        assert_eq!((c.epochs, c.batch_size, c.prox_mu, c.optimizer), (1, 32, 0.05, Optimizer::Adam));
        c.validate().expect("a valid job gives a valid train config");
        let avg = JobSpec::from_toml("job.toml", &job("")).expect("valid");
        assert_eq!(avg.train_config(0, 1, 1).prox_mu, 0.0);
    }

    #[test]
    fn sha256_hex_known_answer() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn example_job_file_parses() {
        let text = include_str!("../../deploy/examples/job.toml");
        let spec = JobSpec::from_toml("deploy/examples/job.toml", text).expect("the example is valid");
        assert_eq!(spec.labels.len(), 5);
        assert_eq!(spec.model_spec().expect("model").labels().len(), 5);
    }
}
