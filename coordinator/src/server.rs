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
use crate::blobs::{Blobs, read_chunk, read_full};
use crate::home::{Home, now_ms};
use crate::secagg::SecAggRound;
use crate::store::{Decision, JobRecord, JobState, Rounds, SiteRecord, Store, VersionRecord};
use maeum_tlog::Event;

mod control;
mod exclusion;
mod fleet;
mod round;

pub use control::{Control, version_ref};
pub use fleet::Fleet;
pub use round::{RoundState, Stage};

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
    /// When this site's last heartbeat arrived (not any call: long polls and uploads
    /// also count as seen).
    last_heartbeat: Option<Instant>,
    /// When `last_seen_ms` was last written to the store.
    persisted: Instant,
    status: pb::SiteStatus,
}

/// Shared coordinator state.
#[derive(Debug)]
pub struct Coord {
    pub home: Home,
    pub store: Store,
    pub blobs: Blobs,
    /// The transparency log (`docs/protocols/audit-log.md`).
    pub audit: AuditLog,
    /// Every rotation of the log key (`crate::signing_key`), served with checkpoints
    /// and releases; fixed at start, where rotations are applied.
    pub log_handovers: Vec<maeum_tlog::handover::KeyHandover>,
    /// Every rollover of the consortium CA (`crate::ca_rollover`), served with
    /// checkpoints; fixed at start, where rollovers are applied.
    pub ca_handovers: Vec<maeum_pki::rollover::CaHandover>,
    /// The CA issuing certificates now (DER): a site presenting a certificate of a
    /// retired CA is asked to renew.
    pub ca_der: Vec<u8>,
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
    /// Why the coordinator must stop serving (its state proved rolled back); `serve`
    /// waits on `fatal` and exits with this error.
    pub fatal_why: Mutex<Option<String>>,
    pub fatal: tokio::sync::Notify,
    /// See [`Coord::fork_evidence`].
    fork_evidence: Mutex<BTreeMap<String, String>>,
    /// The last round attempts (job, round, attempt) whose unmask stage closed: a site's
    /// late unmask message for one of them is answered `Done` (its shares were not
    /// needed), not as a stale message.
    unmask_closed: Mutex<std::collections::VecDeque<(String, u32, u32)>>,
    /// Downloads served, and uploaded updates folded, at once: at most [`MAX_TRANSFERS`].
    pub(crate) download_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) fold_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) downloads_open: Arc<fleet::DownloadsOpen>,
}

/// Model downloads that the coordinator serves at once, and uploaded updates it verifies
/// and folds at once. Each holds a few MB of buffers (chunks read ahead, a fold's read
/// buffers), so without a bound the coordinator's memory grows with the number of sites
/// (12.6 MB a site at N = 50, `docs/benchmarks.md#a-fleet-of-stand-in-sites`); the other
/// sites wait their turn. Two cores move bytes no faster with more at once.
pub const MAX_TRANSFERS: usize = 8;

/// A download whose site takes no chunk for this long is ended, and an upload that sends
/// none for this long too, so that a stalled site holds no slot and no stream.
pub const TRANSFER_STALL: Duration = Duration::from_secs(60);

/// [`TRANSFER_STALL`], or a test's shorter one (fault-injection builds only).
fn transfer_stall() -> Duration {
    crate::attack::test_env("MAEUM_COORDINATOR_TEST_TRANSFER_STALL_MS")
        .and_then(|ms| ms.parse().ok())
        .map_or(TRANSFER_STALL, Duration::from_millis)
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
        let store = Store::open(&home.state(), crate::storage::Engine::Sled)?;
        let blobs = Blobs::open(&home.blobs())?;
        std::fs::create_dir_all(home.uploads())?;
        let revoked = store.sites()?.into_iter().filter(|s| s.revoked).map(|s| s.id);
        let consortium = home.consortium()?.name;
        let key = std::fs::read(home.path("signing.key")).context("reading signing.key")?;
        let mut audit = AuditLog::open(store.db(), format!("maeum/{consortium}"), &key, &home.retired_log_keys()?)?;
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
        crate::signing_key::apply_pending(&home, &mut audit)?;
        let log_handovers = crate::signing_key::chain_for_sites(&home, &maeum_tlog::unhex32(&audit.first_key())?)?;
        crate::ca_rollover::apply_pending(&home, &mut audit)?;
        let ca_handovers = crate::ca_rollover::chain_for_sites(&home)?;
        let ca_der = home.ca_der()?;
        let registry = crate::registry::Registry::open(store.db())?;
        let current_release = registry.current()?.map(|(r, promotion)| pb::ReleaseRef {
            version: r.version,
            model_digest: r.model.digest,
            promotion,
        });
        let coord = Self {
            log_handovers,
            ca_handovers,
            ca_der,
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
            fatal_why: Mutex::new(None),
            fatal: tokio::sync::Notify::new(),
            fork_evidence: Mutex::new(BTreeMap::new()),
            unmask_closed: Mutex::new(std::collections::VecDeque::new()),
            download_slots: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
            fold_slots: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
            downloads_open: Arc::default(),
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

    /// Counts an entry appended with a state change (`Store::update_job_logged`).
    pub fn logged(&self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.metrics.audit_entries.set(i64::try_from(seq + 1).unwrap_or(i64::MAX));
        }
    }

    /// [`Coord::record`], returning the entry's seq.
    pub fn record_seq(&self, event: Event) -> anyhow::Result<u64> {
        let seq = self.audit.append(now_ms(), event)?;
        self.logged(Some(seq));
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
                    let renewal = current.iter().any(|old| {
                        let old = self.audit.remembered_certificate(old).ok().flatten();
                        let old = old.and_then(|pem| maeum_pki::identity::leaf_der(&pem).ok());
                        old.is_some_and(|old| maeum_pki::identity::same_public_key(&old, &der).unwrap_or(false))
                    });
                    if renewal {
                        info!(site, fingerprint = %fingerprint, "a renewed certificate of a site (same key) is logged");
                    } else if !current.is_empty() {
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
        let (id, peer) = self.identify_expired(req)?;
        if peer.not_after < now_ms() / 1000 {
            return Err(Status::permission_denied(format!(
                "the certificate of site/{id} expired: this connection may only renew it (RenewCertificate)"
            )));
        }
        Ok((id, peer))
    }

    /// [`Coord::identify`] for `RenewCertificate`, the one call a site certificate that
    /// expired within `maeum_pki::tls::EXPIRED_GRACE_DAYS` may make.
    fn identify_expired<T>(&self, req: &Request<T>) -> Result<(String, PeerInfo), Status> {
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

    /// Stops serving for `why` (an integrity failure): logged, and `serve` returns it.
    pub fn stop_for(&self, why: String) {
        tracing::error!(reason = %why, "REFUSING TO SERVE");
        lock(&self.fatal_why).get_or_insert(why);
        self.fatal.notify_one();
    }

    /// `id` came back as a new agent process: whatever it held of a secure-aggregation
    /// session in flight (its keys, its place in the stages) is gone, so the session
    /// stops waiting for it now rather than at the stage's deadline.
    fn site_restarted(&self, id: &str) {
        info!(site = %id, "site restarted (a new agent instance)");
        let dropped = {
            let mut guard = lock(&self.round);
            guard.as_mut().is_some_and(|r| r.secagg().is_some() && r.drop_for(id, "restarted mid-session"))
        };
        if dropped {
            warn!(site = %id, "site restarted mid-session; dropped from the round");
            self.notify();
        }
    }

    /// Records a heartbeat of `site` and returns the time since its previous one (none
    /// for the first since this coordinator started).
    pub(crate) fn heartbeat_interval(&self, site: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut live = lock(&self.live);
        let entry = live.get_mut(site)?;
        entry.last_heartbeat.replace(now).map(|prev| now - prev)
    }

    /// The calling site, after revocation checks; records that it was seen.
    fn site<T>(&self, req: &Request<T>, status: Option<&pb::SiteStatus>) -> Result<String, Status> {
        let (id, peer) = self.identify(req)?;
        let now = Instant::now();
        let mut live = lock(&self.live);
        let first = !live.contains_key(&id);
        let entry = live.entry(id.clone()).or_insert_with(|| Live {
            last_seen: now,
            last_heartbeat: None,
            persisted: now,
            status: Default::default(),
        });
        let restarted = status.is_some_and(|s| {
            !first && !s.instance.is_empty() && !entry.status.instance.is_empty() && s.instance != entry.status.instance
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
        if restarted {
            self.site_restarted(&id);
        }
        if persist {
            // Kept for `sites list` and the audit export; a failed write (a full disk) is
            // logged and the call goes on: a site must not drop offline because the
            // coordinator cannot write.
            if let Err(e) = self.persist_site(&id, &peer, first) {
                warn!(site = %id, error = %format!("{e:#}"), "could not record that the site was seen");
            }
            if first {
                self.sync_approvals().map_err(internal)?;
                info!(site = %id, remote = %peer.remote, "site connected");
                self.notify();
            }
        }
        Ok(id)
    }

    fn persist_site(&self, id: &str, peer: &PeerInfo, first: bool) -> anyhow::Result<()> {
        let mut rec = self.store.site(id)?.unwrap_or_else(|| SiteRecord {
            id: id.to_string(),
            first_seen_ms: now_ms(),
            ..Default::default()
        });
        rec.last_seen_ms = now_ms();
        if rec.cert_fingerprint != peer.fingerprint || first {
            // Kept for the audit export: its cosignatures are checked against it.
            let pem = maeum_tlog::checkpoint::canonical_pem(&peer.certificate);
            self.audit.remember_certificate(id, &pem)?;
        }
        rec.cert_fingerprint = peer.fingerprint.clone();
        rec.cert_not_after_ms = peer.not_after * 1000;
        self.store.put_site(&rec)
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
            let job = self.store.job(&job_id, Rounds::Latest(0)).map_err(internal)?;
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
        if !r.selected().contains(site) || r.dropped().contains(site) {
            return Ok(None);
        }
        Ok(match r.stage() {
            Stage::Train if !r.done().contains(site) => Some(Work::Train(TrainTask {
                job_id: r.job_id().to_string(),
                round: r.round(),
                attempt: r.attempt(),
                model: match &r.divergent() {
                    Some((target, other)) if target != site => other.clone(),
                    _ => r.model().clone(),
                },
                deadline_ms: r.deadline_ms(),
                evaluate_first: !r.evaluated().contains(site),
                secagg: r.secagg().as_ref().map(|s| s.info.clone()),
                evaluate_only: r.evaluate_only(),
            })),
            Stage::Evaluate if !r.evaluated().contains(site) => Some(Work::Evaluate(EvaluateTask {
                job_id: r.job_id().to_string(),
                round: r.round(),
                attempt: r.attempt(),
                model: r.model().clone(),
                deadline_ms: r.deadline_ms(),
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
            .ok_or_else(|| Status::failed_precondition(format!("job {} is not collecting updates now", h.job_id)))?;
        // (An attacking coordinator handing out divergent models skips the base check.)
        let divergent = matches!(crate::attack::current(), Some(crate::attack::Attack::Divergent(_)));
        r.admit(site, h, divergent)?;
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

    /// Folds a complete, verified update into the running sum. Runs on a blocking
    /// thread: the first pass (the digest, every value finite) reads the staged file
    /// without holding the round's lock; only the fold itself, which writes the shared
    /// sum, holds it.
    fn fold(&self, site: &str, upload_id: &str) -> Result<(), Status> {
        let path = self.upload_path(upload_id);
        let gone = || Status::failed_precondition("the round ended before the update completed");
        let h = {
            let mut round = lock(&self.round);
            let r = round.as_mut().ok_or_else(gone)?;
            let (_, h) = r.uploads.get(upload_id).cloned().ok_or_else(gone)?;
            still_wanted(r, site, &h)?;
            h
        };
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
        let mut round = lock(&self.round);
        let r = round.as_mut().ok_or_else(gone)?;
        // The round may have moved on (or the site re-sent) while the file was read.
        if r.uploads.get(upload_id).is_none_or(|(_, now)| *now != h) {
            return Err(gone());
        }
        still_wanted(r, site, &h)?;
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
        let mut reader = std::io::BufReader::with_capacity(CHUNK_SIZE, file);
        let mut word = [0u8; 4];
        // The file was checked above; only a concurrent change can fail a read here.
        let mut values = std::iter::from_fn(|| {
            Some(
                reader
                    .read_exact(&mut word)
                    .map(|()| f32::from_le_bytes(word))
                    .map_err(|e| format!("staged update {upload_id} changed while folding: {e}")),
            )
        });
        let folded = r.fold_plain(site, h.weight, &mut values);
        r.uploads.remove(upload_id);
        if let Err(refused) = folded {
            let _ = std::fs::remove_file(&path);
            return Err(refused.into());
        }
        drop(round);
        let _ = std::fs::remove_file(&path);
        info!(site, upload_id, "update folded into the round's sum");
        self.notify();
        Ok(())
    }
}

/// Whether `site`'s staged update for `h`'s attempt is still wanted by the round.
fn still_wanted(r: &RoundState, site: &str, h: &UploadHeader) -> Result<(), Status> {
    if r.done().contains(site) || r.dropped().contains(site) || h.round != r.round() || h.attempt != r.attempt() {
        return Err(Status::failed_precondition("the update is no longer wanted (site dropped or round over)"));
    }
    Ok(())
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
        let sa = r.session_mut().ok_or_else(|| Status::failed_precondition("this round has no session"))?;
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
        r.masked_input_done(site)?;
        r.uploads.remove(upload_id);
        let _ = std::fs::remove_file(path);
        info!(site, upload_id, "masked input folded into the session's sum");
        self.notify();
        Ok(())
    }
}

impl Coord {
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
}
