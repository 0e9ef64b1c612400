//! The coordinator's home directory: consortium identity, keys, state and blobs.
//!
//! ```text
//! HOME/consortium.json     name, address, created (public)
//! HOME/ca.pem, ca.key      consortium CA (the key signs site certificates)
//! HOME/server.pem, .key    the coordinator's TLS identity
//! HOME/operator.pem, .key  the operator CLI's identity
//! HOME/signing.key         Ed25519 PKCS#8: signs releases and audit checkpoints
//! HOME/signing.pub         its public key (hex), also in every enrolment bundle
//! HOME/sites/ID.pem        certificates issued to sites (a record of approvals)
//! HOME/state/              sled database (sites, jobs, rounds, metrics)
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

/// Certificates issued by `init` and `sites approve` are valid this long.
pub const CERT_DAYS: u32 = 397;
/// The consortium CA is valid this long.
pub const CA_DAYS: u32 = 3650;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Consortium {
    pub name: String,
    /// `HOST:PORT` sites and operators dial.
    pub address: String,
    pub created_ms: i64,
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
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
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

    pub fn signing_key(&self) -> Result<ring::signature::Ed25519KeyPair> {
        let p = self.path("signing.key");
        let der = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        ring::signature::Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|_| anyhow::anyhow!("{}: not an Ed25519 PKCS#8 key", p.display()))
    }
}

/// Writes `bytes` atomically; private material gets mode 0600.
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
}

/// `maeum-coordinator init`: a new consortium in an empty (or missing) directory.
pub fn init(dir: &Path, name: &str, address: &str) -> Result<InitReport> {
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
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("generating the Ed25519 signing key"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("loading the new Ed25519 signing key"))?;
    let public = hex(pair.public_key().as_ref());

    write_file(&home.path("ca.pem"), ca.cert_pem().as_bytes(), false)?;
    write_file(&home.path("ca.key"), ca.key().expose().as_bytes(), true)?;
    write_file(&home.path("server.pem"), server.cert_pem.as_bytes(), false)?;
    write_file(&home.path("server.key"), server.key.expose().as_bytes(), true)?;
    write_file(&home.path("operator.pem"), operator.cert_pem.as_bytes(), false)?;
    write_file(&home.path("operator.key"), operator.key.expose().as_bytes(), true)?;
    write_file(&home.path("signing.key"), pkcs8.as_ref(), true)?;
    write_file(&home.path("signing.pub"), format!("{public}\n").as_bytes(), false)?;
    let consortium = Consortium { name: name.into(), address: address.into(), created_ms: now_ms() };
    write_file(&home.path("consortium.json"), serde_json::to_string_pretty(&consortium)?.as_bytes(), false)?;
    let ca_der = identity::pem_to_der(ca.cert_pem())?;
    Ok(InitReport {
        home: dir.to_owned(),
        consortium: name.into(),
        address: address.into(),
        ca_fingerprint: identity::fingerprint(ca_der.first().map_or(&[][..], |c| c.as_ref())),
        signing_public_key: public,
    })
}

/// `maeum-coordinator sites approve`: signs a site's request into a bundle.
pub fn approve(home: &Home, csr_pem: &str, expected: Option<&str>) -> Result<Bundle> {
    let consortium = home.consortium()?;
    let ca = home.ca()?;
    let (peer, cert_pem) = ca.sign_site_request(csr_pem, expected, CERT_DAYS).context("signing the site's request")?;
    let record = home.sites().join(format!("{}.pem", peer.name));
    std::fs::create_dir_all(home.sites()).with_context(|| format!("creating {}", home.sites().display()))?;
    write_file(&record, cert_pem.as_bytes(), false)?;
    Ok(Bundle {
        format: 1,
        consortium: consortium.name.clone(),
        site_id: peer.name,
        coordinator_address: consortium.address.clone(),
        coordinator_name: consortium.host().to_string(),
        ca_pem: ca.cert_pem().to_string(),
        cert_pem,
        signing_public_key: home.read("signing.pub")?.trim().to_string(),
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
