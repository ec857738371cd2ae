//! The North Star Metric as a daily series: people who reached the activation threshold (at
//! least x North Star events within y days of their signup) on each day, and the running
//! total.

use serde::Serialize;

use super::{ActivationStore, Question};
use crate::config::{Config, WindowStart};
use crate::query::{QueryEngine, QueryError, string_literal};

/// The threshold a person reaches to count as activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Threshold {
    /// At least this many North Star events…
    pub times: u32,
    /// …within this many days of signup.
    pub days: u32,
    /// Where it comes from: `activation` (the latest analysis that chose one) or `config`.
    pub from: &'static str,
}

impl Threshold {
    /// The latest analysis's choice, else the config's `northStarMetric` (1 time within 30
    /// days where it says nothing).
    pub fn current(store: &ActivationStore, config: &Config) -> Self {
        match store.current_threshold() {
            Some((times, days)) => Self {
                times,
                days,
                from: "activation",
            },
            None => {
                let (times, days) = Self::configured(config).unwrap_or((1, 30));
                Self {
                    times,
                    days,
                    from: "config",
                }
            }
        }
    }

    /// The config's `northStarMetric` threshold and window (30 days where it gives none), if
    /// it sets a threshold.
    pub fn configured(config: &Config) -> Option<(u32, u32)> {
        let metric = config.north_star_metric.as_ref()?;
        let days = metric
            .window
            .map(|w| u32::try_from(w.get().as_secs() / 86_400).unwrap_or(u32::MAX))
            .unwrap_or(30);
        Some((metric.threshold?, days))
    }
}

/// One day of the series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Day {
    /// The day (UTC), `YYYY-MM-DD`.
    pub day: serde_json::Value,
    /// People who reached the threshold that day.
    pub activated: i64,
    /// People who reached it on or before that day.
    pub cumulative: i64,
}

/// The daily series of `threshold` over the events, oldest day first.
pub async fn series(
    engine: &QueryEngine,
    question: &Question,
    threshold: Threshold,
) -> Result<Vec<Day>, QueryError> {
    let sql = format!(
        "WITH signups AS (SELECT person_id, min(\"timestamp\") AS signup_at FROM events_resolved WHERE event = {signup} GROUP BY person_id), \
         ranked AS (SELECT e.person_id, e.\"timestamp\" AS ts, row_number() OVER (PARTITION BY e.person_id ORDER BY e.\"timestamp\") AS k \
                    FROM events_resolved e JOIN signups s ON s.person_id = e.person_id \
                    WHERE e.event = {star} AND {counted} AND CAST(e.\"timestamp\" AS BIGINT) < CAST(s.signup_at AS BIGINT) + {window}) \
         SELECT CAST(date_trunc('day', ts) AS DATE) AS day, count(*) AS activated FROM ranked WHERE k = {times} GROUP BY 1 ORDER BY 1",
        signup = string_literal(&question.signup_event),
        star = string_literal(&question.north_star_event),
        window = i64::from(threshold.days) * 86_400_000_000,
        // The analysis's window: from the first event, or from signup (`activation.windowStart`).
        counted = match question.window_start {
            WindowStart::FirstSeen => "TRUE",
            WindowStart::Signup => "e.\"timestamp\" >= s.signup_at",
        },
        times = threshold.times,
    );
    let batches = engine.collect_internal(&sql).await?;
    let rows = crate::query::output::rows_json(&batches)
        .map_err(|e| QueryError::Internal(format!("reading the North Star series: {e}")))?;
    let mut cumulative = 0i64;
    Ok(rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            let activated = row["activated"].as_i64().unwrap_or(0);
            cumulative += activated;
            Day {
                day: row["day"].clone(),
                activated,
                cumulative,
            }
        })
        .collect())
}
