//! Collecting an answer within its bounds: `sql.maxRows` rows and `sql.maxAnswerBytes` bytes.
//!
//! The memory pool bounds what DataFusion's operators hold while they work, not the batches
//! an answer keeps once they come out, so the answer counts those itself as they stream in.

use std::collections::HashSet;

use arrow::array::{Array, ArrayData, RecordBatch};
use datafusion::error::Result;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

/// Why an answer was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// At `sql.maxRows` rows.
    Rows,
    /// At `sql.maxAnswerBytes` bytes, held or encoded.
    Bytes,
}

impl Truncation {
    /// The name answers give it (`truncated_by`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Rows => "rows",
            Self::Bytes => "bytes",
        }
    }

    /// What to do about it, for people.
    pub fn advice(self) -> &'static str {
        match self {
            Self::Rows => "cut at the row limit; add LIMIT or raise sql.maxRows",
            Self::Bytes => {
                "cut at the byte limit; select fewer columns, add LIMIT or raise sql.maxAnswerBytes"
            }
        }
    }
}

/// The bounds of one answer.
#[derive(Debug, Clone, Copy)]
pub struct AnswerBounds {
    /// Most rows.
    pub rows: usize,
    /// Most bytes.
    pub bytes: usize,
}

/// Reads `stream` until it ends or a bound is reached: the batches kept, and what cut them.
/// A batch that crosses a bound is kept in part, so a large first batch still answers.
pub async fn collect(
    mut stream: SendableRecordBatchStream,
    bounds: AnswerBounds,
) -> Result<(Vec<RecordBatch>, Option<Truncation>)> {
    let mut batches = Vec::new();
    let mut rows = 0;
    let mut held = HeldBytes::default();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let before = held.total;
        let after = held.add(&batch);
        if after > bounds.bytes {
            let room = bounds.bytes.saturating_sub(before) as u128;
            let share = room * batch.num_rows() as u128 / (after - before).max(1) as u128;
            let keep = usize::try_from(share).unwrap_or(0).min(bounds.rows - rows);
            batches.push(batch.slice(0, keep));
            return Ok((batches, Some(Truncation::Bytes)));
        }
        let room = bounds.rows - rows;
        if batch.num_rows() > room {
            batches.push(batch.slice(0, room));
            return Ok((batches, Some(Truncation::Rows)));
        }
        rows += batch.num_rows();
        batches.push(batch);
    }
    Ok((batches, None))
}

/// Bytes held by the batches of an answer. Batches are often slices of one larger array (an
/// aggregate's output, a limit), so each buffer counts once, at its allocation's size: the
/// memory the answer keeps alive, which [`RecordBatch::get_array_memory_size`] would count
/// again for every slice.
#[derive(Debug, Default)]
pub(crate) struct HeldBytes {
    seen: HashSet<usize>,
    /// Bytes so far.
    pub total: usize,
}

impl HeldBytes {
    /// Counts the buffers of `batch` not counted yet; returns the new total.
    pub(crate) fn add(&mut self, batch: &RecordBatch) -> usize {
        let mut open: Vec<ArrayData> = batch.columns().iter().map(|c| c.to_data()).collect();
        while let Some(data) = open.pop() {
            let nulls = data.nulls().map(|n| n.buffer());
            for buffer in data.buffers().iter().chain(nulls) {
                if self.seen.insert(buffer.data_ptr().as_ptr() as usize) {
                    self.total = self
                        .total
                        .saturating_add(buffer.capacity().max(buffer.len()));
                }
            }
            open.extend(data.child_data().iter().cloned());
        }
        self.total
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    use super::*;

    fn numbers(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    fn stream(batches: Vec<RecordBatch>) -> SendableRecordBatchStream {
        let schema = batches[0].schema();
        Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(batches.into_iter().map(Ok)),
        ))
    }

    #[test]
    fn slices_of_one_array_count_once() {
        let big = numbers(100_000);
        let mut held = HeldBytes::default();
        for start in (0..100_000).step_by(10_000) {
            held.add(&big.slice(start, 10_000));
        }
        assert!(
            held.total >= 800_000 && held.total < 900_000,
            "{}",
            held.total
        );
    }

    #[tokio::test]
    async fn answers_stop_at_the_byte_bound_and_at_the_row_bound() {
        let batches = (0..10).map(|_| numbers(10_000)).collect();
        let bounds = AnswerBounds {
            rows: 1_000_000,
            bytes: 250_000,
        };
        let (kept, cut) = collect(stream(batches), bounds).await.unwrap();
        let rows: usize = kept.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(cut, Some(Truncation::Bytes));
        assert!((25_000..=31_250).contains(&rows), "{rows} rows of 8 bytes");

        let batches = (0..10).map(|_| numbers(10_000)).collect();
        let bounds = AnswerBounds {
            rows: 15_000,
            bytes: 1 << 30,
        };
        let (kept, cut) = collect(stream(batches), bounds).await.unwrap();
        let rows: usize = kept.iter().map(RecordBatch::num_rows).sum();
        assert_eq!((rows, cut), (15_000, Some(Truncation::Rows)));
    }
}
