//! `northstar aha`: recomputes the activation analysis from the data dir and prints it.

use anyhow::Context;
use clap::Args;

use super::{ReportArgs, ReportFormat};
use northstar::activation::{ActivationStore, Question, analysis};
use northstar::query::QueryEngine;

#[derive(Args)]
pub(super) struct AhaArgs {
    #[command(flatten)]
    report: ReportArgs,
    /// Judge the cohort against this time (RFC 3339) instead of the last event's.
    #[arg(long)]
    as_of: Option<String>,
    /// Candidates to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
}

impl AhaArgs {
    pub(super) async fn run(self) -> anyhow::Result<()> {
        let config = self.report.config.load()?;
        let as_of = match &self.as_of {
            Some(text) => Some(
                chrono::DateTime::parse_from_rfc3339(text)
                    .with_context(|| format!("--as-of {text}"))?
                    .timestamp_micros(),
            ),
            None => None,
        };
        let engine = QueryEngine::open(self.report.data.written()?, &config).await?;
        let question = Question::from_config(&config);
        let store = ActivationStore::open(&self.report.data.path);
        // The analysis reads every event: a spinner names the step it is on.
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
        match self.report.format {
            ReportFormat::Json => say!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"version": version, "analysis": analysis})
                )?
            ),
            ReportFormat::Table => {
                say_raw!("{}", analysis::table(&analysis, self.top));
                say!("picture: {}", store.picture(version.version).display());
            }
        }
        Ok(())
    }
}
