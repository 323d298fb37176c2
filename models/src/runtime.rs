//! Process-wide settings of candle's CPU backend, made by a binary before any thread starts.

/// Runs candle's element-wise CPU ops on the calling thread: sets `CANDLE_NUM_THREADS=1` unless
/// the user set it. candle 0.11 spreads element-wise ops (the gradient additions of every
/// backward pass among them) over a pool of its own whose threads spin for a while after each
/// op; beside rayon's pool, which runs the matrix products and this crate's fused ops, they take
/// cores those need: a training step with 2 threads ran 1.2–1.25× faster without them (docs/
/// PERFORMANCE.md). Call it at the start of `main`, before any other thread exists (changing
/// the environment is only sound then).
pub fn elementwise_on_caller() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs `f` — a binary's whole command — on a rayon pool whose threads flush subnormal floats to
/// zero, and returns its result. `RAYON_NUM_THREADS` sets the pool's size, as for rayon's global
/// pool; every parallel op inside `f` (matrix products, the fused ops) runs on it.
///
/// Why on the pool rather than beside it: a caller outside the pool waits while the pool's
/// threads work and then runs the element-wise ops between products itself, while the pool's
/// threads spin for a while before sleeping — with as many pool threads as cores, three threads
/// share two cores and a two-thread training step got slower than a one-thread one. Inside the
/// pool the command's thread is one of its workers.
///
/// Why flush subnormals: training makes them in bulk — the softmax of a confident model over a
/// 4,000-token vocabulary is mostly 1e-39-sized entries, and its gradient goes through the output
/// projection's matrix products — and x86 cores take a microcode assist for each one: a
/// translation Transformer step ran 2.3× slower without flushing (docs/PERFORMANCE.md). Values
/// that are not subnormal compute exactly as before.
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new()
        // The main thread's size: the command no longer runs there.
        .stack_size(8 << 20)
        .start_handler(|_| flush_denormals_on_this_thread())
        .build()
    {
        Ok(pool) => pool.install(f),
        // No threads to be had: run where we are, still without subnormals.
        Err(_) => {
            flush_denormals_on_this_thread();
            f()
        }
    }
}

/// Sets the calling thread's floating-point control register to flush subnormals to zero (FTZ and
/// DAZ on x86-64, FZ on AArch64); [`run_on_pool`] does it for every thread of its pool.
pub fn flush_denormals_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    {
        // FTZ (bit 15): subnormal results become zero; DAZ (bit 6): subnormal inputs read as zero.
        #[allow(deprecated)]
        // SAFETY: only the flush bits of MXCSR change; rounding and exception masks are kept.
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | 0x8040);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: sets FPCR.FZ (bit 24) only.
        unsafe {
            let mut fpcr: u64;
            std::arch::asm!("mrs {}, fpcr", out(reg) fpcr);
            fpcr |= 1 << 24;
            std::arch::asm!("msr fpcr, {}", in(reg) fpcr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{flush_denormals_on_this_thread, run_on_pool};

    /// The vendored candle-core splits large copies of many blocks (a transpose made
    /// contiguous) over the caller's rayon pool: the same elements as one thread, in place.
    #[test]
    fn a_large_transpose_made_contiguous_on_a_pool_is_the_same_copy() {
        use candle_core::{Device, Tensor};
        let (b, t, h, d) = (8, 70, 6, 32);
        let n = b * t * h * d;
        let x = Tensor::arange(0u32, n as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .reshape((b, t, h, d))
            .unwrap();
        let mut want = Vec::with_capacity(n);
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    for di in 0..d {
                        want.push((((bi * t + ti) * h + hi) * d + di) as f32);
                    }
                }
            }
        }
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| {
                let y = x.transpose(1, 2).unwrap().contiguous().unwrap();
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            });
            assert!(got == want, "{threads} threads: wrong copy");
        }
    }

    #[test]
    fn subnormal_products_become_zero_once_flushing_is_on() {
        // A thread of its own, so the test harness's other threads keep the default.
        std::thread::spawn(|| {
            let tiny = std::hint::black_box(1e-20_f32);
            assert!(
                tiny * tiny > 0.0,
                "without flushing, 1e-40 is a subnormal, not zero"
            );
            flush_denormals_on_this_thread();
            assert_eq!(std::hint::black_box(tiny) * tiny, 0.0);
            let normal = std::hint::black_box(1.5_f32);
            assert_eq!(normal * 2.0, 3.0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn run_on_pool_runs_the_command_on_a_pool_thread_that_flushes_subnormals() {
        let (on_pool, product) = run_on_pool(|| {
            let tiny = std::hint::black_box(1e-20_f32);
            (rayon::current_thread_index().is_some(), tiny * tiny)
        });
        assert!(on_pool, "the command runs on one of the pool's workers");
        assert_eq!(product, 0.0);
    }
}
