//! `northstar bench ingest`: end-to-end ingest against raw JetStream, same server, same run.
//!
//! Baseline: one async-nats client publishes the very payloads northstar would publish (with
//! `Nats-Msg-Id`, acks awaited in windows below the in-flight limit) while a durable pull
//! consumer reads them back, acking every 1,000 — the fastest way to move these bytes through
//! JetStream and out again without doing anything with them.
//!
//! northstar: a real `northstar serve` child process against the same nats-server; concurrent
//! keep-alive clients post Segment batches to `/v1/batch`. "Acked" is when the last request was
//! answered (every event acked by JetStream); "landed" is when the archive manifest counts
//! every event as committed to Parquet.
//!
//! Freshness under that load: a probe posts one metered event at a time for a customer of its
//! own and times ack → visible in the limits API (its entitlement's `used`), and, for every
//! fifth, ack → visible to `POST /v1/sql`; it also scrapes each reader's lag from `/metrics`.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::report::{Row, mib, print_table, thousands};
use northstar::archive::ArchiveManifest;
use northstar::bus::EmbeddedNats;
use northstar::client::{HttpClient, basic_auth};
use northstar::ingest::segment;

pub(super) const WRITE_KEY: &str = "bench-write-key-0001";
pub(super) const ADMIN_KEY: &str = "bench-admin-key-0001";

/// Options of the ingest benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct IngestBench {
    /// Events to send.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) events: usize,
    /// Concurrent HTTP clients (keep-alive connections).
    #[arg(long, default_value_t = 8)]
    pub(crate) clients: usize,
    /// Messages per `/v1/batch` request.
    #[arg(long, default_value_t = 500)]
    pub(crate) batch: usize,
    /// Use this NATS server instead of starting one.
    #[arg(long, env = "NORTHSTAR_NATS_URL")]
    pub(crate) nats_url: Option<String>,
}

/// Runs the benchmark and prints its table.
pub(crate) async fn run(options: IngestBench) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("northstar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&options, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run_in(options: &IngestBench, work: &Path) -> anyhow::Result<()> {
    let embedded = match &options.nats_url {
        Some(_) => None,
        None => Some(EmbeddedNats::start(&work.join("jetstream"), None).await?),
    };
    let nats_url = options
        .nats_url
        .clone()
        .or_else(|| embedded.as_ref().map(|e| e.url().to_string()))
        .context("no NATS url")?;
    eprintln!("generating {} events…", options.events);
    let messages = messages(options.events);
    let payloads = bus_payloads(&messages)?;
    let mean_bytes = payloads.iter().map(|(_, p)| p.len()).sum::<usize>() / payloads.len().max(1);

    eprintln!("validation cost: normalise + registry, one thread…");
    let validation = validation_cost(&messages)?;

    eprintln!("baseline: raw JetStream publish + consume…");
    let raw = raw_jetstream(&nats_url, &payloads).await?;
    drop(payloads);

    eprintln!(
        "northstar: {} clients × batches of {}…",
        options.clients, options.batch
    );
    let ours = northstar_ingest(options, &nats_url, work, messages).await?;

    let n = options.events as f64;
    let per_event =
        |d: Duration, count: usize| format!("{:.2} µs", d.as_secs_f64() * 1e6 / count as f64);
    let rows = vec![
        Row {
            measure: "validation: normalise + registry, one thread (events/s)".into(),
            ours: format!(
                "{} ({})",
                thousands(validation.count as f64 / validation.with_registry.as_secs_f64()),
                per_event(validation.with_registry, validation.count)
            ),
            baseline: format!(
                "{} ({}) without the registry",
                thousands(validation.count as f64 / validation.without.as_secs_f64()),
                per_event(validation.without, validation.count)
            ),
            ratio: Some(validation.without.as_secs_f64() / validation.with_registry.as_secs_f64()),
        },
        Row {
            measure: "publish, acked (events/s)".into(),
            ours: thousands(n / ours.acked.as_secs_f64()),
            baseline: thousands(n / raw.published.as_secs_f64()),
            ratio: Some(raw.published.as_secs_f64() / ours.acked.as_secs_f64()),
        },
        Row {
            measure: "end to end: landed / consumed (events/s)".into(),
            ours: thousands(n / ours.landed.as_secs_f64()),
            baseline: thousands(n / raw.consumed.as_secs_f64()),
            ratio: Some(raw.consumed.as_secs_f64() / ours.landed.as_secs_f64()),
        },
        Row {
            measure: "archive alone: stream backlog → Parquet / consume only (events/s)".into(),
            ours: thousands(n / ours.rebuilt.as_secs_f64()),
            baseline: thousands(n / raw.consume_only.as_secs_f64()),
            ratio: Some(raw.consume_only.as_secs_f64() / ours.rebuilt.as_secs_f64()),
        },
        Row {
            measure: "wall time to land all events".into(),
            ours: format!("{:.2} s", ours.landed.as_secs_f64()),
            baseline: format!("{:.2} s", raw.consumed.as_secs_f64()),
            ratio: None,
        },
        Row {
            measure: "archiver: commits, time spent committing, feed gaps".into(),
            ours: format!(
                "{:.0} commits, {:.2} s, {:.0} gaps",
                ours.commits, ours.commit_seconds, ours.feed_gaps
            ),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: "under that load: ack → visible in the limits API, p50 / p99 / max".into(),
            ours: percentiles(&ours.freshness.check),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: "under that load: ack → visible to SQL, p50 / p99 / max".into(),
            ours: percentiles(&ours.freshness.sql),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: "under that load: largest lag seen, followers / archive (events)".into(),
            ours: format!(
                "{} / {}",
                thousands(ours.freshness.max_followers_lag),
                thousands(ours.freshness.max_archive_lag)
            ),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: "peak RSS of the server process".into(),
            ours: ours.peak_rss.map(mib).unwrap_or_else(|| "n/a".into()),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: "Parquet bytes per event (zstd)".into(),
            ours: format!("{:.1}", ours.parquet_bytes as f64 / n),
            baseline: format!("{mean_bytes} (JSON on the stream)"),
            ratio: None,
        },
    ];
    print_table(
        &format!(
            "northstar bench ingest — {} events, {} clients, batches of {}",
            thousands(n),
            options.clients,
            options.batch
        ),
        "raw JetStream",
        &rows,
    );
    if let Some(mut embedded) = embedded {
        embedded.stop().await;
    }
    Ok(())
}

/// Segment track messages like an API product sends: ~1,000 customers, 10,000 users.
fn messages(count: usize) -> Vec<Value> {
    let mut rng = northstar::demo::Rng::new(42);
    let start = northstar::clock::system_micros() - 3_600_000_000;
    (0..count)
        .map(|i| {
            let user = rng.below(10_000);
            let at = northstar::clock::format_micros(start + (i as i64) * 3);
            json!({
                "type": "track",
                "messageId": format!("bench-{i}"),
                "userId": format!("user-{user}"),
                "event": "api_call_made",
                "timestamp": at,
                "context": {"groupId": format!("customer-{}", user % 1_000), "library": {"name": "bench"}},
                "properties": {"endpoint": "/v1/search", "latency_ms": rng.below(300), "status": 200}
            })
        })
        .collect()
}

/// The bytes northstar publishes for each message, and their ids.
fn bus_payloads(messages: &[Value]) -> anyhow::Result<Vec<(String, Bytes)>> {
    messages
        .iter()
        .map(|message| {
            let map = message
                .as_object()
                .cloned()
                .context("message is an object")?;
            let record = segment::normalize(
                map,
                None,
                segment::Inherited::default(),
                "bench",
                northstar::clock::system_micros(),
            )
            .map_err(|r| anyhow::anyhow!("bench message rejected: {} {}", r.field, r.message))?;
            Ok((record.event_id.clone(), Bytes::from(record.to_bus_json())))
        })
        .collect()
}

/// Time to normalise (and validate) the same messages with and without a registry.
struct ValidationCost {
    count: usize,
    without: Duration,
    with_registry: Duration,
}

/// The ingest path's per-event CPU cost with the registry (the seed's property lists plus a
/// JSON Schema for the benchmark's event) and without one, on one thread.
fn validation_cost(messages: &[Value]) -> anyhow::Result<ValidationCost> {
    let count = messages.len().min(200_000);
    let mut config: Value =
        serde_json::from_str(include_str!("../../tests/fixtures/config-template.json"))?;
    config["events"][1]["properties"] = json!({
        "type": "object",
        "properties": {"endpoint": {"type": "string"}, "latency_ms": {"type": "integer", "minimum": 0}, "status": {"type": "integer"}}
    });
    let config = northstar::config::Config::from_json(&config.to_string(), "bench")?;
    let registry = northstar::schema::Registry::load(&config, None)?;
    let run = |validate: bool| {
        let started = Instant::now();
        let mut kept = 0usize;
        for message in &messages[..count] {
            let Some(map) = message.as_object().cloned() else {
                continue;
            };
            let Ok(mut record) =
                segment::normalize(map, None, segment::Inherited::default(), "bench", 0)
            else {
                continue;
            };
            if validate && let Some(name) = record.event.clone() {
                let decision = registry.decide(
                    &name,
                    &record.event_id,
                    &record.properties,
                    &mut record.context,
                );
                kept += usize::from(matches!(
                    decision,
                    northstar::schema::Decision::Accept { .. }
                ));
            }
            kept += record.to_bus_json().len() & 1;
        }
        std::hint::black_box(kept);
        started.elapsed()
    };
    let without = run(false);
    let with_registry = run(true);
    Ok(ValidationCost {
        count,
        without,
        with_registry,
    })
}

struct RawTimes {
    published: Duration,
    consumed: Duration,
    consume_only: Duration,
}

async fn raw_jetstream(url: &str, payloads: &[(String, Bytes)]) -> anyhow::Result<RawTimes> {
    let client = northstar::bus::connect_ready(url, Duration::from_secs(10)).await?;
    let js = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(65_536)
        .backpressure_on_inflight(true)
        .build(client);
    let name = format!("RAWBENCH_{}", std::process::id());
    let subject = format!("rawbench.{}", std::process::id());
    let _ = js.delete_stream(&name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject}.>")],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(86_400),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("create baseline stream: {e}"))?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("rawbench".into()),
            ack_policy: consumer::AckPolicy::All,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("create baseline consumer: {e}"))?;
    let total = payloads.len();
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(2_000)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("consume: {e}"))?;
        let mut seen = 0;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("consume: {e}"))?;
            seen += 1;
            if seen % 1_000 == 0 || seen == total {
                message
                    .ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            }
            if seen == total {
                break;
            }
        }
        Ok::<Duration, anyhow::Error>(started.elapsed())
    });
    for window in payloads.chunks(4_000) {
        let mut acks = Vec::with_capacity(window.len());
        for (id, payload) in window {
            let publish = PublishMessage::build()
                .payload(payload.clone())
                .message_id(id.as_str());
            acks.push(
                js.send_publish(format!("{subject}.track"), publish)
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?,
            );
        }
        for ack in acks {
            ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
        }
    }
    let published = started.elapsed();
    let consumed = reader.await??;
    // Consume only: a second consumer reads the whole stream as a backlog.
    let backlog = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("rawbench-backlog".into()),
            ack_policy: consumer::AckPolicy::All,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("create baseline consumer: {e}"))?;
    let started = Instant::now();
    let mut messages = backlog
        .stream()
        .max_messages_per_batch(2_000)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("consume: {e}"))?;
    let mut seen = 0;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("consume: {e}"))?;
        seen += 1;
        if seen % 1_000 == 0 || seen == total {
            message
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        }
        if seen == total {
            break;
        }
    }
    let consume_only = started.elapsed();
    let _ = js.delete_stream(&name).await;
    Ok(RawTimes {
        published,
        consumed,
        consume_only,
    })
}

struct OurTimes {
    freshness: Freshness,
    acked: Duration,
    landed: Duration,
    rebuilt: Duration,
    peak_rss: Option<u64>,
    parquet_bytes: u64,
    commit_seconds: f64,
    commits: f64,
    /// Times the followers' feed dropped messages and the archiver read them itself.
    feed_gaps: f64,
}

/// A sample's value from Prometheus text.
pub(super) fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A `northstar serve` child process of the benchmark.
pub(super) struct ServerChild {
    child: tokio::process::Child,
    pub(super) pid: u32,
    pub(super) base: String,
    /// `host:port` of its Postgres wire, when the config turns it on.
    pub(super) pg: Option<String>,
}

impl ServerChild {
    pub(super) async fn spawn(
        config_path: &Path,
        data: &Path,
        nats_url: &str,
    ) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--config")
            .arg(config_path)
            .arg("--data")
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--nats-url", nats_url])
            .env("RUST_LOG", "warn")
            .env("NORTHSTAR_ADMIN_KEY", ADMIN_KEY)
            .env_remove("NORTHSTAR_ANALYST_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting northstar serve")?;
        let pid = child.id().context("child pid")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut pg = None;
        let base = loop {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .context("northstar did not start within 60 s")??
                .context("northstar exited before listening")?;
            // Printed before the HTTP line when the Postgres wire is on.
            if let Some(rest) = line.strip_prefix("Postgres wire on ") {
                pg = rest.split(": ").next().map(str::to_string);
            }
            if let Some(url) = line.strip_prefix("northstar listening on ") {
                break url.to_string();
            }
        };
        Ok(Self {
            child,
            pid,
            base,
            pg,
        })
    }

    /// SIGTERM (the graceful path) and wait.
    pub(super) async fn stop(mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// Waits until the events manifest counts `total` rows; returns the time since `started`.
pub(super) async fn wait_landed(
    events_dir: &Path,
    total: u64,
    started: Instant,
) -> anyhow::Result<Duration> {
    loop {
        if ArchiveManifest::load(events_dir)
            .map(|m| m.rows)
            .unwrap_or(0)
            >= total
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("events did not land in Parquet within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn northstar_ingest(
    options: &IngestBench,
    nats_url: &str,
    work: &Path,
    messages: Vec<Value>,
) -> anyhow::Result<OurTimes> {
    let data = work.join("data");
    let config_path = work.join("bench-config.json");
    let pid = std::process::id();
    // The seed's config as it stands (api_call_made is metered), plus a source and streams of
    // this run's own.
    let mut config: Value =
        serde_json::from_str(include_str!("../../tests/fixtures/config-template.json"))?;
    config["sources"] = json!([{"name": "bench", "writeKeys": [WRITE_KEY]}]);
    config["stream"] = json!({"name": format!("BENCH_EVENTS_{pid}"), "rejectedName": format!("BENCH_REJECTED_{pid}")});
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let server = ServerChild::spawn(&config_path, &data, nats_url).await?;
    let base = server.base.clone();

    let bodies: Vec<Vec<u8>> = messages
        .chunks(options.batch.max(1))
        .map(|chunk| serde_json::to_vec(&json!({"batch": chunk})).unwrap_or_default())
        .collect();
    drop(messages);
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let client = HttpClient::new();
    let auth = basic_auth(WRITE_KEY);
    let url = format!("{base}/v1/batch");
    let started = Instant::now();
    let loaded = Arc::new(AtomicBool::new(true));
    let probe = tokio::spawn(probe_freshness(
        client.clone(),
        base.clone(),
        loaded.clone(),
    ));
    let mut workers = Vec::new();
    for _ in 0..options.clients.max(1) {
        let (bodies, next, client, auth, url) = (
            bodies.clone(),
            next.clone(),
            client.clone(),
            auth.clone(),
            url.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else {
                    return Ok(());
                };
                loop {
                    let headers = [
                        ("authorization", auth.as_str()),
                        ("content-type", "application/json"),
                    ];
                    let response = client
                        .send(http::Method::POST, &url, &headers, body.clone())
                        .await?;
                    match response.status {
                        200 => break,
                        503 | 429 => tokio::time::sleep(Duration::from_millis(50)).await,
                        status => bail!("batch answered {status}: {}", response.text()),
                    }
                }
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let acked = started.elapsed();
    loaded.store(false, Ordering::Relaxed);
    let freshness = probe.await??;
    let total = options.events as u64 + freshness.probes;
    let events_dir = data.join("events");
    let landed = wait_landed(&events_dir, total, started).await?;
    let peak_rss = super::peak_rss_bytes(server.pid);
    let metrics = client
        .get(&format!("{base}/metrics"), &[])
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    let feed_gaps = metric_value(
        &metrics,
        "northstar_archive_feed_gaps_total{table=\"events\"}",
    );
    let commit_seconds = metric_value(
        &metrics,
        "northstar_archive_commit_seconds_total{table=\"events\"}",
    );
    let commits = metric_value(
        &metrics,
        "northstar_archive_commits_total{table=\"events\"}",
    );
    let parquet_bytes = parquet_size(&events_dir);
    // Every event is metered (api_call_made): meter = SQL over events = usage windows?
    let bearer = format!("Bearer {ADMIN_KEY}");
    let verify = client
        .send(
            http::Method::POST,
            &format!("{base}/v1/usage/verify"),
            &[("authorization", &bearer)],
            Vec::new(),
        )
        .await
        .map(|r| r.json())
        .unwrap_or_default();
    eprintln!(
        "usage verify after {} events: ok={} compared={} meter={} events={} usage={} at seq {}",
        options.events,
        verify["ok"],
        verify["compared"],
        verify["meter_total"],
        verify["events_total"],
        verify["usage_total"],
        verify["seq"]
    );
    server.stop().await;

    // The archiver alone: the same stream archived again from scratch, as after losing data/.
    std::fs::remove_dir_all(&events_dir)?;
    let started = Instant::now();
    let server = ServerChild::spawn(&config_path, &data, nats_url).await?;
    let rebuilt = wait_landed(&events_dir, total, started).await?;
    server.stop().await;
    Ok(OurTimes {
        freshness,
        acked,
        landed,
        rebuilt,
        peak_rss,
        parquet_bytes,
        commit_seconds,
        commits,
        feed_gaps,
    })
}

/// What the probe saw while the load ran.
struct Freshness {
    /// Probe events sent (they land too).
    probes: u64,
    /// Ack → visible in the entitlement, per probe.
    check: Vec<Duration>,
    /// Ack → visible to SQL, per fifth probe.
    sql: Vec<Duration>,
    /// Largest lag seen per reader, in events.
    max_followers_lag: f64,
    max_archive_lag: f64,
}

/// Posts one metered event at a time for customer `probe` while `loaded`, and times how long
/// each takes to show in the limits API and (every fifth) in SQL.
async fn probe_freshness(
    client: HttpClient,
    base: String,
    loaded: Arc<AtomicBool>,
) -> anyhow::Result<Freshness> {
    let auth = basic_auth(WRITE_KEY);
    let bearer = format!("Bearer {ADMIN_KEY}");
    let mut seen = Freshness {
        probes: 0,
        check: Vec::new(),
        sql: Vec::new(),
        max_followers_lag: 0.0,
        max_archive_lag: 0.0,
    };
    while loaded.load(Ordering::Relaxed) {
        let n = seen.probes + 1;
        let body = json!({"batch": [{"type": "track", "messageId": format!("probe-{n}"), "userId": "probe-user",
            "event": "api_call_made", "context": {"groupId": "probe"}, "properties": {"endpoint": "/probe"}}]});
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let answer = client
            .send(
                http::Method::POST,
                &format!("{base}/v1/batch"),
                &headers,
                serde_json::to_vec(&body)?,
            )
            .await?;
        if answer.status != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let acked = Instant::now();
        seen.probes = n;
        let entitlement = format!("{base}/v1/customers/probe/entitlements/api_requests");
        loop {
            let used = client
                .get(&entitlement, &[("authorization", &bearer)])
                .await
                .map(|r| r.json()["used"].as_f64().unwrap_or(0.0))
                .unwrap_or(0.0);
            if used >= n as f64 {
                seen.check.push(acked.elapsed());
                break;
            }
            if acked.elapsed() > Duration::from_secs(120) {
                bail!("probe {n} not visible in the limits API within 2 minutes");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        if n.is_multiple_of(5) {
            let sql =
                json!({"sql": "SELECT count(*) AS n FROM events WHERE customer_id = 'probe'"});
            loop {
                let rows = client
                    .send(
                        http::Method::POST,
                        &format!("{base}/v1/sql"),
                        &[
                            ("authorization", bearer.as_str()),
                            ("content-type", "application/json"),
                        ],
                        serde_json::to_vec(&sql)?,
                    )
                    .await
                    .map(|r| r.json()["rows"][0]["n"].as_u64().unwrap_or(0))
                    .unwrap_or(0);
                if rows >= n {
                    seen.sql.push(acked.elapsed());
                    break;
                }
                if acked.elapsed() > Duration::from_secs(120) {
                    bail!("probe {n} not visible to SQL within 2 minutes");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if let Ok(metrics) = client.get(&format!("{base}/metrics"), &[]).await {
            let text = metrics.text();
            seen.max_followers_lag = seen.max_followers_lag.max(metric_value(
                &text,
                "northstar_consumer_lag{reader=\"followers\"}",
            ));
            seen.max_archive_lag = seen.max_archive_lag.max(metric_value(
                &text,
                "northstar_consumer_lag{reader=\"archive\"}",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(seen)
}

/// "p50 / p99 / max" of durations, in milliseconds. Below 100 samples a p99 is only the
/// largest one: it is printed as "-" and the max stands alone.
fn percentiles(times: &[Duration]) -> String {
    if times.is_empty() {
        return "n/a".into();
    }
    if times.len() < 100 {
        let mut sorted = times.to_vec();
        sorted.sort();
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        return format!(
            "{:.1} / - / {:.1} ms ({} probes: too few for a p99)",
            ms(&sorted[(sorted.len() - 1) / 2]),
            ms(&sorted[sorted.len() - 1]),
            sorted.len()
        );
    }
    let mut sorted = times.to_vec();
    sorted.sort();
    let at = |q: f64| {
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted[index.min(sorted.len() - 1)].as_secs_f64() * 1e3
    };
    format!(
        "{:.1} / {:.1} / {:.1} ms ({} probes)",
        at(0.5),
        at(0.99),
        at(1.0),
        sorted.len()
    )
}

fn parquet_size(dir: &Path) -> u64 {
    northstar::archive::commit::list_parts(dir)
        .map(|parts| parts.iter().map(|p| p.bytes).sum())
        .unwrap_or(0)
}
