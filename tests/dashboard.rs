//! The dashboard in a real browser (Debian's Chromium, headless; installed by
//! `./scripts/install-deps.sh --test`): it loads under its Content-Security-Policy, shows the
//! numbers the API gives, opens with an analyst key, and renders a hostile event name as text.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::render_dashboard as render;
use harness::{ADMIN_KEY, ANALYST_KEY, Nats, Northstar, WRITE_KEY, test_config};
use serde_json::Value;
use serde_json::json;

/// The text of the element with `id` in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no #{id}"));
    let rest = &dom[start + id.len() + 6..];
    rest[..rest.find('<').unwrap_or(0)].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_apis_numbers_and_renders_hostile_names_as_text() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let hostile = "<img src=x onerror=alert(1)>";
    let mut events: Vec<_> = (0..7)
        .map(|i| json!({"type": "track", "messageId": format!("d-{i}"), "userId": "u1", "event": "report_created"}))
        .collect();
    events
        .push(json!({"type": "track", "messageId": "d-hostile", "userId": "u1", "event": hostile}));
    // Metered usage of two customers, one of them with a hostile id.
    for (i, customer) in ["acme", "acme", "acme", "<b>hooli</b>"]
        .into_iter()
        .enumerate()
    {
        events.push(json!({"type": "track", "messageId": format!("d-call-{i}"), "userId": "u2",
            "event": "api_call_made", "context": {"groupId": customer}, "properties": {"endpoint": "/v1/search"}}));
    }
    server.send_batch(events).await;
    // No event name: rejected, with its reason.
    let refused = server
        .post(
            "/v1/batch",
            &json!({"batch": [{"type": "track", "messageId": "d-bad", "userId": "u1"}]}),
        )
        .await;
    assert_eq!(refused.json()["rejected"], 1, "{}", refused.text());
    server.wait_archived(12).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while server
        .sql("SELECT count(*) AS n FROM rejected_events")
        .await[0]["n"]
        != 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the rejection never landed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The overview, with the read-only analyst key: its numbers are SQL's.
    let (dom, _) = render(&server.base, ANALYST_KEY, "overview");
    let today = server
        .sql("SELECT count(*) AS n FROM events WHERE \"timestamp\" >= date_trunc('day', now())")
        .await;
    assert_eq!(text_of(&dom, "events-today"), today[0]["n"].to_string());
    assert_eq!(text_of(&dom, "rejected-today"), "1");
    assert_eq!(text_of(&dom, "health"), "ok");
    assert!(
        dom.contains("event"),
        "the rejection's reason names its field:\n{dom}"
    );

    // The events: the hostile name is text, not an element.
    let (dom, _) = render(&server.base, ANALYST_KEY, "events");
    assert!(
        dom.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "the hostile name is shown as text:\n{dom}"
    );
    assert!(
        !dom.contains("<img src=\"x\"") && !dom.contains("onerror=\""),
        "no element was injected:\n{dom}"
    );
    assert!(dom.contains("report_created"));

    // The customers: the most metered first, their plan and standing; ids as text.
    let (dom, _) = render(&server.base, ANALYST_KEY, "customers");
    let list = &dom[dom.find("id=\"customer-list\"").unwrap()..];
    let list = &list[..list.find("</table>").unwrap()];
    assert!(
        list.contains("<td>acme</td><td>free</td><td>3</td><td>0.3%</td>"),
        "acme: 3 of the free plan's 1,000 api_requests:\n{list}"
    );
    assert!(list.contains("<td>&lt;b&gt;hooli&lt;/b&gt;</td>"), "{list}");
    assert!(!list.contains("<b>"), "{list}");
    // One customer, as a link names it: each limited feature with the upgrade path a 402
    // would carry.
    let (dom, _) = render(&server.base, ANALYST_KEY, "customers&customer=acme");
    let usage = &dom[dom.find("id=\"customer-usage\"").unwrap()..];
    let usage = &usage[..usage.find("</table>").unwrap()];
    assert!(
        usage.contains("<td>api_requests</td><td>3</td><td>1000</td>"),
        "{usage}"
    );
    assert!(
        usage.contains(
            "https://example.com/upgrade?customer=acme&amp;feature=api_requests&amp;plan=free"
        ),
        "the 402's upgrade link:\n{usage}"
    );

    // The schema: per event and version, stored and tagged, as SQL counts them; rejections.
    let (dom, _) = render(&server.base, ANALYST_KEY, "schema");
    let expected = server
        .sql(
            "SELECT coalesce(schema_version, '') AS v, count(*) AS n, \
             sum(CASE WHEN context LIKE '%\"schema_violations\"%' THEN 1 ELSE 0 END) AS t \
             FROM events WHERE event = 'report_created' GROUP BY 1",
        )
        .await;
    let row = format!(
        "<tr><td>report_created</td><td>{}</td><td>7</td><td>{}</td></tr>",
        expected[0]["v"].as_str().unwrap(),
        expected[0]["t"]
    );
    assert!(dom.contains(&row), "the schema view shows {row}:\n{dom}");
    let rejected = &dom[dom.find("id=\"schema-rejected\"").unwrap()..];
    assert!(
        rejected.contains("<td>track</td>") && rejected.contains("is required"),
        "{rejected}"
    );

    // The page's own answer carries its policy.
    let page = server.get("/dashboard").await;
    assert_eq!(page.status, 200);
    let policy = page.headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && policy.contains("default-src 'none'"));
}

/// Runs `tests/sdk/node/dashboard.mjs` (puppeteer-core driving Chromium) with `key`.
fn drive(base: &str, key: &str) -> Value {
    drive_script("dashboard.mjs", base, key)
}

/// Runs the puppeteer-core script `tests/sdk/node/{script}` with `base` and `key`.
fn drive_script(script: &str, base: &str, key: &str) -> Value {
    let out = Command::new("node")
        .arg(format!(
            "{}/tests/sdk/node/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args([base, key])
        .output()
        .expect("node runs (./scripts/install-deps.sh --test installs it)");
    assert!(
        out.status.success(),
        "{script} failed (./scripts/install-deps.sh --test installs puppeteer-core)\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_recompute_button_makes_a_new_version_with_the_admin_key_only() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    // A generated history with a planted answer, through ingest, as the README's first look.
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history.jsonl");
    let northstar = env!("CARGO_BIN_EXE_northstar");
    let generated = Command::new(northstar)
        .args(["demo", "generate", "--users", "2000", "--out"])
        .arg(&history)
        .output()
        .unwrap();
    assert!(generated.status.success());
    let imported = Command::new(northstar)
        .arg("import")
        .arg(&history)
        .args(["--url", &server.base, "--write-key", WRITE_KEY])
        .output()
        .unwrap();
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    server.wait_archived(18_066).await;

    // The admin key: signs in once, recomputes, and the page shows the new version, its
    // picture and the North Star series, without a script error.
    let admin = drive(&server.base, ADMIN_KEY);
    assert_eq!(admin["errors"], json!([]), "{admin}");
    assert_eq!(admin["stored"], true);
    assert_eq!(
        (&admin["versions_before"], &admin["versions_after"]),
        (&json!(0), &json!(1)),
        "{admin}"
    );
    assert_eq!(admin["result"], "a new version was chosen");
    let threshold = admin["threshold"].as_str().unwrap();
    assert!(
        threshold.contains("At least 3 × core_action_completed within 7 days"),
        "{threshold}"
    );
    assert_eq!(admin["picture"], true, "the version's picture is shown");
    assert!(admin["bars"].as_u64().unwrap() > 0, "{admin}");

    // Funnels and retention: the page's numbers are the insights API's.
    let (dom, _) = render(&server.base, ANALYST_KEY, "insights");
    let asked = server
        .post_as(
            ANALYST_KEY,
            "/v1/insights/funnel",
            &json!({"steps": ["signup_completed", "core_action_completed"], "window": "7d"}),
        )
        .await;
    assert_eq!(asked.status, 200, "{}", asked.text());
    for step in asked.json()["groups"][0]["steps"].as_array().unwrap() {
        let row = format!(
            "<tr><td>{}</td><td>{}</td>",
            step["event"].as_str().unwrap(),
            step["people"]
        );
        assert!(dom.contains(&row), "the funnel shows {row}:\n{dom}");
    }
    let asked = server
        .post_as(
            ANALYST_KEY,
            "/v1/insights/retention",
            &json!({"cohortEvent": "signup_completed", "returnEvent": "core_action_completed", "period": "week", "periods": 8}),
        )
        .await;
    assert_eq!(asked.status, 200, "{}", asked.text());
    for cohort in asked.json()["cohorts"].as_array().unwrap() {
        let row = format!(
            "<tr><td>{}</td><td>{}</td>",
            &cohort["cohort"].as_str().unwrap()[..10],
            cohort["people"]
        );
        assert!(
            dom.contains(&row),
            "the retention table shows {row}:\n{dom}"
        );
    }

    // The analyst key views, and its recompute is refused without signing it out.
    let analyst = drive(&server.base, ANALYST_KEY);
    assert_eq!(
        (&analyst["versions_before"], &analyst["versions_after"]),
        (&json!(1), &json!(1)),
        "{analyst}"
    );
    assert!(
        analyst["result"].as_str().unwrap().contains("may not"),
        "{analyst}"
    );
    assert_eq!(analyst["still_signed_in"], true);
    let errors: Vec<&str> = analyst["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        errors.iter().all(|e| e.contains("403")),
        "only the refused recompute: {errors:?}"
    );
}

/// The customers view with billing on: what each customer owes and was billed, the dead
/// letters with why, the plan a 402 offers; the retry button puts dead letters back in line
/// with the admin key and is refused with the analyst key.
#[tokio::test(flavor = "multi_thread")]
async fn billing_dead_letters_show_with_why_and_the_admin_key_retries_them() {
    use harness::billing::{billing_config, billing_status, call, now, send, set_stripe_customer};
    use harness::stripe::{FakeStripe, Faults};
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = harness::billing::start(&nats, &billing_config(&fake.base()));
    // Stripe knows no such customer: its reports are refused for good.
    set_stripe_customer(&server, "broken", "cus_missing").await;
    let at = now();
    send(
        &server,
        (0..3)
            .flat_map(|i| {
                [
                    call(&format!("b-{i}"), "broken", &at),
                    call(&format!("h-{i}"), "healthy", &at),
                ]
            })
            .collect(),
    )
    .await;
    harness::eventually(Duration::from_secs(60), async || {
        let status = billing_status(&server).await;
        match status["dead"].as_array().map(Vec::len) {
            Some(n) if n > 0 => Ok(()),
            _ => Err(status.to_string()),
        }
    })
    .await;

    let (dom, _) = render(&server.base, ADMIN_KEY, "customers&customer=broken");
    let dead = &dom[dom.find("id=\"billing-dead\"").unwrap()..];
    let dead = &dead[..dead.find("</table>").unwrap()];
    assert!(
        dead.contains("<td>broken</td><td>api_requests</td>"),
        "{dead}"
    );
    assert!(!dead.contains("<td>healthy</td>"), "{dead}");
    let usage = &dom[dom.find("id=\"customer-usage\"").unwrap()..];
    let usage = &usage[..usage.find("</table>").unwrap()];
    assert!(
        usage.contains("<td>plan pro</td>"),
        "a 402 offers the pro plan:\n{usage}"
    );

    let refused = drive_script("retry.mjs", &server.base, ANALYST_KEY);
    // The browser logs the refused request itself; the page has no error of its own.
    let errors = refused["errors"].as_array().unwrap();
    assert!(
        errors.iter().all(|e| e.as_str().unwrap().contains("403")),
        "{refused}"
    );
    assert_eq!(
        refused["dead_before"], 1,
        "an analyst sees the dead letter: {refused}"
    );
    assert!(
        refused["retried"].as_str().unwrap().contains("may not"),
        "{refused}"
    );
    let retried = drive_script("retry.mjs", &server.base, ADMIN_KEY);
    assert_eq!(retried["errors"], json!([]), "{retried}");
    let before = retried["dead_before"].as_u64().unwrap();
    assert!(before > 0, "{retried}");
    assert_eq!(
        retried["retried"],
        format!("{before} back in line"),
        "{retried}"
    );
}
