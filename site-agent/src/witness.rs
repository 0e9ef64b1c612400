//! The site as a witness of the coordinator's audit log, and the site's own journal.
//!
//! ```text
//! HOME/audit/checkpoint.json      the latest checkpoint this site verified and cosigned
//!                                 (maeum-audit-checkpoint/v1: give it to an auditor)
//! HOME/audit/witnessed.jsonl      one line per checkpoint witnessed: size, root, when,
//!                                 and which other sites had cosigned it by then
//! HOME/audit/fork-evidence.json   only if the coordinator was caught showing this site
//!                                 a log that contradicts a checkpoint it signed; names
//!                                 the two signed checkpoints, kept beside it as
//!                                 fork-{witnessed,conflicting}.checkpoint.json
//! HOME/audit/journal.jsonl        what this site did: decisions, contributions, models
//! HOME/audit/cleared/TIME/         fork evidence an admin cleared (`maeum-site audit
//!                                 clear`), moved there, never deleted
//! HOME/audit/cleared.jsonl        one line per clearing: when, by whom, why, what
//! ```
//!
//! When the coordinator's heartbeat reply announces a checkpoint larger than the one
//! witnessed, the daemon fetches it with the consistency proof from the witnessed size
//! and every stored checkpoint since (with the cosignatures other sites made), checks
//! them with [`maeum_tlog::Witness`], stores the new checkpoint, and only
//! then cosigns it. The views of the witnesses meet in those stored checkpoints: a
//! coordinator that signed two roots for one size is caught by the site that sees both
//! (AUD-16), and this site then refuses to witness again and keeps the two signed
//! checkpoints as evidence. While that evidence is kept the site does no work for the
//! coordinator at all (the daemon's work loop, `crate::releases`): a coordinator caught
//! lying to one site is not trusted with its updates, decisions or releases. Only the
//! site's admin lifts that, with [`clear`], after inspecting the evidence.
//! `maeum-site audit prove` checks the site's journal against the log with inclusion
//! proofs to the checkpoint it witnessed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use maeum_protocols::wire::audit::{CheckpointReply, ProvenEntry};
use maeum_protocols::wire::pb;
use maeum_tlog::checkpoint::{single_cert, verify_cosignature, witness_key};
use maeum_tlog::export::{CHECKPOINT_FORMAT, CheckpointFile, ExportedCheckpoint};
use maeum_tlog::handover::Role;
use maeum_tlog::merkle::verify_inclusion;
use maeum_tlog::{AuditError, Cosignature, Event, SignedCheckpoint, Witness, hex, rfc3339, unhex32};

use crate::daemon::{Client, connect, describe};
use crate::enrol::Home;

const CHECKPOINT: &str = "audit/checkpoint.json";
const WITNESSED: &str = "audit/witnessed.jsonl";
const EVIDENCE: &str = "audit/fork-evidence.json";
const EVIDENCE_WITNESSED: &str = "audit/fork-witnessed.checkpoint.json";
const EVIDENCE_CONFLICTING: &str = "audit/fork-conflicting.checkpoint.json";
const JOURNAL: &str = "audit/journal.jsonl";
const CLEARED_DIR: &str = "audit/cleared";
const CLEARED: &str = "audit/cleared.jsonl";

/// The daemon's stage while fork evidence is kept (`status.json`, the heartbeat).
pub const STOPPED_STAGE: &str = "stopped: coordinator's audit log forked (see `maeum-site audit status`)";

/// A line of HOME/audit/journal.jsonl: something this site did that the log must show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The site accepted or refused a job (the SHA-256 of the job file it decided on;
    /// empty in journals written before it was recorded).
    Decision {
        job_id: String,
        accepted: bool,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        spec_sha256: String,
        time_ms: i64,
    },
    /// The site delivered its (masked, or for debugging jobs plain) update.
    Contribution { job_id: String, round: u32, attempt: u32, secure: bool, time_ms: i64 },
    /// The site downloaded, verified and used a model.
    Model { job_id: String, round: u32, digest: String, time_ms: i64 },
    /// The site refused a session, survivor set or unmask request under its policy
    /// (and reported it; the log should hold a `site_refused` entry).
    Refusal { job_id: String, round: u32, attempt: u32, rule: String, detail: String, time_ms: i64 },
}

pub(crate) fn append_line(home: &Home, name: &str, line: &str) -> Result<()> {
    let path = home.path(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(format!("{line}\n").as_bytes())
        .and_then(|()| f.sync_data())
        .with_context(|| format!("appending to {}", path.display()))
}

/// Appends `record` to the journal (durably). The journal is what `audit prove` checks.
pub fn journal(home: &Home, record: &Record) -> Result<()> {
    // INVARIANT: a Record is strings, integers and booleans, which always serialise.
    append_line(home, JOURNAL, &serde_json::to_string(record).expect("a record serialises"))
}

pub(crate) fn read_journal(home: &Home) -> Result<Vec<Record>> {
    let Ok(text) = std::fs::read_to_string(home.path(JOURNAL)) else { return Ok(Vec::new()) };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{JOURNAL} line {}", i + 1)))
        .collect()
}

/// The log's origin (`maeum/CONSORTIUM`), from the enrolment.
pub(crate) fn log_origin(home: &Home) -> Result<String> {
    Ok(format!("maeum/{}", home.enrolment()?.consortium))
}

/// The log's origin and every log key this site trusts.
pub(crate) fn log_keys(home: &Home) -> Result<(String, crate::keys::Pinned)> {
    let keys = crate::keys::pinned(home, Role::Log)?.context("enrolment.json: no signing_public_key")?;
    Ok((log_origin(home)?, keys))
}

/// The latest witnessed checkpoint, checked again under the log key it names, which
/// must be one this site trusts.
pub fn witnessed(home: &Home) -> Result<Option<CheckpointFile>> {
    let path = home.path(CHECKPOINT);
    let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
    let file = CheckpointFile::decode(&bytes).with_context(|| format!("reading {}", path.display()))?;
    let (origin, keys) = log_keys(home)?;
    let key = keys.all.iter().find(|k| hex(&k[..]) == file.log_public_key);
    let (true, Some(key)) = (file.origin == origin, key) else {
        bail!("{} is of log {} (key {}), not this consortium's", path.display(), file.origin, file.log_public_key);
    };
    file.checkpoint.to_signed(&origin)?.0.verify(key).with_context(|| format!("{}", path.display()))?;
    Ok(Some(file))
}

/// The size of the latest witnessed checkpoint (0 if none or unreadable).
pub fn witnessed_size(home: &Home) -> u64 {
    witnessed(home).ok().flatten().map_or(0, |f| f.checkpoint.size)
}

/// Every checkpoint this site verified and cosigned, as (size, root hex), from
/// HOME/audit/witnessed.jsonl.
pub fn witnessed_roots(home: &Home) -> Result<std::collections::HashSet<(u64, String)>> {
    let Ok(text) = std::fs::read_to_string(home.path(WITNESSED)) else { return Ok(Default::default()) };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value =
                serde_json::from_str(l).with_context(|| format!("{WITNESSED} line {}", i + 1))?;
            let size = v["size"].as_u64().with_context(|| format!("{WITNESSED} line {}: size", i + 1))?;
            let root = v["root"].as_str().with_context(|| format!("{WITNESSED} line {}: root", i + 1))?;
            Ok((size, root.to_owned()))
        })
        .collect()
}

/// Why this site no longer witnesses nor works for the coordinator, if it was caught
/// forking. Fails closed: an evidence file that cannot be read or parsed still counts.
pub fn fork_evidence(home: &Home) -> Option<String> {
    let text = match std::fs::read_to_string(home.path(EVIDENCE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("fork evidence present but unreadable ({e})")),
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Some("fork evidence present but not valid JSON".into());
    };
    Some(v.get("error").and_then(|e| e.as_str()).unwrap_or("fork evidence present").to_owned())
}

/// HOME/audit/fork-evidence.json (whether or not it exists).
pub fn evidence_path(home: &Home) -> std::path::PathBuf {
    home.path(EVIDENCE)
}

/// The command that lifts the stop, for messages (the reason is the admin's to write).
pub fn clear_command(home: &Home) -> String {
    format!("maeum-site audit clear --home {} --reason \"WHY\"", home.dir.display())
}

/// Resolves once fork evidence appears (checked every second): what stops the work
/// item in progress.
pub async fn fork_detected(home: &Home) -> String {
    loop {
        if let Some(why) = fork_evidence(home) {
            return why;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// A line of HOME/audit/cleared.jsonl: an admin cleared fork evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleared {
    /// When (RFC 3339), and the same in Unix milliseconds.
    pub cleared: String,
    pub time_ms: i64,
    /// The local account that ran `audit clear` (`$USER`, else `$LOGNAME`, else `uid N`).
    pub by: String,
    /// The admin's reason, as given.
    pub reason: String,
    /// What the evidence said (`fork-evidence.json`'s error).
    pub evidence: String,
    /// Where the files went, relative to HOME.
    pub moved_to: String,
    pub files: Vec<String>,
}

/// The longest reason `audit clear` takes (characters).
pub const MAX_CLEAR_REASON: usize = 2_000;

/// `maeum-site audit clear`: moves the fork evidence (every HOME/audit/fork-* file)
/// into HOME/audit/cleared/TIME/, never deleting it, and records who cleared it, when
/// and why in HOME/audit/cleared.jsonl (written first, so that no clearing goes
/// unrecorded). `fork-evidence.json` moves last: the daemon, which checks for it
/// before each work item, resumes only once everything is moved.
pub fn clear(home: &Home, reason: &str, by: &str) -> Result<Cleared> {
    let reason = reason.trim();
    if reason.is_empty() {
        bail!("--reason must say why the evidence may be cleared (it is recorded in {CLEARED})");
    }
    if reason.chars().count() > MAX_CLEAR_REASON {
        bail!("--reason is longer than {MAX_CLEAR_REASON} characters");
    }
    let audit = home.path("audit");
    let mut files: Vec<String> = std::fs::read_dir(&audit)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("fork-"))
                .collect()
        })
        .unwrap_or_default();
    if files.is_empty() {
        bail!("there is no fork evidence to clear in {} (see `maeum-site audit status`)", audit.display());
    }
    // The evidence file itself last.
    let main = EVIDENCE.trim_start_matches("audit/");
    files.sort_by_key(|n| (n == main, n.clone()));
    let evidence = fork_evidence(home).unwrap_or_else(|| format!("no {main}; leftover files only"));
    let time_ms = crate::now_ms();
    let stamp: String = rfc3339(time_ms).chars().filter(|c| !matches!(c, '-' | ':')).take(15).collect();
    let mut moved_to = format!("{CLEARED_DIR}/{stamp}Z");
    let mut n = 1;
    while home.path(&moved_to).exists() {
        n += 1;
        moved_to = format!("{CLEARED_DIR}/{stamp}Z-{n}");
    }
    let dir = home.path(&moved_to);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let record = Cleared {
        cleared: rfc3339(time_ms),
        time_ms,
        by: by.to_owned(),
        reason: reason.to_owned(),
        evidence,
        moved_to: moved_to.clone(),
        files: files.clone(),
    };
    // INVARIANT: strings and integers always serialise.
    append_line(home, CLEARED, &serde_json::to_string(&record).expect("a record serialises"))?;
    for name in &files {
        let (from, to) = (audit.join(name), dir.join(name));
        std::fs::rename(&from, &to).with_context(|| {
            format!(
                "moving {} to {} (the clearing is already recorded in {CLEARED}; run `audit clear` again)",
                from.display(),
                to.display()
            )
        })?;
    }
    Ok(record)
}

/// The clearings recorded so far, oldest first.
pub fn clearings(home: &Home) -> Result<Vec<Cleared>> {
    let Ok(text) = std::fs::read_to_string(home.path(CLEARED)) else { return Ok(Vec::new()) };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{CLEARED} line {}", i + 1)))
        .collect()
}

fn checkpoint_file(
    origin: &str,
    key: &[u8; 32],
    signed: &SignedCheckpoint,
    cosignatures: &[Cosignature],
) -> CheckpointFile {
    CheckpointFile {
        format: CHECKPOINT_FORMAT.into(),
        origin: origin.to_owned(),
        log_public_key: hex(key),
        checkpoint: ExportedCheckpoint::new(signed, cosignatures),
    }
}

/// Keeps what proves the coordinator signed two contradicting views (two canonical
/// checkpoint files an auditor can check with `maeum-audit consistency`), and stops
/// witnessing.
fn keep_evidence(
    home: &Home,
    origin: &str,
    key: &[u8; 32],
    error: &AuditError,
    a: &SignedCheckpoint,
    b: &SignedCheckpoint,
) {
    let write = |name: &str, bytes: &[u8]| {
        let path = home.path(name);
        if let Err(e) = maeum_models::write_atomic(&path, bytes) {
            error!(error = %e, path = %path.display(), "could not write the fork evidence");
        }
    };
    write(EVIDENCE_WITNESSED, &checkpoint_file(origin, key, a, &[]).encode());
    write(EVIDENCE_CONFLICTING, &checkpoint_file(origin, key, b, &[]).encode());
    let doc = serde_json::json!({
        "detected": rfc3339(crate::now_ms()),
        "error": error.to_string(),
        "witnessed": EVIDENCE_WITNESSED,
        "conflicting": EVIDENCE_CONFLICTING,
    });
    write(EVIDENCE, format!("{doc:#}\n").as_bytes());
    error!(error = %error, evidence = %home.path(EVIDENCE).display(), "THE COORDINATOR SHOWED THIS SITE TWO DIFFERENT AUDIT LOGS; this site stops witnessing and working for it — tell the consortium's auditors");
}

/// The result of one witnessing exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Witnessed {
    /// A new checkpoint was verified, stored and cosigned.
    Cosigned { size: u64, also_by: Vec<String> },
    /// Nothing newer than what this site witnessed.
    UpToDate { size: u64 },
}

/// Fetches the latest checkpoint, verifies it and every checkpoint since the last one
/// witnessed, stores it, and cosigns it.
pub async fn witness_once(home: &Home, client: &mut Client) -> Result<Witnessed> {
    if let Some(why) = fork_evidence(home) {
        bail!("not witnessing: {why} (see {})", home.path(EVIDENCE).display());
    }
    let origin = log_origin(home)?;
    let previous = witnessed(home)?;
    let known = previous.as_ref().map_or(0, |f| f.checkpoint.size);
    let prev_signed = previous.as_ref().map(|f| f.checkpoint.to_signed(&origin)).transpose()?.map(|(s, _)| s);
    // The stored checkpoint was checked under the key it names (`witnessed`).
    let prev_key = previous.as_ref().map(|f| unhex32(&f.log_public_key)).transpose()?;
    let mut witness = Witness::new(origin.clone(), prev_key.unwrap_or_default(), prev_signed.clone())?;
    let reply = client
        .audit_checkpoint(pb::AuditCheckpointRequest {
            known_size: known,
            known: prev_signed
                .clone()
                .map(|signed| maeum_protocols::wire::audit::TreeHead { signed, cosignatures: Vec::new() }.to_pb()),
        })
        .await
        .map_err(|e| anyhow!("fetching the audit checkpoint: {}", describe(&e)))?
        .into_inner();
    let reply = CheckpointReply::from_pb(&origin, reply).context("the coordinator's checkpoint reply")?;
    let new = &reply.latest.signed;
    // The log key: follow the rotations served with the checkpoint, then check it under
    // the key they end at (older stored checkpoints stay under the key of their time).
    let walk = crate::keys::walk(home, Role::Log, &reply.handovers)
        .context("refusing the log-key handovers")?
        .context("enrolment.json: no signing_public_key")?;
    let (key, trusted) = (walk.current(), walk.all());
    witness.set_log_key(key);
    let token = match witness.observe(new, &reply.consistency) {
        Ok(t) => t,
        Err(e) => {
            if let (
                AuditError::Fork { .. } | AuditError::Inconsistent { .. } | AuditError::Rollback { .. },
                Some(old),
            ) = (&e, &prev_signed)
            {
                keep_evidence(home, &origin, &key, &e, old, new);
            }
            return Err(anyhow!(e).context("the coordinator's new checkpoint"));
        }
    };
    if new.checkpoint.size == known {
        follow_cas(home, client, &reply, new).await;
        return Ok(Witnessed::UpToDate { size: known });
    }
    // The views meet: every checkpoint the coordinator stored since `known` must be
    // signed by the log and agree with what this site witnessed at that size.
    let mine: BTreeMap<u64, &SignedCheckpoint> =
        prev_signed.iter().chain(std::iter::once(new)).map(|c| (c.checkpoint.size, c)).collect();
    let cas = crate::keys::trusted_cas(home)?;
    let site_id = home.site_id()?;
    let mut also_by = Vec::new();
    for head in &reply.since {
        if !trusted.iter().any(|k| head.signed.verify(k).is_ok()) {
            bail!(
                "a stored checkpoint the coordinator returned (size {}) is not signed by the log",
                head.signed.checkpoint.size
            );
        }
        if let Some(seen) = mine.get(&head.signed.checkpoint.size)
            && seen.checkpoint.root != head.signed.checkpoint.root
        {
            {
                let e = AuditError::Fork {
                    size: seen.checkpoint.size,
                    known: hex(&seen.checkpoint.root[..8]),
                    new: hex(&head.signed.checkpoint.root[..8]),
                };
                keep_evidence(home, &origin, &key, &e, seen, &head.signed);
                return Err(anyhow!(e).context("comparing with the checkpoints other witnesses saw"));
            }
        }
        if head.signed.checkpoint.size != new.checkpoint.size {
            continue;
        }
        for (c, cert_pem) in &head.cosignatures {
            if c.site == site_id {
                continue;
            }
            let valid = single_cert(cert_pem)
                .and_then(|cert| witness_key(&cas, &cert, &c.site, crate::now_ms()))
                .and_then(|bits| verify_cosignature(&new.checkpoint, &bits, &c.signature));
            match valid {
                Ok(()) => also_by.push(c.site.clone()),
                Err(e) => {
                    warn!(site = %c.site, size = new.checkpoint.size, error = %e, "a cosignature relayed by the coordinator does not verify")
                }
            }
        }
    }
    // A rotation of the log key is followed only once the checkpoint just verified
    // proves its log_key_rotated entry: no site is handed over unseen.
    if !walk.is_empty() {
        let logged = logged_rotations(client, new.checkpoint.size, &new.checkpoint.root).await?;
        walk.check_logged(&logged)?;
        crate::keys::keep(home, &walk, &format!("checkpoint of {} entries", new.checkpoint.size))?;
    }
    follow_cas(home, client, &reply, new).await;
    // Stored before signing: after a crash this site never signs another root of a
    // size it has witnessed.
    let identity = home.identity()?;
    let signature = token.cosign(&identity.key, &ring::rand::SystemRandom::new())?;
    let own = Cosignature { site: site_id.clone(), signature: signature.clone() };
    let file = checkpoint_file(&origin, &key, new, &[own]);
    maeum_models::write_atomic(&home.path(CHECKPOINT), &file.encode()).context("storing the witnessed checkpoint")?;
    let line = serde_json::json!({
        "size": new.checkpoint.size, "root": hex(&new.checkpoint.root),
        "witnessed": rfc3339(crate::now_ms()), "also_cosigned_by": also_by,
    });
    append_line(home, WITNESSED, &line.to_string())?;
    client
        .audit_cosign(pb::AuditCosignRequest {
            size: new.checkpoint.size,
            root: new.checkpoint.root.to_vec(),
            signature,
        })
        .await
        .map_err(|e| anyhow!("sending the cosignature: {}", describe(&e)))?;
    info!(size = new.checkpoint.size, also_cosigned_by = also_by.len(), "audit checkpoint verified and cosigned");
    Ok(Witnessed::Cosigned { size: new.checkpoint.size, also_by })
}

/// [`crate::keys::follow_cas`] with the checkpoint `new` just verified (a refusal is logged).
async fn follow_cas(home: &Home, client: &mut Client, reply: &CheckpointReply, new: &SignedCheckpoint) {
    let (at, cas) = ((new.checkpoint.size, &new.checkpoint.root), &reply.ca_handovers);
    if let Err(e) = crate::keys::follow_cas(home, client, cas, at).await {
        warn!(error = %format!("{e:#}"), "refusing a rollover of the consortium CA");
    }
}

/// One journal record checked against the log.
#[derive(Debug, Clone, Serialize)]
pub struct Proven {
    pub record: Record,
    /// The entry that shows it, if any.
    pub entry: Option<u64>,
    /// What the log says about it.
    pub finding: String,
}

/// `maeum-site audit prove`'s result.
#[derive(Debug, Clone, Serialize)]
pub struct ProveReport {
    pub checkpoint_size: u64,
    pub checkpoint_root: String,
    pub entries_naming_this_site: usize,
    pub records: Vec<Proven>,
    /// Entries that say this site contributed where its journal has no record.
    pub unrecorded_claims: Vec<String>,
}

impl ProveReport {
    pub fn missing(&self) -> usize {
        self.records.iter().filter(|r| r.entry.is_none()).count()
    }
}

/// The coordinator could not be asked (network, or it is down): unlike a proof that
/// does not verify, worth trying again.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// The entries that name this site or one of `models`, each with its inclusion proof
/// against the checkpoint `(size, root)` verified here; any proof that fails is an
/// error (the coordinator's log is not the one it showed this site).
pub async fn fetch_proven(
    client: &mut Client,
    size: u64,
    root: &maeum_tlog::merkle::Hash,
    models: Vec<String>,
) -> Result<Vec<ProvenEntry>> {
    fetch_proven_with(client, size, root, Wanted { models, ..Wanted::default() }, 0).await
}

/// What [`fetch_proven_with`] asks for besides the entries naming this site.
#[derive(Debug, Clone, Default)]
pub struct Wanted {
    /// Entries bringing these models (hex SHA-256) into being.
    pub models: Vec<String>,
    /// The `job_submitted` entries of these jobs.
    pub jobs: Vec<String>,
    /// The approval, key-replacement and revocation entries of these sites.
    pub sites: Vec<String>,
    /// Only the rotations of the consortium's keys, nothing else.
    pub key_rotations: bool,
}

/// The rotations of the consortium's keys in the log up to the checkpoint `(size,
/// root)` this site verified, each proven against it.
pub async fn logged_rotations(
    client: &mut Client,
    size: u64,
    root: &maeum_tlog::merkle::Hash,
) -> Result<Vec<maeum_tlog::Entry>> {
    let wanted = Wanted { key_rotations: true, ..Wanted::default() };
    Ok(fetch_proven_with(client, size, root, wanted, 0).await?.into_iter().map(|p| p.entry).collect())
}

/// [`fetch_proven`], asking for everything `wanted` names, from position `after` on.
pub async fn fetch_proven_with(
    client: &mut Client,
    size: u64,
    root: &maeum_tlog::merkle::Hash,
    wanted: Wanted,
    after: u64,
) -> Result<Vec<ProvenEntry>> {
    let Wanted { models, jobs, sites, key_rotations } = wanted;
    let mut entries = Vec::new();
    let mut after = after;
    loop {
        let reply = client
            .audit_prove(pb::AuditProveRequest {
                size,
                models: models.clone(),
                after,
                jobs: jobs.clone(),
                sites: sites.clone(),
                key_rotations,
            })
            .await
            .map_err(|e| {
                anyhow::Error::new(Unreachable(format!("asking the coordinator for proofs: {}", describe(&e))))
            })?
            .into_inner();
        for e in reply.entries {
            let proven = ProvenEntry::from_pb(e).context("an entry from the coordinator")?;
            if proven.seq < after || proven.seq >= size {
                bail!("the coordinator returned entry {} outside {after}..{size}", proven.seq);
            }
            verify_inclusion(&proven.entry.leaf_hash(), proven.seq, size, &proven.proof, root).map_err(|e| {
                anyhow!(
                    "entry {}: its inclusion proof does not verify against the checkpoint this site witnessed \
                     (size {size}): the coordinator's log is not the one it showed this site ({e})",
                    proven.seq
                )
            })?;
            after = proven.seq + 1;
            entries.push(proven);
        }
        if !reply.more {
            break;
        }
        if reply.next < after {
            bail!("the coordinator's paging went backwards");
        }
        after = reply.next;
    }
    Ok(entries)
}

/// Fetches the entries that name this site or its models with inclusion proofs against
/// the checkpoint it witnessed, verifies every proof, and matches them with the journal.
pub async fn prove(home: &Home) -> Result<ProveReport> {
    let file = witnessed(home)?.context("this site has not witnessed a checkpoint yet (run the daemon first)")?;
    let origin = log_origin(home)?;
    let (signed, _) = file.checkpoint.to_signed(&origin)?;
    let (size, root) = (signed.checkpoint.size, signed.checkpoint.root);
    let site = home.site_id()?;
    let records = read_journal(home)?;
    let mut models: Vec<String> = records
        .iter()
        .filter_map(|r| if let Record::Model { digest, .. } = r { Some(digest.clone()) } else { None })
        .collect();
    models.sort();
    models.dedup();
    let mut client = connect(home).await?;
    let entries: Vec<_> = fetch_proven(&mut client, size, &root, models).await?.into_iter().map(|p| p.entry).collect();
    let names_me = |e: &Event| e.involves_site(&site);
    let find = |f: &dyn Fn(&Event) -> Option<String>| entries.iter().find_map(|e| f(&e.event).map(|s| (e.seq, s)));
    let mut out = Vec::new();
    // Decisions and contributions in journal order, then each model once.
    let mut seen_models = std::collections::HashSet::new();
    let (models_used, actions): (Vec<&Record>, Vec<&Record>) =
        records.iter().partition(|r| matches!(r, Record::Model { .. }));
    let models_used =
        models_used.into_iter().filter(|r| matches!(r, Record::Model { digest, .. } if seen_models.insert(digest)));
    for record in actions.into_iter().chain(models_used) {
        let found = match record {
            Record::Decision { job_id, accepted, .. } => find(&|e| match e {
                Event::JobDecision { job_id: j, site: s, accepted: a, .. }
                    if j == job_id && *s == site && a == accepted =>
                {
                    Some(format!("job_decision {}", if *a { "accepted" } else { "refused" }))
                }
                _ => None,
            }),
            Record::Contribution { job_id, round, attempt, .. } => find(&|e| match e {
                Event::RoundSecagg { job_id: j, round: r, attempt: a, survivors, .. }
                    if j == job_id && r == round && a == attempt && survivors.contains(&site) =>
                {
                    Some("round_secagg: summed among the survivors".into())
                }
                Event::RoundSecagg { job_id: j, round: r, attempt: a, dropped, .. }
                    if j == job_id && r == round && a == attempt && dropped.contains(&site) =>
                {
                    Some("round_secagg: this site counted as dropped; its input was not used".into())
                }
                Event::RoundFailed { job_id: j, round: r, attempt: a, .. }
                    if j == job_id && r == round && a == attempt =>
                {
                    Some("round_failed: the attempt failed; no update of it was applied".into())
                }
                Event::RoundCommitted { job_id: j, round: r, contributors, .. }
                    if j == job_id && r == round && contributors.contains(&site) =>
                {
                    Some("round_committed: in the applied aggregate".into())
                }
                _ => None,
            }),
            Record::Model { digest, .. } => {
                find(&|e| (e.model() == Some(digest.as_str())).then(|| format!("{} (the model's origin)", e.kind())))
            }
            Record::Refusal { job_id, round, attempt, rule, .. } => find(&|e| match e {
                Event::SiteRefused { job_id: j, round: r, attempt: a, site: s, rule: k, .. }
                    if j == job_id && r == round && a == attempt && *s == site && k == rule =>
                {
                    Some(format!("site_refused ({k})"))
                }
                _ => None,
            }),
        };
        out.push(Proven {
            record: record.clone(),
            entry: found.as_ref().map(|(seq, _)| *seq),
            finding: found.map_or_else(|| "NOT IN THE LOG".into(), |(_, s)| s),
        });
    }
    let mut unrecorded = Vec::new();
    for e in &entries {
        if let Event::RoundCommitted { job_id, round, contributors, .. } = &e.event {
            let recorded = records
                .iter()
                .any(|r| matches!(r, Record::Contribution { job_id: j, round: n, .. } if j == job_id && n == round));
            if contributors.contains(&site) && !recorded {
                unrecorded
                    .push(format!("entry {}: job {job_id} round {round} lists this site as a contributor", e.seq));
            }
        }
    }
    Ok(ProveReport {
        checkpoint_size: size,
        checkpoint_root: hex(&root),
        entries_naming_this_site: entries.iter().filter(|e| names_me(&e.event)).count(),
        records: out,
        unrecorded_claims: unrecorded,
    })
}

/// `maeum-site audit status`: what this site witnessed. Errors if it caught a fork.
pub fn status(dir: &Path, json: bool) -> Result<()> {
    let home = Home::new(dir);
    let latest = witnessed(&home)?;
    let count = std::fs::read_to_string(home.path(WITNESSED)).map_or(0, |t| t.lines().count());
    let last_line: Option<serde_json::Value> = std::fs::read_to_string(home.path(WITNESSED))
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| serde_json::from_str(l).ok()));
    let fork = fork_evidence(&home);
    let cleared = clearings(&home)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "witnessed": latest.as_ref().map(|f| serde_json::json!({"size": f.checkpoint.size, "root": f.checkpoint.root})),
                "checkpoints_witnessed": count, "last": last_line, "fork": fork,
                "evidence": fork.as_ref().map(|_| home.path(EVIDENCE)),
                "cleared": cleared,
            })
        );
    } else {
        match &latest {
            Some(f) => println!("witnessed   checkpoint of size {} (root {})", f.checkpoint.size, f.checkpoint.root),
            None => println!("witnessed   nothing yet (the daemon witnesses each new checkpoint)"),
        }
        println!("history     {count} checkpoints verified and cosigned ({})", home.path(WITNESSED).display());
        if let Some(also) = last_line.as_ref().and_then(|l| l.get("also_cosigned_by")).and_then(|a| a.as_array()) {
            let names: Vec<&str> = also.iter().filter_map(|s| s.as_str()).collect();
            println!(
                "cosigned    when witnessed, also by: {}",
                if names.is_empty() { "no other site yet".to_owned() } else { names.join(", ") }
            );
        }
        if let Some(last) = cleared.last() {
            println!(
                "cleared     {} time(s); last {} by {}: {} ({})",
                cleared.len(),
                last.cleared,
                last.by,
                last.reason,
                home.path(&last.moved_to).display()
            );
        }
        if let Some(why) = &fork {
            println!("FORK        {why}");
            println!("            evidence: {}", home.path(EVIDENCE).display());
            println!("            this site refuses all work from the coordinator until the evidence is cleared;");
            println!("            send HOME/audit/fork-* to the consortium's auditors, then: {}", clear_command(&home));
        }
    }
    if let Some(why) = fork {
        bail!("the coordinator showed this site a forked audit log: {why}");
    }
    Ok(())
}

/// Prints a prove report; errors if a record is missing from the log.
pub fn print_prove(report: &ProveReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "checked against the checkpoint this site witnessed: size {} root {}",
            report.checkpoint_size, report.checkpoint_root
        );
        println!("{} log entries name this site; every inclusion proof verified", report.entries_naming_this_site);
        for p in &report.records {
            let what = match &p.record {
                Record::Decision { job_id, accepted, .. } => {
                    format!("{} job {job_id}", if *accepted { "accepted" } else { "refused" })
                }
                Record::Contribution { job_id, round, attempt, secure, .. } => format!(
                    "{} update for job {job_id} round {round} attempt {attempt}",
                    if *secure { "masked" } else { "plain" }
                ),
                Record::Model { digest, .. } => format!("used model {}", &digest[..digest.len().min(16)]),
                Record::Refusal { job_id, round, attempt, rule, .. } => {
                    format!("refused ([policy] {rule}) in job {job_id} round {round} attempt {attempt}")
                }
            };
            let at = p.entry.map_or_else(|| "      ".into(), |n| format!("#{n:<5}"));
            println!("  {at} {what}: {}", p.finding);
        }
        for c in &report.unrecorded_claims {
            println!("  UNRECORDED {c}, but this site's journal has no such contribution");
        }
    }
    let missing = report.missing();
    if missing > 0 || !report.unrecorded_claims.is_empty() {
        bail!(
            "{missing} of this site's records are not in the log and {} log claims are not in its journal",
            report.unrecorded_claims.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home_with_evidence() -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        std::fs::create_dir_all(home.path("audit")).expect("audit dir");
        let doc =
            serde_json::json!({"error": "AUD-16 FORK: two checkpoints of size 5", "witnessed": EVIDENCE_WITNESSED});
        std::fs::write(home.path(EVIDENCE), doc.to_string()).expect("evidence");
        std::fs::write(home.path(EVIDENCE_WITNESSED), "a").expect("witnessed");
        std::fs::write(home.path(EVIDENCE_CONFLICTING), "b").expect("conflicting");
        std::fs::write(home.path(JOURNAL), "").expect("journal");
        (dir, home)
    }

    #[test]
    fn clearing_moves_the_evidence_and_records_who_and_why() {
        let (_dir, home) = home_with_evidence();
        assert_eq!(fork_evidence(&home).as_deref(), Some("AUD-16 FORK: two checkpoints of size 5"));
        let c = clear(&home, "  checked with the auditors, ticket 42 ", "alice").expect("cleared");
        assert_eq!(fork_evidence(&home), None);
        assert_eq!((c.by.as_str(), c.reason.as_str()), ("alice", "checked with the auditors, ticket 42"));
        assert_eq!(c.evidence, "AUD-16 FORK: two checkpoints of size 5");
        // The evidence file moves last; nothing is deleted, the journal stays.
        assert_eq!(
            c.files,
            ["fork-conflicting.checkpoint.json", "fork-witnessed.checkpoint.json", "fork-evidence.json"]
        );
        for f in &c.files {
            assert!(home.path(&format!("{}/{f}", c.moved_to)).is_file(), "{f} kept");
            assert!(!home.path(&format!("audit/{f}")).exists(), "{f} moved");
        }
        assert!(home.path(JOURNAL).is_file());
        assert_eq!(clearings(&home).expect("cleared.jsonl"), vec![c.clone()]);
        // Nothing left to clear.
        let e = clear(&home, "again", "alice").expect_err("nothing to clear").to_string();
        assert!(e.starts_with("there is no fork evidence to clear"), "{e}");
        // A second fork, cleared in the same second, goes to its own folder.
        let (_d2, other) = home_with_evidence();
        let first = clear(&other, "one", "bob").expect("first");
        std::fs::write(other.path(EVIDENCE), "{}").expect("evidence again");
        let second = clear(&other, "two", "bob").expect("second");
        assert_ne!(first.moved_to, second.moved_to);
        assert_eq!(clearings(&other).expect("two lines").len(), 2);
    }

    #[test]
    fn clearing_needs_a_reason() {
        let (_dir, home) = home_with_evidence();
        for reason in ["", "   \n"] {
            let e = clear(&home, reason, "alice").expect_err("no reason").to_string();
            assert!(e.starts_with("--reason must say why"), "{e}");
        }
        let long = "x".repeat(MAX_CLEAR_REASON + 1);
        assert!(clear(&home, &long, "alice").is_err());
        assert!(fork_evidence(&home).is_some(), "nothing was moved");
        assert_eq!(clearings(&home).expect("none").len(), 0);
    }

    #[test]
    fn unreadable_evidence_still_stops_the_site() {
        let (_dir, home) = home_with_evidence();
        std::fs::write(home.path(EVIDENCE), "not json {").expect("corrupt");
        assert_eq!(fork_evidence(&home).as_deref(), Some("fork evidence present but not valid JSON"));
        std::fs::write(home.path(EVIDENCE), "{}").expect("no error field");
        assert_eq!(fork_evidence(&home).as_deref(), Some("fork evidence present"));
        std::fs::remove_file(home.path(EVIDENCE)).expect("rm");
        assert_eq!(fork_evidence(&home), None);
    }
}
