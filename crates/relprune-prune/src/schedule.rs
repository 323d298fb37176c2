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
}

impl LrSchedule {
    /// The learning rate of epoch `epoch` (0-based).
    pub fn lr(&self, epoch: usize) -> f64 {
        match *self {
            Self::Constant { lr } => lr,
            Self::Cosine { lr, epochs } => {
                let t = (epoch as f64 / epochs.max(1) as f64).min(1.0);
                0.5 * lr * (1.0 + (std::f64::consts::PI * t).cos())
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
}
