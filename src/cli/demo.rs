//! `northstar demo generate`: a synthetic history with a planted activation threshold.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use northstar::activation::generate::{HistorySpec, generate};

#[derive(Subcommand)]
pub(super) enum DemoCommand {
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

impl DemoCommand {
    pub(super) fn run(self) -> anyhow::Result<()> {
        let DemoCommand::Generate {
            out,
            users,
            times,
            days,
            seed,
        } = self;
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
}
