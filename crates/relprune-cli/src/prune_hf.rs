//! `relprune prune-hf`: the flags of [`relprune_hf::Options`] plus where the run goes, over
//! [`relprune_hf::run`]; prints the summary line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use relprune_hf::memory::Memory;
use relprune_hf::{Config, RunOptions, INTERRUPT_ENV};
use relprune_tasks::run::LINEAR_GROUP;

/// Arguments of `relprune prune-hf`.
#[derive(Debug, Args)]
pub struct PruneHfArgs {
    /// What to prune and how.
    #[command(flatten)]
    pub options: relprune_hf::Options,
    /// The output directory (must not exist; written atomically).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The checkpoint directory (default: `OUT.relprune-work`, beside the output; removed after
    /// a successful run unless --keep-work).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Continue the run checkpointed in this work directory (its configuration is used; other
    /// settings given are named as ignored).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Keep the work directory after a successful run.
    #[arg(long)]
    pub keep_work: bool,
    /// No progress bars or log lines.
    #[arg(long)]
    pub quiet: bool,
    /// Freed buffers: `lean` gives them back to the system (the lowest peak memory, ~1.3x
    /// the time), `adaptive` reuses them (default: lean for decoder LMs, adaptive otherwise).
    #[arg(long, value_enum)]
    pub memory: Option<Memory>,
    /// The flags the command line gave (argument ids), for `--resume` to name those it ignores.
    #[arg(skip)]
    pub given: Vec<String>,
}

/// Flags that do not describe the run, so a resume does not ignore them.
const NOT_SETTINGS: &[&str] = &["resume", "out", "work", "keep_work", "quiet", "memory"];

/// Says which of the given flags a resume ignores: a resumed prune-hf continues with the
/// configuration in its checkpoint, every setting included.
fn say_ignored(args: &PruneHfArgs) {
    let ignored: Vec<String> = args
        .given
        .iter()
        .filter(|id| !NOT_SETTINGS.contains(&id.as_str()))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    // A warning, not a log line: printed even with --quiet.
    if !ignored.is_empty() {
        eprintln!(
            "resume: ignoring {} (a resumed prune-hf continues with its checkpoint's \
             configuration)",
            ignored.join(", ")
        );
    }
}

/// Runs `relprune prune-hf`.
pub fn run(args: &PruneHfArgs) -> Result<()> {
    let interrupt_after = match std::env::var(INTERRUPT_ENV) {
        Ok(v) => Some(
            v.parse::<usize>()
                .with_context(|| format!("{INTERRUPT_ENV}={v} is not a number"))?,
        ),
        Err(_) => None,
    };
    if args.resume.is_some() {
        say_ignored(args);
    }
    let causal = match &args.resume {
        Some(dir) => relprune_hf::causal::resume_config(dir)
            .with_context(|| format!("cannot resume from {}", dir.display()))?,
        None if relprune_hf::causal::applies(&args.options)? => {
            Some(relprune_hf::causal::CausalConfig::new(&args.options)?)
        }
        None => None,
    };
    let memory = args.memory.unwrap_or(Memory::default_for(causal.is_some()));
    memory.apply();
    if let Some(cfg) = causal {
        return run_causal(args, cfg, interrupt_after);
    }
    let mut opts = RunOptions {
        quiet: args.quiet,
        keep_work: args.keep_work,
        interrupt_after,
        ..RunOptions::new(&args.out)
    };
    let cfg = match &args.resume {
        Some(dir) => {
            let (cfg, epochs) = relprune_hf::resume_config(dir)
                .with_context(|| format!("cannot resume from {}", dir.display()))?;
            if !args.quiet {
                eprintln!(
                    "resuming {} in {} after {epochs} epochs",
                    cfg.model_arg,
                    dir.display()
                );
            }
            opts.work = dir.clone();
            opts.resume = true;
            cfg
        }
        None => {
            if let Some(w) = &args.work {
                opts.work = w.clone();
            }
            Config::new(&args.options)?
        }
    };
    let results = relprune_hf::run(cfg, &opts)?;
    let linear = results
        .layer_groups
        .iter()
        .find(|g| g.name == LINEAR_GROUP)
        .map_or(f64::NAN, |g| g.sparsity_pct());
    let peak = relprune_hf::memory::rss_mb()
        .map(|(_, peak)| format!("; peak RSS {peak:.0} MB"))
        .unwrap_or_default();
    println!(
        "{}: {} {:.4} → {:.4}; prunable weights {:.2}% zero (linear layers {:.2}%); {:.0} s{peak}",
        args.out.display(),
        results.metric,
        results.dense.value,
        results.pruned.value,
        100.0 - results.pruned.remaining_pct,
        linear,
        results.wall_seconds
    );
    Ok(())
}

/// `prune-hf` on a decoder-only LM (`cfg`, checked or resumed): prints the perplexities and
/// the sparsity.
fn run_causal(
    args: &PruneHfArgs,
    cfg: relprune_hf::causal::CausalConfig,
    interrupt_after: Option<usize>,
) -> Result<()> {
    let mut opts = RunOptions {
        quiet: args.quiet,
        keep_work: args.keep_work,
        interrupt_after,
        ..RunOptions::new(&args.out)
    };
    if let Some(dir) = args.resume.as_ref().or(args.work.as_ref()) {
        opts.work = dir.clone();
    }
    opts.resume = args.resume.is_some();
    if opts.resume && !args.quiet {
        eprintln!("resuming {} in {}", cfg.model_arg, opts.work.display());
    }
    let r = relprune_hf::causal::run(cfg, &opts)?;
    for p in &r.perplexity {
        println!(
            "{}: perplexity of {}{} {:.3} → {:.3}; projections {:.2}% zero; {:.0} s{}",
            args.out.display(),
            p.file.display(),
            if p.calibration {
                " (calibration text)"
            } else {
                ""
            },
            p.dense,
            p.pruned,
            100.0 * r.linear_sparsity,
            r.wall_seconds,
            r.peak_rss_mb_pruning
                .map(|m| format!("; peak RSS {m:.0} MB"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
