//! The sections of the config file. Each has defaults for what the seed leaves out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::HumanDuration;

/// Highest `metering.maxQuantity` the config takes. The meter's decimals hold 28 digits: with
/// 10 decimal places, a period's sum is exact up to about 7.9 × 10^18, which is 7,900 events
/// at this ceiling or 7.9 million at the default (10^12) for one customer in one period. Past
/// Decimal's range a counter saturates instead of overflowing (see `meter::state`).
pub(crate) const MAX_QUANTITY_CEILING: u64 = 1_000_000_000_000_000;

/// The seed's `northStarMetric`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NorthStarMetric {
    /// The event that marks value delivered (the activation analysis' North Star event).
    pub event: String,
    /// "At least this many times"; replaced at run time by the current activation result.
    #[serde(default)]
    pub threshold: Option<u32>,
    /// "Within this long of signup".
    #[serde(default)]
    pub window: Option<HumanDuration>,
}

/// A planned event.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EventSpec {
    /// Event name as sent by SDKs (`track` event / PostHog `event`).
    pub name: String,
    /// The planned properties: the seed's plain list of names, or a JSON Schema (draft
    /// 2020-12) of the properties object.
    #[serde(default)]
    pub properties: PropertySpec,
    /// SchemaVer of the event's schema (`MODEL-REVISION-ADDITION`), stored on each event.
    #[serde(default)]
    pub version: Option<String>,
    /// What happens to an event that breaks its schema (default: `tag`).
    #[serde(default)]
    pub policy: Option<Policy>,
    /// Keep only this fraction of the events (deterministic by event id; the rate is stored
    /// on each kept row). Not allowed on metered events.
    #[serde(default)]
    pub sample_rate: Option<f64>,
    /// Named triggers fired once per accepted event (e.g. `onboarding_start`).
    #[serde(default)]
    pub triggers: Vec<String>,
    /// Makes this event a usage meter.
    #[serde(default)]
    pub metering: Option<Metering>,
}

/// The properties of a planned event.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PropertySpec {
    /// The seed's form: the names of the planned properties.
    Names(Vec<String>),
    /// A JSON Schema of the properties object.
    Schema(serde_json::Map<String, serde_json::Value>),
}

impl Default for PropertySpec {
    fn default() -> Self {
        Self::Names(Vec::new())
    }
}

/// What the registry does with an event that breaks its schema (or is unplanned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Send it to the rejected store with the violations.
    Reject,
    /// Accept it, with the violations recorded in `context.schema_violations`.
    Tag,
    /// Accept it as it is.
    Allow,
}

/// The schema registry's defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RegistrySettings {
    /// Events the config does not plan.
    pub unplanned: Policy,
    /// Properties a planned event's property list does not name.
    pub unplanned_properties: Policy,
    /// Default policy of planned events that break their schema.
    pub violations: Policy,
    /// Directory of `<event>.json` JSON Schemas (beside those in the config).
    pub schema_dir: String,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            unplanned: Policy::Tag,
            unplanned_properties: Policy::Tag,
            violations: Policy::Tag,
            schema_dir: "schemas/events".into(),
        }
    }
}

/// How an event turns into usage of a feature.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metering {
    /// The usage feature this event counts against (`usageFeatures[].id`).
    pub feature_id: String,
    /// How quantities combine within a period.
    pub aggregation: Aggregation,
    /// Unit name, for people (`request`, `GB`, …).
    #[serde(default)]
    pub unit: Option<String>,
    /// Property that carries the quantity; without it each event counts one unit.
    #[serde(default)]
    pub value_property: Option<String>,
    /// Properties that split the meter into separate series.
    #[serde(default)]
    pub group_by: Vec<String>,
}

/// Aggregation of a meter over a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Sum of quantities.
    Sum,
    /// Number of events.
    Count,
    /// Largest quantity seen.
    Max,
    /// Number of distinct values of `valueProperty`.
    UniqueCount,
    /// The last quantity seen (by event time).
    Latest,
}

/// A metered feature and its limits per plan.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UsageFeature {
    /// Feature id that meters refer to.
    pub id: String,
    /// Limit per plan name within one usage period; `null` means unlimited. A plan that is
    /// not listed has no access to the feature.
    #[serde(default)]
    pub limits: BTreeMap<String, Option<u64>>,
    /// Plans whose limit is soft: usage past it is allowed and reported as overage. Limits
    /// are hard everywhere else (the seed's pitfall 4).
    #[serde(default)]
    pub soft_limits: Vec<String>,
    /// Usage per plan at which the customer is suspended (403 `customer_suspended`) until an
    /// admin lifts it: the free-tier abuse cap of the seed's pitfall 3.
    #[serde(default)]
    pub hard_caps: BTreeMap<String, u64>,
    /// Prices; `overage` is the price of one unit past the limit.
    #[serde(default)]
    pub pricing: Option<Pricing>,
    /// Usage this period (in units) at which a threshold event is also published, on every
    /// plan (limited or not): "you have used 900 calls". Beside `metering.thresholds`, which
    /// are fractions of the plan's limit; at most eight of the two together.
    #[serde(default)]
    pub thresholds: Vec<u64>,
}

/// The seed's `pricing` block.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pricing {
    /// Price per unit past the limit, in the account's currency.
    #[serde(default)]
    pub overage: Option<f64>,
}

/// A source of events and the write keys it may use.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceSpec {
    /// Stored in each event's `source` column.
    pub name: String,
    /// Keys accepted for this source (Segment write key / PostHog api_key).
    #[serde(default)]
    pub write_keys: Vec<String>,
}

/// Bounds of the ingest API. Defaults are Segment's documented limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct IngestSettings {
    /// Largest single message, in bytes of JSON.
    pub max_message_bytes: usize,
    /// Largest request body after decompression.
    pub max_batch_bytes: usize,
    /// Most messages in one batch.
    pub max_batch_messages: usize,
    /// How long a request may take from first byte to answer.
    pub request_timeout: HumanDuration,
    /// How long a request's body may take to arrive once its headers are in (within
    /// `requestTimeout`); past it, 408. A request holds no place among the concurrent ones
    /// until its body is in, so clients that announce a body and send none block nobody.
    pub body_timeout: HumanDuration,
    /// Most requests handled at once, counted once their body is in; past it, 503 with
    /// `Retry-After`. `/healthz` and `/metrics` are not counted.
    pub max_concurrent_requests: usize,
    /// Most open connections from one client (an IPv4 address, or an IPv6 /64: one host's
    /// addresses); connections past it are closed at once.
    pub max_connections_per_client: usize,
    /// Most open connections in all; past it new connections are closed at once. It bounds
    /// what clients with many addresses can hold, and the per-client table with it.
    pub max_connections: usize,
    /// Most requests of one client address in progress (reading the body or being handled);
    /// past it, 429 with `Retry-After`. One address cannot take every place.
    pub max_requests_per_client: usize,
    /// Events per second each write key may send (token bucket; past it, 429 with
    /// `Retry-After`).
    pub rate_limit_per_second: u32,
    /// Events a write key may send in a burst above its rate.
    pub rate_limit_burst: u32,
    /// How far ahead of its arrival an event's time may be. A later one is rejected
    /// (`timestamp`): metering periods follow event time, so a client clock must not be able
    /// to open next year's period.
    pub max_future_skew: HumanDuration,
    /// How long before its arrival an event's time may be; an older one is rejected
    /// (`timestamp`). Longer than the longest usage period (a year), so every period the
    /// meter holds takes all its events, and short enough that a client clock at the epoch
    /// cannot write into a thousand day partitions at once. `northstar import` follows the
    /// same rule: raise it for a backfill of older history. "0": no bound.
    pub max_event_age: HumanDuration,
    /// Most events acked but not yet applied by the followers (identities, billing windows,
    /// onboarding; and the archiver, which reads the followers' delivery, so SQL too); past
    /// it, ingest sheds with 503 `overloaded` and `Retry-After`. 0: no bound. The default,
    /// 10,000, is about 0.4 s of the followers' work at the ~25,000 events/s they digest under
    /// full load here: it is what keeps ack → SQL within a second.
    pub max_lag: u64,
    /// Most events acked but not yet committed to Parquet (behind SQL); past it, ingest
    /// sheds likewise. 0: no bound.
    pub max_archive_lag: u64,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 32 * 1024,
            max_batch_bytes: 500 * 1024,
            max_batch_messages: 2_500,
            request_timeout: HumanDuration::secs(30),
            body_timeout: HumanDuration::secs(10),
            max_concurrent_requests: 1_024,
            max_connections_per_client: 256,
            max_connections: 8_192,
            max_requests_per_client: 128,
            rate_limit_per_second: 100_000,
            rate_limit_burst: 500_000,
            max_future_skew: HumanDuration::secs(24 * 3600),
            max_event_age: HumanDuration::secs(400 * 24 * 3600),
            max_lag: 10_000,
            max_archive_lag: 1_000_000,
        }
    }
}

impl IngestSettings {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.max_message_bytes == 0 || self.max_message_bytes > self.max_batch_bytes {
            return Err((
                "maxMessageBytes".into(),
                "must be between 1 and maxBatchBytes".into(),
            ));
        }
        if self.max_batch_messages == 0 {
            return Err(("maxBatchMessages".into(), "must be at least 1".into()));
        }
        if self.max_concurrent_requests == 0 {
            return Err(("maxConcurrentRequests".into(), "must be at least 1".into()));
        }
        if self.request_timeout.get().is_zero() {
            return Err(("requestTimeout".into(), "must be more than 0".into()));
        }
        if self.body_timeout.get().is_zero() {
            return Err(("bodyTimeout".into(), "must be more than 0".into()));
        }
        if self.max_connections_per_client == 0 {
            return Err((
                "maxConnectionsPerClient".into(),
                "must be at least 1".into(),
            ));
        }
        if self.max_connections < self.max_connections_per_client {
            return Err((
                "maxConnections".into(),
                "must be at least maxConnectionsPerClient".into(),
            ));
        }
        if self.max_requests_per_client == 0 {
            return Err(("maxRequestsPerClient".into(), "must be at least 1".into()));
        }
        if self.rate_limit_per_second == 0
            || (self.rate_limit_burst as usize) < self.max_batch_messages
        {
            return Err((
                "rateLimitBurst".into(),
                "the rate must be positive and the burst at least maxBatchMessages (else a full batch never fits)".into(),
            ));
        }
        Ok(())
    }
}

/// Smallest explicit stream size: a few full batches.
pub(crate) const MIN_STREAM_BYTES: i64 = 1024 * 1024;
/// Smallest explicit JetStream store: both streams at their smallest and the KV buckets.
pub(crate) const MIN_STORE_BYTES: i64 = 8 * 1024 * 1024;

/// The JetStream stream that carries events.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct StreamSettings {
    /// Stream name of the event log.
    pub name: String,
    /// Stream name of the rejected-message log.
    pub rejected_name: String,
    /// Stream name of what each customer's portal is told (threshold crossings, limit
    /// reached, suspension, plan changes), read by `GET /v1/portal/events`.
    pub portal_name: String,
    /// How long JetStream remembers an event id to drop repeats.
    pub duplicate_window: HumanDuration,
    /// How long messages stay in the stream (`0`: forever). Parquet is the long-term copy;
    /// the stream holds what the readers still need and what SDK retries are deduplicated
    /// against.
    pub max_age: HumanDuration,
    /// Largest size of the events stream in bytes, whichever of it and `maxAge` comes first:
    /// `0` derives it from the JetStream store (see `bus::budget`), `-1` is unlimited.
    pub max_bytes: i64,
    /// How long rejected messages stay in their stream (they are archived to Parquet at once).
    pub rejected_max_age: HumanDuration,
    /// Largest size of the rejected stream in bytes: `0` derives it, `-1` is unlimited.
    pub rejected_max_bytes: i64,
    /// The embedded nats-server's JetStream file store limit in bytes (`max_file_store`):
    /// `0` derives it from the disk at start. Ignored with `--nats-url`, whose server sets
    /// its own.
    pub store_max_bytes: i64,
    /// Copies of each message in a cluster (1 on a single server, 3 in production clusters).
    pub replicas: usize,
    /// Subject shards (`events.<shard>.<type>`), so archivers can split the stream.
    pub shards: u32,
    /// How long ingest waits for JetStream to ack a publish before answering 503.
    pub ack_timeout: HumanDuration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "EVENTS".into(),
            rejected_name: "REJECTED".into(),
            portal_name: "PORTAL".into(),
            duplicate_window: HumanDuration::secs(24 * 3600),
            max_age: HumanDuration::secs(7 * 86_400),
            max_bytes: 0,
            rejected_max_age: HumanDuration::secs(7 * 86_400),
            rejected_max_bytes: 0,
            store_max_bytes: 0,
            replicas: 1,
            shards: 1,
            ack_timeout: HumanDuration::secs(5),
        }
    }
}

impl StreamSettings {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !valid_name(&self.name) {
            return Err(("name".into(), "letters, digits, `_` and `-` only".into()));
        }
        if !valid_name(&self.rejected_name) || self.rejected_name == self.name {
            return Err((
                "rejectedName".into(),
                "letters, digits, `_` and `-`, and not the event stream's name".into(),
            ));
        }
        if !valid_name(&self.portal_name)
            || self.portal_name == self.name
            || self.portal_name == self.rejected_name
        {
            return Err((
                "portalName".into(),
                "letters, digits, `_` and `-`, and not another stream's name".into(),
            ));
        }
        if self.duplicate_window.get().is_zero() {
            return Err((
                "duplicateWindow".into(),
                "must be positive: it is what drops repeated event ids".into(),
            ));
        }
        if !self.max_age.get().is_zero() && self.max_age < self.duplicate_window {
            return Err((
                "maxAge".into(),
                "must be 0 (forever) or at least duplicateWindow".into(),
            ));
        }
        if !self.rejected_max_age.get().is_zero() && self.rejected_max_age < self.duplicate_window {
            return Err((
                "rejectedMaxAge".into(),
                "must be 0 (forever) or at least duplicateWindow".into(),
            ));
        }
        for (key, bytes) in [
            ("maxBytes", self.max_bytes),
            ("rejectedMaxBytes", self.rejected_max_bytes),
        ] {
            if bytes < -1 || (1..MIN_STREAM_BYTES).contains(&bytes) {
                return Err((
                    key.into(),
                    format!(
                        "must be 0 (derived), -1 (unlimited) or at least {MIN_STREAM_BYTES} bytes"
                    ),
                ));
            }
        }
        if self.store_max_bytes < 0 || (1..MIN_STORE_BYTES).contains(&self.store_max_bytes) {
            return Err((
                "storeMaxBytes".into(),
                format!("must be 0 (derived from the disk) or at least {MIN_STORE_BYTES} bytes"),
            ));
        }
        if self.store_max_bytes > 0 {
            let streams = self.max_bytes.max(0) + self.rejected_max_bytes.max(0);
            if streams > self.store_max_bytes {
                return Err((
                    "storeMaxBytes".into(),
                    format!("must hold maxBytes + rejectedMaxBytes ({streams} bytes)"),
                ));
            }
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(("replicas".into(), "must be between 1 and 5".into()));
        }
        if !(1..=1024).contains(&self.shards) {
            return Err(("shards".into(), "must be between 1 and 1024".into()));
        }
        Ok(())
    }
}

/// The disks northstar writes to (the data dir, Parquet tables, the embedded JetStream store).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct StorageSettings {
    /// Free space kept on every filesystem northstar writes to, in MiB. Below it ingest
    /// answers 503 `disk_full` and `/healthz` says `"disk": "full"`, so JetStream and the
    /// archiver never meet a full disk; above it again everything resumes by itself.
    pub min_free_mb: u64,
    /// How often free space is read.
    pub check_interval: HumanDuration,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            min_free_mb: 128,
            check_interval: HumanDuration::secs(1),
        }
    }
}

impl StorageSettings {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.check_interval.get().is_zero() || self.check_interval.get().as_secs() > 60 {
            return Err((
                "checkInterval".into(),
                "must be between 1ms and 60s: a full disk is noticed no later than this".into(),
            ));
        }
        Ok(())
    }

    /// The reserve in bytes.
    pub fn min_free_bytes(&self) -> u64 {
        self.min_free_mb.saturating_mul(1024 * 1024)
    }
}

/// How the archiver turns the stream into Parquet files.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ArchiveSettings {
    /// Longest an event waits in memory before it is committed (the freshness bound of SQL).
    pub commit_interval: HumanDuration,
    /// Commit as soon as this many events are buffered.
    pub max_rows_per_commit: usize,
    /// Commit as soon as this many bytes of events are buffered (bounds memory, and keeps
    /// every Arrow column far below its 2 GiB offset limit). While a commit is in flight the
    /// next one may grow to twice this (and twice `maxRowsPerCommit`) before the archiver
    /// waits for it.
    pub max_bytes_per_commit: usize,
    /// Rows per Parquet row group (the unit of pruning).
    pub row_group_rows: usize,
    /// zstd level of Parquet pages (1 fast … 22 small).
    pub zstd_level: i32,
    /// Merge a day's small files once it has this many of them.
    pub compact_min_files: usize,
    /// Files at or above this size are left alone by compaction.
    pub compact_target_bytes: u64,
    /// Events the follower loop may hand on to the events archiver ahead of it, so
    /// nats-server delivers each event once; 0 gives the archiver a delivery of its own.
    pub feed_capacity: usize,
    /// How long each table keeps its days in Parquet ("0": for ever).
    pub retention: RetentionSettings,
}

/// How long each archived table keeps its days: older `date=` partitions are dropped whole.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RetentionSettings {
    /// The `events` table ("0": for ever).
    pub events: HumanDuration,
    /// The `rejected_events` table ("0": for ever).
    pub rejected: HumanDuration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            events: HumanDuration::secs(0),
            rejected: HumanDuration::secs(0),
        }
    }
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        Self {
            commit_interval: HumanDuration::secs(1),
            max_rows_per_commit: 250_000,
            max_bytes_per_commit: 64 * 1024 * 1024,
            row_group_rows: 128 * 1024,
            zstd_level: 3,
            compact_min_files: 12,
            compact_target_bytes: 256 * 1024 * 1024,
            feed_capacity: 32_768,
            retention: RetentionSettings::default(),
        }
    }
}

impl ArchiveSettings {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.commit_interval.get().is_zero() {
            return Err(("commitInterval".into(), "must be positive".into()));
        }
        if !(1..=1024 * 1024 * 1024).contains(&self.max_bytes_per_commit) {
            return Err((
                "maxBytesPerCommit".into(),
                "must be between 1 and 1 GiB".into(),
            ));
        }
        if self.max_rows_per_commit == 0 || self.row_group_rows == 0 {
            return Err((
                "maxRowsPerCommit".into(),
                "maxRowsPerCommit and rowGroupRows must be positive".into(),
            ));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(("zstdLevel".into(), "must be between 1 and 22".into()));
        }
        if self.compact_min_files < 2 {
            return Err(("compactMinFiles".into(), "must be at least 2".into()));
        }
        for (key, kept) in [
            ("retention.events", &self.retention.events),
            ("retention.rejected", &self.retention.rejected),
        ] {
            let kept = kept.get();
            if !kept.is_zero() && kept < std::time::Duration::from_secs(86_400) {
                return Err((
                    key.into(),
                    "must be at least a day (days are dropped whole), or \"0\" to keep everything"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

/// Limits of `northstar sql` and `POST /v1/sql`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SqlSettings {
    /// Longest a query may run.
    pub timeout: HumanDuration,
    /// Most rows an answer carries; more are cut and the answer says so.
    pub max_rows: usize,
    /// Memory a query may use before it fails (MiB).
    pub memory_limit_mb: usize,
    /// Most bytes an answer holds (its Arrow batches, and again its encoding); more are cut
    /// and the answer says so. Unset: a quarter of `memoryLimitMb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_answer_bytes: Option<usize>,
    /// Parquet footers kept between queries (MiB). Every compaction writes a day's file anew,
    /// and the footers of the files it replaced leave only when this is full: the engine's
    /// own default (50 MiB) was most of what a long soak's memory climbed by.
    pub metadata_cache_mb: usize,
    /// File statistics kept between queries (MiB); filled and emptied like the footers.
    pub statistics_cache_mb: usize,
    /// Where the Postgres wire listens (`--pg-listen`); unset, it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_listen: Option<std::net::SocketAddr>,
    /// Most Postgres sessions open at once; one more is refused with `53300`.
    pub pg_max_sessions: usize,
    /// TLS for the Postgres wire (PEM files); unset, sessions are plain, as on loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_tls: Option<PgTls>,
}

/// The certificate and key the Postgres wire offers to clients that ask for TLS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PgTls {
    /// PEM file of the certificate chain.
    pub cert_file: std::path::PathBuf,
    /// PEM file of the private key.
    pub key_file: std::path::PathBuf,
}

impl SqlSettings {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.max_rows == 0 {
            return Err(("maxRows".into(), "must be at least 1".into()));
        }
        if self.timeout.get().is_zero() {
            return Err(("timeout".into(), "must be positive".into()));
        }
        if self.memory_limit_mb < 16 {
            return Err(("memoryLimitMb".into(), "must be at least 16".into()));
        }
        if self.max_answer_bytes.is_some_and(|n| n < 1024) {
            return Err(("maxAnswerBytes".into(), "must be at least 1024".into()));
        }
        if self.pg_max_sessions == 0 {
            return Err(("pgMaxSessions".into(), "must be at least 1".into()));
        }
        Ok(())
    }

    /// Most bytes an answer holds: `maxAnswerBytes`, else a quarter of `memoryLimitMb`.
    pub fn answer_bytes(&self) -> usize {
        self.max_answer_bytes
            .unwrap_or(self.memory_limit_mb.saturating_mul(1024 * 1024) / 4)
    }
}

impl Default for SqlSettings {
    fn default() -> Self {
        Self {
            timeout: HumanDuration::secs(30),
            max_rows: 100_000,
            memory_limit_mb: 2_048,
            max_answer_bytes: None,
            metadata_cache_mb: 16,
            statistics_cache_mb: 4,
            pg_listen: None,
            pg_max_sessions: 32,
            pg_tls: None,
        }
    }
}

/// How usage is metered and limits are answered.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MeteringSettings {
    /// Plan of a customer nobody has put on a plan yet.
    pub default_plan: String,
    /// Usage period of a customer without one of their own: daily, weekly, monthly, yearly.
    pub period: PeriodKind,
    /// Where a customer upgrades; `{customer_id}`, `{feature}` and `{plan}` are filled in.
    pub upgrade_url: String,
    /// Fractions of a limit at which a threshold event is published (once per period).
    pub thresholds: Vec<f64>,
    /// Where threshold events are also POSTed (JSON, `Idempotency-Key` header), if anywhere.
    pub threshold_webhook: Option<String>,
    /// How often the meter writes its snapshot (restart = snapshot + replay of the rest).
    pub snapshot_interval: HumanDuration,
    /// Most units one `/v1/check` may consume.
    pub max_consume: u64,
    /// Shortest time between two runs of the usage pipelines.
    pub pipeline_interval: HumanDuration,
    /// A customer is flagged when a minute's metered events exceed this many times their
    /// trailing per-minute baseline.
    pub anomaly_factor: f64,
    /// …and at least this many events in that minute (small customers are not flagged).
    pub anomaly_min_events: u64,
    /// Largest quantity one metered event (or one `/v1/check`) may carry; a larger one is
    /// rejected with the property named. With it, a period's sum stays exact (see
    /// `schema::quantity`).
    pub max_quantity: u64,
    /// Most customers the meter holds counters for. Past it ingest refuses an event that
    /// would add one (to the rejected store, naming `customer_id`; replay it once the bound is
    /// raised): each costs memory until the server restarts with a smaller history.
    pub max_customers: u64,
    /// Most `groupBy` values one counter breaks its usage down by; the usage of values past
    /// it is counted under the value `(other)`, so the total stays exact.
    pub max_group_values: u64,
    /// Most portal event streams (`GET /v1/portal/events`) open at once; one more answers
    /// 503 `too_many_streams`.
    pub portal_max_streams: usize,
    /// Most distinct values the meter's `unique_count` counters hold together (each costs
    /// the bytes `bench limits` measures). Past it ingest refuses an event that would add
    /// one (to the rejected store, naming the value's property; replay it once the bound is
    /// raised or a period has ended).
    pub max_unique_values: u64,
    /// Most distinct values one `unique_count` counter (a customer's feature in one period)
    /// holds; it takes no more after that, so its count stays at this bound. A plan limit or
    /// hard cap of a `unique_count` feature must not be above it, so a full counter is
    /// always past its limit.
    pub max_unique_values_per_counter: u64,
}

impl Default for MeteringSettings {
    fn default() -> Self {
        Self {
            default_plan: "free".into(),
            period: PeriodKind::Monthly,
            upgrade_url:
                "https://example.com/upgrade?customer={customer_id}&feature={feature}&plan={plan}"
                    .into(),
            thresholds: vec![0.8, 1.0],
            threshold_webhook: None,
            snapshot_interval: HumanDuration::secs(10),
            max_consume: 1_000,
            pipeline_interval: HumanDuration::secs(5),
            anomaly_factor: 10.0,
            anomaly_min_events: 1_000,
            max_quantity: 1_000_000_000_000,
            max_customers: 100_000,
            max_group_values: 1_000,
            portal_max_streams: 1_000,
            max_unique_values: 10_000_000,
            max_unique_values_per_counter: 1_000_000,
        }
    }
}

impl MeteringSettings {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.default_plan.trim().is_empty() {
            return Err(("defaultPlan".into(), "must not be empty".into()));
        }
        if let Some(bad) = self.thresholds.iter().find(|t| !(**t > 0.0 && **t <= 10.0)) {
            return Err((
                "thresholds".into(),
                format!("{bad} is not a fraction between 0 and 10"),
            ));
        }
        if self.snapshot_interval.get().is_zero() {
            return Err(("snapshotInterval".into(), "must be positive".into()));
        }
        if self.max_consume == 0 {
            return Err(("maxConsume".into(), "must be at least 1".into()));
        }
        if self.max_customers == 0 {
            return Err(("maxCustomers".into(), "must be at least 1".into()));
        }
        if self.max_group_values == 0 {
            return Err(("maxGroupValues".into(), "must be at least 1".into()));
        }
        if self.portal_max_streams == 0 {
            return Err(("portalMaxStreams".into(), "must be at least 1".into()));
        }
        if self.max_unique_values == 0 {
            return Err(("maxUniqueValues".into(), "must be at least 1".into()));
        }
        if self.max_unique_values_per_counter == 0 {
            return Err((
                "maxUniqueValuesPerCounter".into(),
                "must be at least 1".into(),
            ));
        }
        if self.max_quantity == 0 || self.max_quantity > MAX_QUANTITY_CEILING {
            return Err((
                "maxQuantity".into(),
                format!(
                    "must be between 1 and {} (a period's sum must stay exact)",
                    MAX_QUANTITY_CEILING
                ),
            ));
        }
        Ok(())
    }
}

/// The length of a usage period; periods start at the customer's billing anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeriodKind {
    /// From the anchor's hour to the same hour next day.
    Daily,
    /// Seven days from the anchor.
    Weekly,
    /// From the anchor's day of month (the month's last day when it has fewer).
    #[default]
    Monthly,
    /// From the anchor's day of year.
    Yearly,
}

/// The activation ("aha") analysis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ActivationSettings {
    /// The North Star event (default: `northStarMetric.event`).
    pub north_star_event: Option<String>,
    /// The event that starts a person's clock.
    pub signup_event: String,
    /// Candidate counts x (at least x times): from 1 to this.
    pub max_times: u32,
    /// Candidate windows y (within y days of signup): from 1 to this.
    pub max_days: u32,
    /// Retained = active in days [retainedFrom, retainedTo) after signup.
    pub retained_from_day: u32,
    /// End of the retention window (exclusive); also the minimum cohort age.
    pub retained_to_day: u32,
    /// Events that count as active for retention (empty: any event).
    pub active_events: Vec<String>,
    /// Smallest count every cell of a chosen candidate needs.
    pub min_cell: u64,
    /// Lowest share of the cohort above a chosen threshold.
    pub share_min: f64,
    /// Highest share of the cohort above a chosen threshold.
    pub share_max: f64,
    /// How often `serve` recomputes (`0`: never on its own).
    pub schedule: HumanDuration,
    /// Where a person's North Star window starts (it ends `y` days after signup either way).
    pub window_start: WindowStart,
}

/// Where a person's North Star window starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum WindowStart {
    /// At their first event: what they did before signing up, anonymously too once an
    /// identify links it, counts.
    #[default]
    FirstSeen,
    /// At signup: only what they did from their signup on counts.
    Signup,
}

impl Default for ActivationSettings {
    fn default() -> Self {
        Self {
            north_star_event: None,
            signup_event: "signup_completed".into(),
            max_times: 10,
            max_days: 15,
            retained_from_day: 28,
            retained_to_day: 56,
            active_events: Vec::new(),
            min_cell: 10,
            share_min: 0.05,
            share_max: 0.95,
            schedule: HumanDuration::secs(7 * 86_400),
            window_start: WindowStart::default(),
        }
    }
}

impl ActivationSettings {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if !(1..=100).contains(&self.max_times) {
            return Err(("maxTimes".into(), "must be between 1 and 100".into()));
        }
        if self.max_days < 1 || self.max_days > self.retained_from_day {
            return Err(("maxDays".into(), "must be at least 1 and at most retainedFromDay (the window must end before retention is judged)".into()));
        }
        if self.retained_to_day <= self.retained_from_day || self.retained_to_day > 400 {
            return Err((
                "retainedToDay".into(),
                "must be after retainedFromDay and at most 400".into(),
            ));
        }
        if !((0.0..1.0).contains(&self.share_min)
            && self.share_min < self.share_max
            && self.share_max <= 1.0)
        {
            return Err((
                "shareMin".into(),
                "the band must satisfy 0 <= shareMin < shareMax <= 1".into(),
            ));
        }
        Ok(())
    }
}

/// Conditions over a person's facts; every condition given must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// The person's customer is on one of these plans.
    #[serde(default)]
    pub plan: Option<Vec<String>>,
    /// The person reached (or has not reached) the current activation threshold.
    #[serde(default)]
    pub activated: Option<bool>,
    /// The person did each event at least this many times.
    #[serde(default)]
    pub event_count_at_least: BTreeMap<String, u64>,
    /// The person did each event fewer than this many times.
    #[serde(default)]
    pub event_count_below: BTreeMap<String, u64>,
    /// The person's traits (from identify) have these values.
    #[serde(default)]
    pub trait_equals: BTreeMap<String, serde_json::Value>,
    /// The person's groups have these properties: group type → property → value. A group's
    /// properties are what northstar holds of it (PostHog `$groupidentify`, Segment `group`
    /// traits, in event-time order), with what a flags request's `group_properties` says of
    /// that type over them; a person belongs to the groups their events name (PostHog
    /// `$groups`, Segment `group` calls; type `group` is also their customer).
    #[serde(default)]
    pub group_property_equals: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
}

/// One onboarding step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OnboardingStep {
    /// Step id.
    pub id: String,
    /// For people.
    #[serde(default)]
    pub title: Option<String>,
    /// The event that completes the step.
    pub complete_on: String,
    /// When the step applies (absent: always).
    #[serde(default)]
    pub when: Condition,
}

/// The onboarding engine.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct OnboardingSettings {
    /// The steps, in order of priority.
    pub steps: Vec<OnboardingStep>,
    /// The trigger that starts a person's flow.
    pub start_trigger: String,
    /// Where fired triggers are also POSTed (JSON, `Idempotency-Key` header).
    pub trigger_webhook: Option<String>,
    /// Most people the engine keeps facts of. Past it a new person's events are stored as
    /// usual but not followed: their onboarding and flags answer 503 `onboarding_full`.
    pub max_people: u64,
    /// Most groups (accounts) the engine keeps properties of, for `groupPropertyEquals`. Past
    /// it a new group's calls are stored as usual but its properties are not kept.
    pub max_groups: u64,
}

impl Default for OnboardingSettings {
    fn default() -> Self {
        Self {
            steps: Vec::new(),
            start_trigger: "onboarding_start".into(),
            trigger_webhook: None,
            max_people: 1_000_000,
            max_groups: 100_000,
        }
    }
}

/// The identity graph.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct IdentitySettings {
    /// Most ids the graph records, among user ids seen and linked ids each (about 300 bytes
    /// an id, measured by `bench limits`). Past it events are stored as usual, a new user id
    /// is not recorded and a merge that would add an id is refused; the ids it holds keep
    /// resolving to their people.
    pub max_ids: u64,
    /// Most erasures (`DELETE /v1/persons/{id}`) the erasure log keeps, finished ones
    /// included (each holds the erased ids, so a replay cannot bring them back). Past it a
    /// new erasure is refused with 503 until the log is moved aside.
    pub max_erasures: u64,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            max_ids: 1_000_000,
            max_erasures: 10_000,
        }
    }
}

/// A feature flag for experiment groups.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FlagSpec {
    /// Flag key.
    pub key: String,
    /// Share of targeted people who get the flag (deterministic by person and key).
    #[serde(default = "full_rollout")]
    pub rollout: f64,
    /// Who is targeted (absent: everyone).
    #[serde(default)]
    pub when: Condition,
    /// A multivariate flag's variants: a person it is on for gets one of them, by shares that
    /// sum to 1 (deterministic by person and key). Absent: the flag is on or off.
    #[serde(default)]
    pub variants: Vec<FlagVariant>,
    /// JSON handed to the SDK with the flag when it is on (PostHog's payload).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
}

/// One variant of a multivariate flag.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FlagVariant {
    /// The value the flag takes (`getFeatureFlag` returns it).
    pub key: String,
    /// Share of the people the flag is on for who get this variant.
    pub share: f64,
    /// JSON handed to the SDK with this variant (instead of the flag's `payload`).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
}

fn full_rollout() -> f64 {
    1.0
}

/// Where closed usage is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BillingProvider {
    /// Stripe's Billing Meter Events API.
    Stripe,
    /// A generic JSON webhook (`Idempotency-Key` header) for other billing systems.
    Webhook,
}

/// The billing sink (absent: nothing is reported anywhere).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct BillingSettings {
    /// `stripe` or `webhook`.
    pub provider: BillingProvider,
    /// Stripe's API root (a test server's in tests).
    pub api_base: String,
    /// The webhook provider's URL.
    pub url: Option<String>,
    /// Length of a reported usage window.
    pub window: HumanDuration,
    /// How long after its end a window waits for stragglers before it is reported.
    pub grace: HumanDuration,
    /// featureId → the Stripe meter's `event_name`; only these features are billed.
    pub meters: BTreeMap<String, String>,
    /// featureId → Stripe meter id (`mtr_…`), for reconcile; looked up by event name if absent.
    pub meter_ids: BTreeMap<String, String>,
    /// Most provider calls per second.
    pub rate_limit: u32,
    /// Calls in flight at once (never two for the same customer and meter).
    pub concurrency: usize,
    /// Time limit of one provider call.
    pub timeout: HumanDuration,
    /// First retry delay; doubles per attempt, with jitter.
    pub retry_base: HumanDuration,
    /// Longest retry delay.
    pub retry_max: HumanDuration,
    /// How often windows are closed and corrections emitted.
    pub flush_interval: HumanDuration,
    /// The upgrade path: Checkout Sessions for a 402.
    pub checkout: CheckoutSettings,
}

impl Default for BillingSettings {
    fn default() -> Self {
        Self {
            provider: BillingProvider::Stripe,
            api_base: "https://api.stripe.com".into(),
            url: None,
            window: HumanDuration::secs(3600),
            grace: HumanDuration::secs(300),
            meters: BTreeMap::new(),
            meter_ids: BTreeMap::new(),
            rate_limit: 100,
            concurrency: 16,
            timeout: HumanDuration::secs(10),
            retry_base: HumanDuration::millis(500),
            retry_max: HumanDuration::secs(300),
            flush_interval: HumanDuration::secs(1),
            checkout: CheckoutSettings::default(),
        }
    }
}

/// Checkout Sessions offered in a 402.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CheckoutSettings {
    /// plan → Stripe price id (`price_…`) of its subscription; plans without one are not offered.
    pub prices: BTreeMap<String, String>,
    /// Where Stripe sends the customer after paying.
    pub success_url: String,
    /// Where Stripe sends the customer who gives up.
    pub cancel_url: String,
}

impl BillingSettings {
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        if self.window.get().as_secs() == 0 {
            return Err(("window".into(), "must be at least 1s".into()));
        }
        if self.provider == BillingProvider::Webhook && self.url.is_none() {
            return Err((
                "url".into(),
                "the webhook provider needs the URL to POST to".into(),
            ));
        }
        if self.rate_limit == 0 {
            return Err(("rateLimit".into(), "must be at least 1 call/s".into()));
        }
        if self.concurrency == 0 {
            return Err(("concurrency".into(), "must be at least 1".into()));
        }
        if self.flush_interval.get().is_zero() || self.timeout.get().is_zero() {
            return Err((
                "flushInterval".into(),
                "flushInterval and timeout must be positive".into(),
            ));
        }
        for (feature, name) in &self.meters {
            if name.is_empty() || name.len() > 100 {
                return Err((
                    format!("meters.{feature}"),
                    "a Stripe event_name is 1 to 100 characters".into(),
                ));
            }
        }
        Ok(())
    }
}
