//! `cargo xtask`: relprune's orchestrator (reproductions, benchmarks, maintenance tasks).

mod ablate;
mod bench;
mod bench_infer;
mod bench_steps;
mod cifar_epoch;
mod classify;
mod crossover;
mod flags;
mod fuzz;
mod kill_resume;
mod llm;
mod reproduce;
mod results;
mod translate;

fn main() -> anyhow::Result<()> {
    relprune_models::runtime::elementwise_on_caller();
    relprune_hf::memory::keep_large_buffers();
    let flags = flags::parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    if let Some(n) = flags.threads {
        set_threads(n);
    }
    relprune_models::runtime::run_on_pool(|| run(flags))
}

fn run(flags: flags::Xtask) -> anyhow::Result<()> {
    // Run from the workspace root, whatever directory cargo was called in.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("xtask is not inside the workspace"))?;
    std::env::set_current_dir(root)?;
    match flags.cmd {
        flags::Cmd::Reproduce(f) => reproduce::run(*f),
        flags::Cmd::Bench(f) => bench::run(f),
        flags::Cmd::Ablate(f) => ablate::run(f),
        flags::Cmd::Fuzz(f) => fuzz::run(f),
        flags::Cmd::KillResume(f) => kill_resume::run(f),
        flags::Cmd::Crossover(f) => crossover::run(f),
        flags::Cmd::LlmBaselines(f) => llm::run(f),
        flags::Cmd::Results(f) => results::run(f),
        flags::Cmd::CifarEpoch(f) => cifar_epoch::run(f),
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

fn set_threads(n: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // No other thread exists yet, so changing the environment is sound.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
