//! Layer-wise reconstruction pruning (SparseGPT, Frantar & Alistarh 2023): prunes a linear
//! layer's weight to a sparsity and updates the surviving weights so that the layer's output on
//! calibration inputs changes as little as possible (optimal brain surgeon, column by column).
//!
//! Why it is here: pruning a pretrained transformer by magnitude alone throws away weights that
//! multiply large input features (LayerNorm outliers); with the inputs' second moment `H = E[x xᵀ]`
//! both the choice (`w² / [H⁻¹]ᵢᵢ`) and the compensation of the pruned weights' contribution use
//! what the layer actually sees. `relprune prune-hf` uses it for the step that brings the
//! method's result to the requested sparsity.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::{Masks, ParamSet};

/// Configuration of [`obs_prune`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ObsConfig {
    /// Columns per block: the mask is chosen per block of columns (SparseGPT's adaptive mask
    /// selection), the updates of later blocks are applied lazily.
    pub block: usize,
    /// Dampening added to the diagonal of `H`, as a fraction of its mean diagonal.
    pub damp: f64,
    /// `Some((n, m))`: keep `n` of every `m` consecutive inputs of each row (2:4), each group
    /// chosen when the column sweep reaches it, on the weights updated so far (SparseGPT's N:M
    /// rule); the sparsity argument is then not used.
    #[serde(default)]
    pub n_of_m: Option<(usize, usize)>,
}

impl Default for ObsConfig {
    fn default() -> Self {
        Self {
            block: 128,
            damp: 0.01,
            n_of_m: None,
        }
    }
}

/// A linear layer's input second moment `Σ x xᵀ` (d × d, f64) over calibration rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Gram {
    dim: usize,
    sum: Vec<f64>,
    rows: u64,
}

impl Gram {
    /// An empty accumulator for inputs of width `dim`.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            sum: vec![0.0; dim * dim],
            rows: 0,
        }
    }

    /// The input width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// How many input rows were added.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds the rows of `x` (any shape whose last dimension is `dim`); with `keep` (one 0/1 value
    /// per row, e.g. the attention mask), only the rows marked 1 (padding is not an input the
    /// layer must reproduce).
    pub fn add(&mut self, x: &Tensor, keep: Option<&Tensor>) -> Result<()> {
        let d = *x.dims().last().unwrap_or(&0);
        if d != self.dim {
            return Err(Error::Config(format!(
                "gram of width {} given rows of width {d} (shape {:?})",
                self.dim,
                x.dims()
            )));
        }
        let mut x = x.reshape(((), d))?.to_dtype(DType::F32)?;
        if let Some(keep) = keep {
            let keep = keep.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            if keep.len() != x.dim(0)? {
                return Err(Error::Config(format!(
                    "{} row flags for {} rows",
                    keep.len(),
                    x.dim(0)?
                )));
            }
            let idx: Vec<u32> = (0..keep.len() as u32)
                .filter(|&i| keep[i as usize] != 0.0)
                .collect();
            if idx.is_empty() {
                return Ok(());
            }
            let n = idx.len();
            x = x.index_select(&Tensor::from_vec(idx, n, x.device())?, 0)?;
        }
        let n = x.dim(0)?;
        // The product in f32 (one batch's worth of rows), the sum over batches in f64.
        let xtx = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
        for (s, v) in self.sum.iter_mut().zip(xtx) {
            *s += v as f64;
        }
        self.rows += n as u64;
        Ok(())
    }

    /// The mean `E[x xᵀ]` (row-major d × d).
    pub fn mean(&self) -> Result<Vec<f64>> {
        if self.rows == 0 {
            return Err(Error::Config("gram has no rows".into()));
        }
        let n = self.rows as f64;
        Ok(self.sum.iter().map(|s| s / n).collect())
    }
}

/// Lower Cholesky factor `L` (row-major) of the symmetric positive definite `a` (n × n).
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            let s: f64 = ri.iter().zip(rj).map(|(a, b)| a * b).sum();
            let v = a[i * n + j] - s;
            if i == j {
                if v.is_nan() || v <= 0.0 || v.is_infinite() {
                    return None;
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// The inverse of a lower-triangular `l` (n × n), lower-triangular.
fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0.0; n * n];
    for j in 0..n {
        inv[j * n + j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let s: f64 = (j..i).map(|k| l[i * n + k] * inv[k * n + j]).sum();
            inv[i * n + j] = -s / l[i * n + i];
        }
    }
    inv
}

/// The upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ U`), the quantity SparseGPT's column
/// updates read; `None` if `h` is not positive definite.
fn inverse_upper_cholesky(h: &[f64], n: usize) -> Option<Vec<f64>> {
    let l = cholesky(h, n)?;
    let li = invert_lower(&l, n);
    // H⁻¹ = L⁻ᵀ L⁻¹: (H⁻¹)ᵢⱼ = Σₖ (L⁻¹)ₖᵢ (L⁻¹)ₖⱼ over k ≥ max(i, j).
    let mut hinv = vec![0.0; n * n];
    for k in 0..n {
        let row = &li[k * n..k * n + k + 1];
        for i in 0..=k {
            let a = row[i];
            if a == 0.0 {
                continue;
            }
            let out = &mut hinv[i * n..i * n + k + 1];
            for (o, b) in out[..=i].iter_mut().zip(&row[..=i]) {
                *o += a * b;
            }
        }
    }
    for i in 0..n {
        for j in 0..i {
            hinv[j * n + i] = hinv[i * n + j];
        }
    }
    let lh = cholesky(&hinv, n)?;
    let mut u = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = lh[i * n + j];
        }
    }
    Some(u)
}

/// What [`obs_prune`] returns.
#[derive(Clone, Debug)]
pub struct ObsResult {
    /// The updated weight (the input's shape and dtype), exactly zero where `mask` is 0.
    pub weight: Tensor,
    /// The new 0/1 mask (f32), a subset of the input mask.
    pub mask: Tensor,
    /// Weights newly pruned.
    pub pruned: usize,
}

/// Prunes the linear weight `weight` (out × in) with mask `mask` (already-pruned entries stay
/// pruned) until at least `sparsity` of every block of columns is zero, updating the survivors
/// to compensate, given `h = E[x xᵀ]` (in × in, row-major) of the layer's inputs.
pub fn obs_prune(
    weight: &Tensor,
    mask: &Tensor,
    h: &[f64],
    sparsity: f64,
    cfg: &ObsConfig,
) -> Result<ObsResult> {
    let (rows, d) = weight.dims2().map_err(|_| {
        Error::Config(format!(
            "reconstruction pruning needs a matrix, got shape {:?}",
            weight.dims()
        ))
    })?;
    if mask.dims() != weight.dims() {
        return Err(Error::Config(format!(
            "mask shape {:?} differs from weight shape {:?}",
            mask.dims(),
            weight.dims()
        )));
    }
    if h.len() != d * d {
        return Err(Error::Config(format!(
            "input second moment has {} entries, the weight has {d} inputs",
            h.len()
        )));
    }
    if !(0.0..1.0).contains(&sparsity) || cfg.block == 0 || cfg.damp.is_nan() || cfg.damp < 0.0 {
        return Err(Error::Config(format!(
            "need 0 ≤ sparsity < 1, block > 0, damp ≥ 0 (got {sparsity}, {}, {})",
            cfg.block, cfg.damp
        )));
    }
    if let Some((n, g)) = cfg.n_of_m {
        if n == 0 || n >= g || !d.is_multiple_of(g) || !cfg.block.is_multiple_of(g) {
            return Err(Error::Config(format!(
                "{n}:{g} needs 0 < n < m, and m dividing the {d} inputs and the block of {}",
                cfg.block
            )));
        }
    }
    let mut w = weight
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut m = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let before = m.iter().filter(|&&x| x == 0.0).count();
    for (wv, &mv) in w.iter_mut().zip(&m) {
        if mv == 0.0 {
            *wv = 0.0;
        }
    }

    let mut h = h.to_vec();
    // Inputs never seen (zero variance) carry no information: a unit diagonal keeps H invertible.
    for i in 0..d {
        if h[i * d + i] == 0.0 {
            h[i * d + i] = 1.0;
        }
    }
    let mean_diag = (0..d).map(|i| h[i * d + i]).sum::<f64>() / d as f64;
    let mut damp = cfg.damp.max(1e-8) * mean_diag;
    let u = loop {
        let mut hd = h.clone();
        for i in 0..d {
            hd[i * d + i] += damp;
        }
        if let Some(u) = inverse_upper_cholesky(&hd, d) {
            break u;
        }
        if damp > 1e6 * mean_diag.max(1e-30) {
            return Err(Error::Config(
                "input second moment is not positive definite even heavily dampened".into(),
            ));
        }
        damp *= 10.0;
    };

    for i1 in (0..d).step_by(cfg.block) {
        let i2 = (i1 + cfg.block).min(d);
        let bw = i2 - i1;
        // The mask of this block: the lowest w² / U_ii² (already-pruned entries first).
        let mut scores: Vec<(f64, usize)> = Vec::with_capacity(rows * bw);
        let mut already = 0usize;
        for r in 0..rows {
            for c in i1..i2 {
                let s = if m[r * d + c] == 0.0 {
                    already += 1;
                    f64::NEG_INFINITY
                } else {
                    let uii = u[c * d + c];
                    w[r * d + c] * w[r * d + c] / (uii * uii)
                };
                scores.push((s, r * bw + (c - i1)));
            }
        }
        let k = ((sparsity * (rows * bw) as f64).ceil() as usize)
            .max(already)
            .min(rows * bw);
        if k > 0 && cfg.n_of_m.is_none() {
            scores.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(_, idx) in &scores[..k] {
                m[(idx / bw) * d + i1 + idx % bw] = 0.0;
            }
        }
        // Column by column: zero the pruned entries, spread their error over the block's later
        // columns; remember the errors for the lazy update of the later blocks.
        let mut err = vec![0.0f64; rows * bw];
        for c in i1..i2 {
            if let Some((n, g)) = cfg.n_of_m.filter(|&(_, g)| c.is_multiple_of(g)) {
                prune_group(&w, &mut m, &u, d, c, n, g);
            }
            let ucc = u[c * d + c];
            let urow = &u[c * d + c..c * d + i2];
            for r in 0..rows {
                if m[r * d + c] != 0.0 {
                    continue;
                }
                let e = w[r * d + c] / ucc;
                if e == 0.0 {
                    continue;
                }
                err[r * bw + (c - i1)] = e;
                let wr = &mut w[r * d + c..r * d + i2];
                for (wv, uv) in wr.iter_mut().zip(urow) {
                    *wv -= e * uv;
                }
                w[r * d + c] = 0.0;
            }
        }
        if i2 < d {
            for r in 0..rows {
                let er = &err[r * bw..(r + 1) * bw];
                if er.iter().all(|&e| e == 0.0) {
                    continue;
                }
                for (j, &e) in er.iter().enumerate() {
                    if e == 0.0 {
                        continue;
                    }
                    let urow = &u[(i1 + j) * d + i2..(i1 + j + 1) * d];
                    let wr = &mut w[r * d + i2..(r + 1) * d];
                    for (wv, uv) in wr.iter_mut().zip(urow) {
                        *wv -= e * uv;
                    }
                }
            }
        }
    }
    for (wv, &mv) in w.iter_mut().zip(&m) {
        if mv == 0.0 {
            *wv = 0.0;
        }
    }
    let after = m.iter().filter(|&&x| x == 0.0).count();
    let device = weight.device();
    Ok(ObsResult {
        weight: Tensor::from_vec(w, (rows, d), device)?.to_dtype(weight.dtype())?,
        mask: Tensor::from_vec(m, (rows, d), device)?,
        pruned: after - before,
    })
}

/// Zeroes in `mask` all but the `n` inputs `c..c + g` of each row with the largest
/// `w² / U_jj²` on the current weights `w`; entries already masked count among the zeroed.
fn prune_group(w: &[f64], mask: &mut [f32], u: &[f64], d: usize, c: usize, n: usize, g: usize) {
    let rows = w.len() / d;
    for r in 0..rows {
        let mut scores: Vec<(f64, usize)> = (c..c + g)
            .map(|j| {
                let s = if mask[r * d + j] == 0.0 {
                    f64::NEG_INFINITY
                } else {
                    let ujj = u[j * d + j];
                    w[r * d + j] * w[r * d + j] / (ujj * ujj)
                };
                (s, j)
            })
            .collect();
        scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(_, j) in &scores[..g - n] {
            mask[r * d + j] = 0.0;
        }
    }
}

/// Brings every prunable matrix that has input statistics in `grams` to at least `sparsity` by
/// [`obs_prune`] (choosing by `w²/[H⁻¹]ᵢᵢ` and updating the survivors); the others are left as
/// they are. Weights and masks are updated together.
pub fn prune_layers(
    params: &ParamSet,
    masks: &mut Masks,
    grams: &BTreeMap<String, Gram>,
    sparsity: f64,
    cfg: &ObsConfig,
) -> Result<()> {
    let mut new = BTreeMap::new();
    for p in params.prunable() {
        let m = masks.mask_of(&p.name)?;
        let mask = match grams.get(&p.name) {
            Some(g) if g.rows() > 0 => {
                let r =
                    obs_prune(p.var.as_tensor(), m, &g.mean()?, sparsity, cfg).map_err(|e| {
                        Error::Param {
                            name: p.name.clone(),
                            msg: e.to_string(),
                        }
                    })?;
                p.var.set(&r.weight)?;
                r.mask
            }
            _ => m.clone(),
        };
        new.insert(p.name.clone(), mask);
    }
    *masks = Masks::from_tensors(new)?;
    masks.apply(params)
}

/// `names` grouped by layer in forward order, the order of layer-by-layer (sequential)
/// reconstruction: a layer is the prefix up to the first numeric path segment
/// (`encoder.layer.3`), groups ordered by that number within the same stem; names with no number
/// form a group each, after the numbered ones.
pub fn layer_groups(names: &[String]) -> Vec<Vec<String>> {
    let mut groups: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        let key = match parts.iter().position(|p| p.parse::<u64>().is_ok()) {
            Some(i) => (parts[..i].join("."), parts[i].parse().unwrap_or(0)),
            None => (name.clone(), u64::MAX),
        };
        groups.entry(key).or_default().push(name.clone());
    }
    let (mut numbered, single): (Vec<_>, Vec<_>) =
        groups.into_iter().partition(|((_, n), _)| *n != u64::MAX);
    numbered.extend(single);
    numbered.into_iter().map(|(_, g)| g).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn layer_groups_follow_the_forward_order_of_numbered_layers() {
        let names: Vec<String> = [
            "encoder.layer.10.output.dense.weight",
            "encoder.layer.2.attention.self.query.weight",
            "lm_head.weight",
            "encoder.layer.2.output.dense.weight",
            "encoder.layer.0.intermediate.dense.weight",
        ]
        .map(String::from)
        .to_vec();
        let groups = super::layer_groups(&names);
        let firsts: Vec<&str> = groups.iter().map(|g| g[0].as_str()).collect();
        assert_eq!(
            firsts,
            [
                "encoder.layer.0.intermediate.dense.weight",
                "encoder.layer.2.attention.self.query.weight",
                "encoder.layer.10.output.dense.weight",
                "lm_head.weight",
            ]
        );
        assert_eq!(groups[1].len(), 2);
    }

    use super::*;
    use candle_core::Device;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    }

    /// Inputs with correlated, unequally scaled features (what makes magnitude pruning blind).
    fn inputs(rng: &mut StdRng, n: usize, d: usize) -> Tensor {
        let z = Tensor::from_vec(randn(rng, n * d), (n, d), &Device::Cpu).unwrap();
        let mix = Tensor::from_vec(randn(rng, d * d), (d, d), &Device::Cpu).unwrap();
        let scale: Vec<f32> = (0..d).map(|i| 0.2 + 3.0 * (i % 5) as f32).collect();
        let scale = Tensor::from_vec(scale, d, &Device::Cpu).unwrap();
        (z.matmul(&(mix * 0.3).unwrap()).unwrap() + z)
            .unwrap()
            .broadcast_mul(&scale)
            .unwrap()
    }

    fn output_error(w0: &Tensor, w1: &Tensor, x: &Tensor) -> f32 {
        let y0 = x.matmul(&w0.t().unwrap()).unwrap();
        let y1 = x.matmul(&w1.t().unwrap()).unwrap();
        (y0 - y1)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn magnitude(w: &Tensor, sparsity: f64) -> Tensor {
        let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
        let k = (sparsity * v.len() as f64).ceil() as usize;
        a.sort_by(f32::total_cmp);
        let t = a[k - 1];
        let out: Vec<f32> = v
            .iter()
            .map(|&x| if x.abs() <= t { 0.0 } else { x })
            .collect();
        Tensor::from_vec(out, w.shape(), w.device()).unwrap()
    }

    #[test]
    fn gram_counts_only_kept_rows_and_sums_x_transpose_x() {
        let x = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0], [9.0, 9.0]]], &Device::Cpu).unwrap();
        let keep = Tensor::new(&[[1f32, 1.0, 0.0]], &Device::Cpu).unwrap();
        let mut g = Gram::new(2);
        g.add(&x, Some(&keep)).unwrap();
        assert_eq!(g.rows(), 2);
        assert_eq!(g.mean().unwrap(), vec![5.0, 7.0, 7.0, 10.0]);
        assert!(g
            .add(
                &Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
                None
            )
            .is_err());
        assert!(Gram::new(2).mean().is_err());
    }

    #[test]
    fn inverse_upper_cholesky_factors_the_inverse() {
        let mut rng = StdRng::seed_from_u64(3);
        let n = 7;
        let a = randn(&mut rng, n * n);
        // H = A Aᵀ + I is symmetric positive definite.
        let mut h = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = (0..n)
                    .map(|k| (a[i * n + k] * a[j * n + k]) as f64)
                    .sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let u = inverse_upper_cholesky(&h, n).unwrap();
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0, "U is upper triangular");
            }
        }
        // (Uᵀ U) H = I.
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n)
                    .map(|k| {
                        (0..n).map(|l| u[l * n + i] * u[l * n + k]).sum::<f64>() * h[k * n + j]
                    })
                    .sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "({i},{j}) = {v}");
            }
        }
        assert!(inverse_upper_cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    #[test]
    fn reaches_the_sparsity_in_every_block_and_keeps_pruned_entries_pruned() {
        let mut rng = StdRng::seed_from_u64(1);
        let (rows, d) = (12, 40);
        let x = inputs(&mut rng, 400, d);
        let mut g = Gram::new(d);
        g.add(&x, None).unwrap();
        let w = Tensor::from_vec(randn(&mut rng, rows * d), (rows, d), &Device::Cpu).unwrap();
        let mut mv = vec![1f32; rows * d];
        for i in (0..rows * d).step_by(7) {
            mv[i] = 0.0;
        }
        let mask = Tensor::from_vec(mv.clone(), (rows, d), &Device::Cpu).unwrap();
        let cfg = ObsConfig {
            block: 16,
            damp: 0.01,
            n_of_m: None,
        };
        let r = obs_prune(&w, &mask, &g.mean().unwrap(), 0.6, &cfg).unwrap();
        let m = r.mask.to_vec2::<f32>().unwrap();
        let wv = r.weight.to_vec2::<f32>().unwrap();
        for (c0, c1) in [(0, 16), (16, 32), (32, 40)] {
            let zeros = (0..rows)
                .flat_map(|i| (c0..c1).map(move |j| (i, j)))
                .filter(|&(i, j)| m[i][j] == 0.0)
                .count();
            let want = (0.6 * (rows * (c1 - c0)) as f64).ceil() as usize;
            assert_eq!(zeros, want, "block {c0}..{c1}");
        }
        for i in 0..rows {
            for j in 0..d {
                if mv[i * d + j] == 0.0 {
                    assert_eq!(m[i][j], 0.0, "pruned entries stay pruned");
                }
                if m[i][j] == 0.0 {
                    assert_eq!(wv[i][j], 0.0, "pruned weights are exactly zero");
                }
            }
        }
        let before = mv.iter().filter(|&&v| v == 0.0).count();
        let after = m.iter().flatten().filter(|&&v| v == 0.0).count();
        assert_eq!(r.pruned, after - before);
    }

    #[test]
    fn reconstructs_the_output_better_than_magnitude_pruning() {
        let mut rng = StdRng::seed_from_u64(2);
        let (rows, d) = (16, 48);
        let x = inputs(&mut rng, 600, d);
        let mut g = Gram::new(d);
        g.add(&x, None).unwrap();
        let w = Tensor::from_vec(randn(&mut rng, rows * d), (rows, d), &Device::Cpu).unwrap();
        let mask = Tensor::ones((rows, d), DType::F32, &Device::Cpu).unwrap();
        let cfg = ObsConfig {
            block: 48,
            damp: 0.01,
            n_of_m: None,
        };
        let r = obs_prune(&w, &mask, &g.mean().unwrap(), 0.5, &cfg).unwrap();
        let obs = output_error(&w, &r.weight, &x);
        let mag = output_error(&w, &magnitude(&w, 0.5), &x);
        assert!(
            obs < 0.5 * mag,
            "reconstruction error {obs} vs magnitude {mag}"
        );
    }

    #[test]
    fn n_of_m_keeps_n_per_group_and_reconstructs_better_than_magnitude() {
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, d) = (16, 48);
        let x = inputs(&mut rng, 600, d);
        let mut g = Gram::new(d);
        g.add(&x, None).unwrap();
        let w = Tensor::from_vec(randn(&mut rng, rows * d), (rows, d), &Device::Cpu).unwrap();
        let mut mv = vec![1f32; rows * d];
        mv[5] = 0.0;
        let mask = Tensor::from_vec(mv, (rows, d), &Device::Cpu).unwrap();
        let cfg = ObsConfig {
            block: 16,
            damp: 0.01,
            n_of_m: Some((2, 4)),
        };
        let r = obs_prune(&w, &mask, &g.mean().unwrap(), 0.0, &cfg).unwrap();
        let m = r.mask.to_vec2::<f32>().unwrap();
        assert_eq!(m[0][5], 0.0, "an entry pruned before stays pruned");
        for row in &m {
            for group in row.chunks(4) {
                assert_eq!(group.iter().filter(|&&v| v == 1.0).count(), 2, "{group:?}");
            }
        }
        // Magnitude 2:4: the two largest |w| of each group.
        let wv = w.to_vec2::<f32>().unwrap();
        let mut mag = vec![0f32; rows * d];
        for (i, row) in wv.iter().enumerate() {
            for (gi, group) in row.chunks(4).enumerate() {
                let mut order: Vec<usize> = (0..4).collect();
                order.sort_by(|&a, &b| group[b].abs().total_cmp(&group[a].abs()));
                for &j in &order[..2] {
                    mag[i * d + gi * 4 + j] = group[j];
                }
            }
        }
        let mag = Tensor::from_vec(mag, (rows, d), &Device::Cpu).unwrap();
        let (obs, mag) = (output_error(&w, &r.weight, &x), output_error(&w, &mag, &x));
        assert!(
            obs < 0.7 * mag,
            "2:4 reconstruction {obs} vs magnitude {mag}"
        );
        let bad = ObsConfig {
            n_of_m: Some((2, 5)),
            ..cfg
        };
        assert!(obs_prune(&w, &mask, &g.mean().unwrap(), 0.0, &bad).is_err());
    }

    #[test]
    fn identity_second_moment_is_magnitude_pruning_without_updates() {
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, d) = (6, 10);
        let w = Tensor::from_vec(randn(&mut rng, rows * d), (rows, d), &Device::Cpu).unwrap();
        let mut h = vec![0.0; d * d];
        for i in 0..d {
            h[i * d + i] = 1.0;
        }
        let mask = Tensor::ones((rows, d), DType::F32, &Device::Cpu).unwrap();
        let cfg = ObsConfig {
            block: d,
            damp: 0.0,
            n_of_m: None,
        };
        let r = obs_prune(&w, &mask, &h, 0.5, &cfg).unwrap();
        let want = magnitude(&w, 0.5).to_vec2::<f32>().unwrap();
        assert_eq!(r.weight.to_vec2::<f32>().unwrap(), want);
    }

    #[test]
    fn bad_shapes_and_sparsities_are_errors() {
        let w = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let m = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let h = vec![0.0; 9];
        let cfg = ObsConfig::default();
        assert!(obs_prune(&w, &m, &h[..4], 0.5, &cfg).is_err());
        assert!(obs_prune(&w, &m.t().unwrap(), &h, 0.5, &cfg).is_err());
        assert!(obs_prune(&w, &m, &h, 1.0, &cfg).is_err());
        let v = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert!(obs_prune(&v, &v, &h, 0.5, &cfg).is_err());
        // An all-zero second moment (no calibration signal) still works: unit diagonal.
        let r = obs_prune(&w, &m, &h, 0.5, &cfg).unwrap();
        assert_eq!(r.pruned, 3);
    }
}
