//! Insight handlers: `POST /v1/insights/funnel` and `/v1/insights/retention` (admin key).

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::error::ErrorKind;
use crate::insights::{self, FunnelQuestion, RetentionQuestion};

/// `POST /v1/insights/funnel`.
pub async fn funnel(state: &AppState, body: &[u8]) -> HttpResponse {
    let question: FunnelQuestion = match question(body) {
        Ok(question) => question,
        Err(error) => return respond::error(&error),
    };
    match insights::funnel(&state.query, &question, crate::clock::system_micros()).await {
        Ok(answer) => respond::json(200, &answer),
        Err(error) => respond::error(&error),
    }
}

/// `POST /v1/insights/retention`.
pub async fn retention(state: &AppState, body: &[u8]) -> HttpResponse {
    let question: RetentionQuestion = match question(body) {
        Ok(question) => question,
        Err(error) => return respond::error(&error),
    };
    match insights::retention(&state.query, &question, crate::clock::system_micros()).await {
        Ok(answer) => respond::json(200, &answer),
        Err(error) => respond::error(&error),
    }
}

/// The body as a question, or the error that names what is wrong with it.
fn question<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    let mut reader = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let path = e.path().to_string();
        HttpError::new(
            ErrorKind::InvalidInput,
            "invalid_question",
            format!("{path}: {}", e.inner()),
        )
    })
}
