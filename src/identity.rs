//! Identity: anonymous and identified activity joined into one person.
//!
//! - [`graph`]: the merge rules (placeholders refused, no silent merge of identified people);
//!
//! The identity follower reads every event in stream order, feeds identify/alias events into
//! the graph, and writes it as `data/identities/identities.parquet` (table `identities`: `id`,
//! `person_id`, `kind`, `linked_at`, `seq`) plus a state file to resume from. SQL resolves any
//! event to its person through the view `events_resolved` (`events` plus `person_id`). The graph
//! is a function of the stream: deleting `data/identities/` rebuilds it by replay.

pub mod graph;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array};
use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::bus::BusError;
use crate::bus::follower::{Follow, Part, Saved};
use crate::catalog::{IDENTITIES, identities_schema};
use crate::event::{EventType, EventView};
pub use graph::{IdentityGraph, Outcome};

/// Directory of the identity state and table under the data dir.
const STATE_FILE: &str = "_state.json";
const TABLE_FILE: &str = "identities.parquet";
/// How far past the table's own sequence nothing changed it: a restart resumes after that.
const POSITION_FILE: &str = "_position.json";

/// The content of [`POSITION_FILE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct CleanThrough {
    /// The sequence the table on disk was written at.
    table_seq: u64,
    /// No event after `table_seq` up to this one changed the table.
    through: u64,
}

/// The resumable state: the graph and the last sequence it includes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    seq: u64,
    stream_created: Option<String>,
    graph: IdentityGraph,
}

/// Counters of the follower, for metrics and tests.
#[derive(Debug, Default)]
pub(crate) struct IdentityStats {
    /// Links made.
    pub linked: AtomicU64,
    /// Merges refused (placeholders, conflicts).
    pub refused: AtomicU64,
    /// Last sequence applied.
    pub applied_seq: AtomicU64,
    /// Last sequence written to the table.
    pub written_seq: AtomicU64,
}

struct IdentityFollower {
    state: State,
    dir: PathBuf,
    dirty: bool,
    writing: Arc<AtomicBool>,
    /// The last write failed: the table on disk is older than `saved` says until one succeeds.
    write_failed: Arc<AtomicBool>,
    /// The last position written to [`POSITION_FILE`].
    marked: u64,
    stats: Arc<IdentityStats>,
    saved: Saved,
    /// The graph's bound was reported (once a run).
    warned_full: bool,
}

/// A merge an event asks for: `id` joins the person of `user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkRequest<'a> {
    id: std::borrow::Cow<'a, str>,
    user: &'a str,
    kind: graph::LinkKind,
}

impl LinkRequest<'_> {
    /// The id that joins.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The user whose person it joins.
    pub(crate) fn user(&self) -> &str {
        self.user
    }

    /// Makes the link in `graph`.
    pub(crate) fn apply(&self, graph: &mut IdentityGraph, seq: u64, at: i64) -> Outcome {
        match self.kind {
            graph::LinkKind::Identify => graph.identify(&self.id, self.user, seq, at),
            graph::LinkKind::Alias => graph.alias(&self.id, self.user, seq, at, false),
            graph::LinkKind::Merge => graph.alias(&self.id, self.user, seq, at, true),
        }
    }
}

/// The merge `event` asks for, if any: an identify with both ids, an alias (Segment's
/// `previousId`, PostHog's `$create_alias` with `alias`), or PostHog's `$merge_dangerously`.
/// Every follower that keeps a graph (identity, onboarding) reads merges through this one
/// place, so an id resolves to the same person in SQL, in flags and in onboarding.
pub(crate) fn requested_link<'a>(event: &'a EventView<'_>) -> Option<LinkRequest<'a>> {
    let user = event.user_id.as_deref()?;
    let property = |names: &[&str]| -> Option<String> {
        let text = event.properties.get();
        if !names.iter().any(|name| text.contains(name)) {
            return None;
        }
        let properties = serde_json::from_str::<serde_json::Value>(text).ok()?;
        names
            .iter()
            .find_map(|name| properties.get(name).and_then(|v| v.as_str()))
            .map(str::to_string)
    };
    let (id, kind) = match event.kind {
        EventType::Identify => (
            std::borrow::Cow::Borrowed(event.anonymous_id.as_deref()?),
            graph::LinkKind::Identify,
        ),
        // Segment carries `previousId`; PostHog's `$create_alias` carries `alias`.
        EventType::Alias => (
            std::borrow::Cow::Owned(property(&["previousId", "alias"])?),
            graph::LinkKind::Alias,
        ),
        EventType::Track if event.event.as_deref() == Some("$merge_dangerously") => (
            std::borrow::Cow::Owned(property(&["alias"])?),
            graph::LinkKind::Merge,
        ),
        _ => return None,
    };
    Some(LinkRequest { id, user, kind })
}

impl IdentityFollower {
    /// Says once per run that the graph is full: every event of a new id would say it again.
    fn warn_full(&mut self) {
        if !self.warned_full {
            self.warned_full = true;
            tracing::warn!(
                "the identity graph holds identity.maxIds ids: new ids are not recorded or linked (their events are stored and resolve to themselves); raise identity.maxIds"
            );
        }
    }

    fn observe(&mut self, seq: u64, event: &EventView<'_>) {
        if let Some(user) = event.identified_user()
            && !self.state.graph.observe_user(user)
        {
            self.warn_full();
        }
        let Some(link) = requested_link(event) else {
            return;
        };
        let outcome = link.apply(&mut self.state.graph, seq, event.timestamp);
        match outcome {
            Outcome::Linked => {
                self.stats.linked.fetch_add(1, Ordering::Relaxed);
                self.dirty = true;
            }
            Outcome::Unchanged => {}
            Outcome::Refused(_) if self.state.graph.is_full() => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.warn_full();
            }
            Outcome::Refused(reason) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(seq, %reason, "identity merge refused");
            }
        }
    }

    fn write_in_background(&mut self) -> JoinHandle<()> {
        let state = self.state.clone();
        let dir = self.dir.clone();
        let flag = self.writing.clone();
        let stats = self.stats.clone();
        let (saved, failed) = (self.saved.clone(), self.write_failed.clone());
        self.dirty = false;
        tokio::task::spawn_blocking(move || {
            match write(&dir, &state) {
                Ok(()) => {
                    stats.written_seq.store(state.seq, Ordering::SeqCst);
                    saved.fetch_max(state.seq, Ordering::SeqCst);
                    failed.store(false, Ordering::SeqCst);
                }
                Err(error) => {
                    failed.store(true, Ordering::SeqCst);
                    tracing::error!(%error, "identity snapshot failed; the next one retries")
                }
            }
            flag.store(false, Ordering::SeqCst);
        })
    }
}

impl Follow for IdentityFollower {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn holds_people(&self) -> bool {
        true
    }

    fn person_ids(&self, id: &str) -> Vec<String> {
        self.state.graph.ids_of_person(id)
    }

    fn erase(&mut self, ids: &[String]) {
        self.state.graph.forget(ids);
        self.dirty = true;
    }

    fn apply(&mut self, seq: u64, event: Option<&EventView<'_>>) {
        if let Some(event) = event {
            self.observe(seq, event);
        }
        self.state.seq = seq;
        self.stats.applied_seq.store(seq, Ordering::SeqCst);
    }

    fn saved(&self) -> Saved {
        self.saved.clone()
    }

    fn snapshot(&mut self) {
        // The table only changes with links; the position is saved along with them.
        let written = self.stats.written_seq.load(Ordering::SeqCst);
        if !self.dirty && !self.write_failed.load(Ordering::SeqCst) && written != 0 {
            // Nothing changed the table since it was written: a few bytes say so, and a
            // restart resumes after them rather than reading the stream again from the table.
            if !self.writing.load(Ordering::SeqCst) && self.state.seq > self.marked.max(written) {
                let mark = CleanThrough {
                    table_seq: written,
                    through: self.state.seq,
                };
                let written = serde_json::to_vec(&mark)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        crate::files::write_atomic(&self.dir.join(POSITION_FILE), &b)
                            .map_err(|e| e.to_string())
                    });
                match written {
                    Ok(()) => {
                        self.marked = mark.through;
                        self.saved.fetch_max(mark.through, Ordering::SeqCst);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "identity position not written; the next tick retries")
                    }
                }
            }
            return;
        }
        if self.writing.swap(true, Ordering::SeqCst) {
            return;
        }
        self.write_in_background();
    }

    fn final_snapshot(&mut self) -> JoinHandle<()> {
        let flag = self.writing.clone();
        let state = self.state.clone();
        let dir = self.dir.clone();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            while flag.swap(true, Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = tokio::task::spawn_blocking(move || {
                if write(&dir, &state).is_ok() {
                    stats.written_seq.store(state.seq, Ordering::SeqCst);
                }
            })
            .await;
            flag.store(false, Ordering::SeqCst);
        })
    }
}

/// Writes a graph built outside the stream (the activation benchmark's synthetic history) as
/// the `identities` table of `data_dir`.
pub fn save_graph(data_dir: &Path, graph: IdentityGraph) -> Result<(), String> {
    let state = State {
        seq: 0,
        stream_created: None,
        graph,
    };
    write(&data_dir.join(IDENTITIES.dir), &state)
}

/// Writes the table (Parquet) and then the state (JSON), each atomically.
fn write(dir: &Path, state: &State) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    let mut persons = Vec::new();
    let mut kinds = Vec::new();
    let mut times = Vec::new();
    let mut seqs = Vec::new();
    let mut links: Vec<_> = state.graph.links().collect();
    links.sort_by(|a, b| a.0.cmp(b.0));
    for (id, link) in links {
        ids.push(id.as_str());
        persons.push(link.person);
        kinds.push(link.kind.as_str());
        times.push(link.at);
        seqs.push(link.seq);
    }
    let schema = identities_schema();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(StringArray::from(persons)),
        Arc::new(StringArray::from(kinds)),
        Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC")),
        Arc::new(UInt64Array::from(seqs)),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?;
    let properties = crate::archive::commit::writer_properties(&schema, &["id"], 3, 128 * 1024);
    crate::archive::commit::write_parquet_file(
        &dir.join(TABLE_FILE),
        &schema,
        [&batch],
        properties,
    )
    .map_err(|e| e.to_string())?;
    let bytes = serde_json::to_vec(state).map_err(|e| e.to_string())?;
    crate::files::write_atomic(&dir.join(STATE_FILE), &bytes).map_err(|e| e.to_string())
}

/// Where the identity follower reads and writes.
pub(crate) struct IdentityTarget {
    /// The events stream.
    pub stream: String,
    /// Data dir (the table goes to `identities/` under it).
    pub data_dir: PathBuf,
    /// How often a changed graph is written.
    pub snapshot_interval: Duration,
    /// Most ids the graph records (`identity.maxIds`).
    pub max_ids: u64,
}

/// Loads the state and returns the identity graph's part of the stream followers.
pub(crate) async fn prepare(
    js: &jetstream::Context,
    target: IdentityTarget,
) -> Result<(Part, Arc<IdentityStats>), BusError> {
    let dir = target.data_dir.join(IDENTITIES.dir);
    let mut stream = js
        .get_stream(&target.stream)
        .await
        .map_err(|e| BusError::Management {
            action: "get stream",
            message: e.to_string(),
        })?;
    let info = stream.info().await.map_err(|e| BusError::Management {
        action: "stream info",
        message: e.to_string(),
    })?;
    let created = crate::bus::streams::incarnation(info);
    let saved: Option<State> = std::fs::read(dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let state = match saved {
        Some(state)
            if state
                .stream_created
                .as_deref()
                .is_none_or(|c| crate::bus::streams::same_incarnation(c, &created))
                && state.seq <= info.state.last_sequence =>
        {
            state
        }
        Some(_) => {
            tracing::warn!(
                "the identity state belongs to another stream; rebuilding identities from the stream"
            );
            State::default()
        }
        None => State::default(),
    };
    let mut state = State {
        stream_created: Some(created),
        ..state
    };
    state
        .graph
        .set_max_ids(usize::try_from(target.max_ids).unwrap_or(usize::MAX));
    let mark: Option<CleanThrough> = std::fs::read(dir.join(POSITION_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(mark) = mark
        && mark.table_seq == state.seq
        && state.seq > 0
        && mark.through <= info.state.last_sequence
    {
        state.seq = state.seq.max(mark.through);
    }
    let stats = Arc::new(IdentityStats::default());
    stats.applied_seq.store(state.seq, Ordering::SeqCst);
    stats.written_seq.store(state.seq, Ordering::SeqCst);
    let after_seq = state.seq;
    let follower = IdentityFollower {
        state,
        dir,
        dirty: true,
        writing: Arc::new(AtomicBool::new(false)),
        write_failed: Arc::new(AtomicBool::new(false)),
        marked: 0,
        stats: stats.clone(),
        saved: Arc::new(std::sync::atomic::AtomicU64::new(after_seq)),
        warned_full: false,
    };
    Ok((
        Part::new(follower, after_seq, target.snapshot_interval),
        stats,
    ))
}
