//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, parsing or batching data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file or directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed file; `offset` is the byte offset (in the decompressed stream) where the problem is.
    #[error("{source_name}: {msg}{}", offset.map(|o| format!(" (at byte {o})")).unwrap_or_default())]
    Format {
        /// The file (or embedded resource) the data came from.
        source_name: String,
        /// Byte offset of the problem in the decompressed stream, when meaningful.
        offset: Option<u64>,
        /// What is wrong.
        msg: String,
    },
    /// An invalid argument or inconsistent data.
    #[error("{0}")]
    Invalid(String),
    /// An output file could not be written.
    #[error(transparent)]
    Output(#[from] relprune_io::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias using the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error in `source_name`, optionally at a byte offset.
    pub(crate) fn format(source_name: &str, offset: Option<u64>, msg: impl Into<String>) -> Self {
        Error::Format {
            source_name: source_name.to_string(),
            offset,
            msg: msg.into(),
        }
    }
}
