//! `northstar usage verify`: proves meter state = SQL over `events` = `usage` sums, for the
//! same stream range.
//!
//! It waits for a quiet moment in which the meter, the archive and every pipeline have all
//! reached the stream's last sequence, then compares, per customer and feature of the current
//! period: the meter's number, the same sum in SQL over `metered_events` (the archived events,
//! up to that sequence), and the sum of the hourly `usage` windows inside the period. Sum and
//! count meters are compared (max, latest and unique counts do not add up over windows).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use rust_decimal::Decimal;
use serde::Serialize;
use tokio::sync::watch;

use super::Meter;
use crate::config::Aggregation;
use crate::query::{QueryEngine, QueryError};

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Whether every number agreed.
    pub ok: bool,
    /// The stream sequence all three were compared at.
    pub seq: u64,
    /// Customer-feature pairs compared.
    pub compared: usize,
    /// Total usage in the meter over the pairs compared.
    pub meter_total: Decimal,
    /// The same from SQL over events.
    pub events_total: Decimal,
    /// The same from the usage windows.
    pub usage_total: Decimal,
    /// The pairs that disagree (at most 50).
    pub mismatches: Vec<Mismatch>,
}

/// One pair that disagrees.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// Id of the customer whose usage differs.
    pub customer_id: String,
    /// Id of the feature (`usageFeatures[].id`).
    pub feature: String,
    /// Usage as the meter's counters hold it.
    pub meter: Decimal,
    /// SQL over events.
    pub events: Decimal,
    /// Usage windows.
    pub usage: Decimal,
}

/// What verification needs to see of the running server.
pub struct Positions {
    /// JetStream, for the stream's last sequence.
    pub js: async_nats::jetstream::Context,
    /// The events stream.
    pub stream: String,
    /// The archive's committed sequence.
    pub archived: watch::Receiver<u64>,
    /// The least advanced pipeline's sequence.
    pub pipelines: watch::Receiver<u64>,
}

/// Runs the verification; `wait` bounds the wait for a quiet moment.
pub async fn verify(
    meter: &Arc<Meter>,
    engine: &QueryEngine,
    positions: &Positions,
    wait: Duration,
) -> Result<VerifyReport, QueryError> {
    let started = Instant::now();
    let seq = loop {
        let last = crate::bus::streams::last_sequence(&positions.js, &positions.stream)
            .await
            .unwrap_or(u64::MAX);
        let applied = meter.counters().applied_seq();
        let archived = *positions.archived.borrow();
        let piped = *positions.pipelines.borrow();
        if applied == last && archived == last && piped >= last {
            break last;
        }
        if started.elapsed() > wait {
            return Err(QueryError::Internal(format!(
                "no quiet moment within {wait:?}: stream at {last}, meter at {applied}, archive at {archived}, pipelines at {piped}; \
                 run verify while ingest pauses"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The current period of every customer-feature pair the meter knows.
    let now = meter.clock.now_micros();
    let mut pairs: Vec<(String, String, i64, i64, Decimal, Aggregation)> = Vec::new();
    for shard in 0..super::state::SHARDS {
        let guard = meter.counters().lock_shard(shard);
        for (customer_id, usage) in &guard.customers {
            let customer = meter.customers().get(customer_id);
            let period = customer.period_at(now);
            for counter in usage
                .counters
                .iter()
                .filter(|c| c.period_start == period.start)
            {
                let Some(feature) = meter.spec().features.get(usize::from(counter.feature)) else {
                    continue;
                };
                if matches!(feature.aggregation, Aggregation::Sum | Aggregation::Count) {
                    pairs.push((
                        customer_id.to_string(),
                        feature.id.clone(),
                        period.start,
                        period.end,
                        counter.value.used(),
                        feature.aggregation,
                    ));
                }
            }
        }
    }

    // …and every pair SQL sees that the meter does not hold (a counter it dropped or never
    // made must show up as a mismatch, not be left out of the comparison).
    let held: std::collections::HashSet<(String, String)> =
        pairs.iter().map(|p| (p.0.clone(), p.1.clone())).collect();
    let since = now.saturating_sub(LONGEST_PERIOD_MICROS);
    let seen = engine
        .collect_internal(&format!(
            "SELECT DISTINCT customer_id, feature FROM metered_events \
             WHERE seq <= {seq} AND \"timestamp\" >= to_timestamp_micros({since})"
        ))
        .await?;
    for (customer_id, feature_id) in string_pairs(&seen) {
        if held.contains(&(customer_id.clone(), feature_id.clone())) {
            continue;
        }
        let Some((index, feature)) = meter.spec().feature(&feature_id) else {
            continue;
        };
        if !matches!(feature.aggregation, Aggregation::Sum | Aggregation::Count) {
            continue;
        }
        let customer = meter.customers().get(&customer_id);
        let period = customer.period_at(now);
        let used = meter.counters().lock(&customer_id).used(
            &customer_id,
            u16::try_from(index).unwrap_or(u16::MAX),
            period.start,
        );
        pairs.push((
            customer_id,
            feature_id,
            period.start,
            period.end,
            used,
            feature.aggregation,
        ));
    }

    let table = format!("verify_periods_{}", uuid::Uuid::new_v4().simple());
    let schema = Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Utf8, false),
        Field::new("feature", DataType::Utf8, false),
        Field::new("period_start", crate::event::timestamp_type(), false),
        Field::new("period_end", crate::event::timestamp_type(), false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            pairs.iter().map(|p| p.0.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            pairs.iter().map(|p| p.1.as_str()),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(pairs.iter().map(|p| p.2))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(pairs.iter().map(|p| p.3))
                .with_timezone("UTC"),
        ),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    let mem = MemTable::try_new(schema, vec![vec![batch]])?;
    engine.context().register_table(&table, Arc::new(mem))?;
    let from_events = format!(
        "SELECT p.customer_id, p.feature, CAST(sum(m.quantity) AS VARCHAR) AS q, count(*) AS n FROM {table} p \
         JOIN metered_events m ON m.customer_id = p.customer_id AND m.feature = p.feature \
         AND m.\"timestamp\" >= p.period_start AND m.\"timestamp\" < p.period_end AND m.seq <= {seq} GROUP BY 1, 2"
    );
    let from_usage = format!(
        "SELECT p.customer_id, p.feature, CAST(sum(u.quantity) AS VARCHAR) AS q, CAST(sum(u.events) AS BIGINT) AS n FROM {table} p \
         JOIN usage u ON u.customer_id = p.customer_id AND u.feature = p.feature AND u.pipeline = 'usage_hourly' \
         AND u.window_start >= p.period_start AND u.window_start < p.period_end GROUP BY 1, 2"
    );
    let events = engine.collect_internal(&from_events).await;
    let usage = engine.collect_internal(&from_usage).await;
    let _ = engine.context().deregister_table(&table);
    let events = sums(&events?);
    let usage = sums(&usage?);

    let mut report = VerifyReport {
        ok: true,
        seq,
        compared: pairs.len(),
        meter_total: Decimal::ZERO,
        events_total: Decimal::ZERO,
        usage_total: Decimal::ZERO,
        mismatches: Vec::new(),
    };
    for (customer, feature, _, _, used, aggregation) in &pairs {
        let key = (customer.clone(), feature.clone());
        let pick = |m: &std::collections::HashMap<(String, String), (Decimal, Decimal)>| {
            m.get(&key)
                .map(|(q, n)| {
                    if *aggregation == Aggregation::Count {
                        *n
                    } else {
                        *q
                    }
                })
                .unwrap_or_default()
        };
        let (from_events, from_usage) = (pick(&events), pick(&usage));
        report.meter_total = report.meter_total.saturating_add(*used);
        report.events_total = report.events_total.saturating_add(from_events);
        report.usage_total = report.usage_total.saturating_add(from_usage);
        if *used != from_events || *used != from_usage {
            report.ok = false;
            if report.mismatches.len() < 50 {
                report.mismatches.push(Mismatch {
                    customer_id: customer.clone(),
                    feature: feature.clone(),
                    meter: *used,
                    events: from_events,
                    usage: from_usage,
                });
            }
        }
    }
    report.meter_total = report.meter_total.normalize();
    report.events_total = report.events_total.normalize();
    report.usage_total = report.usage_total.normalize();
    Ok(report)
}

/// The longest usage period (a leap year), to find every pair whose current period SQL sees.
const LONGEST_PERIOD_MICROS: i64 = 366 * 86_400 * 1_000_000;

/// The (customer, feature) rows of a two-column query.
fn string_pairs(batches: &[RecordBatch]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for batch in batches {
        let text = |i: usize| {
            arrow::compute::cast(batch.column(i), &DataType::Utf8)
                .ok()
                .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
        };
        let (Some(customers), Some(features)) = (text(0), text(1)) else {
            continue;
        };
        for row in 0..batch.num_rows() {
            if !customers.is_null(row) && !features.is_null(row) {
                out.push((
                    customers.value(row).to_string(),
                    features.value(row).to_string(),
                ));
            }
        }
    }
    out
}

/// (customer, feature) → (sum of quantity, count) from a verification query.
fn sums(
    batches: &[RecordBatch],
) -> std::collections::HashMap<(String, String), (Decimal, Decimal)> {
    let mut out = std::collections::HashMap::new();
    for batch in batches {
        let text = |i: usize| {
            arrow::compute::cast(batch.column(i), &DataType::Utf8)
                .ok()
                .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
        };
        let (Some(customers), Some(features), Some(quantities)) = (text(0), text(1), text(2))
        else {
            continue;
        };
        let counts = arrow::compute::cast(batch.column(3), &DataType::Int64).ok();
        let counts = counts.as_ref().and_then(|c| {
            c.as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .cloned()
        });
        for row in 0..batch.num_rows() {
            let quantity = if quantities.is_null(row) {
                Decimal::ZERO
            } else {
                quantities.value(row).parse().unwrap_or_default()
            };
            let count = counts
                .as_ref()
                .map(|c| Decimal::from(c.value(row)))
                .unwrap_or_default();
            out.insert(
                (
                    customers.value(row).to_string(),
                    features.value(row).to_string(),
                ),
                (quantity.normalize(), count),
            );
        }
    }
    out
}
