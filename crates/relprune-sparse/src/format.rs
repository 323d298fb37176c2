//! Sparse weight layouts: compressed rows with the narrowest column index that fits, and N:M
//! (at most `n` non-zeros in every group of `m` consecutive columns, stored as values plus
//! in-group offsets).

use crate::{Error, Result};

/// Column indices of a compressed-row matrix, in the narrowest type that holds `cols − 1`.
#[derive(Clone, Debug, PartialEq)]
pub enum Indices {
    /// At most 256 columns.
    U8(Vec<u8>),
    /// At most 65,536 columns.
    U16(Vec<u16>),
    /// Any width.
    U32(Vec<u32>),
}

impl Indices {
    /// Bytes per index.
    pub fn width(&self) -> usize {
        match self {
            Self::U8(_) => 1,
            Self::U16(_) => 2,
            Self::U32(_) => 4,
        }
    }

    /// Indices below `cols` in the narrowest type that holds them.
    fn narrowest(cols: usize, idx: Vec<u32>) -> Self {
        if cols <= 1 << 8 {
            Self::U8(idx.into_iter().map(|c| c as u8).collect())
        } else if cols <= 1 << 16 {
            Self::U16(idx.into_iter().map(|c| c as u16).collect())
        } else {
            Self::U32(idx)
        }
    }
}

/// A compressed-row (CSR) matrix: row `r`'s non-zeros are `values[row_ptr[r]..row_ptr[r+1]]`
/// at the columns `indices[...]`, in increasing column order.
#[derive(Clone, Debug, PartialEq)]
pub struct Csr {
    /// Rows (a linear layer's outputs).
    pub rows: usize,
    /// Columns (its inputs).
    pub cols: usize,
    /// Start of each row in `values`, and the end of the last (`rows + 1` entries).
    pub row_ptr: Vec<u32>,
    /// Column of each value.
    pub indices: Indices,
    /// The non-zeros, row by row.
    pub values: Vec<f32>,
}

/// An N:M matrix: in every group of `m` consecutive columns of a row at most `n` entries are
/// non-zero; each group stores exactly `n` (value, offset) slots, zero-valued where the group has
/// fewer non-zeros.
#[derive(Clone, Debug, PartialEq)]
pub struct NM {
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of `m`).
    pub cols: usize,
    /// Kept entries per group.
    pub n: usize,
    /// Group size.
    pub m: usize,
    /// `rows × (cols / m) × n` values.
    pub values: Vec<f32>,
    /// The in-group column offset of each value (`< m`).
    pub offsets: Vec<u8>,
}

/// A sparse weight matrix in one of the layouts the kernels run.
#[derive(Clone, Debug, PartialEq)]
pub enum SparseWeight {
    /// Compressed rows (any sparsity pattern).
    Csr(Csr),
    /// N:M structured sparsity.
    NM(NM),
}

impl Csr {
    /// The compressed rows of a row-major `rows × cols` matrix (its exact zeros, `-0.0`
    /// included, are left out).
    pub fn from_dense(dense: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(dense.len()) {
            return Err(Error::Shape(format!(
                "{} values do not make a {rows}×{cols} matrix",
                dense.len()
            )));
        }
        let mut rows_of = CsrBuilder::new(rows, cols)?;
        for (i, &v) in dense.iter().enumerate() {
            rows_of.push(i, v)?;
        }
        Ok(rows_of.finish())
    }

    /// Non-zeros stored.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// The column of every stored entry, in storage order.
    pub fn columns(&self) -> Vec<usize> {
        match &self.indices {
            Indices::U8(i) => i.iter().map(|&c| c as usize).collect(),
            Indices::U16(i) => i.iter().map(|&c| c as usize).collect(),
            Indices::U32(i) => i.iter().map(|&c| c as usize).collect(),
        }
    }

    /// The columns holding some entry (increasing), and the matrix restricted to them (column
    /// `k` of the result is column `used[k]` of this one).
    pub fn compact_columns(&self) -> (Vec<usize>, Csr) {
        let cols = self.columns();
        let mut position = vec![usize::MAX; self.cols];
        for &c in &cols {
            position[c] = 0;
        }
        let used: Vec<usize> = (0..self.cols).filter(|&c| position[c] == 0).collect();
        for (k, &c) in used.iter().enumerate() {
            position[c] = k;
        }
        let compact = Csr {
            rows: self.rows,
            cols: used.len(),
            row_ptr: self.row_ptr.clone(),
            indices: Indices::narrowest(
                used.len(),
                cols.iter().map(|&c| position[c] as u32).collect(),
            ),
            values: self.values.clone(),
        };
        (used, compact)
    }
}

impl NM {
    /// The N:M layout of a row-major `rows × cols` matrix whose every group of `m` columns holds
    /// at most `n` non-zeros; an error naming the first group that holds more.
    pub fn from_dense(dense: &[f32], rows: usize, cols: usize, n: usize, m: usize) -> Result<Self> {
        Self::from_csr(&Csr::from_dense(dense, rows, cols)?, n, m)
    }

    /// The N:M layout of compressed rows whose every group of `m` columns holds at most `n`
    /// entries; an error naming the first group that holds more.
    pub fn from_csr(csr: &Csr, n: usize, m: usize) -> Result<Self> {
        let (rows, cols) = (csr.rows, csr.cols);
        if n == 0 || m == 0 || n > m || m > 255 || !cols.is_multiple_of(m) {
            return Err(Error::Shape(format!(
                "{n}:{m} needs 0 < n ≤ m ≤ 255 and the {cols} columns a multiple of m"
            )));
        }
        let groups = cols / m;
        let mut values = vec![0f32; rows * groups * n];
        let mut offsets = vec![0u8; rows * groups * n];
        let columns = csr.columns();
        for r in 0..rows {
            let (start, end) = (csr.row_ptr[r] as usize, csr.row_ptr[r + 1] as usize);
            // Entries of a row come in increasing column order: fill each group's slots in turn.
            let mut filled = (usize::MAX, 0usize);
            for k in start..end {
                let (g, j) = (columns[k] / m, columns[k] % m);
                let used = if filled.0 == g { filled.1 } else { 0 };
                if used == n {
                    let in_group = columns[start..end].iter().filter(|&&c| c / m == g).count();
                    return Err(Error::Value(format!(
                        "row {r}, columns {}..{}: {in_group} non-zeros, more than {n} of {m}",
                        g * m,
                        (g + 1) * m,
                    )));
                }
                let slot = (r * groups + g) * n + used;
                values[slot] = csr.values[k];
                offsets[slot] = j as u8;
                filled = (g, used + 1);
            }
        }
        Ok(Self {
            rows,
            cols,
            n,
            m,
            values,
            offsets,
        })
    }
}

/// Builds compressed rows from a matrix's entries given in row-major order (the one way this
/// crate makes a [`Csr`]: from a dense buffer or straight from a compressed file).
#[derive(Debug)]
pub struct CsrBuilder {
    rows: usize,
    cols: usize,
    row_ptr: Vec<u32>,
    idx: Vec<u32>,
    values: Vec<f32>,
    /// The smallest position the next entry may have.
    next: usize,
}

impl CsrBuilder {
    /// An empty `rows × cols` matrix; one with more entries than compressed rows index (2^32)
    /// is an error.
    pub fn new(rows: usize, cols: usize) -> Result<Self> {
        if rows > 0
            && rows
                .checked_mul(cols)
                .and_then(|n| u32::try_from(n).ok())
                .is_none()
        {
            return Err(Error::Shape(format!(
                "a {rows}×{cols} matrix has more entries than compressed rows index (2^32)"
            )));
        }
        let mut row_ptr = Vec::with_capacity(rows + 1);
        row_ptr.push(0);
        Ok(Self {
            rows,
            cols,
            row_ptr,
            idx: Vec::new(),
            values: Vec::new(),
            next: 0,
        })
    }

    /// Adds `value` at row-major `position` (`row · cols + col`); exact zeros (`-0.0` included)
    /// are left out. A position past the matrix, a non-zero not after the previous one, and a
    /// value that is not finite are errors.
    pub fn push(&mut self, position: usize, value: f32) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        if position >= rows * cols {
            return Err(Error::Shape(format!(
                "entry at position {position} is past the end of a {rows}×{cols} matrix"
            )));
        }
        if !value.is_finite() {
            return Err(Error::Value(format!(
                "entry ({}, {}) is {value}; sparse layouts hold finite weights only",
                position / cols,
                position % cols
            )));
        }
        if value == 0.0 {
            return Ok(());
        }
        if position < self.next {
            return Err(Error::Shape(format!(
                "entry ({}, {}) comes after a later one (entries must be in row-major order)",
                position / cols,
                position % cols
            )));
        }
        self.next = position + 1;
        let row = position / cols;
        while self.row_ptr.len() <= row {
            self.row_ptr.push(self.values.len() as u32);
        }
        self.idx.push((position % cols) as u32);
        self.values.push(value);
        Ok(())
    }

    /// The matrix, with the narrowest column index that fits.
    pub fn finish(mut self) -> Csr {
        while self.row_ptr.len() <= self.rows {
            self.row_ptr.push(self.values.len() as u32);
        }
        let cols = self.cols;
        Csr {
            rows: self.rows,
            cols,
            row_ptr: self.row_ptr,
            indices: Indices::narrowest(cols, self.idx),
            values: self.values,
        }
    }
}

impl SparseWeight {
    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Csr(w) => (w.rows, w.cols),
            Self::NM(w) => (w.rows, w.cols),
        }
    }

    /// The fraction of entries stored as non-zero slots (N:M: `n / m`).
    pub fn density(&self) -> f64 {
        let (r, c) = self.dims();
        let stored = match self {
            Self::Csr(w) => w.nnz(),
            Self::NM(w) => w.values.len(),
        };
        stored as f64 / (r * c).max(1) as f64
    }

    /// Bytes of the layout's arrays.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Csr(w) => w.values.len() * (4 + w.indices.width()) + w.row_ptr.len() * 4,
            Self::NM(w) => w.values.len() * 5,
        }
    }

    /// The same matrix as compressed rows.
    pub fn to_csr(&self) -> Csr {
        let (rows, cols) = self.dims();
        let mut row_ptr = Vec::with_capacity(rows + 1);
        let (mut idx, mut values) = (Vec::new(), Vec::new());
        row_ptr.push(0u32);
        for r in 0..rows {
            self.for_row(r, |c, v| {
                idx.push(c as u32);
                values.push(v);
            });
            row_ptr.push(values.len() as u32);
        }
        Csr {
            rows,
            cols,
            row_ptr,
            indices: Indices::narrowest(cols, idx),
            values,
        }
    }

    /// The matrix, dense and row-major again.
    pub fn to_dense(&self) -> Vec<f32> {
        let (rows, cols) = self.dims();
        let mut out = vec![0f32; rows * cols];
        for r in 0..rows {
            self.for_row(r, |c, v| out[r * cols + c] = v);
        }
        out
    }

    /// Calls `f(column, value)` for the stored entries of row `r`, in increasing column order.
    #[inline]
    pub fn for_row(&self, r: usize, mut f: impl FnMut(usize, f32)) {
        match self {
            Self::Csr(w) => {
                let (a, b) = (w.row_ptr[r] as usize, w.row_ptr[r + 1] as usize);
                let values = &w.values[a..b];
                match &w.indices {
                    Indices::U8(i) => values
                        .iter()
                        .zip(&i[a..b])
                        .for_each(|(&v, &c)| f(c as usize, v)),
                    Indices::U16(i) => values
                        .iter()
                        .zip(&i[a..b])
                        .for_each(|(&v, &c)| f(c as usize, v)),
                    Indices::U32(i) => values
                        .iter()
                        .zip(&i[a..b])
                        .for_each(|(&v, &c)| f(c as usize, v)),
                }
            }
            Self::NM(w) => {
                let per_row = w.cols / w.m * w.n;
                let (values, offsets) = (
                    &w.values[r * per_row..(r + 1) * per_row],
                    &w.offsets[r * per_row..(r + 1) * per_row],
                );
                for (k, (&v, &o)) in values.iter().zip(offsets).enumerate() {
                    if v != 0.0 {
                        f((k / w.n) * w.m + o as usize, v);
                    }
                }
            }
        }
    }
}
