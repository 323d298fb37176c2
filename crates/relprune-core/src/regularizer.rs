//! The selective weight decay regularizer on candle tensors (any device).

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// How much an element matters to the loss: the score the gate compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Relevance {
    /// Loss-based sensitivity `|g_i|` (the default).
    Gradient,
    /// First-order Taylor estimate of the loss change on removal, `|w_i · g_i|`.
    Taylor,
    /// Output sensitivity (Tartaglione et al. 2018), `(1/C)·Σ_k |∂y_k/∂w_i|` over the `C` network
    /// outputs: computed by [`crate::output_sensitivity`] and passed where the gradient goes.
    OutputSensitivity,
}

impl Relevance {
    /// Whether the scores come from the network outputs rather than from the loss gradient.
    pub fn needs_outputs(&self) -> bool {
        matches!(self, Self::OutputSensitivity)
    }
}

/// The per-tensor statistic of the scores that the gate threshold is relative to.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum GateStat {
    /// The largest score of the tensor.
    Max,
    /// The mean score of the tensor.
    Mean,
    /// The given quantile (in `[0, 1]`) of the tensor's scores.
    Quantile(f64),
}

/// Which elements count as irrelevant, and so get decayed.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Gate {
    /// `m_i = 1` iff `score_i < tau · stat(scores)`.
    Hard {
        /// The statistic the threshold is relative to.
        stat: GateStat,
        /// The fraction of the statistic below which an element is irrelevant.
        tau: f64,
    },
    /// LOBSTER's soft gate: `m_i = max(0, 1 − score_i)` (fractional decay, no threshold).
    Soft,
    /// Every element irrelevant: classical (L2) weight decay.
    All,
}

/// What the decay pulls on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Penalty {
    /// `λ·m·w`: weight decay, the gradient of `(λ/2)·Σ m w²` (the default).
    #[default]
    L2,
    /// `λ·m·sign(w)`: the subgradient of `λ·Σ m |w|`.
    L1,
}

/// The regularizer: relevance score, irrelevance gate and decay strength.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SelectiveDecay {
    /// The score each element is judged by.
    pub relevance: Relevance,
    /// The rule turning scores into the 0/1 gate.
    pub gate: Gate,
    /// Decay strength `λ`: irrelevant weights lose `λ·w` per step (not scaled by the learning rate).
    pub lambda: f64,
    /// L2 (decay `∝ w`) or L1 (decay `∝ sign(w)`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub penalty: Penalty,
    /// Smoothing `β` of the relevance across steps, `ŝ ← β·ŝ + (1−β)·s` (0 = none). Needed where an
    /// element's gradient is sparse in time, e.g. embedding rows of rare tokens.
    #[cfg_attr(feature = "serde", serde(default))]
    pub ema_beta: f64,
}

impl Default for SelectiveDecay {
    /// METHOD.md's starting point: `|g|`, `stat = max`, `τ = 0.1`, `λ = 1e-4`.
    fn default() -> Self {
        Self {
            relevance: Relevance::Gradient,
            gate: Gate::Hard {
                stat: GateStat::Max,
                tau: 0.1,
            },
            lambda: 1e-4,
            penalty: Penalty::L2,
            ema_beta: 0.0,
        }
    }
}

impl SelectiveDecay {
    /// Classical weight decay of strength `lambda` (every element irrelevant).
    pub fn l2(lambda: f64) -> Self {
        Self {
            gate: Gate::All,
            lambda,
            ..Self::default()
        }
    }

    /// Classical L1 regularization of strength `lambda` (every element, `λ·sign(w)`).
    pub fn l1(lambda: f64) -> Self {
        Self {
            gate: Gate::All,
            lambda,
            penalty: Penalty::L1,
            ..Self::default()
        }
    }

    /// Tartaglione et al.'s rule: soft gate `max(0, 1 − S)` on the output sensitivity `S`, L2.
    pub fn output_sensitivity(lambda: f64) -> Self {
        Self {
            relevance: Relevance::OutputSensitivity,
            gate: Gate::Soft,
            lambda,
            ..Self::default()
        }
    }

    /// LOBSTER's rule: soft gate `max(0, 1 − |g|)` with L2 decay of strength `lambda`.
    pub fn lobster(lambda: f64) -> Self {
        Self {
            gate: Gate::Soft,
            lambda,
            ..Self::default()
        }
    }

    /// The same regularizer with another `λ`.
    pub fn with_lambda(mut self, lambda: f64) -> Self {
        self.lambda = lambda;
        self
    }

    /// Checks that every value is in its domain.
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::Config(format!(
                "lambda must be finite and >= 0, got {}",
                self.lambda
            )));
        }
        if !(0.0..1.0).contains(&self.ema_beta) {
            return Err(Error::Config(format!(
                "ema_beta must be in [0, 1), got {}",
                self.ema_beta
            )));
        }
        if let Gate::Hard { stat, tau } = self.gate {
            if !(tau.is_finite() && tau >= 0.0) {
                return Err(Error::Config(format!(
                    "tau must be finite and >= 0, got {tau}"
                )));
            }
            if let GateStat::Quantile(q) = stat {
                if !(0.0..=1.0).contains(&q) {
                    return Err(Error::Config(format!(
                        "quantile must be in [0, 1], got {q}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The relevance scores of `w` given its gradient `g` (same shape), as a new tensor; for
    /// [`Relevance::OutputSensitivity`], `g` is the sensitivity.
    pub fn scores(&self, w: &Tensor, g: &Tensor) -> Result<Tensor> {
        check_same_shape(w, g)?;
        Ok(match self.relevance {
            Relevance::Gradient | Relevance::OutputSensitivity => g.abs()?,
            Relevance::Taylor => (w * g)?.abs()?,
        })
    }

    /// The irrelevance threshold for these scores: an element is irrelevant iff `score < threshold`.
    ///
    /// `mask` (1 = alive, 0 = pruned) restricts the statistic to the unpruned elements. A tensor
    /// whose scores are all zero has threshold `+∞` when `τ > 0`: nothing in it affects the loss.
    pub fn threshold(&self, scores: &Tensor, mask: Option<&Tensor>) -> Result<f64> {
        let (stat, tau) = match self.gate {
            Gate::All | Gate::Soft => return Ok(f64::INFINITY),
            Gate::Hard { stat, tau } => (stat, tau),
        };
        let scores = scores.to_dtype(DType::F32)?;
        let value = match stat {
            GateStat::Max => {
                let s = match mask {
                    Some(m) => (&scores * m.to_dtype(DType::F32)?)?,
                    None => scores,
                };
                s.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64
            }
            GateStat::Mean => {
                let (sum, count) = match mask {
                    Some(m) => {
                        let m = m.to_dtype(DType::F32)?;
                        (
                            (&scores * &m)?.sum_all()?.to_scalar::<f32>()? as f64,
                            m.sum_all()?.to_scalar::<f32>()? as f64,
                        )
                    }
                    None => (
                        scores.sum_all()?.to_scalar::<f32>()? as f64,
                        scores.elem_count() as f64,
                    ),
                };
                if count > 0.0 {
                    sum / count
                } else {
                    0.0
                }
            }
            GateStat::Quantile(q) => {
                let s = scores.flatten_all()?.to_vec1::<f32>()?;
                let m = match mask {
                    Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                    None => None,
                };
                crate::kernel::quantile_of_alive(s, m.as_deref(), q) as f64
            }
        };
        Ok(threshold_from_stat(value, tau))
    }

    /// The irrelevance gate (f32 in `[0, 1]`, shape of `w`) from weights and gradient.
    pub fn gate(&self, w: &Tensor, g: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.gate_from_scores(&self.scores(w, g)?, mask)
    }

    /// The irrelevance gate from relevance scores (e.g. smoothed ones).
    pub fn gate_from_scores(&self, scores: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match self.gate {
            Gate::Soft => Ok(scores.to_dtype(DType::F32)?.affine(-1.0, 1.0)?.relu()?),
            Gate::All | Gate::Hard { .. } => {
                let thr = self.threshold(scores, mask)?;
                gate_below(scores, thr)
            }
        }
    }

    /// The smoothed scores `β·ŝ + (1−β)·s`.
    pub fn smooth(&self, previous: &Tensor, scores: &Tensor) -> Result<Tensor> {
        check_same_shape(previous, scores)?;
        let b = self.ema_beta;
        Ok((previous.affine(b, 0.0)? + scores.affine(1.0 - b, 0.0)?)?)
    }

    /// The decay each element receives this step, `λ · m ⊙ w` (L2) or `λ · m ⊙ sign(w)` (L1).
    pub fn decay(&self, w: &Tensor, gate: &Tensor) -> Result<Tensor> {
        check_same_shape(w, gate)?;
        let pulled = match self.penalty {
            Penalty::L2 => w.clone(),
            Penalty::L1 => (w.gt(0.0)?.to_dtype(w.dtype())? - w.lt(0.0)?.to_dtype(w.dtype())?)?,
        };
        Ok((pulled * gate.to_dtype(w.dtype())?)?.affine(self.lambda, 0.0)?)
    }

    /// The explicit loss term with the gate held constant: `(λ/2) Σ m_i w_i²` (L2) or
    /// `λ Σ m_i |w_i|` (L1), a scalar.
    ///
    /// Its gradient is [`SelectiveDecay::decay`], so plain SGD with learning rate `η` on `L + R/η`
    /// takes the same step as the decoupled form.
    pub fn loss_term(&self, w: &Tensor, gate: &Tensor) -> Result<Tensor> {
        check_same_shape(w, gate)?;
        let gate = gate.to_dtype(w.dtype())?.detach();
        Ok(match self.penalty {
            Penalty::L2 => (w.sqr()? * gate)?
                .sum_all()?
                .affine(self.lambda / 2.0, 0.0)?,
            Penalty::L1 => (w.abs()? * gate)?.sum_all()?.affine(self.lambda, 0.0)?,
        })
    }

    /// The gate value of one element with score `s`, given the tensor's threshold (fused kernels).
    #[inline(always)]
    pub fn gate_value(&self, s: f32, threshold: f32) -> f32 {
        match self.gate {
            Gate::Soft => (1.0 - s).max(0.0),
            Gate::All => 1.0,
            Gate::Hard { .. } => {
                if s < threshold {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }

    /// What the decay pulls on for one element: `w` (L2) or `sign(w)` (L1, 0 at 0).
    #[inline(always)]
    pub fn pull(&self, w: f32) -> f32 {
        match self.penalty {
            Penalty::L2 => w,
            Penalty::L1 => {
                if w > 0.0 {
                    1.0
                } else if w < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
        }
    }

    /// The decoupled update `w − lr · update − λ · m ⊙ w`, as a new tensor.
    pub fn decoupled_step(
        &self,
        w: &Tensor,
        update: &Tensor,
        lr: f64,
        gate: &Tensor,
    ) -> Result<Tensor> {
        check_same_shape(w, update)?;
        let decay = self.decay(w, gate)?;
        Ok(((w - update.affine(lr, 0.0)?)? - decay)?)
    }
}

/// `τ · stat`, or `+∞` for an all-zero statistic (then every element is irrelevant).
pub(crate) fn threshold_from_stat(stat: f64, tau: f64) -> f64 {
    if stat <= 0.0 && tau > 0.0 {
        f64::INFINITY
    } else {
        tau * stat
    }
}

/// `1.0` where `scores < thr`, else `0.0`.
fn gate_below(scores: &Tensor, thr: f64) -> Result<Tensor> {
    if thr == f64::INFINITY {
        return Ok(scores.ones_like()?.to_dtype(DType::F32)?);
    }
    Ok(scores.lt(thr)?.to_dtype(DType::F32)?)
}

fn check_same_shape(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::Shape(format!("{:?} vs {:?}", a.dims(), b.dims())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }
    fn v(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().unwrap()
    }
    fn hard(stat: GateStat, tau: f64, lambda: f64) -> SelectiveDecay {
        SelectiveDecay {
            relevance: Relevance::Gradient,
            gate: Gate::Hard { stat, tau },
            lambda,
            ..Default::default()
        }
    }

    #[test]
    fn max_gate_marks_small_gradients_irrelevant() {
        // max|g| = 2, τ = 0.1 → threshold 0.2.
        let w = t(&[1.0, 1.0, 1.0, 1.0, 1.0]);
        let g = t(&[2.0, -0.19, 0.2, 0.0, -1.0]);
        let gate = hard(GateStat::Max, 0.1, 1e-4).gate(&w, &g, None).unwrap();
        assert_eq!(v(&gate), vec![0.0, 1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn mean_gate_uses_the_mean_of_alive_scores() {
        // |g| = [4, 1, 1, 2]; mean over all = 2; over mask [1,1,1,0] = 2 as well -> use other numbers.
        let w = t(&[1.0; 4]);
        let g = t(&[4.0, 1.0, 1.0, 6.0]);
        let reg = hard(GateStat::Mean, 1.0, 1e-4);
        // mean of all = 3 → irrelevant: 1, 1.
        assert_eq!(
            v(&reg.gate(&w, &g, None).unwrap()),
            vec![0.0, 1.0, 1.0, 0.0]
        );
        // alive = first three: mean = 2 → irrelevant: 1, 1 and the masked 6 is not < 2.
        let mask = t(&[1.0, 1.0, 1.0, 0.0]);
        let scores = reg.scores(&w, &(&g * &mask).unwrap()).unwrap();
        assert_eq!(reg.threshold(&scores, Some(&mask)).unwrap(), 2.0);
    }

    #[test]
    fn quantile_gate_uses_the_quantile_of_alive_scores() {
        let g = t(&[0.0, 1.0, 2.0, 3.0, 4.0]);
        let reg = hard(GateStat::Quantile(0.5), 1.0, 1e-4);
        assert_eq!(reg.threshold(&g, None).unwrap(), 2.0);
        let mask = t(&[0.0, 1.0, 1.0, 1.0, 1.0]);
        // alive = [1,2,3,4]; linear interpolation at 0.5 → 2.5.
        assert_eq!(reg.threshold(&g, Some(&mask)).unwrap(), 2.5);
    }

    #[test]
    fn taylor_relevance_is_abs_w_times_g() {
        let w = t(&[2.0, -3.0, 0.5]);
        let g = t(&[0.5, 1.0, -4.0]);
        let reg = SelectiveDecay {
            relevance: Relevance::Taylor,
            ..Default::default()
        };
        assert_eq!(v(&reg.scores(&w, &g).unwrap()), vec![1.0, 3.0, 2.0]);
    }

    #[test]
    fn all_zero_gradient_makes_every_element_irrelevant() {
        let w = t(&[1.0, 2.0]);
        let g = t(&[0.0, 0.0]);
        let gate = SelectiveDecay::default().gate(&w, &g, None).unwrap();
        assert_eq!(v(&gate), vec![1.0, 1.0]);
    }

    #[test]
    fn tau_zero_marks_nothing_irrelevant() {
        let w = t(&[1.0, 2.0]);
        let g = t(&[0.0, 0.5]);
        let gate = hard(GateStat::Max, 0.0, 1e-3).gate(&w, &g, None).unwrap();
        assert_eq!(v(&gate), vec![0.0, 0.0]);
    }

    #[test]
    fn decoupled_step_matches_hand_computation() {
        // w = [1, -2, 3], g = [1, 0.05, -0.01]; max|g| = 1, τ = 0.1 → elements 1, 2 irrelevant.
        // lr = 0.1, λ = 0.01: w1 = 1 - 0.1 = 0.9
        // w2 = -2 - 0.005 + 0.02 = -1.985;  w3 = 3 + 0.001 - 0.03 = 2.971
        let w = t(&[1.0, -2.0, 3.0]);
        let g = t(&[1.0, 0.05, -0.01]);
        let reg = hard(GateStat::Max, 0.1, 0.01);
        let gate = reg.gate(&w, &g, None).unwrap();
        let out = v(&reg.decoupled_step(&w, &g, 0.1, &gate).unwrap());
        let want = [0.9f32, -1.985, 2.971];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn lambda_zero_gives_the_plain_step_exactly() {
        let w = t(&[1.0, -2.0, 3.0, 0.25]);
        let g = t(&[0.3, 0.001, -0.7, 0.0]);
        let reg = SelectiveDecay::default().with_lambda(0.0);
        let gate = reg.gate(&w, &g, None).unwrap();
        let got = reg.decoupled_step(&w, &g, 0.05, &gate).unwrap();
        let plain = (&w - g.affine(0.05, 0.0).unwrap()).unwrap();
        assert_eq!(v(&got), v(&plain));
    }

    #[test]
    fn gate_marking_everything_gives_classical_weight_decay_exactly() {
        let w = t(&[1.0, -2.0, 3.0, 0.25]);
        let g = t(&[0.3, 0.001, -0.7, 0.0]);
        let lambda = 0.01;
        // τ > 1 with stat = max marks every element irrelevant, like the L2 gate.
        for reg in [hard(GateStat::Max, 1.5, lambda), SelectiveDecay::l2(lambda)] {
            let gate = reg.gate(&w, &g, None).unwrap();
            assert_eq!(v(&gate), vec![1.0; 4]);
            let got = reg.decoupled_step(&w, &g, 0.05, &gate).unwrap();
            let wd = ((&w - g.affine(0.05, 0.0).unwrap()).unwrap()
                - w.affine(lambda, 0.0).unwrap())
            .unwrap();
            assert_eq!(v(&got), v(&wd));
        }
    }

    #[test]
    fn loss_term_is_half_lambda_sum_of_gated_squares() {
        let w = t(&[1.0, -2.0, 3.0]);
        let gate = t(&[1.0, 1.0, 0.0]);
        let reg = SelectiveDecay::default().with_lambda(0.5);
        let r = reg
            .loss_term(&w, &gate)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(r, 0.25 * (1.0 + 4.0));
    }

    #[test]
    fn loss_term_gradient_equals_the_decay() {
        let w = candle_core::Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let gate = t(&[1.0, 0.0, 1.0]);
        let reg = SelectiveDecay::default().with_lambda(0.2);
        let r = reg.loss_term(w.as_tensor(), &gate).unwrap();
        let grads = r.backward().unwrap();
        let dw = grads.get(w.as_tensor()).unwrap();
        assert_eq!(v(dw), v(&reg.decay(w.as_tensor(), &gate).unwrap()));
    }

    #[test]
    fn soft_gate_is_lobsters_one_minus_score_clamped_at_zero() {
        let w = t(&[1.0, 1.0, 1.0, 1.0]);
        let g = t(&[0.0, -0.25, 0.9, 3.0]);
        let gate = SelectiveDecay::lobster(0.1).gate(&w, &g, None).unwrap();
        let got = v(&gate);
        let want = [1.0, 0.75, 0.1, 0.0];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn l1_decay_pulls_by_lambda_times_sign_and_leaves_zeros_alone() {
        let w = t(&[2.0, -0.5, 0.0]);
        let gate = t(&[1.0, 1.0, 1.0]);
        let reg = SelectiveDecay::l1(0.01);
        assert_eq!(v(&reg.decay(&w, &gate).unwrap()), vec![0.01, -0.01, 0.0]);
        let r = reg
            .loss_term(&w, &gate)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((r - 0.025).abs() < 1e-7);
    }

    #[test]
    fn l1_loss_term_gradient_equals_the_l1_decay() {
        let w = candle_core::Var::new(&[1.5f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let gate = t(&[1.0, 1.0, 0.0]);
        let reg = SelectiveDecay::l1(0.2);
        let dw = reg
            .loss_term(w.as_tensor(), &gate)
            .unwrap()
            .backward()
            .unwrap();
        let dw = dw.get(w.as_tensor()).unwrap();
        assert_eq!(v(dw), v(&reg.decay(w.as_tensor(), &gate).unwrap()));
    }

    #[test]
    fn smoothing_is_an_exponential_moving_average() {
        let reg = SelectiveDecay {
            ema_beta: 0.75,
            ..Default::default()
        };
        let s = reg.smooth(&t(&[4.0, 0.0]), &t(&[0.0, 8.0])).unwrap();
        assert_eq!(v(&s), vec![3.0, 2.0]);
    }

    #[test]
    fn invalid_configurations_are_rejected() {
        assert!(SelectiveDecay {
            ema_beta: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SelectiveDecay::default()
            .with_lambda(-1.0)
            .validate()
            .is_err());
        assert!(hard(GateStat::Max, f64::NAN, 0.1).validate().is_err());
        assert!(hard(GateStat::Quantile(1.5), 0.1, 0.1).validate().is_err());
        assert!(SelectiveDecay::default().validate().is_ok());
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let err = SelectiveDecay::default()
            .scores(&t(&[1.0, 2.0]), &t(&[1.0]))
            .unwrap_err();
        assert!(matches!(err, Error::Shape(_)));
    }
}
