//! Admission by backlog: ingest sheds while the stream's readers are too far behind.
//!
//! Ingest acks as fast as JetStream stores; the followers (the meter behind the limits API)
//! and the events archiver (behind SQL) digest more slowly under a flood. Without a bound
//! their lag grows for as long as the load lasts, and a customer past a hard limit stays
//! allowed for that long. So each request first compares the last events-stream sequence
//! ingest was acked with where the readers are; past `ingest.maxLag` (followers) or
//! `ingest.maxArchiveLag` (archive) it answers 503 `overloaded` with `Retry-After`, before
//! anything is decoded or stored. Nothing acked is affected: shedding only refuses new work.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Where a stream reader is: the last events-stream sequence it has taken in.
pub(crate) type Position = Box<dyn Fn() -> u64 + Send + Sync>;

/// The readers ingest waits for.
pub struct Readers {
    /// The followers' position (the meter's applied sequence).
    pub followers: Position,
    /// The followers' saved position (the least sequence their finished snapshots hold):
    /// what a restart would read the stream again from.
    pub followers_saved: Position,
    /// The events archiver's last committed sequence.
    pub archive: Position,
}

/// A reader too far behind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "northstar is {lag} {unit} behind in the {reader} (bound {bound}, {setting}); retry shortly"
)]
pub struct Behind {
    /// `followers` or `archive`.
    pub reader: &'static str,
    /// The setting that bounds it (`ingest.maxLag`, …).
    pub setting: &'static str,
    /// How far the reader is behind: events acked that it has not taken in, or seconds.
    pub lag: u64,
    /// The lag at which the reader holds up ingest, in `unit`s.
    pub bound: u64,
    /// `events`, or `seconds` for the age of the oldest message not saved.
    pub unit: &'static str,
}

/// The last acked sequence, the readers and the bounds.
pub struct Backlog {
    acked: AtomicU64,
    max_followers: u64,
    max_archive: u64,
    readers: std::sync::OnceLock<Readers>,
    shedding: AtomicBool,
    /// The events stream's size bound in bytes (0: none): retention drops the oldest messages
    /// past it, so a reader must stay well inside what fits.
    max_bytes: AtomicU64,
    /// Messages and bytes the events stream held at the last reading (0 until read).
    held: AtomicU64,
    held_bytes: AtomicU64,
    /// Events and bytes of requests admitted and not yet acked (see [`Backlog::reserve`]).
    in_flight: AtomicU64,
    in_flight_bytes: AtomicU64,
    /// The events stream's age bound in seconds (0: none): nats-server drops older messages.
    max_age: AtomicU64,
    /// When the last sequences were acked: (seconds, last acked), one sample per
    /// [`Backlog::sample`] interval, oldest first, at most [`AGE_SAMPLES`].
    acked_at: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// Age in seconds of the oldest message some reader has not saved, as of the last sample.
    unsaved_age: AtomicU64,
    /// The rejected stream's retention (its one reader is the rejected archiver).
    rejected: RejectedRetention,
}

/// Retention of the `REJECTED` stream: its archiver must save a message before the stream's
/// size bound drops it, as for the events stream. Past 80% of the bound in bytes not yet in
/// Parquet, ingest sheds.
#[derive(Default)]
struct RejectedRetention {
    acked: AtomicU64,
    archived: std::sync::OnceLock<Position>,
    max_bytes: AtomicU64,
    held: AtomicU64,
    held_bytes: AtomicU64,
}

/// Samples kept of when sequences were acked: they span the age bound at a resolution of a
/// two-hundredth of it.
const AGE_SAMPLES: usize = 256;

/// A request's share of the backlog while it is published; given back when dropped (after
/// the publish's acks were recorded).
#[must_use = "the reservation holds until dropped"]
pub struct Reservation<'a> {
    backlog: &'a Backlog,
    events: u64,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.backlog
            .in_flight
            .fetch_sub(self.events, Ordering::Relaxed);
        self.backlog
            .in_flight_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Share of the stream's size bound a reader may be behind before retention could drop what
/// it has not read (in tenths): past it ingest sheds, so the oldest messages go only once read.
const RETENTION_TENTHS: u64 = 8;

/// Size of a stream message assumed until the stream holds some (a conservative guess: the
/// typical event is about 400 bytes).
const ASSUMED_MESSAGE_BYTES: u64 = 2048;

impl Backlog {
    /// Bounds in events; 0 turns a bound off.
    pub fn new(max_followers: u64, max_archive: u64) -> Self {
        Self {
            acked: AtomicU64::new(0),
            max_followers,
            max_archive,
            readers: std::sync::OnceLock::new(),
            shedding: AtomicBool::new(false),
            max_bytes: AtomicU64::new(0),
            held: AtomicU64::new(0),
            held_bytes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            in_flight_bytes: AtomicU64::new(0),
            max_age: AtomicU64::new(0),
            acked_at: std::sync::Mutex::new(std::collections::VecDeque::new()),
            unsaved_age: AtomicU64::new(0),
            rejected: RejectedRetention::default(),
        }
    }

    /// Sets the readers once they exist (they start after ingest is built). Until then,
    /// nothing is shed.
    pub fn watch(&self, readers: Readers) {
        let _ = self.readers.set(readers);
    }

    /// Records an ack of the events stream.
    pub fn acked(&self, seq: u64) {
        self.acked.fetch_max(seq, Ordering::Relaxed);
    }

    /// Sets the events stream's size bound (`-1`: none).
    pub fn retain(&self, max_bytes: i64) {
        self.max_bytes
            .store(u64::try_from(max_bytes).unwrap_or(0), Ordering::Relaxed);
    }

    /// Sets the rejected archiver's position once it exists.
    pub fn watch_rejected(&self, archived: Position) {
        let _ = self.rejected.archived.set(archived);
    }

    /// Records an ack of the rejected stream.
    pub fn rejected_acked(&self, seq: u64) {
        self.rejected.acked.fetch_max(seq, Ordering::Relaxed);
    }

    /// Sets the rejected stream's size bound (`-1`: none) and records what it holds.
    pub fn rejected_held(&self, max_bytes: i64, messages: u64, bytes: u64) {
        let rejected = &self.rejected;
        rejected
            .max_bytes
            .store(u64::try_from(max_bytes).unwrap_or(0), Ordering::Relaxed);
        rejected.held.store(messages, Ordering::Relaxed);
        rejected.held_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Sets the events stream's age bound (`ZERO`: none).
    pub fn retain_for(&self, max_age: std::time::Duration) {
        self.max_age.store(max_age.as_secs(), Ordering::Relaxed);
    }

    /// Notes, at `now` (seconds), what is acked so far, and works out how old the oldest
    /// message is that some reader has not saved: nats-server drops messages past
    /// `stream.maxAge` whether or not they were read. Called every half second.
    pub fn sample(&self, now: u64) {
        let max_age = self.max_age.load(Ordering::Relaxed);
        if max_age == 0 {
            return;
        }
        let acked = self.acked.load(Ordering::Relaxed);
        let mut samples = self
            .acked_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let every = (max_age / 200).max(1);
        if samples.back().is_none_or(|(at, _)| at + every <= now) {
            samples.push_back((now, acked));
            if samples.len() > AGE_SAMPLES {
                samples.pop_front();
            }
        }
        let Some(saved) = self.saved() else {
            return;
        };
        // The oldest unsaved message was acked after the last sample that held only saved
        // ones; its age is at most the time since then.
        let age = match samples.iter().position(|(_, seq)| *seq > saved) {
            None => 0,
            Some(0) => samples.front().map_or(0, |(at, _)| now.saturating_sub(*at)),
            Some(i) => now.saturating_sub(samples[i - 1].0),
        };
        self.unsaved_age.store(age, Ordering::Relaxed);
    }

    /// The least position the readers have saved (a restart reads the stream from there).
    fn saved(&self) -> Option<u64> {
        let readers = self.readers.get()?;
        Some((readers.followers_saved)().min((readers.archive)()))
    }

    /// Records what the events stream holds (read from its info).
    pub fn held(&self, messages: u64, bytes: u64) {
        self.held.store(messages, Ordering::Relaxed);
        self.held_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Events acked but not yet taken in: (followers, archive).
    pub fn lags(&self) -> (u64, u64) {
        let Some(readers) = self.readers.get() else {
            return (0, 0);
        };
        let acked = self.acked.load(Ordering::Relaxed);
        (
            acked.saturating_sub((readers.followers)()),
            acked.saturating_sub((readers.archive)()),
        )
    }

    /// Events acked that some reader has not saved yet (what a restart would read from the
    /// stream again); `None` before the readers exist.
    pub fn unsaved(&self) -> Option<u64> {
        let saved = self.saved()?;
        Some(self.acked.load(Ordering::Relaxed).saturating_sub(saved))
    }

    /// Reserves `events` stream messages of `bytes` for a request about to publish: refused
    /// when they would take a reader past its bound, counting what the requests admitted
    /// before it will add. So the bound holds whatever the concurrency: a check taken once at
    /// the door let 1,024 requests in at a lag one below it. A request alone is always taken
    /// (the config keeps a request's worth well inside every bound).
    pub fn reserve(&self, events: u64, bytes: u64) -> Result<Reservation<'_>, Behind> {
        let before = self.in_flight.fetch_add(events, Ordering::Relaxed);
        let before_bytes = self.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed);
        let reservation = Reservation {
            backlog: self,
            events,
            bytes,
        };
        match self.judge(before + events, before_bytes + bytes) {
            Ok(()) => Ok(reservation),
            // Alone, with every reader caught up: a request larger than a bound goes.
            Err(_) if before == 0 && self.lags() == (0, 0) => Ok(reservation),
            Err(behind) => Err(behind),
        }
    }

    /// Whether a request may be taken in now; logs when shedding starts and stops.
    pub fn admit(&self) -> Result<(), Behind> {
        let verdict = self.judge(
            self.in_flight.load(Ordering::Relaxed),
            self.in_flight_bytes.load(Ordering::Relaxed),
        );
        let shedding = verdict.is_err();
        if self.shedding.swap(shedding, Ordering::Relaxed) != shedding {
            let (followers, archive) = self.lags();
            match &verdict {
                Err(behind) => tracing::warn!(
                    reader = behind.reader,
                    lag = behind.lag,
                    bound = behind.bound,
                    "ingest sheds: a reader of the stream is too far behind"
                ),
                Ok(()) => tracing::info!(
                    followers_lag = followers,
                    archive_lag = archive,
                    "ingest takes requests again: the readers are within their bounds"
                ),
            }
        }
        verdict
    }

    /// The verdict with `pending` events (`pending_bytes` bytes) on their way on top of what
    /// is acked.
    fn judge(&self, pending: u64, pending_bytes: u64) -> Result<(), Behind> {
        let (followers, archive) = self.lags();
        let (followers, archive) = (followers + pending, archive + pending);
        if self.max_followers > 0 && followers > self.max_followers {
            Err(Behind {
                reader: "followers",
                setting: "ingest.maxLag",
                lag: followers,
                bound: self.max_followers,
                unit: "events",
            })
        } else if self.max_archive > 0 && archive > self.max_archive {
            Err(Behind {
                reader: "archive",
                setting: "ingest.maxArchiveLag",
                lag: archive,
                bound: self.max_archive,
                unit: "events",
            })
        } else if let Some(behind) = self.near_retention(archive, pending, pending_bytes) {
            Err(behind)
        } else if let Some(behind) = self.near_max_age() {
            Err(behind)
        } else if let Some(behind) = self.rejected.near_retention() {
            Err(behind)
        } else {
            Ok(())
        }
    }
}

impl Backlog {
    /// The oldest message some reader has not saved is past 80% of `stream.maxAge`: soon
    /// nats-server drops it unread. Shedding gives the reader the stream to itself.
    fn near_max_age(&self) -> Option<Behind> {
        let max_age = self.max_age.load(Ordering::Relaxed);
        let age = self.unsaved_age.load(Ordering::Relaxed);
        let bound = max_age / 10 * RETENTION_TENTHS;
        (max_age > 0 && age > bound).then_some(Behind {
            reader: "stream's readers",
            setting: "stream.maxAge",
            lag: age,
            bound,
            unit: "seconds",
        })
    }

    /// A reader so far behind that the stream's size bound would soon drop messages it has
    /// not read: past 80% of the messages that fit in `stream.maxBytes` at their mean size.
    fn near_retention(&self, archive: u64, pending: u64, pending_bytes: u64) -> Option<Behind> {
        let max_bytes = self.max_bytes.load(Ordering::Relaxed);
        let readers = self.readers.get()?;
        if max_bytes == 0 {
            return None;
        }
        let followers = self
            .acked
            .load(Ordering::Relaxed)
            .saturating_sub((readers.followers_saved)())
            + pending;
        let mean = mean_size(&self.held, &self.held_bytes);
        let bound = max_bytes / mean * RETENTION_TENTHS / 10;
        let (reader, lag) = if followers >= archive {
            ("followers", followers)
        } else {
            ("archive", archive)
        };
        // Messages acked are counted at the stream's mean size, those on their way at their
        // own: the bytes no reader has saved must stay within 80% of the bound.
        let unsaved = lag
            .saturating_sub(pending)
            .saturating_mul(mean)
            .saturating_add(pending_bytes);
        (unsaved > max_bytes / 10 * RETENTION_TENTHS).then_some(Behind {
            reader,
            setting: "stream.maxBytes",
            lag,
            bound,
            unit: "events",
        })
    }
}

/// The mean size of a stream's messages from what it holds, or an assumed size while it holds
/// none.
fn mean_size(held: &AtomicU64, held_bytes: &AtomicU64) -> u64 {
    match held.load(Ordering::Relaxed) {
        0 => ASSUMED_MESSAGE_BYTES,
        held => (held_bytes.load(Ordering::Relaxed) / held).max(1),
    }
}

impl RejectedRetention {
    /// The rejected archiver so far behind that the stream's size bound would soon drop what
    /// it has not saved.
    fn near_retention(&self) -> Option<Behind> {
        let max_bytes = self.max_bytes.load(Ordering::Relaxed);
        let archived = self.archived.get()?;
        if max_bytes == 0 {
            return None;
        }
        let lag = self
            .acked
            .load(Ordering::Relaxed)
            .saturating_sub(archived());
        let mean = mean_size(&self.held, &self.held_bytes);
        let bound = max_bytes / mean * RETENTION_TENTHS / 10;
        (lag.saturating_mul(mean) > max_bytes / 10 * RETENTION_TENTHS).then_some(Behind {
            reader: "rejected archive",
            setting: "stream.rejectedMaxBytes",
            lag,
            bound,
            unit: "messages",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn at(position: &Arc<AtomicU64>) -> Position {
        let position = position.clone();
        Box::new(move || position.load(Ordering::Relaxed))
    }

    #[test]
    fn sheds_past_either_bound_and_takes_requests_again_when_the_readers_catch_up() {
        let backlog = Backlog::new(100, 1_000);
        backlog.acked(5_000);
        assert_eq!(backlog.admit(), Ok(()), "no readers yet: nothing is shed");
        let (followers, archive) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let saved = Arc::new(AtomicU64::new(u64::MAX));
        backlog.watch(Readers {
            followers: at(&followers),
            followers_saved: at(&saved),
            archive: at(&archive),
        });
        let behind = backlog.admit().unwrap_err();
        assert_eq!(
            (behind.reader, behind.lag, behind.bound),
            ("followers", 5_000, 100)
        );
        assert!(behind.to_string().contains("ingest.maxLag"), "{behind}");
        followers.store(4_900, Ordering::Relaxed);
        let behind = backlog.admit().unwrap_err();
        assert_eq!((behind.reader, behind.lag), ("archive", 5_000));
        archive.store(4_000, Ordering::Relaxed);
        assert_eq!(backlog.admit(), Ok(()), "at the bounds exactly: taken in");
        backlog.acked(4_200);
        assert_eq!(backlog.lags(), (100, 1_000), "acks only move forward");
        assert_eq!(Backlog::new(0, 0).admit(), Ok(()), "0 turns the bounds off");
        backlog.retain(1_000 * 400);
        backlog.held(500, 500 * 400);
        let behind = backlog.admit().unwrap_err();
        assert_eq!(
            (behind.reader, behind.lag, behind.bound),
            ("archive", 1_000, 800),
            "1,000 messages of 400 bytes fit: retention would drop what the archive has not read"
        );
        archive.store(4_250, Ordering::Relaxed);
        assert_eq!(backlog.admit(), Ok(()));
        backlog.held(0, 0);
        assert_eq!(
            backlog.admit().unwrap_err().bound,
            156,
            "an empty stream: messages are taken to be 2 KiB"
        );
        archive.store(5_000, Ordering::Relaxed);
        saved.store(4_000, Ordering::Relaxed);
        let behind = backlog.admit().unwrap_err();
        assert_eq!(
            (behind.reader, behind.lag),
            ("followers", 1_000),
            "a restart would read from the followers' last snapshot"
        );
        backlog.retain(-1);
        assert_eq!(backlog.admit(), Ok(()), "no size bound: no retention risk");
    }

    /// Requests admitted at once count against the bound before their acks: the door's
    /// check at a lag one below the bound used to let every request in flight through.
    #[test]
    fn requests_in_flight_count_against_the_bounds() {
        let backlog = Backlog::new(100, 0);
        let (followers, archive) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let saved = Arc::new(AtomicU64::new(u64::MAX));
        backlog.watch(Readers {
            followers: at(&followers),
            followers_saved: at(&saved),
            archive: at(&archive),
        });
        backlog.acked(90);
        let first = backlog.reserve(5, 500).expect("95 of 100");
        assert!(
            backlog.reserve(10, 1_000).is_err(),
            "105 would pass the bound"
        );
        assert!(
            backlog.admit().is_ok(),
            "95 in all: the door still lets requests in"
        );
        drop(first);
        let second = backlog.reserve(10, 1_000).expect("100 of 100");
        drop(second);
        followers.store(90, Ordering::Relaxed);
        archive.store(90, Ordering::Relaxed);
        assert!(
            backlog.reserve(500, 50_000).is_ok(),
            "alone, with the readers caught up, a request larger than a bound goes"
        );

        // Retention in bytes: 80% of 10,000 bytes, with 6,000 acked and unsaved.
        let bytes = Backlog::new(0, 0);
        let archived = Arc::new(AtomicU64::new(0));
        bytes.watch(Readers {
            followers: at(&archived),
            followers_saved: at(&saved),
            archive: at(&archived),
        });
        bytes.retain(10_000);
        bytes.held(60, 6_000);
        bytes.acked(60);
        let held = bytes.reserve(10, 1_500).expect("7,500 of 8,000 bytes");
        assert!(
            bytes.reserve(10, 1_000).is_err(),
            "8,500 bytes would not be saved in time"
        );
        drop(held);
    }

    /// nats-server drops messages past `stream.maxAge` whether read or not: a reader whose
    /// oldest unsaved message nears that age makes ingest shed (the 503 named maxAge, and
    /// nothing checked it).
    #[test]
    fn an_unsaved_message_near_the_age_bound_sheds() {
        let backlog = Backlog::new(0, 0);
        let (followers, saved) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(10)));
        let archive = Arc::new(AtomicU64::new(10));
        backlog.watch(Readers {
            followers: at(&followers),
            followers_saved: at(&saved),
            archive: at(&archive),
        });
        backlog.retain_for(std::time::Duration::from_secs(1_000));
        backlog.acked(10);
        backlog.sample(0);
        backlog.acked(20);
        backlog.sample(5);
        backlog.sample(700);
        assert!(backlog.admit().is_ok(), "700 s of 1,000: within 80%");
        backlog.sample(850);
        let behind = backlog.admit().unwrap_err();
        assert_eq!(
            (behind.setting, behind.lag, behind.bound),
            ("stream.maxAge", 850, 800)
        );
        assert!(
            behind.to_string().contains("850 seconds behind"),
            "{behind}"
        );
        saved.store(20, Ordering::Relaxed);
        archive.store(20, Ordering::Relaxed);
        backlog.sample(860);
        assert!(backlog.admit().is_ok(), "everything saved: nothing to lose");
    }

    /// The rejected stream had no guard: a flood of bad messages could drop rejected ones the
    /// archiver had not saved.
    #[test]
    fn the_rejected_stream_is_guarded_like_the_events_stream() {
        let backlog = Backlog::new(0, 0);
        let archived = Arc::new(AtomicU64::new(0));
        backlog.watch(Readers {
            followers: at(&archived),
            followers_saved: at(&archived),
            archive: at(&archived),
        });
        backlog.watch_rejected(at(&archived));
        backlog.rejected_held(100_000, 100, 50_000);
        backlog.rejected_acked(100);
        assert!(backlog.admit().is_ok(), "50,000 of 80,000 bytes");
        backlog.rejected_acked(200);
        let behind = backlog.admit().unwrap_err();
        assert_eq!(
            (behind.reader, behind.setting),
            ("rejected archive", "stream.rejectedMaxBytes")
        );
        archived.store(150, Ordering::Relaxed);
        assert!(backlog.admit().is_ok(), "the archiver caught up");
    }
}
