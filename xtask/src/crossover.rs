//! `cargo xtask crossover`: measures where the sparse product beats the dense one with this
//! run's thread count (`--threads`) and writes that count's points into the table
//! `relprune_sparse::Crossover` dispatches by (`crates/relprune-sparse/crossover.tsv`; other
//! thread counts' points are kept), with a report of every grid point
//! (`target/bench/crossover-<N>threads.md`).
//!
//! For each batch size of the grid, the layer (default 768 inputs × 3072 outputs, BERT-base's
//! FFN) is pruned by magnitude to each density, from the sparsest up; the largest density up to
//! which every sparser point ran faster than dense by the margin is the table's entry. 2:4 is
//! measured at its one density, 0.5. Dense and sparse are timed interleaved, the median of the
//! rounds counted.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Module, Tensor};
use relprune_sparse::dispatch::{Crossover, Pattern, Point};
use relprune_sparse::{SparseLinear, SparseWeight, NM};

use crate::flags;

/// The densities measured (increasing).
const DENSITIES: &[f64] = &[
    0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6,
];

/// The batch sizes measured.
const BATCHES: &[usize] = &[
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
];

/// Median seconds per call of `f`, run often enough to last about `budget` seconds a round.
fn time(rounds: usize, budget: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    let reps = ((budget / t.elapsed().as_secs_f64().max(1e-6)) as usize).clamp(1, 1000);
    let mut v = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        v.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// The sparse/dense time ratio of one grid point, interleaved.
fn ratio(rounds: usize, x: &Tensor, dense: &Tensor, sparse: &SparseLinear) -> Result<f64> {
    let wt = dense.t()?;
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let d = time(1, 0.05, || Ok(x.matmul(&wt).map(|_| ())?))?;
        let s = time(1, 0.05, || Ok(sparse.forward(x).map(|_| ())?))?;
        ratios.push(s / d);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(ratios[ratios.len() / 2])
}

pub fn run(f: flags::Crossover) -> Result<()> {
    let dev = Device::Cpu;
    let (rows, cols) = (f.rows, f.cols);
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
    let values = w.flatten_all()?.to_vec1::<f32>()?;
    let mut mags: Vec<f32> = values.iter().map(|v| v.abs()).collect();
    mags.sort_by(|a, b| b.total_cmp(a));
    let pruned = |density: f64| -> Result<Tensor> {
        let keep = ((density * values.len() as f64) as usize).max(1);
        let cut = mags[keep - 1];
        let v: Vec<f32> = values
            .iter()
            .map(|&v| if v.abs() >= cut { v } else { 0.0 })
            .collect();
        Ok(Tensor::from_vec(v, (rows, cols), &dev)?)
    };
    // 2:4: the two largest magnitudes of every group of four.
    let two_four = {
        let mut v = values.clone();
        for g in v.chunks_mut(4) {
            let mut order = [0usize, 1, 2, 3];
            order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            g[order[2]] = 0.0;
            g[order[3]] = 0.0;
        }
        Tensor::from_vec(v, (rows, cols), &dev)?
    };
    let layers: Vec<(f64, Tensor, SparseLinear)> = DENSITIES
        .iter()
        .map(|&d| {
            let t = pruned(d)?;
            let s = SparseLinear::new(
                SparseWeight::Csr(relprune_sparse::Csr::from_dense(
                    &t.flatten_all()?.to_vec1::<f32>()?,
                    rows,
                    cols,
                )?),
                None,
            )?;
            Ok((d, t, s))
        })
        .collect::<Result<_>>()?;
    let nm = SparseLinear::new(
        SparseWeight::NM(NM::from_dense(
            &two_four.flatten_all()?.to_vec1::<f32>()?,
            rows,
            cols,
            2,
            4,
        )?),
        None,
    )?;
    let threads = rayon::current_num_threads();
    let threshold = 1.0 / (1.0 + f.margin);
    let mut points = Vec::new();
    let mut md = format!(
        "# Sparse against dense: {cols} inputs × {rows} outputs, {threads} threads\n\nsparse time / \
         dense time, median of {} interleaved rounds; sparse is chosen where it is below \
         {threshold:.3} (faster by {:.0}%).\n\n| batch | {} | 2:4 |\n|---:|{}---:|\n",
        f.rounds,
        f.margin * 100.0,
        DENSITIES
            .iter()
            .map(|d| format!("{:.0}%", 100.0 * (1.0 - d)))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(DENSITIES.len())
    );
    for &batch in BATCHES.iter().filter(|&&b| b <= f.max_batch) {
        let x = Tensor::randn(0f32, 1.0, (batch, cols), &dev)?;
        let mut row = format!("| {batch} |");
        let mut max_density = 0.0;
        let mut winning = true;
        for (d, dense, sparse) in &layers {
            let r = ratio(f.rounds, &x, dense, sparse)?;
            winning &= r <= threshold;
            if winning {
                max_density = *d;
            }
            row.push_str(&format!(" {r:.2} |"));
        }
        let r = ratio(f.rounds, &x, &two_four, &nm)?;
        row.push_str(&format!(" {r:.2} |"));
        eprintln!("{row}");
        md.push_str(&row);
        md.push('\n');
        points.push(Point {
            threads,
            pattern: Pattern::Unstructured,
            batch,
            max_density,
        });
        // 2:4 runs as compressed rows holding half the weights, as unstructured 50% does: it is
        // chosen only where both measured faster, so that one noisy point does not decide.
        points.push(Point {
            threads,
            pattern: Pattern::NM(2, 4),
            batch,
            max_density: if r <= threshold && max_density >= 0.5 {
                0.5
            } else {
                0.0
            },
        });
    }
    let measured = Crossover::new(points);
    let table = match std::fs::read_to_string(&f.out) {
        Ok(text) => Crossover::parse(&text)
            .with_context(|| format!("{}: the table to update", f.out.display()))?
            .merged(&measured),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => measured,
        Err(e) => return Err(e).with_context(|| format!("reading {}", f.out.display())),
    };
    let mut text = format!(
        "# measured by `cargo xtask --threads N crossover` ({cols}x{rows} layer, margin {}, {} rounds)\n",
        f.margin, f.rounds,
    );
    text.push_str(&table.to_text());
    relprune_io::write(&f.out, text.as_bytes())?;
    std::fs::create_dir_all(&f.report_dir)?;
    let report = f.report_dir.join(format!("crossover-{threads}threads.md"));
    relprune_io::write(&report, md.as_bytes())?;
    println!("wrote {} and {}", f.out.display(), report.display());
    Ok(())
}
