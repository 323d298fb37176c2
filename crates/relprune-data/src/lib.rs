//! Datasets and batching for relprune: the IDX format (MNIST, Fashion-MNIST), an in-memory
//! labelled image dataset with seeded splits and batching, and an embedded MNIST subset so the
//! toolkit works without any download.

pub mod error;
pub mod idx;
pub mod image;
pub mod mnist;

pub use error::{Error, Result};
pub use image::{Batches, ImageDataset};
pub use mnist::{load, resolve_source, DataSource, DatasetKind, ImageSplits};
