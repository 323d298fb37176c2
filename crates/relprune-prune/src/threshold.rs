//! The magnitude threshold search: the largest `T` whose pruning keeps the validation loss
//! within the tolerance, globally or relative to each layer's scale.

use std::collections::BTreeMap;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::{Error, Evaluation, Masks, MetricSpec, ParamSet, Result};

/// How one searched number becomes each layer's threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One magnitude threshold `T` for every layer (the default).
    #[default]
    Global,
    /// Per-layer thresholds `t · mean|w_l|`: one relative factor `t`, each layer at its own scale,
    /// so layers with small weights are not emptied first.
    PerLayer,
}

/// What a pruning threshold must preserve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Criterion {
    /// The validation loss stays `≤ base·(1+TWT)` (the default; METHOD.md).
    #[default]
    Loss,
    /// The task metric (error, BLEU, ...) stays within `tolerance` units of the unpruned model's:
    /// for tasks whose loss is a poor proxy of the metric that matters.
    Metric {
        /// Allowed worsening, in metric units (e.g. 0.1 error points, 0.5 BLEU).
        tolerance: f64,
    },
}

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
    /// Also require the validation metric to stay within this many units of the reference
    /// (the dense model), so the metric cannot drift round after round (`None`: loss only).
    #[serde(default)]
    pub max_metric_worsening: Option<f64>,
    /// With the metric bound: stop when the threshold bracket is narrower than this fraction of it.
    #[serde(default = "default_rel_bracket")]
    pub rel_bracket: f64,
    /// Global threshold or per-layer thresholds.
    #[serde(default)]
    pub scope: Scope,
    /// Judge a threshold by the validation loss or by the task metric.
    #[serde(default)]
    pub criterion: Criterion,
}

fn default_rel_bracket() -> f64 {
    0.02
}

impl Default for BisectionConfig {
    fn default() -> Self {
        Self {
            twt: 0.05,
            rel_stop: 0.05,
            min_step: 1e-10,
            max_evals: 40,
            max_metric_worsening: None,
            rel_bracket: default_rel_bracket(),
            scope: Scope::Global,
            criterion: Criterion::Loss,
        }
    }
}

/// The outcome of a search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThresholdSearch {
    /// The number found: the magnitude threshold (global scope) or the factor `t` (per layer).
    pub threshold: f64,
    /// Each prunable layer's magnitude threshold (weights with `|w| <` it are to be pruned).
    pub thresholds: BTreeMap<String, f64>,
    /// The validation loss at that threshold (`base` if it prunes nothing).
    pub loss: f64,
    /// How many evaluations the search took.
    pub evaluations: usize,
}

/// Each prunable layer's scale: 1 (global scope) or the mean alive `|w|` (per layer).
pub fn layer_scales(
    params: &ParamSet,
    masks: &Masks,
    scope: Scope,
) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for p in params.prunable() {
        let scale = match scope {
            Scope::Global => 1.0,
            Scope::PerLayer => {
                let m = masks.get(&p.name).ok_or_else(|| Error::Param {
                    name: p.name.clone(),
                    msg: "prunable but has no mask".into(),
                })?;
                let a = (p.var.as_tensor().abs()? * m)?.to_dtype(DType::F64)?;
                let n = m.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
                let sum = a.sum_all()?.to_scalar::<f64>()?;
                if n > 0.0 && sum > 0.0 {
                    sum / n
                } else {
                    1.0
                }
            }
        };
        out.insert(p.name.clone(), scale);
    }
    Ok(out)
}

/// Magnitude statistics of the alive weights, each divided by its layer's scale: (smallest
/// non-zero, largest, mean over layers of the layer mean).
pub fn magnitude_range(
    params: &ParamSet,
    masks: &Masks,
    scales: &BTreeMap<String, f64>,
) -> Result<Option<(f64, f64, f64)>> {
    let (mut lo, mut hi, mut means) = (f64::INFINITY, 0.0f64, Vec::new());
    for p in params.prunable() {
        let scale = scales.get(&p.name).copied().unwrap_or(1.0);
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
                let x = x as f64 / scale;
                lo = lo.min(x);
                hi = hi.max(x);
                sum += x;
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

/// What a threshold must keep: the loss bound and, optionally, the metric bound.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// Validation loss of the model being pruned (the restored best); the bound is `base·(1+TWT)`.
    pub base_loss: f64,
    /// The reference metric (dense model) and its direction, for the optional metric bound.
    pub reference_metric: f64,
    /// The metric's direction.
    pub metric: MetricSpec,
}

/// Bisection for the largest global threshold `T` whose pruning keeps the validation loss
/// `≤ base·(1+TWT)` (or, with [`Criterion::Metric`], the metric within its tolerance of the
/// unpruned model's, which costs one extra evaluation) and, if configured, the metric within its
/// bound of the reference.
///
/// `eval_at(thresholds)` must return the validation evaluation of the model with every alive
/// `|w|` below its layer's threshold zeroed (and leave the model as it found it). Zeroing below the smallest alive magnitude
/// prunes nothing, so that end of the bracket is feasible by definition.
pub fn search_global(
    params: &ParamSet,
    masks: &Masks,
    bounds: &Bounds,
    cfg: &BisectionConfig,
    mut eval_at: impl FnMut(&BTreeMap<String, f64>) -> Result<Evaluation>,
) -> Result<ThresholdSearch> {
    let base = bounds.base_loss;
    let scales = layer_scales(params, masks, cfg.scope)?;
    let per_layer = |t: f64| -> BTreeMap<String, f64> {
        scales.iter().map(|(k, s)| (k.clone(), t * s)).collect()
    };
    let Some((min_w, max_w, start)) = magnitude_range(params, masks, &scales)? else {
        return Ok(ThresholdSearch {
            threshold: 0.0,
            thresholds: per_layer(0.0),
            loss: base,
            evaluations: 0,
        });
    };
    let mut evals = 0;
    let metric_base = match cfg.criterion {
        Criterion::Loss => None,
        Criterion::Metric { tolerance } => {
            // Below the smallest alive magnitude nothing is pruned: the unpruned model's metric.
            evals += 1;
            Some((eval_at(&per_layer(0.0))?.metric, tolerance))
        }
    };
    let bound = base * (1.0 + cfg.twt);
    let headroom = (base * cfg.twt).abs();
    let feasible = |e: &Evaluation| {
        let main = match metric_base {
            None => e.loss.is_finite() && e.loss <= bound,
            Some((m0, tol)) => e.metric.is_finite() && bounds.metric.worsening(e.metric, m0) <= tol,
        };
        main && cfg
            .max_metric_worsening
            .is_none_or(|m| bounds.metric.worsening(e.metric, bounds.reference_metric) <= m)
    };
    let (mut lo, mut lo_loss) = (min_w, base);
    let (mut hi, mut hi_loss) = (max_w, f64::INFINITY);
    let mut t = start.clamp(min_w, max_w);
    while evals < cfg.max_evals {
        let e = eval_at(&per_layer(t))?;
        evals += 1;
        if feasible(&e) {
            lo = t;
            lo_loss = e.loss;
        } else {
            hi = t;
            // A model pruned to nothing can produce inf/NaN loss: infeasible, with no usable loss.
            hi_loss = if e.loss.is_finite() {
                e.loss
            } else {
                f64::INFINITY
            };
        }
        let losses_close = (hi_loss - lo_loss).abs() < cfg.rel_stop * headroom;
        let bracket_narrow = hi - lo <= cfg.rel_bracket * hi;
        let done = if cfg.max_metric_worsening.is_some() || metric_base.is_some() {
            // The metric is a step function of T: only the bracket tells when to stop.
            bracket_narrow || (losses_close && hi_loss > bound)
        } else {
            losses_close
        };
        if done || hi - lo <= cfg.min_step {
            break;
        }
        t = 0.5 * (lo + hi);
    }
    Ok(ThresholdSearch {
        threshold: lo,
        thresholds: per_layer(lo),
        loss: lo_loss,
        evaluations: evals,
    })
}
