//! A local stand-in for Stripe's API: meter events, meters and their summaries, Checkout
//! Sessions, plus a generic JSON webhook receiver (`POST /hook`) for the webhook sink.
//!
//! It speaks HTTP/1.1 over a raw `TcpListener` rather than through hyper because one of its
//! faults is "process the call, then hang up without answering" — the case that makes a
//! client retry something the provider already counted. Faults are drawn from a seeded
//! xorshift generator; the counters (`duplicates`, `faults_injected`,
//! `concurrency_violations`) let a test prove the retries happened and stayed within
//! Stripe's rules (one concurrent call per customer and meter).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The only API key the fake accepts (`Authorization: Bearer …`).
pub const SECRET_KEY: &str = "sk_test_northstar";
/// The webhook endpoint secret tests sign Stripe events with.
pub const WEBHOOK_SECRET: &str = "whsec_test_northstar";
/// The customer id Stripe does not know: meter events for it fail for good.
pub const MISSING_CUSTOMER: &str = "cus_missing";

/// How long a meter event (or hook) call is held "in processing": long enough for a second,
/// concurrent call for the same customer and meter to be seen as a violation.
const HOLD: Duration = Duration::from_millis(10);
/// How long the "timeout" fault keeps the answer back (the sink gives up after 500 ms).
const STALL: Duration = Duration::from_secs(3);
/// Stripe refuses meter events older than this.
const MAX_AGE_SECS: i64 = 35 * 86_400;
/// … and more than this far in the future.
const MAX_AHEAD_SECS: i64 = 5 * 60;

/// Injected failures on `POST /v1/billing/meter_events` and `POST /hook`.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Probability (0..=1) that a call fails in one of the four ways.
    pub rate: f64,
    /// Seed of the generator that picks which calls fail and how.
    pub seed: u64,
}

impl Faults {
    /// Every call succeeds.
    pub fn none() -> Self {
        Self { rate: 0.0, seed: 1 }
    }
}

/// One way a call can go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// 500 before anything is processed.
    ServerError,
    /// 429 with `Retry-After: 1` before anything is processed.
    RateLimited,
    /// Processed, then the answer comes after the client has given up.
    Timeout,
    /// Processed, then the connection is closed without an answer.
    Hangup,
}

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
    fault_rate: f64,
    rng: u64,
    events: Vec<MeterEvent>,
    meters: BTreeSet<String>,
    hooks: Vec<(String, HookCall)>,
    checkouts: Vec<BTreeMap<String, String>>,
    in_flight: HashMap<(String, String), u32>,
    duplicates: u64,
    faults_injected: u64,
    concurrency_violations: u64,
    generated_identifiers: u64,
}

impl State {
    /// xorshift64: deterministic for a seed, good enough to spread faults.
    fn next_u64(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn roll_fault(&mut self) -> Option<Fault> {
        if self.fault_rate <= 0.0 {
            return None;
        }
        let draw = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        if draw >= self.fault_rate {
            return None;
        }
        self.faults_injected += 1;
        Some(
            [
                Fault::ServerError,
                Fault::RateLimited,
                Fault::Timeout,
                Fault::Hangup,
            ][(self.next_u64() % 4) as usize],
        )
    }
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
            fault_rate: faults.rate,
            rng: if faults.seed == 0 {
                0x9E37_79B9_7F4A_7C15
            } else {
                faults.seed
            },
            ..State::default()
        }));
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, shared.clone()));
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
        lock(&self.state).fault_rate = rate;
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
        lock(&self.state).faults_injected
    }

    /// Meter event calls that arrived while another call for the same customer and event
    /// name was being processed (Stripe allows one at a time).
    pub fn concurrency_violations(&self) -> u64 {
        lock(&self.state).concurrency_violations
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

/// A parsed HTTP/1.1 request.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn query(&self, name: &str) -> Option<&str> {
        param(&self.query, name)
    }

    fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// An answer to write back.
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    /// Stripe's error shape: `{"error": {"type", "code"?, "param"?, "message"}}`.
    fn error(
        status: u16,
        kind: &str,
        code: Option<&str>,
        param: Option<&str>,
        message: &str,
    ) -> Self {
        let mut error = json!({"type": kind, "message": message});
        if let Some(code) = code {
            error["code"] = json!(code);
        }
        if let Some(param) = param {
            error["param"] = json!(param);
        }
        Self {
            status,
            headers: Vec::new(),
            body: json!({ "error": error }),
        }
    }

    fn invalid(param: &str, message: &str) -> Self {
        Self::error(400, "invalid_request_error", None, Some(param), message)
    }

    fn missing_param(param: &str) -> Self {
        Self::error(
            400,
            "invalid_request_error",
            Some("parameter_missing"),
            Some(param),
            &format!("Missing required param: {param}."),
        )
    }
}

/// What to do with a request once handled.
enum Outcome {
    Answer(Answer),
    Hangup,
}

async fn serve_connection(stream: TcpStream, state: Shared) {
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

/// Reads one request; `None` at end of stream or on anything unparseable (the connection
/// is then closed, which is what a strict server does with garbage).
async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        if headers.len() > 100 {
            return None;
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        read_chunked(reader).await?
    } else {
        let length: usize = header("content-length")
            .map(|v| v.parse().ok())
            .unwrap_or(Some(0))?;
        if length > 16 << 20 {
            return None;
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await.ok()?;
        body
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_string(), parse_form(query.as_bytes())),
        None => (target, Vec::new()),
    };
    Some(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

async fn read_chunked(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.ok()?;
        let size = line.trim().split(';').next()?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer).await.ok()? == 0 || trailer.trim().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).await.ok()?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).await.ok()?;
    }
}

async fn write_answer(stream: &mut TcpStream, answer: Answer, close: bool) -> std::io::Result<()> {
    let body = serde_json::to_vec(&answer.body).unwrap_or_default();
    let reason = http::StatusCode::from_u16(answer.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {}\r\nrequest-id: req_fake\r\n",
        answer.status,
        body.len(),
        if close { "close" } else { "keep-alive" },
    );
    for (name, value) in &answer.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await
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
    match (request.method.as_str(), segments.as_slice()) {
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

/// The answer for a fault that strikes before processing.
fn early_fault(fault: Option<Fault>) -> Option<Answer> {
    match fault {
        Some(Fault::ServerError) => Some(Answer::error(
            500,
            "api_error",
            None,
            None,
            "An unknown error occurred (injected).",
        )),
        Some(Fault::RateLimited) => {
            let mut answer = Answer::error(
                429,
                "invalid_request_error",
                Some("rate_limit"),
                None,
                "Too many requests hit the API too quickly (injected).",
            );
            answer.headers.push(("retry-after", "1".into()));
            Some(answer)
        }
        _ => None,
    }
}

/// Delivers a processed answer the way the fault says.
async fn late_fault(fault: Option<Fault>, answer: Answer) -> Outcome {
    match fault {
        Some(Fault::Hangup) => Outcome::Hangup,
        Some(Fault::Timeout) => {
            tokio::time::sleep(STALL).await;
            Outcome::Answer(answer)
        }
        _ => Outcome::Answer(answer),
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
    let fault = lock(state).roll_fault();
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

fn checkout(state: &Shared, request: &Request) -> Answer {
    let params: BTreeMap<String, String> = parse_form(&request.body).into_iter().collect();
    for required in ["mode", "line_items[0][price]"] {
        if !params.contains_key(required) {
            return Answer::missing_param(required);
        }
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

    let fault = lock(state).roll_fault();
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

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `application/x-www-form-urlencoded` (and query strings) into decoded pairs, in order.
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (byte, None) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
