//! Trained models as files: the flat parameters in safetensors plus a [`ModelSpec`]
//! (kind, architecture, featuriser, label set) stored in the safetensors header under
//! `maeum.model`, so one file is enough to run the model anywhere.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::data::{Example, LabelSet, Table};
use crate::encoder::{EncoderError, EncoderSpec, Encoders};
use crate::features::{FeatureConfig, featurize};
use crate::lora::{LoraArch, LoraConfig, LoraNet, TokenData};
use crate::nn::{self, Mlp, MlpArch, TabularData, TrainConfig, TrainReport};
use crate::params::{FlatParams, Layout, ParamsError};
use crate::standin::StandInArch;
use crate::text::{self, TextArch, TextData};

/// Text-classifier hyper-parameters (architecture and featuriser).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextClassifierConfig {
    #[serde(default)]
    pub features: FeatureConfig,
    pub embed_dim: usize,
    pub hidden: usize,
}

impl Default for TextClassifierConfig {
    fn default() -> Self {
        Self { features: FeatureConfig::default(), embed_dim: 64, hidden: 128 }
    }
}

/// Everything needed to rebuild a model from its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ModelSpec {
    TextClassifier {
        config: TextClassifierConfig,
        labels: LabelSet,
    },
    /// A frozen pretrained sentence encoder ([`crate::encoder`]) and a trained MLP head
    /// on its vectors, or with `hidden = 0` a linear head without bias (the choice for
    /// differential privacy, `docs/models.md`). Only the head is in the parameters (and
    /// in every update).
    EncoderHead {
        encoder: EncoderSpec,
        hidden: usize,
        labels: LabelSet,
    },
    /// A pretrained encoder whose top layers are fine-tuned with FFA-LoRA adapters
    /// ([`crate::lora`]), and an MLP head. Only the adapters' `B` and the head are in
    /// the parameters.
    EncoderLora {
        encoder: EncoderSpec,
        lora: LoraConfig,
        hidden: usize,
        labels: LabelSet,
    },
    /// A flat vector of `params` values with synthetic training, the size of a large
    /// model's adapters, for scale tests ([`crate::standin`]). Predicts the label prior.
    AdapterStandIn {
        params: usize,
        labels: LabelSet,
    },
    TabularMlp {
        columns: Vec<String>,
        /// Standardisation fitted on the training data: `(x − mean) / std`.
        mean: Vec<f32>,
        std: Vec<f32>,
        hidden: usize,
        labels: LabelSet,
    },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error("{path}: not a Maeum model: {detail}")]
    Spec { path: String, detail: String },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error("this is a {actual} model, expected {expected}")]
    WrongKind { expected: &'static str, actual: &'static str },
}

impl ModelSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            ModelSpec::TextClassifier { .. } => "text-classifier",
            ModelSpec::EncoderHead { .. } => "encoder-head",
            ModelSpec::EncoderLora { .. } => "encoder-lora",
            ModelSpec::AdapterStandIn { .. } => "adapter-stand-in",
            ModelSpec::TabularMlp { .. } => "tabular-mlp",
        }
    }

    pub fn labels(&self) -> &LabelSet {
        match self {
            ModelSpec::TextClassifier { labels, .. }
            | ModelSpec::EncoderHead { labels, .. }
            | ModelSpec::EncoderLora { labels, .. }
            | ModelSpec::AdapterStandIn { labels, .. }
            | ModelSpec::TabularMlp { labels, .. } => labels,
        }
    }

    pub fn layout(&self) -> Layout {
        match self.arch() {
            Arch::Text(a) => a.layout(),
            Arch::Tabular(a) => <Mlp as nn::Network>::layout_of(&a),
            Arch::Lora(l) => crate::lora::layout(&l.lora, l.dim, l.hidden, l.n_labels),
            Arch::StandIn(a) => a.layout(),
        }
    }

    /// The network architecture this spec describes.
    fn arch(&self) -> Arch {
        match self {
            ModelSpec::TextClassifier { config, labels } => Arch::Text(TextArch {
                buckets: config.features.buckets as usize,
                embed_dim: config.embed_dim,
                hidden: config.hidden,
                n_labels: labels.len(),
            }),
            ModelSpec::EncoderHead { encoder, hidden, labels } => {
                Arch::Tabular(MlpArch { n_in: encoder.dim, hidden: *hidden, n_labels: labels.len() })
            }
            ModelSpec::EncoderLora { encoder, lora, hidden, labels } => {
                Arch::Lora(LoraShape { lora: lora.clone(), dim: encoder.dim, hidden: *hidden, n_labels: labels.len() })
            }
            ModelSpec::AdapterStandIn { params, labels } => {
                Arch::StandIn(StandInArch { params: *params, n_labels: labels.len() })
            }
            ModelSpec::TabularMlp { columns, hidden, labels, .. } => {
                Arch::Tabular(MlpArch { n_in: columns.len(), hidden: *hidden, n_labels: labels.len() })
            }
        }
    }

    /// The pretrained encoder this model runs on its inputs, if any.
    pub fn encoder(&self) -> Option<&EncoderSpec> {
        match self {
            ModelSpec::EncoderHead { encoder, .. } | ModelSpec::EncoderLora { encoder, .. } => Some(encoder),
            _ => None,
        }
    }

    /// Pairs the architecture with prepared data of the same kind.
    fn with_data<'a>(&self, data: &'a Prepared) -> Result<ArchData<'a>, ModelError> {
        match (self.arch(), data) {
            (Arch::Text(a), Prepared::Text(d)) => Ok(ArchData::Text(a, d)),
            (Arch::Tabular(a), Prepared::Tabular(d)) => Ok(ArchData::Tabular(a, d)),
            (Arch::Lora(l), Prepared::Tokens(d)) => {
                if d.frozen.layers.len() != l.lora.layers || d.frozen.hidden != l.dim {
                    return Err(ModelError::Config(format!(
                        "the prepared token states are for {} adapted layers of width {}, the model has {} of width {}",
                        d.frozen.layers.len(),
                        d.frozen.hidden,
                        l.lora.layers,
                        l.dim
                    )));
                }
                let arch = LoraArch { frozen: d.frozen.clone(), lora: l.lora, hidden: l.hidden, n_labels: l.n_labels };
                Ok(ArchData::Lora(arch, d))
            }
            (Arch::StandIn(a), Prepared::Labels(d)) => Ok(ArchData::StandIn(a, &d.0)),
            (_, Prepared::Labels(_)) => {
                Err(ModelError::WrongKind { expected: "adapter-stand-in", actual: self.kind() })
            }
            (_, Prepared::Tokens(_)) => Err(ModelError::WrongKind { expected: "encoder-lora", actual: self.kind() }),
            (_, Prepared::Text(_)) => Err(ModelError::WrongKind { expected: "text-classifier", actual: self.kind() }),
            (_, Prepared::Tabular(_)) => {
                Err(ModelError::WrongKind { expected: "tabular-mlp or encoder-head", actual: self.kind() })
            }
        }
    }

    /// Seeded initial parameters for this spec.
    pub fn init(&self, seed: u64) -> Result<FlatParams, ModelError> {
        match self {
            ModelSpec::TextClassifier { config, .. } => {
                config.features.validate().map_err(ModelError::Config)?;
                if config.embed_dim == 0 || config.hidden == 0 {
                    return Err(ModelError::Config("embed_dim and hidden must be positive".into()));
                }
            }
            // An encoder head may be linear (`hidden = 0`); the others need a hidden layer.
            ModelSpec::TabularMlp { hidden, .. } | ModelSpec::EncoderLora { hidden, .. } if *hidden == 0 => {
                return Err(ModelError::Config("hidden must be positive".into()));
            }
            ModelSpec::EncoderHead { encoder, .. } | ModelSpec::EncoderLora { encoder, .. } if encoder.dim == 0 => {
                return Err(ModelError::Config("the encoder's dim must be positive".into()));
            }
            ModelSpec::EncoderLora { lora, .. } => lora.validate().map_err(ModelError::Config)?,
            ModelSpec::AdapterStandIn { params: 0, .. } => {
                return Err(ModelError::Config("the stand-in's params must be positive".into()));
            }
            ModelSpec::TabularMlp { .. } | ModelSpec::EncoderHead { .. } | ModelSpec::AdapterStandIn { .. } => {}
        }
        Ok(match self.arch() {
            Arch::Text(a) => a.init(seed),
            Arch::Tabular(a) => nn::init_params::<Mlp>(&a, seed),
            Arch::Lora(l) => crate::lora::init(&l.lora, l.dim, l.hidden, l.n_labels, seed),
            Arch::StandIn(a) => a.init(seed),
        })
    }
}

/// Differential privacy needs per-example gradients in closed form; the adapted
/// transformer layers have none here yet.
const NO_DP_LORA: &str = "differential privacy is not available for encoder-lora models (per-example gradients \
                          through the adapted layers are not implemented); use encoder-head";

/// The stand-in's update is its label frequencies, not a gradient.
const NO_DP_STAND_IN: &str = "differential privacy is not available for the adapter stand-in (its update is not a \
                              gradient); use encoder-head";

enum Arch {
    Text(TextArch),
    Tabular(MlpArch),
    Lora(LoraShape),
    StandIn(StandInArch),
}

/// What an `encoder-lora` spec says of its shape; the frozen layers come with the data.
struct LoraShape {
    lora: LoraConfig,
    dim: usize,
    hidden: usize,
    n_labels: usize,
}

enum ArchData<'a> {
    Text(TextArch, &'a TextData),
    Tabular(MlpArch, &'a TabularData),
    Lora(LoraArch, &'a TokenData),
    StandIn(StandInArch, &'a [usize]),
}

/// A model's inputs, featurised for its kind.
#[derive(Debug, Clone)]
pub enum Prepared {
    Text(TextData),
    Tabular(TabularData),
    /// Hidden states below an `encoder-lora` model's adapted layers.
    Tokens(TokenData),
    /// The adapter stand-in reads only the labels (one per input).
    Labels(LabelData),
}

/// The label index of each input, for the adapter stand-in. Derived from local records,
/// so `Debug` shows only the count.
#[derive(Clone, Default)]
pub struct LabelData(pub Vec<usize>);

impl std::fmt::Debug for LabelData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LabelData {{ {} inputs }}", self.0.len())
    }
}

impl Prepared {
    pub fn len(&self) -> usize {
        match self {
            Prepared::Text(d) => d.docs.len(),
            Prepared::Tabular(d) => d.rows.len(),
            Prepared::Tokens(d) => d.states.len(),
            Prepared::Labels(d) => d.0.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The inputs of `parts`, one after another (all of one kind; `None` for none or a mix).
    pub fn concat(parts: &[Prepared]) -> Option<Prepared> {
        let mut out = parts.first()?.clone();
        for p in &parts[1..] {
            match (&mut out, p) {
                (Prepared::Text(a), Prepared::Text(b)) => {
                    a.docs.extend_from_slice(&b.docs);
                    a.labels.extend_from_slice(&b.labels);
                }
                (Prepared::Tabular(a), Prepared::Tabular(b)) => {
                    a.rows.extend_from_slice(&b.rows);
                    a.labels.extend_from_slice(&b.labels);
                }
                (Prepared::Tokens(a), Prepared::Tokens(b)) if Arc::ptr_eq(&a.frozen, &b.frozen) => {
                    a.states.extend_from_slice(&b.states);
                    a.labels.extend_from_slice(&b.labels);
                }
                (Prepared::Labels(a), Prepared::Labels(b)) => a.0.extend_from_slice(&b.0),
                _ => return None,
            }
        }
        Some(out)
    }

    /// The label index of each example (0 for unlabelled inputs).
    pub fn labels(&self) -> &[usize] {
        match self {
            Prepared::Text(d) => &d.labels,
            Prepared::Tabular(d) => &d.labels,
            Prepared::Tokens(d) => &d.labels,
            Prepared::Labels(d) => &d.0,
        }
    }
}

impl ModelSpec {
    /// Featurises text examples (labels must be in the spec's label set; unknown labels
    /// are a caller bug because readers validate them). Encoder models need
    /// [`ModelSpec::prepare_text_in`].
    pub fn prepare_text(&self, examples: &[Example]) -> Result<Prepared, ModelError> {
        self.prepare_examples(examples, None, &mut |_, _| {})
    }

    /// [`ModelSpec::prepare_text`] for every text model kind: an encoder model embeds
    /// the texts with its encoder from `encoders` (cached there). `progress(done, total)`.
    pub fn prepare_text_in(
        &self,
        examples: &[Example],
        encoders: &mut Encoders,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Prepared, ModelError> {
        self.prepare_examples(examples, Some(encoders), progress)
    }

    fn prepare_examples(
        &self,
        examples: &[Example],
        encoders: Option<&mut Encoders>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Prepared, ModelError> {
        let labels = examples
            .iter()
            .map(|e| {
                self.labels()
                    .index(&e.label)
                    .ok_or_else(|| ModelError::Config(format!("label {:?} not in the label set", e.label)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
        let mut prepared = self.prepare_texts(&texts, encoders, progress)?;
        match &mut prepared {
            Prepared::Text(d) => d.labels = labels,
            Prepared::Tabular(d) => d.labels = labels,
            Prepared::Tokens(d) => d.labels = labels,
            Prepared::Labels(d) => d.0 = labels,
        }
        Ok(prepared)
    }

    /// Featurises texts without labels (inference). Encoder models need
    /// [`ModelSpec::prepare_unlabelled_in`].
    pub fn prepare_unlabelled(&self, texts: &[String]) -> Result<Prepared, ModelError> {
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.prepare_texts(&texts, None, &mut |_, _| {})
    }

    /// [`ModelSpec::prepare_unlabelled`] for every text model kind.
    pub fn prepare_unlabelled_in(&self, texts: &[String], encoders: &mut Encoders) -> Result<Prepared, ModelError> {
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.prepare_texts(&texts, Some(encoders), &mut |_, _| {})
    }

    /// Inputs with label 0 (callers set the labels).
    fn prepare_texts(
        &self,
        texts: &[&str],
        encoders: Option<&mut Encoders>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Prepared, ModelError> {
        match self {
            ModelSpec::TextClassifier { config, .. } => {
                let docs: Vec<_> = texts.iter().map(|t| featurize(t, &config.features)).collect();
                let labels = vec![0; docs.len()];
                Ok(Prepared::Text(TextData { docs, labels }))
            }
            ModelSpec::EncoderHead { encoder, .. } => {
                let Some(encoders) = encoders else {
                    return Err(ModelError::Config(format!(
                        "an encoder-head model needs its encoder {:?}, and none was given",
                        encoder.name
                    )));
                };
                let flat = encoders.embed(encoder, texts, progress)?;
                let rows: Vec<Vec<f32>> = flat.chunks_exact(encoder.dim).map(<[f32]>::to_vec).collect();
                let labels = vec![0; rows.len()];
                Ok(Prepared::Tabular(TabularData { rows, labels }))
            }
            ModelSpec::EncoderLora { encoder, lora, .. } => {
                let Some(encoders) = encoders else {
                    return Err(ModelError::Config(format!(
                        "an encoder-lora model needs its encoder {:?}, and none was given",
                        encoder.name
                    )));
                };
                lora.validate().map_err(ModelError::Config)?;
                let enc = encoders.get(encoder)?;
                if lora.layers > enc.depth() {
                    return Err(ModelError::Config(format!(
                        "lora layers is {}, but encoder {:?} has {} layers",
                        lora.layers,
                        encoder.name,
                        enc.depth()
                    )));
                }
                let ids = enc.tokenize(texts)?;
                let total = ids.len();
                let states = enc.hidden_states(&ids, enc.depth() - lora.layers, &mut |done| progress(done, total));
                let frozen = encoders.top_layers(encoder, lora.layers)?;
                let labels = vec![0; states.len()];
                Ok(Prepared::Tokens(TokenData { states, labels, frozen }))
            }
            ModelSpec::AdapterStandIn { .. } => Ok(Prepared::Labels(LabelData(vec![0; texts.len()]))),
            ModelSpec::TabularMlp { .. } => Err(ModelError::WrongKind {
                expected: "text-classifier, encoder-head, encoder-lora or adapter-stand-in",
                actual: self.kind(),
            }),
        }
    }

    /// Standardises table rows with this spec's scaler.
    pub fn prepare_table(&self, table: &Table, rows: &[usize]) -> Result<Prepared, ModelError> {
        let ModelSpec::TabularMlp { columns, mean, std, labels, .. } = self else {
            return Err(ModelError::WrongKind { expected: "tabular-mlp", actual: self.kind() });
        };
        if &table.columns != columns {
            return Err(ModelError::Config(format!(
                "table columns {:?} differ from the model's {:?}",
                table.columns, columns
            )));
        }
        let data = TabularData {
            rows: rows
                .iter()
                .map(|&r| table.rows[r].iter().zip(mean.iter().zip(std)).map(|(x, (m, s))| (x - m) / s).collect())
                .collect(),
            labels: rows
                .iter()
                .map(|&r| {
                    labels
                        .index(&table.labels[r])
                        .ok_or_else(|| ModelError::Config(format!("label {:?} not in the label set", table.labels[r])))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Prepared::Tabular(data))
    }

    /// A tabular spec with the scaler fitted on `rows` of `table`.
    pub fn fit_tabular(table: &Table, rows: &[usize], labels: LabelSet, hidden: usize) -> Self {
        let f = table.columns.len();
        let n = rows.len().max(1) as f32;
        let mut mean = vec![0f32; f];
        for &r in rows {
            mean.iter_mut().zip(&table.rows[r]).for_each(|(m, x)| *m += x / n);
        }
        let mut var = vec![0f32; f];
        for &r in rows {
            var.iter_mut().zip(table.rows[r].iter().zip(&mean)).for_each(|(v, (x, m))| *v += (x - m) * (x - m) / n);
        }
        let std = var.into_iter().map(|v| if v > 1e-12 { v.sqrt() } else { 1.0 }).collect();
        ModelSpec::TabularMlp { columns: table.columns.clone(), mean, std, hidden, labels }
    }

    pub fn train(
        &self,
        start: &FlatParams,
        data: &Prepared,
        cfg: &TrainConfig,
        progress: &mut dyn nn::Progress,
    ) -> Result<(FlatParams, TrainReport), ModelError> {
        cfg.validate().map_err(ModelError::Config)?;
        Ok(match self.with_data(data)? {
            ArchData::Text(a, d) => text::train(&a, start, d, cfg, progress)?,
            ArchData::Tabular(a, d) => nn::train::<Mlp>(&a, start, d, cfg, progress)?,
            ArchData::Lora(a, d) => nn::train::<LoraNet>(&a, start, d, cfg, progress)?,
            ArchData::StandIn(a, labels) => a.train(start, labels, cfg)?,
        })
    }

    /// Trains with DP-SGD ([`crate::dp`]). `rng` must be a cryptographic RNG seeded with
    /// a secret: it draws the Poisson samples and the noise.
    pub fn train_dp(
        &self,
        start: &FlatParams,
        data: &Prepared,
        cfg: &TrainConfig,
        dp: &crate::dp::DpSgd,
        rng: &mut dyn rand::RngCore,
        progress: &mut dyn nn::Progress,
    ) -> Result<(FlatParams, TrainReport), ModelError> {
        match self.with_data(data)? {
            ArchData::Text(a, d) => crate::dp::train_text(&a, start, d, cfg, dp, rng, progress),
            ArchData::Tabular(a, d) => crate::dp::train_tabular(&a, start, d, cfg, dp, rng, progress),
            ArchData::Lora(..) => Err(NO_DP_LORA.into()),
            ArchData::StandIn(..) => Err(NO_DP_STAND_IN.into()),
        }
        .map_err(ModelError::Config)
    }

    /// A site's contribution to one round of the distributed mode ([`crate::ddp`]): the
    /// clipped-gradient sum over a Poisson sample of `data` at `start`, bounded, scaled,
    /// rounded and with this site's noise share, as words for secure aggregation.
    /// `rng` must be the site's secret RNG. Returns the words, the batch size (which
    /// stays at the site) and whether the sum was scaled down to C·B.
    pub fn distributed_contribution(
        &self,
        start: &FlatParams,
        data: &Prepared,
        dropout: f64,
        mechanism: &crate::ddp::DistributedDp,
        rng: &mut dyn rand::RngCore,
    ) -> Result<(Vec<u32>, u64, bool), ModelError> {
        mechanism.validate().map_err(ModelError::Config)?;
        let (q, clip) = (mechanism.sample_rate, mechanism.clip);
        let (mut sum, members) = match self.with_data(data)? {
            ArchData::Text(a, d) => {
                crate::dp::clipped_gradient_sum(crate::dp::ModelRef::Text(&a, d), start, dropout, q, clip, rng)
            }
            ArchData::Tabular(a, d) => {
                crate::dp::clipped_gradient_sum(crate::dp::ModelRef::Tabular(&a, d), start, dropout, q, clip, rng)
            }
            ArchData::Lora(..) => Err(NO_DP_LORA.into()),
            ArchData::StandIn(..) => Err(NO_DP_STAND_IN.into()),
        }
        .map_err(ModelError::Config)?;
        let mut words = vec![0u32; sum.len()];
        let bounded = mechanism.encode(&mut sum, rng, &mut words).map_err(ModelError::Config)?;
        Ok((words, members, bounded))
    }

    pub fn evaluate(&self, params: &FlatParams, data: &Prepared) -> Result<crate::metrics::Confusion, ModelError> {
        Ok(match self.with_data(data)? {
            ArchData::Text(a, d) => text::evaluate(&a, params, d)?,
            ArchData::Tabular(a, d) => nn::evaluate::<Mlp>(&a, params, d)?,
            ArchData::Lora(a, d) => nn::evaluate::<LoraNet>(&a, params, d)?,
            ArchData::StandIn(a, labels) => a.evaluate(params, labels)?,
        })
    }

    pub fn predict_proba(&self, params: &FlatParams, data: &Prepared) -> Result<Vec<Vec<f32>>, ModelError> {
        Ok(match self.with_data(data)? {
            ArchData::Text(a, d) => text::predict_proba(&a, params, d)?,
            ArchData::Tabular(a, d) => nn::predict_proba::<Mlp>(&a, params, d)?,
            ArchData::Lora(a, d) => nn::predict_proba::<LoraNet>(&a, params, d)?,
            ArchData::StandIn(a, labels) => a.predict_proba(params, labels.len())?,
        })
    }

    /// Saves `params` with this spec in the safetensors header.
    pub fn save(&self, path: &Path, params: &FlatParams, extra: HashMap<String, String>) -> Result<(), ModelError> {
        params.expect_layout(&self.layout())?;
        let mut meta = extra;
        // INVARIANT: the spec is plain data and always serialises.
        #[allow(clippy::unwrap_used)]
        meta.insert("maeum.model".into(), serde_json::to_string(self).unwrap());
        meta.insert("maeum.format".into(), "1".into());
        params.save_safetensors(path, meta)?;
        Ok(())
    }

    /// Loads a model file written by [`ModelSpec::save`], streamed: the parameters are
    /// read straight into their vector, with no copy of the file in memory.
    pub fn load(path: &Path) -> Result<(ModelSpec, FlatParams, HashMap<String, String>), ModelError> {
        let reader = crate::stream::Reader::open(path)?;
        let spec = Self::of_metadata(reader.metadata(), path)?;
        let (params, meta) = reader.read(&spec.layout())?;
        Ok((spec, params, meta))
    }

    /// The spec a model file's header carries under `maeum.model`.
    fn of_metadata(meta: &HashMap<String, String>, path: &Path) -> Result<ModelSpec, ModelError> {
        let spec_err = |detail: String| ModelError::Spec { path: path.display().to_string(), detail };
        let json = meta.get("maeum.model").ok_or_else(|| spec_err("no maeum.model entry in the header".into()))?;
        serde_json::from_str(json).map_err(|e| spec_err(e.to_string()))
    }

    /// Reads a model file's bytes (`path` only names it in errors).
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
    ) -> Result<(ModelSpec, FlatParams, HashMap<String, String>), ModelError> {
        let spec_err = |detail: String| ModelError::Spec { path: path.display().to_string(), detail };
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| spec_err(e.to_string()))?;
        let spec = Self::of_metadata(&meta.metadata().clone().unwrap_or_default(), path)?;
        let (params, meta) = FlatParams::from_safetensors(bytes, path, &spec.layout())?;
        Ok((spec, params, meta))
    }

    /// The model as safetensors in PyTorch's layout (docs/models.md): every linear
    /// layer's weight as `(out, in)` like `torch.nn.Linear.weight`, where Maeum keeps
    /// burn's `(in, out)`; `embedding.weight` stays `(buckets, dim)` like
    /// `torch.nn.EmbeddingBag.weight`; biases unchanged. Tensor names are Maeum's, which
    /// are already PyTorch's module-path style (`hidden.weight`, `output.bias`). The
    /// header keeps `maeum.model` and adds `maeum.layout = "torch"`; Maeum itself does not
    /// load this file (the shapes differ from the layout), and its digest is not the
    /// release's model digest. `extra` goes into the header too.
    pub fn to_torch_safetensors(
        &self,
        params: &FlatParams,
        extra: HashMap<String, String>,
    ) -> Result<Vec<u8>, ModelError> {
        params.expect_layout(&self.layout())?;
        let mut tensors = Vec::new();
        let mut values = Vec::with_capacity(params.values().len());
        for (t, v) in params.tensors() {
            match t.shape[..] {
                // LoRA's B (`rank × out` here) is PEFT's `lora_B.weight` (`out × rank`).
                [n_in, n_out] if TORCH_TRANSPOSED.contains(&t.name.as_str()) || t.name.ends_with(".lora_b") => {
                    values.extend((0..n_out).flat_map(|o| (0..n_in).map(move |i| v[i * n_out + o])));
                    tensors.push(crate::params::TensorSpec { name: t.name.clone(), shape: vec![n_out, n_in] });
                }
                _ => {
                    values.extend_from_slice(v);
                    tensors.push(t.clone());
                }
            }
        }
        let torch = FlatParams::new(Layout::new(tensors), values)?;
        let mut meta = extra;
        // INVARIANT: the spec is plain data and always serialises.
        #[allow(clippy::unwrap_used)]
        meta.insert("maeum.model".into(), serde_json::to_string(self).unwrap());
        meta.insert("maeum.format".into(), "1".into());
        meta.insert("maeum.layout".into(), "torch".into());
        torch.to_safetensors(meta).map_err(|detail| ModelError::Spec { path: "(torch export)".into(), detail })
    }
}

/// The linear layers' weights, which burn stores `(in, out)` and PyTorch `(out, in)`.
const TORCH_TRANSPOSED: [&str; 4] = ["hidden.weight", "output.weight", "head.hidden.weight", "head.output.weight"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Optimizer;

    fn tiny_spec() -> ModelSpec {
        ModelSpec::TextClassifier {
            config: TextClassifierConfig {
                features: FeatureConfig { buckets: 256, word_ngrams: [1, 1], char_ngrams: [0, 0], max_chars: 200 },
                embed_dim: 8,
                hidden: 8,
            },
            labels: LabelSet::new(vec!["calm".into(), "crisis".into()]).expect("labels"),
        }
    }

    fn tiny_examples() -> Vec<Example> {
        let mut v = Vec::new();
        for i in 0..40 {
            v.push(Example { text: format!("sunny walk park friends {i}"), label: "calm".into() });
            v.push(Example { text: format!("hopeless alone cannot go on {i}"), label: "crisis".into() });
        }
        v
    }

    #[test]
    fn the_torch_layout_transposes_linear_weights_and_computes_the_same_probabilities() {
        let spec = tiny_spec();
        let params = spec.init(3).expect("init");
        let bytes = spec.to_torch_safetensors(&params, HashMap::new()).expect("export");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let get = |name: &str| {
            let t = st.tensor(name).expect(name);
            let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (t.shape().to_vec(), v)
        };
        let (emb_shape, emb) = get("embedding.weight");
        let (h_shape, hw) = get("hidden.weight");
        let (_, hb) = get("hidden.bias");
        let (o_shape, ow) = get("output.weight");
        let (_, ob) = get("output.bias");
        assert_eq!(emb_shape, [256, 8]);
        assert_eq!(h_shape, [8, 8]);
        assert_eq!(o_shape, [2, 8], "(out = labels, in = hidden), as torch.nn.Linear");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("maeum.layout")).map(String::as_str), Some("torch"));

        // The documented forward pass, written PyTorch's way (y = W x + b), reproduces
        // predict_proba.
        let texts = ["I feel calm today", "I cannot go on"];
        let ModelSpec::TextClassifier { config, .. } = &spec else { unreachable!("a text spec") };
        let examples: Vec<Example> =
            texts.iter().map(|t| Example { text: (*t).into(), label: "calm".into() }).collect();
        let want = spec.predict_proba(&params, &spec.prepare_text(&examples).expect("prepare")).expect("predict");
        for (text, want) in texts.iter().zip(want) {
            let doc = featurize(text, &config.features);
            let mut bag = vec![0f32; 8];
            for (&id, &w) in doc.ids.iter().zip(&doc.weights) {
                bag.iter_mut().zip(&emb[id as usize * 8..][..8]).for_each(|(b, e)| *b += w * e);
            }
            let linear = |w: &[f32], b: &[f32], x: &[f32]| -> Vec<f32> {
                b.iter()
                    .enumerate()
                    .map(|(o, bo)| bo + x.iter().enumerate().map(|(i, xi)| w[o * x.len() + i] * xi).sum::<f32>())
                    .collect()
            };
            let h: Vec<f32> = linear(&hw, &hb, &bag).into_iter().map(|v| v.max(0.0)).collect();
            let logits = linear(&ow, &ob, &h);
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let z: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            for (l, p) in logits.iter().zip(&want) {
                assert!(((l - max).exp() / z - p).abs() < 1e-5, "{text}: {logits:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn flatten_unflatten_round_trip() {
        let spec = tiny_spec();
        let p = spec.init(3).expect("init");
        let Arch::Text(arch) = spec.arch() else { unreachable!("text spec") };
        let (emb, head) = arch.split(&p).expect("split");
        let net: Mlp = nn::from_flat(&arch.head(), &head, &burn::tensor::Device::flex()).expect("load");
        assert_eq!(arch.join(emb, &nn::to_flat(&net, &arch.head())), p);
    }

    #[test]
    fn the_stand_ins_inputs_print_only_their_count() {
        let shown = format!("{:?}", Prepared::Labels(LabelData(vec![7, 1, 7])));
        assert!(shown.contains("3 inputs") && !shown.contains('7'), "{shown}");
    }

    #[test]
    fn init_is_seeded() {
        let spec = tiny_spec();
        assert_eq!(spec.init(1).expect("init"), spec.init(1).expect("init"));
        assert_ne!(spec.init(1).expect("init"), spec.init(2).expect("init"));
    }

    #[test]
    fn loading_another_layout_is_refused() {
        let spec = tiny_spec();
        let p = spec.init(3).expect("init");
        let ModelSpec::TextClassifier { mut config, labels } = spec else { unreachable!() };
        config.hidden = 16;
        let other = ModelSpec::TextClassifier { config, labels };
        let err = other.evaluate(&p, &other.prepare_text(&tiny_examples()).expect("prep")).expect_err("refused");
        assert!(err.to_string().starts_with("layout mismatch"), "{err}");
    }

    #[test]
    fn training_learns_and_is_deterministic() {
        let spec = tiny_spec();
        let data = spec.prepare_text(&tiny_examples()).expect("prep");
        let cfg = TrainConfig {
            optimizer: Optimizer::Adam,
            learning_rate: 0.02,
            epochs: 5,
            batch_size: 16,
            seed: 1,
            prox_mu: 0.0,
            dropout: 0.0,
            head_only: false,
        };
        let start = spec.init(1).expect("init");
        let (a, _) = spec.train(&start, &data, &cfg, &mut ()).expect("train");
        let (b, _) = spec.train(&start, &data, &cfg, &mut ()).expect("train");
        assert_eq!(a, b, "same seed, same result");
        let before = spec.evaluate(&start, &data).expect("eval").metrics().accuracy;
        let after = spec.evaluate(&a, &data).expect("eval").metrics().accuracy;
        assert!(after > 0.95 && after > before, "before {before}, after {after}");
    }

    #[test]
    fn predictions_are_distributions_that_agree_with_evaluation() {
        let spec = tiny_spec();
        let examples = tiny_examples();
        let data = spec.prepare_text(&examples).expect("prep");
        let cfg =
            TrainConfig { learning_rate: 0.02, epochs: 3, batch_size: 16, dropout: 0.0, ..TrainConfig::default() };
        let (p, _) = spec.train(&spec.init(1).expect("init"), &data, &cfg, &mut ()).expect("train");
        let texts: Vec<String> = examples.iter().map(|e| e.text.clone()).collect();
        let probs = spec.predict_proba(&p, &spec.prepare_unlabelled(&texts).expect("prep")).expect("predict");
        assert_eq!(probs.len(), examples.len());
        let mut correct = 0;
        for (row, e) in probs.iter().zip(&examples) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
            correct += usize::from(best == spec.labels().index(&e.label));
        }
        let acc = spec.evaluate(&p, &data).expect("eval").metrics().accuracy;
        assert!((correct as f64 / examples.len() as f64 - acc).abs() < 1e-9);
    }

    #[test]
    fn data_of_another_kind_is_refused() {
        let labels = LabelSet::new(vec!["a".into(), "b".into()]).expect("labels");
        let table =
            Table { columns: vec!["q1".into()], rows: vec![vec![1.0]], labels: vec!["a".into()], skipped: Vec::new() };
        let tabular = ModelSpec::fit_tabular(&table, &[0], labels, 4);
        let text_data = tiny_spec().prepare_text(&tiny_examples()).expect("prep");
        let err = tabular.evaluate(&tabular.init(1).expect("init"), &text_data).expect_err("refused");
        assert_eq!(err.to_string(), "this is a tabular-mlp model, expected text-classifier");
    }

    fn distance(a: &FlatParams, b: &FlatParams) -> f32 {
        a.values().iter().zip(b.values()).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
    }

    #[test]
    fn fedprox_keeps_weights_closer_to_the_global_model() {
        let spec = tiny_spec();
        let data = spec.prepare_text(&tiny_examples()).expect("prep");
        let start = spec.init(1).expect("init");
        let plain = TrainConfig {
            optimizer: Optimizer::Sgd,
            learning_rate: 0.5,
            epochs: 5,
            batch_size: 16,
            seed: 1,
            prox_mu: 0.0,
            dropout: 0.0,
            head_only: false,
        };
        let prox = TrainConfig { prox_mu: 1.0, ..plain.clone() };
        let (a, _) = spec.train(&start, &data, &plain, &mut ()).expect("train");
        let (b, _) = spec.train(&start, &data, &prox, &mut ()).expect("train");
        assert!(distance(&b, &start) < distance(&a, &start), "{} vs {}", distance(&b, &start), distance(&a, &start));
    }

    /// The tensors whose bits `train` changed, from the same start and data.
    fn changed(spec: &ModelSpec, data: &Prepared, head_only: bool) -> Vec<String> {
        let start = spec.init(1).expect("init");
        let cfg = TrainConfig { learning_rate: 0.02, epochs: 2, batch_size: 16, head_only, ..TrainConfig::default() };
        let (end, _) = spec.train(&start, data, &cfg, &mut ()).expect("train");
        let differs = |a: &[f32], b: &[f32]| a.iter().zip(b).any(|(x, y)| x.to_bits() != y.to_bits());
        start
            .tensors()
            .zip(end.tensors())
            .filter(|((_, a), (_, b))| differs(a, b))
            .map(|((t, _), _)| t.name.clone())
            .collect()
    }

    #[test]
    fn head_only_trains_the_output_layer_and_leaves_the_rest_bit_identical() {
        let text = tiny_spec();
        let text_data = text.prepare_text(&tiny_examples()).expect("prep");
        let mut table = Table {
            columns: vec!["q1".into(), "q2".into()],
            rows: Vec::new(),
            labels: Vec::new(),
            skipped: Vec::new(),
        };
        for i in 0..40 {
            table.rows.push(vec![(i % 4) as f32, (i % 3) as f32]);
            table.labels.push(if i % 4 >= 2 { "high".into() } else { "low".into() });
        }
        let rows: Vec<usize> = (0..40).collect();
        let labels = LabelSet::new(vec!["low".into(), "high".into()]).expect("labels");
        let tabular = ModelSpec::fit_tabular(&table, &rows, labels, 4);
        let tabular_data = tabular.prepare_table(&table, &rows).expect("prep");
        let (head, all) =
            (["output.weight", "output.bias"], ["hidden.weight", "hidden.bias", "output.weight", "output.bias"]);
        assert_eq!(changed(&text, &text_data, true), head);
        assert_eq!(changed(&text, &text_data, false), [&["embedding.weight"][..], &all].concat());
        assert_eq!(changed(&tabular, &tabular_data, true), head);
        assert_eq!(changed(&tabular, &tabular_data, false), all);
    }

    #[test]
    fn a_header_whose_layout_overflows_is_refused_not_a_panic() {
        // A release's model header is written by the coordinator: an encoder width of
        // 2^62 makes the layout's element count overflow.
        let labels = LabelSet::new(vec!["calm".into(), "crisis".into()]).expect("labels");
        let encoder = crate::encoder::known("all-minilm-l6-v2").expect("known");
        let real = ModelSpec::EncoderHead { encoder: encoder.clone(), hidden: 4, labels: labels.clone() };
        let params = real.init(1).expect("init");
        let crafted = ModelSpec::EncoderHead {
            encoder: crate::encoder::EncoderSpec { dim: 1 << 62, ..encoder },
            hidden: 4,
            labels,
        };
        let meta = HashMap::from([("maeum.model".to_string(), serde_json::to_string(&crafted).expect("json"))]);
        let bytes = params.to_safetensors(meta).expect("bytes");
        let err = ModelSpec::from_bytes(&bytes, Path::new("crafted.safetensors")).expect_err("refused");
        assert!(err.to_string().contains("hidden.weight"), "{err}");
    }

    #[test]
    fn model_file_round_trip() {
        let spec = tiny_spec();
        let p = spec.init(5).expect("init");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        spec.save(&path, &p, HashMap::new()).expect("save");
        let (spec2, p2, _) = ModelSpec::load(&path).expect("load");
        assert_eq!(spec, spec2);
        assert_eq!(p, p2);
    }

    #[test]
    fn tabular_mlp_learns_a_threshold() {
        // PHQ-9-style: total score ≥ 10 → "moderate".
        let mut table = Table {
            columns: (1..=9).map(|i| format!("q{i}")).collect(),
            rows: Vec::new(),
            labels: Vec::new(),
            skipped: Vec::new(),
        };
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(9);
        for _ in 0..400 {
            let row: Vec<f32> = (0..9).map(|_| rand::Rng::random_range(&mut rng, 0..4) as f32).collect();
            let total: f32 = row.iter().sum();
            table.labels.push(if total >= 14.0 { "moderate".into() } else { "mild".into() });
            table.rows.push(row);
        }
        let rows: Vec<usize> = (0..400).collect();
        let labels = LabelSet::new(vec!["mild".into(), "moderate".into()]).expect("labels");
        let spec = ModelSpec::fit_tabular(&table, &rows, labels, 16);
        let data = spec.prepare_table(&table, &rows).expect("prep");
        let cfg = TrainConfig { learning_rate: 0.01, epochs: 30, ..TrainConfig::default() };
        let (p, _) = spec.train(&spec.init(1).expect("init"), &data, &cfg, &mut ()).expect("train");
        let acc = spec.evaluate(&p, &data).expect("eval").metrics().accuracy;
        assert!(acc > 0.9, "accuracy {acc}");
    }
}
