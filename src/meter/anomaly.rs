//! Free-tier abuse detection: a customer whose metered events arrive far faster than their own
//! trailing baseline is flagged (the seed's pitfall 3). Flags are listed by the API; suspension
//! stays the job of hard caps, which are explicit.
//!
//! The rate is counted per minute of arrival (`received_at`), against an exponentially weighted
//! baseline of the customer's past minutes (about half an hour of memory). A customer needs ten
//! minutes of history before they can be flagged, so a new customer's first burst is not an
//! anomaly, it is a first burst.

use serde::Serialize;

/// Minutes of history before a customer can be flagged.
const MIN_HISTORY_MINUTES: u16 = 10;
/// Weight of the newest minute in the baseline (≈ 30 minutes of memory).
const ALPHA: f32 = 1.0 / 30.0;

/// A customer's arrival rate: the current minute and the baseline before it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateWindow {
    minute: i64,
    count: u32,
    baseline: f32,
    minutes_seen: u16,
    flagged_minute: i64,
}

/// A flagged minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spike {
    /// Events in the flagged minute so far.
    pub events_per_minute: u32,
    /// The customer's baseline events per minute.
    pub baseline_per_minute: f32,
    /// The minute (UTC µs of its start).
    pub minute_start: i64,
}

impl RateWindow {
    /// Counts one event that arrived at `received_at`; returns a spike the first time a minute
    /// passes `factor` × the baseline with at least `min_events` events.
    pub fn record(&mut self, received_at: i64, factor: f64, min_events: u64) -> Option<Spike> {
        let minute = received_at.div_euclid(60_000_000);
        if self.minutes_seen == 0 && self.count == 0 {
            self.minute = minute;
        }
        if minute > self.minute {
            // Close the minute, and the empty minutes after it, into the baseline.
            self.baseline += ALPHA * (self.count as f32 - self.baseline);
            let empty = (minute - self.minute - 1).clamp(0, 120) as i32;
            self.baseline *= (1.0 - ALPHA).powi(empty);
            self.minutes_seen = self.minutes_seen.saturating_add(1 + empty as u16);
            self.minute = minute;
            self.count = 0;
        }
        // A late arrival (clock skew between nodes) counts in the current minute.
        self.count = self.count.saturating_add(1);
        let threshold = f64::from(self.baseline.max(1.0)) * factor;
        let spiking = self.minutes_seen >= MIN_HISTORY_MINUTES
            && f64::from(self.count) > threshold
            && u64::from(self.count) >= min_events;
        if spiking && self.flagged_minute != self.minute {
            self.flagged_minute = self.minute;
            return Some(Spike {
                events_per_minute: self.count,
                baseline_per_minute: self.baseline,
                minute_start: self.minute * 60_000_000,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000_000;

    #[test]
    fn a_burst_far_above_the_baseline_is_flagged_once() {
        let mut w = RateWindow::default();
        for minute in 0..20 {
            for i in 0..5 {
                assert!(w.record(minute * MINUTE + i, 10.0, 100).is_none());
            }
        }
        let mut spikes = Vec::new();
        for i in 0..300 {
            spikes.extend(w.record(20 * MINUTE + i, 10.0, 100));
        }
        assert_eq!(spikes.len(), 1, "flagged once per minute");
        assert_eq!(
            spikes[0].events_per_minute, 100,
            "flagged at min_events, past 10x the baseline"
        );
        assert!(spikes[0].baseline_per_minute < 6.0);
    }

    #[test]
    fn new_customers_and_small_bursts_are_not_flagged() {
        let mut w = RateWindow::default();
        assert!(
            (0..500).all(|i| w.record(i, 10.0, 100).is_none()),
            "no history yet"
        );
        let mut steady = RateWindow::default();
        for minute in 0..30 {
            for i in 0..50 {
                assert!(
                    steady.record(minute * MINUTE + i, 10.0, 1_000).is_none(),
                    "under min_events"
                );
            }
        }
    }
}
