//! LeNet-300-100: the fully connected MNIST classifier of LeCun et al. (1998).

use candle_core::{Device, Module, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::SeedableRng;

use relprune_sparse::{Activation, SparseChain};

use crate::{init, Lin, Result};

/// LeNet-300-100: 784-300-100-10 with ReLU; parameters `fc{1,2,3}.{weight,bias}`.
#[derive(Clone, Debug)]
pub struct Lenet300 {
    fc1: Lin,
    fc2: Lin,
    fc3: Lin,
    /// The three sparse layers and their ReLUs as one op, when that is never the slower choice.
    fused: Option<SparseChain>,
}

impl Lenet300 {
    /// Input features (28×28 images, flattened).
    pub const INPUT: usize = 784;
    /// Output classes.
    pub const CLASSES: usize = 10;

    /// Builds the network with fresh seeded parameters registered in `varmap`.
    pub fn new(varmap: &VarMap, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        Ok(Self {
            fc1: init::linear(varmap, "fc1", Self::INPUT, 300, &mut rng, device)?.into(),
            fc2: init::linear(varmap, "fc2", 300, 100, &mut rng, device)?.into(),
            fc3: init::linear(varmap, "fc3", 100, Self::CLASSES, &mut rng, device)?.into(),
            fused: None,
        })
    }

    /// The same network with its layers' weights stored sparse, for inference (fused into one
    /// op when every layer runs sparse: see [`SparseChain::fused`]).
    pub fn to_sparse(&self) -> Result<Self> {
        let (fc1, fc2, fc3) = (
            self.fc1.to_sparse()?,
            self.fc2.to_sparse()?,
            self.fc3.to_sparse()?,
        );
        let fused = match (&fc1, &fc2, &fc3) {
            (Lin::Sparse(a), Lin::Sparse(b), Lin::Sparse(c)) => SparseChain::fused(&[
                (a, Activation::Relu),
                (b, Activation::Relu),
                (c, Activation::Identity),
            ])
            .map_err(|e| crate::Error::Config(format!("sparse chain: {e}")))?,
            _ => None,
        };
        Ok(Self {
            fc1,
            fc2,
            fc3,
            fused,
        })
    }

    /// Whether the network runs as one fused sparse op.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }
}

impl Module for Lenet300 {
    /// Logits (B, 10) of a batch of flattened images (B, 784); images of shape (B, 1, 28, 28) are flattened.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = if x.rank() == 2 {
            x.clone()
        } else {
            x.flatten_from(1)?
        };
        if let Some(chain) = &self.fused {
            return chain.forward(&x);
        }
        let x = self.fc1.forward_relu(&x)?;
        let x = self.fc2.forward_relu(&x)?;
        self.fc3.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_have_stable_names_and_shapes() {
        let vm = VarMap::new();
        Lenet300::new(&vm, 0, &Device::Cpu).unwrap();
        let data = vm.data().lock().unwrap();
        let mut names: Vec<_> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("fc1.bias".to_string(), vec![300]),
                ("fc1.weight".to_string(), vec![300, 784]),
                ("fc2.bias".to_string(), vec![100]),
                ("fc2.weight".to_string(), vec![100, 300]),
                ("fc3.bias".to_string(), vec![10]),
                ("fc3.weight".to_string(), vec![10, 100]),
            ]
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_network_and_another_seed_does_not() {
        let first = |seed| {
            let vm = VarMap::new();
            Lenet300::new(&vm, seed, &Device::Cpu).unwrap();
            let w = vm.data().lock().unwrap()["fc1.weight"]
                .as_tensor()
                .flatten_all()
                .unwrap();
            w.to_vec1::<f32>().unwrap()
        };
        assert_eq!(first(7), first(7));
        assert_ne!(first(7), first(8));
        let w = first(7);
        let bound = 1.0 / 784f32.sqrt();
        assert!(w.iter().all(|x| x.abs() <= bound));
    }

    #[test]
    fn forward_gives_logits_for_flat_and_image_batches() {
        let vm = VarMap::new();
        let net = Lenet300::new(&vm, 0, &Device::Cpu).unwrap();
        let x = Tensor::zeros((3, 1, 28, 28), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(net.forward(&x).unwrap().dims(), &[3, 10]);
    }
}
