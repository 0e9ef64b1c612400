//! The coordinator's transparency log, persisted in the state database
//! ([`crate::storage`]), append-only.
//!
//! ```text
//! audit_entries      seq (u64 BE) -> canonical entry bytes
//! audit_leaves       seq (u64 BE) -> leaf hash (32 bytes)
//! audit_checkpoints  size (u64 BE) -> ExportedCheckpoint JSON (root, signature, cosignatures)
//! audit_site_certs   fingerprint -> WitnessCert JSON: every site certificate seen (files in
//!                    HOME/sites, connections), so the export holds a site's certificates over
//!                    time even where a file was overwritten
//! ```
//!
//! Commit points: [`AuditLog::append`] writes an entry and its leaf in one commit
//! before returning its seq, so a committed entry survives kill -9 whole or not at
//! all; [`AuditLog::checkpoint`] commits the signed checkpoint before it becomes the
//! latest. A cosignature raises the state seal's witnessed checkpoint, and
//! [`AuditLog::open`] refuses a log shorter than it or with another root at its size:
//! a coordinator never serves a history its sites have cosigned past. The tree (every complete subtree hash, 64 bytes per
//! entry) is rebuilt in memory at open, in O(n), so checkpoints and proofs never
//! rehash the log. The protocol logic (checkpoint records, proofs) is
//! [`maeum_tlog::Log`]; this file only stores it.

use std::sync::Mutex;

use crate::storage::{Db, Tree, Witnessed, Write};
use anyhow::{Context, Result, anyhow, bail};

use maeum_pki::identity;
use maeum_protocols::wire::audit::ProvenEntry;
use maeum_tlog::checkpoint::{self, log_key_pair, verify_cosignature, witness_key};
use maeum_tlog::export::{
    EXPORT_FORMAT, Export, ExportedCheckpoint, ExportedCosignature, SiteCertificates, WitnessCert,
};
use maeum_tlog::{Entry, Event, Hash, Log, SignedCheckpoint, hex};

/// The append-only audit log of one coordinator.
pub struct AuditLog {
    db: Db,
    key: ring::signature::Ed25519KeyPair,
    /// The log keys before `key`, oldest first (`crate::signing_key`): the first is the
    /// one the init entry names and the export carries.
    retired: Vec<[u8; 32]>,
    /// Serialises appends and checkpoints; holds the in-memory tree.
    log: Mutex<Log>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("key", &"***").finish_non_exhaustive()
    }
}

fn seq_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

impl AuditLog {
    /// Opens (or creates) the log named `origin` in `db`, signing with the Ed25519
    /// PKCS#8 key `signing_key_pkcs8` (the home's `signing.key`; `retired`: the log keys
    /// before it, oldest first). Reloads the leaves, checks they are numbered 0..n and
    /// that the latest checkpoint matches them and is signed by one of the keys.
    pub fn open(db: &Db, origin: String, signing_key_pkcs8: &[u8], retired: &[[u8; 32]]) -> Result<AuditLog> {
        let key = log_key_pair(signing_key_pkcs8).context("loading the audit log signing key")?;
        let mut hashes: Vec<Hash> = Vec::with_capacity(db.len(Tree::AuditLeaves)? as usize);
        db.scan(Tree::AuditLeaves, None, None, false, &mut |k, v| {
            let i = hashes.len();
            if k != seq_key(i as u64) {
                bail!("audit log is corrupt: leaf {i} is missing");
            }
            hashes.push(v.try_into().map_err(|_| anyhow!("audit log is corrupt: leaf {i} is not 32 bytes"))?);
            Ok(true)
        })?;
        let entries = db.len(Tree::AuditEntries)?;
        if entries != hashes.len() as u64 {
            bail!("audit log is corrupt: {entries} entries but {} leaves", hashes.len());
        }
        let latest = match db.last(Tree::AuditCheckpoints)? {
            None => None,
            Some((_, v)) => {
                let stored: ExportedCheckpoint =
                    serde_json::from_slice(&v).context("decoding the latest checkpoint")?;
                Some(stored.to_signed(&origin)?.0)
            }
        };
        if let Some(cp) = &latest
            && cp.verify(&checkpoint::log_public_key(&key)).is_err()
            && !retired.iter().any(|k| cp.verify(k).is_ok())
        {
            bail!("the latest stored checkpoint is not signed by this signing key (nor by one it replaced)");
        }
        let log = Log::restore(origin, &hashes, latest).context("reloading the audit log")?;
        if let Some(w) = db.witnessed() {
            let n = log.size();
            if n < w.size {
                bail!(
                    "the audit log has {n} entries but site {} cosigned a checkpoint of {} entries: the log was \
                     rolled back or replaced; refusing to serve it (restore HOME/state from a backup that holds that \
                     checkpoint)",
                    w.site,
                    w.size
                );
            }
            let root = hex(&log.tree().root_at(w.size)?);
            if root != w.root {
                bail!(
                    "the audit log is inconsistent with the checkpoint of {} entries that site {} cosigned (root {} \
                     here, {} cosigned): its history was rewritten; refusing to serve it",
                    w.size,
                    w.site,
                    &root[..16],
                    &w.root[..w.root.len().min(16)]
                );
            }
        }
        Ok(AuditLog { db: db.clone(), key, retired: retired.to_vec(), log: Mutex::new(log) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The log's public key (hex), as in `signing.pub`.
    pub fn public_key(&self) -> String {
        hex(&checkpoint::log_public_key(&self.key))
    }

    /// The key the init entry names (the first log key; an export carries it).
    pub fn first_key(&self) -> String {
        self.retired.first().map_or_else(|| self.public_key(), |k| hex(k))
    }

    /// Signs with `pkcs8` from now on (a rotation of the log key, logged by the caller
    /// first); the current key joins the retired ones.
    pub fn rotate(&mut self, pkcs8: &[u8]) -> Result<()> {
        let key = log_key_pair(pkcs8).context("loading the new log signing key")?;
        self.retired.push(checkpoint::log_public_key(&self.key));
        self.key = key;
        Ok(())
    }

    /// Whether `signed` carries this log's signature (by its key or one it replaced).
    pub fn signed_by_this_log(&self, signed: &SignedCheckpoint) -> bool {
        signed.verify(&checkpoint::log_public_key(&self.key)).is_ok()
            || self.retired.iter().any(|k| signed.verify(k).is_ok())
    }

    /// The log's origin.
    pub fn origin(&self) -> String {
        self.lock().origin().to_owned()
    }

    /// The number of entries.
    pub fn size(&self) -> u64 {
        self.lock().size()
    }

    /// Appends `event` at `time_ms`, durably, and returns its seq. (If a checkpoint was
    /// signed since the last entry, its record is appended first.)
    pub fn append(&self, time_ms: i64, event: Event) -> Result<u64> {
        self.append_with(time_ms, event, Vec::new())
    }

    /// [`AuditLog::append`], committing `with` (writes to other trees of the same
    /// database: the state change this entry records) in the same durable write.
    pub fn append_with(&self, time_ms: i64, event: Event, with: Vec<Write>) -> Result<u64> {
        let mut log = self.lock();
        let new = log.next_entries(time_ms, event);
        let mut writes = with;
        writes.reserve(2 * new.len());
        for entry in &new {
            writes.push(Write::put(Tree::AuditEntries, seq_key(entry.seq), entry.encode()));
            writes.push(Write::put(Tree::AuditLeaves, seq_key(entry.seq), entry.leaf_hash().to_vec()));
        }
        self.db.commit(writes).context("writing an audit entry")?;
        log.apply(&new)?;
        // INVARIANT: next_entries always returns the event as its last entry.
        Ok(new.last().map_or(0, |e| e.seq))
    }

    /// Signs a checkpoint of the current size (or returns the latest if nothing was
    /// appended since), stores it durably, and returns it. Errors on an empty log.
    pub fn checkpoint(&self) -> Result<SignedCheckpoint> {
        let mut log = self.lock();
        let signed = log.sign_checkpoint(&self.key)?;
        if log.latest() == Some(&signed) {
            return Ok(signed);
        }
        let stored = serde_json::to_vec(&ExportedCheckpoint::new(&signed, &[]))?;
        self.db
            .commit(vec![Write::put(Tree::AuditCheckpoints, seq_key(signed.checkpoint.size), stored)])
            .context("storing a checkpoint")?;
        log.set_latest(signed.clone())?;
        Ok(signed)
    }

    /// The latest checkpoint, if any.
    pub fn latest(&self) -> Option<SignedCheckpoint> {
        self.lock().latest().cloned()
    }

    /// Every stored checkpoint with its cosignatures, by size.
    pub fn checkpoints(&self) -> Result<Vec<ExportedCheckpoint>> {
        self.db
            .values(Tree::AuditCheckpoints)?
            .iter()
            .map(|v| serde_json::from_slice(v).context("decoding a checkpoint"))
            .collect()
    }

    /// The history of every site's certificates in the log (approvals, replacements).
    pub fn site_certificates(&self) -> Result<SiteCertificates> {
        let mut out = SiteCertificates::default();
        self.db.scan(Tree::AuditEntries, None, None, false, &mut |_, v| {
            out.add(&Entry::decode(v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// A site certificate kept by [`Self::remember_certificate`], by its fingerprint.
    pub fn remembered_certificate(&self, fingerprint: &str) -> Result<Option<String>> {
        let Some(bytes) = self.db.get(Tree::AuditSiteCerts, fingerprint.as_bytes())? else { return Ok(None) };
        let cert: WitnessCert = serde_json::from_slice(&bytes).context("a kept site certificate")?;
        Ok(Some(cert.cert_pem))
    }

    /// Keeps `site`'s certificate (PEM) for the export, if not kept yet.
    pub fn remember_certificate(&self, site: &str, cert_pem: &str) -> Result<()> {
        let der = identity::pem_to_der(cert_pem)?.into_iter().next().context("no certificate in the PEM")?;
        let print = identity::fingerprint(&der);
        if self.db.contains(Tree::AuditSiteCerts, print.as_bytes())? {
            return Ok(());
        }
        let cert = WitnessCert { site: site.to_owned(), cert_pem: checkpoint::canonical_pem(&der) };
        self.db
            .commit(vec![Write::put(Tree::AuditSiteCerts, print.as_bytes(), serde_json::to_vec(&cert)?)])
            .context("storing a site certificate")?;
        Ok(())
    }

    /// Every site certificate kept by [`AuditLog::remember_certificate`].
    pub fn remembered_certificates(&self) -> Result<Vec<WitnessCert>> {
        self.db
            .values(Tree::AuditSiteCerts)?
            .iter()
            .map(|v| serde_json::from_slice(v).context("decoding a site certificate"))
            .collect()
    }

    /// The entry `seq`.
    pub fn entry(&self, seq: u64) -> Result<Entry> {
        let bytes = self.db.get(Tree::AuditEntries, &seq_key(seq))?.with_context(|| format!("no audit entry {seq}"))?;
        Ok(Entry::decode(&bytes)?)
    }

    /// Records `site`'s cosignature on the checkpoint of `size`, after checking it: the
    /// site's certificate `cert_pem` must chain to a CA in `ca_pem`, name the site, be valid at
    /// the time of the checkpoint's last entry, be the site's certificate at that point of
    /// the log (not replaced before it, see `SiteCertificates::check`), and the signature
    /// must verify: the export's AUD-14, checked before anything is stored. A second
    /// cosignature by the same site replaces the first.
    pub fn add_cosignature(&self, size: u64, site: &str, signature: &[u8], ca_pem: &str, cert_pem: &str) -> Result<()> {
        let guard = self.lock();
        let stored = self
            .db
            .get(Tree::AuditCheckpoints, &seq_key(size))?
            .with_context(|| format!("no checkpoint of size {size}"))?;
        let mut cp: ExportedCheckpoint = serde_json::from_slice(&stored).context("decoding a checkpoint")?;
        let (signed, _) = cp.to_signed(guard.origin())?;
        let at = self.entry(size - 1)?.time_ms;
        let cas = identity::pem_to_der(ca_pem)?;
        let cert = identity::pem_to_der(cert_pem)?.remove(0);
        self.site_certificates()?
            .check(site, &identity::fingerprint(&cert), size)
            .map_err(|e| anyhow!("cosignature of site {site} on checkpoint {size}: {e}"))?;
        let bits = witness_key(&cas, &cert, site, at).map_err(|e| anyhow!("cosignature of site {site}: {e}"))?;
        verify_cosignature(&signed.checkpoint, &bits, signature)
            .map_err(|e| anyhow!("cosignature of site {site} on checkpoint {size}: {e}"))?;
        cp.cosignatures.retain(|c| c.site != site);
        cp.cosignatures.push(ExportedCosignature { site: site.to_owned(), signature: maeum_tlog::base64(signature) });
        cp.cosignatures.sort_by(|a, b| a.site.cmp(&b.site));
        self.db.commit(vec![Write::put(Tree::AuditCheckpoints, seq_key(size), serde_json::to_vec(&cp)?)])?;
        // The seal keeps the newest cosigned checkpoint outside the database: the log
        // may never again be shorter than, or differ from, what a site signed.
        self.db.witness(Witnessed { size, root: hex(&signed.checkpoint.root), site: site.to_owned() })?;
        Ok(())
    }

    /// The stored checkpoint of `size`, if one was signed at that size.
    pub fn checkpoint_at(&self, size: u64) -> Result<Option<ExportedCheckpoint>> {
        self.db
            .get(Tree::AuditCheckpoints, &seq_key(size))?
            .map(|v| serde_json::from_slice(&v).context("decoding a checkpoint"))
            .transpose()
    }

    /// The stored checkpoints of size at least `from`, the newest `limit` of them.
    pub fn since(&self, from: u64, limit: usize) -> Result<Vec<ExportedCheckpoint>> {
        let mut out = Vec::new();
        if limit > 0 {
            self.db.scan(Tree::AuditCheckpoints, Some(&seq_key(from)), None, true, &mut |_, v| {
                out.push(serde_json::from_slice(v).context("decoding a checkpoint")?);
                Ok(out.len() < limit)
            })?;
        }
        out.reverse();
        Ok(out)
    }

    /// The entries before `size`, from seq `after`, that name `site` or bring one of
    /// `models` into being, each with its inclusion proof in the tree of `size`
    /// entries; at most `limit`, and the seq to continue from if there are more.
    #[allow(clippy::too_many_arguments)]
    pub fn prove_for(
        &self,
        site: &str,
        models: &[String],
        jobs: &[String],
        sites: &[String],
        (size, after, limit): (u64, u64, usize),
        key_rotations: bool,
    ) -> Result<(Vec<ProvenEntry>, Option<u64>)> {
        if size == 0 || size > self.size() {
            bail!("no tree of size {size} (the log has {} entries)", self.size());
        }
        let mut out = Vec::new();
        let mut more = None;
        self.db.scan(Tree::AuditEntries, Some(&seq_key(after)), Some(&seq_key(size)), false, &mut |_, bytes| {
            let entry = Entry::decode(bytes)?;
            let rotation = matches!(
                entry.event,
                Event::LogKeyRotated { .. } | Event::ReleaseKeyRotated { .. } | Event::CaRotated { .. }
            );
            let wanted = if key_rotations { rotation } else { entry.event.involves_site(site)
                || entry.event.model().is_some_and(|m| models.iter().any(|x| x == m))
                || matches!(&entry.event, Event::JobSubmitted { job_id, .. } if jobs.contains(job_id))
                || matches!(&entry.event,
                    Event::SiteApproved { site: s, .. } | Event::SiteKeyReplaced { site: s, .. } | Event::SiteRevoked { site: s, .. }
                    if sites.contains(s)) };
            if !wanted {
                return Ok(true);
            }
            if out.len() == limit {
                more = Some(entry.seq);
                return Ok(false);
            }
            let proof = self.inclusion_proof(entry.seq, size)?;
            out.push(ProvenEntry { seq: entry.seq, entry, proof });
            Ok(true)
        })?;
        Ok((out, more))
    }

    /// FAULT INJECTION for the end-to-end test of fork detection (enabled only by
    /// `MAEUM_COORDINATOR_TEST_FORK_VIEW`): a checkpoint of the latest size whose last
    /// entry differs from the real one, validly signed, with the consistency proof from
    /// `known` in that forked tree. This is what a dishonest operator would show one
    /// site; the witnesses must catch it.
    pub fn forked_view(&self, known: u64) -> Result<(SignedCheckpoint, Vec<Hash>)> {
        let guard = self.lock();
        let n = guard.latest().context("no checkpoint yet")?.checkpoint.size;
        let mut hashes = Vec::with_capacity(n as usize);
        self.db.scan(Tree::AuditLeaves, None, Some(&seq_key(n - 1)), false, &mut |_, v| {
            hashes.push(v.try_into().map_err(|_| anyhow!("a leaf is not 32 bytes"))?);
            Ok(true)
        })?;
        let mut fork = Log::restore(guard.origin().to_owned(), &hashes, None)?;
        drop(guard);
        let event = Event::OperatorCommand {
            operator: "nobody".into(),
            command: "forked view".into(),
            result: "shown to one site only".into(),
        };
        fork.append(maeum_runtime::runtime::now_ms(), event);
        let signed = fork.sign_checkpoint(&self.key)?;
        let proof = if known > 0 && known < n { fork.consistency_proof(known, n)? } else { Vec::new() };
        Ok((signed, proof))
    }

    /// The consistency proof from the tree of `old` entries to that of `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>> {
        Ok(self.lock().consistency_proof(old, new)?)
    }

    /// The inclusion proof of entry `seq` in the tree of `size` entries.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>> {
        Ok(self.lock().inclusion_proof(seq, size)?)
    }

    /// The export file: every entry, a checkpoint covering all of them (signed now if
    /// needed), every checkpoint's cosignatures, the CA, and the certificates in
    /// `witnesses` or remembered here that the log announced (`site_approved`,
    /// `site_key_replaced`). The export is verified
    /// before it is returned, so the coordinator never hands out one that fails.
    pub fn export(&self, ca_pem: &str, witnesses: &[WitnessCert]) -> Result<Vec<u8>> {
        if self.size() == 0 {
            bail!("the audit log is empty");
        }
        self.checkpoint()?;
        let log = self.lock();
        // The entries the latest checkpoint covers: one appended by another thread
        // between that checkpoint and this lock waits for the next export (every
        // exported entry must be under a checkpoint, AUD-11).
        let n = log.latest().map_or(0, |c| c.checkpoint.size);
        let mut entries = Vec::with_capacity(n as usize);
        let mut history = SiteCertificates::default();
        self.db.scan(Tree::AuditEntries, None, Some(&seq_key(n)), false, &mut |_, bytes| {
            let entry = Entry::decode(bytes).with_context(|| format!("audit entry {}", entries.len()))?;
            history.add(&entry);
            entries.push(entry);
            Ok(true)
        })?;
        let canonical = |pem: &str| -> Result<(String, String)> {
            let der = identity::pem_to_der(pem)?.remove(0);
            Ok((checkpoint::canonical_pem(&der), identity::fingerprint(&der)))
        };
        let mut certs = Vec::new();
        for w in witnesses.iter().chain(&self.remembered_certificates()?) {
            let (cert_pem, print) =
                canonical(&w.cert_pem).with_context(|| format!("certificate of site {}", w.site))?;
            if history.announced_at(&w.site, &print).is_some() {
                certs.push(WitnessCert { site: w.site.clone(), cert_pem });
            }
        }
        certs.sort_by(|a, b| (&a.site, &a.cert_pem).cmp(&(&b.site, &b.cert_pem)));
        certs.dedup();
        let export = Export {
            format: EXPORT_FORMAT.into(),
            origin: log.origin().to_owned(),
            log_public_key: self.first_key(),
            ca_cert_pem: canonical(ca_pem).context("the CA certificate")?.0,
            witnesses: certs,
            entries,
            checkpoints: self.checkpoints()?,
        };
        drop(log);
        let bytes = export.encode();
        maeum_tlog::export::verify(&bytes, None).context("the export does not verify")?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Engine;
    use maeum_pki::identity::{Ca, site_request};
    use maeum_tlog::Witness;
    use maeum_tlog::export::verify;
    use ring::rand::SystemRandom;

    struct Setup {
        dir: tempfile::TempDir,
        pkcs8: Vec<u8>,
        ca: Ca,
    }

    fn setup() -> Setup {
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        Setup {
            dir: tempfile::tempdir().expect("tempdir"),
            pkcs8: pkcs8.as_ref().to_vec(),
            ca: Ca::generate("heart", 30).expect("ca"),
        }
    }

    fn open(s: &Setup) -> (Db, AuditLog) {
        let db = Db::open(&s.dir.path().join("state"), Engine::Sled).expect("db");
        let log = AuditLog::open(&db, "maeum/heart".into(), &s.pkcs8, &[]).expect("open");
        (db, log)
    }

    fn now() -> i64 {
        maeum_runtime::runtime::now_ms()
    }

    fn init(s: &Setup, log: &AuditLog) {
        let ca = identity::pem_to_der(s.ca.cert_pem()).expect("ca").remove(0);
        let event = Event::ConsortiumInit {
            consortium: "heart".into(),
            ca_fingerprint: identity::fingerprint(&ca),
            log_key: log.public_key(),
        };
        assert_eq!(log.append(now(), event).expect("append"), 0);
    }

    fn finished(n: u32) -> Event {
        Event::JobFinished { job_id: format!("j-{n}"), state: "completed".into() }
    }

    #[test]
    fn entries_and_checkpoints_survive_reopening() {
        let s = setup();
        let (root, cp) = {
            let (_db, log) = open(&s);
            init(&s, &log);
            for n in 0..10 {
                log.append(now(), finished(n)).expect("append");
            }
            let cp = log.checkpoint().expect("checkpoint");
            assert_eq!(cp.checkpoint.size, 11);
            assert_eq!(log.checkpoint().expect("again"), cp, "nothing new: the same checkpoint");
            (cp.checkpoint.root, cp)
        };
        let (_db, log) = open(&s);
        assert_eq!(log.size(), 11);
        assert_eq!(log.latest(), Some(cp.clone()));
        assert_eq!(log.lock().tree().root(), root);
        // The first append after reopening records the checkpoint, as it would have.
        assert_eq!(log.append(now(), finished(10)).expect("append"), 12);
        assert_eq!(log.entry(11).expect("entry").event.kind(), "checkpoint");
        let cp2 = log.checkpoint().expect("checkpoint");
        let proof = log.consistency_proof(11, 13).expect("proof");
        maeum_tlog::merkle::verify_consistency(11, 13, &root, &cp2.checkpoint.root, &proof).expect("consistent");
        let inclusion = log.inclusion_proof(3, 13).expect("inclusion");
        let leaf = log.entry(3).expect("entry").leaf_hash();
        maeum_tlog::merkle::verify_inclusion(&leaf, 3, 13, &inclusion, &cp2.checkpoint.root).expect("included");
        assert!(
            AuditLog::open(
                &Db::open(&tempfile::tempdir().expect("dir").path().join("state"), Engine::Sled).expect("db"),
                "x".into(),
                b"no",
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn a_log_shorter_than_or_different_from_a_cosigned_checkpoint_is_refused() {
        let s = setup();
        let witnessed = {
            let (db, log) = open(&s);
            init(&s, &log);
            for n in 0..4 {
                log.append(now(), finished(n)).expect("append");
            }
            let cp = log.checkpoint().expect("checkpoint");
            let w = Witnessed { size: cp.checkpoint.size, root: hex(&cp.checkpoint.root), site: "a".into() };
            db.witness(w.clone()).expect("witness");
            w
        };
        assert_eq!(open(&s).1.size(), 5, "the log it was cosigned on opens");
        // Another state under the same key, shorter than what site a cosigned.
        let other = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&other.path().join("state"), Engine::Sled).expect("db");
        {
            let log = AuditLog::open(&db, "maeum/heart".into(), &s.pkcs8, &[]).expect("open");
            init(&s, &log);
            log.append(now(), finished(0)).expect("append");
        }
        db.witness(witnessed.clone()).expect("witness");
        let e = AuditLog::open(&db, "maeum/heart".into(), &s.pkcs8, &[]).expect_err("shorter");
        assert!(format!("{e:#}").contains("has 2 entries but site a cosigned a checkpoint of 5 entries"), "{e:#}");
        // Long enough, but another history: the root at the cosigned size differs.
        let third = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&third.path().join("state"), Engine::Redb).expect("db");
        {
            let log = AuditLog::open(&db, "maeum/heart".into(), &s.pkcs8, &[]).expect("open");
            init(&s, &log);
            for n in 10..16 {
                log.append(now(), finished(n)).expect("append");
            }
        }
        db.witness(witnessed).expect("witness");
        let e = AuditLog::open(&db, "maeum/heart".into(), &s.pkcs8, &[]).expect_err("rewritten");
        assert!(
            format!("{e:#}").contains("inconsistent with the checkpoint of 5 entries that site a cosigned"),
            "{e:#}"
        );
    }

    #[test]
    fn a_checkpoint_signed_by_another_key_is_refused_at_open() {
        let s = setup();
        {
            let (_db, log) = open(&s);
            init(&s, &log);
            log.checkpoint().expect("checkpoint");
        }
        let db = Db::open(&s.dir.path().join("state"), Engine::Sled).expect("db");
        let other = ring::signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        let e = AuditLog::open(&db, "maeum/heart".into(), other.as_ref(), &[]).expect_err("other key");
        assert!(format!("{e:#}").contains("not signed by this signing key"), "{e:#}");
    }

    #[test]
    fn export_with_cosignatures_verifies() {
        let s = setup();
        let (_db, log) = open(&s);
        init(&s, &log);
        let (site_key, csr) = site_request("a").expect("csr");
        let (_, cert) = s.ca.sign_site_request(&csr, Some("a"), 30).expect("cert");
        let der = identity::pem_to_der(&cert).expect("der").remove(0);
        log.append(
            now(),
            Event::SiteApproved {
                site: "a".into(),
                cert_fingerprint: identity::fingerprint(&der),
                not_after_ms: identity::not_after_unix(&der).expect("not after") * 1000,
            },
        )
        .expect("append");
        let mut witness =
            Witness::new("maeum/heart".into(), maeum_tlog::unhex32(&log.public_key()).expect("key"), None)
                .expect("witness");
        for round in 0..3 {
            log.append(now(), finished(round)).expect("append");
            let cp = log.checkpoint().expect("checkpoint");
            let proof = log.consistency_proof(witness.known_size(), cp.checkpoint.size).expect("proof");
            let sig =
                witness.observe(&cp, &proof).expect("observe").cosign(&site_key, &SystemRandom::new()).expect("sign");
            log.add_cosignature(cp.checkpoint.size, "a", &sig, s.ca.cert_pem(), &cert).expect("cosignature");
            assert_eq!(log.db.witnessed().map(|w| w.size), Some(cp.checkpoint.size), "the seal keeps it");
            assert!(log.add_cosignature(cp.checkpoint.size, "a", &sig[1..], s.ca.cert_pem(), &cert).is_err());
        }
        log.append(now(), finished(9)).expect("uncovered entry");
        let other = s.ca.issue_operator("not-a-site", 30).expect("other");
        let witnesses = [
            WitnessCert { site: "a".into(), cert_pem: cert.clone() },
            WitnessCert { site: "z".into(), cert_pem: other.cert_pem },
        ];
        let bytes = log.export(s.ca.cert_pem(), &witnesses).expect("export");
        let report = verify(&bytes, None).expect("verifies");
        assert_eq!(report.checkpoints, 4, "export signs a checkpoint covering the last entry");
        assert_eq!(report.cosignatures, 3);
        assert_eq!(report.witnesses, ["a"], "unannounced certificates are left out");
        assert_eq!(report.entries, log.size());
    }
}
