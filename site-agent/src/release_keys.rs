//! The release keys this site trusts (`docs/protocols/releases.md#rotating-the-release-key`).
//!
//! ```text
//! HOME/enrolment.json        release_public_key: the key pinned at enrolment
//! HOME/release-keys.json     every rotation this site followed, oldest first: the
//!                            handover (signed by the old and the new key), when, and
//!                            with which release
//! ```
//!
//! Every release comes with the consortium's chain of handovers. Before checking a
//! release's signatures the site walks that chain from its current key
//! ([`maeum_tlog::handover::walk`]: each link verified under both keys, forks and
//! cycles refused), records each link it takes here and in its log, and checks a new
//! release under the key the walk ends at. A coordinator without the release key
//! cannot make a link, so it cannot move the pin to a key it holds; it can withhold
//! the chain, and then the site refuses releases signed with the new key (denial of
//! service, as withholding releases is). Releases installed before a rotation stay
//! verifiable offline (`predict`, `models verify`): they are checked under any key this
//! site has trusted.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tracing::info;

use maeum_tlog::handover::{self, KeyHandover, Role};
use maeum_tlog::{hex, unhex32};

use crate::enrol::Home;

/// The rotations this site followed.
pub const CHAIN_FILE: &str = "release-keys.json";

/// A rotation this site followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Followed {
    pub handover: KeyHandover,
    pub followed_ms: i64,
    /// The release that brought it.
    pub release: u32,
}

/// The release keys this site trusts, or none (an enrolment from before release keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// The key a new release must be signed with.
    pub current: [u8; 32],
    /// The key from enrolment.
    pub enrolled: [u8; 32],
    /// Every key this site trusted, for releases installed under an earlier one.
    pub all: Vec<[u8; 32]>,
    /// The rotations followed from the enrolment's key.
    pub followed: Vec<Followed>,
}

fn stored(home: &Home) -> Result<Vec<Followed>> {
    let p = home.path(CHAIN_FILE);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// The keys this site trusts now (`None`: its enrolment names no release key).
pub fn pinned(home: &Home) -> Result<Option<Pinned>> {
    let enrolment = home.enrolment()?;
    if enrolment.release_public_key.is_empty() {
        return Ok(None);
    }
    let enrolled = unhex32(&enrolment.release_public_key).context("enrolment.json: release_public_key")?;
    let kept = stored(home)?;
    let links: Vec<KeyHandover> = kept.iter().map(|f| f.handover.clone()).collect();
    let walked = handover::walk(Role::Release, &enrolment.consortium, &enrolled, &links)
        .with_context(|| format!("HOME/{CHAIN_FILE}"))?;
    let current = match walked.last() {
        Some(h) => h.keys()?.1,
        None => enrolled,
    };
    let mut all = vec![enrolled];
    for h in &links {
        let (old, new) = h.keys()?;
        all.extend([old, new].into_iter().filter(|k| !all.contains(k)).collect::<Vec<_>>());
    }
    let followed = kept.into_iter().filter(|f| walked.contains(&f.handover)).collect();
    Ok(Some(Pinned { current, enrolled, all, followed }))
}

/// Walks `chain` (served with release `version`) from this site's current key and keeps
/// every link taken; returns the key a new release must be signed with. `Err` refuses
/// the release: a link on the walk does not verify, or the chain forks or cycles.
pub fn follow(home: &Home, chain: &[KeyHandover], version: u32) -> Result<Option<[u8; 32]>> {
    let Some(pinned) = pinned(home)? else { return Ok(None) };
    let consortium = home.enrolment()?.consortium;
    let taken = handover::walk(Role::Release, &consortium, &pinned.current, chain)?;
    if taken.is_empty() {
        return Ok(Some(pinned.current));
    }
    let mut kept = stored(home)?;
    for h in &taken {
        info!(
            from = %&h.old_key[..16],
            to = %&h.new_key[..16],
            release = version,
            "followed a rotation of the consortium's release key (handover signed by the old and the new key)"
        );
        kept.push(Followed { handover: h.clone(), followed_ms: crate::now_ms(), release: version });
    }
    let p = home.path(CHAIN_FILE);
    maeum_models::write_file(&p, &serde_json::to_vec_pretty(&kept)?, false)
        .with_context(|| format!("writing {}", p.display()))?;
    let last = taken.last().map(KeyHandover::keys).transpose()?.map(|(_, new)| new);
    Ok(last.or(Some(pinned.current)))
}

/// For `doctor` and `status`: the current key, and how it was reached.
pub fn describe(p: &Pinned) -> String {
    match p.followed.len() {
        0 => format!("{}… (from enrolment)", &hex(&p.current)[..16]),
        n => format!(
            "{}… (from enrolment's {}… by {n} rotation{} this site followed)",
            &hex(&p.current)[..16],
            &hex(&p.enrolled)[..16],
            if n == 1 { "" } else { "s" }
        ),
    }
}
