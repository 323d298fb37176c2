//! Pruning a decoder-only LM (Llama, Mistral, Qwen2, Qwen3, from a Hugging Face directory or a
//! GGUF file) end to end, what `relprune prune-hf` does when `--model` is one: calibration
//! windows from `--text`, the method or a baseline ([`crate::llm`]) to `--pattern`, a Hugging
//! Face directory written atomically (dense with zeros, or compressed with `--format`), judged
//! by reloading it, and a report: perplexity dense → pruned, sparsity per layer and per type,
//! time and peak memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use relprune_data::text::TextTokenizer;
use relprune_models::hf::llama::CausalLm;
use relprune_models::hf::save::{save_like_input, save_variables};
use relprune_models::hf::{detect, gguf, HfModel, Kind};
use serde::Serialize;

use crate::compress::CheckpointFormat;
use crate::error::invalid;
use crate::llm::{self, Distill, Method, Owl, Pattern, Plan};
use crate::resolve::{absolute, copy_model_files, resolve};
use crate::{Options, Result, REPORT_FILE};
use relprune_tasks::run::MODEL_FILE;

/// The Markdown report written beside [`REPORT_FILE`].
pub const REPORT_MD: &str = "report.md";

/// Whether `--model` names a decoder-only LM (a GGUF file counts), which [`run`] prunes.
pub fn applies(o: &Options) -> Result<bool> {
    let Some(model) = &o.model else {
        return Ok(false);
    };
    let path = Path::new(model);
    if path.is_file() {
        return Ok(true);
    }
    if !path.is_dir() {
        return Ok(false);
    }
    Ok(gguf::find(path)?.is_some() || detect(path)?.kind == Kind::CausalLm)
}

/// A checked decoder-LM run.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct CausalConfig {
    /// `--model` as given.
    pub model_arg: String,
    /// The model: a Hugging Face directory, or a GGUF file.
    pub model: PathBuf,
    /// Calibration text.
    pub text: PathBuf,
    /// Text whose perplexity the report gives (default: the calibration text).
    pub eval_text: Option<PathBuf>,
    /// `--method`.
    pub method: Method,
    /// `--pattern`.
    pub pattern: Pattern,
    /// The unstructured target (0.5 unless `--target-sparsity`; N:M patterns fix their own).
    pub target_sparsity: f64,
    /// Calibration windows.
    pub calib_windows: usize,
    /// Tokens per window.
    pub window: usize,
    /// Seed of the windows' starts.
    pub seed: u64,
    /// The method's settings (with `--method relprune`).
    pub distill: Option<Distill>,
    /// `--owl`: OWL's layer sparsities.
    pub owl: Option<Owl>,
    /// `--scope`: magnitude's or Wanda's comparison group.
    #[serde(default)]
    pub scope: Option<llm::Scope>,
    /// `--format`.
    pub format: CheckpointFormat,
}

impl CausalConfig {
    /// Checks `o` before any work: files exist, values are in range, the model is a decoder LM.
    pub fn new(o: &Options) -> Result<Self> {
        let model_arg = o
            .model
            .clone()
            .ok_or_else(|| invalid("--model is required"))?;
        let model = if Path::new(&model_arg).is_file() {
            absolute(Path::new(&model_arg))?
        } else {
            resolve(&model_arg, o.revision.as_deref())?
        };
        relprune_models::hf::detect_kind(&model, Kind::CausalLm)?;
        let text = o
            .text
            .as_deref()
            .ok_or_else(|| invalid("a decoder-only LM is calibrated on --text FILE"))?;
        if o.data.is_some() {
            return Err(invalid(
                "--data holds translation pairs; a decoder-only LM is calibrated on --text FILE",
            ));
        }
        for (flag, p) in [
            ("--text", Some(text)),
            ("--eval-text", o.eval_text.as_deref()),
        ] {
            if let Some(p) = p.filter(|p| !p.is_file()) {
                return Err(invalid(format!("{flag} {}: no such file", p.display())));
            }
        }
        let target_sparsity = o.target_sparsity.unwrap_or(0.5);
        if !(0.0..1.0).contains(&target_sparsity) {
            return Err(invalid(format!(
                "--target-sparsity must be in [0, 1), got {target_sparsity}"
            )));
        }
        if o.pattern != Pattern::Unstructured && o.target_sparsity.is_some_and(|s| s != 0.5) {
            return Err(invalid(format!(
                "--pattern {} is 50% sparse by definition; --target-sparsity {target_sparsity} \
                 contradicts it",
                o.pattern.name()
            )));
        }
        if o.owl && o.pattern != Pattern::Unstructured {
            return Err(invalid(format!(
                "--owl sets unstructured layer sparsities; --pattern {} fixes them",
                o.pattern.name()
            )));
        }
        llm::check_scope(
            o.scope,
            o.method,
            o.pattern.at(o.target_sparsity.unwrap_or(0.5)),
            o.owl,
        )?;
        if o.end_to_end_epochs.is_some() && o.method != Method::Relprune {
            return Err(invalid(format!(
                "--end-to-end-epochs is a stage of the method; --method {} has none",
                o.method.name()
            )));
        }
        if o.calib_windows == 0 || o.window < 2 {
            return Err(invalid(format!(
                "need at least one calibration window (--calib-windows {}) of at least 2 tokens \
                 (--window {})",
                o.calib_windows, o.window
            )));
        }
        if o.max_drop.is_some() || o.sparse || o.augment.is_some() || o.vocab_augment.is_some() {
            return Err(invalid(
                "--max-drop, --sparse, --augment and --vocab-augment are for encoders and \
                 translation models",
            ));
        }
        let layer = crate::config::LayerDistill::default();
        if o.final_step.is_some() || o.layer_epochs != layer.epochs || o.layer_lr != layer.lr {
            return Err(invalid(
                "--final-step, --layer-epochs and --layer-lr are for encoders; a decoder-only \
                 LM's method is set with --lr, --lambda, --epochs and --finetune-epochs",
            ));
        }
        Ok(Self {
            model_arg,
            model,
            text: absolute(text)?,
            eval_text: o.eval_text.as_deref().map(absolute).transpose()?,
            method: o.method,
            pattern: o.pattern,
            target_sparsity,
            calib_windows: o.calib_windows,
            window: o.window,
            seed: o.seed,
            distill: (o.method == Method::Relprune).then(|| distill(o)),
            owl: o.owl.then(Owl::default),
            scope: o.scope,
            format: o.format,
        })
    }
}

/// The method's settings: [`Distill::default`] with the engine flags that mean the same here
/// (`--lr`, `--lambda`, `--epochs` for the regularized passes per layer, `--finetune-epochs`
/// for the recovery passes).
fn distill(o: &Options) -> Distill {
    let d = Distill::default();
    let e = &o.engine;
    Distill {
        lr: e.lr.unwrap_or(d.lr),
        regularizer: d
            .regularizer
            .with_lambda(e.regularizer.lambda.unwrap_or(d.regularizer.lambda)),
        regularized_epochs: e.prune_epochs.unwrap_or(d.regularized_epochs),
        recovery_epochs: e.finetune_epochs.unwrap_or(d.recovery_epochs),
        end_to_end: match o.end_to_end_epochs {
            Some(0) => None,
            Some(epochs) => Some(llm::EndToEnd {
                epochs,
                ..llm::EndToEnd::default()
            }),
            None => d.end_to_end,
        },
        ..d
    }
}

/// Perplexity of one text before and after pruning.
#[derive(Clone, Debug, Serialize)]
pub struct PerplexityRow {
    /// The text file.
    pub file: PathBuf,
    /// Whether it is the calibration text (seen while pruning).
    pub calibration: bool,
    /// Its tokens.
    pub tokens: usize,
    /// The dense model's.
    pub dense: f64,
    /// The written model's.
    pub pruned: f64,
}

/// Zeros of one group of weights.
#[derive(Clone, Debug, Serialize)]
pub struct SparsityRow {
    /// A tensor name, or a projection type (`q_proj`, …).
    pub name: String,
    /// Weights.
    pub weights: usize,
    /// Of which zero.
    pub zeros: usize,
}

/// What [`run`] wrote into `relprune_report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct CausalReport {
    /// The run's configuration.
    pub config: CausalConfig,
    /// The architecture (`model_type`).
    pub architecture: String,
    /// Calibration tokens in all, and the windows' starts in the tokenized text.
    pub calibration_tokens: usize,
    /// Start of each calibration window.
    pub window_starts: Vec<usize>,
    /// Perplexity per evaluation text.
    pub perplexity: Vec<PerplexityRow>,
    /// Zeros over all pruned projections.
    pub linear_sparsity: f64,
    /// Per pruned tensor.
    pub layers: Vec<SparsityRow>,
    /// Per projection type.
    pub types: Vec<SparsityRow>,
    /// OWL's sparsity of each decoder layer (with `--owl`).
    pub layer_sparsity: Option<Vec<f64>>,
    /// The method: each layer's output error against the dense model's after its last pruning
    /// step and at the end.
    pub layer_errors: Vec<(f64, f64)>,
    /// The method's end-to-end stage (`--end-to-end-epochs`): per group of layers, the
    /// divergence from the dense model before and after.
    pub end_to_end: Vec<llm::GroupDone>,
    /// Seconds spent pruning (calibration included).
    pub prune_seconds: f64,
    /// Seconds of the whole run.
    pub wall_seconds: f64,
    /// Peak resident memory of the process until the pruned model was written, MB.
    pub peak_rss_mb_pruning: Option<f64>,
}

/// `count` starts of `window`-token windows in `len` tokens, drawn with `seed`, sorted.
pub fn window_starts(len: usize, window: usize, count: usize, seed: u64) -> Result<Vec<usize>> {
    if len < window {
        return Err(invalid(format!(
            "the calibration text has {len} tokens, fewer than one window of {window}"
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut starts: Vec<usize> = (0..count)
        .map(|_| rng.random_range(0..=len - window))
        .collect();
    starts.sort_unstable();
    Ok(starts)
}

/// The decoder-only LM at `model` (directory or GGUF file), its variables and `model_type`.
pub fn load(model: &Path) -> Result<(CausalLm, VarMap, &'static str)> {
    let varmap = VarMap::new();
    let (arch, loaded) = relprune_models::hf::load(model, &varmap, &Device::Cpu)?;
    match loaded {
        HfModel::CausalLm(m) => Ok((*m, varmap, arch.model_type)),
        _ => Err(invalid(format!(
            "{} is not a decoder-only LM",
            model.display()
        ))),
    }
}

/// The checkpoint file of a decoder-LM run in its work directory (beside it, one
/// `layer-L.safetensors` per decoder layer done with its projections as they are now).
pub const CHECKPOINT_FILE: &str = "causal-checkpoint.json";

/// What a decoder-LM run's work directory records after each step.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
struct Checkpoint {
    /// The run's configuration (what `--resume` continues).
    config: CausalConfig,
    /// Decoder layers done by the layer-by-layer pass.
    layers: usize,
    /// Their output errors (the method).
    layer_errors: Vec<(f64, f64)>,
    /// End-to-end groups done.
    groups: Vec<llm::GroupDone>,
    /// Seconds spent pruning before the last checkpoint.
    prune_seconds: f64,
}

fn layer_file(work: &Path, l: usize) -> PathBuf {
    work.join(format!("layer-{l}.safetensors"))
}

/// The configuration of the decoder-LM run checkpointed in `work`, if `work` holds one.
pub fn resume_config(work: &Path) -> Result<Option<CausalConfig>> {
    Ok(read_checkpoint(work)?.map(|c| c.config))
}

fn read_checkpoint(work: &Path) -> Result<Option<Checkpoint>> {
    let path = work.join(CHECKPOINT_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = relprune_io::read_text_capped(&path, relprune_io::CONFIG_CAP)
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map(Some).map_err(|e| {
        invalid(format!(
            "{}: not a decoder-LM checkpoint: {e}",
            path.display()
        ))
    })
}

/// The weights a resumed run replays: every layer file the checkpoint counts.
fn resume_state(work: &Path, c: &Checkpoint, layers: usize) -> Result<llm::Resume> {
    let mut weights = std::collections::HashMap::new();
    for l in 0..c.layers.min(layers) {
        let path = layer_file(work, l);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        weights.extend(tensors);
    }
    Ok(llm::Resume {
        layers: c.layers,
        layer_errors: c.layer_errors.clone(),
        groups: c.groups.clone(),
        weights,
    })
}

/// Prunes the model of `cfg` into `opts.out` (which must not exist; written through a staging
/// directory renamed at the end) and reports, checkpointed after every decoder layer and every
/// end-to-end group into `opts.work` (removed after success unless `opts.keep_work`); with
/// `opts.resume`, continues the run checkpointed there (see [`resume_config`]) to the result
/// the uninterrupted run would have written. `opts.quiet` silences the per-layer progress.
pub fn run(cfg: CausalConfig, opts: &crate::RunOptions) -> Result<CausalReport> {
    let started = Instant::now();
    let quiet = opts.quiet;
    let out = absolute(&opts.out)?;
    if out.exists() {
        return Err(invalid(format!(
            "output directory {} already exists (prune-hf never overwrites; remove it or pick \
             another)",
            out.display()
        )));
    }
    let work = absolute(&opts.work)?;
    let saved = read_checkpoint(&work)?;
    match (&saved, opts.resume) {
        (Some(_), false) => {
            return Err(invalid(format!(
                "work directory {} holds the checkpoint of an earlier run: resume it (--resume \
                 {}), or delete it",
                work.display(),
                work.display()
            )))
        }
        (None, true) => {
            return Err(invalid(format!(
                "work directory {} holds no decoder-LM checkpoint ({CHECKPOINT_FILE}) to resume",
                work.display()
            )))
        }
        (Some(_), true) => {
            // Writes a kill interrupted are never resumed from; their files only take space.
            relprune_io::sweep_temp(&work)?;
        }
        (None, false) => {}
    }
    let dir = gguf::model_dir(&cfg.model);
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))
        .map_err(|e| invalid(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
    let (model, varmap, architecture) = load(&cfg.model)?;
    tokenizer
        .check_vocab(model.config().vocab_size)
        .map_err(|e| invalid(format!("the tokenizer does not fit the model: {e}")))?;
    let calib = relprune_tasks::lm::text_tokens(&cfg.text, &tokenizer)?;
    let starts = window_starts(calib.len(), cfg.window, cfg.calib_windows, cfg.seed)?;
    let windows = llm::windows_at(&calib, &starts, cfg.window)?;
    let evals: Vec<(PathBuf, bool)> = match &cfg.eval_text {
        Some(p) => vec![(p.clone(), false)],
        None => vec![(cfg.text.clone(), true)],
    };
    let eval_tokens: Vec<Vec<u32>> = evals
        .iter()
        .map(|(p, _)| relprune_tasks::lm::text_tokens(p, &tokenizer))
        .collect::<std::result::Result<_, _>>()?;
    let say = |what: &str| {
        if !quiet {
            eprintln!("{what}");
        }
    };
    let mut dense = Vec::new();
    for tokens in &eval_tokens {
        dense.push(relprune_tasks::lm::perplexity(
            &model,
            tokens,
            cfg.window,
            |_, _| {},
        )?);
    }
    say(&format!("dense perplexity {:.3}", dense[0].perplexity));

    let t = Instant::now();
    let sparsity = cfg.pattern.at(cfg.target_sparsity);
    let resume = match &saved {
        Some(c) => Some(resume_state(&work, c, model.num_layers())?),
        None => None,
    };
    let earlier_seconds = saved.as_ref().map_or(0.0, |c| c.prune_seconds);
    let mut checkpoint = saved.unwrap_or(Checkpoint {
        config: cfg.clone(),
        layers: 0,
        layer_errors: Vec::new(),
        groups: Vec::new(),
        prune_seconds: 0.0,
    });
    let mut steps = 0usize;
    let progress = |d: &llm::LayerDone| -> Result<()> {
        // Made with the first checkpoint: a run that fails before it leaves nothing behind.
        std::fs::create_dir_all(&work).map_err(|e| {
            invalid(format!(
                "cannot create work directory {}: {e}",
                work.display()
            ))
        })?;
        for l in d.first..d.layer {
            save_variables(&varmap, &llm::linears(l), &layer_file(&work, l))?;
        }
        match d.stage {
            "layer" => {
                checkpoint.layers = d.layer;
                checkpoint.layer_errors.extend(d.error);
            }
            _ => checkpoint.groups.push(llm::GroupDone {
                first: d.first,
                end: d.layer,
                before: d.error.map_or(f64::NAN, |e| e.0),
                after: d.error.map_or(f64::NAN, |e| e.1),
            }),
        }
        checkpoint.prune_seconds = earlier_seconds + t.elapsed().as_secs_f64();
        let json = serde_json::to_string_pretty(&checkpoint).map_err(|e| invalid(e.to_string()))?;
        relprune_io::write(&work.join(CHECKPOINT_FILE), json.as_bytes())?;
        steps += 1;
        if let Some(n) = opts.interrupt_after.filter(|&n| steps >= n) {
            return Err(invalid(format!(
                "interrupted after {steps} steps ({}={n})",
                crate::INTERRUPT_ENV
            )));
        }
        if !quiet {
            let error = d.error.map_or(String::new(), |(a, b)| {
                format!(" (output error {a:.2e} → {b:.2e})")
            });
            let what = match d.stage {
                "layer" => "layer",
                _ => "end-to-end, up to layer",
            };
            eprintln!(
                "{}: {what} {}/{}{error}",
                cfg.method.name(),
                d.layer,
                d.layers
            );
        }
        Ok(())
    };
    let plan = Plan {
        method: cfg.method,
        sparsity,
        owl: cfg.owl,
        distill: cfg.distill.unwrap_or_default(),
        scope: cfg.scope,
    };
    let report = llm::prune_with(&model, &windows, &plan, resume.as_ref(), progress)?;
    let prune_seconds = earlier_seconds + t.elapsed().as_secs_f64();
    let (layers, types) = sparsity_rows(&varmap, model.num_layers())?;

    let stage = relprune_io::StagingDir::new(&out)?;
    copy_model_files(&dir, stage.path(), MODEL_FILE)?;
    let input = dir.join(MODEL_FILE);
    if cfg.model.is_dir() && input.is_file() {
        save_like_input(
            &input,
            &stage.path().join(MODEL_FILE),
            &varmap,
            detect(&dir)?,
        )?;
    } else {
        let names: Vec<String> = model
            .config()
            .parameter_shapes()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        save_variables(&varmap, &names, &stage.path().join(MODEL_FILE))?;
        if !stage.path().join("config.json").is_file() {
            let json =
                serde_json::to_string_pretty(model.config()).map_err(|e| invalid(e.to_string()))?;
            relprune_io::write(&stage.path().join("config.json"), json.as_bytes())?;
        }
    }
    let peak_rss_mb_pruning = crate::memory::rss_mb().map(|(_, peak)| peak);
    // The written files are what is judged: the in-memory model goes first (peak memory).
    drop(model);
    drop(varmap);
    if let Some(format) = cfg.format.compressed() {
        crate::compress::compress_in_place(stage.path(), format.into())?;
    }
    let (written, _, _) = load(stage.path())?;
    let mut perplexity = Vec::new();
    for (((file, calibration), tokens), d) in evals.into_iter().zip(&eval_tokens).zip(&dense) {
        let p = relprune_tasks::lm::perplexity(&written, tokens, cfg.window, |_, _| {})?;
        perplexity.push(PerplexityRow {
            file,
            calibration,
            tokens: tokens.len(),
            dense: d.perplexity,
            pruned: p.perplexity,
        });
    }
    let (zeros, weights) = layers
        .iter()
        .fold((0, 0), |(z, w), r| (z + r.zeros, w + r.weights));
    let result = CausalReport {
        architecture: architecture.to_string(),
        calibration_tokens: report.calibration_tokens,
        window_starts: starts,
        perplexity,
        linear_sparsity: zeros as f64 / weights.max(1) as f64,
        layers,
        types,
        layer_sparsity: report.layer_sparsity.clone(),
        layer_errors: report.layer_errors.clone(),
        end_to_end: report.end_to_end.clone(),
        prune_seconds,
        wall_seconds: started.elapsed().as_secs_f64(),
        peak_rss_mb_pruning,
        config: cfg,
    };
    let json = serde_json::to_string_pretty(&result).map_err(|e| invalid(e.to_string()))?;
    relprune_io::write(&stage.path().join(REPORT_FILE), json.as_bytes())?;
    relprune_io::write(&stage.path().join(REPORT_MD), markdown(&result).as_bytes())?;
    stage.commit(&out)?;
    if !opts.keep_work {
        std::fs::remove_dir_all(&work)
            .map_err(|e| invalid(format!("cannot remove {}: {e}", work.display())))?;
    }
    Ok(result)
}

/// Zeros per pruned projection and per projection type.
fn sparsity_rows(varmap: &VarMap, layers: usize) -> Result<(Vec<SparsityRow>, Vec<SparsityRow>)> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| invalid("VarMap lock poisoned"))?
        .clone();
    let mut rows = Vec::new();
    let mut types: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for l in 0..layers {
        for name in llm::linears(l) {
            let v = vars
                .get(&name)
                .ok_or_else(|| invalid(format!("the model has no variable `{name}`")))?
                .as_tensor()
                .flatten_all()?
                .to_vec1::<f32>()?;
            let zeros = v.iter().filter(|&&x| x == 0.0).count();
            let kind = name.rsplit('.').nth(1).unwrap_or("?").to_string();
            let t = types.entry(kind).or_default();
            t.0 += zeros;
            t.1 += v.len();
            rows.push(SparsityRow {
                name,
                weights: v.len(),
                zeros,
            });
        }
    }
    let types = types
        .into_iter()
        .map(|(name, (zeros, weights))| SparsityRow {
            name,
            weights,
            zeros,
        })
        .collect();
    Ok((rows, types))
}

fn markdown(r: &CausalReport) -> String {
    let c = &r.config;
    let pct = |row: &SparsityRow| 100.0 * row.zeros as f64 / row.weights.max(1) as f64;
    let mut md = format!(
        "# prune-hf {}\n\n{} ({}), method **{}**, pattern {}{}; {} calibration windows of {} \
         tokens ({} tokens) from {}.\n\n",
        c.model_arg,
        c.model.display(),
        r.architecture,
        c.method.name(),
        c.pattern.name(),
        if c.pattern == Pattern::Unstructured {
            format!(" at {:.0}%", 100.0 * c.target_sparsity)
        } else {
            String::new()
        },
        c.calib_windows,
        c.window,
        r.calibration_tokens,
        c.text.display(),
    );
    md.push_str("| text | tokens | dense perplexity | pruned perplexity |\n|---|---:|---:|---:|\n");
    for p in &r.perplexity {
        md.push_str(&format!(
            "| {}{} | {} | {:.3} | {:.3} |\n",
            p.file.display(),
            if p.calibration { " (calibration)" } else { "" },
            p.tokens,
            p.dense,
            p.pruned
        ));
    }
    md.push_str(&format!(
        "\nZeros in the pruned projections: {:.2}%. Pruning took {:.0} s (the whole run {:.0} \
         s); peak memory {}.\n\n| projection | weights | zero |\n|---|---:|---:|\n",
        100.0 * r.linear_sparsity,
        r.prune_seconds,
        r.wall_seconds,
        r.peak_rss_mb_pruning
            .map_or("not measured".into(), |m| format!("{m:.0} MB")),
    ));
    for t in &r.types {
        md.push_str(&format!(
            "| {} | {} | {:.2}% |\n",
            t.name,
            t.weights,
            pct(t)
        ));
    }
    if !r.layer_errors.is_empty() {
        md.push_str(
            "\nEach decoder layer's output error against the dense model's (squared, relative), \
             after its pruning step and after its distillation:\n\n| layer | pruned | distilled \
             |\n|---:|---:|---:|\n",
        );
        for (l, (a, b)) in r.layer_errors.iter().enumerate() {
            md.push_str(&format!("| {l} | {a:.3e} | {b:.3e} |\n"));
        }
    }
    if !r.end_to_end.is_empty() {
        md.push_str(
            "\nEnd-to-end stage: mean KL divergence from the dense model's next-token \
             distribution (top tokens and the rest) on the calibration text, before and after \
             each group's training:\n\n| layers | before | after |\n|---|---:|---:|\n",
        );
        for g in &r.end_to_end {
            md.push_str(&format!(
                "| {}–{} | {:.4} | {:.4} |\n",
                g.first,
                g.end - 1,
                g.before,
                g.after
            ));
        }
    }
    md.push_str("\n| tensor | weights | zero |\n|---|---:|---:|\n");
    for t in &r.layers {
        md.push_str(&format!(
            "| {} | {} | {:.2}% |\n",
            t.name,
            t.weights,
            pct(t)
        ));
    }
    md
}
