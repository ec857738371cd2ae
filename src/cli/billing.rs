//! `northstar billing status|reconcile`: read the outbox on disk, no server needed.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::{ReportArgs, ReportFormat, verdict};
use northstar::billing::outbox::Outbox;
use northstar::billing::reconcile::reconcile;
use northstar::billing::stripe::Stripe;
use northstar::billing::{Secrets, status_of};
use northstar::config::{BillingProvider, Config};

#[derive(Subcommand)]
pub(super) enum BillingCommand {
    /// The outbox on disk: totals per customer and meter, pending reports, dead letters
    /// (exits 1 if there are dead letters). No server needed.
    Status(ReportArgs),
    /// Compare what northstar delivered with Stripe's meter event summaries (needs
    /// STRIPE_SECRET_KEY); exits 1 on any difference.
    Reconcile(ReportArgs),
}

impl BillingCommand {
    pub(super) async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            BillingCommand::Status(args) => {
                status(&args.config.load()?, &args.data.path, args.format)
            }
            BillingCommand::Reconcile(args) => {
                reconcile_with_stripe(&args.config.load()?, &args.data.path, args.format).await
            }
        }
    }
}

fn open_outbox(data: &Path) -> anyhow::Result<Outbox> {
    Outbox::open(&data.join("billing"))
        .with_context(|| format!("reading the billing outbox under {}", data.display()))
}

/// Prints the outbox's standing; fails if there are dead letters.
fn status(config: &Config, data: &Path, format: ReportFormat) -> anyhow::Result<ExitCode> {
    let provider = config
        .billing
        .as_ref()
        .map_or(BillingProvider::Stripe, |b| b.provider);
    let status = status_of(&open_outbox(data)?, provider);
    let dead = status["dead"].as_array().map_or(0, Vec::len);
    if format == ReportFormat::Json {
        say!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(verdict(dead == 0));
    }
    say!(
        "provider {}: {} delivered, {} pending, {dead} dead",
        status["provider"].as_str().unwrap_or("?"),
        status["delivered"],
        status["pending"]
    );
    say!(
        "{:<24} {:<16} {:>12} {:>12}",
        "customer",
        "feature",
        "owed",
        "delivered"
    );
    for total in status["totals"].as_array().into_iter().flatten() {
        say!(
            "{:<24} {:<16} {:>12} {:>12}",
            total["customer_id"].as_str().unwrap_or_default(),
            total["feature"].as_str().unwrap_or_default(),
            total["owed"],
            total["delivered"]
        );
    }
    for letter in status["dead"].as_array().into_iter().flatten() {
        say!(
            "DEAD {} (value {}): HTTP {} {}",
            letter["identifier"].as_str().unwrap_or_default(),
            letter["value"],
            letter["status"],
            letter["message"].as_str().unwrap_or_default()
        );
    }
    Ok(verdict(dead == 0))
}

/// Compares delivered totals with Stripe's summaries; fails on any difference.
async fn reconcile_with_stripe(
    config: &Config,
    data: &Path,
    format: ReportFormat,
) -> anyhow::Result<ExitCode> {
    let settings = config
        .billing
        .as_ref()
        .context("the config has no `billing` section")?;
    anyhow::ensure!(
        settings.provider == BillingProvider::Stripe,
        "reconcile compares with Stripe; billing.provider is webhook"
    );
    let key = Secrets::from_env()
        .secret_key
        .context("set STRIPE_SECRET_KEY to read Stripe's meter event summaries")?;
    let stripe = Stripe::new(&settings.api_base, &key, settings.timeout.get());
    let lines = reconcile(&open_outbox(data)?, settings, &stripe)
        .await
        .context("reading Stripe's meter event summaries")?;
    let differences = lines.iter().filter(|l| !l.matches()).count();
    if format == ReportFormat::Json {
        say!("{}", serde_json::to_string_pretty(&lines)?);
        return Ok(verdict(differences == 0));
    }
    say!(
        "{:<24} {:<20} {:<16} {:>12} {:>12} {:>10}",
        "customer",
        "stripe customer",
        "meter",
        "reported",
        "stripe",
        "diff"
    );
    for line in &lines {
        say!(
            "{:<24} {:<20} {:<16} {:>12} {:>12} {:>10}{}",
            line.customer_id,
            line.stripe_customer,
            line.event_name,
            line.reported,
            line.provider,
            line.provider - line.reported as f64,
            if line.matches() { "" } else { "  DIFFERENT" }
        );
    }
    say!(
        "{} customer-meter pairs compared, {differences} different",
        lines.len()
    );
    Ok(verdict(differences == 0))
}
