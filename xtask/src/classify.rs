//! The image-classification experiments: LeNet-300-100 and LeNet-5-Caffe on MNIST and
//! Fashion-MNIST (the paper's first experiments), one configuration type for all of them.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use relprune_core::SelectiveDecay;
use relprune_data::{DataSource, DatasetKind};
use relprune_eval::{DatasetInfo, RoundRecord, RunResults};
use relprune_models::{CifarResNet, Lenet300, Lenet5, Shortcut, Vgg16};
use relprune_prune::baselines::{self, Finetune};
use relprune_prune::threshold::BisectionConfig;
use relprune_prune::{
    LrSchedule, MaskedSgd, Masks, ParamSet, PruneConfig, RestorePoint, Selection, SgdConfig, Split,
    Trainer,
};
use relprune_tasks::run::{self, CHECKPOINT_DIR, DENSE_FILE};
use relprune_tasks::{Finish, ImageClassification, Method, OwnNames, Phase};
use serde::{Deserialize, Serialize};

use crate::flags;
use crate::reproduce::Experiment;

/// The classifiers these experiments prune.
#[derive(Clone, Debug)]
pub enum Net {
    /// LeNet-300-100.
    Lenet300(Lenet300),
    /// LeNet-5-Caffe.
    Lenet5(Lenet5),
    /// VGG-16 with batch norm (CIFAR).
    Vgg16(Vgg16),
    /// A CIFAR ResNet (option-A shortcuts).
    Resnet(CifarResNet),
}

impl Net {
    /// A freshly initialized `name` (`lenet300`, `lenet5`, `vgg16`, `resnet20|32|56`) with its
    /// parameters in `varmap`.
    pub fn new(name: &str, varmap: &VarMap, seed: u64, device: &Device) -> Result<Self> {
        Ok(match name {
            "lenet300" => Net::Lenet300(Lenet300::new(varmap, seed, device)?),
            "lenet5" => Net::Lenet5(Lenet5::new(varmap, seed, device)?),
            "vgg16" => Net::Vgg16(Vgg16::new(varmap, 10, seed, device)?),
            "resnet20" | "resnet32" | "resnet56" => {
                let depth = name["resnet".len()..].parse()?;
                Net::Resnet(CifarResNet::new(
                    varmap,
                    depth,
                    Shortcut::A,
                    10,
                    seed,
                    device,
                )?)
            }
            other => {
                anyhow::bail!("unknown model `{other}` (lenet300, lenet5, vgg16, resnet20/32/56)")
            }
        })
    }
}

impl candle_core::ModuleT for Net {
    fn forward_t(
        &self,
        x: &candle_core::Tensor,
        train: bool,
    ) -> candle_core::Result<candle_core::Tensor> {
        use candle_core::Module;
        match self {
            Net::Lenet300(m) => m.forward(x),
            Net::Lenet5(m) => m.forward(x),
            Net::Vgg16(m) => m.forward_t(x, train),
            Net::Resnet(m) => m.forward_t(x, train),
        }
    }
}

/// Everything that defines a run (written into results.json so it can be repeated).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub experiment: String,
    /// `lenet300` or `lenet5`.
    #[serde(default = "default_model")]
    pub model: String,
    /// `mnist` or `fashion-mnist`.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    pub quick: bool,
    pub seed: u64,
    pub data_source: String,
    /// The MNIST directory (`None`: the embedded subset).
    #[serde(default)]
    pub data_dir: Option<std::path::PathBuf>,
    pub train_limit: Option<usize>,
    pub n_valid: usize,
    pub batch_size: usize,
    pub dense_epochs: usize,
    pub dense_lr: f64,
    pub momentum: f64,
    pub selection: Selection,
    pub prune: PruneConfig,
    /// The method, or a baseline.
    pub method: Method,
    /// Target sparsity of the baselines that take one (one-shot, gmp, snip).
    pub baseline_sparsity: f64,
    /// Random shifts of up to this many pixels (zero padding, then a crop) on the training
    /// images of MNIST-like datasets; 0: none. CIFAR-10 always gets its pad-4 crop and flip.
    #[serde(default)]
    pub augment_shift: usize,
    pub threads: Option<String>,
}

fn default_model() -> String {
    "lenet300".into()
}

fn default_dataset() -> String {
    "mnist".into()
}

/// The experiments of this module: (name, model, dataset, what it is).
pub const EXPERIMENTS: [(&str, &str, &str, &str); 5] = [
    (
        "lenet300-mnist",
        "lenet300",
        "mnist",
        "LeNet-300-100 on MNIST: dense training, selective decay + iterative pruning, fine-tune",
    ),
    (
        "lenet5-mnist",
        "lenet5",
        "mnist",
        "LeNet-5-Caffe on MNIST (conv 20-50, fc 500)",
    ),
    (
        "lenet5-fashion",
        "lenet5",
        "fashion-mnist",
        "LeNet-5-Caffe on Fashion-MNIST (Debian package dataset-fashion-mnist)",
    ),
    (
        "vgg16-cifar10",
        "vgg16",
        "cifar10",
        "VGG-16-BN on CIFAR-10 (--data-dir with the binary batches; full run: GPU-sized)",
    ),
    (
        "resnet32-cifar10",
        "resnet32",
        "cifar10",
        "ResNet-32 on CIFAR-10 (--data-dir with the binary batches; full run: GPU-sized)",
    ),
];

impl Config {
    /// The full (paper-scale) or quick configuration of `experiment`.
    pub fn preset(experiment: &str, quick: bool) -> Result<Self> {
        let &(_, model, dataset, _) = EXPERIMENTS
            .iter()
            .find(|e| e.0 == experiment)
            .with_context(|| format!("unknown image experiment `{experiment}`"))?;
        let mut cfg = Self::new(quick);
        cfg.experiment = experiment.into();
        cfg.model = model.into();
        cfg.dataset = dataset.into();
        if model == "lenet5" {
            // Convolutions train faster per epoch in accuracy, slower in seconds: fewer epochs,
            // and a smaller dense learning rate (no batch norm).
            cfg.dense_lr = 0.05;
            cfg.dense_epochs = if quick { 8 } else { 20 };
            cfg.prune.max_epochs = if quick { 60 } else { 200 };
            cfg.prune.delta = if quick { 0.8 } else { 0.3 };
            // METHOD.md's 5% round tolerance: the 200-epoch budget must reach ≥ 50× on a
            // network that costs ~10× LeNet-300 per epoch.
            cfg.prune.bisection.twt = 0.05;
            if dataset == "mnist" && !quick {
                // The recorded full run (docs/RESULTS.md: 125× at 0.73% test error). Shifts of
                // up to 2 pixels lower the dense error from 0.76% to ~0.55%; the 0.3-point budget
                // tuned for the unaugmented model then rejects every round past 10% of the
                // weights, hence 0.8. A 200-epoch budget runs out at 98.5% pruned (rounds then
                // take ~2% of what is left): 400 epochs reach the 99.2% stop at epoch 293.
                cfg.augment_shift = 2;
                cfg.prune.delta = 0.8;
                cfg.prune.max_epochs = 400;
                cfg.prune.target_sparsity = Some(0.992);
            }
        }
        if dataset == "cifar10" {
            // The usual CIFAR recipe (SGD 0.1, momentum 0.9, cosine, crop + flip); the quick
            // configuration is CPU-sized: the first 1,200 training images, a handful of epochs.
            cfg.dense_lr = 0.1;
            cfg.batch_size = if quick { 50 } else { 128 };
            cfg.dense_epochs = if quick { 3 } else { 160 };
            cfg.n_valid = if quick { 200 } else { 5000 };
            cfg.train_limit = if quick { Some(1200) } else { None };
            cfg.prune.max_epochs = if quick { 6 } else { 300 };
            cfg.prune.patience = if quick { 1 } else { 3 };
            cfg.prune.delta = if quick { 5.0 } else { 0.5 };
            cfg.prune.finetune_epochs = if quick { 1 } else { 20 };
        }
        if dataset == "fashion-mnist" && !quick {
            // The recorded full run (README: 87.8× at 9.41% test error against 8.89% dense).
            // Validation error is ~8–9% here, ±0.4 points of noise on 5,000 images: MNIST's
            // 0.3-point budget would judge rounds by noise.
            cfg.prune.delta = 1.0;
        }
        if dataset == "fashion-mnist" && quick {
            // The package has the full 60k; the quick run uses the first 10k (8k train, 2k valid).
            cfg.train_limit = Some(10_000);
        }
        Ok(cfg)
    }

    /// The LeNet-300-100 on MNIST configuration, full (paper-scale) or quick.
    pub fn new(quick: bool) -> Self {
        let prune = PruneConfig {
            // LOBSTER's soft gate: ahead of the hard gate in both ablation budgets (docs/ABLATION.md).
            regularizer: SelectiveDecay::lobster(1e-4),
            lr: 0.01,
            // Gentle rounds (2% loss head-room instead of METHOD.md's 5%) over a long budget:
            // 96× at 1.87% against 64× at 2.04% with 5% and 200 epochs (docs/ABLATION.md).
            bisection: BisectionConfig {
                twt: 0.02,
                ..Default::default()
            },
            delta: if quick { 0.8 } else { 1.0 },
            patience: 2,
            min_improvement: 0.01,
            restore: RestorePoint::LastImprovement,
            judge_retrained: false,
            max_epochs: if quick { 300 } else { 400 },
            target_sparsity: None,
            stop_rounds: 5,
            // Late rounds of the long full run each take only ~0.01–0.05% of the weights and
            // still pay off; the quick run stops at 0.1%.
            min_round_gain: if quick { 0.001 } else { 0.0001 },
            finetune_epochs: 10,
            finetune_lr: 0.01,
        };
        Self {
            experiment: "lenet300-mnist".into(),
            model: default_model(),
            dataset: default_dataset(),
            quick,
            seed: 1,
            data_source: String::new(),
            data_dir: None,
            train_limit: None,
            n_valid: if quick { 2000 } else { 5000 },
            batch_size: 100,
            dense_epochs: if quick { 15 } else { 20 },
            dense_lr: 0.1,
            momentum: 0.9,
            selection: Selection::default(),
            prune,
            method: Method::Selective,
            baseline_sparsity: 0.98,
            augment_shift: 0,
            threads: std::env::var("RAYON_NUM_THREADS").ok(),
        }
    }
}

/// The registry entries of this module's experiments.
pub fn experiments() -> Vec<Experiment> {
    EXPERIMENTS
        .iter()
        .map(|&(name, _, dataset, about)| Experiment {
            name,
            about,
            needs_cifar: dataset == "cifar10",
            run,
        })
        .collect()
}

/// The CIFAR-10 directory of `--all`: `--cifar-dir`, else `$RELPRUNE_CIFAR10_DIR`.
pub fn cifar_dir(f: &flags::Reproduce) -> Option<std::path::PathBuf> {
    f.cifar_dir
        .clone()
        .or_else(|| std::env::var_os("RELPRUNE_CIFAR10_DIR").map(Into::into))
}

/// The IDX dataset of a configuration (`None` for CIFAR-10).
fn dataset_kind(cfg: &Config) -> Result<Option<DatasetKind>> {
    Ok(match cfg.dataset.as_str() {
        "mnist" => Some(DatasetKind::Mnist),
        "fashion-mnist" => Some(DatasetKind::FashionMnist),
        "cifar10" => None,
        other => anyhow::bail!("unknown dataset `{other}` (mnist, fashion-mnist, cifar10)"),
    })
}

/// The train and test splits of a configuration's dataset from `source`.
fn load_splits(cfg: &Config, source: &DataSource) -> Result<relprune_data::ImageSplits> {
    Ok(match (dataset_kind(cfg)?, source) {
        (Some(kind), _) => relprune_data::load(kind, source)
            .with_context(|| format!("loading {} from {source}", kind.name()))?,
        (None, DataSource::Dir(dir)) => relprune_data::load_cifar10_dir(dir)
            .with_context(|| format!("loading CIFAR-10 from {}", dir.display()))?,
        (None, DataSource::Embedded) => anyhow::bail!("CIFAR-10 has no embedded subset"),
    })
}

pub fn run(experiment: &str, f: &flags::Reproduce, out: &Path) -> Result<RunResults> {
    if let Some(dir) = &f.resume {
        let saved: run::SavedRun<Config> =
            run::saved_config(&dir.join(CHECKPOINT_DIR), "image-classification")?;
        let mut cfg = saved.config.clone();
        let selective = cfg.method == Method::Selective;
        crate::reproduce::apply_resume_flags(
            f,
            &saved,
            selective,
            &mut cfg.dense_epochs,
            &mut cfg.prune,
        );
        let epochs = saved.epochs;
        let source = match &cfg.data_dir {
            Some(d) => DataSource::Dir(d.clone()),
            None => DataSource::Embedded,
        };
        eprintln!(
            "resuming {} in {} after {} epochs",
            cfg.experiment,
            dir.display(),
            epochs
        );
        return run_config(cfg, &source, out, true);
    }
    let mut cfg = Config::preset(experiment, f.quick)?;
    crate::reproduce::apply_common_flags(
        f,
        crate::reproduce::Common {
            seed: &mut cfg.seed,
            dense_epochs: &mut cfg.dense_epochs,
            train_limit: &mut cfg.train_limit,
            prune: &mut cfg.prune,
        },
    )?;
    if let Some(m) = f.method {
        cfg.method = m;
    }
    if let Some(sp) = f.sparsity {
        cfg.baseline_sparsity = sp;
    }
    if let Some(n) = f.augment_shift {
        cfg.augment_shift = n;
    }
    // With --all, --data-dir is the MNIST directory, --cifar-dir CIFAR-10's; Fashion-MNIST keeps
    // its default.
    let data_dir = match (f.all, cfg.dataset.as_str()) {
        (true, "fashion-mnist") => None,
        (true, "cifar10") => f.cifar_dir.as_deref(),
        _ => f.data_dir.as_deref(),
    };
    let source = match dataset_kind(&cfg)? {
        Some(DatasetKind::Mnist) if f.quick && data_dir.is_none() => DataSource::Embedded,
        Some(kind) => relprune_data::resolve_source(kind, data_dir)?,
        None => {
            let dir = data_dir
                .map(std::path::Path::to_path_buf)
                .or_else(|| std::env::var_os("RELPRUNE_CIFAR10_DIR").map(Into::into))
                .context(
                    "CIFAR-10 cannot be downloaded here: pass --data-dir DIR (or set \
                     RELPRUNE_CIFAR10_DIR) with the binary version's data_batch_1.bin .. \
                     data_batch_5.bin and test_batch.bin",
                )?;
            DataSource::Dir(dir)
        }
    };
    cfg.data_source = source.to_string();
    cfg.data_dir = match &source {
        DataSource::Dir(d) => Some(std::path::absolute(d)?),
        DataSource::Embedded => None,
    };
    run_config(cfg, &source, out, false)
}

/// Runs one configuration end to end, writing the model files into `out`; checkpoints every epoch
/// into `out/checkpoint`, and with `resume` continues from there.
pub fn run_config(
    cfg: Config,
    source: &DataSource,
    out: &Path,
    resume: bool,
) -> Result<RunResults> {
    let t0 = Instant::now();
    let device = Device::Cpu;
    let splits = load_splits(&cfg, source)?;
    let train_all = match cfg.train_limit {
        Some(n) => splits.train.take_first(n)?,
        None => splits.train,
    };
    let (mut train, mut valid) = train_all.split(cfg.n_valid, cfg.seed)?;
    let mut test = splits.test;
    let cifar = cfg.dataset == "cifar10";
    if cifar {
        // Per-channel normalization with the training split's statistics, for every split.
        let (mean, std) = train.channel_stats()?;
        train = train.normalize(&mean, &std)?;
        valid = valid.normalize(&mean, &std)?;
        test = test.normalize(&mean, &std)?;
    }
    eprintln!(
        "{}: {} from {source}: {} train, {} valid, {} test",
        cfg.experiment,
        cfg.dataset,
        train.len(),
        valid.len(),
        test.len()
    );
    let dataset = DatasetInfo {
        name: cfg.dataset.clone(),
        train: train.len(),
        valid: valid.len(),
        test: test.len(),
    };

    let varmap = VarMap::new();
    let model = Net::new(&cfg.model, &varmap, cfg.seed, &device)?;
    let params = ParamSet::from_varmap(&varmap, &cfg.selection)?;
    let masks = Masks::dense(&params)?;
    let sgd = SgdConfig {
        lr: cfg.dense_lr,
        momentum: cfg.momentum,
        nesterov: false,
    };
    let mut trainer = Trainer::new(params, masks, MaskedSgd::new(sgd, None)?)?;
    let mut task = ImageClassification::new(model, train, valid, test, cfg.batch_size, cfg.seed);
    if cfg.model != "lenet300" {
        // Convolutions' im2col buffers grow with the batch: keep them under glibc's mmap limit.
        task.eval_batch_size = if cifar { 50 } else { 250 };
    }
    if cifar {
        task.augment = Some(relprune_data::Augment::CIFAR10);
    } else if cfg.augment_shift > 0 {
        // Digits must not be mirrored: shifts only.
        task.augment = Some(relprune_data::Augment {
            pad: cfg.augment_shift,
            flip: false,
        });
    }
    // 1. The dense reference.
    run::start(
        &mut trainer,
        &mut task,
        &out.join(CHECKPOINT_DIR),
        &cfg,
        resume,
    )?;
    run::train_dense(&mut trainer, &mut task, cfg.dense_lr, cfg.dense_epochs)?;
    let dense = run::dense_reference(
        &mut trainer,
        &mut task,
        &out.join(DENSE_FILE),
        |trainer, task| Ok(trainer.evaluate(task, Split::Test)?.metric),
    )?;
    eprintln!(
        "dense: valid error {:.2}%, test error {:.2}%",
        dense.valid.metric, dense.test_metric
    );

    // 2. Prune: the method (regularize + iterative pruning) or a baseline, then fine-tune.
    let phase = prune_phase(&cfg, &mut trainer, &mut task)?;

    // 3. Judge the saved file, not the in-memory model: reload it and count its zeros.
    let (model, seed, batch_size) = (cfg.model.clone(), cfg.seed, cfg.batch_size);
    let mut files = OwnNames(|path: &Path, task: &mut ImageClassification<Net>| {
        let reloaded = VarMap::new();
        let fresh = Net::new(&model, &reloaded, seed.wrapping_add(1), &device)
            .map_err(|e| relprune_tasks::Error::Invalid(e.to_string()))?;
        relprune_models::checkpoint::load(&reloaded, path)?;
        let test = || task.test.clone();
        let mut judge = ImageClassification::new(fresh, test(), test(), test(), batch_size, 0);
        Ok(relprune_prune::Task::evaluate(&mut judge, Split::Test)?)
    });
    let finish = Finish {
        experiment: cfg.experiment.clone(),
        dataset,
        dense_metric: dense.test_metric,
        config: serde_json::to_value(&cfg)?,
        phase,
        out: out.to_path_buf(),
        dense_file: out.join(DENSE_FILE),
        sparse: true,
        layer_type: None,
        linear_group: false,
        tolerance: Some(1e-9),
        started: t0,
    };
    let mut results = relprune_tasks::finish(&mut trainer, &mut task, &mut files, finish)?;
    let extra = &mut results.extra;
    extra.insert("dense_valid_metric".into(), dense.valid.metric.into());
    extra.insert("data_source".into(), source.to_string().into());
    Ok(results)
}

fn prune_phase(
    cfg: &Config,
    trainer: &mut Trainer,
    task: &mut ImageClassification<Net>,
) -> Result<Phase> {
    let ft = Finetune {
        epochs: cfg.prune.finetune_epochs,
        lr: cfg.prune.finetune_lr,
    };
    let budget = cfg.prune.max_epochs;
    let mut extra = serde_json::Map::new();
    extra.insert("method".into(), cfg.method.name().into());
    let baseline = match cfg.method {
        Method::Selective => {
            let mut phase = run::prune(trainer, task, &cfg.prune)?;
            phase.extra.extend(extra);
            return Ok(phase);
        }
        // Every baseline gets the method's budget: `max_epochs` of pruning-phase training, then the
        // same fine-tune.
        Method::OneShot => {
            let long = Finetune {
                epochs: budget + ft.epochs,
                ..ft
            };
            baselines::one_shot_magnitude(trainer, task, cfg.baseline_sparsity, long)?
        }
        Method::Gmp => {
            let (steps, every) = (10, (budget / 9).max(1));
            let sp = cfg.baseline_sparsity;
            baselines::gradual_magnitude(trainer, task, sp, steps, every, cfg.prune.lr, ft)?
        }
        Method::Han => {
            let (rounds, retrain) = (5, (budget / 4).max(1));
            baselines::han_iterative(trainer, task, 0.5, rounds, retrain, cfg.prune.lr, ft)?
        }
        Method::Snip => {
            // SNIP prunes at initialization: start again from the initial weights, prune, train.
            let fresh = VarMap::new();
            Net::new(&cfg.model, &fresh, cfg.seed, &Device::Cpu)?;
            let inits = relprune_prune::Snapshot(
                fresh
                    .data()
                    .lock()
                    .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
                    .iter()
                    .map(|(name, v)| Ok((name.clone(), v.as_tensor().copy()?)))
                    .collect::<Result<_>>()?,
            );
            let t0 = Instant::now();
            let steps = trainer.once("snip prune", |trainer| {
                trainer.params.restore(&inits)?;
                trainer.masks = Masks::dense(&trainer.params)?;
                let steps = baselines::snip(trainer, task, cfg.baseline_sparsity, 10)?;
                trainer.optim.reset_state();
                Ok(steps)
            })?;
            let epochs = budget + ft.epochs;
            let schedule = LrSchedule::Cosine {
                lr: cfg.dense_lr,
                epochs,
            };
            trainer.fit(task, schedule, epochs, false, "snip train")?;
            let valid = trainer.evaluate(task, Split::Valid)?;
            baselines::BaselineOutcome {
                method: "snip".into(),
                steps,
                before_finetune: valid,
                after_finetune: valid,
                epochs,
                seconds: t0.elapsed().as_secs_f64(),
            }
        }
    };
    let rounds = baseline
        .steps
        .iter()
        .enumerate()
        .map(|(i, (epoch, remaining, e))| RoundRecord {
            round: i + 1,
            epoch: *epoch,
            threshold: f64::NAN,
            remaining_pct: *remaining,
            val_loss: e.loss,
            val_metric: e.metric,
        })
        .collect();
    extra.insert("pruning_epochs".into(), baseline.epochs.into());
    extra.insert(
        "valid_before_finetune".into(),
        serde_json::to_value(baseline.before_finetune)?,
    );
    extra.insert(
        "valid_after_finetune".into(),
        serde_json::to_value(baseline.after_finetune)?,
    );
    Ok(Phase { rounds, extra })
}

#[cfg(test)]
mod tests {
    use super::*;
    use relprune_eval::SparsityReport;
    use relprune_prune::export;

    /// A run small enough for a test: 2,000 embedded images, a few epochs.
    fn tiny_config() -> Config {
        let mut cfg = Config::new(true);
        cfg.train_limit = Some(2000);
        cfg.n_valid = 400;
        cfg.dense_epochs = 3;
        cfg.prune.max_epochs = 8;
        cfg.prune.patience = 1;
        cfg.prune.finetune_epochs = 1;
        cfg.prune.delta = 5.0;
        cfg
    }

    #[test]
    fn a_small_reproduction_writes_a_model_file_that_holds_what_results_json_claims() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let results = run_config(tiny_config(), &DataSource::Embedded, out, false).unwrap();
        crate::reproduce::write_outputs(&results, out).unwrap();
        for f in [
            "results.json",
            "report.md",
            "model.safetensors",
            "model.sparse.safetensors",
            "dense.safetensors",
        ] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        let back = RunResults::read_json(&out.join("results.json")).unwrap();
        assert_eq!(back.experiment, "lenet300-mnist");
        assert_eq!(back.dataset.train + back.dataset.valid, 2000);
        assert!(
            back.pruned.remaining_pct < 100.0,
            "nothing was pruned: {:?}",
            back.rounds
        );
        assert!(!back.rounds.is_empty());

        // The model file holds exactly the non-zeros results.json claims, layer by layer.
        let names: Vec<String> = back.layers.iter().map(|l| l.name.clone()).collect();
        assert_eq!(names, ["fc1.weight", "fc2.weight", "fc3.weight"]);
        let in_file =
            SparsityReport::from_safetensors(&out.join(&back.model_file), &names).unwrap();
        assert_eq!(in_file.layers, back.layers);
        assert_eq!(in_file.total().nonzero, back.pruned.nonzero);
        assert_eq!(in_file.total().params, 266_200);

        // Reloading the model file and evaluating it gives the reported test error.
        let vm = VarMap::new();
        let net = Lenet300::new(&vm, 99, &Device::Cpu).unwrap();
        relprune_models::checkpoint::load(&vm, &out.join(&back.model_file)).unwrap();
        let splits = relprune_data::load(DatasetKind::Mnist, &DataSource::Embedded).unwrap();
        let t = splits.test.clone();
        let task = ImageClassification::new(net, t.clone(), t.clone(), t, 100, 0);
        let e = task.evaluate_on(&task.test).unwrap();
        assert!(
            (e.metric - back.pruned.value).abs() < 1e-9,
            "{} vs {}",
            e.metric,
            back.pruned.value
        );

        // The sparse format decodes to the same weights.
        let sparse =
            export::load_sparse(&out.join("model.sparse.safetensors"), &Device::Cpu).unwrap();
        let dense =
            candle_core::safetensors::load(out.join(&back.model_file), &Device::Cpu).unwrap();
        for (k, v) in dense {
            let a: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = sparse[&k].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{k}");
        }
        assert!(back.sizes_bytes.sparse_format < back.sizes_bytes.pruned_safetensors);
        assert!(back.sizes_bytes.pruned_gzip < back.sizes_bytes.dense_safetensors);
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("fc1.weight"));

        // `--resume` on the finished run reads the configuration back from the checkpoint and
        // gives the same results without training again.
        use clap::Parser;
        let cli = crate::flags::Xtask::parse_from([
            "cargo xtask",
            "reproduce",
            "lenet300-mnist",
            "--resume",
            out.to_str().unwrap(),
        ]);
        let crate::flags::Cmd::Reproduce(f) = cli.cmd else {
            panic!("not a reproduce command")
        };
        let again = run("lenet300-mnist", &f, out).unwrap();
        assert_eq!(again.pruned.value, back.pruned.value);
        assert_eq!(again.layers, back.layers);
        assert_eq!(again.dense.value, back.dense.value);
        assert_eq!(again.rounds.len(), back.rounds.len());
    }

    #[test]
    fn lenet5_prunes_its_conv_and_fc_weights_end_to_end_and_the_file_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::preset("lenet5-mnist", true).unwrap();
        cfg.train_limit = Some(600);
        cfg.n_valid = 100;
        cfg.dense_epochs = 2;
        cfg.prune.max_epochs = 2;
        cfg.prune.patience = 1;
        // Every epoch counts as a plateau, so the short run prunes.
        cfg.prune.min_improvement = 0.99;
        cfg.prune.finetune_epochs = 1;
        cfg.prune.delta = 100.0;
        let r = run_config(cfg, &DataSource::Embedded, dir.path(), false).unwrap();
        let names: Vec<&str> = r.layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
        );
        assert_eq!(r.pruned.params, 500 + 25_000 + 400_000 + 5_000);
        assert!(r.pruned.remaining_pct < 100.0, "{:?}", r.rounds);
        assert!(r.layers.iter().all(|l| l.nonzero <= l.params));
    }

    #[test]
    fn the_full_lenet5_mnist_preset_is_the_recorded_recipe_and_fashion_keeps_its_own() {
        let m = Config::preset("lenet5-mnist", false).unwrap();
        assert_eq!(m.augment_shift, 2);
        assert_eq!(m.prune.delta, 0.8);
        assert_eq!(m.prune.target_sparsity, Some(0.992));
        assert_eq!(m.prune.max_epochs, 400);
        for (name, quick) in [("lenet5-fashion", false), ("lenet5-mnist", true)] {
            let c = Config::preset(name, quick).unwrap();
            assert_eq!(c.augment_shift, 0, "{name}");
            assert_eq!(c.prune.target_sparsity, None, "{name}");
        }
    }

    #[test]
    fn augment_shift_changes_what_the_dense_model_learns() {
        let dense = |shift: usize| {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = tiny_config();
            cfg.dense_epochs = 1;
            cfg.prune.max_epochs = 1;
            cfg.prune.finetune_epochs = 0;
            cfg.augment_shift = shift;
            run_config(cfg, &DataSource::Embedded, dir.path(), false).unwrap();
            std::fs::read(dir.path().join("dense.safetensors")).unwrap()
        };
        let plain = dense(0);
        assert_eq!(plain, dense(0), "runs are not deterministic");
        assert_ne!(plain, dense(2));
    }

    /// A CIFAR-10 directory in the real binary format: `per_batch` images per training batch.
    fn fake_cifar(dir: &Path, per_batch: usize) {
        let mut k = 0u32;
        let mut batch = |n: usize| {
            let mut images = Vec::with_capacity(n * 3072);
            let mut labels = Vec::with_capacity(n);
            for _ in 0..n {
                let label = (k % 10) as u8;
                for p in 0..3072u32 {
                    // A class-dependent pattern plus noise, so something can be learned.
                    let v = (p * 7 + k * 13) % 61
                        + if (p / 32) % 10 == label as u32 {
                            150
                        } else {
                            0
                        };
                    images.push(v.min(255) as u8);
                }
                labels.push(label);
                k += 1;
            }
            (images, labels)
        };
        for name in relprune_data::cifar::TRAIN_BATCHES {
            let (i, l) = batch(per_batch);
            relprune_data::write_cifar_batch(&dir.join(name), &i, &l).unwrap();
        }
        let (i, l) = batch(per_batch);
        relprune_data::write_cifar_batch(&dir.join(relprune_data::cifar::TEST_BATCH), &i, &l)
            .unwrap();
    }

    #[test]
    fn cifar_entries_run_end_to_end_on_files_in_the_real_format() {
        let data = tempfile::tempdir().unwrap();
        fake_cifar(data.path(), 40);
        for (experiment, limit) in [("resnet32-cifar10", 100), ("vgg16-cifar10", 60)] {
            let out = tempfile::tempdir().unwrap();
            let mut cfg = Config::preset(experiment, true).unwrap();
            cfg.train_limit = Some(limit);
            cfg.n_valid = 20;
            cfg.batch_size = 20;
            cfg.dense_epochs = 1;
            cfg.prune.max_epochs = 2;
            cfg.prune.min_improvement = 0.99;
            cfg.prune.finetune_epochs = 1;
            cfg.prune.delta = 100.0;
            let source = DataSource::Dir(data.path().to_path_buf());
            let r = run_config(cfg, &source, out.path(), false).unwrap();
            assert_eq!(r.dataset.name, "cifar10");
            assert_eq!(r.dataset.test, 40);
            assert!(
                r.pruned.remaining_pct < 100.0,
                "{experiment}: {:?}",
                r.rounds
            );
            // Only conv and linear weights are pruned; batch-norm parameters are not.
            assert!(r
                .layers
                .iter()
                .all(|l| l.name.ends_with("weight") && !l.name.contains("bn")));
            // (run_config itself checks that the reloaded model file, batch-norm statistics
            // included, gives the in-memory model's test error.)
        }
        // Without a directory the error says what to do.
        let cli = {
            use clap::Parser;
            crate::flags::Xtask::parse_from([
                "cargo xtask",
                "reproduce",
                "resnet32-cifar10",
                "--quick",
            ])
        };
        let crate::flags::Cmd::Reproduce(f) = cli.cmd else {
            panic!("not a reproduce command")
        };
        if std::env::var_os("RELPRUNE_CIFAR10_DIR").is_none() {
            let err = run("resnet32-cifar10", &f, tempfile::tempdir().unwrap().path())
                .unwrap_err()
                .to_string();
            assert!(err.contains("--data-dir"), "{err}");
        }
    }

    #[test]
    fn target_sparsity_mode_prunes_exactly_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config();
        cfg.prune.target_sparsity = Some(0.6);
        cfg.prune.delta = 100.0;
        let results = run_config(cfg, &DataSource::Embedded, dir.path(), false).unwrap();
        let want = (0.4 * 266_200f64).round() as usize;
        assert_eq!(
            results.pruned.nonzero,
            want,
            "{:?}",
            results.extra.get("stop_reason")
        );
        assert_eq!(results.extra["stop_reason"], "target_sparsity");
    }

    #[test]
    fn every_baseline_runs_end_to_end_and_reaches_its_sparsity() {
        for (method, sparsity) in [
            (Method::OneShot, 0.9),
            (Method::Gmp, 0.8),
            (Method::Han, f64::NAN),
            (Method::Snip, 0.9),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = tiny_config();
            cfg.method = method;
            cfg.baseline_sparsity = sparsity;
            let r = run_config(cfg, &DataSource::Embedded, dir.path(), false).unwrap();
            let method = method.name();
            assert_eq!(r.extra["method"], method);
            assert!(!r.rounds.is_empty(), "{method}");
            if sparsity.is_finite() {
                let want = ((1.0 - sparsity) * 266_200f64).round() as usize;
                assert_eq!(r.pruned.nonzero, want, "{method}");
            } else {
                assert!(
                    r.pruned.remaining_pct < 90.0,
                    "{method}: {}",
                    r.pruned.remaining_pct
                );
            }
            assert!(
                r.pruned.value < 50.0,
                "{method} did not learn: {}",
                r.pruned.value
            );
        }
    }
}
