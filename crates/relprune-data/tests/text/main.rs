//! Tests of the text loaders: tokenizers, parallel text, dialogues and batching. One test binary
//! for all four, so the tokenizers dependency is linked once.

mod batching;
mod dialogue;
mod parallel;
mod tokenizer;

use std::path::{Path, PathBuf};

use relprune_data::TextTokenizer;
use serde_json::Value;

/// The copies of the Hugging Face fixtures in `tests/data`.
fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

/// The tokenizer of a fixture: "bert-tiny", "marian-tiny" or "t5-tiny".
fn fixture_tokenizer(model: &str) -> TextTokenizer {
    TextTokenizer::from_file(&data_dir().join(model).join("tokenizer.json")).unwrap()
}

/// The reference inputs of a fixture (from its `reference.json`).
fn reference(model: &str) -> Value {
    let text = std::fs::read_to_string(data_dir().join("hf-reference-inputs.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    all[model].clone()
}

/// `shared/` beside the repository (as in CI) or at its usual place; `None` when absent, and
/// tests that need it skip.
fn shared_dir() -> Option<PathBuf> {
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    [beside, PathBuf::from("/work/shared")]
        .into_iter()
        .find(|p| p.is_dir())
}

/// A directory under `shared/`, or a note on stderr and `None` so the caller can skip.
fn shared_subdir(rel: &str) -> Option<PathBuf> {
    let dir = shared_dir().map(|s| s.join(rel)).filter(|d| d.is_dir());
    if dir.is_none() {
        eprintln!("skipped: shared/{rel} is not available");
    }
    dir
}

/// A JSON array of integers as u32s.
fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// A JSON array of strings.
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}
