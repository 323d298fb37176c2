//! The hostile-input suite: every class of bad input a user or an attacker can hand `relprune`
//! (flags out of range, missing and malformed files, configs whose sizes would exhaust memory,
//! non-finite weights, outputs pointed at devices, pipes and directories, endless inputs),
//! including those that already worked, so that they stay working. Each case must exit non-zero
//! with a message naming the file or flag, never panic, and leave nothing behind: no output, no
//! temporary file, no work directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// One hostile input.
struct Case {
    /// What it is.
    name: &'static str,
    /// Builds its files in the case's directory and returns `relprune`'s arguments.
    setup: fn(&Path) -> Vec<String>,
    /// Text on stdin.
    stdin: &'static str,
    /// Fragments the error must contain (the file or flag, and the problem).
    says: &'static [&'static str],
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/tests/data")
        .join(name)
}

fn s(p: impl AsRef<Path>) -> String {
    p.as_ref().display().to_string()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// The output path every case may name: it must not exist afterwards.
fn out(d: &Path) -> String {
    s(d.join("out.json"))
}

/// A copy of fixture `name` in `d/model` with `patch` merged into its config.json.
fn model(d: &Path, name: &str, patch: Value) -> String {
    let dir = d.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    if patch.as_object().is_some_and(|p| !p.is_empty()) {
        let path = dir.join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            config[k] = v.clone();
        }
        std::fs::write(&path, config.to_string()).unwrap();
    }
    s(dir)
}

/// A copy of a decoder-LM fixture with a word-level tokenizer (`tN` is id N).
fn causal(d: &Path, name: &str, patch: Value) -> String {
    causal_with_vocab(d, name, patch, 97)
}

/// [`causal`] with a tokenizer of `tokens` tokens.
fn causal_with_vocab(d: &Path, name: &str, patch: Value, tokens: u32) -> String {
    let dir = model(d, name, patch);
    let vocab: serde_json::Map<String, Value> = (0..tokens)
        .map(|i| (format!("t{i}"), Value::from(i)))
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(Path::new(&dir).join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

/// Sets element 0 of tensor `name` in `dir/model.safetensors` to `value`.
fn poison(dir: &str, name: &str, value: f32) {
    let path = Path::new(dir).join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(name).unwrap();
        view.data().as_ptr() as usize - bytes.as_ptr() as usize
    };
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}

fn file(d: &Path, name: &str, bytes: impl AsRef<[u8]>) -> String {
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    s(p)
}

fn ids(d: &Path) -> String {
    file(d, "in.json", r#"{"input_ids": [[2, 5, 3]]}"#)
}

fn forward(d: &Path, model: String) -> Vec<String> {
    let input = ids(d);
    args(&[
        "forward",
        "--model",
        &model,
        "--input",
        &input,
        "--out",
        &out(d),
    ])
}

fn embed(d: &Path, model: String) -> Vec<String> {
    let text = file(d, "text.txt", "hello world\nthe cat sat\n");
    args(&[
        "embed",
        "--model",
        &model,
        "--text",
        &text,
        "--out",
        &out(d),
    ])
}

fn bert(d: &Path) -> String {
    model(d, "bert-tiny", json!({}))
}

fn bleu(d: &Path, hyp: &str, reference: &str, extra: &[&str]) -> Vec<String> {
    let h = file(d, "hyp.txt", hyp);
    let r = file(d, "ref.txt", reference);
    [args(&["bleu", "--hyp", &h, "--ref", &r]), args(extra)].concat()
}

fn prune_hf(d: &Path, extra: &[&str]) -> Vec<String> {
    let text = file(d, "calib.txt", "the cat sat on the mat\n".repeat(40));
    let m = bert(d);
    let o = s(d.join("pruned"));
    let argv = [
        args(&["prune-hf", "--model", &m, "--text", &text, "--out", &o]),
        args(extra),
    ]
    .concat();
    if extra.iter().any(|a| a.starts_with("--target-sparsity")) {
        argv
    } else {
        [argv, args(&["--target-sparsity", "0.5"])].concat()
    }
}

fn perplexity(d: &Path, model: String) -> Vec<String> {
    let text = file(d, "text.txt", "t5 t6 t7 t8 t9 t10\n".repeat(10));
    args(&["perplexity", "--model", &model, "--text", &text])
}

#[cfg(unix)]
fn link(d: &Path, name: &str, to: &str) -> String {
    let p = d.join(name);
    std::os::unix::fs::symlink(to, &p).unwrap();
    s(p)
}

fn cases() -> Vec<Case> {
    vec![
        // Flags out of range: refused by the parser, before any work.
        Case {
            name: "embed --batch-size 0",
            setup: |d| [embed(d, bert(d)), args(&["--batch-size", "0"])].concat(),
            stdin: "",
            says: &["--batch-size"],
        },
        Case {
            name: "translate --beam 0",
            setup: |d| {
                args(&[
                    "translate",
                    "--model",
                    &model(d, "marian-tiny", json!({})),
                    "--beam",
                    "0",
                ])
            },
            stdin: "hello\n",
            says: &["--beam"],
        },
        Case {
            name: "translate --beam 100000",
            setup: |d| {
                args(&[
                    "translate",
                    "--model",
                    &model(d, "marian-tiny", json!({})),
                    "--beam",
                    "100000",
                ])
            },
            stdin: "hello\n",
            says: &["--beam", "128"],
        },
        Case {
            name: "translate --length-penalty NaN",
            setup: |d| {
                args(&[
                    "translate",
                    "--model",
                    &model(d, "marian-tiny", json!({})),
                    "--length-penalty",
                    "NaN",
                ])
            },
            stdin: "hello\n",
            says: &["--length-penalty"],
        },
        Case {
            name: "translate --max-len 0",
            setup: |d| {
                args(&[
                    "translate",
                    "--model",
                    &model(d, "marian-tiny", json!({})),
                    "--max-len",
                    "0",
                ])
            },
            stdin: "hello\n",
            says: &["--max-len"],
        },
        Case {
            name: "generate --temperature -1",
            setup: |d| {
                args(&[
                    "generate",
                    "--model",
                    &causal(d, "llama-tiny", json!({})),
                    "--prompt",
                    "t5 t6",
                    "--temperature=-1",
                ])
            },
            stdin: "",
            says: &["--temperature"],
        },
        Case {
            name: "generate --top-p 1.5",
            setup: |d| {
                args(&[
                    "generate",
                    "--model",
                    &causal(d, "llama-tiny", json!({})),
                    "--prompt",
                    "t5 t6",
                    "--top-p",
                    "1.5",
                ])
            },
            stdin: "",
            says: &["--top-p"],
        },
        Case {
            name: "generate --batch-size 0",
            setup: |d| {
                args(&[
                    "generate",
                    "--model",
                    &causal(d, "llama-tiny", json!({})),
                    "--prompt",
                    "t5",
                    "--batch-size",
                    "0",
                ])
            },
            stdin: "",
            says: &["--batch-size"],
        },
        Case {
            name: "perplexity --window 1",
            setup: |d| {
                [
                    perplexity(d, causal(d, "llama-tiny", json!({}))),
                    args(&["--window", "1"]),
                ]
                .concat()
            },
            stdin: "",
            says: &["--window"],
        },
        Case {
            name: "bleu --smooth-value NaN",
            setup: |d| {
                bleu(
                    d,
                    "a b\n",
                    "a b\n",
                    &["--smooth", "floor", "--smooth-value", "NaN"],
                )
            },
            stdin: "",
            says: &["--smooth-value"],
        },
        Case {
            name: "bleu --smooth-value -1",
            setup: |d| {
                bleu(
                    d,
                    "a b\n",
                    "a b\n",
                    &["--smooth", "add-k", "--smooth-value=-1"],
                )
            },
            stdin: "",
            says: &["--smooth-value"],
        },
        Case {
            name: "prune-hf --lr NaN",
            setup: |d| prune_hf(d, &["--lr", "NaN"]),
            stdin: "",
            says: &["--lr"],
        },
        Case {
            name: "prune-hf --target-sparsity 1.5",
            setup: |d| prune_hf(d, &["--target-sparsity=1.5"]),
            stdin: "",
            says: &["--target-sparsity"],
        },
        Case {
            name: "prune-hf --max-drop -1",
            setup: |d| prune_hf(d, &["--max-drop=-1"]),
            stdin: "",
            says: &["--max-drop"],
        },
        Case {
            name: "prune-hf --valid-fraction 2",
            setup: |d| prune_hf(d, &["--valid-fraction", "2"]),
            stdin: "",
            says: &["--valid-fraction"],
        },
        Case {
            name: "prune-hf --batch-size 0",
            setup: |d| prune_hf(d, &["--batch-size", "0"]),
            stdin: "",
            says: &["--batch-size"],
        },
        Case {
            name: "prune-hf --layer-lr -1",
            setup: |d| prune_hf(d, &["--layer-lr=-1"]),
            stdin: "",
            says: &["--layer-lr"],
        },
        Case {
            name: "prune-hf --twt NaN",
            setup: |d| prune_hf(d, &["--twt", "NaN"]),
            stdin: "",
            says: &["--twt"],
        },
        Case {
            name: "prune-hf --end-to-end-epochs on an encoder",
            setup: |d| prune_hf(d, &["--end-to-end-epochs", "2"]),
            stdin: "",
            says: &["--end-to-end-epochs"],
        },
        // Missing files.
        Case {
            name: "forward: no such model",
            setup: |d| forward(d, s(d.join("no-such-model"))),
            stdin: "",
            says: &["no-such-model", "does not exist"],
        },
        Case {
            name: "forward: no such input",
            setup: |d| {
                args(&[
                    "forward",
                    "--model",
                    &bert(d),
                    "--input",
                    &s(d.join("nope.json")),
                    "--out",
                    &out(d),
                ])
            },
            stdin: "",
            says: &["nope.json"],
        },
        Case {
            name: "embed: no such text",
            setup: |d| {
                args(&[
                    "embed",
                    "--model",
                    &bert(d),
                    "--text",
                    &s(d.join("nope.txt")),
                    "--out",
                    &out(d),
                ])
            },
            stdin: "",
            says: &["nope.txt"],
        },
        Case {
            name: "bleu: no such hypothesis",
            setup: |d| {
                args(&[
                    "bleu",
                    "--hyp",
                    &s(d.join("nope.txt")),
                    "--ref",
                    &file(d, "r.txt", "a\n"),
                ])
            },
            stdin: "",
            says: &["nope.txt"],
        },
        Case {
            name: "bleu: no such reference",
            setup: |d| {
                args(&[
                    "bleu",
                    "--hyp",
                    &file(d, "h.txt", "a\n"),
                    "--ref",
                    &s(d.join("nope.txt")),
                ])
            },
            stdin: "",
            says: &["nope.txt"],
        },
        Case {
            name: "perplexity: no such text",
            setup: |d| {
                args(&[
                    "perplexity",
                    "--model",
                    &causal(d, "llama-tiny", json!({})),
                    "--text",
                    &s(d.join("nope.txt")),
                ])
            },
            stdin: "",
            says: &["nope.txt"],
        },
        Case {
            name: "compress: no such model",
            setup: |d| {
                args(&[
                    "compress",
                    "--model",
                    &s(d.join("nope")),
                    "--format",
                    "relprune-sparse",
                    "--out",
                    &s(d.join("c")),
                ])
            },
            stdin: "",
            says: &["nope"],
        },
        Case {
            name: "prune-hf: no such model",
            setup: |d| {
                args(&[
                    "prune-hf",
                    "--model",
                    &s(d.join("nope")),
                    "--text",
                    &file(d, "t.txt", "a b c\n"),
                    "--out",
                    &s(d.join("p")),
                    "--target-sparsity",
                    "0.5",
                ])
            },
            stdin: "",
            says: &["nope"],
        },
        Case {
            name: "prune-hf --resume of a directory without a checkpoint",
            setup: |d| {
                std::fs::create_dir(d.join("work")).unwrap();
                prune_hf(d, &["--resume", &s(d.join("work"))])
            },
            stdin: "",
            says: &["work"],
        },
        // Malformed inputs.
        Case {
            name: "forward: input is not JSON",
            setup: |d| {
                let m = bert(d);
                let i = file(d, "in.json", "{\"input_ids\": [[2, 5");
                args(&["forward", "--model", &m, "--input", &i, "--out", &out(d)])
            },
            stdin: "",
            says: &["in.json", "not valid JSON"],
        },
        Case {
            name: "forward: ragged rows",
            setup: |d| {
                let m = bert(d);
                let i = file(d, "in.json", "{\"input_ids\": [[2, 5, 3], [2, 3]]}");
                args(&["forward", "--model", &m, "--input", &i, "--out", &out(d)])
            },
            stdin: "",
            says: &["row 1 has 2 entries"],
        },
        Case {
            name: "forward: token id beyond the vocabulary",
            setup: |d| {
                let m = bert(d);
                let i = file(d, "in.json", "{\"input_ids\": [[2, 500, 3]]}");
                args(&["forward", "--model", &m, "--input", &i, "--out", &out(d)])
            },
            stdin: "",
            says: &["token id 500"],
        },
        Case {
            name: "forward: more positions than the model has",
            setup: |d| {
                let m = bert(d);
                let row: Vec<u32> = vec![5; 65];
                let i = file(d, "in.json", json!({"input_ids": [row]}).to_string());
                args(&["forward", "--model", &m, "--input", &i, "--out", &out(d)])
            },
            stdin: "",
            says: &["65", "64"],
        },
        Case {
            name: "embed: text is not UTF-8",
            setup: |d| {
                let m = bert(d);
                let t = file(d, "text.txt", b"caf\xe9\n");
                args(&["embed", "--model", &m, "--text", &t, "--out", &out(d)])
            },
            stdin: "",
            says: &["text.txt", "UTF-8"],
        },
        Case {
            name: "bleu: hypothesis not UTF-8",
            setup: |d| {
                args(&[
                    "bleu",
                    "--hyp",
                    &file(d, "h2.txt", b"a \xff b\n"),
                    "--ref",
                    &file(d, "r2.txt", "a b\n"),
                ])
            },
            stdin: "",
            says: &["h2.txt", "UTF-8"],
        },
        Case {
            name: "bleu: line counts differ",
            setup: |d| bleu(d, "a\nb\n", "a\n", &[]),
            stdin: "",
            says: &["ref.txt"],
        },
        Case {
            name: "config.json is not JSON",
            setup: |d| {
                let m = bert(d);
                file(Path::new(&m), "config.json", "{\"model_type\": ");
                forward(d, m)
            },
            stdin: "",
            says: &["config.json", "JSON"],
        },
        Case {
            name: "config.json names an unsupported architecture",
            setup: |d| forward(d, model(d, "bert-tiny", json!({"model_type": "gpt2"}))),
            stdin: "",
            says: &["gpt2", "supported"],
        },
        Case {
            name: "config.json lacks a field",
            setup: |d| {
                let m = bert(d);
                file(
                    Path::new(&m),
                    "config.json",
                    "{\"model_type\": \"bert\", \"hidden_size\": 32}",
                );
                forward(d, m)
            },
            stdin: "",
            says: &["config.json"],
        },
        Case {
            name: "BERT heads do not divide the hidden size",
            setup: |d| forward(d, model(d, "bert-tiny", json!({"num_attention_heads": 5}))),
            stdin: "",
            says: &["config.json", "5"],
        },
        Case {
            name: "BERT hidden size 2^40",
            setup: |d| forward(d, model(d, "bert-tiny", json!({"hidden_size": 1u64 << 40}))),
            stdin: "",
            says: &["config.json", "hidden_size"],
        },
        Case {
            name: "BERT 10^9 positions",
            setup: |d| {
                forward(
                    d,
                    model(
                        d,
                        "bert-tiny",
                        json!({"max_position_embeddings": 1_000_000_000u64}),
                    ),
                )
            },
            stdin: "",
            says: &["config.json", "max_position_embeddings"],
        },
        Case {
            name: "BERT 0 layers",
            setup: |d| forward(d, model(d, "bert-tiny", json!({"num_hidden_layers": 0}))),
            stdin: "",
            says: &["config.json", "num_hidden_layers"],
        },
        Case {
            name: "Marian 2^59 positions",
            setup: |d| {
                args(&[
                    "translate",
                    "--model",
                    &model(
                        d,
                        "marian-tiny",
                        json!({"max_position_embeddings": 1u64 << 59}),
                    ),
                ])
            },
            stdin: "hello\n",
            says: &["config.json", "max_position_embeddings"],
        },
        Case {
            name: "Marian 10^9 positions",
            setup: |d| {
                args(&[
                    "translate",
                    "--model",
                    &model(
                        d,
                        "marian-tiny",
                        json!({"max_position_embeddings": 1_000_000_000u64}),
                    ),
                ])
            },
            stdin: "hello\n",
            says: &["config.json", "max_position_embeddings"],
        },
        Case {
            name: "Marian 0 encoder layers",
            setup: |d| {
                args(&[
                    "translate",
                    "--model",
                    &model(d, "marian-tiny", json!({"encoder_layers": 0})),
                ])
            },
            stdin: "hello\n",
            says: &["config.json", "encoder_layers"],
        },
        Case {
            name: "T5 0 heads",
            setup: |d| {
                args(&[
                    "translate",
                    "--model",
                    &model(d, "t5-tiny", json!({"num_heads": 0})),
                ])
            },
            stdin: "hello\n",
            says: &["config.json", "num_heads"],
        },
        Case {
            name: "Llama heads do not divide the hidden size",
            setup: |d| {
                perplexity(
                    d,
                    causal(
                        d,
                        "llama-tiny",
                        json!({"num_attention_heads": 3, "head_dim": null}),
                    ),
                )
            },
            stdin: "",
            says: &["config.json"],
        },
        Case {
            name: "Llama 0 layers",
            setup: |d| perplexity(d, causal(d, "llama-tiny", json!({"num_hidden_layers": 0}))),
            stdin: "",
            says: &["config.json", "num_hidden_layers"],
        },
        Case {
            name: "Llama vocabulary of 2^40",
            setup: |d| {
                perplexity(
                    d,
                    causal(d, "llama-tiny", json!({"vocab_size": 1u64 << 40})),
                )
            },
            stdin: "",
            says: &["config.json", "vocab_size"],
        },
        Case {
            name: "model.safetensors truncated",
            setup: |d| {
                let m = bert(d);
                let p = Path::new(&m).join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
                forward(d, m)
            },
            stdin: "",
            says: &["model.safetensors"],
        },
        Case {
            name: "model.safetensors empty",
            setup: |d| {
                let m = bert(d);
                file(Path::new(&m), "model.safetensors", "");
                forward(d, m)
            },
            stdin: "",
            says: &["model.safetensors"],
        },
        Case {
            name: "model.safetensors missing",
            setup: |d| {
                let m = bert(d);
                std::fs::remove_file(Path::new(&m).join("model.safetensors")).unwrap();
                forward(d, m)
            },
            stdin: "",
            says: &["model.safetensors"],
        },
        Case {
            name: "NaN weight: forward",
            setup: |d| {
                let m = bert(d);
                poison(&m, "embeddings.word_embeddings.weight", f32::NAN);
                forward(d, m)
            },
            stdin: "",
            says: &["embeddings.word_embeddings.weight", "NaN"],
        },
        Case {
            name: "Inf weight: embed",
            setup: |d| {
                let m = bert(d);
                poison(
                    &m,
                    "encoder.layer.0.attention.self.query.weight",
                    f32::INFINITY,
                );
                embed(d, m)
            },
            stdin: "",
            says: &["encoder.layer.0.attention.self.query.weight", "inf"],
        },
        Case {
            name: "NaN weight: translate",
            setup: |d| {
                let m = model(d, "marian-tiny", json!({}));
                poison(&m, "model.shared.weight", f32::NAN);
                args(&["translate", "--model", &m])
            },
            stdin: "hello\n",
            says: &["model.shared.weight", "NaN"],
        },
        Case {
            name: "NaN weight: perplexity",
            setup: |d| {
                let m = causal(d, "llama-tiny", json!({}));
                poison(&m, "model.norm.weight", f32::NAN);
                perplexity(d, m)
            },
            stdin: "",
            says: &["model.norm.weight", "NaN"],
        },
        Case {
            name: "tokenizer.json is not JSON",
            setup: |d| {
                let m = bert(d);
                file(Path::new(&m), "tokenizer.json", "{\"version\": ");
                embed(d, m)
            },
            stdin: "",
            says: &["tokenizer.json"],
        },
        Case {
            name: "tokenizer.json that panicked the tokenizers library",
            setup: |d| {
                let m = bert(d);
                let p = Path::new(&m).join("tokenizer.json");
                let mut t: Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                t["post_processor"] = json!({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[NOPE]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {}});
                std::fs::write(&p, t.to_string()).unwrap();
                embed(d, m)
            },
            stdin: "",
            says: &["tokenizer.json", "[NOPE]"],
        },
        Case {
            name: "tokenizer with ids beyond the model's vocabulary",
            setup: |d| perplexity(d, causal_with_vocab(d, "llama-tiny", json!({}), 200)),
            stdin: "",
            says: &["tokenizer.json", "does not belong"],
        },
        Case {
            name: "GGUF truncated",
            setup: |d| {
                let g = file(d, "model.gguf", b"GGUF\x03\x00\x00\x00\x05");
                perplexity(d, g)
            },
            stdin: "",
            says: &["model.gguf"],
        },
        Case {
            name: "GGUF that is not one",
            setup: |d| {
                let g = file(d, "model.gguf", "hello, I am not a GGUF file at all");
                perplexity(d, g)
            },
            stdin: "",
            says: &["model.gguf"],
        },
        // Outputs that must not be clobbered.
        Case {
            name: "forward --out is a directory",
            setup: |d| {
                std::fs::create_dir(d.join("outdir")).unwrap();
                let m = bert(d);
                let i = ids(d);
                args(&[
                    "forward",
                    "--model",
                    &m,
                    "--input",
                    &i,
                    "--out",
                    &s(d.join("outdir")),
                ])
            },
            stdin: "",
            says: &["outdir", "directory"],
        },
        Case {
            name: "forward --out is a device",
            setup: |d| {
                let m = bert(d);
                let i = ids(d);
                args(&[
                    "forward",
                    "--model",
                    &m,
                    "--input",
                    &i,
                    "--out",
                    "/dev/null",
                ])
            },
            stdin: "",
            says: &["/dev/null", "not a regular file"],
        },
        Case {
            name: "forward --out is a FIFO",
            setup: |d| {
                let fifo = d.join("pipe");
                let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
                assert!(made.success());
                let m = bert(d);
                let i = ids(d);
                args(&["forward", "--model", &m, "--input", &i, "--out", &s(fifo)])
            },
            stdin: "",
            says: &["pipe", "not a regular file"],
        },
        Case {
            name: "embed --out in a missing directory",
            setup: |d| {
                let m = bert(d);
                let t = file(d, "t.txt", "hello\n");
                args(&[
                    "embed",
                    "--model",
                    &m,
                    "--text",
                    &t,
                    "--out",
                    &s(d.join("no/such/dir/out.json")),
                ])
            },
            stdin: "",
            says: &["no/such/dir"],
        },
        Case {
            name: "prune-hf --out exists",
            setup: |d| {
                std::fs::create_dir(d.join("pruned")).unwrap();
                prune_hf(d, &[])
            },
            stdin: "",
            says: &["pruned", "already exists"],
        },
        Case {
            name: "compress --out exists",
            setup: |d| {
                std::fs::create_dir(d.join("c")).unwrap();
                args(&[
                    "compress",
                    "--model",
                    &bert(d),
                    "--format",
                    "relprune-sparse",
                    "--out",
                    &s(d.join("c")),
                ])
            },
            stdin: "",
            says: &["already exists"],
        },
        Case {
            name: "decompress of a dense checkpoint",
            setup: |d| {
                args(&[
                    "decompress",
                    "--model",
                    &bert(d),
                    "--out",
                    &s(d.join("dense")),
                ])
            },
            stdin: "",
            says: &["model"],
        },
        // Inputs with no end.
        Case {
            name: "config.json is /dev/zero",
            setup: |d| {
                let m = bert(d);
                std::fs::remove_file(Path::new(&m).join("config.json")).unwrap();
                link(Path::new(&m), "config.json", "/dev/zero");
                forward(d, m)
            },
            stdin: "",
            says: &["config.json"],
        },
        Case {
            name: "embed --text is /dev/zero",
            setup: |d| {
                let m = bert(d);
                let t = link(d, "text.txt", "/dev/zero");
                args(&["embed", "--model", &m, "--text", &t, "--out", &out(d)])
            },
            stdin: "",
            says: &["text.txt", "refused"],
        },
        Case {
            name: "forward --input is /dev/zero",
            setup: |d| {
                let m = bert(d);
                let i = link(d, "in.json", "/dev/zero");
                args(&["forward", "--model", &m, "--input", &i, "--out", &out(d)])
            },
            stdin: "",
            says: &["in.json"],
        },
    ]
}

/// Names of leftovers a failed run must not leave: temporary files, staging and work
/// directories, outputs.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            let is_dir = e.file_type().unwrap().is_dir();
            if name.ends_with(".tmp")
                || name.contains("relprune-tmp")
                || name.contains("relprune-work")
                || name == "out.json"
                || name == "pruned" && !is_dir
            {
                found.push(s(e.path()));
            }
            if is_dir {
                stack.push(e.path());
            }
        }
    }
    found
}

#[test]
fn every_hostile_input_is_a_clear_error_that_leaves_nothing_behind() {
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let dir = tempfile::tempdir().unwrap();
        let argv = (case.setup)(dir.path());
        let before: Vec<String> = leftovers(dir.path());
        let mut child = Command::new(env!("CARGO_BIN_EXE_relprune"))
            .args(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(case.stdin.as_bytes());
        }
        let run = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&run.stderr).to_string();
        let mut wrong = Vec::new();
        if run.status.success() {
            wrong.push("exited 0".to_string());
        }
        if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
            wrong.push("panicked".into());
        }
        for frag in case.says {
            if !err.contains(frag) {
                wrong.push(format!("does not say `{frag}`"));
            }
        }
        let after = leftovers(dir.path());
        let left: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();
        if !left.is_empty() {
            wrong.push(format!("left {left:?}"));
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {} — stderr: {}",
                case.name,
                wrong.join("; "),
                err.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
