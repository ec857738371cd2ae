//! `POST /v1/simulate` and `northstar simulate`: a period's usage replayed through draft
//! `usageFeatures`, against a hand computation.

mod harness;

use harness::{ADMIN_KEY, Nats, Northstar, limits_config};
use serde_json::{Value, json};

fn at(minute: usize) -> String {
    format!("2026-03-04T{:02}:{:02}:00.000Z", minute / 60, minute % 60)
}

fn calls(customer: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            json!({"type": "track", "messageId": format!("{customer}-{i}"), "userId": "u1",
                   "event": "api_call_made", "timestamp": at(i), "context": {"groupId": customer},
                   "properties": {"endpoint": "/v1/search"}})
        })
        .collect()
}

fn line<'a>(answer: &'a Value, customer: &str, feature: &str) -> &'a Value {
    answer["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["customer_id"] == customer && l["feature"] == feature)
        .unwrap_or_else(|| panic!("no line for {customer} {feature}: {answer}"))
}

fn number(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draft_is_replayed_through_the_periods_usage_as_a_hand_count_says() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &limits_config());
    let mut events = calls("acme", 25);
    events.extend(calls("hooli", 10));
    for (i, gb) in [4.5, 4.5, 3.25].into_iter().enumerate() {
        events.push(
            json!({"type": "track", "messageId": format!("gb-{i}"), "userId": "u1",
            "event": "storage_used", "timestamp": at(60 + i), "context": {"groupId": "acme"},
            "properties": {"gb": gb}}),
        );
    }
    server.send_batch(events).await;
    server.wait_archived(38).await;
    let moved = server
        .put_admin("/v1/customers/hooli", &json!({"plan": "pro"}))
        .await;
    assert_eq!(moved.status, 200, "{}", moved.text());

    let draft = json!({
        "from": "2026-03-04T00:00:00Z", "to": "2026-03-05T00:00:00Z",
        "usageFeatures": [
            {"id": "api_requests", "limits": {"free": 22, "pro": 5, "enterprise": null},
             "softLimits": ["free"], "hardCaps": {"pro": 8}, "pricing": {"overage": 0.5}},
            {"id": "storage_gb", "limits": {"free": 12, "pro": 100},
             "softLimits": ["free", "pro"], "pricing": {"overage": 2}}
        ]
    });
    let answer = server.post_as(ADMIN_KEY, "/v1/simulate", &draft).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = answer.json();

    // acme on free: 25 calls. Today a hard 20: the 21st call (minute 20) is refused. The draft
    // makes 22 soft at 0.5 a unit: 3 over, 1.5 billed, nothing refused.
    let acme = line(&answer, "acme", "api_requests");
    assert_eq!(
        (acme["plan"].as_str(), number(&acme["used"])),
        (Some("free"), 25.0)
    );
    assert_eq!(acme["today"]["limit_reached_at"], at(20));
    assert_eq!(number(&acme["today"]["bill"]), 0.0);
    assert_eq!(acme["draft"]["limit_reached_at"], Value::Null);
    assert_eq!(
        (
            number(&acme["draft"]["overage"]),
            number(&acme["draft"]["bill"])
        ),
        (3.0, 1.5)
    );
    // acme's storage: 4.5 + 4.5 + 3.25 = 12.25 GB. Today a hard 10, passed by the third;
    // the draft's soft 12 at 2 a GB bills 0.25 GB, 0.5.
    let storage = line(&answer, "acme", "storage_gb");
    assert_eq!(number(&storage["used"]), 12.25);
    assert_eq!(storage["today"]["limit_reached_at"], at(62));
    assert_eq!(
        (
            number(&storage["draft"]["overage"]),
            number(&storage["draft"]["bill"])
        ),
        (0.25, 0.5)
    );
    // hooli on pro: 10 calls. Today 50,000; the draft's hard 5 is passed by the 6th call and
    // its cap of 8 reached by the 8th.
    let hooli = line(&answer, "hooli", "api_requests");
    assert_eq!(hooli["plan"], "pro");
    assert_eq!(hooli["today"]["limit_reached_at"], Value::Null);
    assert_eq!(hooli["draft"]["limit_reached_at"], at(5));
    assert_eq!(hooli["draft"]["suspended_at"], at(7));
    let totals = &answer["totals"];
    assert_eq!(totals["lines"], 3);
    assert_eq!(
        (number(&totals["bill_today"]), number(&totals["bill_draft"])),
        (0.0, 2.0)
    );
    assert_eq!(
        (
            &totals["limit_reached_today"],
            &totals["limit_reached_draft"]
        ),
        (&json!(2), &json!(1))
    );
    assert_eq!(
        (&totals["suspended_today"], &totals["suspended_draft"]),
        (&json!(0), &json!(1))
    );

    // A wrong draft names its field; the simulation changed nothing.
    let unknown = server
        .post_as(
            ADMIN_KEY,
            "/v1/simulate",
            &json!({"from": "2026-03-04T00:00:00Z", "to": "2026-03-05T00:00:00Z",
            "usageFeatures": [{"id": "seats", "limits": {"free": 1}}]}),
        )
        .await;
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.text().contains("usageFeatures[0].id"),
        "{}",
        unknown.text()
    );
    let check = server
        .get_as(
            harness::SERVICE_KEY,
            "/v1/customers/hooli/entitlements/api_requests",
        )
        .await;
    assert_eq!(check.json()["limit"], 50000, "{}", check.text());

    // The command prints the same as a table.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("draft.json");
    std::fs::write(&file, draft.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args(["simulate", file.to_str().unwrap(), "--url", &server.base])
        .env("NORTHSTAR_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("hooli") && printed.contains("2026-03-04T00:07:00.000Z"),
        "{printed}"
    );
    assert!(printed.contains("total"), "{printed}");
}
