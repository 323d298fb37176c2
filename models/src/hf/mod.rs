//! Hugging Face `transformers` models: read `config.json` and `model.safetensors` as written by
//! `save_pretrained`, with the same tensor names, so checkpoints move both ways unchanged.

pub mod bert;
pub mod generate;
pub mod marian;
pub mod t5;

/// Called with the input of a linear layer just before the layer applies it, with the layer's
/// weight name (PyTorch's forward pre-hook): how calibration statistics are collected without
/// the model knowing what they are for.
pub type LinearHook =
    std::sync::Arc<dyn Fn(&str, &candle_core::Tensor) -> candle_core::Result<()> + Send + Sync>;
