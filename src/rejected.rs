//! The rejected store: every message that failed validation, kept with its raw payload and the
//! reasons, so it can be inspected in SQL (`rejected_events`) and re-submitted once fixed.
//! Rejected messages travel through their own JetStream stream and are archived to
//! `data/rejected/date=…/` by the same commit protocol as events.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::event::timestamp_type;

/// Why one message was not accepted: the offending field and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// JSON path of the field (`properties.amount`, `userId`, `.` for the whole message).
    pub field: String,
    /// What is wrong, for people.
    pub message: String,
}

impl Rejection {
    /// A rejection of `field` with `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Most bytes of a raw payload kept; longer payloads are cut and say so in their reasons.
pub(crate) const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// A rejected message as published on the rejected stream.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RejectedRecord {
    /// Deterministic id (hash of source and payload): re-sending the same bad message is kept once.
    pub rejected_id: String,
    /// When northstar received it, UTC microseconds.
    pub received_at: i64,
    /// Source whose write key sent it (empty if the request was not authenticated).
    pub source: String,
    /// The route it came in on (`/v1/batch`, `/batch/`, `import`, …).
    pub route: String,
    /// The message's own id, if it had a readable one.
    pub event_id: Option<String>,
    /// Why it was rejected.
    pub reasons: Vec<Rejection>,
    /// The message as sent (UTF-8, lossy for invalid bytes), at most [`MAX_PAYLOAD_BYTES`].
    pub payload: String,
}

impl RejectedRecord {
    /// Builds a record from a raw payload and its reasons.
    pub(crate) fn new(
        payload: &[u8],
        reasons: Vec<Rejection>,
        source: &str,
        route: &str,
        event_id: Option<String>,
        received_at: i64,
    ) -> Self {
        let mut reasons = reasons;
        let text = String::from_utf8_lossy(payload);
        // The bound is on the payload as it is stored, JSON-escaped: a control byte takes six.
        let kept_chars = escaped_prefix(&text, MAX_PAYLOAD_BYTES);
        if kept_chars < text.len() {
            reasons.push(Rejection::new(
                ".",
                format!(
                    "payload of {} bytes cut to its first {kept_chars} bytes ({MAX_PAYLOAD_BYTES} bytes as stored) in the rejected store",
                    payload.len()
                ),
            ));
        }
        let kept = &text.as_bytes()[..kept_chars];
        let mut name = Vec::with_capacity(source.len() + kept.len() + 1);
        name.extend_from_slice(source.as_bytes());
        name.push(b'\n');
        name.extend_from_slice(kept);
        let rejected_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &name).to_string();
        Self {
            rejected_id,
            received_at,
            source: source.to_string(),
            route: route.to_string(),
            event_id,
            reasons,
            payload: text[..kept_chars].to_string(),
        }
    }

    /// The bytes published on the rejected stream.
    pub(crate) fn to_bus_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// How many bytes of `text` (on a char boundary) fit in `limit` bytes once JSON-escaped.
fn escaped_prefix(text: &str, limit: usize) -> usize {
    let mut stored = 0;
    for (at, c) in text.char_indices() {
        stored += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if stored > limit {
            return at;
        }
    }
    text.len()
}

/// A rejected record read back from the stream.
#[derive(Debug, Deserialize)]
pub(crate) struct RejectedView<'a> {
    /// See [`RejectedRecord::rejected_id`].
    #[serde(borrow)]
    pub rejected_id: Cow<'a, str>,
    /// See [`RejectedRecord::received_at`].
    pub received_at: i64,
    /// See [`RejectedRecord::source`].
    #[serde(borrow)]
    pub source: Cow<'a, str>,
    /// See [`RejectedRecord::route`].
    #[serde(borrow)]
    pub route: Cow<'a, str>,
    /// See [`RejectedRecord::event_id`].
    #[serde(borrow, default)]
    pub event_id: Option<Cow<'a, str>>,
    /// Reasons as JSON text.
    #[serde(borrow)]
    pub reasons: &'a serde_json::value::RawValue,
    /// See [`RejectedRecord::payload`].
    #[serde(borrow)]
    pub payload: Cow<'a, str>,
}

/// Schema of the `rejected_events` table, without the `date` partition column.
pub(crate) fn rejected_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("rejected_id", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("received_at", timestamp_type(), false),
        Field::new("source", DataType::Utf8, false),
        Field::new("route", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, true),
        Field::new("reasons", DataType::Utf8, false),
        Field::new("payload", DataType::Utf8, false),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bad_message_gets_the_same_id() {
        let reasons = vec![Rejection::new("event", "is required")];
        let a = RejectedRecord::new(b"{}", reasons.clone(), "web", "/v1/batch", None, 1);
        let b = RejectedRecord::new(b"{}", reasons.clone(), "web", "/v1/batch", None, 2);
        let c = RejectedRecord::new(b"{}", reasons, "ios", "/v1/batch", None, 2);
        assert_eq!(a.rejected_id, b.rejected_id);
        assert_ne!(a.rejected_id, c.rejected_id);
    }

    #[test]
    fn huge_payloads_are_cut_and_say_so() {
        let big = vec![b'x'; MAX_PAYLOAD_BYTES + 10];
        let record = RejectedRecord::new(&big, vec![], "web", "/v1/t", None, 0);
        assert_eq!(record.payload.len(), MAX_PAYLOAD_BYTES);
        assert!(record.reasons[0].message.contains("cut"));
    }

    #[test]
    fn control_bytes_are_bounded_as_stored_not_as_sent() {
        // 300 KB of control bytes escape to 1.8 MB of JSON: past nats-server's message limit.
        let unreadable = vec![1u8; 300 * 1024];
        let record = RejectedRecord::new(&unreadable, vec![], "web", "/v1/batch", None, 0);
        let stored = record.to_bus_json().len();
        assert!(stored <= MAX_PAYLOAD_BYTES + 1024, "{stored} bytes stored");
        assert_eq!(record.payload.len(), MAX_PAYLOAD_BYTES / 6);
        assert!(record.reasons[0].message.contains("cut"));
    }
}
