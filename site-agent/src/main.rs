//! `maeum-site`: the site agent's command line.
//!
//! Exit codes: 0 success; 1 runtime error; 2 usage error (from clap); 3 invalid input
//! data (the message names the file, the line and the problem).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    maeum_site::init_tracing();
    let result = match cli.command {
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
