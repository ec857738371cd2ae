//! The archiver's write buffer as SQL sees it: rows taken from the stream but not yet in a
//! committed Parquet file.
//!
//! The archiver seals what it has buffered into record batches every [`SEAL_EVERY`] (and
//! before each commit), and publishes each sealed chunk here. A commit takes the sealed
//! chunks; once its manifest is durable the archiver publishes the new committed sequence and
//! the chunks it covered leave. A reader takes a [`Snapshot`]: the committed sequence and the
//! chunks after it, read under one lock, so together with the committed files (read with
//! `seq <= committed`) every row up to the last sealed sequence is seen exactly once, however a
//! commit interleaves with the query. This is how InfluxDB 3 serves its write buffer.
//!
//! Memory: the chunks are the buffer the archiver holds anyway (at most twice the commit
//! bounds, plus the commit in flight); a snapshot only shares them.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use arrow::array::RecordBatch;

/// How often the archiver seals its buffer for SQL: the most an event taken in by the
/// archiver waits before a query sees it.
pub(crate) const SEAL_EVERY: Duration = Duration::from_millis(100);

/// Rows of one date partition, sealed together.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The partition's date (`YYYY-MM-DD`), the `date` column of its rows.
    pub date: String,
    /// The rows, in the table's file schema.
    pub batch: RecordBatch,
    /// The last stream sequence sealed with this chunk (its rows are at or below it).
    pub last_seq: u64,
}

/// What a query reads besides the committed files.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every row at or below it is in a committed file.
    pub committed: u64,
    /// Sealed rows after `committed`, in stream order.
    pub chunks: Vec<Chunk>,
}

/// The published write buffer of one archived table; shared by the archiver and the query
/// engine.
#[derive(Debug, Default)]
pub struct LiveRows {
    state: RwLock<Snapshot>,
}

impl LiveRows {
    /// A new, empty buffer.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The committed sequence and the sealed chunks after it, as one consistent view.
    pub fn snapshot(&self) -> Snapshot {
        match self.state.read() {
            Ok(state) => state.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Adds chunks sealed by the archiver.
    pub fn seal(&self, chunks: impl IntoIterator<Item = Chunk>) {
        self.write(|state| state.chunks.extend(chunks));
    }

    /// A commit up to `committed` is durable: its chunks leave.
    pub fn committed(&self, committed: u64) {
        self.write(|state| {
            state.committed = committed;
            state.chunks.retain(|chunk| chunk.last_seq > committed);
        });
    }

    /// The archiver restarts from its manifest at `committed`: what it held is dropped (it
    /// comes again from the stream).
    pub fn reset(&self, committed: u64) {
        self.write(|state| {
            state.committed = committed;
            state.chunks.clear();
        });
    }

    /// The last sequence a query sees: the last sealed, else the last committed.
    pub fn visible_seq(&self) -> u64 {
        let state = self.snapshot_ref();
        state
            .chunks
            .last()
            .map_or(state.committed, |chunk| chunk.last_seq)
    }

    fn snapshot_ref(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        match self.state.read() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn write(&self, change: impl FnOnce(&mut Snapshot)) {
        let mut state = match self.state.write() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        change(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::UInt64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn chunk(seqs: std::ops::RangeInclusive<u64>) -> Chunk {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "seq",
            DataType::UInt64,
            false,
        )]));
        let last_seq = *seqs.end();
        let column = Arc::new(UInt64Array::from_iter_values(seqs));
        Chunk {
            date: "2026-12-02".into(),
            batch: RecordBatch::try_new(schema, vec![column]).expect("batch"),
            last_seq,
        }
    }

    #[test]
    fn a_commit_takes_away_exactly_the_chunks_it_covered() {
        let live = LiveRows::new();
        live.seal([chunk(1..=10), chunk(11..=20)]);
        live.seal([chunk(21..=25)]);
        assert_eq!(live.visible_seq(), 25);
        live.committed(20);
        let snapshot = live.snapshot();
        assert_eq!(snapshot.committed, 20);
        assert_eq!(
            snapshot
                .chunks
                .iter()
                .map(|c| c.last_seq)
                .collect::<Vec<_>>(),
            [25]
        );
        live.reset(20);
        assert!(live.snapshot().chunks.is_empty());
        assert_eq!(live.visible_seq(), 20);
    }
}
