//! Holdout experiments of the aha threshold: a flag splits new people into a treated arm,
//! nudged toward the threshold, and a control arm; the report compares the share reaching the
//! threshold, retention and upgrades per arm with the difference and its 95% interval. Tested
//! on generated histories where the nudge truly lifts retention and where it does nothing,
//! each against a hand count of the same people.

mod harness;

use std::time::Duration;

use harness::{ADMIN_KEY, Northstar, SERVICE_KEY, limits_config};
use northstar::onboarding::bucket;
use serde_json::{Value, json};

const FLAG: &str = "aha_test_nudge";
const PEOPLE: usize = 1_200;

/// What a hand count of the generated people says, per arm: people, reached, retained, upgraded.
#[derive(Debug, Default, PartialEq)]
struct Arm {
    people: u64,
    reached: u64,
    retained: u64,
    upgraded: u64,
}

/// The history of `PEOPLE` people who sign up after the experiment's start (and 20 before it,
/// who are not enrolled). A treated person reaches "3 × core_action_completed within 7 days"
/// with `reach.0`, a control one with `reach.1`; a person who reached it is retained with 0.8,
/// one who did not with 0.2. Every 10th treated person's customer upgrades.
fn history(reach: (f64, f64), seed: u64) -> (Vec<Value>, Vec<String>, Arm, Arm) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut events, mut upgrades) = (Vec::new(), Vec::new());
    let (mut treated, mut control) = (Arm::default(), Arm::default());
    let day = |d: i64, minute: usize| {
        let at = northstar::activation::generate::parse_timestamp("2026-02-01T00:00:00Z").unwrap()
            + d * 86_400_000_000
            + (minute as i64 % 1_440) * 60_000_000;
        northstar::clock::format_micros(at)
    };
    let mut add = |id: &str, name: &str, d: i64, i: usize, n: usize| {
        events.push(
            json!({"type": "track", "messageId": format!("{id}-{name}-{n}"), "userId": id,
            "event": name, "timestamp": day(d, i), "context": {"groupId": format!("c-{id}")}}),
        );
    };
    for i in 0..20 {
        add(&format!("early{i}"), "signup_completed", -40, i, 0);
    }
    for i in 0..PEOPLE {
        let id = format!("p{i}");
        let is_treated = bucket(FLAG, &id) < 0.5;
        let arm = if is_treated {
            &mut treated
        } else {
            &mut control
        };
        arm.people += 1;
        add(&id, "signup_completed", 0, i, 0);
        let p = if is_treated { reach.0 } else { reach.1 };
        let reached = rng.f64() < p;
        let times = if reached { 3 } else { 1 };
        for n in 0..times {
            add(&id, "core_action_completed", 1 + n, i, n as usize);
        }
        arm.reached += u64::from(reached);
        let retained = rng.f64() < if reached { 0.8 } else { 0.2 };
        if retained {
            add(&id, "app_opened", 30, i, 0);
        }
        arm.retained += u64::from(retained);
        if is_treated && i % 10 == 0 {
            upgrades.push(format!("c-{id}"));
            arm.upgraded += 1;
        }
    }
    (events, upgrades, treated, control)
}

/// Sends the history, starts the experiment before it, upgrades the customers, and returns
/// the report.
async fn run(reach: (f64, f64), seed: u64) -> (Value, Arm, Arm, Northstar) {
    let server = Northstar::start_embedded(&limits_config());
    let (events, upgrades, treated, control) = history(reach, seed);
    let total = events.len();
    for chunk in events.chunks(500) {
        server.send_batch(chunk.to_vec()).await;
    }
    server.wait_archived(total as u64).await;
    let started = server
        .post_as(
            ADMIN_KEY,
            "/v1/activation/experiments",
            &json!({"flag": FLAG, "share": 0.5, "times": 3, "days": 7, "started_at": "2026-01-15T00:00:00Z"}),
        )
        .await;
    assert_eq!(started.status, 201, "{}", started.text());
    assert_eq!(started.json()["id"], "exp-1");
    for customer in &upgrades {
        let answer = server
            .put_admin(
                &format!("/v1/customers/{customer}"),
                &json!({"plan": "pro"}),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let report = harness::eventually(Duration::from_secs(30), async || {
        let answer = server
            .get_as(SERVICE_KEY, "/v1/activation/experiments/exp-1")
            .await;
        match answer.status {
            200 => Ok(answer.json()),
            _ => Err(answer.text()),
        }
    })
    .await;
    (report, treated, control, server)
}

fn arm_of(report: &Value, arm: &str) -> Arm {
    let arm = &report["arms"][arm];
    assert_eq!(
        arm["reached"]["judged"], arm["people"],
        "every window has ended"
    );
    Arm {
        people: arm["people"].as_u64().unwrap(),
        reached: arm["reached"]["did"].as_u64().unwrap(),
        retained: arm["retained"]["did"].as_u64().unwrap(),
        upgraded: arm["upgraded"]["did"].as_u64().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nudge_that_lifts_retention_shows_a_difference_that_excludes_zero() {
    let (report, treated, control, server) = run((0.7, 0.3), 7).await;
    assert_eq!(arm_of(&report, "treatment"), treated, "{report}");
    assert_eq!(arm_of(&report, "control"), control, "{report}");
    let retained = &report["difference"]["retained"];
    assert_eq!(retained["excludes_zero"], true, "{report}");
    assert!(retained["ci95"][0].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["difference"]["reached"]["excludes_zero"], true);
    assert_eq!(report["difference"]["upgraded"]["excludes_zero"], true);

    // The product reads each person's arm from their flags, and the treated get the nudge.
    let (treated_id, control_id) = {
        let mut ids = (0..PEOPLE).map(|i| format!("p{i}"));
        let treated = ids.clone().find(|id| bucket(FLAG, id) < 0.5).unwrap();
        let control = ids.find(|id| bucket(FLAG, id) >= 0.5).unwrap();
        (treated, control)
    };
    for (id, arm) in [(&treated_id, "treatment"), (&control_id, "control")] {
        let flags = server
            .get_as(SERVICE_KEY, &format!("/v1/users/{id}/flags"))
            .await
            .json();
        assert_eq!(flags["flags"][FLAG], arm, "{flags}");
        let onboarding = server
            .get_as(SERVICE_KEY, &format!("/v1/users/{id}/onboarding"))
            .await
            .json();
        let nudged = onboarding["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["experiment"] == "exp-1");
        assert_eq!(nudged, arm == "treatment", "{onboarding}");
    }

    // The dashboard's activation view shows it, with an analyst key.
    let (dom, _) = harness::render_dashboard(&server.base, harness::ANALYST_KEY, "activation");
    let table = &dom[dom.find("id=\"experiments\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    let people = format!("<td>{} / {}</td>", treated.people, control.people);
    assert!(
        table.contains("exp-1 (aha_test_nudge)") && table.contains(&people),
        "{table}"
    );

    // Stopped, it keeps its report and enrols no one new; the list has it.
    let stopped = server
        .post_as(
            ADMIN_KEY,
            "/v1/activation/experiments/exp-1/stop",
            &json!({}),
        )
        .await;
    assert_eq!(stopped.status, 200, "{}", stopped.text());
    let list = server
        .get_as(SERVICE_KEY, "/v1/activation/experiments")
        .await
        .json();
    assert!(list["experiments"][0]["ended_at"].is_string(), "{list}");
    let flags = server
        .get_as(SERVICE_KEY, &format!("/v1/users/{treated_id}/flags"))
        .await
        .json();
    assert!(flags["flags"].get(FLAG).is_none(), "{flags}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nudge_that_does_nothing_shows_no_difference() {
    let (report, treated, control, _server) = run((0.5, 0.5), 11).await;
    assert_eq!(arm_of(&report, "treatment"), treated, "{report}");
    assert_eq!(arm_of(&report, "control"), control, "{report}");
    for measure in ["reached", "retained"] {
        let difference = &report["difference"][measure];
        assert_eq!(difference["excludes_zero"], false, "{measure}: {report}");
        let (low, high) = (
            difference["ci95"][0].as_f64().unwrap(),
            difference["ci95"][1].as_f64().unwrap(),
        );
        assert!(low < 0.0 && high > 0.0 && high - low < 0.2, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_experiment_needs_a_threshold_and_the_admin_key() {
    let server = Northstar::start_embedded(&limits_config());
    let none = server
        .post_as(ADMIN_KEY, "/v1/activation/experiments", &json!({}))
        .await;
    assert_eq!(none.status, 400, "{}", none.text());
    assert_eq!(none.json()["code"], "no_threshold");
    let bad = server
        .post_as(
            ADMIN_KEY,
            "/v1/activation/experiments",
            &json!({"times": 3, "days": 7, "share": 2}),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("share"), "{}", bad.text());
    let service = server
        .post_as(
            SERVICE_KEY,
            "/v1/activation/experiments",
            &json!({"times": 3, "days": 7}),
        )
        .await;
    assert_eq!(service.status, 403, "{}", service.text());
    let missing = server
        .get_as(SERVICE_KEY, "/v1/activation/experiments/exp-9")
        .await;
    assert_eq!(missing.status, 404);
}
