//! The task a checkpoint is pruned on, built from its configuration: an encoder distilled
//! against its own dense self on plain text (sentence embeddings, cosine), or an encoder–decoder
//! trained on sentence pairs (label-smoothed cross-entropy, BLEU) or distilled on plain text
//! (sequence-level: the dense model's own translations are the targets).

use candle_core::Device;
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use relprune_data::text::{
    read_parallel_files, read_sentences, read_tsv, truncate_keeping_last, BatchConfig, EmptyPairs,
    Oversize, TextPair, TextTokenizer, TokenizedPair,
};
use relprune_eval::DatasetInfo;
use relprune_models::hf::bert::BertModel;
use relprune_models::hf::{Architecture, HfModel, HfSeq2Seq};
use relprune_prune::{Evaluation, MetricSpec, Split, Task};
use relprune_tasks::{
    decode_all, Decoding, EncoderDistill, EvalSplit, Sentences, Seq2SeqConfig, Seq2SeqTask,
};

use crate::config::Config;
use crate::error::{invalid, Result};

/// Environment variable of the interruption test hook: the run fails at the start of training
/// epoch `N + 1`, after `N` epochs were checkpointed (what a killed run leaves behind).
pub const INTERRUPT_ENV: &str = "RELPRUNE_INTERRUPT_AFTER_EPOCHS";

/// A task that fails at the start of training epoch `after + 1` (the interruption test hook),
/// and otherwise is `inner`.
pub struct Interruptible<T> {
    /// The task.
    pub inner: T,
    /// Epochs after which to fail (`None`: never).
    pub after: Option<usize>,
}

impl<T: Task> Task for Interruptible<T> {
    fn metric(&self) -> MetricSpec {
        self.inner.metric()
    }
    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        if let Some(n) = self.after.filter(|&n| epoch > n) {
            return Err(relprune_prune::Error::Task(format!(
                "interrupted before training epoch {epoch} ({INTERRUPT_ENV}={n})"
            )));
        }
        self.inner.begin_epoch(epoch)
    }
    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<candle_core::Tensor> {
        self.inner.batch_loss(index)
    }
    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        self.inner.evaluate(split)
    }
    fn skip_epochs(&mut self, epochs: usize) -> relprune_prune::Result<()> {
        self.inner.skip_epochs(epochs)
    }
}

/// A translation model as the task holds it.
pub type Translator = Box<dyn HfSeq2Seq>;

/// The task of a run, by the kind of model.
pub enum HfTask {
    /// Distillation of an encoder against itself.
    Encoder(Box<EncoderDistill>),
    /// Training or distillation of an encoder–decoder.
    Seq2Seq(Box<Seq2SeqTask<Translator>>),
}

/// A task with what the report says of its data.
pub struct Built {
    /// The checkpoint's architecture.
    pub arch: &'static Architecture,
    /// The task.
    pub task: HfTask,
    /// The data, for the report.
    pub dataset: DatasetInfo,
}

/// Loads the checkpoint of `cfg` into `varmap` (its parameters are what the trainer updates),
/// checks its tokenizer, reads and splits the data, and builds the task; the dense model labels
/// the distillation data now, before any weight changes.
pub fn build_task(cfg: &Config, varmap: &VarMap, quiet: bool) -> Result<Built> {
    let (arch, model) = relprune_models::hf::load(&cfg.model_dir, varmap, &Device::Cpu)?;
    let tok_path = cfg.model_dir.join("tokenizer.json");
    let tok = TextTokenizer::from_file(&tok_path)?;
    // Refused when the configuration is checked; still an error for a caller that skips that.
    let not_yet = || {
        invalid(format!(
            "{}: decoder-only language models are not pruned by prune-hf yet",
            cfg.model_dir.display()
        ))
    };
    let vocab = match &model {
        HfModel::Encoder(m) => m.config().vocab_size,
        HfModel::Seq2Seq(m) => m.vocab_size(),
        HfModel::CausalLm(_) => return Err(not_yet()),
    };
    tok.check_vocab(vocab).map_err(|e| {
        invalid(format!(
            "{}: the tokenizer does not fit the model: {e}",
            tok_path.display()
        ))
    })?;
    let (task, dataset) = match model {
        HfModel::Encoder(m) => encoder_task(cfg, *m, &tok, quiet)?,
        HfModel::Seq2Seq(m) => seq2seq_task(cfg, m, &tok, quiet)?,
        HfModel::CausalLm(_) => return Err(not_yet()),
    };
    Ok(Built {
        arch,
        task,
        dataset,
    })
}

/// A seeded split of `n` items into (train, valid) index lists, valid ≈ `fraction·n` (≥ 1).
pub fn split_indices(n: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if n < 2 {
        return Err(invalid(format!(
            "need at least 2 non-empty lines (one to train on, one to validate), got {n}"
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_valid = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let valid = idx[..n_valid].to_vec();
    let train = idx[n_valid..].to_vec();
    Ok((train, valid))
}

/// A progress bar over `n` items (hidden when quiet).
pub fn item_bar(n: u64, label: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(n);
    bar.set_style(relprune_prune::progress::style(
        "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
    ));
    bar.set_prefix(label.to_string());
    bar
}

/// The name of a data file, for the report.
fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// The encoder path: distillation against the dense model on `--text` (and its variants).
fn encoder_task(
    cfg: &Config,
    mut model: BertModel,
    tok: &TextTokenizer,
    quiet: bool,
) -> Result<(HfTask, DatasetInfo)> {
    let text = cfg
        .text
        .as_ref()
        .ok_or_else(|| invalid("an encoder prunes on plain text: pass --text FILE"))?;
    let max_len = model.max_input_length(&cfg.model_dir)?.min(cfg.max_len);
    let lines = read_sentences(text)?;
    let (train_idx, valid_idx) = split_indices(lines.len(), cfg.valid_fraction, cfg.seed)?;
    let pick = |idx: &[usize]| idx.iter().map(|&i| lines[i].as_str()).collect::<Vec<_>>();
    let mut train_lines: Vec<String> = pick(&train_idx).into_iter().map(String::from).collect();
    let variants = relprune_data::text::augment::variants(&pick(&train_idx), cfg.augment, cfg.seed);
    train_lines.extend(variants);
    let words = if cfg.vocab_augment > 0 {
        tok.words()
    } else {
        Vec::new()
    };
    let substituted = relprune_data::text::augment::substituted(
        &pick(&train_idx),
        &words,
        cfg.vocab_augment,
        cfg.seed,
    );
    train_lines.extend(substituted);
    let encode = |lines: &[&str]| -> Result<Sentences> {
        let ids = lines
            .iter()
            .map(|s| Ok(truncate_keeping_last(tok.encode(s)?, max_len)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Sentences::new(ids, cfg.batch_size, cfg.max_tokens))
    };
    let train_refs: Vec<&str> = train_lines.iter().map(String::as_str).collect();
    let train = encode(&train_refs)?;
    let valid = encode(&pick(&valid_idx))?;
    let test = match &cfg.eval_text {
        Some(p) => {
            let l = read_sentences(p)?;
            if l.is_empty() {
                return Err(invalid(format!(
                    "eval text file {} has no lines",
                    p.display()
                )));
            }
            let refs: Vec<&str> = l.iter().map(String::as_str).collect();
            Some(encode(&refs)?)
        }
        None => None,
    };
    if !cfg.selection.frozen.is_empty() {
        model.freeze_embeddings();
    }
    let pad = tok.pad_id().or(model.config().pad_token_id).unwrap_or(0);
    let dataset = DatasetInfo {
        name: file_name(text),
        train: train.len(),
        valid: valid.len(),
        test: test.as_ref().map_or(0, Sentences::len),
    };
    let bar = item_bar(
        (dataset.train + dataset.valid + dataset.test) as u64,
        "teacher",
        quiet,
    );
    let task = EncoderDistill::new(model, train, valid, test, pad, cfg.seed, &bar)?;
    bar.finish_and_clear();
    Ok((HfTask::Encoder(Box::new(task)), dataset))
}

/// Reads `--data`: one TSV file, or two line-aligned files.
fn read_pairs(files: &[std::path::PathBuf]) -> Result<Vec<TextPair>> {
    let text = match files {
        [tsv] => read_tsv(tsv, EmptyPairs::Skip)?,
        [src, tgt] => read_parallel_files(src, tgt, EmptyPairs::Skip)?,
        _ => return Err(invalid("--data takes one TSV file or two aligned files")),
    };
    Ok(text.pairs)
}

/// The model's greedy translations of `lines`, as text, in order, with the length rule the
/// task's BLEU decoding uses (so the dense model reproduces its own references), at most
/// `max_len` tokens.
fn teacher_translations(
    model: &Translator,
    tok: &TextTokenizer,
    lines: &[String],
    max_len: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<String>> {
    let encoded = lines
        .iter()
        .map(|l| Ok(truncate_keeping_last(tok.encode(l)?, max_len)))
        .collect::<Result<Vec<_>>>()?;
    let bleu = relprune_tasks::DecodeConfig {
        batch_size: 32,
        ..Default::default()
    };
    let mut decoding = Decoding::for_bleu(&bleu, relprune_models::Seq2Seq::special_tokens(model));
    let limit = move |s: usize| bleu.limit(s).min(max_len);
    let special = relprune_models::Seq2Seq::special_tokens(model);
    decoding.config =
        Box::new(move |s| relprune_models::hf::generate::GenerateConfig::new(special, limit(s)));
    decoding.limit = Box::new(limit);
    let hyps = decode_all(model, &encoded, &decoding, |n| bar.inc(n as u64))?;
    Ok(hyps
        .iter()
        .map(|h| tok.decode(h, true))
        .collect::<std::result::Result<_, _>>()?)
}

/// The encoder–decoder path: pairs (`--data`) or sequence-level distillation (`--text`).
fn seq2seq_task(
    cfg: &Config,
    model: Translator,
    tok: &TextTokenizer,
    quiet: bool,
) -> Result<(HfTask, DatasetInfo)> {
    // The decoder start token takes a position too.
    let max_len = match model.max_positions() {
        Some(p) => cfg.max_len.min(p.saturating_sub(1)).max(2),
        None => cfg.max_len,
    };
    let (files, pairs) = match (&cfg.data, &cfg.text) {
        (Some(f), _) => (f.clone(), read_pairs(f)?),
        (None, Some(text)) => {
            // Sequence-level distillation: the dense model's own greedy translations, computed
            // once before any weight changes, are the targets and the BLEU references.
            let lines = read_sentences(text)?;
            let bar = item_bar(lines.len() as u64, "teacher", quiet);
            let hyps = teacher_translations(&model, tok, &lines, max_len, &bar)?;
            bar.finish_and_clear();
            let pairs = lines
                .into_iter()
                .zip(hyps)
                .map(|(source, target)| TextPair { source, target })
                .collect();
            (vec![text.clone()], pairs)
        }
        (None, None) => return Err(invalid("--data PAIRS or --text FILE is required")),
    };
    let (train_idx, valid_idx) = split_indices(pairs.len(), cfg.valid_fraction, cfg.seed)?;
    let encode = |idx: &[usize]| -> Result<Vec<TokenizedPair>> {
        idx.iter()
            .map(|&i| {
                let p = &pairs[i];
                Ok(TokenizedPair {
                    source: truncate_keeping_last(tok.encode(&p.source)?, max_len),
                    target: truncate_keeping_last(tok.encode(&p.target)?, max_len),
                })
            })
            .collect()
    };
    let train = encode(&train_idx)?;
    if train.is_empty() {
        return Err(invalid("no training pairs"));
    }
    let refs: Vec<String> = valid_idx.iter().map(|&i| pairs[i].target.clone()).collect();
    let valid = EvalSplit::new(encode(&valid_idx)?, refs)?;
    let dataset = DatasetInfo {
        name: file_name(&files[0]),
        train: train.len(),
        valid: valid.pairs.len(),
        test: 0,
    };
    let config = Seq2SeqConfig {
        batch: BatchConfig {
            max_tokens: cfg.batch_size * cfg.max_len,
            max_batch_size: Some(cfg.batch_size),
            oversize: Oversize::OwnBatch,
            seed: cfg.seed,
        },
        ..Seq2SeqConfig::default()
    };
    let task = Seq2SeqTask::new(
        model,
        tok.clone(),
        train,
        valid.clone(),
        valid,
        config,
        &Device::Cpu,
    )?;
    Ok((HfTask::Seq2Seq(Box::new(task)), dataset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_seeded_disjoint_and_complete() {
        let (t, v) = split_indices(20, 0.15, 7).unwrap();
        assert_eq!(v.len(), 3);
        let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(split_indices(20, 0.15, 7).unwrap(), (t, v));
        assert!(split_indices(1, 0.5, 0).is_err());
    }
}
