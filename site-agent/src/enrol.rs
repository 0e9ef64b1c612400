//! The site's home directory: identity, enrolment, configuration and status.
//!
//! ```text
//! HOME/site.json            the site id (public)
//! HOME/site.key             the site's private TLS key (0600; never leaves the site)
//! HOME/request.csr.pem      the certificate request for the consortium lead
//! HOME/site.toml            configuration: local data, limits, predict, policy (edit freely)
//! HOME/enrolment.json       from the lead's bundle: consortium, coordinator, public keys
//! HOME/site.pem, ca.pem     the site certificate and the consortium CA
//! HOME/status.json          written by the daemon: connection, stage, job, round
//! HOME/jobs/ID.json         specs of jobs this site accepted
//! HOME/models/DIGEST.safetensors  verified model versions (DIGEST.part while downloading);
//!                                  old round models pruned (`daemon::prune_models`)
//! HOME/work/JOB-rR-aA.update     an update waiting to be uploaded, with its header in .json
//! HOME/audit/                     the witnessed audit checkpoint, the journal, and any
//!                                 fork evidence, which stops all work (`witness`)
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use maeum_pki::identity::{self, Bundle, CertifiedKey, PeerId, SecretPem};

/// HOME/site.toml.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub data: DataConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub predict: PredictConfig,
    /// `[policy]`: what this site reveals, and to whom (`crate::policy`).
    #[serde(default)]
    pub policy: crate::policy::Policy,
    /// `[encoders]`: where the pretrained encoders are (`crate::encoders`).
    #[serde(default)]
    pub encoders: EncodersConfig,
}

/// `[encoders]`: pretrained sentence encoders this site may run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodersConfig {
    /// A folder with one sub-folder per encoder (`DIR/all-minilm-l6-v2/model.safetensors`
    /// …), e.g. read-only and shared by several site homes. Default: HOME/encoders, where
    /// `maeum-site encoders add` installs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// `[predict]`: local inference settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictConfig {
    /// Flag a possible crisis when any crisis class's probability is at or above this
    /// (in [0, 1]), instead of the threshold on the release's model card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crisis_threshold: Option<f64>,
}

/// Where the site's records are. They are read locally and never sent anywhere.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training records (JSONL or CSV).
    pub train: Option<PathBuf>,
    /// Held-out records for federated evaluation (JSONL or CSV).
    pub test: Option<PathBuf>,
    #[serde(default = "text")]
    pub text_column: String,
    #[serde(default = "label")]
    pub label_column: String,
}

fn text() -> String {
    "text".into()
}
fn label() -> String {
    "label".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Worker threads for training (0 = one per core).
    #[serde(default)]
    pub threads: usize,
}

/// HOME/enrolment.json: the bundle without the certificates (kept as PEM files).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolment {
    pub consortium: String,
    pub site_id: String,
    pub coordinator_address: String,
    pub coordinator_name: String,
    pub signing_public_key: String,
    /// The consortium's release key (hex): every release installed must carry its
    /// signature. Empty for a bundle from before the key existed (then releases are
    /// checked under `signing_public_key` alone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release_public_key: String,
    pub enrolled_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Home {
    pub dir: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct SiteFile {
    site_id: String,
}

impl Home {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn read(&self, name: &str) -> Result<String> {
        let p = self.path(name);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    pub fn site_id(&self) -> Result<String> {
        let f: SiteFile =
            serde_json::from_str(&self.read("site.json").context("is this a site home? run `maeum-site init`")?)
                .context("parsing site.json")?;
        Ok(f.site_id)
    }

    pub fn config(&self) -> Result<SiteConfig> {
        let p = self.path("site.toml");
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let cfg: SiteConfig =
            toml::from_str(&text).with_context(|| format!("{}: invalid configuration", p.display()))?;
        cfg.policy.validate().map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        Ok(cfg)
    }

    pub fn enrolment(&self) -> Result<Enrolment> {
        let text =
            self.read("enrolment.json").context("this site is not enrolled yet (run `maeum-site enroll BUNDLE`)")?;
        serde_json::from_str(&text).context("parsing enrolment.json")
    }

    pub fn identity(&self) -> Result<CertifiedKey> {
        Ok(CertifiedKey { cert_pem: self.read("site.pem")?, key: SecretPem::new(self.read("site.key")?) })
    }
}

/// The daemon's part of `maeum-site status`, as of `now_ms`.
fn status_lines(s: &Status, now_ms: i64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let error = if s.last_error.is_empty() { String::new() } else { format!(" ({})", s.last_error) };
    let _ = writeln!(out, "connection  {}{error}", s.connection);
    // Job and release come from the coordinator: while it is not reachable (or the daemon
    // is not running) they are what this site last knew, and say so.
    let known = if s.connection == "connected" {
        String::new()
    } else if s.contact_ms > 0 {
        format!("  (last known; coordinator last reached {} ago)", ago(now_ms - s.contact_ms))
    } else {
        "  (last known)".into()
    };
    let _ = writeln!(out, "stage       {}", if s.stage.is_empty() { "-" } else { &s.stage });
    if !s.job_id.is_empty() {
        let _ = writeln!(out, "job         {} round {}{known}", s.job_id, s.round);
    }
    if !s.last_model.is_empty() {
        let _ = writeln!(out, "last model  {}", s.last_model);
    }
    if !s.last_refusal.is_empty() {
        let _ = writeln!(out, "refused     {}", s.last_refusal);
    }
    if !s.audit.is_empty() {
        let _ = writeln!(out, "audit log   {}", s.audit);
    }
    if !s.release.is_empty() {
        let _ = writeln!(out, "release     {} in service (`maeum-site models list`){known}", s.release);
    }
    let _ = writeln!(out, "updated     {}s ago (pid {})", (now_ms - s.updated_ms).max(0) / 1000, s.pid);
    out
}

/// The policy in force, one rule a line, for `maeum-site status`.
fn policy_lines(p: &crate::policy::Policy) -> String {
    let rules = p.summary();
    let width = rules.iter().map(|(rule, _)| rule.chars().count()).max().unwrap_or(0) + 2;
    rules
        .into_iter()
        .enumerate()
        .map(|(i, (rule, value))| format!("{:<12}{rule:<width$}{value}\n", if i == 0 { "policy" } else { "" }))
        .collect()
}

/// A duration in milliseconds for humans: "42 s", "5 min", "3 h", "2 days".
pub(crate) fn ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

/// Refuses a `--home` that is not a site home (no `site.json`), so that a mistyped path
/// fails instead of reading as an empty site.
pub fn check_home(dir: &Path) -> Result<()> {
    if dir.join("site.json").is_file() {
        return Ok(());
    }
    let why = if dir.is_dir() { "has no site.json" } else { "does not exist" };
    bail!("{} is not a site home ({why}); create one with `maeum-site init --home DIR --site-id ID`", dir.display())
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    maeum_models::write_file(path, bytes, private).with_context(|| format!("writing {}", path.display()))
}

/// `maeum-site init`: a new site key, its certificate request and a configuration.
pub fn init(dir: &Path, site_id: &str, train: Option<PathBuf>, test: Option<PathBuf>) -> Result<PathBuf> {
    identity::validate_name(site_id).with_context(|| format!("--site-id {site_id:?}"))?;
    if dir.join("site.json").exists() {
        bail!("{} already holds a site (site.json exists); refusing to replace its key", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (key, csr) = identity::site_request(site_id).context("generating the site key")?;
    let home = Home::new(dir);
    let abs = |p: Option<PathBuf>| p.map(|p| std::path::absolute(&p).unwrap_or(p));
    let config = SiteConfig {
        data: DataConfig { train: abs(train), test: abs(test), text_column: text(), label_column: label() },
        limits: Limits::default(),
        predict: PredictConfig::default(),
        policy: crate::policy::Policy::default(),
        encoders: EncodersConfig::default(),
    };
    write(&home.path("site.key"), key.expose().as_bytes(), true)?;
    write(&home.path("request.csr.pem"), csr.as_bytes(), false)?;
    write(&home.path("site.toml"), toml::to_string_pretty(&config)?.as_bytes(), false)?;
    write(
        &home.path("site.json"),
        serde_json::to_string_pretty(&SiteFile { site_id: site_id.into() })?.as_bytes(),
        false,
    )?;
    Ok(home.path("request.csr.pem"))
}

/// `maeum-site enroll`: installs the lead's bundle after checking it is for this site
/// and that its certificate matches this site's private key.
pub fn enroll(dir: &Path, bundle_path: &Path) -> Result<Enrolment> {
    let home = Home::new(dir);
    let site_id = home.site_id()?;
    let text = std::fs::read_to_string(bundle_path).with_context(|| format!("reading {}", bundle_path.display()))?;
    let b: Bundle =
        serde_json::from_str(&text).with_context(|| format!("{}: not an enrolment bundle", bundle_path.display()))?;
    if b.format != 1 {
        bail!("{}: bundle format {} is not supported (expected 1)", bundle_path.display(), b.format);
    }
    if b.site_id != site_id {
        bail!("{}: the bundle is for site {}, this home is site {site_id}", bundle_path.display(), b.site_id);
    }
    let ders = identity::pem_to_der(&b.cert_pem)?;
    let leaf = ders.first().context("the bundle holds no certificate")?;
    let peer = PeerId::from_cert_der(leaf.as_ref())?;
    if peer != PeerId::site(&site_id)? {
        bail!("{}: the certificate names {peer}, not site/{site_id}", bundle_path.display());
    }
    let key = SecretPem::new(home.read("site.key")?);
    if !identity::key_matches_cert(&key, leaf.as_ref())? {
        bail!(
            "{}: the certificate was not issued for this site's key (was the request regenerated?)",
            bundle_path.display()
        );
    }
    let enrolment = Enrolment {
        consortium: b.consortium,
        site_id,
        coordinator_address: b.coordinator_address,
        coordinator_name: b.coordinator_name,
        signing_public_key: b.signing_public_key,
        release_public_key: b.release_public_key,
        enrolled_ms: crate::now_ms(),
    };
    write(&home.path("site.pem"), b.cert_pem.as_bytes(), false)?;
    write(&home.path("ca.pem"), b.ca_pem.as_bytes(), false)?;
    write(&home.path("enrolment.json"), serde_json::to_string_pretty(&enrolment)?.as_bytes(), false)?;
    Ok(enrolment)
}

/// HOME/status.json, written by the daemon at every change (read by `maeum-site status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub site_id: String,
    pub pid: u32,
    /// "connecting", "connected", "retrying", "refused", "stopped".
    pub connection: String,
    pub last_error: String,
    pub stage: String,
    pub job_id: String,
    pub round: u32,
    pub last_model: String,
    /// The audit log as this site witnesses it (or the fork it caught).
    #[serde(default)]
    pub audit: String,
    /// The release in service (`vN (digest)`), empty before the first install.
    #[serde(default)]
    pub release: String,
    /// When the coordinator last answered (set as the connection comes up and as it is
    /// lost); 0 if never. While not connected, job and release are the last known ones.
    #[serde(default)]
    pub contact_ms: i64,
    /// The latest refusal under this site's policy (what, and which rule), if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_refusal: String,
    pub updated_ms: i64,
}

impl Status {
    pub fn save(&self, home: &Home) -> Result<()> {
        write(&home.path("status.json"), serde_json::to_string_pretty(self)?.as_bytes(), false)
    }
    pub fn load(home: &Home) -> Result<Option<Status>> {
        let p = home.path("status.json");
        if !p.exists() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&home.read("status.json")?).context("parsing status.json")?))
    }
}

/// `maeum-site status`.
pub fn status(dir: &Path, json: bool) -> Result<()> {
    let home = Home::new(dir);
    let site_id = home.site_id()?;
    let enrolment = home.enrolment().ok();
    let not_after = home
        .read("site.pem")
        .ok()
        .and_then(|pem| identity::pem_to_der(&pem).ok())
        .and_then(|d| d.first().and_then(|c| identity::not_after_unix(c.as_ref()).ok()));
    let status = Status::load(&home)?;
    let policy = home.config().map(|c| c.policy);
    // Read from HOME/audit, not status.json: true whether or not the daemon runs.
    let fork = crate::witness::fork_evidence(&home);
    if json {
        let stopped = fork.as_ref().map(|why| {
            serde_json::json!({
                "reason": why, "evidence": crate::witness::evidence_path(&home),
                "clear": crate::witness::clear_command(&home),
            })
        });
        println!(
            "{}",
            serde_json::json!({
                "site_id": site_id, "enrolled": enrolment.is_some(), "enrolment": enrolment,
                "certificate_not_after": not_after, "status": status, "stopped": stopped,
                "policy": policy.as_ref().ok(),
                "policy_error": policy.as_ref().err().map(|e| format!("{e:#}")),
            })
        );
        return Ok(());
    }
    println!("site        {site_id}");
    match &enrolment {
        Some(e) => println!("enrolled    consortium {} via {}", e.consortium, e.coordinator_address),
        None => println!("enrolled    no (run `maeum-site enroll BUNDLE`)"),
    }
    if let Some(t) = not_after {
        println!("certificate valid for {} more days", (t - crate::now_ms() / 1000) / 86_400);
    }
    if let Some(why) = &fork {
        println!("STOPPED     this site refuses all work: the coordinator showed it a forked audit log");
        println!("            {why}");
        println!("            evidence {}", crate::witness::evidence_path(&home).display());
        println!("            send it to the consortium's auditors, then: {}", crate::witness::clear_command(&home));
    }
    match status {
        Some(s) => print!("{}", status_lines(&s, crate::now_ms())),
        None => println!("daemon      never ran (start it with `maeum-site run --home {}`)", dir.display()),
    }
    match &policy {
        Ok(p) => print!("{}", policy_lines(p)),
        Err(e) => println!("policy      unreadable: {e:#}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(connection: &str, contact_ms: i64, expected: &[&str]) {
        let s = Status {
            connection: connection.into(),
            job_id: "triage-1".into(),
            round: 3,
            release: "v2 (abcd)".into(),
            contact_ms,
            updated_ms: 1_000_000,
            ..Default::default()
        };
        let text = status_lines(&s, 1_000_000 + 5 * 60_000);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("job") || l.starts_with("release")).collect();
        assert_eq!(lines, expected);
    }

    #[test]
    fn status_shows_the_last_refusal() {
        let s = Status {
            connection: "connected".into(),
            last_refusal: "job j round 2 attempt 1: refused by this site's policy ([policy] min_cohort): …".into(),
            ..Default::default()
        };
        let text = status_lines(&s, 0);
        assert!(
            text.lines().any(|l| l.starts_with("refused     job j round 2") && l.contains("[policy] min_cohort")),
            "{text}"
        );
        assert!(!status_lines(&Status::default(), 0).contains("refused"));
    }

    #[test]
    fn status_marks_job_and_release_as_last_known_while_not_connected() {
        check(
            "connected",
            1,
            &["job         triage-1 round 3", "release     v2 (abcd) in service (`maeum-site models list`)"],
        );
        check(
            "retrying",
            1_000_000,
            &[
                "job         triage-1 round 3  (last known; coordinator last reached 5 min ago)",
                "release     v2 (abcd) in service (`maeum-site models list`)  (last known; coordinator last reached 5 min ago)",
            ],
        );
        check(
            "connecting",
            0,
            &[
                "job         triage-1 round 3  (last known)",
                "release     v2 (abcd) in service (`maeum-site models list`)  (last known)",
            ],
        );
    }

    #[test]
    fn status_shows_every_rule_of_the_policy() {
        let p = crate::policy::Policy { members: vec!["b".into(), "c".into()], ..Default::default() };
        assert_eq!(
            policy_lines(&p),
            "policy      auto_accept                no
            allow_plaintext            no
            min_cohort                 3
            allowed_models             text-classifier, encoder-head, encoder-lora
            max_params                 67108864
            max_rounds                 1000
            allowed_strategies         fedavg, fedprox, fedadam, fedyogi
            members                    b, c
            privacy.allow_non_dp       yes
            privacy.max_epsilon        10 at δ ≤ 1e-5
            privacy.allow_distributed  yes
            privacy.min_colluders      0
            privacy.budget             no total
"
        );
    }

    #[test]
    fn the_example_site_toml_parses_and_its_policy_is_the_default() {
        let cfg: SiteConfig =
            toml::from_str(include_str!("../../deploy/examples/site.toml")).expect("deploy/examples/site.toml");
        assert_eq!(cfg.policy, crate::policy::Policy::default());
        cfg.policy.validate().expect("valid");
    }

    #[test]
    fn a_folder_that_is_not_a_site_home_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = check_home(&dir.path().join("no/such/dir")).expect_err("missing").to_string();
        assert!(e.contains("is not a site home (does not exist)"), "{e}");
        let e = check_home(dir.path()).expect_err("empty").to_string();
        assert!(e.contains("is not a site home (has no site.json)"), "{e}");
        init(dir.path(), "a", None, None).expect("init");
        check_home(dir.path()).expect("a site home");
    }
}
