//! Checkpoints and resume: an interrupted run continued from its checkpoint ends bit-identical to
//! an uninterrupted one.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{toy, weights, Toy};
use relprune_core::SelectiveDecay;
use relprune_prune::threshold::BisectionConfig;
use relprune_prune::{
    AdamConfig, Evaluation, IterativePruning, LrSchedule, MaskedAdam, MaskedSgd, Masks, MetricSpec,
    Optimizer, ParamSet, PruneConfig, Selection, SgdConfig, Split, Task, Trainer,
};

fn sgd() -> MaskedSgd {
    let reg = SelectiveDecay {
        ema_beta: 0.9,
        ..SelectiveDecay::default().with_lambda(1e-3)
    };
    let cfg = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        nesterov: true,
    };
    MaskedSgd::new(cfg, Some(reg)).unwrap()
}

fn adam() -> MaskedAdam {
    let cfg = AdamConfig {
        lr: 0.01,
        ..AdamConfig::default()
    };
    MaskedAdam::new(cfg, Some(SelectiveDecay::default().with_lambda(1e-3))).unwrap()
}

/// Two fits (a dense phase, then a masked one) run in one go, or interrupted at `crash` and resumed.
/// Builds a fresh optimizer.
type MakeOptim = fn() -> Box<dyn Optimizer>;

fn two_fits(
    optim: impl Fn() -> Box<dyn Optimizer>,
    dir: &std::path::Path,
    crash: Option<usize>,
) -> Vec<(String, Vec<f32>)> {
    let run = |trainer: &mut Trainer, task: &mut Toy| -> relprune_prune::Result<()> {
        let plateau = LrSchedule::ReduceOnPlateau {
            lr: 0.05,
            factor: 0.5,
            patience: 1,
            min_lr: 1e-4,
        };
        trainer.fit(task, plateau, 3, true, "dense")?;
        trainer.once("prune", |t| {
            t.masks.prune_to_sparsity(&t.params, 0.5, false)?;
            t.optim.reset_state();
            Ok(())
        })?;
        let cosine = LrSchedule::Cosine {
            lr: 0.02,
            epochs: 3,
        };
        trainer.fit(task, cosine, 3, false, "masked")?;
        Ok(())
    };
    let (mut task, params) = toy(crash);
    let masks = Masks::dense(&params).unwrap();
    let mut trainer = Trainer {
        optim: optim(),
        ..Trainer::new(
            params,
            masks,
            MaskedSgd::new(SgdConfig::default(), None).unwrap(),
        )
        .unwrap()
    };
    trainer.quiet = true;
    trainer
        .checkpoint_into(dir, serde_json::json!({ "name": "toy" }))
        .unwrap();
    let first = run(&mut trainer, &mut task);
    if crash.is_none() {
        first.unwrap();
        return weights(&trainer.params);
    }
    let err = first.unwrap_err().to_string();
    assert!(err.contains("simulated crash"), "{err}");

    // A new process: fresh model and task, everything else from the checkpoint.
    let (mut task, params) = toy(None);
    let masks = Masks::dense(&params).unwrap();
    let mut trainer = Trainer {
        optim: optim(),
        ..Trainer::new(
            params,
            masks,
            MaskedSgd::new(SgdConfig::default(), None).unwrap(),
        )
        .unwrap()
    };
    trainer.quiet = true;
    let desc = trainer.resume(dir, &mut task).unwrap();
    assert_eq!(desc["name"], "toy");
    // The first process's time is the run's too.
    let earlier = trainer.checkpoints.as_ref().unwrap().earlier_seconds();
    assert!(earlier > 0.0, "earlier seconds {earlier}");
    run(&mut trainer, &mut task).unwrap();
    let journal = relprune_prune::checkpoint::read(dir, &candle_core::Device::Cpu)
        .unwrap()
        .journal;
    assert!(
        journal.seconds > earlier,
        "{} <= {earlier}",
        journal.seconds
    );
    weights(&trainer.params)
}

#[test]
fn interrupted_and_resumed_fits_end_bit_identical_to_one_run_for_sgd_and_adam() {
    let optimizers: [(&str, MakeOptim); 2] =
        [("sgd", || Box::new(sgd())), ("adam", || Box::new(adam()))];
    for (name, make) in optimizers {
        let straight = tempfile::tempdir().unwrap();
        let reference = two_fits(make, straight.path(), None);
        // Crash in the first fit (epoch 3), and in the second (epoch 5: after the one-off step).
        for crash in [3, 5] {
            let dir = tempfile::tempdir().unwrap();
            let resumed = two_fits(make, dir.path(), Some(crash));
            assert_eq!(reference, resumed, "{name}, crash at epoch {crash}");
        }
    }
}

fn prune_run(dir: &std::path::Path, crash: Option<usize>) -> (Vec<(String, Vec<f32>)>, String) {
    let cfg = PruneConfig {
        regularizer: SelectiveDecay::default().with_lambda(1e-3),
        lr: 0.05,
        bisection: BisectionConfig {
            twt: 0.1,
            ..Default::default()
        },
        delta: 5.0,
        patience: 1,
        min_improvement: 0.05,
        max_epochs: 8,
        finetune_epochs: 2,
        finetune_lr: 0.02,
        ..PruneConfig::default()
    };
    let algo = IterativePruning::new(cfg).unwrap();
    let make = |crash| {
        let (task, params) = toy(crash);
        let masks = Masks::dense(&params).unwrap();
        let mut trainer = Trainer::new(params, masks, sgd()).unwrap();
        trainer.quiet = true;
        (task, trainer)
    };
    let (mut task, mut trainer) = make(crash);
    trainer
        .checkpoint_into(dir, serde_json::Value::Null)
        .unwrap();
    let outcome = match algo.run(&mut trainer, &mut task) {
        Ok(o) => o,
        Err(e) => {
            assert!(e.to_string().contains("simulated crash"), "{e}");
            let (mut task, mut trainer) = make(None);
            trainer.resume(dir, &mut task).unwrap();
            let o = algo.run(&mut trainer, &mut task).unwrap();
            return (
                weights(&trainer.params),
                serde_json::to_string(&(o.rounds, o.result_round, o.epochs)).unwrap(),
            );
        }
    };
    assert!(
        !outcome.rounds.is_empty(),
        "the toy run should prune at least once"
    );
    (
        weights(&trainer.params),
        serde_json::to_string(&(outcome.rounds, outcome.result_round, outcome.epochs)).unwrap(),
    )
}

#[test]
fn iterative_pruning_resumed_mid_pruning_or_mid_finetune_ends_bit_identical() {
    let straight = tempfile::tempdir().unwrap();
    let reference = prune_run(straight.path(), None);
    // Epoch 4 is inside the pruning phase (8 epochs), epoch 10 inside the fine-tune.
    for crash in [4, 10] {
        let dir = tempfile::tempdir().unwrap();
        let resumed = prune_run(dir.path(), Some(crash));
        assert_eq!(reference, resumed, "crash at epoch {crash}");
    }
}

#[test]
fn a_truncated_or_missing_checkpoint_is_a_clear_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut task, params) = toy(None);
    let masks = Masks::dense(&params).unwrap();
    let mut trainer = Trainer::new(params, masks, sgd()).unwrap();
    trainer.quiet = true;
    let err = trainer
        .resume(dir.path(), &mut task)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checkpoint.safetensors") && err.contains("no checkpoint"),
        "{err}"
    );

    trainer
        .checkpoint_into(dir.path(), serde_json::Value::Null)
        .unwrap();
    trainer
        .fit(
            &mut task,
            LrSchedule::Constant { lr: 0.01 },
            1,
            false,
            "one",
        )
        .unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = trainer
        .resume(dir.path(), &mut task)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpoint.safetensors"), "{err}");
    assert!(
        err.contains("truncated") || err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_of_another_model_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (mut task, params) = toy(None);
    let masks = Masks::dense(&params).unwrap();
    let mut trainer = Trainer::new(params, masks, sgd()).unwrap();
    trainer.quiet = true;
    trainer
        .checkpoint_into(dir.path(), serde_json::Value::Null)
        .unwrap();
    trainer
        .fit(
            &mut task,
            LrSchedule::Constant { lr: 0.01 },
            1,
            false,
            "one",
        )
        .unwrap();
    // Another model: one layer of a different width.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    candle_nn::linear(8, 16, vb.pp("fc1")).unwrap();
    let other = ParamSet::from_varmap(&varmap, &Selection::default()).unwrap();
    let masks = Masks::dense(&other).unwrap();
    let mut t2 = Trainer::new(other, masks, sgd()).unwrap();
    let err = t2.resume(dir.path(), &mut task).unwrap_err().to_string();
    assert!(err.contains("`fc1.") && err.contains("shape"), "{err}");
}

#[test]
fn a_phase_label_used_twice_in_one_checkpointed_run_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut task, params) = toy(None);
    let masks = Masks::dense(&params).unwrap();
    let mut trainer = Trainer::new(params, masks, sgd()).unwrap();
    trainer.quiet = true;
    trainer
        .checkpoint_into(dir.path(), serde_json::Value::Null)
        .unwrap();
    let c = LrSchedule::Constant { lr: 0.01 };
    trainer.fit(&mut task, c, 1, false, "same").unwrap();
    let err = trainer
        .fit(&mut task, c, 1, false, "same")
        .unwrap_err()
        .to_string();
    assert!(err.contains("used twice"), "{err}");
}

/// The toy task with a scripted validation metric per epoch (lower is better): the best epoch
/// is the first, so keeping the best must undo epochs 2 and 3.
struct BestAtEpochOne {
    toy: Toy,
    epoch: usize,
}

impl Task for BestAtEpochOne {
    fn metric(&self) -> MetricSpec {
        self.toy.metric()
    }
    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        let n = self.toy.begin_epoch(epoch)?;
        self.epoch = epoch;
        Ok(n)
    }
    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        self.toy.batch_loss(index)
    }
    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        let e = self.toy.evaluate(split)?;
        let metric = [50.0, 10.0, 30.0, 40.0][self.epoch.min(3)];
        Ok(Evaluation { metric, ..e })
    }
}

/// `epochs` epochs of a constant-rate fit; with `keep_best` (spilled to `dir` when `spill`),
/// crashing at the start of epoch `crash` and resuming.
fn scripted_fit(
    epochs: usize,
    keep_best: bool,
    spill: bool,
    crash: Option<usize>,
    dir: &std::path::Path,
) -> Vec<(String, Vec<f32>)> {
    let make = |crash| {
        let (toy, params) = toy(crash);
        let masks = Masks::dense(&params).unwrap();
        let mut trainer = Trainer::new(params, masks, sgd()).unwrap();
        trainer.quiet = true;
        trainer.spill_best = spill;
        (BestAtEpochOne { toy, epoch: 0 }, trainer)
    };
    let schedule = LrSchedule::Constant { lr: 0.05 };
    let (mut task, mut trainer) = make(crash);
    trainer
        .checkpoint_into(dir, serde_json::Value::Null)
        .unwrap();
    if let Err(e) = trainer.fit(&mut task, schedule, epochs, keep_best, "fit") {
        assert!(e.to_string().contains("simulated crash"), "{e}");
        let (t, tr) = make(None);
        (task, trainer) = (t, tr);
        trainer.resume(dir, &mut task).unwrap();
        trainer
            .fit(&mut task, schedule, epochs, keep_best, "fit")
            .unwrap();
    }
    weights(&trainer.params)
}

/// Files in `dir` whose name starts with `best-`.
fn best_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("best-"))
        .collect()
}

#[test]
fn the_best_epoch_restored_from_a_file_is_the_best_epoch_also_after_a_resume() {
    let tmp = || tempfile::tempdir().unwrap();
    let after_one = scripted_fit(1, false, false, None, tmp().path());
    let after_three = scripted_fit(3, false, false, None, tmp().path());
    assert_ne!(after_one, after_three, "epochs 2 and 3 change the weights");
    assert_eq!(scripted_fit(3, true, false, None, tmp().path()), after_one);
    let dir = tmp();
    assert_eq!(scripted_fit(3, true, true, None, dir.path()), after_one);
    assert!(best_files(dir.path()).is_empty());
    let dir = tmp();
    assert_eq!(scripted_fit(3, true, true, Some(3), dir.path()), after_one);
    assert!(best_files(dir.path()).is_empty());
}
