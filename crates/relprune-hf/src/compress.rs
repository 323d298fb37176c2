//! Compressed checkpoints: a pruned checkpoint directory with its weights stored without their
//! zeros, and back.
//!
//! [`Format::SparseBitmask`] writes what llm-compressor writes (compressed-tensors'
//! `sparse-bitmask`): the pruned matrices as `P.compressed`, `P.bitmask`, `P.shape`,
//! `P.row_offsets`, and a `quantization_config` in `config.json` announcing it, which
//! compressed-tensors (up to 0.12) and relprune read. [`Format::RelpruneSparse`] is relprune's
//! own, smaller for very sparse tensors; only relprune reads it, and `config.json` is left as it
//! is. Either way, [`decompress_dir`] gives back the input directory's `model.safetensors` and
//! `config.json` byte for byte (both are recorded in the compressed file's metadata), and a
//! `sparse-bitmask` checkpoint written by another tool is decompressed too.

use std::path::Path;

use relprune_sparse::file::{self, Format, Raw, Stored, ORIGINAL_HEADER};
use serde_json::{json, Value};

use crate::error::{invalid, Result};
use crate::resolve::copy_model_files;
use relprune_tasks::run::MODEL_FILE;

/// A compressed checkpoint format, as users name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum CompressedFormat {
    /// compressed-tensors' `sparse-bitmask` (what llm-compressor writes; compressed-tensors and
    /// relprune read it).
    SparseBitmask,
    /// relprune's own (smaller for very sparse tensors; only relprune reads it).
    RelpruneSparse,
}

impl From<CompressedFormat> for Format {
    fn from(f: CompressedFormat) -> Self {
        match f {
            CompressedFormat::SparseBitmask => Format::SparseBitmask,
            CompressedFormat::RelpruneSparse => Format::RelpruneSparse,
        }
    }
}

/// How a checkpoint's weights are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointFormat {
    /// Dense `model.safetensors` (zeros in place), what every tool reads.
    #[default]
    Dense,
    /// See [`CompressedFormat::SparseBitmask`].
    SparseBitmask,
    /// See [`CompressedFormat::RelpruneSparse`].
    RelpruneSparse,
}

impl CheckpointFormat {
    /// The compressed format, if any.
    pub fn compressed(self) -> Option<CompressedFormat> {
        match self {
            Self::Dense => None,
            Self::SparseBitmask => Some(CompressedFormat::SparseBitmask),
            Self::RelpruneSparse => Some(CompressedFormat::RelpruneSparse),
        }
    }
}

/// Metadata key, in the compressed weights file, of the input's `config.json` text.
pub const ORIGINAL_CONFIG: &str = "relprune.original_config";

/// The configuration file of a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";

/// What compressing or decompressing a checkpoint did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    /// The compressed format (`sparse-bitmask` or `relprune-sparse`).
    pub format: &'static str,
    /// The tensors stored compressed.
    pub compressed: Vec<String>,
    /// Elements of the compressed tensors.
    pub elements: usize,
    /// How many of them are zero.
    pub zeros: usize,
    /// Zeros over all float elements of the model (`global_sparsity`).
    pub global_sparsity: f64,
    /// `"2:4"` when every compressed matrix has at most 2 non-zeros in each group of 4 along its
    /// rows, else `"unstructured"`.
    pub sparsity_structure: &'static str,
    /// Size of the dense weights file, in bytes.
    pub dense_bytes: u64,
    /// Size of the compressed weights file, in bytes.
    pub compressed_bytes: u64,
    /// Files of the input not copied (other frameworks' dense weights).
    pub skipped: Vec<String>,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> crate::Error {
    invalid(format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    relprune_io::read_capped(path, u64::MAX)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))
}

/// Whether the checkpoint in `dir` is stored compressed (its weights hold compressed tensors).
pub fn is_compressed(dir: &Path) -> Result<bool> {
    let path = dir.join(MODEL_FILE);
    let weights = relprune_models::hf::weights::Weights::open(&path)?;
    Ok(weights.is_compressed())
}

/// The compressed weights file and `config.json` text of a dense weights file `model` and its
/// `config` text, in `format`. Matrices (and, for `relprune-sparse`, any float tensor) are
/// compressed when that makes them smaller; `model` must not be compressed already and
/// `config` must not announce a quantization or compression.
pub fn compress_files(
    model: &[u8],
    config: Option<&str>,
    format: Format,
    model_path: &Path,
) -> Result<(Vec<u8>, Option<String>, Summary)> {
    let mut parsed: Option<serde_json::Map<String, Value>> = match config {
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(m)) => Some(m),
            _ => {
                return Err(invalid(format!(
                    "{}: not a JSON object",
                    model_path.with_file_name(CONFIG_FILE).display()
                )))
            }
        },
        None => None,
    };
    let config_path = model_path.with_file_name(CONFIG_FILE);
    if let Some(m) = &parsed {
        for key in ["quantization_config", "compression_config"] {
            if m.contains_key(key) {
                return Err(file_err(
                    &config_path,
                    format!("has a `{key}`: the checkpoint is already compressed or quantized"),
                ));
            }
        }
    }
    if format == Format::SparseBitmask && parsed.is_none() {
        return Err(file_err(
            &config_path,
            "missing (a sparse-bitmask checkpoint announces itself in config.json)",
        ));
    }
    let (names, metadata) = names_and_metadata(model, model_path)?;
    let (stored, _) = file::index(&names, &metadata).map_err(|e| file_err(model_path, e))?;
    if metadata.contains_key(ORIGINAL_HEADER) || stored.values().any(|s| *s != Stored::Dense) {
        return Err(file_err(model_path, "is already compressed"));
    }
    let mut c = file::compress(model, format, |_, raw| saves_space(raw, format))
        .map_err(|e| file_err(model_path, e))?;
    if let Some(text) = config {
        c.metadata.insert(ORIGINAL_CONFIG.into(), text.into());
    }
    let st = safetensors::SafeTensors::deserialize(model).map_err(|e| file_err(model_path, e))?;
    let bytes = file::serialize(&c.tensors, &c.metadata).map_err(|e| file_err(model_path, e))?;
    let all = st.tensors().into_iter().map(|(n, v)| (n, Raw::of(&v)));
    let sizes = (model.len(), bytes.len());
    let summary = summarize(format, all, c.compressed.clone(), sizes);
    let config = match (format, parsed.as_mut()) {
        (Format::SparseBitmask, Some(m)) => {
            let dense: Vec<String> = st
                .tensors()
                .into_iter()
                .filter(|(n, v)| v.shape().len() == 2 && !c.compressed.contains(n))
                .filter_map(|(n, _)| n.strip_suffix(".weight").map(String::from))
                .collect();
            m.insert(
                "quantization_config".into(),
                // What compressed-tensors' `ModelCompressor.update_config` writes for a model
                // that is sparse and not quantized.
                json!({
                    "quant_method": "compressed-tensors",
                    "sparsity_config": {
                        "format": "sparse-bitmask",
                        "global_sparsity": summary.global_sparsity,
                        "sparsity_structure": summary.sparsity_structure,
                        "targets": ["Linear"],
                        "ignore": dense,
                    },
                }),
            );
            let text = serde_json::to_string_pretty(&Value::Object(m.clone()))
                .map_err(|e| file_err(&config_path, e))?;
            Some(text + "\n")
        }
        _ => config.map(String::from),
    };
    Ok((bytes, config, summary))
}

/// The stored tensor names and header metadata of a safetensors file.
fn names_and_metadata(
    bytes: &[u8],
    path: &Path,
) -> Result<(Vec<String>, std::collections::HashMap<String, String>)> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let names = st.names().into_iter().map(String::from).collect();
    Ok((names, header.metadata().clone().unwrap_or_default()))
}

/// The figures of a model whose (dense) tensors are `tensors`, `compressed` of them compressed
/// in `format`; `sizes` = (dense, compressed) file sizes.
fn summarize(
    format: Format,
    tensors: impl Iterator<Item = (String, Raw)>,
    compressed: Vec<String>,
    sizes: (usize, usize),
) -> Summary {
    let (mut elements, mut zero, mut floats, mut float_zeros) = (0, 0, 0, 0);
    let mut two_four = !compressed.is_empty();
    for (name, raw) in tensors {
        let Some((z, n)) = zeros(&raw) else { continue };
        floats += n;
        float_zeros += z;
        if compressed.contains(&name) {
            elements += n;
            zero += z;
            two_four &= is_two_four(&raw);
        }
    }
    Summary {
        format: format.name(),
        compressed,
        elements,
        zeros: zero,
        global_sparsity: float_zeros as f64 / floats.max(1) as f64,
        sparsity_structure: if two_four { "2:4" } else { "unstructured" },
        dense_bytes: sizes.0 as u64,
        compressed_bytes: sizes.1 as u64,
        skipped: Vec::new(),
    }
}

/// Bytes per element of a float tensor (`None` for the rest).
fn float_size(raw: &Raw) -> Option<usize> {
    use safetensors::Dtype::*;
    matches!(raw.dtype, F64 | F32 | F16 | BF16).then(|| raw.dtype.bitsize() / 8)
}

/// `(zeros, elements)` of a float tensor.
fn zeros(raw: &Raw) -> Option<(usize, usize)> {
    let size = float_size(raw)?;
    let zero = raw
        .data
        .chunks_exact(size)
        .filter(|e| e.iter().all(|&b| b == 0))
        .count();
    Some((zero, raw.data.len() / size))
}

/// Whether storing `raw` compressed in `format` takes fewer bytes than storing it dense.
fn saves_space(raw: &Raw, format: Format) -> bool {
    let (Some(size), Some((zero, n))) = (float_size(raw), zeros(raw)) else {
        return false;
    };
    let values = (n - zero) * size;
    let index = match format {
        // The bitmask, the row offsets (i64) and the shape.
        Format::SparseBitmask => match raw.shape[..] {
            [rows, cols] => rows * cols.div_ceil(8) + rows * 8 + 16,
            _ => return false,
        },
        // At most the bitmap (the deltas are used when smaller).
        Format::RelpruneSparse => n.div_ceil(8),
    };
    values + index < n * size
}

/// Whether every group of 4 consecutive elements of each row has at most 2 non-zeros.
fn is_two_four(raw: &Raw) -> bool {
    let (Some(size), &[_, cols]) = (float_size(raw), &raw.shape[..]) else {
        return false;
    };
    if cols % 4 != 0 {
        return false;
    }
    raw.data.chunks_exact(4 * size).all(|group| {
        group
            .chunks_exact(size)
            .filter(|e| e.iter().any(|&b| b != 0))
            .count()
            <= 2
    })
}

/// Writes `out` (a new directory, atomically): the checkpoint of `input` with its weights
/// compressed in `format` and every other file copied (other frameworks' dense weight files
/// skipped).
pub fn compress_dir(input: &Path, out: &Path, format: Format) -> Result<Summary> {
    rewrite_dir(input, out, |model, config, path| {
        compress_files(model, config, format, path)
    })
}

/// Replaces, inside the directory `dir`, a dense `model.safetensors` and its `config.json` by
/// their compressed form (each file atomically): how `prune-hf --format` writes its output.
pub fn compress_in_place(dir: &Path, format: Format) -> Result<Summary> {
    let (model, config) = read_checkpoint(dir)?;
    let model_path = dir.join(MODEL_FILE);
    let (bytes, config, summary) = compress_files(&model, config.as_deref(), format, &model_path)?;
    relprune_io::write(&model_path, &bytes)?;
    if let Some(text) = config {
        relprune_io::write(&dir.join(CONFIG_FILE), text.as_bytes())?;
    }
    Ok(summary)
}

/// The weights file and `config.json` text (if any) of the checkpoint directory `dir`.
fn read_checkpoint(dir: &Path) -> Result<(Vec<u8>, Option<String>)> {
    let model_path = dir.join(MODEL_FILE);
    if !dir.is_dir() {
        return Err(file_err(dir, "no such model directory"));
    }
    if !model_path.is_file() {
        return Err(file_err(
            &model_path,
            "no such file (only single-file model.safetensors checkpoints are read)",
        ));
    }
    let config_path = dir.join(CONFIG_FILE);
    let config = if config_path.is_file() {
        let text = String::from_utf8(read(&config_path)?)
            .map_err(|_| file_err(&config_path, "is not UTF-8 text"))?;
        Some(text)
    } else {
        None
    };
    Ok((read(&model_path)?, config))
}

/// Writes `out` (a new directory, atomically) from the checkpoint `input`: its weights file and
/// config as `f` rewrites them, every other file copied.
fn rewrite_dir(
    input: &Path,
    out: &Path,
    f: impl FnOnce(&[u8], Option<&str>, &Path) -> Result<(Vec<u8>, Option<String>, Summary)>,
) -> Result<Summary> {
    let stage = relprune_io::StagingDir::new(out)?;
    let (model, config) = read_checkpoint(input)?;
    let (bytes, config, mut summary) = f(&model, config.as_deref(), &input.join(MODEL_FILE))?;
    summary.skipped = copy_model_files(input, stage.path(), MODEL_FILE)?;
    relprune_io::write(&stage.path().join(MODEL_FILE), &bytes)?;
    if let Some(text) = config {
        relprune_io::write(&stage.path().join(CONFIG_FILE), text.as_bytes())?;
    }
    stage.commit(out)?;
    Ok(summary)
}

/// The dense weights file and `config.json` text of a compressed weights file and its config:
/// the originals, byte for byte, when relprune compressed them; otherwise the dense tensors with
/// the file's metadata, and the config without its `quantization_config` (an error if that also
/// announces a quantization, which relprune does not undo).
pub fn decompress_files(
    model: &[u8],
    config: Option<&str>,
    model_path: &Path,
) -> Result<(Vec<u8>, Option<String>, Summary)> {
    let (names, metadata) = names_and_metadata(model, model_path)?;
    let (stored, _) = file::index(&names, &metadata).map_err(|e| file_err(model_path, e))?;
    let compressed: Vec<String> = stored
        .iter()
        .filter(|(_, s)| **s != Stored::Dense)
        .map(|(n, _)| n.clone())
        .collect();
    // A file relprune compressed may hold no compressed tensor (none got smaller).
    if compressed.is_empty() && !metadata.contains_key(ORIGINAL_HEADER) {
        return Err(file_err(
            model_path,
            "is not compressed (no compressed tensor)",
        ));
    }
    let format = match metadata.get(file::FORMAT_KEY).map(String::as_str) {
        Some(file::RELPRUNE_FORMAT) => Format::RelpruneSparse,
        _ => Format::SparseBitmask,
    };
    let (tensors, mut meta) = file::decompress(model).map_err(|e| file_err(model_path, e))?;
    let original_config = meta.remove(ORIGINAL_CONFIG);
    let bytes = file::serialize_dense(&tensors, &meta).map_err(|e| file_err(model_path, e))?;
    let config_path = model_path.with_file_name(CONFIG_FILE);
    let config = match (original_config, config) {
        (Some(original), _) => Some(original),
        (None, Some(text)) => Some(without_sparsity_config(text, &config_path)?),
        (None, None) => None,
    };
    let sizes = (bytes.len(), model.len());
    let summary = summarize(format, tensors.into_iter(), compressed, sizes);
    Ok((bytes, config, summary))
}

/// `config.json` text without a `quantization_config` that only announces sparsity.
fn without_sparsity_config(text: &str, path: &Path) -> Result<String> {
    let mut m: serde_json::Map<String, Value> = serde_json::from_str(text)
        .map_err(|e| file_err(path, format!("not a JSON object: {e}")))?;
    let Some(q) = m.remove("quantization_config") else {
        return Ok(text.to_string());
    };
    let groups = q.get("config_groups");
    if groups.is_some_and(|g| g.as_object().is_some_and(|g| !g.is_empty())) {
        return Err(file_err(
            path,
            "announces a quantization (`config_groups`), which relprune does not undo",
        ));
    }
    let text = serde_json::to_string_pretty(&Value::Object(m)).map_err(|e| file_err(path, e))?;
    Ok(text + "\n")
}

/// Writes `out` (a new directory, atomically): the compressed checkpoint of `input` with dense
/// weights, and every other file copied.
pub fn decompress_dir(input: &Path, out: &Path) -> Result<Summary> {
    rewrite_dir(input, out, decompress_files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(shape: &[usize], v: &[f32]) -> Raw {
        Raw {
            dtype: safetensors::Dtype::F32,
            shape: shape.to_vec(),
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn a_tensor_is_compressed_only_when_that_makes_it_smaller() {
        let mut v = vec![0f32; 64 * 64];
        v[..64 * 64 / 4].fill(1.0);
        let sparse = f32s(&[64, 64], &v);
        assert!(saves_space(&sparse, Format::SparseBitmask));
        assert!(saves_space(&sparse, Format::RelpruneSparse));
        let dense = f32s(&[64, 64], &vec![1.0; 64 * 64]);
        assert!(!saves_space(&dense, Format::SparseBitmask));
        assert!(!saves_space(&dense, Format::RelpruneSparse));
        // sparse-bitmask holds matrices only.
        assert!(!saves_space(&f32s(&[4096], &v), Format::SparseBitmask));
    }

    #[test]
    fn two_four_is_told_from_unstructured() {
        let two_four = f32s(
            &[2, 8],
            &[
                1., 0., 2., 0., 0., 0., 3., 4., 0., 1., 0., 1., 5., 0., 0., 6.,
            ],
        );
        assert!(is_two_four(&two_four));
        let three = f32s(&[1, 8], &[1., 2., 3., 0., 0., 0., 0., 0.]);
        assert!(!is_two_four(&three));
        assert!(!is_two_four(&f32s(&[1, 6], &[0.; 6])));
    }

    /// A one-matrix weights file, compressed as `format`, and its dense bytes.
    fn model(format: Format) -> (Vec<u8>, Vec<u8>) {
        let mut v = vec![0f32; 16 * 16];
        v.iter_mut().step_by(5).for_each(|x| *x = 0.5);
        let w = f32s(&[16, 16], &v);
        let dense =
            file::serialize(&[("fc.weight".to_string(), w)].into(), &Default::default()).unwrap();
        let c = file::compress(&dense, format, |_, _| true).unwrap();
        (file::serialize(&c.tensors, &c.metadata).unwrap(), dense)
    }

    #[test]
    fn another_tools_sparse_bitmask_config_loses_only_its_sparsity_announcement() {
        let (packed, dense) = model(Format::SparseBitmask);
        let config = r#"{"hidden_size": 16, "quantization_config": {"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask"}}}"#;
        let path = Path::new("m/model.safetensors");
        let (bytes, back, summary) = decompress_files(&packed, Some(config), path).unwrap();
        assert_eq!(bytes, dense);
        let back: Value = serde_json::from_str(&back.unwrap()).unwrap();
        assert_eq!(back, json!({"hidden_size": 16}));
        assert_eq!(summary.compressed, ["fc.weight"]);
        assert!((summary.global_sparsity - 0.8).abs() < 0.01);
        // A config without a quantization_config is kept as it is.
        let plain = "{ \"hidden_size\" : 16 }";
        let (_, back, _) = decompress_files(&packed, Some(plain), path).unwrap();
        assert_eq!(back.unwrap(), plain);
        // A quantization is not undone.
        let quantized = r#"{"quantization_config": {"config_groups": {"group_0": {}}}}"#;
        let e = decompress_files(&packed, Some(quantized), path).unwrap_err();
        assert!(
            e.to_string().contains("m/config.json") && e.to_string().contains("quantization"),
            "{e}"
        );
    }

    #[test]
    fn compressing_records_the_config_and_refuses_a_compressed_input() {
        let (_, dense) = model(Format::SparseBitmask);
        let path = Path::new("m/model.safetensors");
        let config = "{\"hidden_size\": 16}";
        let (packed, new_config, _) =
            compress_files(&dense, Some(config), Format::SparseBitmask, path).unwrap();
        assert!(new_config.unwrap().contains("compressed-tensors"));
        let (bytes, back, _) = decompress_files(&packed, None, path).unwrap();
        assert_eq!((bytes, back.as_deref()), (dense, Some(config)));
        let e = compress_files(&packed, None, Format::RelpruneSparse, path).unwrap_err();
        assert!(e.to_string().contains("already compressed"), "{e}");
        let e = compress_files(&packed, None, Format::SparseBitmask, path).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
    }
}
