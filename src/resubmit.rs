//! Rejected messages re-submitted through today's validation, once their schema is fixed
//! (`POST /v1/rejected/replay`, `northstar rejected replay`), without storing twice any that
//! were accepted since.
//!
//! A message sent without an id is replayed under its rejected row's id, so every replay of
//! it is the same event: stored once, and found here once stored.

use std::collections::HashSet;

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;
use serde::Serialize;

use crate::error::{Classify, ErrorKind};
use crate::ingest::{IngestError, Ingestor, Resubmitted};
use crate::query::{QueryEngine, QueryError, string_literal};
use crate::rejected::Rejection;

/// Messages past this many are left for the next replay.
pub(crate) const MAX_MESSAGES: usize = 1_000_000;

/// Messages one replay takes when it does not say.
pub(crate) const DEFAULT_MESSAGES: usize = 100_000;

/// Still-rejected messages a report names (the count covers them all).
const EXAMPLES: usize = 20;

/// Which rejected messages to replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Only messages received at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only messages of this source.
    pub source: Option<String>,
    /// At most this many, oldest first ([`DEFAULT_MESSAGES`], at most [`MAX_MESSAGES`]).
    pub limit: Option<usize>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Rejected messages selected.
    pub examined: usize,
    /// Stored now.
    pub accepted: usize,
    /// Already in the stream (a repeated replay inside the dedup window).
    pub duplicates: usize,
    /// Already in the `events` table.
    pub already_accepted: usize,
    /// Accepted, and dropped by sampling.
    pub sampled_out: usize,
    /// Refused again.
    pub still_rejected: usize,
    /// The first few refused again, with why.
    pub still_rejected_examples: Vec<StillRejected>,
}

/// A message refused again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StillRejected {
    /// Its rejected row's id.
    pub rejected_id: String,
    /// Why, field by field.
    pub reasons: Vec<Rejection>,
}

/// Why a replay did not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum ResubmitError {
    /// `since` is not a time.
    #[error("since: must be an RFC 3339 time")]
    Since,
    /// Reading the rejected store or the events failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// Ingest refused the replay (a backlog, a full disk, the stream down).
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

impl Classify for ResubmitError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Since => ErrorKind::InvalidInput,
            Self::Query(error) => error.kind(),
            Self::Ingest(error) => error.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Since => "invalid_request",
            Self::Query(error) => error.code(),
            Self::Ingest(error) => error.code(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Since => None,
            Self::Query(error) => error.retry_after(),
            Self::Ingest(error) => error.retry_after(),
        }
    }
}

/// One selected rejected message.
struct Rejected {
    rejected_id: String,
    route: String,
    source: String,
    event_id: String,
    payload: String,
}

/// Replays the rejected messages of `selection` through `ingestor`.
pub async fn replay(
    query: &QueryEngine,
    ingestor: &Ingestor,
    selection: &Selection,
) -> Result<Report, ResubmitError> {
    let rows = select(query, selection).await?;
    let already = stored_ids(query, rows.iter().map(|r| r.event_id.as_str())).await?;
    let mut report = Report {
        examined: rows.len(),
        ..Report::default()
    };
    for row in &rows {
        if already.contains(&row.event_id) {
            report.already_accepted += 1;
            continue;
        }
        match ingestor
            .resubmit(
                &row.route,
                &row.source,
                row.payload.as_bytes(),
                &row.event_id,
            )
            .await?
        {
            Resubmitted::Accepted => report.accepted += 1,
            Resubmitted::Duplicate => report.duplicates += 1,
            Resubmitted::SampledOut => report.sampled_out += 1,
            Resubmitted::StillRejected(reasons) => {
                report.still_rejected += 1;
                if report.still_rejected_examples.len() < EXAMPLES {
                    report.still_rejected_examples.push(StillRejected {
                        rejected_id: row.rejected_id.clone(),
                        reasons,
                    });
                }
            }
        }
    }
    Ok(report)
}

/// The rejected messages of `selection`, oldest first.
async fn select(
    query: &QueryEngine,
    selection: &Selection,
) -> Result<Vec<Rejected>, ResubmitError> {
    let mut filters = Vec::new();
    if let Some(since) = &selection.since {
        if chrono::DateTime::parse_from_rfc3339(since).is_err() {
            return Err(ResubmitError::Since);
        }
        filters.push(format!(
            "received_at >= TIMESTAMP {}",
            string_literal(since)
        ));
    }
    if let Some(source) = &selection.source {
        filters.push(format!("source = {}", string_literal(source)));
    }
    let condition = if filters.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", filters.join(" AND "))
    };
    let limit = selection
        .limit
        .unwrap_or(DEFAULT_MESSAGES)
        .min(MAX_MESSAGES);
    let batches = query
        .collect_internal(&format!(
            "SELECT rejected_id, route, source, event_id, payload FROM rejected_events \
             {condition} ORDER BY seq LIMIT {limit}"
        ))
        .await?;
    let mut rows = Vec::new();
    for batch in &batches {
        let (Some(ids), Some(routes), Some(sources), Some(events), Some(payloads)) = (
            strings(batch, 0),
            strings(batch, 1),
            strings(batch, 2),
            strings(batch, 3),
            strings(batch, 4),
        ) else {
            continue;
        };
        for i in 0..batch.num_rows() {
            let rejected_id = ids.value(i).to_string();
            let event_id = if events.is_null(i) {
                rejected_id.clone()
            } else {
                events.value(i).to_string()
            };
            rows.push(Rejected {
                rejected_id,
                route: routes.value(i).to_string(),
                source: sources.value(i).to_string(),
                event_id,
                payload: payloads.value(i).to_string(),
            });
        }
    }
    Ok(rows)
}

/// Column `index` of `batch` as strings.
fn strings(batch: &RecordBatch, index: usize) -> Option<StringArray> {
    arrow::compute::cast(batch.column(index), &DataType::Utf8)
        .ok()
        .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
}

/// Which of `ids` are already in the `events` table.
async fn stored_ids<'a>(
    query: &QueryEngine,
    ids: impl Iterator<Item = &'a str>,
) -> Result<HashSet<String>, QueryError> {
    let ids: Vec<&str> = ids.collect();
    let mut found = HashSet::new();
    for chunk in ids.chunks(1_000) {
        let list = chunk
            .iter()
            .map(|id| string_literal(id))
            .collect::<Vec<_>>()
            .join(", ");
        let batches = query
            .collect_internal(&format!(
                "SELECT event_id FROM events WHERE event_id IN ({list})"
            ))
            .await?;
        for batch in &batches {
            if let Some(column) = strings(batch, 0) {
                found.extend(column.iter().flatten().map(str::to_string));
            }
        }
    }
    Ok(found)
}
