//! `relprune prune-hf` as a user runs it: the built binary on the tiny Hugging Face fixtures of
//! relprune-models (`models/tests/data`), end to end (output loads, same tensors, target reached,
//! `embed`/`forward` work on it), its error cases (nothing left behind), and resuming an
//! interrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/tests/data")
        .join(name)
}

fn relprune(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_relprune"));
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("runs the relprune binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `relprune_report.json` of output directory `out`.
fn read_report(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("relprune_report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The percentage of zeros over the linear layers (all but embeddings) a report gives.
fn linear_sparsity_pct(report: &Value) -> f64 {
    let groups = report["layer_groups"].as_array().unwrap();
    let linear = groups
        .iter()
        .find(|g| g["name"] == "linear (all but embeddings)")
        .unwrap();
    let (n, nz) = (
        linear["params"].as_f64().unwrap(),
        linear["nonzero"].as_f64().unwrap(),
    );
    100.0 * (1.0 - nz / n)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Sentences in the bert-tiny vocabulary, deterministic.
fn sentences(n: usize, offset: usize) -> String {
    let subj = [
        "the dog",
        "my friend",
        "the old man",
        "a small child",
        "she",
        "the teacher",
    ];
    let verb = ["sees", "finds", "wants", "buys", "likes", "eats", "reads"];
    let obj = [
        "the red ball",
        "a new book",
        "the blue cup",
        "an apple",
        "the green car",
    ];
    let time = ["today", "every day", "in the morning", "again", "at night"];
    (0..n)
        .map(|i| {
            let i = i + offset;
            format!(
                "{} {} {} {} .\n",
                subj[i % subj.len()],
                verb[(i / 2) % verb.len()],
                obj[(i / 3) % obj.len()],
                time[(i / 5) % time.len()]
            )
        })
        .collect()
}

/// name → (dtype, shape) of a safetensors file's header.
fn header(path: &Path) -> BTreeMap<String, (String, Vec<u64>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    h.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap());
            (
                k.clone(),
                (v["dtype"].as_str().unwrap().to_string(), shape.collect()),
            )
        })
        .collect()
}

/// The f32 values of one tensor of a safetensors file.
fn tensor_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &h[name]["data_offsets"];
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    bytes[8 + n + a..8 + n + b]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Copies a fixture directory (to be broken by the test).
fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// Only `keep` is left in `dir`: no temp, work or partial output directories.
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want);
}

fn prune_bert(
    model: &Path,
    text: &Path,
    out: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Output {
    let mut args = vec![
        "prune-hf",
        "--model",
        s(model),
        "--text",
        s(text),
        "--target-sparsity",
        "0.5",
        "--out",
        s(out),
        "--epochs",
        "4",
        "--finetune-epochs",
        "1",
        "--batch-size",
        "8",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    relprune(&args, envs)
}

#[test]
fn prune_hf_prunes_tiny_bert_into_a_loadable_directory() {
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, sentences(48, 0)).unwrap();
    let held_out = dir.path().join("held_out.txt");
    std::fs::write(&held_out, sentences(10, 100)).unwrap();
    let out = dir.path().join("pruned");
    let run = prune_bert(
        &fixture("bert-tiny"),
        &text,
        &out,
        &["--sparse", "--eval-text", s(&held_out)],
        &[],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    // The work directory is gone after success; nothing else was left beside the output.
    assert_only(dir.path(), &["text.txt", "held_out.txt", "pruned"]);

    // Same tensors as the input: names, dtypes, shapes.
    let input = fixture("bert-tiny").join("model.safetensors");
    let output = out.join("model.safetensors");
    assert_eq!(header(&input), header(&output));
    // Every other file is copied, and the reports are there.
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "reference.json",
    ] {
        assert_eq!(
            std::fs::read(fixture("bert-tiny").join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
    for f in [
        "relprune_report.json",
        "report.md",
        "model.sparse.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // Every linear (and word-embedding) matrix is at least half zeros.
    for (name, (_, shape)) in header(&output) {
        let v = tensor_f32(&output, &name);
        let zeros = v.iter().filter(|x| **x == 0.0).count();
        let prunable = shape.len() == 2
            && name.ends_with("weight")
            && !name.contains("position_embeddings")
            && !name.contains("token_type_embeddings")
            && !name.starts_with("pooler");
        if prunable && is_token_embedding(&name) {
            // Off by default (`--prune-embeddings`): the table comes back unpruned.
            assert!(
                zeros * 2 < v.len(),
                "{name} was pruned: {zeros} zeros of {}",
                v.len()
            );
        } else if prunable {
            assert!(zeros * 2 >= v.len(), "{name}: {zeros} zeros of {}", v.len());
        }
    }

    let report = read_report(&out);
    assert_eq!(report["metric"], "cosine_similarity");
    assert_eq!(report["higher_is_better"], true);
    assert_eq!(report["dataset"]["test"], 10);
    // The default two distillation variants of every training line (`--augment`), and the
    // default vocabulary-substituted ones (`--vocab-augment`).
    assert_eq!(report["config"]["augment"], 2);
    let vocab = report["config"]["vocab_augment"].as_u64().unwrap();
    assert!(vocab > 0);
    let valid = report["dataset"]["valid"].as_u64().unwrap();
    assert_eq!(
        report["dataset"]["train"].as_u64().unwrap(),
        (3 + vocab) * (48 - valid)
    );
    let linear = linear_sparsity_pct(&report);
    assert!(linear >= 50.0, "{linear}");
    let cos = report["pruned"]["value"].as_f64().unwrap();
    assert!(cos > 0.0 && cos <= 1.0 + 1e-6, "{cos}");
    // An encoder's default final step: SparseGPT, then each layer distilled.
    assert_eq!(report["extra"]["final_step"]["method"], "distill");
    let layers = &report["extra"]["final_step"]["details"]["layers"];
    assert_eq!(layers.as_array().unwrap().len(), 2, "{layers}");

    // `relprune embed` and `relprune forward` run on the result.
    let emb = dir.path().join("emb.json");
    let r = relprune(
        &[
            "embed",
            "--model",
            s(&out),
            "--text",
            s(&held_out),
            "--out",
            s(&emb),
        ],
        &[],
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let e: Value = serde_json::from_str(&std::fs::read_to_string(&emb).unwrap()).unwrap();
    assert_eq!(e["embeddings"].as_array().unwrap().len(), 10);
    let fwd = dir.path().join("fwd.json");
    let r = relprune(
        &[
            "forward",
            "--model",
            s(&out),
            "--input",
            s(&out.join("reference.json")),
            "--out",
            s(&fwd),
        ],
        &[],
    );
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn distillation_beats_reconstruction_which_beats_magnitude_on_held_out_embeddings() {
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, sentences(64, 0)).unwrap();
    let held_out = dir.path().join("held_out.txt");
    std::fs::write(&held_out, sentences(16, 100)).unwrap();
    let cosine = |step: &str| {
        let out = dir.path().join(step);
        // No rounds and no fine-tune: the final step alone takes every matrix to 70%.
        let run = relprune(
            &[
                "prune-hf",
                "--model",
                s(&fixture("bert-tiny")),
                "--text",
                s(&text),
                "--eval-text",
                s(&held_out),
                "--out",
                s(&out),
                "--final-step",
                step,
                "--target-sparsity",
                "0.7",
                "--epochs",
                "0",
                "--finetune-epochs",
                "0",
                "--quiet",
            ],
            &[],
        );
        assert!(run.status.success(), "{}", stderr(&run));
        let report = read_report(&out);
        assert_eq!(report["extra"]["final_step"]["method"], step);
        let linear = linear_sparsity_pct(&report);
        assert!(linear >= 70.0, "{step}: {linear}");
        report["pruned"]["value"].as_f64().unwrap()
    };
    let (rec, mag) = (cosine("reconstruct"), cosine("magnitude"));
    assert!(
        rec > mag,
        "held-out cosine: reconstruct {rec}, magnitude {mag}"
    );
    // The same SparseGPT step, then each layer trained towards the dense layer's outputs.
    let dist = cosine("distill");
    assert!(
        dist > rec,
        "held-out cosine: distill {dist}, reconstruct {rec}"
    );
}

/// Runs prune-hf on a broken copy of bert-tiny and checks the error and that nothing is left.
fn assert_fails(model: &Path, text_dir: &Path, expect: &[&str]) {
    let text = text_dir.join("text.txt");
    std::fs::write(&text, sentences(20, 0)).unwrap();
    let out = text_dir.join("pruned");
    let run = prune_bert(model, &text, &out, &[], &[]);
    assert!(!run.status.success());
    let err = stderr(&run);
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
    assert!(!out.exists(), "a partial output directory was left");
    let left: Vec<String> = std::fs::read_dir(text_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pruned"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_truncated_safetensors_file_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let model = copy_fixture("bert-tiny", dir.path());
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&model, dir.path(), &["model.safetensors"]);
}

#[test]
fn an_unsupported_architecture_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let model = copy_fixture("bert-tiny", dir.path());
    let path = model.join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"model_type\": \"bert\"", "\"model_type\": \"gpt2\"");
    std::fs::write(&path, text).unwrap();
    assert_fails(
        &model,
        dir.path(),
        &["config.json", "gpt2", "bert, marian, t5"],
    );
}

#[test]
fn encoder_only_options_on_a_translation_model_are_clear_errors() {
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "the cat runs .\nhello .\n").unwrap();
    let out = dir.path().join("pruned");
    for (flag, value) in [
        ("--augment", "1"),
        ("--vocab-augment", "1"),
        ("--final-step", "distill"),
        ("--final-step", "reconstruct"),
        ("--final-step", "wanda"),
    ] {
        let run = relprune(
            &[
                "prune-hf",
                "--model",
                s(&fixture("marian-tiny")),
                "--text",
                s(&text),
                "--target-sparsity",
                "0.5",
                flag,
                value,
                "--out",
                s(&out),
                "--quiet",
            ],
            &[],
        );
        assert!(!run.status.success(), "{flag} {value}");
        let err = stderr(&run);
        assert!(err.contains(flag) && err.contains("marian"), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn a_tokenizer_of_another_model_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let model = copy_fixture("bert-tiny", dir.path());
    // Marian's tokenizer has 199 entries; bert-tiny's embedding table 132 rows.
    std::fs::copy(
        fixture("marian-tiny").join("tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    assert_fails(
        &model,
        dir.path(),
        &["tokenizer.json", "does not fit the model"],
    );
}

#[test]
fn a_missing_tensor_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let model = copy_fixture("bert-tiny", dir.path());
    // Rename one tensor in the header (same data, so the file stays valid safetensors).
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let name = "encoder.layer.1.output.dense.weight";
    assert!(h.contains(name));
    let h = h.replace(name, "encoder.layer.1.output.dense.wXight");
    let mut fixed = (h.len() as u64).to_le_bytes().to_vec();
    fixed.extend_from_slice(h.as_bytes());
    fixed.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, fixed).unwrap();
    assert_fails(&model, dir.path(), &["model.safetensors", name]);
}

#[test]
fn a_hub_id_missing_from_the_offline_cache_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, sentences(20, 0)).unwrap();
    let out = dir.path().join("pruned");
    let run = relprune(
        &[
            "prune-hf",
            "--model",
            "no-such-org/no-such-model",
            "--text",
            s(&text),
            "--target-sparsity",
            "0.5",
            "--out",
            s(&out),
        ],
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", s(dir.path()))],
    );
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("Hugging Face cache"),
        "{}",
        stderr(&run)
    );
    assert!(!out.exists());
}

#[test]
fn an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one_whatever_the_memory_policy() {
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, sentences(40, 0)).unwrap();
    let model = fixture("bert-tiny");

    let straight = dir.path().join("straight");
    let run = prune_bert(&model, &text, &straight, &[], &[]);
    assert!(run.status.success(), "{}", stderr(&run));

    // Interrupted after 2 training epochs: no output, the checkpoint is in the work directory.
    let out = dir.path().join("resumed");
    let work = dir.path().join("work");
    let run = prune_bert(
        &model,
        &text,
        &out,
        &["--work", s(&work)],
        &[("RELPRUNE_INTERRUPT_AFTER_EPOCHS", "2")],
    );
    assert!(!run.status.success());
    assert!(stderr(&run).contains("interrupted"), "{}", stderr(&run));
    assert!(!out.exists());
    assert!(work.join("checkpoint.safetensors").is_file());

    // A fresh run into the same work directory refuses to overwrite the checkpoint.
    let run = prune_bert(&model, &text, &out, &["--work", s(&work)], &[]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("--resume"), "{}", stderr(&run));

    let resume = |memory: &str| {
        let args = ["prune-hf", "--resume", s(&work), "--out", s(&out)];
        relprune(&[&args[..], &["--quiet", "--memory", memory]].concat(), &[])
    };
    // An unknown allocator policy is refused before any work, naming the flag.
    let run = resume("huge");
    assert!(!run.status.success());
    assert!(stderr(&run).contains("--memory"), "{}", stderr(&run));
    assert!(work.join("checkpoint.safetensors").is_file());

    // Resumed with another allocator policy (not a setting of the run: not named as ignored,
    // and the result is the same bytes).
    let run = resume("lean");
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(!stderr(&run).contains("ignoring"), "{}", stderr(&run));
    assert!(
        !work.exists(),
        "the work directory is removed after success"
    );
    assert_eq!(
        std::fs::read(straight.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap(),
        "the resumed run's model differs from the uninterrupted run's"
    );
}

/// Toy English→German pairs in the vocabularies of the tiny Marian and T5 fixtures.
fn pairs_tsv(n: usize) -> String {
    let src = [
        "the cat runs .",
        "hello .",
        "the dog sleeps .",
        "the man eats an apple .",
    ];
    let tgt = [
        "die katze läuft .",
        "hallo .",
        "der hund schläft .",
        "der mann isst einen apfel .",
    ];
    (0..n)
        .map(|i| format!("{}\t{}\n", src[i % 4], tgt[i % 4]))
        .collect()
}

/// Prunes a tiny translation fixture (pairs or plain text) and checks the output as for BERT.
fn prune_seq2seq(name: &str, data_flag: &str) {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data.txt");
    if data_flag == "--data" {
        std::fs::write(&data, pairs_tsv(24)).unwrap();
    } else {
        let text: String = pairs_tsv(24)
            .lines()
            .map(|l| l.split('\t').next().unwrap().to_string() + "\n")
            .collect();
        std::fs::write(&data, text).unwrap();
    }
    let out = dir.path().join("pruned");
    let model = fixture(name);
    let run = relprune(
        &[
            "prune-hf",
            "--model",
            s(&model),
            data_flag,
            s(&data),
            "--target-sparsity",
            "0.5",
            "--out",
            s(&out),
            "--epochs",
            "2",
            "--finetune-epochs",
            "1",
            "--batch-size",
            "8",
            "--quiet",
        ],
        &[],
    );
    assert!(run.status.success(), "{name}: {}", stderr(&run));
    assert_only(dir.path(), &["data.txt", "pruned"]);
    let input = model.join("model.safetensors");
    let output = out.join("model.safetensors");
    assert_eq!(header(&input), header(&output), "{name}");
    let mut checked = 0;
    for (t, (_, shape)) in header(&output) {
        if shape.len() == 2
            && t.ends_with("weight")
            && !t.contains("relative_attention_bias")
            && !t.contains("embed_positions")
            && !is_token_embedding(&t)
        {
            let v = tensor_f32(&output, &t);
            let zeros = v.iter().filter(|x| **x == 0.0).count();
            assert!(
                zeros * 2 >= v.len(),
                "{name} {t}: {zeros} zeros of {}",
                v.len()
            );
            checked += 1;
        }
    }
    assert!(checked > 4, "{name}: only {checked} prunable tensors");
    let report = read_report(&out);
    assert_eq!(report["metric"], "bleu");
    let fwd = dir.path().join("fwd.json");
    let r = relprune(
        &[
            "forward",
            "--model",
            s(&out),
            "--input",
            s(&out.join("reference.json")),
            "--out",
            s(&fwd),
        ],
        &[],
    );
    assert!(r.status.success(), "{name}: {}", stderr(&r));
}

#[test]
fn prune_hf_prunes_tiny_marian_on_pairs() {
    prune_seq2seq("marian-tiny", "--data");
}

#[test]
fn prune_hf_prunes_tiny_t5_on_pairs() {
    prune_seq2seq("t5-tiny", "--data");
}

#[test]
fn prune_hf_distills_tiny_marian_on_plain_text() {
    prune_seq2seq("marian-tiny", "--text");
}

/// Token embeddings and LM heads, which `prune-hf` leaves alone unless `--prune-embeddings`.
fn is_token_embedding(name: &str) -> bool {
    name.contains("word_embeddings")
        || name.contains("embed_tokens")
        || name.ends_with("shared.weight")
        || name.starts_with("lm_head")
}

#[test]
fn an_unknown_option_value_is_an_error_listing_the_valid_ones() {
    for (flag, value, valid) in [
        ("--regularizer", "bogus", "selective, taylor, lobster"),
        (
            "--restore",
            "best",
            "last-improvement, lowest-loss, current",
        ),
        ("--gate-stat", "median", "max, mean, or qQ"),
    ] {
        let run = relprune(
            &[
                "prune-hf",
                "--model",
                s(&fixture("bert-tiny")),
                "--text",
                "text.txt",
                "--target-sparsity",
                "0.5",
                "--out",
                "never-written",
                flag,
                value,
            ],
            &[],
        );
        assert!(!run.status.success());
        let err = stderr(&run);
        assert!(err.contains(value) && err.contains(valid), "{err}");
    }
    assert!(!Path::new("never-written").exists());
}

#[test]
fn prune_hf_writes_a_compressed_checkpoint_that_decompresses_to_the_dense_run() {
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, sentences(32, 0)).unwrap();
    let (dense, packed, back) = (
        dir.path().join("dense"),
        dir.path().join("packed"),
        dir.path().join("back"),
    );
    let run = prune_bert(&fixture("bert-tiny"), &text, &dense, &[], &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let extra = ["--format", "sparse-bitmask"];
    let run = prune_bert(&fixture("bert-tiny"), &text, &packed, &extra, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let report = read_report(&packed);
    let compression = &report["extra"]["compression"];
    assert_eq!(compression["format"], "sparse-bitmask");
    assert!(!compression["compressed"].as_array().unwrap().is_empty());
    assert!(compression["compressed_bytes"].as_u64() < compression["dense_bytes"].as_u64());
    let config = std::fs::read_to_string(packed.join("config.json")).unwrap();
    assert!(config.contains("\"sparse-bitmask\""), "{config}");

    let r = relprune(
        &["decompress", "--model", s(&packed), "--out", s(&back)],
        &[],
    );
    assert!(r.status.success(), "{}", stderr(&r));
    for f in ["model.safetensors", "config.json"] {
        let same = std::fs::read(dense.join(f)).unwrap() == std::fs::read(back.join(f)).unwrap();
        assert!(same, "{f} differs from the dense run's");
    }

    // A compressed checkpoint is not pruned again as it is: the message says what to do.
    let again = dir.path().join("again");
    let r = prune_bert(&packed, &text, &again, &[], &[]);
    let err = stderr(&r);
    assert!(
        !r.status.success() && err.contains("relprune decompress"),
        "{err}"
    );
    assert!(!again.exists());
}
