//! The crate's single error type.

/// Everything that can go wrong while running a task or a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine failed (training, pruning, checkpoints, the task's own errors).
    #[error(transparent)]
    Prune(#[from] relprune_prune::Error),
    /// A metric or report could not be computed or read.
    #[error(transparent)]
    Eval(#[from] relprune_eval::Error),
    /// A model could not be built, loaded or run.
    #[error(transparent)]
    Models(#[from] relprune_models::Error),
    /// Data could not be read or batched.
    #[error(transparent)]
    Data(#[from] relprune_data::Error),
    /// An output file could not be written.
    #[error(transparent)]
    Output(#[from] relprune_io::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A configuration or input that cannot work, or a check of the written files that failed.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias using the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for relprune_prune::Error {
    /// Task errors reach the engine as [`relprune_prune::Error::Task`] (the engine's own pass
    /// through unchanged).
    fn from(e: Error) -> Self {
        match e {
            Error::Prune(e) => e,
            other => relprune_prune::Error::Task(other.to_string()),
        }
    }
}
