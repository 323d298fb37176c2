//! Hostile inputs to `cargo xtask reproduce`: run directories that must not be clobbered,
//! resumes of what is not a run, damaged checkpoints. Each is a clear error naming the
//! directory, file or flag, before any work, and changes nothing.

use std::path::Path;
use std::process::Command;

fn xtask(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("runs the xtask binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A checkpoint directory `dir/checkpoint` whose file holds `journal` and a weight of `values`.
fn forged_checkpoint(dir: &Path, journal: serde_json::Value, values: &[f32]) {
    let ck = dir.join("checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![values.len()], &data)
            .unwrap();
    let meta = std::collections::HashMap::from([("relprune".to_string(), journal.to_string())]);
    safetensors::serialize_to_file(
        [("param/w".to_string(), view)],
        Some(meta),
        &ck.join("checkpoint.safetensors"),
    )
    .unwrap();
}

fn journal(epochs: u64) -> serde_json::Value {
    serde_json::json!({
        "format": "relprune-checkpoint-v1", "run": {"config": {}}, "epochs_trained": epochs,
        "lr": 0.1, "regularizer": null, "completed": [], "current": null
    })
}

#[test]
fn reproduce_refuses_what_would_clobber_or_lie_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    // An earlier run's directory: never mixed with a new run.
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join(".relprune-run"), "a relprune run directory\n").unwrap();
    std::fs::write(run.join("curve.svg"), "stale").unwrap();
    let (ok, e) = xtask(&["reproduce", "lenet300-mnist", "--quick", "--out", s(&run)]);
    assert!(!ok && e.contains("run") && e.contains("--overwrite"), "{e}");
    assert_eq!(
        std::fs::read_to_string(run.join("curve.svg")).unwrap(),
        "stale"
    );

    // --overwrite clears only directories relprune wrote.
    let home = d.join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("thesis.tex"), "precious").unwrap();
    let (ok, e) = xtask(&[
        "reproduce",
        "lenet300-mnist",
        "--quick",
        "--overwrite",
        "--out",
        s(&home),
    ]);
    assert!(!ok && e.contains("not a run directory"), "{e}");
    assert_eq!(
        std::fs::read_to_string(home.join("thesis.tex")).unwrap(),
        "precious"
    );

    // --resume and --overwrite contradict each other.
    let (ok, e) = xtask(&[
        "reproduce",
        "lenet300-mnist",
        "--resume",
        s(&run),
        "--overwrite",
    ]);
    assert!(!ok && e.contains("--overwrite"), "{e}");

    // Resuming what is not a run.
    let (ok, e) = xtask(&[
        "reproduce",
        "lenet300-mnist",
        "--resume",
        s(&d.join("nothing")),
    ]);
    assert!(!ok && e.contains("nothing") && e.contains("no run"), "{e}");
    let (ok, e) = xtask(&["reproduce", "lenet300-mnist", "--resume", s(&home)]);
    assert!(!ok && e.contains("checkpoint"), "{e}");
    assert_eq!(
        std::fs::read_dir(&home).unwrap().count(),
        1,
        "the directory was changed"
    );

    // Damaged checkpoints: a NaN weight, a forged epoch count, counters that disagree.
    let nan = d.join("nan");
    forged_checkpoint(&nan, journal(3), &[1.0, f32::NAN]);
    let (ok, e) = xtask(&["reproduce", "lenet300-mnist", "--resume", s(&nan)]);
    assert!(!ok && e.contains("param/w") && e.contains("NaN"), "{e}");
    let forged = d.join("forged");
    forged_checkpoint(&forged, journal(1_000_000_000), &[1.0, 2.0]);
    let (ok, e) = xtask(&["reproduce", "lenet300-mnist", "--resume", s(&forged)]);
    assert!(!ok && e.contains("1000000000 epochs"), "{e}");

    // A resume names the checkpoint's experiment or none; another one is refused.
    let other = d.join("other");
    let mut j = journal(3);
    j["run"]["config"] = serde_json::json!({"experiment": "lenet300-mnist"});
    forged_checkpoint(&other, j, &[1.0, 2.0]);
    let (ok, e) = xtask(&["reproduce", "lenet5-mnist", "--resume", s(&other)]);
    assert!(
        !ok && e.contains("that run is `lenet300-mnist`, not `lenet5-mnist`"),
        "{e}"
    );
    let (ok, e) = xtask(&["reproduce", "--resume", s(&other)]);
    assert!(!ok && !e.contains("name an experiment"), "{e}");
    assert!(e.contains("image-classification configuration"), "{e}");

    // A stale temporary file of a killed run is swept on resume, even when the resume fails.
    let stale = nan
        .join("checkpoint")
        .join(".checkpoint.safetensors.4999999.0.tmp");
    std::fs::write(&stale, "half a checkpoint").unwrap();
    let _ = xtask(&["reproduce", "lenet300-mnist", "--resume", s(&nan)]);
    assert!(!stale.exists());

    // Unknown experiments and flags that cannot work.
    let (ok, e) = xtask(&["reproduce", "lenet301-mnist", "--out", s(&d.join("x"))]);
    assert!(!ok && e.contains("lenet301-mnist"), "{e}");
    let (ok, e) = xtask(&["reproduce", "lenet300-mnist", "--prune-epochs", "-3"]);
    assert!(!ok && e.contains("-3"), "{e}");
    let (ok, e) = xtask(&[
        "reproduce",
        "lenet300-mnist",
        "--quick",
        "--prune-epochs",
        "0",
        "--out",
        s(&d.join("x")),
    ]);
    assert!(!ok && e.contains("--prune-epochs 0"), "{e}");
    assert!(!d.join("x").exists());
}
