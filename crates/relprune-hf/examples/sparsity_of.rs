//! Loads a pruned Hugging Face checkpoint and counts its sparsity by layer type, from the file.
//! `cargo run -p relprune-hf --example sparsity_of -- MODEL_DIR`

use relprune_eval::{sum_by_group, SparsityReport};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: sparsity_of MODEL_DIR")?;
    let dir = std::path::Path::new(&dir);
    // The architecture's registry entry knows what each tensor is.
    let arch = relprune_models::hf::detect(dir)?;
    let file = dir.join("model.safetensors");
    // SAFETY: a read-only map of a file this program does not write.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file)? };
    let mut matrices: Vec<String> = st
        .tensors()
        .into_iter()
        .filter(|(_, view)| view.shape().len() == 2)
        .map(|(name, _)| name)
        .collect();
    matrices.sort();
    let report = SparsityReport::from_safetensors(&file, &matrices)?;
    let by_type = sum_by_group(&report.layers, |name| [(arch.layer_type)(name).name()]);
    println!("{} ({}):", dir.display(), arch.model_type);
    let total = report.total();
    for (kind, s) in by_type
        .iter()
        .map(|(k, s)| (*k, s))
        .chain([("all", &total)])
    {
        let pct = 100.0 - s.remaining_pct();
        println!("  {kind:<13} {:>11} weights, {pct:6.2}% zero", s.params);
    }
    Ok(())
}
