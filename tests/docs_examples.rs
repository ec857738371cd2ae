//! Every example in the README and the guides runs: each fenced `sh` block is run by bash
//! against a real server (embedded nats-server, the shipped config, the keys the docs
//! export), in the order a reader meets them, and must exit 0 with every `curl` answered 2xx;
//! a block that shows its answer (`# {"accepted":1,…}`) must answer with those keys. Each
//! fenced `json` block that is a piece of config is loaded by the config parser. A block that
//! cannot run here says why on the line before it: `<!-- example: not run (reason) -->`.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{ADMIN_KEY, Northstar, SERVICE_KEY};
use serde_json::Value;

/// The files whose examples run, in reading order.
const DOCS: &[&str] = &[
    "README.md",
    "docs/analysts.md",
    "docs/growth.md",
    "docs/services.md",
    "docs/operations.md",
    "docs/billing.md",
    "docs/storage.md",
    "docs/benchmarks.md",
];

const NOT_RUN: &str = "<!-- example: not run (";

/// One fenced block of a document.
struct Block {
    file: &'static str,
    line: usize,
    lang: String,
    text: String,
    not_run: Option<String>,
}

fn blocks() -> Vec<Block> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for file in DOCS {
        let text = std::fs::read_to_string(root.join(file)).expect("read doc");
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let Some(lang) = lines[i].strip_prefix("```") else {
                i += 1;
                continue;
            };
            let start = i;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].starts_with("```") {
                body.push(lines[i]);
                i += 1;
            }
            let not_run = start
                .checked_sub(1)
                .and_then(|before| lines[before].strip_prefix(NOT_RUN))
                .map(|rest| rest.trim_end_matches(") -->").to_string());
            found.push(Block {
                file,
                line: start + 1,
                lang: lang.trim().to_string(),
                text: body.join("\n"),
                not_run,
            });
            i += 1;
        }
    }
    found
}

/// The keys of the answers a block shows (`# {"accepted": 1, …}` or `# 200 {…}`).
fn shown_keys(block: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for line in block.lines() {
        let Some(shown) = line
            .strip_prefix("# {")
            .or_else(|| line.strip_prefix("# 200 {"))
        else {
            continue;
        };
        for part in shown.split('"').collect::<Vec<_>>().windows(2) {
            if part[1].starts_with(':') || part[1].starts_with(" :") {
                keys.push(part[0].to_string());
            }
        }
    }
    keys
}

/// A block as run here: the server's address for the quickstart's, this data dir for `data`,
/// curl made to fail on an error status (and to show the body).
fn adapt(block: &str, base: &str, data: &Path) -> String {
    let host = base.trim_start_matches("http://");
    block
        .replace("http://127.0.0.1:7070", base)
        .replace("localhost:7070", host)
        .replace("127.0.0.1:7070", host)
        .replace("target/debug/northstar", "northstar")
        .replace("--data data", &format!("--data {}", data.display()))
        .replace("curl -s ", "curl -sS --fail-with-body ")
}

/// A work dir holding what the examples name by relative path (`queries/`, `schemas/`,
/// `pipelines/`), and a `bin/` with `northstar` for the PATH.
fn workdir() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    for name in ["queries", "schemas", "pipelines"] {
        std::os::unix::fs::symlink(root.join(name), dir.path().join(name)).expect("link");
    }
    std::fs::create_dir(dir.path().join("bin")).expect("bin");
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_northstar"),
        dir.path().join("bin/northstar"),
    )
    .expect("link binary");
    dir
}

fn run(block: &Block, script: &str, work: &Path) -> String {
    let path = format!(
        "{}:{}",
        work.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", script])
        .current_dir(work)
        .env("PATH", path)
        .env("NORTHSTAR_ADMIN_KEY", ADMIN_KEY)
        .env("NORTHSTAR_SERVICE_KEY", SERVICE_KEY)
        .env("RUST_LOG", "warn")
        .env_remove("NORTHSTAR_WRITE_KEY")
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{}:{} failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        block.file,
        block.line,
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn every_shell_example_in_the_docs_runs_against_a_real_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("schemas/northstar.json")).expect("config"),
    )
    .expect("config is JSON");
    let server =
        Northstar::start_embedded_with_env(&config, &[("NORTHSTAR_SERVICE_KEY", SERVICE_KEY)]);
    let work = workdir();
    let mut ran = 0;
    for block in blocks().iter().filter(|b| b.lang == "sh") {
        if let Some(reason) = &block.not_run {
            assert!(
                reason.len() > 10,
                "{}:{} says it is not run without saying why",
                block.file,
                block.line
            );
            continue;
        }
        let script = adapt(&block.text, &server.base, &server.data);
        let stdout = run(block, &script, work.path());
        for key in shown_keys(&block.text) {
            assert!(
                stdout.contains(&format!("\"{key}\"")),
                "{}:{} shows `{key}` in its answer; the answer was:\n{stdout}",
                block.file,
                block.line
            );
        }
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} examples ran");
}

/// A `json` block that is a piece of config (it starts with a quoted section name) is merged
/// into the shipped config and loaded by the parser, so a renamed or misspelt key in the docs
/// fails here.
#[test]
fn every_config_example_in_the_docs_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("schemas/northstar.json")).expect("config");
    let mut loaded = 0;
    for block in blocks().iter().filter(|b| b.lang == "json") {
        if !block.text.trim_start().starts_with('"') || block.not_run.is_some() {
            continue;
        }
        let piece: Value = serde_json::from_str(&format!("{{{}}}", block.text))
            .unwrap_or_else(|e| panic!("{}:{}: not JSON: {e}", block.file, block.line));
        let mut config: Value = serde_json::from_str(&shipped).expect("shipped config");
        for (key, value) in piece.as_object().expect("object") {
            config[key] = value.clone();
        }
        let origin = format!("{}:{}", block.file, block.line);
        northstar::config::Config::from_json(&config.to_string(), &origin)
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
        loaded += 1;
    }
    assert!(loaded >= 2, "only {loaded} config examples loaded");
}

#[test]
fn blocks_are_found_in_every_guide() {
    let files: std::collections::BTreeSet<PathBuf> =
        blocks().iter().map(|b| PathBuf::from(b.file)).collect();
    for guide in [
        "README.md",
        "docs/analysts.md",
        "docs/growth.md",
        "docs/services.md",
    ] {
        assert!(files.contains(Path::new(guide)), "{guide} has no example");
    }
}

/// Every key of every config section appears in `docs/operations.md`'s configuration table,
/// in its section's row, with its default as the code has it: `` `key` (default ``.
#[test]
fn every_config_key_is_in_the_operations_guide_with_its_default() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/operations.md")).expect("guide");
    let config = serde_json::to_value(northstar::config::Config::default()).expect("serialise");
    let mut missing = Vec::new();
    for (section, settings) in config.as_object().expect("object") {
        let Some(settings) = settings.as_object() else {
            continue;
        };
        let Some(row) = guide
            .lines()
            .find(|l| l.starts_with(&format!("| `{section}`")))
        else {
            missing.push(format!("no row for section `{section}`"));
            continue;
        };
        for (key, default) in settings {
            let shown = match default {
                Value::Number(n) => n.to_string(),
                Value::String(s) => format!("\"{s}\""),
                Value::Bool(b) => b.to_string(),
                _ => String::new(),
            };
            let named = format!("`{key}`");
            if !row.contains(&named) {
                missing.push(format!("{section}.{key} is not listed"));
            } else if !shown.is_empty()
                && !row.contains(&format!("{named} ({shown}"))
                && !same_duration(row, &named, default)
            {
                missing.push(format!("{section}.{key}: its default {shown} is not shown"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/operations.md:\n{}",
        missing.join("\n")
    );
}

/// Whether the row shows `named` with a duration equal to `default` in other units
/// (`"24h"` for the code's `"1d"`).
fn same_duration(row: &str, named: &str, default: &Value) -> bool {
    let parse = northstar::config::parse_duration;
    let Some(default) = default.as_str().and_then(|d| parse(d).ok()) else {
        return false;
    };
    row.split(&format!("{named} (\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|shown| parse(shown).ok())
        == Some(default)
}
