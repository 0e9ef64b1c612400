//! Server-side aggregation strategies on flat f32 parameter vectors.
//!
//! The coordinator learns only Σ wᵢ·Δᵢ and Σ wᵢ (wᵢ = a site's sample count, Δᵢ = its
//! local model minus the global one), divides them into the weighted mean update Δ and
//! hands Δ to a [`ServerOptimizer`], which moves the global model:
//!
//! | kind      | update                                                                   |
//! |-----------|--------------------------------------------------------------------------|
//! | `fedavg`  | x ← x + η·Δ                                                               |
//! | `fedprox` | x ← x + η·Δ (the proximal term μ acts in the sites' local training)      |
//! | `fedadam` | m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; x ← x + η·m / (√v + τ)             |
//! | `fedyogi` | m as fedadam; v ← v − (1−β₂)Δ²·sign(v − Δ²); x ← x + η·m / (√v + τ)       |
//!
//! FedAdam and FedYogi follow Reddi et al. 2021, "Adaptive Federated Optimization",
//! Algorithm 2: no bias correction, m starts at 0 and v at τ²; sign(0) = 0. Each element
//! is computed in f64 and m, v and x are stored as f32, so a run resumed from
//! [`ServerOptimizer::state_bytes`] continues bit for bit.

use serde::{Deserialize, Serialize};

/// The aggregation strategy of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// Federated averaging (McMahan et al. 2017).
    #[default]
    FedAvg,
    /// FedAvg plus a proximal term μ/2‖w − w_global‖² in local training (Li et al. 2020).
    FedProx,
    /// Adam as the server optimiser (Reddi et al. 2021).
    FedAdam,
    /// Yogi as the server optimiser (Reddi et al. 2021).
    FedYogi,
}

impl StrategyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::FedAvg => "fedavg",
            StrategyKind::FedProx => "fedprox",
            StrategyKind::FedAdam => "fedadam",
            StrategyKind::FedYogi => "fedyogi",
        }
    }

    /// Whether the server keeps optimiser state (m, v) between rounds.
    pub fn is_adaptive(self) -> bool {
        matches!(self, StrategyKind::FedAdam | StrategyKind::FedYogi)
    }

    /// The byte that names the kind in [`ServerOptimizer::state_bytes`].
    /// One-byte tag used in persisted optimiser state.
    pub fn tag(self) -> u8 {
        match self {
            StrategyKind::FedAvg => 0,
            StrategyKind::FedProx => 1,
            StrategyKind::FedAdam => 2,
            StrategyKind::FedYogi => 3,
        }
    }

    pub fn from_tag(tag: u8) -> Option<Self> {
        [StrategyKind::FedAvg, StrategyKind::FedProx, StrategyKind::FedAdam, StrategyKind::FedYogi]
            .into_iter()
            .find(|k| k.tag() == tag)
    }
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Server learning rate η of `fedavg` and `fedprox` when not given (plain FedAvg).
pub const DEFAULT_SERVER_LEARNING_RATE: f64 = 1.0;
/// Server learning rate η of `fedadam` and `fedyogi` when not given.
pub const DEFAULT_ADAPTIVE_SERVER_LEARNING_RATE: f64 = 0.01;
/// β₁ of `fedadam` and `fedyogi` when not given.
pub const DEFAULT_BETA1: f64 = 0.9;
/// β₂ of `fedadam` and `fedyogi` when not given.
pub const DEFAULT_BETA2: f64 = 0.99;
/// Adaptivity τ of `fedadam` and `fedyogi` when not given.
pub const DEFAULT_TAU: f64 = 1e-3;

/// The `[strategy]` table of a job file.
///
/// A key left out (`None`) takes the default for the kind: read the effective values
/// through the methods of the same name. Keys that do not apply to the kind are refused
/// by [`StrategySpec::validate`] rather than silently ignored.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySpec {
    #[serde(default)]
    pub kind: StrategyKind,
    /// FedProx proximal coefficient μ (`fedprox` only, required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prox_mu: Option<f64>,
    /// Server learning rate η (all kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    /// First-moment decay β₁ (`fedadam`, `fedyogi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// Second-moment decay β₂ (`fedadam`, `fedyogi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// Adaptivity τ (`fedadam`, `fedyogi`): the smaller, the more adaptive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
}

impl StrategySpec {
    /// The effective μ: the given value for `fedprox`, 0 (no proximal term) otherwise.
    pub fn prox_mu(&self) -> f64 {
        match self.kind {
            StrategyKind::FedProx => self.prox_mu.unwrap_or(0.0),
            _ => 0.0,
        }
    }

    /// The effective server learning rate η.
    pub fn server_learning_rate(&self) -> f64 {
        self.server_learning_rate.unwrap_or(if self.kind.is_adaptive() {
            DEFAULT_ADAPTIVE_SERVER_LEARNING_RATE
        } else {
            DEFAULT_SERVER_LEARNING_RATE
        })
    }

    pub fn beta1(&self) -> f64 {
        self.beta1.unwrap_or(DEFAULT_BETA1)
    }

    pub fn beta2(&self) -> f64 {
        self.beta2.unwrap_or(DEFAULT_BETA2)
    }

    pub fn tau(&self) -> f64 {
        self.tau.unwrap_or(DEFAULT_TAU)
    }

    /// The same spec with every key that applies to the kind written out, so that the
    /// stored job records the values used even if a later version changes a default.
    /// `prox_mu` has no default and stays as given.
    pub fn with_defaults(&self) -> StrategySpec {
        let adaptive = self.kind.is_adaptive();
        StrategySpec {
            kind: self.kind,
            prox_mu: self.prox_mu,
            server_learning_rate: Some(self.server_learning_rate()),
            beta1: if adaptive { Some(self.beta1()) } else { self.beta1 },
            beta2: if adaptive { Some(self.beta2()) } else { self.beta2 },
            tau: if adaptive { Some(self.tau()) } else { self.tau },
        }
    }

    /// Checks ranges, that `fedprox` has `prox_mu`, and that no key is given that the
    /// kind does not use.
    pub fn validate(&self) -> Result<(), StrategyError> {
        let invalid = |key: &'static str, problem: String| Err(StrategyError::InvalidSpec { key, problem });
        let kind = self.kind;
        match (kind, self.prox_mu) {
            (StrategyKind::FedProx, None) => {
                return invalid("prox_mu", "is required for kind \"fedprox\" (try 0.01)".into());
            }
            (StrategyKind::FedProx, Some(mu)) if !(mu.is_finite() && mu > 0.0) => {
                return invalid("prox_mu", format!("must be > 0, got {mu}"));
            }
            (StrategyKind::FedProx, Some(_)) | (_, None) => {}
            (_, Some(_)) => return invalid("prox_mu", format!("applies only to kind \"fedprox\", not \"{kind}\"")),
        }
        let eta = self.server_learning_rate();
        if !(eta.is_finite() && eta > 0.0) {
            return invalid("server_learning_rate", format!("must be > 0, got {eta}"));
        }
        for (key, value) in [("beta1", self.beta1), ("beta2", self.beta2), ("tau", self.tau)] {
            if value.is_some() && !kind.is_adaptive() {
                return invalid(key, format!("applies only to kinds \"fedadam\" and \"fedyogi\", not \"{kind}\""));
            }
        }
        for (key, beta) in [("beta1", self.beta1()), ("beta2", self.beta2())] {
            if !(0.0..1.0).contains(&beta) {
                return invalid(key, format!("must be in [0, 1), got {beta}"));
            }
        }
        let tau = self.tau();
        if !(tau.is_finite() && tau > 0.0) {
            return invalid("tau", format!("must be > 0, got {tau}"));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StrategyError {
    /// A `[strategy]` key is missing, out of range or does not apply to the kind.
    #[error("[strategy] {key} {problem}")]
    InvalidSpec { key: &'static str, problem: String },
    #[error("{what} has {actual} parameters, the server optimiser was built for {expected}")]
    LengthMismatch { what: &'static str, expected: usize, actual: usize },
    #[error("mean update is not finite at index {index}: {value}")]
    NonFiniteDelta { index: usize, value: f32 },
    #[error("{kind} step at index {index} leaves f32 range (update too large); the global model is unchanged")]
    NonFiniteResult { kind: StrategyKind, index: usize },
    /// Persisted optimiser state that does not belong to this job or is damaged.
    #[error("server optimiser state: {0}")]
    BadState(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation_names_the_key() {
        let check = |spec: StrategySpec, want: Option<&str>| {
            assert_eq!(spec.validate().err().map(|e| e.to_string()).as_deref(), want, "{spec:?}");
        };
        let (adam, yogi, prox) = (StrategyKind::FedAdam, StrategyKind::FedYogi, StrategyKind::FedProx);
        check(StrategySpec::default(), None);
        check(StrategySpec { kind: adam, ..Default::default() }, None);
        check(StrategySpec { kind: prox, prox_mu: Some(0.01), ..Default::default() }, None);
        check(
            StrategySpec { server_learning_rate: Some(-1.0), ..Default::default() },
            Some("[strategy] server_learning_rate must be > 0, got -1"),
        );
        check(
            StrategySpec { server_learning_rate: Some(f64::INFINITY), ..Default::default() },
            Some("[strategy] server_learning_rate must be > 0, got inf"),
        );
        check(
            StrategySpec { kind: prox, ..Default::default() },
            Some("[strategy] prox_mu is required for kind \"fedprox\" (try 0.01)"),
        );
        check(
            StrategySpec { kind: prox, prox_mu: Some(0.0), ..Default::default() },
            Some("[strategy] prox_mu must be > 0, got 0"),
        );
        check(
            StrategySpec { prox_mu: Some(0.1), ..Default::default() },
            Some("[strategy] prox_mu applies only to kind \"fedprox\", not \"fedavg\""),
        );
        check(
            StrategySpec { kind: prox, prox_mu: Some(0.1), beta1: Some(0.5), ..Default::default() },
            Some("[strategy] beta1 applies only to kinds \"fedadam\" and \"fedyogi\", not \"fedprox\""),
        );
        check(
            StrategySpec { kind: adam, beta2: Some(1.0), ..Default::default() },
            Some("[strategy] beta2 must be in [0, 1), got 1"),
        );
        check(
            StrategySpec { kind: yogi, beta1: Some(-0.1), ..Default::default() },
            Some("[strategy] beta1 must be in [0, 1), got -0.1"),
        );
        check(
            StrategySpec { kind: yogi, tau: Some(0.0), ..Default::default() },
            Some("[strategy] tau must be > 0, got 0"),
        );
    }

    #[test]
    fn defaults_depend_on_the_kind() {
        let avg = StrategySpec::default().with_defaults();
        assert_eq!(avg, StrategySpec { server_learning_rate: Some(1.0), ..Default::default() });
        let adam = StrategySpec { kind: StrategyKind::FedAdam, ..Default::default() }.with_defaults();
        assert_eq!(
            adam,
            StrategySpec {
                kind: StrategyKind::FedAdam,
                prox_mu: None,
                server_learning_rate: Some(0.01),
                beta1: Some(0.9),
                beta2: Some(0.99),
                tau: Some(1e-3),
            }
        );
    }
}
