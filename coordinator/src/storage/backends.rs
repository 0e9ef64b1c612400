//! The two engines behind [`super::Backend`]: sled (the consortium's stack, the
//! default) and redb (the alternative the crash-loop trial compares it with). Both
//! store the framed bytes [`super::Db`] hands them and nothing else.

use std::ops::Bound;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Backend, Tree, Visit, Write};

/// sled 0.34: one sled tree per [`Tree`], a multi-tree transaction per commit, then
/// `flush` (sled otherwise persists in the background).
/// sled's page cache. Its default is 1 GiB, which a long-lived coordinator's database
/// (years of audit log) would fill, against a memory goal of 2 x the model + a
/// constant; reads beyond it come from the OS page cache.
pub const SLED_CACHE_BYTES: u64 = 64 << 20;

#[derive(Debug)]
pub struct SledBackend {
    db: sled::Db,
    trees: Vec<sled::Tree>,
}

impl SledBackend {
    pub fn open(dir: &Path) -> Result<SledBackend> {
        // `HOME/state.lock` already keeps other processes out, so sled's own lock can
        // only be held by a sled instance of this process that is still shutting down
        // (its flusher thread lets go of the file a moment after the drop): wait for it.
        let mut tries = 0;
        let db = loop {
            match sled::Config::new().path(dir).cache_capacity(SLED_CACHE_BYTES).open() {
                Err(sled::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => {
                    break other
                        .with_context(|| format!("sled could not open the state database {}", dir.display()))?;
                }
            }
        };
        let trees = Tree::ALL
            .iter()
            .map(|t| db.open_tree(t.name()).with_context(|| format!("opening tree {}", t.name())))
            .collect::<Result<_>>()?;
        Ok(SledBackend { db, trees })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        &self.trees[t.index()]
    }
}

fn bounds<'a>(from: Option<&'a [u8]>, to: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (from.map_or(Bound::Unbounded, Bound::Included), to.map_or(Bound::Unbounded, Bound::Excluded))
}

impl Backend for SledBackend {
    fn kind(&self) -> &'static str {
        "sled"
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(tree).get(key).with_context(|| format!("reading tree {}", tree.name()))?.map(|v| v.to_vec()))
    }

    fn scan(&self, tree: Tree, from: Option<&[u8]>, to: Option<&[u8]>, rev: bool, f: Visit<'_>) -> Result<()> {
        if from.zip(to).is_some_and(|(a, b)| a >= b) {
            return Ok(());
        }
        let range = self.tree(tree).range::<&[u8], _>(bounds(from, to));
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if rev { Box::new(range.rev()) } else { Box::new(range) };
        for item in iter {
            let (k, v) = item.with_context(|| format!("reading tree {}", tree.name()))?;
            if !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn len(&self, tree: Tree) -> Result<u64> {
        Ok(self.tree(tree).len() as u64)
    }

    fn commit(&self, writes: &[Write]) -> Result<()> {
        use sled::Transactional;
        let trees: &[sled::Tree] = &self.trees;
        trees
            .transaction(|view| {
                for w in writes {
                    let t = &view[w.tree.index()];
                    match &w.value {
                        Some(v) => t.insert(w.key.as_slice(), v.as_slice())?,
                        None => t.remove(w.key.as_slice())?,
                    };
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| anyhow!("sled transaction: {e:?}"))?;
        self.db.flush().context("flushing the state database")?;
        Ok(())
    }
}

/// redb: one table per [`Tree`] (`&[u8]` → `&[u8]`), one write transaction per commit
/// with redb's default immediate durability.
#[derive(Debug)]
pub struct RedbBackend {
    db: redb::Database,
}

fn table(t: Tree) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(t.name())
}

impl RedbBackend {
    pub fn open(path: &Path) -> Result<RedbBackend> {
        let db = redb::Database::create(path)
            .with_context(|| format!("redb could not open the state database {}", path.display()))?;
        // Every table exists from the start, so readers never meet a missing one.
        let txn = db.begin_write().context("opening a redb write transaction")?;
        for t in Tree::ALL {
            txn.open_table(table(t)).with_context(|| format!("creating table {}", t.name()))?;
        }
        txn.commit().context("creating the redb tables")?;
        Ok(RedbBackend { db })
    }
}

impl Backend for RedbBackend {
    fn kind(&self) -> &'static str {
        "redb"
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read().context("opening a redb read transaction")?;
        let t = txn.open_table(table(tree)).with_context(|| format!("opening table {}", tree.name()))?;
        Ok(t.get(key).with_context(|| format!("reading table {}", tree.name()))?.map(|v| v.value().to_vec()))
    }

    fn scan(&self, tree: Tree, from: Option<&[u8]>, to: Option<&[u8]>, rev: bool, f: Visit<'_>) -> Result<()> {
        if from.zip(to).is_some_and(|(a, b)| a >= b) {
            return Ok(());
        }
        let txn = self.db.begin_read().context("opening a redb read transaction")?;
        let t = txn.open_table(table(tree)).with_context(|| format!("opening table {}", tree.name()))?;
        let range = t.range(bounds(from, to)).with_context(|| format!("reading table {}", tree.name()))?;
        let iter: Box<dyn Iterator<Item = _>> = if rev { Box::new(range.rev()) } else { Box::new(range) };
        for item in iter {
            let (k, v) = item.with_context(|| format!("reading table {}", tree.name()))?;
            if !f(k.value(), v.value())? {
                break;
            }
        }
        Ok(())
    }

    fn len(&self, tree: Tree) -> Result<u64> {
        let txn = self.db.begin_read().context("opening a redb read transaction")?;
        let t = txn.open_table(table(tree)).with_context(|| format!("opening table {}", tree.name()))?;
        t.len().with_context(|| format!("reading table {}", tree.name()))
    }

    fn commit(&self, writes: &[Write]) -> Result<()> {
        let txn = self.db.begin_write().context("opening a redb write transaction")?;
        for w in writes {
            let mut t = txn.open_table(table(w.tree)).with_context(|| format!("opening table {}", w.tree.name()))?;
            match &w.value {
                Some(v) => t.insert(w.key.as_slice(), v.as_slice()).map(drop),
                None => t.remove(w.key.as_slice()).map(drop),
            }
            .with_context(|| format!("writing table {}", w.tree.name()))?;
        }
        txn.commit().context("committing to redb")?;
        Ok(())
    }
}
