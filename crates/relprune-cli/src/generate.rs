//! `relprune generate`: continues prompts with a Hugging Face decoder-only LM (Llama, Mistral,
//! Qwen2, Qwen3): tokenize with the directory's `tokenizer.json` (special tokens added as
//! `transformers` adds them), decode left-padded batches greedily or by temperature / top-p
//! sampling with the key/value cache, print each continuation.

use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use relprune_data::text::split_lines;
use relprune_models::hf::llama::SampleConfig;

/// Arguments of `relprune generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model: a directory (`config.json`, `model.safetensors`, `tokenizer.json`), a GGUF
    /// file with `tokenizer.json` beside it, or a directory holding both.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// A prompt (repeatable); without any, each line of stdin is one.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Vec<String>,
    /// Most tokens generated per prompt.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0: greedy; above: sample from the softmax of logits / temperature.
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: sample only from the most likely tokens whose probabilities sum to P.
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampler.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Prompts decoded together.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object per prompt (`prompt`, `continuation`, `ids`) instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Run the pruned layers sparse (their zeros left out; per batch, sparse or dense, whichever
    /// the measured crossover table says is faster).
    #[arg(long)]
    pub sparse: bool,
}

/// Runs `relprune generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be positive");
    }
    let sampling = SampleConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        eos: Vec::new(),
    };
    sampling
        .check()
        .map_err(|e| anyhow::anyhow!("--temperature/--top-p: {e}"))?;
    let tokenizer = crate::causal::tokenizer(&args.model, "generate")?;
    let prompts = if args.prompt.is_empty() {
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .context("cannot read stdin")?;
        split_lines(&input, "stdin")?
    } else {
        args.prompt.clone()
    };
    let model = crate::causal::load(&args.model, args.sparse, &tokenizer)?;
    let pad = model
        .config()
        .pad_token_id
        .or(model.config().eos_ids().first().copied())
        .unwrap_or(0);
    let mut out = BufWriter::new(std::io::stdout().lock());
    for (chunk_index, chunk) in prompts.chunks(args.batch_size).enumerate() {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|p| tokenizer.encode_with(p, true))
            .collect::<std::result::Result<_, _>>()?;
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
        // Left padding: every row's last token is the batch's last position.
        let mut flat = Vec::with_capacity(ids.len() * longest);
        let mut mask = Vec::with_capacity(ids.len() * longest);
        for row in &ids {
            let gap = longest - row.len();
            flat.extend(std::iter::repeat_n(pad, gap).chain(row.iter().copied()));
            mask.extend(std::iter::repeat_n(0u32, gap).chain(std::iter::repeat_n(1, row.len())));
        }
        let shape = (ids.len(), longest);
        let generated = model
            .generate(
                &Tensor::from_vec(flat, shape, &Device::Cpu)?,
                &Tensor::from_vec(mask, shape, &Device::Cpu)?,
                &sampling,
            )
            .with_context(|| {
                let first = chunk_index * args.batch_size + 1;
                format!(
                    "generating for prompts {first}..{}",
                    first + chunk.len() - 1
                )
            })?;
        for (prompt, new) in chunk.iter().zip(&generated) {
            let text = tokenizer.decode(new, true)?;
            if args.json {
                let line = serde_json::json!({"prompt": prompt, "continuation": text, "ids": new});
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{text}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
