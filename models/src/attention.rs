//! Multi-head attention and its key/value cache: the one implementation every encoder–decoder
//! of the zoo is built from (the from-scratch [`crate::transformer`], Hugging Face Marian and T5).
//!
//! What differs between those architectures is a setting, not a copy: whether the projected
//! queries are scaled by `head_dim^-0.5` (T5 folds the scale into its weights), whether the
//! projections have biases (a property of the [`Lin`]s), which dropout the attention
//! weights get, and, for the decoder-only LMs, fewer key/value heads than query heads
//! (grouped-query attention), rotary positions ([`Rope`]) and per-head query/key norms (Qwen3).
//! Masks are additive: [`key_mask`] hides padded keys, [`causal_mask`] future ones.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::Module;

use crate::dropout::Dropout;
use crate::fused::{softmax_last_dim, RmsNorm};
use crate::linear::Lin;
use crate::{Error, Result};

/// Additive mask value for hidden keys: large enough that `exp` underflows to exactly 0, finite
/// so that a fully hidden row never becomes `-inf - -inf = NaN`.
pub const MASKED: f32 = -1e9;

/// The additive key mask (B, 1, 1, S) of a 0/1 attention mask (B, S): 0 where 1, [`MASKED`]
/// where 0.
pub fn key_mask(attention_mask: &Tensor) -> Result<Tensor> {
    let (b, s) = attention_mask.dims2()?;
    let m = attention_mask.to_dtype(DType::F32)?;
    Ok(((1.0 - m)? * MASKED as f64)?.reshape((b, 1, 1, s))?)
}

/// The causal mask (1, 1, T, past + T) of queries at positions `past..past+T`.
pub fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    windowed_causal_mask(t, past, None, device)
}

/// [`causal_mask`], and with a `window` each query also ignores keys `window` or more positions
/// back (Mistral's sliding window).
pub fn windowed_causal_mask(
    t: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let total = past + t;
    let seen = |i: usize, j: usize| j <= past + i && window.is_none_or(|w| past + i - j < w);
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if seen(i, j) { 0.0 } else { MASKED }))
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, t, total), device)?)
}

/// How a rotary embedding's frequencies are scaled for contexts longer than the training one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// None (`rope_type` "default").
    None,
    /// Every frequency divided by `factor` (`rope_type` "linear").
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's: low frequencies divided by `factor`, high ones kept, those between blended
    /// (`rope_type` "llama3").
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are low frequencies.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are high frequencies.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// Rotary position embedding as `transformers` applies it: each head's features are split in
/// halves, and pair `(x_i, x_{i+D/2})` is rotated by the angle `position · inv_freq_i`.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    max_positions: usize,
    /// `cos` and `sin` of the first positions' angles, (positions, head_dim), each half
    /// repeated; later positions are computed when asked for.
    cos: Tensor,
    sin: Tensor,
}

/// Positions whose angles are tabulated up front (8,192 × a 128-feature head: 8 MB of tables).
const ROPE_TABLE: usize = 8192;

impl Rope {
    /// The inverse frequencies of a `head_dim`-feature head with base `theta`, scaled as
    /// `scaling` says, computed in f32 as `transformers` computes them.
    pub fn inv_freq(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
        let base = theta as f32;
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::None => inv,
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let old = original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The embedding of positions `0..max_positions` for `inv_freq` (one per feature pair).
    pub fn new(inv_freq: &[f32], max_positions: usize, device: &Device) -> Result<Self> {
        let (cos, sin) = Self::angles(inv_freq, 0, max_positions.min(ROPE_TABLE), device)?;
        Ok(Self {
            inv_freq: inv_freq.to_vec(),
            max_positions,
            cos,
            sin,
        })
    }

    /// `cos` and `sin` (n, head_dim) of positions `start..start+n`, in f32 as transformers
    /// computes them.
    fn angles(
        inv_freq: &[f32],
        start: usize,
        n: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(n * 2 * half);
        let mut sin = Vec::with_capacity(n * 2 * half);
        for p in start..start + n {
            let angles: Vec<f32> = inv_freq.iter().map(|&f| f * p as f32).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, 2 * half), device)?,
            Tensor::from_vec(sin, (n, 2 * half), device)?,
        ))
    }

    /// The positions it covers.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `x` (B, H, T, head_dim) rotated as the tokens at positions `past..past+T`.
    pub fn apply(&self, x: &Tensor, past: usize) -> candle_core::Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        if past + t > self.max_positions {
            candle_core::bail!(
                "position {} is beyond the {} positions the model has (max_position_embeddings)",
                past + t - 1,
                self.max_positions
            );
        }
        let (cos, sin) = if past + t <= self.cos.dim(0)? {
            (self.cos.narrow(0, past, t)?, self.sin.narrow(0, past, t)?)
        } else {
            Self::angles(&self.inv_freq, past, t, x.device())?
        };
        let half = d / 2;
        let rotated = Tensor::cat(
            &[
                &x.narrow(D::Minus1, half, half)?.neg()?,
                &x.narrow(D::Minus1, 0, half)?,
            ],
            D::Minus1,
        )?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Keys and values split into heads, (B, H, S, head_dim) each.
pub type KeyValues = (Tensor, Tensor);

/// Multi-head attention: query, key, value and output projections.
#[derive(Clone, Debug)]
pub struct Attention {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    heads: usize,
    head_dim: usize,
    /// Key/value heads; each serves `heads / kv_heads` consecutive query heads.
    kv_heads: usize,
    /// Multiplies the projected queries (`None`: unscaled).
    query_scale: Option<f64>,
    /// Dropout of the attention weights.
    dropout: Dropout,
    /// Rotary positions of queries and keys.
    rope: Option<Arc<Rope>>,
    /// RMS norms of each head's queries and keys, before the rotation.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

impl Attention {
    /// The same attention over detached views of its weights (see [`Lin::frozen`]).
    pub fn frozen(&self) -> Self {
        Self {
            q: self.q.frozen(),
            k: self.k.frozen(),
            v: self.v.frozen(),
            o: self.o.frozen(),
            qk_norm: self.qk_norm.as_ref().map(|(q, k)| (q.frozen(), k.frozen())),
            ..self.clone()
        }
    }

    /// Attention over `heads` heads of `head_dim` features, queries scaled by `head_dim^-0.5`
    /// (as `transformers` does before the product), no dropout.
    pub fn new(q: Lin, k: Lin, v: Lin, o: Lin, heads: usize, head_dim: usize) -> Self {
        Self {
            q,
            k,
            v,
            o,
            heads,
            head_dim,
            kv_heads: heads,
            query_scale: Some((head_dim as f64).powf(-0.5)),
            dropout: Dropout::Off,
            rope: None,
            qk_norm: None,
        }
    }

    /// The same attention with `kv_heads` key/value heads (grouped-query attention; `heads`
    /// must be a multiple, which the configurations check).
    pub fn grouped(self, kv_heads: usize) -> Self {
        Self { kv_heads, ..self }
    }

    /// The same attention with rotary positions.
    pub fn with_rope(self, rope: Arc<Rope>) -> Self {
        Self {
            rope: Some(rope),
            ..self
        }
    }

    /// The same attention with RMS norms of each head's queries and keys (Qwen3).
    pub fn with_qk_norm(self, q_norm: RmsNorm, k_norm: RmsNorm) -> Self {
        Self {
            qk_norm: Some((q_norm, k_norm)),
            ..self
        }
    }

    /// The same attention with its projections' weights stored sparse, for inference.
    pub fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            q: self.q.to_sparse()?,
            k: self.k.to_sparse()?,
            v: self.v.to_sparse()?,
            o: self.o.to_sparse()?,
            ..self.clone()
        })
    }

    /// The same attention without query scaling (T5).
    pub fn unscaled(self) -> Self {
        Self {
            query_scale: None,
            ..self
        }
    }

    /// The same attention with `dropout` on its attention weights while training.
    pub fn with_dropout(self, dropout: Dropout) -> Self {
        Self { dropout, ..self }
    }

    /// (B, L, heads·head_dim) → (B, heads, L, head_dim).
    fn split(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Split queries or keys (`which`: 0 or 1 of the norms) normed and rotated as the tokens
    /// at positions `past..`.
    fn position(&self, x: Tensor, which: usize, past: usize) -> candle_core::Result<Tensor> {
        let x = match &self.qk_norm {
            Some(norms) => [&norms.0, &norms.1][which].forward(&x)?,
            None => x,
        };
        match &self.rope {
            Some(rope) => rope.apply(&x, past),
            None => Ok(x),
        }
    }

    /// Keys and values of `x`, split into heads.
    pub fn kv(&self, x: &Tensor) -> candle_core::Result<KeyValues> {
        self.kv_at(x, 0)
    }

    /// Keys and values of the tokens `x` at positions `past..`, split into heads.
    fn kv_at(&self, x: &Tensor, past: usize) -> candle_core::Result<KeyValues> {
        let k = self.split(&self.k.forward(x)?, self.kv_heads)?;
        Ok((
            self.position(k, 1, past)?,
            self.split(&self.v.forward(x)?, self.kv_heads)?,
        ))
    }

    /// Attends `x` (B, T, D) to split keys and values with an additive mask (or bias)
    /// broadcastable to (B, H, T, S); the attention weights get the dropout when `train`.
    pub fn attend(
        &self,
        x: &Tensor,
        kv: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        self.attend_at(x, kv, mask, train, 0)
    }

    /// [`Self::attend`] for queries at positions `past..`.
    fn attend_at(
        &self,
        x: &Tensor,
        kv: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        train: bool,
        past: usize,
    ) -> candle_core::Result<Tensor> {
        self.output(&self.context_at(x, kv, mask, train, past)?)
    }

    /// The output projection of a context (B, T, heads·head_dim): the last step of attending.
    pub fn output(&self, context: &Tensor) -> candle_core::Result<Tensor> {
        self.o.forward(context)
    }

    /// The attention context (B, T, heads·head_dim) of queries at positions `past..`, before
    /// the output projection.
    fn context_at(
        &self,
        x: &Tensor,
        (k, v): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        train: bool,
        past: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.split(&self.q.forward(x)?, self.heads)?;
        let q = self.position(q, 0, past)?;
        if !self.dropout.active(train) {
            // One fused op (its own backward); the plain ops below draw the weights' dropout.
            let scale = self.query_scale.unwrap_or(1.0);
            return crate::ops::attention(&q, k, v, mask, scale);
        }
        let q = match self.query_scale {
            Some(s) => (q * s)?,
            None => q,
        };
        // Grouped queries: the heads sharing a key/value head are consecutive, so folding them
        // into the rows of one product needs no copy of the keys and values.
        let (h, g, s) = (self.heads, self.kv_heads, k.dim(2)?);
        let rows = h / g * t;
        let scores = q
            .reshape((b, g, rows, self.head_dim))?
            .matmul(&k.t()?)?
            .reshape((b, h, t, s))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = self.dropout.apply(&softmax_last_dim(&scores)?, train)?;
        let ctx = probs
            .reshape((b, g, rows, s))?
            .matmul(v)?
            .reshape((b, h, t, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h * self.head_dim))?;
        Ok(ctx)
    }

    /// Self-attention of `x` to itself (an encoder layer).
    pub fn self_attend(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (k, v) = self.kv(x)?;
        self.attend(x, (&k, &v), mask, train)
    }

    /// Causal self-attention of the next tokens `x` to themselves and to the tokens before them,
    /// whose keys and values are in `cache`; their own are appended to it.
    pub fn self_attend_cached(
        &self,
        x: &Tensor,
        cache: &mut Option<KeyValues>,
        mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        self.output(&self.self_context_cached(x, cache, mask, train)?)
    }

    /// [`Self::self_attend_cached`] up to the context, before the output projection (for
    /// callers that look at the projection's input, as calibration does).
    pub fn self_context_cached(
        &self,
        x: &Tensor,
        cache: &mut Option<KeyValues>,
        mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let past = match cache {
            Some((pk, _)) => pk.dim(2)?,
            None => 0,
        };
        let (k, v) = self.kv_at(x, past)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        let a = self.context_at(x, (&k, &v), mask, train, past)?;
        // Outside training nothing will be differentiated: keep no graph alive through the cache.
        *cache = Some(if train {
            (k, v)
        } else {
            (k.detach(), v.detach())
        });
        Ok(a)
    }

    /// Cross-attention of `x` to the encoder output, whose keys and values are computed on the
    /// first call and kept in `cache` (later calls do not read `encoder_hidden` again).
    pub fn cross_attend_cached(
        &self,
        x: &Tensor,
        encoder_hidden: &Tensor,
        cache: &mut Option<KeyValues>,
        mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        if cache.is_none() {
            *cache = Some(self.kv(encoder_hidden)?);
        }
        let (k, v) = cache.as_ref().expect("filled above");
        self.attend(x, (k, v), mask, train)
    }
}

/// Cached keys and values of one decoder layer.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    /// Self-attention keys and values of the tokens decoded so far.
    pub self_kv: Option<KeyValues>,
    /// Cross-attention keys and values of the encoder output.
    pub cross_kv: Option<KeyValues>,
}

/// The state of incremental decoding: per decoder layer the self-attention keys/values of the
/// tokens decoded so far and the cross-attention keys/values of the encoder output (computed
/// once), and, for models that hide padded target keys, the additive mask of the decoded tokens.
#[derive(Clone, Debug)]
pub struct DecoderCache {
    layers: Vec<LayerCache>,
    pad_mask: Option<Tensor>,
    len: usize,
}

/// What a model tells its [`DecoderCache`]: how many decoder layers it has.
pub trait DecoderLayers {
    /// The number of decoder layers.
    fn decoder_layers(&self) -> usize;
}

impl DecoderCache {
    /// An empty cache for `model`.
    pub fn new<M: DecoderLayers + ?Sized>(model: &M) -> Self {
        Self {
            layers: vec![LayerCache::default(); model.decoder_layers()],
            pad_mask: None,
            len: 0,
        }
    }

    /// Target tokens decoded so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The per-layer caches of a decoder of `layers` layers, for the step that decodes `t` more
    /// tokens (counted once the step returns through [`DecoderCache::advance`]).
    pub fn layers_for(&mut self, layers: usize) -> Result<&mut [LayerCache]> {
        if self.layers.len() != layers {
            return Err(Error::Config(format!(
                "cache has {} layers, the decoder {layers}",
                self.layers.len()
            )));
        }
        Ok(&mut self.layers)
    }

    /// Counts `t` more decoded tokens.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Appends the additive padding mask (B, t) of `t` new target tokens and returns the mask
    /// of every decoded token so far, (B, len + t).
    pub fn extend_pad_mask(&mut self, pad: Tensor) -> Result<Tensor> {
        let all = match self.pad_mask.take() {
            Some(prev) => Tensor::cat(&[&prev, &pad], 1)?,
            None => pad,
        };
        self.pad_mask = Some(all.clone());
        Ok(all)
    }

    /// Keeps, for row `i` of the batch, the cached state of row `indices[i]` (a u32 vector), as
    /// beam search needs when it continues some beams and drops others.
    pub fn reorder(&mut self, indices: &Tensor) -> Result<()> {
        let pick = |kv: &mut Option<KeyValues>| -> Result<()> {
            if let Some((k, v)) = kv.take() {
                *kv = Some((k.index_select(indices, 0)?, v.index_select(indices, 0)?));
            }
            Ok(())
        };
        for layer in &mut self.layers {
            pick(&mut layer.self_kv)?;
            // The encoder rows move too, so a beam may take another sentence's row without the
            // caller having to reorder the encoder output.
            pick(&mut layer.cross_kv)?;
        }
        if let Some(m) = self.pad_mask.take() {
            self.pad_mask = Some(m.index_select(indices, 0)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_causal_mask_hides_exactly_the_future_keys() {
        let m = causal_mask(2, 1, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(v, [[0.0, 0.0, MASKED], [0.0, 0.0, 0.0]]);
    }

    #[test]
    fn rotary_angles_past_the_table_are_the_ones_the_table_would_hold() {
        let inv = Rope::inv_freq(8, 10_000.0, RopeScaling::None);
        let long = Rope::new(&inv, ROPE_TABLE + 8, &Device::Cpu).unwrap();
        let x = Tensor::rand(-1f32, 1.0, (1, 2, 4, 8), &Device::Cpu).unwrap();
        let (cos, sin) = Rope::angles(&inv, ROPE_TABLE - 2, 4, &Device::Cpu).unwrap();
        let tabled = Rope {
            inv_freq: inv.clone(),
            max_positions: ROPE_TABLE + 8,
            cos: Tensor::cat(&[&long.cos.narrow(0, 0, ROPE_TABLE - 2).unwrap(), &cos], 0).unwrap(),
            sin: Tensor::cat(&[&long.sin.narrow(0, 0, ROPE_TABLE - 2).unwrap(), &sin], 0).unwrap(),
        };
        let a = long.apply(&x, ROPE_TABLE - 2).unwrap();
        let b = tabled.apply(&x, ROPE_TABLE - 2).unwrap();
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0);
        assert!(long.apply(&x, ROPE_TABLE + 5).is_err());
    }

    #[test]
    fn the_key_mask_hides_padding() {
        let mask = Tensor::new(&[[1u32, 0]], &Device::Cpu).unwrap();
        let v: Vec<f32> = key_mask(&mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, [0.0, MASKED]);
    }
}
