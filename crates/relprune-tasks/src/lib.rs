//! relprune's tasks and run pipeline: what the engine prunes, and the steps every run shares.
//!
//! - Tasks ([`relprune_prune::Task`] implementations pairing a model with data and a metric):
//!   [`image::ImageClassification`] (cross-entropy, top-1 error), [`seq2seq::Seq2SeqTask`]
//!   (label-smoothed cross-entropy, corpus BLEU of decoded sentences) and
//!   [`encoder::EncoderDistill`] (an encoder distilled against its own dense self, cosine).
//! - [`lm`]: perplexity of a text under a causal language model.
//! - [`run`]: the one pipeline, checkpointed start or resume → dense reference → pruning →
//!   model written, read back and judged from the file → results; [`report`] writes them.
//! - [`options`]: the options people choose by name, as types, and the shared engine flags.

pub mod encoder;
pub mod error;
pub mod image;
pub mod lm;
pub mod loss;
pub mod options;
pub mod report;
pub mod run;
pub mod seq2seq;

pub use encoder::{EncoderDistill, GramCollector, Sentences};
pub use error::{Error, Result};
pub use image::ImageClassification;
pub use loss::label_smoothed_cross_entropy;
pub use options::{EngineArgs, Method, RegularizerArgs};
pub use report::{phase_report, write_report, Phase, ReportFiles};
pub use run::{finish, Finish, ModelFiles, OwnNames};
pub use seq2seq::{decode_all, DecodeConfig, Decoding, EvalSplit, Seq2SeqConfig, Seq2SeqTask};
