//! Rebuilding the followers' state (meter, identities, billing windows, onboarding facts) when
//! the stream no longer holds its beginning.
//!
//! The stream keeps a bounded window of history (`stream.maxAge`, `stream.maxBytes`); the
//! archive keeps all of it, every event with its stream sequence. When the followers start
//! behind the stream's first sequence (their state was set aside, or lost), the events they
//! miss are read back from Parquet, in sequence order, and applied as the stream would have
//! delivered them; the stream takes over from its first sequence. `northstar replay` sets the
//! derived state aside so that the next start rebuilds it this way.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use arrow::array::{
    Array, AsArray, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use serde_json::value::RawValue;

use crate::bus::follower::Follow;
use crate::event::{EventType, EventView};
use crate::query::{QueryEngine, QueryError};

/// Stream sequences read back per query: bounds the memory a window takes (about 400 bytes a
/// row) and how often progress is logged.
pub(crate) const WINDOW: u64 = 65_536;

const COLUMNS: &str = "event_id, seq, \"type\", event, user_id, anonymous_id, customer_id, \
    \"timestamp\", received_at, properties, context, source, schema_version, sample_rate";

/// Applies the archived events with sequences in `(after, upto]` to `follower`, in sequence
/// order, and returns the last sequence it reached (`upto`).
pub(crate) async fn from_parquet(
    engine: &QueryEngine,
    follower: &mut impl Follow,
    after: u64,
    upto: u64,
) -> Result<u64, QueryError> {
    let started = std::time::Instant::now();
    let mut applied = 0u64;
    let mut at = after;
    tracing::info!(
        from = after + 1,
        to = upto,
        "the stream no longer holds what the followers need: replaying it from Parquet"
    );
    while at < upto {
        let end = upto.min(at.saturating_add(WINDOW));
        let batches = engine
            .collect_internal(&format!(
                "SELECT {COLUMNS} FROM events WHERE seq > {at} AND seq <= {end} ORDER BY seq"
            ))
            .await?;
        for batch in &batches {
            applied += apply_batch(follower, batch)?;
        }
        at = end;
        tracing::info!(
            at,
            upto,
            applied,
            "replaying from Parquet ({:.0}%)",
            100.0 * (at - after) as f64 / (upto - after).max(1) as f64
        );
    }
    tracing::info!(applied, took = ?started.elapsed(), "replayed from Parquet; the stream takes over");
    Ok(upto)
}

/// Applies each row of `batch` (columns as [`COLUMNS`]) as the event it was on the stream.
fn apply_batch(follower: &mut impl Follow, batch: &RecordBatch) -> Result<u64, QueryError> {
    let text = |i: usize| -> Result<StringArray, QueryError> {
        let column = cast(batch.column(i), &DataType::Utf8).map_err(internal)?;
        Ok(column.as_string::<i32>().clone())
    };
    let micros = |i: usize| -> Result<TimestampMicrosecondArray, QueryError> {
        let column = cast(
            batch.column(i),
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )
        .map_err(internal)?;
        Ok(column.as_primitive().clone())
    };
    let (event_id, kind, event, user_id, anonymous_id, customer_id) =
        (text(0)?, text(2)?, text(3)?, text(4)?, text(5)?, text(6)?);
    let seq: UInt64Array = cast(batch.column(1), &DataType::UInt64)
        .map_err(internal)?
        .as_primitive()
        .clone();
    let (timestamp, received_at) = (micros(7)?, micros(8)?);
    let (properties, context, source, schema_version) = (text(9)?, text(10)?, text(11)?, text(12)?);
    let sample_rate: Float64Array = cast(batch.column(13), &DataType::Float64)
        .map_err(internal)?
        .as_primitive()
        .clone();

    for row in 0..batch.num_rows() {
        let seq = seq.value(row);
        if !follower.wants(seq) {
            continue;
        }
        let properties = raw(properties.value(row));
        let context = raw(context.value(row));
        let view = match (EventType::parse(kind.value(row)), properties, context) {
            (Some(kind), Some(properties), Some(context)) => Some(EventView {
                event_id: event_id.value(row).into(),
                kind,
                event: optional(&event, row),
                user_id: optional(&user_id, row),
                anonymous_id: optional(&anonymous_id, row),
                customer_id: optional(&customer_id, row),
                timestamp: timestamp.value(row),
                received_at: received_at.value(row),
                properties,
                context,
                source: source.value(row).into(),
                schema_version: optional(&schema_version, row),
                sample_rate: (!sample_rate.is_null(row)).then(|| sample_rate.value(row)),
            }),
            _ => {
                tracing::error!(seq, "an archived event does not read back; skipped");
                None
            }
        };
        follower.apply(seq, view.as_ref());
    }
    Ok(batch.num_rows() as u64)
}

fn optional(column: &StringArray, row: usize) -> Option<Cow<'_, str>> {
    (!column.is_null(row)).then(|| Cow::Borrowed(column.value(row)))
}

fn raw(text: &str) -> Option<&RawValue> {
    serde_json::from_str(text).ok()
}

fn internal(error: impl std::fmt::Display) -> QueryError {
    QueryError::Internal(error.to_string())
}

/// The derived state files under a data dir, each rebuilt from the archive and the stream.
/// The billing outbox is not among them: it records what was owed and reported, and a rebuilt
/// window that it already holds is not owed again.
pub(crate) fn derived_state(data_dir: &Path) -> Vec<PathBuf> {
    vec![
        data_dir
            .join("meter")
            .join(crate::meter::snapshot::SNAPSHOT_FILE),
        data_dir.join(crate::catalog::IDENTITIES.dir),
        data_dir
            .join("billing")
            .join(crate::billing::runner::SNAPSHOT_FILE),
        data_dir.join("onboarding").join("state.json"),
    ]
}

/// Moves the derived state of `data_dir` into `data_dir/set-aside/<stamp>/`, so the next
/// start rebuilds it. Returns what was moved, where to.
pub fn set_aside(data_dir: &Path, stamp: &str) -> std::io::Result<Vec<(PathBuf, PathBuf)>> {
    let target = data_dir.join("set-aside").join(stamp);
    let mut moved = Vec::new();
    for path in derived_state(data_dir) {
        if !path.exists() {
            continue;
        }
        let relative = path.strip_prefix(data_dir).unwrap_or(&path);
        let to = target.join(relative);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&path, &to)?;
        moved.push((path, to));
    }
    Ok(moved)
}
