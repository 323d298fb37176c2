//! `cargo xtask bench`'s inference tasks: what sparsity buys at inference, as ratios measured in
//! one run against our dense path and against PyTorch on the same weights
//! (`scripts/torch_infer.py`), interleaved round by round.
//!
//! - `layer`: one 3072×768 linear layer (MiniLM's and BERT-base's FFN shape), random weights
//!   pruned by magnitude to each sparsity and to 2:4; batch 1 and 8,192 rows. Ours: candle's
//!   dense product and `SparseLinear` (which runs dense where the crossover table says sparse
//!   loses); PyTorch: `F.linear` and a CSR `torch.sparse.mm`. Plotted as `layer.svg`.
//! - `lenet300-infer`, `lenet5-infer`: the models a reproduction wrote, over 10,000 images in
//!   batches of 100 and 1,000 single images (images/s).
//! - `minilm-embed`: `relprune embed`'s path on each `--minilm-pruned` directory, dense and
//!   `--sparse`, and sentence-transformers' `encode` on the same directories (sentences/s), on
//!   1,000 sentences of 8–32 words (every 20th such line of `--sentences`).
//! - `translate-greedy`: the pruned model of a translation reproduction (`--translation`),
//!   dense and sparse, greedy-decoding the test split's first 500 sources as the run's BLEU
//!   does (batches of 64 sorted by length) and its first 100 one at a time (tokens/s). No
//!   PyTorch row: the model is relprune's own Transformer, which PyTorch has no class for.
//!
//! The thread count is xtask's `--threads` (default: every core), for both sides.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Module, Tensor};
use candle_nn::VarMap;
use relprune_eval::plot::{line_chart_svg, Series};
use relprune_models::{Lenet300, Lenet5};
use relprune_sparse::SparseLinear;
use relprune_tasks::encoder::Embedder;
use serde::Serialize;

use crate::bench::median;
use crate::flags;

/// The inference tasks.
pub const TASKS: [&str; 5] = [
    "layer",
    "lenet300-infer",
    "lenet5-infer",
    "minilm-embed",
    "translate-greedy",
];

/// Sparsities of the layer task.
const SPARSITIES: [f64; 6] = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98];

/// Batches of the layer task.
const LAYER_BATCHES: [usize; 2] = [1, 8192];

/// One measured configuration: seconds per round of each engine, and the medians of the
/// per-round ratios.
#[derive(Debug, Default, Serialize)]
pub struct Row {
    /// The task.
    pub task: String,
    /// What was measured (sparsity, batch, model).
    pub point: String,
    /// Work items per run (rows, images or sentences), for the throughput.
    pub items: usize,
    /// Ours, dense.
    pub dense: Vec<f64>,
    /// Ours, sparse.
    pub sparse: Vec<f64>,
    /// PyTorch, dense.
    pub torch: Vec<f64>,
    /// PyTorch, sparse CSR (layer only).
    pub torch_csr: Vec<f64>,
}

impl Row {
    fn median_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
        median(a.iter().zip(b).map(|(a, b)| a / b).collect())
    }
    /// Our sparse speedup over our dense path (median of per-round ratios).
    pub fn speedup(&self) -> Option<f64> {
        Self::median_ratio(&self.dense, &self.sparse)
    }
    /// Our sparse speedup over PyTorch's dense path.
    pub fn speedup_vs_torch(&self) -> Option<f64> {
        Self::median_ratio(&self.torch, &self.sparse)
    }
    /// Our dense time over PyTorch's dense time.
    pub fn dense_vs_torch(&self) -> Option<f64> {
        Self::median_ratio(&self.dense, &self.torch)
    }
    /// Prints round `round`'s figures (progress on stderr).
    fn log(&self, round: usize, rounds: usize) {
        let torch = self.torch.get(round).map(|t| format!(", PyTorch {t:.3e}s"));
        eprintln!(
            "round {}/{rounds}: {} {}: ours dense {:.3e}s, sparse {:.3e}s{}",
            round + 1,
            self.task,
            self.point,
            self.dense[round],
            self.sparse[round],
            torch.unwrap_or_default()
        );
    }

    /// PyTorch's CSR speedup over its dense path.
    pub fn torch_csr_speedup(&self) -> Option<f64> {
        Self::median_ratio(&self.torch, &self.torch_csr)
    }
}

/// Seconds of one run of `f` (after it ran once), repeated `reps` times.
fn seconds(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

/// The PyTorch side: `scripts/torch_infer.py TASK ARGS`, its JSON output.
struct Torch {
    python: PathBuf,
    script: PathBuf,
    threads: usize,
}

impl Torch {
    fn run(&self, task: &str, args: &[&str]) -> Result<serde_json::Value> {
        let out = Command::new(&self.python)
            .arg(&self.script)
            .arg(task)
            .args(args)
            .args(["--threads", &self.threads.to_string(), "--repeat", "1"])
            .output()
            .with_context(|| format!("cannot run {}", self.python.display()))?;
        if !out.status.success() {
            bail!(
                "{task}: {} failed: {}",
                self.script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{task}: unexpected output {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn first(v: &serde_json::Value, key: &str) -> Result<f64> {
        v[key][0]
            .as_f64()
            .with_context(|| format!("no {key} in the PyTorch output {v}"))
    }
}

/// Everything the inference tasks need.
pub struct Setup {
    torch: Option<Torch>,
    rounds: usize,
    work: PathBuf,
}

impl Setup {
    /// Checks the flags of the selected inference `tasks` before any work.
    pub fn new(f: &flags::Bench, tasks: &[&str]) -> Result<Self> {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let torch = match &f.torch_venv {
            Some(v) => {
                let python = v.join("bin/python");
                if !python.exists() {
                    bail!("--torch-venv: {} does not exist", python.display());
                }
                if !f.torch_infer_script.is_file() {
                    bail!(
                        "--torch-infer-script: {} does not exist",
                        f.torch_infer_script.display()
                    );
                }
                Some(Torch {
                    python,
                    script: f.torch_infer_script.clone(),
                    threads,
                })
            }
            None => None,
        };
        let need = |task: &str, path: &Path, what: &str| -> Result<()> {
            if tasks.contains(&task) && !path.exists() {
                bail!("{task}: {} does not exist ({what})", path.display());
            }
            Ok(())
        };
        need(
            "lenet300-infer",
            &f.lenet300.join("model.safetensors"),
            "--lenet300: a reproduce output",
        )?;
        need(
            "lenet5-infer",
            &f.lenet5.join("model.safetensors"),
            "--lenet5: a reproduce output",
        )?;
        need(
            "translate-greedy",
            &f.translation.join("results.json"),
            "--translation: a finished transformer-gettext-en-de reproduction",
        )?;
        if tasks.contains(&"minilm-embed") {
            if f.minilm_pruned.is_empty() {
                bail!("minilm-embed: --minilm-pruned DIR[,DIR...] (prune-hf outputs) is required");
            }
            for d in &f.minilm_pruned {
                need(
                    "minilm-embed",
                    &d.join("model.safetensors"),
                    "--minilm-pruned",
                )?;
            }
            need("minilm-embed", &f.sentences, "--sentences")?;
        }
        let work = f.out.join("infer-work");
        std::fs::create_dir_all(&work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        Ok(Self {
            torch,
            rounds: f.rounds,
            work,
        })
    }
}

/// Runs the selected inference tasks; returns their rows.
pub fn run(f: &flags::Bench, tasks: &[&str], setup: &Setup) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for task in tasks {
        let mut r = match *task {
            "layer" => layer(setup)?,
            "lenet300-infer" => lenet(setup, "lenet300", &f.lenet300)?,
            "lenet5-infer" => lenet(setup, "lenet5", &f.lenet5)?,
            "minilm-embed" => minilm(setup, &f.minilm_pruned, &f.sentences)?,
            "translate-greedy" => translate(setup, &f.translation)?,
            other => bail!("unknown inference task `{other}`"),
        };
        rows.append(&mut r);
    }
    Ok(rows)
}

/// The weight of the layer task: seeded normal values, the smallest magnitudes zeroed to
/// `sparsity`, or the two largest of every 4 kept (`None`: 2:4).
fn layer_weight(values: &[f32], sparsity: Option<f64>) -> Vec<f32> {
    match sparsity {
        Some(s) => {
            let mut mags: Vec<f32> = values.iter().map(|v| v.abs()).collect();
            let k = ((s * values.len() as f64) as usize).min(values.len() - 1);
            let (_, cut, _) = mags.select_nth_unstable_by(k, f32::total_cmp);
            let cut = *cut;
            values
                .iter()
                .map(|&v| if v.abs() < cut { 0.0 } else { v })
                .collect()
        }
        None => values
            .chunks(4)
            .flat_map(|g| {
                let mut order = [0usize, 1, 2, 3];
                order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
                (0..4).map(move |i| if order[..2].contains(&i) { g[i] } else { 0.0 })
            })
            .collect(),
    }
}

fn layer(setup: &Setup) -> Result<Vec<Row>> {
    let dev = Device::Cpu;
    let (out_f, in_f) = (3072usize, 768usize);
    let w = Tensor::randn(0f32, 0.05, (out_f, in_f), &dev)?;
    let b = Tensor::randn(0f32, 0.05, out_f, &dev)?;
    let values = w.flatten_all()?.to_vec1::<f32>()?;
    let mut points: Vec<Option<f64>> = SPARSITIES.iter().map(|&s| Some(s)).collect();
    points.push(None);
    let mut rows = Vec::new();
    let mut layers = Vec::new();
    for &p in &points {
        let w = Tensor::from_vec(layer_weight(&values, p), (out_f, in_f), &dev)?;
        let file = setup.work.join(format!(
            "layer-{}.safetensors",
            p.map_or("2of4".into(), |s| format!("{s}"))
        ));
        candle_core::safetensors::save(
            &[("weight", w.clone()), ("bias", b.clone())].into(),
            &file,
        )?;
        let sparse = SparseLinear::from_dense(&w, Some(&b))?;
        let dense = candle_nn::Linear::new(w, Some(b.clone()));
        for &batch in &LAYER_BATCHES {
            rows.push(Row {
                task: "layer".into(),
                point: format!(
                    "{} batch {batch}",
                    p.map_or("2:4".into(), |s| format!("{:.0}%", s * 100.0))
                ),
                items: batch,
                ..Default::default()
            });
            layers.push((dense.clone(), sparse.clone(), file.clone(), batch));
        }
    }
    for round in 0..setup.rounds {
        for (row, (dense, sparse, file, batch)) in rows.iter_mut().zip(&layers) {
            let x = Tensor::randn(0f32, 1.0, (*batch, in_f), &dev)?;
            // About 8k rows of work per timing, so batch 1 is not lost in timer noise.
            let reps = (8192 / batch).clamp(1, 2048);
            row.dense
                .push(seconds(reps, || Ok(dense.forward(&x).map(|_| ())?))?);
            row.sparse
                .push(seconds(reps, || Ok(sparse.forward(&x).map(|_| ())?))?);
            if let Some(t) = &setup.torch {
                let v = t.run(
                    "linear",
                    &[
                        "--weights",
                        &file.to_string_lossy(),
                        "--batch",
                        &batch.to_string(),
                        "--reps",
                        &reps.to_string(),
                    ],
                )?;
                row.torch.push(Torch::first(&v, "seconds")?);
                row.torch_csr.push(Torch::first(&v, "csr_seconds")?);
            }
            row.log(round, setup.rounds);
        }
    }
    Ok(rows)
}

/// The `(images, batch)` workloads of the LeNet tasks: the test set in batches of 100, and
/// single images.
const LENET_WORK: [(usize, usize); 2] = [(10_000, 100), (1_000, 1)];

fn lenet(setup: &Setup, net: &str, dir: &Path) -> Result<Vec<Row>> {
    let dev = Device::Cpu;
    let file = dir.join("model.safetensors");
    let varmap = VarMap::new();
    let (dense, sparse): (Box<dyn Module>, Box<dyn Module>) = if net == "lenet300" {
        let m = Lenet300::new(&varmap, 0, &dev)?;
        relprune_models::checkpoint::load(&varmap, &file)?;
        let s = m.to_sparse()?;
        (Box::new(m), Box::new(s))
    } else {
        let m = Lenet5::new(&varmap, 0, &dev)?;
        relprune_models::checkpoint::load(&varmap, &file)?;
        let s = m.to_sparse()?;
        (Box::new(m), Box::new(s))
    };
    let mut rows: Vec<Row> = LENET_WORK
        .iter()
        .map(|&(images, batch)| Row {
            task: format!("{net}-infer"),
            point: format!("{images} images, batch {batch}"),
            items: images,
            ..Default::default()
        })
        .collect();
    for round in 0..setup.rounds {
        for (row, &(images, batch)) in rows.iter_mut().zip(&LENET_WORK) {
            let x = Tensor::rand(0f32, 1.0, (images, 784), &dev)?;
            let batches: Vec<Tensor> = (0..images / batch)
                .map(|i| x.narrow(0, i * batch, batch)?.contiguous())
                .collect::<candle_core::Result<_>>()?;
            let pass = |m: &dyn Module| -> Result<()> {
                for b in &batches {
                    m.forward(b)?;
                }
                Ok(())
            };
            row.dense.push(seconds(1, || pass(dense.as_ref()))?);
            row.sparse.push(seconds(1, || pass(sparse.as_ref()))?);
            if let Some(t) = &setup.torch {
                let v = t.run(
                    net,
                    &[
                        "--weights",
                        &file.to_string_lossy(),
                        "--batch",
                        &batch.to_string(),
                        "--images",
                        &images.to_string(),
                    ],
                )?;
                row.torch.push(Torch::first(&v, "seconds")?);
            }
            row.log(round, setup.rounds);
        }
    }
    Ok(rows)
}

/// Sentences embedded by minilm-embed.
const SENTENCES: usize = 1000;

fn minilm(setup: &Setup, dirs: &[PathBuf], text: &Path) -> Result<Vec<Row>> {
    let lines: Vec<String> = relprune_data::text::read_lines(text)?
        .into_iter()
        .filter(|l| (8..=32).contains(&l.split_whitespace().count()))
        .step_by(20)
        .take(SENTENCES)
        .collect();
    if lines.len() < SENTENCES {
        bail!(
            "{}: {} lines of 8–32 words at a stride of 20, {SENTENCES} needed",
            text.display(),
            lines.len()
        );
    }
    let sentences = setup.work.join("sentences.txt");
    relprune_io::write(&sentences, (lines.join("\n") + "\n").as_bytes())?;
    let sentences = sentences.as_path();
    let mut models = Vec::new();
    let mut rows = Vec::new();
    for dir in dirs {
        models.push((Embedder::load(dir, false)?, Embedder::load(dir, true)?));
        rows.push(Row {
            task: "minilm-embed".into(),
            point: dir
                .file_name()
                .map_or(dir.display().to_string(), |n| n.to_string_lossy().into()),
            items: lines.len(),
            ..Default::default()
        });
    }
    for round in 0..setup.rounds {
        for ((row, (dense, sparse)), dir) in rows.iter_mut().zip(&models).zip(dirs) {
            let t = Instant::now();
            dense.embed(&lines, 32)?;
            row.dense.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            sparse.embed(&lines, 32)?;
            row.sparse.push(t.elapsed().as_secs_f64());
            if let Some(torch) = &setup.torch {
                let v = torch.run(
                    "minilm",
                    &[
                        "--model",
                        &dir.to_string_lossy(),
                        "--sentences",
                        &sentences.to_string_lossy(),
                    ],
                )?;
                row.torch.push(Torch::first(&v, "seconds")?);
            }
            row.log(round, setup.rounds);
        }
    }
    Ok(rows)
}

/// The work of translate-greedy: (sentences, batch size).
const TRANSLATE_WORK: [(usize, usize); 2] = [(500, 64), (100, 1)];

fn translate(setup: &Setup, dir: &Path) -> Result<Vec<Row>> {
    let run = crate::translate::SavedRun::load(dir)?;
    let sparse = run.model.to_sparse()?;
    let most = TRANSLATE_WORK.iter().map(|w| w.0).max().unwrap_or(0);
    let sources = run.test_sources(most)?;
    let decode = |sparse_model: bool, n: usize, batch: usize| {
        let s = &sources[..n.min(sources.len())];
        if sparse_model {
            timed_greedy(&sparse, s, &run.config.decode, batch)
        } else {
            timed_greedy(&run.model, s, &run.config.decode, batch)
        }
    };
    let mut rows: Vec<Row> = Vec::new();
    for round in 0..setup.rounds {
        for (i, &(n, batch)) in TRANSLATE_WORK.iter().enumerate() {
            let (td, dense_out) = decode(false, n, batch)?;
            let (ts, sparse_out) = decode(true, n, batch)?;
            if rows.len() <= i {
                let same = dense_out.iter().zip(&sparse_out).filter(|(a, b)| a == b);
                eprintln!(
                    "translate-greedy: {} of {} translations identical dense and sparse",
                    same.count(),
                    dense_out.len()
                );
                rows.push(Row {
                    task: "translate-greedy".into(),
                    point: format!("{n} sentences, batch {batch}"),
                    // Tokens generated (EOS included): the throughput is in tokens/s.
                    items: dense_out.iter().map(Vec::len).sum(),
                    ..Default::default()
                });
            }
            let row = &mut rows[i];
            row.dense.push(td);
            row.sparse.push(ts);
            row.log(round, setup.rounds);
        }
    }
    Ok(rows)
}

/// Seconds to decode `sources` as the run's metric does, with `batch` sentences at a time, and
/// the tokens generated.
fn timed_greedy<M: relprune_models::Seq2Seq>(
    model: &M,
    sources: &[Vec<u32>],
    decode: &relprune_tasks::DecodeConfig,
    batch: usize,
) -> Result<(f64, Vec<Vec<u32>>)> {
    use relprune_tasks::{decode_all, Decoding};
    let how = Decoding {
        batch_size: batch,
        ..Decoding::for_bleu(decode, model.special_tokens())
    };
    let t = Instant::now();
    let out = decode_all(model, sources, &how, |_| {})?;
    Ok((t.elapsed().as_secs_f64(), out))
}

fn ratio(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}×"))
}

/// The Markdown table of the inference rows, and the layer plot (if the layer task ran).
pub fn report(rows: &[Row], out: &Path) -> Result<String> {
    let mut md = String::from(
        "\n## Inference\n\nSpeedups are medians of per-round time ratios (> 1: the first is \
         faster). `ours sparse / ours dense` is what `--sparse` buys; PyTorch runs the same \
         weights.\n\n| task | point | ours dense (items/s) | ours sparse (items/s) | sparse vs \
         our dense | sparse vs PyTorch dense | our dense vs PyTorch dense (time ratio) | \
         PyTorch CSR vs its dense |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let per_s = |v: &[f64]| {
            median(v.to_vec()).map_or("-".into(), |s| format!("{:.0}", r.items as f64 / s))
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.task,
            r.point,
            per_s(&r.dense),
            per_s(&r.sparse),
            ratio(r.speedup()),
            ratio(r.speedup_vs_torch()),
            r.dense_vs_torch().map_or("-".into(), |x| format!("{x:.2}")),
            ratio(r.torch_csr_speedup()),
        ));
    }
    let layer: Vec<&Row> = rows.iter().filter(|r| r.task == "layer").collect();
    if !layer.is_empty() {
        let mut series = Vec::new();
        for batch in LAYER_BATCHES {
            let suffix = format!("batch {batch}");
            let pts = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
                SPARSITIES
                    .iter()
                    .zip(
                        layer
                            .iter()
                            .filter(|r| r.point.ends_with(&suffix) && !r.point.starts_with("2:4")),
                    )
                    .filter_map(|(s, r)| f(r).map(|y| (s * 100.0, y)))
                    .collect()
            };
            series.push(Series {
                label: format!("relprune sparse / dense, {suffix}"),
                points: pts(&|r| r.speedup()),
            });
            let csr = pts(&|r| r.torch_csr_speedup());
            if !csr.is_empty() {
                series.push(Series {
                    label: format!("PyTorch CSR / dense, {suffix}"),
                    points: csr,
                });
            }
        }
        let svg = line_chart_svg(
            "3072×768 layer: speedup of the sparse product over the dense one",
            "sparsity (%)",
            "speedup (×)",
            &series,
            false,
        )?;
        relprune_io::write(&out.join("layer.svg"), svg.as_bytes())?;
        md.push_str("\n![layer speedup](layer.svg)\n");
    }
    Ok(md)
}
