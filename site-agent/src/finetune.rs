//! `maeum-site finetune`: personalisation. Adapts a model this site holds (by default
//! the release in service) to the site's own training split for a few local epochs,
//! optionally training only the output layer, and reports the local metrics of the
//! base and the fine-tuned model on the site's test split.
//!
//! ```text
//! HOME/local-models/DIGEST.safetensors  the fine-tuned model (DIGEST = SHA-256 of the file)
//! HOME/local-models/DIGEST.json         what it was made from, how, and both models' metrics
//! ```
//!
//! A fine-tuned model is never uploaded: the daemon sends the coordinator only masked
//! updates of the jobs it takes part in and never reads HOME/local-models, and the
//! release it serves stays untouched in HOME/models. Use the local model with
//! `maeum-site predict --model DIGEST`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use maeum_models::data::Example;
use maeum_models::metrics::Confusion;
use maeum_models::nn::{Optimizer, Progress, TrainConfig};

use crate::daemon::LocalData;
use crate::enrol::Home;
use crate::local::Bar;

/// `maeum-site finetune` arguments.
#[derive(Debug, Clone, Args)]
#[command(after_help = "The fine-tuned model is kept in HOME/local-models beside the releases and is never \
                        uploaded: the daemon sends only masked updates of the jobs it takes part in.")]
pub struct FinetuneArgs {
    /// The site's home directory.
    #[arg(long, value_name = "DIR", env = "MAEUM_SITE_HOME")]
    pub home: PathBuf,
    /// The base model: a release (`3` or `v3`), or a digest (or unique prefix) of a model
    /// in HOME/models or HOME/local-models. Default: the release in service (else the
    /// last model the daemon used).
    #[arg(long, value_name = "VERSION|DIGEST")]
    pub model: Option<String>,
    /// Local training epochs.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Learning rate (Adam).
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Minibatch size.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Train only the output layer; the embedding and hidden layer stay as in the base model.
    #[arg(long)]
    pub head_only: bool,
    /// Seed for the batch order and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object (the report, plus `path`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A model's metrics on the site's test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalMetrics {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class_recall: BTreeMap<String, f64>,
    /// `confusion[true][predicted]`, rows and columns in the order of `labels`.
    pub confusion: Vec<Vec<u64>>,
}

/// HOME/local-models/DIGEST.json: how a local model was made and how both models do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalModelReport {
    /// SHA-256 of the fine-tuned model file.
    pub model: String,
    /// SHA-256 of the model it was fine-tuned from.
    pub base_model: String,
    pub created_ms: i64,
    pub labels: Vec<String>,
    pub epochs: usize,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub dropout: f64,
    pub head_only: bool,
    pub seed: u64,
    /// Records used (train split) and evaluated on (test split).
    pub n_train: usize,
    pub n_test: usize,
    /// Records of either split skipped because the model does not know their label.
    pub skipped: usize,
    pub skipped_labels: Vec<String>,
    pub train_seconds: f64,
    pub base: LocalMetrics,
    pub finetuned: LocalMetrics,
}

impl FinetuneArgs {
    fn train_config(&self) -> Result<TrainConfig> {
        if self.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        let cfg = TrainConfig {
            optimizer: Optimizer::Adam,
            learning_rate: self.learning_rate,
            epochs: self.epochs,
            batch_size: self.batch_size,
            seed: self.seed,
            prox_mu: 0.0,
            dropout: TrainConfig::default().dropout,
            head_only: self.head_only,
        };
        cfg.validate().map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }
}

fn local_metrics(c: &Confusion, labels: &[String]) -> LocalMetrics {
    let m = c.metrics();
    LocalMetrics {
        accuracy: m.accuracy,
        macro_f1: m.macro_f1,
        per_class_recall: labels.iter().cloned().zip(m.per_class_recall).collect(),
        confusion: c.counts.clone(),
    }
}

/// Fine-tunes the base model on HOME's train split, evaluates both on its test split,
/// and writes the local model and its report into HOME/local-models. Returns the model's
/// path and the report.
pub fn finetune(home: &Home, a: &FinetuneArgs, progress: &mut dyn Progress) -> Result<(PathBuf, LocalModelReport)> {
    let cfg = a.train_config()?;
    let site = home.config()?;
    let base = crate::predict::load(home, a.model.as_deref()).context(
        "finding the base model (by default the release in service: a site receives one by taking part in a job \
         with `maeum-site run`; or pass --model)",
    )?;
    let data = LocalData::load(&site)
        .with_context(|| format!("reading the data named in {}", home.path("site.toml").display()))?;
    let labels = base.spec.labels().names().to_vec();
    let mut skipped_labels = BTreeSet::new();
    let mut known = |records: Vec<Example>| -> Vec<Example> {
        let (known, unknown): (Vec<_>, Vec<_>) =
            records.into_iter().partition(|e| base.spec.labels().index(&e.label).is_some());
        skipped_labels.extend(unknown.into_iter().map(|e| e.label));
        known
    };
    let (n_train_all, n_test_all) = (data.train.len(), data.test.len());
    let (train, test) = (known(data.train), known(data.test));
    let skipped = n_train_all + n_test_all - train.len() - test.len();
    let toml = home.path("site.toml");
    if train.is_empty() {
        bail!(
            "{}: [data] train has no records with a label the model knows ({n_train_all} records, labels {})",
            toml.display(),
            labels.join(", ")
        );
    }
    if test.is_empty() {
        bail!(
            "{}: [data] test has no records with a label the model knows ({n_test_all} records); \
             both models are compared on it",
            toml.display()
        );
    }
    let kind = base.spec.kind();
    // The site's own records: their sentence vectors (encoder models) are cached.
    let mut encoders = crate::encoders::store(home, true)?;
    let train = base
        .spec
        .prepare_text_in(&train, &mut encoders, &mut |_, _| {})
        .with_context(|| format!("base model {} ({kind})", base.digest))?;
    let test = base
        .spec
        .prepare_text_in(&test, &mut encoders, &mut |_, _| {})
        .with_context(|| format!("base model {} ({kind})", base.digest))?;

    let base_conf = base.spec.evaluate(&base.params, &test)?;
    let (params, tr) = base.spec.train(&base.params, &train, &cfg, progress)?;
    let tuned_conf = base.spec.evaluate(&params, &test)?;

    let dir = home.path("local-models");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Not `*.safetensors`, so an interrupted run leaves nothing `predict` would pick up.
    let tmp = dir.join(format!(".finetune-{}.partial", std::process::id()));
    let meta = HashMap::from([
        ("maeum.base_model".to_owned(), base.digest.clone()),
        ("maeum.local_finetune".to_owned(), "true".to_owned()),
        ("maeum.provenance".to_owned(), "finetune".to_owned()),
    ]);
    base.spec.save(&tmp, &params, meta).with_context(|| format!("writing {}", tmp.display()))?;
    let digest = std::fs::read(&tmp)
        .map(|bytes| maeum_protocols::wire::Digest::of(&bytes).hex())
        .with_context(|| format!("reading {}", tmp.display()))?;
    let path = dir.join(format!("{digest}.safetensors"));
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;

    let report = LocalModelReport {
        model: digest.clone(),
        base_model: base.digest,
        created_ms: crate::now_ms(),
        epochs: cfg.epochs,
        learning_rate: cfg.learning_rate,
        batch_size: cfg.batch_size,
        dropout: cfg.dropout,
        head_only: cfg.head_only,
        seed: cfg.seed,
        n_train: train.len(),
        n_test: test.len(),
        skipped,
        skipped_labels: skipped_labels.into_iter().collect(),
        train_seconds: tr.seconds,
        base: local_metrics(&base_conf, &labels),
        finetuned: local_metrics(&tuned_conf, &labels),
        labels,
    };
    let json = dir.join(format!("{digest}.json"));
    maeum_models::write_atomic(&json, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    tracing::info!(model = %digest, base = %report.base_model, head_only = cfg.head_only, "local model fine-tuned");
    Ok((path, report))
}

/// `maeum-site finetune`.
pub fn run(a: FinetuneArgs) -> Result<()> {
    let home = Home::new(&a.home);
    let threads = home.config().map(|c| c.limits.threads).unwrap_or(0);
    if threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    }
    let mut bar = Bar::training(a.json);
    let (path, r) = finetune(&home, &a, &mut bar)?;
    bar.0.finish_and_clear();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["path"] = path.display().to_string().into();
        println!("{v}");
        return Ok(());
    }
    println!(
        "fine-tuned {} on {} local records ({} epochs, {}), compared on {} held-out records",
        &r.base_model[..16],
        r.n_train,
        r.epochs,
        if r.head_only { "output layer only" } else { "all layers" },
        r.n_test
    );
    if r.skipped > 0 {
        println!(
            "  skipped {} records whose label the model does not know: {}",
            r.skipped,
            r.skipped_labels.join(", ")
        );
    }
    println!("{}", comparison_table(&r));
    println!("local model written to {} (kept here, never uploaded)", path.display());
    println!("use it with: maeum-site predict --model {}", &r.model[..16]);
    Ok(())
}

/// Base against fine-tuned: accuracy, macro-F1, then recall by label.
fn comparison_table(r: &LocalModelReport) -> comfy_table::Table {
    let mut t = maeum_runtime::table::table(&["", "n", "base", "fine-tuned"], &[1, 2, 3]);
    let score = |v: f64| format!("{v:.4}");
    t.add_row(vec!["accuracy".into(), r.n_test.to_string(), score(r.base.accuracy), score(r.finetuned.accuracy)]);
    t.add_row(vec!["macro-F1".into(), String::new(), score(r.base.macro_f1), score(r.finetuned.macro_f1)]);
    for (i, l) in r.labels.iter().enumerate() {
        let n: u64 = r.base.confusion.get(i).map_or(0, |row| row.iter().sum());
        // Recall says nothing about a label absent from the test split.
        let recall = |m: &LocalMetrics| match m.per_class_recall.get(l) {
            Some(v) if n > 0 => format!("{v:.3}"),
            _ => "-".into(),
        };
        t.add_row(vec![format!("recall: {l}"), n.to_string(), recall(&r.base), recall(&r.finetuned)]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use maeum_models::model::ModelSpec;
    use maeum_models::params::FlatParams;

    struct Fixture {
        _dir: tempfile::TempDir,
        home: Home,
        digest: String,
        params: FlatParams,
    }

    /// A home with one model (labels calm, crisis) and a site.toml whose train split
    /// also holds `strangers` records of a label the model does not know.
    fn fixture(train: &[(&str, &str)], test: &[(&str, &str)]) -> Fixture {
        let crate::predict::tests::ModelHome { dir, home, digest, params, .. } = crate::predict::tests::model_home();
        let jsonl = |name: &str, records: &[(&str, &str)]| {
            let path = dir.path().join(name);
            let lines: Vec<String> =
                records.iter().map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string()).collect();
            std::fs::write(&path, lines.join("\n")).expect("write");
            path
        };
        let (train, test) = (jsonl("train.jsonl", train), jsonl("test.jsonl", test));
        let toml =
            format!("[data]\ntrain = {:?}\ntest = {:?}\n", train.display().to_string(), test.display().to_string());
        std::fs::write(home.path("site.toml"), toml).expect("site.toml");
        Fixture { _dir: dir, home, digest, params }
    }

    fn records(n: usize) -> Vec<(&'static str, &'static str)> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(("sunny walk in the park with friends", "calm"));
            v.push(("hopeless and alone I cannot go on", "crisis"));
        }
        v
    }

    fn args(f: &Fixture, head_only: bool) -> FinetuneArgs {
        FinetuneArgs {
            home: f.home.dir.clone(),
            model: Some(f.digest[..12].to_owned()),
            epochs: 3,
            learning_rate: 0.05,
            batch_size: 8,
            head_only,
            seed: 0,
            json: true,
        }
    }

    #[test]
    fn the_comparison_table_aligns() {
        let labels = vec!["calm".to_string(), "위기-자살".to_string()];
        let m = |a: f64| LocalMetrics {
            accuracy: a,
            macro_f1: a / 2.0,
            per_class_recall: labels.iter().map(|l| (l.clone(), a)).collect(),
            confusion: vec![vec![3, 1], vec![0, 120]],
        };
        let r = LocalModelReport {
            model: "ab".repeat(32),
            base_model: "cd".repeat(32),
            created_ms: 0,
            labels: labels.clone(),
            epochs: 3,
            learning_rate: 0.01,
            batch_size: 32,
            dropout: 0.0,
            head_only: false,
            seed: 1,
            n_train: 10,
            n_test: 124,
            skipped: 0,
            skipped_labels: vec![],
            train_seconds: 1.0,
            base: m(0.5),
            finetuned: m(0.75),
        };
        maeum_runtime::table::assert_aligned(&comparison_table(&r));
    }

    #[test]
    fn finetune_keeps_a_local_model_beside_the_release_with_its_report() {
        let mut train = records(20);
        train.push(("something else entirely", "other"));
        let f = fixture(&train, &records(5));
        let (path, r) = finetune(&f.home, &args(&f, true), &mut ()).expect("finetune");

        assert_eq!(path, f.home.path(&format!("local-models/{}.safetensors", r.model)));
        let bytes = std::fs::read(&path).expect("model");
        assert_eq!(maeum_protocols::wire::Digest::of(&bytes).hex(), r.model, "named by its SHA-256");
        let json: LocalModelReport = serde_json::from_slice(
            &std::fs::read(f.home.path(&format!("local-models/{}.json", r.model))).expect("report"),
        )
        .expect("json");
        assert_eq!(json, r);
        assert_eq!((r.base_model.as_str(), r.n_train, r.n_test, r.skipped), (f.digest.as_str(), 40, 10, 1));
        assert_eq!(r.skipped_labels, ["other"]);
        for m in [&r.base, &r.finetuned] {
            assert_eq!(m.per_class_recall.keys().collect::<Vec<_>>(), ["calm", "crisis"]);
            assert_eq!(m.confusion.iter().flatten().sum::<u64>(), 10);
        }

        let (_, params, meta) = ModelSpec::load(&path).expect("load");
        assert_eq!(meta.get("maeum.base_model"), Some(&f.digest));
        assert_eq!(meta.get("maeum.local_finetune").map(String::as_str), Some("true"));
        for ((t, before), (_, after)) in f.params.tensors().zip(params.tensors()) {
            let same = before.iter().zip(after).all(|(x, y)| x.to_bits() == y.to_bits());
            assert_eq!(same, !t.name.starts_with("output."), "{}", t.name);
        }
        let models: Vec<_> = std::fs::read_dir(f.home.path("models")).expect("models").flatten().collect();
        assert_eq!(models.len(), 1, "HOME/models is left as it was");
        let loaded = crate::predict::load(&f.home, Some(&r.model[..12])).expect("predict finds the local model");
        assert_eq!(loaded.params, params);
        let (_, again) = finetune(&f.home, &args(&f, true), &mut ()).expect("finetune again");
        assert_eq!(again.model, r.model, "the same base, data and seed give the same file");
    }

    #[test]
    fn errors_say_what_and_where() {
        let check = |f: &Fixture, a: FinetuneArgs, expected: &str| {
            let e = format!("{:#}", finetune(&f.home, &a, &mut ()).expect_err(expected));
            assert!(e.contains(expected), "{e}");
        };
        let f = fixture(&records(2), &records(1));
        check(&f, FinetuneArgs { model: None, ..args(&f, false) }, "pass --model");
        check(&f, FinetuneArgs { epochs: 0, ..args(&f, false) }, "--epochs must be at least 1");
        check(&f, FinetuneArgs { learning_rate: 0.0, ..args(&f, false) }, "learning_rate must be positive");
        std::fs::remove_file(f.home.path("site.toml")).expect("remove");
        check(&f, args(&f, false), "site.toml: No such file");
        let f = fixture(&[("some words", "other")], &records(1));
        check(&f, args(&f, false), "site.toml: [data] train has no records with a label the model knows (1 records");
        let f = fixture(&records(2), &[("some words", "other")]);
        check(&f, args(&f, false), "site.toml: [data] test has no records with a label the model knows");
        assert!(!f.home.path("local-models").exists(), "nothing written on failure");
    }
}
