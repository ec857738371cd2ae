//! The onboarding loop: triggers fire once per event on NATS, the flow starts on
//! `onboarding_start`, steps complete themselves, flags bucket deterministically and target.

mod harness;

use std::time::Duration;

use futures::StreamExt;
use harness::{Nats, Northstar, SERVICE_KEY, WRITE_KEY, limits_config};
use serde_json::{Value, json};

fn config() -> Value {
    let mut config = limits_config();
    config["onboarding"] = json!({"steps": [
        {"id": "create_project", "title": "Create a project", "completeOn": "project_created"},
        {"id": "invite_team", "completeOn": "teammate_invited", "when": {"eventCountAtLeast": {"project_created": 1}}},
        {"id": "go_pro", "completeOn": "plan_upgraded", "when": {"plan": ["pro"]}}
    ]});
    config["flags"] = json!([
        {"key": "new_ui", "rollout": 0.5},
        {"key": "admins_only", "when": {"traitEquals": {"role": "admin"}}},
        {"key": "large_companies", "when": {"groupPropertyEquals": {"company": {"size": "large"}}}}
    ]);
    config
}

async fn user(server: &Northstar, id: &str, what: &str) -> Value {
    let bearer = format!("Bearer {SERVICE_KEY}");
    let r = server
        .client
        .get(
            &format!("{}/v1/users/{id}/{what}", server.base),
            &[("authorization", &bearer)],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

async fn eventually(server: &Northstar, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    harness::eventually(Duration::from_secs(20), async || {
        let body = user(server, id, what).await;
        if f(&body) {
            Ok(body)
        } else {
            Err(body.to_string())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn signup_starts_the_flow_and_steps_complete_themselves() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &config());
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut started = client
        .subscribe("northstar.triggers.onboarding_start")
        .await
        .unwrap();

    let batch = json!({"batch": [
        {"type": "page", "messageId": "o-1", "anonymousId": "a1", "name": "Home"},
        {"type": "identify", "messageId": "o-2", "anonymousId": "a1", "userId": "u1", "traits": {"role": "admin"}},
        {"type": "track", "messageId": "o-3", "userId": "u1", "event": "signup_completed", "properties": {"plan": "free"}, "context": {"groupId": "acme"}},
        {"type": "track", "messageId": "o-4", "userId": "u2", "event": "core_action_completed"}
    ]});
    assert_eq!(server.post("/v1/batch", &batch).await.status, 200);
    let message = tokio::time::timeout(Duration::from_secs(20), started.next())
        .await
        .unwrap()
        .unwrap();
    let fired: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(
        (
            fired["trigger"].as_str(),
            fired["person_id"].as_str(),
            fired["event_id"].as_str()
        ),
        (Some("onboarding_start"), Some("u1"), Some("o-3"))
    );
    assert_eq!(
        message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str()),
        Some("o-3:onboarding_start")
    );

    let state = eventually(&server, "u1", "onboarding", |b| b["started"] == true).await;
    assert_eq!(state["next_step"], "create_project");
    let states: Vec<&str> = state["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["recommended", "not_applicable", "not_applicable"]);
    // The anonymous id is the same person.
    assert_eq!(user(&server, "a1", "onboarding").await["person_id"], "u1");
    // Someone who never signed up has no flow yet.
    let u2 = user(&server, "u2", "onboarding").await;
    assert_eq!(
        (u2["started"].as_bool(), u2["next_step"].is_null()),
        (Some(false), true)
    );

    let created = json!({"batch": [{"type": "track", "messageId": "o-5", "userId": "u1", "event": "project_created", "context": {"groupId": "acme"}}]});
    assert_eq!(server.post("/v1/batch", &created).await.status, 200);
    let state = eventually(&server, "u1", "onboarding", |b| {
        b["next_step"] == "invite_team"
    })
    .await;
    assert_eq!(state["steps"][0]["state"], "completed");
    // A plan change makes the pro step apply.
    let bearer = format!("Bearer {}", harness::ADMIN_KEY);
    let put = server
        .client
        .send(
            http::Method::PUT,
            &format!("{}/v1/customers/acme", server.base),
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            br#"{"plan": "pro"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(put.status, 200);
    let state = user(&server, "u1", "onboarding").await;
    assert_eq!(state["steps"][2]["state"], "pending");

    // Flags: targeting by trait, deterministic bucketing.
    let flags = user(&server, "u1", "flags").await;
    assert_eq!(flags["flags"]["admins_only"], true);
    assert_eq!(
        flags["flags"]["new_ui"],
        northstar::onboarding::bucket("new_ui", "u1") < 0.5
    );
    assert_eq!(
        user(&server, "u2", "flags").await["flags"]["admins_only"],
        false
    );
    assert_eq!(
        user(&server, "u1", "flags").await,
        flags,
        "the same answer every time"
    );

    // PostHog's flag endpoints give the same answers, for any id of the person (a1 is u1),
    // with CORS for the browser SDK.
    let ask = |path: &'static str, body: Value| {
        let server = &server;
        async move {
            let bytes = body.to_string().into_bytes();
            server
                .post_raw(path, &[("content-type", "application/json")], bytes)
                .await
        }
    };
    let decide = ask("/decide/", json!({"token": WRITE_KEY, "distinct_id": "a1"})).await;
    assert_eq!(decide.status, 200, "{}", decide.text());
    assert_eq!(decide.headers["access-control-allow-origin"], "*");
    let older = decide.json();
    assert_eq!(older["featureFlags"], flags["flags"], "{older}");
    assert_eq!(older["errorsWhileComputingFlags"], false);
    let detailed = ask(
        "/flags/?v=2",
        json!({"api_key": WRITE_KEY, "distinct_id": "a1", "flag_keys_to_evaluate": ["admins_only"]}),
    )
    .await
    .json();
    assert_eq!(
        detailed["flags"]["admins_only"]["enabled"], true,
        "{detailed}"
    );
    assert_eq!(
        detailed["flags"]["admins_only"]["reason"]["code"],
        "condition_match"
    );
    assert!(
        detailed["flags"].get("new_ui").is_none(),
        "only the keys asked: {detailed}"
    );
    // Group properties the request carries target too; without them the flag is off.
    let grouped = ask(
        "/flags/?v=2",
        json!({"token": WRITE_KEY, "distinct_id": "a1",
               "group_properties": {"company": {"size": "large"}}}),
    )
    .await
    .json();
    assert_eq!(
        grouped["flags"]["large_companies"]["enabled"], true,
        "{grouped}"
    );
    assert_eq!(detailed["flags"].get("large_companies"), None);
    assert_eq!(older["featureFlags"]["large_companies"], false);
    // Errors name what is wrong, and are readable by a browser.
    let refused = ask(
        "/flags/?v=2",
        json!({"token": "wk_nobody", "distinct_id": "a1"}),
    )
    .await;
    assert_eq!(
        (refused.status, refused.json()["code"].as_str()),
        (401, Some("invalid_write_key"))
    );
    assert_eq!(refused.headers["access-control-allow-origin"], "*");
    let no_id = ask("/flags/?v=2", json!({"token": WRITE_KEY})).await;
    assert_eq!(no_id.status, 400);
    assert!(no_id.text().contains("distinct_id"), "{}", no_id.text());

    // Group properties northstar holds target as well: a `$groupidentify` describes the
    // company, a person's event names it in `$groups`, and a later (in time) description
    // wins whatever the arrival order. What a request sends of a type wins over what is held.
    let capture = |body: Value| {
        let server = &server;
        async move {
            let answer = server
                .post_raw(
                    "/batch/",
                    &[("content-type", "application/json")],
                    json!({"api_key": WRITE_KEY, "batch": body})
                        .to_string()
                        .into_bytes(),
                )
                .await;
            assert_eq!(answer.status, 200, "{}", answer.text());
        }
    };
    capture(json!([
        {"event": "$groupidentify", "distinct_id": "$company_initech", "timestamp": "2026-03-02T10:00:00Z",
         "properties": {"$group_type": "company", "$group_key": "initech", "$group_set": {"size": "large"}}},
        {"event": "$groupidentify", "distinct_id": "$company_initech", "timestamp": "2026-03-01T10:00:00Z",
         "properties": {"$group_type": "company", "$group_key": "initech", "$group_set": {"size": "small"}}},
        {"event": "report_created", "distinct_id": "g1", "timestamp": "2026-03-03T10:00:00Z",
         "properties": {"$groups": {"company": "initech"}}},
        {"event": "report_created", "distinct_id": "g2", "timestamp": "2026-03-03T10:00:00Z"}
    ]))
    .await;
    eventually(&server, "g1", "flags", |f| {
        f["flags"]["large_companies"] == true
    })
    .await;
    assert_eq!(
        user(&server, "g2", "flags").await["flags"]["large_companies"],
        false,
        "a person in no company"
    );
    let overridden = ask(
        "/flags/?v=2",
        json!({"token": WRITE_KEY, "distinct_id": "g1",
               "group_properties": {"company": {"size": "small"}}}),
    )
    .await
    .json();
    assert_eq!(
        overridden["flags"]["large_companies"]["enabled"], false,
        "{overridden}"
    );
}
