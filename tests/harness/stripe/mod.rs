//! A local stand-in for Stripe's API: meter events, meters and their summaries, Checkout
//! Sessions, plus a generic JSON webhook receiver (`POST /hook`) for the webhook sink.
//!
//! It speaks HTTP/1.1 over a raw `TcpListener` rather than through hyper because one of its
//! faults is "process the call, then hang up without answering" — the case that makes a
//! client retry something the provider already counted. Faults are drawn from a seeded
//! xorshift generator; the counters (`duplicates`, `faults_injected`,
//! `concurrency_violations`) let a test prove the retries happened and stayed within
//! Stripe's rules (one concurrent call per customer and meter).
//!
//! Layout: `endpoints` (the routes and what each one checks and records), `faults` (the seeded
//! fault injection) and `http` (the hand-rolled HTTP/1.1 reading and writing).

mod endpoints;
mod faults;
mod http;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::net::TcpListener;

use faults::FaultDice;
pub use faults::Faults;

/// The only API key the fake accepts (`Authorization: Bearer …`).
pub const SECRET_KEY: &str = "sk_test_northstar";
/// The webhook endpoint secret tests sign Stripe events with.
pub const WEBHOOK_SECRET: &str = "whsec_test_northstar";
/// The customer id Stripe does not know: meter events for it fail for good.
pub const MISSING_CUSTOMER: &str = "cus_missing";

/// A running fake; the listener stops when it is dropped.
pub struct FakeStripe {
    base: String,
    state: Shared,
    accept: tokio::task::JoinHandle<()>,
}

type Shared = Arc<Mutex<State>>;

/// A meter event Stripe accepted.
#[derive(Debug, Clone)]
struct MeterEvent {
    identifier: String,
    event_name: String,
    customer: String,
    value: i64,
    timestamp: i64,
    created: i64,
}

impl MeterEvent {
    /// The `billing.meter_event` object Stripe answers with.
    fn object(&self) -> Value {
        json!({
            "object": "billing.meter_event",
            "event_name": self.event_name,
            "identifier": self.identifier,
            "payload": {"stripe_customer_id": self.customer, "value": self.value.to_string()},
            "timestamp": self.timestamp,
            "created": self.created,
            "livemode": false,
        })
    }
}

/// A body the webhook receiver accepted, under its idempotency key.
#[derive(Debug, Clone)]
struct HookCall {
    customer: String,
    feature: String,
    value: i64,
    body: Value,
}

#[derive(Debug, Default)]
struct State {
    faults: FaultDice,
    events: Vec<MeterEvent>,
    meters: BTreeSet<String>,
    hooks: Vec<(String, HookCall)>,
    checkouts: Vec<BTreeMap<String, String>>,
    /// Prices by id: their `recurring.usage_type` (`licensed` or `metered`).
    prices: BTreeMap<String, String>,
    /// Every `Stripe-Version` header received.
    api_versions: BTreeSet<String>,
    in_flight: HashMap<(String, String), u32>,
    duplicates: u64,
    concurrency_violations: u64,
    generated_identifiers: u64,
}

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl FakeStripe {
    /// Listens on `127.0.0.1:0` and serves until dropped.
    pub async fn start(faults: Faults) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Stripe");
        let base = format!(
            "http://{}",
            listener.local_addr().expect("fake Stripe addr")
        );
        let state = Arc::new(Mutex::new(State {
            faults: FaultDice::new(faults),
            prices: BTreeMap::from([("price_pro".to_string(), "licensed".to_string())]),
            ..State::default()
        }));
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(endpoints::serve_connection(stream, shared.clone()));
            }
        });
        Self {
            base,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`: the config's `apiBase`; the webhook sink posts to `{base}/hook`.
    pub fn base(&self) -> String {
        self.base.clone()
    }

    /// Changes the fault rate from now on (0 switches faults off).
    pub fn set_fault_rate(&self, rate: f64) {
        lock(&self.state).faults.rate = rate;
    }

    /// Registers a meter, as if created in the dashboard, before any event names it.
    pub fn add_meter(&self, event_name: &str) {
        lock(&self.state).meters.insert(event_name.to_string());
    }

    /// Accepted (deduplicated) meter event values per (Stripe customer, event name).
    pub fn totals(&self) -> BTreeMap<(String, String), i64> {
        let mut totals = BTreeMap::new();
        for event in &lock(&self.state).events {
            *totals
                .entry((event.customer.clone(), event.event_name.clone()))
                .or_default() += event.value;
        }
        totals
    }

    /// Accepted webhook values per (`customer_id`, `feature`), each idempotency key once.
    pub fn hook_totals(&self) -> BTreeMap<(String, String), i64> {
        let mut totals = BTreeMap::new();
        for (_, call) in &lock(&self.state).hooks {
            *totals
                .entry((call.customer.clone(), call.feature.clone()))
                .or_default() += call.value;
        }
        totals
    }

    /// The first body received under each idempotency key, in arrival order.
    pub fn hook_bodies(&self) -> Vec<Value> {
        lock(&self.state)
            .hooks
            .iter()
            .map(|(_, call)| call.body.clone())
            .collect()
    }

    /// The idempotency keys the webhook receiver accepted, in arrival order.
    pub fn hook_keys(&self) -> Vec<String> {
        lock(&self.state)
            .hooks
            .iter()
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Accepted meter events in arrival order, flattened:
    /// `{"identifier", "event_name", "stripe_customer_id", "value": int, "timestamp", "created"}`.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.state)
            .events
            .iter()
            .map(|e| {
                json!({
                    "identifier": e.identifier,
                    "event_name": e.event_name,
                    "stripe_customer_id": e.customer,
                    "value": e.value,
                    "timestamp": e.timestamp,
                    "created": e.created,
                })
            })
            .collect()
    }

    /// Identifiers of the accepted meter events, in arrival order.
    pub fn identifiers(&self) -> Vec<String> {
        lock(&self.state)
            .events
            .iter()
            .map(|e| e.identifier.clone())
            .collect()
    }

    /// Calls that repeated an identifier (meter events) or idempotency key (hook) already
    /// accepted: evidence of retries after a lost answer.
    pub fn duplicates(&self) -> u64 {
        lock(&self.state).duplicates
    }

    /// How many calls got a fault.
    pub fn faults_injected(&self) -> u64 {
        lock(&self.state).faults.injected
    }

    /// Meter event calls that arrived while another call for the same customer and event
    /// name was being processed (Stripe allows one at a time).
    pub fn concurrency_violations(&self) -> u64 {
        lock(&self.state).concurrency_violations
    }

    /// Adds a recurring price whose `usage_type` is `licensed` or `metered`.
    pub fn add_price(&self, id: &str, usage_type: &str) {
        lock(&self.state)
            .prices
            .insert(id.to_string(), usage_type.to_string());
    }

    /// Every `Stripe-Version` header the server received.
    pub fn api_versions(&self) -> BTreeSet<String> {
        lock(&self.state).api_versions.clone()
    }

    /// Every Checkout Session created: its form parameters, decoded.
    pub fn checkout_requests(&self) -> Vec<BTreeMap<String, String>> {
        lock(&self.state).checkouts.clone()
    }

    /// Drops an accepted meter event, as if Stripe had lost it (for reconciliation tests).
    /// Returns whether it was there.
    pub fn forget(&self, identifier: &str) -> bool {
        let mut state = lock(&self.state);
        let before = state.events.len();
        state.events.retain(|e| e.identifier != identifier);
        state.events.len() != before
    }

    /// A `Stripe-Signature` header value for `body`, timestamped now.
    pub fn sign(secret: &str, body: impl AsRef<[u8]>) -> String {
        Self::sign_at(secret, body, now_secs())
    }

    /// A `Stripe-Signature` header value for `body` at unix time `t`:
    /// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
    pub fn sign_at(secret: &str, body: impl AsRef<[u8]>, t: i64) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let mut context = ring::hmac::Context::with_key(&key);
        context.update(format!("{t}.").as_bytes());
        context.update(body.as_ref());
        let hex: String = context
            .sign()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("t={t},v1={hex}")
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
