//! Adam and AdamW, masked and regularized in decoupled form.
//!
//! Per parameter and step, with `m` the pruning mask and `d` the regularizer's gate:
//!
//! ```text
//! ĝ = g ⊙ m  (+ wd·w for Adam's L2 weight decay)
//! m₁ ← β₁ m₁ + (1−β₁) ĝ,   m₂ ← β₂ m₂ + (1−β₂) ĝ²      (both masked)
//! u = (m₁ / (1−β₁ᵗ)) / (√(m₂ / (1−β₂ᵗ)) + ε)
//! w ← w − η (u + wd·w  [AdamW only]) − λ d ⊙ pull(w)
//! ```
//!
//! Pruned weights, their gradients and both moments stay exactly zero.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use relprune_core::kernel::{score, with_cpu_f32};
use relprune_core::{Gate, SelectiveDecay};
use serde::{Deserialize, Serialize};

use crate::optim::kernels::{
    check_len, on_widest_vectors, par_chunks3, updated, with_constant_relevance, with_mut3, AxpyOp,
    ConstantKinds, CopyOp, MaskedCopy, RegularizedLoop, SmoothOp,
};
use crate::optim::{buffer, for_each_step_input, owned_f32, split_state_key, validated};
use crate::{Masks, Optimizer, ParamSet, Result};

/// Hyper-parameters of [`MaskedAdam`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// Learning rate `η`.
    pub lr: f64,
    /// First-moment decay `β₁`.
    pub beta1: f64,
    /// Second-moment decay `β₂`.
    pub beta2: f64,
    /// Denominator guard `ε`.
    pub eps: f64,
    /// Classical weight decay on every parameter (0 = none).
    pub weight_decay: f64,
    /// AdamW (decay decoupled from the gradient, scaled by `η`) rather than Adam (decay added to `g`).
    pub decoupled_weight_decay: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: true,
        }
    }
}

#[derive(Debug, Default)]
struct AdamState {
    m1: Option<Tensor>,
    m2: Option<Tensor>,
    work: Option<Tensor>,
    scores: Option<Tensor>,
    smoothed: Option<Tensor>,
    steps: i32,
}

/// Adam / AdamW that applies pruning masks and the selective-decay regularizer every step.
#[derive(Debug)]
pub struct MaskedAdam {
    cfg: AdamConfig,
    regularizer: Option<SelectiveDecay>,
    state: HashMap<String, AdamState>,
    fused: bool,
    keep_scratch: bool,
}

impl MaskedAdam {
    /// A new optimizer; `regularizer` applies to the prunable parameters only.
    pub fn new(cfg: AdamConfig, regularizer: Option<SelectiveDecay>) -> Result<Self> {
        let regularizer = validated(regularizer)?;
        if !(0.0..1.0).contains(&cfg.beta1) || !(0.0..1.0).contains(&cfg.beta2) || cfg.eps <= 0.0 {
            return Err(crate::Error::Config(format!(
                "Adam needs beta1, beta2 in [0, 1) and eps > 0, got {cfg:?}"
            )));
        }
        Ok(Self {
            cfg,
            regularizer,
            state: HashMap::new(),
            fused: true,
            keep_scratch: true,
        })
    }

    /// Uses tensor ops even on the CPU (the portable path; tests compare both).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// Keeps each parameter's scratch buffer (the masked gradient, where stored scores or the
    /// L2 term need one; otherwise the pass masks the gradient itself) between steps: the
    /// default, no allocation per step. Off, it is freed after every step, which leaves one
    /// gradient-sized copy of the trained weights less in memory between batches.
    pub fn set_keep_scratch(&mut self, keep: bool) {
        self.keep_scratch = keep;
        if !keep {
            for st in self.state.values_mut() {
                st.work = None;
            }
        }
    }

    /// The first and second moments of a parameter, once it has taken a step.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        let s = self.state.get(name)?;
        Some((s.m1.as_ref()?, s.m2.as_ref()?))
    }
}

impl Optimizer for MaskedAdam {
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
            let slots = [("m1", &st.m1), ("m2", &st.m2), ("smoothed", &st.smoothed)];
            for (slot, t) in slots {
                if let Some(t) = t {
                    out.push((format!("{name}/{slot}"), t.clone()));
                }
            }
            let steps = Tensor::new(&[st.steps as i64], &Device::Cpu)?;
            out.push((format!("{name}/steps"), steps));
        }
        Ok(out)
    }

    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.state.clear();
        for (key, t) in tensors {
            let (name, slot) = split_state_key(key)?;
            let st = self.state.entry(name.to_string()).or_default();
            match slot {
                "m1" => st.m1 = Some(owned_f32(t)?),
                "m2" => st.m2 = Some(owned_f32(t)?),
                "smoothed" => st.smoothed = Some(owned_f32(t)?),
                "steps" => {
                    let v = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
                    st.steps = v.first().copied().unwrap_or(0) as i32;
                }
                other => {
                    return Err(crate::Error::Config(format!(
                        "unknown Adam state slot `{other}` in `{key}`"
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
        let keep_scratch = self.keep_scratch;
        for_each_step_input(params, masks, grads, regularizer, relevance, |x| {
            let state = self.state.entry(x.param.name.clone()).or_default();
            state.steps += 1;
            let w = x.param.var.as_tensor();
            if fused && x.fusable {
                fused_step(cfg, x.reg, w, x.grad, x.mask, x.relevance.as_ref(), state)?;
                if !keep_scratch {
                    state.work = None;
                }
                Ok(())
            } else {
                let new_w =
                    generic_step(cfg, x.reg, w, x.grad, x.mask, x.relevance.as_ref(), state)?;
                Ok(x.param.var.set(&new_w)?)
            }
        })
    }
}

fn bias_corrections(cfg: &AdamConfig, t: i32) -> (f64, f64) {
    (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t))
}

fn fused_step(
    cfg: AdamConfig,
    reg: Option<SelectiveDecay>,
    w: &Tensor,
    g: &Tensor,
    mask: Option<&Tensor>,
    relevance: Option<&Tensor>,
    st: &mut AdamState,
) -> Result<()> {
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let l2 = cfg.weight_decay > 0.0 && !cfg.decoupled_weight_decay;
    // A soft or all-weights gate on the instantaneous scores needs no threshold over the whole
    // tensor, so the pass below computes each score where it uses it (no score buffer written
    // and read back); smoothed scores are state, and a hard gate's threshold needs every score
    // first.
    let inline = reg.is_some_and(|r| r.ema_beta == 0.0 && !matches!(r.gate, Gate::Hard { .. }));
    // ĝ: the pass masks the gradient itself (it reads the mask anyway) unless something before
    // it needs ĝ (stored scores) or adds to it (the L2 term); then a masked copy (plus the L2
    // term) in our own buffer, which the pass's masking leaves bit for bit (masks are 0 or 1).
    let gm = if !l2 && (mask.is_none() || reg.is_none() || inline) {
        g
    } else {
        let (gm, _) = buffer(&mut st.work, w)?;
        match mask {
            Some(m) => gm.inplace_op3(&g, m, &MaskedCopy)?,
            None => gm.inplace_op2(&g, &CopyOp)?,
        }
        if l2 {
            gm.inplace_op2(
                w,
                &AxpyOp {
                    a: cfg.weight_decay as f32,
                },
            )?;
        }
        gm
    };
    let scores = match reg {
        Some(_) if inline => {
            st.scores = None;
            None
        }
        Some(r) => {
            let smoothed = r.ema_beta > 0.0;
            let slot = if smoothed {
                &mut st.smoothed
            } else {
                &mut st.scores
            };
            let (s, first) = buffer(slot, w)?;
            let beta = if smoothed && !first {
                r.ema_beta as f32
            } else {
                0.0
            };
            s.inplace_op3(
                w,
                relevance.unwrap_or(&gm),
                &SmoothOp {
                    beta,
                    relevance: r.relevance,
                },
            )?;
            let thr = match mask {
                Some(m) => with_cpu_f32(&s, |sd| {
                    with_cpu_f32(m, |md| r.threshold_of_scores(sd, Some(md)))
                })??,
                None => with_cpu_f32(&s, |sd| r.threshold_of_scores(sd, None))?,
            };
            Some((s, thr as f32))
        }
        None => None,
    };
    let (m1, _) = buffer(&mut st.m1, w)?;
    let (m2, _) = buffer(&mut st.m2, w)?;
    let (bc1, bc2) = bias_corrections(&cfg, st.steps);
    let op = AdamPass {
        beta1: cfg.beta1 as f32,
        beta2: cfg.beta2 as f32,
        bc1: bc1 as f32,
        bc2: bc2 as f32,
        eps: cfg.eps as f32,
        lr: cfg.lr as f32,
        weight_decay: if cfg.decoupled_weight_decay {
            cfg.weight_decay as f32
        } else {
            0.0
        },
        // The gates computed in the pass have no threshold (`+∞`, as `threshold_of_scores`).
        reg: reg.map(|r| (r, scores.as_ref().map_or(f32::INFINITY, |(_, thr)| *thr))),
    };
    // The scores' source: stored, the relevance given, or (with neither) ĝ in the pass.
    let score_src = match (&scores, inline) {
        (Some((s, _)), _) => Some(s),
        (None, true) => relevance,
        (None, false) => None,
    };
    with_cpu_f32(&gm, |g| {
        with_opt_f32(mask, |k| {
            with_opt_f32(score_src, |sc| {
                with_mut3((w, &m1, &m2), |w, m1, m2| {
                    let n = w.len();
                    let lens = [m1.len(), m2.len(), g.len(), k.map_or(n, <[f32]>::len)];
                    check_len("adam step", n, &lens)?;
                    check_len("adam step", n, &[sc.map_or(n, <[f32]>::len)])?;
                    par_chunks3((w, m1, m2), |r, w, m1, m2| {
                        let k = k.map(|k| &k[r.clone()]);
                        let sc = match sc {
                            Some(s) if inline => Scores::Of(&s[r.clone()]),
                            Some(s) => Scores::Stored(&s[r.clone()]),
                            None if inline => Scores::OfGradient,
                            None => Scores::None,
                        };
                        op.run(
                            Chunk {
                                w,
                                m1,
                                m2,
                                g: &g[r],
                                k,
                            },
                            sc,
                        )
                    });
                    Ok(())
                })
            })
        })
    })????;
    Ok(())
}

/// Runs `f` on the contiguous f32 data of `t`, if there is a tensor.
fn with_opt_f32<R>(t: Option<&Tensor>, f: impl FnOnce(Option<&[f32]>) -> R) -> Result<R> {
    Ok(match t {
        Some(t) => with_cpu_f32(t, |d| f(Some(d)))?,
        None => f(None),
    })
}

/// Adam's moments, direction and the weights' step in one pass over a parameter (after ĝ
/// and, with a regularizer, the relevance scores and their gate threshold are known).
struct AdamPass {
    beta1: f32,
    beta2: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    lr: f32,
    /// AdamW's decoupled weight decay (0 for Adam's, already in ĝ).
    weight_decay: f32,
    /// The regularizer and its gate threshold.
    reg: Option<(SelectiveDecay, f32)>,
}

/// One chunk of a parameter as [`AdamPass`] sees it: the weights and both moments (updated),
/// the gradient and the mask, if any.
struct Chunk<'a> {
    w: &'a mut [f32],
    m1: &'a mut [f32],
    m2: &'a mut [f32],
    g: &'a [f32],
    k: Option<&'a [f32]>,
}

impl AdamPass {
    /// `ĝ = g ⊙ k`, `m₁ ← (β₁ m₁ + (1−β₁) ĝ) ⊙ k`, `m₂ ← (β₂ m₂ + (1−β₂) ĝ²) ⊙ k` (with a mask
    /// `k`), `u = (m₁/bc₁) / (√(m₂/bc₂) + ε)`, then the step of `w` (with the scores `s` when
    /// regularized).
    fn run(&self, c: Chunk, s: Scores) {
        on_widest_vectors(self.reg, ConstantKinds(AdamLoop { op: self, c, s }))
    }

    /// [`Self::body`] with the scores' source and (for computed scores) the relevance kind
    /// known where it is compiled.
    #[inline(always)]
    fn sourced(&self, c: Chunk, s: Scores, reg: Option<(SelectiveDecay, f32)>) {
        let n = c.w.len();
        match s {
            Scores::None => self.body(c, |_, _, _| 0.0, reg),
            Scores::Stored(s) => {
                let s = &s[..n];
                self.body(c, |i, _, _| s[i], reg)
            }
            Scores::Of(src) => {
                let src = Some(&src[..n]);
                with_constant_relevance(reg, ComputedScores { op: self, c, src })
            }
            Scores::OfGradient => with_constant_relevance(
                reg,
                ComputedScores {
                    op: self,
                    c,
                    src: None,
                },
            ),
        }
    }

    /// [`Self::run`]'s loop, compiled for the CPU it runs on (element by element: the same
    /// bits whatever the vector width; no fused multiply-adds, which would change them). Every
    /// slice is cut to the weights' length first, so that indexing needs no bounds check.
    #[inline(always)]
    fn body(
        &self,
        c: Chunk,
        score_of: impl Fn(usize, f32, f32) -> f32,
        reg: Option<(SelectiveDecay, f32)>,
    ) {
        let (b1, c1, b2, c2) = (self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2);
        let n = c.w.len();
        let (w, m1, m2) = (c.w, &mut c.m1[..n], &mut c.m2[..n]);
        let (g, k) = (&c.g[..n], c.k.map(|k| &k[..n]));
        let reg = reg.as_ref().map(|(r, thr)| (r, *thr));
        for i in 0..n {
            let g = match k {
                Some(k) => g[i] * k[i],
                None => g[i],
            };
            let (a, b) = (b1 * m1[i] + c1 * g, b2 * m2[i] + c2 * g * g);
            (m1[i], m2[i]) = match k {
                Some(k) => (a * k[i], b * k[i]),
                None => (a, b),
            };
            let u = (m1[i] / self.bc1) / ((m2[i] / self.bc2).sqrt() + self.eps);
            // The score of the weight before its step, as the stored scores are.
            let s = score_of(i, w[i], g);
            w[i] = updated(w[i], u, s, self.lr, self.weight_decay, reg);
        }
    }
}

/// [`AdamPass`]'s loop over one chunk, run through [`ConstantKinds`].
struct AdamLoop<'a> {
    op: &'a AdamPass,
    c: Chunk<'a>,
    s: Scores<'a>,
}

impl RegularizedLoop for AdamLoop<'_> {
    #[inline(always)]
    fn run(self, reg: Option<(SelectiveDecay, f32)>) {
        // One copy per mask presence, so that the loop does not test it per element.
        let AdamLoop { op, c, s } = self;
        match c.k {
            Some(k) => op.sourced(Chunk { k: Some(k), ..c }, s, reg),
            None => op.sourced(Chunk { k: None, ..c }, s, reg),
        }
    }
}

/// [`AdamPass`]'s loop with scores computed from `src`, or from ĝ without one, run by
/// [`with_constant_relevance`].
struct ComputedScores<'a> {
    op: &'a AdamPass,
    c: Chunk<'a>,
    src: Option<&'a [f32]>,
}

impl RegularizedLoop for ComputedScores<'_> {
    #[inline(always)]
    fn run(self, reg: Option<(SelectiveDecay, f32)>) {
        let Some(rel) = reg.map(|(r, _)| r.relevance) else {
            return self.op.body(self.c, |_, _, _| 0.0, None);
        };
        match self.src {
            Some(src) => self.op.body(self.c, |i, w, _| score(rel, w, src[i]), reg),
            None => self.op.body(self.c, |_, w, g| score(rel, w, g), reg),
        }
    }
}

/// Where [`AdamPass`] finds each weight's relevance score.
#[derive(Clone, Copy)]
enum Scores<'a> {
    /// No regularizer.
    None,
    /// Computed beforehand (smoothed, or for a hard gate's threshold).
    Stored(&'a [f32]),
    /// Computed in the pass from the weight and this relevance source, with the regularizer's
    /// relevance kind.
    Of(&'a [f32]),
    /// Computed in the pass from the weight and ĝ.
    OfGradient,
}

fn generic_step(
    cfg: AdamConfig,
    reg: Option<SelectiveDecay>,
    w: &Tensor,
    g: &Tensor,
    mask: Option<&Tensor>,
    relevance: Option<&Tensor>,
    st: &mut AdamState,
) -> Result<Tensor> {
    let g = g.to_dtype(w.dtype())?;
    let mask = mask.map(|m| m.to_dtype(w.dtype())).transpose()?;
    let mut gm = match &mask {
        Some(m) => (&g * m)?,
        None => g,
    };
    if cfg.weight_decay > 0.0 && !cfg.decoupled_weight_decay {
        gm = (gm + (w * cfg.weight_decay)?)?;
    }
    let masked = |t: Tensor| -> Result<Tensor> {
        Ok(match &mask {
            Some(m) => (t * m)?,
            None => t,
        })
    };
    let m1 = match &st.m1 {
        Some(m) => ((m * cfg.beta1)? + (&gm * (1.0 - cfg.beta1))?)?,
        None => (&gm * (1.0 - cfg.beta1))?,
    };
    let m2 = match &st.m2 {
        Some(m) => ((m * cfg.beta2)? + (gm.sqr()? * (1.0 - cfg.beta2))?)?,
        None => (gm.sqr()? * (1.0 - cfg.beta2))?,
    };
    let (m1, m2) = (masked(m1)?, masked(m2)?);
    st.m1 = Some(m1.clone());
    st.m2 = Some(m2.clone());
    let (bc1, bc2) = bias_corrections(&cfg, st.steps);
    let mut dir = ((m1 / bc1)? / ((m2 / bc2)?.sqrt()? + cfg.eps)?)?;
    if cfg.weight_decay > 0.0 && cfg.decoupled_weight_decay {
        dir = (dir + (w * cfg.weight_decay)?)?;
    }
    let mut new_w = match reg {
        Some(r) => {
            let scores = r.scores(w, relevance.unwrap_or(&gm))?;
            let scores = if r.ema_beta > 0.0 {
                let s = match &st.smoothed {
                    Some(prev) => r.smooth(prev, &scores)?,
                    None => scores,
                };
                st.smoothed = Some(s.clone());
                s
            } else {
                scores
            };
            let gate = r.gate_from_scores(&scores, mask.as_ref())?;
            r.decoupled_step(w, &dir, cfg.lr, &gate)?
        }
        None => (w - (dir * cfg.lr)?)?,
    };
    if let Some(m) = &mask {
        new_w = (new_w * m)?;
    }
    Ok(new_w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relprune_core::{Penalty, Relevance};

    fn chunk<'a>(
        w: &'a mut [f32],
        m1: &'a mut [f32],
        m2: &'a mut [f32],
        g: &'a [f32],
        k: Option<&'a [f32]>,
    ) -> Chunk<'a> {
        Chunk { w, m1, m2, g, k }
    }

    #[test]
    fn scores_and_masking_done_in_the_pass_give_the_bits_of_stored_scores_and_masked_copies() {
        let n = 1000;
        let val = |i: usize, a: f32| (i as f32 * a).sin() * 0.7;
        let g: Vec<f32> = (0..n).map(|i| val(i, 0.37)).collect();
        let src: Vec<f32> = (0..n).map(|i| val(i, 1.3) * 2.0).collect();
        for relevance in [Relevance::Gradient, Relevance::Taylor] {
            for gate in [Gate::Soft, Gate::All] {
                for penalty in [Penalty::L2, Penalty::L1] {
                    let reg = SelectiveDecay {
                        gate,
                        relevance,
                        penalty,
                        lambda: 0.3,
                        ..Default::default()
                    };
                    let op = AdamPass {
                        beta1: 0.9,
                        beta2: 0.999,
                        bc1: 0.1,
                        bc2: 0.001,
                        eps: 1e-8,
                        lr: 0.01,
                        weight_decay: 0.0,
                        reg: Some((reg, f32::INFINITY)),
                    };
                    let fresh = || {
                        let w: Vec<f32> = (0..n).map(|i| val(i, 0.11)).collect();
                        (w, vec![0.01f32; n], vec![0.02f32; n])
                    };
                    let (mut w1, mut a1, mut b1) = fresh();
                    let stored: Vec<f32> = w1
                        .iter()
                        .zip(&src)
                        .map(|(&w, &r)| score(relevance, w, r))
                        .collect();
                    op.run(
                        chunk(&mut w1, &mut a1, &mut b1, &g, None),
                        Scores::Stored(&stored),
                    );
                    let (mut w2, mut a2, mut b2) = fresh();
                    op.run(chunk(&mut w2, &mut a2, &mut b2, &g, None), Scores::Of(&src));
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&w1), bits(&w2), "{relevance:?} {gate:?} {penalty:?}");
                    assert_eq!((bits(&a1), bits(&b1)), (bits(&a2), bits(&b2)));
                    // With a mask: ĝ masked in the pass, scores from it, against a gradient
                    // masked before and its stored scores (what a hard gate's path does).
                    let k: Vec<f32> = (0..n).map(|i| (i % 3 != 0) as u8 as f32).collect();
                    let gk: Vec<f32> = g.iter().zip(&k).map(|(g, k)| g * k).collect();
                    let (mut w4, mut a4, mut b4) = fresh();
                    let stored: Vec<f32> = w4
                        .iter()
                        .zip(&gk)
                        .map(|(&w, &g)| score(relevance, w, g))
                        .collect();
                    let sc = Scores::Stored(&stored);
                    op.run(chunk(&mut w4, &mut a4, &mut b4, &gk, Some(&k)), sc);
                    let (mut w5, mut a5, mut b5) = fresh();
                    op.run(
                        chunk(&mut w5, &mut a5, &mut b5, &g, Some(&k)),
                        Scores::OfGradient,
                    );
                    assert_eq!(
                        bits(&w4),
                        bits(&w5),
                        "masked {relevance:?} {gate:?} {penalty:?}"
                    );
                    assert_eq!((bits(&a4), bits(&b4)), (bits(&a5), bits(&b5)));
                    assert_ne!(bits(&w4), bits(&w1));
                    // The regularizer did act: the weights differ from an unregularized step.
                    let plain = AdamPass { reg: None, ..op };
                    let (mut w3, mut a3, mut b3) = fresh();
                    plain.run(chunk(&mut w3, &mut a3, &mut b3, &g, None), Scores::None);
                    assert_ne!(bits(&w1), bits(&w3));
                }
            }
        }
    }
}
