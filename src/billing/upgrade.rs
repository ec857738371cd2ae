//! The upgrade path: a Checkout Session in every 402, and Stripe's webhooks moving customers
//! to the plan they paid for (verified signatures, each event once).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Billing, BillingError, stripe};
use crate::meter::customers::{Customer, CustomerUpdate};
use crate::meter::spec::Allowance;

impl Billing {
    /// The plan a customer stuck at a limit of `feature` should move to: among plans with a
    /// Checkout price, the one with the smallest limit above the current plan's (unlimited last).
    pub fn upgrade_plan(&self, customer: &Customer, feature: &str) -> Option<String> {
        let (_, feature) = self.spec.feature(feature)?;
        let rank = |plan: &str| match feature.allowance(plan) {
            Allowance::None => Some(0),
            Allowance::Limited { limit, .. } => Some(limit),
            Allowance::Unlimited => Some(u64::MAX),
        };
        let current = rank(&customer.plan).unwrap_or(0);
        self.settings
            .checkout
            .prices
            .keys()
            .filter(|plan| **plan != customer.plan)
            .filter_map(|plan| rank(plan).map(|r| (r, plan)))
            .filter(|(r, _)| *r > current)
            .min()
            .map(|(_, plan)| plan.clone())
    }

    /// A Checkout Session (id, url) for `customer` to move past a limit of `feature`: made
    /// once per customer and plan and reused for 23 hours (Stripe's sessions last 24).
    pub async fn checkout_for(
        &self,
        customer: &Customer,
        feature: &str,
    ) -> Option<(String, String)> {
        let stripe = self.stripe.as_ref()?;
        let plan = self.upgrade_plan(customer, feature)?;
        let price = self.settings.checkout.prices.get(&plan)?;
        let key = (customer.id.clone(), plan.clone());
        let mut cache = self.checkouts.lock().await;
        if let Some((id, url, made)) = cache.get(&key)
            && made.elapsed() < Duration::from_secs(23 * 3600)
        {
            return Some((id.clone(), url.clone()));
        }
        match stripe
            .checkout_session(
                &customer.id,
                customer.stripe_customer_id.as_deref(),
                &plan,
                price,
                &self.settings.checkout.success_url,
                &self.settings.checkout.cancel_url,
            )
            .await
        {
            Ok((id, url)) => {
                cache.insert(key, (id.clone(), url.clone(), Instant::now()));
                Some((id, url))
            }
            Err(error) => {
                tracing::warn!(customer = %customer.id, %plan, %error, "no Checkout Session for the 402");
                None
            }
        }
    }

    /// `POST /v1/webhooks/stripe`: verifies the signature, then applies a subscription change
    /// (each event id once). Returns what was done.
    pub async fn stripe_webhook(
        &self,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<Value, BillingError> {
        let secret = self
            .webhook_secret
            .as_deref()
            .ok_or(BillingError::WebhooksOff)?;
        let now = self.clock.now_micros() / 1_000_000;
        stripe::verify_signature(signature, body, secret, now, 300)?;
        let event: Value = serde_json::from_slice(body)
            .map_err(|e| BillingError::BadEvent(format!("body is not JSON: {e}")))?;
        let id = event["id"]
            .as_str()
            .ok_or_else(|| BillingError::BadEvent("id: missing".into()))?
            .to_string();
        let kind = event["type"].as_str().unwrap_or_default().to_string();
        if self
            .seen_events
            .lock()
            .map(|s| s.1.contains(&id))
            .unwrap_or(false)
        {
            return Ok(json!({"received": true, "duplicate": true}));
        }
        let object = &event["data"]["object"];
        let change = match kind.as_str() {
            "checkout.session.completed" => self.plan_of_checkout(object)?,
            "customer.subscription.created" | "customer.subscription.updated" => {
                self.plan_of_subscription(object, false)?
            }
            "customer.subscription.deleted" => self.plan_of_subscription(object, true)?,
            _ => None,
        };
        let mut answer = json!({"received": true, "type": kind});
        if let Some((customer, plan, stripe_customer)) = change {
            let update = CustomerUpdate {
                plan: Some(plan.clone()),
                suspended: Some(false),
                stripe_customer_id: stripe_customer,
                ..Default::default()
            };
            let stored = self
                .customers
                .update(
                    &customer,
                    update,
                    &self.known_plans,
                    self.clock.now_micros(),
                )
                .await
                .map_err(|e| BillingError::Store(e.to_string()))?;
            self.checkouts
                .lock()
                .await
                .retain(|(c, _), _| *c != customer);
            tracing::info!(customer = %customer, plan = %stored.plan, event = %id, "plan changed by Stripe");
            answer["customer_id"] = json!(customer);
            answer["plan"] = json!(stored.plan);
        }
        if let Ok(mut seen) = self.seen_events.lock() {
            seen.0.push_back(id.clone());
            seen.1.insert(id);
            while seen.0.len() > 10_000 {
                if let Some(old) = seen.0.pop_front() {
                    seen.1.remove(&old);
                }
            }
        }
        Ok(answer)
    }

    /// (customer, plan, Stripe customer) from a completed Checkout Session.
    fn plan_of_checkout(
        &self,
        session: &Value,
    ) -> Result<Option<(String, String, Option<String>)>, BillingError> {
        let customer = session["metadata"]["northstar_customer"]
            .as_str()
            .or_else(|| session["client_reference_id"].as_str())
            .ok_or_else(|| {
                BillingError::BadEvent(
                    "data.object.metadata.northstar_customer: missing (and no client_reference_id)"
                        .into(),
                )
            })?;
        let plan = session["metadata"]["plan"]
            .as_str()
            .ok_or_else(|| BillingError::BadEvent("data.object.metadata.plan: missing".into()))?;
        self.known_plan(plan, "data.object.metadata.plan")?;
        Ok(Some((
            customer.to_string(),
            plan.to_string(),
            session["customer"].as_str().map(str::to_string),
        )))
    }

    /// (customer, plan, Stripe customer) from a subscription: its price's plan, or the default
    /// plan when it is deleted or no longer paid.
    fn plan_of_subscription(
        &self,
        subscription: &Value,
        deleted: bool,
    ) -> Result<Option<(String, String, Option<String>)>, BillingError> {
        let stripe_customer = subscription["customer"].as_str().map(str::to_string);
        let customer = match subscription["metadata"]["northstar_customer"].as_str() {
            Some(id) => id.to_string(),
            None => match stripe_customer
                .as_deref()
                .and_then(|s| self.customers.find_by_stripe_id(s))
            {
                Some(id) => id,
                None => {
                    tracing::warn!(
                        ?stripe_customer,
                        "subscription event for a customer northstar does not know; ignored"
                    );
                    return Ok(None);
                }
            },
        };
        let ended = deleted
            || matches!(
                subscription["status"].as_str(),
                Some("canceled" | "unpaid" | "incomplete_expired")
            );
        let plan = if ended {
            self.default_plan.clone()
        } else {
            let price = subscription["items"]["data"][0]["price"]["id"]
                .as_str()
                .ok_or_else(|| {
                    BillingError::BadEvent("data.object.items.data[0].price.id: missing".into())
                })?;
            match self
                .settings
                .checkout
                .prices
                .iter()
                .find(|(_, p)| *p == price)
            {
                Some((plan, _)) => plan.clone(),
                None => {
                    tracing::warn!(%price, "subscription price not in billing.checkout.prices; ignored");
                    return Ok(None);
                }
            }
        };
        Ok(Some((customer, plan, stripe_customer)))
    }

    fn known_plan(&self, plan: &str, field: &str) -> Result<(), BillingError> {
        if self.known_plans.iter().any(|p| p == plan) {
            Ok(())
        } else {
            Err(BillingError::BadEvent(format!(
                "{field}: `{plan}` is not a plan of the config"
            )))
        }
    }
}
