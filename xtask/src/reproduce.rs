//! `cargo xtask reproduce`: the registry of experiments and what every run writes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use relprune_eval::{compressed_sizes, line_chart_svg, render_markdown, RunResults, Series};

use crate::flags;
use relprune_core::SelectiveDecay;

/// An experiment `cargo xtask reproduce NAME` can run.
pub struct Experiment {
    /// Its name on the command line and in results.json.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Runs experiment `name` into `out` and returns the results.
    pub run: fn(&str, &flags::Reproduce, &Path) -> Result<RunResults>,
}

/// Every experiment, in the order `--list` shows them.
pub const EXPERIMENTS: &[Experiment] = &[
    Experiment {
        name: crate::classify::EXPERIMENTS[0].0,
        about: crate::classify::EXPERIMENTS[0].3,
        run: crate::classify::run,
    },
    Experiment {
        name: crate::classify::EXPERIMENTS[1].0,
        about: crate::classify::EXPERIMENTS[1].3,
        run: crate::classify::run,
    },
    Experiment {
        name: crate::classify::EXPERIMENTS[2].0,
        about: crate::classify::EXPERIMENTS[2].3,
        run: crate::classify::run,
    },
    Experiment {
        name: crate::classify::EXPERIMENTS[3].0,
        about: crate::classify::EXPERIMENTS[3].3,
        run: crate::classify::run,
    },
    Experiment {
        name: crate::classify::EXPERIMENTS[4].0,
        about: crate::classify::EXPERIMENTS[4].3,
        run: crate::classify::run,
    },
    Experiment {
        name: crate::translate::NAME,
        about: crate::translate::ABOUT,
        run: crate::translate::run,
    },
];

/// Published results to compare with (METHOD.md's anchors): (experiment, method, error %, ×).
pub const ANCHORS: &[(&str, &str, f64, f64)] = &[
    ("lenet300-mnist", "dense", 1.64, 1.0),
    ("lenet300-mnist", "Han et al. 2015", 1.59, 12.0),
    ("lenet300-mnist", "DNS", 1.99, 56.0),
    ("lenet300-mnist", "soft weight sharing", 1.94, 23.0),
    ("lenet300-mnist", "sparse variational dropout", 1.92, 68.0),
    ("lenet5-mnist", "dense", 0.80, 1.0),
    ("lenet5-mnist", "Han et al. 2015", 0.77, 12.0),
    ("lenet5-mnist", "DNS", 0.91, 111.0),
    ("lenet5-mnist", "soft weight sharing", 0.97, 200.0),
    ("lenet5-mnist", "sparse variational dropout", 0.75, 280.0),
];

/// `--all`: every experiment into `<out>/<name>`, then `<out>/summary.{md,json}`.
fn run_all(f: &flags::Reproduce) -> Result<()> {
    let root = f
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/reproduce"));
    let mut rows: Vec<(&str, std::result::Result<RunResults, String>)> = Vec::new();
    let mut skipped: Vec<(&str, String)> = Vec::new();
    for exp in EXPERIMENTS {
        let out = root.join(exp.name);
        if crate::classify::needs_cifar(exp.name) && crate::classify::cifar_dir(f).is_none() {
            // CIFAR-10 cannot be embedded or downloaded here: the user's copy or nothing.
            skipped.push((
                exp.name,
                "no CIFAR-10 directory (--cifar-dir DIR or RELPRUNE_CIFAR10_DIR)".into(),
            ));
            continue;
        }
        eprintln!("== {} ({})", exp.name, out.display());
        let r = std::fs::create_dir_all(&out)
            .map_err(anyhow::Error::from)
            .and_then(|_| (exp.run)(exp.name, f, &out))
            .and_then(|r| write_outputs(&r, &out).map(|_| r));
        if let Err(e) = &r {
            eprintln!("{}: failed: {e:#}", exp.name);
        }
        rows.push((exp.name, r.map_err(|e| format!("{e:#}"))));
    }
    let mut md = format!(
        "# Reproduction summary ({})\n\n| experiment | metric | dense | pruned | remaining % | compression × | wall s |\n|---|---|---:|---:|---:|---:|---:|\n",
        if f.quick { "quick configurations" } else { "full configurations" }
    );
    let mut json = Vec::new();
    for (name, r) in &rows {
        match r {
            Ok(r) => {
                md.push_str(&format!(
                    "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} |\n",
                    r.metric,
                    r.dense.value,
                    r.pruned.value,
                    r.pruned.remaining_pct,
                    r.pruned.compression,
                    r.wall_seconds
                ));
                json.push(serde_json::json!({"experiment": name, "results": r}));
            }
            Err(e) => {
                md.push_str(&format!(
                    "| {name} | failed: {} | | | | | |\n",
                    e.replace('|', "/")
                ));
                json.push(serde_json::json!({"experiment": name, "error": e}));
            }
        }
    }
    for (name, why) in &skipped {
        md.push_str(&format!("| {name} | skipped: {why} | | | | | |\n"));
        json.push(serde_json::json!({"experiment": name, "skipped": why}));
    }
    md.push_str("\nPublished (METHOD.md's anchors, test error % at compression ×):\n\n| experiment | method | error % | compression × |\n|---|---|---:|---:|\n");
    for (e, m, err, x) in ANCHORS {
        md.push_str(&format!("| {e} | {m} | {err:.2} | {x:.0} |\n"));
    }
    std::fs::create_dir_all(&root)?;
    relprune_io::write(&root.join("summary.md"), md.as_bytes())?;
    relprune_io::write(
        &root.join("summary.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    println!("{md}");
    let failed: Vec<&str> = rows.iter().filter(|r| r.1.is_err()).map(|r| r.0).collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

pub fn run(f: flags::Reproduce) -> Result<()> {
    if f.all {
        if f.experiment.is_some() || f.resume.is_some() {
            bail!("--all runs every experiment: give no name and no --resume");
        }
        return run_all(&f);
    }
    if f.list || f.experiment.is_none() {
        println!("experiments (cargo xtask reproduce NAME [--quick]):");
        for e in EXPERIMENTS {
            println!("  {:<18} {}", e.name, e.about);
        }
        if f.experiment.is_none() && !f.list {
            bail!("name an experiment");
        }
        return Ok(());
    }
    let name = f.experiment.as_deref().unwrap_or_default();
    let exp = EXPERIMENTS
        .iter()
        .find(|e| e.name == name)
        .with_context(|| format!("unknown experiment `{name}` (see --list)"))?;
    let out = match (&f.resume, &f.out) {
        (Some(dir), _) => dir.clone(),
        (None, Some(out)) => out.clone(),
        (None, None) => PathBuf::from("target/reproduce").join(exp.name),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let results = (exp.run)(exp.name, &f, &out)?;
    write_outputs(&results, &out)?;
    println!(
        "{}: {} {:.3} dense -> {:.3} pruned, {:.2}% of weights left ({:.1}x), {:.0}s; see {}",
        results.experiment,
        results.metric,
        results.dense.value,
        results.pruned.value,
        results.pruned.remaining_pct,
        results.pruned.compression,
        results.wall_seconds,
        out.join("report.md").display()
    );
    Ok(())
}

/// Applies the engine flags every experiment shares (`--prune-epochs`, `--delta`,
/// `--min-round-gain`, `--finetune-epochs`, `--finetune-lr`, `--twt`, `--search-metric`,
/// The checkpoint directory inside a run's output directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// The configuration stored in the checkpoint of the run in `dir` (for `--resume`), with the
/// number of epochs it has trained.
pub fn saved_config<C: serde::de::DeserializeOwned>(dir: &Path, what: &str) -> Result<(C, usize)> {
    let saved =
        relprune_prune::checkpoint::read(&dir.join(CHECKPOINT_DIR), &candle_core::Device::Cpu)?;
    let cfg = serde_json::from_value(saved.journal.run["config"].clone()).with_context(|| {
        format!(
            "{}: the checkpoint holds no {what} configuration",
            dir.display()
        )
    })?;
    Ok((cfg, saved.journal.epochs_trained))
}

/// Starts checkpointing into `out/checkpoint` (storing `config`), or with `resume` continues the
/// run checkpointed there; then trains the dense phase (cosine decay from `lr`), which a resumed
/// run skips as far as it got.
pub fn start_dense<T: relprune_prune::Task + ?Sized>(
    trainer: &mut relprune_prune::Trainer,
    task: &mut T,
    out: &Path,
    config: &impl serde::Serialize,
    resume: bool,
    (lr, epochs): (f64, usize),
) -> Result<()> {
    let checkpoints = out.join(CHECKPOINT_DIR);
    if resume {
        trainer.resume(&checkpoints, task)?;
    } else {
        trainer.checkpoint_into(&checkpoints, serde_json::json!({ "config": config }))?;
    }
    let schedule = relprune_prune::LrSchedule::Cosine { lr, epochs };
    trainer.fit(task, schedule, epochs, false, "dense")?;
    Ok(())
}

/// Applies the engine flags every experiment shares (epoch budgets, δ, stop rules, the threshold
/// search, the restore point, the regularizer and its gate) to `prune`.
pub fn apply_prune_flags(
    f: &flags::Reproduce,
    prune: &mut relprune_prune::PruneConfig,
) -> Result<()> {
    if let Some(e) = f.prune_epochs {
        prune.max_epochs = e;
    }
    if let Some(d) = f.delta {
        prune.delta = d;
    }
    if let Some(g) = f.min_round_gain {
        prune.min_round_gain = g;
    }
    if let Some(s) = f.stop_at_sparsity {
        prune.target_sparsity = (s > 0.0).then_some(s);
    }
    if let Some(e) = f.finetune_epochs {
        prune.finetune_epochs = e;
    }
    if let Some(lr) = f.finetune_lr {
        prune.finetune_lr = lr;
    }
    if let Some(t) = f.twt {
        prune.bisection.twt = t;
    }
    if let Some(tolerance) = f.search_metric {
        prune.bisection.criterion = relprune_prune::threshold::Criterion::Metric { tolerance };
    }
    if let Some(m) = f.metric_bound {
        prune.bisection.max_metric_worsening = Some(m);
    }
    if f.judge_retrained {
        prune.judge_retrained = true;
    }
    if let Some(r) = &f.restore {
        prune.restore = match r.as_str() {
            "last-improvement" => relprune_prune::RestorePoint::LastImprovement,
            "lowest-loss" => relprune_prune::RestorePoint::LowestLoss,
            "current" => relprune_prune::RestorePoint::Current,
            other => bail!("--restore {other}: expected last-improvement, lowest-loss or current"),
        };
    }
    if f.per_layer {
        prune.bisection.scope = relprune_prune::threshold::Scope::PerLayer;
    }
    if let Some(name) = &f.regularizer {
        let lambda = prune.regularizer.lambda;
        prune.regularizer = match name.as_str() {
            "taylor" => SelectiveDecay {
                relevance: relprune_core::Relevance::Taylor,
                ..SelectiveDecay::default().with_lambda(lambda)
            },
            "lobster" => SelectiveDecay::lobster(lambda),
            "sensitivity" => SelectiveDecay::output_sensitivity(lambda),
            "l2" => SelectiveDecay::l2(lambda),
            "l1" => SelectiveDecay::l1(lambda),
            _ => SelectiveDecay::default().with_lambda(lambda),
        };
    }
    if let Some(stat) = &f.gate_stat {
        let parsed = match stat.as_str() {
            "max" => relprune_core::GateStat::Max,
            "mean" => relprune_core::GateStat::Mean,
            q => match q.strip_prefix('q').and_then(|v| v.parse::<f64>().ok()) {
                Some(v) => relprune_core::GateStat::Quantile(v),
                None => anyhow::bail!("--gate-stat: max, mean or qQ (e.g. q0.5), got `{q}`"),
            },
        };
        match &mut prune.regularizer.gate {
            relprune_core::Gate::Hard { stat, .. } => *stat = parsed,
            _ => anyhow::bail!("--gate-stat needs a hard gate"),
        }
    }
    if let Some(p) = &f.penalty {
        prune.regularizer.penalty = match p.as_str() {
            "l1" => relprune_core::Penalty::L1,
            _ => relprune_core::Penalty::L2,
        };
    }
    if let Some(b) = f.ema_beta {
        prune.regularizer.ema_beta = b;
    }
    if let Some(l) = f.lambda {
        prune.regularizer.lambda = l;
    }
    if let Some(t) = f.tau {
        if let relprune_core::Gate::Hard { tau, .. } = &mut prune.regularizer.gate {
            *tau = t;
        } else {
            anyhow::bail!("--tau needs a hard gate");
        }
    }
    Ok(())
}

/// Fills in the model-file sizes of `results` from the files in `out`.
pub fn measure_sizes(
    results: &mut RunResults,
    out: &Path,
    dense_file: &str,
    sparse_file: &str,
) -> Result<()> {
    let dense = compressed_sizes(&out.join(dense_file))?;
    let pruned = compressed_sizes(&out.join(&results.model_file))?;
    let sparse = compressed_sizes(&out.join(sparse_file))?;
    results.sizes_bytes.dense_safetensors = dense.raw;
    results.sizes_bytes.pruned_safetensors = pruned.raw;
    results.sizes_bytes.pruned_gzip = pruned.gzip9;
    results.sizes_bytes.pruned_bzip2 = pruned.bzip2_9;
    results.sizes_bytes.sparse_format = sparse.raw;
    results
        .extra
        .insert("dense_gzip".into(), dense.gzip9.into());
    results
        .extra
        .insert("dense_bzip2".into(), dense.bzip2_9.into());
    results
        .extra
        .insert("sparse_format_gzip".into(), sparse.gzip9.into());
    Ok(())
}

/// Writes results.json, the metric-vs-sparsity plot and report.md into `out`.
pub fn write_outputs(results: &RunResults, out: &Path) -> Result<()> {
    results.write_json(&out.join("results.json"))?;
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
    let plot = if points.len() >= 2 {
        line_chart_svg(
            &out.join("curve.svg"),
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
        Some("curve.svg")
    } else {
        None
    };
    relprune_io::write(
        &out.join("report.md"),
        render_markdown(results, plot).as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::flags::{Cmd, Xtask};

    fn prune_config(args: &[&str]) -> relprune_prune::PruneConfig {
        let mut argv = vec!["cargo xtask", "reproduce", "lenet5-mnist"];
        argv.extend_from_slice(args);
        let Cmd::Reproduce(f) = Xtask::parse_from(argv).cmd else {
            unreachable!("parsed a reproduce command")
        };
        let mut prune = relprune_prune::PruneConfig {
            target_sparsity: Some(0.5),
            ..Default::default()
        };
        apply_prune_flags(&f, &mut prune).unwrap();
        prune
    }

    #[test]
    fn stop_at_sparsity_sets_and_zero_clears_the_target() {
        assert_eq!(
            prune_config(&["--stop-at-sparsity", "0.985"]).target_sparsity,
            Some(0.985)
        );
        assert_eq!(
            prune_config(&["--stop-at-sparsity", "0"]).target_sparsity,
            None
        );
        assert_eq!(prune_config(&[]).target_sparsity, Some(0.5));
    }

    #[test]
    fn restore_and_regularizer_flags_reach_every_experiment_config() {
        let p = prune_config(&[
            "--restore",
            "current",
            "--gate-stat",
            "q0.5",
            "--lambda",
            "2e-3",
        ]);
        assert_eq!(p.restore, relprune_prune::RestorePoint::Current);
        assert_eq!(p.regularizer.lambda, 2e-3);
        assert!(matches!(
            p.regularizer.gate,
            relprune_core::Gate::Hard {
                stat: relprune_core::GateStat::Quantile(q),
                ..
            } if q == 0.5
        ));
        let argv = [
            "cargo xtask",
            "reproduce",
            "lenet5-mnist",
            "--restore",
            "best",
        ];
        let Cmd::Reproduce(f) = Xtask::parse_from(argv).cmd else {
            unreachable!("parsed a reproduce command")
        };
        let err = apply_prune_flags(&f, &mut Default::default()).unwrap_err();
        assert!(err.to_string().contains("--restore best"), "{err}");
    }

    #[test]
    fn judge_retrained_is_off_unless_asked_for() {
        assert!(!prune_config(&[]).judge_retrained);
        assert!(prune_config(&["--judge-retrained"]).judge_retrained);
    }
}
