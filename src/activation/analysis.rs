//! The analysis: `queries/activation/histogram.sql` over the event history (DataFusion), then
//! the a/b/c/d cells of every candidate and their statistics.

use std::collections::BTreeMap;

use arrow::array::{Array, Int64Array};
use arrow::datatypes::DataType;
use serde::Serialize;

use super::stats::{self, Cell, Evaluation, Guards, percent_tenths};
use crate::config::{ActivationSettings, Config, WindowStart};
use crate::query::QueryEngine;

/// The histogram query, shipped in the binary (and in `queries/` for people to read).
pub(crate) const HISTOGRAM_SQL: &str = include_str!("../../queries/activation/histogram.sql");

/// SQL engines the query is rendered for (the benchmark runs the same query in DuckDB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Apache DataFusion (northstar).
    DataFusion,
    /// DuckDB (the benchmark's baseline).
    DuckDb,
}

/// What the analysis is about, resolved from the config.
#[derive(Debug, Clone, Serialize)]
pub struct Question {
    /// Name of the track event whose repetition may mark activation (`activation.northStarEvent`).
    pub north_star_event: String,
    /// Name of the track event that starts a person's clock (`activation.signupEvent`).
    pub signup_event: String,
    /// x from 1 to this.
    pub max_times: u32,
    /// y from 1 to this.
    pub max_days: u32,
    /// Retained = active in days [from, to) after signup.
    pub retained_days: (u32, u32),
    /// Events that count as active (empty: any).
    pub active_events: Vec<String>,
    /// Where a person's North Star window starts (`activation.windowStart`).
    pub window_start: WindowStart,
    /// The guards of the choice.
    #[serde(skip)]
    pub guards: Guards,
}

impl Question {
    /// The question the config asks.
    pub fn from_config(config: &Config) -> Self {
        let settings: &ActivationSettings = &config.activation;
        let north_star_event = settings
            .north_star_event
            .clone()
            .or_else(|| config.north_star_metric.as_ref().map(|m| m.event.clone()))
            .unwrap_or_else(|| "core_action_completed".into());
        Self {
            north_star_event,
            signup_event: settings.signup_event.clone(),
            max_times: settings.max_times,
            max_days: settings.max_days,
            retained_days: (settings.retained_from_day, settings.retained_to_day),
            active_events: settings.active_events.clone(),
            window_start: settings.window_start,
            guards: Guards {
                min_cell: settings.min_cell,
                share_min: settings.share_min,
                share_max: settings.share_max,
            },
        }
    }
}

/// Why the analysis has no answer: always something the analyst can act on.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// An event the question needs never occurs.
    #[error(
        "event `{event}` ({role}) never occurs in the history; check the name (activation.{key})"
    )]
    EventMissing {
        /// Name of the event the config gives for the role.
        event: String,
        /// What it is for.
        role: &'static str,
        /// The config key that names it.
        key: &'static str,
    },
    /// Nobody signed up long enough ago to be judged.
    #[error(
        "no one signed up at least {days} days before {as_of}: the cohort is too young to judge (retention is measured in days {from}–{days})"
    )]
    CohortTooYoung {
        /// Days of history a person needs.
        days: u32,
        /// Start of the retention window.
        from: u32,
        /// The end of the data.
        as_of: String,
    },
    /// The history is empty.
    #[error("the event history is empty")]
    NoHistory,
    /// The query failed.
    #[error(transparent)]
    Query(#[from] crate::query::QueryError),
}

/// A computed analysis.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// What was asked.
    pub question: Question,
    /// End of the data the cohort was judged against (RFC 3339).
    pub as_of: String,
    /// People in the cohort.
    pub cohort: u64,
    /// Every candidate and the choice.
    pub evaluation: Evaluation,
}

/// Renders the histogram query for `dialect`.
pub fn render(question: &Question, cohort_end_us: i64, dialect: Dialect) -> String {
    let quote = crate::query::string_literal;
    let active = active_condition(question);
    let days = 1..=question.max_days;
    let windows = days
        .clone()
        .map(|y| format!("({y})"))
        .collect::<Vec<_>>()
        .join(", ");
    let star_sums = days
        .clone()
        .map(|y| format!("           sum(CASE WHEN star_day < {y} THEN 1 ELSE 0 END) AS t{y}"))
        .collect::<Vec<_>>()
        .join(",\n");
    let times_of_window = format!(
        "CASE w.y {} END",
        days.map(|y| format!("WHEN {y} THEN p.t{y}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut sql = HISTOGRAM_SQL
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("{signup}", &quote(&question.signup_event))
        .replace("{north_star}", &quote(&question.north_star_event))
        .replace("{cohort_end_us}", &cohort_end_us.to_string())
        .replace("{retain_from}", &question.retained_days.0.to_string())
        .replace("{retain_to}", &question.retained_days.1.to_string())
        .replace("{max_days}", &question.max_days.to_string())
        .replace("{active}", &active)
        .replace("{counted}", counted_condition(question))
        .replace("{windows}", &windows)
        .replace("{star_sums}", &star_sums)
        .replace("{times_of_window}", &times_of_window);
    render_micros(&mut sql, dialect);
    sql
}

/// Renders each `US(x)` of a template (a timestamp as UTC microseconds) for `dialect`.
pub(crate) fn render_micros(sql: &mut String, dialect: Dialect) {
    while let Some(start) = sql.find("US(") {
        let Some(len) = sql[start + 3..].find(')') else {
            break;
        };
        let inner = sql[start + 3..start + 3 + len].to_string();
        let rendered = match dialect {
            Dialect::DataFusion => format!("CAST({inner} AS BIGINT)"),
            Dialect::DuckDb => format!("epoch_us({inner})"),
        };
        sql.replace_range(start..start + 4 + len, &rendered);
    }
}

/// The condition on retention events (`activation.activeEvents`; empty: any event counts).
pub(crate) fn active_condition(question: &Question) -> String {
    if question.active_events.is_empty() {
        return String::new();
    }
    let quote = crate::query::string_literal;
    format!(
        "AND event IN ({})",
        question
            .active_events
            .iter()
            .map(|e| quote(e))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Which of a person's events count toward the window (`activation.windowStart`).
pub(crate) fn counted_condition(question: &Question) -> &'static str {
    match question.window_start {
        WindowStart::FirstSeen => "TRUE",
        WindowStart::Signup => "r.ts >= c.signup_at",
    }
}

/// Cells of every candidate from the histogram rows `(days, times, retained, people)`.
pub(crate) fn cells_from_histogram(
    rows: &[(u32, u64, bool, u64)],
    max_times: u32,
    max_days: u32,
) -> Vec<Cell> {
    let mut by_day: BTreeMap<u32, Vec<(u64, bool, u64)>> = BTreeMap::new();
    for (days, times, retained, people) in rows {
        by_day
            .entry(*days)
            .or_default()
            .push((*times, *retained, *people));
    }
    let mut cells = Vec::new();
    for times in 1..=max_times {
        for days in 1..=max_days {
            let mut cell = Cell {
                times,
                days,
                a: 0,
                b: 0,
                c: 0,
                d: 0,
            };
            for (done, retained, people) in by_day.get(&days).into_iter().flatten() {
                match (*done >= u64::from(times), *retained) {
                    (true, true) => cell.a += people,
                    (true, false) => cell.b += people,
                    (false, true) => cell.c += people,
                    (false, false) => cell.d += people,
                }
            }
            cells.push(cell);
        }
    }
    cells
}

/// Runs the analysis over the engine's tables, judging the cohort against `as_of` (UTC µs;
/// default: the last event's time). `progress` is told each step.
pub async fn run(
    engine: &QueryEngine,
    question: &Question,
    as_of: Option<i64>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Analysis, AnalysisError> {
    progress("checking the events");
    // The last event's time comes from the files' statistics (no scan); the checks that need a
    // scan (is there any signup, any North Star event?) run only when the answer is empty.
    let end = match as_of {
        Some(end) => end,
        None => {
            let last = engine
                .collect_internal(
                    "SELECT CAST(max(\"timestamp\") AS BIGINT) AS last_us FROM events",
                )
                .await?;
            match first_i64(&last, 0) {
                Some(end) => end,
                None => return Err(AnalysisError::NoHistory),
            }
        }
    };
    let cohort_end = end - i64::from(question.retained_days.1) * 86_400_000_000;

    progress("counting each person's North Star events and retention");
    let sql = render(question, cohort_end, Dialect::DataFusion);
    let batches = engine.collect_internal(&sql).await?;
    let mut rows = Vec::new();
    for batch in &batches {
        let column = |i: usize| arrow::compute::cast(batch.column(i), &DataType::Int64).ok();
        let (Some(days), Some(times), Some(retained), Some(people)) =
            (column(0), column(1), column(2), column(3))
        else {
            continue;
        };
        let as_i64 = |a: &arrow::array::ArrayRef| a.as_any().downcast_ref::<Int64Array>().cloned();
        let (Some(days), Some(times), Some(retained), Some(people)) = (
            as_i64(&days),
            as_i64(&times),
            as_i64(&retained),
            as_i64(&people),
        ) else {
            continue;
        };
        for i in 0..batch.num_rows() {
            rows.push((
                u32::try_from(days.value(i)).unwrap_or(0),
                u64::try_from(times.value(i)).unwrap_or(0),
                retained.value(i) == 1,
                u64::try_from(people.value(i)).unwrap_or(0),
            ));
        }
    }
    let cohort: u64 = rows.iter().filter(|r| r.0 == 1).map(|r| r.3).sum();
    if cohort == 0 || rows.iter().all(|r| r.1 == 0) {
        missing_events(engine, question).await?;
    }
    let as_of_text = crate::clock::format_micros(end);
    if cohort == 0 {
        return Err(AnalysisError::CohortTooYoung {
            days: question.retained_days.1,
            from: question.retained_days.0,
            as_of: as_of_text,
        });
    }
    progress("scoring every candidate");
    let cells = cells_from_histogram(&rows, question.max_times, question.max_days);
    let evaluation = stats::evaluate(&cells, &question.guards);
    Ok(Analysis {
        question: question.clone(),
        as_of: as_of_text,
        cohort,
        evaluation,
    })
}

/// Why an analysis has nothing to count: no events, no signup event, or no North Star event.
async fn missing_events(engine: &QueryEngine, question: &Question) -> Result<(), AnalysisError> {
    let quote = crate::query::string_literal;
    let counts = engine
        .collect_internal(&format!(
            "SELECT count(*) AS total, \
             sum(CASE WHEN event = {} THEN 1 ELSE 0 END) AS signups, \
             sum(CASE WHEN event = {} THEN 1 ELSE 0 END) AS stars FROM events",
            quote(&question.signup_event),
            quote(&question.north_star_event)
        ))
        .await?;
    let value = |column: usize| first_i64(&counts, column).unwrap_or(0);
    if value(0) == 0 {
        return Err(AnalysisError::NoHistory);
    }
    if value(1) == 0 {
        return Err(AnalysisError::EventMissing {
            event: question.signup_event.clone(),
            role: "signup",
            key: "signupEvent",
        });
    }
    if value(2) == 0 {
        return Err(AnalysisError::EventMissing {
            event: question.north_star_event.clone(),
            role: "North Star",
            key: "northStarEvent",
        });
    }
    Ok(())
}

/// The first row's value of `column` as an i64 (None when absent or null).
fn first_i64(batches: &[arrow::record_batch::RecordBatch], column: usize) -> Option<i64> {
    batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| arrow::compute::cast(b.column(column), &DataType::Int64).ok())
        .and_then(|c| {
            c.as_any()
                .downcast_ref::<Int64Array>()
                .filter(|a| !a.is_null(0))
                .map(|a| a.value(0))
        })
}

/// The top candidates as a text table, with the choice (or why there is none) below it.
pub fn table(analysis: &Analysis, top: usize) -> String {
    let pct = |v: Option<f64>| v.map(percent_tenths).unwrap_or_else(|| "–".into());
    let num = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into());
    let mut out = format!(
        "North Star `{}` after `{}`: {} people signed up at least {} days before {}\n\n",
        analysis.question.north_star_event,
        analysis.question.signup_event,
        analysis.cohort,
        analysis.question.retained_days.1,
        analysis.as_of
    );
    out.push_str("  x   y    phi   95% interval      above  retained above  below    lift     a      b      c      d  guards\n");
    for c in analysis.evaluation.candidates.iter().take(top) {
        let interval = match (c.phi_ci_low, c.phi_ci_high) {
            (Some(low), Some(high)) => format!("[{low:.3}, {high:.3}]"),
            _ => "–".into(),
        };
        out.push_str(&format!(
            "{:>3} {:>3} {:>6} {:>16} {:>6} {:>15} {:>6} {:>7} {:>5} {:>6} {:>6} {:>6}  {}\n",
            c.times,
            c.days,
            num(c.phi),
            interval,
            pct(Some(c.share_above)),
            pct(c.retention_above),
            pct(c.retention_below),
            c.lift
                .map(|l| format!("{l:.2}x"))
                .unwrap_or_else(|| "–".into()),
            c.a,
            c.b,
            c.c,
            c.d,
            if c.passes_guards {
                "ok".to_string()
            } else {
                c.guard_failures.join("; ")
            }
        ));
    }
    match (&analysis.evaluation.chosen, &analysis.evaluation.reason) {
        (Some(chosen), _) => out.push_str(&format!(
            "\nchosen: {}\n",
            super::plot::summary_line(chosen)
        )),
        (None, Some(reason)) => out.push_str(&format!("\nno threshold chosen: {reason}\n")),
        (None, None) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_count_people_at_or_above_each_threshold() {
        // Day window 2: 3 people did it twice (2 retained), 5 did it once (1 retained), 2 never.
        let rows = vec![
            (2, 2, true, 2),
            (2, 2, false, 1),
            (2, 1, true, 1),
            (2, 1, false, 4),
            (2, 0, false, 2),
        ];
        let cells = cells_from_histogram(&rows, 2, 2);
        let at = |x, y| {
            cells
                .iter()
                .find(|c| c.times == x && c.days == y)
                .copied()
                .unwrap()
        };
        assert_eq!(
            (at(1, 2).a, at(1, 2).b, at(1, 2).c, at(1, 2).d),
            (3, 5, 0, 2)
        );
        assert_eq!(
            (at(2, 2).a, at(2, 2).b, at(2, 2).c, at(2, 2).d),
            (2, 1, 1, 6)
        );
        assert_eq!(
            at(1, 1).a + at(1, 1).b + at(1, 1).c + at(1, 1).d,
            0,
            "no rows for day 1"
        );
    }

    #[test]
    fn both_dialects_render_without_placeholders() {
        let config = Config::from_json(
            include_str!("../../tests/fixtures/config-template.json"),
            "seed",
        )
        .unwrap();
        let question = Question::from_config(&config);
        for dialect in [Dialect::DataFusion, Dialect::DuckDb] {
            let sql = render(&question, 123, dialect);
            assert!(!sql.contains('{') && !sql.contains("US("), "{sql}");
            assert!(sql.contains("'core_action_completed'"));
        }
        assert!(render(&question, 1, Dialect::DuckDb).contains("epoch_us(signup_at)"));
    }
}
