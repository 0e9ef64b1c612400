//! `maeum-coordinator demo`: a whole federation on one machine, for evaluation.
//!
//! Provisions a consortium in a work dir, splits the data non-IID across N sites, starts
//! the coordinator and each site agent as separate OS processes talking mTLS over
//! loopback, runs a training job, then compares the federated model with centralized
//! training on the union of the sites' training data and with each site training alone.
//! All three are evaluated on the union of the sites' held-out splits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_stream::StreamExt;

use maeum_models::data::{self, Example, LabelSet, ReadOptions};
use maeum_models::metrics::Confusion;
use maeum_models::model::{ModelSpec, Prepared, TextClassifierConfig};
use maeum_models::nn::TrainConfig;
use maeum_protocols::wire::pb;

use crate::{client, home};

mod fleet;
mod report;
use fleet::*;
use report::*;

/// Defaults chosen with `cargo bench -p maeum-models --bench fedsim` (docs/benchmarks.md).
pub const DEFAULT_ROUNDS: u32 = 10;
pub const DEFAULT_LOCAL_EPOCHS: usize = 2;

/// How long the demo's sites take to embed the corpus with `encoder`, on two cores
/// (docs/benchmarks.md).
fn embed_time(encoder: &str) -> &'static str {
    if encoder == "multilingual-e5-small" { "about 10 minutes" } else { "about 4 minutes" }
}

/// Site learning rate (Adam) for the demo's job.
pub const DEFAULT_SITE_LR: f64 = 0.005;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Number of sites (separate site-agent processes).
    #[arg(long, default_value_t = 7)]
    pub sites: usize,
    /// Training rounds.
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    pub rounds: u32,
    /// Local epochs per round at each site.
    #[arg(long, default_value_t = DEFAULT_LOCAL_EPOCHS)]
    pub local_epochs: usize,
    /// Dirichlet α of the non-IID label split (smaller = more skewed sites).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Text/label JSONL or CSV to federate. Default: the public Reddit Mental Health
    /// Dataset at data/rmhd.jsonl, fetched when missing (run from the repository root).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Where to put the consortium, the sites, logs and results (default: work/demo-TIME).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Seed for the split, the model and training.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Skip the centralized and local-only baselines.
    #[arg(long)]
    pub no_baselines: bool,
    /// End with one JSON object on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Aggregate in plaintext instead of with secure aggregation (the coordinator then
    /// sees every site's update). Only for comparing accuracy and speed.
    #[arg(long)]
    pub insecure_plaintext_aggregation: bool,
    /// Record-level differential privacy (docs/protocols/privacy.md): `local` makes every
    /// site run DP-SGD with the full noise; `distributed` makes each round one DP-SGD step
    /// over every site's records, each site adding a share of the noise under secure
    /// aggregation (the job then uses FedAdam on the server, and min_sites is all sites
    /// but one); `none` trains without it.
    #[arg(long, value_name = "MODE", default_value = "none", value_parser = ["none", "local", "distributed"])]
    pub privacy: String,
    /// With `--privacy`: the target ε per record per site over the whole job.
    #[arg(long, default_value_t = 8.0)]
    pub epsilon: f64,
    /// With `--privacy`: δ of the guarantee.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// With `--privacy`: the Poisson sampling rate of each DP-SGD step (default 0.05 for
    /// `local`, 1 for `distributed`).
    #[arg(long)]
    pub sample_rate: Option<f64>,
    /// The model: `text-classifier` (hashed n-grams, trained from scratch),
    /// `encoder-head` (the pretrained all-MiniLM-L6-v2 encoder, frozen, and a trained
    /// head; each site embeds its records once, which takes a few minutes) or
    /// `encoder-lora` (the encoder's top layers fine-tuned with FFA-LoRA adapters, and
    /// the head; much slower: see docs/benchmarks.md; implies --no-baselines).
    #[arg(long, default_value = "text-classifier", value_parser = ["text-classifier", "encoder-head", "encoder-lora"])]
    pub model: String,
    /// The head's hidden-layer width (default 128). With `--model encoder-head`, 0 makes
    /// the head linear: the one to use with `--privacy` (docs/jobs.md).
    #[arg(long, value_name = "N")]
    pub hidden: Option<usize>,
    /// The server's learning rate (default 1 for FedAvg; 0.01 for the FedAdam of
    /// `--privacy distributed`, tuned for 100 rounds: fewer rounds want more, see
    /// docs/benchmarks.md).
    #[arg(long, value_name = "LR")]
    pub server_lr: Option<f64>,
    /// With `--model encoder-lora`: how many of the encoder's top layers carry adapters
    /// (default 1).
    #[arg(long, value_name = "N")]
    pub lora_layers: Option<usize>,
    /// With `--model encoder-lora`: the adapters' rank (default 8).
    #[arg(long, value_name = "R")]
    pub lora_rank: Option<usize>,
    /// With an encoder model: which pretrained encoder, `all-minilm-l6-v2` (English) or
    /// `multilingual-e5-small` (about 100 languages, Korean among them; twice the
    /// layers, so embedding takes twice as long).
    #[arg(long, default_value = "all-minilm-l6-v2", value_parser = ["all-minilm-l6-v2", "multilingual-e5-small"])]
    pub encoder: String,
    /// With an encoder model: the folder holding the encoders (one sub-folder
    /// each), shared read-only by the demo's sites. Fetched by
    /// `scripts/fetch_encoder.py` when missing (run from the repository root).
    #[arg(long, value_name = "DIR", default_value = "data/encoders")]
    pub encoders: PathBuf,
    /// At the end, delete the run's consortium, sites and split data, keeping only
    /// summary.json, audit.json, job.toml and logs/ in the work dir.
    #[arg(long, conflicts_with = "serve_console")]
    pub clean: bool,
    /// Serve the read-only web console while the demo runs (default address
    /// 127.0.0.1:8480; port 0 picks a free one), and keep the coordinator serving it
    /// after the job, until Ctrl-C.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8480")]
    pub serve_console: Option<std::net::SocketAddr>,
}

fn read(path: &Path) -> Result<Vec<Example>> {
    Ok(data::read_examples(path, &ReadOptions::default())?.examples)
}

/// Promotes the release of `job_id` and waits until `sites` sites report it installed;
/// returns (version, model digest, sites installed).
async fn promote_and_install(
    control: &mut pb::control_client::ControlClient<tonic::transport::Channel>,
    job_id: &str,
    sites: usize,
    fleet: &mut Fleet,
) -> Result<(u32, String, usize)> {
    let list = control.list_releases(pb::ListReleasesRequest {}).await?.into_inner();
    let info = list
        .releases
        .iter()
        .find(|r| r.job_id == job_id)
        .with_context(|| format!("job {job_id} completed but made no release"))?;
    let version = info.release.as_ref().map_or(0, |r| r.version);
    // A two-minute model on public Reddit posts rarely reaches the default crisis-recall
    // gate: the demo overrides it, with a reason, as a lead may (logged in the audit log).
    control
        .promote_release(pb::PromoteRequest {
            version: version.to_string(),
            override_gate: true,
            reason: "maeum-coordinator demo: a demonstration model on public data, not for use with people".into(),
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        fleet.check_alive()?;
        let info = control.get_release_info(pb::ReleaseSelector { version: version.to_string() }).await?.into_inner();
        if let Some(r) = info.installs.iter().find(|i| !i.installed) {
            bail!("site {} refused release v{version}: {}", r.site_id, r.reason);
        }
        let installed = info.installs.iter().filter(|i| i.installed).count();
        if installed >= sites {
            let model = info.release.and_then(|r| r.model).map(|m| m.digest).unwrap_or_default();
            return Ok((version, model, installed));
        }
        if Instant::now() > deadline {
            bail!("release v{version}: only {installed} of {sites} sites installed it within 180 s; see the site logs");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn job_toml(labels: &[String], a: &DemoArgs) -> String {
    let labels: Vec<String> = labels.iter().map(|l| format!("{l:?}")).collect();
    format!(
        r#"# Written by `maeum-coordinator demo`. See docs/jobs.md.
name = "demo"
description = "counseling triage text classifier, {sites} sites, Dirichlet alpha {alpha}"
labels = [{labels}]
rounds = {rounds}
min_sites = {min_sites}
seed = {seed}

[model]
{model}

[train]
epochs = {epochs}
learning_rate = {lr}

[strategy]
{strategy}

[deadlines]
join = 60
train = 600
evaluate = 300
secagg = 60

[secure_aggregation]
insecure_plaintext_aggregation_for_debugging = {plaintext}
{privacy}"#,
        sites = a.sites,
        alpha = a.alpha,
        labels = labels.join(", "),
        rounds = a.rounds,
        min_sites =
            if a.privacy == "distributed" { a.sites.saturating_sub(1).max(1) } else { a.sites.div_ceil(2).max(1) },
        strategy = if a.privacy == "distributed" {
            // The server steps with the noisy gradient sum: Adam's scale-free step (tuned
            // with the fedsim bench, docs/benchmarks.md).
            format!("kind = \"fedadam\"\nserver_learning_rate = {:?}", a.server_lr.unwrap_or(0.01))
        } else {
            let lr = a.server_lr.map_or(String::new(), |lr| format!("\nserver_learning_rate = {lr:?}"));
            format!("kind = \"fedavg\"{lr}")
        },
        seed = a.seed,
        epochs = a.local_epochs,
        lr = DEFAULT_SITE_LR,
        model = if a.model == "encoder-lora" {
            let d = maeum_models::lora::LoraConfig::default();
            format!(
                "kind = \"encoder-lora\"\nencoder = \"{}\"\nlora_layers = {}\nlora_rank = {}",
                a.encoder,
                a.lora_layers.unwrap_or(d.layers),
                a.lora_rank.unwrap_or(d.rank)
            )
        } else if a.model == "encoder-head" {
            format!("kind = \"encoder-head\"\nencoder = \"{}\"", a.encoder)
        } else {
            "kind = \"text-classifier\"".to_string()
        } + &a.hidden.map_or(String::new(), |h| format!("\nhidden = {h}")),
        plaintext = a.insecure_plaintext_aggregation,
        privacy = match a.privacy.as_str() {
            "local" | "distributed" => format!(
                "\n[privacy]\nmode = {:?}\nepsilon = {:?}\ndelta = {:?}\nsample_rate = {:?}\n",
                a.privacy,
                a.epsilon,
                a.delta,
                a.sample_rate.unwrap_or(if a.privacy == "local" { 0.05 } else { 1.0 })
            ),
            _ => String::new(),
        },
    )
}

pub async fn run(a: DemoArgs) -> Result<()> {
    if a.sites == 0 || a.rounds == 0 {
        bail!("--sites and --rounds must be at least 1");
    }
    if (a.lora_layers.is_some() || a.lora_rank.is_some()) && a.model != "encoder-lora" {
        bail!("--lora-layers and --lora-rank apply only to --model encoder-lora, not {}", a.model);
    }
    let started = Instant::now();
    // Resolve our own path first: a rebuild replaces the file, and /proc/self/exe then
    // names a deleted inode.
    let coord_bin = std::env::current_exe()?.with_file_name("maeum-coordinator");
    let site_bin = site_binary()?;
    let work = match &a.work_dir {
        Some(w) => w.clone(),
        None => PathBuf::from(format!("work/demo-{}", home::now_ms() / 1000)),
    };
    if work.exists() && std::fs::read_dir(&work)?.next().is_some() {
        bail!("{} is not empty; pick another --work-dir", work.display());
    }
    std::fs::create_dir_all(work.join("logs"))?;
    let work = std::path::absolute(&work)?;
    let say = |s: String| eprintln!("{s}");

    // 1. Data: the non-IID split, by the site agent's own `data split`.
    let split_dir = work.join("data");
    let mut split = Command::new(&site_bin);
    split.args(["data", "split", "--json", "--sites", &a.sites.to_string(), "--alpha", &a.alpha.to_string()]);
    split.args(["--seed", &a.seed.to_string(), "--out"]).arg(&split_dir);
    if let Some(d) = &a.data {
        split.arg("--data").arg(d);
    }
    // stderr passes through: a first run fetches the corpus, and its progress shows.
    split.stderr(Stdio::inherit());
    run_quiet(&mut split, "maeum-site data split")?;
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(split_dir.join("split.json"))?)?;
    let labels: Vec<String> = serde_json::from_value(manifest["labels"].clone()).context("split.json labels")?;
    say(format!("split the data over {} sites (Dirichlet α = {}) in {}", a.sites, a.alpha, split_dir.display()));

    // The pretrained encoder, fetched (and digest-checked) like the corpus.
    let encoders = if a.model.starts_with("encoder-") {
        let dir = std::path::absolute(&a.encoders)?;
        let spec = maeum_models::encoder::known(&a.encoder).context("--encoder")?;
        if !dir.join(&a.encoder).join(spec.format().weights()).exists() {
            say(format!("fetching the encoder {} into {}", a.encoder, dir.display()));
            let mut fetch = Command::new("python3");
            fetch.arg("scripts/fetch_encoder.py").args(["--encoder", &a.encoder, "--out"]).arg(dir.join(&a.encoder));
            fetch.stderr(Stdio::inherit());
            run_quiet(&mut fetch, "python3 scripts/fetch_encoder.py (run the demo from the repository root)")?;
        }
        Some(dir)
    } else {
        None
    };

    // 2. Consortium and enrolment.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let address = format!("127.0.0.1:{port}");
    let coord_home = work.join("coordinator");
    home::init(&coord_home, "demo", &address, crate::storage::Engine::Sled)?;
    let h = home::Home::new(&coord_home);
    let sites: Vec<String> = (1..=a.sites).map(|i| format!("site-{i}")).collect();
    for s in &sites {
        let site_home = work.join(s);
        let shard = split_dir.join(s);
        let mut init = Command::new(&site_bin);
        init.args(["init", "--site-id", s, "--home"]).arg(&site_home);
        init.arg("--train").arg(shard.join("train.jsonl")).arg("--test").arg(shard.join("test.jsonl"));
        run_quiet(&mut init, "maeum-site init")?;
        // Seven trainers share two cores here: one thread each avoids oversubscription.
        // The demo's sites accept its job without an admin; every other rule of their
        // `[policy]` keeps its default (a plaintext run opts in to plaintext).
        let cfg = site_home.join("site.toml");
        let text = std::fs::read_to_string(&cfg)?
            .replace("threads = 0", "threads = 1")
            .replace("auto_accept = false", "auto_accept = true")
            .replace(
                "allow_plaintext = false",
                if a.insecure_plaintext_aggregation { "allow_plaintext = true" } else { "allow_plaintext = false" },
            );
        // The demo's sites share one read-only encoder folder; each checks the digests.
        let text = match &encoders {
            Some(dir) => {
                text.replace("\n[encoders]\n", &format!("\n[encoders]\ndir = {:?}\n", dir.display().to_string()))
            }
            None => text,
        };
        std::fs::write(&cfg, text)?;
        let csr = std::fs::read_to_string(site_home.join("request.csr.pem"))?;
        let bundle = home::approve(&h, &csr, Some(s))?;
        let bundle_path = site_home.join("bundle.json");
        home::write_file(&bundle_path, serde_json::to_string_pretty(&bundle)?.as_bytes(), false)?;
        let mut enroll = Command::new(&site_bin);
        enroll.args(["enroll", "--home"]).arg(&site_home).arg(&bundle_path);
        run_quiet(&mut enroll, "maeum-site enroll")?;
    }
    say(format!("consortium `demo` at {address}: CA, coordinator, {} enrolled sites", a.sites));

    // 3. Processes.
    let mut fleet = Fleet { children: Vec::new() };
    let mut serve = Command::new(&coord_bin);
    serve.args(["serve", "--home"]).arg(&coord_home).args(["--listen", &address]);
    if let Some(addr) = a.serve_console {
        serve.arg("--console").arg(addr.to_string());
    }
    fleet.children.push(("coordinator".into(), spawn(&mut serve, &work.join("logs/coordinator.log"), "coordinator")?));
    // The console's URL as the coordinator reports it (port 0 picks a free port).
    let mut console_url = None;
    if a.serve_console.is_some() {
        let log = work.join("logs/coordinator.log");
        for _ in 0..100 {
            fleet.check_alive()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(url) = crate::console::urls_in_log(&text).into_iter().next() {
                console_url = Some(url);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let url = console_url.clone().context("the coordinator did not start its console; see logs/coordinator.log")?;
        say(format!("console: {url} (read-only, updates live; open it in a browser)"));
    }
    for s in &sites {
        let mut run = Command::new(&site_bin);
        run.args(["run", "--home"]).arg(work.join(s));
        fleet.children.push((s.clone(), spawn(&mut run, &work.join(format!("logs/{s}.log")), s)?));
    }
    let job_path = work.join("job.toml");
    std::fs::write(&job_path, job_toml(&labels, &a))?;
    let mut control = None;
    for _ in 0..100 {
        fleet.check_alive()?;
        if let Ok(c) = client::connect(&coord_home).await {
            control = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut control = control.context("the coordinator did not come up; see logs/coordinator.log")?;
    let job = control
        .submit_job(pb::SubmitJobRequest { toml: std::fs::read_to_string(&job_path)?, source_name: "job.toml".into() })
        .await?
        .into_inner();
    say(format!(
        "submitted job {} ({} rounds); site and coordinator logs in {}/logs",
        job.job_id,
        a.rounds,
        work.display()
    ));

    if a.model == "encoder-lora" {
        say(format!(
            "each site first runs the lower layers of {} over its own records ({} for the whole corpus on two \
             cores; `embedding records` lines in logs/site-*.log), then each round trains the adapted top \
             layers: about 4 minutes a round per adapted layer and local epoch on two cores",
            a.encoder,
            embed_time(&a.encoder)
        ));
    } else if encoders.is_some() {
        say(format!(
            "each site first embeds its own records with {} ({} for the whole corpus on two cores; \
             `embedding records` lines in logs/site-*.log), then the rounds take seconds",
            a.encoder,
            embed_time(&a.encoder)
        ));
    }

    // 4. Watch.
    let bar = ProgressBar::new(u64::from(a.rounds));
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let watch = pb::JobRef { job_id: job.job_id.clone(), rounds_limit: a.rounds, rounds_before: 0 };
    let mut stream = control.watch_job(watch).await?.into_inner();
    let mut last: Option<pb::JobInfo> = None;
    // The last round whose evaluation was printed (rounds print in order, by number).
    let mut printed = 0u32;
    let fed_started = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
        fleet.check_alive()?;
        let info = match next {
            Err(_) => continue,
            Ok(None) => break,
            Ok(Some(i)) => i?,
        };
        bar.set_position(u64::from(info.completed_rounds));
        bar.set_message(info.activity.clone());
        let since = printed;
        for r in info.history.iter().filter(|r| r.round > since) {
            let Some((acc, f1)) = r.evaluation.as_ref().and_then(client::scores) else { break };
            let crisis = r.evaluation.as_ref().and_then(|e| crisis_recall(&labels, e));
            let epsilon =
                client::privacy_plan(&info).map_or(String::new(), |p| format!("  ε {:.3}", p.epsilon_after(r.round)));
            let line = format!(
                "round {:>2}: accuracy {acc:.4}  macro-F1 {f1:.4}  crisis recall {}{epsilon}  ({} sites)",
                r.round,
                crisis.map_or("-".into(), |r| format!("{r:.4}")),
                r.contributors.len()
            );
            if bar.is_hidden() {
                eprintln!("{line}")
            } else {
                bar.println(line)
            }
            printed = r.round;
        }
        last = Some(info);
    }
    bar.finish_and_clear();
    let fed_seconds = fed_started.elapsed().as_secs_f64();
    let info = last.context("no job status received")?;
    if info.state != "completed" {
        bail!("job {} ended {}: {}", info.job_id, info.state, info.error);
    }
    // The job's final model is a signed release: promote it, as the lead would, and
    // wait until every site has verified and installed it.
    let release = promote_and_install(&mut control, &info.job_id, a.sites, &mut fleet).await?;
    say(format!(
        "release v{} (model {}) signed, logged and promoted; verified and installed at {}/{} sites",
        release.0,
        &release.1[..12],
        release.2,
        a.sites
    ));
    // The audit log's export, checked the way an auditor would: against the log key
    // from signing.pub. `job_finished` is written with the job's final state; the
    // export is retried briefly in case the status was read a moment before.
    let trust = maeum_tlog::unhex32(std::fs::read_to_string(coord_home.join("signing.pub"))?.trim())
        .map_err(|e| anyhow::anyhow!("signing.pub: {e}"))?;
    let audit_path = work.join("audit.json");
    let mut audit = None;
    for _ in 0..50 {
        let bytes = client::export_audit(&coord_home).await?;
        let report = maeum_tlog::export::verify(&bytes, Some(&trust))
            .map_err(|e| anyhow::anyhow!("the coordinator's audit export does not verify: {e}"))?;
        let finished = String::from_utf8_lossy(&bytes).contains("\"kind\":\"job_finished\"");
        audit = Some((bytes, report));
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (audit_bytes, audit_report) = audit.context("no audit export")?;
    std::fs::write(&audit_path, &audit_bytes)?;
    say(format!(
        "audit log: {} entries, {} checkpoints, verified; {} (maeum-audit verify / show)",
        audit_report.entries,
        audit_report.checkpoints,
        audit_path.display()
    ));
    if a.serve_console.is_some() {
        fleet.stop_all_but("coordinator");
    } else {
        fleet.stop();
    }
    let mut pruned = 0;
    for s in &sites {
        pruned += prune_site_caches(&work.join(s), &release.1)?;
    }
    let final_eval = info.history.last().and_then(|r| r.evaluation.clone()).context("no final evaluation")?;
    let fed = score(&client::confusion(&final_eval).context("malformed final evaluation")?);
    let job_spec = maeum_protocols::job::JobSpec::from_toml("demo job", &job_toml(&labels, &a))?;
    let plan = job_spec.privacy_plan()?;
    let per_round: Vec<serde_json::Value> = info
        .history
        .iter()
        .filter_map(|r| {
            r.evaluation.as_ref().and_then(client::scores).map(|(acc, f1)| {
                let crisis = r.evaluation.as_ref().and_then(|e| crisis_recall(&labels, e));
                serde_json::json!({"round": r.round, "accuracy": acc, "macro_f1": f1, "crisis_recall": crisis,
                    "sites": r.contributors.len(), "epsilon": plan.map(|p| p.epsilon_after(r.round))})
            })
        })
        .collect();

    // 5. Baselines on the same split, the same model, evaluated on the same union test set.
    // encoder-lora's baselines would train the adapters centrally and at each site:
    // about twice the federated run's training again (docs/benchmarks.md has them).
    let (centralized, local) = if a.no_baselines || a.model == "encoder-lora" {
        (None, None)
    } else {
        say("training the baselines: centralized on the union of the sites' data, then each site alone".into());
        let (dir, sites2, labels2) = (split_dir.clone(), sites.clone(), labels.clone());
        let model = encoders.clone().map(|dir| (dir, work.clone(), a.encoder.clone()));
        let (c, l) = tokio::task::spawn_blocking(move || baselines(&dir, &sites2, labels2, model)).await??;
        (Some(c), Some(l))
    };

    // Read before --clean removes the sites' homes.
    let policies = site_policies(&work, &sites);
    let spent = logged_privacy_spent(&audit_bytes, &sites, &info.job_id);
    let privacy = plan.map(|p| {
        serde_json::json!({
            "mode": a.privacy, "mechanism": p.mode.mechanism(), "target_epsilon": a.epsilon, "epsilon": p.epsilon,
            "delta": p.delta, "clip": p.clip, "noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate,
            "steps_per_round": p.steps_per_round, "noise_shares": p.distributed().map(|m| m.noise_shares),
            "epsilon_spent_per_site": spent,
        })
    });
    let cleaned = if a.clean { Some(clean(&work)?) } else { None };
    // summary.json is a few kB: measured before it is written.
    let left = disk_usage(&work);
    let total_seconds = started.elapsed().as_secs_f64();
    let local_mean = local.as_ref().map(|l: &Vec<Score>| {
        let n = l.len().max(1) as f64;
        (l.iter().map(|s| s.accuracy).sum::<f64>() / n, l.iter().map(|s| s.macro_f1).sum::<f64>() / n)
    });
    let summary = serde_json::json!({
        "sites": a.sites,
        "rounds": a.rounds,
        "local_epochs": a.local_epochs,
        "alpha": a.alpha,
        "secure_aggregation": info.secure_aggregation,
        "site_policies": policies,
        "privacy": privacy,
        "job_id": info.job_id,
        "audit": { "file": audit_path, "entries": audit_report.entries, "checkpoints": audit_report.checkpoints },
        "release": { "version": release.0, "model": release.1, "installed_at_sites": release.2 },
        "federated": { "accuracy": fed.accuracy, "macro_f1": fed.macro_f1, "per_round": per_round, "seconds": fed_seconds },
        "centralized": centralized.as_ref().map(|c| serde_json::json!({"accuracy": c.accuracy, "macro_f1": c.macro_f1})),
        "local_only": local.as_ref().map(|l| serde_json::json!({
            "mean_accuracy": local_mean.map(|m| m.0), "mean_macro_f1": local_mean.map(|m| m.1),
            "per_site": l.iter().zip(&sites).map(|(s, id)| serde_json::json!({"site": id, "accuracy": s.accuracy, "macro_f1": s.macro_f1})).collect::<Vec<_>>(),
        })),
        "work_dir": work,
        "disk": { "left_bytes": left, "pruned_site_caches_bytes": pruned, "cleaned_bytes": cleaned },
        "seconds": total_seconds,
    });
    std::fs::write(work.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    if a.json {
        println!("{summary}");
        return serve_console_until_stopped(console_url, fleet).await;
    }
    let (rounds, comparison) = tables(&per_round, &fed, centralized.as_ref(), local_mean);
    println!();
    println!("{rounds}");
    println!();
    println!(
        "federated job {} — {} sites, {} rounds, secure aggregation: {}",
        info.job_id,
        a.sites,
        a.rounds,
        if info.secure_aggregation { "on" } else { "off (plaintext sum)" }
    );
    println!("{comparison}");
    if let Some(p) = &plan {
        println!();
        println!(
            "differential privacy: {}; planned ε = {:.3} per record at δ = {:e}",
            p.describe(),
            p.epsilon,
            p.delta
        );
        let line: Vec<String> = spent
            .as_object()
            .map(|m| {
                m.iter().map(|(s, e)| format!("{s} {}", e.as_f64().map_or("-".into(), |e| format!("{e:.3}")))).collect()
            })
            .unwrap_or_default();
        println!("ε spent per record, as each site charged it (privacy_charged in the audit log): {}", line.join(", "));
    }
    println!();
    println!("{MACRO_F1_NOTE}");
    if per_round.iter().any(|r| r["sites"].as_u64().is_some_and(|n| n < a.sites as u64)) {
        println!("{}", fewer_sites_note(a.sites.div_ceil(2).max(1)));
    }
    println!();
    println!("took {total_seconds:.0} s (federation {fed_seconds:.0} s)");
    match cleaned {
        Some(freed) => println!(
            "--clean removed {} of consortium, sites and split data; kept {} ({}) in {}",
            human_bytes(freed),
            KEPT_BY_CLEAN.join(", "),
            human_bytes(left),
            work.display()
        ),
        None => println!(
            "left {} in {} (consortium, sites, logs, summary.json); delete it when done, or rerun with --clean",
            human_bytes(left),
            work.display()
        ),
    }
    serve_console_until_stopped(console_url, fleet).await
}

/// With `--serve-console`: the coordinator goes on serving the console until Ctrl-C.
async fn serve_console_until_stopped(console_url: Option<String>, mut fleet: Fleet) -> Result<()> {
    if let Some(url) = console_url {
        // Listening before the line that invites Ctrl-C.
        let stop = maeum_runtime::runtime::shutdown_signal();
        eprintln!("the console is still serving at {url} (sites stopped); Ctrl-C to stop it");
        stop.await;
        fleet.stop();
    }
    Ok(())
}

/// One line on macro-F1, printed under the comparison.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_round_and_comparison_tables_align() {
        // The old table printed serde_json values, which ignore width specs.
        let per_round: Vec<serde_json::Value> = (1..=12)
            .map(|r| serde_json::json!({"round": r, "accuracy": 0.5 + f64::from(r) / 100.0, "macro_f1": 0.41, "sites": if r == 1 { 4 } else { 7 }}))
            .collect();
        let fed = Score { accuracy: 0.61, macro_f1: 0.6 };
        let (rounds, comparison) = tables(&per_round, &fed, Some(&fed), Some((0.3, 0.25)));
        maeum_runtime::table::assert_aligned(&rounds);
        maeum_runtime::table::assert_aligned(&comparison);
    }

    fn write(path: &Path, bytes: usize) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, vec![0u8; bytes]).expect("write");
    }

    #[test]
    fn pruning_keeps_the_served_model_and_clean_keeps_the_summary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path();
        let site = work.join("site-1");
        write(&site.join("models/aaaa.safetensors"), 1000);
        write(&site.join("models/bbbb.safetensors"), 2000);
        write(&site.join("models/cccc.part"), 10);
        write(&site.join("work/job-r1-a1.masked"), 300);
        write(&site.join("site.pem"), 5);
        assert_eq!(prune_site_caches(&site, "bbbb").expect("prune"), 1310);
        assert!(site.join("models/bbbb.safetensors").exists(), "the served release's model stays");
        assert!(!site.join("models/aaaa.safetensors").exists());
        assert!(site.join("site.pem").exists());
        assert_eq!(prune_site_caches(&work.join("site-9"), "bbbb").expect("a missing home is fine"), 0);

        write(&work.join("summary.json"), 7);
        write(&work.join("audit.json"), 8);
        write(&work.join("job.toml"), 9);
        write(&work.join("logs/site-1.log"), 10);
        write(&work.join("coordinator/blobs/x"), 500);
        write(&work.join("data/site-1/train.jsonl"), 40);
        assert_eq!(disk_usage(work), 2000 + 5 + 7 + 8 + 9 + 10 + 500 + 40);
        assert_eq!(clean(work).expect("clean"), 2000 + 5 + 500 + 40);
        let mut left: Vec<String> =
            std::fs::read_dir(work).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
        left.sort();
        assert_eq!(left, ["audit.json", "job.toml", "logs", "summary.json"]);
        assert_eq!(disk_usage(work), 7 + 8 + 9 + 10);
    }

    #[test]
    fn sizes_read_like_du() {
        assert_eq!(human_bytes(1_512_000_000), "1.5 GB");
        assert_eq!(human_bytes(230_400_000), "230 MB");
        assert_eq!(human_bytes(12_300), "12 kB");
    }
}
