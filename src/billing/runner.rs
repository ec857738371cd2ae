//! The billing follower: reads every event in stream order, sums billed usage into windows,
//! and on each tick closes what the watermark passed, owes it in the outbox and hands it to
//! delivery. Its snapshot (windows + stream position) is written after the outbox, so a
//! restart replays at most what the outbox already knows, and owes nothing twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::outbox::{Closing, Entry, Outbox};
use super::windows::{Added, Due, WindowState, Windows};
use crate::bus::follower::{Follow, Saved};
use crate::clock::Clock;
use crate::event::EventView;
use crate::files::write_atomic;
use crate::meter::customers::CustomerStore;
use crate::schema::quantity::{self, Contribution};

/// The snapshot's file name under the billing directory.
pub(crate) const SNAPSHOT_FILE: &str = "windows.json";

/// A billed meter of one event.
#[derive(Debug, Clone)]
pub(crate) struct BilledMeter {
    /// Id of the feature the event meters (`usageFeatures[].id`).
    pub feature: String,
    /// The provider's meter name.
    pub event_name: String,
    /// Where the quantity is.
    pub value_property: Option<String>,
    /// Sum or count.
    pub aggregation: crate::config::Aggregation,
}

/// What status pages read of the windows.
#[derive(Debug, Clone, Default)]
pub(crate) struct WindowsView {
    /// Windows still open.
    pub open: usize,
    /// The watermark (UTC µs).
    pub watermark: i64,
    /// Closed usage per (customer, feature), exact.
    pub closed: Vec<(String, String, rust_decimal::Decimal)>,
    /// Last stream sequence applied.
    pub seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    stream_created: String,
    seq: u64,
    windows: WindowState,
}

/// Loads the snapshot in `dir` if it belongs to the stream made at `created`.
pub fn load(dir: &std::path::Path, created: &str, window: i64, grace: i64) -> (Windows, u64) {
    let path = dir.join(SNAPSHOT_FILE);
    match std::fs::read(&path)
        .ok()
        .map(|bytes| serde_json::from_slice::<Snapshot>(&bytes))
    {
        Some(Ok(snapshot))
            if crate::bus::streams::same_incarnation(&snapshot.stream_created, created) =>
        {
            (
                Windows::from_state(window, grace, snapshot.windows),
                snapshot.seq,
            )
        }
        Some(Ok(_)) => {
            tracing::warn!(
                "billing windows belong to another stream; rebuilding them from the stream (the outbox keeps what was owed)"
            );
            (Windows::new(window, grace), 0)
        }
        Some(Err(error)) => {
            tracing::warn!(%error, "unreadable billing windows; rebuilding them from the stream (the outbox keeps what was owed)");
            (Windows::new(window, grace), 0)
        }
        None => (Windows::new(window, grace), 0),
    }
}

/// The follower.
pub(crate) struct BillingFollower {
    /// Usage windows.
    pub windows: Windows,
    /// Billed meters by event name.
    pub meters: HashMap<String, Vec<BilledMeter>>,
    /// What is owed and not yet delivered, shared with the delivery task.
    pub outbox: Arc<Mutex<Outbox>>,
    /// Customers (for Stripe customer ids).
    pub customers: Arc<CustomerStore>,
    /// New entries go to delivery here.
    pub deliver: mpsc::UnboundedSender<Vec<Entry>>,
    /// The billing directory.
    pub dir: PathBuf,
    /// When the stream was made (snapshots of another stream are set aside).
    pub stream_created: String,
    /// Last applied sequence.
    pub seq: u64,
    /// The wall clock that moves the watermark on a quiet stream.
    pub clock: Clock,
    /// What status pages see.
    pub view: Arc<Mutex<WindowsView>>,
    /// Sequence of the last snapshot written (`None`: none yet).
    pub written_seq: Option<u64>,
    /// The same, for retention (starts at the sequence resumed after).
    pub saved: Saved,
}

impl BillingFollower {
    /// Closes what the watermark passed, owes it, and snapshots. Returns false if the outbox
    /// could not be written (the windows are kept due and tried again next tick).
    fn flush(&mut self) -> bool {
        let now = self.clock.now_micros();
        let due = self.windows.advance(now);
        let closings: Vec<Closing> = due
            .iter()
            .filter_map(|Due { key, start, usage }| {
                let event_name = self
                    .meters
                    .values()
                    .flatten()
                    .find(|m| m.feature == key.1)?
                    .event_name
                    .clone();
                let customer = self.customers.terms(&key.0);
                Some(Closing {
                    key: key.clone(),
                    window_start: *start,
                    window_end: start + self.windows.window(),
                    closed_usage: self.windows.closed_usage(key),
                    window_usage: *usage,
                    event_name,
                    provider_customer: customer
                        .stripe_customer_id
                        .clone()
                        .unwrap_or_else(|| key.0.clone()),
                })
            })
            .collect();
        let owed = match self.outbox.lock() {
            Ok(mut outbox) => outbox.owe(&closings, now),
            Err(_) => return false,
        };
        match owed {
            Ok(entries) => {
                if !entries.is_empty() {
                    let _ = self.deliver.send(entries);
                }
            }
            Err(error) => {
                tracing::error!(%error, "billing outbox not writable; windows stay due");
                self.windows.requeue(due);
                return false;
            }
        }
        self.publish_view();
        // A quiet tick (no event applied, no window closed) changes only the watermark, which
        // the wall clock restores after a restart: nothing to write.
        if due.is_empty() && self.written_seq == Some(self.seq) {
            return true;
        }
        let snapshot = Snapshot {
            stream_created: self.stream_created.clone(),
            seq: self.seq,
            windows: self.windows.to_state(),
        };
        match serde_json::to_vec(&snapshot) {
            Ok(bytes) => match write_atomic(&self.dir.join(SNAPSHOT_FILE), &bytes) {
                Ok(()) => {
                    self.written_seq = Some(self.seq);
                    self.saved
                        .fetch_max(self.seq, std::sync::atomic::Ordering::SeqCst);
                }
                Err(error) => {
                    tracing::error!(%error, "billing windows snapshot failed; the next tick retries")
                }
            },
            Err(error) => tracing::error!(%error, "billing windows snapshot not serialisable"),
        }
        true
    }

    fn publish_view(&self) {
        if let Ok(mut view) = self.view.lock() {
            view.open = self.windows.open_count();
            view.watermark = self.windows.watermark();
            view.seq = self.seq;
            view.closed = self
                .windows
                .closed()
                .map(|((c, f), q)| (c.clone(), f.clone(), *q))
                .collect();
        }
    }
}

impl Follow for BillingFollower {
    fn name(&self) -> &'static str {
        "billing"
    }

    fn apply(&mut self, seq: u64, event: Option<&EventView<'_>>) {
        self.seq = seq;
        let Some(event) = event else {
            return;
        };
        let (Some(name), Some(customer)) = (event.event.as_deref(), event.customer_id.as_deref())
        else {
            return;
        };
        let Some(meters) = self.meters.get(name) else {
            return;
        };
        let properties: Map<String, Value> =
            serde_json::from_str(event.properties.get()).unwrap_or_default();
        for meter in meters {
            let amount = match quantity::quantity(
                meter.value_property.as_deref(),
                meter.aggregation,
                &properties,
            ) {
                Ok(Contribution::Amount(amount)) => amount,
                Ok(_) | Err(_) => continue,
            };
            let key = (customer.to_string(), meter.feature.clone());
            // Said once per window and correction: an imported or replayed history makes
            // thousands of late events, each for one of a few windows.
            if self
                .windows
                .add(key, event.timestamp, event.received_at, amount)
                == Added::Late
            {
                tracing::warn!(
                    seq,
                    customer,
                    feature = %meter.feature,
                    event_time = %crate::clock::format_micros(event.timestamp),
                    "late usage for a closed billing window: a correction will be reported (more late usage for it joins the same correction)"
                );
            }
        }
    }

    fn snapshot(&mut self) {
        self.flush();
    }

    fn saved(&self) -> Saved {
        self.saved.clone()
    }

    fn final_snapshot(&mut self) -> JoinHandle<()> {
        // Windows still open stay open: they close after restart, when their time comes.
        self.flush();
        tokio::spawn(async {})
    }
}
