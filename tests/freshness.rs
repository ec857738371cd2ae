//! Freshness of the limits API: the meter takes an event in the moment ingest's publish is
//! acked, so the first `/v1/check`-side answer after a 200 already counts it, however far
//! behind the stream followers are; and the followers' later delivery never counts it twice,
//! across a kill -9 too.

mod harness;

use std::time::Duration;

use async_nats::jetstream;
use harness::{Nats, Northstar, SERVICE_KEY, eventually, test_config};
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
            event_id: format!("bulk-{i}"),
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
    // counted again by the replay after a kill -9.
    for i in 21..=40 {
        let answer = server
            .post(
                "/v1/batch",
                &json!({"batch": [call(&format!("probe-{i}"), "probe")]}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
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
    assert_eq!(used(&server, "bulk").await, BACKLOG as f64);
}
