//! The `tower` layer (`northstar::gateway`) in front of a service, against a real server's
//! limits API: consumes per request, answers 402 with the upgrade payload itself, keeps
//! allowed answers in check mode, and says when the meter cannot answer.

mod harness;

use std::convert::Infallible;
use std::future::{Ready, poll_fn, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use northstar::clock::Clock;
use northstar::gateway::{GatewayOptions, UsageLayer};
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use harness::{InProcess, Nats, SERVICE_KEY, limits_config};

/// The service behind the layer: counts the requests that reach it.
#[derive(Clone, Default)]
struct Counted(Arc<AtomicUsize>);

impl Service<Request<()>> for Counted {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"served")))))
    }
}

/// Sends one request for `customer` through `service`: its status, `Retry-After` and body.
async fn send<S, B>(service: &mut S, customer: Option<&str>) -> (u16, Option<String>, Value)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
    let mut request = Request::builder().uri("/search");
    if let Some(customer) = customer {
        request = request.header("x-customer-id", customer);
    }
    let answer = service.call(request.body(()).unwrap()).await.unwrap();
    let status = answer.status().as_u16();
    let retry = answer
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    (status, retry, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_layer_consumes_per_request_and_answers_past_the_limit_itself() {
    let nats = Nats::start();
    let mut server = InProcess::start(&nats, &limits_config(), Clock::system()).await;
    let reached = Counted::default();

    // Each request takes 5 of the free plan's 20 api_requests.
    let options = GatewayOptions {
        quantity: 5,
        ..GatewayOptions::consume("api_requests")
    };
    let mut consuming = UsageLayer::new(&server.base, SERVICE_KEY, options).layer(reached.clone());
    for _ in 0..4 {
        let (status, _, body) = send(&mut consuming, Some("acme")).await;
        assert_eq!((status, body), (200, Value::String("served".into())));
    }
    let (status, _, body) = send(&mut consuming, Some("acme")).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "usage_limit_exceeded", "{body}");
    assert!(body["upgrade"]["subscription_url"].is_string(), "{body}");
    assert_eq!(
        reached.0.load(Ordering::SeqCst),
        4,
        "the 402 never reached the service"
    );
    let used = server
        .get_as(SERVICE_KEY, "/v1/customers/acme/entitlements/api_requests")
        .await;
    assert_eq!(used.json()["used"], 20, "{}", used.text());

    let (status, _, body) = send(&mut consuming, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("missing_customer"))
    );
    assert_eq!(reached.0.load(Ordering::SeqCst), 4);

    // Check mode keeps an allowed answer: with the server gone, a customer allowed a moment
    // ago still passes, another gets 503 with Retry-After, and fail_open lets it through.
    let options = GatewayOptions {
        cache_ttl: Duration::from_secs(300),
        ..GatewayOptions::check("api_requests")
    };
    let mut checking = UsageLayer::new(&server.base, SERVICE_KEY, options).layer(reached.clone());
    assert_eq!(send(&mut checking, Some("hooli")).await.0, 200);
    let base = server.base.clone();
    server.stop().await;
    assert_eq!(send(&mut checking, Some("hooli")).await.0, 200, "kept");
    let (status, retry, body) = send(&mut checking, Some("initech")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "usage_meter_unavailable");
    assert_eq!(retry.as_deref(), Some("1"));
    let options = GatewayOptions {
        fail_open: true,
        ..GatewayOptions::check("api_requests")
    };
    let mut open = UsageLayer::new(&base, SERVICE_KEY, options).layer(reached.clone());
    assert_eq!(send(&mut open, Some("initech")).await.0, 200);
    assert_eq!(reached.0.load(Ordering::SeqCst), 7);
}
