//! Identity merges end to end: anonymous activity joins its person in SQL, placeholders never
//! merge, identified people are not silently merged, and the graph is rebuilt by replay.

mod harness;

use harness::{ADMIN_KEY, Nats, Northstar, WRITE_KEY, query, test_config};
use serde_json::{Value, json};

fn msg(id: &str, kind: &str, fields: Value) -> Value {
    let mut m = json!({"type": kind, "messageId": id, "timestamp": "2026-03-04T05:06:07Z"});
    for (k, v) in fields.as_object().unwrap() {
        m[k] = v.clone();
    }
    m
}

/// Waits until `identities` has `n` rows.
async fn wait_identities(server: &Northstar, n: usize) {
    harness::wait_rows(&server.data, "identities", n).await
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_activity_resolves_to_its_person_and_strangers_stay_apart() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &test_config());
    let batch = vec![
        msg(
            "e1",
            "page",
            json!({"anonymousId": "anon-1", "name": "Home"}),
        ),
        msg(
            "e2",
            "track",
            json!({"anonymousId": "anon-1", "event": "core_action_completed"}),
        ),
        msg(
            "e3",
            "identify",
            json!({"anonymousId": "anon-1", "userId": "u1"}),
        ),
        msg(
            "e4",
            "track",
            json!({"userId": "u1", "event": "core_action_completed"}),
        ),
        // Placeholders never merge.
        msg(
            "e5",
            "identify",
            json!({"anonymousId": "anonymous", "userId": "u2"}),
        ),
        msg(
            "e6",
            "track",
            json!({"anonymousId": "anonymous", "event": "x"}),
        ),
        // An id already linked is not moved to someone else.
        msg(
            "e7",
            "identify",
            json!({"anonymousId": "anon-1", "userId": "u3"}),
        ),
        // Aliases, and two identified people are not merged by a plain alias.
        msg(
            "e8",
            "alias",
            json!({"userId": "u1", "previousId": "device-9"}),
        ),
        msg(
            "e9",
            "track",
            json!({"anonymousId": "device-9", "event": "x"}),
        ),
        msg("e10", "alias", json!({"userId": "u1", "previousId": "u3"})),
    ];
    server.send_batch(batch).await;
    // PostHog: $identify with $anon_distinct_id, and $create_alias.
    let ph = json!({"api_key": WRITE_KEY, "batch": [
        {"event": "$pageview", "distinct_id": "ph-anon", "uuid": "0190d5a0-0000-7000-8000-0000000000b1", "properties": {"$is_identified": false}},
        {"event": "$identify", "distinct_id": "ph-user", "uuid": "0190d5a0-0000-7000-8000-0000000000b2", "properties": {"$anon_distinct_id": "ph-anon"}},
        {"event": "$create_alias", "distinct_id": "ph-user", "uuid": "0190d5a0-0000-7000-8000-0000000000b3", "properties": {"alias": "ph-other"}}
    ]});
    assert_eq!(
        server
            .post_raw("/batch/", &[], ph.to_string().into_bytes())
            .await
            .status,
        200
    );
    server.wait_archived(13).await;
    wait_identities(&server, 4).await;

    let person = |rows: &[Value], id: &str| {
        rows.iter()
            .find(|r| r["event_id"] == id)
            .map(|r| r["person_id"].clone())
            .unwrap_or_default()
    };
    let rows = query(
        &server.data,
        "SELECT event_id, person_id FROM events_resolved",
    )
    .await;
    assert_eq!(
        person(&rows, "e1"),
        "u1",
        "pre-identify anonymous events belong to the person"
    );
    assert_eq!(person(&rows, "e2"), "u1");
    assert_eq!(person(&rows, "e4"), "u1");
    assert_eq!(
        person(&rows, "e6"),
        "anonymous",
        "a placeholder stays itself"
    );
    assert_eq!(person(&rows, "e9"), "u1", "an aliased device id");
    assert_eq!(
        person(&rows, "0190d5a0-0000-7000-8000-0000000000b1"),
        "ph-user"
    );
    let table = query(
        &server.data,
        "SELECT id, person_id, kind FROM identities ORDER BY id",
    )
    .await;
    let ids: Vec<(String, String)> = table
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["person_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(ids.contains(&("anon-1".into(), "u1".into())));
    assert!(ids.contains(&("ph-other".into(), "ph-user".into())));
    assert!(
        !ids.iter().any(|(id, _)| id == "anonymous" || id == "u3"),
        "{ids:?}"
    );

    // Replayable: without its files the graph is rebuilt from the stream, the same.
    server.terminate();
    std::fs::remove_dir_all(server.data.join("identities")).unwrap();
    server.restart();
    wait_identities(&server, ids.len()).await;
    let again = query(
        &server.data,
        "SELECT id, person_id, kind FROM identities ORDER BY id",
    )
    .await;
    assert_eq!(again, table);
}

/// `persons` and `groups` are queryable, with properties applied in event-time order however
/// the events arrived: a late `$set` older than the latest does not overwrite it, the earliest
/// `$set_once` wins, an `$unset` removes an older trait. The aggregate as a window function
/// gives a person's properties as of each event.
#[tokio::test(flavor = "multi_thread")]
async fn persons_and_groups_hold_properties_in_event_time_order() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let at = |seconds: u32| format!("2026-03-04T05:06:{seconds:02}Z");
    let segment = vec![
        json!({"type": "identify", "messageId": "p1", "anonymousId": "pa-1", "userId": "pu-1",
               "traits": {"role": "admin", "plan": "free"}, "timestamp": at(0)}),
        json!({"type": "group", "messageId": "p2", "userId": "pu-1", "groupId": "initech",
               "traits": {"name": "Initech"}, "timestamp": at(1)}),
        json!({"type": "page", "messageId": "p3", "anonymousId": "pa-1", "name": "Home",
               "timestamp": at(2)}),
    ];
    server.send_batch(segment).await;
    let ph = |uuid: u32, event: &str, seconds: u32, properties: Value| {
        json!({"event": event, "distinct_id": "pu-1", "timestamp": at(seconds),
               "uuid": format!("0190d5a0-0000-7000-8000-0000000{uuid:05}"),
               "properties": properties})
    };
    // In arrival order; their event times say otherwise.
    let posthog = json!({"api_key": WRITE_KEY, "batch": [
        ph(1, "upgraded", 20, json!({"$set": {"plan": "pro"}})),
        ph(2, "viewed", 10, json!({"$set": {"plan": "team"}})),
        ph(3, "viewed", 5, json!({"$set_once": {"first_plan": "free"}})),
        ph(4, "viewed", 3, json!({"$set_once": {"first_plan": "trial"}})),
        ph(5, "left_team", 30, json!({"$unset": ["role"]})),
        ph(6, "$groupidentify", 31, json!({"$group_type": "company", "$group_key": "acme",
                                           "$group_set": {"name": "Acme", "size": 40}})),
    ]});
    let sent = server
        .post_raw("/batch/", &[], posthog.to_string().into_bytes())
        .await;
    assert_eq!(sent.status, 200, "{}", sent.text());
    server.wait_archived(9).await;
    wait_identities(&server, 1).await;

    let persons = server
        .live_sql("SELECT person_id, properties, events, first_seen FROM persons WHERE person_id = 'pu-1'")
        .await;
    assert_eq!(persons.len(), 1, "{persons:?}");
    let properties: Value =
        serde_json::from_str(persons[0]["properties"].as_str().unwrap()).unwrap();
    assert_eq!(
        properties,
        json!({"plan": "pro", "first_plan": "trial"}),
        "{persons:?}"
    );
    assert_eq!(
        persons[0]["events"], 9,
        "the anonymous page joined the person"
    );

    let groups = server
        .live_sql("SELECT group_type, group_key, properties FROM groups ORDER BY group_key")
        .await;
    let groups: Vec<(String, String, Value)> = groups
        .iter()
        .map(|g| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let properties = serde_json::from_str(g["properties"].as_str().unwrap()).unwrap();
            (text(&g["group_type"]), text(&g["group_key"]), properties)
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            (
                "company".into(),
                "acme".into(),
                json!({"name": "Acme", "size": 40})
            ),
            ("group".into(), "initech".into(), json!({"name": "Initech"})),
        ]
    );

    // As of each event: at 05:06:10 the plan was `team`, and `role` still there.
    let history = server
        .live_sql(
            "SELECT event, person_properties(\"type\", properties, \"timestamp\") \
             OVER (PARTITION BY person_id ORDER BY \"timestamp\") AS properties \
             FROM events_resolved WHERE person_id = 'pu-1' ORDER BY \"timestamp\"",
        )
        .await;
    let at_ten = history
        .iter()
        .find(|row| {
            row["event"] == "viewed" && row["properties"].as_str().unwrap().contains("team")
        })
        .unwrap_or_else(|| panic!("no row as of 05:06:10: {history:?}"));
    let then: Value = serde_json::from_str(at_ten["properties"].as_str().unwrap()).unwrap();
    assert_eq!(
        then,
        json!({"plan": "team", "role": "admin", "first_plan": "trial"})
    );

    // Over HTTP (admin key): the person by any of their ids, a group, and a 404 for neither.
    let by_anonymous = server.get_as(ADMIN_KEY, "/v1/persons/pa-1").await;
    assert_eq!(by_anonymous.status, 200, "{}", by_anonymous.text());
    let profile = by_anonymous.json();
    assert_eq!(profile["person_id"], "pu-1");
    assert_eq!(
        profile["properties"],
        json!({"plan": "pro", "first_plan": "trial"})
    );
    assert_eq!(profile["events"], 9);
    let group = server
        .get_as(ADMIN_KEY, "/v1/groups/company/acme")
        .await
        .json();
    assert_eq!(
        group["properties"],
        json!({"name": "Acme", "size": 40}),
        "{group}"
    );
    for path in ["/v1/persons/nobody", "/v1/groups/company/nowhere"] {
        assert_eq!(server.get_as(ADMIN_KEY, path).await.status, 404, "{path}");
    }
}
