//! Functions whose result can be far larger than their arguments, bounded per call.
//!
//! `repeat('x', 2147483647)` makes 2 GiB out of 25 bytes of SQL, and DataFusion evaluates a
//! call on constants while it plans (constant folding): inside one poll, where neither the
//! time limit nor cancelling the query can stop it, and outside the memory pool, which counts
//! only what operators reserve. So each such function is registered again, wrapped: before a
//! call runs, an upper bound of the bytes it would make is worked out from its arguments, and
//! a call over the bound fails with [`ValueTooLarge`] (a user error) instead of running.
//!
//! The bound applies to one call, which is one batch of rows at execution. It does not bound
//! a statement that joins many bounded values into one (every call gets the bound).

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;

/// A call refused because its result would be over the bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "{function}(…) would make up to {bytes} bytes in one call; the bound is {bound} bytes \
     (a sixteenth of sql.memoryLimitMb)"
)]
pub(crate) struct ValueTooLarge {
    /// Name of the SQL function called.
    pub function: String,
    /// The upper bound worked out for the call.
    pub bytes: u128,
    /// The most bytes one call may make (a sixteenth of `sql.memoryLimitMb`).
    pub bound: usize,
}

/// How a function's result grows with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: the text n times.
    Repeat,
    /// `lpad`/`rpad(text, n [, fill])`: n characters of up to 4 bytes.
    Pad,
    /// `replace(text, from, to)`: `to` in place of each `from`.
    Replace,
    /// `regexp_replace(text, pattern, replacement [, flags])`: the replacement, with groups,
    /// in place of each match.
    RegexpReplace,
    /// `concat(...)`, `array_concat(...)`: the arguments together.
    Concat,
    /// `concat_ws(separator, ...)`: the arguments with separators between.
    ConcatWs,
    /// `array_repeat(element, n)`: n elements.
    ArrayRepeat,
    /// `array_resize(array, n [, value])`: n elements.
    ArrayResize,
    /// `range`/`generate_series(start, stop [, step])` as a value: one element per step.
    Range,
}

/// The functions wrapped, by the name DataFusion registers them under.
const BOUNDED: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::RegexpReplace),
    ("concat", Growth::Concat),
    ("array_concat", Growth::Concat),
    ("concat_ws", Growth::ConcatWs),
    ("array_repeat", Growth::ArrayRepeat),
    ("array_resize", Growth::ArrayResize),
    ("range", Growth::Range),
    ("generate_series", Growth::Range),
];

/// Registers the bounded versions of the functions in `ctx`, each call making at most
/// `bound` bytes.
pub(crate) fn register(ctx: &SessionContext, bound: usize) {
    for (name, growth) in BOUNDED {
        if let Ok(inner) = ctx.udf(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Bounded {
                inner: inner.as_ref().clone(),
                growth: *growth,
                bound,
            }));
        }
    }
}

/// A function and the bound on what one call of it makes.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: ScalarUDF,
    growth: Growth,
    bound: usize,
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.inner().return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.inner().documentation()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let bytes = self.growth.most_bytes(&args.args, args.number_rows);
        if bytes > self.bound as u128 {
            return Err(DataFusionError::External(Box::new(ValueTooLarge {
                function: self.inner.name().to_string(),
                bytes,
                bound: self.bound,
            })));
        }
        self.inner.invoke_with_args(args)
    }
}

impl Growth {
    /// An upper bound of the bytes a call on `args` over `rows` rows makes.
    fn most_bytes(self, args: &[ColumnarValue], rows: usize) -> u128 {
        let bytes: Vec<PerRow> = args.iter().map(bytes_of).collect();
        let numbers: Vec<PerRow> = args.iter().map(number_of).collect();
        let byte = |i: usize, row: usize| bytes.get(i).map_or(0, |b| b.at(row));
        let count = |i: usize, row: usize| numbers.get(i).map_or(0, |n| n.at(row).max(0));
        let per_row = |row: usize| -> i128 {
            match self {
                Self::Repeat => byte(0, row).saturating_mul(count(1, row)),
                Self::Pad => count(1, row).saturating_mul(4),
                Self::Replace => {
                    let text = byte(0, row);
                    let matches = text / byte(1, row).max(1) + 1;
                    text.saturating_add(matches.saturating_mul(byte(2, row)))
                }
                Self::RegexpReplace => {
                    let text = byte(0, row);
                    let replaced = (text + 1).saturating_mul(byte(2, row)).saturating_mul(2);
                    text.saturating_add(replaced)
                }
                Self::Concat => (0..args.len()).map(|i| byte(i, row)).sum(),
                Self::ConcatWs => {
                    let parts: i128 = (1..args.len()).map(|i| byte(i, row)).sum();
                    let gaps = args.len().saturating_sub(2) as i128;
                    parts.saturating_add(gaps.saturating_mul(byte(0, row)))
                }
                Self::ArrayRepeat => byte(0, row).max(8).saturating_mul(count(1, row)),
                Self::ArrayResize => byte(2, row).max(16).saturating_mul(count(1, row)),
                Self::Range => range_elements(args, row).saturating_mul(8),
            }
        };
        let same_for_every_row = bytes.iter().chain(&numbers).all(PerRow::is_same);
        let total: i128 = if same_for_every_row {
            per_row(0).saturating_mul(rows as i128)
        } else {
            (0..rows).map(per_row).fold(0, i128::saturating_add)
        };
        u128::try_from(total).unwrap_or(0)
    }
}

/// A value for each row of an argument.
enum PerRow {
    /// A constant.
    Same(i128),
    /// One per row.
    Each(Vec<i128>),
}

impl PerRow {
    fn at(&self, row: usize) -> i128 {
        match self {
            Self::Same(value) => *value,
            Self::Each(values) => values.get(row).copied().unwrap_or(0),
        }
    }

    fn is_same(&self) -> bool {
        matches!(self, Self::Same(_))
    }
}

/// Bytes of each row's value: the length of text and binary, else its share of the memory.
fn bytes_of(arg: &ColumnarValue) -> PerRow {
    match arg {
        ColumnarValue::Scalar(value) => PerRow::Same(scalar_bytes(value)),
        ColumnarValue::Array(array) => match arrow::compute::kernels::length::length(array)
            .ok()
            .and_then(|lengths| arrow::compute::cast(&lengths, &DataType::Int64).ok())
        {
            Some(lengths) => {
                PerRow::Each(ints(&lengths).into_iter().map(|n| n.unwrap_or(0)).collect())
            }
            None => PerRow::Same((array.get_array_memory_size() / array.len().max(1)) as i128),
        },
    }
}

fn scalar_bytes(value: &ScalarValue) -> i128 {
    match value {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => s.len() as i128,
        ScalarValue::Binary(Some(b))
        | ScalarValue::LargeBinary(Some(b))
        | ScalarValue::BinaryView(Some(b)) => b.len() as i128,
        other if other.is_null() => 0,
        other => other.size() as i128,
    }
}

/// Each row's value as an integer (0 where it is not one).
fn number_of(arg: &ColumnarValue) -> PerRow {
    match arg {
        ColumnarValue::Scalar(value) => PerRow::Same(
            value
                .cast_to(&DataType::Int64)
                .ok()
                .and_then(|v| match v {
                    ScalarValue::Int64(n) => n,
                    _ => None,
                })
                .map_or(0, i128::from),
        ),
        ColumnarValue::Array(array) if array.data_type().is_integer() => {
            match arrow::compute::cast(array, &DataType::Int64) {
                Ok(numbers) => {
                    PerRow::Each(ints(&numbers).into_iter().map(|n| n.unwrap_or(0)).collect())
                }
                Err(_) => PerRow::Same(0),
            }
        }
        ColumnarValue::Array(_) => PerRow::Same(0),
    }
}

fn ints(array: &ArrayRef) -> Vec<Option<i128>> {
    array
        .as_primitive_opt::<Int64Type>()
        .map(|a| a.iter().map(|n| n.map(i128::from)).collect())
        .unwrap_or_default()
}

/// Elements of `range`/`generate_series` on one row: `(stop - start) / step + 1`, with dates,
/// timestamps and intervals in nanoseconds (a month as 28 days, the shortest).
fn range_elements(args: &[ColumnarValue], row: usize) -> i128 {
    let value = |i: usize| -> Option<i128> {
        let scalar = match args.get(i)? {
            ColumnarValue::Scalar(value) => value.clone(),
            ColumnarValue::Array(array) => ScalarValue::try_from_array(array, row).ok()?,
        };
        nanos_or_number(&scalar)
    };
    let (start, stop, step) = match args.len() {
        1 => (Some(0), value(0), Some(1)),
        2 => (value(0), value(1), Some(1)),
        _ => (value(0), value(1), value(2)),
    };
    match (start, stop, step) {
        (Some(start), Some(stop), Some(step)) if step != 0 => {
            (stop.saturating_sub(start) / step).saturating_add(1).max(0)
        }
        _ => 0,
    }
}

fn nanos_or_number(value: &ScalarValue) -> Option<i128> {
    const DAY: i128 = 86_400_000_000_000;
    let nanos = match value {
        ScalarValue::Date32(Some(days)) => i128::from(*days) * DAY,
        ScalarValue::Date64(Some(ms)) => i128::from(*ms) * 1_000_000,
        ScalarValue::TimestampSecond(Some(s), _) => i128::from(*s) * 1_000_000_000,
        ScalarValue::TimestampMillisecond(Some(ms), _) => i128::from(*ms) * 1_000_000,
        ScalarValue::TimestampMicrosecond(Some(us), _) => i128::from(*us) * 1_000,
        ScalarValue::TimestampNanosecond(Some(ns), _) => i128::from(*ns),
        ScalarValue::IntervalYearMonth(Some(months)) => i128::from(*months) * 28 * DAY,
        ScalarValue::IntervalDayTime(Some(v)) => {
            i128::from(v.days) * DAY + i128::from(v.milliseconds) * 1_000_000
        }
        ScalarValue::IntervalMonthDayNano(Some(v)) => {
            i128::from(v.months) * 28 * DAY + i128::from(v.days) * DAY + i128::from(v.nanoseconds)
        }
        other => match other.cast_to(&DataType::Int64).ok()? {
            ScalarValue::Int64(n) => i128::from(n?),
            _ => return None,
        },
    };
    Some(nanos)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    async fn run(sql: &str) -> std::result::Result<(), String> {
        let ctx = SessionContext::new();
        register(&ctx, 1 << 20);
        let frame = ctx.sql(sql).await.map_err(|e| e.to_string())?;
        frame.collect().await.map(drop).map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn calls_over_the_bound_fail_and_calls_under_it_run() {
        for sql in [
            "SELECT repeat('x', 2147483647)",
            "SELECT lpad('x', 2147483647)",
            "SELECT rpad('x', 2147483647, 'yz')",
            "SELECT replace(repeat('a', 1000), 'a', repeat('b', 2000))",
            "SELECT regexp_replace(repeat('a', 1000), 'a', repeat('b', 2000), 'g')",
            "SELECT concat(repeat('a', 600000), repeat('b', 600000))",
            "SELECT concat_ws(repeat('-', 600000), 'a', 'b', 'c')",
            "SELECT array_repeat(1, 1000000000)",
            "SELECT array_resize([1], 1000000000)",
            "SELECT range(1000000000)",
            "SELECT generate_series(1, 1000000000)",
            "SELECT range(TIMESTAMP '1970-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 second')",
        ] {
            let error = run(sql).await.expect_err(sql);
            assert!(
                error.contains("the bound is 1048576 bytes"),
                "{sql}: {error}"
            );
        }
        for sql in [
            "SELECT repeat('ab', 1000), lpad('7', 5, '0'), rpad('x', 3)",
            "SELECT replace('a.b.c', '.', '::'), regexp_replace('a1b2', '[0-9]', 'N', 'g')",
            "SELECT concat('a', 1, NULL), concat_ws(', ', 'x', 'y'), array_concat([1], [2])",
            "SELECT array_repeat('x', 10), array_resize([1, 2], 5), range(10), generate_series(1, 3)",
            "SELECT repeat(s, 3) FROM (VALUES ('abc'), ('de')) t(s)",
        ] {
            assert_eq!(run(sql).await, Ok(()), "{sql}");
        }
    }

    #[tokio::test]
    async fn the_refusal_is_found_under_datafusions_wrapping() {
        let ctx = SessionContext::new();
        register(&ctx, 1024);
        let error = match ctx.sql("SELECT repeat('x', 100000)").await {
            Ok(frame) => frame.collect().await.err(),
            Err(error) => Some(error),
        };
        let root = error.as_ref().map(DataFusionError::find_root);
        let found = matches!(root, Some(DataFusionError::External(e)) if e.downcast_ref::<ValueTooLarge>().is_some());
        assert!(found, "{error:?}");
    }

    #[test]
    fn the_estimate_counts_every_row() {
        let text: ArrayRef = Arc::new(arrow::array::StringArray::from(vec!["abc", "de"]));
        let args = [
            ColumnarValue::Array(text),
            ColumnarValue::Scalar(ScalarValue::Int64(Some(10))),
        ];
        assert_eq!(Growth::Repeat.most_bytes(&args, 2), 50);
    }
}
