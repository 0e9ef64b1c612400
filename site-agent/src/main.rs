//! `maeum-site`: the site agent's command line.
//!
//! Exit codes: 0 success; 1 runtime error; 2 usage error (from clap); 3 invalid input
//! data (the message names the file, the line and the problem).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use maeum_site::local::{self, SplitArgs, TrainLocalArgs};

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
    TrainLocal(TrainLocalCli),
    /// Inspect and prepare local data files.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Validate a data file and print its label histogram.
    Check {
        #[command(flatten)]
        input: InputCli,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Shard a JSONL file into non-IID site datasets (Dirichlet over labels), each with
    /// its own stratified train/test split.
    Split(SplitCli),
}

#[derive(Debug, Args)]
struct InputCli {
    /// Data file: JSONL ({"text": ..., "label": ...} per line) or CSV with a header.
    /// Default: the public Reddit Mental Health Dataset at data/rmhd.jsonl, fetched with
    /// scripts/fetch_rmhd.py when missing (run from the repository root).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// CSV only: the column holding the text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// CSV only: the column holding the label.
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Skip invalid lines (reported with counts) instead of stopping at the first one.
    #[arg(long)]
    skip_invalid: bool,
    /// Comma-separated label set; lines with other labels are invalid. Default: the labels found.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
}

#[derive(Debug, Args)]
struct TrainLocalCli {
    #[command(flatten)]
    input: InputCli,
    /// Fraction of each label held out for evaluation (stratified).
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// Seed for the split, the initial weights and the batch order.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Training epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Learning rate.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Minibatch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Input-feature dropout probability during training (a regulariser).
    #[arg(long)]
    dropout: Option<f64>,
    /// Optimiser: adam or sgd.
    #[arg(long, value_parser = ["adam", "sgd"])]
    optimizer: Option<String>,
    /// Hash buckets of the n-gram featuriser (a power of two).
    #[arg(long)]
    buckets: Option<u32>,
    /// Word n-gram orders LO,HI (0,0 disables word features).
    #[arg(long, value_delimiter = ',', num_args = 1)]
    word_ngrams: Option<Vec<u8>>,
    /// Character n-gram orders LO,HI within words (0,0 disables character features).
    #[arg(long, value_delimiter = ',', num_args = 1)]
    char_ngrams: Option<Vec<u8>>,
    /// Embedding dimension.
    #[arg(long)]
    embed_dim: Option<usize>,
    /// Hidden-layer width.
    #[arg(long)]
    hidden: Option<usize>,
    /// Folder for the trained model (model.safetensors, model.json).
    #[arg(long, default_value = "maeum-local-model")]
    out: PathBuf,
    /// Print one JSON object with the metrics instead of a report.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SplitCli {
    #[command(flatten)]
    input: InputCli,
    /// Number of sites.
    #[arg(long, default_value_t = 7)]
    sites: usize,
    /// Dirichlet concentration over labels: small = skewed (non-IID), large ≈ IID.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Fraction of each site's data held out as its test split.
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// Output folder: site-1/{train,test}.jsonl, site-2/..., plus split.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl InputCli {
    fn into_input(self) -> local::Input {
        local::Input {
            data: self.data,
            text_column: self.text_column,
            label_column: self.label_column,
            skip_invalid: self.skip_invalid,
            labels: self.labels,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    maeum_site::init_tracing();
    let result = match cli.command {
        Command::TrainLocal(a) => local::train_local(TrainLocalArgs {
            input: a.input.into_input(),
            test_fraction: a.test_fraction,
            seed: a.seed,
            epochs: a.epochs,
            learning_rate: a.learning_rate,
            batch_size: a.batch_size,
            dropout: a.dropout,
            optimizer: a.optimizer,
            buckets: a.buckets,
            word_ngrams: a.word_ngrams.map(|v| [v[0], v.get(1).copied().unwrap_or(v[0])]),
            char_ngrams: a.char_ngrams.map(|v| [v[0], v.get(1).copied().unwrap_or(v[0])]),
            embed_dim: a.embed_dim,
            hidden: a.hidden,
            out: a.out,
            json: a.json,
        }),
        Command::Data(DataCommand::Check { input, json }) => local::check(input.into_input(), json),
        Command::Data(DataCommand::Split(a)) => local::split(SplitArgs {
            input: a.input.into_input(),
            sites: a.sites,
            alpha: a.alpha,
            seed: a.seed,
            test_fraction: a.test_fraction,
            out: a.out,
            json: a.json,
        }),
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
