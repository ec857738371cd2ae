//! A `tower` layer for a service's own API: every request is checked (or consumes a unit)
//! against northstar's limits API before it reaches the service, and a request past the
//! customer's limit is answered 402 with northstar's upgrade payload, by the layer itself.
//!
//! ```no_run
//! use northstar::gateway::{GatewayOptions, UsageLayer};
//! use tower_layer::Layer;
//! # fn wrap<S>(my_service: S) -> northstar::gateway::UsageMeter<S> {
//! let layer = UsageLayer::new(
//!     "http://127.0.0.1:7070",
//!     "service-key-0123456789",
//!     GatewayOptions::consume("api_requests"),
//! );
//! layer.layer(my_service)
//! # }
//! ```
//!
//! The customer comes from a request header (`x-customer-id` unless set otherwise). In check
//! mode (no consume), an allowed answer is kept for `cache_ttl` per customer, for at most
//! `cache_entries` customers, so a busy customer costs one call per interval; a consuming
//! layer calls on every request, as each takes a unit. When northstar cannot answer (down,
//! shedding), the layer answers 503 with `Retry-After`, unless `fail_open` lets requests
//! through. `examples/gateway.rs` runs one in front of a small service.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use serde_json::json;
use tower_layer::Layer;
use tower_service::Service;

use crate::client::HttpClient;

/// What the layer checks, and how.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// The feature each request counts for (`usageFeatures[].id`).
    pub feature: String,
    /// Units one request takes or needs.
    pub quantity: u64,
    /// Take the units (`consume: true`), or only check that they are there.
    pub consume: bool,
    /// The request header that names the customer.
    pub customer_header: HeaderName,
    /// How long an allowed answer is kept, in check mode (zero: never kept).
    pub cache_ttl: Duration,
    /// Customers whose allowed answer is kept at once.
    pub cache_entries: usize,
    /// Let requests through when northstar cannot answer, instead of 503.
    pub fail_open: bool,
}

impl GatewayOptions {
    /// Each request takes one unit of `feature`.
    pub fn consume(feature: &str) -> Self {
        Self {
            consume: true,
            ..Self::check(feature)
        }
    }

    /// Each request needs one unit of `feature` left, and takes none (the usage is metered
    /// from the events the service sends); allowed answers are kept for a second.
    pub fn check(feature: &str) -> Self {
        Self {
            feature: feature.to_string(),
            quantity: 1,
            consume: false,
            customer_header: HeaderName::from_static("x-customer-id"),
            cache_ttl: Duration::from_secs(1),
            cache_entries: 10_000,
            fail_open: false,
        }
    }
}

/// Wraps a service in a [`UsageMeter`].
#[derive(Clone)]
pub struct UsageLayer {
    shared: Arc<Shared>,
}

impl UsageLayer {
    /// A layer that asks the northstar at `base_url` with `service_key`.
    pub fn new(base_url: &str, service_key: &str, options: GatewayOptions) -> Self {
        Self {
            shared: Arc::new(Shared {
                client: HttpClient::new(),
                check_url: format!("{}/v1/check", base_url.trim_end_matches('/')),
                bearer: format!("Bearer {service_key}"),
                options,
                allowed: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl<S> Layer<S> for UsageLayer {
    type Service = UsageMeter<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UsageMeter {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// A service behind the limits API: see the module's documentation.
#[derive(Clone)]
pub struct UsageMeter<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    client: HttpClient,
    check_url: String,
    bearer: String,
    options: GatewayOptions,
    /// Customers allowed in check mode, until when.
    allowed: Mutex<HashMap<String, Instant>>,
}

/// The layer's own answer to a request that does not reach the service.
type Answer = Response<Full<Bytes>>;

impl Shared {
    /// `None` lets the request through; `Some` is the answer instead of the service's.
    async fn decide(&self, customer: Option<&HeaderValue>) -> Option<Answer> {
        let header = &self.options.customer_header;
        let Some(customer) = customer
            .and_then(|v| v.to_str().ok())
            .filter(|c| !c.is_empty())
        else {
            return Some(json_answer(
                StatusCode::BAD_REQUEST,
                &json!({"code": "missing_customer", "message": format!("send the customer's id in the {header} header")}),
            ));
        };
        if self.fresh(customer) {
            return None;
        }
        let body = json!({
            "customer_id": customer,
            "feature": self.options.feature,
            "quantity": self.options.quantity,
            "consume": self.options.consume,
        });
        let answer = self
            .client
            .post_json(&self.check_url, &[("authorization", &self.bearer)], &body)
            .await;
        match answer {
            Ok(answer) if answer.status == 200 => {
                self.remember(customer);
                None
            }
            // Past the limit (402, with the upgrade payload) or suspended (403): northstar's
            // answer is the answer.
            Ok(answer) if matches!(answer.status, 402 | 403) => Some(forward(answer)),
            Ok(answer) if matches!(answer.status, 429 | 503) || answer.status >= 500 => {
                let retry = answer
                    .headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("1")
                    .to_string();
                self.unavailable(
                    &format!("the limits API answered {}", answer.status),
                    &retry,
                )
            }
            // A wrong key, feature or customer id: the layer's set-up, said as it is.
            Ok(answer) => {
                tracing::warn!(status = answer.status, body = %answer.text(), "the limits API refused the gateway's check");
                Some(forward(answer))
            }
            Err(error) => self.unavailable(&error.to_string(), "1"),
        }
    }

    fn unavailable(&self, why: &str, retry_after: &str) -> Option<Answer> {
        if self.options.fail_open {
            tracing::warn!(%why, "usage not checked; letting the request through (fail_open)");
            return None;
        }
        let mut answer = json_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"code": "usage_meter_unavailable", "message": format!("usage could not be checked: {why}")}),
        );
        if let Ok(value) = HeaderValue::from_str(retry_after) {
            answer.headers_mut().insert(header::RETRY_AFTER, value);
        }
        Some(answer)
    }

    /// Whether `customer` was allowed within `cache_ttl` (check mode only).
    fn fresh(&self, customer: &str) -> bool {
        if self.options.consume || self.options.cache_ttl.is_zero() {
            return false;
        }
        let Ok(allowed) = self.allowed.lock() else {
            return false;
        };
        allowed
            .get(customer)
            .is_some_and(|until| *until > Instant::now())
    }

    fn remember(&self, customer: &str) {
        if self.options.consume || self.options.cache_ttl.is_zero() {
            return;
        }
        let Ok(mut allowed) = self.allowed.lock() else {
            return;
        };
        let now = Instant::now();
        if allowed.len() >= self.options.cache_entries {
            allowed.retain(|_, until| *until > now);
        }
        if allowed.len() < self.options.cache_entries || allowed.contains_key(customer) {
            allowed.insert(customer.to_string(), now + self.options.cache_ttl);
        }
    }
}

fn json_answer(status: StatusCode, body: &serde_json::Value) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(body.to_string())));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

/// northstar's answer, passed on with its status, body and `Retry-After`.
fn forward(answer: crate::client::ClientResponse) -> Answer {
    let mut forwarded = Response::new(Full::new(answer.body.clone()));
    *forwarded.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(value) = answer.headers.get(&name) {
            forwarded.headers_mut().insert(name, value.clone());
        }
    }
    forwarded
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for UsageMeter<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The service made ready is the one that takes the request; its clone stays.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let shared = self.shared.clone();
        Box::pin(async move {
            let customer = request
                .headers()
                .get(&shared.options.customer_header)
                .cloned();
            match shared.decide(customer.as_ref()).await {
                None => inner
                    .call(request)
                    .await
                    .map(|answer| answer.map(Either::Left)),
                Some(answer) => Ok(answer.map(Either::Right)),
            }
        })
    }
}
