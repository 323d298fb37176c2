//! `relprune compress` and `relprune decompress`: a pruned checkpoint stored without its zeros,
//! and back to the dense files, byte for byte.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use relprune_hf::compress::Summary;
use relprune_hf::CompressedFormat;

/// Arguments of `relprune compress`.
#[derive(Debug, Args)]
pub struct CompressArgs {
    /// The checkpoint directory (`model.safetensors`, `config.json`, tokenizer files...).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// sparse-bitmask: compressed-tensors' format (what llm-compressor writes), announced in
    /// config.json; relprune-sparse: relprune's own, smaller for very sparse weights.
    #[arg(long, value_enum)]
    pub format: CompressedFormat,
    /// The new directory (must not exist; written atomically).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Arguments of `relprune decompress`.
#[derive(Debug, Args)]
pub struct DecompressArgs {
    /// The compressed checkpoint directory (either format, ours or another tool's).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The new directory (must not exist; written atomically).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `relprune compress`.
pub fn compress(args: &CompressArgs) -> Result<()> {
    let summary = relprune_hf::compress_dir(&args.model, &args.out, args.format.into())?;
    print(&summary, "compressed");
    Ok(())
}

/// Runs `relprune decompress`.
pub fn decompress(args: &DecompressArgs) -> Result<()> {
    let summary = relprune_hf::decompress_dir(&args.model, &args.out)?;
    print(&summary, "decompressed");
    Ok(())
}

fn print(s: &Summary, verb: &str) {
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "{verb} {} tensors ({}, {:.2}% of their weights zero; {} overall): weights file {:.2} MB \
         dense, {:.2} MB compressed ({:.3}×)",
        s.compressed.len(),
        s.format,
        100.0 * s.zeros as f64 / s.elements.max(1) as f64,
        s.sparsity_structure,
        mb(s.dense_bytes),
        mb(s.compressed_bytes),
        s.compressed_bytes as f64 / s.dense_bytes.max(1) as f64,
    );
    for f in &s.skipped {
        println!("not copied (another framework's dense weights): {f}");
    }
}
