//! The one run pipeline every experiment and `prune-hf` share: a checkpointed start (or a resume),
//! the dense reference, the pruning phase, then the end that makes a run trustworthy: the pruned
//! model is written, loaded back into a fresh model and judged from the file, its zeros are
//! counted in the file, and the results are assembled with the file sizes.
//!
//! What differs between runs is behind [`ModelFiles`] (how the model is written and read back)
//! and the fields of [`Finish`]; the order of the steps and their checks are written once, here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use relprune_eval::{
    compressed_sizes, sum_by_group, DatasetInfo, MetricValue, PrunedSummary, RunResults,
    SizesBytes, SparsityReport,
};
use relprune_models::LayerType;
use relprune_prune::{
    export, Evaluation, IterativePruning, LrSchedule, PruneConfig, Split, Task, Trainer,
};
use serde::Serialize;

use crate::report::{phase_report, Phase};
use crate::{Error, Result};

/// The checkpoint directory inside a run's output directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// The pruned model's file name in a run's output directory.
pub const MODEL_FILE: &str = "model.safetensors";

/// The dense reference's file name in a run's output directory.
pub const DENSE_FILE: &str = "dense.safetensors";

/// The compact sparse format's file name.
pub const SPARSE_FILE: &str = "model.sparse.safetensors";

/// Starts checkpointing `trainer` into `dir` (storing `config` as the run's configuration), or
/// with `resume` restores the run checkpointed there, replaying the task's shuffles.
pub fn start<T: Task + ?Sized>(
    trainer: &mut Trainer,
    task: &mut T,
    dir: &Path,
    config: &impl Serialize,
    resume: bool,
) -> Result<()> {
    let config = serde_json::to_value(config)
        .map_err(|e| Error::Invalid(format!("the configuration cannot be stored: {e}")))?;
    let run = serde_json::json!({ "config": config });
    if resume {
        trainer.resume(dir, task)?;
        // The configuration may carry settings changed on resume (see [`SavedRun`]).
        trainer.set_run_description(run);
    } else {
        trainer.checkpoint_into(dir, run)?;
    }
    Ok(())
}

/// A checkpointed run as `--resume` finds it: its configuration and how far it got.
#[derive(Debug)]
pub struct SavedRun<C> {
    /// The configuration the run was started (or last resumed) with.
    pub config: C,
    /// Training epochs done, all phases together.
    pub epochs: usize,
    /// Phases that finished, in order.
    pub completed: Vec<String>,
    /// The phase in progress, if one was.
    pub current: Option<String>,
}

impl<C> SavedRun<C> {
    /// Whether phase `label` has started (finished or in progress): settings it read at its
    /// start can no longer change.
    pub fn started(&self, label: &str) -> bool {
        self.current.as_deref() == Some(label) || self.finished(label)
    }

    /// Whether phase `label` finished.
    pub fn finished(&self, label: &str) -> bool {
        self.completed.iter().any(|l| l == label)
    }
}

/// The run checkpointed in `dir` (what `--resume` continues); `what` names the configuration
/// expected in errors.
pub fn saved_config<C: serde::de::DeserializeOwned>(dir: &Path, what: &str) -> Result<SavedRun<C>> {
    let saved = relprune_prune::checkpoint::read(dir, &candle_core::Device::Cpu)?;
    let journal = saved.journal;
    let config = serde_json::from_value(journal.run["config"].clone()).map_err(|e| {
        Error::Invalid(format!(
            "{}: the checkpoint holds no {what} configuration ({e})",
            dir.display()
        ))
    })?;
    Ok(SavedRun {
        config,
        epochs: journal.epochs_trained,
        completed: journal.completed.into_iter().map(|(l, _)| l).collect(),
        current: journal.current.map(|(l, _)| l),
    })
}

/// Trains the dense model: `epochs` epochs, cosine decay from `lr`, checkpointed like every
/// phase (a resumed run continues where it stopped).
pub fn train_dense<T: Task + ?Sized>(
    trainer: &mut Trainer,
    task: &mut T,
    lr: f64,
    epochs: usize,
) -> Result<()> {
    let schedule = LrSchedule::Cosine { lr, epochs };
    trainer.fit(task, schedule, epochs, false, "dense")?;
    Ok(())
}

/// The dense model's figures: what the pruned one is compared with.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct DenseReference {
    /// On the validation split (the algorithm's reference).
    pub valid: Evaluation,
    /// The metric on the test split (the report's "dense" figure).
    pub test_metric: f64,
}

/// Evaluates the dense model once (validation, and the test metric from `test`, which may also
/// write files of its own) and saves it as `dense_file`; a resumed run gets the stored figures.
pub fn dense_reference<T: Task + ?Sized>(
    trainer: &mut Trainer,
    task: &mut T,
    dense_file: &Path,
    test: impl FnOnce(&mut Trainer, &mut T) -> relprune_prune::Result<f64>,
) -> Result<DenseReference> {
    Ok(trainer.once("dense evaluation", |trainer| {
        let valid = trainer.evaluate(task, Split::Valid)?;
        let test_metric = test(trainer, task)?;
        export::save_dense(&trainer.params, dense_file)?;
        Ok(DenseReference { valid, test_metric })
    })?)
}

/// The method: selective decay and iterative pruning, then the fine-tune; its report entries.
pub fn prune<T: Task + ?Sized>(
    trainer: &mut Trainer,
    task: &mut T,
    config: &PruneConfig,
) -> Result<Phase> {
    let outcome = IterativePruning::new(config.clone())?.run(trainer, task)?;
    Ok(phase_report(&outcome))
}

/// How a run stores its pruned model and reads it back.
pub trait ModelFiles<T: Task> {
    /// Writes the trained model into the file `path`; returns the names under which its prunable
    /// parameters are stored there, each once.
    fn write(&mut self, trainer: &Trainer, path: &Path) -> Result<Vec<String>>;

    /// Evaluates on the test split a fresh model loaded from `path` (never the trained one).
    fn judge(&mut self, path: &Path, task: &mut T) -> Result<Evaluation>;
}

/// The model files of a model whose parameters are stored under their own names
/// ([`export::save_dense`]), judged by `judge`.
pub struct OwnNames<F>(pub F);

impl<T: Task, F: FnMut(&Path, &mut T) -> Result<Evaluation>> ModelFiles<T> for OwnNames<F> {
    fn write(&mut self, trainer: &Trainer, path: &Path) -> Result<Vec<String>> {
        export::save_dense(&trainer.params, path)?;
        Ok(trainer.params.prunable().map(|p| p.name.clone()).collect())
    }

    fn judge(&mut self, path: &Path, task: &mut T) -> Result<Evaluation> {
        (self.0)(path, task)
    }
}

/// Everything the end of a run needs besides the trainer, the task and the model files.
pub struct Finish {
    /// The experiment's name in the results.
    pub experiment: String,
    /// The data the run used.
    pub dataset: DatasetInfo,
    /// The dense model's test metric.
    pub dense_metric: f64,
    /// The run's configuration, as stored in the results.
    pub config: serde_json::Value,
    /// The pruning phase's report.
    pub phase: Phase,
    /// The directory the model files go to.
    pub out: PathBuf,
    /// The dense model's file, for the size comparison.
    pub dense_file: PathBuf,
    /// Also write the compact sparse format.
    pub sparse: bool,
    /// Counts by layer type in the results (`None`: per layer only).
    pub layer_type: Option<fn(&str) -> LayerType>,
    /// With `layer_type`, every type but the embeddings also as one group (the figure a
    /// sparsity goal on linear layers is about).
    pub linear_group: bool,
    /// How far the model judged from the file may be from the trained one on the test split
    /// (`None`: not compared, e.g. where an evaluation costs minutes).
    pub tolerance: Option<f64>,
    /// When this process started the run, or took it over on resume (for the wall time; a
    /// resumed run adds the seconds its checkpoint records).
    pub started: Instant,
}

/// The name of the group of every prunable tensor but the embeddings.
pub const LINEAR_GROUP: &str = "linear (all but embeddings)";

/// The end of a run: writes the model (`MODEL_FILE`, and the sparse format if asked), judges the
/// model loaded back from the file, counts its zeros in the file (never more non-zeros than the
/// masks allow), and assembles the results with the file sizes. The reported pruned metric is
/// the one judged from the file.
pub fn finish<T: Task>(
    trainer: &mut Trainer,
    task: &mut T,
    files: &mut impl ModelFiles<T>,
    f: Finish,
) -> Result<RunResults> {
    let model_path = f.out.join(MODEL_FILE);
    let names = files.write(trainer, &model_path)?;
    let sparse_path = f.out.join(SPARSE_FILE);
    if f.sparse {
        export::save_sparse(&trainer.params, &sparse_path)?;
    }
    let judged = files.judge(&model_path, task)?;
    if let Some(tolerance) = f.tolerance {
        let trained = trainer.evaluate(task, Split::Test)?;
        if (judged.metric - trained.metric).abs() > tolerance {
            return Err(Error::Invalid(format!(
                "the model read back from {} scores {} on the test split, the trained model {}",
                model_path.display(),
                judged.metric,
                trained.metric
            )));
        }
    }
    let report = SparsityReport::from_safetensors(&model_path, &names)?;
    let total = report.total();
    let (_, alive) = trainer.masks.totals()?;
    if total.nonzero > alive {
        return Err(Error::Invalid(format!(
            "{} has {} non-zeros in prunable tensors but the masks allow only {alive}",
            model_path.display(),
            total.nonzero
        )));
    }
    let layer_groups = match f.layer_type {
        Some(layer_type) => sum_by_group(&report.layers, |name| {
            let t = layer_type(name);
            let linear = (f.linear_group && t != LayerType::Embeddings).then_some(LINEAR_GROUP);
            std::iter::once(t.name()).chain(linear)
        })
        .into_values()
        .collect(),
        None => Vec::new(),
    };
    let metric = task.metric();
    let mut results = RunResults {
        experiment: f.experiment,
        dataset: f.dataset,
        metric: metric.name,
        higher_is_better: metric.higher_is_better,
        dense: MetricValue {
            value: f.dense_metric,
        },
        pruned: PrunedSummary::new(judged.metric, &total),
        layers: report.layers,
        layer_groups,
        sizes_bytes: SizesBytes {
            dense_safetensors: 0,
            pruned_safetensors: 0,
            pruned_gzip: 0,
            pruned_bzip2: 0,
            sparse_format: 0,
        },
        model_file: MODEL_FILE.into(),
        wall_seconds: 0.0,
        config: f.config,
        rounds: f.phase.rounds,
        extra: f.phase.extra,
    };
    results
        .extra
        .insert("test_loss_pruned".into(), judged.loss.into());
    measure_sizes(
        &mut results,
        &f.dense_file,
        &model_path,
        f.sparse.then_some(sparse_path.as_path()),
    )?;
    // A resumed run reports the whole run's time, not only this process's.
    let earlier = trainer
        .checkpoints
        .as_ref()
        .map_or(0.0, |c| c.earlier_seconds());
    results.wall_seconds = earlier + f.started.elapsed().as_secs_f64();
    Ok(results)
}

/// Fills in the file sizes of `results`: raw, gzip -9 and bzip2 -9 of the pruned and the dense
/// file, and the sparse format's.
fn measure_sizes(
    results: &mut RunResults,
    dense: &Path,
    pruned: &Path,
    sparse: Option<&Path>,
) -> Result<()> {
    let dense = compressed_sizes(dense)?;
    let pruned = compressed_sizes(pruned)?;
    let s = &mut results.sizes_bytes;
    s.dense_safetensors = dense.raw;
    s.pruned_safetensors = pruned.raw;
    s.pruned_gzip = pruned.gzip9;
    s.pruned_bzip2 = pruned.bzip2_9;
    let extra = &mut results.extra;
    extra.insert("dense_gzip".into(), dense.gzip9.into());
    extra.insert("dense_bzip2".into(), dense.bzip2_9.into());
    if let Some(sparse) = sparse {
        let sparse = compressed_sizes(sparse)?;
        results.sizes_bytes.sparse_format = sparse.raw;
        extra.insert("sparse_format_gzip".into(), sparse.gzip9.into());
    }
    Ok(())
}
