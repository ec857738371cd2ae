//! Time as a value that can be passed in, so window, period and watermark logic is tested by
//! moving a manual clock instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Wall-clock time in UTC microseconds, or a manual clock under a test's control.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock that stands still at `micros` until moved with [`Clock::advance`] or [`Clock::set`].
    pub fn manual(micros: i64) -> Self {
        Self {
            manual: Some(Arc::new(AtomicI64::new(micros))),
        }
    }

    /// Now, in UTC microseconds since the Unix epoch.
    pub fn now_micros(&self) -> i64 {
        match &self.manual {
            Some(now) => now.load(Ordering::SeqCst),
            None => system_micros(),
        }
    }

    /// Moves a manual clock forward; no effect on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(now) = &self.manual {
            now.fetch_add(
                i64::try_from(by.as_micros()).unwrap_or(i64::MAX),
                Ordering::SeqCst,
            );
        }
    }

    /// Sets a manual clock; no effect on the system clock.
    pub fn set(&self, micros: i64) {
        if let Some(now) = &self.manual {
            now.store(micros, Ordering::SeqCst);
        }
    }
}

/// The system clock in UTC microseconds.
pub fn system_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats UTC microseconds as RFC 3339 with milliseconds (`2026-01-02T03:04:05.678Z`).
pub fn format_micros(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = Clock::manual(1_000);
        assert_eq!(clock.now_micros(), 1_000);
        clock.advance(Duration::from_millis(2));
        assert_eq!(clock.now_micros(), 3_000);
        assert_eq!(format_micros(0), "1970-01-01T00:00:00.000Z");
    }
}
