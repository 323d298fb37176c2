//! Reading a checkpoint's `model.safetensors` by tensor name, the way every architecture's
//! loader needs it: as f32, with its shape checked against the configuration, tied tensors found
//! under any of their aliases, and every error naming the file and the tensor. Compressed files
//! (`sparse-bitmask`, `relprune-sparse`; see [`relprune_sparse::file`]) are read as the dense
//! tensors they hold, each decompressed when it is asked for.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use relprune_sparse::file::{self, Raw, Stored};
use relprune_sparse::format::Csr;

use super::Layers;
use crate::linear::SparseRows;
use crate::{Error, Result};

/// The stored names that may hold a tied embedding, the canonical one first and the language-model
/// head's last: all of `aliases`, or all but the head when the head is a tensor of its own.
pub fn tied_names(aliases: &'static [&'static str], head_tied: bool) -> &'static [&'static str] {
    if head_tied {
        aliases
    } else {
        &aliases[..aliases.len() - 1]
    }
}

/// The variables a tensor stored as `name` may be: its own name, and the tied embedding
/// (`aliases[0]`) when `name` is one of its other `aliases`.
pub fn variable_names_with(aliases: &[&str], name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    if aliases[1..].contains(&name) {
        out.push(aliases[0].to_string());
    }
    out
}

/// The tensors of one safetensors file (memory-mapped; each tensor is copied out, or
/// decompressed, when read).
pub struct Weights {
    path: PathBuf,
    st: candle_core::safetensors::MmapedSafetensors,
    /// The dense tensors the file holds, by name, and how each is stored.
    stored: BTreeMap<String, Stored>,
}

impl Weights {
    /// Opens `path`; a missing or malformed file is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        if !path.is_file() {
            return Err(err(
                "no such file (only model.safetensors checkpoints are read)".into(),
            ));
        }
        // SAFETY: the map is only read while this value lives, and every tensor is copied out of
        // it into its own storage; the remaining risk, another process truncating the file
        // meanwhile, is the one every mmap-based loader (transformers' included) accepts.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
            .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
        let names: Vec<String> = st.tensors().into_iter().map(|(name, _)| name).collect();
        let metadata = super::save::header_metadata(path)?.unwrap_or_default();
        let (stored, _) = file::index(&names, &metadata).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            st,
            stored,
        })
    }

    /// Whether some tensor of the file is stored compressed.
    pub fn is_compressed(&self) -> bool {
        self.stored.values().any(|s| *s != Stored::Dense)
    }

    /// An error about this file.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::Checkpoint {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// Whether the file holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.stored.contains_key(name)
    }

    /// The tensor `name` as f32 on `device`, if the file holds it; integer tensors are errors.
    pub fn get(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(how) = self.stored.get(name) else {
            return Ok(None);
        };
        let tensor_err = |e: &dyn std::fmt::Display| self.error(format!("tensor `{name}`: {e}"));
        let t = match how {
            Stored::Dense => self.st.load(name, device).map_err(|e| tensor_err(&e))?,
            compressed => {
                let fetch = |part: &str| self.st.get(part).ok().map(|v| Raw::of(&v));
                let raw =
                    file::decode(name, compressed, fetch).map_err(|e| self.error(e.to_string()))?;
                let view = safetensors::tensor::TensorView::new(raw.dtype, raw.shape, &raw.data)
                    .map_err(|e| tensor_err(&e))?;
                candle_core::safetensors::Load::load(&view, device).map_err(|e| tensor_err(&e))?
            }
        };
        let t = match t.dtype() {
            DType::F32 => t,
            DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
            other => {
                return Err(self.error(format!(
                    "tensor `{name}` has dtype {other:?}, expected a float type"
                )))
            }
        };
        self.check_finite(name, &t.flatten_all()?.to_vec1::<f32>()?)?;
        Ok(Some(t))
    }

    /// An error naming the tensor if one of its `values` is not finite.
    fn check_finite(&self, name: &str, values: &[f32]) -> Result<()> {
        match super::non_finite(name, values) {
            Some(msg) => Err(self.error(msg)),
            None => Ok(()),
        }
    }

    /// The matrix `name` as compressed rows of f32, decoded straight from its compressed parts
    /// (the dense tensor is never built), checked to have `shape`; `None` when the file stores
    /// it dense (or not at all).
    pub fn sparse_rows(&self, name: &str, shape: &[usize]) -> Result<Option<Csr>> {
        let Some(how) = self.stored.get(name) else {
            return Ok(None);
        };
        let fetch = |part: &str| self.st.get(part).ok().map(|v| Raw::of(&v));
        let Some(rows) =
            file::decode_rows(name, how, fetch).map_err(|e| self.error(e.to_string()))?
        else {
            return Ok(None);
        };
        self.check_finite(name, &rows.values)?;
        if [rows.rows, rows.cols] != shape {
            return Err(self.error(format!(
                "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                [rows.rows, rows.cols]
            )));
        }
        Ok(Some(rows))
    }

    /// Under [`Layers::Sparse`], the weight `name` of a linear layer (`linear`: the
    /// architecture says it is one) as compressed rows when the file stores it compressed;
    /// `None` otherwise (then it is read dense).
    pub fn linear_rows(
        &self,
        layers: Layers,
        linear: bool,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<Csr>> {
        if layers == Layers::Sparse && linear && shape.len() == 2 {
            self.sparse_rows(name, shape)
        } else {
            Ok(None)
        }
    }

    /// Every parameter of `shapes`, checked against them: the tied embedding `tied.0` from the
    /// first of its stored names `tied.1`; under [`Layers::Sparse`] the linear weights
    /// (`is_linear`) the file stores compressed straight into rows; the rest as f32 tensors.
    pub fn read_parameters(
        &self,
        shapes: Vec<(String, Vec<usize>)>,
        tied: (&str, &[&str]),
        layers: Layers,
        is_linear: fn(&str) -> bool,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, SparseRows)> {
        let mut tensors = HashMap::new();
        let mut sparse = SparseRows::default();
        for (name, shape) in shapes {
            if let Some(rows) = self.linear_rows(layers, is_linear(&name), &name, &shape)? {
                sparse.insert(name, rows);
                continue;
            }
            let t = if name == tied.0 {
                self.tied(tied.1, &shape, device)?
            } else {
                self.require(&name, &shape, device)?
            };
            tensors.insert(name, t);
        }
        Ok((tensors, sparse))
    }

    /// The first of `names` the file holds, as f32, checked to have `shape`.
    pub fn require_any(&self, names: &[&str], shape: &[usize], device: &Device) -> Result<Tensor> {
        for name in names {
            if let Some(t) = self.get(name, device)? {
                return self.check_shape(name, t, shape);
            }
        }
        Err(self.error(match names {
            [one] => format!("missing tensor `{one}`"),
            [first, rest @ ..] => format!("missing tensor `{first}` (or an alias: {rest:?})"),
            [] => "no tensor name given".into(),
        }))
    }

    /// The tensor `name`, as f32, checked to have `shape`.
    pub fn require(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.require_any(&[name], shape, device)
    }

    /// A tied tensor stored once or under several of `aliases`: the first one found, after
    /// checking that every other stored copy holds the same matrix (a differing copy would be a
    /// separate tensor the tied configuration silently ignores).
    pub fn tied(&self, aliases: &[&str], shape: &[usize], device: &Device) -> Result<Tensor> {
        let first = self.require_any(aliases, shape, device)?;
        let stored: Vec<&&str> = aliases.iter().filter(|a| self.contains(a)).collect();
        let values = first.flatten_all()?.to_vec1::<f32>()?;
        for alias in stored.iter().skip(1) {
            let t = self.get(alias, device)?.expect("listed as stored");
            let same = t.dims() == first.dims() && t.flatten_all()?.to_vec1::<f32>()? == values;
            if !same {
                return Err(self.error(format!(
                    "tensor `{alias}` differs from `{}` although the config ties them",
                    stored[0]
                )));
            }
        }
        Ok(first)
    }

    fn check_shape(&self, name: &str, t: Tensor, shape: &[usize]) -> Result<Tensor> {
        if t.dims() != shape {
            return Err(self.error(format!(
                "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    }
}
