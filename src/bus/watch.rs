//! Watching JetStream itself, beside the connection.
//!
//! The client connection can be up while JetStream does not answer: nats-server turns
//! JetStream off when a store write fails for space (a disk filled by another process, or
//! `storage.minFreeMb` set to 0) and does not turn it on again when space returns. Every
//! `storage.checkInterval` the watcher asks JetStream for the account's info (a raw
//! `$JS.API.INFO` request: its answer differs across server versions, and only "answered
//! without an error" matters here). After
//! [`FAILURES_BEFORE_DOWN`] unanswered questions in a row `/healthz` says `"jetstream":
//! "unavailable"` (503), and the embedded nats-server, when the disk has room again, is
//! restarted on the same store and port: clients reconnect by themselves and ingest resumes
//! with no restart of northstar. Restarts back off (10 s, doubling up to 5 minutes) while
//! JetStream stays down. An external server is only reported, never touched.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;

use super::EmbeddedNats;
use crate::shutdown::{Shutdown, wait_for_stop};

/// Unanswered questions in a row before JetStream counts as down.
pub(crate) const FAILURES_BEFORE_DOWN: u32 = 3;

/// How long one question may wait: far above what a loaded server takes (milliseconds), so
/// load alone never counts as down.
pub(crate) const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// What the watcher knows, read by `/healthz` and `/metrics`.
#[derive(Debug)]
pub struct JetStreamHealth {
    up: AtomicBool,
    restarts: AtomicU64,
}

impl Default for JetStreamHealth {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
            restarts: AtomicU64::new(0),
        }
    }
}

impl JetStreamHealth {
    /// Whether JetStream answers.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Times the embedded nats-server was restarted because JetStream stopped answering.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
}

/// Runs until shutdown. `has_room` says whether the disk has space again (a restart on a
/// full disk would only fail again).
pub async fn watch(
    client: async_nats::Client,
    embedded: Option<Arc<Mutex<EmbeddedNats>>>,
    has_room: impl Fn() -> bool + Send + 'static,
    health: Arc<JetStreamHealth>,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let mut failures = 0u32;
    let mut backoff = FIRST_BACKOFF;
    let mut next_restart = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = wait_for_stop(&mut shutdown) => return,
        }
        let error = match ask(&client).await {
            Ok(()) => {
                if !health.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("JetStream answers again");
                }
                failures = 0;
                backoff = FIRST_BACKOFF;
                continue;
            }
            Err(error) => error,
        };
        failures += 1;
        if failures < FAILURES_BEFORE_DOWN {
            continue;
        }
        if health.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(%error, "JetStream does not answer; ingest answers 503 until it does");
        }
        let Some(embedded) = &embedded else {
            continue;
        };
        if !has_room() || tokio::time::Instant::now() < next_restart {
            continue;
        }
        tracing::warn!(%error, "restarting the embedded nats-server (a full disk turns JetStream off until then)");
        let mut server = embedded.lock().await;
        match server.restart().await {
            Ok(()) => {
                health.restarts.store(server.restarts(), Ordering::Relaxed);
            }
            Err(error) => {
                tracing::error!(%error, "restarting the embedded nats-server failed; retrying")
            }
        }
        // Give the new process time to recover its store before another restart.
        next_restart = tokio::time::Instant::now() + backoff;
        backoff = (backoff * 2).min(LAST_BACKOFF);
    }
}

/// Waits between restarts while JetStream stays down: the first, and the most.
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const LAST_BACKOFF: Duration = Duration::from_secs(300);

/// Asks JetStream for the account's info; `Err` says why the answer is not a good one.
async fn ask(client: &async_nats::Client) -> Result<(), String> {
    let answer = tokio::time::timeout(
        ANSWER_WITHIN,
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await
    .map_err(|_| format!("no answer within {ANSWER_WITHIN:?}"))?
    .map_err(|e| e.to_string())?;
    let body: serde_json::Value =
        serde_json::from_slice(&answer.payload).map_err(|e| format!("unreadable answer: {e}"))?;
    match body.get("error") {
        None => Ok(()),
        Some(error) => Err(error.to_string()),
    }
}
