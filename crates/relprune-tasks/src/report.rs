//! What a run reports, written the one way: the engine's outcome in the results format, and
//! `results.json`, the curve and `report.md` written (atomically) into the run's directory.

use std::path::Path;

use relprune_eval::{line_chart_svg, render_markdown, RoundRecord, RunResults, Series};

use crate::Result;

/// What a pruning phase hands to the report: its rounds and its `extra` entries.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    /// The rounds, in the results format.
    pub rounds: Vec<RoundRecord>,
    /// Free-form entries for `results.json`'s `extra`.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The report's view of one round of `IterativePruning`.
pub fn round_record(r: &relprune_prune::RoundRecord) -> RoundRecord {
    RoundRecord {
        round: r.round,
        epoch: r.epoch,
        threshold: r.threshold,
        remaining_pct: r.remaining_pct,
        val_loss: r.valid.loss,
        val_metric: r.valid.metric,
    }
}

/// The rounds and the `extra` entries of an `IterativePruning` phase, under the key names every
/// report shares: `reference_valid`, `result_round`, `pruning_epochs`, `stop_reason`,
/// `valid_before_finetune` and `valid_after_finetune`.
pub fn phase_report(outcome: &relprune_prune::PruneOutcome) -> Phase {
    let rounds = outcome.rounds.iter().map(round_record).collect();
    // Evaluations and the stop reason are plain data: `json!` cannot fail on them.
    let entries = [
        ("reference_valid", serde_json::json!(outcome.reference)),
        ("result_round", serde_json::json!(outcome.result_round)),
        ("pruning_epochs", serde_json::json!(outcome.epochs)),
        ("stop_reason", serde_json::json!(outcome.stop_reason)),
        (
            "valid_before_finetune",
            serde_json::json!(outcome.before_finetune),
        ),
        (
            "valid_after_finetune",
            serde_json::json!(outcome.after_finetune),
        ),
    ];
    let extra = entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Phase { rounds, extra }
}

/// Which report files [`write_report`] writes.
#[derive(Clone, Debug)]
pub struct ReportFiles {
    /// The name of the JSON results file.
    pub json: &'static str,
    /// Whether to draw `curve.svg` (the validation metric over the rounds) when there are rounds.
    pub plot: bool,
}

impl Default for ReportFiles {
    fn default() -> Self {
        Self {
            json: "results.json",
            plot: true,
        }
    }
}

/// The curve's file name.
pub const CURVE_FILE: &str = "curve.svg";

/// Writes the JSON results, the curve (validation metric against remaining weights, from the
/// dense model through every round; when asked for and there are at least two points) and
/// `report.md` into `dir`. A curve left by an earlier run in `dir` is removed when none is drawn.
pub fn write_report(results: &RunResults, dir: &Path, files: &ReportFiles) -> Result<()> {
    let json = dir.join(files.json);
    relprune_io::write(&json, &results.to_json(&json)?)?;
    let mut points: Vec<(f64, f64)> = vec![(
        100.0,
        results
            .extra
            .get("dense_valid_metric")
            .and_then(|v| v.as_f64())
            .unwrap_or(f64::NAN),
    )];
    points.extend(
        results
            .rounds
            .iter()
            .map(|r| (r.remaining_pct, r.val_metric)),
    );
    points.retain(|p| p.1.is_finite());
    let curve = dir.join(CURVE_FILE);
    let plot = if files.plot && points.len() >= 2 {
        let svg = line_chart_svg(
            &format!(
                "{}: validation {} over pruning rounds",
                results.experiment, results.metric
            ),
            "weights remaining (%)",
            &results.metric,
            &[Series {
                label: "validation, after each pruning round".into(),
                points,
            }],
            true,
        )?;
        relprune_io::write(&curve, svg.as_bytes())?;
        Some(CURVE_FILE)
    } else {
        if curve.is_file() {
            std::fs::remove_file(&curve).map_err(|e| {
                crate::Error::Invalid(format!("cannot remove stale {}: {e}", curve.display()))
            })?;
        }
        None
    };
    relprune_io::write(
        &dir.join("report.md"),
        render_markdown(results, plot).as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn phase_report_carries_rounds_and_the_shared_extra_keys() {
        use relprune_prune::{Evaluation, PruneOutcome, StopReason};
        let eval = |loss, metric| Evaluation { loss, metric };
        let outcome = PruneOutcome {
            reference: eval(0.1, 1.0),
            rounds: vec![relprune_prune::RoundRecord {
                round: 1,
                epoch: 3,
                threshold: 0.02,
                remaining_pct: 40.0,
                valid: eval(0.2, 1.5),
                search_evaluations: 4,
                within_budget: true,
                retrained: None,
            }],
            result_round: Some(1),
            epochs: 5,
            stop_reason: StopReason::TargetSparsity,
            before_finetune: eval(0.2, 1.5),
            after_finetune: eval(0.15, 1.2),
            seconds: 9.0,
        };
        let Phase { rounds, extra } = phase_report(&outcome);
        assert_eq!(rounds.len(), 1);
        assert_eq!((rounds[0].epoch, rounds[0].val_metric), (3, 1.5));
        assert_eq!(extra["result_round"], 1);
        assert_eq!(extra["pruning_epochs"], 5);
        assert_eq!(extra["stop_reason"], "target_sparsity");
        assert_eq!(extra["valid_before_finetune"]["metric"], 1.5);
        assert_eq!(extra["valid_after_finetune"]["metric"], 1.2);
        assert_eq!(extra["reference_valid"]["loss"], 0.1);
    }
}
