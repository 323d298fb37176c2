//! Datasets and batching for relprune: the IDX format (MNIST, Fashion-MNIST), CIFAR-10's binary
//! batches, an in-memory labelled image dataset with seeded splits, batching and per-channel
//! normalization, seeded crop/flip augmentation, and an embedded MNIST subset so the toolkit
//! works without any download; and, in [`text`], the text side: Hugging Face tokenizers,
//! parallel text, Taskmaster dialogues and token-budgeted batches of tokenized pairs.

pub mod augment;
pub mod cifar;
pub mod error;
pub mod idx;
pub mod image;
pub mod mnist;
pub mod text;

pub use augment::Augment;
pub use cifar::{load_cifar10_dir, parse_cifar_batch, read_cifar_batch, write_cifar_batch};
pub use error::{Error, Result};
pub use image::{Batches, ImageDataset};
pub use mnist::{load, resolve_source, DataSource, DatasetKind, ImageSplits};
pub use text::{
    BatchConfig, DialogueOptions, DialoguePair, EmptyPairs, Oversize, ParallelText, TextBatch,
    TextPair, TextTokenizer, TokenBatcher, TokenizedPair,
};
