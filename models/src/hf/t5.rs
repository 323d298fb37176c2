//! T5 (`T5ForConditionalGeneration` of `transformers`): the encoder-decoder of "Exploring the
//! Limits of Transfer Learning", trainable.
//!
//! The layout follows `modeling_t5.py`: one shared token embedding (no positions, no scaling),
//! pre-norm blocks (RMS layer norm → sub-layer → residual), a learned relative-position bias
//! computed by the first block of each stack and reused by the others, no attention scaling (T5
//! folds it into the initialization), final RMS norms on both stacks, and an LM head that is
//! either the shared embedding (v1.0, with the decoder output scaled by d_model^-0.5) or its own
//! `lm_head.weight` (v1.1). Parameters live in a [`VarMap`] under the Hugging Face names, so a
//! checkpoint saved with [`T5Model::save_pretrained`] loads back in `transformers`.
//!
//! Every op on the training path has a backward: candle's fused `softmax_last_dim` and RMS-norm
//! kernels have none, so attention's softmax and the RMS norms are this crate's fused CPU ops with
//! their own backward ([`crate::fused`]; plain tensor ops on other devices). Dropout
//! (`dropout_rate`, at the places `transformers` applies it) is only active in
//! [`T5Model::forward_t`] with `train = true`; everything else is `model.eval()`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
use crate::dropout::{unseeded as dropout, Dropout};
use crate::fused::RmsNorm;
use crate::seq2seq::{EncoderDecoder, SpecialTokens};
use crate::LayerType;
use crate::{init, Error, Result};

/// Model types this module can run (`config.json`'s `model_type`).
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["t5"];

/// Values accepted in `feed_forward_proj` (`gated-gelu` means gated `gelu_new`, as in
/// `T5Config`).
pub const SUPPORTED_FEED_FORWARD_PROJ: &[&str] = &[
    "relu",
    "gelu",
    "gelu_new",
    "silu",
    "gated-relu",
    "gated-gelu",
    "gated-gelu_new",
    "gated-silu",
];

/// The shared embedding's canonical name.
const SHARED: &str = "shared.weight";

/// The names under which the shared embedding may be stored (`lm_head.weight` only when tied).
pub const SHARED_ALIASES: &[&str] = &[
    SHARED,
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "lm_head.weight",
];

fn default_true() -> bool {
    true
}

fn default_max_distance() -> usize {
    128
}

fn default_num_buckets() -> usize {
    32
}

fn default_feed_forward_proj() -> String {
    "relu".into()
}

fn default_eps() -> f64 {
    1e-6
}

fn default_dropout() -> f64 {
    0.1
}

fn default_factor() -> f64 {
    1.0
}

/// The `config.json` of a T5 checkpoint (fields we use; defaults as in `T5Config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    /// Must be `"t5"`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size (shared by encoder, decoder and LM head).
    pub vocab_size: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Size of one attention head (inner attention size is `num_heads * d_kv`).
    pub d_kv: usize,
    /// Inner size of the feed-forward blocks.
    pub d_ff: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Decoder blocks (`num_layers` when absent).
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    /// Attention heads.
    pub num_heads: usize,
    /// Buckets of the relative-position bias.
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which all relative positions share a bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Dropout probability of training ([`T5Model::forward_t`]).
    #[serde(default = "default_dropout")]
    pub dropout_rate: f64,
    /// Epsilon of the RMS layer norms.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Scale of fresh weights ([`T5Model::new`]), as `initializer_factor` of `T5Config`.
    #[serde(default = "default_factor")]
    pub initializer_factor: f64,
    /// Feed-forward kind (see [`SUPPORTED_FEED_FORWARD_PROJ`]).
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
    /// Whether the LM head is the shared embedding (T5 v1.0) or `lm_head.weight` (v1.1).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Whether the decoder output is scaled by d_model^-0.5 before the head (default: when tied,
    /// which is what `transformers` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    /// Padding token id.
    pub pad_token_id: u32,
    /// End-of-sentence token id.
    pub eos_token_id: u32,
    /// First decoder token (T5 uses the padding id).
    pub decoder_start_token_id: u32,
    /// Must be `true` when present (T5 is an encoder-decoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_encoder_decoder: Option<bool>,
}

/// Feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    Relu,
    GeluErf,
    GeluTanh,
    Silu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::GeluErf => crate::activation::gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::Silu => x.silu(),
        }
    }
}

impl T5Config {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        super::read_config(path, Self::validate)
    }

    /// Checks that this is a T5 configuration the implementation can run.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        match self.model_type.as_deref() {
            Some("t5") => {}
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
        self.feed_forward()?;
        if self.is_encoder_decoder == Some(false) {
            return bad("is_encoder_decoder = false (a decoder-only T5) is not supported".into());
        }
        super::check_sizes(
            &[
                ("d_model", self.d_model),
                ("vocab_size", self.vocab_size),
                ("d_kv", self.d_kv),
                ("d_ff", self.d_ff),
                ("num_heads", self.num_heads),
                ("num_layers", self.num_layers),
                (
                    "num_decoder_layers",
                    self.num_decoder_layers.unwrap_or(self.num_layers),
                ),
                (
                    "relative_attention_max_distance",
                    self.relative_attention_max_distance,
                ),
            ],
            super::MAX_DIM,
        )?;
        super::check_table("vocab_size × d_model", self.vocab_size, self.d_model)?;
        super::check_table("num_heads × d_kv", self.num_heads, self.d_kv)?;
        // The bucket formula needs at least one exact and one logarithmic bucket per direction.
        if self.relative_attention_num_buckets < 4 {
            return bad(format!(
                "relative_attention_num_buckets {} is below 4",
                self.relative_attention_num_buckets
            ));
        }
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets / 2 {
            return bad(format!(
                "relative_attention_max_distance {} must exceed half the buckets ({})",
                self.relative_attention_max_distance,
                self.relative_attention_num_buckets / 2
            ));
        }
        if !(0.0..1.0).contains(&self.dropout_rate) {
            return bad(format!(
                "dropout_rate {} is outside [0, 1)",
                self.dropout_rate
            ));
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon < 0.0 {
            return bad("layer_norm_epsilon must be non-negative".into());
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

    /// `(gated, activation)` of `feed_forward_proj`, parsed as `T5Config.__init__` does.
    fn feed_forward(&self) -> Result<(bool, Activation)> {
        let unsupported = || {
            Error::Config(format!(
                "feed_forward_proj `{}` is not supported; supported: {SUPPORTED_FEED_FORWARD_PROJ:?}",
                self.feed_forward_proj
            ))
        };
        let (gated, act) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            Some(_) => return Err(unsupported()),
            None => (false, self.feed_forward_proj.as_str()),
        };
        let act = match (gated, act) {
            (_, "relu") => Activation::Relu,
            // `T5Config` maps "gated-gelu" to gelu_new for backwards compatibility.
            (true, "gelu") | (_, "gelu_new") => Activation::GeluTanh,
            (false, "gelu") => Activation::GeluErf,
            (_, "silu") => Activation::Silu,
            _ => return Err(unsupported()),
        };
        Ok((gated, act))
    }

    /// Decoder blocks (`num_decoder_layers`, else `num_layers`).
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// Whether the decoder output is scaled by d_model^-0.5 before the LM head.
    pub fn scales_decoder_output(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings)
    }

    /// Every parameter name and shape of a model with this configuration (the shared embedding
    /// once, as `shared.weight`), in a fixed order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.d_model;
        let inner = self.num_heads * self.d_kv;
        let gated = self.feed_forward().map(|(g, _)| g).unwrap_or(false);
        let mut out = vec![(SHARED.to_string(), vec![self.vocab_size, d])];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab_size, d]));
        }
        let stacks = [
            ("encoder", self.num_layers),
            ("decoder", self.decoder_layers()),
        ];
        for (stack, blocks) in stacks {
            for b in 0..blocks {
                let p = format!("{stack}.block.{b}.layer");
                let mut attns = vec!["SelfAttention"];
                if stack == "decoder" {
                    attns.push("EncDecAttention");
                }
                for (i, a) in attns.iter().enumerate() {
                    out.push((format!("{p}.{i}.{a}.q.weight"), vec![inner, d]));
                    out.push((format!("{p}.{i}.{a}.k.weight"), vec![inner, d]));
                    out.push((format!("{p}.{i}.{a}.v.weight"), vec![inner, d]));
                    out.push((format!("{p}.{i}.{a}.o.weight"), vec![d, inner]));
                    if b == 0 && i == 0 {
                        out.push((
                            format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                            vec![self.relative_attention_num_buckets, self.num_heads],
                        ));
                    }
                    out.push((format!("{p}.{i}.layer_norm.weight"), vec![d]));
                }
                let f = attns.len();
                if gated {
                    out.push((
                        format!("{p}.{f}.DenseReluDense.wi_0.weight"),
                        vec![self.d_ff, d],
                    ));
                    out.push((
                        format!("{p}.{f}.DenseReluDense.wi_1.weight"),
                        vec![self.d_ff, d],
                    ));
                } else {
                    out.push((
                        format!("{p}.{f}.DenseReluDense.wi.weight"),
                        vec![self.d_ff, d],
                    ));
                }
                out.push((
                    format!("{p}.{f}.DenseReluDense.wo.weight"),
                    vec![d, self.d_ff],
                ));
                out.push((format!("{p}.{f}.layer_norm.weight"), vec![d]));
            }
            out.push((format!("{stack}.final_layer_norm.weight"), vec![d]));
        }
        out
    }
}

/// `transformers`' `T5Attention._relative_position_bucket` of one relative position
/// (`key - query`), in f32 like the PyTorch original so that bucket boundaries agree.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let n = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        (-relative_position).max(0)
    };
    let max_exact = num_buckets / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // log(n / max_exact) / log(max_distance / max_exact) * (num_buckets - max_exact), with
        // the tensor arithmetic in f32 and the Python scalar log in f64, then truncated.
        let ratio = (n as f32 / max_exact as f32).ln();
        let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + ((ratio / denom) * (num_buckets - max_exact) as f32) as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket as usize
}

/// `DenseReluDense`: `wo(act(wi(x)))`, or `wo(act(wi_0(x)) * wi_1(x))` when gated.
#[derive(Clone, Debug)]
struct FeedForward {
    wi: Lin,
    wi_1: Option<Lin>,
    wo: Lin,
    act: Activation,
}

impl FeedForward {
    /// The block's output, with dropout `p` before `wo` as in `transformers`.
    fn forward(&self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        let h = self.act.apply(&self.wi.forward(x)?)?;
        let h = match &self.wi_1 {
            Some(wi_1) => (h * wi_1.forward(x)?)?,
            None => h,
        };
        self.wo.forward(&dropout(&h, p)?)
    }
}

impl FeedForward {
    fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            wi: self.wi.to_sparse()?,
            wi_1: self.wi_1.as_ref().map(Lin::to_sparse).transpose()?,
            wo: self.wo.to_sparse()?,
            act: self.act,
        })
    }
}

/// One encoder block: `x + SelfAttention(norm(x))`, then `x + DenseReluDense(norm(x))`.
#[derive(Clone, Debug)]
struct EncoderBlock {
    self_attn: Attention,
    self_attn_norm: RmsNorm,
    ff: FeedForward,
    ff_norm: RmsNorm,
}

/// One decoder block: causal self-attention, cross-attention and feed-forward, each pre-norm.
#[derive(Clone, Debug)]
struct DecoderBlock {
    self_attn: Attention,
    self_attn_norm: RmsNorm,
    cross_attn: Attention,
    cross_attn_norm: RmsNorm,
    ff: FeedForward,
    ff_norm: RmsNorm,
}

/// `T5ForConditionalGeneration`: encoder, decoder and LM head, parameters in a [`VarMap`].
#[derive(Clone, Debug)]
pub struct T5Model {
    config: T5Config,
    /// The model's own parameters by Hugging Face name (sharing storage with the `VarMap`).
    params: HashMap<String, Tensor>,
    shared: Tensor,
    lm_head: Tensor,
    encoder_bias: Tensor,
    decoder_bias: Tensor,
    encoder: Vec<EncoderBlock>,
    encoder_norm: RmsNorm,
    decoder: Vec<DecoderBlock>,
    decoder_norm: RmsNorm,
}

impl T5Model {
    /// Loads `dir/config.json` and `dir/model.safetensors`, registering every parameter in
    /// `varmap` under its Hugging Face name.
    ///
    /// The shared embedding may be stored once or under any of its aliases
    /// (`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`, and `lm_head.weight` when
    /// tied). A missing tensor, a wrong shape or a corrupt or truncated file is an error naming
    /// the tensor and the file.
    pub fn load(dir: &Path, varmap: &VarMap, device: &Device) -> Result<Self> {
        Self::load_as(dir, varmap, device, Layers::Dense)
    }

    /// [`Self::load`], with the linear layers loaded as `layers` says.
    pub fn load_as(dir: &Path, varmap: &VarMap, device: &Device, layers: Layers) -> Result<Self> {
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&dir.join("model.safetensors"))?;
        let (tensors, sparse) = weights.read_parameters(
            config.parameter_shapes(),
            (
                SHARED,
                tied_names(SHARED_ALIASES, config.tie_word_embeddings),
            ),
            layers,
            is_linear,
            device,
        )?;
        Self::from_tensors(config, tensors, &sparse, varmap)
    }

    /// A model with fresh seeded weights, drawn as `T5PreTrainedModel._init_weights` does:
    /// embeddings and LM head N(0, f²), `wi*` N(0, f²/d_model), `wo` N(0, f²/d_ff), `q`
    /// N(0, f²/(d_model·d_kv)), `k`, `v` and the relative bias N(0, f²/d_model), `o`
    /// N(0, f²/(heads·d_kv)), unit norms (f = `initializer_factor`).
    pub fn new(config: T5Config, varmap: &VarMap, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let f = config.initializer_factor;
        let d = config.d_model as f64;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let std = if name.ends_with("layer_norm.weight") {
                tensors.insert(name, Tensor::ones(shape.as_slice(), DType::F32, device)?);
                continue;
            } else if name == SHARED || name == "lm_head.weight" {
                f
            } else if name.ends_with(".wo.weight") {
                f / (config.d_ff as f64).sqrt()
            } else if name.ends_with(".q.weight") {
                f / (d * config.d_kv as f64).sqrt()
            } else if name.ends_with(".o.weight") {
                f / ((config.num_heads * config.d_kv) as f64).sqrt()
            } else {
                // wi, wi_0, wi_1, k, v and relative_attention_bias.
                f / d.sqrt()
            };
            tensors.insert(name, init::normal(&shape, std, &mut rng, device)?);
        }
        Self::from_tensors(config, tensors, &SparseRows::default(), varmap)
    }

    fn from_tensors(
        config: T5Config,
        mut tensors: HashMap<String, Tensor>,
        sparse: &SparseRows,
        varmap: &VarMap,
    ) -> Result<Self> {
        config.validate()?;
        let (gated, act) = config.feed_forward()?;
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
        let params: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let take = |name: &str| -> Tensor { params[name].clone() };
        let linear = |name: String| sparse.lin(&name, || Ok(take(&name)), None);
        let norm = |p: &str| {
            RmsNorm::new(
                take(&format!("{p}.layer_norm.weight")),
                config.layer_norm_epsilon,
            )
        };
        // No score scaling: T5 folds it into the initialization.
        let attention = |p: &str| -> Result<Attention> {
            Ok(Attention::new(
                linear(format!("{p}.q.weight"))?,
                linear(format!("{p}.k.weight"))?,
                linear(format!("{p}.v.weight"))?,
                linear(format!("{p}.o.weight"))?,
                config.num_heads,
                config.d_kv,
            )
            .unscaled()
            .with_dropout(Dropout::Unseeded(config.dropout_rate)))
        };
        let ff = |p: &str| -> Result<FeedForward> {
            let p = format!("{p}.DenseReluDense");
            Ok(if gated {
                FeedForward {
                    wi: linear(format!("{p}.wi_0.weight"))?,
                    wi_1: Some(linear(format!("{p}.wi_1.weight"))?),
                    wo: linear(format!("{p}.wo.weight"))?,
                    act,
                }
            } else {
                FeedForward {
                    wi: linear(format!("{p}.wi.weight"))?,
                    wi_1: None,
                    wo: linear(format!("{p}.wo.weight"))?,
                    act,
                }
            })
        };
        let encoder = (0..config.num_layers)
            .map(|b| {
                let p = format!("encoder.block.{b}.layer");
                Ok(EncoderBlock {
                    self_attn: attention(&format!("{p}.0.SelfAttention"))?,
                    self_attn_norm: norm(&format!("{p}.0")),
                    ff: ff(&format!("{p}.1"))?,
                    ff_norm: norm(&format!("{p}.1")),
                })
            })
            .collect::<Result<_>>()?;
        let decoder = (0..config.decoder_layers())
            .map(|b| {
                let p = format!("decoder.block.{b}.layer");
                Ok(DecoderBlock {
                    self_attn: attention(&format!("{p}.0.SelfAttention"))?,
                    self_attn_norm: norm(&format!("{p}.0")),
                    cross_attn: attention(&format!("{p}.1.EncDecAttention"))?,
                    cross_attn_norm: norm(&format!("{p}.1")),
                    ff: ff(&format!("{p}.2"))?,
                    ff_norm: norm(&format!("{p}.2")),
                })
            })
            .collect::<Result<_>>()?;
        sparse.check_used()?;
        let bias_name = |stack: &str| {
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        };
        // A stack without blocks has no bias table; an empty one keeps the fields total.
        let bias = |stack: &str| -> Result<Tensor> {
            match params.get(&bias_name(stack)) {
                Some(t) => Ok(t.clone()),
                None => Ok(Tensor::zeros(
                    (config.relative_attention_num_buckets, config.num_heads),
                    DType::F32,
                    params[SHARED].device(),
                )?),
            }
        };
        let encoder_bias = bias("encoder")?;
        let decoder_bias = bias("decoder")?;
        let final_norm = |stack: &str| {
            RmsNorm::new(
                take(&format!("{stack}.final_layer_norm.weight")),
                config.layer_norm_epsilon,
            )
        };
        let encoder_norm = final_norm("encoder");
        let decoder_norm = final_norm("decoder");
        let shared = take(SHARED);
        let lm_head = if config.tie_word_embeddings {
            shared.clone()
        } else {
            take("lm_head.weight")
        };
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        data.extend(vars);
        drop(data);
        Ok(Self {
            config,
            params,
            shared,
            lm_head,
            encoder_bias,
            decoder_bias,
            encoder,
            encoder_norm,
            decoder,
            decoder_norm,
        })
    }

    /// The same model with its attention and feed-forward weights stored sparse, for
    /// inference (the embedding, the head and the position biases stay dense).
    pub fn to_sparse(&self) -> Result<Self> {
        let encoder = self
            .encoder
            .iter()
            .map(|b| {
                Ok(EncoderBlock {
                    self_attn: b.self_attn.to_sparse()?,
                    ff: b.ff.to_sparse()?,
                    ..b.clone()
                })
            })
            .collect::<Result<_>>()?;
        let decoder = self
            .decoder
            .iter()
            .map(|b| {
                Ok(DecoderBlock {
                    self_attn: b.self_attn.to_sparse()?,
                    cross_attn: b.cross_attn.to_sparse()?,
                    ff: b.ff.to_sparse()?,
                    ..b.clone()
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            encoder,
            decoder,
            ..self.clone()
        })
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (atomically; the shared embedding
    /// once, as `shared.weight`) in the layout `transformers`' `from_pretrained` reads.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let err = |path: PathBuf, msg: String| Error::Checkpoint { path, msg };
        std::fs::create_dir_all(dir).map_err(|e| err(dir.into(), format!("cannot create: {e}")))?;
        crate::checkpoint::save_tensors(&self.params, &dir.join("model.safetensors"))?;
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config)
            .map_err(|e| err(path.clone(), format!("cannot serialize: {e}")))?;
        Ok(relprune_io::write(&path, text.as_bytes())?)
    }

    /// Token embeddings (B, L, D) of `ids` (B, L); T5 adds no positions and no scaling.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?;
        Ok(self
            .shared
            .index_select(&ids, 0)?
            .reshape((b, l, self.config.d_model))?)
    }

    /// The relative-position bias (1, H, T, S) of queries at `q_offset..q_offset+T` against keys
    /// at `0..S`, looked up in `table` (buckets, H) so that the table gets gradients.
    fn position_bias(
        &self,
        table: &Tensor,
        t: usize,
        q_offset: usize,
        s: usize,
        bidirectional: bool,
        device: &Device,
    ) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    relative_position_bucket(
                        j as i64 - (q_offset + i) as i64,
                        bidirectional,
                        self.config.relative_attention_num_buckets,
                        self.config.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, t * s, table.device())?;
        let values = table.index_select(&buckets, 0)?; // (T·S, H)
        Ok(values
            .reshape((t, s, self.config.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(device)?)
    }

    /// The dropout probability of a forward pass (`dropout_rate` when training).
    fn dropout_p(&self, train: bool) -> f64 {
        if train {
            self.config.dropout_rate
        } else {
            0.0
        }
    }

    /// The encoder's last hidden state (B, S, D) of `input_ids` (B, S) with a 0/1
    /// `attention_mask` (B, S) hiding padding.
    pub fn encode(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.encode_p(input_ids, attention_mask, 0.0)
    }

    /// [`Self::encode`] with dropout probability `p`.
    fn encode_p(&self, input_ids: &Tensor, attention_mask: &Tensor, p: f64) -> Result<Tensor> {
        let (_, s) = input_ids.dims2()?;
        let device = input_ids.device();
        // As in transformers, block 0's bias (positions plus padding mask) serves every block.
        let bias = self
            .position_bias(&self.encoder_bias, s, 0, s, true, device)?
            .broadcast_add(&key_mask(attention_mask)?)?;
        let mut h = dropout(&self.embed(input_ids)?, p)?;
        for block in &self.encoder {
            let x = block.self_attn_norm.forward(&h)?;
            let a = block.self_attn.self_attend(&x, Some(&bias), p > 0.0)?;
            h = (h + dropout(&a, p)?)?;
            let f = block.ff.forward(&block.ff_norm.forward(&h)?, p)?;
            h = (&h + dropout(&f, p)?)?;
        }
        Ok(dropout(&self.encoder_norm.forward(&h)?, p)?)
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
        self.decode_step_p(ids, encoder_hidden, src_mask, cache, 0.0)
    }

    /// [`Self::decode_step`] with dropout probability `p`.
    fn decode_step_p(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
        p: f64,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let past = cache.len();
        let device = ids.device();
        let self_bias = self
            .position_bias(&self.decoder_bias, t, past, past + t, false, device)?
            .broadcast_add(&causal_mask(t, past, device)?)?;
        // Cross-attention has no position bias, only the source padding mask.
        let src = key_mask(src_mask)?;
        let train = p > 0.0;
        let mut h = dropout(&self.embed(ids)?, p)?;
        let caches = cache.layers_for(self.decoder.len())?;
        for (block, lc) in self.decoder.iter().zip(caches.iter_mut()) {
            let x = block.self_attn_norm.forward(&h)?;
            let a =
                block
                    .self_attn
                    .self_attend_cached(&x, &mut lc.self_kv, Some(&self_bias), train)?;
            h = (h + dropout(&a, p)?)?;
            let x = block.cross_attn_norm.forward(&h)?;
            let a = block.cross_attn.cross_attend_cached(
                &x,
                encoder_hidden,
                &mut lc.cross_kv,
                Some(&src),
                train,
            )?;
            h = (h + dropout(&a, p)?)?;
            let f = block.ff.forward(&block.ff_norm.forward(&h)?, p)?;
            h = (&h + dropout(&f, p)?)?;
        }
        cache.advance(t);
        let mut h = dropout(&self.decoder_norm.forward(&h)?, p)?;
        if self.config.scales_decoder_output() {
            // The tied head reuses the embedding, whose scale T5 v1.0 compensates here.
            h = (h * (self.config.d_model as f64).powf(-0.5))?;
        }
        Ok(crate::ops::linear(&h, &self.lm_head, None)?)
    }

    /// `(logits (B, T, V), encoder_last_hidden_state (B, S, D))`, as
    /// `T5ForConditionalGeneration.forward`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        decoder_input_ids: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.forward_t(input_ids, attention_mask, decoder_input_ids, false)
    }

    /// [`Self::forward`] for training when `train`: dropout with probability `dropout_rate` on
    /// the embeddings, the attention weights, every sub-layer output, the feed-forward inner
    /// activations and the final norms' outputs, as `transformers` in `model.train()`.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        decoder_input_ids: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let p = self.dropout_p(train);
        let enc = self.encode_p(input_ids, attention_mask, p)?;
        let mut cache = DecoderCache::new(self);
        let logits = self.decode_step_p(decoder_input_ids, &enc, attention_mask, &mut cache, p)?;
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

impl DecoderLayers for T5Model {
    fn decoder_layers(&self) -> usize {
        self.decoder.len()
    }
}

impl EncoderDecoder for T5Model {
    fn encode_t(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        self.encode_p(input_ids, attention_mask, self.dropout_p(train))
    }

    fn decode_t(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
        train: bool,
    ) -> Result<Tensor> {
        self.decode_step_p(ids, encoder_hidden, src_mask, cache, self.dropout_p(train))
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

/// The kind of layer a T5 parameter belongs to.
pub fn layer_type(name: &str) -> LayerType {
    if name.contains("layer_norm") {
        LayerType::Norm
    } else if name.contains("Attention.") {
        LayerType::Attention
    } else if name.contains("DenseReluDense") {
        LayerType::FeedForward
    } else if SHARED_ALIASES.contains(&name) {
        LayerType::Embeddings
    } else {
        LayerType::Other
    }
}

/// Whether `name` is the weight of a linear layer (the relative position bias is an attention
/// parameter but a lookup table).
fn is_linear(name: &str) -> bool {
    matches!(
        layer_type(name),
        LayerType::Attention | LayerType::FeedForward
    ) && name.ends_with(".weight")
        && !name.contains("relative_attention_bias")
}

/// The registry entry of `t5` checkpoints.
pub const ARCHITECTURE: super::Architecture = super::Architecture {
    kind: super::Kind::Seq2Seq,
    model_type: "t5",
    load: |dir, varmap, device, layers| {
        Ok(super::HfModel::Seq2Seq(Box::new(T5Model::load_as(
            dir, varmap, device, layers,
        )?)))
    },
    variable_names,
    layer_type,
    token_tables: &["shared.weight", "*.embed_tokens.*", "lm_head.*"],
    position_tables: &["*relative_attention_bias*"],
    untrained_heads: &[],
};

impl super::HfSeq2Seq for T5Model {
    fn model_type(&self) -> &'static str {
        ARCHITECTURE.model_type
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> Option<usize> {
        None
    }

    fn length_limit(&self) -> usize {
        // Relative positions: no table bounds the length; T5's customary limit (`n_positions`).
        512
    }

    fn to_sparse(&self) -> Result<Box<dyn super::HfSeq2Seq>> {
        Ok(Box::new(Self::to_sparse(self)?))
    }
}
