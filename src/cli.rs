//! `northstar`'s command line: the argument structs, and each subcommand as a function of the
//! library. `main.rs` only parses, sets up logging and the runtime, and turns the answer into an
//! exit code.
//!
//! Every command prints its result on stdout through [`say!`], which returns a closed pipe as
//! an error instead of panicking (`northstar sql … | head` ends quietly), and says failure by
//! returning [`ExitCode::FAILURE`] or an error: none calls `process::exit`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use northstar::config::Config;

/// `println!` that returns the write's error instead of panicking on a closed stdout.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

/// `print!` that returns the write's error instead of panicking on a closed stdout.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($arg)*)?
    }};
}

mod aha;
mod billing;
mod demo;
mod remote;
mod replay;
mod schema;
mod serve;
mod sql;

/// The whole command line.
#[derive(Parser)]
#[command(
    name = "northstar",
    version,
    about = "Product-led-growth event pipeline: HTTP → NATS JetStream → Parquet → SQL"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: ingest API, archiver, SQL API (embedded nats-server unless --nats-url).
    Serve(serve::ServeArgs),
    /// Rebuild derived state (meter, identities, billing windows, onboarding facts): sets it
    /// aside, and the next `serve` rebuilds it from Parquet for the history the stream no
    /// longer holds, then from the stream. Run it with the server stopped.
    Replay(replay::ReplayArgs),
    /// Run one read-only SQL statement over the data dir (no server needed).
    Sql(sql::SqlArgs),
    /// The schema registry in CI: check event files, generate types, diff versions.
    Schema {
        #[command(subcommand)]
        command: schema::SchemaCommand,
    },
    /// The rejected store: re-submit rejected messages after a schema fix.
    Rejected {
        #[command(subcommand)]
        command: remote::RejectedCommand,
    },
    /// The billing sink: what is owed, delivered and dead; reconcile with Stripe.
    Billing {
        #[command(subcommand)]
        command: billing::BillingCommand,
    },
    /// Activation ("aha") analysis: which "at least x times within y days" of the North Star
    /// event best predicts retention. Prints the top candidates, writes a picture, stores a version.
    Aha(aha::AhaArgs),
    /// Backfill a JSON-lines file (.jsonl or .jsonl.gz) of Segment- or PostHog-shaped events
    /// through a running server's ingest (same validation and dedup as live events).
    Import(remote::ImportArgs),
    /// Pricing what-ifs: replay a period's usage through draft usageFeatures on a running
    /// server; per customer and feature, the bill and the 402s and suspensions, now and with
    /// the draft.
    Simulate(remote::SimulateArgs),
    /// Demo data.
    Demo {
        #[command(subcommand)]
        command: demo::DemoCommand,
    },
    /// Usage tools: `verify` proves meter = SQL over events = usage windows.
    Usage {
        #[command(subcommand)]
        command: remote::UsageCommand,
    },
    /// Benchmarks, each next to a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        suite: crate::bench::Suite,
    },
}

/// Runs the parsed command. `Ok(FAILURE)` is a verdict the command reached (a dead letter, a
/// schema violation, a difference with Stripe); `Err` is a command that could not do its work.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => args.run().await.map(done),
        Command::Replay(args) => args.run().map(done),
        Command::Sql(args) => args.run().await.map(done),
        Command::Schema { command } => command.run(),
        Command::Rejected { command } => command.run().await.map(done),
        Command::Billing { command } => command.run().await,
        Command::Aha(args) => args.run().await.map(done),
        Command::Import(args) => args.run().await.map(done),
        Command::Simulate(args) => args.run().await.map(done),
        Command::Demo { command } => command.run().map(done),
        Command::Usage { command } => command.run().await.map(done),
        Command::Bench { suite } => crate::bench::run(suite).await.map(done),
    }
}

fn done((): ()) -> ExitCode {
    ExitCode::SUCCESS
}

/// The exit code of a verdict: success when `ok`.
fn verdict(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// An error and its causes on one line, each cause once: many of our errors already say
/// their cause in their own message, which a plain chain would repeat.
pub(crate) fn report(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Whether `error` comes from writing to a pipe whose reader has closed it: that ends a
/// command, as it does any Unix tool's, and is not a failure.
pub(crate) fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Logs on stderr: `RUST_LOG` filters, `NORTHSTAR_LOG_FORMAT=json` for machines, colour only
/// for a person at a terminal who has not asked for none (`NO_COLOR`): files and pipes get
/// plain text.
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,async_nats=warn,datafusion=warn")
    });
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if std::env::var("NORTHSTAR_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// How a report (the aha analysis, billing status) is printed: a table for people, JSON for
/// programs. Its rows are not one SQL answer, so the SQL formats (CSV, Arrow) do not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    /// Text for people.
    Table,
    /// JSON for programs.
    Json,
}

/// What a report command reads and how it prints: the data dir, the config, the format.
#[derive(Args)]
struct ReportArgs {
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    config: ConfigFile,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ReportFormat,
}

/// The data dir a command reads or writes.
#[derive(Args)]
struct DataDir {
    /// Data dir: Parquet tables, manifests, derived state, the embedded JetStream store.
    #[arg(id = "data", long = "data", default_value = "data")]
    path: PathBuf,
}

impl DataDir {
    /// The data dir, for a command that reads what a server wrote there: one that does not
    /// exist, or holds none of northstar's tables, is an error, not an empty answer.
    fn written(&self) -> anyhow::Result<&std::path::Path> {
        let path = self.path.as_path();
        if !path.is_dir() {
            anyhow::bail!(
                "data dir {} does not exist: give --data the directory `northstar serve --data` writes to",
                path.display()
            );
        }
        if !northstar::catalog::ALL
            .iter()
            .any(|table| path.join(table.dir).is_dir())
        {
            let tables: Vec<String> = northstar::catalog::ALL
                .iter()
                .map(|table| format!("{}/", table.dir))
                .collect();
            anyhow::bail!(
                "data dir {} holds none of northstar's tables ({}): is it the directory `northstar serve --data` writes to?",
                path.display(),
                tables.join(", ")
            );
        }
        Ok(path)
    }
}

const DEFAULT_CONFIG: &str = "schemas/northstar.json";

/// The config file a command reads.
#[derive(Args)]
struct ConfigFile {
    /// Config file (the seed's template is a valid one).
    #[arg(id = "config", long = "config", default_value = DEFAULT_CONFIG)]
    path: PathBuf,
}

impl ConfigFile {
    /// Loads the config, or the defaults when the default path does not exist (a fresh
    /// checkout run from elsewhere); a path the user gave must exist.
    fn load(&self) -> anyhow::Result<Config> {
        load_config(&self.path)
    }
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    if !path.exists() && path == Path::new(DEFAULT_CONFIG) {
        tracing::warn!("{} not found; using built-in defaults", path.display());
        return Ok(Config::default());
    }
    Ok(Config::load(path)?)
}

/// A running server that a command asks with the admin key.
#[derive(Args)]
struct AdminServer {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    url: String,
    /// Admin key.
    #[arg(long, env = "NORTHSTAR_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// clap checks the definitions (duplicate ids, conflicting flags) only when they are
    /// used: this checks every subcommand at once.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
