//! Dropout whose masks come from a seeded generator.
//!
//! candle's `ops::dropout` draws its mask from the device's generator, which cannot be seeded
//! on the CPU, so training with it is not reproducible. A [`DropoutRng`] is shared by a model's
//! layers; [`DropoutRng::reseed`] starts a stream of masks that depends only on the model's seed
//! and the stream number, so a trainer reseeding it every epoch replays the same masks on the
//! same run, and a run resumed at an epoch boundary continues as if never stopped.
//!
//! A mask is drawn in fixed chunks in parallel: the `i`-th mask since the last reseed takes
//! ChaCha12 stream `i` of the (seed, stream number) key, and chunk `j` of it starts at word
//! `j·CHUNK` of that stream, so the masks are the same whatever the thread count (a serial draw
//! took a few % of a Transformer training step on two threads).

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// Mask elements per parallel task (and per generator position jump).
const CHUNK: usize = 1 << 14;

/// The shared, seedable generator of a model's dropout masks.
#[derive(Clone, Debug)]
pub struct DropoutRng {
    seed: u64,
    /// The stream number of the last reseed and the masks drawn since.
    state: Arc<Mutex<(u64, u64)>>,
}

impl DropoutRng {
    /// A generator for the model seeded with `seed`, on stream 0.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            state: Arc::new(Mutex::new((0, 0))),
        }
    }

    fn key(seed: u64, stream: u64) -> [u8; 32] {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&stream.to_le_bytes());
        // Marks the key as dropout's, apart from any other use of the same seed.
        key[16..24].copy_from_slice(b"dropout\0");
        key
    }

    /// Restarts the masks at stream `stream` (e.g. the epoch number) of this model's seed.
    pub fn reseed(&self, stream: u64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (stream, 0);
    }

    /// `x` with each element zeroed with probability `p` and the rest scaled by `1/(1-p)` when
    /// `train` and `p > 0`; `x` itself otherwise.
    pub fn apply(&self, x: &Tensor, p: f32, train: bool) -> candle_core::Result<Tensor> {
        if !train || p <= 0.0 {
            return Ok(x.clone());
        }
        if p >= 1.0 {
            return x.zeros_like();
        }
        let cut = (p as f64 * 4_294_967_296.0) as u64;
        let scale = 1.0 / (1.0 - p);
        let (stream, draw) = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.1 += 1;
            (st.0, st.1 - 1)
        };
        let key = Self::key(self.seed, stream);
        let fill = |at: usize, out: &mut [std::mem::MaybeUninit<f32>]| {
            let mut rng = ChaCha12Rng::from_seed(key);
            rng.set_stream(draw);
            rng.set_word_pos(at as u128);
            for v in out {
                v.write(if (rng.next_u32() as u64) < cut {
                    0.0
                } else {
                    scale
                });
            }
        };
        // SAFETY: `fill` writes every element of its chunk.
        let mask = unsafe { crate::ops::filled_in_chunks(x.elem_count(), CHUNK, fill) };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// The dropout of one place in a model (attention weights, a sub-layer's output).
#[derive(Clone, Debug, Default)]
pub enum Dropout {
    /// None.
    #[default]
    Off,
    /// candle's dropout with this probability (its CPU generator cannot be seeded).
    Unseeded(f64),
    /// Masks from the model's seeded generator, with this probability.
    Seeded(DropoutRng, f32),
}

impl Dropout {
    /// Whether [`Self::apply`] changes anything (draws a mask) when `train`.
    pub fn active(&self, train: bool) -> bool {
        train
            && match self {
                Self::Off => false,
                Self::Unseeded(p) => *p > 0.0,
                Self::Seeded(_, p) => *p > 0.0,
            }
    }

    /// `x` after this dropout when `train`; `x` itself otherwise.
    pub fn apply(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Self::Off => Ok(x.clone()),
            Self::Unseeded(p) => unseeded(x, if train { *p } else { 0.0 }),
            Self::Seeded(rng, p) => rng.apply(x, *p, train),
        }
    }
}

/// Inverted dropout by candle's generator (kept values scaled by 1/(1-p)); the identity, without
/// a random draw, at p = 0.
pub fn unseeded(x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
    if p > 0.0 {
        candle_nn::ops::dropout(x, p as f32)
    } else {
        Ok(x.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ones(n: usize) -> Tensor {
        Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_reseeded_stream_replays_the_same_masks_and_another_stream_differs() {
        let d = DropoutRng::new(7);
        d.reseed(3);
        let a = d
            .apply(&ones(1000), 0.3, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = d
            .apply(&ones(1000), 0.3, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(a, b, "successive masks of one stream must differ");
        d.reseed(3);
        let again = d
            .apply(&ones(1000), 0.3, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, again);
        d.reseed(4);
        let other = d
            .apply(&ones(1000), 0.3, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(a, other);
        let seed8 = DropoutRng::new(8);
        seed8.reseed(3);
        let other = seed8
            .apply(&ones(1000), 0.3, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(a, other);
    }

    #[test]
    fn dropout_drops_about_p_and_keeps_the_expectation() {
        let d = DropoutRng::new(1);
        let v = d
            .apply(&ones(100_000), 0.1, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "{dropped}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
    }

    #[test]
    fn masks_do_not_depend_on_the_number_of_threads() {
        let draw = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let d = DropoutRng::new(5);
                d.reseed(2);
                let x = ones(5 * CHUNK + 17);
                let a = d.apply(&x, 0.2, true).unwrap().to_vec1::<f32>().unwrap();
                let b = d.apply(&x, 0.2, true).unwrap().to_vec1::<f32>().unwrap();
                (a, b)
            })
        };
        let (one, three) = (draw(1), draw(3));
        assert!(one == three, "masks differ between 1 and 3 threads");
        // Chunks start at their own positions: no two chunks repeat one another.
        assert_ne!(one.0[..CHUNK], one.0[CHUNK..2 * CHUNK]);
        assert_ne!(one.0, one.1);
    }

    #[test]
    fn outside_training_or_at_zero_dropout_the_input_passes_unchanged() {
        let d = DropoutRng::new(1);
        let x = ones(10);
        for (p, train) in [(0.5, false), (0.0, true)] {
            let y = d.apply(&x, p, train).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(y, vec![1.0; 10]);
        }
    }
}
