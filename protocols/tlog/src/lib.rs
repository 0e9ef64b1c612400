//! The transparency audit log (RFC 9162 style) and signed model releases, sans-IO:
//! entries and their canonical encoding, the Merkle tree and its proofs, signed
//! checkpoints, witness cosignatures, the self-contained export an auditor verifies
//! offline, and the release manifests and model cards that the log commits to.
//!
//! - [`merkle`]: tree hashes, inclusion and consistency proofs (RFC 9162 §2.1).
//! - [`entry`]: [`Entry`] and [`Event`], the canonical JSON encoding of a leaf.
//! - [`checkpoint`]: [`Checkpoint`] in the C2SP tlog-checkpoint body format, signed by
//!   the log's Ed25519 key, cosigned by sites with their ECDSA P-256 identity keys.
//! - [`log`]: [`Log`], the append-only state (entries' leaf hashes, the latest
//!   checkpoint) that the coordinator persists.
//! - [`witness`]: [`Witness`], a site's memory of the latest checkpoint it saw; it
//!   refuses forks and rollbacks and yields a token to cosign.
//! - [`export`]: the export file and [`export::verify`], which checks everything.
//! - [`release`]: the signed release manifest, the model card, and the checks a site
//!   (and the auditor) run on a release.
//! - [`handover`]: a rotation of the release key, signed by the old and the new key,
//!   and the walk from a pinned key along a chain of them.
//!
//! Nothing here does IO, reads a clock or draws randomness of its own: ECDSA signing
//! takes the caller's random source, and certificate validity is judged at times taken
//! from the log itself. Its dependencies are ring, serde, rustls' WebPKI verifier (for
//! witness certificates; no sockets), x509 parsing and the
//! identities of `maeum-pki` (without its `tls` feature). It must never depend on
//! tokio, tonic, axum, burn or `maeum-models` — the auditor's verifier links this crate,
//! and a test (`scripts/check-boundaries.sh`) fails if any of them appears in its tree.
//!
//! Every check has a stable ID (`AUD-…`, `REL-…`) that appears in the error message,
//! the tests and `docs/protocols/audit-log.md`.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod entry;
pub mod export;
pub mod handover;
pub mod log;
pub mod merkle;
pub mod release;
pub mod witness;

pub use checkpoint::{Checkpoint, Cosignature, SignedCheckpoint};
pub use entry::{Entry, Event};
pub use log::Log;
pub use merkle::{Hash, MerkleError, MerkleTree};
pub use witness::Witness;

/// Errors of the audit log. Each message says what failed and where (entry seq,
/// checkpoint index and size, site), and starts with the check's ID.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// AUD-01: a document or field could not be parsed.
    #[error("AUD-01 malformed {what}: {reason}")]
    Malformed {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// AUD-02: the bytes decode, but are not the unique canonical encoding.
    #[error("AUD-02 {what} is not in canonical form (first difference at byte {offset})")]
    NotCanonical {
        /// What was being read.
        what: String,
        /// Offset of the first byte that differs from the canonical re-encoding.
        offset: usize,
    },
    /// AUD-03: entries are not numbered 0, 1, 2, … in order.
    #[error("AUD-03 entry at position {position} has seq {seq} (entries must be numbered 0, 1, 2, … in order)")]
    Sequence {
        /// Where in the list.
        position: u64,
        /// The seq it claims.
        seq: u64,
    },
    /// AUD-04: the first entry is not the consortium's init entry, or a later one is.
    #[error("AUD-04 entry {seq}: {reason}")]
    Init {
        /// The offending entry.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// AUD-05: the log key is not the one trusted, announced or expected.
    #[error("AUD-05 log key {found} {reason}")]
    LogKey {
        /// The key found (hex).
        found: String,
        /// Why it is not accepted.
        reason: String,
    },
    /// AUD-06: the consortium CA certificate is unusable or not the one the log names.
    #[error("AUD-06 consortium CA certificate: {reason}")]
    Ca {
        /// What is wrong.
        reason: String,
    },
    /// AUD-07: checkpoint sizes are not strictly increasing, or exceed the log.
    #[error("AUD-07 checkpoint #{index} (size {size}): {reason}")]
    CheckpointOrder {
        /// Position in the list of checkpoints.
        index: usize,
        /// Its size.
        size: u64,
        /// What is wrong.
        reason: String,
    },
    /// AUD-08: a checkpoint's root is not the root of the entries.
    #[error(
        "AUD-08 checkpoint #{index} (size {size}): root {claimed} does not match the entries (recomputed {computed})"
    )]
    RootMismatch {
        /// Position in the list of checkpoints.
        index: usize,
        /// Its size.
        size: u64,
        /// The signed root (hex).
        claimed: String,
        /// The root of the first `size` entries (hex).
        computed: String,
    },
    /// AUD-09: a checkpoint's signature does not verify under the log key.
    #[error("AUD-09 checkpoint #{index} (size {size}): signature does not verify under the log key")]
    LogSignature {
        /// Position in the list of checkpoints (0 outside an export).
        index: usize,
        /// Its size.
        size: u64,
    },
    /// AUD-10: a checkpoint does not extend the previous one.
    #[error("AUD-10 checkpoint of size {new} does not extend the one of size {old}: {reason}")]
    Inconsistent {
        /// The older size.
        old: u64,
        /// The newer size.
        new: u64,
        /// Why.
        reason: MerkleError,
    },
    /// AUD-11: entries after the last checkpoint.
    #[error("AUD-11 entries {from}.. are not covered by any checkpoint")]
    Uncovered {
        /// The first uncovered seq.
        from: u64,
    },
    /// AUD-12: a checkpoint record entry and the checkpoints disagree.
    #[error("AUD-12 {reason}")]
    CheckpointRecord {
        /// What disagrees.
        reason: String,
    },
    /// AUD-13: a witness certificate is unusable, untrusted or not announced in the log.
    #[error("AUD-13 witness certificate of site {site}: {reason}")]
    WitnessCert {
        /// The site.
        site: String,
        /// What is wrong.
        reason: String,
    },
    /// AUD-14: a cosignature does not verify.
    #[error("AUD-14 checkpoint #{index} (size {size}): cosignature of site {site}: {reason}")]
    Cosignature {
        /// Position in the list of checkpoints.
        index: usize,
        /// Its size.
        size: u64,
        /// The witness.
        site: String,
        /// What is wrong.
        reason: String,
    },
    /// AUD-15: an inclusion proof does not verify.
    #[error("AUD-15 entry {seq} is not proven to be in the tree of size {size}: {reason}")]
    Inclusion {
        /// The entry.
        seq: u64,
        /// The tree size.
        size: u64,
        /// Why.
        reason: MerkleError,
    },
    /// AUD-16: two checkpoints of the same size with different roots: the log forked.
    #[error(
        "AUD-16 FORK: two checkpoints of size {size} with different roots: {known}… (seen before) and {new}… (now)"
    )]
    Fork {
        /// The size both claim.
        size: u64,
        /// Hex prefix of the root seen before.
        known: String,
        /// Hex prefix of the new root.
        new: String,
    },
    /// AUD-17: a checkpoint smaller than one already seen.
    #[error("AUD-17 checkpoint of size {new} is older than the one of size {old} already seen")]
    Rollback {
        /// The size seen before.
        old: u64,
        /// The new, smaller size.
        new: u64,
    },
    /// AUD-18: a checkpoint from another log.
    #[error("AUD-18 checkpoint is for log {found:?}, expected {expected:?}")]
    Origin {
        /// The origin expected.
        expected: String,
        /// The origin found.
        found: String,
    },
    /// AUD-19: a request outside what the log holds (no such entry or checkpoint), or
    /// an operation on an empty log.
    #[error("AUD-19 {0}")]
    Range(String),
    /// AUD-20: key material that cannot be used (its content is never shown).
    #[error("AUD-20 {what} is not a usable key")]
    Key {
        /// Which key.
        what: &'static str,
    },
    /// AUD-22: a rotation of the log key that does not hold: its handover does not
    /// verify, or it does not hand over from the key in effect.
    #[error("AUD-22 entry {seq}: the log key's rotation: {reason}")]
    KeyRotation {
        /// The `log_key_rotated` entry.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// AUD-23: a rollover of the consortium CA that does not hold: its handover does
    /// not verify, or it does not hand over from the CA in effect.
    #[error("AUD-23 entry {seq}: the CA's rollover: {reason}")]
    CaRotation {
        /// The `ca_rotated` entry.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// AUD-21: the random number generator failed while signing.
    #[error("AUD-21 random number generator failed while {what}")]
    Random {
        /// What needed randomness.
        what: &'static str,
    },
}

/// Refuses `bytes` unless they equal `canonical`, naming the first differing offset.
pub(crate) fn check_canonical(what: &str, bytes: &[u8], canonical: &[u8]) -> Result<(), AuditError> {
    if bytes == canonical {
        return Ok(());
    }
    let offset = bytes.iter().zip(canonical).position(|(a, b)| a != b).unwrap_or(bytes.len().min(canonical.len()));
    Err(AuditError::NotCanonical { what: what.to_owned(), offset })
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Decodes lowercase hex (uppercase is refused, so each value has one spelling).
pub fn unhex(text: &str) -> Result<Vec<u8>, AuditError> {
    let bad = |reason: &str| AuditError::Malformed { what: "hex".into(), reason: reason.to_owned() };
    if !text.len().is_multiple_of(2) {
        return Err(bad("odd number of digits"));
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(bad("not a lowercase hex digit")),
    };
    text.as_bytes().chunks_exact(2).map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

/// Decodes 64 lowercase hex digits into a 32-byte value.
pub fn unhex32(text: &str) -> Result<[u8; 32], AuditError> {
    unhex(text)?.try_into().map_err(|v: Vec<u8>| AuditError::Malformed {
        what: "hex".into(),
        reason: format!("expected 32 bytes, found {}", v.len()),
    })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64, refusing every non-canonical spelling (missing
/// padding, non-zero trailing bits, whitespace), so each value has one spelling.
pub fn unbase64(text: &str) -> Result<Vec<u8>, AuditError> {
    let bad = |reason: &str| AuditError::Malformed { what: "base64".into(), reason: reason.to_owned() };
    if !text.len().is_multiple_of(4) {
        return Err(bad("length is not a multiple of 4"));
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut values = [0u8; 256];
    for (i, c) in B64.iter().enumerate() {
        values[usize::from(*c)] = i as u8 + 1;
    }
    let quads = text.as_bytes().chunks_exact(4);
    let last = quads.len().saturating_sub(1);
    for (q, quad) in quads.enumerate() {
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && q != last) {
            return Err(bad("misplaced padding"));
        }
        let mut n = 0u32;
        for (i, c) in quad[..4 - pad].iter().enumerate() {
            let v = values[usize::from(*c)];
            if v == 0 {
                return Err(bad("not a base64 character"));
            }
            n |= u32::from(v - 1) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    if base64(&out) != text {
        return Err(bad("non-canonical encoding"));
    }
    Ok(out)
}

/// Formats milliseconds since the Unix epoch as UTC RFC 3339, e.g.
/// `2026-11-28T03:12:01Z` (milliseconds shown only when not zero).
pub fn rfc3339(time_ms: i64) -> String {
    let secs = time_ms.div_euclid(1000);
    let millis = time_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    if millis == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_refuses_other_spellings() {
        for (bytes, text) in [(&b""[..], ""), (b"f", "Zg=="), (b"fo", "Zm8="), (b"foo", "Zm9v"), (b"foob", "Zm9vYg==")]
        {
            assert_eq!(base64(bytes), text);
            assert_eq!(unbase64(text).unwrap(), bytes);
        }
        for bad in ["Zg", "Zh==", "Zg=a", "Z===", "Zm9v\n", "Zm 9", "Zg==Zg==", "Zm-v"] {
            assert!(unbase64(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hex_is_lowercase_only() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abff").unwrap(), [0, 0xab, 0xff]);
        assert!(unhex("00ABff").is_err());
        assert!(unhex("0").is_err());
        assert!(unhex32("00").is_err());
    }

    #[test]
    fn rfc3339_cases() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (1_795_835_521_000, "2026-11-28T03:12:01Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (-1000, "1969-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(ms), text);
        }
    }
}
