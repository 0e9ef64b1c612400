//! Exhaustive tamper test of an exported audit log: a realistic small log (a consortium,
//! three sites, one job with three rounds and a release) with three checkpoints, each
//! cosigned by two witnesses, put through `tamper::exhaustive` (every single-byte
//! change, truncation, swap of two entries, removed checkpoint and removed entry). The
//! end-to-end suite runs the same routine on the export of a real job.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod audit_fixture;
mod tamper;

use audit_fixture::{ORIGIN, realistic};
use maeum_tlog::checkpoint::log_public_key;
use maeum_tlog::export::verify;
use maeum_tlog::{AuditError, Event, Witness, hex};

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
    let kinds = tamper::exhaustive(&export, &key);
    assert_eq!(kinds.len(), 5);
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
