//! Erasing a person: the phases of an erasure ([`crate::erasure`]) that run outside the
//! followers and the archive. Deleting the person's messages from the stream, then asking SQL
//! until it finds none of their ids, then marking the erasure done.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use async_nats::jetstream;
use async_nats::jetstream::stream::DeleteMessageErrorKind;
use tokio::sync::watch;

use crate::erasure::{Erasure, Erasures, Phase};
use crate::query::QueryEngine;
use crate::shutdown::wait_for_stop;

/// How often an erasure waiting on SQL (the identity table's next snapshot) asks again.
const VERIFY_EVERY: Duration = Duration::from_millis(500);

/// Runs the erasures' stream and SQL phases until `stop`.
pub async fn run(
    erasures: Arc<Erasures>,
    js: jetstream::Context,
    stream: String,
    query: Arc<QueryEngine>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        if step(&erasures, &js, &stream, &query).await {
            continue;
        }
        tokio::select! {
            () = erasures.changed() => {}
            () = tokio::time::sleep(VERIFY_EVERY) => {}
            () = wait_for_stop(&mut stop) => return,
        }
    }
}

/// Moves one erasure one phase on; false when none could move.
async fn step(
    erasures: &Erasures,
    js: &jetstream::Context,
    stream: &str,
    query: &QueryEngine,
) -> bool {
    if let Some(job) = erasures.first_in(Phase::Deleting) {
        return match delete_messages(js, stream, &job.seqs).await {
            Ok(deleted) => match erasures.deleted(&job.job, deleted) {
                Ok(()) => {
                    tracing::info!(
                        job = job.job,
                        deleted,
                        "erased the person's messages from the stream"
                    );
                    true
                }
                Err(error) => {
                    tracing::error!(job = job.job, %error, "erasure: recording the deleted messages failed; retrying");
                    false
                }
            },
            Err(error) => {
                tracing::warn!(job = job.job, %error, "erasure: deleting stream messages failed; retrying");
                false
            }
        };
    }
    if let Some(job) = erasures.first_in(Phase::Verifying) {
        match remaining(query, &job).await {
            Ok(0) => {
                if let Err(error) = erasures.advance(&job.job, Phase::Done) {
                    tracing::error!(job = job.job, %error, "erasure: recording it done failed; retrying");
                    return false;
                }
                tracing::info!(
                    job = job.job,
                    ids = job.ids.len(),
                    rows = job.rows_erased,
                    "erasure done"
                );
                return true;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(job = job.job, %error, "erasure: checking what is left failed; retrying")
            }
        }
    }
    false
}

/// Deletes (and so erases, as JetStream overwrites a deleted message) the messages at `seqs`
/// the stream still holds; returns how many it deleted.
async fn delete_messages(
    js: &jetstream::Context,
    stream: &str,
    seqs: &[u64],
) -> Result<u64, String> {
    let mut handle = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let first = handle
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .first_sequence;
    let mut deleted = 0;
    for &seq in seqs.iter().filter(|seq| **seq >= first) {
        match handle.delete_message(seq).await {
            Ok(true) => deleted += 1,
            Ok(false) => {}
            // Already gone (deleted before a crash, or dropped by retention meanwhile).
            Err(error) if matches!(error.kind(), DeleteMessageErrorKind::JetStream(_)) => {}
            Err(error) => return Err(error.to_string()),
        }
    }
    Ok(deleted)
}

/// Rows SQL still finds of the erased ids: their events up to the erasure's sequence, and
/// their links in `identities` made up to it (a link made after it is a new person's).
async fn remaining(query: &QueryEngine, job: &Erasure) -> Result<i64, String> {
    if job.ids.is_empty() {
        return Ok(0);
    }
    let list = job
        .ids
        .iter()
        .map(|id| format!("'{}'", id.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT (SELECT count(*) FROM events WHERE seq <= {upto} AND (user_id IN ({list}) OR anonymous_id IN ({list}))) \
         + (SELECT count(*) FROM identities WHERE seq <= {upto} AND id IN ({list}))",
        upto = job.upto_seq
    );
    let batches = query
        .collect_internal(&sql)
        .await
        .map_err(|e| e.to_string())?;
    let count = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| {
            let column = b.column(0).as_primitive_opt::<Int64Type>()?;
            column.is_valid(0).then(|| column.value(0))
        })
        .unwrap_or(0);
    Ok(count)
}
