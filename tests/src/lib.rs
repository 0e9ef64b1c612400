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
            "-p",
            "maeum-auditor",
        ]);
        // The test harness exports the e2e package's CARGO_* variables; ring's build
        // script reruns when CARGO_MANIFEST_DIR changes, so clear them for the nested build.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || key.starts_with("CARGO_BIN_")
                || matches!(&*key, "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR")
            {
                cmd.env_remove(&*key);
            }
        }
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
    fetch_if_missing(&path, &path, "scripts/fetch_rmhd.py", "the real corpus");
    path
}

/// The first `per_label` posts of every label of the corpus.
pub fn corpus_subset(dir: &std::path::Path, per_label: usize) -> std::path::PathBuf {
    use std::io::Write;
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let path = dir.join("subset.jsonl");
    let mut out = std::fs::File::create(&path).expect("subset");
    for line in std::fs::read_to_string(rmhd()).expect("corpus").lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("jsonl");
        let n = seen.entry(v["label"].as_str().unwrap_or_default().to_string()).or_default();
        if *n < per_label {
            *n += 1;
            writeln!(out, "{line}").expect("write");
        }
    }
    path
}

/// The pretrained encoder all-MiniLM-L6-v2 (`data/encoders/all-minilm-l6-v2`), fetched
/// and digest-checked by `scripts/fetch_encoder.py` on first use, as the corpus is.
pub fn encoder_dir() -> PathBuf {
    let dir = root().join("data/encoders/all-minilm-l6-v2");
    fetch_if_missing(&dir.join("model.safetensors"), &dir, "scripts/fetch_encoder.py", "the real encoder");
    dir
}

/// Runs `script --out OUT --cache data/cache` unless `marker` exists; one fetch at a time.
fn fetch_if_missing(marker: &Path, out: &Path, script: &str, what: &str) {
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if marker.exists() {
        return;
    }
    let status = Command::new("python3")
        .arg(root().join(script))
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(root().join("data/cache"))
        .status()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(status.success(), "{script} failed ({status}); {what} is required");
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

/// `maeum-site init` for `id` in `home`, with a shard's train/test files.
pub fn init_site(home: &Path, id: &str, shard: &Path) {
    run_ok(
        Command::new(bin("maeum-site"))
            .args(["init", "--site-id", id, "--home"])
            .arg(home)
            .arg("--train")
            .arg(shard.join("train.jsonl"))
            .arg("--test")
            .arg(shard.join("test.jsonl")),
    );
    // Test federations take jobs without an admin (like the demo); the consent flow has
    // its own test, which turns this back off.
    let toml = home.join("site.toml");
    let text = std::fs::read_to_string(&toml).expect("site.toml");
    assert!(text.contains("auto_accept = false"), "site.toml: {text}");
    std::fs::write(&toml, text.replace("auto_accept = false", "auto_accept = true")).expect("site.toml");
}

/// A federation on loopback for one test: a consortium in a temp dir, sites with
/// non-IID shards of the real corpus, and the real binaries as child processes (killed
/// when the fixture drops).
#[derive(Debug)]
pub struct Federation {
    pub dir: tempfile::TempDir,
    pub address: String,
    pub labels: Vec<String>,
    coordinator: Option<std::process::Child>,
    sites: std::collections::BTreeMap<String, std::process::Child>,
    pub heartbeat_timeout: u64,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// A hand-driven site: `site`'s enrolled identity speaking the fleet protocol directly
/// over mTLS, for tests that send what a well-behaved agent never would, or time the
/// coordinator's side of a transfer alone.
pub async fn site_client(
    fed: &Federation,
    site: &str,
) -> maeum_protocols::wire::pb::fleet_client::FleetClient<tonic::transport::Channel> {
    use maeum_pki::identity::{CertifiedKey, SecretPem};
    let home = fed.site_home(site);
    let read = |f: &str| std::fs::read_to_string(home.join(f)).expect(f);
    let me = CertifiedKey { cert_pem: read("site.pem"), key: SecretPem::new(read("site.key")) };
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", fed.address))
        .expect("uri")
        .tls_config(maeum_pki::tls::client_tls(&read("ca.pem"), &me, "127.0.0.1"))
        .expect("tls")
        .initial_stream_window_size(maeum_protocols::wire::H2_SITE_STREAM_WINDOW)
        .initial_connection_window_size(maeum_protocols::wire::H2_SITE_CONNECTION_WINDOW)
        .max_frame_size(maeum_protocols::wire::H2_MAX_FRAME)
        .connect()
        .await
        .expect("connect");
    maeum_protocols::wire::pb::fleet_client::FleetClient::new(channel)
}

/// Federations in one test binary run one at a time: two cores cannot host several
/// without starving heartbeats.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Federation {
    /// Provisions a consortium and `n` enrolled sites (`site-1` …) with the CLIs.
    pub fn new(n: usize) -> Self {
        Self::with_data(n, &rmhd())
    }

    /// [`Federation::new`] over another text/label JSONL file (e.g. a subset of the
    /// corpus, for models whose per-record cost is high).
    pub fn with_data(n: usize, data: &Path) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("tempdir");
        let address = ports::reserve();
        let mut fed = Self {
            dir,
            address: address.clone(),
            labels: Vec::new(),
            coordinator: None,
            sites: Default::default(),
            heartbeat_timeout: 4,
            _serial: serial,
        };
        run_ok(
            Command::new(bin("maeum-coordinator"))
                .args(["init", "--name", "test", "--address", &address, "--home"])
                .arg(fed.coordinator_home()),
        );
        let split = fed.dir.path().join("data");
        run_ok(
            Command::new(bin("maeum-site"))
                .args(["data", "split", "--sites", &n.to_string(), "--alpha", "0.5", "--seed", "7", "--data"])
                .arg(data)
                .arg("--out")
                .arg(&split),
        );
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(split.join("split.json")).expect("split.json"))
                .expect("split.json parses");
        fed.labels = manifest["labels"]
            .as_array()
            .expect("labels")
            .iter()
            .map(|l| l.as_str().unwrap_or("").to_string())
            .collect();
        for i in 1..=n {
            fed.enrol(&format!("site-{i}"), &split.join(format!("site-{i}")));
        }
        fed
    }

    pub fn coordinator_home(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    pub fn site_home(&self, id: &str) -> PathBuf {
        self.dir.path().join(id)
    }

    /// `maeum-site init` → `maeum-coordinator sites approve` → `maeum-site enroll`.
    pub fn enrol(&self, id: &str, shard: &Path) {
        let home = self.site_home(id);
        init_site(&home, id, shard);
        let bundle = home.join("bundle.json");
        run_ok(
            Command::new(bin("maeum-coordinator"))
                .args(["sites", "approve", "--site-id", id, "--home"])
                .arg(self.coordinator_home())
                .arg(home.join("request.csr.pem"))
                .arg("--out")
                .arg(&bundle),
        );
        run_ok(Command::new(bin("maeum-site")).args(["enroll", "--home"]).arg(&home).arg(&bundle));
    }

    /// Sets `[policy] key = value` (TOML) in a site's site.toml, before it starts. The
    /// old value may span lines (an array written one item a line).
    pub fn set_policy(&self, id: &str, key: &str, value: &str) {
        let path = self.site_home(id).join("site.toml");
        let text = std::fs::read_to_string(&path).expect("site.toml");
        let prefix = format!("{key} = ");
        assert!(text.lines().any(|l| l.starts_with(&prefix)), "site.toml has no {key}:\n{text}");
        let mut out = Vec::new();
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if !l.starts_with(&prefix) {
                out.push(l.to_string());
                continue;
            }
            if l.trim_end().ends_with('[') {
                // Skip the array's items through its closing bracket.
                lines.by_ref().find(|item| item.trim() == "]");
            }
            out.push(format!("{key} = {value}"));
        }
        std::fs::write(&path, out.join("\n") + "\n").expect("writing site.toml");
    }

    /// Makes `id` dial the coordinator at `addr` (an emulated link, [`link::Link`])
    /// instead of its real address, before it starts. The TLS name stays the
    /// coordinator's.
    pub fn route_site(&self, id: &str, addr: &str) {
        let path = self.site_home(id).join("enrolment.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("enrolment.json")).expect("json");
        v["coordinator_address"] = serde_json::Value::String(addr.to_string());
        std::fs::write(&path, serde_json::to_vec_pretty(&v).expect("json")).expect("writing enrolment.json");
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file")
    }

    /// What a process wrote to stderr so far.
    pub fn log_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn start_coordinator(&mut self) {
        self.start_coordinator_with(&[]);
    }

    /// Starts the coordinator with extra environment variables (fault injection).
    pub fn start_coordinator_with(&mut self, env: &[(&str, &str)]) {
        self.start_coordinator_full(env, &[]);
    }

    /// Starts the coordinator with extra environment variables and `serve` arguments.
    pub fn start_coordinator_full(&mut self, env: &[(&str, &str)], args: &[&str]) {
        let child = Command::new(bin("maeum-coordinator"))
            .args(["serve", "--listen", &self.address, "--heartbeat-timeout", &self.heartbeat_timeout.to_string()])
            .args(args)
            .arg("--home")
            .arg(self.coordinator_home())
            .env("MAEUM_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(self.log("coordinator"))
            .spawn()
            .expect("starting the coordinator");
        self.coordinator = Some(child);
        // Ready when the control service answers.
        for _ in 0..100 {
            if self.cli(&["jobs", "list", "--json"]).status.success() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the coordinator did not come up:\n{}", self.log_text("coordinator"));
    }

    /// SIGTERM, as systemd or Kubernetes stop it; waits for the exit (at most `limit`).
    pub fn terminate_coordinator(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let pid = self.coordinator.as_ref()?.id();
        run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]));
        let status = self.wait_coordinator_exit(limit);
        if status.is_none() {
            self.kill_coordinator();
        }
        status
    }

    /// Waits (at most `limit`) for the coordinator to exit on its own (a fault-injection
    /// stop); `None` if it is still running then.
    pub fn wait_coordinator_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            let status = self.coordinator.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if status.is_some() {
                self.coordinator = None;
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        None
    }

    /// Runs `serve` on this home expecting it to refuse to start; returns its stderr.
    pub fn serve_refused(&self) -> String {
        let out = Command::new(bin("maeum-coordinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--home"])
            .arg(self.coordinator_home())
            .output()
            .expect("serve");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the coordinator served a state it must refuse:\n{stderr}");
        stderr
    }

    /// The running coordinator's process id.
    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref().map(std::process::Child::id)
    }

    /// A running site's process id.
    pub fn site_pid(&self, id: &str) -> Option<u32> {
        self.sites.get(id).map(std::process::Child::id)
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_site(&mut self, id: &str) {
        self.start_site_with(id, &[]);
    }

    /// Starts a site with extra environment variables (test hooks).
    pub fn start_site_with(&mut self, id: &str, env: &[(&str, &str)]) {
        let child = Command::new(bin("maeum-site"))
            .args(["run", "--home"])
            .arg(self.site_home(id))
            .env("MAEUM_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(self.log(id))
            .spawn()
            .expect("starting a site");
        self.sites.insert(id.to_string(), child);
    }

    /// SIGKILL, as a crash would.
    pub fn kill_site(&mut self, id: &str) {
        if let Some(mut c) = self.sites.remove(id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `maeum-coordinator ARGS --home COORD` (operator commands).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("maeum-coordinator"))
            .args(args)
            .arg("--home")
            .arg(self.coordinator_home())
            .output()
            .expect("running maeum-coordinator")
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.cli(&args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e})"))
    }

    /// Writes a job file with this federation's labels and `extra` TOML, submits it, and
    /// returns the job id.
    pub fn submit(&self, name: &str, rounds: u32, min_sites: usize, extra: &str) -> String {
        let labels: Vec<String> = self.labels.iter().map(|l| format!("{l:?}")).collect();
        let toml = format!(
            "name = {name:?}\nlabels = [{}]\nrounds = {rounds}\nmin_sites = {min_sites}\n{extra}\n",
            labels.join(", ")
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).expect("job file");
        let v = self.cli_json(&["jobs", "submit", path.to_str().unwrap_or_default()]);
        v["job_id"].as_str().expect("job_id").to_string()
    }

    pub fn job(&self, id: &str) -> serde_json::Value {
        self.cli_json(&["jobs", "status", id])
    }

    /// Polls until the job leaves pending/running/paused; panics after `timeout`.
    pub fn wait_job(&self, id: &str, timeout: std::time::Duration) -> serde_json::Value {
        let until = std::time::Instant::now() + timeout;
        loop {
            let out = self.cli(&["jobs", "status", id, "--json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
                if !matches!(v["state"].as_str(), Some("pending" | "running" | "paused")) {
                    return v;
                }
            }
            assert!(
                std::time::Instant::now() < until,
                "job {id} did not finish in {timeout:?}\n--- coordinator log\n{}",
                self.log_text("coordinator")
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }

    /// Polls until `cond` holds on the job's status; panics after `timeout`.
    pub fn wait_for(
        &self,
        id: &str,
        timeout: std::time::Duration,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = std::time::Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        loop {
            let out = self.cli(&["jobs", "status", id, "--json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
                if cond(&v) {
                    return v;
                }
                last = v;
            }
            if std::time::Instant::now() >= until {
                let log = self.log_text("coordinator");
                let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                panic!(
                    "condition on job {id} not met in {timeout:?}; last status:\n{last:#}\ncoordinator log (end):\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Starts these sites' daemons.
    pub fn start_sites(&mut self, ids: &[&str]) {
        for id in ids {
            self.start_site(id);
        }
    }

    /// Waits until at least `n` sites are online at the coordinator (a minute at most).
    pub fn wait_online(&self, n: usize) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let sites = self.cli_json(&["sites", "list"]);
            if sites.as_array().is_some_and(|a| a.iter().filter(|s| s["online"] == true).count() >= n) {
                return;
            }
            assert!(std::time::Instant::now() < until, "sites did not come online: {sites:#}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The site daemon's status.json.
    pub fn site_status(&self, id: &str) -> serde_json::Value {
        std::fs::read_to_string(self.site_home(id).join("status.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        self.kill_coordinator();
        let ids: Vec<String> = self.sites.keys().cloned().collect();
        for id in ids {
            self.kill_site(&id);
        }
    }
}

/// Waits until process `name`'s log holds `needle` at least `count` times (logs are
/// appended to across restarts); panics with the log after `timeout`.
pub fn wait_log(fed: &Federation, name: &str, needle: &str, count: usize, timeout: std::time::Duration) {
    let until = std::time::Instant::now() + timeout;
    while fed.log_text(name).matches(needle).count() < count {
        assert!(std::time::Instant::now() < until, "{name} never logged {needle:?} ×{count}:\n{}", fed.log_text(name));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A small, fast text-classifier job section for tests.
pub const SMALL_MODEL: &str = "[model]\nkind = \"text-classifier\"\nbuckets = 4096\nembed_dim = 16\nhidden = 32\n";

/// The ops endpoints (health, readiness, OpenMetrics) of a running coordinator or site.
pub mod link;
pub mod ports;
pub mod releases;

pub mod ops {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// A live process's peak resident set (`VmHWM`), in bytes.
    pub fn peak_rss(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// A loopback address for an ops endpoint ([`crate::ports::reserve`]).
    pub fn free_port() -> String {
        crate::ports::reserve()
    }

    /// GET over plain HTTP/1.0: (status, body).
    pub fn get(addr: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// The value of one series in OpenMetrics text (0 when absent).
    pub fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub fn scrape(addr: &str) -> String {
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
        body
    }
}
