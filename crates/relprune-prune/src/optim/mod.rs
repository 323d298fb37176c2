//! The optimizers' common ground: the [`Optimizer`] trait the trainer and the algorithm drive,
//! and what every implementation shares (checked regularizers, state-tensor keys, the per-step
//! walk over parameters with their masks and regularizer). [`sgd`] is masked SGD with momentum;
//! [`kernels`] the fused in-place CPU kernels the optimizers' steps are made of; masked Adam is
//! [`crate::adam`].

pub mod kernels;
pub mod sgd;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use relprune_core::SelectiveDecay;

use crate::{Masks, ParamSet, Result};

pub use sgd::{MaskedSgd, SgdConfig};

/// A masked, regularized optimizer: what the [`crate::Trainer`] and the pruning algorithm drive.
///
/// Implementations keep pruned weights, their gradients and their optimizer state at exactly zero,
/// and apply the regularizer (if any) in decoupled form to the prunable parameters only.
pub trait Optimizer: std::fmt::Debug {
    /// One step over every parameter that has a gradient in `grads`.
    fn step(&mut self, params: &ParamSet, masks: &Masks, grads: &GradStore) -> Result<()> {
        self.step_scored(params, masks, grads, None)
    }
    /// One step whose relevance scores come from `relevance` (by parameter name) instead of the
    /// gradient: what [`Relevance::OutputSensitivity`] needs (see [`crate::Trainer::train_epoch`]).
    fn step_scored(
        &mut self,
        params: &ParamSet,
        masks: &Masks,
        grads: &GradStore,
        relevance: Option<&HashMap<String, Tensor>>,
    ) -> Result<()>;
    /// The current learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate (schedules call this each epoch).
    fn set_lr(&mut self, lr: f64);
    /// The regularizer in use.
    fn regularizer(&self) -> Option<SelectiveDecay>;
    /// Turns the regularizer on or off.
    fn set_regularizer(&mut self, regularizer: Option<SelectiveDecay>) -> Result<()>;
    /// Forgets the optimizer state (after weights are restored or pruned).
    fn reset_state(&mut self);
    /// The state that later steps depend on, as named tensors (what a checkpoint stores).
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Replaces the state by one saved with [`Optimizer::state_tensors`].
    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;
}

/// `name/key` → (name, key) for the state tensors of parameter `name` (names may contain `/`).
pub(crate) fn split_state_key(key: &str) -> Result<(&str, &str)> {
    key.rsplit_once('/').ok_or_else(|| {
        crate::Error::Config(format!(
            "optimizer state tensor `{key}` is not of the form `parameter/slot`"
        ))
    })
}

/// A fresh copy of a saved state tensor, so in-place updates never touch the loaded buffer.
pub(crate) fn owned_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?.copy()?)
}

/// The regularizer after checking its values: every optimizer accepts one only through here.
pub(crate) fn validated(regularizer: Option<SelectiveDecay>) -> Result<Option<SelectiveDecay>> {
    if let Some(r) = &regularizer {
        r.validate()?;
    }
    Ok(regularizer)
}

/// What every optimizer needs to update one parameter this step.
pub(crate) struct StepInput<'a> {
    /// The parameter.
    pub(crate) param: &'a crate::Param,
    /// Its gradient.
    pub(crate) grad: &'a Tensor,
    /// Its mask, if it is prunable and something in it is pruned.
    pub(crate) mask: Option<&'a Tensor>,
    /// The regularizer, if it is prunable and the regularizer is on.
    pub(crate) reg: Option<SelectiveDecay>,
    /// Whether the fused CPU kernels can update it (f32, contiguous, on the CPU).
    pub(crate) fusable: bool,
    /// Precomputed relevance (e.g. output sensitivity), masked, when the regularizer scores by it.
    pub(crate) relevance: Option<Tensor>,
}

/// Calls `f` for every parameter that has a gradient, with the mask and regularizer that apply.
pub(crate) fn for_each_step_input(
    params: &ParamSet,
    masks: &Masks,
    grads: &GradStore,
    regularizer: Option<SelectiveDecay>,
    relevance: Option<&HashMap<String, Tensor>>,
    mut f: impl FnMut(StepInput<'_>) -> Result<()>,
) -> Result<()> {
    for p in params.iter() {
        let Some(grad) = grads.get(p.var.as_tensor()) else {
            continue;
        };
        let w = p.var.as_tensor();
        let reg = if p.prunable {
            regularizer.filter(|r| r.lambda > 0.0)
        } else {
            None
        };
        let mask = if p.prunable {
            masks.get_partial(&p.name)
        } else {
            None
        };
        let relevance = match reg.filter(|r| r.relevance.needs_outputs()) {
            None => None,
            Some(_) => {
                let s = relevance.and_then(|m| m.get(&p.name)).ok_or_else(|| {
                    crate::Error::Config(format!(
                        "the output-sensitivity relevance needs precomputed scores for `{}`: \
                         train through Trainer (Task::batch_loss_and_outputs) or call step_scored",
                        p.name
                    ))
                })?;
                let s = s.to_dtype(w.dtype())?;
                // Pruned weights still have a sensitivity; they must not count in the statistics.
                Some(match mask {
                    Some(m) => (s * m.to_dtype(w.dtype())?)?.contiguous()?,
                    None => s.contiguous()?,
                })
            }
        };
        f(StepInput {
            param: p,
            grad,
            mask,
            reg,
            fusable: matches!(w.device(), Device::Cpu)
                && w.dtype() == DType::F32
                && w.is_contiguous(),
            relevance,
        })?;
    }
    Ok(())
}

/// A persistent zero buffer of `w`'s shape in `slot`, created on first use.
pub(crate) fn buffer(slot: &mut Option<Tensor>, w: &Tensor) -> Result<(Tensor, bool)> {
    Ok(match slot {
        Some(b) => (b.clone(), false),
        None => {
            let b = Tensor::zeros(w.shape(), DType::F32, w.device())?;
            *slot = Some(b.clone());
            (b, true)
        }
    })
}
