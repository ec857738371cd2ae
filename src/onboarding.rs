//! The onboarding loop: per-person facts from the stream, triggers, onboarding steps and
//! feature flags, fed by the same data as the activation analysis.
//!
//! A stream follower keeps, per person (identity merges resolved in stream order), the count of
//! each event, the latest traits, the customer, the signup time and when the person reached the
//! current activation threshold. It fires the config's `events[].triggers` once per event (NATS
//! subject `northstar.triggers.<name>`, and a webhook if configured) and starts a person's
//! onboarding flow on the start trigger. The engine is isolated: if it fails, its routes answer
//! 503 and the rest of northstar keeps serving (the seed: onboarding must never take the product
//! down).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::activation::ActivationStore;
use crate::bus::BusError;
use crate::bus::follower::{Follow, Part, Saved};
use crate::config::{Condition, Config, FlagSpec, FlagVariant, OnboardingStep};
use crate::event::{EventType, EventView};
use crate::identity::IdentityGraph;
use crate::query::persons::Properties;

/// Subject prefix of fired triggers.
pub(crate) const TRIGGER_PREFIX: &str = "northstar.triggers";

/// What is known about a person.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Facts {
    /// Count of each event name.
    pub counts: BTreeMap<String, u64>,
    /// Traits (identify, PostHog `$set` / `$set_once`), as of the latest event time.
    pub traits: serde_json::Map<String, Value>,
    /// When each trait was set, and whether by `$set_once`: traits apply in event-time order
    /// whatever order their events arrive in. (A trait without one came from a snapshot
    /// older than this field: any later set replaces it.)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trait_times: BTreeMap<String, TraitTime>,
    /// The billed account of the latest event.
    pub customer_id: Option<String>,
    /// First signup (UTC µs).
    pub signup_at: Option<i64>,
    /// Times of the North Star events in the first days after signup (enough to judge any
    /// threshold within the analysis window).
    pub north_star_times: Vec<i64>,
    /// When the onboarding flow started (UTC µs).
    pub onboarding_started: Option<i64>,
    /// The groups the person's events name: group type → key (the latest).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, String>,
}

/// When a trait got its value.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct TraitTime {
    /// Event time (UTC µs).
    pub at: i64,
    /// Set by `$set_once` (which a `$set` at any time replaces, and only an earlier
    /// `$set_once` does).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub once: bool,
}

/// Most traits kept per person; later keys are not kept (the `persons` view's bound).
pub(crate) const MAX_TRAITS: usize = 1_000;

impl Facts {
    /// Offers `value` for trait `key` as of `time`: it is kept if it is what the person's
    /// events say in event-time order. A set replaces an earlier set and any set-once; a
    /// set-once fills an absent trait, or replaces a later set-once.
    fn offer_trait(&mut self, key: String, value: Value, time: TraitTime) {
        let wins = match (self.trait_times.get(&key), self.traits.contains_key(&key)) {
            (Some(held), _) if time.once => held.once && time.at < held.at,
            (Some(held), _) => held.once || time.at >= held.at,
            (None, true) => !time.once,
            (None, false) => self.traits.len() < MAX_TRAITS,
        };
        if wins {
            self.traits.insert(key.clone(), value);
            self.trait_times.insert(key, time);
        }
    }
}

/// Everything the engine keeps; a function of the stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    seq: u64,
    people: HashMap<String, Facts>,
    graph: IdentityGraph,
    /// Each group's properties, by `type` and key ([`group_id`]).
    #[serde(default)]
    groups: HashMap<String, Properties>,
}

/// The key of a group in [`State::groups`].
fn group_id(kind: &str, key: &str) -> String {
    format!("{kind}\u{1f}{key}")
}

/// Most group types one person belongs to (one key each).
const MAX_GROUP_TYPES: usize = 16;

/// A fired trigger, to deliver.
#[derive(Debug, Clone)]
struct Fired {
    name: String,
    body: Value,
    id: String,
}

/// The engine: shared state for the API, and the follower that feeds it.
pub struct Onboarding {
    state: RwLock<State>,
    steps: Vec<OnboardingStep>,
    flags: Vec<FlagSpec>,
    start_trigger: String,
    north_star: String,
    signup: String,
    /// Whether North Star events before signup count (`activation.windowStart`).
    window_start: crate::config::WindowStart,
    triggers: HashMap<String, Vec<String>>,
    max_days: u32,
    activation: Arc<ActivationStore>,
    plans: Box<dyn Fn(&str) -> String + Send + Sync>,
    failed: AtomicBool,
    applied: AtomicU64,
    /// Most people followed (`onboarding.maxPeople`).
    max_people: usize,
    /// Events of people not followed because the bound was reached.
    unfollowed: AtomicU64,
    /// Most groups kept (`onboarding.maxGroups`).
    max_groups: usize,
}

/// Why an onboarding answer is not available.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// A panic left the engine's state possibly half-updated (until a restart).
    #[error("the onboarding engine is unavailable; everything else keeps serving")]
    Failed,
    /// The person is not followed: the engine holds its bound of people.
    #[error(
        "the onboarding engine follows {0} people, its bound (onboarding.maxPeople), and not this one; \
         raise the bound and run `northstar replay` to follow everyone"
    )]
    Full(usize),
}

impl Unavailable {
    /// The error code of the answer.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Failed => "onboarding_unavailable",
            Self::Full(_) => "onboarding_full",
        }
    }
}

impl Onboarding {
    /// An engine for `config`; `plans` gives a customer's plan.
    pub fn new(
        config: &Config,
        activation: Arc<ActivationStore>,
        plans: Box<dyn Fn(&str) -> String + Send + Sync>,
    ) -> Self {
        let question = crate::activation::Question::from_config(config);
        Self {
            state: RwLock::new(State::default()),
            steps: config.onboarding.steps.clone(),
            flags: config.flags.clone(),
            start_trigger: config.onboarding.start_trigger.clone(),
            north_star: question.north_star_event,
            signup: question.signup_event,
            window_start: question.window_start,
            triggers: config
                .events
                .iter()
                .filter(|e| !e.triggers.is_empty())
                .map(|e| (e.name.clone(), e.triggers.clone()))
                .collect(),
            max_days: config.activation.max_days.max(60),
            activation,
            plans,
            failed: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            max_people: usize::try_from(config.onboarding.max_people).unwrap_or(usize::MAX),
            unfollowed: AtomicU64::new(0),
            max_groups: usize::try_from(config.onboarding.max_groups).unwrap_or(usize::MAX),
        }
    }

    /// People held and ids linked to them (for metrics).
    pub fn sizes(&self) -> (usize, usize) {
        let state = self.read_state();
        (state.people.len(), state.graph.len())
    }

    /// Events of people the engine does not follow, its bound reached (for metrics).
    pub fn unfollowed(&self) -> u64 {
        self.unfollowed.load(Ordering::Relaxed)
    }

    /// The state, to change. A panic while it was held (a bug, recorded by the followers'
    /// supervisor) may have left one event half-applied: the engine is marked failed, so its
    /// answers are 503 until a restart, but it goes on applying and saving what follows, so
    /// its saved position never holds stream retention or ingest admission back.
    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|poisoned| {
            self.failed.store(true, Ordering::SeqCst);
            poisoned.into_inner()
        })
    }

    /// The state, to read (see [`Onboarding::write_state`] for a poisoned lock).
    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poisoned| {
            self.failed.store(true, Ordering::SeqCst);
            poisoned.into_inner()
        })
    }

    /// The person an id belongs to.
    fn person(&self, id: &str) -> Result<(String, Facts), Unavailable> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Unavailable::Failed);
        }
        let state = self.read_state();
        if self.failed.load(Ordering::SeqCst) {
            return Err(Unavailable::Failed);
        }
        let person = state.graph.person_of(id).to_string();
        match state.people.get(&person) {
            Some(facts) => Ok((person, facts.clone())),
            None if state.people.len() >= self.max_people => {
                Err(Unavailable::Full(self.max_people))
            }
            None => Ok((person, Facts::default())),
        }
    }

    /// Whether the person reached the current activation threshold (or, without one yet, the
    /// config's `northStarMetric`).
    fn activated(&self, facts: &Facts, fallback: Option<(u32, u32)>) -> bool {
        let Some((times, days)) = self.activation.current_threshold().or(fallback) else {
            return false;
        };
        let Some(signup) = facts.signup_at else {
            return false;
        };
        let end = signup + i64::from(days) * 86_400_000_000;
        // The analysis's window: from the first event, or from signup.
        let start = match self.window_start {
            crate::config::WindowStart::FirstSeen => i64::MIN,
            crate::config::WindowStart::Signup => signup,
        };
        facts
            .north_star_times
            .iter()
            .filter(|t| **t >= start && **t < end)
            .count() as u64
            >= u64::from(times)
    }

    fn holds(
        &self,
        condition: &Condition,
        facts: &Facts,
        activated: bool,
        groups: &serde_json::Map<String, Value>,
    ) -> bool {
        let group_matches = condition
            .group_property_equals
            .iter()
            .all(|(kind, wanted)| {
                wanted
                    .iter()
                    .all(|(key, value)| groups.get(kind).and_then(|g| g.get(key)) == Some(value))
            });
        if !group_matches {
            return false;
        }
        if let Some(plans) = &condition.plan {
            let plan = facts
                .customer_id
                .as_deref()
                .map(|c| (self.plans)(c))
                .unwrap_or_default();
            if !plans.contains(&plan) {
                return false;
            }
        }
        if condition.activated.is_some_and(|want| want != activated) {
            return false;
        }
        let count = |event: &str| facts.counts.get(event).copied().unwrap_or(0);
        condition
            .event_count_at_least
            .iter()
            .all(|(e, n)| count(e) >= *n)
            && condition
                .event_count_below
                .iter()
                .all(|(e, n)| count(e) < *n)
            && condition
                .trait_equals
                .iter()
                .all(|(k, v)| facts.traits.get(k) == Some(v))
    }

    /// `GET /v1/users/{id}/onboarding`: every step's state and the next recommended one.
    pub fn onboarding(&self, id: &str, fallback: Option<(u32, u32)>) -> Result<Value, Unavailable> {
        let (person, facts) = self.person(id)?;
        let activated = self.activated(&facts, fallback);
        let started = facts.onboarding_started.is_some();
        let mut next = None;
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|step| {
                let completed = facts.counts.get(&step.complete_on).copied().unwrap_or(0) > 0;
                let applies = self.holds(&step.when, &facts, activated, &Default::default());
                let state = if completed {
                    "completed"
                } else if !applies {
                    "not_applicable"
                } else if started && next.is_none() {
                    next = Some(step.id.clone());
                    "recommended"
                } else {
                    "pending"
                };
                json!({"id": step.id, "title": step.title, "state": state, "complete_on": step.complete_on})
            })
            .collect();
        Ok(json!({
            "user_id": id, "person_id": person, "started": started,
            "started_at": facts.onboarding_started.map(crate::clock::format_micros),
            "activated": activated, "next_step": next, "steps": steps,
            "as_of": {"seq": self.applied.load(Ordering::SeqCst)},
        }))
    }

    /// `GET /v1/users/{id}/flags`: every flag, on or off, by deterministic bucketing.
    pub fn flags(&self, id: &str, fallback: Option<(u32, u32)>) -> Result<Value, Unavailable> {
        let (person, answers) = self.evaluate_flags(id, fallback, &FlagQuery::default())?;
        let flags: serde_json::Map<String, Value> = answers
            .into_iter()
            .map(|answer| (answer.key.to_string(), answer.value()))
            .collect();
        Ok(json!({"user_id": id, "person_id": person, "flags": flags}))
    }

    /// The flags of the person `id` belongs to, in config order, each with why it is on or
    /// off, its variant and payload; as `query` narrows and overrides. Also the person's id.
    pub fn evaluate_flags(
        &self,
        id: &str,
        fallback: Option<(u32, u32)>,
        query: &FlagQuery,
    ) -> Result<(String, Vec<FlagAnswer<'_>>), Unavailable> {
        let (person, mut facts) = self.person(id)?;
        // What the caller knows of the person now wins over what the stream said so far.
        facts.traits.extend(query.person_properties.clone());
        let mut groups = self.groups_of(&facts);
        for (kind, properties) in &query.group_properties {
            match (groups.get_mut(kind), properties) {
                (Some(Value::Object(held)), Value::Object(sent)) => {
                    held.extend(sent.clone());
                }
                _ => {
                    groups.insert(kind.clone(), properties.clone());
                }
            }
        }
        let activated = self.activated(&facts, fallback);
        let answers = self
            .flags
            .iter()
            .enumerate()
            .filter(|(_, flag)| {
                query
                    .keys
                    .as_ref()
                    .is_none_or(|keys| keys.contains(&flag.key))
            })
            .map(|(index, flag)| {
                let reason = if !self.holds(&flag.when, &facts, activated, &groups) {
                    FlagReason::NotTargeted
                } else if bucket(&flag.key, &person) >= flag.rollout {
                    FlagReason::OutOfRollout
                } else {
                    FlagReason::Targeted
                };
                let variant = (reason == FlagReason::Targeted)
                    .then(|| variant_of(flag, &person))
                    .flatten();
                let payload = match (reason, variant) {
                    (FlagReason::Targeted, Some(variant)) => variant.payload.as_ref(),
                    (FlagReason::Targeted, None) => flag.payload.as_ref(),
                    _ => None,
                };
                FlagAnswer {
                    key: &flag.key,
                    index,
                    reason,
                    variant: variant.map(|v| v.key.as_str()),
                    payload,
                }
            })
            .collect();
        Ok((person, answers))
    }

    /// The properties northstar holds of the person's groups, by group type: the groups their
    /// events named, and type `group` for their customer unless an event named another.
    fn groups_of(&self, facts: &Facts) -> serde_json::Map<String, Value> {
        let state = self.read_state();
        let mut named: Vec<(&str, &str)> = facts
            .groups
            .iter()
            .map(|(kind, key)| (kind.as_str(), key.as_str()))
            .collect();
        if let Some(customer) = facts.customer_id.as_deref()
            && !facts.groups.contains_key("group")
        {
            named.push(("group", customer));
        }
        named
            .into_iter()
            .filter_map(|(kind, key)| {
                let held = state.groups.get(&group_id(kind, key))?;
                Some((kind.to_string(), Value::Object(held.current())))
            })
            .collect()
    }

    /// Applies a group call (Segment `group`, PostHog `$groupidentify`) to the group's
    /// properties, in event-time order.
    fn apply_group(&self, groups: &mut HashMap<String, Properties>, event: &EventView<'_>) {
        let text = event.properties.get();
        let named = group_named(text);
        let (kind, key) = match (&named, event.customer_id.as_deref()) {
            (Some((kind, key)), _) => (kind.as_str(), key.as_str()),
            (None, Some(customer)) => ("group", customer),
            (None, None) => return,
        };
        let id = group_id(kind, key);
        if !groups.contains_key(&id) && groups.len() >= self.max_groups {
            return;
        }
        groups
            .entry(id)
            .or_default()
            .apply_group_event("group", text, event.timestamp);
    }

    /// Forgets a person erased: their facts and every id of theirs (`ids`).
    fn forget(&self, ids: &[String]) {
        let mut state = self.write_state();
        for id in ids {
            let person = state.graph.person_of(id).to_string();
            state.people.remove(&person);
            state.people.remove(id);
        }
        state.graph.forget(ids);
    }

    /// Applies one event; returns how many triggers it fires (the follower sends them on).
    pub fn apply_event(&self, seq: u64, event: &EventView<'_>) -> usize {
        self.apply(seq, event).len()
    }

    /// Applies one event; returns the triggers it fires.
    fn apply(&self, seq: u64, event: &EventView<'_>) -> Vec<Fired> {
        let mut fired = Vec::new();
        let mut state = self.write_state();
        state.seq = seq;
        if let Some(link) = crate::identity::requested_link(event) {
            let before = state.graph.person_of(link.id()).to_string();
            if link.apply(&mut state.graph, seq, event.timestamp)
                == crate::identity::Outcome::Linked
            {
                // The joining person's facts join the user's.
                let target = state.graph.person_of(link.user()).to_string();
                if let Some(old) = state.people.remove(&before) {
                    merge(state.people.entry(target).or_default(), old);
                }
            }
        }
        if event.kind == EventType::Group {
            let groups = &mut state.groups;
            self.apply_group(groups, event);
        }
        let Some(id) = event.user_id.as_deref().or(event.anonymous_id.as_deref()) else {
            return fired;
        };
        if let Some(user) = event.identified_user() {
            state.graph.observe_user(user);
        }
        // Every event comes here: keys and ids are copied only when they are new.
        let state = &mut *state;
        let person = state.graph.person_of(id);
        let name = event.event.as_deref().unwrap_or(event.kind.as_str());
        if !state.people.contains_key(person) {
            if state.people.len() >= self.max_people {
                // Past the bound a new person is not followed; their triggers still fire.
                if self.unfollowed.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        max_people = self.max_people,
                        "onboarding follows no more people (onboarding.maxPeople reached)"
                    );
                }
                let mut unfollowed = Facts::default();
                self.fire(&mut fired, &mut unfollowed, event, name, person, seq);
                return fired;
            }
            state.people.insert(person.to_string(), Facts::default());
        }
        let Some(facts) = state.people.get_mut(person) else {
            return fired;
        };
        match facts.counts.get_mut(name) {
            Some(count) => *count += 1,
            None => {
                facts.counts.insert(name.to_string(), 1);
            }
        }
        if let Some(customer) = event.customer_id.as_deref()
            && facts.customer_id.as_deref() != Some(customer)
        {
            facts.customer_id = Some(customer.to_string());
        }
        apply_traits(facts, event);
        note_groups(facts, event);
        if name == self.signup && facts.signup_at.is_none_or(|t| event.timestamp < t) {
            facts.signup_at = Some(event.timestamp);
        }
        if name == self.north_star && facts.north_star_times.len() < 10_000 {
            let window_end = facts
                .signup_at
                .map(|s| s + i64::from(self.max_days) * 86_400_000_000);
            if window_end.is_none_or(|end| event.timestamp < end) {
                facts.north_star_times.push(event.timestamp);
            }
        }
        self.fire(&mut fired, facts, event, name, person, seq);
        fired
    }

    /// Fires the triggers of the event `name` and records the position `seq`.
    fn fire(
        &self,
        fired: &mut Vec<Fired>,
        facts: &mut Facts,
        event: &EventView<'_>,
        name: &str,
        person: &str,
        seq: u64,
    ) {
        for trigger in self.triggers.get(name).into_iter().flatten() {
            if *trigger == self.start_trigger && facts.onboarding_started.is_none() {
                facts.onboarding_started = Some(event.timestamp);
            }
            fired.push(Fired {
                name: trigger.clone(),
                id: format!("{}:{trigger}", event.event_id),
                body: json!({
                    "trigger": trigger, "event_id": event.event_id, "event": name, "person_id": person,
                    "user_id": event.user_id, "anonymous_id": event.anonymous_id, "customer_id": event.customer_id,
                    "timestamp": crate::clock::format_micros(event.timestamp), "seq": seq,
                }),
            });
        }
        self.applied.store(seq, Ordering::SeqCst);
    }
}

fn merge(into: &mut Facts, from: Facts) {
    for (event, n) in from.counts {
        *into.counts.entry(event).or_default() += n;
    }
    let mut times = from.trait_times;
    for (key, value) in from.traits {
        // A trait of no known time (an old snapshot's) is offered as the oldest set.
        let time = times.remove(&key).unwrap_or(TraitTime {
            at: i64::MIN,
            once: false,
        });
        into.offer_trait(key, value, time);
    }
    into.north_star_times.extend(from.north_star_times);
    into.signup_at = match (into.signup_at, from.signup_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    into.onboarding_started = into.onboarding_started.or(from.onboarding_started);
    into.customer_id = into.customer_id.take().or(from.customer_id);
    for (kind, key) in from.groups {
        if into.groups.len() < MAX_GROUP_TYPES || into.groups.contains_key(&kind) {
            into.groups.entry(kind).or_insert(key);
        }
    }
}

/// Keeps the person's traits: an identify's traits, and PostHog's person properties, which any
/// event may carry as `$set` (latest wins) and `$set_once` (first wins). Only events whose
/// properties name `$set` are parsed for them, so the common event costs a substring search.
fn apply_traits(facts: &mut Facts, event: &EventView<'_>) {
    let text = event.properties.get();
    if event.kind != EventType::Identify && !text.contains("\"$set") {
        return;
    }
    let Ok(Value::Object(mut properties)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let set = properties.remove("$set");
    let set_once = properties.remove("$set_once");
    let at = event.timestamp;
    if event.kind == EventType::Identify {
        for (key, value) in properties {
            if !key.starts_with('$') {
                facts.offer_trait(key, value, TraitTime { at, once: false });
            }
        }
    }
    if let Some(Value::Object(set)) = set {
        for (key, value) in set {
            facts.offer_trait(key, value, TraitTime { at, once: false });
        }
    }
    if let Some(Value::Object(once)) = set_once {
        for (key, value) in once {
            facts.offer_trait(key, value, TraitTime { at, once: true });
        }
    }
}

/// The group a PostHog `$groupidentify` names (`$group_type`, `$group_key`).
fn group_named(text: &str) -> Option<(String, String)> {
    if !text.contains("\"$group_type\"") {
        return None;
    }
    let properties = serde_json::from_str::<Value>(text).ok()?;
    let kind = properties.get("$group_type")?.as_str()?;
    let key = properties.get("$group_key").and_then(|k| match k {
        Value::String(key) => Some(key.clone()),
        Value::Number(key) => Some(key.to_string()),
        _ => None,
    })?;
    Some((kind.to_string(), key))
}

/// Records the groups an event names its person a member of: PostHog's `$groups` (type →
/// key) on any event, and a Segment `group` call (type `group`, key the group id). A PostHog
/// `$groupidentify` describes a group and names no member.
fn note_groups(facts: &mut Facts, event: &EventView<'_>) {
    let text = event.properties.get();
    let mut join = |kind: &str, key: &str| {
        if facts.groups.get(kind).map(String::as_str) == Some(key) {
            return;
        }
        if facts.groups.contains_key(kind) || facts.groups.len() < MAX_GROUP_TYPES {
            facts.groups.insert(kind.to_string(), key.to_string());
        }
    };
    if event.kind == EventType::Group
        && !text.contains("\"$group_type\"")
        && let Some(customer) = event.customer_id.as_deref()
    {
        join("group", customer);
    }
    if !text.contains("\"$groups\"") {
        return;
    }
    let Ok(Value::Object(mut properties)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    if let Some(Value::Object(groups)) = properties.remove("$groups") {
        for (kind, key) in groups {
            match key {
                Value::String(key) => join(&kind, &key),
                Value::Number(key) => join(&kind, &key.to_string()),
                _ => {}
            }
        }
    }
}

/// What a caller asks of the flags beyond the person's id.
#[derive(Debug, Clone, Default)]
pub struct FlagQuery {
    /// Only these flags (all when absent).
    pub keys: Option<Vec<String>>,
    /// Person properties the caller knows now, over the traits the stream gave (PostHog's
    /// `person_properties`).
    pub person_properties: serde_json::Map<String, Value>,
    /// Properties of the caller's groups by group type (PostHog's `group_properties`), for
    /// `groupPropertyEquals`.
    pub group_properties: serde_json::Map<String, Value>,
}

/// The variant of a multivariate flag a person gets: the first whose cumulative share is past
/// the person's bucket for the flag's variants (a hash apart from the rollout's, so who gets
/// the flag and which variant they get are independent).
fn variant_of<'f>(flag: &'f crate::config::FlagSpec, person: &str) -> Option<&'f FlagVariant> {
    let at = bucket(&format!("{}#variant", flag.key), person);
    let mut below = 0.0;
    for variant in &flag.variants {
        below += variant.share;
        if at < below {
            return Some(variant);
        }
    }
    // Shares sum to 1 (the config says so); rounding may leave the last sliver.
    flag.variants.last()
}

/// One flag's answer for one person.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlagAnswer<'a> {
    /// The flag's key.
    pub key: &'a str,
    /// Its place in the config's `flags` (a stable id for SDKs that want one).
    pub index: usize,
    /// Why it is on or off.
    pub reason: FlagReason,
    /// The variant the person gets, when the flag is on and multivariate.
    pub variant: Option<&'a str>,
    /// The payload that goes with the flag's answer, when it is on.
    pub payload: Option<&'a Value>,
}

impl FlagAnswer<'_> {
    /// Whether the flag is on for the person.
    pub fn on(&self) -> bool {
        self.reason == FlagReason::Targeted
    }

    /// The flag's value: its variant when it has one, else whether it is on.
    pub fn value(&self) -> Value {
        match self.variant {
            Some(variant) => Value::String(variant.to_string()),
            None => Value::Bool(self.on()),
        }
    }
}

/// Why a flag is on or off for a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagReason {
    /// The person meets the flag's `when` and falls inside its rollout: on.
    Targeted,
    /// The person does not meet the flag's `when`: off.
    NotTargeted,
    /// The person meets `when` but falls outside the rollout share: off.
    OutOfRollout,
}

/// Deterministic bucket in [0, 1) of a person for a flag: the same person gets the same answer
/// on every node and every call, and different flags split people independently.
pub fn bucket(flag: &str, person: &str) -> f64 {
    let hash = flag
        .bytes()
        .chain([b':'])
        .chain(person.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    (hash % 10_000) as f64 / 10_000.0
}

struct OnboardingFollower {
    engine: Arc<Onboarding>,
    fired: mpsc::UnboundedSender<Fired>,
    dir: PathBuf,
    saved: Saved,
}

impl Follow for OnboardingFollower {
    fn name(&self) -> &'static str {
        "onboarding"
    }

    fn holds_people(&self) -> bool {
        true
    }

    fn person_ids(&self, id: &str) -> Vec<String> {
        self.engine.read_state().graph.ids_of_person(id)
    }

    fn erase(&mut self, ids: &[String]) {
        self.engine.forget(ids);
    }

    fn apply(&mut self, seq: u64, event: Option<&EventView<'_>>) {
        let Some(event) = event else {
            return;
        };
        // A panic here is caught by the followers' fanout, which records it with the
        // supervisor (`/healthz` names it) and goes on; the poisoned state marks the engine
        // failed (see `Onboarding::write_state`).
        for fired in self.engine.apply(seq, event) {
            let _ = self.fired.send(fired);
        }
    }

    fn snapshot(&mut self) {
        let state = self.engine.read_state().clone();
        let (dir, saved) = (self.dir.clone(), self.saved.clone());
        tokio::task::spawn_blocking(move || {
            if save(&dir, &state) {
                saved.fetch_max(state.seq, Ordering::SeqCst);
            }
        });
    }

    fn saved(&self) -> Saved {
        self.saved.clone()
    }

    fn final_snapshot(&mut self) -> JoinHandle<()> {
        let state = self.engine.read_state().clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            save(&dir, &state);
        })
    }
}

/// Writes the state; false when it could not be.
fn save(dir: &std::path::Path, state: &State) -> bool {
    let Ok(bytes) = serde_json::to_vec(state) else {
        return false;
    };
    match crate::files::write_atomic(&dir.join("state.json"), &bytes) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "onboarding snapshot failed; the next one retries");
            false
        }
    }
}

/// Starts the trigger delivery and returns the engine's part of the stream followers, and the
/// delivery's task: it ends once the part is dropped (with the followers, at stop) and what it
/// was handed is delivered.
pub(crate) async fn prepare(
    engine: Arc<Onboarding>,
    js: &jetstream::Context,
    client: async_nats::Client,
    stream: &str,
    data_dir: &std::path::Path,
    webhook: Option<String>,
    supervisor: &Arc<crate::supervise::Supervisor>,
) -> Result<(Part, tokio::task::JoinHandle<()>), BusError> {
    let dir = data_dir.join("onboarding");
    let saved: Option<State> = std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let last = crate::bus::streams::last_sequence(js, stream).await?;
    let state = saved.filter(|s| s.seq <= last).unwrap_or_default();
    let after = state.seq;
    engine.applied.store(after, Ordering::SeqCst);
    *engine.write_state() = state;
    let (tx, rx) = mpsc::unbounded_channel();
    let delivery = supervisor.spawn("onboarding-triggers", deliver(rx, client, webhook));
    let follower = OnboardingFollower {
        engine,
        fired: tx,
        dir,
        saved: Arc::new(std::sync::atomic::AtomicU64::new(after)),
    };
    Ok((Part::new(follower, after, Duration::from_secs(5)), delivery))
}

/// Publishes fired triggers (deduplicated downstream by `Nats-Msg-Id` = event id + trigger) and
/// POSTs them to the webhook with the same id as `Idempotency-Key`.
async fn deliver(
    mut fired: mpsc::UnboundedReceiver<Fired>,
    client: async_nats::Client,
    webhook: Option<String>,
) {
    let http = crate::client::HttpClient::new();
    while let Some(f) = fired.recv().await {
        let bytes = serde_json::to_vec(&f.body).unwrap_or_default();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", f.id.as_str());
        let subject = format!(
            "{TRIGGER_PREFIX}.{}",
            crate::bus::streams::subject_token(&f.name)
        );
        if let Err(error) = client
            .publish_with_headers(subject, headers, bytes.clone().into())
            .await
        {
            tracing::warn!(%error, trigger = %f.name, "trigger not published");
        }
        if let Some(url) = &webhook {
            let headers = [
                ("content-type", "application/json"),
                ("idempotency-key", f.id.as_str()),
            ];
            for attempt in 0..3u64 {
                match http
                    .send(http::Method::POST, url, &headers, bytes.clone())
                    .await
                {
                    Ok(r) if r.status < 300 || (400..500).contains(&r.status) => break,
                    _ => tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::follower::Fanout;
    use crate::event::EventRecord;

    /// PostHog #37000: a late event must not undo a later one's person properties.
    #[test]
    fn traits_apply_in_event_time_order_whatever_the_arrival_order() {
        let set = |at| TraitTime { at, once: false };
        let once = |at| TraitTime { at, once: true };
        let mut facts = Facts::default();
        facts.offer_trait("plan".into(), json!("pro"), set(10));
        facts.offer_trait("plan".into(), json!("free"), set(5));
        assert_eq!(
            facts.traits["plan"], "pro",
            "an earlier $set arriving late loses"
        );
        facts.offer_trait("plan".into(), json!("team"), set(10));
        assert_eq!(
            facts.traits["plan"], "team",
            "the same time: the later arrival wins"
        );
        facts.offer_trait("plan".into(), json!("first"), once(1));
        assert_eq!(
            facts.traits["plan"], "team",
            "a $set_once never replaces a $set"
        );

        facts.offer_trait("source".into(), json!("ads"), once(10));
        facts.offer_trait("source".into(), json!("blog"), once(5));
        assert_eq!(
            facts.traits["source"], "blog",
            "the earliest $set_once wins"
        );
        facts.offer_trait("source".into(), json!("direct"), set(1));
        assert_eq!(
            facts.traits["source"], "direct",
            "a $set replaces a $set_once"
        );

        // Merging two people keeps the same answer as one person's events would.
        let mut other = Facts::default();
        other.offer_trait("plan".into(), json!("enterprise"), set(20));
        other.offer_trait("source".into(), json!("older"), once(0));
        merge(&mut facts, other);
        assert_eq!(facts.traits["plan"], "enterprise");
        assert_eq!(facts.traits["source"], "direct");

        let mut full = Facts::default();
        for i in 0..MAX_TRAITS + 10 {
            full.offer_trait(format!("k{i}"), json!(i), set(1));
        }
        assert_eq!(full.traits.len(), MAX_TRAITS, "bounded");
    }

    /// A Segment `group` call describes the account and names its caller a member; any
    /// event's customer is the person's group of type `group` too.
    #[test]
    fn segment_group_traits_target_the_groups_members() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            flags: vec![
                serde_json::from_value(
                    json!({"key": "gold", "when": {"groupPropertyEquals": {"group": {"tier": "gold"}}}}),
                )
                .unwrap(),
            ],
            ..Config::default()
        };
        let engine = Onboarding::new(
            &config,
            ActivationStore::open(dir.path()),
            Box::new(|_| "free".to_string()),
        );
        let event = |kind: EventType, user: &str, customer: &str, traits: Value, at: i64| {
            EventRecord {
                event_id: format!("{user}-{at}"),
                kind,
                event: (kind == EventType::Track).then(|| "report_created".to_string()),
                user_id: Some(user.into()),
                anonymous_id: None,
                customer_id: Some(customer.into()),
                timestamp: at,
                received_at: at,
                properties: traits.as_object().cloned().unwrap_or_default(),
                context: serde_json::Map::new(),
                source: "web".into(),
                schema_version: None,
                sample_rate: None,
            }
            .to_bus_json()
        };
        let events = [
            event(EventType::Group, "s1", "acme", json!({"tier": "gold"}), 2),
            event(EventType::Group, "s1", "acme", json!({"tier": "silver"}), 1),
            event(EventType::Track, "s2", "acme", json!({}), 3),
            event(EventType::Track, "s3", "beta", json!({}), 3),
        ];
        for (seq, bytes) in events.iter().enumerate() {
            engine.apply_event(seq as u64 + 1, &EventView::decode(bytes).unwrap());
        }
        let gold = |id: &str| {
            let (_, answers) = engine
                .evaluate_flags(id, None, &FlagQuery::default())
                .unwrap();
            answers[0].reason == FlagReason::Targeted
        };
        assert!(gold("s1"), "the caller of the group call");
        assert!(gold("s2"), "a person whose customer it is");
        assert!(!gold("s3"), "another account");
    }

    fn track(user: &str) -> Vec<u8> {
        crate::event::track_message(user, &format!("{user}-1"))
    }

    /// A bug that panics while the state is held poisons its lock. The engine used to return
    /// early on every later event: its saved position froze, and ingest shed everything once
    /// the stream's lag behind it neared retention.
    #[tokio::test]
    async fn after_a_panic_the_engine_answers_503_but_its_position_keeps_moving() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Onboarding::new(
            &Config::default(),
            ActivationStore::open(dir.path()),
            Box::new(|_| "free".to_string()),
        ));
        let saved: Saved = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (fired, _deliveries) = mpsc::unbounded_channel();
        let follower = OnboardingFollower {
            engine: engine.clone(),
            fired,
            dir: dir.path().join("onboarding"),
            saved: saved.clone(),
        };
        let mut followers = Fanout::new(vec![Part::new(follower, 0, Duration::ZERO)]);
        let event = track("u1");
        followers.apply(1, Some(&EventView::decode(&event).unwrap()));
        assert!(engine.person("u1").is_ok());

        let poisoner = engine.clone();
        let bug = std::thread::spawn(move || {
            let _state = poisoner.state.write();
            panic!("a bug while applying");
        });
        assert!(bug.join().is_err());

        followers.apply(2, Some(&EventView::decode(&track("u2")).unwrap()));
        assert!(engine.person("u2").is_err(), "a failed engine answers 503");
        assert_eq!(engine.read_state().seq, 2, "later events are still applied");
        followers.snapshot();
        let written = async {
            while saved.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), written)
            .await
            .expect("the snapshot after the panic is saved");
    }

    #[test]
    fn buckets_are_deterministic_and_spread() {
        assert_eq!(bucket("f", "u1"), bucket("f", "u1"));
        let on = (0..10_000)
            .filter(|i| bucket("f", &format!("u{i}")) < 0.3)
            .count();
        assert!((2_700..3_300).contains(&on), "{on}");
        let other = (0..10_000)
            .filter(|i| bucket("g", &format!("u{i}")) < 0.3 && bucket("f", &format!("u{i}")) < 0.3)
            .count();
        assert!(
            (700..1_100).contains(&other),
            "flags split independently: {other}"
        );
    }

    /// A multivariate flag gives each person one variant, the same every time, in the
    /// configured shares, independently of who the flag is on for.
    #[test]
    fn variants_split_people_by_their_shares() {
        let flag: FlagSpec = serde_json::from_value(serde_json::json!({
            "key": "checkout", "rollout": 0.5,
            "variants": [{"key": "a", "share": 0.2}, {"key": "b", "share": 0.8}]
        }))
        .unwrap();
        let people: Vec<String> = (0..10_000).map(|i| format!("u{i}")).collect();
        let of = |person: &String| variant_of(&flag, person).map(|v| v.key.as_str());
        assert!(people.iter().all(|p| of(p) == of(p)));
        let a = people.iter().filter(|p| of(p) == Some("a")).count();
        assert!((1_800..2_200).contains(&a), "{a}");
        let on_and_a = people
            .iter()
            .filter(|p| bucket(&flag.key, p) < flag.rollout && of(p) == Some("a"))
            .count();
        assert!(
            (850..1_150).contains(&on_and_a),
            "independent of the rollout: {on_and_a}"
        );
    }
}
