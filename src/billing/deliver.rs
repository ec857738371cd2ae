//! Delivery: sends owed reports to the sink, oldest first, and records what the provider said.
//!
//! - one call at a time per customer and meter (Stripe's rule), and in order within one;
//! - at most `concurrency` calls in flight and `rateLimit` calls per second overall;
//! - transient failures (5xx, timeouts, cut connections, 409) back off exponentially with
//!   jitter; a 429 waits what its `Retry-After` says;
//! - a 4xx other than 429 is permanent: the entry is parked as a dead letter with the
//!   provider's message, and later reports of the same customer go on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::outbox::Outcome;
use super::outbox::{Entry, Outbox};
use super::sink::Sink;
use crate::clock::system_micros;
use crate::shutdown::{Shutdown, wait_for_stop};

/// How fast and how patiently to deliver.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Calls per second at most.
    pub rate_limit: u32,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

/// Delivery counters, for status and metrics.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DeliveryStats {
    /// Calls made.
    pub attempts: u64,
    /// Calls that will be repeated.
    pub retries: u64,
    /// Reports confirmed since start.
    pub delivered: u64,
    /// The last transient failure.
    pub last_error: Option<String>,
}

/// The delay before retry `attempt` (1 = first retry): `base · 2^(attempt-1)`, capped, with
/// jitter drawn from its upper half so a crowd of retries spreads out.
pub(crate) fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let full = exp.min(max);
    let half = full / 2;
    half + full.saturating_sub(half).mul_f64(fastrand::f64())
}

/// The lane of an entry: one call at a time per customer and meter, so their reports arrive
/// in order. A hash, so that the dispatch loop, which looks at many queued entries for each
/// free slot, allocates nothing per look (two owned ids each cost most of a delivery's time in
/// `bench billing`); two pairs with one hash only share a lane, which delays, never reorders.
fn lane(entry: &Entry) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    entry.customer_id.hash(&mut hasher);
    entry.feature.hash(&mut hasher);
    hasher.finish()
}

/// Runs until shutdown. `incoming` brings entries owed after start (and dead letters put back).
pub async fn run(
    outbox: Arc<Mutex<Outbox>>,
    sink: Sink,
    pace: Pace,
    mut incoming: mpsc::UnboundedReceiver<Vec<Entry>>,
    stats: Arc<Mutex<DeliveryStats>>,
    mut shutdown: Shutdown,
) {
    let mut queue: VecDeque<Entry> = outbox
        .lock()
        .map(|o| o.pending().into())
        .unwrap_or_default();
    let mut queued: HashSet<String> = queue.iter().map(|e| e.identifier.clone()).collect();
    // Customer-and-meter pairs with a call in flight, by their hash (see `lane`).
    let mut busy: HashSet<u64> = HashSet::new();
    let mut waits: HashMap<String, (u32, Instant)> = HashMap::new();
    let mut tasks: JoinSet<(Entry, Outcome)> = JoinSet::new();
    let interval = Duration::from_secs(1) / pace.rate_limit.max(1);
    let mut next_slot = Instant::now();
    loop {
        let now = Instant::now();
        let mut wake_at: Option<Instant> = None;
        let mut blocked: HashSet<u64> = HashSet::new();
        let mut i = 0;
        while tasks.len() < pace.concurrency && i < queue.len() {
            let key = lane(&queue[i]);
            if busy.contains(&key) || blocked.contains(&key) {
                i += 1;
                continue;
            }
            if let Some((_, at)) = waits.get(&queue[i].identifier)
                && *at > now
            {
                wake_at = Some(wake_at.map_or(*at, |w| w.min(*at)));
                blocked.insert(key);
                i += 1;
                continue;
            }
            if next_slot > now {
                wake_at = Some(wake_at.map_or(next_slot, |w| w.min(next_slot)));
                break;
            }
            next_slot = next_slot.max(now) + interval;
            let Some(entry) = queue.remove(i) else { break };
            busy.insert(key);
            if let Ok(mut stats) = stats.lock() {
                stats.attempts += 1;
            }
            let sink = sink.clone();
            tasks.spawn(async move {
                let outcome = sink.deliver(&entry).await;
                (entry, outcome)
            });
        }
        let sleep = tokio::time::sleep_until(wake_at.unwrap_or(now + Duration::from_secs(3600)));
        tokio::select! {
            biased;
            () = wait_for_stop(&mut shutdown) => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((entry, outcome)) = done else { continue };
                busy.remove(&lane(&entry));
                settle(&outbox, &stats, &mut queue, &mut queued, &mut waits, &pace, entry, outcome);
            }
            more = incoming.recv() => match more {
                Some(entries) => {
                    for entry in entries {
                        if queued.insert(entry.identifier.clone()) {
                            queue.push_back(entry);
                        }
                    }
                }
                None => break,
            },
            () = sleep => {}
        }
    }
    // Calls in flight finish or time out; what they said is recorded if they answer in time,
    // else the entry is still owed and is sent again (same identifier) after restart.
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    while !tasks.is_empty() {
        tokio::select! {
            Some(Ok((entry, outcome))) = tasks.join_next() => {
                settle(&outbox, &stats, &mut queue, &mut queued, &mut waits, &pace, entry, outcome);
            }
            () = &mut deadline => break,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn settle(
    outbox: &Mutex<Outbox>,
    stats: &Mutex<DeliveryStats>,
    queue: &mut VecDeque<Entry>,
    queued: &mut HashSet<String>,
    waits: &mut HashMap<String, (u32, Instant)>,
    pace: &Pace,
    entry: Entry,
    outcome: Outcome,
) {
    let now = system_micros();
    match outcome {
        Outcome::Delivered => {
            queued.remove(&entry.identifier);
            waits.remove(&entry.identifier);
            if let Ok(mut stats) = stats.lock() {
                stats.delivered += 1;
            }
            if let Ok(mut outbox) = outbox.lock()
                && let Err(error) = outbox.delivered(&entry.identifier, now)
            {
                tracing::error!(%error, identifier = %entry.identifier, "could not record a delivery; it will be sent again (same identifier)");
            }
        }
        Outcome::Retry { after, reason } => {
            let attempt = waits.get(&entry.identifier).map_or(1, |(n, _)| n + 1);
            let delay = match after {
                Some(after) => after + Duration::from_millis(fastrand::u64(0..50)),
                None => backoff(attempt, pace.retry_base, pace.retry_max),
            };
            if attempt.is_multiple_of(10) {
                tracing::warn!(identifier = %entry.identifier, attempt, %reason, "billing provider still failing; retrying");
            } else {
                tracing::debug!(identifier = %entry.identifier, attempt, ?delay, %reason, "billing call failed; retrying");
            }
            if let Ok(mut stats) = stats.lock() {
                stats.retries += 1;
                stats.last_error = Some(reason);
            }
            waits.insert(entry.identifier.clone(), (attempt, Instant::now() + delay));
            // Oldest of its customer and meter: back to the front, order kept.
            queue.push_front(entry);
        }
        Outcome::Rejected { status, message } => {
            queued.remove(&entry.identifier);
            waits.remove(&entry.identifier);
            tracing::error!(identifier = %entry.identifier, status, %message, "billing provider refused a report; parked as a dead letter");
            if let Ok(mut outbox) = outbox.lock()
                && let Err(error) = outbox.dead(&entry.identifier, Some(status), &message, now)
            {
                tracing::error!(%error, "could not park a dead letter");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for _ in 0..100 {
            let first = backoff(1, base, max);
            assert!(first >= Duration::from_millis(50) && first <= base);
            let third = backoff(3, base, max);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            assert!(backoff(30, base, max) <= max);
        }
    }
}
