//! The fused in-place CPU kernels of the optimizers' steps: each reads and writes whole f32
//! tensors in one pass, so a step allocates nothing after the first. Large tensors are split
//! into chunks over the thread pool ([`par_chunks1`], [`par_chunks3`]); every element is
//! computed by the same expression either way, so results do not depend on the thread count.

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;
use relprune_core::kernel::{cpu_f32, cpu_f32_mut, score};
use relprune_core::{Gate, Penalty, Relevance, SelectiveDecay};

/// Elements per unit of work when a kernel's loop is split over the pool: a hand-off costs
/// microseconds, a chunk takes tens of them; two threads still get several chunks of a layer.
const CHUNK: usize = 1 << 15;

/// Whether a loop over `len` elements is worth splitting over the pool.
fn split(len: usize) -> bool {
    len > CHUNK && rayon::current_num_threads() > 1
}

/// Runs `f(range, dst[range])` over chunks of `dst`, on the pool for large tensors; the caller
/// slices its sources by `range`.
pub(crate) fn par_chunks1(dst: &mut [f32], f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    if !split(dst.len()) {
        return f(0..dst.len(), dst);
    }
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(i, d)| {
        let lo = i * CHUNK;
        f(lo..lo + d.len(), d)
    });
}

/// [`par_chunks1`] over three written slices of one length (weights and optimizer state).
pub(crate) fn par_chunks3(
    (a, b, c): (&mut [f32], &mut [f32], &mut [f32]),
    f: impl Fn(Range<usize>, &mut [f32], &mut [f32], &mut [f32]) + Sync,
) {
    if !split(a.len()) {
        return f(0..a.len(), a, b, c);
    }
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks_mut(CHUNK))
        .zip(c.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(i, ((a, b), c))| {
            let lo = i * CHUNK;
            f(lo..lo + a.len(), a, b, c)
        });
}

/// An in-place op that hands its tensor's contiguous f32 data to a closure, once.
struct WithMut<'a>(RefCell<Option<MutFn<'a>>>);

/// What [`WithMut`] runs.
type MutFn<'a> = Box<dyn FnOnce(&mut [f32]) -> candle_core::Result<()> + 'a>;

impl InplaceOp1 for WithMut<'_> {
    fn name(&self) -> &'static str {
        "relprune-with-mut"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let f = self.0.borrow_mut().take();
        match f {
            Some(f) => f(cpu_f32_mut(s, l)?),
            None => candle_core::bail!("relprune-with-mut ran twice"),
        }
    }
}

/// Runs `f` with the contiguous f32 CPU data of `a`, `b` and `c` to write in place: a step
/// that updates weights and both of Adam's moments in one pass. The three must be distinct
/// tensors (each is locked for writing in turn).
pub(crate) fn with_mut3<'a>(
    (a, b, c): (&'a Tensor, &'a Tensor, &'a Tensor),
    f: impl FnOnce(&mut [f32], &mut [f32], &mut [f32]) -> candle_core::Result<()> + 'a,
) -> candle_core::Result<()> {
    a.inplace_op1(&WithMut::new(move |a| {
        b.inplace_op1(&WithMut::new(move |b| {
            c.inplace_op1(&WithMut::new(move |c| f(a, b, c)))
        }))
    }))
}

impl<'a> WithMut<'a> {
    fn new(f: impl FnOnce(&mut [f32]) -> candle_core::Result<()> + 'a) -> Self {
        Self(RefCell::new(Some(Box::new(f))))
    }
}

/// One weight's step: `w − η (u + wd·w)`, minus `λ·gate(s)·pull(w)` with a regularizer
/// (`reg` = the regularizer and its gate threshold, `s` the weight's relevance score).
#[inline(always)]
pub(crate) fn updated(
    w: f32,
    u: f32,
    s: f32,
    lr: f32,
    wd: f32,
    reg: Option<(&SelectiveDecay, f32)>,
) -> f32 {
    match reg {
        None => w - lr * (u + wd * w),
        Some((r, thr)) => {
            let decay = r.lambda as f32 * r.gate_value(s, thr) * r.pull(w);
            w - lr * (u + wd * w) - decay
        }
    }
}

/// A loop over one parameter's elements that steps them with [`updated`] and a regularizer.
pub(crate) trait RegularizedLoop {
    /// Runs the loop with `reg` (the regularizer and its gate threshold, `None` for none).
    fn run(self, reg: Option<(SelectiveDecay, f32)>);
}

/// Runs `body` with the regularizer's gate and penalty rebuilt as constants. Where `body.run`
/// is inlined (mark it `#[inline(always)]`), `gate_value` and `pull` each fold to one
/// expression, so the loop has no branch per element left and vectorizes; without this it
/// matched both kinds per element and ran scalar. The bits are the same: every element is
/// computed by the same operations.
#[inline(always)]
pub(crate) fn with_constant_kinds(reg: Option<(SelectiveDecay, f32)>, body: impl RegularizedLoop) {
    let Some((r, thr)) = reg else {
        return body.run(None);
    };
    let fixed = |gate, penalty| Some((SelectiveDecay { gate, penalty, ..r }, thr));
    match (r.gate, r.penalty) {
        (Gate::Soft, Penalty::L2) => body.run(fixed(Gate::Soft, Penalty::L2)),
        (Gate::Soft, Penalty::L1) => body.run(fixed(Gate::Soft, Penalty::L1)),
        (Gate::All, Penalty::L2) => body.run(fixed(Gate::All, Penalty::L2)),
        (Gate::All, Penalty::L1) => body.run(fixed(Gate::All, Penalty::L1)),
        (Gate::Hard { stat, tau }, Penalty::L2) => {
            body.run(fixed(Gate::Hard { stat, tau }, Penalty::L2))
        }
        (Gate::Hard { stat, tau }, Penalty::L1) => {
            body.run(fixed(Gate::Hard { stat, tau }, Penalty::L1))
        }
    }
}

/// Runs `body` with the regularizer's relevance kind rebuilt as a constant (for [`score`]
/// inside its loop), as [`with_constant_kinds`] does for the gate and penalty.
#[inline(always)]
pub(crate) fn with_constant_relevance(
    reg: Option<(SelectiveDecay, f32)>,
    body: impl RegularizedLoop,
) {
    let Some((r, thr)) = reg else {
        return body.run(None);
    };
    let fixed = |relevance| Some((SelectiveDecay { relevance, ..r }, thr));
    match r.relevance {
        Relevance::Gradient => body.run(fixed(Relevance::Gradient)),
        Relevance::Taylor => body.run(fixed(Relevance::Taylor)),
        Relevance::OutputSensitivity => body.run(fixed(Relevance::OutputSensitivity)),
    }
}

/// A loop run through [`with_constant_kinds`].
pub(crate) struct ConstantKinds<L>(pub(crate) L);

impl<L: RegularizedLoop> RegularizedLoop for ConstantKinds<L> {
    #[inline(always)]
    fn run(self, reg: Option<(SelectiveDecay, f32)>) {
        with_constant_kinds(reg, self.0)
    }
}

/// A loop run through [`with_constant_relevance`].
pub(crate) struct ConstantRelevance<L>(pub(crate) L);

impl<L: RegularizedLoop> RegularizedLoop for ConstantRelevance<L> {
    #[inline(always)]
    fn run(self, reg: Option<(SelectiveDecay, f32)>) {
        with_constant_relevance(reg, self.0)
    }
}

/// Runs `body` compiled for the widest vectors the CPU has (AVX-512, else AVX2, else the
/// baseline target). The bits are the same every way: the loops are element by element and
/// Rust never contracts a multiply and an add into a fused multiply-add, whatever the features.
pub(crate) fn on_widest_vectors(reg: Option<(SelectiveDecay, f32)>, body: impl RegularizedLoop) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(reg: Option<(SelectiveDecay, f32)>, body: impl RegularizedLoop) {
            body.run(reg)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(reg: Option<(SelectiveDecay, f32)>, body: impl RegularizedLoop) {
            body.run(reg)
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected on this CPU.
            return unsafe { avx512(reg, body) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected on this CPU.
            return unsafe { avx2(reg, body) };
        }
    }
    body.run(reg)
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
        par_chunks1(dst, |r, dst| {
            for ((d, &g), &m) in dst.iter_mut().zip(&g[r.clone()]).zip(&m[r]) {
                *d = g * m;
            }
        });
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
        par_chunks1(v, |r, v| {
            for (v, &g) in v.iter_mut().zip(&g[r]) {
                *v = self.mu * *v + g;
            }
        });
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
        par_chunks1(v, |r, v| {
            for ((v, &g), &m) in v.iter_mut().zip(&g[r.clone()]).zip(&m[r]) {
                *v = (self.mu * *v + g) * m;
            }
        });
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
        par_chunks1(d, |r, d| d.copy_from_slice(&s[r]));
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
        par_chunks1(d, |r, d| {
            for (d, &s) in d.iter_mut().zip(&s[r]) {
                *d += self.a * s;
            }
        });
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
        par_chunks1(sm, |r, sm| {
            for ((s, &w), &g) in sm.iter_mut().zip(&w[r.clone()]).zip(&g[r]) {
                *s = b * *s + (1.0 - b) * score(rel, w, g);
            }
        });
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
        let reg = self.reg.map(|r| (r, self.threshold));
        par_chunks1(w, |r, w| {
            let body = Step {
                w,
                u: &u[r.clone()],
                x: &x[r],
                lr: self.lr,
                mu: self.mu,
                wd: self.weight_decay,
                nesterov: self.nesterov,
                smoothed: self.smoothed,
            };
            on_widest_vectors(reg, ConstantRelevance(ConstantKinds(body)))
        });
        Ok(())
    }
}

/// [`StepOp`]'s loop over one chunk: `w` stepped by `u` (or `x + μu`, Nesterov), with a
/// regularizer its scores from `x` (smoothed) or from `w` and `x`.
struct Step<'a> {
    w: &'a mut [f32],
    u: &'a [f32],
    x: &'a [f32],
    lr: f32,
    mu: f32,
    wd: f32,
    nesterov: bool,
    smoothed: bool,
}

impl RegularizedLoop for Step<'_> {
    #[inline(always)]
    fn run(self, reg: Option<(SelectiveDecay, f32)>) {
        // One copy per Nesterov setting, so that the loop does not test it per element.
        match self.nesterov {
            true => self.body::<true>(reg),
            false => self.body::<false>(reg),
        }
    }
}

impl Step<'_> {
    /// [`RegularizedLoop::run`]'s loop, Nesterov's or not; every slice is cut to the weights'
    /// length first, so that indexing needs no bounds check.
    #[inline(always)]
    fn body<const NESTEROV: bool>(self, reg: Option<(SelectiveDecay, f32)>) {
        let n = self.w.len();
        let (w, u, x) = (self.w, &self.u[..n], &self.x[..n]);
        let (lr, mu, wd) = (self.lr, self.mu, self.wd);
        let step = |i: usize| if NESTEROV { x[i] + mu * u[i] } else { u[i] };
        match reg {
            None => {
                for (i, w) in w.iter_mut().enumerate() {
                    *w = updated(*w, step(i), 0.0, lr, wd, None);
                }
            }
            Some((r, thr)) => {
                for i in 0..n {
                    let s = if self.smoothed {
                        x[i]
                    } else {
                        score(r.relevance, w[i], x[i])
                    };
                    w[i] = updated(w[i], step(i), s, lr, wd, Some((&r, thr)));
                }
            }
        }
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
