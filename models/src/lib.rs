//! Maeum models: local data, the burn networks, local training and evaluation, and the
//! flat parameter vector that the federation exchanges.
//!
//! This crate knows nothing of networks, certificates or secure aggregation.
#![forbid(unsafe_code)]

pub mod accountant;
pub mod data;
pub mod ddp;
pub mod dp;
pub mod encoder;
pub mod features;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod params;
pub mod split;
pub mod standin;
pub mod stream;
pub mod text;
pub mod transformer;

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename,
/// fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_file(path, bytes, false)
}

/// [`write_atomic`]; with `private` (keys and other secrets) the file is created with
/// mode 0600 on Unix, so the secret is never readable by others, not even briefly.
pub fn write_file(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    write_file_with(path, private, |f| f.write_all(bytes))
}

/// [`write_file`] with the contents written by `write` (buffered), for a file too large
/// to build in memory first: atomic, fsynced, owner-only with `private`.
pub fn write_file_with(
    path: &Path,
    private: bool,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, options.open(&tmp)?);
        write(&mut out)?;
        out.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable (a crash after this returns keeps the file).
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn private_files_are_created_owner_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (public, secret) = (dir.path().join("a.pem"), dir.path().join("a.key"));
        super::write_file(&public, b"cert", false).expect("write");
        super::write_file(&secret, b"key", true).expect("write");
        assert_eq!(std::fs::read(&secret).expect("read"), b"key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode(&secret), 0o600);
            assert_ne!(mode(&public) & 0o044, 0, "public files keep the umask's read bits");
        }
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 2, "no temp files left");
    }
}
