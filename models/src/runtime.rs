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

/// Flushes subnormal floats to zero (FTZ and DAZ on x86-64, FZ on AArch64) on the calling thread
/// and on every thread of rayon's global pool, which this builds (so call it before anything runs
/// on that pool; `RAYON_NUM_THREADS` still sets its size). Training makes subnormals in bulk — the
/// softmax of a confident model over a 4,000-token vocabulary is mostly 1e-39-sized entries, and
/// its gradient goes through the output projection's matrix products — and x86 cores take a
/// microcode assist for each of them: a translation Transformer step ran 2.3× slower without this
/// (docs/PERFORMANCE.md). Values that were not subnormal compute exactly as before. Returns
/// whether the pool was built here (false if something else built it first; its threads then keep
/// subnormals).
pub fn flush_denormals() -> bool {
    flush_denormals_on_this_thread();
    rayon::ThreadPoolBuilder::new()
        .start_handler(|_| flush_denormals_on_this_thread())
        .build_global()
        .is_ok()
}

/// Sets the calling thread's floating-point control register to flush subnormals to zero.
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
    use super::flush_denormals_on_this_thread;

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
}
