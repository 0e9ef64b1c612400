//! Pretrained encoders at a site: where they are, installing one, listing them.
//!
//! A job or release names its encoder by name and digests (`maeum_models::encoder`); the
//! site runs it only from files its administrator installed here whose digests match, so
//! a coordinator cannot make a site run a crafted encoder. The vectors the site computes
//! from its records are cached in HOME/cache/vectors (owner-only) and never leave the site.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use maeum_models::encoder::{self, Encoder, EncoderError, EncoderSpec, Encoders};

use crate::enrol::Home;

/// The folder the site's encoders are in: `[encoders] dir` of site.toml, else HOME/encoders.
pub fn dir(home: &Home) -> Result<PathBuf> {
    if home.path("site.toml").exists()
        && let Some(d) = home.config()?.encoders.dir
    {
        return Ok(d);
    }
    Ok(home.path("encoders"))
}

/// The site's encoder store; with `cache`, sentence vectors of records are cached in
/// HOME/cache/vectors.
pub fn store(home: &Home, cache: bool) -> Result<Encoders> {
    Ok(Encoders::new(dir(home)?, cache.then(|| home.path(encoder::SITE_VECTOR_CACHE))))
}

/// Why the site cannot run `spec`'s encoder, if it cannot (checked before accepting a
/// job). The reason goes to the coordinator and into its audit log, so it names the
/// file at fault but not this site's paths; `encoders list` and `doctor` show those.
pub fn missing(home: &Home, spec: &EncoderSpec) -> Option<String> {
    if let Err(e) = encoder::check_known(spec) {
        return Some(e.to_string());
    }
    let Ok(dir) = dir(home).map(|d| d.join(&spec.name)) else {
        return Some("this site's [encoders] setting cannot be read".into());
    };
    if !dir.join(spec.format().weights()).exists() {
        return Some(format!("encoder {:?} is not installed at this site (`maeum-site encoders add DIR`)", spec.name));
    }
    match Encoder::verify(&dir, spec) {
        Ok(()) => None,
        Err(EncoderError::Digest { path, .. }) => Some(format!(
            "encoder {:?}: the installed {} is not the file the job names (another SHA-256)",
            spec.name,
            path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
        )),
        Err(_) => Some(format!("encoder {:?}: the installed files cannot be read", spec.name)),
    }
}

/// `maeum-site encoders add`: checks that `from` holds the known encoder `name` (both
/// digests and a loadable model), then copies it into the site's encoder folder.
pub fn add(home: &Home, from: &Path, name: &str) -> Result<PathBuf> {
    let Some(spec) = encoder::known(name) else {
        bail!("{name:?} is not a known encoder (known: {})", encoder::known_names());
    };
    Encoder::load(from, &spec).with_context(|| format!("checking {} as encoder {name:?}", from.display()))?;
    let target = dir(home)?.join(name);
    if target.canonicalize().ok() == from.canonicalize().ok() {
        return Ok(target);
    }
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    for f in spec.format().files() {
        let bytes = std::fs::read(from.join(f)).with_context(|| format!("reading {}", from.join(f).display()))?;
        maeum_models::write_atomic(&target.join(f), &bytes)
            .with_context(|| format!("writing {}", target.join(f).display()))?;
    }
    // What was written is what was checked.
    Encoder::verify(&target, &spec).with_context(|| format!("re-checking {}", target.display()))?;
    Ok(target)
}

/// One installed encoder, as `encoders list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct Installed {
    pub name: String,
    pub path: PathBuf,
    /// `ok`, or why the files are not the known encoder.
    pub status: String,
    pub sha256: Option<String>,
}

/// `maeum-site encoders list`: every known encoder, installed or not, verified.
pub fn list(home: &Home) -> Result<Vec<Installed>> {
    let dir = dir(home)?;
    Ok(encoder::catalogue()
        .map(|spec| {
            let path = dir.join(&spec.name);
            let status = if !path.join(spec.format().weights()).exists() {
                "not installed".to_string()
            } else {
                match Encoder::verify(&path, &spec) {
                    Ok(()) => "ok".into(),
                    Err(e) => e.to_string(),
                }
            };
            let sha256 = (status == "ok").then(|| spec.sha256.clone());
            Installed { name: spec.name, path, status, sha256 }
        })
        .collect())
}
