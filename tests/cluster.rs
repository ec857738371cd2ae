//! Past one machine, the NATS side: northstar against a real three-node nats-server cluster
//! (`--nats-url` with every node's URL, `stream.replicas: 3`). A node killed mid-ingest loses
//! nothing acked and doubles nothing; a single server refuses replicas it cannot give, saying so.

mod harness;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use harness::{Api, Nats, NatsCluster, Northstar, eventually, test_config};
use serde_json::{Value, json};

const BATCHES: usize = 60;
const PER_BATCH: usize = 50;

fn batch(round: usize) -> Vec<Value> {
    (0..PER_BATCH)
        .map(|i| {
            json!({"type": "track", "messageId": format!("c{round}-{i}"), "userId": format!("u{}", i % 7),
                   "event": "api_call_made", "timestamp": "2026-03-04T05:06:07Z",
                   "context": {"groupId": "acme"}, "properties": {"endpoint": "/v1/search"}})
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_node_killed_mid_ingest_loses_and_doubles_nothing_acked() {
    let mut cluster = NatsCluster::start(3).await;
    let mut config = test_config();
    config["stream"] = json!({"replicas": 3});
    let server = Northstar::start_at(&cluster.url, &config);

    // One client sends batch after batch; a batch the server could not store (503 while the
    // cluster moves its leaders) is sent again, with the same ids, until it is acked.
    let acked = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (api, acked) = (
            Api {
                base: server.base.clone(),
                client: northstar::client::HttpClient::new(),
            },
            acked.clone(),
        );
        tokio::spawn(async move {
            let mut retried = 0;
            for round in 0..BATCHES {
                loop {
                    let answer = api
                        .post_raw(
                            "/v1/batch",
                            &[
                                ("content-type", "application/json"),
                                (
                                    "authorization",
                                    &northstar::client::basic_auth(harness::WRITE_KEY),
                                ),
                            ],
                            json!({"batch": batch(round)}).to_string().into_bytes(),
                        )
                        .await;
                    match answer.status {
                        200 => break,
                        503 | 504 => {
                            retried += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        other => panic!("round {round}: {other} {}", answer.text()),
                    }
                }
                acked.fetch_add(1, Ordering::SeqCst);
            }
            retried
        })
    };
    // Kill a node a third of the way in, and bring it back once everything is sent.
    eventually(Duration::from_secs(120), async || {
        match acked.load(Ordering::SeqCst) >= BATCHES / 3 {
            true => Ok(()),
            false => Err(format!("{} batches acked", acked.load(Ordering::SeqCst))),
        }
    })
    .await;
    cluster.kill(0);
    let at_kill = acked.load(Ordering::SeqCst);
    let retried = sender.await.expect("the sender finished");
    assert!(
        at_kill < BATCHES,
        "the node died mid-ingest ({at_kill} of {BATCHES} batches acked)"
    );
    cluster.restart(0);

    let total = (BATCHES * PER_BATCH) as u64;
    server.wait_archived(total).await;
    let rows = server
        .live_sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events")
        .await;
    assert_eq!(
        (rows[0]["n"].as_u64(), rows[0]["d"].as_u64()),
        (Some(total), Some(total)),
        "every acked event in Parquet exactly once ({retried} requests sent again)"
    );
    // The stream kept three replicas throughout.
    let client = async_nats::connect(cluster.url.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("EVENTS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.state.messages, total);
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_a_single_server_cannot_give_are_refused_with_the_reason() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config["stream"] = json!({"replicas": 3});
    let config_path = dir.path().join("northstar.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let serve = |nats_url: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_northstar"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--data")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("NORTHSTAR_NATS_URL");
        if let Some(url) = nats_url {
            command.args(["--nats-url", url]);
        }
        command.output().expect("run northstar serve")
    };
    for (nats_url, says) in [
        (Some(nats.url.as_str()), "not a cluster"),
        (None, "embedded nats-server is one server"),
    ] {
        let output = serve(nats_url);
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text}");
        assert!(
            text.contains("stream.replicas is 3") && text.contains(says),
            "{text}"
        );
    }
}
