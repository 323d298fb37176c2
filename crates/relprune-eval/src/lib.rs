//! Evaluation for relprune: top-1 error, per-layer sparsity and compression, compressed model
//! sizes, the `results.json` every run writes, its Markdown report and SVG charts, and corpus BLEU
//! identical to sacreBLEU's for translation models.
//!
//! The field names and units of [`RunResults`] follow the "results.json" section of
//! `docs/METHOD.md`; other tools read that file, so they must not drift.

pub mod accuracy;
pub mod bleu;
pub mod error;
pub mod plot;
pub mod report;
pub mod results;
pub mod sizes;
pub mod sparsity;

pub use accuracy::{count_correct, top1_error_pct};
pub use bleu::{
    corpus_bleu, tokenize_13a, BleuConfig, BleuScore, Smoothing, Tokenizer, SACREBLEU_VERSION,
};
pub use error::{Error, Result};
pub use plot::{line_chart_svg, Series};
pub use report::render_markdown;
pub use results::{DatasetInfo, MetricValue, PrunedSummary, RoundRecord, RunResults, SizesBytes};
pub use sizes::{compressed_sizes, FileSizes};
pub use sparsity::{sum_by_group, LayerStats, SparsityReport};
