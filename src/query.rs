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

use crate::config::SqlSettings;
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

/// Runs SQL over a data dir.
pub struct QueryEngine {
    ctx: SessionContext,
    settings: SqlSettings,
    data_dir: PathBuf,
}

impl QueryEngine {
    /// Opens the tables of `data_dir`.
    pub fn open(data_dir: &Path, settings: SqlSettings) -> Result<Self, QueryError> {
        // No list-files cache: DataFusion's default keeps a table's file list forever, and the
        // archive adds a file every commit and swaps files on compaction.
        let caches = CacheManagerConfig::default().with_list_files_cache_limit(0);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(settings.memory_limit_mb.saturating_mul(1024 * 1024), 1.0)
            .with_cache_manager(caches)
            .build_arc()?;
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            );
        let mut ctx = SessionContext::new_with_config_rt(config, runtime);
        datafusion_functions_json::register_all(&mut ctx)?;
        tables::register_all(&ctx, data_dir)?;
        Ok(Self {
            ctx,
            settings,
            data_dir: data_dir.to_path_buf(),
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
        let limit = self.settings.timeout.get();
        let first = tokio::time::timeout(limit, self.execute(sql)).await;
        match first {
            Err(_) => Err(QueryError::Timeout(limit)),
            // A compaction can remove a file between listing and reading; the second listing
            // sees the merged file instead.
            Ok(Err(QueryError::Internal(message)))
                if message.contains("No such file") || message.contains("NotFound") =>
            {
                tokio::time::timeout(limit, self.execute(sql))
                    .await
                    .map_err(|_| QueryError::Timeout(limit))?
            }
            Ok(result) => result,
        }
    }

    async fn execute(&self, sql: &str) -> Result<QueryResult, QueryError> {
        let started = Instant::now();
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let frame = self.ctx.sql_with_options(sql, options).await?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let mut stream = frame.execute_stream().await?;
        let mut batches = Vec::new();
        let mut rows = 0;
        let mut truncated = false;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let room = self.settings.max_rows - rows;
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
}
