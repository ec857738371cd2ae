//! `northstar bench`: our numbers next to a baseline measured in the same run, on the same
//! machine and the same nats-server, printed as a table with ratios.
//!
//! - [`ingest`]: HTTP batches → JetStream → Parquet, against raw async-nats publish + consume;
//! - [`limits`]: `/v1/check` latency and throughput against a bare hyper server, freshness,
//!   and the memory of a million counters;
//! - [`activation`]: a full activation recompute vs DuckDB running the same SQL;
//! - [`billing`]: meter events/s from the outbox to a local Stripe-speaking server, vs raw POSTs;
//! - [`sql`]: analyst queries on a warm server through `/v1/sql` vs DuckDB on the same files;
//! - [`soak`]: half the measured peak for minutes: memory, lag and disk over time.

pub(crate) mod activation;
pub(crate) mod billing;
pub(crate) mod ingest;
pub(crate) mod limits;
pub(crate) mod report;
pub(crate) mod soak;
pub(crate) mod sql;

use clap::Subcommand;

/// The benchmark suites.
#[derive(Debug, Subcommand)]
pub(crate) enum Suite {
    /// End-to-end ingest: events/s acked over HTTP and landed in Parquet, vs raw JetStream.
    Ingest(ingest::IngestBench),
    /// The limits API: check latency and throughput vs a bare hyper server; freshness; memory.
    Limits(limits::LimitsBench),
    /// A full activation recompute over a large history, vs DuckDB running the same SQL.
    Activation(activation::ActivationBench),
    /// Meter events/s delivered from the outbox to a local server speaking Stripe's API.
    Billing(billing::BillingBench),
    /// Half the measured peak for `--minutes`: RSS, each reader's lag, stream and Parquet disk.
    Soak(soak::SoakBench),
    /// Analyst queries on a warm server through `/v1/sql`, vs DuckDB on the same files.
    Sql(sql::SqlBench),
    /// The bare hyper server of `bench limits` (run as its own process, like northstar).
    #[command(hide = true)]
    BareServer,
}

/// Runs a suite and prints its table.
pub(crate) async fn run(suite: Suite) -> anyhow::Result<()> {
    match suite {
        Suite::Ingest(options) => ingest::run(options).await,
        Suite::Limits(options) => limits::run(options).await,
        Suite::BareServer => limits::bare_server().await,
        Suite::Activation(options) => activation::run(options).await,
        Suite::Billing(options) => billing::run(options).await,
        Suite::Soak(options) => soak::run(options).await,
        Suite::Sql(options) => sql::run(options).await,
    }
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
pub(crate) fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
