//! Rules shared by the Segment and PostHog wires: ids, timestamps, the billed customer.

use serde_json::{Map, Value};

use crate::json::JsonObject;

/// Longest event name we store.
pub(crate) const MAX_EVENT_NAME_CHARS: usize = 255;

pub use crate::rejected::Rejection;

/// An id field: a non-empty string or a number (some SDKs send numeric user ids); JSON null
/// or absence is `None`.
pub(crate) fn id_field(
    message: &Map<String, Value>,
    field: &str,
) -> Result<Option<String>, Rejection> {
    match message.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => id_value(value, field),
    }
}

/// See [`id_field`].
pub(crate) fn id_value(value: &Value, field: &str) -> Result<Option<String>, Rejection> {
    let text = match value {
        Value::Null => return Ok(None),
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return Err(Rejection::new(field, "must be a string or a number")),
    };
    if text.is_empty() {
        return Ok(None);
    }
    match crate::event::id_problem(&text) {
        Some(problem) => Err(Rejection::new(field, problem)),
        None => Ok(Some(text)),
    }
}

/// A message's dedup id, or a new UUIDv7 when the sender gave none.
pub fn event_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// An event name: a non-empty string of sane length.
pub fn event_name(value: Option<&Value>, field: &str) -> Result<String, Rejection> {
    match value {
        Some(Value::String(name)) if !name.trim().is_empty() => {
            if name.chars().count() > MAX_EVENT_NAME_CHARS {
                return Err(Rejection::new(
                    field,
                    format!("longer than {MAX_EVENT_NAME_CHARS} characters"),
                ));
            }
            Ok(name.clone())
        }
        Some(Value::String(_)) | None | Some(Value::Null) => {
            Err(Rejection::new(field, "is required"))
        }
        Some(_) => Err(Rejection::new(field, "must be a string")),
    }
}

/// An object field, empty when absent or null.
pub(crate) fn object_field(
    message: &mut Map<String, Value>,
    field: &str,
) -> Result<Map<String, Value>, Rejection> {
    match message.remove(field) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(Rejection::new(field, "must be a JSON object")),
    }
}

/// Refuses an event time more than `max_skew` (µs) after its arrival: metering periods follow
/// event time, and a client's clock must not be able to open a period ahead of now.
pub(crate) fn within_skew(
    timestamp: i64,
    received_at: i64,
    bounds: TimeBounds,
) -> Result<(), Rejection> {
    if timestamp > received_at.saturating_add(bounds.future_skew) {
        let ahead = timestamp.saturating_sub(received_at) / 1_000_000;
        return Err(Rejection::new(
            "timestamp",
            format!(
                "is {ahead} s after the event arrived; at most {} s ahead is taken (ingest.maxFutureSkew)",
                bounds.future_skew / 1_000_000
            ),
        ));
    }
    if bounds.max_age > 0 && timestamp < received_at.saturating_sub(bounds.max_age) {
        const DAY: i64 = 86_400_000_000;
        let behind = received_at.saturating_sub(timestamp) / DAY;
        return Err(Rejection::new(
            "timestamp",
            format!(
                "is {behind} days before the event arrived; at most {} days back is taken \
                 (ingest.maxEventAge; raise it to import older history)",
                bounds.max_age / DAY
            ),
        ));
    }
    Ok(())
}

/// How far an event's time may be from its arrival, in µs: ahead (`ingest.maxFutureSkew`)
/// and back (`ingest.maxEventAge`, 0: no bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBounds {
    /// Most µs ahead of arrival.
    pub future_skew: i64,
    /// Most µs before arrival (0: any).
    pub max_age: i64,
}

impl TimeBounds {
    /// The bounds of `config`.
    pub fn of(config: &crate::config::Config) -> Self {
        let micros = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self {
            future_skew: micros(config.ingest.max_future_skew.get()),
            max_age: micros(config.ingest.max_event_age.get()),
        }
    }
}

/// Parses an event time: RFC 3339 / ISO 8601 text (a missing zone means UTC), or a number of
/// milliseconds since the epoch. Returns UTC microseconds.
pub fn timestamp(value: &Value, field: &str) -> Result<i64, Rejection> {
    let micros = match value {
        Value::String(text) => parse_time_text(text.trim()),
        Value::Number(n) => n.as_i64().and_then(|ms| ms.checked_mul(1_000)),
        _ => None,
    };
    let micros = micros.ok_or_else(|| {
        Rejection::new(
            field,
            "must be an ISO 8601 time such as 2026-01-02T03:04:05.678Z",
        )
    })?;
    // Years 1970..=9999: earlier or later is a client bug, not history.
    if !(0..=253_402_300_799_000_000).contains(&micros) {
        return Err(Rejection::new(field, "is outside the years 1970 to 9999"));
    }
    Ok(micros)
}

fn parse_time_text(text: &str) -> Option<i64> {
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(time.timestamp_micros());
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
    ] {
        if let Ok(time) = chrono::DateTime::parse_from_str(text, format) {
            return Some(time.timestamp_micros());
        }
        if let Ok(time) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Some(time.and_utc().timestamp_micros());
        }
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_micros())
}

/// The billed account, in DESIGN.md's order: a top-level `customerId`, `context.groupId`,
/// `properties.customer_id`, `properties.$groups.customer`, else the user id.
pub fn customer_id(
    top_level: Option<String>,
    context: &dyn JsonObject,
    properties: &dyn JsonObject,
    user_id: Option<&String>,
) -> Option<String> {
    let from = |value: Option<&Value>| value.and_then(|v| id_value(v, "").ok().flatten());
    top_level
        .or_else(|| from(context.field("groupId").as_deref()))
        .or_else(|| from(properties.field("customer_id").as_deref()))
        .or_else(|| {
            let groups = properties.field("$groups")?;
            from(groups.get("customer"))
        })
        .or_else(|| user_id.cloned())
}

/// Fills `into` with the keys of `defaults` it lacks (batch-level context under the message's).
pub(crate) fn merge_missing(into: &mut Map<String, Value>, defaults: Option<&Map<String, Value>>) {
    if let Some(defaults) = defaults {
        for (key, value) in defaults {
            into.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_in_the_forms_sdks_send() {
        let t = |v: Value| timestamp(&v, "timestamp");
        assert_eq!(
            t(json!("2026-01-02T03:04:05.678Z")).unwrap(),
            1_767_323_045_678_000
        );
        assert_eq!(
            t(json!("2026-01-02T04:04:05.678+01:00")).unwrap(),
            1_767_323_045_678_000
        );
        assert_eq!(
            t(json!("2026-01-02T03:04:05.678")).unwrap(),
            1_767_323_045_678_000
        );
        assert_eq!(
            t(json!(1_767_323_045_678i64)).unwrap(),
            1_767_323_045_678_000
        );
        assert_eq!(t(json!("yesterday")).unwrap_err().field, "timestamp");
        assert!(t(json!("0001-01-01T00:00:00Z")).is_err());
    }

    #[test]
    fn customer_precedence_follows_the_design() {
        let ctx = json!({"groupId": "ctx-group"})
            .as_object()
            .cloned()
            .unwrap();
        let props = json!({"customer_id": "prop-cust", "$groups": {"customer": "ph-group"}})
            .as_object()
            .cloned()
            .unwrap();
        let user = Some("u1".to_string());
        assert_eq!(
            customer_id(Some("top".into()), &ctx, &props, user.as_ref()).unwrap(),
            "top"
        );
        assert_eq!(
            customer_id(None, &ctx, &props, user.as_ref()).unwrap(),
            "ctx-group"
        );
        assert_eq!(
            customer_id(None, &Map::new(), &props, user.as_ref()).unwrap(),
            "prop-cust"
        );
        let ph = json!({"$groups": {"customer": "ph-group"}})
            .as_object()
            .cloned()
            .unwrap();
        assert_eq!(
            customer_id(None, &Map::new(), &ph, user.as_ref()).unwrap(),
            "ph-group"
        );
        assert_eq!(
            customer_id(None, &Map::new(), &Map::new(), user.as_ref()).unwrap(),
            "u1"
        );
    }

    #[test]
    fn ids_refuse_objects_and_control_characters() {
        assert_eq!(id_value(&json!(42), "userId").unwrap().unwrap(), "42");
        assert_eq!(id_value(&json!("  "), "userId").unwrap(), None);
        assert_eq!(
            id_value(&json!({"a": 1}), "userId").unwrap_err().field,
            "userId"
        );
        assert!(id_value(&json!("a\r\nNats-Msg-Id: x"), "messageId").is_err());
    }
}
