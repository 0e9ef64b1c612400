//! Maeum models: local data, the burn networks, local training and evaluation, and the
//! flat parameter vector that the federation exchanges.
//!
//! This crate knows nothing of networks, certificates or secure aggregation.
#![forbid(unsafe_code)]

pub mod data;
pub mod features;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod params;
pub mod split;
pub mod text;

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
