//! The archiver: the stream's columnar copy, every message in Parquet exactly once.
//!
//! - [`format`]: how a stream message becomes a row (events, rejected messages);
//! - [`commit`]: the on-disk commit protocol and crash recovery;
//! - [`manifest`]: the committed stream position, the archive's only progress record;
//! - [`live`]: the rows taken but not yet committed, as SQL sees them;
//! - [`compact`]: merging a day's small files;
//! - `erase`: a person's rows taken out of the files that hold them (an erasure).
//!
//! The loop buffers rows per date partition and commits when `maxRowsPerCommit` rows are
//! buffered or the oldest has waited `commitInterval`. A commit runs on a blocking thread while
//! the next one fills (at most one in flight, so manifests advance in order); when it is
//! durable the stream is acked up to its last sequence (AckAll). Every [`live::SEAL_EVERY`]
//! the buffer is sealed into record batches that SQL reads beside the committed files, so a
//! query need not wait for a commit.

pub mod commit;
pub mod compact;
pub(crate) mod erase;
pub mod format;
pub mod live;
pub mod manifest;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bus::streams::{DurableSpec, durable_consumer, pull_messages, sequence_of, stream_has};
use crate::config::ArchiveSettings;
use crate::metrics::ArchiveMetrics;
use crate::shutdown::wait_for_stop;
use arrow::array::RecordBatch;
pub(crate) use format::RejectedFormat;
pub use format::{EventsFormat, TableFormat};
pub use live::LiveRows;
pub use manifest::ArchiveManifest;

/// Failures of the archiver. All are ours (disk, stream); none is the user's input.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Writing a Parquet file failed.
    #[error("writing Parquet {path}: {source}")]
    WriteParquet {
        /// The file being written.
        path: PathBuf,
        /// What the Parquet writer said.
        source: parquet::errors::ParquetError,
    },
    /// Reading a Parquet file (for compaction) failed.
    #[error("reading Parquet {path}: {message}")]
    ReadParquet {
        /// The file being read.
        path: PathBuf,
        /// What the reader said.
        message: String,
    },
    /// Building or sorting Arrow data failed.
    #[error("arrow: {0}")]
    Arrow(String),
    /// A manifest or journal is unreadable.
    #[error("{path}: {message}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The stream does not match the archive (it was deleted and made anew).
    #[error("{0}")]
    StreamMismatch(String),
    /// The stream or consumer failed.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
}

/// Where one archiver reads from and writes to.
pub struct ArchiveTarget {
    /// Stream to consume.
    pub stream: String,
    /// Durable consumer name.
    pub consumer: String,
    /// Directory of the table (`data/events`).
    pub dir: PathBuf,
    /// The followers' delivery of the same stream, handed on (see [`Feed`]).
    pub feed: Option<Feed>,
    /// How long the table keeps its days (`archive.retention`); none: for ever.
    pub retention: Option<Duration>,
    /// The erasure log whose rows this table gives up (the events table's).
    pub erasures: Option<Arc<crate::erasure::Erasures>>,
}

/// Messages of the events stream as the follower loop received them, handed on after they are
/// applied, so nats-server need not deliver each event twice. The follower loop never waits
/// for the archiver: when the channel is full it drops the message, and the archiver reads
/// what it missed through its own consumer.
pub(crate) type Feed = tokio::sync::mpsc::Receiver<jetstream::Message>;

type OwnMessages = async_nats::jetstream::consumer::pull::Stream;

/// A running archiver: its committed position, and the task to await on shutdown.
pub struct ArchiverHandle {
    /// Last committed stream sequence; changes after every commit.
    pub committed: watch::Receiver<u64>,
    /// The rows taken but not yet committed, for SQL.
    pub live: Arc<LiveRows>,
    /// The archiver task; finishes after the final commit on shutdown.
    pub task: JoinHandle<()>,
}

/// Starts an archiver task for `format`. It recovers the table directory, resumes after the
/// manifest, and runs until `shutdown` turns true, committing what it holds before it exits.
/// Fails fast when the directory cannot be recovered or the stream does not match it.
pub async fn start<F: TableFormat>(
    format: F,
    js: jetstream::Context,
    target: ArchiveTarget,
    settings: ArchiveSettings,
    metrics: Arc<ArchiveMetrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<ArchiverHandle, ArchiveError> {
    std::fs::create_dir_all(&target.dir).map_err(|source| ArchiveError::Io {
        path: target.dir.clone(),
        source,
    })?;
    let (committed_tx, committed) = watch::channel(0);
    let live = LiveRows::new();
    let mut archiver = Archiver {
        live: live.clone(),
        format: Arc::new(format),
        js,
        target,
        settings,
        metrics,
        manifest: ArchiveManifest::default(),
        committed: committed_tx,
        compacting: Arc::new(AtomicBool::new(false)),
        high_water: 0,
    };
    archiver.prepare().await?;
    let task = tokio::spawn(archiver.supervise(shutdown));
    Ok(ArchiverHandle {
        committed,
        live,
        task,
    })
}

/// Checks the stream against the manifest and returns the stream's creation time. Refuses a
/// stream that was deleted and made anew under an existing archive: its sequences would
/// collide with the files already written.
async fn check_stream(
    js: &jetstream::Context,
    stream: &str,
    manifest: &ArchiveManifest,
) -> Result<String, ArchiveError> {
    let mut handle = js
        .get_stream(stream)
        .await
        .map_err(|e| crate::bus::BusError::Management {
            action: "get stream",
            message: e.to_string(),
        })?;
    let info = handle
        .info()
        .await
        .map_err(|e| crate::bus::BusError::Management {
            action: "stream info",
            message: e.to_string(),
        })?;
    let created = crate::bus::streams::incarnation(info);
    let recreated = manifest
        .stream_created
        .as_ref()
        .is_some_and(|c| !crate::bus::streams::same_incarnation(c, &created));
    if manifest.last_seq > info.state.last_sequence || recreated {
        return Err(ArchiveError::StreamMismatch(format!(
            "the archive holds stream {stream} up to sequence {} but the stream (incarnation {created}) ends at {}: \
             it was deleted and made anew. Move the table directory aside to archive the new stream.",
            manifest.last_seq, info.state.last_sequence
        )));
    }
    Ok(created)
}

struct Archiver<F: TableFormat> {
    format: Arc<F>,
    js: jetstream::Context,
    target: ArchiveTarget,
    settings: ArchiveSettings,
    metrics: Arc<ArchiveMetrics>,
    manifest: ArchiveManifest,
    committed: watch::Sender<u64>,
    live: Arc<LiveRows>,
    compacting: Arc<AtomicBool>,
    /// Highest stream sequence committed, in flight or buffered: anything at or below it that
    /// arrives again is a redelivery and is skipped.
    high_water: u64,
}

/// Sealed rows of each partition day, waiting for their commit.
type Sealed = BTreeMap<i64, Vec<RecordBatch>>;

/// Rows waiting for the next commit: sealed batches (published for SQL) and the builders
/// filling since the last seal.
struct Buffer<R> {
    partitions: format::Partitions<R>,
    sealed: Sealed,
    rows: usize,
    bytes: usize,
    first_seq: u64,
    last_seq: u64,
    opened: Option<Instant>,
    last_message: Option<jetstream::message::Acker>,
}

impl<R> Default for Buffer<R> {
    fn default() -> Self {
        Self {
            partitions: Default::default(),
            sealed: Sealed::new(),
            rows: 0,
            bytes: 0,
            first_seq: 0,
            last_seq: 0,
            opened: None,
            last_message: None,
        }
    }
}

impl<R> Buffer<R> {
    /// Whether it holds a commit's worth (`maxRowsPerCommit` or `maxBytesPerCommit`).
    fn is_full(&self, settings: &ArchiveSettings) -> bool {
        self.rows >= settings.max_rows_per_commit || self.bytes >= settings.max_bytes_per_commit
    }
}

/// Why a commit happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitCause {
    /// The buffer filled: the archiver is working through a backlog.
    Full,
    /// The oldest row waited the commit interval (or shutdown): the archiver is caught up.
    Interval,
}

/// A commit handed to a blocking thread.
struct CommitJob {
    partitions: Sealed,
    rows: usize,
    first_seq: u64,
    last_seq: u64,
    ack: Option<jetstream::message::Acker>,
    cause: CommitCause,
}

/// What a finished commit reports back.
struct CommitDone {
    manifest: ArchiveManifest,
    files: usize,
    took: Duration,
    ack: Option<jetstream::message::Acker>,
    cause: CommitCause,
}

type InFlight = JoinHandle<Result<CommitDone, ArchiveError>>;

/// Why the consume loop stopped.
enum Stop {
    /// Shutdown was asked for: commit what is held.
    Shutdown,
    /// A sequence was skipped in delivery (messages lost on a reconnect, or deleted from the
    /// stream): commit what is held, which is contiguous, and reposition after it.
    Gap { expected: u64, got: u64 },
    /// Anything else: what is held is dropped (it is not acked and comes again).
    Failed(ArchiveError),
}

impl<F: TableFormat> Archiver<F> {
    /// Brings the directory to the manifest's state and checks the stream, before every
    /// (re)start of the consume loop: a failed commit may have left files behind.
    async fn prepare(&mut self) -> Result<(), ArchiveError> {
        while self.compacting.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dir = self.target.dir.clone();
        compact::recover_compactions(&dir)?;
        let mut manifest = ArchiveManifest::load(&dir)?;
        let recovery = commit::recover(&dir, manifest.last_seq)?;
        if recovery != commit::Recovery::default() {
            tracing::warn!(
                table = self.format.dir(),
                ?recovery,
                "recovered from an interrupted commit"
            );
        }
        let created = check_stream(&self.js, &self.target.stream, &manifest).await?;
        manifest.stream = self.target.stream.clone();
        manifest.stream_created = Some(created);
        self.high_water = manifest.last_seq;
        self.metrics.last_seq.set(manifest.last_seq);
        self.committed.send_replace(manifest.last_seq);
        self.live.reset(manifest.last_seq);
        self.metrics.visible_seq.set(manifest.last_seq);
        self.manifest = manifest;
        Ok(())
    }

    /// Runs the consume loop, restarting it after stream errors, until shutdown.
    async fn supervise(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut prepared = true;
        let (mut failing, mut failed_at): (u64, u64) = (0, u64::MAX);
        let mut feed = self.target.feed.take();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let outcome = if prepared {
                self.run(&mut shutdown, feed.as_mut()).await
            } else {
                Err(None)
            };
            let pause = match outcome {
                Ok(()) => return,
                Err(Some(Stop::Gap { expected, got })) => {
                    self.metrics.repositions.inc();
                    tracing::warn!(
                        table = self.format.dir(),
                        expected,
                        got,
                        "delivery skipped sequences; repositioning"
                    );
                    Duration::ZERO
                }
                Err(Some(Stop::Failed(error))) => {
                    // A full disk fails every second until space returns: one line at the
                    // start and one a minute after, not one a second.
                    let at = *self.committed.borrow();
                    if at != failed_at {
                        (failing, failed_at) = (0, at);
                    }
                    if failing % 60 == 0 {
                        tracing::error!(table = self.format.dir(), %error, failures = failing + 1, "archiver stopped; restarting from the manifest (nothing is acked before it is in Parquet)");
                    }
                    failing += 1;
                    self.metrics.failures.inc();
                    Duration::from_secs(1)
                }
                Err(_) => Duration::from_secs(1),
            };
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = wait_for_stop(&mut shutdown) => return,
            }
            prepared = match self.prepare().await {
                Ok(()) => true,
                Err(error) => {
                    tracing::error!(table = self.format.dir(), %error, "cannot resume the archive; retrying");
                    false
                }
            };
        }
    }

    /// Records that sequences `from..to` left the stream before the archiver read them: they
    /// will never be in Parquet, which must not be silent.
    fn lost(&self, from: u64, to: u64) {
        self.metrics.lost.add(to - from);
        tracing::error!(
            table = self.format.dir(),
            from,
            to = to - 1,
            "the stream no longer holds sequences the archive has not saved (deleted, or dropped by retention); Parquet lacks them"
        );
    }

    /// One life of the consume loop. `Ok` on shutdown (everything held is committed).
    ///
    /// Messages come from the archiver's own consumer and, for the events table, from the
    /// followers' delivery handed on (`feed`). Only the next sequence is taken, from whichever
    /// brings it first. The own consumer runs from every (re)start until the feed is no
    /// further along than the archive; it is opened again when the feed skips ahead (it
    /// dropped messages while the archiver was busy).
    async fn run(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        mut feed: Option<&mut Feed>,
    ) -> Result<(), Option<Stop>> {
        let failed = |e: ArchiveError| Some(Stop::Failed(e));
        let mut own = Some(self.own_consumer().await.map_err(failed)?);
        let mut buffer: Buffer<F::Rows> = Buffer::default();
        let mut in_flight: Option<InFlight> = None;
        let interval = self.settings.commit_interval.get();
        let mut tick = tokio::time::interval(
            (interval / 4)
                .min(live::SEAL_EVERY)
                .max(Duration::from_millis(5)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = loop {
            let fed = async {
                match feed.as_mut() {
                    Some(feed) => feed.recv().await,
                    None => std::future::pending().await,
                }
            };
            let owned = async {
                match own.as_mut() {
                    Some(messages) => messages.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = wait_for_stop(shutdown) => break Stop::Shutdown,
                done = async { in_flight.as_mut().expect("guarded by the select condition").await }, if in_flight.is_some() => {
                    in_flight = None;
                    if let Err(e) = self.finish_commit(done).await {
                        break Stop::Failed(e);
                    }
                    // What filled meanwhile may be due already.
                    if let Err(e) = self.commit_if_due(&mut buffer, &mut in_flight).await {
                        break Stop::Failed(e);
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.seal(&mut buffer) {
                        break Stop::Failed(e);
                    }
                    // An erasure waits for the maintenance run after a commit; on an idle
                    // stream no commit comes, so it starts one.
                    let committed = *self.committed.borrow();
                    if self
                        .target
                        .erasures
                        .as_ref()
                        .is_some_and(|e| e.due_rewrite(committed).is_some())
                    {
                        self.maybe_compact(committed);
                    }
                    if let Err(e) = self.commit_if_due(&mut buffer, &mut in_flight).await {
                        break Stop::Failed(e);
                    }
                }
                Some(first) = fed => {
                    // Take what else has already arrived without another trip through select.
                    let mut next = Some(first);
                    let mut burst = 0;
                    let mut stop = None;
                    while let Some(message) = next.take() {
                        let Some(seq) = sequence_of(&message) else { continue };
                        let expected = self.high_water + 1;
                        if seq <= expected {
                            // The feed is no further along than the archive: it brings
                            // everything from here on.
                            own = None;
                        }
                        let take = if seq == expected {
                            true
                        } else if seq < expected || own.is_some() {
                            false // had it already, or the own consumer brings it
                        } else if stream_has(&self.js, &self.target.stream, expected).await {
                            // The feed dropped messages while the archiver was busy.
                            self.metrics.feed_gaps.inc();
                            match self.own_consumer().await {
                                Ok(messages) => own = Some(messages),
                                Err(e) => {
                                    stop = Some(Stop::Failed(e));
                                    break;
                                }
                            }
                            false
                        } else {
                            self.lost(expected, seq);
                            true
                        };
                        if take {
                            self.take(seq, message, false, &mut buffer);
                            if buffer.is_full(&self.settings)
                                && let Err(e) = self.commit_if_due(&mut buffer, &mut in_flight).await
                            {
                                stop = Some(Stop::Failed(e));
                                break;
                            }
                        }
                        burst += 1;
                        if burst < 1_024 {
                            next = feed.as_mut().and_then(|f| f.try_recv().ok());
                        }
                    }
                    if let Some(stop) = stop {
                        break stop;
                    }
                }
                first = owned => {
                    let mut next = Some(first);
                    let mut burst = 0;
                    let mut stop = None;
                    while let Some(message) = next.take() {
                        match message {
                            Some(Ok(message)) => {
                                let Some(seq) = sequence_of(&message) else { continue };
                                if seq <= self.high_water {
                                    continue; // a redelivery of something committed, in flight or held
                                }
                                let expected = self.high_water + 1;
                                if seq != expected {
                                    if stream_has(&self.js, &self.target.stream, expected).await {
                                        // Delivered but never received (a reconnect): with
                                        // AckAll, acking past it would lose it for good.
                                        stop = Some(Stop::Gap { expected, got: seq });
                                        break;
                                    }
                                    self.lost(expected, seq);
                                }
                                self.take(seq, message, true, &mut buffer);
                                if buffer.is_full(&self.settings)
                                    && let Err(e) = self.commit_if_due(&mut buffer, &mut in_flight).await
                                {
                                    stop = Some(Stop::Failed(e));
                                    break;
                                }
                            }
                            Some(Err(error)) => tracing::warn!(table = self.format.dir(), %error, "stream read error; continuing"),
                            None => {
                                stop = Some(Stop::Failed(crate::bus::BusError::Management { action: "consume", message: "message stream ended".into() }.into()));
                                break;
                            }
                        }
                        burst += 1;
                        if burst < 1_024 {
                            next = own.as_mut().and_then(|m| m.next().now_or_never());
                        }
                    }
                    if let Some(stop) = stop {
                        break stop;
                    }
                }
            }
        };
        match stop {
            Stop::Shutdown | Stop::Gap { .. } => {
                // What is held is contiguous after the last commit: commit it, then let the
                // last commit finish, so the manifest is as far along as it can be.
                let drained = self
                    .commit(&mut buffer, &mut in_flight, CommitCause::Interval)
                    .await;
                if let Some(job) = in_flight.take() {
                    self.finish_commit(job.await)
                        .await
                        .map_err(|e| Some(Stop::Failed(e)))?;
                }
                drained.map_err(|e| Some(Stop::Failed(e)))?;
                match stop {
                    Stop::Shutdown => Ok(()),
                    gap => Err(Some(gap)),
                }
            }
            Stop::Failed(error) => {
                // Nothing more is committed on a failure: the buffer is dropped unacked and
                // comes again after `prepare` puts the directory back to the manifest.
                if let Some(job) = in_flight.take()
                    && let Err(e) = self.finish_commit(job.await).await
                {
                    tracing::error!(table = self.format.dir(), error = %e, "commit in flight failed too");
                }
                Err(Some(Stop::Failed(error)))
            }
        }
    }

    /// Opens this archiver's own consumer, positioned after everything it holds.
    async fn own_consumer(&self) -> Result<OwnMessages, ArchiveError> {
        let spec = DurableSpec {
            stream: &self.target.stream,
            name: &self.target.consumer,
            after_seq: self.high_water,
            max_ack_pending: (self.settings.max_rows_per_commit as i64)
                .saturating_mul(4)
                .max(10_000),
            ack_wait: (self.settings.commit_interval.get() * 10).max(Duration::from_secs(120)),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::All,
        };
        let consumer = durable_consumer(&self.js, &spec).await?;
        Ok(pull_messages(&consumer).await?)
    }

    /// Starts a commit when the buffer is full or its oldest row has waited the interval,
    /// unless one is in flight: the loop keeps reading meanwhile (the feed would drop what it
    /// cannot hand on), and waits for that commit only when the buffer reaches twice the
    /// commit bounds.
    async fn commit_if_due(
        &mut self,
        buffer: &mut Buffer<F::Rows>,
        in_flight: &mut Option<InFlight>,
    ) -> Result<(), ArchiveError> {
        let (rows, bytes) = (
            self.settings.max_rows_per_commit,
            self.settings.max_bytes_per_commit,
        );
        let full = buffer.is_full(&self.settings);
        let interval = self.settings.commit_interval.get();
        let cause = if full {
            CommitCause::Full
        } else if buffer.opened.is_some_and(|t| t.elapsed() >= interval) {
            CommitCause::Interval
        } else {
            return Ok(());
        };
        let over = buffer.rows >= rows.saturating_mul(2) || buffer.bytes >= bytes.saturating_mul(2);
        if in_flight.is_none() || over {
            self.commit(buffer, in_flight, cause).await?;
        }
        Ok(())
    }

    /// Appends one stream message to the buffer. Messages of the own consumer are acked after
    /// their commit; the feed's consumer takes no acks.
    fn take(
        &mut self,
        seq: u64,
        message: jetstream::Message,
        own: bool,
        buffer: &mut Buffer<F::Rows>,
    ) {
        let (message, acker) = message.split();
        match self
            .format
            .append(seq, &message.payload, &mut buffer.partitions)
        {
            Ok(()) => {
                buffer.rows += 1;
                buffer.bytes += message.payload.len();
            }
            Err(error) => {
                self.metrics.undecodable.inc();
                tracing::error!(table = self.format.dir(), seq, %error, "undecodable stream message skipped (it stays in the stream)");
            }
        }
        if buffer.first_seq == 0 {
            buffer.first_seq = seq;
            buffer.opened = Some(Instant::now());
        }
        buffer.last_seq = seq;
        if own {
            buffer.last_message = Some(acker);
        }
        self.high_water = seq;
    }

    /// Seals what the builders hold into record batches and publishes them for SQL.
    fn seal(&self, buffer: &mut Buffer<F::Rows>) -> Result<(), ArchiveError> {
        let mut chunks = Vec::new();
        for (day, rows) in buffer.partitions.iter_mut() {
            if F::len(rows) == 0 {
                continue;
            }
            let batch = self
                .format
                .finish(rows)
                .map_err(|e| ArchiveError::Arrow(e.to_string()))?;
            chunks.push(live::Chunk {
                date: crate::event::partition_date(day * 86_400_000_000),
                batch: batch.clone(),
                last_seq: buffer.last_seq,
            });
            buffer.sealed.entry(*day).or_default().push(batch);
        }
        if !chunks.is_empty() {
            self.live.seal(chunks);
            self.metrics.visible_seq.set(buffer.last_seq);
        }
        Ok(())
    }

    /// Hands the buffer to a blocking thread, after waiting for the commit before it.
    async fn commit(
        &mut self,
        buffer: &mut Buffer<F::Rows>,
        in_flight: &mut Option<InFlight>,
        cause: CommitCause,
    ) -> Result<(), ArchiveError> {
        if buffer.first_seq == 0 {
            return Ok(());
        }
        if let Some(previous) = in_flight.take() {
            self.finish_commit(previous.await).await?;
        }
        self.seal(buffer)?;
        let taken = std::mem::take(buffer);
        let job = CommitJob {
            partitions: taken.sealed,
            rows: taken.rows,
            first_seq: taken.first_seq,
            last_seq: taken.last_seq,
            ack: taken.last_message,
            cause,
        };
        let format = self.format.clone();
        let dir = self.target.dir.clone();
        let settings = self.settings.clone();
        let manifest = self.manifest.clone();
        *in_flight = Some(tokio::task::spawn_blocking(move || {
            write_commit(format.as_ref(), &dir, &settings, manifest, job)
        }));
        Ok(())
    }

    /// Records a finished commit and acks the stream up to it.
    async fn finish_commit(
        &mut self,
        done: Result<Result<CommitDone, ArchiveError>, tokio::task::JoinError>,
    ) -> Result<(), ArchiveError> {
        let done =
            done.map_err(|e| ArchiveError::Arrow(format!("commit thread failed: {e}")))??;
        if let Some(ack) = &done.ack
            && let Err(error) = ack.ack_with(AckKind::Ack).await
        {
            // Harmless: the manifest is the truth, and a restart repositions the consumer.
            tracing::warn!(%error, "ack after commit failed");
        }
        let micros = u64::try_from(done.took.as_micros()).unwrap_or(u64::MAX);
        self.metrics.commits.inc();
        self.metrics.files.add(done.files as u64);
        self.metrics
            .rows
            .add(done.manifest.rows - self.manifest.rows);
        self.metrics.commit_micros_sum.add(micros);
        self.metrics.commit_micros_max.raise(micros);
        self.metrics.last_seq.set(done.manifest.last_seq);
        self.metrics.visible_seq.raise(done.manifest.last_seq);
        tracing::debug!(table = self.format.dir(), last_seq = done.manifest.last_seq, files = done.files, took = ?done.took, "committed");
        let last_seq = done.manifest.last_seq;
        self.manifest = done.manifest;
        self.committed.send_replace(last_seq);
        self.live.committed(last_seq);
        // Compaction waits while a backlog is worked through: it would take the CPU that
        // catching up needs, and backlog commits are large files anyway.
        if done.cause == CommitCause::Interval {
            self.maybe_compact(last_seq);
        }
        Ok(())
    }

    /// Starts a compaction of the partition with the most small committed files, if any has
    /// enough of them. Runs beside commits: it only touches committed files.
    fn maybe_compact(&self, committed_seq: u64) {
        if self.compacting.swap(true, Ordering::SeqCst) {
            return;
        }
        let format = self.format.clone();
        let dir = self.target.dir.clone();
        let settings = self.settings.clone();
        let metrics = self.metrics.clone();
        let compacting = self.compacting.clone();
        let retention = self.target.retention;
        let erasures = self.target.erasures.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(erasures) = erasures
                && let Some(job) = erasures.due_rewrite(committed_seq)
                && let Err(error) =
                    erase::rewrite(format.as_ref(), &dir, &settings, &erasures, &job)
            {
                tracing::error!(table = format.dir(), job = job.job, %error, "erasing rows failed; the next run retries");
            }
            if let Some(retention) = retention
                && let Err(error) = expire_days(format.dir(), &dir, retention, &metrics)
            {
                tracing::error!(table = format.dir(), %error, "dropping expired days failed; the next run retries");
            }
            if let Err(error) =
                compact_once(format.as_ref(), &dir, &settings, committed_seq, &metrics)
            {
                tracing::error!(table = format.dir(), %error, "compaction failed; the small files stay");
            }
            crate::heap::give_back_freed_memory();
            compacting.store(false, Ordering::SeqCst);
        });
    }
}

/// Writes a commit's files and then its manifest. Runs on a blocking thread.
fn write_commit<F: TableFormat>(
    format: &F,
    dir: &Path,
    settings: &ArchiveSettings,
    mut manifest: ArchiveManifest,
    job: CommitJob,
) -> Result<CommitDone, ArchiveError> {
    let started = Instant::now();
    let schema = format.schema();
    let name = commit::PartName {
        first_seq: job.first_seq,
        last_seq: job.last_seq,
        compacted: false,
    };
    let mut files = 0;
    for (day, batches) in job.partitions {
        if batches.iter().all(|b| b.num_rows() == 0) {
            continue;
        }
        let date = crate::event::partition_date(day * 86_400_000_000);
        let batch = arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| ArchiveError::Arrow(e.to_string()))?;
        drop(batches);
        let batch = commit::sort_batch(&batch, format.sort_columns())
            .map_err(|e| ArchiveError::Arrow(e.to_string()))?;
        let partition = commit::ensure_partition_dir(dir, &date)?;
        let properties = commit::writer_properties(
            &schema,
            format.sort_columns(),
            settings.zstd_level,
            settings.row_group_rows,
        );
        commit::write_parquet_file(
            &partition.join(name.file_name()),
            &schema,
            [&batch],
            properties,
        )?;
        files += 1;
    }
    manifest.last_seq = job.last_seq;
    manifest.rows += job.rows as u64;
    manifest.committed_at = Some(crate::clock::format_micros(crate::clock::system_micros()));
    manifest.store(dir)?;
    Ok(CommitDone {
        manifest,
        files,
        took: started.elapsed(),
        ack: job.ack,
        cause: job.cause,
    })
}

/// Drops the table's days older than `retention` (`archive.retention`): whole `date=`
/// directories whose date is before the day `retention` ago (UTC). Runs beside compaction on
/// the same thread, so the two never touch one day at once, and under the swap lock, so no
/// query of this process lists a day half gone. A crash part way leaves files of the day,
/// which the next run drops; a late event committed into a dropped day is dropped by the next
/// run too.
fn expire_days(
    table: &str,
    dir: &Path,
    retention: Duration,
    metrics: &ArchiveMetrics,
) -> Result<(), ArchiveError> {
    let retention_micros = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    let keep_from = crate::event::partition_date(
        crate::clock::system_micros().saturating_sub(retention_micros),
    );
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArchiveError::Io { path, source }
    };
    let mut expired = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(date) = name.strip_prefix("date=")
            && date < keep_from.as_str()
        {
            expired.push((date.to_string(), entry.path()));
        }
    }
    if expired.is_empty() {
        return Ok(());
    }
    let _swap = compact::SWAP_LOCK.blocking_write();
    for (date, path) in expired {
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
        metrics.expired_days.inc();
        tracing::info!(table, date, kept_from = %keep_from, "dropped a day past archive.retention");
    }
    commit::fsync_dir(dir)
}

/// Most partitions one compaction run merges, those with the most small files first.
const COMPACTIONS_PER_RUN: usize = 8;

/// Compacts the partitions with the most small committed files, if they have enough. Days
/// before yesterday (UTC) take no more events but late ones: two small files there (under a
/// sixteenth of the target, so a late trickle never rewrites a day's large file) are enough,
/// and a batch of events spread over many past days leaves a file or two per day, not one
/// per commit that touched it.
fn compact_once<F: TableFormat>(
    format: &F,
    dir: &Path,
    settings: &ArchiveSettings,
    committed_seq: u64,
    metrics: &ArchiveMetrics,
) -> Result<(), ArchiveError> {
    let parts = commit::list_parts(dir)?;
    let closed_before =
        crate::event::partition_date(crate::clock::system_micros() - 86_400_000_000);
    let mut dates: Vec<&str> = parts.iter().map(|p| p.date.as_str()).collect();
    dates.sort_unstable();
    dates.dedup();
    let mut candidates: Vec<Vec<commit::PartFile>> = dates
        .into_iter()
        .map(|date| {
            let closed = date < closed_before.as_str();
            let small = settings.compact_target_bytes / 16;
            let of_date: Vec<commit::PartFile> = parts
                .iter()
                .filter(|p| p.date == date && (!closed || p.bytes < small))
                .cloned()
                .collect();
            let min_files = if closed {
                2
            } else {
                settings.compact_min_files
            };
            compact::pick_inputs(
                &of_date,
                committed_seq,
                min_files,
                settings.compact_target_bytes,
            )
        })
        .filter(|picked| !picked.is_empty())
        .collect();
    candidates.sort_by_key(|picked| std::cmp::Reverse(picked.len()));
    let schema = format.schema();
    for inputs in candidates.into_iter().take(COMPACTIONS_PER_RUN) {
        let Some(first) = inputs.first() else {
            continue;
        };
        let partition = commit::ensure_partition_dir(dir, &first.date)?;
        let properties = commit::writer_properties(
            &schema,
            format.sort_columns(),
            settings.zstd_level,
            settings.row_group_rows,
        );
        let started = Instant::now();
        let merged = compact::compact(
            &partition,
            &inputs,
            &schema,
            format.sort_columns(),
            properties,
        )?;
        metrics.compactions.inc();
        tracing::info!(table = format.dir(), date = %merged.date, inputs = inputs.len(), bytes = merged.bytes, took = ?started.elapsed(), "compacted");
    }
    Ok(())
}
