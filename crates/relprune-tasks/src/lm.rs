//! Language-model evaluation: perplexity of a text under a causal LM, by the protocol the
//! pruning literature (and `../shared/anchors`) uses: the file's non-empty lines, stripped,
//! joined with a blank line, tokenized without special tokens, cut into non-overlapping windows
//! scored alone; perplexity = exp(total next-token NLL / tokens predicted).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use relprune_data::text::{read_lines, TextTokenizer};
use relprune_models::hf::llama::CausalLm;
use serde::Serialize;

use crate::{Error, Result};

/// The evaluation tokens of a text file (see the module documentation).
pub fn text_tokens(path: &Path, tokenizer: &TextTokenizer) -> Result<Vec<u32>> {
    let lines = read_lines(path)?;
    let text = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
    if text.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no non-empty line to evaluate on",
            path.display()
        )));
    }
    Ok(tokenizer.encode_with(&text, false)?)
}

/// A perplexity measurement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Perplexity {
    /// exp(`nll_sum` / `predicted_tokens`).
    pub perplexity: f64,
    /// Tokens in the text.
    pub tokens: usize,
    /// Tokens predicted: all but the first of each window.
    pub predicted_tokens: usize,
    /// Summed next-token negative log-likelihood (nats).
    pub nll_sum: f64,
    /// Window length.
    pub window: usize,
}

/// Perplexity of `tokens` under `model` in non-overlapping windows of `window` tokens (the
/// last one shorter); `progress` is told how many windows are done after each.
pub fn perplexity(
    model: &CausalLm,
    tokens: &[u32],
    window: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if window < 2 {
        return Err(Error::Invalid(format!(
            "a window of {window} tokens predicts nothing; at least 2 are needed"
        )));
    }
    let positions = model.config().max_position_embeddings;
    if window > positions {
        return Err(Error::Invalid(format!(
            "a window of {window} tokens exceeds the model's {positions} positions"
        )));
    }
    let windows: Vec<&[u32]> = tokens.chunks(window).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(Error::Invalid(format!(
            "{} tokens: nothing to predict",
            tokens.len()
        )));
    }
    let (mut nll_sum, mut predicted) = (0f64, 0usize);
    for (i, w) in windows.iter().enumerate() {
        let n = w.len();
        let x = Tensor::from_slice(&w[..n - 1], (1, n - 1), &Device::Cpu)?;
        let targets = Tensor::from_slice(&w[1..], (n - 1, 1), &Device::Cpu)?;
        let logits = model.forward(&x, None)?.squeeze(0)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = logp.gather(&targets, 1)?.to_dtype(DType::F64)?;
        nll_sum -= picked.sum_all()?.to_scalar::<f64>()?;
        predicted += n - 1;
        progress(i + 1, windows.len());
    }
    let perplexity = (nll_sum / predicted as f64).exp();
    if !perplexity.is_finite() {
        return Err(Error::Invalid(format!(
            "the perplexity is not finite (NLL sum {nll_sum}): the model's outputs are broken"
        )));
    }
    Ok(Perplexity {
        perplexity,
        tokens: tokens.len(),
        predicted_tokens: predicted,
        nll_sum,
        window,
    })
}
