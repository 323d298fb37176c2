//! `cargo xtask bench`: training-epoch times of relprune against the PyTorch reference, and
//! the inference tasks of [`crate::bench_infer`].
//!
//! Machines here are noisy, so every figure is a ratio measured in the same run: our task and
//! the reference task alternate (A B A B ...) and the median of the per-round ratios is reported.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use relprune_core::SelectiveDecay;
use relprune_data::{DataSource, DatasetKind};
use relprune_prune::{MaskedSgd, Masks, ParamSet, Selection, SgdConfig, Task, Trainer};
use relprune_tasks::ImageClassification;
use serde::Serialize;

use crate::flags;

#[derive(Debug, Serialize)]
struct Row {
    task: String,
    ours_seconds: Vec<f64>,
    torch_seconds: Vec<f64>,
    ratio_vs_torch_median: Option<f64>,
}

/// The tasks, named as in the PyTorch reference.
const TASKS: [&str; 3] = ["lenet300-epoch", "lenet300-swd-epoch", "lenet5-epoch"];

/// One of our training epochs (600 steps of batch 100, SGD lr 0.1): LeNet-300-100 plain or with
/// selective decay + 90% masks, or LeNet-5-Caffe plain.
struct OurEpoch {
    trainer: Trainer,
    task: Box<dyn Task>,
}

impl OurEpoch {
    fn new(data: &relprune_data::ImageSplits, name: &str) -> Result<Self> {
        let device = Device::Cpu;
        let varmap = VarMap::new();
        let swd = name == "lenet300-swd-epoch";
        let d = &data.train;
        let (small_a, small_b) = (d.take_first(100)?, d.take_first(100)?);
        let net = if name == "lenet5-epoch" {
            "lenet5"
        } else {
            "lenet300"
        };
        let model = crate::classify::Net::new(net, &varmap, 0, &device)?;
        let task: Box<dyn Task> = Box::new(ImageClassification::new(
            model,
            d.clone(),
            small_a,
            small_b,
            100,
            0,
        ));
        let params = ParamSet::from_varmap(&varmap, &Selection::default())?;
        let mut masks = Masks::dense(&params)?;
        let reg = if swd {
            // Prune the 90% smallest weights, as the reference task does.
            let mut all: Vec<f32> = Vec::new();
            for p in params.prunable() {
                all.extend(
                    p.var
                        .as_tensor()
                        .abs()?
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?,
                );
            }
            let k = (0.9 * all.len() as f64) as usize;
            let (_, t, _) = all.select_nth_unstable_by(k, f32::total_cmp);
            masks.prune_below(&params, *t as f64)?;
            Some(SelectiveDecay::default())
        } else {
            None
        };
        let sgd = SgdConfig {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
        };
        let mut trainer = Trainer::new(params, masks, MaskedSgd::new(sgd, reg)?)?;
        trainer.quiet = true;
        Ok(Self { trainer, task })
    }

    fn epoch_seconds(&mut self) -> Result<f64> {
        let t = Instant::now();
        self.trainer.train_epoch(self.task.as_mut(), 1, None)?;
        Ok(t.elapsed().as_secs_f64())
    }
}

fn torch_seconds(python: &Path, script: &Path, mnist: &Path, task: &str) -> Result<f64> {
    let threads = crate::bench_steps::threads().to_string();
    let v = run_reference(
        python,
        script,
        &[
            "--mnist".as_ref(),
            mnist.as_os_str(),
            "--task".as_ref(),
            task.as_ref(),
            "--repeat".as_ref(),
            "1".as_ref(),
            "--threads".as_ref(),
            threads.as_ref(),
        ],
        task,
    )?;
    v["seconds"][0]
        .as_f64()
        .with_context(|| format!("{task}: no seconds in the reference output"))
}

/// Runs the PyTorch reference `script` of `task` with `args`; returns the JSON it prints.
pub fn run_reference(
    python: &Path,
    script: &Path,
    args: &[&std::ffi::OsStr],
    task: &str,
) -> Result<serde_json::Value> {
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{task}: the PyTorch reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{task}: unexpected reference output {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The median of `v` (`None` if empty).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    })
}

pub fn run(f: flags::Bench) -> Result<()> {
    for t in &f.tasks {
        let known = [
            &TASKS[..],
            &crate::bench_steps::TASKS[..],
            &crate::bench_infer::TASKS[..],
        ]
        .concat();
        if !known.contains(&t.as_str()) {
            bail!("unknown bench task `{t}` ({})", known.join(", "));
        }
    }
    let selected = |t: &&str| f.tasks.iter().any(|x| x == t);
    let tasks: Vec<&str> = TASKS
        .iter()
        .copied()
        .filter(|t| f.tasks.is_empty() || selected(t))
        .collect();
    let infer_tasks: Vec<&str> = crate::bench_infer::TASKS
        .iter()
        .copied()
        .filter(selected)
        .collect();
    let step_tasks: Vec<&str> = crate::bench_steps::TASKS
        .iter()
        .copied()
        .filter(selected)
        .collect();
    let infer = crate::bench_infer::Setup::new(&f, &infer_tasks)?;
    let rows = train_rows(&f, &tasks)?;
    let (step_rows, step_md) = crate::bench_steps::run(&f, &step_tasks)?;
    let infer_rows = crate::bench_infer::run(&f, &infer_tasks, &infer)?;
    let mut md = String::from("# relprune bench\n");
    if !rows.0.is_empty() {
        md.push_str(&rows.1);
    }
    md.push_str(&step_md);
    if !infer_rows.is_empty() {
        md.push_str(&crate::bench_infer::report(&infer_rows, &f.out)?);
    }
    md.push_str(&format!(
        "\nThreads: RAYON_NUM_THREADS={}, machine cores {}.\n",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "(default)".into()),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&f.out)?;
    let json = serde_json::json!({
        "rows": rows.0,
        "swd_overhead_ratio_median": rows.2,
        "steps": step_rows,
        "inference": infer_rows,
    });
    relprune_io::write(
        &f.out.join("bench.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    relprune_io::write(&f.out.join("bench.md"), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

/// The training tasks' rows, their Markdown table, and the regularizer's overhead.
fn train_rows(f: &flags::Bench, tasks: &[&str]) -> Result<(Vec<Row>, String, Option<f64>)> {
    if tasks.is_empty() {
        return Ok((Vec::new(), String::new(), None));
    }
    let mnist: PathBuf = match f
        .mnist
        .clone()
        .or_else(|| std::env::var_os("RELPRUNE_DATA_DIR").map(PathBuf::from))
    {
        Some(d) => d,
        None => PathBuf::from("../shared/data/mnist"),
    };
    let data = relprune_data::load(DatasetKind::Mnist, &DataSource::Dir(mnist.clone()))
        .with_context(|| {
            format!(
                "the benchmark needs the full MNIST (60k) in {}; pass --mnist DIR",
                mnist.display()
            )
        })?;
    let python = f.torch_venv.as_ref().map(|v| v.join("bin/python"));
    if let Some(p) = &python {
        if !p.exists() {
            bail!(
                "{} does not exist; make it with ../shared/bench/setup_torch.sh DIR",
                p.display()
            );
        }
    }
    let mut runs = Vec::new();
    for t in tasks {
        let mut e = OurEpoch::new(&data, t)?;
        // Warm-up: first-touch allocations and thread pools.
        e.epoch_seconds()?;
        runs.push(e);
    }
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    let mut torch: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    for round in 1..=f.rounds {
        for (i, task) in tasks.iter().enumerate() {
            let s = runs[i].epoch_seconds()?;
            ours[i].push(s);
            let t = match &python {
                Some(py) => Some(torch_seconds(py, &f.torch_script, &mnist, task)?),
                None => None,
            };
            if let Some(t) = t {
                torch[i].push(t);
            }
            eprintln!(
                "round {round}/{}: {task}: ours {s:.3}s{}",
                f.rounds,
                t.map(|t| format!(", torch {t:.3}s, ratio {:.2}", s / t))
                    .unwrap_or_default()
            );
        }
    }
    let mut rows = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        let ratios: Vec<f64> = ours[i].iter().zip(&torch[i]).map(|(a, b)| a / b).collect();
        rows.push(Row {
            task: task.to_string(),
            ours_seconds: ours[i].clone(),
            torch_seconds: torch[i].clone(),
            ratio_vs_torch_median: median(ratios),
        });
    }
    let at = |name: &str| tasks.iter().position(|t| *t == name);
    let overhead = match (at("lenet300-swd-epoch"), at("lenet300-epoch")) {
        (Some(s), Some(p)) => median(ours[s].iter().zip(&ours[p]).map(|(s, p)| s / p).collect()),
        _ => None,
    };

    let mut md = String::from(
        "\n## Training\n\nMedians over interleaved rounds; ratios < 1 mean relprune is faster.\n\n",
    );
    md.push_str("| task | ours median (s) | torch median (s) | ours / torch (median of ratios) |\n|---|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.3} | {} | {} |\n",
            r.task,
            median(r.ours_seconds.clone()).unwrap_or(f64::NAN),
            median(r.torch_seconds.clone()).map_or("-".into(), |t| format!("{t:.3}")),
            r.ratio_vs_torch_median
                .map_or("-".into(), |x| format!("{x:.2}"))
        ));
    }
    if let Some(o) = overhead {
        md.push_str(&format!(
            "\nRegularizer + masks overhead over a plain SGD epoch (ours, median of per-round ratios): {:.1}%\n",
            (o - 1.0) * 100.0
        ));
    }
    Ok((rows, md, overhead))
}
