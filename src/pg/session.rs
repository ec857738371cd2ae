//! One Postgres session's statements: the engine's tables under the database name
//! `northstar`, `pg_catalog` and `information_schema` beside them, and each statement within the sandbox's bounds.
//!
//! Statements are parsed, planned and executed by `datafusion-postgres` (which rewrites the
//! catalog queries psql, DBeaver, Metabase and Grafana send into ones DataFusion plans) on
//! the query threads. Around it, [`Gated`] checks the text first ([`gate::admit_text`]),
//! and bounds each statement from its start to its last row: `sql.timeout` (or the
//! session's shorter `statement_timeout`), a cancel request, and `sql.maxRows`. Rows stream
//! to the client as they are made, so an answer is never held whole in memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::array::{Array, Int32Array, StringArray};
use arrow::datatypes::DataType;
use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider, MemoryCatalogProviderList};
use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::SessionContext;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::QueryHook;
use datafusion_postgres::hooks::{set_show::SetShowHook, transactions::TransactionStatementHook};
use datafusion_postgres::{DfSessionService, Parser};
use futures::future::{Either, select};
use futures::{Sink, Stream};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, Type};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::data::DataRow;
use tokio::sync::RwLockReadGuard;
use tokio::time::Instant;

use super::auth::CancelSignal;
use super::gate::{self, ReadOnly};
use super::information_schema::PgInformationSchema;
use crate::archive::compact::SWAP_LOCK;
use crate::query::QueryEngine;

/// The database name clients connect to (any name is accepted; this is what
/// `current_database()` and the catalogs say).
pub const DATABASE: &str = "northstar";

/// The engine's tables as the Postgres wire shows them: the schema `public` of the database
/// [`DATABASE`] is the query engine's own schema (the same tables, caches, functions and
/// memory limit), with `pg_catalog` and `information_schema` beside it. The engine's own
/// catalogs are not changed, so `/v1/sql` sees no `pg_catalog`.
pub(crate) fn context(engine: &QueryEngine) -> Result<SessionContext, DataFusionError> {
    let main = engine.context();
    let state = main.state();
    let options = &state.config().options().catalog;
    let public = main
        .catalog(&options.default_catalog)
        .and_then(|catalog| catalog.schema(&options.default_schema))
        .ok_or_else(|| {
            DataFusionError::Internal("the query engine has no default schema".into())
        })?;
    let config = state
        .config()
        .clone()
        .with_default_catalog_and_schema(DATABASE, "public")
        // The engine's own would shadow the one registered below.
        .with_information_schema(false);
    let state = SessionStateBuilder::new_from_existing(state)
        .with_config(config)
        .with_catalog_list(Arc::new(MemoryCatalogProviderList::new()))
        .build();
    let ctx = SessionContext::new_with_state(state);
    // Registered after the state is built, which makes an empty default catalog of its own.
    let database = Arc::new(MemoryCatalogProvider::new());
    database.register_schema("public", public)?;
    ctx.register_catalog(DATABASE, database.clone());
    let catalogs = ctx.state().catalog_list().clone();
    database.register_schema(
        "information_schema",
        Arc::new(PgInformationSchema::new(catalogs, DATABASE)),
    )?;
    setup_pg_catalog(&ctx, DATABASE, EmptyContextProvider).map_err(|e| *e)?;
    ctx.register_udf(version());
    ctx.register_udf(to_regtype());
    ctx.register_udf(no_serial_sequence());
    Ok(ctx)
}

/// `pg_get_serial_sequence(table, column)`: always NULL, as no column here is fed by a
/// sequence. SQLAlchemy's inspector asks it of every column.
fn no_serial_sequence() -> ScalarUDF {
    create_udf(
        "pg_get_serial_sequence",
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|_| Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None)))),
    )
}

/// `to_regtype(name)`: the oid of a built-in type by its name, else NULL. Drivers look
/// types up by it at connect (psycopg and SQLAlchemy ask for `hstore`, which is not here).
fn to_regtype() -> ScalarUDF {
    create_udf(
        "to_regtype",
        vec![DataType::Utf8],
        DataType::Int32,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let [name] = args else {
                return Err(DataFusionError::Plan(
                    "to_regtype takes one argument".into(),
                ));
            };
            let names = name.to_array(1)?;
            let names = names
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| DataFusionError::Plan("to_regtype takes text".into()))?;
            let oids: Int32Array = names.iter().map(|n| n.and_then(builtin_type_oid)).collect();
            Ok(match name {
                ColumnarValue::Scalar(_) => {
                    ColumnarValue::Scalar(ScalarValue::try_from_array(&oids, 0)?)
                }
                ColumnarValue::Array(_) => ColumnarValue::Array(Arc::new(oids)),
            })
        }),
    )
}

/// The oid of a built-in type by a name Postgres accepts for it.
fn builtin_type_oid(name: &str) -> Option<i32> {
    let name = name.trim().trim_matches('"').to_ascii_lowercase();
    let name = name.strip_prefix("pg_catalog.").unwrap_or(&name);
    let canonical = match name {
        "boolean" => "bool",
        "smallint" => "int2",
        "integer" | "int" => "int4",
        "bigint" => "int8",
        "real" => "float4",
        "double precision" => "float8",
        "character varying" => "varchar",
        "decimal" => "numeric",
        "timestamp without time zone" => "timestamp",
        "timestamp with time zone" => "timestamptz",
        other => other,
    };
    [
        Type::BOOL,
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::NUMERIC,
        Type::TEXT,
        Type::VARCHAR,
        Type::BPCHAR,
        Type::NAME,
        Type::BYTEA,
        Type::DATE,
        Type::TIME,
        Type::TIMESTAMP,
        Type::TIMESTAMPTZ,
        Type::INTERVAL,
        Type::JSON,
        Type::JSONB,
        Type::UUID,
        Type::OID,
    ]
    .iter()
    .find(|t| t.name() == canonical)
    .and_then(|t| i32::try_from(t.oid()).ok())
}

/// The Postgres version the wire speaks for, as `server_version` says at login.
pub const POSTGRES_VERSION: &str = "16.6";

/// `version()` as Postgres answers it: drivers (SQLAlchemy among them) read the server's
/// version from its start.
fn version() -> ScalarUDF {
    let text = format!(
        "PostgreSQL {POSTGRES_VERSION} (northstar {}, Apache DataFusion)",
        env!("CARGO_PKG_VERSION")
    );
    create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_| Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(text.clone()))))),
    )
}

/// The bounds of one statement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatementBounds {
    /// `sql.timeout`.
    pub(crate) timeout: Duration,
    /// `sql.maxRows`.
    pub(crate) max_rows: usize,
}

/// `datafusion-postgres`'s session service within northstar's walls.
pub(crate) struct Gated {
    inner: Arc<DfSessionService>,
    parser: Arc<GatedParser>,
    bounds: StatementBounds,
}

impl Gated {
    pub(crate) fn new(ctx: SessionContext, bounds: StatementBounds) -> Self {
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(ReadOnly),
            Arc::new(SetShowHook),
            Arc::new(TransactionStatementHook),
        ];
        let inner = Arc::new(DfSessionService::new_with_hooks(Arc::new(ctx), hooks));
        let parser = Arc::new(GatedParser(ExtendedQueryHandler::query_parser(
            inner.as_ref(),
        )));
        Self {
            inner,
            parser,
            bounds,
        }
    }

    /// The watch over one statement, from now.
    fn watch<C: ClientInfo>(&self, client: &C) -> Watch {
        let session_timeout = datafusion_postgres_timeout(client);
        let timeout = session_timeout.map_or(self.bounds.timeout, |t| t.min(self.bounds.timeout));
        Watch {
            deadline: Instant::now() + timeout,
            timeout,
            max_rows: self.bounds.max_rows,
            // Only a cancel from now on stops this statement: earlier ones were for earlier
            // statements.
            cancel: client
                .session_extensions()
                .get::<CancelSignal>()
                .map(|signal| {
                    let mut signal = signal.as_ref().clone();
                    signal.0.borrow_and_update();
                    signal
                }),
            files: Arc::new(Mutex::new(None)),
        }
    }
}

/// The session's own `statement_timeout`, as `SET statement_timeout` keeps it.
fn datafusion_postgres_timeout<C: ClientInfo>(client: &C) -> Option<Duration> {
    client
        .metadata()
        .get("statement_timeout_ms")
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// What bounds one statement: its deadline, the cancel signal, the rows it may send, and the
/// hold on the archive's files (compactions wait while it reads them; released at the
/// deadline even if the client stops reading).
struct Watch {
    deadline: Instant,
    timeout: Duration,
    max_rows: usize,
    cancel: Option<CancelSignal>,
    files: Arc<Mutex<Option<RwLockReadGuard<'static, ()>>>>,
}

impl Watch {
    /// Takes the hold on the archive's files, let go at the deadline at the latest.
    async fn hold_files(&self) {
        let guard = SWAP_LOCK.read().await;
        if let Ok(mut files) = self.files.lock() {
            *files = Some(guard);
        }
        let (files, deadline) = (Arc::downgrade(&self.files), self.deadline);
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(files) = files.upgrade()
                && let Ok(mut files) = files.lock()
            {
                files.take();
            }
        });
    }

    /// Runs the start of a statement (parse, plan, the first work) until it answers, the
    /// deadline passes or the session is cancelled.
    async fn run<T>(&self, work: impl Future<Output = PgWireResult<T>>) -> PgWireResult<T> {
        let stop = std::pin::pin!(self.stopped());
        let work = std::pin::pin!(work);
        match select(work, stop).await {
            Either::Left((answer, _)) => answer.map_err(gate::sql_error),
            Either::Right((reason, _)) => Err(reason),
        }
    }

    /// Resolves with the error to send when the statement must stop.
    fn stopped(&self) -> impl Future<Output = PgWireError> + Send + 'static {
        let (deadline, timeout) = (self.deadline, self.timeout);
        let mut cancel = self.cancel.clone();
        async move {
            let cancelled = async {
                match cancel.as_mut() {
                    Some(CancelSignal(signal)) => {
                        if signal.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => gate::error(
                    "57014",
                    format!("canceling statement due to statement timeout ({timeout:?}; sql.timeout, or the session's statement_timeout)"),
                ),
                () = cancelled => gate::error("57014", "canceling statement due to user request"),
            }
        }
    }

    /// Bounds the rows of an answer.
    fn bound(&self, response: Response) -> Response {
        let Response::Query(answer) = response else {
            return response;
        };
        let QueryResponse {
            command_tag,
            row_schema,
            data_rows,
            ..
        } = answer;
        let rows = BoundedRows {
            rows: data_rows,
            left: self.max_rows,
            max_rows: self.max_rows,
            stop: Box::pin(self.stopped()),
            files: Some(self.files.clone()),
        };
        let mut bounded = QueryResponse::new(row_schema, rows);
        bounded.set_command_tag(&command_tag);
        Response::Query(bounded)
    }
}

/// An answer's rows, stopped by the deadline, a cancel, or `sql.maxRows`.
struct BoundedRows {
    rows: Pin<Box<dyn Stream<Item = PgWireResult<DataRow>> + Send>>,
    left: usize,
    max_rows: usize,
    stop: Pin<Box<dyn Future<Output = PgWireError> + Send>>,
    /// The hold on the archive's files; dropped with the last row.
    files: Option<Arc<Mutex<Option<RwLockReadGuard<'static, ()>>>>>,
}

impl BoundedRows {
    fn end(&mut self, last: Option<PgWireResult<DataRow>>) -> Poll<Option<PgWireResult<DataRow>>> {
        self.files = None;
        self.left = 0;
        Poll::Ready(last)
    }
}

impl Stream for BoundedRows {
    type Item = PgWireResult<DataRow>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.files.is_none() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(reason) = self.stop.as_mut().poll(cx) {
            return self.end(Some(Err(reason)));
        }
        match self.rows.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => self.end(None),
            Poll::Ready(Some(Err(error))) => self.end(Some(Err(gate::sql_error(error)))),
            Poll::Ready(Some(Ok(row))) if self.left == 0 => {
                drop(row);
                let max_rows = self.max_rows;
                self.end(Some(Err(gate::error(
                    "54000",
                    format!(
                        "the answer has more than {max_rows} rows, the bound sql.maxRows: add a LIMIT, \
                         aggregate, or page with a cursor"
                    ),
                ))))
            }
            Poll::Ready(Some(Ok(row))) => {
                self.left -= 1;
                Poll::Ready(Some(Ok(row)))
            }
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Gated {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        gate::admit_text(query)?;
        let watch = self.watch(client);
        watch.hold_files().await;
        let answers = watch
            .run(SimpleQueryHandler::do_query(
                self.inner.as_ref(),
                client,
                query,
            ))
            .await?;
        Ok(answers.into_iter().map(|a| watch.bound(a)).collect())
    }
}

#[async_trait]
impl ExtendedQueryHandler for Gated {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = GatedParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let watch = self.watch(client);
        watch.hold_files().await;
        let answer = watch
            .run(ExtendedQueryHandler::do_query(
                self.inner.as_ref(),
                client,
                portal,
                max_rows,
            ))
            .await?;
        Ok(watch.bound(answer))
    }
}

/// `datafusion-postgres`'s parser, after the text bounds.
pub(crate) struct GatedParser(Arc<Parser>);

#[async_trait]
impl QueryParser for GatedParser {
    type Statement = <Parser as QueryParser>::Statement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        gate::admit_text(sql)?;
        self.0
            .parse_sql(client, sql, types)
            .await
            .map_err(gate::sql_error)
    }

    fn get_parameter_types(&self, statement: &Self::Statement) -> PgWireResult<Vec<Type>> {
        self.0.get_parameter_types(statement)
    }

    fn get_result_schema(
        &self,
        statement: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        self.0.get_result_schema(statement, column_format)
    }
}
