//! `northstar bench activation`: a full activation recompute over a large synthetic history,
//! next to DuckDB running the same SQL (rendered in its dialect) on the same Parquet files.
//!
//! The history (default 200,000 users, ~10 million events, a planted threshold, anonymous
//! activity linked by identify) is written straight into `data/events/` with the archiver's own
//! formats and commit code, each day's files merged by the archiver's compaction, and the
//! identity graph into `data/identities/`: what serving the same events would have produced,
//! without spending minutes on ingest. Both engines then run
//! as their own processes (`northstar aha`, and Python's `duckdb`), with two threads each; wall
//! time and peak memory are theirs.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::report::{Row, mib, print_table, thousands};
use northstar::activation::analysis::{Dialect, Question, render};
use northstar::archive::TableFormat;
use northstar::archive::commit::{
    PartFile, PartName, ensure_partition_dir, list_parts, sort_batch, write_parquet_file,
    writer_properties,
};
use northstar::archive::compact::compact;
use northstar::archive::format::{EventsFormat, Partitions};
use northstar::config::ArchiveSettings;
use northstar::demo::Rng;
use northstar::event::{EventRecord, EventType};
use northstar::identity::IdentityGraph;

/// Options of the activation benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct ActivationBench {
    /// Users in the history.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) users: usize,
    /// Background events per user (page views and other activity) on top of the planted ones.
    #[arg(long, default_value_t = 46)]
    pub(crate) activity: usize,
    /// Write the history here and keep it (default: a temporary directory, removed after).
    #[arg(long)]
    pub(crate) keep_data: Option<std::path::PathBuf>,
}

/// Runs the benchmark and prints its table.
pub(crate) async fn run(options: ActivationBench) -> anyhow::Result<()> {
    if let Some(keep) = &options.keep_data {
        if keep.exists() {
            bail!(
                "--keep-data {}: already exists; give a new directory",
                keep.display()
            );
        }
        std::fs::create_dir_all(keep)?;
        return run_in(&options, keep).await;
    }
    let work =
        std::env::temp_dir().join(format!("northstar-bench-activation-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&options, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run_in(options: &ActivationBench, work: &Path) -> anyhow::Result<()> {
    let data = work.join("data");
    eprintln!("writing a history of {} users…", options.users);
    let (events, end_us) = write_history(&data, options)?;
    eprintln!("compacting each day's files, as a running server does…");
    let table = data.join("events");
    tokio::task::spawn_blocking(move || compact_days(&table)).await??;
    let config_path = work.join("config.json");
    let mut config: Value =
        serde_json::from_str(include_str!("../../tests/fixtures/config-template.json"))?;
    config["activation"] = json!({"schedule": "0"});
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let as_of = northstar::clock::format_micros(end_us);

    eprintln!("northstar aha (DataFusion)…");
    let started = Instant::now();
    let exe = std::env::current_exe().context("finding this northstar binary")?;
    let (ours_out, ours_rss) = run_measured(
        std::process::Command::new(&exe)
            .args(["aha", "--format", "json", "--as-of", &as_of, "--data"])
            .arg(&data)
            .arg("--config")
            .arg(&config_path),
    )
    .with_context(|| format!("running {} aha", exe.display()))?;
    let ours_time = started.elapsed();
    let ours: Value =
        serde_json::from_slice(&ours_out).context("northstar aha answered no JSON")?;
    let chosen = &ours["analysis"]["evaluation"]["chosen"];

    let config = northstar::config::Config::from_json(&config.to_string(), "bench")?;
    let question = Question::from_config(&config);
    let duck = duckdb_run(&data, work, &question, end_us).await;

    let mut rows = vec![Row {
        measure: format!(
            "full recompute, {} events, {} users: wall time of the process",
            thousands(events as f64),
            thousands(options.users as f64)
        ),
        ours: format!("{:.2} s", ours_time.as_secs_f64()),
        baseline: duck
            .as_ref()
            .map(|d| format!("{:.2} s", d.time.as_secs_f64()))
            .unwrap_or_else(|e| format!("n/a ({e})")),
        ratio: duck
            .as_ref()
            .ok()
            .map(|d| ours_time.as_secs_f64() / d.time.as_secs_f64()),
    }];
    rows.push(Row {
        measure: "of which the histogram query alone (timed inside DuckDB's process)".into(),
        ours: String::new(),
        baseline: duck
            .as_ref()
            .map(|d| format!("{:.2} s", d.query.as_secs_f64()))
            .unwrap_or_default(),
        ratio: None,
    });
    rows.push(Row {
        measure: "peak memory of the process".into(),
        ours: ours_rss.map(mib).unwrap_or_else(|| "n/a".into()),
        baseline: duck
            .as_ref()
            .ok()
            .and_then(|d| d.rss)
            .map(mib)
            .unwrap_or_default(),
        ratio: None,
    });
    rows.push(Row {
        measure: "chosen threshold (planted: at least 3 times within 7 days)".into(),
        ours: format!(
            "{} times within {} days, phi {:.3}",
            chosen["times"],
            chosen["days"],
            chosen["phi"].as_f64().unwrap_or(0.0)
        ),
        baseline: duck
            .as_ref()
            .ok()
            .map(|d| {
                format!(
                    "same histogram: {}",
                    if d.histogram_rows > 0 { "yes" } else { "no" }
                )
            })
            .unwrap_or_default(),
        ratio: None,
    });
    print_table(
        "northstar bench activation — northstar aha vs DuckDB, same SQL, same files",
        "DuckDB (same SQL)",
        &rows,
    );
    eprintln!("(ratio = northstar time / DuckDB time: lower is better; the target is ≤ 1.5×)");
    Ok(())
}

/// Runs a command, returning its stdout and its peak RSS (polled from /proc while it runs).
fn run_measured(command: &mut std::process::Command) -> anyhow::Result<(Vec<u8>, Option<u64>)> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let mut peak = None;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut out).map(|_| out)
    });
    loop {
        if let Some(rss) = super::peak_rss_bytes(pid) {
            peak = Some(rss);
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{command:?} failed: {status}");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread"))??;
    Ok((out, peak))
}

struct DuckRun {
    time: Duration,
    query: Duration,
    rss: Option<u64>,
    histogram_rows: u64,
}

/// The same histogram query in DuckDB (Python package), two threads, over the same files.
async fn duckdb_run(
    data: &Path,
    work: &Path,
    question: &Question,
    end_us: i64,
) -> Result<DuckRun, String> {
    super::report::ensure_duckdb()?;
    let cohort_end = end_us - i64::from(question.retained_days.1) * 86_400_000_000;
    let sql = render(question, cohort_end, Dialect::DuckDb);
    let sql_path = work.join("histogram.duckdb.sql");
    std::fs::write(&sql_path, &sql).map_err(|e| e.to_string())?;
    let script = format!(
        r#"
import duckdb, resource, sys, time
con = duckdb.connect()
con.execute("SET threads TO 2")
con.execute("SET enable_progress_bar = false")
con.execute("CREATE VIEW events AS SELECT * FROM read_parquet('{events}/*/*.parquet', hive_partitioning = true)")
con.execute("CREATE VIEW identities AS SELECT * FROM read_parquet('{identities}/*.parquet')")
sql = open('{sql}').read()
start = time.time()
rows = con.sql(sql).fetchall()
elapsed = time.time() - start
print("RESULT", len(rows), elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"#,
        events = data.join("events").display(),
        identities = data.join(northstar::catalog::IDENTITIES.dir).display(),
        sql = sql_path.display(),
    );
    // Timed from outside, like `northstar aha`: process start, reading the files' metadata and
    // the query; the query alone is reported too.
    let started = std::time::Instant::now();
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .map_err(|e| e.to_string())?;
    let wall = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "duckdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| format!("duckdb printed no result: {}", text.trim()))?;
    let mut parts = line.split_whitespace();
    let rows: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let seconds: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let rss: Option<u64> = parts.next().and_then(|p| p.parse().ok());
    Ok(DuckRun {
        time: wall,
        query: Duration::from_secs_f64(seconds),
        rss,
        histogram_rows: rows,
    })
}

/// Writes the synthetic history as the archiver would; returns (events written, end of data).
fn write_history(data: &Path, options: &ActivationBench) -> anyhow::Result<(u64, i64)> {
    let format = EventsFormat;
    let schema = format.schema();
    let table = data.join("events");
    std::fs::create_dir_all(&table)?;
    let day = 86_400_000_000i64;
    let start = 1_735_689_600_000_000i64; // 2025-01-01
    let spread_days = 60;
    let end = start + (spread_days + 60) * day;
    let mut rng = Rng::new(7);
    let mut graph = IdentityGraph::default();
    let mut partitions: Partitions<<EventsFormat as TableFormat>::Rows> = Partitions::new();
    let mut seq = 0u64;
    let mut written = 0u64;
    let mut commit = 0u64;
    let push = |partitions: &mut Partitions<_>,
                record: EventRecord,
                seq: &mut u64|
     -> anyhow::Result<()> {
        *seq += 1;
        format.append(*seq, &record.to_bus_json(), partitions)?;
        Ok(())
    };
    for user in 0..options.users {
        let user_id = format!("user-{user}");
        let signup = start + rng.below((spread_days * day) as u64) as i64;
        let anonymous = rng.below(5) == 0;
        let anon_id = format!("anon-{user}");
        let customer = format!("customer-{}", user / 5);
        let event = |id: String,
                     name: &str,
                     at: i64,
                     user: Option<&str>,
                     anon: Option<&str>,
                     kind: EventType| EventRecord {
            event_id: id,
            kind,
            event: Some(name.to_string()),
            user_id: user.map(str::to_string),
            anonymous_id: anon.map(str::to_string),
            customer_id: Some(customer.clone()),
            timestamp: at,
            received_at: at,
            properties: Map::new(),
            context: Map::new(),
            source: "bench".into(),
            schema_version: None,
            sample_rate: None,
        };
        push(
            &mut partitions,
            event(
                format!("{user}-s"),
                "signup_completed",
                signup,
                Some(&user_id),
                None,
                EventType::Track,
            ),
            &mut seq,
        )?;
        // North Star events in the first two weeks: activated users do at least 3 in 7 days.
        let activated = rng.below(2) == 0;
        let stars = if activated {
            3 + rng.below(5)
        } else {
            rng.below(3)
        };
        for k in 0..stars {
            let at = signup + rng.below((if activated { 7 } else { 14 }) * day as u64) as i64;
            let by_anonymous = anonymous && k == 0;
            let (u, a) = if by_anonymous {
                (None, Some(anon_id.as_str()))
            } else {
                (Some(user_id.as_str()), None)
            };
            push(
                &mut partitions,
                event(
                    format!("{user}-n{k}"),
                    "core_action_completed",
                    at,
                    u,
                    a,
                    EventType::Track,
                ),
                &mut seq,
            )?;
        }
        if anonymous {
            push(
                &mut partitions,
                event(
                    format!("{user}-i"),
                    "identify",
                    signup + day,
                    Some(&user_id),
                    Some(&anon_id),
                    EventType::Identify,
                ),
                &mut seq,
            )?;
            graph.identify(&anon_id, &user_id, seq, signup + day);
        }
        // Retention: activated users mostly come back in days 28–56, others rarely.
        let retained = rng.below(100) < if activated { 80 } else { 15 };
        for k in 0..options.activity {
            let last_day = if retained { 56 } else { 27 };
            let at = signup + rng.below((last_day * day) as u64) as i64;
            push(
                &mut partitions,
                event(
                    format!("{user}-a{k}"),
                    "page_viewed",
                    at,
                    Some(&user_id),
                    None,
                    EventType::Page,
                ),
                &mut seq,
            )?;
        }
        if seq - commit >= 500_000 {
            written += flush(&format, &schema, &table, &mut partitions, commit + 1, seq)?;
            commit = seq;
        }
    }
    written += flush(&format, &schema, &table, &mut partitions, commit + 1, seq)?;
    northstar::identity::save_graph(data, graph).map_err(anyhow::Error::msg)?;
    Ok((written, end))
}

/// Merges each day's commit files into one with the archiver's compaction: the files a server
/// that archived this history would hold once its compaction caught up.
fn compact_days(table: &Path) -> anyhow::Result<()> {
    let format = EventsFormat;
    let schema = format.schema();
    let settings = ArchiveSettings::default();
    let parts = list_parts(table)?;
    let mut dates: Vec<&str> = parts.iter().map(|p| p.date.as_str()).collect();
    dates.dedup();
    for date in dates {
        let of_date: Vec<PartFile> = parts.iter().filter(|p| p.date == date).cloned().collect();
        if of_date.len() < 2 {
            continue;
        }
        let properties = writer_properties(
            &schema,
            format.sort_columns(),
            settings.zstd_level,
            settings.row_group_rows,
        );
        let partition = ensure_partition_dir(table, date)?;
        compact(
            &partition,
            &of_date,
            &schema,
            format.sort_columns(),
            properties,
        )?;
    }
    Ok(())
}

/// Writes the buffered partitions as one commit's files.
fn flush(
    format: &EventsFormat,
    schema: &arrow::datatypes::SchemaRef,
    table: &Path,
    partitions: &mut Partitions<<EventsFormat as TableFormat>::Rows>,
    first: u64,
    last: u64,
) -> anyhow::Result<u64> {
    let mut rows = 0u64;
    let name = PartName {
        first_seq: first,
        last_seq: last,
        compacted: false,
    };
    for (day, mut buffered) in std::mem::take(partitions) {
        let batch = format.finish(&mut buffered)?;
        let batch = sort_batch(&batch, format.sort_columns())?;
        rows += batch.num_rows() as u64;
        let dir = ensure_partition_dir(
            table,
            &northstar::event::partition_date(day * 86_400_000_000),
        )?;
        let settings = ArchiveSettings::default();
        let properties = writer_properties(
            schema,
            format.sort_columns(),
            settings.zstd_level,
            settings.row_group_rows,
        );
        write_parquet_file(&dir.join(name.file_name()), schema, [&batch], properties)?;
    }
    Ok(rows)
}
