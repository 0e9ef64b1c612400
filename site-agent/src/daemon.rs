//! `maeum-site run`: the site daemon. It dials out to the coordinator (never listens),
//! pulls work, trains on local records, and uploads only the model update.
//!
//! Resilience: connection failures back off exponentially with full jitter, forever.
//! Model downloads resume from the bytes already on disk. A plaintext update (debugging
//! jobs only) is written to disk before it is uploaded, so after a crash (even kill -9)
//! the daemon resumes the upload of the same bytes; a secure-aggregation round cannot
//! be resumed by a restarted process (its secrets were in memory), so the site sits out
//! that attempt and joins the next (see `secure`).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::Rng;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status as RpcStatus};
use tracing::{debug, error, info, warn};

use maeum_models::data::{self, Example, ReadOptions};
use maeum_models::model::{ModelSpec, Prepared};
use maeum_models::params::FlatParams;
use maeum_pki::tls;
use maeum_protocols::job::JobSpec;
use maeum_protocols::wire::{
    self, CHUNK_SIZE, ConfusionCounts, Digest, EvaluateTask, Hasher, ModelRef, TrainTask, UploadHeader, Work, pb,
};

use crate::enrol::{Home, SiteConfig, Status};

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
}

impl Agent {
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
            Prepared2 { train: spec.prepare_text(&self.data.train)?, test: spec.prepare_text(&self.data.test)? }
        };
        let p = Arc::new(p);
        self.prepared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(job_id.into(), p.clone());
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

/// A status for humans, with the transport's cause chain (a TLS alert from the
/// coordinator means it refused this site's certificate).
pub(crate) fn describe(e: &RpcStatus) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    let msg = e.message();
    // hyper and tonic repeat a cause at several levels ("tcp connect error" three times).
    causes.dedup();
    causes.retain(|c| c != msg);
    let chain = if causes.is_empty() { String::new() } else { format!(" ({})", causes.join(": ")) };
    // Something answered on that port, but not with TLS: an HTTP server such as the
    // coordinator's ops endpoint, or another service.
    let not_tls = ["InvalidContentType", "corrupt message", "not a TLS", "InvalidMessage"];
    // The cause may be the status message itself (tonic puts the TLS error there).
    if causes.iter().chain(std::iter::once(&msg.to_string())).any(|c| not_tls.iter().any(|n| c.contains(n))) {
        return format!(
            "the peer does not speak TLS: this address is not the coordinator's site port (the ops port or \
             another service?){chain}"
        );
    }
    if causes.iter().any(|c| c.contains("fatal alert")) {
        return format!(
            "the coordinator refused this site's certificate (revoked, expired or from another consortium){chain}"
        );
    }
    // TCP connected but the peer hung up in or right after the TLS handshake: that is how
    // a coordinator refuses a certificate under TLS 1.3 (the reason is in its log).
    let hung_up = ["close_notify", "connection reset", "connection closed"];
    if causes.iter().any(|c| hung_up.iter().any(|h| c.contains(h))) {
        return format!(
            "the coordinator closed the connection{chain}; if this persists, this site's certificate may be \
             revoked, expired or from another consortium (the coordinator's log names the reason)"
        );
    }
    match e.code() {
        Code::Unavailable => format!("coordinator unreachable: {msg}{chain}"),
        Code::PermissionDenied => format!("coordinator refused this site: {msg}"),
        _ => format!("{:?}: {msg}{chain}", e.code()),
    }
}

/// [`describe`], naming the coordinator address from enrolment.json where the address
/// itself may be what is wrong (nothing listening, or not the coordinator's site port).
pub(crate) fn describe_at(e: &RpcStatus, address: &str) -> String {
    let what = describe(e);
    if what.starts_with("the peer does not speak TLS") || what.starts_with("coordinator unreachable") {
        format!("{what}; coordinator address {address} (from enrolment.json)")
    } else {
        what
    }
}

fn is_refusal(e: &RpcStatus) -> bool {
    e.code() == Code::PermissionDenied || describe(e).starts_with("the coordinator refused")
}

pub async fn connect(home: &Home) -> Result<Client> {
    let enrolment = home.enrolment()?;
    let tls = tls::client_tls(&home.read("ca.pem")?, &home.identity()?, &enrolment.coordinator_name);
    let channel = Endpoint::from_shared(format!("https://{}", enrolment.coordinator_address))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(pb::fleet_client::FleetClient::new(channel).max_decoding_message_size(4 * CHUNK_SIZE))
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
    let heartbeat = tokio::spawn(heartbeats(agent.clone(), client.clone()));
    tokio::select! {
        () = work_loop(agent.clone(), client, &address) => {},
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

async fn heartbeats(agent: Arc<Agent>, mut client: Client) {
    const EVERY: Duration = Duration::from_secs(1);
    let (mut pause, mut backoff) = (EVERY, Backoff(0));
    loop {
        tokio::time::sleep(pause).await;
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
    let (origin, _) = crate::witness::log_identity(&agent.home)?;
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
async fn witness_with(agent: &Agent, mut client: Client) {
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

fn audit_summary(home: &Home, size: u64) -> String {
    match crate::witness::fork_evidence(home) {
        Some(why) => format!("FORK DETECTED, not witnessing nor working: {why}"),
        None if size == 0 => "no checkpoint witnessed yet".into(),
        None => format!("witnessed checkpoint of size {size}"),
    }
}

/// Pulls work and does it, forever. While the coordinator's fork evidence is kept
/// (`crate::witness::fork_evidence`, checked before every poll and during every work
/// item) the site does no work for it: it declines offers, ignores training and
/// evaluation tasks (so it never answers secure aggregation), and abandons the item in
/// progress when a fork is caught mid-way. Heartbeats go on, showing the stop. Once an
/// admin runs `maeum-site audit clear`, the next iteration resumes: no restart.
async fn work_loop(agent: Arc<Agent>, mut client: Client, address: &str) {
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
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Answers a job offer. The site parses the job file the lead submitted (not the
/// coordinator's re-encoding), checks that it hashes to the digest the offer names
/// (the one the audit log's `job_submitted` entry carries), and checks it against its
/// local data and its `[policy]`. Its record count never leaves the site.
async fn decide(
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
async fn job_logged(agent: &Agent, client: &mut Client, job_id: &str, spec_sha256: &Digest) -> Result<()> {
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

/// A downloaded blob did not hash to the digest it was asked for (it was discarded).
#[derive(Debug)]
pub(crate) struct DigestMismatch {
    pub want: String,
    pub got: String,
}

impl std::fmt::Display for DigestMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "downloaded model does not match its digest {}; discarded", self.want)
    }
}

impl std::error::Error for DigestMismatch {}

/// Downloads (or resumes downloading) a model into HOME/models and verifies its digest.
pub(crate) async fn download(agent: &Agent, client: &mut Client, model: &ModelRef) -> Result<PathBuf> {
    let dir = agent.home.path("models");
    let path = dir.join(format!("{}.safetensors", model.digest));
    if path.exists() {
        return Ok(path);
    }
    let part = dir.join(format!("{}.part", model.digest));
    agent.set(|s| s.stage = "downloading".into());
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&part)?;
        let mut offset = file.metadata()?.len();
        if offset > model.size {
            file.set_len(0)?;
            offset = 0;
        }
        if offset < model.size {
            let mut stream =
                client.download(pb::DownloadRequest { digest: model.digest.hex(), offset }).await?.into_inner();
            let result: Result<()> = async {
                while let Some(c) = stream.next().await {
                    let c = c?;
                    wire::check_chunk(offset, model.size, c.offset, &c.data, &c.sha256)?;
                    file.write_all(&c.data)?;
                    agent.metrics.bytes_received.inc_by(c.data.len() as u64);
                    offset += c.data.len() as u64;
                }
                Ok(())
            }
            .await;
            file.sync_data()?;
            if let Err(e) = result {
                warn!(error = %format!("{e:#}"), offset, "model download interrupted; resuming");
                continue;
            }
        }
        let mut hasher = Hasher::default();
        let mut f = std::fs::File::open(&part)?;
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = hasher.finish();
        if got != model.digest {
            agent.metrics.verification_failures.inc("model_digest");
            let _ = std::fs::remove_file(&part);
            return Err(DigestMismatch { want: model.digest.hex(), got: got.hex() }.into());
        }
        std::fs::rename(&part, &path)?;
        agent.metrics.stage("download", started.elapsed());
        info!(model = %model.digest, bytes = model.size, "model downloaded and verified");
        return Ok(path);
    }
    bail!("model download kept failing")
}

/// Loads a downloaded model and checks it is the job's model.
fn load_model(path: &Path, job: &JobSpec, model: &ModelRef) -> Result<(ModelSpec, FlatParams)> {
    let (spec, params, _) = ModelSpec::load(path)?;
    let expected = job.model_spec()?;
    if spec != expected {
        bail!("model {} is not the job's model (architecture or labels differ)", model.digest);
    }
    if Digest(spec.layout().digest().0) != model.layout_digest {
        bail!("model {} layout does not match the announced layout", model.digest);
    }
    Ok((spec, params))
}

/// Which round attempt and model an evaluation belongs to.
struct EvalOf<'a> {
    job_id: &'a str,
    round: u32,
    attempt: u32,
    model: &'a ModelRef,
}

async fn report_eval(
    agent: &Agent,
    client: &mut Client,
    of: EvalOf<'_>,
    spec: &ModelSpec,
    params: FlatParams,
    data: Arc<Prepared2>,
) -> Result<()> {
    agent.set(|s| s.stage = "evaluating".into());
    let spec2 = spec.clone();
    let (confusion, crisis_histogram) = tokio::task::spawn_blocking(move || {
        let confusion = spec2.evaluate(&params, &data.test)?;
        let histogram = crisis_histogram(&spec2, &params, &data.test)?;
        anyhow::Ok((confusion, histogram))
    })
    .await??;
    let counts = ConfusionCounts::from_rows(&confusion.counts);
    let note = crate::releases::Reported {
        time_ms: crate::now_ms(),
        job_id: of.job_id.into(),
        round: of.round,
        attempt: of.attempt,
        model: of.model.digest.hex(),
        confusion: confusion.counts.clone(),
    };
    if let Err(e) = crate::releases::note_evaluation(&agent.home, &note) {
        warn!(error = %format!("{e:#}"), "writing evaluations.jsonl");
    }
    let report = pb::EvaluationReport::from(&wire::EvaluationReport {
        job_id: of.job_id.into(),
        round: of.round,
        attempt: of.attempt,
        model_digest: of.model.digest,
        confusion: counts,
        crisis_histogram,
    });
    match client.report_evaluation(report).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Code::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The held-out examples by their largest crisis-class probability (what the
/// coordinator chooses the crisis flag's threshold from); `None` when the model has no
/// crisis class. Counts only, like the confusion matrix.
pub(crate) fn crisis_histogram(
    spec: &ModelSpec,
    params: &FlatParams,
    data: &Prepared,
) -> Result<Option<maeum_models::metrics::CrisisHistogram>> {
    let crisis: Vec<usize> = spec
        .labels()
        .names()
        .iter()
        .enumerate()
        .filter(|(_, l)| maeum_tlog::release::is_crisis_label(l))
        .map(|(i, _)| i)
        .collect();
    if crisis.is_empty() {
        return Ok(None);
    }
    let probabilities = spec.predict_proba(params, data)?;
    Ok(Some(maeum_models::metrics::CrisisHistogram::from_probabilities(&probabilities, data.labels(), &crisis)))
}

async fn evaluate(agent: &Agent, client: &mut Client, t: EvaluateTask) -> Result<()> {
    agent.set(|s| {
        s.job_id = t.job_id.clone();
        s.round = t.round;
    });
    let job = agent.job(&t.job_id)?;
    let path = download(agent, client, &t.model).await?;
    let (spec, params) = load_model(&path, &job, &t.model)?;
    agent.note_model(&t.job_id, t.round, &t.model);
    let data = agent.prepared(&t.job_id, &spec).await?;
    let of = EvalOf { job_id: &t.job_id, round: t.round, attempt: t.attempt, model: &t.model };
    report_eval(agent, client, of, &spec, params, data).await?;
    agent.set(|s| s.last_model = t.model.digest.hex());
    info!(job = %t.job_id, round = t.round, "final evaluation reported");
    Ok(())
}

fn site_salt(site_id: &str) -> u64 {
    site_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

async fn train(agent: &Agent, client: &mut Client, t: TrainTask) -> Result<()> {
    agent.set(|s| {
        s.job_id = t.job_id.clone();
        s.round = t.round;
    });
    // Test hook (fault-injection builds only): a site whose every training item fails.
    if crate::secure::test_env("MAEUM_SITE_TEST_FAIL_TRAIN").is_some_and(|v| v == "1") {
        bail!("test hook: this site's training fails");
    }
    let job = agent.job(&t.job_id)?;
    match (t.secagg.clone(), job.secure_aggregation.enabled()) {
        (Some(info), true) => return crate::secure::train(agent, client, t, job, info).await,
        (None, true) => bail!(
            "the coordinator asked for a plaintext update, but job {} requires secure aggregation; refusing",
            t.job_id
        ),
        (Some(_), false) => bail!(
            "the coordinator proposed secure aggregation for job {}, whose file turns it off; refusing the mismatch",
            t.job_id
        ),
        (None, false) => {
            warn!(job = %t.job_id, "this job sends plaintext updates (insecure_plaintext_aggregation_for_debugging)")
        }
    }
    let name = format!("{}-r{}-a{}", t.job_id, t.round, t.attempt);
    let update_path = agent.home.path(&format!("work/{name}.update"));
    let header_path = agent.home.path(&format!("work/{name}.json"));
    let header: UploadHeader = match std::fs::read_to_string(&header_path).ok().and_then(|s| stored_header(&s)) {
        Some(h) if update_path.exists() => {
            info!(job = %t.job_id, round = t.round, "resuming the upload of an update computed before a restart");
            h
        }
        _ => {
            let (delta, examples) = local_update(agent, client, &t, &job).await?;
            let mut bytes = Vec::with_capacity(delta.len() * 4);
            for d in &delta {
                bytes.extend_from_slice(&d.to_le_bytes());
            }
            let h = t.upload_header(delta.len() as u64, examples, Digest::of(&bytes), false);
            maeum_models::write_atomic(&update_path, &bytes)?;
            maeum_models::write_atomic(&header_path, header_json(&h).as_bytes())?;
            h
        }
    };
    agent.set(|s| s.stage = "uploading".into());
    let result = agent.upload(client, &header, &update_path).await;
    if result.is_ok()
        || matches!(&result, Err(e) if e.downcast_ref::<RpcStatus>().is_some_and(|s| matches!(s.code(), Code::FailedPrecondition | Code::AlreadyExists)))
    {
        let _ = std::fs::remove_file(&update_path);
        let _ = std::fs::remove_file(&header_path);
    }
    result?;
    agent.note(crate::witness::Record::Contribution {
        job_id: t.job_id.clone(),
        round: t.round,
        attempt: t.attempt,
        secure: false,
        time_ms: crate::now_ms(),
    });
    agent.set(|s| s.last_model = t.model.digest.hex());
    info!(job = %t.job_id, round = t.round, "update delivered");
    Ok(())
}

/// The model a round was handed, as this site holds it.
pub(crate) struct RoundModel {
    pub(crate) spec: ModelSpec,
    pub(crate) params: FlatParams,
    pub(crate) data: Arc<Prepared2>,
}

/// Downloads the round's model (resuming, digest-checked), checks it is the job's, and
/// prepares the local records for it.
pub(crate) async fn round_model(
    agent: &Agent,
    client: &mut Client,
    t: &TrainTask,
    job: &JobSpec,
) -> Result<RoundModel> {
    let path = download(agent, client, &t.model).await?;
    let (spec, params) = load_model(&path, job, &t.model)?;
    agent.note_model(&t.job_id, t.round, &t.model);
    let data = agent.prepared(&t.job_id, &spec).await?;
    Ok(RoundModel { spec, params, data })
}

/// Downloads the round's model, evaluates it first if asked (plaintext jobs), and
/// trains on the local records: the update Δ = local − global, and the number of
/// training records.
pub(crate) async fn local_update(
    agent: &Agent,
    client: &mut Client,
    t: &TrainTask,
    job: &JobSpec,
) -> Result<(Vec<f32>, u64)> {
    let m = round_model(agent, client, t, job).await?;
    if t.evaluate_first {
        let of = EvalOf { job_id: &t.job_id, round: t.round, attempt: t.attempt, model: &t.model };
        report_eval(agent, client, of, &m.spec, m.params.clone(), m.data.clone()).await?;
    }
    train_from(agent, client, t, job, m).await
}

/// Trains the round's model on the local records: Δ = local − global, and the weight
/// (the number of training records, which never leaves the site but inside a masked
/// input; 1 in a differentially private job, whose guarantee would not cover an exact
/// count). A DP job's round is charged to the privacy ledger (durably, and reported
/// for the audit log) before the records are touched, and trained with DP-SGD whose
/// sampling and noise come from the site's secret key.
pub(crate) async fn train_from(
    agent: &Agent,
    client: &mut Client,
    t: &TrainTask,
    job: &JobSpec,
    m: RoundModel,
) -> Result<(Vec<f32>, u64)> {
    let RoundModel { spec, params: global, data } = m;
    let name = format!("{}-r{}-a{}", t.job_id, t.round, t.attempt);
    // Files of earlier attempts can never be accepted again.
    if let Ok(dir) = std::fs::read_dir(agent.home.path("work")) {
        for e in dir.flatten() {
            if !e.file_name().to_string_lossy().starts_with(&format!("{name}.")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let cfg = job.train_config(t.round, t.attempt, site_salt(&agent.site_id));
    let start = global.clone();
    let started = std::time::Instant::now();
    let (local, report, weight) = match job.privacy_plan()? {
        None => {
            agent.set(|s| s.stage = "training".into());
            let (local, report) =
                tokio::task::spawn_blocking(move || spec.train(&start, &data.train, &cfg, &mut ())).await??;
            (local, report, agent.data.train.len() as u64)
        }
        Some(plan) => {
            let base = t.model.digest.hex();
            let charged = match crate::ledger::charge(&agent.home, &t.job_id, t.round, &base, &plan) {
                Ok(c) => c,
                Err(refusal) => {
                    agent.refuse(client, &t.job_id, t.round, t.attempt, &refusal).await;
                    return Err(refusal.into());
                }
            };
            info!(job = %t.job_id, round = t.round, epsilon = charged.epsilon_job, new = charged.new, "privacy ledger charged");
            // Reported on every attempt, also a retry's (same charge): a site killed between
            // the ledger's fsync and the report still gets the charge into the log.
            {
                let report = pb::PrivacyCharge {
                    job_id: t.job_id.clone(),
                    round: t.round,
                    mechanism: crate::ledger::LOCAL_DP_SGD.into(),
                    epsilon: charged.epsilon_job.to_string(),
                    delta: plan.delta.to_string(),
                    clip: plan.clip.to_string(),
                    noise_multiplier: plan.noise_multiplier.to_string(),
                    sample_rate: plan.sample_rate.to_string(),
                    steps: charged.steps,
                };
                if let Err(e) = client.report_privacy(report).await {
                    warn!(error = %describe(&e), "reporting the privacy charge to the coordinator (the ledger holds it)");
                }
            }
            agent.set(|s| s.stage = "training (DP-SGD)".into());
            let mut rng = crate::ledger::noise_rng(&agent.home, &t.job_id, t.round, &base)?;
            let mechanism = plan.round_mechanism();
            let (local, report) = tokio::task::spawn_blocking(move || {
                spec.train_dp(&start, &data.train, &cfg, &mechanism, &mut rng, &mut ())
            })
            .await??;
            (local, report, 1)
        }
    };
    agent.metrics.stage("train", started.elapsed());
    info!(job = %t.job_id, round = t.round, steps = report.steps, seconds = started.elapsed().as_secs_f32(), "local training done");
    let delta = local.values().iter().zip(global.values()).map(|(l, g)| l - g).collect();
    Ok((delta, weight))
}

/// The on-disk form of an update's header (HOME/work/NAME.json).
fn header_json(h: &UploadHeader) -> String {
    serde_json::json!({
        "job_id": h.job_id, "round": h.round, "attempt": h.attempt, "base_digest": h.base_digest.hex(),
        "layout_digest": h.layout_digest.hex(), "num_params": h.num_params, "weight": h.weight,
        "sha256": h.sha256.hex(),
    })
    .to_string()
}

fn stored_header(json: &str) -> Option<UploadHeader> {
    let pb: pb::UploadHeader = serde_json::from_str::<serde_json::Value>(json).ok().and_then(|v| {
        Some(pb::UploadHeader {
            job_id: v.get("job_id")?.as_str()?.into(),
            round: v.get("round")?.as_u64()? as u32,
            attempt: v.get("attempt")?.as_u64()? as u32,
            base_digest: v.get("base_digest")?.as_str()?.into(),
            layout_digest: v.get("layout_digest")?.as_str()?.into(),
            num_params: v.get("num_params")?.as_u64()?,
            weight: v.get("weight")?.as_u64()?,
            sha256: v.get("sha256")?.as_str()?.into(),
            masked: false,
        })
    })?;
    UploadHeader::try_from(pb).ok()
}

/// Uploads an update file, resuming from what the coordinator already holds.
pub async fn upload(client: &mut Client, header: &UploadHeader, path: &Path) -> Result<()> {
    let mut last_err = None;
    for _ in 0..5 {
        let state = client.begin_upload(pb::UploadHeader::from(header)).await?.into_inner();
        let mut offset = state.confirmed;
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        file.seek(SeekFrom::Start(offset))?;
        let total = header.payload_len();
        let upload_id = state.upload_id.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadChunk>(4);
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            while offset < total {
                let n = (total - offset).min(CHUNK_SIZE as u64) as usize;
                let mut buf = vec![0u8; n];
                file.read_exact(&mut buf)?;
                let c = wire::chunk(offset, buf);
                let msg =
                    pb::UploadChunk { upload_id: upload_id.clone(), offset: c.offset, data: c.data, sha256: c.sha256 };
                if tx.blocking_send(msg).is_err() {
                    break;
                }
                offset += n as u64;
            }
            Ok(())
        });
        let result = client.upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        reader.await??;
        match result {
            Ok(s) if s.get_ref().complete => return Ok(()),
            Ok(s) => last_err = Some(anyhow::anyhow!("upload stopped at {} of {total} bytes", s.get_ref().confirmed)),
            Err(e) if matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DataLoss) => {
                warn!(error = %describe(&e), "upload interrupted; resuming");
                last_err = Some(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("upload failed")))
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
