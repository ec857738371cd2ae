//! Where owed reports go: Stripe's meter events, or a generic JSON webhook for other billing
//! systems. Both carry the report's deterministic identifier (Stripe's `identifier` and
//! `Idempotency-Key`; the webhook's `Idempotency-Key`), so a repeated call is harmless.

use std::time::Duration;

use serde_json::json;

use super::outbox::{Entry, Outcome};
use super::stripe::{Stripe, error_message, retry_after};
use crate::client::HttpClient;
use crate::clock::format_micros;

/// A billing provider.
#[derive(Clone)]
pub enum Sink {
    /// Stripe's Billing Meter Events API.
    Stripe(Stripe),
    /// A JSON webhook.
    Webhook {
        /// The client.
        http: HttpClient,
        /// Where to POST.
        url: String,
        /// Time limit of one call.
        timeout: Duration,
    },
}

impl Sink {
    /// Sends one report.
    pub async fn deliver(&self, entry: &Entry) -> Outcome {
        match self {
            Self::Stripe(stripe) => stripe.meter_event(entry).await,
            Self::Webhook { http, url, timeout } => webhook(http, url, *timeout, entry).await,
        }
    }
}

/// The webhook's JSON body of a report.
pub(crate) fn webhook_body(entry: &Entry) -> serde_json::Value {
    json!({
        "identifier": entry.identifier,
        "customer_id": entry.customer_id,
        "provider_customer": entry.provider_customer,
        "feature": entry.feature,
        "event_name": entry.event_name,
        "value": entry.value,
        "window_start": format_micros(entry.window_start),
        "window_end": format_micros(entry.window_end),
        "revision": entry.revision,
        "timestamp": entry.window_start.div_euclid(1_000_000),
    })
}

async fn webhook(http: &HttpClient, url: &str, timeout: Duration, entry: &Entry) -> Outcome {
    let body = webhook_body(entry);
    let headers = [("idempotency-key", entry.identifier.as_str())];
    let call = http.post_json(url, &headers, &body);
    let response = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            return Outcome::Retry {
                after: None,
                reason: error.to_string(),
            };
        }
        Err(_) => {
            return Outcome::Retry {
                after: None,
                reason: format!("{url}: no answer within {timeout:?}"),
            };
        }
    };
    match response.status {
        // 409: the receiver already has this key.
        200..=299 | 409 => Outcome::Delivered,
        429 => Outcome::Retry {
            after: retry_after(&response),
            reason: "429 rate limited".into(),
        },
        status @ 400..=499 => Outcome::Rejected {
            status,
            message: match response.json() {
                serde_json::Value::Null => response.text().chars().take(300).collect(),
                body => error_message(&body),
            },
        },
        status => Outcome::Retry {
            after: None,
            reason: format!("HTTP {status}"),
        },
    }
}
