//! `relprune perplexity`: perplexity of a text file under a decoder-only LM (a Hugging Face
//! directory, a GGUF file or a directory holding one), by the protocol of
//! [`relprune_tasks::lm`]: non-empty lines joined with a blank line, no special tokens,
//! non-overlapping windows.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use relprune_tasks::lm;

/// The window when `--window` is not given (the pruning literature's, and the anchors').
const DEFAULT_WINDOW: usize = 512;

/// Arguments of `relprune perplexity`.
#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// The model: a directory (`config.json`, `model.safetensors`, `tokenizer.json`), a GGUF
    /// file with `tokenizer.json` beside it, or a directory holding both.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The text (UTF-8); its non-empty lines are joined with a blank line.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Tokens per window (each window is scored alone); default 512, or the model's positions
    /// if it has fewer.
    #[arg(long, value_name = "N")]
    pub window: Option<usize>,
    /// Print `{"perplexity": …, "tokens": …, …}` instead of a sentence.
    #[arg(long)]
    pub json: bool,
    /// Run the pruned layers sparse (their zeros left out; per batch, sparse or dense, whichever
    /// the measured crossover table says is faster).
    #[arg(long)]
    pub sparse: bool,
}

/// Runs `relprune perplexity`.
pub fn run(args: &PerplexityArgs) -> Result<()> {
    if args.window.is_some_and(|w| w < 2) {
        bail!("--window must be at least 2 (a window predicts all but its first token)");
    }
    if !args.text.is_file() {
        bail!("--text {}: no such file", args.text.display());
    }
    let tokenizer = crate::causal::tokenizer(&args.model, "perplexity")?;
    let tokens = lm::text_tokens(&args.text, &tokenizer)?;
    let model = crate::causal::load(&args.model, args.sparse, &tokenizer)?;
    let window = args
        .window
        .unwrap_or(DEFAULT_WINDOW.min(model.config().max_position_embeddings));
    let bar = ProgressBar::new(tokens.len().div_ceil(window) as u64);
    bar.set_style(
        ProgressStyle::with_template("perplexity {bar:30} {pos}/{len} windows {elapsed}")
            .context("progress bar template")?,
    );
    let result = lm::perplexity(&model, &tokens, window, |done, _| {
        bar.set_position(done as u64)
    })
    .with_context(|| format!("perplexity of {}", args.text.display()))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "perplexity {:.4} over {} tokens ({} predicted, windows of {})",
            result.perplexity, result.tokens, result.predicted_tokens, result.window
        );
    }
    Ok(())
}
