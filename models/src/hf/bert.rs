//! BERT encoders as Hugging Face `transformers` writes them (`BertModel`, and the encoder of
//! `BertFor*` checkpoints): `config.json` + `model.safetensors`, the same tensor names, the same
//! numbers (post-LN, learned absolute positions, additive attention mask), and sentence-transformers
//! mean pooling on top.
//!
//! Every parameter is a [`candle_core::Var`] in a [`VarMap`] under its HF name
//! (`encoder.layer.0.attention.self.query.weight`, ...), so the engine can train, mask and prune
//! the model, and [`BertModel::save_pretrained`] writes a checkpoint `transformers` loads back.
//! The forward pass only uses ops with a backward: layer norm and softmax are this crate's fused
//! CPU ops with their own backward ([`crate::fused`]), not candle's kernels, which have none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Embedding, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::weights::Weights;
use super::{Layers, LinearHook};
use crate::dropout::unseeded as dropout;
use crate::fused::{softmax_last_dim, LayerNorm};
use crate::linear::{Lin, SparseRows};
use crate::LayerType;
use crate::{init, Error, Result};

/// The `model_type` values this module can load.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["bert"];

/// The `hidden_act` values this module implements.
pub const SUPPORTED_ACTIVATIONS: &[&str] = &["gelu", "gelu_new", "relu"];

/// A BERT `config.json`: the fields that shape the network; every other key is ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Must be `"bert"`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// The `transformers` classes the checkpoint was saved from (`BertModel`, `BertForMaskedLM`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Rows of the word embedding table.
    pub vocab_size: usize,
    /// Width of every token representation.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation: `gelu` (exact, erf), `gelu_new` (tanh approximation; also
    /// accepted as `gelu_pytorch_tanh`) or `relu`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Rows of the position embedding table: the longest input.
    pub max_position_embeddings: usize,
    /// Rows of the token type (segment) embedding table.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Only `absolute` (learned positions) is supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// Dropout on embeddings and sub-layer outputs in training ([`BertModel::forward_t`]).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities in training.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Standard deviation of fresh weights ([`BertModel::new`]); not used when loading.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_initializer_range() -> f64 {
    0.02
}

/// The feed-forward activations of [`SUPPORTED_ACTIVATIONS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: x·Φ(x) with the exact normal CDF (erf), as `torch.nn.functional.gelu`.
    GeluErf,
    /// `gelu_new`: the tanh approximation of GELU.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => crate::activation::gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

impl BertConfig {
    /// A configuration with BERT's defaults for everything but the sizes.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        intermediate_size: usize,
        max_position_embeddings: usize,
    ) -> Self {
        Self {
            model_type: Some("bert".into()),
            architectures: Some(vec!["BertModel".into()]),
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            hidden_act: default_hidden_act(),
            max_position_embeddings,
            type_vocab_size: default_type_vocab_size(),
            layer_norm_eps: default_layer_norm_eps(),
            pad_token_id: Some(0),
            position_embedding_type: default_position_embedding_type(),
            hidden_dropout_prob: default_dropout(),
            attention_probs_dropout_prob: default_dropout(),
            initializer_range: default_initializer_range(),
        }
    }

    /// Reads and checks a `config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let text = relprune_io::read_text_capped(path, relprune_io::CONFIG_CAP)
            .map_err(|e| err(format!("cannot read: {e}")))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config(msg) => err(msg),
            other => other,
        })
    }

    /// Parses and checks the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        // The model type first: a Marian or T5 config would otherwise fail on a missing BERT
        // field, which hides the real problem.
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let model_type = value.get("model_type").and_then(|v| v.as_str());
        check_model_type(model_type)?;
        let config: Self = serde_json::from_value(value)
            .map_err(|e| Error::Config(format!("not a BERT config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that this module can build the network the configuration describes.
    pub fn validate(&self) -> Result<()> {
        check_model_type(self.model_type.as_deref())?;
        self.activation()?;
        if self.position_embedding_type != "absolute" {
            return Err(Error::Config(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            )));
        }
        super::check_sizes(
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_attention_heads", self.num_attention_heads),
                ("num_hidden_layers", self.num_hidden_layers),
                ("intermediate_size", self.intermediate_size),
                ("type_vocab_size", self.type_vocab_size),
            ],
            super::MAX_DIM,
        )?;
        super::check_positions(
            self.max_position_embeddings,
            self.hidden_size,
            "hidden_size",
        )?;
        super::check_table(
            "vocab_size × hidden_size",
            self.vocab_size,
            self.hidden_size,
        )?;
        if self.head_dim() * self.num_attention_heads != self.hidden_size {
            return Err(Error::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::Config(format!("{name} {p} must be in [0, 1)")));
            }
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps < 0.0 {
            return Err(Error::Config(format!(
                "layer_norm_eps {} must be non-negative",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }

    /// The feed-forward activation `hidden_act` names.
    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(Error::Config(format!(
                "hidden_act {other:?} is not supported (supported: {})",
                SUPPORTED_ACTIVATIONS.join(", ")
            ))),
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Every parameter of the encoder (without the pooler) as (HF name, shape), in network order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut out = vec![
            (
                "embeddings.word_embeddings.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for (name, out_dim, in_dim) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                out.push((format!("{p}.{name}.weight"), vec![out_dim, in_dim]));
                out.push((format!("{p}.{name}.bias"), vec![out_dim]));
            }
            for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
                out.push((format!("{p}.{name}.weight"), vec![h]));
                out.push((format!("{p}.{name}.bias"), vec![h]));
            }
        }
        out
    }

    /// The pooler's parameters (dense layer on the `[CLS]` token), present in `BertModel` checkpoints.
    pub fn pooler_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        vec![
            ("pooler.dense.weight".into(), vec![h, h]),
            ("pooler.dense.bias".into(), vec![h]),
        ]
    }
}

fn check_model_type(model_type: Option<&str>) -> Result<()> {
    match model_type {
        Some(t) if SUPPORTED_MODEL_TYPES.contains(&t) => Ok(()),
        Some(t) => Err(Error::Config(format!(
            "model_type {t:?} is not supported by the BERT encoder (supported: {})",
            SUPPORTED_MODEL_TYPES.join(", ")
        ))),
        None => Err(Error::Config(format!(
            "no model_type (supported: {})",
            SUPPORTED_MODEL_TYPES.join(", ")
        ))),
    }
}

/// One post-LN encoder layer.
#[derive(Clone, Debug)]
struct Layer {
    query: Lin,
    key: Lin,
    value: Lin,
    attn_out: Lin,
    attn_norm: LayerNorm,
    intermediate: Lin,
    output: Lin,
    out_norm: LayerNorm,
}

/// A BERT encoder whose parameters live in a [`VarMap`] under their Hugging Face names.
#[derive(Clone)]
pub struct BertModel {
    config: BertConfig,
    activation: Activation,
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<Lin>,
    varmap: VarMap,
    hook: Option<LinearHook>,
}

impl std::fmt::Debug for BertModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertModel")
            .field("config", &self.config)
            .field("pooler", &self.pooler.is_some())
            .finish_non_exhaustive()
    }
}

impl BertModel {
    /// Loads `dir/config.json` and `dir/model.safetensors` (memory-mapped) into a fresh [`VarMap`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_into(&VarMap::new(), dir, device)
    }

    /// Loads the checkpoint in `dir`, registering its parameters in `varmap` under the HF names
    /// (without a `bert.` prefix). On error `varmap` is unchanged.
    ///
    /// Tensor names may carry a `bert.` prefix (`BertFor*` checkpoints; their heads are ignored)
    /// and layer norms may be called `gamma`/`beta` (old TensorFlow conversions). Half-precision
    /// weights are converted to f32.
    pub fn load_into(varmap: &VarMap, dir: &Path, device: &Device) -> Result<Self> {
        Self::load_into_as(varmap, dir, device, Layers::Dense)
    }

    /// Loads `dir` for inference with every linear layer sparse; weights stored compressed go
    /// straight into sparse layers without a dense copy (see [`Layers::Sparse`]).
    pub fn load_sparse(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_into_as(&VarMap::new(), dir, device, Layers::Sparse)?.to_sparse()
    }

    /// [`Self::load_into`], with the linear layers loaded as `layers` says.
    pub fn load_into_as(
        varmap: &VarMap,
        dir: &Path,
        device: &Device,
        layers: Layers,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: "no such model directory".into(),
            });
        }
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let (tensors, sparse) = read_weights(&config, &path, device, layers)?;
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
            for (name, t) in tensors {
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        Self::from_parts(config, varmap, &sparse)
    }

    /// A network with fresh seeded weights (HF's init: weights of standard deviation
    /// `initializer_range`, drawn uniform here, zero biases, unit layer norms) registered in `varmap`.
    pub fn new(
        config: BertConfig,
        with_pooler: bool,
        varmap: &VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        // U(-a, a) has standard deviation a/√3.
        let bound = config.initializer_range * 3f64.sqrt();
        let mut shapes = config.parameter_shapes();
        if with_pooler {
            shapes.extend(config.pooler_shapes());
        }
        for (name, shape) in shapes {
            if name.contains("LayerNorm") || name.ends_with(".bias") {
                let fill = if name.ends_with("LayerNorm.weight") {
                    1.0
                } else {
                    0.0
                };
                let t = (Tensor::ones(shape.as_slice(), DType::F32, device)? * fill)?;
                varmap
                    .data()
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?
                    .insert(name, Var::from_tensor(&t)?);
            } else {
                init::uniform_var(varmap, &name, &shape, bound, &mut rng, device)?;
            }
        }
        Self::from_varmap(config, varmap)
    }

    /// Builds the modules on the variables already in `varmap` (as [`Self::new`] or
    /// [`Self::load_into`] put them there); the pooler is used when its variables are present.
    pub fn from_varmap(config: BertConfig, varmap: &VarMap) -> Result<Self> {
        Self::from_parts(config, varmap, &SparseRows::default())
    }

    /// [`Self::from_varmap`], with the linear layers whose weights are in `sparse` built
    /// sparse from them (those weights are not in `varmap`).
    fn from_parts(config: BertConfig, varmap: &VarMap, sparse: &SparseRows) -> Result<Self> {
        config.validate()?;
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        let get = |name: &str| -> Result<Tensor> {
            data.get(name)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| Error::Config(format!("the VarMap has no variable `{name}`")))
        };
        let linear = |prefix: &str| -> Result<Lin> {
            let weight = format!("{prefix}.weight");
            let bias = get(&format!("{prefix}.bias"))?;
            sparse.lin(&weight, || get(&weight), Some(bias))
        };
        let eps = config.layer_norm_eps;
        let norm = |prefix: &str| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                get(&format!("{prefix}.weight"))?,
                get(&format!("{prefix}.bias"))?,
                eps,
            ))
        };
        let h = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                Ok(Layer {
                    query: linear(&format!("{p}.attention.self.query"))?,
                    key: linear(&format!("{p}.attention.self.key"))?,
                    value: linear(&format!("{p}.attention.self.value"))?,
                    attn_out: linear(&format!("{p}.attention.output.dense"))?,
                    attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: linear(&format!("{p}.intermediate.dense"))?,
                    output: linear(&format!("{p}.output.dense"))?,
                    out_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pooler = if data.contains_key("pooler.dense.weight") {
            Some(linear("pooler.dense")?)
        } else {
            None
        };
        sparse.check_used()?;
        Ok(Self {
            activation: config.activation()?,
            word: Embedding::new(get("embeddings.word_embeddings.weight")?, h),
            position: Embedding::new(get("embeddings.position_embeddings.weight")?, h),
            token_type: Embedding::new(get("embeddings.token_type_embeddings.weight")?, h),
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
            pooler,
            varmap: varmap.clone(),
            hook: None,
            config,
        })
    }

    /// The same encoder with its linear layers' weights stored sparse, for inference (the
    /// embedding tables stay dense).
    pub fn to_sparse(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    query: l.query.to_sparse()?,
                    key: l.key.to_sparse()?,
                    value: l.value.to_sparse()?,
                    attn_out: l.attn_out.to_sparse()?,
                    intermediate: l.intermediate.to_sparse()?,
                    output: l.output.to_sparse()?,
                    ..l.clone()
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            pooler: self.pooler.as_ref().map(Lin::to_sparse).transpose()?,
            ..self.clone()
        })
    }

    /// Stops gradients into the word, position and token-type tables. They keep sharing storage
    /// with their variables, so the forward pass is unchanged; backward just no longer computes
    /// (or allocates) their vocabulary-sized gradients, for training that leaves them as they are.
    pub fn freeze_embeddings(&mut self) {
        let h = self.config.hidden_size;
        let detach = |e: &Embedding| Embedding::new(e.embeddings().detach(), h);
        self.word = detach(&self.word);
        self.position = detach(&self.position);
        self.token_type = detach(&self.token_type);
    }

    /// Calls `hook` with the input of every encoder linear layer (keyed by its weight name) on
    /// each forward pass from now on; `None` removes it.
    pub fn set_linear_hook(&mut self, hook: Option<LinearHook>) {
        self.hook = hook;
    }

    fn linear(&self, layer: usize, name: &str, lin: &Lin, x: &Tensor) -> Result<Tensor> {
        if let Some(hook) = &self.hook {
            hook(&format!("encoder.layer.{layer}.{name}.weight"), x)?;
        }
        Ok(lin.forward(x)?)
    }

    /// The longest input: the position table's size, or sentence-transformers' `max_seq_length`
    /// (`sentence_bert_config.json` in the checkpoint directory `dir`) when it is smaller.
    pub fn max_input_length(&self, dir: &Path) -> Result<usize> {
        let max_positions = self.config.max_position_embeddings;
        let path = dir.join("sentence_bert_config.json");
        if !path.exists() {
            return Ok(max_positions);
        }
        let value: serde_json::Value = super::read_config(&path, |_| Ok(()))?;
        Ok(match value.get("max_seq_length").and_then(|v| v.as_u64()) {
            Some(n) if n > 0 => max_positions.min(n as usize),
            _ => max_positions,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The variables (HF names), for optimizers, masks and export.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Whether the checkpoint had a pooler (`pooler.dense.*`).
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (atomically) in the layout
    /// `transformers`' `BertModel.from_pretrained` reads.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let err = |path: PathBuf, msg: String| Error::Checkpoint { path, msg };
        std::fs::create_dir_all(dir).map_err(|e| err(dir.into(), format!("cannot create: {e}")))?;
        crate::checkpoint::save(&self.varmap, &dir.join("model.safetensors"))?;
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config)
            .map_err(|e| err(path.clone(), format!("cannot serialize: {e}")))?;
        Ok(relprune_io::write(&path, text.as_bytes())?)
    }

    /// `last_hidden_state` (B, T, H) of `input_ids` (B, T) (u32 or i64).
    ///
    /// `attention_mask` (B, T) holds 1 for real tokens and 0 for padding (default: all ones);
    /// padded keys get the dtype's minimum added to their scores, as `transformers` does, so they
    /// receive zero attention. `token_type_ids` (B, T) default to zeros. Positions are 0..T.
    /// No dropout: this is `transformers`' `model.eval()`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_t(input_ids, attention_mask, token_type_ids, false)
    }

    /// [`Self::forward`], with the config's dropout where `transformers` applies it when `train`
    /// (after the embeddings, on attention probabilities, on each sub-layer's output).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let mut x = self.embed_t(input_ids, token_type_ids, train)?;
        let bias = self.attention_bias(attention_mask, input_ids)?;
        for i in 0..self.layers.len() {
            x = self.layer_t(i, &x, bias.as_ref(), train)?;
        }
        Ok(x)
    }

    /// The number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The hidden states (B, T, H) entering the first encoder layer: word, position and
    /// token-type embeddings, normalized (with dropout when `train`); the inputs are checked
    /// as [`Self::forward`] checks them.
    pub fn embed_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = self.input_shape(input_ids)?;
        let device = input_ids.device();
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            return Err(Error::Config(format!(
                "token id {max_id} is outside the vocabulary (vocab_size {})",
                self.config.vocab_size
            )));
        }
        let types = match token_type_ids {
            Some(tt) => {
                check_shape("token_type_ids", tt, b, t)?;
                let tt = tt.to_dtype(DType::U32)?;
                let max = tt.max_all()?.to_scalar::<u32>()?;
                if max as usize >= self.config.type_vocab_size {
                    return Err(Error::Config(format!(
                        "token type id {max} is outside type_vocab_size {}",
                        self.config.type_vocab_size
                    )));
                }
                tt
            }
            None => Tensor::zeros((b, t), DType::U32, device)?,
        };
        let positions = Tensor::arange(0u32, t as u32, device)?;
        let x = self
            .word
            .forward(&ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .add(&self.token_type.forward(&types)?)?;
        Ok(dropout(&self.emb_norm.forward(&x)?, self.hidden_p(train))?)
    }

    /// The additive attention bias (B, 1, 1, T) of `attention_mask` (B, T) for `input_ids`:
    /// exactly 0 for kept keys and the dtype's minimum for padded ones, like transformers'
    /// `(1.0 - mask) * torch.finfo(dtype).min`; `None` without a mask.
    pub fn attention_bias(
        &self,
        attention_mask: Option<&Tensor>,
        input_ids: &Tensor,
    ) -> Result<Option<Tensor>> {
        let (b, t) = self.input_shape(input_ids)?;
        let Some(m) = attention_mask else {
            return Ok(None);
        };
        check_shape("attention_mask", m, b, t)?;
        let min = f32::MIN as f64;
        Ok(Some(
            m.to_dtype(DType::F32)?
                .affine(-min, min)?
                .reshape((b, 1, 1, t))?,
        ))
    }

    /// `(batch, length)` of `input_ids`, checked: rank 2, not empty, within the positions.
    fn input_shape(&self, input_ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            Error::Config(format!(
                "input_ids must be (batch, length), got shape {:?}",
                input_ids.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(Error::Config(format!(
                "input_ids is empty (shape [{b}, {t}])"
            )));
        }
        if t > self.config.max_position_embeddings {
            return Err(Error::Config(format!(
                "input length {t} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        Ok((b, t))
    }

    /// Encoder layer `i` on hidden states `x` (B, T, H) with the attention bias of
    /// [`Self::attention_bias`] (dropout when `train`): what layer-by-layer pruning runs alone.
    pub fn layer_t(
        &self,
        i: usize,
        x: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let l = self.layers.get(i).ok_or_else(|| {
            Error::Config(format!(
                "encoder layer {i} does not exist (the model has {})",
                self.layers.len()
            ))
        })?;
        self.layer_forward(i, l, x, bias, train)
    }

    fn hidden_p(&self, train: bool) -> f64 {
        if train {
            self.config.hidden_dropout_prob
        } else {
            0.0
        }
    }

    fn layer_forward(
        &self,
        i: usize,
        l: &Layer,
        x: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let p = self.hidden_p(train);
        let attn_p = if train {
            self.config.attention_probs_dropout_prob
        } else {
            0.0
        };
        let (b, t, h) = x.dims3()?;
        let (nh, hd) = (self.config.num_attention_heads, self.config.head_dim());
        let heads = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(self.linear(i, "attention.self.query", &l.query, x)?)?;
        let k = heads(self.linear(i, "attention.self.key", &l.key, x)?)?;
        let v = heads(self.linear(i, "attention.self.value", &l.value, x)?)?;
        let ctx = if attn_p > 0.0 {
            // Dropout on the attention weights needs them as a tensor: the plain ops.
            let mut scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?;
            if let Some(bias) = bias {
                scores = scores.broadcast_add(bias)?;
            }
            let probs = dropout(&softmax_last_dim(&scores)?, attn_p)?;
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, t, h))?
        } else {
            // One fused op with its own backward, heads merged (`relprune_models::ops`).
            crate::ops::attention(&q, &k, &v, bias, 1.0 / (hd as f64).sqrt())?
        };
        let x = l.attn_norm.forward(
            &(dropout(
                &self.linear(i, "attention.output.dense", &l.attn_out, &ctx)?,
                p,
            )? + x)?,
        )?;
        let inner =
            self.activation
                .apply(&self.linear(i, "intermediate.dense", &l.intermediate, &x)?)?;
        let out = self.linear(i, "output.dense", &l.output, &inner)?;
        Ok(l.out_norm.forward(&(dropout(&out, p)? + &x)?)?)
    }

    /// `pooler_output` (B, H): tanh of the pooler's dense layer on the first (`[CLS]`) token;
    /// `None` for checkpoints without a pooler.
    pub fn pool(&self, hidden: &Tensor) -> Result<Option<Tensor>> {
        match &self.pooler {
            None => Ok(None),
            Some(dense) => {
                let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
                Ok(Some(dense.forward(&cls)?.tanh()?))
            }
        }
    }
}

/// An error unless `x` is (b, t), the shape of `input_ids`.
fn check_shape(what: &str, x: &Tensor, b: usize, t: usize) -> Result<()> {
    if x.dims() != [b, t] {
        return Err(Error::Config(format!(
            "{what} has shape {:?}, input_ids has [{b}, {t}]",
            x.dims()
        )));
    }
    Ok(())
}

/// Mean of `hidden` (B, T, H) over the positions where `mask` (B, T) is 1 (sentence-transformers'
/// mean pooling; the count is clamped at 1e-9 as there, so an all-padding row gives zeros).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    Ok(sum.broadcast_div(&count)?)
}

/// Each row of `x` (B, H) divided by its L2 norm (at least 1e-12, as `torch.nn.functional.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Sentence embeddings as sentence-transformers computes them: mean pooling, then L2 normalization.
pub fn sentence_embeddings(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    l2_normalize(&mean_pool(hidden, mask)?)
}

/// Reads, renames and checks every tensor the configuration needs from `path`; errors name the
/// tensor and the file.
fn read_weights(
    config: &BertConfig,
    path: &Path,
    device: &Device,
    layers: Layers,
) -> Result<(HashMap<String, Tensor>, SparseRows)> {
    let weights = Weights::open(path)?;
    let prefix = STORED_PREFIXES
        .into_iter()
        .find(|p| weights.contains(&format!("{p}embeddings.word_embeddings.weight")))
        .ok_or_else(|| weights.error("missing tensor `embeddings.word_embeddings.weight`"))?;
    let mut wanted = config.parameter_shapes();
    if weights.contains(&format!("{prefix}pooler.dense.weight")) {
        wanted.extend(config.pooler_shapes());
    }
    let mut out = HashMap::with_capacity(wanted.len());
    let mut sparse = SparseRows::default();
    for (name, shape) in wanted {
        let candidates = stored_names(prefix, &name);
        let stored = &candidates[0];
        if let Some(rows) = weights.linear_rows(layers, is_linear(&name), stored, &shape)? {
            sparse.insert(name, rows);
            continue;
        }
        let candidates: Vec<&str> = candidates.iter().map(String::as_str).collect();
        out.insert(name, weights.require_any(&candidates, &shape, device)?);
    }
    Ok((out, sparse))
}

/// Prefixes a BERT checkpoint's tensor names may carry (`BertFor*` checkpoints store the
/// encoder under `bert.`).
const STORED_PREFIXES: [&str; 2] = ["", "bert."];

/// The names under which the variable `name` may be stored after `prefix`: layer norms may be
/// called `gamma`/`beta` (old TensorFlow conversions).
fn stored_names(prefix: &str, name: &str) -> Vec<String> {
    let mut out = vec![format!("{prefix}{name}")];
    if let Some(base) = name.strip_suffix("LayerNorm.weight") {
        out.push(format!("{prefix}{base}LayerNorm.gamma"));
    } else if let Some(base) = name.strip_suffix("LayerNorm.bias") {
        out.push(format!("{prefix}{base}LayerNorm.beta"));
    }
    out
}

/// The variables a tensor stored as `name` may be: the inverse of [`stored_names`].
pub fn variable_names(name: &str) -> Vec<String> {
    let base = STORED_PREFIXES
        .iter()
        .rev()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    let mut out = vec![name.to_string(), base.to_string()];
    if let Some(b) = base.strip_suffix("LayerNorm.gamma") {
        out.push(format!("{b}LayerNorm.weight"));
    }
    if let Some(b) = base.strip_suffix("LayerNorm.beta") {
        out.push(format!("{b}LayerNorm.bias"));
    }
    out
}

/// The kind of layer a BERT parameter belongs to.
pub fn layer_type(name: &str) -> LayerType {
    if name.contains("LayerNorm") {
        LayerType::Norm
    } else if name.contains(".attention.") {
        LayerType::Attention
    } else if name.contains(".intermediate.") || name.contains(".output.dense") {
        LayerType::FeedForward
    } else if name.contains("embeddings.") {
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

/// The registry entry of `bert` checkpoints.
pub const ARCHITECTURE: super::Architecture = super::Architecture {
    kind: super::Kind::Encoder,
    model_type: "bert",
    load: |dir, varmap, device, layers| {
        Ok(super::HfModel::Encoder(Box::new(BertModel::load_into_as(
            varmap, dir, device, layers,
        )?)))
    },
    variable_names,
    layer_type,
    token_tables: &["embeddings.word_embeddings.*"],
    position_tables: &[
        "embeddings.position_embeddings.*",
        "embeddings.token_type_embeddings.*",
    ],
    untrained_heads: &["pooler.*"],
};
