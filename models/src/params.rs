//! Parameters as one flat `f32` vector plus a layout.
//!
//! The flat vector is what crosses the federation (updates are `local − global` over it),
//! so its layout is explicit: an ordered list of named tensor shapes with a SHA-256
//! digest. Loading a vector under another layout is an error, never a silent reshape.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

/// One named tensor in a layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ordered tensors of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub tensors: Vec<TensorSpec>,
}

/// SHA-256 of a layout's canonical text (`maeum-layout-v1\n` then `name:d0,d1\n` per tensor).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayoutDigest(pub [u8; 32]);

impl fmt::Display for LayoutDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for LayoutDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayoutDigest({self})")
    }
}

impl Layout {
    pub fn new(tensors: Vec<TensorSpec>) -> Self {
        Self { tensors }
    }

    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    pub fn digest(&self) -> LayoutDigest {
        let mut canon = String::from("maeum-layout-v1\n");
        for t in &self.tensors {
            let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
            canon.push_str(&format!("{}:{}\n", t.name, dims.join(",")));
        }
        let d = ring::digest::digest(&ring::digest::SHA256, canon.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        LayoutDigest(out)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParamsError {
    #[error(
        "layout mismatch: expected layout {expected} ({expected_numel} parameters), got {actual} ({actual_numel} parameters)"
    )]
    LayoutMismatch { expected: LayoutDigest, expected_numel: usize, actual: LayoutDigest, actual_numel: usize },
    #[error("vector has {actual} values but layout {layout} needs {expected}")]
    WrongLength { layout: LayoutDigest, expected: usize, actual: usize },
    /// The I/O error is in the message and deliberately not a `source` (a field named
    /// `source` would be), so `{:#}` chains do not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a valid safetensors file: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("{path}: tensor {name:?}: {detail}")]
    Tensor { path: PathBuf, name: String, detail: String },
    #[error("{path}: no tensor {name:?} (the model's layout needs it)")]
    MissingTensor { path: PathBuf, name: String },
}

/// A flat parameter vector tied to its layout.
#[derive(Clone, PartialEq)]
pub struct FlatParams {
    layout: Layout,
    values: Vec<f32>,
}

impl fmt::Debug for FlatParams {
    // Weights are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlatParams")
            .field("layout", &self.layout.digest())
            .field("len", &self.values.len())
            .finish_non_exhaustive()
    }
}

impl FlatParams {
    pub fn new(layout: Layout, values: Vec<f32>) -> Result<Self, ParamsError> {
        if values.len() != layout.numel() {
            return Err(ParamsError::WrongLength {
                layout: layout.digest(),
                expected: layout.numel(),
                actual: values.len(),
            });
        }
        Ok(Self { layout, values })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// Checks that this vector has exactly `expected` as its layout.
    pub fn expect_layout(&self, expected: &Layout) -> Result<(), ParamsError> {
        if &self.layout != expected {
            return Err(ParamsError::LayoutMismatch {
                expected: expected.digest(),
                expected_numel: expected.numel(),
                actual: self.layout.digest(),
                actual_numel: self.layout.numel(),
            });
        }
        Ok(())
    }

    /// The slice of each tensor, in layout order.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, &[f32])> {
        let mut offset = 0;
        self.layout.tensors.iter().map(move |t| {
            let s = &self.values[offset..offset + t.numel()];
            offset += t.numel();
            (t, s)
        })
    }

    /// Serialises to safetensors bytes, with `metadata` stored in the header
    /// ([`crate::stream::write`]: the same parameters and metadata give the same bytes).
    pub fn to_safetensors(&self, metadata: HashMap<String, String>) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(self.values.len() * 4 + 4096);
        crate::stream::write(self, metadata, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// Writes a safetensors file atomically (temp file, fsync, rename), streamed from the
    /// values: no copy of the file's bytes is held in memory.
    pub fn save_safetensors(&self, path: &Path, metadata: HashMap<String, String>) -> Result<(), ParamsError> {
        crate::write_file_with(path, false, |out| crate::stream::write(self, metadata, out))
            .map_err(|source| ParamsError::Io { path: path.to_owned(), error: source })
    }

    /// Reads a safetensors file and checks every tensor of `layout` is there with the
    /// right dtype and shape, streamed into the vector ([`crate::stream::Reader`]).
    /// Returns the vector and the file's metadata.
    pub fn load_safetensors(path: &Path, layout: &Layout) -> Result<(Self, HashMap<String, String>), ParamsError> {
        crate::stream::Reader::open(path)?.read(layout)
    }

    pub fn from_safetensors(
        bytes: &[u8],
        path: &Path,
        layout: &Layout,
    ) -> Result<(Self, HashMap<String, String>), ParamsError> {
        let format = |detail: String| ParamsError::Format { path: path.to_owned(), detail };
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| format(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
        if st.len() != layout.tensors.len() {
            return Err(format(format!("{} tensors, the layout has {}", st.len(), layout.tensors.len())));
        }
        // Not layout.numel(): the layout may come from an untrusted header, and its shapes'
        // product can overflow; the tensors cannot hold more values than the file has bytes.
        let mut values = Vec::with_capacity(bytes.len() / 4);
        for spec in &layout.tensors {
            let view = st
                .tensor(&spec.name)
                .map_err(|_| ParamsError::MissingTensor { path: path.to_owned(), name: spec.name.clone() })?;
            let bad = |detail: String| ParamsError::Tensor { path: path.to_owned(), name: spec.name.clone(), detail };
            values.extend(f32_values(&view, &spec.shape).map_err(bad)?);
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok((Self { layout: layout.clone(), values }, metadata))
    }
}

/// A tensor's values if it is F32 of exactly `shape` (the message says what differs).
pub(crate) fn f32_values(view: &TensorView<'_>, shape: &[usize]) -> Result<Vec<f32>, String> {
    if view.dtype() != Dtype::F32 {
        return Err(format!("dtype {:?}, expected F32", view.dtype()));
    }
    if view.shape() != shape {
        return Err(format!("shape {:?}, expected {shape:?}", view.shape()));
    }
    Ok(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(vec![
            TensorSpec { name: "a.weight".into(), shape: vec![2, 3] },
            TensorSpec { name: "a.bias".into(), shape: vec![3] },
        ])
    }

    #[test]
    fn digest_is_stable_and_sensitive() {
        let d = layout().digest();
        assert_eq!(d.to_string().len(), 64);
        let mut other = layout();
        other.tensors[0].shape = vec![3, 2];
        assert_ne!(other.digest(), d, "same numel, other shape: different layout");
        let mut renamed = layout();
        renamed.tensors[1].name = "a.b".into();
        assert_ne!(renamed.digest(), d);
    }

    #[test]
    fn the_same_parameters_and_metadata_always_give_the_same_bytes() {
        let p = FlatParams::new(layout(), (0..9).map(|i| i as f32 / 7.0).collect()).expect("valid");
        let meta = || -> HashMap<String, String> { (0..12).map(|i| (format!("key{i}"), format!("v{i}"))).collect() };
        let first = p.to_safetensors(meta()).expect("serialise");
        for _ in 0..8 {
            assert_eq!(p.to_safetensors(meta()).expect("serialise"), first, "each HashMap iterates differently");
        }
        assert_eq!(u64::from_le_bytes(first[..8].try_into().expect("8 bytes")) % 8, 0, "the header stays aligned");
        let (back, read) = FlatParams::from_safetensors(&first, Path::new("m"), &layout()).expect("reads back");
        assert_eq!(back.values(), p.values());
        assert_eq!(read.get("key11").map(String::as_str), Some("v11"));
        assert_eq!(read.get("maeum.layout_digest"), Some(&layout().digest().to_string()));
    }

    #[test]
    fn wrong_length_is_refused() {
        let err = FlatParams::new(layout(), vec![0.0; 8]).expect_err("8 != 9");
        assert!(err.to_string().contains("has 8 values"), "{err}");
    }

    #[test]
    fn layout_mismatch_is_an_error() {
        let p = FlatParams::new(layout(), vec![0.0; 9]).expect("valid");
        let mut other = layout();
        other.tensors[0].shape = vec![3, 2];
        assert!(matches!(p.expect_layout(&other), Err(ParamsError::LayoutMismatch { .. })));
        assert!(p.expect_layout(&layout()).is_ok());
    }

    #[test]
    fn safetensors_round_trip() {
        let values: Vec<f32> = (0..9).map(|i| i as f32 * 0.5 - 1.0).collect();
        let p = FlatParams::new(layout(), values).expect("valid");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.safetensors");
        let mut meta = HashMap::new();
        meta.insert("maeum.kind".into(), "test".into());
        p.save_safetensors(&path, meta).expect("save");
        let (q, meta) = FlatParams::load_safetensors(&path, &layout()).expect("load");
        assert_eq!(p, q);
        assert_eq!(meta.get("maeum.kind").map(String::as_str), Some("test"));
        assert_eq!(meta.get("maeum.layout_digest"), Some(&layout().digest().to_string()));
    }

    #[test]
    fn safetensors_with_other_shape_is_refused() {
        let p = FlatParams::new(layout(), vec![1.0; 9]).expect("valid");
        let bytes = p.to_safetensors(HashMap::new()).expect("serialise");
        let mut other = layout();
        other.tensors[0].shape = vec![3, 2];
        let err = FlatParams::from_safetensors(&bytes, Path::new("m.st"), &other).expect_err("refused");
        assert_eq!(err.to_string(), "m.st: tensor \"a.weight\": shape [2, 3], expected [3, 2]");
    }

    #[test]
    fn garbage_is_refused() {
        let err = FlatParams::from_safetensors(b"not a model", Path::new("x"), &layout()).expect_err("refused");
        assert!(err.to_string().starts_with("x: not a valid safetensors file"), "{err}");
    }
}
