//! Image classification as a pruning [`Task`]: cross-entropy to train, top-1 error to judge.

use candle_core::{DType, Tensor};
use candle_nn::ModuleT;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use relprune_data::{Augment, ImageDataset};
use relprune_prune::{Evaluation, MetricSpec, Split, Task};

/// The metric name image classification reports.
pub const TOP1_ERROR: &str = "top1_error_pct";

/// A classifier with its train, validation and test sets.
pub struct ImageClassification<M: ModuleT> {
    /// The model (any candle module taking (B, C·H·W) or (B, C, H, W) images).
    pub model: M,
    /// Training examples.
    pub train: ImageDataset,
    /// Validation examples (what the pruning algorithm looks at).
    pub valid: ImageDataset,
    /// Test examples (reported only).
    pub test: ImageDataset,
    /// Training batch size.
    pub batch_size: usize,
    /// Evaluation batch size.
    pub eval_batch_size: usize,
    /// Random crops and flips of the training batches (`None`: the images as they are).
    pub augment: Option<Augment>,
    rng: StdRng,
    seed: u64,
    epoch: usize,
    order: Option<Tensor>,
}

impl<M: ModuleT> ImageClassification<M> {
    /// A task shuffling its training batches with a generator seeded by `seed`.
    pub fn new(
        model: M,
        train: ImageDataset,
        valid: ImageDataset,
        test: ImageDataset,
        batch_size: usize,
        seed: u64,
    ) -> Self {
        Self {
            model,
            train,
            valid,
            test,
            batch_size: batch_size.max(1),
            eval_batch_size: 1000,
            augment: None,
            rng: StdRng::seed_from_u64(seed),
            seed,
            epoch: 0,
            order: None,
        }
    }

    /// Mean cross-entropy and top-1 error (%) of the model on `data`.
    pub fn evaluate_on(&self, data: &ImageDataset) -> relprune_prune::Result<Evaluation> {
        let n = data.len();
        if n == 0 {
            return Err(relprune_prune::Error::Task(
                "evaluation set is empty".into(),
            ));
        }
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        let mut start = 0;
        while start < n {
            let len = self.eval_batch_size.min(n - start);
            let x = data.images.narrow(0, start, len)?;
            let y = data.labels.narrow(0, start, len)?;
            let logits = self.model.forward_t(&x, false)?;
            let l = candle_nn::loss::cross_entropy(&logits, &y)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            loss_sum += l * len as f64;
            correct += relprune_eval::count_correct(&logits, &y)
                .map_err(|e| relprune_prune::Error::Task(e.to_string()))?;
            start += len;
        }
        let metric = relprune_eval::top1_error_pct(correct, n)
            .map_err(|e| relprune_prune::Error::Task(e.to_string()))?;
        Ok(Evaluation {
            loss: loss_sum / n as f64,
            metric,
        })
    }
}

impl<M: ModuleT> Task for ImageClassification<M> {
    fn metric(&self) -> MetricSpec {
        MetricSpec {
            name: TOP1_ERROR.into(),
            higher_is_better: false,
        }
    }

    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        self.epoch = epoch;
        let n = self.train.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.shuffle(&mut self.rng);
        self.order = Some(Tensor::from_vec(order, n, self.train.images.device())?);
        Ok(n.div_ceil(self.batch_size))
    }

    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        Ok(self.batch_logits_loss(index)?.1)
    }

    fn batch_loss_and_outputs(&mut self, index: usize) -> relprune_prune::Result<(Tensor, Tensor)> {
        let (logits, loss) = self.batch_logits_loss(index)?;
        // Tartaglione et al. measure the sensitivity of the class probabilities.
        let probs = candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?;
        Ok((loss, probs))
    }

    fn evaluate(&mut self, split: Split) -> relprune_prune::Result<Evaluation> {
        match split {
            Split::Valid => self.evaluate_on(&self.valid),
            Split::Test => self.evaluate_on(&self.test),
        }
    }
}

impl<M: ModuleT> ImageClassification<M> {
    /// Logits and cross-entropy of training batch `index`, in training mode.
    fn batch_logits_loss(&mut self, index: usize) -> relprune_prune::Result<(Tensor, Tensor)> {
        let order = self
            .order
            .as_ref()
            .ok_or_else(|| relprune_prune::Error::Task("batch_loss before begin_epoch".into()))?;
        let n = self.train.len();
        let start = index * self.batch_size;
        if start >= n {
            return Err(relprune_prune::Error::Task(format!(
                "batch {index} is past the end of the epoch"
            )));
        }
        let ids = order.narrow(0, start, self.batch_size.min(n - start))?;
        let mut x = self.train.images.index_select(&ids, 0)?;
        let y = self.train.labels.index_select(&ids, 0)?;
        if let Some(aug) = &self.augment {
            // Seeded by (seed, epoch, batch), not drawn from a running stream, so a resumed run
            // augments exactly as an uninterrupted one.
            let key = (self.epoch as u64) << 32 | index as u64;
            let mut rng =
                StdRng::seed_from_u64(self.seed ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            x = aug
                .apply(&x, self.train.shape, &mut rng)
                .map_err(|e| relprune_prune::Error::Task(e.to_string()))?;
        }
        let logits = self.model.forward_t(&x, true)?;
        // One fused op (candle's is eight, each a node of the backward).
        let loss = crate::loss::cross_entropy(&logits, &y)
            .map_err(|e| relprune_prune::Error::Task(e.to_string()))?;
        Ok((logits, loss))
    }
}
