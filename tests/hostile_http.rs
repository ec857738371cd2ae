//! Attacks on the HTTP layer itself, each as a security review wrote it: slow bodies and
//! socket floods that would take every route down, declared bodies over a route's bound,
//! Stripe webhooks built to burn CPU or to be retried for ever, and a slow Stripe that would
//! serialise every 402. Each test asserts a bound the server enforces, never raw speed.

mod harness;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::billing::{billing_config, checkout_completed, send_as, stripe_webhook};
use harness::stripe::{FakeStripe, Faults, WEBHOOK_SECRET};
use harness::{Nats, Northstar, SERVICE_KEY, eventually, test_config, tracks};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The loopback address the test's own, well-behaved requests come from.
const GOOD_CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// What a raw socket got back: the status of the first answer, if any, and its text.
#[derive(Debug)]
struct RawAnswer {
    status: Option<u16>,
    text: String,
}

/// The server's address, from its base URL.
fn addr_of(server: &Northstar) -> SocketAddr {
    server
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("the server listens on an IP address")
}

/// A connection to `server` from the loopback address `from` (all of 127/8 is local on
/// Linux), so one test can play several clients.
async fn connect_from(from: Ipv4Addr, server: &Northstar) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    socket.connect(addr_of(server)).await.expect("connect")
}

/// Sends the request line and headers of a request announcing `content_length` body bytes,
/// and no body: the slow-body attack.
async fn announce_body(stream: &mut TcpStream, method: &str, path: &str, content_length: u64) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: northstar\r\ncontent-type: application/json\r\n\
         content-length: {content_length}\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the headers");
}

/// Reads what the server sends until it closes the connection (or 30 s pass: a generous
/// bound of the test, far past every bound of the server it checks).
async fn read_until_closed(stream: &mut TcpStream) -> RawAnswer {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut bytes)).await;
    assert!(
        read.is_ok(),
        "the server neither answered nor closed within 30 s; got {:?}",
        String::from_utf8_lossy(&bytes)
    );
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    RawAnswer { status, text }
}

/// One whole `GET path` from `from`, answered and closed.
async fn get_from(from: Ipv4Addr, server: &Northstar, path: &str) -> RawAnswer {
    let mut stream = connect_from(from, server).await;
    let request = format!("GET {path} HTTP/1.1\r\nhost: northstar\r\nconnection: close\r\n\r\n");
    // A refused connection may be closed before the request is written.
    let _ = stream.write_all(request.as_bytes()).await;
    read_until_closed(&mut stream).await
}

/// The test config with `ingest` bounds of the test's choosing.
fn config_with_ingest(ingest: Value) -> Value {
    let mut config = test_config();
    for (key, value) in ingest.as_object().cloned().unwrap_or_default() {
        config["ingest"][key] = value;
    }
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_bodies_hold_no_request_place_and_get_408() {
    let concurrent = 8;
    let slow = 3 * concurrent;
    let nats = Nats::start();
    let server = Northstar::start(
        &nats,
        &config_with_ingest(json!({
            "maxConcurrentRequests": concurrent,
            "maxRequestsPerClient": slow,
            // Long enough that a busy machine has read every slow request's head well before
            // the first of them times out.
            "bodyTimeout": "20s",
        })),
    );
    // The review's attack from another address: request lines and `Content-Length: 400000`,
    // then nothing, on ingest, in-memory and webhook routes alike.
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let routes = [
        "/v1/batch",
        "/v1/check",
        "/v1/sql",
        "/v1/webhooks/stripe",
        "/batch/",
    ];
    let mut sockets = Vec::new();
    for i in 0..slow {
        let mut stream = connect_from(attacker, &server).await;
        announce_body(&mut stream, "POST", routes[i % routes.len()], 400_000).await;
        sockets.push(stream);
    }
    // Every slow request is in progress once the attacker's next one meets its client bound.
    // A probe can reach the server before the last slow heads are read and take a place, so
    // that one slow request is refused instead: such a socket is answered at once, and is
    // replaced by a new slow one before the next probe.
    let refused = eventually(Duration::from_secs(15), async || {
        for (i, stream) in sockets.iter_mut().enumerate() {
            let mut byte = [0u8; 1];
            match stream.try_read(&mut byte) {
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => {
                    *stream = connect_from(attacker, &server).await;
                    announce_body(stream, "POST", routes[i % routes.len()], 400_000).await;
                }
            }
        }
        let answer = get_from(attacker, &server, "/healthz").await;
        match answer.status {
            Some(429) => Ok(answer),
            _ => Err(answer.text),
        }
    })
    .await;
    assert!(
        refused.text.to_ascii_lowercase().contains("retry-after: "),
        "{}",
        refused.text
    );
    assert!(
        refused.text.contains("maxRequestsPerClient"),
        "{}",
        refused.text
    );

    // Meanwhile everyone else is served: health, metrics and a real ingest POST.
    let health = server.get("/healthz").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(server.get("/metrics").await.status, 200);
    let ingest = server
        .post(
            "/v1/batch",
            &json!({"batch": tracks("past-slow-bodies", 0..5)}),
        )
        .await;
    assert_eq!(ingest.status, 200, "{}", ingest.text());
    assert_eq!(ingest.json()["accepted"], 5, "{}", ingest.text());

    // Each slow body gets 408 at the body timeout, and its connection is closed.
    for (i, stream) in sockets.iter_mut().enumerate() {
        let answer = read_until_closed(stream).await;
        assert_eq!(answer.status, Some(408), "slow socket {i}: {}", answer.text);
        assert!(answer.text.contains("body_timeout"), "{}", answer.text);
    }
    // Their places are given back.
    eventually(Duration::from_secs(5), async || {
        let answer = get_from(attacker, &server, "/healthz").await;
        match answer.status {
            Some(200) => Ok(()),
            _ => Err(answer.text),
        }
    })
    .await;
    server.wait_archived(5).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_cannot_hold_every_connection() {
    let bound = 4;
    let nats = Nats::start();
    let server = Northstar::start(
        &nats,
        &config_with_ingest(json!({"maxConnectionsPerClient": bound, "bodyTimeout": "30s"})),
    );
    let greedy = Ipv4Addr::new(127, 0, 0, 3);
    let mut held = Vec::new();
    for _ in 0..bound {
        let mut stream = connect_from(greedy, &server).await;
        announce_body(&mut stream, "POST", "/v1/batch", 400_000).await;
        held.push(stream);
    }
    // Connections past the bound are closed at once, with no answer (accepted in order, so
    // these come after the held ones).
    for extra in 0..2 {
        let answer = get_from(greedy, &server, "/healthz").await;
        assert_eq!(
            answer.status, None,
            "connection {extra} past the bound: {}",
            answer.text
        );
    }
    // Other clients are served meanwhile.
    let health = get_from(GOOD_CLIENT, &server, "/healthz").await;
    assert_eq!(health.status, Some(200), "{}", health.text);
    // Once the greedy client lets go, it is served again.
    drop(held);
    eventually(Duration::from_secs(10), async || {
        let answer = get_from(greedy, &server, "/healthz").await;
        match answer.status {
            Some(200) => Ok(()),
            _ => Err(answer.text),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_bodies_over_a_routes_bound_get_413_before_any_read() {
    let nats = Nats::start();
    // Timers far past the test's own read bound: only an answer given before reading passes.
    let server = Northstar::start(
        &nats,
        &config_with_ingest(json!({"bodyTimeout": "60s", "requestTimeout": "120s"})),
    );
    let small = (1024 * 1024).to_string();
    let batch = (500 * 1024).to_string();
    let posthog = (500 * 1024 / 3 * 4 + 4_096).to_string();
    for (method, path, limit) in [
        ("POST", "/v1/sql", small.as_str()),
        ("POST", "/v1/check", small.as_str()),
        ("POST", "/v1/webhooks/stripe", small.as_str()),
        ("GET", "/healthz", small.as_str()),
        ("POST", "/v1/batch", batch.as_str()),
        ("POST", "/v1/track", batch.as_str()),
        ("POST", "/batch/", posthog.as_str()),
    ] {
        let mut stream = connect_from(GOOD_CLIENT, &server).await;
        announce_body(&mut stream, method, path, 10_000_000_000).await;
        let answer = read_until_closed(&mut stream).await;
        assert_eq!(answer.status, Some(413), "{method} {path}: {}", answer.text);
        assert!(
            answer.text.contains("payload_too_large")
                && answer.text.contains(&format!("at most {limit} bytes")),
            "{method} {path}: the answer names the limit: {}",
            answer.text
        );
    }
    assert_eq!(server.get("/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn stripe_webhooks_refuse_signature_floods_and_bad_ids_with_4xx() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = harness::billing::start(&nats, &billing_config(&fake.base()));
    let now = northstar::clock::system_micros() / 1_000_000;
    let sign = |body: &[u8]| northstar::billing::stripe::sign(body, WEBHOOK_SECRET, now);

    // A 1 MB body with 5,000 `v1` entries: refused on the header's size, before any HMAC.
    let big = vec![b' '; 1_000_000];
    let flood = format!("t={now}{}", format!(",v1={}", "0".repeat(64)).repeat(5_000));
    let answer = stripe_webhook(&server, Some(&flood), &big).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(
        answer.json()["code"],
        "invalid_signature",
        "{}",
        answer.text()
    );

    // Signed events whose ids carry control characters: 400 naming the field (a 503 would
    // have Stripe retry them for days).
    let mut stripe_customer: Value =
        serde_json::from_slice(&checkout_completed("evt_ctl_3", "cs_ctl_3", "fine", "pro"))
            .expect("a JSON event");
    stripe_customer["data"]["object"]["customer"] = json!("cus_\u{1b}[2J");
    let mut subscription: Value = serde_json::from_slice(&harness::billing::subscription_event(
        "evt_ctl_2",
        "customer.subscription.updated",
        "fine",
        "price_pro",
    ))
    .expect("a JSON event");
    subscription["data"]["object"]["metadata"]["northstar_customer"] = json!("line\nbreak");
    let bad_ids = [
        (
            checkout_completed("evt_ctl_1", "cs_ctl_1", "evil\u{7}customer", "pro"),
            "data.object.metadata.northstar_customer",
        ),
        (
            subscription.to_string().into_bytes(),
            "data.object.metadata.northstar_customer",
        ),
        (
            stripe_customer.to_string().into_bytes(),
            "data.object.customer",
        ),
    ];
    for (body, field) in bad_ids {
        let answer = stripe_webhook(&server, Some(&sign(&body)), &body).await;
        assert_eq!(answer.status, 400, "{field}: {}", answer.text());
        let refusal = answer.json();
        assert_eq!(refusal["code"], "invalid_event", "{refusal}");
        let message = refusal["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(field) && message.contains("control characters"),
            "{refusal}"
        );
    }

    // A good event is applied as before.
    let good = checkout_completed("evt_ok_1", "cs_ok_1", "fine", "pro");
    let answer = stripe_webhook(&server, Some(&sign(&good)), &good).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(harness::billing::plan_of(&server, "fine").await, "pro");
}

/// A stand-in for Stripe that answers every call only after `delay`, Checkout Sessions with
/// `cs_slow_<n>`; it records which customers asked for a session.
struct SlowStripe {
    base: String,
    checkouts: Arc<Mutex<Vec<String>>>,
}

impl SlowStripe {
    async fn start(delay: Duration) -> Self {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the slow Stripe");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let checkouts = Arc::new(Mutex::new(Vec::new()));
        let seen = checkouts.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let is_checkout = request.uri().path() == "/v1/checkout/sessions";
                            let form = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let form = String::from_utf8_lossy(&form).into_owned();
                            let answer = if is_checkout {
                                let customer = form
                                    .split('&')
                                    .find_map(|pair| pair.strip_prefix("client_reference_id="))
                                    .unwrap_or_default()
                                    .to_string();
                                let n = {
                                    let mut seen = seen.lock().unwrap();
                                    seen.push(customer);
                                    seen.len()
                                };
                                json!({"id": format!("cs_slow_{n}"),
                                       "url": format!("https://checkout.stripe.test/c/pay/cs_slow_{n}")})
                            } else {
                                json!({})
                            };
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(answer.to_string())),
                            ))
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Self { base, checkouts }
    }

    /// The customers Checkout Sessions were asked for, in order.
    fn checkouts(&self) -> Vec<String> {
        self.checkouts.lock().unwrap().clone()
    }
}

/// `POST /v1/check` of 21 API requests: over the free plan's 20, so a 402.
async fn over_the_limit(server: &Northstar, customer: &str) -> (Duration, u16, Value) {
    let started = Instant::now();
    let body = json!({"customer_id": customer, "feature": "api_requests", "quantity": 21});
    let answer = send_as(
        server,
        SERVICE_KEY,
        http::Method::POST,
        "/v1/check",
        Some(&body),
    )
    .await;
    (started.elapsed(), answer.status, answer.json())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_stripe_delays_no_402() {
    let request_timeout = Duration::from_secs(2);
    let stripe = SlowStripe::start(Duration::from_secs(5)).await;
    let mut config = billing_config(&stripe.base);
    // Stripe calls may take 20 s; a request 2 s.
    config["billing"]["timeout"] = json!("20s");
    config["ingest"]["requestTimeout"] = json!("2s");
    let nats = Nats::start();
    let server = harness::billing::start(&nats, &config);

    // Five customers at their limit at once, and one of them twice.
    let customers = ["slow-a", "slow-b", "slow-c", "slow-d", "slow-e", "slow-a"];
    let answers =
        futures::future::join_all(customers.iter().map(|c| over_the_limit(&server, c))).await;
    for (customer, (took, status, body)) in customers.iter().zip(&answers) {
        assert_eq!(*status, 402, "{customer}: {body}");
        assert!(
            *took < request_timeout * 2,
            "{customer}: the 402 took {took:?}, past twice the request time limit"
        );
        let upgrade = &body["upgrade"];
        assert_eq!(upgrade["plan"], "pro", "{customer}: {upgrade}");
        assert!(
            upgrade["checkout_url"].is_null(),
            "{customer}: Stripe has not answered yet: {upgrade}"
        );
    }

    // The calls went on without the requests: a later 402 carries the session, made once
    // per customer.
    let session = eventually(Duration::from_secs(30), async || {
        let (_, status, body) = over_the_limit(&server, "slow-a").await;
        match body["upgrade"]["checkout_url"].as_str() {
            Some(url) if status == 402 => Ok(url.to_string()),
            _ => Err(body.to_string()),
        }
    })
    .await;
    assert!(session.starts_with("https://checkout.stripe.test/c/pay/cs_slow_"));
    let mut asked = stripe.checkouts();
    asked.sort();
    assert_eq!(asked, ["slow-a", "slow-b", "slow-c", "slow-d", "slow-e"]);
}
