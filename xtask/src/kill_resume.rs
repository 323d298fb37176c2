//! `cargo xtask kill-resume`: kills a reproduction with SIGKILL at random moments, resumes it
//! each time, and checks that every run still ends with the model files of an uninterrupted run,
//! byte for byte, and no temporary file behind.
//!
//! Half of the kills come after a random delay (any phase: loading, dense training, pruning
//! rounds, fine-tuning, the report); the other half the moment a temporary file appears in the
//! run directory, that is, in the middle of a checkpoint or output write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::flags;

/// The tally `kill-resume` prints and writes.
#[derive(Debug, Default, Serialize)]
pub struct Tally {
    /// SIGKILLs sent.
    pub kills: usize,
    /// Of them, sent while a temporary file was being written.
    pub during_writes: usize,
    /// Kills by the phase the checkpoint was in (`none` before the first checkpoint).
    pub by_phase: BTreeMap<String, usize>,
    /// Temporary files found right after a kill (swept by the resume that followed).
    pub temp_files_after_kills: usize,
    /// Interrupted runs that finished.
    pub runs: usize,
    /// Of them, those whose model files equal the uninterrupted run's byte for byte.
    pub identical: usize,
    /// Temporary files left in finished runs.
    pub temp_files_left: usize,
    /// The uninterrupted run's wall time, seconds.
    pub reference_seconds: f64,
    /// The whole test's wall time, seconds.
    pub seconds: f64,
}

/// Temporary files and staging directories under `dir` (what a kill can leave).
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(list) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in list.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".tmp") || name.contains(".relprune-tmp-") {
                found.push(e.path());
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    found
}

/// The `*.safetensors` files of a finished run (its models), by name.
fn model_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            out.insert(name, std::fs::read(&p)?);
        }
    }
    Ok(out)
}

/// The phase a run's checkpoint is in: the one in progress, else the last finished.
fn phase(out: &Path) -> String {
    match relprune_prune::checkpoint::read(&out.join("checkpoint"), &candle_core::Device::Cpu) {
        Ok(saved) => {
            let j = saved.journal;
            match (j.current, j.completed.last()) {
                (Some((label, _)), _) => label,
                (None, Some((label, _))) => format!("after {label}"),
                (None, None) => "started".into(),
            }
        }
        Err(_) => "none".into(),
    }
}

/// `cargo xtask reproduce EXPERIMENT --quick` with the test's flags, into `out`.
fn reproduce(f: &flags::KillResume, out: &Path, resume: bool) -> Result<Child> {
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("reproduce").arg(&f.experiment);
    if resume {
        cmd.arg("--resume").arg(out);
    } else {
        cmd.arg("--quick").arg("--overwrite").arg("--out").arg(out);
        cmd.args(&f.args);
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start a reproduction")
}

/// Waits for `child` to finish, or kills it when `kill_at` says so; returns whether it was
/// killed, and whether a temporary file existed at that moment.
fn run_until_kill(
    child: &mut Child,
    out: &Path,
    kill_at: Option<Instant>,
    on_write: bool,
) -> Result<(bool, bool)> {
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("a reproduction in {} failed ({status})", out.display());
            }
            return Ok((false, false));
        }
        let writing = on_write && !temp_files(out).is_empty();
        if writing || kill_at.is_some_and(|t| Instant::now() >= t) {
            child.kill()?;
            child.wait()?;
            return Ok((true, writing));
        }
        std::thread::sleep(Duration::from_micros(if on_write { 200 } else { 5_000 }));
    }
}

/// `cargo xtask kill-resume`.
pub fn run(f: flags::KillResume) -> Result<()> {
    let t0 = Instant::now();
    let reference = f.out.join("reference");
    let victim = f.out.join("interrupted");
    std::fs::create_dir_all(&f.out)?;
    eprintln!(
        "kill-resume: the uninterrupted run ({})",
        reference.display()
    );
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut child = reproduce(&f, &reference, false)?;
    run_until_kill(&mut child, &reference, None, false)?;
    tally.reference_seconds = started.elapsed().as_secs_f64();
    let want = model_files(&reference)?;
    if want.is_empty() {
        bail!("the uninterrupted run wrote no model file");
    }
    let mut rng = StdRng::seed_from_u64(f.seed);
    let kills = f.kills as usize;
    while tally.kills < kills {
        // One interrupted run: started fresh, killed and resumed until it finishes.
        let mut child = reproduce(&f, &victim, false)?;
        loop {
            let on_write = tally.kills < kills && rng.random_bool(0.5);
            let kill_at = (tally.kills < kills && !on_write).then(|| {
                Instant::now()
                    + Duration::from_secs_f64(rng.random_range(0.0..tally.reference_seconds / 4.0))
            });
            let (killed, writing) = run_until_kill(&mut child, &victim, kill_at, on_write)?;
            if !killed {
                break;
            }
            tally.kills += 1;
            tally.during_writes += usize::from(writing);
            tally.temp_files_after_kills += temp_files(&victim).len();
            let phase = phase(&victim);
            *tally.by_phase.entry(phase.clone()).or_default() += 1;
            eprintln!(
                "kill {}/{}: in {phase}{}",
                tally.kills,
                kills,
                if writing { ", during a write" } else { "" }
            );
            // Before the first checkpoint there is nothing to resume: the run starts over.
            child = reproduce(&f, &victim, phase != "none")?;
        }
        tally.runs += 1;
        let got = model_files(&victim)?;
        let same = got == want;
        tally.identical += usize::from(same);
        let left = temp_files(&victim);
        tally.temp_files_left += left.len();
        eprintln!(
            "run {} finished: model files {}, {} temporary files left",
            tally.runs,
            if same { "byte-identical" } else { "DIFFERENT" },
            left.len()
        );
    }
    tally.seconds = t0.elapsed().as_secs_f64();
    let md = format!(
        "| kills | during writes | phases (kills) | temp files after kills | runs | byte-identical | temp files left | reference s | total s |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} |\n",
        tally.kills,
        tally.during_writes,
        tally
            .by_phase
            .iter()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        tally.temp_files_after_kills,
        tally.runs,
        tally.identical,
        tally.temp_files_left,
        tally.reference_seconds,
        tally.seconds
    );
    relprune_io::write(&f.out.join("kill-resume.md"), md.as_bytes())?;
    relprune_io::write(
        &f.out.join("kill-resume.json"),
        serde_json::to_string_pretty(&tally)?.as_bytes(),
    )?;
    println!("{md}");
    if tally.identical != tally.runs || tally.temp_files_left > 0 {
        bail!(
            "{} of {} interrupted runs differ from the uninterrupted one, {} temporary files left",
            tally.runs - tally.identical,
            tally.runs,
            tally.temp_files_left
        );
    }
    Ok(())
}
