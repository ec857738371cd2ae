//! Operational metrics at `GET /metrics`: plain atomics on the hot paths, read at each scrape
//! into the Prometheus client library's encoder (Prometheus text, or OpenMetrics when asked).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
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
    /// Days dropped whole because they were past `archive.retention`.
    pub expired_days: Counter,
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
    "dashboard",
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

    /// Every family these atomics hold, read now (the HTTP families list only the route
    /// families and statuses that answered something).
    pub fn families(&self) -> Vec<Family> {
        let count =
            |name, help, counter: &Counter| Family::counter(name, help).value(counter.get());
        let gauge = |name, help, gauge: &Gauge| Family::gauge(name, help).value(gauge.get());
        let mut families = vec![
            count(
                "northstar_followers_lost_total",
                "Stream messages gone (deleted, or dropped by retention) before the followers applied them.",
                &self.followers_lost,
            ),
            count(
                "northstar_ingest_events_accepted_total",
                "Events newly stored.",
                &self.ingest_accepted,
            ),
            count(
                "northstar_ingest_events_duplicate_total",
                "Events whose id was already stored.",
                &self.ingest_duplicates,
            ),
            count(
                "northstar_ingest_events_rejected_total",
                "Messages sent to the rejected store.",
                &self.ingest_rejected,
            ),
            count(
                "northstar_ingest_unavailable_total",
                "Requests answered 503 (stream unavailable).",
                &self.ingest_unavailable,
            ),
            count(
                "northstar_ingest_rate_limited_total",
                "Requests answered 429 (write key over its rate).",
                &self.ingest_rate_limited,
            ),
            count(
                "northstar_meter_events_applied_total",
                "Metered events applied to the meter's counters.",
                &self.meter_applied,
            ),
            count(
                "northstar_meter_events_late_total",
                "Metered events for a period older than the two the meter keeps.",
                &self.meter_late,
            ),
            count(
                "northstar_meter_events_skipped_total",
                "Metered events without a valid quantity (not counted).",
                &self.meter_skipped,
            ),
            count(
                "northstar_meter_anomalies_total",
                "Customers flagged for usage far above their own baseline.",
                &self.meter_anomalies,
            ),
            count(
                "northstar_panics_total",
                "Panics caught in followers and background tasks (/healthz names them).",
                &self.panics,
            ),
            count(
                "northstar_sql_queries_total",
                "SQL queries run.",
                &self.sql_queries,
            ),
            count(
                "northstar_sql_failures_total",
                "SQL queries that failed.",
                &self.sql_failures,
            ),
            self.responses(),
            self.durations(),
            gauge(
                "northstar_stream_last_seq",
                "Last sequence in the events stream.",
                &self.stream_last_seq,
            ),
            count(
                "northstar_ingest_shed_total",
                "Ingest requests shed (503 overloaded) because a reader of the stream was past its lag bound.",
                &self.ingest_shed,
            ),
            Family::gauge(
                "northstar_consumer_lag",
                "Events acked by ingest and not yet taken in, by reader.",
            )
            .labelled(&[("reader", "followers")], self.followers_lag.get())
            .labelled(&[("reader", "archive")], self.archive_lag.get()),
            count(
                "northstar_ingest_disk_full_total",
                "Ingest requests refused (503 disk_full) because a disk was below storage.minFreeMb.",
                &self.ingest_disk_full,
            ),
            gauge(
                "northstar_disk_free_bytes",
                "Least free space of the disks northstar writes to.",
                &self.disk_free_bytes,
            ),
            gauge(
                "northstar_disk_full",
                "1 while a disk is below storage.minFreeMb.",
                &self.disk_full,
            ),
            gauge(
                "northstar_stream_bytes",
                "Bytes the events stream holds.",
                &self.stream_bytes,
            ),
            gauge(
                "northstar_stream_messages",
                "Messages the events stream holds.",
                &self.stream_messages,
            ),
            gauge(
                "northstar_stream_first_seq",
                "First sequence the events stream still holds (retention drops older ones).",
                &self.stream_first_seq,
            ),
            gauge(
                "northstar_sql_queries_running",
                "SQL queries running now (a query given up stops at once).",
                &self.sql_running,
            ),
        ];
        families.extend(self.archive_families());
        let lag = self
            .stream_last_seq
            .get()
            .saturating_sub(self.archive_events.last_seq.get());
        families.push(
            Family::gauge(
                "northstar_stream_lag",
                "Events in the stream not yet committed to Parquet.",
            )
            .value(lag),
        );
        families
    }

    /// `northstar_http_responses_total{route,status}`.
    fn responses(&self) -> Family {
        let mut family = Family::counter(
            "northstar_http_responses_total",
            "HTTP answers by route family and status.",
        );
        for (row, route) in FAMILIES.iter().enumerate() {
            for column in 0..500 {
                let count = self.http.answers[row * 500 + column].load(Ordering::Relaxed);
                if count > 0 {
                    let status = (column + 100).to_string();
                    family = family.labelled(&[("route", route), ("status", &status)], count);
                }
            }
        }
        family
    }

    /// `northstar_http_request_duration_seconds{route}`, a histogram.
    fn durations(&self) -> Family {
        let mut family = Family::histogram(
            "northstar_http_request_duration_seconds",
            "Time from a request's headers to its answer, by route family.",
        );
        let width = DURATION_BUCKETS.len() + 1;
        for (row, route) in FAMILIES.iter().enumerate() {
            let counts: Vec<u64> = self.http.durations[row * width..(row + 1) * width]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let buckets = DURATION_BUCKETS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(counts)
                .collect();
            let micros = self.http.duration_micros[row].load(Ordering::Relaxed);
            family.samples.push(Sample {
                labels: vec![("route", (*route).to_string())],
                reading: Reading::Histogram {
                    sum: micros as f64 / 1e6,
                    count: total,
                    buckets,
                },
            });
        }
        family
    }

    /// The archive's families, one sample per table.
    fn archive_families(&self) -> Vec<Family> {
        type Read = fn(&ArchiveMetrics) -> Value;
        let lines: [(&str, Kind, &str, Read); 14] = [
            (
                "northstar_archive_rows_total",
                Kind::Counter,
                "Rows committed to Parquet.",
                |a| Value::Count(a.rows.get()),
            ),
            (
                "northstar_archive_commits_total",
                Kind::Counter,
                "Parquet commits.",
                |a| Value::Count(a.commits.get()),
            ),
            (
                "northstar_archive_files_total",
                Kind::Counter,
                "Parquet files written by commits.",
                |a| Value::Count(a.files.get()),
            ),
            (
                "northstar_archive_compactions_total",
                Kind::Counter,
                "Compactions of small files.",
                |a| Value::Count(a.compactions.get()),
            ),
            (
                "northstar_archive_undecodable_total",
                Kind::Counter,
                "Stream messages skipped as undecodable.",
                |a| Value::Count(a.undecodable.get()),
            ),
            (
                "northstar_archive_repositions_total",
                Kind::Counter,
                "Deliveries that skipped sequences still in the stream, repositioned.",
                |a| Value::Count(a.repositions.get()),
            ),
            (
                "northstar_archive_feed_gaps_total",
                Kind::Counter,
                "Times the followers' feed dropped messages and the archiver read them itself.",
                |a| Value::Count(a.feed_gaps.get()),
            ),
            (
                "northstar_archive_lost_total",
                Kind::Counter,
                "Stream messages gone (deleted, or dropped by retention) before the archiver read them.",
                |a| Value::Count(a.lost.get()),
            ),
            (
                "northstar_archive_failures_total",
                Kind::Counter,
                "Commits that failed (full disk, I/O error) and were retried from the manifest.",
                |a| Value::Count(a.failures.get()),
            ),
            (
                "northstar_archive_expired_partitions_total",
                Kind::Counter,
                "Day partitions dropped whole because they were past archive.retention.",
                |a| Value::Count(a.expired_days.get()),
            ),
            (
                "northstar_archive_last_seq",
                Kind::Gauge,
                "Last stream sequence committed to Parquet.",
                |a| Value::Count(a.last_seq.get()),
            ),
            (
                "northstar_archive_visible_seq",
                Kind::Gauge,
                "Last stream sequence SQL sees: committed, or in the write buffer SQL reads.",
                |a| Value::Count(a.visible_seq.get()),
            ),
            (
                "northstar_archive_commit_seconds_total",
                Kind::Counter,
                "Total time spent committing.",
                |a| Value::Real(a.commit_micros_sum.get() as f64 / 1e6),
            ),
            (
                "northstar_archive_commit_seconds_max",
                Kind::Gauge,
                "Longest commit.",
                |a| Value::Real(a.commit_micros_max.get() as f64 / 1e6),
            ),
        ];
        lines
            .into_iter()
            .map(|(name, kind, help, read)| {
                let mut family = Family::new(name, help, kind);
                for (table, archive) in [
                    ("events", &*self.archive_events),
                    ("rejected_events", &*self.archive_rejected),
                ] {
                    family = family.labelled(&[("table", table)], read(archive));
                }
                family
            })
            .collect()
    }

    /// This server's families in the Prometheus text format (what tests and tools read).
    pub fn render(&self) -> String {
        exposition(self.families(), Format::Prometheus)
    }
}

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted into buckets, with their sum.
    Histogram,
}

/// A sample's value: a whole count, or a quantity with a fraction (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A whole number, printed as one.
    Count(u64),
    /// A number with a fraction.
    Real(f64),
}

impl From<u64> for Value {
    fn from(count: u64) -> Self {
        Self::Count(count)
    }
}

impl From<usize> for Value {
    fn from(count: usize) -> Self {
        Self::Count(count as u64)
    }
}

/// What one sample holds.
#[derive(Debug, Clone)]
enum Reading {
    Value(Value),
    /// Non-cumulative bucket counts by upper bound (the last is `+Inf`), as the encoder
    /// sums them.
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

#[derive(Debug, Clone)]
struct Sample {
    labels: Vec<(&'static str, String)>,
    reading: Reading,
}

/// One metric family read at scrape time: its name as exposed (a counter's ends in
/// `_total`), its help, and its samples. Parts other than these atomics (the meter's sizes,
/// the billing outbox) hand theirs to the `/metrics` handler the same way.
#[derive(Debug, Clone)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, kind: Kind) -> Self {
        debug_assert_eq!(
            kind == Kind::Counter,
            name.ends_with("_total"),
            "{name}: a counter's name, and only a counter's, ends in _total"
        );
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// A counter; `name` ends in `_total`.
    pub fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, Kind::Counter)
    }

    /// A gauge.
    pub fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, Kind::Gauge)
    }

    fn histogram(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, Kind::Histogram)
    }

    /// Adds the family's one unlabelled sample.
    pub fn value(self, value: impl Into<Value>) -> Self {
        self.labelled(&[], value)
    }

    /// Adds a sample with labels.
    pub fn labelled(mut self, labels: &[(&'static str, &str)], value: impl Into<Value>) -> Self {
        self.samples.push(Sample {
            labels: labels
                .iter()
                .map(|(key, value)| (*key, (*value).to_string()))
                .collect(),
            reading: Reading::Value(value.into()),
        });
        self
    }
}

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4, the default (what `promtool check metrics` reads).
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it in `Accept`.
    OpenMetrics,
}

impl Format {
    /// The format a scraper's `Accept` header asks for: OpenMetrics when it names it with a
    /// weight above zero, else Prometheus text.
    pub fn from_accept(accept: Option<&str>) -> Self {
        let wants_openmetrics = accept.into_iter().flat_map(|a| a.split(',')).any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        });
        if wants_openmetrics {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Families read at one scrape, handed to the encoder as one collector.
#[derive(Debug)]
struct Scrape(Vec<Family>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for family in &self.0 {
            let (name, kind) = match family.kind {
                // The encoder appends `_total` to a counter's name.
                Kind::Counter => (
                    family.name.strip_suffix("_total").unwrap_or(family.name),
                    MetricType::Counter,
                ),
                Kind::Gauge => (family.name, MetricType::Gauge),
                Kind::Histogram => (family.name, MetricType::Histogram),
            };
            let mut metric = encoder.encode_descriptor(name, family.help, None, kind)?;
            for sample in &family.samples {
                let mut labelled = metric.encode_family(&sample.labels)?;
                match (&sample.reading, family.kind) {
                    (Reading::Value(Value::Count(n)), Kind::Counter) => {
                        labelled.encode_counter::<NoLabelSet, _, u64>(n, None)?;
                    }
                    (Reading::Value(Value::Real(x)), Kind::Counter) => {
                        labelled.encode_counter::<NoLabelSet, _, f64>(x, None)?;
                    }
                    (Reading::Value(Value::Count(n)), _) => labelled.encode_gauge(n)?,
                    (Reading::Value(Value::Real(x)), _) => labelled.encode_gauge(x)?,
                    (
                        Reading::Histogram {
                            sum,
                            count,
                            buckets,
                        },
                        _,
                    ) => labelled.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

/// The text of `families` in `format`, through the Prometheus project's own client library.
pub fn exposition(families: Vec<Family>, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(families)));
    let mut out = String::new();
    // Writing into a String cannot fail; a family the encoder refuses would show as a gap.
    let written = match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    if let Err(error) = written {
        tracing::error!(%error, "metrics: the exposition could not be written whole");
    }
    out
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

    /// Prometheus's own scrape `Accept` header gets OpenMetrics; anything else, or
    /// OpenMetrics refused with `q=0`, gets the Prometheus text format.
    #[test]
    fn openmetrics_is_served_only_to_scrapers_that_ask_for_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        let refused = "application/openmetrics-text; q=0, text/plain";
        assert_eq!(Format::from_accept(Some(refused)), Format::Prometheus);
    }

    /// The two formats carry the same samples; OpenMetrics names a counter family without
    /// `_total` (its samples keep it) and ends in `# EOF`.
    #[test]
    fn both_formats_carry_the_same_samples() {
        let metrics = Metrics::default();
        metrics.ingest_accepted.add(7);
        metrics.archive_events.commit_micros_sum.add(1_500_000);
        let families = metrics.families();
        let text = exposition(families.clone(), Format::Prometheus);
        let open = exposition(families, Format::OpenMetrics);
        assert!(text.contains("# TYPE northstar_ingest_events_accepted_total counter\n"));
        assert!(open.contains("# TYPE northstar_ingest_events_accepted counter\n"));
        for sample in [
            "northstar_ingest_events_accepted_total 7\n",
            "northstar_archive_commit_seconds_total{table=\"events\"} 1.5\n",
        ] {
            assert!(text.contains(sample), "{sample} in {text}");
            assert!(open.contains(sample), "{sample} in {open}");
        }
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(!text.contains("# EOF"));
    }
}
