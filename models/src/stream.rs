//! Model files streamed: a safetensors file is written from, and read into, the flat
//! parameter vector directly, without a second copy of its bytes in memory. At the job
//! limit (2^28 parameters, 1 GiB) a copy is what decides whether the coordinator's commit
//! and a site's load fit (`docs/benchmarks.md#an-adapter-sized-job`).
//!
//! The writer's bytes are those of `safetensors::serialize` with the header's keys sorted
//! (tensors' data in name order, the header padded with spaces to 8 bytes), so the same
//! parameters and metadata always give the same file and digest. The reader checks the
//! header as `safetensors` does (UTF-8 JSON, every tensor `F32` with
//! `data_offsets` that tile the data exactly, nothing left over) before reading a value.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::params::{FlatParams, Layout, ParamsError};

/// The largest header `safetensors` reads (100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Values converted per write or read: 1 MiB of bytes.
const BLOCK: usize = 1 << 18;

/// Writes `params` as safetensors with `metadata` (plus `maeum.layout_digest`) in the header.
pub fn write(params: &FlatParams, metadata: HashMap<String, String>, out: &mut dyn Write) -> std::io::Result<()> {
    let invalid = |detail: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, detail);
    let mut meta: BTreeMap<String, String> = metadata.into_iter().collect();
    meta.insert("maeum.layout_digest".into(), params.layout().digest().to_string());
    let mut tensors: Vec<(&str, &[usize], &[f32])> =
        params.tensors().map(|(t, v)| (t.name.as_str(), t.shape.as_slice(), v)).collect();
    // safetensors lays the data out by dtype, then name; every tensor here is F32.
    tensors.sort_by_key(|(name, ..)| *name);
    if let Some(w) = tensors.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(invalid(format!("the layout names tensor {:?} twice", w[0].0)));
    }
    if tensors.iter().any(|(name, ..)| *name == "__metadata__") {
        return Err(invalid("a tensor may not be named \"__metadata__\"".into()));
    }
    let mut header = BTreeMap::new();
    header.insert("__metadata__".to_string(), serde_json::json!(meta));
    let mut offset = 0usize;
    for (name, shape, values) in &tensors {
        let end = offset + values.len() * 4;
        header.insert(
            (*name).to_string(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| invalid(e.to_string()))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    let mut bytes = Vec::with_capacity(BLOCK * 4);
    for (_, _, values) in tensors {
        for block in values.chunks(BLOCK) {
            bytes.clear();
            bytes.extend(block.iter().flat_map(|v| v.to_le_bytes()));
            out.write_all(&bytes)?;
        }
    }
    Ok(())
}

/// A tensor as a safetensors header describes it.
#[derive(Debug)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// A safetensors file whose header was read and checked; its data is read by [`Reader::read`].
#[derive(Debug)]
pub struct Reader {
    path: PathBuf,
    file: std::fs::File,
    data_start: u64,
    entries: HashMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl Reader {
    /// Opens `path` and checks its header.
    pub fn open(path: &Path) -> Result<Self, ParamsError> {
        let io = |error: std::io::Error| ParamsError::Io { path: path.to_owned(), error };
        let format = |detail: String| ParamsError::Format { path: path.to_owned(), detail };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| format("shorter than a header".into()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || n.saturating_add(8) > len {
            return Err(format(format!("a header of {n} bytes does not fit the file's {len}")));
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact(&mut text).map_err(io)?;
        let text = std::str::from_utf8(&text).map_err(|e| format(format!("header: {e}")))?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format(format!("header: {e}")))?;
        let mut metadata = HashMap::new();
        let mut entries = HashMap::new();
        for (key, value) in header {
            if key == "__metadata__" {
                metadata = serde_json::from_value(value).map_err(|e| format(format!("__metadata__: {e}")))?;
                continue;
            }
            let bad = |detail: String| format(format!("tensor {key:?}: {detail}"));
            let dtype = value.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype".into()))?;
            let shape: Vec<usize> = value
                .get("shape")
                .map(|s| serde_json::from_value(s.clone()))
                .ok_or_else(|| bad("no shape".into()))?
                .map_err(|e| bad(format!("shape: {e}")))?;
            let (start, end): (u64, u64) = value
                .get("data_offsets")
                .map(|s| serde_json::from_value(s.clone()))
                .ok_or_else(|| bad("no data_offsets".into()))?
                .map_err(|e| bad(format!("data_offsets: {e}")))?;
            let entry = Entry { dtype: dtype.to_string(), shape, start, end };
            entries.insert(key, entry);
        }
        // The tensors tile the data: in offset order, each starts where the last ended,
        // each as long as its shape says, and the last ends at the end of the file.
        let mut order: Vec<(&String, &Entry)> = entries.iter().collect();
        order.sort_by_key(|(_, e)| (e.start, e.end));
        let mut at = 0u64;
        for (name, e) in order {
            let bad = |detail: String| format(format!("tensor {name:?}: {detail}"));
            if e.start != at || e.end < e.start {
                return Err(bad(format!("data_offsets [{}, {}] do not follow on from {at}", e.start, e.end)));
            }
            let size = dtype_size(&e.dtype).ok_or_else(|| bad(format!("unknown dtype {:?}", e.dtype)))?;
            let bytes = e
                .shape
                .iter()
                .try_fold(size, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| bad("its shape overflows".into()))?;
            if e.end - e.start != bytes {
                return Err(bad(format!(
                    "shape {:?} needs {bytes} bytes, data_offsets give {}",
                    e.shape,
                    e.end - e.start
                )));
            }
            at = e.end;
        }
        if at != len - 8 - n {
            return Err(format(format!("the tensors hold {at} bytes of data, the file has {}", len - 8 - n)));
        }
        Ok(Reader { path: path.to_owned(), file, data_start: 8 + n, entries, metadata })
    }

    /// The header's `__metadata__`.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Reads the parameters of `layout`: the file must hold exactly its tensors, each
    /// `F32` of the layout's shape.
    pub fn read(mut self, layout: &Layout) -> Result<(FlatParams, HashMap<String, String>), ParamsError> {
        let path = self.path.clone();
        if self.entries.len() != layout.tensors.len() {
            let detail = format!("{} tensors, the layout has {}", self.entries.len(), layout.tensors.len());
            return Err(ParamsError::Format { path, detail });
        }
        for spec in &layout.tensors {
            let e = self
                .entries
                .get(&spec.name)
                .ok_or_else(|| ParamsError::MissingTensor { path: path.clone(), name: spec.name.clone() })?;
            let bad = |detail: String| ParamsError::Tensor { path: path.clone(), name: spec.name.clone(), detail };
            if e.dtype != "F32" {
                return Err(bad(format!("dtype {}, expected F32", e.dtype)));
            }
            if e.shape != spec.shape {
                return Err(bad(format!("shape {:?}, expected {:?}", e.shape, spec.shape)));
            }
        }
        // Every tensor matched and the tensors tile the file: the layout's size is
        // bounded by the file's, so this allocation is too.
        let mut values = vec![0f32; layout.numel()];
        let mut bytes = vec![0u8; BLOCK * 4];
        let mut at = 0;
        for spec in &layout.tensors {
            let start = self.data_start + self.entries[&spec.name].start;
            self.file.seek(SeekFrom::Start(start)).map_err(|error| ParamsError::Io { path: path.clone(), error })?;
            for block in values[at..at + spec.numel()].chunks_mut(BLOCK) {
                let buf = &mut bytes[..block.len() * 4];
                self.file.read_exact(buf).map_err(|error| ParamsError::Io { path: path.clone(), error })?;
                for (v, b) in block.iter_mut().zip(buf.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            at += spec.numel();
        }
        Ok((FlatParams::new(layout.clone(), values)?, self.metadata))
    }
}

/// Bytes per element of a safetensors dtype.
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::TensorSpec;
    use rand::{Rng, SeedableRng};

    fn layout() -> Layout {
        Layout::new(vec![
            TensorSpec { name: "z.weight".into(), shape: vec![3, 5] },
            TensorSpec { name: "a.bias".into(), shape: vec![5] },
            TensorSpec { name: "m.scalar".into(), shape: vec![] },
        ])
    }

    fn params() -> FlatParams {
        FlatParams::new(layout(), (0..21).map(|i| i as f32 * 0.25 - 2.0).collect()).expect("valid")
    }

    /// `safetensors::serialize` with the header's keys sorted: what the writer must equal.
    fn oracle(p: &FlatParams, meta: HashMap<String, String>) -> Vec<u8> {
        use safetensors::tensor::{Dtype, TensorView};
        let mut meta = meta;
        meta.insert("maeum.layout_digest".into(), p.layout().digest().to_string());
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = p
            .tensors()
            .map(|(t, s)| (t.name.clone(), s.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone()))
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(n, b, shape)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), b).expect("view")))
            .collect();
        let raw = safetensors::serialize(views, Some(meta)).expect("serialize");
        let n = u64::from_le_bytes(raw[..8].try_into().expect("8")) as usize;
        let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&raw[8..8 + n]).expect("json");
        let mut json = serde_json::to_vec(&header).expect("json");
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.extend_from_slice(&raw[8 + n..]);
        out
    }

    fn meta() -> HashMap<String, String> {
        (0..5).map(|i| (format!("k{i}"), format!("v{i}"))).collect()
    }

    #[test]
    fn the_writer_makes_safetensors_own_bytes_with_a_sorted_header() {
        let mut out = Vec::new();
        write(&params(), meta(), &mut out).expect("write");
        assert_eq!(out, oracle(&params(), meta()));
        let st = safetensors::SafeTensors::deserialize(&out).expect("safetensors reads it");
        assert_eq!(st.tensor("a.bias").expect("a.bias").shape(), [5]);
    }

    #[test]
    fn the_reader_reads_back_what_safetensors_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.safetensors");
        let mut out = Vec::new();
        write(&params(), meta(), &mut out).expect("write");
        std::fs::write(&path, &out).expect("file");
        let reader = Reader::open(&path).expect("open");
        assert_eq!(reader.metadata().get("k3").map(String::as_str), Some("v3"));
        let (back, m) = reader.read(&layout()).expect("read");
        assert_eq!(back, params());
        assert_eq!((back.clone(), m.clone()), FlatParams::from_safetensors(&out, &path, &layout()).expect("bytes"));
        let mut other = layout();
        other.tensors[1].shape = vec![1, 5];
        let err = Reader::open(&path).expect("open").read(&other).expect_err("shape");
        assert_eq!(err.to_string(), format!("{}: tensor \"a.bias\": shape [5], expected [1, 5]", path.display()));
    }

    /// Random damage to a valid file: whenever the streamed reader accepts, `safetensors`
    /// accepts too and both read the same values; truncations and appended bytes are refused.
    #[test]
    fn damaged_files_are_refused_or_read_as_safetensors_reads_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.safetensors");
        let mut good = Vec::new();
        write(&params(), meta(), &mut good).expect("write");
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut accepted = 0;
        for round in 0..3000 {
            let mut bytes = good.clone();
            match round % 4 {
                0 => bytes.truncate(rng.random_range(0..good.len())),
                1 => bytes.extend(std::iter::repeat_n(0u8, rng.random_range(1..9))),
                _ => {
                    for _ in 0..rng.random_range(1..4) {
                        let i = rng.random_range(0..bytes.len().min(400));
                        bytes[i] = rng.random();
                    }
                }
            }
            std::fs::write(&path, &bytes).expect("file");
            let streamed = Reader::open(&path).and_then(|r| r.read(&layout()));
            if let Ok((p, m)) = streamed {
                accepted += 1;
                let (q, n) = FlatParams::from_safetensors(&bytes, &path, &layout())
                    .unwrap_or_else(|e| panic!("round {round}: streamed read accepted what safetensors refuses: {e}"));
                assert_eq!((p, m), (q, n), "round {round}");
            }
        }
        assert!(accepted > 0, "some damage (to metadata values) leaves a valid file");
    }
}
