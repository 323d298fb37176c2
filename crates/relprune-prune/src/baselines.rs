//! The baselines the method is compared against: pruning by magnitude (one-shot, Han et al.'s
//! iterative prune-and-retrain, Zhu & Gupta's gradual schedule) and SNIP at initialization.
//!
//! Each works on a [`Trainer`] and a [`Task`] like [`crate::IterativePruning`] and leaves its
//! result in the trainer. None uses the regularizer.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::{Error, Evaluation, LrSchedule, Result, Split, Task, Trainer};

/// What a baseline produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BaselineOutcome {
    /// The method's name.
    pub method: String,
    /// (epoch, remaining %, validation evaluation) after each pruning step.
    pub steps: Vec<(usize, f64, Evaluation)>,
    /// The result on the validation split before fine-tuning.
    pub before_finetune: Evaluation,
    /// The result on the validation split after fine-tuning.
    pub after_finetune: Evaluation,
    /// Epochs trained (fine-tune included).
    pub epochs: usize,
    /// Wall seconds.
    pub seconds: f64,
}

/// Fine-tuning after pruning: epochs and the starting rate of a cosine schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finetune {
    /// Epochs (the best validation epoch is kept).
    pub epochs: usize,
    /// Starting learning rate.
    pub lr: f64,
}

fn record<T: Task + ?Sized>(
    trainer: &Trainer,
    task: &mut T,
    epoch: usize,
    steps: &mut Vec<(usize, f64, Evaluation)>,
) -> Result<Evaluation> {
    let e = trainer.evaluate(task, Split::Valid)?;
    steps.push((epoch, 100.0 * trainer.masks.remaining_fraction()?, e));
    Ok(e)
}

fn finish<T: Task + ?Sized>(
    method: &str,
    trainer: &mut Trainer,
    task: &mut T,
    steps: Vec<(usize, f64, Evaluation)>,
    trained: usize,
    ft: Finetune,
    t0: Instant,
) -> Result<BaselineOutcome> {
    let before_finetune = trainer.once("before fine-tune", |trainer| {
        trainer.optim.set_regularizer(None)?;
        trainer.optim.reset_state();
        trainer.evaluate(task, Split::Valid)
    })?;
    trainer.fit(
        task,
        LrSchedule::Cosine {
            lr: ft.lr,
            epochs: ft.epochs,
        },
        ft.epochs,
        true,
        "fine-tune",
    )?;
    trainer.masks.apply(&trainer.params)?;
    let after_finetune = trainer.evaluate(task, Split::Valid)?;
    Ok(BaselineOutcome {
        method: method.into(),
        steps,
        before_finetune,
        after_finetune,
        epochs: trained + ft.epochs,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One-shot magnitude pruning of the (trained) model to `sparsity`, globally, then fine-tuning.
pub fn one_shot_magnitude<T: Task + ?Sized>(
    trainer: &mut Trainer,
    task: &mut T,
    sparsity: f64,
    ft: Finetune,
) -> Result<BaselineOutcome> {
    let t0 = Instant::now();
    let steps = trainer.once("one-shot prune", |trainer| {
        trainer
            .masks
            .prune_to_sparsity(&trainer.params, sparsity, false)?;
        let mut steps = Vec::new();
        record(trainer, task, 0, &mut steps)?;
        Ok(steps)
    })?;
    finish("one-shot-magnitude", trainer, task, steps, 0, ft, t0)
}

/// The sparsity of Zhu & Gupta's cubic schedule at pruning step `k` of `n` (0-based, clamped):
/// `s_f + (s_i − s_f)(1 − k/n)³`.
pub fn cubic_sparsity(initial: f64, final_: f64, k: usize, n: usize) -> f64 {
    let t = (k as f64 / n.max(1) as f64).min(1.0);
    final_ + (initial - final_) * (1.0 - t).powi(3)
}

/// Gradual magnitude pruning (Zhu & Gupta 2017): `n` pruning steps, one every `every` epochs of
/// training at `lr`, each to the cubic schedule's sparsity (global magnitude), then fine-tuning.
pub fn gradual_magnitude<T: Task + ?Sized>(
    trainer: &mut Trainer,
    task: &mut T,
    final_sparsity: f64,
    n: usize,
    every: usize,
    lr: f64,
    ft: Finetune,
) -> Result<BaselineOutcome> {
    let t0 = Instant::now();
    trainer.optim.set_regularizer(None)?;
    let mut steps = Vec::new();
    let mut epochs = 0;
    let initial = 1.0 - trainer.masks.remaining_fraction()?;
    for k in 1..=n {
        let target = cubic_sparsity(initial, final_sparsity, k, n);
        let step = trainer.once(&format!("gmp prune {k}"), |trainer| {
            trainer
                .masks
                .prune_to_sparsity(&trainer.params, target, false)?;
            trainer.optim.reset_state();
            let mut one = Vec::new();
            record(trainer, task, epochs, &mut one)?;
            Ok(one)
        })?;
        steps.extend(step);
        if k < n {
            let label = format!("gmp {k}");
            trainer.fit(task, LrSchedule::Constant { lr }, every, false, &label)?;
            epochs += every;
        }
    }
    finish("gradual-magnitude", trainer, task, steps, epochs, ft, t0)
}

/// Han et al. (2015): `rounds` times, prune every weight below `quality` × the standard deviation
/// of its layer's alive weights, then retrain `retrain_epochs` at `lr`; the last retrain is the
/// fine-tune.
pub fn han_iterative<T: Task + ?Sized>(
    trainer: &mut Trainer,
    task: &mut T,
    quality: f64,
    rounds: usize,
    retrain_epochs: usize,
    lr: f64,
    ft: Finetune,
) -> Result<BaselineOutcome> {
    let t0 = Instant::now();
    trainer.optim.set_regularizer(None)?;
    let mut steps = Vec::new();
    let mut epochs = 0;
    for round in 0..rounds {
        let step = trainer.once(&format!("han prune {}", round + 1), |trainer| {
            let mut thresholds = BTreeMap::new();
            for p in trainer.params.prunable() {
                let m = trainer.masks.get(&p.name).ok_or_else(|| Error::Param {
                    name: p.name.clone(),
                    msg: "prunable but has no mask".into(),
                })?;
                let w = p.var.as_tensor().to_dtype(DType::F64)?;
                let m = m.to_dtype(DType::F64)?;
                let n = m.sum_all()?.to_scalar::<f64>()?;
                if n < 2.0 {
                    continue;
                }
                let mean = (&w * &m)?.sum_all()?.to_scalar::<f64>()? / n;
                let var = ((w - mean)?.sqr()? * &m)?.sum_all()?.to_scalar::<f64>()? / n;
                thresholds.insert(p.name.clone(), quality * var.sqrt());
            }
            trainer
                .masks
                .prune_below_per_layer(&trainer.params, &thresholds)?;
            trainer.optim.reset_state();
            let mut one = Vec::new();
            record(trainer, task, epochs, &mut one)?;
            Ok(one)
        })?;
        steps.extend(step);
        if round + 1 < rounds {
            trainer.fit(
                task,
                LrSchedule::Constant { lr },
                retrain_epochs,
                false,
                &format!("han retrain {}", round + 1),
            )?;
            epochs += retrain_epochs;
        }
    }
    finish("han-iterative", trainer, task, steps, epochs, ft, t0)
}

/// SNIP (Lee et al. 2019): prune the untrained model to `sparsity` by connection sensitivity
/// `|w·g|`, with `g` summed over the first `batches` training batches. Train the result afterwards.
pub fn snip<T: Task + ?Sized>(
    trainer: &mut Trainer,
    task: &mut T,
    sparsity: f64,
    batches: usize,
) -> Result<Vec<(usize, f64, Evaluation)>> {
    let n = trainer.begin_epoch(task)?.min(batches.max(1));
    let mut scores: BTreeMap<String, candle_core::Tensor> = BTreeMap::new();
    for i in 0..n {
        let grads = task.batch_loss(i)?.backward()?;
        for p in trainer.params.prunable() {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                let acc = match scores.remove(&p.name) {
                    Some(a) => (a + g)?,
                    None => g,
                };
                scores.insert(p.name.clone(), acc);
            }
        }
    }
    for p in trainer.params.prunable() {
        if let Some(g) = scores.remove(&p.name) {
            scores.insert(
                p.name.clone(),
                (p.var.as_tensor().to_dtype(DType::F32)? * g)?.abs()?,
            );
        }
    }
    trainer
        .masks
        .prune_by_scores(&trainer.params, Some(&scores), sparsity, false)?;
    let mut steps = Vec::new();
    record(trainer, task, 0, &mut steps)?;
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_schedule_starts_at_the_initial_and_ends_at_the_final_sparsity() {
        assert_eq!(cubic_sparsity(0.0, 0.9, 0, 10), 0.0);
        assert!((cubic_sparsity(0.0, 0.9, 10, 10) - 0.9).abs() < 1e-12);
        assert!((cubic_sparsity(0.0, 0.9, 5, 10) - 0.9 * (1.0 - 0.125)).abs() < 1e-12);
        // Front-loaded: more than half the pruning happens in the first third.
        assert!(cubic_sparsity(0.0, 0.9, 3, 9) > 0.45);
        assert_eq!(cubic_sparsity(0.2, 0.9, 20, 10), 0.9);
    }
}
