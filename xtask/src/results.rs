//! `cargo xtask results`: docs/RESULTS.md, every recorded full run beside the published
//! anchors, regenerated from the recorded `results/<run>/results.json` files.
//!
//! A run is recorded (`--record DIR`, or `cargo xtask reproduce NAME --record`) by copying its
//! results.json, report.md and plots into `results/<experiment>` (or `<experiment>-<label>` for a
//! probe beside the headline run) once the counts in results.json have been checked against the
//! run's saved model file. The table is then a pure function of those records, so a test can
//! check that docs/RESULTS.md is what they give.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use relprune_eval::{RunResults, SparsityReport};
use serde::{Deserialize, Serialize};

use crate::flags;
use crate::reproduce::{experiments, ANCHORS, ANCHOR_SOURCE};

/// The directory of recorded runs, relative to the workspace root.
pub const RECORDS: &str = "results";
/// The generated table, relative to the workspace root.
pub const TABLE: &str = "docs/RESULTS.md";
/// The measured CIFAR-10 epoch times (written by `cargo xtask cifar-epoch`), inside [`RECORDS`].
pub const CIFAR_EPOCHS: &str = "cifar-epochs.json";

pub fn run(f: flags::Results) -> Result<()> {
    if let Some(label) = &f.label {
        check_label(label)?;
    }
    if f.label.is_some() && f.record.len() != 1 {
        bail!("--label names one recorded run: give exactly one --record DIR with it");
    }
    for dir in &f.record {
        let to = record(dir, &f.dir, f.label.as_deref())?;
        eprintln!("recorded {} as {}", dir.display(), to.display());
    }
    let md = table_for(&f.dir, &f.out)?;
    if f.check {
        let on_disk = std::fs::read_to_string(&f.out)
            .with_context(|| format!("{}: cannot read", f.out.display()))?;
        if on_disk != md {
            bail!(
                "{} is not what the records in {} give: run `cargo xtask results`",
                f.out.display(),
                f.dir.display()
            );
        }
        println!("{} is up to date", f.out.display());
        return Ok(());
    }
    relprune_io::write(&f.out, md.as_bytes())?;
    println!("wrote {}", f.out.display());
    Ok(())
}

/// The table of the records in `dir`, as written to `out` (links relative to it).
fn table_for(dir: &Path, out: &Path) -> Result<String> {
    render(dir, &relative(out.parent().unwrap_or(Path::new("")), dir)?)
}

/// Records the finished run in `run` under [`RECORDS`] and regenerates [`TABLE`]: what
/// `cargo xtask reproduce --record` does after the run.
pub fn record_and_regenerate(run: &Path) -> Result<()> {
    let (dir, out) = (Path::new(RECORDS), Path::new(TABLE));
    let to = record(run, dir, None)?;
    relprune_io::write(out, table_for(dir, out)?.as_bytes())?;
    eprintln!(
        "recorded {} as {}; wrote {}",
        run.display(),
        to.display(),
        out.display()
    );
    Ok(())
}

/// `to` as seen from the directory `from` (both taken from the current directory), for links.
fn relative(from: &Path, to: &Path) -> Result<PathBuf> {
    let (from, to) = (std::path::absolute(from)?, std::path::absolute(to)?);
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut rel: PathBuf = a[common..].iter().map(|_| "..").collect();
    rel.extend(&b[common..]);
    Ok(rel)
}

/// A label keeps record directories plain names: lowercase letters, digits, `.` and `-`.
fn check_label(label: &str) -> Result<()> {
    let ok = !label.is_empty()
        && label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    if !ok {
        bail!("--label {label:?}: use lowercase letters, digits, '.' and '-' only");
    }
    Ok(())
}

/// Records the finished full run in `run` under `records/<experiment>[-label]`, after checking
/// that its saved model file holds exactly the non-zeros its results.json reports; returns the
/// record's directory. Quick runs are refused: the table is of full configurations.
pub fn record(run: &Path, records: &Path, label: Option<&str>) -> Result<PathBuf> {
    let json = run.join("results.json");
    let r = RunResults::read_json(&json)?;
    if r.config.get("quick").and_then(|q| q.as_bool()) == Some(true) {
        bail!(
            "{}: a quick run; the results table records full configurations only",
            json.display()
        );
    }
    if !experiments().iter().any(|e| e.name == r.experiment) {
        bail!(
            "{}: unknown experiment {:?} (see `cargo xtask reproduce --list`)",
            json.display(),
            r.experiment
        );
    }
    let model = run.join(&r.model_file);
    let names: Vec<String> = r.layers.iter().map(|l| l.name.clone()).collect();
    let counted = SparsityReport::from_safetensors(&model, &names)?;
    if counted.layers != r.layers {
        bail!(
            "{}: the counts in {} are not those of the model file",
            model.display(),
            json.display()
        );
    }
    let total = counted.total();
    if (total.params, total.nonzero) != (r.pruned.params, r.pruned.nonzero) {
        bail!(
            "{}: {} of {} weights non-zero, but {} says {} of {}",
            model.display(),
            total.nonzero,
            total.params,
            json.display(),
            r.pruned.nonzero,
            r.pruned.params
        );
    }
    let name = match label {
        Some(l) => format!("{}-{l}", r.experiment),
        None => r.experiment.clone(),
    };
    let to = records.join(name);
    std::fs::create_dir_all(&to).with_context(|| format!("{}: cannot create", to.display()))?;
    for entry in std::fs::read_dir(run).with_context(|| format!("{}", run.display()))? {
        let path = entry?.path();
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let keep = file == "results.json" || file == "report.md" || file.ends_with(".svg");
        if keep && path.is_file() {
            let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
            relprune_io::write(&to.join(file), &bytes)?;
        }
    }
    Ok(to)
}

/// One CIFAR-10 training epoch measured on this machine (`cargo xtask cifar-epoch`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochTime {
    /// `resnet32` or `vgg16`.
    pub model: String,
    /// Training images timed (random CIFAR-shaped images: the cost does not depend on them).
    pub images: usize,
    /// Seconds those images took, forward, backward and the regularized update.
    pub seconds: f64,
    /// Seconds of one epoch of the full configuration's 45,000 training images.
    pub epoch_seconds: f64,
    /// Threads used.
    pub threads: usize,
    /// The CPU, from /proc/cpuinfo.
    pub cpu: String,
    /// The command that measured it.
    pub command: String,
}

/// Every experiment's row, the probes, the anchors and the CIFAR plan, from the records in `dir`
/// (which the table's links reach as `link`).
pub fn render(dir: &Path, link: &Path) -> Result<String> {
    let mut headline = Vec::new();
    let mut missing = Vec::new();
    for exp in experiments() {
        let json = dir.join(exp.name).join("results.json");
        if json.is_file() {
            headline.push((exp.name.to_string(), RunResults::read_json(&json)?));
        } else if !exp.needs_cifar {
            missing.push(exp.name);
        }
    }
    let mut probes = Vec::new();
    if dir.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !headline.iter().any(|(h, _)| h == n))
            .collect();
        names.sort();
        for name in names {
            let json = dir.join(&name).join("results.json");
            if json.is_file() {
                probes.push((name, RunResults::read_json(&json)?));
            }
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let rec = format!("[`{name}/`]({})", link.display());
    let mut md = format!(
        "# Results\n\n\
         Generated by `cargo xtask results` from the recorded runs in {rec}: do not edit, record a \
         run and regenerate. Every figure below is read from the `results.json` its row links to, \
         written by the command in that row; the counts are those of the run's saved model file \
         (counted when the run finished, and counted again from the file when it was recorded). \
         Compression is over the pruned weight tensors (biases and norms are not pruned and not \
         counted). To record a run: `cargo xtask reproduce NAME --record` (or `cargo xtask results \
         --record RUN_DIR [--label L]`).\n\n## Full runs\n\n"
    );
    if headline.is_empty() {
        md.push_str("No full run recorded yet.\n");
    } else {
        md.push_str(&table(&headline, link)?);
    }
    if !missing.is_empty() {
        md.push_str("\nNot recorded yet (no full run in this format): ");
        let list: Vec<String> = missing
            .iter()
            .map(|n| format!("`{n}` (`cargo xtask reproduce {n} --record`)"))
            .collect();
        md.push_str(&list.join(", "));
        md.push_str(".\n");
    }
    if !headline.is_empty() {
        md.push_str("\nWhere the weights are left:\n\n");
    }
    for (name, r) in &headline {
        md.push_str(&format!(
            "- `{name}`: {}\n",
            layers_line(r, dir, name, link)
        ));
    }
    if !probes.is_empty() {
        md.push_str(
            "\n## Other recorded runs\n\nThe same experiments with other settings (probes; each \
             row's command says what differs from the preset):\n\n",
        );
        md.push_str(&table(&probes, link)?);
        md.push('\n');
        for (name, r) in &probes {
            md.push_str(&format!(
                "- `{name}`: {}\n",
                layers_line(r, dir, name, link)
            ));
        }
    }
    md.push_str(&format!(
        "\n## Published anchors\n\nTest error at compression of the weights, from {ANCHOR_SOURCE}.\n\n\
         | experiment | method | test error % | compression × | method's paper |\n|---|---|---:|---:|---|\n"
    ));
    for a in ANCHORS {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} | {} |\n",
            a.experiment, a.method, a.error_pct, a.compression, a.paper
        ));
    }
    md.push_str(&cifar_plan(dir)?);
    Ok(md)
}

/// The rows of `runs` (record name, results), each linking its results.json under `link`.
fn table(runs: &[(String, RunResults)], link: &Path) -> Result<String> {
    let mut md = String::from(
        "| run | dense | pruned | weights left | compression × | pruned file gzip / bzip2 / sparse | wall | command |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for (name, r) in runs {
        let command = r
            .extra
            .get("command")
            .and_then(|c| c.as_str())
            .with_context(|| {
                format!(
                    "{}/{name}/results.json: no `command` in `extra` (recorded runs are written \
                     by `cargo xtask reproduce`)",
                    link.display()
                )
            })?;
        let s = &r.sizes_bytes;
        md.push_str(&format!(
            "| [{name}]({}/{name}/results.json) | {} | {} | {} of {} ({:.2}%) | **{:.1}** | {} / {} / {} | {} | `{command}` |\n",
            link.display(),
            metric(r, r.dense.value),
            metric(r, r.pruned.value),
            thousands(r.pruned.nonzero),
            thousands(r.pruned.params),
            r.pruned.remaining_pct,
            r.pruned.compression,
            kib(s.pruned_gzip),
            kib(s.pruned_bzip2),
            kib(s.sparse_format),
            duration(r.wall_seconds),
        ));
    }
    Ok(md)
}

/// A metric value in its unit.
fn metric(r: &RunResults, v: f64) -> String {
    match r.metric.as_str() {
        "top1_error_pct" => format!("{v:.2}% error"),
        "bleu" => format!("{v:.2} BLEU"),
        other => format!("{v:.4} {other}"),
    }
}

/// `n` with thousands separated by commas, as the README writes counts.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn kib(bytes: u64) -> String {
    format!("{:.0} KiB", bytes as f64 / 1024.0)
}

fn duration(seconds: f64) -> String {
    let m = (seconds / 60.0).round() as u64;
    if m >= 48 * 60 {
        format!("{:.1} days", seconds / 86_400.0)
    } else if m >= 60 {
        format!("{} h {:02} min", m / 60, m % 60)
    } else {
        format!("{m} min")
    }
}

/// `name nonzero/params`, by layer group when the run reports groups, else by tensor; then a
/// link to the record's curve (validation metric against weights left, round by round).
fn layers_line(r: &RunResults, dir: &Path, name: &str, link: &Path) -> String {
    let curve = match dir.join(name).join("curve.svg").is_file() {
        true => format!(
            "; [rounds: validation metric against weights left]({}/{name}/curve.svg)",
            link.display()
        ),
        false => String::new(),
    };
    layer_counts(r) + &curve
}

fn layer_counts(r: &RunResults) -> String {
    let stats = if r.layer_groups.is_empty() {
        &r.layers
    } else {
        &r.layer_groups
    };
    stats
        .iter()
        .map(|l| {
            let name = l.name.strip_suffix(".weight").unwrap_or(&l.name);
            format!(
                "{name} {}/{} ({:.1}%)",
                thousands(l.nonzero),
                thousands(l.params),
                l.remaining_pct()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Dense epochs, pruning-epoch budget and fine-tune epochs of a CIFAR-10 full configuration.
fn cifar_budget(experiment: &str) -> Result<(usize, usize, usize)> {
    let c = crate::classify::Config::preset(experiment, false)?;
    Ok((c.dense_epochs, c.prune.max_epochs, c.prune.finetune_epochs))
}

/// The CIFAR-10 section: what the runs need and how long they would take, from measured epochs.
fn cifar_plan(dir: &Path) -> Result<String> {
    let path = dir.join(CIFAR_EPOCHS);
    let mut md = String::from(
        "\n## CIFAR-10 (not run here)\n\n\
         CIFAR-10 cannot be downloaded on this machine and its full budgets are GPU-sized. Each run \
         needs the binary version of the dataset (`data_batch_1.bin` … `data_batch_5.bin`, \
         `test_batch.bin`) and is one command: `cargo xtask reproduce NAME --data-dir DIR --record` \
         (on a GPU, see the README's \"CIFAR-10 on a GPU\").\n\n",
    );
    let times: Vec<EpochTime> = if path.is_file() {
        let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))?
    } else {
        Vec::new()
    };
    md.push_str(
        "| experiment | budget (epochs: dense + pruning at most + fine-tune) | one training epoch on this CPU | the full budget's training on this CPU | measured by |\n|---|---|---:|---:|---|\n",
    );
    for exp in experiments().iter().filter(|e| e.needs_cifar) {
        let (dense, prune, ft) = cifar_budget(exp.name)?;
        let epochs = dense + prune + ft;
        let model = exp.name.split('-').next().unwrap_or(exp.name);
        match times.iter().find(|t| t.model == model) {
            Some(t) => md.push_str(&format!(
                "| `{}` | {dense} + {prune} + {ft} = {epochs} | {} ({} images in {:.1} s, {} thread{}) | {} | `{}` |\n",
                exp.name,
                duration(t.epoch_seconds),
                t.images,
                t.seconds,
                t.threads,
                if t.threads == 1 { "" } else { "s" },
                duration(t.epoch_seconds * epochs as f64),
                t.command
            )),
            None => md.push_str(&format!(
                "| `{}` | {dense} + {prune} + {ft} = {epochs} | not measured (`cargo xtask cifar-epoch`) | | |\n",
                exp.name
            )),
        }
    }
    if let Some(t) = times.first() {
        md.push_str(&format!("\nCPU: {}.\n", t.cpu));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Config;

    #[test]
    fn docs_results_md_is_what_the_recorded_runs_give() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let want = render(&root.join(RECORDS), Path::new("../results")).unwrap();
        let have = std::fs::read_to_string(root.join(TABLE)).unwrap();
        assert!(
            have == want,
            "docs/RESULTS.md is stale: run `cargo xtask results`"
        );
    }

    /// A finished run in `dir`: `fc.weight` with 3 of 6 weights non-zero in the model file, and
    /// a results.json claiming `nonzero` of them.
    fn fake_run(dir: &Path, nonzero: usize, quick: bool) {
        let w =
            candle_core::Tensor::new(&[[1f32, 0., 2.], [0., 0., 3.]], &candle_core::Device::Cpu)
                .unwrap();
        candle_core::safetensors::save(
            &[("fc.weight".to_string(), w)].into(),
            dir.join("model.safetensors"),
        )
        .unwrap();
        let results = serde_json::json!({
            "experiment": "lenet300-mnist",
            "dataset": {"name": "mnist", "train": 1, "valid": 1, "test": 1},
            "metric": "top1_error_pct",
            "higher_is_better": false,
            "dense": {"value": 1.5},
            "pruned": {"value": 1.75, "params": 6, "nonzero": nonzero,
                       "remaining_pct": 50.0, "compression": 2.0},
            "layers": [{"name": "fc.weight", "params": 6, "nonzero": nonzero}],
            "sizes_bytes": {"dense_safetensors": 1, "pruned_safetensors": 1, "pruned_gzip": 1,
                            "pruned_bzip2": 1, "sparse_format": 1},
            "model_file": "model.safetensors",
            "wall_seconds": 4000.0,
            "config": {"quick": quick},
            "extra": {"command": "cargo xtask reproduce lenet300-mnist"},
        });
        std::fs::write(dir.join("results.json"), results.to_string()).unwrap();
        std::fs::write(dir.join("report.md"), "# report\n").unwrap();
        std::fs::write(dir.join("checkpoint.bin"), "not copied").unwrap();
    }

    #[test]
    fn a_recorded_run_is_copied_once_its_counts_match_its_model_file() {
        let (run, records) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fake_run(run.path(), 3, false);
        let to = record(run.path(), records.path(), None).unwrap();
        assert_eq!(to, records.path().join("lenet300-mnist"));
        assert!(to.join("results.json").is_file() && to.join("report.md").is_file());
        assert!(!to.join("checkpoint.bin").exists() && !to.join("model.safetensors").exists());
        let md = render(records.path(), Path::new("../results")).unwrap();
        assert!(
            md.contains("| [lenet300-mnist](../results/lenet300-mnist/results.json) | 1.50% error | 1.75% error | 3 of 6 (50.00%) | **2.0** |"),
            "{md}"
        );
        assert!(md.contains("1 h 07 min") && md.contains("`cargo xtask reproduce lenet300-mnist`"));
        assert!(md.contains("`lenet5-mnist` (`cargo xtask reproduce lenet5-mnist --record`)"));
        assert!(md.contains("| lenet5-mnist | sparse variational dropout | 0.75 | 280 |"));
        // A probe sits beside the headline run, in its own table.
        let probe = record(run.path(), records.path(), Some("d0.5")).unwrap();
        assert!(probe.ends_with("lenet300-mnist-d0.5"));
        let md = render(records.path(), Path::new("r")).unwrap();
        assert!(md.contains("## Other recorded runs") && md.contains("[lenet300-mnist-d0.5]"));
    }

    #[test]
    fn recording_refuses_counts_the_model_file_does_not_hold_and_quick_runs() {
        let (run, records) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fake_run(run.path(), 2, false);
        let err = record(run.path(), records.path(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("not those of the model file"),
            "{err}"
        );
        fake_run(run.path(), 3, true);
        let err = record(run.path(), records.path(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("quick run"), "{err}");
        assert_eq!(
            std::fs::read_dir(records.path()).unwrap().count(),
            0,
            "nothing recorded"
        );
        assert!(check_label("Bad/label").is_err() && check_label("s0.99").is_ok());
    }

    #[test]
    fn recorded_image_runs_are_their_experiments_presets_so_the_plain_command_repeats_them() {
        let records = Path::new(env!("CARGO_MANIFEST_DIR")).join("../results");
        let image = crate::classify::EXPERIMENTS.map(|e| e.0);
        for name in image {
            let json = records.join(name).join("results.json");
            if !json.is_file() {
                continue;
            }
            let mut recorded = RunResults::read_json(&json).unwrap().config;
            let mut preset = serde_json::to_value(Config::preset(name, false).unwrap()).unwrap();
            // Where the data was and how many threads ran are not settings of the result.
            for key in ["data_source", "data_dir", "threads"] {
                recorded.as_object_mut().unwrap().remove(key);
                preset.as_object_mut().unwrap().remove(key);
            }
            assert_eq!(
                recorded, preset,
                "{name}: the recorded run is not the preset"
            );
        }
    }

    #[test]
    fn counts_are_written_with_thousands_separators() {
        let got: Vec<String> = [0, 999, 1000, 430_500, 1_234_567].map(thousands).into();
        assert_eq!(got, ["0", "999", "1,000", "430,500", "1,234,567"]);
    }

    #[test]
    fn links_are_relative_to_the_table() {
        let p = relative(Path::new("docs"), Path::new("results")).unwrap();
        assert_eq!(p, Path::new("../results"));
        let p = relative(Path::new("a/b"), Path::new("a/c/d")).unwrap();
        assert_eq!(p, Path::new("../c/d"));
    }
}
