//! Seeded parameter initialization.
//!
//! candle's CPU random generator cannot be seeded, so models draw their initial values from our
//! own seeded generator: the same seed gives the same network on every run and machine.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::Rng;

use crate::Result;

/// Creates a variable of `shape` drawn from U(-bound, bound) and registers it in `varmap` as `name`.
pub fn uniform_var(
    varmap: &VarMap,
    name: &str,
    shape: &[usize],
    bound: f64,
    rng: &mut StdRng,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let bound = bound as f32;
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
    let var = Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?;
    let t = var.as_tensor().clone();
    varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?
        .insert(name.to_string(), var);
    Ok(t)
}

/// A linear layer initialized as PyTorch's `nn.Linear` does: weight and bias from U(±1/√fan_in).
pub fn linear(
    varmap: &VarMap,
    prefix: &str,
    in_dim: usize,
    out_dim: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<candle_nn::Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let w = uniform_var(
        varmap,
        &format!("{prefix}.weight"),
        &[out_dim, in_dim],
        bound,
        rng,
        device,
    )?;
    let b = uniform_var(
        varmap,
        &format!("{prefix}.bias"),
        &[out_dim],
        bound,
        rng,
        device,
    )?;
    Ok(candle_nn::Linear::new(w, Some(b)))
}

/// A tensor of `shape` drawn from N(0, std²) (Box–Muller on the seeded generator).
pub fn normal(shape: &[usize], std: f64, rng: &mut StdRng, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut data = Vec::with_capacity(n + 1);
    while data.len() < n {
        // 1 − u keeps the logarithm finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = 2.0 * std::f64::consts::PI * u2;
        data.push((r * t.cos()) as f32);
        data.push((r * t.sin()) as f32);
    }
    data.truncate(n);
    Ok(Tensor::from_vec(data, shape, device)?)
}
