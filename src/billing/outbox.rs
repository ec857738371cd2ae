//! The outbox: what is owed to the billing provider, on disk before any call is made.
//!
//! One append-only file of JSON lines (`data/billing/outbox.jsonl`):
//! - `owe`: a window's report (identifier, customer, meter, whole value), fsynced before the
//!   first call, so a crash (kill -9 included) can only leave it owed, never forgotten;
//! - `done`: the provider confirmed it (written without fsync: if a crash loses the line the
//!   report is sent again under the same identifier, which the provider drops as a repeat);
//! - `dead`: the provider refused it for good (a 4xx other than 429), with its message;
//! - `retry`: an operator put a dead letter back in line.
//!
//! What is owed comes from closed usage alone: the reported total of a customer and meter is
//! always the floor of its closed usage, so a fraction is carried to the next window, never
//! lost, and replaying the stream (which re-derives closed usage) cannot owe anything twice.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};

use super::windows::Key;

/// What an attempt to deliver an entry came to; the outbox records it (`done`, `dead`) or
/// the entry waits for the next attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The provider has the report (now or from an earlier attempt).
    Delivered,
    /// Try again: after `after` if the provider said (429 `Retry-After`), else with backoff.
    Retry {
        /// The provider's `Retry-After`.
        after: Option<Duration>,
        /// What went wrong, for logs.
        reason: String,
    },
    /// Refused for good (a 4xx other than 429): parked as a dead letter.
    Rejected {
        /// HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
    },
}

/// The outbox file's name under the billing directory.
pub(crate) const OUTBOX_FILE: &str = "outbox.jsonl";

/// One report owed to the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Deterministic: customer, feature, window start and revision.
    pub identifier: String,
    /// The northstar customer.
    pub customer_id: String,
    /// The customer at the provider (Stripe's `cus_…`; the customer id when none is set).
    pub provider_customer: String,
    /// The billed feature.
    pub feature: String,
    /// The provider's meter `event_name`.
    pub event_name: String,
    /// Whole units.
    pub value: i64,
    /// Window start (UTC µs).
    pub window_start: i64,
    /// Window end (UTC µs).
    pub window_end: i64,
    /// 0 for the window's first report; each correction adds one.
    pub revision: u32,
    /// When the entry was made (UTC µs).
    pub created_at: i64,
}

/// The deterministic identifier of a report (at most 100 characters, as Stripe requires).
pub fn identifier(customer: &str, feature: &str, window_start: i64, revision: u32) -> String {
    let readable = format!(
        "ns:{customer}:{feature}:{}:{revision}",
        window_start.div_euclid(1_000_000)
    );
    if readable.len() <= 100 {
        return readable;
    }
    let name = format!("{customer}\u{0}{feature}\u{0}{window_start}\u{0}{revision}");
    format!(
        "ns:{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple()
    )
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Owe(Entry),
    Done {
        identifier: String,
        at: i64,
    },
    Dead {
        identifier: String,
        status: Option<u16>,
        message: String,
        at: i64,
    },
    Retry {
        identifier: String,
    },
}

/// Where an entry stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Standing {
    /// Owed, not confirmed yet.
    Pending,
    /// Confirmed by the provider.
    Delivered,
    /// Refused for good.
    Dead {
        /// The provider's HTTP status, if it answered.
        status: Option<u16>,
        /// The provider's message.
        message: String,
    },
}

/// Why the outbox could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("billing outbox {path}: {source}")]
pub struct OutboxError {
    path: PathBuf,
    source: std::io::Error,
}

/// A closed window's usage, to turn into what is owed.
#[derive(Debug, Clone)]
pub struct Closing {
    /// Customer and feature.
    pub key: Key,
    /// Window start (UTC µs).
    pub window_start: i64,
    /// Window end (UTC µs).
    pub window_end: i64,
    /// Closed usage of the key over all windows (not just this one).
    pub closed_usage: Decimal,
    /// Usage closed into this window since it was last due: what this window's report
    /// carries (see [`Outbox::owe`]).
    pub window_usage: Decimal,
    /// The provider's meter name.
    pub event_name: String,
    /// The customer at the provider.
    pub provider_customer: String,
}

/// The outbox, loaded.
pub struct Outbox {
    path: PathBuf,
    file: File,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    standing: Vec<Standing>,
    owed: HashMap<Key, i64>,
    delivered: HashMap<Key, i64>,
    revisions: HashMap<(Key, i64), u32>,
}

impl Outbox {
    /// Opens (creating) the outbox in `dir` and reads what it holds. A torn last line (a crash
    /// mid-append) is ignored: its entry was never fsynced, so nothing was sent for it.
    pub fn open(dir: &Path) -> Result<Self, OutboxError> {
        let path = dir.join(OUTBOX_FILE);
        let fail = |source| OutboxError {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(fail)?;
        let mut outbox = Self {
            file: OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&path)
                .map_err(fail)?,
            path: path.clone(),
            entries: Vec::new(),
            index: HashMap::new(),
            standing: Vec::new(),
            owed: HashMap::new(),
            delivered: HashMap::new(),
            revisions: HashMap::new(),
        };
        let reader = BufReader::new(File::open(&path).map_err(fail)?);
        let mut torn = false;
        for line in reader.split(b'\n') {
            let line = line.map_err(fail)?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Line>(&line) {
                Ok(line) => outbox.replay(line),
                Err(error) => {
                    tracing::warn!(%error, "billing outbox: skipping a torn line (an append cut by a crash)");
                    torn = true;
                }
            }
        }
        if torn {
            // Start the next append on a fresh line.
            outbox.file.write_all(b"\n").map_err(fail)?;
        }
        Ok(outbox)
    }

    fn replay(&mut self, line: Line) {
        match line {
            Line::Owe(entry) => self.remember(entry),
            Line::Done { identifier, .. } => self.set(&identifier, Standing::Delivered),
            Line::Dead {
                identifier,
                status,
                message,
                ..
            } => self.set(&identifier, Standing::Dead { status, message }),
            Line::Retry { identifier } => self.set(&identifier, Standing::Pending),
        }
    }

    fn remember(&mut self, entry: Entry) {
        if self.index.contains_key(&entry.identifier) {
            return;
        }
        let key = (entry.customer_id.clone(), entry.feature.clone());
        *self.owed.entry(key.clone()).or_default() += entry.value;
        let revision = self.revisions.entry((key, entry.window_start)).or_default();
        *revision = (*revision).max(entry.revision + 1);
        self.index
            .insert(entry.identifier.clone(), self.entries.len());
        self.entries.push(entry);
        self.standing.push(Standing::Pending);
    }

    fn set(&mut self, identifier: &str, standing: Standing) {
        let Some(&i) = self.index.get(identifier) else {
            return;
        };
        let key = (
            self.entries[i].customer_id.clone(),
            self.entries[i].feature.clone(),
        );
        let value = self.entries[i].value;
        if self.standing[i] == Standing::Delivered {
            *self.delivered.entry(key.clone()).or_default() -= value;
        }
        if standing == Standing::Delivered {
            *self.delivered.entry(key).or_default() += value;
        }
        self.standing[i] = standing;
    }

    fn append(&mut self, lines: &[Line], sync: bool) -> Result<(), OutboxError> {
        let mut buffer = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut buffer, line).map_err(|e| OutboxError {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })?;
            buffer.push(b'\n');
        }
        let fail = |source| OutboxError {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&buffer).map_err(fail)?;
        if sync {
            self.file.sync_data().map_err(fail)?;
        }
        Ok(())
    }

    /// Turns closed usage into owed reports. What a customer and meter are owed in all is
    /// the floor of their closed usage less what was owed before, so replaying the stream
    /// can never owe twice and a fraction waits for the next window. That amount is split
    /// over the windows closing now by each window's own usage: each window's report carries
    /// its own units (billed per window = SQL per window, for whole quantities), and a
    /// carried fraction completes a unit in the window where it does. Written and fsynced
    /// before this returns; returns the new entries.
    pub fn owe(&mut self, closings: &[Closing], now: i64) -> Result<Vec<Entry>, OutboxError> {
        let mut keys: Vec<&Key> = Vec::new();
        for closing in closings {
            if !keys.contains(&&closing.key) {
                keys.push(&closing.key);
            }
        }
        let mut made = Vec::new();
        for key in keys {
            let windows: Vec<&Closing> = closings.iter().filter(|c| &c.key == key).collect();
            for (closing, value) in windows.iter().zip(self.split(&windows)) {
                if value > 0 {
                    made.push(self.entry_for(closing, value, &made, now));
                }
            }
        }
        if made.is_empty() {
            return Ok(made);
        }
        let lines: Vec<Line> = made.iter().cloned().map(Line::Owe).collect();
        self.append(&lines, true)?;
        for entry in &made {
            self.remember(entry.clone());
        }
        Ok(made)
    }

    /// The whole units owed to each of one key's closing `windows`, in their order.
    fn split(&self, windows: &[&Closing]) -> Vec<i64> {
        let Some(first) = windows.first() else {
            return Vec::new();
        };
        let closed = first.closed_usage;
        let owed = self.owed.get(&first.key).copied().unwrap_or_default();
        let total = closed
            .floor()
            .to_i64()
            .unwrap_or(i64::MAX)
            .saturating_sub(owed);
        if total <= 0 {
            return vec![0; windows.len()];
        }
        // The fraction carried from before these windows, then each window's whole units.
        let usage: Decimal = windows.iter().map(|w| w.window_usage).sum();
        let mut running = (closed - usage).max(Decimal::ZERO).fract();
        let mut values: Vec<i64> = windows
            .iter()
            .map(|w| {
                let before = running.floor();
                running += w.window_usage;
                (running.floor() - before).to_i64().unwrap_or(0).max(0)
            })
            .collect();
        // After a restart the windows replay usage the outbox already owes: what is left to
        // owe belongs to the latest windows. Whatever the split misses goes to the last one.
        let mut left = total;
        for value in values.iter_mut().rev() {
            *value = (*value).min(left);
            left -= *value;
        }
        if let Some(last) = values.last_mut() {
            *last += left;
        }
        values
    }

    /// The entry owing `value` for `closing`, after those in `made` this round.
    fn entry_for(&self, closing: &Closing, value: i64, made: &[Entry], now: i64) -> Entry {
        let revision = self
            .revisions
            .get(&(closing.key.clone(), closing.window_start))
            .copied()
            .unwrap_or_default()
            + made
                .iter()
                .filter(|e| {
                    e.customer_id == closing.key.0
                        && e.feature == closing.key.1
                        && e.window_start == closing.window_start
                })
                .count() as u32;
        let entry = Entry {
            identifier: identifier(
                &closing.key.0,
                &closing.key.1,
                closing.window_start,
                revision,
            ),
            customer_id: closing.key.0.clone(),
            provider_customer: closing.provider_customer.clone(),
            feature: closing.key.1.clone(),
            event_name: closing.event_name.clone(),
            value,
            window_start: closing.window_start,
            window_end: closing.window_end,
            revision,
            created_at: now,
        };
        if revision > 0 {
            tracing::info!(
                identifier = %entry.identifier,
                delta = entry.value,
                "late usage for a reported window: correction owed"
            );
        }
        entry
    }

    /// Records the provider's confirmation.
    pub fn delivered(&mut self, identifier: &str, now: i64) -> Result<(), OutboxError> {
        self.append(
            &[Line::Done {
                identifier: identifier.to_string(),
                at: now,
            }],
            false,
        )?;
        self.set(identifier, Standing::Delivered);
        Ok(())
    }

    /// Parks an entry the provider refused for good.
    pub fn dead(
        &mut self,
        identifier: &str,
        status: Option<u16>,
        message: &str,
        now: i64,
    ) -> Result<(), OutboxError> {
        self.append(
            &[Line::Dead {
                identifier: identifier.to_string(),
                status,
                message: message.to_string(),
                at: now,
            }],
            true,
        )?;
        self.set(
            identifier,
            Standing::Dead {
                status,
                message: message.to_string(),
            },
        );
        Ok(())
    }

    /// Puts every dead letter back in line; returns how many.
    pub fn retry_dead(&mut self) -> Result<Vec<Entry>, OutboxError> {
        let dead: Vec<String> = self
            .entries
            .iter()
            .zip(&self.standing)
            .filter(|(_, s)| matches!(s, Standing::Dead { .. }))
            .map(|(e, _)| e.identifier.clone())
            .collect();
        let lines: Vec<Line> = dead
            .iter()
            .map(|identifier| Line::Retry {
                identifier: identifier.clone(),
            })
            .collect();
        if !lines.is_empty() {
            self.append(&lines, true)?;
        }
        for identifier in &dead {
            self.set(identifier, Standing::Pending);
        }
        Ok(dead
            .iter()
            .filter_map(|id| self.entry(id).cloned())
            .collect())
    }

    /// The entry with `identifier`.
    pub fn entry(&self, identifier: &str) -> Option<&Entry> {
        self.index.get(identifier).map(|&i| &self.entries[i])
    }

    /// Entries held, every one the outbox ever made (for metrics).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the outbox holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries still owed, oldest first.
    pub fn pending(&self) -> Vec<Entry> {
        self.entries
            .iter()
            .zip(&self.standing)
            .filter(|(_, s)| **s == Standing::Pending)
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Every entry with where it stands, oldest first.
    pub fn all(&self) -> impl Iterator<Item = (&Entry, &Standing)> {
        self.entries.iter().zip(&self.standing)
    }

    /// Totals per customer and feature: (owed, delivered).
    pub fn totals(&self) -> BTreeMap<Key, (i64, i64)> {
        let mut totals: BTreeMap<Key, (i64, i64)> = BTreeMap::new();
        for (key, owed) in &self.owed {
            totals.entry(key.clone()).or_default().0 = *owed;
        }
        for (key, delivered) in &self.delivered {
            totals.entry(key.clone()).or_default().1 = *delivered;
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closing(customer: &str, start: i64, usage: &str) -> Closing {
        Closing {
            key: (customer.into(), "api".into()),
            window_start: start,
            window_end: start + 1_000_000,
            closed_usage: usage.parse().unwrap(),
            window_usage: usage.parse().unwrap(),
            event_name: "api_requests".into(),
            provider_customer: format!("cus_{customer}"),
        }
    }

    #[test]
    fn fractions_are_carried_and_corrections_get_the_next_revision() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        // 0.75 owes nothing yet; 1.5 owes 1; 2.25 owes 1 more (the carried 0.5 + 0.75).
        assert!(
            outbox
                .owe(&[closing("a", 0, "0.75")], 0)
                .unwrap()
                .is_empty()
        );
        let first = outbox.owe(&[closing("a", 1_000_000, "1.5")], 0).unwrap();
        assert_eq!((first[0].value, first[0].revision), (1, 0));
        assert_eq!(first[0].identifier, "ns:a:api:1:0");
        let second = outbox.owe(&[closing("a", 1_000_000, "2.25")], 0).unwrap();
        assert_eq!((second[0].value, second[0].revision), (1, 1));
        assert_eq!(second[0].identifier, "ns:a:api:1:1");
        // Replaying the same closed usage owes nothing more.
        assert!(
            outbox
                .owe(&[closing("a", 1_000_000, "2.25")], 0)
                .unwrap()
                .is_empty()
        );
        outbox.delivered("ns:a:api:1:0", 0).unwrap();
        outbox
            .dead("ns:a:api:1:1", Some(400), "No such customer", 0)
            .unwrap();

        // Everything survives a reopen, a torn last line included.
        drop(outbox);
        let path = dir.path().join(OUTBOX_FILE);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(br#"{"op":"owe","identif"#);
        std::fs::write(&path, text).unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        let key = ("a".to_string(), "api".to_string());
        assert_eq!(outbox.totals()[&key], (2, 1));
        assert_eq!(outbox.pending().len(), 0);
        assert_eq!(outbox.retry_dead().unwrap().len(), 1);
        assert_eq!(outbox.pending().len(), 1);
        let third = outbox.owe(&[closing("a", 2_000_000, "3")], 0).unwrap();
        assert_eq!(
            (third[0].value, third[0].identifier.as_str()),
            (1, "ns:a:api:2:0")
        );
    }

    fn window(start: i64, closed: &str, own: &str) -> Closing {
        Closing {
            window_usage: own.parse().unwrap(),
            ..closing("w", start, closed)
        }
    }

    /// One batch for `winmix`: 10 events at 05:30 and 3 at 06:30, both hours closed. The
    /// 05:00 window used to be reported with 13 and 06:00 with nothing.
    #[test]
    fn each_window_closing_together_carries_its_own_usage() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        let hour = 3_600_000_000;
        let made = outbox
            .owe(
                &[window(5 * hour, "13", "10"), window(6 * hour, "13", "3")],
                0,
            )
            .unwrap();
        let values: Vec<(i64, i64)> = made.iter().map(|e| (e.window_start, e.value)).collect();
        assert_eq!(values, [(5 * hour, 10), (6 * hour, 3)]);
        // Fractions: 0.5 then 0.75: the unit completes in the second window.
        let made = outbox
            .owe(
                &[
                    window(7 * hour, "14.25", "0.5"),
                    window(8 * hour, "14.25", "0.75"),
                ],
                0,
            )
            .unwrap();
        let values: Vec<(i64, i64)> = made.iter().map(|e| (e.window_start, e.value)).collect();
        assert_eq!(values, [(8 * hour, 1)]);
        // A replay after a restart (the windows behind the outbox) owes nothing twice.
        let again = outbox
            .owe(
                &[
                    window(5 * hour, "14.25", "10"),
                    window(6 * hour, "14.25", "3"),
                ],
                0,
            )
            .unwrap();
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn long_ids_are_hashed_to_fit() {
        let long = "c".repeat(200);
        let id = identifier(&long, "api", 0, 0);
        assert!(id.len() <= 100 && id.starts_with("ns:"));
        assert_eq!(id, identifier(&long, "api", 0, 0));
        assert_ne!(id, identifier(&long, "api", 0, 1));
    }
}
