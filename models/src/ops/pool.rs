//! Max pooling with a backward for any kernel and stride (candle 0.11's only works when the
//! kernel equals the stride, and divides the gradient by the window size).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::{contiguous_f32, with_f32};

/// Max pooling without padding; the backward pass works for any kernel and stride.
struct MaxPool {
    k: (usize, usize),
    s: (usize, usize),
    // Each output's argmax within its plane, kept by the forward for the backward.
    argmax: std::sync::Mutex<Option<Vec<u32>>>,
}

/// Whether candidate `p` replaces the running maximum `v`: `>` keeps the first of equal maxima
/// (PyTorch's rule); a NaN wins so that it propagates, and then stays. Callers select with it
/// instead of branching: the comparisons are data-dependent and would mispredict.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn takes(p: f32, v: f32) -> bool {
    !(p <= v) & !v.is_nan()
}

/// One `(H, W)` plane's pooling geometry.
#[derive(Clone, Copy)]
pub(crate) struct PoolPlane {
    /// Input width.
    pub(crate) w: usize,
    /// Output height.
    pub(crate) oh: usize,
    /// Output width.
    pub(crate) ow: usize,
}

impl PoolPlane {
    /// Max and argmax of every 2×2 window at stride 2: two input rows per output row, four
    /// candidates per window, no loop-carried reloads.
    fn pool_2x2(self, plane: &[f32], dst: &mut [f32], arg: &mut [u32]) {
        let Self { w, oh, ow } = self;
        for oy in 0..oh {
            let i0 = 2 * oy * w;
            let (r0, r1) = (&plane[i0..][..2 * ow], &plane[i0 + w..][..2 * ow]);
            let (d, a) = (&mut dst[oy * ow..][..ow], &mut arg[oy * ow..][..ow]);
            let windows = r0.chunks_exact(2).zip(r1.chunks_exact(2));
            let (w1, w2) = (w as u32, w as u32 + 1);
            for (ox, ((d, a), (x0, x1))) in d.iter_mut().zip(a.iter_mut()).zip(windows).enumerate()
            {
                // Selects on offsets rather than a table lookup: the loop vectorizes.
                let base = (i0 + 2 * ox) as u32;
                let (mut v, mut off) = (x0[0], 0u32);
                for (p, o) in [(x0[1], 1), (x1[0], w1), (x1[1], w2)] {
                    let t = takes(p, v);
                    v = if t { p } else { v };
                    off = if t { o } else { off };
                }
                *d = v;
                *a = base + off;
            }
        }
    }

    /// Max and argmax of every window (indices within the plane).
    pub(crate) fn pool(
        self,
        k: (usize, usize),
        s: (usize, usize),
        plane: &[f32],
        dst: &mut [f32],
        arg: &mut [u32],
    ) {
        match (k, s) {
            ((2, 2), (2, 2)) => self.pool_2x2(plane, dst, arg),
            _ => self.pool_dyn(k, s, plane, dst, arg),
        }
    }

    /// Max and argmax of every window.
    #[inline(always)]
    fn pool_dyn(
        self,
        (kh, kw): (usize, usize),
        (sh, sw): (usize, usize),
        plane: &[f32],
        dst: &mut [f32],
        arg: &mut [u32],
    ) {
        let Self { w, oh, ow } = self;
        for oy in 0..oh {
            for ox in 0..ow {
                let start = oy * sh * w + ox * sw;
                let (mut v, mut at) = (plane[start], start);
                for ky in 0..kh {
                    let row = &plane[start + ky * w..][..kw];
                    for (kx, &p) in row.iter().enumerate() {
                        let take = takes(p, v);
                        v = if take { p } else { v };
                        at = if take { start + ky * w + kx } else { at };
                    }
                }
                dst[oy * ow + ox] = v;
                arg[oy * ow + ox] = at as u32;
            }
        }
    }
}

/// Output geometry `(B, C, H, W, OH, OW)` of a pooling of `dims`.
pub(crate) fn pool_dims(
    k: (usize, usize),
    s: (usize, usize),
    dims: &[usize],
) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let &[b, c, h, w] = dims else {
        candle_core::bail!("max_pool2d input must be (B, C, H, W), got {dims:?}")
    };
    let ((kh, kw), (sh, sw)) = (k, s);
    if kh == 0 || kw == 0 || sh == 0 || sw == 0 || h < kh || w < kw {
        candle_core::bail!("max_pool2d: kernel {kh}x{kw} stride {sh}x{sw} on {h}x{w}")
    }
    Ok((b, c, h, w, (h - kh) / sh + 1, (w - kw) / sw + 1))
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "relprune-max-pool2d"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l, "max_pool2d")?;
        let (b, c, h, w, oh, ow) = pool_dims(self.k, self.s, l.dims())?;
        let ((kh, kw), (sh, sw)) = (self.k, self.s);
        let mut out = vec![0f32; b * c * oh * ow];
        let mut idx = vec![0u32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(idx.par_chunks_mut(oh * ow))
            .zip(x.par_chunks(h * w))
            .for_each(|((dst, arg), plane)| {
                PoolPlane { w, oh, ow }.pool((kh, kw), (sh, sw), plane, dst, arg)
            });
        if let Ok(mut slot) = self.argmax.lock() {
            *slot = Some(idx);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w, oh, ow) = pool_dims(self.k, self.s, arg.dims())?;
        let idx = match self.argmax.lock().ok().and_then(|mut s| s.take()) {
            Some(i) => i,
            // A second backward through the same op: run the forward again for the indices.
            None => {
                arg.contiguous()?.apply_op1_no_bwd(self)?;
                self.argmax
                    .lock()
                    .ok()
                    .and_then(|mut s| s.take())
                    .ok_or_else(|| candle_core::Error::Msg("max_pool2d: no argmax".into()))?
            }
        };
        let mut gx = vec![0f32; b * c * h * w];
        with_f32(grad, "max_pool2d backward", |gy| {
            gx.par_chunks_mut(h * w)
                .zip(idx.par_chunks(oh * ow))
                .zip(gy.par_chunks(oh * ow))
                .for_each(|((dst, arg), g)| {
                    for (&i, &v) in arg.iter().zip(g) {
                        dst[i as usize] += v;
                    }
                });
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(gx, (b, c, h, w), arg.device())?))
    }
}

/// Max pooling of `x` `(B, C, H, W)` with `kernel` and `stride` (no padding).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(MaxPool {
            k: (kernel, kernel),
            s: (stride, stride),
            argmax: std::sync::Mutex::new(None),
        })
    } else {
        x.max_pool2d_with_stride(kernel, stride)
    }
}
