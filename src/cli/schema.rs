//! `northstar schema …`: the registry in users' CI, where the exit code is the interface.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::{ConfigFile, verdict};
use northstar::config::Config;
use northstar::schema::tools;

#[derive(Subcommand)]
pub(super) enum SchemaCommand {
    /// Check a JSON-lines file of Segment or PostHog events (.jsonl or .jsonl.gz) against the
    /// registry; prints every violation with its line and exits 1 if there is any.
    Check {
        /// JSON-lines file of events (.jsonl or .jsonl.gz).
        file: PathBuf,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Print types for every planned event.
    Codegen {
        /// Target language.
        #[arg(long, value_enum, default_value = "typescript")]
        lang: tools::Lang,
        #[command(flatten)]
        config: ConfigFile,
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

impl SchemaCommand {
    pub(super) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            SchemaCommand::Check { file, config } => check(&file, &config.load()?),
            SchemaCommand::Codegen { lang, config } => {
                say_raw!("{}", tools::codegen(&config.load()?, lang));
                Ok(ExitCode::SUCCESS)
            }
            SchemaCommand::Diff { old, new } => diff(&Config::load(&old)?, &Config::load(&new)?),
        }
    }
}

fn check(file: &std::path::Path, config: &Config) -> anyhow::Result<ExitCode> {
    let schema_dir = PathBuf::from(&config.registry.schema_dir);
    let registry = northstar::schema::Registry::load(config, Some(&schema_dir))?;
    let (lines, violations) = northstar::ingest::check::check(&registry, file)
        .with_context(|| format!("reading {}", file.display()))?;
    for v in &violations {
        say!("{}:{}: {}: {}", file.display(), v.line, v.field, v.message);
    }
    let bad: BTreeSet<usize> = violations.iter().map(|v| v.line).collect();
    eprintln!("{} of {lines} lines have violations", bad.len());
    Ok(verdict(violations.is_empty()))
}

fn diff(old: &Config, new: &Config) -> anyhow::Result<ExitCode> {
    let (changes, problems) = tools::diff(old, new);
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
    Ok(verdict(problems.is_empty()))
}
