//! One work item: download and verify the round's model, evaluate, train, and upload a
//! plaintext update (debugging jobs; secure rounds are in `secure`).

use super::*;

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
    // The digest is taken as the bytes arrive (one pass, not a second read of the whole
    // file); a prefix already on disk, from an earlier run, is hashed from the file first.
    let mut hashed: (Hasher, u64) = (Hasher::default(), 0);
    for _ in 0..5 {
        // Local write errors (a full disk) end the download, naming the file; only
        // the stream's errors are resumed.
        let writing = || format!("writing the model download {}", part.display());
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&part).with_context(writing)?;
        let mut offset = file.metadata().with_context(writing)?.len();
        if offset > model.size {
            file.set_len(0).with_context(writing)?;
            offset = 0;
        }
        if hashed.1 != offset {
            let to_hash = part.clone();
            // O(model) reads: off the runtime's workers.
            hashed = tokio::task::spawn_blocking(move || -> std::io::Result<(Hasher, u64)> {
                let mut hasher = Hasher::default();
                let mut f = std::fs::File::open(&to_hash)?.take(offset);
                let mut buf = vec![0u8; CHUNK_SIZE];
                let mut read = 0;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    read += n as u64;
                }
                Ok((hasher, read))
            })
            .await?
            .with_context(|| format!("reading the partial download {}", part.display()))?;
        }
        let mut write_failed: Option<std::io::Error> = None;
        if offset < model.size {
            let mut stream =
                client.download(pb::DownloadRequest { digest: model.digest.hex(), offset }).await?.into_inner();
            let result: Result<()> = async {
                while let Some(c) = stream.next().await {
                    let c = c?;
                    wire::check_chunk(offset, model.size, c.offset, &c.data, &c.sha256)?;
                    if let Err(e) = file.write_all(&c.data) {
                        write_failed = Some(e);
                        break;
                    }
                    hashed.0.update(&c.data);
                    hashed.1 += c.data.len() as u64;
                    agent.metrics.bytes_received.inc_by(c.data.len() as u64);
                    offset += c.data.len() as u64;
                }
                Ok(())
            }
            .await;
            if let Some(e) = write_failed {
                return Err(anyhow::Error::new(e).context(writing()));
            }
            file.sync_data().with_context(writing)?;
            if let Err(e) = result {
                warn!(error = %format!("{e:#}"), offset, "model download interrupted; resuming");
                continue;
            }
        }
        let got = std::mem::take(&mut hashed).0.finish();
        if got != model.digest {
            agent.metrics.verification_failures.inc("model_digest");
            let _ = std::fs::remove_file(&part);
            return Err(DigestMismatch { want: model.digest.hex(), got: got.hex() }.into());
        }
        std::fs::rename(&part, &path).with_context(|| format!("renaming {} into place", part.display()))?;
        agent.metrics.stage("download", started.elapsed());
        info!(model = %model.digest, bytes = model.size, "model downloaded and verified");
        return Ok(path);
    }
    bail!("model download kept failing")
}

/// Round models a site keeps in HOME/models besides the one in use and the installed
/// releases' (a retried attempt or a late evaluation may want the one before).
pub(crate) const KEEP_ROUND_MODELS: usize = 2;

/// Removes from HOME/models the round models a long job leaves behind (a 100M-parameter
/// model is 400 MB a round): everything but `in_use`, the models of installed releases
/// (offline inference and rollback need them) and the [`KEEP_ROUND_MODELS`] newest
/// others. Partial downloads of other models go too. Skipped while a release install is
/// in flight (its blob is not yet named by a release file). Returns files and bytes.
pub(crate) fn prune_models(agent: &Agent, in_use: &Digest) -> Result<(usize, u64)> {
    if agent.installing.load(Ordering::SeqCst) {
        return Ok((0, 0));
    }
    let releases = crate::releases::installed(&agent.home)?;
    let mut keep: std::collections::HashSet<String> =
        releases.iter().map(|r| r.manifest.model_sha256.clone()).collect();
    keep.insert(in_use.hex());
    let (files, bytes) = prune_dir(&agent.home.path("models"), &keep, KEEP_ROUND_MODELS)?;
    if files > 0 {
        debug!(files, bytes, "removed round models no longer needed");
    }
    Ok((files, bytes))
}

/// [`prune_models`] on a directory: removes DIGEST.safetensors and DIGEST.part files
/// whose digest is not in `keep`, but the `newest` most recent whole models.
fn prune_dir(dir: &Path, keep: &std::collections::HashSet<String>, newest: usize) -> Result<(usize, u64)> {
    let mut rounds = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let (digest, partial) = match (name.strip_suffix(".safetensors"), name.strip_suffix(".part")) {
            (Some(d), _) => (d.to_owned(), false),
            (None, Some(d)) => (d.to_owned(), true),
            _ => continue,
        };
        if keep.contains(&digest) {
            continue;
        }
        let meta = e.metadata().with_context(|| format!("reading {}", e.path().display()))?;
        rounds.push((partial, meta.modified().ok(), meta.len(), e.path()));
    }
    // Whole models newest first; the first KEEP_ROUND_MODELS of them stay.
    rounds.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let (mut files, mut bytes) = (0, 0);
    for (i, (partial, _, len, path)) in rounds.into_iter().enumerate() {
        if !partial && i < newest {
            continue;
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        (files, bytes) = (files + 1, bytes + len);
    }
    Ok((files, bytes))
}

/// Downloads the round's model and makes room: [`prune_models`] (whose failure is only
/// logged; the round goes on).
async fn download_pruning(agent: &Agent, client: &mut Client, model: &ModelRef) -> Result<PathBuf> {
    let path = download(agent, client, model).await?;
    if let Err(e) = prune_models(agent, &model.digest) {
        warn!(error = %format!("{e:#}"), "removing old round models failed; they stay on disk");
    }
    Ok(path)
}

/// [`load_model`] on a blocking thread (an O(model) read and parse).
pub(super) async fn load_model_off(path: PathBuf, job: &JobSpec, model: &ModelRef) -> Result<(ModelSpec, FlatParams)> {
    let (job, model) = (job.clone(), model.clone());
    tokio::task::spawn_blocking(move || load_model(&path, &job, &model)).await?
}

/// Loads a downloaded model and checks it is the job's model.
pub(super) fn load_model(path: &Path, job: &JobSpec, model: &ModelRef) -> Result<(ModelSpec, FlatParams)> {
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
pub(crate) struct EvalOf<'a> {
    pub(crate) job_id: &'a str,
    pub(crate) round: u32,
    pub(crate) attempt: u32,
    pub(crate) model: &'a ModelRef,
}

/// Evaluates the round's model on the held-out records (on a blocking thread) and keeps
/// this site's own counts in HOME/evaluations.jsonl; returns the confusion matrix and
/// the crisis histogram (`None` without a crisis class).
pub(crate) async fn evaluate_and_keep(
    agent: &Agent,
    of: &EvalOf<'_>,
    spec: &ModelSpec,
    params: FlatParams,
    data: Arc<Prepared2>,
) -> Result<(maeum_models::metrics::Confusion, Option<maeum_models::metrics::CrisisHistogram>)> {
    agent.set(|s| s.stage = "evaluating".into());
    let spec = spec.clone();
    let started = std::time::Instant::now();
    let (confusion, histogram) = tokio::task::spawn_blocking(move || {
        let confusion = spec.evaluate(&params, &data.test)?;
        let histogram = crisis_histogram(&spec, &params, &data.test)?;
        anyhow::Ok((confusion, histogram))
    })
    .await??;
    agent.metrics.stage("evaluate", started.elapsed());
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
    Ok((confusion, histogram))
}

pub(super) async fn report_eval(
    agent: &Agent,
    client: &mut Client,
    of: EvalOf<'_>,
    spec: &ModelSpec,
    params: FlatParams,
    data: Arc<Prepared2>,
) -> Result<()> {
    let (confusion, crisis_histogram) = evaluate_and_keep(agent, &of, spec, params, data).await?;
    let counts = ConfusionCounts::from_rows(&confusion.counts);
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

pub(super) async fn evaluate(agent: &Agent, client: &mut Client, t: EvaluateTask) -> Result<()> {
    agent.set(|s| {
        s.job_id = t.job_id.clone();
        s.round = t.round;
    });
    let job = agent.job(&t.job_id)?;
    let path = download_pruning(agent, client, &t.model).await?;
    let (spec, params) = load_model_off(path, &job, &t.model).await?;
    agent.note_model(&t.job_id, t.round, &t.model);
    let data = agent.prepared(&t.job_id, &spec).await?;
    let of = EvalOf { job_id: &t.job_id, round: t.round, attempt: t.attempt, model: &t.model };
    report_eval(agent, client, of, &spec, params, data).await?;
    agent.set(|s| s.last_model = t.model.digest.hex());
    info!(job = %t.job_id, round = t.round, "final evaluation reported");
    Ok(())
}

pub(super) fn site_salt(site_id: &str) -> u64 {
    site_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

pub(super) async fn train(agent: &Agent, client: &mut Client, t: TrainTask) -> Result<()> {
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
    let path = download_pruning(agent, client, &t.model).await?;
    let (spec, params) = load_model_off(path, job, &t.model).await?;
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
    let started = std::time::Instant::now();
    // The round's model goes through the blocking task and back: no copy of it is made
    // (at 100M parameters a copy is 400 MB).
    let (global, local, report, weight) = match job.privacy_plan()? {
        None => {
            agent.set(|s| s.stage = "training".into());
            let (global, (local, report)) = tokio::task::spawn_blocking(move || {
                let trained = spec.train(&global, &data.train, &cfg, &mut ());
                trained.map(|t| (global, t))
            })
            .await??;
            (global, local, report, agent.data.train.len() as u64)
        }
        Some(plan) if plan.distributed().is_some() => {
            // Its round is one step whose words travel only masked (`distributed_words`).
            bail!("a distributed-DP job's update is never trained or sent in the clear")
        }
        Some(plan) => {
            let base = t.model.digest.hex();
            charge_round(agent, client, t, &plan).await?;
            agent.set(|s| s.stage = "training (DP-SGD)".into());
            let mut rng = crate::ledger::noise_rng(&agent.home, &t.job_id, t.round, &base)?;
            let mechanism = plan.round_mechanism();
            let (global, (local, report)) = tokio::task::spawn_blocking(move || {
                let trained = spec.train_dp(&global, &data.train, &cfg, &mechanism, &mut rng, &mut ());
                trained.map(|t| (global, t))
            })
            .await??;
            (global, local, report, 1)
        }
    };
    agent.metrics.stage("train", started.elapsed());
    info!(job = %t.job_id, round = t.round, steps = report.steps, seconds = started.elapsed().as_secs_f32(), "local training done");
    // Δ = local − global in the trained vector's own memory.
    let mut delta = local.into_values();
    delta.iter_mut().zip(global.values()).for_each(|(l, g)| *l -= g);
    Ok((delta, weight))
}

/// Charges this round of a DP job to the privacy ledger, durably, before the records
/// are touched, and reports the charge for the audit log (on every attempt, a retry's
/// unchanged charge included: a site killed between the ledger's fsync and the report
/// still gets the charge into the log). A charge the ledger refuses is refused to the
/// coordinator by rule.
pub(crate) async fn charge_round(
    agent: &Agent,
    client: &mut Client,
    t: &TrainTask,
    plan: &maeum_protocols::job::PrivacyPlan,
) -> Result<()> {
    let base = t.model.digest.hex();
    let charged = match crate::ledger::charge(&agent.home, &t.job_id, t.round, &base, plan) {
        Ok(c) => c,
        Err(refusal) => {
            agent.refuse(client, &t.job_id, t.round, t.attempt, &refusal).await;
            return Err(refusal.into());
        }
    };
    info!(job = %t.job_id, round = t.round, epsilon = charged.epsilon_job, new = charged.new, "privacy ledger charged");
    let report = pb::PrivacyCharge {
        job_id: t.job_id.clone(),
        round: t.round,
        mechanism: plan.mode.mechanism().into(),
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
    Ok(())
}

/// This site's contribution to a round of a `distributed` DP job: the round is charged
/// first, then the clipped-gradient sum over a Poisson sample of the local records is
/// bounded, scaled, rounded and given this site's Skellam noise share
/// (`maeum_models::ddp`), all drawn from the site's secret noise key. The words are
/// only ever sent masked; the batch size stays here.
pub(crate) async fn distributed_words(
    agent: &Agent,
    client: &mut Client,
    t: &TrainTask,
    job: &JobSpec,
    plan: &maeum_protocols::job::PrivacyPlan,
    m: RoundModel,
) -> Result<Vec<u32>> {
    let Some(mechanism) = plan.distributed() else { bail!("the job's privacy mode is not distributed") };
    charge_round(agent, client, t, plan).await?;
    let RoundModel { spec, params, data } = m;
    agent.set(|s| s.stage = "training (distributed DP step)".into());
    let started = std::time::Instant::now();
    let mut rng = crate::ledger::noise_rng(&agent.home, &t.job_id, t.round, &t.model.digest.hex())?;
    let dropout = job.train.dropout;
    let (words, _, bounded) = tokio::task::spawn_blocking(move || {
        spec.distributed_contribution(&params, &data.train, dropout, &mechanism, &mut rng)
    })
    .await??;
    agent.metrics.stage("train", started.elapsed());
    if bounded {
        info!(job = %t.job_id, round = t.round, bound = mechanism.clip * f64::from(mechanism.max_batch), "clipped-gradient sum scaled down to clip × max_batch");
    }
    info!(job = %t.job_id, round = t.round, seconds = started.elapsed().as_secs_f32(), "distributed DP step done");
    Ok(words)
}

/// The on-disk form of an update's header (HOME/work/NAME.json).
pub(super) fn header_json(h: &UploadHeader) -> String {
    serde_json::json!({
        "job_id": h.job_id, "round": h.round, "attempt": h.attempt, "base_digest": h.base_digest.hex(),
        "layout_digest": h.layout_digest.hex(), "num_params": h.num_params, "weight": h.weight,
        "sha256": h.sha256.hex(),
    })
    .to_string()
}

pub(super) fn stored_header(json: &str) -> Option<UploadHeader> {
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

/// How long an upload keeps trying while it makes no progress: a WAN link can be down
/// for minutes. The coordinator ends it sooner when the update is no longer wanted (a
/// round that moved on answers with an error that is not retried).
pub(crate) const UPLOAD_PATIENCE: Duration = Duration::from_secs(600);

/// Failures an upload rides out: the link or the coordinator went away mid-call.
fn transient(e: &RpcStatus) -> bool {
    matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DataLoss | Code::DeadlineExceeded)
}

/// Uploads an update file, resuming from what the coordinator already holds. A broken
/// link is retried with backoff (0.5 s doubling to 10 s) for as long as an attempt
/// makes progress, and for [`UPLOAD_PATIENCE`] without any; the coordinator's
/// `confirmed` count means no byte is sent, or counted, twice.
pub async fn upload(client: &mut Client, header: &UploadHeader, path: &Path) -> Result<()> {
    let (mut backoff, mut best, mut progress_at) = (Duration::from_millis(500), 0u64, std::time::Instant::now());
    loop {
        let why = match upload_once(client, header, path).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err((confirmed, why))) => {
                if confirmed > best {
                    (best, progress_at, backoff) = (confirmed, std::time::Instant::now(), Duration::from_millis(500));
                }
                why
            }
            Err(e) => return Err(e),
        };
        if progress_at.elapsed() > UPLOAD_PATIENCE {
            return Err(why.context(format!("no upload progress for {} s", UPLOAD_PATIENCE.as_secs())));
        }
        warn!(error = %format!("{why:#}"), confirmed = best, retry_in_ms = backoff.as_millis() as u64, "upload interrupted; resuming");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// One attempt: `Ok(Ok(()))` when the coordinator holds the whole update,
/// `Ok(Err((confirmed, why)))` when it broke off in a way worth retrying (`confirmed`:
/// the bytes the coordinator held when last heard, 0 if unknown), `Err` otherwise.
async fn upload_once(
    client: &mut Client,
    header: &UploadHeader,
    path: &Path,
) -> Result<std::result::Result<(), (u64, anyhow::Error)>> {
    let state = match client.begin_upload(pb::UploadHeader::from(header)).await {
        Ok(s) => s.into_inner(),
        Err(e) if transient(&e) => return Ok(Err((0, anyhow::anyhow!("{}", describe(&e))))),
        Err(e) => return Err(e.into()),
    };
    let mut offset = state.confirmed;
    let started_at = offset;
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
    Ok(match result {
        Ok(s) if s.get_ref().complete => Ok(()),
        Ok(s) => {
            let confirmed = s.get_ref().confirmed;
            Err((confirmed, anyhow::anyhow!("upload stopped at {confirmed} of {total} bytes")))
        }
        // The coordinator held at least what it confirmed when this attempt began.
        Err(e) if transient(&e) => Err((started_at, anyhow::anyhow!("{}", describe(&e)))),
        Err(e) => return Err(e.into()),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_releases_the_model_in_use_and_the_newest_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, age_s: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, name.as_bytes()).unwrap();
            let when = std::time::SystemTime::now() - Duration::from_secs(age_s);
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(when).unwrap();
        };
        for (i, name) in ["r1", "r2", "r3", "r4", "r5"].iter().enumerate() {
            write(&format!("{name}.safetensors"), 100 - 10 * i as u64);
        }
        write("release.safetensors", 1000);
        write("r0.part", 500);
        write("r5.part", 1);
        write("notes.txt", 1);
        let keep: std::collections::HashSet<String> = ["release".to_owned(), "r5".to_owned()].into();
        let (files, _) = prune_dir(dir.path(), &keep, 2).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        left.sort();
        // r5 is in use (its partial download too), r4 and r3 are the newest others.
        assert_eq!(
            left,
            ["notes.txt", "r3.safetensors", "r4.safetensors", "r5.part", "r5.safetensors", "release.safetensors"]
        );
        assert_eq!(files, 3, "r1, r2 and r0.part");
    }
}
