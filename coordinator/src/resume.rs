//! Finishing a revealed attempt after a restart (issue 16, reveal once per round).
//!
//! Once a site has revealed its shares for a round, the sum they open must not be lost:
//! sites refuse to reveal a second sum of the same round (its difference with the first
//! could single a site out), so a coordinator that lost the first could only skip the
//! round. So, when the consistency stage closes and before any site is handed the
//! survivor proof (without which none reveals), the coordinator writes the session down
//! in HOME/secagg-resume/:
//! - `session.json`: job, round, attempt, the session as announced, the replies of the
//!   closed stages, the server's snapshot (`maeum_secagg::Server::snapshot`) and the
//!   SHA-256 of the masked sum;
//! - `sum.bin`: the masked sum over U3 (4 bytes per word, little-endian);
//! - `unmasks.log`: every revealed-shares message accepted since, one hex line each,
//!   fsynced before the site is answered.
//!
//! On start ([`load`]) a session of the job's current round is restored in the unmask
//! stage, before the fleet port opens: sites resend their shares to it, the stored ones
//! are fed again, and the round commits that very attempt. The files hold no secret
//! beyond what the coordinator holds in memory anyway (masked sums, sealed shares,
//! revealed shares of the sum), are private to the coordinator's user, and are removed
//! once the round is committed or the attempt fails.
//!
//! A start also logs the `round_committed` entry of a round whose commit a stop cut off
//! between the job record and the log by an earlier version ([`log_cut_off_commits`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use maeum_protocols::wire::Digest;
use maeum_protocols::wire::secagg::{Reply, SessionInfo, StageMessage, stored};

use crate::home::{Home, now_ms};
use crate::secagg::SecAggRound;
use crate::server::{Coord, RoundState, Stage, lock};

const DIR: &str = "secagg-resume";
const SESSION: &str = "session.json";
const SUM: &str = "sum.bin";
const UNMASKS: &str = "unmasks.log";

fn dir(home: &Home) -> PathBuf {
    home.path(DIR)
}

/// What `session.json` holds (byte fields as lowercase hex).
#[derive(Serialize, Deserialize)]
struct Saved {
    job_id: String,
    round: u32,
    attempt: u32,
    evaluate_only: bool,
    binding: String,
    session: String,
    roster: String,
    reveals: Option<String>,
    survivors: String,
    proof: String,
    server: String,
    sum_sha256: String,
}

/// What the orchestrator copies out of the round under its lock.
pub struct Snapshot {
    saved: Saved,
    /// The masked sum's words; `sum.bin` holds them little-endian.
    sum: Vec<u32>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("job", &self.saved.job_id)
            .field("round", &self.saved.round)
            .field("attempt", &self.saved.attempt)
            .field("sum_bytes", &(self.sum.len() * 4))
            .finish()
    }
}

/// Takes what [`write`] stores, from the round whose consistency stage just closed.
pub fn take(r: &RoundState) -> Result<Snapshot> {
    let sa = r.secagg().as_ref().context("the round has no secure-aggregation session")?;
    let (roster, reveals, survivors, proof, server, sum) = sa.for_resume().map_err(|e| anyhow::anyhow!("{e}"))?;
    let hex = maeum_tlog::hex;
    let saved = Saved {
        job_id: r.job_id().to_string(),
        round: r.round(),
        attempt: r.attempt(),
        evaluate_only: r.evaluate_only(),
        binding: hex(&sa.session.binding),
        session: hex(&stored::session_to_bytes(&sa.info)),
        roster: hex(&stored::reply_to_bytes(&Reply::Roster(roster))),
        reveals: reveals.map(|x| hex(&stored::reply_to_bytes(&Reply::Reveals(x)))),
        survivors: hex(&stored::reply_to_bytes(&Reply::Survivors(survivors))),
        proof: hex(&stored::reply_to_bytes(&Reply::Proof(proof))),
        server: hex(&server),
        sum_sha256: words_sha256(&sum),
    };
    Ok(Snapshot { saved, sum })
}

/// Writes the session down durably (blocking): the sum first, an empty shares log,
/// then `session.json`, whose presence makes the others count.
pub fn write(home: &Home, s: &Snapshot) -> Result<()> {
    let d = dir(home);
    let _ = std::fs::remove_file(d.join(SESSION));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let path = d.join(SUM);
    // Piece by piece: the masked sum is never copied into a byte buffer of its size.
    maeum_models::write_file_with(&path, true, |w| crate::blobs::write_words_le(w, &s.sum))
        .with_context(|| format!("writing {}", path.display()))?;
    crate::home::write_file(&d.join(UNMASKS), b"", true)?;
    let json = serde_json::to_vec_pretty(&s.saved).context("encoding the session")?;
    crate::home::write_file(&d.join(SESSION), &json, true)
}

/// The SHA-256 of `words` as little-endian bytes, hashed piece by piece.
fn words_sha256(words: &[u32]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for chunk in words.chunks(1 << 16) {
        ctx.update(&chunk.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>());
    }
    maeum_tlog::hex(ctx.finish().as_ref())
}

/// Appends one accepted revealed-shares message (blocking, fsynced).
pub fn append_unmask(home: &Home, request: &maeum_protocols::wire::secagg::Request) -> Result<()> {
    let path = dir(home).join(UNMASKS);
    let mut f =
        std::fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    let line = format!("{}\n", maeum_tlog::hex(&stored::request_to_bytes(request)));
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_data())
        .with_context(|| format!("appending to {}", path.display()))
}

/// Removes the stored session (its round committed, or its attempt failed).
pub fn clear(home: &Home) {
    let d = dir(home);
    if d.exists()
        && let Err(e) = std::fs::remove_dir_all(&d)
    {
        warn!(dir = %d.display(), error = %e, "could not remove the stored secure-aggregation session");
    }
}

fn unhex(field: &str, text: &str) -> Result<Vec<u8>> {
    maeum_tlog::unhex(text).map_err(|e| anyhow::anyhow!("{field}: {e}"))
}

fn reply(field: &str, text: &str) -> Result<Reply> {
    stored::reply_from_bytes(&unhex(field, text)?).map_err(|e| anyhow::anyhow!("{field}: {e}"))
}

/// Logs each committed round whose `round_committed` entry is missing: on start,
/// before the fleet port opens. A round's record and its entry are one durable write
/// now (`Store::update_job_logged`), so only a home written by an earlier version,
/// where they were two writes and a stop between them left a round in the history that
/// no site could find in the log (every site then refused the next round's base model
/// forever), needs this. The entry is appended from the history (same aggregate, model
/// and contributors; its time is the recovery's). Returns how many.
pub fn log_cut_off_commits(c: &Coord) -> Result<usize> {
    let jobs = c.store.jobs(crate::store::Rounds::All)?;
    if jobs.iter().all(|j| j.history.is_empty()) {
        return Ok(0);
    }
    let mut logged = std::collections::HashSet::new();
    for seq in 0..c.audit.size() {
        if let maeum_tlog::Event::RoundCommitted { job_id, round, .. } = c.audit.entry(seq)?.event {
            logged.insert((job_id, round));
        }
    }
    let mut appended = 0;
    for job in &jobs {
        for r in job.history.iter().filter(|r| !logged.contains(&(job.id.clone(), r.round))) {
            warn!(job = %job.id, round = r.round, "the audit log lacks this committed round (a stop between the commit and its log entry); logging it now");
            c.record(maeum_tlog::Event::RoundCommitted {
                job_id: job.id.clone(),
                round: r.round,
                aggregate_sha256: r.aggregate_sha256.clone(),
                model: r.model.digest.clone(),
                contributors: r.contributors.clone(),
            })?;
            appended += 1;
        }
    }
    if appended > 0 {
        c.audit.checkpoint()?;
    }
    Ok(appended)
}

/// On start: restores a stored session of the current round of an active job into
/// `c.round`, in the unmask stage. A stale one (its round committed, its job ended) is
/// removed; one that cannot be restored is logged and removed (the round is then
/// retried, and skipped if the sites already revealed it).
pub fn load(c: &Coord) {
    let path = dir(&c.home).join(SESSION);
    if !path.exists() {
        return;
    }
    match restore(c) {
        Ok(Some(r)) => {
            info!(
                job = %r.job_id(),
                round = r.round(),
                attempt = r.attempt(),
                "restarted in the unmask stage of a revealed attempt; finishing that attempt"
            );
            *lock(&c.round) = Some(r);
        }
        Ok(None) => clear(&c.home),
        Err(e) => {
            error!(error = %format!("{e:#}"), file = %path.display(), "cannot restore the stored secure-aggregation session; the round will be retried");
            clear(&c.home);
        }
    }
}

fn restore(c: &Coord) -> Result<Option<RoundState>> {
    let d = dir(&c.home);
    let text = std::fs::read(d.join(SESSION)).context("reading session.json")?;
    let saved: Saved = serde_json::from_slice(&text).context("session.json")?;
    let Some(job) = c.store.job(&saved.job_id, crate::store::Rounds::Latest(1))? else { return Ok(None) };
    if !job.state.is_active() {
        return Ok(None);
    }
    let (current, model) = if saved.evaluate_only {
        match job.history.last() {
            Some(last) if last.evaluation.is_none() => (job.completed_rounds(), last.model.clone()),
            _ => return Ok(None),
        }
    } else {
        (job.completed_rounds() + 1, job.latest().cloned().context("the job has no model")?)
    };
    if saved.round != current {
        return Ok(None);
    }
    let sum = std::fs::read(d.join(SUM)).context("reading sum.bin")?;
    if Digest::of(&sum).hex() != saved.sum_sha256 {
        bail!("sum.bin does not match its SHA-256 in session.json (the file is damaged)");
    }
    let words: Vec<u32> = sum.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let info: SessionInfo =
        stored::session_from_bytes(&unhex("session", &saved.session)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    let binding: [u8; 32] =
        unhex("binding", &saved.binding)?.try_into().map_err(|_| anyhow::anyhow!("binding: not 32 bytes"))?;
    let session = crate::rounds::session_of(c, &info, &saved.job_id, saved.round, saved.attempt, binding)?;
    let server = maeum_secagg::Server::resume(session.clone(), &unhex("server", &saved.server)?, words)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Reply::Roster(roster) = reply("roster", &saved.roster)? else { bail!("roster: not a roster") };
    let reveals = match &saved.reveals {
        Some(t) => match reply("reveals", t)? {
            Reply::Reveals(r) => Some(r),
            _ => bail!("reveals: not graph reveals"),
        },
        None => None,
    };
    let Reply::Survivors(survivors) = reply("survivors", &saved.survivors)? else { bail!("survivors: not a set") };
    let Reply::Proof(proof) = reply("proof", &saved.proof)? else { bail!("proof: not a proof") };
    let u3 = survivors.survivors.clone();
    let signers: Vec<u16> = proof.signatures.iter().map(|s| s.index).collect();
    // The job file fixes these, as when the session was opened.
    let mut sa = SecAggRound::resumed(
        session,
        info,
        job.spec.evaluation_words() as usize,
        job.spec.secure_aggregation.clip_norm,
        job.spec.privacy_plan()?.and_then(|p| p.distributed()),
        server,
        roster,
        reveals,
        survivors,
        proof,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stored_shares = std::fs::read_to_string(d.join(UNMASKS)).unwrap_or_default();
    let mut fed = 0;
    for line in stored_shares.lines().filter(|l| !l.is_empty()) {
        // A torn last line (killed mid-append) is dropped: that site resends.
        let Ok(request) =
            unhex("unmasks.log", line).and_then(|b| stored::request_from_bytes(&b).map_err(|e| anyhow::anyhow!("{e}")))
        else {
            warn!("unmasks.log: an unreadable line; skipped (its site resends its shares)");
            continue;
        };
        let StageMessage::Unmask(m) = &request.message else { continue };
        let Some(site) = sa.names(&[m.index]).pop() else { continue };
        if let Err(e) = sa.submit(&site, request.message.clone(), &Default::default()) {
            warn!(site = %site, error = %e.message(), "a stored unmask message was refused again; skipped");
            continue;
        }
        fed += 1;
    }
    let model_ref = crate::rounds::model_ref(&model)?;
    let deadline_ms = now_ms() + job.spec.deadlines.train as i64 * 1000;
    let mut r = RoundState::new(&job, saved.round, saved.attempt, Stage::Train, model_ref, deadline_ms);
    // As before the crash: U3's inputs are in the sum; whoever did not sign U3 is out.
    let done = sa.names(&u3).into_iter().collect();
    let signed = sa.names(&signers);
    let dropped = sa.session.participants.iter().map(|p| p.site_id.clone()).filter(|s| !signed.contains(s)).collect();
    sa.stage_deadline_ms = now_ms() + job.spec.deadlines.secagg as i64 * 1000;
    info!(round = saved.round, attempt = saved.attempt, stored_shares = fed, "secure-aggregation session restored");
    r.restore_session(sa, done, dropped, saved.evaluate_only);
    Ok(Some(r))
}
