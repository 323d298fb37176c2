//! MNIST and Fashion-MNIST: locating the data, loading IDX directories and the embedded subset.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::idx::{encode_idx, parse_idx, read_idx, resolve_idx_path, IdxArray};
use crate::image::ImageDataset;

/// Environment variable naming a data directory, consulted after an explicit directory.
const DATA_DIR_ENV: &str = "RELPRUNE_DATA_DIR";
/// Where the Debian package `dataset-fashion-mnist` installs Fashion-MNIST.
const FASHION_MNIST_DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// Both datasets are 28x28 grey-level images in ten classes.
const SHAPE: (usize, usize, usize) = (1, 28, 28);
const NUM_CLASSES: usize = 10;

static EMBEDDED_TRAIN_IMAGES: &[u8] = include_bytes!("../embedded/train-images-idx3-ubyte.bz2");
static EMBEDDED_TRAIN_LABELS: &[u8] = include_bytes!("../embedded/train-labels-idx1-ubyte.bz2");
static EMBEDDED_TEST_IMAGES: &[u8] = include_bytes!("../embedded/t10k-images-idx3-ubyte.bz2");
static EMBEDDED_TEST_LABELS: &[u8] = include_bytes!("../embedded/t10k-labels-idx1-ubyte.bz2");

/// Which IDX image dataset to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// Handwritten digits (LeCun, Cortes, Burges).
    Mnist,
    /// Zalando's clothing images in MNIST format.
    FashionMnist,
}

impl DatasetKind {
    /// The dataset's short name: "mnist" or "fashion-mnist".
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a dataset's files come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// A directory of data files: IDX (raw or gzipped) for the MNIST family, binary batches for CIFAR-10.
    Dir(PathBuf),
    /// The MNIST subset compiled into this crate.
    Embedded,
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Dir(p) => write!(f, "{}", p.display()),
            DataSource::Embedded => f.write_str("embedded MNIST subset"),
        }
    }
}

/// The train and test splits of a dataset plus a description of where they came from.
#[derive(Clone, Debug)]
pub struct ImageSplits {
    /// The training split.
    pub train: ImageDataset,
    /// The test split.
    pub test: ImageDataset,
    /// Where the splits were loaded from.
    pub source: DataSource,
}

/// Where data is found, in order: the explicit directory, $RELPRUNE_DATA_DIR, then the kind's default:
/// Mnist → Embedded; FashionMnist → /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist) or an error saying to install it / pass --data-dir.
///
/// If $RELPRUNE_DATA_DIR has a subdirectory named after the kind ("mnist", "fashion-mnist"),
/// that subdirectory is used, so one variable can serve both datasets.
pub fn resolve_source(kind: DatasetKind, dir: Option<&Path>) -> Result<DataSource> {
    if let Some(dir) = dir {
        return existing_dir(dir).map(DataSource::Dir);
    }
    if let Some(env_dir) = std::env::var_os(DATA_DIR_ENV).filter(|v| !v.is_empty()) {
        let env_dir = PathBuf::from(env_dir);
        let per_kind = env_dir.join(kind.name());
        let chosen = if per_kind.is_dir() { per_kind } else { env_dir };
        return existing_dir(&chosen).map(DataSource::Dir);
    }
    match kind {
        DatasetKind::Mnist => Ok(DataSource::Embedded),
        DatasetKind::FashionMnist => {
            let default = Path::new(FASHION_MNIST_DEFAULT_DIR);
            if default.is_dir() {
                Ok(DataSource::Dir(default.to_path_buf()))
            } else {
                Err(Error::Invalid(format!(
                    "Fashion-MNIST not found: {FASHION_MNIST_DEFAULT_DIR} does not exist; install \
                     the Debian package dataset-fashion-mnist, pass --data-dir, or set {DATA_DIR_ENV}"
                )))
            }
        }
    }
}

/// Loads the train and test splits of `kind` from `source`.
pub fn load(kind: DatasetKind, source: &DataSource) -> Result<ImageSplits> {
    match source {
        DataSource::Dir(dir) => load_dir(kind, dir),
        DataSource::Embedded => match kind {
            DatasetKind::Mnist => load_embedded(),
            DatasetKind::FashionMnist => Err(Error::Invalid(
                "only MNIST is embedded; Fashion-MNIST needs a data directory \
                 (install dataset-fashion-mnist or pass --data-dir)"
                    .into(),
            )),
        },
    }
}

/// Loads the four standard IDX files (each raw or .gz) of `kind` from `dir`.
pub fn load_dir(kind: DatasetKind, dir: &Path) -> Result<ImageSplits> {
    let train = load_pair(kind, dir, TRAIN_IMAGES, TRAIN_LABELS)?;
    let test = load_pair(kind, dir, TEST_IMAGES, TEST_LABELS)?;
    Ok(ImageSplits {
        train,
        test,
        source: DataSource::Dir(dir.to_path_buf()),
    })
}

/// Loads the MNIST subset compiled into the crate (10,000 train, 2,000 test).
pub fn load_embedded() -> Result<ImageSplits> {
    let decode = |bytes: &[u8], name: &str| {
        let name = format!("embedded/{name}.bz2");
        let arr = parse_idx(bytes, &name)?;
        Ok::<_, Error>((arr, name))
    };
    let train = {
        let (images, img_name) = decode(EMBEDDED_TRAIN_IMAGES, TRAIN_IMAGES)?;
        let (labels, lbl_name) = decode(EMBEDDED_TRAIN_LABELS, TRAIN_LABELS)?;
        dataset_from_idx(DatasetKind::Mnist, images, &img_name, labels, &lbl_name)?
    };
    let test = {
        let (images, img_name) = decode(EMBEDDED_TEST_IMAGES, TEST_IMAGES)?;
        let (labels, lbl_name) = decode(EMBEDDED_TEST_LABELS, TEST_LABELS)?;
        dataset_from_idx(DatasetKind::Mnist, images, &img_name, labels, &lbl_name)?
    };
    Ok(ImageSplits {
        train,
        test,
        source: DataSource::Embedded,
    })
}

/// Writes the embedded subset files from a real MNIST directory (used by `cargo xtask embed-mnist`).
///
/// Takes the first `n_train` training and `n_test` test examples and writes each file as
/// bzip2 -9 compressed IDX named `<standard name>.bz2` in `out_dir` (created if missing).
pub fn write_embedded_subset(
    mnist_dir: &Path,
    out_dir: &Path,
    n_train: usize,
    n_test: usize,
) -> Result<()> {
    fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    for (img_name, lbl_name, n) in [
        (TRAIN_IMAGES, TRAIN_LABELS, n_train),
        (TEST_IMAGES, TEST_LABELS, n_test),
    ] {
        let (images, img_src) = read_named(mnist_dir, img_name)?;
        let (labels, lbl_src) = read_named(mnist_dir, lbl_name)?;
        // Validate the full pair first so a bad source never yields a plausible-looking subset.
        let count = check_pair(DatasetKind::Mnist, &images, &img_src, &labels, &lbl_src)?;
        if n == 0 || n > count {
            return Err(Error::Invalid(format!(
                "embedded subset of {img_name}: asked for {n} examples, source has {count}"
            )));
        }
        let per_image = SHAPE.0 * SHAPE.1 * SHAPE.2;
        let img_bytes = encode_idx(&[n, SHAPE.1, SHAPE.2], &images.data[..n * per_image])?;
        let lbl_bytes = encode_idx(&[n], &labels.data[..n])?;
        write_bz2(&out_dir.join(format!("{img_name}.bz2")), &img_bytes)?;
        write_bz2(&out_dir.join(format!("{lbl_name}.bz2")), &lbl_bytes)?;
    }
    Ok(())
}

/// Compresses `bytes` with bzip2 at the best level and writes them to `path`.
fn write_bz2(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
    enc.write_all(bytes).map_err(|e| Error::io(path, e))?;
    let compressed = enc.finish().map_err(|e| Error::io(path, e))?;
    fs::write(path, compressed).map_err(|e| Error::io(path, e))
}

/// Checks that `dir` is an existing directory, so a typo fails here rather than per file.
fn existing_dir(dir: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: data directory is not a directory",
            dir.display()
        )));
    }
    Ok(dir.to_path_buf())
}

/// Reads `dir/name` (or its .gz), returning the array and the path actually read.
fn read_named(dir: &Path, name: &str) -> Result<(IdxArray, String)> {
    let path = resolve_idx_path(&dir.join(name))?;
    let arr = read_idx(&path)?;
    Ok((arr, path.display().to_string()))
}

/// Loads one images/labels file pair from `dir`.
fn load_pair(
    kind: DatasetKind,
    dir: &Path,
    img_name: &str,
    lbl_name: &str,
) -> Result<ImageDataset> {
    let (images, img_src) = read_named(dir, img_name)?;
    let (labels, lbl_src) = read_named(dir, lbl_name)?;
    dataset_from_idx(kind, images, &img_src, labels, &lbl_src)
}

/// Checks an images/labels pair has MNIST's layout and matching counts; returns the count.
fn check_pair(
    kind: DatasetKind,
    images: &IdxArray,
    img_src: &str,
    labels: &IdxArray,
    lbl_src: &str,
) -> Result<usize> {
    if images.dims.len() != 3 || images.dims[1] != SHAPE.1 || images.dims[2] != SHAPE.2 {
        return Err(Error::format(
            img_src,
            None,
            format!(
                "expected {kind} images with dims [N, 28, 28] (magic 2051), found dims {:?}",
                images.dims
            ),
        ));
    }
    if labels.dims.len() != 1 {
        return Err(Error::format(
            lbl_src,
            None,
            format!(
                "expected {kind} labels with dims [N] (magic 2049), found dims {:?}",
                labels.dims
            ),
        ));
    }
    let (n_img, n_lbl) = (images.dims[0], labels.dims[0]);
    if n_img != n_lbl {
        return Err(Error::Invalid(format!(
            "{img_src} has {n_img} images but {lbl_src} has {n_lbl} labels"
        )));
    }
    Ok(n_img)
}

/// Validates a pair and turns it into a dataset.
fn dataset_from_idx(
    kind: DatasetKind,
    images: IdxArray,
    img_src: &str,
    labels: IdxArray,
    lbl_src: &str,
) -> Result<ImageDataset> {
    let n = check_pair(kind, &images, img_src, &labels, lbl_src)?;
    ImageDataset::from_u8(&images.data, &labels.data, n, SHAPE, NUM_CLASSES, lbl_src)
}
