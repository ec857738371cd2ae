//! The Postgres wire's sandbox: the same walls as `/v1/sql`, and Postgres error codes.
//!
//! Text is checked against the statement bounds before anything parses it
//! ([`admit_text`]); each parsed statement must be read-only ([`ReadOnly`], the first query
//! hook, so it runs before anything plans or executes). A session may also begin and end
//! transactions and `SET` what a Postgres client sets
//! for itself; `SET datafusion.…` would change the engine every session shares, and is
//! refused. Errors carry the SQLSTATE a Postgres client expects ([`sql_error`]).

use async_trait::async_trait;
use datafusion::common::{DFSchema, ParamValues};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion_postgres::QueryHook;
use datafusion_postgres::hooks::HookClient;
use pgwire::api::ClientInfo;
use pgwire::api::results::{Response, Tag};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};

use crate::query::readonly::{self, Refusal};
use crate::query::{QueryError, bounds};

/// Settings a Postgres client keeps for its own session; the session hooks answer them.
const SESSION_SETTINGS: &[&str] = &[
    "statement_timeout",
    "datestyle",
    "bytea_output",
    "intervalstyle",
    "application_name",
    "extra_float_digits",
    "search_path",
];

/// An error with a SQLSTATE.
pub(crate) fn error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

/// Refuses text over the statement bounds before it is parsed: the parser's work and the
/// depth of what it builds grow with them.
pub(crate) fn admit_text(sql: &str) -> PgWireResult<()> {
    bounds::check_text(sql)
        .map(drop)
        .map_err(|refusal| refusal_error(&refusal))
}

fn refusal_error(refusal: &Refusal) -> PgWireError {
    let code = match refusal {
        Refusal::Syntax(_) => "42601",
        Refusal::OverBound(_) => "54001",
        Refusal::NotReadOnly(_) | Refusal::StatementCount(_) => "42501",
    };
    error(code, refusal.to_string())
}

/// What becomes of one statement.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The session's hooks or the engine answer it.
    Run,
    /// Answered with this tag, changing nothing: a setting northstar does not keep, or a
    /// savepoint in a transaction that only reads.
    Ignore(&'static str),
    /// Refused.
    Refuse(Refusal),
    /// Not supported here, and why.
    Unsupported(&'static str),
}

fn verdict(statement: &Statement) -> Verdict {
    match statement {
        Statement::Set(set) => set_verdict(set),
        Statement::Savepoint { .. } => Verdict::Ignore("SAVEPOINT"),
        Statement::ReleaseSavepoint { .. } => Verdict::Ignore("RELEASE"),
        Statement::Rollback {
            savepoint: Some(_), ..
        } => Verdict::Ignore("ROLLBACK"),
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowSchemas { .. } => Verdict::Run,
        // A cursor's portal describes no columns (the engine plans it only when declared),
        // which drivers cannot read its rows by: psycopg's named cursors crash on them. Rows
        // stream without a cursor, so none is needed to read a large answer.
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. } => {
            Verdict::Unsupported(
                "server-side cursors (DECLARE, FETCH) are not supported: run the query itself, \
                 whose rows stream as they are made (in psycopg, a cursor without a name)",
            )
        }
        other => match readonly::check_statement(other) {
            Ok(()) => Verdict::Run,
            Err(refusal) => Verdict::Refuse(refusal),
        },
    }
}

fn set_verdict(set: &Set) -> Verdict {
    match set {
        Set::SingleAssignment { variable, .. } => {
            let name = variable.to_string().to_ascii_lowercase();
            if name.starts_with("datafusion.") {
                Verdict::Refuse(Refusal::NotReadOnly(format!(
                    "SET {name} (the engine's settings are northstar's: see the sql section of the config)"
                )))
            } else if SESSION_SETTINGS.contains(&name.as_str()) {
                Verdict::Run
            } else {
                Verdict::Ignore("SET")
            }
        }
        Set::SetTimeZone { .. } => Verdict::Run,
        _ => Verdict::Ignore("SET"),
    }
}

/// The first query hook: refuses what is not read-only, answers settings northstar ignores.
pub(crate) struct ReadOnly;

/// The gate's own answer to a statement, if it gives one: `None` lets the statement run.
fn answer(statement: &Statement) -> Option<PgWireResult<Response>> {
    match verdict(statement) {
        Verdict::Run => None,
        Verdict::Ignore(tag) => Some(Ok(Response::Execution(Tag::new(tag)))),
        Verdict::Refuse(refusal) => Some(Err(refusal_error(&refusal))),
        Verdict::Unsupported(why) => Some(Err(error("0A000", why))),
    }
}

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _session_context: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        answer(statement)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _session_context: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        // A statement answered without the engine plans to nothing; it is answered at execute.
        answer(statement).map(|answered| {
            answered.map(|_| {
                LogicalPlan::EmptyRelation(EmptyRelation {
                    produce_one_row: false,
                    schema: std::sync::Arc::new(DFSchema::empty()),
                })
            })
        })
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _logical_plan: &LogicalPlan,
        _params: &ParamValues,
        _session_context: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        answer(statement)
    }
}

/// Gives an engine error the SQLSTATE a Postgres client acts on; other errors pass as they
/// are.
pub(crate) fn sql_error(failure: PgWireError) -> PgWireError {
    let PgWireError::ApiError(inner) = failure else {
        return failure;
    };
    let inner = match inner.downcast::<DataFusionError>() {
        Ok(engine) => return engine_error(*engine),
        Err(other) => other,
    };
    error("XX000", inner.to_string())
}

fn engine_error(engine: DataFusionError) -> PgWireError {
    let code = match engine.find_root() {
        DataFusionError::SQL(..) => "42601",
        DataFusionError::SchemaError(..) => "42703",
        DataFusionError::Plan(message) if message.contains("not found") => "42P01",
        DataFusionError::Plan(_) => "42000",
        DataFusionError::NotImplemented(_) => "0A000",
        DataFusionError::ResourcesExhausted(_) => "53200",
        _ => match QueryError::from(engine) {
            QueryError::Invalid(message) => return error("22000", message),
            QueryError::ValueTooLarge(message) => return error("54000", message),
            QueryError::ResourcesExhausted(message) => return error("53200", message),
            other => return error("XX000", other.to_string()),
        },
    };
    error(code, QueryError::from(engine).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;

    fn verdict_of(sql: &str) -> Verdict {
        let mut statements = PostgresCompatibilityParser::new()
            .parse(sql)
            .expect("parses");
        verdict(&statements.remove(0))
    }

    #[test]
    fn reads_run_and_writes_are_refused() {
        for sql in [
            "SELECT count(*) FROM events",
            "EXPLAIN SELECT 1",
            "BEGIN",
            "COMMIT",
            "SHOW search_path",
            "SET application_name = 'psql'",
            "SET TIME ZONE 'UTC'",
        ] {
            assert_eq!(verdict_of(sql), Verdict::Run, "{sql}");
        }
        assert!(matches!(
            verdict_of("DECLARE c CURSOR FOR SELECT 1"),
            Verdict::Unsupported(_)
        ));
        assert_eq!(verdict_of("SET work_mem = '64MB'"), Verdict::Ignore("SET"));
        assert_eq!(verdict_of("SAVEPOINT s1"), Verdict::Ignore("SAVEPOINT"));
        assert_eq!(
            verdict_of("ROLLBACK TO SAVEPOINT s1"),
            Verdict::Ignore("ROLLBACK")
        );
        for sql in [
            "INSERT INTO events SELECT * FROM events",
            "CREATE TABLE t AS SELECT 1",
            "DROP TABLE events",
            "COPY events TO '/tmp/out.csv'",
            "SET datafusion.execution.batch_size = 1",
        ] {
            assert!(
                matches!(verdict_of(sql), Verdict::Refuse(_)),
                "{sql} must be refused"
            );
        }
    }
}
