//! Secure aggregation (Bonawitz et al., CCS 2017; optional SecAgg+ neighbour graph of
//! Bell et al., CCS 2020) as a sans-IO core: messages in, messages out. No clock, no
//! socket, no ambient randomness: every random choice comes from a 32-byte seed the
//! caller draws from the OS.
//!
//! Layout:
//! - `shamir`: Shamir secret sharing of 32-byte secrets over GF(2^8).
//! - `prg`: mask expansion (ChaCha20 keystream as u32 words, seekable, chunked).
//! - `crypto`: X25519 key pairs, HKDF-SHA256 derivations, ChaCha20-Poly1305 shares.
//! - `graph`: who masks with whom (every pair, or a k-regular SecAgg+ graph).
//! - `quant`: clipping and stochastic rounding of `[w·Δ, w]` into Z/2^32.
//! - `client` / `server`: the five-stage state machines (six with a SecAgg+ graph,
//!   whose seed every party contributes to by commit and reveal after stage 1); the
//!   server's `snapshot` (a session stopped in the unmask stage, to finish after a
//!   restart) and `attribution` (naming a wrong revealed share, SA-11).
//!
//! Every check a party performs has a stable ID ([`Check`]); it appears in errors,
//! test names and the table in `docs/protocols/secagg.md`.
//!
//! Single-threaded by design: the server's heaviest step, removing the masks from the
//! sum, is handed back as an [`Unmasking`] whose parts the caller may run on its own
//! threads ([`Seeds::unmask`]); the ECDSA signer takes its random source from the
//! caller. Dependencies: ring, x25519-dalek, rand_chacha, zeroize, thiserror, and PEM/
//! X.509 parsing for identity keys. This crate must never depend on tokio, tonic,
//! axum, burn, `maeum-models`, spawn threads or read a clock; a test
//! (`scripts/check-boundaries.sh`) fails if any of those crates appears in its tree.
#![forbid(unsafe_code)]

pub mod client;
pub mod crypto;
pub mod graph;
pub mod prg;
pub mod quant;
pub mod server;
pub mod shamir;
pub mod sign;

#[cfg(test)]
mod tests;

mod messages;
pub mod params;

pub use client::{Client, Masker};
pub use messages::*;
pub use params::{Participant, Session, SessionParams};
pub use server::{Outcome, Seeds, Server, Unmasking};

use std::fmt;

/// The stable identifier of one validation check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Check {
    /// SA-01: session parameters are valid (threshold, degree, sizes, overflow bound).
    Params,
    /// SA-02: a message belongs to this session and stage (no replay from another
    /// session, round, attempt or stage; the sender is a participant).
    Replay,
    /// SA-03: a signature over advertised keys verifies under the sender's identity.
    KeySignature,
    /// SA-04: advertised keys are well formed and distinct from every other party's.
    KeyReuse,
    /// SA-05: at least `threshold` parties remain at this stage.
    Threshold,
    /// SA-06: an encrypted share decrypts and authenticates, and names the right
    /// sender and recipient.
    ShareAuth,
    /// SA-07: a message is well formed (lengths, indices, counts, no duplicates, the
    /// same content when resent).
    Malformed,
    /// SA-08: a masked input has exactly the session's length.
    InputLength,
    /// SA-09: the survivor set is consistent: a subset of the parties that shared
    /// keys, signed by at least `threshold` survivors, every signature over the same
    /// set.
    SurvivorSet,
    /// SA-10: a party never reveals both the self-mask share and the mask-key share
    /// of the same party.
    DoubleReveal,
    /// SA-11: a reconstructed secret matches its commitment (self-mask seed) or its
    /// advertised public key (mask key); a share that does not is attributed.
    WrongShare,
    /// SA-12: the quantised sum did not overflow (sites × range below 2^31).
    Overflow,
    /// SA-13: the SecAgg+ graph seed comes from every party of U1: each revealed nonce
    /// opens the commitment in that party's signed keys, the reveals cover exactly the
    /// roster this party answered, and the roster did not change after this party
    /// revealed its own nonce.
    GraphSeed,
}

impl Check {
    /// The stable ID, e.g. "SA-06".
    pub fn id(self) -> &'static str {
        match self {
            Check::Params => "SA-01",
            Check::Replay => "SA-02",
            Check::KeySignature => "SA-03",
            Check::KeyReuse => "SA-04",
            Check::Threshold => "SA-05",
            Check::ShareAuth => "SA-06",
            Check::Malformed => "SA-07",
            Check::InputLength => "SA-08",
            Check::SurvivorSet => "SA-09",
            Check::DoubleReveal => "SA-10",
            Check::WrongShare => "SA-11",
            Check::Overflow => "SA-12",
            Check::GraphSeed => "SA-13",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// A failed check. `culprit` is the participant index the failure is attributed to,
/// where one can be named. The message never contains keys, shares, seeds or vector
/// values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{check}: {message}{}", culprit.map(|c| format!(" (party {c})")).unwrap_or_default())]
pub struct SecAggError {
    pub check: Check,
    pub culprit: Option<u16>,
    pub message: String,
}

impl SecAggError {
    pub fn new(check: Check, message: impl Into<String>) -> SecAggError {
        SecAggError { check, culprit: None, message: message.into() }
    }

    pub fn by(check: Check, culprit: u16, message: impl Into<String>) -> SecAggError {
        SecAggError { check, culprit: Some(culprit), message: message.into() }
    }
}

/// Signs with this party's enrolled identity key. Implemented outside the core (ECDSA
/// P-256 with the site's key in production; deterministic keys in tests).
pub trait Signer {
    fn sign(&self, message: &[u8]) -> Vec<u8>;
}

/// Verifies a participant's signature with the public key of its enrolled identity.
pub trait Verifier {
    /// True if `signature` is `party`'s signature over `message`.
    fn verify(&self, party: u16, message: &[u8], signature: &[u8]) -> bool;
}
