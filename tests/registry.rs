//! The schema registry at ingest, the rejected-event workflow, the registry tools for users'
//! CI, and abuse controls (rate limits, anomaly flags).

mod harness;

use std::time::Duration;

use harness::{ADMIN_KEY, InProcess, Nats, Northstar, WRITE_KEY, query, scalar, test_config};
use northstar::client::basic_auth;
use northstar::clock::Clock;
use serde_json::{Value, json};

/// The seed config plus a JSON-Schema event with policy `reject`, and a sampled event.
fn registry_config() -> Value {
    let mut config = test_config();
    config["events"].as_array_mut().unwrap().push(json!({
        "name": "order_placed", "version": "2-0-0", "policy": "reject",
        "properties": {"type": "object", "required": ["total"],
                       "properties": {"total": {"type": "number", "minimum": 0}, "currency": {"enum": ["EUR", "USD"]}}}
    }));
    config["events"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "mouse_moved", "sampleRate": 0.25}));
    config
}

fn order(id: &str, properties: Value) -> Value {
    json!({"type": "track", "messageId": id, "userId": "u1", "event": "order_placed", "properties": properties})
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_tag_reject_and_sample_and_a_fixed_schema_replays_the_rejected() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &registry_config());
    let mut batch = vec![
        order("o-1", json!({"total": 12.5, "currency": "EUR"})),
        order("o-2", json!({"total": -1})),
        order("o-3", json!({"currency": "GBP", "total": 3})),
        json!({"type": "track", "messageId": "s-1", "userId": "u1", "event": "signup_completed",
               "properties": {"plan": "free", "colour": "red"}}),
        json!({"type": "track", "messageId": "x-1", "userId": "u1", "event": "something_unplanned"}),
    ];
    batch.extend((0..400).map(|i| json!({"type": "track", "messageId": format!("m-{i}"), "userId": "u1", "event": "mouse_moved"})));
    let r = server.post("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(answer["rejected"], 2);
    let sampled_out = answer["sampled_out"].as_u64().unwrap();
    assert!(
        (250..350).contains(&sampled_out),
        "about 3/4 of 400 sampled out: {sampled_out}"
    );
    let errors = answer["errors"].as_array().unwrap();
    assert_eq!(errors[0]["field"], "properties.total");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("minimum"),
        "{errors:?}"
    );
    assert_eq!(errors[1]["field"], "properties.currency");
    let stored = 3 + (400 - sampled_out);
    server.wait_archived(stored).await;

    let rows = query(&server.data, "SELECT event_id, schema_version, context->'schema_violations'->0->>'field' AS tagged FROM events WHERE event_id IN ('o-1', 's-1', 'x-1') ORDER BY event_id").await;
    assert_eq!(rows[0]["schema_version"], "2-0-0");
    assert!(rows[0]["tagged"].is_null());
    assert_eq!(
        rows[1]["tagged"], "properties.colour",
        "unplanned property tagged"
    );
    assert_eq!(rows[2]["tagged"], "event", "unplanned event tagged");
    // Sampled rows carry their rate, so SQL can re-weight: the estimate is close to 400.
    let estimate = scalar(&server.data, "SELECT CAST(round(sum(1.0 / sample_rate)) AS BIGINT) FROM events WHERE event = 'mouse_moved'").await;
    assert!((300..=500).contains(&estimate), "{estimate}");

    // The schema is fixed (GBP allowed, negative totals still refused) and the rejected replayed.
    let mut fixed = registry_config();
    fixed["events"][2]["properties"]["properties"]["currency"]["enum"] =
        json!(["EUR", "USD", "GBP"]);
    server.set_config(&fixed);
    server.restart();
    harness::wait_rows(&server.data, "rejected_events", 2).await;
    let bearer = format!("Bearer {ADMIN_KEY}");
    let replay = |client: northstar::client::HttpClient, base: String, bearer: String| async move {
        client
            .post_json(
                &format!("{base}/v1/rejected/replay"),
                &[("authorization", &bearer)],
                &json!({}),
            )
            .await
            .unwrap()
            .json()
    };
    let first = replay(server.client.clone(), server.base.clone(), bearer.clone()).await;
    assert_eq!(
        (first["accepted"].as_u64(), first["still_rejected"].as_u64()),
        (Some(1), Some(1)),
        "{first}"
    );
    assert!(
        first["still_rejected_examples"][0]["reasons"]
            .to_string()
            .contains("properties.total")
    );
    server.wait_archived(stored + 1).await;
    // A second replay stores nothing twice.
    let second = replay(server.client.clone(), server.base.clone(), bearer).await;
    assert_eq!(
        (
            second["accepted"].as_u64(),
            second["already_accepted"].as_u64()
        ),
        (Some(0), Some(1)),
        "{second}"
    );
    // A marker stored after the second replay: once it is archived, anything that replay
    // had stored would be too (the archive commits in stream order).
    let marker = server
        .post(
            "/v1/batch",
            &json!({"batch": harness::tracks("marker", 0..1)}),
        )
        .await;
    assert_eq!(marker.status, 200, "{}", marker.text());
    server.wait_archived(stored + 2).await;
    assert_eq!(
        scalar(
            &server.data,
            "SELECT count(*) FROM events WHERE event_id = 'o-3'"
        )
        .await,
        1
    );
}

/// A message sent without an id, rejected, then replayed three times after its policy became
/// `tag`: each replay used to give it a fresh UUIDv7, so it was stored three times.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_less_rejected_message_replayed_three_times_is_stored_once() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &registry_config());
    let message = json!({"type": "track", "userId": "u1", "event": "order_placed", "properties": {"total": -1}});
    let r = server.post("/v1/batch", &json!({"batch": [message]})).await;
    assert_eq!(r.json()["rejected"], 1, "{}", r.text());

    let mut tagging = registry_config();
    tagging["events"][2]["policy"] = json!("tag");
    server.set_config(&tagging);
    server.restart();
    harness::wait_rows(&server.data, "rejected_events", 1).await;
    let bearer = format!("Bearer {ADMIN_KEY}");
    let mut answers = Vec::new();
    for _ in 0..3 {
        let answer = server
            .client
            .post_json(
                &format!("{}/v1/rejected/replay", server.base),
                &[("authorization", &bearer)],
                &json!({}),
            )
            .await
            .unwrap()
            .json();
        answers.push(answer);
    }
    assert_eq!(answers[0]["accepted"], 1, "{answers:?}");
    for later in &answers[1..] {
        assert_eq!(later["accepted"], 0, "{answers:?}");
        let seen = later["duplicates"].as_u64().unwrap_or(0)
            + later["already_accepted"].as_u64().unwrap_or(0);
        assert_eq!(seen, 1, "{answers:?}");
    }
    // Once a marker sent after the replays is archived, anything they stored is too.
    let marker = server
        .post(
            "/v1/batch",
            &json!({"batch": harness::tracks("marker", 0..1)}),
        )
        .await;
    assert_eq!(marker.status, 200, "{}", marker.text());
    server.wait_archived(2).await;
    assert_eq!(
        scalar(
            &server.data,
            "SELECT count(*) FROM events WHERE event = 'order_placed'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schema_tools_work_for_users_ci() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("northstar.json");
    std::fs::write(
        &config_path,
        serde_json::to_vec(&registry_config()).unwrap(),
    )
    .unwrap();
    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, format!("{}\n{}\n", order("a", json!({"total": 1})), json!({"type": "track", "userId": "u", "event": "api_call_made", "properties": {"endpoint": "/x"}}))).unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}\nnot json\n{}\n",
            order("a", json!({"total": 1})),
            order("b", json!({"total": "ten"}))
        ),
    )
    .unwrap();
    let northstar = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
            .args(args)
            .output()
            .unwrap()
    };
    let config = config_path.to_str().unwrap();

    let ok = northstar(&[
        "schema",
        "check",
        good.to_str().unwrap(),
        "--config",
        config,
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let failed = northstar(&["schema", "check", bad.to_str().unwrap(), "--config", config]);
    assert_eq!(failed.status.code(), Some(1));
    let out = String::from_utf8_lossy(&failed.stdout);
    assert!(out.contains(":2: .: not valid JSON"), "{out}");
    assert!(out.contains(":3: properties.total: type"), "{out}");

    let ts = northstar(&[
        "schema",
        "codegen",
        "--lang",
        "typescript",
        "--config",
        config,
    ]);
    let ts = String::from_utf8_lossy(&ts.stdout);
    assert!(
        ts.contains("export interface OrderPlacedProperties"),
        "{ts}"
    );
    assert!(ts.contains("currency?: \"EUR\" | \"USD\";"));
    let rs = northstar(&["schema", "codegen", "--lang", "rust", "--config", config]);
    assert!(String::from_utf8_lossy(&rs.stdout).contains("pub total: f64,"));

    let mut breaking = registry_config();
    breaking["events"][2]["properties"]["properties"]["total"]["type"] = json!("string");
    let new_path = dir.path().join("new.json");
    std::fs::write(&new_path, serde_json::to_vec(&breaking).unwrap()).unwrap();
    let diff = northstar(&["schema", "diff", config, new_path.to_str().unwrap()]);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "a breaking change without a MODEL bump fails CI"
    );
    let out = String::from_utf8_lossy(&diff.stdout);
    assert!(
        out.contains("BREAKING  order_placed: property `total` type"),
        "{out}"
    );
    breaking["events"][2]["version"] = json!("3-0-0");
    std::fs::write(&new_path, serde_json::to_vec(&breaking).unwrap()).unwrap();
    assert!(
        northstar(&["schema", "diff", config, new_path.to_str().unwrap()])
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_key_over_its_rate_gets_429_with_retry_after() {
    let nats = Nats::start();
    let mut config = test_config();
    config["ingest"]["maxBatchMessages"] = json!(100);
    config["ingest"]["rateLimitPerSecond"] = json!(10);
    config["ingest"]["rateLimitBurst"] = json!(100);
    config["sources"] = json!([{"name": "test", "writeKeys": [WRITE_KEY]}, {"name": "other", "writeKeys": ["wk_other_0123456789"]}]);
    let server = Northstar::start(&nats, &config);
    let batch = |prefix: &str| json!({"batch": harness::tracks(prefix, 0..60)});
    assert_eq!(server.post("/v1/batch", &batch("a")).await.status, 200);
    let limited = server.post("/v1/batch", &batch("b")).await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert_eq!(limited.json()["code"], "rate_limited");
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    // Another key has its own bucket.
    let auth = basic_auth("wk_other_0123456789");
    let other = server
        .client
        .post_json(
            &format!("{}/v1/batch", server.base),
            &[("authorization", &auth)],
            &batch("c"),
        )
        .await
        .unwrap();
    assert_eq!(other.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_far_above_their_own_baseline_is_flagged() {
    let nats = Nats::start();
    let mut config = test_config();
    config["metering"] = json!({"anomalyFactor": 5.0, "anomalyMinEvents": 50});
    let start = 1_773_144_000_000_000i64;
    let server = InProcess::start(&nats, &config, Clock::manual(start)).await;
    let call = |id: String| json!({"type": "track", "messageId": id, "userId": "u", "event": "api_call_made", "context": {"groupId": "spiky"}});
    for minute in 0..12 {
        let batch: Vec<Value> = (0..5).map(|i| call(format!("n-{minute}-{i}"))).collect();
        server.send_batch(batch).await;
        server.clock.advance(Duration::from_secs(60));
    }
    let burst: Vec<Value> = (0..200).map(|i| call(format!("burst-{i}"))).collect();
    server.send_batch(burst).await;
    let first = harness::eventually(Duration::from_secs(20), async || {
        let flagged = server.get_as(ADMIN_KEY, "/v1/anomalies").await.json();
        match flagged["flagged"].as_array().and_then(|f| f.first()) {
            Some(first) => Ok(first.clone()),
            None => Err(format!("never flagged: {flagged}")),
        }
    })
    .await;
    assert_eq!(first["customer_id"], "spiky");
    assert!(first["events_per_minute"].as_u64().unwrap() >= 50);
    assert!(first["baseline_per_minute"].as_f64().unwrap() < 5.0);
    assert_eq!(
        server
            .get_as(harness::SERVICE_KEY, "/v1/anomalies")
            .await
            .status,
        403,
        "admin only: a service key is known, and not allowed here"
    );
}
