//! `relprune embed`: sentence embeddings as sentence-transformers computes them for encoders
//! such as all-MiniLM-L6-v2: tokenize with the model's `tokenizer.json`, run the encoder on
//! padded batches of similar lengths, mean-pool over the real tokens, L2-normalize.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use relprune_data::text::{read_lines, truncate_keeping_last, TextTokenizer};
use relprune_models::hf::bert::BertModel;
use relprune_models::hf::{detect_kind, Kind};
use relprune_tasks::Sentences;

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
    detect_kind(&args.model, Kind::Encoder)?;
    let mut model = BertModel::load(&args.model, &Device::Cpu)?;
    if args.sparse {
        model = model.to_sparse()?;
    }
    let tokenizer = TextTokenizer::from_file(&args.model.join("tokenizer.json"))?;
    tokenizer
        .check_vocab(model.config().vocab_size)
        .context("the tokenizer does not fit the model")?;
    let max_len = model.max_input_length(&args.model)?;
    let lines = read_lines(&args.text).context("text file")?;
    if lines.is_empty() {
        bail!("text file {} has no lines", args.text.display());
    }
    let ids = lines
        .iter()
        .map(|s| Ok(truncate_keeping_last(tokenizer.encode(s)?, max_len)))
        .collect::<Result<Vec<_>>>()?;
    // Padded positions are masked out, so any valid id will do when the vocabulary has no pad.
    let pad = tokenizer
        .pad_id()
        .or(model.config().pad_token_id)
        .unwrap_or(0);
    let sentences = Sentences::new(ids, args.batch_size, 0);
    let hidden = indicatif::ProgressBar::hidden();
    let embeddings = relprune_tasks::encoder::embed(&model, &sentences, pad, &hidden)?;
    let json = serde_json::json!({ "embeddings": embeddings.to_vec2::<f32>()? });
    relprune_io::write(&args.out, serde_json::to_string(&json)?.as_bytes())?;
    Ok(())
}
