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

use maeum_protocols::strategy::{StrategyError, StrategyKind, StrategySpec};

/// Magic bytes that open [`ServerOptimizer::state_bytes`].
const STATE_MAGIC: &[u8; 8] = b"maeum-so";
const STATE_VERSION: u16 = 1;
/// magic, version (u16), kind (u8), reserved (u8), n_params (u64).
const STATE_HEADER_LEN: usize = 8 + 2 + 1 + 1 + 8;

/// The server optimiser of one job: the strategy's hyper-parameters and, for the
/// adaptive strategies, the moment estimates m and v (one f32 each per parameter).
#[derive(Clone)]
pub struct ServerOptimizer {
    kind: StrategyKind,
    eta: f64,
    beta1: f64,
    beta2: f64,
    tau: f64,
    n_params: usize,
    /// Empty unless adaptive.
    m: Vec<f32>,
    /// Empty unless adaptive.
    v: Vec<f32>,
}

// Vectors are model-sized and derived from site updates: never print them.
impl std::fmt::Debug for ServerOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptimizer")
            .field("kind", &self.kind)
            .field("eta", &self.eta)
            .field("n_params", &self.n_params)
            .finish_non_exhaustive()
    }
}

impl ServerOptimizer {
    /// A fresh optimiser (m = 0, v = τ²) for a model of `n_params` parameters. `spec`
    /// should have passed [`StrategySpec::validate`] (every loaded job has).
    pub fn new(spec: &StrategySpec, n_params: usize) -> Self {
        let adaptive = spec.kind.is_adaptive();
        let tau = spec.tau();
        let (m, v) =
            if adaptive { (vec![0.0; n_params], vec![(tau * tau) as f32; n_params]) } else { (vec![], vec![]) };
        Self {
            kind: spec.kind,
            eta: spec.server_learning_rate(),
            beta1: spec.beta1(),
            beta2: spec.beta2(),
            tau,
            n_params,
            m,
            v,
        }
    }

    pub fn kind(&self) -> StrategyKind {
        self.kind
    }

    pub fn n_params(&self) -> usize {
        self.n_params
    }

    /// One element's step: the new (x, m, v) from the old ones and the mean update `d`.
    fn step(&self, x: f32, m: f32, v: f32, d: f32) -> (f32, f32, f32) {
        let d = f64::from(d);
        match self.kind {
            StrategyKind::FedAvg | StrategyKind::FedProx => ((f64::from(x) + self.eta * d) as f32, m, v),
            StrategyKind::FedAdam | StrategyKind::FedYogi => {
                let (m, v, d2) = (f64::from(m), f64::from(v), d * d);
                let m = (self.beta1 * m + (1.0 - self.beta1) * d) as f32;
                let v = if self.kind == StrategyKind::FedAdam {
                    self.beta2 * v + (1.0 - self.beta2) * d2
                } else {
                    let diff = v - d2;
                    let sign = if diff > 0.0 {
                        1.0
                    } else if diff < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    v - (1.0 - self.beta2) * d2 * sign
                } as f32;
                // The step uses m and v as stored, so a resumed run computes the same.
                let x = f64::from(x) + self.eta * f64::from(m) / (f64::from(v).sqrt() + self.tau);
                (x as f32, m, v)
            }
        }
    }

    /// m and v at `i` (unused placeholders for the non-adaptive kinds).
    fn moments(&self, i: usize) -> (f32, f32) {
        (self.m.get(i).copied().unwrap_or(0.0), self.v.get(i).copied().unwrap_or(0.0))
    }

    /// global ← global + step(mean_delta). All or nothing: on error neither the model
    /// nor the optimiser state has changed.
    pub fn apply(&mut self, global: &mut [f32], mean_delta: &[f32]) -> Result<(), StrategyError> {
        for (what, actual) in [("global model", global.len()), ("mean update", mean_delta.len())] {
            if actual != self.n_params {
                return Err(StrategyError::LengthMismatch { what, expected: self.n_params, actual });
            }
        }
        // Pass 1 checks every element, pass 2 writes: no O(model) scratch memory.
        for (i, (&x, &d)) in global.iter().zip(mean_delta).enumerate() {
            if !d.is_finite() {
                return Err(StrategyError::NonFiniteDelta { index: i, value: d });
            }
            let (m, v) = self.moments(i);
            let (x, m, v) = self.step(x, m, v, d);
            if !(x.is_finite() && m.is_finite() && v.is_finite()) {
                return Err(StrategyError::NonFiniteResult { kind: self.kind, index: i });
            }
        }
        for (i, (x, &d)) in global.iter_mut().zip(mean_delta).enumerate() {
            let (m, v) = self.moments(i);
            let (new_x, new_m, new_v) = self.step(*x, m, v, d);
            *x = new_x;
            if self.kind.is_adaptive() {
                self.m[i] = new_m;
                self.v[i] = new_v;
            }
        }
        Ok(())
    }

    /// Durable state, persisted beside each model version so that a restarted
    /// coordinator resumes exactly. Empty for `fedavg` and `fedprox` (stateless).
    /// Otherwise: `maeum-so` (8 bytes), format version (u16 LE, 1), kind (u8: 2 fedadam,
    /// 3 fedyogi), reserved (u8, 0), n_params (u64 LE), then m and v as n_params
    /// little-endian f32 each.
    pub fn state_bytes(&self) -> Vec<u8> {
        if !self.kind.is_adaptive() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(STATE_HEADER_LEN + 8 * self.n_params);
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.push(self.kind.tag());
        out.push(0);
        out.extend_from_slice(&(self.n_params as u64).to_le_bytes());
        for x in self.m.iter().chain(&self.v) {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    /// Restores an optimiser from [`ServerOptimizer::state_bytes`], checking the header,
    /// that the state is of `spec`'s kind and for `n_params` parameters, and that every
    /// value is finite (and v ≥ 0).
    pub fn from_state(spec: &StrategySpec, n_params: usize, bytes: &[u8]) -> Result<Self, StrategyError> {
        let bad = |detail: String| Err(StrategyError::BadState(detail));
        let mut opt = Self::new(spec, 0);
        opt.n_params = n_params;
        if !spec.kind.is_adaptive() {
            if !bytes.is_empty() {
                return bad(format!("{} keeps no state, got {} bytes", spec.kind, bytes.len()));
            }
            return Ok(opt);
        }
        let Some((header, body)) = bytes.split_at_checked(STATE_HEADER_LEN) else {
            return bad(format!("{} bytes is shorter than the {STATE_HEADER_LEN}-byte header", bytes.len()));
        };
        if &header[..8] != STATE_MAGIC {
            return bad("does not start with \"maeum-so\"".into());
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != STATE_VERSION {
            return bad(format!("format version {version} is not supported (this build reads {STATE_VERSION})"));
        }
        match StrategyKind::from_tag(header[10]) {
            Some(kind) if kind == spec.kind => {}
            Some(kind) => return bad(format!("state is for {kind}, the job uses {}", spec.kind)),
            None => return bad(format!("unknown strategy tag {}", header[10])),
        }
        let mut n = [0; 8];
        n.copy_from_slice(&header[12..20]);
        let stored = u64::from_le_bytes(n);
        if stored != n_params as u64 {
            return bad(format!("state is for {stored} parameters, the model has {n_params}"));
        }
        let expected = n_params.saturating_mul(8);
        if body.len() != expected {
            return bad(format!(
                "body is {} bytes, expected {expected} (m and v for {n_params} parameters)",
                body.len()
            ));
        }
        let mut values = body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        opt.m = values.by_ref().take(n_params).collect();
        opt.v = values.collect();
        if let Some(i) = opt.m.iter().position(|x| !x.is_finite()) {
            return bad(format!("m is not finite at index {i}"));
        }
        if let Some(i) = opt.v.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            return bad(format!("v is not a finite value ≥ 0 at index {i}"));
        }
        Ok(opt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: StrategyKind, eta: f64) -> StrategySpec {
        StrategySpec {
            kind,
            prox_mu: (kind == StrategyKind::FedProx).then_some(0.01),
            server_learning_rate: Some(eta),
            beta1: kind.is_adaptive().then_some(0.9),
            beta2: kind.is_adaptive().then_some(0.99),
            tau: kind.is_adaptive().then_some(1e-3),
        }
    }

    const GLOBAL: [f32; 3] = [0.5, -1.0, 2.0];
    const DELTAS: [[f32; 3]; 2] = [[0.1, -0.2, 0.0], [0.3, 0.1, -0.05]];

    /// Runs `deltas` through a fresh optimiser from `GLOBAL` and compares the result with
    /// `expected` (within f32 rounding of each stored m, v and x).
    fn check(spec: &StrategySpec, deltas: &[[f32; 3]], expected: [f64; 3]) {
        spec.validate().expect("valid spec");
        let mut opt = ServerOptimizer::new(spec, 3);
        let mut global = GLOBAL;
        for d in deltas {
            opt.apply(&mut global, d).expect("step");
        }
        for (i, (got, want)) in global.iter().zip(expected).enumerate() {
            assert!((f64::from(*got) - want).abs() <= 5e-7, "{}[{i}]: {got} vs {want}", spec.kind);
        }
    }

    /// Reddi et al. 2021, Algorithm 2, entirely in f64, independent of `step`.
    fn reference(yogi: bool, eta: f64, deltas: &[[f32; 3]]) -> [f64; 3] {
        let (b1, b2, tau) = (0.9, 0.99, 1e-3);
        let mut x = GLOBAL.map(f64::from);
        let (mut m, mut v) = ([0.0f64; 3], [tau * tau; 3]);
        for d in deltas {
            for i in 0..3 {
                let d = f64::from(d[i]);
                m[i] = b1 * m[i] + (1.0 - b1) * d;
                v[i] = if yogi {
                    let s = (v[i] - d * d).partial_cmp(&0.0).map_or(0.0, |o| o as i8 as f64);
                    v[i] - (1.0 - b2) * d * d * s
                } else {
                    b2 * v[i] + (1.0 - b2) * d * d
                };
                x[i] += eta * m[i] / (v[i].sqrt() + tau);
            }
        }
        x
    }

    #[test]
    fn fedavg_with_unit_rate_adds_the_mean_update() {
        check(&spec(StrategyKind::FedAvg, 1.0), &DELTAS[..1], [0.6, -1.2, 2.0]);
        check(&spec(StrategyKind::FedAvg, 1.0), &DELTAS, [0.9, -1.1, 1.95]);
        let mut opt = ServerOptimizer::new(&spec(StrategyKind::FedAvg, 1.0), 3);
        let mut global = GLOBAL;
        opt.apply(&mut global, &DELTAS[0]).expect("step");
        let plain: Vec<f32> = GLOBAL.iter().zip(DELTAS[0]).map(|(x, d)| x + d).collect();
        assert_eq!(global.to_vec(), plain, "η = 1 is exactly global + Δ");
    }

    #[test]
    fn fedavg_and_fedprox_scale_by_the_server_rate() {
        check(&spec(StrategyKind::FedAvg, 0.5), &DELTAS[..1], [0.55, -1.1, 2.0]);
        check(&spec(StrategyKind::FedProx, 2.0), &DELTAS[..1], [0.7, -1.4, 2.0]);
    }

    #[test]
    fn fedadam_matches_hand_computed_values() {
        // Computed independently (Python, f64) with η = 0.1, β = (0.9, 0.99), τ = 1e-3.
        let adam = spec(StrategyKind::FedAdam, 0.1);
        check(&adam, &DELTAS[..1], [0.590_502_831_319_297_7, -1.095_126_051_746_342_1, 2.0]);
        check(&adam, &DELTAS, [0.710_052_361_253_648_2, -1.129_471_059_541_394_2, 1.917_993_366_790_777_1]);
        check(&adam, &DELTAS, reference(false, 0.1, &DELTAS));
    }

    #[test]
    fn fedyogi_matches_hand_computed_values() {
        let yogi = spec(StrategyKind::FedYogi, 0.1);
        check(&yogi, &DELTAS[..1], [0.590_498_756_345_393_3, -1.095_124_922_043_289, 2.0]);
        check(&yogi, &DELTAS, [0.709_989_233_850_559_3, -1.129_337_768_923_024_8, 1.918_019_609_488_568_2]);
        check(&yogi, &DELTAS, reference(true, 0.1, &DELTAS));
    }

    #[test]
    fn state_round_trip_resumes_bit_for_bit() {
        for kind in [StrategyKind::FedAvg, StrategyKind::FedProx, StrategyKind::FedAdam, StrategyKind::FedYogi] {
            let spec = spec(kind, 0.1);
            let mut opt = ServerOptimizer::new(&spec, 3);
            let mut global = GLOBAL;
            for d in &DELTAS {
                opt.apply(&mut global, d).expect("step");
            }
            let bytes = opt.state_bytes();
            assert_eq!(bytes.is_empty(), !kind.is_adaptive(), "{kind}");
            let mut resumed = ServerOptimizer::from_state(&spec, 3, &bytes).expect("restore");
            let mut resumed_global = global;
            let next = [-0.4, 0.25, 0.125];
            opt.apply(&mut global, &next).expect("step");
            resumed.apply(&mut resumed_global, &next).expect("step");
            assert_eq!(global.map(f32::to_bits), resumed_global.map(f32::to_bits), "{kind}");
            assert_eq!(opt.state_bytes(), resumed.state_bytes(), "{kind}");
        }
    }

    #[test]
    fn state_layout_is_header_then_m_then_v() {
        let opt = ServerOptimizer::new(&spec(StrategyKind::FedYogi, 0.1), 2);
        let bytes = opt.state_bytes();
        let tau2 = (1e-3f64 * 1e-3) as f32;
        let mut want = b"maeum-so\x01\x00\x03\x00\x02\x00\x00\x00\x00\x00\x00\x00".to_vec();
        for x in [0.0, 0.0, tau2, tau2] {
            want.extend_from_slice(&f32::to_le_bytes(x));
        }
        assert_eq!(bytes, want);
    }

    #[test]
    fn from_state_refuses_bad_bytes() {
        let (adam, avg) = (spec(StrategyKind::FedAdam, 0.1), spec(StrategyKind::FedAvg, 1.0));
        let good = ServerOptimizer::new(&adam, 3).state_bytes();
        let yogi_bytes = ServerOptimizer::new(&spec(StrategyKind::FedYogi, 0.1), 3).state_bytes();
        let patched = |at: usize, b: u8| {
            let mut v = good.clone();
            v[at] = b;
            v
        };
        let mut nan_v = good.clone();
        nan_v[STATE_HEADER_LEN + 12..STATE_HEADER_LEN + 16].copy_from_slice(&f32::NAN.to_le_bytes());
        let cases: Vec<(&StrategySpec, usize, Vec<u8>, &str)> = vec![
            (&adam, 3, good[..good.len() - 1].to_vec(), "body is 23 bytes, expected 24"),
            (&adam, 3, good[..10].to_vec(), "10 bytes is shorter than the 20-byte header"),
            (&adam, 3, vec![], "0 bytes is shorter"),
            (&adam, 3, patched(0, b'X'), "does not start with \"maeum-so\""),
            (&adam, 3, patched(8, 2), "format version 2 is not supported"),
            (&adam, 3, yogi_bytes, "state is for fedyogi, the job uses fedadam"),
            (&adam, 3, patched(10, 9), "unknown strategy tag 9"),
            (&adam, 4, good.clone(), "state is for 3 parameters, the model has 4"),
            (&adam, 3, nan_v, "v is not a finite value ≥ 0 at index 0"),
            (&avg, 3, good.clone(), "fedavg keeps no state, got 44 bytes"),
        ];
        for (spec, n, bytes, want) in cases {
            let err = ServerOptimizer::from_state(spec, n, &bytes).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn apply_refuses_bad_input_and_changes_nothing() {
        let mut opt = ServerOptimizer::new(&spec(StrategyKind::FedAdam, 0.1), 3);
        let before = opt.state_bytes();
        let cases: Vec<(Vec<f32>, Vec<f32>, &str)> = vec![
            (GLOBAL.to_vec(), vec![0.0; 2], "mean update has 2 parameters, the server optimiser was built for 3"),
            (vec![0.0; 4], vec![0.0; 3], "global model has 4 parameters"),
            (GLOBAL.to_vec(), vec![0.1, f32::NAN, 0.0], "mean update is not finite at index 1"),
            (GLOBAL.to_vec(), vec![0.1, 0.0, f32::INFINITY], "not finite at index 2: inf"),
        ];
        for (mut g, d, want) in cases {
            let original = g.clone();
            let err = opt.apply(&mut g, &d).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
            assert_eq!(g, original, "{want}: model unchanged");
        }
        assert_eq!(opt.state_bytes(), before, "no state change on error");
        let mut avg = ServerOptimizer::new(&spec(StrategyKind::FedAvg, 1.0), 3);
        let mut global = [1.0, f32::MAX, 2.0];
        let err = avg.apply(&mut global, &[0.5, f32::MAX, 0.0]).expect_err("overflow");
        assert_eq!(
            err.to_string(),
            "fedavg step at index 1 leaves f32 range (update too large); the global model is unchanged"
        );
        assert_eq!(global, [1.0, f32::MAX, 2.0], "index 0 was not updated either");
    }
}
