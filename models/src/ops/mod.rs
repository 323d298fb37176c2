//! Fast CPU training ops: 2-D convolution through im2col + one gemm, and max pooling with a
//! backward for any kernel and stride.
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

pub mod conv;
pub mod pool;

use candle_core::{CpuStorage, Layout, Result, Tensor};

pub use conv::{conv2d, conv2d_max_pool, Conv2d, SparseConv2d};
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
