//! The burn networks and what every Maeum model shares: a fixed parameter layout,
//! flattening to and from [`FlatParams`], seeded initialisation, a batch builder, and
//! one training loop (SGD or Adam, optional FedProx term) and one evaluation loop.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, SgdConfig};
use burn::tensor::activation::{log_softmax, relu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::metrics::Confusion;
use crate::params::{FlatParams, Layout, ParamsError, TensorSpec};

/// Optimiser for local training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    Sgd,
    Adam,
}

impl std::fmt::Display for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Optimizer::Sgd => "sgd",
            Optimizer::Adam => "adam",
        })
    }
}

/// Local training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// FedProx proximal coefficient μ; the loss gains μ/2‖w − w_global‖². 0 disables it.
    #[serde(default)]
    pub prox_mu: f64,
    /// Input-feature dropout probability (text classifier), a regulariser.
    #[serde(default)]
    pub dropout: f64,
    /// Train only the output layer: every other parameter (embedding, hidden layer)
    /// requires no gradient and stays bit-identical to `start` (personalisation).
    #[serde(default)]
    pub head_only: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            optimizer: Optimizer::Adam,
            learning_rate: 2e-3,
            epochs: 8,
            batch_size: 32,
            seed: 7,
            prox_mu: 0.0,
            dropout: 0.5,
            head_only: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!("learning_rate must be positive, got {}", self.learning_rate));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        if !(self.prox_mu.is_finite() && self.prox_mu >= 0.0) {
            return Err(format!("prox_mu must be ≥ 0, got {}", self.prox_mu));
        }
        Ok(())
    }
}

/// A training set in the form a network consumes.
pub trait Examples {
    /// Inputs of a batch, already on the device.
    type Batch;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn label(&self, row: usize) -> usize;
    fn batch(&self, rows: &[usize], device: &Device) -> Self::Batch;
}

/// What every Maeum network provides.
pub trait Network: Module + Clone + Sized {
    type Data: Examples;
    /// The architecture's hyper-parameters (they determine the layout).
    type Arch: Clone;
    /// The ordered parameter names and shapes, as `visit` meets them.
    fn layout_of(arch: &Self::Arch) -> Layout;
    fn zeros(arch: &Self::Arch, device: &Device) -> Self;
    /// Initial values for tensor `spec` (seeded).
    fn init_tensor(spec: &TensorSpec, rng: &mut ChaCha20Rng) -> Vec<f32>;
    fn n_labels(&self) -> usize;
    fn logits(&self, batch: &<Self::Data as Examples>::Batch) -> Tensor<2>;
    /// This network with every parameter except the output layer's marked as requiring
    /// no gradient (burn's `no_grad`), so the optimiser never updates them.
    fn output_only(self) -> Self;
}

/// Seeded initial parameters of `arch`.
pub fn init_params<N: Network>(arch: &N::Arch, seed: u64) -> FlatParams {
    init_layout::<N>(N::layout_of(arch), seed)
}

/// Seeded initial parameters for `layout` (`N`'s, for a network whose architecture is
/// only known with its data, such as [`crate::lora::LoraNet`]).
pub fn init_layout<N: Network>(layout: Layout, seed: u64) -> FlatParams {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let values = layout.tensors.iter().flat_map(|t| N::init_tensor(t, &mut rng)).collect();
    // INVARIANT: init_tensor returns numel values per tensor.
    #[allow(clippy::unwrap_used)]
    FlatParams::new(layout, values).unwrap()
}

/// Xavier/Glorot uniform for a `[fan_in, fan_out]` weight.
pub fn xavier(shape: &[usize], rng: &mut ChaCha20Rng) -> Vec<f32> {
    let (fan_in, fan_out) = (shape[0] as f64, shape.get(1).copied().unwrap_or(1) as f64);
    let a = (6.0 / (fan_in + fan_out)).sqrt();
    (0..shape.iter().product::<usize>()).map(|_| rng.random_range(-a..a) as f32).collect()
}

struct Flatten {
    values: Vec<f32>,
    shapes: Vec<Vec<usize>>,
}

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.shapes.push(t.dims().to_vec());
        // INVARIANT: parameters are f32 tensors we created.
        #[allow(clippy::unwrap_used)]
        self.values.extend(t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
    }
}

struct Load<'a> {
    params: &'a FlatParams,
    tensor: usize,
    offset: usize,
}

impl ModuleMapper for Load<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let spec = &self.params.layout().tensors[self.tensor];
        let slice = &self.params.values()[self.offset..self.offset + spec.numel()];
        self.tensor += 1;
        self.offset += spec.numel();
        param.map(|t| {
            let require_grad = t.is_require_grad();
            let device = t.device();
            let shape: [usize; D] = t.dims();
            // The layout check in `load` guarantees spec.shape == shape.
            Tensor::<D>::from_data(TensorData::new(slice.to_vec(), shape), &device).set_require_grad(require_grad)
        })
    }
}

/// The network's parameters as one flat vector.
pub fn to_flat<N: Network>(net: &N, arch: &N::Arch) -> FlatParams {
    let mut v = Flatten { values: Vec::new(), shapes: Vec::new() };
    net.visit(&mut v);
    let layout = N::layout_of(arch);
    debug_assert_eq!(v.shapes, layout.tensors.iter().map(|t| t.shape.clone()).collect::<Vec<_>>());
    // INVARIANT: the module's own parameters always match its layout.
    #[allow(clippy::unwrap_used)]
    FlatParams::new(layout, v.values).unwrap()
}

/// Builds the network on `device` with the given parameters; refuses another layout.
pub fn from_flat<N: Network>(arch: &N::Arch, params: &FlatParams, device: &Device) -> Result<N, ParamsError> {
    params.expect_layout(&N::layout_of(arch))?;
    let net = N::zeros(arch, device);
    Ok(net.map(&mut Load { params, tensor: 0, offset: 0 }))
}

/// Progress reports from training (for progress bars).
pub trait Progress {
    fn start(&mut self, _total_steps: u64) {}
    fn step(&mut self, _epoch: usize, _loss: f32) {}
}

impl Progress for () {}

/// What local training reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: u64,
    pub examples_seen: u64,
    pub final_loss: f32,
    pub seconds: f64,
}

fn one_hot(labels: &[usize], k: usize, device: &Device) -> Tensor<2> {
    let mut v = vec![0f32; labels.len() * k];
    for (i, &l) in labels.iter().enumerate() {
        v[i * k + l] = 1.0;
    }
    Tensor::from_data(TensorData::new(v, [labels.len(), k]), device)
}

struct Collect {
    out: Vec<Tensor<1>>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.out.push(t.reshape([n]));
    }
}

/// The local objective: mean cross-entropy, plus the FedProx term μ/2‖w − w_start‖²
/// over the module's parameters when μ > 0.
pub(crate) struct Objective {
    mu: f32,
    start: Vec<Tensor<1>>,
}

impl Objective {
    pub(crate) fn new(cfg: &TrainConfig, start: &FlatParams, device: &Device) -> Self {
        let start = if cfg.prox_mu > 0.0 {
            start
                .tensors()
                .map(|(_, s)| Tensor::<1>::from_data(TensorData::new(s.to_vec(), [s.len()]), device))
                .collect()
        } else {
            Vec::new()
        };
        Self { mu: cfg.prox_mu as f32, start }
    }

    pub(crate) fn loss<M: Module>(&self, net: &M, logits: Tensor<2>, labels: &[usize]) -> Tensor<1> {
        let [n, k] = logits.dims();
        let targets = one_hot(labels, k, &logits.device());
        let mut loss = (log_softmax(logits, 1) * targets).sum().neg().div_scalar(n as f32);
        if self.mu > 0.0 {
            let mut c = Collect { out: Vec::new() };
            net.visit(&mut c);
            for (w, g) in c.out.into_iter().zip(&self.start) {
                loss = loss + (w - g.clone()).powi_scalar(2).sum().mul_scalar(self.mu / 2.0);
            }
        }
        loss
    }
}

/// burn's optimiser for `cfg`.
pub(crate) fn optimizer(cfg: &TrainConfig) -> burn::optim::ModuleOptimizer {
    match cfg.optimizer {
        Optimizer::Sgd => SgdConfig::new().init(),
        Optimizer::Adam => AdamConfig::new().with_epsilon(1e-8).init(),
    }
}

/// Trains from `start` on `data` and returns the new parameters. With `prox_mu > 0`
/// the proximal term is taken around `start` (the global model, in FedProx); with
/// `head_only` only the output layer is trained.
pub fn train<N: Network>(
    arch: &N::Arch,
    start: &FlatParams,
    data: &N::Data,
    cfg: &TrainConfig,
    progress: &mut dyn Progress,
) -> Result<(FlatParams, TrainReport), ParamsError> {
    let device = Device::flex().autodiff();
    let t0 = std::time::Instant::now();
    let mut net: N = from_flat(arch, start, &device)?;
    if cfg.head_only {
        net = net.output_only();
    }
    let objective = Objective::new(cfg, start, &device);
    let mut optim = optimizer(cfg);
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let steps_per_epoch = data.len().div_ceil(cfg.batch_size) as u64;
    progress.start(steps_per_epoch * cfg.epochs as u64);
    let (mut steps, mut seen, mut last_loss) = (0u64, 0u64, f32::NAN);
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for rows in order.chunks(cfg.batch_size) {
            let batch = data.batch(rows, &device);
            let labels: Vec<usize> = rows.iter().map(|&r| data.label(r)).collect();
            let loss = objective.loss(&net, net.logits(&batch), &labels);
            last_loss = loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optim.step(cfg.learning_rate, net, grads);
            steps += 1;
            seen += rows.len() as u64;
            progress.step(epoch, last_loss);
        }
    }
    let report = TrainReport { steps, examples_seen: seen, final_loss: last_loss, seconds: t0.elapsed().as_secs_f64() };
    Ok((to_flat(&net, arch), report))
}

/// Evaluates on `data`: the confusion matrix over all rows.
pub fn evaluate<N: Network>(arch: &N::Arch, params: &FlatParams, data: &N::Data) -> Result<Confusion, ParamsError> {
    let device = Device::flex();
    let net: N = from_flat(arch, params, &device)?;
    let mut conf = Confusion::new(net.n_labels());
    let rows: Vec<usize> = (0..data.len()).collect();
    for chunk in rows.chunks(256) {
        let pred = net.logits(&data.batch(chunk, &device)).argmax(1);
        // INVARIANT: argmax yields an int tensor.
        #[allow(clippy::unwrap_used)]
        let pred: Vec<i64> = pred.into_data().convert::<i64>().try_into_vec::<i64>().unwrap();
        for (&r, &p) in chunk.iter().zip(&pred) {
            conf.add(data.label(r), p as usize);
        }
    }
    Ok(conf)
}

/// Class probabilities for each row of `data` (local inference).
pub fn predict_proba<N: Network>(
    arch: &N::Arch,
    params: &FlatParams,
    data: &N::Data,
) -> Result<Vec<Vec<f32>>, ParamsError> {
    let device = Device::flex();
    let net: N = from_flat(arch, params, &device)?;
    let k = net.n_labels();
    let rows: Vec<usize> = (0..data.len()).collect();
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(256) {
        let p = softmax(net.logits(&data.batch(chunk, &device)), 1);
        // INVARIANT: softmax yields a float tensor.
        #[allow(clippy::unwrap_used)]
        let v: Vec<f32> = p.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        out.extend(v.chunks(k).map(<[f32]>::to_vec));
    }
    Ok(out)
}

pub(crate) fn spec(name: &str, shape: &[usize]) -> TensorSpec {
    TensorSpec { name: name.into(), shape: shape.to_vec() }
}

// ---------------------------------------------------------------- MLP

/// Architecture of a one-hidden-layer MLP, or with `hidden = 0` a linear layer without
/// bias (a linear probe: on unit-length sentence vectors a bias would take half of each
/// example's clipping budget under differential privacy, `docs/models.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpArch {
    pub n_in: usize,
    pub hidden: usize,
    pub n_labels: usize,
}

/// Inputs → ReLU hidden layer → label logits. The questionnaire model on standardised
/// numeric columns, the text classifier's head on embedding bags, and the encoder head
/// on sentence vectors (there also linear: only `output_w`).
#[derive(Module, Debug)]
pub struct Mlp {
    hidden_w: Option<Param<Tensor<2>>>,
    hidden_b: Option<Param<Tensor<1>>>,
    output_w: Param<Tensor<2>>,
    output_b: Option<Param<Tensor<1>>>,
}
/// Dense input rows (for the questionnaire model: standardised with the scaler stored
/// in the model spec).
#[derive(Clone, Default)]
pub struct TabularData {
    pub rows: Vec<Vec<f32>>,
    pub labels: Vec<usize>,
}

impl std::fmt::Debug for TabularData {
    // Rows are local records: show only their shape.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TabularData {{ {} rows × {} columns }}", self.rows.len(), self.rows.first().map_or(0, Vec::len))
    }
}

impl Examples for TabularData {
    type Batch = Tensor<2>;
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn label(&self, row: usize) -> usize {
        self.labels[row]
    }
    fn batch(&self, rows: &[usize], device: &Device) -> Tensor<2> {
        let f = self.rows.first().map_or(0, Vec::len);
        let v: Vec<f32> = rows.iter().flat_map(|&r| self.rows[r].iter().copied()).collect();
        Tensor::from_data(TensorData::new(v, [rows.len(), f]), device)
    }
}

impl Network for Mlp {
    type Data = TabularData;
    type Arch = MlpArch;

    fn layout_of(a: &MlpArch) -> Layout {
        if a.hidden == 0 {
            return Layout::new(vec![spec("output.weight", &[a.n_in, a.n_labels])]);
        }
        Layout::new(vec![
            spec("hidden.weight", &[a.n_in, a.hidden]),
            spec("hidden.bias", &[a.hidden]),
            spec("output.weight", &[a.hidden, a.n_labels]),
            spec("output.bias", &[a.n_labels]),
        ])
    }

    fn zeros(a: &MlpArch, device: &Device) -> Self {
        let p2 = |s: [usize; 2]| Param::from_tensor(Tensor::zeros(s, device));
        let p1 = |n: usize| Param::from_tensor(Tensor::zeros([n], device));
        if a.hidden == 0 {
            return Self { hidden_w: None, hidden_b: None, output_w: p2([a.n_in, a.n_labels]), output_b: None };
        }
        Self {
            hidden_w: Some(p2([a.n_in, a.hidden])),
            hidden_b: Some(p1(a.hidden)),
            output_w: p2([a.hidden, a.n_labels]),
            output_b: Some(p1(a.n_labels)),
        }
    }

    fn init_tensor(t: &TensorSpec, rng: &mut ChaCha20Rng) -> Vec<f32> {
        if t.name.ends_with(".bias") { vec![0.0; t.numel()] } else { xavier(&t.shape, rng) }
    }

    fn n_labels(&self) -> usize {
        self.output_w.dims()[1]
    }

    fn logits(&self, x: &Tensor<2>) -> Tensor<2> {
        let h = match (&self.hidden_w, &self.hidden_b) {
            (Some(w), Some(b)) => relu(x.clone().matmul(w.val()) + b.val().unsqueeze_dim(0)),
            _ => x.clone(),
        };
        let z = h.matmul(self.output_w.val());
        match &self.output_b {
            Some(b) => z + b.val().unsqueeze_dim(0),
            None => z,
        }
    }

    fn output_only(self) -> Self {
        Self { hidden_w: self.hidden_w.map(Param::no_grad), hidden_b: self.hidden_b.map(Param::no_grad), ..self }
    }
}
