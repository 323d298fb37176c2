//! The error type of relprune-core.

/// Errors of the regularizer math.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A configuration value is out of its domain.
    #[error("invalid regularizer configuration: {0}")]
    Config(String),
    /// Two tensors that must match do not.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// Result alias of relprune-core.
pub type Result<T> = std::result::Result<T, Error>;
