//! Ingest handlers: the HTTP side of Segment's and PostHog's wires.

use http::header;
use http::request::Parts;

use super::AppState;
use super::respond::{self, HttpResponse};
use crate::ingest::{Encoding, IngestRequest, Wire};

/// Handles one ingest request of either wire.
pub async fn handle(state: &AppState, wire: Wire, parts: &Parts, body: &[u8]) -> HttpResponse {
    let header = |name: header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let query = parts.uri.query().unwrap_or_default();
    let compression = query_param(query, "compression").unwrap_or_default();
    let encoding = Encoding {
        gzip: header(header::CONTENT_ENCODING).is_some_and(|e| e.eq_ignore_ascii_case("gzip"))
            || compression == "gzip-js",
        // Only older posthog-js posts forms; curl's default form type on a Segment route is JSON.
        form: wire == Wire::PostHog
            && header(header::CONTENT_TYPE)
                .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded")),
        base64: compression == "base64",
    };
    let request = IngestRequest {
        route: parts.uri.path(),
        authorization: header(header::AUTHORIZATION),
        encoding,
        body,
    };
    match state.ingestor.ingest(wire, request).await {
        Ok(outcome) => {
            if wire == Wire::PostHog {
                // posthog-js reads `status: 1`; Segment's clients read `success`.
                let mut body = serde_json::to_value(&outcome).unwrap_or_default();
                body["status"] = 1.into();
                respond::json(200, &body)
            } else {
                respond::json(200, &outcome)
            }
        }
        Err(error) => respond::error(&error),
    }
}

/// The value of `name` in a query string (no percent-decoding: the values we read are plain).
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}
