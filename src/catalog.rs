//! Every table northstar writes and SQL reads: its name, where its files live under the data
//! dir, their schema, partitions and sort order. The writers (the archivers, the usage
//! pipelines, the identity graph, the activation store) and the reader (`query`) both take
//! their tables from here, so the read side depends on none of the parts that write them.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::event::{events_schema, timestamp_type};
use crate::rejected::rejected_schema;

/// A Parquet table under the data dir.
pub struct Table {
    /// SQL name.
    pub name: &'static str,
    /// Directory under the data dir.
    pub dir: &'static str,
    /// File schema, without the partition columns.
    pub schema: fn() -> SchemaRef,
    /// Hive partition columns (`date=…/`), outermost first; strings.
    pub partitions: &'static [&'static str],
    /// Order each file is sorted in, so plans can use it.
    pub sorted_by: &'static [&'static str],
}

/// Every event acked, exactly once (the events archiver).
pub const EVENTS: Table = Table {
    name: "events",
    dir: "events",
    schema: events_schema,
    partitions: &["date"],
    sorted_by: &["customer_id", "timestamp"],
};

/// Every message refused at ingest, with why (the rejected archiver).
pub(crate) const REJECTED_EVENTS: Table = Table {
    name: "rejected_events",
    dir: "rejected",
    schema: rejected_schema,
    partitions: &["date"],
    sorted_by: &["received_at"],
};

/// Windowed usage, one directory per pipeline (`pipelines/*.sql`).
pub(crate) const USAGE: Table = Table {
    name: "usage",
    dir: "usage",
    schema: usage_schema,
    partitions: &["pipeline", "date"],
    sorted_by: &[],
};

/// Every activation recompute's candidates (the activation store).
pub(crate) const ACTIVATION: Table = Table {
    name: "activation",
    dir: "activation",
    schema: activation_schema,
    partitions: &[],
    sorted_by: &[],
};

/// Which ids are one person (the identity graph).
pub const IDENTITIES: Table = Table {
    name: "identities",
    dir: "identities",
    schema: identities_schema,
    partitions: &[],
    sorted_by: &[],
};

/// The tables, in the order SQL registers them.
pub const ALL: &[&Table] = &[&EVENTS, &REJECTED_EVENTS, &USAGE, &ACTIVATION, &IDENTITIES];

/// Decimal type of usage quantities: exact, 28 integer and 10 fractional digits.
pub(crate) const QUANTITY_TYPE: DataType = DataType::Decimal128(38, 10);

/// Schema of the `usage` table (pipeline outputs).
pub(crate) fn usage_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Utf8, true),
        Field::new("feature", DataType::Utf8, false),
        Field::new("window_start", timestamp_type(), false),
        Field::new("window_end", timestamp_type(), false),
        Field::new("quantity", QUANTITY_TYPE, true),
        Field::new("max_quantity", QUANTITY_TYPE, true),
        Field::new("events", DataType::Int64, false),
        Field::new("max_seq", DataType::UInt64, true),
    ]))
}

/// Schema of the `activation` table.
pub(crate) fn activation_schema() -> SchemaRef {
    let f = |name: &str| Field::new(name, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        Field::new("version", DataType::UInt32, false),
        Field::new("computed_at", timestamp_type(), false),
        Field::new("event", DataType::Utf8, true),
        Field::new("times", DataType::UInt32, false),
        Field::new("days", DataType::UInt32, false),
        Field::new("a", DataType::UInt64, false),
        Field::new("b", DataType::UInt64, false),
        Field::new("c", DataType::UInt64, false),
        Field::new("d", DataType::UInt64, false),
        f("share_above"),
        f("retention_above"),
        f("retention_below"),
        f("lift"),
        f("sensitivity"),
        f("specificity"),
        f("phi"),
        f("phi_ci_low"),
        f("phi_ci_high"),
        Field::new("passes_guards", DataType::Boolean, true),
        Field::new("chosen", DataType::Boolean, true),
    ]))
}

/// Schema of the `identities` table.
pub(crate) fn identities_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("person_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("linked_at", timestamp_type(), false),
        Field::new("seq", DataType::UInt64, false),
    ]))
}
