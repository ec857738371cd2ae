//! SQL over the archive with DataFusion: `northstar sql` and `POST /v1/sql`.
//!
//! - [`tables`]: the tables registered over the Parquet files;
//! - [`readonly`]: the read-only statement check;
//! - [`output`]: table, CSV, JSON and Arrow IPC answers.
//!
//! - [`bounds`]: how long and deep a statement may be;
//! - [`dialect`]: the parser's dialect, with a bound on its work;
//! - [`functions`]: the functions that make large values, bounded per call;
//! - [`answer`]: collecting an answer within its row and byte bounds;
//! - [`quantity`]: `metered_quantity`, the meter's quantity parser in SQL.
//!
//! Every query runs under a time limit, a row cap, a byte cap and a memory limit, on threads
//! of its own, and is cancelled as soon as nobody awaits its answer. JSON properties are
//! queryable with `properties->>'plan'` and the `json_*` functions.

pub mod answer;
pub mod bounds;
pub mod dialect;
pub mod functions;
pub mod output;
pub mod persons;
pub mod quantity;
pub mod readonly;
pub mod tables;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement;

use crate::config::{Config, SqlSettings};
use crate::error::{Classify, ErrorKind};
use answer::AnswerBounds;
pub use answer::Truncation;
pub use output::Format;

/// `text` as a SQL string literal (`'it''s'`): the one way northstar puts a value from config
/// or a request into SQL it writes itself.
pub(crate) fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Stack of each query thread. What [`bounds`] admits needs about 4 MiB in a debug build
/// (DataFusion's planner and evaluator take several KiB per level of an expression, and the
/// tree of a statement at [`bounds::MAX_TOKENS`] takes 64 bytes per level to drop); the rest
/// is margin. Only the pages a query touches are ever resident.
pub(crate) const SQL_THREAD_STACK_BYTES: usize = 16 * 1024 * 1024;

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
    /// A function would have made a value over the bound of one call.
    #[error("{0}")]
    ValueTooLarge(String),
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
            Self::Refused(_)
            | Self::Invalid(_)
            | Self::ValueTooLarge(_)
            | Self::ResourcesExhausted(_) => ErrorKind::InvalidInput,
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Refused(readonly::Refusal::Syntax(_)) => "invalid_sql",
            Self::Refused(readonly::Refusal::OverBound(_)) => "statement_too_complex",
            Self::Refused(_) => "statement_not_allowed",
            Self::Invalid(_) => "invalid_query",
            Self::ValueTooLarge(_) => "value_too_large",
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
            | DataFusionError::NotImplemented(_)
            // Raised while evaluating the statement's own expressions over the rows: a
            // division by zero, a cast or parse of a value, an argument a function refuses.
            | DataFusionError::Execution(_) => Self::Invalid(error.to_string()),
            DataFusionError::ArrowError(arrow, _) if is_about_values(arrow) => {
                Self::Invalid(error.to_string())
            }
            DataFusionError::ResourcesExhausted(message) => {
                Self::ResourcesExhausted(message.clone())
            }
            DataFusionError::External(inner) if inner.is::<functions::ValueTooLarge>() => {
                Self::ValueTooLarge(inner.to_string())
            }
            _ => Self::Internal(error.to_string()),
        }
    }
}

/// Whether an Arrow error is about the values a statement computes (the user's to fix), not
/// about reading or writing data.
fn is_about_values(error: &ArrowError) -> bool {
    matches!(
        error,
        ArrowError::DivideByZero
            | ArrowError::CastError(_)
            | ArrowError::ParseError(_)
            | ArrowError::ArithmeticOverflow(_)
            | ArrowError::InvalidArgumentError(_)
            | ArrowError::ComputeError(_)
    )
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

/// Whether a query failed because a file it listed was gone, or replaced, when it read it.
/// The identity table and the usage pipelines' day files are rewritten in place (a new file
/// renamed over the old one, outside the swap lock compactions take): a query that read the
/// old footer and then pages of the new file fails to decode them (zstd: "Src size is
/// incorrect"). Run again, it reads the new file whole.
fn file_vanished(message: &str) -> bool {
    message.contains("No such file")
        || message.contains("NotFound")
        || message.contains("not found")
        || message.contains("Parquet")
}

/// A query's answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Column names and types.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// Which bound cut the answer, if one did.
    pub truncated: Option<Truncation>,
    /// Most bytes the answer may take, encoded too (`sql.maxAnswerBytes`).
    pub byte_bound: usize,
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
    /// Query tasks alive on the query threads now (`northstar_sql_queries_running`).
    running: Arc<AtomicUsize>,
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
        Self::open_live(data_dir, config, &tables::LiveTables::default()).await
    }

    /// Opens the tables of `data_dir`, with the archivers' uncommitted rows of `live` read
    /// beside the archived tables' files, and the views of `config`.
    pub async fn open_live(
        data_dir: &Path,
        config: &Config,
        live: &tables::LiveTables,
    ) -> Result<Self, QueryError> {
        let settings = config.sql.clone();
        // No list-files cache: DataFusion's default keeps a table's file list forever, and the
        // archive adds a file every commit and swaps files on compaction. The footer and
        // statistics caches are bounded by the config: entries of replaced files leave only
        // when a cache is full, so what they may hold is memory the server keeps.
        let mib = |n: usize| n.saturating_mul(1024 * 1024);
        let caches = CacheManagerConfig::default()
            .with_list_files_cache_limit(0)
            .with_metadata_cache_limit(mib(settings.metadata_cache_mb))
            .with_file_statistics_cache_limit(mib(settings.statistics_cache_mb));
        let memory_limit = settings.memory_limit_mb.saturating_mul(1024 * 1024);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(memory_limit, 1.0)
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
        functions::register(&ctx, memory_limit / 16);
        quantity::register(&ctx);
        persons::register(&ctx);
        tables::register_all(&ctx, data_dir, config, live).await?;
        let threads = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("northstar-sql")
            .thread_stack_size(SQL_THREAD_STACK_BYTES)
            .enable_all()
            .build()
            .map_err(|e| QueryError::Internal(format!("starting query threads: {e}")))?;
        Ok(Self {
            ctx,
            settings,
            data_dir: data_dir.to_path_buf(),
            runtime: SqlRuntime(Some(threads)),
            running: Arc::default(),
        })
    }

    /// Query tasks alive on the query threads now: a query given up (timed out, its client
    /// gone) stops counting once its task is cancelled.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// The DataFusion session, for components that register more tables or run their own plans.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The query threads, for work that runs its own statements (the Postgres wire's sessions).
    pub fn query_threads(&self) -> Option<tokio::runtime::Handle> {
        self.runtime
            .0
            .as_ref()
            .map(|runtime| runtime.handle().clone())
    }

    /// The data dir the tables live in.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Runs one read-only statement within the bounds: the gate ([`readonly::admit`]), the
    /// time limit, the row and byte caps. The gate runs on the query threads too, whose stack
    /// is sized for what it admits and for dropping what it refuses.
    pub async fn run(&self, sql: &str) -> Result<QueryResult, QueryError> {
        let bounds = AnswerBounds {
            rows: self.settings.max_rows,
            bytes: self.settings.answer_bytes(),
        };
        retry_vanished(|| {
            let sql = sql.to_string();
            self.on_query_threads(move |ctx| async move {
                let statement = readonly::admit(&sql).map_err(QueryError::Refused)?;
                execute(&ctx, statement, bounds).await
            })
        })
        .await
    }

    /// Runs a statement of northstar's own (pipelines, verification): no read-only check and
    /// no caps, but the same threads and time limit. Its text is northstar's, with users'
    /// values only inside quoted literals, so it needs no depth bound.
    pub async fn collect_internal(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        retry_vanished(|| {
            let sql = sql.to_string();
            self.on_query_threads(
                move |ctx| async move { Ok(ctx.sql(&sql).await?.collect().await?) },
            )
        })
        .await
    }

    /// Runs `work` on the query threads under the time limit. The work is cancelled when the
    /// limit passes and when the returned future is dropped (a client that went away, a
    /// request timer that answered first).
    async fn on_query_threads<T, F, Fut>(&self, work: F) -> Result<T, QueryError>
    where
        F: FnOnce(SessionContext) -> Fut,
        Fut: Future<Output = Result<T, QueryError>> + Send + 'static,
        T: Send + 'static,
    {
        let limit = self.settings.timeout.get();
        let Some(runtime) = self.runtime.0.as_ref() else {
            return Err(QueryError::Internal("query threads are gone".into()));
        };
        let work = work(self.ctx.clone());
        let alive = Running::enter(&self.running);
        let task = QueryTask(runtime.spawn(async move {
            let _alive = alive;
            // In-process compactions wait while a query runs, so it never sees a day twice.
            let _files = crate::archive::compact::SWAP_LOCK.read().await;
            work.await
        }));
        match tokio::time::timeout(limit, task).await {
            Ok(joined) => {
                joined.map_err(|e| QueryError::Internal(format!("query task failed: {e}")))?
            }
            Err(_) => Err(QueryError::Timeout(limit)),
        }
    }
}

/// One query task counted in [`QueryEngine::running`] while it lives (dropped with the task,
/// whether it ends or is aborted).
struct Running(Arc<AtomicUsize>);

impl Running {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A query's task, aborted when dropped: nobody awaits its answer any more. (Dropping a
/// plain `JoinHandle` detaches the task, which then runs to its end.) The abort takes effect
/// at the task's next yield; DataFusion's streams yield between batches.
struct QueryTask<T>(tokio::task::JoinHandle<T>);

impl<T> Future for QueryTask<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for QueryTask<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Plans and runs one admitted statement, keeping what `bounds` allow.
async fn execute(
    ctx: &SessionContext,
    statement: Statement,
    bounds: AnswerBounds,
) -> Result<QueryResult, QueryError> {
    let started = Instant::now();
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let plan = ctx.state().statement_to_plan(statement).await?;
    options.verify_plan(&plan)?;
    let frame = ctx.execute_logical_plan(plan).await?;
    let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
    let (batches, truncated) = answer::collect(frame.execute_stream().await?, bounds).await?;
    Ok(QueryResult {
        schema,
        batches,
        truncated,
        byte_bound: bounds.bytes,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_literal_doubles_its_quotes() {
        assert_eq!(string_literal("it's"), "'it''s'");
        assert_eq!(string_literal("''"), "''''''");
        assert_eq!(string_literal(""), "''");
    }

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

        // A file replaced between reading its footer and its pages (seen in the docs test:
        // the identity table rewritten during the aha recompute after an import).
        let replaced = "Arrow error: Parquet argument error: External: Src size is incorrect";
        let mut calls = 0;
        let answer = retry_vanished(|| {
            calls += 1;
            let result = match calls {
                1 => Err(QueryError::Internal(replaced.into())),
                _ => Ok(calls),
            };
            async move { result }
        })
        .await;
        assert_eq!(answer.ok(), Some(2), "a replaced file: read again");
    }
}
