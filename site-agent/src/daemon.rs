//! `maeum-site run`: the site daemon. It dials out to the coordinator (never listens),
//! pulls work, trains on local records, and uploads only the model update.
//!
//! Resilience: connection failures back off exponentially with full jitter, forever.
//! Model downloads resume from the bytes already on disk. A plaintext update (debugging
//! jobs only) is written to disk before it is uploaded, so after a crash (even kill -9)
//! the daemon resumes the upload of the same bytes; a secure-aggregation round cannot
//! be resumed by a restarted process (its secrets were in memory), so the site sits out
//! that attempt and joins the next (see `secure`).
//!
//! This file holds the agent, the connection and the loops; `offers` decides on job
//! offers, `witnessing` cosigns and proves against the audit log, `work` runs one work
//! item (download, evaluate, train, upload).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::Rng;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status as RpcStatus};
use tracing::{debug, error, info, warn};

use maeum_models::data::{self, Example, ReadOptions};
use maeum_models::model::{ModelSpec, Prepared};
use maeum_models::params::FlatParams;
use maeum_protocols::job::JobSpec;
use maeum_protocols::wire::{
    self, CHUNK_SIZE, ConfusionCounts, Digest, EvaluateTask, Hasher, ModelRef, TrainTask, UploadHeader, Work, pb,
};

use crate::enrol::{Home, SiteConfig, Status};

mod connection;
mod offers;
mod renew;
mod witnessing;
mod work;

pub use connection::connect;
pub(crate) use connection::{CoordinatorSaid, describe, describe_at, is_refusal};
pub(crate) use offers::*;
pub(crate) use witnessing::*;
pub use work::*;

pub(crate) type Client = pb::fleet_client::FleetClient<Channel>;

/// The site's records, read and validated once at start-up.
#[derive(Debug)]
pub struct LocalData {
    pub train: Vec<Example>,
    pub test: Vec<Example>,
}

impl LocalData {
    pub fn load(cfg: &SiteConfig) -> Result<Self> {
        let opts = ReadOptions {
            text_column: Some(cfg.data.text_column.clone()),
            label_column: Some(cfg.data.label_column.clone()),
            ..Default::default()
        };
        let read = |p: &Option<PathBuf>, what: &str| -> Result<Vec<Example>> {
            let p = p.as_ref().with_context(|| format!("site.toml: [data] {what} is not set"))?;
            Ok(data::read_examples(p, &opts)?.examples)
        };
        let train = read(&cfg.data.train, "train")?;
        let test = read(&cfg.data.test, "test")?;
        if train.is_empty() {
            bail!("site.toml: [data] train holds no records");
        }
        Ok(Self { train, test })
    }

    /// Why this site cannot serve a job, if it cannot.
    /// Why this site cannot take `job` on its data, if it cannot: what the coordinator
    /// (and its audit log) may learn, and the detail kept here. Which labels the site's
    /// records carry, and how many, stay at the site.
    pub fn refusal(&self, job: &JobSpec) -> Option<Declined> {
        let mut unknown: HashMap<&str, usize> = HashMap::new();
        for e in self.train.iter().chain(&self.test) {
            if !job.labels.contains(&e.label) {
                *unknown.entry(e.label.as_str()).or_default() += 1;
            }
        }
        if !unknown.is_empty() {
            let mut names: Vec<&str> = unknown.keys().copied().collect();
            names.sort_unstable();
            let n: usize = unknown.values().sum();
            return Some(Declined::Data {
                sent: "local data has labels outside the job's label set (which, and how many records, stay at the \
                       site: see its log or `maeum-site jobs list`)"
                    .into(),
                detail: format!(
                    "local data has {} label(s) outside the job's label set ({n} records): {}",
                    names.len(),
                    names.join(", ")
                ),
            });
        }
        if let Err(e) = job.model_spec() {
            return Some(Declined::Other(format!("this site cannot build the job's model: {e}")));
        }
        None
    }
}

pub(crate) struct Prepared2 {
    pub(crate) train: Prepared,
    pub(crate) test: Prepared,
}

/// Shared between the work loop and the heartbeat task.
pub(crate) struct Agent {
    pub(crate) home: Home,
    pub(crate) site_id: String,
    status: Mutex<Status>,
    data: LocalData,
    /// `[policy]` from site.toml, read at start-up.
    pub(crate) policy: crate::policy::Policy,
    /// Per job, the log position of the entry that proved the latest base model
    /// (`secure::check_base_logged` asks only for entries after it).
    pub(crate) base_proven_at: Mutex<HashMap<String, u64>>,
    /// "JOB SHA256" of the offers whose `job_submitted` entry this site proved.
    pub(crate) offers_proven: Mutex<std::collections::HashSet<String>>,
    prepared: Mutex<HashMap<String, Arc<Prepared2>>>,
    /// The pretrained encoders this site holds (loaded on first use), with the cache of
    /// its records' sentence vectors.
    encoders: Arc<Mutex<maeum_models::encoder::Encoders>>,
    /// Encoders whose installed files verified once in this run: an offer waiting for
    /// the admin is decided again every poll, and hashing 91 MB each time is waste. The
    /// files are checked again whenever they are loaded.
    encoders_verified: Mutex<std::collections::HashSet<String>>,
    /// The size of the latest audit checkpoint this site witnessed.
    witnessed: AtomicU64,
    /// A witnessing exchange is in flight.
    pub(crate) witnessing: AtomicBool,
    /// A release install is in flight (`crate::releases`).
    pub(crate) installing: AtomicBool,
    /// The (version, promotion) of the current release this site last acted on.
    pub(crate) release_handled: Mutex<Option<(u32, u64)>>,
    /// What the ops endpoint serves.
    pub(crate) metrics: crate::metrics::SiteMetrics,
    /// Random per process, sent with every status: the coordinator tells a restart by it.
    instance: String,
    /// The connection every loop uses from its next call on (replaced when the site's
    /// certificate is renewed, `renew`).
    client: Mutex<Client>,
    /// Certificate renewals and, after a CA rollover, probes of the coordinator's CA.
    upkeep: renew::Upkeep,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Agent {
    /// The connection to use for the next call.
    pub(crate) fn client(&self) -> Client {
        lock(&self.client).clone()
    }

    fn set_client(&self, client: Client) {
        *lock(&self.client) = client;
    }

    /// Appends to the journal that `maeum-site audit prove` checks against the log.
    pub(crate) fn note(&self, record: crate::witness::Record) {
        if let Err(e) = crate::witness::journal(&self.home, &record) {
            warn!(error = %format!("{e:#}"), "writing the audit journal");
        }
    }

    /// [`upload`], timed and counted.
    pub(crate) async fn upload(&self, client: &mut Client, header: &UploadHeader, path: &Path) -> Result<()> {
        let started = std::time::Instant::now();
        upload(client, header, path).await?;
        self.metrics.stage("upload", started.elapsed());
        self.metrics.bytes_sent.inc_by(header.payload_len());
        self.metrics.rounds.inc("delivered");
        Ok(())
    }

    /// A refusal under this site's policy: logged, journalled, counted and reported
    /// to the coordinator (which logs it as `site_refused`). The report is best effort:
    /// the refusal stands whether or not the coordinator hears of it.
    pub(crate) async fn refuse(
        &self,
        client: &mut Client,
        job_id: &str,
        round: u32,
        attempt: u32,
        refusal: &crate::policy::Refusal,
    ) {
        self.refuse_naming(client, job_id, round, attempt, refusal, 0).await;
    }

    /// [`Agent::refuse`] naming a session party the refusal accuses (`accused`, its
    /// index; 0 for none): a share from it that did not authenticate (SA-06).
    pub(crate) async fn refuse_naming(
        &self,
        client: &mut Client,
        job_id: &str,
        round: u32,
        attempt: u32,
        refusal: &crate::policy::Refusal,
        accused: u32,
    ) {
        warn!(job = %job_id, round, attempt, rule = refusal.rule, why = %refusal.why, "REFUSED under this site's policy");
        self.metrics.policy_refusals.inc(refusal.rule);
        self.note(crate::witness::Record::Refusal {
            job_id: job_id.into(),
            round,
            attempt,
            rule: refusal.rule.into(),
            detail: refusal.why.clone(),
            time_ms: crate::now_ms(),
        });
        self.set(|s| s.last_refusal = format!("job {job_id} round {round} attempt {attempt}: {refusal}"));
        let report = pb::RefusalReport {
            job_id: job_id.into(),
            round,
            attempt,
            rule: refusal.rule.into(),
            detail: refusal.why.clone(),
            accused,
        };
        if let Err(e) = client.report_refusal(report).await {
            warn!(error = %describe(&e), "reporting the refusal to the coordinator");
        }
    }

    fn note_model(&self, job_id: &str, round: u32, model: &ModelRef) {
        self.note(crate::witness::Record::Model {
            job_id: job_id.into(),
            round,
            digest: model.digest.hex(),
            time_ms: crate::now_ms(),
        });
    }

    pub(crate) fn set(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = s.clone();
        f(&mut s);
        // The last contact: when the connection came up, and when it went down.
        if (s.connection == "connected") != (before.connection == "connected") {
            s.contact_ms = crate::now_ms();
        }
        if *s != before {
            s.updated_ms = crate::now_ms();
            if let Err(e) = s.save(&self.home) {
                warn!(error = %format!("{e:#}"), "writing status.json");
            }
        }
    }

    fn wire_status(&self) -> pb::SiteStatus {
        let s = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pb::SiteStatus {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            stage: s.stage.clone(),
            job_id: s.job_id.clone(),
            round: s.round,
            instance: self.instance.clone(),
        }
    }

    fn job(&self, job_id: &str) -> Result<JobSpec> {
        let text = self.home.read(&format!("jobs/{job_id}.json")).context("the job's spec (accepted earlier)")?;
        Ok(JobSpec::from_json(&text)?)
    }

    /// Why this site cannot run `encoder` ([`crate::encoders::missing`]), remembering
    /// success.
    fn encoder_missing(&self, encoder: &maeum_models::encoder::EncoderSpec) -> Option<String> {
        let mut verified = self.encoders_verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.contains(&encoder.name) && maeum_models::encoder::check_known(encoder).is_ok() {
            return None;
        }
        let why = crate::encoders::missing(&self.home, encoder);
        if why.is_none() {
            verified.insert(encoder.name.clone());
        }
        why
    }

    /// The site's records featurised (or embedded) for `spec`, once per job. Embedding
    /// with a pretrained encoder takes minutes the first time (vectors are cached), so it
    /// runs off the async workers.
    async fn prepared(&self, job_id: &str, spec: &ModelSpec) -> Result<Arc<Prepared2>> {
        if let Some(p) = self.prepared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(job_id) {
            return Ok(p.clone());
        }
        let p = if spec.encoder().is_some() {
            self.set(|s| s.stage = "embedding local records".into());
            let (train, test) = (self.data.train.clone(), self.data.test.clone());
            let (spec, encoders, job) = (spec.clone(), self.encoders.clone(), job_id.to_string());
            tokio::task::spawn_blocking(move || -> Result<Prepared2> {
                let mut encoders = encoders.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let started = std::time::Instant::now();
                let mut logged = 0;
                let mut progress = |done: usize, total: usize| {
                    // A line per quarter: counts only, never text.
                    if total > 0 && (done * 4 / total > logged || done == total) && done > 0 {
                        logged = done * 4 / total;
                        info!(job = %job, done, total, "embedding records");
                    }
                };
                let train = spec.prepare_text_in(&train, &mut encoders, &mut progress)?;
                let test = spec.prepare_text_in(&test, &mut encoders, &mut |_, _| {})?;
                info!(job = %job, records = train.len() + test.len(), secs = started.elapsed().as_secs_f64(), "records embedded");
                Ok(Prepared2 { train, test })
            })
            .await??
        } else {
            // Featurising every record: off the runtime's workers.
            let (spec, train, test) = (spec.clone(), self.data.train.clone(), self.data.test.clone());
            tokio::task::spawn_blocking(move || -> Result<Prepared2> {
                Ok(Prepared2 { train: spec.prepare_text(&train)?, test: spec.prepare_text(&test)? })
            })
            .await??
        };
        let p = Arc::new(p);
        let mut prepared = self.prepared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The coordinator runs one job at a time: an earlier job's inputs (for
        // encoder-lora, hundreds of MB of hidden states) are not kept for the daemon's life.
        prepared.clear();
        prepared.insert(job_id.into(), p.clone());
        Ok(p)
    }
}

/// Exponential backoff with jitter: a delay drawn from [cap/4, cap], the cap doubling
/// from 0.5 s to 30 s.
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = 500u64.saturating_mul(1 << self.0.min(6)).min(30_000);
        self.0 += 1;
        Duration::from_millis(rand::rng().random_range(cap / 4..=cap))
    }
}

/// Runs the daemon until `shutdown` resolves; serves metrics and health on `ops_listen`.
pub async fn run(
    dir: &Path,
    ops_listen: Option<std::net::SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let home = Home::new(dir);
    let site_id = home.site_id()?;
    // Held until this function returns (the OS releases it if the process dies).
    let _lock = lock_home(&home)?;
    let enrolment = home.enrolment()?;
    let cfg = home.config()?;
    let data = LocalData::load(&cfg)?;
    if cfg.limits.threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(cfg.limits.threads).build_global();
    }
    for d in ["jobs", "models", "work", "audit"] {
        std::fs::create_dir_all(home.path(d)).with_context(|| format!("creating {}", home.path(d).display()))?;
    }
    info!(site = %site_id, coordinator = %enrolment.coordinator_address, train = data.train.len(), test = data.test.len(), "site agent starting");
    let client = connect(&home).await?;
    let address = enrolment.coordinator_address.clone();
    // What the last run knew (job, release, last contact) stays shown until the
    // coordinator says otherwise: `maeum-site status` marks it as last known.
    let previous = Status::load(&home).ok().flatten().unwrap_or_default();
    let home_for_encoders = home.clone();
    let agent = Arc::new(Agent {
        instance: {
            let mut bytes = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| anyhow::anyhow!("drawing the agent's instance id"))?;
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        },
        status: Mutex::new(Status {
            site_id: site_id.clone(),
            pid: std::process::id(),
            connection: "connecting".into(),
            job_id: previous.job_id,
            round: previous.round,
            last_model: previous.last_model,
            release: previous.release,
            // A daemon killed while connected last heard from the coordinator about
            // when it last wrote status.json.
            contact_ms: if previous.connection == "connected" {
                previous.updated_ms.max(previous.contact_ms)
            } else {
                previous.contact_ms
            },
            ..Default::default()
        }),
        home,
        site_id,
        data,
        policy: cfg.policy.clone(),
        base_proven_at: Mutex::new(HashMap::new()),
        offers_proven: Mutex::new(std::collections::HashSet::new()),
        prepared: Mutex::new(HashMap::new()),
        encoders: Arc::new(Mutex::new(crate::encoders::store(&home_for_encoders, true)?)),
        encoders_verified: Mutex::new(std::collections::HashSet::new()),
        witnessed: AtomicU64::new(0),
        witnessing: AtomicBool::new(false),
        installing: AtomicBool::new(false),
        release_handled: Mutex::new(None),
        metrics: crate::metrics::SiteMetrics::new(),
        client: Mutex::new(client),
        upkeep: renew::Upkeep::default(),
    });
    let (stop_ops, ops_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = ops_listen {
        maeum_runtime::ops::serve(addr, agent.metrics.ops.clone(), async {
            let _ = ops_stopped.await;
        })
        .await?;
    }
    agent.metrics.ops.set_ready(true);
    agent.witnessed.store(crate::witness::witnessed_size(&agent.home), Ordering::SeqCst);
    agent.set(|s| s.audit = audit_summary(&agent.home, agent.witnessed.load(Ordering::SeqCst)));
    agent.set(|s| s.stage = "idle".into());
    let heartbeat = tokio::spawn(heartbeats(agent.clone()));
    tokio::select! {
        () = work_loop(agent.clone(), &address) => {},
        () = shutdown => info!("shutting down"),
    }
    heartbeat.abort();
    agent.metrics.ops.set_ready(false);
    let _ = stop_ops.send(());
    agent.set(|s| {
        s.connection = "stopped".into();
        s.stage = "stopped".into();
    });
    Ok(())
}

/// Locks HOME for this daemon (HOME/daemon.lock, an OS file lock, with our pid inside),
/// so that a second `maeum-site run` on the same home exits before it touches anything.
fn lock_home(home: &Home) -> Result<std::fs::File> {
    use std::io::{Seek, Write};
    let path = home.path("daemon.lock");
    let mut file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let other = std::fs::read_to_string(&path).unwrap_or_default();
            let other = other.trim();
            let who = if other.is_empty() { String::new() } else { format!(" (pid {other})") };
            bail!(
                "another maeum-site daemon{who} is already running on the site home {}; stop it first \
                 (two daemons on one home would both connect as this site)",
                home.dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0).and_then(|()| file.rewind()).with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{}", std::process::id()).with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

async fn heartbeats(agent: Arc<Agent>) {
    const EVERY: Duration = Duration::from_secs(1);
    let (mut pause, mut backoff) = (EVERY, Backoff(0));
    loop {
        tokio::time::sleep(pause).await;
        let mut client = agent.client();
        match client.heartbeat(agent.wire_status()).await {
            Ok(reply) => {
                (pause, backoff) = (EVERY, Backoff(0));
                agent.set(|s| {
                    s.connection = "connected".into();
                    s.last_error.clear();
                });
                agent.metrics.connected.set(1);
                // A newer checkpoint is witnessed; an older one than this site witnessed
                // means a rolled-back log, which witnessing proves (signed) and stops on.
                let announced = reply.get_ref().audit_size;
                let witnessed = agent.witnessed.load(Ordering::SeqCst);
                let rolled_back = announced > 0 && announced < witnessed && witnessed != u64::MAX;
                if (announced > witnessed || rolled_back) && !agent.witnessing.swap(true, Ordering::SeqCst) {
                    tokio::spawn(witness(agent.clone(), client.clone()));
                }
                if reply.get_ref().renew_certificate {
                    renew::maybe_renew(&agent, &client);
                }
                renew::maybe_probe_ca(&agent);
                // A site that caught the coordinator forking installs nothing from it.
                if let Some(cur) = reply.into_inner().current_release
                    && crate::releases::wanted(&agent, &cur)
                    && crate::witness::fork_evidence(&agent.home).is_none()
                    && !agent.installing.swap(true, Ordering::SeqCst)
                {
                    tokio::spawn(crate::releases::follow(agent.clone(), client.clone(), cur));
                }
            }
            Err(e) => {
                agent.metrics.connected.set(0);
                let why = describe(&e);
                // A certificate that expired while this site was away: the coordinator
                // serves such a connection its renewal only (within 90 days).
                if renew::expired(&agent.home) {
                    renew::maybe_renew(&agent, &client);
                }
                // A coordinator that is down costs nothing to ask every second; one that
                // refuses this site (revoked, say) must not see a TLS handshake a second.
                pause = if is_refusal(&e) || why.starts_with("the coordinator closed the connection") {
                    backoff.next().max(EVERY)
                } else {
                    EVERY
                };
                debug!(error = %why, retry_in_ms = pause.as_millis() as u64, "heartbeat failed");
            }
        }
    }
}

/// Pulls work and does it, forever. While the coordinator's fork evidence is kept
/// (`crate::witness::fork_evidence`, checked before every poll and during every work
/// item) the site does no work for it: it declines offers, ignores training and
/// evaluation tasks (so it never answers secure aggregation), and abandons the item in
/// progress when a fork is caught mid-way. Heartbeats go on, showing the stop. Once an
/// admin runs `maeum-site audit clear`, the next iteration resumes: no restart.
async fn work_loop(agent: Arc<Agent>, address: &str) {
    let mut backoff = Backoff(0);
    // Work items that keep failing back off on their own: a successful poll between
    // two failures does not reset this (a site once retried a failing item three times
    // a second for as long as the coordinator kept offering it).
    let mut failing = Backoff(0);
    let mut last_logged = String::new();
    // Why this site refuses all work from the coordinator, while it does.
    let mut halted: Option<String> = None;
    // The round attempt whose task a halted site last reported refusing.
    let mut halt_reported: Option<(String, u32, u32)> = None;
    loop {
        let mut client = agent.client();
        match (crate::witness::fork_evidence(&agent.home), &halted) {
            (Some(why), None) => {
                error!(
                    reason = %why,
                    evidence = %crate::witness::evidence_path(&agent.home).display(),
                    "THIS SITE HAS STOPPED WORKING FOR THE COORDINATOR: it showed this site a forked audit log. \
                     No training, job decisions, secure aggregation or release installs until the site admin has \
                     inspected the evidence (`maeum-site audit status`) and cleared it with `{}`",
                    crate::witness::clear_command(&agent.home)
                );
                agent.metrics.halted.set(1);
                agent.witnessed.store(u64::MAX, Ordering::SeqCst);
                agent.set(|s| {
                    s.stage = crate::witness::STOPPED_STAGE.into();
                    s.audit = audit_summary(&agent.home, u64::MAX);
                });
                halted = Some(why);
            }
            (None, Some(_)) => {
                info!(
                    "the fork evidence was cleared (`maeum-site audit clear`); this site works for the coordinator again"
                );
                agent.metrics.halted.set(0);
                agent.set(|s| s.stage = "idle".into());
                halted = None;
            }
            _ => {}
        }
        // Witnessing resumes after a clearing (the heartbeat asks again).
        if halted.is_none() && agent.witnessed.load(Ordering::SeqCst) == u64::MAX {
            let size = crate::witness::witnessed_size(&agent.home);
            agent.witnessed.store(size, Ordering::SeqCst);
            agent.set(|s| s.audit = audit_summary(&agent.home, size));
        }
        let wait_ms = if halted.is_some() { 2_000 } else { 10_000 };
        let req = pb::PollRequest { status: Some(agent.wire_status()), wait_ms };
        let work = match client.poll(req).await {
            Ok(w) => Work::try_from(w.into_inner()),
            Err(e) => {
                let refused = is_refusal(&e);
                let what = describe_at(&e, address);
                // Log each new kind of failure once, not every retry.
                if what != last_logged {
                    warn!(error = %what, "cannot reach the coordinator; retrying with backoff");
                    last_logged.clone_from(&what);
                }
                agent.metrics.errors.inc("connection");
                agent.set(|s| {
                    s.connection = if refused { "refused".into() } else { "retrying".into() };
                    s.last_error = what;
                });
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        if backoff.0 > 0 {
            info!("connected to the coordinator");
        }
        last_logged.clear();
        backoff = Backoff(0);
        agent.set(|s| {
            s.connection = "connected".into();
            s.last_error.clear();
        });
        if let Some(why) = &halted {
            match work {
                Ok(Work::Offer { job_id, spec_sha256, .. }) => {
                    let reason = format!(
                        "this site has stopped working for this coordinator: it was shown a forked audit log ({why})"
                    );
                    let decision = pb::JobDecision { job_id: job_id.clone(), accept: false, reason };
                    match client.decide_job(decision).await {
                        Ok(_) => {
                            warn!(job = %job_id, "refused the job: this site has stopped (forked audit log)");
                            agent.note(crate::witness::Record::Decision {
                                job_id,
                                accepted: false,
                                spec_sha256: spec_sha256.hex(),
                                time_ms: crate::now_ms(),
                            });
                        }
                        Err(e) => debug!(job = %job_id, error = %describe(&e), "declining the job failed"),
                    }
                }
                Ok(Work::Train(t)) => {
                    debug!(job = %t.job_id, round = t.round, "not training: this site has stopped");
                    let key = (t.job_id.clone(), t.round, t.attempt);
                    if halt_reported.as_ref() != Some(&key) {
                        let r = crate::policy::Refusal {
                            rule: "halted",
                            why: format!("this site caught the coordinator's audit log forking and stopped ({why})"),
                        };
                        agent.refuse(&mut client, &t.job_id, t.round, t.attempt, &r).await;
                        halt_reported = Some(key);
                    }
                }
                Ok(Work::Evaluate(t)) => {
                    debug!(job = %t.job_id, round = t.round, "not evaluating: this site has stopped");
                }
                Ok(Work::Idle { .. }) | Err(_) => {}
            }
            // A task it ignores comes back at once: ask again in a while.
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        // An offer waiting for the admin that the coordinator no longer sends is
        // withdrawn (`jobs list` says so, `jobs accept` refuses to answer it).
        if let Ok(w) = &work {
            let offered = match w {
                Work::Offer { job_id, .. } => Some(job_id.as_str()),
                _ => None,
            };
            match crate::consent::withdraw_waiting(&agent.home, offered) {
                Ok(jobs) => jobs
                    .iter()
                    .for_each(|j| info!(job = %j, "the coordinator withdrew a job offer that waited for the admin")),
                Err(e) => warn!(error = %format!("{e:#}"), "marking withdrawn job offers"),
            }
        }
        // A training or evaluation item that fails is reported, so the coordinator
        // drops this site from the attempt at once instead of waiting for its deadline.
        let task = match &work {
            Ok(Work::Train(t)) => Some((t.job_id.clone(), t.round, t.attempt)),
            Ok(Work::Evaluate(t)) => Some((t.job_id.clone(), t.round, t.attempt)),
            _ => None,
        };
        let item = async {
            match work {
                Ok(Work::Idle { retry_after_ms }) => {
                    tokio::time::sleep(Duration::from_millis(u64::from(retry_after_ms))).await;
                    Ok(())
                }
                Ok(Work::Offer { job_id, spec_toml, spec_sha256, .. }) => {
                    decide(&agent, &mut client, job_id, spec_toml, spec_sha256).await
                }
                Ok(Work::Train(t)) => train(&agent, &mut client, t).await,
                Ok(Work::Evaluate(t)) => {
                    let started = std::time::Instant::now();
                    let result = evaluate(&agent, &mut client, t).await;
                    agent.metrics.stage("evaluate", started.elapsed());
                    result
                }
                Err(e) => Err(anyhow::anyhow!("malformed work from the coordinator: {e}")),
            }
        };
        // A fork caught mid-way (the heartbeat witnesses meanwhile) abandons the item:
        // the site reveals nothing more in it, as if it had dropped out.
        let result = tokio::select! {
            r = item => r,
            why = crate::witness::fork_detected(&agent.home) => {
                warn!(reason = %why, "abandoned the work item in progress: the coordinator's audit log forked");
                Ok(())
            }
        };
        agent.set(|s| s.stage = "idle".into());
        match result {
            Ok(()) => failing = Backoff(0),
            Err(e) => {
                agent.metrics.errors.inc("work_item");
                let pause = failing.next();
                warn!(error = %format!("{e:#}"), retry_in_ms = pause.as_millis() as u64, "work item failed; will ask again");
                // Only this site's own failures are reported: a refusal under its policy
                // was reported as such already, and an error the coordinator answered
                // with (an aborted attempt) is not this site's doing.
                let own = !e.chain().any(|c| {
                    c.downcast_ref::<crate::policy::Refusal>().is_some()
                        || c.downcast_ref::<RpcStatus>().is_some()
                        || c.downcast_ref::<CoordinatorSaid>().is_some()
                });
                if let Some((job_id, round, attempt)) = task.filter(|_| own) {
                    let detail = crate::redact::failure_summary(&e);
                    let report =
                        pb::RefusalReport { job_id, round, attempt, rule: "local_failure".into(), detail, accused: 0 };
                    if let Err(e) = client.report_refusal(report).await {
                        warn!(error = %describe(&e), "reporting the failure to the coordinator");
                    }
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_error_in_the_status_message_itself_is_named() {
        // tonic puts the rustls error in the message with only "transport error" below it.
        let e = RpcStatus::unavailable("received corrupt message of type InvalidContentType");
        let what = describe_at(&e, "127.0.0.1:9");
        assert!(what.starts_with("the peer does not speak TLS"), "{what}");
        assert!(what.ends_with("coordinator address 127.0.0.1:9 (from enrolment.json)"), "{what}");
    }

    fn ex(label: &str) -> Example {
        Example { text: "some words".into(), label: label.into() }
    }

    fn job(labels: &[&str]) -> JobSpec {
        let labels: Vec<String> = labels.iter().map(|l| format!("{l:?}")).collect();
        let toml = format!("name = \"t\"\nlabels = [{}]\nrounds = 1\n", labels.join(", "));
        JobSpec::from_toml("t.toml", &toml).expect("job")
    }

    #[test]
    fn a_job_is_refused_when_local_labels_fall_outside_its_label_set() {
        let data = LocalData { train: vec![ex("a"), ex("b"), ex("zz")], test: vec![ex("zz"), ex("yy")] };
        assert!(data.refusal(&job(&["a", "b", "yy", "zz"])).is_none());
        let refusal = data.refusal(&job(&["a", "b"])).expect("refused");
        // The detail stays here; the coordinator learns neither the labels nor a count.
        assert_eq!(refusal.detail(), "local data has 2 label(s) outside the job's label set (3 records): yy, zz");
        let sent = refusal.to_string();
        assert!(sent.starts_with("local data has labels outside the job's label set"), "{sent}");
        assert!(!sent.contains("yy") && !sent.contains("zz") && !sent.chars().any(|c| c.is_ascii_digit()), "{sent}");
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff(0);
        let first = b.next();
        assert!(first >= Duration::from_millis(125) && first <= Duration::from_millis(500), "{first:?}");
        for _ in 0..20 {
            let d = b.next();
            assert!(d <= Duration::from_secs(30), "{d:?}");
        }
        assert!(b.next() >= Duration::from_millis(7_500));
    }

    #[test]
    fn a_stored_upload_header_round_trips_and_junk_is_ignored() {
        let h = UploadHeader {
            job_id: "j-1".into(),
            round: 2,
            attempt: 3,
            base_digest: Digest::of(b"a"),
            layout_digest: Digest::of(b"b"),
            num_params: 10,
            weight: 4,
            sha256: Digest::of(b"c"),
            masked: false,
        };
        assert_eq!(stored_header(&header_json(&h)), Some(h));
        assert_eq!(stored_header("{\"job_id\": 1}"), None);
        assert_eq!(stored_header("not json"), None);
    }
}
