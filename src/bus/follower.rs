//! Following the events stream in order, for state derived from it (the meter, identities,
//! onboarding, billing windows).
//!
//! All of them share one consumer through a [`Fanout`]: each event crosses from nats-server
//! and is decoded once, then applied to every part in turn. Each part keeps its own position
//! (an event it already has is not applied again) and its own snapshot cadence.
//!
//! A follower reads every event once, in stream order, from a durable consumer that acks
//! nothing (AckPolicy None): its position lives in the follower's own snapshot, and the
//! consumer is repositioned from it on every (re)start. A delivery that skips sequences still
//! in the stream (lost in a cut connection) repositions it too, so no event is ever skipped;
//! sequences deleted from the stream are skipped as they should be.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use async_nats::jetstream::{self, consumer};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::BusError;
use super::streams::{DurableSpec, durable_consumer, pull_messages, sequence_of, stream_has};
use crate::erasure::Erasures;
use crate::event::EventView;
use crate::shutdown::{Shutdown, wait_for_stop};
use crate::supervise::Supervisor;

/// State kept up to date from the stream.
pub trait Follow: Send + 'static {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// Applies one event in stream order; `None` for a message that does not decode (its
    /// position still counts as applied).
    fn apply(&mut self, seq: u64, event: Option<&EventView<'_>>);
    /// Whether the event at `seq` is still to be applied (a message nobody wants is not decoded).
    fn wants(&self, seq: u64) -> bool {
        let _ = seq;
        true
    }
    /// Starts writing a snapshot of what is applied (up to the last `apply`); may return at once
    /// and write in the background.
    fn snapshot(&mut self);
    /// Writes a last snapshot before the process stops, and waits for it.
    fn final_snapshot(&mut self) -> JoinHandle<()>;
    /// The last sequence a restart would not need from the stream: what a finished snapshot
    /// holds (or state that nothing after it changed). Retention must not drop past it.
    fn saved(&self) -> Saved;
    /// Whether it keeps state about people (identity, onboarding): such a part forgets an
    /// erased person and never sees their erased events again ([`crate::erasure`]).
    fn holds_people(&self) -> bool {
        false
    }
    /// Every id of the person `id` belongs to, as this part's identity graph knows them.
    fn person_ids(&self, id: &str) -> Vec<String> {
        vec![id.to_string()]
    }
    /// Forgets everything about the person of `ids` (all of their ids).
    fn erase(&mut self, ids: &[String]) {
        let _ = ids;
    }
    /// How many sequences in `from..to` were deleted from the stream by an erasure (they are
    /// not lost: nothing should apply them).
    fn erased_between(&self, from: u64, to: u64) -> u64 {
        let _ = (from, to);
        0
    }
}

/// A follower's saved position, updated as its snapshots finish.
pub(crate) type Saved = Arc<AtomicU64>;

/// Where a follower reads.
pub(crate) struct FollowSpec {
    /// The events stream.
    pub stream: String,
    /// Durable consumer name.
    pub consumer: String,
    /// Sequence already applied (from the follower's snapshot).
    pub after_seq: u64,
    /// How often to snapshot.
    pub snapshot_interval: Duration,
    /// Counts messages gone from the stream before they were applied.
    pub lost: Arc<crate::metrics::Counter>,
}

/// Runs `state` on the stream until shutdown, then writes its final snapshot.
pub(crate) async fn follow<F: Follow>(
    js: jetstream::Context,
    spec: FollowSpec,
    mut state: F,
    mut shutdown: Shutdown,
    tee: Option<mpsc::Sender<jetstream::Message>>,
) {
    let mut high_water = spec.after_seq;
    loop {
        if *shutdown.borrow() {
            break;
        }
        match run(
            &js,
            &spec,
            &mut state,
            &mut high_water,
            &mut shutdown,
            tee.as_ref(),
        )
        .await
        {
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
    tee: Option<&mpsc::Sender<jetstream::Message>>,
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
    let mut messages = pull_messages(&consumer).await.map_err(Stop::Failed)?;
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
                            if seq != expected {
                                if stream_has(js, &spec.stream, expected).await {
                                    return Err(Stop::Gap { expected, got: seq });
                                }
                                // Messages of an erased person were deleted on purpose.
                                let lost = (seq - expected).saturating_sub(state.erased_between(expected, seq));
                                if lost > 0 {
                                    spec.lost.add(lost);
                                    tracing::error!(
                                        follower = state.name(),
                                        from = expected,
                                        to = seq - 1,
                                        "the stream no longer holds sequences this follower has not applied (deleted, or dropped by retention while it was stopped); its state lacks them"
                                    );
                                }
                            }
                            if state.wants(seq) {
                                let event = EventView::decode(&message.payload);
                                if let Err(error) = &event {
                                    tracing::error!(follower = state.name(), seq, %error, "undecodable stream message; skipped");
                                }
                                state.apply(seq, event.as_ref().ok());
                            }
                            *high_water = seq;
                            // Never waits: a message the archiver has no room for, it reads
                            // itself (`archive::Feed`).
                            if let Some(tee) = tee {
                                let _ = tee.try_send(message);
                            }
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

/// One follower of a [`Fanout`].
pub struct Part {
    saved: Saved,
    follower: Box<dyn Follow>,
    after_seq: u64,
    snapshot_interval: Duration,
    last_snapshot: Instant,
}

impl Part {
    /// `follower` has applied everything up to `after_seq` and snapshots every
    /// `snapshot_interval`.
    pub fn new(follower: impl Follow, after_seq: u64, snapshot_interval: Duration) -> Self {
        Self {
            saved: follower.saved(),
            follower: Box::new(follower),
            after_seq,
            snapshot_interval,
            last_snapshot: Instant::now(),
        }
    }
}

/// Several followers on one consumer (see the module docs). A part that panics on an event
/// is recorded with the supervisor and goes on with the next event: one poisoned message
/// never stops the stream for the others.
pub(crate) struct Fanout {
    parts: Vec<Part>,
    /// How often [`Follow::snapshot`] is called: the shortest interval of a part.
    tick: Duration,
    supervisor: Option<Arc<Supervisor>>,
    /// The erasure log, and what of it the parts have been told.
    erasures: Option<Arc<Erasures>>,
    erasures_seen: u64,
    /// Erased ids → the sequence up to which their events are erased.
    tombstones: HashMap<String, u64>,
    /// The last sequence given to [`Follow::apply`].
    position: u64,
}

impl Fanout {
    /// The followers, in the order each event is applied to them.
    pub(crate) fn new(parts: Vec<Part>) -> Self {
        let tick = parts
            .iter()
            .map(|p| p.snapshot_interval)
            .min()
            .unwrap_or(Duration::from_secs(1));
        let position = parts.iter().map(|p| p.after_seq).min().unwrap_or(0);
        Self {
            parts,
            tick,
            supervisor: None,
            erasures: None,
            erasures_seen: 0,
            tombstones: HashMap::new(),
            position,
        }
    }

    /// Honours the erasure log: the parts that hold people forget each erased person their
    /// snapshot may still hold (taken at or before the erasure's sequence), skip the erased
    /// events, and resolve the erasures asked for from now on (see [`crate::erasure`]).
    pub(crate) fn with_erasures(mut self, erasures: Arc<Erasures>) -> Self {
        for (ids, upto) in erasures.tombstones() {
            for part in &mut self.parts {
                if part.follower.holds_people() && part.after_seq <= upto {
                    part.follower.erase(&ids);
                }
            }
        }
        self.erasures = Some(erasures);
        self.check_erasures();
        self
    }

    /// Resolves the erasures asked for since the last look: every id of the person as the
    /// parts' graphs know them, and the erasure's sequence, past every part's position and
    /// the stream's end when it was asked. Both are recorded before any part forgets the
    /// person, so a crash in between cannot leave an id unerased.
    fn check_erasures(&mut self) {
        // Every event passes here: the common case is one atomic load.
        let generation = match &self.erasures {
            Some(erasures) => erasures.generation(),
            None => return,
        };
        if generation == self.erasures_seen {
            return;
        }
        let Some(erasures) = self.erasures.clone() else {
            return;
        };
        let mut settled = true;
        for (job, person, stream_last) in erasures.queued() {
            let mut ids: Vec<String> = self
                .parts
                .iter()
                .filter(|p| p.follower.holds_people())
                .flat_map(|p| p.follower.person_ids(&person))
                .collect();
            ids.push(person.clone());
            ids.sort();
            ids.dedup();
            let ahead = self.parts.iter().map(|p| p.after_seq).max().unwrap_or(0);
            let upto = stream_last.max(self.position).max(ahead);
            match erasures.resolve(&job, ids.clone(), upto) {
                Ok(()) => {
                    tracing::info!(
                        job,
                        ids = ids.len(),
                        upto,
                        "erasure resolved; the followers forget the person"
                    );
                    for part in &mut self.parts {
                        if part.follower.holds_people() {
                            part.follower.erase(&ids);
                        }
                    }
                }
                Err(error) => {
                    settled = false;
                    tracing::error!(job, %error, "erasure not resolved; retrying");
                }
            }
        }
        self.tombstones.clear();
        for (ids, upto) in erasures.tombstones() {
            for id in ids {
                let at = self.tombstones.entry(id).or_default();
                *at = (*at).max(upto);
            }
        }
        if settled {
            self.erasures_seen = generation;
        }
    }

    /// Whether `event` is a person's erased event.
    fn erased(&self, seq: u64, event: &EventView<'_>) -> bool {
        [event.user_id.as_deref(), event.anonymous_id.as_deref()]
            .into_iter()
            .flatten()
            .any(|id| self.tombstones.get(id).is_some_and(|upto| seq <= *upto))
    }

    /// Records the parts' panics with `supervisor`.
    pub(crate) fn supervised(mut self, supervisor: Arc<Supervisor>) -> Self {
        self.supervisor = Some(supervisor);
        self
    }

    /// The saved position of the part furthest behind, read as its snapshots finish.
    pub(crate) fn saved_position(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let saved: Vec<Saved> = self.parts.iter().map(|p| p.saved.clone()).collect();
        move || {
            saved
                .iter()
                .map(|s| s.load(Ordering::SeqCst))
                .min()
                .unwrap_or(u64::MAX)
        }
    }

    /// Where the shared consumer starts: after the position of the part furthest behind.
    pub(crate) fn spec(&self, stream: &str, consumer: &str) -> FollowSpec {
        FollowSpec {
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            after_seq: self.parts.iter().map(|p| p.after_seq).min().unwrap_or(0),
            snapshot_interval: self.tick,
            lost: Arc::default(),
        }
    }
}

impl Follow for Fanout {
    fn name(&self) -> &'static str {
        "followers"
    }

    fn wants(&self, seq: u64) -> bool {
        self.parts.iter().any(|p| seq > p.after_seq)
    }

    fn apply(&mut self, seq: u64, event: Option<&EventView<'_>>) {
        self.check_erasures();
        let erased =
            !self.tombstones.is_empty() && event.is_some_and(|event| self.erased(seq, event));
        self.position = self.position.max(seq);
        for part in &mut self.parts {
            if seq > part.after_seq {
                let follower = &mut part.follower;
                let event = match erased && follower.holds_people() {
                    true => None,
                    false => event,
                };
                let applied =
                    std::panic::catch_unwind(AssertUnwindSafe(|| follower.apply(seq, event)));
                if let Err(payload) = applied {
                    let name = part.follower.name();
                    match &self.supervisor {
                        Some(supervisor) => {
                            supervisor.record(name, Some(seq), payload.as_ref(), false)
                        }
                        None => tracing::error!(
                            follower = name,
                            seq,
                            "a follower panicked; skipped the event"
                        ),
                    }
                }
            }
        }
    }

    fn erased_between(&self, from: u64, to: u64) -> u64 {
        self.erasures
            .as_ref()
            .map_or(0, |erasures| erasures.deleted_between(from, to))
    }

    fn snapshot(&mut self) {
        // An idle stream brings no event: erasures asked for meanwhile are resolved here.
        self.check_erasures();
        let now = Instant::now();
        for part in &mut self.parts {
            // Ticks drift by microseconds; half a tick of slack keeps each part on its cadence.
            if now.duration_since(part.last_snapshot) + self.tick / 2 >= part.snapshot_interval {
                part.follower.snapshot();
                part.last_snapshot = now;
            }
        }
    }

    fn final_snapshot(&mut self) -> JoinHandle<()> {
        let handles: Vec<JoinHandle<()>> = self
            .parts
            .iter_mut()
            .map(|p| p.follower.final_snapshot())
            .collect();
        tokio::spawn(async move {
            for handle in handles {
                let _ = handle.await;
            }
        })
    }

    /// The parts' least saved position as of now (read live through [`Fanout::saved_position`]).
    fn saved(&self) -> Saved {
        Arc::new(AtomicU64::new((self.saved_position())()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Records what it was given.
    #[derive(Clone, Default)]
    struct Recorder {
        applied: Arc<Mutex<Vec<(u64, bool)>>>,
        snapshots: Arc<Mutex<usize>>,
        saved: Saved,
        /// Keeps people: each id has a second one, `<id>-device`.
        people: bool,
        erased: Arc<Mutex<Vec<Vec<String>>>>,
    }

    impl Recorder {
        /// A recorder that keeps people.
        fn of_people() -> Self {
            Self {
                people: true,
                ..Self::default()
            }
        }
    }

    impl Follow for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn holds_people(&self) -> bool {
            self.people
        }
        fn person_ids(&self, id: &str) -> Vec<String> {
            vec![id.to_string(), format!("{id}-device")]
        }
        fn erase(&mut self, ids: &[String]) {
            self.erased.lock().unwrap().push(ids.to_vec());
        }
        fn apply(&mut self, seq: u64, event: Option<&EventView<'_>>) {
            self.applied.lock().unwrap().push((seq, event.is_some()));
        }
        fn snapshot(&mut self) {
            *self.snapshots.lock().unwrap() += 1;
        }
        fn final_snapshot(&mut self) -> JoinHandle<()> {
            self.snapshot();
            tokio::spawn(async {})
        }
        fn saved(&self) -> Saved {
            self.saved.clone()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_part_gets_the_events_after_its_own_position_and_snapshots_on_its_own_cadence() {
        let (ahead, behind) = (Recorder::default(), Recorder::default());
        let mut fanout = Fanout::new(vec![
            Part::new(ahead.clone(), 5, Duration::from_secs(5)),
            Part::new(behind.clone(), 2, Duration::from_secs(1)),
        ]);
        let spec = fanout.spec("events", "followers");
        assert_eq!(spec.after_seq, 2, "starts after the part furthest behind");
        assert_eq!(spec.snapshot_interval, Duration::from_secs(1));

        assert!(!fanout.wants(2));
        for seq in 3..=7 {
            assert!(fanout.wants(seq));
            fanout.apply(seq, None);
        }
        let seqs = |r: &Recorder| {
            r.applied
                .lock()
                .unwrap()
                .iter()
                .map(|a| a.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(&ahead), vec![6, 7], "nothing applied twice");
        assert_eq!(seqs(&behind), vec![3, 4, 5, 6, 7]);

        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            fanout.snapshot();
        }
        assert_eq!(*behind.snapshots.lock().unwrap(), 10);
        assert_eq!(*ahead.snapshots.lock().unwrap(), 2);
        fanout.final_snapshot().await.unwrap();
        assert_eq!(
            *ahead.snapshots.lock().unwrap(),
            3,
            "every part's final snapshot"
        );
        let saved = fanout.saved_position();
        ahead.saved.store(7, Ordering::SeqCst);
        behind.saved.store(4, Ordering::SeqCst);
        assert_eq!(saved(), 4, "the part whose snapshot is furthest behind");
    }

    fn track(user: &str) -> Vec<u8> {
        crate::event::track_message(user, &uuid::Uuid::now_v7().to_string())
    }

    #[tokio::test]
    async fn an_erased_persons_events_reach_no_part_that_keeps_people_again() {
        let dir = tempfile::tempdir().unwrap();
        let erasures = Arc::new(Erasures::open(dir.path(), 10).unwrap());
        let tick = Duration::from_secs(1);
        let (people, meter) = (Recorder::of_people(), Recorder::default());
        let mut fanout = Fanout::new(vec![
            Part::new(people.clone(), 0, tick),
            Part::new(meter.clone(), 0, tick),
        ])
        .with_erasures(erasures.clone());
        let (u1, u2) = (track("u1"), track("u2"));
        let view = |bytes| EventView::decode(bytes).unwrap();
        fanout.apply(1, Some(&view(&u1)));
        fanout.apply(2, Some(&view(&u2)));
        let job = erasures.request("u1", 1).unwrap();
        fanout.apply(3, Some(&view(&u1)));

        let resolved = erasures.get(&job.job).unwrap();
        let ids = vec!["u1".to_string(), "u1-device".to_string()];
        assert_eq!(resolved.ids, ids, "every id the graphs know");
        assert_eq!(
            resolved.upto_seq, 2,
            "past the followers' position, not only the stream's end when asked"
        );
        assert_eq!(*people.erased.lock().unwrap(), vec![ids.clone()]);
        assert!(meter.erased.lock().unwrap().is_empty());
        assert_eq!(
            people.applied.lock().unwrap().last(),
            Some(&(3, true)),
            "an event after the erasure is a new person's"
        );

        // A restart from a snapshot taken before the erasure: the parts that keep people
        // forget the person again and never see their erased events; the others do.
        let (people, meter) = (Recorder::of_people(), Recorder::default());
        let mut fanout = Fanout::new(vec![
            Part::new(people.clone(), 0, tick),
            Part::new(meter.clone(), 0, tick),
        ])
        .with_erasures(erasures.clone());
        assert_eq!(*people.erased.lock().unwrap(), vec![ids.clone()]);
        for (seq, event) in [(1, &u1), (2, &u2), (3, &u1)] {
            fanout.apply(seq, Some(&view(event)));
        }
        assert_eq!(
            *people.applied.lock().unwrap(),
            vec![(1, false), (2, true), (3, true)]
        );
        assert_eq!(
            *meter.applied.lock().unwrap(),
            vec![(1, true), (2, true), (3, true)]
        );

        // A part whose snapshot is past the erasure already forgot the person.
        let ahead = Recorder::of_people();
        let _fanout = Fanout::new(vec![Part::new(ahead.clone(), 3, tick)]).with_erasures(erasures);
        assert!(ahead.erased.lock().unwrap().is_empty());
    }

    /// Panics on one sequence, like a bug tripped by one poisoned message.
    struct PanicsAt(u64);

    impl Follow for PanicsAt {
        fn name(&self) -> &'static str {
            "fragile"
        }
        fn apply(&mut self, seq: u64, _: Option<&EventView<'_>>) {
            assert_ne!(seq, self.0, "poisoned message");
        }
        fn snapshot(&mut self) {}
        fn final_snapshot(&mut self) -> JoinHandle<()> {
            tokio::spawn(async {})
        }
        fn saved(&self) -> Saved {
            Arc::new(AtomicU64::new(0))
        }
    }

    #[tokio::test]
    async fn a_part_that_panics_is_recorded_and_the_others_go_on() {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let supervisor = Supervisor::new(metrics.clone());
        let steady = Recorder::default();
        let mut fanout = Fanout::new(vec![
            Part::new(PanicsAt(3), 0, Duration::from_secs(1)),
            Part::new(steady.clone(), 0, Duration::from_secs(1)),
        ])
        .supervised(supervisor.clone());
        for seq in 1..=5 {
            fanout.apply(seq, None);
        }
        assert_eq!(
            steady.applied.lock().unwrap().len(),
            5,
            "every event reached the other part"
        );
        let failures = supervisor.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(
            (failures[0].part.as_str(), failures[0].seq),
            ("fragile", Some(3))
        );
        assert!(!failures[0].stopped);
        assert_eq!(metrics.panics.get(), 1);
    }
}
