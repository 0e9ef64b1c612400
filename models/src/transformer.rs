//! What the frozen encoder and the adapted layers share: a transformer layer's weights as
//! plain arrays, an encoder's top layers, and the sentence pooling. [`crate::encoder`]
//! produces them and [`crate::lora`] trains on them; neither depends on the other.

use burn::tensor::Tensor;

/// Masked mean over each text's tokens, L2-normalised: `b × h` from `b·len × h` states
/// and a `b × len` mask.
pub fn pool(x: Tensor<2>, mask2: Tensor<2>, b: usize, len: usize, h: usize) -> Tensor<2> {
    let mask3 = mask2.clone().reshape([b, len, 1]);
    let summed = (x.reshape([b, len, h]) * mask3).sum_dim(1).reshape([b, h]);
    let counts = mask2.sum_dim(1).clamp_min(1.0);
    let mean = summed / counts;
    let norm = mean.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    mean / norm
}

/// A linear layer's weight (`in × out`, row-major) and bias.
pub type LinearWeights = (Vec<f32>, Vec<f32>);

/// One transformer layer's weights as plain arrays (see [`crate::encoder::Encoder::top_layers`]).
#[derive(Clone)]
pub struct LayerWeights {
    /// Query, key and value side by side: `h × 3h` and `3h`.
    pub qkv: LinearWeights,
    pub attn_out: LinearWeights,
    /// LayerNorm gamma and beta.
    pub attn_norm: (Vec<f32>, Vec<f32>),
    pub inter: LinearWeights,
    pub out: LinearWeights,
    pub out_norm: (Vec<f32>, Vec<f32>),
}

/// The top layers of an encoder (bottom first) and the shape they share.
#[derive(Clone)]
pub struct TopLayers {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub eps: f64,
    /// The index of the first of these layers in the encoder.
    pub first: usize,
    pub layers: Vec<LayerWeights>,
}

impl std::fmt::Debug for LayerWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerWeights {{ {} × {} }}", self.attn_out.1.len(), self.inter.1.len())
    }
}

impl std::fmt::Debug for TopLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TopLayers {{ layers {}.., {} × {} }}", self.first, self.layers.len(), self.hidden)
    }
}
