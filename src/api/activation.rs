//! Activation routes: `GET /v1/activation`, `POST /v1/activation/recompute` (admin), and the
//! North Star Metric series `GET /v1/northstar`.

use serde_json::json;

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::activation::AnalysisError;
use crate::error::ErrorKind;

/// `GET /v1/activation`: the current threshold (the latest version that chose one) and history.
pub async fn get(state: &AppState) -> HttpResponse {
    let current = state.activation.current().map(|v| current_json(&v));
    let history: Vec<serde_json::Value> = state
        .activation
        .history()
        .iter()
        .rev()
        .map(|v| {
            json!({
                "version": v.version, "computed_at": v.computed_at, "as_of": v.as_of, "event": v.event, "cohort": v.cohort,
                "times": v.chosen.as_ref().map(|c| c.times), "days": v.chosen.as_ref().map(|c| c.days),
                "phi": v.chosen.as_ref().and_then(|c| c.phi), "reason": v.reason,
            })
        })
        .collect();
    respond::json(200, &json!({"current": current, "history": history}))
}

fn current_json(v: &crate::activation::Version) -> serde_json::Value {
    let chosen = v.chosen.as_ref();
    json!({
        "version": v.version,
        "event": v.event,
        "signup_event": v.signup_event,
        "times": chosen.map(|c| c.times),
        "days": chosen.map(|c| c.days),
        "phi": chosen.and_then(|c| c.phi),
        "phi_ci": chosen.map(|c| [c.phi_ci_low, c.phi_ci_high]),
        "retention_above": chosen.and_then(|c| c.retention_above),
        "retention_below": chosen.and_then(|c| c.retention_below),
        "share_above": chosen.map(|c| c.share_above),
        "lift": chosen.and_then(|c| c.lift),
        "cohort": v.cohort,
        "as_of": v.as_of,
        "computed_at": v.computed_at,
        "picture": format!("data/activation/v{}.svg", v.version),
    })
}

/// `POST /v1/activation/recompute` (admin): runs the analysis now.
pub async fn recompute(state: &AppState) -> HttpResponse {
    let now = state.clock.now_micros();
    match crate::activation::recompute(
        &state.query,
        &state.question,
        &state.activation,
        None,
        now,
        &|_| {},
    )
    .await
    {
        Ok((_, version)) => respond::json(
            200,
            &json!({"current": current_json(&version), "chosen": version.chosen.is_some(), "reason": version.reason}),
        ),
        Err(AnalysisError::Query(error)) => respond::error(&error),
        Err(error) => respond::error(&HttpError::new(
            ErrorKind::InvalidInput,
            "activation_not_computable",
            error.to_string(),
        )),
    }
}

/// `GET /v1/northstar`: the North Star Metric as a daily series: people who reached the
/// current threshold (at least x North Star events within y days of signup) on each day.
pub async fn northstar(state: &AppState) -> HttpResponse {
    let (times, days, from) = match state.activation.current_threshold() {
        Some((x, y)) => (x, y, "activation"),
        None => {
            let metric = state.config.north_star_metric.as_ref();
            let x = metric.and_then(|m| m.threshold).unwrap_or(1);
            let y = metric
                .and_then(|m| m.window)
                .map(|w| (w.get().as_secs() / 86_400) as u32)
                .unwrap_or(30);
            (x, y, "config")
        }
    };
    let quote = |t: &str| format!("'{}'", t.replace('\'', "''"));
    let sql = format!(
        "WITH signups AS (SELECT person_id, min(\"timestamp\") AS signup_at FROM events_resolved WHERE event = {signup} GROUP BY person_id), \
         ranked AS (SELECT e.person_id, e.\"timestamp\" AS ts, row_number() OVER (PARTITION BY e.person_id ORDER BY e.\"timestamp\") AS k \
                    FROM events_resolved e JOIN signups s ON s.person_id = e.person_id \
                    WHERE e.event = {star} AND e.\"timestamp\" >= s.signup_at AND CAST(e.\"timestamp\" AS BIGINT) < CAST(s.signup_at AS BIGINT) + {window}) \
         SELECT CAST(date_trunc('day', ts) AS DATE) AS day, count(*) AS activated FROM ranked WHERE k = {times} GROUP BY 1 ORDER BY 1",
        signup = quote(&state.question.signup_event),
        star = quote(&state.question.north_star_event),
        window = i64::from(days) * 86_400_000_000,
    );
    match state.query.collect_internal(&sql).await {
        Ok(batches) => {
            let rows = crate::query::output::rows_json(&batches).unwrap_or_default();
            let mut total = 0i64;
            let series: Vec<serde_json::Value> = rows
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    total += r["activated"].as_i64().unwrap_or(0);
                    json!({"day": r["day"], "activated": r["activated"], "cumulative": total})
                })
                .collect();
            respond::json(
                200,
                &json!({"event": state.question.north_star_event, "times": times, "days": days, "threshold_from": from, "series": series}),
            )
        }
        Err(error) => respond::error(&error),
    }
}

/// `GET /v1/users/{id}/onboarding` and `GET /v1/users/{id}/flags` (service key).
pub async fn user(state: &AppState, user: &str, what: &str) -> HttpResponse {
    let metric = state.config.north_star_metric.as_ref();
    let fallback = metric.and_then(|m| m.threshold).map(|x| {
        (
            x,
            metric
                .and_then(|m| m.window)
                .map(|w| (w.get().as_secs() / 86_400) as u32)
                .unwrap_or(30),
        )
    });
    let answer = if what == "flags" {
        state.onboarding.flags(user, fallback)
    } else {
        state.onboarding.onboarding(user, fallback)
    };
    match answer {
        Ok(body) => respond::json(200, &body),
        Err(error) => respond::error(&HttpError::new(
            ErrorKind::Unavailable,
            error.code(),
            error.to_string(),
        )),
    }
}
