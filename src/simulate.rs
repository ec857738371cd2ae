//! Pricing what-ifs: a period's real usage replayed, in stream order, through draft
//! `usageFeatures`: per customer and feature, what today's plan billed and the draft would
//! bill, and when each would have answered 402 or suspended the customer.
//!
//! Read-only: SQL over `metered_events` (the archive and the write buffer) on the query
//! threads, within `/v1/sql`'s bounds. Each customer is taken on the plan they are on now.
//! Usage past a hard limit was refused when it happened, so the history holds none: a draft
//! with a higher limit shows the usage that happened, not the usage a higher limit would have
//! let in.

use std::collections::BTreeMap;

use arrow::array::{Array, Decimal128Array, StringArray, TimestampMicrosecondArray};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::config::{Aggregation, Config, UsageFeature};
use crate::query::{QueryEngine, QueryError, string_literal};

/// What `POST /v1/simulate` asks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Draft {
    /// The draft features, in the config's shape; a feature not named keeps today's terms.
    pub usage_features: Vec<UsageFeature>,
    /// Start of the period replayed (RFC 3339).
    pub from: String,
    /// End of the period replayed (RFC 3339, exclusive).
    pub to: String,
}

/// Why a simulation gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The draft is wrong; the field is named.
    #[error("{field}: {message}")]
    Invalid {
        /// Path of the offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The usage could not be read.
    #[error(transparent)]
    Query(#[from] QueryError),
}

impl crate::error::Classify for SimulateError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            Self::Invalid { .. } => crate::error::ErrorKind::InvalidInput,
            Self::Query(error) => error.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_draft",
            Self::Query(error) => error.code(),
        }
    }
}

/// One customer's feature under one set of terms.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Outcome {
    /// The plan's limit (`null`: unlimited).
    pub limit: Option<u64>,
    /// Usage past a soft limit, billed as overage.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub overage: Decimal,
    /// What the overage costs (`pricing.overage` per unit).
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub bill: Decimal,
    /// When a hard limit was first passed: `/v1/check` answers 402 from then.
    pub limit_reached_at: Option<String>,
    /// When the hard cap was reached: the customer is suspended from then.
    pub suspended_at: Option<String>,
}

/// One customer and feature.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Line {
    /// The customer.
    pub customer_id: String,
    /// The feature.
    pub feature: String,
    /// The customer's plan now.
    pub plan: String,
    /// Usage in the period, as the feature's meter counts it.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub used: Decimal,
    /// Under today's `usageFeatures`.
    pub today: Outcome,
    /// Under the draft.
    pub draft: Outcome,
}

/// Sums over every line.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Totals {
    /// Customer and feature pairs with usage.
    pub lines: usize,
    /// Overage billed today.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub bill_today: Decimal,
    /// Overage the draft would bill.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub bill_draft: Decimal,
    /// Lines that passed a hard limit today.
    pub limit_reached_today: usize,
    /// Lines that would pass a hard limit under the draft.
    pub limit_reached_draft: usize,
    /// Lines that reached a hard cap today.
    pub suspended_today: usize,
    /// Lines that would reach a hard cap under the draft.
    pub suspended_draft: usize,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
pub struct Simulation {
    /// The period replayed.
    pub from: String,
    /// Its end.
    pub to: String,
    /// One line per customer and feature with usage, by customer then feature.
    pub lines: Vec<Line>,
    /// The sums.
    pub totals: Totals,
}

/// Replays `draft`'s period through today's terms and the draft's, for every customer on the
/// plan `plan_of` says.
pub async fn run(
    query: &QueryEngine,
    config: &Config,
    plan_of: impl Fn(&str) -> String,
    draft: &Draft,
) -> Result<Simulation, SimulateError> {
    let invalid = |field: &str, message: String| SimulateError::Invalid {
        field: field.into(),
        message,
    };
    let parse = |field: &str, text: &str| {
        crate::activation::generate::parse_timestamp(text)
            .ok_or_else(|| invalid(field, format!("`{text}` is not an RFC 3339 time")))
    };
    let (from, to) = (parse("from", &draft.from)?, parse("to", &draft.to)?);
    if to <= from {
        return Err(invalid("to", "must be after from".into()));
    }
    let mut candidate = config.clone();
    for (i, feature) in draft.usage_features.iter().enumerate() {
        let Some(slot) = candidate
            .usage_features
            .iter_mut()
            .find(|f| f.id == feature.id)
        else {
            return Err(invalid(
                &format!("usageFeatures[{i}].id"),
                format!("`{}` is not a feature of the config", feature.id),
            ));
        };
        *slot = feature.clone();
    }
    candidate
        .validate()
        .map_err(|(field, message): (String, String)| invalid(&field, message))?;
    let mut features = BTreeMap::new();
    for feature in &draft.usage_features {
        let aggregation = config
            .events
            .iter()
            .filter_map(|e| e.metering.as_ref())
            .find(|m| m.feature_id == feature.id)
            .map(|m| m.aggregation);
        let aggregation = match aggregation {
            Some(a @ (Aggregation::Sum | Aggregation::Count | Aggregation::Max)) => a,
            Some(other) => {
                return Err(invalid(
                    "usageFeatures",
                    format!(
                        "`{}` is metered by {other:?}, which is not simulated (sum, count and max are)",
                        feature.id
                    ),
                ));
            }
            None => {
                return Err(invalid(
                    "usageFeatures",
                    format!("no event meters `{}`", feature.id),
                ));
            }
        };
        let today = config.usage_features.iter().find(|f| f.id == feature.id);
        features.insert(feature.id.clone(), (aggregation, today.cloned(), feature));
    }
    let names: Vec<String> = features.keys().map(|f| string_literal(f)).collect();
    let sql = format!(
        "SELECT customer_id, feature, \"timestamp\", quantity FROM metered_events \
         WHERE feature IN ({}) AND \"timestamp\" >= to_timestamp_micros({from}) \
         AND \"timestamp\" < to_timestamp_micros({to}) ORDER BY customer_id, feature, seq",
        names.join(", ")
    );
    let batches = query.collect_internal(&sql).await?;
    let mut lines: Vec<Line> = Vec::new();
    let mut run: Option<Replay> = None;
    for batch in &batches {
        let strings =
            |i: usize| arrow::compute::cast(batch.column(i), &arrow::datatypes::DataType::Utf8);
        let (customers, feature_ids) =
            (strings(0).map_err(internal)?, strings(1).map_err(internal)?);
        let (Some(customers), Some(feature_ids)) = (
            customers.as_any().downcast_ref::<StringArray>(),
            feature_ids.as_any().downcast_ref::<StringArray>(),
        ) else {
            return Err(internal("metered_events has unexpected column types").into());
        };
        let times = batch
            .column(2)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>();
        let quantities = batch.column(3).as_any().downcast_ref::<Decimal128Array>();
        let (Some(times), Some(quantities)) = (times, quantities) else {
            return Err(
                QueryError::Internal("metered_events has unexpected column types".into()).into(),
            );
        };
        for row in 0..batch.num_rows() {
            let (customer, feature) = (text(customers, row), text(feature_ids, row));
            if run
                .as_ref()
                .is_none_or(|r| r.line.customer_id != customer || r.line.feature != feature)
            {
                lines.extend(run.take().map(Replay::finish));
                let Some((aggregation, today, draft)) = features.get(feature) else {
                    continue;
                };
                let plan = plan_of(customer);
                run = Some(Replay::new(
                    customer,
                    feature,
                    plan,
                    *aggregation,
                    today.as_ref(),
                    draft,
                ));
            }
            let quantity = Decimal::from_i128_with_scale(quantities.value(row), scale(quantities));
            if let Some(run) = run.as_mut() {
                run.add(quantity, times.value(row));
            }
        }
    }
    lines.extend(run.take().map(Replay::finish));
    let mut totals = Totals {
        lines: lines.len(),
        ..Totals::default()
    };
    for line in &lines {
        totals.bill_today += line.today.bill;
        totals.bill_draft += line.draft.bill;
        totals.limit_reached_today += usize::from(line.today.limit_reached_at.is_some());
        totals.limit_reached_draft += usize::from(line.draft.limit_reached_at.is_some());
        totals.suspended_today += usize::from(line.today.suspended_at.is_some());
        totals.suspended_draft += usize::from(line.draft.suspended_at.is_some());
    }
    Ok(Simulation {
        from: crate::clock::format_micros(from),
        to: crate::clock::format_micros(to),
        lines,
        totals,
    })
}

fn internal(error: impl std::fmt::Display) -> QueryError {
    QueryError::Internal(error.to_string())
}

fn text(array: &StringArray, row: usize) -> &str {
    if array.is_null(row) {
        ""
    } else {
        array.value(row)
    }
}

fn scale(array: &Decimal128Array) -> u32 {
    u32::try_from(array.scale()).unwrap_or(0)
}

/// One customer and feature's usage, replayed through both sets of terms.
struct Replay {
    line: Line,
    aggregation: Aggregation,
    terms: [Terms; 2],
}

/// One plan's terms for one feature.
struct Terms {
    /// `None`: the plan has no access; `Some(None)`: unlimited.
    limit: Option<Option<u64>>,
    soft: bool,
    cap: Option<u64>,
    price: Decimal,
}

impl Terms {
    fn of(feature: Option<&UsageFeature>, plan: &str) -> Self {
        let Some(feature) = feature else {
            return Self {
                limit: Some(None),
                soft: false,
                cap: None,
                price: Decimal::ZERO,
            };
        };
        Self {
            limit: feature.limits.get(plan).copied(),
            soft: feature.soft_limits.iter().any(|p| p == plan),
            cap: feature.hard_caps.get(plan).copied(),
            price: feature
                .pricing
                .as_ref()
                .and_then(|p| p.overage)
                .and_then(|p| Decimal::try_from(p).ok())
                .unwrap_or_default(),
        }
    }
}

impl Replay {
    fn new(
        customer: &str,
        feature: &str,
        plan: String,
        aggregation: Aggregation,
        today: Option<&UsageFeature>,
        draft: &UsageFeature,
    ) -> Self {
        let terms = [Terms::of(today, &plan), Terms::of(Some(draft), &plan)];
        let outcome = |terms: &Terms| Outcome {
            limit: terms.limit.flatten(),
            ..Outcome::default()
        };
        Self {
            line: Line {
                customer_id: customer.to_string(),
                feature: feature.to_string(),
                today: outcome(&terms[0]),
                draft: outcome(&terms[1]),
                plan,
                used: Decimal::ZERO,
            },
            aggregation,
            terms,
        }
    }

    /// One metered event, in stream order.
    fn add(&mut self, quantity: Decimal, at: i64) {
        self.line.used = match self.aggregation {
            Aggregation::Max => self.line.used.max(quantity),
            _ => self.line.used + quantity,
        };
        let used = self.line.used;
        let outcomes = [&mut self.line.today, &mut self.line.draft];
        for (terms, outcome) in self.terms.iter().zip(outcomes) {
            let over_limit = match terms.limit {
                None => true,
                Some(None) => false,
                Some(Some(limit)) => used > Decimal::from(limit),
            };
            if over_limit && !terms.soft && outcome.limit_reached_at.is_none() {
                outcome.limit_reached_at = Some(crate::clock::format_micros(at));
            }
            if let Some(cap) = terms.cap
                && used >= Decimal::from(cap)
                && outcome.suspended_at.is_none()
            {
                outcome.suspended_at = Some(crate::clock::format_micros(at));
            }
        }
    }

    fn finish(mut self) -> Line {
        let used = self.line.used;
        let outcomes = [&mut self.line.today, &mut self.line.draft];
        for (terms, outcome) in self.terms.iter().zip(outcomes) {
            if let (true, Some(Some(limit))) = (terms.soft, terms.limit) {
                outcome.overage = (used - Decimal::from(limit)).max(Decimal::ZERO);
                outcome.bill = outcome.overage * terms.price;
            }
        }
        self.line
    }
}
