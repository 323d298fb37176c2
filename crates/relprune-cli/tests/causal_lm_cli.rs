//! `relprune forward` and `relprune generate` on the decoder-only LMs as a user runs them: the
//! built binary on the tiny Llama, Mistral, Qwen2 and Qwen3 checkpoints of relprune-models,
//! checked against the logits and greedy ids `transformers` wrote into their `reference.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const FIXTURES: [&str; 4] = ["llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/tests/data")
        .join(name)
}

fn relprune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relprune"))
        .args(args)
        .output()
        .expect("runs the relprune binary")
}

/// What `relprune perplexity ARGS --json` prints, once it succeeded.
fn perplexity_json(args: &[&str]) -> Value {
    let run = relprune(&[&["perplexity"], args, &["--json"]].concat());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A copy of fixture `name` with a word-level tokenizer whose token `tN` is id N (the fixtures
/// have ids only).
fn with_tokenizer(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, Value> =
        (0..97).map(|i| (format!("t{i}"), Value::from(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

#[test]
fn forward_reproduces_every_causal_lm_reference_at_unpadded_positions() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let dir = fixture(name);
        let out = tmp.path().join(format!("{name}.json"));
        let reference = dir.join("reference.json");
        let run = relprune(&[
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--input",
            reference.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let (ours, want) = (read_json(&out), read_json(&reference));
        let mask = &want["inputs"]["attention_mask"];
        let mut err = 0f64;
        for (b, row) in mask.as_array().unwrap().iter().enumerate() {
            for (t, m) in row.as_array().unwrap().iter().enumerate() {
                if m.as_u64() == Some(1) {
                    let x = ours["logits"][b][t].as_array().unwrap();
                    let y = want["outputs"]["logits"][b][t].as_array().unwrap();
                    assert_eq!(x.len(), 97);
                    for (p, q) in x.iter().zip(y) {
                        err = err.max((p.as_f64().unwrap() - q.as_f64().unwrap()).abs());
                    }
                }
            }
        }
        assert!(err <= 1e-4, "{name}: {err}");
    }
}

#[test]
fn generate_continues_prompts_with_transformers_greedy_tokens_dense_and_sparse() {
    for name in FIXTURES {
        let dir = with_tokenizer(name);
        let r = read_json(&fixture(name).join("reference.json"));
        let prompt: Vec<String> = r["greedy"]["input_ids"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| format!("t{}", id.as_u64().unwrap()))
            .collect();
        let prompt = prompt.join(" ");
        let want: Vec<u64> = serde_json::from_value(r["greedy"]["generated_ids"].clone()).unwrap();
        for sparse in [false, true] {
            let mut args = vec![
                "generate",
                "--model",
                dir.path().to_str().unwrap(),
                "--prompt",
                &prompt,
                // The shorter prompt is left-padded in the batch and must not change the first.
                "--prompt",
                "t5 t6",
                "--max-new-tokens",
                "8",
                "--json",
            ];
            if sparse {
                args.push("--sparse");
            }
            let run = relprune(&args);
            assert!(
                run.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
            let text = String::from_utf8(run.stdout).unwrap();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 2, "{text}");
            let ids: Vec<u64> = serde_json::from_value(lines[0]["ids"].clone()).unwrap();
            assert_eq!(ids, want, "{name} sparse={sparse}");
            let words: Vec<String> = want.iter().map(|i| format!("t{i}")).collect();
            assert_eq!(lines[0]["continuation"], words.join(" "), "{name}");
        }
    }
}

#[test]
fn generate_errors_name_the_problem() {
    let dir = with_tokenizer("llama-tiny");
    let model = dir.path().to_str().unwrap();
    let err = |args: &[&str]| {
        let run = relprune(args);
        assert!(!run.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let e = err(&[
        "generate", "--model", model, "--prompt", "t1", "--top-p", "0",
    ]);
    assert!(e.contains("top_p 0 is outside"), "{e}");
    let e = err(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "t1",
        "--temperature",
        "NaN",
    ]);
    assert!(e.contains("temperature"), "{e}");
    let marian = fixture("marian-tiny");
    let e = err(&[
        "generate",
        "--model",
        marian.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(e.contains("\"marian\" is not supported here"), "{e}");
    let bare = fixture("llama-tiny");
    let e = err(&[
        "generate",
        "--model",
        bare.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(e.contains("tokenizer.json is missing"), "{e}");
    let e = err(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "t1",
        "--max-new-tokens",
        "300",
    ]);
    assert!(e.contains("exceed the model's 256 positions"), "{e}");
}

/// SmolLM2's directory and the Debian Reference validation text in `../shared`, or `None`
/// (the test is skipped, saying so) where they are absent.
fn smollm2_and_valid_text() -> Option<(PathBuf, PathBuf)> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    let dir = shared.join("models/SmolLM2-135M-Instruct-Q4_1");
    let text = shared.join("data/debian-reference-en/valid.txt");
    if !dir.join("reference.json").exists() || !text.exists() {
        eprintln!("skipped: ../shared's SmolLM2 or Debian Reference text is absent");
        return None;
    }
    Some((dir, text))
}

#[test]
fn perplexity_of_smollm2_gguf_reproduces_the_reference_figure() {
    let Some((dir, text)) = smollm2_and_valid_text() else {
        return;
    };
    let want = &read_json(&dir.join("reference.json"))["perplexity"][0];
    let got = perplexity_json(&[
        "--model",
        dir.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ]);
    assert_eq!(got["tokens"], want["tokens"]);
    assert_eq!(got["predicted_tokens"], want["predicted_tokens"]);
    let (p, q) = (
        got["perplexity"].as_f64().unwrap(),
        want["perplexity"].as_f64().unwrap(),
    );
    assert!((p / q - 1.0).abs() < 1e-3, "{p} vs {q}");
}

#[test]
fn perplexity_errors_name_the_problem() {
    let dir = with_tokenizer("llama-tiny");
    let model = dir.path().to_str().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "t5 t6 t7\n\n  \nt8 t9\n").unwrap();
    let text = text.to_str().unwrap();
    let run = relprune(&["perplexity", "--model", model, "--text", text, "--json"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got: Value = serde_json::from_slice(&run.stdout).unwrap();
    // "t5 t6 t7\n\nt8 t9": five word-level tokens, one window, four predicted.
    assert_eq!(got["tokens"], 5);
    assert_eq!(got["predicted_tokens"], 4);
    let err = |args: &[&str]| {
        let run = relprune(args);
        assert!(!run.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let e = err(&[
        "perplexity",
        "--model",
        model,
        "--text",
        text,
        "--window",
        "1",
    ]);
    assert!(e.contains("--window must be at least 2"), "{e}");
    let e = err(&[
        "perplexity",
        "--model",
        model,
        "--text",
        text,
        "--window",
        "999",
    ]);
    assert!(e.contains("exceeds the model's 256 positions"), "{e}");
    let e = err(&["perplexity", "--model", model, "--text", "/nonexistent.txt"]);
    assert!(e.contains("/nonexistent.txt: no such file"), "{e}");
}

/// `n` lines of 40 word-level tokens `t3`…`t96` (a pseudo-random walk: text the tiny models
/// can be calibrated on).
fn token_text(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|l| {
            (0..40)
                .map(|i| format!("t{}", (l * 131 + i * 37 + i * i) % 94 + 3))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn prune_hf_prunes_a_causal_lm_to_each_pattern_into_a_directory_it_reloads() {
    let dir = with_tokenizer("llama-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    token_text(&text, 30);
    for (method, pattern) in [
        ("relprune", "unstructured"),
        ("sparsegpt", "2:4"),
        ("wanda", "4:8"),
    ] {
        let out = tmp
            .path()
            .join(format!("{method}-{}", pattern.replace(':', "-")));
        let run = relprune(&[
            "prune-hf",
            "--model",
            dir.path().to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--method",
            method,
            "--pattern",
            pattern,
            "--calib-windows",
            "4",
            "--window",
            "64",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            run.status.success(),
            "{method} {pattern}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let report = read_json(&out.join("relprune_report.json"));
        assert!(report["linear_sparsity"].as_f64().unwrap() >= 0.5);
        assert_eq!(report["calibration_tokens"], 4 * 64);
        assert!(out.join("report.md").is_file() && out.join("tokenizer.json").is_file());
        // The written file holds the pattern, and perplexity reloads it as prune-hf judged it.
        let st = candle_core::safetensors::load(
            out.join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let w: Vec<Vec<f32>> = st["model.layers.1.mlp.up_proj.weight"].to_vec2().unwrap();
        let group = match pattern {
            "2:4" => Some(4),
            "4:8" => Some(8),
            _ => None,
        };
        match group {
            Some(m) => {
                for g in w.iter().flat_map(|row| row.chunks(m)) {
                    assert!(g.iter().filter(|&&x| x != 0.0).count() <= m / 2, "{g:?}");
                }
            }
            None => {
                let zeros = w.iter().flatten().filter(|&&x| x == 0.0).count();
                assert!(zeros >= w.len() * w[0].len() / 2, "{zeros}");
            }
        }
        let got = perplexity_json(&[
            "--model",
            out.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--window",
            "64",
        ]);
        let want = report["perplexity"][0]["pruned"].as_f64().unwrap();
        assert!((got["perplexity"].as_f64().unwrap() / want - 1.0).abs() < 1e-6);
    }
}

#[test]
fn prune_hf_on_a_causal_lm_resumes_an_interrupted_run_to_the_uninterrupted_result() {
    let dir = with_tokenizer("llama-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    token_text(&text, 30);
    let model = dir.path().to_str().unwrap();
    let run = |out: &Path, extra: &[&str], interrupt: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relprune"));
        cmd.args(["prune-hf", "--quiet", "--out", out.to_str().unwrap()]);
        cmd.args(extra);
        if let Some(n) = interrupt {
            cmd.env("RELPRUNE_INTERRUPT_AFTER_EPOCHS", n);
        }
        cmd.output().unwrap()
    };
    let flags = [
        "--model",
        model,
        "--text",
        text.to_str().unwrap(),
        "--calib-windows",
        "4",
        "--window",
        "64",
        "--end-to-end-epochs",
        "1",
    ];
    let straight = tmp.path().join("straight");
    let r = run(&straight, &flags, None);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // Its work directory is gone after success.
    assert!(!tmp.path().join("straight.relprune-work").exists());

    // Steps: layer 0, layer 1, the end-to-end group of both. Stopped after the first, then
    // after the second: no output, the checkpoint in the work directory.
    let out = tmp.path().join("resumed");
    let work = tmp.path().join("work");
    let w = work.to_str().unwrap();
    let r = run(&out, &[&flags[..], &["--work", w]].concat(), Some("1"));
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("interrupted"));
    assert!(!out.exists() && work.join("causal-checkpoint.json").is_file());
    // A fresh run into the same work directory refuses to overwrite it.
    let r = run(&out, &[&flags[..], &["--work", w]].concat(), None);
    assert!(String::from_utf8_lossy(&r.stderr).contains("--resume"));
    // Settings given with --resume are named as ignored: the checkpoint's configuration holds.
    let r = run(&out, &["--resume", w, "--seed", "9"], Some("1"));
    assert!(!r.status.success() && !out.exists());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("ignoring --seed"), "{e}");
    // A killed writer's temporary file is swept by the resume.
    let stale = work.join(".layer-1.safetensors.4999999.0.tmp");
    std::fs::write(&stale, "half a layer").unwrap();
    let r = run(&out, &["--resume", w, "--keep-work"], None);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(!stale.exists());

    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(bytes(&out) == bytes(&straight), "the resumed model differs");
    let (a, b) = (
        read_json(&straight.join("relprune_report.json")),
        read_json(&out.join("relprune_report.json")),
    );
    for key in [
        "perplexity",
        "layer_errors",
        "end_to_end",
        "linear_sparsity",
    ] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(b["end_to_end"].as_array().unwrap().len(), 1);
    assert!(
        work.join("layer-1.safetensors").is_file(),
        "--keep-work keeps it"
    );
}

#[test]
fn prune_hf_on_a_causal_lm_refuses_bad_flags_before_any_work() {
    let dir = with_tokenizer("llama-tiny");
    let model = dir.path().to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    token_text(&text, 3);
    let text = text.to_str().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let err = |args: &[&str]| {
        let run = relprune(args);
        assert!(!run.status.success(), "{args:?} succeeded");
        assert!(!out.exists(), "{args:?} wrote {o}");
        assert!(
            !tmp.path().join("out.relprune-work").exists(),
            "{args:?} made a work directory"
        );
        String::from_utf8_lossy(&run.stderr).to_string()
    };
    let e = err(&[
        "prune-hf",
        "--model",
        model,
        "--out",
        o,
        "--pattern",
        "2:4",
        "--target-sparsity",
        "0.7",
        "--text",
        text,
    ]);
    assert!(e.contains("--pattern 2:4") && e.contains("0.7"), "{e}");
    let e = err(&[
        "prune-hf",
        "--model",
        model,
        "--out",
        o,
        "--text",
        "/no/such/file",
    ]);
    assert!(e.contains("--text /no/such/file"), "{e}");
    // 3 lines of 40 tokens are fewer than one window of 512.
    let e = err(&["prune-hf", "--model", model, "--out", o, "--text", text]);
    assert!(e.contains("fewer than one window of 512"), "{e}");
    let e = err(&[
        "prune-hf",
        "--model",
        model,
        "--out",
        o,
        "--text",
        text,
        "--pattern",
        "3:4",
    ]);
    assert!(e.contains("3:4"), "{e}");
    let e = err(&[
        "prune-hf",
        "--model",
        model,
        "--out",
        o,
        "--text",
        text,
        "--method",
        "wanda",
        "--end-to-end-epochs",
        "2",
    ]);
    assert!(
        e.contains("--end-to-end-epochs") && e.contains("wanda"),
        "{e}"
    );
    // Numbers that cannot work are refused by the parser, before anything is loaded.
    for (flag, value) in [("--lr", "NaN"), ("--lambda", "-1"), ("--ema-beta", "2")] {
        let arg = format!("{flag}={value}");
        let e = err(&[
            "prune-hf", "--model", model, "--out", o, "--text", text, &arg,
        ]);
        assert!(e.contains(flag) && e.contains(value), "{e}");
    }
    // A tokenizer of another vocabulary, and heads that do not divide the hidden size.
    let other = with_tokenizer("llama-tiny");
    let tok = other.path().join("tokenizer.json");
    let mut t: Value = read_json(&tok);
    t["model"]["vocab"]["t500"] = Value::from(500);
    std::fs::write(&tok, t.to_string()).unwrap();
    let m = other.path().to_str().unwrap();
    let e = err(&[
        "prune-hf", "--model", m, "--out", o, "--text", text, "--window", "16",
    ]);
    assert!(e.contains("tokenizer") && e.contains("does not fit"), "{e}");
    let odd = with_tokenizer("llama-tiny");
    let cfg = odd.path().join("config.json");
    let mut c: Value = read_json(&cfg);
    c["num_attention_heads"] = Value::from(c["hidden_size"].as_u64().unwrap() + 1);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let m = odd.path().to_str().unwrap();
    let e = err(&[
        "prune-hf", "--model", m, "--out", o, "--text", text, "--window", "16",
    ]);
    assert!(e.contains("config.json") || e.contains("divide"), "{e}");
    std::fs::create_dir(&out).unwrap();
    let run = relprune(&[
        "prune-hf", "--model", model, "--out", o, "--text", text, "--window", "16",
    ]);
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && e.contains("already exists"), "{e}");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "an existing output is left alone"
    );
}

#[test]
fn prune_hf_writes_a_gguf_model_as_a_hugging_face_directory() {
    let Some((dir, valid)) = smollm2_and_valid_text() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // A short text keeps the two perplexity passes quick.
    let text = tmp.path().join("text.txt");
    let lines: Vec<String> = std::fs::read_to_string(&valid)
        .unwrap()
        .lines()
        .take(12)
        .map(str::to_string)
        .collect();
    std::fs::write(&text, lines.join("\n")).unwrap();
    let out = tmp.path().join("smollm2-magnitude");
    let run = relprune(&[
        "prune-hf",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--method",
        "magnitude",
        "--window",
        "128",
        "--calib-windows",
        "1",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!out.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists());
    let st =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    // Hugging Face's names; the tied head is the embedding, stored once.
    assert!(st.contains_key("model.layers.29.mlp.down_proj.weight"));
    assert!(st.contains_key("model.embed_tokens.weight") && !st.contains_key("lm_head.weight"));
    let report = read_json(&out.join("relprune_report.json"));
    assert!((report["linear_sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-3);
    let row = &report["perplexity"][0];
    assert!(row["pruned"].as_f64().unwrap() > row["dense"].as_f64().unwrap());
    let got = perplexity_json(&[
        "--model",
        out.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--window",
        "128",
    ]);
    let want = row["pruned"].as_f64().unwrap();
    assert!((got["perplexity"].as_f64().unwrap() / want - 1.0).abs() < 1e-6);
}
