//! Decoder-only causal language models of the Llama family, as `transformers` runs them:
//! `llama` (Llama 2 and 3, SmolLM), `mistral`, `qwen2` and `qwen3`. They differ in settings, not
//! in structure: grouped-query attention with rotary positions (Llama 3's frequency scaling
//! included), RMSNorm before attention and before a SiLU-gated MLP, a head tied to the token
//! embedding or not; q/k/v biases (Qwen2), per-head q/k RMSNorms (Qwen3), a sliding attention
//! window (Mistral). Every op on the training path has a backward; inference keeps each layer's
//! keys and values in a [`DecoderCache`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Module, Tensor, Var};
use candle_nn::{Embedding, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::weights::{tied_names, variable_names_with, Weights};
use super::Layers;
use crate::attention::{key_mask, windowed_causal_mask, Attention, DecoderCache, DecoderLayers};
use crate::attention::{Rope, RopeScaling};
use crate::fused::RmsNorm;
use crate::linear::{Lin, SparseRows};
use crate::{init, Error, LayerType, Result};

/// The `model_type`s this file runs.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// The names the tied token embedding may be stored under: the embedding, then the head.
const EMBED_ALIASES: &[&str] = &["model.embed_tokens.weight", "lm_head.weight"];

/// A token id or a list of them (`eos_token_id` is a list in Llama 3's configs).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json` of a Llama-family checkpoint (the fields this implementation reads).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LlamaConfig {
    /// One of [`SUPPORTED_MODEL_TYPES`].
    pub model_type: String,
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (default: as many as query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Features per head (default: `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// The MLP's activation (`silu`).
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Positions the rotary embedding is defined for.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Whether the head is the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on the attention projections (Llama, Qwen3; Qwen2 always has q/k/v biases).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections (Llama).
    #[serde(default)]
    pub mlp_bias: bool,
    /// The rotary base (transformers 4's layout).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// The rotary scaling (transformers 4's layout).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// The rotary base and scaling (transformers 5's layout).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Mistral's attention window (`null`: none).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen's switch for its sliding window (only `false` is supported).
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Beginning of sequence.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End of sequence (one or several ids).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn silu() -> String {
    "silu".into()
}

fn default_max_positions() -> usize {
    2048
}

fn default_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        super::read_config(path, Self::validate)
    }

    /// Checks that this is a configuration the implementation can run, within sane bounds.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if !SUPPORTED_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return bad(format!(
                "model_type `{}` is not supported here; supported: {SUPPORTED_MODEL_TYPES:?}",
                self.model_type
            ));
        }
        super::check_sizes(
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("head_dim", self.head_dim()),
                ("num_key_value_heads", self.kv_heads()),
            ],
            super::MAX_DIM,
        )?;
        super::check_table(
            "vocab_size × hidden_size",
            self.vocab_size,
            self.hidden_size,
        )?;
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "num_attention_heads {} does not divide hidden_size {} (and no head_dim is given)",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "num_key_value_heads {} does not divide num_attention_heads {}",
                self.kv_heads(),
                self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd; rotary positions need pairs of features",
                self.head_dim()
            ));
        }
        super::check_positions(self.max_position_embeddings, self.head_dim(), "head_dim")?;
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (supported: silu)",
                self.hidden_act
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps {} is not a non-negative number",
                self.rms_norm_eps
            ));
        }
        if self.use_sliding_window == Some(true) {
            return bad(
                "use_sliding_window = true (Qwen's windowed layers) is not supported".into(),
            );
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window 0 would hide every key".into());
        }
        self.rope()?;
        let ids = [&self.bos_token_id, &self.eos_token_id]
            .into_iter()
            .flatten()
            .flat_map(TokenIds::ids)
            .chain(self.pad_token_id);
        for id in ids {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "special token id {id} is outside the vocabulary ({})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Features per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `(theta, scaling)` of the rotary embedding, from either layout of `transformers`.
    pub fn rope(&self) -> Result<(f64, RopeScaling)> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let params = params.filter(|p| !p.is_null());
        let num = |key: &str| params.and_then(|p| p.get(key)).and_then(Value::as_f64);
        let theta = num("rope_theta").or(self.rope_theta).unwrap_or(10_000.0);
        if !(theta.is_finite() && theta > 1.0) {
            return Err(Error::Config(format!("rope_theta {theta} must exceed 1")));
        }
        let kind = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let need = |key: &str| -> Result<f64> {
            num(key)
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    Error::Config(format!("rope type `{kind}` needs a positive `{key}`"))
                })
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: need("factor")?,
            },
            "llama3" => {
                let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
                if high <= low {
                    return Err(Error::Config(format!(
                        "llama3 rope: high_freq_factor {high} must exceed low_freq_factor {low}"
                    )));
                }
                RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: need("original_max_position_embeddings")?
                        as usize,
                }
            }
            other => {
                return Err(Error::Config(format!(
                    "rope type `{other}` is not supported (supported: default, linear, llama3)"
                )))
            }
        };
        Ok((theta, scaling))
    }

    /// Whether q/k/v and o have biases.
    fn attention_biases(&self) -> (bool, bool) {
        match self.model_type.as_str() {
            "qwen2" => (true, false),
            "mistral" => (false, false),
            _ => (self.attention_bias, self.attention_bias),
        }
    }

    /// Whether queries and keys get per-head RMSNorms (Qwen3).
    fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }

    /// The attention window, if any (Mistral's).
    fn window(&self) -> Option<usize> {
        if self.model_type == "mistral" {
            self.sliding_window
        } else {
            None
        }
    }

    /// The end-of-sequence ids.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map_or(Vec::new(), TokenIds::ids)
    }

    /// Every parameter (variable name and shape), the head only when untied.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim(),
            self.kv_heads() * self.head_dim(),
        );
        let (qkv_bias, o_bias) = self.attention_biases();
        let mut out = vec![(EMBED_ALIASES[0].to_string(), vec![v, d])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut add = |name: String, shape: Vec<usize>| out.push((name, shape));
            for (proj, rows, cols, bias) in [
                ("q_proj", q, d, qkv_bias),
                ("k_proj", kv, d, qkv_bias),
                ("v_proj", kv, d, qkv_bias),
                ("o_proj", d, q, o_bias),
            ] {
                add(format!("{p}.self_attn.{proj}.weight"), vec![rows, cols]);
                if bias {
                    add(format!("{p}.self_attn.{proj}.bias"), vec![rows]);
                }
            }
            if self.qk_norm() {
                add(
                    format!("{p}.self_attn.q_norm.weight"),
                    vec![self.head_dim()],
                );
                add(
                    format!("{p}.self_attn.k_norm.weight"),
                    vec![self.head_dim()],
                );
            }
            for (proj, rows, cols) in [("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)]
            {
                add(format!("{p}.mlp.{proj}.weight"), vec![rows, cols]);
                if self.mlp_bias {
                    add(format!("{p}.mlp.{proj}.bias"), vec![rows]);
                }
            }
            add(format!("{p}.input_layernorm.weight"), vec![d]);
            add(format!("{p}.post_attention_layernorm.weight"), vec![d]);
        }
        out.push(("model.norm.weight".into(), vec![d]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, d]));
        }
        out
    }
}

/// Sees the input of a linear layer, by the layer's weight name (calibration statistics).
pub type Observer<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<()>;

/// One decoder layer.
#[derive(Clone, Debug)]
struct Block {
    attn: Attention,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    gate: Lin,
    up: Lin,
    down: Lin,
}

impl Block {
    fn frozen(&self) -> Self {
        Self {
            attn: self.attn.frozen(),
            input_norm: self.input_norm.frozen(),
            post_norm: self.post_norm.frozen(),
            gate: self.gate.frozen(),
            up: self.up.frozen(),
            down: self.down.frozen(),
        }
    }

    fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            attn: self.attn.to_sparse()?,
            gate: self.gate.to_sparse()?,
            up: self.up.to_sparse()?,
            down: self.down.to_sparse()?,
            ..self.clone()
        })
    }
}

/// A Llama-family causal LM (see the module documentation).
#[derive(Clone)]
pub struct CausalLm {
    config: LlamaConfig,
    embed: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// The head: the token embedding when tied (then it stays dense under `to_sparse`).
    lm_head: Lin,
    varmap: VarMap,
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DecoderLayers for CausalLm {
    fn decoder_layers(&self) -> usize {
        self.layers.len()
    }
}

impl CausalLm {
    /// Loads `dir/config.json` and `dir/model.safetensors`, registering every parameter in
    /// `varmap` under its Hugging Face name. The tied embedding may be stored as the embedding,
    /// the head or both; a missing tensor, a wrong shape or a damaged file is an error naming
    /// the tensor and the file.
    pub fn load(dir: &Path, varmap: &VarMap, device: &Device) -> Result<Self> {
        Self::load_as(dir, varmap, device, Layers::Dense)
    }

    /// [`Self::load`], with the linear layers loaded as `layers` says.
    pub fn load_as(dir: &Path, varmap: &VarMap, device: &Device, layers: Layers) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: "no such model directory".into(),
            });
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&dir.join("model.safetensors"))?;
        let (tensors, sparse) = weights.read_parameters(
            config.parameter_shapes(),
            (
                EMBED_ALIASES[0],
                tied_names(EMBED_ALIASES, config.tie_word_embeddings),
            ),
            layers,
            is_linear,
            device,
        )?;
        Self::from_tensors(config, tensors, &sparse, varmap, device)
    }

    /// Loads a GGUF file (see [`super::gguf`]): configuration from its metadata, every tensor
    /// dequantized to f32 and registered in `varmap` under its Hugging Face name.
    pub fn load_gguf(path: &Path, varmap: &VarMap, device: &Device) -> Result<Self> {
        let mut file = super::gguf::Gguf::open(path)?;
        let config = file.config()?;
        let tensors = file.tensors(&config, device)?;
        Self::from_tensors(config, tensors, &SparseRows::default(), varmap, device)
    }

    /// A model with fresh seeded weights (matrices N(0, initializer_range²) as `transformers`
    /// draws them with its default 0.02, unit norms, zero biases).
    pub fn new(config: LlamaConfig, varmap: &VarMap, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else if shape.len() == 2 {
                init::normal(&shape, 0.02, &mut rng, device)?
            } else {
                Tensor::zeros(shape.as_slice(), DType::F32, device)?
            };
            tensors.insert(name, t);
        }
        Self::from_tensors(config, tensors, &SparseRows::default(), varmap, device)
    }

    fn from_tensors(
        config: LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        sparse: &SparseRows,
        varmap: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let mut vars = HashMap::new();
        for (name, _) in config.parameter_shapes() {
            if sparse.contains(&name) {
                continue;
            }
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Config(format!("missing tensor `{name}`")))?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        let take = |name: &str| -> Result<Tensor> {
            vars.get(name)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| Error::Config(format!("missing tensor `{name}`")))
        };
        let linear = |p: &str, bias: bool| -> Result<Lin> {
            let weight = format!("{p}.weight");
            let bias = if bias {
                Some(take(&format!("{p}.bias"))?)
            } else {
                None
            };
            sparse.lin(&weight, || take(&weight), bias)
        };
        let eps = config.rms_norm_eps;
        let norm = |name: &str| -> Result<RmsNorm> { Ok(RmsNorm::new(take(name)?, eps)) };
        let (theta, scaling) = config.rope()?;
        let rope = Arc::new(Rope::new(
            &Rope::inv_freq(config.head_dim(), theta, scaling),
            config.max_position_embeddings,
            device,
        )?);
        let (qkv_bias, o_bias) = config.attention_biases();
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let a = format!("{p}.self_attn");
                let mut attn = Attention::new(
                    linear(&format!("{a}.q_proj"), qkv_bias)?,
                    linear(&format!("{a}.k_proj"), qkv_bias)?,
                    linear(&format!("{a}.v_proj"), qkv_bias)?,
                    linear(&format!("{a}.o_proj"), o_bias)?,
                    config.num_attention_heads,
                    config.head_dim(),
                )
                .grouped(config.kv_heads())
                .with_rope(rope.clone());
                if config.qk_norm() {
                    attn = attn.with_qk_norm(
                        norm(&format!("{a}.q_norm.weight"))?,
                        norm(&format!("{a}.k_norm.weight"))?,
                    );
                }
                Ok(Block {
                    attn,
                    input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                    post_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                    gate: linear(&format!("{p}.mlp.gate_proj"), config.mlp_bias)?,
                    up: linear(&format!("{p}.mlp.up_proj"), config.mlp_bias)?,
                    down: linear(&format!("{p}.mlp.down_proj"), config.mlp_bias)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        sparse.check_used()?;
        let final_norm = norm("model.norm.weight")?;
        let embed_w = take(EMBED_ALIASES[0])?;
        let lm_head = if config.tie_word_embeddings {
            Lin::new(embed_w.clone(), None)
        } else {
            Lin::new(take("lm_head.weight")?, None)
        };
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        data.extend(vars);
        drop(data);
        Ok(Self {
            embed: Embedding::new(embed_w, config.hidden_size),
            norm: final_norm,
            layers,
            lm_head,
            varmap: varmap.clone(),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The variables the model was built on.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The same model with every weight outside decoder layers `trained` read through detached
    /// views (same storage, no gradient): a backward pass computes gradients for those layers
    /// alone, not for the whole model (what training a few layers end to end needs).
    pub fn frozen_except(&self, trained: std::ops::Range<usize>) -> Self {
        Self {
            embed: Embedding::new(self.embed.embeddings().detach(), self.config.hidden_size),
            layers: self
                .layers
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    if trained.contains(&i) {
                        b.clone()
                    } else {
                        b.frozen()
                    }
                })
                .collect(),
            norm: self.norm.frozen(),
            lm_head: self.lm_head.frozen(),
            ..self.clone()
        }
    }

    /// The same model with its attention and MLP weights stored sparse, for inference (the
    /// embedding and the head stay dense).
    pub fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(Block::to_sparse)
                .collect::<Result<_>>()?,
            ..self.clone()
        })
    }

    /// Logits (B, T, V) of the tokens `input_ids` (B, T), `attention_mask` (B, T; 0 at padding,
    /// left padding allowed) hiding padded keys.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_t(input_ids, attention_mask, None, false)
    }

    /// Logits (B, T, V) of the next tokens `input_ids` (B, T) after those in `cache` (if
    /// given; their keys and values are appended to it); `attention_mask` (B, past + T) covers
    /// the cached tokens and these. Dropout-free: `train` only says whether a graph is wanted.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut DecoderCache>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(m) = attention_mask {
            if m.dims() != [b, past + t] {
                return Err(Error::Config(format!(
                    "attention mask of shape {:?} for {past} cached and {t} new tokens of {b} rows",
                    m.dims()
                )));
            }
        }
        let vocab = self.config.vocab_size as u32;
        let max = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max >= vocab {
            return Err(Error::Config(format!(
                "token id {max} is outside the vocabulary ({vocab})"
            )));
        }
        let mask = self.mask(t, past, attention_mask, input_ids.device())?;
        let mut h = self.embed.forward(input_ids)?;
        let mut caches = match cache.as_deref_mut() {
            Some(c) => Some(c.layers_for(self.layers.len())?),
            None => None,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let mut uncached = None;
            let kv = match caches.as_deref_mut() {
                Some(layers) => &mut layers[i].self_kv,
                None => &mut uncached,
            };
            h = self.block(i, layer, &h, kv, &mask, train, None)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        let h = self.norm.forward(&h)?;
        Ok(self.lm_head.forward(&h)?)
    }

    /// The additive mask (B or 1, 1, T, past + T) of `t` new tokens after `past`: causal (and
    /// windowed for Mistral), padded keys hidden.
    fn mask(
        &self,
        t: usize,
        past: usize,
        attention_mask: Option<&Tensor>,
        device: &Device,
    ) -> Result<Tensor> {
        let causal = windowed_causal_mask(t, past, self.config.window(), device)?;
        Ok(match attention_mask {
            Some(m) => causal.broadcast_add(&key_mask(m)?)?,
            None => causal,
        })
    }

    /// Decoder layer `index` on the hidden states `h`, its keys and values appended to `kv`;
    /// `observe(weight name, input)` sees the input of each of its linear layers.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        index: usize,
        layer: &Block,
        h: &Tensor,
        kv: &mut Option<crate::attention::KeyValues>,
        mask: &Tensor,
        train: bool,
        mut observe: Option<Observer<'_>>,
    ) -> Result<Tensor> {
        let mut see = |names: &[&str], x: &Tensor| -> Result<()> {
            if let Some(f) = observe.as_deref_mut() {
                for n in names {
                    f(&format!("model.layers.{index}.{n}.weight"), x)?;
                }
            }
            Ok(())
        };
        let x = layer.input_norm.forward(h)?;
        see(
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            &x,
        )?;
        let ctx = layer.attn.self_context_cached(&x, kv, Some(mask), train)?;
        see(&["self_attn.o_proj"], &ctx)?;
        let h = (h + layer.attn.output(&ctx)?)?;
        let x = layer.post_norm.forward(&h)?;
        see(&["mlp.gate_proj", "mlp.up_proj"], &x)?;
        let gated = (layer.gate.forward(&x)?.silu()? * layer.up.forward(&x)?)?;
        see(&["mlp.down_proj"], &gated)?;
        let out = (h + layer.down.forward(&gated)?)?;
        // Outside training, a layer's output does not keep the graph of every layer below alive
        // (layer-by-layer calibration holds many of them).
        Ok(if train { out } else { out.detach() })
    }

    /// The hidden states (B, T, D) of tokens before the first decoder layer: their embedding.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.forward(input_ids)?)
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layer `index` on hidden states `h` (B, T, D) of whole sequences (`attention_mask`
    /// as in [`Self::forward`]), calling `observe(weight name, input)` with the input of each of
    /// its seven linear layers: how layer-by-layer calibration sees what a layer sees.
    pub fn layer_forward(
        &self,
        index: usize,
        h: &Tensor,
        attention_mask: Option<&Tensor>,
        observe: Observer<'_>,
    ) -> Result<Tensor> {
        let mask = self.mask(h.dim(1)?, 0, attention_mask, h.device())?;
        self.block(
            index,
            self.layer(index)?,
            h,
            &mut None,
            &mask,
            false,
            Some(observe),
        )
    }

    /// Decoder layer `index` on hidden states `h` (B, T, D) of whole unpadded sequences, keeping
    /// the graph back to the layer's weights: what block-by-block distillation trains.
    pub fn layer_forward_train(&self, index: usize, h: &Tensor) -> Result<Tensor> {
        let mask = self.mask(h.dim(1)?, 0, None, h.device())?;
        self.block(index, self.layer(index)?, h, &mut None, &mask, true, None)
    }

    /// Logits (B, T, V) of hidden states `h` (B, T, D) of whole unpadded sequences entering
    /// decoder layer `start`: the layers from `start` on, the final norm and the head, keeping
    /// the graph (what end-to-end distillation trains, the layers below held as they are).
    pub fn logits_from_layer(&self, start: usize, h: &Tensor) -> Result<Tensor> {
        self.layer(start)?;
        let mask = self.mask(h.dim(1)?, 0, None, h.device())?;
        let mut h = h.clone();
        for (i, layer) in self.layers.iter().enumerate().skip(start) {
            h = self.block(i, layer, &h, &mut None, &mask, true, None)?;
        }
        Ok(self.lm_head.forward(&self.norm.forward(&h)?)?)
    }

    fn layer(&self, index: usize) -> Result<&Block> {
        self.layers.get(index).ok_or_else(|| {
            Error::Config(format!(
                "layer {index} of a {}-layer model",
                self.layers.len()
            ))
        })
    }

    /// Continues each row of `input_ids` (B, T; `attention_mask` 0 at left padding) by up to
    /// `config.max_new_tokens` tokens, greedily or by sampling; a row stops after an EOS id
    /// (which it keeps) and is padded while others go on. Returns each row's new tokens.
    pub fn generate(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        config: &SampleConfig,
    ) -> Result<Vec<Vec<u32>>> {
        config.check()?;
        let (b, t) = input_ids.dims2()?;
        if t + config.max_new_tokens > self.config.max_position_embeddings {
            return Err(Error::Config(format!(
                "{t} prompt tokens and {} new ones exceed the model's {} positions",
                config.max_new_tokens, self.config.max_position_embeddings
            )));
        }
        let device = input_ids.device();
        let eos = if config.eos.is_empty() {
            self.config.eos_ids()
        } else {
            config.eos.clone()
        };
        let pad = self
            .config
            .pad_token_id
            .or(eos.first().copied())
            .unwrap_or(0);
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut cache = DecoderCache::new(self);
        let mut mask = attention_mask.to_dtype(DType::U32)?;
        let mut logits = self.forward_t(input_ids, Some(&mask), Some(&mut cache), false)?;
        let mut out = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for _ in 0..config.max_new_tokens {
            let last = logits
                .i((.., logits.dim(1)? - 1, ..))?
                .to_dtype(DType::F32)?;
            let rows: Vec<Vec<f32>> = last.to_vec2()?;
            let next: Vec<u32> = rows
                .iter()
                .zip(&done)
                .map(|(row, &d)| if d { pad } else { config.pick(row, &mut rng) })
                .collect();
            for (i, &id) in next.iter().enumerate() {
                if !done[i] {
                    out[i].push(id);
                    done[i] = eos.contains(&id);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            mask = Tensor::cat(&[&mask, &Tensor::ones((b, 1), DType::U32, device)?], 1)?;
            let ids = Tensor::from_vec(next, (b, 1), device)?;
            logits = self.forward_t(&ids, Some(&mask), Some(&mut cache), false)?;
        }
        Ok(out)
    }
}

/// How [`CausalLm::generate`] picks tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleConfig {
    /// Most tokens generated per row.
    pub max_new_tokens: usize,
    /// 0: greedy (the argmax); above: sample from the softmax of logits / temperature.
    pub temperature: f64,
    /// Nucleus sampling: only the most likely tokens whose probabilities sum to `top_p` (the
    /// one that crosses it included) are sampled from; 1 keeps all.
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// End-of-sequence ids (empty: the model's).
    pub eos: Vec<u32>,
}

impl SampleConfig {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos: Vec::new(),
        }
    }

    /// Checks the settings.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Config(format!(
                "temperature {} must be a non-negative number",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Config(format!(
                "top_p {} is outside (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }

    /// The next token from one row of logits.
    fn pick(&self, logits: &[f32], rng: &mut StdRng) -> u32 {
        let argmax = || {
            // The first of equal maxima, as torch.argmax.
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        if self.temperature == 0.0 {
            return argmax();
        }
        let t = self.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i, (((v - max) / t) as f64).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1 / total;
            if mass >= self.top_p {
                break;
            }
        }
        let kept = &probs[..kept];
        let sum: f64 = kept.iter().map(|p| p.1).sum();
        let mut u = rng.random::<f64>() * sum;
        for &(i, p) in kept {
            if u < p {
                return i as u32;
            }
            u -= p;
        }
        kept.last().map_or_else(argmax, |p| p.0 as u32)
    }
}

/// Whether `name` is the weight of a linear layer.
fn is_linear(name: &str) -> bool {
    matches!(
        layer_type(name),
        LayerType::Attention | LayerType::FeedForward
    ) && name.ends_with("_proj.weight")
}

/// The kind of layer a parameter belongs to.
pub fn layer_type(name: &str) -> LayerType {
    if name.contains("norm") {
        LayerType::Norm
    } else if name.contains(".self_attn.") {
        LayerType::Attention
    } else if name.contains(".mlp.") {
        LayerType::FeedForward
    } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
        LayerType::Embeddings
    } else {
        LayerType::Other
    }
}

/// The variables a tensor stored as `name` may be (the head is the embedding when tied).
pub fn variable_names(name: &str) -> Vec<String> {
    variable_names_with(EMBED_ALIASES, name)
}

/// A registry entry per `model_type` of this file.
macro_rules! architecture {
    ($name:ident, $model_type:literal) => {
        #[doc = concat!("The registry entry of `", $model_type, "` checkpoints.")]
        pub const $name: super::Architecture = super::Architecture {
            kind: super::Kind::CausalLm,
            model_type: $model_type,
            load: |dir, varmap, device, layers| {
                Ok(super::HfModel::CausalLm(Box::new(CausalLm::load_as(
                    dir, varmap, device, layers,
                )?)))
            },
            variable_names,
            layer_type,
            token_tables: &["model.embed_tokens.*", "lm_head.*"],
            position_tables: &[],
            untrained_heads: &[],
        };
    };
}

architecture!(LLAMA, "llama");
architecture!(MISTRAL, "mistral");
architecture!(QWEN2, "qwen2");
architecture!(QWEN3, "qwen3");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_rope_scaling_follows_transformers_definition() {
        // Llama 3.1's settings on a 128-feature head.
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = Rope::inv_freq(128, 500_000.0, RopeScaling::None);
        let scaled = Rope::inv_freq(128, 500_000.0, scaling);
        let (low_wavelen, high_wavelen) = (8192.0, 2048.0);
        let mut seen = [0; 3];
        for (&f, &g) in plain.iter().zip(&scaled) {
            let (f, g) = (f as f64, g as f64);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let want = if wavelen < high_wavelen {
                seen[0] += 1;
                f
            } else if wavelen > low_wavelen {
                seen[1] += 1;
                f / 8.0
            } else {
                seen[2] += 1;
                let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - smooth) * f / 8.0 + smooth * f
            };
            assert!((g - want).abs() <= 1e-6 * want, "{f}: {g} vs {want}");
        }
        // All three regimes occur: high frequencies kept, low ones divided, the band blended.
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
        // The highest frequency is 1, the lowest 500000^(-126/128).
        assert_eq!(scaled[0], 1.0);
        let lowest = 500_000f64.powf(-126.0 / 128.0) / 8.0;
        assert!((scaled[63] as f64 - lowest).abs() < 1e-6 * lowest);
    }

    #[test]
    fn both_config_layouts_give_the_rotary_settings() {
        let base = r#""model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2"#;
        let parse = |extra: &str| -> LlamaConfig {
            serde_json::from_str(&format!("{{{base}{extra}}}")).unwrap()
        };
        let v4 = parse(
            r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}"#,
        );
        let v5 = parse(
            r#", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}"#,
        );
        assert_eq!(v4.rope().unwrap(), v5.rope().unwrap());
        assert_eq!(v4.rope().unwrap().0, 500_000.0);
        assert_eq!(parse("").rope().unwrap(), (10_000.0, RopeScaling::None));
        let e = parse(r#", "rope_scaling": {"type": "yarn", "factor": 4.0}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("`yarn` is not supported"), "{e}");
        let e = parse(r#", "num_key_value_heads": 3"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not divide"), "{e}");
        let mut c = parse("");
        c.hidden_size = 9;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("does not divide hidden_size"), "{e}");
        let e = parse(r#", "max_position_embeddings": 576460752303423488"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_position_embeddings"), "{e}");
    }
}
