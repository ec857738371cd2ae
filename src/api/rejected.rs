//! `POST /v1/rejected/replay` (admin): re-submits rejected messages once their schema is
//! fixed, without storing twice any that were accepted since.

use std::collections::HashSet;

use arrow::array::{Array, StringArray};
use arrow::datatypes::DataType;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::error::ErrorKind;
use crate::ingest::Resubmitted;
use crate::query::string_literal as quote;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    /// Only messages received at or after this time (RFC 3339).
    #[serde(default)]
    since: Option<String>,
    /// Only messages of this source.
    #[serde(default)]
    source: Option<String>,
    /// At most this many messages (oldest first).
    #[serde(default)]
    limit: Option<usize>,
}

/// Handles a replay.
pub async fn replay(state: &AppState, body: &[u8]) -> HttpResponse {
    let request: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) => {
                return respond::error(&HttpError::new(
                    ErrorKind::InvalidInput,
                    "invalid_json",
                    format!("body must be {{\"since\"?, \"source\"?, \"limit\"?}}: {e}"),
                ));
            }
        }
    };
    let mut filters = Vec::new();
    if let Some(since) = &request.since {
        if chrono::DateTime::parse_from_rfc3339(since).is_err() {
            return respond::error(&HttpError::new(
                ErrorKind::InvalidInput,
                "invalid_request",
                "since: must be an RFC 3339 time",
            ));
        }
        filters.push(format!("received_at >= TIMESTAMP {}", quote(since)));
    }
    if let Some(source) = &request.source {
        filters.push(format!("source = {}", quote(source)));
    }
    let condition = if filters.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", filters.join(" AND "))
    };
    let limit = request.limit.unwrap_or(100_000).min(1_000_000);
    let sql = format!(
        "SELECT rejected_id, route, source, event_id, payload FROM rejected_events {condition} ORDER BY seq LIMIT {limit}"
    );
    let batches = match state.query.collect_internal(&sql).await {
        Ok(batches) => batches,
        Err(error) => return respond::error(&error),
    };
    let mut rows = Vec::new();
    for batch in &batches {
        let column = |i: usize| {
            arrow::compute::cast(batch.column(i), &DataType::Utf8)
                .ok()
                .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
        };
        let (Some(ids), Some(routes), Some(sources), Some(events), Some(payloads)) =
            (column(0), column(1), column(2), column(3), column(4))
        else {
            continue;
        };
        for i in 0..batch.num_rows() {
            let event_id = (!events.is_null(i)).then(|| events.value(i).to_string());
            rows.push((
                ids.value(i).to_string(),
                routes.value(i).to_string(),
                sources.value(i).to_string(),
                event_id,
                payloads.value(i).to_string(),
            ));
        }
    }
    // A message sent without an id is replayed under its rejected row's id, so every replay
    // of it is the same event: stored once, and found here once stored.
    let event_id_of = |row: &(String, String, String, Option<String>, String)| {
        row.3.clone().unwrap_or_else(|| row.0.clone())
    };
    let already = match stored_ids(state, rows.iter().map(event_id_of).collect()).await {
        Ok(ids) => ids,
        Err(response) => return response,
    };
    let (mut accepted, mut duplicates, mut already_accepted, mut sampled_out, mut still) =
        (0, 0, 0, 0, Vec::new());
    for row in &rows {
        let (rejected_id, route, source, _, payload) = row;
        let event_id = event_id_of(row);
        if already.contains(&event_id) {
            already_accepted += 1;
            continue;
        }
        match state
            .ingestor
            .resubmit(route, source, payload.as_bytes(), &event_id)
            .await
        {
            Ok(Resubmitted::Accepted) => accepted += 1,
            Ok(Resubmitted::Duplicate) => duplicates += 1,
            Ok(Resubmitted::SampledOut) => sampled_out += 1,
            Ok(Resubmitted::StillRejected(reasons)) => {
                still.push(json!({"rejected_id": rejected_id, "reasons": reasons}))
            }
            Err(error) => return respond::error(&error),
        }
    }
    let still_count = still.len();
    still.truncate(20);
    respond::json(
        200,
        &json!({
            "examined": rows.len(),
            "accepted": accepted,
            "duplicates": duplicates,
            "already_accepted": already_accepted,
            "sampled_out": sampled_out,
            "still_rejected": still_count,
            "still_rejected_examples": still,
        }),
    )
}

/// Which of `ids` are already in the `events` table.
async fn stored_ids(state: &AppState, ids: Vec<String>) -> Result<HashSet<String>, HttpResponse> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(1_000) {
        let list = chunk
            .iter()
            .map(|id| quote(id))
            .collect::<Vec<_>>()
            .join(", ");
        let batches = state
            .query
            .collect_internal(&format!(
                "SELECT event_id FROM events WHERE event_id IN ({list})"
            ))
            .await
            .map_err(|e| respond::error(&e))?;
        for batch in batches {
            if let Ok(column) = arrow::compute::cast(batch.column(0), &DataType::Utf8)
                && let Some(strings) = column.as_any().downcast_ref::<StringArray>()
            {
                found.extend(strings.iter().flatten().map(str::to_string));
            }
        }
    }
    Ok(found)
}
