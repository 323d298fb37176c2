//! The iterative algorithm's plateau rule: which weights a plateau restores.

// Shared with resume.rs, which uses all of it.
#[allow(dead_code)]
mod common;

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use common::{toy, Toy};
use relprune_core::SelectiveDecay;
use relprune_prune::threshold::BisectionConfig;
use relprune_prune::{
    Evaluation, IterativePruning, MaskedSgd, Masks, MetricSpec, PruneConfig, RestorePoint,
    SgdConfig, Split, Task, Trainer,
};

/// The toy task, recording the validation loss measured right after each training epoch.
struct Recording {
    toy: Toy,
    epochs_begun: usize,
    after_epoch: Arc<Mutex<Vec<f64>>>,
}

impl Task for Recording {
    fn metric(&self) -> MetricSpec {
        self.toy.metric()
    }

    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        self.epochs_begun += 1;
        self.toy.begin_epoch(epoch)
    }

    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        self.toy.batch_loss(index)
    }

    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        let e = self.toy.evaluate(split)?;
        let mut seen = self.after_epoch.lock().unwrap();
        if seen.len() < self.epochs_begun {
            seen.push(e.loss);
        }
        Ok(e)
    }
}

/// Two epochs that both lower the loss but never by `min_improvement`, then the plateau's round.
/// Returns (reference loss, the epochs' losses, the round's loss after its search).
fn plateau_after_two_small_gains(restore: RestorePoint) -> (f64, Vec<f64>, f64) {
    let twt = 1e-3;
    let cfg = PruneConfig {
        regularizer: SelectiveDecay::default().with_lambda(0.0),
        lr: 0.05,
        bisection: BisectionConfig {
            twt,
            ..Default::default()
        },
        delta: 100.0,
        patience: 2,
        min_improvement: 0.9,
        restore,
        max_epochs: 2,
        finetune_epochs: 0,
        ..PruneConfig::default()
    };
    let (toy, params) = toy(None);
    let masks = Masks::dense(&params).unwrap();
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        nesterov: false,
    };
    let mut trainer = Trainer::new(params, masks, MaskedSgd::new(sgd, None).unwrap()).unwrap();
    trainer.quiet = true;
    let after_epoch = Arc::new(Mutex::new(Vec::new()));
    let mut task = Recording {
        toy,
        epochs_begun: 0,
        after_epoch: after_epoch.clone(),
    };
    let outcome = IterativePruning::new(cfg)
        .unwrap()
        .run(&mut trainer, &mut task)
        .unwrap();
    assert_eq!(
        outcome.rounds.len(),
        1,
        "the plateau after epoch 2 prunes once"
    );
    let epochs = after_epoch.lock().unwrap().clone();
    (outcome.reference.loss, epochs, outcome.rounds[0].valid.loss)
}

#[test]
fn a_plateau_restores_the_last_improving_epoch_or_the_lowest_loss_as_configured() {
    let (reference, epochs, round) = plateau_after_two_small_gains(RestorePoint::LastImprovement);
    let lowest = epochs.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(epochs.len(), 2);
    assert!(
        lowest < 0.95 * reference,
        "training should lower the loss: {reference} -> {epochs:?}"
    );
    // No epoch improved by 90%: the start is what is restored, and the search is bounded by its
    // loss, so the round ends above what training reached.
    assert!(
        round <= reference * (1.0 + 1e-3) + 1e-9,
        "{round} vs {reference}"
    );
    assert!(round > lowest * (1.0 + 1e-3), "{round} vs {epochs:?}");

    let (reference2, epochs2, round2) = plateau_after_two_small_gains(RestorePoint::LowestLoss);
    assert_eq!(
        (reference, &epochs),
        (reference2, &epochs2),
        "same training"
    );
    // The lowest-loss epoch is restored, and the round's loss is bounded by its loss.
    assert!(
        round2 <= lowest * (1.0 + 1e-3) + 1e-9,
        "{round2} vs {epochs:?}"
    );
}
