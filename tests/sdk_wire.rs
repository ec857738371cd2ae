//! The official SDKs, unchanged, pointed at northstar: Segment's Python SDK and PostHog's.
//! `./scripts/install-deps.sh --test` (run by `make test` and CI) installs them.

mod harness;

use harness::{Nats, Northstar, WRITE_KEY, query, test_config};

fn run_python(script: &str, base: &str) {
    let out = std::process::Command::new("python3")
        .arg(format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR")))
        .args([base, WRITE_KEY])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{script} failed (are the SDKs installed? ./scripts/install-deps.sh --test)\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn segment_and_posthog_python_sdks_work_unchanged() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let base = server.base.clone();
    let base2 = base.clone();
    tokio::task::spawn_blocking(move || run_python("segment_send.py", &base))
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || run_python("posthog_send.py", &base2))
        .await
        .unwrap();
    server.wait_archived(10).await;

    let rows = query(&server.data, "SELECT event_id, type, event, user_id, anonymous_id, customer_id, context->'library'->>'name' AS lib FROM events ORDER BY event_id").await;
    let by_id = |id: &str| {
        rows.iter()
            .find(|r| r["event_id"] == id)
            .unwrap_or_else(|| panic!("{id} missing: {rows:?}"))
            .clone()
    };
    let track = by_id("py-1");
    assert_eq!(
        (track["type"].as_str(), track["event"].as_str()),
        (Some("track"), Some("api_call_made"))
    );
    assert_eq!(track["customer_id"], "py-co");
    assert_eq!(track["lib"], "analytics-python");
    assert_eq!(by_id("py-2")["anonymous_id"], "py-anon");
    assert_eq!(by_id("py-3")["type"], "page");
    assert_eq!(by_id("py-4")["type"], "screen");
    assert_eq!(by_id("py-5")["customer_id"], "py-co");
    assert_eq!(by_id("py-6")["type"], "alias");

    let ph = by_id("0190d5a0-0000-7000-8000-0000000000a1");
    assert_eq!(ph["user_id"], "ph-user");
    assert_eq!(
        ph["customer_id"], "ph-co",
        "groups.customer bills the group"
    );
    assert_eq!(ph["lib"], "posthog-python");
    assert_eq!(
        by_id("0190d5a0-0000-7000-8000-0000000000a3")["type"],
        "alias"
    );
    assert_eq!(
        by_id("0190d5a0-0000-7000-8000-0000000000a4")["type"],
        "group"
    );
    assert_eq!(rows.len(), 10);
}
