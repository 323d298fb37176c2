//! The fused layer norm, RMS norm and softmax: values and gradients equal the plain-ops formulas,
//! the gradients equal finite differences, masked softmax rows stay finite, and results are
//! bit-identical for any number of threads. An ignored test times a Transformer training step
//! with and without them.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{Module, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relprune_models::fused::{
    layer_norm, layer_norm_reference, rms_norm, rms_norm_reference, softmax_last_dim,
    softmax_reference, with_reference, LayerNorm, RmsNorm,
};
use relprune_models::transformer::{Embeddings, Positions, Transformer, TransformerConfig};

fn rand_vec(n: usize, lo: f32, hi: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn rand_tensor(shape: &[usize], lo: f32, hi: f32, rng: &mut StdRng) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rand_vec(n, lo, hi, rng), shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// `max |a − b| / max |b|`: the error relative to the reference's scale.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-30);
    diff / scale
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// An op under test: its inputs → output, through the fused or the plain path.
type Op = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Output and gradients of `Σ op(inputs)·r` (every input a variable) for a random `r`.
fn run(op: &Op, inputs: &[Tensor], r: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = ts
        .iter()
        .map(|t| grads.get(t).expect("a gradient").clone())
        .collect();
    (y, gs)
}

/// Checks that the fused op and its plain formula agree in value and every gradient.
fn check_against_reference(name: &str, fused: &Op, plain: &Op, inputs: &[Tensor], tol: f32) {
    let mut rng = StdRng::seed_from_u64(11);
    let r = rand_tensor(inputs[0].dims(), -1.0, 1.0, &mut rng);
    let (y, g) = run(fused, inputs, &r);
    let (y_ref, g_ref) = run(plain, inputs, &r);
    assert_close(
        &format!("{name} {:?} value", inputs[0].dims()),
        &y,
        &y_ref,
        tol,
    );
    for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
        assert_close(
            &format!("{name} {:?} grad {i}", inputs[0].dims()),
            a,
            b,
            tol,
        );
    }
}

fn ln_fused(t: &[Tensor]) -> Result<Tensor> {
    layer_norm(&t[0], &t[1], &t[2], 1e-5)
}
fn ln_plain(t: &[Tensor]) -> Result<Tensor> {
    layer_norm_reference(&t[0], &t[1], &t[2], 1e-5)
}
fn rms_fused(t: &[Tensor]) -> Result<Tensor> {
    rms_norm(&t[0], &t[1], 1e-6)
}
fn rms_plain(t: &[Tensor]) -> Result<Tensor> {
    rms_norm_reference(&t[0], &t[1], 1e-6)
}
fn sm_fused(t: &[Tensor]) -> Result<Tensor> {
    softmax_last_dim(&t[0])
}
fn sm_plain(t: &[Tensor]) -> Result<Tensor> {
    softmax_reference(&t[0])
}

const SHAPES: &[&[usize]] = &[
    &[5, 7],
    &[3, 4, 16],
    &[2, 3, 5, 128],
    &[2, 2, 3, 33],
    &[4, 1],
];

/// x with an offset (layer norm must not care) and weight/bias around 1 and 0.
fn norm_inputs(shape: &[usize], rng: &mut StdRng) -> Vec<Tensor> {
    let d = *shape.last().unwrap();
    vec![
        rand_tensor(shape, -2.0, 3.0, rng),
        rand_tensor(&[d], 0.5, 1.5, rng),
        rand_tensor(&[d], -0.5, 0.5, rng),
    ]
}

#[test]
fn layer_norm_equals_the_plain_formula() {
    let mut rng = StdRng::seed_from_u64(1);
    for shape in SHAPES {
        let inputs = norm_inputs(shape, &mut rng);
        check_against_reference("layer_norm", &ln_fused, &ln_plain, &inputs, 1e-5);
    }
    // BERT's epsilon, and a constant row (zero variance: output = bias, gradient finite).
    let mut inputs = norm_inputs(&[3, 64], &mut rng);
    inputs[0] = Tensor::cat(
        &[
            &inputs[0].narrow(0, 0, 2).unwrap(),
            &Tensor::full(0.25f32, (1, 64), &Device::Cpu).unwrap(),
        ],
        0,
    )
    .unwrap();
    let bert = |t: &[Tensor]| layer_norm(&t[0], &t[1], &t[2], 1e-12);
    let bert_plain = |t: &[Tensor]| layer_norm_reference(&t[0], &t[1], &t[2], 1e-12);
    check_against_reference(
        "layer_norm eps 1e-12",
        &bert,
        &bert_plain,
        &inputs[..],
        1e-5,
    );
    let y = layer_norm(&inputs[0], &inputs[1], &inputs[2], 1e-12).unwrap();
    assert_eq!(values(&y.narrow(0, 2, 1).unwrap()), values(&inputs[2]));
}

#[test]
fn rms_norm_equals_the_plain_formula() {
    let mut rng = StdRng::seed_from_u64(2);
    // With one feature RMS norm is sign(x)·w: its x-gradient is ~eps, rounding noise in both
    // paths, so that shape is left out.
    for shape in SHAPES.iter().filter(|s| s.last() != Some(&1)) {
        let inputs = norm_inputs(shape, &mut rng);
        check_against_reference("rms_norm", &rms_fused, &rms_plain, &inputs[..2], 1e-5);
    }
}

#[test]
fn softmax_equals_the_plain_formula_with_masked_and_fully_masked_rows() {
    let mut rng = StdRng::seed_from_u64(3);
    for shape in SHAPES {
        let x = rand_tensor(shape, -4.0, 4.0, &mut rng);
        check_against_reference("softmax", &sm_fused, &sm_plain, &[x], 1e-5);
    }
    // Attention-like scores (B, H, T, S) with a causal -1e9 mask, plus one fully masked row.
    let (b, h, t) = (2, 3, 6);
    let mut data = rand_vec(b * h * t * t, -3.0, 3.0, &mut rng);
    for (i, v) in data.iter_mut().enumerate() {
        let (row, col) = ((i / t) % t, i % t);
        if col > row {
            *v += -1e9;
        }
    }
    for v in &mut data[..t] {
        *v = -1e9;
    }
    let x = Tensor::from_vec(data, (b, h, t, t), &Device::Cpu).unwrap();
    check_against_reference(
        "masked softmax",
        &sm_fused,
        &sm_plain,
        std::slice::from_ref(&x),
        1e-5,
    );
    let y = values(&softmax_last_dim(&x).unwrap());
    assert!(y.iter().all(|v| v.is_finite()));
    for v in &y[..t] {
        assert!((v - 1.0 / t as f32).abs() < 1e-7, "fully masked row: {v}");
    }
    // Masked entries get exactly zero weight; each row sums to one.
    assert_eq!(y[t + 2], 0.0);
    for row in y.chunks(t) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    let x = Var::from_tensor(&x).unwrap();
    let r = rand_tensor(x.dims(), -1.0, 1.0, &mut rng);
    let grads = (softmax_last_dim(x.as_tensor()).unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(values(grads.get(x.as_tensor()).unwrap())
        .iter()
        .all(|v| v.is_finite()));
}

/// Central differences of `Σ op(inputs)·r` against the op's own gradients.
fn check_finite_differences(name: &str, op: &Op, inputs: &[Tensor]) {
    let mut rng = StdRng::seed_from_u64(5);
    let r = rand_tensor(inputs[0].dims(), -1.0, 1.0, &mut rng);
    let (_, grads) = run(op, inputs, &r);
    let loss = |ts: &[Tensor]| -> f64 {
        let y = op(ts).unwrap().to_dtype(DType::F64).unwrap();
        let r = r.to_dtype(DType::F64).unwrap();
        (y * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-2f32;
    for (k, g) in grads.iter().enumerate() {
        let g = values(g);
        let base = values(&inputs[k]);
        for i in 0..base.len() {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                let mut ts = inputs.to_vec();
                ts[k] = Tensor::from_vec(v, inputs[k].dims(), &Device::Cpu).unwrap();
                loss(&ts)
            };
            let fd = ((at(h) - at(-h)) / (2.0 * h as f64)) as f32;
            let tol = 2e-3 * (1.0 + fd.abs());
            assert!(
                (g[i] - fd).abs() < tol,
                "{name} input {k}[{i}]: grad {} vs fd {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn gradients_equal_finite_differences() {
    let mut rng = StdRng::seed_from_u64(4);
    let inputs = norm_inputs(&[2, 3, 6], &mut rng);
    check_finite_differences("layer_norm", &ln_fused, &inputs);
    check_finite_differences("rms_norm", &rms_fused, &inputs[..2]);
    let x = rand_tensor(&[2, 3, 5], -2.0, 2.0, &mut rng);
    check_finite_differences("softmax", &sm_fused, &[x]);
}

/// Every output and gradient bit of the three ops on an input large enough to run in parallel.
fn all_bits(seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let inputs = norm_inputs(&[8, 300, 96], &mut rng);
    let r = rand_tensor(inputs[0].dims(), -1.0, 1.0, &mut rng);
    let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    let mut out = Vec::new();
    for (op, n) in [(&ln_fused as &Op, 3), (&rms_fused, 2), (&sm_fused, 1)] {
        let (y, gs) = run(op, &inputs[..n], &r);
        out.push(bits(&y));
        out.extend(gs.iter().map(bits));
    }
    out
}

#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let one = pool(1).install(|| all_bits(9));
    let two = pool(2).install(|| all_bits(9));
    let three = pool(3).install(|| all_bits(9));
    assert_eq!(one.len(), 9);
    assert!(one == two, "1 vs 2 threads differ");
    assert!(one == three, "1 vs 3 threads differ");
}

#[test]
fn non_contiguous_inputs_other_dtypes_and_modules() {
    let mut rng = StdRng::seed_from_u64(6);
    let inputs = norm_inputs(&[6, 16], &mut rng);
    // A transposed input is made contiguous first.
    let x = inputs[0].t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!x.is_contiguous());
    let expect = layer_norm(&x.contiguous().unwrap(), &inputs[1], &inputs[2], 1e-5).unwrap();
    assert_eq!(
        values(&layer_norm(&x, &inputs[1], &inputs[2], 1e-5).unwrap()),
        values(&expect)
    );
    assert_eq!(
        values(&softmax_last_dim(&x).unwrap()),
        values(&softmax_last_dim(&x.contiguous().unwrap()).unwrap())
    );
    // f64 takes the plain path and agrees.
    let f64s: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let y64 = layer_norm(&f64s[0], &f64s[1], &f64s[2], 1e-5).unwrap();
    assert_eq!(y64.dtype(), DType::F64);
    assert_close(
        "f64 layer_norm",
        &ln_fused(&inputs).unwrap(),
        &y64.to_dtype(DType::F32).unwrap(),
        1e-6,
    );
    let y64 = rms_norm(&f64s[0], &f64s[1], 1e-6).unwrap();
    assert_close(
        "f64 rms_norm",
        &rms_fused(&inputs).unwrap(),
        &y64.to_dtype(DType::F32).unwrap(),
        1e-6,
    );
    let y64 = softmax_last_dim(&f64s[0]).unwrap();
    assert_close(
        "f64 softmax",
        &sm_fused(&inputs).unwrap(),
        &y64.to_dtype(DType::F32).unwrap(),
        1e-6,
    );
    // The modules call the functions.
    let ln = LayerNorm::new(inputs[1].clone(), inputs[2].clone(), 1e-5);
    assert_eq!(
        values(&ln.forward(&inputs[0]).unwrap()),
        values(&ln_fused(&inputs).unwrap())
    );
    let rms = RmsNorm::new(inputs[1].clone(), 1e-6);
    assert_eq!(
        values(&rms.forward(&inputs[0]).unwrap()),
        values(&rms_fused(&inputs).unwrap())
    );
    // The reference switch reaches the plain path (same values within rounding) and is undone.
    let plain = with_reference(|| ln.forward(&inputs[0]).unwrap());
    assert_close("with_reference", &plain, &ln_fused(&inputs).unwrap(), 1e-5);
    // Wrong parameter shapes are errors, not panics.
    assert!(layer_norm(
        &inputs[0],
        &inputs[1].narrow(0, 0, 8).unwrap(),
        &inputs[2],
        1e-5
    )
    .is_err());
    assert!(rms_norm(&inputs[0], &inputs[1].unsqueeze(0).unwrap(), 1e-6).is_err());
}

/// One training step: forward_t, mean cross-entropy over the target tokens, backward.
fn train_step(
    model: &Transformer,
    src: &Tensor,
    mask: &Tensor,
    tgt_in: &Tensor,
    labels: &Tensor,
) -> f32 {
    let logits = model.forward_t(src, mask, tgt_in, true).unwrap();
    let v = logits.dim(2).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits.reshape(((), v)).unwrap(), labels).unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get_ids().next().is_some());
    loss.to_scalar::<f32>().unwrap()
}

/// Times a training step of a small Transformer (d_model 128, 4 heads, ffn 512, 2+2 layers,
/// vocabulary 4000, batch 64 × 32) with the fused ops and with the plain-ops formulas,
/// interleaved so that load from other processes hits both alike. Run with
/// `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=2 cargo test --release -p relprune-models --test fused -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_transformer_training_step() {
    let config = TransformerConfig {
        src_vocab: 4000,
        tgt_vocab: 4000,
        d_model: 128,
        heads: 4,
        ffn_dim: 512,
        encoder_layers: 2,
        decoder_layers: 2,
        dropout: 0.1,
        attention_dropout: 0.1,
        positions: Positions::Sinusoidal,
        max_len: 64,
        embeddings: Embeddings::SharedAll,
        pre_norm: true,
        scale_embedding: true,
        pad_id: 0,
        bos_id: 1,
        eos_id: 2,
    };
    let vm = VarMap::new();
    let model = Transformer::new(config, &vm, 7, &Device::Cpu).unwrap();
    let (b, l) = (64, 32);
    let mut rng = StdRng::seed_from_u64(8);
    let mut ids = || {
        let v: Vec<u32> = (0..b * l).map(|_| rng.random_range(3..4000)).collect();
        Tensor::from_vec(v, (b, l), &Device::Cpu).unwrap()
    };
    let (src, tgt_in, labels) = (ids(), ids(), ids().flatten_all().unwrap());
    // Some padding in the sources, as in real batches.
    let mask: Vec<u32> = (0..b * l)
        .map(|i| u32::from(i % l < l - (i / l) % 8))
        .collect();
    let mask = Tensor::from_vec(mask, (b, l), &Device::Cpu).unwrap();
    let step = || train_step(&model, &src, &mask, &tgt_in, &labels);
    for _ in 0..2 {
        step();
        with_reference(step);
    }
    let (mut fused_s, mut plain_s) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let t = Instant::now();
        step();
        fused_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        with_reference(step);
        plain_s.push(t.elapsed().as_secs_f64());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mf, mp) = (mean(&fused_s), mean(&plain_s));
    let (df, dp) = (median(&mut fused_s), median(&mut plain_s));
    println!(
        "training step: fused mean {:.1} ms (median {:.1}), plain mean {:.1} ms (median {:.1}); \
         plain/fused = {:.2} (mean), {:.2} (median)",
        mf * 1e3,
        df * 1e3,
        mp * 1e3,
        dp * 1e3,
        mp / mf,
        dp / df
    );
}

/// Times forward + backward of each op alone at the benchmark Transformer's sizes (layer norms
/// over 2048 × 128, attention softmax over 64 × 4 × 32 × 32), fused and plain, interleaved.
#[test]
#[ignore]
fn bench_ops() {
    let mut rng = StdRng::seed_from_u64(10);
    let norm = norm_inputs(&[64, 32, 128], &mut rng);
    let scores = rand_tensor(&[64, 4, 32, 32], -3.0, 3.0, &mut rng);
    let cases: [(&str, &Op, &Op, Vec<Tensor>); 3] = [
        ("layer_norm", &ln_fused, &ln_plain, norm.clone()),
        ("rms_norm", &rms_fused, &rms_plain, norm[..2].to_vec()),
        ("softmax", &sm_fused, &sm_plain, vec![scores]),
    ];
    for (name, fused, plain, inputs) in cases {
        let r = rand_tensor(inputs[0].dims(), -1.0, 1.0, &mut rng);
        let time = |op: &Op| {
            let t = Instant::now();
            run(op, &inputs, &r);
            t.elapsed().as_secs_f64()
        };
        let (mut f, mut p) = (Vec::new(), Vec::new());
        for i in 0..22 {
            let (a, b) = (time(fused), time(plain));
            if i >= 2 {
                f.push(a);
                p.push(b);
            }
        }
        f.sort_by(f64::total_cmp);
        p.sort_by(f64::total_cmp);
        let (mf, mp) = (f[f.len() / 2], p[p.len() / 2]);
        println!(
            "{name} forward+backward: fused {:.2} ms, plain {:.2} ms (medians), plain/fused = {:.1}",
            mf * 1e3,
            mp * 1e3,
            mp / mf
        );
    }
}
