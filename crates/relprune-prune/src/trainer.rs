//! Training epochs: forward, backward, masked regularized step, with progress and NaN checks.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::schedule::LrScheduler;
use crate::{Error, Evaluation, LrSchedule, Masks, Optimizer, ParamSet, Result, Split, Task};

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
        })
    }

    /// Trains one epoch of `task` and returns the mean training loss.
    pub fn train_epoch<T: Task + ?Sized>(
        &mut self,
        task: &mut T,
        epoch: usize,
        bar: Option<&ProgressBar>,
    ) -> Result<f64> {
        let n = task.begin_epoch(epoch)?;
        if n == 0 {
            return Err(Error::Task("the training set yields no batch".into()));
        }
        let mut sum = 0.0f64;
        for i in 0..n {
            let loss = task.batch_loss(i)?;
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
            self.optim.step(&self.params, &self.masks, &grads)?;
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
        let bar = self.progress_bar(epochs as u64, label);
        let mut records = Vec::with_capacity(epochs);
        let mut scheduler = LrScheduler::new(schedule);
        let mut best = if keep_best {
            let e = self.evaluate(task, Split::Valid)?;
            Some((e.metric, self.params.snapshot()?))
        } else {
            None
        };
        for epoch in 1..=epochs {
            let t0 = Instant::now();
            let lr = scheduler.lr(epoch - 1);
            self.optim.set_lr(lr);
            let train_loss = self.train_epoch(task, epoch, Some(&bar))?;
            let valid = self.evaluate(task, Split::Valid)?;
            scheduler.observe(valid.loss);
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
            if let Some((b, snap)) = &mut best {
                if spec.worsening(valid.metric, *b) < 0.0 {
                    *b = valid.metric;
                    *snap = self.params.snapshot()?;
                }
            }
            records.push(rec);
            bar.inc(1);
        }
        bar.finish_and_clear();
        if let Some((_, snap)) = best {
            self.params.restore(&snap)?;
        }
        Ok(records)
    }

    /// A progress bar over `len` epochs (hidden when `quiet` or when stderr is not a terminal).
    pub fn progress_bar(&self, len: u64, label: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} epochs {elapsed_precise} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
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
