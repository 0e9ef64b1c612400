//! The session roster: before advertising keys a site proves that every member's
//! certificate (itself included) is one the audit log shows approved — a
//! `site_approved` or `site_key_replaced` entry with that certificate's fingerprint, not
//! replaced or revoked since — against a checkpoint it witnessed. A certificate the CA
//! signed but the log does not show (a sybil minted outside `sites approve`) is refused
//! (`roster`). What it proved goes to HOME/audit/roster.json, which
//! `maeum-site audit sites` prints.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use maeum_tlog::Event;

use crate::daemon::{Agent, Client};
use crate::enrol::Home;
use crate::policy::Refusal;

const ROSTER: &str = "audit/roster.json";

/// One member as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// SHA-256 (hex) of the certificate the site presented in a session.
    pub cert_fingerprint: String,
    /// The log entry that approved it (`site_approved` or `site_key_replaced`).
    pub approved_by: String,
    pub approved_seq: u64,
    /// When the coordinator appended that entry (its clock), ms since the epoch.
    pub approved_ms: i64,
    /// When this site proved it.
    pub proven_ms: i64,
}

fn load(home: &Home) -> BTreeMap<String, Member> {
    std::fs::read_to_string(home.path(ROSTER)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// Whether `fingerprint` is `site`'s approved certificate after these entries (in log
/// order), and the entry that approved it.
fn approved(entries: &[(u64, i64, &Event)], site: &str, fingerprint: &str) -> Option<(String, u64, i64)> {
    let mut current = None;
    for (seq, time_ms, e) in entries {
        match e {
            Event::SiteApproved { site: s, cert_fingerprint, .. } if s == site && cert_fingerprint == fingerprint => {
                current = Some(("site_approved".to_string(), *seq, *time_ms));
            }
            Event::SiteKeyReplaced { site: s, new_cert_fingerprint, .. }
                if s == site && new_cert_fingerprint == fingerprint =>
            {
                current = Some(("site_key_replaced".to_string(), *seq, *time_ms));
            }
            Event::SiteKeyReplaced { site: s, old_cert_fingerprint, .. }
                if s == site && old_cert_fingerprint == fingerprint =>
            {
                current = None;
            }
            Event::SiteRevoked { site: s, .. } if s == site => current = None,
            _ => {}
        }
    }
    current
}

/// Proves every member's certificate against the log (see the module documentation).
/// `members` are (site id, certificate DER). A member the log does not show approved
/// is a [`Refusal`]; an unreachable coordinator is an ordinary error.
pub(crate) async fn check(agent: &Agent, client: &mut Client, members: &[(String, Vec<u8>)]) -> Result<()> {
    let mut roster = load(&agent.home);
    let needed: Vec<(String, String)> = members
        .iter()
        .map(|(s, der)| (s.clone(), maeum_pki::identity::fingerprint(der)))
        .filter(|(s, fp)| roster.get(s).is_none_or(|m| m.cert_fingerprint != *fp))
        .collect();
    if needed.is_empty() {
        return Ok(());
    }
    let (origin, _) = crate::witness::log_identity(&agent.home)?;
    let mut missing = needed.clone();
    for attempt in 0..2 {
        if attempt == 1 {
            crate::daemon::witness_now(agent, client).await;
        }
        let Some(file) = crate::witness::witnessed(&agent.home)? else { continue };
        let (signed, _) = file.checkpoint.to_signed(&origin)?;
        let (size, root) = (signed.checkpoint.size, signed.checkpoint.root);
        let wanted =
            crate::witness::Wanted { sites: needed.iter().map(|(s, _)| s.clone()).collect(), ..Default::default() };
        let proven = crate::witness::fetch_proven_with(client, size, &root, wanted, 0).await?;
        let entries: Vec<(u64, i64, &Event)> =
            proven.iter().map(|p| (p.seq, p.entry.time_ms, &p.entry.event)).collect();
        missing.clear();
        for (site, fp) in &needed {
            match approved(&entries, site, fp) {
                Some((by, seq, time_ms)) => {
                    roster.insert(
                        site.clone(),
                        Member {
                            cert_fingerprint: fp.clone(),
                            approved_by: by,
                            approved_seq: seq,
                            approved_ms: time_ms,
                            proven_ms: crate::now_ms(),
                        },
                    );
                }
                None => missing.push((site.clone(), fp.clone())),
            }
        }
        if missing.is_empty() {
            break;
        }
    }
    let path = agent.home.path(ROSTER);
    // INVARIANT: strings and integers always serialise.
    maeum_models::write_atomic(&path, serde_json::to_string_pretty(&roster).expect("serialises").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> =
        missing.iter().map(|(s, fp)| format!("{s} (certificate {})", &fp[..16.min(fp.len())])).collect();
    Err(Refusal {
        rule: "roster",
        why: format!(
            "the audit log this site witnessed does not show these members' certificates approved: {}",
            names.join(", ")
        ),
    }
    .into())
}

/// `maeum-site audit sites`: the sites this site has shared a session with, each with
/// the log entry that approved its certificate.
pub fn list(dir: &Path, json: bool) -> Result<()> {
    let home = Home::new(dir);
    let roster = load(&home);
    if json {
        println!("{}", serde_json::to_string(&roster)?);
        return Ok(());
    }
    if roster.is_empty() {
        println!("no session members proven yet (each round's members are proven against the audit log)");
        return Ok(());
    }
    let mut t = maeum_runtime::table::table(&["site", "certificate", "approved by", "log entry", "approved"], &[3]);
    for (site, m) in &roster {
        let when = crate::enrol::ago(m.approved_ms);
        t.add_row(vec![
            site.clone(),
            m.cert_fingerprint[..16.min(m.cert_fingerprint.len())].to_string(),
            m.approved_by.clone(),
            format!("#{}", m.approved_seq),
            when,
        ]);
    }
    println!("{t}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_counts_from_its_approval_until_replaced_or_revoked() {
        let approved_a = Event::SiteApproved { site: "a".into(), cert_fingerprint: "f1".into(), not_after_ms: 0 };
        let replaced = Event::SiteKeyReplaced {
            site: "a".into(),
            old_cert_fingerprint: "f1".into(),
            new_cert_fingerprint: "f2".into(),
            not_after_ms: 0,
            operator: "lead".into(),
        };
        let revoked = Event::SiteRevoked { site: "a".into(), reason: "left".into() };
        let log = [(3, 10, &approved_a)];
        assert_eq!(approved(&log, "a", "f1"), Some(("site_approved".into(), 3, 10)));
        assert_eq!(approved(&log, "a", "sybil"), None, "a certificate the log never approved");
        assert_eq!(approved(&log, "b", "f1"), None);
        let log = [(3, 10, &approved_a), (7, 20, &replaced)];
        assert_eq!(approved(&log, "a", "f1"), None, "replaced");
        assert_eq!(approved(&log, "a", "f2"), Some(("site_key_replaced".into(), 7, 20)));
        let log = [(3, 10, &approved_a), (9, 30, &revoked)];
        assert_eq!(approved(&log, "a", "f1"), None, "revoked");
    }
}
