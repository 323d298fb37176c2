//! The convolution as one CPU op with its own backward (im2col into a per-thread buffer, gemm
//! straight into the output), optionally fused with the max pooling that follows it.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::pool::{pool_dims, PoolPlane};
use super::{contiguous_f32, gemm_into, with_f32, Mat};

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

    /// Input coordinate of output `o` at kernel offset `k`, if inside the (unpadded) input.
    #[inline]
    fn src(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.pad)
            .filter(|&i| i < len)
    }
}

/// `dst.copy_from_slice(src)` for the short rows of im2col (often 8–32 floats): fixed-size
/// 8-float copies inline to vector moves, where `copy_from_slice` calls `memcpy` once per row
/// (≈ 20% of a LeNet-5 convolution went there).
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    assert_eq!(n, src.len());
    if n < 8 {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
        return;
    }
    for (d, s) in dst.chunks_exact_mut(8).zip(src.chunks_exact(8)) {
        let block: [f32; 8] = [s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]];
        d.copy_from_slice(&block);
    }
    if !n.is_multiple_of(8) {
        // The tail as the last 8 elements, overlapping what is already copied.
        let block: [f32; 8] = src[n - 8..].try_into().expect("8 elements");
        dst[n - 8..].copy_from_slice(&block);
    }
}

/// One image `(C, H, W)` → its columns `(C·kh·kw, OH·OW)`, one receptive field per column.
/// Every element is written (zeros where the window overhangs the padding), so callers reuse one
/// scratch buffer per thread.
fn im2col_image(x: &[f32], g: &Window, out: &mut [f32]) {
    let (l, plane) = (g.oh * g.ow, g.h * g.w);
    if g.stride == 1 && g.pad == 0 {
        // Every output row reads one contiguous input span: no bounds logic per row.
        for (r, row) in out.chunks_exact_mut(l).enumerate() {
            let (c, k) = (r / (g.kh * g.kw), r % (g.kh * g.kw));
            let src = &x[c * plane + (k / g.kw) * g.w + k % g.kw..];
            for (dst, src) in row.chunks_exact_mut(g.ow).zip(src.chunks(g.w)) {
                copy_short(dst, &src[..g.ow]);
            }
        }
        return;
    }
    for (r, row) in out.chunks_mut(l).enumerate() {
        let (c, k) = (r / (g.kh * g.kw), r % (g.kh * g.kw));
        let (ki, kj) = (k / g.kw, k % g.kw);
        let src = &x[c * plane..][..plane];
        let span = g.stride == 1 && kj >= g.pad && kj - g.pad + g.ow <= g.w;
        for oy in 0..g.oh {
            let dst = &mut row[oy * g.ow..][..g.ow];
            let Some(iy) = g.src(oy, ki, g.h) else {
                dst.fill(0.0);
                continue;
            };
            let src_row = &src[iy * g.w..][..g.w];
            if span {
                // The whole output row reads one contiguous input span.
                copy_short(dst, &src_row[kj - g.pad..][..g.ow]);
                continue;
            }
            for (ox, d) in dst.iter_mut().enumerate() {
                *d = g.src(ox, kj, g.w).map_or(0.0, |ix| src_row[ix]);
            }
        }
    }
}

/// Adds one image's column gradients `(C·kh·kw, OH·OW)` into its input gradient `(C, H, W)`,
/// summing overlapping fields: the adjoint of [`im2col_image`].
fn col2im_image(cols: &[f32], g: &Window, dst: &mut [f32]) {
    let (l, plane) = (g.oh * g.ow, g.h * g.w);
    if g.stride == 1 && g.pad == 0 {
        for (r, row) in cols.chunks_exact(l).enumerate() {
            let (c, k) = (r / (g.kh * g.kw), r % (g.kh * g.kw));
            let d = &mut dst[c * plane + (k / g.kw) * g.w + k % g.kw..];
            for (s, d) in row.chunks_exact(g.ow).zip(d.chunks_mut(g.w)) {
                for (d, v) in d[..g.ow].iter_mut().zip(s) {
                    *d += v;
                }
            }
        }
        return;
    }
    for (c, d_plane) in dst.chunks_mut(plane).enumerate() {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let r = (c * g.kh + ki) * g.kw + kj;
                let src = &cols[r * l..][..l];
                let span = g.stride == 1 && kj >= g.pad && kj - g.pad + g.ow <= g.w;
                for oy in 0..g.oh {
                    let Some(iy) = g.src(oy, ki, g.h) else {
                        continue;
                    };
                    let d = &mut d_plane[iy * g.w..][..g.w];
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
    }
}

/// Images per backward task (and weight-gradient accumulator): a fixed split, so that the sum's
/// order, and with it every bit of the result, does not depend on the number of threads.
const IMAGES_PER_TASK: usize = 4;

/// A max pooling fused behind a convolution: kernel, stride and the pooled `(PH, PW)`.
#[derive(Clone, Copy, Debug)]
struct FusedPool {
    k: usize,
    s: usize,
    ph: usize,
    pw: usize,
}

/// The whole convolution as one op, `(x, weight, bias)` → `y`, with its own backward: fewer
/// graph nodes (candle's backward allocates and adds a gradient buffer per node) and no input
/// gradient for inputs that track no variable. Work is split by image: each image's columns
/// are built in a per-thread scratch buffer that stays in cache, and the products are written
/// straight into the `(B, O, OH, OW)` output, so no full-batch column matrix or transposed copy
/// is ever made. With a fused max pooling, the unpooled output never leaves the scratch buffer
/// either: only the pooled maps and each window's argmax are kept.
struct ConvOp {
    g: Window,
    o: usize,
    pool: Option<FusedPool>,
    // Per image and channel, each pooled output's argmax within its `(OH, OW)` map.
    argmax: std::sync::Mutex<Option<Vec<u32>>>,
}

impl ConvOp {
    /// Elements of one image's output.
    fn out_per_image(&self) -> usize {
        match self.pool {
            Some(p) => self.o * p.ph * p.pw,
            None => self.o * self.g.oh * self.g.ow,
        }
    }

    /// One image's unpooled output gradient `(O, OH, OW)` from its pooled one, through the argmax.
    fn unpool(&self, gy: &[f32], arg: &[u32], dst: &mut [f32]) {
        let l = self.g.oh * self.g.ow;
        dst.fill(0.0);
        let pl = gy.len() / self.o;
        for ((d, g), a) in dst.chunks_mut(l).zip(gy.chunks(pl)).zip(arg.chunks(pl)) {
            for (&i, &v) in a.iter().zip(g) {
                d[i as usize] += v;
            }
        }
    }
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
        let (r, l, img) = (g.rows(), g.oh * g.ow, g.c * g.h * g.w);
        let wm = Mat {
            data: w,
            rs: r,
            cs: 1,
        };
        let per = self.out_per_image();
        let mut out = vec![0f32; g.b * per];
        // The products of one image, into `y` `(O, OH·OW)`.
        let conv = |xb: &[f32], cols: &mut [f32], y: &mut [f32]| {
            im2col_image(xb, &g, cols);
            for (row, &b) in y.chunks_mut(l).zip(bias) {
                row.fill(b);
            }
            let cm = Mat {
                data: cols,
                rs: l,
                cs: 1,
            };
            gemm_into(o, l, r, y, true, wm, cm, gemm::Parallelism::None);
        };
        let shape = match self.pool {
            None => {
                out.par_chunks_mut(per)
                    .zip(x.par_chunks(img))
                    .for_each_init(|| vec![0f32; r * l], |cols, (dst, xb)| conv(xb, cols, dst));
                Shape::from((g.b, o, g.oh, g.ow))
            }
            Some(p) => {
                let mut idx = vec![0u32; g.b * per];
                let plane = PoolPlane {
                    w: g.ow,
                    oh: p.ph,
                    ow: p.pw,
                };
                out.par_chunks_mut(per)
                    .zip(idx.par_chunks_mut(per))
                    .zip(x.par_chunks(img))
                    .for_each_init(
                        || (vec![0f32; r * l], vec![0f32; o * l]),
                        |(cols, y), ((dst, arg), xb)| {
                            conv(xb, cols, y);
                            let pl = p.ph * p.pw;
                            for ((ym, d), a) in
                                y.chunks(l).zip(dst.chunks_mut(pl)).zip(arg.chunks_mut(pl))
                            {
                                plane.pool((p.k, p.k), (p.s, p.s), ym, d, a);
                            }
                        },
                    );
                if let Ok(mut slot) = self.argmax.lock() {
                    *slot = Some(idx);
                }
                Shape::from((g.b, o, p.ph, p.pw))
            }
        };
        Ok((CpuStorage::F32(out), shape))
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
        let (r, l, img) = (g.rows(), g.oh * g.ow, g.c * g.h * g.w);
        let per = self.out_per_image();
        let dev = x.device().clone();
        let (need_x, need_w) = (x.track_op(), w.track_op());
        let argmax = match self.pool {
            None => None,
            Some(_) => match self.argmax.lock().ok().and_then(|mut s| s.take()) {
                Some(i) => Some(i),
                // A second backward through the same op: run the forward again for the indices.
                None => {
                    x.contiguous()?
                        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, self)?;
                    Some(
                        self.argmax
                            .lock()
                            .ok()
                            .and_then(|mut s| s.take())
                            .ok_or_else(|| candle_core::Error::Msg("conv2d: no argmax".into()))?,
                    )
                }
            },
        };
        with_f32(grad, "conv2d backward", |gy| {
            // Every pooled gradient lands on one output of its channel: the sums agree.
            let grad_b = if b.track_op() {
                let mut sums = vec![0f32; o];
                for per_img in gy.chunks(per) {
                    for (s, row) in sums.iter_mut().zip(per_img.chunks(per / o)) {
                        *s += row.iter().sum::<f32>();
                    }
                }
                Some(Tensor::from_vec(sums, o, &dev)?)
            } else {
                None
            };
            if !need_x && !need_w {
                return Ok((None, None, grad_b));
            }
            let mut gx = if need_x {
                vec![0f32; g.b * img]
            } else {
                Vec::new()
            };
            let tasks = g.b.div_ceil(IMAGES_PER_TASK);
            let gx_parts: Vec<&mut [f32]> = if need_x {
                gx.chunks_mut(img * IMAGES_PER_TASK).collect()
            } else {
                (0..tasks).map(|_| <&mut [f32]>::default()).collect()
            };
            let gw = with_f32(x, "conv2d backward", |x| {
                with_f32(&w.detach(), "conv2d backward", |wv| {
                    let wt = Mat {
                        data: wv,
                        rs: 1,
                        cs: r,
                    };
                    // Per image: gy_b (O×L) · cols_bᵀ (L×R) into the task's weight-gradient
                    // accumulator, and Wᵀ (R×O) · gy_b scattered back onto the image.
                    let partial: Vec<Vec<f32>> = gx_parts
                        .into_par_iter()
                        .enumerate()
                        .map(|(t, gx_part)| {
                            let first = t * IMAGES_PER_TASK;
                            let n = IMAGES_PER_TASK.min(g.b - first);
                            let mut acc = if need_w {
                                vec![0f32; o * r]
                            } else {
                                Vec::new()
                            };
                            let mut cols = vec![0f32; r * l];
                            let mut unpooled = match argmax {
                                Some(_) => vec![0f32; o * l],
                                None => Vec::new(),
                            };
                            for i in 0..n {
                                let bi = first + i;
                                let gyp = &gy[bi * per..][..per];
                                let gyb: &[f32] = match &argmax {
                                    Some(arg) => {
                                        self.unpool(gyp, &arg[bi * per..][..per], &mut unpooled);
                                        &unpooled
                                    }
                                    None => gyp,
                                };
                                let gm = Mat {
                                    data: gyb,
                                    rs: l,
                                    cs: 1,
                                };
                                if need_w {
                                    im2col_image(&x[bi * img..][..img], &g, &mut cols);
                                    let bt = Mat {
                                        data: &cols,
                                        rs: 1,
                                        cs: l,
                                    };
                                    gemm_into(
                                        o,
                                        r,
                                        l,
                                        &mut acc,
                                        true,
                                        gm,
                                        bt,
                                        gemm::Parallelism::None,
                                    );
                                }
                                if need_x {
                                    gemm_into(
                                        r,
                                        l,
                                        o,
                                        &mut cols,
                                        false,
                                        wt,
                                        gm,
                                        gemm::Parallelism::None,
                                    );
                                    col2im_image(&cols, &g, &mut gx_part[i * img..][..img]);
                                }
                            }
                            acc
                        })
                        .collect();
                    let mut parts = partial.into_iter();
                    let mut total = parts.next().unwrap_or_default();
                    for p in parts {
                        for (t, v) in total.iter_mut().zip(&p) {
                            *t += v;
                        }
                    }
                    Ok(total)
                })
            })?;
            let grad_w = if need_w {
                Some(Tensor::from_vec(gw, w.shape(), &dev)?)
            } else {
                None
            };
            let grad_x = if need_x {
                Some(Tensor::from_vec(gx, (g.b, g.c, g.h, g.w), &dev)?)
            } else {
                None
            };
            Ok((grad_x, grad_w, grad_b))
        })
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
    conv2d_op(x, weight, bias, stride, padding, None)
}

/// [`conv2d`] followed by [`max_pool2d`] with `pool_kernel` and `pool_stride`, as one op on the
/// CPU: the unpooled output is never materialized (nor its gradient).
pub fn conv2d_max_pool(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    (stride, padding): (usize, usize),
    (pool_kernel, pool_stride): (usize, usize),
) -> Result<Tensor> {
    conv2d_op(
        x,
        weight,
        bias,
        stride,
        padding,
        Some((pool_kernel, pool_stride)),
    )
}

fn conv2d_op(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    pool: Option<(usize, usize)>,
) -> Result<Tensor> {
    let (o, c, kh, kw) = weight.dims4()?;
    let f32_cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
    if f32_cpu(x) && f32_cpu(weight) && bias.is_none_or(f32_cpu) {
        let g = Window::new(x.dims(), kh, kw, stride, padding)?;
        if g.c != c {
            candle_core::bail!("conv2d: input has {} channels, weight expects {c}", g.c)
        }
        let pool = match pool {
            None => None,
            Some((k, s)) => {
                let (_, _, _, _, ph, pw) = pool_dims((k, k), (s, s), &[g.b, o, g.oh, g.ow])?;
                Some(FusedPool { k, s, ph, pw })
            }
        };
        let b = super::bias_or_zero(bias, o, "conv2d")?;
        let op = ConvOp {
            g,
            o,
            pool,
            argmax: std::sync::Mutex::new(None),
        };
        return x.contiguous()?.apply_op3_arc(
            &weight.contiguous()?,
            &b,
            std::sync::Arc::new(Box::new(op)),
        );
    }
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, o, 1, 1))?)?,
        None => y,
    };
    match pool {
        Some((k, s)) => y.max_pool2d_with_stride(k, s),
        None => Ok(y),
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

impl Conv2d {
    /// This convolution followed by a `kernel`×`kernel` max pooling at `stride`, fused
    /// ([`conv2d_max_pool`]).
    pub fn forward_max_pool(&self, x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
        conv2d_max_pool(
            x,
            &self.weight,
            self.bias.as_ref(),
            (self.stride, self.padding),
            (kernel, stride),
        )
    }
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

/// A convolution whose weight is stored sparse, for inference: each image's receptive fields
/// (im2col) times the sparse weight `(O, C·k·k)`, through `relprune_sparse`.
#[derive(Clone, Debug)]
pub struct SparseConv2d {
    lin: relprune_sparse::SparseLinear,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl SparseConv2d {
    /// The sparse form of a trained convolution.
    pub fn from_dense(conv: &Conv2d) -> crate::Result<Self> {
        let (o, c, kh, kw) = conv.weight.dims4()?;
        if kh != kw {
            return Err(crate::Error::Config(format!(
                "sparse convolution: square kernels only, got {kh}×{kw}"
            )));
        }
        let w = conv.weight.reshape((o, c * kh * kw))?;
        let lin = relprune_sparse::SparseLinear::from_dense(&w, conv.bias.as_ref())
            .map_err(|e| crate::Error::Config(format!("sparse convolution: {e}")))?;
        Ok(Self {
            lin,
            kernel: kh,
            stride: conv.stride,
            padding: conv.padding,
        })
    }

    /// Whether the weight runs sparse at every batch size by the crossover table.
    pub fn always_sparse(&self) -> bool {
        self.lin.always_sparse()
    }

    /// This convolution followed by a max pooling.
    pub fn forward_max_pool(&self, x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
        super::max_pool2d(&self.forward(x)?, kernel, stride)
    }
}

impl Module for SparseConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let g = Window::new(
            x.dims(),
            self.kernel,
            self.kernel,
            self.stride,
            self.padding,
        )?;
        let (k, positions) = (g.rows(), g.oh * g.ow);
        let o = self.lin.weight().dims().0;
        let (prepared, bias) = (self.lin.prepared(), self.lin.bias());
        let mut y = vec![0f32; g.b * o * positions];
        // Per image: its receptive fields (im2col, one row per weight column, one column per
        // output position) are the kernels' transposed input as they stand, in tiles of at most
        // 64 positions, and the outputs come out channel by channel: no transposition either way.
        let image = |bufs: &mut (Vec<f32>, Vec<f32>), (img, out): (&[f32], &mut [f32])| {
            let (cols, tile) = bufs;
            im2col_image(img, &g, cols);
            for p0 in (0..positions).step_by(64) {
                let n = (positions - p0).min(64);
                let width = relprune_sparse::kernel::tile_width(n);
                let xt: &[f32] = if n == positions && width == n {
                    cols
                } else {
                    tile.clear();
                    tile.resize(k * width, 0.0);
                    for (dst, src) in tile
                        .chunks_exact_mut(width)
                        .zip(cols.chunks_exact(positions))
                    {
                        dst[..n].copy_from_slice(&src[p0..p0 + n]);
                    }
                    tile
                };
                prepared
                    .matmul_pretransposed(xt, width, n, bias, &mut out[p0..], positions)
                    .map_err(|e| candle_core::Error::Msg(format!("sparse conv2d: {e}")))?;
            }
            Ok(())
        };
        let bufs = || (vec![0f32; k * positions], Vec::new());
        super::with_f32(&x, "sparse conv2d", |xs| {
            let plane = g.c * g.h * g.w;
            // Images are independent and each is computed the same way whatever the thread.
            if rayon::current_num_threads() > 1 && g.b > 1 {
                xs.par_chunks_exact(plane)
                    .zip(y.par_chunks_exact_mut(o * positions))
                    .try_for_each_init(bufs, image)
            } else {
                let mut b = bufs();
                xs.chunks_exact(plane)
                    .zip(y.chunks_exact_mut(o * positions))
                    .try_for_each(|item| image(&mut b, item))
            }
        })?;
        Tensor::from_vec(y, (g.b, o, g.oh, g.ow), x.device())
    }
}
