//! Graceful shutdown by channel: the server holds a `watch::Sender<bool>` per stage and turns
//! it true to stop that stage; each long-running task holds a receiver and waits on it beside
//! its work, then finishes what it holds (commit, snapshot) and returns.

use tokio::sync::watch;

/// A stage's stop signal, as tasks receive it.
pub(crate) type Shutdown = watch::Receiver<bool>;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn wait_for_stop(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
