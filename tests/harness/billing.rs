//! What the billing tests share: server configs with the Stripe or webhook sink, event
//! builders, the `Metered` ledger of what a test sent, calls to the billing and limits APIs,
//! signed-webhook bodies, the `northstar billing` CLI, and polling until the sink settles.

use std::collections::BTreeMap;
use std::time::Duration;

use northstar::client::ClientResponse;
use northstar::clock::{format_micros, system_micros};
use serde_json::{Value, json};

pub use super::eventually;
use super::stripe::{SECRET_KEY, WEBHOOK_SECRET};
use super::{ADMIN_KEY, Nats, Northstar, SERVICE_KEY, limits_config};

/// The secrets every billing server gets.
const STRIPE_ENV: [(&str, &str); 2] = [
    ("STRIPE_SECRET_KEY", SECRET_KEY),
    ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
];

/// feature id → Stripe meter `event_name`, as configured below.
const METERS: [(&str, &str); 2] = [("api_requests", "api_requests"), ("storage_gb", "storage")];

/// The limits config with the Stripe sink: 1 s windows, quick retries, a pro price to sell.
pub fn billing_config(api_base: &str) -> Value {
    let mut config = limits_config();
    config["billing"] = json!({
        "provider": "stripe",
        "apiBase": api_base,
        "window": "1s",
        "grace": "1s",
        "meters": {"api_requests": "api_requests", "storage_gb": "storage"},
        "timeout": "500ms",
        "retryBase": "50ms",
        "retryMax": "1s",
        "flushInterval": "200ms",
        "rateLimit": 1000,
        "checkout": {
            "prices": {"pro": "price_pro"},
            "successUrl": "https://app.example/ok",
            "cancelUrl": "https://app.example/cancel"
        }
    });
    config
}

/// The limits config with the generic webhook sink posting to `url`.
pub fn webhook_config(url: &str) -> Value {
    let mut config = limits_config();
    config["billing"] = json!({
        "provider": "webhook",
        "url": url,
        "window": "1s",
        "grace": "1s",
        "meters": {"api_requests": "api_requests", "storage_gb": "storage"},
        "timeout": "500ms",
        "retryBase": "50ms",
        "retryMax": "1s",
        "flushInterval": "200ms"
    });
    config
}

/// Starts northstar with `config` and the Stripe secrets in its environment.
pub fn start(nats: &Nats, config: &Value) -> Northstar {
    Northstar::start_with_env(nats, config, &STRIPE_ENV)
}

/// Now, as an event `timestamp`.
pub fn now() -> String {
    format_micros(system_micros())
}

/// Returns once the clock is in the next of `billing_config`'s 1 s windows, so the batches
/// sent before and after fall in different windows.
pub async fn wait_next_window() {
    let window = system_micros() / 1_000_000;
    while system_micros() / 1_000_000 == window {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An `api_call_made` track event of `customer` (one API request) at `at`.
pub fn call(id: &str, customer: &str, at: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": format!("{customer}-user"), "event": "api_call_made",
           "timestamp": at, "context": {"groupId": customer}, "properties": {"endpoint": "/x"}})
}

/// `storage_used` of `quarters` / 4 GB (0.5, 1 and 2.25 are all exact).
pub fn storage(id: &str, customer: &str, quarters: i64, at: &str) -> Value {
    let gb = if quarters % 4 == 0 {
        json!(quarters / 4)
    } else {
        json!(quarters as f64 / 4.0)
    };
    json!({"type": "track", "messageId": id, "userId": "u", "event": "storage_used", "timestamp": at,
           "context": {"groupId": customer}, "properties": {"gb": gb}})
}

/// What was sent, exactly: per (customer, feature), in quarter units.
#[derive(Debug, Default, Clone)]
pub struct Metered(BTreeMap<(String, String), i64>);

impl Metered {
    pub fn call(&mut self, customer: &str) {
        *self
            .0
            .entry((customer.into(), "api_requests".into()))
            .or_default() += 4;
    }

    pub fn storage(&mut self, customer: &str, quarters: i64) {
        *self
            .0
            .entry((customer.into(), "storage_gb".into()))
            .or_default() += quarters;
    }

    /// `size` events stamped `at`, ids `{prefix}-{i}`, round-robin over `customers`: every
    /// `every`-th a `storage_used` of 0.5, 1 or 2.25 GB, the rest API calls; all recorded here.
    pub fn mixed_batch(
        &mut self,
        prefix: &str,
        size: usize,
        every: usize,
        batch: usize,
        customers: &[&str],
        at: &str,
    ) -> Vec<Value> {
        (0..size)
            .map(|i| {
                let customer = customers[i % customers.len()];
                let id = format!("{prefix}-{i}");
                if i % every == 0 {
                    let quarters = [2, 4, 9][(i / every + batch) % 3];
                    self.storage(customer, quarters);
                    storage(&id, customer, quarters, at)
                } else {
                    self.call(customer);
                    call(&id, customer, at)
                }
            })
            .collect()
    }

    /// What the provider must hold per (customer, feature): floor of the metered sum.
    /// Zeros are left out (a provider total of 0 and no total are the same bill).
    pub fn billed(&self) -> BTreeMap<(String, String), i64> {
        self.0
            .iter()
            .map(|(key, quarters)| (key.clone(), quarters.div_euclid(4)))
            .filter(|(_, units)| *units != 0)
            .collect()
    }

    /// `billed`, keyed the way Stripe sees it: (Stripe customer, event_name).
    pub fn billed_in_stripe(
        &self,
        stripe_ids: &BTreeMap<&str, &str>,
    ) -> BTreeMap<(String, String), i64> {
        self.billed()
            .into_iter()
            .map(|((customer, feature), units)| {
                let stripe = stripe_ids
                    .get(customer.as_str())
                    .map_or(customer.clone(), |s| s.to_string());
                let event_name = METERS
                    .iter()
                    .find(|(f, _)| *f == feature)
                    .map(|(_, e)| e.to_string())
                    .expect("a billed feature");
                ((stripe, event_name), units)
            })
            .collect()
    }
}

/// `totals` without its zeros, comparable with what `Metered` expects.
pub fn nonzero(totals: BTreeMap<(String, String), i64>) -> BTreeMap<(String, String), i64> {
    totals.into_iter().filter(|(_, v)| *v != 0).collect()
}

/// Posts `batch` to `/v1/batch` and asserts every event of it is accepted.
pub async fn send(server: &Northstar, batch: Vec<Value>) {
    let n = batch.len();
    let answer = server.post("/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(answer.status, 200, "batch refused: {}", answer.text());
    assert_eq!(
        answer.json()["accepted"].as_u64(),
        Some(n as u64),
        "every event of the batch is accepted: {}",
        answer.text()
    );
}

/// Sends a JSON request (or none) with `key` as the bearer token.
pub async fn send_as(
    server: &Northstar,
    key: &str,
    method: http::Method,
    path: &str,
    body: Option<&Value>,
) -> ClientResponse {
    let bearer = format!("Bearer {key}");
    let mut headers = vec![("authorization", bearer.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    server
        .client
        .send(
            method,
            &format!("{}{path}", server.base),
            &headers,
            body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
        )
        .await
        .expect("northstar answers")
}

/// `GET /v1/billing/status` as the admin.
pub async fn billing_status(server: &Northstar) -> Value {
    let answer = send_as(
        server,
        ADMIN_KEY,
        http::Method::GET,
        "/v1/billing/status",
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "billing status: {}", answer.text());
    answer.json()
}

/// `PUT /v1/customers/{customer}` with `body` through the admin API; must answer 200.
async fn put_customer(server: &Northstar, customer: &str, body: Value) {
    let answer = send_as(
        server,
        ADMIN_KEY,
        http::Method::PUT,
        &format!("/v1/customers/{customer}"),
        Some(&body),
    )
    .await;
    assert_eq!(answer.status, 200, "PUT {body}: {}", answer.text());
}

/// Maps `customer` to the Stripe customer `stripe_id`.
pub async fn set_stripe_customer(server: &Northstar, customer: &str, stripe_id: &str) {
    put_customer(server, customer, json!({ "stripeCustomerId": stripe_id })).await;
}

/// Puts `customer` on `plan` through the admin API.
pub async fn set_plan(server: &Northstar, customer: &str, plan: &str) {
    put_customer(server, customer, json!({ "plan": plan })).await;
}

/// `POST /v1/check` consuming one API request.
pub async fn consume(server: &Northstar, customer: &str, event_id: &str) -> ClientResponse {
    let body = json!({"customer_id": customer, "feature": "api_requests", "quantity": 1,
                      "consume": true, "event_id": event_id});
    send_as(
        server,
        SERVICE_KEY,
        http::Method::POST,
        "/v1/check",
        Some(&body),
    )
    .await
}

/// The customer's plan, as the limits API reports it.
pub async fn plan_of(server: &Northstar, customer: &str) -> String {
    let answer = send_as(
        server,
        SERVICE_KEY,
        http::Method::GET,
        &format!("/v1/customers/{customer}/usage"),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "usage: {}", answer.text());
    answer.json()["features"][0]["plan"]
        .as_str()
        .unwrap_or_else(|| panic!("usage without a plan: {}", answer.text()))
        .to_string()
}

/// `POST /v1/webhooks/stripe` with `body` as is and an optional `Stripe-Signature`.
pub async fn stripe_webhook(
    server: &Northstar,
    signature: Option<&str>,
    body: &[u8],
) -> ClientResponse {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(signature) = signature {
        headers.push(("stripe-signature", signature));
    }
    server
        .post_raw("/v1/webhooks/stripe", &headers, body.to_vec())
        .await
}

/// Delivers `body` as Stripe would, signed with the test secret, and expects it taken.
pub async fn deliver_signed(server: &Northstar, body: &[u8]) {
    let signature = super::stripe::FakeStripe::sign(WEBHOOK_SECRET, body);
    let answer = stripe_webhook(server, Some(&signature), body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// A `checkout.session.completed` event moving `customer` to `plan`.
pub fn checkout_completed(event_id: &str, session_id: &str, customer: &str, plan: &str) -> Vec<u8> {
    json!({
        "id": event_id,
        "object": "event",
        "type": "checkout.session.completed",
        "created": system_micros() / 1_000_000,
        "livemode": false,
        "data": {"object": {
            "id": session_id,
            "object": "checkout.session",
            "mode": "subscription",
            "status": "complete",
            "payment_status": "paid",
            "client_reference_id": customer,
            "customer": format!("cus_{customer}"),
            "subscription": format!("sub_{customer}"),
            "metadata": {"northstar_customer": customer, "plan": plan}
        }}
    })
    .to_string()
    .into_bytes()
}

/// A `customer.subscription.{updated,deleted}` event for `customer` on `price`.
pub fn subscription_event(event_id: &str, kind: &str, customer: &str, price: &str) -> Vec<u8> {
    json!({
        "id": event_id,
        "object": "event",
        "type": kind,
        "created": system_micros() / 1_000_000,
        "livemode": false,
        "data": {"object": {
            "id": format!("sub_{customer}"),
            "object": "subscription",
            "customer": format!("cus_{customer}"),
            "status": if kind.ends_with("deleted") { "canceled" } else { "active" },
            "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                       "price": {"id": price, "object": "price"}, "quantity": 1}]},
            "metadata": {"northstar_customer": customer}
        }}
    })
    .to_string()
    .into_bytes()
}

/// Runs `northstar billing …` and returns (exit code, stdout, stderr).
pub async fn northstar_billing(args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .arg("billing")
        .args(args)
        .env("STRIPE_SECRET_KEY", SECRET_KEY)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run northstar billing");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until the outbox has nothing pending and returns the status.
pub async fn wait_settled(server: &Northstar) -> Value {
    eventually(Duration::from_secs(30), async || {
        let status = billing_status(server).await;
        if status["pending"] == 0 {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    })
    .await
}

/// Waits until billing has nothing left that could be reported: every event of the stream
/// applied, no window open, nothing pending in the outbox. Returns the status.
pub async fn wait_quiescent(server: &Northstar) -> Value {
    eventually(Duration::from_secs(60), async || {
        let text = server.get("/metrics").await.text();
        let last = super::metric(&text, "northstar_stream_last_seq ").unwrap_or(0);
        let status = billing_status(server).await;
        let done = status["pending"] == 0
            && status["open_windows"] == 0
            && status["applied_seq"]
                .as_u64()
                .is_some_and(|seq| seq >= last);
        match done {
            true => Ok(status),
            false => Err(format!("stream at {last}: {status}")),
        }
    })
    .await
}

/// Every status total agrees with what was sent: metered exactly, owed and delivered floored.
pub fn assert_status_totals(status: &Value, metered: &Metered) {
    let rows = status["totals"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no totals: {status}"));
    for ((customer, feature), quarters) in &metered.0 {
        let row = rows
            .iter()
            .find(|r| r["customer_id"] == customer.as_str() && r["feature"] == feature.as_str());
        let billed = quarters.div_euclid(4);
        let Some(row) = row else {
            assert_eq!(
                billed, 0,
                "no status total for {customer}/{feature}: {status}"
            );
            continue;
        };
        let exact = row["metered"]
            .as_str()
            .and_then(|m| m.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("metered is a decimal string: {row}"));
        assert_eq!(
            exact,
            *quarters as f64 / 4.0,
            "closed usage of {customer}/{feature}"
        );
        assert_eq!(row["owed"], billed, "owed of {customer}/{feature}: {row}");
        assert_eq!(
            row["delivered"], billed,
            "delivered of {customer}/{feature}: {row}"
        );
    }
}
