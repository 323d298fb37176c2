//! Writing pruned checkpoints: dense safetensors (zeros in place) and a compact sparse file.
//!
//! The sparse file is the dense one in `relprune-sparse`'s `relprune-sparse-v1` encoding
//! ([`relprune_sparse::file`]): every prunable tensor `name` becomes `name.values` (its non-zeros)
//! plus `name.bitmap` (one bit per element) or `name.deltas` (8-bit gaps, Deep Compression's
//! relative indexing), whichever is smaller; decompressing it gives the dense file back byte for
//! byte. All files are written atomically.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use relprune_sparse::file::{self, Format, Raw};

use crate::{Error, ParamSet, Result};

/// The `format` metadata value of the sparse format.
pub const SPARSE_FORMAT: &str = file::RELPRUNE_FORMAT;

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// `-0.0 → +0.0` in an f32 tensor: a masked negative weight becomes `-0.0`, which is zero to every
/// reader but another bit pattern to gzip and bzip2 (an L1 run left 120k of them in LeNet-300).
fn positive_zeros(t: &Tensor) -> Result<Tensor> {
    if t.dtype() != DType::F32 {
        return Ok(t.clone());
    }
    let v: Vec<f32> = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| if x == 0.0 { 0.0 } else { x })
        .collect();
    Ok(Tensor::from_vec(v, t.shape(), t.device())?)
}

/// The parameters (`-0.0` made `+0.0`) as stored tensors by name.
fn stored(params: &ParamSet) -> Result<BTreeMap<String, Raw>> {
    params
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            if t.dtype() != DType::F32 {
                return Err(Error::Config(format!(
                    "parameter `{name}` is {:?}; checkpoints hold f32 parameters",
                    t.dtype()
                )));
            }
            let data = positive_zeros(&t)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            let shape = t.dims().to_vec();
            let dtype = safetensors::Dtype::F32;
            Ok((name, Raw { dtype, shape, data }))
        })
        .collect()
}

fn sparse_err(e: relprune_sparse::Error) -> Error {
    Error::Config(e.to_string())
}

/// The dense safetensors file of the parameters.
fn dense_bytes(params: &ParamSet) -> Result<Vec<u8>> {
    file::serialize(&stored(params)?, &HashMap::new()).map_err(sparse_err)
}

/// Writes every parameter (pruned weights are exact `+0.0`) as a dense safetensors file.
pub fn save_dense(params: &ParamSet, path: &Path) -> Result<()> {
    let bytes = dense_bytes(params)?;
    Ok(relprune_io::write_with(path, |tmp| {
        std::fs::write(tmp, &bytes)
    })?)
}

/// Writes the parameters in the compact sparse format (prunable tensors without their zeros).
pub fn save_sparse(params: &ParamSet, path: &Path) -> Result<()> {
    let prunable: HashSet<&str> = params
        .iter()
        .filter(|p| p.prunable)
        .map(|p| p.name.as_str())
        .collect();
    let dense = dense_bytes(params)?;
    let c = file::compress(&dense, Format::RelpruneSparse, |name, _| {
        prunable.contains(name)
    })
    .map_err(sparse_err)?;
    let bytes = file::serialize(&c.tensors, &c.metadata).map_err(sparse_err)?;
    Ok(relprune_io::write_with(path, |tmp| {
        std::fs::write(tmp, &bytes)
    })?)
}

/// Reads a file written by [`save_sparse`] back into dense tensors by name.
pub fn load_sparse(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = relprune_io::read_capped(path, u64::MAX)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let format = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(file::FORMAT_KEY).cloned());
    if format.as_deref() != Some(SPARSE_FORMAT) {
        return Err(file_err(path, format!("not in the {SPARSE_FORMAT} format")));
    }
    let (tensors, _) = file::decompress(&bytes).map_err(|e| file_err(path, e.to_string()))?;
    tensors
        .into_iter()
        .map(|(name, raw)| {
            let view =
                safetensors::tensor::TensorView::new(raw.dtype, raw.shape.clone(), &raw.data)
                    .map_err(|e| file_err(path, format!("`{name}`: {e}")))?;
            Ok((name, candle_core::safetensors::Load::load(&view, device)?))
        })
        .collect()
}
