//! Writing pruned checkpoints: dense safetensors (zeros in place) and a compact sparse format.
//!
//! The sparse format is a safetensors file in which every prunable f32 tensor `name` is replaced by
//! `name.values` (F32, the non-zeros in row-major order) plus their positions, in whichever of two
//! encodings is smaller for that tensor:
//! - `name.deltas` (U8): the gap from the previous stored position (the first from -1); a gap over
//!   255 is bridged by filler entries of gap 255 and value 0 (the relative indexing of Han et al.'s
//!   Deep Compression), best for very sparse tensors;
//! - `name.bitmap` (U8): one bit per element, least significant bit first, 1 = non-zero.
//!
//! Its shape is in the metadata under `shape.name`. Other tensors are stored as they are. All
//! files are written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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

/// Writes every parameter (pruned weights are exact `+0.0`) as a dense safetensors file.
pub fn save_dense(params: &ParamSet, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = params
        .tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, positive_zeros(&t)?)))
        .collect::<Result<_>>()?;
    Ok(relprune_io::write_with(path, |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
    })?)
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
            let shape = t
                .dims()
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",");
            meta.insert(format!("shape.{}", p.name), shape);
            let (bitmap, bitmap_values) = encode_bitmap(&v);
            let (deltas, delta_values) = encode_deltas(&v);
            let (key, index, values) =
                if deltas.len() + delta_values.len() < bitmap.len() + bitmap_values.len() {
                    ("deltas", deltas, delta_values)
                } else {
                    ("bitmap", bitmap, bitmap_values)
                };
            let n_index = index.len();
            buffers.insert(
                format!("{}.{key}", p.name),
                (safetensors::Dtype::U8, vec![n_index], index),
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
    Ok(relprune_io::write_with(path, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp)
    })?)
}

/// Bitmap (LSB first) and little-endian values of the non-zeros.
fn encode_bitmap(v: &[f32]) -> (Vec<u8>, Vec<u8>) {
    let mut bitmap = vec![0u8; v.len().div_ceil(8)];
    let mut values = Vec::new();
    for (i, &x) in v.iter().enumerate() {
        if x != 0.0 {
            bitmap[i / 8] |= 1 << (i % 8);
            values.extend_from_slice(&x.to_le_bytes());
        }
    }
    (bitmap, values)
}

/// 8-bit position gaps (with zero-valued fillers for gaps over 255) and the values they point at.
fn encode_deltas(v: &[f32]) -> (Vec<u8>, Vec<u8>) {
    let (mut deltas, mut values) = (Vec::new(), Vec::new());
    let mut last: i64 = -1;
    for (i, &x) in v.iter().enumerate() {
        if x == 0.0 {
            continue;
        }
        let mut gap = i as i64 - last;
        while gap > 255 {
            deltas.push(255u8);
            values.extend_from_slice(&0f32.to_le_bytes());
            gap -= 255;
        }
        deltas.push(gap as u8);
        values.extend_from_slice(&x.to_le_bytes());
        last = i as i64;
    }
    (deltas, values)
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
        let encoded = name
            .strip_suffix(".bitmap")
            .map(|b| (b, false))
            .or_else(|| name.strip_suffix(".deltas").map(|b| (b, true)));
        if let Some((base, is_delta)) = encoded {
            let shape: Vec<usize> = meta
                .get(&format!("shape.{base}"))
                .ok_or_else(|| file_err(path, format!("no shape for sparse tensor `{base}`")))?
                .split(',')
                .map(|d| d.parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| file_err(path, format!("bad shape of `{base}`: {e}")))?;
            let n: usize = shape.iter().product();
            let index = view.data();
            let values = st
                .tensor(&format!("{base}.values"))
                .map_err(|_| file_err(path, format!("missing `{base}.values`")))?;
            let vals: Vec<f32> = values
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let dense = if is_delta {
                decode_deltas(index, &vals, n)
            } else {
                decode_bitmap(index, &vals, n)
            }
            .map_err(|msg| file_err(path, format!("`{base}`: {msg}")))?;
            out.insert(base.to_string(), Tensor::from_vec(dense, shape, device)?);
        } else {
            let t = candle_core::safetensors::Load::load(&view, device)?;
            out.insert(name.to_string(), t);
        }
    }
    Ok(out)
}

fn decode_bitmap(bitmap: &[u8], vals: &[f32], n: usize) -> std::result::Result<Vec<f32>, String> {
    if bitmap.len() != n.div_ceil(8) {
        return Err(format!(
            "bitmap has {} bytes, expected {}",
            bitmap.len(),
            n.div_ceil(8)
        ));
    }
    let mut dense = vec![0f32; n];
    let mut k = 0;
    for (i, d) in dense.iter_mut().enumerate() {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            *d = *vals.get(k).ok_or("fewer values than bitmap bits")?;
            k += 1;
        }
    }
    if k != vals.len() {
        return Err(format!("{} values but {k} bitmap bits", vals.len()));
    }
    Ok(dense)
}

fn decode_deltas(deltas: &[u8], vals: &[f32], n: usize) -> std::result::Result<Vec<f32>, String> {
    if deltas.len() != vals.len() {
        return Err(format!("{} gaps but {} values", deltas.len(), vals.len()));
    }
    let mut dense = vec![0f32; n];
    let mut pos: i64 = -1;
    for (&d, &v) in deltas.iter().zip(vals) {
        pos += d as i64;
        let i =
            usize::try_from(pos).map_err(|_| "a zero gap before the first element".to_string())?;
        *dense
            .get_mut(i)
            .ok_or_else(|| format!("position {i} is past the end ({n} elements)"))? += v;
    }
    Ok(dense)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_encoding_round_trips_across_gaps_longer_than_255() {
        let mut v = vec![0f32; 2000];
        for (i, x) in [(0usize, 1.5f32), (1, -2.0), (300, 3.0), (1999, 4.0)] {
            v[i] = x;
        }
        let (d, vals) = encode_deltas(&v);
        let vals: Vec<f32> = vals
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // Gaps: 1, 1, 299 = 255 + 44, 1699 = 6·255 + 169 → 4 entries + 7 fillers.
        assert_eq!(d.len(), 11);
        assert_eq!(decode_deltas(&d, &vals, v.len()).unwrap(), v);
        assert!(decode_deltas(&d, &vals, 1000).is_err());
    }

    #[test]
    fn bitmap_encoding_round_trips_and_rejects_a_wrong_length() {
        let v: Vec<f32> = (0..37)
            .map(|i| if i % 3 == 0 { i as f32 } else { 0.0 })
            .collect();
        let (b, vals) = encode_bitmap(&v);
        let vals: Vec<f32> = vals
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decode_bitmap(&b, &vals, 37).unwrap(), v);
        assert!(decode_bitmap(&b, &vals, 80).is_err());
        assert!(decode_bitmap(&b, &vals[1..], 37).is_err());
    }
}
