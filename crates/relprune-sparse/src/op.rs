//! The kernels as a candle custom op, and [`SparseLinear`], a linear layer that stores its
//! weight sparse and runs it through them (inference only: the op has no backward).

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};

use crate::dispatch::{Crossover, Pattern};
use crate::format::{Csr, SparseWeight, NM};
use crate::kernel::{chain_dims, chain_t, Activation, ChainLayer, Prepared};

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
        let (rows, cols) = self.weight.weight().dims();
        let bias = self.bias.as_deref().map(|b| b.as_slice());
        rows_through("sparse matmul", s, l, cols, rows, |x, batch, y| {
            self.weight.matmul_t(x, batch, bias, y)
        })
    }
}

/// The f32 contiguous input of an op from `cols` features to `rows`, run through `f(x, batch,
/// y)` into a fresh output of the input's shape with its last dimension `rows`.
fn rows_through(
    op: &str,
    s: &CpuStorage,
    l: &Layout,
    cols: usize,
    rows: usize,
    f: impl FnOnce(&[f32], usize, &mut [f32]) -> crate::Result<()>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 inputs are supported")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous")
    };
    let dims = l.dims();
    if dims.last() != Some(&cols) {
        candle_core::bail!("{op}: input of shape {dims:?}, the weight takes {cols} inputs");
    }
    let batch = (b - a) / cols.max(1);
    let mut y = output_buffer(batch * rows);
    f(&v[a..b], batch, &mut y).map_err(|e| candle_core::Error::Msg(format!("{op}: {e}")))?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("checked above") = rows;
    Ok((CpuStorage::F32(y), Shape::from(out)))
}

/// `x` as an f32 contiguous tensor, as the ops take it.
fn f32_contiguous(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 {
        x.contiguous()
    } else {
        x.to_dtype(DType::F32)?.contiguous()
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

/// The fraction of its 2:4 slots a layer must fill to be stored as 2:4.
const NM_MIN_FILL: f64 = 0.8;

/// A linear layer `y = x·Wᵀ + b` whose weight is stored sparse, for inference. It runs the
/// sparse kernels or, where the crossover table says the dense product is faster (low sparsity,
/// small batches), the dense one; a layer that may run dense rebuilds its dense weight the first
/// time a batch runs dense, and keeps it.
#[derive(Clone, Debug)]
pub struct SparseLinear {
    op: SparseMatmul,
    pattern: Pattern,
    table: Arc<Crossover>,
    /// The dense weight `(out, in)` and bias, built when first needed; `None` when every batch
    /// size runs sparse.
    dense: Option<Arc<OnceLock<DenseParts>>>,
}

/// A layer's dense weight `(out, in)` and bias.
type DenseParts = (Tensor, Option<Tensor>);

impl SparseLinear {
    /// A layer that always runs sparse, from a sparse weight and an optional bias (one per
    /// output).
    pub fn new(weight: SparseWeight, bias: Option<Vec<f32>>) -> crate::Result<Self> {
        crate::kernel::check_bias(bias.as_deref(), weight.dims().0)?;
        let pattern = match &weight {
            SparseWeight::Csr(_) => Pattern::Unstructured,
            SparseWeight::NM(m) => Pattern::NM(m.n, m.m),
        };
        Ok(Self {
            op: SparseMatmul {
                weight: Arc::new(Prepared::new(weight)),
                bias: bias.map(Arc::new),
            },
            pattern,
            table: Arc::new(Crossover::new(Vec::new())),
            dense: None,
        })
    }

    /// The layer of a trained dense weight `(out, in)` and bias, dispatched by the measured
    /// crossover table for this process's thread count: its zeros are left out (2:4 when every
    /// group of four columns holds at most two non-zeros, compressed rows otherwise).
    pub fn from_dense(weight: &Tensor, bias: Option<&Tensor>) -> crate::Result<Self> {
        Self::with_table(weight, bias, Crossover::measured().for_this_process())
    }

    /// [`SparseLinear::from_dense`] dispatched by `table` (one thread count's points).
    pub fn with_table(
        weight: &Tensor,
        bias: Option<&Tensor>,
        table: Crossover,
    ) -> crate::Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = bias
            .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        Self::from_rows_with_table(Csr::from_dense(&w, rows, cols)?, b, table)
    }

    /// The layer of a weight already in compressed rows (read straight from a compressed
    /// checkpoint, say) and a bias, dispatched as [`SparseLinear::from_dense`]; no dense copy of
    /// the weight exists unless a batch runs dense.
    pub fn from_rows(weight: Csr, bias: Option<Vec<f32>>) -> crate::Result<Self> {
        Self::from_rows_with_table(weight, bias, Crossover::measured().for_this_process())
    }

    /// [`SparseLinear::from_rows`] dispatched by `table`.
    pub fn from_rows_with_table(
        csr: Csr,
        bias: Option<Vec<f32>>,
        table: Crossover,
    ) -> crate::Result<Self> {
        // A 2:4 layer is stored as such; a sparser one that happens to fit 2:4 is not (its
        // compressed rows hold fewer entries).
        let density = csr.nnz() as f64 / (csr.rows * csr.cols).max(1) as f64;
        let sparse = match NM::from_csr(&csr, 2, 4) {
            Ok(nm) if density > NM_MIN_FILL * 0.5 => SparseWeight::NM(nm),
            _ => SparseWeight::Csr(csr),
        };
        let mut layer = Self::new(sparse, bias)?;
        if table.dense_somewhere(layer.pattern, layer.weight().density()) {
            layer.dense = Some(Arc::new(OnceLock::new()));
        }
        layer.table = Arc::new(table);
        Ok(layer)
    }

    /// The dense weight and bias, built from the sparse ones on first use.
    fn dense_parts(&self, cell: &OnceLock<DenseParts>) -> candle_core::Result<DenseParts> {
        if let Some(parts) = cell.get() {
            return Ok(parts.clone());
        }
        let (rows, cols) = self.weight().dims();
        let device = candle_core::Device::Cpu;
        let w = Tensor::from_vec(self.weight().to_dense(), (rows, cols), &device)?;
        let b = self
            .bias()
            .map(|b| Tensor::from_slice(b, rows, &device))
            .transpose()?;
        // Two threads may build it at once: both results are equal, the first one is kept.
        Ok(cell.get_or_init(|| (w, b)).clone())
    }

    /// The sparse weight, as the kernels run it.
    pub fn weight(&self) -> &SparseWeight {
        self.op.weight.weight()
    }

    /// The weight's sparsity pattern.
    pub fn pattern(&self) -> Pattern {
        self.pattern
    }

    /// The weight as the kernels run it, for products on pre-transposed inputs
    /// ([`Prepared::matmul_pretransposed`]).
    pub fn prepared(&self) -> &Prepared {
        &self.op.weight
    }

    /// The bias (one per output).
    pub fn bias(&self) -> Option<&[f32]> {
        self.op.bias.as_deref().map(|b| b.as_slice())
    }

    /// Whether the layer runs sparse at every batch size (it keeps no dense weight).
    pub fn always_sparse(&self) -> bool {
        self.dense.is_none()
    }

    /// The layer as one link of a [`SparseChain`], followed by `activation`.
    pub fn chain_layer(&self, activation: Activation) -> ChainLayer {
        ChainLayer {
            weight: self.op.weight.clone(),
            bias: self.op.bias.clone(),
            activation,
        }
    }

    /// Whether `batch` inputs at once run through the sparse kernels.
    pub fn runs_sparse(&self, batch: usize) -> bool {
        self.dense.is_none()
            || self
                .table
                .sparse_wins(self.pattern, self.weight().density(), batch)
    }
}

impl Module for SparseLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = f32_contiguous(x)?;
        let cols = self.weight().dims().1.max(1);
        match &self.dense {
            Some(cell) if !self.runs_sparse(x.elem_count() / cols) => {
                let (w, b) = self.dense_parts(cell)?;
                // As candle-nn's `Linear`: leading dimensions folded into one matrix product
                // (a batched product over a broadcast weight was measured slower).
                let dims = x.dims().to_vec();
                let rows = w.dim(0)?;
                let y = x.reshape((x.elem_count() / cols, cols))?.matmul(&w.t()?)?;
                let y = match &b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                let mut out = dims;
                *out.last_mut()
                    .expect("a matrix product's input has a last dimension") = rows;
                y.reshape(out)
            }
            _ => x.apply_op1_no_bwd(&self.op),
        }
    }
}

/// Weights up to which a layer is small enough to join a chain whatever the crossover table
/// says: its whole product, dense or sparse, costs less than one op's overhead.
const SMALL_LAYER: usize = 16_384;

/// Sparse linear layers with activations between them, run as one op ([`chain_t`]): a network
/// of small, very sparse layers (LeNet-300 at 99%) runs in the time of its non-zeros instead of
/// its ops and transpositions. Inference only.
#[derive(Clone, Debug)]
pub struct SparseChain {
    layers: Arc<Vec<ChainLayer>>,
    cols: usize,
    rows: usize,
}

impl SparseChain {
    /// A chain of `layers`, each followed by its activation; layers that do not follow one
    /// another are an error.
    pub fn new(layers: Vec<ChainLayer>) -> crate::Result<Self> {
        let (cols, rows) = chain_dims(&layers)?;
        Ok(Self {
            layers: Arc::new(layers),
            cols,
            rows,
        })
    }

    /// The chain of `layers` if running them fused is never the slower choice: each layer runs
    /// sparse at every batch size by the crossover table, or is small (at most 16,384 weights);
    /// `None` otherwise (then each layer dispatches on its own).
    pub fn fused(layers: &[(&SparseLinear, Activation)]) -> crate::Result<Option<Self>> {
        let worth = |l: &SparseLinear| {
            let (r, c) = l.weight().dims();
            l.always_sparse() || r * c <= SMALL_LAYER
        };
        if layers.iter().all(|(l, _)| worth(l)) {
            Self::new(layers.iter().map(|(l, a)| l.chain_layer(*a)).collect()).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl CustomOp1 for SparseChain {
    fn name(&self) -> &'static str {
        "relprune-sparse-chain"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        rows_through("sparse chain", s, l, self.cols, self.rows, |x, batch, y| {
            chain_t(x, batch, &self.layers, y)
        })
    }
}

impl Module for SparseChain {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        f32_contiguous(x)?.apply_op1_no_bwd(self)
    }
}
