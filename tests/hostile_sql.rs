//! The SQL attacks replayed over HTTP: a statement deep enough to overflow a planning thread,
//! a value of gigabytes made from a few bytes, queries whose answer is given up (the request
//! timer answered first, the client went away), and answers far larger than memory.

mod harness;

use std::time::Duration;

use harness::{ADMIN_KEY, Nats, Northstar, eventually, test_config};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// Queries running now, per `/metrics`.
async fn running(server: &Northstar) -> Result<u64, String> {
    let text = server.get("/metrics").await.text();
    text.lines()
        .find_map(|line| line.strip_prefix("northstar_sql_queries_running "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no northstar_sql_queries_running in /metrics: {text}"))
}

async fn wait_running(server: &Northstar, want: u64) {
    eventually(Duration::from_secs(30), async || {
        let now = running(server).await?;
        if now == want {
            Ok(())
        } else {
            Err(format!("{now} queries running, waiting for {want}"))
        }
    })
    .await;
}

/// A query that runs for hours unless it is stopped.
const ENDLESS: &str = "SELECT count(*) FROM generate_series(1, 100000000000)";

fn code(answer: &northstar::client::ClientResponse) -> String {
    let body: Value = answer.json();
    body["error"]["code"]
        .as_str()
        .or(body["code"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_statements_and_huge_values_are_refused_and_the_server_stays_up() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &test_config());
    // 2,000 terms: 4 KB of SQL that overflowed the planning thread's stack and aborted the process.
    let deep = format!("SELECT 1{}", " + 1".repeat(2_000));
    let answer = server.sql_api(&deep).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(code(&answer), "statement_too_complex", "{}", answer.text());
    assert!(
        answer.text().contains("256"),
        "names the bound: {}",
        answer.text()
    );
    let deep_and = format!(
        "SELECT * FROM events WHERE {}",
        "true AND ".repeat(2_000) + "true"
    );
    assert_eq!(server.sql_api(&deep_and).await.status, 400);
    // 400 bytes whose parse doubled per level (found by fuzzing): refused before parsing.
    let backtracking = format!("SELECT {}1", "CASE WHEN true THEN ".repeat(20));
    let answer = server.sql_api(&backtracking).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(code(&answer), "statement_too_complex", "{}", answer.text());
    // What the bound admits plans on the query threads' stack.
    let admitted = format!("SELECT 1{}", " + 1".repeat(200));
    let answer = server.sql_api(&admitted).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["rows"][0].as_object().unwrap().len(), 1);
    // 2 GiB out of 25 bytes, folded while planning: refused before it is made.
    for sql in [
        "SELECT repeat('x', 2147483647)",
        "SELECT lpad('x', 2147483647)",
        "SELECT array_repeat(1, 2147483647)",
    ] {
        let answer = server.sql_api(sql).await;
        assert_eq!(answer.status, 400, "{sql}: {}", answer.text());
        assert_eq!(code(&answer), "value_too_large", "{sql}: {}", answer.text());
    }
    assert_eq!(server.sql_api("SELECT repeat('x', 10)").await.status, 200);
    assert!(server.is_running(), "the process lives");
    assert_eq!(server.get("/healthz").await.status, 200);
    wait_running(&server, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_given_up_by_the_request_timer_stops_running() {
    let nats = Nats::start();
    let mut config = test_config();
    config["sql"] = json!({"timeout": "10m"});
    config["ingest"]["requestTimeout"] = json!("2s");
    let server = Northstar::start(&nats, &config);
    let answer = server.sql_api(ENDLESS).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(code(&answer), "request_timeout", "{}", answer.text());
    // Detached, the query would burn a core for hours; given up, it is cancelled.
    wait_running(&server, 0).await;
    let answer = server.sql_api("SELECT 1 AS one").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_whose_client_went_away_stops_running() {
    let nats = Nats::start();
    let mut config = test_config();
    config["sql"] = json!({"timeout": "10m"});
    config["ingest"]["requestTimeout"] = json!("10m");
    let server = Northstar::start(&nats, &config);
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let body = json!({"sql": ENDLESS}).to_string();
    let request = format!(
        "POST /v1/sql HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    wait_running(&server, 1).await;
    drop(stream);
    wait_running(&server, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_cut_at_the_byte_bound_in_every_format() {
    let nats = Nats::start();
    let mut config = test_config();
    config["sql"] = json!({"maxAnswerBytes": 65_536, "maxRows": 1_000_000});
    let server = Northstar::start(&nats, &config);
    // 1,000 rows of 1 KB: 1 MB of answer against a 64 KiB bound.
    let sql = "SELECT value, repeat('x', 1000) AS pad FROM generate_series(1, 1000) ORDER BY value";
    for format in ["json", "csv", "arrow", "table"] {
        let auth = format!("Bearer {ADMIN_KEY}");
        let answer = server
            .post_raw(
                "/v1/sql",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                json!({"sql": sql, "format": format})
                    .to_string()
                    .into_bytes(),
            )
            .await;
        assert_eq!(answer.status, 200, "{format}: {}", answer.text());
        let header = |name: &str| {
            answer
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(
            header("x-northstar-truncated").as_deref(),
            Some("true"),
            "{format}"
        );
        assert_eq!(
            header("x-northstar-truncated-by").as_deref(),
            Some("bytes"),
            "{format}"
        );
        assert!(
            answer.body.len() <= 65_536 + 512,
            "{format}: {} bytes past the bound",
            answer.body.len()
        );
        assert!(
            answer.body.len() > 16_384,
            "{format}: keeps the rows that fit"
        );
        if format == "json" {
            let body: Value = answer.json();
            let rows = body["rows"].as_array().unwrap();
            assert_eq!(body["row_count"].as_u64(), Some(rows.len() as u64));
            assert_eq!(body["truncated_by"], "bytes");
            assert_eq!(rows[0]["value"], 1, "the leading rows are kept");
        }
    }
    let small = server.sql_api("SELECT 1 AS one").await;
    assert!(small.headers.get("x-northstar-truncated").is_none());
}
