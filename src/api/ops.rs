//! `GET /healthz` and `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use super::AppState;
use super::respond::{self, HttpResponse};
use crate::bus::Publisher;
use crate::bus::streams::last_sequence;
use crate::metrics::{self, Family, Format};
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

/// Prometheus text (OpenMetrics when the scraper's `Accept` asks for it); refreshes the
/// stream's last sequence first (bounded wait).
pub async fn metrics(state: &AppState, parts: &http::request::Parts) -> HttpResponse {
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
    let mut families = state.metrics.families();
    families.extend(state_sizes(state));
    families.extend(billing_delivery(state));
    families.extend(heap_sizes());
    let accept = parts
        .headers
        .get(http::header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = Format::from_accept(accept);
    let text = metrics::exposition(families, format);
    respond::bytes_response(200, format.content_type(), text.into_bytes())
}

/// The billing sink's outbox and delivery calls, when billing is on.
fn billing_delivery(state: &AppState) -> Vec<Family> {
    let Some(billing) = &state.billing else {
        return Vec::new();
    };
    let d = billing.delivery();
    vec![
        Family::gauge(
            "northstar_billing_reports",
            "Usage reports in the outbox by standing: owed (pending), confirmed by the provider (delivered), refused for good (dead).",
        )
        .labelled(&[("standing", "pending")], d.pending)
        .labelled(&[("standing", "delivered")], d.delivered)
        .labelled(&[("standing", "dead")], d.dead),
        Family::counter(
            "northstar_billing_calls_total",
            "Calls made to the billing provider since start.",
        )
        .value(d.attempts),
        Family::counter(
            "northstar_billing_retries_total",
            "Provider calls that failed for a passing reason and will be made again.",
        )
        .value(d.retries),
        Family::counter(
            "northstar_billing_confirmed_total",
            "Usage reports the provider confirmed since start.",
        )
        .value(d.confirmed),
    ]
}

/// `northstar_heap_bytes{state}`: live allocations next to freed memory the allocator keeps,
/// so a rise in RSS reads as state that grows or as fragmentation.
fn heap_sizes() -> Option<Family> {
    let heap = crate::heap::usage()?;
    Some(
        Family::gauge(
            "northstar_heap_bytes",
            "Bytes the allocator holds: live (in_use) or freed and kept (free).",
        )
        .labelled(&[("state", "in_use")], heap.in_use)
        .labelled(&[("state", "free")], heap.free),
    )
}

/// `northstar_state_entries{part}`: how many entries the in-memory state of each part holds,
/// so what grows with ids or with history shows on a dashboard before it shows in RSS.
fn state_sizes(state: &AppState) -> [Family; 2] {
    let (people, linked) = state.onboarding.sizes();
    let counters = state.meter.counters();
    let mut entries = Family::gauge(
        "northstar_state_entries",
        "Entries held in memory by each part of the state.",
    )
    .labelled(&[("part", "meter_customers")], counters.customers_held())
    .labelled(&[("part", "meter_counters")], counters.counter_count())
    .labelled(
        &[("part", "meter_unique_values")],
        counters.unique_values_held(),
    )
    .labelled(&[("part", "onboarding_people")], people)
    .labelled(&[("part", "onboarding_linked_ids")], linked);
    if let Some(billing) = &state.billing {
        let (outbox, checkouts) = billing.sizes();
        entries = entries
            .labelled(&[("part", "billing_outbox_entries")], outbox)
            .labelled(&[("part", "billing_checkouts")], checkouts);
    }
    let unfollowed = Family::counter(
        "northstar_onboarding_unfollowed_events_total",
        "Events of people onboarding does not follow (onboarding.maxPeople reached).",
    )
    .value(state.onboarding.unfollowed());
    [entries, unfollowed]
}
