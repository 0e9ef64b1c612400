//! Driving a round's secure-aggregation session: opening it for the selected sites,
//! closing each stage, storing it for a restart before the unmask stage, and unmasking.

use super::*;

/// A new secure-aggregation session for the selected sites: indices in site-id order,
/// each with the certificate the site was approved with, bound to the job file and the
/// round's base model.
pub(super) fn new_session(
    c: &Coord,
    job: &JobRecord,
    round: u32,
    attempt: u32,
    selected: &BTreeSet<String>,
    num_params: u64,
    base: &Digest,
) -> Result<SecAggRound> {
    use maeum_protocols::wire::secagg::{Member, SessionInfo};
    let eval_words = job.spec.evaluation_words();
    let params = job
        .spec
        .secure_aggregation
        .session_params(selected.len(), num_params, eval_words, job.spec.min_sites)
        .map_err(anyhow::Error::msg)?;
    let distributed = job.spec.privacy_plan()?.and_then(|p| p.distributed());
    if let Some(m) = &distributed {
        m.check_range(selected.len()).map_err(anyhow::Error::msg)?;
    }
    let mut members = Vec::new();
    for (i, site) in selected.iter().enumerate() {
        let path = c.home.sites().join(format!("{site}.pem"));
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the approved certificate of site/{site} ({})", path.display()))?;
        let der = maeum_pki::identity::pem_to_der(&pem)?
            .into_iter()
            .next()
            .with_context(|| format!("{} holds no certificate", path.display()))?;
        let mut der = der.to_vec();
        if crate::attack::current() == Some(crate::attack::Attack::Sybil(site.clone())) {
            // A certificate the CA signs now, for a key nobody approved in the log.
            let (_, csr) = maeum_pki::identity::site_request(site)?;
            let (_, pem) = c.home.ca()?.sign_site_request(&csr, Some(site), 30)?;
            der = maeum_pki::identity::pem_to_der(&pem)?.into_iter().next().context("minted certificate")?.to_vec();
            warn!(site = %site, "FAULT INJECTION: a session member with a certificate the log never approved");
        }
        members.push(Member { index: (i + 1) as u16, site_id: site.clone(), certificate_der: der });
    }
    // No graph seed: with `neighbours > 0` the sites draw it together after the roster
    // (SA-13), so the coordinator cannot pick a neighbourhood of colluders.
    let info = SessionInfo { consortium: c.home.consortium()?.name, params, members };
    let binding = maeum_protocols::wire::secagg::round_binding(&Digest::parse("spec_sha256", &job.spec_sha256)?, base);
    let session = session_of(c, &info, &job.id, round, attempt, binding)?;
    SecAggRound::new(session, info, eval_words as usize, job.spec.secure_aggregation.clip_norm, distributed)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The session `info` announces for an attempt, each member's identity key taken from
/// its certificate after checking it against the consortium CA and the site's name.
pub(crate) fn session_of(
    c: &Coord,
    info: &maeum_protocols::wire::secagg::SessionInfo,
    job_id: &str,
    round: u32,
    attempt: u32,
    binding: [u8; 32],
) -> Result<maeum_secagg::Session> {
    let ca = c.home.trusted_cas_pem()?;
    info.to_session(job_id, round, attempt, binding, |m| -> Result<Vec<u8>> {
        let peer = maeum_pki::identity::PeerId::site(&m.site_id)?;
        Ok(maeum_pki::identity::verify_peer_cert(&ca, &m.certificate_der, &peer)?)
    })
}

pub(super) enum SecAggEnd {
    Done,
    Aborted,
    Failed(String),
}

/// Drives the session of the round in progress through its stages. On `Done` the
/// round state holds the unmasked sum, the total weight and the contributors.
pub(super) async fn drive_secagg(c: &Coord, id: &str, round: u32) -> Result<SecAggEnd> {
    let job = load(c, id, Rounds::Latest(0))?;
    let stage_secs = job.spec.deadlines.secagg as i64;
    let min_sites = job.spec.min_sites as usize;
    // An attacking coordinator (fault injection) skips its own checks: the sites must
    // hold on their own.
    let own_checks = crate::attack::current().is_none();
    {
        let mut guard = lock(&c.round);
        if let Some(sa) = guard.as_mut().and_then(|r| r.session_mut()) {
            sa.stage_deadline_ms = now_ms() + stage_secs * 1000;
        }
    }
    loop {
        if active_head(c, id)?.is_none() {
            return Ok(SecAggEnd::Aborted);
        }
        let (close, status, unmask) = {
            let mut guard = lock(&c.round);
            let Some(r) = guard.as_mut() else { return Ok(SecAggEnd::Aborted) };
            let done = r.done().clone();
            let train_deadline = r.deadline_ms();
            let Some(sa) = r.secagg().as_ref() else { return Ok(SecAggEnd::Failed("no session".into())) };
            let expected = sa.expected(&done);
            let mut newly_dropped = Vec::new();
            for s in &expected {
                // Just after a restart (a session resumed in the unmask stage) no site
                // has heart-beaten yet: give them one heartbeat timeout.
                let offline = !c.is_online(s) && c.started.elapsed() >= c.settings.heartbeat_timeout;
                if !r.dropped().contains(s) && (offline || c.revocations.is_revoked(s)) {
                    newly_dropped.push(s.clone());
                }
            }
            let Some(stage) = sa.stage() else { return Ok(SecAggEnd::Failed("the session has no open stage".into())) };
            let spoken = sa.spoken(&done);
            let deadline = if stage == SaStage::Masked { train_deadline } else { sa.stage_deadline_ms };
            for s in newly_dropped {
                warn!(round, site = %s, stage = stage.name(), "site went offline; dropped from the round");
                r.drop_for(&s, format!("went offline in the {} stage", stage.name()));
            }
            let waiting: Vec<&String> =
                expected.iter().filter(|s| !r.dropped().contains(*s) && !spoken.contains(*s)).collect();
            let late = now_ms() >= deadline;
            if late {
                for s in &waiting {
                    warn!(round, site = %s, stage = stage.name(), "site missed the stage deadline; dropped from the round");
                }
                let w: Vec<String> = waiting.iter().map(|s| (*s).clone()).collect();
                for s in w {
                    r.drop_for(&s, format!("missed the {} stage's deadline", stage.name()));
                }
            }
            let status = format!(
                "round {round}: secure aggregation, {}: {}/{} sites",
                stage.name(),
                spoken.len(),
                expected.len() + if stage == SaStage::Masked { spoken.len() } else { 0 }
            );
            (waiting.is_empty() || late, status, stage == SaStage::Unmask)
        };
        set_activity(c, status);
        if !close {
            let mut rx = c.changed.subscribe();
            let _ = tokio::time::timeout(TICK, rx.changed()).await;
            continue;
        }
        if unmask {
            return finish_secagg(c, round).await;
        }
        let closed = {
            let mut guard = lock(&c.round);
            let Some(sa) = guard.as_mut().and_then(|r| r.session_mut()) else { return Ok(SecAggEnd::Aborted) };
            let Some(from) = sa.stage() else { return Ok(SecAggEnd::Aborted) };
            match sa.close_stage(now_ms() + stage_secs * 1000) {
                // A sum over fewer than min_sites is never unmasked: the attempt ends
                // here, before any site reveals a share (a sum unmasked and then
                // discarded would let a retry's sum be differenced against it).
                Ok(()) if from == SaStage::Masked && sa.survivor_count() < min_sites && own_checks => {
                    let why = format!(
                        "only {} masked inputs arrived, min_sites is {min_sites}; ended before unmasking",
                        sa.survivor_count()
                    );
                    sa.failed = Some(why.clone());
                    Err((why, None))
                }
                Ok(()) => Ok(from),
                Err(e) => {
                    let why = e.to_string();
                    sa.failed = Some(why.clone());
                    Err((why, e.culprit.and_then(|i| sa.site.get(&i).cloned())))
                }
            }
        };
        c.notify();
        match closed {
            Ok(from) => {
                info!(round, stage = from.name(), "secure-aggregation stage closed");
                if from == SaStage::Consistency
                    && let Err(e) = store_for_restart(c).await
                {
                    let why = format!("could not store the session before the unmask stage: {e:#}");
                    if let Some(sa) = lock(&c.round).as_mut().and_then(|r| r.session_mut()) {
                        sa.failed = Some(why.clone());
                    }
                    return Ok(SecAggEnd::Failed(why));
                }
            }
            Err((why, culprit)) => {
                let why = exclude(c, id, culprit, why)?;
                // Give waiting sites a moment to hear that the attempt failed.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(SecAggEnd::Failed(why));
            }
        }
    }
}

/// Writes the session down for a restart (`crate::resume`) and only then lets sites
/// have the survivor proof: a sum that any site reveals survives this process.
async fn store_for_restart(c: &Coord) -> Result<()> {
    let started = std::time::Instant::now();
    let snapshot = {
        let guard = lock(&c.round);
        let Some(r) = guard.as_ref() else { return Ok(()) };
        crate::resume::take(r)?
    };
    let home = c.home.clone();
    tokio::task::spawn_blocking(move || crate::resume::write(&home, &snapshot))
        .await
        .context("storing the session")??;
    if let Some(sa) = lock(&c.round).as_mut().and_then(|r| r.session_mut()) {
        sa.unmask_durable = true;
    }
    c.notify();
    info!(ms = started.elapsed().as_millis() as u64, "session stored for a restart before the unmask stage");
    Ok(())
}

/// Leaves `culprit` (the site the secure-aggregation core named as the cause of a
/// failed attempt) out of the job's later attempts; returns the failure reason, which
/// says so.
fn exclude(c: &Coord, id: &str, culprit: Option<String>, why: String) -> Result<String> {
    let Some(site) = culprit else { return Ok(why) };
    c.exclude_site(id, &site, &why)?;
    Ok(format!("{why}; site/{site} is excluded from this job's later attempts"))
}

/// Unmasks the sum (outside the round lock) and records the result in the round.
pub(super) async fn finish_secagg(c: &Coord, round: u32) -> Result<SecAggEnd> {
    let server = {
        let mut guard = lock(&c.round);
        let Some(r) = guard.as_mut() else { return Ok(SecAggEnd::Aborted) };
        c.note_unmask_closed(r.job_id(), r.round(), r.attempt());
        let Some(sa) = r.session_mut() else { return Ok(SecAggEnd::Aborted) };
        sa.take_server()
    };
    c.notify();
    let Some(server) = server else { return Ok(SecAggEnd::Failed("session already finished".into())) };
    let started = std::time::Instant::now();
    // The aggregate goes to the blob store as soon as it is unmasked, on this blocking
    // thread and outside the round lock (an O(model) write).
    let blobs = c.blobs.clone();
    let (outcome, aggregate) = tokio::task::spawn_blocking(move || {
        let outcome = crate::secagg::finish(server);
        let aggregate = outcome.as_ref().ok().map(|o| blobs.put_words(&o.sum).map(|d| d.hex()));
        (outcome, aggregate)
    })
    .await?;
    let aggregate = aggregate.transpose().context("storing the unmasked aggregate")?;
    let mut guard = lock(&c.round);
    let Some(r) = guard.as_mut() else { return Ok(SecAggEnd::Aborted) };
    let Some(sa) = r.session_mut() else { return Ok(SecAggEnd::Aborted) };
    let mut outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let culprit = e.culprit.and_then(|i| sa.site.get(&i).cloned());
            let why = e.to_string();
            sa.failed = Some(why.clone());
            let job_id = r.job_id().to_string();
            drop(guard);
            return Ok(SecAggEnd::Failed(exclude(c, &job_id, culprit, why)?));
        }
    };
    let (sum, total_weight, counts) = sa.decode(&mut outcome);
    // Honest sites clip and cap before masking; nothing but the sum can show whether
    // one did not. An aggregate outside what |U3| honest inputs can make is refused: no
    // site can scale the mean or wrap Σw. The round is committed without an update
    // rather than retried, because the sites revealed this round's sum once and will
    // not reveal another over other survivors (a retry would stall the job).
    let refused = sa.check_bounds(sum.values(), total_weight, outcome.survivors.len()).err();
    if let Some(why) = &refused {
        warn!(round, reason = %why, "the unmasked aggregate breaks the job's bounds; the round is committed without an update");
    }
    let survivors = sa.names(&outcome.survivors);
    let dropped = sa.names(&outcome.dropped);
    info!(
        round,
        survivors = survivors.len(),
        dropped = dropped.len(),
        unmask_ms = started.elapsed().as_millis() as u64,
        "secure aggregation finished"
    );
    let event = Event::RoundSecagg {
        job_id: r.job_id().to_string(),
        round: r.round(),
        attempt: r.attempt(),
        survivors: survivors.clone(),
        dropped: dropped.clone(),
    };
    c.metrics.secagg_dropouts.inc_by(dropped.len() as u64);
    r.secure_outcome(sum, total_weight, survivors, dropped, refused);
    r.set_aggregate(aggregate);
    // The cohort's evaluation of the model the round was handed, summed inside the
    // masked inputs: the coordinator never sees a site's counts.
    if let Err(why) = r.secure_evaluation(&counts) {
        warn!(round, reason = %why, "the summed evaluation counts are inconsistent; no evaluation recorded");
    }
    drop(guard);
    c.record(event)?;
    Ok(SecAggEnd::Done)
}
