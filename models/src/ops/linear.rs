//! The linear layer `y = x·Wᵀ + b` as one CPU op with its own backward.
//!
//! candle's `Linear` is a transpose, a matmul, reshapes and a broadcast add: five graph nodes,
//! each of which costs the backward a zero-filled gradient buffer and an addition, and the
//! bias gradient is a `sum` over the leading dimensions that candle's CPU reduction computes one
//! division per element. A matmul against a `broadcast_left` weight (what `broadcast_matmul`
//! does for a tied output projection) is worse: one small gemm per batch row forward and
//! backward, then a sum of `B` copies of the weight's gradient. Here the whole layer is one op:
//! the forward is one gemm over every row of `x` written onto the bias, the backward one gemm
//! per gradient (`g·W` for the input, `gᵀ·x` for the weight, straight into `(out, in)`) and a
//! row sum for the bias, each computed only if its tensor tracks a variable. A ReLU after the
//! layer ([`linear_relu`]) is applied in the same op, its backward read off the output.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    contiguous_f32, filled_in_chunks, gemm_into, gemm_new, gemm_parallelism, with_f32, Mat,
};

/// Elements per task of the element-wise passes (ReLU, its gradient, the bias gradient's
/// columns), which run on the pool for large outputs.
const CHUNK: usize = 1 << 14;

/// `y = x·Wᵀ (+ b)` over the last dimension of `x`, then `max(y, 0)` if `relu`.
struct LinearOp {
    /// Whether the third input is a real bias (else a zero vector, not added).
    has_bias: bool,
    /// Whether a ReLU follows.
    relu: bool,
}

/// `f` on chunks of `x`, on the pool when there are several.
fn chunked(x: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    if x.len() > CHUNK && rayon::current_num_threads() > 1 {
        x.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| f(i * CHUNK, c));
    } else {
        f(0, x);
    }
}

/// Column sums of the `rows × o` row-major `g`, rows added in order for every column (blocks
/// of columns on the pool): the same bits whatever the thread count.
fn column_sums(g: &[f32], o: usize) -> Vec<f32> {
    let mut sums = vec![0f32; o];
    let cols = (CHUNK * o / g.len().max(1)).clamp(16, o.max(16));
    let add = |c0: usize, s: &mut [f32]| {
        for row in g.chunks(o) {
            for (s, v) in s.iter_mut().zip(&row[c0..]) {
                *s += v;
            }
        }
    };
    if g.len() > CHUNK && rayon::current_num_threads() > 1 {
        sums.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, s)| add(i * cols, s));
    } else {
        add(0, &mut sums);
    }
    sums
}

/// `(rows, in, out)` of a product of `x` `(…, in)` with `w` `(out, in)`.
fn dims(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
    let (&k, lead) = x
        .split_last()
        .ok_or_else(|| candle_core::Error::Msg("linear: input is a scalar".into()))?;
    match w {
        [o, i] if *i == k => Ok((lead.iter().product(), k, *o)),
        _ => candle_core::bail!("linear: input {x:?} against weight {w:?}"),
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "relprune-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k, o) = dims(l1.dims(), l2.dims())?;
        let x = contiguous_f32(s1, l1, "linear")?;
        let w = contiguous_f32(s2, l2, "linear")?;
        let b = contiguous_f32(s3, l3, "linear")?;
        let xm = Mat {
            data: x,
            rs: k,
            cs: 1,
        };
        // Wᵀ read in place: element (i, j) of the `in × out` view is W[j][i].
        let wt = Mat {
            data: w,
            rs: 1,
            cs: k,
        };
        let par = gemm_parallelism(n, o, k);
        if b.len() != o {
            candle_core::bail!("linear: bias of {} for {o} outputs", b.len())
        }
        let mut y = if self.has_bias {
            // Rows start as the bias (filled on the pool for large outputs), the product adds.
            let rows = (CHUNK / o.max(1)).max(1) * o.max(1);
            let fill = |_: usize, c: &mut [MaybeUninit<f32>]| {
                for row in c.chunks_mut(o.max(1)) {
                    for (d, &v) in row.iter_mut().zip(b) {
                        d.write(v);
                    }
                }
            };
            // SAFETY: chunks are whole rows of `o` (a multiple of `o` long), each row written
            // from the bias, which has `o` elements (checked above).
            let mut y = unsafe { filled_in_chunks(n * o, rows, fill) };
            gemm_into(n, o, k, &mut y, true, xm, wt, par);
            y
        } else {
            gemm_new(n, o, k, xm, wt, par)
        };
        if self.relu {
            chunked(&mut y, |_, c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        }
        let mut shape = l1.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = o;
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k, o) = dims(x.dims(), w.dims())?;
        let dev = x.device().clone();
        with_f32(grad, "linear backward", |g| {
            // Through the ReLU: the gradient where the output is positive (PyTorch's rule; at
            // an input of exactly 0 candle's `relu` would pass it).
            let g: Cow<[f32]> = if self.relu {
                with_f32(res, "linear backward", |y| {
                    if y.len() != g.len() {
                        candle_core::bail!(
                            "linear backward: {} outputs, {} gradients",
                            y.len(),
                            g.len()
                        )
                    }
                    // One pass, written once: the gradient where the output is positive.
                    let pass = |at: usize, c: &mut [MaybeUninit<f32>]| {
                        for ((d, &gv), &yv) in c.iter_mut().zip(&g[at..]).zip(&y[at..]) {
                            d.write(if yv > 0.0 { gv } else { 0.0 });
                        }
                    };
                    // SAFETY: `y` and `g` are as long as the buffer (checked), so `pass` writes
                    // every element of its chunk.
                    let gr = unsafe { filled_in_chunks(g.len(), CHUNK, pass) };
                    Ok(Cow::Owned(gr))
                })?
            } else {
                Cow::Borrowed(g)
            };
            let g = &*g;
            let gm = Mat {
                data: g,
                rs: o,
                cs: 1,
            };
            let grad_b = if self.has_bias && b.track_op() {
                Some(Tensor::from_vec(column_sums(g, o), o, &dev)?)
            } else {
                None
            };
            let grad_x = if x.track_op() {
                with_f32(&w.detach(), "linear backward", |wv| {
                    let wm = Mat {
                        data: wv,
                        rs: k,
                        cs: 1,
                    };
                    let gx = gemm_new(n, k, o, gm, wm, gemm_parallelism(n, k, o));
                    Ok(Some(Tensor::from_vec(gx, x.shape(), &dev)?))
                })?
            } else {
                None
            };
            let grad_w = if w.track_op() {
                with_f32(&x.detach(), "linear backward", |xv| {
                    let gt = Mat {
                        data: g,
                        rs: 1,
                        cs: o,
                    };
                    let xm = Mat {
                        data: xv,
                        rs: k,
                        cs: 1,
                    };
                    let gw = gemm_new(o, k, n, gt, xm, gemm_parallelism(o, k, n));
                    Ok(Some(Tensor::from_vec(gw, (o, k), &dev)?))
                })?
            } else {
                None
            };
            Ok((grad_x, grad_w, grad_b))
        })
    }
}

/// `x·Wᵀ + b` over the last dimension of `x` `(…, in)`, for `weight` `(out, in)` and an optional
/// `bias` `(out,)`: one fused op with its own backward on the CPU for f32, candle's `Linear`
/// elsewhere (the same values; a test compares the two).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    fused_linear(x, weight, bias, false)
}

/// `relu(x·Wᵀ + b)`: [`linear`] with the ReLU in the same op (on the CPU for f32). Its gradient
/// passes where the output is positive, as PyTorch's does; candle's `relu` also passes it where
/// the input is exactly 0.
pub fn linear_relu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    fused_linear(x, weight, bias, true)
}

fn fused_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
    let fused =
        crate::fused::fused_enabled() && f32_cpu(x) && f32_cpu(weight) && bias.is_none_or(f32_cpu);
    if !fused {
        let y = linear_reference(x, weight, bias)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    let (_, _, o) = dims(x.dims(), weight.dims())?;
    let b = super::bias_or_zero(bias, o, "linear")?;
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &b,
        LinearOp {
            has_bias: bias.is_some(),
            relu,
        },
    )
}

/// [`linear`] written with candle's ops (`candle_nn::Linear`).
pub fn linear_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::ops::test_tensor as filled;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Output and every gradient of `sum(linear(x)·r)` through `f`.
    fn run(
        f: fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
        x_shape: &[usize],
        out: usize,
        bias: bool,
    ) -> Vec<Tensor> {
        let k = *x_shape.last().unwrap();
        let x = Var::from_tensor(&filled(x_shape, 1)).unwrap();
        let w = Var::from_tensor(&filled(&[out, k], 2)).unwrap();
        let b = Var::from_tensor(&filled(&[out], 3)).unwrap();
        let y = f(x.as_tensor(), w.as_tensor(), bias.then_some(b.as_tensor())).unwrap();
        let mut y_shape = x_shape.to_vec();
        *y_shape.last_mut().unwrap() = out;
        let r = filled(&y_shape, 4);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut v = vec![
            y,
            grads.get(&x).unwrap().clone(),
            grads.get(&w).unwrap().clone(),
        ];
        if bias {
            v.push(grads.get(&b).unwrap().clone());
        } else {
            assert!(grads.get(&b).is_none());
        }
        v
    }

    #[test]
    fn fused_linear_matches_candles_linear_in_values_and_gradients() {
        for (shape, out, bias) in [
            (vec![7, 5], 3, true),
            (vec![2, 9, 33], 17, true),
            (vec![2, 3, 4, 16], 8, false),
            (vec![130, 64], 300, true),
        ] {
            let fused = run(linear, &shape, out, bias);
            let plain = run(linear_reference, &shape, out, bias);
            for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
                assert_eq!(a.dims(), b.dims(), "{shape:?} item {i}");
                let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let tol = 1e-5 * scale.to_scalar::<f32>().unwrap().max(1.0);
                assert!(max_diff(a, b) <= tol, "{shape:?} item {i}");
            }
        }
    }

    fn linear_relu_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        linear_reference(x, w, b)?.relu()
    }

    #[test]
    fn fused_linear_relu_matches_candles_linear_and_relu_in_values_and_gradients() {
        for (shape, out, bias) in [
            (vec![7, 5], 3, true),
            (vec![2, 9, 33], 17, false),
            (vec![300, 64], 300, true),
        ] {
            let fused = run(linear_relu, &shape, out, bias);
            let plain = run(linear_relu_reference, &shape, out, bias);
            let y: Vec<f32> = fused[0].flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                y.contains(&0.0) && y.iter().any(|&v| v > 0.0),
                "{shape:?}: both sides of the ReLU"
            );
            for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
                assert_eq!(a.dims(), b.dims(), "{shape:?} item {i}");
                let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let tol = 1e-5 * scale.to_scalar::<f32>().unwrap().max(1.0);
                assert!(max_diff(a, b) <= tol, "{shape:?} item {i}");
            }
        }
    }

    #[test]
    fn fused_linear_gives_the_same_bits_on_one_thread_and_on_two() {
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let mut r = run(linear, &[3, 200, 96], 384, true);
                    r.extend(run(linear_relu, &[3, 200, 96], 384, true));
                    r
                })
        };
        let (a, b) = (on(1), on(2));
        for (x, y) in a.iter().zip(&b) {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }

    #[test]
    fn inputs_that_track_no_variable_get_no_gradient_work() {
        let x = filled(&[4, 6], 5);
        let w = Var::from_tensor(&filled(&[2, 6], 6)).unwrap();
        let y = linear(&x, w.as_tensor(), None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert_eq!(grads.get(&w).unwrap().dims(), &[2, 6]);
    }

    #[test]
    fn a_weight_of_the_wrong_width_is_an_error() {
        let x = filled(&[4, 6], 5);
        let w = filled(&[2, 5], 6);
        assert!(linear(&x, &w, None).is_err());
        let b = filled(&[3], 7);
        assert!(linear(&x, &filled(&[2, 6], 8), Some(&b)).is_err());
    }
}
