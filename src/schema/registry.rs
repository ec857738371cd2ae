//! The compiled registry: per event name, what its properties must look like and what to do
//! when they do not.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{Map, Value, json};

use super::quantity;
use crate::config::{Aggregation, Config, Policy, PropertySpec};
use crate::json::JsonObject;
use crate::rejected::Rejection;

/// Where tagged violations go in an event's context.
pub(crate) const TAGS_KEY: &str = "schema_violations";

/// What the registry decided about an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Store it (with [`Registry::decide`], violations the policy tags are already in its
    /// context).
    Accept {
        /// The schema version of a planned event.
        schema_version: Option<String>,
        /// The sampling rate it was kept at, if its event is sampled.
        sample_rate: Option<f64>,
    },
    /// Not stored by design: the event is sampled and this one fell outside the sample.
    SampledOut,
    /// To the rejected store, with every violation.
    Reject(Vec<Rejection>),
}

/// Why the registry could not be built.
#[derive(Debug, thiserror::Error)]
#[error("schema of event `{event}` ({origin}): {message}")]
pub struct RegistryError {
    /// Name of the event whose schema is wrong.
    pub event: String,
    /// Where the schema came from.
    pub origin: String,
    /// What is wrong.
    pub message: String,
}

enum Shape {
    /// The seed's list: planned names (others are unplanned properties).
    Names(HashSet<String>),
    /// A compiled JSON Schema (draft 2020-12) of the properties object.
    Json(Box<jsonschema::Validator>),
}

struct EventSchema {
    shape: Shape,
    version: Option<String>,
    policy: Policy,
    sample_rate: Option<f64>,
    meters: Vec<(Option<String>, Aggregation)>,
}

/// Every event's schema, compiled once.
pub struct Registry {
    events: HashMap<String, EventSchema>,
    unplanned: Policy,
    unplanned_properties: Policy,
    /// `metering.maxQuantity`.
    max_quantity: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} events)", self.events.len())
    }
}

impl Registry {
    /// Compiles the config's events, with `<event>.json` schemas from `schema_dir` (a file
    /// replaces a property list of the config; an event with only a file is planned too).
    pub fn load(config: &Config, schema_dir: Option<&Path>) -> Result<Self, RegistryError> {
        let mut events = HashMap::new();
        for event in &config.events {
            let file = schema_dir
                .map(|dir| dir.join(format!("{}.json", event.name)))
                .filter(|p| p.is_file());
            let (properties, origin) = match &file {
                Some(path) => (read_schema(&event.name, path)?, path.display().to_string()),
                None => (event.properties.clone(), "config".to_string()),
            };
            let shape = compile(&event.name, &origin, &properties)?;
            let meters = event
                .metering
                .iter()
                .map(|m| (m.value_property.clone(), m.aggregation))
                .collect();
            events.insert(
                event.name.clone(),
                EventSchema {
                    shape,
                    version: Some(event.version.clone().unwrap_or_else(|| "1-0-0".into())),
                    policy: event.policy.unwrap_or(config.registry.violations),
                    sample_rate: event.sample_rate.filter(|r| *r < 1.0),
                    meters,
                },
            );
        }
        if let Some(dir) = schema_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for path in entries.flatten().map(|e| e.path()) {
                let Some(name) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(str::to_string)
                else {
                    continue;
                };
                if path.extension().is_none_or(|e| e != "json") || events.contains_key(&name) {
                    continue;
                }
                let properties = read_schema(&name, &path)?;
                let shape = compile(&name, &path.display().to_string(), &properties)?;
                events.insert(
                    name,
                    EventSchema {
                        shape,
                        version: Some("1-0-0".into()),
                        policy: config.registry.violations,
                        sample_rate: None,
                        meters: Vec::new(),
                    },
                );
            }
        }
        Ok(Self {
            events,
            unplanned: config.registry.unplanned,
            unplanned_properties: config.registry.unplanned_properties,
            max_quantity: config.metering.max_quantity,
        })
    }

    /// Whether `event` is planned.
    pub fn is_planned(&self, event: &str) -> bool {
        self.events.contains_key(event)
    }

    /// Checks one event's properties; tagged violations are added to `context`.
    pub fn decide(
        &self,
        event: &str,
        event_id: &str,
        properties: &Map<String, Value>,
        context: &mut Map<String, Value>,
    ) -> Decision {
        let (decision, tags) = self.judge(event, event_id, properties);
        if let Some(tags) = tags {
            context.insert(TAGS_KEY.into(), tags);
        }
        decision
    }

    /// Checks one event's properties. Violations the policy tags come back beside the
    /// decision, to be put under `context.schema_violations`.
    pub fn judge(
        &self,
        event: &str,
        event_id: &str,
        properties: &dyn JsonObject,
    ) -> (Decision, Option<Value>) {
        let Some(schema) = self.events.get(event) else {
            let violation = Rejection::new("event", format!("`{event}` is not a planned event"));
            return self.apply_policy(self.unplanned, vec![violation], None, None);
        };
        // A metered event's quantity is never negotiable: always a rejection.
        let mut fatal = Vec::new();
        for (value_property, aggregation) in &schema.meters {
            let value = value_property.as_deref().and_then(|p| properties.field(p));
            let judged =
                quantity::quantity_of(value_property.as_deref(), *aggregation, value.as_deref())
                    .and_then(|contribution| {
                        quantity::within_bounds(
                            &contribution,
                            self.max_quantity,
                            value_property.as_deref(),
                        )
                    });
            if let Err(rejection) = judged {
                fatal.push(rejection);
            }
        }
        if !fatal.is_empty() {
            return (Decision::Reject(fatal), None);
        }
        if let Some(rate) = schema.sample_rate
            && !in_sample(event_id, rate)
        {
            return (Decision::SampledOut, None);
        }
        let (violations, policy) = match &schema.shape {
            Shape::Names(names) => {
                // In key order, whichever order they were written in.
                let mut keys = properties.field_names();
                keys.sort_unstable();
                let unplanned: Vec<Rejection> = keys
                    .into_iter()
                    .filter(|k| !names.contains(*k) && !k.starts_with('$'))
                    .map(|k| {
                        Rejection::new(
                            format!("properties.{k}"),
                            "unplanned: not in the event's property list",
                        )
                    })
                    .collect();
                (unplanned, self.unplanned_properties)
            }
            Shape::Json(validator) => {
                let instance = properties.to_value();
                let violations = validator
                    .iter_errors(&instance)
                    .take(20)
                    .map(|error| {
                        let path = error
                            .instance_path()
                            .as_str()
                            .trim_start_matches('/')
                            .replace('/', ".");
                        let field = if path.is_empty() {
                            "properties".to_string()
                        } else {
                            format!("properties.{path}")
                        };
                        Rejection::new(
                            field,
                            format!("{}: {}", error.kind().keyword(), error.masked()),
                        )
                    })
                    .collect();
                (violations, schema.policy)
            }
        };
        self.apply_policy(
            policy,
            violations,
            schema.version.clone(),
            schema.sample_rate,
        )
    }

    fn apply_policy(
        &self,
        policy: Policy,
        violations: Vec<Rejection>,
        schema_version: Option<String>,
        sample_rate: Option<f64>,
    ) -> (Decision, Option<Value>) {
        let accept = Decision::Accept {
            schema_version,
            sample_rate,
        };
        if violations.is_empty() || policy == Policy::Allow {
            return (accept, None);
        }
        match policy {
            Policy::Reject => (Decision::Reject(violations), None),
            _ => {
                let tagged: Vec<Value> = violations
                    .iter()
                    .map(|v| json!({"field": v.field, "message": v.message}))
                    .collect();
                (accept, Some(Value::Array(tagged)))
            }
        }
    }
}

fn read_schema(event: &str, path: &Path) -> Result<PropertySpec, RegistryError> {
    let err = |message: String| RegistryError {
        event: event.to_string(),
        origin: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    match serde_json::from_str::<Value>(&text).map_err(|e| err(e.to_string()))? {
        Value::Object(schema) => Ok(PropertySpec::Schema(schema)),
        _ => Err(err("a schema file holds one JSON Schema object".into())),
    }
}

fn compile(event: &str, origin: &str, properties: &PropertySpec) -> Result<Shape, RegistryError> {
    match properties {
        PropertySpec::Names(names) => Ok(Shape::Names(names.iter().cloned().collect())),
        PropertySpec::Schema(schema) => {
            let value = Value::Object(schema.clone());
            jsonschema::draft202012::new(&value)
                .map(|v| Shape::Json(Box::new(v)))
                .map_err(|e| RegistryError {
                    event: event.to_string(),
                    origin: origin.to_string(),
                    message: format!("not a valid JSON Schema: {e}"),
                })
        }
    }
}

/// Deterministic sampling by event id: a retry of a kept event is kept again.
pub(crate) fn in_sample(event_id: &str, rate: f64) -> bool {
    let hash = event_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (hash % 1_000_000) as f64 / 1_000_000.0 < rate
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(extra: &str) -> Registry {
        let text = format!(
            r#"{{"events": [
                {{"name": "signup_completed", "properties": ["plan", "source"]}},
                {{"name": "order_placed", "version": "2-1-0", "policy": "reject", "properties": {{
                    "type": "object", "required": ["total"],
                    "properties": {{"total": {{"type": "number", "minimum": 0}}, "currency": {{"enum": ["EUR", "USD"]}}}}
                }}}},
                {{"name": "mouse_moved", "sampleRate": 0.1}}
            ]{extra}}}"#
        );
        Registry::load(&Config::from_json(&text, "t").unwrap(), None).unwrap()
    }

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn a_json_schema_rejects_with_the_field_and_rule() {
        let r = registry("");
        let mut ctx = Map::new();
        let d = r.decide(
            "order_placed",
            "e1",
            &props(json!({"total": -3, "currency": "GBP"})),
            &mut ctx,
        );
        let Decision::Reject(violations) = d else {
            panic!("{d:?}")
        };
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert!(fields.contains(&"properties.total"), "{fields:?}");
        assert!(fields.contains(&"properties.currency"));
        assert!(violations.iter().any(|v| v.message.starts_with("minimum")));
        let ok = r.decide("order_placed", "e2", &props(json!({"total": 3})), &mut ctx);
        assert_eq!(
            ok,
            Decision::Accept {
                schema_version: Some("2-1-0".into()),
                sample_rate: None
            }
        );
    }

    #[test]
    fn property_lists_tag_unplanned_properties() {
        let r = registry("");
        let mut ctx = Map::new();
        let d = r.decide(
            "signup_completed",
            "e1",
            &props(json!({"plan": "pro", "colour": "red"})),
            &mut ctx,
        );
        assert!(matches!(d, Decision::Accept { .. }));
        assert_eq!(ctx["schema_violations"][0]["field"], "properties.colour");
    }

    #[test]
    fn unplanned_events_follow_their_policy() {
        let mut ctx = Map::new();
        assert!(matches!(
            registry("").decide("nope", "e", &Map::new(), &mut ctx),
            Decision::Accept { .. }
        ));
        assert_eq!(ctx["schema_violations"][0]["field"], "event");
        let strict = registry(r#", "registry": {"unplanned": "reject"}"#);
        assert!(matches!(
            strict.decide("nope", "e", &Map::new(), &mut Map::new()),
            Decision::Reject(_)
        ));
    }

    #[test]
    fn sampling_is_deterministic_and_close_to_its_rate() {
        let r = registry("");
        let kept = (0..10_000)
            .filter(|i| {
                matches!(
                    r.decide(
                        "mouse_moved",
                        &format!("id-{i}"),
                        &Map::new(),
                        &mut Map::new()
                    ),
                    Decision::Accept { .. }
                )
            })
            .count();
        assert!((800..1_200).contains(&kept), "{kept}");
        assert_eq!(in_sample("id-7", 0.1), in_sample("id-7", 0.1));
    }
}
