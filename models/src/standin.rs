//! The adapter stand-in: a flat vector the size of a large model's LoRA adapters
//! (10M–100M parameters) whose local "training" costs one pass over the vector, for
//! scale tests and benchmarks of everything around training: transfers, masking,
//! folding, releases (`docs/models.md#the-adapter-stand-in`). It is not a clinical
//! model: it predicts the label prior for every input.
//!
//! Parameters: `prior.logits` (one per label) and `adapter.weight` (`params` values).
//! Training on examples with `n_l` of label `l` out of `n`, `L` labels and learning rate
//! `η` (clamped to `[0, 1]`):
//! - `prior.logits[l] += η · (ln((n_l + 1) / (n + L)) − prior.logits[l])`;
//! - `adapter.weight[j] += η · s(j) · (n_{j mod L} / n − 1 / L)`, with `s(j) = ±1`
//!   from a hash of `j` ([`sign`]).
//!
//! So the weighted federated mean of the sites' adapter updates is exactly
//! `η · s(j) · (N_{j mod L} / N − 1 / L)` over the cohort's label counts: a test can
//! check an aggregate to the last position (up to the fixed-point rounding of secure
//! aggregation). The update reveals the site's label frequencies, which is why a
//! stand-in job is only as private as its aggregation (`docs/models.md`).

use crate::metrics::Confusion;
use crate::model::ModelError;
use crate::nn::{TrainConfig, TrainReport};
use crate::params::{FlatParams, Layout, TensorSpec};

/// The stand-in's shape: `params` adapter values and `n_labels` prior logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandInArch {
    pub params: usize,
    pub n_labels: usize,
}

impl StandInArch {
    pub fn layout(&self) -> Layout {
        Layout::new(vec![
            TensorSpec { name: "prior.logits".into(), shape: vec![self.n_labels] },
            TensorSpec { name: "adapter.weight".into(), shape: vec![self.params] },
        ])
    }

    /// Zero logits (a uniform prior) and adapter values in `[-0.01, 0.01)` drawn from `seed`.
    pub fn init(&self, seed: u64) -> FlatParams {
        let mut values = vec![0f32; self.n_labels + self.params];
        let key = splitmix64(seed ^ 0x5eed_ada9_7e25_0000);
        for (j, v) in values[self.n_labels..].iter_mut().enumerate() {
            // 24 random bits → [0, 1) exactly representable in f32.
            let u = (splitmix64(key ^ j as u64) >> 40) as f32 / (1u32 << 24) as f32;
            *v = (u - 0.5) * 0.02;
        }
        // INVARIANT: the vector has the layout's length by construction.
        #[allow(clippy::unwrap_used)]
        FlatParams::new(self.layout(), values).unwrap()
    }

    /// One pass of the documented update over `labels` (each `< n_labels`).
    pub fn train(
        &self,
        start: &FlatParams,
        labels: &[usize],
        cfg: &TrainConfig,
    ) -> Result<(FlatParams, TrainReport), ModelError> {
        let started = std::time::Instant::now();
        start.expect_layout(&self.layout())?;
        let counts = self.counts(labels)?;
        let (n, l) = (labels.len() as f64, self.n_labels as f64);
        let eta = cfg.learning_rate.clamp(0.0, 1.0);
        let mut values = start.values().to_vec();
        let (logits, adapter) = values.split_at_mut(self.n_labels);
        for (w, &c) in logits.iter_mut().zip(&counts) {
            let target = ((c as f64 + 1.0) / (n + l)).ln();
            *w += (eta * (target - f64::from(*w))) as f32;
        }
        let step: Vec<f32> = counts
            .iter()
            .map(|&c| if labels.is_empty() { 0.0 } else { (eta * (c as f64 / n - 1.0 / l)) as f32 })
            .collect();
        for (j, w) in adapter.iter_mut().enumerate() {
            *w += sign(j) * step[j % self.n_labels];
        }
        let final_loss = self.loss(logits, &counts);
        // INVARIANT: same length as `start`, whose layout was checked.
        #[allow(clippy::unwrap_used)]
        let params = FlatParams::new(self.layout(), values).unwrap();
        let report = TrainReport {
            steps: 1,
            examples_seen: labels.len() as u64,
            final_loss,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((params, report))
    }

    /// Every input is predicted as the prior's most likely label.
    pub fn evaluate(&self, params: &FlatParams, labels: &[usize]) -> Result<Confusion, ModelError> {
        let probs = self.prior(params)?;
        let predicted = (0..probs.len()).fold(0, |best, i| if probs[i] > probs[best] { i } else { best });
        let mut confusion = Confusion::new(self.n_labels);
        self.counts(labels)?;
        labels.iter().for_each(|&truth| confusion.add(truth, predicted));
        Ok(confusion)
    }

    /// The prior's probabilities, once per input.
    pub fn predict_proba(&self, params: &FlatParams, inputs: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let probs = self.prior(params)?;
        Ok(vec![probs; inputs])
    }

    /// Softmax of the logits.
    fn prior(&self, params: &FlatParams) -> Result<Vec<f32>, ModelError> {
        params.expect_layout(&self.layout())?;
        let logits = &params.values()[..self.n_labels];
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits.iter().map(|w| (w - max).exp()).sum();
        Ok(logits.iter().map(|w| (w - max).exp() / z).collect())
    }

    fn counts(&self, labels: &[usize]) -> Result<Vec<u64>, ModelError> {
        let mut counts = vec![0u64; self.n_labels];
        for &label in labels {
            *counts.get_mut(label).ok_or_else(|| {
                ModelError::Config(format!("label index {label} is outside the stand-in's {} labels", self.n_labels))
            })? += 1;
        }
        Ok(counts)
    }

    /// Mean cross-entropy of the prior on examples with these label counts.
    fn loss(&self, logits: &[f32], counts: &[u64]) -> f32 {
        let n: u64 = counts.iter().sum();
        if n == 0 {
            return 0.0;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = max + logits.iter().map(|w| (w - max).exp()).sum::<f32>().ln();
        counts.iter().zip(logits).map(|(&c, &w)| c as f32 * (log_z - w)).sum::<f32>() / n as f32
    }
}

/// `s(j)`: +1 or −1, one bit of a SplitMix64 hash of `j / 64` per position.
pub fn sign(j: usize) -> f32 {
    if (splitmix64((j / 64) as u64) >> (j % 64)) & 1 == 0 { 1.0 } else { -1.0 }
}

/// SplitMix64's finaliser (Steele et al., 2014): a fast, well-mixed hash of 64 bits.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch() -> StandInArch {
        StandInArch { params: 1000, n_labels: 3 }
    }

    fn cfg(lr: f64) -> TrainConfig {
        TrainConfig { learning_rate: lr, ..TrainConfig::default() }
    }

    #[test]
    fn init_is_seeded_small_and_has_a_uniform_prior() {
        let a = arch();
        let p = a.init(1);
        assert_eq!(p, a.init(1));
        assert_ne!(p, a.init(2));
        assert_eq!(&p.values()[..3], &[0.0; 3]);
        assert!(p.values()[3..].iter().all(|v| (-0.01..0.01).contains(v)));
        assert!(p.values()[3..].iter().any(|v| *v != 0.0));
    }

    #[test]
    fn the_weighted_mean_of_two_sites_updates_is_the_cohorts_expected_update() {
        let a = arch();
        let start = a.init(5);
        let (s1, s2) = (vec![0, 0, 1, 2, 0], vec![1, 1, 2]);
        let c = cfg(0.5);
        let delta = |labels: &[usize]| -> Vec<f32> {
            let (p, _) = a.train(&start, labels, &c).expect("train");
            p.values().iter().zip(start.values()).map(|(x, y)| x - y).collect()
        };
        let (d1, d2) = (delta(&s1), delta(&s2));
        // The cohort: 8 examples, counts (3, 3, 2).
        let cohort = [3.0 / 8.0, 3.0 / 8.0, 2.0 / 8.0];
        for j in 0..a.params {
            let mean = (5.0 * d1[3 + j] + 3.0 * d2[3 + j]) / 8.0;
            let want = 0.5 * sign(j) * (cohort[j % 3] - 1.0 / 3.0);
            assert!((mean - want).abs() < 1e-6, "position {j}: {mean} vs {want}");
        }
        // Signs are balanced and depend on the position.
        let plus = (0..a.params).filter(|&j| sign(j) > 0.0).count();
        assert!((400..600).contains(&plus), "{plus}");
    }

    #[test]
    fn training_moves_the_prior_toward_the_labels_and_evaluation_predicts_its_mode() {
        let a = arch();
        let labels = vec![2, 2, 2, 0];
        let (p, report) = a.train(&a.init(1), &labels, &cfg(1.0)).expect("train");
        assert_eq!((report.steps, report.examples_seen), (1, 4));
        let probs = a.predict_proba(&p, 2).expect("proba");
        assert_eq!(probs.len(), 2);
        assert!((probs[0][2] - 4.0 / 7.0).abs() < 1e-6, "{probs:?}");
        let confusion = a.evaluate(&p, &[0, 2, 2]).expect("evaluate");
        assert_eq!(confusion.counts, vec![vec![0, 0, 1], vec![0, 0, 0], vec![0, 0, 2]]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let a = arch();
        let err = a.train(&a.init(1), &[3], &cfg(0.1)).expect_err("label 3 of 3").to_string();
        assert!(err.contains("label index 3"), "{err}");
        let other = StandInArch { params: 999, n_labels: 3 }.init(1);
        let err = a.evaluate(&other, &[0]).expect_err("layout").to_string();
        assert!(err.starts_with("layout mismatch"), "{err}");
        // No examples: the prior moves to uniform and the adapter does not move.
        let start = a.init(1);
        let (p, _) = a.train(&start, &[], &cfg(1.0)).expect("train");
        assert_eq!(&p.values()[3..], &start.values()[3..]);
    }
}
