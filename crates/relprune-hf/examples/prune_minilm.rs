//! Prunes all-MiniLM-L6-v2 to 50% through the library API: the encoder default, SparseGPT and
//! each layer distilled towards the dense layer's outputs on a text file and its
//! vocabulary-substituted variants, written as a directory Hugging Face loads.
//! `cargo run --release -p relprune-hf --example prune_minilm -- MODEL_DIR TEXT OUT_DIR`

use relprune_hf::{Config, Options, RunOptions};

fn main() -> Result<(), relprune_hf::Error> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or("../shared/models/all-MiniLM-L6-v2".into());
    let text = args.next().unwrap_or("prune.en".into());
    let out = args.next().unwrap_or("minilm-50".into());
    let options = Options {
        target_sparsity: Some(0.5),
        ..Options::text(model, text)
    };
    let results = relprune_hf::run(Config::new(&options)?, &RunOptions::new(&out))?;
    println!(
        "{out}: cosine to the dense model {:.4}, {:.2}% of the prunable weights left",
        results.pruned.value, results.pruned.remaining_pct
    );
    Ok(())
}
