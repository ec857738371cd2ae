//! Erasing a person's rows from the archive (see [`crate::erasure`] for the whole erasure).
//!
//! Each file that may hold the person's events (its first sequence at or below the erasure's)
//! is read for its `seq`, `user_id` and `anonymous_id` columns. A file with none of the
//! person's rows is left alone. Otherwise the sequences of those rows are recorded in the
//! erasure log first (so the stream messages are deleted even after a crash), then the file is
//! written again without them under its temp name, fsynced, and renamed over the original: a
//! crash leaves the old file or the new one, never half of either (recovery removes the temp
//! file), and a rewrite run again finds nothing more to take out. The new file keeps its name,
//! its order and everyone else's rows, so every other event stays in Parquet exactly once.
//!
//! It runs on the archiver's compaction thread, so a file is never merged and rewritten at
//! once, and renames under [`SWAP_LOCK`], so no query of this process reads half of a swap.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, UInt64Type};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::commit::{PartFile, fsync_dir, list_parts, temp_path, writer_properties};
use super::compact::SWAP_LOCK;
use super::{ArchiveError, TableFormat};
use crate::config::ArchiveSettings;
use crate::erasure::{Erasure, Erasures, Phase};

/// Env var, read in debug builds only, that pauses this many milliseconds after each
/// rewritten file is written and before it replaces the original: the crash tests kill the
/// process inside an erasure with it.
const PAUSE_ENV: &str = "NORTHSTAR_TEST_ERASE_PAUSE_MS";

/// Rewrites the files of the table in `dir` that hold rows of `job`'s ids at or below its
/// sequence, then moves the erasure on to deleting its stream messages.
pub(crate) fn rewrite<F: TableFormat>(
    format: &F,
    dir: &Path,
    settings: &ArchiveSettings,
    erasures: &Erasures,
    job: &Erasure,
) -> Result<(), ArchiveError> {
    let ids: HashSet<&str> = job.ids.iter().map(String::as_str).collect();
    let parts: Vec<PartFile> = list_parts(dir)?
        .into_iter()
        .filter(|p| p.name.first_seq <= job.upto_seq)
        .collect();
    let total = parts.len() as u64;
    erasures.progress(&job.job, 0, total);
    let mut rewritten = 0;
    for (done, part) in parts.iter().enumerate() {
        let seqs = erased_rows(part, &ids, job.upto_seq)?;
        if !seqs.is_empty() {
            erasures
                .found(&job.job, &seqs)
                .map_err(|e| io(&part.path, e))?;
            write_without(format, part, settings, &ids, job.upto_seq)?;
            rewritten += 1;
        }
        erasures.progress(&job.job, done as u64 + 1, total);
    }
    tracing::info!(
        job = job.job,
        files = total,
        rewritten,
        "erased the person's rows from Parquet"
    );
    erasures
        .advance(&job.job, Phase::Deleting)
        .map_err(|e| io(dir, e))
}

fn io(path: &Path, error: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(error.to_string()),
    }
}

fn reader_error(part: &PartFile) -> impl Fn(parquet::errors::ParquetError) -> ArchiveError + '_ {
    |e| ArchiveError::ReadParquet {
        path: part.path.clone(),
        message: e.to_string(),
    }
}

/// Which rows of `batch` are the person's erased events, and the rows' sequences.
fn erased_mask(
    batch: &RecordBatch,
    ids: &HashSet<&str>,
    upto: u64,
) -> Result<(BooleanArray, UInt64Array), ArchiveError> {
    let arrow = |e: arrow::error::ArrowError| ArchiveError::Arrow(e.to_string());
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| ArchiveError::Arrow(format!("no column `{name}`")))
    };
    let seqs = cast(column("seq")?, &DataType::UInt64).map_err(arrow)?;
    let seqs = seqs.as_primitive::<UInt64Type>().clone();
    let users = cast(column("user_id")?, &DataType::Utf8).map_err(arrow)?;
    let users = users.as_string::<i32>();
    let anonymous = cast(column("anonymous_id")?, &DataType::Utf8).map_err(arrow)?;
    let anonymous = anonymous.as_string::<i32>();
    let of = |array: &arrow::array::StringArray, row: usize| {
        array.is_valid(row) && ids.contains(array.value(row))
    };
    let mask = (0..batch.num_rows())
        .map(|row| Some(seqs.value(row) <= upto && (of(users, row) || of(anonymous, row))))
        .collect();
    Ok((mask, seqs))
}

/// The sequences of the person's rows in `part`.
fn erased_rows(part: &PartFile, ids: &HashSet<&str>, upto: u64) -> Result<Vec<u64>, ArchiveError> {
    let file = File::open(&part.path).map_err(|source| ArchiveError::Io {
        path: part.path.clone(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(reader_error(part))?;
    let projection =
        ProjectionMask::columns(builder.parquet_schema(), ["seq", "user_id", "anonymous_id"]);
    let reader = builder
        .with_projection(projection)
        .build()
        .map_err(reader_error(part))?;
    let mut seqs = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| ArchiveError::Arrow(e.to_string()))?;
        let (mask, column) = erased_mask(&batch, ids, upto)?;
        seqs.extend(
            (0..batch.num_rows())
                .filter(|row| mask.value(*row))
                .map(|row| column.value(row)),
        );
    }
    Ok(seqs)
}

/// Writes `part` again without the person's rows, and swaps it in.
fn write_without<F: TableFormat>(
    format: &F,
    part: &PartFile,
    settings: &ArchiveSettings,
    ids: &HashSet<&str>,
    upto: u64,
) -> Result<(), ArchiveError> {
    let schema = format.schema();
    let input = File::open(&part.path).map_err(|source| ArchiveError::Io {
        path: part.path.clone(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(input)
        .and_then(|b| b.build())
        .map_err(reader_error(part))?;
    let temp = temp_path(&part.path);
    let io = |source| ArchiveError::Io {
        path: temp.clone(),
        source,
    };
    let file = File::create(&temp).map_err(io)?;
    let handle = file.try_clone().map_err(io)?;
    let parquet = |source| ArchiveError::WriteParquet {
        path: temp.clone(),
        source,
    };
    let properties = writer_properties(
        &schema,
        format.sort_columns(),
        settings.zstd_level,
        settings.row_group_rows,
    );
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(parquet)?;
    for batch in reader {
        let batch = batch.map_err(|e| ArchiveError::Arrow(e.to_string()))?;
        let (erased, _) = erased_mask(&batch, ids, upto)?;
        let keep = arrow::compute::not(&erased).map_err(|e| ArchiveError::Arrow(e.to_string()))?;
        let kept =
            filter_record_batch(&batch, &keep).map_err(|e| ArchiveError::Arrow(e.to_string()))?;
        if kept.num_rows() > 0 {
            writer.write(&kept).map_err(parquet)?;
        }
    }
    writer.close().map_err(parquet)?;
    handle.sync_all().map_err(io)?;
    pause_for_tests();
    {
        let _swap = SWAP_LOCK.blocking_write();
        std::fs::rename(&temp, &part.path).map_err(|source| ArchiveError::Io {
            path: part.path.clone(),
            source,
        })?;
    }
    let dir = part.path.parent().unwrap_or(Path::new("."));
    fsync_dir(dir)
}

fn pause_for_tests() {
    if cfg!(debug_assertions)
        && let Some(ms) = std::env::var(PAUSE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
