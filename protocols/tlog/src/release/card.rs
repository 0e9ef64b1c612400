//! The model card: what a release claims about its model (evaluation, rounds, secure
//! aggregation, privacy, crisis-class flags) and the gates a promotion checks it against.

use super::*;

/// Metrics of one model on the sites' held-out splits (summed confusion counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardEvaluation {
    /// Held-out examples behind the numbers.
    pub examples: u64,
    /// Sites whose counts are in the sum.
    pub evaluated_by: u32,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// Recall per class, crisis classes first (see [`is_crisis_label`]), then in label
    /// order; `null` for a class with no held-out examples.
    pub recall: Vec<ClassRecall>,
    /// `confusion[true][predicted]`, in label order.
    pub confusion: Vec<Vec<u64>>,
}

/// One class's recall.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassRecall {
    pub label: String,
    pub recall: Option<f64>,
    /// Whether this is a crisis class.
    pub crisis: bool,
}

/// One federated round behind a release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardRound {
    pub round: u32,
    /// Sites whose updates are in the round's aggregate.
    pub contributors: u32,
    /// Sites that dropped out of the secure-aggregation session.
    pub dropped: u32,
    /// Sum of the contributors' training examples.
    pub total_weight: u64,
    pub secure_aggregation: bool,
    pub secagg_threshold: u32,
    /// SHA-256 (hex) of the unmasked aggregate (as in the audit log).
    pub aggregate_sha256: String,
    /// SHA-256 (hex) of the model this round produced.
    pub model_sha256: String,
    /// Federated evaluation of that model, if it ran.
    pub evaluation: Option<CardEvaluation>,
}

/// What the model is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardModel {
    pub sha256: String,
    pub size: u64,
    pub layout_digest: String,
    /// e.g. `text-classifier`.
    pub kind: String,
    pub parameters: u64,
    pub labels: Vec<String>,
    /// The frozen pretrained encoder the model runs (kind `encoder-head`); absent for
    /// models without one (and in cards written before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<CardEncoder>,
    /// The LoRA adapters trained on the encoder's top layers (kind `encoder-lora`);
    /// absent for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<CardAdapter>,
}

/// FFA-LoRA adapters: `A` frozen and drawn from `seed`, `B` trained (and released).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardAdapter {
    /// How many of the encoder's top layers carry adapters.
    pub layers: u32,
    pub rank: u32,
    /// The scale is `alpha / rank`.
    pub alpha: f32,
    /// Seed of the frozen `A` matrices.
    pub seed: u64,
}

impl std::fmt::Display for CardAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FFA-LoRA on the top {} layers, rank {}, alpha {}, A seed {}",
            self.layers, self.rank, self.alpha, self.seed
        )
    }
}

/// A pretrained encoder by name and digests: sites run it only from files they hold
/// with exactly these digests; it is not part of the released file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardEncoder {
    pub name: String,
    /// SHA-256 (hex) of the encoder's `model.safetensors`.
    pub sha256: String,
    /// SHA-256 (hex) of its `tokenizer.json`.
    pub tokenizer_sha256: String,
    /// Tokens per text (longer texts are truncated).
    pub max_tokens: u32,
    /// Width of the sentence vector.
    pub dim: u32,
}

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardJob {
    pub id: String,
    pub name: String,
    /// SHA-256 (hex) of the job file as submitted (as in the audit log).
    pub spec_sha256: String,
    pub rounds: u32,
    /// The job's full configuration (model, training, strategy, deadlines, secure
    /// aggregation), as the coordinator's canonical job JSON.
    pub config: serde_json::Value,
}

/// The secure-aggregation parameters the job ran with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardSecAgg {
    pub enabled: bool,
    /// Threshold t as configured (0: the default rule, see docs/jobs.md); each
    /// round's actual threshold is in [`CardRound::secagg_threshold`].
    pub threshold: u32,
    /// 0: every pair masks; k: SecAgg+ neighbour degree.
    pub neighbours: u32,
    /// Each coordinate of an update is clipped to [-clip, clip] before quantisation.
    pub clip: f32,
    /// A site's weight (training records) is capped at this.
    pub max_weight: u32,
}

/// A model card: everything a site, a lead or an auditor needs to know about a
/// released model. The coordinator writes it once; its bytes are what is signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// [`CARD_FORMAT`].
    pub format: String,
    pub consortium: String,
    pub version: u32,
    /// The release that was current when this one was made (what it supersedes).
    pub parent_version: Option<u32>,
    pub model: CardModel,
    pub job: CardJob,
    /// The round whose model this is.
    pub round: u32,
    /// Milliseconds since the Unix epoch (the coordinator's clock).
    pub released_ms: i64,
    pub secure_aggregation: CardSecAgg,
    /// Federated evaluation of the job's initial model.
    pub initial_evaluation: Option<CardEvaluation>,
    /// Every round of the job up to `round`.
    pub rounds: Vec<CardRound>,
    /// Federated evaluation of the released model.
    pub evaluation: Option<CardEvaluation>,
    /// The crisis flag's operating threshold, chosen from the released model's federated
    /// evaluation; absent when the labels have no crisis class (and in cards written
    /// before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crisis_flag: Option<CardCrisisFlag>,
    /// Record-level differential privacy of the job up to `round`; absent for a job
    /// without `[privacy]` (and in cards written before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<CardPrivacy>,
}

/// What a released model guarantees each training record (`docs/protocols/privacy.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardPrivacy {
    /// `dp-sgd-local`: every site ran DP-SGD with the full noise;
    /// `dp-sgd-distributed-skellam`: one step a round over the union, the noise split
    /// among at least `noise_shares` honest sites under secure aggregation.
    pub mechanism: String,
    /// Per-example L2 clipping norm C.
    pub clip: f64,
    /// Noise multiplier σ (noise standard deviation σ·C per step).
    pub noise_multiplier: f64,
    /// `poisson`, at `sample_rate` per step.
    pub sampling: String,
    pub sample_rate: f64,
    /// DP-SGD steps per round, and the rounds up to this release.
    pub steps_per_round: u64,
    pub rounds: u32,
    pub delta: f64,
    /// ε per record per site for a site that trained in every round up to this release
    /// (the accountant over `steps_per_round × rounds` steps): the claim this card makes.
    pub epsilon: f64,
    /// ε each site reported charging to its ledger for this job (`privacy_charged`
    /// entries in the audit log), as logged (decimal strings).
    pub epsilon_per_site: std::collections::BTreeMap<String, String>,
    /// `distributed`: the honest sites whose Skellam shares make the whole noise (the
    /// guarantee assumes secure aggregation holds and no more colluders than
    /// `min_sites − noise_shares`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_shares: Option<u32>,
}

/// How `maeum-site predict` flags a possible crisis with this model: when any crisis
/// class's probability is at or above `threshold`. The threshold is the largest
/// (a multiple of 0.01) whose recall on the sites' summed held-out histograms is at
/// least `target_recall`; `recall` and `precision` are what it gives there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardCrisisFlag {
    /// The crisis classes (see [`is_crisis_label`]).
    pub classes: Vec<String>,
    /// The consortium's target recall for the flag.
    pub target_recall: f64,
    /// `None` when it could not be chosen (no held-out crisis example was reported):
    /// sites then use their own setting or the documented fallback.
    pub threshold: Option<f64>,
    pub recall: Option<f64>,
    /// Share of flagged held-out examples whose true label is a crisis class.
    pub precision: Option<f64>,
    /// Held-out examples behind the numbers, and how many of them are crisis examples.
    pub examples: u64,
    pub crisis_examples: u64,
}

/// What the summed crisis histograms of a federated evaluation give at the operating
/// point the coordinator chose (computed by the caller from
/// `maeum_models::metrics::CrisisHistogram`, so this crate needs no model code).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrisisMeasure {
    /// The operating point reaching the target recall: threshold, recall, precision
    /// (`None` when no threshold reaches it).
    pub point: Option<(f64, f64, Option<f64>)>,
    /// Held-out examples behind the numbers, and how many are crisis examples.
    pub examples: u64,
    pub crisis_examples: u64,
}

impl CardCrisisFlag {
    /// The flag's operating point for `labels` from the summed histograms' measure
    /// (`None` without a crisis class; a flag without a threshold without histograms).
    pub fn choose(labels: &[String], measure: Option<CrisisMeasure>, target_recall: f64) -> Option<CardCrisisFlag> {
        let classes: Vec<String> = labels.iter().filter(|l| is_crisis_label(l)).cloned().collect();
        if classes.is_empty() {
            return None;
        }
        let point = measure.and_then(|m| m.point);
        Some(CardCrisisFlag {
            classes,
            target_recall,
            threshold: point.map(|p| p.0),
            recall: point.map(|p| p.1),
            precision: point.and_then(|p| p.2),
            examples: measure.map_or(0, |m| m.examples),
            crisis_examples: measure.map_or(0, |m| m.crisis_examples),
        })
    }
}

/// The consortium's minimum metrics for promoting a release (`release_gates` in the
/// coordinator's `consortium.json`), checked against the card's federated evaluation
/// of the released model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseGates {
    /// Minimum recall of every crisis class (see [`is_crisis_label`]); applies when
    /// the labels have one.
    #[serde(default = "default_min_crisis_recall")]
    pub min_crisis_recall: f64,
    /// Minimum macro-F1 (none by default).
    #[serde(default)]
    pub min_macro_f1: Option<f64>,
}

/// The default `min_crisis_recall`.
pub const DEFAULT_MIN_CRISIS_RECALL: f64 = 0.5;

pub(super) fn default_min_crisis_recall() -> f64 {
    DEFAULT_MIN_CRISIS_RECALL
}

impl Default for ReleaseGates {
    fn default() -> Self {
        Self { min_crisis_recall: DEFAULT_MIN_CRISIS_RECALL, min_macro_f1: None }
    }
}

/// A gate a release does not pass.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateFailure {
    /// `min_crisis_recall` or `min_macro_f1`.
    pub gate: String,
    /// The card's value (`None`: the card has no such measurement).
    pub measured: Option<f64>,
    pub threshold: f64,
    /// What was measured, in words.
    pub what: String,
}

impl std::fmt::Display for GateFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.measured {
            Some(m) => {
                write!(f, "gate {}: {} is {m:.4}, below the threshold {:.4}", self.gate, self.what, self.threshold)
            }
            None => write!(f, "gate {}: {} was not measured (threshold {:.4})", self.gate, self.what, self.threshold),
        }
    }
}

impl ReleaseGates {
    /// Checks the thresholds are in [0, 1].
    pub fn validate(&self) -> Result<(), String> {
        let ok = |v: f64| (0.0..=1.0).contains(&v);
        if !ok(self.min_crisis_recall) {
            return Err(format!("release_gates.min_crisis_recall must be in [0, 1], got {}", self.min_crisis_recall));
        }
        if let Some(v) = self.min_macro_f1.filter(|v| !ok(*v)) {
            return Err(format!("release_gates.min_macro_f1 must be in [0, 1], got {v}"));
        }
        Ok(())
    }

    /// The gates `card` fails (empty: it may be promoted). A card without federated
    /// evaluation fails every gate that applies; a crisis class without held-out
    /// examples fails the crisis gate.
    pub fn check(&self, card: &ModelCard) -> Vec<GateFailure> {
        let mut failures = Vec::new();
        let eval = card.evaluation.as_ref();
        let crisis: Vec<&String> = card.model.labels.iter().filter(|l| is_crisis_label(l)).collect();
        if !crisis.is_empty() {
            let names = crisis.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
            let measured = eval.and_then(crisis_recall);
            if measured.is_none_or(|m| m < self.min_crisis_recall) {
                failures.push(GateFailure {
                    gate: "min_crisis_recall".into(),
                    measured,
                    threshold: self.min_crisis_recall,
                    what: format!("the federated crisis-class recall ({names})"),
                });
            }
        }
        if let Some(min) = self.min_macro_f1 {
            let measured = eval.map(|e| e.macro_f1);
            if measured.is_none_or(|m| m < min) {
                failures.push(GateFailure {
                    gate: "min_macro_f1".into(),
                    measured,
                    threshold: min,
                    what: "the federated macro-F1".into(),
                });
            }
        }
        failures
    }
}

/// The crisis-class recall of an evaluation: the lowest recall among the crisis
/// classes (`None` without a crisis class, or when one has no held-out example).
pub fn crisis_recall(e: &CardEvaluation) -> Option<f64> {
    let crisis: Vec<Option<f64>> = e.recall.iter().filter(|c| c.crisis).map(|c| c.recall).collect();
    if crisis.is_empty() {
        return None;
    }
    crisis.into_iter().try_fold(f64::INFINITY, |m, r| r.map(|r| m.min(r)))
}

impl ModelCard {
    /// The card's bytes (pretty JSON: people read it too).
    pub fn encode(&self) -> Vec<u8> {
        // INVARIANT: plain data, finite floats (metrics of counts) serialise.
        serde_json::to_vec_pretty(self).expect("a model card serialises")
    }

    /// Parses card bytes (size-limited).
    pub fn decode(bytes: &[u8]) -> Result<ModelCard, ReleaseError> {
        decode_json(bytes, MAX_CARD_BYTES, CARD_FORMAT, |c: &ModelCard| &c.format, ReleaseError::CardMalformed)
    }
}
