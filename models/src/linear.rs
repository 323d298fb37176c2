//! A linear layer that runs dense (trainable) or sparse (inference): how a pruned model stops
//! paying for its zeros. [`Lin::to_sparse`] turns a trained layer's weight into
//! `relprune_sparse`'s layout; every model of the zoo builds its linear layers from [`Lin`] and
//! offers a `to_sparse` of its own that swaps them all.

use candle_core::{Module, Tensor};
use candle_nn::Linear;
use relprune_sparse::SparseLinear;

use crate::Result;

/// A linear layer `y = x·Wᵀ + b`, dense or sparse.
#[derive(Clone, Debug)]
pub enum Lin {
    /// candle's layer over the model's variables (trainable).
    Dense(Linear),
    /// The weight without its zeros (inference only), run sparse or dense, whichever the
    /// measured crossover table says is faster for the batch.
    Sparse(SparseLinear),
}

impl From<Linear> for Lin {
    fn from(l: Linear) -> Self {
        Self::Dense(l)
    }
}

impl Lin {
    /// A dense layer of `weight` `(out, in)` and an optional bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Dense(Linear::new(weight, bias))
    }

    /// The same layer with its weight stored sparse (a sparse layer stays as it is).
    pub fn to_sparse(&self) -> Result<Self> {
        Ok(match self {
            Self::Dense(l) => Self::Sparse(
                SparseLinear::from_dense(l.weight(), l.bias())
                    .map_err(|e| crate::Error::Config(format!("sparse layer: {e}")))?,
            ),
            Self::Sparse(s) => Self::Sparse(s.clone()),
        })
    }

    /// Whether the layer is stored sparse.
    pub fn is_sparse(&self) -> bool {
        matches!(self, Self::Sparse(_))
    }
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(x),
            Self::Sparse(s) => s.forward(x),
        }
    }
}
