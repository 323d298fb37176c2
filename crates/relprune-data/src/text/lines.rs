//! Plain text files, one item per line: sentences to embed, translate or prune on, and the
//! hypothesis and reference files of BLEU.

use std::path::Path;

use crate::error::{Error, Result};

/// Reads a text file as sacreBLEU's command line does: UTF-8, lines split on `\n`, no extra
/// empty line after a final newline; line ends (`\r` included) are kept. Errors name the file
/// and, for invalid UTF-8, the line and the byte.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = crate::text::read_text_file(path)?;
    split_lines(&bytes, &path.display().to_string())
}

/// Splits UTF-8 bytes into lines like Python's text-mode iteration with `newline="\n"`; `source`
/// names them in errors.
pub fn split_lines(bytes: &[u8], source: &str) -> Result<Vec<String>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    // A final `\n` terminates the last line; it does not start a new, empty one.
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| match std::str::from_utf8(line) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(Error::format(
                source,
                None,
                format!(
                    "line {}: invalid UTF-8 at byte {} of the line",
                    i + 1,
                    e.valid_up_to()
                ),
            )),
        })
        .collect()
}

/// The non-empty lines of a text file, trimmed: sentences to train or judge on.
pub fn read_sentences(path: &Path) -> Result<Vec<String>> {
    Ok(read_lines(path)?
        .into_iter()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_like_python_text_mode() {
        let split = |b: &[u8]| split_lines(b, "x").unwrap();
        assert_eq!(split(b""), Vec::<String>::new());
        assert_eq!(split(b"\n"), [""]);
        assert_eq!(split(b"a\nb"), ["a", "b"]);
        assert_eq!(split(b"a\nb\n"), ["a", "b"]);
        assert_eq!(split(b"a\n\n"), ["a", ""]);
        // `\r` stays (BLEU strips it with the other trailing whitespace); a lone `\r` is no break.
        assert_eq!(split(b"a\r\nb\rc\r\n"), ["a\r", "b\rc\r"]);
    }

    #[test]
    fn invalid_utf8_names_the_file_the_line_and_the_byte() {
        let e = split_lines(b"ok\nbad \xff here\n", "f.txt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.txt: line 2: invalid UTF-8 at byte 4 of the line"
        );
    }
}
