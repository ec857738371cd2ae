//! The test oracle of the activation analysis: a plain-loop hand count of the 2×2 table of an "at least x times within y days" candidate,
//! over Segment-shaped messages, to test the SQL implementation against. Same definitions as
//! `northstar::activation::generate` (days after signup, retention window, cohort).

use std::collections::HashMap;
use std::ops::RangeInclusive;

use serde_json::Value;

use northstar::activation::generate::{
    DAY_MICROS, HistorySpec, RETENTION_END_DAY, RETENTION_START_DAY, data_end_micros,
    parse_timestamp,
};
use northstar::activation::stats::Cell;
use northstar::config::WindowStart;

/// How to hand-count a candidate: event names, retention window and identity resolution.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CountOptions {
    /// Track event that marks signup (the earliest one per person counts).
    pub(crate) signup_event: String,
    /// The North Star track event.
    pub(crate) north_star_event: String,
    /// Retention window in days after signup, half-open `[start, end)`; default (28, 56).
    pub(crate) retention_days: (u32, u32),
    /// Track events that count as activity for retention; empty: any message counts.
    pub(crate) active_events: Vec<String>,
    /// Resolve `anonymousId`s to people through identify (both ids) and alias messages.
    pub(crate) resolve_identities: bool,
    /// End of the data (µs); `None` means the latest message timestamp.
    pub(crate) data_end_micros: Option<i64>,
    /// Where a person's North Star window starts; it ends `days` after signup either way.
    pub(crate) window_start: WindowStart,
}

impl Default for CountOptions {
    /// The defaults: signup_completed, core_action_completed, days 28–56, resolution on, the
    /// window from first seen.
    fn default() -> Self {
        Self {
            signup_event: "signup_completed".to_string(),
            north_star_event: "core_action_completed".to_string(),
            retention_days: (RETENTION_START_DAY as u32, RETENTION_END_DAY as u32),
            active_events: Vec::new(),
            resolve_identities: true,
            data_end_micros: None,
            window_start: WindowStart::FirstSeen,
        }
    }
}

impl CountOptions {
    /// Options matching a generated history (its event names and its end of data).
    pub(crate) fn for_spec(spec: &HistorySpec) -> Self {
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
            let start = match options.window_start {
                WindowStart::FirstSeen => i64::MIN,
                WindowStart::Signup => signup,
            };
            let window = start..signup + i64::from(days) * DAY_MICROS;
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
pub(crate) fn count_cells(
    messages: &[Value],
    times: u32,
    days: u32,
    options: &CountOptions,
) -> Cell {
    Histories::build(messages, options).cell(times, days, options)
}

/// Hand count of a whole grid, parsing the messages once; cells ordered by times, then days.
pub(crate) fn count_grid(
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

/// The generator checked against the hand count: the history it plants is the one counted.
mod tests {
    use std::collections::HashSet;

    use northstar::activation::generate::{
        HistorySpec, data_end_micros, generate, parse_timestamp, planted_truth,
    };
    use northstar::activation::stats::{Candidate, Guards, evaluate, phi};
    use serde_json::Value;

    use super::{CountOptions, count_cells, count_grid, str_field};

    fn small_spec() -> HistorySpec {
        HistorySpec {
            users: 2_000,
            seed: 7,
            ..HistorySpec::default()
        }
    }

    fn phi_at(messages: &[Value], times: u32, days: u32, options: &CountOptions) -> f64 {
        phi(&count_cells(messages, times, days, options)).unwrap_or(f64::NAN)
    }

    #[test]
    fn messages_are_segment_shaped() {
        let spec = HistorySpec {
            users: 300,
            ..HistorySpec::default()
        };
        let messages = generate(&spec);
        let mut ids = HashSet::new();
        let mut previous = i64::MIN;
        for message in &messages {
            assert!(
                ids.insert(str_field(message, "messageId").map(str::to_string)),
                "duplicate id"
            );
            let kind = str_field(message, "type").unwrap_or_default();
            assert!(kind == "track" || kind == "identify");
            assert_eq!(kind == "track", message.get("event").is_some());
            let at = str_field(message, "timestamp")
                .and_then(parse_timestamp)
                .unwrap_or(i64::MIN);
            assert!(
                at >= previous && at < data_end_micros(&spec),
                "sorted and before the end of data"
            );
            previous = at;
            assert!(message.get("userId").is_some() || message.get("anonymousId").is_some());
            assert!(
                message
                    .pointer("/context/groupId")
                    .and_then(Value::as_str)
                    .is_some()
            );
        }
        let linked = messages
            .iter()
            .filter(|m| str_field(m, "type") == Some("identify") && m.get("anonymousId").is_some())
            .count();
        assert!(
            (50..=130).contains(&linked),
            "about 30% of 300 users are anonymous first: {linked}"
        );
        let customers: HashSet<_> = messages
            .iter()
            .filter_map(|m| m.pointer("/context/groupId"))
            .collect();
        assert!(
            customers.len() > 300 / 5 && customers.len() < 300,
            "a few users per customer"
        );
    }

    #[test]
    fn planted_split_is_about_half_and_retention_as_specified() {
        let spec = small_spec();
        let messages = generate(&spec);
        let (x0, y0) = planted_truth(&spec);
        let cell = count_cells(&messages, x0, y0, &CountOptions::for_spec(&spec));
        assert_eq!(
            cell.n(),
            spec.users as u64,
            "every user is old enough to be judged"
        );
        let c = Candidate::from_cell(&cell, &Guards::default());
        assert!(
            (0.45..=0.55).contains(&c.share_above),
            "share above {}",
            c.share_above
        );
        let above = c.retention_above.unwrap_or_default();
        let below = c.retention_below.unwrap_or_default();
        assert!((above - 0.8).abs() < 0.05, "retention above {above}");
        assert!((below - 0.15).abs() < 0.05, "retention below {below}");
        // With the latest message as the end of data the cohort only loses the youngest users.
        let by_latest = count_cells(&messages, x0, y0, &CountOptions::default());
        assert!(by_latest.n() <= cell.n() && by_latest.n() > cell.n() * 8 / 10);
    }

    #[test]
    fn planted_candidate_beats_neighbours() {
        let spec = small_spec();
        let messages = generate(&spec);
        let options = CountOptions::for_spec(&spec);
        let (x0, y0) = planted_truth(&spec);
        let best = phi_at(&messages, x0, y0, &options);
        assert!(best > 0.5, "planted phi {best}");
        for (times, days) in [
            (x0 - 1, y0),
            (x0 + 1, y0),
            (x0, y0 - 1),
            (x0, y0 + 1),
            (1, 1),
        ] {
            let other = phi_at(&messages, times, days, &options);
            assert!(
                best > other + 0.03,
                "({times}, {days}) phi {other} vs planted {best}"
            );
        }
        let grid = count_grid(&messages, 1..=10, 1..=15, &options);
        assert_eq!(grid.len(), 150);
        let evaluation = evaluate(&grid, &Guards::default());
        assert_eq!(evaluation.chosen.map(|c| (c.times, c.days)), Some((x0, y0)));
    }

    #[test]
    fn anonymous_events_count_only_with_identity_resolution() {
        let spec = small_spec();
        let messages = generate(&spec);
        let (x0, y0) = planted_truth(&spec);
        let on = count_cells(&messages, x0, y0, &CountOptions::for_spec(&spec));
        let off_options = CountOptions {
            resolve_identities: false,
            ..CountOptions::for_spec(&spec)
        };
        let off = count_cells(&messages, x0, y0, &off_options);
        assert_eq!(
            on.n(),
            off.n(),
            "signups carry the userId, so the cohort is the same"
        );
        assert!(
            off.a + off.b < on.a + on.b,
            "lost anonymous events drop users below the threshold"
        );
        assert!(phi(&off).unwrap_or(1.0) < phi(&on).unwrap_or(0.0));
        let without_anonymous = HistorySpec {
            anonymous_share: 0.0,
            ..spec.clone()
        };
        let plain = generate(&without_anonymous);
        let options = CountOptions::for_spec(&without_anonymous);
        let plain_off = CountOptions {
            resolve_identities: false,
            ..options.clone()
        };
        assert_eq!(
            count_cells(&plain, x0, y0, &options),
            count_cells(&plain, x0, y0, &plain_off)
        );
    }
}
