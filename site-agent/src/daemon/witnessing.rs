//! Witnessing the coordinator's audit log: cosigning checkpoints that extend what this
//! site saw, and proving entries against a witnessed checkpoint.

use super::*;

/// One witnessing exchange (see `crate::witness`); failures are logged and retried at
/// the next heartbeat that announces a newer checkpoint, except while fork evidence is
/// kept (until `maeum-site audit clear`; the work loop then lets witnessing resume).
pub(crate) async fn witness(agent: Arc<Agent>, client: Client) {
    witness_with(&agent, client).await;
}

/// Runs one witnessing exchange now, or waits for the one in flight (at most 30 s).
pub(crate) async fn witness_now(agent: &Agent, client: &Client) {
    if !agent.witnessing.swap(true, Ordering::SeqCst) {
        witness_with(agent, client.clone()).await;
        return;
    }
    for _ in 0..300 {
        if !agent.witnessing.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What [`prove_witnessed`] got: the entries proven, and the size of the witnessed
/// checkpoint they were proven against.
pub(crate) struct Proven {
    pub(crate) entries: Vec<maeum_protocols::wire::audit::ProvenEntry>,
    pub(crate) size: u64,
}

/// Asks the coordinator for the entries `wanted` names from log position `after` on,
/// each proven against the checkpoint this site witnessed; when `found` is not
/// satisfied, witnesses a newer checkpoint and asks once more. Returns the last answer
/// (`None`: no checkpoint witnessed at all). The one mechanism behind every proof a
/// site asks for before it acts: an offered job, its session's members, its base model.
pub(crate) async fn prove_witnessed(
    agent: &Agent,
    client: &mut Client,
    wanted: crate::witness::Wanted,
    after: u64,
    found: impl Fn(&Proven) -> bool,
) -> Result<Option<Proven>> {
    let origin = crate::witness::log_origin(&agent.home)?;
    let mut last = None;
    for attempt in 0..2 {
        if attempt == 1 {
            witness_now(agent, client).await;
        }
        let Some(file) = crate::witness::witnessed(&agent.home)? else { continue };
        let (signed, _) = file.checkpoint.to_signed(&origin)?;
        let (size, root) = (signed.checkpoint.size, signed.checkpoint.root);
        let entries = if after >= size {
            Vec::new()
        } else {
            crate::witness::fetch_proven_with(client, size, &root, wanted.clone(), after).await?
        };
        let proven = Proven { entries, size };
        let done = found(&proven);
        last = Some(proven);
        if done {
            break;
        }
    }
    Ok(last)
}

/// [`witness`] on a borrowed agent; the caller has set `agent.witnessing`.
pub(super) async fn witness_with(agent: &Agent, mut client: Client) {
    if crate::witness::fork_evidence(&agent.home).is_some() {
        agent.witnessed.store(u64::MAX, Ordering::SeqCst);
        agent.set(|s| s.audit = audit_summary(&agent.home, u64::MAX));
        agent.witnessing.store(false, Ordering::SeqCst);
        return;
    }
    match crate::witness::witness_once(&agent.home, &mut client).await {
        Ok(crate::witness::Witnessed::Cosigned { size, .. }) => {
            agent.metrics.checkpoints_witnessed.inc();
            agent.witnessed.store(size, Ordering::SeqCst);
        }
        Ok(crate::witness::Witnessed::UpToDate { size }) => agent.witnessed.store(size, Ordering::SeqCst),
        Err(e) => {
            agent.metrics.verification_failures.inc("audit");
            if crate::witness::fork_evidence(&agent.home).is_some() {
                agent.metrics.verification_failures.inc("fork");
                // Not until the evidence is cleared: the heartbeat stops asking.
                agent.witnessed.store(u64::MAX, Ordering::SeqCst);
            } else {
                warn!(error = %format!("{e:#}"), "witnessing the audit log failed; will retry");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    agent.set(|s| s.audit = audit_summary(&agent.home, agent.witnessed.load(Ordering::SeqCst)));
    agent.witnessing.store(false, Ordering::SeqCst);
}

pub(super) fn audit_summary(home: &Home, size: u64) -> String {
    match crate::witness::fork_evidence(home) {
        Some(why) => format!("FORK DETECTED, not witnessing nor working: {why}"),
        None if size == 0 => "no checkpoint witnessed yet".into(),
        None => format!("witnessed checkpoint of size {size}"),
    }
}
