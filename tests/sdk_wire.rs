//! The official SDKs, unchanged, pointed at northstar: Segment's and PostHog's, for Python and
//! for Node. `./scripts/install-deps.sh --test` (run by `make test` and CI) installs them, at
//! the versions pinned in `tests/sdk/requirements.txt` and `tests/sdk/node/package-lock.json`.

mod harness;

use harness::{Nats, Northstar, SERVICE_KEY, WRITE_KEY, limits_config, query, test_config};
use serde_json::{Value, json};

fn run_python(script: &str, base: &str) {
    run("python3", &format!("sdk/{script}"), base);
}

/// Runs `tests/<script>` with `program`, the server's base URL, the write key and `args`;
/// fails the test with its output when it does not exit 0, else returns what it printed.
fn run(program: &str, script: &str, base: &str) -> String {
    run_with(program, script, base, &[])
}

fn run_with(program: &str, script: &str, base: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
        .args([base, WRITE_KEY])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs ({e}); ./scripts/install-deps.sh --test"));
    assert!(
        out.status.success(),
        "{script} failed (are the SDKs installed? ./scripts/install-deps.sh --test)\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

/// posthog-node sends no `$is_identified`: its anonymous distinct id is merged into the person
/// by `identify` with `$anon_distinct_id`, and `alias` adds a device, as PostHog itself does.
/// @segment/analytics-node's identify-with-anonymousId and alias merge the same way, and its
/// message just under `maxMessageBytes` is stored. Then posthog-node reads northstar's flags:
/// the same answer for every id of the person, targeting the person property its identify
/// set (`$set`), and its `$feature_flag_called` events are stored like any other.
#[tokio::test(flavor = "multi_thread")]
async fn node_sdks_merge_anonymous_activity_into_the_person_and_read_its_flags() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &flags_config());
    let base = server.base.clone();
    tokio::task::spawn_blocking(move || run("node", "sdk/node/send.mjs", &base))
        .await
        .unwrap();
    server.wait_archived(15).await;
    let identities = harness::eventually(std::time::Duration::from_secs(20), async || {
        let rows = query(
            &server.data,
            "SELECT id, person_id FROM identities ORDER BY id",
        )
        .await;
        let pairs: Vec<(String, String)> = rows
            .iter()
            .map(|r| (text(&r["id"]), text(&r["person_id"])))
            .collect();
        match pairs.len() {
            4 => Ok(pairs),
            n => Err(format!("{n} identities: {pairs:?}")),
        }
    })
    .await;
    let pair = |id: &str, person: &str| (id.to_string(), person.to_string());
    assert_eq!(
        identities,
        vec![
            pair("ph-anon-1", "ph-user-1"),
            pair("ph-dev2-1", "ph-user-1"),
            pair("seg-anon-1", "seg-user-1"),
            pair("seg-dev-1", "seg-user-1"),
        ]
    );
    let rows = query(
        &server.data,
        "SELECT coalesce(event, \"type\") AS event, person_id, \
         context->'library'->>'name' AS lib, count(*) AS n \
         FROM events_resolved GROUP BY 1, 2, 3 ORDER BY 3, 1",
    )
    .await;
    let seen: Vec<(String, String, String, u64)> = rows
        .iter()
        .map(|r| {
            let n = r["n"].as_u64().unwrap_or_default();
            (text(&r["lib"]), text(&r["event"]), text(&r["person_id"]), n)
        })
        .collect();
    let row = |lib: &str, event: &str, person: &str, n| {
        (lib.to_string(), event.to_string(), person.to_string(), n)
    };
    assert_eq!(
        seen,
        vec![
            row("@segment/analytics-node", "alias", "seg-user-1", 1),
            row("@segment/analytics-node", "identify", "seg-user-1", 1),
            row("@segment/analytics-node", "note_saved", "seg-user-1", 1),
            row("@segment/analytics-node", "page_viewed", "seg-user-1", 2),
            row("@segment/analytics-node", "report_opened", "seg-user-1", 1),
            row("posthog-node", "$create_alias", "ph-user-1", 1),
            row("posthog-node", "$identify", "ph-user-1", 1),
            row("posthog-node", "page_viewed", "ph-user-1", 6),
            row("posthog-node", "report_opened", "ph-user-1", 1),
        ],
        "{rows:?}"
    );

    // Flags, once onboarding has applied the identify (its own follower).
    harness::eventually(std::time::Duration::from_secs(20), async || {
        let answer = server
            .get_as(SERVICE_KEY, "/v1/users/ph-anon-1/flags")
            .await;
        match answer.json()["flags"]["pro_only"].as_bool() {
            Some(true) => Ok(()),
            _ => Err(answer.text()),
        }
    })
    .await;
    let base = server.base.clone();
    let printed = tokio::task::spawn_blocking(move || {
        let ids = [
            SERVICE_KEY,
            "ph-anon-1",
            "ph-dev2-1",
            "ph-user-1",
            "stranger",
        ];
        run_with("node", "sdk/node/flags.mjs", &base, &ids)
    })
    .await
    .unwrap();
    let answers: Value = serde_json::from_str(printed.trim()).expect("flags.mjs prints JSON");
    // The SDK's every answer is northstar's own answer for the person (`/v1/users/{id}/flags`).
    let own = server
        .get_as(SERVICE_KEY, "/v1/users/ph-user-1/flags")
        .await
        .json()["flags"]
        .clone();
    let variant = own["checkout"].as_str().unwrap_or_default().to_string();
    assert!(["blue", "green"].contains(&variant.as_str()), "{own}");
    assert_eq!(
        own,
        json!({"new_ui": true, "pro_only": true, "nobody": false, "checkout": variant, "banner": true})
    );
    let color = if variant == "blue" { "#00f" } else { "#0f0" };
    let payloads = json!({"new_ui": null, "pro_only": null, "nobody": null,
                          "checkout": {"color": color}, "banner": {"text": "hello"}});
    let enabled = json!({"new_ui": true, "pro_only": true, "nobody": false, "checkout": true, "banner": true});
    for id in ["ph-anon-1", "ph-dev2-1", "ph-user-1"] {
        let answer = &answers[id];
        assert_eq!(answer["all"], own, "{id}: {answers}");
        assert_eq!(answer["value"], own, "{id}: {answers}");
        assert_eq!(answer["enabled"], enabled, "{id}: {answers}");
        assert_eq!(answer["payload"], payloads, "{id}: {answers}");
        assert_eq!(answer["asPro"], true, "{id}: {answers}");
    }
    let stranger = &answers["stranger"];
    let theirs = server
        .get_as(SERVICE_KEY, "/v1/users/stranger/flags")
        .await
        .json()["flags"]
        .clone();
    assert_eq!(stranger["all"], theirs, "{answers}");
    assert_eq!(stranger["all"]["pro_only"], false, "{answers}");
    assert_eq!(
        stranger["asPro"], true,
        "person_properties sent with the request target: {answers}"
    );
    // Local evaluation: a person-property flag is answered by the SDK itself from the
    // properties the app passes; a flag bucketed by person is left to the server.
    assert_eq!(
        answers["local"],
        json!({"proWithPlan": true, "proWithout": false, "everyone": true,
               "checkoutLocally": null, "checkout": variant}),
        "{answers}"
    );
    // getFeatureFlag captured `$feature_flag_called`: at least one per id and flag.
    harness::eventually(std::time::Duration::from_secs(20), async || {
        let called = server
            .live_sql(
                "SELECT count(DISTINCT concat(user_id, '/', properties->>'$feature_flag')) AS n \
                 FROM events WHERE event = '$feature_flag_called'",
            )
            .await;
        match called[0]["n"].as_u64() {
            Some(20) => Ok(()),
            n => Err(format!("{n:?} (id, flag) pairs called")),
        }
    })
    .await;
}

/// The limits test config with flags of each kind: for everyone, by person property, for no
/// one, multivariate with payloads, boolean with a payload.
fn flags_config() -> Value {
    let mut config = limits_config();
    config["flags"] = json!([
        {"key": "new_ui"},
        {"key": "pro_only", "when": {"traitEquals": {"plan": "pro"}}},
        {"key": "nobody", "rollout": 0.0},
        {"key": "checkout", "variants": [
            {"key": "blue", "share": 0.5, "payload": {"color": "#00f"}},
            {"key": "green", "share": 0.5, "payload": {"color": "#0f0"}}
        ]},
        {"key": "banner", "payload": {"text": "hello"}}
    ]);
    config
}

/// posthog-js 1.455.2, unchanged, in headless Chromium (`tests/sdk/node/browser.html`): the
/// anonymous visitor's pageview joins the person it identifies as, and the flags the page
/// reads are northstar's for that person, the identify's `plan` targeting included.
#[tokio::test(flavor = "multi_thread")]
async fn posthog_js_in_a_browser_merges_the_visitor_and_reads_its_flags() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &flags_config());
    let page = format!(
        "file://{}/tests/sdk/node/browser.html?base={}&key={WRITE_KEY}",
        env!("CARGO_MANIFEST_DIR"),
        server.base
    );
    // The browser runs until the page's answer is in: the test waits on that event, not on
    // a clock.
    let browser = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            // posthog-js drops events from a user agent that names itself headless.
            "--user-agent=Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/148.0.0.0 Safari/537.36",
            &page,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium runs (./scripts/install-deps.sh --test installs it)");
    let _browser = KillOnDrop(browser);
    let seen = harness::eventually(std::time::Duration::from_secs(60), async || {
        let rows = server
            .live_sql(
                "SELECT properties->>'answer' AS answer FROM events WHERE event = 'flags_seen'",
            )
            .await;
        match rows.first() {
            Some(row) => Ok(row["answer"].clone()),
            None => Err("no flags_seen event yet".to_string()),
        }
    })
    .await;
    let answer: Value = match &seen {
        Value::String(text) => serde_json::from_str(text).unwrap_or_default(),
        other => other.clone(),
    };
    let own = server
        .get_as(SERVICE_KEY, "/v1/users/web-user-1/flags")
        .await
        .json()["flags"]
        .clone();
    let color = if own["checkout"] == "blue" {
        "#00f"
    } else {
        "#0f0"
    };
    assert_eq!(
        answer,
        json!({"distinctId": "web-user-1", "pro": true, "nobody": false,
               "checkout": own["checkout"], "payload": {"color": color}, "errors": []}),
    );
    // The anonymous pageview, the identify and the event after it: one person.
    let rows = harness::eventually(std::time::Duration::from_secs(20), async || {
        let rows = server
            .live_sql(
                "SELECT event, person_id FROM events_resolved \
                 WHERE (context->'library'->>'name') = 'web' ORDER BY event",
            )
            .await;
        let events: Vec<String> = rows.iter().map(|r| text(&r["event"])).collect();
        let wanted = ["$identify", "$pageview", "flags_seen"];
        match wanted.iter().all(|w| events.iter().any(|e| e == w)) {
            true => Ok(rows),
            false => Err(format!("events so far: {events:?}")),
        }
    })
    .await;
    for row in &rows {
        assert_eq!(row["person_id"], "web-user-1", "{rows:?}");
    }
}

/// A child process killed (and reaped) when the test ends, whichever way it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}
