//! The meter and the limits API: exact, fresh, atomic, and the same after a crash.

mod harness;

use std::time::Duration;

use harness::{ADMIN_KEY, InProcess, Nats, Northstar, SERVICE_KEY, limits_config, scalar};
use northstar::clock::Clock;
use serde_json::{Value, json};

fn call(id: &str, customer: &str, at: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": format!("{customer}-user"), "event": "api_call_made",
           "timestamp": at, "context": {"groupId": customer}, "properties": {"endpoint": "/x"}})
}

fn storage(id: &str, customer: &str, gb: Value, at: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": "u", "event": "storage_used", "timestamp": at,
           "context": {"groupId": customer}, "properties": {"gb": gb}})
}

/// 2026-03-10T12:00:00Z in microseconds.
const MARCH_10: i64 = 1_773_144_000_000_000;

/// Polls `check` until `f` holds (the meter applies acked events within milliseconds).
async fn eventually<F: Fn(&Value) -> bool>(server: &InProcess, path: &str, f: F) -> Value {
    harness::eventually(Duration::from_secs(20), async || {
        let body = server.get_as(SERVICE_KEY, path).await.json();
        if f(&body) {
            Ok(body)
        } else {
            Err(format!("{path} answered {body}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_is_exact_fresh_and_answers_every_feature() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let batch: Vec<Value> = (0..7)
        .map(|i| call(&format!("c-{i}"), "acme", "2026-03-10T10:00:00Z"))
        .chain([
            storage("s-1", "acme", json!(0.1), "2026-03-10T10:00:00Z"),
            storage("s-2", "acme", json!("0.2"), "2026-03-10T11:00:00Z"),
        ])
        .collect();
    server.send_batch(batch).await;

    let usage = eventually(&server, "/v1/customers/acme/usage", |b| {
        b["as_of"]["seq"].as_u64() >= Some(9)
    })
    .await;
    let features = usage["features"].as_array().unwrap();
    let api = features
        .iter()
        .find(|f| f["feature"] == "api_requests")
        .unwrap();
    assert_eq!(api["used"], 7.0);
    assert_eq!(api["limit"], 20.0);
    assert_eq!(api["remaining"], 13.0);
    assert_eq!(api["plan"], "free");
    assert_eq!(api["period_start"], "2026-03-01T00:00:00.000Z");
    assert_eq!(api["period_end"], "2026-04-01T00:00:00.000Z");
    let storage_gb = features
        .iter()
        .find(|f| f["feature"] == "storage_gb")
        .unwrap();
    assert_eq!(
        storage_gb["used"], 0.3,
        "0.1 + 0.2 is exactly 0.3 here: {storage_gb}"
    );

    let entitlement = server
        .get_as(SERVICE_KEY, "/v1/customers/acme/entitlements/api_requests")
        .await
        .json();
    assert_eq!(entitlement["has_access"], true);
    assert_eq!(entitlement["reset_at"], "2026-04-01T00:00:00.000Z");
    assert_eq!(
        server
            .get_as(SERVICE_KEY, "/v1/customers/acme/entitlements/nope")
            .await
            .status,
        404
    );
    // Keys: none, a write key, the admin key.
    assert_eq!(
        server
            .client
            .get(&format!("{}/v1/customers/acme/usage", server.base), &[])
            .await
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        server
            .get_as(harness::WRITE_KEY, "/v1/customers/acme/usage")
            .await
            .status,
        403
    );
    assert_eq!(
        server
            .get_as(ADMIN_KEY, "/v1/customers/acme/usage")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hard_limit_refuses_with_the_upgrade_path_and_a_plan_change_lifts_it() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let batch: Vec<Value> = (0..20)
        .map(|i| call(&format!("h-{i}"), "globex", "2026-03-10T10:00:00Z"))
        .collect();
    server.send_batch(batch).await;
    eventually(&server, "/v1/customers/globex/usage", |b| {
        b["as_of"]["seq"].as_u64() >= Some(20)
    })
    .await;

    let check = json!({"customer_id": "globex", "feature": "api_requests", "quantity": 1});
    let refused = server.post_as(SERVICE_KEY, "/v1/check", &check).await;
    assert_eq!(refused.status, 402, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["code"], "usage_limit_exceeded");
    assert_eq!(
        (body["limit"].as_f64(), body["used"].as_f64()),
        (Some(20.0), Some(20.0))
    );
    assert_eq!(
        body["upgrade"]["subscription_url"],
        "https://app.example/upgrade?c=globex&f=api_requests"
    );
    assert!(
        body["upgrade"]
            .as_object()
            .unwrap()
            .contains_key("checkout_session_id")
    );
    assert!(body["message"].as_str().unwrap().contains("limit"));

    let put = server
        .put_admin("/v1/customers/globex", &json!({"plan": "pro"}))
        .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let allowed = server.post_as(SERVICE_KEY, "/v1/check", &check).await;
    assert_eq!(
        allowed.status,
        200,
        "the next check already sees the new plan: {}",
        allowed.text()
    );
    assert_eq!(allowed.json()["allowed"], true);
    assert_eq!(allowed.json()["limit"], 50000.0);
    // An unknown plan is refused with the field named; an unlimited plan has no limit.
    let bad = server
        .put_admin("/v1/customers/globex", &json!({"plan": "platinum"}))
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("plan"));
    server
        .put_admin("/v1/customers/globex", &json!({"plan": "enterprise"}))
        .await;
    let unlimited = server
        .post_as(SERVICE_KEY, "/v1/check", &check)
        .await
        .json();
    assert_eq!(
        (unlimited["allowed"].as_bool(), unlimited["limit"].is_null()),
        (Some(true), true)
    );
}

/// `POST /v1/check/batch` answers each check as `/v1/check` would, in order: consumes later
/// in the batch see what earlier ones recorded, the one past the limit gets the 402 with its
/// upgrade path, a malformed check is named by its place, and the others still run.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_checks_answers_each_as_a_single_check_would() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let batch: Vec<Value> = (0..18)
        .map(|i| call(&format!("b-{i}"), "initech", "2026-03-10T10:00:00Z"))
        .collect();
    server.send_batch(batch).await;
    eventually(&server, "/v1/customers/initech/usage", |b| {
        b["as_of"]["seq"].as_u64() >= Some(18)
    })
    .await;

    let consume = |id: &str| json!({"customer_id": "initech", "feature": "api_requests", "consume": true, "event_id": id});
    let checks = json!({"checks": [
        consume("batch-1"),
        consume("batch-2"),
        consume("batch-3"),
        {"customer_id": "initech", "feature": "no_such_feature"},
        {"customer_id": 5, "feature": "api_requests"},
        {"customer_id": "hooli", "feature": "api_requests"},
    ]});
    let answer = server
        .post_as(SERVICE_KEY, "/v1/check/batch", &checks)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let results = answer.json()["results"].clone();
    let statuses: Vec<u64> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    let unknown = server
        .post_as(SERVICE_KEY, "/v1/check", &checks["checks"][3])
        .await;
    assert_eq!(
        statuses,
        [200, 200, 402, unknown.status as u64, 400, 200],
        "{results}"
    );
    assert_eq!(
        results[1]["body"]["used"], 20.0,
        "the second consume saw the first: {results}"
    );
    assert_eq!(results[2]["body"]["code"], "usage_limit_exceeded");
    assert!(
        results[2]["body"]["upgrade"]["subscription_url"].is_string(),
        "{results}"
    );
    assert_eq!(
        results[3]["body"],
        unknown.json(),
        "the same error as a single check"
    );
    assert!(
        results[4]["body"]["message"]
            .as_str()
            .unwrap()
            .starts_with("checks[4]"),
        "{results}"
    );
    // A single check now answers what the batch's third did.
    let single = server
        .post_as(SERVICE_KEY, "/v1/check", &consume("batch-4"))
        .await;
    assert_eq!(single.status, 402);
    assert_eq!(single.json()["used"], results[2]["body"]["used"]);

    // Bounded, and keyed like /v1/check.
    let too_many: Vec<Value> = (0..1_001).map(|i| consume(&format!("m-{i}"))).collect();
    let refused = server
        .post_as(SERVICE_KEY, "/v1/check/batch", &json!({"checks": too_many}))
        .await;
    assert_eq!(refused.status, 413, "{}", refused.text());
    assert_eq!(refused.json()["code"], "too_many_checks");
    let anonymous = server
        .post_as("wk_not_a_service_key", "/v1/check/batch", &checks)
        .await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
}

/// `/v1/customers/{id}/usage` projects each feature at the period's rate so far: units a day,
/// usage at the period's end, and when the limit is reached (the upgrade trigger).
#[tokio::test(flavor = "multi_thread")]
async fn usage_projects_the_period_end_and_when_the_limit_is_reached() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let batch: Vec<Value> = (0..8)
        .map(|i| call(&format!("p-{i}"), "umbrella", "2026-03-09T10:00:00Z"))
        .collect();
    server.send_batch(batch).await;
    let usage = eventually(&server, "/v1/customers/umbrella/usage", |b| {
        b["as_of"]["seq"].as_u64() >= Some(8)
    })
    .await;
    let feature = usage["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "api_requests")
        .unwrap()
        .clone();
    let micros = |field: &str| {
        northstar::activation::generate::parse_timestamp(feature[field].as_str().unwrap()).unwrap()
    };
    // 8 of the free plan's 20: no threshold crossed yet; the upgrade path a 402 would carry.
    assert_eq!(feature["thresholds_crossed"], json!([]), "{feature}");
    assert_eq!(
        feature["upgrade"]["subscription_url"],
        "https://app.example/upgrade?c=umbrella&f=api_requests",
        "{feature}"
    );
    let (start, end) = (micros("period_start"), micros("period_end"));
    let elapsed = (MARCH_10 - start) as f64;
    let day = 86_400_000_000.0;
    let projection = &feature["projection"];
    let close =
        |got: &Value, want: f64| (got.as_f64().unwrap() - want).abs() < 1e-3 * want.max(1.0);
    assert!(
        close(&projection["per_day"], 8.0 * day / elapsed),
        "{feature}"
    );
    assert!(
        close(
            &projection["at_period_end"],
            8.0 * (end - start) as f64 / elapsed
        ),
        "{feature}"
    );
    // The free plan's 20 calls are reached at 20/8 of the time elapsed, inside the period.
    let reached = northstar::activation::generate::parse_timestamp(
        projection["limit_reached_at"].as_str().unwrap(),
    )
    .unwrap();
    let want = start as f64 + elapsed * 20.0 / 8.0;
    assert!((reached as f64 - want).abs() < 1_000_000.0, "{feature}");
    assert!(reached < end);
    // A check answers no projection: it is the usage answer's.
    let check = json!({"customer_id": "umbrella", "feature": "api_requests"});
    let answer = server
        .post_as(SERVICE_KEY, "/v1/check", &check)
        .await
        .json();
    assert!(answer.get("projection").is_none(), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_consumes_never_both_take_the_last_unit() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    // 15 of 20 used: 5 left, 40 callers race for them.
    let batch: Vec<Value> = (0..15)
        .map(|i| call(&format!("r-{i}"), "initech", "2026-03-10T10:00:00Z"))
        .collect();
    server.send_batch(batch).await;
    eventually(&server, "/v1/customers/initech/usage", |b| {
        b["as_of"]["seq"].as_u64() >= Some(15)
    })
    .await;
    let mut racers = Vec::new();
    for i in 0..40 {
        let (client, base) = (server.client.clone(), server.base.clone());
        racers.push(tokio::spawn(async move {
            let body = json!({"customer_id": "initech", "feature": "api_requests", "quantity": 1, "consume": true, "event_id": format!("race-{i}")});
            let bearer = format!("Bearer {SERVICE_KEY}");
            client.post_json(&format!("{base}/v1/check"), &[("authorization", &bearer)], &body).await.unwrap().status
        }));
    }
    let mut statuses = Vec::new();
    for racer in racers {
        statuses.push(racer.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 402).count(), 35);
    let usage = eventually(&server, "/v1/customers/initech/usage", |b| {
        b["features"][0]["used"] == 20.0
    })
    .await;
    assert_eq!(usage["features"][0]["remaining"], 0.0);
    // The consumed units are events like any other: SQL sees them.
    northstar_wait(&server, 20).await;
    assert_eq!(
        scalar(
            &server.data,
            "SELECT count(*) FROM events WHERE customer_id = 'initech' AND event = 'api_call_made'"
        )
        .await,
        20
    );
    // A retried consume with the same event id is recorded once (and still refused here).
    let retry = json!({"customer_id": "initech", "feature": "api_requests", "consume": true, "event_id": "race-0"});
    assert_eq!(
        server
            .post_as(SERVICE_KEY, "/v1/check", &retry)
            .await
            .status,
        402
    );
}

async fn northstar_wait(server: &InProcess, rows: u64) {
    harness::wait_archived(&server.data, rows).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn periods_roll_over_at_the_billing_anchor() {
    let nats = Nats::start();
    let clock = Clock::manual(MARCH_10);
    let mut config = limits_config();
    // The next period's events are five days ahead of the clock: past the default skew.
    config["ingest"]["maxFutureSkew"] = json!("7d");
    let server = InProcess::start(&nats, &config, clock.clone()).await;
    let put = server
        .put_admin(
            "/v1/customers/hooli",
            &json!({"billingAnchor": "2026-01-15T09:30:00Z"}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let batch: Vec<Value> = (0..3)
        .map(|i| call(&format!("p-{i}"), "hooli", "2026-03-10T10:00:00Z"))
        .chain((0..2).map(|i| call(&format!("q-{i}"), "hooli", "2026-03-15T10:00:00Z")))
        .collect();
    server.send_batch(batch).await;
    let before = eventually(&server, "/v1/customers/hooli/usage", |b| {
        b["as_of"]["seq"].as_u64() >= Some(5)
    })
    .await;
    assert_eq!(
        before["features"][0]["used"], 3.0,
        "events after the anchor belong to the next period"
    );
    assert_eq!(
        before["features"][0]["period_start"],
        "2026-02-15T09:00:00.000Z"
    );
    assert_eq!(
        before["features"][0]["period_end"],
        "2026-03-15T09:00:00.000Z"
    );
    clock.set(MARCH_10 + 6 * 86_400_000_000); // March 16
    let after = server
        .get_as(SERVICE_KEY, "/v1/customers/hooli/usage")
        .await
        .json();
    assert_eq!(after["features"][0]["used"], 2.0);
    assert_eq!(
        after["features"][0]["period_start"],
        "2026-03-15T09:00:00.000Z"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_quantities_go_to_the_rejected_store_and_cost_no_usage() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let batch = vec![
        storage("ok-1", "wonka", json!(2), "2026-03-10T10:00:00Z"),
        storage("bad-missing", "wonka", Value::Null, "2026-03-10T10:00:00Z"),
        storage("bad-negative", "wonka", json!(-5), "2026-03-10T10:00:00Z"),
        storage("bad-text", "wonka", json!("lots"), "2026-03-10T10:00:00Z"),
        storage("ok-2", "wonka", json!("1.5"), "2026-03-10T10:00:00Z"),
    ];
    let r = server.post("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(r.status, 200);
    let answer = r.json();
    assert_eq!(
        (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
        (Some(2), Some(3))
    );
    let fields: Vec<&str> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["properties.gb"; 3]);
    let messages: Vec<&str> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(messages[1].contains("negative"), "{messages:?}");
    let usage = eventually(
        &server,
        "/v1/customers/wonka/entitlements/storage_gb",
        |b| b["used"] == 3.5,
    )
    .await;
    assert_eq!(usage["remaining"], 6.5);
}

/// Thresholds in units (`usageFeatures[].thresholds`) fire beside the fractions of the limit,
/// once a period each, and on a plan without a limit too.
#[tokio::test(flavor = "multi_thread")]
async fn thresholds_in_units_fire_beside_fractions_and_without_a_limit() {
    let nats = Nats::start();
    let mut config = limits_config();
    config["usageFeatures"][0]["thresholds"] = json!([3]);
    config["usageFeatures"][1]["thresholds"] = json!([5, 15]);
    let server = InProcess::start(&nats, &config, Clock::manual(MARCH_10)).await;
    let answer = server
        .put_admin("/v1/customers/wayne", &json!({"plan": "enterprise"}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut thresholds = client.subscribe("northstar.usage.threshold").await.unwrap();

    // stark (free, 10 GB): 7 GB crosses 5 units; 9 more cross 80%, 100% and 15 units.
    // wayne (enterprise, unlimited calls): the fourth call crosses 3 units.
    let mut batch = vec![
        storage("u-1", "stark", json!(7), "2026-03-10T10:00:00Z"),
        storage("u-2", "stark", json!(9), "2026-03-10T10:01:00Z"),
        storage("u-3", "stark", json!(9), "2026-03-10T10:02:00Z"),
    ];
    batch.extend((0..4).map(|i| call(&format!("w-{i}"), "wayne", "2026-03-10T10:00:00Z")));
    let r = server.post("/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut seen = Vec::new();
    for _ in 0..5 {
        let message = tokio::time::timeout(
            Duration::from_secs(20),
            futures::StreamExt::next(&mut thresholds),
        )
        .await
        .expect("a threshold event")
        .unwrap();
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        seen.push((
            event["customer_id"].as_str().unwrap().to_string(),
            event["threshold"].as_f64(),
            event["units"].as_f64(),
            event["limit"].as_f64(),
        ));
    }
    seen.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    let stark = |threshold: f64, units: Option<f64>| {
        ("stark".to_string(), Some(threshold), units, Some(10.0))
    };
    let mut want = vec![
        stark(0.5, Some(5.0)),
        stark(0.8, None),
        stark(1.0, None),
        stark(1.5, Some(15.0)),
        ("wayne".to_string(), None, Some(3.0), None),
    ];
    want.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(seen, want);
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut thresholds)
        )
        .await
        .is_err(),
        "each fires once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn thresholds_fire_once_and_a_hard_cap_suspends() {
    let nats = Nats::start();
    let hook = harness::Recorder::start().await;
    let mut config = limits_config();
    config["metering"]["thresholdWebhook"] = json!(format!("{}/hook", hook.base));
    let server = InProcess::start(&nats, &config, Clock::manual(MARCH_10)).await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut thresholds = client.subscribe("northstar.usage.threshold").await.unwrap();

    // 7 + 2 GB: past 80% of 10 (free) at the second event; 12 GB more: past 100%.
    let r = server.post("/v1/batch", &json!({"batch": [storage("t-1", "stark", json!(7), "2026-03-10T10:00:00Z"), storage("t-2", "stark", json!(2), "2026-03-10T10:01:00Z")]})).await;
    assert_eq!(r.status, 200);
    let r = server
        .post(
            "/v1/batch",
            &json!({"batch": [storage("t-3", "stark", json!(12), "2026-03-10T10:02:00Z")]}),
        )
        .await;
    assert_eq!(r.status, 200);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(
            Duration::from_secs(20),
            futures::StreamExt::next(&mut thresholds),
        )
        .await
        .unwrap()
        .unwrap();
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        seen.push((
            event["threshold"].as_f64().unwrap(),
            event["customer_id"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        seen,
        [(0.8, "stark".to_string()), (1.0, "stark".to_string())]
    );
    // More usage in the same period fires nothing new.
    server
        .post(
            "/v1/batch",
            &json!({"batch": [storage("t-4", "stark", json!(1), "2026-03-10T10:03:00Z")]}),
        )
        .await;
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut thresholds)
        )
        .await
        .is_err()
    );
    let posted = hook.wait_for(2).await;
    assert_eq!(posted[0]["threshold"], 0.8);
    assert!(posted.iter().all(|p| {
        p["id"]
            .as_str()
            .unwrap()
            .starts_with("threshold:stark:storage_gb:")
    }));

    // Past the hard cap of 50 GB on free: suspended, every check 403 until an admin lifts it.
    server
        .post(
            "/v1/batch",
            &json!({"batch": [storage("t-5", "stark", json!(40), "2026-03-10T10:04:00Z")]}),
        )
        .await;
    let check = json!({"customer_id": "stark", "feature": "api_requests"});
    let refused = harness::eventually(Duration::from_secs(20), async || {
        let r = server.post_as(SERVICE_KEY, "/v1/check", &check).await;
        if r.status == 403 {
            Ok(r.json())
        } else {
            Err(format!("not suspended: {}", r.text()))
        }
    })
    .await;
    assert_eq!(refused["code"], "customer_suspended");
    let lift = server
        .put_admin("/v1/customers/stark", &json!({"suspended": false}))
        .await;
    assert_eq!(lift.status, 200);
    assert_eq!(
        server
            .post_as(SERVICE_KEY, "/v1/check", &check)
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_after_kill_9_equals_usage_before_and_verify_agrees() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &limits_config());
    let customers = ["acme", "globex", "initech", "hooli"];
    let now = northstar::clock::format_micros(northstar::clock::system_micros());
    for round in 0..3 {
        let batch: Vec<Value> = (0..200)
            .map(|i| {
                let customer = customers[i % customers.len()];
                if i % 3 == 0 {
                    storage(
                        &format!("k{round}-{i}"),
                        customer,
                        json!(format!("0.{}", i % 10)),
                        &now,
                    )
                } else {
                    call(&format!("k{round}-{i}"), customer, &now)
                }
            })
            .collect();
        server.send_batch(batch).await;
    }
    let usage = |server: &Northstar| {
        let (client, base) = (server.client.clone(), server.base.clone());
        async move {
            let mut out = Vec::new();
            for customer in customers {
                let bearer = format!("Bearer {SERVICE_KEY}");
                let mut body = client
                    .get(
                        &format!("{base}/v1/customers/{customer}/usage"),
                        &[("authorization", &bearer)],
                    )
                    .await
                    .unwrap()
                    .json();
                // A 503 while the meter replays has no `as_of`: seen as nothing applied yet.
                let seq = body["as_of"]["seq"].as_u64().unwrap_or(0);
                let mut features = body["features"].take();
                for feature in features.as_array_mut().into_iter().flatten() {
                    if let Some(feature) = feature.as_object_mut() {
                        // When it was asked, not what it counts: the projection moves with the
                        // clock.
                        feature.remove("as_of");
                        feature.remove("projection");
                    }
                }
                out.push((seq, features));
            }
            out
        }
    };
    let applied_600 = async |server: &Northstar| {
        let now = usage(server).await;
        if now.iter().all(|(seq, _)| *seq == 600) {
            Ok(now)
        } else {
            Err(format!("{now:?}"))
        }
    };
    let before =
        harness::eventually(Duration::from_secs(30), async || applied_600(&server).await).await;
    // Wait for a meter snapshot written after all 600 were applied, then crash.
    let applied_at = std::time::SystemTime::now();
    let snapshot = server.data.join("meter/snapshot.jsonl");
    harness::eventually(Duration::from_secs(30), async || {
        match std::fs::metadata(&snapshot).and_then(|m| m.modified()) {
            Ok(written) if written > applied_at => Ok(()),
            other => Err(format!("meter snapshot: {other:?}")),
        }
    })
    .await;
    server.kill9();
    server.restart();
    let after =
        harness::eventually(Duration::from_secs(30), async || applied_600(&server).await).await;
    assert_eq!(
        before, after,
        "usage after the crash equals usage before, exactly"
    );

    let bearer = format!("Bearer {ADMIN_KEY}");
    let report = server
        .client
        .send(
            http::Method::POST,
            &format!("{}/v1/usage/verify", server.base),
            &[("authorization", &bearer)],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(report.status, 200, "{}", report.text());
    let report = report.json();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["seq"], 600);
    assert_eq!(report["compared"], 8, "4 customers × 2 features");
    assert_eq!(report["meter_total"], report["events_total"]);
    assert_eq!(report["meter_total"], report["usage_total"]);

    // Now events the meter applied but no snapshot holds: the snapshot (600) stays, 200 more
    // are applied, kill -9. The restart must load the snapshot and replay the 200 from the
    // stream, never count one twice nor lose one.
    let mut config = limits_config();
    config["metering"]["snapshotInterval"] = json!("1h");
    server.set_config(&config);
    server.terminate();
    server.restart();
    let batch: Vec<Value> = (0..200)
        .map(|i| call(&format!("late-{i}"), customers[i % customers.len()], &now))
        .collect();
    server.send_batch(batch).await;
    let applied_800 = async |server: &Northstar| {
        let now = usage(server).await;
        match now.iter().all(|(seq, _)| *seq == 800) {
            true => Ok(now),
            false => Err(format!("{now:?}")),
        }
    };
    let before =
        harness::eventually(Duration::from_secs(30), async || applied_800(&server).await).await;
    server.kill9();
    server.restart();
    let after =
        harness::eventually(Duration::from_secs(30), async || applied_800(&server).await).await;
    assert_eq!(
        before, after,
        "a snapshot plus the stream after it gives the same usage, exactly"
    );
}

/// `GET /v1/meters/{feature}/usage`: windows are calendar days of the time zone asked (the day
/// clocks go forward in Berlin is 23 hours), split by customer and `groupBy` dimension, equal
/// to SQL over `metered_events`; also as CSV, filtered, and with clear errors.
#[tokio::test(flavor = "multi_thread")]
async fn the_usage_query_api_windows_usage_in_a_time_zone() {
    let nats = Nats::start();
    let mut config = limits_config();
    config["events"].as_array_mut().unwrap().push(json!({
        "name": "tokens_used",
        "properties": ["tokens", "model"],
        "metering": {"featureId": "tokens", "aggregation": "sum", "valueProperty": "tokens",
                     "groupBy": ["model"]}
    }));
    config["usageFeatures"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "tokens", "limits": {"free": 1000000, "pro": null}}));
    let server = Northstar::start(&nats, &config);
    let used = |id: &str, customer: &str, at: &str, tokens: Value, model: &str| {
        json!({"type": "track", "messageId": id, "userId": "u", "event": "tokens_used", "timestamp": at,
               "context": {"groupId": customer}, "properties": {"tokens": tokens, "model": model}})
    };
    server
        .send_batch(vec![
            used("t1", "c1", "2026-03-28T22:30:00Z", json!(10), "a"),
            used("t2", "c1", "2026-03-29T21:30:00Z", json!(20), "a"),
            used("t3", "c1", "2026-03-29T22:30:00Z", json!("5.5"), "b"),
            used("t4", "c2", "2026-03-29T23:00:00Z", json!(1), "b"),
        ])
        .await;
    server.wait_archived(4).await;
    let query = "/v1/meters/tokens/usage?from=2026-03-27T00:00:00Z&to=2026-04-01T00:00:00Z\
                 &windowSize=day&windowTimeZone=Europe/Berlin&groupBy=model";
    let answer = server.get_as(SERVICE_KEY, query).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    let rows: Vec<(String, String, String, String, f64)> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                text(&w["windowStart"]),
                text(&w["windowEnd"]),
                text(&w["customer"]),
                text(&w["groupBy"]["model"]),
                w["value"].as_f64().unwrap(),
            )
        })
        .collect();
    let row = |start: &str, end: &str, customer: &str, model: &str, value: f64| {
        (
            start.to_string(),
            end.to_string(),
            customer.to_string(),
            model.to_string(),
            value,
        )
    };
    assert_eq!(
        rows,
        vec![
            row(
                "2026-03-27T23:00:00.000Z",
                "2026-03-28T23:00:00.000Z",
                "c1",
                "a",
                10.0
            ),
            // 23 hours: the clocks go forward that night.
            row(
                "2026-03-28T23:00:00.000Z",
                "2026-03-29T22:00:00.000Z",
                "c1",
                "a",
                20.0
            ),
            row(
                "2026-03-29T22:00:00.000Z",
                "2026-03-30T22:00:00.000Z",
                "c1",
                "b",
                5.5
            ),
            row(
                "2026-03-29T22:00:00.000Z",
                "2026-03-30T22:00:00.000Z",
                "c2",
                "b",
                1.0
            ),
        ],
        "{body}"
    );
    // The same usage SQL counts.
    let total: f64 = rows.iter().map(|r| r.4).sum();
    let sql = server
        .live_sql("SELECT CAST(sum(quantity) AS DOUBLE) AS n FROM metered_events WHERE feature = 'tokens'")
        .await;
    assert_eq!(sql[0]["n"].as_f64(), Some(total));
    // UTC days put t2 and t3 in one day; a filter and a customer narrow it.
    let utc = server
        .get_as(
            SERVICE_KEY,
            "/v1/meters/tokens/usage?from=2026-03-27T00:00:00Z&to=2026-04-01T00:00:00Z&customer=c1",
        )
        .await
        .json();
    let values: Vec<f64> = utc["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, [10.0, 25.5], "{utc}");
    let csv = server
        .client
        .get(
            &format!("{}{query}&filter[model]=b", server.base),
            &[
                ("authorization", &format!("Bearer {SERVICE_KEY}")),
                ("accept", "text/csv"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        csv.text(),
        "windowStart,windowEnd,customer,model,value\n\
         2026-03-29T22:00:00.000Z,2026-03-30T22:00:00.000Z,c1,b,5.5\n\
         2026-03-29T22:00:00.000Z,2026-03-30T22:00:00.000Z,c2,b,1\n"
    );
    for (path, status, field) in [
        (
            "/v1/meters/tokens/usage?windowTimeZone=Mars/Olympus",
            400,
            "windowTimeZone",
        ),
        ("/v1/meters/tokens/usage?groupBy=colour", 400, "groupBy"),
        (
            "/v1/meters/tokens/usage?windowSize=fortnight",
            400,
            "windowSize",
        ),
        ("/v1/meters/nothing/usage", 404, "nothing"),
    ] {
        let answer = server.get_as(SERVICE_KEY, path).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.text());
        assert!(answer.text().contains(field), "{path}: {}", answer.text());
    }
}

/// Portal tokens: a service asks for a token scoped to one customer and hands it to that
/// customer's browser, which reads the customer's usage and entitlements with it (from any
/// origin, by header or `?token=`); a changed token, an expired one, or a service key is
/// refused on the portal routes, and only a service key makes tokens.
#[tokio::test(flavor = "multi_thread")]
async fn a_portal_token_reads_one_customers_usage_until_it_expires() {
    let nats = Nats::start();
    let server = InProcess::start(&nats, &limits_config(), Clock::manual(MARCH_10)).await;
    let batch: Vec<Value> = (0..3)
        .map(|i| call(&format!("w-{i}"), "wonka", "2026-03-10T10:00:00Z"))
        .collect();
    server.send_batch(batch).await;
    eventually(&server, "/v1/customers/wonka/usage", |b| {
        b["as_of"]["seq"].as_u64() >= Some(3)
    })
    .await;

    let asked = server
        .post_as(
            SERVICE_KEY,
            "/v1/portal/tokens",
            &json!({"customer_id": "wonka", "expiresIn": "10m"}),
        )
        .await;
    assert_eq!(asked.status, 200, "{}", asked.text());
    let token = asked.json()["token"].as_str().unwrap().to_string();
    assert_eq!(asked.json()["expires_at"], "2026-03-10T12:10:00.000Z");

    let usage = server.get_as(&token, "/v1/portal/usage").await;
    assert_eq!(usage.status, 200, "{}", usage.text());
    assert_eq!(usage.headers["access-control-allow-origin"], "*");
    let body = usage.json();
    assert_eq!(body["customer_id"], "wonka");
    assert_eq!(body["features"][0]["used"], 3.0);
    let by_query = server
        .client
        .get(
            &format!(
                "{}/v1/portal/entitlements/api_requests?token={token}",
                server.base
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(by_query.status, 200, "{}", by_query.text());
    assert_eq!(by_query.json()["has_access"], true);
    let preflight = server
        .client
        .send(
            http::Method::OPTIONS,
            &format!("{}/v1/portal/usage", server.base),
            &[],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.headers["access-control-allow-origin"], "*");

    // Refusals: a changed token, a service key, no key to make one, then expiry.
    let mut changed = token.clone();
    changed.pop();
    changed.push(if token.ends_with('A') { 'B' } else { 'A' });
    for (key, code) in [
        (changed.as_str(), "invalid_portal_token"),
        (SERVICE_KEY, "invalid_portal_token"),
    ] {
        let refused = server.get_as(key, "/v1/portal/usage").await;
        assert_eq!(
            (refused.status, refused.json()["code"].as_str()),
            (401, Some(code))
        );
        assert_eq!(
            refused.headers["access-control-allow-origin"], "*",
            "readable by the page"
        );
    }
    let anonymous = server
        .post_as(
            "pt_nothing",
            "/v1/portal/tokens",
            &json!({"customer_id": "wonka"}),
        )
        .await;
    assert_eq!(anonymous.status, 401);
    let too_long = server
        .post_as(
            SERVICE_KEY,
            "/v1/portal/tokens",
            &json!({"customer_id": "wonka", "expiresIn": "2d"}),
        )
        .await;
    assert_eq!(too_long.status, 400);
    assert!(too_long.text().contains("expiresIn"));
    server.clock.advance(Duration::from_secs(11 * 60));
    let expired = server.get_as(&token, "/v1/portal/usage").await;
    assert_eq!(
        (expired.status, expired.json()["code"].as_str()),
        (401, Some("portal_token_expired"))
    );
}
