//! The Postgres wire (`sql.pgListen`, `--pg-listen`) with the clients analysts use: psql
//! (Debian's `postgresql-client`), psycopg 3, SQLAlchemy and pandas (pinned in
//! `tests/sdk/requirements.txt`), all installed by `./scripts/install-deps.sh --test`.

mod harness;

use harness::{ADMIN_KEY, ANALYST_KEY, Nats, Northstar, test_config, tracks};
use serde_json::{Value, json};

const MAX_SESSIONS: usize = 4;

fn psql(addr: &str, password: &str, commands: &[&str]) -> std::process::Output {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let mut command = std::process::Command::new("psql");
    command
        .args(["-h", host, "-p", port, "-U", "northstar", "-d", "northstar"])
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "30");
    for sql in commands {
        command.args(["-c", sql]);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("psql runs ({e}); ./scripts/install-deps.sh --test"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_psycopg_sqlalchemy_and_pandas_read_the_tables_within_the_sandbox() {
    let nats = Nats::start();
    let mut config = test_config();
    config["sql"] = json!({
        "pgListen": "127.0.0.1:0",
        "timeout": "3s",
        "maxRows": 100_000,
        "pgMaxSessions": MAX_SESSIONS,
    });
    let server = Northstar::start(&nats, &config);
    let addr = server
        .pg_addr
        .clone()
        .expect("the server prints its Postgres address");
    let mut events = tracks("pg", 0..30);
    for (i, event) in events.iter_mut().enumerate().take(12) {
        event["event"] = json!(if i % 2 == 0 {
            "signup_completed"
        } else {
            "report_viewed"
        });
    }
    server.send_batch(events).await;
    server.wait_archived(30).await;

    // psql: the meta-commands list tables and columns through pg_catalog.
    let out = psql(
        &addr,
        ANALYST_KEY,
        &["\\dt", "\\d events", "SELECT count(*) AS n FROM events"],
    );
    let printed = text(&out.stdout);
    assert!(out.status.success(), "psql: {}{printed}", text(&out.stderr));
    for expected in ["events", "identities", "timestamp with time zone", " 30\n"] {
        assert!(
            printed.contains(expected),
            "psql printed no {expected:?}:\n{printed}"
        );
    }
    let out = psql(&addr, ANALYST_KEY, &["DROP TABLE events"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("42501"), "{}", text(&out.stderr));
    let out = psql(&addr, "wrong-password-123456", &["SELECT 1"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("authentication failed"),
        "{}",
        text(&out.stderr)
    );

    // psycopg, SQLAlchemy and pandas.
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/pg_clients.py"
        ))
        .args([
            addr.as_str(),
            ANALYST_KEY,
            ADMIN_KEY,
            &MAX_SESSIONS.to_string(),
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "pg_clients.py failed (./scripts/install-deps.sh --test installs psycopg, SQLAlchemy, pandas)\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");

    let tables: Vec<&str> = seen["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for table in [
        "events",
        "events_resolved",
        "identities",
        "metered_events",
        "persons",
    ] {
        assert!(
            tables.contains(&table),
            "information_schema lists {table}: {tables:?}"
        );
    }
    assert_eq!(
        seen["columns"]["timestamp"], "timestamp with time zone",
        "{}",
        seen["columns"]
    );
    assert_eq!(seen["columns"]["event"], "text", "{}", seen["columns"]);
    assert_eq!(seen["columns"]["seq"], "numeric", "{}", seen["columns"]);
    assert_eq!(
        seen["catalog_queries"],
        json!([true, true, true, true, true, true])
    );
    // The answers equal the same SQL through the engine.
    let counted = server
        .sql("SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY event")
        .await;
    let by_event: serde_json::Map<String, Value> = counted
        .iter()
        .map(|row| (row["event"].as_str().unwrap().to_string(), row["n"].clone()))
        .collect();
    assert_eq!(
        seen["pandas"],
        Value::Object(by_event.clone()),
        "pandas.read_sql"
    );
    assert_eq!(
        seen["prepared"],
        json!([by_event["api_call_made"], 0]),
        "a prepared statement, twice"
    );
    assert_eq!(
        seen["decimal"], "12345678901234567.1234567891",
        "decimals are exact"
    );
    assert!(
        seen["timestamptz"].as_str().unwrap().ends_with("+00:00"),
        "{}",
        seen["timestamptz"]
    );
    assert_eq!(seen["streamed"], 100_000);
    assert_eq!(
        seen["over_rows"]["sqlstate"], "54000",
        "{}",
        seen["over_rows"]
    );
    assert!(
        seen["over_rows"]["message"]
            .as_str()
            .unwrap()
            .contains("sql.maxRows")
    );
    assert_eq!(seen["refused"]["sqlstate"], "42501", "{}", seen["refused"]);
    assert_eq!(
        seen["refused_setting"]["sqlstate"], "42501",
        "{}",
        seen["refused_setting"]
    );
    assert_eq!(seen["timeout"]["sqlstate"], "57014", "{}", seen["timeout"]);
    assert!(
        seen["timeout"]["message"]
            .as_str()
            .unwrap()
            .contains("timeout")
    );
    assert_eq!(
        seen["cancelled"]["sqlstate"], "57014",
        "{}",
        seen["cancelled"]
    );
    assert!(
        seen["cancelled"]["message"]
            .as_str()
            .unwrap()
            .contains("user request")
    );
    assert_eq!(
        seen["after_cancel"], 1,
        "the session goes on after a cancel"
    );
    assert_eq!(seen["admin_login"], 2, "the admin key logs in too");
    // libpq reports a failed login without its SQLSTATE (28P01 and 53300 on the wire).
    let failed_login = seen["wrong_password"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        failed_login.contains("authentication failed"),
        "{failed_login}"
    );
    let refused_session = seen["over_sessions"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        refused_session.contains("too many clients")
            && refused_session.contains("sql.pgMaxSessions"),
        "{refused_session}"
    );
    assert_eq!(seen["after_close"], 3, "a closed session frees its place");
    let listed = seen["sqlalchemy_tables"].as_array().unwrap();
    assert!(
        listed.contains(&json!("events")),
        "SQLAlchemy's inspector: {listed:?}"
    );

    // The analyst key reads over HTTP too, and nothing else.
    let answer = server
        .post_as(
            ANALYST_KEY,
            "/v1/sql",
            &json!({"sql": "SELECT count(*) AS n FROM events"}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = server
        .post_as(ANALYST_KEY, "/v1/usage/verify", &json!({}))
        .await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert_eq!(answer.json()["code"], "analyst_key_not_allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_offered_to_clients_that_ask_for_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(made.status.success(), "{}", text(&made.stderr));
    let nats = Nats::start();
    let mut config = test_config();
    config["sql"] = json!({
        "pgListen": "127.0.0.1:0",
        "pgTls": {"certFile": cert, "keyFile": key},
    });
    let server = Northstar::start(&nats, &config);
    let addr = server
        .pg_addr
        .clone()
        .expect("the server prints its Postgres address");
    let (host, port) = addr.rsplit_once(':').unwrap();
    for (mode, expected) in [("require", "SSL connection"), ("disable", "")] {
        let out = std::process::Command::new("psql")
            .arg(format!(
                "host={host} port={port} user=northstar dbname=northstar sslmode={mode}"
            ))
            .args(["-X", "-c", "\\conninfo", "-c", "SELECT 41 + 1 AS answer"])
            .env("PGPASSWORD", ANALYST_KEY)
            .output()
            .expect("psql runs");
        let printed = text(&out.stdout);
        assert!(
            out.status.success(),
            "sslmode={mode}: {}",
            text(&out.stderr)
        );
        assert!(printed.contains(" 42\n"), "{printed}");
        if expected.is_empty() {
            assert!(!printed.contains("SSL connection"), "{printed}");
        } else {
            assert!(printed.contains(expected), "sslmode={mode}: {printed}");
        }
    }
}
