//! Fuzzes the SQL sandbox's gate: any text through `readonly::admit`, which `/v1/sql` and
//! `northstar sql` run before planning. Nothing may panic or overflow the stack (a fuzz thread
//! has the default 8 MiB, half what the query threads get), whatever the length or nesting,
//! and nothing that writes, changes settings or reads files may pass.
//!
//! The first byte chooses the input's shape: the text as it is, or the bytes read as picks
//! from SQL fragments, which reaches deep nesting and long chains far sooner than raw text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use northstar::query::readonly::admit;

/// Fragments the bytes pick from: operators, nesting, keywords of every statement kind.
const FRAGMENTS: &[&str] = &[
    "SELECT ", "1", " + ", " AND ", " OR ", " || ", "(", ")", "abs(", "CASE WHEN true THEN ",
    " END", " UNION ALL ", "WITH a AS (", ") ", "FROM a", "FROM events", " WHERE ", ", ",
    "(SELECT ", "NOT ", "- ", "'x'", "repeat('x', 9)", " IN (", "EXPLAIN ", "INSERT INTO t ",
    "COPY events TO 'f' ", "SET x = 1", "CREATE TABLE t ", "DROP TABLE events", "; ",
    "DESCRIBE events", "SHOW TABLES", "VALUES (1)", "generate_series(1, 3)", "properties->>'k'",
    " ORDER BY 1", " LIMIT 1", "a", "b", " JOIN a ON true ", "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION 'f'",
];

/// Words that begin a statement the gate must never admit.
const WRITES: &[&str] = &[
    "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "COPY", "SET", "TRUNCATE", "MERGE",
];

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else { return };
    let text = if shape & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        rest.iter()
            .map(|b| FRAGMENTS[usize::from(*b) % FRAGMENTS.len()])
            .collect()
    };
    let Ok(statement) = admit(&text) else { return };
    let printed = statement.to_string();
    let mut words = printed
        .split_whitespace()
        .map(|w| w.trim_start_matches('(').to_ascii_uppercase())
        .skip_while(|w| matches!(w.as_str(), "EXPLAIN" | "ANALYZE" | "VERBOSE" | "FORMAT"));
    if let Some(first) = words.next() {
        assert!(!WRITES.contains(&first.as_str()), "admitted a write: {printed}");
    }
});
