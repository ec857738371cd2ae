//! Activation thresholds end to end: a synthetic history with a planted threshold is imported
//! through ingest, the DataFusion analysis recovers the threshold, its cells equal a hand count,
//! and the result is versioned, served and drawn.

#[path = "activation/handcount.rs"]
mod handcount;
mod harness;

use handcount::{CountOptions, count_grid};
use harness::{ADMIN_KEY, Nats, Northstar, WRITE_KEY, query, test_config};
use northstar::activation::generate::{HistorySpec, data_end_micros, generate};
use northstar::activation::stats::Cell;
use serde_json::{Value, json};

/// `northstar import FILE` into `server`.
fn import(server: &Northstar, file: &std::path::Path) -> std::process::Output {
    northstar_cli(&[
        "import",
        file.to_str().unwrap(),
        "--url",
        &server.base,
        "--write-key",
        WRITE_KEY,
    ])
}

fn northstar_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_analysis_recovers_a_planted_threshold_and_matches_a_hand_count() {
    let spec = HistorySpec {
        users: 800,
        ..HistorySpec::default()
    };
    let messages = generate(&spec);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("history.jsonl");
    std::fs::write(
        &file,
        messages
            .iter()
            .map(|m| format!("{m}\n"))
            .collect::<String>(),
    )
    .unwrap();

    let nats = Nats::start();
    let mut config = test_config();
    config["activation"] = json!({"schedule": "0"});
    let server = Northstar::start(&nats, &config);
    let imported = import(&server, &file);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let report = String::from_utf8_lossy(&imported.stdout).to_string();
    assert!(
        report.contains(&format!(
            "{} lines: {} stored",
            messages.len(),
            messages.len()
        )),
        "{report}"
    );
    // Re-importing stores nothing twice.
    let again = import(&server, &file);
    assert!(
        String::from_utf8_lossy(&again.stdout)
            .contains(&format!("0 stored, {} already stored", messages.len()))
    );

    server.wait_archived(messages.len() as u64).await;
    harness::wait_identified(&server.data, &messages).await;

    let config_path = server.data.parent().unwrap().join("northstar.json");
    let as_of = northstar::clock::format_micros(data_end_micros(&spec));
    let result = aha_json(&server.data, &config_path, &as_of);
    let chosen = &result["analysis"]["evaluation"]["chosen"];
    assert_eq!(
        (chosen["times"].as_u64(), chosen["days"].as_u64()),
        (Some(3), Some(7)),
        "the planted threshold: {chosen}"
    );
    assert!(chosen["phi"].as_f64().unwrap() > 0.4);
    assert_eq!(result["analysis"]["cohort"], spec.users as u64);

    // Every cell equals the hand count of the generator's messages (identities resolved).
    let hand = count_grid(&messages, 1..=10, 1..=15, &CountOptions::for_spec(&spec));
    assert_cells_equal(&result, &hand, "default question");
    // The text form and the picture.
    let table = northstar_cli(&[
        "aha",
        "--data",
        server.data.to_str().unwrap(),
        "--config",
        config_path.to_str().unwrap(),
        "--as-of",
        &as_of,
    ]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("chosen: at least 3 times in 7 days"),
        "{text}"
    );
    let picture = server.data.join("activation/v2.svg");
    let svg = std::fs::read_to_string(&picture).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("class=\"chosen\""));
    assert!(
        svg.contains(" people, data to "),
        "the header says who was counted"
    );
    // Versioned in SQL, served over HTTP.
    let versions = query(
        &server.data,
        "SELECT DISTINCT version FROM activation ORDER BY version",
    )
    .await;
    assert_eq!(versions.len(), 2);
    let bearer = format!("Bearer {ADMIN_KEY}");
    let served = server
        .client
        .get(
            &format!("{}/v1/activation", server.base),
            &[("authorization", &bearer)],
        )
        .await
        .unwrap()
        .json();
    assert_eq!(served["current"]["times"], 3);
    assert_eq!(served["current"]["days"], 7);
    // The picture it names is the one under the server's own data dir.
    assert_eq!(
        served["current"]["picture"]
            .as_str()
            .map(std::path::PathBuf::from),
        Some(picture.clone()),
        "{served}"
    );
    assert_eq!(served["history"].as_array().unwrap().len(), 2);
    // …and it is served: the same SVG, as an image that can run nothing.
    let url = served["current"]["picture_url"]
        .as_str()
        .expect("picture_url");
    assert_eq!(url, "/v1/activation/versions/2/picture.svg");
    let image = server
        .client
        .get(
            &format!("{}{url}", server.base),
            &[("authorization", &bearer)],
        )
        .await
        .unwrap();
    assert_eq!(image.status, 200, "{}", image.text());
    assert_eq!(image.headers["content-type"], "image/svg+xml");
    assert!(
        image.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );
    assert_eq!(image.text(), std::fs::read_to_string(&picture).unwrap());
    let missing = server
        .client
        .get(
            &format!("{}/v1/activation/versions/9/picture.svg", server.base),
            &[("authorization", &bearer)],
        )
        .await
        .unwrap();
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert_eq!(missing.json()["code"], "version_not_found");
    let anonymous = server
        .client
        .get(&format!("{}{url}", server.base), &[])
        .await
        .unwrap();
    assert_eq!(anonymous.status, 401, "a key is needed");
    let series = server
        .client
        .get(
            &format!("{}/v1/northstar", server.base),
            &[("authorization", &bearer)],
        )
        .await
        .unwrap()
        .json();
    assert_eq!(
        (series["times"].as_u64(), series["threshold_from"].as_str()),
        (Some(3), Some("activation"))
    );
    let activated: i64 = series["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["activated"].as_i64().unwrap())
        .sum();
    assert!(activated > 0, "{series}");
    let last = series["series"].as_array().unwrap().last().unwrap();
    assert_eq!(last["cumulative"].as_i64(), Some(activated), "{series}");
    // Recompute over HTTP (cohort judged at the last event).
    let recomputed = server
        .client
        .post_json(
            &format!("{}/v1/activation/recompute", server.base),
            &[("authorization", &bearer)],
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(recomputed.status, 200, "{}", recomputed.text());

    // Another question over the same history: retention counted from two events only, in days
    // 21–49. Every cell still equals the hand count asked the same question.
    config["activation"] = json!({
        "schedule": "0",
        "activeEvents": ["core_action_completed", "dashboard_viewed"],
        "retainedFromDay": 21,
        "retainedToDay": 49
    });
    let narrower = dir.path().join("narrower.json");
    std::fs::write(&narrower, serde_json::to_vec(&config).unwrap()).unwrap();
    let result = aha_json(&server.data, &narrower, &as_of);
    let options = CountOptions {
        active_events: vec!["core_action_completed".into(), "dashboard_viewed".into()],
        retention_days: (21, 49),
        ..CountOptions::for_spec(&spec)
    };
    let hand = count_grid(&messages, 1..=10, 1..=15, &options);
    let default_hand = count_grid(&messages, 1..=1, 1..=1, &CountOptions::for_spec(&spec));
    assert_ne!(
        (hand[0].a, hand[0].c),
        (default_hand[0].a, default_hand[0].c),
        "the narrower question must count differently, or this check proves nothing"
    );
    assert_cells_equal(&result, &hand, "narrower question");
}

/// The usual journey: every person visits anonymously first, and each who does the core action
/// tries it once, anonymously, the day before signing up; the planted rule counts that try.
/// Counting from first seen (the default) recovers it; counting from signup (the only answer
/// before `activation.windowStart`) sees one action fewer and chooses one time fewer. Both
/// equal the hand count asked the same way.
#[tokio::test(flavor = "multi_thread")]
async fn counting_from_first_seen_recovers_a_rule_that_counts_actions_before_signup() {
    let spec = HistorySpec {
        users: 800,
        anonymous_share: 1.0,
        pre_signup_share: 1.0,
        ..HistorySpec::default()
    };
    let messages = generate(&spec);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("history.jsonl");
    let lines: String = messages.iter().map(|m| format!("{m}\n")).collect();
    std::fs::write(&file, lines).unwrap();
    let nats = Nats::start();
    let mut config = test_config();
    config["activation"] = json!({"schedule": "0"});
    let server = Northstar::start(&nats, &config);
    let imported = import(&server, &file);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    server.wait_archived(messages.len() as u64).await;
    harness::wait_identified(&server.data, &messages).await;
    let as_of = northstar::clock::format_micros(data_end_micros(&spec));

    let config_path = server.data.parent().unwrap().join("northstar.json");
    let result = aha_json(&server.data, &config_path, &as_of);
    let chosen = &result["analysis"]["evaluation"]["chosen"];
    assert_eq!(
        (chosen["times"].as_u64(), chosen["days"].as_u64()),
        (Some(3), Some(7)),
        "from first seen, the planted rule: {chosen}"
    );
    assert_eq!(result["analysis"]["question"]["window_start"], "firstSeen");
    let from_first = CountOptions::for_spec(&spec);
    let hand = count_grid(&messages, 1..=10, 1..=15, &from_first);
    assert_cells_equal(&result, &hand, "from first seen");

    config["activation"] = json!({"schedule": "0", "windowStart": "signup"});
    let from_signup_config = dir.path().join("signup.json");
    std::fs::write(&from_signup_config, serde_json::to_vec(&config).unwrap()).unwrap();
    let result = aha_json(&server.data, &from_signup_config, &as_of);
    let from_signup = CountOptions {
        window_start: northstar::config::WindowStart::Signup,
        ..CountOptions::for_spec(&spec)
    };
    let hand = count_grid(&messages, 1..=10, 1..=15, &from_signup);
    assert_cells_equal(&result, &hand, "from signup");
    let chosen = &result["analysis"]["evaluation"]["chosen"];
    assert_eq!(
        (chosen["times"].as_u64(), chosen["days"].as_u64()),
        (Some(2), Some(7)),
        "from signup the pre-signup try is lost: one time fewer than the planted rule: {chosen}"
    );
}

/// `northstar aha --format json` over `data` with `config`, judged at `as_of`.
fn aha_json(data: &std::path::Path, config: &std::path::Path, as_of: &str) -> Value {
    let out = northstar_cli(&[
        "aha",
        "--data",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--format",
        "json",
        "--as-of",
        as_of,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every candidate's a, b, c, d in `result` equal the hand count's.
fn assert_cells_equal(result: &Value, hand: &[Cell], question: &str) {
    let candidates = result["analysis"]["evaluation"]["candidates"]
        .as_array()
        .unwrap();
    assert_eq!(candidates.len(), hand.len());
    for cell in hand {
        let ours = candidates
            .iter()
            .find(|c| c["times"] == cell.times && c["days"] == cell.days)
            .unwrap();
        assert_eq!(
            (
                ours["a"].as_u64(),
                ours["b"].as_u64(),
                ours["c"].as_u64(),
                ours["d"].as_u64()
            ),
            (Some(cell.a), Some(cell.b), Some(cell.c), Some(cell.d)),
            "{question}, cell x={} y={}",
            cell.times,
            cell.days
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_questions_get_clear_answers_not_wrong_numbers() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &test_config());
    let batch: Vec<Value> = (0..5)
        .map(|i| json!({"type": "track", "messageId": format!("b-{i}"), "userId": format!("u{i}"), "event": "signup_completed"}))
        .collect();
    server.send_batch(batch).await;
    server.wait_archived(5).await;
    server.terminate();
    let config_path = server.data.parent().unwrap().join("northstar.json");
    let run = |args: &[&str]| {
        let mut all = vec![
            "aha",
            "--data",
            server.data.to_str().unwrap(),
            "--config",
            config_path.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let out = northstar_cli(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&[]);
    assert!(!ok);
    assert!(
        err.contains("`core_action_completed` (North Star) never occurs"),
        "{err}"
    );

    let mut config = test_config();
    config["activation"] = json!({"northStarEvent": "signup_completed"});
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let (ok, err) = run(&[]);
    assert!(!ok);
    assert!(err.contains("too young"), "{err}");

    config["activation"] = json!({"maxDays": 40});
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let (ok, err) = run(&[]);
    assert!(!ok);
    assert!(err.contains("activation.maxDays"), "{err}");
}
