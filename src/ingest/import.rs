//! `northstar import FILE.jsonl[.gz]`: a backfill of Segment- or PostHog-shaped JSON lines (what
//! their exports give) through a running server's ingest routes, so history gets the same
//! validation and dedup as live events; re-importing a file stores nothing twice.

use std::io::{BufRead, Read};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::client::{HttpClient, basic_auth};

/// Messages per request.
const BATCH: usize = 500;

/// What an import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportReport {
    /// Lines read.
    pub lines: u64,
    /// Events stored.
    pub accepted: u64,
    /// Events already stored (by id).
    pub duplicates: u64,
    /// Lines sent to the rejected store (unreadable lines included).
    pub rejected: u64,
    /// Events of sampled event types left out by design.
    pub sampled_out: u64,
}

/// Imports `path` into the server at `base_url` with `write_key`, showing progress on a terminal.
pub async fn run(path: &Path, base_url: &str, write_key: &str) -> Result<ImportReport, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} importing [{bar:40}] {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let counted = CountingReader {
        inner: file,
        bar: bar.clone(),
    };
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
            counted,
        )))
    } else {
        Box::new(std::io::BufReader::new(counted))
    };
    let client = HttpClient::new();
    let auth = basic_auth(write_key);
    let mut report = ImportReport::default();
    let mut segment: Vec<Value> = Vec::with_capacity(BATCH);
    let mut posthog: Vec<Value> = Vec::with_capacity(BATCH);
    for line in reader.lines() {
        let line = line.map_err(|e| format!("reading {}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        match serde_json::from_str::<Value>(&line) {
            Ok(value)
                if value.get("distinct_id").is_some() || value.get("$distinct_id").is_some() =>
            {
                posthog.push(value)
            }
            Ok(value) => segment.push(value),
            // An unreadable line still goes through ingest, which keeps it in the rejected store.
            Err(_) => segment.push(Value::String(line)),
        }
        if segment.len() >= BATCH {
            send(
                &client,
                base_url,
                &auth,
                "/v1/batch",
                json!({"batch": std::mem::take(&mut segment)}),
                &mut report,
            )
            .await?;
        }
        if posthog.len() >= BATCH {
            send(
                &client,
                base_url,
                &auth,
                "/batch/",
                json!({"api_key": write_key, "batch": std::mem::take(&mut posthog)}),
                &mut report,
            )
            .await?;
        }
        bar.set_message(format!(
            "{} stored, {} already there, {} rejected",
            report.accepted, report.duplicates, report.rejected
        ));
    }
    if !segment.is_empty() {
        send(
            &client,
            base_url,
            &auth,
            "/v1/batch",
            json!({"batch": segment}),
            &mut report,
        )
        .await?;
    }
    if !posthog.is_empty() {
        send(
            &client,
            base_url,
            &auth,
            "/batch/",
            json!({"api_key": write_key, "batch": posthog}),
            &mut report,
        )
        .await?;
    }
    bar.finish_and_clear();
    Ok(report)
}

async fn send(
    client: &HttpClient,
    base: &str,
    auth: &str,
    route: &str,
    body: Value,
    report: &mut ImportReport,
) -> Result<(), String> {
    let url = format!("{base}{route}");
    for attempt in 0..10u32 {
        let response = client
            .post_json(&url, &[("authorization", auth)], &body)
            .await
            .map_err(|e| e.to_string())?;
        match response.status {
            200 => {
                let answer = response.json();
                let count = |k: &str| answer[k].as_u64().unwrap_or(0);
                report.accepted += count("accepted");
                report.duplicates += count("duplicates");
                report.rejected += count("rejected");
                report.sampled_out += count("sampled_out");
                return Ok(());
            }
            429 | 503 => {
                let wait = response
                    .headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                tokio::time::sleep(std::time::Duration::from_millis(
                    wait * 1000 + u64::from(attempt) * 100,
                ))
                .await;
            }
            status => return Err(format!("{route} answered {status}: {}", response.text())),
        }
    }
    Err(format!("{route}: the server stayed unavailable"))
}

/// Counts bytes read into the progress bar.
struct CountingReader<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}
