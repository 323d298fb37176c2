//! Length-bucketed, token-budgeted batches of tokenized (source, target) pairs.
//!
//! Each epoch: the pairs are shuffled with the epoch's RNG, stably sorted by length (so pairs of
//! equal length come in a new order every epoch but long and short pairs never share a batch),
//! cut greedily into batches of at most [`BatchConfig::max_tokens`] tokens *counting padding*,
//! and the batches are shuffled. A batch of `n` pairs whose longest source has `S` tokens and
//! longest target `T` tokens satisfies `n × max(S, T) ≤ max_tokens`, so neither the encoder's
//! `(n, S)` input nor the decoder's `(n, T)` input exceeds the budget.
//!
//! The RNG of epoch `e` is seeded from `(seed, e)` alone: epoch `e`'s batches are the same in
//! every run and after a resume, without replaying earlier epochs (for a given `rand` 0.9).

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::text::parallel::TextPair;
use crate::text::tokenizer::TextTokenizer;

/// Spreads epoch numbers over the seed space (the golden-ratio constant of SplitMix64).
const EPOCH_STRIDE: u64 = 0x9E37_79B9_7F4A_7C15;

/// The token ids of one (source, target) pair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizedPair {
    /// Source ids, special tokens included.
    pub source: Vec<u32>,
    /// Target ids, special tokens included.
    pub target: Vec<u32>,
}

impl TokenizedPair {
    /// The longer side's length, which is what the pair costs in a padded batch.
    pub fn max_len(&self) -> usize {
        self.source.len().max(self.target.len())
    }
}

/// Encodes every pair, sources with `source` and targets with `target` (pass the same tokenizer
/// twice for a shared vocabulary); errors name the pair's position.
pub fn tokenize_pairs(
    pairs: &[TextPair],
    source: &TextTokenizer,
    target: &TextTokenizer,
) -> Result<Vec<TokenizedPair>> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let with_index = |e: Error| Error::Invalid(format!("pair {i}: {e}"));
            Ok(TokenizedPair {
                source: source.encode(&p.source).map_err(with_index)?,
                target: target.encode(&p.target).map_err(with_index)?,
            })
        })
        .collect()
}

/// What to do with a pair that is longer than [`BatchConfig::max_tokens`] on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Oversize {
    /// Fail when the batcher is built, naming the pair and its lengths (the default: a budget
    /// is usually a memory limit, and going over it should be a decision).
    #[default]
    Error,
    /// Leave the pair out; [`TokenBatcher::skipped_oversize`] lists it.
    Skip,
    /// Put the pair alone in a batch that exceeds the budget.
    OwnBatch,
}

/// How pairs are grouped into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Token budget of a batch, padding included: `batch size × longest side ≤ max_tokens`.
    pub max_tokens: usize,
    /// An optional cap on the number of pairs in a batch, whatever their length.
    pub max_batch_size: Option<usize>,
    /// Pairs longer than `max_tokens` alone.
    pub oversize: Oversize,
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_tokens: 4096,
            max_batch_size: None,
            oversize: Oversize::Error,
            seed: 0,
        }
    }
}

/// Tokenized pairs with a batching configuration; gives each epoch's batches.
#[derive(Clone, Debug)]
pub struct TokenBatcher {
    pairs: Vec<TokenizedPair>,
    pad_id: u32,
    config: BatchConfig,
    /// Indices of the pairs that take part in batches.
    kept: Vec<usize>,
    skipped: Vec<usize>,
}

impl TokenBatcher {
    /// Checks the configuration and the pairs, applying [`BatchConfig::oversize`].
    ///
    /// A pair with an empty source or target is an error: attention over zero positions has no
    /// defined result (a softmax over nothing), so such a pair cannot be trained on.
    pub fn new(pairs: Vec<TokenizedPair>, pad_id: u32, config: BatchConfig) -> Result<Self> {
        if config.max_tokens == 0 {
            return Err(Error::Invalid(
                "batching: max_tokens must be positive".into(),
            ));
        }
        if config.max_batch_size == Some(0) {
            return Err(Error::Invalid(
                "batching: max_batch_size must be positive when given".into(),
            ));
        }
        let mut kept = Vec::with_capacity(pairs.len());
        let mut skipped = Vec::new();
        for (i, p) in pairs.iter().enumerate() {
            if p.source.is_empty() || p.target.is_empty() {
                return Err(Error::Invalid(format!(
                    "batching: pair {i} has {} source and {} target ids; both sides need at least one",
                    p.source.len(),
                    p.target.len()
                )));
            }
            if p.max_len() > config.max_tokens {
                match config.oversize {
                    Oversize::Error => {
                        return Err(Error::Invalid(format!(
                            "batching: pair {i} has {} source and {} target ids, more than \
                             max_tokens = {} on its own (raise max_tokens, or choose \
                             Oversize::Skip or Oversize::OwnBatch)",
                            p.source.len(),
                            p.target.len(),
                            config.max_tokens
                        )))
                    }
                    Oversize::Skip => {
                        skipped.push(i);
                        continue;
                    }
                    Oversize::OwnBatch => {}
                }
            }
            kept.push(i);
        }
        if kept.is_empty() {
            return Err(Error::Invalid(format!(
                "batching: no pairs to batch ({} given, {} skipped as longer than max_tokens = {})",
                pairs.len(),
                skipped.len(),
                config.max_tokens
            )));
        }
        Ok(Self {
            pairs,
            pad_id,
            config,
            kept,
            skipped,
        })
    }

    /// All pairs, including skipped ones; batch indices point into this.
    pub fn pairs(&self) -> &[TokenizedPair] {
        &self.pairs
    }

    /// The configuration.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Indices of the pairs left out by [`Oversize::Skip`].
    pub fn skipped_oversize(&self) -> &[usize] {
        &self.skipped
    }

    /// Pair indices of each batch: `Some(epoch)` shuffled for that epoch, `None` in length
    /// order without any shuffling (for evaluation).
    pub fn plan(&self, epoch: Option<u64>) -> Vec<Vec<usize>> {
        let mut rng = epoch.map(|e| {
            StdRng::seed_from_u64(self.config.seed.wrapping_add(e.wrapping_mul(EPOCH_STRIDE)))
        });
        let mut order = self.kept.clone();
        if let Some(rng) = rng.as_mut() {
            order.shuffle(rng);
        }
        // Stable: pairs of equal lengths keep the shuffled order, so batch contents vary by epoch.
        order.sort_by_key(|&i| {
            let p = &self.pairs[i];
            (p.max_len(), p.source.len(), p.target.len())
        });
        let cap = self.config.max_batch_size.unwrap_or(usize::MAX);
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        let mut longest = 0;
        for i in order {
            let len = self.pairs[i].max_len();
            let grown = longest.max(len);
            let fits = (current.len() + 1)
                .checked_mul(grown)
                .is_some_and(|t| t <= self.config.max_tokens);
            // An empty batch takes any pair: that is how Oversize::OwnBatch pairs get one.
            if !current.is_empty() && (!fits || current.len() == cap) {
                batches.push(std::mem::take(&mut current));
                longest = 0;
            }
            longest = longest.max(len);
            current.push(i);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        if let Some(rng) = rng.as_mut() {
            batches.shuffle(rng);
        }
        batches
    }

    /// The padded batches of `epoch`, in the epoch's order.
    pub fn epoch(&self, epoch: u64) -> Vec<TextBatch> {
        self.batches_of(self.plan(Some(epoch)))
    }

    /// The padded batches in length order, unshuffled (for evaluation).
    pub fn in_order(&self) -> Vec<TextBatch> {
        self.batches_of(self.plan(None))
    }

    /// One padded batch of the given pairs (any indices into [`TokenBatcher::pairs`], repeats allowed).
    pub fn batch(&self, indices: &[usize]) -> Result<TextBatch> {
        if indices.is_empty() {
            return Err(Error::Invalid(
                "batching: a batch needs at least one pair".into(),
            ));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.pairs.len()) {
            return Err(Error::Invalid(format!(
                "batching: pair index {bad} is out of range for {} pairs",
                self.pairs.len()
            )));
        }
        Ok(self.pad(indices.to_vec()))
    }

    fn batches_of(&self, plan: Vec<Vec<usize>>) -> Vec<TextBatch> {
        plan.into_iter().map(|b| self.pad(b)).collect()
    }

    /// Pads the pairs at `indices` (valid and non-empty) to the longest of each side.
    fn pad(&self, indices: Vec<usize>) -> TextBatch {
        let pairs: Vec<&TokenizedPair> = indices.iter().map(|&i| &self.pairs[i]).collect();
        let (source_ids, source_mask, source_len) =
            pad_side(pairs.iter().map(|p| p.source.as_slice()), self.pad_id);
        let (target_ids, target_mask, target_len) =
            pad_side(pairs.iter().map(|p| p.target.as_slice()), self.pad_id);
        TextBatch {
            indices,
            source_len,
            target_len,
            source_ids,
            source_mask,
            target_ids,
            target_mask,
            pad_id: self.pad_id,
        }
    }
}

/// Right-pads each row to the longest: (ids, mask, length), both row-major.
fn pad_side<'a>(
    rows: impl Iterator<Item = &'a [u32]> + Clone,
    pad_id: u32,
) -> (Vec<u32>, Vec<u8>, usize) {
    let len = rows.clone().map(<[u32]>::len).max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for row in rows {
        ids.extend_from_slice(row);
        ids.resize(ids.len() + len - row.len(), pad_id);
        mask.resize(mask.len() + row.len(), 1);
        mask.resize(mask.len() + len - row.len(), 0);
    }
    (ids, mask, len)
}

/// A padded batch as plain row-major vectors: row `r` is pair `indices[r]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextBatch {
    /// Which pairs (indices into [`TokenBatcher::pairs`]) the rows are.
    pub indices: Vec<usize>,
    /// Columns of the source matrices: the longest source in the batch.
    pub source_len: usize,
    /// Columns of the target matrices: the longest target in the batch.
    pub target_len: usize,
    /// Source ids, `len() × source_len`, right-padded with `pad_id`.
    pub source_ids: Vec<u32>,
    /// 1 where `source_ids` holds a token, 0 where it holds padding.
    pub source_mask: Vec<u8>,
    /// Target ids, `len() × target_len`, right-padded with `pad_id`.
    pub target_ids: Vec<u32>,
    /// 1 where `target_ids` holds a token, 0 where it holds padding.
    pub target_mask: Vec<u8>,
    /// The id used for padding.
    pub pad_id: u32,
}

impl TextBatch {
    /// Number of pairs (rows).
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// What the batch costs against the budget: rows × the longer of the two padded lengths.
    pub fn padded_tokens(&self) -> usize {
        self.len() * self.source_len.max(self.target_len)
    }

    /// Teacher-forcing decoder inputs: each target row shifted right by one, starting with
    /// `start_id` (Marian: the pad id, T5: 0); the target row's last column falls off, as in
    /// Hugging Face's `shift_tokens_right`. Same shape as `target_ids`.
    pub fn decoder_inputs(&self, start_id: u32) -> Vec<u32> {
        let t = self.target_len;
        let mut out = Vec::with_capacity(self.target_ids.len());
        for row in self.target_ids.chunks(t.max(1)).take(self.len()) {
            out.push(start_id);
            out.extend_from_slice(&row[..t.saturating_sub(1)]);
        }
        out
    }

    /// The batch as candle tensors on `device`: ids as u32, masks as u8 (usable directly with
    /// `where_cond`, or `to_dtype` for additive masks).
    pub fn to_tensors(&self, device: &Device) -> Result<BatchTensors> {
        let n = self.len();
        let (s, t) = (self.source_len, self.target_len);
        Ok(BatchTensors {
            source_ids: Tensor::from_slice(&self.source_ids, (n, s), device)?,
            source_mask: Tensor::from_slice(&self.source_mask, (n, s), device)?,
            target_ids: Tensor::from_slice(&self.target_ids, (n, t), device)?,
            target_mask: Tensor::from_slice(&self.target_mask, (n, t), device)?,
        })
    }
}

/// Cuts `ids` to at most `max_len` tokens keeping the last one (the closing `</s>` or `[SEP]`),
/// as a tokenizer's own truncation does; `max_len` 0 leaves them whole.
pub fn truncate_keeping_last(mut ids: Vec<u32>, max_len: usize) -> Vec<u32> {
    if ids.len() > max_len && max_len > 0 {
        let last = ids[ids.len() - 1];
        ids.truncate(max_len - 1);
        ids.push(last);
    }
    ids
}

/// Rows of token ids padded with `pad` to the longest one (at least 1 position), as `(ids,
/// mask)` tensors (B, T) on `device`: u32 ids, u32 mask with 1 at tokens and 0 at padding.
pub fn pad_rows<R: AsRef<[u32]>>(
    rows: &[R],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let t = rows
        .iter()
        .map(|r| r.as_ref().len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len() * t);
    for row in rows {
        let row = row.as_ref();
        ids.extend(row.iter().copied().chain(std::iter::repeat(pad)).take(t));
        mask.extend((0..t).map(|j| u32::from(j < row.len())));
    }
    Ok((
        Tensor::from_vec(ids, (rows.len(), t), device)?,
        Tensor::from_vec(mask, (rows.len(), t), device)?,
    ))
}

/// A [`TextBatch`] as tensors.
#[derive(Clone, Debug)]
pub struct BatchTensors {
    /// (batch, source_len) u32.
    pub source_ids: Tensor,
    /// (batch, source_len) u8, 1 for tokens.
    pub source_mask: Tensor,
    /// (batch, target_len) u32.
    pub target_ids: Tensor,
    /// (batch, target_len) u8, 1 for tokens.
    pub target_mask: Tensor,
}
