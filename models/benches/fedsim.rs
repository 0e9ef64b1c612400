//! Federated simulation on the real corpus: chooses the demo's default hyper-parameters.
//!
//! `cargo bench --profile dev -p maeum-models --bench fedsim -- [ARGS]`
//!
//! Reproduces the demo's non-IID split (`maeum-site data split`: Dirichlet α = 0.5 over
//! 7 sites, seed 7, then a stratified 80/20 train/test split per site) and compares, on
//! the union of the sites' test splits:
//! - centralized: one model trained on the union of the sites' training splits;
//! - local-only: each site trains alone on its own training split;
//! - federated: `--rounds` rounds; every site starts from the global model, trains
//!   `--local-epochs` epochs, and the server aggregates the deltas Δᵢ = localᵢ − global
//!   weighted by training-set size, with FedAvg (global += η·Δ̄) or FedAdam (Reddi et
//!   al. 2021: adaptive server step on Δ̄, v₀ = τ²), optionally FedProx (`--prox-mu`).
//!
//! Sites train one after another (a simulation). Prints the per-round curve on stderr
//! and one JSON object with every number and the wall seconds per phase on stdout.
//!
//! ARGS: --rounds N (12) --local-epochs E (1) --strategy fedavg|fedadam (fedavg)
//! --server-lr η (1 for fedavg, 0.01 for fedadam) --lr SITE_LR (0.002) --batch B (32)
//! --dropout P (0.5) --prox-mu μ (0) --beta1 (0.9) --beta2 (0.99) --tau (0.001)
//! --sites S (7) --alpha α (0.5) --seed (7) --optimizer adam|sgd (adam) --head-only --buckets (65536) --embed-dim (64)
//! --hidden (128) --skip-baselines --data FILE
//! --model text-classifier|encoder-head|encoder-lora (text-classifier): `encoder-head` embeds the posts
//! with `--encoder NAME` (all-minilm-l6-v2) from data/encoders (scripts/fetch_encoder.py), cached in
//! data/cache/vectors, and trains only the head (`--hidden`). `encoder-lora` runs the
//! encoder's lower layers once per post and trains FFA-LoRA adapters on the top
//! `--lora-layers` (1) at `--lora-rank` (8), `--lora-alpha` (32), and the head.
//!
//! Differential privacy (local mode, docs/protocols/privacy.md): --dp-sigma σ or
//! --dp-epsilon ε (σ calibrated by the accountant for --dp-delta δ (1e-5) over all
//! rounds), --dp-clip C (1), --dp-q q (Poisson sampling rate, 0.05): every site runs
//! ⌈E/q⌉ DP-SGD steps per round instead of E epochs of minibatches.
//! `--dp-mode distributed`: each round is one DP-SGD step over the union of the sites'
//! records (`maeum_models::ddp`): every site Poisson-samples at q, sums its clipped
//! gradients and adds a Skellam share for `--dp-shares` m (the number of sites) honest
//! sites, bounded by `--dp-max-batch` B (1024); the words are summed mod 2^32, decoded,
//! and the server steps with the mean of the negated sums (use `--strategy fedadam`).
//!
//! Membership inference: the loss-threshold attack (Yeom et al. 2018) on the final global
//! model, members = the union of the sites' training splits, non-members = the union of
//! their test splits; reports the attack's AUC and its best advantage max(TPR − FPR).

use std::path::PathBuf;
use std::time::Instant;

use maeum_models::data::{self, Example, LabelSet, ReadOptions};
use maeum_models::metrics::Metrics;
use maeum_models::model::{ModelSpec, Prepared, TextClassifierConfig};
use maeum_models::nn::TrainConfig;
use maeum_models::params::FlatParams;
use maeum_models::split;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Strategy {
    FedAvg,
    FedAdam,
}

/// FedAdam server state (no bias correction, as in Reddi et al.).
#[derive(Debug)]
struct ServerAdam {
    m: Vec<f32>,
    v: Vec<f32>,
    beta1: f32,
    beta2: f32,
    tau: f32,
}

impl ServerAdam {
    fn new(n: usize, beta1: f32, beta2: f32, tau: f32) -> Self {
        Self { m: vec![0.0; n], v: vec![tau * tau; n], beta1, beta2, tau }
    }

    fn step(&mut self, global: &mut [f32], delta: &[f32], lr: f32) {
        let (b1, b2, tau) = (self.beta1, self.beta2, self.tau);
        for (((w, d), m), v) in global.iter_mut().zip(delta).zip(&mut self.m).zip(&mut self.v) {
            *m = b1 * *m + (1.0 - b1) * d;
            *v = b2 * *v + (1.0 - b2) * d * d;
            *w += lr * *m / (v.sqrt() + tau);
        }
    }
}

struct Site {
    train: Prepared,
    n_train: usize,
}

fn metrics(spec: &ModelSpec, params: &FlatParams, test: &Prepared) -> Metrics {
    spec.evaluate(params, test).expect("evaluate").metrics()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let num = |name: &str, default: f64| -> f64 {
        flag(name).map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number: {v}"))).unwrap_or(default)
    };
    let strategy = match flag("--strategy").as_deref().unwrap_or("fedavg") {
        "fedavg" => Strategy::FedAvg,
        "fedadam" => Strategy::FedAdam,
        other => panic!("--strategy must be fedavg or fedadam, got {other}"),
    };
    let defaults = TrainConfig::default();
    let rounds = num("--rounds", 12.0) as usize;
    let local_epochs = num("--local-epochs", 1.0) as usize;
    let server_lr = num("--server-lr", if strategy == Strategy::FedAvg { 1.0 } else { 0.01 }) as f32;
    let site_lr = num("--lr", defaults.learning_rate);
    let batch_size = num("--batch", defaults.batch_size as f64) as usize;
    let dropout = num("--dropout", defaults.dropout);
    let prox_mu = num("--prox-mu", 0.0);
    let (beta1, beta2, tau) = (num("--beta1", 0.9) as f32, num("--beta2", 0.99) as f32, num("--tau", 1e-3) as f32);
    let n_sites = num("--sites", 7.0) as usize;
    let alpha = num("--alpha", 0.5);
    let seed = num("--seed", 7.0) as u64;
    let skip_baselines = args.iter().any(|a| a == "--skip-baselines");
    let dp_clip = num("--dp-clip", 1.0);
    let dp_q = num("--dp-q", 0.05);
    let dp_delta = num("--dp-delta", 1e-5);
    let distributed = match flag("--dp-mode").as_deref().unwrap_or("local") {
        "local" => false,
        "distributed" => true,
        other => panic!("--dp-mode must be local or distributed, got {other}"),
    };
    let dp_steps_per_round = if distributed { 1 } else { (local_epochs as f64 / dp_q).ceil() as u64 };
    let dp_sigma = match (flag("--dp-sigma"), flag("--dp-epsilon")) {
        (None, Some(_)) if distributed => None,
        (Some(_), _) => Some(num("--dp-sigma", 0.0)),
        (None, Some(_)) => Some(
            maeum_models::accountant::noise_multiplier_for(
                num("--dp-epsilon", 0.0),
                dp_delta,
                dp_q,
                dp_steps_per_round * rounds as u64,
            )
            .expect("valid DP parameters")
            .expect("a noise multiplier meets the target"),
        ),
        (None, None) => None,
    };
    let dp_epsilon = dp_sigma.map(|sigma| {
        maeum_models::accountant::dp_sgd_epsilon(dp_q, sigma, dp_steps_per_round * rounds as u64, dp_delta)
            .expect("valid DP parameters")
    });
    // The distributed mode is calibrated once the model's dimension is known (below).
    let dp_shares = num("--dp-shares", n_sites as f64) as u32;
    let dp_max_batch = num("--dp-max-batch", 1024.0) as u32;
    if let (Some(sigma), Some(eps)) = (dp_sigma, dp_epsilon) {
        eprintln!(
            "DP-SGD: C {dp_clip}, q {dp_q}, σ {sigma:.4}, {} steps per round → ε {eps:.3} at δ {dp_delta}",
            dp_steps_per_round
        );
    }

    let t_all = Instant::now();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = flag("--data").map(PathBuf::from).unwrap_or_else(|| root.join("data/rmhd.jsonl"));
    let report = data::read_examples(&path, &ReadOptions::default())
        .unwrap_or_else(|e| panic!("{e} (run `python3 scripts/fetch_rmhd.py` first)"));
    let examples = &report.examples;
    let labels = LabelSet::from_examples(examples).expect("labels");
    let idx: Vec<usize> = examples.iter().map(|e| labels.index(&e.label).expect("label in set")).collect();

    // The demo's split (site-agent `write_split`).
    let t = Instant::now();
    let shards = split::dirichlet_shards(&idx, n_sites, alpha, 20, seed).expect("shards");
    let mut model = TextClassifierConfig::default();
    model.features.buckets = num("--buckets", f64::from(model.features.buckets)) as u32;
    model.embed_dim = num("--embed-dim", model.embed_dim as f64) as usize;
    model.hidden = num("--hidden", model.hidden as f64) as usize;
    let encoder_name = flag("--encoder").unwrap_or_else(|| "all-minilm-l6-v2".into());
    let encoder = maeum_models::encoder::known(&encoder_name).expect("--encoder: a known encoder");
    let spec = match flag("--model").as_deref().unwrap_or("text-classifier") {
        "text-classifier" => ModelSpec::TextClassifier { config: model, labels: labels.clone() },
        "encoder-head" => {
            ModelSpec::EncoderHead { encoder: encoder.clone(), hidden: model.hidden, labels: labels.clone() }
        }
        "encoder-lora" => ModelSpec::EncoderLora {
            encoder: encoder.clone(),
            lora: maeum_models::lora::LoraConfig {
                layers: num("--lora-layers", maeum_models::lora::LoraConfig::default().layers as f64) as usize,
                rank: num("--lora-rank", maeum_models::lora::LoraConfig::default().rank as f64) as usize,
                alpha: num("--lora-alpha", f64::from(maeum_models::lora::LoraConfig::default().alpha)) as f32,
                seed,
            },
            hidden: model.hidden,
            labels: labels.clone(),
        },
        other => panic!("--model must be text-classifier, encoder-head or encoder-lora, got {other}"),
    };
    let encoders = std::cell::RefCell::new(maeum_models::encoder::Encoders::new(
        root.join("data/encoders"),
        Some(root.join("data/cache/vectors")),
    ));
    let prep = |ex: &[Example]| -> Prepared {
        spec.prepare_text_in(ex, &mut encoders.borrow_mut(), &mut |_, _| {}).expect("featurise")
    };
    let (mut all_train, mut all_test): (Vec<Example>, Vec<Example>) = (Vec::new(), Vec::new());
    let mut sites = Vec::new();
    for (s, rows) in shards.iter().enumerate() {
        let local_labels: Vec<usize> = rows.iter().map(|&r| idx[r]).collect();
        let (tr, te) = split::stratified_split(&local_labels, 0.2, seed.wrapping_add(s as u64 + 1));
        let pick = |v: &[usize]| v.iter().map(|&i| examples[rows[i]].clone()).collect::<Vec<_>>();
        let (tr, te) = (pick(&tr), pick(&te));
        all_train.extend(tr.iter().cloned());
        all_test.extend(te);
        sites.push(Site { n_train: tr.len(), train: prep(&tr) });
    }
    let test = prep(&all_test);
    let featurise_s = t.elapsed().as_secs_f64();
    let site_sizes: Vec<usize> = sites.iter().map(|s| s.n_train).collect();
    eprintln!(
        "{} sites, train sizes {site_sizes:?} (total {}), union test {}",
        n_sites,
        all_train.len(),
        all_test.len()
    );

    let optimizer = match flag("--optimizer").as_deref().unwrap_or("adam") {
        "adam" => maeum_models::nn::Optimizer::Adam,
        "sgd" => maeum_models::nn::Optimizer::Sgd,
        other => panic!("--optimizer must be adam or sgd, got {other}"),
    };
    let head_only = args.iter().any(|a| a == "--head-only");
    let base_cfg = TrainConfig {
        optimizer,
        learning_rate: site_lr,
        batch_size,
        dropout,
        seed,
        head_only,
        ..TrainConfig::default()
    };
    let init = spec.init(seed).expect("init");

    // Baselines: the default TrainConfig (8 epochs), as `train-local` would run.
    let mut baselines = serde_json::Value::Null;
    if !skip_baselines {
        let cfg = TrainConfig { seed, ..TrainConfig::default() };
        let t = Instant::now();
        let central_train = prep(&all_train);
        let (p, _) = spec.train(&init, &central_train, &cfg, &mut ()).expect("train");
        let central = metrics(&spec, &p, &test);
        let central_s = t.elapsed().as_secs_f64();
        eprintln!("centralized: acc {:.4} f1 {:.4} ({central_s:.1} s)", central.accuracy, central.macro_f1);
        let t = Instant::now();
        let mut local = Vec::new();
        for (s, site) in sites.iter().enumerate() {
            let (p, _) = spec.train(&init, &site.train, &cfg, &mut ()).expect("train");
            let m = metrics(&spec, &p, &test);
            eprintln!("local-only site-{}: acc {:.4} f1 {:.4}", s + 1, m.accuracy, m.macro_f1);
            local.push(m);
        }
        let local_s = t.elapsed().as_secs_f64();
        let accs: Vec<f64> = local.iter().map(|m| m.accuracy).collect();
        let f1s: Vec<f64> = local.iter().map(|m| m.macro_f1).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (mean_acc, mean_f1) = (mean(&accs), mean(&f1s));
        eprintln!("local-only mean: acc {mean_acc:.4} f1 {mean_f1:.4} ({local_s:.1} s)");
        baselines = serde_json::json!({
            "epochs": cfg.epochs, "lr": cfg.learning_rate,
            "centralized": { "accuracy": central.accuracy, "macro_f1": central.macro_f1, "seconds": central_s },
            "local_only": {
                "mean_accuracy": mean_acc, "mean_macro_f1": mean_f1,
                "min_accuracy": accs.iter().copied().fold(f64::INFINITY, f64::min),
                "max_accuracy": accs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                "accuracy": accs, "macro_f1": f1s, "seconds": local_s,
            },
        });
    }

    // Federated rounds.
    let layout = init.layout().clone();
    let mut global = init.into_values();
    let n_params = global.len();
    let total_n: f64 = site_sizes.iter().sum::<usize>() as f64;
    let mut adam = (strategy == Strategy::FedAdam).then(|| ServerAdam::new(n_params, beta1, beta2, tau));
    let ddp = distributed.then(|| {
        let mech = |z: f64| maeum_models::ddp::DistributedDp {
            clip: dp_clip,
            noise_multiplier: z,
            sample_rate: dp_q,
            dimension: n_params as u64,
            noise_shares: dp_shares,
            max_batch: dp_max_batch,
        };
        let z = match (flag("--dp-sigma"), flag("--dp-epsilon")) {
            (Some(_), _) => num("--dp-sigma", 0.0),
            (None, Some(_)) => {
                maeum_models::accountant::calibrate(num("--dp-epsilon", 0.0), dp_delta, &|z| mech(z).rdp(rounds as u64))
                    .expect("valid DP parameters")
                    .expect("a noise multiplier meets the target")
            }
            (None, None) => panic!("--dp-mode distributed needs --dp-epsilon or --dp-sigma"),
        };
        let m = mech(z);
        let eps = m.rdp(rounds as u64).and_then(|r| r.epsilon(dp_delta)).expect("epsilon");
        eprintln!(
            "distributed DP: C {dp_clip}, q {dp_q}, z {z:.4}, {dp_shares} shares, d {n_params}, B {dp_max_batch}, \
             {rounds} rounds → ε {eps:.3} at δ {dp_delta} (at most {} sites)",
            m.max_parties()
        );
        (m, eps)
    });
    let (mut train_s, mut eval_s, mut agg_s) = (0.0f64, 0.0f64, 0.0f64);
    let mut curve = Vec::new();
    let mut last = None;
    for r in 0..rounds {
        let start = FlatParams::new(layout.clone(), global.clone()).expect("layout");
        let mut delta = vec![0f64; n_params];
        if let Some((m, _)) = &ddp {
            // One DP-SGD step over the union: the sites' words summed mod 2^32, decoded, and
            // the mean over the sites of the negated noisy gradient sum handed to the server.
            let t = Instant::now();
            let mut words = vec![0u32; n_params];
            for (s, site) in sites.iter().enumerate() {
                let site_seed = seed.wrapping_add(1000 * (r as u64 + 1) + s as u64);
                let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(site_seed);
                let (w, _, _) =
                    spec.distributed_contribution(&start, &site.train, dropout, m, &mut rng).expect("contribution");
                words.iter_mut().zip(&w).for_each(|(a, b)| *a = a.wrapping_add(*b));
            }
            train_s += t.elapsed().as_secs_f64();
            m.decode(&words, &mut delta);
            delta.iter_mut().for_each(|d| *d = -*d / n_sites as f64);
        }
        for (s, site) in sites.iter().enumerate().filter(|_| ddp.is_none()) {
            let cfg = TrainConfig {
                epochs: local_epochs,
                prox_mu,
                seed: seed.wrapping_add(1000 * (r as u64 + 1) + s as u64),
                ..base_cfg.clone()
            };
            let t = Instant::now();
            let (local, _) = match dp_sigma {
                None => spec.train(&start, &site.train, &cfg, &mut ()).expect("train"),
                Some(sigma) => {
                    let dp = maeum_models::dp::DpSgd {
                        clip: dp_clip,
                        noise_multiplier: sigma,
                        sample_rate: dp_q,
                        steps: dp_steps_per_round,
                    };
                    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(cfg.seed);
                    spec.train_dp(&start, &site.train, &cfg, &dp, &mut rng, &mut ()).expect("train")
                }
            };
            train_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let w = site.n_train as f64 / total_n;
            for ((d, l), g) in delta.iter_mut().zip(local.values()).zip(&global) {
                *d += w * f64::from(l - g);
            }
            agg_s += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let delta: Vec<f32> = delta.into_iter().map(|d| d as f32).collect();
        match &mut adam {
            None => global.iter_mut().zip(&delta).for_each(|(g, d)| *g += server_lr * d),
            Some(a) => a.step(&mut global, &delta, server_lr),
        }
        agg_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let params = FlatParams::new(layout.clone(), global.clone()).expect("layout");
        let m = metrics(&spec, &params, &test);
        eval_s += t.elapsed().as_secs_f64();
        eprintln!("round {:>2}: acc {:.4} f1 {:.4} (training {:.1} s so far)", r + 1, m.accuracy, m.macro_f1, train_s);
        curve.push(serde_json::json!({ "round": r + 1, "accuracy": m.accuracy, "macro_f1": m.macro_f1 }));
        last = Some(m);
    }
    let (acc, f1) = last.map_or((f64::NAN, f64::NAN), |m| (m.accuracy, m.macro_f1));
    let final_params = FlatParams::new(layout.clone(), global.clone()).expect("layout");
    let mia = membership_inference(&spec, &final_params, &prep(&all_train), &test);
    eprintln!("membership inference (loss threshold): AUC {:.4}, advantage {:.4}", mia.0, mia.1);
    let best = curve.iter().filter_map(|c| c["accuracy"].as_f64()).fold(f64::NAN, f64::max);

    let mut out = serde_json::json!({
        "bench": "federated simulation (sites sequential), text classifier, union of site test splits",
        "config": {
            "strategy": match strategy { Strategy::FedAvg => "fedavg", Strategy::FedAdam => "fedadam" },
            "rounds": rounds, "local_epochs": local_epochs, "rounds_x_epochs": rounds * local_epochs,
            "site_lr": site_lr, "server_lr": server_lr, "batch_size": batch_size, "dropout": dropout,
            "prox_mu": prox_mu, "beta1": beta1, "beta2": beta2, "tau": tau,
            "sites": n_sites, "alpha": alpha, "seed": seed,
        },
        "n_train": all_train.len(), "n_test": all_test.len(), "site_train_sizes": site_sizes,
        "parameters": n_params,
        "federated": { "accuracy": acc, "macro_f1": f1, "best_round_accuracy": best, "curve": curve },
        "dp": if let Some((m, eps)) = &ddp { Some(serde_json::json!({
            "mode": "distributed", "clip": dp_clip, "sample_rate": dp_q, "noise_multiplier": m.noise_multiplier,
            "noise_shares": m.noise_shares, "max_batch": m.max_batch, "dimension": m.dimension,
            "steps_per_round": 1, "delta": dp_delta, "epsilon": eps,
        })) } else { dp_sigma.map(|sigma| serde_json::json!({
            "mode": "local", "clip": dp_clip, "sample_rate": dp_q, "noise_multiplier": sigma,
            "steps_per_round": dp_steps_per_round, "delta": dp_delta, "epsilon": dp_epsilon,
        })) },
        "membership_inference": { "attack": "loss threshold", "auc": mia.0, "advantage": mia.1 },
        "baselines": baselines,
        "seconds": {
            "featurise": featurise_s, "federated_training": train_s, "aggregation": agg_s,
            "evaluation": eval_s, "total": t_all.elapsed().as_secs_f64(),
        },
    });
    if let (Some(c), Some(l)) =
        (out["baselines"]["centralized"]["accuracy"].as_f64(), out["baselines"]["local_only"]["mean_accuracy"].as_f64())
    {
        out["gap_to_centralized"] = serde_json::json!(acc - c);
        out["gain_over_local_mean"] = serde_json::json!(acc - l);
        out["meets_bars"] = serde_json::json!(acc >= c - 0.02 && acc >= l + 0.10);
    }
    println!("{out}");
}

/// The loss-threshold membership-inference attack: AUC of −loss separating `members`
/// from `non_members`, and the best advantage max over thresholds of TPR − FPR.
fn membership_inference(
    spec: &ModelSpec,
    params: &FlatParams,
    members: &Prepared,
    non_members: &Prepared,
) -> (f64, f64) {
    let losses = |data: &Prepared| -> Vec<f64> {
        let probs = spec.predict_proba(params, data).expect("predict");
        probs.iter().zip(data.labels()).map(|(p, &y)| -f64::from(p[y]).max(1e-30).ln()).collect()
    };
    let (m, n) = (losses(members), losses(non_members));
    // Score = −loss; label 1 = member. Sort by score descending and sweep.
    let mut all: Vec<(f64, bool)> = m.iter().map(|&l| (-l, true)).chain(n.iter().map(|&l| (-l, false))).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (pos, neg) = (m.len() as f64, n.len() as f64);
    let (mut tp, mut fp, mut auc, mut adv) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut i = 0;
    while i < all.len() {
        let (mut dtp, mut dfp) = (0.0, 0.0);
        let score = all[i].0;
        while i < all.len() && all[i].0 == score {
            if all[i].1 {
                dtp += 1.0
            } else {
                dfp += 1.0
            }
            i += 1;
        }
        // Trapezoid over ties.
        auc += (dfp / neg) * (tp + dtp / 2.0) / pos;
        tp += dtp;
        fp += dfp;
        adv = adv.max(tp / pos - fp / neg);
    }
    (auc, adv)
}
