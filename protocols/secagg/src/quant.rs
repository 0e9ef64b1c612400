//! Fixed-point encoding of `[w·Δ, w]` into Z/2^32.
//!
//! Each coordinate of Δ is clipped to [-clip, clip], multiplied by the weight
//! w = min(samples, max_weight), divided by `step` and stochastically rounded to an
//! integer (unbiased), stored as two's complement in a u32. The last word is w itself.
//! `step = n · max_weight · clip / (2^31 - 1 - n)` so that the sum over n parties of
//! |q| ≤ n · (max_weight · clip / step + 1) ≤ 2^31 - 1: it never wraps (SA-12).
//!
//! Stochastic rounding: with v = w·x/step and u the next uniform u32,
//! q = floor(v + u/2^32), computed in integers as floor(v) + 1 when
//! u + ⌊frac(v)·2^32⌋ ≥ 2^32 (so E[q] = v to within 2^-32). As a guard against
//! floating-point error, |q| is also capped at ⌊(2^31-1)/n⌋, a bound the exact
//! arithmetic never reaches beyond, so n parties' words can never wrap.

use super::{Check, SecAggError};

const TWO_POW_32: f64 = 4_294_967_296.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantiser {
    pub n: usize,
    pub clip: f32,
    pub max_weight: u32,
    pub step: f64,
}

impl Quantiser {
    pub fn new(n: usize, clip: f32, max_weight: u32) -> Result<Quantiser, SecAggError> {
        if n == 0 {
            return Err(SecAggError::new(Check::Params, "the quantiser needs at least one party"));
        }
        if !clip.is_finite() || clip <= 0.0 {
            return Err(SecAggError::new(Check::Params, "the clipping bound must be finite and positive"));
        }
        if max_weight == 0 {
            return Err(SecAggError::new(Check::Params, "the maximum weight must be positive"));
        }
        let total_weight = (n as u128) * u128::from(max_weight);
        if total_weight >= 1 << 32 {
            return Err(SecAggError::new(Check::Params, "parties × maximum weight must be below 2^32"));
        }
        // n < 2^32 here; the range must leave room for n rounding carries.
        let room = i64::from(i32::MAX) - n as i64;
        if room <= 0 {
            return Err(SecAggError::new(Check::Params, "too many parties for a 32-bit sum"));
        }
        let step = total_weight as f64 * f64::from(clip) / room as f64;
        if !step.is_finite() || step <= 0.0 {
            return Err(SecAggError::new(Check::Params, "the quantisation step is not a positive number"));
        }
        Ok(Quantiser { n, clip, max_weight, step })
    }

    /// The weight actually used for `samples`.
    pub fn weight(&self, samples: u64) -> u32 {
        samples.min(u64::from(self.max_weight)) as u32
    }

    /// The largest |q| one party may contribute: ⌊(2^31-1)/n⌋.
    fn max_abs(&self) -> i64 {
        i64::from(i32::MAX) / (self.n.max(1) as i64)
    }

    /// Encodes `delta` (one chunk, any length) with weight `w` into `out` (same
    /// length). `uniform` yields uniform u32s for stochastic rounding. Returns how
    /// many coordinates were clipped.
    ///
    /// A NaN coordinate is encoded as 0 and counted as clipped; ±∞ clip to ±clip.
    /// `uniform` is called exactly once per coordinate, in order. `w` should come
    /// from [`Quantiser::weight`]; a larger one is still capped per coordinate so the
    /// sum cannot wrap. Only the first min(delta.len(), out.len()) coordinates are
    /// written (the two are meant to be equal).
    pub fn encode(&self, delta: &[f32], w: u32, uniform: &mut dyn FnMut() -> u32, out: &mut [u32]) -> usize {
        debug_assert_eq!(delta.len(), out.len());
        let clip = self.clip;
        let weight = f64::from(w);
        let max_abs = self.max_abs();
        let mut clipped = 0;
        for (&d, o) in delta.iter().zip(out.iter_mut()) {
            let x = if d.is_nan() {
                clipped += 1;
                0.0
            } else if d.abs() > clip {
                clipped += 1;
                d.clamp(-clip, clip)
            } else {
                d
            };
            let v = weight * f64::from(x) / self.step;
            let floor = v.floor();
            // ⌊frac(v)·2^32⌋ in [0, 2^32).
            let frac = ((v - floor) * TWO_POW_32) as u64;
            let carry = ((u64::from(uniform()) + frac) >> 32) as i64;
            let q = (floor as i64 + carry).clamp(-max_abs, max_abs);
            *o = q as i32 as u32;
        }
        clipped
    }

    /// Decodes summed words (not the trailing weight word) to Σ w·Δ.
    ///
    /// Only the first min(summed.len(), out.len()) coordinates are written.
    pub fn decode(&self, summed: &[u32], out: &mut [f64]) {
        debug_assert_eq!(summed.len(), out.len());
        for (&word, o) in summed.iter().zip(out.iter_mut()) {
            *o = f64::from(word as i32) * self.step;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    #[test]
    fn new_validates() {
        for (n, clip, max_weight) in [
            (0, 1.0, 10),
            (3, 0.0, 10),
            (3, -1.0, 10),
            (3, f32::NAN, 10),
            (3, f32::INFINITY, 10),
            (3, 1.0, 0),
            (2, 1.0, 1 << 31),
            (1 << 16, 1.0, 1 << 16),
        ] {
            let err = Quantiser::new(n, clip, max_weight).unwrap_err();
            assert_eq!(err.check, Check::Params, "{n} {clip} {max_weight}");
        }
        let q = Quantiser::new(10, 0.5, 1000).unwrap();
        assert_eq!(q.step, 10.0 * 1000.0 * 0.5 / (2_147_483_647.0 - 10.0));
        assert!(Quantiser::new(1, 1.0, u32::MAX).is_ok());
        assert!(Quantiser::new((1 << 16) - 1, 1.0, 1 << 16).is_ok());
    }

    #[test]
    fn weight_is_capped() {
        let q = Quantiser::new(4, 1.0, 100).unwrap();
        assert_eq!(q.weight(0), 0);
        assert_eq!(q.weight(42), 42);
        assert_eq!(q.weight(100), 100);
        assert_eq!(q.weight(u64::MAX), 100);
    }

    #[test]
    fn clipping_and_nan() {
        let q = Quantiser::new(3, 1.0, 10).unwrap();
        let delta = [0.5, 2.0, -3.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, -1.0];
        let mut out = [0u32; 8];
        let clipped = q.encode(&delta, 10, &mut || 0, &mut out);
        assert_eq!(clipped, 5);
        let mut decoded = [0f64; 8];
        q.decode(&out, &mut decoded);
        let want = [5.0, 10.0, -10.0, 0.0, 10.0, -10.0, 10.0, -10.0];
        for (got, want) in decoded.iter().zip(want) {
            assert!((got - want).abs() <= q.step, "{got} vs {want}");
        }
        assert_eq!(out[3], 0);
        // At ±clip with the maximum weight, |q| stays within ⌊(2^31-1)/n⌋.
        for word in [out[1], out[2], out[4], out[5]] {
            assert!(i64::from(word as i32).abs() <= q.max_abs());
        }
    }

    #[test]
    fn rounding_is_exact_floor_of_v_plus_u() {
        let q = Quantiser::new(1, 1.0, 1).unwrap();
        // x ≈ 2.5·step, so v = x/step has a fraction close to 0.5.
        let x = (2.5 * q.step) as f32;
        let v = 1.0 * f64::from(x) / q.step;
        let frac = v - v.floor();
        let mut out = [0u32];
        for u in [0u32, 1 << 31, u32::MAX] {
            q.encode(&[x], 1, &mut || u, &mut out);
            let want = (v + f64::from(u) / TWO_POW_32).floor() as i32;
            assert_eq!(out[0] as i32, want, "u = {u}, frac = {frac}");
        }
    }

    #[test]
    fn single_encode_round_trip() {
        let q = Quantiser::new(5, 0.1, 500).unwrap();
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        let delta: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 0.15).collect();
        for w in [1u32, 37, 500] {
            let mut out = vec![0u32; delta.len()];
            q.encode(&delta, w, &mut || rng.next_u32(), &mut out);
            let mut decoded = vec![0f64; delta.len()];
            q.decode(&out, &mut decoded);
            for (&d, &got) in delta.iter().zip(&decoded) {
                let want = f64::from(w) * f64::from(d.clamp(-0.1, 0.1));
                assert!((got - want).abs() <= q.step * (1.0 + 1e-9), "w = {w}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let q = Quantiser::new(3, 1.0, 7).unwrap();
        let mut rng = ChaCha20Rng::from_seed([2; 32]);
        let w = 5;
        // x such that w·x/step = 1000.3.
        let x = (1000.3 * q.step / f64::from(w)) as f32;
        let exact = f64::from(w) * f64::from(x) / q.step;
        let trials = 20_000;
        let mut sum = 0i64;
        let mut out = [0u32];
        for _ in 0..trials {
            q.encode(&[x], w, &mut || rng.next_u32(), &mut out);
            let word = out[0] as i32;
            assert!(word == 1000 || word == 1001, "{word}");
            sum += i64::from(word);
        }
        let mean = sum as f64 / f64::from(trials);
        // Bernoulli(0.3): σ of the mean ≈ 0.0032; allow 5σ.
        assert!((mean - exact).abs() < 0.017, "mean {mean} vs {exact}");
    }

    proptest! {
        #[test]
        fn sums_never_wrap_and_decode_to_the_weighted_sum(
            n in 1usize..=20,
            clip in 0.01f32..10.0,
            max_weight in 1u32..=1000,
            seed in any::<[u8; 32]>(),
            parties in proptest::collection::vec(
                (any::<u32>(), proptest::collection::vec(-20.0f32..20.0, 16)),
                20,
            ),
            extreme in any::<bool>(),
        ) {
            let q = Quantiser::new(n, clip, max_weight).unwrap();
            let mut rng = ChaCha20Rng::from_seed(seed);
            let dim = 16;
            let mut sum_words = vec![0u32; dim];
            let mut sum_abs = vec![0i64; dim];
            let mut want = vec![0f64; dim];
            for (raw_w, delta) in parties.iter().take(n) {
                // Extreme: every party at the maximum weight, at ±clip or beyond.
                let w = if extreme { max_weight } else { raw_w % max_weight + 1 };
                let delta: Vec<f32> = if extreme {
                    delta.iter().map(|d| if *d < 0.0 { -1e30 } else { 1e30 }).collect()
                } else {
                    delta.clone()
                };
                let mut out = vec![0u32; dim];
                q.encode(&delta, w, &mut || rng.next_u32(), &mut out);
                for i in 0..dim {
                    sum_words[i] = sum_words[i].wrapping_add(out[i]);
                    sum_abs[i] += i64::from(out[i] as i32).abs();
                    want[i] += f64::from(w) * f64::from(delta[i].clamp(-clip, clip));
                }
            }
            let mut decoded = vec![0f64; dim];
            q.decode(&sum_words, &mut decoded);
            for i in 0..dim {
                prop_assert!(sum_abs[i] <= i64::from(i32::MAX), "Σ|q| = {}", sum_abs[i]);
                let tolerance = n as f64 * q.step * (1.0 + 1e-9);
                prop_assert!((decoded[i] - want[i]).abs() <= tolerance, "{} vs {}", decoded[i], want[i]);
            }
        }
    }
}
