//! The commit protocol on disk, and recovery from a crash at any point of it.
//!
//! A commit writes each partition's rows to `.part-….parquet.tmp` (a name no Parquet reader
//! lists), fsyncs it, renames it to `part-<first>-<last>.parquet`, fsyncs the directory, and
//! only then records `<last>` in the manifest. Recovery deletes temp files and every file whose
//! `<last>` is past the manifest: those belong to a commit that did not finish, and their rows
//! will be written again from the stream.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::compute::{SortColumn, lexsort_to_indices, take_record_batch};
use arrow::datatypes::Schema;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::ArchiveError;

/// Columns with (nearly) unique values: dictionary encoding only costs time there.
const UNIQUE_COLUMNS: &[&str] = &[
    "event_id",
    "rejected_id",
    "properties",
    "context",
    "payload",
    "reasons",
];

/// The sequence range a Parquet file holds, parsed from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartName {
    /// First stream sequence of the commit (or of the compacted files).
    pub first_seq: u64,
    /// Last stream sequence of the commit (or of the compacted files).
    pub last_seq: u64,
    /// Whether compaction wrote it.
    pub compacted: bool,
}

impl PartName {
    /// The file name: `part-<first>-<last>.parquet`, `-c` before the extension when compacted.
    pub fn file_name(&self) -> String {
        let suffix = if self.compacted { "-c" } else { "" };
        format!(
            "part-{:020}-{:020}{suffix}.parquet",
            self.first_seq, self.last_seq
        )
    }

    /// Parses a file name written by [`PartName::file_name`].
    pub fn parse(name: &str) -> Option<Self> {
        let stem = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
        let (stem, compacted) = match stem.strip_suffix("-c") {
            Some(stem) => (stem, true),
            None => (stem, false),
        };
        let (first, last) = stem.split_once('-')?;
        Some(Self {
            first_seq: first.parse().ok()?,
            last_seq: last.parse().ok()?,
            compacted,
        })
    }
}

/// A Parquet file of a table, found on disk.
#[derive(Debug, Clone)]
pub struct PartFile {
    /// Partition date (`YYYY-MM-DD`).
    pub date: String,
    /// Full path.
    pub path: PathBuf,
    /// Its sequence range.
    pub name: PartName,
    /// Size in bytes.
    pub bytes: u64,
}

/// Most bytes of one encoded data page, and of a column's dictionary page. A reader holds a
/// decoded page and dictionary per column: a compaction merging a busy day's large files held
/// Parquet's default of 1 MiB each, for every column of every input, 60–80 MiB above its
/// usual working set. Smaller pages also give the page index finer ranges to skip.
pub(crate) const PAGE_BYTES: usize = 128 * 1024;

/// Values the writer encodes between checks of [`PAGE_BYTES`]: a page may pass the bound by
/// this many values (a few hundred bytes each in the `properties` column).
const WRITE_BATCH_VALUES: usize = 256;

/// Parquet settings of every file: zstd, page statistics, sorted-by metadata, row groups of
/// `row_group_rows` so pruning has a useful granularity, pages of at most [`PAGE_BYTES`].
pub fn writer_properties(
    schema: &Schema,
    sort_columns: &[&str],
    zstd_level: i32,
    row_group_rows: usize,
) -> WriterProperties {
    let level = ZstdLevel::try_new(zstd_level).unwrap_or_default();
    let sorting: Vec<SortingColumn> = sort_columns
        .iter()
        .filter_map(|name| schema.index_of(name).ok())
        .filter_map(|index| i32::try_from(index).ok())
        .map(|column_idx| SortingColumn {
            column_idx,
            descending: false,
            nulls_first: true,
        })
        .collect();
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .set_data_page_size_limit(PAGE_BYTES)
        .set_dictionary_page_size_limit(PAGE_BYTES)
        .set_write_batch_size(WRITE_BATCH_VALUES)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_sorting_columns(Some(sorting))
        .set_created_by(format!("northstar {}", env!("CARGO_PKG_VERSION")));
    for column in UNIQUE_COLUMNS {
        if schema.index_of(column).is_ok() {
            builder = builder.set_column_dictionary_enabled(ColumnPath::from(*column), false);
        }
    }
    builder.build()
}

/// Sorts a batch by the given columns (ascending, nulls first).
pub fn sort_batch(
    batch: &RecordBatch,
    columns: &[&str],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let keys: Vec<SortColumn> = columns
        .iter()
        .filter_map(|name| batch.column_by_name(name))
        .map(|values| SortColumn {
            values: values.clone(),
            options: None,
        })
        .collect();
    if keys.is_empty() || batch.num_rows() < 2 {
        return Ok(batch.clone());
    }
    let indices = lexsort_to_indices(&keys, None)?;
    take_record_batch(batch, &indices)
}

/// Writes `batches` as one Parquet file at `path`: temp name, fsync, rename, directory fsync.
/// Returns the file size.
pub fn write_parquet_file<'a>(
    path: &Path,
    schema: &arrow::datatypes::SchemaRef,
    batches: impl IntoIterator<Item = &'a RecordBatch>,
    properties: WriterProperties,
) -> Result<u64, ArchiveError> {
    write_parquet_file_with(path, schema, batches, properties, &[])
}

/// [`write_parquet_file`], with `metadata` as key-value pairs in the file's footer (what the
/// file reflects, read back with [`key_value`]).
pub(crate) fn write_parquet_file_with<'a>(
    path: &Path,
    schema: &arrow::datatypes::SchemaRef,
    batches: impl IntoIterator<Item = &'a RecordBatch>,
    properties: WriterProperties,
    metadata: &[(&str, String)],
) -> Result<u64, ArchiveError> {
    let dir = parent(path)?;
    let temp = temp_path(path);
    let io = |source: std::io::Error| ArchiveError::Io {
        path: temp.clone(),
        source,
    };
    let file = File::create(&temp).map_err(io)?;
    let handle = file.try_clone().map_err(io)?;
    let parquet = |source: parquet::errors::ParquetError| ArchiveError::WriteParquet {
        path: temp.clone(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(parquet)?;
    for batch in batches {
        writer.write(batch).map_err(parquet)?;
    }
    for (key, value) in metadata {
        writer.append_key_value_metadata(parquet::file::metadata::KeyValue::new(
            key.to_string(),
            value.clone(),
        ));
    }
    writer.close().map_err(parquet)?;
    handle.sync_all().map_err(io)?;
    let bytes = handle.metadata().map_err(io)?.len();
    std::fs::rename(&temp, path).map_err(|source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    fsync_dir(dir)?;
    Ok(bytes)
}

/// The value of `key` in a Parquet footer's key-value metadata.
pub(crate) fn key_value(
    metadata: &parquet::file::metadata::FileMetaData,
    key: &str,
) -> Option<String> {
    metadata
        .key_value_metadata()?
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
}

/// Writes a small file atomically: temp, fsync, rename, directory fsync.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ArchiveError> {
    crate::files::write_atomic(path, bytes).map_err(|source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes a directory's entries (new names, renames, removals) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), ArchiveError> {
    crate::files::fsync_dir(dir).map_err(|source| ArchiveError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates a partition directory, making its name durable in the table directory.
pub fn ensure_partition_dir(table_dir: &Path, date: &str) -> Result<PathBuf, ArchiveError> {
    let dir = table_dir.join(format!("date={date}"));
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).map_err(|source| ArchiveError::Io {
            path: dir.clone(),
            source,
        })?;
        fsync_dir(table_dir)?;
    }
    Ok(dir)
}

pub(crate) use crate::files::temp_path;

fn parent(path: &Path) -> Result<&Path, ArchiveError> {
    path.parent().ok_or_else(|| ArchiveError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other("path has no parent directory"),
    })
}

/// Every Parquet file of the table in `table_dir`, by date then sequence.
pub fn list_parts(table_dir: &Path) -> Result<Vec<PartFile>, ArchiveError> {
    let mut parts = Vec::new();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArchiveError::Io { path, source }
    };
    let entries = match std::fs::read_dir(table_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(parts),
        Err(e) => return Err(io(table_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(table_dir))?;
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        let Some(date) = dir_name.strip_prefix("date=") else {
            continue;
        };
        let dir = entry.path();
        for file in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let file = file.map_err(io(&dir))?;
            let file_name = file.file_name().to_string_lossy().into_owned();
            if let Some(name) = PartName::parse(&file_name) {
                let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
                parts.push(PartFile {
                    date: date.to_string(),
                    path: file.path(),
                    name,
                    bytes,
                });
            }
        }
    }
    parts.sort_by(|a, b| {
        (&a.date, a.name.first_seq, a.name.last_seq).cmp(&(
            &b.date,
            b.name.first_seq,
            b.name.last_seq,
        ))
    });
    Ok(parts)
}

/// What recovery found and removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Temp files of interrupted writes.
    pub temp_files: usize,
    /// Files of a commit that never reached the manifest.
    pub uncommitted_files: usize,
}

/// Removes what an interrupted commit left behind, so the table holds exactly the rows up to
/// `committed_seq`. Run before the archiver resumes after `committed_seq`.
pub(crate) fn recover(table_dir: &Path, committed_seq: u64) -> Result<Recovery, ArchiveError> {
    let mut recovery = Recovery::default();
    let remove = |path: &Path| {
        std::fs::remove_file(path).map_err(|source| ArchiveError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let Ok(entries) = std::fs::read_dir(table_dir) else {
        return Ok(recovery);
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("date=") {
            continue;
        }
        let mut touched = false;
        for file in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                remove(&file.path())?;
                recovery.temp_files += 1;
                touched = true;
            } else if let Some(part) = PartName::parse(&name)
                && part.last_seq > committed_seq
            {
                tracing::warn!(file = %file.path().display(), committed_seq, "removing a file of an unfinished commit");
                remove(&file.path())?;
                recovery.uncommitted_files += 1;
                touched = true;
            }
        }
        if touched {
            fsync_dir(&dir)?;
        }
    }
    Ok(recovery)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_round_trip() {
        let name = PartName {
            first_seq: 1,
            last_seq: 500,
            compacted: false,
        };
        assert_eq!(
            name.file_name(),
            "part-00000000000000000001-00000000000000000500.parquet"
        );
        assert_eq!(PartName::parse(&name.file_name()), Some(name));
        let compacted = PartName {
            compacted: true,
            ..name
        };
        assert_eq!(PartName::parse(&compacted.file_name()), Some(compacted));
        assert_eq!(PartName::parse(".part-1-2.parquet.tmp"), None);
        assert_eq!(PartName::parse("part-x-2.parquet"), None);
    }

    #[test]
    fn recovery_removes_temp_files_and_unfinished_commits() {
        let table = tempfile::tempdir().unwrap();
        let dir = ensure_partition_dir(table.path(), "2026-01-01").unwrap();
        let committed = PartName {
            first_seq: 1,
            last_seq: 10,
            compacted: false,
        };
        let unfinished = PartName {
            first_seq: 11,
            last_seq: 20,
            compacted: false,
        };
        std::fs::write(dir.join(committed.file_name()), b"x").unwrap();
        std::fs::write(dir.join(unfinished.file_name()), b"x").unwrap();
        std::fs::write(temp_path(&dir.join("part-21-30.parquet")), b"x").unwrap();
        let recovery = recover(table.path(), 10).unwrap();
        assert_eq!(
            recovery,
            Recovery {
                temp_files: 1,
                uncommitted_files: 1
            }
        );
        let left: Vec<_> = list_parts(table.path())
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(left, vec![committed]);
    }
}
