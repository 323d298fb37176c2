use std::fs;
use std::path::Path;

use relprune_data::text::{
    gettext_en_de, parse_tsv, read_parallel_files, read_tsv, EmptyPairs, ParallelText, Split,
    TextPair,
};
use relprune_data::Error;

use crate::shared_subdir;

fn pair(s: &str, t: &str) -> TextPair {
    TextPair {
        source: s.into(),
        target: t.into(),
    }
}

/// Writes `src` and `tgt` into `dir` as `a.en` / `a.de` and reads them back.
fn read_pair_files(
    dir: &Path,
    src: &[u8],
    tgt: &[u8],
    empty: EmptyPairs,
) -> relprune_data::Result<ParallelText> {
    fs::write(dir.join("a.en"), src).unwrap();
    fs::write(dir.join("a.de"), tgt).unwrap();
    read_parallel_files(&dir.join("a.en"), &dir.join("a.de"), empty)
}

#[test]
fn aligned_files_give_pairs_in_order_whatever_the_line_ends() {
    let dir = tempfile::tempdir().unwrap();
    // CRLF on one side, no final newline on the other, a BOM, inner spaces kept.
    let got = read_pair_files(
        dir.path(),
        b"\xEF\xBB\xBFOpen file\r\nSave  as\r\n",
        "Datei öffnen\nSpeichern  unter".as_bytes(),
        EmptyPairs::Skip,
    )
    .unwrap();
    assert_eq!(
        got.pairs,
        vec![
            pair("Open file", "Datei öffnen"),
            pair("Save  as", "Speichern  unter")
        ]
    );
    assert!(got.skipped_empty.is_empty());
    assert_eq!(got.len(), 2);
    let none = read_pair_files(dir.path(), b"", b"", EmptyPairs::Skip).unwrap();
    assert!(none.is_empty());
}

#[test]
fn misaligned_parallel_files_name_both_files_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_pair_files(dir.path(), b"a\nb\nc\n", b"x\ny\n", EmptyPairs::Skip).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(msg.contains("a.en has 3 lines"), "{msg}");
    assert!(msg.contains("a.de has 2 lines"), "{msg}");
    // A trailing blank line is a line: it is counted, not silently dropped.
    assert!(read_pair_files(dir.path(), b"a\nb\n\n", b"x\ny\n", EmptyPairs::Skip).is_err());
}

#[test]
fn invalid_utf8_names_the_file_the_line_and_the_byte_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_pair_files(
        dir.path(),
        b"ok\nfine\n",
        b"gut\nab\xffcd\n",
        EmptyPairs::Skip,
    )
    .unwrap_err();
    match &err {
        Error::Format {
            source_name,
            offset,
            msg,
        } => {
            assert!(source_name.ends_with("a.de"), "{source_name}");
            // Line 2 starts at byte 4; the bad byte is its third (offset 2 in the line).
            assert_eq!(*offset, Some(6));
            assert!(
                msg.contains("line 2") && msg.contains("byte 2 of the line"),
                "{msg}"
            );
        }
        other => panic!("expected a format error, got {other:?}"),
    }
    assert!(err.to_string().contains("(at byte 6)"), "{err}");
}

#[test]
fn empty_pairs_are_skipped_by_default_and_kept_or_rejected_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let src = b"one\n\nthree\nfour\n";
    let tgt = b"eins\nzwei\n  \nvier\n";
    let skipped = read_pair_files(dir.path(), src, tgt, EmptyPairs::default()).unwrap();
    assert_eq!(
        skipped.pairs,
        vec![pair("one", "eins"), pair("four", "vier")]
    );
    assert_eq!(skipped.skipped_empty, vec![2, 3]);
    let kept = read_pair_files(dir.path(), src, tgt, EmptyPairs::Keep).unwrap();
    assert_eq!(kept.len(), 4);
    assert_eq!(kept.pairs[1], pair("", "zwei"));
    assert_eq!(kept.pairs[2], pair("three", "  "));
    let err = read_pair_files(dir.path(), src, tgt, EmptyPairs::Error)
        .unwrap_err()
        .to_string();
    assert!(err.contains("a.en: line 2: empty segment"), "{err}");
}

#[test]
fn tsv_lines_need_exactly_one_tab() {
    let got = parse_tsv(
        "Open\tÖffnen\r\nClose\tSchließen\n".as_bytes(),
        "x.tsv",
        EmptyPairs::Skip,
    )
    .unwrap();
    assert_eq!(
        got.pairs,
        vec![pair("Open", "Öffnen"), pair("Close", "Schließen")]
    );
    for (bytes, line, tabs, offset) in [
        (&b"a\tb\nno tab here\n"[..], 2, 0, 4),
        (&b"a\tb\tc\n"[..], 1, 2, 0),
    ] {
        let err = parse_tsv(bytes, "x.tsv", EmptyPairs::Skip).unwrap_err();
        match &err {
            Error::Format {
                source_name,
                offset: o,
                msg,
            } => {
                assert_eq!(source_name, "x.tsv");
                assert_eq!(*o, Some(offset));
                assert!(
                    msg.contains(&format!("line {line}: expected exactly one tab"))
                        && msg.contains(&format!("found {tabs}")),
                    "{msg}"
                );
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }
}

#[test]
fn tsv_blank_lines_and_empty_sides_follow_the_empty_pair_policy() {
    let bytes = b"a\tb\n\n\tc\nd\t\ne\tf\n";
    let skipped = parse_tsv(bytes, "x.tsv", EmptyPairs::Skip).unwrap();
    assert_eq!(skipped.pairs, vec![pair("a", "b"), pair("e", "f")]);
    assert_eq!(skipped.skipped_empty, vec![2, 3, 4]);
    assert_eq!(
        parse_tsv(bytes, "x.tsv", EmptyPairs::Keep).unwrap().len(),
        5
    );
    let err = parse_tsv(bytes, "x.tsv", EmptyPairs::Error)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x.tsv: line 2"), "{err}");
}

#[test]
fn read_tsv_names_a_missing_file_and_reads_a_real_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.tsv");
    let err = read_tsv(&path, EmptyPairs::Skip).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("pairs.tsv"),
        "{err}"
    );
    fs::write(&path, "Yes\tJa\nbad line\n").unwrap();
    let err = read_tsv(&path, EmptyPairs::Skip).unwrap_err().to_string();
    assert!(err.contains("pairs.tsv") && err.contains("line 2"), "{err}");
}

#[test]
fn gettext_en_de_reads_each_split_of_a_generated_corpus() {
    let dir = tempfile::tempdir().unwrap();
    for (split, n) in [(Split::Train, 5), (Split::Valid, 2), (Split::Test, 3)] {
        let en: String = (0..n).map(|i| format!("{split} sentence {i}\n")).collect();
        let de: String = (0..n).map(|i| format!("{split} Satz {i}\n")).collect();
        fs::write(dir.path().join(format!("{split}.en")), en).unwrap();
        fs::write(dir.path().join(format!("{split}.de")), de).unwrap();
    }
    for (split, n) in [(Split::Train, 5), (Split::Valid, 2), (Split::Test, 3)] {
        let got = gettext_en_de(dir.path(), split).unwrap();
        assert_eq!(got.len(), n);
        assert_eq!(
            got.pairs[1],
            pair(&format!("{split} sentence 1"), &format!("{split} Satz 1"))
        );
    }
    fs::remove_file(dir.path().join("valid.de")).unwrap();
    let err = gettext_en_de(dir.path(), Split::Valid).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("valid.de"),
        "{err}"
    );
}

/// The real corpus: the counts of its README and the first pair of each small split.
#[test]
fn real_gettext_en_de_corpus_has_the_counts_of_its_readme() {
    let Some(dir) = shared_subdir("data/gettext-en-de") else {
        return;
    };
    let valid = gettext_en_de(&dir, Split::Valid).unwrap();
    assert_eq!(valid.len(), 1000);
    assert!(valid.skipped_empty.is_empty());
    assert_eq!(
        valid.pairs[0],
        pair(
            "Select the color of the line.",
            "Wählen Sie die Linienfarbe aus."
        )
    );
    assert_eq!(gettext_en_de(&dir, Split::Test).unwrap().len(), 1000);
    let train = gettext_en_de(&dir, Split::Train).unwrap();
    assert_eq!(train.len(), 63_437);
    assert!(train
        .pairs
        .iter()
        .all(|p| !p.source.contains('\t') && !p.target.contains('\t')));
}
