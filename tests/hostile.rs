//! Guarantee 6 under a hostile corpus: every bad request gets the right 4xx, the server keeps
//! serving, and the good events sent alongside are all stored.

mod harness;

use std::io::Write;

use harness::{Nats, Northstar, WRITE_KEY, scalar, test_config, tracks};
use northstar::client::basic_auth;
use serde_json::json;

/// A hostile request: path, extra headers, body, and the status it must get.
type Hostile = (&'static str, Vec<(&'static str, String)>, Vec<u8>, u16);

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_corpus_gets_4xx_and_costs_no_good_event() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let auth = basic_auth(WRITE_KEY);
    let json_type = ("content-type", "application/json");
    let deep = format!(
        "{{\"batch\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_small = format!(
        "{{\"properties\": {}{}}}",
        "[".repeat(16_000),
        "]".repeat(16_000)
    );
    let huge_string = format!(
        "{{\"type\":\"track\",\"userId\":\"u\",\"event\":\"{}\"}}",
        "x".repeat(400_000)
    );
    let mut bad_utf8 = br#"{"batch":[{"type":"track","userId":"u","event":"caf"#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe, b'"', b'}', b']', b'}']);
    let bomb = gzip(&vec![b'{'; 30_000_000]);

    // (path, headers, body, expected status)
    let corpus: Vec<Hostile> = vec![
        ("/v1/batch", vec![], b"{".to_vec(), 400),
        ("/v1/batch", vec![], b"[1,2,3]".to_vec(), 400),
        ("/v1/batch", vec![], b"\"just a string\"".to_vec(), 400),
        ("/v1/batch", vec![], b"null".to_vec(), 400),
        (
            "/v1/batch",
            vec![],
            br#"{"batch": "not an array"}"#.to_vec(),
            400,
        ),
        // A deep message inside a batch costs only itself (rejected: too large, or too deep).
        ("/v1/batch", vec![], deep.into_bytes(), 200),
        ("/v1/track", vec![], deep_small.into_bytes(), 400),
        ("/v1/track", vec![], huge_string.into_bytes(), 413),
        ("/v1/batch", vec![], bad_utf8, 400),
        (
            "/v1/batch",
            vec![("content-encoding", "gzip".into())],
            bomb,
            413,
        ),
        (
            "/v1/batch",
            vec![("content-encoding", "gzip".into())],
            b"\x1f\x8b\x08\x00garbage".to_vec(),
            400,
        ),
        (
            "/v1/batch",
            vec![("content-encoding", "br".into())],
            vec![0x0b, 0x02, 0x80, 0xff, 0x00],
            400,
        ),
        (
            "/batch/",
            vec![("content-type", "application/x-www-form-urlencoded".into())],
            b"data=%%%%".to_vec(),
            400,
        ),
        (
            "/batch/",
            vec![("authorization", "Bearer wrong-wrong-wrong".into())],
            b"{\"api_key\": 5, \"event\": \"e\"}".to_vec(),
            401,
        ),
        (
            "/e/?compression=base64",
            vec![],
            b"@@@@not-base64@@@@".to_vec(),
            400,
        ),
        (
            "/v1/batch",
            vec![("authorization", "Basic !!!not-base64!!!".into())],
            br#"{"batch":[]}"#.to_vec(),
            401,
        ),
        (
            "/v1/batch",
            vec![("authorization", format!("Basic {}", "A".repeat(10_000)))],
            br#"{"batch":[]}"#.to_vec(),
            401,
        ),
        (
            "/v1/sql",
            vec![("authorization", "Bearer nope-nope-nope".into())],
            b"COPY events TO '/tmp/x'".to_vec(),
            401,
        ),
        (
            "/v1/check",
            vec![("authorization", "Bearer nope-nope-nope".into())],
            b"{}".to_vec(),
            401,
        ),
        ("/v1/../../etc/passwd", vec![], vec![], 404),
    ];
    let mut sent_good = 0;
    for (round, (path, extra, body, expected)) in corpus.into_iter().enumerate() {
        let mut headers: Vec<(&str, &str)> = vec![json_type];
        let has_auth = extra.iter().any(|(k, _)| *k == "authorization");
        if !has_auth {
            headers.push(("authorization", &auth));
        }
        for (k, v) in &extra {
            headers.push((k, v.as_str()));
        }
        let response = server.post_raw(path, &headers, body).await;
        assert_eq!(
            response.status,
            expected,
            "{path} round {round}: {}",
            response.text()
        );
        if response.status == 200 {
            assert!(
                response.json()["rejected"].as_u64() >= Some(1),
                "{path}: the bad message is rejected alone"
            );
        } else if response.status != 404 {
            let code = response.json()["code"].as_str().map(str::to_string);
            assert!(
                code.is_some(),
                "{path}: error bodies carry a code: {}",
                response.text()
            );
        }
        // A good batch after every bad request: stored in full.
        let good = server
            .post(
                "/v1/batch",
                &json!({"batch": tracks(&format!("good-{round}"), 0..10)}),
            )
            .await;
        assert_eq!(good.status, 200, "good batch after round {round}");
        sent_good += 10;
    }
    // Wrong types inside a batch cost only their own message.
    let mixed = json!({"batch": [
        {"type": "track", "messageId": "w-1", "userId": {"nested": true}, "event": "e"},
        {"type": "track", "messageId": "w-2", "userId": "u", "event": 42},
        {"type": "track", "messageId": "w-3", "userId": "u", "event": "e", "properties": [1, 2]},
        {"type": "track", "messageId": "w-4", "userId": "u", "event": "e", "timestamp": true},
        {"type": "track", "messageId": "w-5", "userId": "u", "event": "e", "messageId\u{0000}": "x"},
        {"type": "track", "messageId": "ok-1", "userId": "u", "event": "e"}
    ]});
    let r = server.post("/v1/batch", &mixed).await;
    assert_eq!(
        (
            r.status,
            r.json()["accepted"].as_u64(),
            r.json()["rejected"].as_u64()
        ),
        (200, Some(2), Some(4)),
        "{}",
        r.text()
    );
    sent_good += 2;

    assert_eq!(server.get("/healthz").await.status, 200, "still serving");
    server.wait_archived(sent_good).await;
    assert_eq!(
        scalar(&server.data, "SELECT count(*) FROM events").await,
        sent_good as i64
    );
    assert_eq!(
        scalar(
            &server.data,
            "SELECT count(*) FROM events WHERE event_id LIKE 'good-%'"
        )
        .await,
        sent_good as i64 - 2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_and_slow_bodies_are_bounded() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    // A header far past hyper's bound is refused at the connection; the server goes on.
    let huge = "x".repeat(2_000_000);
    let refused = server
        .client
        .send(
            http::Method::POST,
            &format!("{}/v1/batch", server.base),
            &[("x-junk", huge.as_str())],
            b"{}".to_vec(),
        )
        .await;
    assert!(refused.map(|r| r.status >= 400).unwrap_or(true));
    // A client that announces a body and never sends it holds no worker past the request timeout;
    // meanwhile others are served.
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stalled,
        b"POST /v1/batch HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{",
    )
    .await
    .unwrap();
    assert_eq!(server.get("/healthz").await.status, 200);
    let ok = server
        .post("/v1/batch", &json!({"batch": tracks("after-stall", 0..3)}))
        .await;
    assert_eq!(ok.status, 200);
}
