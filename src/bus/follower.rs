//! Following the events stream in order, for state derived from it (the meter, identities).
//!
//! A follower reads every event once, in stream order, from a durable consumer that acks
//! nothing (AckPolicy None): its position lives in the follower's own snapshot, and the
//! consumer is repositioned from it on every (re)start. A delivery that skips sequences still
//! in the stream (lost in a cut connection) repositions it too, so no event is ever skipped;
//! sequences deleted from the stream are skipped as they should be.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::{FutureExt, StreamExt};
use tokio::task::JoinHandle;

use super::BusError;
use super::streams::{DurableSpec, durable_consumer, sequence_of, stream_has};
use crate::shutdown::{Shutdown, wait_for_stop};

/// State kept up to date from the stream.
pub trait Follow: Send + 'static {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// Applies one event (its stream body) in stream order.
    fn apply(&mut self, seq: u64, payload: &[u8]);
    /// Starts writing a snapshot of what is applied (up to the last `apply`); may return at once
    /// and write in the background.
    fn snapshot(&mut self);
    /// Writes a last snapshot before the process stops, and waits for it.
    fn final_snapshot(&mut self) -> JoinHandle<()>;
}

/// Where a follower reads.
pub struct FollowSpec {
    /// The events stream.
    pub stream: String,
    /// Durable consumer name.
    pub consumer: String,
    /// Sequence already applied (from the follower's snapshot).
    pub after_seq: u64,
    /// How often to snapshot.
    pub snapshot_interval: Duration,
}

/// Runs `state` on the stream until shutdown, then writes its final snapshot.
pub async fn follow<F: Follow>(
    js: jetstream::Context,
    spec: FollowSpec,
    mut state: F,
    mut shutdown: Shutdown,
) {
    let mut high_water = spec.after_seq;
    loop {
        if *shutdown.borrow() {
            break;
        }
        match run(&js, &spec, &mut state, &mut high_water, &mut shutdown).await {
            Ok(()) => break,
            Err(Stop::Gap { expected, got }) => {
                tracing::warn!(
                    follower = state.name(),
                    expected,
                    got,
                    "delivery skipped sequences; repositioning"
                );
            }
            Err(Stop::Failed(error)) => {
                tracing::error!(follower = state.name(), %error, "stream consumer stopped; restarting");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = wait_for_stop(&mut shutdown) => break,
                }
            }
        }
    }
    let _ = state.final_snapshot().await;
}

enum Stop {
    Gap { expected: u64, got: u64 },
    Failed(BusError),
}

async fn run<F: Follow>(
    js: &jetstream::Context,
    spec: &FollowSpec,
    state: &mut F,
    high_water: &mut u64,
    shutdown: &mut Shutdown,
) -> Result<(), Stop> {
    let durable = DurableSpec {
        stream: &spec.stream,
        name: &spec.consumer,
        after_seq: *high_water,
        max_ack_pending: -1,
        ack_wait: Duration::from_secs(30),
        ack_policy: consumer::AckPolicy::None,
    };
    let consumer = durable_consumer(js, &durable).await.map_err(Stop::Failed)?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1_000)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| {
            Stop::Failed(BusError::Management {
                action: "consume",
                message: e.to_string(),
            })
        })?;
    let mut tick = tokio::time::interval(spec.snapshot_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            biased;
            () = wait_for_stop(shutdown) => return Ok(()),
            _ = tick.tick() => state.snapshot(),
            first = messages.next() => {
                // Take what else has already arrived without another trip through select.
                let mut next = Some(first);
                let mut burst = 0;
                while let Some(message) = next.take() {
                    match message {
                        Some(Ok(message)) => {
                            let Some(seq) = sequence_of(&message) else { continue };
                            if seq <= *high_water {
                                continue;
                            }
                            let expected = *high_water + 1;
                            if seq != expected && stream_has(js, &spec.stream, expected).await {
                                return Err(Stop::Gap { expected, got: seq });
                            }
                            state.apply(seq, &message.payload);
                            *high_water = seq;
                        }
                        Some(Err(error)) => tracing::warn!(follower = state.name(), %error, "stream read error; continuing"),
                        None => return Err(Stop::Failed(BusError::Management { action: "consume", message: "message stream ended".into() })),
                    }
                    burst += 1;
                    if burst < 1_024 {
                        next = messages.next().now_or_never();
                    }
                }
            }
        }
    }
}
