//! The fleet service (sites): heartbeats, polls, job decisions, downloads, uploads,
//! secure-aggregation stages, audit witnessing and releases.

use super::*;

/// The fleet service.
#[derive(Debug, Clone)]
pub struct Fleet(pub Arc<Coord>);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::Chunk, Status>> + Send>>;

/// Downloads a site may have open at once. An agent opens one; a site that opens more
/// is refused, so that one site cannot hold the [`MAX_TRANSFERS`] slots the fleet shares.
pub const DOWNLOADS_PER_SITE: u32 = 2;

/// Each site's open downloads.
#[derive(Debug, Default)]
pub struct DownloadsOpen(Mutex<HashMap<String, u32>>);

/// One open download; closing it (dropping) frees the site's count.
#[derive(Debug)]
pub struct OpenDownload(Arc<DownloadsOpen>, String);

impl DownloadsOpen {
    fn open(self: &Arc<Self>, site: &str) -> Result<OpenDownload, Status> {
        let mut open = lock(&self.0);
        let n = open.entry(site.to_string()).or_default();
        if *n >= DOWNLOADS_PER_SITE {
            return Err(Status::resource_exhausted(format!(
                "this site already has {DOWNLOADS_PER_SITE} downloads open; finish one first"
            )));
        }
        *n += 1;
        Ok(OpenDownload(self.clone(), site.to_string()))
    }
}

impl Drop for OpenDownload {
    fn drop(&mut self) {
        let mut open = lock(&(self.0).0);
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

#[tonic::async_trait]
impl pb::fleet_server::Fleet for Fleet {
    async fn heartbeat(&self, req: Request<pb::SiteStatus>) -> Result<Response<pb::HeartbeatReply>, Status> {
        let status = req.get_ref().clone();
        if status.stage == wire::PROBE_STAGE {
            // `maeum-site doctor`: check the certificate, but do not count the site as
            // online (no daemon is behind this call).
            self.0.identify(&req)?;
        } else {
            let site = self.0.site(&req, Some(&status))?;
            if let Some(gap) = self.0.heartbeat_interval(&site) {
                // The label's values are ours, not the site's words: a site cannot grow
                // the coordinator's metric series.
                let stage = wire::stage_label(&status.stage);
                self.0.metrics.heartbeat_interval.observe(stage, gap.as_secs_f64());
            }
        }
        let audit_size = self.0.audit.latest().map_or(0, |c| c.checkpoint.size);
        self.0.metrics.sites_online.set(self.0.online_sites().len() as i64);
        let current_release = lock(&self.0.current_release).clone();
        // Judged on the certificate this connection presents: once the site dials again
        // with its renewed one, the flag goes.
        // Due: expiring, or issued by a CA the consortium rolled over from.
        let renew_certificate = Coord::peer(&req).is_ok_and(|p| {
            crate::home::due(p.not_after)
                || (!self.0.ca_handovers.is_empty() && !maeum_pki::rollover::issued_by(&p.certificate, &self.0.ca_der))
        });
        Ok(Response::new(pb::HeartbeatReply {
            server_time_ms: now_ms(),
            audit_size,
            current_release,
            renew_certificate,
        }))
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
        // The decision and its `job_decision` entry are one durable write.
        let (_, decided, seq) = c
            .store
            .update_job_logged(&d.job_id, Rounds::Latest(0), &c.audit, |job| {
                anyhow::ensure!(job.state.is_active(), "job {} is {}", job.id, job.state.as_str());
                if let Some(prev) = job.decisions.get(&site) {
                    // A retried call is fine; changing one's mind is not.
                    anyhow::ensure!(prev.accept == d.accept, "site/{site} already decided on job {}", job.id);
                    return Ok((false, None));
                }
                job.decisions
                    .insert(site.clone(), Decision { accept: d.accept, reason: reason.clone(), at_ms: now_ms() });
                let event = Event::JobDecision {
                    job_id: job.id.clone(),
                    site: site.clone(),
                    accepted: d.accept,
                    reason: reason.clone(),
                };
                Ok((true, Some(event)))
            })
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        c.logged(seq);
        if decided {
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
        let mine = c.downloads_open.open(&site)?;
        let slot = c.download_slots.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut offset = r.offset;
        let (runtime, stall) = (tokio::runtime::Handle::current(), transfer_stall());
        tokio::task::spawn_blocking(move || {
            let _slot = (slot, mine);
            let send_err = |e: String| {
                let _ = tx.blocking_send(Err(Status::internal(e)));
            };
            // Pieces align to CHUNK_SIZE so their digests come from the blob's list (a
            // resumed download's first piece runs to the next boundary, hashed here).
            let pieces = match c.blobs.piece_digests(&digest) {
                Ok(p) => p,
                Err(e) => {
                    // The detail (a path on this host) stays in this log; the site hears why.
                    error!(site = %site, error = %format!("{e:#}"), "reading a model blob to serve it");
                    return send_err("the coordinator cannot read this model (see its log)".into());
                }
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
                let mut buf = match read_chunk(&mut file, CHUNK_SIZE - (offset % CHUNK_SIZE as u64) as usize) {
                    Ok(buf) => buf,
                    Err(e) => return send_err(format!("reading model: {e}")),
                };
                let n = buf.len();
                if n == 0 {
                    return;
                }
                if tamper_blob && offset == 0 {
                    // Past the safetensors header: the file still parses, the digest differs.
                    let at = buf.len() - 1;
                    buf[at] ^= 0x01;
                }
                let aligned = (offset.is_multiple_of(CHUNK_SIZE as u64) && !tamper_blob)
                    .then(|| pieces.get((offset / CHUNK_SIZE as u64) as usize))
                    .flatten();
                let chunk = match aligned {
                    Some(d) => pb::Chunk { offset, data: buf.into(), sha256: d.hex() },
                    None => wire::chunk(offset, buf),
                };
                // A site that takes no chunk for TRANSFER_STALL gives its slot up.
                match runtime.block_on(tx.send_timeout(Ok(chunk), stall)) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                        warn!(site = %site, offset, "model download stalled: the site took no data; ended");
                        return;
                    }
                    Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => return,
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
        let stalled = || Status::deadline_exceeded("the upload sent no data for too long (60 s); resume it");
        while let Some(chunk) =
            tokio::time::timeout(transfer_stall(), stream.message()).await.map_err(|_| stalled())??
        {
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
            // The stream itself is read as it comes (an unread stream would fill the
            // connection's HTTP/2 window and stall the site's heartbeats); the folds wait
            // for a slot.
            let _slot = c.fold_slots.clone().acquire_owned().await.map_err(|_| Status::unavailable("shutting down"))?;
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
            .filter(|s| s.job_id() == r.job_id && s.round() == r.round && s.attempt() == r.attempt)
            .ok_or_else(|| Status::failed_precondition("stale evaluation: not for the round in progress"))?;
        if digest != state.model().digest {
            return Err(Status::invalid_argument("evaluation of a model this round did not distribute"));
        }
        if counts.n_labels as usize != state.n_labels() {
            return Err(Status::invalid_argument(format!(
                "confusion over {} labels, the job has {}",
                counts.n_labels,
                state.n_labels()
            )));
        }
        let rows = counts.rows();
        if let Some(h) = &r.crisis_histogram {
            if state.crisis_classes().is_empty() {
                return Err(Status::invalid_argument("crisis_histogram: the job has no crisis class"));
            }
            let crisis: u64 = state.crisis_classes().iter().filter_map(|&i| rows.get(i)).flatten().sum();
            let reported: u64 = h.crisis.iter().sum();
            if reported != crisis {
                return Err(Status::invalid_argument(format!(
                    "crisis_histogram.crisis: counts {reported} crisis examples, the confusion matrix's crisis rows \
                     {crisis}"
                )));
            }
        }
        state.add_evaluation(&site, &rows, r.crisis_histogram.as_ref())?;
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
                    s.job_id() == r.job_id
                        && s.round() == r.round
                        && s.attempt() == r.attempt
                        && s.stage() == Stage::Train
                })
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "stale secure-aggregation message: job {} round {} attempt {} is not in progress",
                        r.job_id, r.round, r.attempt
                    ))
                })?;
            if state.dropped().contains(&site) {
                return Err(Status::failed_precondition(format!("site/{site} was dropped from this round")));
            }
            f(state)
        };
        let mut fresh_unmask = false;
        with_session(&mut |state| {
            let done = state.done().clone();
            let sa = state
                .session_mut()
                .ok_or_else(|| Status::failed_precondition("this round does not use secure aggregation"))?;
            if sa.rejoined(&site, &r.message) {
                warn!(
                    site = %site,
                    round = r.round,
                    attempt = r.attempt,
                    "site advertised new secure-aggregation keys for a session it had joined (it restarted); \
                     dropped from this attempt"
                );
                state.drop_for(&site, "restarted mid-session");
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
                let sa = state.session_mut().ok_or_else(|| Status::failed_precondition("no session"))?;
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
        let r = req.into_inner();
        let reply = tokio::task::spawn_blocking(move || c.witness_view(&site, r.known_size, r.known))
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
                .add_cosignature(r.size, &site, &r.signature, &c.home.trusted_cas_pem().map_err(internal)?, &cert)
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
            let window = (r.size, r.after, wire::audit::MAX_PROVEN);
            let (entries, next) = c.audit.prove_for(&site, &r.models, &r.jobs, &r.sites, window, r.key_rotations)?;
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
        msg.handovers = c.home.release_handovers().map_err(internal)?;
        msg.log_handovers = c.log_handovers.clone();
        if crate::attack::current() == Some(crate::attack::Attack::ForgeHandover) {
            forge_handover(&mut msg, &c.home).map_err(internal)?;
        }
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
        if rule == "local_failure" {
            warn!(site = %site, job = %job_id, round = r.round, attempt = r.attempt, detail = %detail, "site FAILED its work item");
        } else {
            warn!(site = %site, job = %job_id, round = r.round, attempt = r.attempt, rule, detail = %detail, "site REFUSED under its privacy policy");
        }
        // The site has left this attempt: stop waiting for it.
        let left = {
            let mut guard = lock(&c.round);
            guard.as_mut().is_some_and(|st| {
                st.job_id() == job_id
                    && st.round() == r.round
                    && st.attempt() == r.attempt
                    && st.drop_for(&site, format!("{rule}: {detail}"))
            })
        };
        if left {
            warn!(site = %site, round = r.round, attempt = r.attempt, "dropped from the round: the site left the attempt");
        }
        c.notify();
        Ok(Response::new(pb::Ack {}))
    }

    async fn renew_certificate(
        &self,
        req: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateReply>, Status> {
        // A certificate that expired within the grace may still renew itself.
        let (site, _) = self.0.identify_expired(&req)?;
        let (c, csr) = (self.0.clone(), req.into_inner().csr_pem);
        let renewed = tokio::task::spawn_blocking(move || crate::certs::renew_site(&c, &site, &csr));
        match renewed.await.map_err(|e| internal(e.into()))? {
            Ok((cert_pem, renewed)) => Ok(Response::new(pb::RenewCertificateReply { cert_pem, renewed })),
            Err(crate::certs::RenewError::Refused(why)) => Err(Status::permission_denied(why)),
            Err(crate::certs::RenewError::Failed(e)) => Err(internal(e)),
        }
    }

    async fn report_privacy(&self, req: Request<pb::PrivacyCharge>) -> Result<Response<pb::Ack>, Status> {
        let c = self.0.clone();
        let site = c.site(&req, None)?;
        let r = req.into_inner();
        let job_id = maeum_protocols::wire::job_id("privacy.job_id", r.job_id).map_err(Status::from)?;
        if c.store.job(&job_id, Rounds::Latest(0)).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("no job {job_id}")));
        }
        if maeum_protocols::job::PrivacyPlan::mode_of_mechanism(&r.mechanism).is_none() {
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
    fn witness_view(
        &self,
        site: &str,
        known: u64,
        known_head: Option<pb::AuditTreeHead>,
    ) -> Result<pb::AuditCheckpointReply, Status> {
        let latest = self.audit.latest().ok_or_else(|| Status::unavailable("the audit log has no checkpoint yet"))?;
        let size = latest.checkpoint.size;
        let origin = self.audit.origin();
        if known > size
            && let Some(head) = known_head
            && let Ok(head) = wire::audit::TreeHead::from_pb(&origin, head)
            && head.signed.checkpoint.size == known
            && self.audit.signed_by_this_log(&head.signed)
        {
            // Proof under this log's own key that it once had `known` entries: the state
            // was rolled back (a whole home restored from an older backup, say). The
            // seal keeps the checkpoint, so no later start serves this log either, and
            // the coordinator stops now. The site still gets the latest checkpoint
            // below: with its own, the signed evidence it keeps (AUD-10).
            let root = maeum_tlog::hex(&head.signed.checkpoint.root);
            let why = format!(
                "site {site} holds a checkpoint of {known} entries signed by this log, which has only {size}: this \
                 coordinator's state was rolled back; it stops serving (restore HOME from a backup at least that new)"
            );
            if let Err(e) =
                self.store.db().witness(crate::storage::Witnessed { size: known, root, site: site.to_owned() })
            {
                warn!(error = %format!("{e:#}"), "could not keep the witnessed checkpoint in the state seal");
            }
            self.stop_for(why);
        }
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
            return Ok(wire::audit::CheckpointReply {
                latest,
                consistency: Vec::new(),
                since: Vec::new(),
                handovers: self.log_handovers.clone(),
                ca_handovers: self.ca_handovers.clone(),
            }
            .to_pb(&origin));
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
        let (signed, handovers) = if crate::attack::current() == Some(crate::attack::Attack::UnloggedLogRotation) {
            unlogged_log_rotation(&self.home, signed, self.log_handovers.clone()).map_err(internal)?
        } else {
            (signed, self.log_handovers.clone())
        };
        let mut ca_handovers = self.ca_handovers.clone();
        if crate::attack::current() == Some(crate::attack::Attack::UnloggedCaRotation) {
            ca_handovers.push(unlogged_ca_rotation(&self.home).map_err(internal)?);
        }
        let latest = wire::audit::TreeHead { signed, cosignatures: Vec::new() };
        Ok(wire::audit::CheckpointReply { latest, consistency, since, handovers, ca_handovers }.to_pb(&origin))
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

/// The `unlogged-log-rotation` attack: the serving host holds the log key, so it can
/// sign a real handover to a key of its own; it shows sites that rotation, and the
/// latest checkpoint signed with its key, without logging the rotation.
fn unlogged_log_rotation(
    home: &Home,
    latest: maeum_tlog::SignedCheckpoint,
    mut chain: Vec<maeum_tlog::handover::KeyHandover>,
) -> anyhow::Result<(maeum_tlog::SignedCheckpoint, Vec<maeum_tlog::handover::KeyHandover>)> {
    let (_, mine) = crate::home::generate_ed25519("attacker's")?;
    let consortium = home.consortium()?.name;
    chain.push(maeum_tlog::handover::KeyHandover::make(
        maeum_tlog::handover::Role::Log,
        &consortium,
        &home.signing_key()?,
        &mine,
    ));
    warn!(size = latest.checkpoint.size, "ATTACK: showing a rotation of the log key that the log does not record");
    Ok((latest.checkpoint.sign(&mine), chain))
}

/// The `unlogged-ca-rotation` attack: the serving host holds the CA key, so it can
/// sign a real handover to a CA of its own; it shows sites that rollover without
/// logging it (a CA the auditors would never see).
fn unlogged_ca_rotation(home: &Home) -> anyhow::Result<maeum_pki::rollover::CaHandover> {
    let consortium = home.consortium()?.name;
    let mine = maeum_pki::identity::Ca::successor(&consortium, 99, 30)?;
    warn!("ATTACK: showing a rollover of the CA that the log does not record");
    Ok(maeum_pki::rollover::CaHandover::make(&consortium, &home.ca()?, &mine)?)
}

/// The `forge-handover` attack: a compromised serving host (the signing key, not the
/// release key) hands sites over to a release key of its own and signs the release
/// with it. The old key's signature is the best it can make: by the signing key.
fn forge_handover(msg: &mut wire::release::ReleaseMsg, home: &Home) -> anyhow::Result<()> {
    use ring::signature::KeyPair as _;
    let Some((_, current)) = home.release_verify_key()? else { return Ok(()) };
    let (_, mine) = crate::home::generate_ed25519("attacker's")?;
    let signing = home.signing_key()?;
    let new: [u8; 32] = mine.public_key().as_ref().try_into()?;
    let statement = maeum_tlog::handover::KeyHandover::statement(
        maeum_tlog::handover::Role::Release,
        &msg.manifest.consortium,
        &current,
        &new,
    );
    let h = maeum_tlog::handover::KeyHandover {
        old_key: maeum_tlog::hex(&current),
        new_key: maeum_tlog::hex(&new),
        old_signature: maeum_tlog::hex(signing.sign(&statement).as_ref()),
        new_signature: maeum_tlog::hex(mine.sign(&statement).as_ref()),
    };
    warn!(version = msg.manifest.version, "ATTACK: serving a forged release-key handover");
    msg.handovers.push(h);
    msg.release_signature = msg.manifest.sign(&mine);
    Ok(())
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
            // A host holding both keys: only the log can catch this one.
            if let Some(key) = home.release_key()? {
                msg.release_signature = msg.manifest.sign(&key);
            }
        }
        other => anyhow::bail!("unknown tamper mode {other:?}"),
    }
    Ok(())
}
