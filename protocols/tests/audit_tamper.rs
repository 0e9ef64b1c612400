//! Exhaustive tamper test of an exported audit log: a realistic small log (a consortium,
//! three sites, one job with three rounds and a release) with three checkpoints, each
//! cosigned by two witnesses. Every single-byte change, every truncation, every swap of
//! two entries and every removed checkpoint must make `verify` fail.
//!
//! Single-byte changes: at every offset, two replacement values, `byte ^ 0x01` (the
//! smallest change) and a printable substitute of the same class (digit → another
//! digit, letter → another letter, anything else → `x`), so changes that keep the JSON
//! well-formed are exercised at every offset too. All 255 values at all offsets would
//! be ~2.4 million verifications (run them with `MAEUM_AUDIT_ALL_BYTES=1`); these two
//! cover the flips that parse and those that do not. The test prints how many it tried
//! and detected.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod audit_fixture;

use audit_fixture::{ORIGIN, realistic};
use maeum_protocols::audit::checkpoint::log_public_key;
use maeum_protocols::audit::export::verify;
use maeum_protocols::audit::{AuditError, Event, Witness, hex};

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

    fn report(&self, kind: &str) {
        println!("{kind}: tried {}, detected {}", self.tried, self.detected);
        assert!(
            self.missed.is_empty(),
            "{kind}: {} undetected, e.g. {:?}",
            self.missed.len(),
            &self.missed[..5.min(self.missed.len())]
        );
        assert_eq!(self.tried, self.detected);
    }
}

#[test]
fn every_tampering_of_an_export_is_detected() {
    let c = realistic();
    let export = c.export();
    let bytes = export.encode();
    let key = log_public_key(&c.key);
    let report = verify(&bytes, Some(&key)).unwrap();
    assert_eq!(report.entries, 30, "the realistic log has 30 entries");
    assert_eq!(report.checkpoints, 3);
    assert_eq!(report.cosignatures, 6);
    assert_eq!(report.witnesses, ["a", "b", "c"]);
    println!("export: {} bytes, {} entries, {} checkpoints", bytes.len(), report.entries, report.checkpoints);

    // Every single-byte change (two values per offset, or all 255 with
    // MAEUM_AUDIT_ALL_BYTES=1: about 2.4 million verifications), on every core.
    let all_values = std::env::var_os("MAEUM_AUDIT_ALL_BYTES").is_some_and(|v| v == "1");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    let chunk = bytes.len().div_ceil(threads);
    let mut bytes_tally = Tally::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let bytes = &bytes;
                let key = &key;
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
    bytes_tally.report("single-byte changes");

    let mut truncations = Tally::default();
    for len in 0..bytes.len() {
        truncations.check(format!("truncated to {len}"), &bytes[..len], &key);
    }
    truncations.report("truncations");

    let mut swaps = Tally::default();
    for i in 0..export.entries.len() {
        for j in i + 1..export.entries.len() {
            let mut swapped = export.clone();
            swapped.entries.swap(i, j);
            swaps.check(format!("entries {i} and {j} swapped"), &swapped.encode(), &key);
        }
    }
    swaps.report("swaps of two entries");

    let mut removed = Tally::default();
    for i in 0..export.checkpoints.len() {
        let mut fewer = export.clone();
        fewer.checkpoints.remove(i);
        removed.check(format!("checkpoint #{i} removed"), &fewer.encode(), &key);
    }
    removed.report("removed checkpoints");

    let mut dropped = Tally::default();
    for i in 0..export.entries.len() {
        let mut fewer = export.clone();
        fewer.entries.remove(i);
        dropped.check(format!("entry {i} removed"), &fewer.encode(), &key);
    }
    dropped.report("removed entries");
}

#[test]
fn a_fork_shown_to_two_witnesses_is_caught_when_their_views_meet() {
    let mut c = realistic();
    let key = log_public_key(&c.key);
    // The coordinator shows site a one continuation and site b another, of equal size.
    let mut honest = c.log.clone();
    let mut forked = c.log.clone();
    let revoke = |site: &str| Event::SiteRevoked { site: site.into(), reason: "key compromised".into() };
    honest.append(c.time + 1, revoke("a"));
    forked.append(c.time + 1, revoke("b"));
    let seen_by_a = honest.checkpoint(&c.key).unwrap();
    let seen_by_b = forked.checkpoint(&c.key).unwrap();
    assert_eq!(seen_by_a.checkpoint.size, seen_by_b.checkpoint.size);
    let (_, _, _, witness_a) = &mut c.sites[0];
    let proof = honest.consistency_proof(witness_a.known_size(), seen_by_a.checkpoint.size).unwrap();
    let _ = witness_a.observe(&seen_by_a, &proof).unwrap();
    // Each view is consistent on its own: site b accepts its fork too.
    let mut witness_b = Witness::new(ORIGIN.into(), key, c.sites[1].3.latest().cloned()).unwrap();
    let proof = forked.consistency_proof(witness_b.known_size(), seen_by_b.checkpoint.size).unwrap();
    let _ = witness_b.observe(&seen_by_b, &proof).unwrap();
    // When site a is shown b's checkpoint (gossip, or an auditor), the fork is named.
    let e = c.sites[0].3.observe(&seen_by_b, &[]).unwrap_err();
    assert!(matches!(e, AuditError::Fork { .. }), "{e}");
    let message = e.to_string();
    assert!(message.contains(&hex(&seen_by_a.checkpoint.root[..8])), "{message}");
    assert!(message.contains(&hex(&seen_by_b.checkpoint.root[..8])), "{message}");
    println!("{message}");
}
