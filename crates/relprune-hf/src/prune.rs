//! The pruning phases of a pretrained checkpoint: the method's rounds, then (with a target
//! sparsity and no metric budget) a final step that brings every prunable matrix to the target,
//! layer by layer by reconstruction where the task can report layer inputs, by magnitude
//! otherwise, then the fine-tune.

use std::collections::BTreeMap;

use relprune_prune::reconstruct::{layer_groups, prune_layers, Gram, ObsConfig};
use relprune_prune::{LrSchedule, Split, Task, Trainer};
use relprune_tasks::Phase;

use crate::config::{Config, FinalStep};
use crate::memory;
use crate::Result;

/// Computes the input second moments of the named linear layers on the task's training data.
pub type Calibrate<'a, T> =
    &'a mut dyn FnMut(&mut T, &[String]) -> relprune_prune::Result<BTreeMap<String, Gram>>;

/// The method, then (target mode) the final step to the target (reconstruction where
/// `calibrate` is given and asked for, else magnitude), then the fine-tune; leaves the result in
/// the trainer and returns the report's entries (with the memory at each phase's end).
pub fn prune<T: Task + ?Sized>(
    cfg: &Config,
    trainer: &mut Trainer,
    task: &mut T,
    mut calibrate: Option<Calibrate<'_, T>>,
) -> Result<Phase> {
    let mut memory = serde_json::Map::new();
    memory::mark(&mut memory, "loaded");
    let mut phase = relprune_tasks::run::prune(trainer, task, &cfg.prune)?;
    phase.extra.extend(memory);
    memory::mark(&mut phase.extra, "pruning rounds");
    // Without a metric budget the target is a promise: whatever the rounds reached, every
    // prunable matrix is brought to at least the target (then fine-tuned).
    if let (Some(target), None) = (cfg.target_sparsity, cfg.max_drop) {
        let reconstruct = cfg.final_step == FinalStep::Reconstruct;
        let calibrate = calibrate.as_mut().filter(|_| reconstruct);
        let step = trainer.once("final step", |trainer| {
            let before = 1.0 - trainer.masks.remaining_fraction()?;
            let method = match calibrate {
                Some(calibrate) => {
                    let names: Vec<String> =
                        trainer.params.prunable().map(|p| p.name.clone()).collect();
                    // Layer by layer in forward order (SparseGPT's sequential mode): a layer's
                    // inputs come from the layers before it as pruned, and only one layer's
                    // statistics are in memory at a time.
                    for group in layer_groups(&names) {
                        let grams = calibrate(task, &group)?;
                        let (params, masks) = (&trainer.params, &mut trainer.masks);
                        prune_layers(params, masks, &grams, target, &ObsConfig::default())?;
                    }
                    "reconstruct"
                }
                None => "magnitude",
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
