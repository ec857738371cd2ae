//! Usage windows: metered quantities summed per customer, feature and window of event time,
//! closed when the watermark passes the window's end plus the grace period.
//!
//! The watermark is the latest event time seen (never past the event's arrival, so a client
//! clock running ahead cannot close windows early), moved on by the wall clock when the
//! stream is quiet. Usage that arrives for a window already closed is *late*: it is added to
//! the closed usage at once and its window is marked for a correction, never dropped.
//!
//! What is owed is derived from closed usage only (see [`super::outbox`]): the windows do not
//! remember what was reported, so replaying the stream after a crash can never bill twice.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A customer and a billed feature.
pub type Key = (String, String);

/// A window to report.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    /// Customer and feature.
    pub key: Key,
    /// The window's start (UTC µs).
    pub start: i64,
    /// Usage closed into the window since it was last due (all of it when it closes; what
    /// came late after that).
    pub usage: Decimal,
}

/// The windows of one follower.
#[derive(Debug, Clone)]
pub struct Windows {
    window: i64,
    grace: i64,
    open: BTreeMap<i64, HashMap<Key, Decimal>>,
    closed: HashMap<Key, Decimal>,
    late: BTreeMap<(Key, i64), Decimal>,
    watermark: i64,
}

/// What [`Windows::add`] did with a quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Into an open window.
    Open,
    /// Into a closed window: a correction is due.
    Late,
    /// Into a closed window that already had late usage waiting to be reported: the same
    /// correction grows.
    LateAgain,
}

impl Windows {
    /// Windows of `window` µs that close `grace` µs after their end.
    pub fn new(window: i64, grace: i64) -> Self {
        Self {
            window: window.max(1),
            grace: grace.max(0),
            open: BTreeMap::new(),
            closed: HashMap::new(),
            late: BTreeMap::new(),
            watermark: i64::MIN,
        }
    }

    /// Window length (µs).
    pub fn window(&self) -> i64 {
        self.window
    }

    /// The start of the window holding `at`.
    pub fn start_of(&self, at: i64) -> i64 {
        at - at.rem_euclid(self.window)
    }

    fn is_closed(&self, start: i64) -> bool {
        start.saturating_add(self.window).saturating_add(self.grace) <= self.watermark
    }

    /// Adds `quantity` of `key` used at `at` and received at `received` (both UTC µs).
    pub fn add(&mut self, key: Key, at: i64, received: i64, quantity: Decimal) -> Added {
        self.watermark = self.watermark.max(at.min(received));
        let start = self.start_of(at);
        if self.is_closed(start) {
            add_to(self.closed.entry(key.clone()).or_default(), quantity);
            let waiting = self.late.contains_key(&(key.clone(), start));
            add_to(self.late.entry((key, start)).or_default(), quantity);
            if waiting {
                Added::LateAgain
            } else {
                Added::Late
            }
        } else {
            add_to(
                self.open.entry(start).or_default().entry(key).or_default(),
                quantity,
            );
            Added::Open
        }
    }

    /// Moves the watermark to at least `now` and closes what it passes. Returns the windows to
    /// report: those just closed, then those with late usage since the last call.
    pub fn advance(&mut self, now: i64) -> Vec<Due> {
        self.watermark = self.watermark.max(now);
        let mut due = Vec::new();
        while let Some((&start, _)) = self.open.first_key_value() {
            if !self.is_closed(start) {
                break;
            }
            let Some((start, usage)) = self.open.pop_first() else {
                break;
            };
            let mut keys: Vec<_> = usage.into_iter().collect();
            keys.sort();
            for (key, quantity) in keys {
                add_to(self.closed.entry(key.clone()).or_default(), quantity);
                due.push(Due {
                    key,
                    start,
                    usage: quantity,
                });
            }
        }
        due.extend(
            std::mem::take(&mut self.late)
                .into_iter()
                .map(|((key, start), usage)| Due { key, start, usage }),
        );
        due
    }

    /// Puts windows back to be reported at the next [`Windows::advance`] (their report could
    /// not be owed this time).
    pub fn requeue(&mut self, due: Vec<Due>) {
        for Due { key, start, usage } in due {
            add_to(self.late.entry((key, start)).or_default(), usage);
        }
    }

    /// Usage of `key` in closed windows (what billing may be owed for).
    pub fn closed_usage(&self, key: &Key) -> Decimal {
        self.closed.get(key).copied().unwrap_or_default()
    }

    /// Windows not closed yet.
    pub fn open_count(&self) -> usize {
        self.open.values().map(HashMap::len).sum()
    }

    /// The watermark (UTC µs; `i64::MIN` before the first event or tick).
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Closed usage of every key.
    pub fn closed(&self) -> impl Iterator<Item = (&Key, &Decimal)> {
        self.closed.iter()
    }

    /// The state, for a snapshot.
    pub fn to_state(&self) -> WindowState {
        WindowState {
            watermark: self.watermark,
            open: self
                .open
                .iter()
                .flat_map(|(start, usage)| {
                    usage
                        .iter()
                        .map(|((c, f), q)| (*start, c.clone(), f.clone(), *q))
                })
                .collect(),
            closed: self
                .closed
                .iter()
                .map(|((c, f), q)| (c.clone(), f.clone(), *q))
                .collect(),
            late: Vec::new(),
            late_usage: self
                .late
                .iter()
                .map(|(((c, f), s), q)| (c.clone(), f.clone(), *s, *q))
                .collect(),
        }
    }

    /// Windows restored from a snapshot.
    pub fn from_state(window: i64, grace: i64, state: WindowState) -> Self {
        let mut windows = Self::new(window, grace);
        windows.watermark = state.watermark;
        for (start, customer, feature, quantity) in state.open {
            windows
                .open
                .entry(start)
                .or_default()
                .insert((customer, feature), quantity);
        }
        for (customer, feature, quantity) in state.closed {
            windows.closed.insert((customer, feature), quantity);
        }
        // Snapshots from before late usage was kept per window name the window only: its
        // report then takes what the outbox owes the key (see `Outbox::owe`).
        for (customer, feature, start) in state.late {
            windows
                .late
                .entry(((customer, feature), start))
                .or_default();
        }
        for (customer, feature, start, usage) in state.late_usage {
            add_to(
                windows
                    .late
                    .entry(((customer, feature), start))
                    .or_default(),
                usage,
            );
        }
        windows
    }
}

/// The serialisable state of [`Windows`] (decimals as exact strings).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WindowState {
    /// The watermark (UTC µs).
    pub watermark: i64,
    /// Open windows: (start, customer, feature, usage).
    pub open: Vec<(i64, String, String, Decimal)>,
    /// Closed usage: (customer, feature, usage).
    pub closed: Vec<(String, String, Decimal)>,
    /// Windows with late usage not yet reported, as snapshots before `late_usage` wrote
    /// them: (customer, feature, start). Read, never written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<(String, String, i64)>,
    /// Late usage not yet reported: (customer, feature, window start, usage).
    #[serde(default)]
    pub late_usage: Vec<(String, String, i64, Decimal)>,
}

/// Adds without overflowing: a sum at Decimal's range stays there (ingest bounds each
/// quantity, so only events stored before those bounds can get near it).
fn add_to(total: &mut Decimal, quantity: Decimal) {
    *total = total.saturating_add(quantity);
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn key(c: &str) -> Key {
        (c.to_string(), "api".to_string())
    }

    fn due(c: &str, start: i64, usage: i64) -> Due {
        Due {
            key: key(c),
            start,
            usage: Decimal::from(usage),
        }
    }

    #[test]
    fn windows_close_after_end_plus_grace_and_late_usage_is_a_correction() {
        let mut w = Windows::new(10 * S, 5 * S);
        assert_eq!(w.add(key("a"), 12 * S, 12 * S, Decimal::ONE), Added::Open);
        assert_eq!(w.add(key("a"), 19 * S, 19 * S, Decimal::TWO), Added::Open);
        // Window [10, 20) closes at 25.
        assert!(w.advance(24 * S).is_empty());
        assert_eq!(w.advance(25 * S), vec![due("a", 10 * S, 3)]);
        assert_eq!(w.closed_usage(&key("a")), Decimal::from(3));
        // A straggler for the closed window is counted and due again.
        assert_eq!(w.add(key("a"), 15 * S, 26 * S, Decimal::ONE), Added::Late);
        assert_eq!(w.closed_usage(&key("a")), Decimal::from(4));
        assert_eq!(w.advance(26 * S), vec![due("a", 10 * S, 1)]);
        assert!(w.advance(27 * S).is_empty());
    }

    #[test]
    fn a_client_clock_ahead_does_not_close_windows() {
        let mut w = Windows::new(10 * S, 0);
        // Claims to be at 100 s but arrived at 12 s: the watermark stays at 12 s.
        w.add(key("a"), 100 * S, 12 * S, Decimal::ONE);
        assert_eq!(w.add(key("b"), 11 * S, 12 * S, Decimal::ONE), Added::Open);
        assert_eq!(w.watermark(), 12 * S);
    }

    #[test]
    fn state_round_trips() {
        let mut w = Windows::new(10 * S, 0);
        w.add(key("a"), 1, 1, "0.25".parse().unwrap());
        w.add(key("b"), 15 * S, 15 * S, Decimal::ONE);
        w.advance(10 * S);
        assert_eq!(w.add(key("a"), 2, 12 * S, Decimal::TWO), Added::Late);
        let text = serde_json::to_string(&w.to_state()).unwrap();
        let mut back = Windows::from_state(10 * S, 0, serde_json::from_str(&text).unwrap());
        assert_eq!(back.closed_usage(&key("a")), "2.25".parse().unwrap());
        assert_eq!(back.open_count(), 1);
        assert_eq!(back.watermark(), w.watermark());
        assert_eq!(
            back.advance(12 * S),
            vec![due("a", 0, 2)],
            "late usage kept"
        );
        // A snapshot of before late usage was kept per window still reads.
        let earlier = r#"{"watermark": 5, "open": [], "closed": [["a", "api", "1"]], "late": [["a", "api", 0]]}"#;
        let mut old = Windows::from_state(10 * S, 0, serde_json::from_str(earlier).unwrap());
        assert_eq!(old.advance(6).len(), 1);
    }

    /// Late events for one window waiting to be reported make one correction: the first is
    /// `Late`, the others `LateAgain` (what the follower logs once).
    #[test]
    fn late_events_of_one_window_are_one_correction() {
        let mut w = Windows::new(10 * S, 0);
        w.add(key("a"), 12 * S, 12 * S, Decimal::ONE);
        w.advance(40 * S);
        assert_eq!(w.add(key("a"), 13 * S, 41 * S, Decimal::ONE), Added::Late);
        assert_eq!(
            w.add(key("a"), 14 * S, 41 * S, Decimal::ONE),
            Added::LateAgain
        );
        assert_eq!(
            w.add(key("a"), 25 * S, 41 * S, Decimal::ONE),
            Added::Late,
            "another window"
        );
        let due = w.advance(42 * S);
        assert_eq!(due.len(), 2, "{due:?}");
        assert_eq!(
            w.add(key("a"), 15 * S, 43 * S, Decimal::ONE),
            Added::Late,
            "reported: anew"
        );
    }
}
