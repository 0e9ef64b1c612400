//! The consortium keys this site trusts and their rotations: the release key
//! (`docs/protocols/releases.md#rotating-the-release-key`), the log's signing key
//! (`docs/protocols/audit-log.md#rotating-the-log-key`) and the consortium CA
//! (`docs/protocols/certificates.md#rolling-over-the-ca`, [`follow_cas`]).
//!
//! ```text
//! HOME/enrolment.json        release_public_key, signing_public_key: the keys pinned
//!                            at enrolment
//! HOME/release-keys.json     every rotation of the release key this site followed,
//! HOME/signing-keys.json     and of the log key, oldest first: the handover (signed by
//!                            the old and the new key), when, and what brought it
//! HOME/ca.pem                every CA this site trusts, oldest first
//! HOME/ca-handovers.json     every CA rollover this site followed, the same way
//! HOME/coordinator-ca.txt    the newest CA the coordinator was seen serving a
//!                            certificate of: its certificate is accepted from it on only
//! ```
//!
//! Every release comes with the consortium's chains of handovers, and every checkpoint
//! with the log key's. Before checking a signature the site walks the chain from its
//! current key ([`walk`]; [`maeum_tlog::handover::walk`]: each link verified under both
//! keys, forks and cycles refused) and checks what came with it under the key the walk
//! ends at. It keeps a link ([`keep`]: here and in its log) only once the coordinator
//! has proved the rotation's entry (`log_key_rotated`, `release_key_rotated`) in a
//! checkpoint this site verified ([`Walk::check_logged`]): a rotation every auditor can
//! see. A coordinator without the old key cannot make a link; one that holds it (the
//! log key lives on its host) still cannot hand a site over unseen. It can withhold the
//! chain, and then the site refuses what the new key signed (denial of service, as
//! withholding releases is). Releases installed and checkpoints witnessed before a
//! rotation stay verifiable offline (`predict`, `models verify`): they are checked
//! under any key this site has trusted.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tracing::info;

use maeum_pki::identity::{self, CertificateDer};
use maeum_pki::rollover::{self, CaHandover};
use maeum_tlog::handover::{self, KeyHandover, Role};
use maeum_tlog::{hex, unhex32};

use crate::enrol::Home;

/// The rotations of `role`'s key this site followed (a file in HOME).
pub fn chain_file(role: Role) -> &'static str {
    match role {
        Role::Release => "release-keys.json",
        Role::Log => "signing-keys.json",
    }
}

/// A rotation this site followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Followed {
    pub handover: KeyHandover,
    pub followed_ms: i64,
    /// What brought it (`release v2`, `checkpoint of 40 entries`).
    pub with: String,
}

/// The keys of one role this site trusts, or none (an enrolment from before release
/// keys).
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

fn stored(home: &Home, role: Role) -> Result<Vec<Followed>> {
    let p = home.path(chain_file(role));
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// The `role` keys this site trusts now (`None`: its enrolment names no release key).
pub fn pinned(home: &Home, role: Role) -> Result<Option<Pinned>> {
    let enrolment = home.enrolment()?;
    let (field, key) = match role {
        Role::Release => ("release_public_key", &enrolment.release_public_key),
        Role::Log => ("signing_public_key", &enrolment.signing_public_key),
    };
    if key.is_empty() {
        return Ok(None);
    }
    let enrolled = unhex32(key).with_context(|| format!("enrolment.json: {field}"))?;
    let kept = stored(home, role)?;
    let links: Vec<KeyHandover> = kept.iter().map(|f| f.handover.clone()).collect();
    let walked = handover::walk(role, &enrolment.consortium, &enrolled, &links)
        .with_context(|| format!("HOME/{}", chain_file(role)))?;
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

/// A walk along a served chain from this site's pin, not yet kept.
#[derive(Debug, Clone)]
pub struct Walk {
    pub role: Role,
    pub pinned: Pinned,
    /// The links taken, in order (empty: the pin is still current).
    pub taken: Vec<KeyHandover>,
    /// The links that led to the enrolment's key, newest first: for a site enrolled
    /// after a rotation, the keys that signed what came before (not yet kept ones).
    pub before: Vec<KeyHandover>,
}

impl Walk {
    /// The key new signatures must be by.
    pub fn current(&self) -> [u8; 32] {
        self.taken.last().and_then(|h| h.keys().ok()).map_or(self.pinned.current, |(_, new)| new)
    }

    /// Every key trusted once this walk is kept.
    pub fn all(&self) -> Vec<[u8; 32]> {
        let mut all = self.pinned.all.clone();
        all.extend(self.taken.iter().filter_map(|h| h.keys().ok()).map(|(_, new)| new));
        all.extend(self.before.iter().filter_map(|h| h.keys().ok()).map(|(old, _)| old));
        all
    }

    /// Whether there is anything to keep.
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty() && self.before.is_empty()
    }

    /// Every link taken is a rotation the log records: `logged` are the rotation
    /// entries the coordinator proved against a checkpoint this site verified.
    /// Otherwise the coordinator showed this site a rotation its log does not hold.
    pub fn check_logged(&self, logged: &[maeum_tlog::Entry]) -> Result<()> {
        for h in self.taken.iter().chain(&self.before) {
            if !logged.iter().any(|e| handover::in_entry(self.role, e).as_ref() == Some(h)) {
                anyhow::bail!(
                    "the coordinator hands this site over from the {} key {}… to {}… with a rotation its audit log \
                     does not record: refusing it",
                    self.role.name(),
                    &h.old_key[..16],
                    &h.new_key[..16]
                );
            }
        }
        Ok(())
    }
}

/// Walks `chain` from this site's current `role` key (`None`: no such key pinned).
/// `Err` refuses what came with it: a link on the walk does not verify, or the chain
/// forks or cycles.
pub fn walk(home: &Home, role: Role, chain: &[KeyHandover]) -> Result<Option<Walk>> {
    let Some(pinned) = pinned(home, role)? else { return Ok(None) };
    let consortium = home.enrolment()?.consortium;
    let taken = handover::walk(role, &consortium, &pinned.current, chain)?;
    let kept = stored(home, role)?;
    let before = handover::predecessors(role, &consortium, &pinned.enrolled, chain)?
        .into_iter()
        .filter(|h| !kept.iter().any(|f| f.handover == *h))
        .collect();
    Ok(Some(Walk { role, pinned, taken, before }))
}

/// Keeps the links `walk` took (HOME/…-keys.json and the log); `with` says what
/// brought them (a release, a checkpoint).
pub fn keep(home: &Home, walk: &Walk, with: &str) -> Result<()> {
    if walk.is_empty() {
        return Ok(());
    }
    let mut kept = stored(home, walk.role)?;
    for h in &walk.before {
        if !kept.iter().any(|f| f.handover == *h) {
            info!(
                key = %&h.old_key[..16],
                with,
                "learnt an earlier {} key of the consortium (it handed over to the key this site enrolled with)",
                walk.role.name()
            );
            kept.push(Followed { handover: h.clone(), followed_ms: crate::now_ms(), with: with.to_string() });
        }
    }
    for h in &walk.taken {
        if kept.iter().any(|f| f.handover == *h) {
            continue;
        }
        info!(
            from = %&h.old_key[..16],
            to = %&h.new_key[..16],
            with,
            "followed a rotation of the consortium's {} key (handover signed by the old and the new key, in the audit log)",
            walk.role.name()
        );
        kept.push(Followed { handover: h.clone(), followed_ms: crate::now_ms(), with: with.to_string() });
    }
    let p = home.path(chain_file(walk.role));
    maeum_models::write_file(&p, &serde_json::to_vec_pretty(&kept)?, false)
        .with_context(|| format!("writing {}", p.display()))
}

/// For `doctor` and `status`: the current key, and how it was reached.
pub fn describe(p: &Pinned) -> String {
    match p.followed.len() {
        0 if p.all.len() > 1 => format!(
            "{}… (from enrolment; {} earlier key(s) known, for what they signed)",
            &hex(&p.current)[..16],
            p.all.len() - 1
        ),
        0 => format!("{}… (from enrolment)", &hex(&p.current)[..16]),
        n => format!(
            "{}… (from enrolment's {}… by {n} rotation{} this site followed)",
            &hex(&p.current)[..16],
            &hex(&p.enrolled)[..16],
            if n == 1 { "" } else { "s" }
        ),
    }
}

/// Every CA rollover this site followed (a file in HOME).
pub const CA_CHAIN: &str = "ca-handovers.json";

/// A CA rollover this site followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowedCa {
    pub handover: CaHandover,
    pub followed_ms: i64,
    /// What brought it (`checkpoint of 40 entries`).
    pub with: String,
}

/// The CAs this site trusts (HOME/ca.pem: the enrolment's, then each it followed).
pub fn trusted_cas(home: &Home) -> Result<Vec<CertificateDer<'static>>> {
    identity::pem_to_der(&home.read("ca.pem")?).context("HOME/ca.pem")
}

/// HOME/coordinator-ca.txt: the SHA-256 fingerprint of the newest CA whose certificate
/// the coordinator was seen serving (absent: never rolled over, or not seen yet). The
/// coordinator's own certificate is accepted from that CA and later ones only, so a
/// retired CA's key cannot impersonate the coordinator once it has moved
/// (`docs/protocols/certificates.md#rolling-over-the-ca`).
pub const SERVER_CA: &str = "coordinator-ca.txt";

/// The CAs the coordinator's certificate may come from: HOME/ca.pem from the CA in
/// [`SERVER_CA`] on (all of it when the file is absent).
pub fn server_cas(home: &Home) -> Result<Vec<CertificateDer<'static>>> {
    let mut cas = trusted_cas(home)?;
    let floor = match std::fs::read_to_string(home.path(SERVER_CA)) {
        Ok(f) => f.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cas),
        Err(e) => return Err(e).with_context(|| format!("reading HOME/{SERVER_CA}")),
    };
    let Some(at) = cas.iter().position(|ca| identity::fingerprint(ca) == floor) else {
        anyhow::bail!(
            "HOME/{SERVER_CA} names a CA ({}…) that HOME/ca.pem does not hold; delete it to accept the \
             coordinator's certificate from any CA this site trusts",
            floor.chars().take(16).collect::<String>()
        );
    };
    Ok(cas.split_off(at))
}

/// [`server_cas`] as PEM.
pub fn server_cas_pem(home: &Home) -> Result<String> {
    Ok(server_cas(home)?.iter().map(|ca| maeum_tlog::checkpoint::canonical_pem(ca)).collect())
}

/// The CA in effect (the last this site trusts) while the coordinator has not been seen
/// serving a certificate of it: after a rollover, until the coordinator moves.
pub fn server_ca_pending(home: &Home) -> Result<Option<CertificateDer<'static>>> {
    let served = server_cas(home)?;
    Ok(if served.len() > 1 { served.last().cloned() } else { None })
}

/// Records that the coordinator serves a certificate of `ca`, the CA in effect: from
/// now on its certificate is accepted from `ca` only (and from later CAs).
pub fn set_server_ca(home: &Home, ca: &CertificateDer<'_>) -> Result<()> {
    let print = identity::fingerprint(ca);
    maeum_models::write_atomic(&home.path(SERVER_CA), format!("{print}\n").as_bytes())
        .with_context(|| format!("writing HOME/{SERVER_CA}"))
}

/// Follows the CA rollovers `served` with the checkpoint `(size, root)` this site just
/// verified: walks them from the CAs it trusts (each handover verified under the old
/// and the new CA key, `maeum_pki::rollover::follow`), and trusts a new CA only once
/// the coordinator proves its `ca_rotated` entry against that checkpoint: a CA every
/// auditor can see. Returns how many CAs it added. `Err`: a forged or unlogged
/// rollover, refused; what this site trusts is unchanged.
pub async fn follow_cas(
    home: &Home,
    client: &mut crate::daemon::Client,
    served: &[CaHandover],
    (size, root): (u64, &maeum_tlog::merkle::Hash),
) -> Result<usize> {
    let consortium = home.enrolment()?.consortium;
    let taken = rollover::follow(&consortium, &trusted_cas(home)?, served).context("a CA handover")?;
    if taken.is_empty() {
        return Ok(0);
    }
    let logged = crate::witness::logged_rotations(client, size, root).await?;
    let logged: Vec<CaHandover> = logged.iter().filter_map(handover::ca_in_entry).map(|(h, _)| h).collect();
    for (h, new) in &taken {
        let same = |l: &CaHandover| {
            l.old_ca == h.old_ca
                && l.new_ca().ok().as_deref() == Some(identity::fingerprint(new).as_str())
                && l.old_signature == h.old_signature
                && l.new_signature == h.new_signature
        };
        if !logged.iter().any(same) {
            anyhow::bail!(
                "the coordinator shows this site a rollover of the CA from {}… to {}… that its audit log does not \
                 record: refusing it (this site keeps trusting only the CAs it trusts now)",
                &h.old_ca[..16],
                &identity::fingerprint(new)[..16]
            );
        }
    }
    let mut pem = home.read("ca.pem")?;
    let mut kept: Vec<FollowedCa> = match std::fs::read(home.path(CA_CHAIN)) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing HOME/{CA_CHAIN}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading HOME/{CA_CHAIN}")),
    };
    let with = format!("checkpoint of {size} entries");
    for (h, new) in &taken {
        pem.push_str(&maeum_tlog::checkpoint::canonical_pem(new));
        kept.push(FollowedCa { handover: h.clone(), followed_ms: crate::now_ms(), with: with.clone() });
        info!(
            from = %&h.old_ca[..16],
            to = %&identity::fingerprint(new)[..16],
            with,
            "followed a rollover of the consortium CA (handover signed by both CA keys, in the audit log); the new CA \
             is trusted beside the old one"
        );
    }
    // The record first: a crash between the two leaves a CA followed but not yet
    // trusted, which the next checkpoint completes.
    maeum_models::write_file(&home.path(CA_CHAIN), &serde_json::to_vec_pretty(&kept)?, false)
        .with_context(|| format!("writing HOME/{CA_CHAIN}"))?;
    maeum_models::write_atomic(&home.path("ca.pem"), pem.as_bytes()).context("writing HOME/ca.pem")?;
    Ok(taken.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use maeum_pki::identity::Ca;

    #[test]
    fn the_coordinator_s_certificate_is_accepted_from_the_newest_ca_it_was_seen_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        let (old, new) = (Ca::generate("c", 30).expect("ca"), Ca::generate("c", 30).expect("ca"));
        let der = |ca: &Ca| identity::leaf_der(ca.cert_pem()).expect("der");
        std::fs::write(home.path("ca.pem"), old.cert_pem()).expect("write");
        assert_eq!(server_cas(&home).expect("cas").len(), 1);
        assert!(server_ca_pending(&home).expect("pending").is_none(), "no rollover: nothing to ask");

        // After a rollover: both until the coordinator is seen serving the new CA.
        std::fs::write(home.path("ca.pem"), format!("{}{}", old.cert_pem(), new.cert_pem())).expect("write");
        assert_eq!(server_cas(&home).expect("cas").len(), 2);
        let pending = server_ca_pending(&home).expect("pending").expect("the new CA");
        assert_eq!(pending.as_ref(), der(&new).as_slice());
        set_server_ca(&home, &pending).expect("set");
        let only = server_cas(&home).expect("cas");
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].as_ref(), der(&new).as_slice());
        assert!(server_ca_pending(&home).expect("pending").is_none());
        assert_eq!(identity::pem_to_der(&server_cas_pem(&home).expect("pem")).expect("pem").len(), 1);
        assert_eq!(trusted_cas(&home).expect("all").len(), 2, "ca.pem keeps every CA");

        // A file naming a CA this site does not trust is an error that says what to do.
        std::fs::write(home.path(SERVER_CA), "ab".repeat(32)).expect("write");
        let err = format!("{:#}", server_cas(&home).expect_err("refused"));
        assert!(err.contains("names a CA (abababababababab…) that HOME/ca.pem does not hold"), "{err}");
    }
}
