//! Supervision of the parts that run in the background: a panic in a follower, an archiver or
//! a background task is caught, logged with the part and the stream position it stopped at,
//! counted in `/metrics` (`northstar_panics_total`), and named by `/healthz`, which answers 503
//! from then on. A panic is always our bug (input is bounded at the door); the point is that it
//! is never silent and never stops the stream for the other parts.
//!
//! A part can also fail without panicking, again and again (a usage pipeline whose SQL errors
//! on every run): it reports itself [`Supervisor::failing`] and is named by `/healthz` until
//! it reports [`Supervisor::recovered`].

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// Failures kept for `/healthz` (the first ones: later ones are counted, not kept).
const MAX_KEPT: usize = 16;

/// One caught panic.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failure {
    /// The part that panicked (`meter`, `billing`, `archive-events`, …).
    pub part: String,
    /// The stream sequence it was applying, for a follower.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The panic's message.
    pub message: String,
    /// Whether the part stopped (a task) or skipped the message and went on (a follower).
    pub stopped: bool,
}

/// Collects the failures of every supervised part.
#[derive(Debug)]
pub struct Supervisor {
    failures: Mutex<Vec<Failure>>,
    /// Parts failing now, by name, with the last error: one entry per part, so bounded by
    /// the number of parts.
    failing: Mutex<BTreeMap<String, String>>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    /// A supervisor counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            failures: Mutex::new(Vec::new()),
            failing: Mutex::new(BTreeMap::new()),
            metrics,
        })
    }

    /// Records a panic of `part` (payload as caught by `catch_unwind`).
    pub fn record(&self, part: &str, seq: Option<u64>, payload: &(dyn Any + Send), stopped: bool) {
        let message = panic_message(payload);
        tracing::error!(
            part,
            seq,
            stopped,
            message,
            "a part of northstar panicked; /healthz answers 503 until a restart"
        );
        self.metrics.panics.inc();
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if failures.len() < MAX_KEPT {
            failures.push(Failure {
                part: part.to_string(),
                seq,
                message,
                stopped,
            });
        }
    }

    /// Records that `part` failed its last attempt with `message` and makes no progress
    /// until it recovers. Logged once when the part starts failing.
    pub fn failing(&self, part: &str, message: String) {
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        if !failing.contains_key(part) {
            tracing::error!(
                part,
                message,
                "a part of northstar is failing; /healthz answers 503 until it recovers"
            );
        }
        failing.insert(part.to_string(), message);
    }

    /// Records that `part` succeeded again after [`Supervisor::failing`].
    pub fn recovered(&self, part: &str) {
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        if failing.remove(part).is_some() {
            tracing::info!(part, "a failing part of northstar recovered");
        }
    }

    /// The failures so far and the parts failing now (empty while everything is healthy).
    pub fn failures(&self) -> Vec<Failure> {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        failures.extend(failing.iter().map(|(part, message)| Failure {
            part: part.clone(),
            seq: None,
            message: message.clone(),
            stopped: true,
        }));
        failures
    }

    /// Spawns `task` as `part`: a panic in it is recorded instead of vanishing with the task.
    pub fn spawn<F>(self: &Arc<Self>, part: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        tokio::spawn(self.clone().guarded(part, task))
    }

    /// `task`, with a panic in it recorded as `part` stopping.
    async fn guarded(self: Arc<Self>, part: &'static str, task: impl Future<Output = ()>) {
        if let Err(payload) = AssertUnwindSafe(task).catch_unwind().await {
            self.record(part, None, payload.as_ref(), true);
        }
    }
}

impl Supervisor {
    /// Spawns `task` as `part` on a thread of its own with its own single-threaded runtime, so
    /// the tasks of the main runtime (HTTP connections above all) cannot starve it: the OS
    /// shares the cores between it and them. The handle ends when the task does; a panic is
    /// recorded as with [`Supervisor::spawn`].
    pub fn spawn_on_own_thread<F>(
        self: &Arc<Self>,
        part: &'static str,
        task: F,
    ) -> std::io::Result<JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(format!("northstar-{part}"))
            .build()?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let guarded = self.clone().guarded(part, task);
        std::thread::Builder::new()
            .name(format!("northstar-{part}"))
            .spawn(move || {
                runtime.block_on(guarded);
                let _ = done_tx.send(());
            })?;
        Ok(tokio::spawn(async move {
            let _ = done_rx.await;
        }))
    }
}

/// The text of a panic payload (`panic!` with a message gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_recorded_and_counted() {
        let metrics = Arc::new(Metrics::default());
        let supervisor = Supervisor::new(metrics.clone());
        let task = supervisor.spawn("pipelines", async { panic!("boom at 7") });
        task.await.expect("the wrapper itself never panics");
        let failures = supervisor.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].part, "pipelines");
        assert_eq!(failures[0].message, "boom at 7");
        assert!(failures[0].stopped);
        assert_eq!(metrics.panics.get(), 1);
    }

    #[tokio::test]
    async fn a_task_on_its_own_thread_runs_there_and_its_panic_is_recorded() {
        let supervisor = Supervisor::new(Arc::new(Metrics::default()));
        let (name_tx, name_rx) = tokio::sync::oneshot::channel();
        let task = supervisor
            .spawn_on_own_thread("followers", async move {
                let _ = name_tx.send(std::thread::current().name().map(str::to_string));
                // Timers work on the thread's own runtime.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                panic!("boom at 9");
            })
            .unwrap();
        task.await.unwrap();
        assert_eq!(
            name_rx.await.unwrap().as_deref(),
            Some("northstar-followers")
        );
        let failures = supervisor.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].part, "followers");
        assert_eq!(failures[0].message, "boom at 9");
    }

    #[test]
    fn a_failing_part_is_named_until_it_recovers() {
        let supervisor = Supervisor::new(Arc::new(Metrics::default()));
        supervisor.failing("pipeline usage_hourly", "first".into());
        supervisor.failing("pipeline usage_hourly", "second".into());
        let failures = supervisor.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].part, "pipeline usage_hourly");
        assert_eq!(failures[0].message, "second");
        supervisor.recovered("pipeline usage_hourly");
        assert!(supervisor.failures().is_empty());
    }

    #[tokio::test]
    async fn a_task_that_ends_well_leaves_nothing() {
        let supervisor = Supervisor::new(Arc::new(Metrics::default()));
        supervisor.spawn("notices", async {}).await.unwrap();
        assert!(supervisor.failures().is_empty());
    }
}
