//! The billing sink end to end against a fake Stripe: what the provider ends up with equals
//! what was metered (floored per customer and feature), through faults, kill -9, late events
//! and refusals; and the upgrade path (Checkout Session in a 402, signed webhooks) moves
//! customers between plans.

mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use harness::billing::*;
use harness::stripe::{FakeStripe, Faults, WEBHOOK_SECRET};
use harness::{ADMIN_KEY, Nats};
use northstar::clock::{format_micros, system_micros};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn billed_equals_metered_under_faults_and_kill9() {
    let fake = FakeStripe::start(Faults {
        rate: 0.3,
        seed: 0x5EED_0001,
    })
    .await;
    let nats = Nats::start();
    let mut server = start(&nats, &billing_config(&fake.base()));
    let customers = ["acme", "globex", "initech", "hooli", "umbrella"];
    let stripe_ids = BTreeMap::from([("acme", "cus_acme")]);
    set_stripe_customer(&server, "acme", "cus_acme").await;

    let mut metered = Metered::default();
    let batches = 10;
    for batch in 0..batches {
        if batch == batches / 2 {
            // Mid-run: windows are open, reports pending, calls in flight.
            server.kill9();
            server.restart();
        }
        let at = now();
        let events = metered.mixed_batch(&format!("b{batch}"), 40, 3, batch, &customers, &at);
        send(&server, events).await;
        wait_next_window().await;
    }

    let expected = metered.billed_in_stripe(&stripe_ids);
    assert!(
        expected.contains_key(&("cus_acme".to_string(), "storage".to_string())),
        "acme is billed under its Stripe id: {expected:?}"
    );
    eventually(Duration::from_secs(90), async || {
        let got = nonzero(fake.totals());
        if got == expected {
            Ok(())
        } else {
            Err(format!(
                "Stripe has {got:?}, metered {expected:?} (faults {}, duplicates {})",
                fake.faults_injected(),
                fake.duplicates()
            ))
        }
    })
    .await;

    let status = wait_settled(&server).await;
    assert_eq!(status["dead"], json!([]), "nothing dead-lettered: {status}");
    assert_status_totals(&status, &metered);
    assert!(fake.faults_injected() > 0, "faults were injected");
    assert!(
        fake.duplicates() > 0,
        "lost answers were retried with the same identifier"
    );
    assert_eq!(
        fake.concurrency_violations(),
        0,
        "never two calls at once for one customer and meter"
    );
    for event in fake.events() {
        let identifier = event["identifier"].as_str().unwrap_or_default();
        assert!(
            identifier.starts_with("ns:") && identifier.len() <= 100,
            "identifier shape: {event}"
        );
    }

    // Nothing is left that could be reported: the totals are final.
    wait_quiescent(&server).await;
    assert_eq!(
        nonzero(fake.totals()),
        expected,
        "nothing more is reported once everything is delivered"
    );
    assert_eq!(billing_status(&server).await["pending"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn late_event_produces_a_correction() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = start(&nats, &billing_config(&fake.base()));
    // A whole second 30 s ago: its window closed long before these events arrive.
    let second = system_micros() / 1_000_000 - 30;
    let at = format_micros(second * 1_000_000);
    let prefix = format!("ns:latecomer:api_requests:{second}:");
    let reports = async |total: i64| {
        eventually(Duration::from_secs(60), async || {
            let reports: Vec<(String, i64)> = fake
                .events()
                .iter()
                .filter_map(|e| {
                    let id = e["identifier"].as_str()?;
                    id.starts_with(&prefix)
                        .then(|| (id.to_string(), e["value"].as_i64().unwrap_or(0)))
                })
                .collect();
            if reports.iter().map(|(_, v)| v).sum::<i64>() == total {
                Ok(reports)
            } else {
                Err(format!(
                    "reports of window {second}: {reports:?}; all events {:?}",
                    fake.events()
                ))
            }
        })
        .await
    };

    send(
        &server,
        vec![
            call("late-1", "latecomer", &at),
            call("late-2", "latecomer", &at),
        ],
    )
    .await;
    assert_eq!(
        reports(2).await,
        [(format!("{prefix}0"), 2)],
        "the window's first report is revision 0 with both events"
    );

    send(&server, vec![call("late-3", "latecomer", &at)]).await;
    assert_eq!(
        reports(3).await,
        [(format!("{prefix}0"), 2), (format!("{prefix}1"), 1)],
        "a late event for a reported window is a new revision carrying only the delta"
    );
    assert_eq!(
        fake.totals()
            .get(&("latecomer".to_string(), "api_requests".to_string())),
        Some(&3)
    );
    let status = wait_settled(&server).await;
    assert_eq!(status["dead"], json!([]), "{status}");
}

/// One batch for `winmix`: 10 events in one closed window and 3 in the next. The first
/// window used to be reported with 13 and the second with nothing; each report now carries
/// its own window's usage, as SQL counts it.
#[tokio::test(flavor = "multi_thread")]
async fn each_window_is_billed_what_sql_counts_in_it() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = start(&nats, &billing_config(&fake.base()));
    let second = system_micros() / 1_000_000 - 30;
    let first = format_micros(second * 1_000_000 + 500_000);
    let next = format_micros((second + 1) * 1_000_000 + 500_000);
    let mut events: Vec<Value> = (0..10)
        .map(|i| call(&format!("mix-a-{i}"), "winmix", &first))
        .collect();
    events.extend((0..3).map(|i| call(&format!("mix-b-{i}"), "winmix", &next)));
    send(&server, events).await;
    let billed = eventually(Duration::from_secs(60), async || {
        let mut billed: Vec<(String, i64)> = fake
            .events()
            .iter()
            .filter_map(|e| {
                let id = e["identifier"].as_str()?;
                id.starts_with("ns:winmix:")
                    .then(|| (id.to_string(), e["value"].as_i64().unwrap_or(0)))
            })
            .collect();
        billed.sort();
        match billed.iter().map(|(_, v)| v).sum::<i64>() {
            13 => Ok(billed),
            _ => Err(format!("billed so far: {billed:?}")),
        }
    })
    .await;
    assert_eq!(
        billed,
        [
            (format!("ns:winmix:api_requests:{second}:0"), 10),
            (format!("ns:winmix:api_requests:{}:0", second + 1), 3),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn permanent_error_is_dead_lettered_and_others_flow() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = start(&nats, &billing_config(&fake.base()));
    set_stripe_customer(&server, "broken", "cus_missing").await;
    let at = now();
    let mut events = Vec::new();
    for i in 0..5 {
        events.push(call(&format!("broken-{i}"), "broken", &at));
        events.push(call(&format!("healthy-{i}"), "healthy", &at));
    }
    send(&server, events).await;

    let dead_letter = async || {
        eventually(Duration::from_secs(60), async || {
            let status = billing_status(&server).await;
            let dead = status["dead"].as_array().cloned().unwrap_or_default();
            match dead.iter().find(|d| d["customer_id"] == "broken") {
                Some(letter) => Ok(letter.clone()),
                None => Err(status.to_string()),
            }
        })
        .await
    };
    let letter = dead_letter().await;
    assert!(
        letter["message"]
            .as_str()
            .is_some_and(|m| m.contains("No such customer")),
        "the dead letter says why: {letter}"
    );
    assert_eq!(letter["feature"], "api_requests", "{letter}");
    assert_eq!(letter["event_name"], "api_requests", "{letter}");
    assert_eq!(letter["value"], 5, "{letter}");
    assert_eq!(letter["status"], 400, "{letter}");
    let identifier = letter["identifier"]
        .as_str()
        .expect("the letter's identifier")
        .to_string();
    assert!(
        identifier.starts_with("ns:broken:api_requests:"),
        "{identifier}"
    );

    eventually(Duration::from_secs(60), async || {
        let got = nonzero(fake.totals());
        let want = BTreeMap::from([(("healthy".to_string(), "api_requests".to_string()), 5)]);
        if got == want {
            Ok(())
        } else {
            Err(format!("Stripe has {got:?}"))
        }
    })
    .await;
    let status = billing_status(&server).await;
    assert!(
        status["dead"]
            .as_array()
            .is_some_and(|d| d.iter().all(|l| l["customer_id"] == "broken")),
        "only the refused customer is dead-lettered: {status}"
    );

    // The CLI reads the outbox on disk, next to the running server.
    let data = server.data.to_string_lossy().into_owned();
    let (code, stdout, stderr) = northstar_billing(&["status", "--data", &data]).await;
    assert_eq!(
        code, 1,
        "billing status exits 1 while there are dead letters: {stdout}{stderr}"
    );
    assert!(
        stdout.contains(&identifier) && stdout.contains("No such customer"),
        "the text status shows the dead letter: {stdout}"
    );
    let (code, stdout, stderr) =
        northstar_billing(&["status", "--data", &data, "--format", "json"]).await;
    assert_eq!(code, 1, "billing status --format json: {stdout}{stderr}");
    let on_disk: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("billing status --format json is JSON ({e}): {stdout}"));
    assert!(
        on_disk["dead"]
            .as_array()
            .is_some_and(|d| d.iter().any(|l| l["identifier"] == identifier.as_str())),
        "the JSON status lists the dead letter: {on_disk}"
    );

    // Retrying sends it again; Stripe still refuses, so it is dead again, and nothing is billed.
    let retry = send_as(
        &server,
        ADMIN_KEY,
        http::Method::POST,
        "/v1/billing/retry",
        None,
    )
    .await;
    assert_eq!(retry.status, 200, "retry: {}", retry.text());
    let again = dead_letter().await;
    assert_eq!(again["identifier"], identifier.as_str());
    assert!(
        !fake
            .totals()
            .keys()
            .any(|(customer, _)| customer == "cus_missing"),
        "nothing billed to the unknown customer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_sink_delivers_once_with_idempotency_keys() {
    let fake = FakeStripe::start(Faults {
        rate: 0.3,
        seed: 0x5EED_0004,
    })
    .await;
    let nats = Nats::start();
    let server = start(&nats, &webhook_config(&format!("{}/hook", fake.base())));
    let customers = ["north", "south", "east"];
    let mut metered = Metered::default();
    for batch in 0..6 {
        let at = now();
        let events = metered.mixed_batch(&format!("w{batch}"), 30, 4, batch, &customers, &at);
        send(&server, events).await;
        wait_next_window().await;
    }

    let expected = metered.billed();
    eventually(Duration::from_secs(90), async || {
        let got = nonzero(fake.hook_totals());
        if got == expected {
            Ok(())
        } else {
            Err(format!(
                "the webhook has {got:?}, metered {expected:?} (faults {})",
                fake.faults_injected()
            ))
        }
    })
    .await;
    let status = wait_settled(&server).await;
    assert_eq!(status["dead"], json!([]), "nothing dead-lettered: {status}");
    assert!(fake.faults_injected() > 0, "faults were injected");

    let keys = fake.hook_keys();
    for (key, body) in keys.iter().zip(fake.hook_bodies()) {
        assert!(
            body["identifier"]
                .as_str()
                .is_some_and(|id| id.starts_with("ns:")),
            "each body carries its identifier: {body}"
        );
        assert!(
            body["value"].as_i64().is_some(),
            "each body carries a whole value: {body}"
        );
        assert_eq!(
            body["identifier"].as_str(),
            Some(key.as_str()),
            "the Idempotency-Key is the report's identifier"
        );
    }
    wait_quiescent(&server).await;
    assert_eq!(
        nonzero(fake.hook_totals()),
        expected,
        "nothing more once delivered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signature_is_verified() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = start(&nats, &billing_config(&fake.base()));
    let body = checkout_completed("evt_sig_1", "cs_test_sig", "sigcheck", "pro");
    let now_secs = system_micros() / 1_000_000;
    let refusals = [
        (
            "signed with another secret",
            Some(FakeStripe::sign("whsec_someone_else", &body)),
        ),
        (
            "signed 10 minutes ago",
            Some(FakeStripe::sign_at(WEBHOOK_SECRET, &body, now_secs - 600)),
        ),
        (
            "signed for another body",
            Some(FakeStripe::sign(WEBHOOK_SECRET, b"{}")),
        ),
        ("not signed", None),
    ];
    for (case, signature) in refusals {
        let answer = stripe_webhook(&server, signature.as_deref(), &body).await;
        assert_eq!(answer.status, 400, "{case}: {}", answer.text());
        assert_eq!(
            answer.json()["code"],
            "invalid_signature",
            "{case}: {}",
            answer.text()
        );
        assert_eq!(
            plan_of(&server, "sigcheck").await,
            "free",
            "{case}: the plan is unchanged"
        );
    }
    // The same event, signed right, is applied: the refusals were about the signature only.
    let answer = stripe_webhook(
        &server,
        Some(&FakeStripe::sign(WEBHOOK_SECRET, &body)),
        &body,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(plan_of(&server, "sigcheck").await, "pro");
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_flow_end_to_end() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = start(&nats, &billing_config(&fake.base()));
    for i in 0..20 {
        let answer = consume(&server, "upgrader", &format!("up-{i}")).await;
        assert_eq!(answer.status, 200, "unit {i} of 20: {}", answer.text());
    }

    let refused = consume(&server, "upgrader", "up-20").await;
    assert_eq!(
        refused.status,
        402,
        "the 21st unit is over the free limit: {}",
        refused.text()
    );
    let upgrade = &refused.json()["upgrade"];
    let session = upgrade["checkout_session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a Checkout Session in the 402: {upgrade}"))
        .to_string();
    assert!(session.starts_with("cs_test_"), "{session}");
    assert_eq!(
        upgrade["checkout_url"].as_str(),
        Some(format!("https://checkout.stripe.test/c/pay/{session}").as_str()),
        "{upgrade}"
    );
    let checkouts = fake.checkout_requests();
    assert_eq!(checkouts.len(), 1, "{checkouts:?}");
    let params = &checkouts[0];
    let param = |name: &str| params.get(name).map(String::as_str);
    assert_eq!(param("mode"), Some("subscription"), "{params:?}");
    assert_eq!(
        param("line_items[0][price]"),
        Some("price_pro"),
        "{params:?}"
    );
    assert_eq!(
        param("metadata[northstar_customer]"),
        Some("upgrader"),
        "{params:?}"
    );
    assert_eq!(param("metadata[plan]"), Some("pro"), "{params:?}");
    assert_eq!(
        param("success_url"),
        Some("https://app.example/ok"),
        "{params:?}"
    );
    assert_eq!(
        param("cancel_url"),
        Some("https://app.example/cancel"),
        "{params:?}"
    );

    let again = consume(&server, "upgrader", "up-21").await;
    assert_eq!(again.status, 402, "{}", again.text());
    assert_eq!(
        again.json()["upgrade"]["checkout_session_id"],
        session.as_str(),
        "the session is made once and reused"
    );
    assert_eq!(
        fake.checkout_requests().len(),
        1,
        "no second Checkout Session"
    );

    let paid = checkout_completed("evt_upgrade_1", &session, "upgrader", "pro");
    let signature = FakeStripe::sign(WEBHOOK_SECRET, &paid);
    let answer = stripe_webhook(&server, Some(&signature), &paid).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let allowed = consume(&server, "upgrader", "up-22").await;
    assert_eq!(
        allowed.status,
        200,
        "the very next check sees pro: {}",
        allowed.text()
    );
    assert_eq!(allowed.json()["allowed"], true, "{}", allowed.text());
    assert_eq!(allowed.json()["plan"], "pro", "{}", allowed.text());

    // Stripe delivers the same event again after the customer moved elsewhere: no effect.
    set_plan(&server, "upgrader", "free").await;
    let replay = stripe_webhook(
        &server,
        Some(&FakeStripe::sign(WEBHOOK_SECRET, &paid)),
        &paid,
    )
    .await;
    assert_eq!(
        replay.status,
        200,
        "a repeat is acknowledged: {}",
        replay.text()
    );
    assert_eq!(
        plan_of(&server, "upgrader").await,
        "free",
        "a repeated event id is applied once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subscription_changes_follow_stripe() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = start(&nats, &billing_config(&fake.base()));
    let deliver = async |body: Vec<u8>| {
        let answer = stripe_webhook(
            &server,
            Some(&FakeStripe::sign(WEBHOOK_SECRET, &body)),
            &body,
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    };

    assert_eq!(plan_of(&server, "subscriber").await, "free");
    deliver(subscription_event(
        "evt_sub_1",
        "customer.subscription.updated",
        "subscriber",
        "price_pro",
    ))
    .await;
    assert_eq!(
        plan_of(&server, "subscriber").await,
        "pro",
        "the price maps back to its plan"
    );
    deliver(subscription_event(
        "evt_sub_2",
        "customer.subscription.deleted",
        "subscriber",
        "price_pro",
    ))
    .await;
    assert_eq!(
        plan_of(&server, "subscriber").await,
        "free",
        "a deleted subscription means the default plan"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_reports_differences() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let config = billing_config(&fake.base());
    let server = start(&nats, &config);
    let mut metered = Metered::default();
    let at = now();
    let mut events = Vec::new();
    for i in 0..6 {
        events.push(call(&format!("ra-{i}"), "rec-alpha", &at));
        metered.call("rec-alpha");
        events.push(call(&format!("rb-{i}"), "rec-beta", &at));
        metered.call("rec-beta");
    }
    events.push(storage("rb-s", "rec-beta", 9, &at));
    metered.storage("rec-beta", 9);
    send(&server, events).await;
    let expected = metered.billed_in_stripe(&BTreeMap::new());
    eventually(Duration::from_secs(60), async || {
        let got = nonzero(fake.totals());
        if got == expected {
            Ok(())
        } else {
            Err(format!("Stripe has {got:?}, metered {expected:?}"))
        }
    })
    .await;
    wait_settled(&server).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("northstar.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let config_arg = config_path.to_string_lossy().into_owned();
    let data = server.data.to_string_lossy().into_owned();
    let reconcile = ["reconcile", "--config", &config_arg, "--data", &data];

    let (code, stdout, stderr) = northstar_billing(&reconcile).await;
    assert_eq!(
        code, 0,
        "delivered equals Stripe's summaries: {stdout}{stderr}"
    );

    let lost = fake
        .events()
        .into_iter()
        .find(|e| e["stripe_customer_id"] == "rec-beta" && e["value"].as_i64() > Some(0))
        .and_then(|e| e["identifier"].as_str().map(str::to_string))
        .expect("a report for rec-beta");
    assert!(fake.forget(&lost));
    let (code, stdout, stderr) = northstar_billing(&reconcile).await;
    assert_eq!(
        code, 1,
        "a report Stripe lost is a difference: {stdout}{stderr}"
    );
    assert!(
        stdout.contains("rec-beta"),
        "the difference names the customer: {stdout}"
    );
}
