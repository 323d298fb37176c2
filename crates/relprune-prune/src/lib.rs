//! The relprune pruning engine.
//!
//! - [`ParamSet`]: the model's parameters by name, which of them are prunable, snapshots.
//! - [`Masks`]: persistent 0/1 pruning masks; pruned weights stay exactly zero.
//! - [`Optimizer`]: [`MaskedSgd`] (momentum, Nesterov) and [`MaskedAdam`] (Adam, AdamW) apply the
//!   masks and the regularizer of `relprune-core` every step (fused on the CPU).
//! - [`Task`]: what the engine needs of a model + data: batch losses and evaluations.
//! - [`Trainer`]: epochs with progress and NaN checks; [`IterativePruning`]: the pruning algorithm
//!   (plateau, restore best, threshold bisection on the validation loss, stop rules, fine-tune).
//! - [`baselines`]: one-shot and gradual magnitude pruning, Han et al.'s prune-and-retrain, SNIP.
//! - [`reconstruct`]: layer-wise reconstruction pruning (SparseGPT) from the inputs' second moment.
//! - [`export`]: the pruned checkpoint, dense and in a compact sparse format.
//! - [`checkpoint`]: a checkpoint after every epoch, and resuming a run exactly where it stopped.
//! - [`progress`]: progress-bar styles whose ETA holds for steps of minutes.

pub mod adam;
pub mod baselines;
pub mod checkpoint;
pub mod error;
pub mod export;
pub mod iterative;
pub mod mask;
pub mod optim;
pub mod params;
pub mod progress;
pub mod reconstruct;
pub mod schedule;
pub mod task;
pub mod threshold;
pub mod trainer;

pub use adam::{AdamConfig, MaskedAdam};
pub use error::{Error, Result};
pub use iterative::{
    IterativePruning, PruneConfig, PruneOutcome, RestorePoint, RoundRecord, StopReason,
};
pub use mask::Masks;
pub use optim::{MaskedSgd, Optimizer, SgdConfig};
pub use params::{Param, ParamSet, Selection, Snapshot};
pub use schedule::{LrSchedule, LrScheduler};
pub use task::{Evaluation, MetricSpec, Split, Task};
pub use trainer::{EpochRecord, Trainer, NON_FINITE_RETRIES};
