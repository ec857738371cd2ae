//! Funnels and retention over a generated history, through the API, against a hand count
//! of the same messages (identity resolved by their identify calls).

mod harness;

use std::collections::{BTreeMap, HashMap, HashSet};

use harness::{ADMIN_KEY, Nats, Northstar, test_config};
use northstar::activation::generate::{HistorySpec, data_end_micros, generate, parse_timestamp};
use serde_json::{Value, json};

const DAY: i64 = 86_400_000_000;

/// (person, event, time) of every track message, anonymous ids resolved through identify.
fn resolved(messages: &[Value]) -> Vec<(String, String, i64)> {
    let mut person_of: HashMap<String, String> = HashMap::new();
    for m in messages {
        if let (Some("identify"), Some(user), Some(anonymous)) = (
            m["type"].as_str(),
            m["userId"].as_str(),
            m["anonymousId"].as_str(),
        ) {
            person_of.insert(anonymous.to_string(), user.to_string());
        }
    }
    messages
        .iter()
        .filter(|m| m["type"] == "track")
        .map(|m| {
            let person = match (m["userId"].as_str(), m["anonymousId"].as_str()) {
                (Some(user), _) => user.to_string(),
                (None, Some(anonymous)) => person_of
                    .get(anonymous)
                    .cloned()
                    .unwrap_or_else(|| anonymous.to_string()),
                (None, None) => String::new(),
            };
            let at = parse_timestamp(m["timestamp"].as_str().unwrap()).unwrap();
            (person, m["event"].as_str().unwrap().to_string(), at)
        })
        .collect()
}

/// The hand count of an ordered funnel: per step, people and the median µs from the previous
/// step (the earliest event at each step, within `window` of the first).
fn hand_funnel(
    events: &[(String, String, i64)],
    steps: &[&str],
    window: i64,
    (from, to): (i64, i64),
) -> Vec<(u64, Option<f64>)> {
    let mut by_person: BTreeMap<&str, Vec<(&str, i64)>> = BTreeMap::new();
    for (person, event, at) in events {
        by_person.entry(person).or_default().push((event, *at));
    }
    let mut people = vec![0u64; steps.len()];
    let mut took: Vec<Vec<i64>> = vec![Vec::new(); steps.len()];
    for list in by_person.values() {
        let first = |event: &str, after: i64, before: i64, strict: bool| {
            list.iter()
                .filter(|(e, at)| {
                    *e == event && (if strict { *at > after } else { *at >= after }) && *at < before
                })
                .map(|(_, at)| *at)
                .min()
        };
        let Some(t1) = first(steps[0], from, to, false) else {
            continue;
        };
        people[0] += 1;
        let mut previous = t1;
        for (k, step) in steps.iter().enumerate().skip(1) {
            let Some(at) = first(step, previous, t1 + window, true) else {
                break;
            };
            people[k] += 1;
            took[k].push(at - previous);
            previous = at;
        }
    }
    people
        .into_iter()
        .zip(took)
        .map(|(n, mut took)| {
            took.sort_unstable();
            let median = match took.len() {
                0 => None,
                len if len % 2 == 1 => Some(took[len / 2] as f64),
                len => Some(((took[len / 2 - 1] + took[len / 2]) / 2) as f64),
            };
            (n, median)
        })
        .collect()
}

/// Monday 00:00 UTC of the week holding `at`.
fn week_of(at: i64) -> i64 {
    let days = at.div_euclid(DAY);
    (days - (days + 3).rem_euclid(7)) * DAY
}

/// The hand count of weekly retention: cohort week → (people, returned per week k).
fn hand_retention(
    events: &[(String, String, i64)],
    cohort_event: &str,
    return_event: &str,
    periods: usize,
    (from, to): (i64, i64),
) -> BTreeMap<i64, (u64, Vec<u64>)> {
    let mut first: HashMap<&str, i64> = HashMap::new();
    for (person, event, at) in events {
        if event == cohort_event && *at >= from && *at < to {
            let slot = first.entry(person).or_insert(*at);
            *slot = (*slot).min(*at);
        }
    }
    let mut table: BTreeMap<i64, (u64, Vec<u64>)> = BTreeMap::new();
    for at in first.values() {
        table.entry(week_of(*at)).or_insert((0, vec![0; periods])).0 += 1;
    }
    let mut seen: HashSet<(&str, i64)> = HashSet::new();
    for (person, event, at) in events {
        let Some(&first_at) = first.get(person.as_str()) else {
            continue;
        };
        if event != return_event || *at < first_at {
            continue;
        }
        let k = (week_of(*at) - week_of(first_at)) / (7 * DAY);
        if (k as usize) < periods && seen.insert((person, k)) {
            table.get_mut(&week_of(first_at)).unwrap().1[k as usize] += 1;
        }
    }
    table
}

#[tokio::test(flavor = "multi_thread")]
async fn funnels_and_retention_equal_the_hand_count() {
    let spec = HistorySpec {
        users: 300,
        ..HistorySpec::ending_at(northstar::clock::system_micros())
    };
    let messages = generate(&spec);
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    for chunk in messages.chunks(500) {
        server.send_batch(chunk.to_vec()).await;
    }
    server.wait_archived(messages.len() as u64).await;
    harness::wait_identified(&server.data, &messages).await;
    let events = resolved(&messages);
    let range = (spec.start_micros - 5 * DAY, data_end_micros(&spec));
    let (from, to) = (
        northstar::clock::format_micros(range.0),
        northstar::clock::format_micros(range.1),
    );

    // The anonymous visit, the signup, the core action: within 3 days of the visit.
    let steps = [
        "landing_page_viewed",
        "signup_completed",
        "core_action_completed",
    ];
    let ask = |path: &'static str, body: Value| {
        let server = &server;
        async move {
            let answer = server.post_as(ADMIN_KEY, path, &body).await;
            assert_eq!(answer.status, 200, "{}", answer.text());
            answer.json()
        }
    };
    let funnel = ask(
        "/v1/insights/funnel",
        json!({"steps": steps, "window": "3d", "from": from, "to": to}),
    )
    .await;
    let hand = hand_funnel(&events, &steps, 3 * DAY, range);
    assert!(
        hand[2].0 > 0,
        "the hand count must see conversions: {hand:?}"
    );
    let groups = funnel["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{funnel}");
    for (k, (people, median)) in hand.iter().enumerate() {
        let step = &groups[0]["steps"][k];
        assert_eq!(step["people"].as_u64(), Some(*people), "step {k}: {funnel}");
        match median {
            Some(us) => {
                let seconds = step["median_seconds_to_convert"].as_f64().unwrap();
                assert!(
                    (seconds - us / 1e6).abs() < 0.001,
                    "step {k}: {seconds} vs {}",
                    us / 1e6
                );
            }
            None => assert!(step["median_seconds_to_convert"].is_null()),
        }
    }
    let first = hand[0].0 as f64;
    assert_eq!(
        groups[0]["steps"][2]["conversion_from_first"].as_f64(),
        Some(hand[2].0 as f64 / first)
    );
    assert!(funnel["sql"].as_str().unwrap().contains("events_resolved"));

    // Broken down by customer: the groups add up to the whole.
    let split = ask(
        "/v1/insights/funnel",
        json!({"steps": steps, "window": "3d", "from": from, "to": to, "breakdown": "customer_id"}),
    )
    .await;
    let groups = split["groups"].as_array().unwrap();
    assert!(groups.len() > 1, "{split}");
    for k in 0..steps.len() {
        let sum: u64 = groups
            .iter()
            .map(|g| g["steps"][k]["people"].as_u64().unwrap())
            .sum();
        assert_eq!(sum, hand[k].0, "step {k}");
    }

    // Weekly retention of signups coming back to the dashboard.
    let table = ask(
        "/v1/insights/retention",
        json!({"cohortEvent": "signup_completed", "returnEvent": "dashboard_viewed",
               "period": "week", "periods": 8, "from": from, "to": to}),
    )
    .await;
    let hand = hand_retention(&events, "signup_completed", "dashboard_viewed", 8, range);
    let cohorts: Vec<(i64, u64, Vec<u64>)> = table["cohorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let start = parse_timestamp(c["cohort"].as_str().unwrap()).unwrap();
            let returned = c["returned"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .collect();
            (start, c["people"].as_u64().unwrap(), returned)
        })
        .collect();
    let expected: Vec<(i64, u64, Vec<u64>)> = hand
        .into_iter()
        .map(|(start, (people, returned))| (start, people, returned))
        .collect();
    assert!(
        expected.iter().any(|c| c.2[1] > 0),
        "the hand count must see returns"
    );
    assert_eq!(cohorts, expected, "{table}");

    // A bad question names its field.
    let bad = server
        .post_as(
            ADMIN_KEY,
            "/v1/insights/funnel",
            &json!({"steps": ["only_one"]}),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("steps"), "{}", bad.text());
    let bad = server
        .post_as(
            ADMIN_KEY,
            "/v1/insights/retention",
            &json!({"cohortEvent": "a", "returnEvent": "b", "period": "month"}),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("period"), "{}", bad.text());
}
