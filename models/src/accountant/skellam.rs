//! Rényi-DP of the distributed Skellam mechanism, with and without Poisson subsampling.
//!
//! The `distributed` privacy mode (`crate::ddp`, `docs/protocols/privacy.md`) adds
//! integer Skellam noise to integer vectors: the symmetric Skellam distribution of
//! variance μ is the difference of two independent Poisson(μ/2) draws, and the sum of
//! the sites' Skellam shares is again Skellam with the summed variance. Agarwal, Kairouz
//! and Liu ("The Skellam Mechanism for Differentially Private Federated Learning",
//! NeurIPS 2021, Corollary 4.1 / Theorem 3.5) bound its RDP at order α for an integer
//! query with L2 sensitivity Δ₂ and L1 sensitivity Δ₁:
//!
//! ```text
//! ε(α) ≤ α·Δ₂²/(2μ) + min( ((2α − 1)·Δ₂² + 6·Δ₁) / (4μ²),  3·Δ₁/(2μ) )
//! ```
//!
//! (the `_skellam_rdp` of `google-research/federated`'s `distributed_dp/accounting_utils.py`,
//! with every quantity in integer units, so its `scale` is 1). The bound is used at
//! integer orders only; at the fractional default orders the curve is +∞ (no bound
//! claimed), which [`crate::accountant::epsilon_from_rdp`] simply never picks.
//!
//! Poisson subsampling at rate q uses the general upper bound of Zhu and Wang ("Poisson
//! Subsampled Rényi Differential Privacy", ICML 2019, Theorem 5 in the PMLR version; the
//! `upper_bound=True` branch of `_compute_rdp_subsampled` in the same Google file), valid
//! for any mechanism given its RDP at the integer orders 2..α:
//!
//! ```text
//! ε_q(α) ≤ 1/(α−1) · log( (1−q)^(α−1)·(αq − q + 1) + C(α,2)·q²·(1−q)^(α−2)·e^(ε(2))
//!                          + 3·Σ_{l=3..α} C(α,l)·q^l·(1−q)^(α−l)·e^((l−1)·ε(l)) )
//! ```
//!
//! taking the smaller of that and ε(α) (subsampling never hurts), and ε(α) itself at
//! q = 1. `scripts/skellam-vectors.py` transcribes both formulas independently in Python
//! (with dp-accounting's ε conversion) and wrote `skellam_vectors.json`, which the tests
//! below check to 1e-9 relative.

use super::{AccountantError, DEFAULT_ORDERS, MAX_ORDER, Rdp, check_q};

/// One application of the Skellam mechanism, in integer units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Skellam {
    /// L2 sensitivity Δ₂ of the integer query.
    pub l2: f64,
    /// L1 sensitivity Δ₁ of the integer query.
    pub l1: f64,
    /// Variance μ of the (summed) Skellam noise per coordinate.
    pub variance: f64,
}

impl Skellam {
    fn check(&self) -> Result<(), AccountantError> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if ok(self.l2) && ok(self.l1) && ok(self.variance) {
            Ok(())
        } else {
            Err(AccountantError::Skellam { l2: self.l2, l1: self.l1, variance: self.variance })
        }
    }

    /// RDP at integer order `alpha` ≥ 2 without subsampling (the bound above).
    pub fn rdp(&self, alpha: u64) -> f64 {
        let (a, d2, d1, mu) = (alpha as f64, self.l2 * self.l2, self.l1, self.variance);
        a * d2 / (2.0 * mu) + (((2.0 * a - 1.0) * d2 + 6.0 * d1) / (4.0 * mu * mu)).min(3.0 * d1 / (2.0 * mu))
    }
}

/// RDP at integer order `alpha` ≥ 2 of a mechanism with RDP `base` (at integer orders),
/// run on a Poisson sample at rate `q` (Zhu–Wang's general upper bound, and never more
/// than `base(alpha)`).
pub fn poisson_subsampled(q: f64, alpha: u64, base: &dyn Fn(u64) -> f64) -> f64 {
    let whole = base(alpha);
    if q == 0.0 {
        return 0.0;
    }
    if q >= 1.0 || alpha < 2 {
        return whole;
    }
    let a = alpha as f64;
    let (ln_q, ln_1q) = (q.ln(), (-q).ln_1p());
    let mut terms = Vec::with_capacity(alpha as usize);
    terms.push((a - 1.0) * ln_1q + (a * q - q + 1.0).ln());
    // log C(α, l), built up from log C(α, 1) = log α.
    let mut log_comb = a.ln();
    for l in 2..=alpha {
        let lf = l as f64;
        log_comb += (a - lf + 1.0).ln() - lf.ln();
        let eps = base(l);
        if eps == f64::INFINITY {
            return whole;
        }
        let factor = if l == 2 { 0.0 } else { 3f64.ln() };
        terms.push(factor + log_comb + lf * ln_q + (a - lf) * ln_1q + (lf - 1.0) * eps);
    }
    let top = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let bound = (top + terms.iter().map(|t| (t - top).exp()).sum::<f64>().ln()) / (a - 1.0);
    if bound.is_nan() { whole } else { bound.min(whole) }
}

impl Rdp {
    /// `steps` applications of the Skellam mechanism `m`, each on a Poisson sample at rate
    /// `q`: +∞ at the fractional default orders, the bounds above at the integer ones.
    pub fn subsampled_skellam(q: f64, m: Skellam, steps: u64) -> Result<Rdp, AccountantError> {
        check_q(q)?;
        m.check()?;
        if steps == 0 {
            return Ok(Rdp::zero());
        }
        let base = |l: u64| m.rdp(l);
        let values = DEFAULT_ORDERS
            .iter()
            .map(|&alpha| {
                if alpha.fract() != 0.0 || alpha > MAX_ORDER {
                    f64::INFINITY
                } else {
                    steps as f64 * poisson_subsampled(q, alpha as u64, &base)
                }
            })
            .collect();
        Ok(Rdp { values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = include_str!("skellam_vectors.json");

    fn rel(got: f64, want: f64) -> f64 {
        if got == want { 0.0 } else { (got - want).abs() / want.abs().max(1e-300) }
    }

    #[test]
    fn rdp_and_epsilon_match_the_python_transcription() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).expect("skellam_vectors.json parses");
        let cases = v["cases"].as_array().expect("cases");
        assert!(cases.len() >= 10, "the table has its cases");
        let mut worst = 0f64;
        for c in cases {
            let num = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("{k} in {c}"));
            let m = Skellam { l2: num("l2"), l1: num("l1"), variance: num("variance") };
            let (q, steps, delta) = (num("q"), num("steps") as u64, num("delta"));
            for pair in c["rdp"].as_array().expect("rdp") {
                let (alpha, want) = (pair[0].as_u64().expect("order"), pair[1].as_f64().expect("value"));
                let got = poisson_subsampled(q, alpha, &|l| m.rdp(l));
                worst = worst.max(rel(got, want));
                assert!(rel(got, want) < 1e-9, "{c}: order {alpha}: {got} vs {want}");
            }
            let curve = Rdp::subsampled_skellam(q, m, steps).expect("curve");
            let (eps, order) = curve.epsilon_and_order(delta).expect("epsilon");
            assert!(rel(eps, num("epsilon")) < 1e-9, "{c}: ε {eps} vs {}", num("epsilon"));
            assert_eq!(order, num("order"), "{c}: optimal order");
        }
        eprintln!("largest relative error: {worst:e}");
    }

    #[test]
    fn large_sensitivities_approach_the_gaussian_and_never_beat_it() {
        // With Δ₂ → ∞ at a fixed ratio μ/Δ₂² = z², the Skellam bound tends to the
        // Gaussian's α/(2z²); it must never be below it (the Gaussian is the limit).
        let z = 1.5;
        for l2 in [1e2, 1e4, 1e6] {
            let m = Skellam { l2, l1: l2 * 10.0, variance: z * z * l2 * l2 };
            for alpha in [2u64, 8, 32] {
                let gauss = alpha as f64 / (2.0 * z * z);
                let sk = m.rdp(alpha);
                assert!(sk >= gauss, "{l2} {alpha}");
                if l2 >= 1e6 {
                    assert!(rel(sk, gauss) < 1e-4, "{l2} {alpha}: {sk} vs {gauss}");
                }
            }
        }
        // Subsampled: the general bound is looser than the tight subsampled Gaussian.
        let m = Skellam { l2: 1e6, l1: 1e7, variance: 4.0 * 1e12 };
        for alpha in [2u64, 5, 20, 63] {
            let tight = crate::accountant::rdp_subsampled_gaussian(0.05, 2.0, alpha as f64).expect("gaussian");
            let general = poisson_subsampled(0.05, alpha, &|l| m.rdp(l));
            assert!(general >= tight * (1.0 - 1e-9), "order {alpha}: {general} < {tight}");
            assert!(general <= m.rdp(alpha), "order {alpha}: subsampling made it worse");
        }
    }

    #[test]
    fn bad_mechanisms_are_refused_and_edge_rates_are_exact() {
        for bad in [
            Skellam { l2: 0.0, l1: 1.0, variance: 1.0 },
            Skellam { l2: 1.0, l1: f64::NAN, variance: 1.0 },
            Skellam { l2: 1.0, l1: 1.0, variance: -1.0 },
        ] {
            assert!(Rdp::subsampled_skellam(0.5, bad, 1).is_err(), "{bad:?}");
        }
        assert!(Rdp::subsampled_skellam(1.5, Skellam { l2: 1.0, l1: 1.0, variance: 1.0 }, 1).is_err());
        let m = Skellam { l2: 100.0, l1: 1000.0, variance: 4e4 };
        assert_eq!(poisson_subsampled(1.0, 7, &|l| m.rdp(l)), m.rdp(7));
        assert_eq!(poisson_subsampled(0.0, 7, &|l| m.rdp(l)), 0.0);
        let curve = Rdp::subsampled_skellam(1.0, m, 3).expect("curve");
        for (&a, &r) in DEFAULT_ORDERS.iter().zip(curve.values()) {
            if a.fract() == 0.0 {
                assert!(rel(r, 3.0 * m.rdp(a as u64)) < 1e-12, "order {a}");
            } else {
                assert_eq!(r, f64::INFINITY, "order {a}: no bound claimed");
            }
        }
        assert_eq!(Rdp::subsampled_skellam(0.3, m, 0).expect("zero"), Rdp::zero());
    }
}
