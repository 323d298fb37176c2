//! The fused in-place CPU kernels of the optimizers' steps: each reads and writes whole f32
//! tensors in one pass, so a step allocates nothing after the first.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout};
use relprune_core::kernel::{cpu_f32, cpu_f32_mut, score};
use relprune_core::{Relevance, SelectiveDecay};

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
    pub(crate) mu: f32,
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
    pub(crate) mu: f32,
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
