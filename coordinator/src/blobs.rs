//! Content-addressed blob store: `DIR/<sha256 hex>`, written atomically and fsynced
//! before its digest is recorded anywhere.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use maeum_protocols::wire::Digest;

#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir: dir.to_owned() })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Stores `bytes`; returns their digest. Idempotent.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        let path = self.path(&digest);
        if !path.is_file() {
            maeum_models::write_atomic(&path, bytes).with_context(|| format!("writing blob {}", path.display()))?;
        }
        Ok(digest)
    }

    pub fn get(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.path(digest);
        let bytes = std::fs::read(&path).with_context(|| format!("reading blob {}", path.display()))?;
        anyhow::ensure!(
            Digest::of(&bytes) == *digest,
            "blob {} is corrupt: its content does not match its name",
            path.display()
        );
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_named_by_content_and_checked_on_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Blobs::open(dir.path()).expect("open");
        let d = b.put(b"model bytes").expect("put");
        assert_eq!(d, Digest::of(b"model bytes"));
        assert_eq!(b.put(b"model bytes").expect("idempotent"), d);
        assert_eq!(b.get(&d).expect("get"), b"model bytes");
        std::fs::write(b.path(&d), b"tampered").expect("tamper");
        let e = b.get(&d).expect_err("corruption is detected");
        assert!(e.to_string().contains("corrupt"), "{e}");
        assert!(!b.contains(&Digest::of(b"other")));
    }
}
