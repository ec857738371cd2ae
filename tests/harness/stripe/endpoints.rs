//! The Stripe endpoints the fake serves (meter events, meters and their summaries, Checkout
//! Sessions) and the generic `POST /hook` receiver, each checking its input the way the real
//! API does, plus the connection loop that routes requests to them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::BufReader;
use tokio::net::TcpStream;

use super::faults::{early_fault, late_fault};
use super::http::{Answer, Outcome, Request, param, parse_form, read_request, write_answer};
use super::{HookCall, MISSING_CUSTOMER, MeterEvent, SECRET_KEY, Shared, lock, now_secs};

/// How long a meter event (or hook) call is held "in processing": long enough for a second,
/// concurrent call for the same customer and meter to be seen as a violation.
const HOLD: Duration = Duration::from_millis(10);
/// Stripe refuses meter events older than this.
const MAX_AGE_SECS: i64 = 35 * 86_400;
/// … and more than this far in the future.
const MAX_AHEAD_SECS: i64 = 5 * 60;

/// Serves one connection's requests in turn until the client closes, asks to close, or a
/// fault hangs up.
pub(super) async fn serve_connection(stream: TcpStream, state: Shared) {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader).await {
        let close = request.wants_close();
        match handle(&state, request).await {
            Outcome::Hangup => return,
            Outcome::Answer(answer) => {
                if write_answer(reader.get_mut(), answer, close).await.is_err() || close {
                    return;
                }
            }
        }
    }
}

async fn handle(state: &Shared, request: Request) -> Outcome {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    if segments.first() == Some(&"v1")
        && request.header("authorization") != Some(&format!("Bearer {SECRET_KEY}"))
    {
        return Outcome::Answer(Answer::error(
            401,
            "invalid_request_error",
            None,
            None,
            "Invalid API Key provided. Send `Authorization: Bearer sk_test_…`.",
        ));
    }
    if let Some(version) = request.header("stripe-version") {
        lock(state).api_versions.insert(version.to_string());
    }
    match (request.method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "prices", id]) => Outcome::Answer(get_price(state, id)),
        ("POST", ["v1", "billing", "meter_events"]) => meter_event(state, &request).await,
        ("GET", ["v1", "billing", "meters"]) => Outcome::Answer(list_meters(state)),
        ("GET", ["v1", "billing", "meters", id]) => Outcome::Answer(get_meter(state, id)),
        ("GET", ["v1", "billing", "meters", id, "event_summaries"]) => {
            Outcome::Answer(event_summaries(state, id, &request))
        }
        ("POST", ["v1", "checkout", "sessions"]) => Outcome::Answer(checkout(state, &request)),
        ("POST", ["hook"]) => hook(state, &request).await,
        (method, _) => Outcome::Answer(Answer::error(
            404,
            "invalid_request_error",
            None,
            None,
            &format!("Unrecognized request URL ({method}: {}).", request.path),
        )),
    }
}

/// Marks a (customer, event name) pair busy while a call for it is processed; counts a
/// violation when it already was.
struct InFlight {
    state: Shared,
    key: (String, String),
}

impl InFlight {
    fn enter(state: &Shared, key: (String, String)) -> Self {
        let mut guard = lock(state);
        if guard.in_flight.get(&key).is_some_and(|busy| *busy > 0) {
            guard.concurrency_violations += 1;
        }
        *guard.in_flight.entry(key.clone()).or_default() += 1;
        Self {
            state: state.clone(),
            key,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut guard = lock(&self.state);
        if let Some(busy) = guard.in_flight.get_mut(&self.key) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                guard.in_flight.remove(&self.key);
            }
        }
    }
}

async fn meter_event(state: &Shared, request: &Request) -> Outcome {
    let form = parse_form(&request.body);
    let field = |name: &str| param(&form, name).map(str::to_string);
    let Some(event_name) = field("event_name") else {
        return Outcome::Answer(Answer::missing_param("event_name"));
    };
    let Some(customer) = field("payload[stripe_customer_id]") else {
        return Outcome::Answer(Answer::missing_param("payload[stripe_customer_id]"));
    };
    let Some(value) = field("payload[value]") else {
        return Outcome::Answer(Answer::missing_param("payload[value]"));
    };
    let Some(value) = whole_number(&value) else {
        return Outcome::Answer(Answer::invalid(
            "payload[value]",
            &format!("Invalid payload[value]: must be a whole number, got '{value}'."),
        ));
    };
    let now = now_secs();
    let timestamp = match field("timestamp").map(|t| t.parse::<i64>()) {
        None => now,
        Some(Ok(t)) if t >= now - MAX_AGE_SECS && t <= now + MAX_AHEAD_SECS => t,
        Some(_) => {
            return Outcome::Answer(Answer::invalid(
                "timestamp",
                "Invalid timestamp: must be unix seconds within the past 35 days and no more than 5 minutes in the future.",
            ));
        }
    };
    let identifier = match field("identifier") {
        Some(id) if id.len() > 100 || id.is_empty() => {
            return Outcome::Answer(Answer::invalid(
                "identifier",
                "Invalid identifier: must be 1 to 100 characters.",
            ));
        }
        Some(id) => id,
        None => {
            let mut guard = lock(state);
            guard.generated_identifiers += 1;
            format!("auto_{}", guard.generated_identifiers)
        }
    };

    let busy = InFlight::enter(state, (customer.clone(), event_name.clone()));
    let fault = lock(state).faults.roll();
    tokio::time::sleep(HOLD).await;
    if let Some(answer) = early_fault(fault) {
        return Outcome::Answer(answer);
    }
    let answer = if customer == MISSING_CUSTOMER {
        Answer::error(
            400,
            "invalid_request_error",
            Some("resource_missing"),
            Some("payload[stripe_customer_id]"),
            &format!("No such customer: '{customer}'"),
        )
    } else {
        let mut guard = lock(state);
        guard.meters.insert(event_name.clone());
        if let Some(existing) = guard.events.iter().find(|e| e.identifier == identifier) {
            let object = existing.object();
            guard.duplicates += 1;
            Answer::ok(object)
        } else {
            let event = MeterEvent {
                identifier,
                event_name,
                customer,
                value,
                timestamp,
                created: now,
            };
            let object = event.object();
            guard.events.push(event);
            Answer::ok(object)
        }
    };
    drop(busy);
    late_fault(fault, answer).await
}

/// A whole number as Stripe wants `payload[value]`: optional sign and digits, nothing else.
fn whole_number(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn meter_object(event_name: &str) -> Value {
    json!({
        "id": format!("mtr_{event_name}"),
        "object": "billing.meter",
        "event_name": event_name,
        "display_name": event_name,
        "status": "active",
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
        "value_settings": {"event_payload_key": "value"},
        "livemode": false,
    })
}

fn list_meters(state: &Shared) -> Answer {
    let data: Vec<Value> = lock(state).meters.iter().map(|m| meter_object(m)).collect();
    Answer::ok(
        json!({"object": "list", "url": "/v1/billing/meters", "data": data, "has_more": false}),
    )
}

/// The event name behind a meter id, if the meter exists.
fn meter_event_name(state: &Shared, id: &str) -> Option<String> {
    let name = id.strip_prefix("mtr_")?;
    lock(state).meters.contains(name).then(|| name.to_string())
}

fn no_such_meter(id: &str) -> Answer {
    Answer::error(
        404,
        "invalid_request_error",
        Some("resource_missing"),
        Some("id"),
        &format!("No such billing meter: '{id}'"),
    )
}

fn get_meter(state: &Shared, id: &str) -> Answer {
    match meter_event_name(state, id) {
        Some(name) => Answer::ok(meter_object(&name)),
        None => no_such_meter(id),
    }
}

fn event_summaries(state: &Shared, id: &str, request: &Request) -> Answer {
    let Some(event_name) = meter_event_name(state, id) else {
        return no_such_meter(id);
    };
    let Some(customer) = request.query("customer") else {
        return Answer::missing_param("customer");
    };
    let mut bounds = [0i64; 2];
    for (bound, name) in bounds.iter_mut().zip(["start_time", "end_time"]) {
        let Some(text) = request.query(name) else {
            return Answer::missing_param(name);
        };
        match text.parse::<i64>() {
            Ok(t) if t % 60 == 0 => *bound = t,
            _ => {
                return Answer::invalid(
                    name,
                    &format!(
                        "Invalid {name}: must be unix seconds aligned with minute boundaries, got '{text}'."
                    ),
                );
            }
        }
    }
    let [start, end] = bounds;
    if start >= end {
        return Answer::invalid("end_time", "end_time must be after start_time.");
    }
    let total: i64 = lock(state)
        .events
        .iter()
        .filter(|e| e.event_name == event_name && e.customer == customer)
        .filter(|e| e.timestamp >= start && e.timestamp < end)
        .map(|e| e.value)
        .sum();
    Answer::ok(json!({
        "object": "list",
        "url": format!("/v1/billing/meters/{id}/event_summaries"),
        "data": [{
            "id": format!("mtrsum_{customer}_{start}"),
            "object": "billing.meter_event_summary",
            "aggregated_value": total,
            "start_time": start,
            "end_time": end,
            "meter": id,
            "livemode": false,
        }],
        "has_more": false,
    }))
}

/// `GET /v1/prices/{id}`: a recurring price, licensed or metered.
fn get_price(state: &Shared, id: &str) -> Answer {
    match lock(state).prices.get(id) {
        Some(usage_type) => Answer::ok(json!({
            "id": id,
            "object": "price",
            "type": "recurring",
            "recurring": {"interval": "month", "usage_type": usage_type},
            "livemode": false,
        })),
        None => Answer::error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            Some("id"),
            &format!("No such price: '{id}'"),
        ),
    }
}

fn checkout(state: &Shared, request: &Request) -> Answer {
    let params: BTreeMap<String, String> = parse_form(&request.body).into_iter().collect();
    for required in ["mode", "line_items[0][price]"] {
        if !params.contains_key(required) {
            return Answer::missing_param(required);
        }
    }
    // Stripe's rule for a subscription's line item: a quantity for a licensed price, none
    // for a metered one.
    let usage_type = lock(state)
        .prices
        .get(&params["line_items[0][price]"])
        .cloned();
    match (
        usage_type.as_deref(),
        params.contains_key("line_items[0][quantity]"),
    ) {
        (Some("metered"), true) => {
            return Answer::invalid(
                "line_items[0][quantity]",
                "Quantity should not be specified where usage_type is `metered`. Remove quantity from `line_items[0]`.",
            );
        }
        (Some("licensed"), false) => return Answer::missing_param("line_items[0][quantity]"),
        (None, _) => {
            return Answer::invalid(
                "line_items[0][price]",
                &format!("No such price: '{}'", params["line_items[0][price]"]),
            );
        }
        _ => {}
    }
    let metadata: serde_json::Map<String, Value> = params
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((key.to_string(), json!(v)))
        })
        .collect();
    let mut guard = lock(state);
    guard.checkouts.push(params.clone());
    let id = format!("cs_test_{}", guard.checkouts.len());
    Answer::ok(json!({
        "id": id,
        "object": "checkout.session",
        "url": format!("https://checkout.stripe.test/c/pay/{id}"),
        "mode": params["mode"],
        "status": "open",
        "customer": params.get("customer"),
        "client_reference_id": params.get("client_reference_id"),
        "success_url": params.get("success_url"),
        "cancel_url": params.get("cancel_url"),
        "metadata": metadata,
        "livemode": false,
    }))
}

/// `POST /hook`: a generic JSON receiver that dedups on `Idempotency-Key`.
async fn hook(state: &Shared, request: &Request) -> Outcome {
    let bad = |message: String| {
        Outcome::Answer(Answer::error(
            400,
            "invalid_request_error",
            None,
            None,
            &message,
        ))
    };
    let Some(key) = request.header("idempotency-key").map(str::to_string) else {
        return bad("missing Idempotency-Key header".into());
    };
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return bad("body is not JSON".into());
    };
    let text = |name: &str| body[name].as_str().map(str::to_string);
    let (Some(customer), Some(feature)) = (text("customer_id"), text("feature")) else {
        return bad(format!("body needs string customer_id and feature: {body}"));
    };
    let value = match &body["value"] {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Value::String(s) => whole_number(s),
        _ => None,
    };
    let Some(value) = value else {
        return bad(format!("value must be a whole number: {body}"));
    };

    let fault = lock(state).faults.roll();
    tokio::time::sleep(HOLD).await;
    if let Some(answer) = early_fault(fault) {
        return Outcome::Answer(answer);
    }
    let answer = {
        let mut guard = lock(state);
        if guard.hooks.iter().any(|(k, _)| *k == key) {
            guard.duplicates += 1;
            Answer::ok(json!({"ok": true, "duplicate": true}))
        } else {
            guard.hooks.push((
                key,
                HookCall {
                    customer,
                    feature,
                    value,
                    body,
                },
            ));
            Answer::ok(json!({"ok": true, "duplicate": false}))
        }
    };
    late_fault(fault, answer).await
}
