//! The counseling text classifier: hashed n-grams → embedding bag → ReLU hidden layer
//! → label logits.
//!
//! burn has no sparse gradients, so a plain `Embedding` would touch all
//! `buckets × embed_dim` parameters at every step (and pad every batch to its longest
//! post). The embedding bag is therefore computed here directly over each document's
//! sparse features (forward: weighted row sum; backward: scatter of the bag gradient
//! into the rows the batch used), with a lazy Adam on the touched rows, as PyTorch's
//! `EmbeddingBag(sparse=True)` + `SparseAdam` do. The dense head (hidden and output
//! layers), the loss and its gradient to the bag are burn autodiff with burn's
//! optimisers. With FedProx (μ > 0) every row is updated at every step, because the
//! proximal gradient μ(w − w_global) is dense. With `head_only` the embedding table and
//! the hidden layer are frozen: the bag needs no gradient, the table is not stepped, and
//! the hidden layer's parameters require no gradient (`Network::output_only`).

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::features::SparseDoc;
use crate::metrics::Confusion;
use crate::nn::{self, Mlp, MlpArch, Network, Objective, Optimizer, Progress, TabularData, TrainConfig, TrainReport};
use crate::params::{FlatParams, Layout, ParamsError};

/// Architecture of the text classifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextArch {
    pub buckets: usize,
    pub embed_dim: usize,
    pub hidden: usize,
    pub n_labels: usize,
}

impl TextArch {
    /// The full layout: the embedding table first, then the head.
    pub fn layout(&self) -> Layout {
        let mut t = vec![nn::spec("embedding.weight", &[self.buckets, self.embed_dim])];
        t.extend(Mlp::layout_of(&self.head()).tensors);
        Layout::new(t)
    }

    /// The dense head: bag → ReLU hidden layer → logits.
    pub fn head(&self) -> MlpArch {
        MlpArch { n_in: self.embed_dim, hidden: self.hidden, n_labels: self.n_labels }
    }

    fn emb_len(&self) -> usize {
        self.buckets * self.embed_dim
    }

    /// Seeded initial parameters.
    pub fn init(&self, seed: u64) -> FlatParams {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        // Small: a feature seen rarely in training keeps a near-zero row and adds little
        // noise at test time (±0.5 cost 1–2 accuracy points on RMHD; docs/benchmarks.md).
        let mut values: Vec<f32> = (0..self.emb_len()).map(|_| rng.random_range(-EMB_INIT..EMB_INIT)).collect();
        for t in &Mlp::layout_of(&self.head()).tensors {
            values.extend(Mlp::init_tensor(t, &mut rng));
        }
        // INVARIANT: exactly numel values were generated.
        #[allow(clippy::unwrap_used)]
        FlatParams::new(self.layout(), values).unwrap()
    }

    pub(crate) fn split(&self, params: &FlatParams) -> Result<(Vec<f32>, FlatParams), ParamsError> {
        params.expect_layout(&self.layout())?;
        let (emb, head) = params.values().split_at(self.emb_len());
        Ok((emb.to_vec(), FlatParams::new(Mlp::layout_of(&self.head()), head.to_vec())?))
    }

    pub(crate) fn join(&self, emb: Vec<f32>, head: &FlatParams) -> FlatParams {
        let mut values = emb;
        values.extend_from_slice(head.values());
        // INVARIANT: both parts come from this architecture.
        #[allow(clippy::unwrap_used)]
        FlatParams::new(self.layout(), values).unwrap()
    }
}

/// Range of the uniform initialisation of embedding rows.
const EMB_INIT: f32 = 0.05;

/// Featurised documents with their label indices.
#[derive(Clone, Default)]
pub struct TextData {
    pub docs: Vec<SparseDoc>,
    pub labels: Vec<usize>,
}

impl std::fmt::Debug for TextData {
    // Features and labels are derived from local records: show only the count.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextData {{ {} documents }}", self.docs.len())
    }
}

/// Weighted row sums of `emb` (`[buckets, dim]`) for `rows` of `docs`: `[rows, dim]`.
fn bags(emb: &[f32], dim: usize, docs: &[SparseDoc], rows: &[usize]) -> Vec<f32> {
    let mut out = vec![0f32; rows.len() * dim];
    for (o, &r) in out.chunks_exact_mut(dim).zip(rows) {
        let d = &docs[r];
        for (&id, &w) in d.ids.iter().zip(&d.weights) {
            let row = &emb[id as usize * dim..(id as usize + 1) * dim];
            o.iter_mut().zip(row).for_each(|(a, &e)| *a += w * e);
        }
    }
    out
}

/// Feature dropout: each (document, feature) is kept with probability `1 − p` and its
/// weight scaled by `1 / (1 − p)`; dropped features get weight 0 (and so no gradient).
fn drop_features(docs: &[SparseDoc], rows: &[usize], p: f64, rng: &mut ChaCha20Rng) -> Vec<SparseDoc> {
    rows.iter().map(|&r| drop_one(&docs[r], p, rng)).collect()
}

/// Feature dropout for one document (also used by DP-SGD, per example).
pub(crate) fn drop_one<R: Rng + ?Sized>(d: &SparseDoc, p: f64, rng: &mut R) -> SparseDoc {
    let scale = (1.0 / (1.0 - p)) as f32;
    let mut out = SparseDoc { ids: Vec::with_capacity(d.ids.len()), weights: Vec::with_capacity(d.ids.len()) };
    for (&id, &w) in d.ids.iter().zip(&d.weights) {
        if !rng.random_bool(p) {
            out.ids.push(id);
            out.weights.push(w * scale);
        }
    }
    out
}

/// Lazy Adam / SGD state of the embedding table.
struct EmbeddingOptim {
    kind: Optimizer,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
    /// Per bucket: its slot in `touched` during the current step, or u32::MAX.
    slot: Vec<u32>,
    touched: Vec<u32>,
    grad: Vec<f32>,
}

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

impl EmbeddingOptim {
    fn new(kind: Optimizer, a: &TextArch) -> Self {
        let adam = kind == Optimizer::Adam;
        Self {
            kind,
            m: if adam { vec![0.0; a.emb_len()] } else { Vec::new() },
            v: if adam { vec![0.0; a.emb_len()] } else { Vec::new() },
            t: 0,
            slot: vec![u32::MAX; a.buckets],
            touched: Vec::new(),
            grad: Vec::new(),
        }
    }

    /// Scatters `g_bag` (`[rows, dim]`) into the rows of the batch's features.
    fn accumulate(&mut self, dim: usize, docs: &[SparseDoc], rows: &[usize], g_bag: &[f32]) {
        for (g, &r) in g_bag.chunks_exact(dim).zip(rows) {
            let d = &docs[r];
            for (&id, &w) in d.ids.iter().zip(&d.weights) {
                let s = match self.slot[id as usize] {
                    u32::MAX => {
                        let s = self.touched.len() as u32;
                        self.slot[id as usize] = s;
                        self.touched.push(id);
                        self.grad.extend(std::iter::repeat_n(0.0, dim));
                        s
                    }
                    s => s,
                } as usize;
                self.grad[s * dim..(s + 1) * dim].iter_mut().zip(g).for_each(|(a, &x)| *a += w * x);
            }
        }
    }

    /// Applies the step to the touched rows (or to every row when `prox` is given:
    /// `(μ, global embedding)`), then clears the step's scratch.
    fn step(&mut self, emb: &mut [f32], dim: usize, lr: f32, prox: Option<(f32, &[f32])>) {
        self.t += 1;
        let (bc1, bc2) = (1.0 - BETA1.powi(self.t), 1.0 - BETA2.powi(self.t));
        let n_rows = emb.len() / dim;
        let mut update_row = |row: usize, grad: Option<&[f32]>| {
            for j in 0..dim {
                let i = row * dim + j;
                let mut g = grad.map_or(0.0, |g| g[j]);
                if let Some((mu, global)) = prox {
                    g += mu * (emb[i] - global[i]);
                }
                match self.kind {
                    Optimizer::Sgd => emb[i] -= lr * g,
                    Optimizer::Adam => {
                        self.m[i] = BETA1 * self.m[i] + (1.0 - BETA1) * g;
                        self.v[i] = BETA2 * self.v[i] + (1.0 - BETA2) * g * g;
                        emb[i] -= lr * (self.m[i] / bc1) / ((self.v[i] / bc2).sqrt() + EPS);
                    }
                }
            }
        };
        if prox.is_some() {
            for row in 0..n_rows {
                let grad = match self.slot[row] {
                    u32::MAX => None,
                    s => Some(&self.grad[s as usize * dim..(s as usize + 1) * dim]),
                };
                update_row(row, grad);
            }
        } else {
            for (s, &id) in self.touched.iter().enumerate() {
                update_row(id as usize, Some(&self.grad[s * dim..(s + 1) * dim]));
            }
        }
        for &id in &self.touched {
            self.slot[id as usize] = u32::MAX;
        }
        self.touched.clear();
        self.grad.clear();
    }
}

fn to_vec(t: Tensor<2>) -> Vec<f32> {
    // INVARIANT: float tensors we created convert to f32.
    #[allow(clippy::unwrap_used)]
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// Trains from `start`; with `prox_mu > 0` the proximal term is taken around `start`.
pub fn train(
    a: &TextArch,
    start: &FlatParams,
    data: &TextData,
    cfg: &TrainConfig,
    progress: &mut dyn Progress,
) -> Result<(FlatParams, TrainReport), ParamsError> {
    let device = Device::flex().autodiff();
    let t0 = std::time::Instant::now();
    let (mut emb, head_params) = a.split(start)?;
    let global_emb = if cfg.prox_mu > 0.0 { emb.clone() } else { Vec::new() };
    let mut head: Mlp = nn::from_flat(&a.head(), &head_params, &device)?;
    if cfg.head_only {
        head = head.output_only();
    }
    let objective = Objective::new(cfg, &head_params, &device);
    let mut optim = nn::optimizer(cfg);
    let mut emb_optim = EmbeddingOptim::new(cfg.optimizer, a);
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..data.docs.len()).collect();
    let steps_per_epoch = data.docs.len().div_ceil(cfg.batch_size) as u64;
    progress.start(steps_per_epoch * cfg.epochs as u64);
    let (mut steps, mut seen, mut last_loss) = (0u64, 0u64, f32::NAN);
    let lr = cfg.learning_rate as f32;
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for rows in order.chunks(cfg.batch_size) {
            let n = rows.len();
            let batch_docs;
            let (docs, local_rows): (&[SparseDoc], Vec<usize>) = if cfg.dropout > 0.0 {
                batch_docs = drop_features(&data.docs, rows, cfg.dropout, &mut rng);
                (&batch_docs, (0..n).collect())
            } else {
                (&data.docs, rows.to_vec())
            };
            let bag = Tensor::<2>::from_data(
                TensorData::new(bags(&emb, a.embed_dim, docs, &local_rows), [n, a.embed_dim]),
                &device,
            )
            .set_require_grad(!cfg.head_only);
            let labels: Vec<usize> = rows.iter().map(|&r| data.labels[r]).collect();
            let loss = objective.loss(&head, head.logits(&bag), &labels);
            last_loss = loss.clone().into_scalar::<f32>();
            let mut grads = loss.backward();
            let g_bag = bag.grad_remove(&mut grads).map(to_vec);
            let head_grads = GradientsParams::from_grads(grads, &head);
            head = optim.step(cfg.learning_rate, head, head_grads);
            if !cfg.head_only {
                let g_bag = g_bag.unwrap_or_else(|| vec![0.0; n * a.embed_dim]);
                emb_optim.accumulate(a.embed_dim, docs, &local_rows, &g_bag);
                let prox = (cfg.prox_mu > 0.0).then_some((cfg.prox_mu as f32, global_emb.as_slice()));
                emb_optim.step(&mut emb, a.embed_dim, lr, prox);
            }
            steps += 1;
            seen += n as u64;
            progress.step(epoch, last_loss);
        }
    }
    let head_params = nn::to_flat(&head, &a.head());
    let report = TrainReport { steps, examples_seen: seen, final_loss: last_loss, seconds: t0.elapsed().as_secs_f64() };
    Ok((a.join(emb, &head_params), report))
}

fn bag_data(a: &TextArch, emb: &[f32], data: &TextData) -> TabularData {
    let rows: Vec<usize> = (0..data.docs.len()).collect();
    let flat = bags(emb, a.embed_dim, &data.docs, &rows);
    TabularData { rows: flat.chunks(a.embed_dim).map(<[f32]>::to_vec).collect(), labels: data.labels.clone() }
}

/// The confusion matrix of `params` on `data`.
pub fn evaluate(a: &TextArch, params: &FlatParams, data: &TextData) -> Result<Confusion, ParamsError> {
    let (emb, head) = a.split(params)?;
    nn::evaluate::<Mlp>(&a.head(), &head, &bag_data(a, &emb, data))
}

/// Class probabilities per document.
pub fn predict_proba(a: &TextArch, params: &FlatParams, data: &TextData) -> Result<Vec<Vec<f32>>, ParamsError> {
    let (emb, head) = a.split(params)?;
    nn::predict_proba::<Mlp>(&a.head(), &head, &bag_data(a, &emb, data))
}
