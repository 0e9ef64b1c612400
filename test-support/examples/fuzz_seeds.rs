//! Writes the generated part of the fuzz seed corpus into `fuzz/corpus/` (the rest are
//! real files from a demo run: see `fuzz/README.md`).
//!
//! `cargo build --workspace --examples && target/debug/examples/fuzz_seeds`

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;

use maeum_models::data::LabelSet;
use maeum_models::features::FeatureConfig;
use maeum_models::model::{ModelSpec, TextClassifierConfig};
use maeum_protocols::wire::pb;

fn write(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn with_kind(kind: u8, bytes: Vec<u8>) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend(bytes);
    v
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");

    // wire: one seed per message kind, empty and filled.
    let model = pb::ModelRef { digest: "ab".repeat(32), size: 4096, layout_digest: "cd".repeat(32) };
    let header = pb::UploadHeader {
        job_id: "demo-1".into(),
        round: 3,
        attempt: 1,
        base_digest: "ab".repeat(32),
        layout_digest: "cd".repeat(32),
        num_params: 1000,
        weight: 1,
        sha256: "ef".repeat(32),
        masked: true,
    };
    let confusion = pb::Confusion { n_labels: 2, counts: vec![5, 1, 2, 7] };
    let seeds: Vec<(u8, Vec<u8>)> = vec![
        (0, pb::Work::default().encode_to_vec()),
        (1, header.encode_to_vec()),
        (2, model.encode_to_vec()),
        (3, pb::EvaluationReport::default().encode_to_vec()),
        (4, confusion.encode_to_vec()),
        (5, pb::SecAggSession::default().encode_to_vec()),
        (6, pb::SecAggAdvertise::default().encode_to_vec()),
        (7, pb::SecAggRequest::default().encode_to_vec()),
        (8, pb::SecAggReply::default().encode_to_vec()),
    ];
    for (kind, bytes) in seeds {
        write(&root, "wire", &format!("kind-{kind}"), &with_kind(kind, bytes));
    }

    // tlog: the known-answer entries, and a checkpoint body.
    let vectors: Vec<serde_json::Value> =
        serde_json::from_str(include_str!("../../protocols/test-vectors/audit-entries.json")).expect("vectors");
    for (i, v) in vectors.iter().enumerate() {
        if let Some(e) = v["entry"].as_str() {
            write(&root, "tlog", &format!("entry-{i:02}"), e.as_bytes());
        }
    }
    write(&root, "tlog", "checkpoint-body", b"maeum.example/demo\n12\nq83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n");

    // job: the documented job file and a DP job.
    let job = "name = \"triage\"\nlabels = [\"anxiety\", \"depression\", \"suicidewatch\"]\nrounds = 4\nmin_sites = 3\n\
               [model]\nkind = \"text-classifier\"\nbuckets = 4096\nembed_dim = 16\nhidden = 32\n\
               [train]\nepochs = 1\n[secure_aggregation]\nclip_norm = 5.0\n";
    write(&root, "job", "plain.toml", job.as_bytes());
    write(
        &root,
        "job",
        "dp.toml",
        format!("{job}[privacy]\nmode = \"local\"\nepsilon = 8.0\nsample_rate = 0.05\n").as_bytes(),
    );
    let spec = maeum_protocols::job::JobSpec::from_toml("seed", job).expect("seed job");
    write(&root, "job", "stored.json", spec.to_json().as_bytes());

    // data: synthetic records (never real posts), JSONL and CSV.
    write(
        &root,
        "data",
        "records.jsonl",
        b"{\"text\": \"I could not sleep again\", \"label\": \"anxiety\"}\n\n{\"text\": \"\xea\xb4\x9c\xec\xb0\xae\xec\x95\x84\xec\x9a\x94\", \"label\": \"depression\"}\n{\"text\": 5}\n",
    );
    write(&root, "data", "records.csv", b"text,label\n\"a, quoted\nline\",anxiety\nplain,depression\n");

    // safetensors: a tiny model file.
    let spec = ModelSpec::TextClassifier {
        config: TextClassifierConfig {
            features: FeatureConfig { buckets: 16, word_ngrams: [1, 1], char_ngrams: [0, 0], max_chars: 50 },
            embed_dim: 2,
            hidden: 2,
        },
        labels: LabelSet::new(vec!["a".into(), "b".into()]).expect("labels"),
    };
    let params = spec.init(1).expect("init");
    let dir = std::env::temp_dir().join(format!("maeum-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let path = dir.join("model.safetensors");
    spec.save(&path, &params, HashMap::new()).expect("save");
    write(&root, "safetensors", "tiny-model", &std::fs::read(&path).expect("model"));
    let _ = std::fs::remove_dir_all(&dir);
    println!("wrote seeds under {}", root.display());
}
