//! `cargo xtask fuzz`: mutation fuzzing of every parser a user's file reaches, on stable Rust.
//!
//! Each target takes arbitrary bytes and must return (an error is fine) without panicking. The
//! engine starts from valid seed inputs built here, stacks random mutations on them (bit flips,
//! interesting integers in binary headers and in JSON numbers, deletions, duplications,
//! splices), and keeps a mutant in its pool when it leads to an outcome not seen before (a
//! success, or an error message of a new shape): a cheap stand-in for coverage feedback that
//! walks the parsers past their first checks. A panic is a finding: its input is saved under
//! `xtask/fuzz/corpus/TARGET/`, which `cargo test` replays with the seeds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::flags;

/// A parser under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// IDX files (MNIST, Fashion-MNIST), raw or gzip/bzip2 compressed.
    Idx,
    /// CIFAR-10 binary batches.
    Cifar,
    /// Parallel text: two line-aligned sides, and TSV.
    ParallelText,
    /// Taskmaster-1 dialogue JSON.
    Taskmaster,
    /// Hugging Face `tokenizer.json`, then encoding and decoding with it.
    Tokenizer,
    /// `relprune bleu`'s inputs: hypothesis and reference lines, scored.
    Bleu,
    /// Safetensors files compressed (both sparse formats) and decompressed.
    SparseFile,
    /// relprune's training checkpoints (`checkpoint.safetensors` with its journal).
    Checkpoint,
    /// GGUF headers and the Llama configuration derived from them.
    Gguf,
    /// BERT `config.json`.
    ConfigBert,
    /// Marian `config.json`, and the parameter shapes it implies.
    ConfigMarian,
    /// T5 `config.json`.
    ConfigT5,
    /// Llama, Qwen2, Qwen3 and Mistral `config.json`.
    ConfigLlama,
}

impl Target {
    /// Its name on the command line and in the corpus directory.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// Scratch space of the targets that read files (checkpoints, GGUF): one directory per process.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Result<Self> {
        // In memory where the system has it: these targets write a file per execution.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("relprune-fuzz")
                .tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .context("cannot create the fuzzer's scratch directory")?;
        Ok(Self { dir })
    }

    /// `e`'s message without the scratch directory (so that outcome shapes tell errors apart).
    fn msg<E: std::fmt::Display>(&self, e: E) -> String {
        let dir = self.dir.path().display().to_string();
        e.to_string().replace(&dir, "")
    }

    fn file(&self, name: &str, bytes: &[u8]) -> std::result::Result<PathBuf, String> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).map_err(|e| format!("scratch: {e}"))?;
        Ok(p)
    }
}

/// The outcome of one execution: `Ok` or the error's message.
type Outcome = std::result::Result<(), String>;

fn msg<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Splits a fuzz input in two at its first 0xFF byte (never valid UTF-8, so free as a marker).
fn halves(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == 0xff) {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[]),
    }
}

/// Runs `target` on `bytes`.
fn run_target(target: Target, bytes: &[u8], scratch: &Scratch) -> Outcome {
    use relprune_data::text::{self, EmptyPairs};
    match target {
        Target::Idx => relprune_data::idx::parse_idx(bytes, "fuzz")
            .map(drop)
            .map_err(msg),
        Target::Cifar => relprune_data::parse_cifar_batch(bytes, "fuzz")
            .map(drop)
            .map_err(msg),
        Target::ParallelText => {
            let (a, b) = halves(bytes);
            let empty = match bytes.first().map(|b| b % 3) {
                Some(0) => EmptyPairs::Skip,
                Some(1) => EmptyPairs::Keep,
                _ => EmptyPairs::Error,
            };
            // Two sides when the input has a marker, else one TSV file.
            if bytes.contains(&0xff) {
                text::parse_parallel(a, "src", b, "tgt", empty)
                    .map(drop)
                    .map_err(msg)
            } else {
                text::parse_tsv(bytes, "tsv", empty).map(drop).map_err(msg)
            }
        }
        Target::Taskmaster => {
            text::parse_taskmaster(bytes, "fuzz", &text::DialogueOptions::default())
                .map(drop)
                .map_err(msg)
        }
        Target::Tokenizer => {
            let (json, input) = halves(bytes);
            let tok = text::TextTokenizer::from_bytes(json, "fuzz").map_err(msg)?;
            let line = String::from_utf8_lossy(input);
            let ids = tok.encode_at_most(&line, 64).map_err(msg)?;
            tok.decode(&ids, false).map(drop).map_err(msg)
        }
        Target::Bleu => {
            let (h, r) = halves(bytes);
            let hyps = text::split_lines(h, "hyp").map_err(msg)?;
            let refs = text::split_lines(r, "ref").map_err(msg)?;
            let config = relprune_eval::bleu::BleuConfig::default();
            relprune_eval::bleu::corpus_bleu(&hyps, &[refs], &config)
                .map(drop)
                .map_err(msg)
        }
        Target::SparseFile => {
            use relprune_sparse::file::{compress, decompress, Format};
            for format in [Format::RelpruneSparse, Format::SparseBitmask] {
                if let Ok(c) = compress(bytes, format, |_, _| true) {
                    relprune_sparse::file::serialize(&c.tensors, &c.metadata).map_err(msg)?;
                }
            }
            let (tensors, metadata) = decompress(bytes).map_err(msg)?;
            relprune_sparse::file::serialize_dense(&tensors, &metadata)
                .map(drop)
                .map_err(msg)
        }
        Target::Checkpoint => {
            scratch.file(relprune_prune::checkpoint::CHECKPOINT_FILE, bytes)?;
            relprune_prune::checkpoint::read(scratch.dir.path(), &candle_core::Device::Cpu)
                .map(drop)
                .map_err(|e| scratch.msg(e))
        }
        Target::Gguf => {
            let p = scratch.file("model.gguf", bytes)?;
            let g = relprune_models::hf::gguf::Gguf::open(&p).map_err(|e| scratch.msg(e))?;
            g.architecture().map_err(|e| scratch.msg(e))?;
            g.config().map(drop).map_err(|e| scratch.msg(e))
        }
        Target::ConfigBert => {
            let text = std::str::from_utf8(bytes).map_err(msg)?;
            relprune_models::hf::bert::BertConfig::from_json(text)
                .map(drop)
                .map_err(msg)
        }
        Target::ConfigMarian => {
            use relprune_models::hf::marian::{parameter_shapes, MarianConfig};
            let c: MarianConfig = serde_json::from_slice(bytes).map_err(msg)?;
            c.validate().map_err(msg)?;
            parameter_shapes(&c);
            Ok(())
        }
        Target::ConfigT5 => {
            let c: relprune_models::hf::t5::T5Config =
                serde_json::from_slice(bytes).map_err(msg)?;
            c.validate().map_err(msg)
        }
        Target::ConfigLlama => {
            let c: relprune_models::hf::llama::LlamaConfig =
                serde_json::from_slice(bytes).map_err(msg)?;
            c.validate().map_err(msg)
        }
    }
}

/// The repository's fixture directory of tiny Hugging Face checkpoints.
fn fixture(name: &str, file: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/data")
        .join(name)
        .join(file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fuzz seed {}: {e}", p.display()))
}

fn joined(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, &[0xff], b].concat()
}

/// A tokenizer small enough to parse a million times.
const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":0,"content":"[UNK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":{"type":"Lowercase"},"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"the":1,"cat":2,"sat":3},"unk_token":"[UNK]"}}"#;

fn safetensors_bytes(tensors: &[(&str, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)]) -> Vec<u8> {
    let tensors: BTreeMap<String, relprune_sparse::file::Raw> = tensors
        .iter()
        .map(|(n, shape, v)| {
            let raw = relprune_sparse::file::Raw {
                dtype: safetensors::Dtype::F32,
                shape: shape.clone(),
                data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            (n.to_string(), raw)
        })
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    relprune_sparse::file::serialize(&tensors, &meta).expect("seed tensors serialize")
}

fn tiny_gguf() -> Vec<u8> {
    use candle_core::quantized::gguf_file::{write, Value as G};
    use candle_core::quantized::{GgmlDType, QTensor};
    let t = candle_core::Tensor::arange(0f32, 32f32, &candle_core::Device::Cpu)
        .and_then(|t| t.reshape((4, 8)))
        .expect("seed tensor");
    let q = QTensor::quantize(&t, GgmlDType::F32).expect("seed tensor quantizes");
    let meta: Vec<(&str, G)> = vec![
        ("general.architecture", G::String("llama".into())),
        ("llama.block_count", G::U32(1)),
        ("llama.context_length", G::U32(64)),
        ("llama.embedding_length", G::U32(8)),
        ("llama.feed_forward_length", G::U32(16)),
        ("llama.attention.head_count", G::U32(2)),
        ("llama.attention.head_count_kv", G::U32(1)),
        ("llama.rope.freq_base", G::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", G::F32(1e-6)),
        ("tokenizer.ggml.bos_token_id", G::U32(1)),
        ("tokenizer.ggml.eos_token_id", G::U32(2)),
    ];
    let meta_refs: Vec<(&str, &G)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    write(&mut out, &meta_refs, &[("token_embd.weight", &q)]).expect("seed GGUF writes");
    out.into_inner()
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

/// Valid inputs of `target`, where its mutations start.
pub fn seeds(target: Target) -> Vec<Vec<u8>> {
    match target {
        Target::Idx => {
            let images = idx_bytes(&[2, 3, 3], &(0..18).collect::<Vec<u8>>());
            let labels = idx_bytes(&[4], &[1, 7, 0, 9]);
            let mut gz = Vec::new();
            {
                use std::io::Write;
                let mut e = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
                e.write_all(&images).expect("in-memory gzip");
                e.finish().expect("in-memory gzip");
            }
            vec![images, labels, gz]
        }
        Target::Cifar => {
            let mut b = vec![3u8];
            b.extend((0..relprune_data::cifar::IMAGE_BYTES).map(|i| i as u8));
            let two = [b.clone(), b.clone()].concat();
            vec![b, two]
        }
        Target::ParallelText => vec![
            joined(b"the cat sat\nhello\n", b"die Katze sass\nhallo\n"),
            b"one\teins\ntwo\tzwei\n\nthree\tdrei".to_vec(),
        ],
        Target::Taskmaster => vec![br#"[{"conversation_id":"dlg-1","utterances":[{"index":0,"speaker":"USER","text":"Book a table for two."},{"index":1,"speaker":"ASSISTANT","text":"Which restaurant?"},{"index":2,"speaker":"USER","text":"Luigi's, at eight."},{"index":3,"speaker":"ASSISTANT","text":"Done."}]}]"#.to_vec()],
        Target::Tokenizer => vec![
            joined(TINY_TOKENIZER.as_bytes(), b"The cat sat on the mat"),
            joined(&fixture("bert-tiny", "tokenizer.json"), b"hello world"),
        ],
        Target::Bleu => vec![
            joined(b"the cat sat on the mat\nhello there\n", b"the cat is on the mat\nhello there general\n"),
            joined(b"a\n\nb c d e f\n", b"a\n\nb c d e\n"),
        ],
        Target::SparseFile => {
            let w: Vec<f32> = (0..32).map(|i| if i % 3 == 0 { i as f32 } else { 0.0 }).collect();
            let dense = safetensors_bytes(
                &[("layer.weight", vec![4, 8], w), ("layer.bias", vec![4], vec![1.0; 4])],
                &[("format", "pt")],
            );
            let mut out = vec![dense.clone()];
            for format in [
                relprune_sparse::file::Format::RelpruneSparse,
                relprune_sparse::file::Format::SparseBitmask,
            ] {
                let c = relprune_sparse::file::compress(&dense, format, |_, _| true)
                    .expect("seed compresses");
                out.push(
                    relprune_sparse::file::serialize(&c.tensors, &c.metadata)
                        .expect("seed serializes"),
                );
            }
            out
        }
        Target::Checkpoint => {
            let journal = serde_json::json!({
                "format": relprune_prune::checkpoint::CHECKPOINT_FORMAT,
                "run": {"config": {"seed": 1}},
                "epochs_trained": 2,
                "lr": 0.05,
                "regularizer": null,
                "completed": [["dense", {"epochs": 2}]],
                "current": ["pruning", {"epoch": 1}],
            })
            .to_string();
            vec![safetensors_bytes(
                &[
                    ("param/w", vec![2, 2], vec![1.0, 0.0, -2.0, 0.5]),
                    ("mask/w", vec![2, 2], vec![1.0, 0.0, 1.0, 1.0]),
                    ("optim/w/m1", vec![2, 2], vec![0.1, 0.0, 0.2, 0.3]),
                    ("phase/best/w", vec![2, 2], vec![1.0, 0.0, -2.0, 0.5]),
                ],
                &[("relprune", &journal)],
            )]
        }
        Target::Gguf => vec![tiny_gguf()],
        Target::ConfigBert => vec![fixture("bert-tiny", "config.json")],
        Target::ConfigMarian => vec![
            fixture("marian-tiny", "config.json"),
            fixture("marian-tiny-pruned90", "config.json"),
        ],
        Target::ConfigT5 => vec![fixture("t5-tiny", "config.json")],
        Target::ConfigLlama => ["llama-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-tiny"]
            .iter()
            .map(|n| fixture(n, "config.json"))
            .collect(),
    }
}

/// Integers that break size arithmetic: zero, one, sign and width boundaries, huge counts.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1_000_000_000,
    1 << 59,
    i64::MAX as u64,
    u64::MAX,
];

/// Replacements for a number in JSON text.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "1.5",
    "-0",
    "1e309",
    "1e-400",
    "NaN",
    "null",
    "\"7\"",
    "4294967296",
    "576460752303423488",
    "18446744073709551616",
    "99999999999999999999999",
    "1000000000",
];

/// Bytes JSON and line parsers care about.
const BYTES: &[u8] = b"\x00\x01\x7f\x80\xff0123456789-+.eE\"\\{}[],:\n\r\t ";

/// Most bytes a mutant may have: parsers are fuzzed for logic, not throughput.
const MAX_LEN: usize = 1 << 16;

/// Applies one to four random mutations to `input`, splicing from `pool`.
fn mutate(input: &mut Vec<u8>, pool: &[Vec<u8>], rng: &mut StdRng) {
    for _ in 0..rng.random_range(1..=4) {
        let len = input.len();
        match rng.random_range(0..9) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] = BYTES[rng.random_range(0..BYTES.len())];
            }
            2 if len > 0 => {
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let width = [1usize, 2, 4, 8][rng.random_range(0..4)];
                let bytes = if rng.random_bool(0.5) {
                    v.to_le_bytes()[..width].to_vec()
                } else {
                    v.to_be_bytes()[8 - width..].to_vec()
                };
                let i = rng.random_range(0..len);
                for (k, b) in bytes.into_iter().enumerate() {
                    if let Some(slot) = input.get_mut(i + k) {
                        *slot = b;
                    }
                }
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(1 + len / 4));
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                let chunk = input[i..i + n].to_vec();
                let at = rng.random_range(0..=len);
                input.splice(at..at, chunk);
            }
            5 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                input.splice(at..at, bytes);
            }
            6 if !pool.is_empty() => {
                let other = &pool[rng.random_range(0..pool.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    let at = rng.random_range(0..=len);
                    input.truncate(at);
                    input.extend_from_slice(&other[from..]);
                }
            }
            7 => {
                // A number of a JSON or text input: its digits replaced whole.
                let starts: Vec<usize> = (0..len)
                    .filter(|&i| {
                        input[i].is_ascii_digit() && (i == 0 || !input[i - 1].is_ascii_digit())
                    })
                    .collect();
                if !starts.is_empty() {
                    let s = starts[rng.random_range(0..starts.len())];
                    let mut e = s;
                    while e < len && (input[e].is_ascii_digit() || input[e] == b'.') {
                        e += 1;
                    }
                    let with = NUMBERS[rng.random_range(0..NUMBERS.len())];
                    input.splice(s..e, with.bytes());
                }
            }
            _ if len > 0 => input.truncate(rng.random_range(0..len)),
            _ => {}
        }
    }
    input.truncate(MAX_LEN);
}

/// The shape of an outcome: an error message without its numbers (what the pool's feedback
/// distinguishes).
fn shape(outcome: &Outcome) -> String {
    match outcome {
        Ok(()) => "ok".into(),
        Err(m) => m.chars().take(48).filter(|c| !c.is_ascii_digit()).collect(),
    }
}

/// A panic's message.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `target` on `bytes`, turning a panic into `Err(Some(message))`.
fn guarded(
    target: Target,
    bytes: &[u8],
    scratch: &Scratch,
) -> std::result::Result<Outcome, String> {
    catch_unwind(AssertUnwindSafe(|| run_target(target, bytes, scratch)))
        .map_err(|p| panic_text(p.as_ref()))
}

/// The checked-in inputs of `target` (earlier findings), by file.
pub fn corpus(root: &Path, target: Target) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let dir = root.join(target.name());
    let mut out = Vec::new();
    if let Ok(list) = std::fs::read_dir(&dir) {
        for e in list {
            let p = e?.path();
            let bytes =
                std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            out.push((p, bytes));
        }
    }
    out.sort();
    Ok(out)
}

/// Where findings are kept (and replayed from by `cargo test`).
pub fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// What fuzzing one target did.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    /// The target.
    pub target: Target,
    /// Executions run.
    pub executions: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Distinct outcome shapes reached (successes and error kinds).
    pub outcomes: usize,
    /// Executions that ended in success (the input parsed).
    pub accepted: u64,
    /// Inputs that panicked, with their message (saved to the corpus).
    pub panics: Vec<(String, String)>,
}

impl TargetReport {
    /// The cells of its row in fuzz.md: target, executions, seconds, executions/s, outcomes,
    /// accepted, panics.
    fn row(&self) -> Vec<String> {
        vec![
            self.target.name(),
            self.executions.to_string(),
            format!("{:.0}", self.seconds),
            format!("{:.0}", self.executions as f64 / self.seconds.max(1e-9)),
            self.outcomes.to_string(),
            self.accepted.to_string(),
            self.panics.len().to_string(),
        ]
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Fuzzes `target` until `execs` executions or `seconds` have passed.
/// Starts from the seeds and the checked-in corpus; saves panicking inputs under `save_to`.
fn fuzz_target(
    target: Target,
    execs: u64,
    seconds: f64,
    seed: u64,
    save_to: &Path,
    bar: &ProgressBar,
) -> Result<TargetReport> {
    let scratch = Scratch::new()?;
    let mut pool: Vec<Vec<u8>> = seeds(target);
    pool.extend(corpus(&corpus_root(), target)?.into_iter().map(|(_, b)| b));
    let mut seen: HashSet<String> = HashSet::new();
    let mut report = TargetReport {
        target,
        executions: 0,
        seconds: 0.0,
        outcomes: 0,
        accepted: 0,
        panics: Vec::new(),
    };
    let mut panicked: HashSet<String> = HashSet::new();
    // Inputs that parse: half of the parents come from here, so that mutations reach the
    // checks past the header (most mutants of anything fail early).
    let mut parsed: Vec<Vec<u8>> = pool.clone();
    let mut parsed_lens: HashSet<usize> = parsed.iter().map(Vec::len).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ fnv(target.name().as_bytes()));
    let t0 = Instant::now();
    let mut input = Vec::new();
    while report.executions < execs && t0.elapsed().as_secs_f64() < seconds {
        input.clear();
        let parents = if rng.random_bool(0.5) { &parsed } else { &pool };
        input.extend_from_slice(&parents[rng.random_range(0..parents.len())]);
        mutate(&mut input, &pool, &mut rng);
        report.executions += 1;
        match guarded(target, &input, &scratch) {
            Ok(outcome) => {
                if outcome.is_ok() {
                    report.accepted += 1;
                    if parsed.len() < 1024 && parsed_lens.insert(input.len()) {
                        parsed.push(input.clone());
                    }
                }
                if seen.insert(shape(&outcome)) && pool.len() < 4096 {
                    pool.push(input.clone());
                }
            }
            Err(panic) => {
                let key: String = panic.chars().filter(|c| !c.is_ascii_digit()).collect();
                if panicked.insert(key) {
                    let dir = save_to.join(target.name());
                    std::fs::create_dir_all(&dir)?;
                    let path = dir.join(format!("crash-{:016x}", fnv(&input)));
                    relprune_io::write(&path, &input)?;
                    let line = format!(
                        "{}: panic: {panic} (saved {})",
                        target.name(),
                        path.display()
                    );
                    if bar.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        bar.println(line);
                    }
                    report.panics.push((path.display().to_string(), panic));
                }
            }
        }
        if report.executions.is_multiple_of(4096) {
            bar.set_position(report.executions.min(execs));
            bar.set_message(format!("{} outcomes", seen.len()));
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report.outcomes = seen.len();
    Ok(report)
}

/// `cargo xtask fuzz`.
pub fn run(f: flags::Fuzz) -> Result<()> {
    let targets: Vec<Target> = match f.target {
        Some(t) => vec![t],
        None => Target::value_variants().to_vec(),
    };
    // Panics are findings, reported by the engine, not printed by the default hook.
    std::panic::set_hook(Box::new(|_| {}));
    let mut reports = Vec::new();
    for target in targets {
        let bar = ProgressBar::new(f.execs);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>14} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(target.name());
        let r = fuzz_target(target, f.execs, f.time, f.seed, &corpus_root(), &bar)?;
        bar.finish_and_clear();
        eprintln!("{}", r.row().join(" "));
        reports.push(r);
    }
    let _ = std::panic::take_hook();
    let mut md = String::from(
        "| target | executions | seconds | executions/s | outcomes | accepted | panics |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &reports {
        md.push_str(&format!("| {} |\n", r.row().join(" | ")));
    }
    std::fs::create_dir_all(&f.out)?;
    relprune_io::write(&f.out.join("fuzz.md"), md.as_bytes())?;
    relprune_io::write(
        &f.out.join("fuzz.json"),
        serde_json::to_string_pretty(&reports)?.as_bytes(),
    )?;
    println!("{md}");
    let panics: usize = reports.iter().map(|r| r.panics.len()).sum();
    anyhow::ensure!(
        panics == 0,
        "{panics} panicking inputs found (saved under {})",
        corpus_root().display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_parses_and_every_saved_input_replays_without_a_panic() {
        let scratch = Scratch::new().unwrap();
        let root = corpus_root();
        for &target in Target::value_variants() {
            for (i, seed) in seeds(target).iter().enumerate() {
                let outcome = guarded(target, seed, &scratch)
                    .unwrap_or_else(|p| panic!("{} seed {i} panicked: {p}", target.name()));
                assert_eq!(outcome, Ok(()), "{} seed {i} is not valid", target.name());
            }
            for (path, bytes) in corpus(&root, target).unwrap() {
                if let Err(p) = guarded(target, &bytes, &scratch) {
                    panic!("{} panics again: {p}", path.display());
                }
            }
        }
    }

    #[test]
    fn a_short_fuzz_run_of_every_target_finds_no_panic() {
        // A smoke run (the real one is `cargo xtask fuzz`): the engine runs and mutants differ.
        let bar = ProgressBar::hidden();
        let findings = tempfile::tempdir().unwrap();
        for &target in Target::value_variants() {
            let r = fuzz_target(target, 300, 60.0, 7, findings.path(), &bar).unwrap();
            assert_eq!(r.executions, 300);
            assert!(
                r.outcomes >= 2,
                "{}: {} outcomes",
                target.name(),
                r.outcomes
            );
            assert!(r.panics.is_empty(), "{:?}", r.panics);
        }
    }
}
