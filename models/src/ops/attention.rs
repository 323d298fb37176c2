//! Scaled dot-product attention (scores, additive mask, softmax, value product) as one CPU op
//! with its own backward.
//!
//! Written with candle's ops, attention is a batched matmul per product (one small gemm per
//! batch row and head, each handed to the thread pool on its own: at 32 tokens and 32 dimensions
//! a head's product is too small to split, and the hand-offs cost more than it), a broadcast
//! add, a softmax, a transpose and a copy to merge the heads, and the backward adds a
//! zero-filled gradient buffer per node. Here each (batch row, query head) is one task: its
//! products run on one thread and stay in cache, the softmax is applied in place, and the
//! context is written straight into the merged `(B, T, heads·head_dim)` layout. Query rows go
//! in blocks of [`ROW_BLOCK`], and a block's products stop at the last key any of its rows sees
//! (a causal mask costs about half of the full products; hidden keys get weight 0). The
//! attention weights are kept for the backward, which computes every input's gradient in one
//! pass per task; heads that share a key/value head (grouped queries) each write their own
//! share of its gradients, summed in head order afterwards. Tasks never share an output
//! element, so the results do not depend on the thread count.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, gemm_into, gemm_rows, with_f32, Mat};

/// The op: `softmax(scale·q·kᵀ + mask)·v` per head, heads merged.
struct AttentionOp {
    /// Batch rows, query heads, key/value heads, queries, keys, head dimension.
    b: usize,
    h: usize,
    g: usize,
    t: usize,
    s: usize,
    d: usize,
    scale: f32,
    /// The additive mask broadcast to `(B, H, T, S)` (any strides), if any.
    mask: Option<Tensor>,
    /// The attention weights `(B, H, T, S)` of the last forward pass, for the backward.
    probs: Mutex<Option<Vec<f32>>>,
    /// Whether a backward can follow (an input tracks a variable): only then are the weights
    /// kept; in inference each task reuses one row block's worth.
    keep_probs: bool,
}

/// A raw output pointer shared by tasks that write disjoint elements of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes only its own heads' columns (see `AttentionOp::forward_unit`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// The mask's data and `(B, H, T, S)` strides.
type MaskView<'a> = Option<(&'a [f32], [usize; 4])>;

/// Query rows per block: a block's products read the keys up to the last one any of its rows
/// sees, so a causal mask costs about half of the full products.
const ROW_BLOCK: usize = 64;

/// Mask values at or below this hide a key (the masks hold [`crate::attention::MASKED`] or
/// `-inf` there): its weight is zero to f32 precision, so it is not computed.
const HIDDEN: f32 = crate::attention::MASKED / 2.0;

/// `f` folded over `x` in 16 independent lanes, then across them: vectorizable, with a fixed
/// order (the same bits on any thread).
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    let tail = chunks.remainder().iter().fold(init, |a, &v| f(a, v));
    acc.iter().fold(tail, |a, &v| f(a, v))
}

/// `row ← softmax(row)` in place.
#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let max = lanes(row, f32::NEG_INFINITY, f32::max);
    for v in row.iter_mut() {
        *v = crate::activation::exp_f32(*v - max);
    }
    let inv = 1.0 / lanes(row, 0.0, |a, b| a + b);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The keys a query row sees, as a prefix length: up to its last key not hidden by the mask
/// values `m[base + c·ss]`, `c < s` (all `s` when it sees none: the plain formula then spreads
/// its weight over the hidden keys, and so does this op).
fn visible_keys(m: &[f32], base: usize, ss: usize, s: usize) -> usize {
    (0..s)
        .rev()
        .find(|&c| m[base + c * ss] > HIDDEN)
        .map_or(s, |c| c + 1)
}

/// The keys with a nonzero weight in any row of `block` (rows `s` apart), as a prefix length.
fn weighted_keys(block: &[f32], s: usize) -> usize {
    block
        .chunks(s)
        .map(|row| row.iter().rposition(|&x| x != 0.0).map_or(0, |c| c + 1))
        .max()
        .unwrap_or(0)
}

impl AttentionOp {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.h / self.g
    }

    /// The forward pass of task `u` = (batch row, query head): its weights into `probs`
    /// `(T, S)` and its context into the merged output.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn forward_unit(
        &self,
        u: usize,
        (q, k, v): (&[f32], &[f32], &[f32]),
        mask: MaskView,
        probs: &mut [f32],
        out: SharedOut,
    ) {
        let (t, s, d, h, g) = (self.t, self.s, self.d, self.h, self.g);
        let (bi, hi) = (u / h, u % h);
        let kv_off = (bi * g + hi / self.group()) * s * d;
        let p = probs;
        let kt = Mat {
            data: &k[kv_off..kv_off + s * d],
            rs: 1,
            cs: d,
        };
        let vm = Mat {
            data: &v[kv_off..kv_off + s * d],
            rs: d,
            cs: 1,
        };
        // Rows `t` of the merged output are `h·d` apart; each head owns columns `hi·d..(hi+1)·d`.
        let row_stride = h * d;
        let q_off = (bi * h + hi) * t * d;
        for r0 in (0..t).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(t);
            let rows = r1 - r0;
            let e = match mask {
                Some((m, [sb, sh, st, ss])) => (r0..r1)
                    .map(|i| visible_keys(m, bi * sb + hi * sh + i * st, ss, s))
                    .max()
                    .unwrap_or(s),
                None => s,
            };
            let qm = Mat {
                data: &q[q_off + r0 * d..q_off + r1 * d],
                rs: d,
                cs: 1,
            };
            // Kept weights past `e` stay as allocated: zero (the backward reads them). A
            // reused block is only read up to `e`.
            let block = if self.keep_probs {
                &mut p[r0 * s..r1 * s]
            } else {
                &mut p[..rows * s]
            };
            gemm_rows(
                rows,
                e,
                d,
                (block, s),
                false,
                qm,
                kt,
                gemm::Parallelism::None,
            );
            for (i, row) in block.chunks_mut(s).enumerate() {
                let row = &mut row[..e];
                match mask {
                    Some((m, [sb, sh, st, 1])) => {
                        let base = bi * sb + hi * sh + (r0 + i) * st;
                        for (x, &mv) in row.iter_mut().zip(&m[base..base + e]) {
                            *x = *x * self.scale + mv;
                        }
                    }
                    Some((m, [sb, sh, st, ss])) => {
                        let base = bi * sb + hi * sh + (r0 + i) * st;
                        for (c, x) in row.iter_mut().enumerate() {
                            *x = *x * self.scale + m[base + c * ss];
                        }
                    }
                    None => row.iter_mut().for_each(|x| *x *= self.scale),
                }
                softmax_row(row);
            }
            let pm = Mat {
                data: &*block,
                rs: s,
                cs: 1,
            };
            let dst = out.0.wrapping_add((bi * t + r0) * row_stride + hi * d);
            pm.check(rows, e);
            vm.check(e, d);
            // SAFETY: the views were bounds-checked; `dst` points into the output allocation
            // and the `rows×d` block at row stride `h·d` lies inside it; no other task writes
            // these columns of these rows.
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    e,
                    dst,
                    1,
                    row_stride as isize,
                    false,
                    pm.data.as_ptr(),
                    1,
                    s as isize,
                    vm.data.as_ptr(),
                    1,
                    d as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        }
    }

    /// The backward pass of task `u` = (batch row, query head): its query gradients into `dq`
    /// `(T, D)` and its share of its key/value head's gradients into `dk`, `dv` `(S, D)`
    /// (empty slices: not wanted).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn backward_unit(
        &self,
        u: usize,
        (q, k, v): (&[f32], &[f32], &[f32]),
        grad: &[f32],
        probs: &[f32],
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
        dp: &mut Vec<f32>,
    ) {
        let (t, s, d, h, g) = (self.t, self.s, self.d, self.h, self.g);
        let (bi, hi) = (u / h, u % h);
        let kv_off = (bi * g + hi / self.group()) * s * d;
        let (kg, vg) = (&k[kv_off..kv_off + s * d], &v[kv_off..kv_off + s * d]);
        let p = probs;
        dp.resize(ROW_BLOCK.min(t) * s, 0.0);
        let none = gemm::Parallelism::None;
        let row_stride = h * d;
        let q_off = (bi * h + hi) * t * d;
        for r0 in (0..t).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(t);
            let rows = r1 - r0;
            let pb = &p[r0 * s..r1 * s];
            // Keys past the block's last nonzero weight get nothing from these rows, and
            // the rows' gradients nothing from them.
            let e = weighted_keys(pb, s);
            if e == 0 {
                continue;
            }
            let go_off = (bi * t + r0) * row_stride + hi * d;
            let dout = Mat {
                data: &grad[go_off..go_off + (rows - 1) * row_stride + d],
                rs: row_stride,
                cs: 1,
            };
            if !dv.is_empty() {
                let pt = Mat {
                    data: pb,
                    rs: 1,
                    cs: s,
                };
                gemm_into(e, d, rows, &mut dv[..e * d], true, pt, dout, none);
            }
            if dq.is_empty() && dk.is_empty() {
                continue;
            }
            let vt = Mat {
                data: vg,
                rs: 1,
                cs: d,
            };
            let ds = &mut dp[..rows * e];
            gemm_into(rows, e, d, ds, false, dout, vt, none);
            for (drow, prow) in ds.chunks_mut(e).zip(pb.chunks(s)) {
                let prow = &prow[..e];
                let dot = crate::fused::sum_zip(drow, prow, |a, b| a * b);
                for (x, &pv) in drow.iter_mut().zip(prow) {
                    *x = pv * (*x - dot) * self.scale;
                }
            }
            if !dq.is_empty() {
                let dsm = Mat {
                    data: ds,
                    rs: e,
                    cs: 1,
                };
                let km = Mat {
                    data: kg,
                    rs: d,
                    cs: 1,
                };
                let dst = &mut dq[r0 * d..r1 * d];
                gemm_into(rows, d, e, dst, false, dsm, km, none);
            }
            if !dk.is_empty() {
                let qm = Mat {
                    data: &q[q_off + r0 * d..q_off + r1 * d],
                    rs: d,
                    cs: 1,
                };
                let dst = Mat {
                    data: ds,
                    rs: 1,
                    cs: e,
                };
                gemm_into(e, d, rows, &mut dk[..e * d], true, dst, qm, none);
            }
        }
    }

    /// Runs the forward pass; returns the merged output and the weights.
    fn run_forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (b, h, t, s, d) = (self.b, self.h, self.t, self.s, self.d);
        let per_unit = t * s;
        let n_out = b * t * h * d;
        // The products write every element of the output once (no zero fill first), unless
        // there are no keys: then zeros.
        let mut out = if per_unit > 0 {
            Vec::with_capacity(n_out)
        } else {
            vec![0f32; n_out]
        };
        let mut probs = if self.keep_probs {
            vec![0f32; b * h * t * s]
        } else {
            Vec::new()
        };
        let guard = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask: MaskView = match &guard {
            None => None,
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cpu(CpuStorage::F32(m)) => {
                    let st = layout.stride();
                    Some((&m[layout.start_offset()..], [st[0], st[1], st[2], st[3]]))
                }
                _ => candle_core::bail!("attention: the mask must be an f32 CPU tensor"),
            },
        };
        let shared = SharedOut(out.as_mut_ptr());
        if per_unit > 0 && self.keep_probs {
            probs
                .par_chunks_mut(per_unit)
                .enumerate()
                .for_each(|(u, p)| self.forward_dispatch(u, (q, k, v), mask, p, shared));
        } else if per_unit > 0 {
            // Inference: one row block of weights per task, reused, instead of a (B, H, T, S)
            // buffer that is written once and freed (hundreds of MB at long sequences).
            let block = ROW_BLOCK.min(t) * s;
            (0..b * h).into_par_iter().for_each_init(
                || vec![0f32; block],
                |p, u| self.forward_dispatch(u, (q, k, v), mask, p, shared),
            );
        }
        if per_unit > 0 {
            // SAFETY: unit (batch row, head) stored its head's `d` columns of all `t` rows
            // (every row block sees at least one key, so each product has a depth: gemm
            // stores without reading), and the `b·h` units cover the output.
            unsafe { out.set_len(n_out) };
        }
        Ok((out, probs))
    }

    /// [`Self::forward_unit`] compiled for AVX-512 or AVX2 + FMA where the CPU has them.
    fn forward_dispatch(
        &self,
        u: usize,
        qkv: (&[f32], &[f32], &[f32]),
        mask: MaskView,
        p: &mut [f32],
        out: SharedOut,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::activation::has_avx512() {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512(
                op: &AttentionOp,
                u: usize,
                qkv: (&[f32], &[f32], &[f32]),
                mask: MaskView,
                p: &mut [f32],
                out: SharedOut,
            ) {
                op.forward_unit(u, qkv, mask, p, out)
            }
            // SAFETY: the features were detected on this CPU.
            return unsafe { avx512(self, u, qkv, mask, p, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::activation::has_avx2_fma() {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(
                op: &AttentionOp,
                u: usize,
                qkv: (&[f32], &[f32], &[f32]),
                mask: MaskView,
                p: &mut [f32],
                out: SharedOut,
            ) {
                op.forward_unit(u, qkv, mask, p, out)
            }
            // SAFETY: the features were detected on this CPU.
            return unsafe { avx2(self, u, qkv, mask, p, out) };
        }
        self.forward_unit(u, qkv, mask, p, out)
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "relprune-attention"
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
        let q = contiguous_f32(s1, l1, "attention")?;
        let k = contiguous_f32(s2, l2, "attention")?;
        let v = contiguous_f32(s3, l3, "attention")?;
        let (out, probs) = self.run_forward(q, k, v)?;
        if self.keep_probs {
            if let Ok(mut slot) = self.probs.lock() {
                *slot = Some(probs);
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.b, self.t, self.h * self.d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, t, s, d) = (self.b, self.h, self.t, self.s, self.d);
        let (need_q, need_k, need_v) = (q.track_op(), k.track_op(), v.track_op());
        if !(need_q || need_k || need_v) {
            return Ok((None, None, None));
        }
        let dev = q.device().clone();
        with_f32(&q.detach(), "attention backward", |qv| {
            with_f32(&k.detach(), "attention backward", |kv| {
                with_f32(&v.detach(), "attention backward", |vv| {
                    with_f32(grad, "attention backward", |gv| {
                        let probs = match self.probs.lock().ok().and_then(|mut p| p.take()) {
                            Some(p) => p,
                            // A second backward through the op: the weights again.
                            None => self.run_forward(qv, kv, vv)?.1,
                        };
                        let sized =
                            |need: bool, n: usize| if need { vec![0f32; n] } else { vec![] };
                        // Per query head: its key and value gradients, summed over the
                        // heads of a group afterwards.
                        let mut dq = sized(need_q, b * h * t * d);
                        let mut dk = sized(need_k, b * h * s * d);
                        let mut dv = sized(need_v, b * h * s * d);
                        let units = b * h;
                        let dq_parts = unit_chunks(&mut dq, t * d, units);
                        let dk_parts = unit_chunks(&mut dk, s * d, units);
                        let dv_parts = unit_chunks(&mut dv, s * d, units);
                        if t * s > 0 {
                            dq_parts
                                .into_par_iter()
                                .zip(dk_parts)
                                .zip(dv_parts)
                                .zip(probs.par_chunks(t * s))
                                .enumerate()
                                .for_each_init(Vec::new, |dp, (u, (((dq, dk), dv), p))| {
                                    self.backward_dispatch(u, (qv, kv, vv), gv, p, (dq, dk, dv), dp)
                                });
                        }
                        let wrap = |x: Vec<f32>, shape: &Shape| -> Result<Option<Tensor>> {
                            if x.is_empty() {
                                Ok(None)
                            } else {
                                Ok(Some(Tensor::from_vec(x, shape, &dev)?))
                            }
                        };
                        Ok((
                            wrap(dq, q.shape())?,
                            wrap(self.group_sums(dk), k.shape())?,
                            wrap(self.group_sums(dv), v.shape())?,
                        ))
                    })
                })
            })
        })
    }
}

impl AttentionOp {
    /// Per-query-head gradients `(B, H, S, D)` summed over each group's heads in order into
    /// `(B, G, S, D)`: the same bits whatever the thread count.
    fn group_sums(&self, parts: Vec<f32>) -> Vec<f32> {
        let (h, g, sd, hg) = (self.h, self.g, self.s * self.d, self.group());
        if hg == 1 || parts.is_empty() || sd == 0 {
            return parts;
        }
        let mut out = vec![0f32; self.b * g * sd];
        out.par_chunks_mut(sd).enumerate().for_each(|(u, o)| {
            let first = (u / g) * h + (u % g) * hg;
            for part in parts[first * sd..(first + hg) * sd].chunks(sd) {
                for (o, &x) in o.iter_mut().zip(part) {
                    *o += x;
                }
            }
        });
        out
    }
}

/// `x` in `units` chunks of `per` (empty chunks if `x` is empty: that gradient is not wanted).
fn unit_chunks(x: &mut [f32], per: usize, units: usize) -> Vec<&mut [f32]> {
    if x.is_empty() || per == 0 {
        (0..units).map(|_| <&mut [f32]>::default()).collect()
    } else {
        x.chunks_mut(per).collect()
    }
}

impl AttentionOp {
    /// [`Self::backward_unit`] compiled for AVX2 + FMA where the CPU has them.
    #[allow(clippy::too_many_arguments)]
    fn backward_dispatch(
        &self,
        u: usize,
        qkv: (&[f32], &[f32], &[f32]),
        grad: &[f32],
        probs: &[f32],
        out: (&mut [f32], &mut [f32], &mut [f32]),
        dp: &mut Vec<f32>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::activation::has_avx2_fma() {
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(
                op: &AttentionOp,
                u: usize,
                qkv: (&[f32], &[f32], &[f32]),
                grad: &[f32],
                probs: &[f32],
                out: (&mut [f32], &mut [f32], &mut [f32]),
                dp: &mut Vec<f32>,
            ) {
                op.backward_unit(u, qkv, grad, probs, out, dp)
            }
            // SAFETY: the features were detected on this CPU.
            return unsafe { avx2(self, u, qkv, grad, probs, out, dp) };
        }
        self.backward_unit(u, qkv, grad, probs, out, dp)
    }
}

/// `softmax(scale·q·kᵀ + mask)·v` with the heads merged: `q` `(B, H, T, D)`, `k` and `v`
/// `(B, G, S, D)` with `G` dividing `H` (grouped queries: query head `h` reads key/value head
/// `h / (H/G)`), `mask` additive and broadcastable to `(B, H, T, S)`; returns `(B, T, H·D)`.
/// One fused op on the CPU for f32 when the mask tracks no variable (a learned position bias
/// takes the plain ops, which [`attention_reference`] also spells out).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (bk, g, s, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims() != k.dims() || g == 0 || h % g != 0 {
        candle_core::bail!(
            "attention: queries {:?}, keys {:?}, values {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let f32_cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
    let fused = crate::fused::fused_enabled()
        && [q, k, v].into_iter().all(f32_cpu)
        && mask.is_none_or(|m| f32_cpu(m) && !m.track_op());
    if !fused {
        return attention_reference(q, k, v, mask, scale);
    }
    let mask = mask.map(|m| m.broadcast_as((b, h, t, s))).transpose()?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        AttentionOp {
            b,
            h,
            g,
            t,
            s,
            d,
            scale: scale as f32,
            mask,
            probs: Mutex::new(None),
            keep_probs: q.track_op() || k.track_op() || v.track_op(),
        },
    )
}

/// [`attention`] written with candle's ops (and this crate's differentiable softmax).
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, g, s, _) = k.dims4()?;
    let rows = h / g * t;
    let scores = (q.reshape((b, g, rows, d))?.matmul(&k.t()?)? * scale)?.reshape((b, h, t, s))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    crate::fused::softmax_last_dim(&scores)?
        .reshape((b, g, rows, s))?
        .matmul(v)?
        .reshape((b, h, t, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, h * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::ops::test_tensor as filled;

    /// Output and the gradients of q, k, v of `sum(attention·r)` through `f`.
    fn run(
        f: fn(&Tensor, &Tensor, Option<&Tensor>, &Tensor, f64) -> Result<Tensor>,
        (b, h, g, t, s, d): (usize, usize, usize, usize, usize, usize),
        mask: Option<&Tensor>,
    ) -> Vec<Vec<f32>> {
        let q = Var::from_tensor(&filled(&[b, h, t, d], 1)).unwrap();
        let k = Var::from_tensor(&filled(&[b, g, s, d], 2)).unwrap();
        let v = Var::from_tensor(&filled(&[b, g, s, d], 3)).unwrap();
        let y = f(q.as_tensor(), k.as_tensor(), mask, v.as_tensor(), 0.35).unwrap();
        let r = filled(&[b, t, h * d], 4);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        vec![
            flat(&y),
            flat(grads.get(&q).unwrap()),
            flat(grads.get(&k).unwrap()),
            flat(grads.get(&v).unwrap()),
        ]
    }

    /// A key mask `(2, 1, 1, 140)`: batch row 0 sees its first `n` keys, row 1 none.
    fn first_keys_seen(n: usize) -> Tensor {
        let m: Vec<f32> = (0..2 * 140)
            .map(|i| if i >= n { -1e9 } else { 0.0 })
            .collect();
        Tensor::from_vec(m, (2, 1, 1, 140), &Device::Cpu).unwrap()
    }

    fn fused(q: &Tensor, k: &Tensor, m: Option<&Tensor>, v: &Tensor, s: f64) -> Result<Tensor> {
        attention(q, k, v, m, s)
    }

    fn plain(q: &Tensor, k: &Tensor, m: Option<&Tensor>, v: &Tensor, s: f64) -> Result<Tensor> {
        attention_reference(q, k, v, m, s)
    }

    #[test]
    fn fused_attention_matches_the_plain_ops_in_values_and_gradients() {
        let key_mask = Tensor::from_vec(
            (0..2 * 9)
                .map(|i| if i % 9 >= 7 && i >= 9 { -1e9f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            (2, 1, 1, 9),
            &Device::Cpu,
        )
        .unwrap();
        let causal = crate::attention::causal_mask(9, 0, &Device::Cpu).unwrap();
        // Longer than a block of rows (the last one partial): the products stop at each
        // block's last visible key.
        let long_causal = crate::attention::causal_mask(150, 0, &Device::Cpu).unwrap();
        // Batch row 0 sees its first 90 keys, row 1 none at all (its weights spread over
        // hidden keys, as the plain formula gives).
        let long_keys = first_keys_seen(90);
        for (dims, mask) in [
            ((2, 4, 4, 9, 9, 8), Some(&key_mask)),
            ((2, 4, 4, 9, 9, 8), Some(&causal)),
            ((2, 6, 2, 9, 9, 5), None),
            ((3, 2, 2, 4, 11, 16), None),
            ((1, 4, 2, 150, 150, 8), Some(&long_causal)),
            ((2, 2, 1, 70, 140, 4), Some(&long_keys)),
        ] {
            let a = run(fused, dims, mask);
            let b = run(plain, dims, mask);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(x.len(), y.len());
                for (p, r) in x.iter().zip(y) {
                    assert!(
                        (p - r).abs() <= 2e-5 * r.abs().max(1.0),
                        "{dims:?} item {i}: {p} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_attention_gives_the_same_bits_on_one_thread_and_on_two() {
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let causal = crate::attention::causal_mask(150, 0, &Device::Cpu).unwrap();
                    let mut r = run(fused, (5, 4, 2, 13, 13, 16), None);
                    r.extend(run(fused, (1, 6, 3, 150, 150, 8), Some(&causal)));
                    r
                })
        };
        let (a, b) = (on(1), on(2));
        for (x, y) in a.iter().zip(&b) {
            assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }

    #[test]
    fn inference_without_kept_weights_gives_the_bits_of_the_training_forward() {
        let causal = crate::attention::causal_mask(150, 0, &Device::Cpu).unwrap();
        let keys = first_keys_seen(90);
        for (dims, mask) in [
            ((1, 6, 3, 150, 150, 8), Some(&causal)),
            ((2, 2, 1, 70, 140, 4), Some(&keys)),
            ((3, 2, 2, 4, 11, 16), None),
        ] {
            let (b, h, g, t, s, d) = dims;
            let (q, k, v) = (
                filled(&[b, h, t, d], 1),
                filled(&[b, g, s, d], 2),
                filled(&[b, g, s, d], 3),
            );
            let kept = run(fused, dims, mask).swap_remove(0);
            let y = attention(&q, &k, &v, mask, 0.35).unwrap();
            let inferred = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(kept.len(), inferred.len());
            let same = kept
                .iter()
                .zip(&inferred)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dims:?}");
        }
    }

    #[test]
    fn a_learned_bias_takes_the_plain_path_and_gets_its_gradient() {
        let q = filled(&[1, 2, 3, 4], 1);
        let k = filled(&[1, 2, 3, 4], 2);
        let bias = Var::from_tensor(&filled(&[1, 2, 3, 3], 5)).unwrap();
        let y = attention(&q, &k, &k, Some(bias.as_tensor()), 0.5).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&bias).is_some());
    }

    #[test]
    fn mismatched_heads_are_an_error() {
        let q = filled(&[1, 3, 2, 4], 1);
        let k = filled(&[1, 2, 2, 4], 2);
        assert!(attention(&q, &k, &k, None, 1.0).is_err());
    }
}
