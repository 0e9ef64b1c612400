//! Rényi-DP privacy accounting for DP-SGD: the Poisson-subsampled Gaussian mechanism.
//!
//! One step of DP-SGD includes each record independently with probability `q` and adds
//! Gaussian noise of standard deviation `sigma` (the noise multiplier, in units of the
//! clipping norm) to the summed clipped gradients. This module computes that step's Rényi
//! differential privacy (RDP) at a grid of orders α (Mironov, Talwar, Zhang 2019, "Rényi
//! Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530, §3.3),
//! composes steps by adding RDP per order (Mironov 2017, "Rényi Differential Privacy"),
//! and converts the curve to an (ε, δ) guarantee with the improved conversion of
//! Canonne, Kamath, Steinke 2020 (arXiv:2004.00010, Prop. 12) and Balle et al. 2020
//! (arXiv:2001.05990, Eq. 20), minimised over the orders. The neighbouring relation is
//! add-or-remove-one record.
//!
//! The method is, term for term, the one in Google's `dp_accounting.rdp.RdpAccountant`
//! (PyPI `dp-accounting==0.6.0`, `dp_accounting/rdp/rdp_privacy_accountant.py`): the same
//! default orders, the same integer-order binomial sum, the same two-sided series with
//! log-erfc and the same stopping rule (at most 1000 terms, an order that does not
//! converge counts as +∞) for fractional orders, and the same ε conversion with its
//! special cases. It is checked against that package by known-answer vectors:
//! `scripts/dp-accounting-vectors.py` (run by hand, not in CI) writes
//! `models/src/accountant_vectors.json`, and the tests below require every ε and every RDP
//! value to agree to 1e-6 relative, the optimal orders to be equal, and calibrated noise
//! multipliers to agree to 1e-4 relative. Deliberate differences, all outside the domain
//! DP-SGD uses: δ must lie in (0, 1) (not 0 or 1), a finite order may not exceed
//! [`MAX_ORDER`], and where σ is so small that the terms overflow (σ² below ~1e-300) the
//! RDP is +∞ rather than NaN or a Python exception.
//!
//! Functions that take user input (`q`, `sigma`, `delta`, an order, a target ε) validate it
//! and return [`AccountantError`] naming the argument; nothing here panics.

use serde::{Deserialize, Serialize};

pub mod skellam;

/// The RDP orders α that `dp_accounting` 0.6.0 uses by default: `DEFAULT_RDP_ORDERS` in
/// `dp_accounting/rdp/rdp_privacy_accountant.py`, i.e.
/// `[1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]`.
pub const DEFAULT_ORDERS: &[f64] = &[
    1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3,
    3.4, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0, 4.1, 4.2, 4.3, 4.4, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0, 5.1, 5.2, 5.3, 5.4, 5.5, 5.6,
    5.7, 5.8, 5.9, 6.0, 6.1, 6.2, 6.3, 6.4, 6.5, 6.6, 6.7, 6.8, 6.9, 7.0, 7.1, 7.2, 7.3, 7.4, 7.5, 7.6, 7.7, 7.8, 7.9,
    8.0, 8.1, 8.2, 8.3, 8.4, 8.5, 8.6, 8.7, 8.8, 8.9, 9.0, 9.1, 9.2, 9.3, 9.4, 9.5, 9.6, 9.7, 9.8, 9.9, 10.0, 10.1,
    10.2, 10.3, 10.4, 10.5, 10.6, 10.7, 10.8, 10.9, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0,
    22.0, 23.0, 24.0, 25.0, 26.0, 27.0, 28.0, 29.0, 30.0, 31.0, 32.0, 33.0, 34.0, 35.0, 36.0, 37.0, 38.0, 39.0, 40.0,
    41.0, 42.0, 43.0, 44.0, 45.0, 46.0, 47.0, 48.0, 49.0, 50.0, 51.0, 52.0, 53.0, 54.0, 55.0, 56.0, 57.0, 58.0, 59.0,
    60.0, 61.0, 62.0, 63.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The largest finite order [`rdp_subsampled_gaussian`] accepts: an integer order α sums
/// α + 1 terms, so an absurd order would run for ever (`dp_accounting` has no limit).
pub const MAX_ORDER: f64 = 1e6;

/// Terms of the fractional-order series before an order is declared non-convergent
/// (`_MAX_STEPS_LOG_A_FRAC` in `dp_accounting`).
const MAX_STEPS_LOG_A_FRAC: u32 = 1000;

/// The range [`noise_multiplier_for`] searches, and its relative tolerance.
const SIGMA_MIN: f64 = 0.1;
const SIGMA_MAX: f64 = 1000.0;
const SIGMA_REL_TOL: f64 = 1e-6;

/// An argument outside the domain of the accountant. Each message names the argument and
/// the value it had.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AccountantError {
    #[error("sampling rate q must be in [0, 1], got {0}")]
    SamplingRate(f64),
    #[error("noise multiplier sigma must be finite and >= 0, got {0}")]
    NoiseMultiplier(f64),
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    #[error("target epsilon must be finite and >= 0, got {0}")]
    TargetEpsilon(f64),
    #[error("RDP order alpha must be > 1 and <= {max:e}, or +inf, got {0}", max = MAX_ORDER)]
    Order(f64),
    #[error("orders[{index}] must be >= 1, got {value}")]
    ConversionOrder { index: usize, value: f64 },
    #[error("rdp[{index}] must not be NaN, got {value}")]
    RdpValue { index: usize, value: f64 },
    #[error("orders and rdp must have the same, non-zero length, got {orders} orders and {rdp} rdp values")]
    Lengths { orders: usize, rdp: usize },
    #[error("an RDP curve must be over the {n} default orders, got {0} orders that differ", n = DEFAULT_ORDERS.len())]
    CurveOrders(usize),
    #[error(
        "a Skellam mechanism needs finite positive sensitivities and variance, got l2 {l2}, l1 {l1}, variance {variance}"
    )]
    Skellam { l2: f64, l1: f64, variance: f64 },
}

fn check_q(q: f64) -> Result<(), AccountantError> {
    if (0.0..=1.0).contains(&q) { Ok(()) } else { Err(AccountantError::SamplingRate(q)) }
}

fn check_sigma(sigma: f64) -> Result<(), AccountantError> {
    if sigma.is_finite() && sigma >= 0.0 { Ok(()) } else { Err(AccountantError::NoiseMultiplier(sigma)) }
}

fn check_delta(delta: f64) -> Result<(), AccountantError> {
    if delta > 0.0 && delta < 1.0 { Ok(()) } else { Err(AccountantError::Delta(delta)) }
}

/// log(e^x + e^y), exact for -∞ (`_log_add`); +∞ absorbs everything (where
/// `dp_accounting` would produce NaN from ∞ − ∞ for a noise multiplier so small that
/// σ² underflows).
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY || b == f64::INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log A_α for integer α ≥ 2 and 0 < q < 1 (`_compute_log_a_int`): the binomial sum
/// Σ_i C(α,i) q^i (1−q)^(α−i) exp((i²−i)/(2σ²)), in log space.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log_q = q.ln();
    let log1mq = (-q).ln_1p();
    let two_sigma2 = 2.0 * (sigma * sigma);
    let mut log_comb = 0.0; // log C(α, 0)
    for i in 0..=alpha {
        let fi = i as f64;
        if i > 0 {
            log_comb += ((alpha - i + 1) as f64 / fi).ln();
        }
        let log_coef = log_comb + fi * log_q + (alpha - i) as f64 * log1mq;
        log_a = log_add(log_a, log_coef + (fi * fi - fi) / two_sigma2);
    }
    log_a
}

/// log A_α for fractional α > 1 and 0 < q < 1 (`_compute_log_a_frac`): the integrals over
/// (−∞, z0] and [z0, ∞) as two series, each term a binomial coefficient times an erfc.
/// Like `dp_accounting` it uses |C(α, i)| (C(α, i) changes sign once i > α + 1), which
/// bounds A_α from above. Returns +∞ when the series has not converged after 1000 terms.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let sigma2 = sigma * sigma;
    let z0 = sigma2 * (1.0 / q - 1.0).ln() + 0.5;
    let log_q = q.ln();
    let log1mq = (-q).ln_1p();
    let erfc_scale = std::f64::consts::SQRT_2 * sigma;
    let log_half = 0.5f64.ln();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    // log |C(α, i)| by the recurrence C(α, i) = C(α, i−1)·(α − i + 1)/i.
    let mut log_coef = 0.0;
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let fi = f64::from(i);
        if i > 0 {
            log_coef += ((alpha - fi + 1.0).abs() / fi).ln();
        }
        let j = alpha - fi;
        let log_t0 = log_coef + fi * log_q + j * log1mq;
        let log_t1 = log_coef + j * log_q + fi * log1mq;
        let log_e0 = log_half + log_erfc((fi - z0) / erfc_scale);
        let log_e1 = log_half + log_erfc((z0 - j) / erfc_scale);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma2) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma2) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        // Stop when both series decrease and their terms are negligible (e^-30) next to
        // the total.
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

// W. J. Cody, "Rational Chebyshev approximations for the error function", Math. Comp. 23
// (1969) 631-638, as in his SPECFUN routine CALERF (Netlib). The coefficients are quoted
// at their published precision.
#[allow(clippy::excessive_precision)]
const CODY_A: [f64; 5] = [
    3.16112374387056560e00,
    1.13864154151050156e02,
    3.77485237685302021e02,
    3.20937758913846947e03,
    1.85777706184603153e-1,
];
#[allow(clippy::excessive_precision)]
const CODY_B: [f64; 4] =
    [2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03, 2.84423683343917062e03];
#[allow(clippy::excessive_precision)]
const CODY_C: [f64; 9] = [
    5.64188496988670089e-1,
    8.88314979438837594e00,
    6.61191906371416295e01,
    2.98635138197400131e02,
    8.81952221241769090e02,
    1.71204761263407058e03,
    2.05107837782607147e03,
    1.23033935479799725e03,
    2.15311535474403846e-8,
];
#[allow(clippy::excessive_precision)]
const CODY_D: [f64; 8] = [
    1.57449261107098347e01,
    1.17693950891312499e02,
    5.37181101862009858e02,
    1.62138957456669019e03,
    3.29079923573345963e03,
    4.36261909014324716e03,
    3.43936767414372164e03,
    1.23033935480374942e03,
];
#[allow(clippy::excessive_precision)]
const CODY_P: [f64; 6] = [
    3.05326634961232344e-1,
    3.60344899949804439e-1,
    1.25781726111229246e-1,
    1.60837851487422766e-2,
    6.58749161529837803e-4,
    1.63153871373020978e-2,
];
#[allow(clippy::excessive_precision)]
const CODY_Q: [f64; 5] = [
    2.56852019228982242e00,
    1.87295284992346047e00,
    5.27905102951428412e-1,
    6.05183413124413191e-2,
    2.33520497626869185e-3,
];

/// erf(x) for |x| <= 0.46875 (Cody's first interval).
fn erf_small(x: f64) -> f64 {
    let z = x * x;
    let mut num = CODY_A[4] * z;
    let mut den = z;
    for (a, b) in CODY_A[..3].iter().zip(&CODY_B[..3]) {
        num = (num + a) * z;
        den = (den + b) * z;
    }
    x * (num + CODY_A[3]) / (den + CODY_B[3])
}

/// e^(y²)·erfc(y) for y > 0.46875 (Cody's second and third intervals; the third is an
/// asymptotic form in 1/y² and holds for every y > 4, with no underflow).
fn erfcx_large(y: f64) -> f64 {
    if y <= 4.0 {
        let mut num = CODY_C[8] * y;
        let mut den = y;
        for (c, d) in CODY_C[..7].iter().zip(&CODY_D[..7]) {
            num = (num + c) * y;
            den = (den + d) * y;
        }
        (num + CODY_C[7]) / (den + CODY_D[7])
    } else {
        let z = 1.0 / (y * y);
        let mut num = CODY_P[5] * z;
        let mut den = z;
        for (p, q) in CODY_P[..4].iter().zip(&CODY_Q[..4]) {
            num = (num + p) * z;
            den = (den + q) * z;
        }
        let r = z * (num + CODY_P[4]) / (den + CODY_Q[4]);
        (std::f64::consts::FRAC_2_SQRT_PI * 0.5 - r) / y
    }
}

/// y² as ysq² + (y − ysq)(y + ysq) with ysq = ⌊16y⌋/16, Cody's split that keeps e^(−y²)
/// accurate for large y.
fn neg_square(y: f64) -> f64 {
    let ysq = (16.0 * y).trunc() / 16.0;
    -(ysq * ysq) - (y - ysq) * (y + ysq)
}

/// log(erfc(x)) for every real x, accurate to about 1e-15 relative, without underflow for
/// large x (where erfc(x) itself is below the smallest double): the role of
/// `log(2) + scipy.special.log_ndtr(-x·√2)` in `dp_accounting`'s `_log_erfc`.
fn log_erfc(x: f64) -> f64 {
    let y = x.abs();
    if y.is_nan() {
        return f64::NAN;
    }
    if y <= 0.46875 {
        return (-erf_small(x)).ln_1p();
    }
    if y == f64::INFINITY {
        return if x > 0.0 { f64::NEG_INFINITY } else { std::f64::consts::LN_2 };
    }
    let scaled = erfcx_large(y);
    if x > 0.0 { neg_square(y) + scaled.ln() } else { (2.0 - neg_square(y).exp() * scaled).ln() }
}

/// RDP of ONE step of the Poisson-subsampled Gaussian mechanism at `order` α
/// (`_compute_rdp_poisson_subsampled_gaussian`): 0 for q = 0; +∞ for σ = 0 or α = +∞;
/// α/(2σ²) for q = 1; otherwise log A_α / (α − 1), by the binomial sum for integer α and
/// the two-sided erfc series for fractional α (+∞ if that series does not converge).
///
/// `q` must lie in [0, 1], `noise_multiplier` be finite and >= 0, and `order` be > 1 and
/// at most [`MAX_ORDER`], or +∞.
pub fn rdp_subsampled_gaussian(q: f64, noise_multiplier: f64, order: f64) -> Result<f64, AccountantError> {
    check_q(q)?;
    check_sigma(noise_multiplier)?;
    let valid = order == f64::INFINITY || (order > 1.0 && order <= MAX_ORDER);
    if !valid {
        return Err(AccountantError::Order(order));
    }
    Ok(rdp_one_order(q, noise_multiplier, order))
}

/// [`rdp_subsampled_gaussian`] for arguments already validated.
fn rdp_one_order(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    // σ² == 0 also covers a σ so small that its square underflows.
    if alpha == f64::INFINITY || sigma * sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * (sigma * sigma));
    }
    let log_a = if alpha.fract() == 0.0 {
        // alpha is an integer in (1, MAX_ORDER], so the conversion is exact.
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    // NaN only arises from ∞ − ∞ when σ is tiny enough to overflow the terms; no bound.
    if log_a.is_nan() { f64::INFINITY } else { log_a / (alpha - 1.0) }
}

/// Converts an RDP curve to (ε, optimal order) at `delta` (`compute_epsilon`): for each
/// order α with RDP r, ε_α = r + log(1 − 1/α) − log(δ·α)/(α − 1) (Canonne–Kamath–Steinke
/// 2020 Prop. 12; Balle et al. 2020 Eq. 20), used only for α > 1.01 where it is
/// numerically stable; ε_α = 0 where the KL bound already gives δ (δ² > 1 − e^(−r)) or
/// r < 0; ε_α = +∞ otherwise. Returns the smallest ε_α (the first order on a tie), at
/// least 0, and its order.
///
/// `orders` and `rdp` must have the same non-zero length, every order be >= 1, no RDP
/// value be NaN (+∞ is allowed), and `delta` lie in (0, 1).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64), AccountantError> {
    check_delta(delta)?;
    if orders.len() != rdp.len() || orders.is_empty() {
        return Err(AccountantError::Lengths { orders: orders.len(), rdp: rdp.len() });
    }
    if let Some((index, &value)) = orders.iter().enumerate().find(|(_, a)| a.is_nan() || **a < 1.0) {
        return Err(AccountantError::ConversionOrder { index, value });
    }
    if let Some((index, &value)) = rdp.iter().enumerate().find(|(_, r)| r.is_nan()) {
        return Err(AccountantError::RdpValue { index, value });
    }
    let mut best = (f64::INFINITY, orders[0]);
    for (i, (&a, &r)) in orders.iter().zip(rdp).enumerate() {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        // An infinite order with finite RDP gives ∞/∞ above: no bound.
        let eps = if eps.is_nan() { f64::INFINITY } else { eps };
        if i == 0 || eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// An RDP curve over [`DEFAULT_ORDERS`]: one value per order, composed by addition. Values
/// may be +∞ (no guarantee at that order).
///
/// Serialised as `{"orders": [...], "rdp": [...]}` with +∞ written as `null`;
/// deserialisation refuses a curve over other orders, and NaN or negative values. (With
/// serde_json's default features a value may come back 1 ulp off: ~1e-16 relative.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RdpRepr", into = "RdpRepr")]
pub struct Rdp {
    values: Vec<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RdpRepr {
    orders: Vec<f64>,
    rdp: Vec<Option<f64>>,
}

impl From<Rdp> for RdpRepr {
    fn from(curve: Rdp) -> Self {
        let rdp = curve.values.iter().map(|&r| if r == f64::INFINITY { None } else { Some(r) }).collect();
        RdpRepr { orders: DEFAULT_ORDERS.to_vec(), rdp }
    }
}

impl TryFrom<RdpRepr> for Rdp {
    type Error = AccountantError;

    fn try_from(repr: RdpRepr) -> Result<Self, AccountantError> {
        if repr.orders != DEFAULT_ORDERS {
            let differ = DEFAULT_ORDERS.len().max(repr.orders.len())
                - DEFAULT_ORDERS.iter().zip(&repr.orders).filter(|(a, b)| a == b).count();
            return Err(AccountantError::CurveOrders(differ));
        }
        if repr.rdp.len() != DEFAULT_ORDERS.len() {
            return Err(AccountantError::Lengths { orders: DEFAULT_ORDERS.len(), rdp: repr.rdp.len() });
        }
        let values: Vec<f64> = repr.rdp.into_iter().map(|r| r.unwrap_or(f64::INFINITY)).collect();
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, r)| r.is_nan() || **r < 0.0) {
            return Err(AccountantError::RdpValue { index, value });
        }
        Ok(Rdp { values })
    }
}

impl Default for Rdp {
    fn default() -> Self {
        Rdp::zero()
    }
}

impl Rdp {
    /// No privacy spent: RDP 0 at every order.
    pub fn zero() -> Self {
        Rdp { values: vec![0.0; DEFAULT_ORDERS.len()] }
    }

    /// `steps` steps of the Poisson-subsampled Gaussian mechanism with sampling rate `q`
    /// and noise multiplier `sigma` (validated as in [`rdp_subsampled_gaussian`]); as
    /// `RdpAccountant().compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)`.
    /// Zero steps spend nothing.
    pub fn subsampled_gaussian(q: f64, sigma: f64, steps: u64) -> Result<Self, AccountantError> {
        check_q(q)?;
        check_sigma(sigma)?;
        if steps == 0 {
            return Ok(Rdp::zero());
        }
        let n = steps as f64;
        Ok(Rdp { values: DEFAULT_ORDERS.iter().map(|&a| n * rdp_one_order(q, sigma, a)).collect() })
    }

    /// Adds `other`'s RDP at each order: the guarantee of running both mechanisms.
    pub fn compose(&mut self, other: &Rdp) {
        for (mine, theirs) in self.values.iter_mut().zip(&other.values) {
            *mine += theirs;
        }
    }

    /// The RDP value at each of [`DEFAULT_ORDERS`], in that order.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// ε of this curve at `delta` ∈ (0, 1) (see [`epsilon_from_rdp`]).
    pub fn epsilon(&self, delta: f64) -> Result<f64, AccountantError> {
        self.epsilon_and_order(delta).map(|(eps, _)| eps)
    }

    /// ε of this curve at `delta` ∈ (0, 1), and the order that attains it.
    pub fn epsilon_and_order(&self, delta: f64) -> Result<(f64, f64), AccountantError> {
        epsilon_from_rdp(DEFAULT_ORDERS, &self.values, delta)
    }
}

/// ε after `steps` steps of DP-SGD with sampling rate `q` and noise multiplier `sigma`, at
/// `delta`.
pub fn dp_sgd_epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> Result<f64, AccountantError> {
    check_delta(delta)?;
    Rdp::subsampled_gaussian(q, sigma, steps)?.epsilon(delta)
}

/// The smallest noise multiplier σ in [0.1, 1000] for which `steps` steps with sampling
/// rate `q` stay within `target_eps` at `delta`, or `None` if even σ = 1000 spends more.
///
/// Bisection (on log σ) until the bracket is narrower than 1e-6 relative; the returned σ
/// is the bracket's upper end, so it always meets the target. If σ = 0.1 already meets
/// it, 0.1 is returned. ε decreases with σ, so this is the smallest such σ up to the
/// tolerance. Each probe is a full RDP computation (a few milliseconds); a search takes
/// about 25.
pub fn noise_multiplier_for(target_eps: f64, delta: f64, q: f64, steps: u64) -> Result<Option<f64>, AccountantError> {
    if !(target_eps.is_finite() && target_eps >= 0.0) {
        return Err(AccountantError::TargetEpsilon(target_eps));
    }
    check_delta(delta)?;
    check_q(q)?;
    calibrate(target_eps, delta, &|sigma| Rdp::subsampled_gaussian(q, sigma, steps))
}

/// The smallest noise multiplier σ in [0.1, 1000] whose curve `curve(σ)` stays within
/// `target_eps` at `delta` (ε must decrease with σ), or `None`; the search of
/// [`noise_multiplier_for`], for any mechanism.
pub fn calibrate(
    target_eps: f64,
    delta: f64,
    curve: &dyn Fn(f64) -> Result<Rdp, AccountantError>,
) -> Result<Option<f64>, AccountantError> {
    if !(target_eps.is_finite() && target_eps >= 0.0) {
        return Err(AccountantError::TargetEpsilon(target_eps));
    }
    check_delta(delta)?;
    let meets = |sigma: f64| -> Result<bool, AccountantError> { Ok(curve(sigma)?.epsilon(delta)? <= target_eps) };
    if !meets(SIGMA_MAX)? {
        return Ok(None);
    }
    if meets(SIGMA_MIN)? {
        return Ok(Some(SIGMA_MIN));
    }
    // ε(lo) > target >= ε(hi).
    let (mut lo, mut hi) = (SIGMA_MIN, SIGMA_MAX);
    while hi - lo > SIGMA_REL_TOL * lo {
        let mid = (lo * hi).sqrt();
        if meets(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(Some(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = include_str!("accountant_vectors.json");

    fn vectors() -> serde_json::Value {
        serde_json::from_str(VECTORS).expect("accountant_vectors.json parses")
    }

    fn num(v: &serde_json::Value, key: &str) -> f64 {
        v[key].as_f64().unwrap_or_else(|| panic!("{key} is a number in {v}"))
    }

    /// Relative error of `got` against `want` (+∞, JSON null, matches only +∞), after
    /// asserting that they agree to 1e-6 relative or, near zero, 1e-12 absolute.
    fn check_close(got: f64, want: Option<f64>, what: &str) -> f64 {
        let Some(want) = want else {
            assert_eq!(got, f64::INFINITY, "{what}: want +inf");
            return 0.0;
        };
        let (abs, rel) = ((got - want).abs(), (got - want).abs() / want.abs());
        assert!(rel <= 1e-6 || abs <= 1e-12, "{what}: got {got}, want {want}");
        if want == 0.0 { 0.0 } else { rel }
    }

    #[test]
    fn default_orders_are_dp_accountings() {
        let v = vectors();
        let theirs: Vec<f64> = v["default_orders"]
            .as_array()
            .expect("default_orders")
            .iter()
            .map(|x| x.as_f64().expect("order"))
            .collect();
        assert_eq!(DEFAULT_ORDERS, theirs.as_slice());
        let formula: Vec<f64> = (1..100)
            .map(|x| 1.0 + f64::from(x) / 10.0)
            .chain((11..64).map(f64::from))
            .chain([128.0, 256.0, 512.0, 1024.0])
            .collect();
        assert_eq!(DEFAULT_ORDERS, formula.as_slice());
    }

    #[test]
    fn agrees_with_dp_accounting_vectors() {
        let v = vectors();
        assert_eq!(v["dp_accounting"], "0.6.0");
        let cases = v["epsilon_cases"].as_array().expect("epsilon_cases");
        assert!(cases.len() >= 30);
        let (mut max_eps_err, mut max_rdp_err) = (0.0f64, 0.0f64);
        for case in cases {
            let (q, sigma, delta) = (num(case, "q"), num(case, "sigma"), num(case, "delta"));
            let steps = case["steps"].as_u64().expect("steps");
            for point in case["rdp"].as_array().expect("rdp") {
                let order = num(point, "order");
                let got = rdp_subsampled_gaussian(q, sigma, order).expect("valid");
                let err = check_close(got, point["rdp"].as_f64(), &format!("rdp q={q} sigma={sigma} order={order}"));
                max_rdp_err = max_rdp_err.max(err);
            }
            let (eps, order) =
                Rdp::subsampled_gaussian(q, sigma, steps).expect("valid").epsilon_and_order(delta).expect("valid");
            let err = check_close(eps, Some(num(case, "epsilon")), &format!("epsilon {case}"));
            assert_eq!(order, num(case, "order"), "{case}: optimal order");
            assert_eq!(dp_sgd_epsilon(q, sigma, steps, delta), Ok(eps));
            max_eps_err = max_eps_err.max(err);
        }
        eprintln!("max relative error: epsilon {max_eps_err:e}, rdp {max_rdp_err:e}");
    }

    #[test]
    fn calibration_agrees_with_dp_accounting() {
        let v = vectors();
        let cases = v["calibration_cases"].as_array().expect("calibration_cases");
        assert!(cases.len() >= 5);
        let mut max_err = 0.0f64;
        for case in cases {
            let (target, delta, q) = (num(case, "target_epsilon"), num(case, "delta"), num(case, "q"));
            let steps = case["steps"].as_u64().expect("steps");
            let sigma = noise_multiplier_for(target, delta, q, steps).expect("valid").expect("reachable");
            let want = num(case, "sigma");
            let err = (sigma - want).abs() / want;
            assert!(err <= 1e-4, "{case}: sigma {sigma}");
            assert!(dp_sgd_epsilon(q, sigma, steps, delta).expect("valid") <= target, "{case}: meets the target");
            let less = sigma * (1.0 - 1e-5);
            assert!(dp_sgd_epsilon(q, less, steps, delta).expect("valid") > target, "{case}: smallest");
            max_err = max_err.max(err);
        }
        eprintln!("max relative error: calibrated sigma {max_err:e}");
    }

    #[test]
    fn calibration_limits() {
        // Even σ = 1000 cannot reach ε = 0 for a mechanism that runs.
        assert_eq!(noise_multiplier_for(0.0, 1e-5, 0.01, 100), Ok(None));
        // A loose target is met at the bottom of the range.
        assert_eq!(noise_multiplier_for(1e6, 1e-5, 0.01, 100), Ok(Some(0.1)));
        assert_eq!(noise_multiplier_for(1.0, 1e-5, 0.0, 100), Ok(Some(0.1)));
    }

    #[test]
    fn full_batch_is_the_gaussian_mechanism_exactly() {
        // σ a power of two, so α·steps/(2σ²) has one rounding whichever way it is computed.
        for (sigma, steps) in [(0.5, 1), (2.0, 100), (4.0, 10_000), (1.0, 7)] {
            let curve = Rdp::subsampled_gaussian(1.0, sigma, steps).expect("valid");
            for (&a, &r) in DEFAULT_ORDERS.iter().zip(curve.values()) {
                assert_eq!(r, a * steps as f64 / (2.0 * sigma * sigma), "sigma={sigma} steps={steps} order={a}");
            }
        }
        assert_eq!(rdp_subsampled_gaussian(1.0, 1.1, 3.5), Ok(3.5 / (2.0 * 1.1 * 1.1)));
    }

    #[test]
    fn special_cases() {
        assert_eq!(rdp_subsampled_gaussian(0.0, 0.0, 2.0), Ok(0.0));
        assert_eq!(rdp_subsampled_gaussian(0.01, 0.0, 2.0), Ok(f64::INFINITY));
        assert_eq!(rdp_subsampled_gaussian(0.01, 1.0, f64::INFINITY), Ok(f64::INFINITY));
        // σ² underflows: no guarantee rather than NaN.
        assert_eq!(rdp_subsampled_gaussian(0.01, 1e-200, 8.0), Ok(f64::INFINITY));
        assert!(rdp_subsampled_gaussian(0.01, 1e-150, 8.0).expect("valid") > 1e300);
        // (i² − i)/(2σ²) overflows: +∞, for integer and fractional orders.
        assert_eq!(rdp_subsampled_gaussian(0.01, 1e-160, 8.0), Ok(f64::INFINITY));
        assert_eq!(rdp_subsampled_gaussian(0.01, 1e-160, 2.5), Ok(f64::INFINITY));
        assert_eq!(dp_sgd_epsilon(0.01, 0.0, 100, 1e-5), Ok(f64::INFINITY));
        assert_eq!(dp_sgd_epsilon(0.01, 1.0, 0, 1e-5), Ok(0.0));
        assert_eq!(Rdp::zero().epsilon(1e-5), Ok(0.0));
        // The KL branch: a tiny divergence already gives this δ.
        assert_eq!(epsilon_from_rdp(&[2.0], &[1e-12], 1e-5), Ok((0.0, 2.0)));
        // Orders at or below 1.01 give no finite ε by the ratio bound.
        assert_eq!(epsilon_from_rdp(&[1.0, 1.01], &[1.0, 1.0], 1e-5), Ok((f64::INFINITY, 1.0)));
    }

    fn monotone(label: &str, eps: &[f64], increasing: bool) {
        for w in eps.windows(2) {
            assert!(if increasing { w[0] < w[1] } else { w[0] > w[1] }, "{label}: {eps:?}");
        }
    }

    #[test]
    fn more_steps_spend_more() {
        for (q, sigma) in [(0.001, 1.1), (0.01, 0.8), (0.05, 2.0), (0.25, 5.0), (1.0, 1.0)] {
            let eps: Vec<f64> =
                [1, 10, 100, 1000, 10_000].iter().map(|&n| dp_sgd_epsilon(q, sigma, n, 1e-5).expect("valid")).collect();
            monotone(&format!("q={q} sigma={sigma}"), &eps, true);
        }
    }

    #[test]
    fn more_noise_spends_less() {
        for (q, steps) in [(0.001, 10_000), (0.01, 100), (0.05, 1000), (0.25, 10), (1.0, 1)] {
            let eps: Vec<f64> = [0.5, 0.8, 1.1, 2.0, 5.0, 20.0]
                .iter()
                .map(|&s| dp_sgd_epsilon(q, s, steps, 1e-5).expect("valid"))
                .collect();
            monotone(&format!("q={q} steps={steps}"), &eps, false);
        }
    }

    #[test]
    fn composition_adds_per_order() {
        let a = Rdp::subsampled_gaussian(0.01, 1.1, 300).expect("valid");
        let b = Rdp::subsampled_gaussian(0.01, 1.1, 700).expect("valid");
        let mut sum = a.clone();
        sum.compose(&b);
        let whole = Rdp::subsampled_gaussian(0.01, 1.1, 1000).expect("valid");
        for ((s, w), a) in sum.values().iter().zip(whole.values()).zip(DEFAULT_ORDERS) {
            assert!((s - w).abs() <= 1e-12 * w.abs(), "order {a}: {s} vs {w}");
        }
        let mut z = Rdp::default();
        z.compose(&a);
        assert_eq!(z, a);
    }

    #[test]
    fn serde_round_trip_keeps_infinity() {
        // q = 0.25, σ = 2: the series at order 1.5 does not converge (+∞ in dp_accounting).
        let curve = Rdp::subsampled_gaussian(0.25, 2.0, 10).expect("valid");
        assert!(curve.values().contains(&f64::INFINITY));
        let json = serde_json::to_string(&curve).expect("serialise");
        let back: Rdp = serde_json::from_str(&json).expect("deserialise");
        // serde_json without its `float_roundtrip` feature may parse a float 1 ulp off.
        for ((b, c), a) in back.values().iter().zip(curve.values()).zip(DEFAULT_ORDERS) {
            assert!(b == c || (b - c).abs() <= 4.0 * f64::EPSILON * c.abs(), "order {a}: {b} vs {c}");
        }
    }

    #[test]
    fn serde_refuses_other_orders_and_bad_values() {
        let good = serde_json::to_value(Rdp::subsampled_gaussian(0.01, 1.0, 10).expect("valid")).expect("to value");
        let mut other_orders = good.clone();
        other_orders["orders"][3] = serde_json::json!(1.45);
        let err = serde_json::from_value::<Rdp>(other_orders).expect_err("other orders");
        assert!(err.to_string().contains("default orders"), "{err}");
        let mut short = good.clone();
        short["rdp"].as_array_mut().expect("array").pop();
        assert!(serde_json::from_value::<Rdp>(short).is_err());
        let mut negative = good;
        negative["rdp"][5] = serde_json::json!(-1.0);
        let err = serde_json::from_value::<Rdp>(negative).expect_err("negative");
        assert!(err.to_string().contains("rdp[5]"), "{err}");
    }

    /// `result` is an error whose message names `arg` and shows `value`.
    fn check_error<T: std::fmt::Debug>(result: Result<T, AccountantError>, arg: &str, value: &str) {
        let message = result.expect_err("invalid input is refused").to_string();
        assert!(message.contains(arg) && message.contains(value), "{message:?} should name {arg} = {value}");
    }

    #[test]
    fn invalid_inputs_name_the_argument() {
        check_error(rdp_subsampled_gaussian(1.5, 1.0, 2.0), "sampling rate q", "1.5");
        check_error(rdp_subsampled_gaussian(-0.1, 1.0, 2.0), "sampling rate q", "-0.1");
        check_error(rdp_subsampled_gaussian(f64::NAN, 1.0, 2.0), "sampling rate q", "NaN");
        check_error(rdp_subsampled_gaussian(0.1, -1.0, 2.0), "noise multiplier sigma", "-1");
        check_error(rdp_subsampled_gaussian(0.1, f64::INFINITY, 2.0), "noise multiplier sigma", "inf");
        check_error(rdp_subsampled_gaussian(0.1, 1.0, 1.0), "order alpha", "1");
        check_error(rdp_subsampled_gaussian(0.1, 1.0, 0.5), "order alpha", "0.5");
        check_error(rdp_subsampled_gaussian(0.1, 1.0, 1e7), "order alpha", "10000000");
        check_error(rdp_subsampled_gaussian(0.1, 1.0, f64::NAN), "order alpha", "NaN");
        check_error(dp_sgd_epsilon(0.01, 1.0, 10, 0.0), "delta", "0");
        check_error(dp_sgd_epsilon(0.01, 1.0, 10, 1.0), "delta", "1");
        check_error(dp_sgd_epsilon(0.01, 1.0, 10, f64::NAN), "delta", "NaN");
        check_error(dp_sgd_epsilon(2.0, 1.0, 10, 1e-5), "sampling rate q", "2");
        check_error(dp_sgd_epsilon(0.01, -2.0, 10, 1e-5), "noise multiplier sigma", "-2");
        check_error(Rdp::subsampled_gaussian(0.01, f64::NAN, 10), "noise multiplier sigma", "NaN");
        check_error(Rdp::zero().epsilon(-1e-5), "delta", "-0.00001");
        check_error(noise_multiplier_for(-1.0, 1e-5, 0.01, 10), "target epsilon", "-1");
        check_error(noise_multiplier_for(f64::INFINITY, 1e-5, 0.01, 10), "target epsilon", "inf");
        check_error(noise_multiplier_for(1.0, 2.0, 0.01, 10), "delta", "2");
        check_error(noise_multiplier_for(1.0, 1e-5, 1.01, 10), "sampling rate q", "1.01");
        check_error(epsilon_from_rdp(&[2.0, 3.0], &[1.0], 1e-5), "2 orders and 1 rdp", "");
        check_error(epsilon_from_rdp(&[], &[], 1e-5), "0 orders", "");
        check_error(epsilon_from_rdp(&[2.0, 0.5], &[1.0, 1.0], 1e-5), "orders[1]", "0.5");
        check_error(epsilon_from_rdp(&[2.0, 3.0], &[1.0, f64::NAN], 1e-5), "rdp[1]", "NaN");
    }

    /// log erfc against mpmath at 40 digits (`mpmath.log(mpmath.erfc(x))`), to 1e-13
    /// relative: across Cody's intervals, their boundaries and far into the tail.
    #[test]
    #[allow(clippy::excessive_precision)] // mpmath's digits, quoted as printed
    fn log_erfc_known_values() {
        for (x, want) in [
            (-5.0, 0.69314718055917657952),
            (-1.0, 0.61123231767807049464),
            (-0.3, 0.28414589714140825864),
            (0.2, -0.25193223378261666096),
            (0.46875, -0.67848218561439609899),
            (0.5, -0.73501112983708440303),
            (1.0, -1.8496055099332482486),
            (2.0, -5.3649412646166375745),
            (3.9, -17.173871216435403526),
            (4.0, -17.987778312103006503),
            (4.5, -22.349768303435940757),
            (5.0, -27.200889545537434422),
            (10.0, -102.87988902484488857),
            (27.0, -732.86888650789741098),
            (100.0, -10005.177585122664333),
            (1e4, -100000009.7827053199),
        ] {
            let got = log_erfc(x);
            assert!((got - want).abs() <= 1e-13 * f64::abs(want), "log_erfc({x}) = {got}, want {want}");
        }
        assert_eq!(log_erfc(0.0), 0.0);
        assert_eq!(log_erfc(f64::INFINITY), f64::NEG_INFINITY);
        assert_eq!(log_erfc(f64::NEG_INFINITY), std::f64::consts::LN_2);
    }
}
