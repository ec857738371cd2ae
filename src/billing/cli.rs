//! `northstar billing status|reconcile`: read the outbox on disk, no server needed.

use std::path::Path;

use anyhow::Context;

use super::outbox::Outbox;
use super::reconcile::reconcile;
use super::stripe::Stripe;
use super::{Secrets, status_of};
use crate::config::{BillingProvider, Config};

/// Prints the outbox's standing; returns false if there are dead letters.
pub fn status(config: &Config, data: &Path, json: bool) -> anyhow::Result<bool> {
    let provider = config
        .billing
        .as_ref()
        .map_or(BillingProvider::Stripe, |b| b.provider);
    let outbox = Outbox::open(&data.join("billing"))
        .with_context(|| format!("reading the billing outbox under {}", data.display()))?;
    let status = status_of(&outbox, provider);
    let dead = status["dead"].as_array().map_or(0, Vec::len);
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(dead == 0);
    }
    println!(
        "provider {}: {} delivered, {} pending, {dead} dead",
        status["provider"].as_str().unwrap_or("?"),
        status["delivered"],
        status["pending"]
    );
    println!(
        "{:<24} {:<16} {:>12} {:>12}",
        "customer", "feature", "owed", "delivered"
    );
    for total in status["totals"].as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<16} {:>12} {:>12}",
            total["customer_id"].as_str().unwrap_or_default(),
            total["feature"].as_str().unwrap_or_default(),
            total["owed"],
            total["delivered"]
        );
    }
    for letter in status["dead"].as_array().into_iter().flatten() {
        println!(
            "DEAD {} (value {}): HTTP {} {}",
            letter["identifier"].as_str().unwrap_or_default(),
            letter["value"],
            letter["status"],
            letter["message"].as_str().unwrap_or_default()
        );
    }
    Ok(dead == 0)
}

/// Compares delivered totals with Stripe's summaries; returns false on any difference.
pub async fn reconcile_command(config: &Config, data: &Path, json: bool) -> anyhow::Result<bool> {
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
    let outbox = Outbox::open(&data.join("billing"))
        .with_context(|| format!("reading the billing outbox under {}", data.display()))?;
    let lines = reconcile(&outbox, settings, &stripe)
        .await
        .context("reading Stripe's meter event summaries")?;
    let differences = lines.iter().filter(|l| !l.matches()).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&lines)?);
    } else {
        println!(
            "{:<24} {:<20} {:<16} {:>12} {:>12} {:>10}",
            "customer", "stripe customer", "meter", "reported", "stripe", "diff"
        );
        for line in &lines {
            println!(
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
        println!(
            "{} customer-meter pairs compared, {differences} different",
            lines.len()
        );
    }
    Ok(differences == 0)
}
