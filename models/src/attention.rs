//! Multi-head attention and its key/value cache: the one implementation every encoder–decoder
//! of the zoo is built from (the from-scratch [`crate::transformer`], Hugging Face Marian and T5).
//!
//! What differs between those architectures is a setting, not a copy: whether the projected
//! queries are scaled by `head_dim^-0.5` (T5 folds the scale into its weights), whether the
//! projections have biases (a property of the [`Lin`]s), and which dropout the attention
//! weights get. Masks are additive: [`key_mask`] hides padded keys, [`causal_mask`] future ones.

use candle_core::{DType, Device, Tensor};
use candle_nn::Module;

use crate::dropout::Dropout;
use crate::fused::softmax_last_dim;
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
    let total = past + t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { MASKED }))
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, t, total), device)?)
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
    /// Multiplies the projected queries (`None`: unscaled).
    query_scale: Option<f64>,
    /// Dropout of the attention weights.
    dropout: Dropout,
}

impl Attention {
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
            query_scale: Some((head_dim as f64).powf(-0.5)),
            dropout: Dropout::Off,
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

    /// (B, L, H·head_dim) → (B, H, L, head_dim).
    fn split(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Keys and values of `x`, split into heads.
    pub fn kv(&self, x: &Tensor) -> candle_core::Result<KeyValues> {
        Ok((
            self.split(&self.k.forward(x)?)?,
            self.split(&self.v.forward(x)?)?,
        ))
    }

    /// Attends `x` (B, T, D) to split keys and values with an additive mask (or bias)
    /// broadcastable to (B, H, T, S); the attention weights get the dropout when `train`.
    pub fn attend(
        &self,
        x: &Tensor,
        (k, v): (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.q.forward(x)?;
        let q = match self.query_scale {
            Some(s) => self.split(&(q * s)?)?,
            None => self.split(&q)?,
        };
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = self.dropout.apply(&softmax_last_dim(&scores)?, train)?;
        let ctx = probs.matmul(v)?.transpose(1, 2)?.contiguous()?.reshape((
            b,
            t,
            self.heads * self.head_dim,
        ))?;
        self.o.forward(&ctx)
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
        let (k, v) = self.kv(x)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        let a = self.attend(x, (&k, &v), mask, train)?;
        *cache = Some((k, v));
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
