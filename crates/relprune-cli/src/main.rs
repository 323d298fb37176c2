//! `relprune`: the user's command line. One module per subcommand; `main` only parses the
//! arguments, dispatches, and turns errors into a message and a non-zero exit code.

mod bleu;
mod causal;
mod compress;
mod embed;
mod forward;
mod generate;
mod output;
mod perplexity;
mod prune_hf;
mod translate;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// relprune: sparse networks by regularization-based pruning, and the tools around them.
#[derive(Debug, Parser)]
#[command(name = "relprune", version)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// Parses the command line, recording which `prune-hf` flags were given.
fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::PruneHf(args), Some(("prune-hf", m))) =
        (&mut cli.command, matches.subcommand())
    {
        args.given = relprune_tasks::options::given_ids(m);
    }
    cli
}

/// The subcommands; each one's arguments and code live in the module of the same name.
#[derive(Debug, Subcommand)]
enum Command {
    /// Corpus BLEU of a translation against one or more references, exactly as sacreBLEU 2.x.
    Bleu(bleu::BleuArgs),
    /// Stores a pruned Hugging Face checkpoint without its zeros (sparse-bitmask or relprune-sparse).
    Compress(compress::CompressArgs),
    /// Turns a compressed checkpoint back into the dense one, byte for byte.
    Decompress(compress::DecompressArgs),
    /// One forward pass of a Hugging Face checkpoint (BERT, Marian, T5, Llama, Mistral, Qwen2, Qwen3) on token ids from JSON; writes its outputs as JSON.
    Forward(forward::ForwardArgs),
    /// Continues prompts with a Hugging Face decoder-only LM (Llama, Mistral, Qwen2, Qwen3), greedily or by sampling.
    Generate(generate::GenerateArgs),
    /// Sentence embeddings (mean pooling, L2-normalized) of a text file's lines with a BERT checkpoint.
    Embed(embed::EmbedArgs),
    /// Perplexity of a text file under a decoder-only LM (Hugging Face directory or GGUF file).
    Perplexity(perplexity::PerplexityArgs),
    /// Prunes a pretrained Hugging Face checkpoint (BERT, Marian, T5) with the method; writes a directory HF libraries load.
    PruneHf(Box<prune_hf::PruneHfArgs>),
    /// Translates stdin line by line with a Hugging Face Marian checkpoint (greedy or beam search).
    Translate(translate::TranslateArgs),
}

fn main() -> ExitCode {
    relprune_models::runtime::elementwise_on_caller();
    let cli = parse();
    if !matches!(cli.command, Command::PruneHf(_)) {
        // Inference: speed over memory (prune-hf makes the opposite choice for its long runs).
        relprune_hf::memory::keep_large_buffers();
    }
    let result = relprune_models::runtime::run_on_pool(|| match cli.command {
        Command::Bleu(args) => bleu::run(&args),
        Command::Compress(args) => compress::compress(&args),
        Command::Decompress(args) => compress::decompress(&args),
        Command::Forward(args) => forward::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Perplexity(args) => perplexity::run(&args),
        Command::Embed(args) => embed::run(&args),
        Command::Translate(args) => translate::run(&args),
        Command::PruneHf(args) => prune_hf::run(&args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line. Ignoring a failed write to
            // stderr is all that is left to do at this point (and must not panic).
            let _ = writeln!(std::io::stderr(), "relprune: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
