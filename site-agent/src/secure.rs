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
//! Two switches exist for tests and debugging only: `MAEUM_SITE_TEST_STALL_AT` (hang at
//! a stage, see `stall_hook`) and `MAEUM_SITE_DEBUG_KEEP_PLAIN_INPUT=1` (keep this site's
//! own quantised input in HOME/debug, mode 0600, so a test can
//! compare the coordinator's sum with the plain sum).

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
use maeum_protocols::wire::secagg::{Reply, Request, SessionInfo, StageMessage};
use maeum_protocols::wire::{Digest, Hasher, TrainTask, pb};
use maeum_secagg::quant::Quantiser;
use maeum_secagg::sign::{EcdsaSigner, SessionVerifier};
use maeum_secagg::{self as secagg, Session};

use crate::daemon::{Agent, Client, describe, local_update};

/// Words quantised and masked at a time.
const CHUNK_WORDS: usize = 1 << 18;

/// Test hook: `MAEUM_SITE_TEST_STALL_AT=<stage>[@<round>]` makes the agent log and then
/// hang at that stage (advertise, share, masked-input, consistency, unmask), in every
/// round or only in the given one, so an end-to-end test can SIGKILL it exactly there.
/// Never set in production.
async fn stall_hook(stage: &str, round: u32) {
    let Ok(spec) = std::env::var("MAEUM_SITE_TEST_STALL_AT") else { return };
    let (at, only) = match spec.split_once('@') {
        Some((s, r)) => (s.to_string(), r.parse::<u32>().ok()),
        None => (spec.clone(), None),
    };
    if at == stage && only.is_none_or(|r| r == round) {
        warn!(stage, round, "test hook: stalling at this secure-aggregation stage");
        std::future::pending::<()>().await;
    }
}

fn os_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    Ok(seed)
}

/// Checks the proposed session and builds it: refuses a session that leaves this site
/// out, names a participant whose certificate is not from the consortium CA, or uses
/// parameters other than those the job file implies for this many sites.
pub(crate) fn check_session(
    ca_pem: &str,
    site_id: &str,
    job: &JobSpec,
    t: &TrainTask,
    info: &SessionInfo,
    num_params: u64,
) -> Result<(Session, u16)> {
    let me = info
        .members
        .iter()
        .find(|m| m.site_id == site_id)
        .map(|m| m.index)
        .with_context(|| format!("the proposed session does not include this site ({site_id})"))?;
    let expected = job
        .secure_aggregation
        .session_params(info.members.len(), num_params)
        .map_err(|why| anyhow::anyhow!("the proposed session cannot run: {why}"))?;
    if info.params != expected {
        bail!(
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
        );
    }
    let session = info.to_session(&t.job_id, t.round, t.attempt, |m| -> Result<Vec<u8>> {
        let peer = PeerId::site(&m.site_id)?;
        Ok(identity::verify_peer_cert(ca_pem, &m.certificate_der, &peer)?)
    })?;
    session.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((session, me))
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
    let mut failures = 0u32;
    loop {
        match client.sec_agg(request.clone()).await {
            Ok(r) => match Reply::try_from(r.into_inner())? {
                Reply::Pending { retry_after_ms } => {
                    tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms).max(50))).await;
                }
                reply => return Ok(reply),
            },
            Err(e) if matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) && failures < 20 => {
                failures += 1;
                warn!(stage = message.name(), error = %describe(&e), "secure-aggregation call failed; resending");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("secure aggregation, {} stage: {}", message.name(), describe(&e)),
        }
    }
}

fn unexpected(stage: &str, reply: &Reply) -> anyhow::Error {
    let got = match reply {
        Reply::Pending { .. } => "pending",
        Reply::Roster(_) => "a key roster",
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
    let num_params = spec.layout().numel() as u64;
    let (session, me) = check_session(&agent.home.read("ca.pem")?, &agent.site_id, &job, &t, &info, num_params)?;
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
    agent.set(|s| s.stage = "secagg: share keys".into());
    stall_hook("share", t.round).await;
    let shares = sa.share_keys(&roster, &verifier).map_err(fail)?;
    let shares_for = match exchange(client, &t, StageMessage::ShareKeys(shares)).await? {
        Reply::Shares(s) => s,
        other => return Err(unexpected("share keys", &other)),
    };
    let mut masker = sa.masked_input(&shares_for).map_err(fail)?;

    let (delta, examples) = local_update(agent, client, &t, &job).await?;
    agent.set(|s| s.stage = "secagg: masked input".into());
    stall_hook("masked-input", t.round).await;
    let quantiser = Quantiser::new(n, params.clip, params.max_weight).map_err(fail)?;
    let weight = quantiser.weight(examples);
    let name = format!("{}-r{}-a{}", t.job_id, t.round, t.attempt);
    let masked_path = agent.home.path(&format!("work/{name}.masked"));
    let keep_plain = std::env::var("MAEUM_SITE_DEBUG_KEEP_PLAIN_INPUT").is_ok_and(|v| v == "1");
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
            let chunks = delta.chunks(CHUNK_WORDS).map(Some).chain(std::iter::once(None));
            for chunk in chunks {
                let words = match chunk {
                    Some(d) => {
                        clipped += quantiser.encode(d, weight, &mut uniform, &mut words[..d.len()]);
                        &mut words[..d.len()]
                    }
                    // The last word is the weight, masked like the rest.
                    None => {
                        words[0] = weight;
                        &mut words[..1]
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
        .await??
    };
    if clipped > 0 {
        warn!(job = %t.job_id, round = t.round, clipped, clip = params.clip, "update coordinates clipped before masking");
    }
    let header = t.upload_header(num_params, 0, sha256, true);
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
    let signature = sa.consistency(&survivors, &signer).map_err(fail)?;
    let proof = match exchange(client, &t, StageMessage::SurvivorSignature(signature)).await? {
        Reply::Proof(p) => p,
        other => return Err(unexpected("consistency check", &other)),
    };
    agent.set(|s| s.stage = "secagg: unmask".into());
    stall_hook("unmask", t.round).await;
    let reveal = sa.unmask(&proof, &verifier).map_err(fail)?;
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
