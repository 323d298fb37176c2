//! A training loss that goes non-finite: rolled back, retried at half the learning rate, then a
//! clean error.

#[allow(dead_code)]
mod common;

use candle_core::Tensor;
use common::{toy, weights, Toy};
use relprune_prune::{
    Error, Evaluation, LrSchedule, MaskedSgd, Masks, MetricSpec, SgdConfig, Split, Task, Trainer,
    NON_FINITE_RETRIES,
};

/// The toy, whose loss is NaN at batch 3 of the data orders numbered in `poisoned`.
struct Poisoned {
    toy: Toy,
    epoch: usize,
    poisoned: Vec<usize>,
}

impl Task for Poisoned {
    fn metric(&self) -> MetricSpec {
        self.toy.metric()
    }

    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        self.epoch = epoch;
        self.toy.begin_epoch(epoch)
    }

    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        let loss = self.toy.batch_loss(index)?;
        if index == 3 && self.poisoned.contains(&self.epoch) {
            // After three optimizer steps of the epoch: the rollback has something to undo.
            return Ok((loss * f64::NAN)?);
        }
        Ok(loss)
    }

    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        self.toy.evaluate(split)
    }
}

fn trainer(params: relprune_prune::ParamSet) -> Trainer {
    let masks = Masks::dense(&params).unwrap();
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        nesterov: false,
    };
    let mut t = Trainer::new(params, masks, MaskedSgd::new(sgd, None).unwrap()).unwrap();
    t.quiet = true;
    t
}

#[test]
fn a_non_finite_epoch_is_rolled_back_and_retried_at_half_the_rate_on_the_next_data_order() {
    // Data orders 2 and 3 go NaN: epoch 2 is retried twice and succeeds on order 4 at lr / 4.
    let (toy_a, params_a) = toy(None);
    let mut task = Poisoned {
        toy: toy_a,
        epoch: 0,
        poisoned: vec![2, 3],
    };
    let mut a = trainer(params_a);
    let schedule = LrSchedule::Constant { lr: 0.05 };
    a.fit(&mut task, schedule, 2, false, "dense").unwrap();
    assert_eq!(a.optim.lr(), 0.0125);

    // The same by hand: epoch 1, two data orders skipped, epoch 2 at a quarter of the rate.
    let (mut toy_b, params_b) = toy(None);
    let mut b = trainer(params_b);
    b.train_epoch(&mut toy_b, 1, None).unwrap();
    b.begin_epoch(&mut toy_b).unwrap();
    b.begin_epoch(&mut toy_b).unwrap();
    b.optim.set_lr(0.0125);
    b.train_epoch(&mut toy_b, 2, None).unwrap();
    assert_eq!(weights(&a.params), weights(&b.params));
}

#[test]
fn a_loss_that_stays_non_finite_fails_cleanly_after_the_retries() {
    let (toy_a, params) = toy(None);
    let mut task = Poisoned {
        toy: toy_a,
        epoch: 0,
        poisoned: vec![2, 3, 4],
    };
    let mut t = trainer(params);
    t.train_epoch(&mut task, 1, None).unwrap();
    let before = weights(&t.params);
    let e = t.train_epoch(&mut task, 2, None).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("after {NON_FINITE_RETRIES} retries")),
        "{msg}"
    );
    // The weights are the epoch's start, not a half-trained or NaN state.
    assert_eq!(weights(&t.params), before);
}
