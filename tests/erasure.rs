//! Erasing a person (`DELETE /v1/persons/{id}`): every id merged into them, their events in
//! Parquet and in the stream, their place in the identity graph; everyone else's events stay
//! in Parquet exactly once. Under ingest, across a kill -9 in the middle of the rewrite, and
//! across a restart and a replay.

mod harness;

use std::collections::HashSet;
use std::time::Duration;

use harness::{ADMIN_KEY, Nats, Northstar, eventually, test_config};
use serde_json::{Value, json};

/// The person to erase: anonymous activity on four days, identified as `user-p`, an older
/// id aliased in. 24 events.
fn person_events() -> Vec<Value> {
    let mut events = Vec::new();
    for i in 0..8 {
        events.push(json!({"type": "track", "messageId": format!("p-anon-{i}"), "anonymousId": "anon-p",
            "event": "page_viewed", "timestamp": format!("2026-03-0{}T08:00:0{}Z", 1 + i % 4, i % 10),
            "properties": {"email": "p@example.com"}}));
    }
    events.push(json!({"type": "identify", "messageId": "p-identify", "anonymousId": "anon-p",
        "userId": "user-p", "timestamp": "2026-03-04T09:00:00Z", "traits": {"email": "p@example.com"}}));
    events.push(
        json!({"type": "alias", "messageId": "p-alias", "previousId": "old-p",
        "userId": "user-p", "timestamp": "2026-03-04T09:00:01Z"}),
    );
    for i in 0..6 {
        events.push(
            json!({"type": "track", "messageId": format!("p-old-{i}"), "anonymousId": "old-p",
            "event": "page_viewed", "timestamp": format!("2026-03-0{}T07:00:0{}Z", 1 + i % 4, i)}),
        );
    }
    for i in 0..8 {
        events.push(json!({"type": "track", "messageId": format!("p-user-{i}"), "userId": "user-p",
            "event": "report_created", "timestamp": format!("2026-03-0{}T10:00:0{}Z", 1 + i % 4, i)}));
    }
    events
}

/// Other people's events with ids `{prefix}-{i}`, over the same four days.
fn others(prefix: &str, range: std::ops::Range<usize>) -> Vec<Value> {
    range
        .map(|i| {
            json!({"type": "track", "messageId": format!("{prefix}-{i}"), "userId": format!("other-{}", i % 13),
                   "anonymousId": format!("anon-other-{}", i % 13),
                   "event": "page_viewed", "timestamp": format!("2026-03-0{}T11:{:02}:00Z", 1 + i % 4, i % 60)})
        })
        .collect()
}

const PERSON_IDS: [&str; 3] = ["anon-p", "user-p", "old-p"];

fn of_person(column_prefix: &str) -> String {
    let list = PERSON_IDS
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("({column_prefix}user_id IN ({list}) OR {column_prefix}anonymous_id IN ({list}))")
}

/// `DELETE /v1/persons/{id}` with the admin key: status and JSON.
async fn delete_person(server: &Northstar, id: &str) -> (u16, Value) {
    delete_person_as(server, ADMIN_KEY, id).await
}

/// `DELETE /v1/persons/{id}` with `key`.
async fn delete_person_as(server: &Northstar, key: &str, id: &str) -> (u16, Value) {
    let bearer = format!("Bearer {key}");
    let answer = server
        .client
        .send(
            http::Method::DELETE,
            &format!("{}/v1/persons/{id}", server.base),
            &[("authorization", &bearer)],
            Vec::new(),
        )
        .await
        .expect("answered");
    (answer.status, answer.json())
}

/// The temp files in the events table's day directories (a rewrite not yet swapped in).
fn temp_files(data: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data.join("events"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|day| {
            std::fs::read_dir(day.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect()
}

async fn erasure(server: &Northstar, job: &str) -> Value {
    let answer = server
        .get_as(ADMIN_KEY, &format!("/v1/erasures/{job}"))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()
}

async fn wait_done(server: &Northstar, job: &str) -> Value {
    eventually(Duration::from_secs(90), async || {
        let status = erasure(server, job).await;
        match status["done"].as_bool() {
            Some(true) => Ok(status),
            _ => Err(status.to_string()),
        }
    })
    .await
}

/// The stream sequences of the person's events, as Parquet has them now.
async fn person_seqs(server: &Northstar) -> Vec<u64> {
    server
        .live_sql(&format!(
            "SELECT seq FROM events WHERE {} ORDER BY seq",
            of_person("")
        ))
        .await
        .iter()
        .filter_map(|row| row["seq"].as_u64())
        .collect()
}

/// Every other event is in Parquet exactly once, and nothing of the person is left.
async fn assert_erased_and_others_once(
    server: &Northstar,
    others_sent: &HashSet<String>,
    upto: u64,
) {
    let rows = server
        .live_sql(&format!(
            "SELECT count(*) AS n FROM events WHERE seq <= {upto} AND {}",
            of_person("")
        ))
        .await;
    assert_eq!(rows[0]["n"], 0, "none of the person's events is left");
    let rows = server
        .live_sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events WHERE event_id NOT LIKE 'p-%'")
        .await;
    assert_eq!(
        (rows[0]["n"].as_u64(), rows[0]["d"].as_u64()),
        (
            Some(others_sent.len() as u64),
            Some(others_sent.len() as u64)
        ),
        "every other event exactly once"
    );
    let rows = server
        .live_sql(&format!(
            "SELECT count(*) AS n FROM identities WHERE seq <= {upto} AND (id IN ('anon-p', 'user-p', 'old-p') OR person_id IN ('anon-p', 'user-p', 'old-p'))"
        ))
        .await;
    assert_eq!(rows[0]["n"], 0, "no identity link of the person is left");
    let answer = server.get_as(ADMIN_KEY, "/v1/persons/anon-p").await;
    assert_eq!(answer.status, 404, "{}", answer.text());
}

async fn stream_holds(nats_url: &str, seq: u64) -> bool {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("EVENTS").await.unwrap();
    stream.get_raw_message(seq).await.is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erased_person_is_gone_under_ingest_and_stays_gone_across_restart_and_replay() {
    let nats = Nats::start();
    let mut config = test_config();
    config["serviceKeys"] = json!([harness::SERVICE_KEY]);
    let mut server = Northstar::start(&nats, &config);
    let mut sent: HashSet<String> = HashSet::new();
    let mut first = others("before", 0..399);
    // Someone else's merge, which the identity table keeps through the erasure.
    first.push(
        json!({"type": "identify", "messageId": "before-q", "anonymousId": "anon-q",
        "userId": "user-q", "timestamp": "2026-03-02T09:00:00Z"}),
    );
    sent.extend(
        first
            .iter()
            .map(|e| e["messageId"].as_str().unwrap().to_string()),
    );
    server.send_batch(first).await;
    server.send_batch(person_events()).await;
    server.wait_archived(400 + 24).await;
    let seqs = person_seqs(&server).await;
    assert_eq!(seqs.len(), 24, "the person's events before the erasure");
    assert!(stream_holds(&nats.url, seqs[0]).await);

    // Others keep sending while the person is erased.
    let base = server.base.clone();
    let ingest = tokio::spawn(async move {
        let api = harness_api(&base);
        let mut ids = Vec::new();
        for round in 0..20 {
            let batch = others(&format!("during{round}"), 0..50);
            ids.extend(
                batch
                    .iter()
                    .map(|e| e["messageId"].as_str().unwrap().to_string()),
            );
            api.send_batch(batch).await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ids
    });
    let (status, answer) = delete_person(&server, "old-p").await;
    assert_eq!(status, 202, "{answer}");
    let job = answer["job"].as_str().unwrap().to_string();
    assert_eq!(answer["status_url"], format!("/v1/erasures/{job}"));
    let done = wait_done(&server, &job).await;
    sent.extend(ingest.await.unwrap());
    let mut ids: Vec<&str> = done["ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["anon-p", "old-p", "user-p"],
        "every id merged into the person"
    );
    assert_eq!(done["rows_erased"], 24, "{done}");
    assert_eq!(done["messages_deleted"], 24, "{done}");
    let upto = done["upto_seq"].as_u64().unwrap();
    server.wait_archived(400 + 24 + 1000).await;
    assert_erased_and_others_once(&server, &sent, upto).await;
    for seq in &seqs {
        assert!(
            !stream_holds(&nats.url, *seq).await,
            "message {seq} left the stream"
        );
    }

    // The same id coming back afterwards is a new person.
    server
        .send_batch([
            json!({"type": "track", "messageId": "p-after", "userId": "user-p",
            "event": "page_viewed", "timestamp": "2026-03-05T08:00:00Z"}),
        ])
        .await;
    server.wait_archived(400 + 24 + 1000 + 1).await;
    let back = server.get_as(ADMIN_KEY, "/v1/persons/user-p").await;
    assert_eq!(back.status, 200, "{}", back.text());

    // kill -9, then a replay that rebuilds every follower from the stream and Parquet: the
    // person stays erased.
    server.kill9();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args(["replay", "--data"])
        .arg(&server.data)
        .output()
        .expect("run northstar replay");
    assert!(output.status.success(), "{output:?}");
    server.restart();
    eventually(Duration::from_secs(60), async || {
        let rows = server
            .live_sql("SELECT count(*) AS n FROM identities")
            .await;
        match rows[0]["n"].as_u64() {
            Some(n) if n > 0 => Ok(()),
            other => Err(format!("identities rebuilt: {other:?}")),
        }
    })
    .await;
    let q = server.get_as(ADMIN_KEY, "/v1/persons/anon-q").await;
    assert_eq!(q.status, 200, "{}", q.text());
    assert_eq!(q.json()["person_id"], "user-q", "{}", q.text());
    eventually(Duration::from_secs(60), async || {
        let answer = server.get_as(ADMIN_KEY, "/v1/persons/user-p").await;
        match answer.status {
            200 => Ok(()),
            _ => Err(answer.text()),
        }
    })
    .await;
    assert_erased_and_others_once(&server, &sent, upto).await;
    let status = erasure(&server, &job).await;
    assert_eq!(status["done"], true, "the log survives: {status}");
    let flags = server
        .get_as(harness::SERVICE_KEY, "/v1/users/anon-p/flags")
        .await;
    assert!(
        !flags.text().contains("user-p"),
        "the onboarding engine forgot the merge: {}",
        flags.text()
    );
}

fn harness_api(base: &str) -> harness::Api {
    harness::Api {
        base: base.to_string(),
        client: northstar::client::HttpClient::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_9_in_the_middle_of_the_rewrite_resumes_the_erasure() {
    let nats = Nats::start();
    let mut server = Northstar::start_with_env(
        &nats,
        &test_config(),
        &[("NORTHSTAR_TEST_ERASE_PAUSE_MS", "1500")],
    );
    let sent_others = others("o", 0..300);
    let sent: HashSet<String> = sent_others
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    server.send_batch(sent_others).await;
    server.send_batch(person_events()).await;
    server.wait_archived(324).await;

    let (status, answer) = delete_person(&server, "user-p").await;
    assert_eq!(status, 202, "{answer}");
    let job = answer["job"].as_str().unwrap().to_string();
    // The first file rewritten and the next one written but not yet swapped in.
    eventually(Duration::from_secs(60), async || {
        let status = erasure(&server, &job).await;
        let temp = !temp_files(&server.data).is_empty();
        match (
            status["phase"].as_str(),
            status["files_done"].as_u64(),
            temp,
        ) {
            (Some("rewriting"), Some(done), true) if done >= 1 => Ok(()),
            _ => Err(status.to_string()),
        }
    })
    .await;
    server.kill9();
    server.restart();
    let done = wait_done(&server, &job).await;
    assert_eq!(done["rows_erased"], 24, "{done}");
    let upto = done["upto_seq"].as_u64().unwrap();
    assert_erased_and_others_once(&server, &sent, upto).await;
    let leftovers = temp_files(&server.data);
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn erasing_needs_the_admin_key_and_a_known_person() {
    let nats = Nats::start();
    let mut config = test_config();
    config["serviceKeys"] = json!([harness::SERVICE_KEY]);
    let server = Northstar::start(&nats, &config);
    server.send_batch(others("o", 0..5)).await;
    server.wait_archived(5).await;
    let (status, answer) = delete_person(&server, "nobody-here").await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["code"], "person_not_found");
    let (status, refused) = delete_person_as(&server, harness::SERVICE_KEY, "other-1").await;
    assert_eq!(status, 403, "{refused}");
    let missing = server.get_as(ADMIN_KEY, "/v1/erasures/erase-99").await;
    assert_eq!(missing.status, 404);
    let list = server.get_as(ADMIN_KEY, "/v1/erasures").await;
    assert_eq!(list.json()["erasures"], json!([]));
}
