//! `northstar serve`: the server, until a stop signal.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::{ConfigFile, DataDir};

#[derive(Args)]
pub(super) struct ServeArgs {
    #[command(flatten)]
    config: ConfigFile,
    #[command(flatten)]
    data: DataDir,
    /// HTTP listen address (loopback by default).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// External NATS server, or a cluster's servers comma separated; without it northstar runs
    /// its own nats-server.
    #[arg(long, env = "NORTHSTAR_NATS_URL")]
    nats_url: Option<String>,
    /// Also serve the Postgres wire here (`sql.pgListen` in the config), for psql, BI tools
    /// and drivers; log in with NORTHSTAR_ANALYST_KEY or NORTHSTAR_ADMIN_KEY as the password.
    #[arg(long)]
    pg_listen: Option<SocketAddr>,
    /// After start, send this many demo events and print what to try next.
    #[arg(long)]
    demo: Option<usize>,
    /// Directory of the windowed usage pipelines [default: ./pipelines if it exists, else
    /// the shipped usage_hourly and usage_daily].
    #[arg(long)]
    pipelines: Option<PathBuf>,
}

impl ServeArgs {
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let mut config = self.config.load()?;
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
        if let Some(addr) = self.pg_listen {
            config.sql.pg_listen = Some(addr);
        }
        let data = self.data.path;
        let listener = northstar::server::bind(self.listen).await?;
        let options = northstar::server::ServeOptions {
            config,
            data_dir: data.clone(),
            nats_url: self.nats_url,
            admin_key: std::env::var("NORTHSTAR_ADMIN_KEY").ok(),
            service_key: std::env::var("NORTHSTAR_SERVICE_KEY").ok(),
            analyst_key: std::env::var("NORTHSTAR_ANALYST_KEY").ok(),
            clock: northstar::clock::Clock::system(),
            pipelines_dir: self.pipelines,
            billing_secrets: northstar::billing::Secrets::from_env(),
        };
        let server = northstar::server::start(options, listener).await?;
        let base = format!("http://{}", server.addr);
        // The harness and scripts read these lines (the Postgres one first); a closed stdout
        // must not stop the server.
        if let Some(pg) = server.pg_addr {
            let _ = writeln!(
                std::io::stdout(),
                "Postgres wire on {pg}: psql \"postgresql://northstar@{pg}/northstar\" (password: the analyst or admin key)"
            );
        }
        let _ = writeln!(std::io::stdout(), "northstar listening on {base}");
        if let Some(count) = self.demo {
            let key = demo_key.context(
                "--demo needs a write key: set NORTHSTAR_WRITE_KEY or add one to the config",
            )?;
            print_demo(&base, &key, count, &data).await;
        }
        server
            .run_until(async {
                northstar::server::shutdown_signal().await;
                eprintln!("stopping: committing what is buffered…");
            })
            .await;
        Ok(())
    }
}

/// Sends the demo workload and prints what to try next.
async fn print_demo(base: &str, write_key: &str, count: usize, data: &Path) {
    let now = northstar::clock::system_micros();
    let keyed = ["NORTHSTAR_ADMIN_KEY", "NORTHSTAR_ANALYST_KEY"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|k| !k.is_empty()));
    let sign_in = if keyed {
        "sign in with the admin or an analyst key"
    } else {
        "to sign in, start with NORTHSTAR_ADMIN_KEY or NORTHSTAR_ANALYST_KEY set"
    };
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
                 Dashboard: {base}/dashboard ({sign_in})\n\n\
                 Stop with Ctrl-C (buffered events are committed first).",
                report.accepted,
                report.duplicates,
                data.display()
            );
        }
        Err(error) => eprintln!("demo workload failed: {error}"),
    }
}
