//! Operational metrics, rendered as Prometheus text at `GET /metrics`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
    /// Raises the value to `value` if it is higher.
    pub fn raise(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Metrics of one archived table (events or rejected).
#[derive(Debug, Default)]
pub struct ArchiveMetrics {
    /// Rows committed to Parquet.
    pub rows: Counter,
    /// Commits made.
    pub commits: Counter,
    /// Parquet files written by commits.
    pub files: Counter,
    /// Sum of commit durations, microseconds.
    pub commit_micros_sum: Counter,
    /// Longest commit so far, microseconds.
    pub commit_micros_max: Gauge,
    /// Last stream sequence committed.
    pub last_seq: Gauge,
    /// Last stream sequence SQL sees: committed, or sealed in the write buffer.
    pub visible_seq: Gauge,
    /// Compactions made.
    pub compactions: Counter,
    /// Stream messages that could not be decoded (skipped and logged).
    pub undecodable: Counter,
    /// Times delivery skipped sequences still in the stream and the consumer was repositioned.
    pub repositions: Counter,
    /// Times the followers' feed skipped ahead and the archiver read through its own consumer.
    pub feed_gaps: Counter,
    /// Stream messages gone before the archiver read them (deleted, or dropped by retention):
    /// never in Parquet. Each gap is also an `error` line.
    pub lost: Counter,
    /// Commits that failed (a full disk, an I/O error) and were retried from the manifest.
    pub failures: Counter,
}

/// Every metric of a running server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events newly stored by ingest.
    pub ingest_accepted: Counter,
    /// Events whose id was already stored.
    pub ingest_duplicates: Counter,
    /// Messages sent to the rejected store.
    pub ingest_rejected: Counter,
    /// Requests answered 503 because the stream was unavailable.
    pub ingest_unavailable: Counter,
    /// Requests answered 429 (a write key over its rate).
    pub ingest_rate_limited: Counter,
    /// Requests shed because a reader of the stream was too far behind.
    pub ingest_shed: Counter,
    /// Requests refused because a disk was below its reserve.
    pub ingest_disk_full: Counter,
    /// Least free space of the disks northstar writes to, as of the last scrape.
    pub disk_free_bytes: Gauge,
    /// 1 while a disk is below its reserve, as of the last scrape.
    pub disk_full: Gauge,
    /// Bytes the events stream holds, as of the last scrape.
    pub stream_bytes: Gauge,
    /// Messages the events stream holds, as of the last scrape.
    pub stream_messages: Gauge,
    /// First sequence the events stream still holds, as of the last scrape.
    pub stream_first_seq: Gauge,
    /// Events acked but not yet applied by the followers, as of the last scrape.
    pub followers_lag: Gauge,
    /// Events acked but not yet committed to Parquet, as of the last scrape.
    pub archive_lag: Gauge,
    /// Archive of the `events` table.
    pub archive_events: Arc<ArchiveMetrics>,
    /// Archive of the `rejected_events` table.
    pub archive_rejected: Arc<ArchiveMetrics>,
    /// Last sequence in the events stream, as of the last scrape.
    pub stream_last_seq: Gauge,
    /// SQL queries running now, as of the last scrape.
    pub sql_running: Gauge,
    /// Metered events applied to counters.
    pub meter_applied: Counter,
    /// Metered events for a period older than the two the meter keeps.
    pub meter_late: Counter,
    /// Metered events without a valid quantity (not counted).
    pub meter_skipped: Counter,
    /// Usage anomalies flagged.
    pub meter_anomalies: Counter,
    /// Panics caught in followers and background tasks (see `supervise`).
    pub panics: Counter,
    /// Stream messages gone (deleted, or dropped by retention) before the followers applied
    /// them: their state lacks them. Each gap is also an `error` line.
    pub followers_lost: Arc<Counter>,
    /// SQL queries run, and those that failed.
    pub sql_queries: Counter,
    /// SQL queries that failed or timed out.
    pub sql_failures: Counter,
    http: HttpCounts,
}

/// Route families counted separately; anything else counts as `other`.
const FAMILIES: &[&str] = &[
    "segment",
    "posthog",
    "preflight",
    "sql",
    "check",
    "admin",
    "usage",
    "customers",
    "healthz",
    "metrics",
    "other",
];

/// Upper bounds (seconds) of the request-duration histogram's buckets: from the limits
/// API's fraction of a millisecond to the SQL API's time limit.
const DURATION_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// HTTP answers by route family and status, and their durations by route family, lock-free
/// (the limits path counts every request).
#[derive(Debug)]
struct HttpCounts {
    /// `FAMILIES × 500` statuses (100–599).
    answers: Vec<AtomicU64>,
    /// `FAMILIES × (buckets + 1)`: answers whose duration fell in each bucket (not
    /// cumulative; the last is past every bound).
    durations: Vec<AtomicU64>,
    /// Sum of durations by family, microseconds.
    duration_micros: Vec<AtomicU64>,
}

impl Default for HttpCounts {
    fn default() -> Self {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        Self {
            answers: zeros(FAMILIES.len() * 500),
            durations: zeros(FAMILIES.len() * (DURATION_BUCKETS.len() + 1)),
            duration_micros: zeros(FAMILIES.len()),
        }
    }
}

impl Metrics {
    /// Counts one HTTP answer of a route family (`segment`, `posthog`, `sql`, …) and the
    /// time it took, from its headers to its answer.
    pub fn http_answered(&self, family: &'static str, status: u16, took: std::time::Duration) {
        let row = FAMILIES
            .iter()
            .position(|f| *f == family)
            .unwrap_or(FAMILIES.len() - 1);
        let column = usize::from(status.clamp(100, 599) - 100);
        self.http.answers[row * 500 + column].fetch_add(1, Ordering::Relaxed);
        let seconds = took.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.http.durations[row * (DURATION_BUCKETS.len() + 1) + bucket]
            .fetch_add(1, Ordering::Relaxed);
        self.http.duration_micros[row].fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// `northstar_http_request_duration_seconds`, a histogram by route family (families
    /// that answered nothing yet are left out).
    fn render_durations(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP northstar_http_request_duration_seconds Time from a request's headers to its answer, by route family.\n\
             # TYPE northstar_http_request_duration_seconds histogram"
        );
        let width = DURATION_BUCKETS.len() + 1;
        for (row, family) in FAMILIES.iter().enumerate() {
            let counts: Vec<u64> = self.http.durations[row * width..(row + 1) * width]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let name = "northstar_http_request_duration_seconds";
            let mut below = 0;
            for (bound, count) in DURATION_BUCKETS.iter().zip(&counts) {
                below += count;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{family}\",le=\"{bound}\"}} {below}"
                );
            }
            let micros = self.http.duration_micros[row].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{route=\"{family}\",le=\"+Inf\"}} {total}\n\
                 {name}_sum{{route=\"{family}\"}} {}\n\
                 {name}_count{{route=\"{family}\"}} {total}",
                micros as f64 / 1e6
            );
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "northstar_followers_lost_total",
            "Stream messages gone (deleted, or dropped by retention) before the followers applied them.",
            self.followers_lost.get(),
        );
        counter(
            "northstar_ingest_events_accepted_total",
            "Events newly stored.",
            self.ingest_accepted.get(),
        );
        counter(
            "northstar_ingest_events_duplicate_total",
            "Events whose id was already stored.",
            self.ingest_duplicates.get(),
        );
        counter(
            "northstar_ingest_events_rejected_total",
            "Messages sent to the rejected store.",
            self.ingest_rejected.get(),
        );
        counter(
            "northstar_ingest_unavailable_total",
            "Requests answered 503 (stream unavailable).",
            self.ingest_unavailable.get(),
        );
        counter(
            "northstar_ingest_rate_limited_total",
            "Requests answered 429 (write key over its rate).",
            self.ingest_rate_limited.get(),
        );
        counter(
            "northstar_meter_events_applied_total",
            "Metered events applied to the meter's counters.",
            self.meter_applied.get(),
        );
        counter(
            "northstar_meter_events_late_total",
            "Metered events for a period older than the two the meter keeps.",
            self.meter_late.get(),
        );
        counter(
            "northstar_meter_events_skipped_total",
            "Metered events without a valid quantity (not counted).",
            self.meter_skipped.get(),
        );
        counter(
            "northstar_meter_anomalies_total",
            "Customers flagged for usage far above their own baseline.",
            self.meter_anomalies.get(),
        );
        counter(
            "northstar_panics_total",
            "Panics caught in followers and background tasks (/healthz names them).",
            self.panics.get(),
        );
        counter(
            "northstar_sql_queries_total",
            "SQL queries run.",
            self.sql_queries.get(),
        );
        counter(
            "northstar_sql_failures_total",
            "SQL queries that failed.",
            self.sql_failures.get(),
        );
        let _ = writeln!(
            out,
            "# HELP northstar_http_responses_total HTTP answers by route family and status."
        );
        let _ = writeln!(out, "# TYPE northstar_http_responses_total counter");
        for (row, family) in FAMILIES.iter().enumerate() {
            for column in 0..500 {
                let count = self.http.answers[row * 500 + column].load(Ordering::Relaxed);
                if count > 0 {
                    let status = column + 100;
                    let _ = writeln!(
                        out,
                        "northstar_http_responses_total{{route=\"{family}\",status=\"{status}\"}} {count}"
                    );
                }
            }
        }
        self.render_durations(&mut out);
        let stream_last = self.stream_last_seq.get();
        let _ = writeln!(
            out,
            "# HELP northstar_stream_last_seq Last sequence in the events stream.\n# TYPE northstar_stream_last_seq gauge\nnorthstar_stream_last_seq {stream_last}"
        );
        let _ = writeln!(
            out,
            "# HELP northstar_ingest_shed_total Ingest requests shed (503 overloaded) because a reader of the stream was past its lag bound.\n# TYPE northstar_ingest_shed_total counter\nnorthstar_ingest_shed_total {}",
            self.ingest_shed.get()
        );
        let _ = writeln!(
            out,
            "# HELP northstar_consumer_lag Events acked by ingest and not yet taken in, by reader.\n# TYPE northstar_consumer_lag gauge\nnorthstar_consumer_lag{{reader=\"followers\"}} {}\nnorthstar_consumer_lag{{reader=\"archive\"}} {}",
            self.followers_lag.get(),
            self.archive_lag.get()
        );
        let _ = writeln!(
            out,
            "# HELP northstar_ingest_disk_full_total Ingest requests refused (503 disk_full) because a disk was below storage.minFreeMb.\n# TYPE northstar_ingest_disk_full_total counter\nnorthstar_ingest_disk_full_total {}",
            self.ingest_disk_full.get()
        );
        let _ = writeln!(
            out,
            "# HELP northstar_disk_free_bytes Least free space of the disks northstar writes to.\n# TYPE northstar_disk_free_bytes gauge\nnorthstar_disk_free_bytes {}\n# HELP northstar_disk_full 1 while a disk is below storage.minFreeMb.\n# TYPE northstar_disk_full gauge\nnorthstar_disk_full {}",
            self.disk_free_bytes.get(),
            self.disk_full.get()
        );
        let _ = writeln!(
            out,
            "# HELP northstar_stream_bytes Bytes the events stream holds.\n# TYPE northstar_stream_bytes gauge\nnorthstar_stream_bytes {}\n# HELP northstar_stream_messages Messages the events stream holds.\n# TYPE northstar_stream_messages gauge\nnorthstar_stream_messages {}\n# HELP northstar_stream_first_seq First sequence the events stream still holds (retention drops older ones).\n# TYPE northstar_stream_first_seq gauge\nnorthstar_stream_first_seq {}",
            self.stream_bytes.get(),
            self.stream_messages.get(),
            self.stream_first_seq.get()
        );
        let sql_running = self.sql_running.get();
        let _ = writeln!(
            out,
            "# HELP northstar_sql_queries_running SQL queries running now (a query given up stops at once).\n# TYPE northstar_sql_queries_running gauge\nnorthstar_sql_queries_running {sql_running}"
        );
        type Read = fn(&ArchiveMetrics) -> f64;
        let archive_lines: [(&str, &str, &str, Read); 13] = [
            (
                "northstar_archive_rows_total",
                "counter",
                "Rows committed to Parquet.",
                |a| a.rows.get() as f64,
            ),
            (
                "northstar_archive_commits_total",
                "counter",
                "Parquet commits.",
                |a| a.commits.get() as f64,
            ),
            (
                "northstar_archive_files_total",
                "counter",
                "Parquet files written by commits.",
                |a| a.files.get() as f64,
            ),
            (
                "northstar_archive_compactions_total",
                "counter",
                "Compactions of small files.",
                |a| a.compactions.get() as f64,
            ),
            (
                "northstar_archive_undecodable_total",
                "counter",
                "Stream messages skipped as undecodable.",
                |a| a.undecodable.get() as f64,
            ),
            (
                "northstar_archive_repositions_total",
                "counter",
                "Deliveries that skipped sequences still in the stream, repositioned.",
                |a| a.repositions.get() as f64,
            ),
            (
                "northstar_archive_feed_gaps_total",
                "counter",
                "Times the followers' feed dropped messages and the archiver read them itself.",
                |a| a.feed_gaps.get() as f64,
            ),
            (
                "northstar_archive_lost_total",
                "counter",
                "Stream messages gone (deleted, or dropped by retention) before the archiver read them.",
                |a| a.lost.get() as f64,
            ),
            (
                "northstar_archive_failures_total",
                "counter",
                "Commits that failed (full disk, I/O error) and were retried from the manifest.",
                |a| a.failures.get() as f64,
            ),
            (
                "northstar_archive_last_seq",
                "gauge",
                "Last stream sequence committed to Parquet.",
                |a| a.last_seq.get() as f64,
            ),
            (
                "northstar_archive_visible_seq",
                "gauge",
                "Last stream sequence SQL sees: committed, or in the write buffer SQL reads.",
                |a| a.visible_seq.get() as f64,
            ),
            (
                "northstar_archive_commit_seconds_total",
                "counter",
                "Total time spent committing.",
                |a| a.commit_micros_sum.get() as f64 / 1e6,
            ),
            (
                "northstar_archive_commit_seconds_max",
                "gauge",
                "Longest commit.",
                |a| a.commit_micros_max.get() as f64 / 1e6,
            ),
        ];
        for (name, kind, help, read) in archive_lines {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (table, archive) in [
                ("events", &*self.archive_events),
                ("rejected_events", &*self.archive_rejected),
            ] {
                let _ = writeln!(out, "{name}{{table=\"{table}\"}} {}", read(archive));
            }
        }
        let lag = stream_last.saturating_sub(self.archive_events.last_seq.get());
        let _ = writeln!(
            out,
            "# HELP northstar_stream_lag Events in the stream not yet committed to Parquet.\n# TYPE northstar_stream_lag gauge\nnorthstar_stream_lag {lag}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_stream_minus_archived() {
        let metrics = Metrics::default();
        metrics.stream_last_seq.set(120);
        metrics.archive_events.last_seq.set(100);
        metrics.http_answered("segment", 200, std::time::Duration::from_micros(700));
        let text = metrics.render();
        assert!(text.contains("northstar_stream_lag 20"), "{text}");
        assert!(
            text.contains("northstar_http_responses_total{route=\"segment\",status=\"200\"} 1")
        );
    }

    /// Buckets are cumulative, end in `+Inf` equal to `_count`, and `_sum` is in seconds.
    #[test]
    fn request_durations_are_a_histogram_by_route() {
        let metrics = Metrics::default();
        for micros in [700, 800, 40_000] {
            let took = std::time::Duration::from_micros(micros);
            metrics.http_answered("check", 200, took);
        }
        let text = metrics.render();
        let line = |suffix: &str| {
            let name = format!("northstar_http_request_duration_seconds{suffix} ");
            text.lines()
                .find_map(|l| l.strip_prefix(name.as_str()))
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .to_string()
        };
        assert_eq!(line("_bucket{route=\"check\",le=\"0.0005\"}"), "0");
        assert_eq!(line("_bucket{route=\"check\",le=\"0.001\"}"), "2");
        assert_eq!(line("_bucket{route=\"check\",le=\"0.05\"}"), "3");
        assert_eq!(line("_bucket{route=\"check\",le=\"+Inf\"}"), "3");
        assert_eq!(line("_count{route=\"check\"}"), "3");
        assert_eq!(line("_sum{route=\"check\"}"), "0.0415");
        assert!(
            !text.contains("route=\"sql\",le="),
            "no series before a first answer"
        );
    }

    /// Prometheus's naming rules, as `promtool check metrics` applies them: a counter ends
    /// in `_total`, and nothing else uses the suffixes of summaries and histograms
    /// (`northstar_archive_commit_seconds_sum` was a counter named like a summary's part).
    #[test]
    fn every_counter_ends_in_total_and_no_name_takes_a_summary_suffix() {
        let text = Metrics::default().render();
        let mut counters = 0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').expect("name and type");
            if kind == "counter" {
                counters += 1;
                assert!(name.ends_with("_total"), "counter {name}");
            }
            for suffix in ["_sum", "_count", "_bucket"] {
                assert!(!name.ends_with(suffix), "{name} ends in {suffix}");
            }
        }
        assert!(counters > 10, "{counters} counters");
    }
}
