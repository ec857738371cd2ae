//! SQL over the archive with DataFusion: `northstar sql` and `POST /v1/sql`.
//!
//! - [`tables`]: the tables registered over the Parquet files;
//! - [`readonly`]: the read-only statement check;
//! - [`output`]: table, CSV, JSON and Arrow IPC answers.
//!
//! Every query runs under a time limit, a row cap and a memory limit. JSON properties are
//! queryable with `properties->>'plan'` and the `json_*` functions.

pub mod output;
pub mod readonly;
pub mod tables;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;

use crate::config::{Config, SqlSettings};
use crate::error::{Classify, ErrorKind};
pub use output::Format;

/// Why a query gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Not a single read-only statement.
    #[error("{0}")]
    Refused(readonly::Refusal),
    /// The statement is wrong (unknown column, type error, …).
    #[error("{0}")]
    Invalid(String),
    /// It ran past the time limit.
    #[error("query ran past the time limit of {0:?}")]
    Timeout(Duration),
    /// It needed more memory than the limit allows.
    #[error("query needs more memory than sql.memoryLimitMb allows: {0}")]
    ResourcesExhausted(String),
    /// Our fault (I/O, a bug).
    #[error("query failed: {0}")]
    Internal(String),
}

impl Classify for QueryError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Refused(_) | Self::Invalid(_) | Self::ResourcesExhausted(_) => {
                ErrorKind::InvalidInput
            }
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Refused(readonly::Refusal::Syntax(_)) => "invalid_sql",
            Self::Refused(_) => "statement_not_allowed",
            Self::Invalid(_) => "invalid_query",
            Self::Timeout(_) => "query_timeout",
            Self::ResourcesExhausted(_) => "query_resources_exhausted",
            Self::Internal(_) => "query_failed",
        }
    }
}

impl From<DataFusionError> for QueryError {
    fn from(error: DataFusionError) -> Self {
        match error.find_root() {
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_) => Self::Invalid(error.to_string()),
            DataFusionError::ResourcesExhausted(message) => {
                Self::ResourcesExhausted(message.clone())
            }
            _ => Self::Internal(error.to_string()),
        }
    }
}

/// How many times a query runs when files vanish under it (another process compacting).
const VANISHED_FILE_ATTEMPTS: u32 = 6;

/// Runs `attempt` until it does not fail for a vanished file. Another process's compaction can
/// remove a file between a query's listing and its reading; a fresh listing sees the merged
/// file instead. A busy archiver can do it again meanwhile, so a few attempts, each later.
async fn retry_vanished<T, F, Fut>(mut attempt: F) -> Result<T, QueryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueryError>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(QueryError::Internal(message))
                if tries < VANISHED_FILE_ATTEMPTS && file_vanished(&message) =>
            {
                tracing::debug!(tries, %message, "a file vanished under a query; retrying");
                tokio::time::sleep(Duration::from_millis(25 * u64::from(tries))).await;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Whether a query failed because a file it listed was gone when it read it.
fn file_vanished(message: &str) -> bool {
    message.contains("No such file")
        || message.contains("NotFound")
        || message.contains("not found")
}

/// A query's answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Column names and types.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// Whether the row cap cut the answer.
    pub truncated: bool,
    /// Planning and execution time.
    pub elapsed: Duration,
}

impl QueryResult {
    /// Rows in the answer.
    pub fn row_count(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Runs SQL over a data dir, on threads of its own so that a heavy query never delays the
/// ingest path's acks.
pub struct QueryEngine {
    ctx: SessionContext,
    settings: SqlSettings,
    data_dir: PathBuf,
    runtime: SqlRuntime,
}

/// The query threads; shut down without blocking when the engine is dropped.
struct SqlRuntime(Option<tokio::runtime::Runtime>);

impl Drop for SqlRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl QueryEngine {
    /// Opens the tables of `data_dir` and the views of `config`.
    pub async fn open(data_dir: &Path, config: &Config) -> Result<Self, QueryError> {
        let settings = config.sql.clone();
        // No list-files cache: DataFusion's default keeps a table's file list forever, and the
        // archive adds a file every commit and swaps files on compaction.
        let caches = CacheManagerConfig::default().with_list_files_cache_limit(0);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(settings.memory_limit_mb.saturating_mul(1024 * 1024), 1.0)
            .with_cache_manager(caches)
            .build_arc()?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        // DATAFUSION_* environment variables tune the engine (e.g.
        // DATAFUSION_EXECUTION_PARQUET_PUSHDOWN_FILTERS=true); northstar's own settings win.
        let session = SessionConfig::from_env()
            .unwrap_or_default()
            .with_information_schema(true)
            .with_target_partitions(threads);
        let mut ctx = SessionContext::new_with_config_rt(session, runtime);
        datafusion_functions_json::register_all(&mut ctx)?;
        tables::register_all(&ctx, data_dir, config).await?;
        let threads = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("northstar-sql")
            .enable_all()
            .build()
            .map_err(|e| QueryError::Internal(format!("starting query threads: {e}")))?;
        Ok(Self {
            ctx,
            settings,
            data_dir: data_dir.to_path_buf(),
            runtime: SqlRuntime(Some(threads)),
        })
    }

    /// The DataFusion session, for components that register more tables or run their own plans.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The data dir the tables live in.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Runs one read-only statement under the time limit and row cap.
    pub async fn run(&self, sql: &str) -> Result<QueryResult, QueryError> {
        readonly::check(sql).map_err(QueryError::Refused)?;
        retry_vanished(|| self.run_once(sql)).await
    }

    /// Runs a statement of northstar's own (pipelines, verification): no read-only check and
    /// no row cap, but the same threads and time limit.
    pub async fn collect_internal(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        retry_vanished(|| self.collect_internal_once(sql)).await
    }

    async fn collect_internal_once(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        let limit = self.settings.timeout.get();
        let Some(runtime) = self.runtime.0.as_ref() else {
            return Err(QueryError::Internal("query threads are gone".into()));
        };
        let ctx = self.ctx.clone();
        let sql = sql.to_string();
        let mut task = runtime.spawn(async move {
            let _files = crate::archive::compact::SWAP_LOCK.read().await;
            let frame = ctx.sql(&sql).await?;
            frame.collect().await
        });
        match tokio::time::timeout(limit, &mut task).await {
            Ok(joined) => {
                Ok(joined
                    .map_err(|e| QueryError::Internal(format!("query task failed: {e}")))??)
            }
            Err(_) => {
                task.abort();
                Err(QueryError::Timeout(limit))
            }
        }
    }

    async fn run_once(&self, sql: &str) -> Result<QueryResult, QueryError> {
        let limit = self.settings.timeout.get();
        let Some(runtime) = self.runtime.0.as_ref() else {
            return Err(QueryError::Internal("query threads are gone".into()));
        };
        let ctx = self.ctx.clone();
        let sql = sql.to_string();
        let max_rows = self.settings.max_rows;
        let mut task = runtime.spawn(async move {
            // In-process compactions wait while a query runs, so it never sees a day twice.
            let _files = crate::archive::compact::SWAP_LOCK.read().await;
            execute(&ctx, &sql, max_rows).await
        });
        match tokio::time::timeout(limit, &mut task).await {
            Ok(joined) => {
                joined.map_err(|e| QueryError::Internal(format!("query task failed: {e}")))?
            }
            Err(_) => {
                task.abort();
                Err(QueryError::Timeout(limit))
            }
        }
    }
}

/// Plans and runs one statement, keeping at most `max_rows` rows.
async fn execute(
    ctx: &SessionContext,
    sql: &str,
    max_rows: usize,
) -> Result<QueryResult, QueryError> {
    let started = Instant::now();
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let frame = ctx.sql_with_options(sql, options).await?;
    let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
    let mut stream = frame.execute_stream().await?;
    let mut batches = Vec::new();
    let mut rows = 0;
    let mut truncated = false;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let room = max_rows - rows;
        if batch.num_rows() > room {
            batches.push(batch.slice(0, room));
            truncated = true;
            break;
        }
        rows += batch.num_rows();
        batches.push(batch);
    }
    Ok(QueryResult {
        schema,
        batches,
        truncated,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_query_whose_files_vanish_is_retried_and_other_failures_are_not() {
        let vanished = || QueryError::Internal("Object at location x.parquet not found".into());
        let mut calls = 0;
        let answer = retry_vanished(|| {
            calls += 1;
            let result = if calls < 3 {
                Err(vanished())
            } else {
                Ok(calls)
            };
            async move { result }
        })
        .await;
        assert_eq!(answer.ok(), Some(3), "vanished files: listed again");

        let mut calls = 0;
        let answer: Result<(), _> = retry_vanished(|| {
            calls += 1;
            async { Err(vanished()) }
        })
        .await;
        assert!(answer.is_err(), "gives up");
        assert_eq!(calls, VANISHED_FILE_ATTEMPTS);

        let mut calls = 0;
        let answer: Result<(), _> = retry_vanished(|| {
            calls += 1;
            async { Err(QueryError::Internal("disk on fire".into())) }
        })
        .await;
        assert!(answer.is_err());
        assert_eq!(calls, 1, "other failures are not retried");
    }
}
