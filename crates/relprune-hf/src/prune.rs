//! The pruning phases of a pretrained checkpoint: the method's rounds, then (with a target
//! sparsity and no metric budget) a final step that brings every prunable matrix to the target,
//! layer by layer by reconstruction where the task can report layer inputs, by magnitude
//! otherwise, then the fine-tune.

use relprune_prune::{LrSchedule, Masks, ParamSet, Split, Task, Trainer};
use relprune_tasks::Phase;

use crate::config::{Config, FinalStep};
use crate::memory;
use crate::Result;

/// The task's own layer-by-layer step (`--final-step reconstruct` or `distill`): brings the
/// prunable matrices of `params` to the target sparsity from the layer inputs on the task's
/// training data, weights and `masks` together; returns the step's name and what else the report
/// says of it (`null`: nothing).
pub type LayerStep<'a, T> =
    &'a mut dyn FnMut(
        &mut T,
        &ParamSet,
        &mut Masks,
        f64,
    ) -> relprune_prune::Result<(&'static str, serde_json::Value)>;

/// The method, then (target mode) the final step to the target (the task's `layers` step where
/// given and asked for, else magnitude), then the fine-tune; leaves the result in the trainer
/// and returns the report's entries (with the memory at each phase's end).
pub fn prune<T: Task + ?Sized>(
    cfg: &Config,
    trainer: &mut Trainer,
    task: &mut T,
    mut layers: Option<LayerStep<'_, T>>,
) -> Result<Phase> {
    let mut memory = serde_json::Map::new();
    memory::mark(&mut memory, "loaded");
    let mut phase = relprune_tasks::run::prune(trainer, task, &cfg.prune)?;
    phase.extra.extend(memory);
    memory::mark(&mut phase.extra, "pruning rounds");
    // Without a metric budget the target is a promise: whatever the rounds reached, every
    // prunable matrix is brought to at least the target (then fine-tuned).
    if let (Some(target), None) = (cfg.target_sparsity, cfg.max_drop) {
        let layers = layers
            .as_mut()
            .filter(|_| cfg.final_step != FinalStep::Magnitude);
        let step = trainer.once("final step", |trainer| {
            let before = 1.0 - trainer.masks.remaining_fraction()?;
            let (method, details) = match layers {
                Some(layers) => {
                    let (params, masks) = (&trainer.params, &mut trainer.masks);
                    layers(task, params, masks, target)?
                }
                None => ("magnitude", serde_json::Value::Null),
            };
            // Whatever reconstruction did not cover (no calibration inputs) goes by magnitude.
            let pruned = trainer
                .masks
                .prune_each_to_at_least(&trainer.params, target)?;
            trainer.optim.reset_state();
            let valid = trainer.evaluate(task, Split::Valid)?;
            Ok(serde_json::json!({
                "method": method,
                "sparsity_before": before,
                "sparsity_after": 1.0 - trainer.masks.remaining_fraction()?,
                "weights_pruned_by_magnitude": pruned,
                "valid": valid,
                "details": details,
            }))
        })?;
        phase.extra.insert("final_step".into(), step);
        memory::mark(&mut phase.extra, "final step");
    }
    trainer.optim.set_regularizer(None)?;
    let schedule = LrSchedule::Cosine {
        lr: cfg.finetune_lr,
        epochs: cfg.finetune_epochs,
    };
    trainer.fit(task, schedule, cfg.finetune_epochs, true, "final fine-tune")?;
    memory::mark(&mut phase.extra, "fine-tune");
    // Adam's moments are the largest state left; the output is written without them.
    trainer.optim.reset_state();
    trainer.masks.apply(&trainer.params)?;
    let after = trainer.evaluate(task, Split::Valid)?;
    phase
        .extra
        .insert("valid_after_finetune".into(), serde_json::json!(after));
    Ok(phase)
}
