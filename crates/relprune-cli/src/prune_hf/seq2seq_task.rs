//! The translation-model path of `prune-hf` (Marian, T5): sentence pairs (`--data`) train with
//! label-smoothed cross-entropy and are judged by the BLEU of greedy translations of the
//! validation split, through `relprune_eval::seq2seq::Seq2SeqTask`. Plain text (`--text`) is
//! sequence-level distillation: the targets and references are the dense model's own greedy
//! translations, computed once up front, so the metric is the BLEU against the dense model.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use relprune_data::text::{
    read_parallel_files, read_tsv, BatchConfig, EmptyPairs, Oversize, TextPair, TextTokenizer,
    TokenizedPair,
};
use relprune_eval::seq2seq::{EvalSplit, Seq2SeqConfig, Seq2SeqTask};
use relprune_eval::DatasetInfo;
use relprune_models::hf::generate::{greedy, GenerateConfig, Seq2Seq};
use relprune_models::hf::marian::MarianModel;
use relprune_models::hf::t5::T5Model;
use relprune_prune::{Evaluation, MetricSpec, Split, Task};

use super::{make_trainer, prune_and_write, split_indices, Config, Output, RunOptions};

/// A Hugging Face encoder–decoder `prune-hf` can load and write back.
pub trait HfSeq2Seq: Seq2Seq + Sized {
    /// Loads `dir` into `varmap`.
    fn load_dir(dir: &Path, varmap: &VarMap) -> Result<Self>;
    /// The vocabulary size of the embedding table.
    fn vocab_size(&self) -> usize;
    /// The variable names a stored tensor name may denote (tied aliases → the shared embedding).
    fn lookup(name: &str) -> Vec<String>;
    /// The longest sequence the model's position table allows (`None`: relative positions).
    fn max_positions(&self) -> Option<usize>;
}

impl HfSeq2Seq for MarianModel {
    fn load_dir(dir: &Path, varmap: &VarMap) -> Result<Self> {
        Ok(MarianModel::load(dir, varmap, &Device::Cpu)?)
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn max_positions(&self) -> Option<usize> {
        Some(self.config().max_position_embeddings)
    }
    fn lookup(name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        if matches!(
            name,
            "model.encoder.embed_tokens.weight"
                | "model.decoder.embed_tokens.weight"
                | "lm_head.weight"
        ) {
            out.push("model.shared.weight".into());
        }
        out
    }
}

impl HfSeq2Seq for T5Model {
    fn load_dir(dir: &Path, varmap: &VarMap) -> Result<Self> {
        Ok(T5Model::load(dir, varmap, &Device::Cpu)?)
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn max_positions(&self) -> Option<usize> {
        None
    }
    fn lookup(name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        if matches!(
            name,
            "encoder.embed_tokens.weight" | "decoder.embed_tokens.weight" | "lm_head.weight"
        ) {
            out.push("shared.weight".into());
        }
        out
    }
}

/// Fails at the start of training epoch `n + 1` (the interruption test hook), else delegates.
struct Interruptible<T: Task> {
    inner: T,
    after: Option<usize>,
}

impl<T: Task> Task for Interruptible<T> {
    fn metric(&self) -> MetricSpec {
        self.inner.metric()
    }
    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        if let Some(n) = self.after {
            if epoch > n {
                return Err(relprune_prune::Error::Task(format!(
                    "interrupted before training epoch {epoch} ({}={n})",
                    super::INTERRUPT_ENV
                )));
            }
        }
        self.inner.begin_epoch(epoch)
    }
    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        self.inner.batch_loss(index)
    }
    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        self.inner.evaluate(split)
    }
    fn skip_epochs(&mut self, epochs: usize) -> relprune_prune::Result<()> {
        self.inner.skip_epochs(epochs)
    }
}

/// Runs `prune-hf` on a Marian or T5 checkpoint.
pub fn run(cfg: Config, opts: &RunOptions) -> Result<()> {
    match cfg.model_type.as_str() {
        "marian" => run_model::<MarianModel>(cfg, opts),
        "t5" => run_model::<T5Model>(cfg, opts),
        other => bail!("{other} is not a translation model"),
    }
}

/// Reads `--data`: one TSV file, or two line-aligned files.
fn read_pairs(files: &[std::path::PathBuf]) -> Result<Vec<TextPair>> {
    let text = match files {
        [tsv] => read_tsv(tsv, EmptyPairs::Skip)?,
        [src, tgt] => read_parallel_files(src, tgt, EmptyPairs::Skip)?,
        _ => bail!("--data takes one TSV file or two aligned files"),
    };
    Ok(text.pairs)
}

/// Cuts a sequence to `max_len` ids keeping its last (EOS) id.
fn cut(mut ids: Vec<u32>, max_len: usize) -> Vec<u32> {
    if ids.len() > max_len {
        let last = ids[ids.len() - 1];
        ids.truncate(max_len - 1);
        ids.push(last);
    }
    ids
}

/// The model's greedy translations of `lines`, as text, in order.
fn teacher_translations<M: HfSeq2Seq>(
    model: &M,
    tok: &TextTokenizer,
    lines: &[String],
    max_len: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<String>> {
    let special = model.special_tokens();
    let device = Device::Cpu;
    let encoded = lines
        .iter()
        .map(|l| Ok(cut(tok.encode(l)?, max_len)))
        .collect::<Result<Vec<_>>>()?;
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.sort_by_key(|&i| encoded[i].len());
    let mut out = vec![String::new(); lines.len()];
    for chunk in order.chunks(32) {
        let s = chunk
            .iter()
            .map(|&i| encoded[i].len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ids = Vec::with_capacity(chunk.len() * s);
        let mut mask = Vec::with_capacity(chunk.len() * s);
        for &i in chunk {
            let src = &encoded[i];
            ids.extend(
                src.iter()
                    .copied()
                    .chain(std::iter::repeat(special.pad))
                    .take(s),
            );
            mask.extend((0..s).map(|j| u8::from(j < src.len())));
        }
        let ids = Tensor::from_vec(ids, (chunk.len(), s), &device)?;
        let mask = Tensor::from_vec(mask, (chunk.len(), s), &device)?;
        // The length rule the task's BLEU decoding uses (1.5·S + 10), so the dense model
        // reproduces its own references.
        let d = relprune_eval::seq2seq::DecodeConfig::default();
        let len = ((d.max_len_a * s as f64).ceil() as usize + d.max_len_b).min(max_len);
        let gen = GenerateConfig::new(special, len);
        let hyps = greedy(model, &ids, &mask, &gen)?;
        for (&i, h) in chunk.iter().zip(hyps) {
            out[i] = tok.decode(h.tokens(), true)?;
        }
        bar.inc(chunk.len() as u64);
    }
    Ok(out)
}

fn run_model<M: HfSeq2Seq>(cfg: Config, opts: &RunOptions) -> Result<()> {
    let varmap = VarMap::new();
    let model = M::load_dir(&cfg.model_dir, &varmap)?;
    let tok_path = cfg.model_dir.join("tokenizer.json");
    let tok = TextTokenizer::from_file(&tok_path)?;
    tok.check_vocab(model.vocab_size()).with_context(|| {
        format!(
            "{}: the tokenizer does not fit the model",
            tok_path.display()
        )
    })?;
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
            let lines = super::read_text(text)?;
            let bar = super::item_bar(lines.len() as u64, "teacher", opts.quiet);
            let hyps = teacher_translations(&model, &tok, &lines, max_len, &bar)?;
            bar.finish_and_clear();
            let pairs = lines
                .into_iter()
                .zip(hyps)
                .map(|(source, target)| TextPair { source, target })
                .collect();
            (vec![text.clone()], pairs)
        }
        (None, None) => bail!("--data PAIRS or --text FILE is required"),
    };
    let (train_idx, valid_idx) = split_indices(pairs.len(), cfg.valid_fraction, cfg.seed)?;
    let encode = |idx: &[usize]| -> Result<Vec<TokenizedPair>> {
        idx.iter()
            .map(|&i| {
                let p = &pairs[i];
                Ok(TokenizedPair {
                    source: cut(tok.encode(&p.source)?, max_len),
                    target: cut(tok.encode(&p.target)?, max_len),
                })
            })
            .collect()
    };
    let train = encode(&train_idx)?;
    let valid_pairs = encode(&valid_idx)?;
    let refs: Vec<String> = valid_idx.iter().map(|&i| pairs[i].target.clone()).collect();
    let valid = EvalSplit::new(valid_pairs, refs)?;
    ensure!(!train.is_empty(), "no training pairs");
    let dataset = DatasetInfo {
        name: files[0]
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
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
    let inner = Seq2SeqTask::new(
        model,
        tok.clone(),
        train,
        valid.clone(),
        valid,
        config,
        &Device::Cpu,
    )?;
    let mut task = Interruptible {
        inner,
        after: opts.interrupt_after,
    };
    let mut trainer = make_trainer(&cfg, opts, &varmap, &mut task)?;
    let dense = trainer.once("dense evaluation", |trainer| {
        trainer.evaluate(&mut task, Split::Test)
    })?;
    let out = Output {
        varmap: &varmap,
        lookup: M::lookup,
        dense_metric: dense.metric,
        dataset,
    };
    // The written directory must load back.
    let verify = |dir: &Path, _, _| {
        M::load_dir(dir, &VarMap::new()).context("the written model does not load back")?;
        Ok(())
    };
    prune_and_write(&cfg, opts, &mut trainer, task, out, None, verify)
}
