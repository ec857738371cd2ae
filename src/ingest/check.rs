//! `northstar schema check`: a JSON-lines file of events run through ingest's normalization
//! and the schema registry, as a live request would be, without a server: the registry in
//! users' CI.

use std::io::BufRead;
use std::path::Path;

use serde_json::Value;

use super::{posthog, segment};
use crate::event::EventType;
use crate::schema::{Decision, Registry};

/// One problem found by `schema check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineViolation {
    /// 1-based line number.
    pub line: usize,
    /// The offending field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Checks every line of a JSON-lines file of Segment- or PostHog-shaped events against the
/// registry: malformed lines, messages ingest would reject, and schema violations (tagged ones
/// included: CI should see them before production does).
pub fn check(registry: &Registry, path: &Path) -> std::io::Result<(usize, Vec<LineViolation>)> {
    let file = std::fs::File::open(path)?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
            file,
        )))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut lines = 0;
    let mut violations = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let number = index + 1;
        let mut push = |field: String, message: String| {
            violations.push(LineViolation {
                line: number,
                field,
                message,
            })
        };
        let value: Value = match serde_json::from_str(&line) {
            Ok(value) => value,
            Err(e) => {
                push(".".into(), format!("not valid JSON: {e}"));
                continue;
            }
        };
        let normalized =
            if value.get("distinct_id").is_some() || value.get("$distinct_id").is_some() {
                posthog::normalize(value, "check", 0)
            } else {
                match value {
                    Value::Object(map) => {
                        segment::normalize(map, None, segment::Inherited::default(), "check", 0)
                    }
                    _ => {
                        push(".".into(), "each line must be a JSON object".into());
                        continue;
                    }
                }
            };
        let mut record = match normalized {
            Ok(record) => record,
            Err(rejection) => {
                push(rejection.field, rejection.message);
                continue;
            }
        };
        if let (EventType::Track, Some(name)) = (record.kind, record.event.clone()) {
            match registry.decide(
                &name,
                &record.event_id,
                &record.properties,
                &mut record.context,
            ) {
                Decision::Reject(found) => found.into_iter().for_each(|v| push(v.field, v.message)),
                Decision::Accept { .. } | Decision::SampledOut => {
                    if let Some(Value::Array(tagged)) = record.context.get("schema_violations") {
                        for v in tagged {
                            push(
                                v["field"].as_str().unwrap_or_default().to_string(),
                                v["message"].as_str().unwrap_or_default().to_string(),
                            );
                        }
                    }
                }
            }
        }
    }
    Ok((lines, violations))
}
