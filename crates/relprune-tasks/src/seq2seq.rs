//! Sequence-to-sequence learning (translation, dialogue) as a pruning [`Task`]: label-smoothed
//! cross-entropy to train, corpus BLEU of decoded sentences to judge.
//!
//! The task works with any [`Seq2Seq`] model (the from-scratch `Transformer`, Hugging Face Marian
//! and T5). Training batches come from a [`TokenBatcher`] (length-bucketed, token-budgeted,
//! shuffled per epoch from `(seed, epoch)`, so a resumed run sees the same batches). Evaluation
//! reports the plain token cross-entropy (no label smoothing: it is the quantity the threshold
//! search compares against its bound) and BLEU (sacreBLEU's `13a`/`exp` by default) of greedy or
//! beam-search translations, detokenized with the target tokenizer, against the raw reference
//! lines.

use candle_core::{Device, Tensor};
use relprune_data::text::{
    pad_rows, BatchConfig, TextBatch, TextTokenizer, TokenBatcher, TokenizedPair,
};
use relprune_eval::{corpus_bleu, BleuConfig, BleuScore};
use relprune_models::hf::generate::{generate, GenerateConfig};
use relprune_models::Seq2Seq;
use relprune_prune::{Evaluation, MetricSpec, Split, Task};

use crate::loss::label_smoothed_cross_entropy;
use crate::{Error, Result};

/// The metric name sequence-to-sequence tasks report.
pub const BLEU: &str = "bleu";

/// How translations are produced for the metric.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecodeConfig {
    /// 1: greedy; more: beam search with this many beams.
    pub beam_size: usize,
    /// Beam search's length penalty (score / length^penalty).
    pub length_penalty: f64,
    /// The longest output is `max_len_a · source length + max_len_b` tokens (fairseq's rule).
    pub max_len_a: f64,
    /// See `max_len_a`.
    pub max_len_b: usize,
    /// Sentences decoded together.
    pub batch_size: usize,
}

impl DecodeConfig {
    /// The longest output for a source of `source_len` tokens.
    pub fn limit(&self, source_len: usize) -> usize {
        (self.max_len_a * source_len as f64).ceil() as usize + self.max_len_b
    }
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            beam_size: 1,
            length_penalty: 1.0,
            max_len_a: 1.5,
            max_len_b: 10,
            batch_size: 64,
        }
    }
}

/// Options of a [`Seq2SeqTask`].
#[derive(Clone, Debug, PartialEq)]
pub struct Seq2SeqConfig {
    /// Training batches: token budget, batch-size cap, oversize rule, shuffle seed.
    pub batch: BatchConfig,
    /// Token budget of evaluation batches (teacher-forced loss).
    pub eval_max_tokens: usize,
    /// Label smoothing ε of the training loss.
    pub label_smoothing: f64,
    /// Decoding for the BLEU metric.
    pub decode: DecodeConfig,
    /// The BLEU options (default sacreBLEU's: `13a`, `exp`, case-sensitive).
    pub bleu: BleuConfig,
}

impl Default for Seq2SeqConfig {
    fn default() -> Self {
        Self {
            batch: BatchConfig::default(),
            eval_max_tokens: 8192,
            label_smoothing: 0.1,
            decode: DecodeConfig::default(),
            bleu: BleuConfig::default(),
        }
    }
}

/// A held-out split: tokenized pairs and the raw reference lines BLEU compares against.
#[derive(Clone, Debug)]
pub struct EvalSplit {
    /// Tokenized (source, target) pairs.
    pub pairs: Vec<TokenizedPair>,
    /// The reference translation of each pair, as text.
    pub references: Vec<String>,
}

impl EvalSplit {
    /// A split from pairs and their references; errors if the counts differ or it is empty.
    pub fn new(pairs: Vec<TokenizedPair>, references: Vec<String>) -> Result<Self> {
        if pairs.is_empty() {
            return Err(Error::Invalid("evaluation split is empty".into()));
        }
        if pairs.len() != references.len() {
            return Err(Error::Invalid(format!(
                "{} evaluation pairs but {} references",
                pairs.len(),
                references.len()
            )));
        }
        Ok(Self { pairs, references })
    }
}

/// A sequence-to-sequence model with its training pairs, validation and test splits.
pub struct Seq2SeqTask<M: Seq2Seq> {
    /// The model.
    pub model: M,
    /// The target-side tokenizer, to turn decoded ids back into text.
    pub target_tokenizer: TextTokenizer,
    config: Seq2SeqConfig,
    train: TokenBatcher,
    valid: EvalSplit,
    test: EvalSplit,
    device: Device,
    batches: Vec<TextBatch>,
}

fn task_err(e: impl std::fmt::Display) -> relprune_prune::Error {
    relprune_prune::Error::Task(e.to_string())
}

impl<M: Seq2Seq> Seq2SeqTask<M> {
    /// The current epoch's training batches, in order (empty before [`Task::begin_epoch`]).
    pub fn epoch_batches(&self) -> &[TextBatch] {
        &self.batches
    }

    /// A task training on `train` and judging on `valid` (and, for reports, `test`).
    pub fn new(
        model: M,
        target_tokenizer: TextTokenizer,
        train: Vec<TokenizedPair>,
        valid: EvalSplit,
        test: EvalSplit,
        config: Seq2SeqConfig,
        device: &Device,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&config.label_smoothing) {
            return Err(Error::Invalid(format!(
                "label smoothing must be in [0, 1), got {}",
                config.label_smoothing
            )));
        }
        if config.decode.beam_size == 0 || config.decode.batch_size == 0 {
            return Err(Error::Invalid(
                "decoding needs a beam size and a batch size of at least 1".into(),
            ));
        }
        if config.eval_max_tokens == 0 {
            return Err(Error::Invalid("eval_max_tokens must be positive".into()));
        }
        if train.is_empty() {
            return Err(Error::Invalid("no training pairs".into()));
        }
        let pad = model.special_tokens().pad;
        let train = TokenBatcher::new(train, pad, config.batch)?;
        Ok(Self {
            model,
            target_tokenizer,
            config,
            train,
            valid,
            test,
            device: device.clone(),
            batches: Vec::new(),
        })
    }

    /// The options.
    pub fn config(&self) -> &Seq2SeqConfig {
        &self.config
    }

    /// The decoding options used for the metric (e.g. a wider beam for the final test score).
    pub fn set_decode(&mut self, decode: DecodeConfig) {
        self.config.decode = decode;
    }

    /// The held-out split `split`.
    pub fn split(&self, split: Split) -> &EvalSplit {
        match split {
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }

    /// Teacher-forced logits and targets of a batch: the decoder reads the start token and the
    /// target shifted right, and predicts every target token (EOS included).
    fn logits_and_targets(
        &self,
        batch: &TextBatch,
        train: bool,
    ) -> relprune_prune::Result<(Tensor, Tensor)> {
        let special = self.model.special_tokens();
        let t = batch.to_tensors(&self.device).map_err(task_err)?;
        let dec_in = Tensor::from_vec(
            batch.decoder_inputs(special.decoder_start),
            (batch.len(), batch.target_len),
            &self.device,
        )?;
        let logits = self
            .model
            .forward_t(&t.source_ids, &t.source_mask, &dec_in, train)
            .map_err(task_err)?;
        Ok((logits, t.target_ids))
    }

    /// Mean per-token cross-entropy (no smoothing) of `split`, teacher-forced.
    fn split_loss(&self, split: &EvalSplit) -> relprune_prune::Result<f64> {
        let pad = self.model.special_tokens().pad;
        let config = BatchConfig {
            max_tokens: self.config.eval_max_tokens,
            oversize: relprune_data::text::Oversize::OwnBatch,
            ..BatchConfig::default()
        };
        let batcher = TokenBatcher::new(split.pairs.clone(), pad, config).map_err(task_err)?;
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        for batch in batcher.in_order() {
            let (logits, targets) = self.logits_and_targets(&batch, false)?;
            let n = batch.target_mask.iter().filter(|&&m| m == 1).count();
            let l = label_smoothed_cross_entropy(&logits, &targets, 0.0, Some(pad))
                .map_err(task_err)?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            sum += l * n as f64;
            tokens += n;
        }
        if tokens == 0 {
            return Err(task_err("evaluation split has no target tokens"));
        }
        Ok(sum / tokens as f64)
    }

    /// The model's translations of every source of `split`, as text, in order.
    pub fn translate(&self, split: Split) -> relprune_prune::Result<Vec<String>> {
        let sources: Vec<&[u32]> = self
            .split(split)
            .pairs
            .iter()
            .map(|p| p.source.as_slice())
            .collect();
        let hyps = decode_all(
            &self.model,
            &sources,
            &Decoding::for_bleu(&self.config.decode, self.model.special_tokens()),
            |_| {},
        )?;
        hyps.iter()
            .map(|ids| self.target_tokenizer.decode(ids, true).map_err(task_err))
            .collect()
    }

    /// Corpus BLEU of the model's translations of `split`, and the translations.
    pub fn bleu(&self, split: Split) -> relprune_prune::Result<(BleuScore, Vec<String>)> {
        let hyps = self.translate(split)?;
        let refs = [&self.split(split).references];
        let score = corpus_bleu(&hyps, &refs[..], &self.config.bleu).map_err(task_err)?;
        Ok((score, hyps))
    }
}

impl<M: Seq2Seq> Task for Seq2SeqTask<M> {
    fn metric(&self) -> MetricSpec {
        MetricSpec {
            name: BLEU.into(),
            higher_is_better: true,
        }
    }

    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        // The trainer counts epochs across phases and resumes: each gets its own masks.
        self.model.seed_dropout(epoch as u64);
        self.batches = self.train.epoch(epoch as u64);
        Ok(self.batches.len())
    }

    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        let batch = self.batches.get(index).ok_or_else(|| {
            task_err(format!(
                "batch {index} is past the end of the epoch ({} batches; begin_epoch first)",
                self.batches.len()
            ))
        })?;
        let (logits, targets) = self.logits_and_targets(batch, true)?;
        let pad = self.model.special_tokens().pad;
        label_smoothed_cross_entropy(&logits, &targets, self.config.label_smoothing, Some(pad))
            .map_err(task_err)
    }

    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        let loss = self.split_loss(self.split(split))?;
        let (score, _) = self.bleu(split)?;
        Ok(Evaluation {
            loss,
            metric: score.score,
        })
    }

    /// Batches depend only on `(seed, epoch)`, so there is nothing to replay.
    fn skip_epochs(&mut self, _epochs: usize) -> relprune_prune::Result<()> {
        Ok(())
    }
}

/// How [`decode_all`] decodes: the settings of each batch and each sentence's own length limit.
pub struct Decoding<'a> {
    /// Sentences decoded together.
    pub batch_size: usize,
    /// Whether batches are formed in order of source length (less padding) rather than in
    /// input order; results come back in input order either way.
    pub sort_by_length: bool,
    /// The settings of a batch whose longest source has the given length.
    pub config: Box<dyn Fn(usize) -> GenerateConfig + 'a>,
    /// The most tokens a source of the given length may produce: its output is cut there after
    /// decoding, so the batch it lands in never changes it (greedy decoding is prefix-stable).
    pub limit: Box<dyn Fn(usize) -> usize + 'a>,
}

impl Decoding<'_> {
    /// The decoding of a task's metric: fairseq's length rule (`a·S + b` per sentence), greedy
    /// or beam search as `decode` says, batches sorted by length.
    pub fn for_bleu(decode: &DecodeConfig, special: relprune_models::SpecialTokens) -> Self {
        let d = *decode;
        Self {
            batch_size: d.batch_size,
            sort_by_length: true,
            config: Box::new(move |s| GenerateConfig {
                beam_size: d.beam_size,
                length_penalty: d.length_penalty,
                ..GenerateConfig::new(special, d.limit(s))
            }),
            limit: Box::new(move |len| d.limit(len)),
        }
    }
}

/// Decodes every source (token ids) with `model` as `how` says and returns each one's generated
/// tokens (without the decoder start token, EOS included), in input order; `progress` is told
/// how many sentences each finished batch held. Errors name the sentences of the failing batch.
pub fn decode_all<M: Seq2Seq, S: AsRef<[u32]>>(
    model: &M,
    sources: &[S],
    how: &Decoding<'_>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    if how.batch_size == 0 {
        return Err(Error::Invalid(
            "decoding needs a batch size of at least 1".into(),
        ));
    }
    let device = Device::Cpu;
    let pad = model.special_tokens().pad;
    let len = |i: usize| sources[i].as_ref().len();
    let mut order: Vec<usize> = (0..sources.len()).collect();
    if how.sort_by_length {
        order.sort_by_key(|&i| len(i));
    }
    let mut out = vec![Vec::new(); sources.len()];
    for chunk in order.chunks(how.batch_size) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| sources[i].as_ref()).collect();
        let (ids, mask) = pad_rows(&rows, pad, &device)?;
        let longest = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
        let generated = generate(model, &ids, &mask, &(how.config)(longest)).map_err(|e| {
            let first = chunk.iter().min().map_or(0, |i| i + 1);
            let last = chunk.iter().max().map_or(0, |i| i + 1);
            Error::Invalid(format!("decoding sentences {first}..{last}: {e}"))
        })?;
        for (&i, g) in chunk.iter().zip(generated) {
            let tokens = g.tokens();
            out[i] = tokens[..tokens.len().min((how.limit)(len(i)))].to_vec();
        }
        progress(chunk.len());
    }
    Ok(out)
}
