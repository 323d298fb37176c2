//! The iterative algorithm: which weights a plateau restores, and which rounds are judged.

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
    SgdConfig, Split, StopReason, Task, Trainer,
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

/// The untrained toy and a quiet trainer for it (SGD, lr 0.05, momentum 0.9, no masks yet).
fn toy_trainer() -> (Toy, Trainer) {
    let (toy, params) = toy(None);
    let masks = Masks::dense(&params).unwrap();
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        nesterov: false,
    };
    let mut trainer = Trainer::new(params, masks, MaskedSgd::new(sgd, None).unwrap()).unwrap();
    trainer.quiet = true;
    (toy, trainer)
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
    let (toy, mut trainer) = toy_trainer();
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

/// The toy task with the validation loss as its metric, so budgets can be set in loss units.
struct LossIsMetric(Toy);

impl Task for LossIsMetric {
    fn metric(&self) -> MetricSpec {
        self.0.metric()
    }

    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        self.0.begin_epoch(epoch)
    }

    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        self.0.batch_loss(index)
    }

    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        let e = self.0.evaluate(split)?;
        Ok(Evaluation {
            loss: e.loss,
            metric: e.loss,
        })
    }
}

/// A trained toy (10 plain epochs) and its validation loss, ready for the pruning phase.
fn trained_toy() -> (Trainer, LossIsMetric, f64) {
    let (toy, mut trainer) = toy_trainer();
    let mut task = LossIsMetric(toy);
    trainer
        .fit(
            &mut task,
            relprune_prune::LrSchedule::Constant { lr: 0.05 },
            10,
            false,
            "dense",
        )
        .unwrap();
    let reference = task.evaluate(Split::Valid).unwrap().loss;
    (trainer, task, reference)
}

/// A round after every epoch that may raise the loss by half: over a budget of 35% of the
/// reference right after pruning, back within it once retrained.
fn prune_generously(
    judge_retrained: bool,
    target_sparsity: Option<f64>,
    max_epochs: usize,
    patience: usize,
) -> (relprune_prune::PruneOutcome, f64, f64) {
    prune_generously_with(
        judge_retrained,
        target_sparsity,
        max_epochs,
        patience,
        |_, _| {},
    )
}

/// [`prune_generously`] with `adjust(config, reference)` applied last; returns its `δ`.
fn prune_generously_with(
    judge_retrained: bool,
    target_sparsity: Option<f64>,
    max_epochs: usize,
    patience: usize,
    adjust: impl FnOnce(&mut PruneConfig, f64),
) -> (relprune_prune::PruneOutcome, f64, f64) {
    let (mut trainer, mut task, reference) = trained_toy();
    let mut cfg = PruneConfig {
        regularizer: SelectiveDecay::default().with_lambda(0.0),
        lr: 0.05,
        bisection: BisectionConfig {
            twt: 0.5,
            ..Default::default()
        },
        delta: 0.35 * reference,
        patience,
        min_improvement: 0.99,
        restore: RestorePoint::LowestLoss,
        judge_retrained,
        max_epochs,
        target_sparsity,
        finetune_epochs: 0,
        ..PruneConfig::default()
    };
    adjust(&mut cfg, reference);
    let delta = cfg.delta;
    let outcome = IterativePruning::new(cfg)
        .unwrap()
        .run(&mut trainer, &mut task)
        .unwrap();
    (outcome, reference, delta)
}

#[test]
fn judging_retrained_masks_keeps_a_round_that_was_over_budget_only_right_after_pruning() {
    let (plain, reference, delta) = prune_generously(false, None, 2, 1);
    assert_eq!(plain.rounds.len(), 2, "{:?}", plain.rounds);
    for r in &plain.rounds {
        assert!(
            r.valid.metric > reference + delta && !r.within_budget,
            "premise: every round is over budget right after pruning: {r:?} vs {reference}"
        );
        assert_eq!(r.retrained, None);
    }
    assert_eq!(plain.result_round, None, "nothing within budget: the start");

    let (judged, reference2, _) = prune_generously(true, None, 2, 1);
    assert_eq!(reference, reference2);
    assert_eq!(
        plain.rounds[0].valid, judged.rounds[0].valid,
        "same trajectory"
    );
    let retrained = judged.rounds[0]
        .retrained
        .expect("round 1 judged at epoch 2");
    assert!(retrained.metric <= reference + delta, "{retrained:?}");
    // Round 2 happened at the last epoch: never retrained, never judged again.
    assert_eq!(judged.rounds[1].retrained, None);
    assert_eq!(judged.result_round, Some(1));
    // The result is the retrained model with round 1's masks.
    assert_eq!(judged.before_finetune, retrained);
}

#[test]
fn judged_once_retrained_rounds_far_down_right_after_pruning_do_not_trigger_the_drift_stop() {
    // δ a fifth of the reference and K = 1: every round is more than 2δ worse right after
    // pruning, so the literal rule stops at round 1.
    let tight = |c: &mut PruneConfig, reference: f64| {
        c.delta = 0.2 * reference;
        c.stop_rounds = 1;
    };
    let (plain, reference, delta) = prune_generously_with(false, None, 4, 1, tight);
    assert_eq!(plain.stop_reason, StopReason::MetricDrift);
    assert_eq!(plain.rounds.len(), 1);
    assert!(plain.rounds[0].valid.metric > reference + 2.0 * delta);
    // Judged once retrained, round after round is back within 2δ: the run goes on to its
    // epoch budget, one round per epoch.
    let (judged, _, _) = prune_generously_with(true, None, 4, 1, tight);
    assert_eq!(judged.stop_reason, StopReason::EpochBudget);
    assert_eq!(judged.rounds.len(), 4);
    for r in &judged.rounds[..3] {
        assert!(r.valid.metric > reference + 2.0 * delta, "premise: {r:?}");
        let retrained = r.retrained.expect("judged at the next epoch");
        assert!(retrained.metric <= reference + 2.0 * delta, "{r:?}");
    }
}

#[test]
fn with_judged_retraining_the_target_stop_and_the_epoch_budget_wait_for_the_judgement() {
    // Round 1 lands on the target; without judging the phase ends there. Also for targets that
    // are no whole count of weights (the landing is then a hair under them as a fraction).
    for target in [0.3, 0.3004, 0.2996] {
        let (plain, _, _) = prune_generously(false, Some(target), 5, 1);
        assert_eq!(plain.epochs, 1, "{target}");
        let (judged, _, _) = prune_generously(true, Some(target), 5, 1);
        assert_eq!(judged.epochs, 2, "{target}");
    }
    let (plain, _, _) = prune_generously(false, Some(0.3), 5, 1);
    assert_eq!(plain.epochs, 1);
    // With it, one more epoch retrains the masks, the plateau judges them, and the phase ends
    // without another search.
    let (judged, _, _) = prune_generously(true, Some(0.3), 5, 1);
    assert_eq!(judged.epochs, 2);
    assert_eq!(judged.rounds.len(), 1);
    assert_eq!(
        judged.stop_reason,
        relprune_prune::StopReason::TargetSparsity
    );
    assert!(
        (judged.rounds[0].remaining_pct - 70.0).abs() < 0.5,
        "{judged:?}"
    );
    assert!(judged.rounds[0].retrained.is_some());
    assert_eq!(judged.result_round, Some(1));

    // Patience 2: the round at epoch 2, then epoch 3 ends the budget before a plateau; the end
    // of the phase judges the retrained masks.
    let (budget, _, _) = prune_generously(true, None, 3, 2);
    assert_eq!(budget.rounds.len(), 1);
    assert_eq!(budget.epochs, 3);
    assert!(budget.rounds[0].retrained.is_some());
    assert_eq!(budget.result_round, Some(1));
}

/// One epoch under a strong regularizer from the trained toy, then a round with a 1% tolerance.
/// Returns (reference loss, the round's loss after pruning).
fn strong_decay_round(restore: RestorePoint) -> (f64, f64) {
    let (mut trainer, mut task, reference) = trained_toy();
    let cfg = PruneConfig {
        regularizer: SelectiveDecay::l2(0.02),
        lr: 0.05,
        bisection: BisectionConfig {
            twt: 0.01,
            ..Default::default()
        },
        delta: 100.0,
        patience: 1,
        min_improvement: 0.99,
        restore,
        max_epochs: 1,
        finetune_epochs: 0,
        ..PruneConfig::default()
    };
    let outcome = IterativePruning::new(cfg)
        .unwrap()
        .run(&mut trainer, &mut task)
        .unwrap();
    assert_eq!(outcome.rounds.len(), 1);
    (reference, outcome.rounds[0].valid.loss)
}

#[test]
fn restoring_the_current_weights_keeps_what_the_regularizer_shrank() {
    // The decayed epoch is worse than the start: the lowest-loss rule goes back to the start, and
    // the round stays within 1% of the start's loss.
    let (reference, lowest) = strong_decay_round(RestorePoint::LowestLoss);
    assert!(lowest <= reference * 1.01 + 1e-9, "{lowest} vs {reference}");
    // `Current` keeps the decayed weights: the round starts from their (higher) loss.
    let (reference2, current) = strong_decay_round(RestorePoint::Current);
    assert_eq!(reference, reference2);
    assert!(current > reference * 1.01, "{current} vs {reference}");
}
