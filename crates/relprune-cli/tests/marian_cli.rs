//! `relprune forward` and `relprune translate` on Marian as a user runs them: the built binary on
//! the marian-tiny checkpoints of relprune-models, checked against the outputs and ids
//! `transformers` wrote into their `reference.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tempfile::TempDir;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/tests/data")
        .join(name)
}

fn relprune(args: &[&Path], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_relprune"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs the relprune binary");
    // A run that fails before reading stdin closes it: a broken pipe here is not the test's
    // concern, the exit status and stderr are.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap()),
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn max_diff(a: &Value, b: &Value, len: usize) -> f64 {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    flat(a, &mut x);
    flat(b, &mut y);
    assert_eq!(x.len(), len);
    assert_eq!(y.len(), len);
    x.iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
}

#[test]
fn forward_reproduces_the_marian_references() {
    for name in ["marian-tiny", "marian-tiny-pruned90"] {
        let dir = TempDir::new().unwrap();
        let reference = read_json(&fixture(name).join("reference.json"));
        let input = dir.path().join("in.json");
        std::fs::write(&input, reference["inputs"].to_string()).unwrap();
        let out_path = dir.path().join("out.json");
        let out = relprune(
            &[
                "forward".as_ref(),
                "--model".as_ref(),
                &fixture(name),
                "--input".as_ref(),
                &input,
                "--out".as_ref(),
                &out_path,
            ],
            "",
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let got = read_json(&out_path);
        let want = &reference["outputs"];
        let d = max_diff(&got["logits"], &want["logits"], 2 * 6 * 200);
        let e = max_diff(
            &got["encoder_last_hidden_state"],
            &want["encoder_last_hidden_state"],
            2 * 7 * 32,
        );
        println!("{name}: logits max abs diff {d:e}, encoder state {e:e}");
        assert!(d < 1e-4 && e < 1e-4, "{name}: {d} {e}");
        // Only the input and the output are left: the temporary file was renamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}

#[test]
fn forward_reproduces_the_t5_reference() {
    let dir = TempDir::new().unwrap();
    let reference = read_json(&fixture("t5-tiny").join("reference.json"));
    let input = dir.path().join("in.json");
    std::fs::write(&input, reference["inputs"].to_string()).unwrap();
    let out_path = dir.path().join("out.json");
    let out = relprune(
        &[
            "forward".as_ref(),
            "--model".as_ref(),
            &fixture("t5-tiny"),
            "--input".as_ref(),
            &input,
            "--out".as_ref(),
            &out_path,
        ],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got = read_json(&out_path);
    let want = &reference["outputs"];
    for key in ["logits", "encoder_last_hidden_state"] {
        let mut n = Vec::new();
        flat(&want[key], &mut n);
        let d = max_diff(&got[key], &want[key], n.len());
        println!("t5-tiny: {key} max abs diff {d:e}");
        assert!(d < 1e-4, "{key}: {d}");
    }
}

#[test]
fn forward_errors_name_the_problem() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.json");
    let out_path = dir.path().join("out.json");
    let forward = |input_text: &str| {
        std::fs::write(&input, input_text).unwrap();
        relprune(
            &[
                "forward".as_ref(),
                "--model".as_ref(),
                &fixture("marian-tiny"),
                "--input".as_ref(),
                &input,
                "--out".as_ref(),
                &out_path,
            ],
            "",
        )
    };
    let e = stderr(&forward("{\"input_ids\": [[2, 5, 0]]}"));
    assert!(e.contains("needs `decoder_input_ids`"), "{e}");
    let e = stderr(&forward(
        "{\"input_ids\": [[2, 5, 0]], \"decoder_input_ids\": [[199, 500]]}",
    ));
    assert!(
        e.contains("`decoder_input_ids` holds token id 500") && e.contains("in.json"),
        "{e}"
    );
    let e = stderr(&forward(
        "{\"input_ids\": [[2, 5, 0]], \"decoder_input_ids\": [[199], [199]]}",
    ));
    assert!(e.contains("has 2 rows but `input_ids` 1"), "{e}");
    assert!(!out_path.exists());
}

fn translate(model: &Path, extra: &[&str], stdin: &str) -> Output {
    let mut args: Vec<&Path> = vec!["translate".as_ref(), "--model".as_ref(), model];
    args.extend(extra.iter().map(Path::new));
    relprune(&args, stdin)
}

fn id_rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

#[test]
fn translate_decodes_the_greedy_ids_in_input_order() {
    let model = fixture("marian-tiny");
    let reference = read_json(&model.join("reference.json"));
    let sources: Vec<&str> = reference["inputs"]["source_texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let stdin = format!("{}\n{}\n{}\n", sources[0], sources[1], sources[0]);
    let out = translate(
        &model,
        &["--max-len", "8", "--ids", "--batch-size", "2"],
        &stdin,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got: Vec<Vec<u32>> = stdout(&out)
        .lines()
        .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(got.len(), 3);
    // config.json's forced_eos_token_id makes the 8th token EOS, as in `model.generate`; the
    // first 7 are the plain greedy ids.
    let hf = id_rows(&reference["greedy"]["hf_generate_ids"]);
    let greedy = id_rows(&reference["greedy"]["ids"]);
    for (row, want) in [(0, 0), (1, 1), (2, 0)] {
        assert_eq!(got[row], hf[want][1..], "line {row}");
        assert_eq!(got[row][..7], greedy[want][1..8], "line {row}");
    }

    // Text output: one line per input line (empty lines included), in order; beam search runs.
    for extra in [
        &["--max-len", "8"][..],
        &["--beam", "4", "--max-len", "12", "--length-penalty", "0.6"],
        &["--beam", "3", "--length-penalty", "-1", "--batch-size", "1"],
    ] {
        let out = translate(&model, extra, "the cat runs .\n\nhello .\n");
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
        let text = stdout(&out);
        assert_eq!(text.lines().count(), 3, "{extra:?}: {text:?}");
    }
    let a = stdout(&translate(&model, &["--max-len", "8"], &stdin));
    let b = stdout(&translate(
        &model,
        &["--max-len", "8", "--batch-size", "1"],
        &stdin,
    ));
    assert_eq!(a, b);
    let lines: Vec<&str> = a.lines().collect();
    assert_eq!(lines[0], lines[2]);
}

#[test]
fn translate_errors_are_clear() {
    let dir = TempDir::new().unwrap();
    // A Marian checkpoint without its tokenizer.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("marian-tiny").join(f), bare.join(f)).unwrap();
    }
    let out = translate(&bare, &[], "hello .\n");
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");

    let out = translate(&fixture("bert-tiny"), &[], "hello .\n");
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("\"bert\"") && e.contains("supported: marian"),
        "{e}"
    );

    let model = fixture("marian-tiny");
    let e = stderr(&translate(&model, &["--max-len", "65"], "hello .\n"));
    assert!(e.contains("max_position_embeddings 64"), "{e}");
    for beam in ["0", "5000", "100000"] {
        let e = stderr(&translate(&model, &["--beam", beam], "hello .\n"));
        assert!(e.contains("--beam") && e.contains("1..=128"), "{beam}: {e}");
    }
    let out = translate(&dir.path().join("nothing"), &[], "");
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[test]
fn translate_runs_t5_and_its_ids_start_with_the_greedy_ones() {
    let model = fixture("t5-tiny");
    let out = translate(
        &model,
        &["--ids", "--max-len", "8"],
        "the cat\n\nhello world\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    // The tiny random model repeats token 145 (its reference greedy ids, after the start id).
    let r = read_json(&model.join("reference.json"));
    let greedy = id_rows(&r["greedy"]["ids"]);
    let first: Vec<u32> = lines[0]
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(first, greedy[0][1..]);
}

#[test]
fn sparse_forward_and_translate_give_what_dense_ones_give_on_a_pruned_checkpoint() {
    let model = fixture("marian-tiny-pruned90");
    let dir = TempDir::new().unwrap();
    let reference = read_json(&model.join("reference.json"));
    let input = dir.path().join("in.json");
    std::fs::write(&input, reference["inputs"].to_string()).unwrap();
    let out_path = dir.path().join("out.json");
    let out = relprune(
        &[
            "forward".as_ref(),
            "--model".as_ref(),
            &model,
            "--input".as_ref(),
            &input,
            "--out".as_ref(),
            &out_path,
            "--sparse".as_ref(),
        ],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got = read_json(&out_path);
    let d = max_diff(&got["logits"], &reference["outputs"]["logits"], 2 * 6 * 200);
    assert!(d < 1e-4, "{d}");
    // The pruned copy with the tokenizer of the model it was pruned from.
    let with_tokenizer = dir.path().join("pruned");
    std::fs::create_dir(&with_tokenizer).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), with_tokenizer.join(f)).unwrap();
    }
    let tok = fixture("marian-tiny").join("tokenizer.json");
    std::fs::copy(tok, with_tokenizer.join("tokenizer.json")).unwrap();
    let stdin = "the cat runs .\nhello .\n";
    let dense = translate(&with_tokenizer, &["--ids", "--max-len", "10"], stdin);
    let sparse = translate(
        &with_tokenizer,
        &["--ids", "--max-len", "10", "--sparse"],
        stdin,
    );
    assert!(dense.status.success(), "{}", stderr(&dense));
    assert!(sparse.status.success(), "{}", stderr(&sparse));
    assert_eq!(stdout(&dense), stdout(&sparse));
}
