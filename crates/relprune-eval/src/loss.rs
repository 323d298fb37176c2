//! Label-smoothed cross-entropy for sequence models, as PyTorch's
//! `CrossEntropyLoss(label_smoothing=ε, ignore_index=pad)` computes it: the target distribution
//! puts `1 − ε` on the reference token and spreads `ε` uniformly over all `C` classes, so
//! `loss = (1 − ε)·(−log p_y) + ε·(1/C)·Σ_c (−log p_c)`, averaged over the positions that are not
//! padding.

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// Mean label-smoothed cross-entropy of `logits` `(N, C)` (or `(B, T, C)`) against `targets`
/// `(N,)` (or `(B, T)`, u32), skipping positions whose target is `ignore` (padding).
///
/// Differentiable in `logits`; `epsilon = 0` is the plain cross-entropy. An all-padding batch is
/// an error rather than a NaN loss.
pub fn label_smoothed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    epsilon: f64,
    ignore: Option<u32>,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&epsilon) {
        return Err(Error::Invalid(format!(
            "label smoothing must be in [0, 1), got {epsilon}"
        )));
    }
    let c = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), c))?;
    let targets = targets.flatten_all()?.to_dtype(DType::U32)?;
    let n = logits.dim(0)?;
    if targets.dim(0)? != n {
        return Err(Error::Invalid(format!(
            "{n} rows of logits but {} targets",
            targets.dim(0)?
        )));
    }
    if let Some(bad) = targets
        .to_vec1::<u32>()?
        .into_iter()
        .find(|&t| t as usize >= c && Some(t) != ignore)
    {
        return Err(Error::Invalid(format!(
            "target class {bad} outside the {c} classes"
        )));
    }
    // `ops::log_softmax` has a backward (candle's fused softmax kernels do not).
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let keep = match ignore {
        Some(pad) => targets.ne(pad)?.to_dtype(logp.dtype())?,
        None => Tensor::ones(n, logp.dtype(), logp.device())?,
    };
    let count = keep.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if count == 0.0 {
        return Err(Error::Invalid(
            "every target is padding: no position to average the loss over".into(),
        ));
    }
    // Padding targets may lie outside the classes: gather at a valid index, then mask.
    let safe = match ignore {
        Some(pad) => targets
            .ne(pad)?
            .where_cond(&targets, &targets.zeros_like()?)?,
        None => targets,
    };
    let nll = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let smooth = logp.mean(D::Minus1)?.neg()?;
    let per = ((nll * (1.0 - epsilon))? + (smooth * epsilon)?)?;
    Ok(((per * keep)?.sum_all()? / count)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn loss(logits: &[f32], shape: (usize, usize), t: &[u32], eps: f64, pad: Option<u32>) -> f64 {
        let l = Tensor::from_slice(logits, shape, &Device::Cpu).unwrap();
        let t = Tensor::from_slice(t, t.len(), &Device::Cpu).unwrap();
        label_smoothed_cross_entropy(&l, &t, eps, pad)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn matches_hand_computed_pytorch_values() {
        // Row 1: logits (0, ln 2, ln 3) → p = (1/6, 2/6, 3/6), target 2.
        // Row 2: uniform over 3, target 0.
        let l = [0.0, 2f32.ln(), 3f32.ln(), 1.0, 1.0, 1.0];
        let nll1 = -(0.5f64).ln();
        let nll2 = 3f64.ln();
        let plain = loss(&l, (2, 3), &[2, 0], 0.0, None);
        assert!((plain - (nll1 + nll2) / 2.0).abs() < 1e-6, "{plain}");
        let eps = 0.1;
        let mean_nll1 = -((1.0f64 / 6.0).ln() + (2.0f64 / 6.0).ln() + 0.5f64.ln()) / 3.0;
        let want = ((1.0 - eps) * nll1 + eps * mean_nll1 + (1.0 - eps) * nll2 + eps * nll2) / 2.0;
        let got = loss(&l, (2, 3), &[2, 0], eps, None);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn padding_positions_are_left_out_of_the_mean() {
        let l = [0.0, 2f32.ln(), 3f32.ln(), 5.0, -3.0, 0.5];
        let one = loss(&l[..3], (1, 3), &[2], 0.1, Some(7));
        // The second row's target is the pad id (even outside the classes): ignored.
        let both = loss(&l, (2, 3), &[2, 7], 0.1, Some(7));
        assert!((one - both).abs() < 1e-6, "{one} vs {both}");
    }

    #[test]
    fn all_padding_bad_targets_and_bad_epsilon_are_errors() {
        let l = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
        assert!(label_smoothed_cross_entropy(&l, &t(&[0, 0]), 0.1, Some(0)).is_err());
        assert!(label_smoothed_cross_entropy(&l, &t(&[0, 3]), 0.1, None).is_err());
        assert!(label_smoothed_cross_entropy(&l, &t(&[0]), 0.1, None).is_err());
        assert!(label_smoothed_cross_entropy(&l, &t(&[0, 1]), 1.0, None).is_err());
    }

    #[test]
    fn gradient_is_softmax_minus_the_smoothed_target() {
        // d loss / d z = p − q with q = (1 − ε)·onehot + ε/C, for one row.
        let z = Var::from_slice(&[0.5f32, -1.0, 2.0, 0.0], (1, 4), &Device::Cpu).unwrap();
        let t = Tensor::from_slice(&[1u32], 1, &Device::Cpu).unwrap();
        let eps = 0.2;
        let l = label_smoothed_cross_entropy(z.as_tensor(), &t, eps, None).unwrap();
        let g: Vec<f32> = l
            .backward()
            .unwrap()
            .get(z.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let e: Vec<f64> = [0.5f64, -1.0, 2.0, 0.0].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        for (k, gk) in g.iter().enumerate() {
            let q = if k == 1 { 1.0 - eps } else { 0.0 } + eps / 4.0;
            assert!((*gk as f64 - (e[k] / s - q)).abs() < 1e-5, "{k}: {gk}");
        }
    }
}
