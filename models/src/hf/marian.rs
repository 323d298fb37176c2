//! Marian (`MarianMTModel` of `transformers`): the opus-mt translation transformer, trainable.
//!
//! The layout follows `modeling_marian.py`: token embeddings scaled by √d_model when
//! `scale_embedding`, static sinusoidal positions (sin in the first half of the features, cos in
//! the second), post-layer-norm layers (sub-layer → residual → LayerNorm), no final encoder or
//! decoder layer norm, the language-model head tied to `model.shared.weight` and
//! `final_logits_bias` added to the logits. Parameters live in a [`VarMap`] under the Hugging Face
//! names, so a checkpoint saved with [`crate::checkpoint::save`] loads back in `transformers`.
//!
//! Every op on the training path has a backward: candle's fused `softmax_last_dim` and
//! `LayerNorm` kernels have none, so attention's softmax and the layer norms are this crate's
//! fused CPU ops with their own backward ([`crate::fused`]; plain tensor ops on other devices).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, VarMap};

use crate::linear::{Lin, SparseRows};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::generate::{pad_rows, GenerateConfig};
use super::weights::{tied_names, variable_names_with, Weights};
use super::Layers;
pub use crate::attention::DecoderCache;
use crate::attention::{causal_mask, key_mask, Attention, DecoderLayers};
use crate::fused::LayerNorm;
use crate::seq2seq::{EncoderDecoder, SpecialTokens};
use crate::LayerType;
use crate::{init, Error, Result};

/// Model types this module can run (`config.json`'s `model_type`).
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["marian"];

/// Activation names accepted in `activation_function` (those of `transformers`' `ACT2FN` we run).
pub const SUPPORTED_ACTIVATIONS: &[&str] = &[
    "swish",
    "silu",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "relu",
];

/// Layer-norm epsilon of `nn.LayerNorm`'s default, which Marian uses everywhere.
const LAYER_NORM_EPS: f64 = 1e-5;

/// The names under which the tied embedding (`model.shared.weight`) may be stored; the last one,
/// `lm_head.weight`, only when the head is tied.
pub const SHARED_ALIASES: &[&str] = &[
    "model.shared.weight",
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
];

fn default_true() -> bool {
    true
}

/// The `config.json` of a Marian checkpoint (fields we use; defaults as in `MarianConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarianConfig {
    /// Must be `"marian"`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Source (and, when shared, target) vocabulary size.
    pub vocab_size: usize,
    /// Target vocabulary size; must equal `vocab_size` (shared embeddings).
    #[serde(default)]
    pub decoder_vocab_size: Option<usize>,
    /// Hidden size.
    pub d_model: usize,
    /// Encoder layers.
    pub encoder_layers: usize,
    /// Decoder layers.
    pub decoder_layers: usize,
    /// Attention heads of the encoder.
    pub encoder_attention_heads: usize,
    /// Attention heads of the decoder.
    pub decoder_attention_heads: usize,
    /// Inner size of the encoder's feed-forward blocks.
    pub encoder_ffn_dim: usize,
    /// Inner size of the decoder's feed-forward blocks.
    pub decoder_ffn_dim: usize,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: usize,
    /// Feed-forward activation (see [`SUPPORTED_ACTIVATIONS`]).
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Whether token embeddings are multiplied by √d_model.
    #[serde(default)]
    pub scale_embedding: bool,
    /// Padding token id (also the mask of the embedding in `transformers`).
    pub pad_token_id: u32,
    /// End-of-sentence token id.
    pub eos_token_id: u32,
    /// First decoder token.
    pub decoder_start_token_id: u32,
    /// Whether the LM head is the shared embedding (otherwise `lm_head.weight` is its own tensor).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Whether encoder and decoder share one embedding; only `true` is supported.
    #[serde(default = "default_true")]
    pub share_encoder_decoder_embeddings: bool,
    /// Standard deviation of fresh weights ([`MarianModel::new`]).
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    /// Pre-layer-norm flag of old Bart-style configs; Marian is post-norm, `true` is rejected.
    #[serde(default)]
    pub normalize_before: Option<bool>,
    /// Layer norm after the embeddings in old configs; Marian has none, `true` is rejected.
    #[serde(default)]
    pub normalize_embedding: Option<bool>,
    /// Final encoder/decoder layer norm in old configs; Marian has none, `true` is rejected.
    #[serde(default)]
    pub add_final_layer_norm: Option<bool>,
}

fn default_activation() -> String {
    "gelu".into()
}

fn default_init_std() -> f64 {
    0.02
}

impl MarianConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        super::read_config(path, Self::validate)
    }

    /// Checks that this is a Marian configuration the implementation can run.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        match self.model_type.as_deref() {
            Some("marian") => {}
            Some(other) => {
                return bad(format!(
                "model_type `{other}` is not supported here; supported: {SUPPORTED_MODEL_TYPES:?}"
            ))
            }
            None => {
                return bad(format!(
                    "model_type is missing; supported: {SUPPORTED_MODEL_TYPES:?}"
                ))
            }
        }
        if !SUPPORTED_ACTIVATIONS.contains(&self.activation_function.as_str()) {
            return bad(format!(
                "activation_function `{}` is not supported; supported: {SUPPORTED_ACTIVATIONS:?}",
                self.activation_function
            ));
        }
        for (name, value) in [
            ("normalize_before", self.normalize_before),
            ("normalize_embedding", self.normalize_embedding),
            ("add_final_layer_norm", self.add_final_layer_norm),
        ] {
            if value == Some(true) {
                return bad(format!("{name} = true is not Marian's architecture"));
            }
        }
        if !self.share_encoder_decoder_embeddings {
            return bad("share_encoder_decoder_embeddings = false is not supported".into());
        }
        if let Some(v) = self.decoder_vocab_size {
            if v != self.vocab_size {
                return bad(format!(
                    "decoder_vocab_size {v} differs from vocab_size {} (separate vocabularies are not supported)",
                    self.vocab_size
                ));
            }
        }
        super::check_sizes(
            &[
                ("d_model", self.d_model),
                ("vocab_size", self.vocab_size),
                ("encoder_attention_heads", self.encoder_attention_heads),
                ("decoder_attention_heads", self.decoder_attention_heads),
                ("encoder_layers", self.encoder_layers),
                ("decoder_layers", self.decoder_layers),
                ("encoder_ffn_dim", self.encoder_ffn_dim),
                ("decoder_ffn_dim", self.decoder_ffn_dim),
            ],
            super::MAX_DIM,
        )?;
        super::check_positions(self.max_position_embeddings, self.d_model, "d_model")?;
        super::check_table("vocab_size × d_model", self.vocab_size, self.d_model)?;
        for (what, heads) in [
            ("encoder_attention_heads", self.encoder_attention_heads),
            ("decoder_attention_heads", self.decoder_attention_heads),
        ] {
            if heads == 0 || !self.d_model.is_multiple_of(heads) {
                return bad(format!(
                    "d_model {} is not divisible by {what} {heads}",
                    self.d_model
                ));
            }
        }
        for (what, id) in [
            ("pad_token_id", self.pad_token_id),
            ("eos_token_id", self.eos_token_id),
            ("decoder_start_token_id", self.decoder_start_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "{what} {id} is outside the vocabulary ({})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    fn embed_scale(&self) -> f64 {
        embedding_scale(self.scale_embedding, self.d_model)
    }
}

/// Feed-forward activation.
#[derive(Clone, Copy, Debug)]
enum Activation {
    Silu,
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "swish" | "silu" => Self::Silu,
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            other => {
                return Err(Error::Config(format!(
                    "activation_function `{other}` is not supported; supported: {SUPPORTED_ACTIVATIONS:?}"
                )))
            }
        })
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::GeluErf => crate::activation::gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

/// One encoder layer: self-attention → residual → LN; FFN → residual → LN.
#[derive(Clone, Debug)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Lin,
    fc2: Lin,
    final_layer_norm: LayerNorm,
}

/// One decoder layer: causal self-attention, cross-attention, FFN, each post-norm.
#[derive(Clone, Debug)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    fc1: Lin,
    fc2: Lin,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            self_attn: self.self_attn.to_sparse()?,
            fc1: self.fc1.to_sparse()?,
            fc2: self.fc2.to_sparse()?,
            ..self.clone()
        })
    }
}

impl DecoderLayer {
    fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            self_attn: self.self_attn.to_sparse()?,
            encoder_attn: self.encoder_attn.to_sparse()?,
            fc1: self.fc1.to_sparse()?,
            fc2: self.fc2.to_sparse()?,
            ..self.clone()
        })
    }
}

fn ffn(
    act: Activation,
    fc1: &Lin,
    fc2: &Lin,
    ln: &LayerNorm,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let h = fc2.forward(&act.apply(&fc1.forward(x)?)?)?;
    ln.forward(&(x + h)?)
}

/// `MarianMTModel`: encoder, decoder and tied LM head, parameters in a [`VarMap`].
#[derive(Clone, Debug)]
pub struct MarianModel {
    config: MarianConfig,
    act: Activation,
    shared: Tensor,
    lm_head: Tensor,
    final_logits_bias: Tensor,
    encoder_positions: Tensor,
    decoder_positions: Tensor,
    encoder_layers: Vec<EncoderLayer>,
    decoder_layers: Vec<DecoderLayer>,
}

/// The factor token embeddings are multiplied by: √d_model when `scale`, else 1.
pub fn embedding_scale(scale: bool, d_model: usize) -> f64 {
    if scale {
        (d_model as f64).sqrt()
    } else {
        1.0
    }
}

/// The sinusoidal table of `MarianSinusoidalPositionalEmbedding`: row `p`, column `j < d/2` is
/// `sin(p / 10000^(2j/d))`, column `d/2 + j` the cosine of the same angle (for odd `d` the sine
/// half has one column more, as in `transformers`).
pub fn sinusoidal_positions(n_pos: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let sentinel = dim / 2 + dim % 2;
    let mut data = vec![0f32; n_pos * dim];
    for p in 0..n_pos {
        let row = &mut data[p * dim..(p + 1) * dim];
        for (j, col) in (0..dim).step_by(2).enumerate() {
            let angle = p as f64 / 10000f64.powf(2.0 * (col / 2) as f64 / dim as f64);
            row[j] = angle.sin() as f32;
            if sentinel + j < dim {
                row[sentinel + j] = angle.cos() as f32;
            }
        }
    }
    Ok(Tensor::from_vec(data, (n_pos, dim), device)?)
}

/// Every parameter name and shape of a model with `config` (the shared embedding once, as
/// `model.shared.weight`), in a fixed order.
pub fn parameter_shapes(config: &MarianConfig) -> Vec<(String, Vec<usize>)> {
    let d = config.d_model;
    let mut out = vec![
        (
            "model.shared.weight".to_string(),
            vec![config.vocab_size, d],
        ),
        ("final_logits_bias".to_string(), vec![1, config.vocab_size]),
    ];
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![config.vocab_size, d]));
    }
    let linear = |out: &mut Vec<(String, Vec<usize>)>, p: String, i: usize, o: usize| {
        out.push((format!("{p}.weight"), vec![o, i]));
        out.push((format!("{p}.bias"), vec![o]));
    };
    let ln = |out: &mut Vec<(String, Vec<usize>)>, p: String| {
        out.push((format!("{p}.weight"), vec![d]));
        out.push((format!("{p}.bias"), vec![d]));
    };
    let stacks = [
        ("encoder", config.encoder_layers, config.encoder_ffn_dim),
        ("decoder", config.decoder_layers, config.decoder_ffn_dim),
    ];
    for (stack, layers, ffn) in stacks {
        for l in 0..layers {
            let p = format!("model.{stack}.layers.{l}");
            let mut attns = vec!["self_attn"];
            if stack == "decoder" {
                attns.push("encoder_attn");
            }
            for a in attns {
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    linear(&mut out, format!("{p}.{a}.{proj}"), d, d);
                }
                ln(&mut out, format!("{p}.{a}_layer_norm"));
            }
            linear(&mut out, format!("{p}.fc1"), d, ffn);
            linear(&mut out, format!("{p}.fc2"), ffn, d);
            ln(&mut out, format!("{p}.final_layer_norm"));
        }
    }
    out
}

impl MarianModel {
    /// Loads `dir/config.json` and `dir/model.safetensors`, registering every parameter in
    /// `varmap` under its Hugging Face name.
    ///
    /// The tied embedding may be stored once or under any of its aliases; the position tables
    /// are read when present and recomputed otherwise. A missing tensor, a wrong shape or a
    /// corrupt or truncated file is an error naming the tensor and the file.
    pub fn load(dir: &Path, varmap: &VarMap, device: &Device) -> Result<Self> {
        Self::load_as(dir, varmap, device, Layers::Dense)
    }

    /// [`Self::load`], with the linear layers loaded as `layers` says.
    pub fn load_as(dir: &Path, varmap: &VarMap, device: &Device, layers: Layers) -> Result<Self> {
        let config = MarianConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&dir.join("model.safetensors"))?;
        let (tensors, sparse) = weights.read_parameters(
            parameter_shapes(&config),
            (
                "model.shared.weight",
                tied_names(SHARED_ALIASES, config.tie_word_embeddings),
            ),
            layers,
            is_linear,
            device,
        )?;
        let positions = |stack: &str| -> Result<Option<Tensor>> {
            let name = format!("model.{stack}.embed_positions.weight");
            if !weights.contains(&name) {
                return Ok(None);
            }
            let shape = [config.max_position_embeddings, config.d_model];
            Ok(Some(weights.require(&name, &shape, device)?))
        };
        let enc_pos = positions("encoder")?;
        let dec_pos = positions("decoder")?;
        let positions = (enc_pos, dec_pos);
        Self::from_tensors(config, tensors, &sparse, positions, varmap, device)
    }

    /// A model with fresh seeded weights (N(0, init_std²) matrices, zero biases, unit layer
    /// norms, zero `final_logits_bias`, as `transformers` initializes it).
    pub fn new(config: MarianConfig, varmap: &VarMap, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let t = if name.ends_with("layer_norm.weight") {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else if shape.len() == 2 && name != "final_logits_bias" {
                init::normal(&shape, config.init_std, &mut rng, device)?
            } else {
                Tensor::zeros(shape.as_slice(), DType::F32, device)?
            };
            tensors.insert(name, t);
        }
        let sparse = SparseRows::default();
        Self::from_tensors(config, tensors, &sparse, (None, None), varmap, device)
    }

    fn from_tensors(
        config: MarianConfig,
        mut tensors: HashMap<String, Tensor>,
        sparse: &SparseRows,
        (encoder_positions, decoder_positions): (Option<Tensor>, Option<Tensor>),
        varmap: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let act = Activation::parse(&config.activation_function)?;
        let mut vars = HashMap::new();
        for (name, _) in parameter_shapes(&config) {
            if sparse.contains(&name) {
                continue;
            }
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Config(format!("missing tensor `{name}`")))?;
            let var = Var::from_tensor(&t)?;
            vars.insert(name, var);
        }
        let take = |name: &str| -> Tensor { vars[name].as_tensor().clone() };
        let linear = |p: &str| -> Result<Lin> {
            let weight = format!("{p}.weight");
            let bias = take(&format!("{p}.bias"));
            sparse.lin(&weight, || Ok(take(&weight)), Some(bias))
        };
        let ln = |p: &str| {
            LayerNorm::new(
                take(&format!("{p}.weight")),
                take(&format!("{p}.bias")),
                LAYER_NORM_EPS,
            )
        };
        let attention = |p: &str, heads: usize| -> Result<Attention> {
            Ok(Attention::new(
                linear(&format!("{p}.q_proj"))?,
                linear(&format!("{p}.k_proj"))?,
                linear(&format!("{p}.v_proj"))?,
                linear(&format!("{p}.out_proj"))?,
                heads,
                config.d_model / heads,
            ))
        };
        let encoder_layers = (0..config.encoder_layers)
            .map(|l| {
                let p = format!("model.encoder.layers.{l}");
                Ok(EncoderLayer {
                    self_attn: attention(
                        &format!("{p}.self_attn"),
                        config.encoder_attention_heads,
                    )?,
                    self_attn_layer_norm: ln(&format!("{p}.self_attn_layer_norm")),
                    fc1: linear(&format!("{p}.fc1"))?,
                    fc2: linear(&format!("{p}.fc2"))?,
                    final_layer_norm: ln(&format!("{p}.final_layer_norm")),
                })
            })
            .collect::<Result<_>>()?;
        let decoder_layers = (0..config.decoder_layers)
            .map(|l| {
                let p = format!("model.decoder.layers.{l}");
                Ok(DecoderLayer {
                    self_attn: attention(
                        &format!("{p}.self_attn"),
                        config.decoder_attention_heads,
                    )?,
                    self_attn_layer_norm: ln(&format!("{p}.self_attn_layer_norm")),
                    encoder_attn: attention(
                        &format!("{p}.encoder_attn"),
                        config.decoder_attention_heads,
                    )?,
                    encoder_attn_layer_norm: ln(&format!("{p}.encoder_attn_layer_norm")),
                    fc1: linear(&format!("{p}.fc1"))?,
                    fc2: linear(&format!("{p}.fc2"))?,
                    final_layer_norm: ln(&format!("{p}.final_layer_norm")),
                })
            })
            .collect::<Result<_>>()?;
        sparse.check_used()?;
        let shared = take("model.shared.weight");
        let lm_head = if config.tie_word_embeddings {
            shared.clone()
        } else {
            take("lm_head.weight")
        };
        // transformers keeps final_logits_bias as a buffer, saved but not trained: it lives in the
        // VarMap so checkpoints are complete, and is detached so it gets no gradient.
        let final_logits_bias = take("final_logits_bias").detach();
        let table = || sinusoidal_positions(config.max_position_embeddings, config.d_model, device);
        let encoder_positions = match encoder_positions {
            Some(t) => t,
            None => table()?,
        };
        let decoder_positions = match decoder_positions {
            Some(t) => t,
            None => table()?,
        };
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        data.extend(vars);
        drop(data);
        Ok(Self {
            config,
            act,
            shared,
            lm_head,
            final_logits_bias,
            encoder_positions,
            decoder_positions,
            encoder_layers,
            decoder_layers,
        })
    }

    /// The same model with its attention and feed-forward weights stored sparse, for
    /// inference (the embedding and its tied head stay dense).
    pub fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            encoder_layers: self
                .encoder_layers
                .iter()
                .map(EncoderLayer::to_sparse)
                .collect::<Result<_>>()?,
            decoder_layers: self
                .decoder_layers
                .iter()
                .map(DecoderLayer::to_sparse)
                .collect::<Result<_>>()?,
            ..self.clone()
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MarianConfig {
        &self.config
    }

    /// Scaled token embeddings plus the positions starting at `offset`.
    fn embed(&self, ids: &Tensor, positions: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if offset + l > self.config.max_position_embeddings {
            return Err(Error::Config(format!(
                "sequence of {} positions exceeds max_position_embeddings {}",
                offset + l,
                self.config.max_position_embeddings
            )));
        }
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?;
        let tok = self
            .shared
            .index_select(&ids, 0)?
            .reshape((b, l, self.config.d_model))?;
        let tok = (tok * self.config.embed_scale())?;
        let pos = positions.narrow(0, offset, l)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// The encoder's last hidden state (B, S, D) of `input_ids` (B, S) with a 0/1
    /// `attention_mask` (B, S) hiding padding.
    pub fn encode(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mask = key_mask(attention_mask)?;
        let mut h = self.embed(input_ids, &self.encoder_positions, 0)?;
        for layer in &self.encoder_layers {
            let a = layer.self_attn.self_attend(&h, Some(&mask), false)?;
            h = layer.self_attn_layer_norm.forward(&(h + a)?)?;
            h = ffn(
                self.act,
                &layer.fc1,
                &layer.fc2,
                &layer.final_layer_norm,
                &h,
            )?;
        }
        Ok(h)
    }

    /// Logits (B, T, V) of `decoder_input_ids` (B, T) given the encoder output (B, S, D) and the
    /// source's 0/1 mask (B, S) (teacher forcing, causal).
    pub fn decode(
        &self,
        decoder_input_ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
    ) -> Result<Tensor> {
        let mut cache = DecoderCache::new(self);
        self.decode_step(decoder_input_ids, encoder_hidden, src_mask, &mut cache)
    }

    /// Logits (B, t, V) of the next `t` target tokens after those in `cache`, which is extended
    /// with their keys and values. The cross-attention keys/values are computed from
    /// `encoder_hidden` on the first call and reused after, so later calls must pass the same
    /// encoder output (it is not read again).
    pub fn decode_step(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let past = cache.len();
        let src = key_mask(src_mask)?;
        let causal = causal_mask(t, past, ids.device())?;
        let mut h = self.embed(ids, &self.decoder_positions, past)?;
        let caches = cache.layers_for(self.decoder_layers.len())?;
        for (layer, lc) in self.decoder_layers.iter().zip(caches.iter_mut()) {
            let a =
                layer
                    .self_attn
                    .self_attend_cached(&h, &mut lc.self_kv, Some(&causal), false)?;
            h = layer.self_attn_layer_norm.forward(&(h + a)?)?;
            let a = layer.encoder_attn.cross_attend_cached(
                &h,
                encoder_hidden,
                &mut lc.cross_kv,
                Some(&src),
                false,
            )?;
            h = layer.encoder_attn_layer_norm.forward(&(h + a)?)?;
            h = ffn(
                self.act,
                &layer.fc1,
                &layer.fc2,
                &layer.final_layer_norm,
                &h,
            )?;
        }
        cache.advance(t);
        let logits = crate::ops::linear(&h, &self.lm_head, None)?;
        Ok(logits.broadcast_add(&self.final_logits_bias)?)
    }

    /// `(logits (B, T, V), encoder_last_hidden_state (B, S, D))`, as `MarianMTModel.forward`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        decoder_input_ids: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let enc = self.encode(input_ids, attention_mask)?;
        let logits = self.decode(decoder_input_ids, &enc, attention_mask)?;
        Ok((logits, enc))
    }

    /// Greedy decoding with the KV cache: per sentence, `decoder_start_token_id` followed by up to
    /// `max_len` argmax tokens; a sentence stops at `eos_token_id` and is padded with
    /// `pad_token_id` while others go on (as `generate` without logits processors); a shorthand for
    /// [`super::generate::greedy`].
    pub fn greedy(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        max_len: usize,
    ) -> Result<Vec<Vec<u32>>> {
        // The one greedy loop of the crate, shared with beam search's callers.
        let config = GenerateConfig::new(self.special_ids(), max_len);
        let out = super::generate::greedy(self, input_ids, attention_mask, &config)?;
        Ok(pad_rows(&out, self.config.pad_token_id))
    }
}

impl DecoderLayers for MarianModel {
    fn decoder_layers(&self) -> usize {
        self.decoder_layers.len()
    }
}

impl EncoderDecoder for MarianModel {
    /// Marian runs without dropout here, so `train` changes nothing.
    fn encode_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        _train: bool,
    ) -> Result<Tensor> {
        self.encode(input_ids, attention_mask)
    }

    fn decode_t(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
        _train: bool,
    ) -> Result<Tensor> {
        self.decode_step(ids, encoder_hidden, src_mask, cache)
    }

    fn special_ids(&self) -> SpecialTokens {
        let c = &self.config;
        SpecialTokens::new(c.pad_token_id, c.eos_token_id, c.decoder_start_token_id)
    }
}

/// The variables a tensor stored as `name` may be (its own name, or the shared embedding for
/// one of its aliases): how a writer finds the trained value of every stored tensor.
pub fn variable_names(name: &str) -> Vec<String> {
    variable_names_with(SHARED_ALIASES, name)
}

/// The kind of layer a Marian parameter belongs to.
pub fn layer_type(name: &str) -> LayerType {
    if name.contains("layer_norm") {
        LayerType::Norm
    } else if name.contains("_attn.") {
        LayerType::Attention
    } else if name.contains(".fc1.") || name.contains(".fc2.") {
        LayerType::FeedForward
    } else if SHARED_ALIASES.contains(&name) || name.contains("embed_positions") {
        LayerType::Embeddings
    } else {
        LayerType::Other
    }
}

/// Whether `name` is the weight of a linear layer.
fn is_linear(name: &str) -> bool {
    matches!(
        layer_type(name),
        LayerType::Attention | LayerType::FeedForward
    ) && name.ends_with(".weight")
}

/// The registry entry of `marian` checkpoints.
pub const ARCHITECTURE: super::Architecture = super::Architecture {
    kind: super::Kind::Seq2Seq,
    model_type: "marian",
    load: |dir, varmap, device, layers| {
        Ok(super::HfModel::Seq2Seq(Box::new(MarianModel::load_as(
            dir, varmap, device, layers,
        )?)))
    },
    variable_names,
    layer_type,
    token_tables: &["model.shared.weight", "model.*.embed_tokens.*", "lm_head.*"],
    // Sinusoidal, never trained; listed so that no selection ever takes them.
    position_tables: &["model.*.embed_positions.*"],
    untrained_heads: &[],
};

impl super::HfSeq2Seq for MarianModel {
    fn model_type(&self) -> &'static str {
        ARCHITECTURE.model_type
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config.max_position_embeddings)
    }

    fn length_limit(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn to_sparse(&self) -> Result<Box<dyn super::HfSeq2Seq>> {
        Ok(Box::new(Self::to_sparse(self)?))
    }
}
