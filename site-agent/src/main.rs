//! `maeum-site`: the site agent's command line.
//!
//! Exit codes: 0 success; 1 runtime error; 2 usage error (from clap); 3 invalid input
//! data (the message names the file, the line and the problem).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use maeum_site::enrol;
use maeum_site::local::{self, Input, SplitArgs, TrainLocalArgs};

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
    /// Validate local data, train the text classifier on it alone, and evaluate it.
    TrainLocal(TrainLocalArgs),
    /// Inspect and prepare local data files.
    #[command(subcommand)]
    Data(DataCommand),
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
    let cli = Cli::parse();
    maeum_protocols::runtime::init_tracing(if matches!(cli.command, Command::Run { .. }) { "info" } else { "warn" });
    let result = match cli.command {
        Command::Init { home, site_id, train, test } => enrol::init(&home, &site_id, train, test).map(|req| {
            println!("site {site_id} initialised in {}", home.display());
            println!("send {} to the consortium lead for approval", req.display());
        }),
        Command::Enroll { home, bundle } => enrol::enroll(&home, &bundle).map(|e| {
            println!("enrolled in consortium {} (coordinator {})", e.consortium, e.coordinator_address);
        }),
        Command::Run { home } => run_daemon(home),
        Command::Status { home, json } => enrol::status(&home, json),
        Command::TrainLocal(a) => local::train_local(a),
        Command::Data(DataCommand::Check { input, json }) => local::check(input, json),
        Command::Data(DataCommand::Split(a)) => local::split(a),
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

fn run_daemon(home: PathBuf) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(maeum_site::daemon::run(&home, maeum_protocols::runtime::shutdown_signal()))
}
