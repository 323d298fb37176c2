//! CIFAR-10 in its binary format (<https://www.cs.toronto.edu/~kriz/cifar.html>).
//!
//! A batch file is a plain sequence of 3073-byte records: 1 label byte (0..=9), then 3072 pixel
//! bytes — the 1024 red, then 1024 green, then 1024 blue values of a 32x32 image, each plane
//! row-major. The pixel bytes are therefore already (C, H, W) row-major, the layout
//! [`ImageDataset`] uses. The real files hold 10,000 records each; any positive count is accepted.

use std::fs;
use std::path::Path;

use crate::error::{Error, Result};
use crate::image::ImageDataset;
use crate::mnist::{DataSource, ImageSplits};

/// The five training batch files, in the order they are concatenated.
pub const TRAIN_BATCHES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_BATCH: &str = "test_batch.bin";
/// CIFAR-10 images are 32x32 RGB.
pub const SHAPE: (usize, usize, usize) = (3, 32, 32);
/// Number of CIFAR-10 classes.
pub const NUM_CLASSES: usize = 10;
/// Pixel bytes per image (3 * 32 * 32).
pub const IMAGE_BYTES: usize = SHAPE.0 * SHAPE.1 * SHAPE.2;
/// Bytes per record: the label byte plus the pixels.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;

/// Parses one batch file's bytes into (images, labels): `images` is N * 3072 bytes, each image
/// (C, H, W) row-major, and `labels` is N bytes in 0..=9.
pub fn parse_cifar_batch(bytes: &[u8], source_name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    if bytes.is_empty() {
        return Err(Error::format(
            source_name,
            Some(0),
            format!(
                "empty file: a CIFAR-10 batch is a sequence of {RECORD_BYTES}-byte records \
                 (1 label byte + {IMAGE_BYTES} pixel bytes)"
            ),
        ));
    }
    let len = bytes.len();
    let rem = len % RECORD_BYTES;
    if rem != 0 {
        let record = len / RECORD_BYTES;
        let start = record * RECORD_BYTES;
        // The record start is in the text; the Format offset is where the data runs out, as for IDX.
        return Err(Error::format(
            source_name,
            Some(len as u64),
            format!(
                "truncated record {record} at byte offset {start}: only {rem} of its \
                 {RECORD_BYTES} bytes present (file is {len} bytes, not a multiple of {RECORD_BYTES})"
            ),
        ));
    }
    let n = len / RECORD_BYTES;
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[0];
        if usize::from(label) >= NUM_CLASSES {
            return Err(Error::format(
                source_name,
                Some((i * RECORD_BYTES) as u64),
                format!("record {i} has label {label}; CIFAR-10 labels are 0..=9"),
            ));
        }
        labels.push(label);
        images.extend_from_slice(&record[1..]);
    }
    Ok((images, labels))
}

/// Largest CIFAR batch file read: 100,000 records (the format's batches hold 10,000).
pub const MAX_BATCH_BYTES: u64 = 100_000 * RECORD_BYTES as u64;

/// Reads and parses one batch file; errors name the path.
pub fn read_cifar_batch(path: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let bytes = relprune_io::read_capped(path, MAX_BATCH_BYTES).map_err(|e| Error::io(path, e))?;
    parse_cifar_batch(&bytes, &path.display().to_string())
}

/// Loads CIFAR-10 from `dir`: train is `data_batch_1.bin` … `data_batch_5.bin` concatenated in
/// that order, test is `test_batch.bin`.
pub fn load_cifar10_dir(dir: &Path) -> Result<ImageSplits> {
    // Fail on a mistyped directory once, rather than with "data_batch_1.bin: not found".
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: CIFAR-10 data directory is not a directory",
            dir.display()
        )));
    }
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for name in TRAIN_BATCHES {
        let (img, lbl) = read_cifar_batch(&dir.join(name))?;
        // Reserve once the first batch shows the size, so 50,000 images do not regrow five times.
        if images.is_empty() {
            images.reserve(img.len() * TRAIN_BATCHES.len());
            labels.reserve(lbl.len() * TRAIN_BATCHES.len());
        }
        images.extend_from_slice(&img);
        labels.extend_from_slice(&lbl);
    }
    let train_name = format!("{}/data_batch_[1-5].bin", dir.display());
    let train = ImageDataset::from_u8(
        &images,
        &labels,
        labels.len(),
        SHAPE,
        NUM_CLASSES,
        &train_name,
    )?;
    // Free the 150 MB of train bytes before reading the test batch.
    drop(images);
    let test_path = dir.join(TEST_BATCH);
    let (images, labels) = read_cifar_batch(&test_path)?;
    let test = ImageDataset::from_u8(
        &images,
        &labels,
        labels.len(),
        SHAPE,
        NUM_CLASSES,
        &test_path.display().to_string(),
    )?;
    Ok(ImageSplits {
        train,
        test,
        source: DataSource::Dir(dir.to_path_buf()),
    })
}

/// Writes `images` (N * 3072 bytes, each image (C, H, W) row-major) and `labels` (N bytes, 0..=9)
/// as a CIFAR-10 batch file, atomically (temp file in the same directory, then rename).
pub fn write_cifar_batch(path: &Path, images: &[u8], labels: &[u8]) -> Result<()> {
    let n = labels.len();
    if n == 0 {
        // parse_cifar_batch rejects empty files, so writing one would only defer the error.
        return Err(Error::Invalid(format!(
            "{}: a CIFAR-10 batch needs at least one record",
            path.display()
        )));
    }
    if images.len() != n * IMAGE_BYTES {
        return Err(Error::Invalid(format!(
            "{}: {n} labels need {} image bytes ({IMAGE_BYTES} per image), got {}",
            path.display(),
            n * IMAGE_BYTES,
            images.len()
        )));
    }
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= NUM_CLASSES)
    {
        return Err(Error::Invalid(format!(
            "{}: label {l} at index {i} is not a CIFAR-10 class (0..=9)",
            path.display()
        )));
    }
    let mut bytes = Vec::with_capacity(n * RECORD_BYTES);
    for (label, image) in labels.iter().zip(images.chunks_exact(IMAGE_BYTES)) {
        bytes.push(*label);
        bytes.extend_from_slice(image);
    }
    Ok(relprune_io::write(path, &bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout_constants() {
        assert_eq!(IMAGE_BYTES, 3072);
        assert_eq!(RECORD_BYTES, 3073);
    }

    #[test]
    fn truncated_record_text_names_record_start_and_offset_field_is_end_of_data() {
        let bytes = vec![0u8; 17 * RECORD_BYTES + 5];
        let err = parse_cifar_batch(&bytes, "data_batch_3.bin").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("data_batch_3.bin: truncated record 17 at byte offset 52241"),
            "{msg}"
        );
        match err {
            Error::Format { offset, .. } => assert_eq!(offset, Some(52246)),
            other => panic!("expected a Format error, got {other:?}"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_batch_that_is_an_endless_device_is_refused_at_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data_batch_1.bin");
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let e = read_cifar_batch(&p).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("refused"),
            "{e}"
        );
    }
}
