//! A realistic small audit log for the integration tests: a consortium of three sites
//! runs one job of three rounds and releases its model (30 entries, 3 checkpoints, each
//! cosigned by 2 witnesses).

#![allow(dead_code)] // each test file uses part of it
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use maeum_pki::identity::{self, Ca, SecretPem, site_request};
use maeum_tlog::checkpoint::{log_key_pair, log_public_key};
use maeum_tlog::export::{EXPORT_FORMAT, Export, ExportedCheckpoint, WitnessCert};
use maeum_tlog::{Cosignature, Entry, Event, Log, Witness, hex};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;

pub const ORIGIN: &str = "maeum/heart";

pub struct Consortium {
    pub key: Ed25519KeyPair,
    pub ca: Ca,
    pub log: Log,
    pub entries: Vec<Entry>,
    pub checkpoints: Vec<ExportedCheckpoint>,
    pub sites: Vec<(String, SecretPem, String, Witness)>,
    pub time: i64,
}

impl Consortium {
    pub fn new() -> Consortium {
        let rng = SystemRandom::new();
        let key = log_key_pair(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
        let ca = Ca::generate("heart", 30).unwrap();
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let mut c = Consortium {
            key,
            ca,
            log: Log::new(ORIGIN.into()).unwrap(),
            entries: Vec::new(),
            checkpoints: Vec::new(),
            sites: Vec::new(),
            time,
        };
        let ca_der = identity::pem_to_der(c.ca.cert_pem()).unwrap().remove(0);
        c.append(Event::ConsortiumInit {
            consortium: "heart".into(),
            ca_fingerprint: identity::fingerprint(&ca_der),
            log_key: hex(&log_public_key(&c.key)),
        });
        c
    }

    pub fn append(&mut self, event: Event) {
        self.time += 1_250;
        let entries = self.log.next_entries(self.time, event);
        self.log.apply(&entries).unwrap();
        self.entries.extend(entries);
    }

    pub fn approve(&mut self, site: &str) {
        let (key, csr) = site_request(site).unwrap();
        let (_, cert) = self.ca.sign_site_request(&csr, Some(site), 30).unwrap();
        let der = identity::pem_to_der(&cert).unwrap().remove(0);
        self.append(Event::SiteApproved {
            site: site.into(),
            cert_fingerprint: identity::fingerprint(&der),
            not_after_ms: identity::not_after_unix(&der).unwrap() * 1000,
        });
        let witness = Witness::new(ORIGIN.into(), log_public_key(&self.key), None).unwrap();
        self.sites.push((site.into(), key, cert, witness));
    }

    /// Signs a checkpoint; the named sites check it against what they saw and cosign.
    pub fn checkpoint(&mut self, cosigners: &[&str]) {
        let signed = self.log.checkpoint(&self.key).unwrap();
        let mut cosignatures = Vec::new();
        for (site, key, _, witness) in self.sites.iter_mut().filter(|s| cosigners.contains(&s.0.as_str())) {
            let proof = self.log.consistency_proof(witness.known_size(), signed.checkpoint.size).unwrap();
            let token = witness.observe(&signed, &proof).unwrap();
            let signature = token.cosign(key, &SystemRandom::new()).unwrap();
            cosignatures.push(Cosignature { site: site.clone(), signature });
        }
        self.checkpoints.push(ExportedCheckpoint::new(&signed, &cosignatures));
    }

    pub fn export(&self) -> Export {
        Export {
            format: EXPORT_FORMAT.into(),
            origin: ORIGIN.into(),
            log_public_key: hex(&log_public_key(&self.key)),
            ca_cert_pem: self.ca.cert_pem().into(),
            witnesses: self
                .sites
                .iter()
                .map(|(site, _, cert, _)| WitnessCert { site: site.clone(), cert_pem: cert.clone() })
                .collect(),
            entries: self.entries.clone(),
            checkpoints: self.checkpoints.clone(),
        }
    }
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn digest(tag: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, tag.as_bytes()).as_ref())
}

/// (round, attempt, selected sites, dropouts, committed).
pub type Round = (u32, u32, &'static [&'static str], &'static [&'static str], bool);

/// A consortium of three sites runs one job of three rounds (one dropout, one failed
/// attempt) and releases its model: 30 entries, 3 checkpoints, 2 cosignatures each.
pub fn realistic() -> Consortium {
    let mut c = Consortium::new();
    for site in ["a", "b", "c"] {
        c.approve(site);
        c.append(Event::OperatorCommand {
            operator: "lead".into(),
            command: format!("sites approve {site}"),
            result: "ok".into(),
        });
    }
    c.checkpoint(&["a", "b"]);
    let job = "j-1".to_owned();
    c.append(Event::JobSubmitted {
        job_id: job.clone(),
        name: "readmission".into(),
        spec_sha256: digest("job.toml"),
        operator: "lead".into(),
    });
    for site in ["a", "b", "c"] {
        c.append(Event::JobDecision {
            job_id: job.clone(),
            site: site.into(),
            accepted: true,
            reason: "labels and features available".into(),
        });
    }
    // (round, attempt, selected sites, dropouts, committed)
    let rounds: [Round; 4] = [
        (1, 1, &["a", "b", "c"], &[], true),
        (2, 1, &["a", "b", "c"], &["c"], true),
        (3, 1, &["a", "b", "c"], &["b", "c"], false),
        (3, 2, &["a", "b"], &[], true),
    ];
    for (round, attempt, sites, dropped, ok) in rounds {
        c.append(Event::RoundStarted {
            job_id: job.clone(),
            round,
            attempt,
            sites: strings(sites),
            secure_aggregation: true,
        });
        let survivors: Vec<String> = sites.iter().filter(|s| !dropped.contains(s)).map(|s| (*s).to_owned()).collect();
        c.append(Event::RoundSecagg {
            job_id: job.clone(),
            round,
            attempt,
            survivors: survivors.clone(),
            dropped: strings(dropped),
        });
        if ok {
            c.append(Event::RoundCommitted {
                job_id: job.clone(),
                round,
                aggregate_sha256: digest(&format!("aggregate {round}")),
                model: digest(&format!("model {round}")),
                contributors: survivors,
            });
        } else {
            c.append(Event::RoundFailed {
                job_id: job.clone(),
                round,
                attempt,
                reason: "1 survivor is below the threshold of 2".into(),
            });
        }
        if round == 2 {
            c.checkpoint(&["b", "c"]);
        }
    }
    c.append(Event::ModelRelease {
        job_id: job.clone(),
        round: 3,
        version_sha256: digest("model 3"),
        card_sha256: digest("card"),
    });
    c.append(Event::ReleasePromoted { version_sha256: digest("model 3"), operator: "lead".into() });
    c.append(Event::OperatorCommand {
        operator: "lead".into(),
        command: "releases promote model-3".into(),
        result: "ok".into(),
    });
    c.append(Event::SiteRevoked { site: "c".into(), reason: "left the consortium".into() });
    c.append(Event::JobFinished { job_id: job, state: "completed".into() });
    c.checkpoint(&["a", "c"]);
    c
}
