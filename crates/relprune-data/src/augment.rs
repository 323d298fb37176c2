//! Seeded training-time augmentation: zero-padded random crops and random horizontal flips.

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::error::{Error, Result};

/// Random crop after zero padding, and optional horizontal flip with probability 1/2.
///
/// Each image is padded by `pad` zeros on every side and an H×W window is cut at a uniformly
/// random offset, i.e. shifted by (dy, dx) ∈ [−pad, pad]² with the uncovered border zero; then,
/// if `flip`, it is mirrored left–right with probability 1/2. The zeros are zeros in whatever
/// space the images are in: black for [0, 1] pixels, the channel mean after
/// [`crate::ImageDataset::normalize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Augment {
    /// Zero padding on each side before the crop; 0 disables cropping.
    pub pad: usize,
    /// Whether to mirror each image horizontally with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// The standard CIFAR-10 recipe: pad 4, random 32×32 crop, random horizontal flip.
    pub const CIFAR10: Augment = Augment { pad: 4, flip: true };

    /// Whether `apply` returns its input unchanged (no padding, no flip).
    pub fn is_identity(&self) -> bool {
        self.pad == 0 && !self.flip
    }

    /// Augments a batch of f32 images, (B, C*H*W) or (B, C, H, W) with `shape` = (C, H, W),
    /// returning the same layout on the same device.
    ///
    /// Per image, in batch order, it draws the row shift, the column shift (each only if
    /// `pad` > 0) and the flip (only if `flip`) from `rng`, so a seeded rng gives the same output.
    pub fn apply(
        &self,
        images: &Tensor,
        shape: (usize, usize, usize),
        rng: &mut impl Rng,
    ) -> Result<Tensor> {
        let (c, h, w) = shape;
        let per_image = c * h * w;
        let dims = images.dims();
        let batch = match *dims {
            [b, d] if d == per_image => b,
            [b, dc, dh, dw] if (dc, dh, dw) == shape => b,
            _ => {
                return Err(Error::Invalid(format!(
                    "augment: images {dims:?} are neither (B, {per_image}) nor (B, {c}, {h}, {w}) \
                     for shape {shape:?}"
                )))
            }
        };
        if images.dtype() != DType::F32 {
            return Err(Error::Invalid(format!(
                "augment: images must be f32, got {:?}",
                images.dtype()
            )));
        }
        if self.is_identity() || batch == 0 || per_image == 0 {
            return Ok(images.clone());
        }
        let src = images
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut out = vec![0f32; src.len()];
        // rand 0.9 samples no isize (its range would be platform dependent), so draw i64.
        let pad = i64::try_from(self.pad)
            .map_err(|_| Error::Invalid(format!("augment: pad {} is too large", self.pad)))?;
        for (src_img, out_img) in src
            .chunks_exact(per_image)
            .zip(out.chunks_exact_mut(per_image))
        {
            let (dy, dx) = if pad > 0 {
                (
                    rng.random_range(-pad..=pad) as isize,
                    rng.random_range(-pad..=pad) as isize,
                )
            } else {
                (0, 0)
            };
            let mirror = self.flip && rng.random_bool(0.5);
            shift_image(src_img, out_img, (c, h, w), dy, dx, mirror);
        }
        Ok(Tensor::from_vec(out, dims, images.device())?)
    }
}

/// Writes into `out` (all zeros) the image `src` shifted so that out(y, x) = src(y + dy, x' + dx),
/// where x' = W−1−x when mirrored and x otherwise; pixels whose source falls outside stay zero.
///
/// Works a row at a time on the in-range span, so the inner loop is a slice copy (or a reversed
/// one) with no per-pixel bounds logic.
fn shift_image(
    src: &[f32],
    out: &mut [f32],
    (c, h, w): (usize, usize, usize),
    dy: isize,
    dx: isize,
    mirror: bool,
) {
    let (hi, wi) = (h as isize, w as isize);
    // Output rows y with 0 <= y + dy < H.
    let (y0, y1) = (0.max(-dy), hi.min(hi - dy));
    // Output columns x with a source column in range: x + dx (plain) or W−1−x + dx (mirrored).
    let (x0, x1) = if mirror {
        (0.max(dx), wi.min(wi + dx))
    } else {
        (0.max(-dx), wi.min(wi - dx))
    };
    if y0 >= y1 || x0 >= x1 {
        return;
    }
    let (x0u, x1u) = (x0 as usize, x1 as usize);
    // Source columns covered, as a half-open range; read backwards when mirrored.
    let (s0, s1) = if mirror {
        ((wi - x1 + dx) as usize, (wi - x0 + dx) as usize)
    } else {
        ((x0 + dx) as usize, (x1 + dx) as usize)
    };
    for ch in 0..c {
        let plane = ch * h * w;
        for y in y0..y1 {
            let out_row = plane + y as usize * w;
            let src_row = plane + (y + dy) as usize * w;
            let dst = &mut out[out_row + x0u..out_row + x1u];
            let from = &src[src_row + s0..src_row + s1];
            if mirror {
                dst.iter_mut()
                    .zip(from.iter().rev())
                    .for_each(|(d, s)| *d = *s);
            } else {
                dst.copy_from_slice(from);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive per-pixel reference for [`shift_image`].
    fn reference(
        src: &[f32],
        shape: (usize, usize, usize),
        dy: isize,
        dx: isize,
        mirror: bool,
    ) -> Vec<f32> {
        let (c, h, w) = shape;
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

    #[test]
    fn shift_image_matches_naive_reference_for_every_shift_and_mirror() {
        let shape = (2, 3, 5);
        let src: Vec<f32> = (1..=30).map(|v| v as f32).collect();
        for dy in -4..=4 {
            for dx in -6..=6 {
                for mirror in [false, true] {
                    let mut out = vec![0f32; src.len()];
                    shift_image(&src, &mut out, shape, dy, dx, mirror);
                    assert_eq!(
                        out,
                        reference(&src, shape, dy, dx, mirror),
                        "dy {dy} dx {dx} mirror {mirror}"
                    );
                }
            }
        }
    }
}
