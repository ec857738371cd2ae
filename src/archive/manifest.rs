//! The archive manifest: the last stream sequence whose rows are in Parquet.
//!
//! It is the archive's only source of truth about progress. It is written atomically after
//! a commit's files are renamed into place and before the stream is acked; on start the
//! archiver resumes right after it, and removes any file of a commit that never reached it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ArchiveError;
use super::commit::write_atomic;

/// File name of the manifest inside a table directory (ignored by Parquet readers: it does
/// not end in `.parquet`, and Spark skips names that start with `_`).
pub(crate) const MANIFEST_FILE: &str = "_manifest.json";

/// Progress of one archived table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveManifest {
    /// Every stream message up to and including this sequence is in Parquet, exactly once.
    pub last_seq: u64,
    /// Name of the stream the sequences belong to.
    #[serde(default)]
    pub stream: String,
    /// Creation time of that stream, to notice a stream that was deleted and made anew.
    #[serde(default)]
    pub stream_created: Option<String>,
    /// Rows committed over the table's life.
    #[serde(default)]
    pub rows: u64,
    /// When the last commit happened (RFC 3339).
    #[serde(default)]
    pub committed_at: Option<String>,
}

impl ArchiveManifest {
    /// Path of the manifest of the table in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Loads the manifest; a table that was never committed starts at sequence 0.
    pub fn load(dir: &Path) -> Result<Self, ArchiveError> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ArchiveError::Io { path, source }),
        }
    }

    /// Writes the manifest atomically (temp file, fsync, rename, fsync of the directory).
    pub fn store(&self, dir: &Path) -> Result<(), ArchiveError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ArchiveError::Manifest {
            path: Self::path(dir),
            message: e.to_string(),
        })?;
        write_atomic(&Self::path(dir), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_manifest_starts_at_zero_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ArchiveManifest::load(dir.path()).unwrap().last_seq, 0);
        let manifest = ArchiveManifest {
            last_seq: 42,
            stream: "EVENTS".into(),
            rows: 42,
            ..Default::default()
        };
        manifest.store(dir.path()).unwrap();
        assert_eq!(ArchiveManifest::load(dir.path()).unwrap(), manifest);
    }
}
