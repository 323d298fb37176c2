//! An in-memory labelled image dataset with seeded splits, batching and per-channel normalization.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// An in-memory labelled image dataset on the CPU.
#[derive(Clone, Debug)]
pub struct ImageDataset {
    /// Images as (N, C*H*W) f32, each row (C, H, W) row-major; values in [0, 1] as loaded,
    /// centred per channel after [`ImageDataset::normalize`].
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

    /// Per-channel mean and (population) standard deviation of the pixels, computed in f64.
    ///
    /// Compute these on the training split and pass them to [`ImageDataset::normalize`] for every
    /// split: statistics from validation or test data would leak them into training. A constant
    /// channel has standard deviation 0, which `normalize` rejects.
    pub fn channel_stats(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let (c, h, w) = self.shape;
        let plane = h * w;
        let n = self.len();
        if n == 0 || c == 0 || plane == 0 {
            return Err(Error::Invalid(format!(
                "channel_stats: dataset of {n} images of shape {:?} has no pixels",
                self.shape
            )));
        }
        self.check_image_dims("channel_stats")?;
        let images = self.images.to_device(&Device::Cpu)?;
        // Per channel: mean and sum of squared deviations (M2), merged chunk by chunk (Chan et
        // al.), so there is no host copy of the whole tensor and no E[x²]−E[x]² cancellation.
        let mut count = 0f64;
        let mut mean = vec![0f64; c];
        let mut m2 = vec![0f64; c];
        for start in (0..n).step_by(STATS_CHUNK_ROWS) {
            let rows = STATS_CHUNK_ROWS.min(n - start);
            let chunk = images
                .narrow(0, start, rows)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let k = (rows * plane) as f64;
            for ch in 0..c {
                let values = chunk
                    .chunks_exact(c * plane)
                    .flat_map(|image| &image[ch * plane..(ch + 1) * plane]);
                let chunk_mean = values.clone().map(|&v| f64::from(v)).sum::<f64>() / k;
                let chunk_m2: f64 = values.map(|&v| (f64::from(v) - chunk_mean).powi(2)).sum();
                let total = count + k;
                let delta = chunk_mean - mean[ch];
                mean[ch] += delta * k / total;
                m2[ch] += chunk_m2 + delta * delta * count * k / total;
            }
            count += k;
        }
        let mean_f32 = mean.iter().map(|&m| m as f32).collect();
        let std_f32 = m2.iter().map(|&s| (s / count).sqrt() as f32).collect();
        Ok((mean_f32, std_f32))
    }

    /// A copy with every pixel of channel c replaced by (x − mean[c]) / std[c].
    ///
    /// Use the training split's [`ImageDataset::channel_stats`] for all splits, so train, valid
    /// and test go through the same transform. `mean` and `std` need one finite entry per
    /// channel, and every `std` must be positive.
    pub fn normalize(&self, mean: &[f32], std: &[f32]) -> Result<Self> {
        let (c, h, w) = self.shape;
        if mean.len() != c || std.len() != c {
            return Err(Error::Invalid(format!(
                "normalize: {c} channels need {c} means and {c} stds, got {} and {}",
                mean.len(),
                std.len()
            )));
        }
        if let Some((ch, &m)) = mean.iter().enumerate().find(|(_, m)| !m.is_finite()) {
            return Err(Error::Invalid(format!(
                "normalize: mean {m} of channel {ch} is not finite"
            )));
        }
        // A negated positive test, so NaN is rejected too.
        if let Some((ch, &s)) = std
            .iter()
            .enumerate()
            .find(|(_, &s)| !(s > 0.0 && s.is_finite()))
        {
            return Err(Error::Invalid(format!(
                "normalize: std {s} of channel {ch} must be positive and finite"
            )));
        }
        self.check_image_dims("normalize")?;
        let device = self.images.device();
        let n = self.len();
        let mean_t = Tensor::from_slice(mean, (1, c, 1), device)?;
        let std_t = Tensor::from_slice(std, (1, c, 1), device)?;
        let images = self
            .images
            .reshape((n, c, h * w))?
            .broadcast_sub(&mean_t)?
            .broadcast_div(&std_t)?
            .reshape((n, c * h * w))?;
        Ok(self.with_tensors(images, self.labels.clone()))
    }

    /// Checks that `images` is (N, C*H*W) f32 for `shape`, since the fields are public.
    fn check_image_dims(&self, what: &str) -> Result<()> {
        let (c, h, w) = self.shape;
        let expected = [self.len(), c * h * w];
        if self.images.dims() != expected || self.images.dtype() != DType::F32 {
            return Err(Error::Invalid(format!(
                "{what}: images are {:?} {:?}, expected {expected:?} f32 for shape {:?}",
                self.images.dims(),
                self.images.dtype(),
                self.shape
            )));
        }
        Ok(())
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

/// Rows per host copy in [`ImageDataset::channel_stats`]: about 12 MB for CIFAR-sized images.
const STATS_CHUNK_ROWS: usize = 1024;

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
