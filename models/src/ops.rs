//! Fast CPU training ops: 2-D convolution through im2col + one gemm, and max pooling with a
//! backward for any kernel and stride.
//!
//! candle 0.11's CPU `conv2d` backward computes the input gradient with a direct
//! `conv_transpose2d` loop, even for the first layer, whose input (the images) needs none (and
//! fails with a shape mismatch when `size + 2·pad − k` is not a multiple of the stride); its
//! `max_pool2d` backward only works when the kernel equals the stride, and divides the gradient by
//! the window size (it averages the max mask). Here:
//!
//! - `im2col` is a custom op whose backward is `col2im` (and vice versa); the convolution is then
//!   one `(O, C·kh·kw) × (C·kh·kw, B·OH·OW)` matmul, so candle's autograd derives the weight and
//!   input gradients as two more gemms, and skips the input side when the input tracks no variable;
//! - max pooling records nothing in the forward pass; its backward re-finds each window's first
//!   maximum (PyTorch's tie rule) and routes the gradient there.
//!
//! Other devices use candle's own ops (same results, a test checks it on the CPU).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, Device, Layout, Module, Result, Shape, Tensor,
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
struct Im2Col(Window);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "relprune-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "im2col")?;
        let g = self.0;
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
                    for (ox, d) in dst_row.iter_mut().enumerate() {
                        if let Some(ix) = g.src(ox, kj, g.w) {
                            *d = src_row[ix];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

/// `(C·kh·kw, B·OH·OW)` → `(B, C, H, W)`, summing overlapping fields: the adjoint of [`Im2Col`].
struct Col2Im(Window);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "relprune-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(s, l, "col2im")?;
        let g = self.0;
        let (n, plane, per_img) = (g.cols(), g.h * g.w, g.oh * g.ow);
        let mut out = vec![0f32; g.b * g.c * plane];
        // One task per (image, channel) plane: no two tasks write the same element.
        out.par_chunks_mut(plane).enumerate().for_each(|(bc, dst)| {
            let (b, c) = (bc / g.c, bc % g.c);
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let r = (c * g.kh + ki) * g.kw + kj;
                    let src = &cols[r * n + b * per_img..][..per_img];
                    for oy in 0..g.oh {
                        let Some(iy) = g.src(oy, ki, g.h) else {
                            continue;
                        };
                        let d = &mut dst[iy * g.w..][..g.w];
                        for ox in 0..g.ow {
                            if let Some(ix) = g.src(ox, kj, g.w) {
                                d[ix] += src[oy * g.ow + ox];
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
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
    let fast = matches!(x.device(), Device::Cpu) && x.dtype() == candle_core::DType::F32;
    let y = if fast {
        let g = Window::new(x.dims(), kh, kw, stride, padding)?;
        if g.c != c {
            candle_core::bail!("conv2d: input has {} channels, weight expects {c}", g.c)
        }
        let cols = x.contiguous()?.apply_op1(Im2Col(g))?;
        let y = weight.reshape((o, c * kh * kw))?.matmul(&cols)?;
        y.reshape((o, g.b, g.oh, g.ow))?
            .permute((1, 0, 2, 3))?
            .contiguous()?
    } else {
        x.conv2d(weight, padding, stride, 1, 1)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}

/// Max pooling without padding; the backward pass works for any kernel and stride.
struct MaxPool {
    k: (usize, usize),
    s: (usize, usize),
}

impl MaxPool {
    fn out_dims(&self, dims: &[usize]) -> Result<(usize, usize, usize, usize, usize, usize)> {
        let &[b, c, h, w] = dims else {
            candle_core::bail!("max_pool2d input must be (B, C, H, W), got {dims:?}")
        };
        let (kh, kw) = self.k;
        let (sh, sw) = self.s;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || h < kh || w < kw {
            candle_core::bail!("max_pool2d: kernel {kh}x{kw} stride {sh}x{sw} on {h}x{w}")
        }
        Ok((b, c, h, w, (h - kh) / sh + 1, (w - kw) / sw + 1))
    }

    /// Index (in the plane) of the first maximum of window (oy, ox).
    #[inline]
    fn argmax(&self, plane: &[f32], w: usize, oy: usize, ox: usize) -> usize {
        let (kh, kw) = self.k;
        let (y0, x0) = (oy * self.s.0, ox * self.s.1);
        let mut best = y0 * w + x0;
        for y in y0..y0 + kh {
            for x in x0..x0 + kw {
                let i = y * w + x;
                // `>` keeps the first of equal maxima; NaN wins so it propagates like PyTorch.
                if plane[i] > plane[best] || (plane[i].is_nan() && !plane[best].is_nan()) {
                    best = i;
                }
            }
        }
        best
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "relprune-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "max_pool2d")?;
        let (b, c, h, w, oh, ow) = self.out_dims(l.dims())?;
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, plane)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        dst[oy * ow + ox] = plane[self.argmax(plane, w, oy, ox)];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &MaxPoolGrad {
                k: self.k,
                s: self.s,
            },
        )?;
        Ok(Some(g))
    }
}

/// (input, output gradient) → input gradient of [`MaxPool`].
struct MaxPoolGrad {
    k: (usize, usize),
    s: (usize, usize),
}

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "relprune-max-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "max_pool2d backward")?;
        let gy = contiguous_f32(s2, l2, "max_pool2d backward")?;
        let pool = MaxPool {
            k: self.k,
            s: self.s,
        };
        let (b, c, h, w, oh, ow) = pool.out_dims(l1.dims())?;
        if l2.dims() != [b, c, oh, ow] {
            candle_core::bail!("max_pool2d backward: gradient shape {:?}", l2.dims())
        }
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .zip(gy.par_chunks(oh * ow))
            .for_each(|((dst, plane), g)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        dst[pool.argmax(plane, w, oy, ox)] += g[oy * ow + ox];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }
}

/// Max pooling of `x` `(B, C, H, W)` with `kernel` and `stride` (no padding).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    if matches!(x.device(), Device::Cpu) && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(MaxPool {
            k: (kernel, kernel),
            s: (stride, stride),
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
