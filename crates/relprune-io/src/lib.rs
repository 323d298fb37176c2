//! Output discipline for the whole project: every file relprune writes goes through [`write`] or
//! [`write_with`], and every output directory through [`StagingDir`].
//!
//! A file is written beside its final path under a temporary name, flushed to disk, and renamed
//! over the final path only then: a reader (or a crash) sees the old file or the complete new
//! one, never half of one, and a failed write leaves no temporary file behind. The final path may
//! be new or a regular file; a symbolic link is written through to its target (the link stays);
//! a directory, FIFO, socket or device is refused with an error naming it, so that an output flag
//! pointed at `/dev/full` or a pipe is never silently replaced by a file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file that could not be written, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub struct Error {
    /// The path the failure is about (the final path, or the temporary file).
    pub path: PathBuf,
    /// What went wrong.
    pub msg: String,
}

/// Result alias using the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Distinguishes temporary files of one process (several writers may run in threads).
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Links followed before a chain is taken for a loop.
const MAX_LINKS: usize = 40;

/// Mode of files that did not exist before (umask aside): reports and models are meant to be
/// shared like any file the user writes, and all of them alike.
#[cfg(unix)]
const NEW_FILE_MODE: u32 = 0o644;

/// Writes `bytes` to `path` atomically (see the crate documentation).
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| fs::write(tmp, bytes))
}

/// Writes `path` atomically through `write`, which is given the temporary path to create: for
/// writers that take a path (safetensors, candle). Its error is reported with the final path.
pub fn write_with<E: std::fmt::Display>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> Result<()> {
    let target = final_target(path)?;
    let tmp = temp_beside(&target)?;
    let result = (|| {
        write(&tmp).map_err(|e| err(path, format!("cannot write: {e}")))?;
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .map_err(|e| err(&tmp, format!("cannot reopen to flush: {e}")))?;
        set_mode(&file, &target).map_err(|e| err(&tmp, format!("cannot set permissions: {e}")))?;
        // Flushed before the rename, or a crash could leave `path` naming an empty file.
        file.sync_all()
            .map_err(|e| err(&tmp, format!("cannot flush to disk: {e}")))?;
        // The target may have been replaced by something else while we wrote.
        final_target(path)?;
        fs::rename(&tmp, &target).map_err(|e| {
            err(
                path,
                format!("cannot move {} into place: {e}", tmp.display()),
            )
        })
    })();
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The file a write to `path` replaces: `path` itself if it is new or a regular file, the end
/// of the chain if it is a symbolic link; an error for anything else.
fn final_target(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let meta = match fs::symlink_metadata(&current) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(err(&current, format!("cannot inspect: {e}"))),
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            let link = fs::read_link(&current)
                .map_err(|e| err(&current, format!("cannot read the link: {e}")))?;
            current = match current.parent() {
                Some(dir) if link.is_relative() => dir.join(link),
                _ => link,
            };
        } else if kind.is_file() {
            return Ok(current);
        } else if kind.is_dir() {
            return Err(err(
                &current,
                "is a directory; an output file was expected here",
            ));
        } else {
            return Err(err(
                &current,
                "is not a regular file (a FIFO, socket or device): outputs are only written to \
                 regular files",
            ));
        }
    }
    Err(err(path, "too many levels of symbolic links"))
}

/// A fresh, empty temporary file in `target`'s directory (same file system, so the rename is
/// atomic), created exclusively so that nothing else can be behind its name.
fn temp_beside(target: &Path) -> Result<PathBuf> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .ok_or_else(|| err(target, "has no file name"))?;
    loop {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".{}.{}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(_) => return Ok(tmp),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(err(
                    &dir,
                    format!("cannot create a temporary file here: {e}"),
                ))
            }
        }
    }
}

/// Gives the new file the permissions of the file it replaces, or [`NEW_FILE_MODE`].
#[cfg(unix)]
fn set_mode(file: &fs::File, target: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match fs::metadata(target) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(_) => NEW_FILE_MODE,
    };
    file.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_file: &fs::File, _target: &Path) -> io::Result<()> {
    Ok(())
}

/// `path` with `suffix` appended to its last component (`out` + `.tmp` = `out.tmp`).
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// An output directory built under a temporary name beside its final path and renamed into
/// place by [`StagingDir::commit`]; dropped uncommitted, it is removed, so a failed run leaves no
/// partial output directory.
#[derive(Debug)]
pub struct StagingDir {
    dir: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// A fresh, empty staging directory for the output directory `out` (which must not exist).
    pub fn new(out: &Path) -> Result<Self> {
        if fs::symlink_metadata(out).is_ok() {
            return Err(err(out, "already exists (outputs are never overwritten)"));
        }
        // Staging directories of this output that killed runs left beside it.
        if let (Some(parent), Some(name)) = (out.parent(), out.file_name()) {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            let prefix = format!("{}.relprune-tmp-", name.to_string_lossy());
            for e in fs::read_dir(parent).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                let dead = n
                    .strip_prefix(&prefix)
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| pid == std::process::id() || !alive(pid));
                if dead {
                    let p = e.path();
                    fs::remove_dir_all(&p).map_err(|e| err(&p, format!("cannot remove: {e}")))?;
                }
            }
        }
        let dir = sibling(out, &format!(".relprune-tmp-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| err(&dir, format!("cannot create: {e}")))?;
        Ok(Self {
            dir,
            committed: false,
        })
    }

    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Renames the staging directory to `out`.
    pub fn commit(mut self, out: &Path) -> Result<()> {
        if fs::symlink_metadata(out).is_ok() {
            return Err(err(out, "appeared while the run was writing; not replaced"));
        }
        fs::rename(&self.dir, out).map_err(|e| {
            err(
                out,
                format!("cannot rename {} into place: {e}", self.dir.display()),
            )
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Most bytes read from a pipe or device, whatever the caller's cap: their size cannot be
/// checked first, and `/dev/zero` never ends.
pub const STREAM_CAP: u64 = 1 << 28;

/// Reads at most `cap` bytes of `path` (a larger file is an error before any byte is read; a
/// pipe or device is read only up to `cap` and [`STREAM_CAP`]), so that no input can make a
/// reader allocate beyond what its format legitimately needs. The caller names the file in its
/// error.
pub fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let too_big = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}, more than the {cap} bytes this input may hold; refused"),
        )
    };
    let file = fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a directory; a file was expected",
        ));
    }
    let cap = if meta.is_file() {
        cap
    } else {
        cap.min(STREAM_CAP)
    };
    if meta.is_file() && meta.len() > cap {
        return Err(too_big(format!("the file has {} bytes", meta.len())));
    }
    let mut bytes = Vec::with_capacity(if meta.is_file() {
        meta.len() as usize
    } else {
        0
    });
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_big("it yields more bytes".to_string()));
    }
    Ok(bytes)
}

/// Cap of small structured files (configs, journals, results): 64 MiB, thousands of times
/// any real one.
pub const CONFIG_CAP: u64 = 1 << 26;

/// [`read_capped`] as UTF-8 text.
pub fn read_text_capped(path: &Path, cap: u64) -> io::Result<String> {
    String::from_utf8(read_capped(path, cap)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not UTF-8: {e}")))
}

/// The marker file every run directory holds: what `--overwrite` checks before clearing one.
pub const RUN_MARKER: &str = ".relprune-run";

/// How a run takes its output directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunDir {
    /// A new run: the directory must be new or empty.
    New,
    /// A new run replacing an earlier one: the directory is cleared first (only if it holds
    /// [`RUN_MARKER`], so a mistyped path is never emptied).
    Overwrite,
    /// The run already in the directory continues.
    Resume,
}

/// Makes `out` the directory of a run started as `mode` says (see [`RunDir`]), after sweeping
/// the temporary files killed writers left in it; a directory holding an earlier run is an
/// error for [`RunDir::New`], never silently mixed with it.
pub fn claim_run_dir(out: &Path, mode: RunDir) -> Result<()> {
    let entries = |dir: &Path| -> Result<Vec<fs::DirEntry>> {
        fs::read_dir(dir)
            .and_then(|r| r.collect::<io::Result<Vec<_>>>())
            .map_err(|e| err(dir, format!("cannot list: {e}")))
    };
    if fs::metadata(out).is_ok_and(|m| m.is_dir()) {
        // What killed writers left (even a marker half written) is nobody's output: swept
        // before the directory is judged.
        sweep_temp(out)?;
    }
    match fs::metadata(out) {
        Ok(m) if !m.is_dir() => return Err(err(out, "exists and is not a directory")),
        Ok(_) => match mode {
            RunDir::New => {
                if !entries(out)?.is_empty() {
                    return Err(err(
                        out,
                        "already holds files (an earlier run?): continue it with --resume or \
                         start over with --overwrite",
                    ));
                }
            }
            RunDir::Overwrite => {
                let found = entries(out)?;
                if !found.is_empty() && !out.join(RUN_MARKER).exists() {
                    return Err(err(
                        out,
                        format!(
                            "holds files but no {RUN_MARKER}: not a run directory relprune \
                             wrote, so --overwrite does not clear it"
                        ),
                    ));
                }
                // Entries one by one: the directory itself (a link, its permissions) stays.
                for e in found {
                    let p = e.path();
                    let r = match e.file_type() {
                        Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
                        _ => fs::remove_file(&p),
                    };
                    r.map_err(|e| err(&p, format!("cannot remove: {e}")))?;
                }
            }
            // The marker is the new run's to write: a resume of a directory that turns out
            // not to be a run must not change it.
            RunDir::Resume => return Ok(()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if mode == RunDir::Resume {
                return Err(err(out, "does not exist: there is no run here to resume"));
            }
            fs::create_dir_all(out).map_err(|e| err(out, format!("cannot create: {e}")))?;
        }
        Err(e) => return Err(err(out, format!("cannot inspect: {e}"))),
    }
    write(&out.join(RUN_MARKER), b"a relprune run directory\n")
}

/// The process id in the name of a temporary file or staging directory this crate made, if
/// `name` is one (`.NAME.PID.N.tmp`, `NAME.relprune-tmp-PID`).
fn temp_owner(name: &str) -> Option<u32> {
    if let Some(pid) = name.rsplit_once(".relprune-tmp-").map(|(_, p)| p) {
        return pid.parse().ok();
    }
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (rest, n) = inner.rsplit_once('.')?;
    let (_, pid) = rest.rsplit_once('.')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether process `pid` is running (so its temporary files may still be in use).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Without a cheap liveness test, a file is only stale when nobody could be writing it.
        false
    }
}

/// Removes the temporary files and staging directories that killed writers left in `dir` and
/// its subdirectories (those of running processes stay); returns how many were removed.
pub fn sweep_temp(dir: &Path) -> Result<usize> {
    sweep_in(dir, 4)
}

fn sweep_in(dir: &Path, depth: usize) -> Result<usize> {
    let mut removed = 0;
    let list = fs::read_dir(dir).map_err(|e| err(dir, format!("cannot list: {e}")))?;
    for e in list {
        let e = e.map_err(|e| err(dir, format!("cannot list: {e}")))?;
        let p = e.path();
        let Ok(kind) = e.file_type() else { continue };
        let name = e.file_name().to_string_lossy().to_string();
        match temp_owner(&name) {
            Some(pid) if !alive(pid) => {
                let r = if kind.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                r.map_err(|e| err(&p, format!("cannot remove a stale temporary file: {e}")))?;
                removed += 1;
            }
            Some(_) => {}
            // Links are not followed: a sweep never reaches outside the run directory.
            None if kind.is_dir() && depth > 0 => removed += sweep_in(&p, depth - 1)?,
            None => {}
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn a_write_replaces_a_regular_file_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write(&p, b"first, longer contents").unwrap();
        write(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write(&p, b"good").unwrap();
        let e = write_with(&p, |tmp| {
            fs::write(tmp, b"half")?;
            Err::<(), _>(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"good");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_is_written_through_to_its_target_and_stays_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.json");
        fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("real.json", &link).unwrap();
        write(&link, b"new").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    #[cfg(unix)]
    #[test]
    fn directories_fifos_and_devices_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = write(dir.path(), b"x").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = write(Path::new("/dev/null"), b"x").unwrap_err().to_string();
        assert!(
            e.contains("/dev/null") && e.contains("not a regular file"),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn new_files_and_replaced_files_get_shared_or_kept_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write(&p, b"1").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        write(&p, b"2").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_staging_directory_a_killed_run_left_is_removed_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pruned");
        let stale = dir.path().join("pruned.relprune-tmp-4999999");
        let other = dir.path().join("other.relprune-tmp-4999999");
        fs::create_dir(&stale).unwrap();
        fs::create_dir(&other).unwrap();
        let s = StagingDir::new(&out).unwrap();
        assert!(!stale.exists() && other.exists());
        drop(s);
    }

    #[test]
    fn a_staging_directory_is_removed_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let s = StagingDir::new(&out).unwrap();
        fs::write(s.path().join("f"), b"x").unwrap();
        let staged = s.path().to_path_buf();
        drop(s);
        assert!(!staged.exists() && !out.exists());
        let s = StagingDir::new(&out).unwrap();
        fs::write(s.path().join("f"), b"x").unwrap();
        s.commit(&out).unwrap();
        assert_eq!(fs::read(out.join("f")).unwrap(), b"x");
        assert!(StagingDir::new(&out)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
    }

    #[test]
    fn a_new_run_refuses_a_directory_holding_files_and_overwrite_clears_only_run_directories() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        claim_run_dir(&out, RunDir::New).unwrap();
        fs::write(out.join("results.json"), b"{}").unwrap();
        let e = claim_run_dir(&out, RunDir::New).unwrap_err().to_string();
        assert!(e.contains("run") && e.contains("--overwrite"), "{e}");
        claim_run_dir(&out, RunDir::Overwrite).unwrap();
        assert!(!out.join("results.json").exists() && out.join(RUN_MARKER).exists());
        let foreign = dir.path().join("home");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("thesis.tex"), b"precious").unwrap();
        let e = claim_run_dir(&foreign, RunDir::Overwrite)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a run directory"), "{e}");
        assert_eq!(fs::read(foreign.join("thesis.tex")).unwrap(), b"precious");
        let e = claim_run_dir(&dir.path().join("none"), RunDir::Resume)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing") || e.contains("no run"), "{e}");
    }

    #[test]
    fn a_marker_half_written_by_a_killed_run_does_not_block_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        fs::create_dir(&out).unwrap();
        fs::write(out.join(format!(".{RUN_MARKER}.4999999.0.tmp")), b"a rel").unwrap();
        claim_run_dir(&out, RunDir::New).unwrap();
        assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
        assert!(out.join(RUN_MARKER).exists());
    }

    #[test]
    fn a_sweep_removes_dead_writers_temporary_files_and_keeps_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("checkpoint");
        fs::create_dir(&sub).unwrap();
        // PIDs above the kernel's maximum (2^22) are never alive.
        let dead = 4_999_999u32;
        fs::write(
            sub.join(format!(".checkpoint.safetensors.{dead}.3.tmp")),
            b"x",
        )
        .unwrap();
        fs::write(dir.path().join(format!(".results.json.{dead}.0.tmp")), b"x").unwrap();
        fs::create_dir(dir.path().join(format!("out.relprune-tmp-{dead}"))).unwrap();
        let mine = format!(".model.safetensors.{}.9.tmp", std::process::id());
        fs::write(dir.path().join(&mine), b"x").unwrap();
        fs::write(dir.path().join("notes.tmp"), b"keep").unwrap();
        fs::write(sub.join("checkpoint.safetensors"), b"keep").unwrap();
        assert_eq!(sweep_temp(dir.path()).unwrap(), 3);
        assert!(dir.path().join(&mine).exists());
        assert!(dir.path().join("notes.tmp").exists());
        assert!(sub.join("checkpoint.safetensors").exists());
        assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_capped_read_refuses_large_files_before_reading_and_endless_devices_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data.bin");
        fs::write(&p, vec![7u8; 100]).unwrap();
        assert_eq!(read_capped(&p, 100).unwrap().len(), 100);
        let e = read_capped(&p, 99).unwrap_err().to_string();
        assert!(e.contains("100 bytes") && e.contains("refused"), "{e}");
        let e = read_capped(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more bytes"), "{e}");
        assert!(read_capped(dir.path(), 10)
            .unwrap_err()
            .to_string()
            .contains("directory"));
    }
}
