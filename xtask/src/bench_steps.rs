//! Step-level training benchmarks of the workloads that take hours, against PyTorch doing the
//! same work on the same batches (`xtask/bench/torch_train_steps.py`), interleaved in one run.
//!
//! `transformer-step`: a training step (forward, label-smoothed loss, backward, Adam) of the
//! translation Transformer's full configuration (`reproduce transformer-gettext-en-de`: d_model
//! 128, 4 heads, FFN 512, 2 + 2 layers, one shared 4,000-token embedding) on the first batches
//! of its first epoch on gettext-en-de (2,048-token budget). The batches are written to a file
//! the reference reads, so both sides run identical shapes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use relprune_models::seq2seq::Seq2Seq;
use relprune_prune::Task;
use serde::Serialize;

use crate::bench::median;
use crate::flags;

/// The step tasks.
pub const TASKS: [&str; 3] = [
    "transformer-step",
    "minilm-distill-step",
    "smollm2-block-step",
];

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

/// A workload whose training steps are timed.
trait Steps {
    /// Runs the steps once, timing each part.
    fn round(&mut self) -> Result<Profile>;
}

/// Times `steps` steps: `loss(i)`, its backward, then `update` with the gradients.
fn timed_steps(
    steps: usize,
    mut loss: impl FnMut(usize) -> Result<candle_core::Tensor>,
    mut update: impl FnMut(&candle_core::backprop::GradStore) -> Result<()>,
) -> Result<Profile> {
    let mut p = Profile::default();
    for i in 0..steps {
        let t0 = Instant::now();
        let l = loss(i)?;
        let t1 = Instant::now();
        let grads = l.backward()?;
        let t2 = Instant::now();
        update(&grads)?;
        let t3 = Instant::now();
        p.forward += (t1 - t0).as_secs_f64();
        p.backward += (t2 - t1).as_secs_f64();
        p.optimizer += (t3 - t2).as_secs_f64();
    }
    Ok(p)
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
}

impl Steps for TransformerSteps {
    fn round(&mut self) -> Result<Profile> {
        let b = &mut self.built;
        let (task, trainer) = (&mut b.task, &mut b.trainer);
        timed_steps(
            self.steps,
            |i| Ok(task.batch_loss(i)?),
            |g| Ok(trainer.optim.step(&trainer.params, &trainer.masks, g)?),
        )
    }
}

/// all-MiniLM-L6-v2 distilled against itself as `prune-hf` sets it up (its parameter selection,
/// batches of 32 sentences of the calibration text, cosine loss), with the method's optimizer:
/// masked Adam at the pruning learning rate with the regularizer.
struct MinilmSteps {
    task: relprune_tasks::encoder::EncoderDistill,
    params: relprune_prune::ParamSet,
    masks: relprune_prune::Masks,
    optim: relprune_prune::MaskedAdam,
    steps: usize,
}

impl MinilmSteps {
    /// Builds the task on the first lines of `text` and writes the first `steps` batches, the
    /// trained and prunable parameters' names and the optimizer's settings to
    /// `scratch/minilm-batches.json`.
    fn new(model: &Path, text: &Path, scratch: &Path, steps: usize) -> Result<(Self, PathBuf)> {
        use relprune_core::{Gate, GateStat};
        use relprune_prune::{AdamConfig, MaskedAdam, Masks, ParamSet};
        // Enough sentences for the batches, with the validation split taken out.
        let lines: Vec<String> = relprune_data::text::read_lines(text)?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .take(steps * 32 * 2)
            .collect();
        let sample = scratch.join("minilm-text.txt");
        relprune_io::write(&sample, (lines.join("\n") + "\n").as_bytes())?;
        let mut o = relprune_hf::Options::text(model.display().to_string(), &sample);
        o.target_sparsity = Some(0.5);
        o.augment = Some(0);
        o.vocab_augment = Some(0);
        let cfg = relprune_hf::Config::new(&o)?;
        let varmap = candle_nn::VarMap::new();
        let built = relprune_hf::build_task(&cfg, &varmap, true)?;
        let relprune_hf::HfTask::Encoder(mut task) = built.task else {
            bail!("{}: not an encoder", model.display());
        };
        let params = ParamSet::from_varmap(&varmap, &cfg.selection)?;
        let masks = Masks::dense(&params)?;
        let reg = cfg.prune.regularizer;
        let adam = AdamConfig {
            lr: cfg.prune.lr,
            ..Default::default()
        };
        let optim = MaskedAdam::new(adam, Some(reg))?;
        let n = task.begin_epoch(1)?;
        if n < steps {
            bail!("minilm-distill-step: the epoch has {n} batches, fewer than --steps {steps}");
        }
        let gate = match reg.gate {
            Gate::Soft => serde_json::json!({"kind": "soft"}),
            Gate::All => serde_json::json!({"kind": "all"}),
            Gate::Hard {
                stat: GateStat::Max,
                tau,
            } => serde_json::json!({"kind": "hard-max", "tau": tau}),
            other => bail!("minilm-distill-step: the reference has no {other:?} gate"),
        };
        if reg.ema_beta != 0.0 {
            bail!("minilm-distill-step: the reference has no smoothed relevance");
        }
        let mut batches = Vec::new();
        for rows in task.epoch_batches().take(steps) {
            let (ids, mask) = relprune_tasks::encoder::pad_batch(
                &task.train.ids,
                rows,
                task.pad,
                &candle_core::Device::Cpu,
            )?;
            batches.push(serde_json::json!({
                "input_ids": ids.to_dtype(candle_core::DType::U32)?.to_vec2::<u32>()?,
                "attention_mask": mask.to_dtype(candle_core::DType::U32)?.to_vec2::<u32>()?,
            }));
        }
        let json = serde_json::json!({
            "model": std::path::absolute(model)?,
            "trained": params.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
            "prunable": params.prunable().map(|p| p.name.clone()).collect::<Vec<_>>(),
            "lr": adam.lr, "beta1": adam.beta1, "beta2": adam.beta2, "eps": adam.eps,
            "relevance": format!("{:?}", reg.relevance),
            "gate": gate,
            "lambda": reg.lambda,
            "penalty": format!("{:?}", reg.penalty),
            "batches": batches,
        });
        let path = scratch.join("minilm-batches.json");
        relprune_io::write(&path, serde_json::to_string(&json)?.as_bytes())?;
        let steps = Self {
            task: *task,
            params,
            masks,
            optim,
            steps,
        };
        Ok((steps, path))
    }
}

impl Steps for MinilmSteps {
    fn round(&mut self) -> Result<Profile> {
        use relprune_prune::Optimizer;
        let (task, optim) = (&mut self.task, &mut self.optim);
        let (params, masks) = (&self.params, &self.masks);
        timed_steps(
            self.steps,
            |i| Ok(task.batch_loss(i)?),
            |g| Ok(optim.step(params, masks, g)?),
        )
    }
}

/// Tokens per calibration window of the decoder-LM method (the anchors' windows).
const WINDOW: usize = 512;
/// Distinct windows the block steps cycle through.
const BLOCK_WINDOWS: usize = 4;

/// One step of the decoder-LM method's block-wise recovery (`relprune_hf::llm`): SmolLM2-135M's
/// middle decoder layer, its seven projections pruned to 50% (magnitude per matrix), trained on
/// one 512-token calibration window per step from the dense model's hidden states entering it
/// towards the dense layer's outputs (mean squared error), masked Adam at the method's learning
/// rate, masks fixed, no regularizer (the default recovery passes).
struct SmollmSteps {
    model: relprune_models::hf::llama::CausalLm,
    layer: usize,
    inputs: Vec<candle_core::Tensor>,
    targets: Vec<candle_core::Tensor>,
    params: relprune_prune::ParamSet,
    masks: relprune_prune::Masks,
    optim: relprune_prune::MaskedAdam,
    steps: usize,
}

impl SmollmSteps {
    /// Loads the model, runs the first windows of `text` to the middle layer, prunes it, and
    /// writes the layer's weights, inputs and targets to `scratch/smollm2-block.safetensors` and
    /// the settings to `scratch/smollm2-block.json`.
    fn new(model: &Path, text: &Path, scratch: &Path, steps: usize) -> Result<(Self, PathBuf)> {
        use relprune_hf::llm::{self, Distill};
        use relprune_models::hf::gguf;
        use relprune_prune::{AdamConfig, MaskedAdam, Masks};
        let (lm, varmap, _) = relprune_hf::causal::load(model)?;
        let config = gguf::model_dir(model).join("config.json");
        let tokenizer = relprune_data::text::TextTokenizer::from_file(
            &gguf::model_dir(model).join("tokenizer.json"),
        )?;
        let tokens = relprune_tasks::lm::text_tokens(text, &tokenizer)?;
        let starts: Vec<usize> = (0..BLOCK_WINDOWS).map(|i| i * WINDOW).collect();
        let windows = llm::windows_at(&tokens, &starts, WINDOW)?;
        let layer = lm.num_layers() / 2;
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut ignore =
            |_: &str, _: &candle_core::Tensor| -> relprune_models::Result<()> { Ok(()) };
        for w in &windows {
            let ids =
                candle_core::Tensor::new(w.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
            let mut h = lm.embed(&ids)?;
            for l in 0..layer {
                h = lm.layer_forward(l, &h, None, &mut ignore)?;
            }
            targets.push(lm.layer_forward(layer, &h, None, &mut ignore)?);
            inputs.push(h);
        }
        let vars = relprune_hf::blockwise::variables(&varmap)?;
        let names: Vec<(String, bool)> =
            llm::linears(layer).into_iter().map(|n| (n, true)).collect();
        let params = relprune_hf::blockwise::block_params(&vars, &names)?;
        let mut masks = Masks::dense(&params)?;
        masks.prune_to_sparsity(&params, 0.5, true)?;
        masks.apply(&params)?;
        let distill = Distill::default();
        let adam = AdamConfig {
            lr: distill.lr,
            ..AdamConfig::default()
        };
        let optim = MaskedAdam::new(adam, None)?;
        // The whole layer as transformers names it inside `LlamaDecoderLayer`.
        let prefix = format!("model.layers.{layer}.");
        let mut tensors = std::collections::HashMap::new();
        for (name, var) in &vars {
            if let Some(local) = name.strip_prefix(&prefix) {
                tensors.insert(format!("layer.{local}"), var.as_tensor().clone());
            }
        }
        // What the pruned layer computes on the first window: the reference checks it computes
        // the same before it times anything.
        let check = lm.layer_forward(layer, &inputs[0], None, &mut ignore)?;
        tensors.insert("check.0".into(), check);
        for (i, (x, y)) in inputs.iter().zip(&targets).enumerate() {
            tensors.insert(format!("input.{i}"), x.clone());
            tensors.insert(format!("target.{i}"), y.clone());
        }
        let weights = scratch.join("smollm2-block.safetensors");
        relprune_models::checkpoint::save_tensors(&tensors, &weights)?;
        let json = serde_json::json!({
            "config": std::path::absolute(&config)?,
            "layer": layer,
            "tensors": std::path::absolute(&weights)?,
            "windows": inputs.len(),
            "lr": adam.lr, "beta1": adam.beta1, "beta2": adam.beta2, "eps": adam.eps,
        });
        let path = scratch.join("smollm2-block.json");
        relprune_io::write(&path, serde_json::to_string(&json)?.as_bytes())?;
        let steps = Self {
            model: lm,
            layer,
            inputs,
            targets,
            params,
            masks,
            optim,
            steps,
        };
        Ok((steps, path))
    }
}

impl Steps for SmollmSteps {
    fn round(&mut self) -> Result<Profile> {
        use relprune_prune::Optimizer;
        let (model, layer, optim) = (&self.model, self.layer, &mut self.optim);
        let (inputs, targets) = (&self.inputs, &self.targets);
        let (params, masks) = (&self.params, &self.masks);
        timed_steps(
            self.steps,
            |i| {
                let b = i % inputs.len();
                Ok(relprune_hf::llm::layer_distill_loss(
                    model,
                    layer,
                    &inputs[b],
                    &targets[b],
                )?)
            },
            |g| Ok(optim.step(params, masks, g)?),
        )
    }
}

/// The threads both sides use: `RAYON_NUM_THREADS` (what `--threads` sets), else every core.
pub fn threads() -> usize {
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
    let (threads, steps) = (threads.to_string(), steps.to_string());
    let v = crate::bench::run_reference(
        python,
        script,
        &[
            "--task".as_ref(),
            task.as_ref(),
            "--batches".as_ref(),
            batches.as_os_str(),
            "--threads".as_ref(),
            threads.as_ref(),
            "--steps".as_ref(),
            steps.as_ref(),
            "--warmup".as_ref(),
            "2".as_ref(),
        ],
        task,
    )?;
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
        let (mut ours, batches): (Box<dyn Steps>, PathBuf) = match task {
            "transformer-step" => {
                let (s, p) = TransformerSteps::new(&f.gettext, scratch.path(), f.steps)?;
                (Box::new(s), p)
            }
            "minilm-distill-step" => {
                let (s, p) = MinilmSteps::new(&f.minilm, &f.calib_text, scratch.path(), f.steps)?;
                (Box::new(s), p)
            }
            "smollm2-block-step" => {
                let (s, p) = SmollmSteps::new(&f.smollm2, &f.calib_text, scratch.path(), f.steps)?;
                (Box::new(s), p)
            }
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
