//! Compressed checkpoints: a safetensors file whose pruned tensors are stored without their
//! zeros, in one of two formats, and back, bit for bit.
//!
//! - [`Format::SparseBitmask`], the layout of `compressed-tensors`' `sparse-bitmask` (written by
//!   llm-compressor): a tensor `P.weight` becomes `P.compressed` (its non-zeros, row-major, in its
//!   own dtype), `P.bitmask` (U8, rows × ⌈cols/8⌉, each row's bits packed little-endian),
//!   `P.shape` (I64, the dense shape) and `P.row_offsets` (I64, where each row starts in
//!   `compressed`). Only matrices named `*.weight` are compressed.
//! - [`Format::RelpruneSparse`], relprune's own (`relprune-sparse-v1`, what the reproductions
//!   write as `model.sparse.safetensors`): `NAME.values` plus either `NAME.bitmap` (one bit per
//!   element) or `NAME.deltas` (8-bit gaps between stored positions, with zero-valued fillers
//!   for longer gaps), whichever is smaller; the shape in the metadata under `shape.NAME`.
//!
//! An element is stored when any bit of it is set, so `-0.0` survives and decompression gives
//! the exact input back; compressing also records the input's safetensors header
//! ([`ORIGINAL_HEADER`]), so decompressing a file compressed here rebuilds the input file byte
//! for byte. Every inconsistency of a compressed tensor (a bitmask whose popcount is not its
//! number of values, row offsets out of range or decreasing, a shape that disagrees with the
//! bitmask, an unknown format) is an error naming the tensor.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::format::{Csr, CsrBuilder};
use crate::{Error, Result};

/// Metadata key of the input's safetensors header (length prefix and JSON, base-16).
pub const ORIGINAL_HEADER: &str = "relprune.original_header";

/// Metadata key of the relprune format's name.
pub const FORMAT_KEY: &str = "format";

/// The relprune format's name in the metadata.
pub const RELPRUNE_FORMAT: &str = "relprune-sparse-v1";

/// A compressed checkpoint format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `compressed-tensors`' `sparse-bitmask`.
    SparseBitmask,
    /// relprune's `relprune-sparse-v1`.
    RelpruneSparse,
}

impl Format {
    /// Its name (in `config.json`'s `sparsity_config.format` for `sparse-bitmask`).
    pub fn name(self) -> &'static str {
        match self {
            Self::SparseBitmask => "sparse-bitmask",
            Self::RelpruneSparse => "relprune-sparse",
        }
    }
}

/// A tensor as stored: dtype, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Raw {
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl Raw {
    /// A copy of a stored tensor.
    pub fn of(view: &TensorView<'_>) -> Self {
        Self {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data().to_vec(),
        }
    }

    fn i64s(values: &[usize]) -> Self {
        Self {
            dtype: Dtype::I64,
            shape: vec![values.len()],
            data: values
                .iter()
                .flat_map(|&v| (v as i64).to_le_bytes())
                .collect(),
        }
    }

    fn to_i64s(&self, what: &str) -> Result<Vec<i64>> {
        if self.dtype != Dtype::I64 || self.shape.len() != 1 {
            return Err(Error::Value(format!(
                "{what} must be a 1-D I64 tensor, is {:?} {:?}",
                self.dtype, self.shape
            )));
        }
        Ok(self
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

/// Bytes per element of the float dtypes compressed here (`None`: not compressed).
fn elem_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F64 => Some(8),
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// What [`compress`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compressed {
    /// The output tensors, by name.
    pub tensors: BTreeMap<String, Raw>,
    /// The output metadata.
    pub metadata: HashMap<String, String>,
    /// The dense tensors compressed.
    pub compressed: Vec<String>,
    /// Elements of the compressed tensors, and how many of them are zero.
    pub elements: usize,
    /// See `elements`.
    pub zeros: usize,
}

/// Compresses the tensors of a safetensors file (`bytes`) for which `select(name, raw)` holds
/// (and that the format can hold: float tensors, matrices named `*.weight` for
/// `sparse-bitmask`); the rest are copied.
pub fn compress(
    bytes: &[u8],
    format: Format,
    select: impl Fn(&str, &Raw) -> bool,
) -> Result<Compressed> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Value(format!("not a safetensors file: {e}")))?;
    let (header_len, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Value(format!("not a safetensors file: {e}")))?;
    let mut out = Compressed {
        metadata: header.metadata().clone().unwrap_or_default(),
        ..Default::default()
    };
    if out.metadata.contains_key(ORIGINAL_HEADER) {
        return Err(Error::Value(
            "the file is already compressed (it records an original header)".into(),
        ));
    }
    out.metadata
        .insert(ORIGINAL_HEADER.into(), hex(&bytes[..8 + header_len]));
    if format == Format::RelpruneSparse {
        out.metadata
            .insert(FORMAT_KEY.into(), RELPRUNE_FORMAT.into());
    }
    for (name, view) in st.tensors() {
        let raw = Raw::of(&view);
        let size = elem_size(raw.dtype);
        let fits = match format {
            Format::SparseBitmask => raw.shape.len() == 2 && name.ends_with(".weight"),
            Format::RelpruneSparse => true,
        };
        let Some(size) = size.filter(|_| fits && select(&name, &raw)) else {
            out.tensors.insert(name, raw);
            continue;
        };
        let n = raw.data.len() / size;
        let nonzero = raw
            .data
            .chunks_exact(size)
            .filter(|e| e.iter().any(|&b| b != 0))
            .count();
        out.elements += n;
        out.zeros += n - nonzero;
        match format {
            Format::SparseBitmask => {
                let prefix = name.strip_suffix(".weight").expect("checked above");
                for (suffix, t) in bitmask_encode(&raw, size) {
                    out.tensors.insert(format!("{prefix}.{suffix}"), t);
                }
            }
            Format::RelpruneSparse => {
                let shape = raw
                    .shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                out.metadata.insert(format!("shape.{name}"), shape);
                let (key, index, values) = relprune_encode(&raw, size);
                out.tensors.insert(format!("{name}.{key}"), index);
                out.tensors.insert(format!("{name}.values"), values);
            }
        }
        out.compressed.push(name);
    }
    Ok(out)
}

/// `(suffix, tensor)` of a matrix in the `sparse-bitmask` layout.
fn bitmask_encode(raw: &Raw, size: usize) -> Vec<(&'static str, Raw)> {
    let (rows, cols) = (raw.shape[0], raw.shape[1]);
    let width = cols.div_ceil(8);
    let mut bitmask = vec![0u8; rows * width];
    let mut values = Vec::new();
    let mut offsets = Vec::with_capacity(rows);
    for r in 0..rows {
        offsets.push(values.len() / size);
        for c in 0..cols {
            let e = &raw.data[(r * cols + c) * size..(r * cols + c + 1) * size];
            if e.iter().any(|&b| b != 0) {
                bitmask[r * width + c / 8] |= 1 << (c % 8);
                values.extend_from_slice(e);
            }
        }
    }
    let nnz = values.len() / size;
    vec![
        ("shape", Raw::i64s(&raw.shape)),
        (
            "compressed",
            Raw {
                dtype: raw.dtype,
                shape: vec![nnz],
                data: values,
            },
        ),
        (
            "bitmask",
            Raw {
                dtype: Dtype::U8,
                shape: vec![rows, width],
                data: bitmask,
            },
        ),
        ("row_offsets", Raw::i64s(&offsets)),
    ]
}

/// `(key, index, values)` of a tensor in the relprune layout: bitmap or deltas, the smaller.
fn relprune_encode(raw: &Raw, size: usize) -> (&'static str, Raw, Raw) {
    let n = raw.data.len() / size;
    let elem = |i: usize| &raw.data[i * size..(i + 1) * size];
    let stored = |i: usize| elem(i).iter().any(|&b| b != 0);
    let mut bitmap = vec![0u8; n.div_ceil(8)];
    let mut bitmap_values = Vec::new();
    let (mut deltas, mut delta_values) = (Vec::new(), Vec::new());
    let mut last: i64 = -1;
    for i in (0..n).filter(|&i| stored(i)) {
        bitmap[i / 8] |= 1 << (i % 8);
        bitmap_values.extend_from_slice(elem(i));
        let mut gap = i as i64 - last;
        while gap > 255 {
            deltas.push(255u8);
            delta_values.extend(std::iter::repeat_n(0u8, size));
            gap -= 255;
        }
        deltas.push(gap as u8);
        delta_values.extend_from_slice(elem(i));
        last = i as i64;
    }
    let u8s = |data: Vec<u8>| Raw {
        dtype: Dtype::U8,
        shape: vec![data.len()],
        data,
    };
    let values = |data: Vec<u8>| Raw {
        dtype: raw.dtype,
        shape: vec![data.len() / size],
        data,
    };
    if deltas.len() + delta_values.len() < bitmap.len() + bitmap_values.len() {
        ("deltas", u8s(deltas), values(delta_values))
    } else {
        ("bitmap", u8s(bitmap), values(bitmap_values))
    }
}

/// How one dense tensor of a file is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// As it is, under its own name.
    Dense,
    /// In the `sparse-bitmask` layout, as `PREFIX.compressed`, `.bitmask`, `.shape`,
    /// `.row_offsets` (the dense name is `PREFIX.weight`).
    Bitmask {
        /// `PREFIX`.
        prefix: String,
    },
    /// In the relprune layout, as `NAME.values` and `NAME.deltas` or `NAME.bitmap`.
    Relprune {
        /// Whether the positions are 8-bit gaps (else a bitmap).
        deltas: bool,
        /// The dense shape (from the metadata).
        shape: Vec<usize>,
    },
}

/// The dense tensors of a file with stored tensors `names` and header `metadata`, by name, and
/// how each is stored; the metadata without what compression added. An unknown relprune format
/// and a tensor stored both dense and compressed are errors.
pub fn index(
    names: &[String],
    metadata: &HashMap<String, String>,
) -> Result<(BTreeMap<String, Stored>, HashMap<String, String>)> {
    let mut meta = metadata.clone();
    let relprune = match meta.get(FORMAT_KEY).map(String::as_str) {
        Some(RELPRUNE_FORMAT) => true,
        Some(f) if f.starts_with("relprune") => {
            return Err(Error::Value(format!("unknown compressed format `{f}`")))
        }
        _ => false,
    };
    let mut out = BTreeMap::new();
    let mut parts = std::collections::BTreeSet::new();
    for name in names {
        if let Some(prefix) = name.strip_suffix(".bitmask") {
            for s in BITMASK_PARTS {
                parts.insert(format!("{prefix}.{s}"));
            }
            let prefix = prefix.to_string();
            out.insert(format!("{prefix}.weight"), Stored::Bitmask { prefix });
        } else if relprune && (name.ends_with(".bitmap") || name.ends_with(".deltas")) {
            let (base, key) = name.rsplit_once('.').expect("has a suffix");
            let shape: Vec<usize> = meta
                .remove(&format!("shape.{base}"))
                .ok_or_else(|| Error::Value(format!("`{base}`: no shape in the metadata")))?
                .split(',')
                .map(|d| d.parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::Value(format!("`{base}`: bad shape: {e}")))?;
            parts.insert(name.clone());
            parts.insert(format!("{base}.values"));
            let deltas = key == "deltas";
            out.insert(base.to_string(), Stored::Relprune { deltas, shape });
        }
    }
    for name in names.iter().filter(|n| !parts.contains(*n)) {
        if out.insert(name.clone(), Stored::Dense).is_some() {
            return Err(Error::Value(format!(
                "`{name}` is stored both dense and compressed"
            )));
        }
    }
    if relprune {
        meta.remove(FORMAT_KEY);
    }
    Ok((out, meta))
}

/// The stored tensors of the `sparse-bitmask` layout, by suffix.
const BITMASK_PARTS: [&str; 4] = ["shape", "compressed", "bitmask", "row_offsets"];

/// The dense tensor `name`, stored as `how`, from its stored parts (`fetch(stored name)`).
pub fn decode(name: &str, how: &Stored, fetch: impl Fn(&str) -> Option<Raw>) -> Result<Raw> {
    if *how == Stored::Dense {
        return fetch(name).ok_or_else(|| Error::Value(format!("`{name}` is missing")));
    }
    let mut dense = DenseSink::default();
    walk(name, how, fetch, &mut dense)?;
    dense
        .raw
        .ok_or_else(|| Error::Value(format!("`{name}`: no shape")))
}

/// The compressed matrix `name`, stored as `how`, straight into compressed rows of f32 without
/// building the dense tensor (`None` when it is stored dense): how a sparse model loads in about
/// the memory of its file.
pub fn decode_rows(
    name: &str,
    how: &Stored,
    fetch: impl Fn(&str) -> Option<Raw>,
) -> Result<Option<Csr>> {
    if *how == Stored::Dense {
        return Ok(None);
    }
    let mut rows = RowsSink::default();
    walk(name, how, fetch, &mut rows)?;
    rows.builder
        .map(|b| Some(b.finish()))
        .ok_or_else(|| Error::Value(format!("`{name}`: no shape")))
}

/// Where a decoder puts the entries of a compressed tensor, in increasing position order.
trait Sink {
    /// Called once, before any entry, with the dense tensor's dtype and shape.
    fn start(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()>;
    /// The entry at row-major `position`, as stored (little-endian bytes of the dtype).
    fn put(&mut self, name: &str, position: usize, value: &[u8]) -> Result<()>;
}

/// Decodes into the dense tensor.
#[derive(Default)]
struct DenseSink {
    raw: Option<Raw>,
    size: usize,
}

impl Sink for DenseSink {
    fn start(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
        self.size = elem_size(dtype)
            .ok_or_else(|| Error::Value(format!("`{name}`: values of dtype {dtype:?}")))?;
        let n = shape
            .iter()
            .try_fold(self.size, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Error::Value(format!("`{name}`: shape {shape:?} is too large")))?;
        self.raw = Some(Raw {
            dtype,
            shape: shape.to_vec(),
            data: vec![0u8; n],
        });
        Ok(())
    }

    fn put(&mut self, name: &str, position: usize, value: &[u8]) -> Result<()> {
        let data = &mut self.raw.as_mut().expect("started before any entry").data;
        let n = data.len() / self.size;
        let dst = data
            .get_mut(position * self.size..(position + 1) * self.size)
            .ok_or_else(|| {
                Error::Value(format!(
                    "`{name}`: position {position} is past the end ({n} elements)"
                ))
            })?;
        dst.copy_from_slice(value);
        Ok(())
    }
}

/// Decodes into compressed rows of f32.
#[derive(Default)]
struct RowsSink {
    builder: Option<CsrBuilder>,
    dtype: Option<Dtype>,
}

impl Sink for RowsSink {
    fn start(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
        let [rows, cols] = shape[..] else {
            return Err(Error::Shape(format!(
                "`{name}`: shape {shape:?} is not a matrix"
            )));
        };
        let named = |e: Error| Error::Value(format!("`{name}`: {e}"));
        self.builder = Some(CsrBuilder::new(rows, cols).map_err(named)?);
        self.dtype = Some(dtype);
        Ok(())
    }

    fn put(&mut self, name: &str, position: usize, value: &[u8]) -> Result<()> {
        let v = match (self.dtype, value.len()) {
            (Some(Dtype::F32), 4) => f32::from_le_bytes(value.try_into().expect("4 bytes")),
            (Some(Dtype::F64), 8) => f64::from_le_bytes(value.try_into().expect("8 bytes")) as f32,
            (Some(Dtype::F16), 2) => {
                half::f16::from_le_bytes(value.try_into().expect("2 bytes")).to_f32()
            }
            (Some(Dtype::BF16), 2) => {
                half::bf16::from_le_bytes(value.try_into().expect("2 bytes")).to_f32()
            }
            (dtype, _) => {
                return Err(Error::Value(format!(
                    "`{name}`: values of dtype {dtype:?} are not read as f32"
                )))
            }
        };
        let builder = self.builder.as_mut().expect("started before any entry");
        builder
            .push(position, v)
            .map_err(|e| Error::Value(format!("`{name}`: {e}")))
    }
}

/// Runs the decoder of `how` on the stored parts of `name` into `sink`.
fn walk(
    name: &str,
    how: &Stored,
    fetch: impl Fn(&str) -> Option<Raw>,
    sink: &mut impl Sink,
) -> Result<()> {
    let get = |part: String| {
        fetch(&part).ok_or_else(|| Error::Value(format!("`{name}`: `{part}` is missing")))
    };
    match how {
        Stored::Dense => Err(Error::Value(format!("`{name}` is not compressed"))),
        Stored::Bitmask { prefix } => {
            let [shape, values, bitmask, offsets] =
                BITMASK_PARTS.map(|s| get(format!("{prefix}.{s}")));
            bitmask_walk(prefix, &shape?, &values?, &bitmask?, &offsets?, sink)
        }
        Stored::Relprune { deltas, shape } => {
            let key = if *deltas { "deltas" } else { "bitmap" };
            let index = get(format!("{name}.{key}"))?;
            let values = get(format!("{name}.values"))?;
            relprune_walk(name, *deltas, &index, &values, shape, sink)
        }
    }
}

/// The dense tensors of a safetensors file, whatever was compressed in it (a file with nothing
/// compressed comes back as it is), and the file's metadata without what compression added.
pub fn decompress(bytes: &[u8]) -> Result<(BTreeMap<String, Raw>, HashMap<String, String>)> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Value(format!("not a safetensors file: {e}")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Value(format!("not a safetensors file: {e}")))?;
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    let (dense, meta) = index(&names, &header.metadata().clone().unwrap_or_default())?;
    let fetch = |n: &str| st.tensor(n).ok().map(|v| Raw::of(&v));
    let tensors = dense
        .iter()
        .map(|(name, how)| Ok((name.clone(), decode(name, how, fetch)?)))
        .collect::<Result<_>>()?;
    Ok((tensors, meta))
}

fn bitmask_walk(
    name: &str,
    shape: &Raw,
    values: &Raw,
    bitmask: &Raw,
    offsets: &Raw,
    sink: &mut impl Sink,
) -> Result<()> {
    let bad = |msg: String| Error::Value(format!("`{name}`: {msg}"));
    let shape = shape.to_i64s(&format!("`{name}.shape`"))?;
    let [rows, cols] = shape[..] else {
        return Err(bad(format!("shape {shape:?} is not a matrix")));
    };
    let (rows, cols) = (
        usize::try_from(rows).map_err(|_| bad(format!("shape {shape:?}")))?,
        usize::try_from(cols).map_err(|_| bad(format!("shape {shape:?}")))?,
    );
    let size = elem_size(values.dtype)
        .ok_or_else(|| bad(format!("values of dtype {:?}", values.dtype)))?;
    let width = cols.div_ceil(8);
    if bitmask.dtype != Dtype::U8 || bitmask.shape != [rows, width] {
        return Err(bad(format!(
            "bitmask of {:?} {:?} does not fit the shape {rows}×{cols} (U8 [{rows}, {width}])",
            bitmask.dtype, bitmask.shape
        )));
    }
    if values.shape.len() != 1 {
        return Err(bad(format!("values of shape {:?}", values.shape)));
    }
    let nnz = values.shape[0];
    let bits = |r: usize, c: usize| bitmask.data[r * width + c / 8] & (1 << (c % 8)) != 0;
    let popcount: usize = (0..rows)
        .map(|r| (0..cols).filter(|&c| bits(r, c)).count())
        .sum();
    if popcount != nnz {
        return Err(bad(format!(
            "the bitmask marks {popcount} entries but {nnz} values are stored"
        )));
    }
    let offsets = offsets.to_i64s(&format!("`{name}.row_offsets`"))?;
    if offsets.len() != rows {
        return Err(bad(format!(
            "{} row offsets for {rows} rows",
            offsets.len()
        )));
    }
    sink.start(name, values.dtype, &[rows, cols])?;
    let mut k = 0usize;
    for (r, &offset) in offsets.iter().enumerate() {
        if offset != k as i64 {
            return Err(bad(format!(
                "row {r} starts at value {offset}, its bitmask says {k} (offsets out of range \
                 or not increasing)"
            )));
        }
        for c in (0..cols).filter(|&c| bits(r, c)) {
            sink.put(name, r * cols + c, &values.data[k * size..(k + 1) * size])?;
            k += 1;
        }
    }
    Ok(())
}

fn relprune_walk(
    name: &str,
    is_delta: bool,
    index: &Raw,
    values: &Raw,
    shape: &[usize],
    sink: &mut impl Sink,
) -> Result<()> {
    let bad = |msg: String| Error::Value(format!("`{name}`: {msg}"));
    let size = elem_size(values.dtype)
        .ok_or_else(|| bad(format!("values of dtype {:?}", values.dtype)))?;
    if !values.data.len().is_multiple_of(size) {
        return Err(bad(format!("{} bytes of values", values.data.len())));
    }
    let n = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let count = values.data.len() / size;
    sink.start(name, values.dtype, shape)?;
    let mut put = |i: usize, k: usize| -> Result<()> {
        if i >= n {
            return Err(bad(format!("position {i} is past the end ({n} elements)")));
        }
        let src = &values.data[k * size..(k + 1) * size];
        // Zero-valued fillers bridge gaps longer than 255: nothing to store.
        if src.iter().any(|&b| b != 0) {
            sink.put(name, i, src)?;
        }
        Ok(())
    };
    if is_delta {
        if index.data.len() != count {
            return Err(bad(format!("{} gaps but {count} values", index.data.len())));
        }
        let mut pos: usize = 0;
        for (k, &d) in index.data.iter().enumerate() {
            if d == 0 {
                return Err(bad(format!("gap {k} is zero (positions must increase)")));
            }
            // Gaps count from one before the first element.
            pos = pos.saturating_add(d as usize);
            put(pos - 1, k)?;
        }
    } else {
        if index.data.len() != n.div_ceil(8) {
            return Err(bad(format!(
                "bitmap of {} bytes for {n} elements",
                index.data.len()
            )));
        }
        let marked = (0..n)
            .filter(|&i| index.data[i / 8] & (1 << (i % 8)) != 0)
            .collect::<Vec<_>>();
        if marked.len() != count {
            return Err(bad(format!(
                "the bitmap marks {} entries but {count} values are stored",
                marked.len()
            )));
        }
        for (k, i) in marked.into_iter().enumerate() {
            put(i, k)?;
        }
    }
    Ok(())
}

/// The bytes of a safetensors file holding `tensors` and `metadata` (what [`compress`]
/// returns). Tensors are laid out as the `safetensors` crate does (widest dtype first, so every
/// tensor is aligned to its element size), then by name, and the metadata keys are sorted: the same
/// input always gives the same bytes (the `safetensors` crate writes its metadata in hash order).
pub fn serialize(
    tensors: &BTreeMap<String, Raw>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), serde_json::json!(sorted));
    }
    let mut order: Vec<(&String, &Raw)> = tensors.iter().collect();
    order.sort_by_key(|(name, raw)| (std::cmp::Reverse(raw.dtype.bitsize()), *name));
    let mut offset = 0usize;
    for &(name, raw) in &order {
        let n: usize = raw.shape.iter().product();
        if (n * raw.dtype.bitsize()).div_ceil(8) != raw.data.len() {
            return Err(Error::Value(format!(
                "`{name}`: {} bytes for shape {:?} of {:?}",
                raw.data.len(),
                raw.shape,
                raw.dtype
            )));
        }
        let dtype =
            serde_json::to_value(raw.dtype).map_err(|e| Error::Value(format!("`{name}`: {e}")))?;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": raw.shape,
                "data_offsets": [offset, offset + raw.data.len()],
            }),
        );
        offset += raw.data.len();
    }
    let mut json = serde_json::to_vec(&header).expect("a JSON map serializes");
    // Readers may map the body and view it as any dtype: keep it 8-byte aligned.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, raw) in order {
        out.extend_from_slice(&raw.data);
    }
    Ok(out)
}

/// The bytes of the dense file of what [`decompress`] returns: with the original header
/// [`compress`] recorded (and exactly the tensors it describes), the original file, byte for
/// byte; otherwise a new file with the metadata but that record.
pub fn serialize_dense(
    tensors: &BTreeMap<String, Raw>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    if let Some(bytes) = metadata
        .get(ORIGINAL_HEADER)
        .and_then(|h| rebuild(h, tensors))
    {
        return Ok(bytes);
    }
    let mut meta = metadata.clone();
    meta.remove(ORIGINAL_HEADER);
    serialize(tensors, &meta)
}

/// The original file from its recorded header and the decompressed tensors, if they are
/// exactly the tensors that header describes.
fn rebuild(original_hex: &str, tensors: &BTreeMap<String, Raw>) -> Option<Vec<u8>> {
    let header = unhex(original_hex)?;
    let n = u64::from_le_bytes(header.get(..8)?.try_into().ok()?) as usize;
    if header.len() != 8 + n {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&header[8..]).ok()?;
    let map = json.as_object()?;
    let mut body = Vec::new();
    let mut count = 0;
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let raw = tensors.get(name)?;
        let offsets = info.get("data_offsets")?.as_array()?;
        let (a, b) = (
            offsets.first()?.as_u64()? as usize,
            offsets.get(1)?.as_u64()? as usize,
        );
        let shape: Vec<usize> = info
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()?;
        if shape != raw.shape || b - a != raw.data.len() {
            return None;
        }
        if body.len() < b {
            body.resize(b, 0);
        }
        body[a..b].copy_from_slice(&raw.data);
        count += 1;
    }
    (count == tensors.len()).then(|| [header, body].concat())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file: a 3×10 f32 matrix with zeros (and a `-0.0`), a bias, a bf16 matrix.
    fn sample() -> Vec<u8> {
        let mut w = [0f32; 30];
        for (i, v) in [
            (0usize, 1.5f32),
            (9, -2.0),
            (13, -0.0),
            (29, 3.25),
            (17, 0.5),
        ] {
            w[i] = v;
        }
        let w: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [1f32, 2.0, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let h: Vec<u8> = vec![0, 0, 0x80, 0x3f, 0, 0, 0, 0];
        let views = vec![
            (
                "fc.weight",
                TensorView::new(Dtype::F32, vec![3, 10], &w).unwrap(),
            ),
            ("fc.bias", TensorView::new(Dtype::F32, vec![3], &b).unwrap()),
            (
                "half.weight",
                TensorView::new(Dtype::BF16, vec![2, 2], &h).unwrap(),
            ),
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    #[test]
    fn both_formats_round_trip_the_file_byte_for_byte() {
        let input = sample();
        for format in [Format::SparseBitmask, Format::RelpruneSparse] {
            let c = compress(&input, format, |_, _| true).unwrap();
            assert_eq!(c.zeros, 25 + 3, "{format:?}");
            let file = serialize(&c.tensors, &c.metadata).unwrap();
            let (tensors, meta) = decompress(&file).unwrap();
            assert_eq!(
                serialize_dense(&tensors, &meta).unwrap(),
                input,
                "{format:?}"
            );
        }
        let c = compress(&input, Format::SparseBitmask, |_, _| true).unwrap();
        let names: Vec<&str> = c.tensors.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "fc.bias",
                "fc.bitmask",
                "fc.compressed",
                "fc.row_offsets",
                "fc.shape",
                "half.bitmask",
                "half.compressed",
                "half.row_offsets",
                "half.shape"
            ]
        );
        // Row 0 keeps columns 0 and 9: bits 0 of byte 0 and 1 of byte 1.
        assert_eq!(c.tensors["fc.bitmask"].data[..2], [0b1, 0b10]);
        assert_eq!(c.tensors["fc.row_offsets"].to_i64s("").unwrap(), [0, 2, 4]);
    }

    #[test]
    fn serialized_bytes_do_not_depend_on_hash_order_and_keep_tensors_aligned() {
        let c = compress(&sample(), Format::RelpruneSparse, |_, _| true).unwrap();
        let first = serialize(&c.tensors, &c.metadata).unwrap();
        for _ in 0..8 {
            // A fresh map gets a fresh hash seed, so its iteration order changes.
            let meta: HashMap<String, String> = c.metadata.clone().into_iter().collect();
            assert_eq!(serialize(&c.tensors, &meta).unwrap(), first);
        }
        let st = safetensors::SafeTensors::deserialize(&first).unwrap();
        for (name, view) in st.tensors() {
            let align = view.dtype().bitsize() / 8;
            assert_eq!(view.data().as_ptr() as usize % align.max(1), 0, "{name}");
        }
    }

    #[test]
    fn inconsistent_compressed_tensors_are_errors_naming_them() {
        let c = compress(&sample(), Format::SparseBitmask, |_, _| true).unwrap();
        let broken = |edit: &dyn Fn(&mut BTreeMap<String, Raw>)| {
            let mut t = c.tensors.clone();
            edit(&mut t);
            let file = serialize(&t, &HashMap::new()).unwrap();
            decompress(&file).unwrap_err().to_string()
        };
        let e = broken(&|t| t.get_mut("fc.bitmask").unwrap().data[0] |= 0b100);
        assert!(
            e.contains("`fc`") && e.contains("marks 6 entries but 5"),
            "{e}"
        );
        let e = broken(&|t| *t.get_mut("fc.row_offsets").unwrap() = Raw::i64s(&[0, 3, 4]));
        assert!(e.contains("`fc`") && e.contains("row 1"), "{e}");
        let e = broken(&|t| *t.get_mut("fc.shape").unwrap() = Raw::i64s(&[3, 20]));
        assert!(e.contains("`fc`") && e.contains("does not fit"), "{e}");
        let e = broken(&|t| {
            t.remove("fc.row_offsets");
        });
        assert!(e.contains("`fc.row_offsets` is missing"), "{e}");
        let r = compress(&sample(), Format::RelpruneSparse, |_, _| true).unwrap();
        let mut meta = r.metadata.clone();
        meta.insert(FORMAT_KEY.into(), "relprune-sparse-v9".into());
        meta.remove(ORIGINAL_HEADER);
        let e = decompress(&serialize(&r.tensors, &meta).unwrap()).unwrap_err();
        assert!(e.to_string().contains("unknown compressed format"), "{e}");
    }

    /// A safetensors file with a 40×700 f32 matrix holding a few entries, some of them more
    /// than 255 positions apart (the relprune layout then stores zero-valued fillers).
    fn far_apart() -> Vec<u8> {
        let mut w = vec![0f32; 40 * 700];
        for (k, i) in (0..w.len()).step_by(613).enumerate() {
            w[i] = k as f32 - 7.5;
        }
        w[1] = 0.25;
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![40, 700], &bytes).unwrap();
        safetensors::serialize(vec![("far.weight", view)], None).unwrap()
    }

    /// The dense f32 values of `raw` (f32 or bf16).
    fn f32s(raw: &Raw) -> Vec<f32> {
        match raw.dtype {
            Dtype::F32 => raw
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::BF16 => raw
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn compressed_matrices_decode_straight_into_the_rows_of_their_dense_tensors() {
        for input in [sample(), far_apart()] {
            for format in [Format::SparseBitmask, Format::RelpruneSparse] {
                let c = compress(&input, format, |_, _| true).unwrap();
                let file = serialize(&c.tensors, &c.metadata).unwrap();
                let st = safetensors::SafeTensors::deserialize(&file).unwrap();
                let names: Vec<String> = st.names().into_iter().map(String::from).collect();
                let (stored, _) = index(&names, &c.metadata).unwrap();
                let fetch = |n: &str| st.tensor(n).ok().map(|v| Raw::of(&v));
                let mut matrices = 0;
                for (name, how) in &stored {
                    let dense = decode(name, how, fetch).unwrap();
                    let rows = decode_rows(name, how, fetch);
                    if dense.shape.len() != 2 && *how != Stored::Dense {
                        let e = rows.unwrap_err().to_string();
                        assert!(e.contains("is not a matrix"), "{e}");
                        continue;
                    }
                    match rows.unwrap() {
                        None => assert_eq!(*how, Stored::Dense, "{name}"),
                        Some(rows) => {
                            let [r, cols] = dense.shape[..] else {
                                panic!("{name}: {:?}", dense.shape)
                            };
                            let want = Csr::from_dense(&f32s(&dense), r, cols).unwrap();
                            assert_eq!(rows, want, "{name} in {format:?}");
                            matrices += 1;
                        }
                    }
                }
                assert!(matrices >= 1, "{format:?}");
            }
        }
    }

    #[test]
    fn a_zero_gap_in_the_relprune_layout_is_an_error_naming_the_tensor() {
        let c = compress(&far_apart(), Format::RelpruneSparse, |_, _| true).unwrap();
        let mut t = c.tensors.clone();
        t.get_mut("far.weight.deltas").unwrap().data[3] = 0;
        let e = decompress(&serialize(&t, &c.metadata).unwrap()).unwrap_err();
        assert!(e.to_string().contains("`far.weight`: gap 3 is zero"), "{e}");
    }
}
