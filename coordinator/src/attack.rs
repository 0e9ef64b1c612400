//! Test-only: a coordinator that plays the attacker, so that end-to-end tests can show
//! that sites enforce privacy themselves (`tests/tests/attacks.rs`,
//! `docs/protocols/threat-model.md`). Compiled in only with the `fault-injection`
//! cargo feature, which the end-to-end crate turns on; release builds and the images
//! (`cargo build --release -p maeum-coordinator …`) leave it off, and then
//! [`current`] is always `None` and no environment variable is read.
//!
//! `MAEUM_COORDINATOR_ATTACK` selects the attack:
//! - `isolate:SITE` — every round's session holds SITE and one other site only (with
//!   a sybil, the other site's input is known, so the sum is SITE's update);
//! - `difference:SITE` — after a round's sum is unmasked, pretend the attempt failed
//!   and retry the round without SITE (the two sums differ by SITE's update);
//! - `divergent:SITE` — hand every site but SITE a different base model (with dead
//!   units their updates are zero, so the sum is SITE's update);
//! - `tamper-offer` — offer a job file other than the one submitted and logged (here
//!   with secure aggregation switched off), under the logged hash;
//! - `unlogged-offer` — the same file under its own hash: an offer the audit log does
//!   not show;
//! - `sybil:SITE` — put a certificate for SITE that the CA signed but the log never
//!   approved (a sybil minted outside `sites approve`) into every session.
//! - `graph-seed:SITE` — in a SecAgg+ session, grind the neighbour graph for SITE:
//!   after seeing every nonce, relay to SITE a substitute nonce for another party,
//!   chosen so that SITE's neighbours are the parties the coordinator prefers.
//! - `forge-release` — a compromised serving host without the release key: promote a
//!   release that waits for it anyway, with a "release signature" made by the signing
//!   key it does hold.
//! - `forge-handover` — the same host serves every release with a release-key handover
//!   of its own making (from the pinned key to a key it holds, "signed" by the signing
//!   key) and signs the release with its key.
//! - `unlogged-log-rotation` — the host, which holds the log key, hands every site over
//!   to a log key of its own with a valid handover, and signs the latest checkpoint
//!   with it, without logging the rotation.
//! - `unlogged-ca-rotation` — the host, which holds the CA key, shows every site a
//!   rollover of the CA to one of its own with a valid handover, without logging it.
//!
//! Each attack also turns off the coordinator's own check that would stop it, so the
//! test sees what the sites do about it. The existing test hooks (a forked audit view,
//! tampered releases) are behind the same feature.

/// One attack (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attack {
    Isolate(String),
    Difference(String),
    Divergent(String),
    TamperOffer,
    UnloggedOffer,
    Sybil(String),
    GraphSeed(String),
    ForgeRelease,
    ForgeHandover,
    UnloggedLogRotation,
    UnloggedCaRotation,
}

#[cfg(feature = "fault-injection")]
fn parse(spec: &str) -> Option<Attack> {
    let (kind, site) = spec.split_once(':').unwrap_or((spec, ""));
    let site = site.to_string();
    match kind {
        "isolate" if !site.is_empty() => Some(Attack::Isolate(site)),
        "difference" if !site.is_empty() => Some(Attack::Difference(site)),
        "divergent" if !site.is_empty() => Some(Attack::Divergent(site)),
        "sybil" if !site.is_empty() => Some(Attack::Sybil(site)),
        "graph-seed" if !site.is_empty() => Some(Attack::GraphSeed(site)),
        "tamper-offer" => Some(Attack::TamperOffer),
        "unlogged-offer" => Some(Attack::UnloggedOffer),
        "forge-release" => Some(Attack::ForgeRelease),
        "forge-handover" => Some(Attack::ForgeHandover),
        "unlogged-log-rotation" => Some(Attack::UnloggedLogRotation),
        "unlogged-ca-rotation" => Some(Attack::UnloggedCaRotation),
        _ => None,
    }
}

/// The attack this coordinator plays, if any (read once).
#[cfg(feature = "fault-injection")]
pub fn current() -> Option<Attack> {
    static ATTACK: std::sync::OnceLock<Option<Attack>> = std::sync::OnceLock::new();
    ATTACK
        .get_or_init(|| {
            let spec = std::env::var("MAEUM_COORDINATOR_ATTACK").ok()?;
            let attack = parse(&spec);
            match &attack {
                Some(a) => tracing::warn!(attack = ?a, "FAULT INJECTION: this coordinator plays an attacker"),
                None => tracing::warn!(spec, "FAULT INJECTION: unknown MAEUM_COORDINATOR_ATTACK; ignored"),
            }
            attack
        })
        .clone()
}

/// Without the `fault-injection` feature there is never an attack.
#[cfg(not(feature = "fault-injection"))]
pub fn current() -> Option<Attack> {
    None
}

/// The value of a test-only environment variable, or `None` without the
/// `fault-injection` feature.
pub fn test_env(name: &str) -> Option<String> {
    if cfg!(feature = "fault-injection") { std::env::var(name).ok() } else { None }
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn attacks_parse() {
        assert_eq!(parse("isolate:site-1"), Some(Attack::Isolate("site-1".into())));
        assert_eq!(parse("tamper-offer"), Some(Attack::TamperOffer));
        assert_eq!(parse("graph-seed:site-2"), Some(Attack::GraphSeed("site-2".into())));
        assert_eq!(parse("isolate"), None);
        assert_eq!(parse("nonsense:x"), None);
    }
}
