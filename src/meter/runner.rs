//! The meter's stream follower: applies every event in stream order, snapshots the counters,
//! and resumes after a restart (kill -9 included) from the snapshot plus a replay of the rest
//! (see [`crate::bus::follower`] for how the position is kept).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use tokio::task::JoinHandle;

use super::Meter;
use super::snapshot;
use crate::bus::BusError;
use crate::bus::follower::{Follow, Part, Saved};
use crate::event::EventView;

/// Where the meter reads from and keeps its snapshot.
pub(crate) struct MeterTarget {
    /// The events stream.
    pub stream: String,
    /// Directory of the snapshot (`data/meter`).
    pub dir: PathBuf,
    /// How often to snapshot.
    pub snapshot_interval: Duration,
}

/// Loads the snapshot and returns the meter's part of the stream followers. A snapshot of
/// another stream (deleted and made anew) is set aside: the meter is rebuilt from the stream,
/// which is its source.
pub(crate) async fn prepare(
    meter: Arc<Meter>,
    js: &jetstream::Context,
    target: MeterTarget,
) -> Result<Part, BusError> {
    let info = stream_info(js, &target.stream).await?;
    let created = crate::bus::streams::incarnation(&info);
    let restored = match snapshot::load(&target.dir, meter.counters(), meter.feature_ids()) {
        Ok(restored)
            if restored
                .stream_created
                .as_deref()
                .is_none_or(|c| crate::bus::streams::same_incarnation(c, &created))
                && restored.resume_after() <= info.state.last_sequence =>
        {
            restored
        }
        Ok(_) => {
            tracing::warn!(
                "the meter snapshot belongs to another stream; rebuilding usage from the stream"
            );
            set_aside(&target.dir);
            meter.counters().reset();
            snapshot::Restored::default()
        }
        Err(error) => {
            tracing::warn!(%error, "unreadable meter snapshot; rebuilding usage from the stream");
            set_aside(&target.dir);
            meter.counters().reset();
            snapshot::Restored::default()
        }
    };
    let resume = restored.resume_after();
    meter.counters().set_applied(resume);
    tracing::info!(resume_after = resume, "meter resuming");
    let follower = MeterFollower {
        meter,
        dir: target.dir.clone(),
        stream: target.stream.clone(),
        created,
        snapshotting: Arc::new(AtomicBool::new(false)),
        saved: Arc::new(std::sync::atomic::AtomicU64::new(resume)),
    };
    Ok(Part::new(follower, resume, target.snapshot_interval))
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

/// The meter as a stream follower.
struct MeterFollower {
    meter: Arc<Meter>,
    dir: PathBuf,
    stream: String,
    created: String,
    snapshotting: Arc<AtomicBool>,
    saved: Saved,
}

impl Follow for MeterFollower {
    fn name(&self) -> &'static str {
        "meter"
    }

    fn apply(&mut self, seq: u64, event: Option<&EventView<'_>>) {
        match event {
            Some(view) => self.meter.apply(seq, view),
            None => self.meter.counters().set_applied(seq),
        }
    }

    /// Shards are copied under their own locks while the consumer goes on (see
    /// [`snapshot`]), so the snapshot is written on a blocking thread; one at a time.
    fn snapshot(&mut self) {
        if self.snapshotting.swap(true, Ordering::SeqCst) {
            return;
        }
        let (meter, dir, stream, created, flag) = (
            self.meter.clone(),
            self.dir.clone(),
            self.stream.clone(),
            self.created.clone(),
            self.snapshotting.clone(),
        );
        let saved = self.saved.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(seq) = write_snapshot(&meter, &dir, &stream, &created) {
                saved.fetch_max(seq, Ordering::SeqCst);
            }
            flag.store(false, Ordering::SeqCst);
        });
    }

    fn final_snapshot(&mut self) -> JoinHandle<()> {
        let (meter, dir, stream, created, flag) = (
            self.meter.clone(),
            self.dir.clone(),
            self.stream.clone(),
            self.created.clone(),
            self.snapshotting.clone(),
        );
        let saved = self.saved.clone();
        tokio::spawn(async move {
            while flag.swap(true, Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if let Ok(Some(seq)) =
                tokio::task::spawn_blocking(move || write_snapshot(&meter, &dir, &stream, &created))
                    .await
            {
                saved.fetch_max(seq, Ordering::SeqCst);
            }
        })
    }

    fn saved(&self) -> Saved {
        self.saved.clone()
    }
}

/// Writes a snapshot; returns the sequence a restart resumes after, when it was written.
fn write_snapshot(
    meter: &Meter,
    dir: &std::path::Path,
    stream: &str,
    created: &str,
) -> Option<u64> {
    let started = std::time::Instant::now();
    match snapshot::write(
        dir,
        meter.counters(),
        meter.feature_ids(),
        stream,
        Some(created),
    ) {
        Ok(seq) => {
            tracing::debug!(seq, took = ?started.elapsed(), "meter snapshot written");
            Some(seq)
        }
        Err(error) => {
            tracing::error!(%error, "meter snapshot failed; the next one retries");
            None
        }
    }
}
