//! The error type of relprune-prune.

use std::path::PathBuf;

/// Errors of the pruning engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The regularizer failed or is misconfigured.
    #[error(transparent)]
    Regularizer(#[from] relprune_core::Error),
    /// A loss or evaluation became NaN or infinite.
    #[error("non-finite {what} ({value}) at {at}; lower the learning rate or the regularization strength")]
    NonFinite {
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: f64,
        /// Where in training it happened.
        at: String,
    },
    /// A configuration value is out of its domain.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A named parameter is missing or does not match.
    #[error("parameter `{name}`: {msg}")]
    Param {
        /// The parameter.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// The task (model + data) failed.
    #[error("task: {0}")]
    Task(String),
}

impl From<relprune_io::Error> for Error {
    fn from(e: relprune_io::Error) -> Self {
        Error::File {
            path: e.path,
            msg: e.msg,
        }
    }
}

/// Result alias of relprune-prune.
pub type Result<T> = std::result::Result<T, Error>;
