//! `relprune bleu` as a user runs it: the built binary on temporary files, checked against the
//! sacreBLEU vectors of relprune-eval (`crates/relprune-eval/tests/data/sacrebleu_vectors.json`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

const VECTORS: &str = include_str!("../../relprune-eval/tests/data/sacrebleu_vectors.json");

/// The vector called `name`.
fn vector(name: &str) -> Value {
    let all: Value = serde_json::from_str(VECTORS).unwrap();
    all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no vector {name}"))
        .clone()
}

fn lines(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Writes `lines` to `dir/name`, each ended by `eol`.
fn write(dir: &Path, name: &str, lines: &[String], eol: &str) -> PathBuf {
    let path = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}{eol}")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn relprune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relprune"))
        .args(args)
        .output()
        .expect("runs the relprune binary")
}

/// Writes a vector's hypotheses and references to files; returns the `bleu` arguments.
fn files_for(case: &Value, dir: &Path, eol: &str) -> Vec<String> {
    let hyp = write(dir, "hyp.txt", &lines(&case["hyps"]), eol);
    let mut args = vec![
        "bleu".to_string(),
        "--hyp".into(),
        hyp.display().to_string(),
    ];
    for (k, stream) in case["refs"].as_array().unwrap().iter().enumerate() {
        let path = write(dir, &format!("ref{k}.txt"), &lines(stream), eol);
        args.extend(["--ref".to_string(), path.display().to_string()]);
    }
    args
}

fn run_ok(args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = relprune(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "relprune {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn json_output_matches_sacrebleu_two_references() {
    let case = vector("multi_ref_2");
    let dir = TempDir::new().unwrap();
    let mut args = files_for(&case, dir.path(), "\n");
    args.push("--json".into());
    let json: Value = serde_json::from_str(&run_ok(&args)).unwrap();
    let e = &case["expected"];
    let score = json["score"].as_f64().unwrap();
    assert!(
        (score - e["score"].as_f64().unwrap()).abs() < 1e-6,
        "{score} vs {}",
        e["score"]
    );
    assert_eq!(json["signature"], e["signature"]);
    assert_eq!(json["name"], "BLEU");
    assert_eq!(json["nrefs"], "2");
    for key in ["counts", "totals", "sys_len", "ref_len"] {
        assert_eq!(json[key], e[key], "{key}");
    }
    for key in ["bp", "ratio"] {
        assert!((json[key].as_f64().unwrap() - e[key].as_f64().unwrap()).abs() < 1e-6);
    }
    let precisions: Vec<f64> = json["precisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect();
    for (ours, theirs) in precisions.iter().zip(e["precisions"].as_array().unwrap()) {
        assert!((ours - theirs.as_f64().unwrap()).abs() < 1e-6);
    }
}

#[test]
fn text_output_is_sacrebleus_cli_line() {
    // Options, lowercase, empty lines (inside the corpus) and Windows line ends in one go.
    let case = vector("random_corpus_2refs_lc_none_floor");
    let dir = TempDir::new().unwrap();
    let mut args = files_for(&case, dir.path(), "\r\n");
    args.extend(["--tokenize", "none", "--smooth", "floor", "--lowercase"].map(String::from));
    let expected = case["expected"]["cli_text"].as_str().unwrap();
    assert_eq!(run_ok(&args), format!("{expected}\n"));

    let case = vector("random_corpus_1ref_addk");
    let mut args = files_for(&case, dir.path(), "\n");
    args.extend(["--smooth", "add-k", "--smooth-value", "2"].map(String::from));
    let expected = case["expected"]["cli_text"].as_str().unwrap();
    assert_eq!(run_ok(&args), format!("{expected}\n"));
}

#[test]
fn file_without_final_newline_reads_the_same() {
    let case = vector("basic_single_ref");
    let dir = TempDir::new().unwrap();
    let args = files_for(&case, dir.path(), "\n");
    // Rewrite the hypotheses without the final newline: same lines, same score.
    let hyps = lines(&case["hyps"]).join("\n");
    std::fs::write(&args[2], hyps).unwrap();
    let expected = case["expected"]["cli_text"].as_str().unwrap();
    assert_eq!(run_ok(&args), format!("{expected}\n"));
}

/// Runs `relprune` expecting failure; returns its stderr.
fn run_err(args: &[&str]) -> String {
    let out = relprune(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "relprune {args:?} should fail");
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn errors_name_the_file_and_exit_non_zero() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let two = write(d, "two.txt", &["a b".into(), "c d".into()], "\n");
    let three = write(d, "three.txt", &["a".into(), "b".into(), "c".into()], "\n");
    let missing = d.join("missing.txt");
    let (two, three, missing) = (
        two.to_str().unwrap(),
        three.to_str().unwrap(),
        missing.to_str().unwrap(),
    );

    let err = run_err(&["bleu", "--hyp", two, "--ref", missing]);
    assert!(
        err.contains("missing.txt") && err.contains("reference"),
        "{err}"
    );
    let err = run_err(&["bleu", "--hyp", missing, "--ref", two]);
    assert!(
        err.contains("missing.txt") && err.contains("hypothesis"),
        "{err}"
    );

    let err = run_err(&["bleu", "--hyp", two, "--ref", two, "--ref", three]);
    assert!(
        err.contains("two.txt") && err.contains("three.txt") && err.contains("has 3"),
        "{err}"
    );

    let bad = d.join("bad.txt");
    std::fs::write(&bad, b"fine\nnot \xc3\x28 fine\n").unwrap();
    let err = run_err(&["bleu", "--hyp", bad.to_str().unwrap(), "--ref", two]);
    assert!(
        err.contains("bad.txt") && err.contains("line 2") && err.contains("UTF-8"),
        "{err}"
    );

    let empty = write(d, "empty.txt", &[], "\n");
    let err = run_err(&[
        "bleu",
        "--hyp",
        empty.to_str().unwrap(),
        "--ref",
        empty.to_str().unwrap(),
    ]);
    assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");

    let err = run_err(&["bleu", "--hyp", two, "--ref", two, "--smooth-value", "0.5"]);
    assert!(err.contains("--smooth-value"), "{err}");
    let err = run_err(&[
        "bleu",
        "--hyp",
        two,
        "--ref",
        two,
        "--smooth",
        "floor",
        "--smooth-value",
        "-1",
    ]);
    assert!(
        err.contains("--smooth-value") && err.contains("at least 0"),
        "{err}"
    );

    // No reference at all is a usage error (clap exits with 2).
    let out = relprune(&["bleu", "--hyp", two]);
    assert_eq!(out.status.code(), Some(2));
}
