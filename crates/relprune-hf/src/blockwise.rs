//! The method one block at a time, for any architecture: a block (a decoder layer, an encoder
//! layer) pruned by a baseline is trained to reproduce the dense model's output of that block
//! from the pruned model's inputs ([`distill_block`]); [`encoder_layers`] runs it over a BERT
//! encoder's layers on token-level hidden states (the decoder LMs' pass is in [`crate::llm`]).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use relprune_models::hf::bert::BertModel;
use relprune_prune::reconstruct::{prune_layers, Gram, ObsConfig};
use relprune_prune::{AdamConfig, MaskedAdam, Masks, Optimizer, Param, ParamSet};
use relprune_tasks::encoder::pad_batch;
use relprune_tasks::{EncoderDistill, GramCollector};
use serde::Serialize;

use crate::error::invalid;
use crate::llm::Distill;
use crate::Result;

/// The method on one block whose prunable weights in `params` hold the baseline's start:
/// `cfg.regularized_epochs` passes of `loss(b)` over batches `0..batches` with masked Adam and
/// the selective decay, `prune_rest` to the target (it removes what the decay shrank), then
/// `cfg.recovery_epochs` passes without the regularizer, masks fixed. Returns `error()` after
/// the pruning step and after recovery; a recovery that ends worse than it started is undone
/// (the block is never left worse than its pruning step made it).
pub fn distill_block(
    params: &ParamSet,
    cfg: &Distill,
    batches: usize,
    loss: &dyn Fn(usize) -> Result<Tensor>,
    error: &dyn Fn() -> Result<f64>,
    prune_rest: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let adam = AdamConfig {
        lr: cfg.lr,
        ..AdamConfig::default()
    };
    let mut opt = MaskedAdam::new(adam, Some(cfg.regularizer))?;
    let epoch = |opt: &mut MaskedAdam, masks: &Masks| -> Result<()> {
        for b in 0..batches {
            let l = loss(b)?;
            opt.step(params, masks, &l.backward()?)?;
        }
        Ok(())
    };
    let masks = Masks::from_nonzero(params)?;
    for _ in 0..cfg.regularized_epochs {
        epoch(&mut opt, &masks)?;
    }
    prune_rest()?;
    let start = error()?;
    let before = params.snapshot()?;
    let masks = Masks::from_nonzero(params)?;
    opt.set_regularizer(None)?;
    opt.reset_state();
    for _ in 0..cfg.recovery_epochs {
        epoch(&mut opt, &masks)?;
    }
    let end = error()?;
    if end > start {
        params.restore(&before)?;
        return Ok((start, start));
    }
    Ok((start, end))
}

/// The variables of `names` as a block's parameters (the `prunable` ones pruned and masked,
/// the others trained freely).
pub fn block_params(vars: &BTreeMap<String, Var>, names: &[(String, bool)]) -> Result<ParamSet> {
    let params = names
        .iter()
        .map(|(name, prunable)| {
            let var = vars
                .get(name)
                .ok_or_else(|| invalid(format!("the model has no variable `{name}`")))?;
            Ok(Param {
                name: name.clone(),
                var: var.clone(),
                prunable: *prunable,
                aliases: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ParamSet::from_params(params)?)
}

/// A model's variables by name.
pub fn variables(varmap: &candle_nn::VarMap) -> Result<BTreeMap<String, Var>> {
    Ok(varmap
        .data()
        .lock()
        .map_err(|_| invalid("VarMap lock poisoned"))?
        .clone()
        .into_iter()
        .collect())
}

/// One encoder layer done: its output error against the dense layer's (relative squared error
/// over the real tokens of the training sentences) after the pruning step and after recovery.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EncoderLayerDone {
    /// The layer (0-based).
    pub layer: usize,
    /// Error after SparseGPT's step.
    pub pruned: f64,
    /// Error after the layer's distillation.
    pub recovered: f64,
}

/// The linear layers of BERT encoder layer `l` (what is pruned).
const LINEARS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];
/// Its layer norms (trained with it, not pruned).
const NORMS: [&str; 2] = ["attention.output.LayerNorm", "output.LayerNorm"];

/// Brings every linear layer of `task`'s encoder to `target` one layer at a time, in forward
/// order, on the token-level hidden states of the training sentences: SparseGPT's step on the
/// pruned model's inputs (their Gram matrices, padding excluded), then [`distill_block`]
/// towards the dense layer's outputs on the dense model's own inputs (so each layer also makes
/// up for the error of the layers below), training its weights, biases and layer norms.
/// `masks` (over `params`, the whole model's) follow the weights. Memory: the training
/// sentences' hidden states twice (pruned inputs, dense outputs) and one layer's Adam state.
pub fn encoder_layers(
    task: &mut EncoderDistill,
    params: &ParamSet,
    masks: &mut Masks,
    target: f64,
    cfg: &Distill,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<EncoderLayerDone>> {
    let device = candle_core::Device::Cpu;
    let (train, pad) = (&task.train, task.pad);
    // Per batch: the attention bias, the real-token mask (B, T, 1) and the token count.
    let mut inputs = Vec::with_capacity(train.batches.len());
    let mut hidden = Vec::with_capacity(train.batches.len());
    for rows in &train.batches {
        let (ids, mask) = pad_batch(&train.ids, rows, pad, &device)?;
        let bias = task.model.attention_bias(Some(&mask), &ids)?;
        let keep = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let count = keep.sum_all()?.to_scalar::<f32>()? as f64;
        hidden.push(task.model.embed_t(&ids, None, false)?.detach());
        inputs.push(Batch {
            bias,
            mask,
            keep,
            count,
        });
    }
    let mut dense = hidden.clone();
    let vars = variables(task.model.varmap())?;
    let layers = task.model.num_layers();
    let mut done = Vec::with_capacity(layers);
    progress.set_length(layers as u64);
    for l in 0..layers {
        let model = &task.model;
        // No dropout: the layer must match a deterministic target.
        let forward = |x: &Tensor, b: usize| -> Result<Tensor> {
            Ok(model.layer_t(l, x, inputs[b].bias.as_ref(), false)?)
        };
        // Stored states are constants: detached, they keep no graph of the layer's variables
        // (which would hold every intermediate of every batch).
        let outputs = |xs: &[Tensor]| -> Result<Vec<Tensor>> {
            xs.iter()
                .enumerate()
                .map(|(b, x)| Ok(forward(x, b)?.detach()))
                .collect()
        };
        // The dense layer's outputs, before any of its weights change.
        dense = outputs(&dense)?;
        let names: Vec<String> = LINEARS
            .iter()
            .map(|n| format!("encoder.layer.{l}.{n}.weight"))
            .collect();
        let grams = layer_grams(model, l, &hidden, &inputs, &names)?;
        prune_layers(params, masks, &grams, target, &ObsConfig::default())?;
        let mut block: Vec<(String, bool)> = names.iter().map(|n| (n.clone(), true)).collect();
        for n in LINEARS {
            block.push((format!("encoder.layer.{l}.{n}.bias"), false));
        }
        for n in NORMS {
            block.push((format!("encoder.layer.{l}.{n}.weight"), false));
            block.push((format!("encoder.layer.{l}.{n}.bias"), false));
        }
        let block = block_params(&vars, &block)?;
        let masked_sq = |b: usize| -> Result<Tensor> {
            let out = forward(&hidden[b], b)?;
            Ok((out - &dense[b])?.sqr()?.broadcast_mul(&inputs[b].keep)?)
        };
        let width = dense.first().map_or(1, |d| d.dim(2).unwrap_or(1)) as f64;
        let loss = |b: usize| -> Result<Tensor> {
            let sq = masked_sq(b)?;
            Ok((sq.sum_all()? / (inputs[b].count * width).max(1.0))?)
        };
        let error = || -> Result<f64> {
            let (mut diff, mut norm) = (0.0, 0.0);
            for b in 0..hidden.len() {
                diff += masked_sq(b)?.sum_all()?.to_scalar::<f32>()? as f64;
                let y = dense[b].sqr()?.broadcast_mul(&inputs[b].keep)?;
                norm += y.sum_all()?.to_scalar::<f32>()? as f64;
            }
            Ok(diff / norm.max(f64::MIN_POSITIVE))
        };
        // SparseGPT's step was the whole pruning: nothing left for a head start to remove.
        let (pruned, recovered) =
            distill_block(&block, cfg, hidden.len(), &loss, &error, &mut || Ok(()))?;
        // The next layer's inputs: this layer's outputs, pruned.
        hidden = outputs(&hidden)?;
        done.push(EncoderLayerDone {
            layer: l,
            pruned,
            recovered,
        });
        progress.inc(1);
    }
    masks.apply(params)?;
    Ok(done)
}

/// The Gram matrices of the inputs of `names` (linear layers of encoder layer `l`) over the
/// hidden states `hidden`, padding excluded.
fn layer_grams(
    model: &BertModel,
    l: usize,
    hidden: &[Tensor],
    inputs: &[Batch],
    names: &[String],
) -> Result<BTreeMap<String, Gram>> {
    let collector = GramCollector::new(names);
    // A clone shares the variables: the hook is set on it alone, for this pass only.
    let mut model = model.clone();
    model.set_linear_hook(Some(collector.hook()));
    for (x, batch) in hidden.iter().zip(inputs) {
        collector.set_mask(&batch.mask)?;
        model.layer_t(l, x, batch.bias.as_ref(), false)?;
    }
    Ok(collector.take()?)
}

/// What a training batch needs besides its hidden states.
struct Batch {
    /// The attention bias.
    bias: Option<Tensor>,
    /// The attention mask (B, T).
    mask: Tensor,
    /// The real tokens as (B, T, 1) f32 weights.
    keep: Tensor,
    /// The number of real tokens.
    count: f64,
}
