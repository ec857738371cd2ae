//! How much disk JetStream may use: the embedded server's store limit and each stream's size.
//!
//! The stream is the log of record for what the readers have not taken in yet and what SDK
//! retries are deduplicated against; Parquet is the long-term copy. So both streams have
//! limits retention (`stream.maxAge`, 7 days by default) and a size, whichever comes first,
//! and the embedded server is given an explicit `max_file_store` rather than its own guess
//! (a share of the disk free when it started). Values set in the config are used as they
//! are; `0` derives them:
//!
//! - the store: half of what the store's filesystem could hold for it at start (the free
//!   space plus what the store already uses), never less than it already uses;
//! - the events stream: 80% of the store, the rejected stream: 10%; the rest is for the KV
//!   buckets (customers, idempotency) and consumer state.
//!
//! With `--nats-url` the server's own limits apply; the streams take 80% and 10% of the
//! account's storage limit when it has one, and are bounded by `maxAge` alone otherwise.

use std::path::Path;

use crate::config::StreamSettings;
use crate::disk::{available_bytes, dir_bytes};

/// Share of the store the events stream takes when derived, in tenths.
const EVENTS_TENTHS: i64 = 8;
/// Share of the store the rejected stream takes when derived, in tenths.
const REJECTED_TENTHS: i64 = 1;

/// The sizes in bytes; `-1` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// The embedded server's `max_file_store`; `None` with an external server.
    pub store: Option<i64>,
    /// `max_bytes` of the events stream.
    pub events: i64,
    /// `max_bytes` of the rejected stream.
    pub rejected: i64,
}

impl Budget {
    /// The budget of an embedded server whose store is `store_dir`.
    pub(crate) fn embedded(settings: &StreamSettings, store_dir: &Path) -> Self {
        let store = if settings.store_max_bytes > 0 {
            settings.store_max_bytes
        } else {
            let used = dir_bytes(store_dir);
            let free = available_bytes(store_dir).unwrap_or(0);
            derived_store(used, free)
        };
        Self::within(settings, Some(store), store)
    }

    /// The budget on an external server whose account may limit storage (`-1`/`None`: not).
    pub(crate) fn external(settings: &StreamSettings, account_limit: Option<i64>) -> Self {
        match account_limit.filter(|limit| *limit > 0) {
            Some(limit) => Self::within(settings, None, limit),
            None => {
                let unlimited_when_derived = |set: i64| if set == 0 { -1 } else { set };
                Self {
                    store: None,
                    events: unlimited_when_derived(settings.max_bytes),
                    rejected: unlimited_when_derived(settings.rejected_max_bytes),
                }
            }
        }
    }

    fn within(settings: &StreamSettings, store: Option<i64>, limit: i64) -> Self {
        let share = |set: i64, tenths: i64| match set {
            0 => (limit / 10 * tenths).max(crate::config::MIN_STREAM_BYTES),
            set => set,
        };
        Self {
            store,
            events: share(settings.max_bytes, EVENTS_TENTHS),
            rejected: share(settings.rejected_max_bytes, REJECTED_TENTHS),
        }
    }
}

/// Half of what the filesystem could give the store, and never less than it holds now (a
/// limit below that would make the server discard messages at start).
fn derived_store(used: u64, free: u64) -> i64 {
    let half = used.saturating_add(free) / 2;
    i64::try_from(half.max(used))
        .unwrap_or(i64::MAX)
        .max(crate::config::MIN_STORE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: i64 = 1024 * 1024;

    #[test]
    fn derived_sizes_split_the_store_and_set_ones_are_kept() {
        let mut settings = StreamSettings::default();
        let budget = Budget::within(&settings, Some(1000 * MIB), 1000 * MIB);
        assert_eq!((budget.events, budget.rejected), (800 * MIB, 100 * MIB));
        settings.max_bytes = -1;
        settings.rejected_max_bytes = 5 * MIB;
        let budget = Budget::within(&settings, Some(1000 * MIB), 1000 * MIB);
        assert_eq!((budget.events, budget.rejected), (-1, 5 * MIB));
    }

    #[test]
    fn the_store_takes_half_the_disk_but_never_less_than_it_holds() {
        let mib = 1024 * 1024;
        assert_eq!(derived_store(100 * mib, 900 * mib), 500 * MIB);
        assert_eq!(derived_store(800 * mib, 100 * mib), 800 * MIB);
        assert_eq!(derived_store(0, 0), crate::config::MIN_STORE_BYTES);
    }

    #[test]
    fn an_external_server_without_a_storage_limit_leaves_derived_streams_to_max_age() {
        let settings = StreamSettings::default();
        let budget = Budget::external(&settings, Some(-1));
        assert_eq!(
            (budget.store, budget.events, budget.rejected),
            (None, -1, -1)
        );
        let budget = Budget::external(&settings, Some(1000 * MIB));
        assert_eq!((budget.events, budget.rejected), (800 * MIB, 100 * MIB));
    }
}
