//! The dialect statements are parsed in: DataFusion's own (`GenericDialect`), with a bound on
//! the parser's work.
//!
//! sqlparser retries a failed parse at many places (`maybe_parse`), and where those places
//! nest, a short statement that ends in a syntax error costs time exponential in its length:
//! the sql_sandbox fuzz target found six such shapes in turn (nested `CASE` and `CAST`, chains
//! of names and subscripts, odd segments after `.`), each a few hundred bytes that kept a
//! thread busy for hours. [`super::bounds`] refuses the shapes found, with an error that names
//! them; this budget refuses the ones nobody has found yet.
//!
//! The parser asks its dialect before every statement, expression prefix, infix operator and
//! precedence. [`Budgeted`] counts those questions and, once a statement has asked
//! [`WORK_PER_TOKEN`] per token (plus [`WORK_BASE`]), answers each of them with
//! `RecursionLimitExceeded`, the one error the parser never retries past. The parse then ends
//! at once, and [`parse`] refuses it with [`Bound::Work`]. The bound counts steps, not time,
//! so a statement is admitted or refused alike on a quiet and on a busy machine.

use std::cell::Cell;
use std::collections::VecDeque;

use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::ast::{Expr, Statement as SqlStatement};
use datafusion::sql::sqlparser::dialect::{Dialect, GenericDialect};
use datafusion::sql::sqlparser::parser::{Parser, ParserError};

use super::bounds::{Bound, Refusal, WORK_BASE, WORK_PER_TOKEN};

/// Parses `sql`, which has `tokens` tokens, within the budget on the parser's work.
pub fn parse(sql: &str, tokens: usize) -> Result<VecDeque<Statement>, Refusal> {
    let budget = WORK_BASE.saturating_add(WORK_PER_TOKEN.saturating_mul(tokens as u64));
    let dialect = Budgeted::new(budget);
    let parsed = DFParser::parse_sql_with_dialect(sql, &dialect);
    if dialect.spent() {
        return Err(Refusal::OverBound(Bound::Work));
    }
    parsed.map_err(|e| Refusal::Syntax(e.to_string()))
}

/// [`GenericDialect`] with a budget of parser questions; see the module's documentation.
#[derive(Debug)]
pub(crate) struct Budgeted {
    inner: GenericDialect,
    left: Cell<u64>,
    /// A question came after the budget was spent (a statement that fits it exactly is fine).
    over: Cell<bool>,
}

impl Budgeted {
    /// A dialect that lets the parser ask `budget` questions.
    pub(crate) fn new(budget: u64) -> Self {
        Self {
            inner: GenericDialect {},
            left: Cell::new(budget),
            over: Cell::new(false),
        }
    }

    /// Whether the budget ran out.
    pub(crate) fn spent(&self) -> bool {
        self.over.get()
    }

    /// Questions the parser may still ask.
    #[cfg(test)]
    fn left(&self) -> u64 {
        self.left.get()
    }

    /// Counts one question; `Some(error)` once the budget is spent.
    fn ask<T>(&self) -> Option<Result<T, ParserError>> {
        match self.left.get() {
            0 => {
                self.over.set(true);
                Some(Err(ParserError::RecursionLimitExceeded))
            }
            left => {
                self.left.set(left - 1);
                None
            }
        }
    }
}

/// Hands each question about the dialect's features to [`GenericDialect`]: every method it
/// overrides is listed, so the two parse alike (`query::dialect` tests compare them).
macro_rules! same_as_generic {
    ($($name:ident),* $(,)?) => {
        $(fn $name(&self) -> bool { self.inner.$name() })*
    };
}

impl Dialect for Budgeted {
    fn dialect(&self) -> std::any::TypeId {
        self.inner.dialect()
    }

    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        self.inner.is_delimited_identifier_start(ch)
    }

    fn is_identifier_start(&self, ch: char) -> bool {
        self.inner.is_identifier_start(ch)
    }

    fn is_identifier_part(&self, ch: char) -> bool {
        self.inner.is_identifier_part(ch)
    }

    fn parse_statement(&self, _parser: &mut Parser) -> Option<Result<SqlStatement, ParserError>> {
        self.ask()
    }

    fn parse_prefix(&self, _parser: &mut Parser) -> Option<Result<Expr, ParserError>> {
        self.ask()
    }

    fn parse_infix(
        &self,
        _parser: &mut Parser,
        _expr: &Expr,
        _precedence: u8,
    ) -> Option<Result<Expr, ParserError>> {
        self.ask()
    }

    fn get_next_precedence(&self, _parser: &Parser) -> Option<Result<u8, ParserError>> {
        self.ask()
    }

    same_as_generic!(
        supports_unicode_string_literal,
        supports_partition_by_after_order_by,
        supports_array_join_syntax,
        supports_group_by_expr,
        supports_group_by_with_modifier,
        supports_left_associative_joins_without_parens,
        supports_connect_by,
        supports_match_recognize,
        supports_pipe_operator,
        supports_start_transaction_modifier,
        supports_window_function_null_treatment_arg,
        supports_dictionary_syntax,
        supports_window_clause_named_window_reference,
        supports_parenthesized_set_variables,
        supports_select_wildcard_except,
        support_map_literal_syntax,
        allow_extract_custom,
        allow_extract_single_quotes,
        supports_extract_comma_syntax,
        supports_create_view_comment_syntax,
        supports_parens_around_table_factor,
        supports_values_as_table_factor,
        supports_create_index_with_clause,
        supports_explain_with_utility_options,
        supports_limit_comma,
        supports_update_order_by,
        supports_from_first_select,
        supports_projection_trailing_commas,
        supports_asc_desc_in_column_definition,
        supports_try_convert,
        supports_bitwise_shift_operators,
        supports_comment_on,
        supports_load_extension,
        supports_named_fn_args_with_assignment_operator,
        supports_struct_literal,
        supports_empty_projections,
        supports_nested_comments,
        supports_multiline_comment_hints,
        supports_user_host_grantee,
        supports_string_escape_constant,
        supports_array_typedef_with_brackets,
        supports_match_against,
        supports_set_names,
        supports_comma_separated_set_assignments,
        supports_filter_during_aggregation,
        supports_select_wildcard_exclude,
        supports_data_type_signed_suffix,
        supports_interval_options,
        supports_quote_delimited_string,
        supports_select_wildcard_replace,
        supports_select_wildcard_ilike,
        supports_select_wildcard_rename,
        supports_optimize_table,
        supports_install,
        supports_detach,
        supports_prewhere,
        supports_with_fill,
        supports_limit_by,
        supports_interpolate,
        supports_settings,
        supports_select_format,
        supports_comment_optimizer_hint,
        supports_constraint_keyword_without_name,
        supports_key_column_option,
        supports_comma_separated_trim,
        supports_cte_without_as,
        supports_select_item_multi_column_alias,
        supports_xml_expressions
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::bounds::check_text;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

    /// Statements people write: the ones shipped in `queries/`, and the shapes of the README.
    fn real_statements() -> Vec<String> {
        let mut statements: Vec<String> = [
            include_str!("../../queries/api_usage_by_customer.sql"),
            include_str!("../../queries/daily_active_users.sql"),
            include_str!("../../queries/rejected_by_reason.sql"),
            include_str!("../../queries/top_events.sql"),
        ]
        .map(String::from)
        .into();
        statements.extend(
            [
                "SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY n DESC LIMIT 10",
                "SELECT properties->>'plan' AS plan, count(DISTINCT user_id) FROM events \
                 WHERE \"timestamp\" > now() - INTERVAL '7 days' AND event IN ('a', 'b') GROUP BY 1",
                "WITH daily AS (SELECT date_trunc('day', \"timestamp\") AS d, customer_id, \
                 sum(CAST(json_get_str(properties, 'gb') AS DOUBLE)) AS gb FROM events GROUP BY 1, 2) \
                 SELECT d, customer_id, gb, sum(gb) OVER (PARTITION BY customer_id ORDER BY d \
                 ROWS BETWEEN 6 PRECEDING AND CURRENT ROW) FROM daily",
                "SELECT CASE WHEN a > 1 THEN 'x' WHEN a < -1 THEN 'y' ELSE 'z' END, tags[1], \
                 s.f.g, coalesce(x, y, 0) + abs(-1) * 3 % 2 FROM t AS s \
                 JOIN u ON u.id = s.id LEFT JOIN (SELECT id FROM v WHERE id NOT IN (1, 2)) w \
                 ON w.id = u.id WHERE EXISTS (SELECT 1 FROM events) UNION ALL SELECT 1, 2, 3, 4 FROM t",
                "EXPLAIN ANALYZE SELECT count(*) FROM metered_events WHERE feature = 'api_requests'",
                "SHOW TABLES",
                "DESCRIBE events",
            ]
            .map(String::from),
        );
        statements
    }

    fn work_of(sql: &str) -> (u64, usize) {
        let tokens = check_text(sql).expect("within the text bounds");
        let budget = u64::MAX;
        let dialect = Budgeted::new(budget);
        DFParser::parse_sql_with_dialect(sql, &dialect).expect("parses");
        (budget - dialect.left(), tokens)
    }

    #[test]
    fn real_statements_parse_as_datafusion_parses_them_and_well_within_the_budget() {
        for sql in real_statements() {
            let ours = parse(&sql, check_text(&sql).expect("within the text bounds"))
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let theirs = DFParser::parse_sql(&sql).expect("DataFusion parses it");
            assert_eq!(
                format!("{ours:?}"),
                format!("{theirs:?}"),
                "the budgeted dialect parses {sql} as GenericDialect does"
            );
            let (work, tokens) = work_of(&sql);
            assert!(
                work <= 8 * tokens as u64 + 100,
                "{sql}: {work} questions for {tokens} tokens, near the budget of {WORK_PER_TOKEN} \
                 per token"
            );
        }
    }

    /// The shapes the fuzz target found, each of which took the parser seconds to hours, are
    /// cut by the budget alone, without the text bounds that refuse them first in `admit`.
    /// (The `~` chain asks 24, 358, 5,702, 91,206, 1.46 M, 23.3 M questions for 1 … 6 repeats:
    /// about 1.5 µs each in a debug build, so 6 repeats took 40 s before the budget.)
    #[test]
    fn retrying_shapes_are_cut_by_the_budget_alone() {
        let shapes = [
            format!("SELECT {}1", "CASE WHEN true THEN ".repeat(24)),
            format!("SELECT {}1 AS", "CAST(".repeat(24)),
            format!("SELECT {}c.", "a.b[A][A].".repeat(14)),
            format!("SELECT {}b[A].e.", "a.".repeat(30)),
            format!("SELECT x > {}\u{fffd}.b", "a.".repeat(30)),
            format!("SELECT ~{}v", "cvne.vft.~ne.vne.v.".repeat(6)),
        ];
        for sql in shapes {
            let tokens = Tokenizer::new(&GenericDialect {}, &sql)
                .tokenize()
                .expect("tokenizes")
                .iter()
                .filter(|t| !matches!(t, Token::Whitespace(_)))
                .count();
            assert_eq!(
                parse(&sql, tokens).map(drop),
                Err(Refusal::OverBound(Bound::Work)),
                "{sql}"
            );
        }
    }

    #[test]
    fn a_statement_that_fits_the_budget_exactly_is_admitted() {
        let sql = "SELECT a + 1 FROM t WHERE b = 2";
        let (work, _) = work_of(sql);
        let exact = Budgeted::new(work);
        assert!(DFParser::parse_sql_with_dialect(sql, &exact).is_ok() && !exact.spent());
        let short = Budgeted::new(work - 1);
        assert!(DFParser::parse_sql_with_dialect(sql, &short).is_err() && short.spent());
    }

    #[test]
    fn the_refusal_says_what_to_do() {
        let message = Refusal::OverBound(Bound::Work).to_string();
        assert!(
            message.contains("parsing work") && message.contains("split it"),
            "{message}"
        );
    }
}
