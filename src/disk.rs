//! Free space on the disks northstar writes to, and the guard that keeps a reserve on them.
//!
//! JetStream and the archiver must never meet a full disk: nats-server turns JetStream off
//! when a write fails for space, and a Parquet commit that fails is retried until it fits.
//! So a background task reads the free space of every filesystem northstar writes to (the
//! data dir, the Parquet tables, the embedded JetStream store) every
//! `storage.checkInterval`. While one of them has less than `storage.minFreeMb` free, ingest
//! answers 503 `disk_full` with `Retry-After` before anything is stored, `/healthz` answers
//! 503 with `"disk": "full"`, and one `warn` line says so; when space returns, the next read
//! lets requests in again, with no restart. What was acked stays in the stream, and the
//! archiver goes on writing it to Parquet inside the reserve.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::shutdown::{Shutdown, wait_for_stop};

/// Seconds a client is told to wait while the disk is full.
pub(crate) const RETRY_AFTER_SECS: u64 = 5;

/// Ingest refused for space.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the disk holding {path} has {free} bytes free, below the reserve of {reserve} bytes (storage.minFreeMb); northstar takes events again when space is freed"
)]
pub struct DiskFull {
    /// The directory on the fullest filesystem.
    pub path: String,
    /// Bytes free there.
    pub free: u64,
    /// Bytes kept free on it (`storage.minFreeMb`): ingest stops there, before the disk is full.
    pub reserve: u64,
}

/// The reserve, the last reading and whether ingest is refused.
pub struct DiskGuard {
    reserve: u64,
    full: AtomicBool,
    free: AtomicU64,
    fullest: Mutex<String>,
}

impl DiskGuard {
    /// A guard keeping `reserve` bytes free; it refuses nothing until [`DiskGuard::run`] reads.
    pub fn new(reserve: u64) -> Self {
        Self {
            reserve,
            full: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            fullest: Mutex::new(String::new()),
        }
    }

    /// Whether ingest may store events now.
    pub fn admit(&self) -> Result<(), DiskFull> {
        if !self.full.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(DiskFull {
            path: self.fullest.lock().map(|p| p.clone()).unwrap_or_default(),
            free: self.free.load(Ordering::Relaxed),
            reserve: self.reserve,
        })
    }

    /// Whether the reserve is breached on some disk.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// The least free space of the watched filesystems at the last reading (`u64::MAX` before one).
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// The reserve in bytes.
    pub fn reserve_bytes(&self) -> u64 {
        self.reserve
    }

    /// Reads the filesystems of `paths` now and updates the verdict; logs when it changes.
    pub fn check(&self, paths: &[PathBuf]) {
        let mut fullest: Option<(u64, &Path)> = None;
        for path in paths {
            match available_bytes(path) {
                Ok(free) if fullest.is_none_or(|(least, _)| free < least) => {
                    fullest = Some((free, path));
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot read free space")
                }
            }
        }
        let Some((free, path)) = fullest else {
            return;
        };
        self.free.store(free, Ordering::Relaxed);
        if let Ok(mut fullest) = self.fullest.lock() {
            *fullest = path.display().to_string();
        }
        let full = free < self.reserve;
        if self.full.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::warn!(
                    path = %path.display(),
                    free,
                    reserve = self.reserve,
                    "disk full: ingest answers 503 disk_full until space is freed (storage.minFreeMb)"
                );
            } else {
                tracing::info!(path = %path.display(), free, "disk has room again: ingest resumes");
            }
        }
    }

    /// Reads `paths` every `every` until `stop`.
    pub async fn run(
        self: std::sync::Arc<Self>,
        paths: Vec<PathBuf>,
        every: Duration,
        mut stop: Shutdown,
    ) {
        loop {
            self.check(&paths);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                () = wait_for_stop(&mut stop) => return,
            }
        }
    }
}

/// Bytes available to northstar on the filesystem holding `path` (the nearest existing
/// ancestor when `path` does not exist yet).
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    let stat = statvfs(existing)?;
    Ok(stat.available)
}

/// What statvfs says about a filesystem.
#[derive(Debug, Clone, Copy)]
pub struct FsStat {
    /// Bytes an unprivileged writer may still use.
    pub available: u64,
    /// The filesystem's id, to tell filesystems apart.
    pub id: u64,
}

/// statvfs(3) of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> std::io::Result<FsStat> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between libcs
    Ok(FsStat {
        available: (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64),
        id: stat.f_fsid as u64,
    })
}

/// Bytes of the files under `dir` (0 when it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_bytes(&entry.path()),
            Ok(_) => entry.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read_from_the_nearest_existing_directory() {
        let free = available_bytes(Path::new("/tmp/does/not/exist/yet")).unwrap();
        assert!(free > 0);
    }

    #[test]
    fn the_guard_refuses_below_the_reserve_and_admits_again_above_it() {
        let dir = vec![std::env::temp_dir()];
        let free = available_bytes(&dir[0]).unwrap();
        let guard = DiskGuard::new(u64::MAX);
        assert_eq!(guard.admit(), Ok(()), "nothing read yet: nothing refused");
        guard.check(&dir);
        let full = guard.admit().unwrap_err();
        assert!(full.to_string().contains("storage.minFreeMb"), "{full}");
        assert!(full.free <= free * 2 && guard.is_full());
        let roomy = DiskGuard::new(0);
        roomy.check(&dir);
        assert_eq!(roomy.admit(), Ok(()));
    }
}
