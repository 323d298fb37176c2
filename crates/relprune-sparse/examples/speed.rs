//! Times the sparse product against candle's dense one on a 768×3072 layer (BERT-base's FFN
//! shape) over densities and batch sizes; prints one row per point with the speedup.
//! `cargo run --release -p relprune-sparse --example speed`

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use relprune_sparse::SparseLinear;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (rows, cols) = (3072, 768);
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
    let ranks = w.abs()?.flatten_all()?.to_vec1::<f32>()?;
    let mut sorted = ranks.clone();
    sorted.sort_by(f32::total_cmp);
    // `SPEED_BATCHES=1,8192` limits the grid.
    let batches: Vec<usize> = match std::env::var("SPEED_BATCHES") {
        Ok(v) => v.split(',').map(str::parse).collect::<Result<_, _>>()?,
        Err(_) => vec![1, 8, 64, 1024, 8192],
    };
    for batch in batches {
        let x = Tensor::randn(0f32, 1.0, (batch, cols), &dev)?;
        let grid: Vec<f64> = match std::env::var("SPEED_SPARSITIES") {
            Ok(v) => v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            Err(_) => vec![0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
        };
        for &sparsity in &grid {
            let cut = sorted[(sparsity * sorted.len() as f64) as usize];
            let pruned: Vec<f32> = ranks
                .iter()
                .zip(w.flatten_all()?.to_vec1::<f32>()?)
                .map(|(&a, v)| if a < cut { 0.0 } else { v })
                .collect();
            let wp = Tensor::from_vec(pruned, (rows, cols), &dev)?;
            let sparse = SparseLinear::from_dense(&wp, None)?;
            let wt = wp.t()?;
            let reps = (8192 / batch).clamp(3, 200);
            let (mut td, mut ts) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    x.matmul(&wt)?;
                }
                td.push(t.elapsed().as_secs_f64() / reps as f64);
                let t = Instant::now();
                for _ in 0..reps {
                    sparse.forward(&x)?;
                }
                ts.push(t.elapsed().as_secs_f64() / reps as f64);
            }
            let (d, s) = (median(td), median(ts));
            println!(
                "batch {batch:>5} sparsity {sparsity:.2}: dense {:9.3} ms, sparse {:9.3} ms, speedup {:5.2}x",
                d * 1e3,
                s * 1e3,
                d / s
            );
        }
    }
    Ok(())
}
