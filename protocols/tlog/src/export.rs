//! The export file: one self-contained canonical JSON document holding the whole log,
//! every checkpoint with its cosignatures, and the public material to check them:
//!
//! ```text
//! {"format":"maeum-audit-export/v1","origin":"maeum/heart","log_public_key":"<hex>",
//!  "ca_cert_pem":"-----BEGIN CERTIFICATE-----\n…","witnesses":[{"site":"a","cert_pem":"…"}],
//!  "entries":[{"v":1,"seq":0,…},…],
//!  "checkpoints":[{"size":12,"root":"<hex>","signature":"<base64>",
//!                  "cosignatures":[{"site":"a","signature":"<base64>"}]}]}
//! ```
//!
//! (shown wrapped; the file has no insignificant whitespace). Entries are embedded in
//! their canonical encoding, so the bytes between `entries` brackets are exactly the
//! leaves. [`Export::decode`] refuses any document that is not the canonical encoding
//! of what it decodes to, so an export cannot be altered without altering what it says.
//!
//! [`verify`] is what `maeum-audit verify` runs; its checks are listed on it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::checkpoint::{self, validate_origin, verify_cosignature, witness_key};
use super::merkle::{Hash, MerkleTree, verify_consistency, verify_inclusion};
use super::{AuditError, Checkpoint, Cosignature, Entry, Event, SignedCheckpoint, base64, hex, unbase64, unhex32};
use maeum_pki::identity;

/// The `format` of an export file.
pub const EXPORT_FORMAT: &str = "maeum-audit-export/v1";
/// The `format` of an inclusion proof file (`maeum-audit prove`).
pub const INCLUSION_FORMAT: &str = "maeum-audit-inclusion/v1";
/// The `format` of a standalone checkpoint file.
pub const CHECKPOINT_FORMAT: &str = "maeum-audit-checkpoint/v1";

/// The export document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// The log's origin (checkpoint first line).
    pub origin: String,
    /// The log's Ed25519 public key, hex.
    pub log_public_key: String,
    /// The consortium CA certificate, canonical PEM.
    pub ca_cert_pem: String,
    /// Certificates of the sites that cosign, canonical PEM, sorted by site then PEM.
    pub witnesses: Vec<WitnessCert>,
    /// Every entry, from seq 0.
    pub entries: Vec<Entry>,
    /// Every checkpoint, by increasing size.
    pub checkpoints: Vec<ExportedCheckpoint>,
}

/// A witness's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessCert {
    /// The site id.
    pub site: String,
    /// Its certificate, canonical PEM.
    pub cert_pem: String,
}

/// A checkpoint as stored and exported (the origin is the log's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedCheckpoint {
    /// Tree size.
    pub size: u64,
    /// Root, hex.
    pub root: String,
    /// The log's Ed25519 signature of the body, base64.
    pub signature: String,
    /// Witness cosignatures, at most one per site, sorted by site.
    pub cosignatures: Vec<ExportedCosignature>,
}

/// A cosignature as stored and exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedCosignature {
    /// The witness site id.
    pub site: String,
    /// ECDSA P-256 signature (DER), base64.
    pub signature: String,
}

impl ExportedCheckpoint {
    /// The stored form of a signed checkpoint and its cosignatures.
    pub fn new(signed: &SignedCheckpoint, cosignatures: &[Cosignature]) -> ExportedCheckpoint {
        ExportedCheckpoint {
            size: signed.checkpoint.size,
            root: hex(&signed.checkpoint.root),
            signature: base64(&signed.signature),
            cosignatures: {
                let mut list: Vec<ExportedCosignature> = cosignatures
                    .iter()
                    .map(|c| ExportedCosignature { site: c.site.clone(), signature: base64(&c.signature) })
                    .collect();
                list.sort_by(|a, b| a.site.cmp(&b.site));
                list
            },
        }
    }

    /// Back to a signed checkpoint of log `origin` and its cosignatures (not verified).
    pub fn to_signed(&self, origin: &str) -> Result<(SignedCheckpoint, Vec<Cosignature>), AuditError> {
        let signature = unbase64(&self.signature)?.try_into().map_err(|_| AuditError::Malformed {
            what: format!("checkpoint (size {}) signature", self.size),
            reason: "not 64 bytes".into(),
        })?;
        let checkpoint = Checkpoint { origin: origin.to_owned(), size: self.size, root: unhex32(&self.root)? };
        let cosignatures = self
            .cosignatures
            .iter()
            .map(|c| Ok(Cosignature { site: c.site.clone(), signature: unbase64(&c.signature)? }))
            .collect::<Result<_, AuditError>>()?;
        Ok((SignedCheckpoint { checkpoint, signature }, cosignatures))
    }
}

/// Encodes `value` as compact JSON (field order = declaration order).
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // INVARIANT: these documents hold strings, integers, booleans and lists only.
    serde_json::to_vec(value).expect("audit documents always serialise")
}

/// Decodes `bytes` as `T`, refusing anything but its canonical encoding.
fn from_canonical_json<T: Serialize + for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, AuditError> {
    let value: T = serde_json::from_slice(bytes)
        .map_err(|e| AuditError::Malformed { what: what.into(), reason: e.to_string() })?;
    super::check_canonical(what, bytes, &to_json(&value))?;
    Ok(value)
}

impl Export {
    /// The canonical bytes of the export.
    pub fn encode(&self) -> Vec<u8> {
        to_json(self)
    }

    /// Decodes an export, refusing any non-canonical document (AUD-01, AUD-02).
    pub fn decode(bytes: &[u8]) -> Result<Export, AuditError> {
        let export: Export = from_canonical_json("export", bytes)?;
        if export.format != EXPORT_FORMAT {
            return Err(AuditError::Malformed {
                what: "export".into(),
                reason: format!("format is {:?}, expected {EXPORT_FORMAT:?}", export.format),
            });
        }
        Ok(export)
    }
}

/// What a verified export holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The log's origin.
    pub origin: String,
    /// The log key (hex).
    pub log_public_key: String,
    /// The consortium named by the init entry.
    pub consortium: String,
    /// Number of entries.
    pub entries: u64,
    /// Number of checkpoints.
    pub checkpoints: usize,
    /// Number of cosignatures, all checkpoints together.
    pub cosignatures: usize,
    /// The sites that cosigned at least one checkpoint.
    pub witnesses: Vec<String>,
    /// Cosignatures on the latest checkpoint, by site.
    pub latest_witnesses: Vec<String>,
    /// Time of the first entry (ms since the epoch; the coordinator's clock).
    pub first_time_ms: i64,
    /// Time of the last entry.
    pub last_time_ms: i64,
    /// Root of the whole log (hex), signed by the latest checkpoint.
    pub root: String,
    /// Rotations of the log key (`log_key_rotated` entries applied).
    pub log_key_rotations: usize,
    /// The key that signs the latest checkpoint (hex; the first key if never rotated).
    pub current_log_key: String,
    /// Rollovers of the consortium CA (`ca_rotated` entries applied, AUD-23).
    pub ca_rotations: usize,
    /// SHA-256 of the CA in effect at the end of the log (the init entry's if never
    /// rolled over).
    pub current_ca: String,
}

/// A verified export, for commands that go on to use it (`prove`, `consistency`).
#[derive(Debug)]
pub struct Verified {
    /// The export.
    pub export: Export,
    /// Its tree.
    pub tree: MerkleTree,
    /// Its first log key (the init entry's).
    pub log_key: [u8; 32],
    /// Every log key with the seq of the entry that rotated to it (0 for the first):
    /// a checkpoint of size `n` is signed by the last key whose seq is below `n`.
    pub log_keys: Vec<(u64, [u8; 32])>,
    /// The summary.
    pub report: Report,
}

/// The log keys of `entries` from `first` on, each with the seq of the entry that
/// rotated to it (AUD-22): a `log_key_rotated` entry must hand over from the key in
/// effect, signed by both keys; the same rotation logged again (a crash between logging
/// and applying it) is skipped.
pub fn log_keys(consortium: &str, first: [u8; 32], entries: &[Entry]) -> Result<Vec<(u64, [u8; 32])>, AuditError> {
    let mut keys = vec![(0, first)];
    for e in entries {
        let Some(h) = crate::handover::in_entry(crate::handover::Role::Log, e) else { continue };
        let rotation = |reason: String| AuditError::KeyRotation { seq: e.seq, reason };
        let (old, new) = h.verify(crate::handover::Role::Log, consortium).map_err(|err| rotation(err.to_string()))?;
        // INVARIANT: `keys` starts with the first key and only grows.
        let current = keys.last().map_or(first, |(_, k)| *k);
        if old == current {
            keys.push((e.seq, new));
        } else if new != current {
            return Err(rotation(format!(
                "it hands over from {}…, but the log key in effect is {}…",
                &h.old_key[..16],
                &hex(&current)[..16]
            )));
        }
    }
    Ok(keys)
}

/// The key that signs a checkpoint of `size` entries (see [`log_keys`]).
pub fn key_for(keys: &[(u64, [u8; 32])], size: u64) -> [u8; 32] {
    keys.iter().rev().find(|(seq, _)| *seq < size).or(keys.first()).map_or([0; 32], |(_, k)| *k)
}

impl Verified {
    /// The key that signs this log's checkpoints of `size` entries.
    pub fn log_key_for(&self, size: u64) -> [u8; 32] {
        key_for(&self.log_keys, size)
    }
}

/// Decodes and verifies an export. Returns the summary, or the first failed check:
///
/// 1. canonical document of format v1 (AUD-01, AUD-02), valid origin;
/// 2. the log key equals `trust` when given (AUD-05);
/// 3. entries are numbered 0, 1, 2, … (AUD-03); entry 0 is `consortium_init` and no
///    other is (AUD-04); its `log_key` is the export's log key (AUD-05);
/// 4. the CA certificate is canonical PEM and its SHA-256 is the init entry's
///    `ca_fingerprint` (AUD-06);
/// 5. checkpoints have strictly increasing sizes within the log (AUD-07); each root is
///    the root of the first `size` entries (AUD-08); each signature verifies under the
///    log key in effect at its size (AUD-09; the log key rotates by `log_key_rotated`
///    entries, each a handover signed by the old and the new key, AUD-22); each extends the previous one by a consistency proof computed
///    from the entries (AUD-10); the last covers every entry (AUD-11);
/// 6. entry `size` of every checkpoint but the last records that checkpoint, and every
///    checkpoint record names a checkpoint in the export (AUD-12);
/// 7. each witness certificate is canonical PEM, announced by a `site_approved` entry
///    of its site with its fingerprint (or as the new certificate of a
///    `site_key_replaced` entry), chains to the CA and names its site, valid at that
///    entry's time; the list is sorted by site then certificate, no repeats (AUD-13);
/// 8. each cosignature is by a site with a certificate valid at the time of the
///    checkpoint's last entry and valid for the site at that point of the log (see
///    [`SiteCertificates::check`]), listed sorted by site, at most one per site, and
///    verifies (AUD-14).
pub fn verify(bytes: &[u8], trust: Option<&[u8; 32]>) -> Result<Report, AuditError> {
    verify_full(bytes, trust).map(|v| v.report)
}

/// [`verify`], keeping the decoded export and its tree.
pub fn verify_full(bytes: &[u8], trust: Option<&[u8; 32]>) -> Result<Verified, AuditError> {
    let export = Export::decode(bytes)?;
    validate_origin(&export.origin)?;
    let log_key = unhex32(&export.log_public_key)?;
    if let Some(trusted) = trust
        && trusted != &log_key
    {
        return Err(AuditError::LogKey {
            found: export.log_public_key.clone(),
            reason: format!("is not the trusted key {}", hex(trusted)),
        });
    }

    // Entries.
    let entries = &export.entries;
    for (position, entry) in entries.iter().enumerate() {
        if entry.seq != position as u64 {
            return Err(AuditError::Sequence { position: position as u64, seq: entry.seq });
        }
    }
    let Some(first) = entries.first() else {
        return Err(AuditError::Init { seq: 0, reason: "the log has no entries".into() });
    };
    let Event::ConsortiumInit { consortium, ca_fingerprint, log_key: announced } = &first.event else {
        return Err(AuditError::Init {
            seq: 0,
            reason: format!("is {}, expected consortium_init", first.event.kind()),
        });
    };
    if let Some(again) = entries.iter().skip(1).find(|e| matches!(e.event, Event::ConsortiumInit { .. })) {
        return Err(AuditError::Init { seq: again.seq, reason: "a second consortium_init".into() });
    }
    if announced != &export.log_public_key {
        return Err(AuditError::LogKey {
            found: export.log_public_key.clone(),
            reason: format!("is not the key {announced} announced by entry 0"),
        });
    }

    // The CA.
    let ca = checkpoint::single_cert(&export.ca_cert_pem).map_err(|reason| AuditError::Ca { reason })?;
    let ca_first = ca.clone();
    let ca_print = identity::fingerprint(&ca);
    if &ca_print != ca_fingerprint {
        return Err(AuditError::Ca {
            reason: format!("fingerprint {ca_print} is not {ca_fingerprint} announced by entry 0"),
        });
    }

    // The CA's rollovers (AUD-23): witness certificates may come from any CA the
    // chain from the init entry's CA reaches.
    let cas = crate::handover::ca_chain(consortium, ca, entries)?;

    // The log key's rotations (AUD-22): checkpoints beyond a rotation's entry are
    // signed by its new key.
    let log_keys = log_keys(consortium, log_key, entries)?;
    let key_for = |size: u64| key_for(&log_keys, size);

    // The tree and the checkpoints.
    let leaves: Vec<Hash> = entries.iter().map(Entry::leaf_hash).collect();
    let tree = MerkleTree::from_leaves(&leaves);
    drop(leaves);
    let n = tree.size();
    let mut signed = Vec::with_capacity(export.checkpoints.len());
    let mut previous: Option<&Checkpoint> = None;
    for (index, exported) in export.checkpoints.iter().enumerate() {
        let size = exported.size;
        let order = |reason: String| AuditError::CheckpointOrder { index, size, reason };
        if size == 0 || size > n {
            return Err(order(format!("the log has {n} entries")));
        }
        if let Some(prev) = previous
            && size <= prev.size
        {
            return Err(order(format!("not larger than the previous checkpoint's size {}", prev.size)));
        }
        let (cp, cosigs) = exported.to_signed(&export.origin)?;
        // INVARIANT: 0 < size <= n was checked above.
        let computed = tree.root_at(size).map_err(|e| order(e.to_string()))?;
        if computed != cp.checkpoint.root {
            return Err(AuditError::RootMismatch {
                index,
                size,
                claimed: exported.root.clone(),
                computed: hex(&computed),
            });
        }
        cp.verify(&key_for(size)).map_err(|_| AuditError::LogSignature { index, size })?;
        if let Some(prev) = previous {
            let proof = tree.consistency_proof(prev.size, size).map_err(|e| order(e.to_string()))?;
            verify_consistency(prev.size, size, &prev.root, &cp.checkpoint.root, &proof)
                .map_err(|reason| AuditError::Inconsistent { old: prev.size, new: size, reason })?;
        }
        signed.push((cp, cosigs));
        previous = signed.last().map(|(c, _)| &c.checkpoint);
    }
    let covered = previous.map_or(0, |c| c.size);
    if covered < n {
        return Err(AuditError::Uncovered { from: covered });
    }

    // Checkpoint records.
    let sizes: BTreeMap<u64, &Checkpoint> = signed.iter().map(|(c, _)| (c.checkpoint.size, &c.checkpoint)).collect();
    for (size, cp) in &sizes {
        if *size == n {
            continue;
        }
        let record = &entries[*size as usize];
        let expected = Event::Checkpoint { size: *size, root: hex(&cp.root) };
        if record.event != expected {
            return Err(AuditError::CheckpointRecord {
                reason: format!(
                    "entry {size} should record the checkpoint of size {size} but is {}",
                    record.event.kind()
                ),
            });
        }
    }
    for entry in entries {
        if let Event::Checkpoint { size, .. } = &entry.event
            && (*size != entry.seq || !sizes.contains_key(size))
        {
            return Err(AuditError::CheckpointRecord {
                reason: format!("entry {} records a checkpoint of size {size} that is not in the export", entry.seq),
            });
        }
    }

    // Witness certificates: announced by the log, chaining to the CA.
    let history = SiteCertificates::from_entries(entries);
    let mut certs: BTreeMap<&str, Vec<(rustls::pki_types::CertificateDer<'static>, String)>> = BTreeMap::new();
    let mut previous_witness: Option<&WitnessCert> = None;
    for w in &export.witnesses {
        let bad = |reason: String| AuditError::WitnessCert { site: w.site.clone(), reason };
        if previous_witness.is_some_and(|p| (&p.site, &p.cert_pem) >= (&w.site, &w.cert_pem)) {
            return Err(bad("witnesses must be listed once each, sorted by site then certificate".into()));
        }
        previous_witness = Some(w);
        let der = checkpoint::single_cert(&w.cert_pem).map_err(bad)?;
        let print = identity::fingerprint(&der);
        let Some(at) = history.announced_at(&w.site, &print) else {
            return Err(bad(format!("fingerprint {print} is not announced by any site_approved entry for this site")));
        };
        witness_key(&cas, &der, &w.site, at).map_err(bad)?;
        certs.entry(w.site.as_str()).or_default().push((der, print));
    }

    // Cosignatures.
    let mut cosignatures = 0;
    let mut witnesses = BTreeSet::new();
    let mut latest_witnesses = Vec::new();
    for (index, (cp, cosigs)) in signed.iter().enumerate() {
        let size = cp.checkpoint.size;
        let at = entries[size as usize - 1].time_ms;
        let mut sites = BTreeSet::new();
        for cosig in cosigs {
            let bad = |reason: String| AuditError::Cosignature { index, size, site: cosig.site.clone(), reason };
            if sites.last().is_some_and(|last: &&str| *last >= cosig.site.as_str()) {
                return Err(bad("cosignatures must be listed once per site, sorted by site".into()));
            }
            sites.insert(cosig.site.as_str());
            let candidates =
                certs.get(cosig.site.as_str()).ok_or_else(|| bad("no certificate for this site".into()))?;
            let mut last_error = String::new();
            let ok = candidates.iter().any(|(der, print)| {
                match history
                    .check(&cosig.site, print, size)
                    .and_then(|()| witness_key(&cas, der, &cosig.site, at))
                    .and_then(|key| verify_cosignature(&cp.checkpoint, &key, &cosig.signature))
                {
                    Ok(()) => true,
                    Err(e) => {
                        last_error = e;
                        false
                    }
                }
            });
            if !ok {
                return Err(bad(last_error));
            }
            cosignatures += 1;
            witnesses.insert(cosig.site.clone());
        }
        if index + 1 == signed.len() {
            latest_witnesses = sites.into_iter().map(str::to_owned).collect();
        }
    }

    let report = Report {
        origin: export.origin.clone(),
        log_public_key: export.log_public_key.clone(),
        consortium: consortium.clone(),
        entries: n,
        checkpoints: signed.len(),
        cosignatures,
        witnesses: witnesses.into_iter().collect(),
        latest_witnesses,
        first_time_ms: first.time_ms,
        last_time_ms: entries.last().map_or(first.time_ms, |e| e.time_ms),
        root: hex(&tree.root()),
        log_key_rotations: log_keys.len() - 1,
        current_log_key: hex(&key_for(n)),
        ca_rotations: cas.len() - 1,
        current_ca: identity::fingerprint(cas.last().unwrap_or(&ca_first)),
    };
    Ok(Verified { export, tree, log_key, log_keys, report })
}

/// One change of a site certificate: (seq, valid from here on, by `site_approved`).
type CertChange = (u64, bool, bool);

/// Which certificates of each site the log announced, and when the log replaced them:
/// the rule behind AUD-13 and AUD-14 for a site whose key changed over time.
#[derive(Debug, Default, Clone)]
pub struct SiteCertificates {
    /// (site, fingerprint) → the time of the first entry announcing it.
    announced: BTreeMap<(String, String), i64>,
    /// (site, fingerprint) → its changes in log order.
    changes: BTreeMap<(String, String), Vec<CertChange>>,
}

impl SiteCertificates {
    /// The history of every site's certificates in `entries` (in log order).
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> SiteCertificates {
        let mut out = SiteCertificates::default();
        for entry in entries {
            out.add(entry);
        }
        out
    }

    /// Takes in the next entry of the log.
    pub fn add(&mut self, entry: &Entry) {
        let mut change = |site: &str, print: &str, valid: bool, approval: bool| {
            let key = (site.to_owned(), print.to_owned());
            if valid {
                self.announced.entry(key.clone()).or_insert(entry.time_ms);
            }
            self.changes.entry(key).or_default().push((entry.seq, valid, approval));
        };
        match &entry.event {
            Event::SiteApproved { site, cert_fingerprint, .. } => change(site, cert_fingerprint, true, true),
            Event::SiteKeyReplaced { site, old_cert_fingerprint, new_cert_fingerprint, .. } => {
                change(site, old_cert_fingerprint, false, false);
                change(site, new_cert_fingerprint, true, false);
            }
            _ => {}
        }
    }

    /// The certificates of `site` valid at the end of the log (more than one only where
    /// a second key was approved without `--replace`, before Maeum refused that).
    pub fn current(&self, site: &str) -> Vec<&str> {
        self.changes
            .keys()
            .filter(|(s, f)| s == site && self.check(s, f, u64::MAX).is_ok())
            .map(|(_, f)| f.as_str())
            .collect()
    }

    /// Every (site, fingerprint) that a `site_key_replaced` entry replaced and no later
    /// entry brought back: the certificates to refuse.
    pub fn replaced(&self) -> Vec<(&str, &str)> {
        self.changes
            .iter()
            .filter(|(_, changes)| changes.last().is_some_and(|(_, valid, _)| !valid))
            .map(|((s, f), _)| (s.as_str(), f.as_str()))
            .collect()
    }

    /// When the log first announced certificate `fingerprint` for `site`, if it did.
    pub fn announced_at(&self, site: &str, fingerprint: &str) -> Option<i64> {
        self.announced.get(&(site.to_owned(), fingerprint.to_owned())).copied()
    }

    /// Whether `site` may cosign the checkpoint of `size` entries with the certificate
    /// `fingerprint`: the log announced it for the site, and its latest change among the
    /// checkpoint's entries brought it in (`site_approved`, or the new key of
    /// `site_key_replaced`), not out (the old key of `site_key_replaced`). With no change
    /// among those entries, a certificate first announced by `site_approved` counts (the
    /// coordinator logs an approval when it first sees it, which may be after the
    /// checkpoint a new site cosigns first); one brought in by a replacement does not.
    pub fn check(&self, site: &str, fingerprint: &str, size: u64) -> Result<(), String> {
        let short = fingerprint.get(..16).unwrap_or(fingerprint);
        let changes = self.changes.get(&(site.to_owned(), fingerprint.to_owned()));
        let Some(changes) = changes.filter(|_| self.announced_at(site, fingerprint).is_some()) else {
            return Err(format!("certificate {short}… is not announced for this site"));
        };
        match changes.iter().rev().find(|(seq, _, _)| *seq < size) {
            Some((_, true, _)) => Ok(()),
            Some((seq, false, _)) => {
                Err(format!("certificate {short}… was replaced at entry {seq}, before this checkpoint"))
            }
            None => match changes.first() {
                Some((_, true, true)) => Ok(()),
                Some((seq, _, _)) => {
                    Err(format!("certificate {short}… replaced the site's key at entry {seq}, after this checkpoint"))
                }
                None => Err(format!("certificate {short}… is not announced for this site")),
            },
        }
    }
}

/// An inclusion proof of one entry against one signed checkpoint, self-contained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// [`INCLUSION_FORMAT`].
    pub format: String,
    /// The log's origin.
    pub origin: String,
    /// The log key (hex).
    pub log_public_key: String,
    /// The entry, canonical.
    pub entry: Entry,
    /// Its leaf index (= its seq).
    pub leaf_index: u64,
    /// The tree size the proof is for (= the checkpoint's).
    pub tree_size: u64,
    /// The audit path, hex.
    pub proof: Vec<String>,
    /// The signed checkpoint.
    pub checkpoint: ExportedCheckpoint,
}

impl InclusionProof {
    /// The canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        to_json(self)
    }

    /// Decodes canonical bytes, optionally followed by one LF (as `maeum-audit prove`
    /// prints them).
    pub fn decode(bytes: &[u8]) -> Result<InclusionProof, AuditError> {
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let proof: InclusionProof = from_canonical_json("inclusion proof", bytes)?;
        if proof.format != INCLUSION_FORMAT {
            return Err(AuditError::Malformed {
                what: "inclusion proof".into(),
                reason: format!("format is {:?}, expected {INCLUSION_FORMAT:?}", proof.format),
            });
        }
        Ok(proof)
    }
}

impl Verified {
    /// The inclusion proof of entry `seq` against the checkpoint of size `size` (the
    /// latest checkpoint when `None`).
    pub fn inclusion_proof(&self, seq: u64, size: Option<u64>) -> Result<InclusionProof, AuditError> {
        let checkpoints = &self.export.checkpoints;
        let checkpoint = match size {
            None => checkpoints.last(),
            Some(size) => checkpoints.iter().find(|c| c.size == size),
        }
        .ok_or_else(|| {
            let sizes: Vec<String> = checkpoints.iter().map(|c| c.size.to_string()).collect();
            AuditError::Range(format!("no checkpoint of size {}; sizes are {}", size.unwrap_or(0), sizes.join(", ")))
        })?;
        if seq >= checkpoint.size {
            return Err(AuditError::Range(format!(
                "entry {seq} is not covered by the checkpoint of size {} (choose a larger --size)",
                checkpoint.size
            )));
        }
        let proof = self.tree.inclusion_proof(seq, checkpoint.size).map_err(|e| AuditError::Range(e.to_string()))?;
        Ok(InclusionProof {
            format: INCLUSION_FORMAT.into(),
            origin: self.export.origin.clone(),
            // The key that signed this checkpoint (the log key rotates: AUD-22).
            log_public_key: hex(&self.log_key_for(checkpoint.size)),
            entry: self.export.entries[seq as usize].clone(),
            leaf_index: seq,
            tree_size: checkpoint.size,
            proof: proof.iter().map(|h| hex(h)).collect(),
            checkpoint: checkpoint.clone(),
        })
    }
}

/// Checks an inclusion proof: the checkpoint is signed by the proof's log key (which
/// must be `trust` when given), the tree size is the checkpoint's, and the entry's leaf
/// hash leads to its root. Cosignatures are not checked here (they need the
/// certificates: verify the export for that).
pub fn verify_inclusion_proof(proof: &InclusionProof, trust: Option<&[u8; 32]>) -> Result<(), AuditError> {
    let log_key = unhex32(&proof.log_public_key)?;
    if let Some(trusted) = trust
        && trusted != &log_key
    {
        return Err(AuditError::LogKey {
            found: proof.log_public_key.clone(),
            reason: format!("is not the trusted key {}", hex(trusted)),
        });
    }
    validate_origin(&proof.origin)?;
    let (cp, _) = proof.checkpoint.to_signed(&proof.origin)?;
    cp.verify(&log_key)?;
    let inclusion = |reason| AuditError::Inclusion { seq: proof.entry.seq, size: proof.tree_size, reason };
    if proof.tree_size != cp.checkpoint.size {
        return Err(AuditError::Range(format!(
            "the proof is for size {} but the checkpoint is of size {}",
            proof.tree_size, cp.checkpoint.size
        )));
    }
    if proof.leaf_index != proof.entry.seq {
        return Err(AuditError::Range(format!(
            "leaf index {} is not the entry's seq {}",
            proof.leaf_index, proof.entry.seq
        )));
    }
    let path = proof.proof.iter().map(|h| unhex32(h)).collect::<Result<Vec<_>, _>>()?;
    verify_inclusion(&proof.entry.leaf_hash(), proof.leaf_index, proof.tree_size, &path, &cp.checkpoint.root)
        .map_err(inclusion)
}

/// A signed checkpoint on its own, with what identifies its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFile {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// The log's origin.
    pub origin: String,
    /// The log key (hex).
    pub log_public_key: String,
    /// The checkpoint.
    pub checkpoint: ExportedCheckpoint,
}

impl CheckpointFile {
    /// Decodes canonical bytes, optionally followed by one LF (as `maeum-audit
    /// checkpoint` prints them).
    pub fn decode(bytes: &[u8]) -> Result<CheckpointFile, AuditError> {
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let file: CheckpointFile = from_canonical_json("checkpoint file", bytes)?;
        if file.format != CHECKPOINT_FORMAT {
            return Err(AuditError::Malformed {
                what: "checkpoint file".into(),
                reason: format!("format is {:?}, expected {CHECKPOINT_FORMAT:?}", file.format),
            });
        }
        Ok(file)
    }

    /// The canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        to_json(self)
    }

    /// The latest checkpoint of a verified export.
    pub fn latest_of(verified: &Verified) -> Option<CheckpointFile> {
        Some(CheckpointFile {
            format: CHECKPOINT_FORMAT.into(),
            origin: verified.export.origin.clone(),
            log_public_key: hex(&verified.log_key_for(verified.export.checkpoints.last()?.size)),
            checkpoint: verified.export.checkpoints.last()?.clone(),
        })
    }
}

/// The answer to "does NEW extend OLD?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsistencyReport {
    /// OLD's size.
    pub old_size: u64,
    /// OLD's root (hex).
    pub old_root: String,
    /// NEW's size (its latest checkpoint).
    pub new_size: u64,
    /// NEW's root (hex).
    pub new_root: String,
    /// The consistency proof, hex.
    pub proof: Vec<String>,
}

/// Checks that the verified export `new` extends the checkpoint `old` (verified here
/// under its own key, which must be `new`'s): same origin and key, `old` no larger,
/// and the consistency proof from the entries of `new` verifies with `old`'s root. A
/// checkpoint of `new` of `old`'s size with another root is a fork (AUD-16).
pub fn check_extends(old: &CheckpointFile, new: &Verified) -> Result<ConsistencyReport, AuditError> {
    if old.origin != new.export.origin {
        return Err(AuditError::Origin { expected: old.origin.clone(), found: new.export.origin.clone() });
    }
    let (old_cp, _) = old.checkpoint.to_signed(&old.origin)?;
    // The key in effect at OLD's size in NEW's log (the log key rotates: AUD-22).
    let key = new.log_key_for(old_cp.checkpoint.size);
    if old.log_public_key != hex(&key) {
        return Err(AuditError::LogKey {
            found: old.log_public_key.clone(),
            reason: format!("is not the key that signs the log's checkpoints of that size, {}", hex(&key)),
        });
    }
    old_cp.verify(&key)?;
    let old_cp = old_cp.checkpoint;
    let new_size = new.tree.size();
    if old_cp.size > new_size {
        return Err(AuditError::Rollback { old: old_cp.size, new: new_size });
    }
    let new_root = new.tree.root();
    // INVARIANT: old size <= new size was checked just above.
    let at_old = new.tree.root_at(old_cp.size).map_err(|e| AuditError::Range(e.to_string()))?;
    if at_old != old_cp.root {
        return Err(AuditError::Fork { size: old_cp.size, known: hex(&old_cp.root[..8]), new: hex(&at_old[..8]) });
    }
    let proof = new.tree.consistency_proof(old_cp.size, new_size).map_err(|e| AuditError::Range(e.to_string()))?;
    verify_consistency(old_cp.size, new_size, &old_cp.root, &new_root, &proof)
        .map_err(|reason| AuditError::Inconsistent { old: old_cp.size, new: new_size, reason })?;
    Ok(ConsistencyReport {
        old_size: old_cp.size,
        old_root: hex(&old_cp.root),
        new_size,
        new_root: hex(&new_root),
        proof: proof.iter().map(|h| hex(h)).collect(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
pub(crate) mod tests {
    use super::*;
    use crate::Log;
    use crate::checkpoint::{log_key_pair, log_public_key};
    use crate::witness::Witness;
    use maeum_pki::identity::{Ca, SecretPem, site_request};
    use ring::rand::SystemRandom;
    use ring::signature::Ed25519KeyPair;

    /// A small consortium with a log, two witnesses and a few checkpoints.
    pub(crate) struct Fixture {
        pub key: Ed25519KeyPair,
        pub ca: Ca,
        pub sites: Vec<(String, SecretPem, String)>,
        pub log: Log,
        pub entries: Vec<Entry>,
        pub checkpoints: Vec<ExportedCheckpoint>,
        pub witnesses: Vec<Witness>,
        pub now: i64,
    }

    impl Fixture {
        pub fn new() -> Fixture {
            let rng = SystemRandom::new();
            let key = log_key_pair(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
            let ca = Ca::generate("heart", 30).unwrap();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
            let mut fx = Fixture {
                log: Log::new("maeum/heart".into()).unwrap(),
                key,
                sites: Vec::new(),
                entries: Vec::new(),
                checkpoints: Vec::new(),
                witnesses: Vec::new(),
                ca,
                now,
            };
            let ca_der = identity::pem_to_der(fx.ca.cert_pem()).unwrap().remove(0);
            fx.append(Event::ConsortiumInit {
                consortium: "heart".into(),
                ca_fingerprint: identity::fingerprint(&ca_der),
                log_key: hex(&log_public_key(&fx.key)),
            });
            fx
        }

        pub fn append(&mut self, event: Event) -> u64 {
            let time = self.now + self.log.size() as i64 * 1000;
            let entries = self.log.next_entries(time, event);
            self.log.apply(&entries).unwrap();
            let seq = entries.last().unwrap().seq;
            self.entries.extend(entries);
            seq
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
            let log_key = log_public_key(&self.key);
            self.witnesses.push(Witness::new("maeum/heart".into(), log_key, None).unwrap());
            self.sites.push((site.into(), key, cert));
        }

        /// Signs a checkpoint; the first `cosigners` sites witness it.
        pub fn checkpoint(&mut self, cosigners: usize) {
            let signed = self.log.checkpoint(&self.key).unwrap();
            let mut cosigs = Vec::new();
            for (i, (site, key, _)) in self.sites.iter().enumerate().take(cosigners) {
                let witness = &mut self.witnesses[i];
                let proof = self.log.consistency_proof(witness.known_size(), signed.checkpoint.size).unwrap();
                let token = witness.observe(&signed, &proof).unwrap();
                cosigs.push(Cosignature {
                    site: site.clone(),
                    signature: token.cosign(key, &SystemRandom::new()).unwrap(),
                });
            }
            self.checkpoints.push(ExportedCheckpoint::new(&signed, &cosigs));
        }

        pub fn export(&self) -> Export {
            Export {
                format: EXPORT_FORMAT.into(),
                origin: "maeum/heart".into(),
                log_public_key: hex(&log_public_key(&self.key)),
                ca_cert_pem: self.ca.cert_pem().into(),
                witnesses: self
                    .sites
                    .iter()
                    .map(|(site, _, cert)| WitnessCert { site: site.clone(), cert_pem: cert.clone() })
                    .collect(),
                entries: self.entries.clone(),
                checkpoints: self.checkpoints.clone(),
            }
        }
    }

    fn small() -> Fixture {
        let mut fx = Fixture::new();
        fx.approve("a");
        fx.approve("b");
        fx.checkpoint(2);
        fx.append(Event::JobFinished { job_id: "j-1".into(), state: "completed".into() });
        fx.checkpoint(1);
        fx
    }

    /// `small()` with a rotation of the log key and a checkpoint by the new key; the
    /// retired key is returned.
    fn rotated(from: Option<&Ed25519KeyPair>) -> (Fixture, Ed25519KeyPair, [u8; 32]) {
        use crate::handover::{KeyHandover, Role};
        let mut fx = small();
        let first = log_public_key(&fx.key);
        let new = log_key_pair(Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap().as_ref()).unwrap();
        let h = KeyHandover::make(Role::Log, "heart", from.unwrap_or(&fx.key), &new);
        fx.append(Event::LogKeyRotated {
            operator: "lead".into(),
            old_key: h.old_key,
            new_key: h.new_key,
            old_signature: h.old_signature,
            new_signature: h.new_signature,
        });
        let old = std::mem::replace(&mut fx.key, new);
        fx.checkpoint(0);
        (fx, old, first)
    }

    #[test]
    fn a_rotated_log_key_signs_the_checkpoints_after_its_entry_and_no_other_key_does() {
        let (fx, old, first) = rotated(None);
        let mut export = fx.export();
        export.log_public_key = hex(&first);
        let v = verify_full(&export.encode(), Some(&first)).expect("verifies from the first key");
        assert_eq!(v.log_keys.iter().map(|(_, k)| *k).collect::<Vec<_>>(), vec![first, log_public_key(&fx.key)]);
        assert_eq!(v.log_key_for(2), first);
        assert_eq!(v.report.log_key_rotations, 1);
        assert_eq!(v.report.current_log_key, hex(&log_public_key(&fx.key)));
        assert_eq!(v.log_key_for(v.tree.size()), log_public_key(&fx.key));
        // The last checkpoint signed by the retired key instead: AUD-09.
        let last = export.checkpoints.len() - 1;
        let (cp, _) = export.checkpoints[last].to_signed("maeum/heart").unwrap();
        export.checkpoints[last] = ExportedCheckpoint::new(&cp.checkpoint.sign(&old), &[]);
        let e = verify(&export.encode(), None).unwrap_err().to_string();
        assert!(e.starts_with("AUD-09"), "{e}");
        // A rotation signed by a key that is not the log's: AUD-22.
        let stranger = log_key_pair(Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap().as_ref()).unwrap();
        let (fx, _, first) = rotated(Some(&stranger));
        let mut export = fx.export();
        export.log_public_key = hex(&first);
        let e = verify(&export.encode(), None).unwrap_err().to_string();
        assert!(e.starts_with("AUD-22") && e.contains("but the log key in effect is"), "{e}");
    }

    /// `small()`, then the CA rolls over (handover by `signer`, the CA in effect when
    /// `None`), and site `c`, certified by the new CA, witnesses a checkpoint.
    fn rolled_over(signer: Option<&Ca>) -> Fixture {
        use maeum_pki::rollover::CaHandover;
        let mut fx = small();
        let new = Ca::successor("heart", 2, 30).unwrap();
        let h = CaHandover::make("heart", signer.unwrap_or(&fx.ca), &new).unwrap();
        fx.append(Event::CaRotated {
            operator: "lead".into(),
            old_ca: h.old_ca.clone(),
            new_ca: h.new_ca().unwrap(),
            new_ca_pem: h.new_ca_pem,
            old_signature: h.old_signature,
            new_signature: h.new_signature,
        });
        let first = std::mem::replace(&mut fx.ca, new);
        fx.approve("c");
        fx.ca = first;
        let n = fx.sites.len();
        fx.sites.swap(0, n - 1);
        fx.witnesses.swap(0, n - 1);
        fx.checkpoint(1);
        fx.sites.swap(0, n - 1);
        fx.witnesses.swap(0, n - 1);
        fx
    }

    #[test]
    fn witnesses_certified_by_a_rolled_over_ca_verify_and_a_forged_rollover_does_not() {
        let fx = rolled_over(None);
        let report = verify(&fx.export().encode(), None).expect("a rollover from the CA in effect verifies");
        assert_eq!(report.ca_rotations, 1);
        assert!(report.witnesses.contains(&"c".to_string()));
        // Without the rollover entry, c's certificate chains to no CA the log knows.
        let mut export = fx.export();
        let at = export.entries.iter().position(|e| e.event.kind() == "ca_rotated").unwrap();
        export.entries[at].event = Event::JobFinished { job_id: "x".into(), state: "y".into() };
        assert!(verify(&export.encode(), None).is_err());
        // A rollover signed by a CA that is not the consortium's: AUD-23.
        let stranger = Ca::successor("heart", 7, 30).unwrap();
        let e = verify(&rolled_over(Some(&stranger)).export().encode(), None).unwrap_err().to_string();
        assert!(e.starts_with("AUD-23") && e.contains("but the CA in effect is"), "{e}");
    }

    fn check(change: impl FnOnce(&mut Export), expected: &str) {
        let fx = small();
        let mut export = fx.export();
        change(&mut export);
        let e = verify(&export.encode(), None).unwrap_err().to_string();
        assert!(e.contains(expected), "expected {expected:?}, got {e}");
    }

    #[test]
    fn a_good_export_verifies() {
        let fx = small();
        let bytes = fx.export().encode();
        let report = verify(&bytes, Some(&log_public_key(&fx.key))).unwrap();
        assert_eq!(report.entries, 5);
        assert_eq!(report.checkpoints, 2);
        assert_eq!(report.cosignatures, 3);
        assert_eq!(report.witnesses, ["a", "b"]);
        assert_eq!(report.latest_witnesses, ["a"]);
        let e = verify(&bytes, Some(&[0; 32])).unwrap_err().to_string();
        assert!(e.starts_with("AUD-05 log key"), "{e}");
    }

    #[test]
    fn tampering_is_named_precisely() {
        check(|e| e.entries.swap(1, 2), "AUD-03 entry at position 1 has seq 2");
        check(|e| e.entries.truncate(4), "AUD-07 checkpoint #1 (size 5): the log has 4 entries");
        check(
            |e| {
                e.entries.push(Entry {
                    seq: 5,
                    time_ms: 0,
                    event: Event::JobFinished { job_id: "x".into(), state: "y".into() },
                })
            },
            "AUD-11 entries 5.. are not covered by any checkpoint",
        );
        check(
            |e| drop(e.checkpoints.remove(0)),
            "AUD-12 entry 3 records a checkpoint of size 3 that is not in the export",
        );
        check(|e| drop(e.checkpoints.remove(1)), "AUD-11 entries 3.. are not covered");
        check(|e| e.checkpoints.swap(0, 1), "AUD-07 checkpoint #1 (size 3): not larger than the previous");
        check(
            |e| {
                if let Event::SiteApproved { site, .. } = &mut e.entries[1].event {
                    *site = "c".into();
                }
            },
            "AUD-08 checkpoint #0 (size 3): root",
        );
        check(|e| e.checkpoints[0].signature = base64(&[0; 64]), "AUD-09 checkpoint #0 (size 3)");
        check(
            |e| e.checkpoints[1].cosignatures[0].site = "b".into(),
            "AUD-14 checkpoint #1 (size 5): cosignature of site b",
        );
        check(|e| drop(e.witnesses.remove(1)), "AUD-14 checkpoint #0 (size 3): cosignature of site b: no certificate");
        check(|e| e.witnesses.swap(0, 1), "AUD-13 witness certificate of site a: witnesses must be listed once each");
        check(|e| e.ca_cert_pem = Ca::generate("heart", 30).unwrap().cert_pem().into(), "AUD-06");
        check(|e| e.log_public_key = "00".repeat(32), "AUD-05");
        check(|e| e.format = "v0".into(), "AUD-01");
    }

    /// Site a's key is replaced after checkpoint #0; returns the old certificate.
    fn replace_a(fx: &mut Fixture) -> String {
        let (key, csr) = site_request("a").unwrap();
        let (_, cert) = fx.ca.sign_site_request(&csr, Some("a"), 30).unwrap();
        let old = std::mem::replace(&mut fx.sites[0], ("a".into(), key, cert.clone()));
        let print = |pem: &str| identity::fingerprint(&identity::pem_to_der(pem).unwrap().remove(0));
        fx.append(Event::SiteKeyReplaced {
            site: "a".into(),
            old_cert_fingerprint: print(&old.2),
            new_cert_fingerprint: print(&cert),
            not_after_ms: fx.now + 86_400_000,
            operator: "lead".into(),
        });
        old.2
    }

    fn with_witness(mut export: Export, site: &str, cert_pem: &str) -> Vec<u8> {
        export.witnesses.push(WitnessCert { site: site.into(), cert_pem: cert_pem.into() });
        export.witnesses.sort_by(|a, b| (&a.site, &a.cert_pem).cmp(&(&b.site, &b.cert_pem)));
        export.encode()
    }

    #[test]
    fn cosignatures_are_checked_against_the_certificate_valid_at_that_point_of_the_log() {
        let mut fx = Fixture::new();
        fx.approve("a");
        fx.approve("b");
        fx.checkpoint(2);
        let old = replace_a(&mut fx);
        fx.checkpoint(2);
        // Old key on checkpoint #0, new key on #1: both certificates are needed.
        let report = verify(&with_witness(fx.export(), "a", &old), None).unwrap();
        assert_eq!((report.checkpoints, report.cosignatures), (2, 4));
        let e = verify(&fx.export().encode(), None).unwrap_err().to_string();
        assert!(e.starts_with("AUD-14 checkpoint #0 (size 3): cosignature of site a"), "{e}");
    }

    #[test]
    fn site_certificate_history_rules() {
        let entry = |seq, event| Entry { seq, time_ms: 10 + seq as i64, event };
        let approved =
            |fp: &str| Event::SiteApproved { site: "a".into(), cert_fingerprint: fp.into(), not_after_ms: 0 };
        let replaced = |old: &str, new: &str| Event::SiteKeyReplaced {
            site: "a".into(),
            old_cert_fingerprint: old.into(),
            new_cert_fingerprint: new.into(),
            not_after_ms: 0,
            operator: "lead".into(),
        };
        let entries = [entry(1, approved("k1")), entry(5, replaced("k1", "k2")), entry(9, replaced("k2", "k1"))];
        let h = SiteCertificates::from_entries(&entries);
        let check = |fp: &str, size: u64| {
            h.check("a", fp, size).map_err(|e| e.split(' ').skip(2).collect::<Vec<_>>().join(" "))
        };
        assert_eq!(check("k1", 2), Ok(()));
        assert_eq!(check("k1", 5), Ok(()), "the replacement is entry 5, not in a checkpoint of size 5");
        assert_eq!(check("k1", 6), Err("was replaced at entry 5, before this checkpoint".into()));
        assert_eq!(check("k2", 5), Err("replaced the site's key at entry 5, after this checkpoint".into()));
        assert_eq!(check("k2", 6), Ok(()));
        assert_eq!(check("k2", 10), Err("was replaced at entry 9, before this checkpoint".into()));
        assert_eq!(check("k1", 10), Ok(()), "brought back by the second replacement");
        assert_eq!(check("k3", 10), Err("is not announced for this site".into()));
        assert!(h.check("b", "k1", 2).is_err());
        assert_eq!(h.announced_at("a", "k2"), Some(15));
        assert_eq!(h.current("a"), ["k1"]);
        assert_eq!(h.replaced(), [("a", "k2")]);
    }

    #[test]
    fn non_canonical_exports_are_refused() {
        let fx = small();
        let bytes = fx.export().encode();
        let mut spaced = b" ".to_vec();
        spaced.extend_from_slice(&bytes);
        assert!(matches!(verify(&spaced, None), Err(AuditError::NotCanonical { offset: 0, .. })));
        let text = String::from_utf8(bytes).unwrap().replacen("\"format\"", "\"\\u0066ormat\"", 1);
        assert!(matches!(verify(text.as_bytes(), None), Err(AuditError::NotCanonical { .. })));
    }

    #[test]
    fn inclusion_proofs_round_trip() {
        let fx = small();
        let verified = verify_full(&fx.export().encode(), None).unwrap();
        for seq in 0..5 {
            let proof = verified.inclusion_proof(seq, None).unwrap();
            let decoded = InclusionProof::decode(&proof.encode()).unwrap();
            verify_inclusion_proof(&decoded, Some(&verified.log_key)).unwrap();
            let mut other = decoded.clone();
            other.entry.time_ms += 1;
            assert!(matches!(verify_inclusion_proof(&other, None), Err(AuditError::Inclusion { .. })));
        }
        assert!(verified.inclusion_proof(4, Some(3)).is_err());
        assert!(verified.inclusion_proof(0, Some(4)).is_err());
        verify_inclusion_proof(&verified.inclusion_proof(2, Some(3)).unwrap(), None).unwrap();
    }

    #[test]
    fn consistency_between_exports_and_forks() {
        let mut fx = small();
        let old = verify_full(&fx.export().encode(), None).unwrap();
        let old_cp = CheckpointFile::latest_of(&old).unwrap();
        fx.append(Event::JobFinished { job_id: "j-2".into(), state: "failed".into() });
        fx.checkpoint(2);
        let new = verify_full(&fx.export().encode(), None).unwrap();
        let report = check_extends(&old_cp, &new).unwrap();
        assert_eq!((report.old_size, report.new_size), (5, 7));
        let back = check_extends(&CheckpointFile::latest_of(&new).unwrap(), &old).unwrap_err();
        assert!(matches!(back, AuditError::Rollback { .. }), "{back}");
        // The same log rewritten: entry 4 changed, re-signed with the same key.
        let mut rewritten = fx.export();
        rewritten.entries.truncate(4);
        rewritten.checkpoints.truncate(1);
        rewritten.entries.push(Entry {
            seq: 4,
            time_ms: 1,
            event: Event::JobFinished { job_id: "j-1".into(), state: "aborted".into() },
        });
        let mut log = Log::new("maeum/heart".into()).unwrap();
        log.apply(&rewritten.entries).unwrap();
        let signed = log.checkpoint(&fx.key).unwrap();
        rewritten.checkpoints.push(ExportedCheckpoint::new(&signed, &[]));
        let forked = verify_full(&rewritten.encode(), None).unwrap();
        let e = check_extends(&old_cp, &forked).unwrap_err();
        assert!(matches!(e, AuditError::Fork { size: 5, .. }), "{e}");
    }
}
