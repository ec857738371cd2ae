//! Durable file writes: a file replaced atomically and the replacement made durable.
//!
//! The archive, the meter snapshot and the pipelines all write this way: temp file, fsync,
//! rename over the target, fsync of the directory. A crash leaves the old file or the new one,
//! never half of either.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, directory fsync).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent(path)?;
    std::fs::create_dir_all(dir)?;
    let temp = temp_path(path);
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    replace(&temp, path)
}

/// Renames a complete, fsynced `temp` over `path` and makes the rename durable.
pub fn replace(temp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(temp, path)?;
    fsync_dir(parent(path)?)
}

/// Makes a directory's entries (new names, renames, removals) durable.
pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The temp name of `path`: hidden, and not ending in the target's extension, so no reader
/// that lists `*.parquet` or `*.json` picks it up.
pub(crate) fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

fn parent(path: &Path) -> std::io::Result<&Path> {
    path.parent()
        .ok_or_else(|| std::io::Error::other(format!("{} has no parent directory", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_atomic(&path, b"first version, long").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(!temp_path(&path).exists());
    }
}

/// An exclusive lock on a data dir, held for as long as a server runs on it (released when
/// the value is dropped, or the process ends, kill -9 included).
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

/// The lock file's name under a data dir.
pub(crate) const LOCK_FILE: &str = "northstar.lock";

/// Takes the data dir's lock; `None` when another process holds it.
pub fn lock_dir(dir: &Path) -> std::io::Result<Option<DirLock>> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared with the call.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked == 0 {
        return Ok(Some(DirLock(file)));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(None),
        _ => Err(error),
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_data_dir_is_locked_by_one_holder_at_a_time() {
        let dir = std::env::temp_dir().join(format!("northstar-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let first = lock_dir(&dir).expect("lock").expect("free");
        assert!(lock_dir(&dir).expect("lock").is_none(), "held by the first");
        drop(first);
        assert!(lock_dir(&dir).expect("lock").is_some(), "free again");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
