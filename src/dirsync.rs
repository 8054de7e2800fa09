//! Directory durability: a file's *name* survives power loss only once its directory is
//! fsynced.
//!
//! An fsync of a file makes its data durable, not the directory entry that leads to it
//! (POSIX promises nothing more, and filesystems differ in what they do beyond it). A file
//! created, written and fsynced, whose directory was not, can be gone after a power cut,
//! with everything in it. sled creates its files (`db`, `conf`, `blobs/`, snapshots) and
//! syncs no directory (`docs/sled.md`), so grouprelay does it for every directory an
//! acknowledged call depends on, once, when the names are made: at start, never per request.
//! `tests/power_loss.rs` is what shows that this is needed and enough.

use std::fs::File;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Makes the entries of `dir` durable: the names created, renamed or removed in it so far.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and each missing directory above it with `mode`, and makes each new name
/// durable by syncing the directory that holds it. Does nothing if `dir` exists.
pub fn create_dir_all(dir: &Path, mode: u32) -> io::Result<()> {
    // The missing directories, deepest first.
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at.filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
        missing.push(path.to_owned());
        at = path.parent();
    }
    for path in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(mode).create(path) {
            Ok(()) => {}
            // Made meanwhile by someone else: its name is theirs to sync, but syncing it
            // again below costs nothing and harms nothing.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    for path in &missing {
        sync_dir(parent_of(path))?;
    }
    Ok(())
}

/// The directory holding `path` (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_every_missing_level_with_the_mode() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("a/b/c");
        create_dir_all(&dir, 0o700).unwrap();
        for level in ["a", "a/b", "a/b/c"] {
            let meta = std::fs::metadata(top.path().join(level)).unwrap();
            assert!(meta.is_dir(), "{level}");
            assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{level}");
        }
        // Existing: nothing to do, no error.
        create_dir_all(&dir, 0o700).unwrap();
    }

    #[test]
    fn a_file_in_place_of_a_directory_is_an_error() {
        let top = tempfile::tempdir().unwrap();
        std::fs::write(top.path().join("a"), b"").unwrap();
        assert!(create_dir_all(&top.path().join("a/b"), 0o700).is_err());
    }

    #[test]
    fn a_bare_name_lives_in_the_current_directory() {
        assert_eq!(parent_of(Path::new("data")), Path::new("."));
        assert_eq!(parent_of(Path::new("/var/lib/x")), Path::new("/var/lib"));
    }
}
