//! Rotating the log's signing key (`docs/protocols/audit-log.md#rotating-the-log-key`).
//!
//! ```text
//! HOME/signing.key            the log key in use (Ed25519 PKCS#8)
//! HOME/signing.pub            its public half; new enrolment bundles carry it
//! HOME/signing-keys.json      every rotation so far, oldest first (maeum_tlog::handover)
//! HOME/signing.next.key       a rotation waiting for the next start, with
//! HOME/signing.handover.json  its handover (signed by the old and the new key)
//! ```
//!
//! `maeum-coordinator signing-key rotate` makes the new key beside the old one and
//! signs a handover with both; it touches neither the state nor the key in use, so it
//! can run while the coordinator serves. The next `serve` applies it before it signs
//! anything: it logs `log_key_rotated` (logged first: a crash before the swap logs it
//! twice, which the log's verification skips), appends the handover to
//! `signing-keys.json`, signs with the new key from then on, and swaps the files
//! (`signing.pub`, then `signing.key` by rename). Every later checkpoint is signed by
//! the new key; sites receive the chain with every checkpoint and release and walk it
//! from the key they pinned; an auditor pinning the first key follows the log's
//! `log_key_rotated` entries (AUD-22).

use std::path::Path;

use anyhow::{Context, Result, bail};
use ring::signature::{Ed25519KeyPair, KeyPair};

use maeum_tlog::handover::{self, KeyHandover, Role};
use maeum_tlog::{Event, hex, unhex32};

use crate::audit::AuditLog;
use crate::home::{Home, now_ms, write_file};

/// Every rotation so far.
pub const CHAIN_FILE: &str = "signing-keys.json";
/// The new key of a rotation waiting for the next start.
pub const NEXT_KEY: &str = "signing.next.key";
/// Its handover.
pub const PENDING: &str = "signing.handover.json";

/// A rotation waiting for the next start.
type Pending = crate::home::Pending<KeyHandover>;

impl Home {
    /// HOME/signing-keys.json (empty: never rotated).
    pub fn log_handovers(&self) -> Result<Vec<KeyHandover>> {
        self.handovers(CHAIN_FILE)
    }

    /// The log keys the current one replaced, oldest first.
    pub fn retired_log_keys(&self) -> Result<Vec<[u8; 32]>> {
        self.log_handovers()?.iter().map(|h| Ok(h.keys()?.0)).collect()
    }
}

/// `signing-key rotate`: a new log key beside the old one and their handover, for the
/// next start to apply.
pub fn rotate_cli(home: &Path, json: bool) -> Result<()> {
    let home = Home::new(home);
    Pending::none_waiting(&home, PENDING, "a rotation of the signing key")?;
    let old = home.signing_key()?;
    let (pkcs8, new) = crate::home::generate_ed25519("new signing")?;
    let h = KeyHandover::make(Role::Log, &home.consortium()?.name, &old, &new);
    write_file(&home.path(NEXT_KEY), pkcs8.as_ref(), true)?;
    Pending::stage(&home, PENDING, h.clone())?;
    if json {
        println!("{}", serde_json::json!({ "old_key": h.old_key, "new_key": h.new_key, "applied": false }));
        return Ok(());
    }
    println!("a new signing key is ready: {}… → {}…", &h.old_key[..16], &h.new_key[..16]);
    println!("  the coordinator applies it when it next starts: restart `maeum-coordinator serve`");
    println!("  (logged as log_key_rotated; sites follow the handover with the next checkpoint they witness)");
    Ok(())
}

/// Applies a waiting rotation to `audit` (at start, before anything is signed).
/// Returns the handover applied, if any.
pub fn apply_pending(home: &Home, audit: &mut AuditLog) -> Result<Option<KeyHandover>> {
    let p = home.path(PENDING);
    let Some(pending) = home.json_file::<Pending>(PENDING)? else { return Ok(None) };
    let h = pending.handover;
    let (old, new) = h.verify(Role::Log, &home.consortium()?.name).with_context(|| format!("{}", p.display()))?;
    let current = unhex32(&audit.public_key())?;
    let next = std::fs::read(home.path(NEXT_KEY)).with_context(|| format!("reading HOME/{NEXT_KEY}"))?;
    if current == new {
        // Applied before a crash; only the clean-up was left.
        let _ = std::fs::remove_file(&p);
        return Ok(None);
    }
    if current != old {
        bail!(
            "{}: the handover is from the key {}…, but the log signs with {}…",
            p.display(),
            &h.old_key[..16],
            &hex(&current)[..16]
        );
    }
    let pair =
        Ed25519KeyPair::from_pkcs8(&next).map_err(|_| anyhow::anyhow!("HOME/{NEXT_KEY} is not an Ed25519 key"))?;
    if pair.public_key().as_ref() != new {
        bail!("HOME/{NEXT_KEY} is not the key the handover names");
    }
    audit.append(
        now_ms(),
        Event::LogKeyRotated {
            operator: pending.operator,
            old_key: h.old_key.clone(),
            new_key: h.new_key.clone(),
            old_signature: h.old_signature.clone(),
            new_signature: h.new_signature.clone(),
        },
    )?;
    let mut chain = home.log_handovers()?;
    if chain.last() != Some(&h) {
        chain.push(h.clone());
    }
    write_file(&home.path(CHAIN_FILE), &serde_json::to_vec_pretty(&chain)?, false)?;
    audit.rotate(&next)?;
    write_file(&home.path("signing.pub"), format!("{}\n", h.new_key).as_bytes(), false)?;
    std::fs::rename(home.path(NEXT_KEY), home.path("signing.key")).context("replacing signing.key")?;
    std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    tracing::info!(
        from = %&h.old_key[..16],
        to = %&h.new_key[..16],
        "rotated the log's signing key (log_key_rotated); checkpoints are signed with the new key from now on"
    );
    Ok(Some(h))
}

/// `signing-key show`: the key in use, every rotation and a waiting one (offline).
pub fn show(home: &Path, json: bool) -> Result<()> {
    let home = Home::new(home);
    let current = home.read("signing.pub")?.trim().to_string();
    let chain = home.log_handovers()?;
    let waiting = home.json_file::<Pending>(PENDING).ok().flatten();
    if json {
        let v = serde_json::json!({
            "current": current,
            "rotations": chain,
            "waiting": waiting.as_ref().map(|p| p.handover.new_key.clone()),
        });
        println!("{v}");
        return Ok(());
    }
    println!("signing key  {current}");
    for (i, h) in chain.iter().enumerate() {
        println!("rotation {}   {}… → {}…", i + 1, &h.old_key[..16], &h.new_key[..16]);
    }
    if let Some(p) = waiting {
        println!("waiting      → {}… (applied at the next start)", &p.handover.new_key[..16]);
    }
    Ok(())
}

/// The chain a site walks, checked against the log key in use (a broken file is the
/// coordinator's error, found before anything is served).
pub fn chain_for_sites(home: &Home, first: &[u8; 32]) -> Result<Vec<KeyHandover>> {
    let chain = home.log_handovers()?;
    handover::walk(Role::Log, &home.consortium()?.name, first, &chain).with_context(|| format!("HOME/{CHAIN_FILE}"))
}
