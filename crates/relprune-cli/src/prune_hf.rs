//! `relprune prune-hf`: prunes a pretrained Hugging Face checkpoint end to end with the method
//! (selective decay + the iterative algorithm) and writes a directory Hugging Face libraries load
//! like the input: the same tensor names, shapes and dtypes, every other file copied, plus
//! `relprune_report.json` and `report.md`.
//!
//! Encoders (BERT) prune by distillation against their own dense self on plain text lines
//! ([`encoder_task`]); translation models (Marian, T5) on sentence pairs with label-smoothed
//! cross-entropy, or by distillation of the dense model's logits on plain text ([`seq2seq_task`]).
//! The run is checkpointed after every epoch into a work directory beside the output, and the
//! output is written into a temporary directory renamed at the end: a failure leaves no partial
//! output directory.

pub mod augment;
pub mod encoder_task;
pub mod memory;
pub mod seq2seq_task;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use relprune_core::SelectiveDecay;
use relprune_data::text::TextTokenizer;
use relprune_eval::{
    DatasetInfo, LayerStats, MetricValue, PrunedSummary, RoundRecord, RunResults, SizesBytes,
    SparsityReport,
};
use relprune_models::hf::bert::BertModel;
use relprune_prune::reconstruct::{obs_prune, Gram, ObsConfig};
use relprune_prune::threshold::{BisectionConfig, Criterion, Scope};
use relprune_prune::{
    export, AdamConfig, Evaluation, IterativePruning, LrSchedule, MaskedAdam, Masks, ParamSet,
    PruneConfig, RestorePoint, Selection, Split, Task, Trainer,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use encoder_task::{EncoderDistill, Sentences};

/// The `model_type` values `prune-hf` handles.
pub const SUPPORTED: &[&str] = &["bert", "marian", "t5"];

/// Environment variable of the interruption test hook: the run fails at the start of training
/// epoch `N + 1`, after `N` epochs were checkpointed (what a killed run leaves behind).
pub const INTERRUPT_ENV: &str = "RELPRUNE_INTERRUPT_AFTER_EPOCHS";

/// Weight files of other frameworks: stale dense copies of the model, never copied to the output.
const OTHER_WEIGHT_FILES: &[&str] = &[
    "pytorch_model.bin",
    "tf_model.h5",
    "flax_model.msgpack",
    "rust_model.ot",
    "model.onnx",
];
/// Directories of other runtimes' exports (dense weights), never copied to the output.
const OTHER_WEIGHT_DIRS: &[&str] = &["onnx", "openvino"];

/// Arguments of `relprune prune-hf`.
#[derive(Debug, Args)]
pub struct PruneHfArgs {
    /// A local model directory (`config.json`, `model.safetensors`, `tokenizer.json`), or a
    /// Hugging Face Hub id resolved through the HF cache (`HF_HOME`, `HF_HUB_OFFLINE=1`). An
    /// existing local directory always wins. Not needed with `--resume`.
    #[arg(long, value_name = "ID_OR_DIR")]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) of a Hub id.
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Sentence pairs for translation models: one TSV file, or two line-aligned files
    /// (source, then target).
    #[arg(long, value_name = "PAIRS", num_args = 1..=2, conflicts_with = "text")]
    pub data: Option<Vec<PathBuf>>,
    /// Plain text, one sentence per line: distillation against the dense model itself.
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Held-out sentences (same format as --text / the first --data file) used only for the
    /// report's test figures; default: the validation split is reported.
    #[arg(long, value_name = "FILE")]
    pub eval_text: Option<PathBuf>,
    /// Stop at this fraction of zero prunable weights (e.g. 0.5); every prunable matrix ends at
    /// least this sparse.
    #[arg(long, value_name = "P")]
    pub target_sparsity: Option<f64>,
    /// Stop when the validation metric dropped by more than D (metric units: cosine for encoders,
    /// token accuracy points otherwise); the result is the sparsest round within D.
    #[arg(long, value_name = "D")]
    pub max_drop: Option<f64>,
    /// The output directory (must not exist; written atomically).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The checkpoint directory (default: `OUT.relprune-work`, beside the output; removed after
    /// a successful run unless --keep-work).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Continue the run checkpointed in this work directory (its configuration is used).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Keep the work directory after a successful run.
    #[arg(long)]
    pub keep_work: bool,
    /// Also write the compact sparse format (`model.sparse.safetensors`).
    #[arg(long)]
    pub sparse: bool,
    /// Also prune the token embeddings (and a tied or separate LM head). Off by default: only
    /// rows of tokens that occur in the pruning data get a gradient, so the rest of a large
    /// vocabulary would be pruned by magnitude alone, blind to what the model does with them.
    #[arg(long)]
    pub prune_embeddings: bool,
    /// Also train the embedding tables a BERT encoder does not prune. Off by default: a few
    /// hundred sentences cannot teach a vocabulary-sized table much, and leaving them frozen
    /// saves their gradients, optimizer state and snapshots (about half of MiniLM's memory).
    #[arg(long)]
    pub train_embeddings: bool,
    /// How the step after the method brings every matrix to --target-sparsity: reconstruct
    /// (layer-wise, SparseGPT, from the layer inputs on the training text; BERT) or magnitude.
    #[arg(long, value_enum, default_value_t = FinalStep::Reconstruct)]
    pub final_step: FinalStep,
    /// Epoch budget of the pruning phase.
    #[arg(long, value_name = "N", default_value_t = 12)]
    pub epochs: usize,
    /// Fine-tuning epochs after pruning (masks fixed, no regularizer; the best validation epoch
    /// is kept).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub finetune_epochs: usize,
    /// Starting learning rate of the fine-tune (Adam, cosine decay).
    #[arg(long, value_name = "LR", default_value_t = 1e-4)]
    pub finetune_lr: f64,
    /// Adam learning rate of the pruning phase.
    #[arg(long, value_name = "LR", default_value_t = 1e-4)]
    pub lr: f64,
    /// Strength λ of the regularizer (LOBSTER's soft gate, decoupled, per step).
    #[arg(long, value_name = "L", default_value_t = 1e-4)]
    pub lambda: f64,
    /// Largest validation-metric drop one pruning round may cause (threshold search criterion).
    #[arg(long, value_name = "T", default_value_t = 0.02)]
    pub round_tolerance: f64,
    /// Epochs without a validation-loss improvement (see --min-improvement) that trigger a
    /// pruning round.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub patience: usize,
    /// Relative validation-loss decrease that counts as an improvement. Distillation losses
    /// start near 0 and keep falling by more than 1% an epoch, so the default is 10%: otherwise
    /// rounds come too rarely for the epoch budget.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub min_improvement: f64,
    /// Sentences (or pairs) per batch.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub batch_size: usize,
    /// Encoders: at most this many padded tokens per batch (batches of long sentences hold fewer
    /// of them; bounds the activations kept for backward). 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 768)]
    pub max_tokens: usize,
    /// Fraction of the lines held out as the validation split.
    #[arg(long, value_name = "F", default_value_t = 0.15)]
    pub valid_fraction: f64,
    /// Encoders: K variants of every training line (a span of its words; it and another line)
    /// join the distillation inputs, labelled by the teacher [default: 2; 0 turns it off]
    #[arg(long, value_name = "K")]
    pub augment: Option<usize>,
    /// Longest input in tokens (longer inputs are truncated; also capped by the model).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub max_len: usize,
    /// Seed of the split and the batch order.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// No progress bars or log lines.
    #[arg(long)]
    pub quiet: bool,
}

/// `--augment` of encoders when not given: measured on all-MiniLM-L6-v2 (docs/PRUNE_HF.md).
pub const AUGMENT_DEFAULT: usize = 2;

/// Everything that defines a run: stored in the checkpoint (resume) and in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// `--model` as given.
    pub model_arg: String,
    /// The resolved local model directory.
    pub model_dir: PathBuf,
    /// `--revision`.
    pub revision: Option<String>,
    /// The architecture (`model_type`).
    pub model_type: String,
    /// `--text`.
    pub text: Option<PathBuf>,
    /// `--data`.
    pub data: Option<Vec<PathBuf>>,
    /// `--eval-text`.
    pub eval_text: Option<PathBuf>,
    /// `--target-sparsity`.
    pub target_sparsity: Option<f64>,
    /// `--max-drop`.
    pub max_drop: Option<f64>,
    /// Sentences per batch.
    pub batch_size: usize,
    /// Padded tokens per encoder batch (0: no limit, as in checkpoints written before it).
    #[serde(default)]
    pub max_tokens: usize,
    /// Held-out fraction.
    pub valid_fraction: f64,
    /// Distillation variants per training line (`--augment`; 0 in checkpoints written before it).
    #[serde(default)]
    pub augment: usize,
    /// Truncation length.
    pub max_len: usize,
    /// Seed.
    pub seed: u64,
    /// Which parameters are pruned.
    pub selection: Selection,
    /// The algorithm's configuration.
    pub prune: PruneConfig,
    /// Fine-tune epochs after the pruning phase (and the final step, if any).
    pub finetune_epochs: usize,
    /// Starting learning rate of that fine-tune.
    pub finetune_lr: f64,
    /// `--sparse`.
    pub sparse: bool,
    /// `--final-step`.
    #[serde(default)]
    pub final_step: FinalStep,
}

/// Runs `relprune prune-hf`.
pub fn run(args: &PruneHfArgs) -> Result<()> {
    memory::return_freed_buffers();
    let t0 = Instant::now();
    let out = absolute(&args.out)?;
    ensure!(
        !out.exists(),
        "output directory {} already exists (prune-hf never overwrites; remove it or pick another)",
        out.display()
    );
    let (cfg, work, resume) = match &args.resume {
        Some(dir) => {
            let saved = relprune_prune::checkpoint::read(dir, &Device::Cpu)
                .with_context(|| format!("cannot resume from {}", dir.display()))?;
            let cfg: Config = serde_json::from_value(saved.journal.run["config"].clone())
                .with_context(|| {
                    format!(
                        "{}: the checkpoint holds no prune-hf configuration",
                        dir.display()
                    )
                })?;
            if !args.quiet {
                eprintln!(
                    "resuming {} in {} after {} epochs",
                    cfg.model_arg,
                    dir.display(),
                    saved.journal.epochs_trained
                );
            }
            (cfg, absolute(dir)?, true)
        }
        None => {
            let cfg = config_from_args(args)?;
            let work = match &args.work {
                Some(w) => absolute(w)?,
                None => sibling(&out, ".relprune-work"),
            };
            if work
                .join(relprune_prune::checkpoint::CHECKPOINT_FILE)
                .exists()
            {
                bail!(
                    "work directory {} holds the checkpoint of an earlier run: pass --resume {} \
                     to continue it, or delete it",
                    work.display(),
                    work.display()
                );
            }
            (cfg, work, false)
        }
    };
    let interrupt_after = match std::env::var(INTERRUPT_ENV) {
        Ok(v) => Some(
            v.parse::<usize>()
                .with_context(|| format!("{INTERRUPT_ENV}={v} is not a number"))?,
        ),
        Err(_) => None,
    };
    let opts = RunOptions {
        out,
        work,
        resume,
        quiet: args.quiet,
        keep_work: args.keep_work,
        interrupt_after,
        t0,
    };
    match cfg.model_type.as_str() {
        "bert" => run_bert(cfg, &opts),
        "marian" | "t5" => seq2seq_task::run(cfg, &opts),
        other => bail!(
            "unsupported model_type {other:?} (supported: {})",
            SUPPORTED.join(", ")
        ),
    }
}

/// How this invocation runs, beside the configuration.
#[derive(Debug)]
pub struct RunOptions {
    /// The final output directory.
    pub out: PathBuf,
    /// The checkpoint directory.
    pub work: PathBuf,
    /// Continue the checkpoint in `work`.
    pub resume: bool,
    /// No progress output.
    pub quiet: bool,
    /// Keep `work` after success.
    pub keep_work: bool,
    /// The interruption test hook.
    pub interrupt_after: Option<usize>,
    /// Start of the run.
    pub t0: Instant,
}

/// The configuration of a fresh run, checked before anything is loaded.
fn config_from_args(args: &PruneHfArgs) -> Result<Config> {
    let model_arg = args
        .model
        .clone()
        .context("--model is required (unless --resume)")?;
    if args.text.is_none() && args.data.is_none() {
        bail!("one of --text FILE (distillation) or --data PAIRS (translation pairs) is required");
    }
    if args.target_sparsity.is_none() && args.max_drop.is_none() {
        bail!("one of --target-sparsity P or --max-drop D is required");
    }
    if let Some(p) = args.target_sparsity {
        ensure!(
            (0.0..1.0).contains(&p),
            "--target-sparsity must be in [0, 1), got {p}"
        );
    }
    if let Some(d) = args.max_drop {
        ensure!(
            d.is_finite() && d >= 0.0,
            "--max-drop must be >= 0, got {d}"
        );
    }
    ensure!(args.batch_size > 0, "--batch-size must be positive");
    ensure!(args.max_len >= 2, "--max-len must be at least 2");
    ensure!(
        args.valid_fraction > 0.0 && args.valid_fraction < 1.0,
        "--valid-fraction must be in (0, 1)"
    );
    let model_dir = resolve_model(&model_arg, args.revision.as_deref())?;
    let model_type = detect_model_type(&model_dir)?;
    let abs = |p: &Option<PathBuf>| p.as_deref().map(absolute).transpose();
    let data = match &args.data {
        Some(v) => Some(v.iter().map(|p| absolute(p)).collect::<Result<Vec<_>>>()?),
        None => None,
    };
    let augment = args.augment.unwrap_or(if model_type == "bert" {
        AUGMENT_DEFAULT
    } else {
        0
    });
    if model_type != "bert" && augment > 0 {
        bail!(
            "--augment makes distillation inputs for encoders (bert); {} is a {model_type} model",
            model_dir.display()
        );
    }
    if model_type == "bert" && data.is_some() {
        bail!(
            "{}: a BERT encoder prunes on plain text (--text FILE); sentence pairs (--data) are \
             for translation models (marian, t5)",
            model_dir.display()
        );
    }
    let selection = Selection {
        include: vec!["*weight".into()],
        min_rank: 2,
        // Position and token-type tables are tiny, used by every input and not tied to a
        // vocabulary: pruning them saves nothing and hurts every sentence. The pooler is not
        // trained by a mean-pooling objective, so pruning it would go unmeasured.
        exclude: vec![
            "*position_embeddings*".into(),
            "*token_type_embeddings*".into(),
            "*relative_attention_bias*".into(),
            "pooler.*".into(),
        ],
        frozen: vec![],
    };
    let mut selection = selection;
    if !args.prune_embeddings {
        selection.exclude.extend(
            [
                "*word_embeddings*",
                "*embed_tokens*",
                "*shared.weight",
                "lm_head.*",
            ]
            .map(String::from),
        );
    }
    if model_type == "bert" && !args.prune_embeddings && !args.train_embeddings {
        selection.frozen = [
            "embeddings.word_embeddings.*",
            "embeddings.position_embeddings.*",
            "embeddings.token_type_embeddings.*",
        ]
        .map(String::from)
        .to_vec();
    }
    let prune = PruneConfig {
        regularizer: SelectiveDecay::lobster(args.lambda),
        lr: args.lr,
        bisection: BisectionConfig {
            scope: Scope::PerLayer,
            criterion: Criterion::Metric {
                tolerance: args.round_tolerance,
            },
            max_metric_worsening: args.max_drop,
            max_evals: 16,
            ..Default::default()
        },
        // Without --max-drop every round is a candidate (any metric is "within" 1e6 units).
        delta: args.max_drop.unwrap_or(1e6),
        patience: args.patience,
        min_improvement: args.min_improvement,
        restore: RestorePoint::LastImprovement,
        judge_retrained: false,
        max_epochs: args.epochs,
        target_sparsity: args.target_sparsity,
        stop_rounds: 3,
        min_round_gain: 0.001,
        // The fine-tune runs after the (optional) final step, outside the engine.
        finetune_epochs: 0,
        finetune_lr: args.finetune_lr,
    };
    Ok(Config {
        model_arg,
        model_dir,
        revision: args.revision.clone(),
        model_type,
        text: abs(&args.text)?,
        data,
        eval_text: abs(&args.eval_text)?,
        target_sparsity: args.target_sparsity,
        max_drop: args.max_drop,
        batch_size: args.batch_size,
        valid_fraction: args.valid_fraction,
        augment,
        max_tokens: args.max_tokens,
        max_len: args.max_len,
        seed: args.seed,
        selection,
        prune,
        finetune_epochs: args.finetune_epochs,
        finetune_lr: args.finetune_lr,
        sparse: args.sparse,
        final_step: args.final_step,
    })
}

/// `p` made absolute (without resolving links), so a resumed run finds its files from anywhere.
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
}

/// `DIR` + `suffix` in the same parent directory.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The local directory of `--model`: an existing directory, else a Hub id through the HF cache.
pub fn resolve_model(arg: &str, revision: Option<&str>) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.is_dir() {
        return absolute(p);
    }
    if p.exists() {
        bail!("--model {arg}: not a directory");
    }
    let looks_like_id = !arg.starts_with(['.', '/', '~'])
        && arg.split('/').count() <= 2
        && !arg.is_empty()
        && !arg.ends_with('/');
    if !looks_like_id {
        bail!("model directory {arg} does not exist");
    }
    use hf_hub::{Repo, RepoType};
    let repo = Repo::with_revision(
        arg.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false);
    let config = if offline {
        hf_hub::Cache::from_env()
            .repo(repo)
            .get("config.json")
            .with_context(|| {
                format!(
                    "{arg} is neither a local directory nor in the Hugging Face cache \
                     (HF_HUB_OFFLINE is set, so nothing is downloaded)"
                )
            })?
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .build()
            .context("cannot set up the Hugging Face Hub client")?;
        let r = api.repo(repo);
        let info = r
            .info()
            .with_context(|| format!("{arg}: not a local directory, and not found on the Hub"))?;
        for s in &info.siblings {
            let name = s.rfilename.as_str();
            let skip = OTHER_WEIGHT_FILES.iter().any(|f| name.ends_with(f))
                || OTHER_WEIGHT_DIRS
                    .iter()
                    .any(|d| name.starts_with(&format!("{d}/")));
            if !skip {
                r.get(name)
                    .with_context(|| format!("cannot download {name} of {arg}"))?;
            }
        }
        r.get("config.json")
            .with_context(|| format!("cannot download config.json of {arg}"))?
    };
    Ok(config
        .parent()
        .context("the cached config.json has no directory")?
        .to_path_buf())
}

/// The `model_type` of `dir/config.json` (falling back to `architectures`), one of [`SUPPORTED`].
pub fn detect_model_type(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let from_arch = || -> Option<String> {
        let archs = value.get("architectures")?.as_array()?;
        archs.iter().filter_map(Value::as_str).find_map(|a| {
            let a = a.to_ascii_lowercase();
            SUPPORTED
                .iter()
                .find(|t| a.starts_with(*t))
                .map(|t| t.to_string())
        })
    };
    let t = match value.get("model_type").and_then(Value::as_str) {
        Some(t) => t.to_string(),
        None => from_arch().with_context(|| {
            format!(
                "{}: no model_type and no recognised architectures (supported: {})",
                path.display(),
                SUPPORTED.join(", ")
            )
        })?,
    };
    if !SUPPORTED.contains(&t.as_str()) {
        bail!(
            "{}: model_type {t:?} is not supported by prune-hf (supported: {})",
            path.display(),
            SUPPORTED.join(", ")
        );
    }
    Ok(t)
}

/// The non-empty lines of a text file.
pub fn read_text(path: &Path) -> Result<Vec<String>> {
    Ok(crate::bleu::read_lines(path, "text")?
        .into_iter()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// A seeded split of `n` items into (train, valid) index lists, valid ≈ `fraction·n` (≥ 1).
pub fn split_indices(n: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    ensure!(
        n >= 2,
        "need at least 2 non-empty lines (one to train on, one to validate), got {n}"
    );
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_valid = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let valid = idx[..n_valid].to_vec();
    let train = idx[n_valid..].to_vec();
    Ok((train, valid))
}

/// Creates a trainer over `varmap` with masked Adam, checkpointed into or resumed from `work`.
pub fn make_trainer<T: Task + ?Sized>(
    cfg: &Config,
    opts: &RunOptions,
    varmap: &VarMap,
    task: &mut T,
) -> Result<Trainer> {
    let params = ParamSet::from_varmap(varmap, &cfg.selection)?;
    let masks = Masks::dense(&params)?;
    let adam = AdamConfig {
        lr: cfg.prune.lr,
        ..Default::default()
    };
    let mut optim = MaskedAdam::new(adam, None)?;
    // A model-sized scratch buffer less between batches, for an allocation per step.
    optim.set_keep_scratch(false);
    let mut trainer = Trainer::new(params, masks, optim)?;
    trainer.quiet = opts.quiet;
    // The fine-tune's best epoch lives in the work directory, not in memory (−1 copy of the
    // trained weights: 44 MB of MiniLM's 91).
    trainer.spill_best = true;
    if opts.resume {
        trainer
            .resume(&opts.work, task)
            .with_context(|| format!("cannot resume from {}", opts.work.display()))?;
    } else {
        trainer
            .checkpoint_into(&opts.work, serde_json::json!({ "config": cfg }))
            .with_context(|| format!("cannot create work directory {}", opts.work.display()))?;
    }
    Ok(trainer)
}

/// What the pruning phases hand to the report.
pub struct Pruned {
    /// The rounds, in the results format.
    pub rounds: Vec<RoundRecord>,
    /// Reference, stop reason, before/after fine-tune, final step.
    pub extra: serde_json::Map<String, Value>,
}

/// How the final step brings every prunable matrix to the target sparsity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FinalStep {
    /// Layer-wise reconstruction (SparseGPT) from the second moment of each layer's inputs on
    /// the training text: choose by `w²/[H⁻¹]ᵢᵢ` and update the survivors. Models that cannot
    /// report their layer inputs (Marian, T5 for now) use magnitude.
    #[default]
    Reconstruct,
    /// The smallest magnitudes of each matrix.
    Magnitude,
}

/// Computes the input second moments of the named linear layers on the task's training data.
pub type Calibrate<'a, T> =
    &'a mut dyn FnMut(&mut T, &[String]) -> relprune_prune::Result<BTreeMap<String, Gram>>;

/// The method, then (target mode) a final per-layer step to the target (reconstruction where
/// `calibrate` is given and asked for, else magnitude), then the fine-tune; leaves the result in
/// the trainer.
pub fn prune_phases<T: Task + ?Sized>(
    cfg: &Config,
    trainer: &mut Trainer,
    task: &mut T,
    mut calibrate: Option<Calibrate<'_, T>>,
) -> Result<Pruned> {
    let mut memory = serde_json::Map::new();
    memory::mark(&mut memory, "loaded");
    let outcome = IterativePruning::new(cfg.prune.clone())?.run(trainer, task)?;
    let (rounds, mut extra) = relprune_eval::phase_report(&outcome);
    extra.extend(memory);
    memory::mark(&mut extra, "pruning rounds");
    // Without a metric budget the target is a promise: whatever the rounds reached, every
    // prunable matrix is brought to at least the target (then fine-tuned).
    if let (Some(target), None) = (cfg.target_sparsity, cfg.max_drop) {
        let reconstruct = cfg.final_step == FinalStep::Reconstruct;
        let calibrate = calibrate.as_mut().filter(|_| reconstruct);
        let step = trainer.once("final step", |trainer| {
            let before = 1.0 - trainer.masks.remaining_fraction()?;
            let method = match calibrate {
                Some(calibrate) => {
                    let names: Vec<String> =
                        trainer.params.prunable().map(|p| p.name.clone()).collect();
                    // Layer by layer in forward order (SparseGPT's sequential mode): a layer's
                    // inputs come from the layers before it as pruned, and only one layer's
                    // statistics are in memory at a time.
                    for group in layer_groups(&names) {
                        let grams = calibrate(task, &group)?;
                        reconstruct_per_layer(trainer, &grams, target)?;
                    }
                    "reconstruct"
                }
                None => "magnitude",
            };
            // Whatever reconstruction did not cover (no calibration inputs) goes by magnitude.
            let pruned = top_up_per_layer(trainer, target)?;
            trainer.optim.reset_state();
            let valid = trainer.evaluate(task, Split::Valid)?;
            Ok(serde_json::json!({
                "method": method,
                "sparsity_before": before,
                "sparsity_after": 1.0 - trainer.masks.remaining_fraction()?,
                "weights_pruned_by_magnitude": pruned,
                "valid": valid,
            }))
        })?;
        extra.insert("final_step".into(), step);
        memory::mark(&mut extra, "final step");
    }
    trainer.optim.set_regularizer(None)?;
    let schedule = LrSchedule::Cosine {
        lr: cfg.finetune_lr,
        epochs: cfg.finetune_epochs,
    };
    trainer.fit(task, schedule, cfg.finetune_epochs, true, "final fine-tune")?;
    memory::mark(&mut extra, "fine-tune");
    // Adam's moments are the largest state left; the output is written without them.
    trainer.optim.reset_state();
    trainer.masks.apply(&trainer.params)?;
    extra.insert(
        "valid_after_finetune".into(),
        serde_json::to_value(trainer.evaluate(task, Split::Valid)?)?,
    );
    Ok(Pruned { rounds, extra })
}

/// `names` grouped by layer in forward order: a layer is the prefix up to the first numeric path
/// segment (`encoder.layer.3`), groups ordered by that number within the same stem; names with
/// no number form a group each, after the numbered ones.
pub fn layer_groups(names: &[String]) -> Vec<Vec<String>> {
    let mut groups: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        let key = match parts.iter().position(|p| p.parse::<u64>().is_ok()) {
            Some(i) => (parts[..i].join("."), parts[i].parse().unwrap_or(0)),
            None => (name.clone(), u64::MAX),
        };
        groups.entry(key).or_default().push(name.clone());
    }
    let (mut numbered, single): (Vec<_>, Vec<_>) =
        groups.into_iter().partition(|((_, n), _)| *n != u64::MAX);
    numbered.extend(single);
    numbered.into_iter().map(|(_, g)| g).collect()
}

/// The mask of prunable parameter `name` (every prunable parameter has one).
fn mask_of<'a>(masks: &'a Masks, name: &str) -> relprune_prune::Result<&'a Tensor> {
    masks.get(name).ok_or_else(|| relprune_prune::Error::Param {
        name: name.to_string(),
        msg: "prunable but has no mask".into(),
    })
}

/// Brings every prunable matrix that has calibration statistics in `grams` to at least `target`
/// sparsity by reconstruction pruning ([`obs_prune`]); the others are left as they are.
fn reconstruct_per_layer(
    trainer: &mut Trainer,
    grams: &BTreeMap<String, Gram>,
    target: f64,
) -> relprune_prune::Result<()> {
    let mut masks = BTreeMap::new();
    for p in trainer.params.prunable() {
        let m = mask_of(&trainer.masks, &p.name)?;
        let new_mask = match grams.get(&p.name) {
            Some(g) if g.rows() > 0 => {
                let r = obs_prune(
                    p.var.as_tensor(),
                    m,
                    &g.mean()?,
                    target,
                    &ObsConfig::default(),
                )
                .map_err(|e| relprune_prune::Error::Param {
                    name: p.name.clone(),
                    msg: e.to_string(),
                })?;
                p.var.set(&r.weight)?;
                r.mask
            }
            _ => m.clone(),
        };
        masks.insert(p.name.clone(), new_mask);
    }
    trainer.masks = Masks::from_tensors(masks)?;
    trainer.masks.apply(&trainer.params)?;
    Ok(())
}

/// Prunes, in every prunable tensor sparser than `1 − target` alive, its smallest alive
/// magnitudes until exactly `round(target·n)` of its `n` elements are pruned; returns how many
/// weights it pruned.
fn top_up_per_layer(trainer: &mut Trainer, target: f64) -> relprune_prune::Result<usize> {
    let mut masks = BTreeMap::new();
    let mut pruned = 0usize;
    for p in trainer.params.prunable() {
        let m = mask_of(&trainer.masks, &p.name)?;
        let mut mv = m.flatten_all()?.to_vec1::<f32>()?;
        let w = p
            .var
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let n = mv.len();
        let want = (target * n as f64).round() as usize;
        let already = mv.iter().filter(|&&x| x == 0.0).count();
        if want > already {
            let mut alive: Vec<(f32, usize)> = mv
                .iter()
                .zip(&w)
                .enumerate()
                .filter(|(_, (&m, _))| m != 0.0)
                .map(|(i, (_, &w))| (w.abs(), i))
                .collect();
            let k = want - already;
            alive.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(_, i) in &alive[..k] {
                mv[i] = 0.0;
            }
            pruned += k;
        }
        masks.insert(p.name.clone(), Tensor::from_vec(mv, m.shape(), m.device())?);
    }
    trainer.masks = Masks::from_tensors(masks)?;
    trainer.masks.apply(&trainer.params)?;
    Ok(pruned)
}

/// Copies every file of `src` into `dst` (recursively) except the weights and other frameworks'
/// dense weight files; returns the names skipped.
pub fn copy_model_files(src: &Path, dst: &Path, weights: &str) -> Result<Vec<String>> {
    let mut skipped = Vec::new();
    copy_dir(src, dst, src, weights, &mut skipped)?;
    Ok(skipped)
}

fn copy_dir(
    root: &Path,
    dst: &Path,
    dir: &Path,
    weights: &str,
    skipped: &mut Vec<String>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let rel_s = rel.to_string_lossy().to_string();
        let name = e.file_name().to_string_lossy().to_string();
        // Follows links: the HF cache's snapshot directories are links into its blob store.
        let meta =
            std::fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            if dir == root && (OTHER_WEIGHT_DIRS.contains(&name.as_str()) || name.starts_with('.'))
            {
                skipped.push(rel_s + "/");
                continue;
            }
            std::fs::create_dir_all(dst.join(&rel))?;
            copy_dir(root, dst, &path, weights, skipped)?;
        } else if dir == root && (name == weights || name.starts_with('.')) {
            continue;
        } else if OTHER_WEIGHT_FILES.contains(&name.as_str())
            || name.starts_with("pytorch_model-")
            || (dir == root && name.starts_with("model.") && name.ends_with(".safetensors"))
        {
            skipped.push(rel_s);
        } else {
            std::fs::copy(&path, dst.join(&rel))
                .with_context(|| format!("cannot copy {} to {}", path.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// One tensor of the output file: a trained variable (converted to the input's dtype) or an
/// input tensor copied byte for byte.
enum OutTensor<'a> {
    Trained(Tensor),
    Copied(safetensors::tensor::TensorView<'a>),
}

impl safetensors::View for OutTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Self::Trained(t) => safetensors::View::dtype(t),
            Self::Copied(v) => v.dtype(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Self::Trained(t) => t.dims(),
            Self::Copied(v) => v.shape(),
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Self::Trained(t) => safetensors::View::data(t),
            Self::Copied(v) => std::borrow::Cow::Borrowed(v.data()),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Self::Trained(t) => safetensors::View::data_len(t),
            Self::Copied(v) => v.data().len(),
        }
    }
}

/// What [`write_like_input`] wrote.
#[derive(Debug, Default)]
pub struct Written {
    /// Output (= input) tensor name → the parameter written there.
    pub trained: BTreeMap<String, String>,
    /// Input tensors the model does not use, copied unchanged.
    pub copied: Vec<String>,
}

/// The safetensors header metadata (`__metadata__`) of `path`, read without loading tensors.
fn header_metadata(path: &Path) -> Result<Option<HashMap<String, String>>> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let n = u64::from_le_bytes(len);
    ensure!(
        n < 100_000_000,
        "{}: safetensors header of {n} bytes",
        path.display()
    );
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: Value = serde_json::from_slice(&buf)
        .with_context(|| format!("{}: the safetensors header is not JSON", path.display()))?;
    Ok(v.get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok()))
}

/// Writes `out` with exactly the tensors of `input` (names, shapes, dtypes, metadata): each
/// tensor the model holds as a variable (found through `lookup`, which maps a file name to the
/// variable's name) gets its trained value, converted to the stored dtype, with `+0.0` for
/// pruned weights; any other tensor is copied byte for byte.
pub fn write_like_input(
    input: &Path,
    out: &Path,
    varmap: &VarMap,
    lookup: impl Fn(&str) -> Vec<String>,
) -> Result<Written> {
    // SAFETY: read-only map of the input, which this process does not write; only read while
    // this function runs.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(input) }
        .with_context(|| format!("{}: not a valid safetensors file", input.display()))?;
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .clone();
    let mut written = Written::default();
    let mut tensors: Vec<(String, OutTensor)> = Vec::new();
    let mut names = st.tensors();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in names {
        let var_name = lookup(&name).into_iter().find(|c| vars.contains_key(c));
        match var_name {
            Some(v) => {
                let t = vars[&v].as_tensor();
                ensure!(
                    t.dims() == view.shape(),
                    "tensor `{name}`: the model's variable `{v}` has shape {:?}, {} stores {:?}",
                    t.dims(),
                    input.display(),
                    view.shape()
                );
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    safetensors::Dtype::F64 => DType::F64,
                    other => bail!("tensor `{name}` of {}: dtype {other:?}", input.display()),
                };
                // `w·0` of a negative weight is `-0.0`: store `+0.0`, as the engine's export does.
                let zero = t.zeros_like()?;
                let t = t.ne(0.0)?.where_cond(t, &zero)?.to_dtype(dtype)?;
                written.trained.insert(name.clone(), v);
                tensors.push((name, OutTensor::Trained(t)));
            }
            None => {
                written.copied.push(name.clone());
                tensors.push((name, OutTensor::Copied(view)));
            }
        }
    }
    let metadata = header_metadata(input)?;
    relprune_io::write_with(out, |tmp| {
        safetensors::serialize_to_file(tensors, metadata, tmp)
    })?;
    Ok(written)
}

/// The report group of every prunable tensor but the embeddings (the sparsity goal's figure).
const LINEAR_GROUP: &str = "linear (all but embeddings)";

/// The layer type of a prunable tensor, for the report.
pub fn layer_type(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    if n.contains("embed") || n.contains("shared") || n.contains("lm_head") {
        "embeddings"
    } else if n.contains("attention") || n.contains("attn") {
        "attention"
    } else {
        "feed-forward"
    }
}

/// Everything the output directory's report needs beyond the trainer.
pub struct ReportInput<'a> {
    /// The run configuration.
    pub cfg: &'a Config,
    /// The rounds and extras of the pruning phases.
    pub pruned: Pruned,
    /// Metric of the dense model and of the pruned one on the reported split.
    pub dense_metric: f64,
    /// Metric of the pruned model.
    pub pruned_metric: f64,
    /// The metric's name and direction.
    pub metric: relprune_prune::MetricSpec,
    /// Dataset description.
    pub dataset: DatasetInfo,
    /// The input weights file.
    pub input_weights: &'a Path,
}

/// Writes `model.safetensors` (like the input), the sparse format if asked, the copied files,
/// `relprune_report.json` and `report.md` into `stage`; returns the results.
pub fn write_output(
    stage: &Path,
    trainer: &Trainer,
    varmap: &VarMap,
    lookup: impl Fn(&str) -> Vec<String>,
    r: ReportInput,
    t0: Instant,
) -> Result<RunResults> {
    let weights = "model.safetensors";
    let skipped = copy_model_files(&r.cfg.model_dir, stage, weights)?;
    let model_path = stage.join(weights);
    let written = write_like_input(r.input_weights, &model_path, varmap, lookup)?;
    let sparse_path = stage.join("model.sparse.safetensors");
    if r.cfg.sparse {
        export::save_sparse(&trainer.params, &sparse_path)?;
    }
    // Judge the file: count the zeros of each prunable parameter where it is stored (once per
    // variable, under its first stored name).
    let prunable: BTreeMap<&str, ()> = trainer
        .params
        .prunable()
        .map(|p| (p.name.as_str(), ()))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut names = Vec::new();
    for (file_name, var) in &written.trained {
        let canonical = trainer
            .params
            .iter()
            .find(|p| p.name == *var || p.aliases.contains(var))
            .map(|p| p.name.clone())
            .unwrap_or_else(|| var.clone());
        if prunable.contains_key(canonical.as_str()) && seen.insert(canonical) {
            names.push(file_name.clone());
        }
    }
    let report = SparsityReport::from_safetensors(&model_path, &names)?;
    let total = report.total();
    let (_, alive) = trainer.masks.totals()?;
    ensure!(
        total.nonzero <= alive,
        "the model file has {} non-zeros in prunable tensors but the masks allow only {alive}",
        total.nonzero
    );
    // By layer type, plus every linear layer together: the figure the sparsity goal is about.
    let by_type = relprune_eval::sum_by_group(&report.layers, |name| {
        let t = layer_type(name);
        std::iter::once(t).chain((t != "embeddings").then_some(LINEAR_GROUP))
    });
    let sizes = relprune_eval::sizes::compressed_sizes(&model_path)?;
    let dense_sizes = relprune_eval::sizes::compressed_sizes(r.input_weights)?;
    let mut extra = r.pruned.extra;
    extra.insert(
        "dense_sizes_bytes".into(),
        serde_json::json!({"raw": dense_sizes.raw, "gzip": dense_sizes.gzip9, "bzip2": dense_sizes.bzip2_9}),
    );
    extra.insert(
        "copied_unchanged_tensors".into(),
        serde_json::to_value(&written.copied)?,
    );
    extra.insert("skipped_files".into(), serde_json::to_value(&skipped)?);
    extra.insert(
        "model_dir".into(),
        r.cfg.model_dir.to_string_lossy().to_string().into(),
    );
    let results = RunResults {
        experiment: format!("prune-hf {}", r.cfg.model_arg),
        dataset: r.dataset,
        metric: r.metric.name.clone(),
        higher_is_better: r.metric.higher_is_better,
        dense: MetricValue {
            value: r.dense_metric,
        },
        pruned: PrunedSummary::new(r.pruned_metric, &total),
        layers: report.layers.clone(),
        layer_groups: by_type.into_values().collect(),
        sizes_bytes: SizesBytes {
            dense_safetensors: dense_sizes.raw,
            pruned_safetensors: sizes.raw,
            pruned_gzip: sizes.gzip9,
            pruned_bzip2: sizes.bzip2_9,
            sparse_format: if r.cfg.sparse {
                std::fs::metadata(&sparse_path)?.len()
            } else {
                0
            },
        },
        model_file: weights.into(),
        wall_seconds: t0.elapsed().as_secs_f64(),
        config: serde_json::to_value(r.cfg)?,
        rounds: r.pruned.rounds,
        extra,
    };
    results.write_json(&stage.join("relprune_report.json"))?;
    let mut md = String::new();
    md.push_str(&format!("# prune-hf `{}`\n\n", r.cfg.model_arg));
    md.push_str(&format!(
        "{} ({}): dense **{:.4}** → pruned **{:.4}** on {} {} sentences.\n\n",
        results.metric,
        if results.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        },
        r.dense_metric,
        r.pruned_metric,
        results.dataset.test.max(results.dataset.valid),
        if results.dataset.test > 0 {
            "held-out test"
        } else {
            "validation"
        },
    ));
    md.push_str("| layer type | params | non-zero | sparsity |\n|---|---:|---:|---:|\n");
    for g in &results.layer_groups {
        md.push_str(&format!(
            "| {} | {} | {} | {:.2}% |\n",
            g.name,
            g.params,
            g.nonzero,
            g.sparsity_pct()
        ));
    }
    md.push_str(&format!(
        "| all prunable | {} | {} | {:.2}% |\n\n",
        total.params,
        total.nonzero,
        total.sparsity_pct()
    ));
    md.push_str(&format!(
        "Sizes: dense {} B (gzip -9 {} B, bzip2 -9 {} B) → pruned {} B (gzip -9 {} B, bzip2 -9 {} B){}.\n\n",
        dense_sizes.raw,
        dense_sizes.gzip9,
        dense_sizes.bzip2_9,
        sizes.raw,
        sizes.gzip9,
        sizes.bzip2_9,
        if r.cfg.sparse {
            format!(", sparse format {} B", results.sizes_bytes.sparse_format)
        } else {
            String::new()
        }
    ));
    md.push_str(&relprune_eval::render_markdown(&results, None));
    md.push('\n');
    relprune_io::write(&stage.join("report.md"), md.as_bytes())?;
    Ok(results)
}

/// Loads the BERT directory into `varmap` after the checks `prune-hf` promises (tokenizer fits).
fn load_bert_checked(dir: &Path, varmap: &VarMap) -> Result<(BertModel, TextTokenizer)> {
    let model = BertModel::load_into(varmap, dir, &Device::Cpu)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = TextTokenizer::from_file(&tok_path)?;
    tokenizer
        .check_vocab(model.config().vocab_size)
        .with_context(|| {
            format!(
                "{}: the tokenizer does not fit the model",
                tok_path.display()
            )
        })?;
    Ok((model, tokenizer))
}

/// The BERT name of a stored tensor: without a `bert.` prefix, `gamma`/`beta` as weight/bias.
fn bert_lookup(name: &str) -> Vec<String> {
    let base = name.strip_prefix("bert.").unwrap_or(name);
    let mut out = vec![name.to_string(), base.to_string()];
    if let Some(b) = base.strip_suffix("LayerNorm.gamma") {
        out.push(format!("{b}LayerNorm.weight"));
    }
    if let Some(b) = base.strip_suffix("LayerNorm.beta") {
        out.push(format!("{b}LayerNorm.bias"));
    }
    out
}

/// Encodes and truncates lines.
fn encode_lines(tok: &TextTokenizer, lines: &[&String], max_len: usize) -> Result<Vec<Vec<u32>>> {
    lines
        .iter()
        .map(|s| Ok(crate::embed::truncate(tok.encode(s)?, max_len)))
        .collect()
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

/// The encoder path: distillation of a BERT model against itself on `--text`.
fn run_bert(cfg: Config, opts: &RunOptions) -> Result<()> {
    let text = cfg
        .text
        .clone()
        .context("a BERT encoder prunes on plain text: pass --text FILE")?;
    let varmap = VarMap::new();
    let (model, tok) = load_bert_checked(&cfg.model_dir, &varmap)?;
    let max_len = crate::embed::max_length(&cfg.model_dir, model.config().max_position_embeddings)?
        .min(cfg.max_len);
    let lines = read_text(&text)?;
    let (train_idx, valid_idx) = split_indices(lines.len(), cfg.valid_fraction, cfg.seed)?;
    let pick = |idx: &[usize]| idx.iter().map(|&i| &lines[i]).collect::<Vec<_>>();
    let mut train_lines = pick(&train_idx);
    let strs: Vec<&str> = train_lines.iter().map(|s| s.as_str()).collect();
    let extra = augment::variants(&strs, cfg.augment, cfg.seed);
    train_lines.extend(extra.iter());
    let train = Sentences::new(
        encode_lines(&tok, &train_lines, max_len)?,
        cfg.batch_size,
        cfg.max_tokens,
    );
    let valid = Sentences::new(
        encode_lines(&tok, &pick(&valid_idx), max_len)?,
        cfg.batch_size,
        cfg.max_tokens,
    );
    let test = match &cfg.eval_text {
        Some(p) => {
            let l = read_text(p)?;
            ensure!(!l.is_empty(), "eval text file {} has no lines", p.display());
            let refs: Vec<&String> = l.iter().collect();
            Some(Sentences::new(
                encode_lines(&tok, &refs, max_len)?,
                cfg.batch_size,
                cfg.max_tokens,
            ))
        }
        None => None,
    };
    let mut model = model;
    if cfg.selection.is_frozen("embeddings.word_embeddings.weight") {
        model.freeze_embeddings();
    }
    let pad = tok.pad_id().or(model.config().pad_token_id).unwrap_or(0);
    let n_test = test.as_ref().map_or(0, Sentences::len);
    let dataset = DatasetInfo {
        name: text
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        train: train.len(),
        valid: valid.len(),
        test: n_test,
    };
    let bar = item_bar(
        (train.len() + valid.len() + n_test) as u64,
        "teacher",
        opts.quiet,
    );
    let mut task = EncoderDistill::new(model, train, valid, test, pad, cfg.seed, &bar)?;
    bar.finish_and_clear();
    task.interrupt_after = opts.interrupt_after;
    let mut trainer = make_trainer(&cfg, opts, &varmap, &mut task)?;
    let bar = item_bar(task.train.len() as u64, "calibration", opts.quiet);
    let mut calibrate = |task: &mut EncoderDistill, names: &[String]| {
        bar.reset();
        let grams = task.input_grams(names, &bar);
        bar.finish_and_clear();
        grams
    };
    let all_f32 = trainer.params.iter().all(|p| p.var.dtype() == DType::F32);
    let input_weights = cfg.model_dir.join("model.safetensors");
    let exact = all_f32 && header_is_f32(&input_weights)?;
    let out = Output {
        varmap: &varmap,
        lookup: bert_lookup,
        // The dense model is the teacher: its cosine with itself is 1 by definition.
        dense_metric: 1.0,
        dataset,
    };
    // The written directory must load and compute what the trained model computes.
    let verify = |dir: &Path, task: EncoderDistill, trained: Evaluation| {
        let check = VarMap::new();
        let reloaded = BertModel::load_into(&check, dir, &Device::Cpu)
            .context("the written model does not load back")?;
        let back = task.with_model(reloaded).evaluate(Split::Test)?;
        if exact {
            ensure!(
                (back.metric - trained.metric).abs() < 1e-5,
                "the written model's cosine ({}) differs from the trained model's ({})",
                back.metric,
                trained.metric
            );
        }
        Ok(())
    };
    let calibrate: Calibrate<'_, EncoderDistill> = &mut calibrate;
    prune_and_write(&cfg, opts, &mut trainer, task, out, Some(calibrate), verify)
}

/// What an architecture hands to the shared ending of a run.
pub struct Output<'a> {
    /// The variables the trainer updates, as the model's loader named them.
    pub varmap: &'a VarMap,
    /// Maps a stored tensor name to the loader names it may have.
    pub lookup: fn(&str) -> Vec<String>,
    /// The dense model's metric on the reported split.
    pub dense_metric: f64,
    /// Dataset description.
    pub dataset: DatasetInfo,
}

/// The ending every architecture shares: the pruning phases, the test evaluation, the output
/// written into a staging directory, `verify(stage, task, test evaluation)` on it, then the
/// directory committed to `--out` and the summary printed. Nothing reaches `--out` unless
/// `verify` passes.
pub fn prune_and_write<T: Task>(
    cfg: &Config,
    opts: &RunOptions,
    trainer: &mut Trainer,
    mut task: T,
    out: Output<'_>,
    calibrate: Option<Calibrate<'_, T>>,
    verify: impl FnOnce(&Path, T, Evaluation) -> Result<()>,
) -> Result<()> {
    let pruned = prune_phases(cfg, trainer, &mut task, calibrate)?;
    let test_eval = trainer.evaluate(&mut task, Split::Test)?;
    let stage = relprune_io::StagingDir::new(&opts.out)?;
    let input_weights = cfg.model_dir.join("model.safetensors");
    let results = write_output(
        stage.path(),
        trainer,
        out.varmap,
        out.lookup,
        ReportInput {
            cfg,
            pruned,
            dense_metric: out.dense_metric,
            pruned_metric: test_eval.metric,
            metric: task.metric(),
            dataset: out.dataset,
            input_weights: &input_weights,
        },
        opts.t0,
    )?;
    verify(stage.path(), task, test_eval)?;
    stage.commit(&opts.out)?;
    finish(opts, &results)
}

/// Whether every floating tensor of a safetensors file is f32 (then the reload must match exactly).
fn header_is_f32(path: &Path) -> Result<bool> {
    // SAFETY: read-only map, only read within this function.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }?;
    Ok(st.tensors().iter().all(|(_, v)| {
        !matches!(
            v.dtype(),
            safetensors::Dtype::F16 | safetensors::Dtype::BF16
        )
    }))
}

/// Prints the summary and removes the work directory.
pub fn finish(opts: &RunOptions, results: &RunResults) -> Result<()> {
    if !opts.keep_work {
        std::fs::remove_dir_all(&opts.work)
            .with_context(|| format!("cannot remove work directory {}", opts.work.display()))?;
    }
    let linear = results
        .layer_groups
        .iter()
        .find(|g| g.name == LINEAR_GROUP)
        .map_or(f64::NAN, LayerStats::sparsity_pct);
    let peak = memory::rss_mb()
        .map(|(_, peak)| format!("; peak RSS {peak:.0} MB"))
        .unwrap_or_default();
    println!(
        "{}: {} {:.4} → {:.4}; prunable weights {:.2}% zero (linear layers {:.2}%); {:.0} s{peak}",
        opts.out.display(),
        results.metric,
        results.dense.value,
        results.pruned.value,
        100.0 - results.pruned.remaining_pct,
        linear,
        results.wall_seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_groups_follow_the_forward_order_of_numbered_layers() {
        let names: Vec<String> = [
            "encoder.layer.10.output.dense.weight",
            "encoder.layer.2.attention.self.query.weight",
            "lm_head.weight",
            "encoder.layer.2.output.dense.weight",
            "encoder.layer.0.intermediate.dense.weight",
        ]
        .map(String::from)
        .to_vec();
        let groups = layer_groups(&names);
        let firsts: Vec<&str> = groups.iter().map(|g| g[0].as_str()).collect();
        assert_eq!(
            firsts,
            [
                "encoder.layer.0.intermediate.dense.weight",
                "encoder.layer.2.attention.self.query.weight",
                "encoder.layer.10.output.dense.weight",
                "lm_head.weight",
            ]
        );
        assert_eq!(groups[1].len(), 2);
    }

    #[test]
    fn stored_bert_names_map_to_the_loader_names() {
        assert!(
            bert_lookup("bert.encoder.layer.0.attention.output.LayerNorm.gamma")
                .contains(&"encoder.layer.0.attention.output.LayerNorm.weight".to_string())
        );
        assert_eq!(bert_lookup("pooler.dense.bias")[0], "pooler.dense.bias");
    }

    #[test]
    fn layer_types_follow_the_tensor_names() {
        assert_eq!(
            layer_type("encoder.layer.0.attention.self.query.weight"),
            "attention"
        );
        assert_eq!(
            layer_type("model.encoder.layers.1.self_attn.k_proj.weight"),
            "attention"
        );
        assert_eq!(
            layer_type("encoder.block.0.layer.0.SelfAttention.q.weight"),
            "attention"
        );
        assert_eq!(
            layer_type("encoder.layer.0.intermediate.dense.weight"),
            "feed-forward"
        );
        assert_eq!(
            layer_type("embeddings.word_embeddings.weight"),
            "embeddings"
        );
        assert_eq!(layer_type("shared.weight"), "embeddings");
    }

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

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        let e = resolve_model("./no/such/dir", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}
