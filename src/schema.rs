//! The schema registry: what a valid event is, per event name.
//!
//! - [`quantity`]: quantities of metered events (exact decimals);
//!
//! [`EventRules`] is what ingest asks about each accepted event before it is published.

pub mod quantity;

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::config::{Aggregation, Config};
use crate::rejected::Rejection;

/// Per-event rules compiled from the config.
#[derive(Debug, Clone, Default)]
pub struct EventRules {
    /// For each metered event: the quantity property and aggregation of each of its meters.
    metered: HashMap<String, Vec<(Option<String>, Aggregation)>>,
}

impl EventRules {
    /// Compiles the rules of a validated config.
    pub fn from_config(config: &Config) -> Self {
        let mut metered: HashMap<String, Vec<(Option<String>, Aggregation)>> = HashMap::new();
        for event in &config.events {
            if let Some(metering) = &event.metering {
                metered
                    .entry(event.name.clone())
                    .or_default()
                    .push((metering.value_property.clone(), metering.aggregation));
            }
        }
        Self { metered }
    }

    /// Checks a track event's properties: a metered event must carry a valid quantity, so a
    /// missing, negative or non-numeric quantity goes to the rejected store instead of
    /// skewing usage and bills.
    pub fn validate(&self, event: &str, properties: &Map<String, Value>) -> Result<(), Rejection> {
        for (value_property, aggregation) in self.metered.get(event).into_iter().flatten() {
            quantity::quantity(value_property.as_deref(), *aggregation, properties)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_metered_event_needs_its_quantity() {
        let text = include_str!("../tests/fixtures/config-template.json").replace(
            "\"unit\": \"request\"",
            "\"unit\": \"request\", \"valueProperty\": \"requests\"",
        );
        let rules = EventRules::from_config(&Config::from_json(&text, "t").unwrap());
        let props = |v: serde_json::Value| v.as_object().cloned().unwrap();
        assert!(
            rules
                .validate("api_call_made", &props(json!({"requests": 3})))
                .is_ok()
        );
        let err = rules
            .validate("api_call_made", &props(json!({"requests": -3})))
            .unwrap_err();
        assert_eq!(err.field, "properties.requests");
        assert!(
            rules
                .validate("signup_completed", &props(json!({})))
                .is_ok()
        );
    }
}
