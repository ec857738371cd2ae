//! `GET /v1/portal/events`: a customer's portal events as Server-Sent Events, for a browser's
//! `EventSource` (CORS, the portal token as `?token=`).
//!
//! Each event is a message of the customer's subject in the portal stream (threshold
//! crossings, the limit reached, suspension and its end, plan changes), sent as
//! `id: <stream sequence>`, `event: <type>`, `data: <JSON>`. A browser that reconnects sends
//! the last id it saw as `Last-Event-ID` (or `?lastEventId=`) and gets every event after it,
//! across reconnects and server restarts, for as long as the stream keeps them (a week); a
//! first connection gets the events from then on. Comments keep the connection alive; the
//! stream ends with a `token.expired` event when the token does, and at server stop.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::Ordered, pull::OrderedConfig};
use bytes::Bytes;
use futures::StreamExt;
use http::request::Parts;
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::error::ErrorKind;
use crate::portal::Grant;

/// How often a comment is sent on a quiet stream, so proxies keep the connection.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Where a connection starts: after the `Last-Event-ID` header (or `?lastEventId=`), else at
/// the next event.
fn start(parts: &Parts) -> DeliverPolicy {
    let from_query = || {
        form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "lastEventId")
            .map(|(_, v)| v.into_owned())
    };
    let last = parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(from_query)
        .and_then(|id| id.trim().parse::<u64>().ok());
    match last {
        Some(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.saturating_add(1),
        },
        None => DeliverPolicy::New,
    }
}

/// Opens the customer's event stream.
pub(crate) async fn events(state: &AppState, parts: &Parts, grant: &Grant) -> HttpResponse {
    let Ok(permit) = state.portal_streams.clone().try_acquire_owned() else {
        return respond::error(&HttpError::new(
            ErrorKind::Unavailable,
            "too_many_streams",
            format!(
                "{} portal event streams are open, the bound metering.portalMaxStreams; retry later",
                state.config.metering.portal_max_streams
            ),
        ));
    };
    let subject = crate::bus::streams::portal_subject(&grant.customer_id);
    let opened = async {
        let stream = state
            .verify
            .js
            .get_stream(&state.config.stream.portal_name)
            .await
            .map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: subject,
                deliver_policy: start(parts),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        consumer.messages().await.map_err(|e| e.to_string())
    };
    let messages = match opened.await {
        Ok(messages) => messages,
        Err(error) => {
            tracing::warn!(%error, "portal events: the stream could not be read");
            return respond::error(&HttpError::new(
                ErrorKind::Unavailable,
                "portal_events_unavailable",
                format!("the portal stream could not be read: {error}"),
            ));
        }
    };
    let left = grant
        .expires_at
        .saturating_sub(state.clock.now_micros())
        .max(0);
    let sse = Sse {
        messages,
        keepalive: tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE),
        expires: tokio::time::Instant::now() + Duration::from_micros(left.unsigned_abs()),
        stopping: state.stopping.clone(),
        phase: Phase::Opening,
        _permit: permit,
    };
    respond::streaming("text/event-stream", futures::stream::unfold(sse, next))
}

/// Where a stream is.
enum Phase {
    Opening,
    Open,
    Ended,
}

/// One open stream: its messages, timers, and its place under the bound.
struct Sse {
    messages: Ordered,
    keepalive: tokio::time::Interval,
    expires: tokio::time::Instant,
    stopping: watch::Receiver<bool>,
    phase: Phase,
    _permit: OwnedSemaphorePermit,
}

/// The next chunk of the stream, or its end.
async fn next(mut sse: Sse) -> Option<(Bytes, Sse)> {
    match sse.phase {
        Phase::Ended => return None,
        Phase::Opening => {
            sse.phase = Phase::Open;
            // `retry`: how long a browser waits before it reconnects.
            return Some((Bytes::from_static(b"retry: 2000\n: connected\n\n"), sse));
        }
        Phase::Open => {}
    }
    let chunk = tokio::select! {
        message = sse.messages.next() => match message {
            Some(Ok(message)) => event_chunk(&message),
            Some(Err(error)) => {
                tracing::warn!(%error, "portal events: reading the stream failed; closing");
                return None;
            }
            None => return None,
        },
        _ = sse.keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
        () = tokio::time::sleep_until(sse.expires) => {
            sse.phase = Phase::Ended;
            Bytes::from_static(
                b"event: token.expired\ndata: {\"type\":\"token.expired\",\"message\":\"the portal token expired; ask the service for a new one\"}\n\n",
            )
        }
        _ = sse.stopping.wait_for(|stopping| *stopping) => return None,
    };
    Some((chunk, sse))
}

/// One stored event as SSE: its stream sequence as the id, its `type` as the event name.
fn event_chunk(message: &async_nats::jetstream::Message) -> Bytes {
    let seq = message.info().map(|info| info.stream_sequence).unwrap_or(0);
    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap_or_default();
    let kind = body["type"].as_str().unwrap_or("message").to_string();
    // One line: JSON without newlines is one `data:` field.
    let data = serde_json::to_string(&body).unwrap_or_default();
    Bytes::from(format!("id: {seq}\nevent: {kind}\ndata: {data}\n\n"))
}
