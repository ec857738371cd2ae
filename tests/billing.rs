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

    // /metrics says the same: one report dead, the healthy one confirmed, the calls made.
    let metrics = eventually(Duration::from_secs(30), async || {
        let text = send_as(&server, ADMIN_KEY, http::Method::GET, "/metrics", None)
            .await
            .text();
        let standing = |s: &str| {
            harness::metric(
                &text,
                &format!("northstar_billing_reports{{standing=\"{s}\"}}"),
            )
        };
        match (standing("dead"), standing("delivered"), standing("pending")) {
            (Some(1), Some(delivered), Some(0)) if delivered >= 1 => Ok(text),
            other => Err(format!("dead, delivered, pending: {other:?}")),
        }
    })
    .await;
    let count = |name: &str| harness::metric(&metrics, name).unwrap_or(0);
    assert!(count("northstar_billing_confirmed_total") >= 1, "{metrics}");
    assert!(
        count("northstar_billing_calls_total") >= 2,
        "a call for each customer at least: {metrics}"
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
        param("line_items[0][quantity]"),
        Some("1"),
        "a licensed price names its quantity: {params:?}"
    );
    assert_eq!(
        fake.api_versions(),
        std::collections::BTreeSet::from([northstar::billing::stripe::API_VERSION.to_string()]),
        "every call pins the API version"
    );
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

/// A Checkout of a metered price names no quantity (Stripe refuses one), and the plan moves
/// only once the checkout is paid: not on a completed session still `unpaid` (a bank debit
/// not yet cleared), but on its `async_payment_succeeded`; a paused subscription goes back
/// to the default plan.
#[tokio::test(flavor = "multi_thread")]
async fn a_checkout_upgrades_once_paid_and_a_metered_price_names_no_quantity() {
    let fake = FakeStripe::start(Faults::none()).await;
    fake.add_price("price_pro_metered", "metered");
    let nats = Nats::start();
    let mut config = billing_config(&fake.base());
    config["billing"]["checkout"]["prices"]["pro"] = json!("price_pro_metered");
    let server = start(&nats, &config);
    for i in 0..20 {
        let answer = consume(&server, "debit", &format!("debit-{i}")).await;
        assert_eq!(answer.status, 200, "unit {i} of 20: {}", answer.text());
    }
    let refused = consume(&server, "debit", "debit-20").await;
    assert_eq!(refused.status, 402, "{}", refused.text());
    let session = refused.json()["upgrade"]["checkout_session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("Stripe took the checkout: {}", refused.text()))
        .to_string();
    let checkouts = fake.checkout_requests();
    assert_eq!(
        checkouts[0].get("line_items[0][quantity]"),
        None,
        "{checkouts:?}"
    );

    let deliver = async |body: Vec<u8>| deliver_signed(&server, &body).await;
    let mut unpaid: Value =
        serde_json::from_slice(&checkout_completed("evt_debit_1", &session, "debit", "pro"))
            .expect("a JSON event");
    unpaid["data"]["object"]["payment_status"] = json!("unpaid");
    deliver(unpaid.to_string().into_bytes()).await;
    assert_eq!(
        plan_of(&server, "debit").await,
        "free",
        "not paid yet: the plan stays"
    );
    let mut succeeded = unpaid.clone();
    succeeded["id"] = json!("evt_debit_2");
    succeeded["type"] = json!("checkout.session.async_payment_succeeded");
    succeeded["data"]["object"]["payment_status"] = json!("paid");
    deliver(succeeded.to_string().into_bytes()).await;
    assert_eq!(
        plan_of(&server, "debit").await,
        "pro",
        "paid: the plan moves"
    );

    let mut paused: Value = serde_json::from_slice(&subscription_event(
        "evt_debit_3",
        "customer.subscription.updated",
        "debit",
        "price_pro_metered",
    ))
    .expect("a JSON event");
    paused["data"]["object"]["status"] = json!("paused");
    deliver(paused.to_string().into_bytes()).await;
    assert_eq!(
        plan_of(&server, "debit").await,
        "free",
        "a paused subscription is not paid for"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subscription_changes_follow_stripe() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = start(&nats, &billing_config(&fake.base()));
    let deliver = async |body: Vec<u8>| deliver_signed(&server, &body).await;

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

/// splitmix64: the drawn cases below are the same on every run (the seed is in the test).
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A quantity as some JSON encoder writes it: plain or with an exponent (either case,
    /// either sign), many decimals, negative zero, or a number in a string.
    fn quantity(&mut self) -> String {
        let mantissa = self.below(1_000_000);
        let scale = self.below(11) as u32;
        let plain = rust_decimal::Decimal::new(mantissa as i64, scale).to_string();
        match self.below(8) {
            0 => format!("{mantissa}e-{scale}"),
            1 => format!("{mantissa}E-{scale}"),
            2 => format!("{}e+{}", self.below(1_000), self.below(3)),
            3 => "-0.0".to_string(),
            4 => "-0".to_string(),
            5 => format!("\"{plain}\""),
            _ => plain,
        }
    }
}

/// Guarantees 4 and 5 on drawn events: quantities in every JSON number form, times spread over
/// 70 days (this period and the ones before), identity merges in between. The meter, SQL over
/// `metered_events` and the usage windows agree (`usage verify`); Stripe is billed, per window,
/// what SQL counts in that window (whole API requests), and per customer the floor of the
/// exact storage SQL sums.
#[tokio::test(flavor = "multi_thread")]
async fn meter_sql_usage_windows_and_billing_agree_on_drawn_events() {
    let fake = FakeStripe::start(Faults::none()).await;
    let nats = Nats::start();
    let server = start(&nats, &billing_config(&fake.base()));
    let mut draw = Draw(0x0005_EED0_2712);
    let now = system_micros() / 1_000_000;
    let customers = ["drawn-a", "drawn-b", "drawn-c"];
    let mut texts = Vec::new();
    let mut sent = 0u64;
    for i in 0..400 {
        let customer = customers[draw.below(3) as usize];
        // Whole seconds 30 s to 70 days back, a few events sharing a second now and then.
        let back = draw.below(70 * 86_400) / [1, 1, 1, 86_400][draw.below(4) as usize];
        let second = now - 30 - back as i64;
        let at = format!("\"{}\"", format_micros(second * 1_000_000 + 250_000));
        let text = match draw.below(10) {
            0..=4 => format!(
                r#"{{"type":"track","messageId":"d-{i}","userId":"{customer}-u{}","event":"api_call_made","timestamp":{at},"context":{{"groupId":"{customer}"}},"properties":{{"endpoint":"/x"}}}}"#,
                draw.below(5)
            ),
            5..=7 => format!(
                r#"{{"type":"track","messageId":"d-{i}","userId":"{customer}-u{}","event":"storage_used","timestamp":{at},"context":{{"groupId":"{customer}"}},"properties":{{"gb":{}}}}}"#,
                draw.below(5),
                draw.quantity()
            ),
            8 => format!(
                r#"{{"type":"identify","messageId":"d-{i}","userId":"{customer}-u{}","anonymousId":"anon-{}","timestamp":{at}}}"#,
                draw.below(5),
                draw.below(20)
            ),
            _ => format!(
                r#"{{"type":"track","messageId":"d-{i}","userId":"{customer}-u{}","event":"$merge_dangerously","timestamp":{at},"properties":{{"alias":"{customer}-u{}"}}}}"#,
                draw.below(5),
                draw.below(5)
            ),
        };
        texts.push(text);
        sent += 1;
    }
    for chunk in texts.chunks(100) {
        let body = format!(r#"{{"batch":[{}]}}"#, chunk.join(","));
        let answer = server
            .client
            .send(
                http::Method::POST,
                &format!("{}/v1/batch", server.base),
                &[
                    (
                        "authorization",
                        &northstar::client::basic_auth(harness::WRITE_KEY),
                    ),
                    ("content-type", "application/json"),
                ],
                body.into_bytes(),
            )
            .await
            .expect("answered");
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["rejected"], 0, "{}", answer.text());
    }
    server.wait_archived(sent).await;

    // Meter = SQL = usage windows, for every customer and feature of the current period.
    let report = eventually(Duration::from_secs(60), async || {
        let r = send_as(
            &server,
            ADMIN_KEY,
            http::Method::POST,
            "/v1/usage/verify",
            Some(&json!({})),
        )
        .await;
        match r.status {
            200 => Ok(r.json()),
            status => Err(format!("verify answered {status}: {}", r.text())),
        }
    })
    .await;
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["compared"].as_u64() > Some(0), "{report}");

    // Billed per window = SQL per window (API requests); billed = floor of SQL (storage).
    let per_window = harness::query(
        &server.data,
        "SELECT customer_id, CAST(to_unixtime(\"timestamp\") AS BIGINT) AS second, count(*) AS n \
         FROM metered_events WHERE feature = 'api_requests' GROUP BY 1, 2",
    )
    .await;
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for row in &per_window {
        let key = (
            row["customer_id"].as_str().unwrap_or_default().to_string(),
            row["second"].as_i64().unwrap_or_default(),
        );
        want.insert(key, row["n"].as_i64().unwrap_or_default());
    }
    let storage = harness::query(
        &server.data,
        "SELECT customer_id, CAST(floor(sum(quantity)) AS BIGINT) AS units FROM metered_events \
         WHERE feature = 'storage_gb' GROUP BY 1",
    )
    .await;
    let billed_windows = || {
        let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
        for event in fake.events() {
            let id = event["identifier"].as_str().unwrap_or_default();
            let parts: Vec<&str> = id.split(':').collect();
            if let ["ns", customer, "api_requests", second, _] = parts.as_slice() {
                *got.entry((customer.to_string(), second.parse().unwrap_or_default()))
                    .or_default() += event["value"].as_i64().unwrap_or_default();
            }
        }
        got
    };
    eventually(Duration::from_secs(90), async || {
        let got = billed_windows();
        let totals = fake.totals();
        let storage_ok = storage.iter().all(|row| {
            let customer = row["customer_id"].as_str().unwrap_or_default().to_string();
            let units = row["units"].as_i64().unwrap_or_default();
            totals.get(&(customer, "storage".to_string())).copied().unwrap_or(0) == units
        });
        match got == want && storage_ok {
            true => Ok(()),
            false => Err(format!(
                "billed per window {got:?}\nSQL per window {want:?}\nstorage totals {totals:?} vs {storage:?}"
            )),
        }
    })
    .await;
}
