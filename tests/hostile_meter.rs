//! Attacks on the meter by a write key or a service key, replayed as they were found: each is
//! refused or harmless, the server stays healthy and every good event is kept.

mod harness;

use std::time::Duration;

use harness::{ADMIN_KEY, InProcess, Nats, SERVICE_KEY, WRITE_KEY, limits_config};
use northstar::clock::Clock;
use serde_json::{Value, json};

/// 2026-03-10T12:00:00Z in microseconds.
const MARCH_10: i64 = 1_773_144_000_000_000;
/// `Decimal::MAX`: what ingest took as a quantity before the bounds.
const DECIMAL_MAX: &str = "79228162514264337593543950335";

fn call(id: &str, customer: &str, at: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": format!("{customer}-user"), "event": "api_call_made",
           "timestamp": at, "context": {"groupId": customer}, "properties": {"endpoint": "/x"}})
}

fn storage(id: &str, customer: &str, gb: Value) -> Value {
    json!({"type": "track", "messageId": id, "userId": "u", "event": "storage_used",
           "timestamp": "2026-03-10T10:00:00Z", "context": {"groupId": customer}, "properties": {"gb": gb}})
}

/// Publishes messages straight to the stream, as events stored before today's bounds were.
async fn publish_directly(nats_url: &str, messages: &[Value]) {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    for message in messages {
        let record = northstar::ingest::segment::normalize(
            message.as_object().cloned().expect("object"),
            None,
            Default::default(),
            "test",
            MARCH_10,
        )
        .expect("normalises");
        js.publish("events.0.track", record.to_bus_json().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
}

async fn check(server: &InProcess, body: Value) -> (u16, Value) {
    let r = server.post_as(SERVICE_KEY, "/v1/check", &body).await;
    (r.status, r.json())
}

async fn used(server: &InProcess, customer: &str, feature: &str, want: f64) -> Value {
    let path = format!("/v1/customers/{customer}/entitlements/{feature}");
    harness::eventually(Duration::from_secs(20), async || {
        let body = server.get_as(SERVICE_KEY, &path).await.json();
        match body["used"].as_f64() == Some(want) {
            true => Ok(body),
            false => Err(format!("{path} answered {body}")),
        }
    })
    .await
}

/// The report of `POST /v1/usage/verify` once it answers (it waits for a quiet moment).
async fn verified(server: &InProcess) -> Value {
    harness::eventually(Duration::from_secs(30), async || {
        let r = server
            .post_as(ADMIN_KEY, "/v1/usage/verify", &json!({}))
            .await;
        match r.status {
            200 => Ok(r.json()),
            status => Err(format!("verify answered {status}: {}", r.text())),
        }
    })
    .await
}

async fn assert_healthy(server: &InProcess) {
    let health = server.get_as(SERVICE_KEY, "/healthz").await;
    assert_eq!(health.status, 200, "{}", health.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn quantities_at_decimal_max_are_refused_and_stored_ones_cannot_stop_the_meter() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let huge = vec![
        storage("huge-1", "mallory", json!(DECIMAL_MAX)),
        storage("huge-2", "mallory", json!(DECIMAL_MAX)),
        storage("fine-1", "mallory", json!("0.0000000001")),
    ];
    let answer = server
        .post("/v1/batch", &json!({"batch": huge}))
        .await
        .json();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["rejected"], 2, "{answer}");
    for error in answer["errors"].as_array().expect("errors") {
        assert_eq!(error["field"], "properties.gb");
        assert!(
            error["message"].as_str().unwrap_or("").contains("at most"),
            "{error}"
        );
    }
    let places = server
        .post(
            "/v1/batch",
            &json!({"batch": [storage("tiny", "mallory", json!("0.00000000001"))]}),
        )
        .await
        .json();
    assert_eq!(places["rejected"], 1, "eleven decimal places: {places}");

    // The same two were stored before the bounds existed: the followers must not panic.
    publish_directly(&nats.url, &huge[..2]).await;
    let good = vec![
        call("after-1", "acme", "2026-03-10T11:00:00Z"),
        call("after-2", "acme", "2026-03-10T11:00:00Z"),
    ];
    server.send_batch(good).await;
    used(&server, "acme", "api_requests", 2.0).await;
    harness::wait_archived(&server.data, 5).await;
    assert_healthy(&server).await;
    let (status, _) = check(
        &server,
        json!({"customer_id": "mallory", "feature": "storage_gb", "quantity": 1}),
    )
    .await;
    assert!(
        matches!(status, 402 | 403),
        "a saturated counter refuses: {status}"
    );
    // A quantity near Decimal::MAX in a check is a 400, not a dropped connection.
    let (status, body) = check(
        &server,
        json!({"customer_id": "acme", "feature": "api_requests", "quantity": DECIMAL_MAX}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("quantity"));
    assert_healthy(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn far_future_events_cannot_erase_the_current_period() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let batch: Vec<Value> = (0..5)
        .map(|i| call(&format!("now-{i}"), "acme", "2026-03-10T10:00:00Z"))
        .collect();
    server.send_batch(batch).await;
    used(&server, "acme", "api_requests", 5.0).await;
    let over = json!({"customer_id": "acme", "feature": "api_requests", "quantity": 16});
    assert_eq!(check(&server, over.clone()).await.0, 402);

    let future = vec![
        call("future-1", "acme", "2099-01-15T00:00:00Z"),
        call("future-2", "acme", "2099-06-15T00:00:00Z"),
    ];
    let answer = server
        .post("/v1/batch", &json!({"batch": future}))
        .await
        .json();
    assert_eq!(answer["rejected"], 2, "{answer}");
    assert_eq!(answer["errors"][0]["field"], "timestamp");
    // Within the skew is taken: a client clock a little ahead is no attack.
    let ahead = server
        .post(
            "/v1/batch",
            &json!({"batch": [call("ahead-1", "acme", "2026-03-10T18:00:00Z")]}),
        )
        .await
        .json();
    assert_eq!(ahead["accepted"], 1, "{ahead}");
    used(&server, "acme", "api_requests", 6.0).await;
    assert_eq!(check(&server, over.clone()).await.0, 402, "still refused");
    for i in 0..3 {
        let consume = json!({"customer_id": "acme", "feature": "api_requests", "quantity": 1000,
                             "consume": true, "event_id": format!("big-{i}")});
        assert_eq!(check(&server, consume).await.0, 402);
    }

    // Events that reach the stream some other way can still move the meter past the current
    // period; `usage verify` must then see what SQL sees and say so.
    publish_directly(
        &nats.url,
        &[
            call("bypass-1", "acme", "2099-01-15T00:00:00Z"),
            call("bypass-2", "acme", "2099-06-15T00:00:00Z"),
        ],
    )
    .await;
    used(&server, "acme", "api_requests", 0.0).await;
    harness::wait_archived(&server.data, 8).await;
    let report = server
        .post_as(ADMIN_KEY, "/v1/usage/verify", &json!({}))
        .await
        .json();
    assert_eq!(report["ok"], false, "{report}");
    let mismatch = &report["mismatches"][0];
    assert_eq!(mismatch["customer_id"], "acme", "{report}");
    assert_eq!(mismatch["events"], "6", "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn consume_ids_are_checked_and_a_retry_counts_once() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let consume = |id: &str| json!({"customer_id": "acme", "feature": "api_requests", "quantity": 1, "consume": true, "event_id": id});
    // An id that cannot be a NATS header is refused before any unit is reserved.
    let (status, body) = check(&server, consume("line\nbreak")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("event_id"));
    let (status, _) = check(&server, consume(&"x".repeat(300))).await;
    assert_eq!(status, 400, "an oversized event_id");
    let (status, _) = check(
        &server,
        json!({"customer_id": "bad\u{7}id", "feature": "api_requests"}),
    )
    .await;
    assert_eq!(status, 400, "a customer id ingest would refuse");
    let standing = server
        .get_as(SERVICE_KEY, "/v1/customers/acme/entitlements/api_requests")
        .await
        .json();
    assert_eq!(standing["used"], 0.0, "nothing reserved: {standing}");

    // The same consume three times: once right after the first, twice after it was applied.
    assert_eq!(check(&server, consume("retry-1")).await.0, 200);
    assert_eq!(check(&server, consume("retry-1")).await.0, 200);
    used(&server, "acme", "api_requests", 1.0).await;
    let (status, body) = check(&server, consume("retry-1")).await;
    assert_eq!(status, 200);
    assert_eq!(body["used"], 1.0, "a retry counts once: {body}");
    harness::wait_archived(&server.data, 1).await;
    used(&server, "acme", "api_requests", 1.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_bodies_are_kept_and_write_keys_never_stored() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    // 300 KB of control bytes: escaped six-fold, past nats-server's message size.
    let unreadable = vec![1u8; 300 * 1024];
    let r = server
        .client
        .send(
            http::Method::POST,
            &format!("{}/v1/batch", server.base),
            &[
                ("authorization", &northstar::client::basic_auth(WRITE_KEY)),
                ("content-type", "application/json"),
            ],
            unreadable,
        )
        .await
        .expect("answered");
    assert_eq!(r.status, 400, "{}", r.text());

    let segment = json!({"writeKey": WRITE_KEY, "batch": [
        {"type": "track", "messageId": "bad-1", "userId": "u", "writeKey": WRITE_KEY}
    ]});
    let r = server.post("/v1/batch", &segment).await;
    assert_eq!(r.json()["rejected"], 1, "{}", r.text());
    let posthog = json!({"api_key": WRITE_KEY, "batch": [
        {"event": "signup_completed", "distinct_id": "p1", "uuid": "0190f1a8-0000-7000-8000-000000000001",
         "properties": {"token": WRITE_KEY, "plan": "free"}}
    ]});
    let r = server
        .client
        .post_json(&format!("{}/batch/", server.base), &[], &posthog)
        .await
        .expect("answered");
    assert_eq!(r.status, 200, "{}", r.text());

    harness::wait_rows(&server.data, "rejected_events", 2).await;
    harness::wait_archived(&server.data, 1).await;
    let rejected = harness::query(
        &server.data,
        "SELECT payload, reasons FROM rejected_events ORDER BY length(payload) DESC",
    )
    .await;
    assert!(
        rejected[0]["reasons"].to_string().contains("cut"),
        "{:?}",
        rejected[0]["reasons"]
    );
    let events = harness::query(&server.data, "SELECT properties FROM events").await;
    for row in rejected.iter().chain(&events) {
        let text = row.to_string();
        assert!(!text.contains(WRITE_KEY), "a write key was stored: {text}");
    }
    assert!(events[0]["properties"].to_string().contains("plan"));
}

/// What every JSON encoder writes for small and large numbers (`JSON.stringify(0.0000001)` is
/// `1e-7`, Python's `json.dumps(1e-05)` is `1e-05`): ingest, the meter, SQL and the usage
/// windows must all read them, and read them alike. One such event used to fail every query
/// over `metered_events` and stop both usage pipelines for good while `/healthz` said ok.
#[tokio::test(flavor = "multi_thread")]
async fn quantities_with_exponents_agree_in_the_meter_sql_and_usage_windows() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let batch = vec![
        storage("exp-1", "js", json!(1e-7)),
        storage("exp-2", "js", json!(1e-5)),
        storage("exp-3", "js", json!("2.5E2")),
        storage("exp-4", "js", json!(-0.0)),
        storage("exp-5", "js", json!(1e3)),
    ];
    let answer = server
        .post("/v1/batch", &json!({"batch": batch}))
        .await
        .json();
    assert_eq!(answer["accepted"], 5, "{answer}");
    harness::wait_archived(&server.data, 5).await;
    let report = verified(&server).await;
    assert_eq!(report["ok"], true, "{report}");
    for total in ["meter_total", "events_total", "usage_total"] {
        assert_eq!(decimal(&report[total]), "1250.0000101", "{total}: {report}");
    }
    let rows = server
        .post_as(
            ADMIN_KEY,
            "/v1/sql",
            &json!({"sql": "SELECT count(*) AS n FROM metered_events WHERE customer_id = 'js'"}),
        )
        .await;
    assert_eq!(rows.status, 200, "{}", rows.text());
    assert_healthy(&server).await;
    let metrics = server.get_as(ADMIN_KEY, "/metrics").await.text();
    assert_eq!(
        harness::metric(
            &metrics,
            "northstar_state_entries{part=\"meter_customers\"} "
        ),
        Some(1),
        "{metrics}"
    );
}

/// A value the meter skips (stored before a meter was configured, say) is left out of
/// `metered_events` as well, instead of failing the view.
#[tokio::test(flavor = "multi_thread")]
async fn a_stored_quantity_the_meter_skips_is_left_out_of_sql_too() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    publish_directly(
        &nats.url,
        &[
            storage("bad-1", "skip", json!("lots")),
            storage("bad-2", "skip", json!(-3)),
            storage("good-1", "skip", json!(2)),
        ],
    )
    .await;
    used(&server, "skip", "storage_gb", 2.0).await;
    harness::wait_archived(&server.data, 3).await;
    let report = verified(&server).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(decimal(&report["events_total"]), "2", "{report}");
    assert_healthy(&server).await;
}

/// A decimal string without trailing zeros.
fn decimal(value: &Value) -> String {
    let text = value.as_str().unwrap_or_default();
    match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => text.to_string(),
    }
}

/// Consume ids used to share one namespace with each other and with ingest: `k` made `k-0`
/// and `k-1`, so a later consume with `event_id: "k-1"` answered 200 `consumed: 1` and counted
/// nothing, and a consume whose `event_id` equalled an ingested `messageId` did the same.
#[tokio::test(flavor = "multi_thread")]
async fn consume_ids_meet_neither_other_consumes_nor_ingested_ids() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let consume = |quantity: u64, id: &str| json!({"customer_id": "acme", "feature": "api_requests", "quantity": quantity, "consume": true, "event_id": id});
    let (status, body) = check(&server, consume(2, "k")).await;
    assert_eq!(
        (status, body["consumed"].as_f64()),
        (200, Some(2.0)),
        "{body}"
    );
    let (status, body) = check(&server, consume(1, "k-1")).await;
    assert_eq!(
        (status, body["consumed"].as_f64()),
        (200, Some(1.0)),
        "{body}"
    );
    assert!(body.get("duplicate").is_none(), "{body}");
    used(&server, "acme", "api_requests", 3.0).await;

    // An ingested event that is not metered, then a consume under its messageId.
    let plain = json!({"type": "track", "messageId": "svc-id-1", "userId": "u", "event": "report_created",
                       "timestamp": "2026-03-10T11:00:00Z", "context": {"groupId": "acme"}});
    server.send_batch([plain]).await;
    let (status, body) = check(&server, consume(5, "svc-id-1")).await;
    assert_eq!(
        (status, body["consumed"].as_f64()),
        (200, Some(5.0)),
        "{body}"
    );
    used(&server, "acme", "api_requests", 8.0).await;

    // A true retry is answered as the duplicate it is, and counts once.
    let (status, body) = check(&server, consume(5, "svc-id-1")).await;
    assert_eq!((status, &body["duplicate"]), (200, &json!(true)), "{body}");
    harness::wait_archived(&server.data, 9).await;
    used(&server, "acme", "api_requests", 8.0).await;
    let keys = harness::query(
        &server.data,
        "SELECT count(*) AS n FROM events WHERE source = 'limits-api' \
         AND json_get_str(context, 'idempotency_key') = 'k'",
    )
    .await;
    assert_eq!(keys[0]["n"], 2, "the caller's id is kept with each unit");
}

/// The smaller holes of one review, each replayed as found.
#[tokio::test(flavor = "multi_thread")]
async fn ids_keys_and_errors_are_treated_alike_on_every_route() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    // A padded customer id is metered trimmed; every route reads it trimmed.
    let padded = (0..3)
        .map(|i| call(&format!("pad-{i}"), "pad\u{a0}", "2026-03-10T11:00:00Z"))
        .collect::<Vec<_>>();
    server.send_batch(padded).await;
    used(&server, "pad", "api_requests", 3.0).await;
    for path in [
        "/v1/customers/pad%20/entitlements/api_requests",
        "/v1/customers/pad%E3%80%80/entitlements/api_requests",
        "/v1/customers/%09pad/entitlements/api_requests",
    ] {
        let body = server.get_as(SERVICE_KEY, path).await.json();
        assert_eq!(body["used"], 3.0, "{path}: {body}");
    }
    let usage = server
        .get_as(SERVICE_KEY, "/v1/customers/pad%C2%A0/usage")
        .await
        .json();
    assert_eq!(usage["customer_id"], "pad", "{usage}");

    // A suspended customer is not `allowed` by the usage route either.
    let r = server
        .put_admin("/v1/customers/pad", &json!({"suspended": true}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = server
        .get_as(SERVICE_KEY, "/v1/customers/pad/usage")
        .await
        .json();
    for feature in usage["features"].as_array().expect("features") {
        assert_eq!(feature["allowed"], false, "{usage}");
    }

    // An id ingest takes (255 characters of two bytes each) can be given a plan.
    let long = "é".repeat(255);
    let r = server
        .put_admin(
            &format!("/v1/customers/{}", "%C3%A9".repeat(255)),
            &json!({"plan": "pro"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], long.as_str());

    // A service key on an admin route is known but not allowed: 403, not 401.
    let r = server.get_as(SERVICE_KEY, "/v1/customers/pad").await;
    assert_eq!(r.status, 403, "{}", r.text());

    // A runtime error of the statement itself is the user's: 400.
    let r = server
        .post_as(ADMIN_KEY, "/v1/sql", &json!({"sql": "SELECT 1/0"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = server
        .post_as(
            ADMIN_KEY,
            "/v1/sql",
            &json!({"sql": "SELECT CAST('x' AS INT)"}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
}

/// Events dated in the past used to suspend a customer with no current usage (a hard cap
/// reached in a period long closed). Now an event older than `ingest.maxEventAge` (400 days
/// by default) is rejected naming `timestamp`, and usage of a closed period within it is
/// counted there but never suspends or warns.
#[tokio::test(flavor = "multi_thread")]
async fn past_dated_events_neither_suspend_nor_count_against_today() {
    let nats = Nats::start();
    let mut config = limits_config();
    config["ingest"]
        .as_object_mut()
        .expect("ingest")
        .remove("maxEventAge");
    let server = InProcess::start(&nats, &config, Clock::manual(MARCH_10)).await;
    let dated = |id: &str, gb: u64, at: &str| {
        json!({"type": "track", "messageId": id, "userId": "u", "event": "storage_used",
               "timestamp": at, "context": {"groupId": "victim"}, "properties": {"gb": gb}})
    };
    let epoch = vec![
        dated("old-1", 30, "1970-01-01T00:00:00Z"),
        dated("old-2", 30, "1970-01-02T00:00:00Z"),
    ];
    let answer = server
        .post("/v1/batch", &json!({"batch": epoch}))
        .await
        .json();
    assert_eq!(answer["rejected"], 2, "{answer}");
    for error in answer["errors"].as_array().expect("errors") {
        assert_eq!(error["field"], "timestamp", "{error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap_or("")
                .contains("ingest.maxEventAge"),
            "{error}"
        );
    }

    // 60 GB in January, past free's hard cap of 50, and 1 GB today.
    let january = vec![
        dated("jan-1", 30, "2026-01-20T00:00:00Z"),
        dated("jan-2", 30, "2026-01-21T00:00:00Z"),
        dated("now-1", 1, "2026-03-10T11:00:00Z"),
    ];
    let answer = server
        .post("/v1/batch", &json!({"batch": january}))
        .await
        .json();
    assert_eq!(answer["accepted"], 3, "{answer}");
    harness::wait_archived(&server.data, 3).await;
    used(&server, "victim", "storage_gb", 1.0).await;
    let (status, body) = check(
        &server,
        json!({"customer_id": "victim", "feature": "storage_gb", "quantity": 1}),
    )
    .await;
    assert_eq!(
        status, 200,
        "a closed period's usage suspends nobody: {body}"
    );
    let customer = server
        .get_as(ADMIN_KEY, "/v1/customers/victim")
        .await
        .json();
    assert!(customer["suspended"].is_null(), "{customer}");
}

/// The limits API answered decimals as binary floats: 999999999999.3000000001 came back as
/// 999999999999.2999. Its numbers now carry their exact digits, as SQL's JSON does.
#[tokio::test(flavor = "multi_thread")]
async fn the_limits_api_answers_exact_decimals() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    // On pro (a soft limit, no hard cap), so the customer stays allowed past it.
    let r = server
        .put_admin("/v1/customers/exact", &json!({"plan": "pro"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let exact = "999999999999.3000000001";
    let batch = json!({"batch": [storage("exact-1", "exact", json!(exact))]});
    assert_eq!(server.post("/v1/batch", &batch).await.json()["accepted"], 1);
    let path = "/v1/customers/exact/entitlements/storage_gb";
    let text = harness::eventually(Duration::from_secs(20), async || {
        let text = server.get_as(SERVICE_KEY, path).await.text();
        match text.contains(&format!("\"used\":{exact}")) {
            true => Ok(text),
            false => Err(text),
        }
    })
    .await;
    assert!(text.contains("\"has_access\":"), "{text}");
    let usage = server
        .get_as(SERVICE_KEY, "/v1/customers/exact/usage")
        .await
        .text();
    assert!(usage.contains(&format!("\"used\":{exact}")), "{usage}");
    let check = server
        .post_as(
            SERVICE_KEY,
            "/v1/check",
            &json!({"customer_id": "exact", "feature": "storage_gb", "quantity": "0.0000000001"}),
        )
        .await
        .text();
    assert!(check.contains(&format!("\"used\":{exact}")), "{check}");
}

/// A usage pipeline whose runs fail is a failed part: `/healthz` answers 503 and names it
/// (a failing pipeline used to log every 5 s while `/healthz` said ok).
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_that_cannot_run_is_named_by_healthz() {
    let nats = Nats::start();
    let pipelines = tempfile::tempdir().expect("pipelines dir");
    std::fs::write(
        pipelines.path().join("broken.sql"),
        "-- window: 1h\n\
         SELECT customer_id, feature, \
         date_bin(INTERVAL '1 hour', \"timestamp\", TIMESTAMP '1970-01-01T00:00:00Z') AS window_start, \
         date_bin(INTERVAL '1 hour', \"timestamp\", TIMESTAMP '1970-01-01T00:00:00Z') + INTERVAL '1 hour' AS window_end, \
         sum(quantity) AS quantity, max(quantity) AS max_quantity, count(*) AS events, \
         max(CAST(customer_id AS BIGINT)) AS max_seq \
         FROM metered_events WHERE date = '{date}' GROUP BY customer_id, feature, window_start\n",
    )
    .expect("write pipeline");
    let server = InProcess::start_with_pipelines(
        &nats,
        &limits_config(),
        Clock::manual(MARCH_10),
        pipelines.path().to_path_buf(),
    )
    .await;
    let batch = json!({"batch": [call("p-1", "acme", "2026-03-10T11:00:00Z")]});
    assert_eq!(server.post("/v1/batch", &batch).await.status, 200);
    let health = harness::eventually(Duration::from_secs(30), async || {
        let r = server.get_as(SERVICE_KEY, "/healthz").await;
        match (r.status, r.text().contains("pipeline broken")) {
            (503, true) => Ok(r.text()),
            _ => Err(r.text()),
        }
    })
    .await;
    assert!(
        health.contains("BIGINT") || health.contains("Cast"),
        "{health}"
    );
}

/// Events spread over many past days used to leave one Parquet file per day for every commit
/// that touched it (10,000 days: 10,001 files in one commit); compaction waited for 12 files
/// in a day. A past day is now merged from two small files.
#[tokio::test(flavor = "multi_thread")]
async fn past_days_touched_by_several_commits_are_merged_into_one_file() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let spread = |prefix: &str| -> Vec<Value> {
        (1..=20)
            .map(|day| {
                call(
                    &format!("{prefix}-{day}"),
                    "acme",
                    &format!("2026-01-{day:02}T10:00:00Z"),
                )
            })
            .collect()
    };
    server.send_batch(spread("a")).await;
    harness::wait_archived(&server.data, 20).await;
    server.send_batch(spread("b")).await;
    harness::wait_archived(&server.data, 40).await;
    let files_per_day = || -> Vec<usize> {
        (1..=20)
            .map(|day| {
                let dir = server.data.join(format!("events/date=2026-01-{day:02}"));
                std::fs::read_dir(dir)
                    .map(|entries| {
                        entries
                            .flatten()
                            .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
                            .count()
                    })
                    .unwrap_or(0)
            })
            .collect()
    };
    let next = std::cell::Cell::new(0);
    harness::eventually(Duration::from_secs(60), async || {
        // Compaction runs after commits: keep them coming.
        next.set(next.get() + 1);
        let tick = call(
            &format!("tick-{}", next.get()),
            "acme",
            "2026-03-10T11:00:00Z",
        );
        server.post("/v1/batch", &json!({"batch": [tick]})).await;
        let files = files_per_day();
        match files.iter().all(|n| *n == 1) {
            true => Ok(()),
            false => Err(format!("files per day: {files:?}")),
        }
    })
    .await;
    let rows = harness::query(
        &server.data,
        "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events WHERE date < '2026-02-01'",
    )
    .await;
    assert_eq!(
        (rows[0]["n"].as_u64(), rows[0]["d"].as_u64()),
        (Some(40), Some(40))
    );
}

/// A flood of new ids stops at each state's bound (issue: memory grows with every new id).
/// Past `metering.maxCustomers` a metered event of a new customer is refused at the door,
/// naming `customer_id` and the setting, and kept in the rejected store; known customers and
/// unmetered events go on. Past `onboarding.maxPeople` a new person's events are stored but
/// not followed, and their onboarding answers 503 `onboarding_full`.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_new_ids_stops_at_each_states_bound() {
    let nats = Nats::start();
    let mut config = limits_config();
    config["metering"]["maxCustomers"] = json!(3);
    config["onboarding"] = json!({"maxPeople": 3});
    let server = InProcess::start(&nats, &config, Clock::manual(MARCH_10)).await;
    let at = "2026-03-10T10:00:00Z";
    let tracked = |id: &str, customer: &str, user: &str| {
        json!({"type": "track", "messageId": id, "userId": user, "event": "api_call_made",
               "timestamp": at, "context": {"groupId": customer}, "properties": {"endpoint": "/x"}})
    };
    let first = json!({"batch": [tracked("b1-1", "c1", "p1"), tracked("b1-2", "c2", "p2"), tracked("b1-3", "c3", "p3")]});
    assert_eq!(server.post("/v1/batch", &first).await.json()["accepted"], 3);

    let second = json!({"batch": [
        tracked("b2-1", "c1", "p4"),
        tracked("b2-2", "c4", "p5"),
        {"type": "track", "messageId": "b2-3", "userId": "p6", "event": "signup_completed",
         "timestamp": at, "context": {"groupId": "c5"}},
    ]});
    let answer = server.post("/v1/batch", &second).await.json();
    assert_eq!(
        answer["accepted"], 2,
        "a known customer and an unmetered event: {answer}"
    );
    assert_eq!(answer["rejected"], 1, "{answer}");
    let error = &answer["errors"][0];
    assert_eq!(error["index"], 1, "{answer}");
    assert_eq!(error["field"], "customer_id", "{answer}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or("")
            .contains("metering.maxCustomers"),
        "{answer}"
    );
    used(&server, "c1", "api_requests", 2.0).await;
    // Consumes of a new customer are refused the same way; a known one's go on.
    let (status, body) = check(
        &server,
        json!({"customer_id": "c6", "feature": "api_requests", "consume": true}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("customer_id"),
        "{body}"
    );
    let (status, body) = check(
        &server,
        json!({"customer_id": "c2", "feature": "api_requests", "consume": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The refused event is kept, with its reason, to replay once the bound is raised.
    harness::wait_rows(&server.data, "rejected_events", 1).await;
    let rejected = harness::query(
        &server.data,
        "SELECT event_id, reasons FROM rejected_events",
    )
    .await;
    assert_eq!(rejected[0]["event_id"], "b2-2", "{rejected:?}");
    assert!(
        rejected[0]["reasons"]
            .as_str()
            .unwrap_or("")
            .contains("metering.maxCustomers"),
        "{rejected:?}"
    );

    // Onboarding followed p1..p3; p4 came fourth and is stored but not followed.
    harness::eventually(Duration::from_secs(20), async || {
        let metrics = server.get_as(ADMIN_KEY, "/metrics").await.text();
        match harness::metric(&metrics, "northstar_onboarding_unfollowed_events_total") {
            Some(n) if n >= 2 => Ok(()),
            other => Err(format!("unfollowed events: {other:?}")),
        }
    })
    .await;
    let followed = server.get_as(SERVICE_KEY, "/v1/users/p1/onboarding").await;
    assert_eq!(followed.status, 200, "{}", followed.text());
    let unfollowed = server.get_as(SERVICE_KEY, "/v1/users/p4/flags").await;
    assert_eq!(unfollowed.status, 503, "{}", unfollowed.text());
    assert_eq!(unfollowed.json()["code"], "onboarding_full");
    assert!(unfollowed.text().contains("onboarding.maxPeople"));
    harness::wait_archived(&server.data, 6).await;
    assert_healthy(&server).await;
}

/// The usage pipelines read only what each day gained since its file was written, and merge
/// it in: over several commits, a late event to an earlier day, and a run started again from
/// an older position (a crash between a day's file and the pipeline's manifest), every window
/// counts each event once.
#[tokio::test(flavor = "multi_thread")]
async fn usage_windows_merged_run_by_run_count_every_event_once() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let windows = async || {
        harness::query(
            &server.data,
            "SELECT CAST(window_start AS VARCHAR) AS w, CAST(sum(events) AS BIGINT) AS n \
             FROM usage WHERE pipeline = 'usage_hourly' AND customer_id = 'w' \
             GROUP BY 1 ORDER BY 1",
        )
        .await
    };
    let post_and_settle = async |batch: Vec<Value>, stored: u64| {
        let answer = server
            .post("/v1/batch", &json!({"batch": batch}))
            .await
            .json();
        assert_eq!(answer["rejected"], 0, "{answer}");
        harness::wait_archived(&server.data, stored).await;
        let report = verified(&server).await;
        assert_eq!(report["ok"], true, "{report}");
    };
    post_and_settle(
        (1..=3)
            .map(|i| call(&format!("w-a{i}"), "w", "2026-03-10T10:05:00Z"))
            .collect(),
        3,
    )
    .await;
    post_and_settle(
        vec![
            call("w-b1", "w", "2026-03-10T10:30:00Z"),
            call("w-b2", "w", "2026-03-10T10:59:59Z"),
            call("w-b3", "w", "2026-03-10T11:00:00Z"),
        ],
        6,
    )
    .await;
    post_and_settle(vec![call("w-c1", "w", "2026-03-09T23:00:00Z")], 7).await;
    let expected = |late: i64| {
        vec![
            json!({"w": "2026-03-09T23:00:00Z", "n": late}),
            json!({"w": "2026-03-10T10:00:00Z", "n": 5}),
            json!({"w": "2026-03-10T11:00:00Z", "n": 1}),
        ]
    };
    assert_eq!(windows().await, expected(1));

    // As after a crash that wrote the days' files but not the manifests: every day is run
    // again from the beginning, and what a file already holds is not added twice.
    for pipeline in ["usage_hourly", "usage_daily"] {
        let manifest = server
            .data
            .join(format!("usage/pipeline={pipeline}/_manifest.json"));
        std::fs::write(&manifest, br#"{"last_seq":0}"#).expect("roll the manifest back");
    }
    post_and_settle(vec![call("w-d1", "w", "2026-03-09T23:30:00Z")], 8).await;
    assert_eq!(windows().await, expected(2));
}

/// A flood of distinct values of a `unique_count` meter stops at its bounds (issue: memory
/// grows with every new id). One counter takes at most `metering.maxUniqueValuesPerCounter`
/// values and then stays there, past any limit the config accepts, so the limit still holds;
/// past `metering.maxUniqueValues` held in all, a metered event with a new value is refused
/// at the door, naming the property and the setting, and kept in the rejected store. Values
/// the meter holds, full counters and unmetered events go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_distinct_values_stops_at_the_unique_count_bounds() {
    let nats = Nats::start();
    let mut config = limits_config();
    config["events"].as_array_mut().unwrap().push(json!({
        "name": "seat_used",
        "properties": ["member"],
        "metering": {"featureId": "seats", "aggregation": "unique_count", "valueProperty": "member"}
    }));
    config["usageFeatures"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "seats", "limits": {"free": 2}}));
    config["metering"]["maxUniqueValues"] = json!(4);
    config["metering"]["maxUniqueValuesPerCounter"] = json!(3);
    let server = InProcess::start(&nats, &config, Clock::manual(MARCH_10)).await;
    let seat = |id: &str, customer: &str, member: &str| {
        json!({"type": "track", "messageId": id, "userId": member, "event": "seat_used",
               "timestamp": "2026-03-10T10:00:00Z", "context": {"groupId": customer},
               "properties": {"member": member}})
    };
    let first = json!({"batch": [
        seat("s1", "c1", "m1"), seat("s2", "c1", "m2"), seat("s3", "c1", "m3"),
        seat("s4", "c1", "m4"), seat("s5", "c1", "m1"), seat("s6", "c2", "n1"),
    ]});
    assert_eq!(server.post("/v1/batch", &first).await.json()["accepted"], 6);
    used(&server, "c1", "seats", 3.0).await;
    used(&server, "c2", "seats", 1.0).await;
    let (status, body) = check(&server, json!({"customer_id": "c1", "feature": "seats"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (402, Some("usage_limit_exceeded")),
        "a full counter is past its limit: {body}"
    );

    let second = json!({"batch": [
        seat("s7", "c2", "n2"),
        seat("s8", "c2", "n1"),
        seat("s9", "c1", "m9"),
        call("s10", "c2", "2026-03-10T10:00:00Z"),
    ]});
    let answer = server.post("/v1/batch", &second).await.json();
    assert_eq!(
        answer["accepted"], 3,
        "a held value, a full counter, another meter's event: {answer}"
    );
    assert_eq!(answer["rejected"], 1, "{answer}");
    let error = &answer["errors"][0];
    assert_eq!(error["index"], 0, "{answer}");
    assert_eq!(error["field"], "properties.member", "{answer}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or("")
            .contains("metering.maxUniqueValues"),
        "{answer}"
    );
    harness::wait_rows(&server.data, "rejected_events", 1).await;
    let rejected = harness::query(&server.data, "SELECT event_id FROM rejected_events").await;
    assert_eq!(rejected[0]["event_id"], "s7", "{rejected:?}");
    harness::wait_archived(&server.data, 9).await;
    used(&server, "c2", "seats", 1.0).await;
    assert_healthy(&server).await;
}
