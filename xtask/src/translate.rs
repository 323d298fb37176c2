//! The language-generation experiment: a small Transformer trained from scratch on the
//! gettext-en-de corpus (English → German software messages), then regularized and pruned —
//! attention projections, feed-forward layers and the (shared) embeddings alike — and judged by
//! BLEU on the test split.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use relprune_core::{Gate, GateStat, SelectiveDecay};
use relprune_data::text::{
    gettext_en_de, tokenize_pairs, train_bpe, BatchConfig, BpeOptions, Oversize,
    Split as TextSplit, TextPair, TextTokenizer,
};
use relprune_eval::{DatasetInfo, RunResults};
use relprune_models::transformer::{Embeddings, Positions, Transformer, TransformerConfig};
use relprune_prune::threshold::BisectionConfig;
use relprune_prune::{
    AdamConfig, Evaluation, MaskedAdam, Masks, ParamSet, PruneConfig, RestorePoint, Selection,
    Snapshot, Split, Trainer,
};
use relprune_tasks::run::{self, CHECKPOINT_DIR, DENSE_FILE};
use relprune_tasks::{
    DecodeConfig, EvalSplit, Finish, Method, OwnNames, Seq2SeqConfig, Seq2SeqTask,
};
use serde::{Deserialize, Serialize};

use crate::flags;
use crate::reproduce::Experiment;

/// The experiment's name.
pub const NAME: &str = "transformer-gettext-en-de";

/// One line on what it does.
pub const ABOUT: &str = "Transformer trained from scratch on gettext-en-de (English→German), \
                         pruned incl. attention and embeddings; BLEU before/after";

/// Where the corpus is looked for when neither `--data-dir` nor `$RELPRUNE_GETTEXT_DIR` is given.
const DEFAULT_DATA_DIR: &str = "../shared/data/gettext-en-de";

/// The trained tokenizer, written beside the model so that a resumed run and users reuse it.
const TOKENIZER_FILE: &str = "tokenizer.json";

/// The registry entry of this module's experiment.
pub fn experiments() -> Vec<Experiment> {
    vec![Experiment {
        name: NAME,
        about: ABOUT,
        needs_cifar: false,
        run,
    }]
}

/// Everything that defines a run (written into results.json so it can be repeated).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub experiment: String,
    pub quick: bool,
    pub seed: u64,
    /// The corpus directory (`{train,valid,test}.{en,de}`).
    pub data_dir: PathBuf,
    /// Use only the first N training pairs.
    pub train_limit: Option<usize>,
    /// Use only the first N validation pairs (the metric decodes all of them every evaluation).
    pub valid_limit: Option<usize>,
    /// Joint English–German BPE vocabulary size.
    pub vocab_size: usize,
    /// The model; its vocabulary sizes are set from the trained tokenizer.
    pub model: TransformerConfig,
    /// Token budget of a training batch (padding included).
    pub max_tokens: usize,
    pub label_smoothing: f64,
    pub dense_epochs: usize,
    /// Adam's learning rate for the dense phase (cosine decay).
    pub dense_lr: f64,
    pub selection: Selection,
    pub prune: PruneConfig,
    /// Decoding for the metric (validation and test).
    pub decode: DecodeConfig,
    /// Start from the dense model (`dense.safetensors`, `tokenizer.json`) an earlier run wrote
    /// into this directory instead of training one: the dense phase is skipped.
    #[serde(default)]
    pub dense_from: Option<PathBuf>,
    pub threads: Option<String>,
}

impl Config {
    /// The full or quick configuration.
    pub fn preset(quick: bool) -> Self {
        let model = TransformerConfig {
            d_model: if quick { 64 } else { 128 },
            heads: 4,
            ffn_dim: if quick { 256 } else { 512 },
            encoder_layers: if quick { 1 } else { 2 },
            decoder_layers: if quick { 1 } else { 2 },
            dropout: if quick { 0.0 } else { 0.1 },
            attention_dropout: 0.0,
            positions: Positions::Sinusoidal,
            max_len: 256,
            embeddings: Embeddings::SharedAll,
            pre_norm: true,
            scale_embedding: true,
            ..TransformerConfig::base(0, 0)
        };
        let prune = PruneConfig {
            // Relevance |g| averaged over steps: an embedding row only gets a gradient in batches
            // where its token occurs. Quick: METHOD.md's starting gate (|g| < 0.1·max). Full: only
            // the clearly irrelevant (|g| < 0.1·median) are decayed, four times harder; measured
            // from the dense model, one epoch then a round to 62% left, and one more epoch gave
            // validation loss 2.706 and BLEU 12.64 (dense 2.770 and 12.57), against 2.781 and
            // 12.50 with the starting gate at λ 5e-4.
            regularizer: if quick {
                SelectiveDecay {
                    ema_beta: 0.9,
                    ..SelectiveDecay::default().with_lambda(1e-3)
                }
            } else {
                SelectiveDecay {
                    ema_beta: 0.9,
                    gate: Gate::Hard {
                        stat: GateStat::Quantile(0.5),
                        tau: 0.1,
                    },
                    ..SelectiveDecay::default().with_lambda(2e-3)
                }
            },
            lr: if quick { 1e-3 } else { 5e-4 },
            bisection: BisectionConfig {
                // Full: a round may cost 10% validation loss; the next epoch recovers it (the
                // retrained loss stays at the dense model's). At 5% each round kept 87-94% of
                // what was left (30% left after 10 epochs). At 15%, 20% and 30% one epoch no
                // longer recovers a round: the retrained loss climbed round after round (15%:
                // 2.78, 2.81, 2.85 down to 34% left), and validation BLEU left the δ budget at
                // 30% left (20%) and 41% (30%).
                twt: if quick { 0.05 } else { 0.1 },
                // Every evaluation decodes the validation split: cap the search's cost.
                max_evals: if quick { 16 } else { 10 },
                // No per-round BLEU bound: validation BLEU swings by about a point from epoch to
                // epoch, and bounding each round by it stalled the run of stop 13 at 65% left.
                max_metric_worsening: None,
                ..Default::default()
            },
            // In BLEU points, against the dense model's validation BLEU (the budget).
            delta: if quick { 5.0 } else { 1.0 },
            patience: 1,
            // Full: a round after every epoch (one epoch recovers the 5% a round costs: 2.88 ->
            // 2.71); two epochs per round would need ~16 epochs to reach 80%.
            min_improvement: if quick { 0.01 } else { 0.5 },
            // Quick: the lowest loss since the last round (the literal rule threw away every
            // epoch that improved by less than 1%, and stalled the full run of stop 12 at 50%).
            // Full: the weights as trained; from the converged dense model a regularized epoch
            // raises the loss a little, and the lowest-loss rule then threw the regularizer's
            // work away (one epoch after a round: loss 2.830 against 2.781 kept).
            restore: if quick {
                RestorePoint::LowestLoss
            } else {
                RestorePoint::Current
            },
            // Full: with a round every epoch at a 5% loss tolerance, every round is ~1 BLEU under
            // the dense model right after pruning (measured: 11.31 against 12.57), and recovers
            // in the next epoch; judged only then, a round can be the result.
            judge_retrained: !quick,
            // Full: at 10% a round keeps 82-91% of what was left, so 80% pruned comes at the
            // 10th or 11th round, and its judgement one epoch later.
            max_epochs: if quick { 6 } else { 12 },
            // The goal: stop once 80% of the prunable weights are gone.
            target_sparsity: if quick { None } else { Some(0.8) },
            stop_rounds: 4,
            min_round_gain: 0.001,
            finetune_epochs: if quick { 1 } else { 2 },
            finetune_lr: if quick { 5e-4 } else { 2e-4 },
        };
        Self {
            experiment: NAME.into(),
            quick,
            seed: 1,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            train_limit: if quick { Some(6000) } else { None },
            valid_limit: if quick { Some(200) } else { None },
            vocab_size: if quick { 1000 } else { 4000 },
            model,
            max_tokens: if quick { 384 } else { 2048 },
            label_smoothing: 0.1,
            dense_epochs: 8,
            dense_lr: if quick { 3e-3 } else { 1e-3 },
            selection: Selection::default(),
            prune,
            decode: DecodeConfig::default(),
            dense_from: None,
            threads: std::env::var("RAYON_NUM_THREADS").ok(),
        }
    }
}

/// The corpus directory: `--data-dir`, else `$RELPRUNE_GETTEXT_DIR`, else the shared copy.
fn data_dir(f: &flags::Reproduce) -> PathBuf {
    // With --all, --data-dir is MNIST's.
    let given = if f.all { None } else { f.data_dir.clone() };
    given
        .or_else(|| std::env::var_os("RELPRUNE_GETTEXT_DIR").map(Into::into))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

/// `cargo xtask reproduce transformer-gettext-en-de`.
pub fn run(_experiment: &str, f: &flags::Reproduce, out: &Path) -> Result<RunResults> {
    if let Some(dir) = &f.resume {
        let saved: run::SavedRun<Config> = run::saved_config(&dir.join(CHECKPOINT_DIR), NAME)?;
        let mut cfg = saved.config.clone();
        crate::reproduce::apply_resume_flags(
            f,
            &saved,
            true,
            &mut cfg.dense_epochs,
            &mut cfg.prune,
        );
        eprintln!(
            "resuming {NAME} in {} after {} epochs",
            dir.display(),
            saved.epochs
        );
        return run_config(cfg, out, true);
    }
    let mut cfg = Config::preset(f.quick);
    cfg.data_dir = std::path::absolute(data_dir(f))?;
    crate::reproduce::apply_common_flags(
        f,
        crate::reproduce::Common {
            seed: &mut cfg.seed,
            dense_epochs: &mut cfg.dense_epochs,
            train_limit: &mut cfg.train_limit,
            prune: &mut cfg.prune,
        },
    )?;
    if let Some(dir) = &f.dense_from {
        cfg.dense_from = Some(std::path::absolute(dir)?);
        cfg.dense_epochs = 0;
    }
    if let Some(m) = f.method {
        ensure!(
            m == Method::Selective,
            "{NAME} runs the method only (--method selective); the baselines are wired for the \
             image experiments"
        );
    }
    run_config(cfg, out, false)
}

/// Reads a split, keeping its first `limit` pairs.
fn read_split(dir: &Path, split: TextSplit, limit: Option<usize>) -> Result<Vec<TextPair>> {
    let mut pairs = gettext_en_de(dir, split)
        .with_context(|| {
            format!(
                "reading the gettext-en-de {split} split from {} (pass --data-dir DIR or set \
                 RELPRUNE_GETTEXT_DIR)",
                dir.display()
            )
        })?
        .pairs;
    if let Some(n) = limit {
        pairs.truncate(n);
    }
    ensure!(
        !pairs.is_empty(),
        "{}: the {split} split is empty",
        dir.display()
    );
    Ok(pairs)
}

/// The run's tokenizer: the one saved in `out` by an earlier start of the same run, else a joint
/// BPE learned from the training pairs (and saved).
fn tokenizer(cfg: &Config, train: &[TextPair], out: &Path) -> Result<TextTokenizer> {
    let path = out.join(TOKENIZER_FILE);
    if path.exists() {
        return Ok(TextTokenizer::from_file(&path)?);
    }
    let texts = train
        .iter()
        .flat_map(|p| [p.source.as_str(), p.target.as_str()]);
    let tok = train_bpe(
        texts,
        &BpeOptions {
            vocab_size: cfg.vocab_size,
            ..BpeOptions::default()
        },
    )?;
    let json = tok
        .inner()
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("cannot serialize the tokenizer: {e}"))?;
    relprune_io::write(&path, json.as_bytes())?;
    Ok(tok)
}

/// Sets every parameter to its tensor in `path` (a `dense.safetensors` of an earlier run).
fn load_dense(params: &ParamSet, path: &Path) -> Result<()> {
    let context = || format!("--dense-from: {}", path.display());
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(context)?;
    params
        .restore(&Snapshot(tensors.into_iter().collect()))
        .with_context(context)
}

/// A configuration's model, trainer (Adam at the dense rate) and task, built but not trained.
pub struct Built {
    /// The trainer of the model's parameters.
    pub trainer: Trainer,
    /// The translation task on the configuration's data and tokenizer.
    pub task: Seq2SeqTask<Transformer>,
    /// The splits' sizes, for the report.
    pub dataset: DatasetInfo,
    /// The test split's reference translations.
    pub test_refs: Vec<String>,
}

/// Reads the data, trains (or reuses) the tokenizer in `out`, and builds the model, its trainer
/// and the task of `cfg` (whose vocabulary, special ids and length limit it sets).
pub fn build(cfg: &mut Config, out: &Path) -> Result<Built> {
    let device = Device::Cpu;
    let train_text = read_split(&cfg.data_dir, TextSplit::Train, cfg.train_limit)?;
    let valid_text = read_split(&cfg.data_dir, TextSplit::Valid, cfg.valid_limit)?;
    let test_text = read_split(&cfg.data_dir, TextSplit::Test, None)?;
    std::fs::create_dir_all(out)?;
    if let Some(dir) = &cfg.dense_from {
        // The dense model only makes sense with the vocabulary it was trained with.
        let (from, to) = (dir.join(TOKENIZER_FILE), out.join(TOKENIZER_FILE));
        if !to.exists() {
            std::fs::copy(&from, &to)
                .with_context(|| format!("--dense-from: cannot copy {}", from.display()))?;
        }
    }
    let tok = tokenizer(cfg, &train_text, out)?;
    let special = tok.special_ids();
    let (Some(pad), Some(bos), Some(eos)) = (special.pad, special.bos, special.eos) else {
        anyhow::bail!(
            "{}: the tokenizer lacks <pad>, <s> or </s>",
            tok.source_name()
        );
    };
    cfg.model.src_vocab = tok.vocab_size();
    cfg.model.tgt_vocab = tok.vocab_size();
    cfg.model.pad_id = pad;
    cfg.model.bos_id = bos;
    cfg.model.eos_id = eos;
    let train = tokenize_pairs(&train_text, &tok, &tok)?;
    let eval_split = |text: &[TextPair]| -> Result<EvalSplit> {
        let pairs = tokenize_pairs(text, &tok, &tok)?;
        let refs = text.iter().map(|p| p.target.clone()).collect();
        Ok(EvalSplit::new(pairs, refs)?)
    };
    let (valid, test) = (eval_split(&valid_text)?, eval_split(&test_text)?);
    // Sinusoidal positions cost nothing to extend: make room for the longest segment and the
    // longest translation the decoder may produce, so no input is ever cut or refused.
    let longest_source = train
        .iter()
        .chain(&valid.pairs)
        .chain(&test.pairs)
        .map(|p| p.source.len())
        .max()
        .unwrap_or(0);
    let longest = train
        .iter()
        .chain(&valid.pairs)
        .chain(&test.pairs)
        .map(|p| p.max_len())
        .max()
        .unwrap_or(0);
    if cfg.model.positions == Positions::Sinusoidal {
        cfg.model.max_len = cfg
            .model
            .max_len
            .max(longest)
            .max(cfg.decode.limit(longest_source) + 1);
    }
    eprintln!(
        "{NAME}: {} train, {} valid, {} test pairs from {}; joint BPE vocabulary {}",
        train.len(),
        valid.pairs.len(),
        test.pairs.len(),
        cfg.data_dir.display(),
        tok.vocab_size()
    );
    let dataset = DatasetInfo {
        name: "gettext-en-de".into(),
        train: train.len(),
        valid: valid.pairs.len(),
        test: test.pairs.len(),
    };

    let varmap = VarMap::new();
    let model = Transformer::new(cfg.model.clone(), &varmap, cfg.seed, &device)?;
    let params = ParamSet::from_varmap(&varmap, &cfg.selection)?;
    let masks = Masks::dense(&params)?;
    let adam = AdamConfig {
        lr: cfg.dense_lr,
        beta2: 0.98,
        ..AdamConfig::default()
    };
    let trainer = Trainer::new(params, masks, MaskedAdam::new(adam, None)?)?;
    let task_config = Seq2SeqConfig {
        batch: BatchConfig {
            max_tokens: cfg.max_tokens,
            max_batch_size: None,
            // A segment longer than the budget trains alone rather than failing the run.
            oversize: Oversize::OwnBatch,
            seed: cfg.seed,
        },
        label_smoothing: cfg.label_smoothing,
        decode: cfg.decode,
        ..Seq2SeqConfig::default()
    };
    let task = Seq2SeqTask::new(
        model,
        tok.clone(),
        train,
        valid,
        test,
        task_config.clone(),
        &device,
    )?;
    Ok(Built {
        trainer,
        task,
        dataset,
        test_refs: test_text.into_iter().map(|p| p.target).collect(),
    })
}

/// Runs one configuration end to end, writing the model files into `out`; checkpoints every epoch
/// into `out/checkpoint`, and with `resume` continues from there.
pub fn run_config(mut cfg: Config, out: &Path, resume: bool) -> Result<RunResults> {
    let t0 = Instant::now();
    let Built {
        mut trainer,
        mut task,
        dataset,
        test_refs,
    } = build(&mut cfg, out)?;
    if let Some(dir) = &cfg.dense_from {
        load_dense(&trainer.params, &dir.join("dense.safetensors"))?;
    }
    // 1. The dense reference.
    run::start(
        &mut trainer,
        &mut task,
        &out.join(CHECKPOINT_DIR),
        &cfg,
        resume,
    )?;
    run::train_dense(&mut trainer, &mut task, cfg.dense_lr, cfg.dense_epochs)?;
    let dense = run::dense_reference(&mut trainer, &mut task, &out.join(DENSE_FILE), |_, task| {
        let (test_bleu, hyps) = task.bleu(Split::Test)?;
        write_lines(&out.join("test.dense.de"), &hyps)
            .map_err(|e| relprune_prune::Error::Task(format!("{e:#}")))?;
        Ok(test_bleu.score)
    })?;
    eprintln!(
        "dense: valid BLEU {:.2} (loss {:.4}), test BLEU {:.2}",
        dense.valid.metric, dense.valid.loss, dense.test_metric
    );

    // 2. Regularize and prune iteratively, then fine-tune.
    let phase = run::prune(&mut trainer, &mut task, &cfg.prune)?;

    // 3. Judge the saved file: reload it into a fresh model and translate the test split.
    let mut pruned_bleu = None;
    let mut files = OwnNames(|path: &Path, task: &mut Seq2SeqTask<Transformer>| {
        let fresh = model_from_file(&cfg, path)?;
        let trained = std::mem::replace(&mut task.model, fresh);
        let judged = task.bleu(Split::Test);
        task.model = trained;
        let (bleu, hyps) = judged?;
        write_lines(&out.join("test.pruned.de"), &hyps)
            .map_err(|e| relprune_tasks::Error::Invalid(format!("{e:#}")))?;
        let metric = bleu.score;
        pruned_bleu = Some(bleu);
        Ok(Evaluation {
            loss: f64::NAN,
            metric,
        })
    });
    let finish = Finish {
        experiment: cfg.experiment.clone(),
        dataset,
        dense_metric: dense.test_metric,
        config: serde_json::to_value(&cfg)?,
        phase,
        out: out.to_path_buf(),
        dense_file: out.join(DENSE_FILE),
        sparse: true,
        layer_type: Some(relprune_models::transformer::layer_type),
        linear_group: false,
        // Decoding the test split again from the trained model would add minutes for nothing.
        tolerance: None,
        started: t0,
    };
    let mut results = relprune_tasks::finish(&mut trainer, &mut task, &mut files, finish)?;
    write_lines(&out.join("test.ref.de"), &test_refs)?;
    eprintln!("remaining by layer type (from {}):", results.model_file);
    for s in &results.layer_groups {
        eprintln!(
            "  {:<13} {:>9} / {:>9} = {:6.2}%",
            s.name,
            s.nonzero,
            s.params,
            s.remaining_pct()
        );
    }
    let pruned_bleu = pruned_bleu.context("the pruned model was not judged")?;
    let extra = &mut results.extra;
    extra.insert("method".into(), Method::Selective.name().into());
    extra.insert("dense_valid_metric".into(), dense.valid.metric.into());
    extra.insert("dense_valid_loss".into(), dense.valid.loss.into());
    extra.insert(
        "bleu_signature".into(),
        pruned_bleu.signature.clone().into(),
    );
    extra.insert(
        "test_bleu_pruned_detail".into(),
        serde_json::to_value(&pruned_bleu)?,
    );
    Ok(results)
}

/// The model of a run of `cfg` saved in `path` (`model.safetensors` or `dense.safetensors`).
fn model_from_file(cfg: &Config, path: &Path) -> relprune_models::Result<Transformer> {
    let varmap = VarMap::new();
    // The seed only draws initial values that the file then overwrites.
    let model = Transformer::new(
        cfg.model.clone(),
        &varmap,
        cfg.seed.wrapping_add(1),
        &Device::Cpu,
    )?;
    relprune_models::checkpoint::load(&varmap, path)?;
    Ok(model)
}

/// A finished run of this experiment, loaded back from its directory.
pub struct SavedRun {
    /// The pruned model (`model.safetensors`).
    pub model: Transformer,
    /// The run's tokenizer.
    pub tokenizer: TextTokenizer,
    /// The run's configuration (vocabulary sizes and special ids set).
    pub config: Config,
}

impl SavedRun {
    /// Loads the run written into `dir` (`results.json`, `model.safetensors`,
    /// `tokenizer.json`).
    pub fn load(dir: &Path) -> Result<Self> {
        let results = RunResults::read_json(&dir.join("results.json"))
            .with_context(|| format!("{}: not a finished run", dir.display()))?;
        let config: Config = serde_json::from_value(results.config.clone()).with_context(|| {
            format!(
                "{}: the configuration is not this experiment's",
                dir.join("results.json").display()
            )
        })?;
        ensure!(
            config.experiment == NAME,
            "{}: a run of {}, not {NAME}",
            dir.display(),
            config.experiment
        );
        let model = model_from_file(&config, &dir.join("model.safetensors"))?;
        let tokenizer = TextTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok(Self {
            model,
            tokenizer,
            config,
        })
    }

    /// The first `n` source sentences of the run's test split, tokenized.
    pub fn test_sources(&self, n: usize) -> Result<Vec<Vec<u32>>> {
        let pairs = read_split(&self.config.data_dir, TextSplit::Test, Some(n))?;
        Ok(tokenize_pairs(&pairs, &self.tokenizer, &self.tokenizer)?
            .into_iter()
            .map(|p| p.source)
            .collect())
    }
}

/// Writes one line per entry, atomically.
fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    relprune_io::write(path, text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_corpus() -> Option<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/gettext-en-de");
        dir.join("train.en").exists().then_some(dir)
    }

    #[test]
    fn layer_types_cover_attention_feed_forward_and_embeddings() {
        let layer_type = |n: &str| relprune_models::transformer::layer_type(n).name();
        assert_eq!(
            layer_type("decoder.layers.0.encoder_attn.q_proj.weight"),
            "attention"
        );
        assert_eq!(
            layer_type("encoder.layers.2.self_attn.out_proj.weight"),
            "attention"
        );
        assert_eq!(layer_type("encoder.layers.0.fc2.weight"), "feed-forward");
        assert_eq!(layer_type("encoder.embed_tokens.weight"), "embeddings");
        assert_eq!(layer_type("output_projection.weight"), "embeddings");
        // Every prunable parameter of the model has a type.
        let cfg = Config::preset(false);
        for (name, shape) in relprune_models::transformer::parameter_shapes(&TransformerConfig {
            src_vocab: 100,
            tgt_vocab: 100,
            ..cfg.model
        }) {
            if cfg.selection.is_prunable(&name, &shape) {
                assert_ne!(layer_type(&name), "other", "{name}");
            }
        }
    }

    #[test]
    fn the_full_translation_preset_is_the_recorded_recipe() {
        let p = Config::preset(false).prune;
        assert_eq!(p.bisection.twt, 0.1);
        assert_eq!(p.max_epochs, 12);
        assert_eq!(p.target_sparsity, Some(0.8));
        assert_eq!(p.delta, 1.0);
        assert!(p.judge_retrained);
        assert_eq!(p.restore, RestorePoint::Current);
        assert_eq!(p.bisection.max_metric_worsening, None);
        let q = Config::preset(true).prune;
        assert_eq!((q.bisection.twt, q.max_epochs), (0.05, 6));
        assert!(!q.judge_retrained);
    }

    #[test]
    fn a_run_with_dropout_repeats_bit_for_bit() {
        let Some(data) = shared_corpus() else {
            eprintln!("skipped: ../shared/data/gettext-en-de is not there");
            return;
        };
        let run = || {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = Config::preset(true);
            cfg.data_dir = data.clone();
            cfg.train_limit = Some(200);
            cfg.valid_limit = Some(20);
            cfg.vocab_size = 300;
            cfg.model.d_model = 32;
            cfg.model.ffn_dim = 64;
            cfg.model.dropout = 0.1;
            cfg.model.attention_dropout = 0.1;
            cfg.dense_epochs = 1;
            cfg.prune.max_epochs = 1;
            cfg.prune.finetune_epochs = 0;
            run_config(cfg, dir.path(), false).unwrap();
            ["dense.safetensors", "model.safetensors"]
                .map(|f| std::fs::read(dir.path().join(f)).unwrap())
        };
        assert!(run() == run(), "two runs of one configuration differ");
    }

    #[test]
    fn a_tiny_run_prunes_attention_ffn_and_embeddings_and_the_file_agrees() {
        let Some(data) = shared_corpus() else {
            eprintln!("skipped: ../shared/data/gettext-en-de is not there");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::preset(true);
        cfg.data_dir = data;
        cfg.train_limit = Some(300);
        cfg.valid_limit = Some(30);
        cfg.vocab_size = 300;
        cfg.model.d_model = 32;
        cfg.model.ffn_dim = 64;
        cfg.dense_epochs = 2;
        cfg.prune.max_epochs = 2;
        cfg.prune.patience = 1;
        // Every epoch counts as a plateau, so the short run prunes.
        cfg.prune.min_improvement = 0.99;
        cfg.prune.finetune_epochs = 1;
        cfg.prune.delta = 100.0;
        cfg.prune.bisection.twt = 0.5;
        let base = cfg.clone();
        let r = run_config(cfg, dir.path(), false).unwrap();
        crate::reproduce::write_outputs(&r, dir.path()).unwrap();
        assert_eq!(r.metric, "bleu");
        assert_eq!(r.dataset.test, 1000);
        assert!(r.pruned.remaining_pct < 100.0, "{:?}", r.rounds);
        // The shared table (source, target, output projection) is one tensor, counted and
        // pruned once.
        let names: Vec<&str> = r.layers.iter().map(|l| l.name.as_str()).collect();
        assert!(names.contains(&"encoder.embed_tokens.weight"), "{names:?}");
        assert!(!names
            .iter()
            .any(|n| n.starts_with("decoder.embed_tokens") || n.starts_with("output_projection")));
        let types: Vec<&str> = r.layer_groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(types, ["attention", "embeddings", "feed-forward"]);
        for g in &r.layer_groups {
            assert!(
                g.remaining_pct() < 100.0,
                "{} was not pruned: {g:?}",
                g.name
            );
        }
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## By layer type"), "{md}");
        // The hypotheses files hold one line per test sentence, and BLEU on them is the
        // reported score.
        let hyps: Vec<String> = std::fs::read_to_string(dir.path().join("test.pruned.de"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let refs: Vec<String> = std::fs::read_to_string(dir.path().join("test.ref.de"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(hyps.len(), 1000);
        let score =
            relprune_eval::corpus_bleu(&hyps, &[refs], &relprune_eval::BleuConfig::default())
                .unwrap();
        assert!((score.score - r.pruned.value).abs() < 1e-9);
        for f in [
            "results.json",
            "report.md",
            "tokenizer.json",
            "model.sparse.safetensors",
        ] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        // The run loads back (as the inference benchmark loads it) and translates as it did.
        let saved = SavedRun::load(dir.path()).unwrap();
        let sources = saved.test_sources(1000).unwrap();
        let how = relprune_tasks::Decoding::for_bleu(
            &saved.config.decode,
            relprune_models::Seq2Seq::special_tokens(&saved.model),
        );
        let ids = relprune_tasks::decode_all(&saved.model, &sources, &how, |_| {}).unwrap();
        let again: Vec<String> = ids
            .iter()
            .map(|t| saved.tokenizer.decode(t, true).unwrap())
            .collect();
        assert_eq!(again, hyps);

        // --dense-from: a second run starts from this run's dense model instead of training one.
        let again = tempfile::tempdir().unwrap();
        let mut cfg = base;
        cfg.dense_from = Some(dir.path().to_path_buf());
        cfg.dense_epochs = 0;
        cfg.prune.max_epochs = 1;
        let r2 = run_config(cfg, again.path(), false).unwrap();
        assert_eq!(r2.dense.value, r.dense.value);
        let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
        for f in ["dense.safetensors", "tokenizer.json", "test.dense.de"] {
            assert!(read(again.path(), f) == read(dir.path(), f), "{f} differs");
        }
    }
}
