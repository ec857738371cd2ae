//! The SQL sandbox's first wall: only one read-only statement per request, within bounds.
//!
//! The statement is parsed with DataFusion's own parser, within a budget of work
//! ([`super::dialect`]), and must be a query, `EXPLAIN`, `SHOW`
//! or `DESCRIBE`, no longer and no deeper than [`super::bounds`] allows. DataFusion's
//! [`SQLOptions`](datafusion::execution::context::SQLOptions) are the second wall (no DDL, DML
//! or `SET` even inside an `EXPLAIN`), and the session registers no file-reading table
//! functions and no URL tables, so only northstar's tables are visible.

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;

use super::bounds;
pub use super::bounds::Refusal;
use super::dialect;

/// The gate of `/v1/sql` and `northstar sql`: `sql` must be one read-only statement within
/// the bounds. Returns the parsed statement, which is what gets planned, so what was checked
/// is what runs.
///
/// Never panics and never recurses deeper than the bounds, whatever the text (a fuzz target
/// holds it to that), so it is safe on any thread.
pub(crate) fn admit(sql: &str) -> Result<DfStatement, Refusal> {
    let tokens = bounds::check_text(sql)?;
    let mut statements = dialect::parse(sql, tokens)?;
    if statements.len() != 1 {
        return Err(Refusal::StatementCount(statements.len()));
    }
    let Some(statement) = statements.pop_front() else {
        return Err(Refusal::StatementCount(0));
    };
    match &statement {
        DfStatement::Statement(inner) => check_statement(inner)?,
        DfStatement::Explain(explain) => match explain.statement.as_ref() {
            DfStatement::Statement(inner) => check_statement(inner)?,
            other => return Err(Refusal::NotReadOnly(extension_name(other).into())),
        },
        other => return Err(Refusal::NotReadOnly(extension_name(other).into())),
    }
    Ok(statement)
}

/// Checks that `sql` is one read-only statement within the bounds.
pub fn check(sql: &str) -> Result<(), Refusal> {
    admit(sql).map(drop)
}

/// Bounds first: the refusal of a statement that is not read-only prints its start, and
/// printing walks the whole tree.
pub(crate) fn check_statement(statement: &Statement) -> Result<(), Refusal> {
    bounds::check_tree(statement)?;
    read_only(statement)
}

fn read_only(statement: &Statement) -> Result<(), Refusal> {
    match statement {
        Statement::Query(query) => nested_writes(query),
        Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ExplainTable { .. } => Ok(()),
        Statement::Explain { statement, .. } => read_only(statement),
        other => Err(Refusal::NotReadOnly(first_word(&other.to_string()))),
    }
}

/// Refuses a query that holds a statement: the parser takes `(INSERT INTO t …)` as a query
/// body (found by the sql_sandbox fuzz target). The planner's options would refuse it too;
/// this wall does not rely on them.
fn nested_writes(query: &datafusion::sql::sqlparser::ast::Query) -> Result<(), Refusal> {
    use datafusion::sql::sqlparser::ast::{Visit, Visitor};
    use std::ops::ControlFlow;
    struct Statements;
    impl Visitor for Statements {
        type Break = String;
        fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<String> {
            ControlFlow::Break(first_word(&statement.to_string()))
        }
    }
    match query.visit(&mut Statements) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(kind) => Err(Refusal::NotReadOnly(kind)),
    }
}

/// The kind of one of DataFusion's own statements (none is read-only), without printing it.
fn extension_name(statement: &DfStatement) -> &'static str {
    match statement {
        DfStatement::Statement(_) => "statement",
        DfStatement::CreateExternalTable(_) => "CREATE EXTERNAL TABLE",
        DfStatement::CopyTo(_) => "COPY",
        DfStatement::Explain(_) => "EXPLAIN",
        DfStatement::Reset(_) => "RESET",
    }
}

fn first_word(text: &str) -> String {
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pass() {
        for sql in [
            "SELECT 1",
            "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
            "EXPLAIN SELECT * FROM events",
            "SHOW TABLES",
            "SHOW COLUMNS FROM events",
            "DESCRIBE events",
        ] {
            assert_eq!(check(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn writes_and_escapes_are_refused() {
        for sql in [
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "COPY events TO '/tmp/out.parquet'",
            "INSERT INTO events VALUES (1)",
            "DROP TABLE events",
            "SET datafusion.execution.batch_size = 1",
            "CREATE TABLE t AS SELECT 1",
            "EXPLAIN COPY events TO '/tmp/x.csv'",
            "EXPLAIN CREATE TABLE t AS SELECT 1",
            // Found by the sql_sandbox fuzz target: an INSERT taken as a query body.
            "(INSERT INTO t SELECT 1)",
            "SELECT * FROM ((INSERT INTO t SELECT 1)) x",
        ] {
            assert!(matches!(check(sql), Err(Refusal::NotReadOnly(_))), "{sql}");
        }
        assert_eq!(check("SELECT 1; SELECT 2"), Err(Refusal::StatementCount(2)));
        assert!(matches!(check("SELEC 1"), Err(Refusal::Syntax(_))));
    }
}
