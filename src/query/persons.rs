//! People and groups as SQL sees them: the views `persons` and `groups`, and the aggregates
//! `person_properties(type, properties, timestamp)` and `group_properties(…)` they are built
//! with.
//!
//! A person's properties come from the events themselves: Segment `identify` traits, PostHog
//! `$set` (latest wins), `$set_once` (first wins) and `$unset`, on any event; a group's from
//! Segment `group` traits and PostHog `$groupidentify`'s `$group_set`. They are applied in
//! **event-time order**, whatever order the events arrived in: a late event never overwrites
//! what a newer one set, a `$set_once` keeps the earliest value, an `$unset` stays unset
//! against an older `$set` that arrives after it (PostHog #37000 is the bug this avoids).
//! Being derived from `events_resolved` at query time, the views follow identity merges,
//! replays and anything the archive holds, with no state of their own to keep in step.
//!
//! As a window function the aggregate gives a person's properties as of each event:
//! `person_properties("type", properties, "timestamp") OVER (PARTITION BY person_id ORDER BY
//! "timestamp")`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type, TimeUnit};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The person aggregate's name in SQL.
pub(crate) const NAME: &str = "person_properties";
/// The group aggregate's name in SQL.
pub(crate) const GROUP_NAME: &str = "group_properties";

/// `persons`: one row per person (identity merges applied) with their properties now, their
/// first and last event, their event count and the ids their events carried.
pub(crate) const PERSONS_VIEW: &str = "CREATE VIEW persons AS \
    SELECT person_id, \
           person_properties(\"type\", properties, \"timestamp\") AS properties, \
           min(\"timestamp\") AS first_seen, \
           max(\"timestamp\") AS last_seen, \
           count(*) AS events, \
           array_agg(DISTINCT coalesce(user_id, anonymous_id)) AS ids \
    FROM events_resolved \
    WHERE person_id IS NOT NULL \
    GROUP BY person_id";

/// `groups`: one row per group with its properties: PostHog `$groupidentify` (its
/// `$group_type` and `$group_key`) and Segment `group` calls (type `group`, key the group id,
/// which is the call's customer).
pub(crate) const GROUPS_VIEW: &str = "CREATE VIEW groups AS \
    SELECT coalesce(properties->>'$group_type', 'group') AS group_type, \
           coalesce(properties->>'$group_key', customer_id) AS group_key, \
           group_properties(\"type\", properties, \"timestamp\") AS properties, \
           min(\"timestamp\") AS first_seen, \
           max(\"timestamp\") AS last_seen \
    FROM events \
    WHERE \"type\" = 'group' \
    GROUP BY 1, 2";

/// Most properties one person or group keeps: past it a new key is not added (the keys it
/// holds keep changing). Ingest bounds each event; this bounds what they add up to.
pub(crate) const MAX_KEYS: usize = 1_000;

/// `$set_once` values kept per key after its last `$set` or `$unset`: the earliest few.
const ONCE_KEPT: usize = 4;

/// One property's history, as much of it as decides its value in event-time order: the latest
/// `$set` or `$unset`, and the `$set_once` values later in time than it (the earliest fills
/// the key when it is unset or was never set).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Entry {
    /// The latest `$set` (a value) or `$unset` (none) by event time.
    last: Option<(i64, Option<Value>)>,
    /// `$set_once` values after `last`, earliest first, at most [`ONCE_KEPT`].
    once: Vec<(i64, Value)>,
}

impl Entry {
    fn value(&self) -> Option<&Value> {
        match &self.last {
            Some((_, Some(value))) => Some(value),
            _ => self.once.first().map(|(_, value)| value),
        }
    }

    /// A `$set` (`Some`) or `$unset` (`None`) at `at`.
    fn change(&mut self, at: i64, value: Option<Value>) {
        if self.last.as_ref().is_none_or(|(last, _)| *last <= at) {
            self.last = Some((at, value));
            self.once.retain(|(once, _)| *once > at);
        }
    }

    fn set_once(&mut self, at: i64, value: Value) {
        if self.last.as_ref().is_some_and(|(last, _)| *last >= at) {
            return;
        }
        let place = self.once.partition_point(|(once, _)| *once <= at);
        if place < ONCE_KEPT {
            self.once.insert(place, (at, value));
            self.once.truncate(ONCE_KEPT);
        }
    }
}

/// Properties applied in event-time order: the same events in any order give the same answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    entries: BTreeMap<String, Entry>,
}

impl Properties {
    /// `$set` at `at`: a key takes the value unless an event later in time set or unset it.
    pub fn set(&mut self, values: &Map<String, Value>, at: i64) {
        for (key, value) in values {
            if let Some(entry) = self.entry(key) {
                entry.change(at, Some(value.clone()));
            }
        }
    }

    /// `$set_once` at `at`: a key takes the value if, at that time, it had none.
    pub fn set_once(&mut self, values: &Map<String, Value>, at: i64) {
        for (key, value) in values {
            if let Some(entry) = self.entry(key) {
                entry.set_once(at, value.clone());
            }
        }
    }

    /// `$unset` at `at`: the keys are gone unless an event later in time set them; the
    /// removal is remembered, so an older `$set` arriving after it changes nothing.
    pub fn unset<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>, at: i64) {
        for key in keys {
            if let Some(entry) = self.entry(key) {
                entry.change(at, None);
            }
        }
    }

    /// Applies `other` (another part of the same events) as if its events were applied here.
    pub fn merge(&mut self, other: Properties) {
        for (key, theirs) in other.entries {
            let Some(entry) = self.entry(&key) else {
                continue;
            };
            if let Some((at, value)) = theirs.last {
                entry.change(at, value);
            }
            for (at, value) in theirs.once {
                entry.set_once(at, value);
            }
        }
    }

    /// The key's entry, made if there is room ([`MAX_KEYS`]).
    fn entry(&mut self, key: &str) -> Option<&mut Entry> {
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_KEYS {
            return None;
        }
        Some(self.entries.entry(key.to_string()).or_default())
    }

    /// The properties now, as a JSON object.
    pub fn current(&self) -> Map<String, Value> {
        self.entries
            .iter()
            .filter_map(|(key, entry)| Some((key.clone(), entry.value()?.clone())))
            .collect()
    }

    /// Applies one event to a person's properties: its `type` and its properties' JSON text,
    /// at its time. Group calls describe the group, not the person: they are left out.
    pub fn apply_event(&mut self, kind: &str, properties: &str, at: i64) {
        if kind != "group" {
            self.apply(kind, properties, at);
        }
    }

    /// Applies one event to a group's properties: only group calls describe a group.
    pub fn apply_group_event(&mut self, kind: &str, properties: &str, at: i64) {
        if kind == "group" {
            self.apply(kind, properties, at);
        }
    }

    fn apply(&mut self, kind: &str, properties: &str, at: i64) {
        let traits_call = kind == "identify" || kind == "group";
        // Most events carry no person properties: a substring search spares parsing them.
        if !traits_call && !properties.contains("\"$set") && !properties.contains("\"$unset") {
            return;
        }
        let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(properties) else {
            return;
        };
        let set = fields.remove("$set");
        let group_set = fields.remove("$group_set");
        let set_once = fields.remove("$set_once");
        let unset = fields.remove("$unset");
        let posthog = set.is_some() || group_set.is_some() || set_once.is_some();
        if traits_call && !posthog {
            // Segment: the call's traits.
            let traits: Map<String, Value> = fields
                .into_iter()
                .filter(|(key, _)| !key.starts_with('$'))
                .collect();
            self.set(&traits, at);
        }
        for values in [set, group_set].into_iter().flatten() {
            if let Value::Object(values) = values {
                self.set(&values, at);
            }
        }
        if let Some(Value::Object(values)) = set_once {
            self.set_once(&values, at);
        }
        if let Some(Value::Array(keys)) = unset {
            self.unset(keys.iter().filter_map(Value::as_str), at);
        }
    }

    fn size(&self) -> usize {
        self.entries
            .iter()
            .map(|(key, entry)| {
                let last = entry.last.as_ref().and_then(|(_, v)| v.as_ref());
                let once = entry.once.iter().map(|(_, v)| approximate_size(v));
                key.len() + 64 + last.map_or(0, approximate_size) + once.sum::<usize>()
            })
            .sum()
    }
}

/// Bytes a JSON value takes in memory, roughly (for the memory pool's accounting).
fn approximate_size(value: &Value) -> usize {
    match value {
        Value::String(text) => 32 + text.len(),
        Value::Array(items) => 32 + items.iter().map(approximate_size).sum::<usize>(),
        Value::Object(map) => {
            32 + map
                .iter()
                .map(|(k, v)| k.len() + approximate_size(v))
                .sum::<usize>()
        }
        _ => 16,
    }
}

/// Registers `person_properties` and `group_properties` in `ctx` (the views need them).
pub(crate) fn register(ctx: &SessionContext) {
    for of_groups in [false, true] {
        ctx.register_udaf(AggregateUDF::new_from_impl(PersonProperties {
            signature: Signature::any(3, Volatility::Immutable),
            of_groups,
        }));
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PersonProperties {
    signature: Signature,
    /// `group_properties`: group calls only.
    of_groups: bool,
}

impl AggregateUDFImpl for PersonProperties {
    fn name(&self) -> &str {
        if self.of_groups { GROUP_NAME } else { NAME }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(PropertiesAccumulator {
            properties: Properties::default(),
            of_groups: self.of_groups,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[entries]", args.name),
            DataType::Utf8,
            true,
        ))])
    }
}

/// The aggregate's state: the properties so far (partial states merge by the same rules).
#[derive(Debug)]
struct PropertiesAccumulator {
    properties: Properties,
    of_groups: bool,
}

impl Accumulator for PropertiesAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [kinds, properties, times] = values else {
            return datafusion::common::exec_err!("{NAME} takes (type, properties, timestamp)");
        };
        let kinds = arrow::compute::cast(kinds, &DataType::Utf8)?;
        let kinds = kinds.as_string::<i32>();
        let properties = arrow::compute::cast(properties, &DataType::Utf8)?;
        let properties = properties.as_string::<i32>();
        let times = arrow::compute::cast(times, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
        let times = arrow::compute::cast(&times, &DataType::Int64)?;
        let times = times.as_primitive::<Int64Type>();
        for row in 0..properties.len() {
            if properties.is_null(row) || times.is_null(row) {
                continue;
            }
            let kind = if kinds.is_null(row) {
                ""
            } else {
                kinds.value(row)
            };
            let (text, at) = (properties.value(row), times.value(row));
            if self.of_groups {
                self.properties.apply_group_event(kind, text, at);
            } else {
                self.properties.apply_event(kind, text, at);
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let text = Value::Object(self.properties.current()).to_string();
        Ok(ScalarValue::Utf8(Some(text)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.properties.size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let text = serde_json::to_string(&self.properties)
            .map_err(|e| datafusion::error::DataFusionError::Execution(e.to_string()))?;
        Ok(vec![ScalarValue::Utf8(Some(text))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [entries] = states else {
            return datafusion::common::exec_err!("{NAME}: one state column");
        };
        let entries = entries.as_string::<i32>();
        for text in entries.iter().flatten() {
            let other: Properties = serde_json::from_str(text)
                .map_err(|e| datafusion::error::DataFusionError::Execution(e.to_string()))?;
            self.properties.merge(other);
        }
        Ok(())
    }
}

/// The person `id` belongs to (any of their ids), as the `persons` view has them, or none.
pub async fn person(
    engine: &super::QueryEngine,
    id: &str,
) -> Result<Option<Value>, super::QueryError> {
    let id = super::string_literal(id);
    let sql = format!(
        "SELECT person_id, properties, first_seen, last_seen, events, ids FROM persons \
         WHERE person_id = coalesce((SELECT max(person_id) FROM identities WHERE id = {id}), {id})"
    );
    first_row(engine, &sql).await
}

/// The group of `group_type` and `key`, as the `groups` view has it, or none.
pub async fn group(
    engine: &super::QueryEngine,
    group_type: &str,
    key: &str,
) -> Result<Option<Value>, super::QueryError> {
    let sql = format!(
        "SELECT group_type, group_key, properties, first_seen, last_seen FROM groups \
         WHERE group_type = {} AND group_key = {}",
        super::string_literal(group_type),
        super::string_literal(key)
    );
    first_row(engine, &sql).await
}

/// The first row of `sql` as a JSON object, its `properties` parsed from their JSON text.
async fn first_row(
    engine: &super::QueryEngine,
    sql: &str,
) -> Result<Option<Value>, super::QueryError> {
    let result = engine.collect_internal(sql).await?;
    let rows = super::output::rows_json(&result)
        .map_err(|e| super::QueryError::Internal(format!("reading a profile: {e}")))?;
    let Some(mut row) = rows.as_array().and_then(|rows| rows.first()).cloned() else {
        return Ok(None);
    };
    if let Some(text) = row["properties"].as_str() {
        row["properties"] = serde_json::from_str(text).unwrap_or(Value::Null);
    }
    Ok(Some(row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    /// The same events in any arrival order give the same properties: event time decides.
    #[test]
    fn events_apply_in_event_time_order_whatever_order_they_arrive_in() {
        let events = [
            ("track", r#"{"$set": {"plan": "free", "city": "Oslo"}}"#, 10),
            ("track", r#"{"$set": {"plan": "pro"}}"#, 20),
            ("track", r#"{"$set_once": {"first_plan": "trial"}}"#, 15),
            ("track", r#"{"$set_once": {"first_plan": "free"}}"#, 12),
            ("track", r#"{"$unset": ["city"]}"#, 30),
            (
                "identify",
                r#"{"role": "admin", "$anon_distinct_id": "a"}"#,
                5,
            ),
        ];
        let want = object(json!({"plan": "pro", "first_plan": "free", "role": "admin"}));
        let orders: [[usize; 6]; 3] = [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 4, 0, 3, 5, 2]];
        for order in orders {
            let mut properties = Properties::default();
            for i in order {
                let (kind, text, at) = events[i];
                properties.apply_event(kind, text, at);
            }
            assert_eq!(properties.current(), want, "order {order:?}");
        }
        // Split in two parts and merged (partial aggregation), in either direction.
        let (mut left, mut right) = (Properties::default(), Properties::default());
        for (i, (kind, text, at)) in events.iter().enumerate() {
            let part = if i % 2 == 0 { &mut left } else { &mut right };
            part.apply_event(kind, text, *at);
        }
        let mut one = left.clone();
        one.merge(right.clone());
        right.merge(left);
        assert_eq!(one.current(), want);
        assert_eq!(right.current(), want);
    }

    /// An older `$set` that arrives after a newer `$unset` does not bring the key back, and a
    /// `$set` at any time beats `$set_once`.
    #[test]
    fn late_sets_lose_to_newer_changes() {
        let mut properties = Properties::default();
        properties.apply_event("track", r#"{"$unset": ["email"]}"#, 50);
        properties.apply_event("track", r#"{"$set": {"email": "old@example.com"}}"#, 40);
        properties.apply_event("track", r#"{"$set_once": {"plan": "free"}}"#, 1);
        properties.apply_event("track", r#"{"$set": {"plan": "pro"}}"#, 100);
        properties.apply_event("track", r#"{"$set_once": {"plan": "trial"}}"#, 0);
        assert_eq!(properties.current(), object(json!({"plan": "pro"})));
    }

    /// A key unset and then `$set_once` again (in event time) takes the `$set_once` value,
    /// in whatever order the three arrive.
    #[test]
    fn a_set_once_after_an_unset_fills_the_key_again() {
        let events = [
            ("track", r#"{"$set": {"plan": "v1"}}"#, 10),
            ("track", r#"{"$unset": ["plan"]}"#, 20),
            ("track", r#"{"$set_once": {"plan": "v2"}}"#, 30),
        ];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut properties = Properties::default();
            for i in order {
                let (kind, text, at) = events[i];
                properties.apply_event(kind, text, at);
            }
            assert_eq!(
                properties.current(),
                object(json!({"plan": "v2"})),
                "{order:?}"
            );
        }
    }

    /// Past the bound a new key is not added; the keys held keep changing.
    #[test]
    fn a_person_keeps_at_most_the_bound_of_keys() {
        let mut properties = Properties::default();
        let many: Map<String, Value> = (0..MAX_KEYS + 10)
            .map(|i| (format!("k{i:05}"), json!(i)))
            .collect();
        properties.set(&many, 1);
        assert_eq!(properties.current().len(), MAX_KEYS);
        properties.set(&object(json!({"k00000": "changed"})), 2);
        assert_eq!(properties.current()["k00000"], "changed");
    }
}
