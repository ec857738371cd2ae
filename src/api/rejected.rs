//! `POST /v1/rejected/replay` (admin): re-submits rejected messages once their schema is
//! fixed, without storing twice any that were accepted since.

use serde::Deserialize;

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::error::ErrorKind;
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
