//! `northstar bench limits`: `/v1/check` latency and throughput next to a bare hyper server
//! answering a fixed JSON, measured in the same run with the same load generator; freshness
//! (ingest ack → visible in a check); and the memory of a million counters.

use std::convert::Infallible;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use rust_decimal::Decimal;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::report::{Row, mib, print_table, thousands};
use northstar::bus::EmbeddedNats;
use northstar::client::{HttpClient, basic_auth};
use northstar::config::Aggregation;
use northstar::meter::state::Counters;
use northstar::schema::quantity::Contribution;

const WRITE_KEY: &str = "bench-write-key-0001";
const SERVICE_KEY: &str = "bench-service-key-0001";

/// Options of the limits benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct LimitsBench {
    /// Concurrent keep-alive clients of the throughput run.
    #[arg(long, default_value_t = 32)]
    pub(crate) clients: usize,
    /// Keep-alive connections of the fixed-rate latency run (a service's connection pool).
    #[arg(long, default_value_t = 8)]
    pub(crate) latency_clients: usize,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 5)]
    pub(crate) seconds: u64,
    /// Rate of the fixed-rate latency run (checks/s).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) rate: u64,
    /// Counters of the memory measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) counters: usize,
    /// People of the memory measurement (onboarding facts, one event each).
    #[arg(long, default_value_t = 200_000)]
    pub(crate) people: usize,
    /// `groupBy` values of the memory measurement (one counter's breakdown).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) group_values: usize,
    /// Ids of the identity graph's memory measurement (an anonymous id identified as a new
    /// user each pair).
    #[arg(long, default_value_t = 200_000)]
    pub(crate) identity_ids: usize,
    /// Distinct values of the `unique_count` memory measurement (spread over 100 counters).
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) unique_values: usize,
}

/// Runs the benchmark and prints its table.
pub(crate) async fn run(options: LimitsBench) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("northstar-bench-limits-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&options, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Checks per request in the batch throughput run.
const BATCH_CHECKS: usize = 100;

async fn run_in(options: &LimitsBench, work: &Path) -> anyhow::Result<()> {
    eprintln!(
        "memory: {} counters, {} people, {} group values…",
        options.counters, options.people, options.group_values
    );
    let per_counter = counter_memory(options.counters);
    let per_person = person_memory(options.people);
    let per_group_value = group_value_memory(options.group_values);
    let per_identity_id = identity_memory(options.identity_ids);
    let per_unique_value = unique_value_memory(options.unique_values);

    let mut nats = EmbeddedNats::start(&work.join("jetstream"), None).await?;
    let (mut child, base) = spawn_server(work, nats.url()).await?;
    let (mut bare_child, bare) = spawn_child(&["bench", "bare-server"]).await?;
    let body = |i: usize| {
        serde_json::to_vec(
            &json!({"customer_id": format!("customer-{}", i % 1000), "feature": "api_requests"}),
        )
        .unwrap_or_default()
    };

    eprintln!("throughput: northstar /v1/check, then the bare server…");
    let ours = closed_loop(&format!("{base}/v1/check"), options, &body).await?;
    let baseline = closed_loop(&format!("{bare}/"), options, &body).await?;
    eprintln!("throughput: /v1/check/batch of {BATCH_CHECKS}…");
    let batch_body = |i: usize| {
        let checks: Vec<_> = (0..BATCH_CHECKS)
            .map(|j| json!({"customer_id": format!("customer-{}", (i * BATCH_CHECKS + j) % 1000), "feature": "api_requests"}))
            .collect();
        serde_json::to_vec(&json!({ "checks": checks })).unwrap_or_default()
    };
    let batched = closed_loop(&format!("{base}/v1/check/batch"), options, &batch_body).await?;
    eprintln!("latency at {} checks/s…", options.rate);
    let ours_fixed = open_loop(&format!("{base}/v1/check"), options, &body).await?;
    let bare_fixed = open_loop(&format!("{bare}/"), options, &body).await?;
    eprintln!("freshness: ingest ack → visible in /v1/check…");
    let freshness = freshness(&base, 300).await?;
    let server_rss = super::peak_rss_bytes(child.id().unwrap_or(0));
    let _ = child.kill().await;
    let _ = bare_child.kill().await;
    nats.stop().await;

    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1000.0);
    let rows = vec![
        Row {
            measure: format!("throughput, {} clients (requests/s)", options.clients),
            ours: thousands(ours.rate),
            baseline: thousands(baseline.rate),
            ratio: Some(ours.rate / baseline.rate),
        },
        Row {
            measure: format!(
                "checks/s through /v1/check/batch of {BATCH_CHECKS}, {} clients (single checks above)",
                options.clients
            ),
            ours: thousands(batched.rate * BATCH_CHECKS as f64),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: format!(
                "latency p50 at {} req/s, {} connections",
                thousands(options.rate as f64),
                options.latency_clients
            ),
            ours: ms(ours_fixed.p50),
            baseline: ms(bare_fixed.p50),
            ratio: None,
        },
        Row {
            measure: format!(
                "latency p99 at {} req/s, {} connections",
                thousands(options.rate as f64),
                options.latency_clients
            ),
            ours: ms(ours_fixed.p99),
            baseline: ms(bare_fixed.p99),
            ratio: None,
        },
        Row {
            measure: format!(
                "latency p999 at {} req/s, {} connections",
                thousands(options.rate as f64),
                options.latency_clients
            ),
            ours: ms(ours_fixed.p999),
            baseline: ms(bare_fixed.p999),
            ratio: None,
        },
        Row {
            measure: "rate achieved in the fixed-rate run (req/s)".into(),
            ours: thousands(ours_fixed.achieved),
            baseline: thousands(bare_fixed.achieved),
            ratio: None,
        },
        Row {
            measure: "freshness: ingest ack → visible in check, p50 / p99".into(),
            ours: format!("{} / {}", ms(freshness.p50), ms(freshness.p99)),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: format!(
                "memory per counter ({} customer-feature counters)",
                thousands(options.counters as f64)
            ),
            ours: format!("{per_counter:.0} bytes"),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: format!(
                "memory per person (onboarding facts, {} people of one event)",
                thousands(options.people as f64)
            ),
            ours: format!("{per_person:.0} bytes"),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: format!(
                "memory per groupBy value ({} values of one counter)",
                thousands(options.group_values as f64)
            ),
            ours: format!("{per_group_value:.0} bytes"),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: format!(
                "memory per identity id ({} ids, an anonymous id and a user id per person)",
                thousands(options.identity_ids as f64)
            ),
            ours: format!("{per_identity_id:.0} bytes"),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: format!(
                "memory per unique_count value ({} values over 100 counters)",
                thousands(options.unique_values as f64)
            ),
            ours: format!("{per_unique_value:.0} bytes"),
            baseline: String::new(),
            ratio: None,
        },
        Row {
            measure: "peak RSS of the server process".into(),
            ours: server_rss.map(mib).unwrap_or_else(|| "n/a".into()),
            baseline: String::new(),
            ratio: None,
        },
    ];
    print_table(
        "northstar bench limits — POST /v1/check over loopback",
        "bare hyper, fixed JSON",
        &rows,
    );
    Ok(())
}

/// Live heap bytes `build` leaves allocated, per one of the `n` entries it makes (what it
/// returns is kept alive until measured). Falls back to peak RSS where the allocator cannot
/// tell.
fn bytes_per<T>(n: usize, build: impl FnOnce() -> T) -> f64 {
    let live = || northstar::heap::usage().map(|heap| heap.in_use);
    let pid = std::process::id();
    let (before, peak_before) = (live(), super::peak_rss_bytes(pid).unwrap_or(0));
    let built = build();
    let grown = match (before, live()) {
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => super::peak_rss_bytes(pid)
            .unwrap_or(0)
            .saturating_sub(peak_before),
    };
    drop(built);
    grown as f64 / n.max(1) as f64
}

/// Memory per counter when `n` customers each get one counter, through the meter's own data
/// structure and apply path.
fn counter_memory(n: usize) -> f64 {
    bytes_per(n, || {
        let counters = Counters::default();
        for i in 0..n {
            let customer = format!("customer-{i:07}");
            let mut shard = counters.lock(&customer);
            shard.apply(
                &customer,
                0,
                Aggregation::Sum,
                0,
                &Contribution::Amount(Decimal::ONE),
                None,
                0,
                "",
            );
        }
        counters
    })
}

/// Memory per person the onboarding engine follows, each with one event.
fn person_memory(n: usize) -> f64 {
    let dir = std::env::temp_dir().join(format!("northstar-bench-people-{}", std::process::id()));
    let mut config = northstar::config::Config::default();
    config.onboarding.max_people = n as u64;
    let per = bytes_per(n, || {
        let engine = northstar::onboarding::Onboarding::new(
            &config,
            northstar::activation::store::ActivationStore::open(&dir),
            Box::new(|_| "free".to_string()),
        );
        for i in 0..n {
            let message = northstar::event::EventRecord {
                event_id: format!("e{i}"),
                kind: northstar::event::EventType::Track,
                event: Some("api_call_made".into()),
                user_id: Some(format!("user-{i:07}")),
                anonymous_id: None,
                customer_id: Some(format!("customer-{:04}", i % 1000)),
                timestamp: 1_700_000_000_000_000,
                received_at: 1_700_000_000_000_000,
                properties: serde_json::Map::new(),
                context: serde_json::Map::new(),
                source: "bench".into(),
                schema_version: None,
                sample_rate: None,
            }
            .to_bus_json();
            if let Ok(event) = northstar::event::EventView::decode(&message) {
                engine.apply_event(i as u64 + 1, &event);
            }
        }
        engine
    });
    let _ = std::fs::remove_dir_all(&dir);
    per
}

/// Memory per id of the identity graph: each person an anonymous id identified as a user.
fn identity_memory(n: usize) -> f64 {
    bytes_per(n, || {
        let mut graph = northstar::identity::IdentityGraph::default();
        for i in 0..n / 2 {
            let user = format!("user-{i:07}");
            graph.observe_user(&user);
            graph.identify(&format!("anon-{i:07}"), &user, i as u64, 0);
        }
        graph
    })
}

/// Memory per `groupBy` value of one counter's breakdown.
fn group_value_memory(n: usize) -> f64 {
    bytes_per(n, || {
        let counters = Counters::default();
        let mut shard = counters.lock("customer");
        for i in 0..n {
            let value = format!("region-{i:07}");
            shard.apply(
                "customer",
                0,
                Aggregation::Sum,
                0,
                &Contribution::Amount(Decimal::ONE),
                Some(&value),
                0,
                "",
            );
        }
        drop(shard);
        counters
    })
}

/// Memory per distinct value of `unique_count` counters: `n` values over 100 customers.
fn unique_value_memory(n: usize) -> f64 {
    bytes_per(n, || {
        let counters = Counters::default();
        for i in 0..n {
            let customer = format!("customer-{:03}", i % 100);
            let mut shard = counters.lock(&customer);
            shard.apply(
                &customer,
                0,
                Aggregation::UniqueCount,
                0,
                &Contribution::Distinct(format!("user-{i:08}")),
                None,
                0,
                "",
            );
        }
        counters
    })
}

async fn spawn_server(
    work: &Path,
    nats_url: &str,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let config_path = work.join("bench-config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/config-template.json"))?;
    config["sources"] = json!([{"name": "bench", "writeKeys": [WRITE_KEY]}]);
    config["serviceKeys"] = json!([SERVICE_KEY]);
    config["usageFeatures"][0]["limits"] = json!({"free": 1_000_000_000u64, "pro": 50000});
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let data = work.join("data");
    let args = [
        "serve",
        "--config",
        &config_path.to_string_lossy(),
        "--data",
        &data.to_string_lossy(),
        "--listen",
        "127.0.0.1:0",
        "--nats-url",
        nats_url,
    ];
    spawn_child(&args).await
}

/// Starts this binary with `args` and waits for its `northstar listening on` line.
async fn spawn_child(args: &[&str]) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting northstar serve")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("northstar did not start")??
            .context("northstar exited")?;
        if let Some(url) = line.strip_prefix("northstar listening on ") {
            return Ok((child, url.to_string()));
        }
    }
}

/// A bare hyper server answering every request with a fixed JSON: the floor of what HTTP on
/// loopback costs here. It runs as its own process, as northstar does, and prints its address
/// the way `serve` does.
pub(crate) async fn bare_server() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("northstar listening on http://{}", listener.local_addr()?);
    let serve = async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |_request: hyper::Request<hyper::body::Incoming>| async {
                        let mut response = hyper::Response::new(Full::new(Bytes::from_static(
                            b"{\"allowed\":true,\"used\":1,\"limit\":1000}",
                        )));
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    };
    tokio::select! {
        () = serve => {}
        () = northstar::server::shutdown_signal() => {}
    }
    Ok(())
}

struct Throughput {
    rate: f64,
}

/// As many requests as `clients` connections can make in `seconds`.
async fn closed_loop(
    url: &str,
    options: &LimitsBench,
    body: &(dyn Fn(usize) -> Vec<u8> + Sync),
) -> anyhow::Result<Throughput> {
    let client = HttpClient::new();
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let bearer = format!("Bearer {SERVICE_KEY}");
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..1000).map(body).collect());
    let mut workers = Vec::new();
    let started = Instant::now();
    for w in 0..options.clients {
        let (client, done, stop, bearer, url, bodies) = (
            client.clone(),
            done.clone(),
            stop.clone(),
            bearer.clone(),
            url.to_string(),
            bodies.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let headers = [
                    ("authorization", bearer.as_str()),
                    ("content-type", "application/json"),
                ];
                let response = client
                    .send(
                        http::Method::POST,
                        &url,
                        &headers,
                        bodies[i % bodies.len()].clone(),
                    )
                    .await?;
                anyhow::ensure!(
                    response.status == 200,
                    "check answered {}: {}",
                    response.status,
                    response.text()
                );
                done.fetch_add(1, Ordering::Relaxed);
                i += 7;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await??;
    }
    Ok(Throughput {
        rate: done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
    })
}

struct Latencies {
    p50: Duration,
    p99: Duration,
    p999: Duration,
    achieved: f64,
}

/// Requests sent at a fixed rate (open loop: a slow answer does not slow the sender). Each
/// latency is measured from the moment the request is handed to the client: tokio's timer
/// wakes senders up to a millisecond late, which would otherwise count as server latency (the
/// achieved rate shows the senders kept the schedule).
async fn open_loop(
    url: &str,
    options: &LimitsBench,
    body: &(dyn Fn(usize) -> Vec<u8> + Sync),
) -> anyhow::Result<Latencies> {
    let client = HttpClient::new();
    let bearer = format!("Bearer {SERVICE_KEY}");
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..1000).map(body).collect());
    let clients = options.latency_clients.max(1);
    let total = (options.rate * options.seconds) as usize;
    let interval = Duration::from_secs_f64(clients as f64 / options.rate as f64);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..clients {
        let (client, bearer, url, bodies) = (
            client.clone(),
            bearer.clone(),
            url.to_string(),
            bodies.clone(),
        );
        let per_worker = total / clients;
        let offset = interval.mul_f64(w as f64 / clients as f64);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_worker);
            for k in 0..per_worker {
                let due = started + offset + interval * u32::try_from(k).unwrap_or(u32::MAX);
                tokio::time::sleep_until(due.into()).await;
                let headers = [
                    ("authorization", bearer.as_str()),
                    ("content-type", "application/json"),
                ];
                let sent = Instant::now();
                let response = client
                    .send(
                        http::Method::POST,
                        &url,
                        &headers,
                        bodies[(w + k * 7) % bodies.len()].clone(),
                    )
                    .await?;
                anyhow::ensure!(response.status == 200, "check answered {}", response.status);
                latencies.push(sent.elapsed());
            }
            Ok::<Vec<Duration>, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for worker in workers {
        all.extend(worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pick = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Latencies {
        p50: pick(0.5),
        p99: pick(0.99),
        p999: pick(0.999),
        achieved: all.len() as f64 / elapsed,
    })
}

struct Freshness {
    p50: Duration,
    p99: Duration,
}

/// Sends one metered event at a time and measures from its ingest ack until `/v1/check`
/// shows it.
async fn freshness(base: &str, samples: usize) -> anyhow::Result<Freshness> {
    let client = HttpClient::new();
    let auth = basic_auth(WRITE_KEY);
    let bearer = format!("Bearer {SERVICE_KEY}");
    let mut times = Vec::with_capacity(samples);
    let check = serde_json::to_vec(
        &json!({"customer_id": "fresh-customer", "feature": "api_requests", "quantity": 0}),
    )?;
    for i in 0..samples {
        let event = json!({"userId": "u", "event": "api_call_made", "messageId": format!("fresh-{i}"), "context": {"groupId": "fresh-customer"}});
        let response = client
            .post_json(
                &format!("{base}/v1/track"),
                &[("authorization", &auth)],
                &event,
            )
            .await?;
        anyhow::ensure!(response.status == 200, "track answered {}", response.status);
        let acked = Instant::now();
        loop {
            let headers = [
                ("authorization", bearer.as_str()),
                ("content-type", "application/json"),
            ];
            let answer = client
                .send(
                    http::Method::POST,
                    &format!("{base}/v1/check"),
                    &headers,
                    check.clone(),
                )
                .await?
                .json();
            if answer["used"].as_f64() >= Some((i + 1) as f64) {
                break;
            }
            anyhow::ensure!(
                acked.elapsed() < Duration::from_secs(10),
                "event {i} not visible after 10 s"
            );
        }
        times.push(acked.elapsed());
    }
    times.sort();
    let pick = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Ok(Freshness {
        p50: pick(0.5),
        p99: pick(0.99),
    })
}
