//! Query answers as a table, CSV, JSON or an Arrow IPC stream.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use serde_json::{Value, json};

use super::{QueryResult, Truncation};

/// Output formats of `northstar sql` and `POST /v1/sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A boxed text table, for people.
    Table,
    /// RFC 4180 CSV with a header row.
    Csv,
    /// JSON: `{"columns": [...], "rows": [{...}], "row_count", "truncated", "truncated_by",
    /// "elapsed_ms"}`.
    Json,
    /// Arrow IPC stream (`application/vnd.apache.arrow.stream`), for dataframes.
    Arrow,
}

impl Format {
    /// The HTTP content type of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Table => "text/plain; charset=utf-8",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Json => "application/json",
            Self::Arrow => "application/vnd.apache.arrow.stream",
        }
    }

    /// The format an HTTP `Accept` header asks for (JSON unless it names another).
    pub fn from_accept(accept: Option<&str>) -> Self {
        let accept = accept.unwrap_or_default();
        if accept.contains("application/vnd.apache.arrow.stream") {
            Self::Arrow
        } else if accept.contains("text/csv") {
            Self::Csv
        } else if accept.contains("text/plain") {
            Self::Table
        } else {
            Self::Json
        }
    }
}

/// An answer encoded within its byte bound.
#[derive(Debug)]
pub struct Encoded {
    /// The bytes, at most the result's [`QueryResult::byte_bound`] (and a short JSON frame).
    pub bytes: Vec<u8>,
    /// Which bound cut the answer: the result's own, or the byte bound while encoding.
    pub truncated: Option<Truncation>,
}

/// Renders a result in `format` (cut to its byte bound like [`encode`]).
pub fn render(result: &QueryResult, format: Format) -> Result<Vec<u8>, ArrowError> {
    encode(result, format).map(|encoded| encoded.bytes)
}

/// Encodes a result in `format`, keeping the leading rows whose encoding fits in the result's
/// byte bound: text can take several times the bytes of the Arrow data it comes from.
pub fn encode(result: &QueryResult, format: Format) -> Result<Encoded, ArrowError> {
    let bound = result.byte_bound;
    let (bytes, complete) = match format {
        Format::Table => table(result, bound)?,
        Format::Csv => {
            let fitted = fit(&result.batches, bound, Keep::Bytes, |batch, first| {
                let mut out = Vec::new();
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(first)
                    .build(&mut out);
                writer.write(batch)?;
                drop(writer);
                Ok(out)
            })?;
            let mut bytes = fitted.bytes;
            if fitted.rows == 0 {
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut bytes);
                writer.write(&RecordBatch::new_empty(result.schema.clone()))?;
            }
            (bytes, fitted.complete)
        }
        Format::Json => {
            let fitted = fit(&result.batches, bound, Keep::Bytes, |batch, first| {
                let mut rows = json_rows(batch)?;
                if !first && !rows.is_empty() {
                    rows.insert(0, b',');
                }
                Ok(rows)
            })?;
            let truncated = truncation(result, fitted.complete);
            let mut out = Vec::with_capacity(fitted.bytes.len() + 256);
            out.extend_from_slice(b"{\"columns\":");
            out.extend_from_slice(columns(&result.schema).to_string().as_bytes());
            out.extend_from_slice(b",\"rows\":[");
            out.extend_from_slice(&fitted.bytes);
            let tail = json!({
                "row_count": fitted.rows,
                "truncated": truncated.is_some(),
                "truncated_by": truncated.map(Truncation::name),
                "elapsed_ms": result.elapsed.as_secs_f64() * 1000.0,
            });
            out.extend_from_slice(b"],");
            let tail = tail.to_string();
            out.extend_from_slice(tail.trim_start_matches('{').as_bytes());
            return Ok(Encoded {
                bytes: out,
                truncated,
            });
        }
        Format::Arrow => {
            let empty = ipc_stream(&result.schema, &[])?.len();
            let room = bound.saturating_sub(empty);
            let fitted = fit(&result.batches, room, Keep::Slices, |batch, _| {
                let mut stream = ipc_stream(&result.schema, std::slice::from_ref(batch))?;
                stream.drain(..empty.min(stream.len()));
                Ok(stream)
            })?;
            (ipc_stream(&result.schema, &fitted.slices)?, fitted.complete)
        }
    };
    Ok(Encoded {
        bytes,
        truncated: truncation(result, complete),
    })
}

/// The result's own cut, or the byte bound's when encoding stopped short.
fn truncation(result: &QueryResult, complete: bool) -> Option<Truncation> {
    match (result.truncated, complete) {
        (Some(cut), true) => Some(cut),
        (_, false) => Some(Truncation::Bytes),
        (None, true) => None,
    }
}

/// `12 rows in 3.4 ms` (and a note when a bound cut the answer).
pub fn summary(result: &QueryResult) -> String {
    summary_of(result.row_count(), result.elapsed, result.truncated)
}

fn summary_of(rows: usize, elapsed: std::time::Duration, truncated: Option<Truncation>) -> String {
    let noun = if rows == 1 { "row" } else { "rows" };
    let mut text = format!("{rows} {noun} in {:.1} ms", elapsed.as_secs_f64() * 1000.0);
    if let Some(cut) = truncated {
        text.push_str(&format!(" ({})", cut.advice()));
    }
    text
}

/// What [`fit`] keeps of the pieces that fit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Their encodings, to be the answer as they are.
    Bytes,
    /// Only the slices, to be encoded again together.
    Slices,
}

/// The leading rows of some batches whose encodings fit in a bound.
struct Fitted {
    /// The slices kept.
    slices: Vec<RecordBatch>,
    /// Their encodings, one after the other ([`Keep::Bytes`]).
    bytes: Vec<u8>,
    /// Bytes of their encodings.
    used: usize,
    /// Rows kept.
    rows: usize,
    /// Whether every row was kept.
    complete: bool,
}

/// Keeps the leading rows of `batches` whose encodings add up to at most `bound` bytes.
/// `encode(slice, first)` encodes a slice on its own (`first`: no row is kept yet). A slice
/// that does not fit is halved until its halves fit or one row is left; slices are encoded
/// at most an eighth of the bound at a time, so no encoding runs far past the bound.
fn fit(
    batches: &[RecordBatch],
    bound: usize,
    keep: Keep,
    mut encode: impl FnMut(&RecordBatch, bool) -> Result<Vec<u8>, ArrowError>,
) -> Result<Fitted, ArrowError> {
    let mut fitted = Fitted {
        slices: Vec::new(),
        bytes: Vec::new(),
        used: 0,
        rows: 0,
        complete: true,
    };
    let mut open: Vec<RecordBatch> = batches.iter().rev().cloned().collect();
    while let Some(batch) = open.pop() {
        let rows = batch.num_rows();
        if rows == 0 {
            continue;
        }
        let halve = |open: &mut Vec<RecordBatch>| {
            open.push(batch.slice(rows / 2, rows - rows / 2));
            open.push(batch.slice(0, rows / 2));
        };
        if rows > 1 && slice_bytes(&batch) > bound / 8 {
            halve(&mut open);
            continue;
        }
        let piece = encode(&batch, fitted.rows == 0)?;
        if fitted.used + piece.len() <= bound {
            fitted.used += piece.len();
            if keep == Keep::Bytes {
                fitted.bytes.extend_from_slice(&piece);
            }
            fitted.rows += rows;
            fitted.slices.push(batch);
        } else if rows > 1 {
            halve(&mut open);
        } else {
            fitted.complete = false;
            break;
        }
    }
    Ok(fitted)
}

/// About the bytes of a slice's own rows (not of the arrays it is a slice of).
fn slice_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            let data = c.to_data();
            data.get_slice_memory_size()
                .unwrap_or_else(|_| data.get_array_memory_size())
        })
        .sum()
}

/// A boxed text table of the rows that fit in `bound` bytes, and the summary line.
fn table(result: &QueryResult, bound: usize) -> Result<(Vec<u8>, bool), ArrowError> {
    let pretty = |batches: &[RecordBatch]| -> Result<Vec<u8>, ArrowError> {
        Ok(arrow::util::pretty::pretty_format_batches(batches)?
            .to_string()
            .into_bytes())
    };
    let fitted = fit(&result.batches, bound, Keep::Slices, |batch, _| {
        pretty(std::slice::from_ref(batch))
    })?;
    let (mut slices, mut complete) = (fitted.slices, fitted.complete);
    // One table is as wide as its widest row: fewer rows until it fits.
    let mut text = pretty(&slices)?;
    while text.len() > bound && !slices.is_empty() {
        let keep = slices.len() / 2;
        slices.truncate(keep);
        complete = false;
        text = pretty(&slices)?;
    }
    let rows = slices.iter().map(RecordBatch::num_rows).sum();
    let truncated = truncation(result, complete);
    text.push(b'\n');
    text.extend_from_slice(summary_of(rows, result.elapsed, truncated).as_bytes());
    text.push(b'\n');
    Ok((text, complete))
}

/// One batch as an Arrow IPC stream.
fn ipc_stream(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    drop(writer);
    Ok(out)
}

/// The rows of a batch as JSON objects separated by commas, without the brackets.
fn json_rows(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    let builder = arrow::json::WriterBuilder::new().with_explicit_nulls(true);
    let mut writer = builder.build::<_, arrow::json::writer::JsonArray>(&mut out);
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    if out.first() == Some(&b'[') && out.last() == Some(&b']') {
        out.pop();
        out.remove(0);
    }
    Ok(out)
}

fn columns(schema: &SchemaRef) -> Value {
    Value::Array(
        schema
            .fields()
            .iter()
            .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
            .collect(),
    )
}

/// Rows as JSON objects (Arrow's JSON writer: timestamps as RFC 3339 text, nulls kept).
pub fn rows_json(batches: &[RecordBatch]) -> Result<Value, ArrowError> {
    let mut buffer = Vec::new();
    {
        let builder = arrow::json::WriterBuilder::new().with_explicit_nulls(true);
        let mut writer = builder.build::<_, arrow::json::writer::JsonArray>(&mut buffer);
        for batch in batches {
            writer.write(batch)?;
        }
        writer.finish()?;
    }
    if buffer.is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&buffer).map_err(|e| ArrowError::JsonError(e.to_string()))
}
