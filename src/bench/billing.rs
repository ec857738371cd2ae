//! `northstar bench billing`: sustained meter events/s delivered from the outbox to a local
//! server speaking Stripe's meter events endpoint, next to raw HTTP POSTs of the same bodies
//! from the same client with the same concurrency (the most any sink could do here).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use rust_decimal::Decimal;
use tokio::sync::{mpsc, watch};

use super::report::{Row, print_table, thousands};
use northstar::billing::deliver::{self, DeliveryStats, Pace};
use northstar::billing::outbox::{Closing, Outbox};
use northstar::billing::sink::Sink;
use northstar::billing::stripe::{Stripe, encode_form};
use northstar::client::HttpClient;

/// Options of `bench billing`.
#[derive(Debug, Clone, Args)]
pub(crate) struct BillingBench {
    /// Reports to deliver (one per customer and window).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) reports: usize,
    /// Distinct customers.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) customers: usize,
    /// Calls in flight.
    #[arg(long, default_value_t = 16)]
    pub(crate) concurrency: usize,
}

/// A loopback server that answers meter events like Stripe (200, identifier kept once).
async fn provider() -> anyhow::Result<(String, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let accepted = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(HashSet::<Bytes>::new()));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (counter, seen) = (counter.clone(), seen.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let (counter, seen) = (counter.clone(), seen.clone());
                        async move {
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if seen.lock().map(|mut s| s.insert(body)).unwrap_or(false) {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"{\"object\":\"billing.meter_event\"}"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((base, accepted))
}

/// Runs the benchmark and prints its table.
pub(crate) async fn run(options: BillingBench) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let customers = options.customers.max(1);
    let windows = options.reports.div_ceil(customers);
    eprintln!(
        "bench billing: {} reports ({customers} customers × {windows} windows)",
        options.reports
    );
    let mut outbox = Outbox::open(&dir)?;
    let closings: Vec<Closing> = (0..options.reports)
        .map(|i| {
            let customer = format!("customer-{:05}", i % customers);
            let window = (i / customers) as i64;
            Closing {
                key: (customer.clone(), "api_requests".into()),
                window_start: window * 3_600_000_000,
                window_end: (window + 1) * 3_600_000_000,
                closed_usage: Decimal::from(10 * (window + 1)),
                window_usage: Decimal::from(10),
                event_name: "api_requests".into(),
                provider_customer: format!("cus_{customer}"),
            }
        })
        .collect();
    // Owed window by window, as the follower owes them: one fsync per batch of closings.
    let started = Instant::now();
    for batch in closings.chunks(customers) {
        outbox.owe(batch, 0)?;
    }
    let owe_rate = options.reports as f64 / started.elapsed().as_secs_f64();
    let outbox = Arc::new(Mutex::new(outbox));

    let (base, accepted) = provider().await?;
    let (_stop_tx, stop) = watch::channel(false);
    let (_tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Mutex::new(DeliveryStats::default()));
    let pace = Pace {
        concurrency: options.concurrency,
        rate_limit: 1_000_000,
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_secs(5),
    };
    let sink = Sink::Stripe(Stripe::new(&base, "sk_bench", Duration::from_secs(10)));
    let started = Instant::now();
    let task = tokio::spawn(deliver::run(outbox.clone(), sink, pace, rx, stats, stop));
    let target = options.reports as u64;
    while accepted.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(5)).await;
        anyhow::ensure!(!task.is_finished(), "delivery stopped early");
    }
    let ours = options.reports as f64 / started.elapsed().as_secs_f64();
    task.abort();

    // Baseline: the same form bodies POSTed by the same client, same concurrency, no outbox.
    let (base, accepted) = provider().await?;
    let client = HttpClient::new();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.concurrency {
        let (client, next, base) = (client.clone(), next.clone(), base.clone());
        let total = options.reports as u64;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let id = format!("ns:baseline:{i}");
                let body = encode_form(&[
                    ("event_name", "api_requests"),
                    ("payload[stripe_customer_id]", "cus_x"),
                    ("payload[value]", "10"),
                    ("identifier", &id),
                    ("timestamp", "0"),
                ]);
                let _ = client
                    .send(
                        http::Method::POST,
                        &format!("{base}/v1/billing/meter_events"),
                        &[
                            ("authorization", "Bearer sk_bench"),
                            ("content-type", "application/x-www-form-urlencoded"),
                        ],
                        body.into_bytes(),
                    )
                    .await;
            }
        }));
    }
    for worker in workers {
        worker.await?;
    }
    let raw = options.reports as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        accepted.load(Ordering::Relaxed) == target,
        "baseline lost requests"
    );
    let _ = std::fs::remove_dir_all(&dir);

    print_table(
        &format!(
            "billing: {} meter events, {customers} customers, {} in flight",
            thousands(options.reports as f64),
            options.concurrency
        ),
        "raw HTTP POST",
        &[
            Row {
                measure: "meter events delivered/s (outbox → provider, recorded)".into(),
                ours: thousands(ours),
                baseline: thousands(raw),
                ratio: Some(ours / raw),
            },
            Row {
                measure: "reports owed/s (outbox append, one fsync per window)".into(),
                ours: thousands(owe_rate),
                baseline: String::new(),
                ratio: None,
            },
        ],
    );
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("northstar-bench-billing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
