//! The fast convolution and pooling ops against candle's own ops and finite differences.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relprune_models::ops::{conv2d, conv2d_max_pool, max_pool2d};

fn rand_var(shape: &[usize], seed: u64) -> Var {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Var::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// A loss that weighs every output differently, so every gradient entry matters.
fn weighted_sum(y: &Tensor, seed: u64) -> Tensor {
    let w = rand_var(y.dims(), seed);
    (y * w.as_tensor()).unwrap().sum_all().unwrap()
}

#[test]
fn conv2d_matches_candle_forward_and_all_gradients_for_strides_and_paddings() {
    // Geometries where (size + 2·pad − k) is a multiple of the stride: candle 0.11's own conv2d
    // backward fails on the others (shape mismatch), which finite differences cover below.
    for (stride, pad, k, h, w) in [
        (1, 0, 5, 12, 13),
        (1, 1, 3, 8, 9),
        (2, 1, 3, 9, 11),
        (2, 0, 2, 8, 10),
        (3, 2, 3, 10, 13),
    ] {
        let x = rand_var(&[3, 4, h, w], 1);
        let w = rand_var(&[5, 4, k, k], 2);
        let b = rand_var(&[5], 3);
        let ours = conv2d(
            x.as_tensor(),
            w.as_tensor(),
            Some(b.as_tensor()),
            stride,
            pad,
        )
        .unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(w.as_tensor(), pad, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, 5, 1, 1)).unwrap())
            .unwrap();
        let case = format!("stride {stride} pad {pad} k {k}");
        assert_eq!(ours.dims(), theirs.dims(), "{case}");
        assert_close(&vec(&ours), &vec(&theirs), 1e-5, &case);
        let g1 = weighted_sum(&ours, 9).backward().unwrap();
        let g2 = weighted_sum(&theirs, 9).backward().unwrap();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let a = vec(g1.get(v.as_tensor()).unwrap());
            let e = vec(g2.get(v.as_tensor()).unwrap());
            assert_close(&a, &e, 1e-4, &format!("{case} grad {name}"));
        }
    }
}

#[test]
fn conv2d_input_gradient_matches_finite_differences() {
    // 6×6, k 3, stride 2, pad 1: the last row/column of the input is never read.
    let x = rand_var(&[1, 2, 6, 6], 4);
    let w = rand_var(&[3, 2, 3, 3], 5);
    let loss = |xt: &Tensor| -> f64 {
        let y = conv2d(xt, w.as_tensor(), None, 2, 1).unwrap();
        weighted_sum(&y, 6)
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let y = conv2d(x.as_tensor(), w.as_tensor(), None, 2, 1).unwrap();
    let g = vec(weighted_sum(&y, 6)
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap());
    let x0 = vec(x.as_tensor());
    let eps = 1e-2f32;
    for i in 0..x0.len() {
        let mut plus = x0.clone();
        plus[i] += eps;
        let mut minus = x0.clone();
        minus[i] -= eps;
        let tp = Tensor::from_vec(plus, (1, 2, 6, 6), &Device::Cpu).unwrap();
        let tm = Tensor::from_vec(minus, (1, 2, 6, 6), &Device::Cpu).unwrap();
        let fd = (loss(&tp) - loss(&tm)) / (2.0 * eps as f64);
        assert!(
            (fd - g[i] as f64).abs() < 1e-3,
            "x[{i}]: fd {fd} vs {}",
            g[i]
        );
    }
}

#[test]
fn a_conv_on_plain_images_computes_no_input_gradient() {
    // The images are not a variable: only the weight gets a gradient (no col2im work).
    let x = rand_var(&[2, 1, 6, 6], 7).as_tensor().detach();
    let w = rand_var(&[2, 1, 3, 3], 8);
    let y = conv2d(&x, w.as_tensor(), None, 1, 0).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    assert!(g.get(w.as_tensor()).is_some());
}

#[test]
fn max_pool_forward_matches_candle_and_its_gradient_is_the_true_one() {
    let x = rand_var(&[2, 3, 8, 6], 10);
    let ours = max_pool2d(x.as_tensor(), 2, 2).unwrap();
    let theirs = x.as_tensor().max_pool2d(2).unwrap();
    assert_eq!(vec(&ours), vec(&theirs));
    let g1 = vec(weighted_sum(&ours, 11)
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap());
    let g2 = vec(weighted_sum(&theirs, 11)
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap());
    // candle 0.11 averages the max mask over the window, so with distinct values its input
    // gradient is ours divided by the window size (4); finite differences side with ours.
    let quarter: Vec<f32> = g1.iter().map(|g| g / 4.0).collect();
    assert_close(&quarter, &g2, 1e-6, "candle = ours / 4");
    let x0 = vec(x.as_tensor());
    let f = |v: Vec<f32>| -> f64 {
        let t = Tensor::from_vec(v, (2, 3, 8, 6), &Device::Cpu).unwrap();
        weighted_sum(&max_pool2d(&t, 2, 2).unwrap(), 11)
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let eps = 1e-3f32;
    for i in (0..x0.len()).step_by(7) {
        let (mut p, mut m) = (x0.clone(), x0.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (f(p) - f(m)) / (2.0 * eps as f64);
        assert!(
            (fd - g1[i] as f64).abs() < 1e-2,
            "x[{i}]: fd {fd} vs {}",
            g1[i]
        );
    }
}

#[test]
fn overlapping_max_pool_routes_each_window_gradient_to_its_first_maximum() {
    // 1×1×3×4 input, kernel 3, stride 1: two windows sharing columns 1 and 2.
    let x = Var::from_vec(
        vec![1f32, 9., 0., 2., 3., 4., 5., 6., 7., 8., 9., 1.],
        (1, 1, 3, 4),
        &Device::Cpu,
    )
    .unwrap();
    let y = max_pool2d(x.as_tensor(), 3, 1).unwrap();
    assert_eq!(vec(&y), [9.0, 9.0]);
    let gy = Tensor::new(&[[[[10f32, 100.]]]], &Device::Cpu).unwrap();
    let g = (y * gy).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vec(g.get(x.as_tensor()).unwrap());
    // Both windows' first maximum is the 9 at (0, 1); the 9 at (2, 2) gets nothing.
    let mut expect = [0f32; 12];
    expect[1] = 110.0;
    assert_eq!(g, expect);

    // Kernel 3, stride 2 against finite differences on distinct values.
    let x = rand_var(&[1, 2, 7, 7], 12);
    let y = max_pool2d(x.as_tensor(), 3, 2).unwrap();
    let g = vec(weighted_sum(&y, 13)
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap());
    let x0 = vec(x.as_tensor());
    let f = |v: Vec<f32>| -> f64 {
        let t = Tensor::from_vec(v, (1, 2, 7, 7), &Device::Cpu).unwrap();
        let y = max_pool2d(&t, 3, 2).unwrap();
        weighted_sum(&y, 13)
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let eps = 1e-3f32;
    for i in 0..x0.len() {
        let (mut p, mut m) = (x0.clone(), x0.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (f(p) - f(m)) / (2.0 * eps as f64);
        assert!(
            (fd - g[i] as f64).abs() < 1e-2,
            "x[{i}]: fd {fd} vs {}",
            g[i]
        );
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let x = rand_var(&[1, 3, 4, 4], 1);
    let w = rand_var(&[2, 2, 3, 3], 2);
    assert!(conv2d(x.as_tensor(), w.as_tensor(), None, 1, 0).is_err());
    let w = rand_var(&[2, 3, 5, 5], 2);
    assert!(conv2d(x.as_tensor(), w.as_tensor(), None, 1, 0).is_err());
    assert!(max_pool2d(x.as_tensor(), 5, 1).is_err());
    assert!(max_pool2d(x.as_tensor(), 2, 0).is_err());
}

#[test]
fn conv2d_without_bias_and_on_a_computed_input_matches_candle() {
    // The input is an intermediate result of a variable (like a second layer's input).
    let v = rand_var(&[2, 3, 9, 9], 20);
    let x = v.as_tensor().relu().unwrap();
    let w = rand_var(&[4, 3, 3, 3], 21);
    let ours = conv2d(&x, w.as_tensor(), None, 2, 1).unwrap();
    let theirs = x.conv2d(w.as_tensor(), 1, 2, 1, 1).unwrap();
    assert_close(&vec(&ours), &vec(&theirs), 1e-5, "forward");
    let g1 = weighted_sum(&ours, 22).backward().unwrap();
    let g2 = weighted_sum(&theirs, 22).backward().unwrap();
    for (name, t) in [("v", v.as_tensor()), ("w", w.as_tensor())] {
        let a = vec(g1.get(t).unwrap());
        let e = vec(g2.get(t).unwrap());
        assert_close(&a, &e, 1e-4, name);
    }
}

#[test]
fn max_pool_propagates_a_nan_and_routes_its_window_gradient_to_it() {
    // Window 1 holds a NaN after a larger value; window 2 a NaN first, then larger values.
    let x = Var::from_vec(
        vec![1.0, f32::NAN, 9.0, 2.0, /**/ f32::NAN, 5.0, 7.0, 8.0],
        (1, 2, 2, 2),
        &Device::Cpu,
    )
    .unwrap();
    let y = max_pool2d(x.as_tensor(), 2, 2).unwrap();
    assert!(vec(&y).iter().all(|v| v.is_nan()), "{:?}", vec(&y));
    // NaN outputs would poison a sum; route a plain gradient of ones instead.
    let grads = (y.ones_like().unwrap() * &y)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = vec(grads.get(x.as_tensor()).unwrap());
    let routed: Vec<bool> = g.iter().map(|v| *v != 0.0).collect();
    assert_eq!(
        routed,
        vec![false, true, false, false, true, false, false, false]
    );
}

#[test]
fn max_pool_2x2_ties_route_the_gradient_to_the_first_maximum_in_row_major_order() {
    // Windows: all equal; max at the last two (bottom row); max at top-right and bottom-left.
    let x = Var::from_vec(
        vec![
            3.0f32, 3.0, 1.0, 2.0, 0.0, 4.0, //
            3.0, 3.0, 5.0, 5.0, 4.0, 0.0,
        ],
        (1, 1, 2, 6),
        &Device::Cpu,
    )
    .unwrap();
    let y = max_pool2d(x.as_tensor(), 2, 2).unwrap();
    assert_eq!(vec(&y), vec![3.0, 5.0, 4.0]);
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = vec(grads.get(x.as_tensor()).unwrap());
    assert_eq!(
        g,
        vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    );
}

#[test]
fn fused_conv_and_max_pool_equal_the_two_ops_in_sequence_with_all_gradients() {
    // 2×2/2 (the vectorized path), overlapping 3×3/2, and a strided, padded convolution; the
    // input is computed from a variable, so its gradient flows too.
    for (case, (stride, pad), (k, s)) in [
        (0, (1, 0), (2, 2)),
        (1, (1, 1), (3, 2)),
        (2, (2, 1), (2, 1)),
    ] {
        let v = rand_var(&[3, 2, 11, 11], 40 + case);
        let x = (v.as_tensor() * 2.0).unwrap();
        let w = rand_var(&[4, 2, 3, 3], 50 + case);
        let b = rand_var(&[4], 60 + case);
        let fused = conv2d_max_pool(
            &x,
            w.as_tensor(),
            Some(b.as_tensor()),
            (stride, pad),
            (k, s),
        )
        .unwrap();
        let conv = conv2d(&x, w.as_tensor(), Some(b.as_tensor()), stride, pad).unwrap();
        let seq = max_pool2d(&conv, k, s).unwrap();
        assert_eq!(fused.dims(), seq.dims(), "case {case}");
        assert_close(&vec(&fused), &vec(&seq), 1e-6, "forward");
        let g1 = weighted_sum(&fused, 70 + case).backward().unwrap();
        let g2 = weighted_sum(&seq, 70 + case).backward().unwrap();
        for (name, t) in [
            ("x", v.as_tensor()),
            ("w", w.as_tensor()),
            ("b", b.as_tensor()),
        ] {
            let a = vec(g1.get(t).unwrap());
            let e = vec(g2.get(t).unwrap());
            assert_close(&a, &e, 1e-5, &format!("case {case}: gradient of {name}"));
        }
    }
}
