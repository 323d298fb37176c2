//! `relprune bleu`: corpus BLEU of a hypothesis file against reference files, with the same
//! numbers, signature and text output as `sacrebleu REF... -i HYP -f text` (sacreBLEU
//! [`relprune_eval::SACREBLEU_VERSION`]).
//!
//! Files are read the way sacreBLEU's command line reads them: UTF-8, lines split on `\n` only
//! (a `\r` before it is trailing whitespace, which is stripped), and a final newline does not make
//! an extra empty line. Where sacreBLEU would crash or print a traceback (unreadable file,
//! invalid UTF-8) this command reports the file and the line instead.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use relprune_eval::bleu::{corpus_bleu, BleuConfig, BleuScore, Smoothing, Tokenizer};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// Arguments of `relprune bleu`.
#[derive(Debug, Args)]
pub struct BleuArgs {
    /// The system's translations, one segment per line (UTF-8).
    #[arg(long, value_name = "FILE")]
    pub hyp: PathBuf,
    /// A reference file, line-aligned with --hyp; repeat the flag for several references.
    #[arg(long = "ref", value_name = "FILE", required = true)]
    pub refs: Vec<PathBuf>,
    /// Tokenization before counting n-grams (sacreBLEU's --tokenize).
    #[arg(long, value_enum, default_value_t = TokenizeArg::Mteval13a)]
    pub tokenize: TokenizeArg,
    /// Smoothing of orders without matches (sacreBLEU's --smooth-method).
    #[arg(long, value_enum, default_value_t = SmoothArg::Exp)]
    pub smooth: SmoothArg,
    /// Value for `floor` (default 0.1) or `add-k` (default 1).
    #[arg(long, value_name = "V", allow_negative_numbers = true,
          value_parser = relprune_tasks::options::parse_non_negative)]
    pub smooth_value: Option<f64>,
    /// Case-insensitive BLEU: lowercase hypotheses and references first.
    #[arg(long)]
    pub lowercase: bool,
    /// Decimals of the score in the text output (sacreBLEU's --width).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub width: usize,
    /// Print a JSON object (full-precision score and all statistics) instead of the text line.
    #[arg(long)]
    pub json: bool,
}

/// The tokenizers `relprune bleu` offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenizeArg {
    /// mteval-v13a, sacreBLEU's default.
    #[value(name = "13a")]
    Mteval13a,
    /// Whitespace only, for text that is already tokenized.
    None,
}

/// The smoothing methods `relprune bleu` offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SmoothArg {
    /// NIST exponential decay (sacreBLEU's default).
    Exp,
    /// A floor precision for orders without matches (--smooth-value, default 0.1).
    Floor,
    /// Add k to matches and totals of orders 2-4 (--smooth-value, default 1).
    #[value(name = "add-k")]
    AddK,
    /// No smoothing.
    None,
}

impl BleuArgs {
    /// The library configuration these arguments ask for.
    fn config(&self) -> Result<BleuConfig> {
        let smoothing = match (self.smooth, self.smooth_value) {
            (SmoothArg::Exp, None) => Smoothing::Exp,
            (SmoothArg::None, None) => Smoothing::None,
            (SmoothArg::Floor, v) => v.map_or(Smoothing::FLOOR_DEFAULT, Smoothing::Floor),
            (SmoothArg::AddK, v) => v.map_or(Smoothing::ADD_K_DEFAULT, Smoothing::AddK),
            // sacreBLEU silently ignores the value here; a value that changes nothing is more
            // likely a mistake than an intention.
            (SmoothArg::Exp | SmoothArg::None, Some(_)) => {
                bail!("--smooth-value only applies to --smooth floor and --smooth add-k")
            }
        };
        Ok(BleuConfig {
            tokenizer: match self.tokenize {
                TokenizeArg::Mteval13a => Tokenizer::Mteval13a,
                TokenizeArg::None => Tokenizer::None,
            },
            smoothing,
            lowercase: self.lowercase,
            effective_order: false,
        })
    }
}

/// Runs `relprune bleu`.
pub fn run(args: &BleuArgs) -> Result<()> {
    let config = args.config()?;
    let hyps = read_lines(&args.hyp, "hypothesis")?;
    if hyps.is_empty() {
        bail!(
            "hypothesis file {} is empty: no segment to score",
            args.hyp.display()
        );
    }
    let mut refs = Vec::with_capacity(args.refs.len());
    for path in &args.refs {
        let lines = read_lines(path, "reference")?;
        if lines.len() != hyps.len() {
            bail!(
                "hypothesis file {} has {} lines but reference file {} has {}: they must be \
                 line-aligned",
                args.hyp.display(),
                hyps.len(),
                path.display(),
                lines.len()
            );
        }
        refs.push(lines);
    }
    let score = corpus_bleu(&hyps, &refs, &config)?;
    let text = if args.json {
        serde_json::to_string_pretty(&JsonReport { score: &score })?
    } else {
        score.format_with_signature(args.width)
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Reads a text file as sacreBLEU's command line does (`relprune_data::text::read_lines`);
/// `what` names the file's role in error messages.
fn read_lines(path: &Path, what: &str) -> Result<Vec<String>> {
    relprune_data::text::read_lines(path).with_context(|| format!("{what} file"))
}

/// The `--json` output: sacreBLEU's JSON fields (with the score at full precision rather than
/// rounded to `--width`: a comparison should not depend on a display setting), then the
/// statistics behind the score.
struct JsonReport<'a> {
    score: &'a BleuScore,
}

impl Serialize for JsonReport<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let s = self.score;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", "BLEU")?;
        map.serialize_entry("score", &s.score)?;
        map.serialize_entry("signature", &s.signature)?;
        map.serialize_entry("verbose_score", &s.verbose())?;
        // sacreBLEU also spreads the signature into its fields (`"nrefs": "1"`, ...).
        for field in s.signature.split('|') {
            if let Some((key, value)) = field.split_once(':') {
                map.serialize_entry(key, value)?;
            }
        }
        map.serialize_entry("counts", &s.counts)?;
        map.serialize_entry("totals", &s.totals)?;
        map.serialize_entry("precisions", &s.precisions)?;
        map.serialize_entry("bp", &s.bp)?;
        map.serialize_entry("ratio", &s.ratio)?;
        map.serialize_entry("sys_len", &s.sys_len)?;
        map.serialize_entry("ref_len", &s.ref_len)?;
        map.end()
    }
}
