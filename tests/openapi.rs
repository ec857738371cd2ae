//! The OpenAPI document served at /openapi.json describes what the server really answers: live
//! responses are validated against the document's own schemas.

mod harness;

use harness::{ADMIN_KEY, InProcess, Nats, SERVICE_KEY, limits_config};
use northstar::clock::Clock;
use serde_json::{Value, json};

/// Validates `body` against the schema at JSON pointer `pointer` of the document.
fn assert_matches(doc: &Value, pointer: &str, body: &Value, what: &str) {
    let mut schema = doc.clone();
    schema["$ref"] = json!(format!(
        "#{}",
        pointer.replace('{', "%7B").replace('}', "%7D")
    ));
    let validator = jsonschema::draft202012::new(&schema).expect("the document's schemas compile");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{}: {e}", e.instance_path().as_str()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match {pointer}: {errors:?}\nbody: {body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn live_answers_match_the_served_document() {
    let nats = Nats::start();
    let server = InProcess::start(
        &nats,
        &limits_config(),
        Clock::manual(1_773_144_000_000_000),
    )
    .await;
    let doc = server
        .client
        .get(&format!("{}/openapi.json", server.base), &[])
        .await
        .unwrap()
        .json();
    assert_eq!(doc["openapi"], "3.1.0");
    let schema = |name: &str| format!("/components/schemas/{name}");

    let batch = json!({"batch": harness::tracks("doc", 0..3).into_iter().chain([json!({"type": "track", "userId": "u"})]).collect::<Vec<_>>()});
    let ingested = server.post("/v1/batch", &batch).await;
    assert_matches(
        &doc,
        &schema("IngestOutcome"),
        &ingested.json(),
        "POST /v1/batch 200",
    );
    let bad = server.post("/v1/batch", &json!({"nope": 1})).await;
    assert_eq!(bad.status, 400);
    assert_matches(&doc, &schema("Error"), &bad.json(), "POST /v1/batch 400");

    let customer = server
        .put_admin("/v1/customers/doc-co", &json!({"plan": "free"}))
        .await;
    assert_matches(
        &doc,
        &schema("Customer"),
        &customer.json(),
        "PUT /v1/customers/{id}",
    );
    let check = server
        .post_as(
            SERVICE_KEY,
            "/v1/check",
            &json!({"customer_id": "doc-co", "feature": "api_requests"}),
        )
        .await;
    assert_matches(
        &doc,
        &schema("Standing"),
        &check.json(),
        "POST /v1/check 200",
    );
    let denied = server
        .post_as(
            SERVICE_KEY,
            "/v1/check",
            &json!({"customer_id": "doc-co", "feature": "api_requests", "quantity": 1000}),
        )
        .await;
    assert_eq!(denied.status, 402);
    assert_matches(
        &doc,
        &schema("Denial"),
        &denied.json(),
        "POST /v1/check 402",
    );
    let usage = server
        .get_as(SERVICE_KEY, "/v1/customers/doc-co/usage")
        .await
        .json();
    assert_matches(
        &doc,
        "/paths/~1v1~1customers~1{id}~1usage/get/responses/200/content/application~1json/schema",
        &usage,
        "usage",
    );
    let entitlement = server
        .get_as(
            SERVICE_KEY,
            "/v1/customers/doc-co/entitlements/api_requests",
        )
        .await
        .json();
    assert_matches(
        &doc,
        "/paths/~1v1~1customers~1{id}~1entitlements~1{feature}/get/responses/200/content/application~1json/schema",
        &entitlement,
        "entitlements",
    );
    harness::wait_archived(&server.data, 3).await;
    let sql = server
        .post_as(
            ADMIN_KEY,
            "/v1/sql",
            &json!({"sql": "SELECT count(*) AS n FROM events"}),
        )
        .await;
    assert_matches(&doc, &schema("SqlAnswer"), &sql.json(), "POST /v1/sql");
    let health = server
        .client
        .get(&format!("{}/healthz", server.base), &[])
        .await
        .unwrap()
        .json();
    assert_matches(&doc, &schema("Health"), &health, "GET /healthz");
}
