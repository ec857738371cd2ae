//! `GET /healthz` and `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use super::AppState;
use super::respond::{self, HttpResponse};
use crate::bus::Publisher;
use crate::bus::streams::last_sequence;
use crate::supervise::Supervisor;

/// What health and metrics look at.
pub struct Health {
    /// Panics caught in followers and background tasks.
    pub supervisor: Arc<Supervisor>,
    /// The NATS connection (through the publisher).
    pub publisher: Publisher,
    /// Name of the events stream, for the lag metric.
    pub events_stream: String,
    /// Committed position of each archived table.
    pub archived: Vec<(&'static str, watch::Receiver<u64>)>,
    /// Whether JetStream answers (see [`crate::bus::watch`]).
    pub jetstream: Arc<crate::bus::watch::JetStreamHealth>,
}

/// 200 when NATS is connected, the archivers run (the streams and consumers were set up
/// before serving began), the disks are above their reserve and no part has panicked; 503
/// otherwise, with the archive positions and the disk's state either way and, after a panic,
/// `failed` naming each part and where it stopped.
pub async fn healthz(state: &AppState) -> HttpResponse {
    let health = &state.health;
    let connected = health.publisher.is_connected();
    let mut archivers_running = true;
    let archive: serde_json::Map<String, serde_json::Value> = health
        .archived
        .iter()
        .map(|(table, committed)| {
            // The archiver holds the sender; if it is gone, the archiver task has ended.
            let running = committed.has_changed().is_ok();
            archivers_running &= running;
            (
                table.to_string(),
                json!({"last_seq": *committed.borrow(), "running": running}),
            )
        })
        .collect();
    let failed = health.supervisor.failures();
    let replaying = state.meter.replaying();
    let disk = state.ingestor.disk();
    let disk_full = disk.is_full();
    let jetstream = health.jetstream.is_up();
    let ok = connected
        && jetstream
        && archivers_running
        && failed.is_empty()
        && replaying.is_none()
        && !disk_full;
    let mut body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "nats": if connected { "connected" } else { "disconnected" },
        "jetstream": if jetstream { "ok" } else { "unavailable" },
        "nats_restarts": health.jetstream.restarts(),
        "disk": if disk_full { "full" } else { "ok" },
        "disk_free_bytes": disk.free_bytes(),
        "disk_min_free_bytes": disk.reserve_bytes(),
        "archive": archive,
    });
    if !failed.is_empty() {
        body["failed"] = json!(failed);
    }
    if let Some((applied, target)) = replaying {
        body["meter"] = json!({"replaying": true, "applied_seq": applied, "target_seq": target});
    }
    let mut response = respond::json(if ok { 200 } else { 503 }, &body);
    if !ok {
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(if disk_full {
                crate::disk::RETRY_AFTER_SECS
            } else {
                1
            }),
        );
    }
    response
}

/// Prometheus text; refreshes the stream's last sequence first (bounded wait).
pub async fn metrics(state: &AppState) -> HttpResponse {
    let health = &state.health;
    let js = health.publisher.jetstream();
    if let Ok(Ok(last)) = tokio::time::timeout(
        Duration::from_millis(500),
        last_sequence(js, &health.events_stream),
    )
    .await
    {
        state.metrics.stream_last_seq.set(last);
    }
    state.metrics.sql_running.set(state.query.running() as u64);
    let disk = state.ingestor.disk();
    state.metrics.disk_free_bytes.set(disk.free_bytes());
    state.metrics.disk_full.set(u64::from(disk.is_full()));
    let (followers, archive) = state.ingestor.backlog().lags();
    state.metrics.followers_lag.set(followers);
    state.metrics.archive_lag.set(archive);
    let mut text = state.metrics.render();
    text.push_str(&state_sizes(state));
    text.push_str(&billing_delivery(state));
    text.push_str(&heap_sizes());
    respond::bytes_response(200, "text/plain; version=0.0.4", text.into_bytes())
}

/// The billing sink's outbox and delivery calls, when billing is on.
fn billing_delivery(state: &AppState) -> String {
    let Some(billing) = &state.billing else {
        return String::new();
    };
    let d = billing.delivery();
    format!(
        "# HELP northstar_billing_reports Usage reports in the outbox by standing: owed (pending), confirmed by the provider (delivered), refused for good (dead).\n\
         # TYPE northstar_billing_reports gauge\n\
         northstar_billing_reports{{standing=\"pending\"}} {}\n\
         northstar_billing_reports{{standing=\"delivered\"}} {}\n\
         northstar_billing_reports{{standing=\"dead\"}} {}\n\
         # HELP northstar_billing_calls_total Calls made to the billing provider since start.\n\
         # TYPE northstar_billing_calls_total counter\n\
         northstar_billing_calls_total {}\n\
         # HELP northstar_billing_retries_total Provider calls that failed for a passing reason and will be made again.\n\
         # TYPE northstar_billing_retries_total counter\n\
         northstar_billing_retries_total {}\n\
         # HELP northstar_billing_confirmed_total Usage reports the provider confirmed since start.\n\
         # TYPE northstar_billing_confirmed_total counter\n\
         northstar_billing_confirmed_total {}\n",
        d.pending, d.delivered, d.dead, d.attempts, d.retries, d.confirmed
    )
}

/// `northstar_heap_bytes{state}`: live allocations next to freed memory the allocator keeps,
/// so a rise in RSS reads as state that grows or as fragmentation.
fn heap_sizes() -> String {
    let Some(heap) = crate::heap::usage() else {
        return String::new();
    };
    format!(
        "# HELP northstar_heap_bytes Bytes the allocator holds: live (in_use) or freed and kept (free).\n\
         # TYPE northstar_heap_bytes gauge\n\
         northstar_heap_bytes{{state=\"in_use\"}} {}\n\
         northstar_heap_bytes{{state=\"free\"}} {}\n",
        heap.in_use, heap.free
    )
}

/// `northstar_state_entries{part}`: how many entries the in-memory state of each part holds,
/// so what grows with ids or with history shows on a dashboard before it shows in RSS.
fn state_sizes(state: &AppState) -> String {
    let (people, linked) = state.onboarding.sizes();
    let mut parts = vec![
        ("meter_customers", state.meter.counters().customers_held()),
        ("meter_counters", state.meter.counters().counter_count()),
        (
            "meter_unique_values",
            state.meter.counters().unique_values_held(),
        ),
        ("onboarding_people", people),
        ("onboarding_linked_ids", linked),
    ];
    if let Some(billing) = &state.billing {
        let (outbox, checkouts) = billing.sizes();
        parts.push(("billing_outbox_entries", outbox));
        parts.push(("billing_checkouts", checkouts));
    }
    let mut text = String::from(
        "# HELP northstar_state_entries Entries held in memory by each part of the state.\n\
         # TYPE northstar_state_entries gauge\n",
    );
    for (part, entries) in parts {
        text.push_str(&format!(
            "northstar_state_entries{{part=\"{part}\"}} {entries}\n"
        ));
    }
    text.push_str(&format!(
        "# HELP northstar_onboarding_unfollowed_events_total Events of people onboarding does not follow (onboarding.maxPeople reached).\n\
         # TYPE northstar_onboarding_unfollowed_events_total counter\n\
         northstar_onboarding_unfollowed_events_total {}\n",
        state.onboarding.unfollowed()
    ));
    text
}
