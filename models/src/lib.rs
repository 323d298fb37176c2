//! The relprune model zoo: plain candle modules with stable parameter names.
//!
//! Models know nothing of pruning. Their parameters live in a [`candle_nn::VarMap`] under the
//! names a PyTorch user would expect (`fc1.weight`, `fc1.bias`, ...), so the engine can find,
//! mask and export them, and [`checkpoint`] saves and loads them as safetensors.

pub mod activation;
pub mod attention;
pub mod checkpoint;
pub mod cifar;
pub mod dropout;
pub mod error;
pub mod fused;
pub mod hf;
pub mod init;
pub mod lenet;
pub mod lenet5;
pub mod linear;
pub mod ops;
pub mod runtime;
pub mod seq2seq;
pub mod transformer;

pub use cifar::{CifarResNet, Shortcut, Vgg16};
pub use error::{Error, Result};
pub use lenet::Lenet300;
pub use lenet5::Lenet5;
pub use linear::Lin;
pub use seq2seq::{EncoderDecoder, Seq2Seq, SpecialTokens};

/// What a parameter is part of, for reports by layer type and per-type pruning choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LayerType {
    /// Attention projections (queries, keys, values, output; self- and cross-attention).
    Attention,
    /// Feed-forward (MLP) layers.
    FeedForward,
    /// Token and position tables, and a language-model head.
    Embeddings,
    /// Normalization layers.
    Norm,
    /// Anything else (biases of the logits, poolers, classifier heads).
    Other,
}

impl LayerType {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Attention => "attention",
            Self::FeedForward => "feed-forward",
            Self::Embeddings => "embeddings",
            Self::Norm => "norm",
            Self::Other => "other",
        }
    }
}
