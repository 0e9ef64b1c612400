//! Local-training throughput of the text classifier on the real corpus.
//!
//! `cargo bench -p maeum-models --bench train_throughput [-- --epochs 8 --export FILE]`
//!
//! Uses `data/rmhd.jsonl` (run `python3 scripts/fetch_rmhd.py` first), the stratified
//! 80/20 split with seed 7 and the default hyper-parameters. Prints one JSON object:
//! featurisation and training examples/s, accuracy and macro-F1. `--export FILE`
//! writes the featurised split (bucket ids, weights, label, split) as JSONL so that
//! `benches/torch_text_classifier.py` trains the same architecture on identical inputs.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use maeum_models::data::{self, LabelSet, ReadOptions};
use maeum_models::model::{ModelSpec, Prepared, TextClassifierConfig};
use maeum_models::nn::TrainConfig;
use maeum_models::split::stratified_split;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let epochs: usize = flag("--epochs").and_then(|v| v.parse().ok()).unwrap_or(TrainConfig::default().epochs);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = flag("--data").map(PathBuf::from).unwrap_or_else(|| root.join("data/rmhd.jsonl"));
    let report = data::read_examples(&path, &ReadOptions::default())
        .unwrap_or_else(|e| panic!("{e} (run `python3 scripts/fetch_rmhd.py` first)"));
    let labels = LabelSet::from_examples(&report.examples).expect("labels");
    let idx: Vec<usize> = report.examples.iter().filter_map(|e| labels.index(&e.label)).collect();
    let (train_rows, test_rows) = stratified_split(&idx, 0.2, 7);
    let pick = |rows: &[usize]| rows.iter().map(|&r| report.examples[r].clone()).collect::<Vec<_>>();
    let (train_ex, test_ex) = (pick(&train_rows), pick(&test_rows));
    let spec = ModelSpec::TextClassifier { config: TextClassifierConfig::default(), labels: labels.clone() };

    let t = Instant::now();
    let train = spec.prepare_text(&train_ex).expect("featurise");
    let featurise_per_s = train_ex.len() as f64 / t.elapsed().as_secs_f64();
    let test = spec.prepare_text(&test_ex).expect("featurise");

    if let Some(out) = flag("--export") {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&out).expect("create export"));
        for (split, data) in [("train", &train), ("test", &test)] {
            let Prepared::Text(d) = data else { unreachable!("text spec") };
            for (doc, label) in d.docs.iter().zip(&d.labels) {
                let line =
                    serde_json::json!({ "split": split, "label": label, "ids": doc.ids, "weights": doc.weights });
                writeln!(w, "{line}").expect("write export");
            }
        }
        eprintln!("exported features to {out}");
    }

    let cfg = TrainConfig { epochs, ..TrainConfig::default() };
    let start = spec.init(cfg.seed).expect("init");
    let (params, tr) = spec.train(&start, &train, &cfg, &mut ()).expect("train");
    let m = spec.evaluate(&params, &test).expect("evaluate").metrics();
    let nnz: usize = match &train {
        Prepared::Text(d) => d.docs.iter().map(|d| d.ids.len()).sum(),
        Prepared::Tabular(_) | Prepared::Tokens(_) | Prepared::Labels(_) => 0,
    };
    let out = serde_json::json!({
        "bench": "text-classifier local training (rust, burn flex + sparse embedding bag)",
        "n_train": train.len(), "n_test": test.len(), "epochs": epochs, "batch_size": cfg.batch_size,
        "parameters": params.values().len(), "mean_features_per_doc": nnz as f64 / train.len() as f64,
        "featurise_examples_per_s": featurise_per_s,
        "train_seconds": tr.seconds, "train_examples_per_s": tr.examples_seen as f64 / tr.seconds,
        "accuracy": m.accuracy, "macro_f1": m.macro_f1,
    });
    println!("{out}");
}
