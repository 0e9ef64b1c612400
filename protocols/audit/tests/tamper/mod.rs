//! The exhaustive tamper routine shared by `audit_tamper.rs` (a synthetic realistic
//! log) and the end-to-end `tests/tests/audit.rs` (the export of a real job): every
//! single-byte change, every truncation, every swap of two entries, every removed
//! checkpoint and every removed entry must make `verify` fail.
//!
//! Single-byte changes: at every offset, two replacement values, `byte ^ 0x01` (the
//! smallest change) and a printable substitute of the same class (digit → another
//! digit, letter → another letter, anything else → `x`), so changes that keep the JSON
//! well-formed are exercised at every offset too. All 255 values at all offsets run
//! with `MAEUM_AUDIT_ALL_BYTES=1`. Prints how many it tried and detected per kind.

#![allow(dead_code, clippy::unwrap_used)] // shared by several test binaries; fails loudly

use maeum_tlog::export::{Export, verify};

/// A printable substitute of the same class as `b`, different from `b` and `b ^ 1`.
fn substitute(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b'0' + (b - b'0' + 2) % 10,
        b'a'..=b'z' => b'a' + (b - b'a' + 2) % 26,
        b'A'..=b'Z' => b'A' + (b - b'A' + 2) % 26,
        _ => b'x',
    }
}

#[derive(Default)]
struct Tally {
    tried: usize,
    detected: usize,
    missed: Vec<String>,
}

impl Tally {
    fn check(&mut self, what: String, bytes: &[u8], key: &[u8; 32]) {
        self.tried += 1;
        match verify(bytes, Some(key)) {
            Err(_) => self.detected += 1,
            Ok(_) => self.missed.push(what),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.tried += other.tried;
        self.detected += other.detected;
        self.missed.extend(other.missed);
    }

    fn report(&self, kind: &'static str) -> (&'static str, usize, usize) {
        println!("{kind}: tried {}, detected {}", self.tried, self.detected);
        assert!(
            self.missed.is_empty(),
            "{kind}: {} undetected, e.g. {:?}",
            self.missed.len(),
            &self.missed[..5.min(self.missed.len())]
        );
        assert_eq!(self.tried, self.detected);
        (kind, self.tried, self.detected)
    }
}

/// Tries every tampering of `export` (which must verify under `key`) and panics on the
/// first kind with an undetected one. Returns (kind, tried, detected) per kind.
pub fn exhaustive(export: &Export, key: &[u8; 32]) -> Vec<(&'static str, usize, usize)> {
    let bytes = export.encode();
    verify(&bytes, Some(key)).unwrap();
    let mut out = Vec::new();
    let all_values = std::env::var_os("MAEUM_AUDIT_ALL_BYTES").is_some_and(|v| v == "1");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    let chunk = bytes.len().div_ceil(threads);
    let mut bytes_tally = Tally::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let bytes = &bytes;
                scope.spawn(move || {
                    let mut tally = Tally::default();
                    let mut copy = bytes.clone();
                    for offset in (t * chunk)..((t + 1) * chunk).min(bytes.len()) {
                        let original = bytes[offset];
                        let values: Vec<u8> = if all_values {
                            (0..=255u8).filter(|v| *v != original).collect()
                        } else {
                            vec![original ^ 0x01, substitute(original)]
                        };
                        for value in values {
                            copy[offset] = value;
                            tally.check(format!("byte {offset}: {original:#04x} -> {value:#04x}"), &copy, key);
                        }
                        copy[offset] = original;
                    }
                    tally
                })
            })
            .collect();
        for handle in handles {
            bytes_tally.merge(handle.join().unwrap());
        }
    });
    out.push(bytes_tally.report("single-byte changes"));

    let mut truncations = Tally::default();
    for len in 0..bytes.len() {
        truncations.check(format!("truncated to {len}"), &bytes[..len], key);
    }
    out.push(truncations.report("truncations"));

    let mut swaps = Tally::default();
    for i in 0..export.entries.len() {
        for j in i + 1..export.entries.len() {
            let mut swapped = export.clone();
            swapped.entries.swap(i, j);
            swaps.check(format!("entries {i} and {j} swapped"), &swapped.encode(), key);
        }
    }
    out.push(swaps.report("swaps of two entries"));

    let mut removed = Tally::default();
    for i in 0..export.checkpoints.len() {
        let mut fewer = export.clone();
        fewer.checkpoints.remove(i);
        removed.check(format!("checkpoint #{i} removed"), &fewer.encode(), key);
    }
    out.push(removed.report("removed checkpoints"));

    let mut dropped = Tally::default();
    for i in 0..export.entries.len() {
        let mut fewer = export.clone();
        fewer.entries.remove(i);
        dropped.check(format!("entry {i} removed"), &fewer.encode(), key);
    }
    out.push(dropped.report("removed entries"));
    out
}
