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
struct State {
    velocity: Option<Tensor>,
    masked_grad: Option<Tensor>,
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
        if let Some(r) = &regularizer {
            r.validate()?;
        }
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

    /// Sets the learning rate (schedules call this each epoch).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Turns the regularizer on or off (off for dense training and the final fine-tune).
    pub fn set_regularizer(&mut self, regularizer: Option<SelectiveDecay>) -> Result<()> {
        if let Some(r) = &regularizer {
            r.validate()?;
        }
        self.regularizer = regularizer;
        Ok(())
    }

    /// The regularizer in use.
    pub fn regularizer(&self) -> Option<SelectiveDecay> {
        self.regularizer
    }

    /// Forgets the momentum (after weights are restored or pruned).
    pub fn reset_state(&mut self) {
        self.state.clear();
    }

    /// Uses tensor ops even on the CPU (the portable path; tests compare both).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// The momentum buffer of a parameter, if it has one yet.
    pub fn velocity(&self, name: &str) -> Option<&Tensor> {
        self.state.get(name).and_then(|s| s.velocity.as_ref())
    }

    /// One step over every parameter that has a gradient in `grads`.
    pub fn step(&mut self, params: &ParamSet, masks: &Masks, grads: &GradStore) -> Result<()> {
        for p in params.iter() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let w = p.var.as_tensor();
            let mask = if p.prunable {
                masks.get_partial(&p.name)
            } else {
                None
            };
            let reg = if p.prunable {
                self.regularizer.filter(|r| r.lambda > 0.0)
            } else {
                None
            };
            let state = self.state.entry(p.name.clone()).or_default();
            let fusable = self.fused
                && matches!(w.device(), Device::Cpu)
                && w.dtype() == DType::F32
                && w.is_contiguous();
            if fusable {
                fused_step(self.cfg, reg, w, g, mask, state)?;
            } else {
                let new_w = generic_step(self.cfg, reg, w, g, mask, state)?;
                p.var.set(&new_w)?;
            }
        }
        Ok(())
    }
}

fn fused_step(
    cfg: SgdConfig,
    reg: Option<SelectiveDecay>,
    w: &Tensor,
    g: &Tensor,
    mask: Option<&Tensor>,
    state: &mut State,
) -> Result<()> {
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let gm = match mask {
        Some(m) => {
            let buf = match &state.masked_grad {
                Some(b) => b.clone(),
                None => {
                    let b = Tensor::zeros(w.shape(), DType::F32, w.device())?;
                    state.masked_grad = Some(b.clone());
                    b
                }
            };
            buf.inplace_op3(&g, m, &MaskedCopy)?;
            buf
        }
        None => g,
    };
    let threshold = match reg {
        Some(r) => with_cpu_f32(w, |wd| {
            with_cpu_f32(&gm, |gd| match mask {
                Some(m) => with_cpu_f32(m, |md| r.threshold_host(wd, gd, Some(md))),
                None => Ok(r.threshold_host(wd, gd, None)),
            })
        })??? as f32,
        None => f32::NEG_INFINITY,
    };
    let update_src = if cfg.momentum > 0.0 {
        let v = match &state.velocity {
            Some(v) => v.clone(),
            None => {
                let v = Tensor::zeros(w.shape(), DType::F32, w.device())?;
                state.velocity = Some(v.clone());
                v
            }
        };
        v.inplace_op2(
            &gm,
            &MomentumOp {
                mu: cfg.momentum as f32,
            },
        )?;
        v
    } else {
        gm.clone()
    };
    let op = StepOp {
        lr: cfg.lr as f32,
        mu: cfg.momentum as f32,
        nesterov: cfg.nesterov && cfg.momentum > 0.0,
        lambda: reg.map_or(0.0, |r| r.lambda as f32),
        relevance: reg.map_or(Relevance::Gradient, |r| r.relevance),
        threshold,
    };
    w.inplace_op3(&update_src, &gm, &op)?;
    Ok(())
}

fn generic_step(
    cfg: SgdConfig,
    reg: Option<SelectiveDecay>,
    w: &Tensor,
    g: &Tensor,
    mask: Option<&Tensor>,
    state: &mut State,
) -> Result<Tensor> {
    let g = g.to_dtype(w.dtype())?;
    let mask = mask.map(|m| m.to_dtype(w.dtype())).transpose()?;
    let gm = match &mask {
        Some(m) => (&g * m)?,
        None => g,
    };
    let update = if cfg.momentum > 0.0 {
        let v = match &state.velocity {
            Some(v) => ((v * cfg.momentum)? + &gm)?,
            None => gm.clone(),
        };
        state.velocity = Some(v.clone());
        if cfg.nesterov {
            (&gm + (v * cfg.momentum)?)?
        } else {
            v
        }
    } else {
        gm.clone()
    };
    let mut new_w = match reg {
        Some(r) => {
            let gate = r.gate(w, &gm, mask.as_ref())?;
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
struct MaskedCopy;

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
        let dst = cpu_f32_mut(s1, l1)?;
        let g = cpu_f32(s2, l2)?;
        let m = cpu_f32(s3, l3)?;
        check_len("masked copy", dst.len(), &[g.len(), m.len()])?;
        for ((d, &g), &m) in dst.iter_mut().zip(g).zip(m) {
            *d = g * m;
        }
        Ok(())
    }
}

/// `v ← μ v + ĝ`.
struct MomentumOp {
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
        let v = cpu_f32_mut(s1, l1)?;
        let g = cpu_f32(s2, l2)?;
        check_len("momentum", v.len(), &[g.len()])?;
        for (v, &g) in v.iter_mut().zip(g) {
            *v = self.mu * *v + g;
        }
        Ok(())
    }
}

/// `w ← w − η u − λ [score(w, ĝ) < thr] w`, with `u = v` or `ĝ + μ v` (Nesterov).
struct StepOp {
    lr: f32,
    mu: f32,
    nesterov: bool,
    lambda: f32,
    relevance: Relevance,
    threshold: f32,
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
        let w = cpu_f32_mut(s1, l1)?;
        let u = cpu_f32(s2, l2)?;
        let g = cpu_f32(s3, l3)?;
        check_len("sgd step", w.len(), &[u.len(), g.len()])?;
        let (lr, mu, lambda, thr, rel) = (
            self.lr,
            self.mu,
            self.lambda,
            self.threshold,
            self.relevance,
        );
        // Separate loops so the common cases compile to branch-free vector code.
        match (self.nesterov, lambda > 0.0) {
            (false, false) => {
                for (w, &u) in w.iter_mut().zip(u) {
                    *w -= lr * u;
                }
            }
            (true, false) => {
                for ((w, &u), &g) in w.iter_mut().zip(u).zip(g) {
                    *w -= lr * (g + mu * u);
                }
            }
            (nesterov, true) => {
                for ((w, &u), &g) in w.iter_mut().zip(u).zip(g) {
                    let step = if nesterov { g + mu * u } else { u };
                    let decay = if score(rel, *w, g) < thr {
                        lambda * *w
                    } else {
                        0.0
                    };
                    *w = *w - lr * step - decay;
                }
            }
        }
        Ok(())
    }
}

fn check_len(op: &str, n: usize, others: &[usize]) -> candle_core::Result<()> {
    if others.iter().any(|&o| o != n) {
        candle_core::bail!("{op}: length mismatch {n} vs {others:?}");
    }
    Ok(())
}
