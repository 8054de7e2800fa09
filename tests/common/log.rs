//! A child process's log lines as they come, and a way to wait for one.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Lines a process has logged so far.
#[derive(Default)]
pub struct Log {
    text: Mutex<String>,
    grew: Condvar,
}

impl Log {
    pub fn push(&self, line: &str) {
        let mut text = self.text.lock().unwrap();
        text.push_str(line);
        text.push('\n');
        self.grew.notify_all();
    }

    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Blocks until `count` lines contain `needle` (at most 60 s, then panics with the log,
    /// naming `whose` it is).
    pub fn wait_for(&self, whose: &str, needle: &str, count: usize) {
        let text = self.text.lock().unwrap();
        let (text, timeout) = self
            .grew
            .wait_timeout_while(text, Duration::from_secs(60), |t| {
                t.lines().filter(|l| l.contains(needle)).count() < count
            })
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "{whose} never logged {needle:?}:\n{text}"
        );
    }
}
