//! Job offers: what the site decides on an offer (policy, data, consent) and the proof
//! that the offered job file is the one the audit log shows submitted.

use super::*;

/// Answers a job offer. The site parses the job file the lead submitted (not the
/// coordinator's re-encoding), checks that it hashes to the digest the offer names
/// (the one the audit log's `job_submitted` entry carries), and checks it against its
/// local data and its `[policy]`. Its record count never leaves the site.
pub(super) async fn decide(
    agent: &Agent,
    client: &mut Client,
    job_id: String,
    spec_toml: String,
    spec_sha256: Digest,
) -> Result<()> {
    let mut verdict = offered_job(&agent.policy, &job_id, &spec_toml, spec_sha256)
        .and_then(|spec| agent.data.refusal(&spec).map_or(Ok(spec), Err))
        .and_then(|spec| {
            // A job on a pretrained encoder this site does not hold (with the job's
            // digests) cannot be served: say so now, not at round 1.
            let encoder = spec.model_spec().ok().and_then(|m| m.encoder().cloned());
            match encoder.and_then(|e| agent.encoder_missing(&e)) {
                Some(reason) => Err(Declined::Other(reason)),
                None => Ok(spec),
            }
        });
    // Only a job file the audit log shows submitted is taken (or shown to the admin).
    if verdict.is_ok()
        && let Err(e) = job_logged(agent, client, &job_id, &spec_sha256).await
    {
        verdict = Err(Declined::Rule(e.downcast::<crate::policy::Refusal>()?));
    }
    // Without auto_accept, an offer the policy allows waits for the admin's answer.
    if verdict.is_ok() && !agent.policy.auto_accept {
        match crate::consent::consent_for(&agent.home, &job_id, &spec_toml, &spec_sha256.hex())? {
            Some(c) if c.accept => info!(job = %job_id, by = %c.by, "the site's admin accepted the job"),
            Some(c) => verdict = Err(Declined::Other(format!("refused by this site's admin ({}): {}", c.by, c.reason))),
            None => {
                let waiting = format!("waiting for the admin: job {job_id} (`maeum-site jobs show {job_id}`)");
                let first = agent.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner).stage != waiting;
                if first {
                    info!(job = %job_id, "job offered; waiting for the admin's consent (`maeum-site jobs accept|refuse`)");
                }
                agent.set(|s| s.stage = waiting.clone());
                tokio::time::sleep(Duration::from_secs(2)).await;
                return Ok(());
            }
        }
    }
    // A differentially private job's whole ε is set aside, durably, before the site
    // says yes (refused when it would exceed the site's total budget).
    if let Ok(spec) = &verdict
        && let Ok(Some(plan)) = spec.privacy_plan()
        && let Err(r) = crate::ledger::reserve(&agent.home, &job_id, &plan, agent.policy.privacy.budget)
    {
        verdict = Err(Declined::Rule(r));
    }
    let (accept, reason, detail) = match verdict {
        Ok(spec) => {
            let p = agent.home.path(&format!("jobs/{job_id}.json"));
            maeum_models::write_atomic(&p, spec.to_json().as_bytes())
                .with_context(|| format!("writing {}", p.display()))?;
            let p = agent.home.path(&format!("jobs/{job_id}.toml"));
            maeum_models::write_atomic(&p, spec_toml.as_bytes()).with_context(|| format!("writing {}", p.display()))?;
            (true, String::new(), String::new())
        }
        Err(declined) => {
            if let Declined::Rule(r) = &declined {
                agent.metrics.policy_refusals.inc(r.rule);
            }
            (false, declined.to_string(), declined.detail())
        }
    };
    if accept {
        info!(job = %job_id, sha256 = %spec_sha256, "accepted the job");
    } else {
        warn!(job = %job_id, reason = %detail, "refused the job");
    }
    // `jobs list` shows every offer this site answered, not only those its admin did.
    let by = if accept { "auto_accept" } else { "this site (policy or data)" };
    let decision = (accept, by, detail.as_str());
    if let Err(e) = crate::consent::record_decision(&agent.home, &job_id, &spec_toml, &spec_sha256.hex(), decision) {
        warn!(job = %job_id, error = %format!("{e:#}"), "recording the decision for `jobs list`");
    }
    let decision = pb::JobDecision { job_id: job_id.clone(), accept, reason };
    client.decide_job(decision).await?;
    agent.note(crate::witness::Record::Decision {
        job_id,
        accepted: accept,
        spec_sha256: spec_sha256.hex(),
        time_ms: crate::now_ms(),
    });
    Ok(())
}

/// Proves that the audit log holds a `job_submitted` entry for `job_id` with this
/// job-file hash, against a checkpoint this site witnessed (witnessing a newer one
/// first when needed). Its absence is a [`crate::policy::Refusal`] (`spec_hash`); an
/// unreachable coordinator is an ordinary error (the offer is answered later).
pub(super) async fn job_logged(agent: &Agent, client: &mut Client, job_id: &str, spec_sha256: &Digest) -> Result<()> {
    let want = spec_sha256.hex();
    let key = format!("{job_id} {want}");
    if agent.offers_proven.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&key) {
        return Ok(());
    }
    let logged = |p: &Proven| {
        p.entries.iter().any(|p| {
            matches!(&p.entry.event, maeum_tlog::Event::JobSubmitted { job_id: j, spec_sha256: s, .. } if j == job_id && *s == want)
        })
    };
    let wanted = crate::witness::Wanted { jobs: vec![job_id.to_string()], ..Default::default() };
    if prove_witnessed(agent, client, wanted, 0, logged).await?.is_some_and(|p| logged(&p)) {
        agent.offers_proven.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key);
        return Ok(());
    }
    Err(crate::policy::Refusal {
        rule: "spec_hash",
        why: format!(
            "no job_submitted entry for job {job_id} with job file SHA-256 {want} is in the audit log this site \
             witnessed"
        ),
    }
    .into())
}

/// The offered job, if the offer is honest and the site's policy takes it; otherwise
/// the reason for refusing it (naming the rule).
pub(crate) fn offered_job(
    policy: &crate::policy::Policy,
    job_id: &str,
    spec_toml: &str,
    spec_sha256: Digest,
) -> std::result::Result<JobSpec, Declined> {
    let spec_hash = |why: String| Declined::Rule(crate::policy::Refusal { rule: "spec_hash", why });
    if spec_toml.is_empty() {
        return Err(spec_hash("the offer carries no job file to check".into()));
    }
    let got = Digest::of(spec_toml.as_bytes());
    if got != spec_sha256 {
        return Err(spec_hash(format!(
            "the offered job file hashes to {got}, not to {spec_sha256} as the offer (and the audit log) claims"
        )));
    }
    let spec = JobSpec::from_toml(&format!("job {job_id}"), spec_toml)
        .map_err(|e| Declined::Other(format!("the job's specification is not valid here: {e}")))?;
    policy.check_job(&spec).map_err(Declined::Rule)?;
    Ok(spec)
}

/// Why a site declines an offer: a rule (counted by rule in the metrics), or another
/// reason (local data, an invalid job file, the admin). Its text is the reason the
/// coordinator records.
#[derive(Debug)]
pub enum Declined {
    Rule(crate::policy::Refusal),
    Other(String),
    /// A refusal because of the site's own data: `sent` goes to the coordinator (and
    /// its log); `detail` stays here (the site's log and `jobs list`).
    Data {
        sent: String,
        detail: String,
    },
}

impl Declined {
    /// What stays at the site.
    pub fn detail(&self) -> String {
        match self {
            Declined::Data { detail, .. } => detail.clone(),
            other => other.to_string(),
        }
    }
}

/// What the coordinator is told.
impl std::fmt::Display for Declined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Declined::Rule(r) => r.fmt(f),
            Declined::Other(why) | Declined::Data { sent: why, .. } => f.write_str(why),
        }
    }
}
