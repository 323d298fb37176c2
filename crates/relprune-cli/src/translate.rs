//! `relprune translate`: translates stdin line by line with a Hugging Face seq2seq checkpoint
//! (Marian): tokenize with the directory's `tokenizer.json`, decode padded batches greedily or
//! with beam search as `transformers`' `generate` does, print one translation per input line, in
//! order.
//!
//! Decoding settings come from `config.json`, then `generation_config.json` when present (as
//! `generate` reads them: `num_beams`, `max_length`, `max_new_tokens`, `length_penalty`,
//! `early_stopping`, `forced_eos_token_id`), then the command line.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use relprune_data::text::TextTokenizer;
use relprune_models::hf::generate::{generate, EarlyStopping, GenerateConfig, Seq2Seq};
use serde_json::Value;

use crate::forward::{load_marian, load_t5, model_type};

/// The `model_type`s `relprune translate` can run.
pub const SUPPORTED: &[&str] = &["marian", "t5"];

/// Longest output when neither the model's files nor `--max-len` say otherwise.
const DEFAULT_MAX_LEN: usize = 256;

/// Arguments of `relprune translate`.
#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// The model directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Beams (1 = greedy); default: the model's `num_beams`, else 1.
    #[arg(long, value_name = "N")]
    pub beam: Option<usize>,
    /// Most tokens generated per sentence (EOS included); default: the model's `max_length` - 1,
    /// else 256, at most the model's position table.
    #[arg(long = "max-len", value_name = "L")]
    pub max_len: Option<usize>,
    /// Exponent of the length dividing a hypothesis' log-probability (beam search; > 0 favours
    /// longer outputs); default: the model's `length_penalty`, else 1.
    #[arg(
        long = "length-penalty",
        value_name = "P",
        allow_negative_numbers = true
    )]
    pub length_penalty: Option<f64>,
    /// Sentences decoded together.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub batch_size: usize,
    /// Print the generated token ids (space-separated, EOS included) instead of the text.
    #[arg(long)]
    pub ids: bool,
}

/// Runs `relprune translate`.
pub fn run(args: &TranslateArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    if args.beam == Some(0) {
        bail!("--beam must be at least 1");
    }
    // The model type first, so an unsupported directory gets that answer.
    model_type(&args.model, SUPPORTED)?;
    let tok_path = args.model.join("tokenizer.json");
    if !tok_path.is_file() {
        bail!(
            "{} is missing: translate needs the model's tokenizer",
            tok_path.display()
        );
    }
    let tokenizer = TextTokenizer::from_file(&tok_path)?;
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("cannot read stdin")?;
    let lines = lines(&input).context("stdin")?;
    let out = match model_type(&args.model, SUPPORTED)?.as_str() {
        "t5" => {
            let model = load_t5(&args.model)?;
            let c = model.config();
            // Relative positions: no table bounds the length; T5's usual limit instead.
            run_model(
                args,
                &model,
                &tokenizer,
                &lines,
                c.vocab_size,
                T5_MAX_POSITIONS,
                c.pad_token_id,
            )?
        }
        _ => {
            let model = load_marian(&args.model)?;
            let c = model.config();
            run_model(
                args,
                &model,
                &tokenizer,
                &lines,
                c.vocab_size,
                c.max_position_embeddings,
                c.pad_token_id,
            )?
        }
    };
    let stdout = std::io::stdout();
    let mut w = BufWriter::new(stdout.lock());
    for line in out {
        writeln!(w, "{line}").context("cannot write to stdout")?;
    }
    w.flush().context("cannot write to stdout")
}

/// Checks the tokenizer against `model` and translates `lines` with the settings of `args` and the
/// model's files.
fn run_model<M: Seq2Seq>(
    args: &TranslateArgs,
    model: &M,
    tokenizer: &TextTokenizer,
    lines: &[String],
    vocab_size: usize,
    max_positions: usize,
    pad: u32,
) -> Result<Vec<String>> {
    tokenizer
        .check_vocab(vocab_size)
        .context("the tokenizer does not fit the model")?;
    let config = settings(
        &args.model,
        args,
        GenerateConfig::new(model.special_tokens(), DEFAULT_MAX_LEN),
        max_positions,
    )?;
    translate(
        model,
        tokenizer,
        lines,
        &config,
        args.batch_size,
        max_positions,
        pad,
        args.ids,
    )
}

/// T5's customary length limit (its `n_positions`): relative positions have no table to bound it.
const T5_MAX_POSITIONS: usize = 512;

/// Decodes `lines` in batches of `batch_size`, in order: the text of each (special tokens
/// skipped), or its generated ids when `ids`.
#[allow(clippy::too_many_arguments)]
fn translate<M: Seq2Seq>(
    model: &M,
    tokenizer: &TextTokenizer,
    lines: &[String],
    config: &GenerateConfig,
    batch_size: usize,
    max_src_len: usize,
    pad: u32,
    ids: bool,
) -> Result<Vec<String>> {
    let device = Device::Cpu;
    let mut out = Vec::with_capacity(lines.len());
    for (c, chunk) in lines.chunks(batch_size).enumerate() {
        let encoded = chunk
            .iter()
            .map(|s| Ok(truncate(tokenizer.encode(s)?, max_src_len)))
            .collect::<Result<Vec<_>>>()?;
        let t = encoded.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut src = Vec::with_capacity(chunk.len() * t);
        let mut mask = Vec::with_capacity(chunk.len() * t);
        for row in &encoded {
            src.extend(row.iter().copied().chain(std::iter::repeat(pad)).take(t));
            mask.extend((0..t).map(|j| u32::from(j < row.len())));
        }
        let src = Tensor::from_vec(src, (chunk.len(), t), &device)?;
        let mask = Tensor::from_vec(mask, (chunk.len(), t), &device)?;
        let first = c * batch_size + 1;
        let generated = generate(model, &src, &mask, config).with_context(|| {
            format!(
                "decoding lines {first}..{}",
                first + chunk.len().saturating_sub(1)
            )
        })?;
        for g in generated {
            let tokens = g.tokens();
            out.push(if ids {
                tokens
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                tokenizer.decode(tokens, true)?
            });
        }
    }
    Ok(out)
}

/// Cuts `ids` to `max_len` tokens keeping the last one (the closing `</s>`).
fn truncate(mut ids: Vec<u32>, max_len: usize) -> Vec<u32> {
    if ids.len() > max_len && max_len > 0 {
        let last = ids[ids.len() - 1];
        ids.truncate(max_len - 1);
        ids.push(last);
    }
    ids
}

/// The lines of UTF-8 `bytes` (`\n` or `\r\n` ends; a final newline ends the last line).
fn lines(bytes: &[u8]) -> Result<Vec<String>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    Ok(text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect())
}

/// Reads a JSON object file if it exists.
fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(value))
}

/// The decoding settings: `base`, then `config.json` and `generation_config.json`'s generation
/// fields, then the command line; `max_len` is checked against the position table.
fn settings(
    dir: &Path,
    args: &TranslateArgs,
    mut config: GenerateConfig,
    max_positions: usize,
) -> Result<GenerateConfig> {
    let mut max_len_from_files = None;
    for name in ["config.json", "generation_config.json"] {
        let path = dir.join(name);
        let Some(v) = read_optional_json(&path)? else {
            continue;
        };
        let uint = |key: &str| -> Result<Option<u64>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(Some).with_context(|| {
                    format!(
                        "{}: `{key}` = {x} is not a non-negative integer",
                        path.display()
                    )
                }),
            }
        };
        if let Some(n) = uint("num_beams")? {
            config.beam_size = (n as usize).max(1);
        }
        // `max_length` counts the decoder start token, `max_new_tokens` does not.
        if let Some(n) = uint("max_length")? {
            max_len_from_files = Some((n as usize).saturating_sub(1));
        }
        if let Some(n) = uint("max_new_tokens")? {
            max_len_from_files = Some(n as usize);
        }
        if let Some(id) = uint("forced_eos_token_id")? {
            config.forced_eos_token_id = Some(u32::try_from(id).with_context(|| {
                format!("{}: forced_eos_token_id {id} is too large", path.display())
            })?);
        }
        if let Some(x) = v.get("length_penalty").and_then(Value::as_f64) {
            config.length_penalty = x;
        }
        match v.get("early_stopping") {
            Some(Value::Bool(true)) => config.early_stopping = EarlyStopping::Always,
            Some(Value::Bool(false)) => config.early_stopping = EarlyStopping::Heuristic,
            Some(Value::String(s)) if s == "never" => config.early_stopping = EarlyStopping::Never,
            None | Some(Value::Null) => {}
            Some(other) => bail!(
                "{}: early_stopping = {other} is not true, false or \"never\"",
                path.display()
            ),
        }
    }
    if let Some(n) = args.beam {
        config.beam_size = n;
    }
    if let Some(p) = args.length_penalty {
        if !p.is_finite() {
            bail!("--length-penalty {p} is not a finite number");
        }
        config.length_penalty = p;
    }
    // The last generated token is never fed back, so max_len tokens need max_len positions.
    config.max_len = match args.max_len {
        Some(0) => bail!("--max-len must be positive"),
        Some(n) if n > max_positions => {
            bail!("--max-len {n} exceeds the model's max_position_embeddings {max_positions}")
        }
        Some(n) => n,
        None => max_len_from_files
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_MAX_LEN)
            .min(max_positions),
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_truncation() {
        assert_eq!(lines(b"a b\r\nc\n").unwrap(), ["a b", "c"]);
        assert_eq!(lines(b"a\n\nb").unwrap(), ["a", "", "b"]);
        assert!(lines(b"").unwrap().is_empty());
        assert!(format!("{:#}", lines(b"a\xffb").unwrap_err()).contains("byte 1"));
        assert_eq!(truncate(vec![5, 6, 7, 0], 3), [5, 6, 0]);
    }
}
