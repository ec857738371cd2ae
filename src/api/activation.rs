//! Activation routes: `GET /v1/activation`, each version's picture
//! (`GET /v1/activation/versions/{n}/picture.svg`), `POST /v1/activation/recompute` (admin),
//! and the North Star Metric series `GET /v1/northstar`.

use serde_json::json;

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::activation::AnalysisError;
use crate::activation::northstar::{self, Threshold};
use crate::error::ErrorKind;

/// `GET /v1/activation`: the current threshold (the latest version that chose one) and history.
pub async fn get(state: &AppState) -> HttpResponse {
    let current = state
        .activation
        .current()
        .map(|v| current_json(&state.activation, &v));
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
                "picture_url": picture_url(v.version),
            })
        })
        .collect();
    respond::json(200, &json!({"current": current, "history": history}))
}

fn current_json(
    store: &crate::activation::ActivationStore,
    v: &crate::activation::Version,
) -> serde_json::Value {
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
        "picture": store.picture(v.version).display().to_string(),
        "picture_url": picture_url(v.version),
    })
}

/// Where a version's picture is served.
fn picture_url(version: u32) -> String {
    format!("/v1/activation/versions/{version}/picture.svg")
}

/// `GET /v1/activation/versions/{n}/picture.svg`: the picture of version `n`, as written when
/// it was computed. Served as an image that can run nothing (`Content-Security-Policy`), so
/// an event name drawn in it stays text even opened on its own.
pub async fn picture(state: &AppState, version: u32) -> HttpResponse {
    let path = state.activation.picture(version);
    match tokio::fs::read(&path).await {
        Ok(svg) => {
            let mut response = respond::bytes_response(200, "image/svg+xml", svg);
            let headers = response.headers_mut();
            headers.insert(
                http::header::CONTENT_SECURITY_POLICY,
                http::HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
            );
            headers.insert(
                http::header::X_CONTENT_TYPE_OPTIONS,
                http::HeaderValue::from_static("nosniff"),
            );
            response
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            respond::error(&HttpError::new(
                ErrorKind::NotFound,
                "version_not_found",
                format!(
                    "activation version {version} has no picture (see GET /v1/activation for the versions)"
                ),
            ))
        }
        Err(error) => respond::error(&HttpError::new(
            ErrorKind::Unavailable,
            "picture_unreadable",
            format!("activation version {version}'s picture: {error}"),
        )),
    }
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
            &json!({"current": current_json(&state.activation, &version), "chosen": version.chosen.is_some(), "reason": version.reason}),
        ),
        Err(AnalysisError::Query(error)) => respond::error(&error),
        Err(error) => respond::error(&HttpError::new(
            ErrorKind::InvalidInput,
            "activation_not_computable",
            error.to_string(),
        )),
    }
}

/// `GET /v1/northstar`: the North Star Metric as a daily series at the current threshold.
pub async fn northstar(state: &AppState) -> HttpResponse {
    let threshold = Threshold::current(&state.activation, &state.config);
    match northstar::series(&state.query, &state.question, threshold).await {
        Ok(series) => respond::json(
            200,
            &json!({
                "event": state.question.north_star_event,
                "times": threshold.times,
                "days": threshold.days,
                "threshold_from": threshold.from,
                "series": series,
            }),
        ),
        Err(error) => respond::error(&error),
    }
}

/// `GET /v1/users/{id}/onboarding` and `GET /v1/users/{id}/flags` (service key).
pub async fn user(state: &AppState, user: &str, what: &str) -> HttpResponse {
    let fallback = Threshold::configured(&state.config);
    let answer = if what == "flags" {
        state.onboarding.flags(user, fallback)
    } else {
        state.onboarding.onboarding(user, fallback)
    };
    match answer {
        Ok(mut body) => {
            with_experiments(state, &mut body, what == "flags");
            respond::json(200, &body)
        }
        Err(error) => respond::error(&HttpError::new(
            ErrorKind::Unavailable,
            error.code(),
            error.to_string(),
        )),
    }
}

/// Adds the running experiments to a person's answer: each experiment's flag with the
/// person's arm, and for a treated person the step nudging them toward the threshold.
fn with_experiments(state: &AppState, body: &mut serde_json::Value, flags: bool) {
    let Some(person) = body["person_id"].as_str().map(str::to_string) else {
        return;
    };
    let activated = body["activated"] == true;
    for experiment in state.experiments.running() {
        if flags {
            if let Some(answers) = body["flags"].as_object_mut() {
                answers.insert(experiment.flag.clone(), json!(experiment.arm(&person)));
            }
        } else if experiment.treated(&person)
            && let Some(steps) = body["steps"].as_array_mut()
        {
            steps.insert(0, experiment.nudge(activated));
        }
    }
}

/// `POST /v1/activation/experiments` (admin): starts a holdout for the current threshold.
pub fn start_experiment(state: &AppState, body: &[u8]) -> HttpResponse {
    let request: crate::experiments::StartRequest = match respond::optional_json(
        body,
        "{\"flag\", \"share\", \"times\", \"days\", \"started_at\"} (each optional)",
    ) {
        Ok(request) => request,
        Err(error) => return respond::error(&error),
    };
    match state.experiments.start(
        &request,
        &state.question.north_star_event,
        state.activation.current_threshold(),
        state.clock.now_micros(),
    ) {
        Ok(experiment) => respond::json(201, &experiment),
        Err(error) => respond::error(&error),
    }
}

/// `GET /v1/activation/experiments`.
pub fn experiments(state: &AppState) -> HttpResponse {
    respond::json(200, &json!({"experiments": state.experiments.list()}))
}

/// `POST /v1/activation/experiments/{id}/stop` (admin).
pub fn stop_experiment(state: &AppState, id: &str) -> HttpResponse {
    match state.experiments.stop(id, state.clock.now_micros()) {
        Ok(experiment) => respond::json(200, &experiment),
        Err(error) => respond::error(&error),
    }
}

/// `GET /v1/activation/experiments/{id}`: each arm's numbers and the differences.
pub async fn experiment(state: &AppState, id: &str) -> HttpResponse {
    let experiment = match state.experiments.get(id) {
        Ok(experiment) => experiment,
        Err(error) => return respond::error(&error),
    };
    let people =
        match crate::experiments::enrolled(&state.query, &state.question, &experiment).await {
            Ok(people) => people,
            Err(error) => return respond::error(&error),
        };
    let customers = state.meter.customers();
    let default_plan = &state.config.metering.default_plan;
    let upgraded_since = |id: &str| {
        let customer = customers.get(id);
        if !customer.stored || customer.plan == *default_plan {
            return None;
        }
        customer
            .updated_at
            .as_deref()
            .and_then(crate::activation::generate::parse_timestamp)
    };
    let report = crate::experiments::report(
        &experiment,
        &state.question,
        &people,
        &upgraded_since,
        state.clock.now_micros(),
    );
    respond::json(200, &report)
}
