//! SQL: `POST /v1/sql` (admin key, read-only, limits, JSON/CSV/Arrow) and `northstar sql`.

mod harness;

use harness::{ADMIN_KEY, Nats, Northstar, test_config, tracks};
use serde_json::json;

async fn sql_with(
    server: &Northstar,
    auth: Option<&str>,
    accept: Option<&str>,
    sql: &str,
) -> northstar::client::ClientResponse {
    let mut headers = vec![("content-type", "application/json")];
    let bearer = auth.map(|key| format!("Bearer {key}"));
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    if let Some(accept) = accept {
        headers.push(("accept", accept));
    }
    server
        .client
        .send(
            http::Method::POST,
            &format!("{}/v1/sql", server.base),
            &headers,
            json!({"sql": sql}).to_string().into_bytes(),
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sql_api_answers_admins_in_three_formats_and_refuses_writes() {
    let nats = Nats::start();
    let mut config = test_config();
    config["sql"] = json!({"maxRows": 5, "timeout": "2s"});
    let server = Northstar::start(&nats, &config);
    server.send_batch(tracks("sql", 0..20)).await;
    server.wait_archived(20).await;

    // Keys: none, wrong, a write key.
    let q =
        "SELECT customer_id, count(*) AS n FROM events GROUP BY customer_id ORDER BY customer_id";
    assert_eq!(sql_with(&server, None, None, q).await.status, 401);
    assert_eq!(
        sql_with(&server, Some("wrong-key-xxxx"), None, q)
            .await
            .status,
        401
    );
    assert_eq!(
        sql_with(&server, Some(harness::WRITE_KEY), None, q)
            .await
            .status,
        403
    );

    // JSON.
    let r = sql_with(&server, Some(ADMIN_KEY), None, q).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["columns"][0]["name"], "customer_id");
    assert_eq!(body["rows"][0], json!({"customer_id": "cust-0", "n": 4}));
    assert_eq!(body["row_count"], 5);
    assert_eq!(body["truncated"], false);
    // Decimals come back exact: as JSON numbers with every digit, not through a float.
    let r = sql_with(
        &server,
        Some(ADMIN_KEY),
        None,
        "SELECT CAST('12345678901234567.1234567891' AS DECIMAL(38,10)) AS d",
    )
    .await;
    assert!(
        r.text().contains(r#""d":12345678901234567.1234567891"#),
        "{}",
        r.text()
    );
    // JSON properties.
    let r = sql_with(&server, Some(ADMIN_KEY), None, "SELECT max(CAST(properties->>'n' AS BIGINT)) AS top FROM events WHERE (properties->>'endpoint') = '/v1/search'").await;
    assert_eq!(r.json()["rows"][0]["top"], 19, "{}", r.text());
    // CSV.
    let r = sql_with(&server, Some(ADMIN_KEY), Some("text/csv"), q).await;
    assert_eq!(r.headers["content-type"], "text/csv; charset=utf-8");
    assert!(
        r.text().starts_with("customer_id,n\ncust-0,4\n"),
        "{}",
        r.text()
    );
    // Arrow IPC.
    let r = sql_with(
        &server,
        Some(ADMIN_KEY),
        Some("application/vnd.apache.arrow.stream"),
        q,
    )
    .await;
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(r.body.to_vec()), None)
            .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 5);
    // The row cap.
    let r = sql_with(&server, Some(ADMIN_KEY), None, "SELECT * FROM events").await;
    assert_eq!(
        (
            r.json()["row_count"].as_u64(),
            r.json()["truncated"].as_bool()
        ),
        (Some(5), Some(true))
    );
    assert_eq!(r.headers["x-northstar-truncated"], "true");
    // The time limit.
    let r = sql_with(
        &server,
        Some(ADMIN_KEY),
        None,
        "SELECT count(*) FROM generate_series(1, 100000000000)",
    )
    .await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (504, Some("query_timeout")),
        "{}",
        r.text()
    );

    // Read-only: writes, settings and file access are refused with 400.
    for statement in [
        "COPY events TO '/tmp/northstar-escape.csv'",
        "CREATE EXTERNAL TABLE pw (line VARCHAR) STORED AS CSV LOCATION '/etc/passwd'",
        "INSERT INTO events SELECT * FROM events",
        "SET datafusion.execution.batch_size = 1",
        "DROP TABLE events",
        "SELECT 1; SELECT 2",
    ] {
        let r = sql_with(&server, Some(ADMIN_KEY), None, statement).await;
        assert_eq!(
            (r.status, r.json()["code"].as_str()),
            (400, Some("statement_not_allowed")),
            "{statement}: {}",
            r.text()
        );
    }
    for escape in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('/etc/passwd')",
    ] {
        let r = sql_with(&server, Some(ADMIN_KEY), None, escape).await;
        assert_eq!(r.status, 400, "{escape}: {}", r.text());
    }
    assert!(!std::path::Path::new("/tmp/northstar-escape.csv").exists());
    // Mistakes are the user's, with a clear code.
    let r = sql_with(&server, Some(ADMIN_KEY), None, "SELECT nope FROM events").await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (400, Some("invalid_query"))
    );
    // SHOW and DESCRIBE work.
    // (SHOW TABLES lists more tables than this config's 5-row cap, in no fixed order.)
    let r = sql_with(&server, Some(ADMIN_KEY), None, "SHOW TABLES").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("table_name"), "{}", r.text());
    let r = sql_with(
        &server,
        Some(ADMIN_KEY),
        None,
        "SELECT table_name FROM information_schema.tables WHERE table_name = 'rejected_events'",
    )
    .await;
    assert_eq!(r.json()["row_count"], 1, "{}", r.text());
    let r = sql_with(&server, Some(ADMIN_KEY), None, "DESCRIBE events").await;
    assert!(r.text().contains("event_id"), "{}", r.text());
    // The server's engine sees files committed after its first query.
    server.send_batch(tracks("sql-later", 0..3)).await;
    server.wait_archived(23).await;
    let r = sql_with(
        &server,
        Some(ADMIN_KEY),
        None,
        "SELECT count(*) AS n FROM events",
    )
    .await;
    assert_eq!(r.json()["rows"][0]["n"], 23, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sql_command_works_without_a_server() {
    let nats = Nats::start();
    let mut server = Northstar::start(&nats, &test_config());
    server.send_batch(tracks("cli", 0..10)).await;
    server.wait_archived(10).await;
    server.terminate();
    let run = |format: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
            .args([
                "sql",
                "SELECT count(*) AS n, count(DISTINCT customer_id) AS c FROM events",
                "--format",
                format,
                "--data",
            ])
            .arg(&server.data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("csv"), "n,c\n10,5\n");
    let json: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    assert_eq!(json["rows"][0], json!({"n": 10, "c": 5}));
    let table = run("table");
    assert!(table.contains("| 10 | 5 |"), "{table}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args(["sql", "DELETE FROM events", "--data"])
        .arg(&server.data)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("read-only"));
    let exact = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args([
            "sql",
            "SELECT CAST('12345678901234567.1234567891' AS DECIMAL(38,10)) AS d",
            "--format",
            "json",
            "--data",
        ])
        .arg(&server.data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&exact.stdout);
    assert!(
        stdout.contains(r#""d":12345678901234567.1234567891"#),
        "{stdout}"
    );
}

/// A data dir that does not exist, or holds no northstar table, is an error naming it (it
/// used to answer 0 rows, and to leave empty table directories behind).
#[test]
fn the_sql_command_refuses_a_data_dir_that_is_not_one() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nowhere");
    let run = |data: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
            .args(["sql", "SELECT count(*) FROM events", "--data"])
            .arg(data)
            .output()
            .unwrap()
    };
    let out = run(&missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not exist") && stderr.contains("nowhere"),
        "{stderr}"
    );
    assert!(!missing.exists(), "nothing is made where nothing was");
    let out = run(root.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("holds none of northstar's tables"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_saved_queries_run() {
    let nats = Nats::start();
    let server = Northstar::start(&nats, &test_config());
    let now = northstar::clock::system_micros();
    let demo = northstar::demo::demo_messages(300, now, 1);
    server.send_batch(demo).await;
    let bad = json!({"batch": [{"type": "track", "userId": "u"}]});
    assert_eq!(server.post("/v1/batch", &bad).await.status, 200);
    server.wait_archived(300).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sql") {
            let sql = std::fs::read_to_string(&path).unwrap();
            let rows = server.sql(&sql).await;
            if path.ends_with("top_events.sql") || path.ends_with("daily_active_users.sql") {
                assert!(!rows.is_empty(), "{} returned nothing", path.display());
            }
            ran += 1;
        }
    }
    assert!(ran >= 4);
}

#[test]
fn sql_output_into_a_pipe_closed_early_ends_quietly() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    // `northstar sql … | head -2`: far more output than a pipe holds, and the reader leaves.
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir(data.path().join("events")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args([
            "sql",
            "SELECT value FROM generate_series(1, 300000)",
            "--format",
            "csv",
            "--data",
        ])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "value");
    assert_eq!(lines.next().unwrap().unwrap(), "1");
    drop(lines);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("broken pipe"), "{stderr}");
}

/// Log lines written to a pipe or a file carry no colour codes (they used to, whatever
/// stderr was).
#[test]
fn log_lines_into_a_pipe_are_plain_text() {
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(work.path().join("data/events")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args(["sql", "SELECT 1 AS one", "--data"])
        .arg(work.path().join("data"))
        .current_dir(work.path())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("not found; using built-in defaults"),
        "the run logs a line: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );
}

/// Reports print as a table or JSON; the SQL-only formats are refused by name instead of
/// printing a table (`aha --format csv` and `billing status --format arrow` used to).
#[test]
fn reports_refuse_the_sql_only_formats() {
    for args in [
        &["aha", "--format", "csv"][..],
        &["billing", "status", "--format", "arrow"][..],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("possible values: table, json"), "{stderr}");
    }
}

/// A failing command prints one line, `error: …`, each cause once, and exits 1 (the
/// config error used to repeat its cause under "Caused by:").
#[test]
fn a_failing_command_says_its_error_once() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args(["sql", "SELECT 1", "--config", "/nonexistent/northstar.json"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: cannot read config /nonexistent/northstar.json"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// `serve` checks what it can before it spawns anything: a wrong pipeline file is said and
/// nats-server never started (its store dir is never made).
#[test]
fn a_wrong_pipeline_is_said_before_nats_server_is_started() {
    let dir = tempfile::tempdir().unwrap();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir(&pipelines).unwrap();
    std::fs::write(pipelines.join("usage_weekly.sql"), "SELECT 1").unwrap();
    let data = dir.path().join("data");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_northstar"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .arg("--pipelines")
        .arg(&pipelines)
        .env_remove("NORTHSTAR_NATS_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("usage_weekly.sql"), "{stderr}");
    assert!(
        !data.join("jetstream").exists(),
        "nats-server was started before the pipelines were checked"
    );
}
