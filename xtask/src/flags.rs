//! Command-line flags of `cargo xtask`, parsed in one place.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use relprune_tasks::{EngineArgs, Method};

/// relprune's task runner.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about)]
pub struct Xtask {
    /// Threads for tensor kernels (sets RAYON_NUM_THREADS/CANDLE_NUM_THREADS unless already set).
    #[arg(long, global = true, value_parser = relprune_tasks::options::parse_count)]
    pub threads: Option<usize>,
    /// The task to run.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Parses `cargo xtask`'s arguments, recording which `reproduce` flags were given.
pub fn parse_from<I, T>(args: I) -> Result<Xtask, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let matches = Xtask::command().try_get_matches_from(args)?;
    let mut flags = Xtask::from_arg_matches(&matches)?;
    if let (Cmd::Reproduce(f), Some(("reproduce", m))) = (&mut flags.cmd, matches.subcommand()) {
        f.given = relprune_tasks::options::given_ids(m);
    }
    Ok(flags)
}

/// The tasks.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Regenerate a paper-style result: train dense, regularize and prune, report.
    Reproduce(Box<Reproduce>),
    /// Time training epochs against the PyTorch reference.
    Bench(Bench),
    /// Rebuild the embedded MNIST subset of relprune-data from a real MNIST directory.
    EmbedMnist(EmbedMnist),
    /// Kill a reproduction at random moments (SIGKILL), resume it each time, and check the
    /// models against an uninterrupted run byte for byte.
    KillResume(KillResume),
    /// Fuzz every parser of user files (or one): no input may panic.
    Fuzz(Fuzz),
    /// Run every regularizer variant and baseline on one budget and write docs/ABLATION.md.
    Ablate(Ablate),
    /// Measure where sparse products beat dense ones and write the dispatch table.
    Crossover(Crossover),
    /// Prune a decoder LM with the one-shot baselines and compare perplexities with the anchors.
    LlmBaselines(LlmBaselines),
    /// Record finished full runs and regenerate docs/RESULTS.md from every recorded run.
    Results(Results),
    /// Time a CIFAR-10 training epoch of ResNet-32 and VGG-16 on this machine.
    CifarEpoch(CifarEpoch),
}

/// Flags of `results`.
#[derive(Debug, clap::Args)]
pub struct Results {
    /// First record this finished full run (its results.json, report.md and plots, once its
    /// counts are checked against its model file) as DIR/<experiment>; repeatable.
    #[arg(long, value_name = "RUN_DIR")]
    pub record: Vec<PathBuf>,
    /// With one --record: record it as <experiment>-LABEL, a probe beside the headline run.
    #[arg(long)]
    pub label: Option<String>,
    /// The recorded runs.
    #[arg(long, default_value = crate::results::RECORDS)]
    pub dir: PathBuf,
    /// The table to write.
    #[arg(long, default_value = crate::results::TABLE)]
    pub out: PathBuf,
    /// Only check that --out is what the records give (an error if not); write nothing.
    #[arg(long)]
    pub check: bool,
}

/// A CIFAR-10 model of the reproductions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CifarModel {
    /// ResNet-32 (option-A shortcuts).
    Resnet32,
    /// VGG-16 with batch norm.
    Vgg16,
}

impl CifarModel {
    /// The reproduction whose full configuration the timed step follows.
    pub fn experiment(self) -> &'static str {
        match self {
            Self::Resnet32 => "resnet32-cifar10",
            Self::Vgg16 => "vgg16-cifar10",
        }
    }
}

/// Flags of `cifar-epoch`.
#[derive(Debug, clap::Args)]
pub struct CifarEpoch {
    /// The models to time.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["resnet32", "vgg16"])]
    pub models: Vec<CifarModel>,
    /// Training images to time (an epoch is 45,000): a few batches of 128 give a steady figure.
    #[arg(long, default_value_t = 1280, value_parser = relprune_tasks::options::parse_count)]
    pub images: usize,
    /// Where to write the times (JSON; docs/RESULTS.md reads them from results/).
    #[arg(long, default_value = "results/cifar-epochs.json")]
    pub out: PathBuf,
}

/// Flags of `llm-baselines`.
#[derive(Debug, clap::Args)]
pub struct LlmBaselines {
    /// The model (Hugging Face directory, GGUF file or a directory holding one).
    #[arg(long, default_value = "../shared/models/SmolLM2-135M-Instruct-Q4_1")]
    pub model: PathBuf,
    /// The anchor figures and calibration windows.
    #[arg(long, default_value = "../shared/anchors/smollm2-pruning.json")]
    pub anchors: PathBuf,
    /// Calibration text.
    #[arg(long, default_value = "../shared/data/debian-reference-en/calib.txt")]
    pub calib: PathBuf,
    /// Evaluation text.
    #[arg(long, default_value = "../shared/data/debian-reference-en/valid.txt")]
    pub valid: PathBuf,
    /// Methods (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "magnitude,wanda,sparsegpt,relprune"
    )]
    pub methods: Vec<relprune_hf::llm::Method>,
    /// Patterns (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "unstructured,2:4")]
    pub patterns: Vec<relprune_hf::llm::Pattern>,
    /// The unstructured sparsity.
    #[arg(long, default_value_t = 0.5, value_parser = relprune_tasks::options::parse_sparsity)]
    pub sparsity: f64,
    /// Where `llm.json` and `llm.md` go.
    #[arg(long, default_value = "target/llm")]
    pub out: PathBuf,
    /// Also each unstructured row with OWL's layer sparsities (rows named `METHOD+owl`).
    #[arg(long)]
    pub owl: bool,
    /// The method's starting masks.
    #[arg(long, default_value = "sparsegpt")]
    pub start: relprune_hf::llm::OneShot,
    /// The method: the sparsity the regularizer chooses rather than the baseline.
    #[arg(long, default_value_t = relprune_hf::llm::Distill::default().head_start)]
    pub head_start: f64,
    /// The method: passes with the selective decay per layer.
    #[arg(long, default_value_t = relprune_hf::llm::Distill::default().regularized_epochs)]
    pub regularized_epochs: usize,
    /// The method: passes of recovery per layer.
    #[arg(long, default_value_t = relprune_hf::llm::Distill::default().recovery_epochs)]
    pub recovery_epochs: usize,
    /// The method: Adam's learning rate.
    #[arg(long, default_value_t = relprune_hf::llm::Distill::default().lr)]
    pub lr: f64,
    /// The method: the decay strength λ.
    #[arg(long, default_value_t = relprune_hf::llm::Distill::default().regularizer.lambda)]
    pub lambda: f64,
    /// Magnitude's and Wanda's unstructured comparison group, other than their own (rows named
    /// `METHOD+SCOPE`).
    #[arg(long, value_enum)]
    pub scope: Option<relprune_hf::llm::Scope>,
    /// The method: passes of its end-to-end stage per group of layers (0: off; the rows are
    /// then named `relprune+e2e`).
    #[arg(long, default_value_t = 0)]
    pub end_to_end_epochs: usize,
    /// The method's end-to-end stage: Adam's learning rate.
    #[arg(long, default_value_t = relprune_hf::llm::EndToEnd::default().lr)]
    pub end_to_end_lr: f64,
    /// The method's end-to-end stage: decoder layers trained together.
    #[arg(long, default_value_t = relprune_hf::llm::EndToEnd::default().group)]
    pub end_to_end_group: usize,
}

/// Flags of `crossover`.
#[derive(Debug, clap::Args)]
pub struct Crossover {
    /// Outputs of the layer measured.
    #[arg(long, default_value_t = 3072)]
    pub rows: usize,
    /// Inputs of the layer measured.
    #[arg(long, default_value_t = 768)]
    pub cols: usize,
    /// How much faster sparse must be to be chosen (0.05: by 5%).
    #[arg(long, default_value_t = 0.05)]
    pub margin: f64,
    /// Interleaved rounds per grid point (the median counts).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The largest batch measured.
    #[arg(long, default_value_t = 8192)]
    pub max_batch: usize,
    /// The table to update (this thread count's points replaced, others kept).
    #[arg(long, default_value = "crates/relprune-sparse/crossover.tsv")]
    pub out: PathBuf,
    /// Where the report (`crossover-<N>threads.md`) goes.
    #[arg(long, default_value = "target/bench")]
    pub report_dir: PathBuf,
}

/// Flags of `ablate`.
#[derive(Debug, clap::Args)]
pub struct Ablate {
    /// The experiment (only lenet300-mnist so far).
    #[arg(default_value = "lenet300-mnist")]
    pub experiment: String,
    /// Dataset directory (else $RELPRUNE_DATA_DIR, else ../shared/data/mnist).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where each variant's run goes (finished runs are reused, interrupted ones resumed).
    #[arg(long, default_value = "target/ablate")]
    pub out: PathBuf,
    /// The Markdown report (with the plot beside it).
    #[arg(long, default_value = "docs/ABLATION.md")]
    pub report: PathBuf,
    /// Epoch budget of every variant's pruning phase (the fine-tune comes on top).
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Runs at a time (each on one thread).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Only these variants (comma-separated names; see --list).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// List the variants and exit.
    #[arg(long)]
    pub list: bool,
    /// Only rebuild the report from the finished runs.
    #[arg(long)]
    pub report_only: bool,
}

/// Flags of `reproduce`.
#[derive(Debug, clap::Args)]
pub struct Reproduce {
    /// The experiment (see `--list`).
    pub experiment: Option<String>,
    /// List the experiments and exit.
    #[arg(long)]
    pub list: bool,
    /// Run every experiment (into OUT/NAME, OUT = --out or target/reproduce) and write
    /// OUT/summary.md beside the published anchors.
    #[arg(long)]
    pub all: bool,
    /// The quick configuration: the embedded data subset and a small epoch budget (minutes).
    #[arg(long)]
    pub quick: bool,
    /// Dataset directory (else $RELPRUNE_DATA_DIR, else the dataset's default); with --all, the
    /// MNIST directory (Fashion-MNIST then comes from its default).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// With --all, the CIFAR-10 directory (binary batches) for the CIFAR entries; without it
    /// (and without $RELPRUNE_CIFAR10_DIR) they are reported as skipped.
    #[arg(long)]
    pub cifar_dir: Option<PathBuf>,
    /// Output directory (default target/reproduce/<experiment>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of initialization, split and shuffling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the dense phase's epoch count.
    #[arg(long, value_parser = relprune_tasks::options::parse_count)]
    pub dense_epochs: Option<usize>,
    /// Use only the first N training images (before the validation split).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Stop the selective method once this fraction of the weights is pruned (the last round
    /// lands on it exactly); 0 removes the experiment's own target.
    #[arg(long, value_name = "S", value_parser = relprune_tasks::options::parse_sparsity)]
    pub stop_at_sparsity: Option<f64>,
    /// The pruning method: the method (selective), or a baseline: one-shot (magnitude, then
    /// fine-tune), gmp (gradual magnitude, cubic schedule), han (iterative prune and retrain), snip.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// transformer-gettext-en-de: start from the dense model an earlier run wrote into DIR
    /// (`dense.safetensors`, `tokenizer.json`) and skip the dense phase.
    #[arg(long, value_name = "DIR")]
    pub dense_from: Option<std::path::PathBuf>,
    /// Train MNIST / Fashion-MNIST entries on images shifted at random by up to N pixels
    /// (zero padding, then a crop; seeded); CIFAR-10 entries always use pad 4 and flips.
    #[arg(long, value_name = "N")]
    pub augment_shift: Option<usize>,
    /// Target sparsity (fraction pruned) of the one-shot, gmp and snip baselines.
    #[arg(long, value_parser = relprune_tasks::options::parse_sparsity)]
    pub sparsity: Option<f64>,
    /// Continue the interrupted run whose output directory is DIR (its configuration comes from
    /// DIR/checkpoint; the other flags are ignored).
    #[arg(long, value_name = "DIR", conflicts_with = "overwrite")]
    pub resume: Option<PathBuf>,
    /// Start over in an output directory that holds an earlier run (it is cleared first; a
    /// directory relprune did not write is never cleared). Without it, such a directory is an
    /// error.
    #[arg(long)]
    pub overwrite: bool,
    /// Once the run is over (every run, with --all), record it in results/ and regenerate
    /// docs/RESULTS.md (`cargo xtask results`); full configurations only.
    #[arg(long, conflicts_with = "quick")]
    pub record: bool,
    /// The engine's settings, over the experiment's preset.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Which of these flags the command line gave (argument ids), for `--resume` to say which
    /// it applied and which it ignored.
    #[arg(skip)]
    pub given: Vec<String>,
}

/// Flags of `kill-resume`.
#[derive(Debug, clap::Args)]
pub struct KillResume {
    /// SIGKILLs to send in all.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub kills: u64,
    /// The experiment (run with --quick).
    #[arg(long, default_value = "lenet300-mnist")]
    pub experiment: String,
    /// Where the reference and the interrupted runs go, and kill-resume.{md,json}.
    #[arg(long, default_value = "target/kill-resume")]
    pub out: PathBuf,
    /// Seed of the kill times.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// More `reproduce` flags for both runs (after `--`), e.g. `-- --prune-epochs 20`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Flags of `fuzz`.
#[derive(Debug, clap::Args)]
pub struct Fuzz {
    /// Only this target (default: every target in turn).
    #[arg(value_enum)]
    pub target: Option<crate::fuzz::Target>,
    /// Executions per target.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub execs: u64,
    /// Most seconds per target (it stops at --execs or here, whichever comes first).
    #[arg(long, value_name = "S", default_value_t = 600.0, value_parser = relprune_tasks::options::parse_positive)]
    pub time: f64,
    /// Seed of the mutations (a run is reproducible up to its time limit).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where fuzz.md and fuzz.json go.
    #[arg(long, default_value = "target/fuzz")]
    pub out: PathBuf,
}

/// Flags of `bench`.
#[derive(Debug, clap::Args)]
pub struct Bench {
    /// A Python virtual environment with PyTorch (see ../shared/bench/setup_torch.sh; the
    /// minilm-embed task also needs sentence-transformers in it).
    #[arg(long)]
    pub torch_venv: Option<PathBuf>,
    /// The PyTorch reference script of the training tasks.
    #[arg(long, default_value = "../shared/bench/torch_reference.py")]
    pub torch_script: PathBuf,
    /// The PyTorch reference of the step tasks (transformer-step, minilm-distill-step,
    /// smollm2-block-step).
    #[arg(long, default_value = "xtask/bench/torch_train_steps.py")]
    pub torch_steps_script: PathBuf,
    /// The gettext-en-de corpus transformer-step takes its batches from.
    #[arg(long, default_value = "../shared/data/gettext-en-de")]
    pub gettext: PathBuf,
    /// The checkpoint minilm-distill-step trains.
    #[arg(long, default_value = "../shared/models/all-MiniLM-L6-v2")]
    pub minilm: PathBuf,
    /// The decoder LM smollm2-block-step trains a layer of (Hugging Face directory, GGUF file or
    /// a directory holding one, with config.json and tokenizer.json beside it).
    #[arg(long, default_value = "../shared/models/SmolLM2-135M-Instruct-Q4_1")]
    pub smollm2: PathBuf,
    /// The text minilm-distill-step takes its sentences from (its first lines) and
    /// smollm2-block-step its 512-token windows.
    #[arg(long, default_value = "../shared/data/debian-reference-en/calib.txt")]
    pub calib_text: PathBuf,
    /// Training steps per round of the step tasks.
    #[arg(long, default_value_t = 20, value_parser = relprune_tasks::options::parse_count)]
    pub steps: usize,
    /// The PyTorch script of the inference tasks.
    #[arg(long, default_value = "scripts/torch_infer.py")]
    pub torch_infer_script: PathBuf,
    /// MNIST directory (else $RELPRUNE_DATA_DIR, else ../shared/data/mnist).
    #[arg(long)]
    pub mnist: Option<PathBuf>,
    /// Interleaved rounds (the median of the per-round ratios is reported).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Output directory for bench.json and bench.md.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Only these tasks (comma-separated). Training: lenet300-epoch, lenet300-swd-epoch,
    /// lenet5-epoch (the default set), transformer-step, minilm-distill-step,
    /// smollm2-block-step; inference: layer, lenet300-infer,
    /// lenet5-infer, minilm-embed.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// The LeNet-300-100 reproduction whose model.safetensors lenet300-infer runs.
    #[arg(long, default_value = "target/reproduce/lenet300-mnist")]
    pub lenet300: PathBuf,
    /// The LeNet-5 reproduction whose model.safetensors lenet5-infer runs.
    #[arg(long, default_value = "target/reproduce/lenet5-mnist")]
    pub lenet5: PathBuf,
    /// The translation reproduction (`reproduce transformer-gettext-en-de`) whose pruned model
    /// translate-greedy runs.
    #[arg(long, default_value = "target/reproduce/transformer-gettext-en-de")]
    pub translation: PathBuf,
    /// The pruned MiniLM directories (prune-hf outputs) minilm-embed runs (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub minilm_pruned: Vec<PathBuf>,
    /// The text minilm-embed takes its 1,000 sentences from: every 20th line of 8–32 words.
    #[arg(long, default_value = "../shared/data/gettext-en-de/train.en")]
    pub sentences: PathBuf,
}

/// Flags of `embed-mnist`.
#[derive(Debug, clap::Args)]
pub struct EmbedMnist {
    /// The real MNIST directory.
    #[arg(long, default_value = "../shared/data/mnist")]
    pub mnist: PathBuf,
    /// Training images to keep.
    #[arg(long, default_value_t = 10_000)]
    pub train: usize,
    /// Test images to keep.
    #[arg(long, default_value_t = 2_000)]
    pub test: usize,
}
