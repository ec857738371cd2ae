//! The streams and durable consumers northstar owns.
//!
//! - `EVENTS` (subjects `events.<shard>.<type>`): accepted events, deduplicated by
//!   `Nats-Msg-Id` = event id over `duplicateWindow`.
//! - `REJECTED` (subjects `rejected.<source>`): messages that failed validation, kept with
//!   their raw payload and reasons.
//!
//! Both use file storage and limits retention, by age and by size (see [`super::budget`]):
//! Parquet is the long-term copy, the stream the log of record for what its readers have not
//! taken in yet.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use super::BusError;
use super::budget::Budget;
use crate::config::StreamSettings;

/// Subject prefix of accepted events.
pub(crate) const EVENTS_PREFIX: &str = "events";
/// The account's storage limit on the server (`None`: none, or the server would not say).
pub(crate) async fn account_storage_limit(js: &jetstream::Context) -> Option<i64> {
    js.query_account().await.ok()?.limits.max_storage
}

/// Subject prefix of rejected messages.
pub(crate) const REJECTED_PREFIX: &str = "rejected";

/// Subject prefix of portal events (`portal.<hex of the customer id>`).
pub(crate) const PORTAL_PREFIX: &str = "portal";

/// How long the portal stream keeps an event: a browser that comes back within it misses
/// nothing.
pub(crate) const PORTAL_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Most bytes the portal stream holds (the oldest events go first past it), or a twentieth of
/// the embedded server's store when that is less: the streams' bounds must fit the store,
/// and the events and rejected streams take nine tenths of it.
pub(crate) const PORTAL_MAX_BYTES: i64 = 64 * 1024 * 1024;

/// The portal stream's size bound within `budget`.
fn portal_bytes(budget: &Budget) -> i64 {
    match budget.store {
        Some(store) => (store / 20).clamp(1024 * 1024, PORTAL_MAX_BYTES),
        None => PORTAL_MAX_BYTES,
    }
}

/// Creates the portal stream, or brings its limits to these. Its events carry deterministic
/// ids, so a notice sent again (a replay crossing the same threshold) is stored once.
pub(crate) async fn ensure_portal_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    budget: &Budget,
) -> Result<(), BusError> {
    let config = stream::Config {
        name: settings.portal_name.clone(),
        description: Some("northstar portal events: what each customer's browser is told".into()),
        subjects: vec![format!("{PORTAL_PREFIX}.>")],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: settings.duplicate_window.get(),
        max_age: PORTAL_MAX_AGE,
        max_bytes: portal_bytes(budget),
        num_replicas: settings.replicas,
        ..Default::default()
    };
    js.create_or_update_stream(config)
        .await
        .map_err(management("create or update the portal stream"))?;
    Ok(())
}

/// Stores one portal event for `customer_id` under the idempotency `id` (a second event with
/// the same id within the duplicate window is dropped by JetStream). Failures are logged: a
/// portal event is a courtesy to a browser, never a reason to stop metering.
pub(crate) async fn publish_portal(
    js: &jetstream::Context,
    customer_id: &str,
    id: &str,
    body: &serde_json::Value,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let stored = match js
        .publish_with_headers(portal_subject(customer_id), headers, bytes.into())
        .await
    {
        Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    if let Err(error) = stored {
        tracing::warn!(customer = %customer_id, %id, %error, "portal event not stored");
    }
}

/// The subject of one customer's portal events: the id in hex, as an id may hold characters
/// a subject cannot (`.`, `*`, `>`, spaces).
pub(crate) fn portal_subject(customer_id: &str) -> String {
    format!("{PORTAL_PREFIX}.{}", hex::encode(customer_id))
}

/// Creates the streams, or updates their limits to match the config and the budget. Returns
/// the size bounds in force: a stream that holds more than its budget now (a fuller disk at
/// this start, or a smaller `maxBytes`) keeps a bound of what it holds, since shrinking it here
/// would drop its oldest messages before any reader could say it has saved them. The smaller
/// bound is applied later, once the readers have saved everything (see `apply_budget`).
pub(crate) async fn ensure_streams(
    js: &jetstream::Context,
    settings: &StreamSettings,
    budget: &Budget,
) -> Result<Budget, BusError> {
    let mut in_force = *budget;
    let streams = [
        (
            &settings.name,
            EVENTS_PREFIX,
            "northstar accepted events (log of record)",
            settings.max_age,
            budget.events,
        ),
        (
            &settings.rejected_name,
            REJECTED_PREFIX,
            "northstar rejected messages",
            settings.rejected_max_age,
            budget.rejected,
        ),
    ];
    for (index, (name, prefix, description, max_age, wanted)) in streams.into_iter().enumerate() {
        // A stream keeps the incarnation it was given; one made before incarnations (or by
        // hand) gets one now.
        let info = match js.get_stream(name.as_str()).await {
            Ok(mut handle) => handle.info().await.ok().cloned(),
            Err(_) => None,
        };
        let existing = info
            .as_ref()
            .and_then(|info| marked_incarnation(&info.config));
        let held = info.as_ref().map_or(0, |info| info.state.bytes);
        let max_bytes = kept_bound(wanted, held);
        if max_bytes != wanted {
            tracing::warn!(
                stream = %name,
                wanted,
                held,
                "the stream holds more than its size bound: the bound stays at what it holds until its readers have saved it all"
            );
        }
        match index {
            0 => in_force.events = max_bytes,
            _ => in_force.rejected = max_bytes,
        }
        let incarnation = existing
            .unwrap_or_else(|| format!("{INCARNATION_PREFIX}{}", uuid::Uuid::now_v7().simple()));
        let config = stream::Config {
            name: name.clone(),
            description: Some(format!("{description} [{incarnation}]")),
            subjects: vec![format!("{prefix}.>")],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: settings.duplicate_window.get(),
            max_age: max_age.get(),
            max_bytes,
            num_replicas: settings.replicas,
            ..Default::default()
        };
        js.create_or_update_stream(config)
            .await
            .map_err(|e| replicas_refused(e.to_string(), settings.replicas))?;
    }
    Ok(in_force)
}

/// A stream refused: said plainly when it asked for replicas a single server cannot give.
fn replicas_refused(message: String, replicas: usize) -> BusError {
    let single = message.contains("non-clustered") || message.contains("insufficient resources");
    let message = if replicas > 1 && single {
        format!(
            "stream.replicas is {replicas}, but the NATS server is not a cluster of at least {replicas} JetStream servers ({message}): \
             start northstar against such a cluster (--nats-url with each server's URL), or set stream.replicas to 1"
        )
    } else {
        message
    };
    BusError::Management {
        action: "create or update stream",
        message,
    }
}

/// The size bound a stream holding `held` bytes is given when `wanted` (`-1`: none): never
/// below what it holds.
fn kept_bound(wanted: i64, held: u64) -> i64 {
    let held = i64::try_from(held).unwrap_or(i64::MAX);
    if wanted >= 0 && held > wanted {
        held
    } else {
        wanted
    }
}

/// Sets the events stream's size bound to `max_bytes` (once its readers have saved what a
/// smaller bound would drop).
pub(crate) async fn apply_budget(
    js: &jetstream::Context,
    stream: &str,
    max_bytes: i64,
) -> Result<(), BusError> {
    let mut handle = js
        .get_stream(stream)
        .await
        .map_err(management("get stream"))?;
    let mut config = handle
        .info()
        .await
        .map_err(management("stream info"))?
        .config
        .clone();
    config.max_bytes = max_bytes;
    js.update_stream(config)
        .await
        .map_err(management("update stream"))?;
    Ok(())
}

/// The subject an event is published on: `events.<shard>.<type>`, the shard chosen by
/// customer so that one archiver or meter per shard sees all of a customer's events.
pub(crate) fn subject_for(shards: u32, shard_key: &str, kind: &str) -> String {
    let shard = if shards <= 1 {
        0
    } else {
        fnv1a(shard_key.as_bytes()) % shards
    };
    format!("{EVENTS_PREFIX}.{shard}.{kind}")
}

/// Subject of a rejected message from `source`.
pub(crate) fn rejected_subject(source: &str) -> String {
    format!("{REJECTED_PREFIX}.{}", subject_token(source))
}

/// A name as a single NATS subject token (anything but letters, digits, `_`, `-` becomes `_`).
pub(crate) fn subject_token(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Wraps a JetStream management failure with what we were doing.
fn management<E: std::fmt::Display>(action: &'static str) -> impl Fn(E) -> BusError {
    move |e| BusError::Management {
        action,
        message: e.to_string(),
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Settings of a durable pull consumer that acks in commits.
pub(crate) struct DurableSpec<'a> {
    /// Stream to read.
    pub stream: &'a str,
    /// Durable name (`archiver-events`, …).
    pub name: &'a str,
    /// Deliver from the message after this stream sequence (the caller's committed position).
    pub after_seq: u64,
    /// Most messages delivered and not yet acked; must exceed what one commit holds.
    pub max_ack_pending: i64,
    /// Redeliver what is not acked after this long; must exceed the commit interval.
    pub ack_wait: Duration,
    /// `All` for consumers that ack after each commit (the archiver); `None` for consumers
    /// whose position lives in their own snapshot (the meter).
    pub ack_policy: consumer::AckPolicy,
}

/// Reads a pull consumer as a stream of messages: batches of up to 1,000, a heartbeat every 5 s
/// (a dead connection is noticed), each pull request expiring after 30 s.
pub(crate) async fn pull_messages(
    consumer: &consumer::PullConsumer,
) -> Result<consumer::pull::Stream, BusError> {
    consumer
        .stream()
        .max_messages_per_batch(1_000)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| BusError::Management {
            action: "consume",
            message: e.to_string(),
        })
}

/// Gets the durable consumer positioned right after `after_seq`, recreating it when its own
/// position disagrees with the caller's (the caller's commit record is the truth: acks may
/// be lost in a crash, and a wiped data dir must be refilled from the stream).
pub(crate) async fn durable_consumer(
    js: &jetstream::Context,
    spec: &DurableSpec<'_>,
) -> Result<consumer::PullConsumer, BusError> {
    let stream = js
        .get_stream(spec.stream)
        .await
        .map_err(management("get stream"))?;
    match stream
        .get_consumer::<consumer::pull::Config>(spec.name)
        .await
    {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(management("consumer info"))?;
            if info.ack_floor.stream_sequence == spec.after_seq && info.num_ack_pending == 0 {
                return Ok(existing);
            }
            tracing::info!(
                consumer = spec.name,
                ack_floor = info.ack_floor.stream_sequence,
                committed = spec.after_seq,
                "repositioning consumer to the committed sequence"
            );
            stream
                .delete_consumer(spec.name)
                .await
                .map_err(management("delete consumer"))?;
        }
        // Only a consumer that is really absent is created; any other failure is retried by
        // the caller, so a transient error never updates a consumer in place.
        Err(error) if error.to_string().contains("not found") => {}
        Err(error) => return Err(management("get consumer")(error)),
    }
    let deliver_policy = if spec.after_seq == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: spec.after_seq + 1,
        }
    };
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(spec.name.to_string()),
            description: Some("northstar: acked after each commit".into()),
            deliver_policy,
            ack_policy: spec.ack_policy,
            ack_wait: spec.ack_wait,
            max_ack_pending: if spec.ack_policy == consumer::AckPolicy::None {
                -1
            } else {
                spec.max_ack_pending
            },
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .map_err(management("create consumer"))
}

/// Last sequence stored in a stream (0 when empty), for lag metrics and waits.
pub async fn last_sequence(js: &jetstream::Context, stream: &str) -> Result<u64, BusError> {
    Ok(sequences(js, stream).await?.1)
}

/// The first sequence a stream still holds (retention drops the oldest: 1 on a stream that
/// kept everything, last + 1 on one emptied by retention) and its last one, read together.
pub async fn sequences(js: &jetstream::Context, stream: &str) -> Result<(u64, u64), BusError> {
    let mut stream = js
        .get_stream(stream)
        .await
        .map_err(management("get stream"))?;
    let info = stream.info().await.map_err(management("stream info"))?;
    Ok((info.state.first_sequence, info.state.last_sequence))
}

/// Which incarnation of `stream` this is (a stream deleted and made anew is another one):
/// state derived from a stream records it, and is set aside when it does not match.
pub(crate) async fn stream_incarnation(
    js: &jetstream::Context,
    stream: &str,
) -> Result<String, BusError> {
    let mut handle = js
        .get_stream(stream)
        .await
        .map_err(management("get stream"))?;
    let info = handle.info().await.map_err(management("stream info"))?;
    Ok(incarnation(info))
}

/// Marks an incarnation in a stream's description: `[ns-<uuid>]`.
const INCARNATION_PREFIX: &str = "ns-";

/// The incarnation of a stream: the id [`ensure_streams`] wrote in its description when it
/// made the stream. Its creation time is no substitute: nats-server 2.9 does not keep it
/// across restarts, so a stream would look made anew at every start.
pub(crate) fn incarnation(info: &stream::Info) -> String {
    marked_incarnation(&info.config).unwrap_or_else(|| info.created.to_string())
}

fn marked_incarnation(config: &stream::Config) -> Option<String> {
    let description = config.description.as_deref()?;
    let start = description.rfind(&format!("[{INCARNATION_PREFIX}"))? + 1;
    let end = start + description[start..].find(']')?;
    Some(description[start..end].to_string())
}

/// Whether state saved against incarnation `saved` belongs to the stream now at `current`.
/// State saved before incarnations existed holds a creation time (unreliable, see
/// [`incarnation`]): it is taken as belonging, and its sequence checks still apply.
pub(crate) fn same_incarnation(saved: &str, current: &str) -> bool {
    !saved.starts_with(INCARNATION_PREFIX) || saved == current
}

/// Deletes consumers of `stream` that are no longer used (an upgrade from a release that had
/// them). Best effort: one that is not there, or a server that refuses, changes nothing.
pub(crate) async fn delete_consumers(js: &jetstream::Context, stream: &str, names: &[&str]) {
    let Ok(stream) = js.get_stream_no_info(stream).await else {
        return;
    };
    for name in names {
        if stream.delete_consumer(name).await.is_ok() {
            tracing::info!(
                consumer = name,
                "deleted a consumer this release no longer uses"
            );
        }
    }
}

/// The stream sequence of a delivered message.
pub(crate) fn sequence_of(message: &jetstream::Message) -> Option<u64> {
    match message.info() {
        Ok(info) => Some(info.stream_sequence),
        Err(error) => {
            tracing::warn!(%error, "message without JetStream metadata; skipped");
            None
        }
    }
}

/// Whether the stream still holds message `seq`. A consumer that sees a delivery skip a
/// sequence asks this: a skipped sequence that is not in the stream was deleted or aged out
/// (skipping it is right); one that is there was delivered and lost on the way (a cut
/// connection), and acking past it would lose it for good. Unsure means yes.
pub(crate) async fn stream_has(js: &jetstream::Context, stream: &str, seq: u64) -> bool {
    let Ok(stream) = js.get_stream_no_info(stream).await else {
        return true;
    };
    match stream.get_raw_message(seq).await {
        Ok(_) => true,
        Err(error) => {
            !matches!(
                error.kind(),
                jetstream::stream::LastRawMessageErrorKind::NoMessageFound
            ) && !error.to_string().contains("no message found")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_stable_per_key() {
        assert_eq!(subject_for(1, "acme", "track"), "events.0.track");
        let a = subject_for(8, "acme", "track");
        assert_eq!(a, subject_for(8, "acme", "track"));
        assert!(a.starts_with("events."));
    }

    #[test]
    fn a_bound_is_never_set_below_what_the_stream_holds() {
        assert_eq!(kept_bound(1_000, 400), 1_000);
        assert_eq!(
            kept_bound(1_000, 5_000),
            5_000,
            "a fuller disk at start drops nothing"
        );
        assert_eq!(kept_bound(-1, 5_000), -1);
    }

    #[test]
    fn rejected_subjects_are_one_token() {
        assert_eq!(rejected_subject("web app.v1"), "rejected.web_app_v1");
    }

    #[test]
    fn the_incarnation_is_read_from_the_description_and_old_state_still_belongs() {
        let config = stream::Config {
            description: Some("northstar accepted events [ns-0190abc]".into()),
            ..Default::default()
        };
        assert_eq!(marked_incarnation(&config).as_deref(), Some("ns-0190abc"));
        let bare = stream::Config {
            description: Some("made by hand".into()),
            ..Default::default()
        };
        assert_eq!(marked_incarnation(&bare), None);
        assert!(same_incarnation("ns-a", "ns-a"));
        assert!(!same_incarnation("ns-a", "ns-b"), "a stream made anew");
        assert!(same_incarnation("2026-12-01 22:35:42.1 +00:00:00", "ns-b"));
    }
}
