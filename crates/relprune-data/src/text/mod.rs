//! Text data for the sequence-to-sequence half of relprune: Hugging Face tokenizers, parallel
//! text (translation), Taskmaster-style dialogues turned into (context, response) pairs, and
//! length-bucketed, token-budgeted batches of tokenized pairs.
//!
//! The pipeline is `TextPair`s (from [`parallel`] or [`dialogue`]) → [`TextTokenizer`] →
//! [`TokenizedPair`]s → [`TokenBatcher`] → [`TextBatch`]es (plain `Vec`s, or candle tensors with
//! [`TextBatch::to_tensors`]).

pub mod augment;
pub mod batching;
pub mod dialogue;
pub mod lines;
pub mod parallel;
pub mod tokenizer;
pub mod train;

pub use batching::{
    pad_rows, tokenize_pairs, truncate_keeping_last, BatchConfig, BatchTensors, Oversize,
    TextBatch, TokenBatcher, TokenizedPair,
};
pub use dialogue::{
    parse_taskmaster, read_taskmaster, read_taskmaster_split_ids, DialogueOptions, DialoguePair,
};
pub use lines::{read_lines, read_sentences, split_lines};
pub use parallel::{
    gettext_en_de, parse_parallel, parse_tsv, read_parallel_files, read_tsv, EmptyPairs,
    ParallelText, Split, TextPair,
};
pub use tokenizer::{SpecialIds, TextTokenizer};
pub use train::{train_bpe, BpeOptions, TRAINED_SPECIALS};

/// Largest text file read (corpora, sentence lists, tokenizers, dialogues): 4 GiB, beyond the
/// largest parallel corpus side we know of (WMT en–de, about 1.5 GB) and bounding what a pipe
/// or device can make a reader hold.
pub const MAX_TEXT_BYTES: u64 = 1 << 32;

/// A text input's bytes, read through [`relprune_io::read_capped`] at [`MAX_TEXT_BYTES`].
pub(crate) fn read_text_file(path: &std::path::Path) -> crate::Result<Vec<u8>> {
    relprune_io::read_capped(path, MAX_TEXT_BYTES).map_err(|e| crate::Error::io(path, e))
}
