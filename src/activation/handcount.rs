//! A plain-loop hand count of the 2×2 table of an "at least x times within y days" candidate,
//! over Segment-shaped messages, to test the SQL implementation against. Same definitions as
//! [`super::generate`] (days after signup, retention window, cohort).

use std::collections::HashMap;
use std::ops::RangeInclusive;

use serde_json::Value;

use super::generate::{
    DAY_MICROS, HistorySpec, RETENTION_END_DAY, RETENTION_START_DAY, data_end_micros,
    parse_timestamp,
};
use super::stats::Cell;

/// How to hand-count a candidate: event names, retention window and identity resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct CountOptions {
    /// Track event that marks signup (the earliest one per person counts).
    pub signup_event: String,
    /// The North Star track event.
    pub north_star_event: String,
    /// Retention window in days after signup, half-open `[start, end)`; default (28, 56).
    pub retention_days: (u32, u32),
    /// Track events that count as activity for retention; empty: any message counts.
    pub active_events: Vec<String>,
    /// Resolve `anonymousId`s to people through identify (both ids) and alias messages.
    pub resolve_identities: bool,
    /// End of the data (µs); `None` means the latest message timestamp.
    pub data_end_micros: Option<i64>,
}

impl Default for CountOptions {
    /// The DESIGN defaults: signup_completed, core_action_completed, days 28–56, resolution on.
    fn default() -> Self {
        Self {
            signup_event: "signup_completed".to_string(),
            north_star_event: "core_action_completed".to_string(),
            retention_days: (RETENTION_START_DAY as u32, RETENTION_END_DAY as u32),
            active_events: Vec::new(),
            resolve_identities: true,
            data_end_micros: None,
        }
    }
}

impl CountOptions {
    /// Options matching a generated history (its event names and its end of data).
    pub fn for_spec(spec: &HistorySpec) -> Self {
        Self {
            signup_event: spec.signup_event.clone(),
            north_star_event: spec.north_star_event.clone(),
            data_end_micros: Some(data_end_micros(spec)),
            ..Self::default()
        }
    }
}

/// The fields of a message the hand count needs.
struct Parsed<'a> {
    kind: &'a str,
    event: Option<&'a str>,
    user_id: Option<&'a str>,
    anonymous_id: Option<&'a str>,
    previous_id: Option<&'a str>,
    at: i64,
}

/// Non-empty string field of a message.
pub(super) fn str_field<'a>(message: &'a Value, key: &str) -> Option<&'a str> {
    message
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn parse_message(message: &Value) -> Option<Parsed<'_>> {
    Some(Parsed {
        kind: str_field(message, "type")?,
        event: str_field(message, "event"),
        user_id: str_field(message, "userId"),
        anonymous_id: str_field(message, "anonymousId"),
        previous_id: str_field(message, "previousId"),
        at: parse_timestamp(str_field(message, "timestamp")?)?,
    })
}

/// anonymousId/previousId → userId links from identify and alias messages (first link wins).
fn identity_links<'a>(messages: &[Parsed<'a>]) -> HashMap<&'a str, &'a str> {
    let mut links = HashMap::new();
    for message in messages {
        let other = match message.kind {
            "identify" => message.anonymous_id,
            "alias" => message.previous_id,
            _ => None,
        };
        if let (Some(other), Some(user)) = (other, message.user_id) {
            links.entry(other).or_insert(user);
        }
    }
    links
}

/// Per-person timestamps: signup, North Star events and activity that counts, sorted.
#[derive(Default)]
struct Timeline {
    signup: Option<i64>,
    north_star: Vec<i64>,
    activity: Vec<i64>,
}

/// Everything the hand count needs, built once per message list.
struct Histories {
    people: HashMap<String, Timeline>,
    end: i64,
}

impl Histories {
    fn build(messages: &[Value], options: &CountOptions) -> Self {
        let parsed: Vec<Parsed<'_>> = messages.iter().filter_map(parse_message).collect();
        let links = if options.resolve_identities {
            identity_links(&parsed)
        } else {
            HashMap::new()
        };
        let mut people: HashMap<String, Timeline> = HashMap::new();
        for message in &parsed {
            let person = message
                .user_id
                .or_else(|| message.anonymous_id.and_then(|a| links.get(a).copied()));
            let Some(person) = person else { continue };
            let timeline = people.entry(person.to_string()).or_default();
            let active = options.active_events.is_empty()
                || (message.kind == "track"
                    && message
                        .event
                        .is_some_and(|e| options.active_events.iter().any(|a| a == e)));
            if active {
                timeline.activity.push(message.at);
            }
            if message.kind == "track" && message.event == Some(options.north_star_event.as_str()) {
                timeline.north_star.push(message.at);
            }
            if message.kind == "track" && message.event == Some(options.signup_event.as_str()) {
                timeline.signup = Some(timeline.signup.map_or(message.at, |s| s.min(message.at)));
            }
        }
        for timeline in people.values_mut() {
            timeline.north_star.sort_unstable();
            timeline.activity.sort_unstable();
        }
        let latest = parsed.iter().map(|m| m.at).max().unwrap_or(0);
        Self {
            people,
            end: options.data_end_micros.unwrap_or(latest),
        }
    }

    fn cell(&self, times: u32, days: u32, options: &CountOptions) -> Cell {
        let (ret_start, ret_end) = (
            i64::from(options.retention_days.0),
            i64::from(options.retention_days.1),
        );
        let mut cell = Cell {
            times,
            days,
            a: 0,
            b: 0,
            c: 0,
            d: 0,
        };
        for timeline in self.people.values() {
            let Some(signup) = timeline.signup else {
                continue;
            };
            if signup > self.end - ret_end * DAY_MICROS {
                continue; // too young to be judged
            }
            let window = signup..signup + i64::from(days) * DAY_MICROS;
            let did = count_in(&timeline.north_star, &window) >= times as usize;
            let retention = signup + ret_start * DAY_MICROS..signup + ret_end * DAY_MICROS;
            let retained = count_in(&timeline.activity, &retention) > 0;
            match (did, retained) {
                (true, true) => cell.a += 1,
                (true, false) => cell.b += 1,
                (false, true) => cell.c += 1,
                (false, false) => cell.d += 1,
            }
        }
        cell
    }
}

/// Number of sorted timestamps inside a half-open range.
fn count_in(sorted: &[i64], range: &std::ops::Range<i64>) -> usize {
    let start = sorted.partition_point(|&t| t < range.start);
    let end = sorted.partition_point(|&t| t < range.end);
    end.saturating_sub(start)
}

/// Hand count of a, b, c, d for "at least `times` North Star events within `days` days".
///
/// Deliberately plain (per-person loops, no SQL) so that it can serve as the reference the
/// DataFusion implementation is tested against.
pub fn count_cells(messages: &[Value], times: u32, days: u32, options: &CountOptions) -> Cell {
    Histories::build(messages, options).cell(times, days, options)
}

/// Hand count of a whole grid, parsing the messages once; cells ordered by times, then days.
pub fn count_grid(
    messages: &[Value],
    times: RangeInclusive<u32>,
    days: RangeInclusive<u32>,
    options: &CountOptions,
) -> Vec<Cell> {
    let histories = Histories::build(messages, options);
    times
        .flat_map(|t| days.clone().map(move |d| (t, d)))
        .map(|(t, d)| histories.cell(t, d, options))
        .collect()
}
