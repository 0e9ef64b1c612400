//! The `distributed` differential-privacy mode: one DP-SGD step per round over the
//! union of the sites' records, with the noise split among the sites in the integer
//! domain so that only the secure sum carries all of it (the distributed Skellam
//! mechanism of Agarwal, Kairouz and Liu, NeurIPS 2021).
//!
//! Each site, every round, from the round's base model (public: d parameters, clip C,
//! sampling rate q, noise multiplier z, noise shares m, batch bound B, all fixed by the
//! job and checked by the site):
//!
//! 1. **Sample**: every local training record joins the batch independently with
//!    probability q (the site's secret RNG).
//! 2. **Clip and sum**: s = Σ clip_C(∇ℓ(x)) over the batch, in f64, over all d
//!    parameters (`crate::dp`'s closed-form per-example gradients).
//! 3. **Bound**: if ‖s‖₂ > C·B, s is scaled to C·B (a projection: 1-Lipschitz, so
//!    the sensitivity is unchanged).
//! 4. **Scale**: x = γ·s with γ = 100·√d / C (so γC is 100·√d and rounding adds at
//!    most 1% to the sensitivity).
//! 5. **Round**: kᵢ = ⌊xᵢ + uᵢ⌋, uᵢ uniform in [0, 1) (unbiased randomised rounding).
//!    For a fixed u, neighbouring batches give |kᵢ − k′ᵢ| ≤ ⌈|xᵢ − x′ᵢ|⌉, so the integer
//!    sensitivity is Δ₂ = γC + √d and Δ₁ ≤ Δ₂·min(√d, Δ₂); u is independent of the data,
//!    and Rényi divergence is jointly quasi-convex, so the mixture over u keeps the bound.
//! 6. **Noise share**: kᵢ + Sk(μ/m), with μ = z²·Δ₂² and Sk(v) = Poisson(v/2) − Poisson(v/2).
//!    The sum of the shares of m honest sites is Sk(μ): the whole noise. Each site's share
//!    alone is not enough to protect it, which is why the words only travel masked.
//! 7. **Wrap**: the words are the integers mod 2³² (two's complement), the ring secure
//!    aggregation sums in. [`DistributedDp::check_range`] refuses a session whose honest
//!    sum could leave [−2³¹, 2³¹) except with probability below 2⁻¹⁰⁰ per coordinate
//!    (12 standard deviations of the whole noise), so the decoded sum is exact.
//!
//! The coordinator decodes Σk/γ: the noisy sum of clipped gradients over the union of
//! the sampled records, and steps the model with it (post-processing).
//!
//! The guarantee, per record, against anyone who sees only the secure sum (the
//! coordinator, other sites, every release): one round is the Poisson-subsampled
//! Skellam mechanism with (Δ₂, Δ₁, μ) above, accounted by
//! [`crate::accountant::skellam`]. It needs secure aggregation to hold and at least m
//! honest sites among the survivors; the job derives m from `min_sites` minus the
//! colluders it tolerates, and every site refuses to unmask fewer survivors.

use rand::{Rng, RngCore};
use rand_distr::{Distribution, Poisson};
use serde::{Deserialize, Serialize};

use crate::accountant::skellam::Skellam;
use crate::accountant::{AccountantError, Rdp};

/// γ·C / √d: the scale keeps the rounding's share of the sensitivity at 1 / RATIO.
pub const SCALE_RATIO: f64 = 100.0;

/// Standard deviations of the whole noise kept free below 2³¹ (a tail beyond 12 σ has
/// probability below 2⁻¹⁰⁰, Skellam tails being at most Gaussian-like at these variances).
pub const TAIL_SIGMAS: f64 = 12.0;

const RANGE: f64 = 2_147_483_647.0;

/// The Skellam mechanism of one round over `dimension` parameters at noise multiplier
/// `z`: Δ₂ = (RATIO + 1)·√d, Δ₁ = Δ₂·min(√d, Δ₂), μ = z²·Δ₂² (only d and z matter).
pub fn skellam_of(dimension: u64, z: f64) -> Skellam {
    let root = (dimension as f64).sqrt();
    let l2 = (SCALE_RATIO + 1.0) * root;
    Skellam { l2, l1: l2 * root.min(l2), variance: z * z * l2 * l2 }
}

/// One round of the distributed mechanism: what every site runs, and what the
/// coordinator decodes with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedDp {
    /// Per-example L2 clipping norm C.
    pub clip: f64,
    /// z: the whole noise has standard deviation z·Δ₂ in integer units (z·C·(1 + 1/RATIO)
    /// in gradient units).
    pub noise_multiplier: f64,
    /// Poisson sampling rate q of each record in each round.
    pub sample_rate: f64,
    /// d: the parameters the step covers (the whole model).
    pub dimension: u64,
    /// m: honest sites whose shares make the whole noise.
    pub noise_shares: u32,
    /// B: a site's clipped-gradient sum is bounded to L2 norm C·B.
    pub max_batch: u32,
}

impl DistributedDp {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(format!("clip must be positive, got {}", self.clip));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(format!("noise multiplier must be positive, got {}", self.noise_multiplier));
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(format!("sample rate must be in (0, 1], got {}", self.sample_rate));
        }
        if self.dimension == 0 || self.noise_shares == 0 || self.max_batch == 0 {
            return Err("dimension, noise shares and max batch must be positive".into());
        }
        Ok(())
    }

    /// γ: integer units per gradient unit.
    pub fn scale(&self) -> f64 {
        SCALE_RATIO * (self.dimension as f64).sqrt() / self.clip
    }

    /// The integer query's sensitivities and the whole noise's variance.
    pub fn skellam(&self) -> Skellam {
        skellam_of(self.dimension, self.noise_multiplier)
    }

    /// The variance of one site's noise share: μ / m.
    pub fn share_variance(&self) -> f64 {
        self.skellam().variance / f64::from(self.noise_shares)
    }

    /// RDP of `rounds` rounds for one record.
    pub fn rdp(&self, rounds: u64) -> Result<Rdp, AccountantError> {
        Rdp::subsampled_skellam(self.sample_rate, self.skellam(), rounds)
    }

    /// The largest |coordinate| the honest sum of `parties` sites can reach, noise tail
    /// included, in integer units.
    fn reach(&self, parties: usize) -> f64 {
        let n = parties as f64;
        let signal = n * (self.scale() * self.clip * f64::from(self.max_batch) + 1.0);
        signal + TAIL_SIGMAS * (n * self.share_variance()).sqrt()
    }

    /// Refuses a session of `parties` sites whose honest sum could wrap mod 2³².
    pub fn check_range(&self, parties: usize) -> Result<(), String> {
        if self.reach(parties) < RANGE {
            Ok(())
        } else {
            Err(format!(
                "{parties} sites' sums could wrap 32 bits at max_batch {} for {} parameters (at most {} sites)",
                self.max_batch,
                self.dimension,
                self.max_parties()
            ))
        }
    }

    /// The most sites a session of this job may hold ([`Self::check_range`]).
    pub fn max_parties(&self) -> usize {
        (1..=256usize).take_while(|&n| self.reach(n) < RANGE).last().unwrap_or(0)
    }

    /// Encodes a site's clipped-gradient sum `sum` (length d) into words: bound, scale,
    /// round, add this site's noise share. `rng` must be the site's secret RNG. Returns
    /// whether the sum was scaled down to C·B.
    pub fn encode(&self, sum: &mut [f64], rng: &mut dyn RngCore, out: &mut [u32]) -> Result<bool, String> {
        self.validate()?;
        if sum.len() as u64 != self.dimension || out.len() != sum.len() {
            return Err(format!("{} values for a mechanism over {} parameters", sum.len(), self.dimension));
        }
        if sum.iter().any(|v| !v.is_finite()) {
            return Err("the clipped-gradient sum is not finite".into());
        }
        let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        let bound = self.clip * f64::from(self.max_batch);
        let bounded = norm > bound;
        let factor = if bounded { bound / norm } else { 1.0 } * self.scale();
        let half = self.share_variance() / 2.0;
        let poisson = Poisson::new(half).map_err(|e| format!("noise share of variance {}: {e}", 2.0 * half))?;
        for (v, o) in sum.iter().zip(out.iter_mut()) {
            let x = v * factor;
            let k = (x + rng.random::<f64>()).floor() as i64;
            let noise = poisson.sample(rng) as i64 - poisson.sample(rng) as i64;
            *o = (k.wrapping_add(noise)) as u32;
        }
        Ok(bounded)
    }

    /// Decodes summed words into the noisy sum of clipped gradients (gradient units).
    pub fn decode(&self, summed: &[u32], out: &mut [f64]) {
        let inv = 1.0 / self.scale();
        for (&w, o) in summed.iter().zip(out.iter_mut()) {
            *o = f64::from(w as i32) * inv;
        }
    }

    /// An L2 bound that the decoded sum of `survivors` honest sites stays within except
    /// with negligible probability: their clipped sums, the rounding, and 1.5 times the
    /// expected norm of the noise of every share (the norm of d independent coordinates
    /// concentrates within a few percent of its mean for d in the thousands).
    pub fn aggregate_bound(&self, survivors: usize) -> f64 {
        let n = survivors as f64;
        let d = self.dimension as f64;
        let signal = n * self.clip * f64::from(self.max_batch);
        let rounding = n * d.sqrt() / self.scale();
        let noise = 1.5 * (d * n * self.share_variance()).sqrt() / self.scale();
        signal + rounding + noise + 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn mech(d: u64, z: f64, m: u32) -> DistributedDp {
        DistributedDp {
            clip: 1.0,
            noise_multiplier: z,
            sample_rate: 1.0,
            dimension: d,
            noise_shares: m,
            max_batch: 1024,
        }
    }

    #[test]
    fn the_shares_of_m_sites_sum_to_the_whole_noise_and_decode_to_the_sum() {
        let (d, m) = (4000usize, 4u32);
        let ddp = mech(d as u64, 0.8, m);
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let sums: Vec<Vec<f64>> =
            (0..m).map(|s| (0..d).map(|i| ((i * 7 + s as usize * 13) % 17) as f64 / 17.0 - 0.5).collect()).collect();
        let mut total = vec![0u32; d];
        for s in &sums {
            let mut words = vec![0u32; d];
            assert!(!ddp.encode(&mut s.clone(), &mut rng, &mut words).expect("encode"));
            total.iter_mut().zip(&words).for_each(|(t, w)| *t = t.wrapping_add(*w));
        }
        let mut decoded = vec![0f64; d];
        ddp.decode(&total, &mut decoded);
        let truth: Vec<f64> = (0..d).map(|i| sums.iter().map(|s| s[i]).sum()).collect();
        // The error is the whole noise: std z·Δ₂/γ in gradient units per coordinate.
        let std = ddp.noise_multiplier * ddp.skellam().l2 / ddp.scale();
        let errs: Vec<f64> = decoded.iter().zip(&truth).map(|(a, b)| a - b).collect();
        let mean = errs.iter().sum::<f64>() / d as f64;
        let var = errs.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / d as f64;
        assert!(mean.abs() < 4.0 * std / (d as f64).sqrt(), "unbiased: mean {mean}, std {std}");
        assert!((var.sqrt() / std - 1.0).abs() < 0.05, "whole noise std {} vs {std}", var.sqrt());
        assert!(ddp.aggregate_bound(m as usize) > errs.iter().map(|e| e * e).sum::<f64>().sqrt());
    }

    #[test]
    fn without_noise_the_rounding_is_unbiased_and_exact_to_one_unit() {
        // z tiny: the noise share is Poisson(~0) twice; what is left is the rounding.
        let d = 2000usize;
        let ddp = DistributedDp { noise_multiplier: 1e-9, ..mech(d as u64, 1.0, 1) };
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let sum: Vec<f64> = (0..d).map(|i| (i as f64 * 0.37).sin() * 3.0).collect();
        let mut mean = vec![0f64; d];
        let reps = 200;
        for _ in 0..reps {
            let mut words = vec![0u32; d];
            ddp.encode(&mut sum.clone(), &mut rng, &mut words).expect("encode");
            let mut out = vec![0f64; d];
            ddp.decode(&words, &mut out);
            for ((m, o), s) in mean.iter_mut().zip(&out).zip(&sum) {
                assert!((o - s).abs() <= 1.0 / ddp.scale() + 1e-12, "one unit of rounding at most");
                *m += o / f64::from(reps);
            }
        }
        let worst = mean.iter().zip(&sum).map(|(m, s)| (m - s).abs()).fold(0.0, f64::max);
        assert!(worst < 0.3 / ddp.scale(), "unbiased rounding: {worst}");
    }

    #[test]
    fn a_sum_beyond_c_times_b_is_scaled_to_it_and_bad_input_is_refused() {
        let ddp = DistributedDp { max_batch: 2, noise_multiplier: 1e-9, ..mech(3, 1.0, 1) };
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut words = vec![0u32; 3];
        assert!(ddp.encode(&mut [30.0, 40.0, 0.0], &mut rng, &mut words).expect("encode"));
        let mut out = vec![0f64; 3];
        ddp.decode(&words, &mut out);
        let norm = out.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 2.0).abs() < 2.0 / ddp.scale(), "scaled to C·B = 2: {norm}");
        assert!(ddp.encode(&mut [0.0; 2], &mut rng, &mut words).is_err(), "wrong length");
        assert!(ddp.encode(&mut [f64::NAN, 0.0, 0.0], &mut rng, &mut words).is_err(), "NaN");
        assert!(DistributedDp { noise_shares: 0, ..ddp }.validate().is_err());
        assert!(DistributedDp { sample_rate: 0.0, ..ddp }.validate().is_err());
    }

    #[test]
    fn sessions_that_could_wrap_are_refused() {
        // The text classifier's 4.2 M parameters at B = 1024: γCB ≈ 2.1e8 per site.
        let big = mech(4_194_304, 3.0, 5);
        let most = big.max_parties();
        assert!((5..=10).contains(&most), "{most}");
        assert!(big.check_range(most).is_ok());
        let err = big.check_range(most + 1).expect_err("one more wraps");
        assert!(err.contains(&format!("at most {most} sites")), "{err}");
        // The encoder head's 52,763 parameters leave room for far more sites.
        assert!(mech(52_763, 3.0, 5).max_parties() >= 80);
    }

    #[test]
    fn the_integer_sensitivity_is_one_percent_above_the_scaled_clip() {
        let ddp = mech(52_763, 2.0, 3);
        let sk = ddp.skellam();
        assert!((sk.l2 / (ddp.scale() * ddp.clip) - 1.01).abs() < 1e-12);
        assert!((sk.variance / (sk.l2 * sk.l2) - 4.0).abs() < 1e-12);
        assert!((ddp.share_variance() * 3.0 - sk.variance).abs() < 1e-3);
    }
}
