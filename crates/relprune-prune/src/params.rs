//! The model's parameters by name: which are prunable, and snapshots of their values.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Result};

/// Which parameters the regularizer and the masks cover.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    /// A parameter is a candidate when its name matches one of these patterns (`*` matches any
    /// run of characters; default `*weight`: linear, conv, embedding and attention projections).
    pub include: Vec<String>,
    /// Minimum rank of a candidate: 2 keeps matrices and kernels, drops norm scales and biases.
    pub min_rank: usize,
    /// Parameters whose name matches any of these patterns are never pruned.
    pub exclude: Vec<String>,
    /// Parameters whose name matches any of these patterns are not trained at all: they stay
    /// out of the `ParamSet`, so they have no optimizer state, no snapshots and no checkpoint
    /// copies (the model should stop gradients into them too, e.g. by detaching its tensors).
    #[serde(default)]
    pub frozen: Vec<String>,
}

impl Default for Selection {
    fn default() -> Self {
        Self {
            include: vec!["*weight".into()],
            min_rank: 2,
            exclude: vec![],
            frozen: vec![],
        }
    }
}

impl Selection {
    /// Whether a parameter of this name and shape is pruned.
    pub fn is_prunable(&self, name: &str, dims: &[usize]) -> bool {
        dims.len() >= self.min_rank
            && self.include.iter().any(|p| glob_match(p, name))
            && !self.exclude.iter().any(|p| glob_match(p, name))
            && !self.is_frozen(name)
    }

    /// Whether a parameter of this name is left out of training.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen.iter().any(|p| glob_match(p, name))
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (also none).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
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
    /// Other names of the same variable (tied weights), which are counted and updated once.
    pub aliases: Vec<String>,
}

/// The parameters of a model in name order (deterministic, unlike `VarMap::all_vars`).
#[derive(Clone, Debug)]
pub struct ParamSet {
    params: Vec<Param>,
}

/// Copies of every parameter's values, by name.
#[derive(Clone, Debug, Default)]
pub struct Snapshot(pub BTreeMap<String, Tensor>);

impl ParamSet {
    /// Collects the variables of `varmap`, marking prunable ones by `selection`.
    pub fn from_varmap(varmap: &VarMap, selection: &Selection) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("VarMap lock poisoned".into()))?;
        let mut named: Vec<(&String, &Var)> = data.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let mut params: Vec<Param> = Vec::new();
        let mut seen: std::collections::HashMap<candle_core::TensorId, usize> = Default::default();
        for (name, var) in named {
            if selection.is_frozen(name) {
                continue;
            }
            // Tied weights: one variable under several names is one parameter (the first name).
            if let Some(&i) = seen.get(&var.as_tensor().id()) {
                params[i].aliases.push(name.clone());
                continue;
            }
            seen.insert(var.as_tensor().id(), params.len());
            params.push(Param {
                name: name.clone(),
                var: var.clone(),
                prunable: selection.is_prunable(name, var.dims()),
                aliases: Vec::new(),
            });
        }
        Self::from_params(params)
    }

    /// A set of the given parameters (e.g. one layer's, for layer-by-layer training).
    pub fn from_params(mut params: Vec<Param>) -> Result<Self> {
        if !params.iter().any(|p| p.prunable) {
            return Err(Error::Config(
                "no parameter matches the prunable selection".into(),
            ));
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
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

    /// Overwrites `snap` with the current values, replacing one tensor at a time so that no more
    /// than one parameter's worth of memory is held twice (unlike `*snap = self.snapshot()?`).
    pub fn snapshot_into(&self, snap: &mut Snapshot) -> Result<()> {
        snap.0
            .retain(|name, _| self.params.iter().any(|p| &p.name == name));
        for p in &self.params {
            snap.0.remove(&p.name);
            snap.0.insert(p.name.clone(), p.var.as_tensor().copy()?);
        }
        Ok(())
    }

    /// Sets every parameter to its value in `snap`.
    pub fn restore(&self, snap: &Snapshot) -> Result<()> {
        for p in &self.params {
            let t = snap.0.get(&p.name).ok_or_else(|| Error::Param {
                name: p.name.clone(),
                msg: "missing from the snapshot".into(),
            })?;
            if t.dims() != p.var.dims() {
                return Err(Error::Param {
                    name: p.name.clone(),
                    msg: format!(
                        "the snapshot holds shape {:?}, the model {:?}",
                        t.dims(),
                        p.var.dims()
                    ),
                });
            }
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
    use candle_core::DType;

    #[test]
    fn default_selection_prunes_weight_matrices_only() {
        let s = Selection::default();
        assert!(s.is_prunable("fc1.weight", &[300, 784]));
        assert!(s.is_prunable("conv1.weight", &[20, 1, 5, 5]));
        assert!(!s.is_prunable("fc1.bias", &[300]));
        assert!(!s.is_prunable("ln.weight", &[300]));
        let s = Selection {
            exclude: vec!["fc3.*".into()],
            ..Default::default()
        };
        assert!(!s.is_prunable("fc3.weight", &[10, 100]));
        assert!(s.is_prunable("fc2.weight", &[10, 100]));
    }

    #[test]
    fn glob_patterns_match_like_shell_wildcards() {
        assert!(glob_match("*weight", "encoder.layers.0.fc1.weight"));
        assert!(glob_match(
            "encoder.*.q_proj.*",
            "encoder.layers.3.q_proj.weight"
        ));
        assert!(!glob_match(
            "encoder.*.q_proj.*",
            "decoder.layers.3.q_proj.weight"
        ));
        assert!(glob_match("fc1.weight", "fc1.weight"));
        assert!(!glob_match("fc1.weight", "fc1.weight2"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn a_tied_variable_is_one_parameter_with_aliases() {
        let vm = VarMap::new();
        let w = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &candle_core::Device::Cpu).unwrap();
        {
            let mut d = vm.data().lock().unwrap();
            d.insert("shared.weight".into(), w.clone());
            d.insert("lm_head.weight".into(), w);
        }
        let ps = ParamSet::from_varmap(&vm, &Selection::default()).unwrap();
        let all: Vec<_> = ps
            .iter()
            .map(|p| (p.name.clone(), p.aliases.clone()))
            .collect();
        assert_eq!(
            all,
            vec![(
                "lm_head.weight".to_string(),
                vec!["shared.weight".to_string()]
            )]
        );
        assert_eq!(ps.prunable_elems(), 4);
    }

    #[test]
    fn frozen_parameters_stay_out_of_the_set_and_are_never_prunable() {
        let vm = VarMap::new();
        let dev = candle_core::Device::Cpu;
        {
            let mut d = vm.data().lock().unwrap();
            d.insert(
                "emb.weight".into(),
                Var::zeros((5, 2), DType::F32, &dev).unwrap(),
            );
            d.insert(
                "fc.weight".into(),
                Var::zeros((2, 2), DType::F32, &dev).unwrap(),
            );
        }
        let s = Selection {
            frozen: vec!["emb.*".into()],
            ..Default::default()
        };
        assert!(!s.is_prunable("emb.weight", &[5, 2]));
        let ps = ParamSet::from_varmap(&vm, &s).unwrap();
        let names: Vec<_> = ps.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["fc.weight"]);
        assert_eq!(ps.snapshot().unwrap().0.len(), 1);
    }

    #[test]
    fn snapshot_into_equals_a_fresh_snapshot() {
        let vm = VarMap::new();
        let dev = candle_core::Device::Cpu;
        let w = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        vm.data()
            .lock()
            .unwrap()
            .insert("fc.weight".into(), w.clone());
        let ps = ParamSet::from_varmap(&vm, &Selection::default()).unwrap();
        let mut snap = ps.snapshot().unwrap();
        snap.0.insert(
            "gone.weight".into(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        w.set(&Tensor::new(&[[5.0f32, 6.0], [7.0, 8.0]], &dev).unwrap())
            .unwrap();
        ps.snapshot_into(&mut snap).unwrap();
        assert_eq!(snap.0.len(), 1);
        assert_eq!(
            snap.0["fc.weight"].to_vec2::<f32>().unwrap(),
            [[5.0, 6.0], [7.0, 8.0]]
        );
        // A copy, not the variable's storage.
        w.set(&Tensor::zeros((2, 2), DType::F32, &dev).unwrap())
            .unwrap();
        assert_eq!(snap.0["fc.weight"].to_vec2::<f32>().unwrap()[0], [5.0, 6.0]);
    }

    #[test]
    fn restore_names_a_parameter_of_the_wrong_shape() {
        let vm = VarMap::new();
        let dev = candle_core::Device::Cpu;
        let w = Var::zeros((2, 2), DType::F32, &dev).unwrap();
        vm.data().lock().unwrap().insert("fc.weight".into(), w);
        let ps = ParamSet::from_varmap(&vm, &Selection::default()).unwrap();
        let mut snap = Snapshot(BTreeMap::new());
        snap.0.insert(
            "fc.weight".into(),
            Tensor::zeros((3, 2), DType::F32, &dev).unwrap(),
        );
        let err = ps.restore(&snap).unwrap_err().to_string();
        assert!(err.contains("fc.weight") && err.contains("[3, 2]"), "{err}");
    }
}
