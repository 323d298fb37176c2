//! Layer norm, RMS norm and softmax over the last dimension as fused CPU ops with their own
//! backward.
//!
//! candle 0.11's fused `softmax_last_dim`, `LayerNorm` and `rms_norm` kernels have no backward,
//! so a training graph has to spell these out with plain tensor ops: a layer norm is eight ops
//! forward (each a pass over the activations and a new tensor) and more backward, each adding a
//! zero-filled gradient buffer. Here each is one custom op: the forward is one pass per row, the
//! backward one pass per row that returns every input's gradient at once (the layer norm's
//! statistics are recomputed from `x`, cheaper than storing them).
//!
//! The fused path runs on the CPU for f32 tensors; other devices and dtypes use the plain-ops
//! formulas ([`layer_norm_reference`], [`rms_norm_reference`], [`softmax_reference`]), which are
//! also what the tests compare against. Large inputs are split over rows with rayon; the weight
//! and bias gradients are summed per fixed block of rows and the blocks added in order, so every
//! bit of every result is the same whatever the number of threads.

use std::cell::Cell;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// Below this many elements a single thread is faster than handing rows to rayon.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// Rows per task, and per partial sum of the weight and bias gradients: a fixed split, so that
/// the sums' order does not depend on the number of threads.
const ROWS_PER_BLOCK: usize = 32;

thread_local! {
    static REFERENCE_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every op of this module taking its plain-ops path on this thread (benchmarks
/// and tests compare the two paths inside one process).
pub fn with_reference<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REFERENCE_ONLY.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(REFERENCE_ONLY.with(|r| r.replace(true)));
    f()
}

/// Whether this thread runs the fused ops (not inside [`with_reference`]).
pub(crate) fn fused_enabled() -> bool {
    !REFERENCE_ONLY.with(Cell::get)
}

/// Whether the fused CPU kernels apply to these tensors.
fn fused(ts: &[&Tensor]) -> bool {
    fused_enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// `nn.LayerNorm` over the last dimension: `(x − mean)/sqrt(var + eps)·weight + bias`, with the
/// biased variance; one fused op with its own backward on the CPU for f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    check_param(weight, d, "layer_norm weight")?;
    check_param(bias, d, "layer_norm bias")?;
    if !fused(&[x, weight, bias]) {
        return layer_norm_reference(x, weight, bias, eps);
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

/// T5's RMS norm over the last dimension: `x/sqrt(mean(x²) + eps)·weight` (no mean subtraction,
/// no bias); one fused op with its own backward on the CPU for f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    check_param(weight, d, "rms_norm weight")?;
    if !fused(&[x, weight]) {
        return rms_norm_reference(x, weight, eps);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNormOp { eps: eps as f32 })
}

/// Softmax over the last dimension; one fused op with its own backward on the CPU for f32.
/// Each row's maximum is subtracted first, so a row whose entries are all masked by the same
/// large negative value comes out uniform rather than NaN.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fused(&[x]) {
        return softmax_reference(x);
    }
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// [`layer_norm`] written with plain tensor ops (half precision computed in f32).
pub fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = upcast(x)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// [`rms_norm`] written with plain tensor ops (half precision computed in f32).
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = upcast(x)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// [`softmax_last_dim`] written with plain tensor ops.
pub fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Half-precision inputs are normalized in f32, as `transformers` does.
fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

fn check_param(p: &Tensor, d: usize, what: &str) -> Result<()> {
    match p.dims() {
        [n] if *n == d => Ok(()),
        dims => candle_core::bail!("{what} must have shape ({d}), got {dims:?}"),
    }
}

/// A layer norm module (`weight`, `bias`, `eps`) over [`layer_norm`].
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm with these parameters (shape `(D)` each).
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// An RMS norm module (`weight`, `eps`) over [`rms_norm`].
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// An RMS norm with this weight (shape `(D)`).
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The same norm over a detached view of its weight (same storage, no gradient).
    pub fn frozen(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            eps: self.eps,
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(contiguous_f32(s, layout, op)?),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// Sum with eight independent accumulators (vectorizes; a fixed order, so deterministic).
#[inline]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ f(a_i, b_i)` with eight independent accumulators.
#[inline]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += f(x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Applies `f(out_rows, in_rows)` to blocks of [`ROWS_PER_BLOCK`] rows of width `d`, in parallel
/// when the input is large; each call's result is returned in block order.
fn for_blocks<E: Send, T: Send>(
    out: &mut [E],
    inputs: &[&[f32]],
    d: usize,
    f: impl Fn(&mut [E], &[&[f32]]) -> T + Sync,
) -> Vec<T> {
    let block = ROWS_PER_BLOCK * d.max(1);
    let blocks = out.len().div_ceil(block);
    let run = |(i, o): (usize, &mut [E])| {
        let start = i * block;
        let ins: Vec<&[f32]> = inputs.iter().map(|x| &x[start..start + o.len()]).collect();
        f(o, &ins)
    };
    if out.len() > PARALLEL_MIN_ELEMS && blocks > 1 {
        out.par_chunks_mut(block).enumerate().map(run).collect()
    } else {
        out.chunks_mut(block).enumerate().map(run).collect()
    }
}

/// A buffer for `len` elements that the row loops write once each (no zero fill first: it was a
/// serial `memset` per norm layer), and a check that `len` is whole rows of `d`, so that the
/// row loops (`chunks_exact_mut(d)`) do reach every element.
fn row_buffer(len: usize, d: usize, op: &str) -> Result<Vec<f32>> {
    if !len.is_multiple_of(d) {
        candle_core::bail!("{op}: {len} elements are not rows of {d}")
    }
    Ok(Vec::with_capacity(len))
}

/// Adds the per-block partial sums in block order.
fn reduce_blocks(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut total = vec![0f32; len];
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// A row's mean and `1/sqrt(var + eps)` (two passes: never a negative variance).
#[inline]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let var = sum_zip(x, x, |a, _| (a - mean) * (a - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// A row's `1/sqrt(mean(x²) + eps)`.
#[inline]
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ms = sum_zip(x, x, |a, b| a * b) / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `(x, weight, bias)` → the layer norm of `x`'s rows.
struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "relprune-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer_norm")?;
        let w = contiguous_f32(s2, l2, "layer_norm")?;
        let b = contiguous_f32(s3, l3, "layer_norm")?;
        let d = w.len();
        if b.len() != d {
            candle_core::bail!("layer_norm: bias of {} for weight of {d}", b.len())
        }
        let mut y = row_buffer(x.len(), d, "layer_norm")?;
        if d > 0 {
            let spare = &mut y.spare_capacity_mut()[..x.len()];
            for_blocks(spare, &[x], d, |y, ins| {
                for (yr, xr) in y.chunks_exact_mut(d).zip(ins[0].chunks_exact(d)) {
                    let (mean, rstd) = moments(xr, self.eps);
                    for (((o, &v), &wi), &bi) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                        o.write((v - mean) * rstd * wi + bi);
                    }
                }
            });
        }
        // SAFETY: `row_buffer` checked that the length is whole rows; every row was written.
        unsafe { y.set_len(x.len()) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let eps = self.eps;
        let (gx, gwb) = with_f32(x, "layer_norm backward", |xs| {
            with_f32(w, "layer_norm backward", |ws| {
                with_f32(grad, "layer_norm backward", |gs| {
                    let mut gx = row_buffer(xs.len(), d, "layer_norm backward")?;
                    if d == 0 {
                        return Ok((gx, vec![0f32; 0]));
                    }
                    let inv_d = 1.0 / d as f32;
                    // Per block: dx of its rows, and its partial [Σ g·x̂ | Σ g].
                    let spare = &mut gx.spare_capacity_mut()[..xs.len()];
                    let parts = for_blocks(spare, &[xs, gs], d, |gx, ins| {
                        let mut part = vec![0f32; 2 * d];
                        let (pw, pb) = part.split_at_mut(d);
                        let rows = gx
                            .chunks_exact_mut(d)
                            .zip(ins[0].chunks_exact(d))
                            .zip(ins[1].chunks_exact(d));
                        for ((dx, xr), gr) in rows {
                            let (mean, rstd) = moments(xr, eps);
                            // mean(g·w) and mean(g·w·x̂), with x̂ = (x − mean)·rstd.
                            let mut a = [0f32; 2];
                            for ((&v, &g), &wi) in xr.iter().zip(gr).zip(ws) {
                                let gw = g * wi;
                                a[0] += gw;
                                a[1] += gw * (v - mean);
                            }
                            let (m_gw, m_gwx) = (a[0] * inv_d, a[1] * rstd * inv_d);
                            for (i, ((o, &v), &g)) in dx.iter_mut().zip(xr).zip(gr).enumerate() {
                                let xh = (v - mean) * rstd;
                                o.write(rstd * (g * ws[i] - m_gw - xh * m_gwx));
                                pw[i] += g * xh;
                                pb[i] += g;
                            }
                        }
                        part
                    });
                    // SAFETY: whole rows (`row_buffer`), every row's dx written.
                    unsafe { gx.set_len(xs.len()) };
                    Ok((gx, reduce_blocks(&parts, 2 * d)))
                })
            })
        })?;
        let dev = x.device();
        let gx = x
            .track_op()
            .then(|| Tensor::from_vec(gx, x.shape(), dev))
            .transpose()?;
        let gw = w
            .track_op()
            .then(|| Tensor::from_slice(&gwb[..d], d, dev))
            .transpose()?;
        let gb = b
            .track_op()
            .then(|| Tensor::from_slice(&gwb[d..], d, dev))
            .transpose()?;
        Ok((gx, gw, gb))
    }
}

/// `(x, weight)` → the RMS norm of `x`'s rows.
struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "relprune-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "rms_norm")?;
        let w = contiguous_f32(s2, l2, "rms_norm")?;
        let d = w.len();
        let mut y = row_buffer(x.len(), d, "rms_norm")?;
        if d > 0 {
            let spare = &mut y.spare_capacity_mut()[..x.len()];
            for_blocks(spare, &[x], d, |y, ins| {
                for (yr, xr) in y.chunks_exact_mut(d).zip(ins[0].chunks_exact(d)) {
                    let r = rms_scale(xr, self.eps);
                    for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
                        o.write(v * r * wi);
                    }
                }
            });
        }
        // SAFETY: `row_buffer` checked that the length is whole rows; every row was written.
        unsafe { y.set_len(x.len()) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let eps = self.eps;
        let (gx, gw) = with_f32(x, "rms_norm backward", |xs| {
            with_f32(w, "rms_norm backward", |ws| {
                with_f32(grad, "rms_norm backward", |gs| {
                    let mut gx = row_buffer(xs.len(), d, "rms_norm backward")?;
                    if d == 0 {
                        return Ok((gx, vec![0f32; 0]));
                    }
                    let inv_d = 1.0 / d as f32;
                    let spare = &mut gx.spare_capacity_mut()[..xs.len()];
                    let parts = for_blocks(spare, &[xs, gs], d, |gx, ins| {
                        let mut pw = vec![0f32; d];
                        let rows = gx
                            .chunks_exact_mut(d)
                            .zip(ins[0].chunks_exact(d))
                            .zip(ins[1].chunks_exact(d));
                        for ((dx, xr), gr) in rows {
                            let r = rms_scale(xr, eps);
                            // mean(g·w·x̂), with x̂ = x·r.
                            let mut a = 0f32;
                            for ((&v, &g), &wi) in xr.iter().zip(gr).zip(ws) {
                                a += g * wi * v;
                            }
                            let m = a * r * inv_d;
                            for (i, ((o, &v), &g)) in dx.iter_mut().zip(xr).zip(gr).enumerate() {
                                let xh = v * r;
                                o.write(r * (g * ws[i] - xh * m));
                                pw[i] += g * xh;
                            }
                        }
                        pw
                    });
                    // SAFETY: whole rows (`row_buffer`), every row's dx written.
                    unsafe { gx.set_len(xs.len()) };
                    Ok((gx, reduce_blocks(&parts, d)))
                })
            })
        })?;
        let dev = x.device();
        let gx = x
            .track_op()
            .then(|| Tensor::from_vec(gx, x.shape(), dev))
            .transpose()?;
        let gw = w
            .track_op()
            .then(|| Tensor::from_vec(gw, d, dev))
            .transpose()?;
        Ok((gx, gw))
    }
}

/// `x` → the softmax of its rows.
struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "relprune-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "softmax_last_dim")?;
        let d = l.dims().last().copied().unwrap_or(1);
        let mut y = vec![0f32; x.len()];
        if d > 0 {
            for_blocks(&mut y, &[x], d, |y, ins| {
                for (yr, xr) in y.chunks_exact_mut(d).zip(ins[0].chunks_exact(d)) {
                    let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0f32;
                    for (o, &v) in yr.iter_mut().zip(xr) {
                        *o = (v - max).exp();
                        total += *o;
                    }
                    let inv = 1.0 / total;
                    for o in yr.iter_mut() {
                        *o *= inv;
                    }
                }
            });
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let d = x.dim(D::Minus1)?;
        let gx = with_f32(res, "softmax backward", |ys| {
            with_f32(grad, "softmax backward", |gs| {
                let mut gx = vec![0f32; ys.len()];
                if d > 0 {
                    for_blocks(&mut gx, &[ys, gs], d, |gx, ins| {
                        let rows = gx
                            .chunks_exact_mut(d)
                            .zip(ins[0].chunks_exact(d))
                            .zip(ins[1].chunks_exact(d));
                        for ((dx, yr), gr) in rows {
                            let s = sum_zip(yr, gr, |y, g| y * g);
                            for ((o, &y), &g) in dx.iter_mut().zip(yr).zip(gr) {
                                *o = y * (g - s);
                            }
                        }
                    });
                }
                Ok(gx)
            })
        })?;
        Ok(Some(Tensor::from_vec(gx, x.shape(), x.device())?))
    }
}
