//! `northstar billing reconcile`: what the outbox says was delivered, per customer and meter,
//! against the provider's meter event summaries over the same time range.

use std::collections::BTreeMap;

use serde::Serialize;

use super::outbox::{Outbox, Standing};
use super::stripe::{Stripe, StripeError};
use crate::config::BillingSettings;

/// One customer and meter compared.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// The northstar customer.
    pub customer_id: String,
    /// The customer at Stripe.
    pub stripe_customer: String,
    /// Id of the feature (`usageFeatures[].id`).
    pub feature: String,
    /// The Stripe meter's event name.
    pub event_name: String,
    /// What northstar delivered.
    pub reported: i64,
    /// What Stripe's summaries add up to.
    pub provider: f64,
}

impl Line {
    /// Whether the two agree.
    pub fn matches(&self) -> bool {
        (self.provider - self.reported as f64).abs() < 1e-9
    }
}

/// Compares delivered reports with Stripe's summaries. Stripe's summaries are minute-aligned
/// and eventually consistent: a report confirmed seconds ago may not be counted yet.
pub async fn reconcile(
    outbox: &Outbox,
    settings: &BillingSettings,
    stripe: &Stripe,
) -> Result<Vec<Line>, StripeError> {
    // (stripe customer, feature) → (customer, event name, delivered, first timestamp)
    type Delivered = (String, String, i64, i64);
    let mut delivered: BTreeMap<(String, String), Delivered> = BTreeMap::new();
    for (entry, standing) in outbox.all() {
        if *standing != Standing::Delivered {
            continue;
        }
        let at = entry.window_start.div_euclid(1_000_000);
        let line = delivered
            .entry((entry.provider_customer.clone(), entry.feature.clone()))
            .or_insert_with(|| (entry.customer_id.clone(), entry.event_name.clone(), 0, at));
        line.2 += entry.value;
        line.3 = line.3.min(at);
    }
    let mut ids: BTreeMap<String, String> = settings
        .meter_ids
        .iter()
        .filter_map(|(feature, id)| Some((settings.meters.get(feature)?.clone(), id.clone())))
        .collect();
    if delivered
        .values()
        .any(|(_, name, ..)| !ids.contains_key(name))
    {
        for (id, name) in stripe.meters().await? {
            ids.entry(name).or_insert(id);
        }
    }
    let mut lines = Vec::new();
    for ((stripe_customer, feature), (customer, event_name, reported, first)) in delivered {
        let meter = ids.get(&event_name).ok_or_else(|| {
            StripeError(format!(
                "no Stripe meter has event_name `{event_name}` (set billing.meterIds.{feature})"
            ))
        })?;
        // Minute-aligned, covering every timestamp reported: a report is stamped with its
        // window's start, or later (a correction of a window older than 35 days is stamped
        // within the range Stripe accepts), never after now.
        let start = first.div_euclid(60) * 60;
        let end = (crate::clock::system_micros() / 1_000_000).div_euclid(60) * 60 + 120;
        let provider = stripe
            .summary_total(meter, &stripe_customer, start, end)
            .await?;
        lines.push(Line {
            customer_id: customer,
            stripe_customer,
            feature,
            event_name,
            reported,
            provider,
        });
    }
    Ok(lines)
}
