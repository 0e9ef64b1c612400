//! The `[privacy]` table and the privacy plan every party derives from it
//! (`docs/protocols/privacy.md`): the mode, the target, and the noise the accountant
//! calibrates for the local or the distributed mechanism.

use serde::{Deserialize, Serialize};

use super::Invalid;

/// How a job protects each training record (`[privacy] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyMode {
    /// No differential privacy: the released model carries no per-record guarantee.
    #[default]
    None,
    /// Every site runs DP-SGD with the full noise: the guarantee holds against everyone,
    /// with no trust in the coordinator, other sites or secure aggregation.
    Local,
    /// One DP-SGD step per round over the union of the sites' records; each site adds a
    /// share of integer (Skellam) noise, so only the secure sum carries all of it
    /// (`maeum_models::ddp`). Needs secure aggregation and at most `colluders`
    /// colluding sites.
    Distributed,
}

impl PrivacyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PrivacyMode::None => "none",
            PrivacyMode::Local => "local",
            PrivacyMode::Distributed => "distributed",
        }
    }

    /// The mechanism's name in the ledger, the log and the model card.
    pub fn mechanism(self) -> &'static str {
        match self {
            PrivacyMode::None => "none",
            PrivacyMode::Local => "dp-sgd-local",
            PrivacyMode::Distributed => "dp-sgd-distributed-skellam",
        }
    }
}

/// The `[privacy]` table: record-level (ε, δ)-differential privacy per site over the
/// whole job. The noise multiplier is not written in the job: the coordinator and every
/// site derive the same one from these values with the accountant
/// ([`PrivacyTable::plan`]), and every site checks the result against its own policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyTable {
    pub mode: PrivacyMode,
    /// Target ε per record per site over all the job's rounds.
    pub epsilon: f64,
    /// δ of the guarantee (at most 1e-3; well below 1/records is the usual choice).
    pub delta: f64,
    /// Per-example L2 clipping norm C of DP-SGD.
    pub clip: f64,
    /// Poisson sampling rate q of each DP-SGD step; a round is ⌈epochs / q⌉ steps
    /// (`local`), or one step (`distributed`).
    pub sample_rate: f64,
    /// `distributed`: survivors that may collude with the coordinator (their noise shares
    /// do not count). Each site's share is 1 / (min_sites − colluders) of the noise.
    #[serde(skip_serializing_if = "is_zero")]
    pub colluders: u32,
    /// `distributed`: a site's clipped-gradient sum is bounded to L2 norm clip × max_batch
    /// (what keeps the secure sum inside 32 bits).
    #[serde(skip_serializing_if = "is_default_max_batch")]
    pub max_batch: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// `[privacy] max_batch` when not given.
pub const DEFAULT_MAX_BATCH: u32 = 1024;

fn is_default_max_batch(v: &u32) -> bool {
    *v == DEFAULT_MAX_BATCH
}

impl Default for PrivacyTable {
    fn default() -> Self {
        Self {
            mode: PrivacyMode::None,
            epsilon: 0.0,
            delta: 1e-5,
            clip: 1.0,
            sample_rate: 0.05,
            colluders: 0,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

/// The DP-SGD plan of a job: what every site runs each round, and what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyPlan {
    /// `local` (plans written before the distributed mode have no `mode`).
    #[serde(default = "local_mode")]
    pub mode: PrivacyMode,
    pub clip: f64,
    /// σ (`local`: noise std σ·C per step) or z (`distributed`: the whole noise's std is
    /// z times the integer sensitivity).
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub steps_per_round: u64,
    pub rounds: u32,
    pub delta: f64,
    /// ε per record per site after all rounds (≤ the job's target).
    pub epsilon: f64,
    /// `distributed`: parameters of the model (d).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub dimension: u64,
    /// `distributed`: honest sites whose shares make the whole noise (m).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub noise_shares: u32,
    /// `distributed`: the bound B on a site's clipped-gradient sum (C·B).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_batch: u32,
}

/// The RDP curve of `steps` steps of a `mode` mechanism at sampling rate `q` and noise
/// multiplier `z` (for `distributed`, over `dimension` parameters; a round is one
/// step): what a plan, and a site's ledger for the jobs it already ran, account with.
pub fn rdp_of(
    mode: PrivacyMode,
    q: f64,
    z: f64,
    dimension: u64,
    steps: u64,
) -> Result<maeum_models::accountant::Rdp, String> {
    use maeum_models::accountant::Rdp;
    match mode {
        PrivacyMode::Distributed => Rdp::subsampled_skellam(q, maeum_models::ddp::skellam_of(dimension, z), steps),
        PrivacyMode::Local => Rdp::subsampled_gaussian(q, z, steps),
        PrivacyMode::None => return Err("no differential privacy, no curve".into()),
    }
    .map_err(|e| e.to_string())
}

fn local_mode() -> PrivacyMode {
    PrivacyMode::Local
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

impl PrivacyPlan {
    /// The distributed mechanism of one round (`None` in `local` mode).
    pub fn distributed(&self) -> Option<maeum_models::ddp::DistributedDp> {
        (self.mode == PrivacyMode::Distributed).then_some(maeum_models::ddp::DistributedDp {
            clip: self.clip,
            noise_multiplier: self.noise_multiplier,
            sample_rate: self.sample_rate,
            dimension: self.dimension,
            noise_shares: self.noise_shares,
            max_batch: self.max_batch,
        })
    }

    /// The RDP curve of `rounds` rounds of this plan for one record.
    pub fn rdp_after(&self, rounds: u32) -> Result<maeum_models::accountant::Rdp, String> {
        self.rdp_of_steps(self.steps_per_round * u64::from(rounds))
    }

    /// The RDP curve of `steps` steps of this plan's mechanism (a round of the
    /// distributed mode is one step).
    pub fn rdp_of_steps(&self, steps: u64) -> Result<maeum_models::accountant::Rdp, String> {
        rdp_of(self.mode, self.sample_rate, self.noise_multiplier, self.dimension, steps)
    }

    /// The mechanism in one line for people (`jobs submit`, the demo).
    pub fn describe(&self) -> String {
        match self.distributed() {
            Some(m) => format!(
                "distributed DP: one DP-SGD step a round over every site's records, the Skellam noise split among \
                 ≥ {} honest sites under secure aggregation (clip {}, noise multiplier {:.4}, Poisson sampling at {}, \
                 {} parameters, a site's sum bounded at clip × {}, at most {} sites a session)",
                m.noise_shares,
                self.clip,
                self.noise_multiplier,
                self.sample_rate,
                m.dimension,
                m.max_batch,
                m.max_parties()
            ),
            None => format!(
                "local DP-SGD at every site (clip {}, noise multiplier {:.4}, Poisson sampling at {}, {} steps a round)",
                self.clip, self.noise_multiplier, self.sample_rate, self.steps_per_round
            ),
        }
    }

    /// The mode whose mechanism the ledger, the log and the card name `mechanism`.
    pub fn mode_of_mechanism(mechanism: &str) -> Option<PrivacyMode> {
        [PrivacyMode::Local, PrivacyMode::Distributed].into_iter().find(|m| m.mechanism() == mechanism)
    }

    /// The DP-SGD mechanism of one round.
    pub fn round_mechanism(&self) -> maeum_models::dp::DpSgd {
        maeum_models::dp::DpSgd {
            clip: self.clip,
            noise_multiplier: self.noise_multiplier,
            sample_rate: self.sample_rate,
            steps: self.steps_per_round,
        }
    }

    /// ε per record after `rounds` rounds of this plan.
    pub fn epsilon_after(&self, rounds: u32) -> f64 {
        self.rdp_after(rounds).ok().and_then(|r| r.epsilon(self.delta).ok()).unwrap_or(f64::INFINITY)
    }
}

/// Largest noise multiplier a plan may need; beyond it the model learns nothing.
pub const MAX_NOISE_MULTIPLIER: f64 = 50.0;

impl PrivacyTable {
    pub fn is_off(&self) -> bool {
        self.mode == PrivacyMode::None
    }

    pub(super) fn check(&self) -> Result<(), Invalid> {
        let key = |k: &str| format!("[privacy] {k}");
        if self.is_off() {
            // Keys that do not apply are errors: an epsilon without a mode would otherwise
            // be a job without differential privacy that looks like one.
            let d = PrivacyTable::default();
            let set: Vec<&str> = [
                ("epsilon", self.epsilon != d.epsilon),
                ("delta", self.delta != d.delta),
                ("clip", self.clip != d.clip),
                ("sample_rate", self.sample_rate != d.sample_rate),
                ("colluders", self.colluders != d.colluders),
                ("max_batch", self.max_batch != d.max_batch),
            ]
            .into_iter()
            .filter_map(|(k, set)| set.then_some(k))
            .collect();
            if !set.is_empty() {
                return Err(Invalid::new(
                    key("mode"),
                    format!(
                        "is \"none\" (the default), but {} set: add mode = \"local\" or \"distributed\", or remove them",
                        set.join(", ")
                    ),
                ));
            }
            return Ok(());
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon <= 100.0) {
            return Err(Invalid::new(key("epsilon"), format!("must be in (0, 100], got {}", self.epsilon)));
        }
        if !(self.delta > 0.0 && self.delta <= 1e-3) {
            return Err(Invalid::new(key("delta"), format!("must be in (0, 1e-3], got {}", self.delta)));
        }
        if !(self.clip.is_finite() && self.clip > 0.0 && self.clip <= 1e3) {
            return Err(Invalid::new(key("clip"), format!("must be in (0, 1000], got {}", self.clip)));
        }
        if !(self.sample_rate >= 1e-4 && self.sample_rate <= 1.0) {
            return Err(Invalid::new(key("sample_rate"), format!("must be in [0.0001, 1], got {}", self.sample_rate)));
        }
        if !(1..=1 << 20).contains(&self.max_batch) {
            return Err(Invalid::new(key("max_batch"), format!("must be in 1..=1048576, got {}", self.max_batch)));
        }
        if self.mode == PrivacyMode::Local && (self.colluders != 0 || self.max_batch != DEFAULT_MAX_BATCH) {
            return Err(Invalid::new(key("mode"), "is \"local\": colluders and max_batch apply to \"distributed\""));
        }
        Ok(())
    }

    /// The plan for `rounds` rounds of `epochs` epochs: ⌈epochs / q⌉ steps per round and
    /// the smallest noise multiplier (to 1e-6) whose ε over all steps is at most the
    /// target. Deterministic, so the coordinator and every site derive the same plan.
    /// `None` when privacy is off.
    ///
    /// `distributed`: one step per round over a model of `dimension` parameters, the noise
    /// split into `min_sites − colluders` shares, z calibrated with the Skellam accountant.
    pub fn plan(
        &self,
        rounds: u32,
        epochs: u32,
        dimension: u64,
        min_sites: u32,
    ) -> Result<Option<PrivacyPlan>, String> {
        if self.is_off() {
            return Ok(None);
        }
        self.check().map_err(|e| format!("{} {}", e.key, e.problem))?;
        if self.mode == PrivacyMode::Distributed {
            return self.distributed_plan(rounds, dimension, min_sites).map(Some);
        }
        let steps_per_round = (f64::from(epochs.max(1)) / self.sample_rate).ceil() as u64;
        let total = steps_per_round * u64::from(rounds);
        let sigma = maeum_models::accountant::noise_multiplier_for(self.epsilon, self.delta, self.sample_rate, total)
            .map_err(|e| e.to_string())?
            .filter(|s| *s <= MAX_NOISE_MULTIPLIER)
            .ok_or_else(|| {
                format!(
                    "ε = {} at δ = {} over {rounds} rounds × {steps_per_round} steps (q = {}) needs a noise \
                     multiplier above {MAX_NOISE_MULTIPLIER}: raise epsilon, lower rounds, epochs or sample_rate",
                    self.epsilon, self.delta, self.sample_rate
                )
            })?;
        let epsilon = maeum_models::accountant::dp_sgd_epsilon(self.sample_rate, sigma, total, self.delta)
            .map_err(|e| e.to_string())?;
        Ok(Some(PrivacyPlan {
            mode: PrivacyMode::Local,
            clip: self.clip,
            noise_multiplier: sigma,
            sample_rate: self.sample_rate,
            steps_per_round,
            rounds,
            delta: self.delta,
            epsilon,
            dimension: 0,
            noise_shares: 0,
            max_batch: 0,
        }))
    }

    fn distributed_plan(&self, rounds: u32, dimension: u64, min_sites: u32) -> Result<PrivacyPlan, String> {
        if self.colluders >= min_sites {
            return Err(format!(
                "colluders = {} leaves no honest noise share among min_sites = {min_sites}: raise min_sites",
                self.colluders
            ));
        }
        let mut plan = PrivacyPlan {
            mode: PrivacyMode::Distributed,
            clip: self.clip,
            noise_multiplier: 1.0,
            sample_rate: self.sample_rate,
            steps_per_round: 1,
            rounds,
            delta: self.delta,
            epsilon: 0.0,
            dimension,
            noise_shares: min_sites - self.colluders,
            max_batch: self.max_batch,
        };
        let curve = |z: f64| {
            let mut p = plan;
            p.noise_multiplier = z;
            p.rdp_after(rounds).map_err(|_| maeum_models::accountant::AccountantError::NoiseMultiplier(z))
        };
        let z = maeum_models::accountant::calibrate(self.epsilon, self.delta, &curve)
            .map_err(|e| e.to_string())?
            .filter(|z| *z <= MAX_NOISE_MULTIPLIER)
            .ok_or_else(|| {
                format!(
                    "ε = {} at δ = {} over {rounds} rounds (q = {}) needs a noise multiplier above \
                     {MAX_NOISE_MULTIPLIER}: raise epsilon, lower rounds or sample_rate",
                    self.epsilon, self.delta, self.sample_rate
                )
            })?;
        plan.noise_multiplier = z;
        plan.epsilon = plan.epsilon_after(rounds);
        // INVARIANT: every field was validated above.
        let mechanism = plan.distributed().ok_or("not a distributed plan")?;
        if mechanism.max_parties() < min_sites as usize {
            return Err(format!(
                "max_batch = {}: a session of min_sites = {min_sites} could wrap 32 bits for {dimension} \
                 parameters (at most {} sites): lower max_batch",
                self.max_batch,
                mechanism.max_parties()
            ));
        }
        Ok(plan)
    }
}
