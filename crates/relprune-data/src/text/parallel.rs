//! Parallel text for translation: two line-aligned files (one segment per line) or one TSV file
//! (`source<TAB>target` per line), and the gettext-en-de corpus of `../shared/data`.
//!
//! Files are read whole and must be UTF-8. Line ends may be `\n` or `\r\n`; a final line needs
//! no line end, and a final line end does not start another (empty) segment. A UTF-8 byte order
//! mark at the start of a file is dropped. Text is otherwise kept as it is (no trimming), since
//! spacing can be part of what a tokenizer sees.

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One source segment and its translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextPair {
    /// The source-language segment.
    pub source: String,
    /// The target-language segment.
    pub target: String,
}

/// What a loader does with a pair whose source or target is empty (or only whitespace).
///
/// The default, [`EmptyPairs::Skip`], is what a translation trainer wants: an empty source
/// teaches the model to hallucinate a target, an empty target teaches it to stop at once, and
/// either is usually an alignment or extraction accident rather than data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EmptyPairs {
    /// Leave the pair out and record where it was.
    #[default]
    Skip,
    /// Keep the pair as it is.
    Keep,
    /// Fail, naming the file and line.
    Error,
}

/// Pairs read from parallel files, with the lines that were skipped as empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParallelText {
    /// The pairs in file order.
    pub pairs: Vec<TextPair>,
    /// 1-based line numbers of the pairs left out by [`EmptyPairs::Skip`].
    pub skipped_empty: Vec<usize>,
}

impl ParallelText {
    /// Number of pairs kept.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether no pair was kept.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// A split of a corpus stored as `{split}.{lang}` files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// `train.*`
    Train,
    /// `valid.*`
    Valid,
    /// `test.*`
    Test,
}

impl Split {
    /// The file stem of the split: `train`, `valid` or `test`.
    pub fn stem(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.stem())
    }
}

/// Reads two line-aligned files: line `i` of `target` translates line `i` of `source`.
///
/// Different line counts are an error naming both files and both counts: pairing by position
/// after a lost line would silently misalign every pair after it.
pub fn read_parallel_files(
    source: &Path,
    target: &Path,
    empty: EmptyPairs,
) -> Result<ParallelText> {
    let src_bytes = crate::text::read_text_file(source)?;
    let tgt_bytes = crate::text::read_text_file(target)?;
    let src_name = source.display().to_string();
    let tgt_name = target.display().to_string();
    parse_parallel(&src_bytes, &src_name, &tgt_bytes, &tgt_name, empty)
}

/// [`read_parallel_files`] on contents already in memory; the names are used in errors.
pub fn parse_parallel(
    source: &[u8],
    source_name: &str,
    target: &[u8],
    target_name: &str,
    empty: EmptyPairs,
) -> Result<ParallelText> {
    let src_lines = split_lines(source);
    let tgt_lines = split_lines(target);
    if src_lines.len() != tgt_lines.len() {
        return Err(Error::Invalid(format!(
            "parallel files are misaligned: {source_name} has {} lines but {target_name} has {} lines",
            src_lines.len(),
            tgt_lines.len()
        )));
    }
    let mut out = ParallelText::default();
    for (i, (s, t)) in src_lines.iter().zip(&tgt_lines).enumerate() {
        let line = i + 1;
        let pair = TextPair {
            source: line_text(s, line, source_name)?.to_string(),
            target: line_text(t, line, target_name)?.to_string(),
        };
        let side_name = if pair.source.trim().is_empty() {
            Some(source_name)
        } else if pair.target.trim().is_empty() {
            Some(target_name)
        } else {
            None
        };
        push_pair(&mut out, pair, line, side_name, empty)?;
    }
    Ok(out)
}

/// Reads a TSV file of `source<TAB>target` lines.
///
/// A line with no tab or with several tabs is an error naming the file and line (tabs inside a
/// segment would make the split ambiguous). A blank line counts as an empty pair and follows
/// `empty`.
pub fn read_tsv(path: &Path, empty: EmptyPairs) -> Result<ParallelText> {
    let bytes = crate::text::read_text_file(path)?;
    parse_tsv(&bytes, &path.display().to_string(), empty)
}

/// [`read_tsv`] on contents already in memory; `source_name` is used in errors.
pub fn parse_tsv(bytes: &[u8], source_name: &str, empty: EmptyPairs) -> Result<ParallelText> {
    let mut out = ParallelText::default();
    for (i, l) in split_lines(bytes).iter().enumerate() {
        let line = i + 1;
        let text = line_text(l, line, source_name)?;
        let pair = if text.trim().is_empty() {
            TextPair::default()
        } else {
            let mut fields = text.split('\t');
            match (fields.next(), fields.next(), fields.next()) {
                (Some(s), Some(t), None) => TextPair {
                    source: s.to_string(),
                    target: t.to_string(),
                },
                _ => {
                    let tabs = text.matches('\t').count();
                    return Err(Error::format(
                        source_name,
                        Some(l.offset as u64),
                        format!(
                            "line {line}: expected exactly one tab (source<TAB>target), found {tabs}"
                        ),
                    ));
                }
            }
        };
        let is_empty = pair.source.trim().is_empty() || pair.target.trim().is_empty();
        push_pair(&mut out, pair, line, is_empty.then_some(source_name), empty)?;
    }
    Ok(out)
}

/// The gettext-en-de corpus (English → German software messages): `{dir}/{split}.en` and
/// `{dir}/{split}.de`, line-aligned, with the default [`EmptyPairs::Skip`].
///
/// The corpus has no empty segments, tabs or newlines inside segments (its README's cleaning
/// rules 3 and 4), so every line is a pair.
pub fn gettext_en_de(dir: &Path, split: Split) -> Result<ParallelText> {
    let stem = split.stem();
    read_parallel_files(
        &dir.join(format!("{stem}.en")),
        &dir.join(format!("{stem}.de")),
        EmptyPairs::Skip,
    )
}

/// A line's bytes (without its line end) and the byte offset of its start in the file.
struct Line<'a> {
    bytes: &'a [u8],
    offset: usize,
}

/// Splits file contents into lines, without line ends (`\n` or `\r\n`) or a leading BOM.
fn split_lines(bytes: &[u8]) -> Vec<Line<'_>> {
    let start = if bytes.starts_with(BOM) { BOM.len() } else { 0 };
    let body = &bytes[start..];
    if body.is_empty() {
        return Vec::new();
    }
    // A final '\n' ends the last line rather than starting an empty one.
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let mut lines = Vec::new();
    let mut offset = start;
    for piece in body.split(|&b| b == b'\n') {
        let bytes = piece.strip_suffix(b"\r").unwrap_or(piece);
        lines.push(Line { bytes, offset });
        offset += piece.len() + 1;
    }
    lines
}

/// The line as UTF-8, or an error with the line number and the byte offsets of the bad sequence.
fn line_text<'a>(line: &Line<'a>, number: usize, source_name: &str) -> Result<&'a str> {
    std::str::from_utf8(line.bytes).map_err(|e| {
        let col = e.valid_up_to();
        Error::format(
            source_name,
            Some((line.offset + col) as u64),
            format!("line {number}: invalid UTF-8 at byte {col} of the line"),
        )
    })
}

/// Adds `pair`, or applies the empty-pair policy when `empty_side` names the file with the empty side.
fn push_pair(
    out: &mut ParallelText,
    pair: TextPair,
    line: usize,
    empty_side: Option<&str>,
    policy: EmptyPairs,
) -> Result<()> {
    match (empty_side, policy) {
        (None, _) | (Some(_), EmptyPairs::Keep) => out.pairs.push(pair),
        (Some(_), EmptyPairs::Skip) => out.skipped_empty.push(line),
        (Some(name), EmptyPairs::Error) => {
            return Err(Error::Invalid(format!(
                "{name}: line {line}: empty segment (source {:?}, target {:?})",
                pair.source, pair.target
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(bytes: &[u8]) -> Vec<(&[u8], usize)> {
        split_lines(bytes)
            .iter()
            .map(|l| (l.bytes, l.offset))
            .collect()
    }

    #[test]
    fn split_lines_handles_final_newline_crlf_and_bom() {
        assert!(texts(b"").is_empty());
        assert!(texts(BOM).is_empty());
        assert_eq!(texts(b"a"), vec![(&b"a"[..], 0)]);
        assert_eq!(texts(b"a\n"), vec![(&b"a"[..], 0)]);
        assert_eq!(texts(b"\n"), vec![(&b""[..], 0)]);
        assert_eq!(
            texts(b"ab\r\ncd\n\nx"),
            vec![
                (&b"ab"[..], 0),
                (&b"cd"[..], 4),
                (&b""[..], 7),
                (&b"x"[..], 8)
            ]
        );
        assert_eq!(
            texts(b"\xEF\xBB\xBFa\nb"),
            vec![(&b"a"[..], 3), (&b"b"[..], 5)]
        );
    }
}
