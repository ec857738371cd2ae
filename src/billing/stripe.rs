//! Stripe's API, the parts northstar uses: meter events, meter event summaries, Checkout
//! Sessions, and webhook signatures. Requests are form-encoded with a Bearer secret key, as
//! Stripe's own libraries send them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use serde_json::Value;
use subtle::ConstantTimeEq;

use super::outbox::{Entry, Outcome};
use crate::client::{ClientResponse, HttpClient};

/// The API version every call asks for (`Stripe-Version`), so the shapes of answers and
/// webhook events are the ones northstar reads, whatever the account's default version.
pub const API_VERSION: &str = "2024-06-20";

/// What a path segment escapes: anything but the letters, digits, `_`, `-` and `.` of ids.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'-')
    .remove(b'.');

/// A Stripe API client.
#[derive(Clone)]
pub struct Stripe {
    http: HttpClient,
    base: String,
    secret_key: String,
    timeout: Duration,
    /// Whether each price looked up is metered (`recurring.usage_type`): a checkout of a
    /// metered price must not name a quantity. Prices are few (one per plan).
    metered_prices: Arc<Mutex<HashMap<String, bool>>>,
}

/// A call that got no usable answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StripeError(pub String);

impl Stripe {
    /// A client for the API at `base` (`https://api.stripe.com`, or a test server).
    pub fn new(base: &str, secret_key: &str, timeout: Duration) -> Self {
        Self {
            http: HttpClient::new(),
            base: base.trim_end_matches('/').to_string(),
            secret_key: secret_key.to_string(),
            timeout,
            metered_prices: Arc::default(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        form: &[(&str, &str)],
        idempotency_key: Option<&str>,
    ) -> Result<ClientResponse, StripeError> {
        let bearer = format!("Bearer {}", self.secret_key);
        let mut headers = vec![
            ("authorization", bearer.as_str()),
            ("stripe-version", API_VERSION),
        ];
        if let Some(key) = idempotency_key {
            headers.push(("idempotency-key", key));
        }
        let (url, body) = if method == Method::GET {
            let query = encode_form(form);
            let url = if query.is_empty() {
                format!("{}{path}", self.base)
            } else {
                format!("{}{path}?{query}", self.base)
            };
            (url, Vec::new())
        } else {
            headers.push(("content-type", "application/x-www-form-urlencoded"));
            (
                format!("{}{path}", self.base),
                encode_form(form).into_bytes(),
            )
        };
        match tokio::time::timeout(self.timeout, self.http.send(method, &url, &headers, body)).await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(StripeError(error.to_string())),
            Err(_) => Err(StripeError(format!(
                "{url}: no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// `POST /v1/billing/meter_events` for one owed report.
    pub async fn meter_event(&self, entry: &Entry) -> Outcome {
        let value = entry.value.to_string();
        let timestamp = report_timestamp(entry);
        let timestamp = timestamp.to_string();
        let form = [
            ("event_name", entry.event_name.as_str()),
            (
                "payload[stripe_customer_id]",
                entry.provider_customer.as_str(),
            ),
            ("payload[value]", value.as_str()),
            ("identifier", entry.identifier.as_str()),
            ("timestamp", timestamp.as_str()),
        ];
        match self
            .call(
                Method::POST,
                "/v1/billing/meter_events",
                &form,
                Some(&entry.identifier),
            )
            .await
        {
            Ok(response) => classify(&response),
            Err(error) => Outcome::Retry {
                after: None,
                reason: error.0,
            },
        }
    }

    /// `POST /v1/checkout/sessions`: a subscription checkout of `price` for `customer` moving
    /// to `plan`. Returns the session id and URL.
    pub async fn checkout_session(
        &self,
        customer: &str,
        stripe_customer: Option<&str>,
        plan: &str,
        price: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> Result<(String, String), StripeError> {
        let metered = self.price_is_metered(price).await?;
        let mut form = vec![
            ("mode", "subscription"),
            ("line_items[0][price]", price),
            ("client_reference_id", customer),
            ("success_url", success_url),
            ("cancel_url", cancel_url),
            ("metadata[northstar_customer]", customer),
            ("metadata[plan]", plan),
            ("subscription_data[metadata][northstar_customer]", customer),
            ("subscription_data[metadata][plan]", plan),
        ];
        if !metered {
            form.push(("line_items[0][quantity]", "1"));
        }
        if let Some(id) = stripe_customer {
            form.push(("customer", id));
        }
        let response = self
            .call(Method::POST, "/v1/checkout/sessions", &form, None)
            .await?;
        let body = response.json();
        if !(200..300).contains(&response.status) {
            return Err(StripeError(format!(
                "checkout session: HTTP {}: {}",
                response.status,
                error_message(&body)
            )));
        }
        match (body["id"].as_str(), body["url"].as_str()) {
            (Some(id), url) => Ok((id.to_string(), url.unwrap_or_default().to_string())),
            _ => Err(StripeError("checkout session: answer without an id".into())),
        }
    }

    /// Whether `price` is metered (`GET /v1/prices/{price}`, looked up once per price): Stripe
    /// refuses a checkout that sets a quantity for a metered price, and needs one otherwise.
    pub async fn price_is_metered(&self, price: &str) -> Result<bool, StripeError> {
        if let Some(metered) = self
            .metered_prices
            .lock()
            .ok()
            .and_then(|m| m.get(price).copied())
        {
            return Ok(metered);
        }
        let path = format!(
            "/v1/prices/{}",
            percent_encoding::utf8_percent_encode(price, PATH_SEGMENT)
        );
        let response = self.call(Method::GET, &path, &[], None).await?;
        let body = response.json();
        if !(200..300).contains(&response.status) {
            return Err(StripeError(format!(
                "price {price}: HTTP {}: {}",
                response.status,
                error_message(&body)
            )));
        }
        let metered = body["recurring"]["usage_type"].as_str() == Some("metered");
        if let Ok(mut known) = self.metered_prices.lock() {
            known.insert(price.to_string(), metered);
        }
        Ok(metered)
    }

    /// `GET /v1/billing/meters`: (id, event_name) of every meter.
    pub async fn meters(&self) -> Result<Vec<(String, String)>, StripeError> {
        let mut meters = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![("limit", "100")];
            if let Some(last) = &after {
                query.push(("starting_after", last.as_str()));
            }
            let body = self.get_ok("/v1/billing/meters", &query).await?;
            let data = body["data"].as_array().cloned().unwrap_or_default();
            for meter in &data {
                if let (Some(id), Some(name)) = (meter["id"].as_str(), meter["event_name"].as_str())
                {
                    meters.push((id.to_string(), name.to_string()));
                }
            }
            after = data
                .last()
                .and_then(|m| m["id"].as_str())
                .map(str::to_string);
            if !body["has_more"].as_bool().unwrap_or(false) || after.is_none() {
                return Ok(meters);
            }
        }
    }

    /// The provider's total of `meter` for `customer` over [start, end) (unix seconds).
    pub async fn summary_total(
        &self,
        meter_id: &str,
        customer: &str,
        start: i64,
        end: i64,
    ) -> Result<f64, StripeError> {
        let path = format!("/v1/billing/meters/{meter_id}/event_summaries");
        let (start, end) = (start.to_string(), end.to_string());
        let mut total = 0.0;
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![
                ("customer", customer),
                ("start_time", start.as_str()),
                ("end_time", end.as_str()),
                ("limit", "100"),
            ];
            if let Some(last) = &after {
                query.push(("starting_after", last.as_str()));
            }
            let body = self.get_ok(&path, &query).await?;
            let data = body["data"].as_array().cloned().unwrap_or_default();
            total += data
                .iter()
                .filter_map(|s| s["aggregated_value"].as_f64())
                .sum::<f64>();
            after = data
                .last()
                .and_then(|s| s["id"].as_str())
                .map(str::to_string);
            if !body["has_more"].as_bool().unwrap_or(false) || after.is_none() {
                return Ok(total);
            }
        }
    }

    async fn get_ok(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, StripeError> {
        let response = self.call(Method::GET, path, query, None).await?;
        let body = response.json();
        if (200..300).contains(&response.status) {
            Ok(body)
        } else {
            Err(StripeError(format!(
                "GET {path}: HTTP {}: {}",
                response.status,
                error_message(&body)
            )))
        }
    }
}

/// The `timestamp` of a report: the window's start, moved into what Stripe accepts (within
/// the past 35 days: a correction of an older window is stamped 34 days before it was owed).
/// Fixed per entry, so every retry sends the very same parameters under its idempotency key.
pub(crate) fn report_timestamp(entry: &Entry) -> i64 {
    let oldest = entry.created_at.div_euclid(1_000_000) - 34 * 86_400;
    entry.window_start.div_euclid(1_000_000).max(oldest)
}

/// What an answer to a meter event means for the outbox.
pub(crate) fn classify(response: &ClientResponse) -> Outcome {
    let body = response.json();
    match response.status {
        200..=299 => Outcome::Delivered,
        429 => Outcome::Retry {
            after: retry_after(response),
            reason: "429 rate limited".into(),
        },
        // An identifier Stripe already has: the report is there.
        400 if is_repeat(&body) => Outcome::Delivered,
        // Idempotency-key clashes and lock timeouts are transient.
        409 => Outcome::Retry {
            after: None,
            reason: format!("409: {}", error_message(&body)),
        },
        status @ 400..=499 => Outcome::Rejected {
            status,
            message: error_message(&body),
        },
        status => Outcome::Retry {
            after: None,
            reason: format!("HTTP {status}: {}", error_message(&body)),
        },
    }
}

fn is_repeat(body: &Value) -> bool {
    let code = body["error"]["code"].as_str().unwrap_or_default();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    code == "resource_already_exists"
        || (message.contains("identifier") && message.contains("already"))
}

/// `Retry-After` in seconds, if the answer has one.
pub fn retry_after(response: &ClientResponse) -> Option<Duration> {
    response
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3_600.0)))
}

/// Stripe's `error.message`, or the body's text.
pub(crate) fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = body.to_string();
            text.chars().take(300).collect()
        })
}

/// `application/x-www-form-urlencoded`, as Stripe reads it.
pub fn encode_form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Longest `Stripe-Signature` header read: a timestamp and a few signatures (Stripe sends
/// one `v1` per active secret, two while one is rolled) fit many times over.
pub(crate) const MAX_SIGNATURE_HEADER_BYTES: usize = 2_048;
/// Most `v1` entries read from one header.
pub(crate) const MAX_SIGNATURES: usize = 8;

/// Why a webhook's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("missing Stripe-Signature header")]
    Missing,
    /// The header is not `t=…,v1=…`.
    #[error("Stripe-Signature must be t=<unix seconds>,v1=<hex>")]
    Malformed,
    /// The header is longer than anything Stripe sends.
    #[error("Stripe-Signature is {0} bytes; at most {MAX_SIGNATURE_HEADER_BYTES} are read")]
    TooLong(usize),
    /// More `v1` entries than anything Stripe sends.
    #[error("Stripe-Signature has {0} v1 entries; at most {MAX_SIGNATURES} are read")]
    TooManySignatures(usize),
    /// `t` is more than the tolerance away from now (seconds, saturated at the i64 bounds).
    #[error("Stripe-Signature timestamp is {0} s away from now (tolerance 300 s)")]
    Stale(i64),
    /// No `v1` matches.
    #[error("no v1 signature matches the payload")]
    Mismatch,
}

/// Verifies `Stripe-Signature`: some `v1` must be HMAC-SHA256(secret, "t.payload") and `t`
/// within `tolerance` seconds of `now` (seconds). The header's size and entries are bounded
/// before any work, the HMAC is computed once whatever the number of entries, and each entry
/// is compared with it in constant time: an unsigned request costs at most one pass over
/// its body.
pub(crate) fn verify_signature(
    header: Option<&str>,
    payload: &[u8],
    secret: &str,
    now: i64,
    tolerance: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    if header.len() > MAX_SIGNATURE_HEADER_BYTES {
        return Err(SignatureError::TooLong(header.len()));
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", hex)) => signatures.push(hex),
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if signatures.len() > MAX_SIGNATURES {
        return Err(SignatureError::TooManySignatures(signatures.len()));
    }
    let age = now.saturating_sub(t);
    if age.unsigned_abs() > tolerance.unsigned_abs() {
        return Err(SignatureError::Stale(age));
    }
    let expected = signature_of(payload, secret, t);
    let mut matched = subtle::Choice::from(0);
    for hex in signatures {
        if let Ok(tag) = hex::decode(hex) {
            matched |= expected.as_ref().ct_eq(&tag);
        }
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// HMAC-SHA256(secret, "t.payload"): what Stripe signs.
fn signature_of(payload: &[u8], secret: &str, t: i64) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(t.to_string().as_bytes());
    context.update(b".");
    context.update(payload);
    context.sign()
}

/// `t=…,v1=…` for `payload` (used by tests and the bench to play Stripe).
pub fn sign(payload: &[u8], secret: &str, t: i64) -> String {
    let tag = signature_of(payload, secret, t);
    format!("t={t},v1={}", hex::encode(tag.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_with_the_secret_and_in_time() {
        let body = br#"{"id":"evt_1"}"#;
        let header = sign(body, "whsec_x", 1_000);
        assert_eq!(
            verify_signature(Some(&header), body, "whsec_x", 1_100, 300),
            Ok(())
        );
        assert_eq!(
            verify_signature(Some(&header), body, "whsec_y", 1_100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(Some(&header), b"{}", "whsec_x", 1_100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(Some(&header), body, "whsec_x", 1_400, 300),
            Err(SignatureError::Stale(400))
        );
        assert_eq!(
            verify_signature(None, body, "whsec_x", 1_000, 300),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_signature(Some("v1=00"), body, "whsec_x", 1_000, 300),
            Err(SignatureError::Malformed)
        );
        // A second, rotated-secret signature next to the right one still passes.
        let both = format!("{header},v1=deadbeef");
        assert_eq!(
            verify_signature(Some(&both), body, "whsec_x", 1_000, 300),
            Ok(())
        );
    }

    #[test]
    fn many_signature_entries_are_refused_before_any_hmac() {
        let body = vec![b'x'; 1_000_000];
        let header = sign(&body, "whsec_x", 1_000);
        // The review's attack: 5,000 `v1` entries over a 1 MB body (one HMAC per entry, 3.6 s).
        let flood = format!("t=1000{}", ",v1=00".repeat(5_000));
        assert_eq!(
            verify_signature(Some(&flood), &body, "whsec_x", 1_000, 300),
            Err(SignatureError::TooLong(flood.len()))
        );
        // Within the length bound, past the entry bound.
        let many = format!("t=1000{}", ",v1=00".repeat(MAX_SIGNATURES + 1));
        assert!(many.len() <= MAX_SIGNATURE_HEADER_BYTES);
        let refused = verify_signature(Some(&many), &body, "whsec_x", 1_000, 300);
        assert_eq!(
            refused,
            Err(SignatureError::TooManySignatures(MAX_SIGNATURES + 1))
        );
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains(&format!("at most {MAX_SIGNATURES}"))
        );
        // As many entries as the bound, the right one last: one HMAC, compared with each.
        let wrong = ",v1=".to_string() + &"ab".repeat(32);
        let right = header.trim_start_matches("t=1000");
        let full = format!("t=1000{}{right}", wrong.repeat(MAX_SIGNATURES - 1));
        assert_eq!(
            verify_signature(Some(&full), &body, "whsec_x", 1_000, 300),
            Ok(())
        );
    }

    #[test]
    fn far_timestamps_are_stale_without_overflow() {
        let body = br#"{"id":"evt_1"}"#;
        let times = [
            i64::MAX,
            i64::MAX - 10,
            i64::MIN,
            i64::MIN + 1,
            -1,
            0,
            1_700_000_000,
        ];
        for t in times {
            let header = sign(body, "whsec_x", t);
            for now in times {
                let apart = (i128::from(now) - i128::from(t)).abs();
                let verdict = verify_signature(Some(&header), body, "whsec_x", now, 300);
                if apart > 300 {
                    assert!(
                        matches!(verdict, Err(SignatureError::Stale(_))),
                        "t={t} now={now}: {verdict:?}"
                    );
                } else {
                    assert_eq!(verdict, Ok(()), "t={t} now={now}");
                }
            }
        }
        // Past i64 (u64::MAX and beyond) is not a timestamp at all.
        for t in [
            "18446744073709551615",
            "99999999999999999999999",
            "-",
            "1e9",
        ] {
            let header = format!("t={t},v1={}", "00".repeat(32));
            assert_eq!(
                verify_signature(Some(&header), body, "whsec_x", 1_000, 300),
                Err(SignatureError::Malformed),
                "t={t}"
            );
        }
    }

    #[test]
    fn old_windows_are_stamped_within_stripes_35_days_and_the_same_on_every_retry() {
        let day = 86_400_000_000;
        let entry = Entry {
            identifier: "ns:a:api:0:1".into(),
            customer_id: "a".into(),
            provider_customer: "cus_a".into(),
            feature: "api".into(),
            event_name: "api".into(),
            value: 1,
            window_start: 0,
            window_end: 3_600_000_000,
            revision: 1,
            created_at: 100 * day,
        };
        assert_eq!(report_timestamp(&entry), 66 * 86_400);
        let recent = Entry {
            window_start: 99 * day,
            ..entry
        };
        assert_eq!(report_timestamp(&recent), 99 * 86_400);
    }

    #[test]
    fn forms_are_encoded_like_stripe_reads_them() {
        assert_eq!(
            encode_form(&[("payload[value]", "3"), ("identifier", "ns:a b:1")]),
            // A space is `+`, as every form reader (Stripe's included) decodes it.
            "payload%5Bvalue%5D=3&identifier=ns%3Aa+b%3A1"
        );
    }
}
