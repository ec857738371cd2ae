//! The real-time usage meter and the limits it answers.
//!
//! - [`spec`]: meters compiled from the config (features, events, limits per plan);
//! - [`period`]: usage periods from billing anchors;
//! - [`state`]: the counters (sharded, with reservations for atomic consume);
//! - [`snapshot`]: shard-by-shard snapshots, so a restart is snapshot + replay;
//! - [`customers`]: customers and plans in a JetStream key-value bucket;
//! - [`runner`]: the stream consumer that applies events;
//! - [`notices`]: threshold events and hard-cap suspensions, off the hot path.
//!
//! Usage is a function of the stream: the runner applies every event in stream order, and a
//! `/v1/check` that consumes publishes an event like any other (so meter = SQL over events).
//! An acked event is visible to checks as soon as the runner has applied it, milliseconds
//! later, with no call to the billing provider on the way.

pub mod anomaly;
pub mod customers;
pub mod notices;
pub mod period;
pub mod runner;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod verify;

use std::sync::Arc;

use bytes::Bytes;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::bus::publisher::Outgoing;
use crate::bus::{BusError, Publisher, subject_for};
use crate::clock::{Clock, format_micros};
use crate::config::{Aggregation, Config, MeteringSettings};
use crate::error::{Classify, ErrorKind};
use crate::event::{EventRecord, EventType, EventView};
use crate::json::{JsonObject, RawObject};
use crate::metrics::Metrics;
use crate::rejected::Rejection;
use crate::schema::quantity;
use customers::{Customer, CustomerStore};
use notices::Notice;
use spec::{Allowance, MeterSpec};
use state::{Bounds, Counters};

/// Why a limits request got no usual answer.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// No such feature in the config.
    #[error("unknown feature `{0}`")]
    UnknownFeature(String),
    /// The request is malformed (quantity, customer id).
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The customer is suspended.
    #[error("customer `{customer}` is suspended: {reason}")]
    Suspended {
        /// Id of the suspended customer, for the message.
        customer: String,
        /// Why.
        reason: String,
    },
    /// The limit does not allow the request.
    #[error("{}", .0.message)]
    Exceeded(Box<Denial>),
    /// The consumed units could not be recorded (nothing was taken).
    #[error(transparent)]
    Unavailable(#[from] BusError),
    /// The stream takes no writes now (ingest sheds, or a disk is below its reserve): the
    /// consume was refused before anything was reserved.
    #[error(transparent)]
    Refused(crate::error::Refused),
}

impl Classify for LimitError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownFeature(_) => ErrorKind::NotFound,
            Self::Invalid { .. } => ErrorKind::InvalidInput,
            Self::Suspended { .. } => ErrorKind::Forbidden,
            Self::Exceeded(_) => ErrorKind::PaymentRequired,
            Self::Unavailable(_) => ErrorKind::Unavailable,
            Self::Refused(refused) => refused.kind,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Refused(refused) => refused.retry_after,
            Self::Unavailable(_) => Some(1),
            _ => None,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::UnknownFeature(_) => "unknown_feature",
            Self::Invalid { .. } => "invalid_request",
            Self::Suspended { .. } => "customer_suspended",
            Self::Exceeded(_) => "usage_limit_exceeded",
            Self::Unavailable(_) => "stream_unavailable",
            Self::Refused(refused) => refused.code,
        }
    }
}

/// The body of a 402: what was asked, what is left, and the way to upgrade.
#[derive(Debug, Clone, Serialize)]
pub struct Denial {
    /// Always `usage_limit_exceeded`.
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// Id of the customer asked about, as the request named it.
    pub customer_id: String,
    /// Id of the feature (`usageFeatures[].id`).
    pub feature: String,
    /// The customer's plan.
    pub plan: String,
    /// The plan's limit (0 when the plan has no access).
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub limit: Decimal,
    /// Usage this period, consumed-but-not-yet-streamed units included.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub used: Decimal,
    /// Units asked for.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub requested: Decimal,
    /// Start of the period (RFC 3339).
    pub period_start: String,
    /// When usage resets (RFC 3339).
    pub period_end: String,
    /// Where to upgrade: a subscription page and, once billing is set up, a Checkout Session.
    pub upgrade: Upgrade,
    /// What the answer is based on.
    pub as_of: AsOf,
}

/// The upgrade path of a 402.
#[derive(Debug, Clone, Serialize)]
pub struct Upgrade {
    /// The config's `metering.upgradeUrl`, filled in.
    pub subscription_url: String,
    /// The plan the Checkout Session moves to (null without billing checkout prices).
    pub plan: Option<String>,
    /// A Stripe Checkout Session for that plan (null until billing is configured).
    pub checkout_session_id: Option<String>,
    /// Where the customer pays: the Checkout Session's URL.
    pub checkout_url: Option<String>,
}

/// The point in the stream an answer reflects.
#[derive(Debug, Clone, Serialize)]
pub struct AsOf {
    /// When the answer was made (RFC 3339).
    pub time: String,
    /// Every event up to this stream sequence is counted.
    pub seq: u64,
}

/// `POST /v1/check`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// The billed account.
    pub customer_id: String,
    /// The feature id.
    pub feature: String,
    /// Units wanted (default 1); a number or a numeric string.
    #[serde(default)]
    pub quantity: Option<Value>,
    /// Record the units when allowed, atomically with the check.
    #[serde(default)]
    pub consume: bool,
    /// Id of the usage event a consume records; a retry with the same id records it once.
    #[serde(default)]
    pub event_id: Option<String>,
}

/// A 200 answer of check, usage and entitlements: one feature's standing.
#[derive(Debug, Clone, Serialize)]
pub struct Standing {
    /// Whether the request is allowed (checks) / the feature is usable (entitlements).
    pub allowed: bool,
    /// Id of the customer asked about, as the request named it.
    pub customer_id: String,
    /// Id of the feature (`usageFeatures[].id`).
    pub feature: String,
    /// The customer's plan.
    pub plan: String,
    /// Usage this period.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub used: Decimal,
    /// The plan's limit (`null`: unlimited).
    #[serde(serialize_with = "crate::json::exact::optional")]
    pub limit: Option<Decimal>,
    /// What is left (`null`: unlimited).
    #[serde(serialize_with = "crate::json::exact::optional")]
    pub remaining: Option<Decimal>,
    /// Usage past a soft limit.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub overage: Decimal,
    /// Whether the limit is soft.
    pub soft_limit: bool,
    /// Unit name.
    pub unit: Option<String>,
    /// Start of the period (RFC 3339).
    pub period_start: String,
    /// When usage resets (RFC 3339).
    pub period_end: String,
    /// Units this request consumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "crate::json::exact::optional")]
    pub consumed: Option<Decimal>,
    /// A retry of a consume already recorded (same customer, feature, quantity and
    /// `event_id`): its units were counted once, by the first.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Usage by `groupBy` series, if the meter has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Map<String, Value>>,
    /// Where usage is heading at its rate so far this period (usage answers, from an hour
    /// into the period).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projection: Option<Projection>,
    /// What the answer is based on.
    pub as_of: AsOf,
}

/// Where a feature's usage is heading at the period's rate so far: the trigger a sales-assist
/// or in-app upgrade prompt wants before the limit is hit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Projection {
    /// Units a day, over the period so far.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub per_day: Decimal,
    /// Usage at the period's end at that rate.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub at_period_end: Decimal,
    /// When the limit is reached at that rate (RFC 3339; in the past when usage is already
    /// over it); none without a limit, without usage, or when the period ends first.
    pub limit_reached_at: Option<String>,
}

/// The shortest part of a period a projection is made from: an hour's usage says little.
const PROJECTION_MIN_ELAPSED_US: i64 = 3_600_000_000;

/// The projection of `used` (with `limit`) over `period` at `now`, from the rate so far.
fn project(
    used: Decimal,
    limit: Option<Decimal>,
    period: &period::Period,
    now: i64,
) -> Option<Projection> {
    let elapsed = now.saturating_sub(period.start);
    if elapsed < PROJECTION_MIN_ELAPSED_US || now >= period.end {
        return None;
    }
    let length = Decimal::from(period.end.saturating_sub(period.start));
    let elapsed_dec = Decimal::from(elapsed);
    let per_day = used.checked_mul(Decimal::from(86_400_000_000i64))? / elapsed_dec;
    let at_period_end = used.checked_mul(length)? / elapsed_dec;
    let limit_reached_at = limit.filter(|_| used > Decimal::ZERO).and_then(|limit| {
        // The trend line from the period's start crosses the limit at start + limit / rate.
        let offset = limit.checked_mul(elapsed_dec)? / used;
        let at = period
            .start
            .checked_add(rust_decimal::prelude::ToPrimitive::to_i64(&offset.floor())?)?;
        (at < period.end).then(|| format_micros(at))
    });
    Some(Projection {
        per_day: per_day.round_dp(4),
        at_period_end: at_period_end.round_dp(4),
        limit_reached_at,
    })
}

/// Which path takes an event into the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    /// The stream follower, in stream order.
    Follower,
    /// Ingest, when JetStream acked the publish.
    Ack,
}

/// The meter: counters, customers, and the limits logic.
pub struct Meter {
    spec: MeterSpec,
    feature_ids: Vec<String>,
    counters: Counters,
    customers: Arc<CustomerStore>,
    settings: MeteringSettings,
    known_plans: Vec<String>,
    shards: u32,
    clock: Clock,
    publisher: Publisher,
    notices: notices::Sender,
    metrics: Arc<Metrics>,
    flagged: std::sync::Mutex<std::collections::BTreeMap<String, anomaly::Spike>>,
    /// The stream's last sequence when the server started: until the meter has applied it,
    /// its counters are a replay in progress and answers from them would be too low.
    replay_target: std::sync::atomic::AtomicU64,
    /// Why the meter's usage lacks events for good (set once; see [`Meter::mark_incomplete`]).
    incomplete: std::sync::OnceLock<String>,
    /// What consume publishes pass, as ingest's requests do (see [`StreamGate`]).
    gate: std::sync::OnceLock<StreamGate>,
}

/// What a consume's publish passes before and after it, as an ingest request does: the
/// backlog's and the disk's admission first (so the stream's readers and the disk reserve
/// bound consumes too), and the acked sequence after (so the backlog sees their lag).
pub struct StreamGate {
    /// `Err` when the stream takes no writes now, or not this many events.
    pub admit: Box<dyn Fn(u64) -> Result<(), crate::error::Refused> + Send + Sync>,
    /// Records the last sequence a publish was acked at.
    pub acked: Box<dyn Fn(u64) + Send + Sync>,
}

impl Meter {
    /// A meter over `customers`, publishing consumed usage through `publisher`.
    pub fn new(
        config: &Config,
        customers: Arc<CustomerStore>,
        publisher: Publisher,
        notices: notices::Sender,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        let spec = MeterSpec::from_config(config);
        Self {
            feature_ids: spec.features.iter().map(|f| f.id.clone()).collect(),
            spec,
            counters: Counters::new(Bounds {
                group_values: usize::try_from(config.metering.max_group_values)
                    .unwrap_or(usize::MAX),
                unique_values: usize::try_from(config.metering.max_unique_values_per_counter)
                    .unwrap_or(usize::MAX),
            }),
            customers,
            settings: config.metering.clone(),
            known_plans: config
                .known_plans()
                .into_iter()
                .map(str::to_string)
                .collect(),
            shards: config.stream.shards,
            clock,
            publisher,
            notices,
            metrics,
            flagged: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            replay_target: std::sync::atomic::AtomicU64::new(0),
            incomplete: std::sync::OnceLock::new(),
            gate: std::sync::OnceLock::new(),
        }
    }

    /// The counters (for snapshots and benchmarks).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Feature ids by counter index.
    pub fn feature_ids(&self) -> &[String] {
        &self.feature_ids
    }

    /// The customer store.
    pub fn customers(&self) -> &Arc<CustomerStore> {
        &self.customers
    }

    /// Every plan the config knows.
    pub fn known_plans(&self) -> &[String] {
        &self.known_plans
    }

    /// The compiled meters.
    pub fn spec(&self) -> &MeterSpec {
        &self.spec
    }

    /// What answers are based on right now.
    pub fn as_of(&self) -> AsOf {
        AsOf {
            time: format_micros(self.clock.now_micros()),
            seq: self.counters.applied_seq(),
        }
    }

    /// Whether ingest may store a metered event of `customer_id`: the meter holds its
    /// counters already, or holds fewer customers than `metering.maxCustomers`. Without a
    /// lock while there is room; at the bound, one shard lock to look the customer up. The
    /// bound is soft by the new customers of requests admitted at the same moment.
    pub fn admits_customer(&self, customer_id: &str) -> Result<(), Rejection> {
        let most = usize::try_from(self.settings.max_customers).unwrap_or(usize::MAX);
        if self.counters.customers_held() < most || self.counters.holds(customer_id) {
            return Ok(());
        }
        Err(Rejection::new(
            "customer_id",
            format!(
                "the meter holds {most} customers, its bound (metering.maxCustomers), and this is a new one; \
                 raise the bound and replay the rejected store to meter it"
            ),
        ))
    }

    /// [`Meter::admits_customer`] and [`Meter::admits_unique_values`] for a stream message
    /// about to be published: an event that no meter counts always passes. Read only once
    /// the meter is at one of its bounds, so ingest pays nothing for them before.
    pub fn admits_message(&self, message: &[u8]) -> Result<(), Rejection> {
        let most_customers = usize::try_from(self.settings.max_customers).unwrap_or(usize::MAX);
        let most_values = usize::try_from(self.settings.max_unique_values).unwrap_or(usize::MAX);
        let customers_full = self.counters.customers_held() >= most_customers;
        let values_full = self.counters.unique_values_held() >= most_values;
        if !customers_full && !values_full {
            return Ok(());
        }
        let Ok(event) = EventView::decode(message) else {
            return Ok(());
        };
        let (Some(meters), Some(customer)) = (
            event
                .event
                .as_deref()
                .and_then(|name| self.spec.by_event.get(name)),
            event.customer_id.as_deref(),
        ) else {
            return Ok(());
        };
        if customers_full {
            self.admits_customer(customer)?;
        }
        if values_full {
            self.admits_unique_values(&event, meters, customer, most_values)?;
        }
        Ok(())
    }

    /// Whether the meter, holding `metering.maxUniqueValues` distinct values, may count
    /// `event`: each `unique_count` meter of it must already hold the event's value (or be
    /// full, and take no more). Under the shard lock of the customer; soft by the values of
    /// requests admitted at the same moment, like the customer bound.
    fn admits_unique_values(
        &self,
        event: &EventView<'_>,
        meters: &[spec::EventMeter],
        customer: &str,
        most: usize,
    ) -> Result<(), Rejection> {
        let properties = RawObject::parse(event.properties.get()).unwrap_or_default();
        let period = self.customers.terms(customer).period_at(event.timestamp);
        let shard = self.counters.lock(customer);
        for meter in meters {
            if self.spec.features[meter.feature].aggregation != Aggregation::UniqueCount {
                continue;
            }
            let Some(property) = meter.value_property.as_deref() else {
                continue;
            };
            let value = properties.field(property);
            let Ok(contribution) =
                quantity::quantity_of(Some(property), Aggregation::UniqueCount, value.as_deref())
            else {
                continue;
            };
            let index = u16::try_from(meter.feature).unwrap_or(u16::MAX);
            if shard.would_hold(customer, index, period.start, &contribution) {
                return Err(Rejection::new(
                    format!("properties.{property}"),
                    format!(
                        "the meter holds {most} distinct values of unique_count meters, its bound (metering.maxUniqueValues), and this is a new one; \
                         raise the bound and replay the rejected store to meter it"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Applies one stream event (the runner calls this in stream order). An event already
    /// applied by [`Meter::apply_acked`] is skipped, and its sequence still counts as applied.
    pub fn apply(&self, seq: u64, event: &EventView<'_>) {
        self.take_in(seq, event, By::Follower);
    }

    /// Applies an event the moment ingest's publish of it is acked (`seq` from the ack), so
    /// `/v1/check` and usage see it before the answer reaches the client, whatever the
    /// followers' backlog. The follower's later delivery is then a no-op for it. Events the
    /// follower has already delivered, and repeats, are left alone; past
    /// [`state::MAX_AHEAD_PER_SHARD`] the event waits for the follower.
    pub fn apply_acked(&self, seq: u64, event: &EventView<'_>) {
        self.take_in(seq, event, By::Ack);
    }

    fn take_in(&self, seq: u64, event: &EventView<'_>, by: By) {
        let meters = event
            .event
            .as_deref()
            .and_then(|name| self.spec.by_event.get(name));
        let (Some(meters), Some(customer_id)) = (meters, event.customer_id.as_deref()) else {
            if by == By::Follower {
                self.counters.set_applied(seq);
            }
            return;
        };
        // One level of the properties, read only for the values a meter needs.
        let properties = RawObject::parse(event.properties.get()).unwrap_or_default();
        let customer = self.customers.terms(customer_id);
        let period = customer.period_at(event.timestamp);
        let mut shard = self.counters.lock(customer_id);
        // Both paths decide under the shard's lock, and the follower records its position
        // under it too: each event is counted by exactly one of them.
        let fresh = match by {
            By::Follower => !shard.ahead.remove(&seq),
            By::Ack => {
                seq > shard.applied_seq
                    && seq > self.counters.applied_seq()
                    && shard.ahead.len() < state::MAX_AHEAD_PER_SHARD
                    && shard.ahead.insert(seq)
            }
        };
        if !fresh {
            if by == By::Follower {
                self.counters.set_applied(seq);
            }
            return;
        }
        if seq > shard.applied_seq {
            for meter in meters {
                let feature = &self.spec.features[meter.feature];
                let value = meter
                    .value_property
                    .as_deref()
                    .and_then(|p| properties.field(p));
                let contribution = match quantity::quantity_of(
                    meter.value_property.as_deref(),
                    feature.aggregation,
                    value.as_deref(),
                ) {
                    Ok(contribution) => contribution,
                    Err(rejection) => {
                        self.metrics.meter_skipped.inc();
                        tracing::warn!(seq, customer = customer_id, field = %rejection.field, "metered event without a valid quantity; not counted");
                        continue;
                    }
                };
                let group = (!meter.group_by.is_empty())
                    .then(|| quantity::group_key(&meter.group_by, &properties));
                let index = u16::try_from(meter.feature).unwrap_or(u16::MAX);
                let Some(applied) = shard.apply(
                    customer_id,
                    index,
                    feature.aggregation,
                    period.start,
                    &contribution,
                    group.as_deref(),
                    event.timestamp,
                    &event.event_id,
                ) else {
                    self.metrics.meter_late.inc();
                    continue;
                };
                self.metrics.meter_applied.inc();
                self.notice_crossings(
                    &mut shard,
                    customer_id,
                    &customer,
                    meter.feature,
                    &applied,
                    seq,
                );
            }
        }
        if let Some(spike) = shard.record_arrival(
            customer_id,
            event.received_at,
            self.settings.anomaly_factor,
            self.settings.anomaly_min_events,
        ) {
            tracing::warn!(
                customer = customer_id,
                events_per_minute = spike.events_per_minute,
                baseline = spike.baseline_per_minute,
                "usage anomaly: flagged"
            );
            self.metrics.meter_anomalies.inc();
            if let Ok(mut flagged) = self.flagged.lock() {
                flagged.insert(customer_id.to_string(), spike.clone());
            }
            self.notices.send(Notice::Anomaly {
                customer_id: customer_id.to_string(),
                spike,
            });
        }
        if by == By::Follower {
            self.counters.set_applied(seq);
        }
    }

    /// Sets the sequence the meter must reach before its answers count: the stream's last
    /// sequence at start.
    pub fn replay_until(&self, seq: u64) {
        self.replay_target
            .store(seq, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets what consume publishes pass (once, when ingest is set up).
    pub fn set_gate(&self, gate: StreamGate) {
        let _ = self.gate.set(gate);
    }

    /// Records that the meter's usage lacks events it cannot get back (the stream no longer
    /// holds them and reading them from Parquet failed): from then on its answers are 503,
    /// never an undercount.
    pub fn mark_incomplete(&self, reason: String) {
        let _ = self.incomplete.set(reason);
    }

    /// Why the meter's answers are incomplete, if they are.
    pub fn incomplete(&self) -> Option<&str> {
        self.incomplete.get().map(String::as_str)
    }

    /// `Some((applied, target))` while the meter is still replaying what the stream held at
    /// start; `None` once its answers are complete.
    pub fn replaying(&self) -> Option<(u64, u64)> {
        let target = self.replay_target.load(std::sync::atomic::Ordering::SeqCst);
        let applied = self.counters.applied_seq();
        (applied < target).then_some((applied, target))
    }

    /// Customers flagged for usage far above their own baseline, with their latest spike.
    pub fn flagged(&self) -> Vec<(String, anomaly::Spike)> {
        self.flagged
            .lock()
            .map(|f| f.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Threshold and hard-cap crossings of one applied event.
    fn notice_crossings(
        &self,
        shard: &mut state::Shard,
        customer_id: &str,
        customer: &Customer,
        feature_index: usize,
        applied: &state::Applied,
        seq: u64,
    ) {
        // Notices and hard caps belong to the period running now: usage an event dated in a
        // closed period adds is counted there, and never suspends or warns anyone today.
        if applied.period_start < customer.period_at(self.clock.now_micros()).start {
            return;
        }
        let feature = &self.spec.features[feature_index];
        let limit = match feature.allowance(&customer.plan) {
            Allowance::Limited { limit, .. } => Some(Decimal::from(limit)),
            _ => None,
        };
        // Fractions of the limit (bits 0…), then the feature's own thresholds in units.
        let fractions = limit.into_iter().flat_map(|limit| {
            self.settings
                .thresholds
                .iter()
                .enumerate()
                .filter_map(move |(bit, fraction)| {
                    let fraction = Decimal::try_from(*fraction).ok()?;
                    Some((bit, limit.saturating_mul(fraction), Some(fraction), None))
                })
        });
        let offset = self.settings.thresholds.len();
        let units = feature.thresholds.iter().enumerate().map(|(i, units)| {
            let line = Decimal::from(*units);
            let fraction = limit.filter(|l| !l.is_zero()).map(|l| line / l);
            (offset + i, line, fraction, Some(line))
        });
        for (bit, line, fraction, units) in fractions.chain(units) {
            let bit = u8::try_from(bit).unwrap_or(7);
            if applied.before < line
                && applied.after >= line
                && shard.fire(customer_id, applied.feature, applied.period_start, bit)
            {
                self.notices.send(Notice::Threshold {
                    customer_id: customer_id.to_string(),
                    feature: feature.id.clone(),
                    plan: customer.plan.clone(),
                    threshold: fraction,
                    units,
                    used: applied.after,
                    limit,
                    period_start: applied.period_start,
                    seq,
                });
            }
        }
        if let Some(cap) = feature.hard_caps.get(&customer.plan) {
            let cap = Decimal::from(*cap);
            if applied.before < cap && applied.after >= cap && customer.suspended.is_none() {
                self.notices.send(Notice::Suspend {
                    customer_id: customer_id.to_string(),
                    reason: format!(
                        "{} reached the hard cap of {cap} {} on plan {}",
                        feature.id,
                        feature.unit.as_deref().unwrap_or("units"),
                        customer.plan
                    ),
                });
            }
        }
    }

    /// `GET /v1/customers/{id}/usage`: every feature's standing.
    pub fn usage(&self, customer_id: &str) -> (Arc<Customer>, Vec<Standing>) {
        let customer = self.customers.get(customer_id);
        let now = self.clock.now_micros();
        let period = customer.period_at(now);
        let standings = (0..self.spec.features.len())
            .map(|i| {
                let mut standing = self.standing(&customer, i, Decimal::ZERO, None);
                standing.allowed &= customer.suspended.is_none();
                standing.projection = project(standing.used, standing.limit, &period, now);
                standing
            })
            .collect();
        (customer, standings)
    }

    /// `GET /v1/customers/{id}/entitlements/{feature}`.
    pub fn entitlement(&self, customer_id: &str, feature: &str) -> Result<Standing, LimitError> {
        let (index, _) = self
            .spec
            .feature(feature)
            .ok_or_else(|| LimitError::UnknownFeature(feature.to_string()))?;
        let customer = self.customers.get(customer_id);
        let mut standing = self.standing(&customer, index, Decimal::ZERO, None);
        standing.allowed &= customer.suspended.is_none();
        Ok(standing)
    }

    /// The standing of one feature now.
    fn standing(
        &self,
        customer: &Customer,
        index: usize,
        extra: Decimal,
        consumed: Option<Decimal>,
    ) -> Standing {
        let period = customer.period_at(self.clock.now_micros());
        let counter_index = u16::try_from(index).unwrap_or(u16::MAX);
        let (used, groups) = {
            let shard = self.counters.lock(&customer.id);
            (
                shard
                    .used(&customer.id, counter_index, period.start)
                    .saturating_add(shard.reserved(&customer.id, counter_index, period.start)),
                groups_of(&shard, &customer.id, counter_index, period.start),
            )
        };
        self.standing_from(
            customer,
            index,
            period,
            used.saturating_add(extra),
            groups,
            consumed,
        )
    }

    /// A standing from numbers already read under the shard's lock.
    fn standing_from(
        &self,
        customer: &Customer,
        index: usize,
        period: period::Period,
        used: Decimal,
        groups: Option<Map<String, Value>>,
        consumed: Option<Decimal>,
    ) -> Standing {
        let feature = &self.spec.features[index];
        let (limit, soft, allowed) = match feature.allowance(&customer.plan) {
            Allowance::None => (Some(Decimal::ZERO), false, false),
            Allowance::Unlimited => (None, false, true),
            Allowance::Limited { limit, soft } => {
                let limit = Decimal::from(limit);
                (Some(limit), soft, soft || used <= limit)
            }
        };
        Standing {
            allowed,
            customer_id: customer.id.clone(),
            feature: feature.id.clone(),
            plan: customer.plan.clone(),
            used,
            remaining: limit.map(|l| l.saturating_sub(used).max(Decimal::ZERO)),
            overage: limit
                .map(|l| used.saturating_sub(l).max(Decimal::ZERO))
                .unwrap_or_default(),
            limit,
            soft_limit: soft,
            unit: feature.unit.clone(),
            period_start: format_micros(period.start),
            period_end: format_micros(period.end),
            consumed,
            duplicate: false,
            groups,
            projection: None,
            as_of: self.as_of(),
        }
    }

    /// `POST /v1/check`: may the customer use `quantity` more units now? With `consume`, the
    /// units are reserved under the counter's lock and published as usage events before the
    /// answer, so two callers can never both take the last unit.
    pub async fn check(&self, request: CheckRequest) -> Result<Standing, LimitError> {
        let (index, feature) = self
            .spec
            .feature(&request.feature)
            .ok_or_else(|| LimitError::UnknownFeature(request.feature.clone()))?;
        let request = CheckRequest {
            customer_id: request.customer_id.trim().to_string(),
            event_id: request.event_id.map(|id| id.trim().to_string()),
            ..request
        };
        if let Some(message) = crate::event::id_problem(&request.customer_id) {
            return Err(LimitError::Invalid {
                field: "customer_id",
                message,
            });
        }
        // The id becomes a NATS header: it must be one ingest would take as a messageId.
        if let Some(message) = request
            .event_id
            .as_deref()
            .and_then(crate::event::id_problem)
        {
            return Err(LimitError::Invalid {
                field: "event_id",
                message,
            });
        }
        let quantity = match &request.quantity {
            None => Some(Decimal::ONE),
            Some(Value::Number(n)) => quantity::parse_decimal(&n.to_string()),
            Some(Value::String(s)) => quantity::parse_decimal(s.trim()),
            Some(_) => None,
        }
        .filter(|q| !q.is_sign_negative())
        .ok_or_else(|| LimitError::Invalid {
            field: "quantity",
            message: "must be a number at least 0".into(),
        })?;
        quantity::amount_within_bounds(quantity, self.settings.max_quantity, "quantity").map_err(
            |rejection| LimitError::Invalid {
                field: "quantity",
                message: rejection.message,
            },
        )?;
        let customer = self.customers.get(&request.customer_id);
        if let Some(suspension) = &customer.suspended {
            return Err(LimitError::Suspended {
                customer: customer.id.clone(),
                reason: suspension.reason.clone(),
            });
        }
        let consume_events = if request.consume {
            self.consume_events(feature, quantity)?
        } else {
            0
        };
        if consume_events > 0 {
            self.admits_customer(&customer.id)
                .map_err(|rejection| LimitError::Invalid {
                    field: "customer_id",
                    message: rejection.message,
                })?;
        }
        if consume_events > 0
            && let Some(gate) = self.gate.get()
        {
            (gate.admit)(consume_events as u64).map_err(LimitError::Refused)?;
        }
        let now = self.clock.now_micros();
        let period = customer.period_at(now);
        let counter_index = u16::try_from(index).unwrap_or(u16::MAX);
        let ids = match consume_events {
            0 => Vec::new(),
            n => consume_ids(
                &customer.id,
                feature,
                quantity,
                request.event_id.as_deref(),
                n,
            ),
        };
        let (used_after, groups) = {
            let mut shard = self.counters.lock(&customer.id);
            // A retry of a consume whose units are still reserved: they count once.
            if ids.first().is_some_and(|id| shard.is_reserved(id)) {
                let used = shard
                    .used(&customer.id, counter_index, period.start)
                    .saturating_add(shard.reserved(&customer.id, counter_index, period.start));
                let groups = groups_of(&shard, &customer.id, counter_index, period.start);
                drop(shard);
                let standing =
                    self.standing_from(&customer, index, period, used, groups, Some(quantity));
                return Ok(Standing {
                    duplicate: true,
                    ..standing
                });
            }
            let used = shard
                .used(&customer.id, counter_index, period.start)
                .saturating_add(shard.reserved(&customer.id, counter_index, period.start));
            let projected = match feature.aggregation {
                Aggregation::Max | Aggregation::Latest => used.max(quantity),
                _ => used.saturating_add(quantity),
            };
            let refusal = match feature.allowance(&customer.plan) {
                Allowance::None => Some(Decimal::ZERO),
                Allowance::Limited { limit, soft: false } if projected > Decimal::from(limit) => {
                    Some(Decimal::from(limit))
                }
                _ => None,
            };
            if let Some(limit) = refusal {
                drop(shard);
                return Err(LimitError::Exceeded(Box::new(
                    self.denial(&customer, feature, limit, used, quantity, period),
                )));
            }
            let per_event = if ids.len() > 1 {
                Decimal::ONE
            } else {
                quantity
            };
            for id in &ids {
                shard.reserve(id, &customer.id, counter_index, period.start, per_event);
            }
            let after = if ids.is_empty() {
                used
            } else {
                used.saturating_add(quantity)
            };
            (
                after,
                groups_of(&shard, &customer.id, counter_index, period.start),
            )
        };
        let mut used_after = used_after;
        let mut duplicate = false;
        if !ids.is_empty() {
            match self
                .publish_usage(
                    &customer,
                    feature,
                    quantity,
                    (&ids, request.event_id.as_deref()),
                    now,
                )
                .await
            {
                Ok(duplicates) if !duplicates.is_empty() => {
                    duplicate = true;
                    // The stream had these ids already (a retry of a consume that was stored):
                    // their units are counted from the stream, not reserved again.
                    let mut shard = self.counters.lock(&customer.id);
                    for id in duplicates.iter().filter_map(|i| ids.get(*i)) {
                        shard.cancel(id);
                    }
                    used_after = shard
                        .used(&customer.id, counter_index, period.start)
                        .saturating_add(shard.reserved(&customer.id, counter_index, period.start));
                }
                Ok(_) => {}
                Err(error) => {
                    let mut shard = self.counters.lock(&customer.id);
                    for id in &ids {
                        shard.cancel(id);
                    }
                    return Err(error.into());
                }
            }
        }
        let consumed = request.consume.then_some(quantity);
        let standing = self.standing_from(&customer, index, period, used_after, groups, consumed);
        Ok(Standing {
            duplicate,
            ..standing
        })
    }

    /// How many events a consume of `quantity` records: one carrying the quantity when the
    /// meter has a value property, else one per unit (each event counts one).
    fn consume_events(
        &self,
        feature: &spec::Feature,
        quantity: Decimal,
    ) -> Result<usize, LimitError> {
        let invalid = |message: String| LimitError::Invalid {
            field: "quantity",
            message,
        };
        match feature.aggregation {
            Aggregation::Sum | Aggregation::Count => {}
            _ => return Err(invalid(
                "consume records usage of sum and count meters only; send other usage as events"
                    .into(),
            )),
        }
        if quantity.is_zero() {
            return Ok(0);
        }
        if quantity > Decimal::from(self.settings.max_consume) {
            return Err(invalid(format!(
                "at most {} units per consume (metering.maxConsume)",
                self.settings.max_consume
            )));
        }
        if feature.value_property.is_some() && feature.aggregation == Aggregation::Sum {
            return Ok(1);
        }
        if !quantity.fract().is_zero() {
            return Err(invalid(
                "this meter counts events: consume whole units".into(),
            ));
        }
        usize::try_from(quantity.trunc().mantissa()).map_err(|_| invalid("too many units".into()))
    }

    /// Publishes the usage events of a consume (`ids`, and the caller's `event_id` if it
    /// gave one) and waits for their acks; returns the positions of the ids the stream
    /// already held.
    async fn publish_usage(
        &self,
        customer: &Customer,
        feature: &spec::Feature,
        quantity: Decimal,
        (ids, key): (&[String], Option<&str>),
        now: i64,
    ) -> Result<Vec<usize>, BusError> {
        let mut properties = Map::new();
        if let (Some(property), 1) = (&feature.value_property, ids.len()) {
            properties.insert(property.clone(), decimal_json(quantity));
        }
        let mut context = Map::new();
        context.insert(
            "library".into(),
            json!({"name": "northstar-check", "version": env!("CARGO_PKG_VERSION")}),
        );
        if let Some(key) = key {
            context.insert("idempotency_key".into(), Value::String(key.to_string()));
        }
        let messages = ids
            .iter()
            .map(|id| {
                let record = EventRecord {
                    event_id: id.clone(),
                    kind: EventType::Track,
                    event: Some(feature.event.clone()),
                    user_id: None,
                    anonymous_id: None,
                    customer_id: Some(customer.id.clone()),
                    timestamp: now,
                    received_at: now,
                    properties: properties.clone(),
                    context: context.clone(),
                    source: "limits-api".into(),
                    schema_version: None,
                    sample_rate: None,
                };
                Outgoing {
                    subject: subject_for(self.shards, &customer.id, "track"),
                    msg_id: id.clone(),
                    payload: Bytes::from(record.to_bus_json()),
                }
            })
            .collect();
        let report = self.publisher.publish_all(messages).await?;
        if let (Some(gate), Some(last)) = (self.gate.get(), report.sequences.iter().max()) {
            (gate.acked)(*last);
        }
        Ok(report.duplicates)
    }

    fn denial(
        &self,
        customer: &Customer,
        feature: &spec::Feature,
        limit: Decimal,
        used: Decimal,
        requested: Decimal,
        period: period::Period,
    ) -> Denial {
        let message = if limit.is_zero() {
            format!("plan {} has no access to {}", customer.plan, feature.id)
        } else {
            format!(
                "{} would exceed the {} limit of {limit} {} on plan {} (used {used}, asked {requested})",
                feature.id,
                "period",
                feature.unit.as_deref().unwrap_or("units"),
                customer.plan
            )
        };
        Denial {
            code: "usage_limit_exceeded",
            message,
            customer_id: customer.id.clone(),
            feature: feature.id.clone(),
            plan: customer.plan.clone(),
            limit,
            used,
            requested,
            period_start: format_micros(period.start),
            period_end: format_micros(period.end),
            upgrade: self.upgrade_path(customer, &feature.id),
            as_of: self.as_of(),
        }
    }

    /// The upgrade path a 402 of `feature` carries for `customer`, before billing adds its
    /// plan and Checkout Session.
    pub fn upgrade_path(&self, customer: &Customer, feature: &str) -> Upgrade {
        Upgrade {
            subscription_url: self
                .settings
                .upgrade_url
                .replace("{customer_id}", &url_encode(&customer.id))
                .replace("{feature}", &url_encode(feature))
                .replace("{plan}", &url_encode(&customer.plan)),
            plan: None,
            checkout_session_id: None,
            checkout_url: None,
        }
    }
}

/// The `groupBy` breakdown of a counter, if it has one.
fn groups_of(
    shard: &state::Shard,
    customer: &str,
    feature: u16,
    period_start: i64,
) -> Option<Map<String, Value>> {
    shard
        .customers
        .get(customer)
        .and_then(|u| u.counter(feature, period_start))
        .and_then(|c| c.groups.as_ref())
        .map(|g| {
            g.iter()
                .map(|(k, v)| (k.to_string(), decimal_json(*v)))
                .collect()
        })
}

/// A decimal as JSON: an integer when whole, else its exact text.
fn decimal_json(value: Decimal) -> Value {
    if value.fract().is_zero()
        && let Ok(n) = i64::try_from(value.trunc())
    {
        return Value::from(n);
    }
    Value::String(value.normalize().to_string())
}

/// Percent-encodes a URL component.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Namespace of the stream ids of consumes (a UUIDv5 namespace of northstar's own).
const CONSUME_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6e6f_7274_6873_7461_722d_636f_6e73_756d);

/// The stream ids of a consume's `n` events: UUIDv5s of the customer, the feature, the
/// quantity, the caller's `event_id` (a fresh UUIDv7 without one) and the event's place.
/// They cannot meet an ingested `messageId` by accident, nor another consume's id: a consume
/// with `event_id: "k-1"` is not the second unit of one with `event_id: "k"`, and the same
/// key sent with another quantity is another consume. A retry (all the same) has the same ids.
fn consume_ids(
    customer: &str,
    feature: &spec::Feature,
    quantity: Decimal,
    key: Option<&str>,
    n: usize,
) -> Vec<String> {
    let key = key.map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_string);
    let quantity = quantity.normalize();
    (0..n)
        .map(|i| {
            let name = format!("{customer}\0{}\0{quantity}\0{key}\0{i}", feature.id);
            uuid::Uuid::new_v5(&CONSUME_NAMESPACE, name.as_bytes()).to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// A projection needs an hour of the period, usage to cross a limit, and a crossing
    /// inside the period.
    #[test]
    fn a_projection_follows_the_rate_so_far() {
        use rust_decimal::Decimal;
        let hour = 3_600_000_000i64;
        let period = super::period::Period {
            start: 0,
            end: 100 * hour,
        };
        assert_eq!(
            super::project(Decimal::from(5), None, &period, hour / 2),
            None
        );
        let p = super::project(
            Decimal::from(10),
            Some(Decimal::from(50)),
            &period,
            10 * hour,
        )
        .unwrap();
        assert_eq!(p.per_day, Decimal::from(24));
        assert_eq!(p.at_period_end, Decimal::from(100));
        assert_eq!(
            p.limit_reached_at.as_deref(),
            Some("1970-01-03T02:00:00.000Z")
        );
        let slow = super::project(
            Decimal::from(1),
            Some(Decimal::from(50)),
            &period,
            10 * hour,
        )
        .unwrap();
        assert_eq!(slow.limit_reached_at, None, "the period ends first");
        let idle = super::project(Decimal::ZERO, Some(Decimal::from(50)), &period, 10 * hour);
        assert_eq!(idle.unwrap().limit_reached_at, None);
    }

    use super::*;

    #[test]
    fn decimals_become_exact_json() {
        assert_eq!(decimal_json(Decimal::from(3)), json!(3));
        assert_eq!(decimal_json("0.25".parse().unwrap()), json!("0.25"));
        assert_eq!(url_encode("a b&c"), "a%20b%26c");
    }
}
