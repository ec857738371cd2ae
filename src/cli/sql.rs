//! `northstar sql`: one read-only statement over the data dir, no server needed.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{ConfigFile, DataDir};
use northstar::query::{Format, QueryEngine, output};

#[derive(Args)]
pub(super) struct SqlArgs {
    /// The statement, e.g. "SELECT event, count(*) FROM events GROUP BY event".
    #[arg(required_unless_present = "file")]
    query: Option<String>,
    /// Read the statement from a file instead (e.g. queries/top_events.sql).
    #[arg(long, conflicts_with = "query")]
    file: Option<PathBuf>,
    #[command(flatten)]
    data: DataDir,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    #[command(flatten)]
    config: ConfigFile,
}

impl SqlArgs {
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let query = match (self.query, self.file) {
            (Some(query), _) => query,
            (None, Some(file)) => std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?,
            (None, None) => anyhow::bail!("give a statement or --file"),
        };
        let config = self.config.load()?;
        let engine = QueryEngine::open(self.data.written()?, &config).await?;
        let result = engine.run(&query).await?;
        let bytes = output::render(&result, self.format)?;
        std::io::stdout().write_all(&bytes)?;
        if self.format == Format::Json || self.format == Format::Csv {
            eprintln!("{}", output::summary(&result));
        }
        Ok(())
    }
}
