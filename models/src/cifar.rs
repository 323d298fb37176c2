//! CIFAR-10 networks of the sparse-training literature: VGG-16 with batch norm, and the CIFAR
//! ResNets of He et al. (2016) — ResNet-20, -32, -56.
//!
//! Parameters are registered in a [`VarMap`] under PyTorch-style names (`features.0.weight`,
//! `layer1.0.conv1.weight`, `bn1.running_mean`, ...), batch-norm running statistics included, so
//! checkpoints hold everything an evaluation needs. Convolutions use [`crate::ops::conv2d`].

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{BatchNorm, Linear, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::ops::{max_pool2d, Conv2d};
use crate::{init, Error, Result};

fn register(varmap: &VarMap, name: &str, t: Tensor) -> Result<Tensor> {
    let var = Var::from_tensor(&t)?;
    let t = var.as_tensor().clone();
    varmap
        .data()
        .lock()
        .map_err(|_| Error::Candle(candle_core::Error::Msg("VarMap lock poisoned".into())))?
        .insert(name.to_string(), var);
    Ok(t)
}

/// A `k×k` convolution without bias, Kaiming-normal initialized (fan-out, ReLU gain: He et al.).
fn conv(
    varmap: &VarMap,
    name: &str,
    (cin, cout, k): (usize, usize, usize),
    (stride, padding): (usize, usize),
    rng: &mut StdRng,
    device: &Device,
) -> Result<Conv2d> {
    let std = (2.0 / (cout * k * k) as f64).sqrt();
    let w = init::normal(&[cout, cin, k, k], std, rng, device)?;
    Ok(Conv2d {
        weight: register(varmap, &format!("{name}.weight"), w)?,
        bias: None,
        stride,
        padding,
    })
}

/// Batch norm with weight 1, bias 0 and fresh running statistics, all in `varmap`.
fn batch_norm(varmap: &VarMap, name: &str, c: usize, device: &Device) -> Result<BatchNorm> {
    let ones = Tensor::ones(c, DType::F32, device)?;
    let zeros = Tensor::zeros(c, DType::F32, device)?;
    let mean = register(varmap, &format!("{name}.running_mean"), zeros.clone())?;
    let var = register(varmap, &format!("{name}.running_var"), ones.clone())?;
    let weight = register(varmap, &format!("{name}.weight"), ones)?;
    let bias = register(varmap, &format!("{name}.bias"), zeros)?;
    // The running statistics are the registered variables themselves (updated in place).
    Ok(BatchNorm::new(c, mean, var, weight, bias, 1e-5)?)
}

/// VGG-16 with batch norm for 32×32 images: 13 conv-BN-ReLU layers in 5 max-pooled stages
/// (64, 64 | 128, 128 | 256 ×3 | 512 ×3 | 512 ×3), then a 512 → `classes` linear layer — the
/// CIFAR variant of the sparse-training papers (e.g. SNIP, sparse VD).
#[derive(Clone, Debug)]
pub struct Vgg16 {
    layers: Vec<Option<(Conv2d, BatchNorm)>>,
    classifier: Linear,
}

impl Vgg16 {
    /// The configuration: channel counts, `None` for a 2×2 max-pool.
    const CFG: [Option<usize>; 18] = [
        Some(64),
        Some(64),
        None,
        Some(128),
        Some(128),
        None,
        Some(256),
        Some(256),
        Some(256),
        None,
        Some(512),
        Some(512),
        Some(512),
        None,
        Some(512),
        Some(512),
        Some(512),
        None,
    ];

    /// A fresh seeded network for 3×32×32 inputs and `classes` outputs.
    pub fn new(varmap: &VarMap, classes: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = Vec::new();
        let mut cin = 3;
        for (i, c) in Self::CFG.iter().enumerate() {
            match c {
                Some(c) => {
                    let cv = conv(
                        varmap,
                        &format!("features.{i}.conv"),
                        (cin, *c, 3),
                        (1, 1),
                        &mut rng,
                        device,
                    )?;
                    let bn = batch_norm(varmap, &format!("features.{i}.bn"), *c, device)?;
                    layers.push(Some((cv, bn)));
                    cin = *c;
                }
                None => layers.push(None),
            }
        }
        let classifier = init::linear(varmap, "classifier", 512, classes, &mut rng, device)?;
        Ok(Self { layers, classifier })
    }
}

impl ModuleT for Vgg16 {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let mut x = x.reshape((b, 3, 32, 32))?;
        for l in &self.layers {
            x = match l {
                Some((c, bn)) => bn.forward_t(&c.forward_t(&x, train)?, train)?.relu()?,
                None => max_pool2d(&x, 2, 2)?,
            };
        }
        candle_core::Module::forward(&self.classifier, &x.flatten_from(1)?)
    }
}

/// How a ResNet block matches its shortcut to a change of shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortcut {
    /// Option A (He et al.'s CIFAR networks): subsample by 2 and pad the new channels with zeros;
    /// no parameters.
    A,
    /// Option B: a 1×1 strided convolution with batch norm.
    B,
}

/// A block's shortcut when the shape changes: the option, its projection (option B) and the
/// number of channels added.
type Downsample = (Shortcut, Option<(Conv2d, BatchNorm)>, usize);

#[derive(Clone, Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    down: Option<Downsample>,
}

impl Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self
            .bn1
            .forward_t(&self.conv1.forward_t(x, train)?, train)?
            .relu()?;
        let y = self
            .bn2
            .forward_t(&self.conv2.forward_t(&y, train)?, train)?;
        let s = match &self.down {
            None => x.clone(),
            Some((_, Some((c, bn)), _)) => bn.forward_t(&c.forward_t(x, train)?, train)?,
            Some((_, None, extra)) => {
                // Option A: every other pixel, then zero channels on both sides.
                let (b, c, h, w) = x.dims4()?;
                let sub = x
                    .reshape((b, c, h / 2, 2, w / 2, 2))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, c, h / 2, w / 2))?;
                let pad = extra / 2;
                sub.pad_with_zeros(1, pad, extra - pad)?
            }
        };
        (y + s)?.relu()
    }
}

/// The CIFAR ResNet of He et al. (2016) with `6n + 2` layers: a 16-channel 3×3 stem, three stages
/// of `n` basic blocks (16, 32, 64 channels; the last two start with stride 2), global average
/// pooling and a 64 → `classes` linear layer. `n` = 3, 5, 9 give ResNet-20, -32, -56.
#[derive(Clone, Debug)]
pub struct CifarResNet {
    stem: Conv2d,
    bn: BatchNorm,
    blocks: Vec<Block>,
    fc: Linear,
}

impl CifarResNet {
    /// ResNet-`depth` (20, 32, 44, 56, 110: `depth = 6n + 2`) with the given shortcut option.
    pub fn new(
        varmap: &VarMap,
        depth: usize,
        shortcut: Shortcut,
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(Error::Config(format!(
                "a CIFAR ResNet has 6n + 2 layers (20, 32, 56, ...), not {depth}"
            )));
        }
        let n = (depth - 2) / 6;
        let mut rng = StdRng::seed_from_u64(seed);
        let stem = conv(varmap, "conv1", (3, 16, 3), (1, 1), &mut rng, device)?;
        let bn = batch_norm(varmap, "bn1", 16, device)?;
        let mut blocks = Vec::new();
        let mut cin = 16;
        for (stage, cout) in [16usize, 32, 64].into_iter().enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let p = format!("layer{}.{i}", stage + 1);
                let conv1 = conv(
                    varmap,
                    &format!("{p}.conv1"),
                    (cin, cout, 3),
                    (stride, 1),
                    &mut rng,
                    device,
                )?;
                let bn1 = batch_norm(varmap, &format!("{p}.bn1"), cout, device)?;
                let conv2 = conv(
                    varmap,
                    &format!("{p}.conv2"),
                    (cout, cout, 3),
                    (1, 1),
                    &mut rng,
                    device,
                )?;
                let bn2 = batch_norm(varmap, &format!("{p}.bn2"), cout, device)?;
                let down = if stride != 1 || cin != cout {
                    let proj = match shortcut {
                        Shortcut::A => None,
                        Shortcut::B => Some((
                            conv(
                                varmap,
                                &format!("{p}.shortcut.0"),
                                (cin, cout, 1),
                                (stride, 0),
                                &mut rng,
                                device,
                            )?,
                            batch_norm(varmap, &format!("{p}.shortcut.1"), cout, device)?,
                        )),
                    };
                    Some((shortcut, proj, cout - cin))
                } else {
                    None
                };
                blocks.push(Block {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    down,
                });
                cin = cout;
            }
        }
        let fc = init::linear(varmap, "fc", 64, classes, &mut rng, device)?;
        Ok(Self {
            stem,
            bn,
            blocks,
            fc,
        })
    }
}

impl ModuleT for CifarResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.reshape((b, 3, 32, 32))?;
        let mut x = self
            .bn
            .forward_t(&self.stem.forward_t(&x, train)?, train)?
            .relu()?;
        for blk in &self.blocks {
            x = blk.forward_t(&x, train)?;
        }
        let x = x.mean((2, 3))?;
        candle_core::Module::forward(&self.fc, &x)
    }
}
