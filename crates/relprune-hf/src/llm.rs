//! One-shot pruning of decoder-only LMs, the baselines the method is compared against on them:
//! magnitude, Wanda (Sun et al. 2024: `|W_ij| · ‖X_j‖₂`) and SparseGPT (Frantar & Alistarh
//! 2023, [`relprune_prune::reconstruct`]), each as in its reference code: sequential, layer by
//! layer, the calibration inputs of a decoder layer being the outputs of the layers below it
//! already pruned; the attention and MLP projections pruned, embeddings, norms and the head
//! left dense.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use relprune_core::SelectiveDecay;
use relprune_models::hf::llama::CausalLm;
use relprune_prune::reconstruct::{obs_prune, Gram, ObsConfig};
use serde::Serialize;

use crate::blockwise::{block_params, distill_block};
use crate::error::invalid;
use crate::Result;

/// A one-shot pruning method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OneShot {
    /// The smallest `|W|` of each matrix (all of the matrix compared together).
    Magnitude,
    /// The smallest `|W_ij| · ‖X_j‖₂` of each output row.
    Wanda,
    /// Optimal-brain-surgeon pruning with updates of the survivors (blocks of 128 columns, 1%
    /// dampening).
    #[serde(rename = "sparsegpt")]
    #[cfg_attr(feature = "cli", value(name = "sparsegpt"))]
    SparseGpt,
}

impl OneShot {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Magnitude => "magnitude",
            Self::Wanda => "wanda",
            Self::SparseGpt => "sparsegpt",
        }
    }
}

/// A pruning method for decoder LMs: the method, or one of the one-shot baselines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The selective decay, layer by layer from a baseline's masks ([`Distill`]).
    Relprune,
    /// See [`OneShot::Magnitude`].
    Magnitude,
    /// See [`OneShot::Wanda`].
    Wanda,
    /// See [`OneShot::SparseGpt`].
    #[serde(rename = "sparsegpt")]
    #[cfg_attr(feature = "cli", value(name = "sparsegpt"))]
    SparseGpt,
}

impl Method {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self.one_shot() {
            Some(o) => o.name(),
            None => "relprune",
        }
    }

    /// The baseline it is, if it is one.
    pub fn one_shot(self) -> Option<OneShot> {
        match self {
            Self::Relprune => None,
            Self::Magnitude => Some(OneShot::Magnitude),
            Self::Wanda => Some(OneShot::Wanda),
            Self::SparseGpt => Some(OneShot::SparseGpt),
        }
    }
}

/// The shape of the sparsity a run asks for (with a target fraction for unstructured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Pattern {
    /// Anywhere in each comparison group.
    #[default]
    #[serde(rename = "unstructured")]
    #[cfg_attr(feature = "cli", value(name = "unstructured"))]
    Unstructured,
    /// Two of every four consecutive inputs of a row kept.
    #[serde(rename = "2:4")]
    #[cfg_attr(feature = "cli", value(name = "2:4"))]
    TwoFour,
    /// Four of every eight.
    #[serde(rename = "4:8")]
    #[cfg_attr(feature = "cli", value(name = "4:8"))]
    FourEight,
}

impl Pattern {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unstructured => "unstructured",
            Self::TwoFour => "2:4",
            Self::FourEight => "4:8",
        }
    }

    /// This pattern at `sparsity` (used by unstructured only).
    pub fn at(self, sparsity: f64) -> Sparsity {
        match self {
            Self::Unstructured => Sparsity::Unstructured(sparsity),
            Self::TwoFour => Sparsity::NM(2, 4),
            Self::FourEight => Sparsity::NM(4, 8),
        }
    }
}

/// Which weights an unstructured selection compares with each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each output row of a matrix (Wanda's choice).
    Row,
    /// Each matrix (magnitude's choice in the anchors).
    Layer,
    /// All pruned matrices of the model together (magnitude only: Wanda's metric of a layer is
    /// known only once the layers below it are pruned).
    Global,
}

impl Scope {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Row => "row",
            Self::Layer => "layer",
            Self::Global => "global",
        }
    }
}

/// Which weights may be zeroed together.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Sparsity {
    /// This fraction of each comparison group, anywhere.
    Unstructured(f64),
    /// `n` of every `m` consecutive inputs of a row kept (`2:4`: half zeroed).
    NM(usize, usize),
}

impl Sparsity {
    fn check(self) -> Result<()> {
        match self {
            Self::Unstructured(s) if (0.0..1.0).contains(&s) => Ok(()),
            Self::Unstructured(s) => Err(invalid(format!("sparsity {s} is outside [0, 1)"))),
            Self::NM(n, m) if n < m && m > 0 => Ok(()),
            Self::NM(n, m) => Err(invalid(format!("{n}:{m} is not a pattern (need n < m)"))),
        }
    }
}

/// The method on a decoder LM, one decoder layer at a time: from a baseline's masks, each layer
/// is trained to reproduce the dense model's output of that layer (on the dense model's own
/// hidden states: the layer also makes up for the error of the pruned layers below) from the
/// pruned model's inputs, with the selective decay shrinking the weights irrelevant to that
/// loss; the weights it shrank are then removed and the layer recovers without the regularizer.
/// Memory stays one layer's calibration activations (three copies) and one layer's Adam state.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct Distill {
    /// The baseline that chooses the starting masks (Wanda or SparseGPT).
    pub start: OneShot,
    /// What the regularizer chooses rather than the baseline: for an unstructured target `s`,
    /// the baseline prunes to `s − head_start`; for `n:m`, with any head start, to `n+1:m`.
    pub head_start: f64,
    /// Passes over the calibration windows with the selective decay on.
    pub regularized_epochs: usize,
    /// Passes after the weights it shrank are removed (masks fixed, no regularizer).
    pub recovery_epochs: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// The regularizer of the regularized passes.
    pub regularizer: SelectiveDecay,
    /// The end-to-end stage after the layer-by-layer pass, if any.
    pub end_to_end: Option<EndToEnd>,
}

/// The method's end-to-end stage, after the layer-by-layer pass: the pruned projections (masks
/// fixed) trained so that the model's next-token distribution matches the dense model's on the
/// calibration text. The loss is the KL divergence of the two distributions over the dense
/// model's `top_k` tokens of each position and the rest of the vocabulary lumped together, the
/// dense side cached before pruning (positions × k numbers, not the vocabulary). Memory stays
/// bounded: `group` decoder layers are trained at a time, bottom up, each group with its own
/// Adam state, on sequences of `window` tokens (the calibration windows cut into pieces), the
/// layers below the group run once; a group whose training ends with a worse divergence than
/// it started from is undone.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EndToEnd {
    /// Passes over the calibration pieces per group.
    pub epochs: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Dense-model tokens kept per position.
    pub top_k: usize,
    /// Decoder layers trained together.
    pub group: usize,
    /// Tokens per training sequence.
    pub window: usize,
}

impl Default for EndToEnd {
    fn default() -> Self {
        // Measured on SmolLM2 at 50% (docs/LLM.md): 5e-5 beat 2e-5 (33.91 and 34.04 from 34.44).
        Self {
            epochs: 2,
            lr: 5e-5,
            top_k: 64,
            group: 6,
            window: 128,
        }
    }
}

impl EndToEnd {
    fn check(&self) -> Result<()> {
        if self.epochs == 0
            || self.top_k == 0
            || self.group == 0
            || self.window < 2
            || !(self.lr > 0.0 && self.lr.is_finite())
        {
            return Err(invalid(format!(
                "the end-to-end stage needs at least one pass, one top token, one layer per \
                 group, pieces of at least 2 tokens and a positive learning rate, got {self:?}"
            )));
        }
        Ok(())
    }
}

impl Default for Distill {
    /// Measured best on SmolLM2-135M at 50% (docs/LLM.md): SparseGPT's masks at the target,
    /// four passes of layer distillation at 3e-4. The regularized head start
    /// (`head_start`, `regularized_epochs`) is off: at this budget it measured no better.
    fn default() -> Self {
        Self {
            start: OneShot::SparseGpt,
            head_start: 0.0,
            regularized_epochs: 0,
            recovery_epochs: 4,
            lr: 3e-4,
            regularizer: SelectiveDecay {
                relevance: relprune_core::Relevance::Taylor,
                gate: relprune_core::Gate::Hard {
                    stat: relprune_core::GateStat::Quantile(0.25),
                    tau: 1.0,
                },
                lambda: 0.02,
                ..SelectiveDecay::default()
            },
            end_to_end: None,
        }
    }
}

impl Distill {
    fn check(&self) -> Result<()> {
        if self.start == OneShot::Magnitude {
            return Err(invalid(
                "the method starts from Wanda's or SparseGPT's masks",
            ));
        }
        if !((0.0..1.0).contains(&self.head_start) && self.lr > 0.0 && self.lr.is_finite()) {
            return Err(invalid(format!(
                "need a head start in [0, 1) and a positive learning rate, got {} and {}",
                self.head_start, self.lr
            )));
        }
        if let Some(e) = &self.end_to_end {
            e.check()?;
        }
        self.regularizer
            .validate()
            .map_err(|e| invalid(format!("the regularizer: {e}")))
    }

    /// The pattern the baseline prunes to before the regularizer chooses the rest.
    fn start_pattern(&self, target: Sparsity) -> Sparsity {
        match target {
            _ if self.head_start == 0.0 => target,
            Sparsity::Unstructured(s) => Sparsity::Unstructured((s - self.head_start).max(0.0)),
            Sparsity::NM(n, m) if n + 1 < m => Sparsity::NM(n + 1, m),
            Sparsity::NM(..) => target,
        }
    }
}

/// A step done (a decoder layer, or a group of them trained end to end), what progress reports
/// show and checkpoints save: the projections of layers `first..layer` changed.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LayerDone {
    /// The pass: `layer` (layer by layer) or `end-to-end` (then `layer` is the last layer of
    /// the group done and `error` its divergence from the dense model before and after).
    pub stage: &'static str,
    /// The first layer the step changed.
    pub first: usize,
    /// Layers done.
    pub layer: usize,
    /// Layers in all.
    pub layers: usize,
    /// The method only: the layer's output error against the dense model's (squared, relative
    /// to the dense output's) right after its last pruning step, and at the end.
    pub error: Option<(f64, f64)>,
}

/// What [`prune`] did.
#[derive(Clone, Debug, Serialize)]
pub struct OneShotReport {
    /// The method.
    pub method: OneShot,
    /// The pattern.
    pub sparsity: Sparsity,
    /// Calibration windows and their tokens.
    pub calibration_windows: usize,
    /// Calibration tokens in all.
    pub calibration_tokens: usize,
    /// Zeros over all pruned matrices.
    pub zeros: usize,
    /// Weights of all pruned matrices.
    pub weights: usize,
    /// The method only: per layer, [`LayerDone::error`].
    pub layer_errors: Vec<(f64, f64)>,
    /// OWL's sparsity of each decoder layer, when it chose them.
    pub layer_sparsity: Option<Vec<f64>>,
    /// The method's end-to-end stage: per group of layers, the divergence from the dense model
    /// on the calibration pieces before and after its training.
    pub end_to_end: Vec<GroupDone>,
}

/// A group of decoder layers trained end to end.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct GroupDone {
    /// Its first layer.
    pub first: usize,
    /// One past its last layer.
    pub end: usize,
    /// The mean top-k KL divergence before its training.
    pub before: f64,
    /// And after it (equal to `before` when the training was undone).
    pub after: f64,
}

impl OneShotReport {
    /// The fraction of the pruned matrices' weights that are zero.
    pub fn linear_sparsity(&self) -> f64 {
        self.zeros as f64 / self.weights.max(1) as f64
    }
}

/// `count` windows of `len` tokens of `tokens` at the given starts (the anchors list theirs).
pub fn windows_at(tokens: &[u32], starts: &[usize], len: usize) -> Result<Vec<Vec<u32>>> {
    starts
        .iter()
        .map(|&s| {
            tokens.get(s..s + len).map(<[u32]>::to_vec).ok_or_else(|| {
                invalid(format!(
                    "a calibration window at {s} of {len} tokens passes the end of the \
                         {}-token text",
                    tokens.len()
                ))
            })
        })
        .collect()
}

/// The names of the seven linear layers of decoder layer `l`, in forward order.
pub fn linears(l: usize) -> Vec<String> {
    [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    .iter()
    .map(|n| format!("model.layers.{l}.{n}.weight"))
    .collect()
}

/// Per linear layer of one decoder layer, what the method needs of its inputs.
enum Stats {
    None,
    /// Σ x_j² per input feature.
    ColumnSquares(BTreeMap<String, Vec<f64>>),
    /// Σ x xᵀ.
    Gram(BTreeMap<String, Gram>),
}

/// Prunes `model` in place (its variables) with `method` to `sparsity`, calibrated on `windows`
/// of token ids; `progress` after each decoder layer.
pub fn prune(
    model: &CausalLm,
    windows: &[Vec<u32>],
    method: OneShot,
    sparsity: Sparsity,
    mut progress: impl FnMut(&LayerDone),
) -> Result<OneShotReport> {
    let progress = |d: &LayerDone| {
        progress(d);
        Ok(())
    };
    let group = own_group(method);
    run(
        model,
        windows,
        (method, group),
        sparsity,
        None,
        None,
        None,
        progress,
    )
}

/// Prunes `model` in place to `sparsity` with the method ([`Distill`]), calibrated on `windows`;
/// `progress` after each decoder layer.
pub fn prune_distilled(
    model: &CausalLm,
    windows: &[Vec<u32>],
    sparsity: Sparsity,
    cfg: &Distill,
    mut progress: impl FnMut(&LayerDone),
) -> Result<OneShotReport> {
    cfg.check()?;
    let progress = |d: &LayerDone| {
        progress(d);
        Ok(())
    };
    run(
        model,
        windows,
        (cfg.start, own_group(cfg.start)),
        sparsity,
        Some(cfg),
        None,
        None,
        progress,
    )
}

/// A pruning run on a decoder LM, what [`prune_with`] does.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Plan {
    /// The method or a baseline.
    pub method: Method,
    /// The pattern.
    pub sparsity: Sparsity,
    /// OWL's layer sparsities (unstructured only); `None`: the same sparsity in every layer.
    pub owl: Option<Owl>,
    /// The method's settings (with [`Method::Relprune`]).
    pub distill: Distill,
    /// Magnitude's or Wanda's comparison group when unstructured; `None`: each one's own (a
    /// matrix for magnitude, a row for Wanda).
    pub scope: Option<Scope>,
}

/// Where an interrupted run stood, what [`prune_with`] resumes from: the projections of the
/// steps done as they were checkpointed after them, and what was reported of those steps.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    /// Decoder layers done by the layer-by-layer pass.
    pub layers: usize,
    /// Their output errors (the method).
    pub layer_errors: Vec<(f64, f64)>,
    /// End-to-end groups done.
    pub groups: Vec<GroupDone>,
    /// The projections of every layer done, by name.
    pub weights: std::collections::HashMap<String, Tensor>,
}

/// Prunes `model` in place as `plan` says, calibrated on `windows`, from where `resume` says an
/// earlier run of the same plan stopped (the steps it did are replayed from their saved
/// weights: the result is the uninterrupted run's); `progress` after each step (an error stops
/// the run: how a caller's checkpoint failure or interruption ends it).
pub fn prune_with(
    model: &CausalLm,
    windows: &[Vec<u32>],
    plan: &Plan,
    resume: Option<&Resume>,
    progress: impl FnMut(&LayerDone) -> Result<()>,
) -> Result<OneShotReport> {
    plan.sparsity.check()?;
    let per_layer = match (plan.owl, plan.sparsity) {
        (Some(o), Sparsity::Unstructured(s)) => Some(owl_sparsities(model, windows, s, &o)?),
        (Some(_), Sparsity::NM(..)) => {
            return Err(invalid(
                "OWL's layer sparsities are for unstructured patterns",
            ))
        }
        (None, _) => None,
    };
    let d = &plan.distill;
    let (method, distill) = match plan.method.one_shot() {
        Some(o) => (o, None),
        None => {
            d.check()?;
            (d.start, Some(d))
        }
    };
    check_scope(plan.scope, plan.method, plan.sparsity, plan.owl.is_some())?;
    let group = match (plan.scope, plan.sparsity) {
        (None, _) => own_group(method),
        (Some(Scope::Row), _) => Group::Row,
        (Some(Scope::Layer), _) => Group::Matrix,
        (Some(Scope::Global), Sparsity::Unstructured(s)) => {
            Group::Below(global_threshold(model, s)?)
        }
        (Some(Scope::Global), Sparsity::NM(..)) => unreachable!("refused by check_scope"),
    };
    let mut report = run(
        model,
        windows,
        (method, group),
        plan.sparsity,
        distill,
        per_layer.as_deref(),
        resume,
        progress,
    )?;
    report.layer_sparsity = per_layer;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn run(
    model: &CausalLm,
    windows: &[Vec<u32>],
    (method, group): (OneShot, Group),
    sparsity: Sparsity,
    distill: Option<&Distill>,
    layer_sparsity: Option<&[f64]>,
    resume: Option<&Resume>,
    mut progress: impl FnMut(&LayerDone) -> Result<()>,
) -> Result<OneShotReport> {
    sparsity.check()?;
    let empty = Resume::default();
    let resume = resume.unwrap_or(&empty);
    if resume.layers > model.num_layers() || resume.layer_errors.len() > resume.layers {
        return Err(invalid(format!(
            "a checkpoint of {} layers for a {}-layer model",
            resume.layers,
            model.num_layers()
        )));
    }
    if windows.is_empty() && method != OneShot::Magnitude {
        return Err(invalid(format!("{} needs calibration text", method.name())));
    }
    // Magnitude looks at the weights alone: no calibration pass.
    let windows = if method == OneShot::Magnitude {
        &[][..]
    } else {
        windows
    };
    // The end-to-end stage's targets come from the dense model: before anything is pruned.
    let end_to_end = match distill.and_then(|d| d.end_to_end) {
        Some(e) => {
            let pieces = pieces(windows, e.window);
            let targets = top_k_targets(model, &pieces, e.top_k)?;
            Some((e, pieces, targets))
        }
        None => None,
    };
    let mut hidden = embedded(model, windows)?;
    // The dense model's hidden states, the targets of the method's layer-by-layer distillation.
    let mut dense = match distill {
        Some(_) => hidden.clone(),
        None => Vec::new(),
    };
    let vars = variables(model)?;
    let (mut zeros, mut weights) = (0, 0);
    let mut layer_errors = Vec::new();
    let layers = model.num_layers();
    for l in 0..layers {
        let names = linears(l);
        if distill.is_some() {
            dense = forward_layer(model, l, &dense)?;
        }
        if l < resume.layers {
            // Done before the interruption: its saved weights, and what was reported of it.
            for name in &names {
                let saved = resume.weights.get(name).ok_or_else(|| {
                    invalid(format!("the checkpoint has no `{name}` for layer {l}"))
                })?;
                let var = vars
                    .get(name)
                    .ok_or_else(|| invalid(format!("the model has no variable `{name}`")))?;
                if saved.dims() != var.dims() {
                    return Err(invalid(format!(
                        "the checkpoint's `{name}` has shape {:?}, the model's {:?}",
                        saved.dims(),
                        var.dims()
                    )));
                }
                var.set(saved)?;
            }
            layer_errors.extend(resume.layer_errors.get(l).copied());
            let (z, w) = count_zeros(&vars, &names)?;
            (zeros, weights) = (zeros + z, weights + w);
            hidden = forward_layer(model, l, &hidden)?;
            continue;
        }
        let stats = collect(model, l, &hidden, method)?;
        let target = match (sparsity, layer_sparsity) {
            (Sparsity::Unstructured(_), Some(per_layer)) => Sparsity::Unstructured(per_layer[l]),
            _ => sparsity,
        };
        let first = distill.map_or(target, |d| d.start_pattern(target));
        for name in &names {
            let var = vars
                .get(name)
                .ok_or_else(|| invalid(format!("the model has no variable `{name}`")))?;
            let w = var.as_tensor();
            let pruned = prune_matrix(w, &stats, name, first, group)?;
            var.set(&pruned)?;
        }
        let error = match distill {
            Some(cfg) => Some(distill_layer(
                model, l, &vars, &hidden, &dense, &stats, target, cfg,
            )?),
            None => None,
        };
        layer_errors.extend(error);
        let (z, w) = count_zeros(&vars, &names)?;
        (zeros, weights) = (zeros + z, weights + w);
        // The next layer's inputs: this layer's outputs, pruned.
        hidden = forward_layer(model, l, &hidden)?;
        progress(&LayerDone {
            stage: "layer",
            first: l,
            layer: l + 1,
            layers,
            error,
        })?;
    }
    drop((hidden, dense));
    let groups = match &end_to_end {
        Some((e, pieces, targets)) => train_end_to_end(
            model,
            &vars,
            (pieces, targets),
            e,
            &resume.groups,
            &mut progress,
        )?,
        None => Vec::new(),
    };
    Ok(OneShotReport {
        method,
        sparsity,
        calibration_windows: windows.len(),
        calibration_tokens: windows.iter().map(Vec::len).sum(),
        zeros,
        weights,
        layer_errors,
        layer_sparsity: None,
        end_to_end: groups,
    })
}

/// Zeros and weights of the variables `names`.
fn count_zeros(vars: &BTreeMap<String, Var>, names: &[String]) -> Result<(usize, usize)> {
    let (mut zeros, mut weights) = (0, 0);
    for name in names {
        let v = vars[name].as_tensor().flatten_all()?.to_vec1::<f32>()?;
        zeros += v.iter().filter(|&&x| x == 0.0).count();
        weights += v.len();
    }
    Ok((zeros, weights))
}

/// `windows` cut into consecutive pieces of `len` tokens (a last piece shorter than 2 tokens,
/// which predicts nothing, is dropped).
fn pieces(windows: &[Vec<u32>], len: usize) -> Vec<Vec<u32>> {
    windows
        .iter()
        .flat_map(|w| w.chunks(len.max(2)))
        .filter(|p| p.len() >= 2)
        .map(<[u32]>::to_vec)
        .collect()
}

/// The dense model's next-token distribution on one piece, as the end-to-end stage keeps it.
struct TopK {
    /// The `k` most likely tokens of each position (T, k), u32.
    ids: Tensor,
    /// Their probabilities (T, k).
    probs: Tensor,
    /// The probability of all other tokens (T, 1).
    rest: Tensor,
    /// `Σ p log p` over the `k + 1` bins, summed over positions: the divergence's constant part.
    entropy_term: f64,
}

/// [`TopK`] of every piece, from `model` as it is (dense).
fn top_k_targets(model: &CausalLm, pieces: &[Vec<u32>], k: usize) -> Result<Vec<TopK>> {
    let vocab = model.config().vocab_size;
    let k = k.min(vocab);
    pieces
        .iter()
        .map(|p| {
            let ids = Tensor::from_slice(p, (1, p.len()), &Device::Cpu)?;
            let logits = model.forward(&ids, None)?.squeeze(0)?;
            let rows = logits.to_vec2::<f32>()?;
            let (mut top, mut probs, mut rest) = (Vec::new(), Vec::new(), Vec::new());
            let mut entropy_term = 0.0;
            for row in rows {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                let mut order: Vec<u32> = (0..vocab as u32).collect();
                order.select_nth_unstable_by(k - 1, |&a, &b| {
                    row[b as usize].total_cmp(&row[a as usize])
                });
                let mut kept = 0.0;
                for &i in &order[..k] {
                    let pi = (row[i as usize] as f64 - max).exp() / z;
                    kept += pi;
                    entropy_term += if pi > 0.0 { pi * pi.ln() } else { 0.0 };
                    top.push(i);
                    probs.push(pi as f32);
                }
                let r = (1.0 - kept).max(0.0);
                entropy_term += if r > 0.0 { r * r.ln() } else { 0.0 };
                rest.push(r as f32);
            }
            let t = p.len();
            Ok(TopK {
                ids: Tensor::from_vec(top, (t, k), &Device::Cpu)?,
                probs: Tensor::from_vec(probs, (t, k), &Device::Cpu)?,
                rest: Tensor::from_vec(rest, (t, 1), &Device::Cpu)?,
                entropy_term,
            })
        })
        .collect()
}

/// The mean over positions of KL(dense ‖ `logits`) over the target's `k + 1` bins, as a
/// differentiable scalar.
fn top_k_kl(logits: &Tensor, target: &TopK) -> Result<Tensor> {
    let logits = logits.squeeze(0)?;
    let t = logits.dim(0)?;
    let log_q = candle_nn::ops::log_softmax(&logits, 1)?;
    let log_q_top = log_q.gather(&target.ids, 1)?;
    // The rest's log-probability, floored: a student sure of its top tokens has log(0) there.
    let q_rest = (1.0 - log_q_top.exp()?.sum_keepdim(1)?)?.clamp(1e-12f32, 1f32)?;
    let cross = ((target.probs.clone() * log_q_top)?.sum_all()?
        + (target.rest.clone() * q_rest.log()?)?.sum_all()?)?;
    Ok(((target.entropy_term - cross)? / t as f64)?)
}

/// The end-to-end stage ([`EndToEnd`]) on the pruned `model`, towards `targets` on `pieces`;
/// the groups in `done` were trained before an interruption (the model holds their result).
fn train_end_to_end(
    model: &CausalLm,
    vars: &BTreeMap<String, Var>,
    (pieces, targets): (&[Vec<u32>], &[TopK]),
    cfg: &EndToEnd,
    done: &[GroupDone],
    progress: &mut impl FnMut(&LayerDone) -> Result<()>,
) -> Result<Vec<GroupDone>> {
    let mut hidden = embedded(model, pieces)?;
    let layers = model.num_layers();
    let stage = Distill {
        regularized_epochs: 0,
        recovery_epochs: cfg.epochs,
        lr: cfg.lr,
        ..Distill::default()
    };
    let saved = done;
    let mut done = Vec::new();
    for (g, first) in (0..layers).step_by(cfg.group).enumerate() {
        let end = (first + cfg.group).min(layers);
        if let Some(s) = saved.get(g) {
            if (s.first, s.end) != (first, end) {
                return Err(invalid(format!(
                    "the checkpoint's end-to-end group {g} is layers {}..{}, this run's {first}..{end}",
                    s.first, s.end
                )));
            }
            done.push(*s);
            for l in first..end {
                hidden = forward_layer(model, l, &hidden)?;
            }
            continue;
        }
        let block: Vec<(String, bool)> =
            (first..end).flat_map(linears).map(|n| (n, true)).collect();
        let params = block_params(vars, &block)?;
        // Gradients for this group's layers only: the rest of the model is read detached.
        let view = model.frozen_except(first..end);
        let loss = |i: usize| top_k_kl(&view.logits_from_layer(first, &hidden[i])?, &targets[i]);
        let error = || -> Result<f64> {
            let mut sum = 0.0;
            for i in 0..pieces.len() {
                sum += loss(i)?.to_scalar::<f32>()? as f64;
            }
            Ok(sum / pieces.len().max(1) as f64)
        };
        let (before, after) =
            distill_block(&params, &stage, pieces.len(), &loss, &error, &mut || Ok(()))?;
        done.push(GroupDone {
            first,
            end,
            before,
            after,
        });
        progress(&LayerDone {
            stage: "end-to-end",
            first,
            layer: end,
            layers,
            error: Some((before, after)),
        })?;
        for l in first..end {
            hidden = forward_layer(model, l, &hidden)?;
        }
    }
    Ok(done)
}

/// What `method` needs of the inputs of decoder layer `l`'s linear layers, over `hidden`.
fn collect(model: &CausalLm, l: usize, hidden: &[Tensor], method: OneShot) -> Result<Stats> {
    let mut stats = match method {
        OneShot::Magnitude => return Ok(Stats::None),
        OneShot::Wanda => Stats::ColumnSquares(BTreeMap::new()),
        OneShot::SparseGpt => Stats::Gram(BTreeMap::new()),
    };
    for h in hidden {
        model.layer_forward(l, h, None, &mut |name, x| {
            let d = *x.dims().last().unwrap_or(&0);
            match &mut stats {
                Stats::None => {}
                Stats::ColumnSquares(map) => {
                    let sq = x
                        .reshape(((), d))?
                        .sqr()?
                        .sum(0)?
                        .to_dtype(DType::F64)?
                        .to_vec1::<f64>()?;
                    let acc = map.entry(name.to_string()).or_insert(vec![0.0; d]);
                    for (a, v) in acc.iter_mut().zip(sq) {
                        *a += v;
                    }
                }
                Stats::Gram(map) => {
                    map.entry(name.to_string())
                        .or_insert_with(|| Gram::new(d))
                        .add(x, None)
                        .map_err(|e| relprune_models::Error::Config(format!("{name}: {e}")))?;
                }
            }
            Ok(())
        })?;
    }
    Ok(stats)
}

/// OWL's rule (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): how many outliers each
/// layer has decides its share of the zeros.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Owl {
    /// A weight is an outlier when its Wanda metric exceeds `m` times its layer's mean.
    pub m: f64,
    /// Layer sparsities spread over `target ± lambda`.
    pub lambda: f64,
}

impl Default for Owl {
    /// The paper's settings for LLaMA: `M = 5`, `λ = 0.08`.
    fn default() -> Self {
        Self {
            m: 5.0,
            lambda: 0.08,
        }
    }
}

/// Per decoder layer, the unstructured sparsity OWL gives it for an average of `target`: each
/// layer's outlier ratio `D` (the share of its seven projections' `|W|·‖X‖` above `m` times
/// their mean, on the dense model's calibration inputs), scaled to `[0, 2λ]`, shifted to mean
/// `1 − target`, is its density: layers with more outliers keep more weights.
pub fn owl_sparsities(
    model: &CausalLm,
    windows: &[Vec<u32>],
    target: f64,
    owl: &Owl,
) -> Result<Vec<f64>> {
    if windows.is_empty() {
        return Err(invalid("OWL needs calibration text"));
    }
    if !(owl.m > 0.0 && owl.lambda >= 0.0 && owl.lambda < target.min(1.0 - target) + 1e-12) {
        return Err(invalid(format!(
            "OWL needs M > 0 and 0 ≤ λ ≤ min(target, 1 − target), got M {} λ {}",
            owl.m, owl.lambda
        )));
    }
    let vars = variables(model)?;
    let mut hidden = embedded(model, windows)?;
    let mut ratios = Vec::new();
    for l in 0..model.num_layers() {
        let stats = collect(model, l, &hidden, OneShot::Wanda)?;
        let mut metric = Vec::new();
        for name in linears(l) {
            let w = vars
                .get(&name)
                .ok_or_else(|| invalid(format!("the model has no variable `{name}`")))?;
            metric.extend(
                wanda(w.as_tensor(), &stats, &name)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        let mean = metric.iter().map(|&v| v as f64).sum::<f64>() / metric.len().max(1) as f64;
        let outliers = metric.iter().filter(|&&v| v as f64 > owl.m * mean).count();
        ratios.push(outliers as f64 / metric.len().max(1) as f64);
        hidden = forward_layer(model, l, &hidden)?;
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &r| {
            (a.min(r), b.max(r))
        });
    let scaled: Vec<f64> = ratios
        .iter()
        .map(|r| {
            if hi > lo {
                (r - lo) / (hi - lo) * 2.0 * owl.lambda
            } else {
                0.0
            }
        })
        .collect();
    let mean = scaled.iter().sum::<f64>() / scaled.len().max(1) as f64;
    Ok(scaled.iter().map(|d| target - (d - mean)).collect())
}

/// `w` (the weight `name`) pruned to `sparsity` by the method `stats` are for: magnitude over
/// the matrix, Wanda per row, or SparseGPT (its zeros kept, the survivors updated).
fn prune_matrix(
    w: &Tensor,
    stats: &Stats,
    name: &str,
    sparsity: Sparsity,
    group: Group,
) -> Result<Tensor> {
    Ok(match stats {
        Stats::None => select(w, &w.abs()?, sparsity, group)?,
        Stats::ColumnSquares(_) => select(w, &wanda(w, stats, name)?, sparsity, group)?,
        Stats::Gram(map) => {
            let (s, n_of_m) = match sparsity {
                Sparsity::Unstructured(s) => (s, None),
                Sparsity::NM(n, m) => (0.0, Some((n, m))),
            };
            let cfg = ObsConfig {
                n_of_m,
                ..ObsConfig::default()
            };
            let mask = w.ne(0f32)?.to_dtype(DType::F32)?;
            obs_prune(w, &mask, &map[name].mean()?, s, &cfg)?.weight
        }
    })
}

/// The model's variables by name.
fn variables(model: &CausalLm) -> Result<BTreeMap<String, Var>> {
    crate::blockwise::variables(model.varmap())
}

/// The hidden states of `windows` before the first decoder layer.
fn embedded(model: &CausalLm, windows: &[Vec<u32>]) -> Result<Vec<Tensor>> {
    windows
        .iter()
        .map(|w| {
            let ids = Tensor::from_slice(w, (1, w.len()), &Device::Cpu)?;
            // Held across layers: no graph back to the embedding.
            Ok(model.embed(&ids)?.detach())
        })
        .collect()
}

/// Decoder layer `l` of `model` on each of `hidden`.
fn forward_layer(model: &CausalLm, l: usize, hidden: &[Tensor]) -> Result<Vec<Tensor>> {
    hidden
        .iter()
        .map(|h| Ok(model.layer_forward(l, h, None, &mut |_, _| Ok(()))?))
        .collect()
}

/// Wanda's metric `|W_ij| · ‖X_j‖₂` of the weight `name`, the norms from `stats` (column
/// squares, or the diagonal of the Gram matrix).
fn wanda(w: &Tensor, stats: &Stats, name: &str) -> Result<Tensor> {
    let squares: Vec<f64> = match stats {
        Stats::ColumnSquares(map) => map[name].clone(),
        Stats::Gram(map) => gram_diagonal(&map[name])?,
        Stats::None => return Err(invalid("Wanda's metric needs calibration statistics")),
    };
    wanda_metric(w, &squares)
}

/// `|W_ij| · √squares_j`.
fn wanda_metric(w: &Tensor, squares: &[f64]) -> Result<Tensor> {
    let n = squares.len();
    let norms: Vec<f32> = squares.iter().map(|s| s.sqrt() as f32).collect();
    Ok(w.abs()?
        .broadcast_mul(&Tensor::from_vec(norms, (1, n), w.device())?)?)
}

/// The mean squares of each input feature: the diagonal of the second moment.
fn gram_diagonal(g: &Gram) -> Result<Vec<f64>> {
    let (d, mean) = (g.dim(), g.mean()?);
    Ok((0..d).map(|i| mean[i * d + i]).collect())
}

/// Wanda's step on one matrix `w` from its inputs' second moment `gram`: the entries of lowest
/// `|W_ij| · ‖X_j‖₂` zeroed, per output row (unstructured) or per group (N:M).
pub fn wanda_prune(w: &Tensor, gram: &Gram, sparsity: Sparsity) -> Result<Tensor> {
    select(
        w,
        &wanda_metric(w, &gram_diagonal(gram)?)?,
        sparsity,
        Group::Row,
    )
}

/// The loss block-by-block distillation trains decoder layer `l` with: the mean squared error
/// of its output on the pruned inputs `x` (B, T, D) to the dense layer's outputs `y`, keeping
/// the graph back to the layer's weights.
pub fn layer_distill_loss(model: &CausalLm, l: usize, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let out = model.layer_forward_train(l, x)?;
    Ok((out - y)?.sqr()?.mean_all()?)
}

/// The method on decoder layer `l`, whose weights hold the baseline's start: distils the layer
/// with the selective decay from the pruned inputs `inputs` to the dense outputs `targets`, then
/// removes what is left to reach `sparsity` (lowest `|W_ij|·‖X_j‖` of each row, or of each group
/// for `n:m`), then distils without the regularizer, the masks fixed.
#[allow(clippy::too_many_arguments)]
fn distill_layer(
    model: &CausalLm,
    l: usize,
    vars: &BTreeMap<String, Var>,
    inputs: &[Tensor],
    targets: &[Tensor],
    stats: &Stats,
    sparsity: Sparsity,
    cfg: &Distill,
) -> Result<(f64, f64)> {
    let names = linears(l);
    let block: Vec<(String, bool)> = names.iter().map(|n| (n.clone(), true)).collect();
    let params = block_params(vars, &block)?;
    let loss = |b: usize| layer_distill_loss(model, l, &inputs[b], &targets[b]);
    let error = || -> Result<f64> {
        let (mut diff, mut norm) = (0.0, 0.0);
        for (x, y) in inputs.iter().zip(targets) {
            let out = model.layer_forward(l, x, None, &mut |_, _| Ok(()))?;
            diff += (out - y)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            norm += y.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(diff / norm.max(f64::MIN_POSITIVE))
    };
    // What the regularizer shrank goes, as the starting method removes weights (SparseGPT's
    // choice and updates on the layer's inputs, or Wanda's per row).
    let mut prune_rest = || -> Result<()> {
        for name in &names {
            let w = vars[name].as_tensor();
            vars[name].set(&prune_matrix(w, stats, name, sparsity, Group::Row)?)?;
        }
        Ok(())
    };
    distill_block(&params, cfg, inputs.len(), &loss, &error, &mut prune_rest)
}

/// The comparison group of an unstructured selection.
#[derive(Clone, Copy, PartialEq)]
enum Group {
    /// The whole matrix (magnitude).
    Matrix,
    /// Each output row (Wanda).
    Row,
    /// The whole model, whose threshold is this: every entry at or below it goes.
    Below(f32),
}

/// Checks that `scope` applies to `method` at `sparsity` (with OWL's layer sparsities or not).
pub fn check_scope(
    scope: Option<Scope>,
    method: Method,
    sparsity: Sparsity,
    owl: bool,
) -> Result<()> {
    let Some(scope) = scope else {
        return Ok(());
    };
    match (scope, method, sparsity) {
        (_, Method::Relprune | Method::SparseGpt, _) => Err(invalid(format!(
            "--scope is for magnitude and Wanda; {} chooses its own comparison groups",
            method.name()
        ))),
        (_, _, Sparsity::NM(n, m)) => Err(invalid(format!(
            "--scope {} is for unstructured patterns; {n}:{m} compares each group of {m} inputs",
            scope.name()
        ))),
        (Scope::Global, Method::Wanda, _) => Err(invalid(
            "--scope global is for magnitude: Wanda's metric of a layer is known only once the \
             layers below it are pruned",
        )),
        (Scope::Global, _, _) if owl => Err(invalid(
            "--owl sets each layer's sparsity; --scope global sets none",
        )),
        _ => Ok(()),
    }
}

/// The comparison group a method's reference uses.
fn own_group(method: OneShot) -> Group {
    match method {
        OneShot::Magnitude => Group::Matrix,
        _ => Group::Row,
    }
}

/// The `⌊s·n⌋`-th smallest `|w|` over the `n` weights of every pruned projection of `model`:
/// the threshold of a global magnitude selection. A two-pass radix select on the bits of the
/// non-negative floats (their order is their bits' order), so that no copy of the model's
/// weights is made.
fn global_threshold(model: &CausalLm, s: f64) -> Result<f32> {
    let vars = variables(model)?;
    let names: Vec<String> = (0..model.num_layers()).flat_map(linears).collect();
    let bits = |name: &String| -> Result<Vec<u32>> {
        let v = vars
            .get(name)
            .ok_or_else(|| invalid(format!("the model has no variable `{name}`")))?;
        Ok(v.as_tensor()
            .abs()?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    let mut high = vec![0u64; 1 << 16];
    let mut n = 0u64;
    for name in &names {
        for b in bits(name)? {
            high[(b >> 16) as usize] += 1;
            n += 1;
        }
    }
    if n == 0 {
        return Err(invalid("the model has no projections to prune"));
    }
    let mut k = ((s * n as f64) as u64).min(n - 1);
    let bin = high
        .iter()
        .position(|&c| {
            if k < c {
                true
            } else {
                k -= c;
                false
            }
        })
        .unwrap_or(0) as u32;
    let mut low = Vec::new();
    for name in &names {
        low.extend(bits(name)?.into_iter().filter(|b| b >> 16 == bin));
    }
    low.sort_unstable();
    Ok(f32::from_bits(low[k as usize]))
}

/// `w` with the entries of lowest `metric` zeroed as the references do: unstructured over the
/// matrix, every entry at or below the `⌊s·n⌋`-th smallest (ties included); unstructured per
/// row, the `⌊s·cols⌋` smallest of each row (a stable sort); N:M, all but the `n` largest of
/// each group of `m` consecutive inputs (`torch.topk`'s choice among ties).
fn select(w: &Tensor, metric: &Tensor, sparsity: Sparsity, group: Group) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let m: Vec<f32> = metric.flatten_all()?.to_vec1()?;
    let mut keep = vec![1f32; rows * cols];
    match sparsity {
        Sparsity::Unstructured(s) if matches!(group, Group::Below(_)) => {
            let Group::Below(threshold) = group else {
                unreachable!("matched above")
            };
            if s > 0.0 {
                for (kv, &v) in keep.iter_mut().zip(&m) {
                    if v <= threshold {
                        *kv = 0.0;
                    }
                }
            }
        }
        Sparsity::Unstructured(s) if group == Group::Matrix => {
            let mut sorted = m.clone();
            sorted.sort_by(f32::total_cmp);
            let k = ((s * sorted.len() as f64) as usize).min(sorted.len().saturating_sub(1));
            let threshold = sorted[k];
            if s > 0.0 {
                for (kv, &v) in keep.iter_mut().zip(&m) {
                    if v <= threshold {
                        *kv = 0.0;
                    }
                }
            }
        }
        Sparsity::Unstructured(s) => {
            let k = (s * cols as f64) as usize;
            for r in 0..rows {
                let row = &m[r * cols..(r + 1) * cols];
                let mut order: Vec<usize> = (0..cols).collect();
                order.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
                for &c in &order[..k] {
                    keep[r * cols + c] = 0.0;
                }
            }
        }
        Sparsity::NM(n, group_len) => {
            if cols % group_len != 0 {
                return Err(invalid(format!(
                    "{n}:{group_len} needs the {cols} inputs to be a multiple of {group_len}"
                )));
            }
            for r in 0..rows {
                for g in (0..cols).step_by(group_len) {
                    let at = r * cols + g;
                    let kept = torch_topk_largest(&m[at..at + group_len], n);
                    for j in (0..group_len).filter(|j| !kept.contains(j)) {
                        keep[at + j] = 0.0;
                    }
                }
            }
        }
    }
    let keep = Tensor::from_vec(keep, (rows, cols), w.device())?;
    Ok((w * keep)?)
}

/// The indices of the `k` largest of `values`, ties broken as `torch.topk` (largest) on a CPU
/// breaks them: quantized weights hold many equal magnitudes, and which of them a group keeps
/// changes the result (magnitude 2:4 on SmolLM2's Q4_1 weights: 1372.77 with this rule, the
/// anchors' 1372.76; 1077 with ties broken by position, 971 keeping what `topk` of the smallest
/// leaves). PyTorch selects with libstdc++'s `nth_element` on (value, index) pairs when
/// `64·k > n`, which this replays step by step.
fn torch_topk_largest(values: &[f32], k: usize) -> Vec<usize> {
    let n = values.len();
    if k == 0 {
        return Vec::new();
    }
    if k >= n {
        return (0..n).collect();
    }
    let mut q: Vec<usize> = (0..n).collect();
    // torch's comparator for the largest: NaN first, then larger values ("less" = goes first).
    let less = |a: usize, b: usize| {
        let (x, y) = (values[a], values[b]);
        (x.is_nan() && !y.is_nan()) || x > y
    };
    if 64 * k <= n {
        // partial_sort: the k largest in order; which of equal values is libstdc++'s heap's
        // choice, not replayed here (never the case for N:M groups).
        q.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        q.truncate(k);
        return q;
    }
    let nth = k - 1;
    let (mut first, mut last) = (0usize, n);
    let mut depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    while last - first > 3 {
        if depth == 0 {
            // heap_select fallback: only for adversarial inputs far longer than a group.
            q[first..last].sort_by(|&a, &b| values[b].total_cmp(&values[a]));
            break;
        }
        depth -= 1;
        // __unguarded_partition_pivot: median of (first+1, mid, last-1) moved to first.
        let mid = first + (last - first) / 2;
        let (a, b, c) = (first + 1, mid, last - 1);
        let median = if less(q[a], q[b]) {
            if less(q[b], q[c]) {
                b
            } else if less(q[a], q[c]) {
                c
            } else {
                a
            }
        } else if less(q[a], q[c]) {
            a
        } else if less(q[b], q[c]) {
            c
        } else {
            b
        };
        q.swap(first, median);
        // __unguarded_partition(first + 1, last, pivot = first).
        let (mut lo, mut hi) = (first + 1, last);
        let cut = loop {
            while less(q[lo], q[first]) {
                lo += 1;
            }
            hi -= 1;
            while less(q[first], q[hi]) {
                hi -= 1;
            }
            if lo >= hi {
                break lo;
            }
            q.swap(lo, hi);
            lo += 1;
        };
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    // __insertion_sort(first, last).
    for i in first + 1..last {
        let v = q[i];
        if less(v, q[first]) {
            q.copy_within(first..i, first + 1);
            q[first] = v;
        } else {
            let mut j = i;
            while less(v, q[j - 1]) {
                q[j] = q[j - 1];
                j -= 1;
            }
            q[j] = v;
        }
    }
    q.truncate(k);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_are_broken_as_torch_topk_breaks_them() {
        // Each case as torch 2.15's `torch.topk(t, 2)` answered on this machine.
        for (v, want) in [
            ([1f32, 1.0, 1.0, 1.0], [2, 3]),
            ([2.0, 1.0, 1.0, 3.0], [0, 3]),
            ([0.5, 0.5, 0.2, 0.9], [1, 3]),
            ([1.0, 2.0, 2.0, 2.0], [2, 3]),
            ([1.0, 2.0, 2.0, 3.0], [2, 3]),
            ([1.0, 3.0, 2.0, 2.0], [1, 3]),
            ([3.0, 1.0, 2.0, 1.0], [0, 2]),
            ([0.5, 0.5, 8.0, 0.1], [1, 2]),
            ([2.0, 2.0, 1.0, 1.0], [0, 1]),
            ([3.0, 3.0, 3.0, 1.0], [1, 2]),
            ([1.0, 1.0, 2.0, 1.0], [2, 3]),
            ([1.0, 4.0, 2.0, 3.0], [1, 3]),
        ] {
            let mut got = torch_topk_largest(&v, 2);
            got.sort();
            assert_eq!(got, want, "{v:?}");
        }
    }

    #[test]
    fn selections_follow_the_reference_rules() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, -2.0, 3.0, -4.0], [0.5, 0.5, 8.0, -0.1]], &dev).unwrap();
        let abs = w.abs().unwrap();
        let rows = |t: Tensor| t.to_vec2::<f32>().unwrap();
        // Matrix-wide, ties at the threshold go too: the 4th smallest of 8 is 1.0 (k = 4 → 2.0).
        assert_eq!(
            rows(select(&w, &abs, Sparsity::Unstructured(0.5), Group::Matrix).unwrap()),
            [[0.0, 0.0, 3.0, -4.0], [0.0, 0.0, 8.0, 0.0]]
        );
        // Per row: two of four in each row.
        assert_eq!(
            rows(select(&w, &abs, Sparsity::Unstructured(0.5), Group::Row).unwrap()),
            [[0.0, 0.0, 3.0, -4.0], [0.0, 0.5, 8.0, 0.0]]
        );
        // 2:4: the two largest of each group of four inputs kept (of the tied 0.5s, torch
        // keeps the second).
        assert_eq!(
            rows(select(&w, &abs, Sparsity::NM(2, 4), Group::Row).unwrap()),
            [[0.0, 0.0, 3.0, -4.0], [0.0, 0.5, 8.0, 0.0]]
        );
    }
}
