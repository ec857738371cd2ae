//! The limits API for services: check (and consume), usage, entitlements; and the admin
//! customer routes.

use rust_decimal::prelude::ToPrimitive;

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::error::{Classify, ErrorKind};
use crate::meter::customers::CustomerUpdate;
use crate::meter::{CheckRequest, LimitError};

/// `POST /v1/check`.
pub async fn check(state: &AppState, body: &[u8]) -> HttpResponse {
    if let Some(replaying) = replaying(state) {
        return replaying;
    }
    let request: CheckRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            return respond::error(&HttpError::new(
                ErrorKind::InvalidInput,
                "invalid_json",
                format!(
                    "body must be {{\"customer_id\", \"feature\", \"quantity\"?, \"consume\"?}}: {e}"
                ),
            ));
        }
    };
    match checked(state, request).await {
        Ok(standing) => respond::json(200, &standing),
        Err(error) => limit_error(&error),
    }
}

/// A check's outcome; a denial carries the upgrade path when billing offers one.
async fn checked(
    state: &AppState,
    request: CheckRequest,
) -> Result<crate::meter::Standing, LimitError> {
    match state.meter.check(request).await {
        Err(LimitError::Exceeded(mut denial)) => {
            if let Some(billing) = &state.billing {
                billing
                    .offer_upgrade(state.meter.customers(), &mut denial)
                    .await;
            }
            Err(LimitError::Exceeded(denial))
        }
        other => other,
    }
}

/// Most checks one `POST /v1/check/batch` carries.
pub const MAX_BATCH_CHECKS: usize = 1_000;

/// `POST /v1/check/batch`: `{"checks": [check, …]}`, each answered as `/v1/check` would, in
/// order (a consume later in the batch sees the usage an earlier one recorded).
pub async fn check_batch(state: &AppState, body: &[u8]) -> HttpResponse {
    if let Some(replaying) = replaying(state) {
        return replaying;
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        checks: Vec<serde_json::Value>,
    }
    let batch: Batch = match serde_json::from_slice(body) {
        Ok(batch) => batch,
        Err(e) => {
            return respond::error(&HttpError::new(
                ErrorKind::InvalidInput,
                "invalid_json",
                format!(
                    "body must be {{\"checks\": [{{\"customer_id\", \"feature\", …}}, …]}}: {e}"
                ),
            ));
        }
    };
    if batch.checks.len() > MAX_BATCH_CHECKS {
        return respond::error(&HttpError::new(
            ErrorKind::TooLarge,
            "too_many_checks",
            format!(
                "checks: {} in one batch; at most {MAX_BATCH_CHECKS}",
                batch.checks.len()
            ),
        ));
    }
    #[derive(serde::Serialize)]
    struct Answered {
        status: u16,
        body: CheckAnswer,
    }
    let mut results = Vec::with_capacity(batch.checks.len());
    for (i, check) in batch.checks.into_iter().enumerate() {
        let answered = match serde_json::from_value::<CheckRequest>(check) {
            Ok(request) => match checked(state, request).await {
                Ok(standing) => Answered {
                    status: 200,
                    body: CheckAnswer::Allowed(Box::new(standing)),
                },
                Err(LimitError::Exceeded(denial)) => Answered {
                    status: 402,
                    body: CheckAnswer::Denied(denial),
                },
                Err(error) => Answered {
                    status: error.kind().http_status(),
                    body: CheckAnswer::Refused(error_body(&error)),
                },
            },
            Err(e) => Answered {
                status: 400,
                body: CheckAnswer::Refused(serde_json::json!({
                    "code": "invalid_json",
                    "message": format!("checks[{i}]: {e}"),
                })),
            },
        };
        results.push(answered);
    }
    // Serialized straight from the standings, so their decimals keep their exact digits.
    #[derive(serde::Serialize)]
    struct Results {
        results: Vec<Answered>,
    }
    respond::json(200, &Results { results })
}

/// What one check of a batch answers: a standing (200), a denial with its upgrade path (402),
/// or an error body.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum CheckAnswer {
    Allowed(Box<crate::meter::Standing>),
    Denied(Box<crate::meter::Denial>),
    Refused(serde_json::Value),
}

/// The body `/v1/check` gives an error (a suspension names the customer and why; a passing
/// refusal says when to retry, which a single check says in `Retry-After`).
fn error_body(error: &LimitError) -> serde_json::Value {
    let mut body = serde_json::json!({"code": error.code(), "message": error.to_string()});
    if let LimitError::Suspended { customer, reason } = error {
        body["customer_id"] = serde_json::json!(customer);
        body["reason"] = serde_json::json!(reason);
    }
    if let Some(seconds) = error.retry_after() {
        body["retry_after"] = seconds.into();
    }
    body
}

/// `GET /v1/meters/{feature}/usage?customer=&from=&to=&windowSize=&windowTimeZone=&groupBy=
/// &filter[dim]=`: JSON, or CSV when `Accept` asks for `text/csv`.
pub async fn meter_usage(
    state: &AppState,
    feature: &str,
    parts: &http::request::Parts,
) -> HttpResponse {
    let params: Vec<(String, String)> =
        form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let answer = crate::meter_query::usage(
        &state.query,
        &state.config,
        feature,
        &params,
        crate::clock::system_micros(),
    )
    .await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => return respond::error(&error),
    };
    let wants_csv = parts
        .headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/csv"));
    if !wants_csv {
        return respond::json(200, &answer);
    }
    let dimensions: Vec<String> = answer
        .data
        .first()
        .map(|w| w.group_by.keys().cloned().collect())
        .unwrap_or_default();
    let mut csv = String::from("windowStart,windowEnd,customer");
    for dimension in &dimensions {
        csv.push(',');
        csv.push_str(&csv_field(dimension));
    }
    csv.push_str(",value\n");
    for window in &answer.data {
        csv.push_str(&format!(
            "{},{},{}",
            window.window_start,
            window.window_end,
            csv_field(window.customer.as_deref().unwrap_or_default())
        ));
        for dimension in &dimensions {
            let value = match &window.group_by[dimension] {
                serde_json::Value::String(text) => text.clone(),
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            csv.push(',');
            csv.push_str(&csv_field(&value));
        }
        csv.push_str(&format!(",{}\n", window.value.normalize()));
    }
    respond::bytes_response(200, "text/csv; charset=utf-8", csv.into_bytes())
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// `POST /v1/portal/tokens`: `{"customer_id", "expiresIn"?}` → a token the service hands to
/// that customer's browser.
pub fn portal_token(state: &AppState, body: &[u8]) -> HttpResponse {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Ask {
        #[serde(alias = "customer_id")]
        customer_id: String,
        #[serde(default)]
        expires_in: Option<String>,
    }
    let refuse = |field: &str, message: String| {
        respond::error(&HttpError::new(
            ErrorKind::InvalidInput,
            "invalid_json",
            format!("{field}: {message}"),
        ))
    };
    let ask: Ask = match serde_json::from_slice(body) {
        Ok(ask) => ask,
        Err(e) => {
            return refuse(
                "body",
                format!("must be {{\"customer_id\", \"expiresIn\"?}}: {e}"),
            );
        }
    };
    let customer = ask.customer_id.trim().to_string();
    if let Some(problem) = crate::event::id_problem(&customer) {
        return refuse("customer_id", problem);
    }
    let lifetime = match ask.expires_in.as_deref().map(crate::config::parse_duration) {
        None => crate::portal::DEFAULT_LIFETIME,
        Some(Ok(lifetime)) if !lifetime.is_zero() && lifetime <= crate::portal::MAX_LIFETIME => {
            lifetime
        }
        Some(Ok(_)) => return refuse("expiresIn", "must be positive and at most 24h".into()),
        Some(Err(e)) => return refuse("expiresIn", e),
    };
    let expires_at = state
        .clock
        .now_micros()
        .saturating_add(i64::try_from(lifetime.as_micros()).unwrap_or(i64::MAX));
    let grant = crate::portal::Grant {
        customer_id: customer,
        expires_at,
    };
    respond::json(
        200,
        &serde_json::json!({
            "token": state.portal.issue(&grant),
            "customer_id": grant.customer_id,
            "expires_at": crate::clock::format_micros(expires_at),
        }),
    )
}

/// `GET /v1/customers/{id}/usage`.
pub async fn usage(state: &AppState, customer: &str) -> HttpResponse {
    if let Some(replaying) = replaying(state) {
        return replaying;
    }
    let (customer, standings) = state.meter.usage(customer);
    // Written straight from the standings, so their decimals keep their exact digits.
    #[derive(serde::Serialize)]
    struct Usage<'a> {
        customer_id: &'a str,
        plan: &'a str,
        suspended: &'a Option<crate::meter::customers::Suspension>,
        features: Vec<Feature<'a>>,
        as_of: crate::meter::AsOf,
    }
    /// A feature's standing, and for a limited one the upgrade path its 402 would carry
    /// (the plan to move to, without making a Checkout Session).
    #[derive(serde::Serialize)]
    struct Feature<'a> {
        #[serde(flatten)]
        standing: &'a crate::meter::Standing,
        #[serde(skip_serializing_if = "Option::is_none")]
        upgrade: Option<crate::meter::Upgrade>,
        /// The `metering.thresholds` this period's usage has crossed (limited features).
        #[serde(skip_serializing_if = "Option::is_none")]
        thresholds_crossed: Option<Vec<f64>>,
    }
    let thresholds = &state.config.metering.thresholds;
    let features = standings
        .iter()
        .map(|standing| Feature {
            standing,
            upgrade: standing.limit.is_some().then(|| {
                let mut upgrade = state.meter.upgrade_path(&customer, &standing.feature);
                upgrade.plan = state
                    .billing
                    .as_ref()
                    .and_then(|b| b.upgrade_plan(&customer, &standing.feature));
                upgrade
            }),
            thresholds_crossed: standing
                .limit
                .filter(|limit| !limit.is_zero())
                .map(|limit| {
                    let share = (standing.used / limit).to_f64().unwrap_or(0.0);
                    thresholds.iter().copied().filter(|t| share >= *t).collect()
                }),
        })
        .collect();
    let body = Usage {
        customer_id: &customer.id,
        plan: &customer.plan,
        suspended: &customer.suspended,
        features,
        as_of: state.meter.as_of(),
    };
    respond::json(200, &body)
}

/// An entitlement: the standing, with `allowed` answered as `has_access` and the period's end
/// also as `reset_at`.
#[derive(serde::Serialize)]
struct Entitlement<'a> {
    has_access: bool,
    reset_at: &'a str,
    #[serde(flatten)]
    standing: &'a crate::meter::Standing,
}

/// `GET /v1/customers/{id}/entitlements/{feature}`.
pub async fn entitlement(state: &AppState, customer: &str, feature: &str) -> HttpResponse {
    if let Some(replaying) = replaying(state) {
        return replaying;
    }
    match state.meter.entitlement(customer, feature) {
        Ok(standing) => respond::json(
            200,
            &Entitlement {
                has_access: standing.allowed,
                reset_at: &standing.period_end,
                standing: &standing,
            },
        ),
        Err(error) => limit_error(&error),
    }
}

/// `GET /v1/customers/{id}` (admin).
pub(crate) async fn get_customer(state: &AppState, customer: &str) -> HttpResponse {
    respond::json(200, &*state.meter.customers().get(customer))
}

/// `PUT /v1/customers/{id}` (admin): plan, billing anchor, period, Stripe id, suspension.
pub async fn put_customer(state: &AppState, customer: &str, body: &[u8]) -> HttpResponse {
    let update: CustomerUpdate = match serde_json::from_slice(body) {
        Ok(update) => update,
        Err(e) => {
            return respond::error(&HttpError::new(
                ErrorKind::InvalidInput,
                "invalid_json",
                format!(
                    "body must be {{\"plan\"?, \"billingAnchor\"?, \"period\"?, \"stripeCustomerId\"?, \"suspended\"?}}: {e}"
                ),
            ));
        }
    };
    let now = state.clock.now_micros();
    match state
        .meter
        .customers()
        .update(customer, update, state.meter.known_plans(), now)
        .await
    {
        Ok(customer) => respond::json(200, &*customer),
        Err(crate::meter::customers::CustomerError::Invalid { field, message }) => {
            respond::error(&HttpError::new(
                ErrorKind::InvalidInput,
                "invalid_customer",
                format!("{field}: {message}"),
            ))
        }
        Err(crate::meter::customers::CustomerError::Store(error)) => respond::error(&error),
    }
}

/// `POST /v1/usage/verify` (admin): meter = SQL over events = usage windows, at one sequence.
pub async fn verify(state: &AppState) -> HttpResponse {
    let wait = std::time::Duration::from_secs(60);
    match crate::meter::verify::verify(&state.meter, &state.query, &state.verify, wait).await {
        Ok(report) => respond::json(200, &report),
        Err(error) => respond::error(&error),
    }
}

/// `GET /v1/anomalies` (admin): customers flagged for usage far above their own baseline.
pub async fn anomalies(state: &AppState) -> HttpResponse {
    let flagged: Vec<serde_json::Value> = state
        .meter
        .flagged()
        .into_iter()
        .map(|(customer_id, spike)| {
            let customer = state.meter.customers().get(&customer_id);
            serde_json::json!({
                "customer_id": customer_id,
                "plan": customer.plan,
                "suspended": customer.suspended,
                "events_per_minute": spike.events_per_minute,
                "baseline_per_minute": spike.baseline_per_minute,
                "minute_start": crate::clock::format_micros(spike.minute_start),
            })
        })
        .collect();
    respond::json(200, &serde_json::json!({"flagged": flagged}))
}

/// 503 with `Retry-After` while the meter replays what the stream held at start: an answer
/// from half-replayed counters would let a customer past its limit through.
fn replaying(state: &AppState) -> Option<HttpResponse> {
    if let Some(reason) = state.meter.incomplete() {
        return Some(respond::error(&HttpError::new(
            ErrorKind::Unavailable,
            "usage_incomplete",
            format!("usage lacks events it cannot read back ({reason}); see /healthz"),
        )));
    }
    let (applied, target) = state.meter.replaying()?;
    Some(respond::error(&HttpError::new(
        ErrorKind::Unavailable,
        "replaying",
        format!(
            "the meter is replaying the stream after a start (at sequence {applied} of {target}); retry"
        ),
    )))
}

/// 402 answers carry the whole denial (limit, usage, upgrade path); the rest `{code, message}`.
fn limit_error(error: &LimitError) -> HttpResponse {
    match error {
        LimitError::Exceeded(denial) => respond::json(402, denial.as_ref()),
        LimitError::Suspended { .. } => respond::json(403, &error_body(error)),
        other => respond::error(other),
    }
}

/// `POST /v1/simulate`: a period's usage replayed through draft `usageFeatures`.
pub async fn simulate(state: &AppState, body: &[u8]) -> HttpResponse {
    let draft: crate::simulate::Draft = match serde_json::from_slice(body) {
        Ok(draft) => draft,
        Err(e) => {
            return respond::error(&HttpError::new(
                ErrorKind::InvalidInput,
                "invalid_json",
                format!("body must be {{\"usageFeatures\": […], \"from\", \"to\"}}: {e}"),
            ));
        }
    };
    let customers = state.meter.customers();
    let plan_of = |id: &str| customers.get(id).plan.clone();
    match crate::simulate::run(&state.query, &state.config, plan_of, &draft).await {
        Ok(simulation) => respond::json(200, &simulation),
        Err(error) => respond::error(&error),
    }
}
