//! `relprune translate`: translates stdin line by line with a Hugging Face encoder–decoder
//! checkpoint (Marian, T5): tokenize with the directory's `tokenizer.json`, decode padded batches
//! greedily or with beam search as `transformers`' `generate` does, print one translation per
//! input line, in order.
//!
//! Decoding settings come from `config.json`, then `generation_config.json` when present (as
//! `generate` reads them: `num_beams`, `max_length`, `max_new_tokens`, `length_penalty`,
//! `early_stopping`, `forced_eos_token_id`), then the command line.

use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use relprune_data::text::{split_lines, TextTokenizer};
use relprune_models::hf::generate::{GenerateConfig, MAX_BEAMS};
use relprune_models::hf::{detect_kind, HfModel, Kind};
use relprune_models::Seq2Seq;
use relprune_tasks::{decode_all, Decoding};

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
    /// Run the pruned layers sparse (their zeros left out; per batch, sparse or dense, whichever
    /// the measured crossover table says is faster).
    #[arg(long)]
    pub sparse: bool,
}

/// Runs `relprune translate`.
pub fn run(args: &TranslateArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    if let Some(n) = args.beam.filter(|&n| n == 0 || n > MAX_BEAMS) {
        bail!(
            "--beam {n} is outside 1..={MAX_BEAMS} (every beam holds its own copy of the \
             decoder's keys and values)"
        );
    }
    if let Some(p) = args.length_penalty.filter(|p| !p.is_finite()) {
        bail!("--length-penalty {p} is not a finite number");
    }
    // The architecture first, so an unsupported directory gets that answer.
    detect_kind(&args.model, Kind::Seq2Seq)?;
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
    let lines: Vec<String> = split_lines(&input, "stdin")?
        .into_iter()
        .map(|l| l.strip_suffix('\r').map(String::from).unwrap_or(l))
        .collect();
    let (_, model) = if args.sparse {
        relprune_models::hf::load_sparse(&args.model, &Device::Cpu)?
    } else {
        relprune_models::hf::load(&args.model, &candle_nn::VarMap::new(), &Device::Cpu)?
    };
    let HfModel::Seq2Seq(model) = model else {
        bail!("{} is not an encoder-decoder", args.model.display());
    };
    tokenizer
        .check_vocab(model.vocab_size())
        .context("the tokenizer does not fit the model")?;
    let limit = model.length_limit();
    let config = settings(args, &model, limit)?;
    let mut cut = 0;
    let sources = lines
        .iter()
        .map(|s| {
            let (ids, was_cut) = tokenizer.encode_cut(s, limit)?;
            cut += usize::from(was_cut);
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    crate::output::report_cuts(cut, lines.len(), limit);
    let decoding = Decoding {
        batch_size: args.batch_size,
        sort_by_length: false,
        config: Box::new(|_| config.clone()),
        limit: Box::new(|_| usize::MAX),
    };
    let generated = decode_all(&model, &sources, &decoding, |_| {})?;
    let stdout = std::io::stdout();
    let mut w = BufWriter::new(stdout.lock());
    for tokens in generated {
        let line = if args.ids {
            tokens
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            tokenizer.decode(&tokens, true)?
        };
        writeln!(w, "{line}").context("cannot write to stdout")?;
    }
    w.flush().context("cannot write to stdout")
}

/// The decoding settings: the model's, then its files', then the command line's; `max_len` is
/// checked against `max_positions`.
fn settings<M: Seq2Seq>(
    args: &TranslateArgs,
    model: &M,
    max_positions: usize,
) -> Result<GenerateConfig> {
    let base = GenerateConfig::new(model.special_tokens(), DEFAULT_MAX_LEN);
    let (mut config, from_files) = base.with_model_dir(&args.model)?;
    if let Some(n) = args.beam {
        config.beam_size = n;
    }
    if let Some(p) = args.length_penalty {
        config.length_penalty = p;
    }
    // The last generated token is never fed back, so max_len tokens need max_len positions.
    config.max_len = match args.max_len {
        Some(0) => bail!("--max-len must be positive"),
        Some(n) if n > max_positions => {
            bail!("--max-len {n} exceeds the model's max_position_embeddings {max_positions}")
        }
        Some(n) => n,
        None => from_files.unwrap_or(DEFAULT_MAX_LEN).min(max_positions),
    };
    Ok(config)
}
