//! The PostHog capture API: `/batch/`, `/capture/`, `/e/`, `/i/v0/e/`, `/track`.
//!
//! PostHog has no call types: `$identify`, `$create_alias`, `$pageview`, `$screen` and
//! `$groupidentify` map onto Segment's identify, alias, page, screen and group; everything else
//! is a track. The event keeps its PostHog name (`$pageview`), so nothing is renamed in SQL.

use serde_json::{Map, Value};

use super::normalize::{self, Rejection};
use crate::event::{EventRecord, EventType};

/// Keys of a PostHog event that have a place of their own; others go to `context.extra`.
const KNOWN_KEYS: &[&str] = &[
    "event",
    "distinct_id",
    "$distinct_id",
    "uuid",
    "timestamp",
    "offset",
    "properties",
    "api_key",
    "token",
    "$token",
    "type",
    "library",
    "library_version",
    "sent_at",
    "$set",
    "$set_once",
];

/// The events and the key of a capture body, whatever of its three shapes it has.
pub(crate) struct CaptureBody {
    /// Each event, still raw JSON so one bad event can be rejected alone.
    pub events: Vec<Value>,
    /// `api_key` / `token` from the body or, failing that, from the first event.
    pub api_key: Option<String>,
}

/// Splits a parsed body: one event, an array of events, or `{api_key, batch, sent_at}`.
pub(crate) fn split_body(body: Value) -> Result<CaptureBody, String> {
    let key_of = |map: &Map<String, Value>| -> Option<String> {
        ["api_key", "token", "$token"]
            .iter()
            .find_map(|k| map.get(*k).and_then(Value::as_str).map(str::to_string))
            .or_else(|| {
                let props = map.get("properties")?.as_object()?;
                ["token", "$token"]
                    .iter()
                    .find_map(|k| props.get(*k).and_then(Value::as_str).map(str::to_string))
            })
    };
    match body {
        Value::Array(events) => {
            let api_key = events.iter().filter_map(Value::as_object).find_map(key_of);
            Ok(CaptureBody { events, api_key })
        }
        Value::Object(mut map) => {
            let batch = map.remove("batch").or_else(|| map.remove("data"));
            match batch {
                Some(Value::Array(events)) => {
                    let api_key = key_of(&map)
                        .or_else(|| events.iter().filter_map(Value::as_object).find_map(key_of));
                    Ok(CaptureBody { events, api_key })
                }
                Some(_) => Err("`batch` must be an array of events".into()),
                None => {
                    let api_key = key_of(&map);
                    Ok(CaptureBody {
                        events: vec![Value::Object(map)],
                        api_key,
                    })
                }
            }
        }
        _ => Err(
            "body must be an event, an array of events, or {\"api_key\", \"batch\": [...]}".into(),
        ),
    }
}

/// Turns one PostHog event into an event record.
pub fn normalize(event: Value, source: &str, received_at: i64) -> Result<EventRecord, Rejection> {
    let Value::Object(mut event) = event else {
        return Err(Rejection::new(".", "each event must be a JSON object"));
    };
    let name = normalize::event_name(event.get("event"), "event")?;
    let mut properties = normalize::object_field(&mut event, "properties")?;
    for key in ["$set", "$set_once"] {
        if let Some(value) = event.remove(key).filter(|v| !v.is_null()) {
            properties.entry(key).or_insert(value);
        }
    }
    let distinct_id = match ["distinct_id", "$distinct_id"]
        .iter()
        .find_map(|k| event.get(*k))
    {
        Some(value) => normalize::id_value(value, "distinct_id")?,
        None => match properties
            .get("distinct_id")
            .or_else(|| properties.get("$distinct_id"))
        {
            Some(value) => normalize::id_value(value, "properties.distinct_id")?,
            None => None,
        },
    }
    .ok_or_else(|| Rejection::new("distinct_id", "is required"))?;
    let event_id = normalize::event_id(normalize::id_field(&event, "uuid")?);
    let timestamp = match (event.get("timestamp"), event.get("offset")) {
        (Some(value), _) if !value.is_null() => normalize::timestamp(value, "timestamp")?,
        (_, Some(Value::Number(offset))) => {
            let offset_ms = offset
                .as_i64()
                .ok_or_else(|| Rejection::new("offset", "must be whole milliseconds"))?;
            let at = received_at.saturating_sub(offset_ms.saturating_mul(1_000));
            normalize::timestamp(&Value::from(at / 1_000), "offset")?
        }
        _ => received_at,
    };

    let kind = match name.as_str() {
        "$identify" => EventType::Identify,
        "$create_alias" => EventType::Alias,
        "$pageview" => EventType::Page,
        "$screen" => EventType::Screen,
        "$groupidentify" => EventType::Group,
        _ => EventType::Track,
    };
    // PostHog's distinct id is a user id once identified, an anonymous id before. posthog-js
    // says which (`$is_identified`); the server SDKs say nothing, and then the id is stored as
    // both: it is who did the event, and it may still be merged into a person (PostHog's rule,
    // see `EventView::identified_user`). `$identify` and `$create_alias` name an identified id.
    let (user_id, anonymous_id) = match (kind, properties.get("$is_identified")) {
        (EventType::Identify, _) => {
            let anon = match properties.get("$anon_distinct_id") {
                Some(value) => normalize::id_value(value, "properties.$anon_distinct_id")?,
                None => None,
            };
            (Some(distinct_id), anon)
        }
        (EventType::Alias, _) | (_, Some(Value::Bool(true))) => (Some(distinct_id), None),
        (_, Some(Value::Bool(false))) => (None, Some(distinct_id)),
        _ => (Some(distinct_id.clone()), Some(distinct_id)),
    };

    let mut context = Map::new();
    if let Some(lib) = properties.get("$lib").cloned() {
        let mut library = Map::new();
        library.insert("name".into(), lib);
        if let Some(version) = properties.get("$lib_version").cloned() {
            library.insert("version".into(), version);
        }
        context.insert("library".into(), Value::Object(library));
    }
    let extra: Map<String, Value> = event
        .into_iter()
        .filter(|(key, _)| !KNOWN_KEYS.contains(&key.as_str()))
        .collect();
    if !extra.is_empty() {
        context.insert("extra".into(), Value::Object(extra));
    }
    let group_customer = if kind == EventType::Group
        && properties.get("$group_type").and_then(Value::as_str) == Some("customer")
    {
        properties
            .get("$group_key")
            .and_then(|v| normalize::id_value(v, "").ok().flatten())
    } else {
        None
    };
    let customer_id =
        normalize::customer_id(group_customer, &context, &properties, user_id.as_ref());
    Ok(EventRecord {
        event_id,
        kind,
        event: Some(name),
        user_id,
        anonymous_id,
        customer_id,
        timestamp,
        received_at,
        properties,
        context,
        source: source.to_string(),
        schema_version: None,
        sample_rate: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_three_body_shapes() {
        let one = split_body(json!({"api_key": "k", "event": "e", "distinct_id": "d"})).unwrap();
        assert_eq!((one.events.len(), one.api_key.as_deref()), (1, Some("k")));
        let array = split_body(json!([{"event": "e", "properties": {"token": "k2"}}])).unwrap();
        assert_eq!(array.api_key.as_deref(), Some("k2"));
        let batch = split_body(json!({"api_key": "k3", "batch": [{"event": "a"}, {"event": "b"}]}))
            .unwrap();
        assert_eq!(
            (batch.events.len(), batch.api_key.as_deref()),
            (2, Some("k3"))
        );
        assert!(split_body(json!("text")).is_err());
    }

    #[test]
    fn identify_links_the_anonymous_id() {
        let record = normalize(
            json!({"event": "$identify", "distinct_id": "u1", "uuid": "0190d5a0-0000-7000-8000-000000000001",
                   "properties": {"$anon_distinct_id": "anon-9", "$lib": "posthog-python"}}),
            "app",
            0,
        )
        .unwrap();
        assert_eq!(record.kind, EventType::Identify);
        assert_eq!(record.user_id.as_deref(), Some("u1"));
        assert_eq!(record.anonymous_id.as_deref(), Some("anon-9"));
        assert_eq!(record.context["library"]["name"], "posthog-python");
        assert_eq!(record.event_id, "0190d5a0-0000-7000-8000-000000000001");
    }

    /// A distinct id is a user id when the SDK says it is identified, an anonymous id when it
    /// says it is not, and both when it says nothing (the server SDKs): then it is who did the
    /// event and may still be merged into a person.
    #[test]
    fn a_distinct_id_is_stored_by_what_the_sdk_says_of_it() {
        let ids = |properties: Value, event: &str| {
            let record = normalize(
                json!({"event": event, "distinct_id": "d1", "properties": properties}),
                "app",
                0,
            )
            .unwrap();
            (record.user_id, record.anonymous_id)
        };
        let d1 = || Some("d1".to_string());
        assert_eq!(ids(json!({"$is_identified": true}), "x"), (d1(), None));
        assert_eq!(ids(json!({"$is_identified": false}), "x"), (None, d1()));
        assert_eq!(ids(json!({}), "x"), (d1(), d1()));
        assert_eq!(ids(json!({"alias": "d0"}), "$create_alias"), (d1(), None));
    }

    #[test]
    fn offset_sets_the_time_and_groups_bill_the_customer() {
        let record = normalize(
            json!({"event": "api_call_made", "distinct_id": "u1", "offset": 1000,
                   "properties": {"$groups": {"customer": "acme"}}}),
            "app",
            5_000_000,
        )
        .unwrap();
        assert_eq!(record.timestamp, 4_000_000);
        assert_eq!(record.customer_id.as_deref(), Some("acme"));
    }

    #[test]
    fn missing_distinct_id_is_named() {
        let err = normalize(json!({"event": "x"}), "app", 0).unwrap_err();
        assert_eq!(err.field, "distinct_id");
    }
}
