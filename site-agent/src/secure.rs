//! The site's side of secure aggregation for one round attempt.
//!
//! Order: check the session the coordinator proposes (every participant's certificate
//! against the consortium CA, the parameters against the job file) → advertise keys →
//! share keys → train → quantise and mask `[w·Δ, w]` chunk by chunk → upload the
//! masked input (4 bytes per parameter) → sign the survivor set → reveal shares.
//!
//! The session's secrets live only in memory (`secagg::Client` wipes them on drop): a
//! site that restarts mid-round does not rejoin that attempt. When it advertises new
//! keys the coordinator drops it from the attempt at once (it answers
//! FailedPrecondition "… restarted and lost its keys …"), and the round goes on
//! without it or is retried with a new session if too few remain. The masked input is
//! written to HOME/work before upload only so that an interrupted stream (not process)
//! resumes.
//!
//! Three switches exist for tests only, compiled in only with the `fault-injection`
//! cargo feature (off in release builds and the images): `MAEUM_SITE_TEST_STALL_AT`
//! (hang at a stage, see `stall_hook`), `MAEUM_SITE_DEBUG_KEEP_PLAIN_INPUT=1` (keep
//! this site's own quantised input in HOME/debug, mode 0600, so a test can compare the
//! coordinator's sum with the plain sum) and `MAEUM_SITE_ATTACK` (play a misbehaving
//! site: `inflate-weight` claims a weight far above `max_weight`, `scale-update` skips
//! the L2 bound and scales its update, `garbage-shares` seals shares that do not
//! authenticate).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use ring::rand::SecureRandom;
use tonic::Code;
use tracing::{info, warn};

use maeum_pki::identity::{self, PeerId};
use maeum_protocols::job::JobSpec;
use maeum_protocols::wire::secagg::{Reply, Request, SessionInfo, StageMessage, round_binding};
use maeum_protocols::wire::{Digest, Hasher, TrainTask, pb};
use maeum_secagg::quant::Quantiser;
use maeum_secagg::sign::{EcdsaSigner, SessionVerifier};
use maeum_secagg::{self as secagg, Session};

use crate::daemon::{
    Agent, Client, EvalOf, RoundModel, describe, distributed_words, evaluate_and_keep, round_model, train_from,
};
use crate::policy::{Policy, Refusal, SessionView};

/// Words quantised and masked at a time.
const CHUNK_WORDS: usize = 1 << 18;

/// Test hook: `MAEUM_SITE_TEST_STALL_AT=<stage>[@<round>]` makes the agent log and then
/// hang at that stage (advertise, reveal, share, masked-input, consistency, unmask), in every
/// round or only in the given one, so an end-to-end test can SIGKILL it exactly there.
/// Never set in production.
async fn stall_hook(stage: &str, round: u32) {
    let Some(spec) = test_env("MAEUM_SITE_TEST_STALL_AT") else { return };
    let (at, only) = match spec.split_once('@') {
        Some((s, r)) => (s.to_string(), r.parse::<u32>().ok()),
        None => (spec.clone(), None),
    };
    if at == stage && only.is_none_or(|r| r == round) {
        warn!(stage, round, "test hook: stalling at this secure-aggregation stage");
        std::future::pending::<()>().await;
    }
}

/// Test hook (`fault-injection` only): `MAEUM_SITE_TEST_LATE_UNMASK=MS@ROUND` waits MS
/// milliseconds before sending this site's unmask shares in ROUND, so that the
/// coordinator closes the stage with the others' shares first.
async fn late_hook(round: u32) {
    let Some(spec) = test_env("MAEUM_SITE_TEST_LATE_UNMASK") else { return };
    let Some((ms, r)) = spec.split_once('@') else { return };
    if r.parse::<u32>().ok() == Some(round)
        && let Ok(ms) = ms.parse::<u64>()
    {
        warn!(round, ms, "test hook: sending the unmask shares late");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// A test-only environment variable, or `None` without the `fault-injection` feature.
pub(crate) fn test_env(name: &str) -> Option<String> {
    if cfg!(feature = "fault-injection") { std::env::var(name).ok() } else { None }
}

fn os_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    Ok(seed)
}

/// Why a proposed session was refused: a rule of the site's policy, or the session
/// being other than the job implies (`session`).
fn session_refusal(why: String) -> anyhow::Error {
    Refusal { rule: "session", why }.into()
}

/// Checks the proposed session and builds it: refuses a session that leaves this site
/// out, names a participant whose certificate is not from the consortium CA, uses
/// parameters other than those the job file implies for this many sites, or breaks
/// this site's `[policy]` (cohort floor, threshold above 2/3 of the group, pinned
/// members). The session is bound to the job file this site accepted and the base
/// model the task names ([`round_binding`]). A policy refusal is a [`Refusal`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_session(
    ca_pem: &str,
    site_id: &str,
    policy: &Policy,
    job: &JobSpec,
    spec_sha256: &Digest,
    t: &TrainTask,
    info: &SessionInfo,
    num_params: u64,
) -> Result<(Session, u16)> {
    let me = info
        .members
        .iter()
        .find(|m| m.site_id == site_id)
        .map(|m| m.index)
        .ok_or_else(|| session_refusal(format!("the proposed session does not include this site ({site_id})")))?;
    let expected = job
        .secure_aggregation
        .session_params(info.members.len(), num_params, job.evaluation_words(), job.min_sites)
        .map_err(|why| session_refusal(format!("the proposed session cannot run: {why}")))?;
    if info.params != expected {
        return Err(session_refusal(format!(
            "the coordinator proposed secure-aggregation parameters (threshold {}, degree {}, {} words, clip {}, \
             max weight {}) that differ from the job's (threshold {}, degree {}, {} words, clip {}, max weight {})",
            info.params.threshold,
            info.params.degree,
            info.params.vector_len,
            info.params.clip,
            info.params.max_weight,
            expected.threshold,
            expected.degree,
            expected.vector_len,
            expected.clip,
            expected.max_weight
        )));
    }
    if let Some(m) = job.privacy_plan()?.and_then(|p| p.distributed()) {
        m.check_range(info.members.len()).map_err(|why| {
            anyhow::Error::from(Refusal {
                rule: "privacy.range",
                why: format!("the proposed session cannot run: {why}"),
            })
        })?;
    }
    policy.check_session(&SessionView {
        me: site_id,
        members: info.members.iter().map(|m| m.site_id.as_str()).collect(),
        threshold: info.params.threshold,
        degree: info.params.degree,
        min_sites: job.min_sites,
    })?;
    let binding = round_binding(spec_sha256, &t.model.digest);
    let session = info.to_session(&t.job_id, t.round, t.attempt, binding, |m| -> Result<Vec<u8>> {
        let peer = PeerId::site(&m.site_id)?;
        Ok(identity::verify_peer_cert(ca_pem, &m.certificate_der, &peer)?)
    })?;
    session.validate().map_err(|e| session_refusal(e.to_string()))?;
    Ok((session, me))
}

/// Checks, before anything is revealed, that the round's base model is the one the
/// audit log shows this job produced for it: the job's initial model (`job_started`) in
/// round 1, round r−1's result (`round_committed`) in round r, and the last round's for
/// the final evaluation, with an inclusion proof against a checkpoint this site
/// witnessed (witnessing a newer one first when needed). Every site thus trains and
/// evaluates a model anyone can audit, the same for all. A model the log does not show
/// is a [`Refusal`] (`base_model`); an unreachable coordinator is an ordinary error.
async fn check_base_logged(agent: &Agent, client: &mut Client, t: &TrainTask) -> Result<()> {
    use maeum_tlog::Event;
    let digest = t.model.digest.hex();
    let is_base = |e: &Event| match e {
        Event::JobStarted { job_id, initial_model, .. } => {
            *job_id == t.job_id && *initial_model == digest && t.round == 1 && !t.evaluate_only
        }
        Event::RoundCommitted { job_id, round, model, .. } => {
            let wanted = if t.evaluate_only { t.round } else { t.round.saturating_sub(1) };
            *job_id == t.job_id && *model == digest && *round == wanted
        }
        _ => false,
    };
    let after = agent.base_proven_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&t.job_id).copied();
    let wanted = crate::witness::Wanted { models: vec![digest.clone()], ..Default::default() };
    let base = |p: &crate::daemon::Proven| p.entries.iter().find(|p| is_base(&p.entry.event)).map(|p| p.seq);
    let proven =
        crate::daemon::prove_witnessed(agent, client, wanted, after.unwrap_or(0), |p| base(p).is_some()).await?;
    if let Some(seq) = proven.as_ref().and_then(base) {
        agent.base_proven_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(t.job_id.clone(), seq);
        return Ok(());
    }
    Err(Refusal {
        rule: "base_model",
        why: format!(
            "no {} entry of job {} names model {digest} in the audit log this site witnessed",
            if t.round == 1 && !t.evaluate_only { "job_started" } else { "round_committed" },
            t.job_id
        ),
    }
    .into())
}

/// HOME/audit/reveals.jsonl: one line per unmask answer this site gave.
const REVEALS: &str = "audit/reveals.jsonl";

/// What this site revealed shares for: a round's sum over these survivors.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Reveal {
    job_id: String,
    round: u32,
    attempt: u32,
    base_model: String,
    survivors: Vec<String>,
    /// The job's final evaluation (a session of its own under the last round's number).
    #[serde(default)]
    evaluation: bool,
    time_ms: i64,
}

/// Reveal once per round: the unmask answer of a round goes out for one attempt only —
/// the first this site revealed — and only over the survivors and base model it
/// revealed then (a resend of that answer). Another attempt's sum would differ from the
/// first (training seeds include the attempt), and over other survivors the difference
/// would single out the sites in it. The coordinator stores a revealed session before
/// any site reveals (`coordinator/src/resume.rs`), so it never needs a second one. The
/// line is written (fsynced) before the shares leave the site.
pub(crate) fn reveal_once(
    home: &crate::enrol::Home,
    t: &TrainTask,
    mut survivors: Vec<String>,
) -> std::result::Result<(), Refusal> {
    survivors.sort_unstable();
    let path = home.path(REVEALS);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Refusal { rule: "reveal_once", why: format!("cannot read {}: {e}", path.display()) }),
    };
    let base = t.model.digest.hex();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(r) = serde_json::from_str::<Reveal>(line) else {
            return Err(Refusal { rule: "reveal_once", why: format!("{} holds an unreadable line", path.display()) });
        };
        if r.job_id != t.job_id || r.round != t.round || r.evaluation != t.evaluate_only {
            continue;
        }
        if r.attempt == t.attempt && r.base_model == base && r.survivors == survivors {
            return Ok(());
        }
        let what = if r.attempt != t.attempt {
            format!("attempt {} asks for another sum of that round", t.attempt)
        } else if r.base_model != base {
            "the same attempt now names another base model".to_string()
        } else {
            format!("the same attempt now names {} other survivors", survivors.len())
        };
        return Err(Refusal {
            rule: "reveal_once",
            why: format!(
                "this site already revealed round {} (attempt {}, a sum over {} sites); {what}, and the difference of \
                 two sums would single out sites",
                t.round,
                r.attempt,
                r.survivors.len(),
            ),
        });
    }
    let line = Reveal {
        job_id: t.job_id.clone(),
        round: t.round,
        attempt: t.attempt,
        base_model: base,
        survivors,
        evaluation: t.evaluate_only,
        time_ms: crate::now_ms(),
    };
    // INVARIANT: a Reveal is strings and integers, which always serialise.
    let line = serde_json::to_string(&line).expect("a reveal serialises");
    crate::witness::append_line(home, REVEALS, &line)
        .map_err(|e| Refusal { rule: "reveal_once", why: format!("cannot record the reveal: {e:#}") })
}

/// Sends one stage message, resending it while the coordinator answers Pending or the
/// connection drops; returns the stage's answer.
async fn exchange(client: &mut Client, t: &TrainTask, message: StageMessage) -> Result<Reply> {
    let request = pb::SecAggRequest::from(&Request {
        job_id: t.job_id.clone(),
        round: t.round,
        attempt: t.attempt,
        message: message.clone(),
    });
    // A coordinator restarted mid-stage comes back with the session (it stores one
    // whose shares sites may have revealed): keep resending for a while.
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match client.sec_agg(request.clone()).await {
            Ok(r) => match Reply::try_from(r.into_inner())? {
                Reply::Pending { retry_after_ms } => {
                    tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms).max(50))).await;
                }
                reply => return Ok(reply),
            },
            Err(e)
                if matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
                    && tokio::time::Instant::now() < until =>
            {
                warn!(stage = message.name(), error = %describe(&e), "secure-aggregation call failed; resending");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                let said = crate::daemon::CoordinatorSaid(format!(
                    "secure aggregation, {} stage: {}",
                    message.name(),
                    describe(&e)
                ));
                return Err(said.into());
            }
        }
    }
}

fn unexpected(stage: &str, reply: &Reply) -> anyhow::Error {
    let got = match reply {
        Reply::Pending { .. } => "pending",
        Reply::Roster(_) => "a key roster",
        Reply::Reveals(_) => "graph reveals",
        Reply::Shares(_) => "shares",
        Reply::Survivors(_) => "a survivor set",
        Reply::Proof(_) => "a survivor proof",
        Reply::Done => "done",
    };
    anyhow::anyhow!("secure aggregation, {stage} stage: the coordinator answered with {got}")
}

/// Runs one round attempt with secure aggregation.
pub(crate) async fn train(
    agent: &Agent,
    client: &mut Client,
    t: TrainTask,
    job: JobSpec,
    info: SessionInfo,
) -> Result<()> {
    let spec = job.model_spec()?;
    // A final evaluation's inputs hold no parameters: the weight word and the counts.
    let num_params = if t.evaluate_only { 0 } else { spec.layout().numel() as u64 };
    let spec_sha256 = match agent.home.read(&format!("jobs/{}.toml", t.job_id)) {
        Ok(toml) => Digest::of(toml.as_bytes()),
        Err(_) => {
            let r = Refusal {
                rule: "spec_hash",
                why: format!("this site holds no job file for {} (accepted by an older agent?)", t.job_id),
            };
            agent.refuse(client, &t.job_id, t.round, t.attempt, &r).await;
            return Err(r.into());
        }
    };
    let members: Vec<(String, Vec<u8>)> =
        info.members.iter().map(|m| (m.site_id.clone(), m.certificate_der.clone())).collect();
    if let Err(e) = crate::roster::check(agent, client, &members).await {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            agent.refuse(client, &t.job_id, t.round, t.attempt, r).await;
        }
        return Err(e);
    }
    if let Err(e) = check_base_logged(agent, client, &t).await {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            agent.refuse(client, &t.job_id, t.round, t.attempt, r).await;
        }
        return Err(e);
    }
    let checked = check_session(
        &agent.home.read("ca.pem")?,
        &agent.site_id,
        &agent.policy,
        &job,
        &spec_sha256,
        &t,
        &info,
        num_params,
    );
    let (session, me) = match checked {
        Ok(s) => s,
        Err(e) => {
            if let Some(r) = e.downcast_ref::<Refusal>() {
                agent.refuse(client, &t.job_id, t.round, t.attempt, r).await;
            }
            return Err(e);
        }
    };
    let n = session.n();
    let params = session.params.clone();
    let session_id = session.id();
    let signer = EcdsaSigner::from_pkcs8_pem(&agent.home.read("site.key")?, ring::rand::SystemRandom::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let verifier = SessionVerifier::new(&session);
    let mut sa = secagg::Client::new(session, me, os_seed()?).map_err(|e| anyhow::anyhow!("{e}"))?;
    let fail = |e: secagg::SecAggError| anyhow::anyhow!("secure aggregation refused the round: {e}");
    info!(job = %t.job_id, round = t.round, attempt = t.attempt, party = me, sites = n, threshold = params.threshold, "secure-aggregation session checked");

    agent.set(|s| s.stage = "secagg: advertise keys".into());
    stall_hook("advertise", t.round).await;
    let adv = sa.advertise(&signer).map_err(fail)?;
    let roster = match exchange(client, &t, StageMessage::Advertise(adv)).await? {
        Reply::Roster(r) => r,
        other => return Err(unexpected("advertise", &other)),
    };
    // SecAgg+: this site's nonce joins every other roster party's in the graph seed
    // (SA-13); the coordinator cannot choose the neighbourhoods.
    let reveals = if sa.needs_graph_reveal() {
        agent.set(|s| s.stage = "secagg: reveal graph nonce".into());
        stall_hook("reveal", t.round).await;
        let reveal = sa.reveal_graph(&roster, &verifier).map_err(fail)?;
        match exchange(client, &t, StageMessage::GraphReveal(reveal)).await? {
            Reply::Reveals(r) => Some(r),
            other => return Err(unexpected("reveal graph nonce", &other)),
        }
    } else {
        None
    };
    agent.set(|s| s.stage = "secagg: share keys".into());
    stall_hook("share", t.round).await;
    let mut shares = sa.share_keys(&roster, reveals.as_ref(), &verifier).map_err(fail)?;
    // Fault injection: a site that seals garbage for every other holder (SA-06).
    if test_env("MAEUM_SITE_ATTACK").is_some_and(|v| v == "garbage-shares") {
        warn!("FAULT INJECTION: sending shares that do not authenticate");
        shares.shares.iter_mut().filter(|s| s.to != me).for_each(|s| s.ciphertext[0] ^= 0xff);
    }
    let shares_for = match exchange(client, &t, StageMessage::ShareKeys(shares)).await? {
        Reply::Shares(s) => s,
        other => return Err(unexpected("share keys", &other)),
    };
    let mut masker = match sa.masked_input(&shares_for) {
        Ok(m) => m,
        Err(e) => {
            // A share sealed for this site did not authenticate: name its sender, so
            // that a site sending garbage is left out of later attempts instead of
            // stalling the job (the coordinator excludes a party two sites accuse).
            if let (secagg::Check::ShareAuth, Some(party)) = (e.check, e.culprit) {
                let who = info.members.iter().find(|m| m.index == party).map_or("?", |m| m.site_id.as_str());
                let r = Refusal { rule: "share_auth", why: format!("{e} (site/{who}); this site leaves the attempt") };
                agent.refuse_naming(client, &t.job_id, t.round, t.attempt, &r, u32::from(party)).await;
            }
            return Err(fail(e));
        }
    };

    let model = round_model(agent, client, &t, &job).await?;
    let counts = evaluation_counts(agent, &t, &model).await?;
    if counts.len() as u64 != job.evaluation_words() {
        bail!("{} evaluation counts, the job's layout has {}", counts.len(), job.evaluation_words());
    }
    // The distributed DP mode sends integer words (clipped-gradient sum and noise share)
    // instead of a quantised update.
    let distributed = job.privacy_plan()?.filter(|p| p.distributed().is_some());
    let (mut delta, examples, ddp_words) = match (&distributed, t.evaluate_only) {
        (_, true) => (Vec::new(), 1, None),
        (Some(plan), false) => {
            let words = distributed_words(agent, client, &t, &job, plan, model).await?;
            (Vec::new(), 1, Some(words))
        }
        (None, false) => {
            let (delta, examples) = train_from(agent, client, &t, &job, model).await?;
            (delta, examples, None)
        }
    };
    // Fault injection: a poisoning site scales its update up and skips the norm bound.
    let scale_attack = test_env("MAEUM_SITE_ATTACK").is_some_and(|v| v == "scale-update");
    if scale_attack {
        warn!("FAULT INJECTION: scaling the update by 1000 and skipping the L2 bound");
        delta.iter_mut().for_each(|d| *d *= 1000.0);
    } else if let Some(norm) = clip_l2(&mut delta, job.secure_aggregation.clip_norm) {
        info!(job = %t.job_id, round = t.round, norm, bound = job.secure_aggregation.clip_norm, "update scaled down to the job's L2 bound");
    }
    agent.set(|s| s.stage = "secagg: masked input".into());
    stall_hook("masked-input", t.round).await;
    let quantiser = Quantiser::new(n, params.clip, params.max_weight).map_err(fail)?;
    let weight = quantiser.weight(examples);
    let name = format!("{}-r{}-a{}", t.job_id, t.round, t.attempt);
    let masked_path = agent.home.path(&format!("work/{name}.masked"));
    let keep_plain = test_env("MAEUM_SITE_DEBUG_KEEP_PLAIN_INPUT").is_some_and(|v| v == "1");
    // Fault injection: a poisoning site claims a weight no honest site can have.
    let weight = if test_env("MAEUM_SITE_ATTACK").is_some_and(|v| v == "inflate-weight") {
        warn!("FAULT INJECTION: claiming an inflated weight");
        u32::MAX / 2
    } else {
        weight
    };
    let (sha256, clipped) = {
        let path = masked_path.clone();
        // Debug/test switch: keep this site's own quantised input (on its own disk) so
        // a test can compare the coordinator's unmasked sum with the plain sum.
        let plain_path = agent.home.path(&format!("debug/{name}.plain-input"));
        if keep_plain {
            std::fs::create_dir_all(agent.home.path("debug"))?;
        }
        let mut rng = ChaCha20Rng::from_seed(os_seed()?);
        tokio::task::spawn_blocking(move || -> Result<(Digest, usize)> {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
            );
            let mut plain = if keep_plain {
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&plain_path)?;
                    Some(std::io::BufWriter::new(f))
                }
            } else {
                None
            };
            let mut hasher = Hasher::default();
            let mut words = vec![0u32; CHUNK_WORDS];
            let mut bytes = Vec::with_capacity(CHUNK_WORDS * 4);
            let mut clipped = 0;
            let mut uniform = || rng.next_u32();
            // [w·Δ (quantised) or the distributed mode's words, w, the evaluation counts],
            // all masked alike.
            let words_in = ddp_words.unwrap_or_default();
            let chunks = delta
                .chunks(CHUNK_WORDS)
                .map(Segment::Delta)
                .chain(words_in.chunks(CHUNK_WORDS).map(Segment::Words))
                .chain(std::iter::once(Segment::Weight))
                .chain(counts.chunks(CHUNK_WORDS).map(Segment::Counts));
            for chunk in chunks {
                let words = match chunk {
                    Segment::Delta(d) => {
                        clipped += quantiser.encode(d, weight, &mut uniform, &mut words[..d.len()]);
                        &mut words[..d.len()]
                    }
                    Segment::Words(w) => {
                        words[..w.len()].copy_from_slice(w);
                        &mut words[..w.len()]
                    }
                    Segment::Weight => {
                        words[0] = weight;
                        &mut words[..1]
                    }
                    Segment::Counts(c) => {
                        words[..c.len()].copy_from_slice(c);
                        &mut words[..c.len()]
                    }
                };
                if let Some(p) = plain.as_mut() {
                    for w in words.iter() {
                        p.write_all(&w.to_le_bytes())?;
                    }
                }
                masker.mask(words).map_err(fail)?;
                bytes.clear();
                for w in words.iter() {
                    bytes.extend_from_slice(&w.to_le_bytes());
                }
                hasher.update(&bytes);
                out.write_all(&bytes)?;
            }
            masker.finish().map_err(fail)?;
            out.flush()?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            if let Some(p) = plain {
                p.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
            Ok((hasher.finish(), clipped))
        })
        .await?
        // A full disk, say: the log names the file this site could not write.
        .with_context(|| format!("writing the masked input {}", masked_path.display()))?
    };
    if clipped > 0 {
        warn!(job = %t.job_id, round = t.round, clipped, clip = params.clip, "update coordinates clipped before masking");
    }
    let header = t.upload_header(params.vector_len - 1, 0, sha256, true);
    agent.set(|s| s.stage = "uploading".into());
    let result = agent.upload(client, &header, &masked_path).await;
    let _ = std::fs::remove_file(&masked_path);
    result.context("uploading the masked input")?;
    agent.note(crate::witness::Record::Contribution {
        job_id: t.job_id.clone(),
        round: t.round,
        attempt: t.attempt,
        secure: true,
        time_ms: crate::now_ms(),
    });
    info!(job = %t.job_id, round = t.round, "masked input delivered");

    agent.set(|s| s.stage = "secagg: consistency check".into());
    stall_hook("consistency", t.round).await;
    let survivors = match exchange(client, &t, StageMessage::AwaitSurvivors { session_id, index: me }).await? {
        Reply::Survivors(s) => s,
        other => return Err(unexpected("await survivors", &other)),
    };
    if let Err(r) = agent.policy.check_survivors(survivors.survivors.len(), job.min_sites) {
        agent.refuse(client, &t.job_id, t.round, t.attempt, &r).await;
        return Err(r.into());
    }
    let survivor_ids: Vec<String> = survivors
        .survivors
        .iter()
        .filter_map(|i| info.members.iter().find(|m| m.index == *i))
        .map(|m| m.site_id.clone())
        .collect();
    let signature = sa.consistency(&survivors, &signer).map_err(fail)?;
    let proof = match exchange(client, &t, StageMessage::SurvivorSignature(signature)).await? {
        Reply::Proof(p) => p,
        other => return Err(unexpected("consistency check", &other)),
    };
    agent.set(|s| s.stage = "secagg: unmask".into());
    stall_hook("unmask", t.round).await;
    late_hook(t.round).await;
    let reveal = sa.unmask(&proof, &verifier).map_err(fail)?;
    if let Err(r) = reveal_once(&agent.home, &t, survivor_ids) {
        agent.refuse(client, &t.job_id, t.round, t.attempt, &r).await;
        return Err(r.into());
    }
    match exchange(client, &t, StageMessage::Unmask(reveal)).await? {
        Reply::Done => {}
        other => return Err(unexpected("unmask", &other)),
    }
    drop(sa);
    agent.set(|s| {
        s.last_model = t.model.digest.hex();
        s.stage = "idle".into();
    });
    info!(job = %t.job_id, round = t.round, survivors = survivors.survivors.len(), "secure aggregation done for this round");
    Ok(())
}

/// Scales `delta` down to L2 norm `bound` if it is longer (`bound` 0: no bound);
/// returns the norm it had when it was scaled.
fn clip_l2(delta: &mut [f32], bound: f32) -> Option<f64> {
    if bound <= 0.0 {
        return None;
    }
    // Non-finite coordinates are left to the quantiser (NaN → 0, ±∞ → ±clip).
    let norm = delta.iter().filter(|d| d.is_finite()).map(|d| f64::from(*d) * f64::from(*d)).sum::<f64>().sqrt();
    if norm <= f64::from(bound) {
        return None;
    }
    let scale = f64::from(bound) / norm;
    delta.iter_mut().for_each(|d| *d = (f64::from(*d) * scale) as f32);
    Some(norm)
}

/// A piece of a masked input, in order.
enum Segment<'a> {
    Delta(&'a [f32]),
    /// The distributed DP mode's words, already integers.
    Words(&'a [u32]),
    Weight,
    Counts(&'a [u32]),
}

/// The most one evaluation count may be: 255 sites' counts then sum below 2^32.
const MAX_COUNT: u64 = 1 << 24;

/// This site's evaluation of the round's model, as the words appended to its masked
/// input (`JobSpec::evaluation_words`): the confusion rows, then (for a job with a
/// crisis class) the crisis histogram's crisis and other bins. The coordinator sees
/// only the cohort's sums; the site keeps its own counts in HOME/evaluations.jsonl.
async fn evaluation_counts(agent: &Agent, t: &TrainTask, m: &RoundModel) -> Result<Vec<u32>> {
    let of = EvalOf { job_id: &t.job_id, round: t.round, attempt: t.attempt, model: &t.model };
    let (confusion, histogram) = evaluate_and_keep(agent, &of, &m.spec, m.params.clone(), m.data.clone()).await?;
    let histogram = histogram.map(|h| h.crisis.into_iter().chain(h.other)).into_iter().flatten();
    confusion
        .counts
        .into_iter()
        .flatten()
        .chain(histogram)
        .map(|c| {
            if c >= MAX_COUNT {
                bail!("an evaluation count of {c} is too large to sum securely (at most 2^24 per site)");
            }
            Ok(c as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(round: u32, attempt: u32, model: u8, evaluate_only: bool) -> TrainTask {
        let digest = Digest([model; 32]);
        TrainTask {
            job_id: "job-1".into(),
            round,
            attempt,
            model: maeum_protocols::wire::ModelRef { digest, size: 1, layout_digest: digest },
            deadline_ms: 0,
            evaluate_first: false,
            secagg: None,
            evaluate_only,
        }
    }

    #[test]
    fn a_round_is_revealed_for_one_attempt_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = crate::enrol::Home::new(dir.path());
        let abc = || vec!["c".to_string(), "a".into(), "b".into()];
        reveal_once(&home, &task(1, 4, 1, false), abc()).expect("first reveal");
        // A resend of the same answer (the coordinator restarted and resumed).
        reveal_once(&home, &task(1, 4, 1, false), vec!["a".into(), "b".into(), "c".into()]).expect("resend");
        // Another attempt of the round, even over the same survivors and model.
        let e = reveal_once(&home, &task(1, 5, 1, false), abc()).expect_err("another attempt");
        assert_eq!(e.rule, "reveal_once");
        assert!(e.why.contains("attempt 5 asks for another sum"), "{}", e.why);
        // The same attempt over other survivors or another base model.
        let e = reveal_once(&home, &task(1, 4, 1, false), vec!["a".into(), "b".into()]).expect_err("survivors");
        assert!(e.why.contains("other survivors"), "{}", e.why);
        let e = reveal_once(&home, &task(1, 4, 2, false), abc()).expect_err("model");
        assert!(e.why.contains("another base model"), "{}", e.why);
        // Other rounds, and the final evaluation of round 1, are separate.
        reveal_once(&home, &task(2, 6, 1, false), abc()).expect("round 2");
        reveal_once(&home, &task(1, 7, 1, true), abc()).expect("the final evaluation");
        let lines = std::fs::read_to_string(home.path(REVEALS)).expect("journal");
        assert_eq!(lines.lines().count(), 3, "{lines}");
    }

    #[test]
    fn an_update_longer_than_the_bound_is_scaled_to_it() {
        let mut d = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut d, 0.0), None, "0 is no bound");
        assert_eq!(clip_l2(&mut d, 10.0), None, "short enough");
        assert_eq!(d, [3.0, 4.0]);
        assert_eq!(clip_l2(&mut d, 1.0), Some(5.0));
        let norm = d.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "{d:?}");
        assert!((d[0] / d[1] - 0.75).abs() < 1e-6, "the direction is kept: {d:?}");
    }
}
