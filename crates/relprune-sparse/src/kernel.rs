//! `y = x·Wᵀ (+ b)` for a sparse `W` (`rows × cols`) and a dense row-major `x` (`batch × cols`).
//!
//! The batch is cut into tiles of up to [`TILE`] inputs; each tile is transposed (`cols ×
//! width`) so that a non-zero `(r, c)` of `W` adds `w·x[:, c]` to output `r` as one contiguous
//! multiply-add over the tile, with the output row's accumulators in vector registers. The columns
//! are walked in blocks whose slice of the transposed tile fits in the L1 cache (each row's
//! non-zeros are split by block up front), so the inputs a non-zero needs come from L1, and the
//! accumulators of a row are kept between blocks in a buffer that fits in L2. A single input
//! (batch 1) takes a dot product per output instead.
//!
//! Work is split into fixed (tile, block of rows) tasks and every output is summed by one task
//! in one order, so results do not depend on the number of threads. On x86-64 CPUs with AVX2
//! and FMA (detected at run time) the loops are compiled for them.

use rayon::prelude::*;

use crate::format::{Indices, SparseWeight};
use crate::{Error, Result};

/// Runs `$body` with `$v` bound to the typed [`Rows`] view of `$w`.
macro_rules! with_rows {
    ($w:expr, |$v:ident| $body:expr) => {
        match $w {
            SparseWeight::Csr(m) => match &m.indices {
                Indices::U8(i) => {
                    let $v = &CsrRows {
                        row_ptr: &m.row_ptr,
                        indices: i,
                        values: &m.values,
                    };
                    $body
                }
                Indices::U16(i) => {
                    let $v = &CsrRows {
                        row_ptr: &m.row_ptr,
                        indices: i,
                        values: &m.values,
                    };
                    $body
                }
                Indices::U32(i) => {
                    let $v = &CsrRows {
                        row_ptr: &m.row_ptr,
                        indices: i,
                        values: &m.values,
                    };
                    $body
                }
            },
            SparseWeight::NM(m) => {
                let $v = &NmRows {
                    per_row: m.cols / m.m * m.n,
                    n: m.n,
                    m: m.m,
                    values: &m.values,
                    offsets: &m.offsets,
                };
                $body
            }
        }
    };
}

/// The widest tile of inputs when the columns are walked in one pass: a row's accumulators
/// fill eight AVX registers, the transposed tile (`cols × TILE` floats) stays in L2.
pub const TILE: usize = 64;

/// The widest tile when the columns are walked in L1-sized blocks: a row's accumulators fill
/// four AVX registers (twice, to hide the multiply-add latency), and a task's accumulator buffer
/// (`rows × BLOCKED_TILE` floats) stays in L2.
pub const BLOCKED_TILE: usize = 32;

/// Densities from which the columns are walked in blocks: below it a row has too few non-zeros
/// per block for the blocks to pay for keeping its accumulators between them.
pub const BLOCKED_MIN_DENSITY: f64 = 0.15;

/// Bytes of the transposed tile one column block covers: most of a 32 KiB L1 data cache.
const L1_BLOCK_BYTES: usize = 24 << 10;

/// Output rows per task when there are too few tiles to go round (a fixed split: the same tasks
/// whatever the thread count).
const ROWS_PER_TASK: usize = 128;

/// Tiles at which every tile is a task of its own.
const MIN_TILES_ALONE: usize = 8;

/// The fraction of a layer's columns up to which its used columns alone are transposed.
const COMPACT_MAX_USED: f64 = 0.75;

/// Multiply-adds (inputs × stored non-zeros) up to which a product runs on the calling thread.
const INLINE_MAX_WORK: f64 = 65_536.0;

/// Output rows written out together (contiguous runs of whole cache lines per input).
const ROW_BLOCK: usize = 16;

/// A sparse weight ready for the kernels: the layout, and (dense enough layouts) how its
/// columns are walked in blocks, worked out once.
#[derive(Debug)]
pub struct Prepared {
    weight: SparseWeight,
    plan: Option<Plan>,
    /// For a weight many of whose columns hold nothing: the columns that do, and the weight on
    /// them alone (with its own plan). Tiles of inputs then transpose only those columns: with
    /// very sparse layers the transposition, not the product, is most of the time.
    compact: Option<(Vec<usize>, SparseWeight, Option<Plan>)>,
}

impl Prepared {
    /// `weight` with its plan. An N:M weight runs as compressed rows: the kernels' cost is per
    /// stored non-zero either way, and the rows' explicit columns spare a division per entry
    /// (measured: 2:4 in its own layout ran 1.3–2× slower than the same weight as rows).
    pub fn new(weight: SparseWeight) -> Self {
        let weight = match weight {
            SparseWeight::NM(m) => SparseWeight::Csr(SparseWeight::NM(m).to_csr()),
            csr => csr,
        };
        let plan = (weight.density() >= BLOCKED_MIN_DENSITY).then(|| Plan::new(&weight));
        let compact = match &weight {
            SparseWeight::Csr(m) => {
                let (used, c) = m.compact_columns();
                (used.len() as f64 <= COMPACT_MAX_USED * m.cols as f64).then(|| {
                    let c = SparseWeight::Csr(c);
                    let plan = (c.density() >= BLOCKED_MIN_DENSITY).then(|| Plan::new(&c));
                    (used, c, plan)
                })
            }
            SparseWeight::NM(_) => None,
        };
        Self {
            weight,
            plan,
            compact,
        }
    }

    /// The layout.
    pub fn weight(&self) -> &SparseWeight {
        &self.weight
    }

    /// `y = x·Wᵀ (+ b)` into `y` (`batch × rows`, row-major).
    pub fn matmul_t(
        &self,
        x: &[f32],
        batch: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        let compact = self
            .compact(simd_available())
            .map(|(used, w, plan)| (used.as_slice(), w, plan.as_ref()));
        run(x, batch, &self.weight, self.plan.as_ref(), compact, bias, y)
    }

    /// The product on inputs already laid out as the kernels take them: `xt` holds, for each of
    /// the weight's columns, `width` inputs (8, 16, 32 or 64; the first `n` count), and
    /// `out[r·stride + j] = Σ_c W[r, c]·xt[c·width + j] (+ b[r])` for `j < n`. A convolution's
    /// receptive fields (im2col: one row per weight column, one column per output position) are
    /// this layout already, and its outputs land channel by channel, as NCHW wants them.
    pub fn matmul_pretransposed(
        &self,
        xt: &[f32],
        width: usize,
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        stride: usize,
    ) -> Result<()> {
        let (rows, cols) = self.weight.dims();
        if ![8, 16, 32, 64].contains(&width) || n > width || xt.len() != cols * width {
            return Err(Error::Shape(format!(
                "pre-transposed input: {} values for {cols} columns of width {width} ({n} used; \
                 widths are 8, 16, 32 or 64)",
                xt.len()
            )));
        }
        if rows > 0 && n > 0 && (stride < n || out.len() < (rows - 1) * stride + n) {
            return Err(Error::Shape(format!(
                "output of {} values for {rows} rows of {n} at a stride of {stride}",
                out.len()
            )));
        }
        check_bias(bias, rows)?;
        let simd = simd_available();
        let w = &self.weight;
        macro_rules! go {
            ($s:literal) => {{
                let acc: Vec<[f32; $s]> = with_rows!(w, |v| acc_all::<$s, _>(xt, v, rows, simd));
                for (r, a) in acc.iter().enumerate() {
                    let b = bias.map_or(0.0, |b| b[r]);
                    for (o, &v) in out[r * stride..r * stride + n].iter_mut().zip(a) {
                        *o = v + b;
                    }
                }
            }};
        }
        match width {
            8 => go!(8),
            16 => go!(16),
            32 => go!(32),
            _ => go!(64),
        }
        Ok(())
    }

    /// The weight on its used columns, when transposing those alone pays: always where
    /// transposing is scalar; with vector transposes (8×8 blocks of whole columns, about four
    /// times cheaper per value than gathering scattered columns) only for a quarter of the
    /// columns or fewer.
    fn compact(&self, simd: bool) -> Option<&(Vec<usize>, SparseWeight, Option<Plan>)> {
        self.compact
            .as_ref()
            .filter(|(used, _, _)| !simd || used.len() * 4 <= self.weight.dims().1)
    }
}

/// `y = x·Wᵀ (+ b)` into `y` (`batch × rows`, row-major); [`Prepared::matmul_t`] without
/// keeping the plan between calls.
pub fn matmul_t(
    x: &[f32],
    batch: usize,
    w: &SparseWeight,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let plan = (w.density() >= BLOCKED_MIN_DENSITY).then(|| Plan::new(w));
    run(x, batch, w, plan.as_ref(), None, bias, y)
}

/// A weight restricted to its used columns: the columns, the weight on them, its plan.
type Compact<'a> = (&'a [usize], &'a SparseWeight, Option<&'a Plan>);

fn run(
    x: &[f32],
    batch: usize,
    w: &SparseWeight,
    plan: Option<&Plan>,
    compact: Option<Compact>,
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
    check_bias(bias, rows)?;
    if batch == 0 || rows == 0 {
        return Ok(());
    }
    let simd = simd_available();
    // Below this much work, or with a pool of one thread, a product runs on the calling thread:
    // handing tasks to the pool costs microseconds (two context switches), more than a small
    // sparse layer's whole product. The tasks are the same either way, so the result is too.
    let inline = (batch as f64) * w.density() * (rows * cols) as f64 <= INLINE_MAX_WORK
        || rayon::current_num_threads() == 1;
    if batch == 1 {
        // One input: split the rows, each block's outputs written in place.
        let task = |(k, out): (usize, &mut [f32])| {
            let r0 = k * ROWS_PER_TASK;
            with_rows!(w, |v| dots(x, v, r0..r0 + out.len(), out, simd));
            add_bias(out, 1, bias, r0);
        };
        if inline {
            y.chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
        } else {
            y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
        }
        return Ok(());
    }
    // From here on the inputs are transposed tile by tile: only the used columns, if few.
    let (used, w, plan) = match compact {
        Some((used, w, plan)) => (Some(used), w, plan),
        None => (None, w, plan),
    };
    let transpose = |b0: usize, n: usize, width: usize| {
        transpose(&x[b0 * cols..(b0 + n) * cols], n, cols, used, width)
    };
    let tile = if plan.is_some() { BLOCKED_TILE } else { TILE };
    let tiles: Vec<(usize, usize)> = (0..batch)
        .step_by(tile)
        .map(|b0| (b0, (batch - b0).min(tile)))
        .collect();
    let width_for = |n: usize| width_for(n, tile);
    if tiles.len() >= MIN_TILES_ALONE || inline {
        // Enough tiles to go round (or work too small to share): one task per tile, writing
        // its rows of `y` in place.
        let task = |(out, &(b0, n)): (&mut [f32], &(usize, usize))| {
            let t = transpose(b0, n, width_for(n));
            tile_rows(&t, n, w, plan, 0..rows, out, rows, simd);
            add_bias(out, n, bias, 0);
        };
        if inline {
            y.chunks_mut(tile * rows).zip(&tiles).for_each(task);
        } else {
            y.par_chunks_mut(tile * rows).zip(&tiles).for_each(task);
        }
        return Ok(());
    }
    // Few inputs: every (tile, block of rows) is a task, scattered into `y` after.
    let transposed: Vec<Vec<f32>> = tiles
        .iter()
        .map(|&(b0, n)| transpose(b0, n, width_for(n)))
        .collect();
    let blocks = rows.div_ceil(ROWS_PER_TASK);
    let tasks: Vec<(usize, usize)> = (0..tiles.len())
        .flat_map(|t| (0..blocks).map(move |k| (t, k)))
        .collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(t, k)| {
            let (r0, r1) = (k * ROWS_PER_TASK, ((k + 1) * ROWS_PER_TASK).min(rows));
            let n = tiles[t].1;
            let mut out = vec![0f32; (r1 - r0) * n];
            tile_rows(&transposed[t], n, w, plan, r0..r1, &mut out, r1 - r0, simd);
            add_bias(&mut out, n, bias, r0);
            out
        })
        .collect();
    for (&(t, k), part) in tasks.iter().zip(&parts) {
        let (b0, n) = tiles[t];
        let (r0, width) = (k * ROWS_PER_TASK, part.len() / n);
        for j in 0..n {
            let dst = (b0 + j) * rows + r0;
            y[dst..dst + width].copy_from_slice(&part[j * width..(j + 1) * width]);
        }
    }
    Ok(())
}

/// The width a tile of `n ≤ 64` inputs is padded to for [`Prepared::matmul_pretransposed`].
pub fn tile_width(n: usize) -> usize {
    width_for(n, TILE)
}

/// The width a tile of `n` inputs is padded to: one the loops are specialized for, at most
/// `tile`.
fn width_for(n: usize, tile: usize) -> usize {
    [8, 16, 32, 64]
        .into_iter()
        .find(|&s| s >= n)
        .unwrap_or(tile)
        .min(tile)
}

/// A bias must hold one value per output.
pub fn check_bias(bias: Option<&[f32]>, rows: usize) -> Result<()> {
    match bias.filter(|b| b.len() != rows) {
        Some(b) => Err(Error::Shape(format!(
            "bias has {} values for {rows} outputs",
            b.len()
        ))),
        None => Ok(()),
    }
}

/// `out` (`n × width`, input-major) += the bias of the rows from `r0`.
fn add_bias(out: &mut [f32], n: usize, bias: Option<&[f32]>, r0: usize) {
    if let Some(b) = bias {
        let width = out.len() / n;
        for row in out.chunks_exact_mut(width) {
            for (o, &b) in row.iter_mut().zip(&b[r0..r0 + width]) {
                *o += b;
            }
        }
    }
}

/// A tile of `n` inputs transposed to `k × width` (`k`: the `used` columns, else all `cols`),
/// zero beyond the `n`-th column.
fn transpose(x: &[f32], n: usize, cols: usize, used: Option<&[usize]>, width: usize) -> Vec<f32> {
    let k = used.map_or(cols, <[usize]>::len);
    let mut data = vec![0f32; k * width];
    let simd = simd_available();
    // Blocks of 8 inputs × 8 columns, gathered into registers and written as runs of 8 (widths
    // are multiples of 8). Inputs outermost: the 8 rows being read are swept front to back, 8
    // streams the prefetcher follows (the tile's input usually comes from memory, not cache).
    for j0 in (0..n).step_by(8) {
        let j1 = (j0 + 8).min(n);
        for c0 in (0..k).step_by(8) {
            let c1 = (c0 + 8).min(k);
            #[cfg(target_arch = "x86_64")]
            if simd && used.is_none() && j1 - j0 == 8 && c1 - c0 == 8 {
                let src = &x[j0 * cols..(j0 + 7) * cols + c0 + 8];
                let dst = &mut data[c0 * width + j0..(c0 + 7) * width + j0 + 8];
                // SAFETY: AVX2 was detected; `src` holds rows j0..j0+8 from column c0 on for 8
                // columns and `dst` the 8 runs of 8 written, as the slices' bounds checked.
                unsafe { transpose8_avx2(src, c0, cols, dst, width) };
                continue;
            }
            let mut block = [[0f32; 8]; 8];
            for j in j0..j1 {
                let row = &x[j * cols..(j + 1) * cols];
                match used {
                    Some(used) => {
                        for (i, &c) in used[c0..c1].iter().enumerate() {
                            block[i][j - j0] = row[c];
                        }
                    }
                    None => {
                        for (i, &v) in row[c0..c1].iter().enumerate() {
                            block[i][j - j0] = v;
                        }
                    }
                }
            }
            for (i, b) in block[..c1 - c0].iter().enumerate() {
                let at = (c0 + i) * width + j0;
                data[at..at + 8].copy_from_slice(b);
            }
        }
    }
    let _ = simd;
    data
}

/// 8 rows × 8 columns of `src` (rows `cols` apart, from column `c0` of the first) into 8 runs
/// of `dst` (`width` apart): `dst[i·width + j] = src[j·cols + c0 + i]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8_avx2(src: &[f32], c0: usize, cols: usize, dst: &mut [f32], width: usize) {
    use std::arch::x86_64::*;
    debug_assert!(src.len() >= 7 * cols + c0 + 8 && dst.len() >= 7 * width + 8);
    let p = src.as_ptr().add(c0);
    let r = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(cols)),
        _mm256_loadu_ps(p.add(2 * cols)),
        _mm256_loadu_ps(p.add(3 * cols)),
        _mm256_loadu_ps(p.add(4 * cols)),
        _mm256_loadu_ps(p.add(5 * cols)),
        _mm256_loadu_ps(p.add(6 * cols)),
        _mm256_loadu_ps(p.add(7 * cols)),
    ];
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    let q = dst.as_mut_ptr();
    for (i, o) in out.iter().enumerate() {
        _mm256_storeu_ps(q.add(i * width), *o);
    }
}

/// How the columns are walked: blocks of columns whose slice of a full transposed tile fits in
/// L1, and where each row's non-zeros of each block start.
#[derive(Debug)]
pub struct Plan {
    blocks: usize,
    /// `rows × (blocks + 1)`: the entry (within its row) where each block starts, and the end.
    starts: Vec<u32>,
}

impl Plan {
    fn new(w: &SparseWeight) -> Self {
        let (rows, cols) = w.dims();
        let mut block = L1_BLOCK_BYTES / (4 * BLOCKED_TILE);
        if let SparseWeight::NM(m) = w {
            // N:M groups never straddle a block.
            block = block.div_ceil(m.m) * m.m;
        }
        let blocks = cols.div_ceil(block).max(1);
        let mut starts = Vec::with_capacity(rows * (blocks + 1));
        for r in 0..rows {
            with_rows!(w, |v| {
                let len = v.len(r);
                let mut k = 0usize;
                for b in 0..blocks {
                    while k < len && v.col(r, k) < b * block {
                        k += 1;
                    }
                    starts.push(k as u32);
                }
                starts.push(len as u32);
            });
        }
        Self { blocks, starts }
    }
}

/// Random access to the stored entries of a layout's rows, inlined into the kernels (no
/// closures: their arithmetic must be compiled with the kernels' target features).
trait Rows: Sync {
    /// Entries stored in row `r`.
    fn len(&self, r: usize) -> usize;
    /// Column of entry `k` of row `r`.
    fn col(&self, r: usize, k: usize) -> usize;
    /// Value of entry `k` of row `r`.
    fn value(&self, r: usize, k: usize) -> f32;
}

/// A compressed-row matrix with its column indices typed.
struct CsrRows<'a, I> {
    row_ptr: &'a [u32],
    indices: &'a [I],
    values: &'a [f32],
}

impl<I: Copy + Into<u32> + Sync> Rows for CsrRows<'_, I> {
    #[inline(always)]
    fn len(&self, r: usize) -> usize {
        (self.row_ptr[r + 1] - self.row_ptr[r]) as usize
    }
    #[inline(always)]
    fn col(&self, r: usize, k: usize) -> usize {
        let i: u32 = self.indices[self.row_ptr[r] as usize + k].into();
        i as usize
    }
    #[inline(always)]
    fn value(&self, r: usize, k: usize) -> f32 {
        self.values[self.row_ptr[r] as usize + k]
    }
}

/// An N:M matrix.
struct NmRows<'a> {
    per_row: usize,
    n: usize,
    m: usize,
    values: &'a [f32],
    offsets: &'a [u8],
}

impl Rows for NmRows<'_> {
    #[inline(always)]
    fn len(&self, _r: usize) -> usize {
        self.per_row
    }
    #[inline(always)]
    fn col(&self, r: usize, k: usize) -> usize {
        (k / self.n) * self.m + self.offsets[r * self.per_row + k] as usize
    }
    #[inline(always)]
    fn value(&self, r: usize, k: usize) -> f32 {
        self.values[r * self.per_row + k]
    }
}

/// Whether the AVX2 + FMA versions of the loops can run here.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One input: `out[i] = Σ w[r, c]·x[c]` for the rows `r` of `rows`.
fn dots<V: Rows>(x: &[f32], v: &V, rows: std::ops::Range<usize>, out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        unsafe { dots_avx2(x, v, rows, out) };
        return;
    }
    let _ = simd;
    dots_generic(x, v, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<V: Rows>(x: &[f32], v: &V, rows: std::ops::Range<usize>, out: &mut [f32]) {
    dots_generic(x, v, rows, out)
}

#[inline(always)]
fn dots_generic<V: Rows>(x: &[f32], v: &V, rows: std::ops::Range<usize>, out: &mut [f32]) {
    for (o, r) in out.iter_mut().zip(rows) {
        let len = v.len(r);
        // Eight independent accumulators over whole groups of eight entries, then the rest:
        // fixed slots, so they stay in registers.
        let mut acc = [0f32; 8];
        let mut k = 0;
        while k + 8 <= len {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = v.value(r, k + i).mul_add(x[v.col(r, k + i)], *a);
            }
            k += 8;
        }
        let mut rest = 0f32;
        while k < len {
            rest = v.value(r, k).mul_add(x[v.col(r, k)], rest);
            k += 1;
        }
        *o = (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])))
            + rest;
    }
}

/// The rows `rows` of a transposed tile of `n` inputs into `out` (`n × stride`, input-major:
/// output `r` of input `j` at `j·stride + (r − rows.start)`).
#[allow(clippy::too_many_arguments)]
fn tile_rows(
    xt: &[f32],
    n: usize,
    w: &SparseWeight,
    plan: Option<&Plan>,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    stride: usize,
    simd: bool,
) {
    macro_rules! run {
        ($s:expr, $v:expr) => {{
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2 and FMA were detected on this CPU.
                unsafe { rows_avx2::<$s, _>(xt, $v, plan, rows, n, out, stride) };
                return;
            }
            let _ = simd;
            rows_generic::<$s, _>(xt, $v, plan, rows, n, out, stride)
        }};
    }
    with_rows!(w, |v| match xt.len() / w.dims().1 {
        8 => run!(8, v),
        16 => run!(16, v),
        32 => run!(32, v),
        _ => run!(64, v),
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const S: usize, V: Rows>(
    xt: &[f32],
    v: &V,
    plan: Option<&Plan>,
    rows: std::ops::Range<usize>,
    n: usize,
    out: &mut [f32],
    stride: usize,
) {
    rows_generic::<S, V>(xt, v, plan, rows, n, out, stride)
}

/// The rows of a transposed tile of width `S`, column block by column block; each row's `S`
/// accumulators (two sets, alternating non-zeros, so that consecutive multiply-adds do not wait
/// for each other) live in registers while its non-zeros of a block are added.
#[inline(always)]
fn rows_generic<const S: usize, V: Rows>(
    xt: &[f32],
    v: &V,
    plan: Option<&Plan>,
    rows: std::ops::Range<usize>,
    n: usize,
    out: &mut [f32],
    stride: usize,
) {
    let start = rows.start;
    let acc = tile_acc::<S, V>(xt, v, plan, rows);
    // Written input by input, as contiguous runs of `ROW_BLOCK` outputs.
    for (i0, chunk) in acc.chunks(ROW_BLOCK).enumerate() {
        let r = start + i0 * ROW_BLOCK;
        for j in 0..n {
            let dst = &mut out[j * stride + r - start..j * stride + r - start + chunk.len()];
            for (d, a) in dst.iter_mut().zip(chunk) {
                *d = a[j];
            }
        }
    }
}

/// The accumulators of the rows `rows` over a transposed tile of width `S` (row-major: `S`
/// inputs per row, the layout of the next layer's transposed tile).
#[inline(always)]
fn tile_acc<const S: usize, V: Rows>(
    xt: &[f32],
    v: &V,
    plan: Option<&Plan>,
    rows: std::ops::Range<usize>,
) -> Vec<[f32; S]> {
    let mut acc = vec![[0f32; S]; rows.len()];
    let blocks = plan.map_or(1, |p| p.blocks);
    let x_at = |c: usize| -> &[f32; S] { xt[c * S..(c + 1) * S].try_into().expect("tile width") };
    for b in 0..blocks {
        for (slot, r) in acc.iter_mut().zip(rows.clone()) {
            let (k0, k1) = match plan {
                Some(p) => {
                    let at = r * (p.blocks + 1) + b;
                    (p.starts[at] as usize, p.starts[at + 1] as usize)
                }
                None => (0, v.len(r)),
            };
            if k0 == k1 {
                continue;
            }
            let (mut a, mut a2) = (*slot, [0f32; S]);
            let mut k = k0;
            while k + 1 < k1 {
                let (x0, w0) = (x_at(v.col(r, k)), v.value(r, k));
                let (x1, w1) = (x_at(v.col(r, k + 1)), v.value(r, k + 1));
                for j in 0..S {
                    a[j] = w0.mul_add(x0[j], a[j]);
                    a2[j] = w1.mul_add(x1[j], a2[j]);
                }
                k += 2;
            }
            if k < k1 {
                let (x0, w0) = (x_at(v.col(r, k)), v.value(r, k));
                for j in 0..S {
                    a[j] = w0.mul_add(x0[j], a[j]);
                }
            }
            for j in 0..S {
                a[j] += a2[j];
            }
            *slot = a;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_acc_avx2<const S: usize, V: Rows>(
    xt: &[f32],
    v: &V,
    rows: std::ops::Range<usize>,
) -> Vec<[f32; S]> {
    tile_acc::<S, V>(xt, v, None, rows)
}

/// [`tile_acc`] over every row, columns in one pass, vectorized where the CPU allows.
fn acc_all<const S: usize, V: Rows>(xt: &[f32], v: &V, rows: usize, simd: bool) -> Vec<[f32; S]> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { tile_acc_avx2::<S, V>(xt, v, 0..rows) };
    }
    let _ = simd;
    tile_acc::<S, V>(xt, v, None, 0..rows)
}

/// What follows a layer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Nothing.
    Identity,
    /// `max(0, v)`.
    Relu,
}

impl Activation {
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Self::Identity => v,
            Self::Relu => v.max(0.0),
        }
    }
}

/// One layer of a chain: its weight, its bias (one per output), what follows it.
#[derive(Clone, Debug)]
pub struct ChainLayer {
    /// The weight, as the kernels run it.
    pub weight: std::sync::Arc<Prepared>,
    /// The bias.
    pub bias: Option<std::sync::Arc<Vec<f32>>>,
    /// The activation applied to the layer's outputs.
    pub activation: Activation,
}

/// Checks that `layers` follow one another (each takes the previous one's outputs) and that
/// each bias has one value per output; returns the first layer's inputs and the last's outputs.
pub fn chain_dims(layers: &[ChainLayer]) -> Result<(usize, usize)> {
    let Some(first) = layers.first() else {
        return Err(Error::Shape("a chain needs at least one layer".into()));
    };
    let mut prev = first.weight.weight().dims().1;
    let cols = prev;
    for (i, l) in layers.iter().enumerate() {
        let (rows, c) = l.weight.weight().dims();
        if c != prev {
            return Err(Error::Shape(format!(
                "chain layer {i} takes {c} inputs, the layer before gives {prev}"
            )));
        }
        check_bias(l.bias.as_ref().map(|b| b.as_slice()), rows)
            .map_err(|e| Error::Shape(format!("chain layer {i}: {e}")))?;
        prev = rows;
    }
    Ok((cols, prev))
}

/// `y = f_k(… f_1(x·W_1ᵀ + b_1) …·W_kᵀ + b_k)`: sparse layers run one after another on each tile
/// of inputs, the activations between them kept in the kernels' transposed layout (a layer's
/// accumulators are the next layer's transposed tile). One transposition per tile instead of one
/// per layer, and one op instead of one per layer and activation: for small, very sparse
/// networks (LeNet-300 at 99%) these, not the products, were most of the time.
pub fn chain_t(x: &[f32], batch: usize, layers: &[ChainLayer], y: &mut [f32]) -> Result<()> {
    let (cols, out_rows) = chain_dims(layers)?;
    if x.len() != batch * cols || y.len() != batch * out_rows {
        return Err(Error::Shape(format!(
            "chain of {cols} inputs and {out_rows} outputs: {} input and {} output values for \
             {batch} rows",
            x.len(),
            y.len()
        )));
    }
    if batch == 0 || out_rows == 0 {
        return Ok(());
    }
    let simd = simd_available();
    let nnz: f64 = layers
        .iter()
        .map(|l| {
            let (r, c) = l.weight.weight().dims();
            l.weight.weight().density() * (r * c) as f64
        })
        .sum();
    let inline = batch as f64 * nnz <= INLINE_MAX_WORK || rayon::current_num_threads() == 1;
    if batch == 1 {
        // One input: the layers' outputs, one after another.
        let mut input = x.to_vec();
        for (i, l) in layers.iter().enumerate() {
            let rows = l.weight.weight().dims().0;
            let mut out = vec![0f32; rows];
            let w = l.weight.weight();
            let task = |(k, out): (usize, &mut [f32])| {
                let r0 = k * ROWS_PER_TASK;
                with_rows!(w, |v| dots(&input, v, r0..r0 + out.len(), out, simd));
            };
            if inline {
                out.chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
            } else {
                out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
            }
            for (r, o) in out.iter_mut().enumerate() {
                let b = l.bias.as_ref().map_or(0.0, |b| b[r]);
                *o = l.activation.apply(*o + b);
            }
            if i + 1 == layers.len() {
                y.copy_from_slice(&out);
            } else {
                input = out;
            }
        }
        return Ok(());
    }
    let tiles: Vec<(usize, usize)> = (0..batch)
        .step_by(TILE)
        .map(|b0| (b0, (batch - b0).min(TILE)))
        .collect();
    let task = |(out, &(b0, n)): (&mut [f32], &(usize, usize))| {
        let x = &x[b0 * cols..(b0 + n) * cols];
        match width_for(n, TILE) {
            8 => chain_tile::<8>(x, n, cols, layers, out, simd),
            16 => chain_tile::<16>(x, n, cols, layers, out, simd),
            32 => chain_tile::<32>(x, n, cols, layers, out, simd),
            _ => chain_tile::<64>(x, n, cols, layers, out, simd),
        }
    };
    if inline {
        y.chunks_mut(TILE * out_rows).zip(&tiles).for_each(task);
    } else {
        y.par_chunks_mut(TILE * out_rows).zip(&tiles).for_each(task);
    }
    Ok(())
}

/// One tile of `n ≤ S` inputs through the chain, into `out` (`n × outputs`, input-major).
fn chain_tile<const S: usize>(
    x: &[f32],
    n: usize,
    cols: usize,
    layers: &[ChainLayer],
    out: &mut [f32],
    simd: bool,
) {
    let first = &layers[0].weight;
    let (used, w0) = match first.compact(simd) {
        Some((used, w, _)) => (Some(used.as_slice()), w),
        None => (None, &first.weight),
    };
    let mut xt = transpose(x, n, cols, used, S);
    for (i, l) in layers.iter().enumerate() {
        let w = if i == 0 { w0 } else { l.weight.weight() };
        let rows = w.dims().0;
        let mut acc: Vec<[f32; S]> = with_rows!(w, |v| acc_all::<S, _>(&xt, v, rows, simd));
        for (r, a) in acc.iter_mut().enumerate() {
            let b = l.bias.as_ref().map_or(0.0, |b| b[r]);
            for v in a.iter_mut() {
                *v = l.activation.apply(*v + b);
            }
        }
        if i + 1 == layers.len() {
            for j in 0..n {
                for (o, a) in out[j * rows..(j + 1) * rows].iter_mut().zip(&acc) {
                    *o = a[j];
                }
            }
        } else {
            xt = acc.as_flattened().to_vec();
        }
    }
}
