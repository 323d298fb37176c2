//! The IDX file format used by MNIST (<http://yann.lecun.com/exdb/mnist/>).
//!
//! Layout: magic `00 00 <type> <ndims>`, then `ndims` big-endian u32 dimensions, then the data.
//! Only element type `0x08` (unsigned byte) is supported, which covers MNIST and Fashion-MNIST.

use std::borrow::Cow;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The IDX element type code for unsigned bytes.
const TYPE_U8: u8 = 0x08;

/// A decoded IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first.
    pub dims: Vec<usize>,
    /// The elements in row-major order; `data.len()` is the product of `dims`.
    pub data: Vec<u8>,
}

/// Reads an IDX file that may be raw, gzip or bzip2 compressed; falls back to `path` + ".gz".
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let path = resolve_idx_path(path)?;
    // A compressed file is smaller than its payload, so the payload's bound holds for it too.
    let bytes =
        relprune_io::read_capped(&path, MAX_IDX_BYTES as u64).map_err(|e| Error::io(&path, e))?;
    parse_idx(&bytes, &path.display().to_string())
}

/// Parses IDX bytes already in memory, decompressing them first if they are gzip or bzip2.
pub fn parse_idx(bytes: &[u8], source_name: &str) -> Result<IdxArray> {
    let raw = decompress(bytes, source_name)?;
    parse_raw(&raw, source_name)
}

/// Largest IDX payload read, in bytes: 2^32 (4 GiB), 90× MNIST's training images. A header
/// declaring more is refused before any of the payload is read.
pub const MAX_IDX_BYTES: usize = 1 << 32;

/// Writes `data` with `dims` as an uncompressed IDX u8 file.
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let bytes = encode_idx(dims, data)?;
    fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The file that `read_idx(path)` would read: `path` itself, else `path.gz`.
pub(crate) fn resolve_idx_path(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let mut gz = path.as_os_str().to_os_string();
    gz.push(".gz");
    let gz = PathBuf::from(gz);
    if gz.exists() {
        return Ok(gz);
    }
    Err(Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("file not found (also tried {})", gz.display()),
        ),
    ))
}

/// Encodes an uncompressed IDX u8 array, validating that `dims` describe `data`.
pub(crate) fn encode_idx(dims: &[usize], data: &[u8]) -> Result<Vec<u8>> {
    let ndims = u8::try_from(dims.len()).map_err(|_| {
        Error::Invalid(format!("IDX supports at most 255 dims, got {}", dims.len()))
    })?;
    if ndims == 0 {
        return Err(Error::Invalid("IDX needs at least one dimension".into()));
    }
    let expected = element_count(dims)
        .ok_or_else(|| Error::Invalid(format!("IDX dims {dims:?} overflow the element count")))?;
    if expected != data.len() {
        return Err(Error::Invalid(format!(
            "IDX dims {dims:?} need {expected} bytes of data, got {}",
            data.len()
        )));
    }
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    out.extend_from_slice(&[0, 0, TYPE_U8, ndims]);
    for &d in dims {
        let d = u32::try_from(d)
            .map_err(|_| Error::Invalid(format!("IDX dim {d} does not fit in a u32")))?;
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    Ok(out)
}

/// Product of the dims, or `None` on overflow.
fn element_count(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Undoes gzip or bzip2 compression, detected by magic bytes because file names lie; inflates
/// no more than the IDX header inside declares, plus one byte (to see trailing garbage).
fn decompress<'a>(bytes: &'a [u8], source_name: &str) -> Result<Cow<'a, [u8]>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        // Multi-member aware: `gzip` output concatenated with `cat` is still valid gzip.
        let decoder = flate2::read::MultiGzDecoder::new(bytes);
        read_stream(decoder, "gzip", source_name).map(Cow::Owned)
    } else if bytes.starts_with(b"BZh") {
        let decoder = bzip2::read::MultiBzDecoder::new(bytes);
        read_stream(decoder, "bzip2", source_name).map(Cow::Owned)
    } else {
        Ok(Cow::Borrowed(bytes))
    }
}

/// Reads a decompressor's IDX header, then at most the payload it declares and one byte more,
/// reporting how far it got if the stream is corrupt. A header it cannot read is returned as is
/// (what [`parse_raw`] then names the problem of).
fn read_stream(reader: impl Read, kind: &str, source_name: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut reader = reader;
    let read = |out: &mut Vec<u8>, n: u64, reader: &mut dyn Read| -> Result<()> {
        match reader.take(n).read_to_end(out) {
            Ok(_) => Ok(()),
            // read_to_end keeps what was decoded before the error, so its length is the offset.
            Err(e) => Err(Error::format(
                source_name,
                Some(out.len() as u64),
                format!("corrupt {kind} stream: {e}"),
            )),
        }
    };
    read(&mut out, 4, &mut reader)?;
    if out.len() < 4 || out[0] != 0 || out[1] != 0 {
        return Ok(out);
    }
    let ndims = out[3];
    read(&mut out, 4 * u64::from(ndims), &mut reader)?;
    let dims: Vec<usize> = out[4..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    if dims.len() < usize::from(ndims) {
        return Ok(out);
    }
    match element_count(&dims) {
        Some(n) if n <= MAX_IDX_BYTES => {
            read(&mut out, n as u64 + 1, &mut reader)?;
            Ok(out)
        }
        _ => Err(Error::format(
            source_name,
            Some(4),
            format!(
                "IDX dims {dims:?} declare more than {MAX_IDX_BYTES} bytes of data; refused \
                 before inflating the {kind} stream"
            ),
        )),
    }
}

/// Parses uncompressed IDX bytes.
fn parse_raw(bytes: &[u8], source_name: &str) -> Result<IdxArray> {
    let len = bytes.len();
    if len < 4 {
        return Err(Error::format(
            source_name,
            Some(len as u64),
            format!("too short for an IDX header: {len} bytes, need at least 4"),
        ));
    }
    let magic = &bytes[..4];
    if magic[0] != 0 || magic[1] != 0 {
        return Err(Error::format(
            source_name,
            Some(0),
            format!(
                "bad IDX magic {:02x} {:02x} {:02x} {:02x}: expected 00 00 <type> <ndims> \
                 (e.g. 00 00 08 03 for images, 00 00 08 01 for labels)",
                magic[0], magic[1], magic[2], magic[3]
            ),
        ));
    }
    if magic[2] != TYPE_U8 {
        return Err(Error::format(
            source_name,
            Some(2),
            format!(
                "unsupported IDX element type 0x{:02x} ({}); only 0x08 (unsigned byte) is supported",
                magic[2],
                type_name(magic[2])
            ),
        ));
    }
    let ndims = usize::from(magic[3]);
    if ndims == 0 {
        return Err(Error::format(
            source_name,
            Some(3),
            "IDX header has 0 dimensions",
        ));
    }
    let header_len = 4 + 4 * ndims;
    if len < header_len {
        return Err(Error::format(
            source_name,
            Some(len as u64),
            format!(
                "too short for an IDX header with {ndims} dims: {len} bytes, need {header_len}"
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = element_count(&dims).ok_or_else(|| {
        Error::format(
            source_name,
            Some(4),
            format!("IDX dims {dims:?} overflow the element count"),
        )
    })?;
    if expected > MAX_IDX_BYTES {
        return Err(Error::format(
            source_name,
            Some(4),
            format!("IDX dims {dims:?} declare more than {MAX_IDX_BYTES} bytes of data"),
        ));
    }
    let have = len - header_len;
    if have < expected {
        return Err(Error::format(
            source_name,
            Some(len as u64),
            format!("truncated data: dims {dims:?} say {expected} bytes of data, file has {have}"),
        ));
    }
    if have > expected {
        return Err(Error::format(
            source_name,
            Some((header_len + expected) as u64),
            format!(
                "trailing garbage: {} bytes after the {expected} bytes of data for dims {dims:?}",
                have - expected
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header_len..].to_vec(),
    })
}

/// Human name of an IDX element type code, for error messages.
fn type_name(code: u8) -> &'static str {
    match code {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "short",
        0x0C => "int",
        0x0D => "float",
        0x0E => "double",
        _ => "not an IDX type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> (Vec<usize>, Vec<u8>) {
        let dims = vec![3, 2, 4];
        let data: Vec<u8> = (0..24).map(|i| (i * 11) as u8).collect();
        (dims, data)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn bzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn format_offset(err: &Error) -> Option<u64> {
        match err {
            Error::Format { offset, .. } => *offset,
            other => panic!("expected a Format error, got {other:?}"),
        }
    }

    #[test]
    fn a_compressed_file_inflates_no_more_than_its_header_declares() {
        // A header claiming 2^31 images of 28×28 over a megabyte of zeros: refused before the
        // payload is inflated (it once inflated 4.3 GB to find out).
        let mut bomb = vec![0, 0, 8, 3];
        for d in [1u32 << 31, 28, 28] {
            bomb.extend_from_slice(&d.to_be_bytes());
        }
        bomb.resize(bomb.len() + (1 << 20), 0);
        let e = parse_idx(&gzip(&bomb), "bomb.gz").unwrap_err().to_string();
        assert!(
            e.contains("bomb.gz") && e.contains("declare more than"),
            "{e}"
        );
        // A header declaring 24 bytes followed by a megabyte: 25 bytes are inflated, and the
        // extra one is reported as trailing garbage.
        let (dims, data) = sample();
        let mut long = encode_idx(&dims, &data).unwrap();
        long.resize(long.len() + (1 << 20), 7);
        for packed in [gzip(&long), bzip(&long)] {
            let raw = decompress(&packed, "long").unwrap();
            assert_eq!(raw.len(), 4 + 12 + 24 + 1);
            let e = parse_idx(&packed, "long").unwrap_err().to_string();
            assert!(e.contains("trailing garbage"), "{e}");
        }
        // Well-formed compressed files still read whole.
        let good = encode_idx(&dims, &data).unwrap();
        assert_eq!(
            parse_idx(&gzip(&good), "g").unwrap(),
            IdxArray { dims, data }
        );
    }

    #[test]
    fn round_trip_raw_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a-idx3-ubyte");
        let (dims, data) = sample();
        write_idx(&path, &dims, &data).unwrap();
        let arr = read_idx(&path).unwrap();
        assert_eq!(arr, IdxArray { dims, data });
    }

    #[test]
    fn round_trip_gzip_file_found_via_gz_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let (dims, data) = sample();
        let raw = encode_idx(&dims, &data).unwrap();
        fs::write(dir.path().join("a-idx3-ubyte.gz"), gzip(&raw)).unwrap();
        // Asking for the raw name finds the .gz sibling.
        let arr = read_idx(&dir.path().join("a-idx3-ubyte")).unwrap();
        assert_eq!(arr, IdxArray { dims, data });
    }

    #[test]
    fn round_trip_bzip2_detected_by_magic_not_extension() {
        let dir = tempfile::tempdir().unwrap();
        let (dims, data) = sample();
        let raw = encode_idx(&dims, &data).unwrap();
        // Misleading extension: detection must use the bytes.
        let path = dir.path().join("a-idx3-ubyte.gz");
        fs::write(&path, bzip(&raw)).unwrap();
        let arr = read_idx(&path).unwrap();
        assert_eq!(arr, IdxArray { dims, data });
    }

    #[test]
    fn parse_idx_decompresses_in_memory_bytes() {
        let (dims, data) = sample();
        let raw = encode_idx(&dims, &data).unwrap();
        for bytes in [raw.clone(), gzip(&raw), bzip(&raw)] {
            let arr = parse_idx(&bytes, "mem").unwrap();
            assert_eq!(arr.dims, dims);
            assert_eq!(arr.data, data);
        }
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-idx");
        let err = read_idx(&path).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn bad_magic_says_what_was_expected() {
        let err = parse_idx(&[1, 2, 8, 1, 0, 0, 0, 0], "bad.idx").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bad.idx"), "{msg}");
        assert!(msg.contains("expected 00 00"), "{msg}");
        assert_eq!(format_offset(&err), Some(0));
    }

    #[test]
    fn truncated_data_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trunc-idx1-ubyte");
        let mut raw = encode_idx(&[10], &[7; 10]).unwrap();
        raw.truncate(4 + 4 + 6);
        fs::write(&path, &raw).unwrap();
        let err = read_idx(&path).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("trunc-idx1-ubyte"), "{msg}");
        assert!(msg.contains("say 10 bytes"), "{msg}");
        assert!(msg.contains("file has 6"), "{msg}");
        assert!(msg.contains("at byte 14"), "{msg}");
        assert_eq!(format_offset(&err), Some(14));
    }

    #[test]
    fn trailing_garbage_is_rejected_at_end_of_data() {
        let mut raw = encode_idx(&[2], &[1, 2]).unwrap();
        raw.extend_from_slice(b"junk");
        let err = parse_idx(&raw, "x").unwrap_err();
        assert!(err.to_string().contains("trailing garbage"), "{err}");
        assert_eq!(format_offset(&err), Some(10));
    }

    #[test]
    fn header_too_short_is_rejected() {
        let err = parse_idx(&[0, 0], "short").unwrap_err();
        assert!(err.to_string().contains("too short"), "{err}");
        // Magic promises 3 dims (12 bytes) but only one is present.
        let err = parse_idx(&[0, 0, 8, 3, 0, 0, 0, 1], "short3").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("too short") && msg.contains("need 16"),
            "{msg}"
        );
    }

    #[test]
    fn empty_file_is_too_short() {
        let err = parse_idx(&[], "empty").unwrap_err();
        assert!(err.to_string().contains("too short"), "{err}");
    }

    #[test]
    fn corrupt_gzip_is_a_format_error() {
        let raw = encode_idx(&[100], &[3; 100]).unwrap();
        let mut gz = gzip(&raw);
        // Damage the deflate payload and the CRC so decoding cannot succeed.
        let n = gz.len();
        for b in &mut gz[10..n] {
            *b ^= 0x5a;
        }
        let err = parse_idx(&gz, "broken.gz").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("broken.gz") && msg.contains("corrupt gzip"),
            "{msg}"
        );
    }

    #[test]
    fn truncated_gzip_is_a_format_error() {
        let raw = encode_idx(&[1000], &[3; 1000]).unwrap();
        let gz = gzip(&raw);
        let err = parse_idx(&gz[..gz.len() / 2], "half.gz").unwrap_err();
        assert!(err.to_string().contains("corrupt gzip"), "{err}");
    }

    #[test]
    fn corrupt_bzip2_is_a_format_error() {
        let raw = encode_idx(&[100], &[3; 100]).unwrap();
        let mut bz = bzip(&raw);
        let n = bz.len();
        for b in &mut bz[10..n] {
            *b ^= 0x5a;
        }
        let err = parse_idx(&bz, "broken.bz2").unwrap_err();
        assert!(err.to_string().contains("corrupt bzip2"), "{err}");
    }

    #[test]
    fn unsupported_type_byte_is_named() {
        let err = parse_idx(&[0, 0, 0x0D, 1, 0, 0, 0, 0], "floats").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("0x0d") && msg.contains("float"), "{msg}");
    }

    #[test]
    fn write_idx_rejects_dims_that_do_not_match_data() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_idx(&dir.path().join("x"), &[2, 2], &[0; 3]).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    }
}
