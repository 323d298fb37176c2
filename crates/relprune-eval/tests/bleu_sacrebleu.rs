//! Corpus BLEU against vectors produced by sacreBLEU itself (`tests/data/sacrebleu_vectors.json`,
//! written by `tests/data/gen_sacrebleu_vectors.py`; see that script for how to regenerate).

use relprune_eval::bleu::{corpus_bleu, tokenize_13a, BleuConfig, Smoothing, Tokenizer};
use relprune_eval::SACREBLEU_VERSION;
use serde_json::Value;

const VECTORS: &str = include_str!("data/sacrebleu_vectors.json");

fn vectors() -> Value {
    serde_json::from_str(VECTORS).expect("sacrebleu_vectors.json parses")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array of strings")
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// The options of a case, as sacreBLEU's `BLEU(...)` arguments.
fn config(options: &Value) -> BleuConfig {
    let value = options["smooth_value"].as_f64();
    let smoothing = match options["smooth_method"].as_str().unwrap() {
        "exp" => Smoothing::Exp,
        "none" => Smoothing::None,
        "floor" => value.map_or(Smoothing::FLOOR_DEFAULT, Smoothing::Floor),
        "add-k" => value.map_or(Smoothing::ADD_K_DEFAULT, Smoothing::AddK),
        other => panic!("unknown smoothing {other}"),
    };
    let tokenizer = match options["tokenize"].as_str().unwrap() {
        "13a" => Tokenizer::Mteval13a,
        "none" => Tokenizer::None,
        other => panic!("unknown tokenizer {other}"),
    };
    BleuConfig {
        tokenizer,
        smoothing,
        lowercase: options["lowercase"].as_bool().unwrap(),
        effective_order: options["effective_order"].as_bool().unwrap(),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6
}

#[test]
fn vectors_are_from_the_emulated_sacrebleu() {
    let v = vectors();
    assert_eq!(v["sacrebleu_version"].as_str(), Some(SACREBLEU_VERSION));
}

#[test]
fn corpus_bleu_matches_sacrebleu_on_every_vector() {
    let v = vectors();
    let cases = v["cases"].as_array().unwrap();
    // Guards against a truncated or emptied file passing vacuously.
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let hyps = strings(&case["hyps"]);
        let refs: Vec<Vec<String>> = case["refs"]
            .as_array()
            .unwrap()
            .iter()
            .map(strings)
            .collect();
        let cfg = config(&case["options"]);
        let result = corpus_bleu(&hyps, &refs, &cfg);
        if let Some(err) = case.get("error") {
            if let Ok(s) = result {
                failures.push(format!("{name}: sacreBLEU raised {err}, we scored {s}"));
            }
            checked += 1;
            continue;
        }
        let e = &case["expected"];
        let s = match result {
            Ok(s) => s,
            Err(err) => {
                failures.push(format!("{name}: error {err}"));
                continue;
            }
        };
        let mut fail = |what: &str, ours: String, theirs: String| {
            failures.push(format!("{name}: {what}: ours {ours}, sacreBLEU {theirs}"));
        };
        if !close(s.score, e["score"].as_f64().unwrap()) {
            fail("score", s.score.to_string(), e["score"].to_string());
        }
        for (what, ours, theirs) in [
            (
                "precisions",
                s.precisions.to_vec(),
                floats(&e["precisions"]),
            ),
            ("bp", vec![s.bp], vec![e["bp"].as_f64().unwrap()]),
            ("ratio", vec![s.ratio], vec![e["ratio"].as_f64().unwrap()]),
        ] {
            if ours.len() != theirs.len() || ours.iter().zip(&theirs).any(|(a, b)| !close(*a, *b)) {
                fail(what, format!("{ours:?}"), format!("{theirs:?}"));
            }
        }
        // sacreBLEU reports add-k's counts and totals with k already added for orders above 1
        // (only when something matched: otherwise it stops before smoothing); ours stay raw.
        let k = match cfg.smoothing {
            Smoothing::AddK(k) if s.counts.iter().any(|&c| c > 0) => k,
            _ => 0.0,
        };
        let smoothed = |raw: [u64; 4]| -> Vec<f64> {
            raw.iter()
                .enumerate()
                .map(|(n, &c)| c as f64 + if n > 0 { k } else { 0.0 })
                .collect()
        };
        for (what, ours, theirs) in [
            ("counts", smoothed(s.counts), floats(&e["counts"])),
            ("totals", smoothed(s.totals), floats(&e["totals"])),
        ] {
            if ours != theirs {
                fail(what, format!("{ours:?}"), format!("{theirs:?}"));
            }
        }
        for (what, ours, theirs) in [
            ("sys_len", s.sys_len, e["sys_len"].as_u64().unwrap()),
            ("ref_len", s.ref_len, e["ref_len"].as_u64().unwrap()),
        ] {
            if ours != theirs {
                fail(what, ours.to_string(), theirs.to_string());
            }
        }
        for (what, ours, theirs) in [
            (
                "signature",
                s.signature.clone(),
                e["signature"].as_str().unwrap(),
            ),
            ("formatted", s.to_string(), e["formatted"].as_str().unwrap()),
            (
                "cli_text",
                s.format_with_signature(1),
                e["cli_text"].as_str().unwrap(),
            ),
        ] {
            if ours != theirs {
                fail(what, format!("{ours:?}"), format!("{theirs:?}"));
            }
        }
        checked += 1;
    }
    assert!(
        failures.is_empty(),
        "{} disagreements with sacreBLEU over {} vectors:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(checked, cases.len());
}

#[test]
fn tokenizer_13a_matches_sacrebleu() {
    let v = vectors();
    let pairs = v["tokenizer_13a"].as_array().unwrap();
    assert!(pairs.len() >= 100, "only {} tokenizer strings", pairs.len());
    let failures: Vec<String> = pairs
        .iter()
        .filter_map(|p| {
            let (input, expected) = (p["input"].as_str().unwrap(), p["output"].as_str().unwrap());
            let ours = tokenize_13a(input);
            (ours != expected).then(|| format!("{input:?}: ours {ours:?}, sacreBLEU {expected:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
