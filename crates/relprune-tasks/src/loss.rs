//! Label-smoothed cross-entropy for sequence models, as PyTorch's
//! `CrossEntropyLoss(label_smoothing=ε, ignore_index=pad)` computes it: the target distribution
//! puts `1 − ε` on the reference token and spreads `ε` uniformly over all `C` classes, so
//! `loss = (1 − ε)·(−log p_y) + ε·(1/C)·Σ_c (−log p_c)`, averaged over the positions that are not
//! padding.

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use crate::{Error, Result};

/// Mean cross-entropy of `logits` `(N, C)` against class indices `targets` `(N,)`: PyTorch's
/// `F.cross_entropy` (the label-smoothed loss with `ε = 0` and nothing ignored).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    label_smoothed_cross_entropy(logits, targets, 0.0, None)
}

/// Mean label-smoothed cross-entropy of `logits` `(N, C)` (or `(B, T, C)`) against `targets`
/// `(N,)` (or `(B, T)`, u32), skipping positions whose target is `ignore` (padding).
///
/// Differentiable in `logits`; `epsilon = 0` is the plain cross-entropy. An all-padding batch is
/// an error rather than a NaN loss.
pub fn label_smoothed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    epsilon: f64,
    ignore: Option<u32>,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&epsilon) {
        return Err(Error::Invalid(format!(
            "label smoothing must be in [0, 1), got {epsilon}"
        )));
    }
    let c = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), c))?;
    let targets = targets.flatten_all()?.to_dtype(DType::U32)?;
    let n = logits.dim(0)?;
    if targets.dim(0)? != n {
        return Err(Error::Invalid(format!(
            "{n} rows of logits but {} targets",
            targets.dim(0)?
        )));
    }
    if let Some(bad) = targets
        .to_vec1::<u32>()?
        .into_iter()
        .find(|&t| t as usize >= c && Some(t) != ignore)
    {
        return Err(Error::Invalid(format!(
            "target class {bad} outside the {c} classes"
        )));
    }
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        // One fused pass forward and one backward instead of candle's ~10 passes over the
        // (positions × vocabulary) matrix, which dominated a small Transformer's step.
        let targets = targets.to_vec1::<u32>()?;
        let count = targets.iter().filter(|&&t| Some(t) != ignore).count();
        if count == 0 {
            return Err(Error::Invalid(
                "every target is padding: no position to average the loss over".into(),
            ));
        }
        let op = FusedSmoothedCe {
            targets,
            epsilon: epsilon as f32,
            ignore,
            count,
            lse: std::sync::Mutex::new(None),
        };
        return Ok(logits.contiguous()?.apply_op1(op)?);
    }
    tensor_path(&logits, targets, epsilon, ignore, n)
}

/// Label-smoothed cross-entropy of (N, C) f32 logits on the CPU as one custom op with its own
/// backward (`p − q` per row, scaled by the upstream gradient over the kept positions). Rows
/// run in parallel in fixed blocks, each row's `log Σ exp` is kept from the forward pass for the
/// backward, and the row loops are compiled for AVX2 + FMA where the CPU has them (with a
/// polynomial `exp`): the (positions × vocabulary) matrix is read twice per step instead of five
/// times with a libm call per element.
struct FusedSmoothedCe {
    targets: Vec<u32>,
    epsilon: f32,
    ignore: Option<u32>,
    count: usize,
    /// Each row's `log Σ exp z` from the forward pass (NaN for ignored rows).
    lse: std::sync::Mutex<Option<Vec<f32>>>,
}

/// An element of a buffer the row loops fill.
type Uninit = std::mem::MaybeUninit<f32>;

/// Rows per parallel task: a fixed split, so the loss's summation order, and with it every bit
/// of the result, does not depend on the number of threads.
const ROWS_PER_TASK: usize = 16;

/// Below this many logits one thread is faster than handing blocks to rayon (the blocks and
/// their summation order are the same either way).
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Lanes of the row reductions: one AVX-512 register of f32, two AVX2 ones (the same order of
/// additions, so the same bits, on both).
const LANES: usize = 16;

/// The row loops, written so that the compiler vectorizes them (fixed-width lane accumulators,
/// summed in a fixed order).
mod rows {
    use super::LANES;
    use relprune_models::activation::exp_f32;
    use std::mem::MaybeUninit;

    #[inline(always)]
    pub fn max(row: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                // A plain comparison (not `f32::max`'s NaN rule) compiles to one `vmaxps`.
                *a = if v > *a { v } else { *a };
            }
        }
        tail.iter()
            .chain(&acc)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// `(Σ exp(z − m), Σ z)`.
    #[inline(always)]
    pub fn sums(row: &[f32], m: f32) -> (f32, f32) {
        let (mut e, mut z) = ([0f32; LANES], [0f32; LANES]);
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for ((ea, za), &v) in e.iter_mut().zip(z.iter_mut()).zip(c) {
                *ea += exp_f32(v - m);
                *za += v;
            }
        }
        let mut se: f32 = e.iter().sum();
        let mut sz: f32 = z.iter().sum();
        for &v in tail {
            se += exp_f32(v - m);
            sz += v;
        }
        (se, sz)
    }

    /// `out = scale·(exp(z − lse) − uniform)`, written once (`out` may be uninitialized).
    #[inline(always)]
    pub fn grad(row: &[f32], out: &mut [MaybeUninit<f32>], lse: f32, scale: f32, uniform: f32) {
        for (o, &v) in out.iter_mut().zip(row) {
            o.write(scale * (exp_f32(v - lse) - uniform));
        }
    }
}

impl FusedSmoothedCe {
    /// One block of rows: the sum of their losses and each row's `log Σ exp`.
    fn forward_rows(&self, z: &[f32], targets: &[u32], c: usize, lse: &mut [f32]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if relprune_models::activation::has_avx512() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { self.forward_rows_avx512(z, targets, c, lse) };
        }
        #[cfg(target_arch = "x86_64")]
        if relprune_models::activation::has_avx2_fma() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { self.forward_rows_avx2(z, targets, c, lse) };
        }
        self.forward_rows_body(z, targets, c, lse)
    }

    /// [`Self::forward_rows`] compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn forward_rows_avx512(&self, z: &[f32], t: &[u32], c: usize, lse: &mut [f32]) -> f64 {
        self.forward_rows_body(z, t, c, lse)
    }

    /// [`Self::forward_rows`] compiled for AVX2 + FMA (the same arithmetic: `mul_add` is a
    /// fused multiply-add either way).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_rows_avx2(&self, z: &[f32], t: &[u32], c: usize, lse: &mut [f32]) -> f64 {
        self.forward_rows_body(z, t, c, lse)
    }

    /// Each kept row's gradient `scale·(p − q)` into `g`, zeros in ignored rows: every element
    /// of `g` is written (it may start uninitialized).
    fn grad_rows(&self, g: &mut [Uninit], z: &[f32], t: &[u32], lse: &[f32], c: usize, scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if relprune_models::activation::has_avx512() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { self.grad_rows_avx512(g, z, t, lse, c, scale) };
        }
        #[cfg(target_arch = "x86_64")]
        if relprune_models::activation::has_avx2_fma() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { self.grad_rows_avx2(g, z, t, lse, c, scale) };
        }
        self.grad_rows_body(g, z, t, lse, c, scale)
    }

    /// [`Self::grad_rows`] compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn grad_rows_avx512(
        &self,
        g: &mut [Uninit],
        z: &[f32],
        t: &[u32],
        lse: &[f32],
        c: usize,
        scale: f32,
    ) {
        self.grad_rows_body(g, z, t, lse, c, scale)
    }

    /// [`Self::grad_rows`] compiled for AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn grad_rows_avx2(
        &self,
        g: &mut [Uninit],
        z: &[f32],
        t: &[u32],
        lse: &[f32],
        c: usize,
        scale: f32,
    ) {
        self.grad_rows_body(g, z, t, lse, c, scale)
    }

    #[inline(always)]
    fn grad_rows_body(
        &self,
        g: &mut [Uninit],
        z: &[f32],
        t: &[u32],
        lse: &[f32],
        c: usize,
        scale: f32,
    ) {
        let uniform = self.epsilon / c as f32;
        for (((g, z), &t), &l) in g.chunks_exact_mut(c).zip(z.chunks_exact(c)).zip(t).zip(lse) {
            if Some(t) == self.ignore {
                g.fill(Uninit::new(0.0));
                continue;
            }
            rows::grad(z, g, l, scale, uniform);
            // SAFETY: `rows::grad` wrote the whole row (`g` and `z` have `c` elements each).
            let at = unsafe { g[t as usize].assume_init_mut() };
            *at -= scale * (1.0 - self.epsilon);
        }
    }

    #[inline(always)]
    fn forward_rows_body(&self, z: &[f32], targets: &[u32], c: usize, lse: &mut [f32]) -> f64 {
        let eps = self.epsilon as f64;
        let mut total = 0.0f64;
        for ((row, &t), l) in z.chunks_exact(c).zip(targets).zip(lse) {
            if Some(t) == self.ignore {
                *l = f32::NAN;
                continue;
            }
            let m = rows::max(row);
            let (se, sz) = rows::sums(row, m);
            *l = m + se.ln();
            let lse = *l as f64;
            let nll = lse - row[t as usize] as f64;
            let mean_z = sz as f64 / c as f64;
            total += (1.0 - eps) * nll + eps * (lse - mean_z);
        }
        total
    }
}

impl candle_core::CustomOp1 for FusedSmoothedCe {
    fn name(&self) -> &'static str {
        "label-smoothed-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fused cross-entropy: not contiguous".into()))?;
        let z = match storage {
            candle_core::CpuStorage::F32(v) => &v[start..end],
            _ => candle_core::bail!("fused cross-entropy: f32 logits only"),
        };
        let c = layout.dims()[1];
        let mut lse = vec![0f32; self.targets.len()];
        let blocks: Vec<f64> = if z.len() < PARALLEL_MIN_ELEMS {
            z.chunks(c * ROWS_PER_TASK)
                .zip(self.targets.chunks(ROWS_PER_TASK))
                .zip(lse.chunks_mut(ROWS_PER_TASK))
                .map(|((z, t), l)| self.forward_rows(z, t, c, l))
                .collect()
        } else {
            z.par_chunks(c * ROWS_PER_TASK)
                .zip(self.targets.par_chunks(ROWS_PER_TASK))
                .zip(lse.par_chunks_mut(ROWS_PER_TASK))
                .map(|((z, t), l)| self.forward_rows(z, t, c, l))
                .collect()
        };
        let total: f64 = blocks.iter().sum();
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
        let loss = (total / self.count as f64) as f32;
        Ok((candle_core::CpuStorage::F32(vec![loss]), ().into()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let scale = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.count as f32;
        let c = arg.dim(1)?;
        let arg = arg.contiguous()?;
        let (storage, layout) = arg.storage_and_layout();
        let z = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("fused cross-entropy: f32 CPU logits only"),
        };
        let cached = self.lse.lock().ok().and_then(|s| s.clone());
        let lse = match cached {
            Some(l) if l.len() == self.targets.len() => l,
            // A backward without the forward's statistics (not expected): recompute them.
            _ => {
                let mut l = vec![0f32; self.targets.len()];
                z.par_chunks(c * ROWS_PER_TASK)
                    .zip(self.targets.par_chunks(ROWS_PER_TASK))
                    .zip(l.par_chunks_mut(ROWS_PER_TASK))
                    .for_each(|((z, t), l)| {
                        self.forward_rows(z, t, c, l);
                    });
                l
            }
        };
        if self.targets.len() * c != z.len() {
            candle_core::bail!(
                "fused cross-entropy: {} logits for {} targets of {c} classes",
                z.len(),
                self.targets.len()
            )
        }
        // Written once by the row loops, with no zero fill first (a serial `memset` of the
        // positions × vocabulary matrix otherwise).
        let mut g = Vec::<f32>::with_capacity(z.len());
        let spare = &mut g.spare_capacity_mut()[..z.len()];
        if z.len() < PARALLEL_MIN_ELEMS {
            self.grad_rows(spare, z, &self.targets, &lse, c, scale);
        } else {
            spare
                .par_chunks_mut(c * ROWS_PER_TASK)
                .zip(z.par_chunks(c * ROWS_PER_TASK))
                .zip(self.targets.par_chunks(ROWS_PER_TASK))
                .zip(lse.par_chunks(ROWS_PER_TASK))
                .for_each(|(((g, z), t), l)| self.grad_rows(g, z, t, l, c, scale));
        }
        // SAFETY: the row loops wrote every row of the `z.len()` elements (`z` holds whole rows,
        // one per target).
        unsafe { g.set_len(z.len()) };
        drop(storage);
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// The same loss as plain tensor ops (any device and dtype).
fn tensor_path(
    logits: &Tensor,
    targets: Tensor,
    epsilon: f64,
    ignore: Option<u32>,
    n: usize,
) -> Result<Tensor> {
    // `ops::log_softmax` has a backward (candle's fused softmax kernels do not).
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let keep = match ignore {
        Some(pad) => targets.ne(pad)?.to_dtype(logp.dtype())?,
        None => Tensor::ones(n, logp.dtype(), logp.device())?,
    };
    let count = keep.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if count == 0.0 {
        return Err(Error::Invalid(
            "every target is padding: no position to average the loss over".into(),
        ));
    }
    // Padding targets may lie outside the classes: gather at a valid index, then mask.
    let safe = match ignore {
        Some(pad) => targets
            .ne(pad)?
            .where_cond(&targets, &targets.zeros_like()?)?,
        None => targets,
    };
    let nll = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let smooth = logp.mean(D::Minus1)?.neg()?;
    let per = ((nll * (1.0 - epsilon))? + (smooth * epsilon)?)?;
    Ok(((per * keep)?.sum_all()? / count)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The gradient of `loss` with respect to `z`, flattened.
    fn grad_of(loss: &Tensor, z: &Var) -> Vec<f32> {
        let g = loss.backward().unwrap();
        g.get(z.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn loss(logits: &[f32], shape: (usize, usize), t: &[u32], eps: f64, pad: Option<u32>) -> f64 {
        let l = Tensor::from_slice(logits, shape, &Device::Cpu).unwrap();
        let t = Tensor::from_slice(t, t.len(), &Device::Cpu).unwrap();
        label_smoothed_cross_entropy(&l, &t, eps, pad)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn matches_hand_computed_pytorch_values() {
        // Row 1: logits (0, ln 2, ln 3) → p = (1/6, 2/6, 3/6), target 2.
        // Row 2: uniform over 3, target 0.
        let l = [0.0, 2f32.ln(), 3f32.ln(), 1.0, 1.0, 1.0];
        let nll1 = -(0.5f64).ln();
        let nll2 = 3f64.ln();
        let plain = loss(&l, (2, 3), &[2, 0], 0.0, None);
        assert!((plain - (nll1 + nll2) / 2.0).abs() < 1e-6, "{plain}");
        let eps = 0.1;
        let mean_nll1 = -((1.0f64 / 6.0).ln() + (2.0f64 / 6.0).ln() + 0.5f64.ln()) / 3.0;
        let want = ((1.0 - eps) * nll1 + eps * mean_nll1 + (1.0 - eps) * nll2 + eps * nll2) / 2.0;
        let got = loss(&l, (2, 3), &[2, 0], eps, None);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn padding_positions_are_left_out_of_the_mean() {
        let l = [0.0, 2f32.ln(), 3f32.ln(), 5.0, -3.0, 0.5];
        let one = loss(&l[..3], (1, 3), &[2], 0.1, Some(7));
        // The second row's target is the pad id (even outside the classes): ignored.
        let both = loss(&l, (2, 3), &[2, 7], 0.1, Some(7));
        assert!((one - both).abs() < 1e-6, "{one} vs {both}");
    }

    #[test]
    fn all_padding_bad_targets_and_bad_epsilon_are_errors() {
        let l = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
        assert!(label_smoothed_cross_entropy(&l, &t(&[0, 0]), 0.1, Some(0)).is_err());
        assert!(label_smoothed_cross_entropy(&l, &t(&[0, 3]), 0.1, None).is_err());
        assert!(label_smoothed_cross_entropy(&l, &t(&[0]), 0.1, None).is_err());
        assert!(label_smoothed_cross_entropy(&l, &t(&[0, 1]), 1.0, None).is_err());
    }

    #[test]
    fn fused_cpu_op_equals_the_tensor_path_in_value_and_gradient() {
        // 3 sequences × 5 positions × 7 classes, pad id 6 at a few positions, large logits.
        let data: Vec<f32> = (0..105)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
            .collect();
        let targets: Vec<u32> = (0..15)
            .map(|i| if i % 4 == 3 { 6 } else { (i * 5 % 6) as u32 })
            .collect();
        for eps in [0.0, 0.1] {
            let z = Var::from_slice(&data, (3, 5, 7), &Device::Cpu).unwrap();
            let t = Tensor::from_slice(&targets, (3, 5), &Device::Cpu).unwrap();
            let fused = label_smoothed_cross_entropy(z.as_tensor(), &t, eps, Some(6)).unwrap();
            let flat = z.as_tensor().reshape((15, 7)).unwrap();
            let plain = tensor_path(&flat, t.flatten_all().unwrap(), eps, Some(6), 15).unwrap();
            let (a, b) = (
                fused.to_scalar::<f32>().unwrap(),
                plain.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
            let ga: Vec<f32> = grad_of(&fused, &z);
            let gb: Vec<f32> = grad_of(&plain, &z);
            for (x, y) in ga.iter().zip(&gb) {
                assert!((x - y).abs() < 1e-6, "{x} vs {y}");
            }
            // Padded positions get no gradient.
            assert!(ga[3 * 7..4 * 7].iter().all(|&v| v == 0.0));
        }
    }

    /// `rows × classes` logits (a variable) and targets with every fifth one padding (id 0).
    fn wide_case(rows: usize, classes: usize) -> (Var, Tensor) {
        let data: Vec<f32> = (0..rows * classes)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.013)
            .collect();
        let targets: Vec<u32> = (0..rows)
            .map(|i| {
                if i % 5 == 4 {
                    0
                } else {
                    (i * 31 % classes) as u32
                }
            })
            .collect();
        let z = Var::from_slice(&data, (rows, classes), &Device::Cpu).unwrap();
        let t = Tensor::from_slice(&targets, rows, &Device::Cpu).unwrap();
        (z, t)
    }

    /// Loss and gradient of the fused op on [`wide_case`].
    fn fused_loss_and_grad(rows: usize, classes: usize) -> (f32, Vec<f32>) {
        let (z, t) = wide_case(rows, classes);
        let l = label_smoothed_cross_entropy(z.as_tensor(), &t, 0.1, Some(0)).unwrap();
        (l.to_scalar::<f32>().unwrap(), grad_of(&l, &z))
    }

    #[test]
    fn fused_op_on_many_wide_rows_equals_the_tensor_path() {
        // More rows than one parallel block, a vocabulary that is not a multiple of the lanes.
        let (rows, classes) = (70, 1003);
        let (a, ga) = fused_loss_and_grad(rows, classes);
        let (z, t) = wide_case(rows, classes);
        let plain = tensor_path(z.as_tensor(), t, 0.1, Some(0), rows).unwrap();
        let b = plain.to_scalar::<f32>().unwrap();
        assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        let gb: Vec<f32> = grad_of(&plain, &z);
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() < 1e-7, "{x} vs {y}");
        }
    }

    #[test]
    fn fused_op_gives_the_same_bits_on_one_thread_and_on_two() {
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| fused_loss_and_grad(100, 257))
        };
        let ((a, ga), (b, gb)) = (on(1), on(2));
        assert_eq!(a.to_bits(), b.to_bits());
        assert!(ga.iter().zip(&gb).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn cross_entropy_equals_candles_in_value_and_gradient() {
        let data: Vec<f32> = (0..100 * 10)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07)
            .collect();
        let y: Vec<u32> = (0..100).map(|i| (i * 7 % 10) as u32).collect();
        let z = Var::from_slice(&data, (100, 10), &Device::Cpu).unwrap();
        let y = Tensor::from_slice(&y, 100, &Device::Cpu).unwrap();
        let ours = cross_entropy(z.as_tensor(), &y).unwrap();
        let theirs = candle_nn::loss::cross_entropy(z.as_tensor(), &y).unwrap();
        let (a, b) = (
            ours.to_scalar::<f32>().unwrap(),
            theirs.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        for (x, y) in grad_of(&ours, &z).iter().zip(&grad_of(&theirs, &z)) {
            assert!((x - y).abs() < 1e-7, "{x} vs {y}");
        }
    }

    #[test]
    fn gradient_is_softmax_minus_the_smoothed_target() {
        // d loss / d z = p − q with q = (1 − ε)·onehot + ε/C, for one row.
        let z = Var::from_slice(&[0.5f32, -1.0, 2.0, 0.0], (1, 4), &Device::Cpu).unwrap();
        let t = Tensor::from_slice(&[1u32], 1, &Device::Cpu).unwrap();
        let eps = 0.2;
        let l = label_smoothed_cross_entropy(z.as_tensor(), &t, eps, None).unwrap();
        let g: Vec<f32> = grad_of(&l, &z);
        let e: Vec<f64> = [0.5f64, -1.0, 2.0, 0.0].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        for (k, gk) in g.iter().enumerate() {
            let q = if k == 1 { 1.0 - eps } else { 0.0 } + eps / 4.0;
            assert!((*gk as f64 - (e[k] / s - q)).abs() < 1e-5, "{k}: {gk}");
        }
    }
}
