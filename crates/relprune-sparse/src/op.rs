//! The kernels as a candle custom op, and [`SparseLinear`], a linear layer that stores its
//! weight sparse and runs it through them (inference only: the op has no backward).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};

use crate::format::{Csr, SparseWeight};
use crate::kernel::Prepared;

/// `x (…, cols)` → `x·Wᵀ + b (…, rows)` with a sparse `W`, on f32 CPU tensors.
#[derive(Clone, Debug)]
pub struct SparseMatmul {
    weight: Arc<Prepared>,
    bias: Option<Arc<Vec<f32>>>,
}

impl CustomOp1 for SparseMatmul {
    fn name(&self) -> &'static str {
        "relprune-sparse-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("sparse matmul: only f32 inputs are supported")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("sparse matmul: the input must be contiguous")
        };
        let (rows, cols) = self.weight.weight().dims();
        let dims = l.dims();
        if dims.last() != Some(&cols) {
            candle_core::bail!(
                "sparse matmul: input of shape {dims:?}, the weight takes {cols} inputs"
            );
        }
        let batch = (b - a) / cols.max(1);
        let mut y = output_buffer(batch * rows);
        let bias = self.bias.as_deref().map(|b| b.as_slice());
        self.weight
            .matmul_t(&v[a..b], batch, bias, &mut y)
            .map_err(|e| candle_core::Error::Msg(format!("sparse matmul: {e}")))?;
        let mut out = dims.to_vec();
        *out.last_mut().expect("checked above") = rows;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// Outputs from this size are backed by transparent huge pages where the system offers them on
/// request (one fault per 2 MiB instead of per 4 KiB: a 100 MB output otherwise spends longer in
/// page faults than a 98%-sparse product takes).
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;

/// A zeroed buffer of `len` floats for an op's output.
fn output_buffer(len: usize) -> Vec<f32> {
    let y = vec![0f32; len];
    #[cfg(target_os = "linux")]
    if len * 4 >= HUGE_PAGE_MIN_BYTES {
        // SAFETY: advice on memory this Vec owns and has not touched yet; it changes how the
        // pages are backed, never their contents. A refusal only leaves the default.
        unsafe {
            // madvise takes whole pages: the page-aligned part of the buffer.
            let (start, end) = (y.as_ptr() as usize, y.as_ptr() as usize + len * 4);
            let (a, b) = ((start + 4095) & !4095, end & !4095);
            libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
        }
    }
    y
}

/// A linear layer `y = x·Wᵀ + b` whose weight is stored sparse.
#[derive(Clone, Debug)]
pub struct SparseLinear {
    op: SparseMatmul,
}

impl SparseLinear {
    /// A layer from a sparse weight and an optional bias (one per output).
    pub fn new(weight: SparseWeight, bias: Option<Vec<f32>>) -> crate::Result<Self> {
        let (rows, _) = weight.dims();
        if let Some(b) = bias.as_ref().filter(|b| b.len() != rows) {
            return Err(crate::Error::Shape(format!(
                "bias has {} values for {rows} outputs",
                b.len()
            )));
        }
        Ok(Self {
            op: SparseMatmul {
                weight: Arc::new(Prepared::new(weight)),
                bias: bias.map(Arc::new),
            },
        })
    }

    /// The layer of a trained dense weight `(out, in)` and bias: its zeros are left out
    /// (compressed rows).
    pub fn from_dense(weight: &Tensor, bias: Option<&Tensor>) -> crate::Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = bias
            .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        Self::new(SparseWeight::Csr(Csr::from_dense(&w, rows, cols)?), b)
    }

    /// The sparse weight.
    pub fn weight(&self) -> &SparseWeight {
        self.op.weight.weight()
    }
}

impl Module for SparseLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = if x.dtype() == DType::F32 {
            x.contiguous()?
        } else {
            x.to_dtype(DType::F32)?.contiguous()?
        };
        x.apply_op1_no_bwd(&self.op)
    }
}
