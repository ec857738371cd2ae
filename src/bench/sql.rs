//! `northstar bench sql`: a fixed suite of analyst questions asked of a warm server through
//! `POST /v1/sql` and through the Postgres wire, next to DuckDB (Python package) running the same SQL on the same Parquet
//! files, in the same run.
//!
//! A generated product history (signups, the core action, page views, anonymous visits linked
//! by identify) is sent through the server's own ingest and waited for in Parquet, so the
//! files are the ones a server makes. Each query runs once to warm up, then `--runs` times on
//! each side; the median of each is compared, and the geometric mean of the ratios is the
//! headline. DuckDB gets two threads, as the server's SQL has.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::ingest::{ADMIN_KEY, ServerChild, WRITE_KEY};
use super::report::{Row, print_table, thousands};
use northstar::activation::generate::{HistorySpec, generate};
use northstar::bus::EmbeddedNats;
use northstar::client::{HttpClient, basic_auth};

/// Options of the SQL benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct SqlBench {
    /// People in the generated history (about nine events each).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) users: usize,
    /// Timed runs of each query on each side (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub(crate) runs: usize,
}

/// The suite: counts, group-bys, a distinct count, a time range, a top-N and a self-join, in
/// SQL both engines read the same way; then a funnel and a retention table as the insights
/// API renders them, for each engine (`queries/insights/`).
fn suite(from: &str, to: &str, now: i64) -> anyhow::Result<Vec<(&'static str, String, String)>> {
    let same = |name: &'static str, sql: String| (name, sql.clone(), sql);
    let plain: Vec<(&'static str, String)> = vec![
        ("count", "SELECT count(*) AS n FROM events".into()),
        (
            "events by name",
            "SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY n DESC, event".into(),
        ),
        (
            "distinct users",
            "SELECT count(DISTINCT user_id) AS n FROM events".into(),
        ),
        (
            "top customers in a week",
            format!(
                "SELECT customer_id, count(*) AS n FROM events \
                 WHERE \"timestamp\" >= TIMESTAMP '{from}' AND \"timestamp\" < TIMESTAMP '{to}' \
                 GROUP BY customer_id ORDER BY n DESC, customer_id LIMIT 10"
            ),
        ),
        (
            "events per day",
            "SELECT date, count(*) AS n FROM events GROUP BY date ORDER BY date".into(),
        ),
        (
            "most active users",
            "SELECT user_id, count(*) AS n FROM events WHERE event = 'core_action_completed' \
             GROUP BY user_id ORDER BY n DESC, user_id LIMIT 10"
                .into(),
        ),
        (
            "self-join: actions after signup",
            "SELECT count(*) AS n FROM (SELECT user_id, min(\"timestamp\") AS t FROM events \
             WHERE event = 'signup_completed' GROUP BY user_id) s \
             JOIN events e ON e.user_id = s.user_id \
             WHERE e.event = 'core_action_completed' AND e.\"timestamp\" >= s.t"
                .into(),
        ),
    ];
    let mut queries: Vec<_> = plain.into_iter().map(|(n, sql)| same(n, sql)).collect();
    let funnel = northstar::insights::FunnelQuestion {
        steps: vec![
            "landing_page_viewed".into(),
            "signup_completed".into(),
            "core_action_completed".into(),
        ],
        window: Some("3d".into()),
        from: Some(format!("{}Z", from.replace(' ', "T"))),
        to: None,
        breakdown: None,
    };
    let retention = northstar::insights::RetentionQuestion {
        cohort_event: "signup_completed".into(),
        return_event: "dashboard_viewed".into(),
        period: northstar::insights::Period::Week,
        periods: Some(8),
        from: Some(format!("{}Z", from.replace(' ', "T"))),
        to: None,
    };
    use northstar::insights::Dialect;
    let render_funnel = |d| {
        funnel
            .render(now, d)
            .map(|r| r.0)
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let render_retention = |d| {
        retention
            .render(now, d)
            .map(|r| r.0)
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    queries.push((
        "funnel, 3 steps in 3 days (insights)",
        render_funnel(Dialect::DataFusion)?,
        render_funnel(Dialect::DuckDb)?,
    ));
    queries.push((
        "weekly retention, 8 weeks (insights)",
        render_retention(Dialect::DataFusion)?,
        render_retention(Dialect::DuckDb)?,
    ));
    Ok(queries)
}

/// Runs the benchmark and prints its table.
pub(crate) async fn run(options: SqlBench) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("northstar-bench-sql-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&options, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run_in(options: &SqlBench, work: &Path) -> anyhow::Result<()> {
    let mut nats = EmbeddedNats::start(&work.join("jetstream"), None).await?;
    let config_path = work.join("config.json");
    let mut config: Value =
        serde_json::from_str(include_str!("../../tests/fixtures/config-template.json"))?;
    config["sources"] = json!([{"name": "bench", "writeKeys": [WRITE_KEY]}]);
    config["activation"] = json!({"schedule": "0"});
    config["sql"] = json!({"pgListen": "127.0.0.1:0"});
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let data = work.join("data");
    let server = ServerChild::spawn(&config_path, &data, nats.url()).await?;

    let spec = HistorySpec {
        users: options.users,
        ..HistorySpec::ending_at(northstar::clock::system_micros())
    };
    let messages = generate(&spec);
    eprintln!(
        "sending a history of {} people ({} events) through ingest…",
        thousands(options.users as f64),
        thousands(messages.len() as f64)
    );
    let client = HttpClient::new();
    let auth = basic_auth(WRITE_KEY);
    for chunk in messages.chunks(1_000) {
        let body = serde_json::to_vec(&json!({ "batch": chunk }))?;
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        loop {
            let answer = client
                .send(
                    http::Method::POST,
                    &format!("{}/v1/batch", server.base),
                    &headers,
                    body.clone(),
                )
                .await?;
            match answer.status {
                200 => break,
                429 | 503 => tokio::time::sleep(Duration::from_millis(50)).await,
                other => bail!("ingest answered {other}: {}", answer.text()),
            }
        }
    }
    let started = Instant::now();
    super::ingest::wait_landed(&data.join("events"), messages.len() as u64, started).await?;

    // The funnel and retention resolve people: wait for the identity table too.
    let linked = messages
        .iter()
        .filter(|m| m["type"] == "identify" && m.get("anonymousId").is_some())
        .count() as u64;
    let bearer = format!("Bearer {ADMIN_KEY}");
    loop {
        let answer = client
            .post_json(
                &format!("{}/v1/sql", server.base),
                &[("authorization", &bearer)],
                &json!({"sql": "SELECT count(*) AS n FROM identities"}),
            )
            .await?;
        if answer.json()["rows"][0]["n"].as_u64().unwrap_or(0) >= linked {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the identity table did not catch up within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Time the steady state: the archiver compacts what it just committed for a while after
    // the last event lands, and a query that runs beside a compaction pays for it.
    let files = settle(&data.join("events")).await;
    eprintln!("the events table settled at {files} files");

    let end = northstar::activation::generate::data_end_micros(&spec);
    let week = |days_back: i64| {
        let micros = end - days_back * 86_400_000_000;
        northstar::clock::format_micros(micros)
            .trim_end_matches('Z')
            .replace('T', " ")
    };
    let (from, to) = (week(74), week(67));
    let queries = suite(&from, &to, end)?;
    eprintln!("northstar: {} queries through POST /v1/sql…", queries.len());
    let mut ours = Vec::new();
    for (name, sql, _) in &queries {
        let mut times = Vec::new();
        let mut rows = 0;
        for run in 0..=options.runs {
            let began = Instant::now();
            let answer = client
                .post_json(
                    &format!("{}/v1/sql", server.base),
                    &[("authorization", &bearer)],
                    &json!({ "sql": sql }),
                )
                .await?;
            let took = began.elapsed();
            if answer.status != 200 {
                bail!(
                    "{name}: /v1/sql answered {}: {}",
                    answer.status,
                    answer.text()
                );
            }
            rows = answer.json()["row_count"].as_u64().unwrap_or(0);
            if run > 0 {
                times.push(took);
            }
        }
        ours.push((median(&mut times), rows));
    }
    let pg = match &server.pg {
        Some(addr) => Some(time_postgres_wire(addr, &queries, options.runs).await?),
        None => None,
    };
    server.stop().await;
    nats.stop().await;

    eprintln!("DuckDB: the same queries on the same files…");
    let duck = duckdb_suite(&data, work, &queries, options.runs)?;
    let total = thousands(messages.len() as f64);
    print_table(
        "northstar bench sql — warm server, POST /v1/sql vs DuckDB on the same Parquet files",
        "DuckDB (same SQL, same files)",
        &compare(&queries, &ours, &duck, options.runs, &total),
    );
    eprintln!(
        "(ours: from the request to the whole JSON answer over loopback; DuckDB: the query in its own process, no transfer)"
    );
    if let Some(pg) = pg {
        print_table(
            "northstar bench sql — warm server, the Postgres wire (tokio-postgres, simple query) vs DuckDB",
            "DuckDB (same SQL, same files)",
            &compare(&queries, &pg, &duck, options.runs, &total),
        );
        eprintln!("(ours: from the query to its last row over loopback, text format)");
    }
    Ok(())
}

/// Each query's median on both sides, their ratio, and the geometric mean of the ratios.
fn compare(
    queries: &[(&'static str, String, String)],
    ours: &[(Duration, u64)],
    duck: &[(Duration, u64)],
    runs: usize,
    events: &str,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut log_sum = 0.0;
    for (i, (name, ..)) in queries.iter().enumerate() {
        let (ours_time, ours_rows) = ours[i];
        let (duck_time, duck_rows) = duck[i];
        let ratio = ours_time.as_secs_f64() / duck_time.as_secs_f64().max(1e-6);
        log_sum += ratio.ln();
        let same = if ours_rows == duck_rows {
            ""
        } else {
            " (rows differ!)"
        };
        rows.push(Row {
            measure: format!("{name}, median of {runs} runs{same}"),
            ours: format!("{:.1} ms", ours_time.as_secs_f64() * 1000.0),
            baseline: format!("{:.1} ms", duck_time.as_secs_f64() * 1000.0),
            ratio: Some(ratio),
        });
    }
    let geomean = (log_sum / queries.len() as f64).exp();
    rows.push(Row {
        measure: format!(
            "geometric mean over {} queries, {events} events",
            queries.len()
        ),
        ours: String::new(),
        baseline: String::new(),
        ratio: Some(geomean),
    });
    rows
}

/// Times each query through the Postgres wire, as an analyst's client sends it: one session,
/// the simple query protocol, every row read.
async fn time_postgres_wire(
    addr: &str,
    queries: &[(&'static str, String, String)],
    runs: usize,
) -> anyhow::Result<Vec<(Duration, u64)>> {
    let (host, port) = addr.rsplit_once(':').context("host:port")?;
    let (client, connection) = tokio_postgres::connect(
        &format!("host={host} port={port} user=northstar dbname=northstar password={ADMIN_KEY}"),
        tokio_postgres::NoTls,
    )
    .await
    .context("connecting to the Postgres wire")?;
    let session = tokio::spawn(connection);
    eprintln!(
        "northstar: {} queries through the Postgres wire…",
        queries.len()
    );
    let mut timed = Vec::new();
    for (name, sql, _) in queries {
        let mut times = Vec::new();
        let mut rows = 0;
        for run in 0..=runs {
            let began = Instant::now();
            let answer = client
                .simple_query(sql)
                .await
                .with_context(|| format!("{name} through the Postgres wire"))?;
            let took = began.elapsed();
            rows = answer
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count() as u64;
            if run > 0 {
                times.push(took);
            }
        }
        timed.push((median(&mut times), rows));
    }
    drop(client);
    let _ = session.await;
    Ok(timed)
}

/// Waits until the table's Parquet files have not changed for five seconds (at most two
/// minutes); returns how many there are.
async fn settle(table: &Path) -> usize {
    let files = || {
        let mut names = Vec::new();
        let days = std::fs::read_dir(table).into_iter().flatten().flatten();
        for day in days {
            let found = std::fs::read_dir(day.path())
                .into_iter()
                .flatten()
                .flatten();
            names.extend(
                found
                    .map(|f| f.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".parquet")),
            );
        }
        names.sort_unstable();
        names
    };
    let began = Instant::now();
    let (mut seen, mut since) = (files(), Instant::now());
    while since.elapsed() < Duration::from_secs(5) && began.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = files();
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
    }
    seen.len()
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// Each query in DuckDB (two threads) over the server's files: its median time and its rows.
fn duckdb_suite(
    data: &Path,
    work: &Path,
    queries: &[(&str, String, String)],
    runs: usize,
) -> anyhow::Result<Vec<(Duration, u64)>> {
    super::report::ensure_duckdb().map_err(anyhow::Error::msg)?;
    let sql_path = work.join("queries.json");
    let texts: Vec<&str> = queries.iter().map(|(_, _, duck)| duck.as_str()).collect();
    std::fs::write(&sql_path, serde_json::to_vec(&texts)?)?;
    let resolved_path = work.join("events_resolved.json");
    std::fs::write(
        &resolved_path,
        serde_json::to_vec(northstar::query::tables::EVENTS_RESOLVED)?,
    )?;
    let script = format!(
        r#"
import duckdb, json, time
con = duckdb.connect()
con.execute("SET threads TO 2")
con.execute("SET enable_progress_bar = false")
con.execute("SET TimeZone = 'UTC'")
con.execute("CREATE VIEW events AS SELECT * FROM read_parquet('{events}/*/*.parquet', hive_partitioning = true)")
con.execute("CREATE VIEW identities AS SELECT * FROM read_parquet('{identities}/*.parquet')")
con.execute(json.load(open('{resolved}')))
for sql in json.load(open('{sql}')):
    times = []
    for run in range({runs} + 1):
        start = time.time()
        rows = con.sql(sql).fetchall()
        if run > 0:
            times.append(time.time() - start)
    times.sort()
    print("RESULT", times[len(times) // 2], len(rows))
"#,
        events = data.join("events").display(),
        identities = data.join(northstar::catalog::IDENTITIES.dir).display(),
        resolved = resolved_path.display(),
        sql = sql_path.display(),
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .context("running python3")?;
    if !out.status.success() {
        bail!(
            "duckdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let results: Vec<(Duration, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|line| {
            let mut parts = line.split_whitespace();
            let seconds: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
            let rows: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            (Duration::from_secs_f64(seconds), rows)
        })
        .collect();
    if results.len() != queries.len() {
        bail!(
            "duckdb answered {} of {} queries: {text}",
            results.len(),
            queries.len()
        );
    }
    Ok(results)
}
