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

/// `GET /v1/persons/{id}`: the person any of whose ids is `id`; 404 when none.
pub async fn person(state: &AppState, id: &str) -> HttpResponse {
    match crate::query::persons::person(&state.query, id).await {
        Ok(Some(profile)) => respond::json(200, &profile),
        Ok(None) => respond::error(&HttpError::new(
            ErrorKind::NotFound,
            "person_not_found",
            format!("no person has the id `{id}`"),
        )),
        Err(error) => respond::error(&error),
    }
}

/// `GET /v1/groups/{type}/{key}`; 404 when none.
pub async fn group(state: &AppState, kind: &str, key: &str) -> HttpResponse {
    match crate::query::persons::group(&state.query, kind, key).await {
        Ok(Some(profile)) => respond::json(200, &profile),
        Ok(None) => respond::error(&HttpError::new(
            ErrorKind::NotFound,
            "group_not_found",
            format!("no group `{key}` of type `{kind}`"),
        )),
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
