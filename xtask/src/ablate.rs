//! `cargo xtask ablate`: every regularizer variant and every baseline on one epoch budget, as
//! separate `reproduce` runs (one thread each, `--jobs` at a time), summed up in docs/ABLATION.md.
//!
//! Finished runs (a results.json with the same budget) are reused and interrupted ones resumed,
//! so an ablation that was stopped continues where it was.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use relprune_eval::{line_chart_svg, RunResults, Series};

use crate::flags;

/// One row of the ablation: a name, what it is, and the `reproduce` flags that make it.
pub struct Variant {
    /// Its name (directory and row label).
    pub name: &'static str,
    /// What it is, for the table.
    pub about: &'static str,
    /// Extra `reproduce` flags.
    pub args: &'static [&'static str],
}

/// Every variant, the project default first.
pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "selective-max",
        about: "hard gate |g| < τ·max|g|, τ 0.1, L2 (METHOD.md's starting point)",
        args: &["--regularizer", "selective"],
    },
    Variant {
        name: "selective-mean",
        about: "hard gate |g| < τ·mean|g|, τ 1.0, L2",
        args: &[
            "--regularizer",
            "selective",
            "--gate-stat",
            "mean",
            "--tau",
            "1.0",
        ],
    },
    Variant {
        name: "selective-median",
        about: "hard gate |g| < median|g|, L2",
        args: &[
            "--regularizer",
            "selective",
            "--gate-stat",
            "q0.5",
            "--tau",
            "1.0",
        ],
    },
    Variant {
        name: "taylor",
        about: "hard gate on |w·g| < τ·max, τ 0.1, L2",
        args: &["--regularizer", "taylor"],
    },
    Variant {
        name: "ema",
        about: "hard gate on EMA-smoothed |g| (β 0.9), τ 0.1, L2",
        args: &["--regularizer", "selective", "--ema-beta", "0.9"],
    },
    Variant {
        name: "selective-l1",
        about: "hard gate |g| < τ·max|g|, L1 pull λ 5e-6",
        args: &[
            "--regularizer",
            "selective",
            "--penalty",
            "l1",
            "--lambda",
            "5e-6",
        ],
    },
    Variant {
        name: "lobster",
        about: "LOBSTER soft gate max(0, 1−|g|), L2 (the default)",
        args: &["--regularizer", "lobster"],
    },
    Variant {
        name: "sensitivity",
        about: "output sensitivity soft gate max(0, 1−S) (Tartaglione et al. 2018), L2",
        args: &["--regularizer", "sensitivity"],
    },
    Variant {
        name: "weight-decay",
        about: "classical L2 on every weight (no gate)",
        args: &["--regularizer", "l2"],
    },
    Variant {
        name: "l1",
        about: "classical L1 on every weight, λ 5e-6 (no gate)",
        args: &["--regularizer", "l1", "--lambda", "5e-6"],
    },
    Variant {
        name: "one-shot",
        about: "baseline: magnitude pruning to 98% at once, then retrain",
        args: &["--method", "one-shot"],
    },
    Variant {
        name: "gmp",
        about: "baseline: gradual magnitude pruning to 98%, cubic schedule (Zhu & Gupta)",
        args: &["--method", "gmp"],
    },
    Variant {
        name: "han",
        about: "baseline: 5 rounds of prune |w| < 0.5·std and retrain (Han et al.)",
        args: &["--method", "han"],
    },
    Variant {
        name: "snip",
        about: "baseline: SNIP to 98% at initialization, then train",
        args: &["--method", "snip"],
    },
];

pub fn run(f: flags::Ablate) -> Result<()> {
    if f.list {
        for v in VARIANTS {
            println!("  {:<18} {}", v.name, v.about);
        }
        return Ok(());
    }
    if f.experiment != "lenet300-mnist" {
        bail!("only lenet300-mnist has an ablation so far");
    }
    for name in &f.only {
        if !VARIANTS.iter().any(|v| v.name == name) {
            bail!("unknown variant `{name}` (see --list)");
        }
    }
    let chosen: Vec<&Variant> = VARIANTS
        .iter()
        .filter(|v| f.only.is_empty() || f.only.iter().any(|o| o == v.name))
        .collect();
    if !f.report_only {
        let data_dir = f
            .data_dir
            .clone()
            .or_else(|| std::env::var_os("RELPRUNE_DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("../shared/data/mnist"));
        run_variants(&f, &chosen, &data_dir)?;
    }
    write_report(&f, VARIANTS)
}

/// A finished run of `dir` with the asked budget, if there is one.
fn finished(dir: &Path, epochs: usize) -> Option<RunResults> {
    let r = RunResults::read_json(&dir.join("results.json")).ok()?;
    let budget = r.config.pointer("/prune/max_epochs")?.as_u64()? as usize;
    (budget == epochs).then_some(r)
}

fn run_variants(f: &flags::Ablate, chosen: &[&Variant], data_dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let mut todo: Vec<&Variant> = chosen
        .iter()
        .copied()
        .filter(|v| finished(&f.out.join(v.name), f.epochs).is_none())
        .collect();
    let bar = ProgressBar::new(chosen.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("ablate [{bar:30}] {pos}/{len} runs {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position((chosen.len() - todo.len()) as u64);
    let mut running: Vec<(&Variant, Child, Instant)> = Vec::new();
    todo.reverse();
    while !todo.is_empty() || !running.is_empty() {
        while running.len() < f.jobs.max(1) {
            let Some(v) = todo.pop() else { break };
            let dir = f.out.join(v.name);
            // Beside the run directory, not in it: `--overwrite` clears the run directory.
            let log_path = f.out.join(format!("{}.log", v.name));
            std::fs::create_dir_all(&f.out)
                .with_context(|| format!("cannot create {}", f.out.display()))?;
            let mut cmd = Command::new(&exe);
            cmd.env("RAYON_NUM_THREADS", "1").arg("reproduce");
            if dir
                .join("checkpoint")
                .join("checkpoint.safetensors")
                .exists()
            {
                cmd.arg("lenet300-mnist").arg("--resume").arg(&dir);
            } else {
                // A run that never checkpointed starts over.
                cmd.arg("lenet300-mnist")
                    .arg("--overwrite")
                    .arg("--data-dir")
                    .arg(data_dir)
                    .arg("--out")
                    .arg(&dir)
                    .arg("--prune-epochs")
                    .arg(f.epochs.to_string())
                    // The variants are compared at METHOD.md's round tolerance and stall rule,
                    // as measured for docs/ABLATION.md; the reproductions' defaults were tuned
                    // afterwards on the chosen gate.
                    .args(["--twt", "0.05", "--min-round-gain", "0.001"])
                    .args(v.args);
            }
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("cannot write {}", log_path.display()))?;
            let child = cmd
                .stdout(log.try_clone()?)
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start the run of {}", v.name))?;
            say(
                &bar,
                format!("started {} (log: {})", v.name, log_path.display()),
            );
            running.push((v, child, Instant::now()));
        }
        let names: Vec<&str> = running.iter().map(|r| r.0.name).collect();
        bar.set_message(format!("running: {}", names.join(", ")));
        std::thread::sleep(Duration::from_millis(500));
        let mut i = 0;
        while i < running.len() {
            if let Some(status) = running[i].1.try_wait()? {
                let (v, _, t0) = running.remove(i);
                if !status.success() {
                    bar.abandon();
                    bail!(
                        "the run of {} failed ({status}); see {}",
                        v.name,
                        f.out.join(format!("{}.log", v.name)).display()
                    );
                }
                say(
                    &bar,
                    format!("finished {} in {:.0}s", v.name, t0.elapsed().as_secs_f64()),
                );
                bar.inc(1);
            } else {
                i += 1;
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// A line above the bar, or on stderr when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn kib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1024.0)
}

/// Validation errors above this (%) are left out of the plot.
const MAX_PLOTTED_ERROR: f64 = 6.0;

/// Writes the table and the plot of every finished variant.
fn write_report(f: &flags::Ablate, variants: &[Variant]) -> Result<()> {
    let mut rows = Vec::new();
    let mut series = Vec::new();
    for v in variants {
        if let Some(r) = finished(&f.out.join(v.name), f.epochs) {
            let mut points = vec![(
                100.0,
                r.extra
                    .get("dense_valid_metric")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(f64::NAN),
            )];
            points.extend(r.rounds.iter().map(|x| (x.remaining_pct, x.val_metric)));
            // A baseline right after pruning, before retraining, sits at 50-90% error and would
            // flatten every other curve.
            points.retain(|p| p.1 <= MAX_PLOTTED_ERROR);
            series.push(Series {
                label: v.name.to_string(),
                points,
            });
            rows.push((v, r));
        }
    }
    if rows.is_empty() {
        bail!("no finished run in {} to report", f.out.display());
    }
    let report_dir = f.report.parent().unwrap_or(Path::new("."));
    let plot_name = "ablation.svg";
    let svg = line_chart_svg(
        "LeNet-300-100 on MNIST: validation error over the pruning rounds",
        "weights remaining (%)",
        "validation top-1 error (%)",
        &series,
        true,
    )?;
    relprune_io::write(&report_dir.join(plot_name), svg.as_bytes())?;
    let dense = &rows[0].1;
    let mut md = String::new();
    md.push_str(&format!(
        "Generated by `cargo xtask ablate lenet300-mnist --epochs {}` (full MNIST: {} train, {} \
         validation, {} test). Every row starts from the same dense model (test error {:.2}%), \
         gets the same budget of {} pruning-phase epochs plus the same {}-epoch fine-tune, and \
         is judged on its saved model file. Wall times are single-threaded runs, {} at a time on \
         a 2-core machine, so they compare only roughly.\n\n",
        f.epochs,
        dense.dataset.train,
        dense.dataset.valid,
        dense.dataset.test,
        dense.dense.value,
        f.epochs,
        dense
            .config
            .pointer("/prune/finetune_epochs")
            .and_then(|x| x.as_u64())
            .unwrap_or(0),
        f.jobs
    ));
    md.push_str(
        "| variant | what | test error % | remaining % | compression × | gzip KiB | bzip2 KiB | wall s |\n",
    );
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    for (v, r) in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.1} | {} | {} | {:.0} |\n",
            v.name,
            v.about.replace('|', "\\|"),
            r.pruned.value,
            r.pruned.remaining_pct,
            r.pruned.compression,
            kib(r.sizes_bytes.pruned_gzip),
            kib(r.sizes_bytes.pruned_bzip2),
            r.wall_seconds
        ));
    }
    md.push_str(&format!(
        "\nDense model files: {} KiB safetensors.\n\n![validation error against weights remaining \
         over the pruning rounds]({plot_name})\n\n(Points above {MAX_PLOTTED_ERROR}% validation \
         error — the baselines right after pruning, before retraining — are left out of the plot.)\n\n",
        kib(dense.sizes_bytes.dense_safetensors)
    ));
    // The generated part sits between markers; the discussion around it is kept.
    let (start, end) = ("<!-- ablate:start -->\n", "<!-- ablate:end -->\n");
    let block = format!("{start}{md}{end}");
    let text = match std::fs::read_to_string(&f.report) {
        Ok(old) => match (old.find(start), old.find(end)) {
            (Some(a), Some(b)) if a < b => {
                format!("{}{block}{}", &old[..a], &old[b + end.len()..])
            }
            _ => format!("{block}\n{old}"),
        },
        Err(_) => block,
    };
    relprune_io::write(&f.report, text.as_bytes())?;
    println!(
        "wrote {} and {}",
        f.report.display(),
        report_dir.join(plot_name).display()
    );
    Ok(())
}
