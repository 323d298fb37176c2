//! The toy classifier the engine's integration tests train: two linear layers on synthetic data,
//! able to "crash" at the start of a given epoch.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use relprune_prune::{Error, Evaluation, MetricSpec, ParamSet, Selection, Split, Task};

/// A two-layer classifier on synthetic data that can "crash" at the start of a given epoch.
pub struct Toy {
    l1: Linear,
    l2: Linear,
    x: Tensor,
    y: Tensor,
    vx: Tensor,
    vy: Tensor,
    rng: StdRng,
    order: Vec<u32>,
    crash_at: Option<usize>,
}

const BATCH: usize = 16;

fn data(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut xs = Vec::with_capacity(n * 8);
    let mut ys = Vec::with_capacity(n);
    for _ in 0..n {
        let v: Vec<f32> = (0..8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let s0 = v[0] + v[1] - v[2];
        let s1 = v[3] - v[4];
        ys.push(if s0 > 0.3 {
            0u32
        } else if s1 > 0.0 {
            1
        } else {
            2
        });
        xs.extend(v);
    }
    (
        Tensor::from_vec(xs, (n, 8), &Device::Cpu).unwrap(),
        Tensor::from_vec(ys, n, &Device::Cpu).unwrap(),
    )
}

pub fn toy(crash_at: Option<usize>) -> (Toy, ParamSet) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let l1 = candle_nn::linear(8, 32, vb.pp("fc1")).unwrap();
    let l2 = candle_nn::linear(32, 3, vb.pp("fc2")).unwrap();
    // Deterministic weights (candle's init draws from an unseeded generator).
    let mut rng = StdRng::seed_from_u64(7);
    let guard = varmap.data().lock().unwrap();
    let mut vars: Vec<_> = guard.iter().collect();
    vars.sort_by(|a, b| a.0.cmp(b.0));
    for (_, var) in vars {
        let n = var.as_tensor().elem_count();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.4..0.4)).collect();
        let t = Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap();
        var.set(&t).unwrap();
    }
    drop(guard);
    let params = ParamSet::from_varmap(&varmap, &Selection::default()).unwrap();
    let (x, y) = data(256, 1);
    let (vx, vy) = data(128, 2);
    let t = Toy {
        l1,
        l2,
        x,
        y,
        vx,
        vy,
        rng: StdRng::seed_from_u64(3),
        order: Vec::new(),
        crash_at,
    };
    (t, params)
}

impl Toy {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.relu()?)
    }
}

impl Task for Toy {
    fn metric(&self) -> MetricSpec {
        MetricSpec {
            name: "error".into(),
            higher_is_better: false,
        }
    }

    fn begin_epoch(&mut self, epoch: usize) -> relprune_prune::Result<usize> {
        if self.crash_at == Some(epoch) {
            return Err(Error::Task(format!("simulated crash at epoch {epoch}")));
        }
        let n = self.x.dim(0)?;
        self.order = (0..n as u32).collect();
        self.order.shuffle(&mut self.rng);
        Ok(n / BATCH)
    }

    fn batch_loss(&mut self, index: usize) -> relprune_prune::Result<Tensor> {
        let ids = &self.order[index * BATCH..(index + 1) * BATCH];
        let ids = Tensor::new(ids, &Device::Cpu)?;
        let x = self.x.index_select(&ids, 0)?;
        let y = self.y.index_select(&ids, 0)?;
        Ok(candle_nn::loss::cross_entropy(&self.logits(&x)?, &y)?)
    }

    fn evaluate(&mut self, _split: Split) -> relprune_prune::Result<Evaluation> {
        let logits = self.logits(&self.vx)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &self.vy)?.to_scalar::<f32>()? as f64;
        let pred = logits.argmax(1)?;
        let wrong = pred
            .ne(&self.vy)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        Ok(Evaluation {
            loss,
            metric: 100.0 * wrong as f64 / self.vy.dim(0)? as f64,
        })
    }
}

pub fn weights(params: &ParamSet) -> Vec<(String, Vec<f32>)> {
    params
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}
