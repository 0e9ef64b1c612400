//! Differentially private SGD (Abadi et al., CCS 2016) for the shipped models.
//!
//! One DP-SGD step: every local record joins the step's batch independently with
//! probability `q` (Poisson sampling, which the accountant's amplification bound
//! assumes); each member's gradient of its own cross-entropy is clipped to L2 norm `C`;
//! the clipped gradients are summed; Gaussian noise of standard deviation `σ·C` is added
//! to **every** parameter the step trains (dense, also on embedding rows no record
//! touched, so which rows were touched is not revealed); the sum is divided by the
//! expected batch size `q·N` and handed to the optimiser (SGD or Adam: post-processing).
//!
//! burn has no per-example gradients, so they are computed here in closed form:
//! the dense head (hidden layer, ReLU, output layer, softmax cross-entropy) by the
//! usual back-propagation per example, its weight gradients as outer products; the
//! embedding bag's gradient for a feature is the feature's weight times the gradient
//! at the bag. Feature ids are unique per document, so the per-example norm is exact:
//! ‖g‖² = ‖h‖²‖δz‖² + ‖δz‖² + ‖x‖²‖δpre‖² + ‖δpre‖² (+ Σ_f w_f²‖δx‖² for the bag).
//! A unit test checks these gradients against burn's autodiff one example at a time.
//!
//! The randomness (sampling and noise) comes from the caller's RNG, which must be a
//! cryptographic one seeded with a secret (the site derives it from its own key; see
//! `docs/protocols/privacy.md`): whoever knows the seed can subtract the noise. Gaussian
//! samples are f64 (ziggurat over ChaCha20) scaled into f32 parameters; the
//! floating-point caveat of Mironov (CCS 2012) applies as in every DP-SGD library.
//!
//! FedProx (μ > 0) adds μ(w − w_start) after the noise: it does not depend on the data.
//! With `head_only` only the output layer is trained, clipped and noised.

use rand::{Rng, RngCore};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::features::SparseDoc;
use crate::nn::{Optimizer, Progress, TabularData, TrainConfig, TrainReport};
use crate::params::{FlatParams, ParamsError};
use crate::text::{TextArch, TextData};

/// The DP-SGD mechanism of one local training run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSgd {
    /// Per-example L2 clipping norm `C`.
    pub clip: f64,
    /// Noise multiplier `σ`: the noise's standard deviation is `σ·C`.
    pub noise_multiplier: f64,
    /// Poisson sampling rate `q` of each step.
    pub sample_rate: f64,
    /// Number of steps.
    pub steps: u64,
}

impl DpSgd {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(format!("clip must be positive, got {}", self.clip));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return Err(format!("noise multiplier must be ≥ 0, got {}", self.noise_multiplier));
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(format!("sample rate must be in (0, 1], got {}", self.sample_rate));
        }
        Ok(())
    }
}

/// The dense head's shape: input width, hidden units, labels. `hidden = 0` is the
/// linear head: output.weight `[in, labels]` alone, no bias.
#[derive(Debug, Clone, Copy)]
struct Head {
    n_in: usize,
    hidden: usize,
    labels: usize,
}

impl Head {
    fn linear(&self) -> bool {
        self.hidden == 0
    }

    /// Rows of output.weight: the hidden units, or the inputs of a linear head.
    fn out_rows(&self) -> usize {
        if self.linear() { self.n_in } else { self.hidden }
    }

    /// Output biases (none in a linear head).
    fn out_bias(&self) -> usize {
        if self.linear() { 0 } else { self.labels }
    }

    fn len(&self) -> usize {
        self.n_in * self.hidden + self.hidden + self.out_rows() * self.labels + self.out_bias()
    }
}

/// Offsets of the head's tensors inside `params[base..]` (Maeum's layout: hidden.weight
/// `[in, hidden]`, hidden.bias, output.weight `[hidden, labels]`, output.bias; a linear
/// head has only output.weight `[in, labels]`, the other three are empty).
struct HeadView<'a> {
    w1: &'a [f32],
    b1: &'a [f32],
    w2: &'a [f32],
    b2: &'a [f32],
}

impl<'a> HeadView<'a> {
    fn new(h: Head, p: &'a [f32]) -> Self {
        let (w1, rest) = p.split_at(h.n_in * h.hidden);
        let (b1, rest) = rest.split_at(h.hidden);
        let (w2, rest) = rest.split_at(h.out_rows() * h.labels);
        Self { w1, b1, w2, b2: &rest[..h.out_bias()] }
    }
}

/// One example's gradient pieces (before clipping): the factors of the outer products.
struct ExampleGrad {
    /// Post-ReLU hidden activations, or the input of a linear head (factor of
    /// output.weight's gradient).
    h: Vec<f32>,
    /// ∂loss/∂logits.
    dz: Vec<f32>,
    /// ∂loss/∂pre-activation of the hidden layer.
    dpre: Vec<f32>,
    /// ∂loss/∂input (the bag), only when the input is trained.
    dx: Vec<f32>,
}

/// Forward and backward of softmax cross-entropy through the head for input `x`, label `y`.
fn head_grad(h: Head, v: &HeadView, x: &[f32], y: usize, want_dx: bool) -> ExampleGrad {
    let mut pre = v.b1.to_vec();
    for (i, &xi) in x.iter().enumerate() {
        if xi != 0.0 {
            let row = &v.w1[i * h.hidden..(i + 1) * h.hidden];
            pre.iter_mut().zip(row).for_each(|(p, &w)| *p += xi * w);
        }
    }
    let act: Vec<f32> = if h.linear() { x.to_vec() } else { pre.iter().map(|&p| p.max(0.0)).collect() };
    let mut z = if h.linear() { vec![0.0; h.labels] } else { v.b2.to_vec() };
    for (j, &aj) in act.iter().enumerate() {
        if aj != 0.0 {
            let row = &v.w2[j * h.labels..(j + 1) * h.labels];
            z.iter_mut().zip(row).for_each(|(zk, &w)| *zk += aj * w);
        }
    }
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut dz: Vec<f32> = z.iter().map(|&zk| (zk - max).exp()).collect();
    let sum: f32 = dz.iter().sum();
    dz.iter_mut().for_each(|p| *p /= sum);
    dz[y] -= 1.0;
    let dpre: Vec<f32> = (0..h.hidden)
        .map(|j| {
            if pre[j] > 0.0 {
                v.w2[j * h.labels..(j + 1) * h.labels].iter().zip(&dz).map(|(w, d)| w * d).sum()
            } else {
                0.0
            }
        })
        .collect();
    let dx = if want_dx {
        (0..h.n_in)
            .map(|i| v.w1[i * h.hidden..(i + 1) * h.hidden].iter().zip(&dpre).map(|(w, d)| w * d).sum())
            .collect()
    } else {
        Vec::new()
    };
    ExampleGrad { h: act, dz, dpre, dx }
}

fn sq(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// Which parameters a step trains, and what an example's input is.
enum Model<'a> {
    Text { arch: &'a TextArch, data: &'a TextData, dropout: f64 },
    Tabular { data: &'a TabularData },
}

impl Model<'_> {
    fn len(&self) -> usize {
        match self {
            Model::Text { data, .. } => data.docs.len(),
            Model::Tabular { data } => data.rows.len(),
        }
    }

    fn label(&self, r: usize) -> usize {
        match self {
            Model::Text { data, .. } => data.labels[r],
            Model::Tabular { data } => data.labels[r],
        }
    }
}

/// An accumulator of clipped gradients: f32 for local DP-SGD, f64 where the sum is
/// scaled up and rounded to integers (the distributed mode, [`crate::ddp`]).
pub(crate) trait Acc: Copy {
    fn add(&mut self, v: f32);
}

impl Acc for f32 {
    fn add(&mut self, v: f32) {
        *self += v;
    }
}

impl Acc for f64 {
    fn add(&mut self, v: f32) {
        *self += f64::from(v);
    }
}

/// Adds example `r`'s clipped gradient into `sum` (the full flat layout). Returns the
/// example's gradient norm before clipping.
#[allow(clippy::too_many_arguments)]
fn add_clipped<A: Acc>(
    head: Head,
    base: usize,
    params: &[f32],
    doc: Option<&SparseDoc>,
    x: &[f32],
    y: usize,
    clip: f64,
    head_only: bool,
    sum: &mut [A],
) -> f64 {
    let v = HeadView::new(head, &params[base..]);
    let want_dx = doc.is_some() && !head_only;
    let g = head_grad(head, &v, x, y, want_dx);
    let (h2, dz2) = (sq(&g.h), sq(&g.dz));
    let mut norm2 = h2 * dz2 + if head.linear() { 0.0 } else { dz2 };
    if !head_only {
        let (x2, dpre2) = (sq(x), sq(&g.dpre));
        norm2 += x2 * dpre2 + dpre2;
        if let Some(doc) = doc {
            norm2 += sq(&doc.weights) * sq(&g.dx);
        }
    }
    let norm = norm2.sqrt();
    let c = if norm > clip { (clip / norm) as f32 } else { 1.0 };
    let (w1_at, b1_at) = (base, base + head.n_in * head.hidden);
    let w2_at = b1_at + head.hidden;
    let b2_at = w2_at + head.out_rows() * head.labels;
    for (j, &hj) in g.h.iter().enumerate() {
        if hj != 0.0 {
            let row = &mut sum[w2_at + j * head.labels..w2_at + (j + 1) * head.labels];
            row.iter_mut().zip(&g.dz).for_each(|(s, &d)| s.add(c * hj * d));
        }
    }
    sum[b2_at..b2_at + head.out_bias()].iter_mut().zip(&g.dz).for_each(|(s, &d)| s.add(c * d));
    if head_only || head.linear() {
        return norm;
    }
    for (i, &xi) in x.iter().enumerate() {
        if xi != 0.0 {
            let row = &mut sum[w1_at + i * head.hidden..w1_at + (i + 1) * head.hidden];
            row.iter_mut().zip(&g.dpre).for_each(|(s, &d)| s.add(c * xi * d));
        }
    }
    sum[b1_at..b1_at + head.hidden].iter_mut().zip(&g.dpre).for_each(|(s, &d)| s.add(c * d));
    if let Some(doc) = doc {
        let dim = head.n_in;
        for (&id, &w) in doc.ids.iter().zip(&doc.weights) {
            let row = &mut sum[id as usize * dim..(id as usize + 1) * dim];
            row.iter_mut().zip(&g.dx).for_each(|(s, &d)| s.add(c * w * d));
        }
    }
    norm
}

/// The bag of `doc` over the embedding table `emb` (`[buckets, dim]`).
fn bag(emb: &[f32], dim: usize, doc: &SparseDoc) -> Vec<f32> {
    let mut out = vec![0f32; dim];
    for (&id, &w) in doc.ids.iter().zip(&doc.weights) {
        out.iter_mut().zip(&emb[id as usize * dim..(id as usize + 1) * dim]).for_each(|(o, &e)| *o += w * e);
    }
    out
}

/// Dense SGD / Adam over a range of the flat vector.
struct DenseOptim {
    kind: Optimizer,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl DenseOptim {
    fn new(kind: Optimizer, n: usize) -> Self {
        let adam = kind == Optimizer::Adam;
        Self {
            kind,
            m: if adam { vec![0.0; n] } else { Vec::new() },
            v: if adam { vec![0.0; n] } else { Vec::new() },
            t: 0,
        }
    }

    fn step(&mut self, w: &mut [f32], g: &[f32], lr: f32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        self.t += 1;
        match self.kind {
            Optimizer::Sgd => w.iter_mut().zip(g).for_each(|(w, &g)| *w -= lr * g),
            Optimizer::Adam => {
                let (bc1, bc2) = (1.0 - B1.powi(self.t), 1.0 - B2.powi(self.t));
                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
                    *m = B1 * *m + (1.0 - B1) * g;
                    *v = B2 * *v + (1.0 - B2) * g * g;
                    *w -= lr * (*m / bc1) / ((*v / bc2).sqrt() + 1e-8);
                }
            }
        }
    }
}

/// Adds `N(0, std²)` to every entry of `v`.
pub(crate) fn add_gaussian(v: &mut [f32], std: f64, rng: &mut dyn RngCore) {
    if std == 0.0 {
        return;
    }
    for x in v {
        let z: f64 = rng.sample(StandardNormal);
        *x += (z * std) as f32;
    }
}

/// DP-SGD from `start`. `rng` must be a cryptographic RNG seeded with a secret.
#[allow(clippy::too_many_arguments)]
fn run(
    model: Model,
    layout_len: usize,
    head: Head,
    base: usize,
    start: &FlatParams,
    cfg: &TrainConfig,
    dp: &DpSgd,
    rng: &mut dyn RngCore,
    progress: &mut dyn Progress,
) -> Result<(FlatParams, TrainReport), String> {
    dp.validate()?;
    cfg.validate()?;
    let n = model.len();
    if n == 0 {
        return Err("DP-SGD needs at least one record".into());
    }
    if base + head.len() != layout_len {
        return Err(format!("layout of {layout_len} values does not match the head ({} + {})", base, head.len()));
    }
    let t0 = std::time::Instant::now();
    let mut params = start.values().to_vec();
    // The trained range: everything, or only the output layer.
    let trained = if cfg.head_only { base + head.n_in * head.hidden + head.hidden..layout_len } else { 0..layout_len };
    let mut optim = DenseOptim::new(cfg.optimizer, trained.len());
    let mut sum = vec![0f32; layout_len];
    let expected_batch = dp.sample_rate * n as f64;
    let noise_std = dp.noise_multiplier * dp.clip;
    progress.start(dp.steps);
    let mut seen = 0u64;
    let mut last_loss = f32::NAN;
    for _ in 0..dp.steps {
        sum.iter_mut().for_each(|s| *s = 0.0);
        let sample = Sample { rate: dp.sample_rate, clip: dp.clip, head_only: cfg.head_only };
        let (members, loss) = sampled_sum(&model, head, base, &params, sample, rng, &mut sum);
        let g = &mut sum[trained.clone()];
        add_gaussian(g, noise_std, rng);
        let scale = (1.0 / expected_batch) as f32;
        g.iter_mut().for_each(|x| *x *= scale);
        if cfg.prox_mu > 0.0 {
            let mu = cfg.prox_mu as f32;
            let (w, w0) = (&params[trained.clone()], &start.values()[trained.clone()]);
            g.iter_mut().zip(w.iter().zip(w0)).for_each(|(g, (w, w0))| *g += mu * (w - w0));
        }
        optim.step(&mut params[trained.clone()], g, cfg.learning_rate as f32);
        seen += members;
        last_loss = if members > 0 { (loss / members as f64) as f32 } else { f32::NAN };
        progress.step(0, last_loss);
    }
    let report = TrainReport {
        steps: dp.steps,
        examples_seen: seen,
        final_loss: last_loss,
        seconds: t0.elapsed().as_secs_f64(),
    };
    FlatParams::new(start.layout().clone(), params).map(|p| (p, report)).map_err(|e| e.to_string())
}

/// How one step draws its batch and clips its members.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rate: f64,
    clip: f64,
    head_only: bool,
}

/// Poisson-samples the records at `sample.rate` and adds each member's clipped gradient
/// at `params` into `sum`. Returns the number of members and their summed loss.
fn sampled_sum<A: Acc>(
    model: &Model,
    head: Head,
    base: usize,
    params: &[f32],
    sample: Sample,
    rng: &mut dyn RngCore,
    sum: &mut [A],
) -> (u64, f64) {
    let mut loss = 0f64;
    let mut members = 0u64;
    for r in 0..model.len() {
        if !rng.random_bool(sample.rate) {
            continue;
        }
        members += 1;
        let y = model.label(r);
        match model {
            Model::Text { arch, data, dropout } => {
                let dropped;
                let doc = if *dropout > 0.0 {
                    dropped = crate::text::drop_one(&data.docs[r], *dropout, rng);
                    &dropped
                } else {
                    &data.docs[r]
                };
                let x = bag(&params[..base], arch.embed_dim, doc);
                add_clipped(head, base, params, Some(doc), &x, y, sample.clip, sample.head_only, sum);
                loss += example_loss(head, &params[base..], &x, y);
            }
            Model::Tabular { data } => {
                add_clipped(head, base, params, None, &data.rows[r], y, sample.clip, sample.head_only, sum);
                loss += example_loss(head, &params[base..], &data.rows[r], y);
            }
        }
    }
    (members, loss)
}

/// Checks `params` against the model's layout (and a tabular model's rows against its
/// input width), and returns the per-example view: the model, its head, and where the
/// head starts in the flat layout.
fn model_of<'a>(shape: ModelRef<'a>, params: &FlatParams, dropout: f64) -> Result<(Model<'a>, Head, usize), String> {
    match shape {
        ModelRef::Text(arch, data) => {
            params.expect_layout(&arch.layout()).map_err(|e: ParamsError| e.to_string())?;
            let head = Head { n_in: arch.embed_dim, hidden: arch.hidden, labels: arch.n_labels };
            Ok((Model::Text { arch, data, dropout }, head, arch.buckets * arch.embed_dim))
        }
        ModelRef::Tabular(arch, data) => {
            params
                .expect_layout(&<crate::nn::Mlp as crate::nn::Network>::layout_of(arch))
                .map_err(|e| e.to_string())?;
            if data.rows.first().is_some_and(|r| r.len() != arch.n_in) {
                return Err(format!("rows have {} columns, the model {}", data.rows[0].len(), arch.n_in));
            }
            Ok((Model::Tabular { data }, Head { n_in: arch.n_in, hidden: arch.hidden, labels: arch.n_labels }, 0))
        }
    }
}

/// One record-level step of the distributed mode ([`crate::ddp`]): the sum, over a
/// Poisson sample of the records at rate `q`, of each member's gradient at `params`
/// clipped to L2 norm `clip`, over the whole layout (f64). Returns the sum and the
/// number of members (which never leaves the site).
pub(crate) fn clipped_gradient_sum(
    shape: ModelRef,
    params: &FlatParams,
    dropout: f64,
    q: f64,
    clip: f64,
    rng: &mut dyn RngCore,
) -> Result<(Vec<f64>, u64), String> {
    let (model, head, base) = model_of(shape, params, dropout)?;
    if base + head.len() != params.values().len() {
        return Err(format!("layout of {} values does not match the head", params.values().len()));
    }
    let mut sum = vec![0f64; params.values().len()];
    let sample = Sample { rate: q, clip, head_only: false };
    let (members, _) = sampled_sum(&model, head, base, params.values(), sample, rng, &mut sum);
    Ok((sum, members))
}

/// A model and its local data, for [`clipped_gradient_sum`] and DP-SGD.
pub(crate) enum ModelRef<'a> {
    Text(&'a TextArch, &'a TextData),
    Tabular(&'a crate::nn::MlpArch, &'a TabularData),
}

fn example_loss(head: Head, p: &[f32], x: &[f32], y: usize) -> f64 {
    let v = HeadView::new(head, p);
    let g = head_grad(head, &v, x, y, false);
    // dz = p − e_y, so p_y = dz_y + 1.
    -f64::from(g.dz[y] + 1.0).max(1e-30).ln()
}

/// DP-SGD of the text classifier.
#[allow(clippy::too_many_arguments)]
pub fn train_text(
    arch: &TextArch,
    start: &FlatParams,
    data: &TextData,
    cfg: &TrainConfig,
    dp: &DpSgd,
    rng: &mut dyn RngCore,
    progress: &mut dyn Progress,
) -> Result<(FlatParams, TrainReport), String> {
    let (model, head, base) = model_of(ModelRef::Text(arch, data), start, cfg.dropout)?;
    run(model, start.values().len(), head, base, start, cfg, dp, rng, progress)
}

/// DP-SGD of the tabular MLP (`arch` is its head).
pub fn train_tabular(
    arch: &crate::nn::MlpArch,
    start: &FlatParams,
    data: &TabularData,
    cfg: &TrainConfig,
    dp: &DpSgd,
    rng: &mut dyn RngCore,
    progress: &mut dyn Progress,
) -> Result<(FlatParams, TrainReport), String> {
    let (model, head, base) = model_of(ModelRef::Tabular(arch, data), start, 0.0)?;
    run(model, start.values().len(), head, base, start, cfg, dp, rng, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{FeatureConfig, featurize};
    use crate::nn::MlpArch;
    use burn::tensor::activation::{log_softmax, relu};
    use burn::tensor::{Device, Tensor, TensorData};
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn arch() -> TextArch {
        TextArch { buckets: 64, embed_dim: 6, hidden: 5, n_labels: 3 }
    }

    fn features() -> FeatureConfig {
        FeatureConfig { buckets: 64, word_ngrams: [1, 1], char_ngrams: [0, 0], max_chars: 200 }
    }

    fn docs() -> TextData {
        let texts = ["i cannot sleep at night", "work stress and deadlines", "alone and hopeless", "happy walk"];
        TextData { docs: texts.iter().map(|t| featurize(t, &features())).collect(), labels: vec![0, 1, 2, 1] }
    }

    fn vec_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32")
    }

    /// The full per-example gradient by burn's autodiff (dense bag as a one-row matmul).
    fn burn_grad(a: &TextArch, p: &[f32], doc: &SparseDoc, y: usize) -> Vec<f32> {
        let dev = Device::flex().autodiff();
        let h = Head { n_in: a.embed_dim, hidden: a.hidden, labels: a.n_labels };
        let base = a.buckets * a.embed_dim;
        let v = HeadView::new(h, &p[base..]);
        let t2 = |x: &[f32], s: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(x.to_vec(), s), &dev).set_require_grad(true)
        };
        let emb = t2(&p[..base], [a.buckets, a.embed_dim]);
        let w1 = t2(v.w1, [a.embed_dim, a.hidden]);
        let b1 = t2(v.b1, [1, a.hidden]);
        let w2 = t2(v.w2, [a.hidden, a.n_labels]);
        let b2 = t2(v.b2, [1, a.n_labels]);
        let mut onehot = vec![0f32; a.buckets];
        for (&id, &w) in doc.ids.iter().zip(&doc.weights) {
            onehot[id as usize] = w;
        }
        let sel = Tensor::<2>::from_data(TensorData::new(onehot, [1, a.buckets]), &dev);
        let x = sel.matmul(emb.clone());
        let hid = relu(x.matmul(w1.clone()) + b1.clone());
        let z = hid.matmul(w2.clone()) + b2.clone();
        let loss = log_softmax(z, 1).slice([0..1, y..y + 1]).sum().neg();
        let grads = loss.backward();
        let mut out = Vec::new();
        for t in [emb, w1, b1, w2, b2] {
            out.extend(vec_of(t.grad(&grads).expect("grad")));
        }
        out
    }

    #[test]
    fn per_example_gradients_and_norms_match_burn_autodiff() {
        let a = arch();
        let p = a.init(3);
        let data = docs();
        let h = Head { n_in: a.embed_dim, hidden: a.hidden, labels: a.n_labels };
        for (doc, &y) in data.docs.iter().zip(&data.labels) {
            let want = burn_grad(&a, p.values(), doc, y);
            let mut got = vec![0f32; p.values().len()];
            let x = bag(&p.values()[..a.buckets * a.embed_dim], a.embed_dim, doc);
            let norm = add_clipped(h, a.buckets * a.embed_dim, p.values(), Some(doc), &x, y, 1e9, false, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "coordinate {i}: closed form {g}, autodiff {w}");
            }
            let want_norm = sq(&want).sqrt();
            assert!((norm - want_norm).abs() < 1e-5 * want_norm.max(1.0), "norm {norm} vs {want_norm}");
            // Clipped: the added vector has norm exactly min(‖g‖, C).
            let clip = want_norm / 3.0;
            let mut clipped = vec![0f32; p.values().len()];
            add_clipped(h, a.buckets * a.embed_dim, p.values(), Some(doc), &x, y, clip, false, &mut clipped);
            assert!((sq(&clipped).sqrt() - clip).abs() < 1e-5, "clipped norm {} vs C = {clip}", sq(&clipped).sqrt());
        }
    }

    #[test]
    fn a_linear_head_has_no_bias_and_its_gradients_match_autodiff() {
        let arch = MlpArch { n_in: 4, hidden: 0, n_labels: 3 };
        let h = Head { n_in: 4, hidden: 0, labels: 3 };
        let p = crate::nn::init_params::<crate::nn::Mlp>(&arch, 9);
        assert_eq!(p.layout().tensors.len(), 1, "output.weight only");
        assert_eq!((h.len(), p.values().len()), (12, 12));
        let dev = Device::flex().autodiff();
        let x = [0.5f32, -0.5, 0.5, 0.5];
        let w = Tensor::<2>::from_data(TensorData::new(p.values().to_vec(), [4, 3]), &dev).set_require_grad(true);
        let xt = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [1, 4]), &dev);
        let z = xt.matmul(w.clone());
        // The network's own forward: the same probabilities as the closed form's logits.
        let mut data = TabularData::default();
        data.rows.push(x.to_vec());
        data.labels.push(2);
        let probs = crate::nn::predict_proba::<crate::nn::Mlp>(&arch, &p, &data).expect("predict");
        let want_p = vec_of(burn::tensor::activation::softmax(z.clone(), 1));
        for (a, b) in probs[0].iter().zip(&want_p) {
            assert!((a - b).abs() < 1e-6, "network {a} vs x·W {b}");
        }
        let loss = log_softmax(z, 1).slice([0..1, 2..3]).sum().neg();
        let want = vec_of(w.grad(&loss.backward()).expect("grad"));
        let mut got = vec![0f32; 12];
        let norm = add_clipped(h, 0, p.values(), None, &x, 2, 1e9, false, &mut got);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "closed form {g}, autodiff {w}");
        }
        assert!((norm - sq(&want).sqrt()).abs() < 1e-6);
        let mut clipped = vec![0f32; 12];
        add_clipped(h, 0, p.values(), None, &x, 2, norm / 4.0, false, &mut clipped);
        assert!((sq(&clipped).sqrt() - norm / 4.0).abs() < 1e-6);
    }

    #[test]
    fn head_only_gradients_touch_only_the_output_layer() {
        let a = arch();
        let p = a.init(4);
        let data = docs();
        let h = Head { n_in: a.embed_dim, hidden: a.hidden, labels: a.n_labels };
        let base = a.buckets * a.embed_dim;
        let want = burn_grad(&a, p.values(), &data.docs[0], 0);
        let mut got = vec![0f32; p.values().len()];
        let x = bag(&p.values()[..base], a.embed_dim, &data.docs[0]);
        add_clipped(h, base, p.values(), Some(&data.docs[0]), &x, 0, 1e9, true, &mut got);
        let out_at = base + a.embed_dim * a.hidden + a.hidden;
        assert!(got[..out_at].iter().all(|&g| g == 0.0));
        for (g, w) in got[out_at..].iter().zip(&want[out_at..]) {
            assert!((g - w).abs() < 1e-5);
        }
    }

    #[test]
    fn the_noise_has_standard_deviation_sigma_times_c() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mut v = vec![0f32; 200_000];
        add_gaussian(&mut v, 1.1 * 0.5, &mut rng);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        // Standard error of the std estimate: σ/√(2n) ≈ 0.0009.
        assert!((std - 0.55).abs() < 0.005, "std {std}");
        assert!(mean.abs() < 0.005, "mean {mean}");
    }

    fn cfg() -> TrainConfig {
        TrainConfig {
            optimizer: Optimizer::Sgd,
            learning_rate: 0.5,
            epochs: 1,
            batch_size: 1,
            seed: 0,
            prox_mu: 0.0,
            dropout: 0.0,
            head_only: false,
        }
    }

    #[test]
    fn one_step_without_noise_and_q_1_is_plain_clipped_sgd() {
        // q = 1 samples every record; σ = 0: the step is −lr · Σ clip(g_i) / N.
        let a = arch();
        let p = a.init(5);
        let data = docs();
        let dp = DpSgd { clip: 0.5, noise_multiplier: 0.0, sample_rate: 1.0, steps: 1 };
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (out, report) = train_text(&a, &p, &data, &cfg(), &dp, &mut rng, &mut ()).expect("train");
        assert_eq!(report.examples_seen, 4);
        let h = Head { n_in: a.embed_dim, hidden: a.hidden, labels: a.n_labels };
        let base = a.buckets * a.embed_dim;
        let mut sum = vec![0f32; p.values().len()];
        for (doc, &y) in data.docs.iter().zip(&data.labels) {
            let x = bag(&p.values()[..base], a.embed_dim, doc);
            add_clipped(h, base, p.values(), Some(doc), &x, y, 0.5, false, &mut sum);
        }
        for ((o, s), g) in out.values().iter().zip(p.values()).zip(&sum) {
            assert!((o - (s - 0.5 * g / 4.0)).abs() < 1e-6);
        }
    }

    #[test]
    fn a_step_with_a_fixed_seed_gives_a_known_answer() {
        // Pins the whole mechanism (sampling order, clipping, noise stream, scaling,
        // optimiser): any change to what a site releases shows up here.
        let a = arch();
        let p = a.init(6);
        let data = docs();
        let dp = DpSgd { clip: 1.0, noise_multiplier: 1.1, sample_rate: 0.5, steps: 2 };
        let mut rng = ChaCha20Rng::seed_from_u64(42);
        let (out, report) = train_text(&a, &p, &data, &cfg(), &dp, &mut rng, &mut ()).expect("train");
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &out.values().iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        );
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let first: Vec<f32> = out.values()[..3].to_vec();
        assert_eq!((report.steps, report.examples_seen), (2, KAT_SEEN));
        assert_eq!(first, KAT_FIRST, "first values");
        assert_eq!(hex, KAT_SHA256);
    }

    const KAT_SEEN: u64 = 7;
    const KAT_FIRST: [f32; 3] = [-0.11376932, 0.27652737, 0.14117582];
    const KAT_SHA256: &str = "605f9229a050d1e1df065acce42d50bc00f4fc230708b58f55d967805ec52dc1";

    #[test]
    fn noise_covers_every_trained_parameter_even_rows_no_record_used() {
        let a = arch();
        let p = a.init(7);
        let data = docs();
        let dp = DpSgd { clip: 1.0, noise_multiplier: 1.0, sample_rate: 0.5, steps: 1 };
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (out, _) = train_text(&a, &p, &data, &cfg(), &dp, &mut rng, &mut ()).expect("train");
        let changed = out.values().iter().zip(p.values()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(changed, p.values().len(), "every coordinate moved");
        // head_only: only the output layer moves.
        let head_cfg = TrainConfig { head_only: true, ..cfg() };
        let (out, _) = train_text(&a, &p, &data, &head_cfg, &dp, &mut rng, &mut ()).expect("train");
        let out_at = a.buckets * a.embed_dim + a.embed_dim * a.hidden + a.hidden;
        assert!(out.values()[..out_at].iter().zip(&p.values()[..out_at]).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(out.values()[out_at..].iter().zip(&p.values()[out_at..]).all(|(a, b)| a.to_bits() != b.to_bits()));
    }

    #[test]
    fn tabular_dp_sgd_learns_without_noise_and_refuses_bad_input() {
        let arch = MlpArch { n_in: 2, hidden: 8, n_labels: 2 };
        let start = crate::nn::init_params::<crate::nn::Mlp>(&arch, 1);
        let mut data = TabularData::default();
        for i in 0..200 {
            let x = (i % 10) as f32 / 5.0 - 1.0;
            data.rows.push(vec![x, -x]);
            data.labels.push(usize::from(x > 0.0));
        }
        let dp = DpSgd { clip: 1.0, noise_multiplier: 0.0, sample_rate: 0.2, steps: 200 };
        let c = TrainConfig { optimizer: Optimizer::Adam, learning_rate: 0.05, ..cfg() };
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let (p, _) = train_tabular(&arch, &start, &data, &c, &dp, &mut rng, &mut ()).expect("train");
        let acc = crate::nn::evaluate::<crate::nn::Mlp>(&arch, &p, &data).expect("eval").metrics().accuracy;
        assert!(acc > 0.95, "accuracy {acc}");
        let bad = DpSgd { sample_rate: 0.0, ..dp };
        let err = train_tabular(&arch, &start, &data, &c, &bad, &mut rng, &mut ()).expect_err("refused");
        assert!(err.contains("sample rate"), "{err}");
        let err = train_tabular(&arch, &start, &TabularData::default(), &c, &dp, &mut rng, &mut ()).expect_err("empty");
        assert!(err.contains("at least one record"), "{err}");
    }
}
