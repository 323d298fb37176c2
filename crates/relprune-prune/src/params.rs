//! The model's parameters by name: which are prunable, and snapshots of their values.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Result};

/// Which parameters the regularizer and the masks cover.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    /// A parameter is a candidate when its name ends with one of these (default: `weight`).
    pub suffixes: Vec<String>,
    /// Minimum rank of a candidate: 2 keeps matrices and kernels, drops norm scales and biases.
    pub min_rank: usize,
    /// Parameters whose name contains any of these are never pruned.
    pub exclude: Vec<String>,
}

impl Default for Selection {
    fn default() -> Self {
        Self {
            suffixes: vec!["weight".into()],
            min_rank: 2,
            exclude: vec![],
        }
    }
}

impl Selection {
    /// Whether a parameter of this name and shape is pruned.
    pub fn is_prunable(&self, name: &str, dims: &[usize]) -> bool {
        dims.len() >= self.min_rank
            && self.suffixes.iter().any(|s| name.ends_with(s.as_str()))
            && !self.exclude.iter().any(|e| name.contains(e.as_str()))
    }
}

/// One named parameter.
#[derive(Clone, Debug)]
pub struct Param {
    /// Its name in the checkpoint.
    pub name: String,
    /// The variable, shared with the model.
    pub var: Var,
    /// Whether masks and the regularizer apply to it.
    pub prunable: bool,
}

/// The parameters of a model in name order (deterministic, unlike `VarMap::all_vars`).
#[derive(Clone, Debug)]
pub struct ParamSet {
    params: Vec<Param>,
}

/// Copies of every parameter's values, by name.
#[derive(Clone, Debug)]
pub struct Snapshot(pub BTreeMap<String, Tensor>);

impl ParamSet {
    /// Collects the variables of `varmap`, marking prunable ones by `selection`.
    pub fn from_varmap(varmap: &VarMap, selection: &Selection) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("VarMap lock poisoned".into()))?;
        let mut params: Vec<Param> = data
            .iter()
            .map(|(name, var)| Param {
                name: name.clone(),
                var: var.clone(),
                prunable: selection.is_prunable(name, var.dims()),
            })
            .collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        if !params.iter().any(|p| p.prunable) {
            return Err(Error::Config(
                "no parameter matches the prunable selection".into(),
            ));
        }
        Ok(Self { params })
    }

    /// Every parameter, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    /// The prunable parameters, in name order.
    pub fn prunable(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.prunable)
    }

    /// Number of elements of the prunable parameters.
    pub fn prunable_elems(&self) -> usize {
        self.prunable().map(|p| p.var.elem_count()).sum()
    }

    /// A copy of every parameter's current values.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut m = BTreeMap::new();
        for p in &self.params {
            m.insert(p.name.clone(), p.var.as_tensor().copy()?);
        }
        Ok(Snapshot(m))
    }

    /// Sets every parameter to its value in `snap`.
    pub fn restore(&self, snap: &Snapshot) -> Result<()> {
        for p in &self.params {
            let t = snap.0.get(&p.name).ok_or_else(|| Error::Param {
                name: p.name.clone(),
                msg: "missing from the snapshot".into(),
            })?;
            p.var.set(t)?;
        }
        Ok(())
    }

    /// The current values of the parameters, by name (sharing storage with the variables).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_selection_prunes_weight_matrices_only() {
        let s = Selection::default();
        assert!(s.is_prunable("fc1.weight", &[300, 784]));
        assert!(s.is_prunable("conv1.weight", &[20, 1, 5, 5]));
        assert!(!s.is_prunable("fc1.bias", &[300]));
        assert!(!s.is_prunable("ln.weight", &[300]));
        let s = Selection {
            exclude: vec!["fc3".into()],
            ..Default::default()
        };
        assert!(!s.is_prunable("fc3.weight", &[10, 100]));
    }
}
