//! Round orchestration: drives one job at a time through join → rounds → final
//! evaluation, committing each round to the state database before the next starts.
//!
//! Crash safety: everything a round needs to resume is committed at the end of the
//! previous round (model blob and server-optimiser state fsynced, then the job record
//! flushed). A coordinator killed mid-round restarts that round with a new attempt
//! number, so an update computed for the interrupted attempt is refused, and no model
//! version is produced twice or lost. The exception is an attempt whose sites had begun
//! to reveal their shares: it was written down before the reveal (`crate::resume`) and
//! is finished, since sites reveal one sum per round only.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{Instrument, info, info_span, warn};

use maeum_models::model::ModelSpec;
use maeum_models::params::FlatParams;
use maeum_protocols::wire::{Digest, ModelRef};

use maeum_tlog::Event;

use crate::home::now_ms;
use crate::secagg::SecAggRound;
// The SecAgg core's own stage type (the round's `Stage` is train or evaluate).
use crate::server::{Coord, RoundState, Stage, lock};
use crate::store::{JobRecord, JobState, RoundRecord, Rounds, VersionRecord};
use crate::strategy::ServerOptimizer;
use maeum_secagg::server::Stage as SaStage;

mod commit;
mod secure;

use commit::commit_round;
pub(crate) use secure::session_of;
use secure::{SecAggEnd, drive_secagg, new_session};

const TICK: Duration = Duration::from_millis(250);

/// Runs forever: picks the oldest active job and drives it.
pub async fn orchestrate(c: Arc<Coord>) {
    // Consecutive pauses for a full disk: the wait before trying again doubles.
    let mut paused = 0u32;
    loop {
        let next = match c.store.jobs(Rounds::Latest(0)) {
            Ok(jobs) => jobs.into_iter().find(|j| j.state.is_active()),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading jobs");
                None
            }
        };
        let Some(job) = next else {
            *lock(&c.current_job) = None;
            let mut rx = c.changed.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
            continue;
        };
        let id = job.id.clone();
        *lock(&c.current_job) = Some(id.clone());
        set_activity(&c, String::new());
        let span = info_span!("job", id = %id);
        let result = drive(&c, &id).instrument(span).await;
        *lock(&c.round) = None;
        if let Err(e) = &result
            && crate::storage::is_disk_full(e)
        {
            // Nothing is lost: the job resumes from its last commit once writes work
            // again. It stays the current job, shown as paused.
            paused += 1;
            let pause = Duration::from_secs((1u64 << paused.min(6)).min(60));
            let why = format!("{e:#}");
            if paused == 1 {
                tracing::error!(job = %id, error = %why, "the disk is full: the job is paused until space returns");
            } else {
                warn!(job = %id, retry_in_s = pause.as_secs(), "the disk is still full; the job stays paused");
            }
            set_activity(&c, format!("paused: the disk is full ({why}); trying again in {} s", pause.as_secs()));
            tokio::time::sleep(pause).await;
            continue;
        }
        if paused > 0 {
            info!(job = %id, "the job resumed after the disk filled up");
            paused = 0;
        }
        *lock(&c.current_job) = None;
        if let Err(e) = result {
            warn!(job = %id, error = %format!("{e:#}"), "job failed");
            let error = format!("{e:#}");
            if let Err(e) = finish(&c, &id, JobState::Failed, error) {
                warn!(job = %id, error = %format!("{e:#}"), "recording the job's failure");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The job's end is in the log (`finish`, with the final state); a checkpoint
        // over everything so far.
        if let Err(e) = c.audit.checkpoint() {
            warn!(job = %id, error = %format!("{e:#}"), "signing a checkpoint");
        }
        c.notify();
    }
}

fn set_activity(c: &Coord, text: String) {
    c.metrics.disk_full.set(i64::from(c.store.db().disk_full()));
    let mut a = lock(&c.activity);
    if *a != text {
        *a = text;
        drop(a);
        c.notify();
    }
}

/// Job `id` with the rounds `rounds` asks for. Every path that runs each round or tick
/// reads the latest round at most, so its cost stays flat however long the job grows.
fn load(c: &Coord, id: &str, rounds: Rounds) -> Result<JobRecord> {
    c.store.job(id, rounds)?.with_context(|| format!("job {id} vanished"))
}

/// The job with its latest round; `Ok(None)` when it was aborted meanwhile.
fn reload_active(c: &Coord, id: &str) -> Result<Option<JobRecord>> {
    let j = load(c, id, Rounds::Latest(1))?;
    Ok(j.state.is_active().then_some(j))
}

/// [`reload_active`] without the rounds (for loops that tick).
pub(crate) fn active_head(c: &Coord, id: &str) -> Result<Option<JobRecord>> {
    let j = load(c, id, Rounds::Latest(0))?;
    Ok(j.state.is_active().then_some(j))
}

fn save_model(c: &Coord, spec: &ModelSpec, params: &FlatParams, job: &str, round: u32) -> Result<VersionRecord> {
    let tmp = c.home.uploads().join(format!(".model-{job}-{round}.safetensors"));
    let meta = [("maeum.job".to_string(), job.to_string()), ("maeum.round".to_string(), round.to_string())];
    spec.save(&tmp, params, meta.into_iter().collect()).context("writing the new model version")?;
    let (digest, size) = c.blobs.put_file(&tmp)?;
    Ok(VersionRecord { digest: digest.hex(), size, layout_digest: spec.layout().digest().to_string() })
}

pub(crate) fn model_ref(v: &VersionRecord) -> Result<ModelRef> {
    Ok(ModelRef {
        digest: Digest::parse("digest", &v.digest)?,
        size: v.size,
        layout_digest: Digest::parse("layout_digest", &v.layout_digest)?,
    })
}

async fn drive(c: &Arc<Coord>, id: &str) -> Result<()> {
    let mut job = load(c, id, Rounds::Latest(0))?;
    // Every entry so far under a signed checkpoint before the job goes on (again, after
    // a pause or a restart): a full disk or a stop between a round's commit and its
    // checkpoint would otherwise leave its `round_committed` entry where no site can
    // prove it, and every site would refuse the next round's base model.
    c.audit.checkpoint()?;
    let spec = job.spec.model_spec()?;
    if job.initial.is_none() {
        let params = job.spec.initial_params()?;
        let initial = save_model(c, &spec, &params, id, 0)?;
        job = c
            .store
            .update_job(id, Rounds::Latest(0), |j| {
                j.initial = Some(initial);
                Ok(())
            })?
            .0;
        info!(job = %id, "initial model stored");
    }
    if job.state == JobState::Pending {
        if !join(c, id).await? {
            return Ok(());
        }
        // The start and its `job_started` entry are one durable write.
        let (started, (), seq) = c.store.update_job_logged(id, Rounds::Latest(0), &c.audit, |j| {
            if j.state != JobState::Pending {
                return Ok(((), None));
            }
            j.state = JobState::Running;
            let started = Event::JobStarted {
                job_id: j.id.clone(),
                initial_model: j.initial.as_ref().map(|v| v.digest.clone()).unwrap_or_default(),
                sites: j.accepted().cloned().collect(),
            };
            Ok(((), Some(started)))
        })?;
        c.logged(seq);
        // Signed now: sites prove round 1's base model against a checkpoint over it.
        c.audit.checkpoint()?;
        job = started;
        if !job.state.is_active() {
            return Ok(());
        }
    }
    while job.completed_rounds() < job.spec.rounds {
        let round = job.completed_rounds() + 1;
        let Some(next) = run_round(c, id, round, &spec).instrument(info_span!("round", n = round)).await? else {
            return Ok(());
        };
        job = next;
    }
    if final_evaluation(c, id).await?.is_none() {
        return Ok(());
    }
    // The final model becomes a signed, logged release (idempotent after a restart);
    // an operator promotes it to make sites install it.
    let done = load(c, id, Rounds::All)?;
    let (c2, last) = (c.clone(), done.completed_rounds());
    let release = tokio::task::spawn_blocking(move || crate::registry::release(&c2, &done, last))
        .await
        .context("releasing the final model")??;
    c.metrics.releases.inc();
    info!(job = %id, version = release.version, model = %release.model.digest, "final model released (signed and logged); `models promote` makes sites install it");
    finish(c, id, JobState::Completed, String::new())?;
    set_activity(c, "completed".into());
    info!(job = %id, "job completed");
    Ok(())
}

/// Ends an active job in `state` (`error`: why, for a failure) and logs its
/// `job_finished` entry in the same durable write; a job that already ended is left as
/// it is. The one way a job ends (`jobs abort` included).
pub(crate) fn finish(c: &Coord, id: &str, state: JobState, error: String) -> Result<JobRecord> {
    let (job, (), seq) = c.store.update_job_logged(id, Rounds::Latest(0), &c.audit, |j| {
        if !j.state.is_active() {
            return Ok(((), None));
        }
        j.state = state;
        if !error.is_empty() {
            j.error = error;
        }
        Ok(((), Some(Event::JobFinished { job_id: j.id.clone(), state: state.as_str().to_string() })))
    })?;
    c.logged(seq);
    Ok(job)
}

/// Offers the job until at least `min_sites` accepted and either every online site has
/// decided or the join deadline passed. Returns false if the job was aborted.
async fn join(c: &Coord, id: &str) -> Result<bool> {
    let started = tokio::time::Instant::now();
    loop {
        let Some(job) = active_head(c, id)? else { return Ok(false) };
        let accepted = job.accepted().count();
        let online = c.online_sites();
        let undecided = online.iter().filter(|s| !job.decisions.contains_key(*s)).count();
        let min = job.spec.min_sites as usize;
        set_activity(c, format!("joining: {accepted} of {min} required sites accepted, {undecided} online undecided"));
        let deadline = Duration::from_secs(job.spec.deadlines.join);
        if accepted >= min && (undecided == 0 || started.elapsed() >= deadline) {
            return Ok(true);
        }
        tokio::time::sleep(TICK).await;
    }
}

async fn run_round(c: &Coord, id: &str, round: u32, spec: &ModelSpec) -> Result<Option<JobRecord>> {
    use crate::attack::{self, Attack};
    // Fault injection (`difference`): the site left out after an unmasked sum was
    // thrown away.
    let mut differenced: Option<String> = None;
    // Failed attempts of this round in a row: the pause before the next one doubles.
    let mut failures = 0u32;
    loop {
        let (job, attempt, base, secure) = if let Some(attempt) = resumed_attempt(c, id, round, false) {
            // Restarted after sites revealed this attempt's shares: finish it.
            let Some(job) = reload_active(c, id)? else { return Ok(None) };
            let base = job.latest().cloned().context("job has no model")?;
            (job, attempt, base, true)
        } else {
            let Some(job) = reload_active(c, id)? else { return Ok(None) };
            let min = job.spec.min_sites as usize;
            let online = c.online_sites();
            let now = now_ms();
            let benched: Vec<String> =
                job.accepted().filter_map(|s| Some(format!("{s} {}", job.benched(s, now)?.sitting_out(now)))).collect();
            let eligible: Vec<&String> = job
                .accepted()
                .filter(|s| {
                    !c.revocations.is_revoked(s) && !job.excluded.contains_key(*s) && job.benched(s, now).is_none()
                })
                .collect();
            let mut selected: BTreeSet<String> = eligible
                .iter()
                .filter(|s| online.contains(**s) && differenced.as_deref() != Some(s.as_str()))
                .map(|s| (*s).clone())
                .collect();
            // Just after a (re)start, give accepted sites one heartbeat timeout to reconnect
            // rather than starting the round without them.
            let settling = c.started.elapsed() < c.settings.heartbeat_timeout && selected.len() < eligible.len();
            if selected.len() < min || settling {
                let sitting_out =
                    if benched.is_empty() { String::new() } else { format!("; sitting out: {}", benched.join(", ")) };
                set_activity(
                    c,
                    format!("round {round}: waiting for sites ({} of {min} online{sitting_out})", selected.len()),
                );
                tokio::time::sleep(TICK).await;
                continue;
            }
            if let Some(Attack::Isolate(target)) = attack::current()
                && selected.contains(&target)
            {
                let other = selected.iter().find(|s| **s != target).cloned();
                selected = [Some(target), other].into_iter().flatten().collect();
                warn!(round, sites = ?selected, "FAULT INJECTION: isolating a site in a session of two");
            }
            let secure = job.spec.secure_aggregation.enabled();
            let num_params = spec.layout().numel() as u64;
            if secure
                && let Err(why) = job.spec.secure_aggregation.session_params(
                    selected.len(),
                    num_params,
                    job.spec.evaluation_words(),
                    job.spec.min_sites,
                )
            {
                set_activity(c, format!("round {round}: waiting for sites: {why}"));
                tokio::time::sleep(TICK).await;
                continue;
            }
            let (job, attempt) = start_attempt(c, id)?;
            let base = job.latest().cloned().context("job has no model")?;
            let deadline_ms = now_ms() + job.spec.deadlines.train as i64 * 1000;
            let mut state = RoundState::new(&job, round, attempt, Stage::Train, model_ref(&base)?, deadline_ms);
            state.select(selected.clone());
            if let Some(Attack::Divergent(target)) = attack::current() {
                // Every other site gets a model of its own: the base model halved.
                let (_, params, _) = ModelSpec::load(&c.blobs.path(&Digest::parse("digest", &base.digest)?))?;
                let halved: Vec<f32> = params.values().iter().map(|v| v * 0.5).collect();
                let other = save_model(c, spec, &FlatParams::new(spec.layout(), halved)?, id, round)?;
                warn!(round, target = %target, "FAULT INJECTION: handing every other site a different base model");
                state.hand_divergent(target, model_ref(&other)?);
            }
            if secure {
                let sa = new_session(c, &job, round, attempt, &selected, num_params, &model_ref(&base)?.digest)?;
                info!(
                    round,
                    attempt,
                    sites = selected.len(),
                    threshold = sa.session.params.threshold,
                    degree = sa.session.params.degree,
                    "round started with secure aggregation"
                );
                state.attach_session(sa, false);
            } else {
                warn!(
                    round,
                    attempt,
                    sites = selected.len(),
                    "round started WITHOUT secure aggregation (debugging job)"
                );
            }
            c.record(Event::RoundStarted {
                job_id: id.to_string(),
                round,
                attempt,
                sites: selected.iter().cloned().collect(),
                secure_aggregation: secure,
            })?;
            clear_uploads(c);
            *lock(&c.round) = Some(state);
            c.notify();
            (job, attempt, base, secure)
        };
        let min = job.spec.min_sites as usize;
        let deadline_ms = lock(&c.round).as_ref().map_or(0, |r| r.deadline_ms());
        let train_started = std::time::Instant::now();
        let finished = if secure {
            match drive_secagg(c, id, round).await? {
                SecAggEnd::Aborted => false,
                SecAggEnd::Failed(why) => {
                    if let Some(ended) = lock(&c.round).take() {
                        account_attempt(c, id, &ended)?;
                    }
                    crate::resume::clear(&c.home);
                    c.record(Event::RoundFailed { job_id: id.to_string(), round, attempt, reason: why.clone() })?;
                    c.metrics.rounds.inc("failed");
                    clear_uploads(c);
                    // Sites revealed a sum of this round once already, and this
                    // coordinator no longer has it (a restart after the reveal): they
                    // will not reveal another, so the round is skipped without an
                    // update rather than retried forever.
                    if lock(&c.revealed_before).remove(&(id.to_string(), round)) {
                        warn!(round, "sites already revealed a sum of this round that was lost; skipping the round");
                        let mut skipped =
                            RoundState::new(&job, round, attempt, Stage::Train, model_ref(&base)?, deadline_ms);
                        skipped.refuse(
                            "sites had already revealed a sum of this round, which this coordinator lost (reveal \
                             once per round); the round is skipped",
                        );
                        let committed = commit_round(c, id, spec, &base, skipped, true).await?;
                        return Ok(Some(committed));
                    }
                    warn!(round, attempt, reason = %why, "secure aggregation failed; retrying the round with a new session");
                    failures += 1;
                    pause_before_retry(c, id, format!("round {round}: attempt {attempt} failed ({why})"), failures)
                        .await?;
                    continue;
                }
                SecAggEnd::Done => {
                    let done = lock(&c.round).as_ref().map(|r| r.done().clone()).unwrap_or_default();
                    match attack::current() {
                        Some(Attack::Difference(target)) if differenced.is_none() && done.contains(&target) => {
                            *lock(&c.round) = None;
                            crate::resume::clear(&c.home);
                            warn!(round, attempt, target = %target, "FAULT INJECTION: discarding an unmasked sum and retrying without one site");
                            c.record(Event::RoundFailed {
                                job_id: id.to_string(),
                                round,
                                attempt,
                                reason: "fault injection: unmasked sum discarded".into(),
                            })?;
                            differenced = Some(target);
                            continue;
                        }
                        _ => true,
                    }
                }
            }
        } else {
            wait_stage(c, id, round, deadline_ms).await?
        };
        if !finished {
            *lock(&c.round) = None;
            crate::resume::clear(&c.home);
            return Ok(None);
        }
        let Some(state) = lock(&c.round).take() else { return Ok(None) };
        c.metrics.stage("train", train_started.elapsed());
        clear_uploads(c);
        account_attempt(c, id, &state)?;
        if state.done().len() < min {
            crate::resume::clear(&c.home);
            c.metrics.rounds.inc("failed");
            c.record(Event::RoundFailed {
                job_id: id.to_string(),
                round,
                attempt,
                reason: format!("only {} updates, min_sites is {min}", state.done().len()),
            })?;
            warn!(round, attempt, updates = state.done().len(), min, "too few updates; retrying the round");
            failures += 1;
            let what = format!("round {round}: only {} updates (< {min})", state.done().len());
            pause_before_retry(c, id, what, failures).await?;
            continue;
        }
        let commit_started = std::time::Instant::now();
        let committed = commit_round(c, id, spec, &base, state, false).await?;
        // Committed: the stored session is no longer needed (a restart before this
        // line finishes the same attempt again, and commits the same sum).
        crate::resume::clear(&c.home);
        c.metrics.stage("commit", commit_started.elapsed());
        return Ok(Some(committed));
    }
}

/// The attempt of a session that `resume::load` restored, on start, for this round of
/// `id` (or for its final evaluation), if any. Only then is `c.round` set when a round
/// begins.
fn resumed_attempt(c: &Coord, id: &str, round: u32, evaluate_only: bool) -> Option<u32> {
    lock(&c.round)
        .as_ref()
        .filter(|r| {
            r.job_id() == id && r.round() == round && r.evaluate_only() == evaluate_only && r.secagg().is_some()
        })
        .map(|r| r.attempt())
}

/// Waits until every selected site delivered or dropped, or the deadline passed.
/// Returns false if the job was aborted.
async fn wait_stage(c: &Coord, id: &str, round: u32, deadline_ms: i64) -> Result<bool> {
    loop {
        if active_head(c, id)?.is_none() {
            return Ok(false);
        }
        let (waiting, done, total, stage) = {
            let mut guard = lock(&c.round);
            let Some(r) = guard.as_mut() else { return Ok(false) };
            for s in r.waiting() {
                if !c.is_online(&s) || c.revocations.is_revoked(&s) {
                    warn!(round, site = %s, "site went offline; dropped from the round");
                    r.drop_for(&s, "went offline");
                }
            }
            let finished = if r.stage() == Stage::Train { r.done().len() } else { r.evaluated().len() };
            (r.waiting(), finished, r.selected().len(), r.stage())
        };
        let what = if stage == Stage::Train { "updates" } else { "evaluations" };
        set_activity(c, format!("round {round}: {done}/{total} {what}"));
        if waiting.is_empty() {
            return Ok(true);
        }
        if now_ms() >= deadline_ms {
            let mut guard = lock(&c.round);
            if let Some(r) = guard.as_mut() {
                for s in r.waiting() {
                    warn!(round, site = %s, "straggler missed the deadline; excluded from the round");
                    r.drop_for(&s, "missed the deadline");
                }
            }
            return Ok(true);
        }
        let mut rx = c.changed.subscribe();
        let _ = tokio::time::timeout(TICK, rx.changed()).await;
    }
}

/// Books an ended training attempt in the job's strikes, and says who now sits out.
fn account_attempt(c: &Coord, id: &str, state: &RoundState) -> Result<()> {
    if state.selected().is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let (_, benched) = c.store.update_job(id, Rounds::Latest(0), |j| {
        Ok(j.account_attempt(state.selected(), state.done(), state.why_dropped(), now))
    })?;
    for (site, s) in benched {
        warn!(
            site = %site,
            failed_attempts = s.count,
            sits_out_s = (s.benched_until_ms - now) / 1000,
            last = %s.last,
            "site keeps failing; it sits out the next attempts"
        );
    }
    Ok(())
}

/// Waits before the next attempt after `failures` failed ones in a row: 1 s, doubling,
/// at most 30 s (an abort ends the wait).
async fn pause_before_retry(c: &Coord, id: &str, what: String, failures: u32) -> Result<()> {
    let pause = Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30));
    set_activity(c, format!("{what}; retrying in {} s", pause.as_secs()));
    let until = tokio::time::Instant::now() + pause;
    while tokio::time::Instant::now() < until {
        if active_head(c, id)?.is_none() {
            return Ok(());
        }
        tokio::time::sleep(TICK.min(until - tokio::time::Instant::now())).await;
    }
    Ok(())
}

/// Durably numbers a new attempt (of a round or of the final evaluation).
fn start_attempt(c: &Coord, id: &str) -> Result<(JobRecord, u32)> {
    c.store.update_job(id, Rounds::Latest(1), |j| {
        j.attempts_started += 1;
        Ok(j.attempts_started)
    })
}

fn clear_uploads(c: &Coord) {
    if let Ok(dir) = std::fs::read_dir(c.home.uploads()) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().ends_with(".part") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

async fn final_evaluation(c: &Coord, id: &str) -> Result<Option<JobRecord>> {
    loop {
        let Some(job) = reload_active(c, id)? else { return Ok(None) };
        let Some(last) = job.history.last() else { return Ok(Some(job)) };
        if last.evaluation.is_some() {
            return Ok(Some(job));
        }
        let (round, attempt, secure) = if let Some(attempt) = resumed_attempt(c, id, job.completed_rounds(), true) {
            // Restarted after sites revealed this evaluation's shares: finish it.
            (job.completed_rounds(), attempt, true)
        } else {
            let accepted: BTreeSet<String> = job
                .accepted()
                .filter(|s| !c.revocations.is_revoked(s) && !job.excluded.contains_key(*s))
                .cloned()
                .collect();
            let online = c.online_sites();
            let selected: BTreeSet<String> = accepted.intersection(&online).cloned().collect();
            // A secure job evaluates in a secure-aggregation session of its own (the counts
            // inside the masked inputs), which needs min_sites and the threshold.
            let secure = job.spec.secure_aggregation.enabled();
            let min = if secure { job.spec.min_sites as usize } else { 1 };
            let session = job.spec.secure_aggregation.session_params(
                selected.len(),
                0,
                job.spec.evaluation_words(),
                job.spec.min_sites,
            );
            if selected.len() < min || (secure && session.is_err()) {
                set_activity(c, format!("final evaluation: waiting for sites ({} of {min} online)", selected.len()));
                tokio::time::sleep(TICK).await;
                continue;
            }
            let (job, attempt) = start_attempt(c, id)?;
            let round = job.completed_rounds();
            let deadline_ms = now_ms() + job.spec.deadlines.evaluate as i64 * 1000;
            let model = model_ref(&job.history[job.history.len() - 1].model)?;
            let stage = if secure { Stage::Train } else { Stage::Evaluate };
            let mut state = RoundState::new(&job, round, attempt, stage, model.clone(), deadline_ms);
            state.select(selected);
            if secure {
                let session = new_session(c, &job, round, attempt, state.selected(), 0, &model.digest)?;
                state.attach_session(session, true);
                c.record(Event::RoundStarted {
                    job_id: id.to_string(),
                    round,
                    attempt,
                    sites: state.selected().iter().cloned().collect(),
                    secure_aggregation: true,
                })?;
                info!(
                    round,
                    attempt,
                    sites = state.selected().len(),
                    "final evaluation started with secure aggregation"
                );
            }
            clear_uploads(c);
            *lock(&c.round) = Some(state);
            c.notify();
            (round, attempt, secure)
        };
        let deadline_ms = lock(&c.round).as_ref().map_or(0, |r| r.deadline_ms());
        let started = std::time::Instant::now();
        let finished = if secure {
            match drive_secagg(c, id, round).await? {
                SecAggEnd::Aborted => false,
                SecAggEnd::Failed(why) => {
                    *lock(&c.round) = None;
                    crate::resume::clear(&c.home);
                    c.record(Event::RoundFailed { job_id: id.to_string(), round, attempt, reason: why.clone() })?;
                    clear_uploads(c);
                    // The sites revealed this evaluation once and this coordinator
                    // lost it: they will not reveal another, so the job ends without
                    // a final evaluation rather than retrying forever.
                    if lock(&c.revealed_before).remove(&(id.to_string(), round)) {
                        warn!(round, "sites already revealed the final evaluation, which was lost; it is skipped");
                        return Ok(Some(job));
                    }
                    warn!(attempt, reason = %why, "the final evaluation's secure aggregation failed; retrying");
                    tokio::time::sleep(TICK).await;
                    continue;
                }
                SecAggEnd::Done => true,
            }
        } else {
            wait_stage(c, id, round, deadline_ms).await?
        };
        if !finished {
            *lock(&c.round) = None;
            crate::resume::clear(&c.home);
            return Ok(None);
        }
        clear_uploads(c);
        c.metrics.stage("evaluate", started.elapsed());
        let Some(state) = lock(&c.round).take() else { return Ok(None) };
        if state.evaluated().is_empty() {
            continue;
        }
        let (job, ()) = c.store.update_job(id, Rounds::Latest(1), |job| {
            if let Some(last) = job.history.last_mut() {
                last.evaluation = Some(state.evaluation().clone());
                last.evaluated_by = state.evaluated().iter().cloned().collect();
                last.crisis_histogram = state.crisis_histogram().clone();
            }
            Ok(())
        })?;
        crate::resume::clear(&c.home);
        return Ok(Some(job));
    }
}
