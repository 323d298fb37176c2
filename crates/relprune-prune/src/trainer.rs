//! Training epochs: forward, backward, masked regularized step, with progress and NaN checks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use indicatif::ProgressBar;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checkpoint::{self, Checkpointer, PhaseStart, Progress};
use crate::schedule::LrScheduler;
use crate::{
    Error, Evaluation, LrSchedule, Masks, Optimizer, ParamSet, Result, Snapshot, Split, Task,
};

/// The loop state `fit` checkpoints after each epoch.
#[derive(Serialize, Deserialize)]
struct FitState {
    epoch: usize,
    records: Vec<EpochRecord>,
    scheduler: LrScheduler,
    best_metric: Option<f64>,
    /// The file in the checkpoint directory holding the best weights (`spill_best`).
    #[serde(default)]
    best_file: Option<String>,
}

/// Where `fit` keeps the best epoch's weights.
enum BestWeights {
    Memory(Snapshot),
    File(PathBuf),
}

fn to_json(v: &impl Serialize) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Config(format!("cannot encode phase state: {e}")))
}

fn from_json<R: DeserializeOwned>(v: Value, label: &str) -> Result<R> {
    serde_json::from_value(v).map_err(|e| {
        Error::Config(format!(
            "the checkpoint's state of phase `{label}` does not fit this run: {e}"
        ))
    })
}

/// What one epoch did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number within its phase (1-based).
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Validation loss and metric after the epoch.
    pub valid: Evaluation,
    /// Percentage of prunable weights still alive.
    pub remaining_pct: f64,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
}

/// The parameters, their masks and the optimizer: everything an epoch updates.
#[derive(Debug)]
pub struct Trainer {
    /// The model's parameters.
    pub params: ParamSet,
    /// The pruning masks.
    pub masks: Masks,
    /// The optimizer (regularizer on or off).
    pub optim: Box<dyn Optimizer>,
    /// Hide progress bars and log lines.
    pub quiet: bool,
    /// Training epochs run so far, all phases together (checkpointed; resume replays the data
    /// order from it).
    pub epochs_trained: usize,
    /// Where checkpoints go, if the run is checkpointed.
    pub checkpoints: Option<Checkpointer>,
    /// Keep `fit`'s best-epoch weights in a file in the checkpoint directory instead of in
    /// memory (checkpointed runs only): one copy of the trained weights less in RAM.
    pub spill_best: bool,
}

impl Trainer {
    /// A trainer over `params` with `masks` applied to the weights right away.
    pub fn new(params: ParamSet, masks: Masks, optim: impl Optimizer + 'static) -> Result<Self> {
        masks.apply(&params)?;
        Ok(Self {
            params,
            masks,
            optim: Box::new(optim),
            quiet: false,
            epochs_trained: 0,
            checkpoints: None,
            spill_best: false,
        })
    }

    /// Checkpoints this (new) run into `dir` after every epoch and phase; `run` describes it.
    pub fn checkpoint_into(&mut self, dir: &Path, run: Value) -> Result<()> {
        self.checkpoints = Some(Checkpointer::create(dir, run)?);
        Ok(())
    }

    /// Replaces the checkpointed run's description (see [`Checkpointer::set_run`]).
    pub fn set_run_description(&mut self, run: Value) {
        if let Some(c) = &mut self.checkpoints {
            c.set_run(run);
        }
    }

    /// Continues the run checkpointed in `dir`: loads weights, masks, optimizer state, learning
    /// rate, regularizer and epoch count, replays `task`'s data order, and returns the run's
    /// description. Later phases pick up where the run stopped.
    pub fn resume<T: Task + ?Sized>(&mut self, dir: &Path, task: &mut T) -> Result<Value> {
        let device = self
            .params
            .iter()
            .next()
            .map(|p| p.var.as_tensor().device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let saved = checkpoint::read(dir, &device)?;
        let path = dir.join(checkpoint::CHECKPOINT_FILE);
        checkpoint::restore(
            &saved,
            &path,
            &self.params,
            &mut self.masks,
            self.optim.as_mut(),
        )?;
        self.epochs_trained = saved.journal.epochs_trained;
        task.skip_epochs(self.epochs_trained)?;
        self.checkpoints = Some(Checkpointer::resumed(dir, &saved));
        Ok(saved.journal.run)
    }

    /// How phase `label` starts: afresh (always, without checkpoints), skipped, or resumed.
    pub fn phase_start(&mut self, label: &str) -> Result<PhaseStart> {
        match &mut self.checkpoints {
            Some(c) => c.phase_start(label),
            None => Ok(PhaseStart::Fresh),
        }
    }

    /// Checkpoints phase `label` in progress with its loop state and extra tensors.
    pub fn phase_save(
        &mut self,
        label: &str,
        state: &impl Serialize,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<()> {
        let state = to_json(state)?;
        self.write_checkpoint(label, Progress::Current(state), tensors)
    }

    /// Checkpoints the end of phase `label` with its output (what a resumed run gets back).
    pub fn phase_end(&mut self, label: &str, output: &impl Serialize) -> Result<()> {
        let output = to_json(output)?;
        self.write_checkpoint(label, Progress::Done(output), Vec::new())
    }

    fn write_checkpoint(
        &mut self,
        label: &str,
        progress: Progress,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<()> {
        if let Some(c) = &mut self.checkpoints {
            c.write(
                &self.params,
                &self.masks,
                self.optim.as_ref(),
                self.epochs_trained,
                label,
                progress,
                tensors,
            )?;
        }
        Ok(())
    }

    /// Runs a one-off step `f` as phase `label`: on resume after it finished, returns its stored
    /// output instead of running it again (its effects are in the checkpointed state).
    pub fn once<R: Serialize + DeserializeOwned>(
        &mut self,
        label: &str,
        f: impl FnOnce(&mut Self) -> Result<R>,
    ) -> Result<R> {
        if let PhaseStart::Done(v) = self.phase_start(label)? {
            return from_json(v, label);
        }
        let out = f(self)?;
        self.phase_end(label, &out)?;
        Ok(out)
    }

    /// Starts a training epoch of `task` (counted, so a resumed run replays the same data order).
    pub fn begin_epoch<T: Task + ?Sized>(&mut self, task: &mut T) -> Result<usize> {
        self.epochs_trained += 1;
        task.begin_epoch(self.epochs_trained)
    }

    /// Trains one epoch of `task` and returns the mean training loss. An epoch whose training
    /// loss goes non-finite is rolled back to its start (weights and optimizer state) and
    /// retried on the next data order at half the learning rate, at most
    /// [`NON_FINITE_RETRIES`] times (each logged); then the error is returned, before anything
    /// is checkpointed. The halved rate is the optimizer's from then on (a scheduled phase sets
    /// its next epoch's rate as planned) and is checkpointed, so a resumed run agrees.
    pub fn train_epoch<T: Task + ?Sized>(
        &mut self,
        task: &mut T,
        epoch: usize,
        bar: Option<&ProgressBar>,
    ) -> Result<f64> {
        let weights = self.params.snapshot()?;
        let optim_state = self
            .optim
            .state_tensors()?
            .into_iter()
            .map(|(k, t)| Ok((k, t.copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let mut retries = 0;
        loop {
            match self.train_epoch_once(task, epoch, bar) {
                Err(Error::NonFinite {
                    what: "training loss",
                    value,
                    at,
                }) if retries < NON_FINITE_RETRIES => {
                    retries += 1;
                    self.params.restore(&weights)?;
                    self.optim.load_state_tensors(&optim_state)?;
                    let lr = self.optim.lr() / 2.0;
                    self.optim.set_lr(lr);
                    let line = format!(
                        "training loss {value} at {at}: rolled back to the epoch's start, retrying                          at learning rate {lr:e} (retry {retries} of {NON_FINITE_RETRIES})"
                    );
                    match bar {
                        Some(b) => self.log(b, &line),
                        None if !self.quiet => eprintln!("{line}"),
                        None => {}
                    }
                }
                Err(Error::NonFinite { what, value, at }) if retries > 0 => {
                    // The weights are left as the epoch found them, never half-trained.
                    self.params.restore(&weights)?;
                    self.optim.load_state_tensors(&optim_state)?;
                    return Err(Error::NonFinite {
                        what,
                        value,
                        at: format!("{at}, after {retries} retries at halved learning rates"),
                    });
                }
                other => return other,
            }
        }
    }

    fn train_epoch_once<T: Task + ?Sized>(
        &mut self,
        task: &mut T,
        epoch: usize,
        bar: Option<&ProgressBar>,
    ) -> Result<f64> {
        let n = self.begin_epoch(task)?;
        if n == 0 {
            return Err(Error::Task("the training set yields no batch".into()));
        }
        let mut sum = 0.0f64;
        let by_outputs = self
            .optim
            .regularizer()
            .is_some_and(|r| r.lambda > 0.0 && r.relevance.needs_outputs());
        for i in 0..n {
            let (loss, outputs) = if by_outputs {
                let (l, y) = task.batch_loss_and_outputs(i)?;
                (l, Some(y))
            } else {
                (task.batch_loss(i)?, None)
            };
            let l = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !l.is_finite() {
                return Err(Error::NonFinite {
                    what: "training loss",
                    value: l,
                    at: format!("epoch {epoch}, batch {}", i + 1),
                });
            }
            sum += l;
            let grads = loss.backward()?;
            match outputs {
                None => self.optim.step(&self.params, &self.masks, &grads)?,
                Some(y) => {
                    let scores = self.output_sensitivity(&y)?;
                    self.optim
                        .step_scored(&self.params, &self.masks, &grads, Some(&scores))?
                }
            }
            if let Some(b) = bar {
                b.set_message(format!(
                    "epoch {epoch} batch {}/{n} loss {:.4}",
                    i + 1,
                    sum / (i + 1) as f64
                ));
            }
        }
        Ok(sum / n as f64)
    }

    /// The output sensitivity of every prunable parameter (one backward pass per output).
    fn output_sensitivity(&self, outputs: &Tensor) -> Result<HashMap<String, Tensor>> {
        let prunable: Vec<&crate::Param> = self.params.prunable().collect();
        let vars: Vec<&Tensor> = prunable.iter().map(|p| p.var.as_tensor()).collect();
        let scores = relprune_core::output_sensitivity(outputs, &vars)?;
        Ok(prunable
            .iter()
            .zip(scores)
            .filter_map(|(p, s)| s.map(|s| (p.name.clone(), s)))
            .collect())
    }

    /// Evaluates `task` on `split`, failing on a non-finite loss.
    pub fn evaluate<T: Task + ?Sized>(&self, task: &mut T, split: Split) -> Result<Evaluation> {
        let e = task.evaluate(split)?;
        if !e.loss.is_finite() {
            return Err(Error::NonFinite {
                what: "validation loss",
                value: e.loss,
                at: format!("{split:?} evaluation"),
            });
        }
        Ok(e)
    }

    /// Trains `epochs` epochs with the optimizer's current regularizer setting and `schedule`.
    ///
    /// With `keep_best`, the weights of the epoch with the best validation metric (the starting
    /// weights included) are restored at the end.
    pub fn fit<T: Task + ?Sized>(
        &mut self,
        task: &mut T,
        schedule: LrSchedule,
        epochs: usize,
        keep_best: bool,
        label: &str,
    ) -> Result<Vec<EpochRecord>> {
        let spec = task.metric();
        let mut state = match self.phase_start(label)? {
            PhaseStart::Done(v) => return from_json(v, label),
            PhaseStart::Resume { state, tensors } => {
                let st: FitState = from_json(state, label)?;
                let best = match (st.best_metric, &st.best_file) {
                    (Some(m), Some(file)) => Some((m, BestWeights::File(self.spill_path(file)?))),
                    (Some(m), None) => Some((
                        m,
                        BestWeights::Memory(checkpoint::snapshot_from(&tensors, "best")?),
                    )),
                    (None, _) => None,
                };
                (st, best)
            }
            PhaseStart::Fresh => {
                let best = if keep_best {
                    let e = self.evaluate(task, Split::Valid)?;
                    Some((e.metric, self.keep_weights(label, 0)?))
                } else {
                    None
                };
                let st = FitState {
                    epoch: 0,
                    records: Vec::with_capacity(epochs),
                    scheduler: LrScheduler::new(schedule),
                    best_metric: None,
                    best_file: None,
                };
                (st, best)
            }
        };
        let bar = self.progress_bar(epochs as u64, label);
        bar.set_position(state.0.epoch as u64);
        let (st, best) = &mut state;
        for epoch in st.epoch + 1..=epochs {
            let t0 = Instant::now();
            let lr = st.scheduler.lr(epoch - 1);
            self.optim.set_lr(lr);
            let train_loss = self.train_epoch(task, epoch, Some(&bar))?;
            let valid = self.evaluate(task, Split::Valid)?;
            st.scheduler.observe(valid.loss);
            let remaining_pct = 100.0 * self.masks.remaining_fraction()?;
            let rec = EpochRecord {
                epoch,
                lr,
                train_loss,
                valid,
                remaining_pct,
                seconds: t0.elapsed().as_secs_f64(),
            };
            self.log(&bar, &format!(
                "{label} epoch {epoch}/{epochs}: lr {lr:.4} train loss {train_loss:.4} | valid loss {:.4} {} {:.3} | remaining {remaining_pct:.2}% | {:.1}s",
                valid.loss, spec.name, valid.metric, rec.seconds
            ));
            // A file replaced by a newer best is deleted only once the checkpoint no longer
            // names it: an interruption in between resumes from the old one.
            let mut superseded = None;
            if let Some((b, weights)) = best {
                if spec.worsening(valid.metric, *b) < 0.0 {
                    *b = valid.metric;
                    let old = std::mem::replace(weights, BestWeights::Memory(Snapshot::default()));
                    let (new, stale) = match old {
                        BestWeights::Memory(mut snap) => {
                            self.params.snapshot_into(&mut snap)?;
                            (BestWeights::Memory(snap), None)
                        }
                        BestWeights::File(path) => (self.keep_weights(label, epoch)?, Some(path)),
                    };
                    *weights = new;
                    superseded = stale;
                }
            }
            st.records.push(rec);
            st.epoch = epoch;
            bar.inc(1);
            if self.checkpoints.is_some() {
                st.best_metric = best.as_ref().map(|(m, _)| *m);
                st.best_file = match best {
                    Some((_, BestWeights::File(p))) => file_name(p),
                    _ => None,
                };
                let tensors = match best {
                    Some((_, BestWeights::Memory(snap))) => {
                        checkpoint::snapshot_tensors("best", snap)
                    }
                    _ => Vec::new(),
                };
                self.phase_save(label, &*st, tensors)?;
            }
            if let Some(p) = superseded {
                // Best effort: a leftover file only costs disk space in the checkpoint directory.
                let _ = std::fs::remove_file(p);
            }
        }
        bar.finish_and_clear();
        let (st, best) = state;
        let spilled = match best {
            Some((_, BestWeights::Memory(snap))) => {
                self.params.restore(&snap)?;
                None
            }
            Some((_, BestWeights::File(path))) => {
                checkpoint::restore_params_file(&path, &self.params)?;
                Some(path)
            }
            None => None,
        };
        self.phase_end(label, &st.records)?;
        if let Some(p) = spilled {
            let _ = std::fs::remove_file(p);
        }
        Ok(st.records)
    }

    /// The current weights kept as the best so far: in memory, or (`spill_best` with
    /// checkpoints) in a new file of the checkpoint directory named after `label` and `epoch`.
    fn keep_weights(&self, label: &str, epoch: usize) -> Result<BestWeights> {
        match (&self.checkpoints, self.spill_best) {
            (Some(_), true) => {
                let slug: String = label
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .collect();
                let path = self.spill_path(&format!("best-{slug}-{epoch}.safetensors"))?;
                checkpoint::write_params_file(&path, &self.params)?;
                Ok(BestWeights::File(path))
            }
            _ => Ok(BestWeights::Memory(self.params.snapshot()?)),
        }
    }

    /// `file` inside the checkpoint directory.
    fn spill_path(&self, file: &str) -> Result<PathBuf> {
        let dir = self
            .checkpoints
            .as_ref()
            .and_then(|c| c.path().parent())
            .ok_or_else(|| {
                Error::Config("the best weights are in a file, but no checkpoint directory".into())
            })?;
        Ok(dir.join(file))
    }

    /// A progress bar over `len` epochs (hidden when `quiet` or when stderr is not a terminal).
    pub fn progress_bar(&self, len: u64, label: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(crate::progress::style(
            "{prefix:>10} [{bar:30}] {pos}/{len} epochs {elapsed_precise} eta {eta} {msg}",
        ));
        bar.set_prefix(label.to_string());
        bar
    }

    /// Prints a line above the bar, or to stderr when the bar is not drawn (logs, CI).
    pub fn log(&self, bar: &ProgressBar, line: &str) {
        if self.quiet {
            return;
        }
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }
}

/// Retries of an epoch whose training loss went non-finite (see [`Trainer::train_epoch`]).
pub const NON_FINITE_RETRIES: usize = 2;

/// The last component of `p` as a string.
fn file_name(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}
