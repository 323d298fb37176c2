//! `cargo xtask cifar-epoch`: how long one CIFAR-10 training epoch of ResNet-32 and VGG-16 takes
//! on this machine, for the CIFAR plan of docs/RESULTS.md.
//!
//! CIFAR-10 cannot be downloaded here, and the cost of a step does not depend on the pixels, so
//! seeded random CIFAR-shaped images stand in; the step is the pruning phase's (the preset's
//! batch, crop + flip augmentation, SGD with momentum and the selective-decay regularizer).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use relprune_data::ImageDataset;
use relprune_prune::{MaskedSgd, Masks, ParamSet, SgdConfig, Trainer};
use relprune_tasks::ImageClassification;

use crate::classify::{Config, Net};
use crate::flags::{self, CifarModel};
use crate::results::EpochTime;

pub fn run(f: flags::CifarEpoch) -> Result<()> {
    let mut times = Vec::new();
    for &model in &f.models {
        let t = measure(model, f.images)?;
        eprintln!(
            "{}: {} images in {:.1} s -> {:.0} s per epoch of 45,000",
            t.model, t.images, t.seconds, t.epoch_seconds
        );
        times.push(t);
    }
    let json = serde_json::to_string_pretty(&times)? + "\n";
    if let Some(dir) = f.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    relprune_io::write(&f.out, json.as_bytes())?;
    println!("wrote {}", f.out.display());
    Ok(())
}

/// Times `images` random training images of `model` through the pruning phase's step.
fn measure(model: CifarModel, images: usize) -> Result<EpochTime> {
    let cfg = Config::preset(model.experiment(), false)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let pixels: Vec<u8> = (0..images * 3 * 32 * 32).map(|_| rng.random()).collect();
    let labels: Vec<u8> = (0..images).map(|_| rng.random_range(0..10)).collect();
    let data = ImageDataset::from_u8(&pixels, &labels, images, (3, 32, 32), 10, "random images")?;
    let small = data.take_first(cfg.batch_size.min(images))?;
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let net = Net::new(&cfg.model, &varmap, cfg.seed, &device)?;
    let mut task = ImageClassification::new(net, data, small.clone(), small, cfg.batch_size, 0);
    task.augment = Some(relprune_data::Augment::CIFAR10);
    let params = ParamSet::from_varmap(&varmap, &cfg.selection)?;
    let masks = Masks::dense(&params)?;
    let sgd = SgdConfig {
        lr: cfg.prune.lr,
        momentum: cfg.momentum,
        nesterov: false,
    };
    let reg = Some(cfg.prune.regularizer);
    let mut trainer = Trainer::new(params, masks, MaskedSgd::new(sgd, reg)?)?;
    trainer.quiet = true;
    let t0 = Instant::now();
    trainer.train_epoch(&mut task, 1, None)?;
    let seconds = t0.elapsed().as_secs_f64();
    let train_images = 50_000 - cfg.n_valid;
    Ok(EpochTime {
        model: cfg.model.clone(),
        images,
        seconds,
        epoch_seconds: seconds * train_images as f64 / images as f64,
        threads: crate::bench_steps::threads(),
        cpu: cpu_name(),
        command: crate::reproduce::command_line(),
    })
}

/// The CPU's model name (Linux), or `unknown`.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_is_the_timed_images_scaled_to_the_45000_of_the_full_configuration() {
        let t = measure(CifarModel::Resnet32, 4).unwrap();
        assert_eq!((t.model.as_str(), t.images), ("resnet32", 4));
        assert!(t.seconds > 0.0);
        assert!((t.epoch_seconds - t.seconds * 45_000.0 / 4.0).abs() < 1e-9 * t.epoch_seconds);
        assert!(t.command.starts_with("cargo xtask"), "{}", t.command);
    }
}
