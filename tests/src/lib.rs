//! Helpers for the end-to-end tests: locating the real binaries, the real corpus,
//! and running commands with a clear failure message.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

static BUILD: std::sync::Once = std::sync::Once::new();

/// Path of a workspace binary, built (once per test process) with the same cargo and
/// profile as the tests, so a test never runs a stale binary.
pub fn bin(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; binaries in target/<profile>.
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root()).args([
            "build",
            "--bins",
            "-p",
            "maeum-site",
            "-p",
            "maeum-coordinator",
            "-p",
            "maeum-e2e",
        ]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        assert!(status.success(), "{cmd:?} failed: {status}");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The real corpus as JSONL, fetched with the project script if it is not there yet.
pub fn rmhd() -> PathBuf {
    let path = root().join("data/rmhd.jsonl");
    if !path.exists() {
        let status = Command::new("python3")
            .arg(root().join("scripts/fetch_rmhd.py"))
            .arg("--out")
            .arg(&path)
            .arg("--cache")
            .arg(root().join("data/cache"))
            .status()
            .unwrap_or_else(|e| panic!("running scripts/fetch_rmhd.py: {e}"));
        assert!(status.success(), "scripts/fetch_rmhd.py failed ({status}); the real corpus is required");
    }
    path
}

/// Runs `cmd`, returning its output; panics with stdout and stderr if it failed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
