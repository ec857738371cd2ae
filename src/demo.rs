//! The demo workload `make run` sends: a small, deterministic product history (signups, core
//! actions, metered API calls, page views, identifies) for a handful of customers, sent over
//! real HTTP to the Segment batch route like any SDK would.

use serde_json::{Value, json};

use crate::client::{HttpClient, basic_auth};

/// A small deterministic generator (xorshift64*), so the demo is the same on every machine.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

const CUSTOMERS: &[&str] = &[
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka",
];
const ENDPOINTS: &[&str] = &["/v1/search", "/v1/export", "/v1/report", "/v1/sync"];
const PAGES: &[&str] = &["Home", "Pricing", "Docs", "Dashboard", "Settings"];

/// `count` Segment messages spread over the 14 days before `now_micros`.
pub fn demo_messages(count: usize, now_micros: i64, seed: u64) -> Vec<Value> {
    let mut rng = Rng::new(seed);
    let day = 86_400_000_000i64;
    let users = (count / 100).clamp(8, 400) as u64;
    (0..count)
        .map(|i| {
            let user = rng.below(users);
            let customer = CUSTOMERS[(user % CUSTOMERS.len() as u64) as usize];
            let at = now_micros - (rng.below(14 * day as u64) as i64);
            let timestamp = chrono::DateTime::from_timestamp_micros(at)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default();
            let user_id = format!("user-{user}");
            let message_id = format!("demo-{seed}-{i}");
            let context = json!({"groupId": customer, "library": {"name": "northstar-demo", "version": env!("CARGO_PKG_VERSION")}});
            match rng.below(20) {
                0 => json!({"type": "track", "event": "signup_completed", "userId": user_id, "messageId": message_id,
                            "timestamp": timestamp, "context": context,
                            "properties": {"plan": "free", "source": "demo", "referral_code": null}}),
                1 => json!({"type": "identify", "userId": user_id, "anonymousId": format!("anon-{user}"),
                            "messageId": message_id, "timestamp": timestamp, "context": context,
                            "traits": {"plan": if user.is_multiple_of(3) { "pro" } else { "free" }}}),
                2..=4 => json!({"type": "page", "name": PAGES[rng.below(PAGES.len() as u64) as usize],
                                "anonymousId": format!("anon-{user}"), "messageId": message_id,
                                "timestamp": timestamp, "context": context}),
                5..=10 => json!({"type": "track", "event": "core_action_completed", "userId": user_id,
                                 "messageId": message_id, "timestamp": timestamp, "context": context,
                                 "properties": {"action": "report_created"}}),
                _ => json!({"type": "track", "event": "api_call_made", "userId": user_id, "messageId": message_id,
                            "timestamp": timestamp, "context": context,
                            "properties": {"endpoint": ENDPOINTS[rng.below(ENDPOINTS.len() as u64) as usize],
                                           "latency_ms": 5 + rng.below(200), "status": 200}}),
            }
        })
        .collect()
}

/// What sending the demo did.
#[derive(Debug, Default, Clone, Copy)]
pub struct DemoReport {
    /// Events stored.
    pub accepted: u64,
    /// Events already stored by an earlier run (same message ids).
    pub duplicates: u64,
}

/// Sends the demo to a running server's `/v1/batch` in batches of 500.
pub async fn send_demo(
    base_url: &str,
    write_key: &str,
    count: usize,
    now_micros: i64,
) -> Result<DemoReport, String> {
    let client = HttpClient::new();
    let auth = basic_auth(write_key);
    let mut report = DemoReport::default();
    for chunk in demo_messages(count, now_micros, 7).chunks(500) {
        let body = json!({"batch": chunk, "sentAt": crate::clock::format_micros(now_micros)});
        let response = client
            .post_json(
                &format!("{base_url}/v1/batch"),
                &[("authorization", &auth)],
                &body,
            )
            .await
            .map_err(|e| e.to_string())?;
        if response.status != 200 {
            return Err(format!(
                "demo batch answered {}: {}",
                response.status,
                response.text()
            ));
        }
        let answer = response.json();
        report.accepted += answer["accepted"].as_u64().unwrap_or(0);
        report.duplicates += answer["duplicates"].as_u64().unwrap_or(0);
    }
    Ok(report)
}
