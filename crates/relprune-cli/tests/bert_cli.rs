//! `relprune forward` and `relprune embed` as a user runs them: the built binary on the bert-tiny
//! checkpoint of relprune-models (`models/tests/data/bert-tiny`), checked against the outputs
//! `transformers` wrote into its `reference.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tests/data/bert-tiny")
}

fn relprune(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relprune"))
        .args(args)
        .output()
        .expect("runs the relprune binary")
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

#[test]
fn forward_reproduces_the_reference() {
    let dir = TempDir::new().unwrap();
    let reference = read_json(&tiny().join("reference.json"));
    let input = dir.path().join("in.json");
    std::fs::write(&input, reference["inputs"].to_string()).unwrap();
    let out_path = dir.path().join("out.json");
    let out = relprune(&[
        "forward".as_ref(),
        "--model".as_ref(),
        &tiny(),
        "--input".as_ref(),
        &input,
        "--out".as_ref(),
        &out_path,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = read_json(&out_path);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flat(&got["last_hidden_state"], &mut a);
    flat(&reference["outputs"]["last_hidden_state"], &mut b);
    assert_eq!(a.len(), 2 * 7 * 32);
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    println!("relprune forward: max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
    // Only the output is left in the directory: the temporary file was renamed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn embed_gives_unit_vectors_in_input_order() {
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("sentences.txt");
    std::fs::write(
        &text,
        "the dog sleeps today .\nthank you .\nthe dog sleeps today .\n",
    )
    .unwrap();
    let out_path = dir.path().join("emb.json");
    let out = relprune(&[
        "embed".as_ref(),
        "--model".as_ref(),
        &tiny(),
        "--text".as_ref(),
        &text,
        "--out".as_ref(),
        &out_path,
        "--batch-size".as_ref(),
        "2".as_ref(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<Vec<f64>> = read_json(&out_path)["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(r.len(), 32);
        let norm: f64 = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    // The same sentence in another batch (alone there) gives the same vector.
    let d = rows[0]
        .iter()
        .zip(&rows[2])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(d < 1e-5, "{d}");

    // It is the reference's masked mean, normalized: the tokenizer gives the reference's ids.
    let reference = read_json(&tiny().join("reference.json"));
    for (i, row) in rows.iter().take(2).enumerate() {
        let mut mean = Vec::new();
        flat(&reference["outputs"]["masked_mean_pooled"][i], &mut mean);
        let n = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
        let d = row
            .iter()
            .zip(&mean)
            .map(|(x, y)| (x - y / n).abs())
            .fold(0.0, f64::max);
        println!("relprune embed sentence {i}: max abs diff {d:e}");
        assert!(d < 1e-4, "{d}");
    }
}

#[test]
fn bad_inputs_fail_with_a_clear_message() {
    let dir = TempDir::new().unwrap();
    let out_path = dir.path().join("out.json");
    let input = dir.path().join("in.json");
    std::fs::write(&input, "{\"input_ids\": [[2, 5, 3]]}").unwrap();
    let forward = |model: &Path, input: &Path| {
        relprune(&[
            "forward".as_ref(),
            "--model".as_ref(),
            model,
            "--input".as_ref(),
            input,
            "--out".as_ref(),
            &out_path,
        ])
    };

    let missing = dir.path().join("no-such-model");
    let out = forward(&missing, &input);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("no-such-model") && e.contains("does not exist"),
        "{e}"
    );

    std::fs::write(&input, "{\"input_ids\": [[2, 5, 3]").unwrap();
    let out = forward(&tiny(), &input);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("in.json") && e.contains("not valid JSON"), "{e}");

    std::fs::write(&input, "{\"input_ids\": [[2, 5, 3], [2, 3]]}").unwrap();
    let e = stderr(&forward(&tiny(), &input));
    assert!(e.contains("row 1 has 2 entries"), "{e}");

    std::fs::write(&input, "{\"input_ids\": [[2, 500, 3]]}").unwrap();
    let e = stderr(&forward(&tiny(), &input));
    assert!(e.contains("token id 500"), "{e}");

    let marian = dir.path().join("marian");
    std::fs::create_dir(&marian).unwrap();
    // Marian is supported by `forward` now; an unsupported type is still named.
    std::fs::write(marian.join("config.json"), "{\"model_type\": \"gpt2\"}").unwrap();
    std::fs::write(&input, "{\"input_ids\": [[2, 5, 3]]}").unwrap();
    let out = forward(&marian, &input);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("\"gpt2\"") && e.contains("supported: bert, marian"),
        "{e}"
    );
    assert!(!out_path.exists());

    let out = relprune(&[
        "embed".as_ref(),
        "--model".as_ref(),
        &missing,
        "--text".as_ref(),
        &input,
        "--out".as_ref(),
        &out_path,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[test]
fn embed_reproduces_all_minilm_l6_v2_when_present() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/all-MiniLM-L6-v2");
    if !model.join("model.safetensors").exists() {
        println!("skipped: {} is absent", model.display());
        return;
    }
    let reference = read_json(&model.join("reference.json"));
    let sentences: Vec<&str> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("sentences.txt");
    std::fs::write(&text, sentences.join("\n")).unwrap();
    let out_path = dir.path().join("emb.json");
    let out = relprune(&[
        "embed".as_ref(),
        "--model".as_ref(),
        &model,
        "--text".as_ref(),
        &text,
        "--out".as_ref(),
        &out_path,
        "--batch-size".as_ref(),
        "2".as_ref(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flat(&read_json(&out_path)["embeddings"], &mut a);
    flat(&reference["embeddings"], &mut b);
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    println!("relprune embed all-MiniLM-L6-v2: max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn embed_says_how_many_lines_it_cut_to_the_models_positions() {
    let dir = TempDir::new().unwrap();
    let text = dir.path().join("text.txt");
    let long = "hello world ".repeat(100);
    std::fs::write(&text, format!("hello world\n{long}\nthe cat\n")).unwrap();
    let out_path = dir.path().join("out.json");
    let args: [&Path; 7] = [
        "embed".as_ref(),
        "--model".as_ref(),
        &tiny(),
        "--text".as_ref(),
        &text,
        "--out".as_ref(),
        &out_path,
    ];
    let out = relprune(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("1 of 3 input lines") && e.contains("64 positions"),
        "{e}"
    );
    std::fs::write(&text, "hello world\nthe cat\n").unwrap();
    let out = relprune(&args);
    assert!(
        out.status.success() && !stderr(&out).contains("cut"),
        "{}",
        stderr(&out)
    );
}
