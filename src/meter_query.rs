//! `GET /v1/meters/{feature}/usage`: a feature's usage over time, by window, customer and
//! dimension, the way OpenMeter's query API answers it.
//!
//! It is DataFusion SQL over the `metered_events` view, which the server reads with the write
//! buffer (events acked but not yet in Parquet), so every window, the open one included,
//! equals what `SELECT … FROM metered_events` counts: one source, no seam between "closed"
//! and "open" usage. Windows are calendar minutes, hours, days or months in a time zone
//! (`windowTimeZone`, default UTC): a day of a daylight-saving change is 23 or 25 hours long,
//! as a customer's invoice counts it. The meter's counters (`/v1/check`, `/usage`) stay the
//! answer for "now".

use std::str::FromStr;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{Aggregation, Config};
use crate::query::{QueryEngine, QueryError, string_literal};

/// How long one window is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowSize {
    /// A calendar minute.
    Minute,
    /// A calendar hour.
    Hour,
    /// A calendar day in the time zone.
    Day,
    /// A calendar month in the time zone.
    Month,
}

impl WindowSize {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "minute" | "MINUTE" => Some(Self::Minute),
            "hour" | "HOUR" => Some(Self::Hour),
            "day" | "DAY" => Some(Self::Day),
            "month" | "MONTH" => Some(Self::Month),
            _ => None,
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The start of the next window after the one starting at `start` (a window start).
    fn next(self, start: DateTime<Tz>) -> Option<DateTime<Tz>> {
        let tz = start.timezone();
        let local = start.naive_local();
        let next = match self {
            Self::Minute => return Some(start + chrono::Duration::minutes(1)),
            Self::Hour => return Some(start + chrono::Duration::hours(1)),
            Self::Day => local.date().succ_opt()?.and_hms_opt(0, 0, 0)?,
            Self::Month => {
                let (year, month) = match local.month() {
                    12 => (local.year() + 1, 1),
                    m => (local.year(), m + 1),
                };
                chrono::NaiveDate::from_ymd_opt(year, month, 1)?.and_hms_opt(0, 0, 0)?
            }
        };
        // Midnight that a clock change skips (or repeats): the earliest instant that is it.
        tz.from_local_datetime(&next).earliest().or_else(|| {
            tz.from_local_datetime(&(next + chrono::Duration::hours(1)))
                .earliest()
        })
    }
}

/// Why a usage query cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum MeterQueryError {
    /// A parameter is wrong; it is named.
    #[error("{field}: {message}")]
    Invalid {
        /// The offending parameter.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No such feature.
    #[error("feature `{0}` is not metered by any event of the config")]
    UnknownFeature(String),
    /// The query failed.
    #[error(transparent)]
    Query(#[from] QueryError),
}

impl crate::error::Classify for MeterQueryError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            Self::Invalid { .. } => crate::error::ErrorKind::InvalidInput,
            Self::UnknownFeature(_) => crate::error::ErrorKind::NotFound,
            Self::Query(error) => error.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_parameter",
            Self::UnknownFeature(_) => "unknown_feature",
            Self::Query(error) => error.code(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Query(error) => error.retry_after(),
            _ => None,
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> MeterQueryError {
    MeterQueryError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// One row of the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageWindow {
    /// The window's start (RFC 3339, UTC).
    pub window_start: String,
    /// Its end, the next window's start.
    pub window_end: String,
    /// The customer, when the query splits by customer (always, unless one is named).
    pub customer: Option<String>,
    /// The dimension values, when grouped.
    pub group_by: Map<String, Value>,
    /// The usage, exact, as SQL counts it.
    #[serde(serialize_with = "crate::json::exact::decimal")]
    pub value: rust_decimal::Decimal,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageQuery {
    /// The feature.
    pub feature: String,
    /// Start of the range (RFC 3339).
    pub from: String,
    /// End of the range.
    pub to: String,
    /// `minute`, `hour`, `day` or `month`.
    pub window_size: WindowSize,
    /// The IANA time zone of the windows.
    pub window_time_zone: String,
    /// One row per window, customer and dimension values with usage, by window then customer.
    pub data: Vec<UsageWindow>,
}

/// Answers `GET /v1/meters/{feature}/usage` with the query string's parameters.
pub async fn usage(
    engine: &QueryEngine,
    config: &Config,
    feature: &str,
    params: &[(String, String)],
    now: i64,
) -> Result<UsageQuery, MeterQueryError> {
    let meterings: Vec<_> = config
        .events
        .iter()
        .filter_map(|e| e.metering.as_ref().filter(|m| m.feature_id == feature))
        .collect();
    let Some(metering) = meterings.first() else {
        return Err(MeterQueryError::UnknownFeature(feature.to_string()));
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    for (name, _) in params {
        let known = [
            "customer",
            "from",
            "to",
            "windowSize",
            "windowTimeZone",
            "groupBy",
        ];
        if !known.contains(&name.as_str()) && !name.starts_with("filter[") {
            return Err(invalid(name.as_str(), "unknown parameter"));
        }
    }
    let size = match param("windowSize") {
        None => WindowSize::Day,
        Some(text) => WindowSize::parse(text)
            .ok_or_else(|| invalid("windowSize", "one of minute, hour, day, month"))?,
    };
    let zone_name = param("windowTimeZone").unwrap_or("UTC");
    let zone = Tz::from_str(zone_name).map_err(|_| {
        invalid(
            "windowTimeZone",
            format!("`{zone_name}` is not an IANA time zone"),
        )
    })?;
    let time = |field: &str, text: &str| {
        crate::activation::generate::parse_timestamp(text)
            .ok_or_else(|| invalid(field, format!("`{text}` is not an RFC 3339 time")))
    };
    let to = param("to")
        .map(|t| time("to", t))
        .transpose()?
        .unwrap_or(now);
    let from = param("from")
        .map(|t| time("from", t))
        .transpose()?
        .unwrap_or(to - 30 * 86_400_000_000);
    if from >= to {
        return Err(invalid("from", "must be before `to`"));
    }
    // Dimensions: those the meter is configured with.
    let dimensions: Vec<&str> = match param("groupBy") {
        None | Some("") => Vec::new(),
        Some(list) => list.split(',').map(str::trim).collect(),
    };
    for dimension in &dimensions {
        if !metering.group_by.iter().any(|g| g == dimension) {
            return Err(invalid(
                "groupBy",
                format!(
                    "`{dimension}` is not a groupBy of the `{feature}` meter ({})",
                    metering.group_by.join(", ")
                ),
            ));
        }
    }
    let mut filters = Vec::new();
    for (name, value) in params {
        let Some(key) = name
            .strip_prefix("filter[")
            .and_then(|k| k.strip_suffix(']'))
        else {
            continue;
        };
        if !metering.group_by.iter().any(|g| g == key) {
            return Err(invalid(
                name.as_str(),
                "filters name a groupBy of the meter",
            ));
        }
        filters.push(format!(
            "json_as_text(properties, {}) = {}",
            string_literal(key),
            string_literal(value)
        ));
    }
    if let Some(customer) = param("customer") {
        filters.push(format!("customer_id = {}", string_literal(customer)));
    }
    let value = match metering.aggregation {
        Aggregation::Sum | Aggregation::Count => "sum(quantity)".to_string(),
        Aggregation::Max => "max(quantity)".to_string(),
        Aggregation::Latest => "last_value(quantity ORDER BY \"timestamp\")".to_string(),
        Aggregation::UniqueCount => format!(
            "CAST(count(DISTINCT json_as_text(properties, {})) AS DECIMAL(38, 10))",
            string_literal(metering.value_property.as_deref().unwrap_or_default())
        ),
    };
    let tz_type = format!("Timestamp(Microsecond, Some(\"{}\"))", zone.name());
    let window = format!(
        "date_trunc({}, arrow_cast(\"timestamp\", {}))",
        string_literal(size.unit()),
        string_literal(&tz_type)
    );
    let dims: String = dimensions
        .iter()
        .map(|d| {
            format!(
                ", json_as_text(properties, {}) AS {}",
                string_literal(d),
                quote_ident(d)
            )
        })
        .collect();
    let group_dims: String = dimensions
        .iter()
        .map(|d| format!(", {}", quote_ident(d)))
        .collect();
    let mut conditions = vec![
        format!("feature = {}", string_literal(feature)),
        format!("CAST(\"timestamp\" AS BIGINT) >= {from}"),
        format!("CAST(\"timestamp\" AS BIGINT) < {to}"),
    ];
    conditions.extend(filters);
    let sql = format!(
        "SELECT CAST(arrow_cast({window}, 'Timestamp(Microsecond, Some(\"UTC\"))') AS BIGINT) AS window_start, customer_id{dims}, \
         CAST({value} AS VARCHAR) AS value \
         FROM metered_events WHERE {} \
         GROUP BY 1, customer_id{group_dims} ORDER BY 1, customer_id{group_dims}",
        conditions.join(" AND ")
    );
    let result = engine.run(&sql).await?;
    let rows = crate::query::output::rows_json(&result.batches)
        .map_err(|e| QueryError::Internal(format!("reading usage windows: {e}")))?;
    let mut data = Vec::new();
    for row in rows.as_array().into_iter().flatten() {
        let Some(start) = row["window_start"].as_i64() else {
            continue;
        };
        let start_utc = Utc.timestamp_micros(start).single();
        let Some(start_local) = start_utc.map(|t| t.with_timezone(&zone)) else {
            continue;
        };
        let end = size
            .next(start_local)
            .map(|t| crate::clock::format_micros(t.with_timezone(&Utc).timestamp_micros()))
            .unwrap_or_default();
        let group_by: Map<String, Value> = dimensions
            .iter()
            .map(|d| (d.to_string(), row[*d].clone()))
            .collect();
        let Some(value) = row["value"]
            .as_str()
            .and_then(|text| rust_decimal::Decimal::from_str(text).ok())
        else {
            continue;
        };
        data.push(UsageWindow {
            window_start: crate::clock::format_micros(start),
            window_end: end,
            customer: row["customer_id"].as_str().map(str::to_string),
            group_by,
            value,
        });
    }
    Ok(UsageQuery {
        feature: feature.to_string(),
        from: crate::clock::format_micros(from),
        to: crate::clock::format_micros(to),
        window_size: size,
        window_time_zone: zone.name().to_string(),
        data,
    })
}

/// An identifier in double quotes (a dimension name as a result column).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
