//! Step-level training benchmarks of the workloads that take hours, against PyTorch doing the
//! same work on the same batches (`xtask/bench/torch_train_steps.py`), interleaved in one run.
//!
//! `transformer-step`: a training step (forward, label-smoothed loss, backward, Adam) of the
//! translation Transformer's full configuration (`reproduce transformer-gettext-en-de`: d_model
//! 128, 4 heads, FFN 512, 2 + 2 layers, one shared 4,000-token embedding) on the first batches
//! of its first epoch on gettext-en-de (2,048-token budget). The batches are written to a file
//! the reference reads, so both sides run identical shapes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use relprune_models::seq2seq::Seq2Seq;
use relprune_prune::Task;
use serde::Serialize;

use crate::bench::median;
use crate::flags;

/// The step tasks.
pub const TASKS: [&str; 1] = ["transformer-step"];

/// Where one step's time went, in seconds (summed over a round's steps).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Profile {
    /// Forward pass and loss.
    pub forward: f64,
    /// Backward pass.
    pub backward: f64,
    /// Optimizer step.
    pub optimizer: f64,
}

impl Profile {
    fn total(&self) -> f64 {
        self.forward + self.backward + self.optimizer
    }

    /// "f% / b% / o%" of the total.
    fn shares(&self) -> String {
        let t = self.total().max(1e-12);
        format!(
            "{:.0} / {:.0} / {:.0}",
            100.0 * self.forward / t,
            100.0 * self.backward / t,
            100.0 * self.optimizer / t
        )
    }
}

/// One step task's figures.
#[derive(Debug, Serialize)]
pub struct StepRow {
    /// The task.
    pub task: String,
    /// Threads both sides ran with.
    pub threads: usize,
    /// Steps per round.
    pub steps: usize,
    /// Our rounds.
    pub ours: Vec<Profile>,
    /// PyTorch's rounds.
    pub torch: Vec<Profile>,
    /// Median over rounds of ours / PyTorch's time.
    pub ratio_median: Option<f64>,
}

/// The translation Transformer, its trainer and task, at the start of its first epoch.
struct TransformerSteps {
    built: crate::translate::Built,
    steps: usize,
}

impl TransformerSteps {
    /// Builds the full configuration on `gettext` (tokenizer trained into `scratch`) and writes
    /// the first `steps` batches with the model's settings to `scratch/transformer-batches.json`.
    fn new(gettext: &Path, scratch: &Path, steps: usize) -> Result<(Self, PathBuf)> {
        let mut cfg = crate::translate::Config::preset(false);
        cfg.data_dir = std::path::absolute(gettext)?;
        let mut built = crate::translate::build(&mut cfg, scratch)?;
        let n = built.task.begin_epoch(1)?;
        if n < steps {
            bail!("transformer-step: the epoch has {n} batches, fewer than --steps {steps}");
        }
        let start = built.task.model.special_tokens().decoder_start;
        let rows = |v: &[u32], cols: usize| -> Vec<Vec<u32>> {
            v.chunks(cols.max(1)).map(<[u32]>::to_vec).collect()
        };
        let batches: Vec<serde_json::Value> = built.task.epoch_batches()[..steps]
            .iter()
            .map(|b| {
                let mask: Vec<u32> = b.source_mask.iter().map(|&m| u32::from(m)).collect();
                serde_json::json!({
                    "source": rows(&b.source_ids, b.source_len),
                    "source_mask": rows(&mask, b.source_len),
                    "decoder_input": rows(&b.decoder_inputs(start), b.target_len),
                    "target": rows(&b.target_ids, b.target_len),
                })
            })
            .collect();
        let m = &cfg.model;
        let json = serde_json::json!({
            "config": {
                "vocab": m.src_vocab, "d_model": m.d_model, "heads": m.heads,
                "ffn_dim": m.ffn_dim, "encoder_layers": m.encoder_layers,
                "decoder_layers": m.decoder_layers, "dropout": m.dropout,
                "attention_dropout": m.attention_dropout, "pre_norm": m.pre_norm,
                "scale_embedding": m.scale_embedding, "max_len": m.max_len, "pad_id": m.pad_id,
                "label_smoothing": cfg.label_smoothing, "lr": cfg.dense_lr, "beta1": 0.9,
                "beta2": 0.98, "eps": 1e-8,
            },
            "batches": batches,
        });
        let path = scratch.join("transformer-batches.json");
        relprune_io::write(&path, serde_json::to_string(&json)?.as_bytes())?;
        Ok((Self { built, steps }, path))
    }

    /// Runs the steps once, timing each part.
    fn round(&mut self) -> Result<Profile> {
        let mut p = Profile::default();
        let b = &mut self.built;
        for i in 0..self.steps {
            let t0 = Instant::now();
            let loss = b.task.batch_loss(i)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            b.trainer
                .optim
                .step(&b.trainer.params, &b.trainer.masks, &grads)?;
            let t3 = Instant::now();
            p.forward += (t1 - t0).as_secs_f64();
            p.backward += (t2 - t1).as_secs_f64();
            p.optimizer += (t3 - t2).as_secs_f64();
        }
        Ok(p)
    }
}

/// The threads both sides use: `RAYON_NUM_THREADS` (what `--threads` sets), else every core.
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One round of the PyTorch reference on `batches`.
fn torch_round(
    python: &Path,
    script: &Path,
    task: &str,
    batches: &Path,
    threads: usize,
    steps: usize,
) -> Result<Profile> {
    let out = Command::new(python)
        .arg(script)
        .args(["--task", task, "--batches"])
        .arg(batches)
        .args([
            "--threads",
            &threads.to_string(),
            "--steps",
            &steps.to_string(),
        ])
        .args(["--warmup", "2"])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{task}: the PyTorch reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{task}: unexpected reference output {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let get = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("{task}: no `{k}` in the reference output"))
    };
    Ok(Profile {
        forward: get("forward")?,
        backward: get("backward")?,
        optimizer: get("optimizer")?,
    })
}

/// Runs the step tasks `tasks` for `f.rounds` interleaved rounds; returns the rows and their
/// Markdown section.
pub fn run(f: &flags::Bench, tasks: &[&str]) -> Result<(Vec<StepRow>, String)> {
    if tasks.is_empty() {
        return Ok((Vec::new(), String::new()));
    }
    let python = f.torch_venv.as_ref().map(|v| v.join("bin/python"));
    let scratch = tempfile::tempdir()?;
    let threads = threads();
    let mut rows = Vec::new();
    for &task in tasks {
        let (mut ours, batches) = match task {
            "transformer-step" => TransformerSteps::new(&f.gettext, scratch.path(), f.steps)?,
            other => bail!("unknown step task `{other}`"),
        };
        // Warm-up: first-touch allocations, thread pools.
        ours.round()?;
        let mut row = StepRow {
            task: task.to_string(),
            threads,
            steps: f.steps,
            ours: Vec::new(),
            torch: Vec::new(),
            ratio_median: None,
        };
        for round in 1..=f.rounds {
            let p = ours.round()?;
            let t = match &python {
                Some(py) => Some(torch_round(
                    py,
                    &f.torch_steps_script,
                    task,
                    &batches,
                    threads,
                    f.steps,
                )?),
                None => None,
            };
            eprintln!(
                "round {round}/{}: {task}: ours {:.3}s{}",
                f.rounds,
                p.total(),
                t.map(|t| format!(
                    ", torch {:.3}s, ratio {:.2}",
                    t.total(),
                    p.total() / t.total()
                ))
                .unwrap_or_default()
            );
            row.ours.push(p);
            row.torch.extend(t);
        }
        row.ratio_median = median(
            row.ours
                .iter()
                .zip(&row.torch)
                .map(|(a, b)| a.total() / b.total())
                .collect(),
        );
        rows.push(row);
    }
    let mut md = String::from(
        "\n## Training steps\n\nPer step, medians over interleaved rounds; the profile splits our \
         time and PyTorch's into forward + loss / backward / optimizer (% of the step).\n\n\
         | task | threads | ours ms/step | torch ms/step | ours / torch | ours f / b / o % | torch f / b / o % |\n\
         |---|---:|---:|---:|---:|---|---|\n",
    );
    for r in &rows {
        let per_step = |v: &[Profile]| median(v.iter().map(|p| p.total()).collect());
        let mid = |v: &[Profile]| {
            let n = v.len().max(1) as f64;
            let sum = v.iter().fold(Profile::default(), |a, p| Profile {
                forward: a.forward + p.forward / n,
                backward: a.backward + p.backward / n,
                optimizer: a.optimizer + p.optimizer / n,
            });
            sum.shares()
        };
        md.push_str(&format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} |\n",
            r.task,
            r.threads,
            per_step(&r.ours).unwrap_or(f64::NAN) * 1e3 / r.steps as f64,
            per_step(&r.torch).map_or("-".into(), |t| format!("{:.1}", t * 1e3 / r.steps as f64)),
            r.ratio_median.map_or("-".into(), |x| format!("{x:.2}")),
            mid(&r.ours),
            if r.torch.is_empty() {
                "-".into()
            } else {
                mid(&r.torch)
            },
        ));
    }
    Ok((rows, md))
}
