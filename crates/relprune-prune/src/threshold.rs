//! The global magnitude threshold search: the largest `T` whose pruning keeps the validation loss
//! within the tolerance.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::{Error, Masks, ParamSet, Result};

/// Settings of the bisection.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BisectionConfig {
    /// Allowed relative worsening of the validation loss (`TWT`): the bound is `base·(1+TWT)`.
    pub twt: f64,
    /// Stop when the bracket's losses differ by less than this fraction of the head-room `base·TWT`.
    pub rel_stop: f64,
    /// Stop when the bracket is this narrow.
    pub min_step: f64,
    /// Hard cap on evaluations.
    pub max_evals: usize,
}

impl Default for BisectionConfig {
    fn default() -> Self {
        Self {
            twt: 0.05,
            rel_stop: 0.05,
            min_step: 1e-10,
            max_evals: 40,
        }
    }
}

/// The outcome of a search.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdSearch {
    /// The threshold found (weights with `|w| <` it are to be pruned).
    pub threshold: f64,
    /// The validation loss at that threshold (`base` if it prunes nothing).
    pub loss: f64,
    /// How many evaluations the search took.
    pub evaluations: usize,
}

/// Magnitude statistics of the alive weights: (smallest non-zero |w|, largest |w|, mean over layers of the layer mean |w|).
pub fn magnitude_range(params: &ParamSet, masks: &Masks) -> Result<Option<(f64, f64, f64)>> {
    let (mut lo, mut hi, mut means) = (f64::INFINITY, 0.0f64, Vec::new());
    for p in params.prunable() {
        let m = masks.get(&p.name).ok_or_else(|| Error::Param {
            name: p.name.clone(),
            msg: "prunable but has no mask".into(),
        })?;
        let a = (p.var.as_tensor().abs()? * m)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (mut sum, mut n) = (0.0f64, 0usize);
        for &x in &a {
            if x > 0.0 {
                lo = lo.min(x as f64);
                hi = hi.max(x as f64);
                sum += x as f64;
                n += 1;
            }
        }
        if n > 0 {
            means.push(sum / n as f64);
        }
    }
    if means.is_empty() {
        return Ok(None);
    }
    Ok(Some((
        lo,
        hi,
        means.iter().sum::<f64>() / means.len() as f64,
    )))
}

/// Bisection for the largest global threshold `T` with `loss_at(T) ≤ base·(1+TWT)`.
///
/// `loss_at(T)` must return the validation loss of the model with every alive `|w| < T` zeroed
/// (and leave the model as it found it). Zeroing below the smallest alive magnitude prunes
/// nothing, so that end of the bracket is known to be feasible with loss `base`.
pub fn search_global(
    params: &ParamSet,
    masks: &Masks,
    base: f64,
    cfg: &BisectionConfig,
    mut loss_at: impl FnMut(f64) -> Result<f64>,
) -> Result<ThresholdSearch> {
    let Some((min_w, max_w, start)) = magnitude_range(params, masks)? else {
        return Ok(ThresholdSearch {
            threshold: 0.0,
            loss: base,
            evaluations: 0,
        });
    };
    let bound = base * (1.0 + cfg.twt);
    let headroom = (base * cfg.twt).abs();
    let (mut lo, mut lo_loss) = (min_w, base);
    let (mut hi, mut hi_loss) = (max_w, f64::INFINITY);
    let mut t = start.clamp(min_w, max_w);
    let mut evals = 0;
    while evals < cfg.max_evals {
        let l = loss_at(t)?;
        evals += 1;
        if !l.is_finite() {
            // A model pruned to nothing can produce inf/NaN loss: that threshold is infeasible.
            hi = t;
            hi_loss = f64::INFINITY;
        } else if l <= bound {
            lo = t;
            lo_loss = l;
        } else {
            hi = t;
            hi_loss = l;
        }
        if (hi_loss - lo_loss).abs() < cfg.rel_stop * headroom || hi - lo <= cfg.min_step {
            break;
        }
        t = 0.5 * (lo + hi);
    }
    Ok(ThresholdSearch {
        threshold: lo,
        loss: lo_loss,
        evaluations: evals,
    })
}
