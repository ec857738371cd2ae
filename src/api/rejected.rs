//! `POST /v1/rejected/replay` (admin): re-submits rejected messages once their schema is
//! fixed, without storing twice any that were accepted since.

use serde::Deserialize;

use super::AppState;
use super::respond::{self, HttpResponse};
use crate::resubmit::{self, Selection};

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
    let request: ReplayRequest =
        match respond::optional_json(body, "{\"since\"?, \"source\"?, \"limit\"?}") {
            Ok(request) => request,
            Err(error) => return respond::error(&error),
        };
    let selection = Selection {
        since: request.since,
        source: request.source,
        limit: request.limit,
    };
    match resubmit::replay(&state.query, &state.ingestor, &selection).await {
        Ok(report) => respond::json(200, &report),
        Err(error) => respond::error(&error),
    }
}
