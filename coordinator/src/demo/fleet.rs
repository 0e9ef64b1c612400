//! The demo's child processes (coordinator and sites), the site binary, and the work
//! dir's disk housekeeping (`--clean`).

use super::*;

/// Child processes that are stopped (SIGTERM, then SIGKILL) when dropped.
pub(super) struct Fleet {
    pub(super) children: Vec<(String, Child)>,
}

impl Fleet {
    pub(super) fn stop(&mut self) {
        for (_, c) in &self.children {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
        let until = Instant::now() + Duration::from_secs(10);
        for (_, c) in &mut self.children {
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }

    /// Stops every child but `keep`.
    pub(super) fn stop_all_but(&mut self, keep: &str) {
        let (kept, others): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.children).into_iter().partition(|(n, _)| n == keep);
        self.children = others;
        self.stop();
        self.children = kept;
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        for (name, c) in &mut self.children {
            if let Some(status) = c.try_wait()? {
                bail!("{name} exited early ({status}); see its log in the work dir's logs/");
            }
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `maeum-site` binary next to this one. Under `cargo run` (which sets `CARGO`), it
/// is built first with the same profile, so the README's one command is enough.
pub(super) fn site_binary() -> Result<PathBuf> {
    let name = "maeum-site";
    let exe = std::env::current_exe().context("locating this executable")?;
    if let (Ok(cargo), Ok(_)) = (std::env::var("CARGO"), std::env::var("CARGO_MANIFEST_DIR")) {
        let release = exe.parent().and_then(Path::file_name).is_some_and(|d| d == "release");
        let profile = if release { " --release" } else { "" };
        eprintln!("building {name} (cargo build{profile} -p {name})");
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", name, "-p", "maeum-coordinator"]);
        // `cargo run` exports the package's CARGO_* variables; some build scripts (ring)
        // rerun when CARGO_MANIFEST_DIR changes, which would rebuild half the tree.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || matches!(&*key, "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE")
            {
                build.env_remove(&*key);
            }
        }
        if release {
            build.arg("--release");
        }
        let status = build.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build -p {name} failed ({status})");
        }
    }
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!("{} not found next to {} (build it with `cargo build -p maeum-site`)", path.display(), exe.display());
    }
    Ok(path)
}

pub(super) fn run_quiet(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = if err.trim().is_empty() { "see above" } else { err.trim() };
        bail!("{what} failed ({}): {err}", out.status);
    }
    Ok(())
}

/// Bytes of the files under `path` (0 if it is missing).
pub(super) fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).map_or(0, |d| d.flatten().map(|e| disk_usage(&e.path())).sum())
}

/// `1.4 GB`, `230 MB`, `12 kB`.
pub(super) fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.0} MB", n as f64 / 1e6),
        n => format!("{:.0} kB", n as f64 / 1e3),
    }
}

/// After the run, each site keeps only the model of the release it serves: the global
/// models of every round (one per round, the bulk of a demo's disk use) and the masked
/// uploads in `work/` are never read again. Returns the bytes freed.
pub(super) fn prune_site_caches(site_home: &Path, keep_model: &str) -> Result<u64> {
    let mut freed = 0;
    let keep = format!("{keep_model}.safetensors");
    for dir in ["models", "work"] {
        let Ok(entries) = std::fs::read_dir(site_home.join(dir)) else { continue };
        for e in entries.flatten() {
            if (dir == "models" && e.file_name() == *keep.as_str()) || !e.file_type()?.is_file() {
                continue;
            }
            let n = e.metadata()?.len();
            std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            freed += n;
        }
    }
    Ok(freed)
}

/// What `--clean` keeps in the work dir.
pub(super) const KEPT_BY_CLEAN: [&str; 4] = ["summary.json", "audit.json", "job.toml", "logs"];

/// `--clean`: removes everything in `work` but [`KEPT_BY_CLEAN`]. Returns the bytes freed.
pub(super) fn clean(work: &Path) -> Result<u64> {
    let mut freed = 0;
    for e in std::fs::read_dir(work).with_context(|| format!("reading {}", work.display()))?.flatten() {
        if KEPT_BY_CLEAN.iter().any(|k| e.file_name() == *k) {
            continue;
        }
        let path = e.path();
        freed += disk_usage(&path);
        let removed =
            if e.file_type()?.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(freed)
}

pub(super) fn spawn(cmd: &mut Command, log: &Path, name: &str) -> Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdout(Stdio::null())
        .stderr(file)
        .env("MAEUM_LOG", std::env::var("MAEUM_LOG").unwrap_or_else(|_| "info".into()))
        .spawn()
        .with_context(|| format!("starting {name}"))
}
