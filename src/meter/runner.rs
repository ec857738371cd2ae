//! The meter's stream consumer: applies every event in stream order, snapshots the counters,
//! and resumes after a restart (kill -9 included) from the snapshot plus a replay of the rest.
//!
//! The consumer acks nothing (AckPolicy None): its position lives in the snapshot and in the
//! applied sequence, and the durable consumer is repositioned from them on every start. A
//! delivery that skips sequences still in the stream (lost in a cut connection) repositions it
//! too, so no event is ever skipped.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::{FutureExt, StreamExt};
use tokio::task::JoinHandle;

use super::Meter;
use super::snapshot;
use crate::bus::BusError;
use crate::bus::streams::{DurableSpec, durable_consumer, sequence_of, stream_has};
use crate::event::EventView;
use crate::shutdown::{Shutdown, wait_for_stop};

/// Where the meter reads from and keeps its snapshot.
pub struct MeterTarget {
    /// The events stream.
    pub stream: String,
    /// Durable consumer name.
    pub consumer: String,
    /// Directory of the snapshot (`data/meter`).
    pub dir: PathBuf,
    /// How often to snapshot.
    pub snapshot_interval: Duration,
}

/// Loads the snapshot and starts the consumer task. A snapshot of another stream (deleted and
/// made anew) is set aside: the meter is rebuilt from the stream, which is its source.
pub async fn start(
    meter: Arc<Meter>,
    js: jetstream::Context,
    target: MeterTarget,
    shutdown: Shutdown,
) -> Result<JoinHandle<()>, BusError> {
    let info = stream_info(&js, &target.stream).await?;
    let created = info.created.to_string();
    let restored = match snapshot::load(&target.dir, meter.counters(), meter.feature_ids()) {
        Ok(restored)
            if restored
                .stream_created
                .as_deref()
                .is_none_or(|c| c == created)
                && restored.resume_after() <= info.state.last_sequence =>
        {
            restored
        }
        Ok(_) => {
            tracing::warn!(
                "the meter snapshot belongs to another stream; rebuilding usage from the stream"
            );
            set_aside(&target.dir);
            clear(&meter);
            snapshot::Restored::default()
        }
        Err(error) => {
            tracing::warn!(%error, "unreadable meter snapshot; rebuilding usage from the stream");
            set_aside(&target.dir);
            clear(&meter);
            snapshot::Restored::default()
        }
    };
    let resume = restored.resume_after();
    meter.counters().set_applied(resume);
    tracing::info!(resume_after = resume, "meter resuming");
    let runner = Runner {
        meter,
        js,
        target,
        created,
        high_water: resume,
        snapshotting: Arc::new(AtomicBool::new(false)),
    };
    Ok(tokio::spawn(runner.supervise(shutdown)))
}

async fn stream_info(
    js: &jetstream::Context,
    stream: &str,
) -> Result<jetstream::stream::Info, BusError> {
    let management = |action: &'static str, e: &dyn std::fmt::Display| BusError::Management {
        action,
        message: e.to_string(),
    };
    let mut handle = js
        .get_stream(stream)
        .await
        .map_err(|e| management("get stream", &e))?;
    handle
        .info()
        .await
        .cloned()
        .map_err(|e| management("stream info", &e))
}

fn set_aside(dir: &std::path::Path) {
    let path = dir.join(snapshot::SNAPSHOT_FILE);
    let _ = std::fs::rename(
        &path,
        dir.join(format!("{}.set-aside", snapshot::SNAPSHOT_FILE)),
    );
}

fn clear(meter: &Meter) {
    for shard in 0..super::state::SHARDS {
        let mut guard = meter.counters().lock_shard(shard);
        guard.customers.clear();
        guard.applied_seq = 0;
    }
}

struct Runner {
    meter: Arc<Meter>,
    js: jetstream::Context,
    target: MeterTarget,
    created: String,
    high_water: u64,
    snapshotting: Arc<AtomicBool>,
}

impl Runner {
    async fn supervise(mut self, mut shutdown: Shutdown) {
        loop {
            if *shutdown.borrow() {
                break;
            }
            match self.run(&mut shutdown).await {
                Ok(()) => break,
                Err(Stop::Gap { expected, got }) => {
                    tracing::warn!(
                        expected,
                        got,
                        "meter delivery skipped sequences; repositioning"
                    );
                }
                Err(Stop::Failed(error)) => {
                    tracing::error!(%error, "meter consumer stopped; restarting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = wait_for_stop(&mut shutdown) => break,
                    }
                }
            }
        }
        self.snapshot_now().await;
    }

    async fn run(&mut self, shutdown: &mut Shutdown) -> Result<(), Stop> {
        let spec = DurableSpec {
            stream: &self.target.stream,
            name: &self.target.consumer,
            after_seq: self.high_water,
            max_ack_pending: -1,
            ack_wait: Duration::from_secs(30),
            ack_policy: consumer::AckPolicy::None,
        };
        let consumer = durable_consumer(&self.js, &spec)
            .await
            .map_err(Stop::Failed)?;
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
        let mut tick = tokio::time::interval(self.target.snapshot_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = wait_for_stop(shutdown) => return Ok(()),
                _ = tick.tick() => self.snapshot_in_background(),
                first = messages.next() => {
                    let mut next = Some(first);
                    let mut burst = 0;
                    while let Some(message) = next.take() {
                        match message {
                            Some(Ok(message)) => {
                                let Some(seq) = sequence_of(&message) else { continue };
                                if seq <= self.high_water {
                                    continue;
                                }
                                let expected = self.high_water + 1;
                                if seq != expected && stream_has(&self.js, &self.target.stream, expected).await {
                                    return Err(Stop::Gap { expected, got: seq });
                                }
                                match EventView::decode(&message.payload) {
                                    Ok(view) => self.meter.apply(seq, &view),
                                    Err(error) => {
                                        tracing::error!(seq, %error, "undecodable stream message; not metered");
                                        self.meter.counters().set_applied(seq);
                                    }
                                }
                                self.high_water = seq;
                            }
                            Some(Err(error)) => tracing::warn!(%error, "meter stream read error; continuing"),
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

    /// Starts a snapshot on a blocking thread unless one is running.
    fn snapshot_in_background(&self) {
        if self.snapshotting.swap(true, Ordering::SeqCst) {
            return;
        }
        let meter = self.meter.clone();
        let dir = self.target.dir.clone();
        let stream = self.target.stream.clone();
        let created = self.created.clone();
        let flag = self.snapshotting.clone();
        tokio::task::spawn_blocking(move || {
            write_snapshot(&meter, &dir, &stream, &created);
            flag.store(false, Ordering::SeqCst);
        });
    }

    /// A final snapshot (on shutdown), after any running one.
    async fn snapshot_now(&self) {
        while self.snapshotting.swap(true, Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (meter, dir, stream, created) = (
            self.meter.clone(),
            self.target.dir.clone(),
            self.target.stream.clone(),
            self.created.clone(),
        );
        let _ =
            tokio::task::spawn_blocking(move || write_snapshot(&meter, &dir, &stream, &created))
                .await;
        self.snapshotting.store(false, Ordering::SeqCst);
    }
}

fn write_snapshot(meter: &Meter, dir: &std::path::Path, stream: &str, created: &str) {
    let started = std::time::Instant::now();
    match snapshot::write(
        dir,
        meter.counters(),
        meter.feature_ids(),
        stream,
        Some(created),
    ) {
        Ok(seq) => tracing::debug!(seq, took = ?started.elapsed(), "meter snapshot written"),
        Err(error) => tracing::error!(%error, "meter snapshot failed; the next one retries"),
    }
}

enum Stop {
    Gap { expected: u64, got: u64 },
    Failed(BusError),
}
