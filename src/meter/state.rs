//! The meter's counters: per customer, feature and period, sharded by customer.
//!
//! The stream consumer is the only writer of usage; `/v1/check` with `consume` adds
//! reservations (units published but not yet seen on the stream) under the same shard lock, so
//! a check-and-consume is atomic and two callers can never both take the last unit. Each
//! shard also records the stream sequence it has applied up to, which lets a snapshot be
//! taken shard by shard without stopping the consumer (see [`super::snapshot`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::config::Aggregation;
use crate::schema::quantity::Contribution;

/// Number of shards (independent locks) of the counters.
pub(crate) const SHARDS: usize = 16;

/// The `groupBy` value usage is counted under once a counter breaks down by
/// `metering.maxGroupValues` values.
pub(crate) const OTHER_GROUP: &str = "(other)";

/// Most events a shard holds applied ahead of the follower; past it, events wait for the
/// follower (ingest sheds long before: `ingest.maxLag`).
pub(crate) const MAX_AHEAD_PER_SHARD: usize = 65_536;

/// An aggregate of one feature in one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Sum of quantities.
    Sum(Decimal),
    /// Number of events.
    Count(u64),
    /// Largest quantity.
    Max(Decimal),
    /// Quantity of the latest event by event time (ties: the later in the stream).
    Latest {
        /// Event time of the value.
        at: i64,
        /// The value.
        value: Decimal,
    },
    /// Distinct values seen, each held as its [`value_hash`]: a value costs the same few
    /// bytes whatever its length. At most `metering.maxUniqueValuesPerCounter` of them.
    Unique(#[serde(with = "unique_values")] Box<HashSet<u64>>),
}

/// The 64-bit FNV-1a hash a `unique_count` counter holds a value as. Stable across runs and
/// releases (snapshots hold it). Two of a million distinct values share a hash with a
/// chance of about 3 in 10^8, so the count is exact for any bound the config accepts.
pub(crate) fn value_hash(value: &str) -> u64 {
    let mut hasher = Fnv(FNV_OFFSET);
    hasher.write(value.as_bytes());
    hasher.finish()
}

/// The hash a `unique_count` counter holds a contribution as (a number counts as written).
fn distinct_hash(contribution: &Contribution) -> u64 {
    match contribution {
        Contribution::Distinct(v) => value_hash(v),
        Contribution::Amount(a) => value_hash(&a.to_string()),
    }
}

/// Snapshots before hashed values listed the values themselves: both read back.
mod unique_values {
    use std::collections::HashSet;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Held {
        Hash(u64),
        Value(String),
    }

    pub(super) fn serialize<S: Serializer>(set: &HashSet<u64>, out: S) -> Result<S::Ok, S::Error> {
        set.serialize(out)
    }

    // The field's own type: boxed so an `Aggregate` of any other kind stays small.
    #[allow(clippy::box_collection)]
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        input: D,
    ) -> Result<Box<HashSet<u64>>, D::Error> {
        let held = Vec::<Held>::deserialize(input)?;
        Ok(Box::new(
            held.into_iter()
                .map(|h| match h {
                    Held::Hash(hash) => hash,
                    Held::Value(value) => super::value_hash(&value),
                })
                .collect(),
        ))
    }
}

impl Aggregate {
    /// An empty aggregate of `aggregation`.
    pub fn empty(aggregation: Aggregation) -> Self {
        match aggregation {
            Aggregation::Sum => Self::Sum(Decimal::ZERO),
            Aggregation::Count => Self::Count(0),
            Aggregation::Max => Self::Max(Decimal::ZERO),
            Aggregation::Latest => Self::Latest {
                at: i64::MIN,
                value: Decimal::ZERO,
            },
            Aggregation::UniqueCount => Self::Unique(Box::default()),
        }
    }

    /// The usage this aggregate stands for.
    pub fn used(&self) -> Decimal {
        match self {
            Self::Sum(d) | Self::Max(d) => *d,
            Self::Count(n) => Decimal::from(*n),
            Self::Latest { value, .. } => *value,
            Self::Unique(set) => Decimal::from(set.len()),
        }
    }

    /// Adds one event's contribution; returns how many distinct values it added (one or
    /// none), for the meter's count of values held. A `unique_count` counter holding
    /// `most_unique` values takes no new one: its count stays at the bound.
    fn add(&mut self, contribution: &Contribution, at: i64, most_unique: usize) -> usize {
        let distinct = match self {
            Self::Unique(_) => distinct_hash(contribution),
            _ => 0,
        };
        match (&mut *self, contribution) {
            (Self::Sum(total), Contribution::Amount(a)) => *total = total.saturating_add(*a),
            (Self::Count(n), _) => *n += 1,
            (Self::Max(max), Contribution::Amount(a)) => *max = (*max).max(*a),
            (Self::Latest { at: seen, value }, Contribution::Amount(a)) => {
                if at >= *seen {
                    *seen = at;
                    *value = *a;
                }
            }
            (Self::Unique(set), _) => {
                if set.len() < most_unique || set.contains(&distinct) {
                    return usize::from(set.insert(distinct));
                }
            }
            (_, Contribution::Distinct(_)) => {}
        }
        0
    }

    /// Distinct values held (zero for other aggregates).
    fn values_held(&self) -> usize {
        match self {
            Self::Unique(set) => set.len(),
            _ => 0,
        }
    }
}

/// Usage of one feature in one period.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counter {
    /// Index of the feature in the meter spec.
    pub feature: u16,
    /// Start of the period (UTC µs).
    pub period_start: i64,
    /// The aggregate.
    pub value: Aggregate,
    /// Bit i set: threshold i of the config already fired this period.
    pub fired: u8,
    /// Breakdown by `groupBy` series, when the meter has one (sum of quantities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Box<BTreeMap<Box<str>, Decimal>>>,
}

/// A customer's counters (a few: current and previous period of each feature).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CustomerUsage {
    /// One per feature and period kept (two periods at most each).
    pub counters: Vec<Counter>,
    /// Arrival rate of metered events, for abuse detection (rebuilt after a restart).
    #[serde(skip)]
    pub rate: super::anomaly::RateWindow,
}

impl CustomerUsage {
    /// The counter of `feature` in the period starting at `period_start`.
    pub fn counter(&self, feature: u16, period_start: i64) -> Option<&Counter> {
        self.counters
            .iter()
            .find(|c| c.feature == feature && c.period_start == period_start)
    }
}

/// Units a consume took that the stream has not delivered yet.
#[derive(Debug, Clone)]
struct Reservation {
    customer: Box<str>,
    feature: u16,
    period_start: i64,
    amount: Decimal,
}

/// What one counter may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// `groupBy` values a counter breaks its usage down by (`metering.maxGroupValues`).
    pub group_values: usize,
    /// Distinct values a `unique_count` counter holds
    /// (`metering.maxUniqueValuesPerCounter`).
    pub unique_values: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            group_values: usize::MAX,
            unique_values: usize::MAX,
        }
    }
}

/// One shard: the customers whose id hashes to it.
#[derive(Debug, Default)]
pub struct Shard {
    /// Usage by customer.
    pub customers: HashMap<Box<str>, CustomerUsage>,
    /// The stream sequence this shard has applied up to (every event at or below it that
    /// belongs to this shard is in its counters).
    pub applied_seq: u64,
    /// Events of this shard applied when ingest's publish was acked, ahead of the follower
    /// (which skips them when it delivers them). Bounded by [`MAX_AHEAD_PER_SHARD`].
    pub ahead: std::collections::BTreeSet<u64>,
    /// Distinct values its `unique_count` counters hold together.
    pub unique_values: usize,
    bounds: Bounds,
    reservations: HashMap<Box<str>, Reservation>,
    reserved: HashMap<(Box<str>, u16, i64), Decimal>,
}

/// What applying an event changed, for thresholds and hard caps.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Index of the feature in the meter spec.
    pub feature: u16,
    /// Start of the period the event counted in (UTC µs).
    pub period_start: i64,
    /// Usage before the event.
    pub before: Decimal,
    /// Usage after it.
    pub after: Decimal,
}

/// All counters, sharded.
#[derive(Debug)]
pub struct Counters {
    shards: Vec<Mutex<Shard>>,
    /// Customers and distinct values each shard holds, as its last lock holder left it: read
    /// without a lock by ingest's admission of new customers and values.
    held: Vec<Held>,
    applied: AtomicU64,
    bounds: Bounds,
}

#[derive(Debug, Default)]
struct Held {
    customers: AtomicUsize,
    unique_values: AtomicUsize,
}

impl Default for Counters {
    fn default() -> Self {
        Self::new(Bounds::default())
    }
}

/// A locked shard; when it is let go, the shard's customer and value counts are published
/// for [`Counters::customers_held`] and [`Counters::unique_values_held`].
pub struct ShardGuard<'a> {
    guard: MutexGuard<'a, Shard>,
    held: &'a Held,
}

impl std::ops::Deref for ShardGuard<'_> {
    type Target = Shard;
    fn deref(&self) -> &Shard {
        &self.guard
    }
}

impl std::ops::DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut Shard {
        &mut self.guard
    }
}

impl Drop for ShardGuard<'_> {
    fn drop(&mut self) {
        self.held
            .customers
            .store(self.guard.customers.len(), Ordering::Relaxed);
        self.held
            .unique_values
            .store(self.guard.unique_values, Ordering::Relaxed);
    }
}

/// The shard of a customer id (stable across runs: FNV-1a).
pub(crate) fn shard_of(customer: &str) -> usize {
    let mut hasher = Fnv(FNV_OFFSET);
    customer.hash(&mut hasher);
    (hasher.finish() % SHARDS as u64) as usize
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl Counters {
    /// Empty counters, each holding at most `bounds`.
    pub fn new(bounds: Bounds) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        bounds,
                        ..Shard::default()
                    })
                })
                .collect(),
            held: (0..SHARDS).map(|_| Held::default()).collect(),
            applied: AtomicU64::new(0),
            bounds,
        }
    }

    /// Locks the shard of `customer`.
    pub fn lock(&self, customer: &str) -> ShardGuard<'_> {
        self.lock_shard(shard_of(customer))
    }

    /// Locks shard `index`.
    pub fn lock_shard(&self, index: usize) -> ShardGuard<'_> {
        let guard = match self.shards[index % SHARDS].lock() {
            Ok(guard) => guard,
            // A panic while holding the lock cannot leave a counter half-updated (every
            // update is a single assignment), so the data is still good.
            Err(poisoned) => poisoned.into_inner(),
        };
        ShardGuard {
            guard,
            held: &self.held[index % SHARDS],
        }
    }

    /// Customers held, without taking a lock (as of each shard's last unlock).
    pub fn customers_held(&self) -> usize {
        self.held
            .iter()
            .map(|h| h.customers.load(Ordering::Relaxed))
            .sum()
    }

    /// Distinct values the `unique_count` counters hold, without taking a lock (as of each
    /// shard's last unlock).
    pub fn unique_values_held(&self) -> usize {
        self.held
            .iter()
            .map(|h| h.unique_values.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether the meter holds counters of `customer`.
    pub fn holds(&self, customer: &str) -> bool {
        self.lock(customer).customers.contains_key(customer)
    }

    /// The last stream sequence applied (every event at or below it is counted).
    pub fn applied_seq(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Records that everything up to `seq` is applied. Call with the event's shard still
    /// locked (or for events that touch no shard), so a snapshot of a shard taken under its
    /// lock never claims an event it does not hold.
    pub fn set_applied(&self, seq: u64) {
        self.applied.store(seq, Ordering::SeqCst);
    }

    /// Forgets everything: every shard's counters, the events it took ahead of the follower
    /// and its reservations, and the applied position. For a meter rebuilt from the stream
    /// after its snapshot was set aside: a sequence left in `ahead` from the old stream would
    /// make the follower skip the new stream's event of that number.
    pub fn reset(&self) {
        for index in 0..SHARDS {
            *self.lock_shard(index) = Shard {
                bounds: self.bounds,
                ..Shard::default()
            };
        }
        self.set_applied(0);
    }

    /// Number of counters (for metrics and the memory benchmark).
    pub fn counter_count(&self) -> usize {
        (0..SHARDS)
            .map(|i| {
                self.lock_shard(i)
                    .customers
                    .values()
                    .map(|c| c.counters.len())
                    .sum::<usize>()
            })
            .sum()
    }
}

impl Shard {
    /// Applies one event's contribution to the counter of (`customer`, `feature`,
    /// `period_start`), keeping at most two periods per feature (the current and the one
    /// before; an event for an older period is ignored and `None` is returned). `group` is
    /// the event's `groupBy` value: a value past the shard's [`Bounds::group_values`] is
    /// counted under [`OTHER_GROUP`].
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        customer: &str,
        feature: u16,
        aggregation: Aggregation,
        period_start: i64,
        contribution: &Contribution,
        group: Option<&str>,
        at: i64,
        event_id: &str,
    ) -> Option<Applied> {
        if let Some(reservation) = self.reservations.remove(event_id) {
            self.release(&reservation);
        }
        // Looked up before inserting: `entry` would allocate the key for every event.
        if !self.customers.contains_key(customer) {
            self.customers
                .insert(customer.into(), CustomerUsage::default());
        }
        let usage = self.customers.get_mut(customer)?;
        let newest = usage
            .counters
            .iter()
            .filter(|c| c.feature == feature)
            .map(|c| c.period_start)
            .max()
            .unwrap_or(i64::MIN);
        let index = match usage
            .counters
            .iter()
            .position(|c| c.feature == feature && c.period_start == period_start)
        {
            Some(index) => index,
            None => {
                let older_kept = usage
                    .counters
                    .iter()
                    .filter(|c| c.feature == feature)
                    .count();
                if period_start < newest && older_kept >= 2 {
                    return None;
                }
                // Most customers have one counter per feature: no room for four.
                usage.counters.reserve_exact(1);
                usage.counters.push(Counter {
                    feature,
                    period_start,
                    value: Aggregate::empty(aggregation),
                    fired: 0,
                    groups: None,
                });
                // Keep the two most recent periods of the feature.
                let mut starts: Vec<i64> = usage
                    .counters
                    .iter()
                    .filter(|c| c.feature == feature)
                    .map(|c| c.period_start)
                    .collect();
                if starts.len() > 2 {
                    starts.sort_unstable();
                    let oldest = starts[0];
                    let mut dropped = 0;
                    usage.counters.retain(|c| {
                        let keep = c.feature != feature || c.period_start != oldest;
                        if !keep {
                            dropped += c.value.values_held();
                        }
                        keep
                    });
                    self.unique_values = self.unique_values.saturating_sub(dropped);
                }
                usage
                    .counters
                    .iter()
                    .position(|c| c.feature == feature && c.period_start == period_start)?
            }
        };
        let counter = &mut usage.counters[index];
        let before = counter.value.used();
        self.unique_values += counter
            .value
            .add(contribution, at, self.bounds.unique_values);
        if let (Some(group), Contribution::Amount(amount)) = (group, contribution) {
            let groups = counter.groups.get_or_insert_with(Box::default);
            let key = if groups.contains_key(group) || groups.len() < self.bounds.group_values {
                group
            } else {
                OTHER_GROUP
            };
            let sum = groups.entry(key.into()).or_default();
            *sum = sum.saturating_add(*amount);
        }
        Some(Applied {
            feature,
            period_start,
            before,
            after: counter.value.used(),
        })
    }

    /// Whether counting `contribution` in the `unique_count` counter of (`customer`,
    /// `feature`, `period_start`) would hold a new value: not when the counter has it
    /// already, or is full (it then takes no more).
    pub fn would_hold(
        &self,
        customer: &str,
        feature: u16,
        period_start: i64,
        contribution: &Contribution,
    ) -> bool {
        let Some(Aggregate::Unique(set)) = self
            .customers
            .get(customer)
            .and_then(|u| u.counter(feature, period_start))
            .map(|c| &c.value)
        else {
            return true;
        };
        set.len() < self.bounds.unique_values && !set.contains(&distinct_hash(contribution))
    }

    /// Counts the distinct values the shard's counters hold again (after a snapshot is
    /// loaded into it).
    pub fn recount_unique_values(&mut self) {
        self.unique_values = self
            .customers
            .values()
            .flat_map(|u| &u.counters)
            .map(|c| c.value.values_held())
            .sum();
    }

    /// Counts a metered event's arrival for abuse detection.
    pub fn record_arrival(
        &mut self,
        customer: &str,
        received_at: i64,
        factor: f64,
        min_events: u64,
    ) -> Option<super::anomaly::Spike> {
        self.customers
            .get_mut(customer)?
            .rate
            .record(received_at, factor, min_events)
    }

    /// Usage of a feature in a period (zero when nothing was counted).
    pub fn used(&self, customer: &str, feature: u16, period_start: i64) -> Decimal {
        self.customers
            .get(customer)
            .and_then(|u| u.counter(feature, period_start))
            .map(|c| c.value.used())
            .unwrap_or_default()
    }

    /// Units consumed through `/v1/check` that the stream has not delivered yet.
    pub fn reserved(&self, customer: &str, feature: u16, period_start: i64) -> Decimal {
        self.reserved
            .get(&(Box::from(customer), feature, period_start))
            .copied()
            .unwrap_or_default()
    }

    /// Reserves units for an event about to be published with `event_id`.
    pub fn reserve(
        &mut self,
        event_id: &str,
        customer: &str,
        feature: u16,
        period_start: i64,
        amount: Decimal,
    ) {
        let reservation = Reservation {
            customer: customer.into(),
            feature,
            period_start,
            amount,
        };
        let total = self
            .reserved
            .entry((customer.into(), feature, period_start))
            .or_default();
        *total = total.saturating_add(amount);
        self.reservations.insert(event_id.into(), reservation);
    }

    /// Whether units are reserved for `event_id` (its consume is in flight or not yet seen on
    /// the stream).
    pub fn is_reserved(&self, event_id: &str) -> bool {
        self.reservations.contains_key(event_id)
    }

    /// Drops a reservation whose event was not stored (its publish failed).
    pub fn cancel(&mut self, event_id: &str) {
        if let Some(reservation) = self.reservations.remove(event_id) {
            self.release(&reservation);
        }
    }

    fn release(&mut self, reservation: &Reservation) {
        let key = (
            reservation.customer.clone(),
            reservation.feature,
            reservation.period_start,
        );
        if let Some(total) = self.reserved.get_mut(&key) {
            *total = total.saturating_sub(reservation.amount);
            if total.is_zero() || total.is_sign_negative() {
                self.reserved.remove(&key);
            }
        }
    }

    /// Marks threshold `bit` fired for a counter; returns false if it had fired already.
    pub fn fire(&mut self, customer: &str, feature: u16, period_start: i64, bit: u8) -> bool {
        let Some(counter) = self.customers.get_mut(customer).and_then(|u| {
            u.counters
                .iter_mut()
                .find(|c| c.feature == feature && c.period_start == period_start)
        }) else {
            return false;
        };
        let mask = 1u8 << bit.min(7);
        let first = counter.fired & mask == 0;
        counter.fired |= mask;
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount(n: i64) -> Contribution {
        Contribution::Amount(Decimal::from(n))
    }

    #[test]
    fn group_values_past_the_bound_are_counted_as_other_and_the_total_stays_exact() {
        let counters = Counters::new(Bounds {
            group_values: 2,
            ..Bounds::default()
        });
        let mut shard = counters.lock("c");
        for (i, region) in ["eu", "us", "ap", "eu", "sa"].iter().enumerate() {
            shard.apply(
                "c",
                0,
                Aggregation::Sum,
                0,
                &amount(i as i64 + 1),
                Some(region),
                1,
                "x",
            );
        }
        let counter = &shard.customers["c"].counters[0];
        let groups = counter.groups.as_deref().expect("groups");
        let by: Vec<(&str, i64)> = groups
            .iter()
            .map(|(k, v)| (&**k, i64::try_from(*v).unwrap()))
            .collect();
        assert_eq!(by, [("(other)", 3 + 5), ("eu", 1 + 4), ("us", 2)]);
        assert_eq!(counter.value.used(), Decimal::from(15));
        drop(shard);
        assert_eq!(
            counters.customers_held(),
            1,
            "published when the lock is let go"
        );
        assert!(counters.holds("c") && !counters.holds("d"));
    }

    #[test]
    fn a_reset_forgets_the_events_taken_ahead_of_the_follower() {
        let counters = Counters::default();
        {
            let mut shard = counters.lock("acme");
            shard.applied_seq = 40;
            shard.ahead.extend([41, 42]);
            shard.reserve("e1", "acme", 0, 100, Decimal::ONE);
            shard.apply("acme", 0, Aggregation::Sum, 100, &amount(3), None, 5, "e0");
        }
        counters.set_applied(42);
        counters.reset();
        let shard = counters.lock("acme");
        assert!(
            shard.ahead.is_empty(),
            "sequence 41 of a new stream would be skipped"
        );
        assert!(shard.customers.is_empty());
        assert_eq!(shard.reserved("acme", 0, 100), Decimal::ZERO);
        assert_eq!((shard.applied_seq, counters.applied_seq()), (0, 0));
    }

    #[test]
    fn sums_and_reservations_add_up() {
        let counters = Counters::default();
        let mut shard = counters.lock("acme");
        shard.reserve("e1", "acme", 0, 100, Decimal::from(3));
        assert_eq!(shard.reserved("acme", 0, 100), Decimal::from(3));
        let applied = shard
            .apply("acme", 0, Aggregation::Sum, 100, &amount(3), None, 5, "e1")
            .unwrap();
        assert_eq!(
            (applied.before, applied.after),
            (Decimal::ZERO, Decimal::from(3))
        );
        assert_eq!(
            shard.reserved("acme", 0, 100),
            Decimal::ZERO,
            "the stream took over the reservation"
        );
        shard.apply("acme", 0, Aggregation::Sum, 100, &amount(2), None, 6, "e2");
        assert_eq!(shard.used("acme", 0, 100), Decimal::from(5));
        shard.reserve("e3", "acme", 0, 100, Decimal::ONE);
        shard.cancel("e3");
        assert_eq!(shard.reserved("acme", 0, 100), Decimal::ZERO);
    }

    #[test]
    fn only_two_periods_are_kept_and_older_events_are_ignored() {
        let counters = Counters::default();
        let mut shard = counters.lock("c");
        for period in [100, 200, 300] {
            shard.apply(
                "c",
                0,
                Aggregation::Count,
                period,
                &amount(1),
                None,
                period,
                "x",
            );
        }
        let starts: Vec<i64> = shard.customers["c"]
            .counters
            .iter()
            .map(|c| c.period_start)
            .collect();
        assert_eq!(starts, [200, 300]);
        assert!(
            shard
                .apply(
                    "c",
                    0,
                    Aggregation::Count,
                    100,
                    &amount(1),
                    None,
                    100,
                    "late"
                )
                .is_none()
        );
        assert!(
            shard
                .apply(
                    "c",
                    0,
                    Aggregation::Count,
                    200,
                    &amount(1),
                    None,
                    250,
                    "late-ok"
                )
                .is_some()
        );
        assert_eq!(shard.used("c", 0, 200), Decimal::from(2));
    }

    #[test]
    fn max_latest_and_unique() {
        let counters = Counters::default();
        let mut shard = counters.lock("c");
        shard.apply("c", 0, Aggregation::Max, 0, &amount(5), None, 1, "a");
        shard.apply("c", 0, Aggregation::Max, 0, &amount(3), None, 2, "b");
        assert_eq!(shard.used("c", 0, 0), Decimal::from(5));
        shard.apply("c", 1, Aggregation::Latest, 0, &amount(7), None, 10, "c");
        shard.apply("c", 1, Aggregation::Latest, 0, &amount(9), None, 5, "d");
        assert_eq!(
            shard.used("c", 1, 0),
            Decimal::from(7),
            "an older event does not replace the latest"
        );
        for v in ["u1", "u2", "u1"] {
            shard.apply(
                "c",
                2,
                Aggregation::UniqueCount,
                0,
                &Contribution::Distinct(v.into()),
                None,
                1,
                v,
            );
        }
        assert_eq!(shard.used("c", 2, 0), Decimal::from(2));
    }

    #[test]
    fn a_full_unique_counter_takes_no_new_value_and_the_meter_counts_what_it_holds() {
        let counters = Counters::new(Bounds {
            unique_values: 3,
            ..Bounds::default()
        });
        let distinct = |v: &str| Contribution::Distinct(v.into());
        {
            let mut shard = counters.lock("c");
            for v in ["u1", "u2", "u1", "u3", "u4", "u2"] {
                shard.apply(
                    "c",
                    0,
                    Aggregation::UniqueCount,
                    100,
                    &distinct(v),
                    None,
                    1,
                    v,
                );
            }
            assert_eq!(
                shard.used("c", 0, 100),
                Decimal::from(3),
                "stays at the bound"
            );
            assert!(
                !shard.would_hold("c", 0, 100, &distinct("u5")),
                "full: takes no more"
            );
            assert!(!shard.would_hold("c", 0, 100, &distinct("u1")));
            assert!(
                shard.would_hold("c", 0, 200, &distinct("u1")),
                "another period"
            );
        }
        assert_eq!(counters.unique_values_held(), 3, "published at unlock");
        {
            let mut shard = counters.lock("c");
            shard.apply(
                "c",
                0,
                Aggregation::UniqueCount,
                200,
                &distinct("a"),
                None,
                1,
                "a",
            );
            shard.apply(
                "c",
                0,
                Aggregation::UniqueCount,
                300,
                &distinct("b"),
                None,
                1,
                "b",
            );
        }
        assert_eq!(
            counters.unique_values_held(),
            2,
            "the oldest period's values are let go with it"
        );
        let mut shard = counters.lock("c");
        shard.unique_values = 0;
        shard.recount_unique_values();
        assert_eq!(shard.unique_values, 2);
    }

    #[test]
    fn unique_values_are_read_back_from_snapshots_that_listed_them() {
        let held: Aggregate = serde_json::from_str(r#"{"unique":["u1","u2",7]}"#).unwrap();
        let Aggregate::Unique(set) = &held else {
            panic!("not a unique count: {held:?}")
        };
        assert!(set.contains(&value_hash("u1")) && set.contains(&7));
        let again: Aggregate =
            serde_json::from_str(&serde_json::to_string(&held).unwrap()).unwrap();
        assert_eq!(again, held);
    }

    #[test]
    fn thresholds_fire_once() {
        let counters = Counters::default();
        let mut shard = counters.lock("c");
        shard.apply("c", 0, Aggregation::Sum, 0, &amount(1), None, 1, "a");
        assert!(shard.fire("c", 0, 0, 0));
        assert!(!shard.fire("c", 0, 0, 0));
        assert!(shard.fire("c", 0, 0, 1));
    }

    #[test]
    fn shards_are_stable() {
        assert_eq!(shard_of("acme"), shard_of("acme"));
        assert!(shard_of("acme") < SHARDS);
    }
}
