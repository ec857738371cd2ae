//! How big and how deep a statement may be, checked on its text and its syntax tree before
//! anything plans it.
//!
//! DataFusion's planner, optimizer and evaluator recurse once per level of an expression, and
//! some of their passes cost the square of its depth. The parser bounds nesting in parentheses,
//! function calls and subqueries, but builds operator chains in a loop: `1+1+…+1` with 2,000
//! terms is a 4 KB statement 2,000 levels deep, which overflows a planning thread's stack and
//! aborts the process. Three bounds keep every statement within what the query threads' stack
//! ([`super::SQL_THREAD_STACK_BYTES`]) and a moment of planning can take:
//!
//! - [`MAX_TOKENS`] on the text, before parsing, so that even the syntax tree of a refused
//!   statement is shallow enough to drop;
//! - [`MAX_DEPTH`] on the tree: expressions, operator chains, subqueries and `UNION` chains
//!   all count a level each;
//! - [`MAX_SIZE`] on the tree as planned: DataFusion plans a common table expression once per
//!   use, so a `WITH` whose tables each use the one before twice doubles per line; each use
//!   counts the size of what it names.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, ObjectName, Query, SetExpr, Statement, Visit, Visitor,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

/// Parser questions a statement may ask per token of its text. A statement the parser reads
/// without retrying asks about four per token (`query::dialect` tests measure the queries
/// shipped in `queries/` and the README); the rest is room for the retries real statements
/// need.
pub(crate) const WORK_PER_TOKEN: u64 = 64;

/// Parser questions every statement may ask, whatever its length.
pub(crate) const WORK_BASE: u64 = 10_000;

/// Most tokens (words, literals, operators; not whitespace or comments) in a statement.
pub(crate) const MAX_TOKENS: usize = 100_000;

/// Deepest nesting of brackets (`(`, `[`, `{`) and `CASE … END` in the text, before parsing.
///
/// The parser retries a failed parse at each level of some constructs (`CAST(`, an
/// unterminated `CASE WHEN … THEN`), which doubles its work per level: 48 bytes of nested
/// `CASE WHEN true THEN` took seconds, and a few more levels would take hours on a thread
/// nothing can stop. At 16 levels the worst case found is about half a second in a debug
/// build, which the budget on the parser's work ([`super::dialect`]) now cuts short; real
/// queries rarely nest a third as deep.
pub(crate) const MAX_NESTING: usize = 16;

/// Most subscripts (`[…]`) chained in one expression (`a.b[1][2].c[3]` has three).
///
/// A chain of names and subscripts that ends in a syntax error makes the parser retry every
/// way of reading it, about twice the work per element (found by the sql_sandbox fuzz target):
/// `a.b[A][A].` repeated ten times and ending in `c.` took 3.5 s; 24 names, one `[A]` and a
/// trailing `.` more than 10 s. The same chains well formed parse in microseconds. Real
/// queries chain far fewer.
pub(crate) const MAX_CHAIN_SUBSCRIPTS: usize = 8;

/// Most `.` in one chain of names (`catalog.schema.table.column` has three). A failing chain
/// on the right of an operator (`x > a.a.…a.<junk>`, found by the fuzz target) costs the parser
/// about twice the work per name: 24 names took over 10 s.
pub(crate) const MAX_CHAIN_PERIODS: usize = 8;

/// Most elements (names and subscripts) over all chains of a statement that have both a `.`
/// and a subscript; see [`MAX_CHAIN_SUBSCRIPTS`]. The retries multiply across such chains
/// nested in each other's subscripts (three levels of ten names: over 10 s). Chains without
/// subscripts, or without `.`, parse in linear time at any length.
pub(crate) const MAX_DOTTED_SUBSCRIPTED: usize = 16;

/// Deepest nesting of expressions, operator chains, subqueries and set operations.
pub(crate) const MAX_DEPTH: usize = 256;

/// Most expressions, queries and table references in a statement, counting each use of a
/// common table expression at the size of its definition.
pub(crate) const MAX_SIZE: u64 = 100_000;

/// Which bound a statement is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// [`MAX_TOKENS`].
    Tokens,
    /// [`MAX_NESTING`].
    Nesting,
    /// [`MAX_CHAIN_SUBSCRIPTS`].
    Subscripts,
    /// [`MAX_DEPTH`].
    Depth,
    /// [`MAX_SIZE`].
    Size,
    /// The parser's work: [`WORK_PER_TOKEN`] per token.
    Work,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tokens => write!(
                f,
                "the statement is over {MAX_TOKENS} tokens, the bound on a statement's length"
            ),
            Self::Nesting => write!(
                f,
                "the statement nests brackets and CASE deeper than {MAX_NESTING} levels, the bound \
                 on nesting in its text (split it, or use WITH tables)"
            ),
            Self::Subscripts => write!(
                f,
                "the statement chains more than {MAX_CHAIN_PERIODS} `.` or {MAX_CHAIN_SUBSCRIPTS} subscripts ([…]) in one \
                 expression, or more than {MAX_DOTTED_SUBSCRIPTED} names and subscripts in chains \
                 that mix `.` and subscripts, the bounds on subscript chains"
            ),
            Self::Depth => write!(
                f,
                "the statement nests deeper than {MAX_DEPTH} levels, the bound on depth (each operator \
                 of an AND/OR/+/|| chain is a level: use IN (…) lists, or split the query)"
            ),
            Self::Size => write!(
                f,
                "the statement plans to more than {MAX_SIZE} expressions and table references, the \
                 bound on size (each use of a WITH table counts its whole definition again)"
            ),
            Self::Work => write!(
                f,
                "the statement took the parser more than {} steps per token, the bound on parsing \
                 work (a statement that ends in a syntax error after deep nesting or long chains \
                 makes the parser retry every way of reading it: check the syntax, or split it)",
                WORK_PER_TOKEN
            ),
        }
    }
}

/// Why a statement is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The text does not parse.
    Syntax(String),
    /// Not exactly one statement.
    StatementCount(usize),
    /// A statement that writes, changes settings, or reads files.
    NotReadOnly(String),
    /// Longer, deeper or larger than the sandbox plans.
    OverBound(Bound),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Syntax(message) => write!(f, "SQL syntax error: {message}"),
            Self::StatementCount(n) => write!(f, "send exactly one statement (got {n})"),
            Self::NotReadOnly(kind) => write!(
                f,
                "only read-only statements are allowed (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE); refused: {kind}"
            ),
            Self::OverBound(bound) => write!(f, "statement refused: {bound}"),
        }
    }
}

/// Refuses text over [`MAX_TOKENS`]. Runs before the parser, whose tree of a long operator
/// chain is as deep as the chain. Returns the number of tokens, which sizes the parser's budget
/// ([`super::dialect::parse`]).
pub(crate) fn check_text(sql: &str) -> Result<usize, Refusal> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| Refusal::Syntax(e.to_string()))?;
    let counted = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .count();
    if counted > MAX_TOKENS {
        return Err(Refusal::OverBound(Bound::Tokens));
    }
    check_brackets(&tokens).map_err(Refusal::Syntax)?;
    // `EXPLAIN EXPLAIN …` recurses in the parser once per word, past any recursion limit:
    // 100,000 of them overflowed the fuzz thread's stack (a segmentation fault, found by the
    // sql_sandbox fuzz target). One EXPLAIN (with ANALYZE, VERBOSE) is all a query needs.
    let explains = tokens
        .iter()
        .filter(|t| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("EXPLAIN")))
        .count();
    if explains > 1 {
        return Err(Refusal::Syntax(
            "EXPLAIN may appear once in a statement".into(),
        ));
    }
    if text_nesting(&tokens) > MAX_NESTING {
        return Err(Refusal::OverBound(Bound::Nesting));
    }
    if chains_over_bounds(&tokens) {
        return Err(Refusal::OverBound(Bound::Subscripts));
    }
    Ok(counted)
}

/// One chain of names and subscripts (`a.b[1].c`).
#[derive(Debug, Clone, Copy, Default)]
struct Chain {
    elements: usize,
    subscripts: usize,
    periods: usize,
    /// Elements already added to the statement's total.
    counted: usize,
}

/// Whether the chains of names and subscripts among `tokens` are over the bounds: a chain
/// with more than [`MAX_CHAIN_SUBSCRIPTS`] subscripts, or more than
/// [`MAX_DOTTED_SUBSCRIPTED`] elements over all chains that have both a `.` and a subscript.
/// A chain goes on through `.` and through a `[` right after a name, `]` or `)`; a name not
/// after `.` starts a new one.
fn chains_over_bounds(tokens: &[Token]) -> bool {
    let mut chains: Vec<Chain> = vec![Chain::default()];
    let mut total = 0usize;
    let mut previous: Option<&Token> = None;
    // The previous token was an odd segment after `.` (`a.~b`, `a.'b'`): a name after it
    // still belongs to the chain.
    let mut odd_segment = false;
    for token in tokens {
        if matches!(token, Token::Whitespace(_)) {
            continue;
        }
        let after_period = matches!(previous, Some(Token::Period)) || odd_segment;
        odd_segment = false;
        let after_operand = matches!(
            previous,
            Some(Token::Word(_) | Token::RBracket | Token::RParen)
        );
        let Some(chain) = chains.last_mut() else {
            return false;
        };
        let mut opened = false;
        match token {
            Token::Whitespace(_) => continue,
            Token::Word(_) if after_period => chain.elements += 1,
            Token::Word(_) => {
                *chain = Chain {
                    elements: 1,
                    ..Chain::default()
                }
            }
            Token::Period => chain.periods += 1,
            Token::LBracket if after_operand => {
                chain.elements += 1;
                chain.subscripts += 1;
                opened = true;
            }
            Token::LBracket => {
                *chain = Chain::default();
                opened = true;
            }
            Token::LParen | Token::LBrace => opened = true,
            Token::RBracket | Token::RParen | Token::RBrace => {}
            // The parser reads `a.'b'.c` and `a.1.b` as chains too.
            _ if matches!(previous, Some(Token::Period)) => {
                chain.elements += 1;
                odd_segment = true;
            }
            _ => *chain = Chain::default(),
        }
        if chain.subscripts > MAX_CHAIN_SUBSCRIPTS || chain.periods > MAX_CHAIN_PERIODS {
            return true;
        }
        if chain.subscripts > 0 && chain.periods > 0 {
            total += chain.elements - chain.counted;
            chain.counted = chain.elements;
            if total > MAX_DOTTED_SUBSCRIPTED {
                return true;
            }
        }
        match token {
            _ if opened => chains.push(Chain::default()),
            Token::RBracket | Token::RParen | Token::RBrace => {
                chains.pop();
                if chains.is_empty() {
                    chains.push(Chain::default());
                }
            }
            _ => {}
        }
        previous = Some(token);
    }
    false
}

/// Refuses brackets that do not pair up. Such text cannot parse, and the parser's retries
/// on its way to saying so grow with every unclosed level: four unclosed `[` around dotted
/// names (`a[b.b.b.b.b.b.b.c[…`, found by the fuzzer) took longer than 20 s, the same text
/// with its brackets closed a few milliseconds.
fn check_brackets(tokens: &[Token]) -> Result<(), String> {
    let mut open: Vec<char> = Vec::new();
    for token in tokens {
        let closing = match token {
            Token::LParen => {
                open.push('(');
                continue;
            }
            Token::LBracket => {
                open.push('[');
                continue;
            }
            Token::LBrace => {
                open.push('{');
                continue;
            }
            Token::RParen => ('(', ')'),
            Token::RBracket => ('[', ']'),
            Token::RBrace => ('{', '}'),
            _ => continue,
        };
        match open.pop() {
            Some(opener) if opener == closing.0 => {}
            Some(opener) => {
                return Err(format!(
                    "`{}` closes `{opener}`: brackets must pair up",
                    closing.1
                ));
            }
            None => {
                return Err(format!(
                    "`{}` closes nothing: brackets must pair up",
                    closing.1
                ));
            }
        }
    }
    match open.last() {
        Some(opener) => Err(format!(
            "`{opener}` is never closed ({} bracket(s) left open): brackets must pair up",
            open.len()
        )),
        None => Ok(()),
    }
}

/// The deepest nesting of brackets and `CASE … END` among `tokens` (an unclosed one counts
/// as open to the end).
fn text_nesting(tokens: &[Token]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for token in tokens {
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => depth += 1,
            Token::RParen | Token::RBracket | Token::RBrace => depth = depth.saturating_sub(1),
            Token::Word(word) if word.quote_style.is_none() => {
                if word.value.eq_ignore_ascii_case("CASE") {
                    depth += 1;
                } else if word.value.eq_ignore_ascii_case("END") {
                    depth = depth.saturating_sub(1);
                }
            }
            _ => {}
        }
        deepest = deepest.max(depth);
    }
    deepest
}

/// Refuses a statement over [`MAX_DEPTH`] or [`MAX_SIZE`]. The walk stops at the first level
/// past the bound, so it never goes deeper than the bound itself.
pub(crate) fn check_tree(statement: &Statement) -> Result<(), Refusal> {
    let mut measure = Measure::default();
    match statement.visit(&mut measure) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(bound) => Err(Refusal::OverBound(bound)),
    }
}

/// The walk's state.
#[derive(Default)]
struct Measure {
    /// Levels open now.
    depth: usize,
    /// Levels each open query added (itself and its set-operation chain).
    query_levels: Vec<usize>,
    /// Expressions, queries and table references so far, with each use of a common table
    /// expression counted at its size.
    size: u64,
    /// Common table expressions in scope: name and size.
    tables: Vec<(String, u64)>,
    /// Where each open `WITH` scope starts in `tables`.
    scopes: Vec<usize>,
    /// Definitions of common table expressions not yet measured: their query and name.
    pending: Vec<(*const Query, String)>,
    /// Definitions being measured: their query, name and `size` when they began.
    defining: Vec<(*const Query, String, u64)>,
}

impl Measure {
    fn grow(&mut self, by: u64) -> ControlFlow<Bound> {
        self.size = self.size.saturating_add(by);
        if self.size > MAX_SIZE {
            return ControlFlow::Break(Bound::Size);
        }
        ControlFlow::Continue(())
    }

    fn descend(&mut self, levels: usize) -> ControlFlow<Bound> {
        self.depth += levels;
        if self.depth > MAX_DEPTH {
            return ControlFlow::Break(Bound::Depth);
        }
        ControlFlow::Continue(())
    }
}

impl Visitor for Measure {
    type Break = Bound;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Bound> {
        let levels = 1 + set_operation_depth(&query.body);
        self.query_levels.push(levels);
        self.descend(levels)?;
        self.grow(1)?;
        let this = query as *const Query;
        if let Some(at) = self.pending.iter().position(|(q, _)| *q == this) {
            let (_, name) = self.pending.remove(at);
            self.defining.push((this, name, self.size));
        }
        if let Some(with) = &query.with {
            self.scopes.push(self.tables.len());
            for cte in &with.cte_tables {
                let name = cte.alias.name.value.to_lowercase();
                self.pending
                    .push((cte.query.as_ref() as *const Query, name));
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<Bound> {
        self.depth -= self.query_levels.pop().unwrap_or(0);
        if query.with.is_some()
            && let Some(start) = self.scopes.pop()
        {
            self.tables.truncate(start);
        }
        let this = query as *const Query;
        if self.defining.last().is_some_and(|(q, _, _)| *q == this)
            && let Some((_, name, began)) = self.defining.pop()
        {
            self.tables.push((name, self.size - began));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<Bound> {
        let named = match relation.0.as_slice() {
            [part] => part.as_ident().map(|ident| ident.value.to_lowercase()),
            _ => None,
        };
        let used = named
            .and_then(|name| self.tables.iter().rev().find(|(n, _)| *n == name))
            .map_or(0, |(_, size)| *size);
        self.grow(1 + used)
    }

    fn pre_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Bound> {
        self.descend(1)?;
        self.grow(1)
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Bound> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// How deep the `UNION`/`INTERSECT`/`EXCEPT` operations of a query body nest; the parser
/// chains them in a loop, like operators. Walked without recursion.
fn set_operation_depth(body: &SetExpr) -> usize {
    let mut deepest = 0;
    let mut open = vec![(body, 0)];
    while let Some((expr, depth)) = open.pop() {
        if let SetExpr::SetOperation { left, right, .. } = expr {
            deepest = deepest.max(depth + 1);
            open.push((left, depth + 1));
            open.push((right, depth + 1));
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::readonly::admit;

    fn over(sql: &str) -> Option<Bound> {
        match admit(sql) {
            Err(Refusal::OverBound(bound)) => Some(bound),
            _ => None,
        }
    }

    #[test]
    fn long_chains_are_refused_naming_the_depth_bound() {
        let terms = |op: &str, n: usize| format!("SELECT 1{}", format!(" {op} 1").repeat(n));
        for op in ["+", "AND", "OR", "||", "*", "="] {
            assert_eq!(over(&terms(op, 2_000)), Some(Bound::Depth), "{op}");
            assert!(
                admit(&terms(op, 100)).is_ok(),
                "{op}: a chain of 100 passes"
            );
        }
        let inside = format!(
            "SELECT * FROM (SELECT x FROM (SELECT 1{} AS x) a) b",
            " + 1".repeat(2_000)
        );
        assert_eq!(over(&inside), Some(Bound::Depth), "inside subqueries");
        let unions = format!("SELECT 1{}", " UNION ALL SELECT 1".repeat(2_000));
        assert_eq!(over(&unions), Some(Bound::Depth), "UNION chains");
        let message = Refusal::OverBound(Bound::Depth).to_string();
        assert!(message.contains("256"), "{message}");
    }

    #[test]
    fn deep_nesting_is_refused_before_the_parser_sees_it() {
        let nested =
            |open: &str, close: &str, n| format!("SELECT {}1{}", open.repeat(n), close.repeat(n));
        for sql in [
            nested("(", ")", 10_000),
            nested("abs(", ")", 10_000),
            nested("CASE WHEN true THEN ", " END", 10_000),
            nested("(SELECT ", ")", 10_000),
            nested("[", "]", 10_000),
            // Found by the sql_sandbox fuzz target: the parser's work doubles per level.
            nested("CASE WHEN true THEN ", "", 20),
            format!("SELECT {}1 AS{}", "CAST(".repeat(20), " AS INT)".repeat(20)),
        ] {
            assert_eq!(over(&sql), Some(Bound::Nesting), "{}", &sql[..40]);
        }
        // What the parser's own recursion limit bounds is a syntax error.
        for sql in [nested("- ", "", 10_000), nested("NOT ", "", 10_000)] {
            assert!(
                matches!(admit(&sql), Err(Refusal::Syntax(_))),
                "{}",
                &sql[..40]
            );
        }
        // At the bound, well-formed nesting passes; a malformed one makes the parser retry
        // every level, past the budget on its work.
        assert!(admit(&nested("abs(", ")", MAX_NESTING)).is_ok());
        let casts = |inner: &str| {
            format!(
                "SELECT {}{inner}{}",
                "CAST(".repeat(MAX_NESTING),
                " AS INT)".repeat(MAX_NESTING)
            )
        };
        assert!(admit(&casts("1")).is_ok());
        assert_eq!(
            admit(&casts("1 AS")).map(drop),
            Err(Refusal::OverBound(Bound::Work))
        );
        let quoted = "SELECT 'CASE (((((((((((((((((((( [[[' AS text, \"case\" FROM events";
        assert!(
            admit(quoted).is_ok(),
            "brackets in literals and quoted names do not count"
        );
        let message = Refusal::OverBound(Bound::Nesting).to_string();
        assert!(message.contains("16"), "{message}");
    }

    #[test]
    fn brackets_that_do_not_pair_up_are_refused_before_parsing() {
        // Found by the sql_sandbox fuzz target: unclosed `[` around dotted names, whose parse
        // grows with every unclosed level (this one ran for minutes).
        let found = "SELECT c.v.tsclev. cnev.tscvlev. cnev.tscv.tsE.tscv.tsEM[Fev. v.vne.v.tsclev. \
                     cnev.tscv.tsE.t.tsE.tscv.tsEM[Fev. v.vne.v.tsclev. cnev.tscv.tsE.tscv.tsEM[Fev. v\0\0\x003.vM]FR";
        let four = format!("SELECT a[{}d", "b.b.b.b.b.b.b.c[".repeat(4));
        for sql in [
            found,
            four.as_str(),
            "SELECT (1",
            "SELECT 1)",
            "SELECT [1)",
            "SELECT {'a': 1",
        ] {
            match admit(sql) {
                Err(Refusal::Syntax(message)) => {
                    assert!(
                        message.contains("brackets must pair up"),
                        "{sql}: {message}"
                    )
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
        let closed = format!(
            "SELECT a[{}d{}",
            "b.b.b.b.b.b.b.c[".repeat(4),
            "]".repeat(5)
        );
        assert!(
            !matches!(admit(&closed), Err(Refusal::Syntax(m)) if m.contains("pair up")),
            "closed brackets pass the check"
        );
    }

    #[test]
    fn long_subscript_chains_are_refused_before_parsing() {
        // Found by the sql_sandbox fuzz target: the parse of a failing chain grows about
        // fourfold per `a.b[A][A].`.
        let chain = |n: usize, end: &str| format!("SELECT {}{end}", "a[A][A].".repeat(n));
        assert_eq!(over(&chain(12, "c.")), Some(Bound::Subscripts));
        assert_eq!(over(&chain(5, "c")), Some(Bound::Subscripts));
        assert!(matches!(admit(&chain(3, "c.")), Err(Refusal::Syntax(_))));
        assert!(
            admit(&chain(3, "c")).is_ok(),
            "a chain of 3 × 3 elements passes"
        );
        let names = format!("SELECT {}b[A].e.", "a.".repeat(24));
        assert_eq!(
            over(&names),
            Some(Bound::Subscripts),
            "24 names and a subscript"
        );
        let nested = format!("SELECT {}c.{}", "a.a.a.a.a.a.b[".repeat(3), "]".repeat(3));
        assert_eq!(
            over(&nested),
            Some(Bound::Subscripts),
            "nested chains add up"
        );
        let tags = (1..=12).map(|i| format!("tags[{i}]")).collect::<Vec<_>>();
        assert!(
            admit(&format!("SELECT {} FROM t", tags.join(", "))).is_ok(),
            "subscripts without `.` are not counted"
        );
        // Found by the fuzz target: a failing chain of names after an operator.
        let after = format!("SELECT x > {}\u{fffd}.b", "a.".repeat(24));
        assert_eq!(over(&after), Some(Bound::Subscripts), "24 names in a chain");
        assert!(
            admit("SELECT c.s.t.col, x.a.b.c.d.e.f.g.h FROM t").is_ok(),
            "8 `.` pass"
        );
        // Found by the fuzz target: a chain through string literals.
        let strings = format!("SELECT cne. {}v", "cnv.ncv .e.','.".repeat(12));
        assert_eq!(
            over(&strings),
            Some(Bound::Subscripts),
            "`.` through literals count"
        );
        // And one through an operator right after `.`.
        let tilde = format!("SELECT ~{}v", "cvne.vft.~ne.vne.v.".repeat(4));
        assert_eq!(
            over(&tilde),
            Some(Bound::Subscripts),
            "`.~name` continues a chain"
        );
        let many = (0..40).map(|i| format!("a[{i}]")).collect::<Vec<_>>();
        assert!(
            admit(&format!("SELECT {} FROM t", many.join(", "))).is_ok(),
            "many short chains pass"
        );
        assert!(admit("SELECT a[b[c[1]]][2] + x[1][2][3] FROM t").is_ok());
        let message = Refusal::OverBound(Bound::Subscripts).to_string();
        assert!(message.contains('8'), "{message}");
    }

    #[test]
    fn explain_of_explain_is_refused_before_the_parser_recurses() {
        // Found by the sql_sandbox fuzz target: a stack overflow on the parser's recursion.
        let sql = format!("{}SELECT 1", "EXPLAIN ".repeat(50_000));
        assert!(matches!(admit(&sql), Err(Refusal::Syntax(m)) if m.contains("EXPLAIN")));
        assert!(admit("EXPLAIN ANALYZE SELECT 1").is_ok());
        assert!(admit("SELECT 'explain explain' AS \"EXPLAIN\"").is_ok());
    }

    #[test]
    fn text_past_the_token_bound_is_refused_before_parsing() {
        // 250,000 levels: dropping the parsed tree alone would overflow a thread's stack.
        let sql = format!("SELECT 1{}", "+1".repeat(250_000));
        assert_eq!(over(&sql), Some(Bound::Tokens));
        let list = (0..40_000).map(|i| i.to_string()).collect::<Vec<_>>();
        let sql = format!("SELECT 1 WHERE 1 IN ({})", list.join(", "));
        assert!(admit(&sql).is_ok(), "a long IN list is flat: it passes");
    }

    #[test]
    fn doubling_common_table_expressions_are_refused_naming_the_size_bound() {
        let mut tables = vec!["a0 AS (SELECT 1 AS x)".to_string()];
        for i in 1..=24 {
            tables.push(format!(
                "a{i} AS (SELECT * FROM a{p} UNION ALL SELECT * FROM a{p})",
                p = i - 1
            ));
        }
        let sql = format!("WITH {} SELECT count(*) FROM a24", tables.join(", "));
        assert_eq!(over(&sql), Some(Bound::Size));
        let few = format!("WITH {} SELECT count(*) FROM a6", tables[..7].join(", "));
        assert!(admit(&few).is_ok());
        let nested = "WITH a AS (WITH b AS (SELECT 1 AS x) SELECT * FROM b) SELECT * FROM a";
        assert!(admit(nested).is_ok());
    }
}
