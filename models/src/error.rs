//! The error type of relprune-models.

use std::path::PathBuf;

/// Errors of building, loading or saving models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A model configuration that does not exist (e.g. a ResNet depth that is not 6n + 2).
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A checkpoint file could not be used.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
}

impl From<relprune_io::Error> for Error {
    fn from(e: relprune_io::Error) -> Self {
        Error::Checkpoint {
            path: e.path,
            msg: e.msg,
        }
    }
}

/// Result alias of relprune-models.
pub type Result<T> = std::result::Result<T, Error>;
