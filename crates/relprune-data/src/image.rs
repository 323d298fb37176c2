//! An in-memory labelled image dataset with seeded splits and batching.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// An in-memory labelled image dataset on the CPU.
#[derive(Clone, Debug)]
pub struct ImageDataset {
    /// Images as (N, C*H*W) f32 with values in [0, 1].
    pub images: Tensor,
    /// Labels as (N,) u32.
    pub labels: Tensor,
    /// Image shape (C, H, W).
    pub shape: (usize, usize, usize),
    /// Number of classes; every label is below it.
    pub num_classes: usize,
}

impl ImageDataset {
    /// Builds a dataset from u8 pixels (scaled to [0, 1]) and u8 labels, validating both.
    pub fn from_u8(
        images: &[u8],
        labels: &[u8],
        n: usize,
        shape: (usize, usize, usize),
        num_classes: usize,
        source_name: &str,
    ) -> Result<Self> {
        if n == 0 {
            return Err(Error::Invalid(format!("{source_name}: dataset is empty")));
        }
        let (c, h, w) = shape;
        let per_image = c * h * w;
        if per_image == 0 {
            return Err(Error::Invalid(format!(
                "{source_name}: image shape {shape:?} has no pixels"
            )));
        }
        let expected = n.checked_mul(per_image).ok_or_else(|| {
            Error::Invalid(format!("{source_name}: {n} images of {shape:?} overflow"))
        })?;
        if images.len() != expected {
            return Err(Error::Invalid(format!(
                "{source_name}: {n} images of shape {shape:?} need {expected} bytes, got {}",
                images.len()
            )));
        }
        if labels.len() != n {
            return Err(Error::Invalid(format!(
                "{source_name}: expected {n} labels, got {}",
                labels.len()
            )));
        }
        if num_classes == 0 {
            return Err(Error::Invalid(format!(
                "{source_name}: num_classes must be positive"
            )));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| usize::from(l) >= num_classes)
        {
            return Err(Error::Invalid(format!(
                "{source_name}: label {l} at index {i} is not below num_classes = {num_classes}"
            )));
        }
        let device = Device::Cpu;
        // Dividing each pixel (rather than multiplying by 1/255) keeps values correctly rounded.
        let pixels: Vec<f32> = images.iter().map(|&p| f32::from(p) / 255.0).collect();
        let images = Tensor::from_vec(pixels, (n, per_image), &device)?;
        let labels: Vec<u32> = labels.iter().map(|&l| u32::from(l)).collect();
        let labels = Tensor::from_vec(labels, n, &device)?;
        Ok(Self {
            images,
            labels,
            shape,
            num_classes,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.dims().first().copied().unwrap_or(0)
    }

    /// Whether the dataset has no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `indices`, in that order (repeats allowed; empty or out-of-range is an error).
    pub fn subset(&self, indices: &[u32]) -> Result<Self> {
        if indices.is_empty() {
            return Err(Error::Invalid("subset: no indices given".into()));
        }
        let len = self.len();
        if let Some((i, &bad)) = indices
            .iter()
            .enumerate()
            .find(|(_, &ix)| ix as usize >= len)
        {
            return Err(Error::Invalid(format!(
                "subset: index {bad} (position {i}) is out of range for {len} examples"
            )));
        }
        let ids = Tensor::from_slice(indices, indices.len(), self.images.device())?;
        Ok(self.with_tensors(
            self.images.index_select(&ids, 0)?,
            self.labels.index_select(&ids, 0)?,
        ))
    }

    /// The first `n` examples (`n` must be in 1..=len).
    pub fn take_first(&self, n: usize) -> Result<Self> {
        let len = self.len();
        if n == 0 || n > len {
            return Err(Error::Invalid(format!(
                "take_first: asked for {n} examples, dataset has {len}"
            )));
        }
        Ok(self.with_tensors(self.images.narrow(0, 0, n)?, self.labels.narrow(0, 0, n)?))
    }

    /// Seeded random split into (train, valid) with `n_valid` examples in valid; the same seed gives the same split.
    pub fn split(&self, n_valid: usize, seed: u64) -> Result<(Self, Self)> {
        let len = self.len();
        if n_valid == 0 || n_valid >= len {
            return Err(Error::Invalid(format!(
                "split: n_valid = {n_valid} must leave both parts non-empty (dataset has {len})"
            )));
        }
        let mut perm = index_range(len)?;
        perm.shuffle(&mut StdRng::seed_from_u64(seed));
        let (valid, train) = perm.split_at_mut(n_valid);
        // Sorting keeps each part in the original order, so in-order batching stays predictable.
        valid.sort_unstable();
        train.sort_unstable();
        Ok((self.subset(train)?, self.subset(valid)?))
    }

    /// Batches in order, or shuffled by `rng` (a new permutation each call); the last partial batch is kept.
    pub fn batches<'a>(
        &'a self,
        batch_size: usize,
        rng: Option<&mut StdRng>,
    ) -> Result<Batches<'a>> {
        if batch_size == 0 {
            return Err(Error::Invalid(
                "batches: batch_size must be positive".into(),
            ));
        }
        let len = self.len();
        let mut order = index_range(len)?;
        if let Some(rng) = rng {
            order.shuffle(rng);
        }
        let order = Tensor::from_vec(order, len, self.images.device())?;
        Ok(Batches {
            dataset: self,
            order,
            batch_size,
            next: 0,
            len,
        })
    }

    /// A copy with images and labels on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(self.with_tensors(
            self.images.to_device(device)?,
            self.labels.to_device(device)?,
        ))
    }

    /// Same metadata, new tensors.
    fn with_tensors(&self, images: Tensor, labels: Tensor) -> Self {
        Self {
            images,
            labels,
            shape: self.shape,
            num_classes: self.num_classes,
        }
    }
}

/// `0..len` as u32 indices, which is what `index_select` takes.
fn index_range(len: usize) -> Result<Vec<u32>> {
    let n = u32::try_from(len)
        .map_err(|_| Error::Invalid(format!("{len} examples exceed the u32 index range")))?;
    Ok((0..n).collect())
}

/// Iterator of (images (B, C*H*W) f32, labels (B,) u32) batches; built with index_select on a u32 index tensor (no per-element copies in Rust).
#[derive(Debug)]
pub struct Batches<'a> {
    dataset: &'a ImageDataset,
    order: Tensor,
    batch_size: usize,
    next: usize,
    len: usize,
}

impl Batches<'_> {
    /// Number of batches not yet yielded.
    fn remaining(&self) -> usize {
        (self.len - self.next).div_ceil(self.batch_size)
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.len {
            return None;
        }
        let size = self.batch_size.min(self.len - self.next);
        let start = self.next;
        self.next += size;
        let batch = (|| {
            let ids = self.order.narrow(0, start, size)?;
            let images = self.dataset.images.index_select(&ids, 0)?;
            let labels = self.dataset.labels.index_select(&ids, 0)?;
            Ok((images, labels))
        })();
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.remaining();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Batches<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use std::collections::BTreeSet;

    /// `n` 1x2x2 images whose four pixels all equal the example index, labelled `index % 3`.
    fn tagged(n: usize) -> ImageDataset {
        let images: Vec<u8> = (0..n).flat_map(|i| [i as u8; 4]).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
        ImageDataset::from_u8(&images, &labels, n, (1, 2, 2), 3, "tagged").unwrap()
    }

    /// Recovers each row's example index from its pixels.
    fn ids_of(images: &Tensor) -> Vec<u32> {
        let rows = images.to_vec2::<f32>().unwrap();
        rows.iter()
            .map(|r| {
                assert!(r.iter().all(|&p| p == r[0]), "pixels of a row differ");
                (r[0] * 255.0).round() as u32
            })
            .collect()
    }

    fn ids_of_dataset(d: &ImageDataset) -> Vec<u32> {
        ids_of(&d.images)
    }

    #[test]
    fn from_u8_scales_pixels_to_unit_interval() {
        let d = ImageDataset::from_u8(&[0, 255, 51, 102], &[1], 1, (1, 2, 2), 2, "t").unwrap();
        assert_eq!(d.len(), 1);
        assert!(!d.is_empty());
        assert_eq!(d.images.dims(), &[1, 4]);
        assert_eq!(d.images.dtype(), DType::F32);
        assert_eq!(d.labels.dtype(), DType::U32);
        let px = d.images.to_vec2::<f32>().unwrap();
        assert_eq!(px[0], vec![0.0, 1.0, 0.2, 0.4]);
    }

    #[test]
    fn label_not_below_num_classes_names_its_index() {
        let err = ImageDataset::from_u8(&[0; 12], &[0, 1, 10], 3, (1, 2, 2), 10, "lbl")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lbl") && err.contains("index 2") && err.contains("label 10"),
            "{err}"
        );
    }

    #[test]
    fn from_u8_rejects_empty_and_mismatched_lengths() {
        assert!(ImageDataset::from_u8(&[], &[], 0, (1, 2, 2), 3, "e").is_err());
        assert!(ImageDataset::from_u8(&[0; 7], &[0, 0], 2, (1, 2, 2), 3, "img").is_err());
        assert!(ImageDataset::from_u8(&[0; 8], &[0], 2, (1, 2, 2), 3, "lab").is_err());
    }

    #[test]
    fn subset_and_take_first_select_rows() {
        let d = tagged(10);
        assert_eq!(
            ids_of_dataset(&d.subset(&[7, 2, 2]).unwrap()),
            vec![7, 2, 2]
        );
        assert_eq!(ids_of_dataset(&d.take_first(4).unwrap()), vec![0, 1, 2, 3]);
        assert!(d.take_first(11).is_err());
        assert!(d.subset(&[10]).is_err());
        assert!(d.subset(&[]).is_err());
    }

    #[test]
    fn split_sizes_disjoint_and_covering() {
        let d = tagged(50);
        let (train, valid) = d.split(12, 7).unwrap();
        assert_eq!((train.len(), valid.len()), (38, 12));
        let t: BTreeSet<u32> = ids_of_dataset(&train).into_iter().collect();
        let v: BTreeSet<u32> = ids_of_dataset(&valid).into_iter().collect();
        assert_eq!(t.len(), 38);
        assert_eq!(v.len(), 12);
        assert!(t.is_disjoint(&v));
        let all: BTreeSet<u32> = t.union(&v).copied().collect();
        assert_eq!(all, (0..50).collect());
    }

    #[test]
    fn split_same_seed_same_split_different_seed_different() {
        let d = tagged(100);
        let a = ids_of_dataset(&d.split(20, 1).unwrap().1);
        let b = ids_of_dataset(&d.split(20, 1).unwrap().1);
        let c = ids_of_dataset(&d.split(20, 2).unwrap().1);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn split_rejects_degenerate_sizes() {
        let d = tagged(5);
        assert!(d.split(0, 1).is_err());
        assert!(d.split(5, 1).is_err());
    }

    #[test]
    fn batches_in_order_keep_last_partial_batch() {
        let d = tagged(10);
        let batches = d.batches(4, None).unwrap();
        assert_eq!(batches.len(), 3);
        let mut sizes = Vec::new();
        let mut ids = Vec::new();
        for b in batches {
            let (x, y) = b.unwrap();
            assert_eq!(x.dims()[1], 4);
            assert_eq!(x.dims()[0], y.dims()[0]);
            sizes.push(x.dims()[0]);
            ids.extend(ids_of(&x));
        }
        assert_eq!(sizes, vec![4, 4, 2]);
        assert_eq!(ids, (0..10).collect::<Vec<u32>>());
    }

    #[test]
    fn exact_size_len_counts_down() {
        let d = tagged(9);
        let mut b = d.batches(3, None).unwrap();
        assert_eq!(b.len(), 3);
        b.next();
        assert_eq!(b.len(), 2);
        assert_eq!(d.batches(20, None).unwrap().len(), 1);
        assert!(d.batches(0, None).is_err());
    }

    #[test]
    fn shuffled_batches_cover_each_example_once_with_aligned_labels() {
        let d = tagged(23);
        let mut rng = StdRng::seed_from_u64(42);
        let mut epochs = Vec::new();
        for _ in 0..2 {
            let mut ids = Vec::new();
            for b in d.batches(5, Some(&mut rng)).unwrap() {
                let (x, y) = b.unwrap();
                let xs = ids_of(&x);
                let ys = y.to_vec1::<u32>().unwrap();
                for (i, l) in xs.iter().zip(&ys) {
                    assert_eq!(i % 3, *l, "label not aligned with image {i}");
                }
                ids.extend(xs);
            }
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..23).collect::<Vec<u32>>());
            assert_ne!(
                ids, sorted,
                "shuffled order should differ from the identity"
            );
            epochs.push(ids);
        }
        assert_ne!(
            epochs[0], epochs[1],
            "each call should draw a new permutation"
        );
    }

    #[test]
    fn to_device_cpu_preserves_contents() {
        let d = tagged(4);
        let e = d.to_device(&Device::Cpu).unwrap();
        assert_eq!(ids_of_dataset(&e), vec![0, 1, 2, 3]);
        assert_eq!(e.shape, d.shape);
    }
}
