//! The sparse products against the dense product, across layouts, densities, batch sizes and
//! thread counts.

use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relprune_sparse::{matmul_t, Csr, Indices, SparseLinear, SparseWeight, NM};

/// A random `rows × cols` matrix with about `density` of its entries non-zero.
fn random_sparse(rows: usize, cols: usize, density: f64, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| {
            if rng.random_bool(density) {
                rng.random_range(-1.0f32..1.0)
            } else {
                0.0
            }
        })
        .collect()
}

fn random_dense(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `x·Wᵀ + b` in f64, the reference.
fn reference(x: &[f32], batch: usize, w: &[f32], rows: usize, cols: usize, b: &[f32]) -> Vec<f64> {
    let mut y = vec![0f64; batch * rows];
    for i in 0..batch {
        for o in 0..rows {
            let dot: f64 = (0..cols)
                .map(|c| x[i * cols + c] as f64 * w[o * cols + c] as f64)
                .sum();
            y[i * rows + o] = dot + b[o] as f64;
        }
    }
    y
}

/// The largest error relative to the largest output.
fn relative_error(y: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    y.iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).abs() / scale)
        .fold(0.0, f64::max)
}

#[test]
fn compressed_rows_equal_the_dense_product_at_every_density_and_batch() {
    for (rows, cols) in [(37, 200), (64, 300), (10, 1000)] {
        for density in [0.02, 0.1, 0.3, 0.5, 0.9] {
            let w = random_sparse(rows, cols, density, (rows * cols) as u64);
            let b = random_dense(rows, 3);
            let sw = SparseWeight::Csr(Csr::from_dense(&w, rows, cols).unwrap());
            assert_eq!(sw.to_dense(), w);
            for batch in [1, 3, 16, 17, 64, 130, 600] {
                let x = random_dense(batch * cols, batch as u64);
                let mut y = vec![0f32; batch * rows];
                matmul_t(&x, batch, &sw, Some(&b), &mut y).unwrap();
                let err = relative_error(&y, &reference(&x, batch, &w, rows, cols, &b));
                assert!(
                    err < 1e-5,
                    "{rows}×{cols} at {density}, batch {batch}: {err}"
                );
            }
        }
    }
}

#[test]
fn column_indices_take_the_narrowest_integer_that_fits() {
    let width = |cols: usize| match Csr::from_dense(&vec![1.0; cols], 1, cols).unwrap().indices {
        Indices::U8(_) => 1,
        Indices::U16(_) => 2,
        Indices::U32(_) => 4,
    };
    assert_eq!(width(256), 1);
    assert_eq!(width(257), 2);
    assert_eq!(width(65_536), 2);
    assert_eq!(width(65_537), 4);
}

#[test]
fn results_depend_neither_on_the_split_of_the_work_nor_on_the_thread_count() {
    let (rows, cols) = (150, 96);
    let w = random_sparse(rows, cols, 0.2, 7);
    let sw = SparseWeight::Csr(Csr::from_dense(&w, rows, cols).unwrap());
    // 10 tiles: one task per tile; 10 inputs: tasks per block of rows.
    let batch = 600;
    let x = random_dense(batch * cols, 8);
    let run = |threads: usize, batch: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut y = vec![0f32; batch * rows];
        pool.install(|| matmul_t(&x[..batch * cols], batch, &sw, None, &mut y).unwrap());
        y
    };
    let one = run(1, batch);
    assert_eq!(one, run(3, batch));
    // The first rows of a large batch equal a small batch: the split of the work changes,
    // the order of every sum does not.
    let small = run(2, 10);
    assert_eq!(small, one[..10 * rows].to_vec());
}

#[test]
fn two_of_four_equals_the_dense_product_and_rejects_denser_groups() {
    let (rows, cols) = (48, 64);
    let mut w = random_dense(rows * cols, 11);
    // Keep the two largest of every four.
    for g in w.chunks_mut(4) {
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &j in &order[2..] {
            g[j] = 0.0;
        }
    }
    let nm = SparseWeight::NM(NM::from_dense(&w, rows, cols, 2, 4).unwrap());
    assert_eq!(nm.to_dense(), w);
    assert!((nm.density() - 0.5).abs() < 1e-12);
    let b = random_dense(rows, 12);
    for batch in [1, 40] {
        let x = random_dense(batch * cols, 13);
        let mut y = vec![0f32; batch * rows];
        matmul_t(&x, batch, &nm, Some(&b), &mut y).unwrap();
        let err = relative_error(&y, &reference(&x, batch, &w, rows, cols, &b));
        assert!(err < 1e-5, "batch {batch}: {err}");
    }
    let dense = random_dense(8, 1);
    let e = NM::from_dense(&dense, 1, 8, 2, 4).unwrap_err().to_string();
    assert!(
        e.contains("row 0, columns 0..4") && e.contains("more than 2 of 4"),
        "{e}"
    );
}

#[test]
fn bad_shapes_and_values_are_errors_not_panics() {
    assert!(Csr::from_dense(&[1.0; 5], 2, 3).is_err());
    let e = Csr::from_dense(&[1.0, f32::NAN], 1, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(0, 1)") && e.contains("NaN"), "{e}");
    assert!(NM::from_dense(&[0.0; 6], 1, 6, 2, 4).is_err());
    let sw = SparseWeight::Csr(Csr::from_dense(&[1.0; 6], 2, 3).unwrap());
    let mut y = vec![0f32; 4];
    assert!(matmul_t(&[1.0; 5], 2, &sw, None, &mut y).is_err());
    assert!(matmul_t(&[1.0; 6], 2, &sw, Some(&[1.0]), &mut y).is_err());
}

#[test]
fn a_sparse_linear_layer_matches_the_dense_layer_on_any_leading_shape() {
    let (rows, cols) = (20, 48);
    let w = random_sparse(rows, cols, 0.1, 21);
    let b = random_dense(rows, 22);
    let dev = Device::Cpu;
    let wt = Tensor::from_vec(w.clone(), (rows, cols), &dev).unwrap();
    let bt = Tensor::from_vec(b.clone(), rows, &dev).unwrap();
    let layer = SparseLinear::from_dense(&wt, Some(&bt)).unwrap();
    let x = Tensor::from_vec(random_dense(2 * 3 * cols, 23), (2, 3, cols), &dev).unwrap();
    let y = layer.forward(&x).unwrap();
    assert_eq!(y.dims(), [2, 3, rows]);
    let want = x
        .broadcast_matmul(&wt.t().unwrap())
        .unwrap()
        .broadcast_add(&bt)
        .unwrap();
    let diff = (y - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
    assert!(layer.weight().density() < 0.2);
}

#[test]
fn a_layer_runs_dense_where_the_table_says_dense_wins_and_equals_it_either_way() {
    use relprune_sparse::dispatch::{Crossover, Pattern, Point};
    let (rows, cols) = (24, 64);
    let dev = Device::Cpu;
    let table = Crossover::new(vec![
        Point {
            threads: 1,
            pattern: Pattern::Unstructured,
            batch: 1,
            max_density: 0.0,
        },
        Point {
            threads: 1,
            pattern: Pattern::Unstructured,
            batch: 16,
            max_density: 0.5,
        },
    ]);
    let w = random_sparse(rows, cols, 0.3, 31);
    let wt = Tensor::from_vec(w, (rows, cols), &dev).unwrap();
    let bt = Tensor::from_vec(random_dense(rows, 32), rows, &dev).unwrap();
    let layer = SparseLinear::with_table(&wt, Some(&bt), table).unwrap();
    assert!(!layer.runs_sparse(1));
    assert!(layer.runs_sparse(64));
    for batch in [1, 64] {
        let x = Tensor::from_vec(random_dense(batch * cols, 33), (batch, cols), &dev).unwrap();
        let want = x
            .matmul(&wt.t().unwrap())
            .unwrap()
            .broadcast_add(&bt)
            .unwrap();
        let got = layer.forward(&x).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "batch {batch}");
    }
}

#[test]
fn a_two_of_four_layer_is_stored_as_such_and_a_sparser_one_as_compressed_rows() {
    let dev = Device::Cpu;
    let mut w = random_dense(16 * 32, 41);
    for g in w.chunks_mut(4) {
        g[1] = 0.0;
        g[3] = 0.0;
    }
    let t = Tensor::from_vec(w.clone(), (16, 32), &dev).unwrap();
    let layer = SparseLinear::from_dense(&t, None).unwrap();
    assert_eq!(layer.pattern(), relprune_sparse::Pattern::NM(2, 4));
    for g in w.chunks_mut(4) {
        g[2] = 0.0;
    }
    let t = Tensor::from_vec(w, (16, 32), &dev).unwrap();
    let layer = SparseLinear::from_dense(&t, None).unwrap();
    assert_eq!(layer.pattern(), relprune_sparse::Pattern::Unstructured);
}

#[test]
fn a_weight_with_empty_columns_computes_the_same_products_on_its_used_columns_alone() {
    use relprune_sparse::Prepared;
    let (rows, cols) = (40, 300);
    // Only every fifth column holds entries (as the border pixels of MNIST hold none).
    let mut w = random_sparse(rows, cols, 0.3, 41);
    for (i, v) in w.iter_mut().enumerate() {
        if (i % cols) % 5 != 0 {
            *v = 0.0;
        }
    }
    let b = random_dense(rows, 42);
    let sw = SparseWeight::Csr(Csr::from_dense(&w, rows, cols).unwrap());
    let prepared = Prepared::new(sw.clone());
    for batch in [1, 3, 17, 100, 130, 600] {
        let x = random_dense(batch * cols, 43 + batch as u64);
        let mut compact = vec![0f32; batch * rows];
        prepared
            .matmul_t(&x, batch, Some(&b), &mut compact)
            .unwrap();
        let mut full = vec![0f32; batch * rows];
        matmul_t(&x, batch, &sw, Some(&b), &mut full).unwrap();
        assert_eq!(compact, full, "batch {batch}");
        let err = relative_error(&compact, &reference(&x, batch, &w, rows, cols, &b));
        assert!(err < 1e-5, "batch {batch}: {err}");
    }
}

#[test]
fn a_chain_computes_what_its_layers_compute_one_by_one_whatever_the_threads() {
    use relprune_sparse::{Activation, SparseChain};
    let dev = Device::Cpu;
    // 200 → 90 → 40 → 7, the first layer with unused columns, ReLU between.
    let shapes = [(90, 200, 0.05), (40, 90, 0.1), (7, 40, 0.4)];
    let layers: Vec<SparseLinear> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(rows, cols, density))| {
            let mut w = random_sparse(rows, cols, density, 50 + i as u64);
            if i == 0 {
                for (k, v) in w.iter_mut().enumerate() {
                    if k % cols >= 120 {
                        *v = 0.0;
                    }
                }
            }
            let w = Tensor::from_vec(w, (rows, cols), &dev).unwrap();
            let b = Tensor::from_vec(random_dense(rows, 60 + i as u64), rows, &dev).unwrap();
            SparseLinear::new(
                SparseWeight::Csr(
                    Csr::from_dense(&w.flatten_all().unwrap().to_vec1().unwrap(), rows, cols)
                        .unwrap(),
                ),
                Some(b.to_vec1().unwrap()),
            )
            .unwrap()
        })
        .collect();
    let chain = SparseChain::new(vec![
        layers[0].chain_layer(Activation::Relu),
        layers[1].chain_layer(Activation::Relu),
        layers[2].chain_layer(Activation::Identity),
    ])
    .unwrap();
    for batch in [1, 5, 64, 100, 700] {
        let x = Tensor::from_vec(
            random_dense(batch * 200, 70 + batch as u64),
            (batch, 200),
            &dev,
        )
        .unwrap();
        let h = layers[0].forward(&x).unwrap().relu().unwrap();
        let h = layers[1].forward(&h).unwrap().relu().unwrap();
        let want: Vec<f32> = layers[2]
            .forward(&h)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let run = |threads: usize| -> Vec<f32> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                chain
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
        };
        let got = run(1);
        assert_eq!(got, run(3), "batch {batch}");
        let scale = want.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "batch {batch}: {err}");
    }
    // Layers that do not follow one another are an error, not a panic.
    let e = SparseChain::new(vec![
        layers[0].chain_layer(Activation::Relu),
        layers[2].chain_layer(Activation::Identity),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("takes 40 inputs"), "{e}");
}
