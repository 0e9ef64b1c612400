//! The encoders a process runs, found by name under one folder, and the site's cache
//! of sentence vectors.

use std::path::{Path, PathBuf};

use super::{BATCH, Encoder, EncoderError, EncoderSpec, TopLayers, check_known};

/// Where a site home keeps its cache of record vectors (relative to the home).
pub const SITE_VECTOR_CACHE: &str = "cache/vectors";

/// The encoders a process may run, found by name under one folder (`DIR/NAME/`), loaded
/// once and checked against the digests the model names, with an optional on-disk cache
/// of sentence vectors so a site embeds each record once per encoder.
///
/// The cache holds vectors derived from records: it lives in the site's home, is
/// created owner-only, and never leaves the site. A record is keyed by the SHA-256 of its
/// text; one file per encoder (`<weights digest>-<tokenizer digest>-<max_tokens>.vec`,
/// digests shortened to 16 and 8 hex digits) of fixed-size entries: 32 bytes of key,
/// then `dim` little-endian f32. Entries are appended and fsynced; a torn last entry
/// (a crash while appending) is dropped when the file is next opened.
pub struct Encoders {
    dir: PathBuf,
    cache: Option<PathBuf>,
    loaded: std::collections::HashMap<String, Encoder>,
    /// [`Encoder::top_layers`] by (encoder, count), shared by everything prepared here.
    tops: std::collections::HashMap<(String, usize), std::sync::Arc<TopLayers>>,
}

impl std::fmt::Debug for Encoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoders").field("dir", &self.dir).field("cache", &self.cache).finish_non_exhaustive()
    }
}

impl Encoders {
    /// Encoders under `dir`; sentence vectors cached under `cache` when given.
    pub fn new(dir: impl Into<PathBuf>, cache: Option<PathBuf>) -> Self {
        Self { dir: dir.into(), cache, loaded: Default::default(), tops: Default::default() }
    }

    /// The encoder `spec` names (a catalogue entry), loaded and digest-checked on first
    /// use.
    pub fn get(&mut self, spec: &EncoderSpec) -> Result<&Encoder, EncoderError> {
        check_known(spec)?;
        let key = spec.name.clone();
        if !self.loaded.contains_key(&key) {
            let dir = self.dir.join(&spec.name);
            if !dir.join(spec.format().weights()).exists() {
                return Err(EncoderError::Format {
                    path: dir,
                    detail: format!(
                        "encoder {:?} is not installed here (install it with `maeum-site encoders add DIR`; \
                         `python3 scripts/fetch_encoder.py --encoder {}` fetches it)",
                        spec.name, spec.name
                    ),
                });
            }
            let enc = Encoder::load(&dir, spec)?;
            self.loaded.insert(key.clone(), enc);
        }
        // INVARIANT: inserted above when absent.
        #[allow(clippy::unwrap_used)]
        Ok(self.loaded.get(&key).unwrap())
    }

    /// The top `k` layers of `spec`'s encoder, loaded once: data prepared with the same
    /// `Encoders` shares them (and can be joined).
    pub fn top_layers(&mut self, spec: &EncoderSpec, k: usize) -> Result<std::sync::Arc<TopLayers>, EncoderError> {
        let key = (spec.name.clone(), k);
        if let Some(t) = self.tops.get(&key) {
            return Ok(t.clone());
        }
        let top = std::sync::Arc::new(self.get(spec)?.top_layers(k));
        self.tops.insert(key, top.clone());
        Ok(top)
    }

    /// Sentence vectors of `texts` (row-major), from the cache where present; the rest
    /// are computed and appended to the cache. `progress(done, total)` counts texts.
    pub fn embed(
        &mut self,
        spec: &EncoderSpec,
        texts: &[&str],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<f32>, EncoderError> {
        check_known(spec)?;
        let dim = spec.dim;
        let cache_path = self.cache.as_ref().map(|c| {
            c.join(format!(
                "{}-{}-{}.vec",
                &spec.sha256[..spec.sha256.len().min(16)],
                &spec.tokenizer_sha256[..spec.tokenizer_sha256.len().min(8)],
                spec.max_tokens
            ))
        });
        let mut cached = match &cache_path {
            Some(p) => VectorCache::open(p, dim)?,
            None => VectorCache::default(),
        };
        let keys: Vec<[u8; 32]> = texts
            .iter()
            .map(|t| {
                let d = ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
                let mut k = [0u8; 32];
                k.copy_from_slice(d.as_ref());
                k
            })
            .collect();
        let mut missing: Vec<usize> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, k) in keys.iter().enumerate() {
            if !cached.map.contains_key(k) && seen.insert(*k) {
                missing.push(i);
            }
        }
        let total = texts.len();
        let hits = total - missing.len();
        progress(hits, total);
        if !missing.is_empty() {
            // load() checked the width against config.json.
            let enc = self.get(spec)?;
            let subset: Vec<&str> = missing.iter().map(|&i| texts[i]).collect();
            let ids = enc.tokenize(&subset)?;
            // Embed (and persist) in slices so an interrupted run keeps what it did.
            const SLICE: usize = BATCH * 16;
            for (n, (rows, ids)) in missing.chunks(SLICE).zip(ids.chunks(SLICE)).enumerate() {
                let base = hits + n * SLICE;
                let vectors = enc.embed_ids(ids, &mut |d| progress(base + d, total));
                let new: Vec<([u8; 32], &[f32])> =
                    rows.iter().zip(vectors.chunks_exact(dim)).map(|(&i, v)| (keys[i], v)).collect();
                if let Some(p) = &cache_path {
                    VectorCache::append(p, &new)?;
                }
                for (k, v) in new {
                    cached.map.insert(k, v.to_vec());
                }
            }
        }
        let mut out = Vec::with_capacity(total * dim);
        for k in &keys {
            // INVARIANT: every key was cached or computed above.
            #[allow(clippy::unwrap_used)]
            out.extend_from_slice(cached.map.get(k).unwrap());
        }
        Ok(out)
    }
}

#[derive(Default)]
struct VectorCache {
    map: std::collections::HashMap<[u8; 32], Vec<f32>>,
}

impl VectorCache {
    fn open(path: &Path, dim: usize) -> Result<Self, EncoderError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(error) => return Err(EncoderError::Io { path: path.to_owned(), error }),
        };
        let entry = 32 + 4 * dim;
        let whole = bytes.len() / entry * entry;
        if whole != bytes.len() {
            // A torn append: keep the whole entries.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|error| EncoderError::Io { path: path.to_owned(), error })?;
            f.set_len(whole as u64).map_err(|error| EncoderError::Io { path: path.to_owned(), error })?;
            tracing::warn!(path = %path.display(), dropped = bytes.len() - whole, "dropped a torn entry from the vector cache");
        }
        let mut map = std::collections::HashMap::new();
        for e in bytes[..whole].chunks_exact(entry) {
            let mut k = [0u8; 32];
            k.copy_from_slice(&e[..32]);
            let v: Vec<f32> = e[32..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(EncoderError::Format {
                    path: path.to_owned(),
                    detail: "a cached vector holds a NaN or infinite value; delete the file to recompute".into(),
                });
            }
            map.insert(k, v);
        }
        Ok(Self { map })
    }

    fn append(path: &Path, entries: &[([u8; 32], &[f32])]) -> Result<(), EncoderError> {
        use std::io::Write;
        let io = |error| EncoderError::Io { path: path.to_owned(), error };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(path).map_err(io)?;
        let mut buf = Vec::with_capacity(entries.len() * (32 + 4 * entries.first().map_or(0, |e| e.1.len())));
        for (k, v) in entries {
            buf.extend_from_slice(k);
            v.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
        }
        f.write_all(&buf).map_err(io)?;
        f.sync_all().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::known;

    #[test]
    fn only_the_catalogue_s_encoders_run_whatever_a_header_says() {
        let real = known("all-minilm-l6-v2").expect("known");
        check_known(&real).expect("the catalogue's own entry");
        let cache = std::env::temp_dir().join(format!("maeum-enc-test-{}", std::process::id()));
        let mut store = Encoders::new("/nonexistent", Some(cache.clone()));
        // Digests that are not hex (a byte slice of them would split a character), a name
        // that is a path, another window: refused before any file is opened.
        for crafted in [
            EncoderSpec { sha256: "é".repeat(40), ..real.clone() },
            EncoderSpec { name: "../../etc".into(), ..real.clone() },
            EncoderSpec { max_tokens: 512, ..real.clone() },
            EncoderSpec { dim: 1 << 40, ..real.clone() },
        ] {
            let err = store.embed(&crafted, &["a record"], &mut |_, _| {}).expect_err("refused");
            assert!(
                err.to_string().contains("is not one this build runs (known: all-minilm-l6-v2, multilingual-e5-small)"),
                "{err}"
            );
            assert!(store.get(&crafted).is_err());
        }
        assert!(!cache.exists(), "nothing was written");
    }
}
