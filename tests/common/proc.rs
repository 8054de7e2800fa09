//! A process's state as `/proc` shows it.

/// A `/proc/PID/status` field counted in kB (`VmRSS`, `VmHWM`, …), in bytes.
pub fn status_bytes(pid: i32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        * 1024
}

/// The resident memory of a process, in bytes.
pub fn rss(pid: i32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// The peak resident memory of a process, in bytes.
pub fn peak_rss(pid: i32) -> u64 {
    status_bytes(pid, "VmHWM")
}

/// The fields of a `/proc/PID/stat` or `/proc/PID/task/TID/stat` file after the command
/// name (which may hold spaces and parentheses): the state first, then the parent's pid, ...
/// Empty if the process is gone.
pub fn stat_fields(stat: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(stat)
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            Some(rest.split_whitespace().map(str::to_owned).collect())
        })
        .unwrap_or_default()
}
