//! Synthetic product history with a planted activation threshold, as Segment-shaped JSON messages
//! (the plain-loop hand count to test the SQL against is the integration tests' oracle,
//! `tests/activation/handcount.rs`).
//!
//! Definitions (shared with `stats`):
//! - day k after signup is `[signup + k·24h, signup + (k+1)·24h)`;
//! - "within y days" means a timestamp in `[signup, signup + y·24h)`;
//! - a user is "retained" when they have at least one message of any type in days `[28, 56)`;
//! - the cohort is every user whose signup is at least 56 days before the end of the data.
//!
//! Ground truth planted by [`generate`]: about half of the users do the North Star event at least
//! `planted_times` (x0) times within `planted_days` (y0) days of signup ("activated"), the others
//! fewer; activated users are retained with probability `retain_if_activated`, the others with
//! `retain_otherwise`. Churned users have no activity from day 28 on. The generator assumes
//! `x0 ≥ 1` and `1 ≤ y0 ≤ 25` (so the window and its "late" events end before day 28).
//!
//! Anonymous users: a share of users browse anonymously before signup, and their first North
//! Star events after signup carry only `anonymousId` until an `identify` with both `userId` and
//! `anonymousId` links them. Those events count toward the threshold only when identity
//! resolution works, so the planted split is exact only with resolution on. With
//! `pre_signup_share`, some of them do one planted North Star event the day before signup:
//! the planted split is then exact counting from first seen (`activation.windowStart`
//! `firstSeen`), not from signup.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use serde_json::{Map, Value, json};

/// Microseconds in one day, the unit of every window.
pub const DAY_MICROS: i64 = 86_400_000_000;
/// Timestamps are emitted with millisecond precision, so every generated time is a whole ms.
const MS: i64 = 1_000;
/// Activity from this day on counts as retention; churned users stop before it.
pub const RETENTION_START_DAY: i64 = 28;
/// End (exclusive) of the retention window.
pub const RETENTION_END_DAY: i64 = 56;
/// Days after the last possible signup where the data ends (≥ 56 so everyone is in the cohort).
const DATA_TAIL_DAYS: i64 = 60;
/// Non-North-Star event names used for background and retention activity.
const OTHER_EVENTS: [&str; 3] = ["dashboard_viewed", "report_exported", "settings_updated"];

/// Everything that shapes a synthetic history, so tests and demos can plant a known threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct HistorySpec {
    /// Number of users (people) to generate.
    pub users: usize,
    /// PRNG seed; the same spec always yields the same messages.
    pub seed: u64,
    /// Earliest possible signup time, µs since the Unix epoch.
    pub start_micros: i64,
    /// Signups are spread uniformly over this many days from `start_micros`.
    pub signup_spread_days: u32,
    /// Planted x0: activated users do the North Star event at least this many times…
    pub planted_times: u32,
    /// …within this many days (y0) of signup.
    pub planted_days: u32,
    /// Probability that an activated user is retained.
    pub retain_if_activated: f64,
    /// Probability that a non-activated user is retained.
    pub retain_otherwise: f64,
    /// Name of the North Star track event.
    pub north_star_event: String,
    /// Name of the signup track event.
    pub signup_event: String,
    /// Fraction of users whose early events are anonymous until an identify links them.
    pub anonymous_share: f64,
    /// Fraction of those anonymous users who try the North Star action once anonymously just
    /// before signing up: one of their planted events moves to the day before signup, so the
    /// planted rule holds counting from first seen and is one short counting from signup.
    pub pre_signup_share: f64,
}

impl Default for HistorySpec {
    /// A demo-sized history: 2,000 users over 30 days, planted "3 times in 7 days", 80% vs 15%.
    fn default() -> Self {
        Self {
            users: 2_000,
            seed: 42,
            start_micros: 1_735_689_600_000_000, // 2025-01-01T00:00:00Z
            signup_spread_days: 30,
            planted_times: 3,
            planted_days: 7,
            retain_if_activated: 0.8,
            retain_otherwise: 0.15,
            north_star_event: "core_action_completed".to_string(),
            signup_event: "signup_completed".to_string(),
            anonymous_share: 0.3,
            pre_signup_share: 0.0,
        }
    }
}

impl HistorySpec {
    /// The default history moved so that its data ends on the day of `now_micros` (UTC µs):
    /// a history users import today is recent, as ingest's `maxEventAge` expects.
    pub fn ending_at(now_micros: i64) -> Self {
        let spec = Self::default();
        let today = now_micros - now_micros.rem_euclid(DAY_MICROS);
        let length = (i64::from(spec.signup_spread_days) + DATA_TAIL_DAYS) * DAY_MICROS;
        Self {
            start_micros: today - length,
            ..spec
        }
    }
}

/// splitmix64: a tiny, well-mixed deterministic PRNG, so the crate needs no `rand`.
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..n` (0 when n is 0); the modulo bias is negligible for small n.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform float in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform whole-millisecond time in `[lo, hi)`; `lo` when the range is empty.
    fn time_in(&mut self, lo: i64, hi: i64) -> i64 {
        let slots = ((hi - lo) / MS).max(0) as u64;
        lo + self.below(slots) as i64 * MS
    }

    /// Between `counts.start()` and `counts.end()` sorted whole-ms times in `[lo, hi)`.
    fn sorted_times(&mut self, counts: RangeInclusive<u64>, lo: i64, hi: i64) -> Vec<i64> {
        let count = counts.start() + self.below(counts.end().saturating_sub(*counts.start()) + 1);
        let mut times: Vec<i64> = (0..count).map(|_| self.time_in(lo, hi)).collect();
        times.sort_unstable();
        times
    }
}

/// The planted threshold (x0, y0) that a correct analysis should recover.
pub fn planted_truth(spec: &HistorySpec) -> (u32, u32) {
    (spec.planted_times, spec.planted_days)
}

/// End of the generated data: the last possible signup plus 60 days, so every user is ≥ 56 days old.
pub fn data_end_micros(spec: &HistorySpec) -> i64 {
    spec.start_micros + (spec.signup_spread_days as i64 + DATA_TAIL_DAYS) * DAY_MICROS
}

/// RFC 3339 UTC with milliseconds and `Z` (e.g. `2025-01-01T00:00:00.000Z`), as Segment sends.
pub(crate) fn format_timestamp(micros: i64) -> String {
    crate::clock::format_micros(micros)
}

/// Parse an RFC 3339 timestamp into µs since the epoch; `None` when it is not one.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.timestamp_micros())
}

/// Who a message names: the fields Segment puts at the top level.
#[derive(Clone, Copy)]
enum Ids<'a> {
    User(&'a str),
    Anonymous(&'a str),
    Both { user: &'a str, anonymous: &'a str },
}

/// One generated person, with the ids and customer every message of theirs carries.
struct Person {
    index: usize,
    user_id: String,
    anonymous_id: Option<String>,
    customer: String,
    plan: &'static str,
}

/// Collects one history's messages with unique, deterministic message ids.
struct Sink {
    seed: u64,
    messages: Vec<(i64, String, Value)>,
    next_id: HashMap<usize, u32>,
}

impl Sink {
    fn message_id(&mut self, person: &Person) -> String {
        let counter = self.next_id.entry(person.index).or_insert(0);
        *counter += 1;
        format!("gen-{:016x}-{:06}-{:04}", self.seed, person.index, counter)
    }

    /// Fields every message has: id, type, timestamp, ids, context.
    fn base(
        &mut self,
        person: &Person,
        kind: &str,
        at: i64,
        ids: Ids<'_>,
    ) -> (String, Map<String, Value>) {
        let id = self.message_id(person);
        let mut message = Map::new();
        message.insert("messageId".into(), json!(id));
        message.insert("type".into(), json!(kind));
        message.insert("timestamp".into(), json!(format_timestamp(at)));
        let (user, anonymous) = match ids {
            Ids::User(user) => (Some(user), None),
            Ids::Anonymous(anonymous) => (None, Some(anonymous)),
            Ids::Both { user, anonymous } => (Some(user), Some(anonymous)),
        };
        if let Some(user) = user {
            message.insert("userId".into(), json!(user));
        }
        if let Some(anonymous) = anonymous {
            message.insert("anonymousId".into(), json!(anonymous));
        }
        message.insert("context".into(), json!({ "groupId": person.customer }));
        (id, message)
    }

    fn track(&mut self, person: &Person, ids: Ids<'_>, event: &str, at: i64, properties: Value) {
        let (id, mut message) = self.base(person, "track", at, ids);
        message.insert("event".into(), json!(event));
        message.insert("properties".into(), properties);
        self.messages.push((at, id, Value::Object(message)));
    }

    fn identify(&mut self, person: &Person, ids: Ids<'_>, at: i64) {
        let (id, mut message) = self.base(person, "identify", at, ids);
        let traits =
            json!({ "email": format!("{}@example.com", person.user_id), "plan": person.plan });
        message.insert("traits".into(), traits);
        self.messages.push((at, id, Value::Object(message)));
    }
}

/// The random choices that define one user's history before it is written out.
struct Plan {
    signup: i64,
    activated: bool,
    retained: bool,
    /// North Star times inside the planted window, sorted.
    in_window: Vec<i64>,
    /// When the anonymous part of the history ends (identify time); `None` for identified users.
    identify_at: Option<i64>,
}

/// Decide signup, activation, the in-window North Star times, retention and identify time.
fn plan_user(spec: &HistorySpec, rng: &mut SplitMix64, anonymous: bool) -> Plan {
    let x0 = u64::from(spec.planted_times);
    let signup = rng.time_in(
        spec.start_micros,
        spec.start_micros + i64::from(spec.signup_spread_days) * DAY_MICROS,
    );
    let activated = x0 == 0 || rng.chance(0.5);
    // Activated: x0..=2·x0 events in the window; otherwise 0..x0 (strictly below the threshold).
    let count = if activated {
        x0 + rng.below(x0 + 1)
    } else {
        rng.below(x0)
    };
    let window_end = signup + i64::from(spec.planted_days) * DAY_MICROS;
    let mut in_window = rng.sorted_times(count..=count, signup, window_end);
    // (No draw at all when the share is 0, so older specs generate the same history.)
    if anonymous && spec.pre_signup_share > 0.0 && rng.chance(spec.pre_signup_share) {
        if let Some(first) = in_window.first_mut() {
            *first = rng.time_in(signup - DAY_MICROS, signup);
        }
        in_window.sort_unstable();
    }
    let retained = rng.chance(if activated {
        spec.retain_if_activated
    } else {
        spec.retain_otherwise
    });
    let identify_at = anonymous.then(|| match in_window.len() as u64 {
        0 => rng.time_in(signup + MS, signup + DAY_MICROS),
        len => in_window
            .get(rng.below(len) as usize)
            .map_or(signup, |&at| at + MS),
    });
    Plan {
        signup,
        activated,
        retained,
        in_window,
        identify_at,
    }
}

/// Ids for a user event at `at`: anonymous-only before the identify, the user id after.
fn ids_at<'a>(person: &'a Person, plan: &Plan, at: i64) -> Ids<'a> {
    match (&person.anonymous_id, plan.identify_at) {
        (Some(anonymous), Some(identify_at)) if at < identify_at => Ids::Anonymous(anonymous),
        _ => Ids::User(&person.user_id),
    }
}

/// Write one user's messages into the sink from their plan.
fn write_user(
    spec: &HistorySpec,
    rng: &mut SplitMix64,
    sink: &mut Sink,
    person: &Person,
    plan: &Plan,
) {
    let signup = plan.signup;
    let day = |k: i64| signup + k * DAY_MICROS;
    let window_end = day(i64::from(spec.planted_days));
    let method = if rng.chance(0.5) { "email" } else { "google" };
    let signup_props = json!({ "plan": person.plan, "method": method });
    sink.track(
        person,
        Ids::User(&person.user_id),
        &spec.signup_event,
        signup,
        signup_props,
    );
    if let Some(anonymous) = &person.anonymous_id {
        for at in rng.sorted_times(1..=2, day(-2), signup) {
            let props = json!({ "path": "/pricing", "referrer": "https://www.example.com/" });
            sink.track(
                person,
                Ids::Anonymous(anonymous),
                "landing_page_viewed",
                at,
                props,
            );
        }
        let identify_at = plan.identify_at.unwrap_or(signup);
        sink.identify(
            person,
            Ids::Both {
                user: &person.user_id,
                anonymous,
            },
            identify_at,
        );
    } else {
        sink.identify(person, Ids::User(&person.user_id), signup);
    }
    // Late North Star events just after the window (never before day 28), so neighbouring
    // candidates such as (x0, y0 + 1) mix non-activated users in.
    let late_counts = if plan.activated { 0..=1 } else { 0..=2 };
    let late_end = window_end
        .saturating_add(3 * DAY_MICROS)
        .min(day(RETENTION_START_DAY));
    let late = rng.sorted_times(late_counts, window_end, late_end);
    for at in plan.in_window.iter().copied().chain(late) {
        let props = json!({ "duration_ms": 200 + rng.below(5_000), "plan": person.plan });
        sink.track(
            person,
            ids_at(person, plan, at),
            &spec.north_star_event,
            at,
            props,
        );
    }
    for at in rng.sorted_times(0..=3, signup, day(RETENTION_START_DAY)) {
        sink.track(
            person,
            ids_at(person, plan, at),
            OTHER_EVENTS[0],
            at,
            json!({ "path": "/dashboard" }),
        );
    }
    if plan.retained {
        write_retained_activity(spec, rng, sink, person, signup);
    }
}

/// Activity of a retained user: some events in days [28, 56), and maybe some later.
fn write_retained_activity(
    spec: &HistorySpec,
    rng: &mut SplitMix64,
    sink: &mut Sink,
    person: &Person,
    signup: i64,
) {
    let in_retention = rng.sorted_times(
        1..=4,
        signup + RETENTION_START_DAY * DAY_MICROS,
        signup + RETENTION_END_DAY * DAY_MICROS,
    );
    let later = rng.sorted_times(
        0..=2,
        signup + RETENTION_END_DAY * DAY_MICROS,
        data_end_micros(spec),
    );
    for at in in_retention.into_iter().chain(later) {
        let pick = rng.below(OTHER_EVENTS.len() as u64 + 1) as usize;
        let event = OTHER_EVENTS
            .get(pick)
            .copied()
            .unwrap_or(spec.north_star_event.as_str());
        sink.track(
            person,
            Ids::User(&person.user_id),
            event,
            at,
            json!({ "plan": person.plan }),
        );
    }
}

/// Generate the whole history, sorted by timestamp then messageId.
///
/// Message shape (Segment): `{"messageId", "type": "track"|"identify", "event" (tracks),
/// "timestamp": "YYYY-MM-DDTHH:MM:SS.mmmZ", "userId" and/or "anonymousId",
/// "context": {"groupId": "cust_NNNN"}, "properties" (tracks) | "traits" (identifies)}`.
pub fn generate(spec: &HistorySpec) -> Vec<Value> {
    let mut rng = SplitMix64::new(spec.seed);
    let mut sink = Sink {
        seed: spec.seed,
        messages: Vec::new(),
        next_id: HashMap::new(),
    };
    let (mut customer, mut left_in_customer, mut plan_name) = (0usize, 0u64, "free");
    for index in 0..spec.users {
        if left_in_customer == 0 {
            customer += 1;
            left_in_customer = 1 + rng.below(4);
            plan_name = if rng.chance(0.3) { "pro" } else { "free" };
        }
        left_in_customer -= 1;
        let anonymous = rng.chance(spec.anonymous_share);
        let person = Person {
            index,
            user_id: format!("user_{index:05}"),
            anonymous_id: anonymous
                .then(|| format!("anon_{index:05}_{:08x}", rng.next_u64() as u32)),
            customer: format!("cust_{customer:04}"),
            plan: plan_name,
        };
        let plan = plan_user(spec, &mut rng, anonymous);
        write_user(spec, &mut rng, &mut sink, &person, &plan);
    }
    sink.messages
        .sort_by(|x, y| x.0.cmp(&y.0).then_with(|| x.1.cmp(&y.1)));
    sink.messages
        .into_iter()
        .map(|(_, _, message)| message)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_ending_today_ends_on_today_and_is_otherwise_the_default() {
        let now = 1_796_000_000_000_000 + 12_345;
        let spec = HistorySpec::ending_at(now);
        let end = data_end_micros(&spec);
        assert_eq!(end % DAY_MICROS, 0);
        assert!(end <= now && now - end < DAY_MICROS, "{end} vs {now}");
        assert_eq!(spec.users, HistorySpec::default().users);
    }

    #[test]
    fn timestamps_round_trip() {
        for micros in [
            0,
            1_735_689_600_000_000,
            951_782_400_123_000,
            4_102_444_799_999_000,
            -86_400_000_000,
        ] {
            let text = format_timestamp(micros);
            assert_eq!(parse_timestamp(&text), Some(micros), "{text}");
        }
        assert_eq!(
            format_timestamp(1_735_689_600_000_000),
            "2025-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_timestamp(951_782_400_123_000),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            parse_timestamp("2025-01-01T01:00:00+01:00"),
            Some(1_735_689_600_000_000)
        );
        assert_eq!(
            parse_timestamp("2025-01-01T00:00:00.5Z"),
            Some(1_735_689_600_500_000)
        );
        assert_eq!(parse_timestamp("not a time"), None);
        assert_eq!(parse_timestamp("2025-01-01T00:00:00"), None);
    }

    #[test]
    fn same_seed_same_output() {
        let spec = HistorySpec {
            users: 200,
            ..HistorySpec::default()
        };
        assert_eq!(generate(&spec), generate(&spec));
        assert_ne!(
            generate(&spec),
            generate(&HistorySpec {
                seed: spec.seed + 1,
                ..spec.clone()
            })
        );
    }
}
