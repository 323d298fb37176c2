//! Fused CPU kernels: the regularizer applied in one pass over memory, without allocations.
//!
//! A chain of tensor ops allocates a temporary per op and per parameter; on a CPU that costs more
//! than the optimizer step itself. These kernels compute the same thing as the tensor functions of
//! [`SelectiveDecay`] (tests check they agree) and are what the engine uses on the hot path.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};

use crate::regularizer::threshold_from_stat;
use crate::{Error, Gate, GateStat, Relevance, Result, SelectiveDecay};

/// The relevance score of one element.
#[inline(always)]
pub fn score(relevance: Relevance, w: f32, g: f32) -> f32 {
    match relevance {
        Relevance::Gradient | Relevance::OutputSensitivity => g.abs(),
        Relevance::Taylor => (w * g).abs(),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let data = match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => v.as_slice(),
        _ => {
            return Err(Error::Config(format!(
                "fused kernel needs an f32 CPU tensor, got {:?} on {:?}",
                t.dtype(),
                t.device().location()
            )))
        }
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Shape("fused kernel needs a contiguous tensor".into()))?;
    Ok(f(&data[start..end]))
}

/// Mutable contiguous f32 data of a CPU storage handed to an in-place op.
pub fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("in-place kernel needs a contiguous tensor".into())
    })?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        other => candle_core::bail!("in-place kernel needs f32, got {:?}", other.dtype()),
    }
}

/// Contiguous f32 data of a CPU storage handed to an op as a source.
pub fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("kernel needs a contiguous tensor".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        other => candle_core::bail!("kernel needs f32, got {:?}", other.dtype()),
    }
}

/// The largest `|x|` (0 for an empty slice).
pub fn max_abs(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = v.abs();
            *a = if v > *a { v } else { *a };
        }
    }
    let m = rest.iter().fold(0f32, |m, &v| m.max(v.abs()));
    acc.iter().fold(m, |m, &v| m.max(v))
}

/// The largest `|w·g|` (0 for empty slices).
pub fn max_abs_product(w: &[f32], g: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (wc, gc) = (w.chunks_exact(16), g.chunks_exact(16));
    let m = wc
        .remainder()
        .iter()
        .zip(gc.remainder())
        .fold(0f32, |m, (&w, &g)| m.max((w * g).abs()));
    for (cw, cg) in wc.zip(gc) {
        for ((a, &w), &g) in acc.iter_mut().zip(cw).zip(cg) {
            let v = (w * g).abs();
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(m, |m, &v| m.max(v))
}

/// The `q` quantile (linear interpolation, as numpy's default) of the scores whose mask is non-zero.
pub fn quantile_of_alive(mut scores: Vec<f32>, mask: Option<&[f32]>, q: f64) -> f32 {
    if let Some(m) = mask {
        let mut k = 0;
        for i in 0..scores.len() {
            if m[i] != 0.0 {
                scores[k] = scores[i];
                k += 1;
            }
        }
        scores.truncate(k);
    }
    if scores.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (scores.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let (_, lo_v, rest) = scores.select_nth_unstable_by(lo, f32::total_cmp);
    let lo_v = *lo_v;
    if frac == 0.0 || rest.is_empty() {
        return lo_v;
    }
    let hi_v = rest.iter().copied().fold(f32::INFINITY, f32::min);
    (lo_v as f64 + frac * (hi_v as f64 - lo_v as f64)) as f32
}

impl SelectiveDecay {
    /// The irrelevance threshold from host data (the fused counterpart of [`SelectiveDecay::threshold`]).
    ///
    /// `g` should already be zero where the mask is zero, as the engine guarantees.
    pub fn threshold_host(&self, w: &[f32], g: &[f32], mask: Option<&[f32]>) -> f64 {
        let (stat, tau) = match self.gate {
            Gate::All | Gate::Soft => return f64::INFINITY,
            Gate::Hard { stat, tau } => (stat, tau),
        };
        let rel = self.relevance;
        let alive = |i: usize| mask.is_none_or(|m| m[i] != 0.0);
        let value = match stat {
            // Scores are >= 0 and zero wherever the mask is (g, and w for Taylor, are zero there),
            // so the maximum needs no mask: a branch-free pass the compiler vectorizes.
            GateStat::Max => match rel {
                Relevance::Gradient | Relevance::OutputSensitivity => max_abs(g) as f64,
                Relevance::Taylor => max_abs_product(w, g) as f64,
            },
            GateStat::Mean => {
                let (mut sum, mut n) = (0.0f64, 0usize);
                for i in 0..g.len() {
                    if alive(i) {
                        sum += score(rel, w[i], g[i]) as f64;
                        n += 1;
                    }
                }
                if n == 0 {
                    0.0
                } else {
                    sum / n as f64
                }
            }
            GateStat::Quantile(q) => {
                let s: Vec<f32> = w.iter().zip(g).map(|(&w, &g)| score(rel, w, g)).collect();
                quantile_of_alive(s, mask, q) as f64
            }
        };
        threshold_from_stat(value, tau)
    }

    /// The irrelevance threshold of precomputed (e.g. smoothed) scores, `>= 0` and zero where pruned.
    pub fn threshold_of_scores(&self, s: &[f32], mask: Option<&[f32]>) -> f64 {
        let (stat, tau) = match self.gate {
            Gate::All | Gate::Soft => return f64::INFINITY,
            Gate::Hard { stat, tau } => (stat, tau),
        };
        let value = match stat {
            // Smoothed scores of pruned elements decay but are not zero until a reset.
            GateStat::Max => match mask {
                Some(m) => s
                    .iter()
                    .zip(m)
                    .fold(0f32, |a, (&x, &m)| if m != 0.0 { a.max(x) } else { a })
                    as f64,
                None => max_abs(s) as f64,
            },
            GateStat::Mean => {
                let (mut sum, mut n) = (0.0f64, 0usize);
                for (i, &x) in s.iter().enumerate() {
                    if mask.is_none_or(|m| m[i] != 0.0) {
                        sum += x as f64;
                        n += 1;
                    }
                }
                if n == 0 {
                    0.0
                } else {
                    sum / n as f64
                }
            }
            GateStat::Quantile(q) => quantile_of_alive(s.to_vec(), mask, q) as f64,
        };
        threshold_from_stat(value, tau)
    }

    /// Applies `w ← w − λ·m⊙w` to a variable in place, given its gradient.
    ///
    /// This is the regularizer on its own, for users who keep their optimizer: call it right after
    /// the optimizer step. Fused on the CPU; tensor ops on other devices.
    pub fn apply_in_place(&self, w: &Var, g: &Tensor, mask: Option<&Tensor>) -> Result<()> {
        if self.lambda == 0.0 {
            return Ok(());
        }
        if matches!(w.device(), Device::Cpu) && w.dtype() == DType::F32 && w.is_contiguous() {
            let g = match mask {
                Some(m) => (g.to_dtype(DType::F32)? * m.to_dtype(DType::F32)?)?,
                None => g.to_dtype(DType::F32)?.contiguous()?,
            };
            let mask_host = match mask {
                Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => None,
            };
            let thr = with_cpu_f32(w.as_tensor(), |wd| {
                with_cpu_f32(&g, |gd| self.threshold_host(wd, gd, mask_host.as_deref()))
            })??;
            let op = SelectiveDecayOp {
                reg: *self,
                threshold: thr as f32,
            };
            w.as_tensor().inplace_op2(&g, &op)?;
            return Ok(());
        }
        let gate = self.gate(w.as_tensor(), g, mask)?;
        let decay = self.decay(w.as_tensor(), &gate)?;
        w.set(&(w.as_tensor() - decay)?)?;
        Ok(())
    }
}

/// In-place `w ← w − λ·m(score(w, g))·pull(w)` on a CPU tensor (dst `w`, source `g`).
#[derive(Clone, Copy, Debug)]
pub struct SelectiveDecayOp {
    /// The regularizer (relevance, gate, penalty, λ).
    pub reg: SelectiveDecay,
    /// The tensor's irrelevance threshold (hard gates).
    pub threshold: f32,
}

impl InplaceOp2 for SelectiveDecayOp {
    fn name(&self) -> &'static str {
        "relprune-selective-decay"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let w = cpu_f32_mut(s1, l1)?;
        let g = cpu_f32(s2, l2)?;
        if w.len() != g.len() {
            candle_core::bail!(
                "selective decay: {} weights but {} gradients",
                w.len(),
                g.len()
            );
        }
        let (reg, thr, lambda) = (self.reg, self.threshold, self.reg.lambda as f32);
        for (w, &g) in w.iter_mut().zip(g) {
            let m = reg.gate_value(score(reg.relevance, *w, g), thr);
            *w -= lambda * m * reg.pull(*w);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(stat: GateStat, relevance: Relevance) -> SelectiveDecay {
        SelectiveDecay {
            relevance,
            gate: Gate::Hard { stat, tau: 0.3 },
            lambda: 0.05,
            ..Default::default()
        }
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic pseudo-random sequence; no RNG dependency needed for this.
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn fused_decay_equals_the_tensor_form_for_every_gate_relevance_and_penalty() {
        let dev = Device::Cpu;
        let mut regs = Vec::new();
        for stat in [GateStat::Max, GateStat::Mean, GateStat::Quantile(0.4)] {
            for relevance in [
                Relevance::Gradient,
                Relevance::Taylor,
                Relevance::OutputSensitivity,
            ] {
                regs.push(reg(stat, relevance));
            }
        }
        regs.push(SelectiveDecay::lobster(0.05));
        regs.push(SelectiveDecay::l1(0.01));
        regs.push(SelectiveDecay {
            penalty: crate::Penalty::L1,
            ..reg(GateStat::Max, Relevance::Taylor)
        });
        for r in regs {
            {
                let w0 = Tensor::from_vec(data(257, 1), (257,), &dev).unwrap();
                let mask = Tensor::from_vec(
                    data(257, 3)
                        .iter()
                        .map(|&x| (x > -0.5) as u8 as f32)
                        .collect::<Vec<_>>(),
                    (257,),
                    &dev,
                )
                .unwrap();
                let w0 = (&w0 * &mask).unwrap();
                let g = (Tensor::from_vec(data(257, 2), (257,), &dev).unwrap() * &mask).unwrap();
                let gate = r.gate(&w0, &g, Some(&mask)).unwrap();
                let want = (&w0 - r.decay(&w0, &gate).unwrap()).unwrap();
                let var = Var::from_tensor(&w0).unwrap();
                r.apply_in_place(&var, &g, Some(&mask)).unwrap();
                let got = var.as_tensor().to_vec1::<f32>().unwrap();
                let want = want.to_vec1::<f32>().unwrap();
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-7, "{r:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn max_abs_helpers_match_a_plain_fold_for_every_length() {
        for n in [0, 1, 15, 16, 17, 33, 100] {
            let w = data(n, 5);
            let g = data(n, 6);
            let want = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(max_abs(&g), want);
            let want = w
                .iter()
                .zip(&g)
                .fold(0f32, |m, (w, g)| m.max((w * g).abs()));
            assert_eq!(max_abs_product(&w, &g), want);
        }
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        let s = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile_of_alive(s.clone(), None, 0.0), 1.0);
        assert_eq!(quantile_of_alive(s.clone(), None, 1.0), 4.0);
        assert_eq!(quantile_of_alive(s.clone(), None, 0.5), 2.5);
        assert_eq!(quantile_of_alive(s, Some(&[1.0, 0.0, 1.0, 1.0]), 0.5), 3.0);
        assert_eq!(quantile_of_alive(vec![], None, 0.5), 0.0);
    }

    #[test]
    fn apply_in_place_with_zero_lambda_leaves_weights_untouched() {
        let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.0f32, 1.0], &Device::Cpu).unwrap();
        SelectiveDecay::default()
            .with_lambda(0.0)
            .apply_in_place(&w, &g, None)
            .unwrap();
        assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn a_non_cpu_or_non_f32_tensor_is_refused_by_the_host_reader() {
        let t = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert!(with_cpu_f32(&t, |_| ()).is_err());
    }
}
