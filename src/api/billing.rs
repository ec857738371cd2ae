//! Billing routes: the sink's status and dead letters (admin), and Stripe's webhooks.

use http::request::Parts;

use super::AppState;
use super::respond::{self, HttpError, HttpResponse};
use crate::billing::Billing;
use crate::error::ErrorKind;

fn billing(state: &AppState) -> Result<&Billing, Box<HttpResponse>> {
    state.billing.as_deref().ok_or_else(|| {
        Box::new(respond::error(&HttpError::new(
            ErrorKind::NotFound,
            "billing_not_configured",
            "billing is off: add a `billing` section to the config",
        )))
    })
}

/// `GET /v1/billing/status` (admin).
pub fn status(state: &AppState) -> HttpResponse {
    match billing(state) {
        Ok(billing) => respond::json(200, &billing.status()),
        Err(response) => *response,
    }
}

/// `POST /v1/billing/retry` (admin): dead letters back in line.
pub fn retry(state: &AppState) -> HttpResponse {
    let billing = match billing(state) {
        Ok(billing) => billing,
        Err(response) => return *response,
    };
    match billing.retry_dead() {
        Ok(n) => respond::json(200, &serde_json::json!({"requeued": n})),
        Err(error) => respond::error(&error),
    }
}

/// `POST /v1/webhooks/stripe`: no key; the `Stripe-Signature` header is the proof.
pub async fn stripe_webhook(state: &AppState, parts: &Parts, body: &[u8]) -> HttpResponse {
    let billing = match billing(state) {
        Ok(billing) => billing,
        Err(response) => return *response,
    };
    let signature = parts
        .headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    match billing.stripe_webhook(signature, body).await {
        Ok(answer) => respond::json(200, &answer),
        Err(error) => {
            tracing::warn!(%error, "Stripe webhook refused");
            respond::error(&error)
        }
    }
}
