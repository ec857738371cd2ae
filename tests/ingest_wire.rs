//! The Segment and PostHog wires, end to end: HTTP in, JetStream, Parquet, SQL out.

mod harness;

use std::io::Write;

use base64::Engine;
use harness::{Nats, Northstar, WRITE_KEY, scalar, test_config, tracks};
use northstar::client::basic_auth;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_batch_round_trips_to_sql() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let body = json!({
        "batch": [
            {"type": "track", "messageId": "m-1", "userId": "u1", "event": "api_call_made",
             "timestamp": "2026-03-04T05:06:07.123Z", "properties": {"endpoint": "/v1/search", "plan": "pro"},
             "context": {"groupId": "acme"}},
            {"type": "identify", "messageId": "m-2", "userId": "u1", "anonymousId": "anon-1",
             "traits": {"email": "a@b.c"}},
            {"type": "page", "messageId": "m-3", "anonymousId": "anon-1", "name": "Pricing",
             "properties": {"customer_id": "globex"}},
            {"type": "group", "messageId": "m-4", "userId": "u1", "groupId": "initech", "traits": {"seats": 5}},
            {"type": "alias", "messageId": "m-5", "userId": "u1", "previousId": "anon-1"},
            {"type": "screen", "messageId": "m-6", "userId": "u2", "name": "Home", "customerId": "hooli"}
        ],
        "context": {"library": {"name": "batch-lib"}, "ip": "10.0.0.1"},
        "integrations": {"All": true}
    });
    let response = server.post("/v1/batch", &body).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["success"], true);
    assert_eq!(response.json()["accepted"], 6);
    server.wait_archived(6).await;

    let rows = server
        .sql(
            "SELECT event_id, type, event, user_id, anonymous_id, customer_id, properties->>'endpoint' AS endpoint, \
             context->'library'->>'name' AS lib, context->>'ip' AS ip, source, date, seq, \
             CAST(timestamp AS VARCHAR) AS ts FROM events ORDER BY event_id",
        )
        .await;
    assert_eq!(rows.len(), 6);
    let track = &rows[0];
    assert_eq!(track["event_id"], "m-1");
    assert_eq!(track["type"], "track");
    assert_eq!(track["event"], "api_call_made");
    assert_eq!(track["customer_id"], "acme");
    assert_eq!(track["endpoint"], "/v1/search");
    assert_eq!(track["lib"], "batch-lib", "batch context merged in");
    assert_eq!(track["ip"], "10.0.0.1");
    assert_eq!(track["source"], "test");
    assert_eq!(track["date"], "2026-03-04");
    assert!(
        track["ts"]
            .as_str()
            .unwrap()
            .starts_with("2026-03-04T05:06:07.123")
    );
    let by_id = |id: &str| rows.iter().find(|r| r["event_id"] == id).unwrap().clone();
    assert_eq!(by_id("m-2")["anonymous_id"], "anon-1");
    assert_eq!(
        by_id("m-3")["customer_id"],
        "globex",
        "properties.customer_id"
    );
    assert_eq!(by_id("m-3")["event"], "Pricing");
    assert_eq!(
        by_id("m-4")["customer_id"],
        "initech",
        "a group call bills the group"
    );
    assert_eq!(
        by_id("m-6")["customer_id"],
        "hooli",
        "top-level customerId wins"
    );
    assert_eq!(by_id("m-6")["type"], "screen");
    let seqs: Vec<i64> = rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.iter().all(|s| (1..=6).contains(s)),
        "seq is the stream sequence: {seqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn single_routes_browser_aliases_and_every_key_form() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let json_type = ("content-type", "application/json");
    // Basic without a colon (older clients).
    let no_colon = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(WRITE_KEY)
    );
    let message = |id: &str| {
        json!({"messageId": id, "userId": "u", "event": "e"})
            .to_string()
            .into_bytes()
    };
    let r = server
        .post_raw(
            "/v1/track",
            &[json_type, ("authorization", &no_colon)],
            message("k-1"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // writeKey in the body, text/plain as the browser SDK sends it, on the short alias.
    let body = json!({"messageId": "k-2", "userId": "u", "event": "e", "writeKey": WRITE_KEY});
    let r = server
        .post_raw(
            "/v1/t",
            &[("content-type", "text/plain")],
            body.to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Bearer token that is not a key, plus the body key.
    let body = json!({"batch": [{"type": "track", "messageId": "k-3", "userId": "u", "event": "e"}], "writeKey": WRITE_KEY});
    let r = server
        .post_raw(
            "/v1/b",
            &[json_type, ("authorization", "Bearer some-oauth-token")],
            body.to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // gzip by header, and gzip found by its magic bytes alone.
    let gz = gzip(&message("k-4"));
    let auth = basic_auth(WRITE_KEY);
    let r = server
        .post_raw(
            "/v1/i",
            &[
                json_type,
                ("authorization", &auth),
                ("content-encoding", "gzip"),
            ],
            gzip(
                &json!({"messageId": "k-4", "userId": "u", "traits": {}})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server
        .post_raw("/v1/track", &[json_type, ("authorization", &auth)], gz)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server
        .post_raw(
            "/v1/p",
            &[json_type, ("authorization", &auth)],
            json!({"messageId": "k-5", "anonymousId": "a", "name": "Home"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server
        .post_raw(
            "/v1/s",
            &[json_type, ("authorization", &auth)],
            json!({"messageId": "k-6", "userId": "u", "name": "Main"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server
        .post_raw(
            "/v1/g",
            &[json_type, ("authorization", &auth)],
            json!({"messageId": "k-7", "userId": "u", "groupId": "acme"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server
        .post_raw(
            "/v1/a",
            &[json_type, ("authorization", &auth)],
            json!({"messageId": "k-8", "userId": "u", "previousId": "a"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The 4th request (k-4 identify) and the 5th (k-4 track) share an id: the second is a duplicate.
    server.wait_archived(7).await;
    let types = server
        .sql("SELECT event_id, type FROM events ORDER BY event_id")
        .await;
    let got: Vec<String> = types
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["event_id"].as_str().unwrap(),
                r["type"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "k-1:track",
            "k-2:track",
            "k-3:track",
            "k-4:identify",
            "k-5:page",
            "k-6:screen",
            "k-7:group",
            "k-8:alias"
        ]
    );

    // CORS preflight for the browser SDK.
    let r = server
        .client
        .send(
            http::Method::OPTIONS,
            &format!("{}/v1/t", server.base),
            &[],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(r.headers["access-control-allow-origin"], "*");

    // What else a browser SDK meets carries CORS too, so it reads the answer: an ingest
    // error, a flags request without its distinct id, and the preflight and 404 of a path
    // northstar does not serve (posthog-js asks for `/array/<key>/config`).
    let send = async |method: http::Method, path: &str, body: &[u8]| {
        server
            .client
            .send(
                method,
                &format!("{}{path}", server.base),
                &[],
                body.to_vec(),
            )
            .await
            .unwrap()
    };
    for (method, path, status) in [
        (http::Method::POST, "/v1/t", 401),
        (http::Method::OPTIONS, "/flags/?v=2", 204),
        (http::Method::POST, "/flags/?v=2", 400),
        (http::Method::OPTIONS, "/array/phc_key/config", 204),
        (http::Method::GET, "/array/phc_key/config", 404),
        (http::Method::GET, "/v1/batch", 405),
    ] {
        let r = send(method.clone(), path, br#"{"event": "e"}"#).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_eq!(
            r.headers
                .get("access-control-allow-origin")
                .map(|v| v.as_bytes()),
            Some(&b"*"[..]),
            "{method} {path}"
        );
    }
    // The keyed API answers carry none.
    let r = send(http::Method::POST, "/v1/sql", b"{}").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.headers.get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_posthog_batch_round_trips_to_sql() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let body = json!({
        "api_key": WRITE_KEY,
        "sent_at": "2026-03-04T05:06:08Z",
        "batch": [
            {"event": "api_call_made", "distinct_id": "u7", "uuid": "0190d5a0-0000-7000-8000-000000000001",
             "timestamp": "2026-03-04T05:06:07Z", "properties": {"$lib": "posthog-python", "endpoint": "/x",
             "$groups": {"customer": "acme"}}},
            {"event": "$identify", "distinct_id": "u7", "uuid": "0190d5a0-0000-7000-8000-000000000002",
             "properties": {"$anon_distinct_id": "anon-7"}, "$set": {"email": "u7@x.io"}},
            {"event": "$pageview", "distinct_id": "anon-8", "properties": {"$is_identified": false, "$current_url": "/"}}
        ]
    });
    let r = server
        .post_raw(
            "/batch/",
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], 1);
    // A single event on /capture/ with the key as `token`, and an array on /e/ (posthog-js).
    let single = json!({"event": "signup_completed", "distinct_id": "u9", "token": WRITE_KEY, "properties": {"plan": "free"}});
    let r = server
        .post_raw("/capture/", &[], single.to_string().into_bytes())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let array = json!([{"event": "core_action_completed", "distinct_id": "u9", "properties": {"token": WRITE_KEY}}]);
    let r = server
        .post_raw(
            "/e/?compression=gzip-js",
            &[],
            gzip(&array.to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    server.wait_archived(5).await;

    let rows = server.sql("SELECT event, type, user_id, anonymous_id, customer_id, context->'library'->>'name' AS lib FROM events ORDER BY seq").await;
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0]["customer_id"], "acme");
    assert_eq!(rows[0]["lib"], "posthog-python");
    assert_eq!(rows[1]["type"], "identify");
    assert_eq!(rows[1]["anonymous_id"], "anon-7");
    assert_eq!(rows[2]["type"], "page");
    assert!(rows[2]["user_id"].is_null());
    assert_eq!(rows[2]["anonymous_id"], "anon-8");
    assert_eq!(rows[3]["event"], "signup_completed");
    assert_eq!(rows[4]["event"], "core_action_completed");
    let set = scalar(
        &server.data,
        "SELECT count(*) FROM events WHERE (properties->'$set'->>'email') = 'u7@x.io'",
    )
    .await;
    assert_eq!(set, 1, "$set kept in properties");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_message_id_is_stored_once() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let mut batch = tracks("dup", 0..50);
    batch.push(batch[3].clone()); // a repeat inside the batch
    let first = server.post("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        (
            first.json()["accepted"].as_u64(),
            first.json()["duplicates"].as_u64()
        ),
        (Some(50), Some(1))
    );
    // The SDK retries the whole batch (its first answer was lost, say).
    let retry = server
        .post("/v1/batch", &json!({"batch": tracks("dup", 0..50)}))
        .await;
    assert_eq!(retry.status, 200);
    assert_eq!(
        (
            retry.json()["accepted"].as_u64(),
            retry.json()["duplicates"].as_u64()
        ),
        (Some(0), Some(50))
    );
    // And a PostHog retry of the same uuid.
    let ph = json!({"api_key": WRITE_KEY, "batch": [{"event": "x", "distinct_id": "d", "uuid": "0190d5a0-0000-7000-8000-00000000abcd"}]});
    for _ in 0..3 {
        assert_eq!(
            server
                .post_raw("/batch/", &[], ph.to_string().into_bytes())
                .await
                .status,
            200
        );
    }
    // A marker sent after the retries: once it is archived, any copy they stored would be
    // too (the archive commits in stream order).
    let marker = server
        .post("/v1/batch", &json!({"batch": tracks("marker", 0..1)}))
        .await;
    assert_eq!(marker.status, 200, "{}", marker.text());
    server.wait_archived(52).await;
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        52
    );
    assert_eq!(
        scalar(&server.data, "SELECT count(DISTINCT event_id) FROM events").await,
        52
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_the_right_4xx_and_never_costs_a_neighbour() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let auth = basic_auth(WRITE_KEY);
    let json_type = ("content-type", "application/json");
    let code = |r: &northstar::client::ClientResponse| {
        r.json()["code"].as_str().unwrap_or_default().to_string()
    };

    // Wrong or missing key: 401 with a code.
    let r = server
        .post_raw(
            "/v1/batch",
            &[json_type, ("authorization", &basic_auth("nope-nope-nope"))],
            b"{\"batch\":[]}".to_vec(),
        )
        .await;
    assert_eq!((r.status, code(&r).as_str()), (401, "invalid_write_key"));
    let r = server
        .post_raw("/v1/batch", &[json_type], b"{\"batch\":[]}".to_vec())
        .await;
    assert_eq!((r.status, code(&r).as_str()), (401, "missing_write_key"));
    // Not JSON at all: 400, and the body is kept in the rejected store.
    let r = server
        .post_raw(
            "/v1/batch",
            &[json_type, ("authorization", &auth)],
            b"{\"batch\": [ oops".to_vec(),
        )
        .await;
    assert_eq!((r.status, code(&r).as_str()), (400, "invalid_json"));
    assert!(r.json()["message"].as_str().unwrap().contains("batch"));
    // Over the batch size (after decompression): 413.
    let big = json!({"batch": [{"type": "track", "userId": "u", "event": "e", "properties": {"x": "y".repeat(600_000)}}]});
    let r = server
        .post_raw(
            "/v1/batch",
            &[json_type, ("authorization", &auth)],
            gzip(&big.to_string().into_bytes()),
        )
        .await;
    assert_eq!((r.status, code(&r).as_str()), (413, "payload_too_large"));
    // Too many messages: 413.
    let r = server
        .post("/v1/batch", &json!({"batch": vec![json!({}); 2_501]}))
        .await;
    assert_eq!(r.status, 413);
    // A broken gzip body: 400.
    let r = server
        .post_raw(
            "/v1/batch",
            &[
                json_type,
                ("authorization", &auth),
                ("content-encoding", "gzip"),
            ],
            b"\x1f\x8b\x08garbage".to_vec(),
        )
        .await;
    assert_eq!((r.status, code(&r).as_str()), (400, "invalid_body"));
    // Unknown route and wrong method.
    assert_eq!(server.post("/v1/nope", &json!({})).await.status, 404);
    assert_eq!(server.get("/v1/batch").await.status, 405);

    // A batch with good and bad messages: good ones stored, bad ones rejected with the field named.
    let mut batch = tracks("mixed", 0..10);
    batch.insert(
        2,
        json!({"type": "track", "messageId": "bad-1", "userId": "u"}),
    );
    batch.insert(
        5,
        json!({"type": "track", "messageId": "bad-2", "event": "e"}),
    );
    batch.insert(7, json!("not an object"));
    batch.insert(8, json!({"type": "track", "messageId": "bad-3", "userId": "u", "event": "e", "properties": {"x": "y".repeat(40_000)}}));
    batch.insert(
        9,
        json!({"type": "teleport", "messageId": "bad-4", "userId": "u"}),
    );
    batch.insert(10, json!({"type": "track", "messageId": "bad-5", "userId": "u", "event": "e", "timestamp": "last tuesday"}));
    let r = server.post("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(
        (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
        (Some(10), Some(6))
    );
    let fields: Vec<&str> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["event", "userId", ".", ".", "type", "timestamp"]);
    assert_eq!(answer["errors"][0]["index"], 2);

    // A batch context that would multiply a small message past the bound costs only that message.
    let ctx = json!({"batch": [
            {"type": "track", "messageId": "ctx-ok", "userId": "u", "event": "e"},
            {"type": "track", "messageId": "ctx-big", "userId": "u", "event": "e", "properties": {"p": "y".repeat(20_000)}}
        ], "context": {"blob": "x".repeat(20_000)}});
    let r = server.post("/v1/batch", &ctx).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (r.json()["accepted"].as_u64(), r.json()["rejected"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(r.json()["errors"][0]["field"], "context");
    // A batch-level field of the wrong type is ignored, not fatal to the batch.
    let r = server
        .post(
            "/v1/batch",
            &json!({"batch": tracks("typed", 0..2), "context": "oops", "integrations": 5}),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["accepted"].as_u64()),
        (200, Some(2)),
        "{}",
        r.text()
    );

    // Still serving.
    let r = server
        .post("/v1/batch", &json!({"batch": tracks("after", 0..3)}))
        .await;
    assert_eq!(r.status, 200);
    server.wait_archived(16).await;
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        16
    );

    // Every rejected message is in rejected_events, with its reason and raw payload.
    harness::wait_rows(&server.data, "rejected_events", 8).await;
    let rows = server.sql("SELECT event_id, reasons, payload, route, source FROM rejected_events WHERE event_id = 'bad-5'").await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["reasons"].as_str().unwrap().contains("timestamp"));
    assert!(
        rows[0]["payload"]
            .as_str()
            .unwrap()
            .contains("last tuesday")
    );
    assert_eq!(rows[0]["route"], "/v1/batch");
    assert_eq!(rows[0]["source"], "test");
    let unreadable = scalar(
        &server.data,
        "SELECT count(*) FROM rejected_events WHERE payload LIKE '%oops%'",
    )
    .await;
    assert_eq!(unreadable, 1, "an authenticated unreadable body is kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_answer_on_the_seed_config() {
    let nats = Nats::start();
    let mut config = test_config();
    config.as_object_mut().unwrap().remove("archive");
    let server = Northstar::start(&nats, &config);
    let health = server.get("/healthz").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json()["nats"], "connected");
    let metrics = server.get("/metrics").await.text();
    assert!(metrics.contains("northstar_stream_lag"), "{metrics}");
    assert_eq!(
        harness::metric(
            &metrics,
            "northstar_http_request_duration_seconds_count{route=\"healthz\"}"
        ),
        Some(1),
        "the /healthz answer is timed: {metrics}"
    );
    promtool_accepts(&metrics);
    // A Prometheus server asks for OpenMetrics first, and gets it.
    let accept =
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let open = server
        .client
        .get(&format!("{}/metrics", server.base), &[("accept", accept)])
        .await
        .expect("answered");
    assert_eq!(open.status, 200);
    assert_eq!(
        open.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let open = open.text();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE northstar_ingest_events_accepted counter"),
        "{open}"
    );

    // The meter's counters: three metered events, counted (or late, for an old period).
    let r = server
        .post("/v1/batch", &json!({"batch": tracks("metered", 0..3)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let metered = |text: &str| -> u64 {
        ["applied", "late"]
            .iter()
            .map(|kind| {
                let name = format!("northstar_meter_events_{kind}_total ");
                text.lines()
                    .find_map(|l| l.strip_prefix(name.as_str()))
                    .map_or(0, |v| v.trim().parse().unwrap())
            })
            .sum()
    };
    let text = harness::eventually(std::time::Duration::from_secs(20), async || {
        let text = server.get("/metrics").await.text();
        match metered(&text) {
            3 => Ok(text),
            n => Err(format!("{n} metered events counted")),
        }
    })
    .await;
    assert!(
        text.contains("northstar_meter_events_skipped_total 0"),
        "{text}"
    );
}

/// `promtool check metrics` (Prometheus's own linter) accepts the exposition. promtool comes
/// with `scripts/install-deps.sh --test`; without it the check is said to be skipped, and
/// under CI its absence fails.
fn promtool_accepts(metrics: &str) {
    use std::io::Write as _;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is missing ({error}): scripts/install-deps.sh --test installs it"
            );
            eprintln!("promtool not installed ({error}): /metrics not checked by it");
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_template_as_it_stands_with_the_env_write_key() {
    let nats = Nats::start();
    let seed: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/config-template.json")).unwrap();
    let server = Northstar::start_with_env(
        &nats,
        &seed,
        &[("NORTHSTAR_WRITE_KEY", "wk_from_the_environment")],
    );
    let r = server
        .post_raw(
            "/v1/track",
            &[
                ("content-type", "application/json"),
                ("authorization", &basic_auth("wk_from_the_environment")),
            ],
            json!({"userId": "u", "event": "signup_completed", "messageId": "env-1"})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    server.wait_archived(1).await;
    let rows = server.sql("SELECT source FROM events").await;
    assert_eq!(
        rows[0]["source"], "default",
        "NORTHSTAR_WRITE_KEY belongs to source `default`"
    );
    // Another key is still refused.
    let r = server
        .post("/v1/track", &json!({"userId": "u", "event": "e"}))
        .await;
    assert_eq!(r.status, 401);
}

/// `ingest.maxMessageBytes` bounds a message as the client sent it, through every wire: a
/// message of exactly the bound is stored (northstar's own fields never tip it over), one byte
/// more is refused naming the bound, and in a batch with a batch-level context the bytes
/// really merged in count, and the refusal says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_at_the_bound_as_sent_is_stored_through_every_wire() {
    const LIMIT: usize = 4_096;
    let nats = Nats::start();
    let mut config = test_config();
    config["ingest"]["maxMessageBytes"] = json!(LIMIT);
    let server = Northstar::start(&nats, &config);
    // A message whose JSON text is exactly `size` bytes, padded in one property.
    let sized = |size: usize, make: &dyn Fn(&str) -> serde_json::Value| {
        let empty = make("").to_string().len();
        let message = make(&"x".repeat(size - empty));
        assert_eq!(message.to_string().len(), size);
        message
    };
    let segment = |id: &'static str| move |pad: &str| json!({"type": "track", "messageId": id, "userId": "u", "event": "e", "properties": {"pad": pad}});

    // Segment batch.
    let batch = json!({"batch": [sized(LIMIT, &segment("seg-at")), sized(LIMIT + 1, &segment("seg-over"))]});
    let answer = server.post("/v1/batch", &batch).await.json();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["errors"][0]["index"], 1, "{answer}");
    assert_eq!(answer["errors"][0]["field"], ".", "{answer}");
    let over = format!("message is {} bytes; the limit is {LIMIT}", LIMIT + 1);
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains(&over),
        "{answer}"
    );

    // Segment batch with a batch context: `"lib":"batch",` (14 bytes) is merged into each.
    let merged = r#""lib":"batch","#.len();
    let batch = json!({"context": {"lib": "batch"}, "batch": [
        sized(LIMIT - merged, &segment("ctx-at")),
        sized(LIMIT - merged + 1, &segment("ctx-over")),
    ]});
    let answer = server.post("/v1/batch", &batch).await.json();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["errors"][0]["index"], 1, "{answer}");
    assert_eq!(answer["errors"][0]["field"], "context", "{answer}");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("merged into it add {merged}")),
        "{answer}"
    );

    // Segment single-message route: the body is the message.
    let single = |id: &'static str| move |pad: &str| json!({"messageId": id, "userId": "u", "event": "e", "properties": {"pad": pad}});
    let at = server
        .post("/v1/track", &sized(LIMIT, &single("one-at")))
        .await;
    assert_eq!(at.status, 200, "{}", at.text());
    let over = server
        .post("/v1/track", &sized(LIMIT + 1, &single("one-over")))
        .await;
    assert_eq!(over.status, 413, "{}", over.text());

    // PostHog batch: each event as sent.
    let posthog = |uuid: &'static str| move |pad: &str| json!({"event": "e", "distinct_id": "u", "uuid": uuid, "properties": {"pad": pad}});
    let body = json!({"api_key": WRITE_KEY, "batch": [
        sized(LIMIT, &posthog("0190d5a0-0000-7000-8000-00000000b001")),
        sized(LIMIT + 1, &posthog("0190d5a0-0000-7000-8000-00000000b002")),
    ]});
    let r = server
        .post_raw(
            "/batch/",
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    server.wait_archived(4).await;
    let stored = harness::query(
        &server.data,
        "SELECT event_id FROM events ORDER BY event_id",
    )
    .await;
    let ids: Vec<&str> = stored
        .iter()
        .filter_map(|r| r["event_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "0190d5a0-0000-7000-8000-00000000b001",
            "ctx-at",
            "one-at",
            "seg-at"
        ],
        "every message at the bound, none past it"
    );
    harness::wait_rows(&server.data, "rejected_events", 3).await;
}
