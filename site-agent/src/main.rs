//! `maeum-site`: the site agent's command line.
//!
//! Exit codes: 0 success; 1 runtime error; 2 usage error (from clap); 3 invalid input
//! data (the message names the file, the line and the problem).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use maeum_site::local::{self, Input, SplitArgs, TrainLocalArgs};
use maeum_site::{enrol, releases, witness};

/// Maeum site agent: trains the consortium's model on this institution's data, which
/// never leaves the site.
#[derive(Debug, Parser)]
#[command(name = "maeum-site", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create this site's key, its certificate request (for the consortium lead) and a
    /// configuration file. The private key never leaves HOME.
    Init {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// This site's id ([a-z0-9-], 1–63 chars), as agreed with the consortium lead.
        #[arg(long)]
        site_id: String,
        /// Training records (JSONL or CSV), written into HOME/site.toml.
        #[arg(long, value_name = "FILE")]
        train: Option<PathBuf>,
        /// Held-out records for federated evaluation, written into HOME/site.toml.
        #[arg(long, value_name = "FILE")]
        test: Option<PathBuf>,
    },
    /// Install the enrolment bundle the consortium lead made from this site's request.
    Enroll {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// The bundle file (bundle-SITE.json).
        bundle: PathBuf,
    },
    /// Run the site daemon: dial out to the coordinator, take part in training jobs.
    Run {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Also serve plaintext `/metrics`, `/healthz`, `/readyz` and gRPC health on
        /// this address (loopback or the site's private network; nothing is pushed).
        #[arg(long, value_name = "ADDR", env = "MAEUM_OPS_LISTEN")]
        ops_listen: Option<std::net::SocketAddr>,
    },
    /// Check this home (enrolment, certificates and their expiry, local data, audit
    /// state, disk space) and whether the coordinator answers; say what to fix. Exit 1
    /// if a check fails, including a coordinator that cannot be reached or does not
    /// speak TLS at the enrolled address.
    Doctor {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show enrolment, connection, current job and round, and the last model.
    Status {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Classify text locally with a model this site holds (no coordinator needed): one
    /// `--text`, or a JSONL `--file` streamed (scored when records carry labels).
    Predict(maeum_site::predict::PredictArgs),
    /// Personalise: fine-tune a model this site holds on the site's own data (a few
    /// local epochs, optionally only the output layer), keep it in HOME/local-models and
    /// compare both on the local test split. The local model is never uploaded.
    Finetune(maeum_site::finetune::FinetuneArgs),
    /// Validate local data, train the text classifier on it alone, and evaluate it.
    TrainLocal(TrainLocalArgs),
    /// Inspect and prepare local data files.
    #[command(subcommand)]
    Data(DataCommand),
    /// This site as a witness of the consortium's audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Signed model releases installed here: list, show, re-verify offline.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Job offers waiting for your consent ([policy] auto_accept = false): list, show
    /// what a job asks, accept or refuse it.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Pretrained encoders this site may run (`encoder-head` jobs): install one from a
    /// folder (digests checked against the known encoder), list them.
    #[command(subcommand)]
    Encoders(EncodersCommand),
    /// Write this site's own report for its privacy officer: one self-contained HTML
    /// file (jobs offered and answered, what left the site and in what form, privacy
    /// spent, releases installed), from what HOME records; the coordinator is not asked.
    Report {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Where to write it (default HOME/reports/site-report.html).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The privacy ledger: ε spent and set aside per differentially private job, the
    /// total, and what remains of the `[policy.privacy] budget`.
    Privacy {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum EncodersCommand {
    /// Check that DIR holds the known encoder NAME (weights and tokenizer digests, a
    /// model that loads), then copy it into this site's encoder folder.
    Add {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// The folder with the encoder's files: model.safetensors, tokenizer.json and
        /// config.json for all-minilm-l6-v2, model.q4.bin for multilingual-e5-small
        /// (data/encoders/NAME from `scripts/fetch_encoder.py --encoder NAME`).
        dir: PathBuf,
        /// The encoder's name: all-minilm-l6-v2 or multilingual-e5-small.
        #[arg(long, default_value = "all-minilm-l6-v2")]
        name: String,
    },
    /// The known encoders, whether each is installed here and verifies.
    List {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// The offers this site received and their state (waiting, accepted, refused, withdrawn).
    List {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// What a job asks of this site, in plain words (model, rounds, cohort, threshold,
    /// secure aggregation, DP, who else), and whether this site's policy allows it.
    Show {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// The job id (from `jobs list`).
        job: String,
        /// Print one JSON object (with the job file).
        #[arg(long)]
        json: bool,
    },
    /// Take part in a job (the daemon answers the coordinator at its next poll).
    Accept {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// The job id.
        job: String,
    },
    /// Refuse a job, with a reason the coordinator and its audit log record.
    Refuse {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// The job id.
        job: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Installed releases (`*` = in service), refusals with their reasons, and local
    /// fine-tuned models.
    List {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A release's model card, audit-log entry, and the metrics this site reported for it.
    Show {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// The release (3, v3 or a model-digest prefix); default: the one in service.
        version: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Re-verify every installed release offline: signature under the consortium key,
    /// card and model digests, model layout, and the log entry's inclusion proof against
    /// a checkpoint this site witnessed. Exit 1 if any fails.
    Verify {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// The latest checkpoint this site verified and cosigned; fails if the coordinator
    /// was caught showing this site a forked log.
    Status {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Prove that this site's decisions, contributions and the models it used are in
    /// the log: fetches inclusion proofs from the coordinator and verifies them against
    /// the checkpoint this site witnessed. Fails if anything is missing.
    Prove {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The sites this site has shared a secure-aggregation session with, each with the
    /// audit-log entry that approved its certificate (proven before every session).
    Sites {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the witnessed checkpoint file (for `maeum-audit consistency FILE EXPORT`).
    Checkpoint {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
    },
    /// Lift the stop after a forked audit log, once you have inspected the evidence and
    /// sent it to the consortium's auditors: moves HOME/audit/fork-* into
    /// HOME/audit/cleared/TIME/ (nothing is deleted) and records who, when and why in
    /// HOME/audit/cleared.jsonl. A running daemon resumes within seconds, no restart.
    Clear {
        /// The site's home directory.
        #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
        home: PathBuf,
        /// Why the evidence may be cleared (recorded; required).
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Validate a data file and print its label histogram.
    Check {
        #[command(flatten)]
        input: Input,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Shard a JSONL file into non-IID site datasets (Dirichlet over labels), each with
    /// its own stratified train/test split.
    Split(SplitArgs),
}

fn main() -> ExitCode {
    maeum_runtime::runtime::exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    maeum_runtime::runtime::init_tracing(if matches!(cli.command, Command::Run { .. }) { "info" } else { "warn" });
    let result = match home_needed(&cli.command).map(enrol::check_home) {
        Some(Err(e)) => Err(e),
        _ => dispatch(cli.command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<maeum_models::data::DataError>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// The `--home` of a command that works on an existing site home (all but `init`, which
/// creates one, and the data commands, which need none).
fn home_needed(command: &Command) -> Option<&Path> {
    match command {
        Command::Enroll { home, .. }
        | Command::Run { home, .. }
        | Command::Doctor { home, .. }
        | Command::Status { home, .. }
        | Command::Privacy { home, .. }
        | Command::Report { home, .. }
        | Command::Encoders(EncodersCommand::Add { home, .. } | EncodersCommand::List { home, .. })
        | Command::Models(
            ModelsCommand::List { home, .. } | ModelsCommand::Show { home, .. } | ModelsCommand::Verify { home, .. },
        )
        | Command::Audit(
            AuditCommand::Status { home, .. }
            | AuditCommand::Prove { home, .. }
            | AuditCommand::Sites { home, .. }
            | AuditCommand::Checkpoint { home }
            | AuditCommand::Clear { home, .. },
        ) => Some(home),
        Command::Jobs(
            JobsCommand::List { home, .. }
            | JobsCommand::Show { home, .. }
            | JobsCommand::Accept { home, .. }
            | JobsCommand::Refuse { home, .. },
        ) => Some(home),
        Command::Predict(a) => Some(&a.home),
        Command::Finetune(a) => Some(&a.home),
        Command::Init { .. } | Command::TrainLocal(_) | Command::Data(_) => None,
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init { home, site_id, train, test } => enrol::init(&home, &site_id, train, test).map(|req| {
            println!("site {site_id} initialised in {}", home.display());
            println!("send {} to the consortium lead for approval", req.display());
        }),
        Command::Enroll { home, bundle } => enrol::enroll(&home, &bundle).map(|e| {
            println!("enrolled in consortium {} (coordinator {})", e.consortium, e.coordinator_address);
        }),
        Command::Run { home, ops_listen } => run_daemon(home, ops_listen),
        Command::Doctor { home, json } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(maeum_site::doctor::run(&home, json))),
        Command::Status { home, json } => enrol::status(&home, json),
        Command::Privacy { home, json } => maeum_site::ledger::show(&home, json),
        Command::Report { home, out } => {
            let path = maeum_site::report::write(&home, out)?;
            println!("wrote {} (self-contained HTML; open it in a browser)", path.display());
            Ok(())
        }
        Command::Encoders(EncodersCommand::Add { home, dir, name }) => {
            let home = maeum_site::enrol::Home::new(home);
            let at = maeum_site::encoders::add(&home, &dir, &name)?;
            println!("installed encoder {name} at {} (weights and tokenizer digests verified)", at.display());
            Ok(())
        }
        Command::Encoders(EncodersCommand::List { home, json }) => {
            let list = maeum_site::encoders::list(&maeum_site::enrol::Home::new(home))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for e in list {
                    println!("{}\t{}\t{}", e.name, e.status, e.path.display());
                }
            }
            Ok(())
        }
        Command::TrainLocal(a) => local::train_local(a),
        Command::Predict(a) => maeum_site::predict::run(a),
        Command::Finetune(a) => maeum_site::finetune::run(a),
        Command::Data(DataCommand::Check { input, json }) => local::check(input, json),
        Command::Data(DataCommand::Split(a)) => local::split(a),
        Command::Jobs(JobsCommand::List { home, json }) => maeum_site::consent::list(&home, json),
        Command::Jobs(JobsCommand::Show { home, job, json }) => maeum_site::consent::show(&home, &job, json),
        Command::Jobs(JobsCommand::Accept { home, job }) => maeum_site::consent::answer(&home, &job, true, None),
        Command::Jobs(JobsCommand::Refuse { home, job, reason }) => {
            maeum_site::consent::answer(&home, &job, false, Some(reason))
        }
        Command::Models(ModelsCommand::List { home, json }) => releases::list(&home, json),
        Command::Models(ModelsCommand::Show { home, version, json }) => releases::show(&home, version.as_deref(), json),
        Command::Models(ModelsCommand::Verify { home, json }) => releases::verify(&home, json),
        Command::Audit(AuditCommand::Status { home, json }) => witness::status(&home, json),
        Command::Audit(AuditCommand::Prove { home, json }) => prove(home, json),
        Command::Audit(AuditCommand::Sites { home, json }) => maeum_site::roster::list(&home, json),
        Command::Audit(AuditCommand::Checkpoint { home }) => witness::witnessed(&enrol::Home::new(&home))
            .and_then(|f| f.ok_or_else(|| anyhow::anyhow!("this site has not witnessed a checkpoint yet")))
            .map(|f| println!("{}", String::from_utf8_lossy(&f.encode()))),
        Command::Audit(AuditCommand::Clear { home, reason, json }) => clear(home, &reason, json),
    }
}

fn clear(home: PathBuf, reason: &str, json: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Who ran it, as far as this process can tell (services often have no $USER).
    let by = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .or_else(|| std::fs::metadata("/proc/self").ok().map(|m| format!("uid {}", m.uid())))
        .unwrap_or_else(|| "unknown".into());
    let home = enrol::Home::new(&home);
    let c = witness::clear(&home, reason, &by)?;
    if json {
        println!("{}", serde_json::to_string(&c)?);
    } else {
        println!("cleared     {}", c.evidence);
        println!("moved       {} → {}", c.files.join(", "), home.path(&c.moved_to).display());
        println!(
            "recorded    {} by {}: {} ({})",
            c.cleared,
            c.by,
            c.reason,
            home.path("audit/cleared.jsonl").display()
        );
        println!("a running daemon resumes work for the coordinator within seconds; no restart needed");
    }
    Ok(())
}

fn prove(home: PathBuf, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(witness::prove(&enrol::Home::new(&home)))?;
    witness::print_prove(&report, json)
}

fn run_daemon(home: PathBuf, ops_listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The signal handlers are installed when shutdown_signal is called: inside the runtime.
    runtime
        .block_on(async { maeum_site::daemon::run(&home, ops_listen, maeum_runtime::runtime::shutdown_signal()).await })
}
