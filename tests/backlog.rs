//! Admission by backlog: while a reader of the stream is past its lag bound, ingest sheds with
//! 503 `overloaded` and `Retry-After`, stores nothing of the shed request, and takes requests
//! again by itself once the reader catches up.

mod harness;

use std::time::Duration;

use harness::{Nats, Northstar, eventually, metric, test_config, tracks};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn ingest_sheds_past_the_archive_lag_bound_loses_nothing_and_resumes() {
    let nats = Nats::start();
    let mut config = test_config();
    // The archive commits every 10 s: between commits its lag only grows, past 100 events soon.
    config["archive"] = json!({"commitInterval": "10s"});
    config["ingest"]["maxArchiveLag"] = json!(100);
    let server = Northstar::start(&nats, &config);

    let mut acked: u64 = 0;
    let mut shed = None;
    for round in 0..50 {
        let batch = tracks(&format!("r{round}"), 0..50);
        let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
        match answer.status {
            200 => acked += 50,
            503 => {
                shed = Some((round, answer));
                break;
            }
            other => panic!("round {round}: {other} {}", answer.text()),
        }
    }
    let (shed_round, answer) = shed.expect("a 503 within 50 batches of 50 events");
    assert_eq!(
        acked, 100,
        "shedding starts when the next request would pass the bound, neither before nor past it"
    );
    let body = answer.json();
    assert_eq!(body["code"], "overloaded", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("ingest.maxArchiveLag")),
        "names the bound: {body}"
    );
    assert_eq!(
        answer
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let metrics = server.get("/metrics").await.text();
    assert!(
        metric(&metrics, "northstar_ingest_shed_total ").is_some_and(|n| n >= 1),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "northstar_consumer_lag{reader=\"archive\"} ").is_some_and(|n| n == 100),
        "{metrics}"
    );

    // Once the archive commits, ingest takes requests again by itself.
    let resumed = tracks("after", 0..10);
    eventually(Duration::from_secs(60), async || {
        let answer = server.post("/v1/batch", &json!({"batch": resumed})).await;
        match answer.status {
            200 => Ok(()),
            status => Err(format!("still {status}: {}", answer.text())),
        }
    })
    .await;
    acked += 10;
    server.wait_archived(acked).await;
    let rows = server
        .sql(&format!(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS ids, \
             sum(CASE WHEN event_id LIKE 'r{shed_round}-%' THEN 1 ELSE 0 END) AS shed \
             FROM events"
        ))
        .await;
    assert_eq!(rows[0]["n"], acked, "every acked event, once: {rows:?}");
    assert_eq!(rows[0]["ids"], acked);
    assert_eq!(rows[0]["shed"], 0, "nothing of the shed batch is stored");

    // The followers' lag is reported, and back to 0 once they have applied everything.
    eventually(Duration::from_secs(30), async || {
        let metrics = server.get("/metrics").await.text();
        match metric(&metrics, "northstar_consumer_lag{reader=\"followers\"} ") {
            Some(0) => Ok(()),
            other => Err(format!("followers lag {other:?}")),
        }
    })
    .await;
}

/// A consume writes to the stream like ingest does: while ingest sheds, `/v1/check` with
/// `consume: true` is refused the same way (it used to bypass admission and the disk reserve,
/// and its backlog was invisible to shedding), and a plain check still answers.
#[tokio::test(flavor = "multi_thread")]
async fn consumes_are_shed_with_ingest() {
    let nats = Nats::start();
    let mut config = test_config();
    config["serviceKeys"] = json!([harness::SERVICE_KEY]);
    // The archive never commits within the test: once past 100 events, its lag stays past.
    config["archive"] = json!({"commitInterval": "1h", "maxRowsPerCommit": 1_000_000});
    config["ingest"]["maxArchiveLag"] = json!(100);
    let server = Northstar::start(&nats, &config);
    let round = std::cell::Cell::new(0);
    let shed = eventually(Duration::from_secs(60), async || {
        round.set(round.get() + 1);
        let batch = tracks(&format!("fill{}", round.get()), 0..50);
        let answer = server.post("/v1/batch", &json!({"batch": batch})).await;
        match answer.status {
            503 => Ok(answer),
            _ => Err(answer.text()),
        }
    })
    .await;
    assert_eq!(shed.json()["code"], "overloaded");
    let check = async |consume: bool| {
        let bearer = format!("Bearer {}", harness::SERVICE_KEY);
        server
            .client
            .post_json(
                &format!("{}/v1/check", server.base),
                &[("authorization", &bearer)],
                &json!({"customer_id": "cust-1", "feature": "api_requests", "consume": consume}),
            )
            .await
            .expect("answered")
    };
    let refused = check(true).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json()["code"], "overloaded", "{}", refused.text());
    assert_eq!(
        refused
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let plain = check(false).await;
    assert_eq!(
        plain.status, 200,
        "a check that writes nothing still answers"
    );
}
