//! Fast CPU training ops: 2-D convolution through im2col + one gemm, and max pooling with a
//! backward for any kernel and stride.
//!
//! candle 0.11's CPU `conv2d` backward computes the input gradient with a direct
//! `conv_transpose2d` loop, even for the first layer, whose input (the images) needs none (and
//! fails with a shape mismatch when `size + 2·pad − k` is not a multiple of the stride); its
//! `max_pool2d` backward only works when the kernel equals the stride, and divides the gradient by
//! the window size (it averages the max mask). Here:
//!
//! - the convolution is one custom op: `im2col`, one `(O, C·kh·kw) × (C·kh·kw, B·OH·OW)` gemm and
//!   the bias; its backward is two more gemms (weight and input gradients, the latter through
//!   `col2im`) and a sum (bias), and skips every gradient whose tensor tracks no variable — the
//!   images' in particular;
//! - max pooling keeps each window's first maximum (PyTorch's tie rule) from the forward pass and
//!   routes the gradient there.
//!
//! Other devices use candle's own ops (same results, a test checks it on the CPU).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Geometry of a convolution's sliding window over a `(B, C, H, W)` input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Window {
    fn new(dims: &[usize], kh: usize, kw: usize, stride: usize, pad: usize) -> Result<Self> {
        let &[b, c, h, w] = dims else {
            candle_core::bail!("conv2d input must be (B, C, H, W), got {dims:?}")
        };
        if stride == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d kernel and stride must be positive")
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!("conv2d kernel {kh}x{kw} larger than the padded input {h}x{w}")
        }
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (w + 2 * pad - kw) / stride + 1;
        Ok(Self {
            b,
            c,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            oh,
            ow,
        })
    }

    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn cols(&self) -> usize {
        self.b * self.oh * self.ow
    }

    /// Input coordinate of output `o` at kernel offset `k`, if inside the (unpadded) input.
    #[inline]
    fn src(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.pad)
            .filter(|&i| i < len)
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// `(B, C, H, W)` → `(C·kh·kw, B·OH·OW)`: every receptive field as a column.
fn im2col(x: &[f32], g: &Window) -> Vec<f32> {
    let (rows, n, plane) = (g.rows(), g.cols(), g.h * g.w);
    let per_img = g.oh * g.ow;
    let mut out = vec![0f32; rows * n];
    out.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let (c, k) = (r / (g.kh * g.kw), r % (g.kh * g.kw));
        let (ki, kj) = (k / g.kw, k % g.kw);
        for b in 0..g.b {
            let src = &x[(b * g.c + c) * plane..][..plane];
            let dst = &mut row[b * per_img..][..per_img];
            for oy in 0..g.oh {
                let Some(iy) = g.src(oy, ki, g.h) else {
                    continue;
                };
                let src_row = &src[iy * g.w..][..g.w];
                let dst_row = &mut dst[oy * g.ow..][..g.ow];
                if g.stride == 1 && kj >= g.pad && kj - g.pad + g.ow <= g.w {
                    // The whole output row reads one contiguous input span.
                    dst_row.copy_from_slice(&src_row[kj - g.pad..][..g.ow]);
                    continue;
                }
                for (ox, d) in dst_row.iter_mut().enumerate() {
                    if let Some(ix) = g.src(ox, kj, g.w) {
                        *d = src_row[ix];
                    }
                }
            }
        }
    });
    out
}

/// `(C·kh·kw, B·OH·OW)` → `(B, C, H, W)`, summing overlapping fields: the adjoint of [`im2col`].
fn col2im(cols: &[f32], g: &Window) -> Vec<f32> {
    let (n, plane, per_img) = (g.cols(), g.h * g.w, g.oh * g.ow);
    let mut out = vec![0f32; g.b * g.c * plane];
    // One task per (image, channel) plane: no two tasks write the same element.
    out.par_chunks_mut(plane).enumerate().for_each(|(bc, dst)| {
        let (b, c) = (bc / g.c, bc % g.c);
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let r = (c * g.kh + ki) * g.kw + kj;
                let src = &cols[r * n + b * per_img..][..per_img];
                let span = g.stride == 1 && kj >= g.pad && kj - g.pad + g.ow <= g.w;
                for oy in 0..g.oh {
                    let Some(iy) = g.src(oy, ki, g.h) else {
                        continue;
                    };
                    let d = &mut dst[iy * g.w..][..g.w];
                    let s = &src[oy * g.ow..][..g.ow];
                    if span {
                        // The output row maps onto one contiguous input span.
                        for (d, v) in d[kj - g.pad..][..g.ow].iter_mut().zip(s) {
                            *d += v;
                        }
                        continue;
                    }
                    for (ox, v) in s.iter().enumerate() {
                        if let Some(ix) = g.src(ox, kj, g.w) {
                            d[ix] += v;
                        }
                    }
                }
            }
        }
    });
    out
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// The whole convolution as one op, `(x, weight, bias)` → `y`, with its own backward: fewer
/// graph nodes (candle's backward allocates and adds a gradient buffer per node) and no input
/// gradient for inputs that track no variable.
struct ConvOp {
    g: Window,
    o: usize,
    // The forward's im2col, reused by the backward (what PyTorch keeps too).
    cols: std::sync::Mutex<Option<Tensor>>,
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "relprune-conv2d"
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
        let (g, o) = (self.g, self.o);
        let x = contiguous_f32(s1, l1, "conv2d")?;
        let w = contiguous_f32(s2, l2, "conv2d")?;
        let bias = contiguous_f32(s3, l3, "conv2d")?;
        let dev = Device::Cpu;
        let cols = Tensor::from_vec(im2col(x, &g), (g.rows(), g.cols()), &dev)?;
        let wm = Tensor::from_slice(w, (o, g.rows()), &dev)?;
        let y = host(&wm.matmul(&cols)?)?;
        if let Ok(mut slot) = self.cols.lock() {
            *slot = Some(cols);
        }
        // (O, B·L) → (B, O, L) with the bias added on the way.
        let (n, per_img) = (g.cols(), g.oh * g.ow);
        let mut out = vec![0f32; g.b * o * per_img];
        out.par_chunks_mut(per_img)
            .enumerate()
            .for_each(|(bo, dst)| {
                let (b, oc) = (bo / o, bo % o);
                let src = &y[oc * n + b * per_img..][..per_img];
                for (d, v) in dst.iter_mut().zip(src) {
                    *d = v + bias[oc];
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((g.b, o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g, o) = (self.g, self.o);
        let (n, per_img) = (g.cols(), g.oh * g.ow);
        let gy = host(grad)?;
        // (B, O, L) → (O, B·L), and the bias gradient: the sum over images and positions.
        let mut gy_on = vec![0f32; o * n];
        gy_on.par_chunks_mut(n).enumerate().for_each(|(oc, dst)| {
            for bi in 0..g.b {
                let src = &gy[(bi * o + oc) * per_img..][..per_img];
                dst[bi * per_img..][..per_img].copy_from_slice(src);
            }
        });
        let grad_b = if b.track_op() {
            let sums: Vec<f32> = gy_on.chunks(n).map(|r| r.iter().sum()).collect();
            Some(Tensor::from_vec(sums, o, b.device())?)
        } else {
            None
        };
        let gy_t = Tensor::from_vec(gy_on, (o, n), &Device::Cpu)?;
        let grad_w = if w.track_op() {
            let cached = self.cols.lock().ok().and_then(|mut c| c.take());
            let cols = match cached {
                Some(c) => c,
                None => {
                    Tensor::from_vec(im2col(&host(x)?, &g), (g.rows(), g.cols()), &Device::Cpu)?
                }
            };
            Some(gy_t.matmul(&cols.t()?)?.reshape(w.shape())?)
        } else {
            None
        };
        let grad_x = if x.track_op() {
            let wt = w.detach().reshape((o, g.rows()))?.t()?;
            let gc = host(&wt.matmul(&gy_t)?)?;
            let gx = col2im(&gc, &g);
            Some(Tensor::from_vec(gx, (g.b, g.c, g.h, g.w), x.device())?)
        } else {
            None
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

/// 2-D convolution of `x` `(B, C, H, W)` with `weight` `(O, C, kh, kw)`, optional `bias` `(O,)`,
/// square `stride` and zero `padding` (no dilation, no groups).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (o, c, kh, kw) = weight.dims4()?;
    let f32_cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
    if f32_cpu(x) && f32_cpu(weight) && bias.is_none_or(f32_cpu) {
        let g = Window::new(x.dims(), kh, kw, stride, padding)?;
        if g.c != c {
            candle_core::bail!("conv2d: input has {} channels, weight expects {c}", g.c)
        }
        let zero;
        let b = match bias {
            Some(b) => {
                if b.dims() != [o] {
                    candle_core::bail!("conv2d: bias of shape {:?} for {o} channels", b.dims())
                }
                b.contiguous()?
            }
            None => {
                // Not a variable, so the backward skips its gradient.
                zero = Tensor::zeros(o, DType::F32, &Device::Cpu)?;
                zero
            }
        };
        let op = ConvOp {
            g,
            o,
            cols: std::sync::Mutex::new(None),
        };
        return x.contiguous()?.apply_op3_arc(
            &weight.contiguous()?,
            &b,
            std::sync::Arc::new(Box::new(op)),
        );
    }
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}

/// Max pooling without padding; the backward pass works for any kernel and stride.
struct MaxPool {
    k: (usize, usize),
    s: (usize, usize),
    // Each output's argmax within its plane, kept by the forward for the backward.
    argmax: std::sync::Mutex<Option<Vec<u32>>>,
}

/// Output geometry `(B, C, H, W, OH, OW)` of a pooling of `dims`.
fn pool_dims(
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
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (y0, x0) = (oy * sh, ox * sw);
                        let mut best = y0 * w + x0;
                        let mut v = plane[best];
                        for y in y0..y0 + kh {
                            for (i, &p) in plane[y * w + x0..][..kw].iter().enumerate() {
                                // `>` keeps the first of equal maxima (PyTorch's rule); a NaN
                                // wins so that it propagates.
                                if p > v || (p.is_nan() && !v.is_nan()) {
                                    v = p;
                                    best = y * w + x0 + i;
                                }
                            }
                        }
                        dst[oy * ow + ox] = v;
                        arg[oy * ow + ox] = best as u32;
                    }
                }
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
        let gy = host(grad)?;
        let mut gx = vec![0f32; b * c * h * w];
        gx.par_chunks_mut(h * w)
            .zip(idx.par_chunks(oh * ow))
            .zip(gy.par_chunks(oh * ow))
            .for_each(|((dst, arg), g)| {
                for (&i, &v) in arg.iter().zip(g) {
                    dst[i as usize] += v;
                }
            });
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

/// A convolution layer using [`conv2d`]: weight `(O, C, k, k)` and optional bias.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `(out_channels, in_channels, k, k)`.
    pub weight: Tensor,
    /// `(out_channels,)`.
    pub bias: Option<Tensor>,
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
    }
}
