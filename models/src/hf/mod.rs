//! Hugging Face `transformers` models: read `config.json` and `model.safetensors` as written by
//! `save_pretrained`, with the same tensor names, so checkpoints move both ways unchanged.
//!
//! This module is the one home of Hugging Face architecture knowledge. Each architecture is one
//! file (its config, modules, the names its tensors may be stored under, its layer types, its
//! [`crate::Seq2Seq`] implementation) and one line in [`ARCHITECTURES`]; [`detect`] reads a
//! directory's `config.json` and finds its entry, [`load`] builds the model, and
//! [`save::save_like_input`] writes a trained model back exactly as the input was stored.

pub mod bert;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod marian;
pub mod save;
pub mod t5;
pub mod weights;

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde_json::Value;

use crate::attention::DecoderCache;
use crate::seq2seq::EncoderDecoder;
use crate::{Error, LayerType, Result};

/// Called with the input of a linear layer just before the layer applies it, with the layer's
/// weight name (PyTorch's forward pre-hook): how calibration statistics are collected without
/// the model knowing what they are for.
pub type LinearHook =
    std::sync::Arc<dyn Fn(&str, &candle_core::Tensor) -> candle_core::Result<()> + Send + Sync>;

/// Largest vocabulary, width, head or layer count a config may declare: far above any released
/// model, low enough that a hostile config is refused before anything is allocated.
pub(crate) const MAX_DIM: usize = 1 << 22;

/// Largest `max_position_embeddings` accepted (Llama 3.1 has 131,072).
pub(crate) const MAX_POSITIONS: usize = 1 << 20;

/// Largest table a config makes a loader build or read (positions × width, vocabulary × width),
/// in elements: 2^30, 4 GiB of f32 — a sixth of this machine, 8× the largest table of the models
/// we run (Llama 3's 128k × 2048 embedding is 2^28).
pub(crate) const MAX_TABLE: usize = 1 << 30;

/// Checks that each `(config key, value)` is in `1..=max`.
pub(crate) fn check_sizes(sizes: &[(&str, usize)], max: usize) -> Result<()> {
    match sizes.iter().find(|(_, v)| *v == 0 || *v > max) {
        Some((what, v)) => Err(Error::Config(format!("{what} {v} is outside 1..={max}"))),
        None => Ok(()),
    }
}

/// Checks that a `rows × cols` table (`what`: which config keys make it) stays within
/// [`MAX_TABLE`] elements.
pub(crate) fn check_table(what: &str, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n <= MAX_TABLE => Ok(()),
        _ => Err(Error::Config(format!(
            "{what} ({rows} × {cols}) asks for a table of more than {MAX_TABLE} elements"
        ))),
    }
}

/// Checks `max_position_embeddings` (`positions`) against [`MAX_POSITIONS`], and the table of
/// `positions × width` (`width_key`: the config key of the width) against [`MAX_TABLE`].
pub(crate) fn check_positions(positions: usize, width: usize, width_key: &str) -> Result<()> {
    check_sizes(&[("max_position_embeddings", positions)], MAX_POSITIONS)?;
    check_table(
        &format!("max_position_embeddings × {width_key}"),
        positions,
        width,
    )
}

/// What is wrong with the weight `name` holding `values`, if one of them is NaN or infinite: a
/// non-finite weight makes every output it reaches NaN, written as `null`s by a command that
/// succeeds.
pub(crate) fn non_finite(name: &str, values: &[f32]) -> Option<String> {
    values.iter().position(|v| !v.is_finite()).map(|i| {
        format!(
            "tensor `{name}` holds {} at flat index {i}: weights must be finite",
            values[i]
        )
    })
}

/// Every architecture this crate runs, one line each.
pub const ARCHITECTURES: &[&Architecture] = &[
    &bert::ARCHITECTURE,
    &marian::ARCHITECTURE,
    &t5::ARCHITECTURE,
    &llama::LLAMA,
    &llama::MISTRAL,
    &llama::QWEN2,
    &llama::QWEN3,
];

/// One Hugging Face architecture: how to recognise, load and write it back.
#[derive(Debug)]
pub struct Architecture {
    /// `config.json`'s `model_type`; also the lowercase prefix of its `architectures` class
    /// names (`BertModel`, `MarianMTModel`, `T5ForConditionalGeneration`).
    pub model_type: &'static str,
    /// What models of this architecture are for.
    pub kind: Kind,
    /// Loads a checkpoint directory, registering its parameters in the `VarMap` (under
    /// [`Layers::Sparse`], all but the weights read straight into sparse layers).
    pub load: fn(&Path, &VarMap, &Device, Layers) -> Result<HfModel>,
    /// The variable names a stored tensor name may denote (tied aliases and renamings resolved).
    pub variable_names: fn(&str) -> Vec<String>,
    /// The layer type of a parameter.
    pub layer_type: fn(&str) -> LayerType,
    /// Name patterns (`*` globs) of the vocabulary-sized tables: token embeddings and the
    /// language-model head.
    pub token_tables: &'static [&'static str],
    /// Name patterns of the small tables every input uses (positions, token types, relative
    /// position biases): pruning them saves nothing and hurts every sentence.
    pub position_tables: &'static [&'static str],
    /// Name patterns of parameters a distillation objective does not train (e.g. a pooler).
    pub untrained_heads: &'static [&'static str],
}

/// What a model is for: how it is used, trained and judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A text encoder: hidden states, sentence embeddings.
    Encoder,
    /// An encoder–decoder: translation.
    Seq2Seq,
    /// A decoder-only language model: next-token logits, generation.
    CausalLm,
}

/// The `model_type`s of [`ARCHITECTURES`].
pub fn supported() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|a| a.model_type).collect()
}

/// The architecture of the checkpoint in `dir`, from `config.json`'s `model_type`, else its
/// `architectures` class names; an error naming the file and the supported types otherwise.
pub fn detect(dir: &Path) -> Result<&'static Architecture> {
    if let Some(file) = gguf::find(dir)? {
        let arch = gguf::Gguf::open(&file)?.config()?.model_type;
        return ARCHITECTURES
            .iter()
            .copied()
            .find(|a| a.model_type == arch)
            .ok_or_else(|| Error::Checkpoint {
                path: file,
                msg: format!("model_type {arch:?} is not supported"),
            });
    }
    let path = dir.join("config.json");
    let err = |msg: String| Error::Checkpoint {
        path: path.clone(),
        msg,
    };
    if !dir.is_dir() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: "the model directory does not exist".into(),
        });
    }
    let text = relprune_io::read_text_capped(&path, relprune_io::CONFIG_CAP)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let supported = supported().join(", ");
    let by_type = |t: &str| ARCHITECTURES.iter().copied().find(|a| a.model_type == t);
    match value.get("model_type").and_then(Value::as_str) {
        Some(t) => by_type(t).ok_or_else(|| {
            err(format!(
                "model_type {t:?} is not supported (supported: {supported})"
            ))
        }),
        None => value
            .get("architectures")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find_map(|class| {
                let class = class.to_ascii_lowercase();
                ARCHITECTURES
                    .iter()
                    .copied()
                    .find(|a| class.starts_with(a.model_type))
            })
            .ok_or_else(|| {
                err(format!(
                    "no model_type and no recognised architectures (supported: {supported})"
                ))
            }),
    }
}

/// The architecture of the checkpoint in `dir` if it is of `kind`; otherwise an error naming the
/// file and the supported architectures of that kind.
pub fn detect_kind(dir: &Path, kind: Kind) -> Result<&'static Architecture> {
    let arch = detect(dir)?;
    if arch.kind == kind {
        return Ok(arch);
    }
    let supported: Vec<&str> = ARCHITECTURES
        .iter()
        .filter(|a| a.kind == kind)
        .map(|a| a.model_type)
        .collect();
    Err(Error::Checkpoint {
        path: dir.join("config.json"),
        msg: format!(
            "model_type {:?} is not supported here (supported: {})",
            arch.model_type,
            supported.join(", ")
        ),
    })
}

/// Loads the checkpoint in `dir` (or a GGUF file, or a directory holding one: see [`gguf`]),
/// whatever its architecture, with its parameters registered in `varmap`.
pub fn load(
    dir: &Path,
    varmap: &VarMap,
    device: &Device,
) -> Result<(&'static Architecture, HfModel)> {
    let arch = detect(dir)?;
    if let Some(file) = gguf::find(dir)? {
        let model = llama::CausalLm::load_gguf(&file, varmap, device)?;
        return Ok((arch, HfModel::CausalLm(Box::new(model))));
    }
    Ok((arch, (arch.load)(dir, varmap, device, Layers::Dense)?))
}

/// Loads the checkpoint in `dir` for inference with every linear layer sparse
/// ([`HfModel::to_sparse`]); the weights a compressed checkpoint stores compressed go straight
/// into sparse layers, never through a dense tensor.
pub fn load_sparse(dir: &Path, device: &Device) -> Result<(&'static Architecture, HfModel)> {
    let arch = detect(dir)?;
    let model = match gguf::find(dir)? {
        Some(file) => HfModel::CausalLm(Box::new(llama::CausalLm::load_gguf(
            &file,
            &VarMap::new(),
            device,
        )?)),
        None => (arch.load)(dir, &VarMap::new(), device, Layers::Sparse)?,
    };
    Ok((arch, model.to_sparse()?))
}

/// How a checkpoint's linear layers are loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layers {
    /// Dense, every weight a trainable variable.
    Dense,
    /// For inference: the attention and feed-forward weights stored compressed are decoded
    /// straight into sparse layers (see [`weights::Weights::linear_rows`]); the rest load dense.
    Sparse,
}

/// A loaded checkpoint, by what it is for.
pub enum HfModel {
    /// A text encoder: hidden states, sentence embeddings (BERT).
    Encoder(Box<bert::BertModel>),
    /// An encoder–decoder: translation (Marian, T5).
    Seq2Seq(Box<dyn HfSeq2Seq>),
    /// A decoder-only language model (Llama, Mistral, Qwen2, Qwen3).
    CausalLm(Box<llama::CausalLm>),
}

impl HfModel {
    /// The same model with its linear layers' weights stored sparse, for inference.
    pub fn to_sparse(&self) -> Result<Self> {
        Ok(match self {
            Self::Encoder(m) => Self::Encoder(Box::new(m.to_sparse()?)),
            Self::Seq2Seq(m) => Self::Seq2Seq(m.to_sparse()?),
            Self::CausalLm(m) => Self::CausalLm(Box::new(m.to_sparse()?)),
        })
    }

    /// Its `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Encoder(_) => bert::ARCHITECTURE.model_type,
            Self::Seq2Seq(m) => m.model_type(),
            Self::CausalLm(m) => ARCHITECTURES
                .iter()
                .map(|a| a.model_type)
                .find(|t| *t == m.config().model_type)
                .unwrap_or("llama"),
        }
    }
}

impl std::fmt::Debug for HfModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HfModel({})", self.model_type())
    }
}

/// A Hugging Face encoder–decoder: decoding and training through [`EncoderDecoder`], plus what
/// the tools around it need to know.
pub trait HfSeq2Seq: EncoderDecoder {
    /// Its `model_type`.
    fn model_type(&self) -> &'static str;
    /// Rows of the token embedding.
    fn vocab_size(&self) -> usize;
    /// The longest sequence its position table allows (`None`: relative positions).
    fn max_positions(&self) -> Option<usize>;
    /// The longest input or output sequence to allow: the position table's size, or, with
    /// relative positions, the architecture's customary limit.
    fn length_limit(&self) -> usize;
    /// The same model with its linear layers' weights stored sparse, for inference.
    fn to_sparse(&self) -> Result<Box<dyn HfSeq2Seq>>;

    /// `(logits (B, T, V), encoder_last_hidden_state (B, S, D))`, as the model's `forward`.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        decoder_input_ids: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let enc = self.encode_t(input_ids, attention_mask, false)?;
        let mut cache = DecoderCache::new(self);
        let logits = self.decode_t(decoder_input_ids, &enc, attention_mask, &mut cache, false)?;
        Ok((logits, enc))
    }
}

impl crate::attention::DecoderLayers for Box<dyn HfSeq2Seq> {
    fn decoder_layers(&self) -> usize {
        (**self).decoder_layers()
    }
}

impl EncoderDecoder for Box<dyn HfSeq2Seq> {
    fn encode_t(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        (**self).encode_t(input_ids, attention_mask, train)
    }

    fn decode_t(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
        train: bool,
    ) -> Result<Tensor> {
        (**self).decode_t(ids, encoder_hidden, src_mask, cache, train)
    }

    fn special_ids(&self) -> crate::SpecialTokens {
        (**self).special_ids()
    }

    fn reseed_dropout(&self, stream: u64) {
        (**self).reseed_dropout(stream)
    }
}

/// Reads, parses and checks a `config.json` with `validate`; errors name the file.
pub fn read_config<C: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&C) -> Result<()>,
) -> Result<C> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let text = relprune_io::read_text_capped(path, relprune_io::CONFIG_CAP)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let config: C = serde_json::from_str(&text).map_err(|e| err(format!("invalid config: {e}")))?;
    validate(&config).map_err(|e| match e {
        Error::Config(msg) => err(msg),
        other => other,
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_config(json: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        dir
    }

    #[test]
    fn the_architecture_comes_from_model_type_else_from_the_class_names() {
        let d = dir_with_config(r#"{"model_type": "t5"}"#);
        assert_eq!(detect(d.path()).unwrap().model_type, "t5");
        let d = dir_with_config(r#"{"architectures": ["MarianMTModel"]}"#);
        assert_eq!(detect(d.path()).unwrap().model_type, "marian");
        let d = dir_with_config(r#"{"model_type": "gpt2"}"#);
        let e = detect(d.path()).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("\"gpt2\""), "{e}");
        assert!(e.contains("bert, marian, t5"), "{e}");
    }

    #[test]
    fn every_architecture_names_its_stored_aliases_and_layer_types() {
        assert!((marian::ARCHITECTURE.variable_names)("lm_head.weight")
            .contains(&"model.shared.weight".to_string()));
        assert!(
            (t5::ARCHITECTURE.variable_names)("decoder.embed_tokens.weight")
                .contains(&"shared.weight".to_string())
        );
        assert!(
            (bert::ARCHITECTURE.variable_names)("bert.encoder.layer.0.output.LayerNorm.gamma")
                .contains(&"encoder.layer.0.output.LayerNorm.weight".to_string())
        );
        let cases = [
            (
                &bert::ARCHITECTURE,
                "encoder.layer.0.attention.self.query.weight",
                LayerType::Attention,
            ),
            (
                &bert::ARCHITECTURE,
                "encoder.layer.0.intermediate.dense.weight",
                LayerType::FeedForward,
            ),
            (
                &bert::ARCHITECTURE,
                "embeddings.word_embeddings.weight",
                LayerType::Embeddings,
            ),
            (
                &marian::ARCHITECTURE,
                "model.encoder.layers.1.self_attn.k_proj.weight",
                LayerType::Attention,
            ),
            (
                &marian::ARCHITECTURE,
                "model.decoder.layers.0.fc1.weight",
                LayerType::FeedForward,
            ),
            (
                &marian::ARCHITECTURE,
                "model.shared.weight",
                LayerType::Embeddings,
            ),
            (
                &t5::ARCHITECTURE,
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                LayerType::Attention,
            ),
            (
                &t5::ARCHITECTURE,
                "decoder.block.0.layer.2.DenseReluDense.wo.weight",
                LayerType::FeedForward,
            ),
            (&t5::ARCHITECTURE, "shared.weight", LayerType::Embeddings),
        ];
        for (arch, name, want) in cases {
            assert_eq!((arch.layer_type)(name), want, "{name}");
        }
    }
}
