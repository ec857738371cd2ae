//! The common Segment batch message, normalised straight from the request body.
//!
//! [`segment::normalize`] is the reference: it builds each message as a `serde_json` map and
//! handles every case. Most messages an SDK sends need none of that. This path reads the top
//! level as raw entries ([`RawObject`]), parses only the small fields it needs, and writes the
//! stream message with `properties` and `context` copied as text (whitespace between tokens
//! removed, keys in the order the sender wrote them). Whenever a message needs anything more
//! (a rejection, batch-level context or integrations to merge, top-level keys kept under
//! `context.extra`, a repeated key at any depth, a page category, an alias, the size bound) it
//! answers [`Fast::Fallback`] and the reference path takes the message, so a rejection is
//! always the reference's. Tests hold both paths to the same stream message.

use serde_json::Value;
use serde_json::value::RawValue;

use super::normalize::{self, Rejection};
use super::segment::{self, Inherited};
use crate::bus::publisher::Outgoing;
use crate::bus::subject_for;
use crate::event::EventType;
use crate::json::{self, RawObject};
use crate::schema::registry::TAGS_KEY;
use crate::schema::{Decision, Registry};

/// What the fast path made of one message.
#[derive(Debug)]
pub enum Fast {
    /// Accepted: the stream message.
    Ready(Outgoing),
    /// A sampled event that fell outside its sample (not stored, by design).
    SampledOut,
    /// Not a message this path handles: normalise it with the reference path.
    Fallback,
}

/// What every message of one request shares.
pub struct Batch<'a> {
    /// Batch-level fields the messages inherit.
    pub inherited: Inherited<'a>,
    /// The source whose write key sent the request.
    pub source: &'a str,
    /// When the request arrived (UTC microseconds).
    pub received_at: i64,
    /// The registry that decides tracks.
    pub registry: &'a Registry,
    /// The stream's shard count.
    pub shards: u32,
    /// Largest stream message.
    pub max_message_bytes: usize,
    /// How far from `received_at` an event time may be.
    pub time_bounds: normalize::TimeBounds,
    /// The write keys: a message carrying one in its properties or context takes the
    /// reference path, which takes it out.
    pub keys: &'a super::auth::WriteKeys,
}

impl Batch<'_> {
    /// Whether messages inherit anything: then each goes the reference path, which merges.
    fn inherits(&self) -> bool {
        let non_empty =
            |map: Option<&serde_json::Map<String, Value>>| map.is_some_and(|m| !m.is_empty());
        non_empty(self.inherited.context) || non_empty(self.inherited.integrations)
    }
}

/// Normalises one batch message (its JSON text), or says it needs the reference path.
pub fn normalize(text: &str, batch: &Batch<'_>) -> Fast {
    if batch.inherits() {
        return Fast::Fallback;
    }
    accept(text, batch).unwrap_or(Fast::Fallback)
}

/// `None` is a fallback.
fn accept(text: &str, batch: &Batch<'_>) -> Option<Fast> {
    if !json::is_plain(text) {
        return None;
    }
    let message = RawObject::parse(text).ok()?;
    if message
        .keys()
        .any(|key| !segment::KNOWN_KEYS.contains(&key))
    {
        return None;
    }
    let kind = match message.value("type")? {
        Value::String(text) => EventType::parse(&text)?,
        _ => return None,
    };
    let event_id = normalize::event_id(id(&message, "messageId")?);
    let user_id = id(&message, "userId")?;
    let anonymous_id = id(&message, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return None;
    }
    let timestamp = match message
        .get("timestamp")
        .or_else(|| message.get("originalTimestamp"))
    {
        Some(raw) if json::is_null(raw) => batch.received_at,
        None => batch.received_at,
        Some(raw) => normalize::timestamp(&parse(raw)?, "timestamp").ok()?,
    };
    normalize::within_skew(timestamp, batch.received_at, batch.time_bounds).ok()?;
    let top_customer = id(&message, "customerId")?;
    let mut group_id = None;
    let (event, properties) = match kind {
        EventType::Track => {
            let name = normalize::event_name(message.value("event").as_ref(), "event").ok()?;
            (Some(name), object(&message, "properties")?)
        }
        EventType::Page | EventType::Screen => {
            if message.get("category").is_some_and(|c| !json::is_null(c)) {
                return None;
            }
            let name = match message.value("name") {
                Some(Value::Null) | None => None,
                Some(value) => Some(normalize::event_name(Some(&value), "name").ok()?),
            };
            (name, object(&message, "properties")?)
        }
        EventType::Identify => (None, object(&message, "traits")?),
        EventType::Group => {
            group_id = Some(id(&message, "groupId")??);
            (None, object(&message, "traits")?)
        }
        EventType::Alias => return None,
    };
    let context = object(&message, "context")?;
    if let Some(integrations) = object(&message, "integrations")?
        && !RawObject::parse(integrations.get()).ok()?.is_empty()
    {
        return None;
    }
    let carries_key =
        |raw: Option<&RawValue>| raw.is_some_and(|r| batch.keys.appears_in(r.get().as_bytes()));
    if carries_key(properties) || carries_key(context) {
        return None;
    }
    let properties_view = view(properties)?;

    let context_view = view(context)?;
    let customer_id = normalize::customer_id(
        top_customer.or(group_id),
        &context_view,
        &properties_view,
        user_id.as_ref(),
    );

    let (mut schema_version, mut sample_rate, mut tags) = (None, None, None);
    if let (EventType::Track, Some(name)) = (kind, &event) {
        match batch.registry.judge(name, &event_id, &properties_view) {
            (
                Decision::Accept {
                    schema_version: v,
                    sample_rate: r,
                },
                t,
            ) => {
                schema_version = v;
                sample_rate = r;
                tags = t;
            }
            (Decision::SampledOut, _) => return Some(Fast::SampledOut),
            (Decision::Reject(_), _) => return None,
        }
    }
    // Tags go first in the context; one the sender wrote under that key would be replaced.
    if tags.is_some() && context_view.get(TAGS_KEY).is_some() {
        return None;
    }

    let mut payload = Vec::with_capacity(text.len() + 160);
    let mut out = Writer(&mut payload);
    out.raw("{\"event_id\":");
    out.string(&event_id);
    out.raw(",\"type\":\"");
    out.raw(kind.as_str());
    out.raw("\",\"event\":");
    out.option(event.as_deref());
    out.raw(",\"user_id\":");
    out.option(user_id.as_deref());
    out.raw(",\"anonymous_id\":");
    out.option(anonymous_id.as_deref());
    out.raw(",\"customer_id\":");
    out.option(customer_id.as_deref());
    out.raw(",\"timestamp\":");
    out.json(&timestamp);
    out.raw(",\"received_at\":");
    out.json(&batch.received_at);
    out.raw(",\"properties\":");
    out.object(properties);
    out.raw(",\"context\":");
    match tags {
        Some(tags) => out.object_with(TAGS_KEY, &tags, context, context_view.is_empty()),
        None => out.object(context),
    }
    out.raw(",\"source\":");
    out.string(batch.source);
    out.raw(",\"schema_version\":");
    out.option(schema_version.as_deref());
    if let Some(rate) = sample_rate {
        out.raw(",\"sample_rate\":");
        out.json(&rate);
    }
    out.raw("}");
    if payload.len() > super::stored_bound(batch.max_message_bytes) {
        return None;
    }
    let shard_key = customer_id.as_deref().unwrap_or(&event_id);
    Some(Fast::Ready(Outgoing {
        subject: subject_for(batch.shards, shard_key, kind.as_str()),
        msg_id: event_id,
        payload: payload.into(),
    }))
}

/// An id field, as [`normalize::id_field`] reads it; `None` (fall back) if it is invalid.
fn id(message: &RawObject<'_>, field: &str) -> Option<Option<String>> {
    match message.get(field) {
        None => Some(None),
        Some(raw) => normalize::id_value(&parse(raw)?, field).ok(),
    }
}

/// An object field: `Some(None)` when absent or null (an empty object), `None` (fall back)
/// when it is not an object.
fn object<'a>(message: &RawObject<'a>, field: &str) -> Option<Option<&'a RawValue>> {
    match message.get(field) {
        None => Some(None),
        Some(raw) if json::is_null(raw) => Some(None),
        Some(raw) if json::is_object(raw) => Some(Some(raw)),
        Some(_) => None,
    }
}

/// An object field's entries (none when it is absent).
fn view(raw: Option<&RawValue>) -> Option<RawObject<'_>> {
    match raw {
        Some(raw) => RawObject::parse(raw.get()).ok(),
        None => Some(RawObject::default()),
    }
}

fn parse(raw: &RawValue) -> Option<Value> {
    serde_json::from_str(raw.get()).ok()
}

/// Writes the stream message, field by field, as [`crate::event::EventRecord`] serialises.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn raw(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    fn json<T: serde::Serialize + ?Sized>(&mut self, value: &T) {
        // Writing strings and numbers to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.0, value);
    }

    fn string(&mut self, text: &str) {
        self.json(text);
    }

    fn option(&mut self, text: Option<&str>) {
        match text {
            Some(text) => self.string(text),
            None => self.raw("null"),
        }
    }

    fn object(&mut self, raw: Option<&RawValue>) {
        match raw {
            Some(raw) => json::minify(raw.get(), self.0),
            None => self.raw("{}"),
        }
    }

    /// The object `raw` (`empty` says it has no entries) with `key: value` added first.
    fn object_with(&mut self, key: &str, value: &Value, raw: Option<&RawValue>, empty: bool) {
        self.raw("{");
        self.string(key);
        self.raw(":");
        self.json(value);
        match raw {
            Some(raw) if !empty => {
                self.raw(",");
                // Everything after the object's opening brace.
                let rest = raw.get().trim_start().strip_prefix('{').unwrap_or_default();
                json::minify(rest, self.0);
            }
            _ => self.raw("}"),
        }
    }
}

/// The reference path for one batch message, as live ingest runs it when this path falls
/// back: for tests that hold the two paths to the same result.
pub fn reference(text: &str, batch: &Batch<'_>) -> Result<Option<Outgoing>, Rejection> {
    let message = super::parse_object(text.as_bytes())?;
    let mut event = segment::normalize(
        message,
        None,
        batch.inherited,
        batch.source,
        batch.received_at,
    )?;
    batch.keys.scrub(&mut event.properties, &mut event.context);
    super::prepare(
        event,
        batch.registry,
        batch.shards,
        batch.max_message_bytes,
        batch.time_bounds,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn registry(extra: &str) -> Registry {
        let mut config: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/config-template.json"))
                .unwrap();
        let events = config["events"].as_array_mut().unwrap();
        events.push(serde_json::json!({"name": "mouse_moved", "sampleRate": 0.5}));
        events.push(
            serde_json::json!({"name": "order_placed", "policy": "reject", "properties": {
            "type": "object", "required": ["total"],
            "properties": {"total": {"type": "number"}}}}),
        );
        if !extra.is_empty() {
            config["registry"] = serde_json::from_str(extra).unwrap();
        }
        Registry::load(&Config::from_json(&config.to_string(), "t").unwrap(), None).unwrap()
    }

    fn batch<'a>(registry: &'a Registry, inherited: Inherited<'a>) -> Batch<'a> {
        Batch {
            inherited,
            source: "web \"app\"",
            received_at: 1_767_323_045_000_000,
            registry,
            shards: 8,
            max_message_bytes: 32 * 1024,
            time_bounds: normalize::TimeBounds {
                future_skew: 86_400_000_000,
                max_age: 400 * 86_400_000_000,
            },
            keys: &KEYS,
        }
    }

    /// The write key of the tests' source.
    const KEY: &str = "wk_live_4f9a2c";

    static KEYS: std::sync::LazyLock<crate::ingest::auth::WriteKeys> =
        std::sync::LazyLock::new(|| {
            let mut config = Config::default();
            config.add_default_write_key(KEY);
            crate::ingest::auth::WriteKeys::from_config(&config)
        });

    #[test]
    fn a_write_key_in_context_or_properties_is_never_stored() {
        let registry = registry("");
        let batch = batch(&registry, Inherited::default());
        for text in [
            format!(
                r#"{{"type":"track","messageId":"k1","userId":"u","event":"api_call_made","context":{{"writeKey":"{KEY}"}}}}"#
            ),
            format!(
                r#"{{"type":"track","messageId":"k2","userId":"u","event":"api_call_made","properties":{{"note":"key is {KEY}","list":["{KEY}"]}}}}"#
            ),
        ] {
            assert!(matches!(normalize(&text, &batch), Fast::Fallback), "{text}");
            let stored = reference(&text, &batch).unwrap().unwrap();
            let stored = String::from_utf8_lossy(&stored.payload).into_owned();
            assert!(!stored.contains(KEY), "{stored}");
            assert!(!stored.contains("writeKey"), "{stored}");
        }
    }

    /// Runs both paths; when the fast one answers, the reference must answer the same
    /// stream message. Returns the fast path's verdict.
    fn both(text: &str, batch: &Batch<'_>) -> &'static str {
        let reference = reference(text, batch);
        match normalize(text, batch) {
            Fast::Ready(fast) => {
                let slow = reference
                    .unwrap_or_else(|r| panic!("fast accepted, reference rejected ({r:?}): {text}"))
                    .unwrap_or_else(|| panic!("fast accepted, reference sampled out: {text}"));
                let read = |payload: &[u8]| serde_json::from_slice::<Value>(payload).unwrap();
                let (mut fast_json, mut slow_json) = (read(&fast.payload), read(&slow.payload));
                if text.contains(&slow.msg_id) {
                    assert_eq!(fast.msg_id, slow.msg_id, "{text}");
                    assert_eq!(fast.subject, slow.subject, "{text}");
                } else {
                    // A generated id differs between any two runs.
                    fast_json["event_id"] = Value::Null;
                    slow_json["event_id"] = Value::Null;
                }
                assert_eq!(fast_json, slow_json, "{text}");
                let view = crate::event::EventView::decode(&fast.payload).unwrap();
                assert!(
                    json::is_plain(view.properties.get()) && json::is_plain(view.context.get())
                );
                "ready"
            }
            Fast::SampledOut => {
                assert!(matches!(reference, Ok(None)), "{text}");
                "sampled out"
            }
            Fast::Fallback => "fallback",
        }
    }

    #[test]
    fn what_sdks_send_takes_the_fast_path_and_matches_the_reference() {
        let registry = registry("");
        let batch = batch(&registry, Inherited::default());
        let ready = [
            // The bench's message, compact.
            r#"{"type":"track","messageId":"m1","userId":"user-7","event":"api_call_made","timestamp":"2026-01-02T03:04:05.678Z","context":{"groupId":"customer-7","library":{"name":"bench"}},"properties":{"endpoint":"/v1/search","latency_ms":12,"status":200}}"#,
            // segment-analytics-python's spacing, integrations {}, escapes, odd numbers.
            "{\"type\": \"track\", \"messageId\": \"m2\", \"anonymousId\": \"a b\",\n \"event\": \"api_call_made\", \"integrations\": {},\n \"context\": {\"library\": {\"name\": \"analytics-python\", \"version\": \"2.3.3\"}},\n \"properties\": {\"q\": \"caf\\u00e9 \\\"x\\\" \\\\ \\/\", \"n\": 1.0, \"e\": 1E3, \"z\": -0, \"big\": 123456789012345678901234, \"list\": [ 1 , {\"k\" : null} ]},\n \"timestamp\": \"2026-01-02T04:04:05.678+01:00\", \"sentAt\": \"2026-01-02T03:04:06Z\"}",
            r#"{"type":"identify","messageId":"m3","userId":42,"anonymousId":"anon-1","traits":{"plan":"pro","email":"x@y"},"timestamp":1767323045678}"#,
            r#"{"type":"group","messageId":"m4","userId":"u1","groupId":"acme","traits":{"name":"Acme"}}"#,
            r#"{"type":"page","messageId":"m5","userId":"u1","name":"Pricing","properties":{"path":"/pricing"},"category":null}"#,
            r#"{"type":"screen","messageId":"m6","anonymousId":"d1","properties":{}}"#,
            r#"{"type":"t","messageId":"m7","userId":"u1","event":"api_call_made","timestamp":null,"originalTimestamp":"2020-01-01T00:00:00Z"}"#,
            r#"{"type":"track","messageId":"m8","userId":"u1","event":"api_call_made","originalTimestamp":"2026-01-02 03:04:05"}"#,
            r#"{"type":"track","messageId":"m9","userId":"u1","event":"api_call_made","customerId":"top","context":{"groupId":"ctx"}}"#,
            r#"{"type":"track","messageId":"m10","userId":"u1","event":"api_call_made","properties":{"customer_id":"prop"}}"#,
            r#"{"type":"track","messageId":"m11","userId":"u1","event":"api_call_made","properties":{"$groups":{"customer":"ph"}},"context":{"groupId":""}}"#,
            r#"{"type":"track","messageId":"m12","userId":"u1","event":"api_call_made","properties":null,"context":null}"#,
            r#"{"type":"track","messageId":"  m13  ","userId":" u1 ","event":"api_call_made","writeKey":"k","version":2,"channel":"server","_metadata":{"x":1},"receivedAt":"whenever"}"#,
            r#"{"type":"track","userId":"u1","event":"api_call_made"}"#,
            r#"{"type":"track","messageId":"","anonymousId":"a1","event":"api_call_made"}"#,
            // Unplanned events and properties are tagged (the default policy).
            r#"{"type":"track","messageId":"m18","userId":"u","event":"not_planned"}"#,
            r#"{"type":"track","messageId":"m19","userId":"u","event":"api_call_made","properties":{"unplanned":1},"context":{"ip":"1.2.3.4"}}"#,
            r#"{"type":"track","messageId":"m20","userId":"u","event":"api_call_made","properties":{"unplanned":1},"context":{ }}"#,
            r#"{"type":"track","messageId":"m16","userId":"u1","event":"order_placed","properties":{"total":3}}"#,
            r#"{"type":"track","messageId":"m17","userId":"u1","event":"api_call_made","properties":{"$lib":"x","status":1}}"#,
        ];
        for text in ready {
            assert_eq!(both(text, &batch), "ready", "{text}");
        }
        // Mutants of each: wherever the fast path still answers, it must agree.
        let mut rng = crate::demo::Rng::new(7);
        let alphabet = "{}[]\",:\\ u0aé1-.eE null true".as_bytes();
        let mut fast = 0;
        for text in ready {
            for _ in 0..300 {
                let mut bytes = text.as_bytes().to_vec();
                for _ in 0..=rng.below(3) {
                    let at = rng.below(bytes.len() as u64) as usize;
                    let byte = alphabet[rng.below(alphabet.len() as u64) as usize];
                    match rng.below(3) {
                        0 => bytes[at] = byte,
                        1 => bytes.insert(at, byte),
                        _ => drop(bytes.remove(at)),
                    }
                }
                if let Ok(mutant) = String::from_utf8(bytes)
                    && both(&mutant, &batch) == "ready"
                {
                    fast += 1;
                }
            }
        }
        assert!(
            fast > 300,
            "enough mutants still take the fast path: {fast}"
        );
        let fallback = [
            // Rejections are always the reference's.
            r#"{"type":"track","messageId":"r1","event":"api_call_made"}"#,
            r#"{"type":"bogus","messageId":"r2","userId":"u"}"#,
            r#"{"messageId":"r3","userId":"u","event":"api_call_made"}"#,
            r#"{"type":"track","messageId":"r4","userId":"u","event":"api_call_made","properties":[1]}"#,
            r#"{"type":"track","messageId":"r5","userId":"u","event":"api_call_made","timestamp":"soon"}"#,
            r#"{"type":"track","messageId":"r6","userId":{"a":1},"event":"api_call_made"}"#,
            r#"{"type":"track","messageId":"r7\r\nNats-Msg-Id: x","userId":"u","event":"api_call_made"}"#,
            r#"{"type":"track","messageId":"r8","userId":"u","event":""}"#,
            r#"{"type":"group","messageId":"r9","userId":"u"}"#,
            r#"{"type":"track","messageId":"r10","userId":"u","event":"api_call_made","context":"x"}"#,
            r#"{"type":"track","messageId":"r11","userId":"u","event":"api_call_made","integrations":[]}"#,
            r#"{"type":"track","messageId":"r12","userId":"u","event":"order_placed","properties":{"total":"lots"}}"#,
            r#"{"type":"track","messageId":"r13","userId":"u","event":"api_call_made","properties":{"s":"\ud800"}}"#,
            r#"[1, 2]"#,
            // What the reference merges, tags or keeps elsewhere.
            r#"{"type":"alias","messageId":"f1","userId":"u","previousId":"a"}"#,
            r#"{"type":"page","messageId":"f2","userId":"u","name":"Docs","category":"Help"}"#,
            r#"{"type":"track","messageId":"f3","userId":"u","event":"api_call_made","custom":1}"#,
            r#"{"type":"track","messageId":"f4","userId":"u","event":"api_call_made","integrations":{"All":false}}"#,
            r#"{"type":"track","messageId":"f5","userId":"u","event":"api_call_made","userId":"v"}"#,
            r#"{"type":"track","messageId":"f6","userId":"u","event":"api_call_made","properties":{"a":{"b":1,"b":2}}}"#,
            r#"{"type":"track","messageId":"f7","userId":"u","event":"not_planned","context":{"schema_violations":1}}"#,
        ];
        for text in fallback {
            assert_eq!(both(text, &batch), "fallback", "{text}");
        }
        let sampled: Vec<&str> = (0..40)
            .map(|i| {
                let text = format!(
                    r#"{{"type":"track","messageId":"s{i}","userId":"u","event":"mouse_moved"}}"#
                );
                both(&text, &batch)
            })
            .collect();
        assert!(sampled.contains(&"sampled out") && sampled.contains(&"ready"));
    }

    #[test]
    fn inherited_context_and_the_size_bound_go_the_reference_path() {
        let registry = registry("");
        let context = serde_json::json!({"library": {"name": "batch"}});
        let inherited = Inherited {
            context: context.as_object(),
            integrations: None,
        };
        let message = r#"{"type":"track","messageId":"i1","userId":"u","event":"api_call_made"}"#;
        assert_eq!(both(message, &batch(&registry, inherited)), "fallback");
        let empty = serde_json::Map::new();
        let nothing = Inherited {
            context: Some(&empty),
            integrations: Some(&empty),
        };
        assert_eq!(both(message, &batch(&registry, nothing)), "ready");
        // A message exactly at the bound as sent is taken, whatever northstar adds to it.
        let mut exact = batch(&registry, Inherited::default());
        exact.max_message_bytes = message.len();
        assert_eq!(both(message, &exact), "ready");
        // A stored form past its own bound goes the reference path, which names the bound.
        let padded = format!(
            r#"{{"type":"track","messageId":"i2","userId":"u","event":"api_call_made","properties":{{"pad":"{}"}}}}"#,
            "x".repeat(20_000)
        );
        let mut small = batch(&registry, Inherited::default());
        small.max_message_bytes = 4_000;
        assert_eq!(both(&padded, &small), "fallback");
        assert!(
            reference(&padded, &small).is_err(),
            "the reference names the bound"
        );
    }

    #[test]
    fn allowed_violations_stay_fast_and_agree() {
        let registry = registry(r#"{"unplanned": "allow", "unplannedProperties": "allow"}"#);
        let batch = batch(&registry, Inherited::default());
        for text in [
            r#"{"type":"track","messageId":"a1","userId":"u","event":"not_planned","properties":{"x":1}}"#,
            r#"{"type":"track","messageId":"a2","userId":"u","event":"api_call_made","properties":{"unplanned":1}}"#,
        ] {
            assert_eq!(both(text, &batch), "ready", "{text}");
        }
    }
}
