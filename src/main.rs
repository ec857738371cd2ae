//! The `northstar` binary: parses the command line, loads config, sets up logging, and calls
//! into the library.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use northstar::config::Config;
use northstar::query::{Format, QueryEngine, output};

#[derive(Parser)]
#[command(
    name = "northstar",
    version,
    about = "Product-led-growth event pipeline: HTTP → NATS JetStream → Parquet → SQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: ingest API, archiver, SQL API (embedded nats-server unless --nats-url).
    Serve {
        /// Config file (the seed's template is a valid one).
        #[arg(long, default_value = "schemas/northstar.json")]
        config: PathBuf,
        /// Data dir: Parquet tables, manifests, the embedded JetStream store.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// HTTP listen address (loopback by default).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// External NATS server or cluster; without it northstar runs its own nats-server.
        #[arg(long, env = "NORTHSTAR_NATS_URL")]
        nats_url: Option<String>,
        /// After start, send this many demo events and print what to try next.
        #[arg(long)]
        demo: Option<usize>,
        /// Directory of the windowed usage pipelines [default: ./pipelines if it exists, else
        /// the shipped usage_hourly and usage_daily].
        #[arg(long)]
        pipelines: Option<PathBuf>,
    },
    /// Rebuild derived state (meter, identities, billing windows, onboarding facts): sets it
    /// aside, and the next `serve` rebuilds it from Parquet for the history the stream no
    /// longer holds, then from the stream. Run it with the server stopped.
    Replay {
        /// Data dir whose derived state to rebuild.
        #[arg(long, default_value = "data")]
        data: PathBuf,
    },
    /// Run one read-only SQL statement over the data dir (no server needed).
    Sql {
        /// The statement, e.g. "SELECT event, count(*) FROM events GROUP BY event".
        #[arg(required_unless_present = "file")]
        query: Option<String>,
        /// Read the statement from a file instead (e.g. queries/top_events.sql).
        #[arg(long, conflicts_with = "query")]
        file: Option<PathBuf>,
        /// Data dir to read.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Config file (for SQL limits).
        #[arg(long, default_value = "schemas/northstar.json")]
        config: PathBuf,
    },
    /// The schema registry in CI: check event files, generate types, diff versions.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
    /// The rejected store: re-submit rejected messages after a schema fix.
    Rejected {
        #[command(subcommand)]
        command: RejectedCommand,
    },
    /// The billing sink: what is owed, delivered and dead; reconcile with Stripe.
    Billing {
        #[command(subcommand)]
        command: BillingCommand,
    },
    /// Activation ("aha") analysis: which "at least x times within y days" of the North Star
    /// event best predicts retention. Prints the top candidates, writes a picture, stores a version.
    Aha {
        /// Data dir to read (no server needed).
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Config file.
        #[arg(long, default_value = "schemas/northstar.json")]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
        /// Judge the cohort against this time (RFC 3339) instead of the last event's.
        #[arg(long)]
        as_of: Option<String>,
        /// Candidates to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Backfill a JSON-lines file (.jsonl or .jsonl.gz) of Segment- or PostHog-shaped events
    /// through a running server's ingest (same validation and dedup as live events).
    Import {
        /// The file.
        file: PathBuf,
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:7070")]
        url: String,
        /// A write key of the source the history belongs to.
        #[arg(long, env = "NORTHSTAR_WRITE_KEY", hide_env_values = true)]
        write_key: String,
    },
    /// Demo data.
    Demo {
        #[command(subcommand)]
        command: DemoCommand,
    },
    /// Usage tools: `verify` proves meter = SQL over events = usage windows.
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
    /// Benchmarks, each next to a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        suite: northstar::bench::Suite,
    },
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Write a synthetic product history with a planted activation threshold (users who do the
    /// North Star event at least x0 times within y0 days retain far better), anonymous
    /// pre-signup activity and identity merges, as Segment JSON lines.
    Generate {
        /// Output file (.jsonl).
        #[arg(long, default_value = "demo-history.jsonl")]
        out: PathBuf,
        /// Users.
        #[arg(long, default_value_t = 2_000)]
        users: usize,
        /// The planted x0.
        #[arg(long, default_value_t = 3)]
        times: u32,
        /// The planted y0.
        #[arg(long, default_value_t = 7)]
        days: u32,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Check a JSON-lines file of Segment or PostHog events (.jsonl or .jsonl.gz) against the
    /// registry; prints every violation with its line and exits 1 if there is any.
    Check {
        /// The file.
        file: PathBuf,
        /// Config file (the registry).
        #[arg(long, default_value = "schemas/northstar.json")]
        config: PathBuf,
    },
    /// Print types for every planned event.
    Codegen {
        /// Target language.
        #[arg(long, value_enum, default_value = "typescript")]
        lang: northstar::schema::tools::Lang,
        /// Config file (the registry).
        #[arg(long, default_value = "schemas/northstar.json")]
        config: PathBuf,
    },
    /// Compare two configs' event schemas; exits 1 if a breaking change lacks a MODEL bump (or
    /// any change lacks a version bump).
    Diff {
        /// The old config.
        old: PathBuf,
        /// The new config.
        new: PathBuf,
    },
}

#[derive(Subcommand)]
enum BillingCommand {
    /// The outbox on disk: totals per customer and meter, pending reports, dead letters
    /// (exits 1 if there are dead letters). No server needed.
    Status {
        /// Data dir.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Config file.
        #[arg(long, default_value = "schemas/northstar.json")]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
    /// Compare what northstar delivered with Stripe's meter event summaries (needs
    /// STRIPE_SECRET_KEY); exits 1 on any difference.
    Reconcile {
        /// Data dir.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Config file (the `billing` section).
        #[arg(long, default_value = "schemas/northstar.json")]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
}

#[derive(Subcommand)]
enum RejectedCommand {
    /// Re-submit rejected messages through today's validation (as their original source).
    Replay {
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:7070")]
        url: String,
        /// Admin key.
        #[arg(long, env = "NORTHSTAR_ADMIN_KEY", hide_env_values = true)]
        admin_key: String,
        /// Only messages received since (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only messages of this source.
        #[arg(long)]
        source: Option<String>,
    },
}

#[derive(Subcommand)]
enum UsageCommand {
    /// Ask a running server to compare its meter with SQL over events and the usage windows
    /// (exit 1 on any difference).
    Verify {
        /// The server.
        #[arg(long, default_value = "http://127.0.0.1:7070")]
        url: String,
        /// Admin key.
        #[arg(long, env = "NORTHSTAR_ADMIN_KEY", hide_env_values = true)]
        admin_key: String,
    },
}

fn main() -> std::process::ExitCode {
    northstar::heap::bound_arenas();
    init_logging();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output went away (`northstar sql … | head`): that ends the
        // command, as it does any Unix tool's, and is not a failure.
        Err(error) if is_broken_pipe(&error) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", report(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many of our errors already say
/// their cause in their own message, which a plain chain would repeat.
fn report(error: &anyhow::Error) -> String {
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

/// Whether `error` comes from writing to a pipe whose reader has closed it.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

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

/// How a report (the aha analysis, billing status) is printed: a table for people, JSON for
/// programs. Its rows are not one SQL answer, so the SQL formats (CSV, Arrow) do not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    /// Text for people.
    Table,
    /// JSON for programs.
    Json,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,async_nats=warn,datafusion=warn")
    });
    // Colour only for a person at a terminal who has not asked for none (NO_COLOR): log
    // files and pipes get plain text.
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

/// Loads the config, or the defaults when the default path does not exist.
fn load_config(path: &PathBuf) -> anyhow::Result<Config> {
    if !path.exists() && path == &PathBuf::from("schemas/northstar.json") {
        tracing::warn!("{} not found; using built-in defaults", path.display());
        return Ok(Config::default());
    }
    Ok(Config::load(path)?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            data,
            listen,
            nats_url,
            demo,
            pipelines,
        } => {
            let mut config = load_config(&config)?;
            let write_key = std::env::var("NORTHSTAR_WRITE_KEY")
                .ok()
                .filter(|k| !k.is_empty());
            if let Some(key) = &write_key {
                config.add_default_write_key(key);
            }
            let demo_key = write_key.or_else(|| {
                config
                    .sources
                    .iter()
                    .flat_map(|s| s.write_keys.first())
                    .next()
                    .cloned()
            });
            let options = northstar::server::ServeOptions {
                config,
                data_dir: data.clone(),
                listen,
                nats_url,
                admin_key: std::env::var("NORTHSTAR_ADMIN_KEY").ok(),
                service_key: std::env::var("NORTHSTAR_SERVICE_KEY").ok(),
                clock: northstar::clock::Clock::system(),
                pipelines_dir: pipelines,
                billing_secrets: northstar::billing::Secrets::from_env(),
            };
            let server = northstar::server::start(options).await?;
            let base = format!("http://{}", server.addr);
            // The harness and scripts read this line; a closed stdout must not stop the server.
            let _ = writeln!(std::io::stdout(), "northstar listening on {base}");
            if let Some(count) = demo {
                let key = demo_key.context(
                    "--demo needs a write key: set NORTHSTAR_WRITE_KEY or add one to the config",
                )?;
                print_demo(&base, &key, count, &data).await;
            }
            northstar::server::shutdown_signal().await;
            eprintln!("stopping: committing what is buffered…");
            server.stop().await;
            Ok(())
        }
        Command::Replay { data } => {
            let Some(_lock) = northstar::files::lock_dir(&data)
                .with_context(|| format!("locking data dir {}", data.display()))?
            else {
                anyhow::bail!(
                    "a northstar server is running on {}: stop it first, then run replay",
                    data.display()
                );
            };
            let stamp = northstar::clock::format_micros(northstar::clock::system_micros())
                .replace(':', "-");
            let moved = northstar::replay::set_aside(&data, &stamp)
                .with_context(|| format!("setting derived state aside in {}", data.display()))?;
            if moved.is_empty() {
                say!(
                    "no derived state in {}: the next start builds it anyway",
                    data.display()
                );
            }
            for (from, to) in &moved {
                say!("set aside {} -> {}", from.display(), to.display());
            }
            say!(
                "the next `northstar serve --data {}` rebuilds it: from Parquet for what the stream no longer holds, then from the stream (`/healthz` answers 503 until the meter has caught up)",
                data.display()
            );
            Ok(())
        }
        Command::Sql {
            query,
            file,
            data,
            format,
            config,
        } => {
            let query = match (query, file) {
                (Some(query), _) => query,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?,
                (None, None) => anyhow::bail!("give a statement or --file"),
            };
            let config = load_config(&config)?;
            let engine = QueryEngine::open(&data, &config).await?;
            let result = engine.run(&query).await?;
            let bytes = output::render(&result, format)?;
            std::io::stdout().write_all(&bytes)?;
            if format == Format::Json || format == Format::Csv {
                eprintln!("{}", output::summary(&result));
            }
            Ok(())
        }
        Command::Bench { suite } => northstar::bench::run(suite).await,
        Command::Schema { command } => run_schema(command),
        Command::Aha {
            data,
            config,
            format,
            as_of,
            top,
        } => {
            let config = load_config(&config)?;
            let as_of = match as_of {
                Some(text) => Some(
                    chrono::DateTime::parse_from_rfc3339(&text)
                        .with_context(|| format!("--as-of {text}"))?
                        .timestamp_micros(),
                ),
                None => None,
            };
            let engine = QueryEngine::open(&data, &config).await?;
            let question = northstar::activation::Question::from_config(&config);
            let store = northstar::activation::ActivationStore::open(&data);
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            let progress = |step: &str| bar.set_message(step.to_string());
            let result = northstar::activation::recompute(
                &engine,
                &question,
                &store,
                as_of,
                northstar::clock::system_micros(),
                &progress,
            )
            .await;
            bar.finish_and_clear();
            let (analysis, version) = result?;
            match format {
                ReportFormat::Json => say!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"version": version, "analysis": analysis})
                    )?
                ),
                ReportFormat::Table => {
                    say_raw!("{}", northstar::activation::analysis::table(&analysis, top));
                    say!("picture: {}", store.picture(version.version).display());
                }
            }
            Ok(())
        }
        Command::Import {
            file,
            url,
            write_key,
        } => {
            let report = northstar::ingest::import::run(&file, &url, &write_key)
                .await
                .map_err(anyhow::Error::msg)?;
            say!(
                "{} lines: {} stored, {} already stored, {} rejected, {} sampled out",
                report.lines,
                report.accepted,
                report.duplicates,
                report.rejected,
                report.sampled_out
            );
            Ok(())
        }
        Command::Demo {
            command:
                DemoCommand::Generate {
                    out,
                    users,
                    times,
                    days,
                    seed,
                },
        } => {
            use northstar::activation::generate::{HistorySpec, generate};
            let spec = HistorySpec {
                users,
                seed,
                planted_times: times,
                planted_days: days,
                ..HistorySpec::ending_at(northstar::clock::system_micros())
            };
            let mut text = String::new();
            for message in generate(&spec) {
                text.push_str(&message.to_string());
                text.push('\n');
            }
            std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
            say!(
                "wrote {} ({users} users, planted: at least {times} times within {days} days)",
                out.display()
            );
            Ok(())
        }
        Command::Billing { command } => {
            let ok = match command {
                BillingCommand::Status {
                    data,
                    config,
                    format,
                } => northstar::billing::cli::status(
                    &load_config(&config)?,
                    &data,
                    format == ReportFormat::Json,
                )?,
                BillingCommand::Reconcile {
                    data,
                    config,
                    format,
                } => {
                    northstar::billing::cli::reconcile_command(
                        &load_config(&config)?,
                        &data,
                        format == ReportFormat::Json,
                    )
                    .await?
                }
            };
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Rejected {
            command:
                RejectedCommand::Replay {
                    url,
                    admin_key,
                    since,
                    source,
                },
        } => {
            let client = northstar::client::HttpClient::new();
            let bearer = format!("Bearer {admin_key}");
            let body = serde_json::json!({"since": since, "source": source});
            let response = client
                .post_json(
                    &format!("{url}/v1/rejected/replay"),
                    &[("authorization", &bearer)],
                    &body,
                )
                .await?;
            say!("{}", serde_json::to_string_pretty(&response.json())?);
            anyhow::ensure!(
                response.status == 200,
                "replay failed with status {}",
                response.status
            );
            Ok(())
        }
        Command::Usage {
            command: UsageCommand::Verify { url, admin_key },
        } => {
            let client = northstar::client::HttpClient::new();
            let bearer = format!("Bearer {admin_key}");
            let response = client
                .send(
                    http::Method::POST,
                    &format!("{url}/v1/usage/verify"),
                    &[("authorization", &bearer)],
                    Vec::new(),
                )
                .await?;
            let report = response.json();
            say!("{}", serde_json::to_string_pretty(&report)?);
            if response.status != 200 || report["ok"] != serde_json::Value::Bool(true) {
                anyhow::bail!("usage verification failed");
            }
            Ok(())
        }
    }
}

/// `northstar schema …`: exit codes are the interface for users' CI.
fn run_schema(command: SchemaCommand) -> anyhow::Result<()> {
    use northstar::schema::tools;
    match command {
        SchemaCommand::Check { file, config } => {
            let config = load_config(&config)?;
            let schema_dir = PathBuf::from(&config.registry.schema_dir);
            let registry = northstar::schema::Registry::load(&config, Some(&schema_dir))?;
            let (lines, violations) = tools::check(&registry, &file)
                .with_context(|| format!("reading {}", file.display()))?;
            for v in &violations {
                say!("{}:{}: {}: {}", file.display(), v.line, v.field, v.message);
            }
            let bad: std::collections::BTreeSet<usize> =
                violations.iter().map(|v| v.line).collect();
            eprintln!("{} of {lines} lines have violations", bad.len());
            if !violations.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        SchemaCommand::Codegen { lang, config } => {
            say_raw!("{}", tools::codegen(&load_config(&config)?, lang));
            Ok(())
        }
        SchemaCommand::Diff { old, new } => {
            let (old, new) = (Config::load(&old)?, Config::load(&new)?);
            let (changes, problems) = tools::diff(&old, &new);
            for change in &changes {
                let impact = match change.impact {
                    tools::Impact::Breaking => "BREAKING",
                    tools::Impact::Addition => "addition",
                };
                say!("{impact:9} {}: {}", change.event, change.message);
            }
            for problem in &problems {
                say!("VERSION   {problem}");
            }
            if changes.is_empty() {
                say!("no changes");
            }
            if !problems.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Sends the demo workload and prints what to try next.
async fn print_demo(base: &str, write_key: &str, count: usize, data: &std::path::Path) {
    let now = northstar::clock::system_micros();
    match northstar::demo::send_demo(base, write_key, count, now).await {
        Ok(report) => {
            let exe = std::env::args()
                .next()
                .unwrap_or_else(|| "northstar".into());
            // A server whose stdout is gone goes on serving: this print is a courtesy.
            let _ = writeln!(
                std::io::stdout(),
                "\nDemo: {} events stored ({} already there from an earlier run).\n\n\
                 Write key: {write_key}\n\n\
                 Send an event:\n  curl -s -u '{write_key}:' {base}/v1/track -H 'content-type: application/json' \\\n    \
                 -d '{{\"userId\":\"u1\",\"event\":\"api_call_made\",\"properties\":{{\"endpoint\":\"/v1/search\"}}}}'\n\n\
                 Query it (events are in Parquet within a few seconds):\n  \
                 {exe} sql --data {} \"SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY n DESC\"\n\n\
                 Stop with Ctrl-C (buffered events are committed first).",
                report.accepted,
                report.duplicates,
                data.display()
            );
        }
        Err(error) => eprintln!("demo workload failed: {error}"),
    }
}
