//! Resident memory of this process at phase ends, for the report: where a run's peak comes from.

use serde_json::{json, Map, Value};

/// How freed buffers are treated during a run (`relprune prune-hf --memory`): peak memory
/// against time. glibc only; elsewhere both are the system allocator's own policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Memory {
    /// Every freed buffer over 128 KiB goes back to the system ([`return_freed_buffers`]): the
    /// lowest peak, at a page fault per page of every new buffer (MiniLM at 50% on one
    /// thread: 801 MB peak, 751 s, 29% of it in the kernel).
    Lean,
    /// glibc's own adaptive policy: freed buffers up to the largest freed so far are reused
    /// (MiniLM at 50%: 1,090 MB peak, 571 s, 4 s in the kernel).
    Adaptive,
}

impl Memory {
    /// The default for a model: lean for decoder LMs, whose runs are held to a memory budget
    /// (docs/LLM.md), adaptive for encoders and translation models.
    pub fn default_for(decoder_lm: bool) -> Self {
        if decoder_lm {
            Self::Lean
        } else {
            Self::Adaptive
        }
    }

    /// Sets the allocator's policy for this process; call before the run allocates.
    pub fn apply(self) {
        match self {
            Self::Lean => return_freed_buffers(),
            Self::Adaptive => {}
        }
    }
}

/// Makes glibc give every large freed buffer back to the system at once. glibc raises its mmap
/// threshold after each large free, after which a training step's activation buffers come from
/// the heap and stay resident once freed (MiniLM: 413 MB resident between batches instead of
/// 275 MB, 5% higher peak), at the price of a page fault per page of every large buffer (about
/// 13% more CPU time). Call before any other thread exists.
pub fn return_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; the caller runs before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

/// Keeps freed large buffers in the heap for reuse (speed over memory): candle allocates and
/// frees tensor storage every op, and glibc would map and unmap each buffer over its mmap
/// threshold anew, paying a page fault per page (≈ 18% of a LeNet-5 epoch, a quarter of a sparse
/// MiniLM's embedding time). Call before any other thread exists.
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; the caller runs before other threads.
    unsafe {
        // 32 MiB is glibc's upper limit for the threshold on 64-bit systems.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The current and the peak resident set size in MB (Linux `/proc/self/status`: `VmRSS`,
/// `VmHWM`); `None` where the system does not tell.
pub fn rss_mb() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status)
}

/// `VmRSS` and `VmHWM` of a `/proc/<pid>/status` text, in MB.
fn parse_status(status: &str) -> Option<(f64, f64)> {
    let field = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kb: f64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Records the memory at the end of `phase` under `extra["memory_mb"][phase]` (nothing where the
/// system does not tell).
pub fn mark(extra: &mut Map<String, Value>, phase: &str) {
    if let Some((rss, peak)) = rss_mb() {
        let log = extra
            .entry("memory_mb")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(log) = log {
            log.insert(phase.into(), json!({ "rss": rss, "peak": peak }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_megabytes() {
        let s = "Name:\trelprune\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t3\n";
        assert_eq!(parse_status(s), Some((100.0, 200.0)));
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn marks_collect_under_memory_mb() {
        let mut extra = Map::new();
        mark(&mut extra, "a");
        mark(&mut extra, "b");
        if cfg!(target_os = "linux") {
            let log = extra["memory_mb"].as_object().unwrap();
            assert_eq!(log.len(), 2);
            let (rss, peak) = (
                log["b"]["rss"].as_f64().unwrap(),
                log["b"]["peak"].as_f64().unwrap(),
            );
            assert!(rss > 0.0 && peak >= rss, "{rss} {peak}");
        }
    }
}
