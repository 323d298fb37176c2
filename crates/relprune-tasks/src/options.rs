//! The run options people choose by name, as types: the pruning method, the regularizer preset,
//! its penalty and gate statistic, the restore point; and (feature `cli`) the one block of
//! engine flags every command line shares, [`EngineArgs`], applied onto a preset
//! [`PruneConfig`]. An unknown name is an error listing the valid ones, never a silent default.

use relprune_core::{Gate, GateStat, Relevance, SelectiveDecay};
use relprune_prune::{PruneConfig, RestorePoint};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a run prunes: the method, or a baseline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Selective decay and iterative pruning (this project's method).
    #[default]
    Selective,
    /// Magnitude pruning once, then fine-tuning.
    OneShot,
    /// Gradual magnitude pruning (cubic schedule).
    Gmp,
    /// Han et al.: iterative prune and retrain.
    Han,
    /// SNIP: pruning at initialization by `|w·g|`.
    Snip,
}

impl Method {
    /// Its name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Self::Selective => "selective",
            Self::OneShot => "one-shot",
            Self::Gmp => "gmp",
            Self::Han => "han",
            Self::Snip => "snip",
        }
    }
}

/// A regularizer preset, keeping the strength λ it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Regularizer {
    /// Hard gate on the gradient: `|g| < τ·max|g|` decays.
    Selective,
    /// Hard gate on the Taylor score `|w·g|`.
    Taylor,
    /// LOBSTER's soft gate `1 − |g|`.
    Lobster,
    /// Tartaglione et al.: soft gate `1 − S` on the output sensitivity (one extra backward pass
    /// per class each step).
    Sensitivity,
    /// Classical weight decay.
    L2,
    /// L1 decay of every weight.
    L1,
}

impl Regularizer {
    /// The preset with strength `lambda`.
    pub fn with_lambda(self, lambda: f64) -> SelectiveDecay {
        match self {
            Self::Selective => SelectiveDecay::default().with_lambda(lambda),
            Self::Taylor => SelectiveDecay {
                relevance: Relevance::Taylor,
                ..SelectiveDecay::default().with_lambda(lambda)
            },
            Self::Lobster => SelectiveDecay::lobster(lambda),
            Self::Sensitivity => SelectiveDecay::output_sensitivity(lambda),
            Self::L2 => SelectiveDecay::l2(lambda),
            Self::L1 => SelectiveDecay::l1(lambda),
        }
    }
}

/// What the decay pulls on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Penalty {
    /// Decay ∝ w.
    L2,
    /// Decay ∝ sign(w).
    L1,
}

impl From<Penalty> for relprune_core::Penalty {
    fn from(p: Penalty) -> Self {
        match p {
            Penalty::L2 => Self::L2,
            Penalty::L1 => Self::L1,
        }
    }
}

/// The weights a plateau restores before the threshold search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Restore {
    /// The last epoch that improved by the minimum improvement (the literal rule).
    LastImprovement,
    /// The lowest validation loss since the last round.
    LowestLoss,
    /// None: the weights as trained.
    Current,
}

impl From<Restore> for RestorePoint {
    fn from(r: Restore) -> Self {
        match r {
            Restore::LastImprovement => Self::LastImprovement,
            Restore::LowestLoss => Self::LowestLoss,
            Restore::Current => Self::Current,
        }
    }
}

/// Parses a hard gate's statistic: `max`, `mean`, or a quantile `qQ` with `0 ≤ Q ≤ 1`
/// (`q0.5`: the median).
pub fn parse_gate_stat(s: &str) -> std::result::Result<GateStat, String> {
    match s {
        "max" => Ok(GateStat::Max),
        "mean" => Ok(GateStat::Mean),
        q => match q.strip_prefix('q').and_then(|v| v.parse::<f64>().ok()) {
            Some(v) if (0.0..=1.0).contains(&v) => Ok(GateStat::Quantile(v)),
            _ => Err(format!(
                "`{q}` is not a gate statistic: max, mean, or qQ with 0 ≤ Q ≤ 1 (e.g. q0.5)"
            )),
        },
    }
}

/// Parses a number that must be finite and above zero (learning rates).
pub fn parse_positive(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a finite number above 0")),
    }
}

/// Parses a number that must be finite and at least zero (strengths, budgets, tolerances).
pub fn parse_non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a finite number at least 0")),
    }
}

/// Parses a fraction in `[0, 1]`.
pub fn parse_fraction(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number in [0, 1]")),
    }
}

/// Parses a sparsity: a fraction in `[0, 1)` (1 would prune everything).
pub fn parse_sparsity(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a sparsity in [0, 1)")),
    }
}

/// Parses a count that must be at least one (threads, epochs of a phase that must run).
pub fn parse_count(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!("`{s}` is not a whole number at least 1")),
    }
}

/// The ids of the arguments the command line itself gave in `m` (not defaults or the
/// environment): what a resume names as applied or ignored.
#[cfg(feature = "cli")]
pub fn given_ids(m: &clap::ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

/// Parses a fraction in `[0, 1)` (a moving average's β: 1 would never move).
pub fn parse_beta(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number in [0, 1)")),
    }
}

/// The regularizer's flags.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RegularizerArgs {
    /// The regularizer (a preset; --lambda keeps or sets its strength).
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub regularizer: Option<Regularizer>,
    /// The regularization strength λ.
    #[cfg_attr(feature = "cli", arg(long, value_name = "L", value_parser = parse_non_negative))]
    pub lambda: Option<f64>,
    /// The gate fraction τ of a hard gate.
    #[cfg_attr(feature = "cli", arg(long, value_name = "T", value_parser = parse_non_negative))]
    pub tau: Option<f64>,
    /// The statistic of a hard gate's threshold: max, mean, or a quantile qQ (e.g. q0.5).
    #[cfg_attr(feature = "cli", arg(long, value_name = "STAT", value_parser = parse_gate_stat))]
    pub gate_stat: Option<GateStat>,
    /// The penalty: l2 (decay ∝ w) or l1 (decay ∝ sign w).
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub penalty: Option<Penalty>,
    /// Smooth the relevance over steps with this β (0 = none).
    #[cfg_attr(feature = "cli", arg(long, value_name = "B", value_parser = parse_beta))]
    pub ema_beta: Option<f64>,
}

impl RegularizerArgs {
    /// Applies the flags given to `r` (a preset first, then its settings).
    pub fn apply(&self, r: &mut SelectiveDecay) -> Result<()> {
        if let Some(preset) = self.regularizer {
            *r = preset.with_lambda(r.lambda);
        }
        if let Some(stat) = self.gate_stat {
            match &mut r.gate {
                Gate::Hard { stat: s, .. } => *s = stat,
                _ => return Err(Error::Invalid("--gate-stat needs a hard gate".into())),
            }
        }
        if let Some(p) = self.penalty {
            r.penalty = p.into();
        }
        if let Some(b) = self.ema_beta {
            r.ema_beta = b;
        }
        if let Some(l) = self.lambda {
            r.lambda = l;
        }
        if let Some(t) = self.tau {
            match &mut r.gate {
                Gate::Hard { tau, .. } => *tau = t,
                _ => return Err(Error::Invalid("--tau needs a hard gate".into())),
            }
        }
        Ok(())
    }
}

/// The engine's flags, shared by every command that prunes; each overrides the command's preset.
#[derive(Clone, Debug, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct EngineArgs {
    /// The pruning phase's epoch budget.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", visible_alias = "epochs"))]
    pub prune_epochs: Option<usize>,
    /// The pruning phase's learning rate.
    #[cfg_attr(feature = "cli", arg(long, value_name = "LR", value_parser = parse_positive))]
    pub lr: Option<f64>,
    /// The metric budget δ (validation metric units, e.g. error points).
    #[cfg_attr(feature = "cli", arg(long, value_name = "D", value_parser = parse_non_negative))]
    pub delta: Option<f64>,
    /// Stop after the stop rule's number of rounds that each prune less than this fraction of
    /// the prunable weights.
    #[cfg_attr(feature = "cli", arg(long, value_name = "F", value_parser = parse_fraction))]
    pub min_round_gain: Option<f64>,
    /// Epochs without an improvement of the validation loss that make a plateau (a round).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub patience: Option<usize>,
    /// The relative decrease of the validation loss that counts as an improvement.
    #[cfg_attr(feature = "cli", arg(long, value_name = "F", value_parser = parse_fraction))]
    pub min_improvement: Option<f64>,
    /// The fine-tune's epochs (masks fixed, no regularizer).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub finetune_epochs: Option<usize>,
    /// The fine-tune's starting learning rate (cosine decay).
    #[cfg_attr(feature = "cli", arg(long, value_name = "LR", value_parser = parse_positive))]
    pub finetune_lr: Option<f64>,
    /// The per-round validation-loss tolerance TWT of the threshold search.
    #[cfg_attr(feature = "cli", arg(long, value_name = "T", value_parser = parse_non_negative))]
    pub twt: Option<f64>,
    /// Judge each round's threshold by the validation metric instead of the loss: it may worsen
    /// by at most this many units per round.
    #[cfg_attr(
        feature = "cli",
        arg(
            long,
            value_name = "TOL",
            visible_alias = "round-tolerance",
            value_parser = parse_non_negative
        )
    )]
    pub search_metric: Option<f64>,
    /// Also bound each round's validation metric to this many units worse than the dense model.
    #[cfg_attr(feature = "cli", arg(long, value_name = "M", value_parser = parse_non_negative))]
    pub metric_bound: Option<f64>,
    /// Also judge each round's masks after retraining (at the next plateau) against δ, and let
    /// the target-sparsity stop wait for that judgement.
    #[cfg_attr(feature = "cli", arg(long))]
    pub judge_retrained: bool,
    /// The weights a plateau restores before the threshold search.
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub restore: Option<Restore>,
    /// Per-layer thresholds (one factor times each layer's mean |w|) instead of one global
    /// threshold.
    #[cfg_attr(feature = "cli", arg(long))]
    pub per_layer: bool,
    /// The regularizer.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub regularizer: RegularizerArgs,
}

impl EngineArgs {
    /// Applies the flags given to `prune`.
    pub fn apply(&self, prune: &mut PruneConfig) -> Result<()> {
        let set = |dst: &mut f64, v: Option<f64>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        if let Some(e) = self.prune_epochs {
            prune.max_epochs = e;
        }
        if let Some(p) = self.patience {
            prune.patience = p;
        }
        if let Some(e) = self.finetune_epochs {
            prune.finetune_epochs = e;
        }
        set(&mut prune.lr, self.lr);
        set(&mut prune.delta, self.delta);
        set(&mut prune.min_round_gain, self.min_round_gain);
        set(&mut prune.min_improvement, self.min_improvement);
        set(&mut prune.finetune_lr, self.finetune_lr);
        set(&mut prune.bisection.twt, self.twt);
        if let Some(tolerance) = self.search_metric {
            prune.bisection.criterion = relprune_prune::threshold::Criterion::Metric { tolerance };
        }
        if let Some(m) = self.metric_bound {
            prune.bisection.max_metric_worsening = Some(m);
        }
        if self.judge_retrained {
            prune.judge_retrained = true;
        }
        if let Some(r) = self.restore {
            prune.restore = r.into();
        }
        if self.per_layer {
            prune.bisection.scope = relprune_prune::threshold::Scope::PerLayer;
        }
        self.regularizer.apply(&mut prune.regularizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_flags_refuse_nan_infinities_and_out_of_range_values() {
        for bad in ["NaN", "inf", "-1", "x", ""] {
            assert!(parse_positive(bad).is_err(), "{bad}");
            assert!(parse_non_negative(bad).is_err(), "{bad}");
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
        assert!(parse_positive("0").is_err());
        assert_eq!(parse_non_negative("0"), Ok(0.0));
        assert!(
            parse_fraction("1.5").is_err() && parse_beta("1").is_err() && parse_beta("2").is_err()
        );
        assert_eq!(parse_fraction("1"), Ok(1.0));
        assert_eq!(parse_beta("0.9"), Ok(0.9));
        assert!(parse_positive("NaN").unwrap_err().contains("`NaN`"));
        assert!(parse_sparsity("1").is_err() && parse_sparsity("1.5").is_err());
        assert_eq!(parse_sparsity("0.99"), Ok(0.99));
        assert!(parse_count("0").is_err() && parse_count("-1").is_err());
        assert_eq!(parse_count("2"), Ok(2));
    }

    #[test]
    fn gate_statistics_parse_and_bad_ones_say_what_is_valid() {
        assert_eq!(parse_gate_stat("max"), Ok(GateStat::Max));
        assert_eq!(parse_gate_stat("q0.5"), Ok(GateStat::Quantile(0.5)));
        for bad in ["median", "q2", "qx", ""] {
            let e = parse_gate_stat(bad).unwrap_err();
            assert!(e.contains("max, mean, or qQ"), "{e}");
        }
    }

    #[test]
    fn engine_flags_override_the_preset_and_keep_the_rest() {
        let args = EngineArgs {
            prune_epochs: Some(7),
            restore: Some(Restore::Current),
            regularizer: RegularizerArgs {
                regularizer: Some(Regularizer::Selective),
                gate_stat: Some(GateStat::Quantile(0.5)),
                lambda: Some(2e-3),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut p = PruneConfig {
            target_sparsity: Some(0.5),
            ..Default::default()
        };
        args.apply(&mut p).unwrap();
        assert_eq!(p.max_epochs, 7);
        assert_eq!(p.restore, RestorePoint::Current);
        assert_eq!(p.target_sparsity, Some(0.5));
        assert_eq!(p.regularizer.lambda, 2e-3);
        assert!(matches!(
            p.regularizer.gate,
            Gate::Hard {
                stat: GateStat::Quantile(q),
                ..
            } if q == 0.5
        ));
        // A soft gate has no statistic to set.
        let soft = EngineArgs {
            regularizer: RegularizerArgs {
                regularizer: Some(Regularizer::Lobster),
                tau: Some(0.2),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = soft.apply(&mut PruneConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--tau needs a hard gate"), "{e}");
    }
}
