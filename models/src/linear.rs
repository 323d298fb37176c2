//! A linear layer that runs dense (trainable) or sparse (inference): how a pruned model stops
//! paying for its zeros. [`Lin::to_sparse`] turns a trained layer's weight into
//! `relprune_sparse`'s layout; every model of the zoo builds its linear layers from [`Lin`] and
//! offers a `to_sparse` of its own that swaps them all.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{Module, Tensor};
use candle_nn::Linear;
use relprune_sparse::{Csr, SparseLinear};

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

    /// The same layer over detached views of its weight and bias (same storage, so it follows
    /// later changes of the variables; no gradient reaches them through it).
    pub fn frozen(&self) -> Self {
        match self {
            Self::Dense(l) => Self::Dense(Linear::new(
                l.weight().detach(),
                l.bias().map(Tensor::detach),
            )),
            Self::Sparse(s) => Self::Sparse(s.clone()),
        }
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

    /// `relu(self.forward(x))`, as one fused op when dense (a training step's hot path).
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(l) => crate::ops::linear_relu(x, l.weight(), l.bias()),
            Self::Sparse(s) => s.forward(x)?.relu(),
        }
    }

    /// Whether the layer is stored sparse.
    pub fn is_sparse(&self) -> bool {
        matches!(self, Self::Sparse(_))
    }
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(l) => crate::ops::linear(x, l.weight(), l.bias()),
            Self::Sparse(s) => s.forward(x),
        }
    }
}

/// Linear-layer weights read straight from a compressed checkpoint into compressed rows, by
/// weight name: a model builder makes these layers sparse without a dense tensor ever existing
/// (loading a compressed model then takes about the memory of its file).
#[derive(Debug, Default)]
pub struct SparseRows(RefCell<HashMap<String, Csr>>);

impl SparseRows {
    /// Adds the rows of weight `name`.
    pub fn insert(&mut self, name: String, rows: Csr) {
        self.0.get_mut().insert(name, rows);
    }

    /// Whether weight `name` was read as rows.
    pub fn contains(&self, name: &str) -> bool {
        self.0.borrow().contains_key(name)
    }

    /// Checks that every weight read as rows went into a layer (one left over would be a
    /// tensor the model silently lacks).
    pub fn check_used(&self) -> Result<()> {
        let left = self.0.borrow();
        if left.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&String> = left.keys().collect();
        names.sort();
        Err(crate::Error::Config(format!(
            "weights read as sparse rows but used by no linear layer: {names:?}"
        )))
    }

    /// The layer of weight `name` and `bias`: sparse from its rows if it was read so (each
    /// weight's rows are used once), dense from `dense()` otherwise.
    pub fn lin(
        &self,
        name: &str,
        dense: impl FnOnce() -> Result<Tensor>,
        bias: Option<Tensor>,
    ) -> Result<Lin> {
        let Some(rows) = self.0.borrow_mut().remove(name) else {
            return Ok(Lin::new(dense()?, bias));
        };
        let bias = bias
            .map(|b| b.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        SparseLinear::from_rows(rows, bias)
            .map(Lin::Sparse)
            .map_err(|e| crate::Error::Config(format!("sparse layer `{name}`: {e}")))
    }
}
