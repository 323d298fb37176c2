//! The crate's single error type.

/// Everything that can go wrong while pruning a pretrained checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option, an input file or the checkpoint cannot work (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// The run pipeline or a task failed.
    #[error(transparent)]
    Tasks(#[from] relprune_tasks::Error),
    /// The engine failed.
    #[error(transparent)]
    Prune(#[from] relprune_prune::Error),
    /// The model could not be loaded, run or written.
    #[error(transparent)]
    Models(#[from] relprune_models::Error),
    /// Text data or a tokenizer could not be read.
    #[error(transparent)]
    Data(#[from] relprune_data::Error),
    /// A report could not be computed.
    #[error(transparent)]
    Eval(#[from] relprune_eval::Error),
    /// An output could not be written.
    #[error(transparent)]
    Output(#[from] relprune_io::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias using the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An [`Error::Invalid`] with this message.
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}
