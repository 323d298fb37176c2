//! The regularizer of relprune: selective weight decay of *irrelevant* weights.
//!
//! For a parameter tensor `W` with minibatch gradient `G`, each element gets a relevance score
//! (`|g|`, the Taylor score `|w·g|`, or the output sensitivity `(1/C)·Σ_k |∂y_k/∂w|`). Elements
//! whose score falls below `τ · stat(scores)` are *irrelevant* and are shrunk by weight decay;
//! relevant elements receive the plain optimizer
//! update only. This crate holds that math, on candle tensors (any device) and as fused CPU
//! kernels, and nothing else: no masks, optimizers or models (see `relprune-prune`).
//!
//! The rule is a reconstruction of Bonetta, Ribero & Cancelliere (2023) from its abstract and
//! the two methods it extends; every choice is a field of [`SelectiveDecay`].
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use relprune_core::SelectiveDecay;
//! # fn main() -> relprune_core::Result<()> {
//! let dev = Device::Cpu;
//! let w = Tensor::new(&[1.0f32, -2.0, 3.0, 4.0], &dev)?;
//! let g = Tensor::new(&[0.5f32, 0.01, -0.02, 1.0], &dev)?;
//! let reg = SelectiveDecay::default().with_lambda(0.1);
//! // |g| < 0.1 · max|g| = 0.1 marks elements 1 and 2 irrelevant.
//! let gate = reg.gate(&w, &g, None)?;
//! assert_eq!(gate.to_vec1::<f32>()?, vec![0.0, 1.0, 1.0, 0.0]);
//! // The decoupled step: w − lr·update − λ·m⊙w.
//! let w2 = reg.decoupled_step(&w, &g, 0.0, &gate)?;
//! assert_eq!(w2.to_vec1::<f32>()?, vec![1.0, -1.8, 2.7, 4.0]);
//! # Ok(()) }
//! ```

pub mod error;
pub mod kernel;
pub mod regularizer;
pub mod sensitivity;

pub use error::{Error, Result};
pub use kernel::SelectiveDecayOp;
pub use regularizer::{Gate, GateStat, Penalty, Relevance, SelectiveDecay};
pub use sensitivity::output_sensitivity;
