use std::fs;

use relprune_data::text::SpecialIds;
use relprune_data::{Error, TextTokenizer};
use serde_json::Value;

use crate::{data_dir, fixture_tokenizer, ids, reference, shared_subdir, strings};

const MODELS: [&str; 3] = ["bert-tiny", "marian-tiny", "t5-tiny"];

/// Row `r` of a right-padded reference matrix without its padding.
fn unpadded(reference: &Value, key: &str, r: usize) -> Vec<u32> {
    let row = ids(&reference[key][r]);
    let mask = ids(&reference["attention_mask"][r]);
    row.into_iter()
        .zip(mask)
        .filter(|&(_, m)| m == 1)
        .map(|(id, _)| id)
        .collect()
}

#[test]
fn bert_marian_t5_encodings_reproduce_hugging_face_input_ids_and_tokens() {
    for model in MODELS {
        let tok = fixture_tokenizer(model);
        let r = reference(model);
        for (i, text) in strings(&r["source_texts"]).iter().enumerate() {
            let got = tok.encode(text).unwrap();
            assert_eq!(got, unpadded(&r, "input_ids", i), "{model}: {text:?}");
            let tokens: Vec<String> = got.iter().map(|&id| tok.id_to_token(id).unwrap()).collect();
            assert_eq!(tokens, strings(&r["source_tokens"][i]), "{model}: {text:?}");
        }
    }
}

#[test]
fn marian_and_t5_target_encodings_match_reference_decoder_inputs() {
    for model in ["marian-tiny", "t5-tiny"] {
        let tok = fixture_tokenizer(model);
        let r = reference(model);
        let start = r["decoder_start_token_id"].as_u64().unwrap() as u32;
        for (i, text) in strings(&r["target_texts"]).iter().enumerate() {
            // decoder_input_ids is the start id followed by the first 5 target ids.
            let want = ids(&r["decoder_input_ids"][i]);
            let got = tok.encode(text).unwrap();
            assert_eq!(want[0], start);
            assert_eq!(&got[..want.len() - 1], &want[1..], "{model}: {text:?}");
        }
    }
}

#[test]
fn special_ids_are_found_for_wordpiece_and_sentencepiece_vocabularies() {
    let bert = fixture_tokenizer("bert-tiny");
    assert_eq!(
        bert.special_ids(),
        SpecialIds {
            pad: Some(0),
            eos: Some(3),
            bos: Some(2),
            unk: Some(1)
        }
    );
    let marian = fixture_tokenizer("marian-tiny");
    assert_eq!(
        marian.special_ids(),
        SpecialIds {
            pad: Some(199),
            eos: Some(0),
            bos: None,
            unk: Some(1)
        }
    );
    let t5 = fixture_tokenizer("t5-tiny");
    assert_eq!(
        t5.special_ids(),
        SpecialIds {
            pad: Some(0),
            eos: Some(1),
            bos: None,
            unk: Some(2)
        }
    );
    // The ids agree with the models' config.json.
    for model in MODELS {
        let r = reference(model);
        let tok = fixture_tokenizer(model);
        assert_eq!(
            tok.require_pad_id().unwrap(),
            r["pad_token_id"].as_u64().unwrap() as u32
        );
        if let Some(eos) = r["eos_token_id"].as_u64() {
            assert_eq!(tok.eos_id(), Some(eos as u32), "{model}");
        }
    }
    assert_eq!(bert.bos_id(), Some(2));
    assert_eq!(marian.unk_id(), Some(1));
    assert_eq!(marian.pad_id(), Some(199));
}

#[test]
fn vocab_size_is_largest_id_plus_one_and_matches_the_model_configs() {
    for model in MODELS {
        let tok = fixture_tokenizer(model);
        let want = reference(model)["vocab_size"].as_u64().unwrap() as usize;
        assert_eq!(tok.vocab_size(), want, "{model}");
        tok.check_vocab(want).unwrap();
    }
    // T5's added <extra_id_*> tokens sit above the Unigram vocabulary and count.
    let t5 = fixture_tokenizer("t5-tiny");
    assert_eq!(t5.inner().get_vocab_size(false), 192);
    assert_eq!(t5.token_to_id("<extra_id_0>"), Some(195));
}

#[test]
fn check_vocab_accepts_larger_models_and_rejects_smaller_ones_naming_the_file() {
    let t5 = fixture_tokenizer("t5-tiny");
    // Real T5 checkpoints pad their embedding past the tokenizer (32100 → 32128): fine.
    t5.check_vocab(256).unwrap();
    let err = t5.check_vocab(194).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(msg.contains("t5-tiny/tokenizer.json"), "{msg}");
    assert!(msg.contains("ids go up to 195"), "{msg}");
    assert!(msg.contains("194 entries"), "{msg}");
    assert!(msg.contains("2 token(s)"), "{msg}");
    // BERT's tokenizer for Marian's 200-row embedding would fit, Marian's for BERT's 132 not.
    fixture_tokenizer("bert-tiny").check_vocab(200).unwrap();
    assert!(fixture_tokenizer("marian-tiny").check_vocab(132).is_err());
}

#[test]
fn decode_inverts_encode_and_rejects_ids_outside_the_vocabulary() {
    let cases = [
        ("marian-tiny", "the cat runs .", "the cat runs ."),
        ("t5-tiny", "the man .", "the man ."),
        // BERT's WordPiece decoder cleans up the space before punctuation.
        ("bert-tiny", "thank you .", "thank you."),
    ];
    for (model, text, want) in cases {
        let tok = fixture_tokenizer(model);
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), want, "{model}");
    }
    let marian = fixture_tokenizer("marian-tiny");
    let with_special = marian
        .decode(&marian.encode("hello .").unwrap(), false)
        .unwrap();
    assert!(with_special.ends_with("</s>"), "{with_special:?}");
    let err = marian.decode(&[5, 200], true).unwrap_err().to_string();
    assert!(err.contains("id 200") && err.contains("0..200"), "{err}");
}

#[test]
fn encode_with_false_leaves_out_the_post_processor_tokens() {
    let marian = fixture_tokenizer("marian-tiny");
    assert_eq!(
        marian.encode_with("hello .", false).unwrap(),
        vec![90, 47, 18, 33]
    );
    let bert = fixture_tokenizer("bert-tiny");
    assert_eq!(
        bert.encode_with("thank you .", false).unwrap(),
        vec![101, 94, 5]
    );
    assert_eq!(
        bert.encode_batch(&["thank you .", "the dog sleeps today ."])
            .unwrap(),
        vec![vec![2, 101, 94, 5, 3], vec![2, 53, 70, 90, 56, 5, 3]]
    );
}

#[test]
fn missing_tokenizer_file_is_an_io_error_naming_it() {
    let path = data_dir().join("no-such-model").join("tokenizer.json");
    let err = TextTokenizer::from_file(&path).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains("no-such-model/tokenizer.json"),
        "{err}"
    );
}

#[test]
fn malformed_tokenizer_json_is_a_format_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cut = fs::read(data_dir().join("t5-tiny").join("tokenizer.json")).unwrap();
    for (name, bytes) in [
        ("truncated.json", &cut[..cut.len() / 2]),
        ("not-a-tokenizer.json", &b"{\"hello\": 1}"[..]),
        ("binary.json", &b"\xff\xfe\x00"[..]),
    ] {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        let err = TextTokenizer::from_file(&path).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(name) && msg.contains("tokenizer.json"),
            "{msg}"
        );
    }
}

/// The real all-MiniLM-L6-v2 tokenizer: 30,522 WordPiece tokens, and a file that asks for
/// fixed padding to 128 and truncation, both of which the loader switches off.
#[test]
fn minilm_tokenizer_reproduces_reference_ids_with_the_files_padding_switched_off() {
    let Some(dir) = shared_subdir("models/all-MiniLM-L6-v2") else {
        return;
    };
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 30522);
    tok.check_vocab(30522).unwrap();
    assert!(tok.check_vocab(30000).is_err());
    assert_eq!(
        tok.special_ids(),
        SpecialIds {
            pad: Some(0),
            eos: Some(102),
            bos: Some(101),
            unk: Some(100)
        }
    );
    let r: Value = serde_json::from_slice(&fs::read(dir.join("reference.json")).unwrap()).unwrap();
    for (i, sentence) in strings(&r["sentences"]).iter().enumerate() {
        let got = tok.encode(sentence).unwrap();
        assert_eq!(got, unpadded(&r, "input_ids", i), "{sentence:?}");
    }
    // 300 words would be cut to 128 ids by the file's truncation, and padded to 128 if shorter.
    let long = vec!["word"; 300].join(" ");
    assert_eq!(tok.encode(&long).unwrap().len(), 302);
    assert_eq!(tok.encode("hi").unwrap().len(), 3);
}

#[test]
fn vocabulary_words_are_whole_words_without_continuations_or_markers() {
    let bert = fixture_tokenizer("bert-tiny").words();
    assert!(bert.contains(&"garden".to_string()) && bert.contains(&"the".to_string()));
    // WordPiece continuations (`##a`), special tokens and single letters are not words.
    assert!(bert
        .iter()
        .all(|w| w.len() >= 3 && w.chars().all(char::is_alphabetic)));
    let marian = fixture_tokenizer("marian-tiny").words();
    // SentencePiece: `▁the` is the word "the"; `he` (no marker) continues a word.
    assert!(marian.contains(&"the".to_string()) && marian.contains(&"katze".to_string()));
    assert!(!marian
        .iter()
        .any(|w| w == "all" || w.starts_with('\u{2581}')));
    let mut sorted = marian.clone();
    sorted.sort();
    assert_eq!(sorted, marian);
}

#[test]
fn encode_at_most_cuts_like_truncation_and_never_tokenizes_a_huge_line_whole() {
    for name in MODELS {
        let tok = fixture_tokenizer(name);
        let line = "the dog sleeps today . ".repeat(20);
        let whole = tok.encode(&line).unwrap();
        for max_len in [0, 5, 12, 1000] {
            let want = relprune_data::text::truncate_keeping_last(whole.clone(), max_len);
            assert_eq!(tok.encode_at_most(&line, max_len).unwrap(), want, "{name}");
        }
        // Ten megabytes (multi-byte characters at the cut): read up to the cap, then cut.
        let huge = "été ".repeat(2_500_000);
        let ids = tok.encode_at_most(&huge, 8).unwrap();
        assert_eq!(ids.len(), 8, "{name}");
        assert_eq!(
            ids.last(),
            whole.last(),
            "{name}: the closing token is kept"
        );
    }
}
