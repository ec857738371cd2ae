//! The Segment HTTP Tracking API: `/v1/batch` and `/v1/{track,identify,page,screen,group,alias}`
//! (browser aliases `/v1/{b,t,i,p,s,g,a}`), turned into [`EventRecord`]s.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::normalize::{self, Rejection};
use crate::event::{EventRecord, EventType};

/// Top-level keys of a Segment message that have a column or a place of their own; any other
/// key is kept under `context.extra` so nothing the SDK sent is lost.
pub(crate) const KNOWN_KEYS: &[&str] = &[
    "type",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "context",
    "integrations",
    "userId",
    "anonymousId",
    "event",
    "properties",
    "traits",
    "name",
    "category",
    "groupId",
    "previousId",
    "writeKey",
    "customerId",
    "version",
    "channel",
    "_metadata",
];

/// A `/v1/batch` body. Unknown top-level keys are ignored, as Segment does.
#[derive(Deserialize)]
pub(crate) struct BatchEnvelope<'a> {
    /// The messages, kept as raw JSON so each can be bounded, parsed and rejected on its own.
    #[serde(borrow)]
    pub batch: Vec<&'a RawValue>,
    /// Write key in the body (anything but a string counts as absent).
    #[serde(rename = "writeKey", default)]
    pub write_key: Option<Value>,
    /// Merged into each message's context (anything but an object is ignored).
    #[serde(default)]
    pub context: Option<Value>,
    /// Merged into each message's integrations (anything but an object is ignored).
    #[serde(default)]
    pub integrations: Option<Value>,
}

impl BatchEnvelope<'_> {
    /// The body's write key, if it is a string.
    pub(crate) fn write_key(&self) -> Option<&str> {
        self.write_key.as_ref().and_then(Value::as_str)
    }

    /// What each message inherits. A batch-level field of the wrong type costs no message:
    /// it is ignored.
    pub(crate) fn inherited(&self) -> Inherited<'_> {
        Inherited {
            context: self.context.as_ref().and_then(Value::as_object),
            integrations: self.integrations.as_ref().and_then(Value::as_object),
        }
    }
}

/// What batch-level fields every message inherits.
#[derive(Default, Clone, Copy)]
pub struct Inherited<'a> {
    /// Batch `context`.
    pub context: Option<&'a Map<String, Value>>,
    /// Batch `integrations`.
    pub integrations: Option<&'a Map<String, Value>>,
}

/// Bytes the batch-level `context` and `integrations` add to `message` when merged into it
/// (the keys it does not set itself, written as JSON members): what the message costs
/// beyond what the client sent for it.
pub(crate) fn merged_bytes(message: &Map<String, Value>, inherited: Inherited<'_>) -> usize {
    let added = |own: Option<&Value>, defaults: Option<&Map<String, Value>>| -> usize {
        let own = own.and_then(Value::as_object);
        defaults
            .into_iter()
            .flatten()
            .filter(|(key, _)| own.is_none_or(|own| !own.contains_key(*key)))
            .map(|(key, value)| {
                // "key":value, and the comma before the next member.
                key.len() + 4 + serde_json::to_vec(value).map_or(0, |v| v.len())
            })
            .sum()
    };
    added(message.get("context"), inherited.context)
        + added(message.get("integrations"), inherited.integrations)
}

/// Turns one Segment message into an event. `route` is the type implied by a single-message
/// route (`/v1/track` …), `None` for batches.
pub fn normalize(
    mut message: Map<String, Value>,
    route: Option<EventType>,
    inherited: Inherited<'_>,
    source: &str,
    received_at: i64,
) -> Result<EventRecord, Rejection> {
    let kind = match message.get("type") {
        Some(Value::String(text)) => EventType::parse(text).ok_or_else(|| {
            Rejection::new(
                "type",
                format!("`{text}` is not one of track, identify, page, screen, group, alias"),
            )
        })?,
        Some(Value::Null) | None => route.ok_or_else(|| {
            Rejection::new(
                "type",
                "is required (track, identify, page, screen, group or alias)",
            )
        })?,
        Some(_) => return Err(Rejection::new("type", "must be a string")),
    };
    let event_id = normalize::event_id(normalize::id_field(&message, "messageId")?);
    let user_id = normalize::id_field(&message, "userId")?;
    let anonymous_id = normalize::id_field(&message, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(Rejection::new(
            "userId",
            "userId or anonymousId is required",
        ));
    }
    let timestamp = match message
        .get("timestamp")
        .or_else(|| message.get("originalTimestamp"))
    {
        Some(Value::Null) | None => received_at,
        Some(value) => normalize::timestamp(value, "timestamp")?,
    };
    let top_customer = normalize::id_field(&message, "customerId")?;

    let mut group_id = None;
    let (event, properties) = match kind {
        EventType::Track => {
            let name = normalize::event_name(message.get("event"), "event")?;
            (
                Some(name),
                normalize::object_field(&mut message, "properties")?,
            )
        }
        EventType::Page | EventType::Screen => {
            let name = match message.get("name") {
                Some(Value::Null) | None => None,
                Some(value) => Some(normalize::event_name(Some(value), "name")?),
            };
            let mut properties = normalize::object_field(&mut message, "properties")?;
            if let Some(category) = message.remove("category").filter(|c| !c.is_null()) {
                properties.entry("category").or_insert(category);
            }
            (name, properties)
        }
        EventType::Identify => (None, normalize::object_field(&mut message, "traits")?),
        EventType::Group => {
            group_id = normalize::id_field(&message, "groupId")?;
            if group_id.is_none() {
                return Err(Rejection::new("groupId", "is required for group calls"));
            }
            (None, normalize::object_field(&mut message, "traits")?)
        }
        EventType::Alias => {
            let previous = normalize::id_field(&message, "previousId")?
                .ok_or_else(|| Rejection::new("previousId", "is required for alias calls"))?;
            if user_id.is_none() {
                return Err(Rejection::new("userId", "is required for alias calls"));
            }
            let mut properties = Map::new();
            properties.insert("previousId".into(), Value::String(previous));
            (None, properties)
        }
    };

    let mut context = normalize::object_field(&mut message, "context")?;
    normalize::merge_missing(&mut context, inherited.context);
    let mut integrations = normalize::object_field(&mut message, "integrations")?;
    normalize::merge_missing(&mut integrations, inherited.integrations);
    if !integrations.is_empty() {
        context.insert("integrations".into(), Value::Object(integrations));
    }
    let extra: Map<String, Value> = message
        .into_iter()
        .filter(|(key, _)| !KNOWN_KEYS.contains(&key.as_str()))
        .collect();
    if !extra.is_empty() {
        context.insert("extra".into(), Value::Object(extra));
    }

    let customer_id = normalize::customer_id(
        top_customer.or(group_id),
        &context,
        &properties,
        user_id.as_ref(),
    );
    Ok(EventRecord {
        event_id,
        kind,
        event,
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

    fn run(message: Value, route: Option<EventType>) -> Result<EventRecord, Rejection> {
        normalize(
            message.as_object().cloned().unwrap(),
            route,
            Inherited::default(),
            "web",
            7,
        )
    }

    #[test]
    fn a_track_call() {
        let record = run(
            json!({"type": "track", "messageId": "m1", "userId": "u1", "event": "api_call_made",
                   "properties": {"endpoint": "/x"}, "timestamp": "2026-01-02T03:04:05Z",
                   "context": {"groupId": "acme"}}),
            None,
        )
        .unwrap();
        assert_eq!(record.event_id, "m1");
        assert_eq!(record.kind, EventType::Track);
        assert_eq!(record.customer_id.as_deref(), Some("acme"));
        assert_eq!(record.properties["endpoint"], "/x");
    }

    #[test]
    fn route_type_and_generated_id() {
        let record = run(
            json!({"anonymousId": "a1", "event": "x"}),
            Some(EventType::Track),
        )
        .unwrap();
        assert_eq!(record.kind, EventType::Track);
        assert_eq!(record.timestamp, 7);
        assert_eq!(record.event_id.len(), 36);
    }

    #[test]
    fn batch_context_fills_in_and_message_context_wins() {
        let batch_context = json!({"library": {"name": "batch"}, "ip": "1.2.3.4"})
            .as_object()
            .cloned()
            .unwrap();
        let inherited = Inherited {
            context: Some(&batch_context),
            integrations: None,
        };
        let message = json!({"type": "identify", "userId": "u1", "context": {"library": {"name": "msg"}},
                             "traits": {"plan": "pro"}, "sentAt": "x", "custom": 1});
        let record = normalize(
            message.as_object().cloned().unwrap(),
            None,
            inherited,
            "web",
            0,
        )
        .unwrap();
        assert_eq!(record.context["library"]["name"], "msg");
        assert_eq!(record.context["ip"], "1.2.3.4");
        assert_eq!(record.context["extra"]["custom"], 1);
        assert_eq!(record.properties["plan"], "pro");
    }

    #[test]
    fn each_rule_names_its_field() {
        let field = |m: Value| run(m, None).unwrap_err().field;
        assert_eq!(field(json!({"type": "track", "userId": "u"})), "event");
        assert_eq!(field(json!({"type": "track", "event": "e"})), "userId");
        assert_eq!(field(json!({"type": "bogus", "userId": "u"})), "type");
        assert_eq!(
            field(json!({"type": "track", "userId": "u", "event": "e", "properties": [1]})),
            "properties"
        );
        assert_eq!(
            field(json!({"type": "track", "userId": "u", "event": "e", "timestamp": "soon"})),
            "timestamp"
        );
        assert_eq!(field(json!({"type": "alias", "userId": "u"})), "previousId");
        assert_eq!(field(json!({"type": "group", "userId": "u"})), "groupId");
        assert_eq!(field(json!({"userId": "u", "event": "e"})), "type");
    }

    #[test]
    fn group_calls_bill_the_group() {
        let record = run(
            json!({"type": "group", "userId": "u", "groupId": "acme", "traits": {}}),
            None,
        )
        .unwrap();
        assert_eq!(record.customer_id.as_deref(), Some("acme"));
    }
}
