//! Windowed usage pipelines: `pipelines/*.sql`, run by DataFusion over committed Parquet.
//!
//! A pipeline file is one SELECT over the `metered_events` view with `{date}` where the day
//! goes, and a `-- window: 1h` header. After each archive commit the runner finds the days
//! whose events changed (`seq` past what the pipeline has seen), runs each pipeline for each of
//! those days, and replaces that day's file under `data/usage/pipeline=<name>/date=<day>/`.
//! A late event re-runs its day, so windows are corrected, never left stale. The results are
//! the `usage` table.
//!
//! An `-- incremental` pipeline (the shipped ones) reads only the events a day gained since
//! its file was written and merges their windows in: the file's footer records the sequence
//! it reflects, so the cost of a run follows what arrived, not the size of the day, and a run
//! repeated after a crash adds nothing twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::compute::cast;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::catalog::usage_schema;
use crate::config::parse_duration;
use crate::files;
use crate::query::QueryEngine;
use crate::shutdown::{Shutdown, wait_for_stop};
use crate::supervise::Supervisor;

/// A pipeline definition.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// File stem (`usage_hourly`), the `pipeline` partition value.
    pub name: String,
    /// Window length, from the `-- window:` header.
    pub window: Duration,
    /// The SELECT, with `{date}` to fill in.
    pub sql: String,
    /// `-- incremental` header: the SELECT reads `FROM metered_events` and its `quantity` and
    /// `events` are sums, its `max_quantity` and `max_seq` maxima, so a run over the events a
    /// day gained merges into that day's windows instead of re-reading the day.
    pub incremental: bool,
}

/// The footer key of a day's output holding the stream sequence it reflects: every event of
/// that day at or below it, and none above.
const UPTO_KEY: &str = "northstar.pipeline.upto";

impl Pipeline {
    /// The SELECT for `date`, over the events with `after < seq <= upto` when the pipeline is
    /// incremental (all of the day's otherwise).
    fn over(&self, date: &str, after: u64, upto: u64) -> String {
        let sql = self.sql.replace("{date}", date);
        if !self.incremental {
            return sql;
        }
        sql.replacen(
            METERED_FROM,
            &format!(
                "FROM (SELECT * FROM metered_events WHERE seq > {after} AND seq <= {upto}) AS metered_events"
            ),
            1,
        )
    }
}

/// What an incremental pipeline reads, exactly as written.
const METERED_FROM: &str = "FROM metered_events";

/// Why pipelines could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A pipeline file is malformed.
    #[error("{path}: {message}")]
    Definition {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Running a pipeline failed.
    #[error("pipeline {name}: {message}")]
    Run {
        /// The pipeline.
        name: String,
        /// What failed.
        message: String,
    },
}

/// The pipelines northstar ships (`pipelines/` of the source tree), compiled in so a server
/// started from any working directory has its hourly and daily usage windows: billing and
/// `usage verify` read them.
const SHIPPED: [(&str, &str); 2] = [
    ("usage_daily", include_str!("../pipelines/usage_daily.sql")),
    (
        "usage_hourly",
        include_str!("../pipelines/usage_hourly.sql"),
    ),
];

/// Where the pipelines come from when `--pipelines` is not given.
pub(crate) const DEFAULT_DIR: &str = "pipelines";

/// The pipelines to run: every `*.sql` of `dir` when one is given (an error if it is missing,
/// so a mistyped path is not silently no pipelines); otherwise those of `./pipelines` when it
/// exists, and the shipped ones when it does not.
pub fn load(dir: Option<&Path>) -> Result<Vec<Pipeline>, PipelineError> {
    let dir = match dir {
        Some(dir) => {
            if !dir.is_dir() {
                return Err(PipelineError::Definition {
                    path: dir.to_path_buf(),
                    message: "--pipelines names no directory".into(),
                });
            }
            dir
        }
        None if Path::new(DEFAULT_DIR).is_dir() => Path::new(DEFAULT_DIR),
        None => {
            return SHIPPED
                .iter()
                .map(|(name, sql)| {
                    parse(
                        name,
                        sql,
                        &Path::new(DEFAULT_DIR).join(format!("{name}.sql")),
                    )
                })
                .collect();
        }
    };
    let entries = std::fs::read_dir(dir).map_err(|e| PipelineError::Definition {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let sql = std::fs::read_to_string(path).map_err(|e| PipelineError::Definition {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            parse(&name, &sql, path)
        })
        .collect()
}

/// One pipeline from its name (the file stem) and its SQL; `path` names it in errors.
fn parse(name: &str, sql: &str, path: &Path) -> Result<Pipeline, PipelineError> {
    let err = |message: String| PipelineError::Definition {
        path: path.to_path_buf(),
        message,
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(err(
            "pipeline names (file stems) are letters, digits, `_` and `-`".into(),
        ));
    }
    let window = sql
        .lines()
        .find_map(|line| line.trim().strip_prefix("-- window:"))
        .ok_or_else(|| err("missing `-- window: 1h` header".into()))
        .and_then(|text| parse_duration(text).map_err(|e| err(format!("window: {e}"))))?;
    if !sql.contains("{date}") {
        return Err(err(
            "the query must restrict itself to one day with `date = '{date}'`".into(),
        ));
    }
    let incremental = sql.lines().any(|line| line.trim() == "-- incremental");
    if incremental && sql.matches(METERED_FROM).count() != 1 {
        return Err(err(format!(
            "an `-- incremental` pipeline reads `{METERED_FROM}` once, written so"
        )));
    }
    Ok(Pipeline {
        name: name.to_string(),
        window,
        sql: sql.to_string(),
        incremental,
    })
}

/// How far a pipeline has run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PipelineManifest {
    /// Every event up to this stream sequence is reflected in the pipeline's output.
    pub last_seq: u64,
}

impl PipelineManifest {
    fn path(data_dir: &Path, name: &str) -> PathBuf {
        data_dir
            .join("usage")
            .join(format!("pipeline={name}"))
            .join("_manifest.json")
    }

    /// The manifest of pipeline `name` (zero if it never ran).
    pub(crate) fn load(data_dir: &Path, name: &str) -> Self {
        std::fs::read(Self::path(data_dir, name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn store(&self, data_dir: &Path, name: &str) -> std::io::Result<()> {
        files::write_atomic(
            &Self::path(data_dir, name),
            &serde_json::to_vec(self).unwrap_or_default(),
        )
    }
}

/// Runs the pipelines as the archive commits (at most once per `min_interval`), until
/// shutdown. `progress` reports the least advanced pipeline's sequence; a pipeline whose run
/// fails is named to `supervisor` (and by `/healthz`) until a run succeeds.
pub async fn run(
    pipelines: Vec<Pipeline>,
    engine: Arc<QueryEngine>,
    mut committed: watch::Receiver<u64>,
    progress: watch::Sender<u64>,
    min_interval: Duration,
    supervisor: Arc<Supervisor>,
    mut shutdown: Shutdown,
) {
    let data_dir = engine.data_dir().to_path_buf();
    let initial = pipelines
        .iter()
        .map(|p| PipelineManifest::load(&data_dir, &p.name).last_seq)
        .min()
        .unwrap_or(u64::MAX);
    progress.send_replace(initial);
    loop {
        let started = tokio::time::Instant::now();
        let target = *committed.borrow_and_update();
        for pipeline in &pipelines {
            let manifest = PipelineManifest::load(&data_dir, &pipeline.name);
            if manifest.last_seq >= target {
                continue;
            }
            let part = format!("pipeline {}", pipeline.name);
            // A run over many days can take long: shutdown does not wait for it. Its manifest
            // is written only at its end, so the next start runs it again.
            let ran = tokio::select! {
                ran = run_once(pipeline, &engine, &data_dir, manifest.last_seq, target) => ran,
                () = wait_for_stop(&mut shutdown) => return,
            };
            match ran {
                Ok(()) => supervisor.recovered(&part),
                Err(error) => {
                    tracing::warn!(%error, "pipeline run failed; retrying at the next commit");
                    supervisor.failing(&part, error.to_string());
                }
            }
        }
        let done = pipelines
            .iter()
            .map(|p| PipelineManifest::load(&data_dir, &p.name).last_seq)
            .min()
            .unwrap_or(target);
        progress.send_replace(done);
        // Runs are spaced so a busy day is not read after every commit (whole, for a pipeline
        // that is not incremental): the freshness of `usage` is this interval plus the
        // archive's.
        tokio::select! {
            _ = tokio::time::sleep_until(started + min_interval) => {}
            () = wait_for_stop(&mut shutdown) => return,
        }
        tokio::select! {
            changed = committed.changed() => if changed.is_err() { return },
            () = wait_for_stop(&mut shutdown) => return,
            // Retry failed runs even when nothing new is committed.
            _ = tokio::time::sleep(Duration::from_secs(5)), if done < target => {}
        }
    }
}

/// Re-runs one pipeline for every day with events in `(after, upto]`, then records `upto`.
pub(crate) async fn run_once(
    pipeline: &Pipeline,
    engine: &QueryEngine,
    data_dir: &Path,
    after: u64,
    upto: u64,
) -> Result<(), PipelineError> {
    let err = |e: &dyn std::fmt::Display| PipelineError::Run {
        name: pipeline.name.clone(),
        message: e.to_string(),
    };
    let days = engine
        .collect_internal(&format!(
            "SELECT DISTINCT date FROM metered_events WHERE seq > {after} AND seq <= {upto}"
        ))
        .await
        .map_err(|e| err(&e))?;
    let mut dates: Vec<String> = Vec::new();
    for batch in &days {
        let column =
            cast(batch.column(0), &arrow::datatypes::DataType::Utf8).map_err(|e| err(&e))?;
        if let Some(strings) = column.as_any().downcast_ref::<arrow::array::StringArray>() {
            dates.extend(strings.iter().flatten().map(str::to_string));
        }
    }
    for date in dates {
        if !valid_date(&date) {
            continue;
        }
        let path = day_path(data_dir, &pipeline.name, &date);
        let previous = match pipeline.incremental {
            true => read_day(&path).map_err(|e| err(&e))?,
            false => None,
        };
        let batches = match previous {
            Some((reflected, _)) if reflected >= upto => continue,
            Some((reflected, kept)) => {
                // Only the events the day gained since its file was written are read.
                let gained = engine
                    .collect_internal(&pipeline.over(&date, reflected, upto))
                    .await
                    .map_err(|e| err(&e))?;
                merge_windows(kept, to_usage(&gained).map_err(|e| err(&e))?)
                    .await
                    .map_err(|e| err(&e))?
            }
            // The whole day: as committed now for a pipeline that is not incremental (at
            // least up to `upto`, perhaps a little past it: a later run re-runs the day,
            // which changes nothing that was right), exactly up to `upto` for one that is.
            None => engine
                .collect_internal(&pipeline.over(&date, 0, upto))
                .await
                .map_err(|e| err(&e))?,
        };
        write_day(&path, &batches, upto).map_err(|e| err(&e))?;
    }
    PipelineManifest { last_seq: upto }
        .store(data_dir, &pipeline.name)
        .map_err(|e| err(&e))?;
    Ok(())
}

fn valid_date(date: &str) -> bool {
    date.len() == 10 && date.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

/// The file holding one day's output of a pipeline.
fn day_path(data_dir: &Path, name: &str, date: &str) -> PathBuf {
    data_dir
        .join("usage")
        .join(format!("pipeline={name}"))
        .join(format!("date={date}"))
        .join("usage.parquet")
}

/// A day's output and the sequence it reflects; `None` when there is no file, or one written
/// before outputs recorded their sequence (the day is then run whole again).
fn read_day(path: &Path) -> Result<Option<(u64, Vec<RecordBatch>)>, String> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let reflected = crate::archive::commit::key_value(reader.metadata().file_metadata(), UPTO_KEY)
        .and_then(|value| value.parse::<u64>().ok());
    let Some(reflected) = reflected else {
        return Ok(None);
    };
    let batches = reader
        .build()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some((reflected, batches)))
}

/// A day's windows with the windows of the events it gained: keyed by customer, feature and
/// window, quantities and counts add up and maxima take the larger.
async fn merge_windows(
    kept: Vec<RecordBatch>,
    gained: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>, String> {
    let parts: Vec<RecordBatch> = kept.into_iter().chain(gained).collect();
    let table = datafusion::datasource::MemTable::try_new(usage_schema(), vec![parts])
        .map_err(|e| e.to_string())?;
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("parts", Arc::new(table))
        .map_err(|e| e.to_string())?;
    let merged = ctx
        .sql(
            "SELECT customer_id, feature, window_start, window_end, sum(quantity) AS quantity, \
             max(max_quantity) AS max_quantity, sum(events) AS events, max(max_seq) AS max_seq \
             FROM parts GROUP BY customer_id, feature, window_start, window_end \
             ORDER BY customer_id, window_start",
        )
        .await
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    // `write_day` casts the merged windows to the `usage` schema.
    Ok(merged)
}

/// Batches cast to the `usage` schema (a missing nullable column is nulls).
fn to_usage(batches: &[RecordBatch]) -> Result<Vec<RecordBatch>, String> {
    let schema = usage_schema();
    let mut converted = Vec::with_capacity(batches.len());
    for batch in batches {
        let columns = schema
            .fields()
            .iter()
            .map(|field| match batch.column_by_name(field.name()) {
                Some(column) => cast(column, field.data_type())
                    .map_err(|e| format!("column {}: {e}", field.name())),
                None if field.is_nullable() => Ok(arrow::array::new_null_array(
                    field.data_type(),
                    batch.num_rows(),
                )),
                None => Err(format!(
                    "the pipeline's SELECT must return column `{}`",
                    field.name()
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        converted.push(RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?);
    }
    Ok(converted)
}

/// Replaces one day's output of a pipeline (cast to the `usage` schema), recording that it
/// reflects the day's events up to `upto`.
fn write_day(path: &Path, batches: &[RecordBatch], upto: u64) -> Result<(), String> {
    let schema = usage_schema();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let converted = to_usage(batches)?;
    let properties = crate::archive::commit::writer_properties(
        &schema,
        &["customer_id", "window_start"],
        3,
        128 * 1024,
    );
    crate::archive::commit::write_parquet_file_with(
        path,
        &schema,
        converted.iter(),
        properties,
        &[(UPTO_KEY, upto.to_string())],
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_pipelines_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let pipelines = load(Some(&dir)).unwrap();
        let names: Vec<&str> = pipelines.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["usage_daily", "usage_hourly"]);
        assert_eq!(pipelines[1].window, Duration::from_secs(3600));
    }

    #[test]
    fn the_compiled_in_pipelines_are_the_shipped_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let from_files = load(Some(&dir)).unwrap();
        let compiled: Vec<Pipeline> = SHIPPED
            .iter()
            .map(|(name, sql)| parse(name, sql, Path::new(name)).unwrap())
            .collect();
        assert_eq!(compiled.len(), from_files.len());
        for (a, b) in compiled.iter().zip(&from_files) {
            assert_eq!(
                (&a.name, a.window, &a.sql, a.incremental),
                (&b.name, b.window, &b.sql, b.incremental)
            );
        }
    }

    #[test]
    fn an_incremental_pipeline_reads_only_the_events_a_day_gained() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let hourly = load(Some(&dir)).unwrap().remove(1);
        assert!(hourly.incremental);
        let sql = hourly.over("2026-03-10", 40, 90);
        assert!(
            sql.contains(
                "FROM (SELECT * FROM metered_events WHERE seq > 40 AND seq <= 90) AS metered_events"
            ),
            "{sql}"
        );
        assert!(sql.contains("date = '2026-03-10'"), "{sql}");
        let whole = Pipeline {
            incremental: false,
            ..hourly
        };
        assert!(!whole.over("2026-03-10", 40, 90).contains("seq >"));
    }

    #[test]
    fn an_incremental_pipeline_must_read_metered_events_as_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("x.sql"),
            "-- window: 1h\n-- incremental\nSELECT * FROM usage WHERE date = '{date}'",
        )
        .unwrap();
        let err = load(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("FROM metered_events"), "{err}");
    }

    #[test]
    fn a_missing_pipelines_directory_is_an_error_not_no_pipelines() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(Some(&dir.path().join("nope")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pipelines names no directory"), "{err}");
    }

    #[test]
    fn a_pipeline_without_a_window_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.sql"), "SELECT 1 WHERE date = '{date}'").unwrap();
        let err = load(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("window"), "{err}");
    }
}
