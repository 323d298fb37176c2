//! Writing a trained model back in the layout its checkpoint was read from, so that Hugging Face
//! libraries load it exactly as they loaded the input.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use serde_json::Value;

use super::Architecture;
use crate::{Error, Result};

/// What [`save_like_input`] wrote.
#[derive(Debug, Default)]
pub struct Written {
    /// Stored tensor name → the variable written there.
    pub trained: BTreeMap<String, String>,
    /// Input tensors the model does not use, copied unchanged.
    pub copied: Vec<String>,
}

/// One tensor of the output file: a trained variable (in the input's dtype) or an input tensor
/// copied byte for byte.
enum OutTensor<'a> {
    Trained(Tensor),
    Copied(safetensors::tensor::TensorView<'a>),
}

impl safetensors::View for OutTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Self::Trained(t) => safetensors::View::dtype(t),
            Self::Copied(v) => v.dtype(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Self::Trained(t) => t.dims(),
            Self::Copied(v) => v.shape(),
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Self::Trained(t) => safetensors::View::data(t),
            Self::Copied(v) => std::borrow::Cow::Borrowed(v.data()),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Self::Trained(t) => safetensors::View::data_len(t),
            Self::Copied(v) => v.data().len(),
        }
    }
}

/// Writes `out` (atomically) with the variables of `varmap` named `names`, in f32 (pruned
/// weights as `+0.0`): a model read from something other than safetensors (a GGUF file) saved
/// as Hugging Face stores it.
pub fn save_variables(varmap: &VarMap, names: &[String], out: &Path) -> Result<()> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?
        .clone();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = vars
            .get(name)
            .ok_or_else(|| Error::Config(format!("the model has no variable `{name}` to save")))?
            .as_tensor();
        let zero = t.zeros_like()?;
        let t = t.ne(0.0)?.where_cond(t, &zero)?.to_dtype(DType::F32)?;
        tensors.push((name.clone(), OutTensor::Trained(t)));
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    relprune_io::write_with(out, |tmp| {
        safetensors::serialize_to_file(tensors, metadata, tmp)
    })?;
    Ok(())
}

/// Writes `out` (atomically) with exactly the tensors of `input` (names, shapes, dtypes, header
/// metadata): each tensor the model holds as a variable of `varmap` (found through `arch`'s
/// stored-name rules) gets its trained value in the stored dtype, pruned weights as `+0.0`; any
/// other tensor is copied byte for byte.
pub fn save_like_input(
    input: &Path,
    out: &Path,
    varmap: &VarMap,
    arch: &Architecture,
) -> Result<Written> {
    let err = |msg: String| Error::Checkpoint {
        path: input.to_path_buf(),
        msg,
    };
    // SAFETY: read-only map of the input, which this process does not write; only read while
    // this function runs.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(input) }
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?
        .clone();
    let mut written = Written::default();
    let mut tensors: Vec<(String, OutTensor)> = Vec::new();
    let mut names = st.tensors();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in names {
        let var = (arch.variable_names)(&name)
            .into_iter()
            .find(|c| vars.contains_key(c));
        let Some(var) = var else {
            written.copied.push(name.clone());
            tensors.push((name, OutTensor::Copied(view)));
            continue;
        };
        let t = vars[&var].as_tensor();
        if t.dims() != view.shape() {
            return Err(err(format!(
                "tensor `{name}`: the model's variable `{var}` has shape {:?}, the file {:?}",
                t.dims(),
                view.shape()
            )));
        }
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            other => return Err(err(format!("tensor `{name}`: dtype {other:?}"))),
        };
        // `w·0` of a negative weight is `-0.0`: store `+0.0`, as the engine's export does.
        let zero = t.zeros_like()?;
        let t = t.ne(0.0)?.where_cond(t, &zero)?.to_dtype(dtype)?;
        written.trained.insert(name.clone(), var);
        tensors.push((name, OutTensor::Trained(t)));
    }
    let metadata = header_metadata(input)?;
    relprune_io::write_with(out, |tmp| {
        safetensors::serialize_to_file(tensors, metadata, tmp)
    })?;
    Ok(written)
}

/// Largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The safetensors header metadata (`__metadata__`) of `path`, read without loading tensors.
pub fn header_metadata(path: &Path) -> Result<Option<HashMap<String, String>>> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| err("truncated safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n >= MAX_HEADER {
        return Err(err(format!("safetensors header of {n} bytes")));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .map_err(|_| err("truncated safetensors header".into()))?;
    let v: Value = serde_json::from_slice(&buf)
        .map_err(|e| err(format!("the safetensors header is not JSON: {e}")))?;
    Ok(v.get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok()))
}

/// Whether every tensor of a safetensors file is stored in f32 or an integer type (no half
/// precision): then a model written back holds exactly the values it trained.
pub fn stores_full_precision(path: &Path) -> Result<bool> {
    // SAFETY: read-only map, only read within this function.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
        Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file: {e}"),
        }
    })?;
    Ok(st.tensors().iter().all(|(_, v)| {
        !matches!(
            v.dtype(),
            safetensors::Dtype::F16 | safetensors::Dtype::BF16
        )
    }))
}
