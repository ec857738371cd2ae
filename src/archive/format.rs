//! The two archived tables: how a stream message becomes a row in a date partition.
//!
//! Rows are appended straight into Arrow column builders, one set per date partition, so a
//! buffered event costs about its size in memory and a commit only has to sort and encode.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, Float64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;

use crate::catalog::{self, Table};
use crate::event::EventView;
use crate::rejected::RejectedView;

/// Buffered rows by partition day (days since the Unix epoch, UTC); the `YYYY-MM-DD` text
/// is only made at commit time.
pub type Partitions<R> = BTreeMap<i64, R>;

/// The UTC day (since the epoch) of a timestamp in microseconds.
pub(crate) fn day_of(micros: i64) -> i64 {
    micros.div_euclid(86_400_000_000)
}

/// A table the archiver writes: two real implementations, events and rejected messages.
pub trait TableFormat: Send + Sync + 'static {
    /// Column builders of one partition.
    type Rows: Send + 'static;
    /// The table it writes, from the catalog.
    fn table(&self) -> &'static Table;
    /// Directory under the data dir, also the table's name in messages.
    fn dir(&self) -> &'static str {
        self.table().dir
    }
    /// Arrow schema of the files (without the `date` partition column).
    fn schema(&self) -> SchemaRef {
        (self.table().schema)()
    }
    /// Columns each file is sorted by, so row-group statistics prune on them.
    fn sort_columns(&self) -> &'static [&'static str] {
        self.table().sorted_by
    }
    /// Decodes one stream message and appends it to its partition.
    fn append(
        &self,
        seq: u64,
        payload: &[u8],
        partitions: &mut Partitions<Self::Rows>,
    ) -> Result<(), serde_json::Error>;
    /// Rows buffered in one partition.
    fn len(rows: &Self::Rows) -> usize;
    /// Turns what a partition's builders hold into a record batch, leaving them empty.
    fn finish(&self, rows: &mut Self::Rows) -> Result<RecordBatch, ArrowError>;
}

fn timestamps() -> TimestampMicrosecondBuilder {
    TimestampMicrosecondBuilder::new().with_timezone("UTC")
}

/// The `events` table.
pub struct EventsFormat;

/// Column builders of the `events` table.
#[derive(Default)]
pub struct EventRows {
    event_id: StringBuilder,
    seq: UInt64Builder,
    kind: StringBuilder,
    event: StringBuilder,
    user_id: StringBuilder,
    anonymous_id: StringBuilder,
    customer_id: StringBuilder,
    timestamp: TimestampMicrosecondBuilder,
    received_at: TimestampMicrosecondBuilder,
    properties: StringBuilder,
    context: StringBuilder,
    source: StringBuilder,
    schema_version: StringBuilder,
    sample_rate: Float64Builder,
}

impl TableFormat for EventsFormat {
    type Rows = EventRows;

    fn table(&self) -> &'static Table {
        &catalog::EVENTS
    }

    fn append(
        &self,
        seq: u64,
        payload: &[u8],
        partitions: &mut Partitions<EventRows>,
    ) -> Result<(), serde_json::Error> {
        let view = EventView::decode(payload)?;
        let rows = partitions
            .entry(day_of(view.timestamp))
            .or_insert_with(|| EventRows {
                timestamp: timestamps(),
                received_at: timestamps(),
                ..Default::default()
            });
        rows.event_id.append_value(&view.event_id);
        rows.seq.append_value(seq);
        rows.kind.append_value(view.kind.as_str());
        rows.event.append_option(view.event.as_deref());
        rows.user_id.append_option(view.user_id.as_deref());
        rows.anonymous_id
            .append_option(view.anonymous_id.as_deref());
        rows.customer_id.append_option(view.customer_id.as_deref());
        rows.timestamp.append_value(view.timestamp);
        rows.received_at.append_value(view.received_at);
        rows.properties.append_value(view.properties.get());
        rows.context.append_value(view.context.get());
        rows.source.append_value(&view.source);
        rows.schema_version
            .append_option(view.schema_version.as_deref());
        rows.sample_rate.append_option(view.sample_rate);
        Ok(())
    }

    fn len(rows: &EventRows) -> usize {
        rows.seq.len()
    }

    fn finish(&self, rows: &mut EventRows) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(rows.event_id.finish()),
            Arc::new(rows.seq.finish()),
            Arc::new(rows.kind.finish()),
            Arc::new(rows.event.finish()),
            Arc::new(rows.user_id.finish()),
            Arc::new(rows.anonymous_id.finish()),
            Arc::new(rows.customer_id.finish()),
            Arc::new(rows.timestamp.finish()),
            Arc::new(rows.received_at.finish()),
            Arc::new(rows.properties.finish()),
            Arc::new(rows.context.finish()),
            Arc::new(rows.source.finish()),
            Arc::new(rows.schema_version.finish()),
            Arc::new(rows.sample_rate.finish()),
        ];
        RecordBatch::try_new(self.schema(), columns)
    }
}

/// The `rejected_events` table.
pub(crate) struct RejectedFormat;

/// Column builders of the `rejected_events` table.
#[derive(Default)]
pub(crate) struct RejectedRows {
    rejected_id: StringBuilder,
    seq: UInt64Builder,
    received_at: TimestampMicrosecondBuilder,
    source: StringBuilder,
    route: StringBuilder,
    event_id: StringBuilder,
    reasons: StringBuilder,
    payload: StringBuilder,
}

impl TableFormat for RejectedFormat {
    type Rows = RejectedRows;

    fn table(&self) -> &'static Table {
        &catalog::REJECTED_EVENTS
    }

    fn append(
        &self,
        seq: u64,
        payload: &[u8],
        partitions: &mut Partitions<RejectedRows>,
    ) -> Result<(), serde_json::Error> {
        let view: RejectedView<'_> = serde_json::from_slice(payload)?;
        let rows = partitions
            .entry(day_of(view.received_at))
            .or_insert_with(|| RejectedRows {
                received_at: timestamps(),
                ..Default::default()
            });
        rows.rejected_id.append_value(&view.rejected_id);
        rows.seq.append_value(seq);
        rows.received_at.append_value(view.received_at);
        rows.source.append_value(&view.source);
        rows.route.append_value(&view.route);
        rows.event_id.append_option(view.event_id.as_deref());
        rows.reasons.append_value(view.reasons.get());
        rows.payload.append_value(&view.payload);
        Ok(())
    }

    fn len(rows: &RejectedRows) -> usize {
        rows.seq.len()
    }

    fn finish(&self, rows: &mut RejectedRows) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(rows.rejected_id.finish()),
            Arc::new(rows.seq.finish()),
            Arc::new(rows.received_at.finish()),
            Arc::new(rows.source.finish()),
            Arc::new(rows.route.finish()),
            Arc::new(rows.event_id.finish()),
            Arc::new(rows.reasons.finish()),
            Arc::new(rows.payload.finish()),
        ];
        RecordBatch::try_new(self.schema(), columns)
    }
}
