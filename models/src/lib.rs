//! The relprune model zoo: plain candle modules with stable parameter names.
//!
//! Models know nothing of pruning. Their parameters live in a [`candle_nn::VarMap`] under the
//! names a PyTorch user would expect (`fc1.weight`, `fc1.bias`, ...), so the engine can find,
//! mask and export them, and [`checkpoint`] saves and loads them as safetensors.

pub mod checkpoint;
pub mod cifar;
pub mod dropout;
pub mod error;
pub mod fused;
pub mod hf;
pub mod init;
pub mod lenet;
pub mod lenet5;
pub mod ops;
pub mod transformer;

pub use cifar::{CifarResNet, Shortcut, Vgg16};
pub use error::{Error, Result};
pub use lenet::Lenet300;
pub use lenet5::Lenet5;
