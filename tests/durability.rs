//! Guarantees 1–3 under failure: acked ⇒ durable; repeats stored once; every stream message
//! in Parquet exactly once across kill -9 of northstar, a NATS outage and a graceful stop.

mod harness;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{Nats, Northstar, WRITE_KEY, query, scalar, test_config, tracks};
use northstar::client::{HttpClient, basic_auth};
use serde_json::json;

/// Messages in the events stream and its last sequence, read from JetStream itself.
async fn stream_state(nats_url: &str) -> (u64, u64) {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("EVENTS").await.expect("stream");
    let info = stream.info().await.expect("info");
    (info.state.messages, info.state.last_sequence)
}

/// Waits until the archive has committed everything the stream holds.
async fn wait_caught_up(nats_url: &str, data: &std::path::Path) -> u64 {
    harness::eventually(Duration::from_secs(90), async || {
        let (_, last) = stream_state(nats_url).await;
        let manifest =
            northstar::archive::ArchiveManifest::load(&data.join("events")).unwrap_or_default();
        if manifest.last_seq >= last {
            Ok(last)
        } else {
            Err(format!("archive at {} of {last}", manifest.last_seq))
        }
    })
    .await
}

/// Clients that post batches until told to stop or the server vanishes; returns acked ids.
fn spawn_clients(
    base: String,
    round: usize,
    clients: usize,
    acked: Arc<Mutex<HashSet<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (base, acked) = (base.clone(), acked.clone());
            tokio::spawn(async move {
                let http = HttpClient::new();
                let auth = basic_auth(WRITE_KEY);
                for i in 0.. {
                    let prefix = format!("r{round}-c{c}-b{i}");
                    let batch = tracks(&prefix, 0..100);
                    let ids: Vec<String> = batch
                        .iter()
                        .map(|m| m["messageId"].as_str().unwrap().to_string())
                        .collect();
                    match http
                        .post_json(
                            &format!("{base}/v1/batch"),
                            &[("authorization", &auth)],
                            &json!({"batch": batch}),
                        )
                        .await
                    {
                        Ok(r) if r.status == 200 => acked.lock().unwrap().extend(ids),
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_ingest_then_restart_keeps_every_acked_event_exactly_once() {
    let nats = Nats::start();
    let mut config = test_config();
    // Commit constantly, so the kills land inside commits, renames and manifest writes.
    config["archive"] =
        json!({"commitInterval": "20ms", "maxRowsPerCommit": 250, "compactMinFiles": 4});
    let mut server = Northstar::start(&nats, &config);
    let acked = Arc::new(Mutex::new(HashSet::new()));
    for (round, pause) in [70u64, 45, 90, 30].into_iter().enumerate() {
        let before = acked.lock().unwrap().len();
        let clients = spawn_clients(server.base.clone(), round, 4, acked.clone());
        // Ingest until a real amount is acked (however slow the machine), then kill a little
        // later, at a different point each round.
        harness::eventually(Duration::from_secs(120), async || {
            let now = acked.lock().unwrap().len();
            match now >= before + 400 {
                true => Ok(()),
                false => Err(format!("round {round}: {} acked", now - before)),
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        server.kill9();
        for client in clients {
            let _ = client.await;
        }
        server.restart();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 1_000,
        "the test must ingest a real amount: {}",
        acked.len()
    );

    let last_seq = wait_caught_up(&nats.url, &server.data).await;
    let (messages, _) = stream_state(&nats.url).await;
    let total = scalar(&server.data, "SELECT count(*) FROM events").await as u64;
    let distinct = scalar(&server.data, "SELECT count(DISTINCT event_id) FROM events").await as u64;
    let distinct_seq = scalar(&server.data, "SELECT count(DISTINCT seq) FROM events").await as u64;
    assert_eq!(total, messages, "every stream message is in Parquet");
    assert_eq!(total, distinct, "no event twice");
    assert_eq!(total, distinct_seq, "no stream message twice");
    assert_eq!(
        scalar(&server.data, "SELECT max(seq) FROM events").await as u64,
        last_seq
    );
    let stored: HashSet<String> = query(&server.data, "SELECT event_id FROM events")
        .await
        .into_iter()
        .map(|r| r["event_id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = acked.difference(&stored).take(5).collect();
    assert!(missing.is_empty(), "acked but not stored: {missing:?}");
    assert_eq!(
        scalar(&server.data, "SELECT count(DISTINCT date) FROM events").await,
        3,
        "commits spanned partitions"
    );
    // No temp files or journals left behind once caught up and stopped.
    server.terminate();
    let left = harness::leftovers(&server.data.join("events"));
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_killed_while_the_archiver_drains_a_backlog_loses_nothing() {
    let mut nats = Nats::start();
    let mut config = test_config();
    config["archive"] = json!({"commitInterval": "100ms", "maxRowsPerCommit": 2000});
    let mut server = Northstar::start(&nats, &config);
    server.terminate();
    // A backlog builds while northstar is down …
    let sent = 30_000;
    publish_directly(&nats.url, "backlog", 0..sent).await;
    // … and NATS dies while northstar is draining it.
    server.restart();
    tokio::time::sleep(Duration::from_millis(40)).await;
    nats.kill();
    // NATS comes back only once northstar has seen it gone.
    harness::eventually(Duration::from_secs(15), async || {
        let health = server.get("/healthz").await;
        match health.json()["nats"].as_str() {
            Some("disconnected") => Ok(()),
            _ => Err(health.text()),
        }
    })
    .await;
    nats.restart();
    let last = wait_caught_up(&nats.url, &server.data).await;
    assert_eq!(last, sent as u64);
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        sent as i64
    );
    assert_eq!(
        scalar(&server.data, "SELECT count(DISTINCT seq) FROM events").await,
        sent as i64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_cut_mid_delivery_lose_nothing() {
    // The server stays up and remembers what it delivered; the messages in the cut
    // connection never arrive. Acking past them (AckAll) would lose them for good.
    let nats = Nats::start();
    let proxy = harness::CutProxy::start(nats.port).await;
    let mut config = test_config();
    config["archive"] = json!({"commitInterval": "100ms", "maxRowsPerCommit": 2000});
    let mut server = Northstar::start_at(&proxy.url(), &config);
    server.terminate();
    let sent = 30_000;
    publish_directly(&nats.url, "cut", 0..sent).await;
    server.restart();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        proxy.cut();
    }
    let last = wait_caught_up(&nats.url, &server.data).await;
    assert_eq!(last, sent as u64);
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        sent as i64
    );
    assert_eq!(
        scalar(&server.data, "SELECT count(DISTINCT seq) FROM events").await,
        sent as i64
    );
    let metrics = server.get("/metrics").await.text();
    let repositions = metrics
        .lines()
        .find(|l| l.starts_with("northstar_archive_repositions_total{table=\"events\"}"))
        .unwrap_or_default();
    eprintln!("{repositions}");
}

/// Publishes events straight to the stream, as northstar's ingest would have.
async fn publish_directly(nats_url: &str, prefix: &str, range: std::ops::Range<usize>) {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let messages = tracks(prefix, range);
    for chunk in messages.chunks(2_000) {
        let mut acks = Vec::new();
        for message in chunk {
            let record = northstar::ingest::segment::normalize(
                message.as_object().cloned().unwrap(),
                None,
                Default::default(),
                "test",
                0,
            )
            .unwrap();
            acks.push(
                js.publish("events.0.track", record.to_bus_json().into())
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_deleted_from_the_stream_does_not_stall_the_archive() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &test_config());
    server.terminate();
    // While northstar is down, ten events reach the stream and an operator deletes the fifth.
    publish_directly(&nats.url, "del", 0..10).await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("EVENTS").await.unwrap();
    assert!(stream.delete_message(5).await.unwrap());
    server.restart();
    server.send_batch(tracks("del-after", 0..5)).await;
    wait_caught_up(&nats.url, &server.data).await;
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        14
    );
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events WHERE seq = 5").await,
        0
    );
    // The loss is not silent: both readers count it (and log it at error).
    let metrics = server.get("/metrics").await.text();
    assert_eq!(
        harness::metric(&metrics, "northstar_archive_lost_total{table=\"events\"} "),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        harness::metric(&metrics, "northstar_followers_lost_total "),
        Some(1),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_outage_answers_503_then_ingest_resumes_with_nothing_lost() {
    let mut nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let before = server
        .post("/v1/batch", &json!({"batch": tracks("before", 0..20)}))
        .await;
    assert_eq!(before.status, 200);

    nats.kill();
    let refused = harness::eventually(Duration::from_secs(20), async || {
        let r = server
            .post("/v1/batch", &json!({"batch": tracks("during", 0..20)}))
            .await;
        if r.status == 503 {
            return Ok(r);
        }
        assert_eq!(r.status, 200, "{}", r.text());
        Err("no 503 while NATS is down".to_string())
    })
    .await;
    assert_eq!(refused.json()["code"], "stream_unavailable");
    assert!(
        refused.headers.contains_key("retry-after"),
        "503 says when to retry"
    );
    assert_eq!(server.get("/healthz").await.status, 503);

    nats.restart();
    // The SDK's retry: the same batch until it is accepted.
    harness::eventually(Duration::from_secs(30), async || {
        let r = server
            .post("/v1/batch", &json!({"batch": tracks("during", 0..20)}))
            .await;
        if r.status == 200 {
            return Ok(());
        }
        assert_eq!(r.status, 503, "{}", r.text());
        Err("ingest did not resume after NATS came back".to_string())
    })
    .await;
    let after = server
        .post("/v1/batch", &json!({"batch": tracks("after", 0..20)}))
        .await;
    assert_eq!(after.status, 200);
    assert_eq!(server.get("/healthz").await.status, 200);

    wait_caught_up(&nats.url, &server.data).await;
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        60
    );
    assert_eq!(
        scalar(&server.data, "SELECT count(DISTINCT event_id) FROM events").await,
        60
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_commits_what_is_buffered_before_exiting() {
    let nats = Nats::start();
    let mut config = test_config();
    // Nothing would commit on its own for an hour: only the shutdown path can.
    config["archive"] = json!({"commitInterval": "1h", "maxRowsPerCommit": 1000000});
    let mut server = Northstar::start(&nats, &config);
    let r = server
        .post("/v1/batch", &json!({"batch": tracks("term", 0..500)}))
        .await;
    assert_eq!(r.status, 200);
    // Wait until the archiver holds them (SQL sees them in its buffer), then stop gracefully.
    harness::eventually(Duration::from_secs(30), async || {
        let text = server.get("/metrics").await.text();
        match harness::metric(&text, "northstar_archive_visible_seq{table=\"events\"} ") {
            Some(500) => Ok(()),
            other => Err(format!("the archiver holds up to {other:?} of 500")),
        }
    })
    .await;
    assert_eq!(
        server.live_sql("SELECT count(*) AS n FROM events").await[0]["n"],
        500
    );
    assert_eq!(
        northstar::archive::ArchiveManifest::load(&server.data.join("events"))
            .unwrap()
            .rows,
        0
    );
    server.terminate();
    let manifest = northstar::archive::ArchiveManifest::load(&server.data.join("events")).unwrap();
    assert_eq!(manifest.rows, 500, "SIGTERM committed the buffer");
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        500
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_nats_server_lives_and_dies_with_northstar() {
    let mut server = Northstar::start_embedded(&test_config());
    let r = server
        .post("/v1/batch", &json!({"batch": tracks("emb", 0..30)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    server.wait_archived(30).await;
    let pid_file = server.data.join("jetstream/nats-server.pid");
    let nats_pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{nats_pid}")).exists());

    server.kill9();
    harness::eventually(Duration::from_secs(10), async || match is_alive(nats_pid) {
        true => Err("nats-server outlived a kill -9 of northstar".to_string()),
        false => Ok(()),
    })
    .await;
    server.restart();
    let r = server
        .post("/v1/batch", &json!({"batch": tracks("emb2", 0..30)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    server.wait_archived(60).await;
    assert_eq!(
        scalar(&server.data, "SELECT count(DISTINCT event_id) FROM events").await,
        60
    );
    server.terminate();
    let nats_pid: u32 = std::fs::read_to_string(&pid_file)
        .map(|t| t.trim().parse().unwrap_or(0))
        .unwrap_or(0);
    assert!(
        nats_pid == 0 || !is_alive(nats_pid),
        "a graceful stop stops the embedded server too"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_data_dir_starts_again_and_again_on_the_embedded_server() {
    // nats-server 2.9 keeps no stream creation time across its restarts: state tied to it was
    // refused (the archive) or thrown away (the meter) at every start after the second.
    let mut server = Northstar::start_embedded(&test_config());
    for round in 0..6u64 {
        let r = server
            .post(
                "/v1/batch",
                &json!({"batch": tracks(&format!("again{round}"), 0..20)}),
            )
            .await;
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        server.wait_archived(20 * (round + 1)).await;
        if round % 2 == 0 {
            server.terminate();
        } else {
            server.kill9();
        }
        server.restart();
    }
    // Ready once the meter has replayed what the stream held at start.
    harness::eventually(Duration::from_secs(30), async || {
        let r = server.get("/healthz").await;
        match r.status {
            200 => Ok(()),
            _ => Err(r.text()),
        }
    })
    .await;
    // Every event once: as many rows as ids, so a duplicate cannot hide behind DISTINCT.
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        120
    );
    assert_eq!(
        scalar(&server.data, "SELECT count(DISTINCT event_id) FROM events").await,
        120
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_restart_the_limits_api_answers_complete_usage_or_503() {
    let nats = Nats::start();
    let mut config = test_config();
    config["serviceKeys"] = json!([harness::SERVICE_KEY]);
    // No snapshot before the kill: the restart replays everything.
    config["metering"] = json!({"snapshotInterval": "1h"});
    let mut server = Northstar::start(&nats, &config);
    let batches = 8;
    for b in 0..batches {
        let batch: Vec<serde_json::Value> = (0..500)
            .map(|i| {
                json!({"type": "track", "messageId": format!("ready-{b}-{i}"), "userId": "u1",
                       "event": "api_call_made", "context": {"groupId": "c1"}, "properties": {"endpoint": "/x"}})
            })
            .collect();
        let r = server.post("/v1/batch", &json!({"batch": batch})).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let total = f64::from(batches * 500);
    let entitlement = async |server: &Northstar| {
        let bearer = format!("Bearer {}", harness::SERVICE_KEY);
        server
            .client
            .get(
                &format!("{}/v1/customers/c1/entitlements/api_requests", server.base),
                &[("authorization", &bearer)],
            )
            .await
            .expect("answered")
    };
    harness::eventually(Duration::from_secs(30), async || {
        let body = entitlement(&server).await.json();
        match body["used"].as_f64() == Some(total) {
            true => Ok(()),
            false => Err(format!("before the kill: {body}")),
        }
    })
    .await;
    for _ in 0..2 {
        server.kill9();
        server.restart();
        // Every answer from the first one on is the whole usage, or 503 with Retry-After.
        let mut waited = 0;
        loop {
            let r = entitlement(&server).await;
            if r.status == 503 {
                assert!(r.headers.contains_key("retry-after"), "{}", r.text());
                assert_eq!(r.json()["code"], "replaying", "{}", r.text());
                waited += 1;
                assert!(waited < 3_000, "still replaying");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json()["used"].as_f64(), Some(total), "{}", r.text());
            break;
        }
        let health = server.get("/healthz").await;
        assert_eq!(health.status, 200, "{}", health.text());
    }
}

/// Whether a process is alive (and not a zombie).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split_whitespace().nth(2) != Some("Z"))
}

/// Posts `batches` batches of 100 from each of `clients` clients; returns the ids sent.
async fn post_batches(base: &str, prefix: &str, clients: usize, batches: usize) -> HashSet<String> {
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (base, prefix) = (base.to_string(), prefix.to_string());
            tokio::spawn(async move {
                let http = HttpClient::new();
                let auth = basic_auth(WRITE_KEY);
                let mut ids = Vec::new();
                for b in 0..batches {
                    let batch = tracks(&format!("{prefix}-c{c}-b{b}"), 0..100);
                    let r = http
                        .post_json(
                            &format!("{base}/v1/batch"),
                            &[("authorization", &auth)],
                            &json!({"batch": batch}),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                    ids.extend(
                        batch
                            .iter()
                            .map(|m| m["messageId"].as_str().unwrap().to_string()),
                    );
                }
                ids
            })
        })
        .collect();
    let mut sent = HashSet::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    sent
}

/// Every event sent is in Parquet once, and nothing else is.
async fn assert_archived_once(nats_url: &str, data: &std::path::Path, sent: &HashSet<String>) {
    wait_caught_up(nats_url, data).await;
    let total = scalar(data, "SELECT count(*) FROM events").await as usize;
    let distinct = scalar(data, "SELECT count(DISTINCT event_id) FROM events").await as usize;
    let distinct_seq = scalar(data, "SELECT count(DISTINCT seq) FROM events").await as usize;
    assert_eq!(total, sent.len(), "every event in Parquet");
    assert_eq!(distinct, total, "no event twice");
    assert_eq!(distinct_seq, total, "no stream message twice");
}

/// Messages the archiver's own consumer has delivered.
async fn own_deliveries(nats_url: &str) -> u64 {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("EVENTS").await.expect("stream");
    let mut consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("archiver-events")
        .await
        .expect("the archiver's consumer");
    consumer
        .info()
        .await
        .expect("info")
        .delivered
        .consumer_sequence
}

#[tokio::test(flavor = "multi_thread")]
async fn the_archiver_reads_the_followers_delivery_so_nats_delivers_each_event_once() {
    let nats = Nats::start();
    let mut config = test_config();
    config["archive"] = json!({"commitInterval": "100ms"});
    let server = Northstar::start(&nats, &config);
    let sent = post_batches(&server.base, "once", 2, 25).await;
    assert_archived_once(&nats.url, &server.data, &sent).await;
    let own = own_deliveries(&nats.url).await;
    assert!(
        own < sent.len() as u64 / 2,
        "the archiver read {own} of {} events through a delivery of its own",
        sent.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_without_room_costs_the_archive_nothing() {
    let nats = Nats::start();
    let mut config = test_config();
    // Room for two messages, and a commit every 100 rows: the follower loop drops most of
    // what it hands on, and the archiver must read it through its own consumer.
    config["archive"] =
        json!({"commitInterval": "20ms", "maxRowsPerCommit": 100, "feedCapacity": 2});
    let mut server = Northstar::start(&nats, &config);
    let mut sent = post_batches(&server.base, "tight", 4, 10).await;
    // Across a kill -9 as well.
    server.kill9();
    server.restart();
    sent.extend(post_batches(&server.base, "after", 2, 10).await);
    assert_archived_once(&nats.url, &server.data, &sent).await;
    let metrics = server.get("/metrics").await.text();
    let gaps: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("northstar_archive_feed_gaps_total{table=\"events\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_default();
    assert!(
        gaps > 0.0,
        "the feed dropped messages and the archiver read them: {metrics}"
    );
}
