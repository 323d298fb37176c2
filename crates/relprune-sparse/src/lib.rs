//! Sparse weights that pay at inference: a pruned layer stored without its zeros, and CPU
//! kernels for `y = x·Wᵀ (+ b)` that only touch the non-zeros.
//!
//! - [`format`]: compressed rows ([`format::Csr`], column indices in the narrowest integer that
//!   fits) and N:M ([`format::NM`], values plus in-group offsets);
//! - [`kernel`]: the products, multithreaded (rayon) with results independent of the thread
//!   count;
//! - [`dispatch`]: the measured crossover table that says, per pattern and batch size, up to which
//!   density the sparse product beats the dense one;
//! - [`file`]: compressed checkpoints (`compressed-tensors`' `sparse-bitmask` and relprune's own
//!   format), and back, bit for bit;
//! - [`op`]: the kernels as a candle custom op and [`op::SparseLinear`], a drop-in linear layer
//!   for inference that runs sparse or dense, whichever the table says is faster, and
//!   [`op::SparseChain`], sparse layers and activations fused into one op.
//!
//! Depends on candle-core only.

pub mod dispatch;
pub mod file;
pub mod format;
pub mod kernel;
pub mod op;

pub use dispatch::{Crossover, Pattern};
pub use format::{Csr, Indices, SparseWeight, NM};
pub use kernel::{chain_t, matmul_t, Activation, ChainLayer, Prepared};
pub use op::{SparseChain, SparseLinear, SparseMatmul};

/// What can go wrong building or running a sparse layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit together.
    #[error("{0}")]
    Shape(String),
    /// Values a layout cannot hold (non-finite, or too many non-zeros for N:M).
    #[error("{0}")]
    Value(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias using the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
