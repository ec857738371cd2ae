//! Stream retention: the events stream is bounded by size (and age), Parquet keeps the whole
//! history, and retention never drops a message before the archive has it: a reader near
//! the stream's oldest message makes ingest shed instead, so even a kill -9 of an archiver
//! holding uncommitted events loses none of them.

mod harness;

use std::time::Duration;

use harness::{Nats, Northstar, SERVICE_KEY, eventually, metric, test_config};
use serde_json::{Value, json};

/// Metered calls stamped now (so they count in the current period), over five customers.
fn calls(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"type": "track", "messageId": format!("{prefix}-{i}"), "userId": format!("user-{}", i % 17),
                   "event": "api_call_made", "context": {"groupId": format!("cust-{}", i % 5)},
                   "properties": {"endpoint": "/v1/search", "n": i}})
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_smaller_than_the_history_keeps_its_bound_and_parquet_keeps_everything() {
    let nats = Nats::start();
    let mut config = test_config();
    config["serviceKeys"] = json!([SERVICE_KEY]);
    let max_bytes: u64 = 1024 * 1024;
    config["stream"] = json!({"maxBytes": max_bytes, "maxAge": "7d"});
    // A 1 MiB stream holds four requests of at most 256 KB (the config refuses less).
    config["ingest"]["maxBatchBytes"] = json!(256 * 1024);
    // The archive commits every 3 s: between commits it falls far enough behind that
    // retention would drop what it has not read, unless ingest sheds first.
    config["archive"] = json!({"commitInterval": "3s"});
    config["metering"] = json!({"snapshotInterval": "2s"});
    let mut server = Northstar::start(&nats, &config);

    // About 2.5 MB of events into a 1 MiB stream: retention drops the oldest as it goes.
    let (mut acked, mut shed): (u64, Vec<String>) = (0, Vec::new());
    for round in 0..60 {
        eventually(Duration::from_secs(60), async || {
            let batch = calls(&format!("r{round}"), 100);
            let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
            match answer.status {
                200 => Ok(()),
                503 if answer.json()["code"] == "overloaded" => {
                    shed.push(answer.json()["message"].as_str().unwrap_or("").to_string());
                    Err(answer.text())
                }
                other => panic!("round {round}: {other} {}", answer.text()),
            }
        })
        .await;
        acked += 100;
    }
    assert!(
        shed.iter().any(|m| m.contains("stream.maxBytes")),
        "ingest shed before retention could drop unarchived events: {shed:?}"
    );

    // kill -9 while the archive holds up to 3 s of events it has not committed: they must
    // still be in the stream when it starts again.
    server.kill9();
    server.restart();
    server.wait_archived(acked).await;
    let rows = server
        .sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events")
        .await;
    assert_eq!(
        (rows[0]["n"].as_u64(), rows[0]["d"].as_u64()),
        (Some(acked), Some(acked)),
        "Parquet holds every acked event once, though the stream no longer does"
    );
    // The followers' state came back from their snapshots and what the stream still held:
    // the meter's usage is SQL's count, customer by customer.
    for customer in 0..5 {
        let counted = server
            .sql(&format!(
                "SELECT count(*) AS n FROM events WHERE customer_id = 'cust-{customer}'"
            ))
            .await[0]["n"]
            .as_f64();
        let used = usage_of(&server, customer).await.as_f64();
        assert_eq!(
            used, counted,
            "cust-{customer}: meter = SQL after the restart"
        );
    }
    let metrics = eventually(Duration::from_secs(10), async || {
        let text = server.get("/metrics").await.text();
        match metric(&text, "northstar_stream_first_seq ") {
            Some(first) if first > 1 => Ok(text),
            other => Err(format!("first sequence {other:?}")),
        }
    })
    .await;
    let bytes = metric(&metrics, "northstar_stream_bytes ").expect("stream bytes");
    assert!(
        bytes <= max_bytes,
        "the stream stays within stream.maxBytes: {bytes}"
    );
    let messages = metric(&metrics, "northstar_stream_messages ").expect("messages");
    assert!(
        messages < acked,
        "{messages} of {acked} still in the stream"
    );
}

/// Posts `batch`, again while ingest sheds (503), until it is taken (60 s at most).
async fn post_while_shed(server: &Northstar, batch: Vec<Value>) {
    eventually(Duration::from_secs(60), async || {
        let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
        match answer.status {
            200 => Ok(()),
            503 => Err(answer.text()),
            other => panic!("{other} {}", answer.text()),
        }
    })
    .await;
}

/// Runs `northstar replay --data <data>`; returns whether it succeeded and what it printed.
fn replay(data: &std::path::Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args(["replay", "--data"])
        .arg(data)
        .output()
        .expect("run northstar replay");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

async fn usage_of(server: &Northstar, customer: usize) -> Value {
    eventually(Duration::from_secs(60), async || {
        let answer = server
            .get_as(
                SERVICE_KEY,
                &format!("/v1/customers/cust-{customer}/entitlements/api_requests"),
            )
            .await;
        match answer.status {
            200 => Ok(answer.json()["used"].clone()),
            503 => Err(answer.text()),
            other => panic!("{other} {}", answer.text()),
        }
    })
    .await
}

/// The stream keeps a fraction of the history; `northstar replay` sets the followers' state
/// aside, and the next start rebuilds it from Parquet for what the stream dropped, then from
/// the stream: the meter's usage and the identity graph equal what they were before.
#[tokio::test(flavor = "multi_thread")]
async fn state_rebuilt_from_parquet_and_the_stream_equals_the_state_before() {
    let nats = Nats::start();
    let mut config = test_config();
    config["serviceKeys"] = json!([SERVICE_KEY]);
    config["stream"] = json!({"maxBytes": 1024 * 1024, "maxAge": "7d"});
    config["ingest"]["maxBatchBytes"] = json!(256 * 1024);
    config["archive"] = json!({"commitInterval": "500ms"});
    config["metering"] = json!({"snapshotInterval": "1s"});
    let mut server = Northstar::start(&nats, &config);

    // The identities come first, so retention drops them from the stream.
    let identifies: Vec<Value> = (0..17)
        .map(|k| {
            json!({"type": "identify", "messageId": format!("id-{k}"),
                        "anonymousId": format!("anon-{k}"), "userId": format!("user-{k}")})
        })
        .collect();
    let answer = server
        .post("/v1/batch", &json!({"batch": identifies}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let mut acked: u64 = 17;
    for round in 0..60 {
        post_while_shed(&server, calls(&format!("r{round}"), 100)).await;
        acked += 100;
    }
    server.wait_archived(acked).await;
    let first_seq = eventually(Duration::from_secs(10), async || {
        let text = server.get("/metrics").await.text();
        match metric(&text, "northstar_stream_first_seq ") {
            Some(first) if first > 17 => Ok(first),
            other => Err(format!(
                "first sequence {other:?}: the identities are still in the stream"
            )),
        }
    })
    .await;
    let identities = "SELECT id, person_id FROM identities ORDER BY id";
    let graph = eventually(Duration::from_secs(30), async || {
        let rows = server.sql(identities).await;
        // One row per anonymous id that was identified.
        match rows.len() {
            17 => Ok(rows),
            n => Err(format!("{n} identity rows")),
        }
    })
    .await;
    let mut before = Vec::new();
    for customer in 0..5 {
        before.push(usage_of(&server, customer).await);
    }
    assert_eq!(
        before.iter().filter_map(Value::as_f64).sum::<f64>(),
        6_000.0
    );

    let (ok, said) = replay(&server.data);
    assert!(
        !ok && said.contains("running"),
        "replay refuses while the server runs: {said}"
    );
    server.terminate();
    let (ok, said) = replay(&server.data);
    assert!(ok, "{said}");
    assert!(said.contains("set aside"), "{said}");
    assert!(
        !server.data.join("meter/snapshot.jsonl").exists(),
        "the meter's snapshot is set aside"
    );

    server.restart();
    for (customer, used) in before.iter().enumerate() {
        assert_eq!(
            &usage_of(&server, customer).await,
            used,
            "cust-{customer}: the first answer after the rebuild (stream from {first_seq})"
        );
    }
    eventually(Duration::from_secs(30), async || {
        let rows = server.sql(identities).await;
        match rows == graph {
            true => Ok(()),
            false => Err(format!("identities now {rows:?}")),
        }
    })
    .await;

    // The same rebuild over Parquet files that cannot be read: the followers go on from the
    // stream, but the limits API must not answer the undercount, and /healthz says why.
    server.terminate();
    let (ok, said) = replay(&server.data);
    assert!(ok, "{said}");
    for file in parquet_files(&server.data.join("events")) {
        std::fs::write(&file, b"not parquet").expect("spoil a Parquet file");
    }
    server.restart();
    let refused = eventually(Duration::from_secs(60), async || {
        let answer = server
            .get_as(
                SERVICE_KEY,
                "/v1/customers/cust-0/entitlements/api_requests",
            )
            .await;
        match answer.json()["code"].as_str() {
            Some("usage_incomplete") => Ok(answer),
            _ => Err(answer.text()),
        }
    })
    .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let health = server.get("/healthz").await;
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(
        health.text().contains("replay from Parquet"),
        "{}",
        health.text()
    );
}

/// Every `.parquet` file under `dir`.
fn parquet_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                found.push(path);
            }
        }
    }
    found
}

/// A smaller size bound at a start (a fuller disk derives a smaller budget, or the config
/// changed) used to shrink the stream at once: nats-server dropped its oldest messages, read
/// by no one yet. The bound now stays at what the stream holds until every reader has saved
/// it, then comes down.
#[tokio::test(flavor = "multi_thread")]
async fn a_smaller_bound_at_start_drops_nothing_unsaved() {
    let nats = Nats::start();
    let mut config = test_config();
    config["stream"] = json!({"maxBytes": 8 * 1024 * 1024, "maxAge": "7d"});
    config["ingest"]["maxBatchBytes"] = json!(256 * 1024);
    config["archive"] = json!({"commitInterval": "1h", "maxRowsPerCommit": 1_000_000});
    let mut server = Northstar::start(&nats, &config);
    let mut acked = 0;
    for round in 0..40 {
        post_while_shed(&server, calls(&format!("s{round}"), 100)).await;
        acked += 100;
    }
    let held = eventually(Duration::from_secs(10), async || {
        let text = server.get("/metrics").await.text();
        match metric(&text, "northstar_stream_bytes ") {
            Some(bytes) if bytes > 1024 * 1024 => Ok(bytes),
            other => Err(format!("stream bytes {other:?}")),
        }
    })
    .await;
    // Nothing is in Parquet yet.
    server.kill9();
    config["stream"]["maxBytes"] = json!(1024 * 1024);
    config["archive"] = json!({"commitInterval": "200ms"});
    config["metering"] = json!({"snapshotInterval": "200ms"});
    server.set_config(&config);
    server.restart();
    server.wait_archived(acked).await;
    let rows = server
        .sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events")
        .await;
    assert_eq!(
        (rows[0]["n"].as_u64(), rows[0]["d"].as_u64()),
        (Some(acked), Some(acked)),
        "every acked event reached Parquet once though the bound shrank (held {held} bytes)"
    );
    let metrics = server.get("/metrics").await.text();
    assert_eq!(
        metric(&metrics, "northstar_archive_lost_total{table=\"events\"} "),
        Some(0),
        "{metrics}"
    );
    eventually(Duration::from_secs(30), async || {
        let text = server.get("/metrics").await.text();
        match metric(&text, "northstar_stream_bytes ") {
            Some(bytes) if bytes <= 1024 * 1024 => Ok(()),
            other => Err(format!(
                "the bound has not come down: stream bytes {other:?}"
            )),
        }
    })
    .await;
}

/// `archive.retention`: days of the `events` table older than the retention are dropped whole,
/// with a metric; the days inside it, and another table without a retention, keep everything.
#[tokio::test(flavor = "multi_thread")]
async fn days_past_the_archive_retention_are_dropped_whole() {
    let nats = Nats::start();
    let mut config = test_config();
    config["archive"] = json!({"retention": {"events": "3d"}});
    let server = Northstar::start(&nats, &config);
    let day = 86_400_000_000i64;
    let now = northstar::clock::system_micros();
    let stamped = |id: &str, at: i64| {
        json!({"type": "track", "messageId": id, "userId": "u", "event": "kept_or_not",
               "timestamp": northstar::clock::format_micros(at)})
    };
    let mut batch: Vec<Value> = (0..5)
        .map(|i| stamped(&format!("old-{i}"), now - 10 * day))
        .collect();
    batch.extend((0..3).map(|i| stamped(&format!("week-{i}"), now - 6 * day)));
    batch.extend((0..4).map(|i| stamped(&format!("new-{i}"), now - day / 2)));
    // A message the registry refuses goes to rejected_events, which keeps everything.
    batch.push(json!({"type": "track", "messageId": "bad", "userId": "u", "timestamp": 5}));
    let sent = server.post("/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(
        (sent.status, sent.json()["accepted"].as_u64()),
        (200, Some(12)),
        "{}",
        sent.text()
    );
    let text = eventually(Duration::from_secs(30), async || {
        let text = server.get("/metrics").await.text();
        match metric(
            &text,
            "northstar_archive_expired_partitions_total{table=\"events\"} ",
        ) {
            Some(days) if days >= 2 => Ok(text),
            n => Err(format!("{n:?} days dropped")),
        }
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "northstar_archive_expired_partitions_total{table=\"rejected_events\"} "
        ),
        Some(0)
    );
    let kept = server
        .live_sql("SELECT event_id FROM events ORDER BY event_id")
        .await;
    let ids: Vec<&str> = kept.iter().filter_map(|r| r["event_id"].as_str()).collect();
    assert_eq!(
        ids,
        ["new-0", "new-1", "new-2", "new-3"],
        "only the days within 3 days stay"
    );
    let rejected = server
        .live_sql("SELECT count(*) AS n FROM rejected_events")
        .await;
    assert_eq!(rejected[0]["n"], 1);
    let dates: Vec<String> = std::fs::read_dir(server.data.join("events"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("date="))
        .collect();
    assert_eq!(dates.len(), 1, "one day left on disk: {dates:?}");
}
