//! Meter snapshots: counters written shard by shard, each with the stream sequence it holds.
//!
//! A shard is copied under its lock (a short pause for that shard only) and written after, so
//! the consumer never stops. Each shard's sequence is read under its lock, and the consumer
//! records an applied sequence only while it holds the lock of the event's shard, so "every
//! event of this shard up to `seq` is in these counters" holds for each shard on its own. On
//! restart the consumer resumes after the smallest shard sequence and applies an event to a
//! shard only if it is past that shard's sequence: the numbers after a restart equal the
//! numbers before, exactly. Events a shard took in ahead of the consumer (when ingest's publish
//! was acked) are listed with it, and skipped when the consumer delivers them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::{Counters, CustomerUsage, SHARDS};
use crate::files;

/// File name of the snapshot in the meter's directory.
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.jsonl";

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    stream: String,
    stream_created: Option<String>,
    taken_at: String,
    /// Feature ids by the index the counters use.
    features: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardRecord {
    shard: usize,
    seq: u64,
    customers: HashMap<Box<str>, CustomerUsage>,
    /// Events past `seq` already in these counters (applied when ingest was acked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ahead: Vec<u64>,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("meter snapshot {path}: {message}")]
pub struct SnapshotError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// What a snapshot restored.
#[derive(Debug, Default, Clone)]
pub struct Restored {
    /// Sequence each shard holds.
    pub shard_seqs: Vec<u64>,
    /// Creation time of the stream the snapshot was taken from.
    pub stream_created: Option<String>,
}

impl Restored {
    /// Where the consumer resumes: after the least advanced shard.
    pub fn resume_after(&self) -> u64 {
        self.shard_seqs.iter().copied().min().unwrap_or(0)
    }
}

/// Writes a snapshot of `counters`; returns the smallest shard sequence in it.
pub fn write(
    dir: &Path,
    counters: &Counters,
    features: &[String],
    stream: &str,
    stream_created: Option<&str>,
) -> Result<u64, SnapshotError> {
    let path = dir.join(SNAPSHOT_FILE);
    let err = |message: String| SnapshotError {
        path: path.clone(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let temp = dir.join(format!(".{SNAPSHOT_FILE}.tmp"));
    let file = std::fs::File::create(&temp).map_err(|e| err(e.to_string()))?;
    let mut out = BufWriter::new(file);
    let header = Header {
        version: 1,
        stream: stream.to_string(),
        stream_created: stream_created.map(str::to_string),
        taken_at: crate::clock::format_micros(crate::clock::system_micros()),
        features: features.to_vec(),
    };
    serde_json::to_writer(&mut out, &header).map_err(|e| err(e.to_string()))?;
    out.write_all(b"\n").map_err(|e| err(e.to_string()))?;
    let mut min_seq = u64::MAX;
    for shard in 0..SHARDS {
        let (seq, customers, ahead) = {
            let guard = counters.lock_shard(shard);
            // Read under the shard's lock: see the module doc.
            let seq = counters.applied_seq().max(guard.applied_seq);
            let ahead: Vec<u64> = guard.ahead.range(seq + 1..).copied().collect();
            (seq, guard.customers.clone(), ahead)
        };
        min_seq = min_seq.min(seq);
        let record = ShardRecord {
            shard,
            seq,
            customers,
            ahead,
        };
        serde_json::to_writer(&mut out, &record).map_err(|e| err(e.to_string()))?;
        out.write_all(b"\n").map_err(|e| err(e.to_string()))?;
    }
    let file = out.into_inner().map_err(|e| err(e.to_string()))?;
    file.sync_all().map_err(|e| err(e.to_string()))?;
    drop(file);
    files::replace(&temp, &path).map_err(|e| err(e.to_string()))?;
    Ok(min_seq)
}

/// Loads a snapshot into empty `counters`, mapping feature ids to today's indices (counters
/// of features the config no longer has are dropped). No snapshot: all shards at 0.
pub fn load(
    dir: &Path,
    counters: &Counters,
    features: &[String],
) -> Result<Restored, SnapshotError> {
    let path = dir.join(SNAPSHOT_FILE);
    let err = |message: String| SnapshotError {
        path: path.clone(),
        message,
    };
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Restored {
                shard_seqs: vec![0; SHARDS],
                stream_created: None,
            });
        }
        Err(e) => return Err(err(e.to_string())),
    };
    let mut lines = BufReader::new(file).lines();
    let header: Header = match lines.next() {
        Some(line) => serde_json::from_str(&line.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?,
        None => return Err(err("empty snapshot".into())),
    };
    let remap: Vec<Option<u16>> = header
        .features
        .iter()
        .map(|id| {
            features
                .iter()
                .position(|f| f == id)
                .and_then(|i| u16::try_from(i).ok())
        })
        .collect();
    let mut restored = Restored {
        shard_seqs: vec![0; SHARDS],
        stream_created: header.stream_created,
    };
    for line in lines {
        let record: ShardRecord = serde_json::from_str(&line.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
        if record.shard >= SHARDS {
            return Err(err(format!("shard {} out of range", record.shard)));
        }
        let mut guard = counters.lock_shard(record.shard);
        guard.applied_seq = record.seq;
        guard.ahead = record
            .ahead
            .into_iter()
            .filter(|s| *s > record.seq)
            .collect();
        for (customer, mut usage) in record.customers {
            usage.counters.retain_mut(|counter| {
                match remap.get(usize::from(counter.feature)).copied().flatten() {
                    Some(index) => {
                        counter.feature = index;
                        true
                    }
                    None => false,
                }
            });
            if !usage.counters.is_empty() {
                guard.customers.insert(customer, usage);
            }
        }
        guard.recount_unique_values();
        restored.shard_seqs[record.shard] = record.seq;
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Aggregation;
    use crate::schema::quantity::Contribution;
    use rust_decimal::Decimal;

    #[test]
    fn a_snapshot_round_trips_with_per_shard_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Counters::default();
        for (i, customer) in ["acme", "globex", "initech"].iter().enumerate() {
            let mut shard = counters.lock(customer);
            shard.apply(
                customer,
                0,
                Aggregation::Sum,
                0,
                &Contribution::Amount(Decimal::from(i + 1)),
                None,
                1,
                "e",
            );
            counters.set_applied(i as u64 + 1);
        }
        let features = vec!["api_requests".to_string()];
        let min = write(dir.path(), &counters, &features, "EVENTS", Some("created")).unwrap();
        assert_eq!(min, 3, "every shard was written after the third event");

        let restored_counters = Counters::default();
        let restored = load(dir.path(), &restored_counters, &features).unwrap();
        assert_eq!(restored.resume_after(), 3);
        assert_eq!(restored.stream_created.as_deref(), Some("created"));
        assert_eq!(
            restored_counters.lock("globex").used("globex", 0, 0),
            Decimal::from(2)
        );

        // A feature that left the config is dropped.
        let other = Counters::default();
        load(dir.path(), &other, &["something_else".to_string()]).unwrap();
        assert_eq!(other.counter_count(), 0);
    }

    #[test]
    fn no_snapshot_starts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let restored = load(dir.path(), &Counters::default(), &[]).unwrap();
        assert_eq!(restored.resume_after(), 0);
    }
}
