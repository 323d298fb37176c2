//! Resumable runs: one checkpoint file, rewritten atomically after every epoch.
//!
//! A run is a sequence of named *phases* (`dense`, `pruning`, `fine-tune`, one-off steps such as
//! an evaluation). The checkpoint holds the weights, the masks, the optimizer state, the learning
//! rate and regularizer, the number of epochs trained so far (the data order is replayed from it,
//! see [`crate::Task::skip_epochs`]), the outputs of the finished phases and the loop state of the
//! phase in progress. Resuming loads all of it; finished phases then return their stored output
//! without running, and the phase in progress continues from its last epoch, so an interrupted
//! run and an uninterrupted one end with bit-identical weights.
//!
//! File: `checkpoint.safetensors`, tensors `param/<name>`, `mask/<name>`, `optim/<name>/<slot>`,
//! `phase/<key>`, and the [`Journal`] as JSON in the metadata key `relprune`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use relprune_core::SelectiveDecay;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Masks, ParamSet, Result, Snapshot};

/// The checkpoint's file name inside its directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The `format` value of the journal.
pub const CHECKPOINT_FORMAT: &str = "relprune-checkpoint-v1";
const META_KEY: &str = "relprune";
/// Most training epochs a journal may claim (far beyond any run's budget).
const MAX_EPOCHS: usize = 100_000;

/// Everything of a run's progress that is not a tensor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// The caller's description of the run (e.g. its configuration), returned on resume.
    pub run: Value,
    /// Training epochs done so far, all phases together (the data order is replayed from it).
    pub epochs_trained: usize,
    /// The optimizer's learning rate.
    pub lr: f64,
    /// The optimizer's regularizer.
    pub regularizer: Option<SelectiveDecay>,
    /// Finished phases and their outputs, in order.
    pub completed: Vec<(String, Value)>,
    /// The phase in progress and its loop state.
    pub current: Option<(String, Value)>,
    /// Wall-clock seconds the run had taken when this checkpoint was written, over every
    /// process that worked on it (work after a process's last checkpoint is redone, not counted).
    #[serde(default)]
    pub seconds: f64,
}

/// How a phase should start: afresh, not at all (already done), or from saved loop state.
#[derive(Debug)]
pub enum PhaseStart {
    /// Run the phase from its beginning.
    Fresh,
    /// The phase finished before; here is its output.
    Done(Value),
    /// The phase was interrupted; continue from this loop state.
    Resume {
        /// The loop state the phase saved.
        state: Value,
        /// The tensors the phase saved with it (keys without the `phase/` prefix).
        tensors: HashMap<String, Tensor>,
    },
}

/// Writes a run's checkpoints into a directory and hands saved state back to the phases.
#[derive(Debug)]
pub struct Checkpointer {
    path: PathBuf,
    journal: Journal,
    // Phase tensors read on resume, handed to the interrupted phase once.
    pending: Option<HashMap<String, Tensor>>,
    // Labels started by this process: a label used twice would be taken for a finished phase.
    seen: std::collections::HashSet<String>,
    // When this process took the run over, and the seconds earlier processes had spent on it.
    since: std::time::Instant,
    earlier_seconds: f64,
}

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A checkpoint read back: its journal and its tensors by full key.
#[derive(Debug)]
pub struct Saved {
    /// The journal.
    pub journal: Journal,
    /// Every tensor, by key (`param/…`, `mask/…`, `optim/…`, `phase/…`).
    pub tensors: HashMap<String, Tensor>,
}

/// Reads the checkpoint in `dir` (errors name the file and the problem).
pub fn read(dir: &Path, device: &Device) -> Result<Saved> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = relprune_io::read_capped(&path, u64::MAX).map_err(|e| {
        file_err(
            &path,
            if e.kind() == std::io::ErrorKind::NotFound {
                "no checkpoint here (was the run started with checkpoints into this directory?)"
                    .to_string()
            } else {
                format!("cannot read: {e}")
            },
        )
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(&path, format!("not a valid checkpoint (truncated?): {e}")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| file_err(&path, "safetensors file without a relprune journal"))?;
    let journal: Journal =
        serde_json::from_str(json).map_err(|e| file_err(&path, format!("corrupt journal: {e}")))?;
    if journal.format != CHECKPOINT_FORMAT {
        return Err(file_err(
            &path,
            format!(
                "checkpoint format `{}`, expected `{CHECKPOINT_FORMAT}`",
                journal.format
            ),
        ));
    }
    if !(journal.lr.is_finite() && journal.lr >= 0.0) {
        return Err(file_err(
            &path,
            format!("corrupt journal: learning rate {}", journal.lr),
        ));
    }
    // Resuming replays the data order of every epoch done: a forged count would hang it.
    if journal.epochs_trained > MAX_EPOCHS {
        return Err(file_err(
            &path,
            format!(
                "corrupt journal: {} epochs trained (at most {MAX_EPOCHS} are believable)",
                journal.epochs_trained
            ),
        ));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| file_err(&path, format!("corrupt tensor data: {e}")))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if !t.dtype().is_float() {
            continue;
        }
        let values = t
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| file_err(&path, format!("tensor `{name}`: {e}")))?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(file_err(
                &path,
                format!(
                    "tensor `{name}` holds {} at flat index {i}: a checkpoint is never \
                     written with a non-finite value, so this one is damaged",
                    values[i]
                ),
            ));
        }
    }
    check_counters(&journal, &tensors, &path)?;
    Ok(Saved { journal, tensors })
}

/// Refuses a checkpoint whose counters disagree with its tensors: optimizer steps without a
/// trained epoch (or negative ones), masks that are not 0/1 or have no parameter of their shape.
fn check_counters(journal: &Journal, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let values = |name: &str, t: &Tensor| -> Result<Vec<f64>> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| file_err(path, format!("tensor `{name}`: {e}")))
    };
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if name.starts_with("optim/") && name.ends_with("/steps") {
            let steps = values(name, t)?;
            if let Some(s) = steps.iter().find(|s| **s < 0.0) {
                return Err(file_err(path, format!("tensor `{name}` counts {s} steps")));
            }
            if journal.epochs_trained == 0 && steps.iter().any(|s| *s > 0.0) {
                return Err(file_err(
                    path,
                    format!(
                        "the journal counts 0 epochs trained but `{name}` counts {} optimizer                          steps: the counters disagree, so this checkpoint is damaged",
                        steps[0]
                    ),
                ));
            }
        } else if let Some(param) = name.strip_prefix("mask/") {
            if let Some(complaint) = crate::mask::not_binary(param, values(name, t)?) {
                return Err(file_err(path, complaint));
            }
            match tensors.get(&format!("param/{param}")) {
                Some(p) if p.dims() == t.dims() => {}
                Some(p) => {
                    return Err(file_err(
                        path,
                        format!(
                            "mask `{param}` has shape {:?} but its parameter {:?}",
                            t.dims(),
                            p.dims()
                        ),
                    ))
                }
                None => {
                    return Err(file_err(
                        path,
                        format!("mask `{param}` has no parameter `param/{param}`"),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// The tensors of `map` under `prefix/`, with the prefix removed.
pub fn strip_prefix(map: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let p = format!("{prefix}/");
    map.iter()
        .filter_map(|(k, t)| k.strip_prefix(&p).map(|k| (k.to_string(), t.clone())))
        .collect()
}

/// A snapshot as phase tensors under `prefix/`.
pub fn snapshot_tensors(prefix: &str, snap: &Snapshot) -> Vec<(String, Tensor)> {
    snap.0
        .iter()
        .map(|(k, t)| (format!("{prefix}/{k}"), t.clone()))
        .collect()
}

/// The snapshot saved under `prefix/` by [`snapshot_tensors`].
pub fn snapshot_from(tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<Snapshot> {
    let mut m = BTreeMap::new();
    for (k, t) in strip_prefix(tensors, prefix) {
        m.insert(k, t.copy()?);
    }
    Ok(Snapshot(m))
}

/// Masks as phase tensors under `prefix/`.
pub fn mask_tensors(prefix: &str, masks: &Masks) -> Vec<(String, Tensor)> {
    masks
        .iter()
        .map(|(k, t)| (format!("{prefix}/{k}"), t.clone()))
        .collect()
}

/// The masks saved under `prefix/` by [`mask_tensors`].
pub fn masks_from(tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<Masks> {
    let mut m = BTreeMap::new();
    for (k, t) in strip_prefix(tensors, prefix) {
        m.insert(k, t.copy()?);
    }
    Masks::from_tensors(m)
}

impl Checkpointer {
    /// Checkpoints of a new run into `dir` (created if missing); `run` describes the run.
    pub fn create(dir: &Path, run: Value) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| file_err(dir, format!("cannot create the checkpoint directory: {e}")))?;
        Ok(Self {
            path: dir.join(CHECKPOINT_FILE),
            journal: Journal {
                format: CHECKPOINT_FORMAT.into(),
                run,
                ..Default::default()
            },
            pending: None,
            seen: Default::default(),
            since: std::time::Instant::now(),
            earlier_seconds: 0.0,
        })
    }

    /// Continues the run saved in `dir`, given what [`read`] returned for it.
    pub fn resumed(dir: &Path, saved: &Saved) -> Self {
        Self {
            path: dir.join(CHECKPOINT_FILE),
            journal: saved.journal.clone(),
            pending: Some(strip_prefix(&saved.tensors, "phase")),
            seen: Default::default(),
            since: std::time::Instant::now(),
            // A forged or damaged count is not worth refusing a resume for: time is only reported.
            earlier_seconds: Some(saved.journal.seconds)
                .filter(|s| s.is_finite() && *s >= 0.0)
                .unwrap_or(0.0),
        }
    }

    /// Seconds earlier processes spent on this run, up to their last checkpoint (0 for a run
    /// this process started): what a resumed run adds to its own time to report the run's.
    pub fn earlier_seconds(&self) -> f64 {
        self.earlier_seconds
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the run's description (written with the next checkpoint): a resumed run whose
    /// safe settings changed stores them, so that a later resume continues with them too.
    pub fn set_run(&mut self, run: Value) {
        self.journal.run = run;
    }

    /// The journal as last written (or read).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// How phase `label` should start (labels must be unique within a run).
    pub fn phase_start(&mut self, label: &str) -> Result<PhaseStart> {
        if !self.seen.insert(label.to_string()) {
            return Err(Error::Config(format!(
                "phase label `{label}` used twice in one checkpointed run"
            )));
        }
        if let Some((_, out)) = self.journal.completed.iter().find(|(l, _)| l == label) {
            return Ok(PhaseStart::Done(out.clone()));
        }
        Ok(match &self.journal.current {
            Some((l, state)) if l == label => PhaseStart::Resume {
                state: state.clone(),
                tensors: self.pending.take().unwrap_or_default(),
            },
            _ => PhaseStart::Fresh,
        })
    }

    /// Records phase `label`'s loop state (`current`) or its end (`done`), then writes the file.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write(
        &mut self,
        params: &ParamSet,
        masks: &Masks,
        optim: &dyn crate::Optimizer,
        epochs_trained: usize,
        label: &str,
        progress: Progress,
        phase_tensors: Vec<(String, Tensor)>,
    ) -> Result<()> {
        let j = &mut self.journal;
        j.seconds = self.earlier_seconds + self.since.elapsed().as_secs_f64();
        j.epochs_trained = epochs_trained;
        j.lr = optim.lr();
        j.regularizer = optim.regularizer();
        match progress {
            Progress::Current(state) => j.current = Some((label.to_string(), state)),
            Progress::Done(output) => {
                j.current = None;
                j.completed.retain(|(l, _)| l != label);
                j.completed.push((label.to_string(), output));
            }
        }
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, t) in params.tensors() {
            tensors.push((format!("param/{name}"), t));
        }
        for (name, t) in masks.iter() {
            tensors.push((format!("mask/{name}"), t.clone()));
        }
        for (key, t) in optim.state_tensors()? {
            tensors.push((format!("optim/{key}"), t));
        }
        for (key, t) in phase_tensors {
            tensors.push((format!("phase/{key}"), t));
        }
        // safetensors wants contiguous CPU data; copies are cheap next to an epoch.
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        let mut meta = HashMap::new();
        let json = serde_json::to_string(&self.journal)
            .map_err(|e| file_err(&self.path, format!("cannot encode the journal: {e}")))?;
        meta.insert(META_KEY.to_string(), json);
        // Streamed tensor by tensor: an in-memory image of the whole file (weights, masks,
        // optimizer moments, snapshots) would be the run's peak memory on a large model.
        Ok(relprune_io::write_with(&self.path, |tmp| {
            safetensors::serialize_to_file(tensors, Some(meta), tmp)
        })?)
    }
}

/// What [`Checkpointer::write`] records about the phase.
pub(crate) enum Progress {
    /// The phase is in progress with this loop state.
    Current(Value),
    /// The phase ended with this output.
    Done(Value),
}

/// Restores the trainer-level state of a checkpoint into `params`, `masks` and `optim`.
pub(crate) fn restore(
    saved: &Saved,
    path: &Path,
    params: &ParamSet,
    masks: &mut Masks,
    optim: &mut dyn crate::Optimizer,
) -> Result<()> {
    for p in params.iter() {
        let key = format!("param/{}", p.name);
        let t = saved.tensors.get(&key).ok_or_else(|| {
            file_err(
                path,
                format!(
                    "parameter `{}` is missing: a checkpoint of another model?",
                    p.name
                ),
            )
        })?;
        set_param(p, t, path)?;
    }
    let saved_masks = strip_prefix(&saved.tensors, "mask");
    let mut restored = BTreeMap::new();
    for p in params.prunable() {
        let m = saved_masks.get(&p.name).ok_or_else(|| {
            file_err(
                path,
                format!("no mask for the prunable parameter `{}`", p.name),
            )
        })?;
        if m.dims() != p.var.as_tensor().dims() {
            return Err(file_err(
                path,
                format!("the mask of `{}` has shape {:?}", p.name, m.dims()),
            ));
        }
        restored.insert(
            p.name.clone(),
            m.to_device(p.var.as_tensor().device())?.copy()?,
        );
    }
    *masks = Masks::from_tensors(restored)?;
    optim.load_state_tensors(&strip_prefix(&saved.tensors, "optim"))?;
    optim.set_lr(saved.journal.lr);
    optim.set_regularizer(saved.journal.regularizer)?;
    Ok(())
}

/// Writes every parameter's current values to `path` (temp file + rename): a snapshot kept on
/// disk instead of in memory.
pub fn write_params_file(path: &Path, params: &ParamSet) -> Result<()> {
    let tensors = params
        .tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(relprune_io::write_with(path, |tmp| {
        safetensors::serialize_to_file(tensors, None, tmp)
    })?)
}

/// Sets every parameter from a file written by [`write_params_file`].
pub fn restore_params_file(path: &Path, params: &ParamSet) -> Result<()> {
    let bytes = relprune_io::read_capped(path, u64::MAX)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(path, format!("not a valid weights file (truncated?): {e}")))?;
    for p in params.iter() {
        let view = st
            .tensor(&p.name)
            .map_err(|_| file_err(path, format!("parameter `{}` is missing", p.name)))?;
        // One parameter at a time: never a second copy of the whole model.
        let t = candle_core::safetensors::Load::load(&view, p.var.device())
            .map_err(|e| file_err(path, format!("parameter `{}`: {e}", p.name)))?;
        set_param(p, &t, path)?;
    }
    Ok(())
}

/// Sets `p` to `t` read from `path`, converted to the variable's dtype and device; a shape
/// that differs is an error naming the file and the parameter.
fn set_param(p: &crate::Param, t: &Tensor, path: &Path) -> Result<()> {
    let w = p.var.as_tensor();
    if t.dims() != w.dims() {
        return Err(file_err(
            path,
            format!(
                "parameter `{}` has shape {:?} here but {:?} in the model",
                p.name,
                t.dims(),
                w.dims()
            ),
        ));
    }
    p.var.set(&t.to_dtype(w.dtype())?.to_device(w.device())?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint file in `dir` holding `journal` and one tensor `param/w` of `values`.
    fn forge(dir: &Path, journal: &Journal, values: Vec<f32>) {
        forge_tensors(dir, journal, &[("param/w", values)]);
    }

    /// A checkpoint file in `dir` holding `journal` and these f32 vectors.
    fn forge_tensors(dir: &Path, journal: &Journal, tensors: &[(&str, Vec<f32>)]) {
        let meta = HashMap::from([(
            META_KEY.to_string(),
            serde_json::to_string(journal).unwrap(),
        )]);
        let data: Vec<(String, Vec<u8>, usize)> = tensors
            .iter()
            .map(|(k, v)| {
                let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (k.to_string(), bytes, v.len())
            })
            .collect();
        let views = data.iter().map(|(k, bytes, n)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], bytes)
                    .unwrap();
            (k.clone(), view)
        });
        safetensors::serialize_to_file(views, Some(meta), &dir.join(CHECKPOINT_FILE)).unwrap();
    }

    #[test]
    fn a_resumed_run_counts_the_seconds_its_checkpoint_records_and_ignores_impossible_ones() {
        for (seconds, earlier) in [(12.5, 12.5), (-3.0, 0.0)] {
            let dir = tempfile::tempdir().unwrap();
            let journal = Journal {
                format: CHECKPOINT_FORMAT.into(),
                lr: 1e-3,
                seconds,
                ..Journal::default()
            };
            forge(dir.path(), &journal, vec![1.0]);
            let saved = read(dir.path(), &Device::Cpu).unwrap();
            let c = Checkpointer::resumed(dir.path(), &saved);
            assert_eq!(c.earlier_seconds(), earlier, "{seconds}");
        }
    }

    #[test]
    fn a_checkpoint_whose_counters_disagree_with_its_tensors_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal {
            format: CHECKPOINT_FORMAT.into(),
            lr: 1e-3,
            epochs_trained: 2,
            ..Journal::default()
        };
        let w = ("param/w", vec![1.0, 0.0, 3.0]);
        let good = [
            w.clone(),
            ("mask/w", vec![1.0, 0.0, 1.0]),
            ("optim/w/steps", vec![40.0]),
        ];
        forge_tensors(dir.path(), &journal, &good);
        read(dir.path(), &Device::Cpu).unwrap();
        let untrained = Journal {
            epochs_trained: 0,
            ..journal.clone()
        };
        forge_tensors(dir.path(), &untrained, &good);
        let e = read(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("0 epochs") && e.contains("optim/w/steps"), "{e}");
        type Tensors<'a> = &'a [(&'a str, Vec<f32>)];
        let cases: [(Tensors, &str); 4] = [
            (&[w.clone(), ("optim/w/steps", vec![-3.0])], "-3 steps"),
            (&[w.clone(), ("mask/w", vec![1.0, 0.5, 1.0])], "holds 0.5"),
            (&[w.clone(), ("mask/w", vec![1.0, 0.0])], "shape [2]"),
            (&[("mask/v", vec![1.0])], "no parameter"),
        ];
        for (tensors, says) in cases {
            forge_tensors(dir.path(), &journal, tensors);
            let e = read(dir.path(), &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn damaged_checkpoints_are_refused_naming_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let good = Journal {
            format: CHECKPOINT_FORMAT.into(),
            lr: 1e-3,
            epochs_trained: 3,
            ..Journal::default()
        };
        forge(dir.path(), &good, vec![1.0, 2.0, 3.0]);
        assert_eq!(read(dir.path(), &Device::Cpu).unwrap().journal, good);
        forge(dir.path(), &good, vec![1.0, f32::NAN, 3.0]);
        let e = read(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("`param/w`") && e.contains("flat index 1"), "{e}");
        let forged = Journal {
            epochs_trained: 1_000_000_000,
            ..good.clone()
        };
        forge(dir.path(), &forged, vec![1.0, 2.0, 3.0]);
        let e = read(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("1000000000 epochs"), "{e}");
        // NaN is written as null, refused by the parser; a negative rate by the check.
        for (lr, says) in [(f64::NAN, "corrupt journal"), (-1.0, "learning rate -1")] {
            let forged = Journal { lr, ..good.clone() };
            forge(dir.path(), &forged, vec![1.0, 2.0, 3.0]);
            let e = read(dir.path(), &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn checkpoint_json_round_trips_every_f64_exactly() {
        // Without serde_json's float_roundtrip, 12.753193087903833 came back as …831.
        let mut values = vec![12.753193087903833, 0.1 + 0.2, 1e-300, f64::MAX, 5e-324];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            if v.is_finite() {
                values.push(v);
            }
        }
        let text = serde_json::to_string(&values).unwrap();
        let back: Vec<f64> = serde_json::from_str(&text).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a:e} came back as {b:e}");
        }
    }
}
