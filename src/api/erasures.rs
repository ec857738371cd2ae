//! Erasure handlers (admin key): `DELETE /v1/persons/{id}` erases a person, and
//! `GET /v1/erasures[/{job}]` follows it (see [`crate::erasure`] for its phases).

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::erasure::ErasureError;
use crate::error::ErrorKind;

/// `DELETE /v1/persons/{id}`: 202 with the erasure's job and where to follow it; 404 when no
/// person has the id.
pub async fn erase_person(state: &AppState, id: &str) -> HttpResponse {
    match crate::query::persons::person(&state.query, id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return respond::error(&HttpError::new(
                ErrorKind::NotFound,
                "person_not_found",
                format!("no person has the id `{id}`"),
            ));
        }
        Err(error) => return respond::error(&error),
    }
    let stream_last = match stream_last(state).await {
        Ok(last) => last,
        Err(message) => {
            return respond::error(&HttpError::new(
                ErrorKind::Unavailable,
                "stream_unavailable",
                format!("the events stream cannot be read to erase `{id}`: {message}"),
            ));
        }
    };
    match state.erasures.request(id, stream_last) {
        Ok(job) => {
            tracing::info!(job = job.job, "erasure asked for");
            respond::json(202, &job.view())
        }
        Err(error @ ErasureError::Full(_)) => respond::error(&HttpError::new(
            ErrorKind::Unavailable,
            "erasure_log_full",
            error.to_string(),
        )),
        Err(error) => respond::error(&HttpError::new(
            ErrorKind::Internal,
            "erasure_not_recorded",
            error.to_string(),
        )),
    }
}

/// The events stream's last sequence.
async fn stream_last(state: &AppState) -> Result<u64, String> {
    let mut stream = state
        .verify
        .js
        .get_stream(&state.verify.stream)
        .await
        .map_err(|e| e.to_string())?;
    let info = stream.info().await.map_err(|e| e.to_string())?;
    Ok(info.state.last_sequence)
}

/// `GET /v1/erasures/{job}`.
pub fn erasure(state: &AppState, job: &str) -> HttpResponse {
    match state.erasures.get(job) {
        Some(erasure) => respond::json(200, &erasure.view()),
        None => respond::error(&HttpError::new(
            ErrorKind::NotFound,
            "erasure_not_found",
            format!("no erasure `{job}`"),
        )),
    }
}

/// `GET /v1/erasures`: every erasure, oldest first.
pub fn erasures(state: &AppState) -> HttpResponse {
    let all: Vec<serde_json::Value> = state.erasures.list().iter().map(|e| e.view()).collect();
    respond::json(200, &serde_json::json!({ "erasures": all }))
}
