//! Hugging Face `transformers` models: read `config.json` and `model.safetensors` as written by
//! `save_pretrained`, with the same tensor names, so checkpoints move both ways unchanged.

pub mod bert;
pub mod generate;
pub mod marian;
pub mod t5;
