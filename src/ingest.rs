//! Ingest: SDK requests in, validated events published to JetStream, answer after the acks.
//!
//! - [`body`] decodes request bodies (gzip, PostHog's encodings) within the size bound;
//! - [`auth`] finds the source of a write key;
//! - [`segment`] and [`posthog`] turn each wire's messages into [`EventRecord`]s;
//! - [`fast`] takes the common Segment batch message straight to its stream message;
//! - [`normalize`] holds the rules both wires share.
//!
//! A request is answered 200 only when JetStream has acked every accepted event and every
//! rejected message; a message that fails validation goes to the rejected store and never
//! costs its neighbours their place.

pub mod auth;
pub mod backlog;
pub mod body;
pub mod check;
pub mod fast;
pub mod import;
pub mod normalize;
pub mod posthog;
pub mod segment;

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::bus::publisher::Outgoing;
use crate::bus::streams::rejected_subject;
use crate::bus::{BusError, Publisher, subject_for};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Classify, ErrorKind};
use crate::event::{EventRecord, EventType};
use crate::metrics::Metrics;
use crate::rejected::RejectedRecord;
use crate::schema::{Decision, Registry};

pub use auth::WriteKeys;
pub use body::Encoding;
use normalize::Rejection;

/// Most per-message errors listed in one answer (the counts are always complete).
const MAX_LISTED_ERRORS: usize = 100;

/// Why a whole request was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body could not be decoded (bad gzip, base64, form).
    #[error("{0}")]
    InvalidBody(String),
    /// The body is not the JSON the route expects.
    #[error("{0}")]
    InvalidJson(String),
    /// Over a size or count bound.
    #[error("{0}")]
    TooLarge(String),
    /// No write key anywhere the wire allows one.
    #[error(
        "missing write key: send it as HTTP Basic user name, `writeKey` or `api_key` in the body"
    )]
    MissingKey,
    /// A write key was sent but is not one of ours.
    #[error("invalid write key")]
    BadKey,
    /// The write key sent more events than its rate allows.
    #[error("rate limit of this write key exceeded; retry in {retry_after} s")]
    RateLimited {
        /// Seconds until the request would fit.
        retry_after: u64,
    },
    /// JetStream is unavailable; nothing the client needs to know was half-stored.
    #[error(transparent)]
    Unavailable(#[from] BusError),
    /// A reader of the stream is too far behind (`ingest.maxLag`, `ingest.maxArchiveLag`):
    /// nothing was stored.
    #[error(transparent)]
    Behind(#[from] backlog::Behind),
    /// A disk northstar writes to is below its reserve (`storage.minFreeMb`): nothing was stored.
    #[error(transparent)]
    DiskFull(#[from] crate::disk::DiskFull),
}

impl Classify for IngestError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidBody(_) | Self::InvalidJson(_) => ErrorKind::InvalidInput,
            Self::TooLarge(_) => ErrorKind::TooLarge,
            Self::MissingKey | Self::BadKey => ErrorKind::Unauthorized,
            Self::RateLimited { .. } => ErrorKind::RateLimited,
            Self::Unavailable(_) | Self::Behind(_) | Self::DiskFull(_) => ErrorKind::Unavailable,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after } => Some(*retry_after),
            Self::Unavailable(_) | Self::Behind(_) => Some(1),
            Self::DiskFull(_) => Some(crate::disk::RETRY_AFTER_SECS),
            _ => None,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::InvalidBody(_) => "invalid_body",
            Self::InvalidJson(_) => "invalid_json",
            Self::TooLarge(_) => "payload_too_large",
            Self::MissingKey => "missing_write_key",
            Self::BadKey => "invalid_write_key",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "stream_unavailable",
            Self::Behind(_) => "overloaded",
            Self::DiskFull(_) => "disk_full",
        }
    }
}

/// Which wire a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Segment `/v1/batch` (`None`) or a single-message route of the given type.
    Segment(Option<EventType>),
    /// PostHog capture routes.
    PostHog,
}

/// One ingest request, as the HTTP layer hands it over.
pub struct IngestRequest<'a> {
    /// The route, recorded with rejected messages.
    pub route: &'a str,
    /// The `Authorization` header.
    pub authorization: Option<&'a str>,
    /// How the body is encoded.
    pub encoding: Encoding,
    /// The body as received.
    pub body: &'a [u8],
}

/// One message that was not accepted, as listed in the answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MessageError {
    /// Position in the batch (0 for single-message routes).
    pub index: usize,
    /// The offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// The answer to an accepted request.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Always true: the request was stored (rejected messages included, in the rejected store).
    pub success: bool,
    /// Events newly stored.
    pub accepted: usize,
    /// Events whose id was already stored (a retry); not stored twice.
    pub duplicates: usize,
    /// Messages sent to the rejected store.
    pub rejected: usize,
    /// Events of a sampled event type that fell outside the sample (not stored, by design).
    #[serde(skip_serializing_if = "is_zero")]
    pub sampled_out: usize,
    /// Why, for the first messages rejected.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<MessageError>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Turns requests into published events.
#[derive(Clone)]
pub struct Ingestor {
    config: Arc<Config>,
    keys: WriteKeys,
    limiters: Arc<Vec<governor::DefaultDirectRateLimiter>>,
    registry: Arc<Registry>,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    clock: Clock,
    backlog: Arc<backlog::Backlog>,
    disk: Arc<crate::disk::DiskGuard>,
    jetstream: Arc<crate::bus::watch::JetStreamHealth>,
    stored: Arc<std::sync::OnceLock<OnStored>>,
    admits: Arc<std::sync::OnceLock<Admits>>,
}

/// Told of each event newly stored, with its stream sequence and message, once JetStream
/// acked it and before the client is answered (the meter takes it in here).
pub(crate) type OnStored = Box<dyn Fn(u64, &[u8]) + Send + Sync>;

/// Asked of each event about to be published, with its stream message: `Err` when storing it
/// would add an id to state past that state's bound (the meter's customers). The event goes
/// to the rejected store with the reason, and can be replayed once the bound is raised.
pub(crate) type Admits = Box<dyn Fn(&[u8]) -> Result<(), Rejection> + Send + Sync>;

impl Ingestor {
    /// An ingestor publishing through `publisher`, validating with `registry`.
    pub fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        publisher: Publisher,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        let keys = WriteKeys::from_config(&config);
        let per_second = std::num::NonZeroU32::new(config.ingest.rate_limit_per_second)
            .unwrap_or(std::num::NonZeroU32::MAX);
        let burst = std::num::NonZeroU32::new(config.ingest.rate_limit_burst).unwrap_or(per_second);
        let quota = governor::Quota::per_second(per_second).allow_burst(burst);
        let limiters = Arc::new(
            (0..keys.len())
                .map(|_| governor::RateLimiter::direct(quota))
                .collect(),
        );
        let backlog = Arc::new(backlog::Backlog::new(
            config.ingest.max_lag,
            config.ingest.max_archive_lag,
        ));
        let config_reserve = config.storage.min_free_bytes();
        Self {
            config,
            keys,
            limiters,
            registry,
            publisher,
            metrics,
            clock,
            backlog,
            disk: Arc::new(crate::disk::DiskGuard::new(config_reserve)),
            jetstream: Arc::default(),
            stored: Arc::new(std::sync::OnceLock::new()),
            admits: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Sets what is told of each newly stored event (once; later calls change nothing).
    pub fn on_stored(&self, hook: OnStored) {
        let _ = self.stored.set(hook);
    }

    /// Sets what each event must pass to be published (once; later calls change nothing).
    pub fn admits(&self, hook: Admits) {
        let _ = self.admits.set(hook);
    }

    /// The disk guard ingest refuses by; the server runs its readings.
    pub fn disk(&self) -> &Arc<crate::disk::DiskGuard> {
        &self.disk
    }

    /// Whether JetStream answers, as the server's watcher last saw (ingest refuses at once
    /// while it does not, instead of waiting for each publish to time out).
    pub fn jetstream(&self) -> &Arc<crate::bus::watch::JetStreamHealth> {
        &self.jetstream
    }

    /// The backlog ingest sheds by; the server points it at the readers once they run.
    pub fn backlog(&self) -> &Arc<backlog::Backlog> {
        &self.backlog
    }

    /// The write keys of every source.
    pub fn write_keys(&self) -> &WriteKeys {
        &self.keys
    }

    /// Whether the stream takes writes now: its readers are within their bounds, the disks
    /// above their reserve, JetStream up. Every write to the events stream passes it: ingest,
    /// rejected-store replay, and (through the meter's gate) consumes.
    pub fn admit(&self) -> Result<(), IngestError> {
        admit_writes(&self.backlog, &self.disk, &self.jetstream, &self.metrics)
    }

    /// [`Ingestor::admit`] as a function of its own, for writers outside ingest (the meter's
    /// consumes), given how many events the write adds: refused as well when those would
    /// take a reader past its bound.
    pub fn admission(&self) -> impl Fn(u64) -> Result<(), IngestError> + Send + Sync + 'static {
        let (backlog, disk) = (self.backlog.clone(), self.disk.clone());
        let (jetstream, metrics) = (self.jetstream.clone(), self.metrics.clone());
        move |events| {
            admit_writes(&backlog, &disk, &jetstream, &metrics)?;
            match backlog.reserve(events, events * CONSUME_EVENT_BYTES) {
                Ok(_) => Ok(()),
                Err(behind) => {
                    metrics.ingest_shed.inc();
                    Err(behind.into())
                }
            }
        }
    }

    /// Handles one request of either wire.
    pub async fn ingest(
        &self,
        wire: Wire,
        request: IngestRequest<'_>,
    ) -> Result<IngestOutcome, IngestError> {
        self.admit()?;
        let limits = &self.config.ingest;
        let body = body::decode(request.body, &request.encoding, limits.max_batch_bytes)?;
        let received_at = self.clock.now_micros();
        let header_keys = [
            auth::basic_user(request.authorization),
            auth::bearer_token(request.authorization).map(str::to_string),
        ];
        let header_source = self
            .keys
            .authenticate(&[header_keys[0].as_deref(), header_keys[1].as_deref()])
            .ok()
            .map(str::to_string);

        let parsed = match wire {
            Wire::Segment(route) => self.parse_segment(&body, route, &header_keys, received_at),
            Wire::PostHog => self.parse_posthog(&body, request.route, &header_keys, received_at),
        };
        let batch = match parsed {
            Ok(batch) => batch,
            Err(error) => {
                if let (Some(source), IngestError::InvalidJson(reason)) = (&header_source, &error) {
                    // An authenticated but unreadable body is kept, not dropped.
                    let record = RejectedRecord::new(
                        &self.keys.redact(&body),
                        vec![Rejection::new(".", reason.clone())],
                        source,
                        request.route,
                        None,
                        received_at,
                    );
                    self.publish(Vec::new(), vec![(0, record)]).await?;
                }
                return Err(error);
            }
        };
        let mut outcome = self.publish(batch.events, batch.rejected).await?;
        outcome.sampled_out = batch.sampled_out;
        Ok(outcome)
    }

    fn parse_segment(
        &self,
        body: &[u8],
        route: Option<EventType>,
        header_keys: &[Option<String>; 2],
        received_at: i64,
    ) -> Result<ParsedBatch<'_>, IngestError> {
        let limits = &self.config.ingest;
        match route {
            None => {
                let envelope: segment::BatchEnvelope<'_> =
                    serde_json::from_slice(body).map_err(|e| {
                        IngestError::InvalidJson(format!("body must be {{\"batch\": [...]}}: {e}"))
                    })?;
                if envelope.batch.len() > limits.max_batch_messages {
                    return Err(IngestError::TooLarge(format!(
                        "batch has {} messages; the limit is {}",
                        envelope.batch.len(),
                        limits.max_batch_messages
                    )));
                }
                let source =
                    self.authenticate(header_keys, envelope.write_key(), envelope.batch.len())?;
                let inherited = envelope.inherited();
                let mut batch =
                    ParsedBatch::new(&self.config, &self.registry, &self.keys, self.admits.get());
                let fast_batch = fast::Batch {
                    inherited,
                    source: &source,
                    received_at,
                    registry: &self.registry,
                    shards: self.config.stream.shards,
                    max_message_bytes: limits.max_message_bytes,
                    time_bounds: normalize::TimeBounds::of(&self.config),
                    keys: &self.keys,
                };
                for (index, raw) in envelope.batch.iter().enumerate() {
                    if raw.get().len() <= limits.max_message_bytes {
                        match fast::normalize(raw.get(), &fast_batch) {
                            fast::Fast::Ready(outgoing) => {
                                let raw = raw.get().as_bytes();
                                batch.take(index, outgoing, raw, &source, "/v1/batch", received_at);
                                continue;
                            }
                            fast::Fast::SampledOut => {
                                batch.sampled_out += 1;
                                continue;
                            }
                            fast::Fast::Fallback => {}
                        }
                    }
                    let raw = raw.get().as_bytes();
                    let result = self.check_size(raw).and_then(|()| {
                        let message = parse_object(raw)?;
                        self.check_merged_size(raw, &message, inherited)?;
                        segment::normalize(message, None, inherited, &source, received_at)
                    });
                    batch.push(index, result, raw, &source, "/v1/batch", received_at);
                }
                Ok(batch)
            }
            Some(kind) => {
                if body.len() > limits.max_message_bytes {
                    return Err(IngestError::TooLarge(format!(
                        "message is {} bytes; the limit is {}",
                        body.len(),
                        limits.max_message_bytes
                    )));
                }
                let message: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
                    IngestError::InvalidJson(format!("body must be a JSON object: {e}"))
                })?;
                let body_key = message.get("writeKey").and_then(Value::as_str);
                let source = self.authenticate(header_keys, body_key, 1)?;
                let route_name = format!("/v1/{}", kind.as_str());
                let mut batch =
                    ParsedBatch::new(&self.config, &self.registry, &self.keys, self.admits.get());
                let result = segment::normalize(
                    message,
                    Some(kind),
                    segment::Inherited::default(),
                    &source,
                    received_at,
                );
                batch.push(0, result, body, &source, &route_name, received_at);
                Ok(batch)
            }
        }
    }

    fn parse_posthog(
        &self,
        body: &[u8],
        route: &str,
        header_keys: &[Option<String>; 2],
        received_at: i64,
    ) -> Result<ParsedBatch<'_>, IngestError> {
        let limits = &self.config.ingest;
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| IngestError::InvalidJson(format!("body is not JSON: {e}")))?;
        let capture = posthog::split_body(value).map_err(IngestError::InvalidJson)?;
        if capture.events.len() > limits.max_batch_messages {
            return Err(IngestError::TooLarge(format!(
                "batch has {} events; the limit is {}",
                capture.events.len(),
                limits.max_batch_messages
            )));
        }
        let source = self.authenticate(
            header_keys,
            capture.api_key.as_deref(),
            capture.events.len(),
        )?;
        let mut batch =
            ParsedBatch::new(&self.config, &self.registry, &self.keys, self.admits.get());
        for (index, mut event) in capture.events.into_iter().enumerate() {
            // posthog-js puts the project key in every event's properties: never store it.
            if let Some(properties) = event.get_mut("properties").and_then(Value::as_object_mut)
                && properties
                    .get("token")
                    .and_then(Value::as_str)
                    .is_some_and(|token| self.keys.is_key(token))
            {
                properties.remove("token");
            }
            let raw = serde_json::to_vec(&event).unwrap_or_default();
            let result = self
                .check_size(&raw)
                .and_then(|()| posthog::normalize(event, &source, received_at));
            batch.push(index, result, &raw, &source, route, received_at);
        }
        Ok(batch)
    }

    /// The source of the first valid key among the header keys and the body key.
    /// The source of the first valid key among the header keys and the body key, after
    /// taking `messages` tokens from that key's rate limiter.
    fn authenticate(
        &self,
        header_keys: &[Option<String>; 2],
        body_key: Option<&str>,
        messages: usize,
    ) -> Result<String, IngestError> {
        let (index, source) = self
            .keys
            .authenticate_key(&[
                header_keys[0].as_deref(),
                header_keys[1].as_deref(),
                body_key,
            ])
            .map_err(|presented| {
                if presented {
                    IngestError::BadKey
                } else {
                    IngestError::MissingKey
                }
            })?;
        if let Some(limiter) = self.limiters.get(index) {
            let n = std::num::NonZeroU32::new(u32::try_from(messages.max(1)).unwrap_or(u32::MAX))
                .unwrap_or(std::num::NonZeroU32::MIN);
            match limiter.check_n(n) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ));
                    self.metrics.ingest_rate_limited.inc();
                    return Err(IngestError::RateLimited {
                        retry_after: wait.as_secs().max(1),
                    });
                }
                Err(_) => {
                    return Err(IngestError::TooLarge(format!(
                        "{messages} messages exceed the key's burst limit"
                    )));
                }
            }
        }
        Ok(source.to_string())
    }

    /// The bound on a message as the client sent it.
    fn check_size(&self, raw: &[u8]) -> Result<(), Rejection> {
        let limit = self.config.ingest.max_message_bytes;
        if raw.len() > limit {
            return Err(Rejection::new(
                ".",
                format!("message is {} bytes; the limit is {limit}", raw.len()),
            ));
        }
        Ok(())
    }

    /// The same bound with the batch's `context` and `integrations` merged in, so a large
    /// batch-level context cannot multiply a small request. Only what is really merged
    /// counts (keys the message sets itself are not), and the error says so.
    fn check_merged_size(
        &self,
        raw: &[u8],
        message: &Map<String, Value>,
        inherited: segment::Inherited<'_>,
    ) -> Result<(), Rejection> {
        let limit = self.config.ingest.max_message_bytes;
        let merged = segment::merged_bytes(message, inherited);
        if raw.len() + merged > limit {
            return Err(Rejection::new(
                "context",
                format!(
                    "message is {} bytes, and the batch's context and integrations merged into it add {merged}; the limit is {limit}",
                    raw.len()
                ),
            ));
        }
        Ok(())
    }

    /// Re-submits one message from the rejected store (after a schema fix) through the same
    /// validation as live ingest, as its original source. A message that still fails is left
    /// where it is (no second rejected copy); one accepted before is a duplicate, not stored
    /// twice (its id dedups in JetStream, and the caller skips ids already in Parquet).
    ///
    /// A message sent without an id gets `fallback_id` (the caller derives it from the
    /// rejected row), not a fresh one: replaying it again and again stores it once.
    pub async fn resubmit(
        &self,
        route: &str,
        source: &str,
        payload: &[u8],
        fallback_id: &str,
    ) -> Result<Resubmitted, IngestError> {
        self.admit()?;
        let received_at = self.clock.now_micros();
        let mut batch =
            ParsedBatch::new(&self.config, &self.registry, &self.keys, self.admits.get());
        let segment_route = route.starts_with("/v1/");
        let id_field = if segment_route { "messageId" } else { "uuid" };
        let parsed = parse_object(payload).map(|mut message| {
            if matches!(normalize::id_field(&message, id_field), Ok(None)) {
                message.insert(id_field.into(), Value::String(fallback_id.into()));
            }
            message
        });
        let result = match parsed {
            Err(rejection) => Err(rejection),
            Ok(message) if segment_route => {
                let kind = route.trim_start_matches("/v1/").trim_end_matches('/');
                let route_type = EventType::parse(kind);
                segment::normalize(
                    message,
                    route_type,
                    segment::Inherited::default(),
                    source,
                    received_at,
                )
            }
            Ok(message) => posthog::normalize(Value::Object(message), source, received_at),
        };
        batch.push(0, result, payload, source, route, received_at);
        if let Some((_, record)) = batch.rejected.first() {
            return Ok(Resubmitted::StillRejected(record.reasons.clone()));
        }
        if batch.events.is_empty() {
            return Ok(Resubmitted::SampledOut);
        }
        let outcome = self.publish(batch.events, Vec::new()).await?;
        Ok(if outcome.accepted > 0 {
            Resubmitted::Accepted
        } else {
            Resubmitted::Duplicate
        })
    }

    /// Publishes accepted events and rejected messages, and waits for every ack.
    async fn publish(
        &self,
        events: Vec<Outgoing>,
        rejected: Vec<(usize, RejectedRecord)>,
    ) -> Result<IngestOutcome, IngestError> {
        let event_count = events.len();
        // The events' share of the backlog, held until their acks are recorded: what the
        // admission at the door checked is made good here, whatever else runs at once.
        let bytes: usize = events
            .iter()
            .map(|e| e.payload.len() + e.msg_id.len() + e.subject.len() + MESSAGE_OVERHEAD)
            .sum();
        let _reservation = match self.backlog.reserve(event_count as u64, bytes as u64) {
            Ok(reservation) => reservation,
            Err(behind) => {
                self.metrics.ingest_shed.inc();
                return Err(behind.into());
            }
        };
        let told: Vec<Bytes> = match self.stored.get() {
            Some(_) => events.iter().map(|e| e.payload.clone()).collect(),
            None => Vec::new(),
        };
        let mut outgoing = events;
        outgoing.reserve(rejected.len());
        for (_, record) in &rejected {
            outgoing.push(Outgoing {
                subject: rejected_subject(&record.source),
                msg_id: format!("rej-{}", record.rejected_id),
                payload: Bytes::from(record.to_bus_json()),
            });
        }
        let report = match self.publisher.publish_all(outgoing).await {
            Ok(report) => report,
            Err(error) => {
                self.metrics.ingest_unavailable.inc();
                return Err(error.into());
            }
        };
        let (events_acked, rejected_acked) = report
            .sequences
            .split_at(event_count.min(report.sequences.len()));
        if let Some(last) = events_acked.iter().max() {
            self.backlog.acked(*last);
        }
        if let Some(last) = rejected_acked.iter().max() {
            self.backlog.rejected_acked(*last);
        }
        if let Some(hook) = self.stored.get() {
            let mut repeats = report.duplicates.iter().peekable();
            for (index, (payload, seq)) in told.iter().zip(&report.sequences).enumerate() {
                if repeats.next_if(|i| **i == index).is_none() {
                    hook(*seq, payload);
                }
            }
        }
        // Rejected messages come after the events; only events count as accepted or duplicate.
        let duplicates = report
            .duplicates
            .iter()
            .filter(|i| **i < event_count)
            .count();
        let outcome = IngestOutcome {
            success: true,
            accepted: event_count - duplicates,
            duplicates,
            rejected: rejected.len(),
            sampled_out: 0,
            errors: rejected
                .iter()
                .take(MAX_LISTED_ERRORS)
                .flat_map(|(index, record)| {
                    record.reasons.iter().map(|r| MessageError {
                        index: *index,
                        field: r.field.clone(),
                        message: r.message.clone(),
                    })
                })
                .collect(),
        };
        self.metrics.ingest_accepted.add(outcome.accepted as u64);
        self.metrics
            .ingest_duplicates
            .add(outcome.duplicates as u64);
        self.metrics.ingest_rejected.add(outcome.rejected as u64);
        Ok(outcome)
    }
}

/// What became of a re-submitted rejected message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resubmitted {
    /// Stored now.
    Accepted,
    /// Its id was already stored.
    Duplicate,
    /// Its event type is sampled and it fell outside the sample.
    SampledOut,
    /// Still invalid, for these reasons.
    StillRejected(Vec<Rejection>),
}

/// The messages of one request, sorted into events (ready to publish) and rejected messages.
struct ParsedBatch<'a> {
    events: Vec<Outgoing>,
    rejected: Vec<(usize, RejectedRecord)>,
    sampled_out: usize,
    max_message_bytes: usize,
    time_bounds: normalize::TimeBounds,
    shards: u32,
    registry: &'a Registry,
    keys: &'a WriteKeys,
    admits: Option<&'a Admits>,
}

impl<'a> ParsedBatch<'a> {
    fn new(
        config: &Config,
        registry: &'a Registry,
        keys: &'a WriteKeys,
        admits: Option<&'a Admits>,
    ) -> Self {
        Self {
            events: Vec::new(),
            rejected: Vec::new(),
            sampled_out: 0,
            max_message_bytes: config.ingest.max_message_bytes,
            time_bounds: normalize::TimeBounds::of(config),
            shards: config.stream.shards,
            registry,
            keys,
            admits,
        }
    }

    /// Adds one message's outcome (its stored form is bounded by [`prepare`]).
    fn push(
        &mut self,
        index: usize,
        result: Result<EventRecord, Rejection>,
        raw: &[u8],
        source: &str,
        route: &str,
        received_at: i64,
    ) {
        let result = result.and_then(|mut event| {
            self.keys.scrub(&mut event.properties, &mut event.context);
            prepare(
                event,
                self.registry,
                self.shards,
                self.max_message_bytes,
                self.time_bounds,
            )
        });
        match result {
            Ok(Some(outgoing)) => self.take(index, outgoing, raw, source, route, received_at),
            Ok(None) => self.sampled_out += 1,
            Err(reason) => self.reject(index, reason, raw, source, route, received_at),
        }
    }

    /// Adds an event ready to publish, unless storing it would pass a state's bound: then
    /// the message goes to the rejected store with the reason.
    fn take(
        &mut self,
        index: usize,
        outgoing: Outgoing,
        raw: &[u8],
        source: &str,
        route: &str,
        received_at: i64,
    ) {
        match self
            .admits
            .map_or(Ok(()), |admits| admits(&outgoing.payload))
        {
            Ok(()) => self.events.push(outgoing),
            Err(reason) => self.reject(index, reason, raw, source, route, received_at),
        }
    }

    fn reject(
        &mut self,
        index: usize,
        reason: Rejection,
        raw: &[u8],
        source: &str,
        route: &str,
        received_at: i64,
    ) {
        let event_id = serde_json::from_slice::<Value>(raw).ok().and_then(|v| {
            ["messageId", "uuid"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
        });
        let raw = self.keys.redact(raw);
        let record = RejectedRecord::new(&raw, vec![reason], source, route, event_id, received_at);
        self.rejected.push((index, record));
    }
}

/// Bytes a stream message takes beside its payload, its id and its subject (JetStream's
/// record header and our headers), for the backlog's reckoning of what a request adds.
const MESSAGE_OVERHEAD: usize = 64;

/// Bytes a consume's usage event takes in the stream, about (for the backlog's reckoning).
const CONSUME_EVENT_BYTES: u64 = 512;

/// See [`Ingestor::admit`].
fn admit_writes(
    backlog: &backlog::Backlog,
    disk: &crate::disk::DiskGuard,
    jetstream: &crate::bus::watch::JetStreamHealth,
    metrics: &Metrics,
) -> Result<(), IngestError> {
    if let Err(behind) = backlog.admit() {
        metrics.ingest_shed.inc();
        return Err(behind.into());
    }
    if let Err(full) = disk.admit() {
        metrics.ingest_disk_full.inc();
        return Err(full.into());
    }
    if !jetstream.is_up() {
        metrics.ingest_unavailable.inc();
        return Err(BusError::JetStreamDown.into());
    }
    Ok(())
}

/// Bytes the stored form of a message may take beyond twice `ingest.maxMessageBytes`.
const STORED_SLACK: usize = 8 * 1024;

/// The most bytes a message takes as stored. `ingest.maxMessageBytes` bounds what the client
/// sent (and the batch context merged in); the stored form adds northstar's own fields (ids,
/// times, source, schema version) and the registry's tags, which name at most what the
/// message holds, so a message within the bound as sent always fits.
pub(crate) fn stored_bound(max_message_bytes: usize) -> usize {
    max_message_bytes
        .saturating_mul(2)
        .saturating_add(STORED_SLACK)
}

/// What becomes of a normalised event: the registry's decision, then the stream message (or
/// `None` when the event is sampled out). The message as sent was bounded at the door; the
/// stored form is bounded too ([`stored_bound`]), so nothing unbounded reaches the stream.
pub(crate) fn prepare(
    mut event: EventRecord,
    registry: &Registry,
    shards: u32,
    max_message_bytes: usize,
    time_bounds: normalize::TimeBounds,
) -> Result<Option<Outgoing>, Rejection> {
    normalize::within_skew(event.timestamp, event.received_at, time_bounds)?;
    if let (EventType::Track, Some(name)) = (event.kind, &event.event) {
        match registry.decide(name, &event.event_id, &event.properties, &mut event.context) {
            Decision::Accept {
                schema_version,
                sample_rate,
            } => {
                event.schema_version = schema_version;
                event.sample_rate = sample_rate;
            }
            Decision::SampledOut => return Ok(None),
            Decision::Reject(violations) => return Err(joined(violations)),
        }
    }
    let payload = event.to_bus_json();
    let stored_limit = stored_bound(max_message_bytes);
    if payload.len() > stored_limit {
        return Err(Rejection::new(
            "context",
            format!(
                "the message as stored is {} bytes with the fields northstar adds and the registry's tags; the stored bound is {stored_limit} (twice ingest.maxMessageBytes and {STORED_SLACK} bytes)",
                payload.len(),
            ),
        ));
    }
    let shard_key = event.customer_id.as_deref().unwrap_or(&event.event_id);
    Ok(Some(Outgoing {
        subject: subject_for(shards, shard_key, event.kind.as_str()),
        msg_id: event.event_id,
        payload: Bytes::from(payload),
    }))
}

/// Every violation in one rejection, named by the first one's field.
fn joined(violations: Vec<Rejection>) -> Rejection {
    let mut violations = violations.into_iter();
    let Some(first) = violations.next() else {
        return Rejection::new(".", "rejected by the schema registry");
    };
    let more = violations
        .map(|v| format!("; {}: {}", v.field, v.message))
        .collect::<String>();
    Rejection::new(first.field, format!("{}{more}", first.message))
}

/// Parses one message as a JSON object.
pub(crate) fn parse_object(raw: &[u8]) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Rejection::new(".", "each message must be a JSON object")),
        Err(e) => Err(Rejection::new(".", format!("not valid JSON: {e}"))),
    }
}
