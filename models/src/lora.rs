//! Federated fine-tuning of a pretrained encoder's top layers with LoRA adapters, in the
//! FFA-LoRA form (Sun et al., ICLR 2024) so that it stays exact under secure aggregation.
//!
//! Each attention projection `W` (query, key, value and the attention output) of the
//! encoder's top `layers` layers becomes `W + s·A·B` with `s = alpha / rank`. `A`
//! (`h × rank`) is **frozen and drawn from a seed in the model spec**, so every site
//! holds the same `A`; only `B` (`rank × h`, zero at the start) is trained, with the
//! MLP head on the pooled vector. The update that travels is `B` and the head. Because
//! `A` is shared and fixed, the effective weight is linear in `B`:
//! `W + s·A·mean(B_k) = mean(W + s·A·B_k)`, so the mean of the sites' parameters — what
//! secure aggregation delivers — *is* the mean of their models. (Averaging `A` and `B`
//! separately, as when both are trained, is not: `mean(A_k)·mean(B_k) ≠ mean(A_k·B_k)`.)
//!
//! The layers below the first adapted one are frozen too: a site runs them once per
//! record ([`crate::encoder::Encoder::hidden_states`]) and trains on their outputs. The
//! adapted layers' own weights come from the encoder files the site installed, never
//! from the coordinator; the model file carries only `B` and the head, and names the
//! encoder by digest.
//!
//! With `B = 0` the network computes exactly the frozen encoder's sentence vector and the
//! head on it, i.e. an `encoder-head` model.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, relu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::nn::{Examples, Network, spec, xavier};
use crate::params::{FlatParams, Layout, TensorSpec};
use crate::transformer::{TopLayers, pool};

/// The projections that carry adapters, in layout order.
pub const PROJECTIONS: [&str; 4] = ["query", "key", "value", "attn_out"];

/// Adapter hyper-parameters: part of the model spec, so of the job, every model file and
/// the release's card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// How many of the encoder's top layers carry adapters; the layers below are frozen.
    pub layers: usize,
    /// The adapters' rank `r`.
    pub rank: usize,
    /// The scale is `alpha / rank`.
    pub alpha: f32,
    /// Seed of the frozen `A` matrices (the same at every site).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { layers: 1, rank: 8, alpha: 32.0, seed: 0 }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.layers == 0 || self.layers > 64 {
            return Err(format!("lora layers must be in 1..=64, got {}", self.layers));
        }
        if self.rank == 0 || self.rank > 256 {
            return Err(format!("lora rank must be in 1..=256, got {}", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("lora alpha must be positive, got {}", self.alpha));
        }
        Ok(())
    }

    fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// The trained tensors: `B` for each adapted layer and projection, then the head.
pub fn layout(cfg: &LoraConfig, dim: usize, hidden: usize, n_labels: usize) -> Layout {
    let mut t = Vec::with_capacity(cfg.layers * PROJECTIONS.len() + 4);
    for i in 0..cfg.layers {
        for p in PROJECTIONS {
            t.push(spec(&format!("adapter.{i}.{p}.lora_b"), &[cfg.rank, dim]));
        }
    }
    t.push(spec("head.hidden.weight", &[dim, hidden]));
    t.push(spec("head.hidden.bias", &[hidden]));
    t.push(spec("head.output.weight", &[hidden, n_labels]));
    t.push(spec("head.output.bias", &[n_labels]));
    Layout::new(t)
}

/// Seeded initial parameters: `B = 0` (the model starts as the frozen encoder), the
/// head Xavier-uniform with zero biases.
pub fn init(cfg: &LoraConfig, dim: usize, hidden: usize, n_labels: usize, seed: u64) -> FlatParams {
    crate::nn::init_layout::<LoraNet>(layout(cfg, dim, hidden, n_labels), seed)
}

/// The frozen `A` (`dim × rank`, row-major) of adapted layer `layer`, projection
/// `proj`: uniform in ±1/√dim (PyTorch's Kaiming-uniform default for LoRA's `A`), one
/// ChaCha20 stream per matrix, so any site draws the same values from the seed.
pub fn a_matrix(cfg: &LoraConfig, layer: usize, proj: usize, dim: usize) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
    rng.set_stream((layer * PROJECTIONS.len() + proj) as u64);
    let bound = 1.0 / (dim as f64).sqrt();
    (0..dim * cfg.rank).map(|_| rng.random_range(-bound..bound) as f32).collect()
}

/// Architecture of an adapted encoder: the frozen top layers (from the site's encoder
/// files), the adapters and the head.
#[derive(Clone, Debug)]
pub struct LoraArch {
    pub frozen: Arc<TopLayers>,
    pub lora: LoraConfig,
    pub hidden: usize,
    pub n_labels: usize,
}

/// Each record's hidden states entering the first adapted layer (`len × dim`, no
/// padding), with the frozen layers they go through.
#[derive(Clone)]
pub struct TokenData {
    pub states: Vec<Vec<f32>>,
    pub labels: Vec<usize>,
    pub frozen: Arc<TopLayers>,
}

impl std::fmt::Debug for TokenData {
    // States are derived from local records: show only their shape.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens: usize = self.states.iter().map(Vec::len).sum::<usize>() / self.frozen.hidden.max(1);
        write!(f, "TokenData {{ {} records, {tokens} tokens, {:?} }}", self.states.len(), self.frozen)
    }
}

/// A padded batch of token states.
pub struct TokenBatch {
    x: Tensor<2>,
    mask: Tensor<2>,
    b: usize,
    len: usize,
}

impl std::fmt::Debug for TokenBatch {
    // The states are derived from local records: only the shape.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenBatch {{ {} × {} }}", self.b, self.len)
    }
}

impl Examples for TokenData {
    type Batch = TokenBatch;
    fn len(&self) -> usize {
        self.states.len()
    }
    fn label(&self, row: usize) -> usize {
        self.labels[row]
    }
    fn batch(&self, rows: &[usize], device: &Device) -> TokenBatch {
        let h = self.frozen.hidden;
        let len = rows.iter().map(|&r| self.states[r].len() / h).max().unwrap_or(1).max(1);
        let mut x = vec![0f32; rows.len() * len * h];
        let mut mask = vec![0f32; rows.len() * len];
        for (j, &r) in rows.iter().enumerate() {
            let s = &self.states[r];
            x[j * len * h..j * len * h + s.len()].copy_from_slice(s);
            mask[j * len..j * len + s.len() / h].fill(1.0);
        }
        TokenBatch {
            x: Tensor::from_data(TensorData::new(x, [rows.len() * len, h]), device),
            mask: Tensor::from_data(TensorData::new(mask, [rows.len(), len]), device),
            b: rows.len(),
            len,
        }
    }
}

/// One frozen transformer layer on the device.
#[derive(Module, Debug)]
struct FrozenLayer {
    qkv_w: Tensor<2>,
    qkv_b: Tensor<2>,
    attn_out_w: Tensor<2>,
    attn_out_b: Tensor<2>,
    attn_gamma: Tensor<2>,
    attn_beta: Tensor<2>,
    inter_w: Tensor<2>,
    inter_b: Tensor<2>,
    out_w: Tensor<2>,
    out_b: Tensor<2>,
    out_gamma: Tensor<2>,
    out_beta: Tensor<2>,
}

/// The adapted encoder top and its head. Parameters (in layout order): every `B`, then
/// the head; the frozen layers and the `A` matrices are constants.
#[derive(Module, Debug)]
pub struct LoraNet {
    b: Vec<Param<Tensor<2>>>,
    hidden_w: Param<Tensor<2>>,
    hidden_b: Param<Tensor<1>>,
    output_w: Param<Tensor<2>>,
    output_b: Param<Tensor<1>>,
    a: Vec<Tensor<2>>,
    frozen: Vec<FrozenLayer>,
    heads: usize,
    scale: f32,
    eps: f64,
}

fn layer_norm(x: Tensor<2>, gamma: &Tensor<2>, beta: &Tensor<2>, eps: f64) -> Tensor<2> {
    let (var, mean) = x.clone().var_mean_bias(1);
    (x - mean) / (var + eps).sqrt() * gamma.clone() + beta.clone()
}

impl Network for LoraNet {
    type Data = TokenData;
    type Arch = LoraArch;

    fn layout_of(a: &LoraArch) -> Layout {
        layout(&a.lora, a.frozen.hidden, a.hidden, a.n_labels)
    }

    fn zeros(a: &LoraArch, device: &Device) -> Self {
        let h = a.frozen.hidden;
        let t2 = |v: &[f32], rows: usize, cols: usize| {
            Tensor::<2>::from_data(TensorData::new(v.to_vec(), [rows, cols]), device)
        };
        let row = |v: &[f32]| t2(v, 1, v.len());
        let frozen = a
            .frozen
            .layers
            .iter()
            .map(|l| FrozenLayer {
                qkv_w: t2(&l.qkv.0, h, 3 * h),
                qkv_b: row(&l.qkv.1),
                attn_out_w: t2(&l.attn_out.0, h, h),
                attn_out_b: row(&l.attn_out.1),
                attn_gamma: row(&l.attn_norm.0),
                attn_beta: row(&l.attn_norm.1),
                inter_w: t2(&l.inter.0, h, a.frozen.intermediate),
                inter_b: row(&l.inter.1),
                out_w: t2(&l.out.0, a.frozen.intermediate, h),
                out_b: row(&l.out.1),
                out_gamma: row(&l.out_norm.0),
                out_beta: row(&l.out_norm.1),
            })
            .collect();
        let mut mats = Vec::new();
        let mut bs = Vec::new();
        for layer in 0..a.lora.layers {
            for proj in 0..PROJECTIONS.len() {
                mats.push(t2(&a_matrix(&a.lora, layer, proj, h), h, a.lora.rank));
                bs.push(Param::from_tensor(Tensor::zeros([a.lora.rank, h], device)));
            }
        }
        Self {
            b: bs,
            hidden_w: Param::from_tensor(Tensor::zeros([h, a.hidden], device)),
            hidden_b: Param::from_tensor(Tensor::zeros([a.hidden], device)),
            output_w: Param::from_tensor(Tensor::zeros([a.hidden, a.n_labels], device)),
            output_b: Param::from_tensor(Tensor::zeros([a.n_labels], device)),
            a: mats,
            frozen,
            heads: a.frozen.heads,
            scale: a.lora.scale(),
            eps: a.frozen.eps,
        }
    }

    fn init_tensor(t: &TensorSpec, rng: &mut ChaCha20Rng) -> Vec<f32> {
        if t.name.ends_with(".bias") || t.name.ends_with(".lora_b") {
            vec![0.0; t.numel()]
        } else {
            xavier(&t.shape, rng)
        }
    }

    fn n_labels(&self) -> usize {
        self.output_b.dims()[0]
    }

    fn logits(&self, batch: &TokenBatch) -> Tensor<2> {
        let (b, len) = (batch.b, batch.len);
        let [n, h] = batch.x.dims();
        let head_dim = h / self.heads.max(1);
        let bias = ((batch.mask.clone() - 1.0) * 1e9).reshape([b, 1, 1, len]);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let split = |t: Tensor<2>| t.reshape([b, len, self.heads, head_dim]).swap_dims(1, 2);
        let p = PROJECTIONS.len();
        let delta = |i: usize, input: Tensor<2>| input.matmul(self.a[i].clone()).matmul(self.b[i].val()) * self.scale;
        let mut x = batch.x.clone();
        for (l, f) in self.frozen.iter().enumerate() {
            let qkv = x.clone().matmul(f.qkv_w.clone()) + f.qkv_b.clone();
            let q = split(qkv.clone().slice([0..n, 0..h]) + delta(l * p, x.clone()));
            let k = split(qkv.clone().slice([0..n, h..2 * h]) + delta(l * p + 1, x.clone()));
            let v = split(qkv.slice([0..n, 2 * h..3 * h]) + delta(l * p + 2, x.clone()));
            let scores = q.matmul(k.swap_dims(2, 3)) * scale + bias.clone();
            let ctx = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([n, h]);
            let attn = ctx.clone().matmul(f.attn_out_w.clone()) + f.attn_out_b.clone() + delta(l * p + 3, ctx);
            let x1 = layer_norm(attn + x, &f.attn_gamma, &f.attn_beta, self.eps);
            let ff = gelu(x1.clone().matmul(f.inter_w.clone()) + f.inter_b.clone()).matmul(f.out_w.clone())
                + f.out_b.clone();
            x = layer_norm(ff + x1, &f.out_gamma, &f.out_beta, self.eps);
        }
        let pooled = pool(x, batch.mask.clone(), b, len, h);
        let hid = relu(pooled.matmul(self.hidden_w.val()) + self.hidden_b.val().unsqueeze_dim(0));
        hid.matmul(self.output_w.val()) + self.output_b.val().unsqueeze_dim(0)
    }

    fn output_only(self) -> Self {
        Self {
            b: self.b.into_iter().map(Param::no_grad).collect(),
            hidden_w: self.hidden_w.no_grad(),
            hidden_b: self.hidden_b.no_grad(),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{self, TrainConfig};
    use crate::transformer::LayerWeights;

    const H: usize = 8;

    /// `s·A·B` (`dim × dim`, row-major) for adapted layer `layer`, projection `proj`, of the
    /// parameters `params`: the change the adapter makes to that projection's weight,
    /// computed apart from the network (plain loops, from the seed).
    fn delta_weight(cfg: &LoraConfig, params: &FlatParams, layer: usize, proj: usize, dim: usize) -> Vec<f32> {
        let a = a_matrix(cfg, layer, proj, dim);
        let name = format!("adapter.{layer}.{}.lora_b", PROJECTIONS[proj]);
        let b = params.tensors().find(|(t, _)| t.name == name).map(|(_, v)| v.to_vec()).unwrap_or_default();
        let (r, s) = (cfg.rank, cfg.scale());
        let mut d = vec![0f32; dim * dim];
        for i in 0..dim {
            for k in 0..r {
                let aik = a[i * r + k] * s;
                for j in 0..dim {
                    d[i * dim + j] += aik * b.get(k * dim + j).copied().unwrap_or(0.0);
                }
            }
        }
        d
    }

    fn random(n: usize, scale: f32, rng: &mut ChaCha20Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// Two random transformer layers, 8 wide, 2 heads.
    fn top(layers: usize) -> Arc<TopLayers> {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let inter = 12;
        let layers = (0..layers)
            .map(|_| {
                let mut lin = |i: usize, o: usize| (random(i * o, 0.5, &mut rng), random(o, 0.1, &mut rng));
                let (qkv, attn_out, inter_l, out) = (lin(H, 3 * H), lin(H, H), lin(H, inter), lin(inter, H));
                let mut norm =
                    || (random(H, 0.2, &mut rng).iter().map(|g| 1.0 + g).collect(), random(H, 0.1, &mut rng));
                let (attn_norm, out_norm) = (norm(), norm());
                LayerWeights { qkv, attn_out, attn_norm, inter: inter_l, out, out_norm }
            })
            .collect();
        Arc::new(TopLayers { hidden: H, heads: 2, intermediate: inter, eps: 1e-12, first: 4, layers })
    }

    fn data(frozen: &Arc<TopLayers>, n: usize) -> TokenData {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let states = (0..n).map(|i| random((2 + i % 5) * H, 1.0, &mut rng)).collect();
        TokenData { states, labels: (0..n).map(|i| i % 3).collect(), frozen: frozen.clone() }
    }

    fn arch(frozen: &Arc<TopLayers>, lora: &LoraConfig) -> LoraArch {
        LoraArch { frozen: frozen.clone(), lora: lora.clone(), hidden: 6, n_labels: 3 }
    }

    fn cfg(layers: usize) -> LoraConfig {
        LoraConfig { layers, rank: 2, alpha: 4.0, seed: 11 }
    }

    /// Parameters with every `B` and the head drawn at random.
    fn random_params(a: &LoraArch, seed: u64) -> FlatParams {
        let layout = LoraNet::layout_of(a);
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let values = random(layout.numel(), 0.5, &mut rng);
        FlatParams::new(layout, values).expect("params")
    }

    fn logits(a: &LoraArch, p: &FlatParams, d: &TokenData) -> Vec<f32> {
        let net: LoraNet = nn::from_flat(a, p, &Device::flex()).expect("net");
        let rows: Vec<usize> = (0..d.len()).collect();
        net.logits(&d.batch(&rows, &Device::flex())).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32")
    }

    /// `frozen` with `s·A·B` of `p` merged into each projection's weight, and `p` with
    /// every `B` zeroed: a plain (unadapted) model.
    fn merged(a: &LoraArch, p: &FlatParams) -> (LoraArch, FlatParams) {
        let mut top = (*a.frozen).clone();
        for (l, layer) in top.layers.iter_mut().enumerate() {
            for proj in 0..PROJECTIONS.len() {
                let d = delta_weight(&a.lora, p, l, proj, H);
                for i in 0..H {
                    for j in 0..H {
                        match proj {
                            3 => layer.attn_out.0[i * H + j] += d[i * H + j],
                            _ => layer.qkv.0[i * 3 * H + proj * H + j] += d[i * H + j],
                        }
                    }
                }
            }
        }
        let mut values = p.values().to_vec();
        let n_b: usize = p.tensors().filter(|(t, _)| t.name.ends_with(".lora_b")).map(|(t, _)| t.numel()).sum();
        values[..n_b].fill(0.0);
        (LoraArch { frozen: Arc::new(top), ..a.clone() }, FlatParams::new(p.layout().clone(), values).expect("params"))
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + x.abs()), "{x} vs {y}\n{a:?}\n{b:?}");
        }
    }

    #[test]
    fn the_adapter_adds_exactly_s_a_b_to_each_projection() {
        for layers in [1, 2] {
            let frozen = top(layers);
            let a = arch(&frozen, &cfg(layers));
            let d = data(&frozen, 7);
            let p = random_params(&a, 1);
            let (plain_arch, plain_params) = merged(&a, &p);
            close(&logits(&a, &p, &d), &logits(&plain_arch, &plain_params, &d), 1e-4);
            // And the adapters matter: B = 0 gives other logits.
            let (_, zero_b) = merged(&a, &p);
            let differ = logits(&a, &p, &d).iter().zip(logits(&a, &zero_b, &d)).any(|(x, y)| (x - y).abs() > 1e-3);
            assert!(differ, "layers {layers}: the adapters changed nothing");
        }
    }

    #[test]
    fn the_mean_of_the_sites_parameters_is_the_mean_of_their_models() {
        // What secure aggregation delivers is the mean of the parameter vectors. With A
        // frozen and shared, the model of that mean has, in every projection, the mean of
        // the sites' effective weights.
        let frozen = top(2);
        let a = arch(&frozen, &cfg(2));
        let sites: Vec<FlatParams> = (0..3).map(|s| random_params(&a, 10 + s)).collect();
        let n = sites.len() as f32;
        let mean_values: Vec<f32> =
            (0..sites[0].values().len()).map(|i| sites.iter().map(|p| p.values()[i]).sum::<f32>() / n).collect();
        let mean = FlatParams::new(sites[0].layout().clone(), mean_values).expect("params");
        for l in 0..2 {
            for proj in 0..PROJECTIONS.len() {
                let of_mean = delta_weight(&a.lora, &mean, l, proj, H);
                let mean_of: Vec<f32> = (0..H * H)
                    .map(|i| sites.iter().map(|p| delta_weight(&a.lora, p, l, proj, H)[i]).sum::<f32>() / n)
                    .collect();
                close(&of_mean, &mean_of, 1e-5);
            }
        }
        // And the network agrees: the adapted model at the mean parameters computes what a
        // plain model does whose projections are the mean of the sites' merged weights
        // (and whose head is the mean head). Were the forward pass not linear in B, this
        // would differ.
        let d = data(&frozen, 6);
        let merged_sites: Vec<(LoraArch, FlatParams)> = sites.iter().map(|p| merged(&a, p)).collect();
        let mut top = (*frozen).clone();
        for (l, layer) in top.layers.iter_mut().enumerate() {
            let avg = |f: &dyn Fn(&LayerWeights) -> &Vec<f32>| -> Vec<f32> {
                let n = merged_sites.len() as f32;
                (0..f(&frozen.layers[l]).len())
                    .map(|i| merged_sites.iter().map(|(m, _)| f(&m.frozen.layers[l])[i]).sum::<f32>() / n)
                    .collect()
            };
            layer.qkv.0 = avg(&|w| &w.qkv.0);
            layer.attn_out.0 = avg(&|w| &w.attn_out.0);
        }
        let (_, plain_mean) = merged(&a, &mean);
        let plain = LoraArch { frozen: Arc::new(top), ..a.clone() };
        close(&logits(&a, &mean, &d), &logits(&plain, &plain_mean, &d), 1e-4);
    }

    #[test]
    fn a_is_drawn_from_the_seed_alone_and_differs_per_matrix() {
        let c = cfg(2);
        assert_eq!(a_matrix(&c, 1, 2, H), a_matrix(&c, 1, 2, H), "every site draws the same A");
        assert_ne!(a_matrix(&c, 1, 2, H), a_matrix(&c, 1, 3, H));
        assert_ne!(a_matrix(&c, 0, 2, H), a_matrix(&c, 1, 2, H));
        assert_ne!(a_matrix(&c, 0, 0, H), a_matrix(&LoraConfig { seed: 12, ..c.clone() }, 0, 0, H));
        let bound = 1.0 / (H as f32).sqrt();
        assert!(a_matrix(&c, 0, 0, H).iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn initial_parameters_start_from_the_frozen_encoder() {
        let c = cfg(2);
        let p = init(&c, H, 6, 3, 7);
        let names: Vec<&str> = p.layout().tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names[..5],
            [
                "adapter.0.query.lora_b",
                "adapter.0.key.lora_b",
                "adapter.0.value.lora_b",
                "adapter.0.attn_out.lora_b",
                "adapter.1.query.lora_b"
            ]
        );
        assert_eq!(names[8..], ["head.hidden.weight", "head.hidden.bias", "head.output.weight", "head.output.bias"]);
        assert!(p.tensors().filter(|(t, _)| t.name.ends_with("lora_b")).all(|(_, v)| v.iter().all(|x| *x == 0.0)));
        assert!(p.tensors().any(|(t, v)| t.name == "head.hidden.weight" && v.iter().any(|x| *x != 0.0)));
        assert_eq!(p.layout().numel(), 2 * 4 * 2 * H + H * 6 + 6 + 6 * 3 + 3);
    }

    #[test]
    fn training_moves_the_adapters_and_head_only_keeps_them() {
        let frozen = top(1);
        let a = arch(&frozen, &cfg(1));
        let d = data(&frozen, 24);
        let start = init(&a.lora, H, 6, 3, 7);
        let train = TrainConfig { epochs: 20, batch_size: 8, learning_rate: 0.02, ..TrainConfig::default() };
        let (p, report) = nn::train::<LoraNet>(&a, &start, &d, &train, &mut ()).expect("train");
        let b_moved = p.tensors().filter(|(t, _)| t.name.ends_with("lora_b")).any(|(_, v)| v.iter().any(|x| *x != 0.0));
        assert!(b_moved, "the adapters' B learned nothing");
        let first = nn::train::<LoraNet>(&a, &start, &d, &TrainConfig { epochs: 1, ..train.clone() }, &mut ())
            .expect("train")
            .1;
        assert!(report.final_loss < first.final_loss, "{} !< {}", report.final_loss, first.final_loss);
        let (p, _) =
            nn::train::<LoraNet>(&a, &start, &d, &TrainConfig { head_only: true, ..train }, &mut ()).expect("train");
        for ((t, v), (_, s)) in p.tensors().zip(start.tensors()) {
            if t.name != "head.output.weight" && t.name != "head.output.bias" {
                assert_eq!(v, s, "{} moved in head-only training", t.name);
            }
        }
    }

    #[test]
    fn batches_pad_and_mask_records_of_different_lengths() {
        let frozen = top(1);
        let d = data(&frozen, 5);
        let a = arch(&frozen, &cfg(1));
        let p = random_params(&a, 3);
        // A record's logits do not depend on the records batched with it.
        let all = logits(&a, &p, &d);
        for r in 0..d.len() {
            let one = TokenData { states: vec![d.states[r].clone()], labels: vec![0], frozen: frozen.clone() };
            close(&logits(&a, &p, &one), &all[r * 3..r * 3 + 3], 1e-4);
        }
    }
}
