//! Writing pruned checkpoints: dense safetensors (zeros in place) and a compact sparse format.
//!
//! The sparse format is a safetensors file in which every prunable f32 tensor `name` is replaced by
//! `name.bitmap` (U8, one bit per element, least significant bit first, 1 = non-zero) and
//! `name.values` (F32, the non-zeros in row-major order); its shape is in the metadata under
//! `shape.name`. Other tensors are stored as they are. All files are written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;

use crate::{Error, ParamSet, Result};

/// The `format` metadata value of the sparse format.
pub const SPARSE_FORMAT: &str = "relprune-sparse-v1";

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn persist(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| {
        file_err(
            path,
            format!("cannot move {} into place: {e}", tmp.display()),
        )
    })
}

/// Writes every parameter (pruned weights are exact zeros) as a dense safetensors file.
pub fn save_dense(params: &ParamSet, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = params.tensors().into_iter().collect();
    let tmp = tmp_path(path);
    candle_core::safetensors::save(&tensors, &tmp)
        .map_err(|e| file_err(path, format!("cannot write: {e}")))?;
    persist(&tmp, path)
}

/// Writes the parameters in the compact sparse format (prunable f32 tensors as bitmap + values).
pub fn save_sparse(params: &ParamSet, path: &Path) -> Result<()> {
    let mut buffers: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), SPARSE_FORMAT.to_string());
    for p in params.iter() {
        let t = p.var.as_tensor();
        if p.prunable && t.dtype() == DType::F32 {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let mut bitmap = vec![0u8; v.len().div_ceil(8)];
            let mut values = Vec::new();
            for (i, &x) in v.iter().enumerate() {
                if x != 0.0 {
                    bitmap[i / 8] |= 1 << (i % 8);
                    values.extend_from_slice(&x.to_le_bytes());
                }
            }
            let shape = t
                .dims()
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",");
            meta.insert(format!("shape.{}", p.name), shape);
            let n_bytes = bitmap.len();
            buffers.insert(
                format!("{}.bitmap", p.name),
                (safetensors::Dtype::U8, vec![n_bytes], bitmap),
            );
            let n_values = values.len() / 4;
            buffers.insert(
                format!("{}.values", p.name),
                (safetensors::Dtype::F32, vec![n_values], values),
            );
        } else {
            let t32 = t.to_dtype(DType::F32)?;
            let bytes: Vec<u8> = t32
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            buffers.insert(
                p.name.clone(),
                (safetensors::Dtype::F32, t.dims().to_vec(), bytes),
            );
        }
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(k, (dt, shape, data))| {
            TensorView::new(*dt, shape.clone(), data).map(|v| (k.clone(), v))
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| file_err(path, format!("cannot build tensor views: {e}")))?;
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| file_err(path, format!("cannot write: {e}")))?;
    persist(&tmp, path)
}

/// Reads a file written by [`save_sparse`] back into dense tensors by name.
pub fn load_sparse(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(SPARSE_FORMAT) {
        return Err(file_err(path, format!("not in the {SPARSE_FORMAT} format")));
    }
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if name.ends_with(".values") {
            continue;
        }
        if let Some(base) = name.strip_suffix(".bitmap") {
            let shape: Vec<usize> = meta
                .get(&format!("shape.{base}"))
                .ok_or_else(|| file_err(path, format!("no shape for sparse tensor `{base}`")))?
                .split(',')
                .map(|d| d.parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| file_err(path, format!("bad shape of `{base}`: {e}")))?;
            let n: usize = shape.iter().product();
            let bitmap = view.data();
            let values = st
                .tensor(&format!("{base}.values"))
                .map_err(|_| file_err(path, format!("missing `{base}.values`")))?;
            let vals: Vec<f32> = values
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if bitmap.len() != n.div_ceil(8) {
                return Err(file_err(
                    path,
                    format!(
                        "bitmap of `{base}` has {} bytes, expected {}",
                        bitmap.len(),
                        n.div_ceil(8)
                    ),
                ));
            }
            let mut dense = vec![0f32; n];
            let mut k = 0;
            for (i, d) in dense.iter_mut().enumerate() {
                if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                    *d = *vals.get(k).ok_or_else(|| {
                        file_err(path, format!("`{base}`: fewer values than bitmap bits"))
                    })?;
                    k += 1;
                }
            }
            if k != vals.len() {
                return Err(file_err(
                    path,
                    format!("`{base}`: {} values but {k} bitmap bits", vals.len()),
                ));
            }
            out.insert(base.to_string(), Tensor::from_vec(dense, shape, device)?);
        } else {
            let t = candle_core::safetensors::Load::load(&view, device)?;
            out.insert(name.to_string(), t);
        }
    }
    Ok(out)
}
