//! `cargo xtask reproduce`: the registry of experiments and what every run writes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use relprune_eval::RunResults;
use relprune_tasks::ReportFiles;

use crate::flags;

/// An experiment `cargo xtask reproduce NAME` can run.
#[derive(Clone)]
pub struct Experiment {
    /// Its name on the command line and in results.json.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Whether it needs CIFAR-10 (which only the user can provide).
    pub needs_cifar: bool,
    /// Runs experiment `name` into `out` and returns the results.
    pub run: fn(&str, &flags::Reproduce, &Path) -> Result<RunResults>,
}

/// Every experiment, in the order `--list` shows them: each experiment module lists its own.
pub fn experiments() -> Vec<Experiment> {
    [
        crate::classify::experiments(),
        crate::translate::experiments(),
    ]
    .concat()
}

/// A published result to compare with (METHOD.md's anchors).
pub struct Anchor {
    /// The experiment it compares with.
    pub experiment: &'static str,
    /// The method that reached it.
    pub method: &'static str,
    /// Test error, %.
    pub error_pct: f64,
    /// Compression of the weights, ×.
    pub compression: f64,
    /// The paper that introduced the method.
    pub paper: &'static str,
}

/// Where every anchor's figures come from: one table quoted by METHOD.md.
pub const ANCHOR_SOURCE: &str =
    "Molchanov, Ashukha & Vetrov, \"Variational Dropout Sparsifies Deep \
     Neural Networks\", ICML 2017, Table 1 (as quoted by METHOD.md)";

const fn anchor(
    experiment: &'static str,
    method: &'static str,
    error_pct: f64,
    compression: f64,
    paper: &'static str,
) -> Anchor {
    Anchor {
        experiment,
        method,
        error_pct,
        compression,
        paper,
    }
}

const HAN: &str = "Han et al., NeurIPS 2015";
const DNS: &str = "Guo, Yao & Chen, NeurIPS 2016";
const SWS: &str = "Ullrich, Meeds & Welling, ICLR 2017";
const SVD: &str = "Molchanov, Ashukha & Vetrov, ICML 2017";
const VD: &str = "sparse variational dropout";

/// Published results to compare with (METHOD.md's anchors), all from [`ANCHOR_SOURCE`].
pub const ANCHORS: &[Anchor] = &[
    anchor("lenet300-mnist", "dense", 1.64, 1.0, SVD),
    anchor("lenet300-mnist", "Han et al. 2015", 1.59, 12.0, HAN),
    anchor("lenet300-mnist", "DNS", 1.99, 56.0, DNS),
    anchor("lenet300-mnist", "soft weight sharing", 1.94, 23.0, SWS),
    anchor("lenet300-mnist", VD, 1.92, 68.0, SVD),
    anchor("lenet5-mnist", "dense", 0.80, 1.0, SVD),
    anchor("lenet5-mnist", "Han et al. 2015", 0.77, 12.0, HAN),
    anchor("lenet5-mnist", "DNS", 0.91, 111.0, DNS),
    anchor("lenet5-mnist", "soft weight sharing", 0.97, 200.0, SWS),
    anchor("lenet5-mnist", VD, 0.75, 280.0, SVD),
];

/// The command line that started this process, as a user would type it (`cargo xtask ...`),
/// recorded in results.json so every recorded figure names the command that produced it.
pub fn command_line() -> String {
    let args = std::env::args().skip(1).map(|a| {
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a
        }
    });
    std::iter::once("cargo xtask".to_string())
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `--all`: every experiment into `<out>/<name>`, then `<out>/summary.{md,json}`.
fn run_all(f: &flags::Reproduce) -> Result<()> {
    let root = f
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/reproduce"));
    let mut rows: Vec<(&str, std::result::Result<RunResults, String>)> = Vec::new();
    let mut skipped: Vec<(&str, String)> = Vec::new();
    for exp in experiments() {
        let out = root.join(exp.name);
        if exp.needs_cifar && crate::classify::cifar_dir(f).is_none() {
            // CIFAR-10 cannot be embedded or downloaded here: the user's copy or nothing.
            skipped.push((
                exp.name,
                "no CIFAR-10 directory (--cifar-dir DIR or RELPRUNE_CIFAR10_DIR)".into(),
            ));
            continue;
        }
        eprintln!("== {} ({})", exp.name, out.display());
        let r = claim(&out, f)
            .and_then(|_| (exp.run)(exp.name, f, &out))
            .and_then(|r| write_run(r, &out))
            .and_then(|r| {
                if f.record {
                    crate::results::record_and_regenerate(&out)?;
                }
                Ok(r)
            });
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
    for a in ANCHORS {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} |\n",
            a.experiment, a.method, a.error_pct, a.compression
        ));
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
        check_flags(&f)?;
        return run_all(&f);
    }
    let mut f = f;
    if let (None, Some(dir), false) = (&f.experiment, &f.resume, f.list) {
        // The checkpoint knows which experiment it is.
        f.experiment = Some(checkpointed_experiment(dir)?);
    }
    if f.list || f.experiment.is_none() {
        println!("experiments (cargo xtask reproduce NAME [--quick]):");
        for e in experiments() {
            println!("  {:<18} {}", e.name, e.about);
        }
        if f.experiment.is_none() && !f.list {
            bail!("name an experiment");
        }
        return Ok(());
    }
    let name = f.experiment.as_deref().unwrap_or_default();
    let registry = experiments();
    let exp = registry
        .iter()
        .find(|e| e.name == name)
        .with_context(|| format!("unknown experiment `{name}` (see --list)"))?;
    check_flags(&f)?;
    let out = match (&f.resume, &f.out) {
        (Some(dir), _) => dir.clone(),
        (None, Some(out)) => out.clone(),
        (None, None) => PathBuf::from("target/reproduce").join(exp.name),
    };
    claim(&out, &f)?;
    if let Some(dir) = &f.resume {
        // A checkpoint that cannot be read is the experiment's to report, in its own terms.
        if let Ok(saved) = checkpointed_experiment(dir) {
            if saved != exp.name {
                bail!(
                    "--resume {}: that run is `{saved}`, not `{}`",
                    dir.display(),
                    exp.name
                );
            }
        }
    }
    let results = write_run((exp.run)(exp.name, &f, &out)?, &out)?;
    if f.record {
        crate::results::record_and_regenerate(&out)?;
    }
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

/// The experiment of the run checkpointed in `dir` (a `--resume` directory).
fn checkpointed_experiment(dir: &Path) -> Result<String> {
    let checkpoint = dir.join(relprune_tasks::run::CHECKPOINT_DIR);
    let saved: relprune_tasks::run::SavedRun<serde_json::Value> =
        relprune_tasks::run::saved_config(&checkpoint, "reproduction")?;
    saved.config["experiment"]
        .as_str()
        .map(str::to_string)
        .with_context(|| {
            format!(
                "{}: the checkpoint names no experiment",
                checkpoint.display()
            )
        })
}

/// Refuses flag combinations that cannot work, before any directory is touched.
fn check_flags(f: &flags::Reproduce) -> Result<()> {
    let selective = f
        .method
        .is_none_or(|m| m == relprune_tasks::Method::Selective);
    if selective && f.engine.prune_epochs == Some(0) {
        bail!(
            "--prune-epochs 0 leaves the method no epoch to prune in (reproductions have no \
             one-shot final step; use --method one-shot for that)"
        );
    }
    Ok(())
}

/// Takes `out` as the run's directory: new or empty, cleared with `--overwrite`, or the run to
/// continue with `--resume` (whose stale temporary files are swept).
fn claim(out: &Path, f: &flags::Reproduce) -> Result<()> {
    let mode = match (f.resume.is_some(), f.overwrite) {
        (true, _) => relprune_io::RunDir::Resume,
        (false, true) => relprune_io::RunDir::Overwrite,
        (false, false) => relprune_io::RunDir::New,
    };
    Ok(relprune_io::claim_run_dir(out, mode)?)
}

/// Flags that never reach a checkpoint's configuration (where the run goes, how fast it runs).
const NOT_SETTINGS: &[&str] = &[
    "experiment",
    "resume",
    "overwrite",
    "threads",
    "out",
    "record",
];

/// Applies to a resumed run's configuration the flags that are safe to change (a budget or
/// learning rate of a phase that has not started; `--prune-epochs` also while the method's
/// pruning runs, since the budget is checked every epoch) and tells which it applied and which
/// it ignored: the rest of the configuration is the checkpoint's.
pub fn apply_resume_flags<C>(
    f: &flags::Reproduce,
    saved: &relprune_tasks::run::SavedRun<C>,
    selective: bool,
    dense_epochs: &mut usize,
    prune: &mut relprune_prune::PruneConfig,
) -> (Vec<String>, Vec<String>) {
    let e = &f.engine;
    let (mut applied, mut ignored) = (Vec::new(), Vec::new());
    for id in &f.given {
        let flag = format!("--{}", id.replace('_', "-"));
        let done = match id.as_str() {
            "prune_epochs" if selective && !saved.finished("pruning") => {
                e.prune_epochs.map(|n| prune.max_epochs = n)
            }
            "lr" if selective && !saved.started("pruning") => e.lr.map(|lr| prune.lr = lr),
            "finetune_epochs" if !saved.started("fine-tune") => {
                e.finetune_epochs.map(|n| prune.finetune_epochs = n)
            }
            "finetune_lr" if !saved.started("fine-tune") => {
                e.finetune_lr.map(|lr| prune.finetune_lr = lr)
            }
            "dense_epochs" if !saved.started("dense") => f.dense_epochs.map(|n| *dense_epochs = n),
            id if NOT_SETTINGS.contains(&id) => continue,
            _ => None,
        };
        match done {
            Some(()) => applied.push(flag),
            None => ignored.push(flag),
        }
    }
    if !applied.is_empty() {
        eprintln!("resume: applying {}", applied.join(", "));
    }
    if !ignored.is_empty() {
        eprintln!(
            "resume: ignoring {} (the checkpoint's configuration holds; only budgets and learning              rates of phases not yet started can change)",
            ignored.join(", ")
        );
    }
    (applied, ignored)
}

/// Applies the engine flags every experiment shares ([`relprune_tasks::EngineArgs`] and
/// `--stop-at-sparsity`) to `prune`.
pub fn apply_prune_flags(
    f: &flags::Reproduce,
    prune: &mut relprune_prune::PruneConfig,
) -> Result<()> {
    f.engine.apply(prune)?;
    if let Some(s) = f.stop_at_sparsity {
        prune.target_sparsity = (s > 0.0).then_some(s);
    }
    Ok(())
}

/// What every experiment's configuration has, for the flags that set it.
pub struct Common<'a> {
    /// Seed of initialization, split and shuffling.
    pub seed: &'a mut u64,
    /// Dense epochs.
    pub dense_epochs: &'a mut usize,
    /// Training examples used.
    pub train_limit: &'a mut Option<usize>,
    /// The pruning configuration.
    pub prune: &'a mut relprune_prune::PruneConfig,
}

/// Applies `--seed`, `--dense-epochs`, `--train-limit` and the engine flags.
pub fn apply_common_flags(f: &flags::Reproduce, c: Common<'_>) -> Result<()> {
    if let Some(s) = f.seed {
        *c.seed = s;
    }
    if let Some(e) = f.dense_epochs {
        *c.dense_epochs = e;
    }
    if let Some(n) = f.train_limit {
        *c.train_limit = Some(n);
    }
    apply_prune_flags(f, c.prune)
}

/// Writes a finished run's outputs, recording in results.json the command that produced it.
fn write_run(mut r: RunResults, out: &Path) -> Result<RunResults> {
    r.extra.insert("command".into(), command_line().into());
    write_outputs(&r, out)?;
    Ok(r)
}

/// Writes results.json, the metric-vs-sparsity plot and report.md into `out`.
pub fn write_outputs(results: &RunResults, out: &Path) -> Result<()> {
    Ok(relprune_tasks::write_report(
        results,
        out,
        &ReportFiles::default(),
    )?)
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
        // An unknown value is a clap error listing the valid ones, before any work.
        let argv = [
            "cargo xtask",
            "reproduce",
            "lenet5-mnist",
            "--restore",
            "best",
        ];
        let err = Xtask::try_parse_from(argv).unwrap_err().to_string();
        assert!(
            err.contains("best") && err.contains("last-improvement, lowest-loss, current"),
            "{err}"
        );
    }

    #[test]
    fn numbers_that_cannot_work_are_refused_before_any_work() {
        // Each was once accepted, and refused (or not) only after the dense phase.
        for flag in [
            "--twt=NaN",
            "--lambda=NaN",
            "--tau=-1",
            "--ema-beta=2",
            "--sparsity=1.5",
            "--stop-at-sparsity=1.5",
            "--finetune-lr=NaN",
            "--threads=0",
            "--dense-epochs=0",
        ] {
            let argv = ["cargo xtask", "reproduce", "lenet5-mnist", flag];
            let err = Xtask::try_parse_from(argv).unwrap_err().to_string();
            let name = flag.split('=').next().unwrap();
            assert!(err.contains(name), "{flag}: {err}");
        }
    }

    #[test]
    fn judge_retrained_is_off_unless_asked_for() {
        assert!(!prune_config(&[]).judge_retrained);
        assert!(prune_config(&["--judge-retrained"]).judge_retrained);
    }

    #[test]
    fn resume_applies_budgets_and_rates_of_phases_not_started_and_names_the_rest_as_ignored() {
        let argv = [
            "cargo xtask",
            "reproduce",
            "lenet5-mnist",
            "--resume",
            "d",
            "--prune-epochs=40",
            "--lr=0.2",
            "--finetune-lr=0.02",
            "--twt=0.1",
            "--seed=3",
            "--threads=1",
        ];
        let Cmd::Reproduce(f) = crate::flags::parse_from(argv).unwrap().cmd else {
            unreachable!("parsed a reproduce command")
        };
        let saved = relprune_tasks::run::SavedRun {
            config: (),
            epochs: 12,
            completed: vec!["dense".to_string()],
            current: Some("pruning".to_string()),
        };
        let mut prune = relprune_prune::PruneConfig::default();
        let before = prune.clone();
        let mut dense = 5;
        let (applied, mut ignored) = apply_resume_flags(&f, &saved, true, &mut dense, &mut prune);
        ignored.sort();
        assert_eq!(applied.len(), 2, "{applied:?}");
        assert!(applied.contains(&"--prune-epochs".to_string()));
        assert!(applied.contains(&"--finetune-lr".to_string()));
        assert_eq!(ignored, ["--lr", "--seed", "--twt"]);
        assert_eq!((prune.max_epochs, prune.finetune_lr), (40, 0.02));
        assert_eq!(
            (prune.lr, prune.regularizer),
            (before.lr, before.regularizer)
        );
        assert_eq!(dense, 5);
        // Once pruning finished, its budget is history too.
        let finished = relprune_tasks::run::SavedRun {
            completed: vec!["dense".into(), "pruning".into()],
            current: Some("fine-tune".into()),
            ..saved
        };
        let (applied, _) = apply_resume_flags(&f, &finished, true, &mut dense, &mut prune);
        assert!(applied.is_empty(), "{applied:?}");
    }
}
