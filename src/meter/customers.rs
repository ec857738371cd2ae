//! Customers and their plans, stored in a JetStream key-value bucket (durable, replicated
//! with the cluster, watchable) and cached in memory for the limits path.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::{self, kv};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::period::{DEFAULT_ANCHOR, Period, anchor_hour, period_at};
use crate::bus::BusError;
use crate::config::PeriodKind;

/// Name of the key-value bucket of customers.
pub(crate) const BUCKET: &str = "northstar_customers";

/// A customer: the billed account usage is metered for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    /// The id events carry as `customer_id`.
    pub id: String,
    /// Plan whose limits apply.
    pub plan: String,
    /// Where usage periods start (UTC µs, a whole hour).
    pub billing_anchor: i64,
    /// Length of a usage period.
    pub period: PeriodKind,
    /// The customer in Stripe, for billing.
    #[serde(default)]
    pub stripe_customer_id: Option<String>,
    /// Why and since when the customer is suspended, if they are.
    #[serde(default)]
    pub suspended: Option<Suspension>,
    /// Whether anyone ever put this customer on a plan (a default customer is not stored).
    #[serde(default)]
    pub stored: bool,
    /// Last change (RFC 3339).
    #[serde(default)]
    pub updated_at: Option<String>,
}

/// A suspension: all checks answer 403 until an admin lifts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Suspension {
    /// Why (which hard cap).
    pub reason: String,
    /// Since when (RFC 3339).
    pub since: String,
}

impl Customer {
    /// The period containing `at`.
    pub fn period_at(&self, at: i64) -> Period {
        period_at(self.period, self.billing_anchor, at)
    }
}

/// A change to a customer (`PUT /v1/customers/{id}`); absent fields keep their value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CustomerUpdate {
    /// New plan.
    #[serde(default)]
    pub plan: Option<String>,
    /// New billing anchor (RFC 3339; cut to the hour).
    #[serde(default)]
    pub billing_anchor: Option<String>,
    /// New period length.
    #[serde(default)]
    pub period: Option<PeriodKind>,
    /// New Stripe customer id.
    #[serde(default)]
    pub stripe_customer_id: Option<String>,
    /// `false` lifts a suspension; `true` suspends by hand.
    #[serde(default)]
    pub suspended: Option<bool>,
}

/// Why a customer could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CustomerError {
    /// The update names something that does not exist or is malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The key-value store failed.
    #[error(transparent)]
    Store(#[from] BusError),
}

/// The customers, in the key-value bucket and in memory.
pub struct CustomerStore {
    kv: kv::Store,
    /// Where plan changes and suspensions are told to the customer's portal.
    js: jetstream::Context,
    cache: RwLock<HashMap<String, Arc<Customer>>>,
    default_plan: String,
    default_period: PeriodKind,
    /// The terms of every customer nobody stored (its `id` is empty).
    default_terms: Arc<Customer>,
}

impl CustomerStore {
    /// Opens (creating if needed) the bucket and loads every customer.
    pub async fn open(
        js: &jetstream::Context,
        replicas: usize,
        default_plan: &str,
        default_period: PeriodKind,
    ) -> Result<Self, BusError> {
        let kv = match js.get_key_value(BUCKET).await {
            Ok(kv) => kv,
            Err(_) => {
                // The bucket's stream is made by hand: async-nats' own bucket creation cannot
                // read nats-server 2.9's answer, and the stream is all a bucket is.
                js.create_stream(jetstream::stream::Config {
                    name: format!("KV_{BUCKET}"),
                    description: Some("northstar customers and plans (key-value bucket)".into()),
                    subjects: vec![format!("$KV.{BUCKET}.>")],
                    max_messages_per_subject: 5,
                    discard: jetstream::stream::DiscardPolicy::New,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(management("create customer bucket"))?;
                js.get_key_value(BUCKET)
                    .await
                    .map_err(management("open customer bucket"))?
            }
        };
        let mut store = Self {
            kv,
            js: js.clone(),
            cache: RwLock::new(HashMap::new()),
            default_plan: default_plan.to_string(),
            default_period,
            default_terms: Arc::new(Customer {
                id: String::new(),
                plan: String::new(),
                billing_anchor: DEFAULT_ANCHOR,
                period: default_period,
                stripe_customer_id: None,
                suspended: None,
                stored: false,
                updated_at: None,
            }),
        };
        store.default_terms = Arc::new(store.default_customer(""));
        let mut keys = store
            .kv
            .keys()
            .await
            .map_err(management("list customers"))?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(management("list customers"))?;
            if let Ok(Some(bytes)) = store.kv.get(&key).await
                && let Ok(customer) = serde_json::from_slice::<Customer>(&bytes)
            {
                store.remember(customer);
            }
        }
        Ok(store)
    }

    /// The customer with `id`, or the default customer (default plan, calendar periods).
    pub fn get(&self, id: &str) -> Arc<Customer> {
        if let Ok(cache) = self.cache.read()
            && let Some(customer) = cache.get(id)
        {
            return customer.clone();
        }
        Arc::new(self.default_customer(id))
    }

    /// The plan, period and suspension of `id` without copying anything: the stored customer,
    /// or one shared default (whose `id` is empty) for customers nobody stored. The hot path
    /// of the meter uses this for every event.
    pub fn terms(&self, id: &str) -> Arc<Customer> {
        if let Ok(cache) = self.cache.read()
            && let Some(customer) = cache.get(id)
        {
            return customer.clone();
        }
        self.default_terms.clone()
    }

    /// The customer whose Stripe id is `stripe_id`, if one is stored.
    pub fn find_by_stripe_id(&self, stripe_id: &str) -> Option<String> {
        let cache = self.cache.read().ok()?;
        cache
            .values()
            .find(|c| c.stripe_customer_id.as_deref() == Some(stripe_id))
            .map(|c| c.id.clone())
    }

    fn default_customer(&self, id: &str) -> Customer {
        Customer {
            id: id.to_string(),
            plan: self.default_plan.clone(),
            billing_anchor: DEFAULT_ANCHOR,
            period: self.default_period,
            stripe_customer_id: None,
            suspended: None,
            stored: false,
            updated_at: None,
        }
    }

    /// Applies an update (validated against `known_plans`) and stores the result.
    pub async fn update(
        &self,
        id: &str,
        update: CustomerUpdate,
        known_plans: &[String],
        now: i64,
    ) -> Result<Arc<Customer>, CustomerError> {
        // The rule ingest applies to the ids it meters (characters, not bytes): a customer
        // whose events are stored can always be given a plan.
        if let Some(problem) = crate::event::id_problem(id) {
            return Err(CustomerError::Invalid {
                field: "id",
                message: format!("{problem}; customer ids are 1 to 255 printable characters"),
            });
        }
        let mut customer = (*self.get(id)).clone();
        if let Some(plan) = update.plan {
            if !known_plans.contains(&plan) {
                return Err(CustomerError::Invalid {
                    field: "plan",
                    message: format!(
                        "`{plan}` is not a plan of the config (known: {})",
                        known_plans.join(", ")
                    ),
                });
            }
            customer.plan = plan;
        }
        if let Some(anchor) = update.billing_anchor {
            let parsed = chrono::DateTime::parse_from_rfc3339(&anchor).map_err(|e| {
                CustomerError::Invalid {
                    field: "billingAnchor",
                    message: format!("`{anchor}` is not an RFC 3339 time: {e}"),
                }
            })?;
            customer.billing_anchor = anchor_hour(parsed.timestamp_micros());
        }
        if let Some(period) = update.period {
            customer.period = period;
        }
        if let Some(stripe) = update.stripe_customer_id {
            customer.stripe_customer_id = Some(stripe).filter(|s| !s.is_empty());
        }
        match update.suspended {
            Some(false) => customer.suspended = None,
            Some(true) if customer.suspended.is_none() => {
                customer.suspended = Some(Suspension {
                    reason: "suspended by an admin".into(),
                    since: crate::clock::format_micros(now),
                });
            }
            _ => {}
        }
        self.store(customer, now).await
    }

    /// Suspends a customer (a hard cap was crossed). Idempotent.
    pub async fn suspend(
        &self,
        id: &str,
        reason: String,
        now: i64,
    ) -> Result<Arc<Customer>, CustomerError> {
        let mut customer = (*self.get(id)).clone();
        if customer.suspended.is_some() {
            return Ok(Arc::new(customer));
        }
        customer.suspended = Some(Suspension {
            reason,
            since: crate::clock::format_micros(now),
        });
        self.store(customer, now).await
    }

    async fn store(
        &self,
        mut customer: Customer,
        now: i64,
    ) -> Result<Arc<Customer>, CustomerError> {
        customer.stored = true;
        customer.updated_at = Some(crate::clock::format_micros(now));
        let before = self.get(&customer.id);
        let bytes = serde_json::to_vec(&customer).unwrap_or_default();
        let revision = self
            .kv
            .put(key_for(&customer.id), bytes.into())
            .await
            .map_err(|e| BusError::Management {
                action: "store customer",
                message: e.to_string(),
            })?;
        for (kind, body) in portal_changes(&before, &customer) {
            let id = format!("{kind}:{}:{revision}", customer.id);
            let mut body = body;
            body["id"] = json!(id);
            body["type"] = json!(kind);
            body["customer_id"] = json!(customer.id);
            body["at"] = json!(customer.updated_at);
            crate::bus::streams::publish_portal(&self.js, &customer.id, &id, &body).await;
        }
        Ok(self.remember(customer))
    }

    fn remember(&self, customer: Customer) -> Arc<Customer> {
        let customer = Arc::new(customer);
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(customer.id.clone(), customer.clone());
        }
        customer
    }

    /// Follows changes other nodes make, until the watch ends or `stop` turns true.
    pub async fn follow(self: Arc<Self>, mut stop: crate::shutdown::Shutdown) {
        let Ok(mut watch) = self.kv.watch_all().await else {
            tracing::warn!(
                "cannot watch the customer bucket; changes made by other nodes are not seen"
            );
            return;
        };
        loop {
            let entry = tokio::select! {
                entry = watch.next() => entry,
                () = crate::shutdown::wait_for_stop(&mut stop) => return,
            };
            let Some(entry) = entry else {
                return;
            };
            if let Ok(entry) = entry
                && let Ok(customer) = serde_json::from_slice::<Customer>(&entry.value)
            {
                self.remember(customer);
            }
        }
    }
}

/// What a customer's portal is told of a change from `before` to `after`: a new plan, a
/// suspension, its end.
fn portal_changes(before: &Customer, after: &Customer) -> Vec<(&'static str, serde_json::Value)> {
    let mut changes = Vec::new();
    if before.plan != after.plan {
        changes.push((
            "plan.changed",
            json!({"plan": after.plan, "previous_plan": before.plan}),
        ));
    }
    match (&before.suspended, &after.suspended) {
        (None, Some(suspension)) => changes.push((
            "customer.suspended",
            json!({"reason": suspension.reason, "since": suspension.since}),
        )),
        (Some(_), None) => changes.push(("customer.unsuspended", json!({}))),
        _ => {}
    }
    changes
}

/// Wraps a key-value failure with what we were doing.
fn management<E: std::fmt::Display>(action: &'static str) -> impl Fn(E) -> BusError {
    move |e| BusError::Management {
        action,
        message: e.to_string(),
    }
}

/// The key of a customer id: itself when it is a valid key, else `x.` and its hex bytes.
pub(crate) fn key_for(id: &str) -> String {
    let plain = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        id.to_string()
    } else {
        format!("x.{}", hex::encode(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_for_any_id() {
        assert_eq!(key_for("acme_1"), "acme_1");
        assert_eq!(key_for("a b/c"), "x.6120622f63");
        assert_ne!(
            key_for("x.61"),
            "x.61",
            "an id that looks encoded is encoded too"
        );
    }
}
