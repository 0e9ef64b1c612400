//! Content-addressed blob store: `DIR/<sha256 hex>`, written atomically and fsynced
//! before its digest is recorded anywhere.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use maeum_protocols::wire::{CHUNK_SIZE, Digest};

/// Blobs whose piece digests are kept ([`Blobs::piece_digests`]): a job's current model
/// and a few before it.
const PIECES_KEPT: usize = 8;

/// Blobs' piece digests, newest last.
type Pieces = Vec<(Digest, Arc<Vec<Digest>>)>;

#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
    pieces: Arc<Mutex<Pieces>>,
}

impl Blobs {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir: dir.to_owned(), pieces: Arc::default() })
    }

    /// The SHA-256 of each `CHUNK_SIZE` piece of a blob (the last may be shorter), which
    /// every download chunk carries. Taken on a blob's first download, together with a
    /// check of the whole blob against its name, and kept for the latest
    /// [`PIECES_KEPT`] blobs: a model served to N sites is hashed once, not N times.
    pub fn piece_digests(&self, digest: &Digest) -> Result<Arc<Vec<Digest>>> {
        // Held while a first download hashes the blob: the others wait for its result.
        let mut kept = self.pieces.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, p)) = kept.iter().find(|(d, _)| d == digest) {
            return Ok(p.clone());
        }
        let path = self.path(digest);
        let mut file = std::fs::File::open(&path).with_context(|| format!("reading blob {}", path.display()))?;
        let (whole, pieces, _) = hash_pieces(&mut file).with_context(|| format!("reading blob {}", path.display()))?;
        anyhow::ensure!(whole == *digest, "blob {} is corrupt: its content does not match its name", path.display());
        let pieces = Arc::new(pieces);
        keep(&mut kept, *digest, pieces.clone());
        Ok(pieces)
    }

    fn keep_pieces(&self, digest: Digest, pieces: Arc<Vec<Digest>>) {
        keep(&mut self.pieces.lock().unwrap_or_else(std::sync::PoisonError::into_inner), digest, pieces);
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

    /// Stores the file at `src` (on the same file system: `HOME`) by moving it, hashing
    /// it as it is read in 1 MiB pieces: an O(model) blob is never held in memory.
    /// Returns its digest and size. The file is fsynced before it takes its name.
    pub fn put_file(&self, src: &Path) -> Result<(Digest, u64)> {
        let mut file = std::fs::File::open(src).with_context(|| format!("reading {}", src.display()))?;
        let (digest, pieces, size) = hash_pieces(&mut file).with_context(|| format!("reading {}", src.display()))?;
        // Its first download needs the piece digests: taken in the same read.
        self.keep_pieces(digest, Arc::new(pieces));
        let path = self.path(&digest);
        if path.is_file() {
            std::fs::remove_file(src).with_context(|| format!("removing {}", src.display()))?;
        } else {
            file.sync_all().with_context(|| format!("syncing {}", src.display()))?;
            if std::fs::rename(src, &path).is_err() {
                // Another file system after all: copy, then make the copy durable.
                let tmp = self.dir.join(format!(".copy-{}.tmp", digest.hex()));
                std::fs::copy(src, &tmp).with_context(|| format!("copying {} into the store", src.display()))?;
                std::fs::File::open(&tmp).and_then(|f| f.sync_all())?;
                std::fs::rename(&tmp, &path).with_context(|| format!("naming {}", path.display()))?;
                let _ = std::fs::remove_file(src);
            }
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", self.dir.display()))?;
        }
        Ok((digest, size))
    }

    /// Stores `words` as little-endian bytes (an unmasked aggregate), written piece by
    /// piece to a temporary file and moved in by [`Blobs::put_file`]: no byte copy of
    /// the vector is made.
    pub fn put_words(&self, words: &[u32]) -> Result<Digest> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".words-{}-{n}.tmp", std::process::id()));
        maeum_models::write_file_with(&tmp, false, |w| write_words_le(w, words))
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(self.put_file(&tmp)?.0)
    }

    /// Removes a blob; returns its size, or `None` when there was none.
    pub fn remove(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.path(digest);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(Some(size)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
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

/// Keeps a blob's piece digests among the latest [`PIECES_KEPT`].
fn keep(kept: &mut Pieces, digest: Digest, pieces: Arc<Vec<Digest>>) {
    kept.retain(|(d, _)| *d != digest);
    if kept.len() == PIECES_KEPT {
        kept.remove(0);
    }
    kept.push((digest, pieces));
}

/// Reads `file` to its end in `CHUNK_SIZE` pieces: the whole file's SHA-256, each piece's,
/// and the size.
fn hash_pieces(file: &mut std::fs::File) -> std::io::Result<(Digest, Vec<Digest>, u64)> {
    let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK_SIZE];
    let (mut pieces, mut size) = (Vec::new(), 0u64);
    loop {
        let n = read_full(file, &mut buf)?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        pieces.push(Digest::of(&buf[..n]));
        size += n as u64;
    }
    let mut sha = [0u8; 32];
    sha.copy_from_slice(whole.finish().as_ref());
    Ok((Digest(sha), pieces, size))
}

/// Reads into `buf` until it is full or the file ends; returns the bytes read.
pub(crate) fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads up to `n` bytes (fewer only at the end of the file) into a new buffer that is
/// never zeroed first: the kernel writes the bytes straight into fresh memory.
pub(crate) fn read_chunk(file: &mut std::fs::File, n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(n);
    file.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Writes `words` little-endian, 64 Ki words at a time.
pub fn write_words_le(out: &mut dyn std::io::Write, words: &[u32]) -> std::io::Result<()> {
    for chunk in words.chunks(1 << 16) {
        out.write_all(&chunk.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_digests_are_each_chunks_and_a_corrupt_blob_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Blobs::open(dir.path()).expect("open");
        let bytes: Vec<u8> = (0..(2 * CHUNK_SIZE + 5)).map(|i| (i % 251) as u8).collect();
        let d = b.put(&bytes).expect("put");
        let pieces = b.piece_digests(&d).expect("pieces");
        let want: Vec<_> = bytes.chunks(CHUNK_SIZE).map(Digest::of).collect();
        assert_eq!(*pieces, want);
        assert!(std::sync::Arc::ptr_eq(&pieces, &b.piece_digests(&d).expect("kept")), "hashed once");
        let other = b.put(b"another blob").expect("put");
        std::fs::write(b.path(&other), b"altered on disk").expect("alter");
        let err = b.piece_digests(&other).expect_err("corrupt").to_string();
        assert!(err.contains("is corrupt"), "{err}");
    }

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

    #[test]
    fn files_and_words_are_stored_by_content_without_a_copy_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Blobs::open(&dir.path().join("blobs")).expect("open");
        let words: Vec<u32> = (0..200_000u32).map(|i| i.wrapping_mul(0x9e37_79b1)).collect();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let d = b.put_words(&words).expect("words");
        assert_eq!(d, Digest::of(&bytes));
        assert_eq!(b.get(&d).expect("get"), bytes);
        let src = dir.path().join("model.tmp");
        std::fs::write(&src, b"a model").expect("write");
        assert_eq!(b.put_file(&src).expect("file"), (Digest::of(b"a model"), 7));
        assert!(!src.exists(), "moved into the store");
        std::fs::write(&src, b"a model").expect("write");
        assert_eq!(b.put_file(&src).expect("again").0, Digest::of(b"a model"), "idempotent");
        assert!(!src.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
