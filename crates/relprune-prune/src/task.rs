//! What the engine needs of a model and its data, whatever the model and the metric.

/// The task metric: its name and direction.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricSpec {
    /// The name used in reports, e.g. `top1_error_pct` or `bleu`.
    pub name: String,
    /// Whether a larger value is better (BLEU) or worse (error).
    pub higher_is_better: bool,
}

impl MetricSpec {
    /// How much worse `value` is than `reference` (positive = worse), in the metric's units.
    pub fn worsening(&self, value: f64, reference: f64) -> f64 {
        if self.higher_is_better {
            reference - value
        } else {
            value - reference
        }
    }
}

/// Which held-out split to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The validation split, which the algorithm may look at.
    Valid,
    /// The test split, for reporting only.
    Test,
}

/// Loss and metric on a split.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f64,
    /// The task metric.
    pub metric: f64,
}

/// A model with its data: the engine trains through batch losses and judges through evaluations.
pub trait Task {
    /// The metric [`Task::evaluate`] reports.
    fn metric(&self) -> MetricSpec;
    /// Prepares a training epoch (e.g. shuffles) and returns its number of batches; `epoch`
    /// counts the epochs of the whole run from 1 (the [`crate::Trainer`] numbers them).
    fn begin_epoch(&mut self, epoch: usize) -> crate::Result<usize>;
    /// The scalar training loss of batch `index` of the current epoch, in training mode.
    fn batch_loss(&mut self, index: usize) -> crate::Result<candle_core::Tensor>;
    /// [`Task::batch_loss`] plus the network outputs `y` of the batch, outputs on the last
    /// dimension (e.g. softmax probabilities), for the output-sensitivity relevance.
    fn batch_loss_and_outputs(
        &mut self,
        index: usize,
    ) -> crate::Result<(candle_core::Tensor, candle_core::Tensor)> {
        let _ = index;
        Err(crate::Error::Task(
            "this task does not expose its network outputs, which the output-sensitivity \
             relevance needs (implement Task::batch_loss_and_outputs)"
                .into(),
        ))
    }
    /// Loss and metric on a held-out split, in evaluation mode.
    fn evaluate(&mut self, split: Split) -> crate::Result<Evaluation>;
    /// Puts the task's random state where it is after `epochs` training epochs (on resume).
    ///
    /// The default replays `begin_epoch`, which is exact for tasks that draw random numbers only
    /// there (shuffling); a task that draws elsewhere (e.g. dropout) must override it.
    fn skip_epochs(&mut self, epochs: usize) -> crate::Result<()> {
        for e in 1..=epochs {
            self.begin_epoch(e)?;
        }
        Ok(())
    }
}
