//! Session description: who takes part, with which parameters. The coordinator
//! chooses it; every site checks it and derives the same [`Session::id`], which every
//! signature, key derivation and message is bound to.

use super::{Check, SecAggError};
use ring::digest;

/// Parameters the job file sets (see `docs/jobs.md`, `[secure_aggregation]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionParams {
    /// Minimum number of parties at every stage, and shares needed to reconstruct.
    pub threshold: u16,
    /// 0: every pair masks (SecAgg). k > 0: SecAgg+ k-regular graph (k even, < n-1).
    pub degree: u16,
    /// Number of u32 words in each input: the model's parameters + 1 (the weight).
    pub vector_len: u64,
    /// Each update coordinate is clipped to [-clip, clip] before weighting.
    pub clip: f32,
    /// A site's weight (sample count) is capped at this value.
    pub max_weight: u32,
}

/// One participant: its 1-based index in this session, its site id, and the public
/// key of its enrolled identity (the SubjectPublicKeyInfo's key bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    pub index: u16,
    pub site_id: String,
    pub identity_key: Vec<u8>,
}

/// Everything that fixes one run of the protocol. A retried round is a new session
/// (new attempt number, new keys, new seeds). The SecAgg+ graph is not part of it: its
/// seed is drawn jointly by the parties after stage 1 (SA-13), so the coordinator that
/// writes the session cannot choose it.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The consortium's name (domain separation across federations).
    pub consortium: String,
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    /// Sorted by index; indices are 1..=n with no gaps.
    pub participants: Vec<Participant>,
    pub params: SessionParams,
    /// What the round is about beyond its numbers: the caller's digest of the job file
    /// and the base model (`maeum_protocols::wire::secagg::round_binding`). Parties
    /// handed different models or job files derive different session ids, so their
    /// signatures do not verify and the session aborts.
    pub binding: [u8; 32],
}

/// Largest federation one session supports (share x-coordinates are bytes).
pub const MAX_PARTIES: usize = 255;

impl SessionParams {
    /// The default threshold for `n` parties: the smallest t with t > 2n/3, at least 2.
    pub fn default_threshold(n: usize) -> u16 {
        ((2 * n) / 3 + 1).max(2).min(n) as u16
    }
}

impl Session {
    pub fn n(&self) -> usize {
        self.participants.len()
    }

    /// Checks SA-01: indices 1..=n in order, distinct site ids, n ≤ 255,
    /// n/2 < threshold ≤ n (SecAgg) or (k+1)/2 < threshold ≤ k+1 (SecAgg+),
    /// degree even and < n-1 when set, vector_len ≥ 1, clip finite > 0,
    /// 1 ≤ max_weight and n·max_weight < 2^32.
    pub fn validate(&self) -> Result<(), SecAggError> {
        let n = self.n();
        let bad = |m: String| Err(SecAggError::new(Check::Params, m));
        if !(2..=MAX_PARTIES).contains(&n) {
            return bad(format!("{n} parties; a session needs 2 to {MAX_PARTIES}"));
        }
        for (i, p) in self.participants.iter().enumerate() {
            if usize::from(p.index) != i + 1 {
                return bad(format!(
                    "participant {} has index {}; indices must be 1..={n} in order",
                    p.site_id, p.index
                ));
            }
            if p.identity_key.is_empty() {
                return bad(format!("participant {} has no identity key", p.site_id));
            }
        }
        let mut ids: Vec<&str> = self.participants.iter().map(|p| p.site_id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("a site appears twice among the participants".into());
        }
        let p = &self.params;
        let t = usize::from(p.threshold);
        let group = if p.degree == 0 {
            n
        } else {
            let k = usize::from(p.degree);
            if k % 2 != 0 || k + 1 >= n {
                return bad(format!("neighbour degree {k} must be even and below {} (n-1)", n - 1));
            }
            k + 1
        };
        if t * 2 <= group || t > group {
            return bad(format!("threshold {t} must be above {group}/2 and at most {group}"));
        }
        if p.vector_len == 0 {
            return bad("vector length 0".into());
        }
        if !(p.clip.is_finite() && p.clip > 0.0) {
            return bad(format!("clip {} must be a positive number", p.clip));
        }
        if p.max_weight == 0 || (n as u64) * u64::from(p.max_weight) >= 1 << 32 {
            return bad(format!("max_weight {} × {n} sites must be between 1 and 2^32", p.max_weight));
        }
        Ok(())
    }

    /// SHA-256 over a canonical, length-prefixed encoding of every field (the binding
    /// last), with the domain tag "maeum/secagg/v1/session".
    pub fn id(&self) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut put = |bytes: &[u8]| {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        };
        put(b"maeum/secagg/v1/session");
        put(self.consortium.as_bytes());
        put(self.job_id.as_bytes());
        put(&self.round.to_be_bytes());
        put(&self.attempt.to_be_bytes());
        put(&(self.participants.len() as u64).to_be_bytes());
        for p in &self.participants {
            put(&p.index.to_be_bytes());
            put(p.site_id.as_bytes());
            put(&p.identity_key);
        }
        let q = &self.params;
        put(&q.threshold.to_be_bytes());
        put(&q.degree.to_be_bytes());
        put(&q.vector_len.to_be_bytes());
        put(&q.clip.to_bits().to_be_bytes());
        put(&q.max_weight.to_be_bytes());
        put(&self.binding);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    pub fn participant(&self, index: u16) -> Option<&Participant> {
        self.participants.get(usize::from(index).checked_sub(1)?)
    }
}
