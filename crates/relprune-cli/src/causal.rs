//! What `generate` and `perplexity` share: opening a decoder-only LM (a Hugging Face
//! directory, a GGUF file or a directory holding one) with the tokenizer beside it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use relprune_data::text::TextTokenizer;
use relprune_models::hf::llama::CausalLm;
use relprune_models::hf::{detect_kind, gguf, HfModel, Kind};

/// The tokenizer of the decoder-only LM at `model` (checked to be one first), for `command`.
pub fn tokenizer(model: &Path, command: &str) -> Result<TextTokenizer> {
    detect_kind(model, Kind::CausalLm)?;
    let path = gguf::model_dir(model).join("tokenizer.json");
    if !path.is_file() {
        bail!(
            "{} is missing: {command} needs the model's tokenizer",
            path.display()
        );
    }
    Ok(TextTokenizer::from_file(&path)?)
}

/// The decoder-only LM at `model` (its pruned layers sparse with `sparse`), checked to fit
/// `tokenizer`.
pub fn load(model: &Path, sparse: bool, tokenizer: &TextTokenizer) -> Result<CausalLm> {
    let (_, loaded) = if sparse {
        relprune_models::hf::load_sparse(model, &Device::Cpu)?
    } else {
        relprune_models::hf::load(model, &candle_nn::VarMap::new(), &Device::Cpu)?
    };
    let HfModel::CausalLm(lm) = loaded else {
        bail!("{} is not a decoder-only LM", model.display());
    };
    tokenizer
        .check_vocab(lm.config().vocab_size)
        .context("the tokenizer does not fit the model")?;
    Ok(*lm)
}
