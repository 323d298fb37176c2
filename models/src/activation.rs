//! GELU with the exact (erf) form as one fused CPU op with its own backward, computed with
//! vectorizable approximations of `exp` and `erf` instead of a libm call per element (which took
//! a fifth of a sparse MiniLM's embedding time).
//!
//! `erf` is a rational minimax form on [−4, 4] (absolute error below 4e-7 in f32), `exp` a Cephes-style
//! range reduction and polynomial (about one unit in the last place); GELU is then within
//! 2e-7·|x| of candle's `gelu_erf`. Other devices and dtypes use candle's op. Large tensors are
//! split over a fixed number of elements per task, so the result does not depend on the thread
//! count (each element is computed alone anyway).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `0.5·x·(1 + erf(x/√2))`, differentiable.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// `e^x` for `x` in the range of f32 (saturating outside), vectorizable.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 0.166_666_65);
    let p = p.mul_add(r, 0.5);
    let e = p.mul_add(r * r, r + 1.0);
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `erf(x)`, vectorizable: a rational function of `x` on [−4, 4] (erf is ±1 in f32 beyond),
/// one division and no `exp` (absolute error below 4e-7, most of it f32 rounding near ±1).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    // The odd/even minimax pair of Eigen's and XLA's float erf.
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10f32;
    let p = p.mul_add(x2, 2.770_681_4e-8);
    let p = p.mul_add(x2, -2.101_024e-6);
    let p = p.mul_add(x2, -5.692_506_4e-5);
    let p = p.mul_add(x2, -7.349_906_3e-4);
    let p = p.mul_add(x2, -2.954_600_1e-3);
    let p = p.mul_add(x2, -1.609_603_3e-2);
    let q = -1.456_607_2e-5f32;
    let q = q.mul_add(x2, -2.133_740_6e-4);
    let q = q.mul_add(x2, -1.682_827e-3);
    let q = q.mul_add(x2, -7.373_329e-3);
    let q = q.mul_add(x2, -1.426_473_9e-2);
    x * p / q
}

/// `1/√2`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf_f32(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x)
}

/// An elementwise function of two operands, inlined into the loops (a function pointer or a
/// closure would be compiled apart, without the loops' target features).
trait Elementwise {
    fn apply(a: f32, b: f32) -> f32;
}

/// GELU of the first operand.
struct Forward;

impl Elementwise for Forward {
    #[inline(always)]
    fn apply(x: f32, _: f32) -> f32 {
        gelu(x)
    }
}

/// The gradient `g·GELU'(x)` of operands `(x, g)`.
struct Backward;

impl Elementwise for Backward {
    #[inline(always)]
    fn apply(x: f32, g: f32) -> f32 {
        g * gelu_grad(x)
    }
}

/// Whether this CPU runs the kernels' AVX2 + FMA builds (`#[target_feature]` functions: the
/// same arithmetic, `mul_add` is a fused multiply-add either way, vectorized).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX-512F (with AVX2 and FMA): loops compiled for it run 16 floats
/// per instruction.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma() && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i] = E(a[i], b[i])` over chunks in parallel, compiled for AVX-512 or AVX2 + FMA where
/// detected (element by element: the same bits on each).
fn map2<E: Elementwise>(a: &[f32], b: &[f32]) -> Vec<f32> {
    let n = a.len();
    assert_eq!(b.len(), n);
    let run = |at: usize, o: &mut [MaybeUninit<f32>]| {
        let (a, b) = (&a[at..at + o.len()], &b[at..at + o.len()]);
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F, AVX2 and FMA were detected on this CPU.
            unsafe { map2_avx512::<E>(o, a, b) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected on this CPU.
            unsafe { map2_avx2::<E>(o, a, b) };
            return;
        }
        map2_generic::<E>(o, a, b)
    };
    // SAFETY: `run` writes every element of its chunk (`map2_generic` checks the lengths).
    unsafe { crate::ops::filled_in_chunks(n, CHUNK, run) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn map2_avx512<E: Elementwise>(o: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
    map2_generic::<E>(o, a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map2_avx2<E: Elementwise>(o: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
    map2_generic::<E>(o, a, b)
}

#[inline(always)]
fn map2_generic<E: Elementwise>(o: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]) {
    assert!(a.len() == o.len() && b.len() == o.len());
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        o.write(E::apply(a, b));
    }
}

/// The fused op.
struct GeluErf;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("gelu: only f32 is supported")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("gelu: the input must be contiguous"),
    }
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "relprune-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let y = map2::<Forward>(x, x);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (x.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("gelu backward: expected CPU tensors")
        };
        let dx = map2::<Backward>(f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate_over_their_range() {
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let (e, want) = (exp_f32(x), x.exp());
            assert!(
                (e - want).abs() <= 4e-7 * want,
                "exp({x}) = {e}, not {want}"
            );
        }
        for i in -4000..4000 {
            let x = i as f64 / 1000.0;
            let want = libm_erf(x);
            let e = (erf_f32(x as f32) as f64 - want).abs();
            assert!(e < 4e-7, "erf({x}): off by {e}");
        }
        // erf(4) = 1 − 1.5e-8: the tail is 1 within the error bound.
        for x in [4.0f32, 6.0, 20.0] {
            assert!((erf_f32(x) - 1.0).abs() < 2e-7 && (erf_f32(-x) + 1.0).abs() < 2e-7);
        }
    }

    /// erf in f64 by its Taylor series (Abramowitz & Stegun 7.1.5; accurate to 1e-10 for |x| ≤ 4).
    fn libm_erf(x: f64) -> f64 {
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 400.0 {
                break;
            }
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn the_fused_gelu_and_its_gradient_match_candle() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, 100_000, &dev).unwrap();
        let ours = gelu_erf(&x).unwrap();
        let theirs = x.gelu_erf().unwrap();
        let d = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 2e-6, "{d}");
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let g1 = gelu_erf(v.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = v
            .as_tensor()
            .gelu_erf()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (g1.get(&v).unwrap(), g2.get(&v).unwrap());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 2e-6, "{d}");
    }
}
