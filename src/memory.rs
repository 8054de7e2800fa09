//! The allocator's tunables: how much memory the daemon keeps for reuse, a choice between a
//! small footprint and CPU per call (`--memory-profile`).
//!
//! On the batch path most allocations are large: sled's log segment buffers (2 MiB), its
//! serialised leaves (tens to hundreds of KB, rewritten on every split and consolidation),
//! request and upstream batch bodies. glibc maps each block from 128 KiB up on its own and
//! returns it on free, so the next one is page-faulted in afresh: under 100-call batches about
//! a quarter of the daemon's CPU goes to those faults and to malloc's bookkeeping. Keeping
//! such blocks in the heap saves that CPU but keeps freed blocks as resident memory. The
//! benchmark's figures for both are in the README ("Performance").

/// glibc's arenas: one per thread that allocates unless limited, and memory freed in one is
/// rarely returned, so reading a large backlog through sled's threads and tokio's workers
/// would grow RSS far past what is live. Two keep it flat. (Both profiles.)
const MALLOC_ARENAS: libc::c_int = 2;
/// `throughput`: blocks below this come from the heap and are reused; at or above it they
/// are mapped on their own. Above sled's segment buffers and its leaves.
const THROUGHPUT_MMAP_THRESHOLD: libc::c_int = 4 << 20;
/// `throughput`: free memory at the top of an arena's heap past which glibc gives it back:
/// a few segment buffers, so that they are not returned and faulted in again between two
/// requests. A rebuild still hands everything free back (`malloc_trim`).
const THROUGHPUT_TRIM_THRESHOLD: libc::c_int = 8 << 20;

/// How the allocator trades resident memory for CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryProfile {
    /// glibc's own thresholds: large blocks go back to the kernel when freed. The smallest
    /// RSS, at rest and under load.
    #[default]
    Lean,
    /// Large blocks kept in the heap and reused, for about twice the RSS under batch load and
    /// 10-30 MB more at rest. What it saves in CPU is measured in the README ("Performance").
    Throughput,
}

impl std::fmt::Display for MemoryProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryProfile::Lean => "lean",
            MemoryProfile::Throughput => "throughput",
        })
    }
}

impl std::str::FromStr for MemoryProfile {
    type Err = String;

    fn from_str(text: &str) -> Result<MemoryProfile, String> {
        match text {
            "lean" => Ok(MemoryProfile::Lean),
            "throughput" => Ok(MemoryProfile::Throughput),
            other => Err(format!(
                "expected \"lean\" or \"throughput\", got {other:?}"
            )),
        }
    }
}

/// Sets glibc malloc's tunables for `profile`. Called by `main` before the runtime starts
/// its threads.
pub fn tune_allocator(profile: MemoryProfile) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; no other thread allocates yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        if profile == MemoryProfile::Throughput {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THROUGHPUT_MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, THROUGHPUT_TRIM_THRESHOLD);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = profile;
}
