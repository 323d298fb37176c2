//! Distillation of a BERT encoder against its own dense self: the training loss of a batch is
//! `1 − cos` between the student's sentence embedding (mean pooling, L2-normalized, as
//! sentence-transformers computes it) and the frozen dense model's, computed once before any
//! weight changes; the metric is the mean cosine similarity on a held-out split.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use relprune_models::hf::bert::{sentence_embeddings, BertModel};
use relprune_models::hf::LinearHook;
use relprune_prune::reconstruct::Gram;
use relprune_prune::{Evaluation, MetricSpec, Split, Task};

/// The metric name in reports.
pub const COSINE: &str = "cosine_similarity";

/// Sentences as token ids with the dense model's embeddings of them.
#[derive(Debug)]
pub struct Sentences {
    /// Token ids per sentence (special tokens included, truncated).
    pub ids: Vec<Vec<u32>>,
    /// Batches of sentence indices, each of similar lengths (less padding).
    pub batches: Vec<Vec<usize>>,
    /// The teacher's embeddings, one row per sentence (N, H); `None` until computed.
    pub teacher: Option<Tensor>,
}

impl Sentences {
    /// `ids` grouped into batches of similar lengths, each of at most `batch_size` sentences and
    /// (when `max_tokens > 0`) at most `max_tokens` padded tokens, or a single sentence.
    pub fn new(ids: Vec<Vec<u32>>, batch_size: usize, max_tokens: usize) -> Self {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        // Stable sort by length: deterministic batches with little padding.
        order.sort_by_key(|&i| ids[i].len());
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        for i in order {
            // Sorted: the new sentence is the batch's longest, so it sets the padded length.
            let padded = (current.len() + 1) * ids[i].len();
            let fits =
                current.len() < batch_size.max(1) && (max_tokens == 0 || padded <= max_tokens);
            if !fits && !current.is_empty() {
                batches.push(std::mem::take(&mut current));
            }
            current.push(i);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        Self {
            ids,
            batches,
            teacher: None,
        }
    }

    /// Number of sentences.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no sentences.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Padded `(input_ids, attention_mask)` of the sentences `rows` of `ids`.
pub fn pad_batch(
    ids: &[Vec<u32>],
    rows: &[usize],
    pad: u32,
    device: &Device,
) -> relprune_prune::Result<(Tensor, Tensor)> {
    let picked: Vec<&[u32]> = rows.iter().map(|&i| ids[i].as_slice()).collect();
    relprune_data::text::pad_rows(&picked, pad, device).map_err(|e| task_err(e.to_string()))
}

/// The encoder-distillation task (see the module documentation).
#[derive(Debug)]
pub struct EncoderDistill {
    /// The student: the model being pruned (its variables are the trainer's parameters).
    pub model: BertModel,
    /// Training sentences.
    pub train: Sentences,
    /// Validation sentences (the algorithm's judge).
    pub valid: Sentences,
    /// Test sentences for the report (`None`: the validation split is reported).
    pub test: Option<Sentences>,
    /// Padding id (masked out, any valid id works).
    pub pad: u32,
    /// Seed of the batch order.
    pub seed: u64,
    /// The batch order of the current epoch.
    order: Vec<usize>,
}

impl EncoderDistill {
    /// The task; computes the dense teacher's embeddings of every split now, with `model` as it is.
    pub fn new(
        model: BertModel,
        mut train: Sentences,
        mut valid: Sentences,
        mut test: Option<Sentences>,
        pad: u32,
        seed: u64,
        progress: &indicatif::ProgressBar,
    ) -> relprune_prune::Result<Self> {
        for s in [Some(&mut train), Some(&mut valid), test.as_mut()]
            .into_iter()
            .flatten()
        {
            s.teacher = Some(embed(&model, s, pad, progress)?);
        }
        Ok(Self {
            model,
            train,
            valid,
            test,
            pad,
            seed,
            order: Vec::new(),
        })
    }

    /// The sentences (indices into `train`) of the current epoch's training batches, in order
    /// (empty before [`Task::begin_epoch`]).
    pub fn epoch_batches(&self) -> impl Iterator<Item = &[usize]> {
        self.order.iter().map(|&b| self.train.batches[b].as_slice())
    }

    /// The same task (splits, teacher embeddings) on another model, e.g. the saved one reloaded.
    pub fn with_model(self, model: BertModel) -> Self {
        Self { model, ..self }
    }

    /// `(1 − cos)` per sentence of batch `rows` of `split` (student against teacher), no reduction.
    fn distances(&self, split: &Sentences, rows: &[usize]) -> relprune_prune::Result<Tensor> {
        let device = self.device();
        let (ids, mask) = pad_batch(&split.ids, rows, self.pad, &device)?;
        // No dropout: the student must match the deterministic teacher, and a dropout-free loss
        // keeps the plateau detection and the threshold search on the same footing.
        let hidden = self
            .model
            .forward_t(&ids, Some(&mask), None, false)
            .map_err(task_err)?;
        let student = sentence_embeddings(&hidden, &mask).map_err(task_err)?;
        let teacher = split
            .teacher
            .as_ref()
            .ok_or_else(|| relprune_prune::Error::Task("teacher embeddings missing".into()))?;
        let idx = Tensor::from_vec(
            rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            rows.len(),
            &device,
        )?;
        let t = teacher.index_select(&idx, 0)?;
        let cos = (student * t)?.sum(1)?;
        Ok(cos.affine(-1.0, 1.0)?)
    }

    fn device(&self) -> Device {
        self.model
            .varmap()
            .all_vars()
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// Mean loss and mean cosine over a whole split.
    pub fn evaluate_on(&self, split: &Sentences) -> relprune_prune::Result<Evaluation> {
        let mut sum = 0.0f64;
        for rows in &split.batches {
            let d = self.distances(split, rows)?;
            sum += d.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
        let loss = sum / split.len().max(1) as f64;
        Ok(Evaluation {
            loss,
            metric: 1.0 - loss,
        })
    }
}

impl EncoderDistill {
    /// The second moment of the inputs of every encoder linear layer named in `names` over the
    /// training sentences, padding excluded (the calibration data of reconstruction pruning).
    pub fn input_grams(
        &mut self,
        names: &[String],
        progress: &indicatif::ProgressBar,
    ) -> relprune_prune::Result<BTreeMap<String, Gram>> {
        let collector = GramCollector::new(names);
        self.model.set_linear_hook(Some(collector.hook()));
        let device = self.device();
        let result = (|| -> relprune_prune::Result<()> {
            for rows in &self.train.batches {
                let (ids, mask) = pad_batch(&self.train.ids, rows, self.pad, &device)?;
                collector.set_mask(&mask)?;
                self.model
                    .forward(&ids, Some(&mask), None)
                    .map_err(task_err)?;
                progress.inc(rows.len() as u64);
            }
            Ok(())
        })();
        self.model.set_linear_hook(None);
        result?;
        collector.take()
    }
}

type Shared<T> = Arc<Mutex<T>>;

/// The second moments of the inputs of named linear layers, collected by a model's
/// [`LinearHook`] over forward passes, padding excluded (the calibration data of reconstruction
/// pruning).
pub struct GramCollector {
    grams: Shared<BTreeMap<String, Gram>>,
    keep: Shared<Option<Tensor>>,
    wanted: Arc<BTreeSet<String>>,
}

impl GramCollector {
    /// A collector of the inputs of the linear layers `names` (their weights' names).
    pub fn new(names: &[String]) -> Self {
        Self {
            grams: Arc::default(),
            keep: Arc::default(),
            wanted: Arc::new(names.iter().cloned().collect()),
        }
    }

    /// The hook to install on the model while it runs the calibration passes.
    pub fn hook(&self) -> LinearHook {
        let (grams, keep, wanted) = (self.grams.clone(), self.keep.clone(), self.wanted.clone());
        let poisoned = || candle_core::Error::Msg("calibration statistics: lock poisoned".into());
        Arc::new(move |name: &str, x: &Tensor| {
            if !wanted.contains(name) {
                return Ok(());
            }
            let d = x.dims().last().copied().unwrap_or(0);
            let mut grams = grams.lock().map_err(|_| poisoned())?;
            let g = grams
                .entry(name.to_string())
                .or_insert_with(|| Gram::new(d));
            let keep = keep.lock().map_err(|_| poisoned())?;
            // The error ends the forward pass, which reports it.
            g.add(x, keep.as_ref()).map_err(|e| {
                candle_core::Error::Msg(format!("calibration statistics of {name}: {e}"))
            })
        })
    }

    /// The attention mask (B, T) of the next pass: its padded positions are not counted.
    pub fn set_mask(&self, mask: &Tensor) -> relprune_prune::Result<()> {
        *self.keep.lock().map_err(|_| poisoned())? = Some(mask.clone());
        Ok(())
    }

    /// The matrices collected so far (the collector starts again empty).
    pub fn take(&self) -> relprune_prune::Result<BTreeMap<String, Gram>> {
        Ok(std::mem::take(
            &mut *self.grams.lock().map_err(|_| poisoned())?,
        ))
    }
}

fn poisoned() -> relprune_prune::Error {
    relprune_prune::Error::Task("calibration statistics: lock poisoned".into())
}

/// The model's sentence embeddings (N, H) of every sentence of `s` (mean pooling over the real
/// tokens, L2-normalized, as sentence-transformers computes them), rows in sentence order.
pub fn embed(
    model: &BertModel,
    s: &Sentences,
    pad: u32,
    progress: &indicatif::ProgressBar,
) -> relprune_prune::Result<Tensor> {
    let device = Device::Cpu;
    let h = model.config().hidden_size;
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; s.len()];
    for batch in &s.batches {
        let (ids, mask) = pad_batch(&s.ids, batch, pad, &device)?;
        let hidden = model.forward(&ids, Some(&mask), None).map_err(task_err)?;
        let e = sentence_embeddings(&hidden, &mask)
            .map_err(task_err)?
            .to_vec2::<f32>()?;
        for (&i, v) in batch.iter().zip(e) {
            rows[i] = Some(v);
        }
        progress.inc(batch.len() as u64);
    }
    let flat: Vec<f32> = rows
        .into_iter()
        .flat_map(|r| r.unwrap_or_default())
        .collect();
    Ok(Tensor::from_vec(flat, (s.len(), h), &device)?)
}

/// A BERT sentence-embedding checkpoint ready to embed text: what `relprune embed` runs
/// (tokenize with the model's `tokenizer.json`, truncate as sentence-transformers does, padded
/// batches of similar lengths, mean pooling, L2 normalization).
pub struct Embedder {
    /// The model.
    pub model: BertModel,
    tokenizer: relprune_data::text::TextTokenizer,
    max_len: usize,
    pad: u32,
}

impl Embedder {
    /// Loads the checkpoint in `dir` (dense or compressed) and its tokenizer; `sparse` runs its
    /// pruned layers sparse.
    pub fn load(dir: &std::path::Path, sparse: bool) -> crate::Result<Self> {
        relprune_models::hf::detect_kind(dir, relprune_models::hf::Kind::Encoder)?;
        let model = if sparse {
            BertModel::load_sparse(dir, &Device::Cpu)?
        } else {
            BertModel::load(dir, &Device::Cpu)?
        };
        let tokenizer = relprune_data::text::TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        tokenizer
            .check_vocab(model.config().vocab_size)
            .map_err(|e| {
                crate::Error::Invalid(format!("the tokenizer does not fit the model: {e}"))
            })?;
        let max_len = model.max_input_length(dir)?;
        // Padded positions are masked out, so any valid id will do when the vocabulary has no pad.
        let pad = tokenizer
            .pad_id()
            .or(model.config().pad_token_id)
            .unwrap_or(0);
        Ok(Self {
            model,
            tokenizer,
            max_len,
            pad,
        })
    }

    /// The (N, H) embeddings of `lines`, in order, `batch` sentences per forward pass.
    pub fn embed(&self, lines: &[String], batch: usize) -> crate::Result<Tensor> {
        Ok(self.embed_counting_cuts(lines, batch)?.0)
    }

    /// [`Embedder::embed`], and how many lines were longer than the model's positions and cut
    /// to them (see [`Embedder::max_len`]).
    pub fn embed_counting_cuts(
        &self,
        lines: &[String],
        batch: usize,
    ) -> crate::Result<(Tensor, usize)> {
        if batch == 0 {
            return Err(crate::Error::Invalid(
                "the batch size must be positive".into(),
            ));
        }
        let mut cut = 0;
        let ids = lines
            .iter()
            .map(|s| {
                let (ids, was_cut) = self.tokenizer.encode_cut(s, self.max_len)?;
                cut += usize::from(was_cut);
                Ok(ids)
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let sentences = Sentences::new(ids, batch, 0);
        let hidden = indicatif::ProgressBar::hidden();
        Ok((embed(&self.model, &sentences, self.pad, &hidden)?, cut))
    }

    /// The most tokens a line keeps (the model's positions).
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

fn task_err(e: impl std::fmt::Display) -> relprune_prune::Error {
    relprune_prune::Error::Task(e.to_string())
}

impl Task for EncoderDistill {
    fn metric(&self) -> MetricSpec {
        MetricSpec {
            name: COSINE.into(),
            higher_is_better: true,
        }
    }

    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        // The order depends on (seed, epoch) only, so a resumed run rebuilds any epoch directly.
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E37));
        self.order = (0..self.train.batches.len()).collect();
        self.order.shuffle(&mut rng);
        Ok(self.order.len())
    }

    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        let b = *self
            .order
            .get(index)
            .ok_or_else(|| relprune_prune::Error::Task(format!("batch {index} out of range")))?;
        let rows = self.train.batches[b].clone();
        Ok(self.distances(&self.train, &rows)?.mean_all()?)
    }

    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        match (split, &self.test) {
            (Split::Test, Some(test)) => self.evaluate_on(test),
            _ => self.evaluate_on(&self.valid),
        }
    }

    fn skip_epochs(&mut self, _epochs: usize) -> relprune_prune::Result<()> {
        // Nothing to replay: the order of epoch e is a function of (seed, e).
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_sentence_and_token_limits_and_cover_every_sentence_once() {
        let lens = [3usize, 40, 7, 7, 12, 90, 5, 20, 64, 1, 33, 8];
        let ids: Vec<Vec<u32>> = lens.iter().map(|&n| vec![1; n]).collect();
        let s = Sentences::new(ids, 4, 64);
        let mut seen: Vec<usize> = s.batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for b in &s.batches {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() <= 4, "{b:?}");
            // Over the budget only as a batch of one (the 90-token sentence).
            assert!(b.len() * longest <= 64 || b.len() == 1, "{b:?}");
        }
        // The 90-token sentence alone; the short ones share batches.
        assert!(s.batches.iter().any(|b| b == &vec![5]));
        assert!(s.batches.iter().any(|b| b.len() == 4));
        // Without a token limit: chunks of 4 in length order.
        let ids: Vec<Vec<u32>> = lens.iter().map(|&n| vec![1; n]).collect();
        assert_eq!(Sentences::new(ids, 4, 0).batches.len(), 3);
    }
}
