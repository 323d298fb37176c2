//! On-disk size of a model file and of its gzip -9 / bzip2 -9 compressions.
//!
//! The compressed sizes are what METHOD.md reports as "gzip and bzip2 size of the saved model".
//! They are computed with flate2 / the bzip2 crate at their best level, streaming into byte
//! counters, so nothing is written to disk. The gzip stream carries no file name in its header,
//! so it can be a few bytes smaller than `gzip -9 FILE` (which stores the name).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Raw, gzip -9 and bzip2 -9 sizes of one file, in bytes.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileSizes {
    /// Size of the file itself.
    pub raw: u64,
    /// Size after gzip at level 9.
    pub gzip9: u64,
    /// Size after bzip2 at level 9.
    pub bzip2_9: u64,
}

/// A sink that only counts the bytes written to it.
#[derive(Default)]
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Size of a file and of its gzip -9 and bzip2 -9 compressions (computed in memory, streaming, nothing written).
pub fn compressed_sizes(path: &Path) -> Result<FileSizes> {
    let io_err = |e| Error::io(path, e);
    let mut file = File::open(path).map_err(io_err)?;
    let mut gz =
        flate2::write::GzEncoder::new(CountingSink::default(), flate2::Compression::best());
    let mut bz = bzip2::write::BzEncoder::new(CountingSink::default(), bzip2::Compression::best());
    let mut raw = 0u64;
    // 1 MiB chunks: large enough to keep both encoders busy, small enough for any model size.
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        raw += n as u64;
        gz.write_all(&buf[..n]).map_err(io_err)?;
        bz.write_all(&buf[..n]).map_err(io_err)?;
    }
    let gzip9 = gz.finish().map_err(io_err)?.0;
    let bzip2_9 = bz.finish().map_err(io_err)?.0;
    Ok(FileSizes {
        raw,
        gzip9,
        bzip2_9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(bytes: &[u8]) -> (u64, u64) {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
        gz.write_all(bytes).unwrap();
        let gz = gz.finish().unwrap();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::new(9));
        bz.write_all(bytes).unwrap();
        let bz = bz.finish().unwrap();
        (gz.len() as u64, bz.len() as u64)
    }

    #[test]
    fn zeros_compress_much_smaller_and_sizes_match_real_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zeros.bin");
        // More than one read chunk, so the streaming path is exercised.
        let bytes = vec![0u8; 3 * (1 << 20) + 123];
        std::fs::write(&path, &bytes).unwrap();
        let s = compressed_sizes(&path).unwrap();
        assert_eq!(s.raw, bytes.len() as u64);
        assert!(s.gzip9 * 100 < s.raw, "{s:?}");
        assert!(s.bzip2_9 * 100 < s.raw, "{s:?}");
        assert_eq!((s.gzip9, s.bzip2_9), reference(&bytes));
    }

    #[test]
    fn pseudo_random_bytes_sizes_match_real_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noise.bin");
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let bytes: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let s = compressed_sizes(&path).unwrap();
        assert_eq!(s.raw, 200_000);
        assert_eq!((s.gzip9, s.bzip2_9), reference(&bytes));
    }

    #[test]
    fn empty_file_has_zero_raw_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.bin");
        std::fs::write(&path, b"").unwrap();
        let s = compressed_sizes(&path).unwrap();
        assert_eq!(s.raw, 0);
        assert_eq!((s.gzip9, s.bzip2_9), reference(b""));
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.safetensors");
        let err = compressed_sizes(&path).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("nope.safetensors"), "{err}");
    }
}
