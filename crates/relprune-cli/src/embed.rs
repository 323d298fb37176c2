//! `relprune embed`: sentence embeddings as sentence-transformers computes them for BERT models
//! such as all-MiniLM-L6-v2: tokenize with the model's `tokenizer.json`, run the encoder on
//! padded batches with an attention mask, mean-pool over the real tokens, L2-normalize.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use relprune_data::text::TextTokenizer;
use relprune_models::hf::bert::sentence_embeddings;
use serde_json::Value;

use crate::forward::{load_bert, write_json_atomic};

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
}

/// Runs `relprune embed`.
pub fn run(args: &EmbedArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let model = load_bert(&args.model)?;
    let tokenizer = TextTokenizer::from_file(&args.model.join("tokenizer.json"))?;
    tokenizer
        .check_vocab(model.config().vocab_size)
        .context("the tokenizer does not fit the model")?;
    let max_len = max_length(&args.model, model.config().max_position_embeddings)?;
    let sentences = crate::bleu::read_lines(&args.text, "text")?;
    if sentences.is_empty() {
        bail!("text file {} has no lines", args.text.display());
    }
    // Padded positions are masked out, so any valid id will do when the vocabulary has no pad.
    let pad = tokenizer
        .pad_id()
        .or(model.config().pad_token_id)
        .unwrap_or(0);
    let device = Device::Cpu;
    let mut embeddings: Vec<Vec<f32>> = Vec::with_capacity(sentences.len());
    for chunk in sentences.chunks(args.batch_size) {
        let encoded = chunk
            .iter()
            .map(|s| Ok(truncate(tokenizer.encode(s)?, max_len)))
            .collect::<Result<Vec<_>>>()?;
        let t = encoded.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(chunk.len() * t);
        let mut mask = Vec::with_capacity(chunk.len() * t);
        for row in &encoded {
            ids.extend(row.iter().copied().chain(std::iter::repeat(pad)).take(t));
            mask.extend((0..t).map(|j| u32::from(j < row.len())));
        }
        let ids = Tensor::from_vec(ids, (chunk.len(), t), &device)?;
        let mask = Tensor::from_vec(mask, (chunk.len(), t), &device)?;
        let hidden = model.forward(&ids, Some(&mask), None)?;
        embeddings.extend(sentence_embeddings(&hidden, &mask)?.to_vec2::<f32>()?);
    }
    write_json_atomic(&args.out, &serde_json::json!({ "embeddings": embeddings }))
}

/// The longest input: the position table's size, or sentence-transformers' `max_seq_length`
/// (`sentence_bert_config.json`) when the directory has one and it is smaller.
pub(crate) fn max_length(dir: &Path, max_positions: usize) -> Result<usize> {
    let path = dir.join("sentence_bert_config.json");
    if !path.exists() {
        return Ok(max_positions);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(match value.get("max_seq_length").and_then(Value::as_u64) {
        Some(n) if n > 0 => max_positions.min(n as usize),
        _ => max_positions,
    })
}

/// Cuts `ids` to `max_len` tokens keeping the last one, as the tokenizer's own truncation keeps
/// the closing `[SEP]`.
pub(crate) fn truncate(mut ids: Vec<u32>, max_len: usize) -> Vec<u32> {
    if ids.len() > max_len && max_len > 0 {
        let last = ids[ids.len() - 1];
        ids.truncate(max_len - 1);
        ids.push(last);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_closing_token() {
        assert_eq!(truncate(vec![101, 5, 6, 7, 102], 3), [101, 5, 102]);
        assert_eq!(truncate(vec![101, 5, 102], 3), [101, 5, 102]);
    }
}
