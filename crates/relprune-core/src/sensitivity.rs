//! The output sensitivity of Tartaglione et al. (2018), "Learning sparse neural networks via
//! sensitivity-driven regularization": how much the network's outputs move with each weight.
//!
//! `S(w) = (1/C)·Σ_k |∂ȳ_k/∂w|`, with `ȳ_k` the batch mean of output `k` (the paper's per-example
//! definition would need one backward pass per example and output; averaging the outputs over
//! the batch first is the affordable form). **Cost:** one backward pass per output (`C` of them,
//! e.g. 10 for MNIST) on top of the loss's own, every step: several times a plain step.
//! With [`crate::Gate::Soft`] this is the paper's rule `w ← w − η·∂L/∂w − λ·w·max(0, 1 − S)`
//! ([`crate::SelectiveDecay::output_sensitivity`]).

use candle_core::{Tensor, D};

use crate::{Error, Result};

/// `(1/C)·Σ_k |∂ȳ_k/∂w|` for each of `vars` (`None` where no output depends on it).
///
/// `outputs` holds the network outputs with the `C` outputs on the last dimension (e.g. the
/// softmax probabilities, shape `(batch, C)`), still attached to the graph of `vars`.
pub fn output_sensitivity(outputs: &Tensor, vars: &[&Tensor]) -> Result<Vec<Option<Tensor>>> {
    let c = outputs.dim(D::Minus1)?;
    if c == 0 || outputs.elem_count() == 0 {
        return Err(Error::Shape("output sensitivity of an empty output".into()));
    }
    let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
    for k in 0..c {
        let grads = outputs.narrow(D::Minus1, k, 1)?.mean_all()?.backward()?;
        for (slot, v) in acc.iter_mut().zip(vars) {
            if let Some(g) = grads.get(v) {
                let a = g.abs()?;
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + a)?,
                    None => a,
                });
            }
        }
    }
    acc.into_iter()
        .map(|s| s.map(|s| (s / c as f64).map_err(Error::from)).transpose())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gate, SelectiveDecay};
    use candle_core::{Device, Var};

    #[test]
    fn sensitivity_of_a_linear_map_is_the_mean_input_over_the_outputs() {
        // y = x Wᵀ with x (2×2), W (2×2): ∂ȳ_k/∂W[k][j] = mean_b x[b][j], other rows 0, so
        // S(W[k][j]) = |mean_b x[b][j]| / C with C = 2.
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let x = Tensor::new(&[[1.0f32, -3.0], [3.0, 1.0]], &dev).unwrap();
        let y = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
        let s = output_sensitivity(&y, &[w.as_tensor()]).unwrap();
        let s = s[0].as_ref().unwrap().to_vec2::<f32>().unwrap();
        // mean x = [2, -1] → |.| / 2 = [1, 0.5] in every row.
        assert_eq!(s, vec![vec![1.0, 0.5], vec![1.0, 0.5]]);
    }

    #[test]
    fn a_variable_no_output_depends_on_has_no_sensitivity() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let unused = Var::new(&[5.0f32], &dev).unwrap();
        let y = (w.as_tensor() * 3.0).unwrap().unsqueeze(0).unwrap();
        let s = output_sensitivity(&y, &[w.as_tensor(), unused.as_tensor()]).unwrap();
        // y_k = 3·w_k: ∂ȳ_k/∂w_k = 3, summed over k and divided by C = 2 → 1.5 each.
        assert_eq!(s[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), [1.5, 1.5]);
        assert!(s[1].is_none());
    }

    #[test]
    fn tartaglione_rule_decays_insensitive_weights_by_one_minus_sensitivity() {
        let reg = SelectiveDecay::output_sensitivity(0.5);
        assert_eq!(reg.gate, Gate::Soft);
        let dev = Device::Cpu;
        let w = Tensor::new(&[2.0f32, 2.0, 2.0], &dev).unwrap();
        let s = Tensor::new(&[0.0f32, 0.25, 1.5], &dev).unwrap();
        let gate = reg.gate(&w, &s, None).unwrap();
        assert_eq!(gate.to_vec1::<f32>().unwrap(), [1.0, 0.75, 0.0]);
        // w − λ·w·max(0, 1 − S) with no gradient step: 2 − 0.5·2·[1, 0.75, 0].
        let zero = Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap();
        let w2 = reg.decoupled_step(&w, &zero, 0.1, &gate).unwrap();
        assert_eq!(w2.to_vec1::<f32>().unwrap(), [1.0, 1.25, 2.0]);
    }

    #[test]
    fn an_empty_output_is_an_error() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32], &dev).unwrap();
        let y = Tensor::zeros((0, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(output_sensitivity(&y, &[w.as_tensor()]).is_err());
    }
}
