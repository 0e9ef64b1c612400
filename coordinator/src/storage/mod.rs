//! The coordinator's durable state behind one interface that owns transactions and
//! flushes, and that refuses a database that was corrupted or rolled back.
//!
//! Every record the coordinator keeps (sites, jobs, counters, the audit log, the
//! registry) goes through [`Db`]. A [`Backend`] (sled, the default, or redb) only
//! stores bytes; [`Db`] adds what neither engine gives on its own:
//!
//! - **A checksum over every value it reads.** Each value is stored behind
//!   SHA-256("maeum/state/v1" ‖ tree ‖ key ‖ value), so a flipped byte, or a value
//!   moved to another key, is refused with the tree and key named, never decoded.
//! - **One durable commit per change.** [`Db::commit`] applies a batch of writes
//!   atomically and flushes it before it returns; there are no lazy writes to forget.
//! - **A seal outside the database** (`HOME/state.seal`): the number of commits, a hash
//!   chain over them, and the newest audit-log checkpoint a site cosigned. Each commit
//!   also writes its number and chain into the database. At open, a database behind its
//!   seal was rolled back (the storage engine dropped a corrupt tail, or the directory
//!   was restored from an older backup) and is refused, as is one whose chain differs
//!   at the same count. The audit log refuses to open shorter than, or inconsistent
//!   with, the witnessed checkpoint ([`crate::audit::AuditLog::open`]).
//!
//! A kill between a commit and its seal leaves the database one commit ahead of the
//! seal; that is the only gap accepted, and the seal is rewritten at open.

mod backends;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

pub use backends::{RedbBackend, SledBackend};

/// The named trees. The names are those the sled trees had before this interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tree {
    Meta,
    Sites,
    Jobs,
    AuditEntries,
    AuditLeaves,
    AuditCheckpoints,
    AuditSiteCerts,
    Releases,
    Promotions,
    /// A job's completed rounds, one value each (`store::JobRecord::history`), keyed
    /// `JOB_ID \0 ROUND` (round big-endian).
    JobRounds,
}

impl Tree {
    pub const ALL: [Tree; 10] = [
        Tree::Meta,
        Tree::Sites,
        Tree::Jobs,
        Tree::AuditEntries,
        Tree::AuditLeaves,
        Tree::AuditCheckpoints,
        Tree::AuditSiteCerts,
        Tree::Releases,
        Tree::Promotions,
        Tree::JobRounds,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Sites => "sites",
            Tree::Jobs => "jobs",
            Tree::AuditEntries => "audit_entries",
            Tree::AuditLeaves => "audit_leaves",
            Tree::AuditCheckpoints => "audit_checkpoints",
            Tree::AuditSiteCerts => "audit_site_certs",
            Tree::Releases => "releases",
            Tree::Promotions => "promotions",
            Tree::JobRounds => "job_rounds",
        }
    }

    fn index(self) -> usize {
        Tree::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }
}

/// One write of a batch: `value` `None` removes the key.
#[derive(Debug, Clone)]
pub struct Write {
    pub tree: Tree,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Write {
    pub fn put(tree: Tree, key: impl AsRef<[u8]>, value: Vec<u8>) -> Write {
        Write { tree, key: key.as_ref().to_vec(), value: Some(value) }
    }
}

/// A visitor over (key, value) pairs; returns false to stop.
pub type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<bool>;

/// A storage engine: ordered byte maps in named trees, and atomic durable batches.
pub trait Backend: Send + Sync {
    /// `sled` or `redb`.
    fn kind(&self) -> &'static str;
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Visits the pairs with `from <= key < to` (`None`: unbounded) in key order, or
    /// in reverse; stops when `f` returns false.
    fn scan(&self, tree: Tree, from: Option<&[u8]>, to: Option<&[u8]>, rev: bool, f: Visit<'_>) -> Result<()>;
    fn len(&self, tree: Tree) -> Result<u64>;
    /// Applies every write atomically and durably: once this returns Ok they survive
    /// kill -9; after a crash during it, all of them are there or none is.
    fn commit(&self, writes: &[Write]) -> Result<()>;
}

/// Which engine a new state database uses (an existing one keeps its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Sled,
    Redb,
}

/// The redb file inside the state directory; its presence selects redb.
pub const REDB_FILE: &str = "state.redb";
const FORMAT_KEY: &[u8] = b"format";
const COMMIT_KEY: &[u8] = b"commit";
const FORMAT: &[u8] = b"maeum-state/1";
const SEAL_FORMAT: &str = "maeum-state-seal/1";

/// The newest audit checkpoint a site cosigned: the log may never be shorter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Witnessed {
    pub size: u64,
    /// The tree's root at `size`, hex.
    pub root: String,
    pub site: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seal {
    format: String,
    engine: String,
    commits: u64,
    chain: String,
    #[serde(default)]
    witnessed: Option<Witnessed>,
}

struct Sealed {
    commits: u64,
    chain: [u8; 32],
    witnessed: Option<Witnessed>,
    /// False after a seal write failed: the next commit rewrites it first.
    current: bool,
}

struct Inner {
    /// The last commit failed for lack of space (cleared by the next that succeeds).
    full: std::sync::atomic::AtomicBool,
    /// `HOME/state.lock`, locked exclusively for as long as this database is open (the
    /// engines' own locks differ: redb admits several processes).
    _lock: std::fs::File,
    backend: Box<dyn Backend>,
    seal_path: PathBuf,
    sealed: Mutex<Sealed>,
}

/// What [`Db::open`] found, for `doctor` and the log.
#[derive(Debug, Clone)]
pub struct OpenReport {
    pub engine: &'static str,
    pub commits: u64,
    pub records: u64,
    pub migrated: bool,
}

/// The coordinator's state database (cheap to clone; one per home).
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
    report: Arc<OpenReport>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("engine", &self.report.engine).finish_non_exhaustive()
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn value_sum(tree: Tree, key: &[u8], value: &[u8]) -> [u8; 32] {
    let name = tree.name().as_bytes();
    sha256(&[b"maeum/state/v1", &[name.len() as u8], name, &(key.len() as u32).to_be_bytes(), key, value])
}

fn frame(tree: Tree, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + value.len());
    out.extend_from_slice(&value_sum(tree, key, value));
    out.extend_from_slice(value);
    out
}

/// A key as an operator can read it in an error: text when it is text, else hex.
pub fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| c.is_ascii_graphic()) => s.to_owned(),
        _ => format!("0x{}", maeum_tlog::hex(key)),
    }
}

fn unframe<'a>(tree: Tree, key: &[u8], stored: &'a [u8]) -> Result<&'a [u8]> {
    if stored.len() < 32 || stored[..32] != value_sum(tree, key, &stored[32..]) {
        bail!(
            "the state database is corrupt: the value of {} in tree {} fails its checksum (restore HOME/state from a \
             backup; `maeum-coordinator doctor` checks every record)",
            show_key(key),
            tree.name()
        );
    }
    Ok(&stored[32..])
}

fn batch_digest(writes: &[Write]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for w in writes {
        ctx.update(&[w.tree.index() as u8]);
        ctx.update(&(w.key.len() as u64).to_be_bytes());
        ctx.update(&w.key);
        match &w.value {
            Some(v) => {
                ctx.update(&[1]);
                ctx.update(&(v.len() as u64).to_be_bytes());
                ctx.update(v);
            }
            None => ctx.update(&[0]),
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("seal.tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

/// Runs an engine call, turning a panic inside the engine (redb panics on some damaged
/// files) into an error that names what was being done.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            bail!(
                "the state database is damaged: the storage engine failed {what} ({why}); restore HOME/state from a \
                 backup"
            )
        }
    }
}

/// Whether `e` comes from a full disk (or an exhausted quota) anywhere in its chain.
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
            || c.to_string().contains("No space left on device")
    })
}

/// The seal's path for the state directory `dir` (`HOME/state` → `HOME/state.seal`).
pub fn seal_path(dir: &Path) -> PathBuf {
    dir.with_extension("seal")
}

impl Db {
    /// Opens (or creates, with `engine`) the state database in `dir`, checks every
    /// record's checksum and the seal, and migrates a home written before checksums.
    pub fn open(dir: &Path, engine: Engine) -> Result<Db> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock_path = dir.with_extension("lock");
        let lock = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "the state database {} is in use by another process (is another coordinator running on this home?)",
                dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", lock_path.display()));
            }
        }
        let redb = dir.join(REDB_FILE);
        let sled_there = dir.join("conf").exists() || dir.join("db").exists();
        let backend: Box<dyn Backend> = if redb.exists() || (engine == Engine::Redb && !sled_there) {
            Box::new(guarded("opening redb", || RedbBackend::open(&redb))?)
        } else {
            Box::new(guarded("opening sled", || SledBackend::open(dir))?)
        };
        let db = Self::checked(backend, seal_path(dir), lock)?;
        if db.report.migrated {
            tracing::info!(
                records = db.report.records,
                "the state database was framed with checksums (a home from before them)"
            );
        }
        Ok(db)
    }

    /// Checks an open `backend` against the seal at `seal_path`, holding `lock`.
    fn checked(backend: Box<dyn Backend>, seal_path: PathBuf, lock: std::fs::File) -> Result<Db> {
        let engine = backend.kind();
        let format = guarded("reading the format record", || backend.get(Tree::Meta, FORMAT_KEY))?;
        let mut migrated = false;
        let seal: Option<Seal> = match std::fs::read(&seal_path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a state seal", seal_path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", seal_path.display())),
        };
        if let Some(s) = &seal
            && (s.format != SEAL_FORMAT || s.engine != engine)
        {
            bail!(
                "{} is a {} seal for a {} database, but HOME/state holds a {engine} database",
                seal_path.display(),
                s.format,
                s.engine
            );
        }
        // Every value: framed and intact (or, before checksums existed, adopted once).
        let mut records = 0u64;
        let mut legacy: Vec<Write> = Vec::new();
        for tree in Tree::ALL {
            guarded(&format!("reading tree {}", tree.name()), || {
                backend.scan(tree, None, None, false, &mut |k, v| {
                    records += 1;
                    match &format {
                        Some(_) => {
                            unframe(tree, k, v)?;
                        }
                        None => legacy.push(Write::put(tree, k, frame(tree, k, v))),
                    }
                    Ok(true)
                })
            })?;
        }
        match format.as_deref().map(|f| unframe(Tree::Meta, FORMAT_KEY, f)).transpose()? {
            Some(f) if f == FORMAT => {}
            Some(f) => {
                bail!("the state database has format {:?}; this coordinator reads {:?}", show_key(f), show_key(FORMAT))
            }
            None => {
                if seal.is_some() {
                    bail!(
                        "the state database has lost its format record but {} exists: it was replaced or corrupted; \
                         restore HOME/state from a backup",
                        seal_path.display()
                    );
                }
                // A new database, or one from before checksums: frame it in one commit.
                migrated = records > 0;
                legacy.push(Write::put(Tree::Meta, FORMAT_KEY, frame(Tree::Meta, FORMAT_KEY, FORMAT)));
                legacy.push(Write::put(
                    Tree::Meta,
                    COMMIT_KEY,
                    frame(Tree::Meta, COMMIT_KEY, &commit_record(0, &[0; 32])),
                ));
                guarded("framing the state database", || backend.commit(&legacy))?;
            }
        }
        let (commits, chain) = match guarded("reading the commit record", || backend.get(Tree::Meta, COMMIT_KEY))? {
            Some(v) => parse_commit(unframe(Tree::Meta, COMMIT_KEY, &v)?)?,
            None => {
                bail!("the state database has no commit record: it was corrupted; restore HOME/state from a backup")
            }
        };
        let witnessed = match seal {
            None if commits > 0 => bail!(
                "{} is missing but the state database holds {commits} commits: the seal that detects a rolled-back \
                 database is gone; restore it with the home's backup",
                seal_path.display()
            ),
            None => None,
            Some(s) => {
                let sealed_chain = maeum_tlog::unhex(&s.chain).ok().and_then(|v| <[u8; 32]>::try_from(v).ok());
                if commits < s.commits {
                    bail!(
                        "the state database was rolled back: it holds {commits} commits but its seal ({}) recorded {}; \
                         the newest {} changes are gone (a corrupted tail dropped by the storage engine, or an older \
                         backup of HOME/state). Refusing to serve from it: restore HOME/state from a backup at least as \
                         new as the seal",
                        seal_path.display(),
                        s.commits,
                        s.commits - commits
                    );
                }
                if commits == s.commits && sealed_chain != Some(chain) {
                    bail!(
                        "the state database and its seal ({}) disagree at commit {commits}: the database was replaced \
                         by a different history; restore HOME/state from the backup that goes with the seal",
                        seal_path.display()
                    );
                }
                if commits > s.commits + 1 {
                    bail!(
                        "the state database holds {commits} commits but its seal ({}) only {}: the seal is older than \
                         the database (restored from a backup?); restore the seal that goes with HOME/state",
                        seal_path.display(),
                        s.commits
                    );
                }
                s.witnessed
            }
        };
        let inner = Inner {
            full: Default::default(),
            _lock: lock,
            backend,
            seal_path,
            sealed: Mutex::new(Sealed { commits, chain, witnessed, current: false }),
        };
        {
            let mut sealed = inner.lock();
            inner.write_seal(&mut sealed)?;
        }
        Ok(Db { inner: Arc::new(inner), report: Arc::new(OpenReport { engine, commits, records, migrated }) })
    }

    /// What the open found.
    pub fn report(&self) -> &OpenReport {
        &self.report
    }

    /// The value of `key` in `tree`, checked.
    pub fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match guarded(&format!("reading tree {}", tree.name()), || self.inner.backend.get(tree, key))? {
            None => Ok(None),
            Some(v) => Ok(Some(unframe(tree, key, &v)?.to_vec())),
        }
    }

    pub fn contains(&self, tree: Tree, key: &[u8]) -> Result<bool> {
        Ok(guarded(&format!("reading tree {}", tree.name()), || self.inner.backend.get(tree, key))?.is_some())
    }

    /// Visits the checked pairs with `from <= key < to`, in key order or reversed.
    pub fn scan(&self, tree: Tree, from: Option<&[u8]>, to: Option<&[u8]>, rev: bool, f: Visit<'_>) -> Result<()> {
        guarded(&format!("reading tree {}", tree.name()), || {
            self.inner.backend.scan(tree, from, to, rev, &mut |k, v| f(k, unframe(tree, k, v)?))
        })
    }

    /// Every value of `tree`, in key order.
    pub fn values(&self, tree: Tree) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        self.scan(tree, None, None, false, &mut |_, v| {
            out.push(v.to_vec());
            Ok(true)
        })?;
        Ok(out)
    }

    /// The last pair of `tree`.
    pub fn last(&self, tree: Tree) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut out = None;
        self.scan(tree, None, None, true, &mut |k, v| {
            out = Some((k.to_vec(), v.to_vec()));
            Ok(false)
        })?;
        Ok(out)
    }

    pub fn len(&self, tree: Tree) -> Result<u64> {
        guarded(&format!("reading tree {}", tree.name()), || self.inner.backend.len(tree))
    }

    /// Applies `writes` atomically and durably, then advances the seal.
    pub fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let result = self.commit_sealed(writes);
        let full = result.as_ref().err().is_some_and(is_disk_full);
        if self.inner.full.swap(full, std::sync::atomic::Ordering::Relaxed) && result.is_ok() {
            tracing::info!("the state database accepts writes again: disk space returned");
        }
        result
    }

    /// Whether the last commit failed for lack of disk space.
    pub fn disk_full(&self) -> bool {
        self.inner.full.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn commit_sealed(&self, writes: Vec<Write>) -> Result<()> {
        // Test hook (fault-injection builds only): every commit fails as on a full disk
        // while the named file exists.
        if let Some(flag) = crate::attack::test_env("MAEUM_COORDINATOR_TEST_DISK_FULL")
            && Path::new(&flag).exists()
        {
            return Err(anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::StorageFull))
                .context("committing to the state database (test hook)"));
        }
        let mut sealed = self.inner.lock();
        if !sealed.current {
            self.inner.write_seal(&mut sealed).context("the state seal is behind (an earlier write failed)")?;
        }
        let commits = sealed.commits + 1;
        let chain = sha256(&[&sealed.chain, &batch_digest(&writes)]);
        let mut framed: Vec<Write> = writes
            .into_iter()
            .map(|w| {
                let value = w.value.map(|v| frame(w.tree, &w.key, &v));
                Write { value, ..w }
            })
            .collect();
        framed.push(Write::put(Tree::Meta, COMMIT_KEY, frame(Tree::Meta, COMMIT_KEY, &commit_record(commits, &chain))));
        guarded("committing", || self.inner.backend.commit(&framed)).context("committing to the state database")?;
        sealed.commits = commits;
        sealed.chain = chain;
        sealed.current = false;
        self.inner.write_seal(&mut sealed)
    }

    /// The newest checkpoint a site cosigned (kept in the seal).
    pub fn witnessed(&self) -> Option<Witnessed> {
        self.inner.lock().witnessed.clone()
    }

    /// Raises the witnessed checkpoint to `w` if it is larger; durable on return.
    pub fn witness(&self, w: Witnessed) -> Result<()> {
        let mut sealed = self.inner.lock();
        if sealed.witnessed.as_ref().is_some_and(|old| old.size >= w.size) {
            return Ok(());
        }
        sealed.witnessed = Some(w);
        sealed.current = false;
        self.inner.write_seal(&mut sealed)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sealed> {
        self.sealed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_seal(&self, sealed: &mut Sealed) -> Result<()> {
        let seal = Seal {
            format: SEAL_FORMAT.into(),
            engine: self.backend.kind().into(),
            commits: sealed.commits,
            chain: maeum_tlog::hex(&sealed.chain),
            witnessed: sealed.witnessed.clone(),
        };
        // INVARIANT: plain data always serialises.
        let bytes = serde_json::to_vec_pretty(&seal).expect("a seal serialises");
        write_atomically(&self.seal_path, &bytes).context("writing the state seal")?;
        sealed.current = true;
        Ok(())
    }
}

fn commit_record(commits: u64, chain: &[u8; 32]) -> Vec<u8> {
    let mut v = commits.to_be_bytes().to_vec();
    v.extend_from_slice(chain);
    v
}

fn parse_commit(v: &[u8]) -> Result<(u64, [u8; 32])> {
    if v.len() != 40 {
        return Err(anyhow!("the state database's commit record is {} bytes, not 40", v.len()));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&v[..8]);
    let mut chain = [0u8; 32];
    chain.copy_from_slice(&v[8..]);
    Ok((u64::from_be_bytes(n), chain))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u32) -> Write {
        Write::put(Tree::Jobs, format!("j-{n}"), format!("{{\"n\":{n}}}").into_bytes())
    }

    fn open(dir: &Path, engine: Engine) -> Db {
        Db::open(dir, engine).expect("open")
    }

    fn raw(dir: &Path, engine: Engine) -> Box<dyn Backend> {
        match engine {
            Engine::Sled => Box::new(SledBackend::open(dir).expect("sled")),
            Engine::Redb => Box::new(RedbBackend::open(&dir.join(REDB_FILE)).expect("redb")),
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir") {
            let e = e.expect("entry");
            let target = to.join(e.file_name());
            if e.file_type().expect("type").is_dir() {
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), target).expect("copy");
            }
        }
    }

    fn err(dir: &Path, engine: Engine) -> String {
        format!("{:#}", Db::open(dir, engine).expect_err("refused"))
    }

    #[test]
    fn records_survive_reopening_in_both_engines_and_ranges_are_ordered() {
        for engine in [Engine::Sled, Engine::Redb] {
            let home = tempfile::tempdir().expect("tempdir");
            let dir = home.path().join("state");
            {
                let db = open(&dir, engine);
                assert_eq!(db.report().engine, if engine == Engine::Sled { "sled" } else { "redb" });
                for n in 0..5 {
                    db.commit(vec![job(n), Write::put(Tree::AuditLeaves, (n as u64).to_be_bytes(), vec![n as u8; 32])])
                        .expect("commit");
                }
                db.commit(vec![Write { tree: Tree::Jobs, key: b"j-0".to_vec(), value: None }]).expect("remove");
            }
            let db = open(&dir, engine);
            assert_eq!(db.report().commits, 6, "{engine:?}");
            assert_eq!(db.get(Tree::Jobs, b"j-3").expect("get").as_deref(), Some(&b"{\"n\":3}"[..]));
            assert_eq!(db.get(Tree::Jobs, b"j-0").expect("get"), None, "removed");
            assert_eq!(db.len(Tree::AuditLeaves).expect("len"), 5);
            let mut keys = Vec::new();
            db.scan(Tree::AuditLeaves, Some(&1u64.to_be_bytes()), Some(&4u64.to_be_bytes()), true, &mut |k, _| {
                keys.push(k[7]);
                Ok(true)
            })
            .expect("scan");
            assert_eq!(keys, vec![3, 2, 1], "{engine:?}: [1, 4) in reverse");
            assert_eq!(db.last(Tree::AuditLeaves).expect("last").map(|(k, _)| k[7]), Some(4));
            assert!(db.last(Tree::Promotions).expect("last").is_none());
        }
    }

    #[test]
    fn a_flipped_byte_in_a_value_is_refused_with_its_tree_and_key() {
        for engine in [Engine::Sled, Engine::Redb] {
            let home = tempfile::tempdir().expect("tempdir");
            let dir = home.path().join("state");
            {
                let db = open(&dir, engine);
                db.commit(vec![job(1), job(2)]).expect("commit");
            }
            {
                let backend = raw(&dir, engine);
                let mut stored = backend.get(Tree::Jobs, b"j-2").expect("get").expect("there");
                let last = stored.len() - 2;
                stored[last] ^= 0x01;
                backend.commit(&[Write::put(Tree::Jobs, b"j-2", stored)]).expect("tamper");
            }
            let e = err(&dir, engine);
            assert!(e.contains("value of j-2 in tree jobs fails its checksum"), "{engine:?}: {e}");
        }
    }

    #[test]
    fn a_value_moved_to_another_key_is_refused() {
        let home = tempfile::tempdir().expect("tempdir");
        let dir = home.path().join("state");
        {
            open(&dir, Engine::Sled).commit(vec![job(1), job(2)]).expect("commit");
        }
        {
            let backend = raw(&dir, Engine::Sled);
            let one = backend.get(Tree::Jobs, b"j-1").expect("get").expect("there");
            backend.commit(&[Write::put(Tree::Jobs, b"j-2", one)]).expect("swap");
        }
        assert!(err(&dir, Engine::Sled).contains("value of j-2 in tree jobs fails its checksum"));
    }

    #[test]
    fn a_rolled_back_or_replaced_database_is_refused_and_the_crash_window_is_not() {
        for engine in [Engine::Sled, Engine::Redb] {
            let home = tempfile::tempdir().expect("tempdir");
            let dir = home.path().join("state");
            let seal = seal_path(&dir);
            let old = home.path().join("old-state");
            {
                let db = open(&dir, engine);
                db.commit(vec![job(1)]).expect("commit");
            }
            copy_dir(&dir, &old);
            let old_seal = std::fs::read(&seal).expect("seal");
            {
                let db = open(&dir, engine);
                db.commit(vec![job(2)]).expect("commit");
                db.commit(vec![job(3)]).expect("commit");
            }
            let new_seal = std::fs::read(&seal).expect("seal");
            let new = home.path().join("new-state");
            std::fs::rename(&dir, &new).expect("move");
            // The older directory under the newer seal: two commits are gone.
            copy_dir(&old, &dir);
            let e = err(&dir, engine);
            assert!(e.contains("was rolled back: it holds 1 commits but its seal"), "{engine:?}: {e}");
            assert!(e.contains("the newest 2 changes are gone"), "{e}");
            // Another history of the same length: the chains differ.
            std::fs::remove_dir_all(&dir).expect("rm");
            std::fs::remove_file(&seal).expect("rm seal");
            {
                let db = open(&dir, engine);
                db.commit(vec![job(1)]).expect("commit");
                db.commit(vec![Write::put(Tree::Jobs, b"j-9", b"{}".to_vec())]).expect("commit");
                db.commit(vec![job(3)]).expect("commit");
            }
            std::fs::write(&seal, &new_seal).expect("seal");
            let e = err(&dir, engine);
            assert!(e.contains("disagree at commit 3"), "{engine:?}: {e}");
            // A seal two commits behind (an old backup of the seal alone) is refused; one
            // behind is the kill between a commit and its seal, and is accepted.
            std::fs::remove_dir_all(&dir).expect("rm");
            std::fs::rename(&new, &dir).expect("move back");
            std::fs::write(&seal, &old_seal).expect("seal");
            assert!(err(&dir, engine).contains("the seal is older than the database"));
            // A missing seal with commits in the database.
            std::fs::remove_file(&seal).expect("rm seal");
            assert!(err(&dir, engine).contains("is missing but the state database holds 3 commits"));
        }
    }

    #[test]
    fn the_kill_between_a_commit_and_its_seal_is_accepted() {
        let home = tempfile::tempdir().expect("tempdir");
        let dir = home.path().join("state");
        let seal = seal_path(&dir);
        {
            open(&dir, Engine::Sled).commit(vec![job(1)]).expect("commit");
        }
        let before = std::fs::read(&seal).expect("seal");
        {
            open(&dir, Engine::Sled).commit(vec![job(2)]).expect("commit");
        }
        std::fs::write(&seal, before).expect("the seal of one commit ago");
        let db = open(&dir, Engine::Sled);
        assert_eq!(db.report().commits, 2);
        drop(db);
        let resealed: Seal = serde_json::from_slice(&std::fs::read(&seal).expect("seal")).expect("json");
        assert_eq!(resealed.commits, 2, "the seal is brought up to date at open");
    }

    #[test]
    fn a_home_from_before_checksums_is_framed_once_and_keeps_its_counters() {
        let home = tempfile::tempdir().expect("tempdir");
        let dir = home.path().join("state");
        {
            let backend = raw(&dir, Engine::Sled);
            backend
                .commit(&[job(7), Write::put(Tree::Meta, b"job", 41u64.to_be_bytes().to_vec())])
                .expect("legacy records");
        }
        let db = open(&dir, Engine::Sled);
        assert!(db.report().migrated);
        assert_eq!(db.report().records, 2);
        assert_eq!(db.get(Tree::Jobs, b"j-7").expect("get").as_deref(), Some(&b"{\"n\":7}"[..]));
        assert_eq!(db.get(Tree::Meta, b"job").expect("get"), Some(41u64.to_be_bytes().to_vec()));
        drop(db);
        assert!(!open(&dir, Engine::Sled).report().migrated, "only once");
        // With a seal present, an unframed database is a replaced one, not an old one.
        std::fs::remove_dir_all(&dir).expect("rm");
        raw(&dir, Engine::Sled).commit(&[job(7)]).expect("legacy");
        assert!(err(&dir, Engine::Sled).contains("lost its format record"));
    }

    #[test]
    fn the_witnessed_checkpoint_only_rises_and_survives_reopening() {
        let home = tempfile::tempdir().expect("tempdir");
        let dir = home.path().join("state");
        {
            let db = open(&dir, Engine::Redb);
            let w = |size| Witnessed { size, root: "ab".repeat(32), site: "a".into() };
            db.witness(w(5)).expect("witness");
            db.witness(w(3)).expect("witness");
            assert_eq!(db.witnessed().map(|w| w.size), Some(5));
        }
        assert_eq!(open(&dir, Engine::Sled).witnessed().map(|w| w.size), Some(5), "the engine on disk wins");
    }

    #[test]
    fn a_seal_that_cannot_be_written_fails_the_commit_and_heals_on_the_next() {
        let home = tempfile::tempdir().expect("tempdir");
        let dir = home.path().join("state");
        let db = open(&dir, Engine::Sled);
        let seal = seal_path(&dir);
        // A directory where the temporary seal goes makes the write fail.
        let tmp = seal.with_extension("seal.tmp");
        std::fs::create_dir(&tmp).expect("block");
        let e = db.commit(vec![job(1)]).expect_err("the seal cannot be written");
        assert!(format!("{e:#}").contains("writing the state seal"), "{e:#}");
        assert!(db.commit(vec![job(2)]).is_err(), "no commit while the seal is behind");
        std::fs::remove_dir(&tmp).expect("unblock");
        db.commit(vec![job(2)]).expect("healed");
        drop(db);
        let db = open(&dir, Engine::Sled);
        assert_eq!(db.report().commits, 2);
        assert!(db.get(Tree::Jobs, b"j-1").expect("get").is_some(), "the first commit reached the database");
    }
}
