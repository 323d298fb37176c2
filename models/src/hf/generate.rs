//! Decoding of encoder–decoder models as `transformers`' `generate` does it: greedy search and
//! beam search, over any model implementing [`Seq2Seq`].
//!
//! Beam search follows `BeamSearchScorer` of `transformers` 4.x: per step, the log-softmax of
//! the logits is added to each beam's running sum; the best `2 × beam_size` (beam, token)
//! candidates of a sentence are walked in score order; a candidate ending in EOS becomes a
//! finished hypothesis (only if it ranks among the first `beam_size`) scored
//! `sum_logprobs / generated_len^length_penalty`, where `generated_len` counts the generated
//! tokens including the EOS and excluding the decoder start token; the first `beam_size`
//! other candidates are the next beams. A sentence stops according to [`EarlyStopping`]; at
//! `max_len` the open beams are added as hypotheses too, and the best hypothesis is returned
//! (with the EOS appended when it ended before `max_len`). `transformers` 5 vectorized this
//! loop with the same scores and stopping tests; it may, in a batch, still update a sentence
//! that 4.x (and this module) already closed, so batched outputs can differ in rare cases.
//!
//! No logits processors run except the optional forced EOS of [`GenerateConfig`] (Marian's
//! `forced_eos_token_id`); sampling, `min_length`, repetition penalties and `bad_words_ids` are
//! not implemented.

use candle_core::{Tensor, D};

pub use crate::seq2seq::{Seq2Seq, SpecialTokens};
use crate::{Error, Result};

/// Score that rules a beam out (as `transformers`' `-1e9` for the initial copies of beam 0).
const NEG: f32 = -1e9;

/// When beam search stops working on a sentence (`early_stopping` of `transformers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `False`: stop once `beam_size` hypotheses are finished and the best open beam, scored as
    /// if it ended now, could not beat the worst of them (a heuristic: it may still have).
    #[default]
    Heuristic,
    /// `True`: stop as soon as `beam_size` hypotheses are finished.
    Always,
    /// `"never"`: stop only when no open beam can beat the worst finished hypothesis even at
    /// its best possible length: `max_len` when `length_penalty > 0` (longer divides a negative
    /// sum by more), the current length otherwise. Never stops a sentence too early, but beams
    /// pruned on the way are still lost (beam search is not exhaustive).
    Never,
}

/// Settings of [`generate`]; [`GenerateConfig::new`] gives `transformers`' defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateConfig {
    /// Most tokens generated after the decoder start token (`max_new_tokens`).
    pub max_len: usize,
    /// Beams; 1 is greedy search.
    pub beam_size: usize,
    /// Exponent of the generated length dividing a finished hypothesis' summed log-probability:
    /// above 0 favours longer, below 0 shorter outputs.
    pub length_penalty: f64,
    /// End of sentence.
    pub eos_token_id: u32,
    /// Padding after EOS.
    pub pad_token_id: u32,
    /// First decoder input.
    pub decoder_start_token_id: u32,
    /// When a sentence's beam search ends.
    pub early_stopping: EarlyStopping,
    /// When set, the last step (the `max_len`-th token) can only be this token, as
    /// `forced_eos_token_id` of Marian's generation config forces EOS.
    pub forced_eos_token_id: Option<u32>,
}

impl GenerateConfig {
    /// Greedy search of up to `max_len` tokens with `special`'s ids, length penalty 1, heuristic
    /// early stopping, no forced EOS.
    pub fn new(special: SpecialTokens, max_len: usize) -> Self {
        Self {
            max_len,
            beam_size: 1,
            length_penalty: 1.0,
            eos_token_id: special.eos,
            pad_token_id: special.pad,
            decoder_start_token_id: special.decoder_start,
            early_stopping: EarlyStopping::Heuristic,
            forced_eos_token_id: None,
        }
    }

    /// `self` with the generation settings a checkpoint directory `dir` declares, read from
    /// `config.json` then `generation_config.json` (the later wins): `num_beams`,
    /// `forced_eos_token_id`, `length_penalty`, `early_stopping`; and the longest output they
    /// ask for (`max_length` counts the decoder start token, `max_new_tokens` does not), which
    /// the caller checks against the model's positions. Errors name the file and the field.
    pub fn with_model_dir(mut self, dir: &std::path::Path) -> Result<(Self, Option<usize>)> {
        use serde_json::Value;
        let mut max_len = None;
        for name in ["config.json", "generation_config.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let v: Value = super::read_config(&path, |_| Ok(()))?;
            let bad = |msg: String| Error::Checkpoint {
                path: path.clone(),
                msg,
            };
            let uint = |key: &str| -> Result<Option<u64>> {
                match v.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(x) => x
                        .as_u64()
                        .map(Some)
                        .ok_or_else(|| bad(format!("`{key}` = {x} is not a non-negative integer"))),
                }
            };
            if let Some(n) = uint("num_beams")? {
                self.beam_size = (n as usize).max(1);
            }
            if let Some(n) = uint("max_length")? {
                max_len = Some((n as usize).saturating_sub(1));
            }
            if let Some(n) = uint("max_new_tokens")? {
                max_len = Some(n as usize);
            }
            if let Some(id) = uint("forced_eos_token_id")? {
                let id = u32::try_from(id)
                    .map_err(|_| bad(format!("forced_eos_token_id {id} is too large")))?;
                self.forced_eos_token_id = Some(id);
            }
            if let Some(x) = v.get("length_penalty").and_then(Value::as_f64) {
                self.length_penalty = x;
            }
            match v.get("early_stopping") {
                Some(Value::Bool(true)) => self.early_stopping = EarlyStopping::Always,
                Some(Value::Bool(false)) => self.early_stopping = EarlyStopping::Heuristic,
                Some(Value::String(s)) if s == "never" => {
                    self.early_stopping = EarlyStopping::Never
                }
                None | Some(Value::Null) => {}
                Some(other) => {
                    return Err(bad(format!(
                        "early_stopping = {other} is not true, false or \"never\""
                    )))
                }
            }
        }
        Ok((self, max_len.filter(|&n| n > 0)))
    }

    fn check(&self) -> Result<()> {
        if self.beam_size == 0 || self.beam_size > MAX_BEAMS {
            return Err(Error::Config(format!(
                "beam_size {} is outside 1..={MAX_BEAMS} (every beam holds its own copy of the \
                 decoder's keys and values)",
                self.beam_size
            )));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::Config(format!(
                "length_penalty {} is not a finite number",
                self.length_penalty
            )));
        }
        Ok(())
    }
}

/// Most beams a search may keep: 128, beyond any published setting (4–10), so that a typo
/// cannot ask for gigabytes of decoder caches (`--beam 100000` once did).
pub const MAX_BEAMS: usize = 128;

/// One decoded sentence.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// The decoder start token, the generated tokens and the EOS if one was generated (no
    /// padding).
    pub ids: Vec<u32>,
    /// Summed log-probability of the generated tokens divided by their number to the power
    /// `length_penalty` (beam search's ranking score).
    pub score: f64,
}

impl Generated {
    /// The generated tokens: without the decoder start token, up to and including EOS.
    pub fn tokens(&self) -> &[u32] {
        &self.ids[1.min(self.ids.len())..]
    }
}

/// Rows of equal length, short ones filled with `pad` (the layout `generate` returns).
pub fn pad_rows(out: &[Generated], pad: u32) -> Vec<Vec<u32>> {
    let len = out.iter().map(|g| g.ids.len()).max().unwrap_or(0);
    out.iter()
        .map(|g| {
            let mut row = g.ids.clone();
            row.resize(len, pad);
            row
        })
        .collect()
}

/// Decodes each row of `input_ids` (B, S) (0/1 `attention_mask` (B, S)): greedy when
/// `beam_size` is 1, beam search otherwise.
pub fn generate<M: Seq2Seq>(
    model: &M,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    config: &GenerateConfig,
) -> Result<Vec<Generated>> {
    config.check()?;
    if config.beam_size == 1 {
        greedy(model, input_ids, attention_mask, config)
    } else {
        beam_search(model, input_ids, attention_mask, config)
    }
}

/// Log-softmax of logits (N, V) as rows of f32.
fn log_probs(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
    Ok(lp.to_vec2()?)
}

/// Replaces every log-probability by `-inf` except that of `eos` (0), on the forced last step.
fn force(row: &mut [f32], eos: u32) {
    for (v, x) in row.iter_mut().enumerate() {
        *x = if v as u32 == eos {
            0.0
        } else {
            f32::NEG_INFINITY
        };
    }
}

fn length_norm(sum_logprobs: f64, generated_len: usize, length_penalty: f64) -> f64 {
    sum_logprobs / (generated_len as f64).powf(length_penalty)
}

/// Greedy search: the argmax token per step; a sentence stops at EOS, is padded while others go
/// on, and decoding ends when all stopped or after `max_len` tokens.
pub fn greedy<M: Seq2Seq>(
    model: &M,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    config: &GenerateConfig,
) -> Result<Vec<Generated>> {
    config.check()?;
    let (b, _) = input_ids.dims2()?;
    let device = input_ids.device();
    let enc = model.encode(input_ids, attention_mask)?;
    let mut cache = model.new_cache();
    let mut out: Vec<Generated> = (0..b)
        .map(|_| Generated {
            ids: vec![config.decoder_start_token_id],
            score: 0.0,
        })
        .collect();
    let mut done = vec![false; b];
    let mut next = vec![config.decoder_start_token_id; b];
    for step in 0..config.max_len {
        if done.iter().all(|&d| d) {
            break;
        }
        let ids = Tensor::from_vec(next.clone(), (b, 1), device)?;
        let logits = model.decode_step(&ids, &enc, attention_mask, &mut cache)?;
        let mut lp = log_probs(&logits)?;
        for (i, row) in lp.iter_mut().enumerate() {
            if done[i] {
                next[i] = config.pad_token_id;
                continue;
            }
            if step + 1 == config.max_len {
                if let Some(eos) = config.forced_eos_token_id {
                    force(row, eos);
                }
            }
            // The first maximum, as torch's argmax.
            let (tok, &best) =
                row.iter()
                    .enumerate()
                    .fold((0, &f32::NEG_INFINITY), |acc, (v, x)| {
                        if *x > *acc.1 {
                            (v, x)
                        } else {
                            acc
                        }
                    });
            let g = &mut out[i];
            g.ids.push(tok as u32);
            g.score += f64::from(best);
            next[i] = tok as u32;
            done[i] = tok as u32 == config.eos_token_id;
        }
    }
    for g in &mut out {
        g.score = length_norm(g.score, g.ids.len() - 1, config.length_penalty);
    }
    Ok(out)
}

/// The finished hypotheses of one sentence: at most `beam_size`, the best kept.
struct Hypotheses {
    beams: Vec<(f64, Vec<u32>)>,
    worst: f64,
}

impl Hypotheses {
    fn new() -> Self {
        Self {
            beams: Vec::new(),
            worst: 1e9,
        }
    }

    /// `BeamHypotheses.add`: keeps `ids` if there is room or it beats the worst.
    fn add(&mut self, ids: Vec<u32>, score: f64, beam_size: usize) {
        if self.beams.len() < beam_size || score > self.worst {
            self.beams.push((score, ids));
            if self.beams.len() > beam_size {
                let mut order: Vec<usize> = (0..self.beams.len()).collect();
                order.sort_by(|&a, &b| self.beams[a].0.total_cmp(&self.beams[b].0));
                self.worst = self.beams[order[1]].0;
                self.beams.remove(order[0]);
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }

    /// `BeamHypotheses.is_done` with `best_sum_logprobs` the best open candidate's running sum
    /// and `generated_len` the length it would have.
    fn is_done(
        &self,
        best_sum_logprobs: f64,
        generated_len: usize,
        config: &GenerateConfig,
    ) -> bool {
        if self.beams.len() < config.beam_size {
            return false;
        }
        let best_len = match config.early_stopping {
            EarlyStopping::Always => return true,
            EarlyStopping::Never if config.length_penalty > 0.0 => config.max_len,
            _ => generated_len,
        };
        self.worst >= length_norm(best_sum_logprobs, best_len, config.length_penalty)
    }
}

/// Beam search of `beam_size` beams per sentence (see the module documentation): the best
/// hypothesis of each.
pub fn beam_search<M: Seq2Seq>(
    model: &M,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    config: &GenerateConfig,
) -> Result<Vec<Generated>> {
    let all = beam_search_nbest(model, input_ids, attention_mask, config)?;
    Ok(all
        .into_iter()
        .filter_map(|list| list.into_iter().next())
        .collect())
}

/// Beam search keeping every sentence's finished hypotheses (up to `beam_size`), best first.
pub fn beam_search_nbest<M: Seq2Seq>(
    model: &M,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    config: &GenerateConfig,
) -> Result<Vec<Vec<Generated>>> {
    config.check()?;
    let k = config.beam_size;
    let (b, _) = input_ids.dims2()?;
    let device = input_ids.device();
    // Every sentence's encoder output, repeated once per beam (rows b*k .. b*k+k-1).
    let expand: Vec<u32> = (0..b as u32)
        .flat_map(|i| std::iter::repeat_n(i, k))
        .collect();
    let expand = Tensor::from_vec(expand, b * k, device)?;
    let enc = model
        .encode(input_ids, attention_mask)?
        .index_select(&expand, 0)?;
    let mask = attention_mask.index_select(&expand, 0)?;
    let mut cache = model.new_cache();
    let mut seqs: Vec<Vec<u32>> = vec![vec![config.decoder_start_token_id]; b * k];
    // Only the first copy of each sentence starts open, so step one expands distinct tokens.
    let mut beam_scores: Vec<f32> = (0..b * k)
        .map(|r| if r % k == 0 { 0.0 } else { NEG })
        .collect();
    let mut hyps: Vec<Hypotheses> = (0..b).map(|_| Hypotheses::new()).collect();
    let mut done = vec![false; b];
    for step in 0..config.max_len {
        let last: Vec<u32> = seqs.iter().map(|s| *s.last().unwrap_or(&0)).collect();
        let ids = Tensor::from_vec(last, (b * k, 1), device)?;
        let logits = model.decode_step(&ids, &enc, &mask, &mut cache)?;
        let mut lp = log_probs(&logits)?;
        let vocab = lp.first().map_or(0, Vec::len);
        if vocab == 0 {
            return Err(Error::Config("the model returned empty logits".into()));
        }
        if step + 1 == config.max_len {
            if let Some(eos) = config.forced_eos_token_id {
                lp.iter_mut().for_each(|row| force(row, eos));
            }
        }
        // Tokens generated so far + the one chosen now.
        let generated_len = step + 1;
        let mut next_scores = vec![0f32; b * k];
        let mut next_tokens = vec![config.pad_token_id; b * k];
        let mut next_rows: Vec<u32> = (0..(b * k) as u32).collect();
        for s in 0..b {
            if done[s] {
                continue;
            }
            let mut cand: Vec<(f32, usize)> = Vec::with_capacity(k * vocab);
            for beam in 0..k {
                let row = s * k + beam;
                let base = beam_scores[row];
                cand.extend(
                    lp[row]
                        .iter()
                        .enumerate()
                        .map(|(v, &x)| (x + base, beam * vocab + v)),
                );
            }
            // Best first; ties go to the lower (beam, token) index.
            let order =
                |a: &(f32, usize), c: &(f32, usize)| c.0.total_cmp(&a.0).then(a.1.cmp(&c.1));
            let keep = (2 * k).min(cand.len());
            if keep < cand.len() {
                cand.select_nth_unstable_by(keep - 1, order);
                cand.truncate(keep);
            }
            cand.sort_by(order);
            let mut filled = 0;
            for (rank, &(score, flat)) in cand.iter().enumerate() {
                let (beam, tok) = (flat / vocab, (flat % vocab) as u32);
                let row = s * k + beam;
                if tok == config.eos_token_id {
                    // transformers only lets the top `beam_size` candidates finish.
                    if rank < k {
                        hyps[s].add(
                            seqs[row].clone(),
                            length_norm(f64::from(score), generated_len, config.length_penalty),
                            k,
                        );
                    }
                } else {
                    let dst = s * k + filled;
                    next_scores[dst] = score;
                    next_tokens[dst] = tok;
                    next_rows[dst] = row as u32;
                    filled += 1;
                    if filled == k {
                        break;
                    }
                }
            }
            if filled < k {
                return Err(Error::Config(format!(
                    "beam search found only {filled} continuations for {k} beams (vocabulary of {vocab})"
                )));
            }
            // As transformers, the best candidate of the step (it may be one that ended).
            let best = cand.first().map_or(f32::NEG_INFINITY, |c| c.0);
            done[s] = hyps[s].is_done(f64::from(best), generated_len, config);
        }
        seqs = next_rows
            .iter()
            .zip(&next_tokens)
            .map(|(&r, &t)| {
                let mut s = seqs[r as usize].clone();
                s.push(t);
                s
            })
            .collect();
        beam_scores = next_scores;
        if done.iter().all(|&d| d) {
            break;
        }
        let identity = next_rows.iter().enumerate().all(|(i, &r)| i as u32 == r);
        if !identity {
            let idx = Tensor::from_vec(next_rows, b * k, device)?;
            model.reorder_cache(&mut cache, &idx)?;
        }
    }
    // Sentences still open at max_len: their beams become hypotheses as they are.
    let mut out = Vec::with_capacity(b);
    for (s, mut h) in hyps.into_iter().enumerate() {
        if !done[s] {
            for beam in 0..k {
                let row = s * k + beam;
                let len = seqs[row].len() - 1;
                let score = length_norm(f64::from(beam_scores[row]), len, config.length_penalty);
                h.add(seqs[row].clone(), score, k);
            }
        }
        // Best first; of equal scores the later one first, as transformers pops the end of a
        // stable ascending sort.
        let mut beams = h.beams;
        beams.reverse();
        beams.sort_by(|a, c| c.0.total_cmp(&a.0));
        let list: Vec<Generated> = beams
            .into_iter()
            .map(|(score, mut ids)| {
                if ids.len() < config.max_len + 1 {
                    // transformers appends the EOS a finished hypothesis was stopped by.
                    ids.push(config.eos_token_id);
                }
                Generated { ids, score }
            })
            .collect();
        if list.is_empty() {
            return Err(Error::Config("beam search finished no hypothesis".into()));
        }
        out.push(list);
    }
    Ok(out)
}
