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
use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Tensor};
use relprune_core::kernel::{cpu_f32, cpu_f32_mut, score, with_cpu_f32};
use relprune_core::{Relevance, SelectiveDecay};
use serde::{Deserialize, Serialize};

use crate::{Masks, ParamSet, Result};

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

/// `dst ← g ⊙ mask`.
pub(crate) struct MaskedCopy;

impl InplaceOp3 for MaskedCopy {
    fn name(&self) -> &'static str {
        "relprune-masked-copy"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (dst, g, m) = operands3("masked copy", s1, l1, s2, l2, s3, l3)?;
        for ((d, &g), &m) in dst.iter_mut().zip(g).zip(m) {
            *d = g * m;
        }
        Ok(())
    }
}

/// `v ← μ v + ĝ`.
pub(crate) struct MomentumOp {
    mu: f32,
}

impl InplaceOp2 for MomentumOp {
    fn name(&self) -> &'static str {
        "relprune-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (v, g) = operands2("momentum", s1, l1, s2, l2)?;
        for (v, &g) in v.iter_mut().zip(g) {
            *v = self.mu * *v + g;
        }
        Ok(())
    }
}

/// `v ← (μ v + ĝ) ⊙ mask`.
pub(crate) struct MaskedMomentumOp {
    mu: f32,
}

impl InplaceOp3 for MaskedMomentumOp {
    fn name(&self) -> &'static str {
        "relprune-masked-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (v, g, m) = operands3("masked momentum", s1, l1, s2, l2, s3, l3)?;
        for ((v, &g), &m) in v.iter_mut().zip(g).zip(m) {
            *v = (self.mu * *v + g) * m;
        }
        Ok(())
    }
}

/// `dst ← src`.
pub(crate) struct CopyOp;

impl InplaceOp2 for CopyOp {
    fn name(&self) -> &'static str {
        "relprune-copy"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (d, s) = operands2("copy", s1, l1, s2, l2)?;
        d.copy_from_slice(s);
        Ok(())
    }
}

/// `dst ← dst + a·src`.
pub(crate) struct AxpyOp {
    pub(crate) a: f32,
}

impl InplaceOp2 for AxpyOp {
    fn name(&self) -> &'static str {
        "relprune-axpy"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (d, s) = operands2("axpy", s1, l1, s2, l2)?;
        for (d, &s) in d.iter_mut().zip(s) {
            *d += self.a * s;
        }
        Ok(())
    }
}

/// `ŝ ← β ŝ + (1−β) score(w, ĝ)` (dst `ŝ`, sources `w`, `ĝ`).
pub(crate) struct SmoothOp {
    pub(crate) beta: f32,
    pub(crate) relevance: Relevance,
}

impl InplaceOp3 for SmoothOp {
    fn name(&self) -> &'static str {
        "relprune-smooth-relevance"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (sm, w, g) = operands3("smooth", s1, l1, s2, l2, s3, l3)?;
        let (b, rel) = (self.beta, self.relevance);
        for ((s, &w), &g) in sm.iter_mut().zip(w).zip(g) {
            *s = b * *s + (1.0 - b) * score(rel, w, g);
        }
        Ok(())
    }
}

/// `w ← w − η u − λ m(score) pull(w)`, with `u = v`, or `ĝ + μ v` (Nesterov, unsmoothed).
///
/// The second source is `ĝ` (scores computed from `w`, `ĝ`) or the smoothed scores.
pub(crate) struct StepOp {
    pub(crate) lr: f32,
    pub(crate) mu: f32,
    pub(crate) nesterov: bool,
    pub(crate) reg: Option<SelectiveDecay>,
    pub(crate) smoothed: bool,
    pub(crate) threshold: f32,
    /// Decoupled classical weight decay on every element (AdamW's), scaled by the learning rate.
    pub(crate) weight_decay: f32,
}

impl InplaceOp3 for StepOp {
    fn name(&self) -> &'static str {
        "relprune-sgd-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (w, u, x) = operands3("sgd step", s1, l1, s2, l2, s3, l3)?;
        let (lr, mu, thr, wd) = (self.lr, self.mu, self.threshold, self.weight_decay);
        // Separate loops so the common cases compile to branch-free vector code.
        match (self.reg, self.nesterov) {
            (None, false) => {
                for (w, &u) in w.iter_mut().zip(u) {
                    *w -= lr * (u + wd * *w);
                }
            }
            (None, true) => {
                for ((w, &u), &g) in w.iter_mut().zip(u).zip(x) {
                    *w -= lr * (g + mu * u + wd * *w);
                }
            }
            (Some(r), nesterov) => {
                let (lambda, rel, smoothed) = (r.lambda as f32, r.relevance, self.smoothed);
                for ((w, &u), &x) in w.iter_mut().zip(u).zip(x) {
                    let step = if nesterov { x + mu * u } else { u };
                    let s = if smoothed { x } else { score(rel, *w, x) };
                    let decay = lambda * r.gate_value(s, thr) * r.pull(*w);
                    *w = *w - lr * (step + wd * *w) - decay;
                }
            }
        }
        Ok(())
    }
}

/// The destination and source slices of a two-operand in-place kernel, checked to match in length.
pub(crate) fn operands2<'a>(
    op: &str,
    s1: &'a mut CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(&'a mut [f32], &'a [f32])> {
    let (d, a) = (cpu_f32_mut(s1, l1)?, cpu_f32(s2, l2)?);
    check_len(op, d.len(), &[a.len()])?;
    Ok((d, a))
}

/// The destination and source slices of a three-operand in-place kernel, checked to match in length.
#[allow(clippy::too_many_arguments)]
pub(crate) fn operands3<'a>(
    op: &str,
    s1: &'a mut CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    s3: &'a CpuStorage,
    l3: &Layout,
) -> candle_core::Result<(&'a mut [f32], &'a [f32], &'a [f32])> {
    let (d, a, b) = (cpu_f32_mut(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
    check_len(op, d.len(), &[a.len(), b.len()])?;
    Ok((d, a, b))
}

pub(crate) fn check_len(op: &str, n: usize, others: &[usize]) -> candle_core::Result<()> {
    if others.iter().any(|&o| o != n) {
        candle_core::bail!("{op}: length mismatch {n} vs {others:?}");
    }
    Ok(())
}
