//! Rotating the consortium's release key (`docs/protocols/releases.md#rotating-the-release-key`).
//!
//! ```text
//! HOME/release.pub         the consortium's first release key (hex); never rewritten
//! HOME/release-keys.json   every rotation since, oldest first (maeum_tlog::handover)
//! ```
//!
//! The current release key is where the walk from `release.pub` along
//! `release-keys.json` ends. A rotation is made where the old key is
//! (`maeum-coordinator release-key rotate --key OLD --new-key NEW`): the CLI signs a
//! handover with both keys and sends it (`Control.RotateReleaseKey`); the coordinator
//! checks it hands over from the current key, logs it (`release_key_rotated`, logged
//! first: a crash before the file is written logs it twice, never not at all; the
//! signatures are deterministic, so the retried rotation is the same entry) and appends
//! it to `release-keys.json` in one atomic write. Sites receive the chain with every
//! release and walk it from the key they pinned; new enrolment bundles carry the
//! current key.

use std::path::Path;

use anyhow::{Context, Result, bail};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Serialize;

use maeum_protocols::wire::pb;
use maeum_protocols::wire::release::{handover_from_pb, handover_to_pb, handovers_from_pb};
use maeum_tlog::handover::{self, KeyHandover, Role};
use maeum_tlog::{Event, hex, unhex32};

use crate::home::{Home, write_file};
use crate::server::Coord;

/// The chain of rotations, beside `release.pub`.
pub const CHAIN_FILE: &str = "release-keys.json";

/// The consortium's release keys: the first, the rotations walked from it, the current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseKeys {
    pub first: [u8; 32],
    pub chain: Vec<KeyHandover>,
    pub current: [u8; 32],
}

impl ReleaseKeys {
    /// Every key that has been the release key, oldest first.
    pub fn all(&self) -> Vec<[u8; 32]> {
        let mut keys = vec![self.first];
        keys.extend(self.chain.iter().filter_map(|h| h.keys().ok().map(|(_, new)| new)));
        keys
    }

    pub fn to_pb(&self) -> pb::ReleaseKeyInfo {
        pb::ReleaseKeyInfo {
            current: self.current.to_vec(),
            first: self.first.to_vec(),
            handovers: self.chain.iter().map(handover_to_pb).collect(),
        }
    }
}

/// A rotation the coordinator refused (the reason is for the operator).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RotationRefused(pub String);

impl Home {
    /// HOME/release-keys.json as stored (empty: never rotated).
    pub fn release_handovers(&self) -> Result<Vec<KeyHandover>> {
        self.handovers(CHAIN_FILE)
    }

    /// The release keys, or `None` for a consortium created before release keys.
    pub fn release_keys(&self) -> Result<Option<ReleaseKeys>> {
        let p = self.path("release.pub");
        let first = match std::fs::read_to_string(&p) {
            Ok(text) => unhex32(text.trim()).with_context(|| format!("{} is not 32 bytes of hex", p.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let consortium = self.consortium()?.name;
        let chain = handover::walk(Role::Release, &consortium, &first, &self.release_handovers()?)
            .with_context(|| format!("HOME/{CHAIN_FILE}"))?;
        let current = match chain.last() {
            Some(h) => h.keys()?.1,
            None => first,
        };
        Ok(Some(ReleaseKeys { first, chain, current }))
    }
}

/// `RotateReleaseKey`: checks `h` hands over from the current release key (both
/// signatures verified), logs it, then stores it. The same handover again after it
/// took effect (a retried call) is answered as done.
pub fn rotate(c: &Coord, h: &KeyHandover, operator: &str) -> Result<ReleaseKeys> {
    let _g = c.registry.guard();
    let keys = c.home.release_keys()?.ok_or_else(|| {
        RotationRefused("this consortium has no release key (HOME/release.pub); there is nothing to rotate".into())
    })?;
    if keys.chain.last() == Some(h) {
        return Ok(keys);
    }
    let consortium = c.home.consortium()?.name;
    let (old, new) = h.verify(Role::Release, &consortium).map_err(|e| RotationRefused(e.to_string()))?;
    if old != keys.current {
        return Err(RotationRefused(format!(
            "the handover is from the key {}…, but the consortium's release key is {}…; sign it with the current \
             release key",
            &h.old_key[..16],
            &hex(&keys.current)[..16]
        ))
        .into());
    }
    if keys.all().contains(&new) {
        return Err(RotationRefused(format!("the key {}… has been a release key before", &h.new_key[..16])).into());
    }
    c.record(Event::ReleaseKeyRotated {
        operator: operator.into(),
        old_key: h.old_key.clone(),
        new_key: h.new_key.clone(),
        old_signature: h.old_signature.clone(),
        new_signature: h.new_signature.clone(),
    })?;
    let mut stored = c.home.release_handovers()?;
    stored.push(h.clone());
    write_file(&c.home.path(CHAIN_FILE), &serde_json::to_vec_pretty(&stored)?, false)?;
    // A checkpoint over the rotation: sites follow it only once they can prove it.
    c.audit.checkpoint()?;
    c.home.release_keys()?.context("the release keys vanished")
}

/// The release key (hex) whose signature `r` carries: the current key or one it
/// replaced, walked from HOME/release.pub along HOME's chain and the one `r` came with.
pub fn signer(home: &Home, r: &maeum_protocols::wire::release::ReleaseMsg) -> Result<String> {
    let keys =
        home.release_keys()?.context("the release carries a release-key signature, but HOME has no release.pub")?;
    let mut chain = keys.chain.clone();
    chain.extend(r.handovers.iter().cloned());
    for key in handover::reached(Role::Release, &home.consortium()?.name, &keys.first, &chain)? {
        if r.manifest.verify(&key, &r.release_signature).is_ok() {
            return Ok(hex(&key));
        }
    }
    bail!("the release-key signature verifies under none of the consortium's release keys")
}

/// A key file's Ed25519 key pair.
pub fn read_key(path: &Path) -> Result<Ed25519KeyPair> {
    let pkcs8 = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|_| anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key (a release.key)", path.display()))
}

/// What `release-key rotate` did.
#[derive(Debug, Serialize)]
pub struct Rotated {
    pub old_key: String,
    pub new_key: String,
    pub new_key_file: String,
    pub rotations: usize,
    /// The current release, signed again with the new key (0: none is current).
    pub resigned: u32,
}

/// `release-key rotate --key OLD --new-key NEW`: where the old key is. NEW is made (mode
/// 0600) unless it exists, in which case it is the new key (a retried rotation).
pub async fn rotate_cli(home: &Path, old_path: &Path, new_path: &Path, json: bool) -> Result<()> {
    if old_path.canonicalize().ok().is_some_and(|o| new_path.canonicalize().ok() == Some(o)) {
        bail!("--new-key must be another file than --key: the old key signs the handover");
    }
    let old = read_key(old_path)?;
    if !new_path.exists() {
        let (pkcs8, _) = crate::home::generate_ed25519("new release")?;
        write_file(new_path, pkcs8.as_ref(), true)?;
    }
    let new = read_key(new_path)?;
    let consortium = Home::new(home).consortium()?.name;
    let h = KeyHandover::make(Role::Release, &consortium, &old, &new);
    let mut client = crate::client::connect(home).await?;
    let info = client.rotate_release_key(handover_to_pb(&h)).await?.into_inner();
    let chain = handovers_from_pb("release_key_info.handovers", info.handovers)?;
    if info.current != new.public_key().as_ref() {
        bail!("the coordinator's release key is {}… after the rotation, not the new key", hex(&info.current));
    }
    // The current release, signed with the new key: sites enrolled from now on pin it.
    let list = client.list_releases(pb::ListReleasesRequest {}).await?.into_inner();
    let current = list.releases.iter().find(|r| r.current).and_then(|r| r.release.as_ref()).map_or(0, |r| r.version);
    if current > 0 {
        crate::models::sign_with(&mut client, &current.to_string(), &new).await?;
    }
    let out = Rotated {
        old_key: h.old_key,
        new_key: h.new_key,
        new_key_file: new_path.display().to_string(),
        rotations: chain.len(),
        resigned: current,
    };
    if json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    println!(
        "rotated the release key: {}… → {}… (rotation {} of this consortium)",
        &out.old_key[..16],
        &out.new_key[..16],
        out.rotations
    );
    println!("  the new key is in {}; keep it where the old one was kept", out.new_key_file);
    if current > 0 {
        println!("  the current release v{current} is signed with the new key");
    }
    println!("  sites follow the handover with the next release they install; older releases need");
    println!("  `maeum-coordinator models sign N --key {}` before they can be promoted again", out.new_key_file);
    Ok(())
}

/// `release-key show`: the keys from HOME, offline.
pub fn show(home: &Path, json: bool) -> Result<()> {
    let home = Home::new(home);
    let Some(keys) = home.release_keys()? else {
        bail!("this consortium has no release key (HOME/release.pub)");
    };
    let in_home = match home.release_key_file()? {
        None => "not in HOME",
        Some(k) if k.public_key().as_ref() == keys.current => {
            "HOME/release.key (the coordinator signs releases itself)"
        }
        Some(_) => "HOME/release.key is a retired key: releases wait for `models sign`",
    };
    if json {
        let v = serde_json::json!({
            "first": hex(&keys.first),
            "current": hex(&keys.current),
            "rotations": keys.chain,
            "private_key": in_home,
        });
        println!("{v}");
        return Ok(());
    }
    println!("release key  {}", hex(&keys.current));
    println!("first        {}", hex(&keys.first));
    for (i, h) in keys.chain.iter().enumerate() {
        println!("rotation {}   {}… → {}…", i + 1, &h.old_key[..16], &h.new_key[..16]);
    }
    println!("private key  {in_home}");
    Ok(())
}

/// `Control.RotateReleaseKey`'s argument, checked for shape.
pub fn from_request(h: pb::KeyHandover) -> Result<KeyHandover, maeum_protocols::wire::WireError> {
    handover_from_pb("key_handover", h)
}
