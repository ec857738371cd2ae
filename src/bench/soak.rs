//! `northstar bench soak`: a long run at half the measured peak, watching what must stay
//! bounded: the server's memory, each reader's lag, and the disk the stream and Parquet use.
//!
//! It first measures the peak (clients posting as fast as they are answered, 15 s), then paces
//! the same clients at half that rate for `--minutes`, sampling RSS and `/metrics` every second
//! and printing one row a minute with the lowest and highest RSS and live heap of the minute
//! (one sample a minute caught a compaction in flight or not by chance: the server swings by
//! its working set, ~150 MiB at 29,000 events/s). The verdict lines give the rise of the floor
//! and of the peak from minute 1 and from minute 5 to the last minute, as plain percentages;
//! the check against the 10% bound takes the minutes from 5 on against the last ones, window
//! against window (see [`rss_verdicts`]); and the largest lag each reader reached.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use super::ingest::{ServerChild, WRITE_KEY, metric_value};
use super::report::{mib, thousands};
use northstar::bus::EmbeddedNats;
use northstar::client::{HttpClient, basic_auth};

/// Options of the soak.
#[derive(Debug, clap::Args)]
pub(crate) struct SoakBench {
    /// How long to run at half the peak.
    #[arg(long, default_value_t = 10)]
    pub(crate) minutes: u64,
    /// Events/s to hold instead of half the measured peak.
    #[arg(long)]
    pub(crate) rate: Option<u64>,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 8)]
    pub(crate) clients: usize,
    /// Messages per `/v1/batch` request.
    #[arg(long, default_value_t = 100)]
    pub(crate) batch: usize,
}

/// Runs the soak and prints its table.
pub(crate) async fn run(options: SoakBench) -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("northstar-soak-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&options, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The lowest and highest of a minute's samples.
#[derive(Debug, Clone, Copy)]
struct Range {
    low: u64,
    high: u64,
}

impl Range {
    const EMPTY: Range = Range {
        low: u64::MAX,
        high: 0,
    };

    fn add(&mut self, value: u64) {
        self.low = self.low.min(value);
        self.high = self.high.max(value);
    }

    fn show(&self) -> String {
        match self.high {
            0 => "–".into(),
            _ => format!("{}–{}", mib(self.low), mib(self.high)),
        }
    }
}

/// One minute of the soak.
struct Sample {
    minute: u64,
    /// RSS, lowest and highest of the minute's one-second samples: the floor is what the
    /// server keeps, the peak adds the working set of whatever ran (a commit, a compaction).
    rss: Range,
    /// The allocator's live bytes (`northstar_heap_bytes{state="in_use"}`), likewise.
    heap: Range,
    followers_lag: f64,
    archive_lag: f64,
    stream_bytes: f64,
    parquet_bytes: u64,
    acked: u64,
    shed: f64,
}

async fn run_in(options: &SoakBench, work: &Path) -> anyhow::Result<()> {
    let mut nats = EmbeddedNats::start(&work.join("jetstream"), None).await?;
    let data = work.join("data");
    let config_path = work.join("soak-config.json");
    let mut config: Value =
        serde_json::from_str(include_str!("../../tests/fixtures/config-template.json"))?;
    config["sources"] = json!([{"name": "soak", "writeKeys": [WRITE_KEY]}]);
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let server = ServerChild::spawn(&config_path, &data, nats.url()).await?;
    let load = Load {
        client: HttpClient::new(),
        url: format!("{}/v1/batch", server.base),
        next_id: Arc::new(AtomicU64::new(0)),
        acked: Arc::new(AtomicU64::new(0)),
        batch: options.batch.max(1),
    };

    let rate = match options.rate {
        Some(rate) => rate,
        None => {
            eprintln!("measuring the peak: {} clients, 15 s…", options.clients);
            let before = load.acked.load(Ordering::Relaxed);
            load.run(options.clients, None, Duration::from_secs(15))
                .await?;
            let peak = (load.acked.load(Ordering::Relaxed) - before) / 15;
            eprintln!("peak {} events/s; soaking at half", thousands(peak as f64));
            (peak / 2).max(1)
        }
    };
    eprintln!(
        "soak: {} events/s for {} min…",
        thousands(rate as f64),
        options.minutes
    );
    let running = {
        let load = load.clone();
        let (clients, minutes) = (options.clients, options.minutes);
        tokio::spawn(async move {
            load.run(clients, Some(rate), Duration::from_secs(minutes * 60))
                .await
        })
    };
    let metrics_url = format!("{}/metrics", server.base);
    let started = Instant::now();
    let mut samples = Vec::new();
    let (mut followers_lag, mut archive_lag) = (0.0f64, 0.0f64);
    let mut last_text = String::new();
    let mut minute = 0;
    let (mut rss, mut heap) = (Range::EMPTY, Range::EMPTY);
    while !running.is_finished() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(bytes) = rss_bytes(server.pid) {
            rss.add(bytes);
        }
        if let Ok(answer) = load.client.get(&metrics_url, &[]).await {
            last_text = answer.text();
            let live = metric_value(&last_text, "northstar_heap_bytes{state=\"in_use\"}");
            if live > 0.0 {
                heap.add(live as u64);
            }
            followers_lag = followers_lag.max(metric_value(
                &last_text,
                "northstar_consumer_lag{reader=\"followers\"}",
            ));
            archive_lag = archive_lag.max(metric_value(
                &last_text,
                "northstar_consumer_lag{reader=\"archive\"}",
            ));
        }
        if started.elapsed() >= Duration::from_secs((minute + 1) * 60) {
            minute += 1;
            samples.push(Sample {
                minute,
                rss,
                heap,
                followers_lag,
                archive_lag,
                stream_bytes: metric_value(&last_text, "northstar_stream_bytes"),
                parquet_bytes: northstar::disk::dir_bytes(&data.join("events")),
                acked: load.acked.load(Ordering::Relaxed),
                shed: metric_value(&last_text, "northstar_ingest_shed_total"),
            });
            (followers_lag, archive_lag) = (0.0, 0.0);
            (rss, heap) = (Range::EMPTY, Range::EMPTY);
        }
    }
    running.await.context("soak load")??;
    server.stop().await;
    nats.stop().await;
    print_soak(rate, options, &samples);
    Ok(())
}

/// RSS's rise to the last minute from minute 1 and from minute 5, for the floor (what the
/// server keeps) and for the peak (with the working set of whatever ran that minute); then
/// the check against the 10% bound, window against window: the minutes from 5 on against as
/// many last minutes (up to five each). The peak swings with the merges a minute happens to
/// catch, the largest of them minutes apart, so one minute against another measures which
/// merge each caught; a window holds several, and a rise from window to window is growth.
fn rss_verdicts(samples: &[Sample]) -> Vec<String> {
    let Some(last) = samples.last() else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    let picks = [
        ("floor", (|r: &Range| r.low) as fn(&Range) -> u64, true),
        ("peak", |r: &Range| r.high, false),
    ];
    for (what, pick, _) in picks {
        for minute in [1, 5] {
            let Some(from) = samples.iter().find(|s| s.minute == minute) else {
                continue;
            };
            if from.minute == last.minute {
                continue;
            }
            let (before, after) = (pick(&from.rss), pick(&last.rss));
            lines.push(format!(
                "RSS {what} from minute {} to minute {}: {} to {} ({:+.1}%)",
                from.minute,
                last.minute,
                mib(before),
                mib(after),
                rise(before, after)
            ));
        }
    }
    let Some(width) = last.minute.checked_sub(4).map(|n| (n / 2).clamp(1, 5)) else {
        return lines;
    };
    let window = |from: u64| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| (from..from + width).contains(&s.minute))
            .collect()
    };
    let (early, late) = (window(5), window(last.minute + 1 - width));
    if early.is_empty() || late.is_empty() {
        return lines;
    }
    let span = |w: &[&Sample]| match (w.first(), w.last()) {
        (Some(a), Some(b)) if a.minute != b.minute => format!("minutes {}–{}", a.minute, b.minute),
        (Some(a), _) => format!("minute {}", a.minute),
        _ => String::new(),
    };
    for (what, pick, lowest) in picks {
        let over = |w: &[&Sample]| {
            let values = w.iter().map(|s| pick(&s.rss));
            match lowest {
                true => values.min().unwrap_or(0),
                false => values.max().unwrap_or(0),
            }
        };
        let (before, after) = (over(&early), over(&late));
        let percent = rise(before, after);
        let verdict = match percent.abs() <= 10.0 {
            true => "within",
            false => "outside",
        };
        lines.push(format!(
            "RSS {what}, {} against {}: {} to {} ({percent:+.1}%, {verdict} the 10% bound)",
            span(&early),
            span(&late),
            mib(before),
            mib(after)
        ));
    }
    lines
}

/// The rise from `before` to `after`, in percent.
fn rise(before: u64, after: u64) -> f64 {
    (after as f64 - before as f64) / (before as f64).max(1.0) * 100.0
}

fn print_soak(rate: u64, options: &SoakBench, samples: &[Sample]) {
    println!(
        "\n### northstar bench soak — {} events/s, {} clients, batches of {}, {} min\n",
        thousands(rate as f64),
        options.clients,
        options.batch,
        options.minutes
    );
    println!(
        "RSS and heap live: lowest–highest of the minute's one-second samples.\n\n\
         | minute | RSS | heap live | followers lag max | archive lag max | stream | Parquet | events acked | shed (total) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in samples {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.minute,
            s.rss.show(),
            s.heap.show(),
            thousands(s.followers_lag),
            thousands(s.archive_lag),
            mib(s.stream_bytes as u64),
            mib(s.parquet_bytes),
            thousands(s.acked as f64),
            thousands(s.shed)
        );
    }
    println!();
    for line in rss_verdicts(samples) {
        println!("{line}");
    }
    let worst = |f: fn(&Sample) -> f64| samples.iter().map(f).fold(0.0, f64::max);
    println!(
        "largest lag: followers {}, archive {} events\n",
        thousands(worst(|s| s.followers_lag)),
        thousands(worst(|s| s.archive_lag))
    );
}

/// Resident memory of a process now (`VmRSS`), in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Clients posting batches of fresh events, paced or as fast as they are answered.
#[derive(Clone)]
struct Load {
    client: HttpClient,
    url: String,
    next_id: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    batch: usize,
}

impl Load {
    /// Posts for `span` with `clients` connections; `rate` (events/s over all clients) paces
    /// them, `None` lets each send its next batch as soon as the last is answered. Shed
    /// batches (503, 429) are sent again after a pause, as the SDKs do.
    async fn run(&self, clients: usize, rate: Option<u64>, span: Duration) -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let every = rate.map(|r| {
            Duration::from_secs_f64(clients.max(1) as f64 * self.batch as f64 / r.max(1) as f64)
        });
        let mut workers = Vec::new();
        for _ in 0..clients.max(1) {
            let (load, stop) = (self.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let mut tick = every.map(tokio::time::interval);
                while !stop.load(Ordering::Relaxed) {
                    if let Some(tick) = tick.as_mut() {
                        tick.tick().await;
                    }
                    load.post_one().await?;
                }
                anyhow::Ok(())
            }));
        }
        tokio::time::sleep(span).await;
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.await??;
        }
        Ok(())
    }

    async fn post_one(&self) -> anyhow::Result<()> {
        let first = self.next_id.fetch_add(self.batch as u64, Ordering::Relaxed);
        let now = northstar::clock::format_micros(northstar::clock::system_micros());
        let batch: Vec<Value> = (first..first + self.batch as u64)
            .map(|i| {
                json!({"type": "track", "messageId": format!("soak-{i}"), "userId": format!("user-{}", i % 10_000),
                       "event": "api_call_made", "timestamp": now,
                       "context": {"groupId": format!("customer-{}", i % 1_000)},
                       "properties": {"endpoint": "/v1/search", "latency_ms": i % 300, "status": 200}})
            })
            .collect();
        let body = serde_json::to_vec(&json!({"batch": batch}))?;
        let auth = basic_auth(WRITE_KEY);
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        loop {
            let answer = self
                .client
                .send(http::Method::POST, &self.url, &headers, body.clone())
                .await?;
            match answer.status {
                200 => {
                    self.acked.fetch_add(self.batch as u64, Ordering::Relaxed);
                    return Ok(());
                }
                503 | 429 => tokio::time::sleep(Duration::from_millis(100)).await,
                status => anyhow::bail!("batch answered {status}: {}", answer.text()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minute: u64, mib: u64) -> Sample {
        Sample {
            minute,
            rss: Range {
                low: mib << 20,
                high: (mib * 2) << 20,
            },
            heap: Range::EMPTY,
            followers_lag: 0.0,
            archive_lag: 0.0,
            stream_bytes: 0.0,
            parquet_bytes: 0,
            acked: 0,
            shed: 0.0,
        }
    }

    /// One sample a minute from minute 1, at `mibs`.
    fn minutes(mibs: &[u64]) -> Vec<Sample> {
        mibs.iter()
            .enumerate()
            .map(|(i, mib)| at(i as u64 + 1, *mib))
            .collect()
    }

    /// 343 → 485 MiB used to print as "±17.2%" (half the spread around the midpoint).
    #[test]
    fn the_rise_is_a_plain_percentage_from_minute_1_and_from_minute_5() {
        let samples = minutes(&[343, 343, 343, 350, 360, 400, 485]);
        let lines = rss_verdicts(&samples);
        assert!(
            lines[0].contains("floor from minute 1 to minute 7") && lines[0].contains("+41.4%"),
            "{lines:?}"
        );
        assert!(
            lines[3].starts_with("RSS peak from minute 5") && lines[3].contains("+34.7%"),
            "{lines:?}"
        );
        assert!(
            lines[4].contains("floor, minute 5 against minute 7")
                && lines[4].contains("+34.7%, outside the 10% bound"),
            "{lines:?}"
        );
    }

    /// A peak that swings by which merge a minute caught stays within the bound window
    /// against window; one that climbs does not.
    #[test]
    fn the_bound_is_checked_window_against_window() {
        let swing = [
            200, 200, 200, 200, 200, 240, 200, 260, 200, 200, 210, 200, 250, 200, 200,
        ];
        let samples = minutes(&swing);
        let lines = rss_verdicts(&samples);
        assert!(
            lines[5].contains("peak, minutes 5–9 against minutes 11–15")
                && lines[5].contains("(-3.8%, within the 10% bound)"),
            "{lines:?}"
        );
        let climb: Vec<Sample> = (1..=15).map(|m| at(m, 200 + m * 10)).collect();
        let lines = rss_verdicts(&climb);
        assert!(lines[5].contains("outside the 10% bound"), "{lines:?}");
    }
}
