//! The event record: what ingest publishes on the stream and the archiver writes to Parquet.
//!
//! On the stream an event is one compact JSON object ([`EventRecord`]); readers decode it
//! without copying `properties` and `context` ([`EventView`]). In Parquet it is a row of the
//! `events` table ([`events_schema`]), partitioned by the UTC date of its event time.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest id (message, user, anonymous, customer) we store.
pub(crate) const MAX_ID_CHARS: usize = 255;

/// What is wrong with an id as it will be stored (trimmed, not empty), if anything: the
/// same rule for ingest, `/v1/check` and webhooks, so an id one accepts the others accept.
pub(crate) fn id_problem(text: &str) -> Option<String> {
    if text.is_empty() {
        return Some("must not be empty".into());
    }
    if text.chars().count() > MAX_ID_CHARS {
        return Some(format!("longer than {MAX_ID_CHARS} characters"));
    }
    if text.chars().any(char::is_control) {
        return Some("contains control characters".into());
    }
    None
}

/// The kinds of call the Segment spec knows; PostHog events map onto them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// A user action.
    Track,
    /// Who the user is (traits), and possibly the anonymous id they had.
    Identify,
    /// Links a previous id to a user id.
    Alias,
    /// Puts a user in a group (an account).
    Group,
    /// A web page view.
    Page,
    /// A mobile screen view.
    Screen,
}

impl EventType {
    /// Parses the Segment `type` field (also the long and short route names).
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "track" | "t" => Self::Track,
            "identify" | "i" => Self::Identify,
            "alias" | "a" => Self::Alias,
            "group" | "g" => Self::Group,
            "page" | "p" => Self::Page,
            "screen" | "s" => Self::Screen,
            _ => return None,
        })
    }

    /// The lowercase name stored in the `type` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Track => "track",
            Self::Identify => "identify",
            Self::Alias => "alias",
            Self::Group => "group",
            Self::Page => "page",
            Self::Screen => "screen",
        }
    }
}

/// An accepted event, owned, as ingest builds it before publishing.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// Dedup key: Segment `messageId`, PostHog `uuid`, or a generated UUIDv7.
    pub event_id: String,
    /// Call type.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Event name (track), page/screen name, or the PostHog event name.
    pub event: Option<String>,
    /// Known user id.
    pub user_id: Option<String>,
    /// Anonymous (device/session) id.
    pub anonymous_id: Option<String>,
    /// The billed account (see DESIGN.md for the order of precedence).
    pub customer_id: Option<String>,
    /// Event time, UTC microseconds.
    pub timestamp: i64,
    /// Time northstar received it, UTC microseconds.
    pub received_at: i64,
    /// Properties (track/page/screen) or traits (identify/group).
    pub properties: serde_json::Map<String, serde_json::Value>,
    /// Context, with batch-level context merged in.
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Name of the source whose write key sent it.
    pub source: String,
    /// Version of the event's schema when it was accepted.
    pub schema_version: Option<String>,
    /// The rate a sampled event was kept at (weight rows by 1 / rate in SQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<f64>,
}

impl EventRecord {
    /// The bytes published on the stream.
    pub fn to_bus_json(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and JSON maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A zero-copy view of an event read back from the stream.
#[derive(Debug, Deserialize)]
pub struct EventView<'a> {
    /// See [`EventRecord::event_id`].
    #[serde(borrow)]
    pub event_id: Cow<'a, str>,
    /// See [`EventRecord::kind`].
    #[serde(rename = "type")]
    pub kind: EventType,
    /// See [`EventRecord::event`].
    #[serde(borrow, default)]
    pub event: Option<Cow<'a, str>>,
    /// See [`EventRecord::user_id`].
    #[serde(borrow, default)]
    pub user_id: Option<Cow<'a, str>>,
    /// See [`EventRecord::anonymous_id`].
    #[serde(borrow, default)]
    pub anonymous_id: Option<Cow<'a, str>>,
    /// See [`EventRecord::customer_id`].
    #[serde(borrow, default)]
    pub customer_id: Option<Cow<'a, str>>,
    /// See [`EventRecord::timestamp`].
    pub timestamp: i64,
    /// See [`EventRecord::received_at`].
    pub received_at: i64,
    /// Properties as JSON text.
    #[serde(borrow)]
    pub properties: &'a RawValue,
    /// Context as JSON text.
    #[serde(borrow)]
    pub context: &'a RawValue,
    /// See [`EventRecord::source`].
    #[serde(borrow)]
    pub source: Cow<'a, str>,
    /// See [`EventRecord::schema_version`].
    #[serde(borrow, default)]
    pub schema_version: Option<Cow<'a, str>>,
    /// See [`EventRecord::sample_rate`].
    #[serde(default)]
    pub sample_rate: Option<f64>,
}

impl<'a> EventView<'a> {
    /// Decodes a stream message body.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The user id this event vouches for as an identified person: its `user_id`, unless the
    /// same id is also its anonymous id. That pair is how ingest stores a PostHog distinct id
    /// whose standing the SDK did not say (posthog-node and posthog-python send no
    /// `$is_identified`): PostHog treats such an id as anonymous until an `$identify` or an
    /// alias names it, and so may merge it into a person; so does the identity graph.
    pub fn identified_user(&self) -> Option<&str> {
        match (self.user_id.as_deref(), self.anonymous_id.as_deref()) {
            (Some(user), Some(anonymous)) if user == anonymous => None,
            (user, _) => user,
        }
    }
}

/// Microseconds in a day, for partition dates.
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The partition a timestamp falls in: its UTC date as `YYYY-MM-DD`.
pub fn partition_date(timestamp_micros: i64) -> String {
    let days = timestamp_micros.div_euclid(MICROS_PER_DAY);
    let date = chrono::DateTime::from_timestamp(days * 86_400, 0)
        .map(|t| t.date_naive())
        .unwrap_or_default();
    date.format("%Y-%m-%d").to_string()
}

/// Timestamp type of event times: microseconds, UTC.
pub(crate) fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The Parquet/Arrow schema of the `events` table, without the `date` partition column.
pub(crate) fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("event", DataType::Utf8, true),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("anonymous_id", DataType::Utf8, true),
        Field::new("customer_id", DataType::Utf8, true),
        Field::new("timestamp", timestamp_type(), false),
        Field::new("received_at", timestamp_type(), false),
        Field::new("properties", DataType::Utf8, false),
        Field::new("context", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("schema_version", DataType::Utf8, true),
        Field::new("sample_rate", DataType::Float64, true),
    ]))
}

/// A stream message of a track `report_created` by `user` with `event_id`, for unit tests.
#[cfg(test)]
pub(crate) fn track_message(user: &str, event_id: &str) -> Vec<u8> {
    EventRecord {
        event_id: event_id.to_string(),
        kind: EventType::Track,
        event: Some("report_created".into()),
        user_id: Some(user.into()),
        anonymous_id: None,
        customer_id: None,
        timestamp: 1_700_000_000_000_000,
        received_at: 1_700_000_000_000_000,
        properties: serde_json::Map::new(),
        context: serde_json::Map::new(),
        source: "web".into(),
        schema_version: None,
        sample_rate: None,
    }
    .to_bus_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_a_view() {
        let mut properties = serde_json::Map::new();
        properties.insert("plan".into(), "pro \"x\"".into());
        let record = EventRecord {
            event_id: "m1".into(),
            kind: EventType::Track,
            event: Some("signup_completed".into()),
            user_id: Some("u1".into()),
            anonymous_id: None,
            customer_id: Some("acme".into()),
            timestamp: 1_700_000_000_000_000,
            received_at: 1_700_000_000_000_001,
            properties,
            context: serde_json::Map::new(),
            source: "web".into(),
            schema_version: None,
            sample_rate: None,
        };
        let bytes = record.to_bus_json();
        let view = EventView::decode(&bytes).unwrap();
        assert_eq!(view.event_id, "m1");
        assert_eq!(view.kind, EventType::Track);
        assert_eq!(view.customer_id.as_deref(), Some("acme"));
        assert_eq!(view.properties.get(), r#"{"plan":"pro \"x\""}"#);
    }

    #[test]
    fn partition_dates_are_utc_days() {
        assert_eq!(partition_date(0), "1970-01-01");
        assert_eq!(partition_date(1_700_000_000_000_000), "2023-11-14");
        assert_eq!(partition_date(-1), "1969-12-31");
    }
}
