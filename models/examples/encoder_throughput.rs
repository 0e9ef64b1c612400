//! Encoder forward throughput on the real corpus (posts/s at `max_tokens` = 128).
//!
//! `cargo build --workspace --examples && target/debug/examples/encoder_throughput [--posts 512] [--encoder NAME]`
//!
//! (The dev profile builds every dependency and `maeum-models` at opt-level 3, so this
//! measures optimised code without a separate release build of burn.) Uses the first
//! `--posts` posts of `data/rmhd.jsonl` and the encoder (`--encoder`, default
//! all-minilm-l6-v2) fetched by `scripts/fetch_encoder.py --encoder NAME`. Prints one JSON object: tokenisation and forward time,
//! posts/s, mean tokens per post. `scripts/torch_encoder_throughput.py` measures
//! PyTorch on the same posts.

use std::path::PathBuf;
use std::time::Instant;

use maeum_models::data::{self, ReadOptions};
use maeum_models::encoder::{self, Encoder};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let posts: usize = flag("--posts").and_then(|v| v.parse().ok()).unwrap_or(512);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let report = data::read_examples(&root.join("data/rmhd.jsonl"), &ReadOptions::default())
        .unwrap_or_else(|e| panic!("{e} (run `python3 scripts/fetch_rmhd.py` first)"));
    let texts: Vec<&str> = report.examples.iter().take(posts).map(|e| e.text.as_str()).collect();
    let name = flag("--encoder").unwrap_or_else(|| "all-minilm-l6-v2".into());
    let spec = encoder::known(&name).unwrap_or_else(|| panic!("--encoder: known are {}", encoder::known_names()));
    let t = Instant::now();
    let enc = Encoder::load(&root.join("data/encoders").join(&name), &spec)
        .unwrap_or_else(|e| panic!("{e} (run `python3 scripts/fetch_encoder.py --encoder {name}` first)"));
    let load_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ids = enc.tokenize(&texts).expect("tokenize");
    let tokenize_s = t.elapsed().as_secs_f64();
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let t = Instant::now();
    let v = enc.embed_ids(&ids, &mut |_| {});
    let forward_s = t.elapsed().as_secs_f64();
    assert_eq!(v.len(), texts.len() * spec.dim);
    let line = serde_json::json!({
        "encoder": name,
        "posts": texts.len(),
        "mean_tokens": tokens as f64 / texts.len() as f64,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_s": load_s,
        "tokenize_s": tokenize_s,
        "forward_s": forward_s,
        "posts_per_s": texts.len() as f64 / (tokenize_s + forward_s),
    });
    println!("{line}");
}
