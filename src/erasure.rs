//! The erasure log: people erased (`DELETE /v1/persons/{id}`), and how far each erasure got.
//!
//! An erasure moves through [`Phase`]s, each recorded in `data/erasures/erasures.json`
//! (written atomically) before the work of the next starts, so a crash anywhere resumes it:
//!
//! 1. `queued`: asked for. The stream followers, between two events, resolve every id of the
//!    person in their identity graphs and choose the erasure's sequence `S`: no earlier than
//!    the stream's last sequence when it was asked, nor than any follower's position. The ids
//!    and `S` are recorded, and only then do the followers forget the person.
//! 2. `rewriting`: once the archive has committed `S`, every Parquet file that may hold the
//!    person's events up to `S` is rewritten without them (`archive::erase`). The sequences of
//!    the rows taken out are recorded before each file is replaced.
//! 3. `deleting`: those messages are deleted from the stream, where it still holds them.
//! 4. `verifying`: SQL is asked until it finds none of the ids in `events` up to `S` nor in
//!    `identities` (the identity table is rewritten at the follower's next snapshot).
//! 5. `done`.
//!
//! From `rewriting` on, the ids and `S` are a tombstone: the followers skip the person's events
//! at or below `S`, so a restart or a replay cannot bring them back; events after `S` are a new
//! person's. The log keeps every erasure, finished ones too, up to `identity.maxErasures`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Directory of the log under the data dir.
pub const DIR: &str = "erasures";
const FILE: &str = "erasures.json";

/// Where an erasure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for the followers to resolve the person's ids.
    Queued,
    /// Waiting for the archive to commit `upto_seq`, then rewriting its files.
    Rewriting,
    /// Deleting the person's messages from the stream.
    Deleting,
    /// Waiting until SQL finds none of the ids.
    Verifying,
    /// Finished.
    Done,
}

/// One erasure, as the log records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Erasure {
    /// Its id (`erase-<n>`).
    pub job: String,
    /// The id it was asked for.
    pub person: String,
    /// Where it is.
    pub phase: Phase,
    /// When it was asked for (RFC 3339).
    pub requested_at: String,
    /// The stream's last sequence when it was asked for.
    pub stream_last: u64,
    /// Every id of the person (empty while queued).
    #[serde(default)]
    pub ids: Vec<String>,
    /// The person's events up to this sequence are erased (0 while queued).
    #[serde(default)]
    pub upto_seq: u64,
    /// Parquet files that may hold the person's events, and those read so far.
    #[serde(default)]
    pub files_total: u64,
    /// Files read so far.
    #[serde(default)]
    pub files_done: u64,
    /// Rows taken out of Parquet.
    #[serde(default)]
    pub rows_erased: u64,
    /// Messages deleted from the stream.
    #[serde(default)]
    pub messages_deleted: u64,
    /// Stream sequences of the rows taken out: deleted from the stream, and kept so that a
    /// reader meeting their gap knows it for an erasure, not a loss (8 bytes an event).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seqs: Vec<u64>,
    /// When it finished (RFC 3339).
    #[serde(default)]
    pub finished_at: Option<String>,
}

impl Erasure {
    /// The answer of `GET /v1/erasures/{job}`.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "job": self.job,
            "person": self.person,
            "phase": self.phase,
            "done": self.phase == Phase::Done,
            "requested_at": self.requested_at,
            "finished_at": self.finished_at,
            "ids": self.ids,
            "upto_seq": (self.phase != Phase::Queued).then_some(self.upto_seq),
            "files_total": self.files_total,
            "files_done": self.files_done,
            "rows_erased": self.rows_erased,
            "messages_deleted": self.messages_deleted,
            "status_url": format!("/v1/erasures/{}", self.job),
        })
    }
}

/// Why an erasure cannot be recorded.
#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    /// The log holds `identity.maxErasures` erasures.
    #[error(
        "the erasure log holds {0} erasures, its bound (identity.maxErasures); raise it to erase more"
    )]
    Full(usize),
    /// The log could not be written.
    #[error("writing the erasure log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Log {
    next: u64,
    jobs: Vec<Erasure>,
}

/// The log, shared by the API, the followers, the archive and the erasure task.
#[derive(Debug)]
pub struct Erasures {
    path: PathBuf,
    max: usize,
    log: Mutex<Log>,
    /// Changes whenever an erasure is asked for or resolved (the followers poll it).
    generation: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Erasures {
    /// Opens the log of `data_dir` (an empty one when there is none).
    pub fn open(data_dir: &Path, max: usize) -> Result<Self, String> {
        let path = data_dir.join(DIR).join(FILE);
        let log = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Log::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Self {
            path,
            max,
            log: Mutex::new(log),
            generation: AtomicU64::new(1),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store(&self, log: &Log) -> Result<(), ErasureError> {
        let bytes = serde_json::to_vec(log).unwrap_or_default();
        crate::files::write_atomic(&self.path, &bytes).map_err(|source| ErasureError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Applies `change` to the log and writes it; on a failed write the log is as it was.
    fn update<T>(&self, change: impl FnOnce(&mut Log) -> T) -> Result<T, ErasureError> {
        let mut log = self.lock();
        let before = serde_json::to_vec(&*log).unwrap_or_default();
        let out = change(&mut log);
        if let Err(error) = self.store(&log) {
            if let Ok(old) = serde_json::from_slice(&before) {
                *log = old;
            }
            return Err(error);
        }
        drop(log);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        Ok(out)
    }

    /// Records an erasure of `person` (or returns the unfinished one already recorded).
    pub fn request(&self, person: &str, stream_last: u64) -> Result<Erasure, ErasureError> {
        if let Some(open) = self
            .lock()
            .jobs
            .iter()
            .find(|j| j.person == person && j.phase != Phase::Done)
        {
            return Ok(open.clone());
        }
        if self.lock().jobs.len() >= self.max {
            return Err(ErasureError::Full(self.max));
        }
        self.update(|log| {
            log.next += 1;
            let job = Erasure {
                job: format!("erase-{}", log.next),
                person: person.to_string(),
                phase: Phase::Queued,
                requested_at: crate::clock::format_micros(crate::clock::system_micros()),
                stream_last,
                ids: Vec::new(),
                upto_seq: 0,
                files_total: 0,
                files_done: 0,
                rows_erased: 0,
                messages_deleted: 0,
                seqs: Vec::new(),
                finished_at: None,
            };
            log.jobs.push(job.clone());
            job
        })
    }

    /// Changes whenever an erasure is asked for or resolved.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Waits until the log changes.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The erasures waiting for their ids: (job, person, stream's last sequence when asked).
    pub fn queued(&self) -> Vec<(String, String, u64)> {
        self.lock()
            .jobs
            .iter()
            .filter(|j| j.phase == Phase::Queued)
            .map(|j| (j.job.clone(), j.person.clone(), j.stream_last))
            .collect()
    }

    /// Records the person's ids and the erasure's sequence; the archive may then rewrite.
    pub fn resolve(
        &self,
        job: &str,
        mut ids: Vec<String>,
        upto_seq: u64,
    ) -> Result<(), ErasureError> {
        ids.sort();
        ids.dedup();
        self.update(|log| {
            if let Some(j) = log.jobs.iter_mut().find(|j| j.job == job) {
                j.ids = ids;
                j.upto_seq = upto_seq;
                j.phase = Phase::Rewriting;
            }
        })
    }

    /// Every resolved erasure's ids and sequence: the tombstones the followers honour.
    pub fn tombstones(&self) -> Vec<(Vec<String>, u64)> {
        self.lock()
            .jobs
            .iter()
            .filter(|j| j.phase != Phase::Queued)
            .map(|j| (j.ids.clone(), j.upto_seq))
            .collect()
    }

    /// The first erasure whose files can be rewritten now that the archive committed `committed`.
    pub fn due_rewrite(&self, committed: u64) -> Option<Erasure> {
        self.lock()
            .jobs
            .iter()
            .find(|j| j.phase == Phase::Rewriting && j.upto_seq <= committed)
            .cloned()
    }

    /// Records the rows a file rewrite is about to take out (before the file is replaced).
    pub fn found(&self, job: &str, seqs: &[u64]) -> Result<(), ErasureError> {
        self.update(|log| {
            if let Some(j) = log.jobs.iter_mut().find(|j| j.job == job) {
                j.seqs.extend_from_slice(seqs);
                j.seqs.sort_unstable();
                j.seqs.dedup();
                j.rows_erased = j.seqs.len() as u64;
            }
        })
    }

    /// Progress of a rewrite, for the status answer (not written: a rewrite is redone whole).
    pub fn progress(&self, job: &str, files_done: u64, files_total: u64) {
        if let Some(j) = self.lock().jobs.iter_mut().find(|j| j.job == job) {
            j.files_done = files_done;
            j.files_total = files_total;
        }
    }

    /// Moves `job` to `phase` (and records when it finished).
    pub fn advance(&self, job: &str, phase: Phase) -> Result<(), ErasureError> {
        self.update(|log| {
            if let Some(j) = log.jobs.iter_mut().find(|j| j.job == job) {
                j.phase = phase;
                if phase == Phase::Done {
                    j.finished_at =
                        Some(crate::clock::format_micros(crate::clock::system_micros()));
                }
            }
        })
    }

    /// Records that `deleted` messages left the stream, and moves on to verifying.
    pub fn deleted(&self, job: &str, deleted: u64) -> Result<(), ErasureError> {
        self.update(|log| {
            if let Some(j) = log.jobs.iter_mut().find(|j| j.job == job) {
                j.messages_deleted += deleted;
            }
        })?;
        self.advance(job, Phase::Verifying)
    }

    /// How many sequences in `from..to` an erasure deleted from the stream.
    pub fn deleted_between(&self, from: u64, to: u64) -> u64 {
        self.lock()
            .jobs
            .iter()
            .filter(|j| matches!(j.phase, Phase::Verifying | Phase::Done))
            .map(|j| {
                let start = j.seqs.partition_point(|s| *s < from);
                let end = j.seqs.partition_point(|s| *s < to);
                (end - start) as u64
            })
            .sum()
    }

    /// The first erasure in `phase`.
    pub fn first_in(&self, phase: Phase) -> Option<Erasure> {
        self.lock().jobs.iter().find(|j| j.phase == phase).cloned()
    }

    /// One erasure.
    pub fn get(&self, job: &str) -> Option<Erasure> {
        self.lock().jobs.iter().find(|j| j.job == job).cloned()
    }

    /// Every erasure, oldest first.
    pub fn list(&self) -> Vec<Erasure> {
        self.lock().jobs.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_erasure_survives_a_reopen_in_every_phase_and_the_log_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = Erasures::open(dir.path(), 2).unwrap();
        let first = log.request("u1", 10).unwrap();
        assert_eq!(first.phase, Phase::Queued);
        assert_eq!(
            log.request("u1", 12).unwrap().job,
            first.job,
            "one at a time"
        );
        assert!(log.tombstones().is_empty(), "no tombstone before the ids");
        let generation = log.generation();
        log.resolve(&first.job, vec!["u1".into(), "a1".into(), "u1".into()], 15)
            .unwrap();
        assert!(log.generation() > generation);
        assert_eq!(log.tombstones(), vec![(vec!["a1".into(), "u1".into()], 15)]);
        assert!(log.due_rewrite(14).is_none());
        assert_eq!(log.due_rewrite(15).unwrap().job, first.job);
        log.found(&first.job, &[3, 1]).unwrap();
        log.found(&first.job, &[3, 7]).unwrap();
        log.advance(&first.job, Phase::Deleting).unwrap();

        let reopened = Erasures::open(dir.path(), 2).unwrap();
        let job = reopened.get(&first.job).unwrap();
        assert_eq!(
            (job.phase, job.seqs.clone(), job.rows_erased),
            (Phase::Deleting, vec![1, 3, 7], 3)
        );
        reopened.deleted(&first.job, 3).unwrap();
        reopened.advance(&first.job, Phase::Done).unwrap();
        let reopened = Erasures::open(dir.path(), 2).unwrap();
        let job = reopened.get(&first.job).unwrap();
        assert!(job.finished_at.is_some());
        assert_eq!(job.messages_deleted, 3);
        assert_eq!(
            reopened.deleted_between(2, 8),
            2,
            "3 and 7 were erased, not lost"
        );

        reopened.request("u2", 20).unwrap();
        assert!(matches!(
            reopened.request("u3", 20),
            Err(ErasureError::Full(2))
        ));
    }
}
