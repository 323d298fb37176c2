//! CIFAR-10 binary batches, per-channel normalization and seeded augmentation.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use relprune_data::cifar::{RECORD_BYTES, TEST_BATCH, TRAIN_BATCHES};
use relprune_data::{
    load_cifar10_dir, parse_cifar_batch, write_cifar_batch, Augment, DataSource, Error,
    ImageDataset,
};

/// Records per generated train batch (1..=5) and in the test batch: small, uneven, so order
/// and concatenation mistakes show.
const TRAIN_COUNTS: [usize; 5] = [2, 3, 1, 4, 2];
const TEST_COUNT: usize = 3;

/// Pixel (c, y, x) of record `rec` of batch `batch` (test batch = 6): a value that differs
/// across channels, rows, columns, records and batches.
fn pixel(batch: usize, rec: usize, c: usize, y: usize, x: usize) -> u8 {
    ((batch * 50 + rec * 13 + c * 71 + y * 7 + x * 3) % 256) as u8
}

fn label(batch: usize, rec: usize) -> u8 {
    ((batch * 3 + rec) % 10) as u8
}

/// One record in the published layout, built byte by byte independently of the crate:
/// label, then 1024 red, 1024 green, 1024 blue, each plane 32 rows of 32.
fn record_bytes(batch: usize, rec: usize) -> Vec<u8> {
    let mut r = vec![label(batch, rec)];
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                r.push(pixel(batch, rec, c, y, x));
            }
        }
    }
    r
}

fn batch_bytes(batch: usize, n: usize) -> Vec<u8> {
    (0..n).flat_map(|rec| record_bytes(batch, rec)).collect()
}

/// Writes the five train batches with `write_cifar_batch` and the test batch by hand.
fn write_fake_cifar(dir: &Path) {
    for (b, (&name, &n)) in TRAIN_BATCHES.iter().zip(&TRAIN_COUNTS).enumerate() {
        let batch = b + 1;
        let images: Vec<u8> = (0..n)
            .flat_map(|rec| record_bytes(batch, rec)[1..].to_vec())
            .collect();
        let labels: Vec<u8> = (0..n).map(|rec| label(batch, rec)).collect();
        write_cifar_batch(&dir.join(name), &images, &labels).unwrap();
    }
    fs::write(dir.join(TEST_BATCH), batch_bytes(6, TEST_COUNT)).unwrap();
}

/// Checks every pixel and label of `d` against (batch, record) pairs in order.
fn check_contents(d: &ImageDataset, expected: &[(usize, usize)]) {
    assert_eq!(d.len(), expected.len());
    assert_eq!(d.shape, (3, 32, 32));
    assert_eq!(d.num_classes, 10);
    assert_eq!(d.images.dims(), &[expected.len(), 3072]);
    let rows = d.images.to_vec2::<f32>().unwrap();
    let labels = d.labels.to_vec1::<u32>().unwrap();
    for (i, &(batch, rec)) in expected.iter().enumerate() {
        assert_eq!(
            labels[i],
            u32::from(label(batch, rec)),
            "label of example {i}"
        );
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let want = f32::from(pixel(batch, rec, c, y, x)) / 255.0;
                    assert_eq!(
                        rows[i][c * 1024 + y * 32 + x],
                        want,
                        "example {i} (batch {batch} record {rec}) pixel ({c}, {y}, {x})"
                    );
                }
            }
        }
    }
}

fn fake_cifar_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_fake_cifar(dir.path());
    dir
}

#[test]
fn round_trip_real_format_places_pixels_at_chw_index_and_keeps_batch_order() {
    let dir = fake_cifar_dir();
    let s = load_cifar10_dir(dir.path()).unwrap();
    assert_eq!(s.source, DataSource::Dir(dir.path().to_path_buf()));
    let train_order: Vec<(usize, usize)> = TRAIN_COUNTS
        .iter()
        .enumerate()
        .flat_map(|(b, &n)| (0..n).map(move |rec| (b + 1, rec)))
        .collect();
    assert_eq!(train_order.len(), 12);
    check_contents(&s.train, &train_order);
    let test_order: Vec<(usize, usize)> = (0..TEST_COUNT).map(|rec| (6, rec)).collect();
    check_contents(&s.test, &test_order);
}

#[test]
fn write_cifar_batch_produces_the_published_byte_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data_batch_1.bin");
    let images: Vec<u8> = (0..3)
        .flat_map(|rec| record_bytes(1, rec)[1..].to_vec())
        .collect();
    let labels: Vec<u8> = (0..3).map(|rec| label(1, rec)).collect();
    write_cifar_batch(&path, &images, &labels).unwrap();
    assert_eq!(fs::read(&path).unwrap(), batch_bytes(1, 3));
    // The atomic write leaves no temp file behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("data_batch_1.bin")]);
    assert_eq!(
        parse_cifar_batch(&batch_bytes(1, 3), "mem").unwrap(),
        (images, labels)
    );
}

#[test]
fn write_cifar_batch_rejects_inconsistent_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.bin");
    assert!(matches!(
        write_cifar_batch(&path, &[0; 3071], &[1]),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        write_cifar_batch(&path, &[0; 3072], &[10]),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        write_cifar_batch(&path, &[], &[]),
        Err(Error::Invalid(_))
    ));
    assert!(!path.exists());
}

#[test]
fn truncated_file_error_names_file_record_and_offset() {
    let dir = fake_cifar_dir();
    // Batch 3 holds one record; append a record cut short after 100 bytes.
    let path = dir.path().join("data_batch_3.bin");
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(&record_bytes(3, 1)[..100]);
    fs::write(&path, &bytes).unwrap();
    let err = load_cifar10_dir(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("data_batch_3.bin"), "{msg}");
    assert!(msg.contains("offset"), "{msg}");
    assert!(
        msg.contains(&format!("truncated record 1 at byte offset {RECORD_BYTES}")),
        "{msg}"
    );
    assert!(msg.contains("only 100 of its 3073 bytes"), "{msg}");
}

#[test]
fn label_above_nine_error_names_the_record_and_its_offset() {
    let mut bytes = batch_bytes(2, 4);
    bytes[2 * RECORD_BYTES] = 10;
    let err = parse_cifar_batch(&bytes, "data_batch_2.bin").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("data_batch_2.bin"), "{msg}");
    assert!(msg.contains("record 2 has label 10"), "{msg}");
    assert!(
        msg.contains(&format!("at byte {}", 2 * RECORD_BYTES)),
        "{msg}"
    );
    match err {
        Error::Format { offset, .. } => assert_eq!(offset, Some(2 * RECORD_BYTES as u64)),
        other => panic!("expected a Format error, got {other:?}"),
    }
}

#[test]
fn missing_batch_file_error_names_its_path() {
    for missing in ["data_batch_4.bin", TEST_BATCH] {
        let dir = fake_cifar_dir();
        let path = dir.path().join(missing);
        fs::remove_file(&path).unwrap();
        let err = load_cifar10_dir(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}

#[test]
fn missing_directory_error_names_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("no-such-cifar");
    let msg = load_cifar10_dir(&gone).unwrap_err().to_string();
    assert!(msg.contains(&gone.display().to_string()), "{msg}");
}

#[test]
fn empty_batch_file_is_rejected_by_name() {
    let dir = fake_cifar_dir();
    fs::write(dir.path().join(TEST_BATCH), b"").unwrap();
    let msg = load_cifar10_dir(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains(TEST_BATCH) && msg.contains("empty file"),
        "{msg}"
    );
}

/// Per-channel mean and population std computed naively in f64 from (N, 3072) rows.
fn naive_stats(images: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let rows = images.to_vec2::<f32>().unwrap();
    let mut mean = vec![0f64; 3];
    let mut std = vec![0f64; 3];
    for c in 0..3 {
        let vals: Vec<f64> = rows
            .iter()
            .flat_map(|r| r[c * 1024..(c + 1) * 1024].iter().map(|&v| f64::from(v)))
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let v = vals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / vals.len() as f64;
        mean[c] = m;
        std[c] = v.sqrt();
    }
    (mean, std)
}

#[test]
fn channel_stats_match_a_naive_per_channel_computation() {
    let s = load_cifar10_dir(fake_cifar_dir().path()).unwrap();
    let (mean, std) = s.train.channel_stats().unwrap();
    let (want_mean, want_std) = naive_stats(&s.train.images);
    for c in 0..3 {
        assert!(
            (f64::from(mean[c]) - want_mean[c]).abs() < 1e-6,
            "{mean:?} {want_mean:?}"
        );
        assert!(
            (f64::from(std[c]) - want_std[c]).abs() < 1e-6,
            "{std:?} {want_std:?}"
        );
    }
    // The channels really differ, so a per-channel bug cannot pass by accident.
    assert!((mean[0] - mean[1]).abs() > 1e-3 || (mean[1] - mean[2]).abs() > 1e-3);
}

#[test]
fn channel_stats_merge_chunks_exactly_across_more_than_1024_rows() {
    // 2,500 images span three internal chunks of 1,024 rows; values depend on the row so the
    // chunks have different means.
    let n = 2500;
    let pixels: Vec<u8> = (0..n)
        .flat_map(|i| (0..12).map(move |j| ((i * 7 + j * 31) % 256) as u8))
        .collect();
    let labels = vec![0u8; n];
    let d = ImageDataset::from_u8(&pixels, &labels, n, (3, 2, 2), 1, "chunks").unwrap();
    let (mean, std) = d.channel_stats().unwrap();
    let rows = d.images.to_vec2::<f32>().unwrap();
    for c in 0..3 {
        let vals: Vec<f64> = rows
            .iter()
            .flat_map(|r| r[c * 4..c * 4 + 4].iter().map(|&v| f64::from(v)))
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let s = (vals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
        assert!(
            (f64::from(mean[c]) - m).abs() < 1e-6,
            "channel {c}: {} vs {m}",
            mean[c]
        );
        assert!(
            (f64::from(std[c]) - s).abs() < 1e-6,
            "channel {c}: {} vs {s}",
            std[c]
        );
    }
}

#[test]
fn normalizing_with_train_stats_gives_zero_mean_unit_std_per_channel() {
    let s = load_cifar10_dir(fake_cifar_dir().path()).unwrap();
    let (mean, std) = s.train.channel_stats().unwrap();
    let train = s.train.normalize(&mean, &std).unwrap();
    assert_eq!(train.images.dims(), s.train.images.dims());
    assert_eq!(train.shape, s.train.shape);
    assert_eq!(
        train.labels.to_vec1::<u32>().unwrap(),
        s.train.labels.to_vec1::<u32>().unwrap()
    );
    let (m, sd) = naive_stats(&train.images);
    for c in 0..3 {
        assert!(m[c].abs() < 1e-5, "channel {c} mean {}", m[c]);
        assert!((sd[c] - 1.0).abs() < 1e-5, "channel {c} std {}", sd[c]);
    }
    // The test split goes through the same per-channel affine map.
    let test = s.test.normalize(&mean, &std).unwrap();
    let raw = s.test.images.to_vec2::<f32>().unwrap();
    let got = test.images.to_vec2::<f32>().unwrap();
    for (r, g) in raw.iter().zip(&got) {
        for (j, (&x, &y)) in r.iter().zip(g).enumerate() {
            let c = j / 1024;
            assert!((y - (x - mean[c]) / std[c]).abs() < 1e-6);
        }
    }
}

#[test]
fn normalize_rejects_wrong_lengths_and_non_positive_std() {
    let s = load_cifar10_dir(fake_cifar_dir().path()).unwrap();
    let d = &s.train;
    assert!(d.normalize(&[0.5, 0.5], &[0.2, 0.2, 0.2]).is_err());
    assert!(d.normalize(&[0.5; 3], &[0.2; 4]).is_err());
    assert!(d.normalize(&[0.5; 3], &[0.2, 0.0, 0.2]).is_err());
    assert!(d.normalize(&[0.5; 3], &[0.2, -1.0, 0.2]).is_err());
    assert!(d.normalize(&[0.5; 3], &[0.2, f32::NAN, 0.2]).is_err());
    assert!(d.normalize(&[f32::NAN, 0.5, 0.5], &[0.2; 3]).is_err());
    assert!(d.normalize(&[0.5; 3], &[0.2; 3]).is_ok());
}

// ---- augmentation ----

/// Image shape for the augmentation tests: small, non-square, three channels.
const AUG_SHAPE: (usize, usize, usize) = (3, 6, 8);
const AUG_PIXELS: usize = 3 * 6 * 8;

/// `n` images whose pixels are all distinct and non-zero (1..=144 plus 1000 per image), so any
/// shifted or mirrored copy identifies its shift and mirror uniquely.
fn distinct_images(n: usize) -> Tensor {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..AUG_PIXELS).map(move |j| (1 + j + 1000 * i) as f32))
        .collect();
    Tensor::from_vec(data, (n, AUG_PIXELS), &Device::Cpu).unwrap()
}

/// Naive per-pixel shifted/mirrored copy with zero fill: out(c, y, x) = src(c, y + dy, x' + dx).
fn shifted(src: &[f32], dy: isize, dx: isize, mirror: bool) -> Vec<f32> {
    let (c, h, w) = AUG_SHAPE;
    let mut out = vec![0f32; src.len()];
    for ch in 0..c {
        for y in 0..h as isize {
            for x in 0..w as isize {
                let sx = if mirror { w as isize - 1 - x } else { x } + dx;
                let sy = y + dy;
                if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                    out[ch * h * w + y as usize * w + x as usize] =
                        src[ch * h * w + sy as usize * w + sx as usize];
                }
            }
        }
    }
    out
}

/// The (dy, dx, mirror) for which `out` is `shifted(src, ..)`, if any, with |dy|, |dx| ≤ pad.
fn identify(src: &[f32], out: &[f32], pad: isize) -> Option<(isize, isize, bool)> {
    let mut found = None;
    for dy in -pad..=pad {
        for dx in -pad..=pad {
            for mirror in [false, true] {
                if shifted(src, dy, dx, mirror) == out {
                    assert!(found.is_none(), "ambiguous match; test images not distinct");
                    found = Some((dy, dx, mirror));
                }
            }
        }
    }
    found
}

fn augment(aug: Augment, images: &Tensor, seed: u64) -> Tensor {
    aug.apply(images, AUG_SHAPE, &mut StdRng::seed_from_u64(seed))
        .unwrap()
}

#[test]
fn augment_same_seed_same_output_different_seed_different() {
    let images = distinct_images(32);
    let a = augment(Augment::CIFAR10, &images, 7)
        .to_vec2::<f32>()
        .unwrap();
    let b = augment(Augment::CIFAR10, &images, 7)
        .to_vec2::<f32>()
        .unwrap();
    let c = augment(Augment::CIFAR10, &images, 8)
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn augment_pad_zero_without_flip_is_the_identity() {
    let images = distinct_images(5);
    let aug = Augment {
        pad: 0,
        flip: false,
    };
    assert!(aug.is_identity());
    let out = augment(aug, &images, 3);
    assert_eq!(
        out.to_vec2::<f32>().unwrap(),
        images.to_vec2::<f32>().unwrap()
    );
}

#[test]
fn augment_flip_only_gives_original_or_exact_mirror_and_both_occur() {
    let images = distinct_images(64);
    let aug = Augment { pad: 0, flip: true };
    let out = augment(aug, &images, 11).to_vec2::<f32>().unwrap();
    let src = images.to_vec2::<f32>().unwrap();
    let mut mirrored = 0;
    for (s, o) in src.iter().zip(&out) {
        // The mirror, written out by hand: out(c, y, x) = src(c, y, W−1−x).
        let (c, h, w) = AUG_SHAPE;
        let mirror: Vec<f32> = (0..c * h * w)
            .map(|i| {
                let (plane, x) = (i / w, i % w);
                s[plane * w + (w - 1 - x)]
            })
            .collect();
        if *o == mirror {
            mirrored += 1;
        } else {
            assert_eq!(o, s, "output is neither the image nor its mirror");
        }
    }
    assert!((16..=48).contains(&mirrored), "{mirrored} of 64 mirrored");
}

#[test]
fn augment_output_is_always_a_zero_padded_shift_or_mirror_within_pad() {
    let n = 4000;
    let images = distinct_images(n);
    let out = augment(Augment { pad: 2, flip: true }, &images, 5)
        .to_vec2::<f32>()
        .unwrap();
    let src = images.to_vec2::<f32>().unwrap();
    let mut seen = BTreeSet::new();
    let mut mirrored = 0;
    for (i, (s, o)) in src.iter().zip(&out).enumerate() {
        let (dy, dx, m) = identify(s, o, 2)
            .unwrap_or_else(|| panic!("image {i} is not a shifted/mirrored zero-padded copy"));
        seen.insert((dy, dx, m));
        mirrored += usize::from(m);
    }
    // All 5 x 5 offsets with and without mirroring are drawn.
    assert_eq!(seen.len(), 50, "{seen:?}");
    assert!(
        (1800..=2200).contains(&mirrored),
        "{mirrored} of {n} mirrored"
    );
}

#[test]
fn augment_cifar10_recipe_on_32x32_shifts_at_most_four_pixels() {
    let n = 16;
    let data: Vec<f32> = (0..n * 3072).map(|i| (1 + i % 3072) as f32).collect();
    let images = Tensor::from_vec(data.clone(), (n, 3072), &Device::Cpu).unwrap();
    let out = Augment::CIFAR10
        .apply(&images, (3, 32, 32), &mut StdRng::seed_from_u64(1))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for o in &out {
        // Some pixel survives in every channel, and the zero border is at most 4 rows/columns.
        let zeros = o.iter().filter(|&&v| v == 0.0).count();
        assert!(zeros <= 3 * (32 * 32 - 28 * 28), "{zeros} zeros");
        // Every non-zero value keeps its channel (value ranges are per channel here).
        for (j, &v) in o.iter().enumerate() {
            if v != 0.0 {
                assert_eq!((v as usize - 1) / 1024, j / 1024);
            }
        }
    }
}

#[test]
fn augment_four_d_layout_matches_flat_layout_and_is_kept() {
    let images = distinct_images(10);
    let (c, h, w) = AUG_SHAPE;
    let four_d = images.reshape((10, c, h, w)).unwrap();
    let flat_out = augment(Augment::CIFAR10, &images, 9);
    let four_out = augment(Augment::CIFAR10, &four_d, 9);
    assert_eq!(four_out.dims(), &[10, c, h, w]);
    assert_eq!(flat_out.dims(), &[10, AUG_PIXELS]);
    assert_eq!(
        four_out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        flat_out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn augment_rejects_shape_mismatch_and_non_f32() {
    let images = distinct_images(2);
    let mut rng = StdRng::seed_from_u64(0);
    assert!(Augment::CIFAR10
        .apply(&images, (3, 6, 7), &mut rng)
        .is_err());
    let four_d = images.reshape((2, 3, 8, 6)).unwrap();
    assert!(Augment::CIFAR10
        .apply(&four_d, AUG_SHAPE, &mut rng)
        .is_err());
    let as_f64 = images.to_dtype(candle_core::DType::F64).unwrap();
    assert!(Augment::CIFAR10
        .apply(&as_f64, AUG_SHAPE, &mut rng)
        .is_err());
}
