//! Pruning a pretrained Hugging Face checkpoint with relprune's method, as a library.
//!
//! The steps, each a public function: [`resolve`] a directory or Hub id, check the run's
//! [`Options`] into a [`Config`], [`build_task`] (distillation of an encoder against itself,
//! task loss on sentence pairs, or sequence-level distillation of a translation model),
//! [`prune`] (the method's rounds, a final per-layer step to the target sparsity, the
//! fine-tune), and [`run`], which does them all and writes a directory Hugging Face loads like
//! the input (same tensor names, shapes and dtypes, every other file copied) with
//! `relprune_report.json` and `report.md`, judged from the written files.
//!
//! ```no_run
//! # fn main() -> Result<(), relprune_hf::Error> {
//! let options = relprune_hf::Options {
//!     target_sparsity: Some(0.5),
//!     ..relprune_hf::Options::text("sentence-transformers/all-MiniLM-L6-v2", "text.txt")
//! };
//! let config = relprune_hf::Config::new(&options)?;
//! let results = relprune_hf::run(config, &relprune_hf::RunOptions::new("minilm-50"))?;
//! println!("cosine to the dense model: {:.4}", results.pruned.value);
//! # Ok(())
//! # }
//! ```
//!
//! A decoder-only LM (Llama, Mistral, Qwen2, Qwen3; a directory or a GGUF file) goes through
//! [`causal`] instead, layer by layer ([`llm`]):
//!
//! ```no_run
//! # fn main() -> Result<(), relprune_hf::Error> {
//! let options = relprune_hf::Options {
//!     method: relprune_hf::llm::Method::Relprune,
//!     pattern: relprune_hf::llm::Pattern::TwoFour,
//!     ..relprune_hf::Options::text("SmolLM2-135M-Instruct-Q4_1", "calib.txt")
//! };
//! let config = relprune_hf::causal::CausalConfig::new(&options)?;
//! let report = relprune_hf::causal::run(config, &relprune_hf::RunOptions::new("smollm2-2-4"))?;
//! println!("perplexity {:.2} → {:.2}", report.perplexity[0].dense, report.perplexity[0].pruned);
//! # Ok(())
//! # }
//! ```
//!
//! The run is checkpointed after every epoch into a work directory beside the output (resume
//! with [`RunOptions::resume`]), and the output is written into a temporary directory renamed at
//! the end: a failure leaves no partial output directory.

pub mod blockwise;
pub mod causal;
pub mod compress;
pub mod config;
pub mod error;
pub mod llm;
pub mod memory;
pub mod prune;
pub mod resolve;
pub mod task;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use relprune_eval::RunResults;
use relprune_models::hf::save::{save_like_input, stores_full_precision};
use relprune_models::hf::{Architecture, HfModel};
use relprune_prune::reconstruct::{layer_groups, prune_layers, ObsConfig};
use relprune_prune::{AdamConfig, Evaluation, MaskedAdam, Masks, ParamSet, Split, Task, Trainer};
use relprune_tasks::run::{Finish, ModelFiles, MODEL_FILE};
use relprune_tasks::ReportFiles;

pub use compress::{compress_dir, decompress_dir, CheckpointFormat, CompressedFormat};
pub use config::{Config, FinalStep, LayerDistill, Options};
pub use error::{Error, Result};
pub use prune::prune;
pub use resolve::resolve;
pub use task::{build_task, Built, HfTask, Interruptible, INTERRUPT_ENV};

use error::invalid;
use llm::OneShot;

/// The report file written into the output directory beside the model.
pub const REPORT_FILE: &str = "relprune_report.json";

/// How one invocation runs, beside the configuration.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The output directory (must not exist; written atomically).
    pub out: PathBuf,
    /// The checkpoint directory.
    pub work: PathBuf,
    /// Continue the run checkpointed in `work` instead of starting one.
    pub resume: bool,
    /// No progress output.
    pub quiet: bool,
    /// Keep `work` after a successful run.
    pub keep_work: bool,
    /// The interruption test hook (see [`INTERRUPT_ENV`]).
    pub interrupt_after: Option<usize>,
}

impl RunOptions {
    /// A fresh run into `out`, checkpointed into `OUT.relprune-work` (removed after success),
    /// quiet.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        let out = out.into();
        Self {
            work: relprune_io::sibling(&out, ".relprune-work"),
            out,
            resume: false,
            quiet: true,
            keep_work: false,
            interrupt_after: None,
        }
    }
}

/// The configuration of the run checkpointed in `work` (what resuming it continues).
pub fn resume_config(work: &Path) -> Result<(Config, usize)> {
    let saved = relprune_tasks::run::saved_config(work, "prune-hf")?;
    Ok((saved.config, saved.epochs))
}

/// Runs prune-hf end to end; returns what it wrote into `relprune_report.json`.
pub fn run(cfg: Config, opts: &RunOptions) -> Result<RunResults> {
    let started = Instant::now();
    let out = resolve::absolute(&opts.out)?;
    if out.exists() {
        return Err(invalid(format!(
            "output directory {} already exists (prune-hf never overwrites; remove it or pick \
             another)",
            out.display()
        )));
    }
    let work = resolve::absolute(&opts.work)?;
    if !opts.resume
        && work
            .join(relprune_prune::checkpoint::CHECKPOINT_FILE)
            .exists()
    {
        return Err(invalid(format!(
            "work directory {} holds the checkpoint of an earlier run: resume it (--resume {}), \
             or delete it",
            work.display(),
            work.display()
        )));
    }
    if opts.resume && work.is_dir() {
        // Writes a kill interrupted are never resumed from; their files only take space.
        relprune_io::sweep_temp(&work)?;
    }
    let opts = RunOptions {
        out,
        work,
        ..opts.clone()
    };
    let varmap = VarMap::new();
    let Built {
        arch,
        task,
        dataset,
    } = build_task(&cfg, &varmap, opts.quiet)?;
    let end = End {
        cfg: &cfg,
        opts: &opts,
        varmap: &varmap,
        arch,
        dataset,
        started,
    };
    let results =
        match task {
            HfTask::Encoder(task) => {
                let bar = task::item_bar(task.train.len() as u64, "calibration", opts.quiet);
                let (final_step, distill) = (cfg.final_step, cfg.layer_distill());
                let mut layers = |task: &mut Interruptible<relprune_tasks::EncoderDistill>,
                              params: &ParamSet,
                              masks: &mut Masks,
                              target: f64|
             -> relprune_prune::Result<(&'static str, serde_json::Value)> {
                bar.reset();
                let report = match final_step {
                    FinalStep::Distill => {
                        let done = blockwise::encoder_layers(
                            &mut task.inner,
                            params,
                            masks,
                            target,
                            &distill,
                            &bar,
                        )
                        .map_err(|e| relprune_prune::Error::Task(e.to_string()))?;
                        ("distill", serde_json::json!({ "layers": done }))
                    }
                    FinalStep::Wanda => {
                        let wanda = OneShot::Wanda;
                        reconstruct_layers(&mut task.inner, params, masks, target, wanda, &bar)?;
                        ("wanda", serde_json::Value::Null)
                    }
                    FinalStep::Reconstruct | FinalStep::Magnitude => {
                        let gpt = OneShot::SparseGpt;
                        reconstruct_layers(&mut task.inner, params, masks, target, gpt, &bar)?;
                        ("reconstruct", serde_json::Value::Null)
                    }
                };
                bar.finish_and_clear();
                Ok(report)
            };
                // The dense model is the teacher: its cosine with itself is 1 by definition.
                end.run(*task, Some(1.0), Some(&mut layers), |dir, task| {
                    let reloaded = relprune_models::hf::bert::BertModel::load_into(
                        &VarMap::new(),
                        dir,
                        &Device::Cpu,
                    )?;
                    let trained = std::mem::replace(&mut task.model, reloaded);
                    let judged = task.evaluate(Split::Test);
                    task.model = trained;
                    Ok(judged?)
                })?
            }
            HfTask::Seq2Seq(task) => end.run(*task, None, None, |dir, task| {
                let (_, reloaded) = relprune_models::hf::load(dir, &VarMap::new(), &Device::Cpu)?;
                let HfModel::Seq2Seq(reloaded) = reloaded else {
                    return Err(invalid("the written model is no longer an encoder-decoder"));
                };
                let trained = std::mem::replace(&mut task.model, reloaded);
                let judged = task.evaluate(Split::Test);
                task.model = trained;
                Ok(judged?)
            })?,
        };
    if !opts.keep_work {
        std::fs::remove_dir_all(&opts.work).map_err(|e| {
            invalid(format!(
                "cannot remove work directory {}: {e}",
                opts.work.display()
            ))
        })?;
    }
    Ok(results)
}

/// SparseGPT (or Wanda) layer by layer in forward order (its sequential mode): a layer's inputs
/// come from the layers before it as pruned, and only one layer's statistics are in memory at a
/// time.
fn reconstruct_layers(
    task: &mut relprune_tasks::EncoderDistill,
    params: &ParamSet,
    masks: &mut Masks,
    target: f64,
    method: OneShot,
    bar: &indicatif::ProgressBar,
) -> relprune_prune::Result<()> {
    let names: Vec<String> = params.prunable().map(|p| p.name.clone()).collect();
    for group in layer_groups(&names) {
        bar.reset();
        let grams = task.input_grams(&group, bar)?;
        if method == OneShot::Wanda {
            let mut new = BTreeMap::new();
            for p in params.prunable() {
                let mask = match grams.get(&p.name) {
                    Some(g) if g.rows() > 0 => {
                        let w = p.var.as_tensor();
                        let sparsity = llm::Sparsity::Unstructured(target);
                        let pruned = llm::wanda_prune(w, g, sparsity)
                            .map_err(|e| relprune_prune::Error::Task(format!("{}: {e}", p.name)))?;
                        // Wanda only zeroes: the kept weights are unchanged, masks follow.
                        let mask = pruned.ne(0f32)?.to_dtype(DType::F32)?;
                        (mask * masks.mask_of(&p.name)?)?
                    }
                    _ => masks.mask_of(&p.name)?.clone(),
                };
                new.insert(p.name.clone(), mask);
            }
            *masks = Masks::from_tensors(new)?;
            masks.apply(params)?;
        } else {
            prune_layers(params, masks, &grams, target, &ObsConfig::default())?;
        }
    }
    Ok(())
}

/// What the shared end of a run needs, whatever the task.
struct End<'a> {
    cfg: &'a Config,
    opts: &'a RunOptions,
    varmap: &'a VarMap,
    arch: &'static Architecture,
    dataset: relprune_eval::DatasetInfo,
    started: Instant,
}

impl End<'_> {
    /// The trainer (checkpointed or resumed), the dense reference (`dense`, or the dense
    /// model's test metric evaluated once), the pruning phases, and the output written into a
    /// staging directory, judged from the file with `judge` (which evaluates the test split
    /// with the model reloaded from a directory), reported, and committed to `--out`.
    fn run<T: Task>(
        self,
        inner: T,
        dense: Option<f64>,
        layers: Option<prune::LayerStep<'_, Interruptible<T>>>,
        judge: impl FnMut(&Path, &mut T) -> Result<Evaluation>,
    ) -> Result<RunResults> {
        let mut task = Interruptible {
            inner,
            after: self.opts.interrupt_after,
        };
        let mut trainer = self.trainer(&mut task)?;
        let dense_metric = match dense {
            Some(v) => v,
            None => {
                trainer
                    .once("dense evaluation", |t| t.evaluate(&mut task, Split::Test))?
                    .metric
            }
        };
        let phase = prune(self.cfg, &mut trainer, &mut task, layers)?;
        let stage = relprune_io::StagingDir::new(&self.opts.out)?;
        let skipped = resolve::copy_model_files(&self.cfg.model_dir, stage.path(), MODEL_FILE)?;
        let input = self.cfg.model_dir.join(MODEL_FILE);
        let all_f32 = trainer.params.iter().all(|p| p.var.dtype() == DType::F32);
        let exact = all_f32 && stores_full_precision(&input)?;
        let mut files = HfFiles {
            input: &input,
            varmap: self.varmap,
            arch: self.arch,
            judge,
            copied: Vec::new(),
        };
        let mut results = relprune_tasks::finish(
            &mut trainer,
            &mut task,
            &mut files,
            Finish {
                experiment: format!("prune-hf {}", self.cfg.model_arg),
                dataset: self.dataset,
                dense_metric,
                config: serde_json::to_value(self.cfg).map_err(|e| invalid(e.to_string()))?,
                phase,
                out: stage.path().to_path_buf(),
                dense_file: input.clone(),
                sparse: self.cfg.sparse,
                layer_type: Some(self.arch.layer_type),
                linear_group: true,
                // The written model must compute what the trained one computes (f32 inputs).
                tolerance: exact.then_some(1e-5),
                started: self.started,
            },
        )?;
        if let Some(format) = self.cfg.format.compressed() {
            let summary = compress::compress_in_place(stage.path(), format.into())?;
            let summary = serde_json::to_value(summary).map_err(|e| invalid(e.to_string()))?;
            results.extra.insert("compression".into(), summary);
        }
        let extra = &mut results.extra;
        extra.insert("copied_unchanged_tensors".into(), files.copied.into());
        extra.insert("skipped_files".into(), skipped.into());
        extra.insert(
            "model_dir".into(),
            self.cfg.model_dir.to_string_lossy().to_string().into(),
        );
        let report = ReportFiles {
            json: REPORT_FILE,
            plot: false,
        };
        relprune_tasks::write_report(&results, stage.path(), &report)?;
        stage.commit(&self.opts.out)?;
        Ok(results)
    }

    /// A trainer over the model's variables with masked Adam, checkpointed into or resumed
    /// from the work directory.
    fn trainer<T: Task>(&self, task: &mut T) -> Result<Trainer> {
        let params = ParamSet::from_varmap(self.varmap, &self.cfg.selection)?;
        let masks = Masks::dense(&params)?;
        let adam = AdamConfig {
            lr: self.cfg.prune.lr,
            ..Default::default()
        };
        let mut optim = MaskedAdam::new(adam, None)?;
        // A model-sized scratch buffer less between batches, for an allocation per step.
        optim.set_keep_scratch(false);
        let mut trainer = Trainer::new(params, masks, optim)?;
        trainer.quiet = self.opts.quiet;
        // The fine-tune's best epoch lives in the work directory, not in memory (−1 copy of the
        // trained weights: 44 MB of MiniLM's 91).
        trainer.spill_best = true;
        let work = &self.opts.work;
        relprune_tasks::run::start(&mut trainer, task, work, self.cfg, self.opts.resume)
            .map_err(|e| invalid(format!("work directory {}: {e}", work.display())))?;
        Ok(trainer)
    }
}

/// The model files of a pretrained checkpoint: written like the input, judged reloaded from the
/// written directory.
struct HfFiles<'a, J> {
    input: &'a Path,
    varmap: &'a VarMap,
    arch: &'static Architecture,
    judge: J,
    copied: Vec<String>,
}

impl<T, J> ModelFiles<Interruptible<T>> for HfFiles<'_, J>
where
    T: Task,
    J: FnMut(&Path, &mut T) -> Result<Evaluation>,
{
    fn write(&mut self, trainer: &Trainer, path: &Path) -> relprune_tasks::Result<Vec<String>> {
        let written = save_like_input(self.input, path, self.varmap, self.arch)?;
        // Each prunable parameter is counted once, under the first name it is stored under.
        let mut seen = std::collections::BTreeSet::new();
        let mut names = Vec::new();
        for (stored, var) in &written.trained {
            let param = trainer
                .params
                .iter()
                .find(|p| p.name == *var || p.aliases.contains(var));
            if let Some(p) = param.filter(|p| p.prunable) {
                if seen.insert(p.name.clone()) {
                    names.push(stored.clone());
                }
            }
        }
        self.copied = written.copied;
        Ok(names)
    }

    fn judge(
        &mut self,
        path: &Path,
        task: &mut Interruptible<T>,
    ) -> relprune_tasks::Result<Evaluation> {
        let dir = path.parent().unwrap_or(Path::new("."));
        (self.judge)(dir, &mut task.inner)
            .map_err(|e| relprune_tasks::Error::Invalid(format!("the written model: {e}")))
    }
}
