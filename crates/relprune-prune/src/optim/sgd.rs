//! SGD with momentum, masked and regularized in decoupled form.
//!
//! Per parameter and step, with `m` the pruning mask and `d` the regularizer's gate:
//!
//! ```text
//! ĝ = g ⊙ m                      pruned weights get no gradient
//! v ← μ v + ĝ                    (v stays 0 where m = 0)
//! u = v, or ĝ + μ v (Nesterov)
//! w ← w − η u − λ d(w, ĝ) ⊙ w    the regularizer touches only irrelevant weights
//! ```
//!
//! Since `w`, `ĝ` and `v` are all zero where `m = 0`, pruned weights stay exactly zero. On the
//! CPU the step runs as three fused in-place kernels over each tensor; elsewhere as tensor ops.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use relprune_core::kernel::with_cpu_f32;
use relprune_core::SelectiveDecay;
use serde::{Deserialize, Serialize};

use super::kernels::{AxpyOp, CopyOp, MaskedCopy, MaskedMomentumOp, MomentumOp, SmoothOp, StepOp};
use super::{buffer, for_each_step_input, owned_f32, split_state_key, validated};
use crate::{Masks, Optimizer, ParamSet, Result};

/// Hyper-parameters of [`MaskedSgd`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Learning rate `η`.
    pub lr: f64,
    /// Momentum `μ` (0 = plain SGD).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.9,
            nesterov: false,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    velocity: Option<Tensor>,
    masked_grad: Option<Tensor>,
    smoothed: Option<Tensor>,
}

/// SGD with momentum that applies pruning masks and the selective-decay regularizer every step.
#[derive(Debug)]
pub struct MaskedSgd {
    cfg: SgdConfig,
    regularizer: Option<SelectiveDecay>,
    state: HashMap<String, State>,
    fused: bool,
}

impl MaskedSgd {
    /// A new optimizer; `regularizer` applies to the prunable parameters only.
    pub fn new(cfg: SgdConfig, regularizer: Option<SelectiveDecay>) -> Result<Self> {
        let regularizer = validated(regularizer)?;
        Ok(Self {
            cfg,
            regularizer,
            state: HashMap::new(),
            fused: true,
        })
    }

    /// The configuration.
    pub fn config(&self) -> SgdConfig {
        self.cfg
    }

    /// Uses tensor ops even on the CPU (the portable path; tests compare both).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// The momentum buffer of a parameter, if it has one yet.
    pub fn velocity(&self, name: &str) -> Option<&Tensor> {
        self.state.get(name).and_then(|s| s.velocity.as_ref())
    }
}

impl Optimizer for MaskedSgd {
    fn lr(&self) -> f64 {
        self.cfg.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    fn regularizer(&self) -> Option<SelectiveDecay> {
        self.regularizer
    }

    fn set_regularizer(&mut self, regularizer: Option<SelectiveDecay>) -> Result<()> {
        self.regularizer = validated(regularizer)?;
        Ok(())
    }

    fn reset_state(&mut self) {
        self.state.clear();
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, st) in &self.state {
            if let Some(v) = &st.velocity {
                out.push((format!("{name}/velocity"), v.clone()));
            }
            if let Some(s) = &st.smoothed {
                out.push((format!("{name}/smoothed"), s.clone()));
            }
        }
        Ok(out)
    }

    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.state.clear();
        for (key, t) in tensors {
            let (name, slot) = split_state_key(key)?;
            let st = self.state.entry(name.to_string()).or_default();
            match slot {
                "velocity" => st.velocity = Some(owned_f32(t)?),
                "smoothed" => st.smoothed = Some(owned_f32(t)?),
                other => {
                    return Err(crate::Error::Config(format!(
                        "unknown SGD state slot `{other}` in `{key}`"
                    )))
                }
            }
        }
        Ok(())
    }

    fn step_scored(
        &mut self,
        params: &ParamSet,
        masks: &Masks,
        grads: &GradStore,
        relevance: Option<&HashMap<String, Tensor>>,
    ) -> Result<()> {
        let (cfg, regularizer, fused) = (self.cfg, self.regularizer, self.fused);
        for_each_step_input(params, masks, grads, regularizer, relevance, |x| {
            let state = self.state.entry(x.param.name.clone()).or_default();
            let w = x.param.var.as_tensor();
            if fused && x.fusable {
                fused_step(cfg, x.reg, w, x.grad, x.mask, x.relevance.as_ref(), state)
            } else {
                let new_w =
                    generic_step(cfg, x.reg, w, x.grad, x.mask, x.relevance.as_ref(), state)?;
                Ok(x.param.var.set(&new_w)?)
            }
        })
    }
}

fn fused_step(
    cfg: SgdConfig,
    reg: Option<SelectiveDecay>,
    w: &Tensor,
    g: &Tensor,
    mask: Option<&Tensor>,
    relevance: Option<&Tensor>,
    state: &mut State,
) -> Result<()> {
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    // Precomputed relevance goes through the smoothing buffer (β = 0 without smoothing).
    let smoothing = reg.filter(|r| r.ema_beta > 0.0 || relevance.is_some());
    let nesterov = cfg.nesterov && cfg.momentum > 0.0;
    // With smoothing and Nesterov the update is written into our own buffer, so copy even unmasked.
    let gm = if mask.is_some() || (smoothing.is_some() && nesterov) {
        let (buf, _) = buffer(&mut state.masked_grad, w)?;
        match mask {
            Some(m) => buf.inplace_op3(&g, m, &MaskedCopy)?,
            None => buf.inplace_op2(&g, &CopyOp)?,
        }
        buf
    } else {
        g
    };
    let smoothed = match smoothing {
        Some(r) => {
            let (s, first) = buffer(&mut state.smoothed, w)?;
            let op = SmoothOp {
                beta: if first { 0.0 } else { r.ema_beta as f32 },
                relevance: r.relevance,
            };
            s.inplace_op3(w, relevance.unwrap_or(&gm), &op)?;
            Some(s)
        }
        None => None,
    };
    let threshold = match reg {
        Some(r) => {
            let thr = |md: Option<&[f32]>| match &smoothed {
                Some(s) => with_cpu_f32(s, |sd| r.threshold_of_scores(sd, md)),
                None => with_cpu_f32(w, |wd| with_cpu_f32(&gm, |gd| r.threshold_host(wd, gd, md)))?,
            };
            match mask {
                Some(m) => with_cpu_f32(m, |md| thr(Some(md)))??,
                None => thr(None)?,
            }
        }
        None => f64::NEG_INFINITY,
    } as f32;
    let update_src = if cfg.momentum > 0.0 {
        let (v, _) = buffer(&mut state.velocity, w)?;
        let mu = cfg.momentum as f32;
        match mask {
            // Masking v too keeps pruned momentum at zero even if the masks changed without a reset.
            Some(m) => v.inplace_op3(&gm, m, &MaskedMomentumOp { mu })?,
            None => v.inplace_op2(&gm, &MomentumOp { mu })?,
        }
        if nesterov && smoothed.is_some() {
            // The step reads the smoothed scores, not g: fold g + μv into the gradient buffer.
            gm.inplace_op2(&v, &AxpyOp { a: mu })?;
            gm.clone()
        } else {
            v
        }
    } else {
        gm.clone()
    };
    let op = StepOp {
        lr: cfg.lr as f32,
        mu: cfg.momentum as f32,
        nesterov: nesterov && smoothed.is_none(),
        reg: reg.filter(|r| r.lambda > 0.0),
        smoothed: smoothed.is_some(),
        threshold,
        weight_decay: 0.0,
    };
    let second = smoothed.as_ref().unwrap_or(&gm);
    w.inplace_op3(&update_src, second, &op)?;
    Ok(())
}

fn generic_step(
    cfg: SgdConfig,
    reg: Option<SelectiveDecay>,
    w: &Tensor,
    g: &Tensor,
    mask: Option<&Tensor>,
    relevance: Option<&Tensor>,
    state: &mut State,
) -> Result<Tensor> {
    let g = g.to_dtype(w.dtype())?;
    let mask = mask.map(|m| m.to_dtype(w.dtype())).transpose()?;
    let gm = match &mask {
        Some(m) => (&g * m)?,
        None => g,
    };
    let update = if cfg.momentum > 0.0 {
        let mut v = match &state.velocity {
            Some(v) => ((v * cfg.momentum)? + &gm)?,
            None => gm.clone(),
        };
        if let Some(m) = &mask {
            v = (v * m)?;
        }
        state.velocity = Some(v.clone());
        if cfg.nesterov {
            (&gm + (v * cfg.momentum)?)?
        } else {
            v
        }
    } else {
        gm.clone()
    };
    let mut new_w = match reg.filter(|r| r.lambda > 0.0) {
        Some(r) => {
            let scores = r.scores(w, relevance.unwrap_or(&gm))?;
            let scores = if r.ema_beta > 0.0 {
                let s = match &state.smoothed {
                    Some(prev) => r.smooth(prev, &scores)?,
                    None => scores,
                };
                state.smoothed = Some(s.clone());
                s
            } else {
                scores
            };
            let gate = r.gate_from_scores(&scores, mask.as_ref())?;
            r.decoupled_step(w, &update, cfg.lr, &gate)?
        }
        None => (w - (update * cfg.lr)?)?,
    };
    if let Some(m) = &mask {
        new_w = (new_w * m)?;
    }
    Ok(new_w)
}
