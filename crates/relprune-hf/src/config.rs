//! What a prune-hf run is given ([`Options`], also the command line's flags with feature `cli`)
//! and what it runs with ([`Config`]: checked, the model resolved, the preset and the overrides
//! applied; stored in the checkpoint for `--resume` and in the report).

use std::path::PathBuf;

use relprune_core::SelectiveDecay;
use relprune_models::hf::{detect, Architecture, Kind};
use relprune_prune::threshold::{BisectionConfig, Criterion, Scope};
use relprune_prune::{PruneConfig, RestorePoint, Selection};
use relprune_tasks::EngineArgs;
use serde::{Deserialize, Serialize};

use crate::compress::CheckpointFormat;
use crate::error::{invalid, Result};
use crate::llm::{Method, Pattern};
use crate::resolve::{absolute, resolve};

/// `--augment` of encoders when not given: measured on all-MiniLM-L6-v2 (docs/PRUNE_HF.md).
pub const AUGMENT_DEFAULT: usize = 2;
/// `--vocab-augment` of encoders when not given.
pub const VOCAB_AUGMENT_DEFAULT: usize = 8;
/// Sentences (or pairs) per batch.
pub const BATCH_SIZE: usize = 16;
/// Padded tokens per encoder batch.
pub const MAX_TOKENS: usize = 768;
/// Fraction of the lines held out for validation.
pub const VALID_FRACTION: f64 = 0.15;
/// Longest input in tokens.
pub const MAX_LEN: usize = 128;
/// Encoders, `--final-step distill`: distillation passes per layer.
pub const LAYER_EPOCHS: usize = 4;
/// Encoders, `--final-step distill`: their learning rate.
pub const LAYER_LR: f64 = 3e-4;
/// Decoder LMs: calibration windows (the pruning literature's 16…128; 16 are the anchors').
pub const CALIB_WINDOWS: usize = 16;
/// Decoder LMs: tokens per window.
pub const WINDOW: usize = 512;

/// How the final step brings every prunable matrix to the target sparsity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum FinalStep {
    /// Layer-wise reconstruction (SparseGPT) from the second moment of each layer's inputs on
    /// the training text: choose by `w²/[H⁻¹]ᵢᵢ` and update the survivors. Models that cannot
    /// report their layer inputs (Marian, T5 for now) use magnitude.
    #[default]
    Reconstruct,
    /// The smallest magnitudes of each matrix.
    Magnitude,
    /// Encoders: Wanda (`|W_ij|·‖X_j‖₂`, per output row) layer by layer on the training text,
    /// no weight update (a comparison row).
    Wanda,
    /// Encoders: layer by layer, SparseGPT's step then the layer distilled towards the dense
    /// layer's token-level outputs (`--layer-epochs` passes at `--layer-lr`; its weights,
    /// biases and layer norms), each layer on the outputs of the pruned layers below.
    Distill,
}

impl FinalStep {
    /// The flag's value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reconstruct => "reconstruct",
            Self::Magnitude => "magnitude",
            Self::Wanda => "wanda",
            Self::Distill => "distill",
        }
    }
}

/// `--final-step distill`'s per-layer distillation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerDistill {
    /// Passes over the training sentences per layer.
    pub epochs: usize,
    /// Adam's learning rate.
    pub lr: f64,
}

impl Default for LayerDistill {
    fn default() -> Self {
        Self {
            epochs: LAYER_EPOCHS,
            lr: LAYER_LR,
        }
    }
}

/// What a run is asked to do, before any check.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Options {
    /// A local model directory (`config.json`, `model.safetensors`, `tokenizer.json`), or a
    /// Hugging Face Hub id resolved through the HF cache (`HF_HOME`, `HF_HUB_OFFLINE=1`). An
    /// existing local directory always wins. Not needed with `--resume`.
    #[cfg_attr(feature = "cli", arg(long, value_name = "ID_OR_DIR"))]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) of a Hub id.
    #[cfg_attr(feature = "cli", arg(long, value_name = "REV"))]
    pub revision: Option<String>,
    /// Sentence pairs for translation models: one TSV file, or two line-aligned files
    /// (source, then target).
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "PAIRS", num_args = 1..=2, conflicts_with = "text")
    )]
    pub data: Option<Vec<PathBuf>>,
    /// Plain text, one sentence per line: distillation against the dense model itself.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub text: Option<PathBuf>,
    /// Held-out sentences (same format as --text / the first --data file) used only for the
    /// report's test figures; default: the validation split is reported.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub eval_text: Option<PathBuf>,
    /// Stop at this fraction of zero prunable weights (e.g. 0.5); every prunable matrix ends at
    /// least this sparse.
    #[cfg_attr(feature = "cli", arg(long, value_name = "P"))]
    pub target_sparsity: Option<f64>,
    /// Stop when the validation metric dropped by more than D (metric units: cosine for encoders,
    /// BLEU otherwise); the result is the sparsest round within D.
    #[cfg_attr(feature = "cli", arg(long, value_name = "D"))]
    pub max_drop: Option<f64>,
    /// Also write the compact sparse format (`model.sparse.safetensors`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub sparse: bool,
    /// How `model.safetensors` is written: dense (zeros in place, what every tool reads),
    /// sparse-bitmask (compressed-tensors' format, announced in config.json) or relprune-sparse
    /// (relprune's own); `relprune decompress` turns either back into the dense files.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = CheckpointFormat::Dense))]
    pub format: CheckpointFormat,
    /// Also prune the token embeddings (and a tied or separate LM head). Off by default: only
    /// rows of tokens that occur in the pruning data get a gradient, so the rest of a large
    /// vocabulary would be pruned by magnitude alone, blind to what the model does with them.
    #[cfg_attr(feature = "cli", arg(long))]
    pub prune_embeddings: bool,
    /// Also train the embedding tables an encoder does not prune. Off by default: a few hundred
    /// sentences cannot teach a vocabulary-sized table much, and leaving them frozen saves their
    /// gradients, optimizer state and snapshots (about half of MiniLM's memory).
    #[cfg_attr(feature = "cli", arg(long))]
    pub train_embeddings: bool,
    /// How the step after the method brings every matrix to --target-sparsity, layer by layer
    /// from the layer inputs on the training text (encoders): distill, reconstruct (SparseGPT),
    /// wanda; or magnitude [default: distill for encoders, magnitude for translation models]
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub final_step: Option<FinalStep>,
    /// Encoders, --final-step distill: distillation passes over the training sentences per layer.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", default_value_t = LAYER_EPOCHS))]
    pub layer_epochs: usize,
    /// Encoders, --final-step distill: Adam's learning rate of the per-layer distillation.
    #[cfg_attr(feature = "cli", arg(long, value_name = "LR", default_value_t = LAYER_LR))]
    pub layer_lr: f64,
    /// Sentences (or pairs) per batch.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", default_value_t = BATCH_SIZE))]
    pub batch_size: usize,
    /// Encoders: at most this many padded tokens per batch (batches of long sentences hold fewer
    /// of them; bounds the activations kept for backward). 0: no limit.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", default_value_t = MAX_TOKENS))]
    pub max_tokens: usize,
    /// Fraction of the lines held out as the validation split.
    #[cfg_attr(feature = "cli", arg(long, value_name = "F", default_value_t = VALID_FRACTION))]
    pub valid_fraction: f64,
    /// Encoders: K variants of every training line (a span of its words; it and another line)
    /// join the distillation inputs, labelled by the teacher [default: 2; 0 turns it off]
    #[cfg_attr(feature = "cli", arg(long, value_name = "K"))]
    pub augment: Option<usize>,
    /// Encoders: K more variants of every training line with 30–60% of its words replaced by
    /// whole words of the tokenizer's vocabulary (inputs beyond the text's own domain)
    /// [default: 8; 0 turns it off]
    #[cfg_attr(feature = "cli", arg(long, value_name = "K"))]
    pub vocab_augment: Option<usize>,
    /// Longest input in tokens (longer inputs are truncated; also capped by the model).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", default_value_t = MAX_LEN))]
    pub max_len: usize,
    /// Seed of the split and the batch order (decoder LMs: of the calibration windows' starts).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", default_value_t = 1))]
    pub seed: u64,
    /// Decoder LMs: the method, or a one-shot baseline to compare with.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = Method::Relprune))]
    pub method: Method,
    /// Decoder LMs: the sparsity pattern (unstructured at --target-sparsity, or N:M).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = Pattern::Unstructured))]
    pub pattern: Pattern,
    /// Decoder LMs: OWL's layer sparsities (more zeros where fewer outlier weights; M 5, λ 0.08;
    /// unstructured only) instead of the same sparsity in every layer.
    #[cfg_attr(feature = "cli", arg(long))]
    pub owl: bool,
    /// Decoder LMs, magnitude and Wanda unstructured: which weights are compared with each
    /// other (row, layer, or global for magnitude) [default: layer for magnitude, row for Wanda]
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub scope: Option<crate::llm::Scope>,
    /// Decoder LMs, the method: passes of its end-to-end stage per group of 6 layers (the
    /// pruned projections trained towards the dense model's next-token distribution, its top 64
    /// tokens, on the calibration text cut into 128-token pieces, at a learning rate of 5e-5;
    /// 2 measured best) [default: 0, off]
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub end_to_end_epochs: Option<usize>,
    /// Decoder LMs: calibration windows drawn from --text (at seeded random starts).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", default_value_t = CALIB_WINDOWS))]
    pub calib_windows: usize,
    /// Decoder LMs: tokens per calibration window and per perplexity window.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", default_value_t = WINDOW))]
    pub window: usize,
    /// The engine's settings, over prune-hf's preset: 12 pruning epochs (--epochs; encoders 0
    /// and no fine-tune: the layer-wise final step alone does better on them, docs/PRUNE_HF.md)
    /// at Adam's
    /// learning rate 1e-4, LOBSTER's soft gate at λ 1e-4, a round after 1 epoch without a 10%
    /// improvement, each round's thresholds per layer within a 0.02 metric drop
    /// (--round-tolerance), a 10-epoch fine-tune from 1e-4.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub engine: EngineArgs,
}

impl Options {
    /// Distillation of `model` on the plain text file `text`, everything else at its default.
    pub fn text(model: impl Into<String>, text: impl Into<PathBuf>) -> Self {
        Self {
            text: Some(text.into()),
            ..Self::new(model)
        }
    }

    /// Task-loss training of a translation `model` on sentence pairs (one TSV file, or two
    /// line-aligned files), everything else at its default.
    pub fn pairs(model: impl Into<String>, files: Vec<PathBuf>) -> Self {
        Self {
            data: Some(files),
            ..Self::new(model)
        }
    }

    fn new(model: impl Into<String>) -> Self {
        Self {
            model: Some(model.into()),
            revision: None,
            data: None,
            text: None,
            eval_text: None,
            target_sparsity: None,
            max_drop: None,
            sparse: false,
            format: CheckpointFormat::Dense,
            prune_embeddings: false,
            train_embeddings: false,
            final_step: None,
            layer_epochs: LAYER_EPOCHS,
            layer_lr: LAYER_LR,
            batch_size: BATCH_SIZE,
            max_tokens: MAX_TOKENS,
            valid_fraction: VALID_FRACTION,
            augment: None,
            vocab_augment: None,
            max_len: MAX_LEN,
            seed: 1,
            method: Method::Relprune,
            pattern: Pattern::Unstructured,
            owl: false,
            end_to_end_epochs: None,
            scope: None,
            calib_windows: CALIB_WINDOWS,
            window: WINDOW,
            engine: EngineArgs::default(),
        }
    }
}

/// Everything that defines a run: stored in the checkpoint (resume) and in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// `--model` as given.
    pub model_arg: String,
    /// The resolved local model directory.
    pub model_dir: PathBuf,
    /// `--revision`.
    pub revision: Option<String>,
    /// The architecture (its `model_type`).
    #[serde(alias = "model_type")]
    pub architecture: String,
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
    /// Vocabulary-substituted variants per training line (`--vocab-augment`; 0 in checkpoints
    /// written before it).
    #[serde(default)]
    pub vocab_augment: usize,
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
    /// `--format`.
    #[serde(default)]
    pub format: CheckpointFormat,
    /// `--final-step`.
    #[serde(default)]
    pub final_step: FinalStep,
    /// `--layer-epochs`, `--layer-lr`.
    #[serde(default)]
    pub layer: LayerDistill,
}

impl Config {
    /// The configuration of a fresh run: every option checked, the model resolved (a Hub id is
    /// fetched into the HF cache) and its architecture recognised, before anything is loaded.
    pub fn new(o: &Options) -> Result<Self> {
        let model_arg = o
            .model
            .clone()
            .ok_or_else(|| invalid("--model is required (unless --resume)"))?;
        if o.text.is_none() && o.data.is_none() {
            return Err(invalid(
                "one of --text FILE (distillation) or --data PAIRS (translation pairs) is required",
            ));
        }
        if o.target_sparsity.is_none() && o.max_drop.is_none() {
            return Err(invalid(
                "one of --target-sparsity P or --max-drop D is required",
            ));
        }
        if let Some(p) = o.target_sparsity {
            if !(0.0..1.0).contains(&p) {
                return Err(invalid(format!(
                    "--target-sparsity must be in [0, 1), got {p}"
                )));
            }
        }
        if let Some(d) = o.max_drop {
            if !(d.is_finite() && d >= 0.0) {
                return Err(invalid(format!("--max-drop must be >= 0, got {d}")));
            }
        }
        if o.batch_size == 0 {
            return Err(invalid("--batch-size must be positive"));
        }
        if o.max_len < 2 {
            return Err(invalid("--max-len must be at least 2"));
        }
        if !(o.valid_fraction > 0.0 && o.valid_fraction < 1.0) {
            return Err(invalid("--valid-fraction must be in (0, 1)"));
        }
        if !(o.layer_lr.is_finite() && o.layer_lr > 0.0) {
            return Err(invalid(format!(
                "--layer-lr must be a positive number, got {}",
                o.layer_lr
            )));
        }
        let model_dir = resolve(&model_arg, o.revision.as_deref())?;
        let arch = detect(&model_dir)?;
        if arch.kind == Kind::CausalLm {
            return Err(invalid(format!(
                "{}: a decoder-only LM ({}) is pruned by relprune_hf::causal (prune-hf does it \
                 on its own)",
                model_dir.display(),
                arch.model_type
            )));
        }
        if o.method != Method::Relprune
            || o.pattern != Pattern::Unstructured
            || o.owl
            || o.end_to_end_epochs.is_some()
            || o.scope.is_some()
        {
            return Err(invalid(format!(
                "--method, --pattern, --owl, --scope and --end-to-end-epochs are for decoder-only \
                 LMs; {} is a {} model",
                model_dir.display(),
                arch.model_type
            )));
        }
        if crate::compress::is_compressed(&model_dir)? {
            return Err(invalid(format!(
                "{}: the checkpoint is compressed; prune its dense form (relprune decompress \
                 --model {} --out DIR)",
                model_dir.display(),
                model_dir.display()
            )));
        }
        let abs = |p: &Option<PathBuf>| p.as_deref().map(absolute).transpose();
        let data = match &o.data {
            Some(v) => Some(v.iter().map(|p| absolute(p)).collect::<Result<Vec<_>>>()?),
            None => None,
        };
        let encoder = arch.kind == Kind::Encoder;
        let augment = o
            .augment
            .unwrap_or(if encoder { AUGMENT_DEFAULT } else { 0 });
        let vocab_augment =
            o.vocab_augment
                .unwrap_or(if encoder { VOCAB_AUGMENT_DEFAULT } else { 0 });
        if !encoder && vocab_augment > 0 {
            return Err(invalid(format!(
                "--vocab-augment makes distillation inputs for encoders; {} is a {} model",
                model_dir.display(),
                arch.model_type
            )));
        }
        if !encoder && augment > 0 {
            return Err(invalid(format!(
                "--augment makes distillation inputs for encoders; {} is a {} model",
                model_dir.display(),
                arch.model_type
            )));
        }
        if encoder && data.is_some() {
            return Err(invalid(format!(
                "{}: an encoder ({}) prunes on plain text (--text FILE); sentence pairs (--data) \
                 are for translation models",
                model_dir.display(),
                arch.model_type
            )));
        }
        let final_step = match (encoder, o.final_step) {
            (true, step) => step.unwrap_or(FinalStep::Distill),
            (false, None | Some(FinalStep::Magnitude)) => FinalStep::Magnitude,
            (false, Some(step)) => {
                return Err(invalid(format!(
                    "--final-step {} needs each layer's inputs, which only encoders report; {} \
                     is a {} model (its final step is magnitude)",
                    step.name(),
                    model_dir.display(),
                    arch.model_type
                )))
            }
        };
        let mut prune = preset(o, encoder);
        o.engine.apply(&mut prune)?;
        // The fine-tune runs after the (optional) final step, outside the engine.
        let (finetune_epochs, finetune_lr) = (prune.finetune_epochs, prune.finetune_lr);
        prune.finetune_epochs = 0;
        Ok(Config {
            model_arg,
            model_dir,
            revision: o.revision.clone(),
            architecture: arch.model_type.to_string(),
            text: abs(&o.text)?,
            data,
            eval_text: abs(&o.eval_text)?,
            target_sparsity: o.target_sparsity,
            max_drop: o.max_drop,
            batch_size: o.batch_size,
            valid_fraction: o.valid_fraction,
            augment,
            vocab_augment,
            max_tokens: o.max_tokens,
            max_len: o.max_len,
            seed: o.seed,
            selection: selection(o, arch),
            prune,
            finetune_epochs,
            finetune_lr,
            sparse: o.sparse,
            format: o.format,
            final_step,
            layer: LayerDistill {
                epochs: o.layer_epochs,
                lr: o.layer_lr,
            },
        })
    }
}

impl Config {
    /// The per-layer distillation of `--final-step distill`, as the method's block settings.
    pub fn layer_distill(&self) -> crate::llm::Distill {
        crate::llm::Distill {
            recovery_epochs: self.layer.epochs,
            lr: self.layer.lr,
            ..crate::llm::Distill::default()
        }
    }
}

/// Which parameters are pruned (every matrix but the tables and heads the architecture names),
/// and which are frozen.
fn selection(o: &Options, arch: &Architecture) -> Selection {
    let patterns = |lists: &[&[&str]]| -> Vec<String> {
        lists
            .iter()
            .flat_map(|l| l.iter().map(|p| p.to_string()))
            .collect()
    };
    let tokens: &[&str] = if o.prune_embeddings {
        &[]
    } else {
        // Only rows of tokens in the pruning data get a gradient: the rest of a vocabulary
        // would be pruned by magnitude alone.
        arch.token_tables
    };
    let exclude = patterns(&[arch.position_tables, arch.untrained_heads, tokens]);
    // An encoder's tables are left as they are unless asked: a few hundred sentences cannot
    // teach them much, and frozen they cost no gradients, moments or snapshots.
    let frozen = if arch.kind == Kind::Encoder && !o.prune_embeddings && !o.train_embeddings {
        patterns(&[arch.token_tables, arch.position_tables])
    } else {
        Vec::new()
    };
    Selection {
        include: vec!["*weight".into()],
        min_rank: 2,
        exclude,
        frozen,
    }
}

/// prune-hf's preset (see [`Options::engine`]).
fn preset(o: &Options, encoder: bool) -> PruneConfig {
    PruneConfig {
        regularizer: SelectiveDecay::lobster(1e-4),
        lr: 1e-4,
        bisection: BisectionConfig {
            scope: Scope::PerLayer,
            criterion: Criterion::Metric { tolerance: 0.02 },
            max_metric_worsening: o.max_drop,
            max_evals: 16,
            ..Default::default()
        },
        // Without --max-drop every round is a candidate (any metric is "within" 1e6 units).
        delta: o.max_drop.unwrap_or(1e6),
        patience: 1,
        // Distillation losses start near 0 and keep falling by more than 1% an epoch: at 10%
        // rounds come often enough for the epoch budget.
        min_improvement: 0.1,
        restore: RestorePoint::LastImprovement,
        judge_retrained: false,
        // Encoders: no rounds unless asked (docs/PRUNE_HF.md: on a pretrained encoder and a few
        // hundred sentences they overfit the text and cost memory; the final step does better).
        max_epochs: if encoder { 0 } else { 12 },
        target_sparsity: o.target_sparsity,
        stop_rounds: 3,
        min_round_gain: 0.001,
        finetune_epochs: if encoder { 0 } else { 10 },
        finetune_lr: 1e-4,
    }
}
