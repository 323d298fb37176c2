//! What decoding and training ask of an encoder–decoder: [`Seq2Seq`]. Models built on this
//! crate's attention implement the smaller [`EncoderDecoder`] and get [`Seq2Seq`] from it, with
//! the shared [`DecoderCache`]; a model with a cache of its own implements [`Seq2Seq`] directly.

use candle_core::Tensor;

use crate::attention::{DecoderCache, DecoderLayers};
use crate::{Error, Result};

/// The special token ids decoding needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Padding, written after a sentence's EOS.
    pub pad: u32,
    /// End of sentence.
    pub eos: u32,
    /// The first decoder input.
    pub decoder_start: u32,
}

impl SpecialTokens {
    /// The ids, in the order `transformers`' configs name them: pad, EOS, decoder start.
    pub fn new(pad: u32, eos: u32, decoder_start: u32) -> Self {
        Self {
            pad,
            eos,
            decoder_start,
        }
    }
}

/// An encoder–decoder model that can be decoded step by step with a cache.
pub trait Seq2Seq {
    /// The incremental-decoding state (keys and values of the tokens decoded so far).
    type Cache;

    /// The encoder output (B, S, D) of `input_ids` (B, S) with a 0/1 `attention_mask` (B, S).
    fn encode(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;

    /// A fresh cache, before the first decoder step.
    fn new_cache(&self) -> Self::Cache;

    /// The logits (B, V) of the token after `ids` (B, 1), which extends `cache`; every call of one
    /// decoding passes the same encoder output and source mask.
    fn decode_step(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut Self::Cache,
    ) -> Result<Tensor>;

    /// Makes row `i` of the cache the former row `indices[i]` (`indices` a u32 vector).
    fn reorder_cache(&self, cache: &mut Self::Cache, indices: &Tensor) -> Result<()>;

    /// The model's pad, EOS and decoder start ids.
    fn special_tokens(&self) -> SpecialTokens;

    /// Restarts the model's dropout masks at `stream` (a trainer passes the epoch), where its
    /// dropout is seeded; a model with unseeded or no dropout ignores it.
    fn seed_dropout(&self, _stream: u64) {}

    /// Teacher-forced logits (B, T, V) of `decoder_input_ids` (B, T) for `input_ids` (B, S) with
    /// a 0/1 `attention_mask` (B, S): the training forward pass, differentiable in every weight;
    /// `train` switches on the model's dropout (where it has any).
    fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        decoder_input_ids: &Tensor,
        train: bool,
    ) -> Result<Tensor>;
}

/// An encoder–decoder decoded with the shared [`DecoderCache`]: the four things an
/// architecture defines; [`Seq2Seq`] follows.
pub trait EncoderDecoder: DecoderLayers {
    /// The encoder output (B, S, D) of `input_ids` (B, S) with a 0/1 `attention_mask` (B, S),
    /// with the model's dropout when `train`.
    fn encode_t(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor>;

    /// Logits (B, t, V) of the next `t` target tokens `ids` (B, t) after those in `cache`,
    /// which is extended with their keys and values; dropout only when `train`. The
    /// cross-attention keys/values are computed from `encoder_hidden` on the first call and
    /// reused after, so later calls must pass the same encoder output.
    fn decode_t(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
        train: bool,
    ) -> Result<Tensor>;

    /// The model's pad, EOS and decoder start ids.
    fn special_ids(&self) -> SpecialTokens;

    /// Restarts seeded dropout masks at `stream` (see [`Seq2Seq::seed_dropout`]).
    fn reseed_dropout(&self, _stream: u64) {}
}

impl<M: EncoderDecoder> Seq2Seq for M {
    type Cache = DecoderCache;

    fn encode(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.encode_t(input_ids, attention_mask, false)
    }

    fn new_cache(&self) -> DecoderCache {
        DecoderCache::new(self)
    }

    fn decode_step(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
    ) -> Result<Tensor> {
        let logits = self.decode_t(ids, encoder_hidden, src_mask, cache, false)?;
        let t = logits.dim(1)?;
        Ok(logits.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    fn reorder_cache(&self, cache: &mut DecoderCache, indices: &Tensor) -> Result<()> {
        cache.reorder(indices)
    }

    fn special_tokens(&self) -> SpecialTokens {
        self.special_ids()
    }

    fn seed_dropout(&self, stream: u64) {
        self.reseed_dropout(stream)
    }

    fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        decoder_input_ids: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (bs, _) = input_ids.dims2()?;
        let (bt, _) = decoder_input_ids.dims2()?;
        if bs != bt {
            return Err(Error::Config(format!(
                "source batch {bs} differs from target batch {bt}"
            )));
        }
        let enc = self.encode_t(input_ids, attention_mask, train)?;
        let mut cache = DecoderCache::new(self);
        self.decode_t(decoder_input_ids, &enc, attention_mask, &mut cache, train)
    }
}
