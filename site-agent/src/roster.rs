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

use crate::daemon::{Agent, Client, Proven};
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
    /// The log up to this size was searched for this site's entries: a later
    /// replacement or revocation is looked for from here on.
    pub checked_size: u64,
}

fn load(home: &Home) -> BTreeMap<String, Member> {
    std::fs::read_to_string(home.path(ROSTER)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// An approval: the entry kind, its position and its time.
type Approval = (String, u64, i64);

/// Whether `fingerprint` is `site`'s approved certificate after `entries` (in log
/// order, those from position `from` on), starting from `start`, and the entry that
/// approved it.
fn approved(
    start: Option<Approval>,
    entries: &[(u64, i64, &Event)],
    from: u64,
    site: &str,
    fingerprint: &str,
) -> Option<Approval> {
    let mut current = start;
    for (seq, time_ms, e) in entries.iter().filter(|(seq, _, _)| *seq >= from) {
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
/// `members` are (site id, certificate DER). A member proven before is re-checked for
/// a replacement or revocation logged since; a member the log does not show approved
/// (now) is a [`Refusal`]; an unreachable coordinator is an ordinary error.
pub(crate) async fn check(agent: &Agent, client: &mut Client, members: &[(String, Vec<u8>)]) -> Result<()> {
    let mut roster = load(&agent.home);
    let needed: Vec<(String, String)> =
        members.iter().map(|(s, der)| (s.clone(), maeum_pki::identity::fingerprint(der))).collect();
    // Where each member's search resumes, and what it found so far.
    let start = |site: &str, fp: &str| -> (u64, Option<Approval>) {
        match roster.get(site).filter(|m| m.cert_fingerprint == fp) {
            Some(m) => (m.checked_size, Some((m.approved_by.clone(), m.approved_seq, m.approved_ms))),
            None => (0, None),
        }
    };
    let after = needed.iter().map(|(s, fp)| start(s, fp).0).min().unwrap_or(0);
    let evaluate = |p: &Proven| -> Vec<Option<Approval>> {
        let entries: Vec<(u64, i64, &Event)> =
            p.entries.iter().map(|e| (e.seq, e.entry.time_ms, &e.entry.event)).collect();
        needed
            .iter()
            .map(|(site, fp)| {
                let (from, state) = start(site, fp);
                approved(state, &entries, from, site, fp)
            })
            .collect()
    };
    let wanted =
        crate::witness::Wanted { sites: needed.iter().map(|(s, _)| s.clone()).collect(), ..Default::default() };
    let proven =
        crate::daemon::prove_witnessed(agent, client, wanted, after, |p| evaluate(p).iter().all(Option::is_some))
            .await?
            .context("this site has not witnessed a checkpoint of the audit log yet")?;
    let found = evaluate(&proven);
    let mut missing = Vec::new();
    for ((site, fp), approval) in needed.iter().zip(found) {
        match approval {
            Some((by, seq, time_ms)) => {
                let proven_ms =
                    roster.get(site).filter(|m| m.approved_seq == seq).map_or_else(crate::now_ms, |m| m.proven_ms);
                roster.insert(
                    site.clone(),
                    Member {
                        cert_fingerprint: fp.clone(),
                        approved_by: by,
                        approved_seq: seq,
                        approved_ms: time_ms,
                        proven_ms,
                        checked_size: proven.size,
                    },
                );
            }
            None => {
                // Replaced or revoked since, or never approved: off the roster.
                if roster.get(site).is_some_and(|m| m.cert_fingerprint == *fp) {
                    roster.remove(site);
                }
                missing.push(format!("{site} (certificate {})", &fp[..16.min(fp.len())]));
            }
        }
    }
    let path = agent.home.path(ROSTER);
    // INVARIANT: strings and integers always serialise.
    maeum_models::write_atomic(&path, serde_json::to_string_pretty(&roster).expect("serialises").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(Refusal {
        rule: "roster",
        why: format!(
            "the audit log this site witnessed does not show these members' certificates approved (or shows them \
             replaced or revoked): {}",
            missing.join(", ")
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
        let when = format!("{} ago", crate::enrol::ago(crate::now_ms() - m.approved_ms));
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
        assert_eq!(approved(None, &log, 0, "a", "f1"), Some(("site_approved".into(), 3, 10)));
        assert_eq!(approved(None, &log, 0, "a", "sybil"), None, "a certificate the log never approved");
        assert_eq!(approved(None, &log, 0, "b", "f1"), None);
        let log = [(3, 10, &approved_a), (7, 20, &replaced)];
        assert_eq!(approved(None, &log, 0, "a", "f1"), None, "replaced");
        assert_eq!(approved(None, &log, 0, "a", "f2"), Some(("site_key_replaced".into(), 7, 20)));
        let log = [(3, 10, &approved_a), (9, 30, &revoked)];
        assert_eq!(approved(None, &log, 0, "a", "f1"), None, "revoked");
        // A member proven up to size 5 is re-checked from there: the revocation counts,
        // the entries before it are not read again.
        let cached = Some(("site_approved".to_string(), 3, 10));
        assert_eq!(approved(cached.clone(), &log[1..], 5, "a", "f1"), None, "revoked since");
        assert_eq!(approved(cached.clone(), &[], 5, "a", "f1"), cached, "nothing new");
    }
}
