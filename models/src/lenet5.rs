//! LeNet-5-Caffe: the convolutional MNIST classifier of the sparse-training literature
//! (conv 20@5×5, max-pool 2, conv 50@5×5, max-pool 2, fc 800-500 ReLU, fc 500-10).

use candle_core::{Device, Module, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::ops::{Conv2d, SparseConv2d};
use crate::{init, Lin, Result};

/// LeNet-5-Caffe on 1×28×28 images; parameters `conv{1,2}.{weight,bias}`, `fc{1,2}.{weight,bias}`.
///
/// As in Caffe's model (and the PyTorch reference of `../shared/bench`), the convolutions have no
/// activation; only fc1 is followed by a ReLU.
#[derive(Clone, Debug)]
pub struct Lenet5 {
    conv1: Conv,
    conv2: Conv,
    fc1: Lin,
    fc2: Lin,
}

/// A convolution (with its max pooling), dense or sparse.
#[derive(Clone, Debug)]
enum Conv {
    Dense(Conv2d),
    Sparse(SparseConv2d),
}

impl Conv {
    fn forward_max_pool(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(c) => c.forward_max_pool(x, 2, 2),
            Self::Sparse(c) => c.forward_max_pool(x, 2, 2),
        }
    }

    /// The sparse form where it runs sparse at every batch size by the crossover table;
    /// a denser convolution stays the fused dense convolution (faster than im2col + a dense
    /// product).
    fn to_sparse(&self) -> Result<Self> {
        Ok(match self {
            Self::Dense(c) => {
                let s = SparseConv2d::from_dense(c)?;
                if s.always_sparse() {
                    Self::Sparse(s)
                } else {
                    Self::Dense(c.clone())
                }
            }
            Self::Sparse(c) => Self::Sparse(c.clone()),
        })
    }
}

impl Lenet5 {
    /// Output classes.
    pub const CLASSES: usize = 10;

    /// Builds the network with fresh seeded parameters (PyTorch's default Kaiming-uniform
    /// initialization, U(±1/√fan_in)) registered in `varmap`.
    pub fn new(varmap: &VarMap, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut conv = |name: &str, cin: usize, cout: usize| -> Result<Conv2d> {
            let bound = 1.0 / ((cin * 25) as f64).sqrt();
            let w = init::uniform_var(
                varmap,
                &format!("{name}.weight"),
                &[cout, cin, 5, 5],
                bound,
                &mut rng,
                device,
            )?;
            let b = init::uniform_var(
                varmap,
                &format!("{name}.bias"),
                &[cout],
                bound,
                &mut rng,
                device,
            )?;
            Ok(Conv2d {
                weight: w,
                bias: Some(b),
                stride: 1,
                padding: 0,
            })
        };
        let conv1 = conv("conv1", 1, 20)?;
        let conv2 = conv("conv2", 20, 50)?;
        Ok(Self {
            conv1: Conv::Dense(conv1),
            conv2: Conv::Dense(conv2),
            fc1: init::linear(varmap, "fc1", 800, 500, &mut rng, device)?.into(),
            fc2: init::linear(varmap, "fc2", 500, Self::CLASSES, &mut rng, device)?.into(),
        })
    }

    /// The same network with its weights stored sparse, for inference.
    pub fn to_sparse(&self) -> Result<Self> {
        Ok(Self {
            conv1: self.conv1.to_sparse()?,
            conv2: self.conv2.to_sparse()?,
            fc1: self.fc1.to_sparse()?,
            fc2: self.fc2.to_sparse()?,
        })
    }
}

impl Module for Lenet5 {
    /// Logits (B, 10) of images (B, 1, 28, 28) or flattened (B, 784).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.reshape((b, 1, 28, 28))?;
        let x = self.conv1.forward_max_pool(&x)?;
        let x = self.conv2.forward_max_pool(&x)?;
        let x = self.fc1.forward_relu(&x.flatten_from(1)?)?;
        self.fc2.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_have_the_caffe_shapes_and_forward_gives_logits() {
        let vm = VarMap::new();
        let net = Lenet5::new(&vm, 0, &Device::Cpu).unwrap();
        let data = vm.data().lock().unwrap();
        let mut shapes: Vec<_> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        shapes.sort();
        assert_eq!(
            shapes,
            vec![
                ("conv1.bias".to_string(), vec![20]),
                ("conv1.weight".to_string(), vec![20, 1, 5, 5]),
                ("conv2.bias".to_string(), vec![50]),
                ("conv2.weight".to_string(), vec![50, 20, 5, 5]),
                ("fc1.bias".to_string(), vec![500]),
                ("fc1.weight".to_string(), vec![500, 800]),
                ("fc2.bias".to_string(), vec![10]),
                ("fc2.weight".to_string(), vec![10, 500]),
            ]
        );
        drop(data);
        let x = Tensor::zeros((3, 784), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(net.forward(&x).unwrap().dims(), &[3, 10]);
    }
}
