//! Committing a round: the mean update applied to the base model by the job's server
//! optimiser, the new version stored, and the round's record, its contributors' counts
//! and its `round_committed` entry written as one durable write, then checkpointed.

use super::*;

/// Commits a round: loads the base model, steps it with the mean update, saves,
/// records and checkpoints. All of that is blocking work (O(model) reads, an fsync per
/// store write, a signature), so it runs with `block_in_place`: the runtime moves its
/// other tasks off this worker meanwhile, and heartbeats keep being answered. A
/// `skipped` round (its sum lost after the reveal) commits without an update, and its
/// attempt is already counted as failed.
pub(super) async fn commit_round(
    c: &Coord,
    id: &str,
    spec: &ModelSpec,
    base: &VersionRecord,
    state: RoundState,
    skipped: bool,
) -> Result<JobRecord> {
    tokio::task::block_in_place(|| commit_round_blocking(c, id, spec, base, state, skipped))
}

fn commit_round_blocking(
    c: &Coord,
    id: &str,
    spec: &ModelSpec,
    base: &VersionRecord,
    mut state: RoundState,
    skipped: bool,
) -> Result<JobRecord> {
    let job = load(c, id, Rounds::Latest(1))?;
    // A job whose latest round predates `attempts_through` needs every round once, to
    // count the attempts the new round accounts for; later commits read one round.
    let rounds = if job.attempts_since_commit().is_some() { Rounds::Latest(1) } else { Rounds::All };
    // The mean update first, in the sum's own memory (a secure round's words) or with
    // the f64 sum dropped (plaintext), before the base model is loaded: the commit never
    // holds the sum, the mean and the model at once.
    let mean: Option<Vec<f32>> = state.take_mean()?;
    let (_, params, _) = ModelSpec::load(&c.blobs.path(&Digest::parse("digest", &base.digest)?))
        .context("loading the round's base model")?;
    let n = params.values().len();
    let mut optimizer = match job.history.last().filter(|h| !h.optimizer_state.is_empty()) {
        Some(h) => {
            let bytes = c.blobs.get(&Digest::parse("optimizer_state", &h.optimizer_state)?)?;
            ServerOptimizer::from_state(&job.spec.strategy, n, &bytes)?
        }
        None => ServerOptimizer::new(&job.spec.strategy, n),
    };
    let aggregate_sha256 = state.aggregate().clone().unwrap_or_default();
    let (model, optimizer_state) = match (&state.refused(), mean) {
        // A refused aggregate changes nothing: the base model and optimiser state stay.
        (Some(why), _) => {
            c.record(Event::RoundFailed {
                job_id: id.to_string(),
                round: state.round(),
                attempt: state.attempt(),
                reason: format!("aggregate refused, the round is committed without an update: {why}"),
            })?;
            c.metrics.rounds.inc("refused");
            let kept = job.history.last().map(|h| h.optimizer_state.clone()).unwrap_or_default();
            (base.clone(), kept)
        }
        (None, mean) => {
            let mean = mean.context("no mean update for an accepted aggregate")?;
            let mut values = params.into_values();
            optimizer.apply(&mut values, &mean)?;
            let params = FlatParams::new(spec.layout(), values)?;
            let model = save_model(c, spec, &params, id, state.round())?;
            let state_bytes = optimizer.state_bytes();
            (model, if state_bytes.is_empty() { String::new() } else { c.blobs.put(&state_bytes)?.hex() })
        }
    };
    // The evaluation collected in this round is of the base model (the previous version).
    let evaluation = (!state.evaluated().is_empty()).then(|| state.evaluation().clone());
    let crisis_histogram = evaluation.as_ref().and(state.crisis_histogram().clone());
    // The round's record and its `round_committed` entry are one durable write: a stop
    // can never leave a round in the history that no site finds in the log.
    let committed = Event::RoundCommitted {
        job_id: id.to_string(),
        round: state.round(),
        aggregate_sha256: aggregate_sha256.clone(),
        model: model.digest.clone(),
        contributors: state.done().iter().cloned().collect(),
    };
    // Each contributor's `rounds_contributed` goes in the same write: a full disk right
    // after the commit can no longer lose the count.
    let counted = c.store.contributed_writes(state.done())?;
    let (job, (), seq) = c.store.update_job_logged_with(id, rounds, &c.audit, counted, |job| {
        anyhow::ensure!(
            job.completed_rounds() + 1 == state.round(),
            "round {} committed twice (history has {} rounds)",
            state.round(),
            job.completed_rounds()
        );
        match job.history.last_mut() {
            Some(prev) => {
                prev.evaluation = evaluation;
                prev.evaluated_by = state.evaluated().iter().cloned().collect();
                prev.crisis_histogram = crisis_histogram;
            }
            None => job.initial_evaluation = evaluation,
        }
        let attempts = job.attempts_since_commit().context("counting the round's attempts")?;
        job.history.push(RoundRecord {
            round: state.round(),
            model,
            optimizer_state,
            contributors: state.done().iter().cloned().collect(),
            dropped: state.dropped().iter().cloned().collect(),
            total_weight: state.total_weight(),
            completed_ms: now_ms(),
            attempts,
            attempts_through: Some(job.attempts_started),
            evaluation: None,
            evaluated_by: Vec::new(),
            crisis_histogram: None,
            secure_aggregation: state.secagg().is_some(),
            secagg_threshold: state.secagg().as_ref().map(|s| s.session.params.threshold).unwrap_or(0),
            aggregate_sha256,
            refused: state.refused().clone().unwrap_or_default(),
        });
        Ok(((), Some(committed)))
    })?;
    c.logged(seq);
    // Counted the moment the round is durable: a reader who sees the round in the job's
    // history (the control API) must never scrape a counter that lags it. A skipped
    // round's attempt was already counted as failed.
    if !skipped {
        c.metrics.rounds.inc("committed");
    }
    // Fault injection: a stop right after the commit (tests/tests/federation.rs: the
    // log holds the round; before both were one write, a stop here lost the entry).
    if crate::attack::test_env("MAEUM_COORDINATOR_TEST_EXIT_AFTER_COMMIT")
        .is_some_and(|r| r == state.round().to_string())
    {
        std::process::exit(137);
    }
    // Fault injection: the disk fills right after the commit, before its checkpoint
    // (`MAEUM_COORDINATOR_TEST_DISK_FULL` names the flag file the storage checks).
    if crate::attack::test_env("MAEUM_COORDINATOR_TEST_FULL_AFTER_COMMIT")
        .is_some_and(|r| r == state.round().to_string())
        && let Some(flag) = crate::attack::test_env("MAEUM_COORDINATOR_TEST_DISK_FULL")
    {
        std::fs::write(flag, "").context("filling the disk (test hook)")?;
    }
    c.audit.checkpoint()?;
    info!(round = state.round(), contributors = state.done().len(), dropped = state.dropped().len(), "round committed");
    c.notify();
    if let Err(e) = crate::retention::sweep(c, id) {
        warn!(error = %format!("{e:#}"), "removing old round blobs failed; they stay");
    }
    Ok(job)
}
