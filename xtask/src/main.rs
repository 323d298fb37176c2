//! `cargo xtask`: relprune's orchestrator (reproductions, benchmarks, maintenance tasks).

mod ablate;
mod bench;
mod classify;
mod crossover;
mod flags;
mod reproduce;
mod translate;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    keep_large_buffers_in_the_heap();
    let flags = flags::Xtask::parse();
    if let Some(n) = flags.threads {
        set_threads(n);
    }
    // Run from the workspace root, whatever directory cargo was called in.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("xtask is not inside the workspace"))?;
    std::env::set_current_dir(root)?;
    match flags.cmd {
        flags::Cmd::Reproduce(f) => reproduce::run(*f),
        flags::Cmd::Bench(f) => bench::run(f),
        flags::Cmd::Ablate(f) => ablate::run(f),
        flags::Cmd::Crossover(f) => crossover::run(f),
        flags::Cmd::EmbedMnist(f) => {
            let out = root.join("crates/relprune-data/embedded");
            relprune_data::mnist::write_embedded_subset(&f.mnist, &out, f.train, f.test)?;
            println!(
                "wrote {} training and {} test images to {}",
                f.train,
                f.test,
                out.display()
            );
            Ok(())
        }
    }
}

/// candle allocates and frees tensor storage every step; glibc would map and unmap each buffer
/// over its mmap threshold anew, paying a page fault per page (≈ 18% of a LeNet-5 epoch).
fn keep_large_buffers_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        // 32 MiB is glibc's upper limit for the threshold on 64-bit systems.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn set_threads(n: usize) {
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // No other thread exists yet, so changing the environment is sound.
            std::env::set_var(var, n.to_string());
        }
    }
}
