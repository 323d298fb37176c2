//! Saving and loading a model's parameters as safetensors, atomically and with clear errors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarMap;

use crate::{Error, Result};

/// Writes every variable of `varmap` to `path` (safetensors), through a temporary file and a rename
/// so that a crash never leaves a half-written checkpoint.
pub fn save(varmap: &VarMap, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    };
    save_tensors(&tensors, path)
}

/// Writes named tensors to `path` (safetensors) atomically.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    Ok(relprune_io::write_with(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp)
    })?)
}

/// Loads every variable of `varmap` (which must already hold the model's variables) from `path`.
///
/// A missing file, a corrupt file, a missing tensor or a shape or dtype mismatch is an error
/// naming the file and the tensor; on error no variable has been changed.
pub fn load(varmap: &VarMap, path: &Path) -> Result<()> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    if !path.exists() {
        return Err(err("no such file".into()));
    }
    let bytes =
        relprune_io::read_capped(path, u64::MAX).map_err(|e| err(format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut loaded = Vec::with_capacity(names.len());
    for name in names {
        let var = &data[name];
        let view = st
            .tensor(name)
            .map_err(|_| err(format!("missing tensor `{name}`")))?;
        let t = candle_core::safetensors::Load::load(&view, var.device())
            .map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        if t.dims() != var.dims() {
            return Err(err(format!(
                "tensor `{name}` has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            )));
        }
        if t.dtype() != var.dtype() {
            return Err(err(format!(
                "tensor `{name}` has dtype {:?}, the model expects {:?}",
                t.dtype(),
                var.dtype()
            )));
        }
        loaded.push((var, t));
    }
    for (var, t) in loaded {
        var.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lenet300;
    use candle_core::Device;

    fn weights(vm: &VarMap) -> Vec<f32> {
        vm.data().lock().unwrap()["fc2.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn save_then_load_restores_every_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let a = VarMap::new();
        Lenet300::new(&a, 1, &Device::Cpu).unwrap();
        save(&a, &path).unwrap();
        assert!(!dir.path().join("m.safetensors.tmp").exists());
        let b = VarMap::new();
        Lenet300::new(&b, 2, &Device::Cpu).unwrap();
        load(&b, &path).unwrap();
        assert_eq!(weights(&a), weights(&b));
    }

    #[test]
    fn truncated_missing_and_mismatched_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let a = VarMap::new();
        Lenet300::new(&a, 1, &Device::Cpu).unwrap();

        let e = load(&a, &path).unwrap_err().to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("no such file"),
            "{e}"
        );

        save(&a, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(&a, &path).unwrap_err().to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );

        let mut t = HashMap::new();
        t.insert(
            "fc1.weight".to_string(),
            Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        save_tensors(&t, &path).unwrap();
        let e = load(&a, &path).unwrap_err().to_string();
        assert!(e.contains("missing tensor `fc1.bias`"), "{e}");

        for (k, v) in a.data().lock().unwrap().iter() {
            t.insert(k.clone(), v.as_tensor().clone());
        }
        t.insert(
            "fc1.weight".to_string(),
            Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        save_tensors(&t, &path).unwrap();
        let before = weights(&a);
        let e = load(&a, &path).unwrap_err().to_string();
        assert!(e.contains("`fc1.weight` has shape [2, 2]"), "{e}");
        assert_eq!(before, weights(&a), "a failed load must change nothing");
    }
}
