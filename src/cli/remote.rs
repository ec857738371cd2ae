//! Commands that ask a running server over HTTP: `import`, `rejected replay`, `usage verify`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::AdminServer;
use northstar::client::HttpClient;

#[derive(Args)]
pub(super) struct ImportArgs {
    /// JSON-lines file of Segment or PostHog messages (.jsonl or .jsonl.gz).
    file: PathBuf,
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    url: String,
    /// A write key of the source the history belongs to.
    #[arg(long, env = "NORTHSTAR_WRITE_KEY", hide_env_values = true)]
    write_key: String,
}

impl ImportArgs {
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let report = northstar::ingest::import::run(&self.file, &self.url, &self.write_key)
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
}

#[derive(Subcommand)]
pub(super) enum RejectedCommand {
    /// Re-submit rejected messages through today's validation (as their original source).
    Replay {
        #[command(flatten)]
        server: AdminServer,
        /// Only messages received since (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only messages of this source.
        #[arg(long)]
        source: Option<String>,
    },
}

impl RejectedCommand {
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let RejectedCommand::Replay {
            server,
            since,
            source,
        } = self;
        let body = serde_json::to_vec(&json!({"since": since, "source": source}))?;
        let (status, answer) = server.post("/v1/rejected/replay", body).await?;
        say!("{}", serde_json::to_string_pretty(&answer)?);
        anyhow::ensure!(status == 200, "replay failed with status {status}");
        Ok(())
    }
}

#[derive(Subcommand)]
pub(super) enum UsageCommand {
    /// Ask a running server to compare its meter with SQL over events and the usage windows
    /// (exit 1 on any difference).
    Verify {
        #[command(flatten)]
        server: AdminServer,
    },
}

impl UsageCommand {
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let UsageCommand::Verify { server } = self;
        let (status, report) = server.post("/v1/usage/verify", Vec::new()).await?;
        say!("{}", serde_json::to_string_pretty(&report)?);
        if status != 200 || report["ok"] != Value::Bool(true) {
            anyhow::bail!("usage verification failed");
        }
        Ok(())
    }
}

#[derive(Args)]
pub(super) struct SimulateArgs {
    /// A JSON file: `{"usageFeatures": […], "from": "…", "to": "…"}` (features in the
    /// config's shape; the period as RFC 3339 times).
    draft: PathBuf,
    #[command(flatten)]
    server: AdminServer,
    /// Print the server's JSON answer instead of the table.
    #[arg(long)]
    json: bool,
}

impl SimulateArgs {
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let body = std::fs::read(&self.draft)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", self.draft.display()))?;
        let (status, answer) = self.server.post("/v1/simulate", body).await?;
        if status != 200 {
            anyhow::bail!(
                "the simulation was refused ({status}): {}",
                answer["message"].as_str().unwrap_or_default()
            );
        }
        if self.json {
            say!("{}", serde_json::to_string_pretty(&answer)?);
            return Ok(());
        }
        let text = |v: &Value| match v {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        say!("usage {} .. {}", text(&answer["from"]), text(&answer["to"]));
        say!(
            "{:<20} {:<16} {:<10} {:>12}  {:>10} {:>10}  {:<24} {:<24} {:<24}",
            "customer",
            "feature",
            "plan",
            "used",
            "bill now",
            "bill draft",
            "402 now",
            "402 draft",
            "suspended draft"
        );
        for line in answer["lines"].as_array().into_iter().flatten() {
            say!(
                "{:<20} {:<16} {:<10} {:>12}  {:>10} {:>10}  {:<24} {:<24} {:<24}",
                text(&line["customer_id"]),
                text(&line["feature"]),
                text(&line["plan"]),
                text(&line["used"]),
                text(&line["today"]["bill"]),
                text(&line["draft"]["bill"]),
                text(&line["today"]["limit_reached_at"]),
                text(&line["draft"]["limit_reached_at"]),
                text(&line["draft"]["suspended_at"]),
            );
        }
        let totals = &answer["totals"];
        say!(
            "total: {} lines; bill {} now, {} with the draft; 402 for {} now, {} with the draft; suspended {} now, {} with the draft",
            text(&totals["lines"]),
            text(&totals["bill_today"]),
            text(&totals["bill_draft"]),
            text(&totals["limit_reached_today"]),
            text(&totals["limit_reached_draft"]),
            text(&totals["suspended_today"]),
            text(&totals["suspended_draft"]),
        );
        Ok(())
    }
}

impl AdminServer {
    /// POSTs `body` (JSON, or nothing) to `path` with the admin key; the status and the JSON
    /// answer.
    async fn post(&self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
        let bearer = format!("Bearer {}", self.admin_key);
        let mut headers = vec![("authorization", bearer.as_str())];
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        let response = HttpClient::new()
            .send(
                http::Method::POST,
                &format!("{}{path}", self.url),
                &headers,
                body,
            )
            .await?;
        Ok((response.status, response.json()))
    }
}
