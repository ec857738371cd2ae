//! The upgrade path: a Checkout Session in every 402, and Stripe's webhooks moving customers
//! to the plan they paid for (verified signatures, each event once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Billing, BillingError, stripe};
use crate::meter::Denial;
use crate::meter::customers::{Customer, CustomerError, CustomerStore, CustomerUpdate};
use crate::meter::spec::Allowance;

/// How long a Checkout Session is reused (Stripe's last 24 hours).
const SESSION_REUSE: Duration = Duration::from_secs(23 * 3600);

/// Most Checkout Sessions kept (made or being made). Past it the oldest made one is
/// forgotten (its customer's next 402 makes a new one): distinct customer ids in `/v1/check`
/// cannot grow the cache without bound. About 300 bytes each.
pub(super) const MAX_CHECKOUTS: usize = 10_000;

/// Most calls to Stripe for Checkout Sessions at once. A 402 past it goes without a session
/// (and says so in the log) rather than queueing calls behind a slow Stripe.
pub(super) const MAX_CHECKOUT_CALLS: usize = 16;

/// The Checkout Sessions made or being made, per (customer, plan). Locked only to look up
/// or change an entry, never across a call.
pub(super) type Checkouts = Arc<Mutex<HashMap<(String, String), CheckoutSlot>>>;

/// A Checkout Session of a customer and plan.
pub(super) enum CheckoutSlot {
    /// Made at `made`.
    Made {
        id: String,
        url: String,
        made: Instant,
    },
    /// Being made: the receiver sees (id, url) when Stripe answers, or its sender dropped
    /// when the call failed.
    Pending(watch::Receiver<Option<(String, String)>>),
}

fn lock(checkouts: &Checkouts) -> MutexGuard<'_, HashMap<(String, String), CheckoutSlot>> {
    // Entries are replaced whole: a panic elsewhere cannot leave one half-written.
    checkouts.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One call to Stripe for a Checkout Session, run on its own task so that no request waits
/// on it past its bound, and its answer still serves the next 402.
struct CheckoutCall {
    stripe: stripe::Stripe,
    checkouts: Checkouts,
    key: (String, String),
    stripe_customer: Option<String>,
    price: String,
    success_url: String,
    cancel_url: String,
}

impl CheckoutCall {
    async fn run(
        self,
        sender: watch::Sender<Option<(String, String)>>,
        own: watch::Receiver<Option<(String, String)>>,
    ) {
        let (customer, plan) = &self.key;
        let answer = self
            .stripe
            .checkout_session(
                customer,
                self.stripe_customer.as_deref(),
                plan,
                &self.price,
                &self.success_url,
                &self.cancel_url,
            )
            .await;
        let mut cache = lock(&self.checkouts);
        // A plan change while the call ran removed the entry: its session is not wanted.
        let still_wanted = matches!(
            cache.get(&self.key),
            Some(CheckoutSlot::Pending(pending)) if pending.same_channel(&own)
        );
        match answer {
            Ok((id, url)) => {
                if still_wanted {
                    cache.insert(
                        self.key.clone(),
                        CheckoutSlot::Made {
                            id: id.clone(),
                            url: url.clone(),
                            made: Instant::now(),
                        },
                    );
                }
                drop(cache);
                sender.send_replace(Some((id, url)));
            }
            Err(error) => {
                if still_wanted {
                    cache.remove(&self.key);
                }
                tracing::warn!(%customer, %plan, %error, "no Checkout Session for the 402");
            }
        }
    }
}

/// Makes room for one more call and entry: false when [`MAX_CHECKOUT_CALLS`] are in flight.
/// Expired sessions go first; past [`MAX_CHECKOUTS`], the oldest made one.
fn make_room(cache: &mut HashMap<(String, String), CheckoutSlot>) -> bool {
    let pending = cache
        .values()
        .filter(|slot| matches!(slot, CheckoutSlot::Pending(_)))
        .count();
    if pending >= MAX_CHECKOUT_CALLS {
        return false;
    }
    if cache.len() < MAX_CHECKOUTS {
        return true;
    }
    cache.retain(|_, slot| match slot {
        CheckoutSlot::Made { made, .. } => made.elapsed() < SESSION_REUSE,
        CheckoutSlot::Pending(_) => true,
    });
    while cache.len() >= MAX_CHECKOUTS {
        let oldest = cache
            .iter()
            .filter_map(|(key, slot)| match slot {
                CheckoutSlot::Made { made, .. } => Some((*made, key.clone())),
                CheckoutSlot::Pending(_) => None,
            })
            .min();
        match oldest {
            Some((_, key)) => cache.remove(&key),
            None => return false,
        };
    }
    true
}

impl Billing {
    /// Fills in the upgrade path of a 402: the plan the customer should move to and, where
    /// Checkout is set up, a session to pay for it.
    pub async fn offer_upgrade(&self, customers: &CustomerStore, denial: &mut Denial) {
        let customer = customers.get(&denial.customer_id);
        denial.upgrade.plan = self.upgrade_plan(&customer, &denial.feature);
        if let Some((id, url)) = self.checkout_for(&customer, &denial.feature).await {
            denial.upgrade.checkout_session_id = Some(id);
            denial.upgrade.checkout_url = Some(url);
        }
    }

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
    ///
    /// Waits at most `checkout_wait` (below the request's time limit), so a slow Stripe makes
    /// the 402 come without a session rather than late. The call to Stripe runs on its own
    /// and fills the cache when it answers, for the next 402; meanwhile other requests for
    /// the same customer and plan wait on that one call, and no lock is held across it, so
    /// customers never wait on each other.
    pub async fn checkout_for(
        &self,
        customer: &Customer,
        feature: &str,
    ) -> Option<(String, String)> {
        let stripe = self.stripe.as_ref()?;
        let plan = self.upgrade_plan(customer, feature)?;
        let price = self.settings.checkout.prices.get(&plan)?;
        let key = (customer.id.clone(), plan.clone());
        let mut made = {
            let mut cache = lock(&self.checkouts);
            match cache.get(&key) {
                Some(CheckoutSlot::Made { id, url, made }) if made.elapsed() < SESSION_REUSE => {
                    return Some((id.clone(), url.clone()));
                }
                Some(CheckoutSlot::Pending(made)) => made.clone(),
                _ => {
                    if !make_room(&mut cache) {
                        tracing::warn!(customer = %customer.id, %plan, calls = MAX_CHECKOUT_CALLS,
                            "Checkout Session calls at their bound; the 402 goes without one");
                        return None;
                    }
                    let (sender, made) = watch::channel(None);
                    cache.insert(key.clone(), CheckoutSlot::Pending(made.clone()));
                    let call = CheckoutCall {
                        stripe: stripe.clone(),
                        checkouts: self.checkouts.clone(),
                        key,
                        stripe_customer: customer.stripe_customer_id.clone(),
                        price: price.clone(),
                        success_url: self.settings.checkout.success_url.clone(),
                        cancel_url: self.settings.checkout.cancel_url.clone(),
                    };
                    tokio::spawn(call.run(sender, made.clone()));
                    made
                }
            }
        };
        match tokio::time::timeout(self.checkout_wait, made.wait_for(Option::is_some)).await {
            Ok(Ok(session)) => session.clone(),
            // The call failed (and said why); the next 402 tries again.
            Ok(Err(_)) => None,
            Err(_) => {
                tracing::info!(customer = %customer.id, %plan, wait = ?self.checkout_wait,
                    "Stripe has not made the Checkout Session yet; the 402 goes without it");
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
            // A session completes before an asynchronous payment (a bank debit) has cleared:
            // the plan moves once it is paid, here or on `async_payment_succeeded`.
            "checkout.session.completed" => match object["payment_status"].as_str() {
                Some("paid" | "no_payment_required") | None => self.plan_of_checkout(object)?,
                Some(_) => None,
            },
            "checkout.session.async_payment_succeeded" => self.plan_of_checkout(object)?,
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
                .map_err(|e| match e {
                    // An id or plan the store refuses: Stripe must not retry it for days.
                    CustomerError::Invalid { .. } => BillingError::BadEvent(e.to_string()),
                    CustomerError::Store(_) => BillingError::Store(e.to_string()),
                })?;
            lock(&self.checkouts).retain(|(c, _), _| *c != customer);
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
        let customer = match id_at(session, "metadata.northstar_customer")? {
            Some(id) => id,
            None => id_at(session, "client_reference_id")?.ok_or_else(|| {
                BillingError::BadEvent(
                    "data.object.metadata.northstar_customer: missing (and no client_reference_id)"
                        .into(),
                )
            })?,
        };
        let plan = session["metadata"]["plan"]
            .as_str()
            .ok_or_else(|| BillingError::BadEvent("data.object.metadata.plan: missing".into()))?;
        self.known_plan(plan, "data.object.metadata.plan")?;
        Ok(Some((
            customer,
            plan.to_string(),
            id_at(session, "customer")?,
        )))
    }

    /// (customer, plan, Stripe customer) from a subscription: its price's plan, or the default
    /// plan when it is deleted or no longer paid.
    fn plan_of_subscription(
        &self,
        subscription: &Value,
        deleted: bool,
    ) -> Result<Option<(String, String, Option<String>)>, BillingError> {
        let stripe_customer = id_at(subscription, "customer")?;
        let customer = match id_at(subscription, "metadata.northstar_customer")? {
            Some(id) => id,
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
        // Not yet paid for: the plan stays as it is (a checkout moves it once paid).
        if !deleted && subscription["status"].as_str() == Some("incomplete") {
            return Ok(None);
        }
        let ended = deleted
            || matches!(
                subscription["status"].as_str(),
                Some("canceled" | "unpaid" | "incomplete_expired" | "paused")
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

/// The id at `path` (dotted, under `data.object`) of an event's object, if it is a string:
/// checked by the rule every id northstar stores follows ([`crate::event::id_problem`]), so
/// that a signed event with a bad id is refused (400, the field named) instead of failing
/// to store (503), which Stripe would retry for days.
fn id_at(object: &Value, path: &str) -> Result<Option<String>, BillingError> {
    let value = path.split('.').fold(object, |value, key| &value[key]);
    let Some(id) = value.as_str() else {
        return Ok(None);
    };
    match crate::event::id_problem(id) {
        Some(problem) => Err(BillingError::BadEvent(format!(
            "data.object.{path}: {problem}"
        ))),
        None => Ok(Some(id.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(age: Duration) -> CheckoutSlot {
        CheckoutSlot::Made {
            id: "cs_x".into(),
            url: "https://checkout".into(),
            made: Instant::now() - age,
        }
    }

    #[test]
    fn the_cache_and_the_calls_in_flight_are_bounded() {
        let mut cache = HashMap::new();
        for i in 0..MAX_CHECKOUTS {
            let age = Duration::from_secs(i as u64 % 1_000);
            cache.insert((format!("c{i}"), "pro".to_string()), made(age));
        }
        assert!(make_room(&mut cache), "the oldest made session goes");
        assert_eq!(cache.len(), MAX_CHECKOUTS - 1);
        assert!(!cache.contains_key(&("c999".to_string(), "pro".to_string())));

        let mut calls = HashMap::new();
        let (_senders, receivers): (Vec<_>, Vec<_>) = (0..MAX_CHECKOUT_CALLS)
            .map(|_| watch::channel(None::<(String, String)>))
            .unzip();
        for (i, receiver) in receivers.into_iter().enumerate() {
            calls.insert(
                (format!("p{i}"), "pro".to_string()),
                CheckoutSlot::Pending(receiver),
            );
        }
        assert!(!make_room(&mut calls), "no call past the bound");
    }
}
