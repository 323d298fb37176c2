//! Loading MNIST-format data: embedded subset, directories, real data, and source resolution.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use relprune_data::idx::write_idx;
use relprune_data::mnist::{load_dir, load_embedded, write_embedded_subset};
use relprune_data::{load, resolve_source, DataSource, DatasetKind, Error, ImageDataset};

const REAL_MNIST: &str = "/work/shared/data/mnist";
const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn embedded_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("embedded")
}

/// Writes a tiny MNIST-shaped directory with `n_img` images and `n_lbl` labels per split.
fn fake_mnist_dir(dir: &Path, n_img: usize, n_lbl: usize) {
    for (img, lbl) in [
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ] {
        let pixels: Vec<u8> = (0..n_img * 784).map(|i| (i % 256) as u8).collect();
        write_idx(&dir.join(img), &[n_img, 28, 28], &pixels).unwrap();
        let labels: Vec<u8> = (0..n_lbl).map(|i| (i % 10) as u8).collect();
        write_idx(&dir.join(lbl), &[n_lbl], &labels).unwrap();
    }
}

fn check_mnist_like(d: &ImageDataset, n: usize) {
    assert_eq!(d.len(), n);
    assert_eq!(d.shape, (1, 28, 28));
    assert_eq!(d.num_classes, 10);
    assert_eq!(d.images.dims(), &[n, 784]);
    let min = d.images.min_all().unwrap().to_scalar::<f32>().unwrap();
    let max = d.images.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        (0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max),
        "{min} {max}"
    );
    assert!(max > 0.5, "images look blank (max {max})");
    let labels: BTreeSet<u32> = d.labels.to_vec1::<u32>().unwrap().into_iter().collect();
    assert_eq!(
        labels,
        (0..10).collect(),
        "all ten classes present, none out of range"
    );
}

#[test]
fn embedded_subset_loads_10000_train_2000_test() {
    let s = load_embedded().unwrap();
    assert_eq!(s.source, DataSource::Embedded);
    check_mnist_like(&s.train, 10_000);
    check_mnist_like(&s.test, 2_000);
}

#[test]
fn embedded_files_stay_within_2mb() {
    let total: u64 = std::fs::read_dir(embedded_dir())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().extension().is_some_and(|x| x == "bz2"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(total <= 2 * 1024 * 1024, "embedded data is {total} bytes");
}

#[test]
fn embedded_subset_is_reproducible_from_real_mnist() {
    if !Path::new(REAL_MNIST).is_dir() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    write_embedded_subset(Path::new(REAL_MNIST), out.path(), 10_000, 2_000).unwrap();
    for name in [
        "train-images-idx3-ubyte.bz2",
        "train-labels-idx1-ubyte.bz2",
        "t10k-images-idx3-ubyte.bz2",
        "t10k-labels-idx1-ubyte.bz2",
    ] {
        let fresh = std::fs::read(out.path().join(name)).unwrap();
        let shipped = std::fs::read(embedded_dir().join(name)).unwrap();
        assert!(fresh == shipped, "{name} differs from a fresh regeneration");
    }
}

/// Run once with `--ignored` to (re)generate the embedded files from the real MNIST.
#[test]
#[ignore]
fn regenerate_embedded_subset() {
    write_embedded_subset(Path::new(REAL_MNIST), &embedded_dir(), 10_000, 2_000).unwrap();
}

#[test]
fn embedded_with_fashion_mnist_is_an_error() {
    let err = load(DatasetKind::FashionMnist, &DataSource::Embedded).unwrap_err();
    assert!(err.to_string().contains("Fashion-MNIST"), "{err}");
}

#[test]
fn load_dir_reads_a_small_directory() {
    let dir = tempfile::tempdir().unwrap();
    fake_mnist_dir(dir.path(), 12, 12);
    let s = load(DatasetKind::Mnist, &DataSource::Dir(dir.path().into())).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (12, 12));
    assert_eq!(s.source, DataSource::Dir(dir.path().into()));
}

#[test]
fn load_dir_count_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    fake_mnist_dir(dir.path(), 12, 11);
    let err = load_dir(DatasetKind::Mnist, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("train-images-idx3-ubyte"), "{err}");
    assert!(err.contains("train-labels-idx1-ubyte"), "{err}");
    assert!(err.contains("12") && err.contains("11"), "{err}");
}

#[test]
fn load_dir_rejects_wrong_image_dims() {
    let dir = tempfile::tempdir().unwrap();
    fake_mnist_dir(dir.path(), 2, 2);
    write_idx(
        &dir.path().join("train-images-idx3-ubyte"),
        &[2, 784],
        &[0; 1568],
    )
    .unwrap();
    let err = load_dir(DatasetKind::Mnist, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("[N, 28, 28]"),
        "{err}"
    );
}

#[test]
fn load_dir_label_out_of_range_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    fake_mnist_dir(dir.path(), 3, 3);
    write_idx(
        &dir.path().join("t10k-labels-idx1-ubyte"),
        &[3],
        &[1, 10, 2],
    )
    .unwrap();
    let err = load_dir(DatasetKind::Mnist, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t10k-labels-idx1-ubyte") && err.contains("index 1"),
        "{err}"
    );
}

#[test]
fn load_dir_missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_dir(DatasetKind::Mnist, dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
}

#[test]
fn real_mnist_loads_60000_and_10000() {
    if !Path::new(REAL_MNIST).is_dir() {
        return;
    }
    let s = load_dir(DatasetKind::Mnist, Path::new(REAL_MNIST)).unwrap();
    check_mnist_like(&s.train, 60_000);
    check_mnist_like(&s.test, 10_000);
}

#[test]
fn real_fashion_mnist_loads_60000_and_10000() {
    if !Path::new(FASHION).is_dir() {
        return;
    }
    let s = load_dir(DatasetKind::FashionMnist, Path::new(FASHION)).unwrap();
    check_mnist_like(&s.train, 60_000);
    check_mnist_like(&s.test, 10_000);
}

#[test]
fn dataset_kind_names_and_source_display() {
    assert_eq!(DatasetKind::Mnist.name(), "mnist");
    assert_eq!(DatasetKind::FashionMnist.name(), "fashion-mnist");
    assert_eq!(DataSource::Embedded.to_string(), "embedded MNIST subset");
    assert_eq!(DataSource::Dir("/x/y".into()).to_string(), "/x/y");
}

/// The only test touching RELPRUNE_DATA_DIR: env vars are process-global and tests run in threads.
#[test]
fn resolve_source_explicit_dir_beats_env_beats_default() {
    let explicit = tempfile::tempdir().unwrap();
    let from_env = tempfile::tempdir().unwrap();
    let var = "RELPRUNE_DATA_DIR";
    let saved = std::env::var_os(var);

    // No other test in this binary reads or writes the variable, so changing it here is race-free.
    std::env::remove_var(var);
    assert_eq!(
        resolve_source(DatasetKind::Mnist, None).unwrap(),
        DataSource::Embedded
    );
    let fashion_default = resolve_source(DatasetKind::FashionMnist, None);
    if Path::new(FASHION).is_dir() {
        assert_eq!(fashion_default.unwrap(), DataSource::Dir(FASHION.into()));
    } else {
        let msg = fashion_default.unwrap_err().to_string();
        assert!(
            msg.contains("dataset-fashion-mnist") && msg.contains("--data-dir"),
            "{msg}"
        );
    }
    assert_eq!(
        resolve_source(DatasetKind::Mnist, Some(explicit.path())).unwrap(),
        DataSource::Dir(explicit.path().into())
    );

    std::env::set_var(var, from_env.path());
    for kind in [DatasetKind::Mnist, DatasetKind::FashionMnist] {
        assert_eq!(
            resolve_source(kind, None).unwrap(),
            DataSource::Dir(from_env.path().into())
        );
        assert_eq!(
            resolve_source(kind, Some(explicit.path())).unwrap(),
            DataSource::Dir(explicit.path().into())
        );
    }
    // A per-kind subdirectory lets one variable serve both datasets.
    let sub = from_env.path().join("fashion-mnist");
    std::fs::create_dir(&sub).unwrap();
    assert_eq!(
        resolve_source(DatasetKind::FashionMnist, None).unwrap(),
        DataSource::Dir(sub)
    );
    assert_eq!(
        resolve_source(DatasetKind::Mnist, None).unwrap(),
        DataSource::Dir(from_env.path().into())
    );

    // A directory that does not exist is reported with its path.
    let missing = from_env.path().join("nope");
    let err = resolve_source(DatasetKind::Mnist, Some(&missing)).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");

    match saved {
        Some(v) => std::env::set_var(var, v),
        None => std::env::remove_var(var),
    }
}
