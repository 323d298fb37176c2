//! Learning-rate schedules over epochs.

use serde::{Deserialize, Serialize};

/// How the learning rate changes from epoch to epoch.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LrSchedule {
    /// The same rate every epoch.
    Constant {
        /// The rate.
        lr: f64,
    },
    /// Cosine decay from `lr` to 0 over `epochs` epochs.
    Cosine {
        /// The starting rate.
        lr: f64,
        /// The length of the decay.
        epochs: usize,
    },
    /// `lr · gamma^⌊epoch / every⌋`.
    Step {
        /// The starting rate.
        lr: f64,
        /// Epochs between decays.
        every: usize,
        /// Factor of each decay.
        gamma: f64,
    },
    /// Multiply the rate by `factor` after `patience` epochs without a 1% validation-loss decrease.
    ReduceOnPlateau {
        /// The starting rate.
        lr: f64,
        /// Factor of each reduction.
        factor: f64,
        /// Epochs without improvement before a reduction.
        patience: usize,
        /// The rate never goes below this.
        min_lr: f64,
    },
}

impl LrSchedule {
    /// The learning rate of epoch `epoch` (0-based) for the schedules that depend on the epoch
    /// only; `ReduceOnPlateau` gives its starting rate (use an [`LrScheduler`] to drive it).
    pub fn lr(&self, epoch: usize) -> f64 {
        match *self {
            Self::Constant { lr } | Self::ReduceOnPlateau { lr, .. } => lr,
            Self::Cosine { lr, epochs } => {
                let t = (epoch as f64 / epochs.max(1) as f64).min(1.0);
                0.5 * lr * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Self::Step { lr, every, gamma } => lr * gamma.powi((epoch / every.max(1)) as i32),
        }
    }
}

/// A schedule with the state a feedback schedule needs (serializable, for checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrScheduler {
    schedule: LrSchedule,
    current: f64,
    // None until the first observation (JSON has no infinity).
    best: Option<f64>,
    bad_epochs: usize,
}

impl LrScheduler {
    /// A scheduler starting at the schedule's first rate.
    pub fn new(schedule: LrSchedule) -> Self {
        Self {
            schedule,
            current: schedule.lr(0),
            best: None,
            bad_epochs: 0,
        }
    }

    /// The rate to use for epoch `epoch` (0-based).
    pub fn lr(&self, epoch: usize) -> f64 {
        match self.schedule {
            LrSchedule::ReduceOnPlateau { .. } => self.current,
            s => s.lr(epoch),
        }
    }

    /// Tells the scheduler the validation loss at the end of an epoch.
    pub fn observe(&mut self, valid_loss: f64) {
        if let LrSchedule::ReduceOnPlateau {
            factor,
            patience,
            min_lr,
            ..
        } = self.schedule
        {
            if self.best.is_none_or(|b| valid_loss < b * (1.0 - 0.01)) {
                self.best = Some(valid_loss);
                self.bad_epochs = 0;
            } else {
                self.bad_epochs += 1;
                if self.bad_epochs >= patience.max(1) {
                    self.current = (self.current * factor).max(min_lr);
                    self.bad_epochs = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_starts_at_lr_halves_midway_and_ends_at_zero() {
        let s = LrSchedule::Cosine {
            lr: 0.1,
            epochs: 10,
        };
        assert_eq!(s.lr(0), 0.1);
        assert!((s.lr(5) - 0.05).abs() < 1e-12);
        assert!(s.lr(10).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant { lr: 0.3 }.lr(99), 0.3);
    }

    #[test]
    fn step_decays_by_gamma_every_n_epochs() {
        let s = LrSchedule::Step {
            lr: 1.0,
            every: 3,
            gamma: 0.5,
        };
        let lrs: Vec<f64> = (0..7).map(|e| s.lr(e)).collect();
        assert_eq!(lrs, vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]);
    }

    #[test]
    fn reduce_on_plateau_cuts_the_rate_after_patience_bad_epochs_down_to_the_floor() {
        let mut s = LrScheduler::new(LrSchedule::ReduceOnPlateau {
            lr: 0.1,
            factor: 0.5,
            patience: 2,
            min_lr: 0.02,
        });
        s.observe(1.0); // improvement
        s.observe(0.995); // < 1% better: bad 1
        assert_eq!(s.lr(2), 0.1);
        s.observe(0.999); // bad 2 → 0.05
        assert_eq!(s.lr(3), 0.05);
        s.observe(0.5); // improvement resets
        s.observe(0.6);
        s.observe(0.6); // → 0.025
        s.observe(0.6);
        s.observe(0.6); // → floor 0.02
        assert_eq!(s.lr(9), 0.02);
    }
}
