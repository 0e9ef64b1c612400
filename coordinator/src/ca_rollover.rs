//! Rolling the consortium CA over to a successor
//! (`docs/protocols/certificates.md#rolling-over-the-ca`).
//!
//! ```text
//! HOME/ca.pem, ca.key        the CA that issues certificates now
//! HOME/ca-retired.pem        the CAs it replaced, oldest first: still trusted, so that
//!                            certificates they issued work until renewed or expired
//! HOME/ca-handovers.json     every rollover so far, oldest first (maeum_pki::rollover)
//! HOME/ca.next.pem, .key     a rollover waiting for the next start, with
//! HOME/ca.handover.json      its handover (signed by the old and the new CA key)
//! ```
//!
//! `maeum-coordinator ca rotate` makes the successor beside the CA in use and signs a
//! handover with both keys; it changes nothing the coordinator serves, so it can run
//! while the coordinator runs. The next `serve` applies it before anything is issued:
//! it logs `ca_rotated` (logged first: a crash before the swap logs it twice, which the
//! log's verification skips), appends the old CA to `ca-retired.pem` and the handover
//! to `ca-handovers.json`, and swaps `ca.pem`/`ca.key` (by rename). From then on:
//!
//! - the coordinator trusts client certificates of every CA (current and retired);
//! - it issues every new certificate (approvals, renewals, its own) from the new CA;
//! - heartbeats ask each site still holding a certificate of a retired CA to renew;
//! - sites receive the handovers with every checkpoint and add the new CA to their
//!   trust only once the log proves the `ca_rotated` entry;
//! - the coordinator keeps serving its certificate of the retired CA until every
//!   approved site holds a certificate of the new one (each such site trusts the new
//!   CA: it checked its renewed certificate with it), then reissues its own.

use std::path::Path;

use anyhow::{Context, Result, bail};

use maeum_pki::identity::{self, Ca, SecretPem};
use maeum_pki::rollover::{self, CaHandover};
use maeum_tlog::Event;

use crate::audit::AuditLog;
use crate::home::{CA_DAYS, Home, now_ms, write_file};

/// Every rollover so far.
pub const CHAIN_FILE: &str = "ca-handovers.json";
/// The CAs the current one replaced, oldest first (PEM bundle).
pub const RETIRED: &str = "ca-retired.pem";
/// The successor of a rollover waiting for the next start.
pub const NEXT_CERT: &str = "ca.next.pem";
pub const NEXT_KEY: &str = "ca.next.key";
/// Its handover.
pub const PENDING: &str = "ca.handover.json";

/// A rollover waiting for the next start.
type Pending = crate::home::Pending<CaHandover>;

impl Home {
    /// HOME/ca-handovers.json (empty: never rolled over).
    pub fn ca_handovers(&self) -> Result<Vec<CaHandover>> {
        self.handovers(CHAIN_FILE)
    }

    /// Every CA this coordinator trusts, PEM, oldest first (the retired ones, then the
    /// current one): the first is the CA `consortium_init` names, whose fingerprint the
    /// lead published. Client certificates, session rosters and cosignatures are
    /// checked under these; new enrolment bundles carry them.
    pub fn trusted_cas_pem(&self) -> Result<String> {
        let mut pem = self.retired_cas_pem()?;
        pem.push_str(&self.read("ca.pem")?);
        Ok(pem)
    }

    /// HOME/ca-retired.pem (empty: never rolled over). An unreadable file is an error,
    /// never "none": a rollover rewrites it.
    fn retired_cas_pem(&self) -> Result<String> {
        match std::fs::read_to_string(self.path(RETIRED)) {
            Ok(retired) => Ok(retired),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path(RETIRED).display())),
        }
    }

    /// The consortium's first CA, PEM (the one `consortium_init` names; exports carry
    /// it).
    pub fn first_ca_pem(&self) -> Result<String> {
        let retired = self.retired_cas_pem()?;
        if retired.is_empty() {
            return self.read("ca.pem");
        }
        let first = identity::pem_to_der(&retired).with_context(|| format!("HOME/{RETIRED}"))?.remove(0);
        Ok(maeum_tlog::checkpoint::canonical_pem(&first))
    }

    /// The current CA certificate, DER.
    pub fn ca_der(&self) -> Result<Vec<u8>> {
        Ok(identity::leaf_der(&self.read("ca.pem")?)?)
    }
}

/// The first 16 hex digits of a fingerprint, for reading.
fn short(print: &str) -> &str {
    print.get(..16).unwrap_or(print)
}

/// `ca rotate`: a successor beside the CA in use and their handover, for the next
/// start to apply.
pub fn rotate_cli(home: &Path, json: bool) -> Result<()> {
    let home = Home::new(home);
    Pending::none_waiting(&home, PENDING, "a rollover of the CA")?;
    let old = home.ca().context("the CA key must be in HOME (ca.key) to sign the handover")?;
    let consortium = home.consortium()?.name;
    let generation = u32::try_from(home.ca_handovers()?.len()).unwrap_or(u32::MAX).saturating_add(2);
    let new = Ca::successor(&consortium, generation, CA_DAYS).context("generating the new CA")?;
    let handover = CaHandover::make(&consortium, &old, &new).context("signing the handover")?;
    write_file(&home.path(NEXT_KEY), new.key().expose().as_bytes(), true)?;
    write_file(&home.path(NEXT_CERT), new.cert_pem().as_bytes(), false)?;
    Pending::stage(&home, PENDING, handover.clone())?;
    let new_ca = handover.new_ca()?;
    if json {
        println!("{}", serde_json::json!({ "old_ca": handover.old_ca, "new_ca": new_ca, "applied": false }));
        return Ok(());
    }
    println!(
        "a new CA is ready: {}… → {}… (Maeum {consortium} CA {generation})",
        short(&handover.old_ca),
        short(&new_ca)
    );
    println!("  the coordinator applies it when it next starts: restart `maeum-coordinator serve`");
    println!("  (logged as ca_rotated; sites trust the new CA once the log proves it, then renew onto it)");
    Ok(())
}

/// Applies a waiting rollover (at start, before anything is issued). Returns the
/// handover applied, if any.
pub fn apply_pending(home: &Home, audit: &mut AuditLog) -> Result<Option<CaHandover>> {
    let p = home.path(PENDING);
    let Some(pending) = home.json_file::<Pending>(PENDING)? else { return Ok(None) };
    let h = pending.handover;
    let consortium = home.consortium()?.name;
    let current = home.ca_der()?;
    let new_ca = h.new_ca()?;
    if identity::fingerprint(&current) == new_ca {
        // Applied before a crash, which came after ca.pem was swapped: finish the swap.
        if home.path(NEXT_KEY).exists() {
            std::fs::rename(home.path(NEXT_KEY), home.path("ca.key")).context("replacing ca.key")?;
        }
        let _ = std::fs::remove_file(&p);
        return Ok(None);
    }
    h.verify(&consortium, &current).with_context(|| format!("{}: the handover from the CA in use", p.display()))?;
    let next = Ca::from_pem(&home.read(NEXT_CERT)?, &SecretPem::new(home.read(NEXT_KEY)?))
        .with_context(|| format!("HOME/{NEXT_CERT} and HOME/{NEXT_KEY}"))?;
    if identity::fingerprint(&next.cert_der()?) != new_ca {
        bail!("HOME/{NEXT_CERT} is not the CA the handover names");
    }
    audit.append(
        now_ms(),
        Event::CaRotated {
            operator: pending.operator,
            old_ca: h.old_ca.clone(),
            new_ca: new_ca.clone(),
            new_ca_pem: h.new_ca_pem.clone(),
            old_signature: h.old_signature.clone(),
            new_signature: h.new_signature.clone(),
        },
    )?;
    let mut chain = home.ca_handovers()?;
    if chain.last() != Some(&h) {
        chain.push(h.clone());
    }
    write_file(&home.path(CHAIN_FILE), &serde_json::to_vec_pretty(&chain)?, false)?;
    let mut retired = home.retired_cas_pem()?;
    let old_pem = maeum_tlog::checkpoint::canonical_pem(&current);
    if !retired.contains(&old_pem) {
        retired.push_str(&old_pem);
    }
    write_file(&home.path(RETIRED), retired.as_bytes(), false)?;
    // The certificate first: a start after a crash between the two sees the new CA in
    // ca.pem and finishes with the key (above).
    std::fs::rename(home.path(NEXT_CERT), home.path("ca.pem")).context("replacing ca.pem")?;
    std::fs::rename(home.path(NEXT_KEY), home.path("ca.key")).context("replacing ca.key")?;
    std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    tracing::info!(
        from = %short(&h.old_ca),
        to = %short(&new_ca),
        "rolled the consortium CA over (ca_rotated); new certificates are issued by the new CA, and both are trusted"
    );
    Ok(Some(h))
}

/// The rollovers sites walk, checked from the first CA to the one in `ca.pem` (a broken
/// or inconsistent file is the coordinator's error, found before anything is served).
pub fn chain_for_sites(home: &Home) -> Result<Vec<CaHandover>> {
    let chain = home.ca_handovers()?;
    let first = identity::leaf_der(&home.first_ca_pem()?)?;
    let taken = rollover::follow(&home.consortium()?.name, &[first.clone().into()], &chain)
        .with_context(|| format!("HOME/{CHAIN_FILE}"))?;
    if taken.len() != chain.len() {
        bail!("HOME/{CHAIN_FILE}: not every rollover follows from the first CA");
    }
    let end = taken.last().map_or(first, |(_, ca)| ca.to_vec());
    if end != home.ca_der()? {
        bail!("HOME/{CHAIN_FILE} and HOME/{RETIRED} do not lead to the CA in HOME/ca.pem");
    }
    Ok(chain)
}

/// Whether every approved site (not revoked, in HOME/sites) holds a certificate of the
/// current CA: then every site trusts it, and the coordinator may serve a certificate
/// it issued. `revoked` names the revoked sites.
pub fn sites_moved(home: &Home, revoked: &dyn Fn(&str) -> bool) -> Result<(usize, usize)> {
    let ca = home.ca_der()?;
    let (mut moved, mut total) = (0, 0);
    let dir = home.sites();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(site) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".pem")) else {
            continue;
        };
        if revoked(site) {
            continue;
        }
        total += 1;
        let pem = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        if identity::leaf_der(&pem).is_ok_and(|der| rollover::issued_by(&der, &ca)) {
            moved += 1;
        }
    }
    Ok((moved, total))
}

/// `ca show`: the CA in use, every rollover and one waiting (offline).
pub fn show(home: &Path, json: bool) -> Result<()> {
    let home = Home::new(home);
    let current = identity::fingerprint(&home.ca_der()?);
    let chain = home.ca_handovers()?;
    let waiting = home.json_file::<Pending>(PENDING).ok().flatten();
    let (moved, total) = sites_moved(&home, &|_| false)?;
    if json {
        let v = serde_json::json!({
            "current": current,
            "rotations": chain.iter().map(|h| serde_json::json!({"old_ca": h.old_ca, "new_ca": h.new_ca().unwrap_or_default()})).collect::<Vec<_>>(),
            "waiting": waiting.as_ref().and_then(|p| p.handover.new_ca().ok()),
            "sites_on_current_ca": moved,
            "sites": total,
        });
        println!("{v}");
        return Ok(());
    }
    println!("CA           {current}");
    for (i, h) in chain.iter().enumerate() {
        println!("rollover {}   {}… → {}…", i + 1, short(&h.old_ca), short(&h.new_ca().unwrap_or_default()));
    }
    println!("sites        {moved} of {total} site record(s) hold a certificate of this CA (revoked ones included)");
    if let Some(p) = waiting {
        println!("waiting      → {}… (applied at the next start)", short(&p.handover.new_ca().unwrap_or_default()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::storage::{Db, Engine};

    fn setup() -> (tempfile::TempDir, Home, Db, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        crate::home::init(dir.path(), "heart", "127.0.0.1:7443", Engine::Sled).unwrap();
        let home = Home::new(dir.path());
        let db = Db::open(&home.state(), Engine::Sled).unwrap();
        let key = std::fs::read(home.path("signing.key")).unwrap();
        let log = AuditLog::open(&db, "maeum/heart".into(), &key, &[]).unwrap();
        (dir, home, db, log)
    }

    fn rollovers(log: &AuditLog) -> usize {
        (0..log.size()).filter(|&seq| log.entry(seq).unwrap().event.kind() == "ca_rotated").count()
    }

    #[test]
    fn a_rollover_is_staged_applied_once_and_trusted_beside_the_old_ca() {
        let (dir, home, _db, mut log) = setup();
        let old = home.read("ca.pem").unwrap();
        rotate_cli(dir.path(), true).unwrap();
        let again = rotate_cli(dir.path(), true).unwrap_err().to_string();
        assert!(again.contains("already waiting"), "{again}");
        assert_eq!(home.read("ca.pem").unwrap(), old, "staging changes nothing served");

        let h = apply_pending(&home, &mut log).unwrap().expect("applied");
        assert_eq!(identity::fingerprint(&home.ca_der().unwrap()), h.new_ca().unwrap());
        home.ca().expect("ca.pem and ca.key belong together");
        let trusted = identity::pem_to_der(&home.trusted_cas_pem().unwrap()).unwrap();
        assert_eq!(trusted.len(), 2);
        assert_eq!(trusted[0].to_vec(), identity::leaf_der(&old).unwrap(), "oldest first");
        assert_eq!(identity::leaf_der(&home.first_ca_pem().unwrap()).unwrap(), identity::leaf_der(&old).unwrap());
        assert_eq!(chain_for_sites(&home).unwrap(), vec![h]);
        assert_eq!(rollovers(&log), 1);
        assert!(apply_pending(&home, &mut log).unwrap().is_none(), "nothing waits any more");
        assert_eq!(rollovers(&log), 1);
    }

    #[test]
    fn a_crash_between_the_two_renames_is_finished_at_the_next_start() {
        let (dir, home, _db, mut log) = setup();
        rotate_cli(dir.path(), true).unwrap();
        // The first start logged and swapped ca.pem, then died before ca.key.
        let h = apply_pending(&home, &mut log).unwrap().unwrap();
        rotate_cli(dir.path(), true).unwrap();
        let pending: Pending = home.json_file(PENDING).unwrap().unwrap();
        assert_eq!(pending.handover.old_ca, h.new_ca().unwrap());
        std::fs::rename(home.path(NEXT_CERT), home.path("ca.pem")).unwrap();
        assert!(home.ca().is_err(), "ca.pem and ca.key disagree mid-swap");
        assert!(apply_pending(&home, &mut log).unwrap().is_none());
        home.ca().expect("the next start finished the swap");
        assert!(!home.path(PENDING).exists() && !home.path(NEXT_KEY).exists());
    }

    #[test]
    fn a_handover_from_another_ca_than_the_one_in_use_is_refused_and_nothing_is_logged() {
        let (dir, home, _db, mut log) = setup();
        rotate_cli(dir.path(), true).unwrap();
        let size = log.size();
        let other = Ca::generate("heart", 30).unwrap();
        write_file(&home.path("ca.pem"), other.cert_pem().as_bytes(), false).unwrap();
        let e = format!("{:#}", apply_pending(&home, &mut log).unwrap_err());
        assert!(e.contains("hands over from"), "{e}");
        assert_eq!(log.size(), size);
    }
}
