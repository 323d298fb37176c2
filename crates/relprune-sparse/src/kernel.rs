//! `y = x·Wᵀ (+ b)` for a sparse `W` (`rows × cols`) and a dense row-major `x` (`batch × cols`).
//!
//! Two kernels, chosen by the batch: small batches take a dot product per output over the row's
//! non-zeros (gathering the inputs they need); large batches are cut into tiles of [`TILE`]
//! inputs, each transposed so that a non-zero `(o, c)` adds `w·x[:, c]` to output `o` as one
//! contiguous, vectorized axpy over the tile. Both sum every output in the same order (its row's
//! non-zeros in column order, then the bias), and the work is split in fixed pieces, so results
//! do not depend on the kernel or the number of threads.

use rayon::prelude::*;

use crate::format::SparseWeight;
use crate::{Error, Result};

/// Batches up to this size run the gather kernel.
pub const GATHER_MAX_BATCH: usize = 16;

/// Inputs per tile of the axpy kernel: the transposed tile (`cols × TILE` floats) stays in the
/// L2 cache for the layer widths of BERT-sized models.
pub const TILE: usize = 64;

/// Output rows per task of the gather kernel (a fixed split: determinism, not load balance).
const ROWS_PER_TASK: usize = 64;

/// `y = x·Wᵀ (+ b)` into `y` (`batch × rows`, row-major).
pub fn matmul_t(
    x: &[f32],
    batch: usize,
    w: &SparseWeight,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let (rows, cols) = w.dims();
    if x.len() != batch * cols {
        return Err(Error::Shape(format!(
            "input has {} values, not {batch} rows of {cols}",
            x.len()
        )));
    }
    if y.len() != batch * rows {
        return Err(Error::Shape(format!(
            "output has {} values, not {batch} rows of {rows}",
            y.len()
        )));
    }
    if let Some(b) = bias.filter(|b| b.len() != rows) {
        return Err(Error::Shape(format!(
            "bias has {} values for {rows} outputs",
            b.len()
        )));
    }
    if batch == 0 || rows == 0 {
        return Ok(());
    }
    if batch <= GATHER_MAX_BATCH {
        gather(x, batch, w, bias, y);
    } else {
        tiled(x, batch, w, bias, y);
    }
    Ok(())
}

/// One dot product per output: for small batches, where the inputs fit in cache anyway.
fn gather(x: &[f32], batch: usize, w: &SparseWeight, bias: Option<&[f32]>, y: &mut [f32]) {
    let (rows, cols) = w.dims();
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    // Each task fills its outputs for the whole batch (rows-major), scattered into `y` after.
    let parts: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(rows));
            let mut out = vec![0f32; (r1 - r0) * batch];
            for (i, r) in (r0..r1).enumerate() {
                let acc = &mut out[i * batch..(i + 1) * batch];
                w.for_row(r, |c, v| {
                    for (b, a) in acc.iter_mut().enumerate() {
                        *a += v * x[b * cols + c];
                    }
                });
                if let Some(bias) = bias {
                    acc.iter_mut().for_each(|a| *a += bias[r]);
                }
            }
            out
        })
        .collect();
    for (t, part) in parts.iter().enumerate() {
        let r0 = t * ROWS_PER_TASK;
        let n = part.len() / batch;
        for i in 0..n {
            for b in 0..batch {
                y[b * rows + r0 + i] = part[i * batch + b];
            }
        }
    }
}

/// Tiles of [`TILE`] inputs, each transposed, every non-zero an axpy over the tile.
fn tiled(x: &[f32], _batch: usize, w: &SparseWeight, bias: Option<&[f32]>, y: &mut [f32]) {
    let (rows, cols) = w.dims();
    y.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(t, out)| {
            let b0 = t * TILE;
            let bt = out.len() / rows;
            let mut xt = vec![0f32; cols * bt];
            for j in 0..bt {
                let row = &x[(b0 + j) * cols..(b0 + j + 1) * cols];
                for (c, &v) in row.iter().enumerate() {
                    xt[c * bt + j] = v;
                }
            }
            let mut acc = vec![0f32; bt];
            for r in 0..rows {
                acc.iter_mut().for_each(|a| *a = 0.0);
                w.for_row(r, |c, v| {
                    for (a, &xv) in acc.iter_mut().zip(&xt[c * bt..(c + 1) * bt]) {
                        *a += v * xv;
                    }
                });
                let b = bias.map_or(0.0, |b| b[r]);
                for (j, &a) in acc.iter().enumerate() {
                    out[j * rows + r] = if bias.is_some() { a + b } else { a };
                }
            }
        });
}
