//! The data dir: where it is when no setting names it, and how it is created.

use std::path::{Path, PathBuf};

use super::error::ConfigError;

/// `$STATE_DIRECTORY`'s first entry (set by systemd's `StateDirectory=`), else the per-user
/// data dir.
pub(super) fn default_data_dir() -> Option<PathBuf> {
    if let Some(dirs) = std::env::var_os("STATE_DIRECTORY") {
        if let Some(first) = std::env::split_paths(&dirs).find(|p| !p.as_os_str().is_empty()) {
            return Some(first);
        }
    }
    directories::ProjectDirs::from("", "", "grouprelay").map(|d| d.data_dir().to_path_buf())
}

/// Creates the data dir (mode 0700) if it is missing.
pub fn create_data_dir(dir: &Path) -> Result<(), ConfigError> {
    // Each new directory's name synced into its parent: the queue's files are only as
    // durable as the path to them.
    crate::dirsync::create_dir_all(dir, 0o700).map_err(|e| {
        ConfigError::new(
            "--data-dir",
            format!("cannot create {}: {e}", dir.display()),
        )
    })
}
