//! The coordinator's home directory: consortium identity, keys, state and blobs.
//!
//! ```text
//! HOME/consortium.json     name, address, created, release gates, crisis flag (public)
//! HOME/ca.pem, ca.key      consortium CA (the key signs site certificates)
//! HOME/server.pem, .key    the coordinator's TLS identity
//! HOME/operator.pem, .key  the operator CLI's identity
//! HOME/signing.key         Ed25519 PKCS#8: signs releases and audit checkpoints
//! HOME/signing.pub         its public key (hex), also in every enrolment bundle
//! HOME/release.key         Ed25519 PKCS#8: the release key (best kept elsewhere)
//! HOME/release.pub         the first release key (hex); HOME/release-keys.json, its
//!                          rotations (crate::release_key); bundles carry the current
//! HOME/sites/ID.pem        the certificate of each approved site (its current key)
//! HOME/sites/replaced/ID.FINGERPRINT.pem  certificates replaced by `sites approve
//!                          --replace` (revoked; kept for the audit export)
//! HOME/sites/ID.replace.json  the latest key replacement of site ID (who, old, new),
//!                          for the coordinator to log as `site_key_replaced`
//! HOME/state/              the state database (sled, or redb in state/state.redb):
//!                          sites, jobs, rounds, audit log, registry (crate::storage)
//! HOME/state.seal          commits, their hash chain and the newest cosigned checkpoint
//! HOME/state.lock          held while the state database is open
//! HOME/blobs/SHA256        content-addressed model blobs
//! HOME/uploads/            partial updates being received
//! ```
//! Private keys are written with mode 0600 and never printed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ring::signature::KeyPair;
use serde::{Deserialize, Serialize};

use maeum_pki::identity::{self, Bundle, Ca, CertifiedKey, SecretPem};
pub use maeum_runtime::runtime::now_ms;
use maeum_tlog::release::ReleaseGates;

/// Certificates issued by `init` and `sites approve` are valid this long.
pub const CERT_DAYS: u32 = 397;
/// The consortium CA is valid this long.
pub const CA_DAYS: u32 = 3650;
/// Approving a site's request again renews its certificate only this close to expiry
/// (`maeum-site doctor` warns from then on); earlier it is the same approval again.
pub const RENEW_DAYS: i64 = 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Consortium {
    pub name: String,
    /// `HOST:PORT` sites and operators dial.
    pub address: String,
    pub created_ms: i64,
    /// Minimum federated metrics for `models promote` (defaults when absent: crisis-class
    /// recall 0.5, no macro-F1 minimum); read at each promotion.
    #[serde(default)]
    pub release_gates: ReleaseGates,
    /// How releases set the crisis flag's threshold (read when a job releases a model).
    #[serde(default)]
    pub crisis_flag: CrisisFlagSettings,
    /// Which round blobs are kept (read after every committed round).
    #[serde(default)]
    pub retention: Retention,
}

/// `retention` in `consortium.json`: what `crate::retention` keeps of finished rounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// A job's latest rounds whose model, aggregate and optimiser state stay in
    /// HOME/blobs (older ones are removed unless a release or a kept round names them);
    /// 0 keeps every round.
    #[serde(default = "default_round_blobs")]
    pub round_blobs: u32,
}

/// The default `retention.round_blobs`.
pub const DEFAULT_ROUND_BLOBS: u32 = 10;

fn default_round_blobs() -> u32 {
    DEFAULT_ROUND_BLOBS
}

impl Default for Retention {
    fn default() -> Self {
        Self { round_blobs: DEFAULT_ROUND_BLOBS }
    }
}

/// `crisis_flag` in `consortium.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrisisFlagSettings {
    /// The recall the flag's threshold is chosen for, on the sites' held-out splits.
    #[serde(default = "default_target_recall")]
    pub target_recall: f64,
}

/// The default `crisis_flag.target_recall`.
pub const DEFAULT_TARGET_RECALL: f64 = 0.9;

fn default_target_recall() -> f64 {
    DEFAULT_TARGET_RECALL
}

impl Default for CrisisFlagSettings {
    fn default() -> Self {
        Self { target_recall: DEFAULT_TARGET_RECALL }
    }
}

impl Consortium {
    pub fn host(&self) -> &str {
        host_of(&self.address)
    }
}

fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Paths inside a coordinator home.
#[derive(Debug, Clone)]
pub struct Home {
    pub dir: PathBuf,
}

impl Home {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }
    pub fn blobs(&self) -> PathBuf {
        self.path("blobs")
    }
    pub fn uploads(&self) -> PathBuf {
        self.path("uploads")
    }
    pub fn sites(&self) -> PathBuf {
        self.path("sites")
    }

    pub fn consortium(&self) -> Result<Consortium> {
        let p = self.path("consortium.json");
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("reading {} (run `maeum-coordinator init` first)", p.display()))?;
        let c: Consortium = serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        c.release_gates.validate().map_err(anyhow::Error::msg).with_context(|| format!("in {}", p.display()))?;
        if !(0.0..=1.0).contains(&c.crisis_flag.target_recall) {
            bail!("{}: crisis_flag.target_recall must be in [0, 1], got {}", p.display(), c.crisis_flag.target_recall);
        }
        Ok(c)
    }

    pub fn read(&self, name: &str) -> Result<String> {
        let p = self.path(name);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    pub fn ca(&self) -> Result<Ca> {
        Ca::from_pem(&self.read("ca.pem")?, &SecretPem::new(self.read("ca.key")?)).context("loading the consortium CA")
    }

    pub fn identity(&self, which: &str) -> Result<CertifiedKey> {
        Ok(CertifiedKey {
            cert_pem: self.read(&format!("{which}.pem"))?,
            key: SecretPem::new(self.read(&format!("{which}.key"))?),
        })
    }

    /// A chain of key handovers kept in HOME (`release-keys.json`,
    /// `signing-keys.json`, `ca-handovers.json`), oldest first; empty while the key was
    /// never rotated.
    pub fn handovers<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<Vec<T>> {
        Ok(self.json_file(file)?.unwrap_or_default())
    }

    /// A JSON file in HOME, or `None` when there is none.
    pub fn json_file<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<Option<T>> {
        let p = self.path(file);
        match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// HOME/release.key as it is (it may be a retired key after a rotation).
    pub fn release_key_file(&self) -> Result<Option<ring::signature::Ed25519KeyPair>> {
        let p = self.path("release.key");
        if !p.exists() {
            return Ok(None);
        }
        crate::release_key::read_key(&p).map(Some)
    }

    /// HOME/release.key when it is the current release key, or `None` when the lead
    /// keeps it elsewhere (releases then wait for `models sign`). A retired key left in
    /// HOME after a rotation counts as none (logged): it would sign what no site takes.
    pub fn release_key(&self) -> Result<Option<ring::signature::Ed25519KeyPair>> {
        let (Some(key), Some((_, current))) = (self.release_key_file()?, self.release_verify_key()?) else {
            return Ok(None);
        };
        if key.public_key().as_ref() != current {
            tracing::warn!(
                "HOME/release.key is not the current release key (it was rotated); releases wait for \
                 `maeum-coordinator models sign N --key FILE`"
            );
            return Ok(None);
        }
        Ok(Some(key))
    }

    /// The current release key (hex; see [`crate::release_key`]), or `None` for a
    /// consortium created before release keys: its releases carry the signing key's
    /// signature only.
    pub fn release_public(&self) -> Result<Option<String>> {
        Ok(self.release_keys()?.map(|k| hex(&k.current)))
    }

    /// The current release key as hex and as the key releases are checked under
    /// (`None`: a consortium from before release keys).
    pub fn release_verify_key(&self) -> Result<Option<(String, [u8; 32])>> {
        Ok(self.release_keys()?.map(|k| (hex(&k.current), k.current)))
    }

    pub fn signing_key(&self) -> Result<ring::signature::Ed25519KeyPair> {
        let p = self.path("signing.key");
        let der = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        ring::signature::Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|_| anyhow::anyhow!("{}: not an Ed25519 PKCS#8 key", p.display()))
    }
}

/// Writes `bytes` atomically; private material gets mode 0600.
/// A handover made offline (`signing-key rotate`, `ca rotate`) and applied when
/// `serve` next starts: `HOME/signing.handover.json`, `HOME/ca.handover.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending<H> {
    /// Who made it (the user on the coordinator's host).
    pub operator: String,
    pub handover: H,
}

impl<H: Serialize + serde::de::DeserializeOwned> Pending<H> {
    /// Refuses a second one while `file` waits (`what`: "a rotation of the signing key").
    pub fn none_waiting(home: &Home, file: &str, what: &str) -> Result<()> {
        if home.path(file).exists() {
            bail!("{what} is already waiting ({}); start the coordinator to apply it", home.path(file).display());
        }
        Ok(())
    }

    /// Stages `handover` in HOME/`file`, made by the local user.
    pub fn stage(home: &Home, file: &str, handover: H) -> Result<()> {
        let operator = std::env::var("USER").map_or_else(|_| "local".to_string(), |u| format!("local:{u}"));
        write_file(&home.path(file), &serde_json::to_vec_pretty(&Pending { operator, handover })?, false)
    }
}

pub fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    maeum_models::write_file(path, bytes, private).with_context(|| format!("writing {}", path.display()))
}

/// What `init` created, for the CLI to report.
#[derive(Debug, Serialize)]
pub struct InitReport {
    pub home: PathBuf,
    pub consortium: String,
    pub address: String,
    pub ca_fingerprint: String,
    pub signing_public_key: String,
    pub release_public_key: String,
}

/// `maeum-coordinator init`: a new consortium in an empty (or missing) directory.
pub fn init(dir: &Path, name: &str, address: &str, store: crate::storage::Engine) -> Result<InitReport> {
    identity::validate_name(name).with_context(|| format!("--name {name:?}"))?;
    if !address.contains(':') || address.rsplit_once(':').is_none_or(|(_, p)| p.parse::<u16>().is_err()) {
        bail!("--address must be HOST:PORT, got {address:?}");
    }
    if dir.exists() && std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_some() {
        bail!("{} is not empty; refusing to overwrite an existing consortium", dir.display());
    }
    let home = Home::new(dir);
    for d in [home.dir.clone(), home.sites(), home.blobs(), home.uploads()] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let ca = Ca::generate(name, CA_DAYS).context("generating the consortium CA")?;
    let server = ca
        .issue_server(name, &[host_of(address).to_string()], CERT_DAYS)
        .context("issuing the coordinator's TLS certificate")?;
    let operator = ca.issue_operator("lead", CERT_DAYS).context("issuing the operator certificate")?;
    let (pkcs8, public) = new_ed25519("signing")?;
    // The release key: a second, separate signature on every release, which a lead can
    // take off the serving host (`models sign` then signs where it is).
    let (release, release_public) = new_ed25519("release")?;

    write_file(&home.path("ca.pem"), ca.cert_pem().as_bytes(), false)?;
    write_file(&home.path("ca.key"), ca.key().expose().as_bytes(), true)?;
    write_file(&home.path("server.pem"), server.cert_pem.as_bytes(), false)?;
    write_file(&home.path("server.key"), server.key.expose().as_bytes(), true)?;
    write_file(&home.path("operator.pem"), operator.cert_pem.as_bytes(), false)?;
    write_file(&home.path("operator.key"), operator.key.expose().as_bytes(), true)?;
    write_file(&home.path("signing.key"), pkcs8.as_ref(), true)?;
    write_file(&home.path("signing.pub"), format!("{public}\n").as_bytes(), false)?;
    write_file(&home.path("release.key"), release.as_ref(), true)?;
    write_file(&home.path("release.pub"), format!("{release_public}\n").as_bytes(), false)?;
    let consortium = Consortium {
        name: name.into(),
        address: address.into(),
        created_ms: now_ms(),
        release_gates: ReleaseGates::default(),
        crisis_flag: CrisisFlagSettings::default(),
        retention: Retention::default(),
    };
    write_file(&home.path("consortium.json"), serde_json::to_string_pretty(&consortium)?.as_bytes(), false)?;
    // The state database and its seal exist from the start, in the chosen engine.
    crate::storage::Db::open(&home.state(), store).context("creating the state database")?;
    let ca_der = identity::pem_to_der(ca.cert_pem())?;
    Ok(InitReport {
        home: dir.to_owned(),
        consortium: name.into(),
        address: address.into(),
        ca_fingerprint: identity::fingerprint(ca_der.first().map_or(&[][..], |c| c.as_ref())),
        signing_public_key: public,
        release_public_key: release_public,
    })
}

/// A new Ed25519 key (`what` names it in errors): its PKCS#8 document, to write to a
/// file, and the key pair.
pub fn generate_ed25519(what: &str) -> Result<(ring::pkcs8::Document, ring::signature::Ed25519KeyPair)> {
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("generating the Ed25519 {what} key"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("loading the new Ed25519 {what} key"))?;
    Ok((pkcs8, pair))
}

/// A new Ed25519 key: its PKCS#8 document and its public key in hex.
fn new_ed25519(what: &str) -> Result<(ring::pkcs8::Document, String)> {
    let (pkcs8, pair) = generate_ed25519(what)?;
    Ok((pkcs8, hex(pair.public_key().as_ref())))
}

/// What `sites approve` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// The site id was new: its certificate is issued.
    New,
    /// The site was approved with this request's key before: nothing changed, and the
    /// bundle holds the certificate issued then.
    AlreadyApproved,
    /// The same key, with a certificate that expires within [`RENEW_DAYS`]: a new
    /// certificate for it (the old one stays valid until it expires).
    Renewed,
    /// `--replace`: the site had another key; its certificate (this fingerprint) is
    /// replaced, revoked and logged as `site_key_replaced` by the coordinator.
    Replaced { old_fingerprint: String },
}

/// HOME/sites/ID.replace.json: the latest key replacement of a site, for the coordinator
/// to log (`sites approve` works offline, so it cannot write the audit log itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replacement {
    pub old_cert_fingerprint: String,
    pub new_cert_fingerprint: String,
    /// The operator identity of this home (`operator.pem`), who approved it.
    pub operator: String,
    pub time_ms: i64,
}

impl Home {
    /// HOME/sites/replaced: certificates replaced by `sites approve --replace`.
    pub fn replaced_sites(&self) -> PathBuf {
        self.sites().join("replaced")
    }

    /// The latest replacement note of `site`, if any.
    pub fn replacement(&self, site: &str) -> Result<Option<Replacement>> {
        let p = self.sites().join(format!("{site}.replace.json"));
        match std::fs::read_to_string(&p) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// The name in this home's operator certificate (`lead` unless renamed).
    pub fn operator_name(&self) -> Result<String> {
        let der = identity::pem_to_der(&self.read("operator.pem")?)?;
        let cert = der.first().context("operator.pem holds no certificate")?;
        Ok(identity::PeerId::from_cert_der(cert).context("operator.pem")?.name)
    }
}

fn first_der(pem: &str, what: &str) -> Result<Vec<u8>> {
    identity::leaf_der(pem).with_context(|| what.to_string())
}

/// Whether a certificate whose `notAfter` is `not_after_s` (Unix seconds) is due for
/// renewal: it expires within [`RENEW_DAYS`]. The one rule for `sites approve`,
/// `RenewCertificate`, the heartbeat's `renew_certificate` and the coordinator's own
/// certificate.
pub fn due(not_after_s: i64) -> bool {
    not_after_s - now_ms() / 1000 < RENEW_DAYS * 86_400
}

/// A request for an approved site id that carries another key than its certificate
/// (`sites approve` without `--replace`, or a `RenewCertificate`): refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "site {site} is already approved with another key (certificate {fingerprint}…, {record}), and this request \
     carries a different key. If the site really has a new key (a reinstalled host, a lost or compromised key), \
     rerun with --replace: the old certificate is revoked and the change is logged as site_key_replaced. Otherwise \
     check where this request came from"
)]
pub struct OtherKey {
    pub site: String,
    pub fingerprint: String,
    pub record: String,
}

/// `maeum-coordinator operator renew`: HOME/operator.pem reissued by the CA in HOME for
/// its key, [`CERT_DAYS`] from now. Returns the operator's name and the new `notAfter`
/// (Unix seconds).
pub fn renew_operator(home: &Home) -> Result<(String, i64)> {
    let current = home.identity("operator")?;
    let renewed = home.ca()?.reissue(&current.cert_pem, &current.key, CERT_DAYS).context("renewing operator.pem")?;
    write_file(&home.path("operator.pem"), renewed.as_bytes(), false)?;
    let der = first_der(&renewed, "the renewed operator certificate")?;
    Ok((home.operator_name()?, identity::not_after_unix(&der)?))
}

/// `maeum-coordinator sites approve` without `--replace`.
pub fn approve(home: &Home, csr_pem: &str, expected: Option<&str>) -> Result<Bundle> {
    approve_with(home, csr_pem, expected, false).map(|(bundle, _)| bundle)
}

/// `maeum-coordinator sites approve`: signs a site's request into a bundle. A request
/// for a site id that is already approved is the same approval again when it carries
/// the same key (nothing is written but the bundle), and is refused when it carries
/// another key unless `replace` is set; replacing moves the old certificate to
/// HOME/sites/replaced and leaves a note for the coordinator, which revokes the old
/// certificate and logs `site_key_replaced` as soon as it sees the change.
pub fn approve_with(home: &Home, csr_pem: &str, expected: Option<&str>, replace: bool) -> Result<(Bundle, Approval)> {
    let consortium = home.consortium()?;
    let ca = home.ca()?;
    let (peer, new_pem) = ca.sign_site_request(csr_pem, expected, CERT_DAYS).context("signing the site's request")?;
    let record = home.sites().join(format!("{}.pem", peer.name));
    std::fs::create_dir_all(home.sites()).with_context(|| format!("creating {}", home.sites().display()))?;
    let existing = match std::fs::read_to_string(&record) {
        Ok(pem) => Some(pem),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", record.display())),
    };
    let (cert_pem, approval) = match existing {
        None => (new_pem, Approval::New),
        Some(old_pem) => {
            let old = first_der(&old_pem, &record.display().to_string())?;
            let new = first_der(&new_pem, "the new certificate")?;
            let old_fingerprint = identity::fingerprint(&old);
            if identity::same_public_key(&old, &new)? {
                // Due: expiring, or issued by a CA the consortium rolled over from.
                if due(identity::not_after_unix(&old)?) || !maeum_pki::rollover::issued_by(&old, &ca.cert_der()?) {
                    (new_pem, Approval::Renewed)
                } else {
                    (old_pem, Approval::AlreadyApproved)
                }
            } else if !replace {
                return Err(OtherKey {
                    site: peer.name,
                    fingerprint: old_fingerprint[..16].to_string(),
                    record: record.display().to_string(),
                }
                .into());
            } else {
                let archive = home.replaced_sites();
                std::fs::create_dir_all(&archive).with_context(|| format!("creating {}", archive.display()))?;
                write_file(&archive.join(format!("{}.{old_fingerprint}.pem", peer.name)), old_pem.as_bytes(), false)?;
                let note = Replacement {
                    old_cert_fingerprint: old_fingerprint.clone(),
                    new_cert_fingerprint: identity::fingerprint(&new),
                    operator: home.operator_name()?,
                    time_ms: now_ms(),
                };
                let note_path = home.sites().join(format!("{}.replace.json", peer.name));
                write_file(&note_path, serde_json::to_string_pretty(&note)?.as_bytes(), false)?;
                (new_pem, Approval::Replaced { old_fingerprint })
            }
        }
    };
    if approval != Approval::AlreadyApproved {
        write_file(&record, cert_pem.as_bytes(), false)?;
    }
    let bundle = Bundle {
        format: 1,
        consortium: consortium.name.clone(),
        site_id: peer.name,
        coordinator_address: consortium.address.clone(),
        coordinator_name: consortium.host().to_string(),
        ca_pem: home.trusted_cas_pem()?,
        cert_pem,
        signing_public_key: home.read("signing.pub")?.trim().to_string(),
        release_public_key: home.release_public()?.unwrap_or_default(),
    };
    Ok((bundle, approval))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
