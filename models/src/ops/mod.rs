//! Fast CPU training ops: the linear layer and 2-D convolution (through im2col) as one gemm-based
//! op each, and max pooling with a backward for any kernel and stride.
//!
//! candle 0.11's CPU `conv2d` backward computes the input gradient with a direct
//! `conv_transpose2d` loop, even for the first layer, whose input (the images) needs none (and
//! fails with a shape mismatch when `size + 2·pad − k` is not a multiple of the stride); its
//! `max_pool2d` backward only works when the kernel equals the stride, and divides the gradient by
//! the window size (it averages the max mask). Here:
//!
//! - the convolution is one custom op, computed image by image: `im2col` into a per-thread
//!   buffer, one `(O, C·kh·kw) × (C·kh·kw, OH·OW)` gemm written straight into the output (bias
//!   first); its backward is two more gemms per image (weight and input gradients, the latter
//!   through `col2im`) and a sum (bias), and skips every gradient whose tensor tracks no
//!   variable — the images' in particular;
//! - max pooling keeps each window's first maximum (PyTorch's tie rule) from the forward pass and
//!   routes the gradient there.
//!
//! Other devices use candle's own ops (same results, a test checks it on the CPU).

pub mod attention;
pub mod conv;
pub mod linear;
pub mod pool;

use candle_core::{CpuStorage, Layout, Result, Tensor};

pub use attention::attention;
pub use conv::{conv2d, conv2d_max_pool, Conv2d, SparseConv2d};
pub use linear::{linear, linear_relu};
pub use pool::max_pool2d;

pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor, without copying it.
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(contiguous_f32(s, layout, op)?),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// A row-major or transposed view of an `m×n` matrix in a slice: element `(i, j)` at
/// `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Mat<'_> {
    /// Panics unless every element of an `m×n` view lies inside the slice (the gemm below reads
    /// through raw pointers).
    fn check(&self, m: usize, n: usize) {
        if m > 0 && n > 0 {
            assert!((m - 1) * self.rs + (n - 1) * self.cs < self.data.len());
        }
    }
}

/// `dst (m×n, row-major) = [dst +] a (m×k) · b (k×n)`. `gemm` splits the work over blocks of
/// the output only, never over `k`, so the result is the same whatever `par` is.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
    par: gemm::Parallelism,
) {
    gemm_rows(m, n, k, (dst, n), accumulate, a, b, par)
}

/// `a (m×k) · b (k×n)` into a new row-major buffer that the product writes once: no zero fill
/// first (the fill showed up in profiles as `memset`, a few % of a training step).
pub(crate) fn gemm_new(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    par: gemm::Parallelism,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    a.check(m, k);
    b.check(k, n);
    let mut dst = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the views were bounds-checked above and `dst` has room for `m·n` floats. Without
    // `read_dst` gemm's alpha is zero, and its kernels then store `a·b` to every element
    // without loading it (gemm-common's `alpha_status == 0` paths), so all `m·n` are
    // initialized when the length is set.
    unsafe {
        gemm_raw(m, n, k, (dst.as_mut_ptr(), n), false, a, b, par);
        dst.set_len(m * n);
    }
    dst
}

/// [`gemm_into`] into rows `dst_rs` apart (an `m×n` block of a wider row-major matrix).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
    par: gemm::Parallelism,
) {
    assert!(dst_rs >= n && (m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n));
    a.check(m, k);
    b.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the three views were bounds-checked above; `dst` is borrowed mutably and does not
    // alias `a` or `b`.
    unsafe { gemm_raw(m, n, k, (dst.as_mut_ptr(), dst_rs), accumulate, a, b, par) }
}

/// gemm-crate call behind [`gemm_rows`] and [`gemm_new`]: `dst (rows dst_rs apart) = [dst +]
/// a·b`, with `k > 0`.
///
/// # Safety
/// The `m×n` destination block and the views of `a` and `b` must be in bounds, not aliasing.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    )
}

/// A new buffer of `len` floats that `fill(offset, chunk)` writes, chunk by chunk: chunks of
/// `chunk` elements (the last shorter) on the pool when there are several and the pool has more
/// than one thread, on the caller otherwise — the same chunks either way, so element-wise fills
/// give the same bits on any thread count. No zero fill first.
///
/// # Safety
/// `fill` must write every element of each chunk it is given.
pub(crate) unsafe fn filled_in_chunks(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let mut out = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    if len > chunk && rayon::current_num_threads() > 1 {
        spare
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| fill(i * chunk, c));
    } else {
        for (i, c) in spare.chunks_mut(chunk).enumerate() {
            fill(i * chunk, c);
        }
    }
    // SAFETY: the chunks cover all `len` elements and the caller's `fill` wrote each.
    unsafe { out.set_len(len) };
    out
}

/// The pool `gemm` splits one product over: rayon's (so `--threads` and installed pools
/// apply), or none for products too small to pay for handing work out.
pub(crate) fn gemm_parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `bias` checked to be `(o,)` and contiguous, or a zero vector of `o` (not a variable, so a
/// backward skips its gradient): the fused ops always take a bias argument.
pub(crate) fn bias_or_zero(bias: Option<&Tensor>, o: usize, what: &str) -> Result<Tensor> {
    match bias {
        Some(b) => {
            if b.dims() != [o] {
                candle_core::bail!("{what}: bias of shape {:?} for {o} outputs", b.dims())
            }
            b.contiguous()
        }
        None => Tensor::zeros(o, candle_core::DType::F32, &candle_core::Device::Cpu),
    }
}

/// A deterministic tensor of values in [-1, 1] (xorshift from `seed`), for the ops' tests.
#[cfg(test)]
pub(crate) fn test_tensor(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(7);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).expect("test tensor")
}
