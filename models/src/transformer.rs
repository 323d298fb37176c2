//! The encoder–decoder Transformer of Vaswani et al. (2017), built to be trained from scratch.
//!
//! The layout follows fairseq's `transformer` model: token embeddings (optionally ×√d_model)
//! plus sinusoidal or learned positions, `N` encoder layers (self-attention, feed-forward) and
//! `N` decoder layers (causal self-attention, cross-attention, feed-forward), each sub-layer
//! wrapped in dropout, a residual connection and a layer norm, and a linear output projection
//! without bias. Post-norm (sub-layer → residual → LayerNorm) is the paper's arrangement;
//! pre-norm (LayerNorm → sub-layer → residual, plus a final layer norm per stack) keeps the
//! residual path an identity and trains more stably, especially small models and deep stacks
//! without learning-rate warm-up.
//!
//! Parameters live in a [`VarMap`] under fairseq-like names
//! (`encoder.layers.0.self_attn.q_proj.weight`, `decoder.layers.1.encoder_attn_layer_norm.bias`,
//! `output_projection.weight`, ...); a tied embedding is one variable, registered once (as
//! `encoder.embed_tokens.weight`), so pruning and optimizers see it once and its gradient sums
//! every use.
//!
//! Initialization and dropout are seeded: dropout masks come from a [`DropoutRng`] derived from
//! the model's seed, restarted per epoch by [`Seq2Seq::seed_dropout`], so a training run repeats
//! bit for bit (candle's own dropout draws from the CPU's unseedable generator).
//!
//! Every op on the training path has a backward: candle's fused `softmax_last_dim` and
//! `LayerNorm` kernels have none, so attention's softmax and the layer norms are this crate's
//! fused CPU ops with their own backward ([`crate::fused`]; plain tensor ops on other devices).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, VarMap};

use crate::linear::Lin;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use crate::attention::DecoderCache;
use crate::attention::{causal_mask, key_mask, Attention, DecoderLayers, MASKED};
use crate::dropout::{Dropout, DropoutRng};
use crate::fused::LayerNorm;
use crate::hf::marian::sinusoidal_positions;
use crate::seq2seq::{EncoderDecoder, SpecialTokens};
use crate::LayerType;
use crate::{init, Error, Result};

/// Layer-norm epsilon of `nn.LayerNorm`'s default.
const LAYER_NORM_EPS: f64 = 1e-5;

/// How token positions enter the embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Positions {
    /// The fixed sinusoids of the paper (sine in the first half of the features, cosine in the
    /// second, as fairseq and tensor2tensor lay them out): no parameters.
    Sinusoidal,
    /// A trained table of `max_len` rows per stack (`{encoder,decoder}.embed_positions.weight`).
    Learned {
        /// Rows of the table; at least the config's `max_len`.
        max_len: usize,
    },
}

/// Which embedding tables are shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Embeddings {
    /// Source table, target table and output projection are three variables.
    Separate,
    /// One table (`encoder.embed_tokens.weight`) for source and target (needs equal vocabularies);
    /// the output projection is its own variable.
    SharedSourceTarget,
    /// One table for source, target and the output projection (needs equal vocabularies).
    SharedAll,
}

fn default_true() -> bool {
    true
}

/// The hyper-parameters of a [`Transformer`] (serializable, so a run can store it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransformerConfig {
    /// Source vocabulary size.
    pub src_vocab: usize,
    /// Target vocabulary size.
    pub tgt_vocab: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Attention heads (must divide `d_model`).
    pub heads: usize,
    /// Inner size of the feed-forward blocks.
    pub ffn_dim: usize,
    /// Encoder layers (at least 1).
    pub encoder_layers: usize,
    /// Decoder layers (at least 1).
    pub decoder_layers: usize,
    /// Dropout on embeddings and on every sub-layer output before the residual sum.
    pub dropout: f32,
    /// Dropout on attention probabilities.
    #[serde(default)]
    pub attention_dropout: f32,
    /// Sinusoidal or learned positions.
    pub positions: Positions,
    /// Longest source or target sequence the model accepts.
    pub max_len: usize,
    /// Which embedding tables are tied.
    pub embeddings: Embeddings,
    /// Pre-layer-norm layers (`false`: post-norm, as the paper). Pre-norm trains more stably for
    /// small models and without warm-up; post-norm often ends slightly better when it trains.
    #[serde(default)]
    pub pre_norm: bool,
    /// Whether token embeddings are multiplied by √d_model (as the paper).
    #[serde(default = "default_true")]
    pub scale_embedding: bool,
    /// Padding id: its embedding row starts at zero and target tokens equal to it are hidden
    /// from decoder self-attention.
    pub pad_id: u32,
    /// The decoder start token (must differ from `pad_id`, which would hide it).
    pub bos_id: u32,
    /// End of sentence.
    pub eos_id: u32,
}

impl TransformerConfig {
    /// The paper's base model (d_model 512, 8 heads, FFN 2048, 6 + 6 layers, dropout 0.1,
    /// sinusoidal positions up to 1024, post-norm) for the given vocabularies, with separate
    /// embeddings and ids pad 0, bos 1, eos 2.
    pub fn base(src_vocab: usize, tgt_vocab: usize) -> Self {
        Self {
            src_vocab,
            tgt_vocab,
            d_model: 512,
            heads: 8,
            ffn_dim: 2048,
            encoder_layers: 6,
            decoder_layers: 6,
            dropout: 0.1,
            attention_dropout: 0.0,
            positions: Positions::Sinusoidal,
            max_len: 1024,
            embeddings: Embeddings::Separate,
            pre_norm: false,
            scale_embedding: true,
            pad_id: 0,
            bos_id: 1,
            eos_id: 2,
        }
    }

    /// Checks that the configuration describes a model that can be built.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.src_vocab == 0 || self.tgt_vocab == 0 {
            return bad("src_vocab and tgt_vocab must be positive".into());
        }
        if self.d_model == 0 || self.ffn_dim == 0 {
            return bad("d_model and ffn_dim must be positive".into());
        }
        if self.heads == 0 || !self.d_model.is_multiple_of(self.heads) {
            return bad(format!(
                "d_model {} is not divisible by heads {}",
                self.d_model, self.heads
            ));
        }
        if self.encoder_layers == 0 || self.decoder_layers == 0 {
            return bad("encoder_layers and decoder_layers must be at least 1".into());
        }
        for (what, p) in [
            ("dropout", self.dropout),
            ("attention_dropout", self.attention_dropout),
        ] {
            // candle's dropout takes [0, 1); NaN fails the range test too.
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{what} {p} is not in [0, 1)"));
            }
        }
        if self.max_len == 0 {
            return bad("max_len must be positive".into());
        }
        if let Positions::Learned { max_len } = self.positions {
            if max_len < self.max_len {
                return bad(format!(
                    "the learned position table has {max_len} rows, fewer than max_len {}",
                    self.max_len
                ));
            }
        }
        if self.embeddings != Embeddings::Separate && self.src_vocab != self.tgt_vocab {
            return bad(format!(
                "{:?} embeddings need equal vocabularies, got src_vocab {} and tgt_vocab {}",
                self.embeddings, self.src_vocab, self.tgt_vocab
            ));
        }
        let vocab = self.src_vocab.min(self.tgt_vocab);
        for (what, id) in [
            ("pad_id", self.pad_id),
            ("bos_id", self.bos_id),
            ("eos_id", self.eos_id),
        ] {
            if id as usize >= vocab {
                return bad(format!(
                    "{what} {id} is outside the smaller vocabulary ({vocab})"
                ));
            }
        }
        if self.bos_id == self.pad_id {
            return bad(format!(
                "bos_id equals pad_id {}: target padding is recognized by its id, so the decoder \
                 start token would be hidden",
                self.pad_id
            ));
        }
        Ok(())
    }

    fn embed_scale(&self) -> f64 {
        crate::hf::marian::embedding_scale(self.scale_embedding, self.d_model)
    }
}

/// Every trainable parameter's name and shape for `config` (a tied table once), in the order
/// [`Transformer::new`] draws them.
pub fn parameter_shapes(config: &TransformerConfig) -> Vec<(String, Vec<usize>)> {
    let d = config.d_model;
    let mut out = vec![(
        "encoder.embed_tokens.weight".to_string(),
        vec![config.src_vocab, d],
    )];
    if config.embeddings == Embeddings::Separate {
        out.push((
            "decoder.embed_tokens.weight".into(),
            vec![config.tgt_vocab, d],
        ));
    }
    if config.embeddings != Embeddings::SharedAll {
        out.push(("output_projection.weight".into(), vec![config.tgt_vocab, d]));
    }
    if let Positions::Learned { max_len } = config.positions {
        for stack in ["encoder", "decoder"] {
            out.push((format!("{stack}.embed_positions.weight"), vec![max_len, d]));
        }
    }
    let linear = |out: &mut Vec<(String, Vec<usize>)>, p: String, i: usize, o: usize| {
        out.push((format!("{p}.weight"), vec![o, i]));
        out.push((format!("{p}.bias"), vec![o]));
    };
    let ln = |out: &mut Vec<(String, Vec<usize>)>, p: String| {
        out.push((format!("{p}.weight"), vec![d]));
        out.push((format!("{p}.bias"), vec![d]));
    };
    for (stack, layers) in [
        ("encoder", config.encoder_layers),
        ("decoder", config.decoder_layers),
    ] {
        for l in 0..layers {
            let p = format!("{stack}.layers.{l}");
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
            linear(&mut out, format!("{p}.fc1"), d, config.ffn_dim);
            linear(&mut out, format!("{p}.fc2"), config.ffn_dim, d);
            ln(&mut out, format!("{p}.final_layer_norm"));
        }
        if config.pre_norm {
            // Pre-norm leaves the residual stream unnormalized; fairseq closes each stack with one.
            ln(&mut out, format!("{stack}.layer_norm"));
        }
    }
    out
}

/// The initial value of parameter `name`: Xavier-uniform matrices (gain 1/√2 for q/k/v, which
/// fairseq found to converge better), N(0, d_model⁻¹) embeddings, output projection and
/// learned positions with the pad row zeroed, unit layer-norm scales, zero biases.
fn initial(
    config: &TransformerConfig,
    name: &str,
    shape: &[usize],
    rng: &mut StdRng,
    device: &Device,
) -> Result<Tensor> {
    let d = config.d_model;
    if name.ends_with("layer_norm.weight") {
        return Ok(Tensor::ones(shape, DType::F32, device)?);
    }
    if shape.len() == 1 {
        return Ok(Tensor::zeros(shape, DType::F32, device)?);
    }
    let table = name.contains("embed_") || name == "output_projection.weight";
    if table {
        let t = init::normal(shape, (d as f64).powf(-0.5), rng, device)?;
        if name.contains("embed_tokens") {
            // The pad row starts at zero (nn.Embedding's padding_idx) and, untied, stays there:
            // pad tokens are never attended, so nothing trains it.
            let pad = config.pad_id as usize;
            let rows = shape[0];
            let keep: Vec<f32> = (0..rows)
                .map(|r| if r == pad { 0.0 } else { 1.0 })
                .collect();
            let keep = Tensor::from_vec(keep, (rows, 1), device)?;
            return Ok(t.broadcast_mul(&keep)?);
        }
        return Ok(t);
    }
    let (fan_out, fan_in) = (shape[0], shape[1]);
    let gain = if ["q_proj", "k_proj", "v_proj"]
        .iter()
        .any(|p| name.contains(p))
    {
        std::f64::consts::FRAC_1_SQRT_2
    } else {
        1.0
    };
    let bound = (gain * (6.0 / (fan_in + fan_out) as f64).sqrt()) as f32;
    let n = fan_out * fan_in;
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// The feed-forward block `fc2(relu(fc1(x)))`.
#[derive(Clone, Debug)]
struct FeedForward {
    fc1: Lin,
    fc2: Lin,
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_relu(x)?)
    }

    fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            fc1: self.fc1.to_sparse()?,
            fc2: self.fc2.to_sparse()?,
        })
    }
}

/// One encoder layer.
#[derive(Clone, Debug)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
}

/// One decoder layer.
#[derive(Clone, Debug)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
}

/// The encoder–decoder Transformer, parameters in a [`VarMap`].
#[derive(Clone, Debug)]
pub struct Transformer {
    config: TransformerConfig,
    src_embed: Tensor,
    tgt_embed: Tensor,
    output_projection: Tensor,
    encoder_positions: Tensor,
    decoder_positions: Tensor,
    encoder_layers: Vec<EncoderLayer>,
    decoder_layers: Vec<DecoderLayer>,
    /// Final layer norms of the encoder and decoder stacks (pre-norm only).
    encoder_norm: Option<LayerNorm>,
    decoder_norm: Option<LayerNorm>,
    /// Dropout masks, shared with the attention layers.
    dropout_rng: DropoutRng,
}

impl Transformer {
    /// A model with fresh weights drawn from a generator seeded with `seed`, registered in
    /// `varmap` (which must not hold any of its names yet).
    pub fn new(
        config: TransformerConfig,
        varmap: &VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let dropout_rng = DropoutRng::new(seed);
        let mut vars = std::collections::HashMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let t = initial(&config, &name, &shape, &mut rng, device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        let take = |name: &str| -> Tensor { vars[name].as_tensor().clone() };
        let linear = |p: &str| {
            Lin::new(
                take(&format!("{p}.weight")),
                Some(take(&format!("{p}.bias"))),
            )
        };
        let ln = |p: &str| {
            LayerNorm::new(
                take(&format!("{p}.weight")),
                take(&format!("{p}.bias")),
                LAYER_NORM_EPS,
            )
        };
        let attention = |p: &str| {
            Attention::new(
                linear(&format!("{p}.q_proj")),
                linear(&format!("{p}.k_proj")),
                linear(&format!("{p}.v_proj")),
                linear(&format!("{p}.out_proj")),
                config.heads,
                config.d_model / config.heads,
            )
            .with_dropout(Dropout::Seeded(
                dropout_rng.clone(),
                config.attention_dropout,
            ))
        };
        let ffn = |p: &str| FeedForward {
            fc1: linear(&format!("{p}.fc1")),
            fc2: linear(&format!("{p}.fc2")),
        };
        let encoder_layers = (0..config.encoder_layers)
            .map(|l| {
                let p = format!("encoder.layers.{l}");
                EncoderLayer {
                    self_attn: attention(&format!("{p}.self_attn")),
                    self_attn_layer_norm: ln(&format!("{p}.self_attn_layer_norm")),
                    ffn: ffn(&p),
                    final_layer_norm: ln(&format!("{p}.final_layer_norm")),
                }
            })
            .collect();
        let decoder_layers = (0..config.decoder_layers)
            .map(|l| {
                let p = format!("decoder.layers.{l}");
                DecoderLayer {
                    self_attn: attention(&format!("{p}.self_attn")),
                    self_attn_layer_norm: ln(&format!("{p}.self_attn_layer_norm")),
                    encoder_attn: attention(&format!("{p}.encoder_attn")),
                    encoder_attn_layer_norm: ln(&format!("{p}.encoder_attn_layer_norm")),
                    ffn: ffn(&p),
                    final_layer_norm: ln(&format!("{p}.final_layer_norm")),
                }
            })
            .collect();
        let (encoder_norm, decoder_norm) = if config.pre_norm {
            (
                Some(ln("encoder.layer_norm")),
                Some(ln("decoder.layer_norm")),
            )
        } else {
            (None, None)
        };
        let src_embed = take("encoder.embed_tokens.weight");
        // Tied tables are the same tensor (same id), so their gradients add up in one variable.
        let tgt_embed = match config.embeddings {
            Embeddings::Separate => take("decoder.embed_tokens.weight"),
            _ => src_embed.clone(),
        };
        let output_projection = match config.embeddings {
            Embeddings::SharedAll => src_embed.clone(),
            _ => take("output_projection.weight"),
        };
        let (encoder_positions, decoder_positions) = match config.positions {
            Positions::Learned { .. } => (
                take("encoder.embed_positions.weight"),
                take("decoder.embed_positions.weight"),
            ),
            Positions::Sinusoidal => {
                let table = sinusoidal_positions(config.max_len, config.d_model, device)?;
                (table.clone(), table)
            }
        };
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(name) = vars.keys().find(|n| data.contains_key(*n)) {
            return Err(Error::Config(format!(
                "the VarMap already holds `{name}`; use a fresh VarMap per model"
            )));
        }
        data.extend(vars);
        drop(data);
        Ok(Self {
            config,
            src_embed,
            tgt_embed,
            output_projection,
            encoder_positions,
            decoder_positions,
            encoder_layers,
            decoder_layers,
            encoder_norm,
            decoder_norm,
            dropout_rng,
        })
    }

    /// The same model with its attention and feed-forward weights stored sparse, for
    /// inference (the embeddings and the output projection stay dense).
    pub fn to_sparse(&self) -> Result<Self> {
        let encoder_layers = self
            .encoder_layers
            .iter()
            .map(|l| {
                Ok(EncoderLayer {
                    self_attn: l.self_attn.to_sparse()?,
                    ffn: l.ffn.to_sparse()?,
                    ..l.clone()
                })
            })
            .collect::<Result<_>>()?;
        let decoder_layers = self
            .decoder_layers
            .iter()
            .map(|l| {
                Ok(DecoderLayer {
                    self_attn: l.self_attn.to_sparse()?,
                    encoder_attn: l.encoder_attn.to_sparse()?,
                    ffn: l.ffn.to_sparse()?,
                    ..l.clone()
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            encoder_layers,
            decoder_layers,
            ..self.clone()
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// Scaled token embeddings of `ids` (B, L) from `table` plus the positions from `offset`,
    /// with dropout when training.
    fn embed(
        &self,
        ids: &Tensor,
        table: &Tensor,
        positions: &Tensor,
        offset: usize,
        train: bool,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if offset + l > self.config.max_len {
            return Err(Error::Config(format!(
                "sequence of {} positions exceeds max_len {}",
                offset + l,
                self.config.max_len
            )));
        }
        let vocab = table.dim(0)?;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        // candle's CPU index_select would fail with a less helpful message (or read garbage on
        // other devices); an empty sequence has nothing to check.
        let max = if l * b == 0 {
            0
        } else {
            flat.max(0)?.to_scalar::<u32>()?
        };
        if max as usize >= vocab {
            return Err(Error::Config(format!(
                "token id {max} is outside the vocabulary ({vocab})"
            )));
        }
        let tok = table
            .index_select(&flat, 0)?
            .reshape((b, l, self.config.d_model))?;
        let tok = (tok * self.config.embed_scale())?;
        let x = tok.broadcast_add(&positions.narrow(0, offset, l)?)?;
        Ok(self.dropout_rng.apply(&x, self.config.dropout, train)?)
    }

    /// One residual sub-layer: `x + drop(f(LN(x)))` pre-norm, `LN(x + drop(f(x)))` post-norm.
    fn residual(
        &self,
        x: &Tensor,
        ln: &LayerNorm,
        train: bool,
        f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if self.config.pre_norm {
            let h = self
                .dropout_rng
                .apply(&f(&ln.forward(x)?)?, self.config.dropout, train)?;
            x + h
        } else {
            let h = self.dropout_rng.apply(&f(x)?, self.config.dropout, train)?;
            ln.forward(&(x + h)?)
        }
    }

    /// The encoder output (B, S, D) of `src_ids` (B, S) with a 0/1 `src_mask` (B, S) hiding
    /// padding; dropout only when `train`.
    pub fn encode_t(&self, src_ids: &Tensor, src_mask: &Tensor, train: bool) -> Result<Tensor> {
        if src_ids.dims2()? != src_mask.dims2()? {
            return Err(Error::Config(format!(
                "source ids {:?} and source mask {:?} differ in shape",
                src_ids.dims(),
                src_mask.dims()
            )));
        }
        let mask = key_mask(src_mask)?;
        let mut h = self.embed(src_ids, &self.src_embed, &self.encoder_positions, 0, train)?;
        for layer in &self.encoder_layers {
            h = self.residual(&h, &layer.self_attn_layer_norm, train, |x| {
                layer.self_attn.self_attend(x, Some(&mask), train)
            })?;
            h = self.residual(&h, &layer.final_layer_norm, train, |x| layer.ffn.forward(x))?;
        }
        if let Some(ln) = &self.encoder_norm {
            h = ln.forward(&h)?;
        }
        Ok(h)
    }

    /// The encoder output (B, S, D) for inference (no dropout).
    pub fn encode(&self, src_ids: &Tensor, src_mask: &Tensor) -> Result<Tensor> {
        self.encode_t(src_ids, src_mask, false)
    }

    /// Logits (B, t, V) of the next `t` target tokens `ids` (B, t) after those in `cache`,
    /// which is extended with their keys and values; dropout only when `train`.
    ///
    /// The cross-attention keys/values are computed from `encoder_hidden` on the first call and
    /// reused after, so later calls must pass the same encoder output (it is not read again).
    fn decode_t(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let past = cache.len();
        let device = ids.device();
        let src = key_mask(src_mask)?;
        // Target keys that are padding are hidden, as the source's; remembered for later steps.
        let pad = (ids
            .to_dtype(DType::U32)?
            .eq(self.config.pad_id)?
            .to_dtype(DType::F32)?
            * MASKED as f64)?;
        let pad = cache.extend_pad_mask(pad)?;
        let self_mask =
            causal_mask(t, past, device)?.broadcast_add(&pad.reshape((b, 1, 1, past + t))?)?;
        let mut h = self.embed(ids, &self.tgt_embed, &self.decoder_positions, past, train)?;
        let caches = cache.layers_for(self.decoder_layers.len())?;
        for (layer, lc) in self.decoder_layers.iter().zip(caches.iter_mut()) {
            h = self.residual(&h, &layer.self_attn_layer_norm, train, |x| {
                layer
                    .self_attn
                    .self_attend_cached(x, &mut lc.self_kv, Some(&self_mask), train)
            })?;
            h = self.residual(&h, &layer.encoder_attn_layer_norm, train, |x| {
                layer.encoder_attn.cross_attend_cached(
                    x,
                    encoder_hidden,
                    &mut lc.cross_kv,
                    Some(&src),
                    train,
                )
            })?;
            h = self.residual(&h, &layer.final_layer_norm, train, |x| layer.ffn.forward(x))?;
        }
        if let Some(ln) = &self.decoder_norm {
            h = ln.forward(&h)?;
        }
        cache.advance(t);
        Ok(crate::ops::linear(&h, &self.output_projection, None)?)
    }

    /// Inference logits (B, t, V) of the next `t` target tokens after those in `cache` (see
    /// [`DecoderCache`]); later calls must pass the same encoder output and source mask.
    pub fn decode_step(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
    ) -> Result<Tensor> {
        self.decode_t(ids, encoder_hidden, src_mask, cache, false)
    }

    /// Logits (B, T, V) of `src_ids` (B, S) with 0/1 `src_mask` (B, S) and the decoder input
    /// `tgt_in` (B, T) (teacher forcing: `bos_id` then the target shifted right); dropout only
    /// when `train`.
    pub fn forward_t(
        &self,
        src_ids: &Tensor,
        src_mask: &Tensor,
        tgt_in: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        <Self as crate::seq2seq::Seq2Seq>::forward_t(self, src_ids, src_mask, tgt_in, train)
    }
}

impl DecoderLayers for Transformer {
    fn decoder_layers(&self) -> usize {
        self.decoder_layers.len()
    }
}

impl EncoderDecoder for Transformer {
    fn encode_t(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        Transformer::encode_t(self, input_ids, attention_mask, train)
    }

    fn decode_t(
        &self,
        ids: &Tensor,
        encoder_hidden: &Tensor,
        src_mask: &Tensor,
        cache: &mut DecoderCache,
        train: bool,
    ) -> Result<Tensor> {
        Transformer::decode_t(self, ids, encoder_hidden, src_mask, cache, train)
    }

    fn special_ids(&self) -> SpecialTokens {
        let c = &self.config;
        SpecialTokens::new(c.pad_id, c.eos_id, c.bos_id)
    }

    fn reseed_dropout(&self, stream: u64) {
        self.dropout_rng.reseed(stream);
    }
}

/// The kind of layer a Transformer parameter belongs to: its names follow Marian's (fairseq's),
/// with the token tables and the output projection outside `model.`.
pub fn layer_type(name: &str) -> LayerType {
    match crate::hf::marian::layer_type(name) {
        LayerType::Other if name.contains("embed_") || name.starts_with("output_projection") => {
            LayerType::Embeddings
        }
        t => t,
    }
}
