//! Failure points: named places where a test can make the process abort, to show that a
//! crash exactly there loses nothing.
//!
//! `GROUPRELAY_FAILPOINTS=name[=N],...` arms them: the process aborts (as `kill -9` would stop
//! it: no destructors, no flush) the Nth time it reaches that point (the first, without `=N`).
//! Unset, each point costs one load of a set-once value. The points:
//!
//! | name | where |
//! |---|---|
//! | `queue-after-write` | calls written into sled, before any flush covers them and before the client is answered |
//! | `forward-after-delivered` | upstream answered 2xx for a batch, before its calls are removed from the queue |
//! | `rebuild-before-switch` | a rebuild's copy is whole and durable in `queue.next/`, before any rename |
//! | `rebuild-between-renames` | `queue/` renamed to `queue.old/`, before `queue.next/` takes its name |
//! | `rebuild-after-switch` | the copy renamed to `queue/`, before it is opened and `queue.old/` deleted |
//!
//! Two points fail instead of aborting, to show that a failure there harms nothing else:
//!
//! | name | what |
//! |---|---|
//! | `queue-write-panics` | the appender panics, about to write a round into sled |
//! | `queue-unit-write-fails` | the appender's Nth sled write (a chunk, or a big request's chunks) fails as an I/O error would |
//!
//! One point leaves out a step for as long as it is armed, to show that a test notices:
//!
//! | name | what |
//! |---|---|
//! | `queue-skip-fdatasync` | the committer's flushes skip the `fdatasync` of sled's files (sled's own flush still runs: enough for `kill -9`, not for a power cut) |
//! | `rebuild-skip-sync` | a rebuild's copy is switched in without its `fdatasync` and directory syncs (enough for `kill -9`, not for a power cut) |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Armed {
    name: String,
    /// Abort when the count of hits reaches this.
    at: u64,
    hits: AtomicU64,
}

fn armed() -> &'static [Armed] {
    static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("GROUPRELAY_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|spec| {
                let (name, at) = spec.split_once('=').unwrap_or((spec, "1"));
                Armed {
                    name: name.trim().to_owned(),
                    at: at.trim().parse().unwrap_or(1),
                    hits: AtomicU64::new(0),
                }
            })
            .collect()
    })
}

/// Aborts the process if the point `name` is armed and this is its Nth hit.
pub fn hit(name: &str) {
    if reached(name) {
        eprintln!("grouprelay: failpoint {name} reached; aborting");
        std::process::abort();
    }
}

/// Panics if the point `name` is armed and this is its Nth hit.
pub fn panic_at(name: &str) {
    if reached(name) {
        panic!("failpoint {name} reached");
    }
}

/// True if the point `name` is armed and this is its Nth hit: the caller then fails as its
/// I/O would.
pub fn fails_at(name: &str) -> bool {
    reached(name)
}

/// True at every hit while the point `name` is armed: the caller leaves out what it guards.
pub fn skips(name: &str) -> bool {
    armed().iter().any(|point| point.name == name)
}

fn reached(name: &str) -> bool {
    armed().iter().any(|point| {
        point.name == name && point.hits.fetch_add(1, Ordering::SeqCst) + 1 == point.at
    })
}
