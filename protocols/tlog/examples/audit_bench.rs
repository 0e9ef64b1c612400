//! Audit log benchmark: append throughput (sans-IO: encode, leaf hash, tree push), full
//! verification of an N-entry export (default 1,000,000), and proof verification.
//!
//! ```text
//! cargo run --release -p maeum-protocols --example audit_bench [-- --entries N]
//! ```
//!
//! The export has a consortium init, three approved sites, a checkpoint every N/10
//! entries cosigned by two sites, and round events for the rest (about 330 bytes each).

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::time::Instant;

use maeum_pki::identity::{self, Ca, site_request};
use maeum_tlog::checkpoint::{log_key_pair, log_public_key};
use maeum_tlog::export::{EXPORT_FORMAT, Export, ExportedCheckpoint, WitnessCert, verify, verify_full};
use maeum_tlog::merkle::{verify_consistency, verify_inclusion};
use maeum_tlog::{Cosignature, Event, Log, Witness, hex};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let entries: u64 = args
        .iter()
        .position(|a| a == "--entries")
        .and_then(|i| args.get(i + 1))
        .map_or(1_000_000, |n| n.parse().expect("--entries N"));
    let rng = SystemRandom::new();
    let key = log_key_pair(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
    let ca = Ca::generate("heart", 30).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let digest = |n: u64| hex(ring::digest::digest(&ring::digest::SHA256, &n.to_le_bytes()).as_ref());
    let round_event = |n: u64| Event::RoundCommitted {
        job_id: format!("j-{}", n / 1000),
        round: (n % 1000) as u32,
        aggregate_sha256: digest(n),
        model: digest(n + 1),
        contributors: vec!["hospital-a".into(), "hospital-b".into(), "hospital-c".into()],
    };

    // 1. Append throughput, in memory.
    let mut log = Log::new("maeum/heart".into()).unwrap();
    let started = Instant::now();
    for n in 0..entries {
        log.append(now, round_event(n));
    }
    let append = started.elapsed();
    println!(
        "append: {entries} entries in {:.2} s = {:.0} entries/s (encode + leaf hash + tree push, no IO)",
        append.as_secs_f64(),
        entries as f64 / append.as_secs_f64()
    );
    drop(log);

    // 2. A full export of `entries` entries.
    let mut log = Log::new("maeum/heart".into()).unwrap();
    let mut all = Vec::with_capacity(entries as usize);
    let mut checkpoints = Vec::new();
    let push = |log: &mut Log, all: &mut Vec<_>, time: i64, event: Event| {
        let new = log.next_entries(time, event);
        log.apply(&new).unwrap();
        all.extend(new);
    };
    let ca_der = identity::pem_to_der(ca.cert_pem()).unwrap().remove(0);
    push(
        &mut log,
        &mut all,
        now,
        Event::ConsortiumInit {
            consortium: "heart".into(),
            ca_fingerprint: identity::fingerprint(&ca_der),
            log_key: hex(&log_public_key(&key)),
        },
    );
    let mut sites = Vec::new();
    for site in ["hospital-a", "hospital-b", "hospital-c"] {
        let (site_key, csr) = site_request(site).unwrap();
        let (_, cert) = ca.sign_site_request(&csr, Some(site), 30).unwrap();
        let der = identity::pem_to_der(&cert).unwrap().remove(0);
        push(
            &mut log,
            &mut all,
            now,
            Event::SiteApproved {
                site: site.into(),
                cert_fingerprint: identity::fingerprint(&der),
                not_after_ms: identity::not_after_unix(&der).unwrap() * 1000,
            },
        );
        let witness = Witness::new("maeum/heart".into(), log_public_key(&key), None).unwrap();
        sites.push((site.to_owned(), site_key, cert, witness));
    }
    let every = (entries / 10).max(1);
    let mut n = 0;
    while log.size() < entries {
        push(&mut log, &mut all, now + n as i64, round_event(n));
        n += 1;
        if log.size().is_multiple_of(every) || log.size() >= entries {
            let signed = log.checkpoint(&key).unwrap();
            let mut cosigs = Vec::new();
            for (site, site_key, _, witness) in sites.iter_mut().take(2) {
                let proof = log.consistency_proof(witness.known_size(), signed.checkpoint.size).unwrap();
                let sig = witness.observe(&signed, &proof).unwrap().cosign(site_key, &rng).unwrap();
                cosigs.push(Cosignature { site: site.clone(), signature: sig });
            }
            checkpoints.push(ExportedCheckpoint::new(&signed, &cosigs));
        }
    }
    let export = Export {
        format: EXPORT_FORMAT.into(),
        origin: "maeum/heart".into(),
        log_public_key: hex(&log_public_key(&key)),
        ca_cert_pem: ca.cert_pem().into(),
        witnesses: sites.iter().map(|(s, _, c, _)| WitnessCert { site: s.clone(), cert_pem: c.clone() }).collect(),
        entries: all,
        checkpoints,
    };
    let bytes = export.encode();
    drop(export);
    println!("export: {} entries, {:.1} MB", log.size(), bytes.len() as f64 / 1e6);
    let started = Instant::now();
    let report = verify(&bytes, Some(&log_public_key(&key))).unwrap();
    let full = started.elapsed();
    println!(
        "verify: {} entries, {} checkpoints, {} cosignatures in {:.2} s (decode + canonical check + tree + signatures)",
        report.entries,
        report.checkpoints,
        report.cosignatures,
        full.as_secs_f64()
    );

    // 3. Proofs.
    let verified = verify_full(&bytes, None).unwrap();
    let size = verified.tree.size();
    let root = verified.tree.root();
    let count = 10_000u64;
    let picks: Vec<u64> = (0..count).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % size).collect();
    let proofs: Vec<_> = picks.iter().map(|&i| (i, verified.tree.inclusion_proof(i, size).unwrap())).collect();
    let started = Instant::now();
    for (i, proof) in &proofs {
        verify_inclusion(verified.tree.leaf(*i).unwrap(), *i, size, proof, &root).unwrap();
    }
    let per = started.elapsed() / count as u32;
    println!(
        "inclusion proof verification: {:.1} µs per proof ({} hashes)",
        per.as_secs_f64() * 1e6,
        proofs[0].1.len()
    );
    let started = Instant::now();
    for &i in &picks[..1000] {
        let proof = verified.inclusion_proof(i, None).unwrap();
        maeum_tlog::export::verify_inclusion_proof(&proof, None).unwrap();
    }
    let per = started.elapsed() / 1000;
    println!(
        "inclusion proof with checkpoint signature (generate + verify, as `prove` / `verify-inclusion`): {:.1} µs",
        per.as_secs_f64() * 1e6
    );
    let started = Instant::now();
    for &old in &picks[..1000] {
        let old = old.max(1);
        let proof = verified.tree.consistency_proof(old, size).unwrap();
        verify_consistency(old, size, &verified.tree.root_at(old).unwrap(), &root, &proof).unwrap();
    }
    let per = started.elapsed() / 1000;
    println!("consistency proof (generate + verify): {:.1} µs", per.as_secs_f64() * 1e6);
}
