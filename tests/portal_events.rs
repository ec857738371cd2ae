//! `GET /v1/portal/events`: a customer's threshold crossings, plan changes and suspension as
//! Server-Sent Events, read by curl (a real streaming client), with nothing missed or doubled
//! across a reconnect (`Last-Event-ID`) and a server killed and started again.

mod harness;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use harness::{Nats, Northstar, SERVICE_KEY, limits_config};
use serde_json::{Value, json};

/// One event as read: id, event name, data.
type Event = (u64, String, Value);

/// An open event stream, read by curl.
struct Stream {
    curl: Child,
    lines: mpsc::Receiver<String>,
}

impl Stream {
    /// Connects, after `last` when given, and waits for the server's first comment.
    fn open(base: &str, token: &str, last: Option<u64>) -> Self {
        let mut command = Command::new("curl");
        command.args(["-sN", "--max-time", "120"]);
        if let Some(last) = last {
            command.args(["-H", &format!("Last-Event-ID: {last}")]);
        }
        let mut curl = command
            .arg(format!("{base}/v1/portal/events?token={token}"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl runs");
        let stdout = curl.stdout.take().expect("curl's output");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stream = Self { curl, lines };
        let first = stream.line();
        assert_eq!(
            first, "retry: 2000",
            "the stream opens with its retry interval"
        );
        assert_eq!(stream.line(), ": connected");
        stream
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("a line of the event stream within 60 s")
    }

    /// The next event (comments skipped).
    fn next(&self) -> Event {
        let (mut id, mut name, mut data) = (None, None, None);
        loop {
            let line = self.line();
            if line.is_empty() {
                if let (Some(id), Some(name), Some(data)) = (id, name.take(), data.take()) {
                    return (id, name, data);
                }
                continue;
            }
            if let Some(value) = line.strip_prefix("id: ") {
                id = value.parse().ok();
            } else if let Some(value) = line.strip_prefix("event: ") {
                name = Some(value.to_string());
            } else if let Some(value) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str(value).expect("data is JSON"));
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.curl.kill();
        let _ = self.curl.wait();
    }
}

fn calls(customer: &str, range: std::ops::Range<usize>) -> Vec<Value> {
    range
        .map(|i| {
            json!({
                "type": "track", "messageId": format!("{customer}-call-{i}"), "userId": "u1",
                "event": "api_call_made", "context": {"groupId": customer},
                "properties": {"endpoint": "/v1/search"}
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn portal_events_miss_nothing_across_a_reconnect_and_a_restart() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &limits_config());
    let asked = server
        .post_as(
            SERVICE_KEY,
            "/v1/portal/tokens",
            &json!({"customer_id": "acme", "expiresIn": "1h"}),
        )
        .await;
    assert_eq!(asked.status, 200, "{}", asked.text());
    let token = asked.json()["token"].as_str().unwrap().to_string();

    // 16 of the free plan's 20 calls cross 80%.
    let first = Stream::open(&server.base, &token, None);
    server.send_batch(calls("acme", 0..16)).await;
    let (seen, name, data) = first.next();
    assert_eq!(name, "usage.threshold", "{data}");
    assert_eq!(
        (data["threshold"].as_f64(), &data["limit_reached"]),
        (Some(0.8), &json!(false))
    );
    assert_eq!(data["customer_id"], "acme");
    drop(first);

    // While no one listens: the limit is reached, and the plan changes.
    server.send_batch(calls("acme", 16..20)).await;
    let moved = server
        .put_admin("/v1/customers/acme", &json!({"plan": "pro"}))
        .await;
    assert_eq!(moved.status, 200, "{}", moved.text());
    let again = Stream::open(&server.base, &token, Some(seen));
    let mut missed = vec![again.next(), again.next()];
    missed.sort_by_key(|(id, ..)| *id);
    let names: Vec<&str> = missed.iter().map(|(_, name, _)| name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["plan.changed", "usage.threshold"], "{missed:?}");
    for (id, name, data) in &missed {
        assert!(*id > seen);
        match name.as_str() {
            "usage.threshold" => {
                assert_eq!(
                    (data["threshold"].as_f64(), &data["limit_reached"]),
                    (Some(1.0), &json!(true))
                )
            }
            _ => assert_eq!(
                (&data["plan"], &data["previous_plan"]),
                (&json!("pro"), &json!("free"))
            ),
        }
    }
    let last = missed.last().map(|(id, ..)| *id).unwrap();
    drop(again);

    // kill -9 and start again: the replay crosses the same thresholds, which are not told
    // twice; the next event after the last one seen is the suspension that follows.
    server.restart();
    let after = Stream::open(&server.base, &token, Some(last));
    let suspended = server
        .put_admin("/v1/customers/acme", &json!({"suspended": true}))
        .await;
    assert_eq!(suspended.status, 200, "{}", suspended.text());
    let (id, name, data) = after.next();
    assert_eq!(
        name, "customer.suspended",
        "nothing told twice before it: {data}"
    );
    assert!(id > last);
    assert_eq!(data["reason"], "suspended by an admin");

    // A token that is not one is refused.
    let bad = server.get_as("pt_not.a-token", "/v1/portal/events").await;
    assert_eq!(bad.status, 401, "{}", bad.text());
}
