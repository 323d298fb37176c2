//! `relprune embed`: sentence embeddings as sentence-transformers computes them for encoders
//! such as all-MiniLM-L6-v2: tokenize with the model's `tokenizer.json`, run the encoder on
//! padded batches of similar lengths, mean-pool over the real tokens, L2-normalize.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use relprune_data::text::read_lines;
use relprune_tasks::encoder::Embedder;

/// Arguments of `relprune embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The model directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The sentences, one per line (UTF-8).
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Where to write `{"embeddings": [[...], ...]}`, one row per input line, in order.
    #[arg(long, value_name = "OUT.json")]
    pub out: PathBuf,
    /// Sentences per forward pass.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub batch_size: usize,
    /// Run the pruned layers sparse (their zeros left out; per batch, sparse or dense, whichever
    /// the measured crossover table says is faster).
    #[arg(long)]
    pub sparse: bool,
}

/// Runs `relprune embed`.
pub fn run(args: &EmbedArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let embedder = Embedder::load(&args.model, args.sparse)?;
    let lines = read_lines(&args.text).context("text file")?;
    if lines.is_empty() {
        bail!("text file {} has no lines", args.text.display());
    }
    let (embeddings, cut) = embedder.embed_counting_cuts(&lines, args.batch_size)?;
    crate::output::report_cuts(cut, lines.len(), embedder.max_len());
    let json = serde_json::json!({
        "embeddings": crate::output::finite_rows2("embeddings", &embeddings)?
    });
    relprune_io::write(&args.out, serde_json::to_string(&json)?.as_bytes())?;
    Ok(())
}
