//! What the meter tells the world, off its hot path: threshold events (on the NATS subject
//! `northstar.usage.threshold`, in the customer's portal stream, and, if configured, POSTed to
//! a webhook) and suspensions of customers past a hard cap.
//!
//! A threshold event carries a deterministic `id` (customer, feature, period, threshold) sent
//! as `Nats-Msg-Id` and as the webhook's `Idempotency-Key`: it fires once per period, and if a
//! crash makes the replay cross the line again, receivers see the same id.

use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::json;
use tokio::sync::mpsc;

use super::customers::CustomerStore;
use crate::client::HttpClient;
use crate::clock::{Clock, format_micros};

/// The subject threshold events are published on.
pub(crate) const THRESHOLD_SUBJECT: &str = "northstar.usage.threshold";
/// The subject usage anomalies are published on.
pub(crate) const ANOMALY_SUBJECT: &str = "northstar.usage.anomaly";

/// Something the meter noticed.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Usage crossed a fraction of the limit, or a number of units.
    Threshold {
        /// Id of the customer whose usage it is.
        customer_id: String,
        /// Id of the feature (`usageFeatures[].id`).
        feature: String,
        /// The customer's plan.
        plan: String,
        /// The fraction of the limit crossed (0.8, 1.0, …); for a threshold in units, the
        /// fraction of the limit it is (none on a plan without a limit).
        threshold: Option<Decimal>,
        /// The threshold in units (`usageFeatures[].thresholds`), when it is one.
        units: Option<Decimal>,
        /// Usage after the crossing event.
        used: Decimal,
        /// The plan's limit (none: unlimited).
        limit: Option<Decimal>,
        /// Start of the period (UTC µs).
        period_start: i64,
        /// Stream sequence of the crossing event.
        seq: u64,
    },
    /// A customer's usage rate spiked far above their own baseline.
    Anomaly {
        /// Id of the customer whose usage it is.
        customer_id: String,
        /// How fast, against which baseline, in which minute.
        spike: super::anomaly::Spike,
    },
    /// A hard cap was reached: suspend the customer.
    Suspend {
        /// Id of the customer to suspend.
        customer_id: String,
        /// Why.
        reason: String,
    },
}

impl Notice {
    /// Whether this is the crossing of the whole limit (a threshold of 1.0 or more).
    pub fn reaches_limit(&self) -> bool {
        matches!(self, Self::Threshold { threshold: Some(t), .. } if *t >= Decimal::ONE)
    }

    /// The threshold event's JSON body and its idempotency id.
    pub fn threshold_event(&self) -> Option<(String, serde_json::Value)> {
        let Self::Threshold {
            customer_id,
            feature,
            plan,
            threshold,
            units,
            used,
            limit,
            period_start,
            seq,
        } = self
        else {
            return None;
        };
        let id = match (units, threshold) {
            (Some(units), _) => {
                format!("threshold:{customer_id}:{feature}:{period_start}:units:{units}")
            }
            (None, Some(fraction)) => {
                format!("threshold:{customer_id}:{feature}:{period_start}:{fraction}")
            }
            (None, None) => return None,
        };
        let body = json!({
            "id": id,
            "type": "usage.threshold",
            "customer_id": customer_id,
            "feature": feature,
            "plan": plan,
            "threshold": threshold.and_then(|t| t.to_f64()),
            "units": units.and_then(|u| u.to_f64()),
            "used": used.to_f64(),
            "limit": limit.and_then(|l| l.to_f64()),
            "period_start": format_micros(*period_start),
            "seq": seq,
        });
        Some((id, body))
    }
}

/// Hands notices to the notifier task without blocking the meter.
#[derive(Clone, Debug)]
pub struct Sender(mpsc::UnboundedSender<Notice>);

impl Sender {
    /// Queues a notice.
    pub fn send(&self, notice: Notice) {
        let _ = self.0.send(notice);
    }
}

/// A notice channel: the sender for the meter, the receiver for [`run`].
pub fn channel() -> (Sender, mpsc::UnboundedReceiver<Notice>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Sender(tx), rx)
}

/// Delivers notices until every sender is gone.
pub async fn run(
    mut notices: mpsc::UnboundedReceiver<Notice>,
    client: async_nats::Client,
    customers: Arc<CustomerStore>,
    webhook: Option<String>,
    clock: Clock,
    mut stop: crate::shutdown::Shutdown,
) {
    let http = HttpClient::new();
    let js = async_nats::jetstream::new(client.clone());
    loop {
        // At stop, what is queued is still delivered; then the task ends.
        let notice = tokio::select! {
            biased;
            notice = notices.recv() => notice,
            () = crate::shutdown::wait_for_stop(&mut stop) => notices.try_recv().ok(),
        };
        let Some(notice) = notice else {
            return;
        };
        match &notice {
            Notice::Suspend {
                customer_id,
                reason,
            } => {
                tracing::warn!(customer = %customer_id, %reason, "suspending customer");
                if let Err(error) = customers
                    .suspend(customer_id, reason.clone(), clock.now_micros())
                    .await
                {
                    tracing::error!(customer = %customer_id, %error, "could not store the suspension");
                }
            }
            Notice::Anomaly { customer_id, spike } => {
                let body =
                    json!({"type": "usage.anomaly", "customer_id": customer_id, "spike": spike});
                if let Err(error) = client
                    .publish(
                        ANOMALY_SUBJECT,
                        serde_json::to_vec(&body).unwrap_or_default().into(),
                    )
                    .await
                {
                    tracing::warn!(%error, "anomaly event not published");
                }
            }
            Notice::Threshold { .. } => {
                let Some((id, body)) = notice.threshold_event() else {
                    continue;
                };
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                if let Notice::Threshold { customer_id, .. } = &notice {
                    let mut portal = body.clone();
                    portal["limit_reached"] = json!(notice.reaches_limit());
                    crate::bus::streams::publish_portal(&js, customer_id, &id, &portal).await;
                }
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                if let Err(error) = client
                    .publish_with_headers(THRESHOLD_SUBJECT, headers, bytes.clone().into())
                    .await
                {
                    tracing::warn!(%error, "threshold event not published");
                }
                if let Some(url) = &webhook {
                    post_with_retries(&http, url, &id, bytes).await;
                }
            }
        }
    }
}

async fn post_with_retries(http: &HttpClient, url: &str, id: &str, body: Vec<u8>) {
    let headers = [
        ("content-type", "application/json"),
        ("idempotency-key", id),
    ];
    for attempt in 0..5u32 {
        match http
            .send(http::Method::POST, url, &headers, body.clone())
            .await
        {
            Ok(response) if response.status < 300 => return,
            Ok(response) if (400..500).contains(&response.status) && response.status != 429 => {
                tracing::warn!(
                    url,
                    status = response.status,
                    "threshold webhook refused the event"
                );
                return;
            }
            Ok(response) => tracing::warn!(
                url,
                status = response.status,
                attempt,
                "threshold webhook failed; retrying"
            ),
            Err(error) => {
                tracing::warn!(url, %error, attempt, "threshold webhook unreachable; retrying")
            }
        }
        tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
    }
}
