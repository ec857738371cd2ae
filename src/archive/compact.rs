//! Compaction: a day's many small commit files merged into one sorted file.
//!
//! Commits are frequent so that SQL sees events within seconds; compaction keeps a day to a
//! few files. The inputs are already sorted, so the merge streams them (a k-way merge on Arrow
//! row keys) and memory stays at a batch per input whatever the sizes.
//!
//! Protocol: write the merged file under a temp name and fsync it; record the swap in
//! `_compaction.json`; rename the merged file in; remove the inputs; remove the journal. A crash
//! after the rename is rolled forward on start (inputs removed), a crash before it rolled back
//! (the temp file removed). Between the rename and the removals — microseconds — a reader that
//! lists files can see both; the query layer retries a query whose file vanished under it.

use std::fs::File;
use std::path::Path;

use arrow::array::RecordBatch;
use arrow::compute::interleave_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::ArchiveError;
use super::commit::{PartFile, PartName, fsync_dir, temp_path, write_atomic};

/// The journal of a compaction in progress, in the partition directory.
pub(crate) const JOURNAL_FILE: &str = "_compaction.json";

/// Held for reading by in-process queries and for writing by the swap of a compaction, so
/// that a query of this process never lists a day's merged file beside its inputs.
pub(crate) static SWAP_LOCK: std::sync::LazyLock<tokio::sync::RwLock<()>> =
    std::sync::LazyLock::new(|| tokio::sync::RwLock::new(()));

/// Rows per merged output batch, and the most rows read from one input at a time.
const MERGE_BATCH_ROWS: usize = 8_192;

/// Rows the inputs of one merge hold decoded at once, whatever their number: each reads
/// batches of this divided by the inputs (within [`MIN_INPUT_BATCH_ROWS`] and
/// [`MERGE_BATCH_ROWS`]). A merge behind a busy day used to hold 8,192 rows of each of its 30
/// or 40 inputs, 100–180 MiB at 29,000 events/s, growing as the day's file slowed each merge
/// and more commits piled up behind it.
const MERGE_HELD_ROWS: usize = 32_768;

/// The fewest rows one input reads at a time (a smaller batch costs more per row to decode).
const MIN_INPUT_BATCH_ROWS: usize = 1_024;

/// Most files one compaction merges; more wait for the next run. With
/// [`MIN_INPUT_BATCH_ROWS`] this bounds the rows a merge holds at 32 × 1,024; what each input
/// costs beside its rows (a decoded page and a zstd context per column, the dictionaries) is
/// about 2.8 MiB, measured at 64 inputs behind a busy day.
pub(crate) const MAX_INPUTS: usize = 32;

/// Rows each of `inputs` reads at a time.
fn input_batch_rows(inputs: usize) -> usize {
    (MERGE_HELD_ROWS / inputs.max(1)).clamp(MIN_INPUT_BATCH_ROWS, MERGE_BATCH_ROWS)
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    output: String,
    inputs: Vec<String>,
}

/// Picks the files of one partition worth merging: committed (at or below `committed_seq`)
/// and smaller than `target_bytes`, without the oldest while one alone is larger than all
/// the files after it together; then oldest first, until their total would pass
/// `target_bytes` or [`MAX_INPUTS`] are picked. Returns nothing unless at least `min_files`
/// are picked.
///
/// Leaving the large files out makes the merges tiered: a day's large file is rewritten only
/// when the files behind it have grown as large, not after every few commits. Without it
/// each merge of a busy day rewrote the whole of the day's growing file, took longer each
/// time, and found more commits waiting (each a reader held in memory) when it was done.
pub(crate) fn pick_inputs(
    parts: &[PartFile],
    committed_seq: u64,
    min_files: usize,
    target_bytes: u64,
) -> Vec<PartFile> {
    let eligible: Vec<&PartFile> = parts
        .iter()
        .filter(|part| part.name.last_seq <= committed_seq && part.bytes < target_bytes)
        .collect();
    let mut after: u64 = eligible.iter().map(|part| part.bytes).sum();
    let larger_than_the_rest = eligible
        .iter()
        .take_while(|part| {
            after -= part.bytes;
            part.bytes > after
        })
        .count();
    let mut picked = Vec::new();
    let mut total = 0u64;
    for part in &eligible[larger_than_the_rest..] {
        if (total + part.bytes > target_bytes && picked.len() >= min_files)
            || picked.len() == MAX_INPUTS
        {
            break;
        }
        total += part.bytes;
        picked.push((*part).clone());
    }
    if picked.len() >= min_files {
        picked
    } else {
        Vec::new()
    }
}

/// Merges `inputs` (files of one partition, each sorted by `sort_columns`) into one file.
pub fn compact(
    partition_dir: &Path,
    inputs: &[PartFile],
    schema: &SchemaRef,
    sort_columns: &[&str],
    properties: WriterProperties,
) -> Result<PartFile, ArchiveError> {
    let name = PartName {
        first_seq: inputs.iter().map(|p| p.name.first_seq).min().unwrap_or(0),
        last_seq: inputs.iter().map(|p| p.name.last_seq).max().unwrap_or(0),
        compacted: true,
    };
    let output = partition_dir.join(name.file_name());
    let temp = temp_path(&output);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArchiveError::Io { path, source }
    };
    let file = File::create(&temp).map_err(io(&temp))?;
    let handle = file.try_clone().map_err(io(&temp))?;
    let parquet = |source| ArchiveError::WriteParquet {
        path: temp.clone(),
        source,
    };
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(parquet)?;
    merge_sorted(inputs, schema, sort_columns, |batch| {
        writer.write(&batch).map_err(parquet)
    })?;
    writer.close().map_err(parquet)?;
    handle.sync_all().map_err(io(&temp))?;
    let bytes = handle.metadata().map_err(io(&temp))?.len();

    let journal = Journal {
        output: name.file_name(),
        inputs: inputs.iter().map(|p| p.name.file_name()).collect(),
    };
    let journal_bytes = serde_json::to_vec(&journal).unwrap_or_default();
    write_atomic(&partition_dir.join(JOURNAL_FILE), &journal_bytes)?;
    {
        // The rename and the removals are back to back, and durable together after.
        let _swap = SWAP_LOCK.blocking_write();
        std::fs::rename(&temp, &output).map_err(io(&output))?;
        remove_inputs(partition_dir, &journal)?;
    }
    finish_swap(partition_dir, &journal)?;
    Ok(PartFile {
        date: inputs.first().map(|p| p.date.clone()).unwrap_or_default(),
        path: output,
        name,
        bytes,
    })
}

/// Removes the inputs of a swap (those still there).
fn remove_inputs(partition_dir: &Path, journal: &Journal) -> Result<(), ArchiveError> {
    for input in &journal.inputs {
        let path = partition_dir.join(input);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ArchiveError::Io { path, source }),
        }
    }
    Ok(())
}

/// Makes a swap whose output is in place durable: inputs removed, then the journal.
fn finish_swap(partition_dir: &Path, journal: &Journal) -> Result<(), ArchiveError> {
    remove_inputs(partition_dir, journal)?;
    fsync_dir(partition_dir)?;
    let journal_path = partition_dir.join(JOURNAL_FILE);
    std::fs::remove_file(&journal_path).map_err(|source| ArchiveError::Io {
        path: journal_path,
        source,
    })?;
    fsync_dir(partition_dir)
}

/// Completes or undoes a compaction interrupted by a crash. Run before [`super::commit::recover`].
pub(crate) fn recover_compactions(table_dir: &Path) -> Result<usize, ArchiveError> {
    let mut finished = 0;
    let Ok(entries) = std::fs::read_dir(table_dir) else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let journal_path = dir.join(JOURNAL_FILE);
        let Ok(bytes) = std::fs::read(&journal_path) else {
            continue;
        };
        let journal: Journal =
            serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
                path: journal_path.clone(),
                message: e.to_string(),
            })?;
        if dir.join(&journal.output).is_file() {
            tracing::info!(dir = %dir.display(), "finishing an interrupted compaction");
            finish_swap(&dir, &journal)?;
        } else {
            std::fs::remove_file(&journal_path).map_err(|source| ArchiveError::Io {
                path: journal_path.clone(),
                source,
            })?;
            fsync_dir(&dir)?;
        }
        finished += 1;
    }
    Ok(finished)
}

/// One sorted input being merged.
struct Cursor {
    reader: ParquetRecordBatchReader,
    rows: Rows,
    batch_slot: usize,
    position: usize,
    len: usize,
}

/// K-way merge of sorted files; `emit` receives output batches in order.
fn merge_sorted(
    inputs: &[PartFile],
    schema: &SchemaRef,
    sort_columns: &[&str],
    mut emit: impl FnMut(RecordBatch) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let arrow_error = |e: arrow::error::ArrowError| ArchiveError::Arrow(e.to_string());
    let key_indices: Vec<usize> = sort_columns
        .iter()
        .filter_map(|c| schema.index_of(c).ok())
        .collect();
    let converter = RowConverter::new(
        key_indices
            .iter()
            .map(|i| SortField::new(schema.field(*i).data_type().clone()))
            .collect(),
    )
    .map_err(arrow_error)?;
    let keys_of = |batch: &RecordBatch| {
        let columns: Vec<_> = key_indices
            .iter()
            .map(|i| batch.column(*i).clone())
            .collect();
        converter.convert_columns(&columns).map_err(arrow_error)
    };

    let mut slots: Vec<RecordBatch> = Vec::new();
    let mut cursors: Vec<Cursor> = Vec::new();
    let batch_rows = input_batch_rows(inputs.len());
    for input in inputs {
        let file = File::open(&input.path).map_err(|source| ArchiveError::Io {
            path: input.path.clone(),
            source,
        })?;
        let read_error = |e: parquet::errors::ParquetError| ArchiveError::ReadParquet {
            path: input.path.clone(),
            message: e.to_string(),
        };
        let mut reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(read_error)?
            .with_batch_size(batch_rows)
            .build()
            .map_err(read_error)?;
        if let Some(batch) = reader.next().transpose().map_err(arrow_error)? {
            cursors.push(Cursor {
                rows: keys_of(&batch)?,
                len: batch.num_rows(),
                batch_slot: slots.len(),
                position: 0,
                reader,
            });
            slots.push(batch);
        }
    }

    let mut picks: Vec<(usize, usize)> = Vec::with_capacity(MERGE_BATCH_ROWS);
    loop {
        let mut smallest: Option<usize> = None;
        for (i, cursor) in cursors.iter().enumerate() {
            if cursor.position >= cursor.len {
                continue;
            }
            smallest = match smallest {
                Some(j)
                    if cursors[j].rows.row(cursors[j].position)
                        <= cursor.rows.row(cursor.position) =>
                {
                    Some(j)
                }
                _ => Some(i),
            };
        }
        let Some(i) = smallest else { break };
        let cursor = &mut cursors[i];
        picks.push((cursor.batch_slot, cursor.position));
        cursor.position += 1;
        if cursor.position == cursor.len
            && let Some(batch) = cursor.reader.next().transpose().map_err(arrow_error)?
        {
            cursor.rows = keys_of(&batch)?;
            cursor.len = batch.num_rows();
            cursor.position = 0;
            cursor.batch_slot = slots.len();
            slots.push(batch);
        }
        if picks.len() == MERGE_BATCH_ROWS {
            flush(&mut slots, &mut cursors, &mut picks, &mut emit)?;
        }
    }
    flush(&mut slots, &mut cursors, &mut picks, &mut emit)
}

/// Emits the picked rows and forgets the batches no cursor still reads.
fn flush(
    slots: &mut Vec<RecordBatch>,
    cursors: &mut [Cursor],
    picks: &mut Vec<(usize, usize)>,
    emit: &mut impl FnMut(RecordBatch) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    if !picks.is_empty() {
        let refs: Vec<&RecordBatch> = slots.iter().collect();
        let batch = interleave_record_batch(&refs, picks)
            .map_err(|e| ArchiveError::Arrow(e.to_string()))?;
        emit(batch)?;
        picks.clear();
    }
    let mut kept = Vec::with_capacity(cursors.len());
    for cursor in cursors.iter_mut() {
        kept.push(slots[cursor.batch_slot].clone());
        cursor.batch_slot = kept.len() - 1;
    }
    *slots = kept;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::commit::{
        ensure_partition_dir, list_parts, sort_batch, write_parquet_file, writer_properties,
    };
    use arrow::array::{Array, StringArray, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Utf8, true),
            Field::new("seq", DataType::UInt64, false),
        ]))
    }

    fn write_part(dir: &Path, first: u64, customers: &[&str]) {
        let seqs: Vec<u64> = (first..first + customers.len() as u64).collect();
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(customers.to_vec())),
                Arc::new(UInt64Array::from(seqs)),
            ],
        )
        .unwrap();
        let batch = sort_batch(&batch, &["customer_id"]).unwrap();
        let name = PartName {
            first_seq: first,
            last_seq: first + customers.len() as u64 - 1,
            compacted: false,
        };
        let props = writer_properties(&schema(), &["customer_id"], 3, 1024);
        write_parquet_file(&dir.join(name.file_name()), &schema(), [&batch], props).unwrap();
    }

    /// The customer ids and sequences of a merged file, in its order.
    fn read_rows(path: &Path) -> (Vec<String>, Vec<u64>) {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let (mut customers, mut seqs) = (Vec::new(), Vec::new());
        for batch in reader {
            let batch = batch.unwrap();
            let c = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let s = batch
                .column(1)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .unwrap();
            customers.extend((0..c.len()).map(|i| c.value(i).to_string()));
            seqs.extend(s.values().iter().copied());
        }
        (customers, seqs)
    }

    #[test]
    fn merging_keeps_every_row_once_and_in_order() {
        let table = tempfile::tempdir().unwrap();
        let dir = ensure_partition_dir(table.path(), "2026-01-01").unwrap();
        write_part(&dir, 1, &["c", "a", "e"]);
        write_part(&dir, 4, &["b", "d"]);
        write_part(&dir, 6, &["a", "f", "c", "b"]);
        let parts = list_parts(table.path()).unwrap();
        let inputs = pick_inputs(&parts, 9, 3, u64::MAX);
        assert_eq!(inputs.len(), 3);
        let props = writer_properties(&schema(), &["customer_id"], 3, 1024);
        let merged = compact(&dir, &inputs, &schema(), &["customer_id"], props).unwrap();
        assert_eq!((merged.name.first_seq, merged.name.last_seq), (1, 9));

        let parts = list_parts(table.path()).unwrap();
        assert_eq!(parts.len(), 1, "inputs are gone: {parts:?}");
        let (customers, mut seqs) = read_rows(&parts[0].path);
        assert_eq!(customers, vec!["a", "a", "b", "b", "c", "c", "d", "e", "f"]);
        seqs.sort();
        assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
        assert!(!dir.join(JOURNAL_FILE).exists());
    }

    #[test]
    fn uncommitted_or_big_files_are_not_picked() {
        let part = |first: u64, last: u64, bytes: u64| PartFile {
            date: "d".into(),
            path: format!("p{first}").into(),
            name: PartName {
                first_seq: first,
                last_seq: last,
                compacted: false,
            },
            bytes,
        };
        let parts = vec![
            part(1, 10, 100),
            part(11, 20, 5_000),
            part(21, 30, 100),
            part(31, 40, 100),
        ];
        assert_eq!(
            pick_inputs(&parts, 30, 2, 1_000).len(),
            2,
            "the big file and the uncommitted one are left"
        );
        assert!(pick_inputs(&parts, 30, 3, 1_000).is_empty());
    }

    #[test]
    fn a_pick_stops_at_the_most_inputs_one_merge_takes() {
        let parts: Vec<PartFile> = (0..MAX_INPUTS as u64 + 10)
            .map(|i| PartFile {
                date: "d".into(),
                path: format!("p{i}").into(),
                name: PartName {
                    first_seq: i * 10 + 1,
                    last_seq: i * 10 + 10,
                    compacted: false,
                },
                bytes: 100,
            })
            .collect();
        let picked = pick_inputs(&parts, u64::MAX, 2, u64::MAX);
        assert_eq!(picked.len(), MAX_INPUTS);
        assert_eq!(picked[0].name.first_seq, 1, "the oldest first");
    }

    /// A busy day's compacted file is left alone while the commits behind it are smaller
    /// together, so merges stay small and quick; it joins a merge once they have caught up.
    #[test]
    fn a_large_file_joins_a_merge_only_when_the_files_after_it_are_as_large() {
        let part = |i: u64, bytes: u64| PartFile {
            date: "d".into(),
            path: format!("p{i}").into(),
            name: PartName {
                first_seq: i * 10 + 1,
                last_seq: i * 10 + 10,
                compacted: i == 0,
            },
            bytes,
        };
        let day = part(0, 1_000);
        let commits: Vec<PartFile> = (1..=12).map(|i| part(i, 10)).collect();
        let parts: Vec<PartFile> = std::iter::once(day.clone())
            .chain(commits.iter().cloned())
            .collect();
        let picked = pick_inputs(&parts, u64::MAX, 12, u64::MAX);
        assert_eq!(picked.len(), 12, "the commits alone");
        assert!(picked.iter().all(|p| p.bytes == 10));

        // Tiers: the day's file, a merge of earlier commits, new commits. The earlier merge
        // is larger than the new commits together, so they merge alone.
        let mut parts = vec![day.clone(), part(1, 200)];
        parts.extend((2..=13).map(|i| part(i, 10)));
        let picked = pick_inputs(&parts, u64::MAX, 12, u64::MAX);
        assert_eq!(picked.len(), 12);
        assert_eq!(picked[0].name.first_seq, 21);

        // Once the files behind the day's file are as large as it, it merges with them.
        let mut parts = vec![day, part(1, 500), part(2, 400)];
        parts.extend((3..=12).map(|i| part(i, 10)));
        let picked = pick_inputs(&parts, u64::MAX, 12, u64::MAX);
        assert_eq!(picked.len(), 13, "the day's file and all behind it");
        assert_eq!(picked[0].name.first_seq, 1);

        // A day's file near the target does not hold back the commits after it.
        let mut parts = vec![part(0, 990)];
        parts.extend((1..=12).map(|i| part(i, 10)));
        let picked = pick_inputs(&parts, u64::MAX, 12, 1_000);
        assert_eq!(picked.len(), 12, "the commits merge without the day's file");
        assert!(picked.iter().all(|p| p.bytes == 10));
    }

    /// What a merge holds decoded stays at [`MERGE_HELD_ROWS`] (or the floor of a batch per
    /// input) however many inputs it has, and small batches change nothing in the output.
    #[test]
    fn many_inputs_are_read_in_smaller_batches_and_merge_the_same() {
        assert_eq!(input_batch_rows(2), MERGE_BATCH_ROWS);
        assert_eq!(input_batch_rows(16), MERGE_HELD_ROWS / 16);
        assert_eq!(input_batch_rows(MAX_INPUTS), MIN_INPUT_BATCH_ROWS);
        assert!(input_batch_rows(MAX_INPUTS) * MAX_INPUTS <= MERGE_HELD_ROWS);

        let table = tempfile::tempdir().unwrap();
        let dir = ensure_partition_dir(table.path(), "2026-01-01").unwrap();
        let names: Vec<String> = (0..500).map(|i| format!("c{:03}", i * 7 % 500)).collect();
        let rows = 2_500;
        for file in 0..MAX_INPUTS as u64 {
            let customers: Vec<&str> = (0..rows)
                .map(|i| names[(i + file as usize * 13) % names.len()].as_str())
                .collect();
            write_part(&dir, file * rows as u64 + 1, &customers);
        }
        let parts = list_parts(table.path()).unwrap();
        let inputs = pick_inputs(&parts, u64::MAX, 2, u64::MAX);
        assert_eq!(inputs.len(), MAX_INPUTS);
        let props = writer_properties(&schema(), &["customer_id"], 3, 100_000);
        compact(&dir, &inputs, &schema(), &["customer_id"], props).unwrap();
        let parts = list_parts(table.path()).unwrap();
        assert_eq!(parts.len(), 1);
        let (customers, mut seqs) = read_rows(&parts[0].path);
        assert!(
            customers.is_sorted(),
            "the merged file keeps the sort order"
        );
        seqs.sort_unstable();
        let expected: Vec<u64> = (1..=MAX_INPUTS as u64 * rows as u64).collect();
        assert_eq!(seqs, expected, "every row once");
    }

    #[test]
    fn an_interrupted_swap_is_rolled_forward() {
        let table = tempfile::tempdir().unwrap();
        let dir = ensure_partition_dir(table.path(), "2026-01-01").unwrap();
        write_part(&dir, 1, &["a"]);
        write_part(&dir, 2, &["b"]);
        let parts = list_parts(table.path()).unwrap();
        // The state right after the rename: output in place, inputs still there, journal present.
        let output = PartName {
            first_seq: 1,
            last_seq: 2,
            compacted: true,
        };
        std::fs::copy(&parts[0].path, dir.join(output.file_name())).unwrap();
        let journal = Journal {
            output: output.file_name(),
            inputs: parts.iter().map(|p| p.name.file_name()).collect(),
        };
        std::fs::write(
            dir.join(JOURNAL_FILE),
            serde_json::to_vec(&journal).unwrap(),
        )
        .unwrap();
        assert_eq!(recover_compactions(table.path()).unwrap(), 1);
        let left: Vec<_> = list_parts(table.path())
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(left, vec![output]);
    }
}
