//! Insights: funnels and retention, the two questions every product analytics tool starts
//! with, as DataFusion SQL over `events_resolved` (identity merges applied).
//!
//! Each is a template in `queries/insights/` whose placeholders are filled from a checked
//! question: event names only ever as quoted literals, a breakdown only as a known column or a
//! quoted property key. The answer carries the SQL that ran, so an analyst can run it again
//! with `northstar sql` or change it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::activation::analysis::Dialect;
use crate::query::{QueryEngine, QueryError, string_literal};

const FUNNEL_SQL: &str = include_str!("../queries/insights/funnel.sql");
const RETENTION_SQL: &str = include_str!("../queries/insights/retention.sql");

/// Most steps a funnel may have.
pub const MAX_STEPS: usize = 10;
/// Most periods a retention table may have.
pub const MAX_PERIODS: u32 = 52;
/// How far back a question looks when it names no `from`.
const DEFAULT_SPAN: Duration = Duration::from_secs(30 * 86_400);
/// Columns of `events` a funnel may be broken down by.
const BREAKDOWN_COLUMNS: &[&str] = &["customer_id", "source", "type", "schema_version"];

/// Why a question cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum InsightError {
    /// The question is malformed; the field is named.
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The query failed.
    #[error(transparent)]
    Query(#[from] QueryError),
}

impl crate::error::Classify for InsightError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            Self::Invalid { .. } => crate::error::ErrorKind::InvalidInput,
            Self::Query(error) => error.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_question",
            Self::Query(error) => error.code(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Invalid { .. } => None,
            Self::Query(error) => error.retry_after(),
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> InsightError {
    InsightError::Invalid {
        field,
        message: message.into(),
    }
}

/// The time range of a question: `from` (default 30 days before `to`) and `to` (default now),
/// RFC 3339.
fn range(from: Option<&str>, to: Option<&str>, now: i64) -> Result<(i64, i64), InsightError> {
    let parse = |field: &'static str, text: &str| {
        crate::activation::generate::parse_timestamp(text)
            .ok_or_else(|| invalid(field, format!("`{text}` is not an RFC 3339 time")))
    };
    let to = to.map(|t| parse("to", t)).transpose()?.unwrap_or(now);
    let span = i64::try_from(DEFAULT_SPAN.as_micros()).unwrap_or(i64::MAX);
    let from = from
        .map(|f| parse("from", f))
        .transpose()?
        .unwrap_or(to - span);
    if from >= to {
        return Err(invalid("from", "must be before `to`"));
    }
    Ok((from, to))
}

/// `POST /v1/insights/funnel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelQuestion {
    /// The steps' event names, in order (2 to [`MAX_STEPS`]).
    pub steps: Vec<String>,
    /// Conversion window after the first step ("7d", "12h"; default 7 days).
    #[serde(default)]
    pub window: Option<String>,
    /// People enter with a first step at or after this time (RFC 3339).
    #[serde(default)]
    pub from: Option<String>,
    /// …and before this one.
    #[serde(default)]
    pub to: Option<String>,
    /// Split by a column of the first step's event (`customer_id`, `source`, …) or one of its
    /// properties (`properties.plan`).
    #[serde(default)]
    pub breakdown: Option<String>,
}

/// One step of a funnel, for one breakdown value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunnelStep {
    /// The step's event name.
    pub event: String,
    /// People who reached it.
    pub people: u64,
    /// Share of those who reached the previous step (none for the first).
    pub conversion_from_previous: Option<f64>,
    /// Share of those who entered.
    pub conversion_from_first: f64,
    /// Median time from the previous step to this one, seconds (none for the first).
    pub median_seconds_to_convert: Option<f64>,
}

/// A funnel's answer for one breakdown value (`null` without a breakdown).
#[derive(Debug, Clone, Serialize)]
pub struct FunnelGroup {
    /// The breakdown value.
    pub breakdown: Value,
    /// Every step, in order.
    pub steps: Vec<FunnelStep>,
}

/// A funnel's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Funnel {
    /// One group per breakdown value (one, `null`, without a breakdown), largest first.
    pub groups: Vec<FunnelGroup>,
    /// The range people entered in (RFC 3339).
    pub from: String,
    /// End of that range.
    pub to: String,
    /// The conversion window, seconds.
    pub window_seconds: u64,
    /// The SQL that ran.
    pub sql: String,
}

impl FunnelQuestion {
    /// The SQL that answers it in `dialect`, checked; with the range and window it covers.
    pub fn render(
        &self,
        now: i64,
        dialect: Dialect,
    ) -> Result<(String, i64, i64, Duration), InsightError> {
        if !(2..=MAX_STEPS).contains(&self.steps.len()) {
            return Err(invalid(
                "steps",
                format!(
                    "a funnel has 2 to {MAX_STEPS} steps; {} given",
                    self.steps.len()
                ),
            ));
        }
        if let Some(i) = self.steps.iter().position(|s| s.trim().is_empty()) {
            return Err(invalid("steps", format!("step {i} has no event name")));
        }
        let window = match &self.window {
            Some(text) => crate::config::parse_duration(text).map_err(|e| invalid("window", e))?,
            None => Duration::from_secs(7 * 86_400),
        };
        if window.is_zero() {
            return Err(invalid("window", "must be positive"));
        }
        let (from, to) = range(self.from.as_deref(), self.to.as_deref(), now)?;
        let breakdown = match self.breakdown.as_deref().map(str::trim) {
            None | Some("") => "CAST(NULL AS VARCHAR)".to_string(),
            Some(column) if BREAKDOWN_COLUMNS.contains(&column) => format!("\"{column}\""),
            Some(path) => match path.strip_prefix("properties.") {
                Some(key) if !key.is_empty() => format!("properties->>{}", string_literal(key)),
                _ => {
                    return Err(invalid(
                        "breakdown",
                        format!(
                            "`{path}` is neither a column ({}) nor `properties.<key>`",
                            BREAKDOWN_COLUMNS.join(", ")
                        ),
                    ));
                }
            },
        };
        let window_us = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        let names: Vec<String> = self.steps.iter().map(|s| string_literal(s)).collect();
        let mut later = String::new();
        let mut counts = vec![
            "SELECT 1 AS step, breakdown, count(*) AS people, CAST(NULL AS DOUBLE) AS median_us FROM s1 GROUP BY breakdown".to_string(),
        ];
        for (i, name) in names.iter().enumerate().skip(1) {
            let (k, prev) = (i + 1, i);
            later.push_str(&format!(
                ",\ns{k} AS (\n    SELECT p.person_id, p.t1, p.breakdown, min(e.ts) AS t_prev, min(e.ts) - p.t_prev AS took\n    \
                 FROM s{prev} p JOIN e ON e.person_id = p.person_id\n    \
                 WHERE e.event = {name} AND e.ts > p.t_prev AND e.ts < p.t1 + {window_us}\n    \
                 GROUP BY p.person_id, p.t1, p.breakdown, p.t_prev\n)"
            ));
            counts.push(format!(
                "SELECT {k} AS step, breakdown, count(*) AS people, CAST(median(took) AS DOUBLE) AS median_us FROM s{k} GROUP BY breakdown"
            ));
        }
        let sql = template(FUNNEL_SQL, dialect)
            .replace("{step_names}", &names.join(", "))
            .replace("{first_step}", &names[0])
            .replace("{from_us}", &from.to_string())
            .replace("{to_us}", &to.to_string())
            .replace("{window_us}", &window_us.to_string())
            .replace("{breakdown}", &breakdown)
            .replace("{later_steps}", &later)
            .replace("{step_counts}", &counts.join("\nUNION ALL\n"));
        Ok((sql, from, to, window))
    }
}

/// The template without its comment lines, its engine-specific markers rendered for
/// `dialect` (before any placeholder is filled, so no user text is ever rewritten):
/// `US(x)`, a timestamp as UTC microseconds, and `FIRST_BY(x, t)`, the `x` of the least `t`.
fn template(sql: &str, dialect: Dialect) -> String {
    let mut sql = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for marker in ["US(", "FIRST_BY("] {
        while let Some(start) = sql.find(marker) {
            let open = start + marker.len();
            let mut depth = 1;
            let Some(close) = sql[open..].char_indices().find_map(|(i, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                (depth == 0).then_some(open + i)
            }) else {
                break;
            };
            let inner = sql[open..close].to_string();
            let rendered = match (marker, dialect) {
                ("US(", Dialect::DataFusion) => format!("CAST({inner} AS BIGINT)"),
                ("US(", Dialect::DuckDb) => format!("epoch_us({inner})"),
                (_, Dialect::DataFusion) => match inner.split_once(',') {
                    Some((x, t)) => format!("first_value({} ORDER BY {})", x.trim(), t.trim()),
                    None => inner,
                },
                (_, Dialect::DuckDb) => format!("arg_min({inner})"),
            };
            sql.replace_range(start..=close, &rendered);
        }
    }
    sql
}

/// Answers a funnel question.
pub async fn funnel(
    engine: &QueryEngine,
    question: &FunnelQuestion,
    now: i64,
) -> Result<Funnel, InsightError> {
    let (sql, from, to, window) = question.render(now, Dialect::DataFusion)?;
    let rows = rows(engine, &sql).await?;
    // (breakdown as JSON text) → step → (people, median µs)
    let mut counted: BTreeMap<String, BTreeMap<u64, (u64, Option<f64>)>> = BTreeMap::new();
    for row in &rows {
        let step = row["step"].as_u64().unwrap_or(0);
        let key = row["breakdown"].to_string();
        let people = row["people"].as_u64().unwrap_or(0);
        counted
            .entry(key)
            .or_default()
            .insert(step, (people, row["median_us"].as_f64()));
    }
    let mut groups: Vec<FunnelGroup> = counted
        .into_iter()
        .map(|(key, steps)| {
            let entered = steps.get(&1).map_or(0, |s| s.0);
            let mut previous = entered;
            let steps = question
                .steps
                .iter()
                .enumerate()
                .map(|(i, event)| {
                    let (people, median) = steps.get(&(i as u64 + 1)).copied().unwrap_or((0, None));
                    let share = |of: u64| (of > 0).then(|| people as f64 / of as f64);
                    let step = FunnelStep {
                        event: event.clone(),
                        people,
                        conversion_from_previous: if i == 0 { None } else { share(previous) },
                        conversion_from_first: share(entered).unwrap_or(0.0),
                        median_seconds_to_convert: median.map(|us| us / 1e6),
                    };
                    previous = people;
                    step
                })
                .collect();
            FunnelGroup {
                breakdown: serde_json::from_str(&key).unwrap_or(Value::Null),
                steps,
            }
        })
        .collect();
    groups.sort_by(|a, b| b.steps[0].people.cmp(&a.steps[0].people));
    if groups.is_empty() {
        groups.push(FunnelGroup {
            breakdown: Value::Null,
            steps: question
                .steps
                .iter()
                .map(|event| FunnelStep {
                    event: event.clone(),
                    people: 0,
                    conversion_from_previous: None,
                    conversion_from_first: 0.0,
                    median_seconds_to_convert: None,
                })
                .collect(),
        });
    }
    Ok(Funnel {
        groups,
        from: crate::clock::format_micros(from),
        to: crate::clock::format_micros(to),
        window_seconds: window.as_secs(),
        sql,
    })
}

/// The period of a retention table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// UTC days.
    Day,
    /// UTC weeks, from Monday.
    #[default]
    Week,
}

impl Period {
    fn micros(self) -> i64 {
        match self {
            Self::Day => 86_400_000_000,
            Self::Week => 7 * 86_400_000_000,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Week => "week",
        }
    }
}

/// `POST /v1/insights/retention`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetentionQuestion {
    /// The event that puts a person in a cohort (their first one in the range).
    pub cohort_event: String,
    /// The event that counts as coming back.
    pub return_event: String,
    /// `day` or `week` (default).
    #[serde(default)]
    pub period: Period,
    /// Periods reported (default 8, at most [`MAX_PERIODS`]).
    #[serde(default)]
    pub periods: Option<u32>,
    /// Cohort events at or after this time (RFC 3339).
    #[serde(default)]
    pub from: Option<String>,
    /// …and before this one.
    #[serde(default)]
    pub to: Option<String>,
}

/// One cohort's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cohort {
    /// Start of the cohort's period (RFC 3339).
    pub cohort: String,
    /// People in it.
    pub people: u64,
    /// People who came back in period 0, 1, …
    pub returned: Vec<u64>,
}

/// A retention table.
#[derive(Debug, Clone, Serialize)]
pub struct Retention {
    /// `day` or `week`.
    pub period: Period,
    /// Periods reported.
    pub periods: u32,
    /// One row per cohort, oldest first.
    pub cohorts: Vec<Cohort>,
    /// The SQL that ran.
    pub sql: String,
}

impl RetentionQuestion {
    /// The SQL that answers it in `dialect`, checked, and the number of periods.
    pub fn render(&self, now: i64, dialect: Dialect) -> Result<(String, u32), InsightError> {
        for (field, name) in [
            ("cohortEvent", &self.cohort_event),
            ("returnEvent", &self.return_event),
        ] {
            if name.trim().is_empty() {
                return Err(invalid(field, "an event name is required"));
            }
        }
        let periods = self.periods.unwrap_or(8);
        if !(1..=MAX_PERIODS).contains(&periods) {
            return Err(invalid(
                "periods",
                format!("must be between 1 and {MAX_PERIODS}"),
            ));
        }
        let (from, to) = range(self.from.as_deref(), self.to.as_deref(), now)?;
        let sql = template(RETENTION_SQL, dialect)
            .replace("{cohort_event}", &string_literal(&self.cohort_event))
            .replace("{return_event}", &string_literal(&self.return_event))
            .replace("{from_us}", &from.to_string())
            .replace("{to_us}", &to.to_string())
            .replace("{period_us}", &self.period.micros().to_string())
            .replace("{period}", &string_literal(self.period.name()))
            .replace("{periods}", &periods.to_string());
        Ok((sql, periods))
    }
}

/// Answers a retention question.
pub async fn retention(
    engine: &QueryEngine,
    question: &RetentionQuestion,
    now: i64,
) -> Result<Retention, InsightError> {
    let (sql, periods) = question.render(now, Dialect::DataFusion)?;
    let rows = rows(engine, &sql).await?;
    let mut cohorts: BTreeMap<i64, Cohort> = BTreeMap::new();
    for row in &rows {
        let (Some(start), Some(k), Some(people)) = (
            row["cohort"].as_i64(),
            row["k"].as_i64(),
            row["people"].as_u64(),
        ) else {
            continue;
        };
        let cohort = cohorts.entry(start).or_insert_with(|| Cohort {
            cohort: crate::clock::format_micros(start),
            people: 0,
            returned: vec![0; periods as usize],
        });
        match usize::try_from(k) {
            Ok(k) if k < cohort.returned.len() => cohort.returned[k] = people,
            Ok(_) => {}
            Err(_) => cohort.people = people,
        }
    }
    Ok(Retention {
        period: question.period,
        periods,
        cohorts: cohorts.into_values().collect(),
        sql,
    })
}

/// Runs `sql` within the SQL bounds and returns its rows as JSON objects.
async fn rows(engine: &QueryEngine, sql: &str) -> Result<Vec<Value>, InsightError> {
    let result = engine.run(sql).await?;
    let rows = crate::query::output::rows_json(&result.batches)
        .map_err(|e| QueryError::Internal(format!("reading an insight's rows: {e}")))?;
    Ok(match rows {
        Value::Array(rows) => rows,
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names reach the SQL only as quoted literals, and a breakdown only as a known column or
    /// a quoted property key.
    #[test]
    fn user_text_never_reaches_the_sql_unquoted() {
        let question = FunnelQuestion {
            steps: vec!["a'); DROP TABLE events; --".into(), "US(b)".into()],
            window: None,
            from: None,
            to: None,
            breakdown: Some("properties.x'y".into()),
        };
        let (sql, ..) = question
            .render(1_000_000_000_000_000, Dialect::DataFusion)
            .unwrap();
        assert!(sql.contains("'a''); DROP TABLE events; --'"), "{sql}");
        assert!(sql.contains("properties->>'x''y'"), "{sql}");
        assert!(
            sql.contains("'US(b)'"),
            "a name is never taken for a marker: {sql}"
        );
        assert!(!sql.contains("US(\"") && sql.contains("first_value(breakdown ORDER BY ts)"));
        let bad = FunnelQuestion {
            breakdown: Some("user_id; DROP".into()),
            ..question.clone()
        };
        let err = bad.render(0, Dialect::DataFusion).unwrap_err().to_string();
        assert!(err.starts_with("breakdown:"), "{err}");
        let one = FunnelQuestion {
            steps: vec!["a".into()],
            ..question
        };
        let err = one.render(0, Dialect::DataFusion).unwrap_err().to_string();
        assert!(err.starts_with("steps:"));
    }
}
