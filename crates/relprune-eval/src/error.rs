//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong while evaluating, reporting or plotting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file could not be read or lacks a tensor.
    #[error("safetensors file {}: {msg}", path.display())]
    Safetensors {
        /// The file involved.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A JSON file could not be parsed or produced.
    #[error("JSON error in {}: {source}", path.display())]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A tensor operation failed.
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The input does not make sense (empty set, wrong shapes, ...).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// Rendering a chart failed.
    #[error("plot error: {0}")]
    Plot(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
