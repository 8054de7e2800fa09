//! A bound on a step that must not hang: past its limit, what every process of the step is
//! doing goes to stderr (each thread's state, kernel stack and, where gdb is installed, its
//! backtrace), and those processes are killed, so that the test fails with the diagnosis
//! instead of holding CI until its own timeout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::proc::stat_fields;

/// After the step's processes are killed, how long the step may take to notice before the
/// whole test process is aborted (a hang inside the test process itself).
const AFTER_KILL: Duration = Duration::from_secs(60);

/// Armed while a step runs; disarmed when dropped.
pub struct HangGuard {
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl HangGuard {
    /// Arms the guard: if it is still armed after `limit`, the processes this test process
    /// started whose command line names `scope` (a directory only this step uses) are
    /// described and killed; if it is still armed `AFTER_KILL` later, the test process (its own
    /// threads described first) is aborted.
    pub fn arm(label: &str, scope: &Path, limit: Duration) -> HangGuard {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let (watched, label, scope) = (done.clone(), label.to_owned(), scope.to_owned());
        std::thread::spawn(move || {
            if wait_done(&watched, limit) {
                return;
            }
            let mut report =
                format!("\n=== {label}: still running after {limit:?}: a hang. Its processes:\n");
            let pids = processes_naming(&scope);
            for &pid in &pids {
                report.push_str(&describe(pid));
            }
            if pids.is_empty() {
                report.push_str("(none)\n");
            }
            report.push_str(&format!(
                "=== {label}: killing {pids:?}; the test process itself if it still hangs in \
                 {AFTER_KILL:?}\n"
            ));
            emit(&report);
            for &pid in &pids {
                // SAFETY: kill only sends a signal.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if wait_done(&watched, AFTER_KILL) {
                return;
            }
            emit(&format!(
                "=== {label}: still hung with its processes gone; the test process:\n{}",
                describe(std::process::id() as i32)
            ));
            std::process::abort();
        });
        HangGuard { done }
    }
}

impl Drop for HangGuard {
    fn drop(&mut self) {
        let (lock, signal) = &*self.done;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        signal.notify_all();
    }
}

/// Waits until `done` or `limit`; true when done.
fn wait_done(done: &(Mutex<bool>, Condvar), limit: Duration) -> bool {
    let (lock, signal) = done;
    let deadline = Instant::now() + limit;
    let mut finished = lock.lock().unwrap_or_else(|e| e.into_inner());
    while !*finished {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        finished = signal
            .wait_timeout(finished, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    true
}

/// Straight to the test process's stderr: the test harness captures `eprintln!`, and shows
/// it only once the test ends, which a hang may never let it do.
fn emit(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// The children of this process whose command line names `scope`.
fn processes_naming(scope: &Path) -> Vec<i32> {
    let me = std::process::id().to_string();
    let scope = scope.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            let parent = stat_fields(&dir.join("stat")).into_iter().nth(1);
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            parent.as_deref() == Some(me.as_str())
                && cmdline.windows(scope.len()).any(|w| w == scope)
        })
        .collect()
}

/// A process's command line, and each thread's name, state, wait channel and kernel stack;
/// then its backtraces from gdb, where gdb is installed.
fn describe(pid: i32) -> String {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let cmdline = read(dir.join("cmdline")).replace('\0', " ");
    let mut out = format!("--- pid {pid}: {}\n", cmdline.trim());
    let mut tasks: Vec<PathBuf> = std::fs::read_dir(dir.join("task"))
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    tasks.sort();
    for task in tasks {
        let state = stat_fields(&task.join("stat"))
            .into_iter()
            .next()
            .unwrap_or_else(|| "?".to_owned());
        out.push_str(&format!(
            "  thread {} {:?} state {state} wchan {}\n",
            task.file_name().unwrap_or_default().to_string_lossy(),
            read(task.join("comm")).trim(),
            read(task.join("wchan")).trim(),
        ));
        for frame in read(task.join("stack")).lines() {
            out.push_str(&format!("    {frame}\n"));
        }
    }
    // Bounded: attaching waits for every thread to stop, which one stuck in the kernel may
    // never do.
    let gdb = Command::new("timeout")
        .args(["30", "gdb", "-p", &pid.to_string(), "-batch", "-nx"])
        .args(["-ex", "thread apply all bt 30"])
        .output();
    if let Ok(gdb) = gdb {
        out.push_str(&String::from_utf8_lossy(&gdb.stdout));
    }
    out
}
