//! The control service (operators): jobs, sites, the audit log, releases and models.

use super::*;

/// The control service (operator CLI).
#[derive(Debug, Clone)]
pub struct Control(pub Arc<Coord>);

/// Rounds in a `JobInfo` when the request names no limit, and the most it may name.
const ROUNDS_SHOWN: u32 = 100;
const ROUNDS_SHOWN_MAX: u32 = 1000;

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::JobInfo, Status>> + Send>>;

/// Stored confusion rows as the control API shows them.
fn confusion(rows: &Option<Vec<Vec<u64>>>) -> Option<pb::Confusion> {
    rows.as_ref().map(|r| (&ConfusionCounts::from_rows(r)).into())
}

/// One round as the control API shows it.
fn round_info(h: &crate::store::RoundRecord) -> pb::RoundInfo {
    pb::RoundInfo {
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
    }
}

impl Coord {
    pub fn job_info(&self, j: &JobRecord) -> pb::JobInfo {
        let current = lock(&self.current_job).as_deref() == Some(j.id.as_str());
        // A full disk pauses the job in progress: shown as such, not as running.
        let paused = current && j.state.is_active() && self.store.db().disk_full();
        let now = now_ms();
        pb::JobInfo {
            job_id: j.id.clone(),
            name: j.spec.name.clone(),
            state: if paused { "paused".into() } else { j.state.as_str().into() },
            rounds: j.spec.rounds,
            completed_rounds: j.completed_rounds(),
            activity: match (current, lock(&self.activity).clone()) {
                (false, _) => String::new(),
                (true, a) if paused && !a.starts_with("paused:") => {
                    format!("paused: the disk is full (the state database cannot write); {a}")
                }
                (true, a) => a,
            },
            history: j.history.iter().map(round_info).collect(),
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
            excluded: j
                .excluded
                .iter()
                .map(|(s, why)| format!("{s}: {why}"))
                .chain(
                    j.strikes
                        .keys()
                        .filter_map(|s| Some(format!("{s}: sits out {}", j.benched(s, now)?.sitting_out(now)))),
                )
                .collect(),
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

    /// The job `r` names, with the page of its rounds `r` asks for (see `JobRef`).
    fn job_view(&self, r: &pb::JobRef) -> Result<pb::JobInfo, Status> {
        let id = &r.job_id;
        let limit = if r.rounds_limit == 0 { ROUNDS_SHOWN } else { r.rounds_limit.min(ROUNDS_SHOWN_MAX) };
        let not_found = || Status::not_found(format!("no job {id}"));
        if r.rounds_before == 0 {
            let job = self.store.job(id, Rounds::Latest(limit)).map_err(internal)?.ok_or_else(not_found)?;
            return Ok(self.job_info(&job));
        }
        let head = self.store.job(id, Rounds::Latest(0)).map_err(internal)?.ok_or_else(not_found)?;
        let page = self.store.job_rounds(id, r.rounds_before, limit).map_err(internal)?.ok_or_else(not_found)?;
        Ok(pb::JobInfo { history: page.iter().map(round_info).collect(), ..self.job_info(&head) })
    }

    fn release_info(&self, r: &crate::registry::ReleaseRecord, current: u32) -> Result<pb::ReleaseInfo, Status> {
        let consortium = self.home.consortium().map_err(internal)?.name;
        let mut msg = r.message(&consortium).map_err(internal)?;
        msg.handovers = self.home.release_handovers().map_err(internal)?;
        let release_key_signed = crate::registry::release_key_signed(&self.home, r).map_err(internal)?.unwrap_or(false);
        Ok(pb::ReleaseInfo {
            release_key_signed,
            release: Some(msg.to_pb()),
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
        let job = JobRecord::submitted(format!("{}-{n}", spec.name), spec, r.toml, now_ms());
        // The job and its `job_submitted` entry are one durable write: a site never
        // finds a job the log does not hold.
        let submitted = Event::JobSubmitted {
            job_id: job.id.clone(),
            name: job.spec.name.clone(),
            spec_sha256: job.spec_sha256.clone(),
            operator: operator.clone(),
        };
        let seq = c.store.insert_job_logged(&job, &c.audit, submitted).map_err(internal)?;
        c.logged(Some(seq));
        // Signed now: a site proves the job_submitted entry before it decides.
        c.audit.checkpoint().map_err(internal)?;
        info!(job = %job.id, operator, sha256 = %job.spec_sha256, "job submitted");
        c.notify();
        Ok(Response::new(c.job_info(&job)))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::JobList>, Status> {
        let c = &self.0;
        c.operator(&req)?;
        let jobs = c.store.jobs(Rounds::LISTED).map_err(internal)?;
        Ok(Response::new(pb::JobList { jobs: jobs.iter().map(|j| c.job_info(j)).collect() }))
    }

    async fn get_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobInfo>, Status> {
        let c = &self.0;
        c.operator(&req)?;
        Ok(Response::new(c.job_view(req.get_ref())?))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, req: Request<pb::JobRef>) -> Result<Response<JobStream>, Status> {
        let c = self.0.clone();
        c.operator(&req)?;
        let r = req.into_inner();
        let first = c.job_view(&r)?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut changed = c.changed.subscribe();
        tokio::spawn(async move {
            let (mut last, mut next): (Option<pb::JobInfo>, Option<pb::JobInfo>) = (None, Some(first));
            loop {
                let info = match next.take().map_or_else(|| c.job_view(&r), Ok) {
                    Ok(info) => info,
                    Err(e) if e.code() == tonic::Code::NotFound => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
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
        match c.store.job(id, Rounds::Latest(0)).map_err(internal)? {
            None => return Err(Status::not_found(format!("no job {id}"))),
            Some(ended) if !ended.state.is_active() => {
                return Err(Status::failed_precondition(format!("job {id} is already {}", ended.state.as_str())));
            }
            Some(_) => {}
        }
        // Aborted and logged (`job_finished`) in one durable write.
        crate::rounds::finish(c, id, JobState::Aborted, format!("aborted by operator/{operator}")).map_err(internal)?;
        c.record(Event::OperatorCommand {
            operator: operator.clone(),
            command: format!("jobs abort {id}"),
            result: "aborted".into(),
        })
        .map_err(internal)?;
        info!(job = %id, operator, "job aborted");
        c.notify();
        Ok(Response::new(c.job_view(req.get_ref())?))
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
            c.audit.export(&c.home.first_ca_pem()?, &witnesses)
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
        .map_err(|e| {
            match (e.downcast_ref::<crate::registry::GatesFailed>(), e.downcast_ref::<crate::registry::Unsigned>()) {
                (Some(g), _) => Status::failed_precondition(g.to_string()),
                (_, Some(u)) => Status::failed_precondition(u.to_string()),
                _ => internal(e),
            }
        })?;
        c.refresh_current_release().map_err(internal)?;
        info!(version = r.version, operator = %p.operator, promotion = p.id, "release promoted; sites install it next");
        Ok(Response::new(c.release_info(&r, r.version)?))
    }

    async fn sign_release(&self, req: Request<pb::SignReleaseRequest>) -> Result<Response<pb::ReleaseInfo>, Status> {
        let c = self.0.clone();
        let operator = c.operator(&req)?;
        let r = req.into_inner();
        if r.release_signature.len() != 64 {
            return Err(Status::invalid_argument(format!(
                "release_signature: expected 64 bytes, got {}",
                r.release_signature.len()
            )));
        }
        c.registry.find(&r.version).map_err(|e| Status::not_found(format!("{e:#}")))?;
        let c2 = c.clone();
        let signed = tokio::task::spawn_blocking(move || {
            crate::registry::sign_release(&c2, &r.version, &r.release_signature, &operator)
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| match e.downcast_ref::<crate::registry::SignatureRefused>() {
            Some(why) => Status::invalid_argument(why.to_string()),
            None => internal(e),
        })?;
        info!(version = signed.version, "release signed with the release key; it can be promoted");
        let current = c.registry.current().map_err(internal)?.map_or(0, |(r, _)| r.version);
        Ok(Response::new(c.release_info(&signed, current)?))
    }

    async fn rotate_release_key(&self, req: Request<pb::KeyHandover>) -> Result<Response<pb::ReleaseKeyInfo>, Status> {
        let c = self.0.clone();
        let operator = c.operator(&req)?;
        let h = crate::release_key::from_request(req.into_inner()).map_err(Status::from)?;
        let c2 = c.clone();
        let keys = tokio::task::spawn_blocking(move || crate::release_key::rotate(&c2, &h, &operator))
            .await
            .map_err(|e| internal(e.into()))?
            .map_err(|e| match e.downcast_ref::<crate::release_key::RotationRefused>() {
                Some(why) => Status::invalid_argument(why.to_string()),
                None => internal(e),
            })?;
        info!(
            rotations = keys.chain.len(),
            key = %&maeum_tlog::hex(&keys.current)[..16],
            "the release key was rotated; sites follow with the next release"
        );
        Ok(Response::new(keys.to_pb()))
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
        c.store.put_site(&rec).map_err(internal)?;
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
