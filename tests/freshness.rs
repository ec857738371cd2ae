//! Freshness of the limits API: the meter takes an event in the moment ingest's publish is
//! acked, so the first `/v1/check`-side answer after a 200 already counts it, however far
//! behind the stream followers are; and the followers' later delivery never counts it twice,
//! across a kill -9 too.

mod harness;

use std::time::Duration;

use async_nats::jetstream;
use harness::{Nats, Northstar, SERVICE_KEY, eventually, metric, scalar, test_config, tracks};
use northstar::event::{EventRecord, EventType};
use serde_json::json;

const BACKLOG: usize = 50_000;

fn call(id: &str, customer: &str) -> serde_json::Value {
    json!({"type": "track", "messageId": id, "userId": "u", "event": "api_call_made",
           "context": {"groupId": customer}, "properties": {"endpoint": "/x"}})
}

async fn used(server: &Northstar, customer: &str) -> f64 {
    entitlement(server, customer).await["used"]
        .as_f64()
        .unwrap_or(-1.0)
}

async fn entitlement(server: &Northstar, customer: &str) -> serde_json::Value {
    let answer = server
        .get_as(
            SERVICE_KEY,
            &format!("/v1/customers/{customer}/entitlements/api_requests"),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()
}

/// Puts `n` metered events for `customer` straight on the stream, as another northstar node
/// would: the followers have them to digest, ingest never saw them.
async fn flood(nats_url: &str, customer: &str, n: usize) {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = jetstream::new(client);
    let now = northstar::clock::system_micros();
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let record = EventRecord {
            event_id: format!("{customer}-{i}"),
            kind: EventType::Track,
            event: Some("api_call_made".into()),
            user_id: Some("bulk-user".into()),
            anonymous_id: None,
            customer_id: Some(customer.into()),
            timestamp: now,
            received_at: now,
            properties: serde_json::Map::new(),
            context: serde_json::Map::new(),
            source: "test".into(),
            schema_version: None,
            sample_rate: None,
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(record.to_bus_json().into())
            .message_id(record.event_id.clone());
        acks.push(
            js.send_publish("events.0.track", publish)
                .await
                .expect("publish"),
        );
        // The client holds a bounded number of acks in flight: take them in as they come.
        if acks.len() == 1_000 {
            for ack in acks.drain(..) {
                ack.await.expect("ack");
            }
        }
    }
    for ack in acks {
        ack.await.expect("ack");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_answer_after_an_ack_counts_the_event_however_far_behind_the_followers_are() {
    let nats = Nats::start();
    let mut config = test_config();
    config["serviceKeys"] = json!([SERVICE_KEY]);
    config["usageFeatures"][0]["limits"] = json!({"free": 1_000_000});
    config["metering"] = json!({"snapshotInterval": "500ms"});
    // The followers are 50,000 behind on purpose: ingest must not shed for it here.
    config["ingest"]["maxLag"] = json!(0);
    let mut server = Northstar::start(&nats, &config);
    assert_eq!(used(&server, "probe").await, 0.0);

    // The followers now have 50,000 metered events to digest…
    flood(&nats.url, "bulk", BACKLOG).await;
    // …and each probe event is counted in the very first answer after its 200.
    for i in 1..=20 {
        let answer = server
            .post(
                "/v1/batch",
                &json!({"batch": [call(&format!("probe-{i}"), "probe")]}),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let body = entitlement(&server, "probe").await;
        assert_eq!(
            body["used"].as_f64(),
            Some(f64::from(i)),
            "right after the ack of probe-{i}: {body}"
        );
    }
    // A retry of an acked event is a duplicate: not counted again.
    let again = server
        .post("/v1/batch", &json!({"batch": [call("probe-7", "probe")]}))
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(used(&server, "probe").await, 20.0);

    // Once the followers have delivered everything, nothing was counted twice.
    eventually(Duration::from_secs(60), async || {
        match used(&server, "bulk").await {
            n if n == BACKLOG as f64 => Ok(()),
            other => Err(format!("bulk used {other}")),
        }
    })
    .await;
    assert_eq!(used(&server, "probe").await, 20.0);

    // Events taken in at their ack and snapshotted before the follower delivered them are not
    // counted again by the replay after a kill -9. A second, larger backlog, published while
    // the server is stopped, keeps the followers away from them after its start until a
    // snapshot holds them as taken in ahead. (Published while it ran, the followers kept up
    // with the publisher and seldom left a probe ahead at a snapshot.)
    server.terminate();
    flood(&nats.url, "bulk2", 4 * BACKLOG).await;
    server.restart();
    for i in 21..=40 {
        let answer = server
            .post(
                "/v1/batch",
                &json!({"batch": [call(&format!("probe-{i}"), "probe")]}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let snapshot = server.data.join("meter/snapshot.jsonl");
    eventually(Duration::from_secs(30), async || {
        let text = std::fs::read_to_string(&snapshot).unwrap_or_default();
        match text.contains("\"ahead\":[") && !text.contains("\"ahead\":[]") {
            true => Ok(()),
            false => {
                Err("no snapshot yet holds events taken in ahead of the followers".to_string())
            }
        }
    })
    .await;
    server.kill9();
    server.restart();
    let first = eventually(Duration::from_secs(60), async || {
        let answer = server
            .get_as(SERVICE_KEY, "/v1/customers/probe/entitlements/api_requests")
            .await;
        match answer.status {
            200 => Ok(answer.json()),
            503 => Err(answer.text()),
            other => panic!("{other} {}", answer.text()),
        }
    })
    .await;
    assert_eq!(
        first["used"].as_f64(),
        Some(40.0),
        "the first answer after the restart: {first}"
    );
    eventually(Duration::from_secs(60), async || {
        match used(&server, "bulk2").await {
            n if n == 4.0 * BACKLOG as f64 => Ok(()),
            other => Err(format!("bulk2 used {other}")),
        }
    })
    .await;
    assert_eq!(used(&server, "bulk").await, BACKLOG as f64);
    assert_eq!(used(&server, "probe").await, 40.0, "nothing counted twice");
}

/// Reads `northstar_archive_last_seq` of the events table from `/metrics`.
async fn committed_seq(server: &Northstar) -> u64 {
    let text = server.get("/metrics").await.text();
    metric(&text, "northstar_archive_last_seq{table=\"events\"} ").unwrap_or(0)
}

/// SQL reads the archiver's write buffer: an acked event is queryable before any commit
/// (none can happen here for an hour), and is counted once when the shutdown commits it and
/// after the restart.
#[tokio::test(flavor = "multi_thread")]
async fn sql_sees_an_acked_event_before_its_commit_and_once_after() {
    let nats = Nats::start();
    let mut config = test_config();
    config["archive"] = json!({"commitInterval": "1h", "maxRowsPerCommit": 1_000_000});
    let mut server = Northstar::start(&nats, &config);
    let answer = server
        .post("/v1/batch", &json!({"batch": tracks("buffered", 0..30)}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let count = "SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM events";
    eventually(Duration::from_secs(30), async || {
        match server.live_sql(count).await[0]["n"].as_u64() {
            Some(30) => Ok(()),
            other => Err(format!("SQL sees {other:?} of 30")),
        }
    })
    .await;
    assert_eq!(committed_seq(&server).await, 0, "nothing is committed yet");
    let manifest =
        northstar::archive::ArchiveManifest::load(&server.data.join("events")).expect("manifest");
    assert_eq!(manifest.rows, 0, "no Parquet file holds them yet");
    // The buffered rows have their partition column and answer filters like committed ones.
    let by_day = server
        .live_sql("SELECT date, count(*) AS n FROM events GROUP BY date ORDER BY date")
        .await;
    assert_eq!(by_day.len(), 3, "{by_day:?}");
    let third = server
        .live_sql(&format!(
            "SELECT count(*) AS n FROM events WHERE date = '{}'",
            by_day[1]["date"].as_str().expect("a date")
        ))
        .await;
    assert_eq!(third[0]["n"], by_day[1]["n"]);

    server.terminate();
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        30
    );
    server.restart();
    let rows = server.live_sql(count).await;
    assert_eq!(rows[0]["n"], 30, "{rows:?}");
    assert_eq!(rows[0]["ids"], 30, "{rows:?}");
}

/// Queries racing commits (one every 40 rows): every answer holds each stream sequence from 1
/// up to what it sees exactly once, and never fewer than the answer before. Commits come only
/// by size here, so between batches the buffer holds the rest, and the last answer reads rows
/// no commit holds.
#[tokio::test(flavor = "multi_thread")]
async fn queries_racing_commits_see_every_row_exactly_once() {
    const BATCHES: usize = 61;
    const PER_BATCH: usize = 50;
    let nats = Nats::start();
    let mut config = test_config();
    config["archive"] = json!({"commitInterval": "1h", "maxRowsPerCommit": 40});
    let server = std::sync::Arc::new(Northstar::start(&nats, &config));
    let writer = {
        let server = server.clone();
        tokio::spawn(async move {
            for b in 0..BATCHES {
                let batch = tracks(&format!("race{b}"), 0..PER_BATCH);
                let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
                assert_eq!(answer.status, 200, "{}", answer.text());
            }
        })
    };
    let total = (BATCHES * PER_BATCH) as u64;
    let (mut seen, mut queries, mut from_buffer) = (0u64, 0, 0);
    let started = std::time::Instant::now();
    let sql =
        "SELECT count(*) AS n, count(DISTINCT seq) AS d, coalesce(max(seq), 0) AS m FROM events";
    while seen < total {
        let rows = server.live_sql(sql).await;
        let (n, d, m) = (
            rows[0]["n"].as_u64().expect("n"),
            rows[0]["d"].as_u64().expect("d"),
            rows[0]["m"].as_u64().expect("m"),
        );
        assert!(
            n == d && d == m,
            "query {queries}: {n} rows, {d} sequences, max {m}"
        );
        assert!(n >= seen, "query {queries} saw {n} rows after {seen}");
        if n > committed_seq(&server).await {
            from_buffer += 1;
        }
        seen = n;
        queries += 1;
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "SQL saw {seen} of {total} events after {queries} queries"
        );
    }
    writer.await.expect("writer");
    assert_eq!(seen, total);
    // The buffer is read, whatever the timing: commits come by size only, so rows the last
    // commit left wait in the buffer; if it happened to leave none, one more event does.
    let mut expected = total;
    if committed_seq(&server).await >= total {
        let last = server
            .post("/v1/batch", &json!({"batch": tracks("race-last", 0..1)}))
            .await;
        assert_eq!(last.status, 200, "{}", last.text());
        expected += 1;
    }
    harness::eventually(Duration::from_secs(20), async || {
        let rows = server.live_sql(sql).await;
        match rows[0]["n"].as_u64() {
            Some(n) if n == expected => Ok(()),
            _ => Err(format!("{rows:?}")),
        }
    })
    .await;
    let committed = committed_seq(&server).await;
    assert!(
        committed < expected,
        "the answer counted {expected} rows with {committed} committed: none came from the write buffer"
    );
    eprintln!("{queries} queries, {from_buffer} saw uncommitted rows");
}
