//! Per-layer and total parameter / non-zero counts, and the ratios derived from them.

use std::path::Path;

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Parameter and non-zero counts of one tensor (or of a sum of tensors).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerStats {
    /// Tensor name, e.g. `fc1.weight`; `total` for the sum.
    pub name: String,
    /// Number of elements.
    pub params: usize,
    /// Number of elements different from zero (`-0.0` counts as zero).
    pub nonzero: usize,
}

impl LayerStats {
    /// Percentage of elements left non-zero (0 for an empty tensor).
    pub fn remaining_pct(&self) -> f64 {
        if self.params == 0 {
            return 0.0;
        }
        100.0 * self.nonzero as f64 / self.params as f64
    }

    /// Percentage of elements that are zero (100 − remaining; 0 for an empty tensor).
    pub fn sparsity_pct(&self) -> f64 {
        if self.params == 0 {
            return 0.0;
        }
        100.0 - self.remaining_pct()
    }

    /// Compression ratio params / nonzero; `f64::INFINITY` when nothing is left.
    pub fn compression(&self) -> f64 {
        if self.nonzero == 0 {
            return f64::INFINITY;
        }
        self.params as f64 / self.nonzero as f64
    }
}

/// Stats of a set of named tensors, in the order they were given.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SparsityReport {
    /// One entry per tensor.
    pub layers: Vec<LayerStats>,
}

/// Sums per-tensor counts into named groups (e.g. layer types); a tensor may count in several.
pub fn sum_by_group<G: IntoIterator<Item = &'static str>>(
    layers: &[LayerStats],
    groups_of: impl Fn(&str) -> G,
) -> std::collections::BTreeMap<&'static str, LayerStats> {
    let mut out = std::collections::BTreeMap::new();
    for l in layers {
        for group in groups_of(&l.name) {
            let e = out.entry(group).or_insert_with(|| LayerStats {
                name: group.into(),
                params: 0,
                nonzero: 0,
            });
            e.params += l.params;
            e.nonzero += l.nonzero;
        }
    }
    out
}

impl SparsityReport {
    /// Counts elements and non-zeros of each named tensor (any dtype, any device).
    pub fn from_tensors<'a>(
        named: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    ) -> Result<Self> {
        let layers = named
            .into_iter()
            .map(|(name, t)| {
                Ok(LayerStats {
                    name: name.to_string(),
                    params: t.elem_count(),
                    nonzero: count_nonzero(t)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Counts the non-zeros of the named tensors of a safetensors file (memory-mapped); a missing name is an error naming the file and tensor.
    pub fn from_safetensors(path: &Path, names: &[String]) -> Result<Self> {
        let st_err = |msg: String| Error::Safetensors {
            path: path.to_path_buf(),
            msg,
        };
        // SAFETY: the map is only read while `st` lives, inside this function; the model files
        // this reads are written atomically (temp file + rename), so no writer truncates them
        // under us.
        let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| st_err(e.to_string()))?;
        let mut layers = Vec::with_capacity(names.len());
        for name in names {
            let view = st
                .get(name)
                .map_err(|_| st_err(format!("no tensor named {name:?}")))?;
            let t = view
                .load(&Device::Cpu)
                .map_err(|e| st_err(format!("tensor {name:?}: {e}")))?;
            layers.push(LayerStats {
                name: name.clone(),
                params: t.elem_count(),
                nonzero: count_nonzero(&t)?,
            });
        }
        Ok(Self { layers })
    }

    /// The sum over all layers, named `total`.
    pub fn total(&self) -> LayerStats {
        LayerStats {
            name: "total".to_string(),
            params: self.layers.iter().map(|l| l.params).sum(),
            nonzero: self.layers.iter().map(|l| l.nonzero).sum(),
        }
    }
}

/// Non-zero elements of a tensor, computed by candle (`ne(0)` then a sum) rather than a Rust loop.
fn count_nonzero(t: &Tensor) -> Result<usize> {
    if t.elem_count() == 0 {
        return Ok(0);
    }
    // IEEE comparison treats -0.0 as equal to 0.0, which is what "pruned" means. The mask is
    // summed as i64 because a u8 sum would wrap and u32 could overflow on huge embeddings.
    let n = t
        .ne(0.0)?
        .to_dtype(DType::I64)?
        .sum_all()?
        .to_scalar::<i64>()?;
    usize::try_from(n).map_err(|_| Error::Invalid(format!("negative non-zero count {n}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cpu(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn from_tensors_counts_zeros_including_negative_zero() {
        let a = cpu(&[0.0, -0.0, 1.0, -2.0, 0.0, 3.0])
            .reshape((2, 3))
            .unwrap();
        let b = cpu(&[0.0, 0.0, 0.0, 0.5]);
        let r = SparsityReport::from_tensors([("a", &a), ("b", &b)]).unwrap();
        assert_eq!(
            r.layers,
            vec![
                LayerStats {
                    name: "a".into(),
                    params: 6,
                    nonzero: 3
                },
                LayerStats {
                    name: "b".into(),
                    params: 4,
                    nonzero: 1
                },
            ]
        );
        assert_eq!(r.layers[0].remaining_pct(), 50.0);
        assert_eq!(r.layers[1].sparsity_pct(), 75.0);
        assert_eq!(r.layers[1].compression(), 4.0);
    }

    #[test]
    fn from_tensors_works_for_half_and_double_dtypes() {
        let a = cpu(&[0.0, -0.0, 1e-3, 0.0]);
        for dt in [DType::F16, DType::BF16, DType::F64] {
            let t = a.to_dtype(dt).unwrap();
            let r = SparsityReport::from_tensors([("a", &t)]).unwrap();
            assert_eq!(r.layers[0].nonzero, 1, "{dt:?}");
        }
    }

    #[test]
    fn total_sums_layers_and_compression_is_params_over_nonzero() {
        let a = Tensor::zeros(100, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::ones(10, DType::F32, &Device::Cpu).unwrap();
        let r = SparsityReport::from_tensors([("a", &a), ("b", &b)]).unwrap();
        let t = r.total();
        assert_eq!(
            t,
            LayerStats {
                name: "total".into(),
                params: 110,
                nonzero: 10
            }
        );
        assert_eq!(t.compression(), 11.0);
        assert!((t.remaining_pct() - 100.0 / 11.0).abs() < 1e-12);
        assert_eq!(r.layers[0].compression(), f64::INFINITY);
        assert_eq!(r.layers[1].compression(), 1.0);
    }

    #[test]
    fn empty_layer_ratios_do_not_divide_by_zero() {
        let l = LayerStats {
            name: "e".into(),
            params: 0,
            nonzero: 0,
        };
        assert_eq!(l.remaining_pct(), 0.0);
        assert_eq!(l.sparsity_pct(), 0.0);
        assert_eq!(l.compression(), f64::INFINITY);
    }

    fn save_model(dir: &Path) -> std::path::PathBuf {
        let mut m = HashMap::new();
        m.insert(
            "fc1.weight",
            cpu(&[0.0, 1.0, 0.0, -0.0, 2.0, 0.0])
                .reshape((3, 2))
                .unwrap(),
        );
        m.insert("fc1.bias", cpu(&[1.0, 1.0, 1.0]));
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&m, &path).unwrap();
        path
    }

    #[test]
    fn from_safetensors_counts_named_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = save_model(dir.path());
        let r = SparsityReport::from_safetensors(&path, &["fc1.weight".to_string()]).unwrap();
        assert_eq!(
            r.layers,
            vec![LayerStats {
                name: "fc1.weight".into(),
                params: 6,
                nonzero: 2
            }]
        );
    }

    #[test]
    fn from_safetensors_missing_tensor_names_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = save_model(dir.path());
        let err = SparsityReport::from_safetensors(&path, &["fc9.weight".to_string()]).unwrap_err();
        assert!(matches!(err, Error::Safetensors { .. }));
        let msg = err.to_string();
        assert!(msg.contains("model.safetensors"), "{msg}");
        assert!(msg.contains("fc9.weight"), "{msg}");
    }

    #[test]
    fn from_safetensors_truncated_file_error_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = save_model(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
        let err = SparsityReport::from_safetensors(&cut, &["fc1.weight".to_string()]).unwrap_err();
        assert!(matches!(err, Error::Safetensors { .. }));
        assert!(err.to_string().contains("cut.safetensors"), "{err}");
        let missing = dir.path().join("absent.safetensors");
        let err = SparsityReport::from_safetensors(&missing, &[]).unwrap_err();
        assert!(err.to_string().contains("absent.safetensors"), "{err}");
    }
}
