//! The gRPC services: `Fleet` (sites) and `Control` (operators), over one mTLS listener.
//!
//! Identity comes only from the verified client certificate (`PeerInfo`, attached by
//! `maeum_pki::tls::incoming`): a site can act only as itself, and only operator
//! certificates reach the control service. Every handler re-checks revocation, so a
//! revoked site's open HTTP/2 connection gains nothing from having been accepted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{error, info, warn};

use maeum_models::metrics::CrisisHistogram;
use maeum_pki::identity::Role;
use maeum_pki::tls::{PeerInfo, Revocations};
use maeum_protocols::job::JobSpec;
use maeum_protocols::wire::{
    self, CHUNK_SIZE, ConfusionCounts, Digest, EvaluateTask, Hasher, ModelRef, TrainTask, UploadHeader, Work, pb,
};
use maeum_tlog::release::is_crisis_label;

use crate::audit::AuditLog;
use crate::blobs::Blobs;
use crate::home::{Home, now_ms};
use crate::secagg::SecAggRound;
use crate::store::{Decision, JobRecord, JobState, SiteRecord, Store, VersionRecord};
use maeum_tlog::Event;

/// Tunables of a running coordinator.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A site with no heartbeat for this long is offline (and dropped from a round).
    pub heartbeat_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self { heartbeat_timeout: Duration::from_secs(10) }
    }
}

#[derive(Debug, Clone)]
struct Live {
    last_seen: Instant,
    /// When `last_seen_ms` was last written to the store.
    persisted: Instant,
    status: pb::SiteStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Train,
    Evaluate,
}

/// The round in progress. Memory is O(model): one running sum, whatever the number of
/// sites; updates are staged on disk while they arrive and folded when complete.
#[derive(Debug)]
pub struct RoundState {
    pub job_id: String,
    pub round: u32,
    pub attempt: u32,
    pub stage: Stage,
    pub model: ModelRef,
    pub deadline_ms: i64,
    pub selected: BTreeSet<String>,
    pub done: BTreeSet<String>,
    pub dropped: BTreeSet<String>,
    pub num_params: u64,
    pub sum: Vec<f64>,
    pub total_weight: u64,
    pub n_labels: usize,
    pub evaluation: Vec<Vec<u64>>,
    pub evaluated: BTreeSet<String>,
    /// Indices of the job's crisis classes.
    pub crisis_classes: Vec<usize>,
    /// The summed crisis histograms (`None` when the job has no crisis class, or once a
    /// site reported its evaluation without one: the sum would be partial).
    pub crisis_histogram: Option<CrisisHistogram>,
    uploads: HashMap<String, (String, UploadHeader)>,
    /// The secure-aggregation session of a training stage (None: plaintext debugging
    /// job, or an evaluation stage).
    pub secagg: Option<SecAggRound>,
    /// The unmasked u32 aggregate once secure aggregation finished (little-endian).
    pub aggregate: Option<Vec<u8>>,
    /// Fault injection only (`crate::attack`, `divergent`): every site but the named
    /// one is handed this model instead. Always `None` in a real coordinator.
    pub divergent: Option<(String, ModelRef)>,
    /// Why the unmasked aggregate was refused (outside what honest inputs can sum to):
    /// the round is then committed without an update.
    pub refused: Option<String>,
    /// A secure job's final evaluation: a session whose inputs hold only the weight
    /// word and the evaluation counts (the sites do not train).
    pub evaluate_only: bool,
    /// SA-06 accusations of this attempt: accused site → the sites that accused it.
    pub accusations: BTreeMap<String, BTreeSet<String>>,
}

impl RoundState {
    pub fn new(job: &JobRecord, round: u32, attempt: u32, stage: Stage, model: ModelRef, deadline_ms: i64) -> Self {
        let n_labels = job.spec.labels.len();
        let crisis_classes: Vec<usize> =
            job.spec.labels.iter().enumerate().filter(|(_, l)| is_crisis_label(l)).map(|(i, _)| i).collect();
        let num_params = job.spec.model_spec().map(|s| s.layout().numel() as u64).unwrap_or(0);
        Self {
            job_id: job.id.clone(),
            round,
            attempt,
            stage,
            model,
            deadline_ms,
            selected: BTreeSet::new(),
            done: BTreeSet::new(),
            dropped: BTreeSet::new(),
            num_params,
            // With secure aggregation the running sum is the masked u32 sum inside the
            // session; this f64 sum is filled from the unmasked result.
            sum: if stage == Stage::Train && !job.spec.secure_aggregation.enabled() {
                vec![0.0; num_params as usize]
            } else {
                Vec::new()
            },
            total_weight: 0,
            n_labels,
            evaluation: vec![vec![0; n_labels]; n_labels],
            evaluated: BTreeSet::new(),
            crisis_classes: crisis_classes.clone(),
            crisis_histogram: (!crisis_classes.is_empty()).then(CrisisHistogram::default),
            uploads: HashMap::new(),
            secagg: None,
            aggregate: None,
            divergent: None,
            refused: None,
            evaluate_only: false,
            accusations: BTreeMap::new(),
        }
    }

    /// Takes the summed evaluation counts of a secure round (`JobSpec::evaluation_words`
    /// layout: the confusion rows, then the crisis histogram's crisis and other bins).
    /// `Err` when they cannot come from honest sites (a crisis histogram that does not
    /// count the confusion matrix's examples).
    pub fn secure_evaluation(&mut self, counts: &[u32]) -> Result<(), String> {
        let l = self.n_labels;
        if counts.len() < l * l {
            return Err(format!("{} evaluation words, the job needs {}", counts.len(), l * l));
        }
        let rows: Vec<Vec<u64>> =
            counts[..l * l].chunks(l.max(1)).map(|r| r.iter().map(|&c| u64::from(c)).collect()).collect();
        let rest = &counts[l * l..];
        let histogram = if self.crisis_classes.is_empty() {
            None
        } else {
            let bins = maeum_models::metrics::HISTOGRAM_BINS;
            if rest.len() != 2 * bins {
                return Err(format!("{} histogram words, the job needs {}", rest.len(), 2 * bins));
            }
            let h = CrisisHistogram {
                crisis: rest[..bins].iter().map(|&c| u64::from(c)).collect(),
                other: rest[bins..].iter().map(|&c| u64::from(c)).collect(),
            };
            let crisis_rows: u64 = self.crisis_classes.iter().filter_map(|&i| rows.get(i)).flatten().sum();
            let all: u64 = rows.iter().flatten().sum();
            if h.crisis.iter().sum::<u64>() != crisis_rows || h.other.iter().sum::<u64>() != all - crisis_rows {
                return Err("the crisis histogram does not count the confusion matrix's examples".into());
            }
            Some(h)
        };
        self.evaluation = rows;
        self.crisis_histogram = histogram;
        Ok(())
    }

    /// Sites still expected to deliver in this stage.
    pub fn waiting(&self) -> BTreeSet<String> {
        let finished: &BTreeSet<String> = if self.stage == Stage::Train { &self.done } else { &self.evaluated };
        self.selected.iter().filter(|s| !finished.contains(*s) && !self.dropped.contains(*s)).cloned().collect()
    }
}

/// Shared coordinator state.
#[derive(Debug)]
pub struct Coord {
    pub home: Home,
    pub store: Store,
    pub blobs: Blobs,
    /// The transparency log (`docs/protocols/audit-log.md`).
    pub audit: AuditLog,
    /// Signed model releases (`crate::registry`).
    pub registry: crate::registry::Registry,
    /// The current release as heartbeats announce it (kept in step with the registry).
    current_release: Mutex<Option<pb::ReleaseRef>>,
    /// What the ops endpoint serves.
    pub metrics: crate::metrics::CoordMetrics,
    pub revocations: Revocations,
    pub settings: Settings,
    live: Mutex<HashMap<String, Live>>,
    pub round: Mutex<Option<RoundState>>,
    /// The job the orchestrator is driving (offers go out for it).
    pub current_job: Mutex<Option<String>>,
    /// What the current job is doing, for `jobs status`.
    pub activity: Mutex<String>,
    /// The latest round refusals per job (for `jobs status`; the log is the record).
    pub refusals: Mutex<HashMap<String, Vec<String>>>,
    /// Bumped on every change that pollers or watchers may care about.
    pub changed: watch::Sender<u64>,
    /// When this coordinator process started (sites get a grace period to reconnect).
    pub started: Instant,
    /// What HOME/sites looked like at the last [`Coord::sync_approvals`] (names, sizes,
    /// modification times); held while syncing, so that two syncs never log twice.
    sites_seen: Mutex<Vec<(String, u64, Option<std::time::SystemTime>)>>,
    /// (job, round) whose unmask request a site refused because it had already
    /// revealed that round's sum (`reveal_once`): that sum was lost (a restart after
    /// the reveal, say), and the round can only be skipped.
    pub revealed_before: Mutex<BTreeSet<(String, u32)>>,
    /// See [`Coord::fork_evidence`].
    fork_evidence: Mutex<BTreeMap<String, String>>,
    /// The last round attempts (job, round, attempt) whose unmask stage closed: a site's
    /// late unmask message for one of them is answered `Done` (its shares were not
    /// needed), not as a stale message.
    unmask_closed: Mutex<std::collections::VecDeque<(String, u32, u32)>>,
}

/// Records that `accuser` says `accused`'s share did not authenticate (SA-06); returns
/// the accusers once two distinct sites have named `accused` (then it is excluded).
fn accuse(accusations: &mut BTreeMap<String, BTreeSet<String>>, accuser: &str, accused: &str) -> Option<Vec<String>> {
    let accusers = accusations.entry(accused.to_string()).or_default();
    accusers.insert(accuser.to_string());
    (accusers.len() >= 2).then(|| accusers.iter().cloned().collect())
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the state is
/// plain data and every writer leaves it consistent between statements).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn internal(e: anyhow::Error) -> Status {
    // Detail goes to the log under this coordinator's control; the peer sees a summary.
    warn!(error = %format!("{e:#}"), "internal error");
    Status::internal("internal error at the coordinator (see its log)")
}

impl Coord {
    pub fn open(home: Home, settings: Settings) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(&home.state())?;
        let blobs = Blobs::open(&home.blobs())?;
        std::fs::create_dir_all(home.uploads())?;
        let revoked = store.sites()?.into_iter().filter(|s| s.revoked).map(|s| s.id);
        let consortium = home.consortium()?.name;
        let key = std::fs::read(home.path("signing.key")).context("reading signing.key")?;
        let audit = AuditLog::open(store.db(), format!("maeum/{consortium}"), &key)?;
        if audit.size() == 0 {
            let ca = maeum_pki::identity::pem_to_der(&home.read("ca.pem")?)?.remove(0);
            audit.append(
                now_ms(),
                Event::ConsortiumInit {
                    consortium,
                    ca_fingerprint: maeum_pki::identity::fingerprint(&ca),
                    log_key: audit.public_key(),
                },
            )?;
        }
        let registry = crate::registry::Registry::open(store.db())?;
        let current_release = registry.current()?.map(|(r, promotion)| pb::ReleaseRef {
            version: r.version,
            model_digest: r.model.digest,
            promotion,
        });
        let coord = Self {
            registry,
            current_release: Mutex::new(current_release),
            metrics: crate::metrics::CoordMetrics::new(),
            revocations: Revocations::new(revoked),
            audit,
            home,
            store,
            blobs,
            settings,
            live: Mutex::new(HashMap::new()),
            round: Mutex::new(None),
            current_job: Mutex::new(None),
            activity: Mutex::new(String::new()),
            refusals: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            started: Instant::now(),
            sites_seen: Mutex::new(Vec::new()),
            revealed_before: Mutex::new(BTreeSet::new()),
            fork_evidence: Mutex::new(BTreeMap::new()),
            unmask_closed: Mutex::new(std::collections::VecDeque::new()),
        };
        for (site, print) in coord.audit.site_certificates()?.replaced() {
            coord.revocations.revoke_certificate(site, print);
        }
        coord.sync_approvals()?;
        coord.audit.checkpoint()?;
        Ok(Arc::new(coord))
    }

    /// Appends `event` to the audit log (flushed before this returns).
    pub fn record(&self, event: Event) -> anyhow::Result<()> {
        self.record_seq(event).map(|_| ())
    }

    /// [`Coord::record`], returning the entry's seq.
    pub fn record_seq(&self, event: Event) -> anyhow::Result<u64> {
        let seq = self.audit.append(now_ms(), event)?;
        self.metrics.audit_entries.set(i64::try_from(seq + 1).unwrap_or(i64::MAX));
        Ok(seq)
    }

    /// Re-reads the current release after a promote or rollback; heartbeats announce it.
    pub fn refresh_current_release(&self) -> anyhow::Result<()> {
        let current = self.registry.current()?.map(|(r, promotion)| pb::ReleaseRef {
            version: r.version,
            model_digest: r.model.digest,
            promotion,
        });
        *lock(&self.current_release) = current;
        self.notify();
        Ok(())
    }

    /// Logs every approved site certificate (HOME/sites/ID.pem, written by the offline
    /// `sites approve`) that the log does not hold yet: a new site as `site_approved`, a
    /// new key approved with `--replace` (HOME/sites/ID.replace.json names it) as
    /// `site_key_replaced` for each certificate it replaces, which are revoked at once
    /// (open connections cut) with every certificate in HOME/sites/replaced. Runs at
    /// start, whenever a site connects for the first time in this process, and when
    /// HOME/sites changes ([`Coord::sync_if_changed`]).
    pub fn sync_approvals(&self) -> anyhow::Result<()> {
        let mut seen = lock(&self.sites_seen);
        *seen = self.sites_listing();
        let history = self.audit.site_certificates()?;
        let Ok(dir) = std::fs::read_dir(self.home.sites()) else { return Ok(()) };
        let mut found = Vec::new();
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(site) = name.strip_suffix(".pem") else { continue };
            let pem = std::fs::read_to_string(e.path())?;
            let Some(der) = maeum_pki::identity::pem_to_der(&pem)?.into_iter().next() else { continue };
            self.audit.remember_certificate(site, &pem)?;
            let fingerprint = maeum_pki::identity::fingerprint(&der);
            let current = history.current(site);
            if current.contains(&fingerprint.as_str()) {
                continue;
            }
            let not_after_ms = maeum_pki::identity::not_after_unix(&der)? * 1000;
            let note = self.home.replacement(site)?.filter(|n| n.new_cert_fingerprint == fingerprint);
            let event = match note {
                Some(note) if !current.is_empty() => {
                    let replaced = current.iter().map(|old| Event::SiteKeyReplaced {
                        site: site.to_string(),
                        old_cert_fingerprint: (*old).to_string(),
                        new_cert_fingerprint: fingerprint.clone(),
                        not_after_ms,
                        operator: note.operator.clone(),
                    });
                    replaced.collect()
                }
                _ => {
                    if !current.is_empty() {
                        warn!(
                            site,
                            "HOME/sites/{site}.pem holds a new certificate that was not approved with `sites \
                             approve --replace` (a renewal, or a second key approved by an older version); the \
                             earlier certificate stays valid until it expires or is replaced"
                        );
                    }
                    vec![Event::SiteApproved { site: site.to_string(), cert_fingerprint: fingerprint, not_after_ms }]
                }
            };
            found.push((site.to_string(), event));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let mut replaced = false;
        for (site, events) in found {
            for event in events {
                if let Event::SiteKeyReplaced { old_cert_fingerprint, .. } = &event {
                    warn!(site = %site, old = %old_cert_fingerprint, "site key replaced: the old certificate is revoked");
                    self.revocations.revoke_certificate(&site, old_cert_fingerprint);
                    replaced = true;
                }
                self.record(event)?;
            }
        }
        if let Ok(dir) = std::fs::read_dir(self.home.replaced_sites()) {
            for e in dir.flatten() {
                // SITE.FINGERPRINT.pem as `sites approve --replace` names them; any
                // SITE.*.pem a lead copies here counts the same (by its content).
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((site, _)) = name.strip_suffix(".pem").and_then(|n| n.split_once('.')) else { continue };
                let pem = std::fs::read_to_string(e.path())?;
                let Some(der) = maeum_pki::identity::pem_to_der(&pem)?.into_iter().next() else { continue };
                self.revocations.revoke_certificate(site, &maeum_pki::identity::fingerprint(&der));
                self.audit.remember_certificate(site, &pem)?;
            }
        }
        if replaced {
            // Sign now, so that the new key has a checkpoint after its entry to cosign.
            self.audit.checkpoint()?;
            self.notify();
        }
        Ok(())
    }

    /// Names, sizes and modification times in HOME/sites (not recursive).
    fn sites_listing(&self) -> Vec<(String, u64, Option<std::time::SystemTime>)> {
        let mut out: Vec<_> = std::fs::read_dir(self.home.sites())
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| {
                        let meta = e.metadata().ok()?;
                        Some((e.file_name().to_string_lossy().into_owned(), meta.len(), meta.modified().ok()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// [`Coord::sync_approvals`] if HOME/sites changed since the last sync (a cheap
    /// directory listing; `serve` calls it every second, so a `sites approve --replace`
    /// takes effect without a restart).
    pub fn sync_if_changed(&self) -> anyhow::Result<()> {
        if *lock(&self.sites_seen) == self.sites_listing() {
            return Ok(());
        }
        self.sync_approvals()
    }

    pub fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn is_online(&self, site: &str) -> bool {
        lock(&self.live).get(site).is_some_and(|l| l.last_seen.elapsed() < self.settings.heartbeat_timeout)
    }

    pub fn online_sites(&self) -> BTreeSet<String> {
        let t = self.settings.heartbeat_timeout;
        lock(&self.live).iter().filter(|(_, l)| l.last_seen.elapsed() < t).map(|(s, _)| s.clone()).collect()
    }

    fn peer<T>(req: &Request<T>) -> Result<PeerInfo, Status> {
        req.extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified client certificate on this connection"))
    }

    /// The calling site and its certificate, after the role and revocation checks.
    fn identify<T>(&self, req: &Request<T>) -> Result<(String, PeerInfo), Status> {
        let peer = Self::peer(req)?;
        if peer.peer.role != Role::Site {
            return Err(Status::permission_denied(format!("{} may not use the fleet service", peer.peer)));
        }
        let id = peer.peer.name.clone();
        if self.revocations.is_revoked(&id) {
            warn!(site = %id, remote = %peer.remote, "refused a call from a revoked site");
            self.metrics.verification_failures.inc("revoked_site");
            return Err(Status::permission_denied(format!("certificate for site/{id} is revoked")));
        }
        Ok((id, peer))
    }

    /// The calling site, after revocation checks; records that it was seen.
    fn site<T>(&self, req: &Request<T>, status: Option<&pb::SiteStatus>) -> Result<String, Status> {
        let (id, peer) = self.identify(req)?;
        let now = Instant::now();
        let mut live = lock(&self.live);
        let first = !live.contains_key(&id);
        let entry = live.entry(id.clone()).or_insert_with(|| Live {
            last_seen: now,
            persisted: now,
            status: Default::default(),
        });
        let persist = first || entry.persisted.elapsed() > Duration::from_secs(5);
        entry.last_seen = now;
        if persist {
            entry.persisted = now;
        }
        if let Some(s) = status {
            entry.status = s.clone();
        }
        drop(live);
        if persist {
            let mut rec = self.store.site(&id).map_err(internal)?.unwrap_or_else(|| SiteRecord {
                id: id.clone(),
                first_seen_ms: now_ms(),
                ..Default::default()
            });
            rec.last_seen_ms = now_ms();
            if rec.cert_fingerprint != peer.fingerprint || first {
                // Kept for the audit export: its cosignatures are checked against it.
                let pem = maeum_tlog::checkpoint::canonical_pem(&peer.certificate);
                self.audit.remember_certificate(&id, &pem).map_err(internal)?;
            }
            rec.cert_fingerprint = peer.fingerprint.clone();
            rec.cert_not_after_ms = peer.not_after * 1000;
            self.store.put_site(&rec, first).map_err(internal)?;
            if first {
                self.sync_approvals().map_err(internal)?;
                info!(site = %id, remote = %peer.remote, "site connected");
                self.notify();
            }
        }
        Ok(id)
    }

    fn operator<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let peer = Self::peer(req)?;
        if peer.peer.role != Role::Operator {
            return Err(Status::permission_denied(format!("{} may not use the control service", peer.peer)));
        }
        Ok(peer.peer.name)
    }

    /// Work for `site` right now, if any.
    fn work_for(&self, site: &str) -> Result<Option<Work>, Status> {
        let current = lock(&self.current_job).clone();
        if let Some(job_id) = current {
            let job = self.store.job(&job_id).map_err(internal)?;
            if let Some(job) = job.filter(|j| j.state.is_active() && !j.decisions.contains_key(site)) {
                let mut spec_toml = job.toml.clone();
                let mut spec_sha256 = Digest::parse("spec_sha256", &job.spec_sha256).map_err(Status::from)?;
                let attack = crate::attack::current();
                if matches!(attack, Some(crate::attack::Attack::TamperOffer | crate::attack::Attack::UnloggedOffer)) {
                    // The lie: secure aggregation off and one site enough, under the
                    // hash of the file that was submitted and logged, or its own.
                    let mut tampered = job.spec.clone();
                    tampered.secure_aggregation.insecure_plaintext_aggregation_for_debugging = true;
                    tampered.min_sites = 1;
                    spec_toml = toml::to_string(&tampered).map_err(|e| Status::internal(e.to_string()))?;
                    if attack == Some(crate::attack::Attack::UnloggedOffer) {
                        spec_sha256 = Digest::of(spec_toml.as_bytes());
                    }
                }
                return Ok(Some(Work::Offer {
                    job_id: job.id.clone(),
                    spec_json: job.spec.to_json(),
                    spec_sha256,
                    spec_toml,
                }));
            }
        }
        let round = lock(&self.round);
        let Some(r) = round.as_ref() else { return Ok(None) };
        if !r.selected.contains(site) || r.dropped.contains(site) {
            return Ok(None);
        }
        Ok(match r.stage {
            Stage::Train if !r.done.contains(site) => Some(Work::Train(TrainTask {
                job_id: r.job_id.clone(),
                round: r.round,
                attempt: r.attempt,
                model: match &r.divergent {
                    Some((target, other)) if target != site => other.clone(),
                    _ => r.model.clone(),
                },
                deadline_ms: r.deadline_ms,
                evaluate_first: !r.evaluated.contains(site),
                secagg: r.secagg.as_ref().map(|s| s.info.clone()),
                evaluate_only: r.evaluate_only,
            })),
            Stage::Evaluate if !r.evaluated.contains(site) => Some(Work::Evaluate(EvaluateTask {
                job_id: r.job_id.clone(),
                round: r.round,
                attempt: r.attempt,
                model: r.model.clone(),
                deadline_ms: r.deadline_ms,
            })),
            _ => None,
        })
    }

    fn upload_path(&self, upload_id: &str) -> std::path::PathBuf {
        self.home.uploads().join(format!("{upload_id}.part"))
    }

    /// Checks an update's header against the round in progress.
    fn admit_upload(&self, site: &str, h: &UploadHeader) -> Result<(String, u64), Status> {
        let mut round = lock(&self.round);
        let r = round
            .as_mut()
            .filter(|r| r.job_id == h.job_id && r.stage == Stage::Train)
            .ok_or_else(|| Status::failed_precondition(format!("job {} is not collecting updates now", h.job_id)))?;
        if h.round != r.round || h.attempt != r.attempt {
            return Err(Status::failed_precondition(format!(
                "stale update: it is for round {} attempt {}, the job is at round {} attempt {}",
                h.round, h.attempt, r.round, r.attempt
            )));
        }
        if !r.selected.contains(site) || r.dropped.contains(site) {
            return Err(Status::failed_precondition(format!("site/{site} is not a participant of this round")));
        }
        if r.done.contains(site) {
            return Err(Status::already_exists(format!("site/{site} already delivered its update for this round")));
        }
        // (An attacking coordinator handing out divergent models skips this check.)
        let divergent = matches!(crate::attack::current(), Some(crate::attack::Attack::Divergent(_)));
        if h.base_digest != r.model.digest && !divergent {
            return Err(Status::invalid_argument(format!(
                "update computed against model {}, but round {} distributed {}",
                h.base_digest, r.round, r.model.digest
            )));
        }
        match (&r.secagg, h.masked) {
            (Some(sa), true) => sa.may_upload(site)?,
            (None, false) => {}
            (Some(_), false) => {
                return Err(Status::failed_precondition(
                    "this round uses secure aggregation: a plaintext update is refused",
                ));
            }
            (None, true) => {
                return Err(Status::failed_precondition("this round does not use secure aggregation"));
            }
        }
        // A masked input's num_params is the session's vector length minus the weight
        // word: the parameters and the evaluation counts.
        let expected = match &r.secagg {
            Some(sa) if h.masked => sa.session.params.vector_len - 1,
            _ => r.num_params,
        };
        if h.layout_digest != r.model.layout_digest || h.num_params != expected {
            return Err(Status::invalid_argument(format!(
                "update layout {} with {} words does not match the round's layout {} with {expected} words",
                h.layout_digest, h.num_params, r.model.layout_digest
            )));
        }
        let upload_id = format!("{}-r{}-a{}-{}", h.job_id, h.round, h.attempt, site);
        let path = self.upload_path(&upload_id);
        let same = r.uploads.get(&upload_id).is_some_and(|(_, old)| old == h);
        let confirmed = if same { std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) } else { 0 };
        if !same {
            std::fs::File::create(&path).map_err(|e| internal(anyhow::anyhow!("creating {}: {e}", path.display())))?;
        }
        r.uploads.insert(upload_id.clone(), (site.to_string(), h.clone()));
        Ok((upload_id, confirmed))
    }

    /// Folds a complete, verified update into the running sum.
    fn fold(&self, site: &str, upload_id: &str) -> Result<(), Status> {
        let path = self.upload_path(upload_id);
        let mut round = lock(&self.round);
        let r =
            round.as_mut().ok_or_else(|| Status::failed_precondition("the round ended before the update completed"))?;
        let (_, h) = r
            .uploads
            .get(upload_id)
            .cloned()
            .ok_or_else(|| Status::failed_precondition("the round ended before the update completed"))?;
        if r.done.contains(site) || r.dropped.contains(site) || h.round != r.round || h.attempt != r.attempt {
            return Err(Status::failed_precondition("the update is no longer wanted (site dropped or round over)"));
        }
        let io = |e: std::io::Error| internal(anyhow::anyhow!("reading staged update {}: {e}", path.display()));
        let mut file = std::fs::File::open(&path).map_err(io)?;
        // First pass: the digest, and every value finite. Nothing is added to the sum
        // unless the whole update is sound, so a bad update cannot leave a partial fold.
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut index = 0u64;
        let mut bad_value = None;
        loop {
            let n = read_full(&mut file, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if bad_value.is_none()
                && !h.masked
                && let Some(k) = buf[..n - n % 4]
                    .chunks_exact(4)
                    .position(|w| !f32::from_le_bytes([w[0], w[1], w[2], w[3]]).is_finite())
            {
                bad_value = Some(index + k as u64);
            }
            index += (n / 4) as u64;
        }
        let refuse = |r: &mut RoundState, status: Status| {
            let _ = std::fs::remove_file(&path);
            r.uploads.remove(upload_id);
            Err(status)
        };
        if hasher.finish() != h.sha256 {
            return refuse(
                r,
                Status::data_loss("the update's bytes do not match its announced SHA-256; upload it again"),
            );
        }
        if let Some(i) = bad_value {
            warn!(site, upload_id, index = i, "update refused: non-finite parameter delta");
            return refuse(r, Status::invalid_argument(format!("update value {i} is not a finite number")));
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        if h.masked {
            return self.fold_masked(r, site, upload_id, &path, file, &h);
        }
        let w = h.weight as f64;
        let mut reader = std::io::BufReader::with_capacity(CHUNK_SIZE, file);
        let mut word = [0u8; 4];
        for (i, acc) in r.sum.iter_mut().enumerate() {
            reader.read_exact(&mut word).map_err(|e| {
                // The file was checked above; only a concurrent change can get here.
                internal(anyhow::anyhow!("staged update {upload_id} changed while folding at {i}: {e}"))
            })?;
            *acc += w * f64::from(f32::from_le_bytes(word));
        }
        r.total_weight += h.weight;
        r.done.insert(site.to_string());
        r.uploads.remove(upload_id);
        drop(round);
        let _ = std::fs::remove_file(&path);
        info!(site, upload_id, "update folded into the round's sum");
        self.notify();
        Ok(())
    }
}

impl Coord {
    /// Folds a verified masked input into the session's running u32 sum, chunk by
    /// chunk (memory O(chunk) beyond the sum).
    fn fold_masked(
        &self,
        r: &mut RoundState,
        site: &str,
        upload_id: &str,
        path: &std::path::Path,
        file: std::fs::File,
        h: &UploadHeader,
    ) -> Result<(), Status> {
        let sa = r.secagg.as_mut().ok_or_else(|| Status::failed_precondition("this round has no session"))?;
        let mut reader = std::io::BufReader::with_capacity(CHUNK_SIZE, file);
        let mut bytes = vec![0u8; CHUNK_SIZE];
        let mut words: Vec<u32> = Vec::with_capacity(CHUNK_SIZE / 4);
        let mut left = h.payload_len();
        while left > 0 {
            let n = left.min(CHUNK_SIZE as u64) as usize;
            reader
                .read_exact(&mut bytes[..n])
                .map_err(|e| internal(anyhow::anyhow!("staged masked input {upload_id} changed while folding: {e}")))?;
            words.clear();
            words.extend(bytes[..n].chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])));
            sa.fold(site, &words)?;
            left -= n as u64;
        }
        sa.finish_input(site)?;
        r.done.insert(site.to_string());
        r.uploads.remove(upload_id);
        let _ = std::fs::remove_file(path);
        info!(site, upload_id, "masked input folded into the session's sum");
        self.notify();
        Ok(())
    }
}

/// The fleet service.
#[derive(Debug, Clone)]
pub struct Fleet(pub Arc<Coord>);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::Chunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::fleet_server::Fleet for Fleet {
    async fn heartbeat(&self, req: Request<pb::SiteStatus>) -> Result<Response<pb::HeartbeatReply>, Status> {
        let status = req.get_ref().clone();
        if status.stage == wire::PROBE_STAGE {
            // `maeum-site doctor`: check the certificate, but do not count the site as
            // online (no daemon is behind this call).
            self.0.identify(&req)?;
        } else {
            self.0.site(&req, Some(&status))?;
        }
        let audit_size = self.0.audit.latest().map_or(0, |c| c.checkpoint.size);
        self.0.metrics.sites_online.set(self.0.online_sites().len() as i64);
        let current_release = lock(&self.0.current_release).clone();
        Ok(Response::new(pb::HeartbeatReply { server_time_ms: now_ms(), audit_size, current_release }))
    }

    async fn poll(&self, req: Request<pb::PollRequest>) -> Result<Response<pb::Work>, Status> {
        let c = &self.0;
        let site = c.site(&req, req.get_ref().status.as_ref())?;
        let wait = Duration::from_millis(u64::from(req.get_ref().wait_ms.min(30_000)));
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = c.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if c.revocations.is_revoked(&site) {
                return Err(Status::permission_denied(format!("certificate for site/{site} is revoked")));
            }
            if let Some(w) = c.work_for(&site)? {
                return Ok(Response::new((&w).into()));
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                () = tokio::time::sleep_until(deadline) => break,
            }
            c.site(&req, None)?;
        }
        Ok(Response::new((&Work::Idle { retry_after_ms: 0 }).into()))
    }

    async fn decide_job(&self, req: Request<pb::JobDecision>) -> Result<Response<pb::Ack>, Status> {
        let c = &self.0;
        let site = c.site(&req, None)?;
        let d = req.into_inner();
        let reason: String = d.reason.chars().take(500).collect();
        let current = lock(&c.current_job).clone();
        if current.as_deref() != Some(d.job_id.as_str()) {
            return Err(Status::failed_precondition(format!("job {} is not offered now", d.job_id)));
        }
        let decided = c
            .store
            .update_job(&d.job_id, |job| {
                anyhow::ensure!(job.state.is_active(), "job {} is {}", job.id, job.state.as_str());
                if let Some(prev) = job.decisions.get(&site) {
                    // A retried call is fine; changing one's mind is not.
                    anyhow::ensure!(prev.accept == d.accept, "site/{site} already decided on job {}", job.id);
                    return Ok(false);
                }
                job.decisions
                    .insert(site.clone(), Decision { accept: d.accept, reason: reason.clone(), at_ms: now_ms() });
                Ok(true)
            })
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?
            .1;
        if decided {
            c.record(Event::JobDecision {
                job_id: d.job_id.clone(),
                site: site.clone(),
                accepted: d.accept,
                reason: reason.clone(),
            })
            .map_err(internal)?;
            info!(job = %d.job_id, site, accept = d.accept, reason = %reason, "site decided on the job");
        }
        c.notify();
        Ok(Response::new(pb::Ack {}))
    }

    type DownloadStream = ChunkStream;

    async fn download(&self, req: Request<pb::DownloadRequest>) -> Result<Response<ChunkStream>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        let r = req.into_inner();
        let digest = Digest::parse("digest", &r.digest)?;
        if !c.blobs.contains(&digest) {
            return Err(Status::not_found(format!("no model {digest}")));
        }
        let path = c.blobs.path(&digest);
        let tamper_blob = test_tamper() == "blob"
            && lock(&c.current_release).as_ref().is_some_and(|cur| cur.model_digest == digest.hex());
        if tamper_blob {
            warn!(site = %site, "FAULT INJECTION: serving an altered copy of the current release's model");
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut offset = r.offset;
        tokio::task::spawn_blocking(move || {
            let send_err = |e: String| {
                let _ = tx.blocking_send(Err(Status::internal(e)));
            };
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => return send_err(format!("opening model: {e}")),
            };
            if let Err(e) = file.seek(SeekFrom::Start(offset)) {
                return send_err(format!("seeking model: {e}"));
            }
            loop {
                if c.revocations.is_revoked(&site) {
                    let _ = tx.blocking_send(Err(Status::permission_denied("site revoked")));
                    return;
                }
                let mut buf = vec![0u8; CHUNK_SIZE];
                let n = match read_full(&mut file, &mut buf) {
                    Ok(n) => n,
                    Err(e) => return send_err(format!("reading model: {e}")),
                };
                if n == 0 {
                    return;
                }
                buf.truncate(n);
                if tamper_blob && offset == 0 {
                    // Past the safetensors header: the file still parses, the digest differs.
                    let at = buf.len() - 1;
                    buf[at] ^= 0x01;
                }
                if tx.blocking_send(Ok(wire::chunk(offset, buf))).is_err() {
                    return;
                }
                c.metrics.bytes_sent.inc_by(n as u64);
                offset += n as u64;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn begin_upload(&self, req: Request<pb::UploadHeader>) -> Result<Response<pb::UploadState>, Status> {
        let c = &self.0;
        let site = c.site(&req, None)?;
        let h = UploadHeader::try_from(req.into_inner())?;
        let (upload_id, confirmed) = c.admit_upload(&site, &h).inspect_err(|e| {
            warn!(site, job = %h.job_id, round = h.round, attempt = h.attempt, reason = %e.message(), "update refused");
        })?;
        Ok(Response::new(pb::UploadState { upload_id, confirmed, complete: false }))
    }

    async fn upload(&self, req: Request<Streaming<pb::UploadChunk>>) -> Result<Response<pb::UploadState>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        let mut stream = req.into_inner();
        let mut file: Option<(String, std::fs::File, u64, u64)> = None;
        while let Some(chunk) = stream.message().await? {
            if c.revocations.is_revoked(&site) {
                return Err(Status::permission_denied(format!("certificate for site/{site} is revoked")));
            }
            if file.is_none() {
                let header = lock(&c.round).as_ref().and_then(|r| r.uploads.get(&chunk.upload_id).cloned());
                let (owner, h) = header.ok_or_else(|| {
                    Status::failed_precondition("unknown or expired upload id; call BeginUpload again")
                })?;
                if owner != site {
                    return Err(Status::permission_denied("this upload belongs to another site"));
                }
                let path = c.upload_path(&chunk.upload_id);
                let f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(|e| internal(anyhow::anyhow!("opening {}: {e}", path.display())))?;
                let len = f.metadata().map_err(|e| internal(e.into()))?.len();
                file = Some((chunk.upload_id.clone(), f, len, h.payload_len()));
            }
            let Some((id, f, len, total)) = file.as_mut() else { break };
            if chunk.upload_id != *id {
                return Err(Status::invalid_argument("one upload per stream"));
            }
            wire::check_chunk(*len, *total, chunk.offset, &chunk.data, &chunk.sha256)?;
            f.write_all(&chunk.data).map_err(|e| internal(anyhow::anyhow!("staging update {id}: {e}")))?;
            c.metrics.bytes_received.inc_by(chunk.data.len() as u64);
            *len += chunk.data.len() as u64;
        }
        let Some((id, f, len, total)) = file else {
            return Err(Status::invalid_argument("empty upload stream"));
        };
        f.sync_data().map_err(|e| internal(anyhow::anyhow!("staging update {id}: {e}")))?;
        drop(f);
        let complete = len == total;
        if complete {
            let c2 = c.clone();
            let (site2, id2) = (site.clone(), id.clone());
            tokio::task::spawn_blocking(move || c2.fold(&site2, &id2))
                .await
                .map_err(|e| internal(anyhow::anyhow!("fold task: {e}")))??;
        }
        Ok(Response::new(pb::UploadState { upload_id: id, confirmed: len, complete }))
    }

    async fn report_evaluation(&self, req: Request<pb::EvaluationReport>) -> Result<Response<pb::Ack>, Status> {
        let c = &self.0;
        let site = c.site(&req, None)?;
        let r = wire::EvaluationReport::try_from(req.into_inner())?;
        let (digest, counts) = (r.model_digest, r.confusion);
        let mut round = lock(&c.round);
        let state = round
            .as_mut()
            .filter(|s| s.job_id == r.job_id && s.round == r.round && s.attempt == r.attempt)
            .ok_or_else(|| Status::failed_precondition("stale evaluation: not for the round in progress"))?;
        if digest != state.model.digest {
            return Err(Status::invalid_argument("evaluation of a model this round did not distribute"));
        }
        if counts.n_labels as usize != state.n_labels {
            return Err(Status::invalid_argument(format!(
                "confusion over {} labels, the job has {}",
                counts.n_labels, state.n_labels
            )));
        }
        let rows = counts.rows();
        if let Some(h) = &r.crisis_histogram {
            if state.crisis_classes.is_empty() {
                return Err(Status::invalid_argument("crisis_histogram: the job has no crisis class"));
            }
            let crisis: u64 = state.crisis_classes.iter().filter_map(|&i| rows.get(i)).flatten().sum();
            let reported: u64 = h.crisis.iter().sum();
            if reported != crisis {
                return Err(Status::invalid_argument(format!(
                    "crisis_histogram.crisis: counts {reported} crisis examples, the confusion matrix's crisis rows \
                     {crisis}"
                )));
            }
        }
        if !state.selected.contains(&site) {
            return Err(Status::failed_precondition(format!("site/{site} is not a participant of this round")));
        }
        if state.secagg.is_some() || state.evaluate_only {
            return Err(Status::failed_precondition(
                "this round uses secure aggregation: evaluation counts travel inside the masked input",
            ));
        }
        if !state.evaluated.insert(site.clone()) {
            return Err(Status::already_exists("evaluation already reported"));
        }
        for (acc, row) in state.evaluation.iter_mut().zip(rows) {
            acc.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        match (&mut state.crisis_histogram, &r.crisis_histogram) {
            // Both have HISTOGRAM_BINS bins (checked at the wire boundary).
            (Some(sum), Some(h)) => sum.merge(h).map_err(Status::invalid_argument)?,
            (sum, None) => *sum = None,
            (None, Some(_)) => {}
        }
        drop(round);
        c.notify();
        Ok(Response::new(pb::Ack {}))
    }

    async fn sec_agg(&self, req: Request<pb::SecAggRequest>) -> Result<Response<pb::SecAggReply>, Status> {
        let c = &self.0;
        let site = c.site(&req, None)?;
        let r = wire::secagg::Request::try_from(req.into_inner())?;
        // The unmask stage closes as soon as enough shares are in, and the attempt ends:
        // a survivor whose shares were not needed is done, whenever it answers.
        if matches!(r.message, wire::secagg::StageMessage::Unmask(_))
            && c.unmask_was_closed(&r.job_id, r.round, r.attempt)
        {
            info!(site = %site, round = r.round, attempt = r.attempt, "late unmask shares for a closed session: answered done");
            return Ok(Response::new((&wire::secagg::Reply::Done).into()));
        }
        let with_session = |f: &mut dyn FnMut(&mut RoundState) -> Result<Option<wire::secagg::Reply>, Status>| {
            let mut round = lock(&c.round);
            let state = round
                .as_mut()
                .filter(|s| {
                    s.job_id == r.job_id && s.round == r.round && s.attempt == r.attempt && s.stage == Stage::Train
                })
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "stale secure-aggregation message: job {} round {} attempt {} is not in progress",
                        r.job_id, r.round, r.attempt
                    ))
                })?;
            if state.dropped.contains(&site) {
                return Err(Status::failed_precondition(format!("site/{site} was dropped from this round")));
            }
            f(state)
        };
        let mut fresh_unmask = false;
        with_session(&mut |state| {
            let done = state.done.clone();
            let sa = state
                .secagg
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("this round does not use secure aggregation"))?;
            if sa.rejoined(&site, &r.message) {
                warn!(
                    site = %site,
                    round = r.round,
                    attempt = r.attempt,
                    "site advertised new secure-aggregation keys for a session it had joined (it restarted); \
                     dropped from this attempt"
                );
                state.dropped.insert(site.clone());
                return Err(Status::failed_precondition(format!(
                    "site/{site} restarted and lost its keys for this secure-aggregation session (round {} attempt \
                     {}); it is dropped from this attempt and takes part again from the next one",
                    r.round, r.attempt
                )));
            }
            let fresh = matches!(r.message, wire::secagg::StageMessage::Unmask(_)) && !sa.has_spoken(&site, &r.message);
            sa.submit(&site, r.message.clone(), &done)?;
            fresh_unmask = fresh;
            Ok(None)
        })?;
        if fresh_unmask {
            // Kept for a restart (`crate::resume`): this site has revealed, and the sum
            // its shares open must survive this process.
            let (home, request) = (c.home.clone(), r.clone());
            let stored = tokio::task::spawn_blocking(move || crate::resume::append_unmask(&home, &request)).await;
            if let Err(e) = stored.map_err(anyhow::Error::from).and_then(|x| x) {
                error!(site = %site, error = %format!("{e:#}"), "could not store revealed shares for a restart");
            }
        }
        c.notify();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut rx = c.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let reply = with_session(&mut |state| {
                let sa = state.secagg.as_mut().ok_or_else(|| Status::failed_precondition("no session"))?;
                sa.reply(&site, &r.message)
            })?;
            if let Some(reply) = reply {
                return Ok(Response::new((&reply).into()));
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        Ok(Response::new((&wire::secagg::Reply::Pending { retry_after_ms: 0 }).into()))
    }

    async fn audit_checkpoint(
        &self,
        req: Request<pb::AuditCheckpointRequest>,
    ) -> Result<Response<pb::AuditCheckpointReply>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        let known = req.into_inner().known_size;
        let reply = tokio::task::spawn_blocking(move || c.witness_view(&site, known))
            .await
            .map_err(|e| internal(e.into()))??;
        Ok(Response::new(reply))
    }

    async fn audit_cosign(&self, req: Request<pb::AuditCosignRequest>) -> Result<Response<pb::Ack>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        // Checked against the certificate this connection presented (a site may have had
        // several keys over time; HOME/sites/ID.pem is only the latest).
        let cert = Coord::peer(&req)?.certificate;
        let cert = maeum_tlog::checkpoint::canonical_pem(&cert);
        let r = req.into_inner();
        let root = wire::audit::cosign_request(&r)?;
        tokio::task::spawn_blocking(move || -> Result<(), Status> {
            let stored = c
                .audit
                .checkpoint_at(r.size)
                .map_err(internal)?
                .ok_or_else(|| Status::not_found(format!("no checkpoint of size {}", r.size)))?;
            if stored.root != maeum_tlog::hex(&root) {
                warn!(site = %site, size = r.size, "a site cosigned a root this log never signed at that size");
                c.metrics.verification_failures.inc("audit_root");
                lock(&c.fork_evidence).insert(
                    site.to_string(),
                    format!(
                        "cosigned root {} at size {}, where this log signed {}",
                        maeum_tlog::hex(&root),
                        r.size,
                        stored.root
                    ),
                );
                return Err(Status::failed_precondition(format!(
                    "checkpoint {} of this log has root {}, not the one site/{site} cosigned",
                    r.size, stored.root
                )));
            }
            c.audit
                .add_cosignature(r.size, &site, &r.signature, &c.home.read("ca.pem").map_err(internal)?, &cert)
                .map_err(|e| {
                    c.metrics.verification_failures.inc("cosignature");
                    Status::invalid_argument(format!("{e:#}"))
                })
        })
        .await
        .map_err(|e| internal(e.into()))??;
        Ok(Response::new(pb::Ack {}))
    }

    async fn audit_prove(&self, req: Request<pb::AuditProveRequest>) -> Result<Response<pb::AuditProveReply>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        let r = req.into_inner();
        if r.models.len() > 4096 || r.models.iter().any(|m| Digest::parse("models", m).is_err()) {
            return Err(Status::invalid_argument("models: at most 4096 hex SHA-256 digests"));
        }
        if r.size == 0 || r.size > c.audit.size() {
            return Err(Status::invalid_argument(format!("size {}: the log has {} entries", r.size, c.audit.size())));
        }
        if r.jobs.len() > 64 || r.jobs.iter().any(|j| wire::job_id("jobs", j.clone()).is_err()) {
            return Err(Status::invalid_argument("jobs: at most 64 job ids"));
        }
        if r.sites.len() > 255 || r.sites.iter().any(|s| maeum_pki::identity::validate_name(s).is_err()) {
            return Err(Status::invalid_argument("sites: at most 255 site ids"));
        }
        let reply = tokio::task::spawn_blocking(move || -> anyhow::Result<pb::AuditProveReply> {
            let (entries, next) =
                c.audit.prove_for(&site, &r.models, &r.jobs, &r.sites, r.size, r.after, wire::audit::MAX_PROVEN)?;
            Ok(pb::AuditProveReply {
                entries: entries.iter().map(wire::audit::ProvenEntry::to_pb).collect(),
                more: next.is_some(),
                next: next.unwrap_or(0),
            })
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(internal)?;
        Ok(Response::new(reply))
    }

    async fn get_release(&self, req: Request<pb::GetReleaseRequest>) -> Result<Response<pb::Release>, Status> {
        let c = &self.0;
        let site = c.site(&req, None)?;
        let version = req.get_ref().version;
        let r = c
            .registry
            .get(version)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no release v{version}")))?;
        let consortium = c.home.consortium().map_err(internal)?.name;
        let mut msg = r.message(&consortium).map_err(internal)?;
        let mode = test_tamper();
        if !mode.is_empty() && mode != "blob" {
            warn!(site = %site, mode = %mode, version, "FAULT INJECTION: serving a tampered release");
            tamper_release(&mut msg, &mode, &c.home).map_err(internal)?;
        }
        Ok(Response::new(msg.to_pb()))
    }

    async fn report_refusal(&self, req: Request<pb::RefusalReport>) -> Result<Response<pb::Ack>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        let r = req.into_inner();
        let job_id = maeum_protocols::wire::job_id("refusal.job_id", r.job_id).map_err(Status::from)?;
        let rule = maeum_protocols::wire::REFUSAL_RULES.iter().find(|k| **k == r.rule).copied().unwrap_or("other");
        let detail: String = r.detail.chars().take(500).collect();
        c.record(Event::SiteRefused {
            job_id: job_id.clone(),
            round: r.round,
            attempt: r.attempt,
            site: site.clone(),
            rule: rule.into(),
            detail: detail.clone(),
        })
        .map_err(internal)?;
        c.metrics.site_refusals.inc(rule);
        {
            let mut all = lock(&c.refusals);
            let list = all.entry(job_id.clone()).or_default();
            list.push(format!("{site} round {} attempt {}: {rule}: {detail}", r.round, r.attempt));
            let extra = list.len().saturating_sub(10);
            list.drain(..extra);
        }
        if rule == "reveal_once" {
            lock(&c.revealed_before).insert((job_id.clone(), r.round));
        }
        if rule == "share_auth" {
            c.accusation(&job_id, r.round, r.attempt, &site, r.accused).map_err(internal)?;
        }
        warn!(site = %site, job = %job_id, round = r.round, attempt = r.attempt, rule, detail = %detail, "site REFUSED under its privacy policy");
        c.notify();
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_privacy(&self, req: Request<pb::PrivacyCharge>) -> Result<Response<pb::Ack>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        let r = req.into_inner();
        let job_id = maeum_protocols::wire::job_id("privacy.job_id", r.job_id).map_err(Status::from)?;
        if c.store.job(&job_id).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("no job {job_id}")));
        }
        if r.mechanism != "dp-sgd-local" {
            return Err(Status::invalid_argument(format!("privacy.mechanism: unknown mechanism {:?}", r.mechanism)));
        }
        // Each number is a short decimal that parses to a finite, non-negative f64.
        let number = |field: &str, v: String| -> Result<String, Status> {
            match v.parse::<f64>() {
                Ok(x) if v.len() <= 32 && x.is_finite() && x >= 0.0 => Ok(v),
                _ => Err(Status::invalid_argument(format!("privacy.{field}: not a non-negative decimal number"))),
            }
        };
        let epsilon = number("epsilon", r.epsilon)?;
        c.record(Event::PrivacyCharged {
            job_id: job_id.clone(),
            round: r.round,
            site: site.clone(),
            mechanism: r.mechanism,
            epsilon: epsilon.clone(),
            delta: number("delta", r.delta)?,
            clip: number("clip", r.clip)?,
            noise_multiplier: number("noise_multiplier", r.noise_multiplier)?,
            sample_rate: number("sample_rate", r.sample_rate)?,
            steps: r.steps,
        })
        .map_err(internal)?;
        info!(site = %site, job = %job_id, round = r.round, epsilon = %epsilon, "site charged its privacy ledger");
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_release(&self, req: Request<pb::ReleaseReport>) -> Result<Response<pb::Ack>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        let r = req.into_inner();
        // A refusal's reason, bounded; an install carries none.
        let reason: String = if r.installed { String::new() } else { r.reason.chars().take(500).collect() };
        let Some(release) = c.registry.get(r.version).map_err(internal)? else {
            return Err(Status::not_found(format!("no release v{}", r.version)));
        };
        if release.model.digest != r.model_digest {
            return Err(Status::invalid_argument(format!(
                "release v{} is model {}, not {}",
                r.version, release.model.digest, r.model_digest
            )));
        }
        let install = crate::registry::InstallRecord {
            installed: r.installed,
            reason: reason.clone(),
            promotion: r.promotion,
            at_ms: now_ms(),
        };
        let previous = release.installs.get(&site).cloned();
        c.registry.record_install(r.version, &site, install).map_err(internal)?;
        // One entry per change of outcome (a retry of the same report logs nothing).
        let same = previous.is_some_and(|p| p.installed == r.installed && p.reason == reason);
        if !same {
            c.record(Event::ReleaseInstall {
                site: site.clone(),
                version_sha256: release.model.digest.clone(),
                installed: r.installed,
                reason: reason.clone(),
            })
            .map_err(internal)?;
        }
        if r.installed {
            info!(site = %site, version = r.version, "site installed the release");
        } else {
            c.metrics.release_refusals.inc();
            warn!(site = %site, version = r.version, reason = %reason, "site REFUSED the release");
        }
        c.notify();
        Ok(Response::new(pb::Ack {}))
    }
}

impl Coord {
    /// What a witness that knew the checkpoint of size `known` is shown: the latest
    /// checkpoint, the consistency proof to it, and the checkpoints since `known` with
    /// their cosignatures and the cosigners' certificates.
    fn witness_view(&self, site: &str, known: u64) -> Result<pb::AuditCheckpointReply, Status> {
        let latest = self.audit.latest().ok_or_else(|| Status::unavailable("the audit log has no checkpoint yet"))?;
        let size = latest.checkpoint.size;
        let origin = self.audit.origin();
        if known > size {
            // This log is shorter than what the site witnessed: it was rolled back (a
            // restore from an older backup, say). The site gets the latest signed
            // checkpoint, which with its own is the signed evidence it keeps and stops on.
            warn!(
                site = %site,
                witnessed = known,
                size,
                "a site witnessed a larger checkpoint than this log's latest: the log was rolled back"
            );
            let latest = wire::audit::TreeHead { signed: latest, cosignatures: Vec::new() };
            return Ok(
                wire::audit::CheckpointReply { latest, consistency: Vec::new(), since: Vec::new() }.to_pb(&origin)
            );
        }
        let certs = |cosignatures: Vec<maeum_tlog::Cosignature>| {
            cosignatures
                .into_iter()
                .filter_map(|c| {
                    let pem = self.home.read(&format!("sites/{}.pem", c.site)).ok()?;
                    Some((c, pem))
                })
                .collect::<Vec<_>>()
        };
        let head = |stored: &maeum_tlog::export::ExportedCheckpoint| -> Result<wire::audit::TreeHead, Status> {
            let (signed, cosignatures) = stored.to_signed(&origin).map_err(|e| internal(e.into()))?;
            Ok(wire::audit::TreeHead { signed, cosignatures: certs(cosignatures) })
        };
        let since = self
            .audit
            .since(known, wire::audit::MAX_SINCE)
            .map_err(internal)?
            .iter()
            .map(head)
            .collect::<Result<Vec<_>, _>>()?;
        let fork_for = crate::attack::test_env("MAEUM_COORDINATOR_TEST_FORK_VIEW").unwrap_or_default();
        let (signed, consistency) = if !fork_for.is_empty() && fork_for == site && known < size {
            warn!(site = %site, "FAULT INJECTION: showing this site a forked view of the audit log");
            self.audit.forked_view(known).map_err(internal)?
        } else {
            let proof =
                if known == 0 { Vec::new() } else { self.audit.consistency_proof(known, size).map_err(internal)? };
            (latest, proof)
        };
        let latest = wire::audit::TreeHead { signed, cosignatures: Vec::new() };
        Ok(wire::audit::CheckpointReply { latest, consistency, since }.to_pb(&origin))
    }
}

/// Test-only fault injection for the release checks (tests/tests/releases.rs): when
/// `MAEUM_COORDINATOR_TEST_TAMPER_RELEASE_FILE` names a file, its content selects what
/// this coordinator falsifies: `blob` (the current release's model bytes), `card` (a
/// byte of the model card), `signature` (a bit of the signature) or `unlogged` (a
/// different card, properly signed, that the audit log does not record). Unset in
/// production, it costs one environment lookup.
fn test_tamper() -> String {
    let Some(path) = crate::attack::test_env("MAEUM_COORDINATOR_TEST_TAMPER_RELEASE_FILE") else {
        return String::new();
    };
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn tamper_release(msg: &mut wire::release::ReleaseMsg, mode: &str, home: &Home) -> anyhow::Result<()> {
    match mode {
        "card" => {
            let at = msg.card.len() / 2;
            msg.card[at] ^= 0x01;
        }
        "signature" => msg.signature[0] ^= 0x01,
        "unlogged" => {
            let mut card = maeum_tlog::release::ModelCard::decode(&msg.card)?;
            card.released_ms += 1;
            msg.card = card.encode();
            msg.manifest.card_sha256 = Digest::of(&msg.card).hex();
            msg.signature = msg.manifest.sign(&home.signing_key()?);
        }
        other => anyhow::bail!("unknown tamper mode {other:?}"),
    }
    Ok(())
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The control service (operator CLI).
#[derive(Debug, Clone)]
pub struct Control(pub Arc<Coord>);

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::JobInfo, Status>> + Send>>;

impl Coord {
    pub fn job_info(&self, j: &JobRecord) -> pb::JobInfo {
        let current = lock(&self.current_job).as_deref() == Some(j.id.as_str());
        let confusion = |rows: &Option<Vec<Vec<u64>>>| rows.as_ref().map(|r| (&ConfusionCounts::from_rows(r)).into());
        pb::JobInfo {
            job_id: j.id.clone(),
            name: j.spec.name.clone(),
            state: j.state.as_str().into(),
            rounds: j.spec.rounds,
            completed_rounds: j.completed_rounds(),
            activity: if current { lock(&self.activity).clone() } else { String::new() },
            history: j
                .history
                .iter()
                .map(|h| pb::RoundInfo {
                    round: h.round,
                    model: Some(version_ref(&h.model)),
                    contributors: h.contributors.clone(),
                    dropped: h.dropped.clone(),
                    total_weight: h.total_weight,
                    completed_ms: h.completed_ms,
                    evaluation: confusion(&h.evaluation),
                    attempts: h.attempts,
                    secure_aggregation: h.secure_aggregation,
                    secagg_threshold: u32::from(h.secagg_threshold),
                    aggregate_sha256: h.aggregate_sha256.clone(),
                    evaluated_by: h.evaluated_by.clone(),
                    refused: h.refused.clone(),
                })
                .collect(),
            decisions: j
                .decisions
                .iter()
                .map(|(s, d)| pb::SiteDecision { site_id: s.clone(), accept: d.accept, reason: d.reason.clone() })
                .collect(),
            labels: j.spec.labels.clone(),
            spec_sha256: j.spec_sha256.clone(),
            submitted_ms: j.submitted_ms,
            error: j.error.clone(),
            initial_evaluation: confusion(&j.initial_evaluation),
            secure_aggregation: j.spec.secure_aggregation.enabled(),
            excluded: j.excluded.iter().map(|(s, why)| format!("{s}: {why}")).collect(),
            refusals: lock(&self.refusals).get(&j.id).cloned().unwrap_or_default(),
            privacy_plan: j
                .spec
                .privacy_plan()
                .ok()
                .flatten()
                .and_then(|p| serde_json::to_string(&p).ok())
                .unwrap_or_default(),
        }
    }

    fn release_info(&self, r: &crate::registry::ReleaseRecord, current: u32) -> Result<pb::ReleaseInfo, Status> {
        let consortium = self.home.consortium().map_err(internal)?.name;
        Ok(pb::ReleaseInfo {
            release: Some(r.message(&consortium).map_err(internal)?.to_pb()),
            current: r.version == current,
            job_id: r.job_id.clone(),
            round: r.round,
            released_ms: r.released_ms,
            installs: r
                .installs
                .iter()
                .map(|(site, i)| pb::ReleaseInstall {
                    site_id: site.clone(),
                    installed: i.installed,
                    reason: i.reason.clone(),
                    at_ms: i.at_ms,
                })
                .collect(),
            gate_overrides: self
                .registry
                .promotions()
                .map_err(internal)?
                .iter()
                .filter(|p| p.version == r.version)
                .flat_map(gate_overrides_pb)
                .collect(),
            gate_failures: crate::registry::gate_failures(self, r)
                .map_err(internal)?
                .iter()
                .map(ToString::to_string)
                .collect(),
        })
    }

    /// Each site's agent version, from its latest heartbeat since this process started.
    pub fn agent_versions(&self) -> HashMap<String, String> {
        lock(&self.live)
            .iter()
            .map(|(s, l)| (s.clone(), l.status.agent_version.clone()))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    /// Sites that cosigned a root this log never signed at that size (since this process
    /// started), with what they cosigned: evidence that someone showed them a fork.
    pub fn fork_evidence(&self) -> BTreeMap<String, String> {
        lock(&self.fork_evidence).clone()
    }

    /// Records that the unmask stage of (job, round, attempt) closed.
    /// SA-06: `site` says the share party `accused` sealed for it did not authenticate,
    /// and leaves the attempt. The coordinator cannot check which of the two is lying
    /// (only they hold the key), so one accusation only drops the accuser; a party two
    /// sites accuse is excluded from the job's later attempts, so a site that seals
    /// garbage for its holders cannot stall the job, and one lying site alone cannot
    /// exclude anyone.
    pub fn accusation(&self, job_id: &str, round: u32, attempt: u32, site: &str, accused: u32) -> anyhow::Result<()> {
        let excluded = {
            let mut guard = lock(&self.round);
            let Some(r) = guard.as_mut().filter(|r| r.job_id == job_id && r.round == round && r.attempt == attempt)
            else {
                return Ok(());
            };
            r.dropped.insert(site.to_string());
            let Some(name) = u16::try_from(accused)
                .ok()
                .and_then(|i| r.secagg.as_ref().and_then(|sa| sa.names(&[i]).pop()))
                .filter(|n| n != site)
            else {
                return Ok(());
            };
            accuse(&mut r.accusations, site, &name).map(|accusers| (name, accusers))
        };
        if let Some((name, accusers)) = excluded {
            let why = format!(
                "SA-06: its shares did not authenticate for {} sites ({}) in round {round} attempt {attempt}",
                accusers.len(),
                accusers.join(", ")
            );
            let newly = self
                .store
                .update_job(job_id, |j| {
                    Ok(!j.excluded.contains_key(&name) && {
                        j.excluded.insert(name.clone(), why.clone());
                        true
                    })
                })?
                .1;
            if newly {
                warn!(site = %name, reason = %why, "site excluded from this job's later attempts");
            }
        }
        self.notify();
        Ok(())
    }

    pub fn note_unmask_closed(&self, job_id: &str, round: u32, attempt: u32) {
        let mut closed = lock(&self.unmask_closed);
        closed.push_back((job_id.to_owned(), round, attempt));
        while closed.len() > 16 {
            closed.pop_front();
        }
    }

    fn unmask_was_closed(&self, job_id: &str, round: u32, attempt: u32) -> bool {
        lock(&self.unmask_closed).iter().any(|(j, r, a)| j == job_id && *r == round && *a == attempt)
    }

    pub fn site_infos(&self) -> anyhow::Result<Vec<pb::SiteInfo>> {
        let mut records: HashMap<String, SiteRecord> =
            self.store.sites()?.into_iter().map(|s| (s.id.clone(), s)).collect();
        // Approved but never connected sites are listed too.
        if let Ok(dir) = std::fs::read_dir(self.home.sites()) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".pem") {
                    records.entry(id.to_string()).or_insert_with(|| SiteRecord { id: id.into(), ..Default::default() });
                }
            }
        }
        let live = lock(&self.live).clone();
        let mut out: Vec<pb::SiteInfo> = records
            .into_values()
            .map(|s| {
                let l = live.get(&s.id);
                pb::SiteInfo {
                    online: l.is_some_and(|l| l.last_seen.elapsed() < self.settings.heartbeat_timeout) && !s.revoked,
                    stage: l.map(|l| l.status.stage.clone()).unwrap_or_default(),
                    site_id: s.id,
                    last_seen_ms: s.last_seen_ms,
                    rounds_contributed: s.rounds_contributed,
                    revoked: s.revoked,
                    cert_fingerprint: s.cert_fingerprint,
                    cert_not_after_ms: s.cert_not_after_ms,
                    first_seen_ms: s.first_seen_ms,
                }
            })
            .collect();
        out.sort_by(|a, b| a.site_id.cmp(&b.site_id));
        Ok(out)
    }
}

pub fn version_ref(v: &VersionRecord) -> pb::ModelRef {
    pb::ModelRef { digest: v.digest.clone(), size: v.size, layout_digest: v.layout_digest.clone() }
}

#[tonic::async_trait]
impl pb::control_server::Control for Control {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::JobInfo>, Status> {
        let c = &self.0;
        let operator = c.operator(&req)?;
        let r = req.into_inner();
        let source = if r.source_name.is_empty() { "job.toml".to_string() } else { r.source_name };
        let spec = JobSpec::from_toml(&source, &r.toml).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let n = c.store.next("job").map_err(internal)?;
        let job = JobRecord {
            id: format!("{}-{n}", spec.name),
            spec_sha256: maeum_protocols::job::sha256_hex(r.toml.as_bytes()),
            spec,
            toml: r.toml,
            state: JobState::Pending,
            submitted_ms: now_ms(),
            initial: None,
            initial_evaluation: None,
            decisions: Default::default(),
            history: Vec::new(),
            attempts_started: 0,
            error: String::new(),
            excluded: Default::default(),
        };
        c.store.put_job(&job).map_err(internal)?;
        c.record(Event::JobSubmitted {
            job_id: job.id.clone(),
            name: job.spec.name.clone(),
            spec_sha256: job.spec_sha256.clone(),
            operator: operator.clone(),
        })
        .map_err(internal)?;
        // Signed now: a site proves the job_submitted entry before it decides.
        c.audit.checkpoint().map_err(internal)?;
        info!(job = %job.id, operator, sha256 = %job.spec_sha256, "job submitted");
        c.notify();
        Ok(Response::new(c.job_info(&job)))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::JobList>, Status> {
        let c = &self.0;
        c.operator(&req)?;
        let jobs = c.store.jobs().map_err(internal)?;
        Ok(Response::new(pb::JobList { jobs: jobs.iter().map(|j| c.job_info(j)).collect() }))
    }

    async fn get_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobInfo>, Status> {
        let c = &self.0;
        c.operator(&req)?;
        let id = &req.get_ref().job_id;
        let job = c.store.job(id).map_err(internal)?.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        Ok(Response::new(c.job_info(&job)))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, req: Request<pb::JobRef>) -> Result<Response<JobStream>, Status> {
        let c = self.0.clone();
        c.operator(&req)?;
        let id = req.into_inner().job_id;
        if c.store.job(&id).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("no job {id}")));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut changed = c.changed.subscribe();
        tokio::spawn(async move {
            let mut last: Option<pb::JobInfo> = None;
            loop {
                let info = match c.store.job(&id) {
                    Ok(Some(j)) => c.job_info(&j),
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                };
                let ended = !matches!(info.state.as_str(), "pending" | "running");
                if last.as_ref() != Some(&info) {
                    if tx.send(Ok(info.clone())).await.is_err() {
                        return;
                    }
                    last = Some(info);
                }
                if ended {
                    return;
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn abort_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobInfo>, Status> {
        let c = &self.0;
        let operator = c.operator(&req)?;
        let id = &req.get_ref().job_id;
        if c.store.job(id).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("no job {id}")));
        }
        let (job, ()) = c
            .store
            .update_job(id, |job| {
                anyhow::ensure!(job.state.is_active(), "job {id} is already {}", job.state.as_str());
                job.state = JobState::Aborted;
                job.error = format!("aborted by operator/{operator}");
                Ok(())
            })
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        c.record(Event::OperatorCommand {
            operator: operator.clone(),
            command: format!("jobs abort {id}"),
            result: "aborted".into(),
        })
        .map_err(internal)?;
        info!(job = %id, operator, "job aborted");
        c.notify();
        Ok(Response::new(c.job_info(&job)))
    }

    async fn list_sites(&self, req: Request<pb::ListSitesRequest>) -> Result<Response<pb::SiteList>, Status> {
        let c = &self.0;
        c.operator(&req)?;
        Ok(Response::new(pb::SiteList { sites: c.site_infos().map_err(internal)? }))
    }

    type ExportAuditStream = Pin<Box<dyn Stream<Item = Result<pb::AuditExportPiece, Status>> + Send>>;

    async fn export_audit(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let c = self.0.clone();
        let operator = c.operator(&req)?;
        let bytes = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
            c.record(Event::OperatorCommand {
                operator,
                command: "audit export".into(),
                result: format!("exported {} entries", c.audit.size() + 1),
            })?;
            // Every certificate of every site: HOME/sites (current), HOME/sites/replaced
            // (earlier keys), and those the log's store remembers (export adds them).
            let mut witnesses = Vec::new();
            for (dir, replaced) in [(c.home.sites(), false), (c.home.replaced_sites(), true)] {
                let Ok(dir) = std::fs::read_dir(dir) else { continue };
                for e in dir.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let site =
                        name.strip_suffix(".pem").map(|n| if replaced { n.split('.').next().unwrap_or(n) } else { n });
                    if let Some(site) = site.filter(|s| !s.is_empty()) {
                        let cert_pem = std::fs::read_to_string(e.path())?;
                        witnesses.push(maeum_tlog::export::WitnessCert { site: site.into(), cert_pem });
                    }
                }
            }
            c.audit.export(&c.home.read("ca.pem")?, &witnesses)
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(internal)?;
        let pieces: Vec<Result<pb::AuditExportPiece, Status>> =
            bytes.chunks(CHUNK_SIZE).map(|d| Ok(pb::AuditExportPiece { data: d.to_vec() })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(pieces))))
    }

    async fn list_releases(&self, req: Request<pb::ListReleasesRequest>) -> Result<Response<pb::ReleaseList>, Status> {
        let c = &self.0;
        c.operator(&req)?;
        let current = c.registry.current().map_err(internal)?.map_or(0, |(r, _)| r.version);
        let releases = c.registry.releases().map_err(internal)?;
        Ok(Response::new(pb::ReleaseList {
            releases: releases.iter().map(|r| c.release_info(r, current)).collect::<Result<_, _>>()?,
            current,
            promotions: c
                .registry
                .promotions()
                .map_err(internal)?
                .into_iter()
                .map(|p| pb::Promotion {
                    gate_overrides: gate_overrides_pb(&p),
                    id: p.id,
                    version: p.version,
                    action: p.action,
                    operator: p.operator,
                    at_ms: p.at_ms,
                })
                .collect(),
        }))
    }

    async fn get_release_info(&self, req: Request<pb::ReleaseSelector>) -> Result<Response<pb::ReleaseInfo>, Status> {
        let c = &self.0;
        c.operator(&req)?;
        let r = c.registry.find(&req.get_ref().version).map_err(|e| Status::not_found(format!("{e:#}")))?;
        let current = c.registry.current().map_err(internal)?.map_or(0, |(r, _)| r.version);
        Ok(Response::new(c.release_info(&r, current)?))
    }

    async fn promote_release(&self, req: Request<pb::PromoteRequest>) -> Result<Response<pb::ReleaseInfo>, Status> {
        let c = self.0.clone();
        let operator = c.operator(&req)?;
        let r = req.into_inner();
        let selector = r.version;
        let gate_override = if r.override_gate {
            let reason = r.reason.trim();
            if reason.is_empty() {
                return Err(Status::invalid_argument("--override-gate needs --reason: say why (it is logged)"));
            }
            if reason.len() > 500 || reason.chars().any(char::is_control) {
                return Err(Status::invalid_argument(
                    "--reason: one line of at most 500 bytes (it is published in the audit log)",
                ));
            }
            Some(crate::registry::Override { reason: reason.to_owned() })
        } else {
            None
        };
        c.registry.find(&selector).map_err(|e| Status::not_found(format!("{e:#}")))?;
        let c2 = c.clone();
        let (r, p) = tokio::task::spawn_blocking(move || {
            crate::registry::promote(&c2, &selector, &operator, gate_override.as_ref())
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| match e.downcast_ref::<crate::registry::GatesFailed>() {
            Some(g) => Status::failed_precondition(g.to_string()),
            None => internal(e),
        })?;
        c.refresh_current_release().map_err(internal)?;
        info!(version = r.version, operator = %p.operator, promotion = p.id, "release promoted; sites install it next");
        Ok(Response::new(c.release_info(&r, r.version)?))
    }

    async fn rollback_release(&self, req: Request<pb::RollbackRequest>) -> Result<Response<pb::ReleaseInfo>, Status> {
        let c = self.0.clone();
        let operator = c.operator(&req)?;
        let c2 = c.clone();
        let (r, p) = tokio::task::spawn_blocking(move || crate::registry::rollback(&c2, &operator))
            .await
            .map_err(|e| internal(e.into()))?
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        c.refresh_current_release().map_err(internal)?;
        warn!(version = r.version, operator = %p.operator, promotion = p.id, "rolled back; sites return to this release");
        Ok(Response::new(c.release_info(&r, r.version)?))
    }

    type ExportModelStream = Pin<Box<dyn Stream<Item = Result<pb::AuditExportPiece, Status>> + Send>>;

    async fn export_model(
        &self,
        req: Request<pb::ReleaseSelector>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let c = self.0.clone();
        c.operator(&req)?;
        let r = c.registry.find(&req.get_ref().version).map_err(|e| Status::not_found(format!("{e:#}")))?;
        let digest = Digest::parse("digest", &r.model.digest).map_err(|e| internal(e.into()))?;
        let bytes = c.blobs.get(&digest).map_err(internal)?;
        let pieces: Vec<Result<pb::AuditExportPiece, Status>> =
            bytes.chunks(CHUNK_SIZE).map(|d| Ok(pb::AuditExportPiece { data: d.to_vec() })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(pieces))))
    }

    async fn revoke_site(&self, req: Request<pb::SiteRef>) -> Result<Response<pb::SiteInfo>, Status> {
        let c = &self.0;
        let operator = c.operator(&req)?;
        let id = req.into_inner().site_id;
        maeum_pki::identity::validate_name(&id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let known = c.store.site(&id).map_err(internal)?;
        if known.is_none() && !c.home.sites().join(format!("{id}.pem")).exists() {
            return Err(Status::not_found(format!("no site {id} was ever approved")));
        }
        let mut rec = known.unwrap_or_else(|| SiteRecord { id: id.clone(), ..Default::default() });
        rec.revoked = true;
        rec.revoked_ms = now_ms();
        c.store.put_site(&rec, true).map_err(internal)?;
        c.revocations.revoke(&id);
        lock(&c.live).remove(&id);
        c.record(Event::SiteRevoked { site: id.clone(), reason: format!("revoked by operator/{operator}") })
            .and_then(|()| c.audit.checkpoint().map(|_| ()))
            .map_err(internal)?;
        warn!(site = %id, operator, "site revoked: open connections cut, new handshakes refused");
        c.notify();
        let info = c.site_infos().map_err(internal)?.into_iter().find(|s| s.site_id == id).unwrap_or_default();
        Ok(Response::new(info))
    }
}

/// A promotion's gate overrides, for the operator CLI.
fn gate_overrides_pb(p: &crate::registry::PromotionRecord) -> Vec<pb::GateOverride> {
    p.gate_overrides
        .iter()
        .map(|g| pb::GateOverride {
            gate: g.gate.clone(),
            measured: g.measured_text(),
            threshold: format!("{:.4}", g.threshold),
            operator: p.operator.clone(),
            reason: g.reason.clone(),
            at_ms: p.at_ms,
            audit_seq: g.audit_seq,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_accusation_excludes_nobody_and_two_sites_exclude_the_accused() {
        let mut a = BTreeMap::new();
        assert_eq!(accuse(&mut a, "site-1", "site-5"), None, "one site alone cannot exclude anyone");
        assert_eq!(accuse(&mut a, "site-1", "site-5"), None, "the same accuser twice is still one");
        assert_eq!(accuse(&mut a, "site-2", "site-4"), None);
        assert_eq!(accuse(&mut a, "site-3", "site-5"), Some(vec!["site-1".to_string(), "site-3".to_string()]));
    }
}
