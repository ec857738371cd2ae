//! `POST /v1/sql`: admin-only, read-only SQL answered as JSON, CSV or Arrow IPC.
//!
//! The body is `{"sql": "...", "format"?: "json"|"csv"|"arrow"|"table"}` or the SQL text itself;
//! without a `format` the `Accept` header chooses (JSON by default). An answer cut by a bound
//! carries `x-northstar-truncated: true` and `x-northstar-truncated-by: rows|bytes`.

use http::header;
use http::request::Parts;
use serde::Deserialize;

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::error::ErrorKind;
use crate::query::{Format, output};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
    #[serde(default)]
    format: Option<String>,
}

/// Handles one SQL request.
pub async fn handle(state: &AppState, parts: &Parts, body: &[u8]) -> HttpResponse {
    let header = |name: header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let is_json = header(header::CONTENT_TYPE).is_some_and(|t| t.starts_with("application/json"));
    let (sql, format) = if is_json {
        match serde_json::from_slice::<SqlRequest>(body) {
            Ok(request) => (request.sql, request.format),
            Err(e) => {
                return respond::error(&HttpError::new(
                    ErrorKind::InvalidInput,
                    "invalid_json",
                    format!("body must be {{\"sql\": \"SELECT …\"}}: {e}"),
                ));
            }
        }
    } else {
        match std::str::from_utf8(body) {
            Ok(text) => (text.to_string(), None),
            Err(_) => {
                return respond::error(&HttpError::new(
                    ErrorKind::InvalidInput,
                    "invalid_body",
                    "SQL text must be UTF-8",
                ));
            }
        }
    };
    let format = match format.as_deref() {
        None => Format::from_accept(header(header::ACCEPT)),
        Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        Some("arrow") => Format::Arrow,
        Some("table") => Format::Table,
        Some(other) => {
            return respond::error(&HttpError::new(
                ErrorKind::InvalidInput,
                "invalid_format",
                format!("format `{other}` is not one of json, csv, arrow, table"),
            ));
        }
    };
    state.metrics.sql_queries.inc();
    let result = match state.query.run(&sql).await {
        Ok(result) => result,
        Err(error) => {
            state.metrics.sql_failures.inc();
            return respond::error(&error);
        }
    };
    match output::encode(&result, format) {
        Ok(encoded) => {
            let mut response = respond::bytes_response(200, format.content_type(), encoded.bytes);
            if let Some(cut) = encoded.truncated {
                let headers = response.headers_mut();
                headers.insert(
                    "x-northstar-truncated",
                    http::HeaderValue::from_static("true"),
                );
                headers.insert(
                    "x-northstar-truncated-by",
                    http::HeaderValue::from_static(cut.name()),
                );
            }
            response
        }
        Err(error) => respond::error(&HttpError::new(
            ErrorKind::Internal,
            "render_failed",
            error.to_string(),
        )),
    }
}
