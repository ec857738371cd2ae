//! Query answers as a table, CSV, JSON or an Arrow IPC stream.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use serde_json::{Value, json};

use super::QueryResult;

/// Output formats of `northstar sql` and `POST /v1/sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A boxed text table, for people.
    Table,
    /// RFC 4180 CSV with a header row.
    Csv,
    /// JSON: `{"columns": [...], "rows": [{...}], "row_count", "truncated", "elapsed_ms"}`.
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

/// Renders a result in `format`.
pub fn render(result: &QueryResult, format: Format) -> Result<Vec<u8>, ArrowError> {
    match format {
        Format::Table => {
            let mut text = arrow::util::pretty::pretty_format_batches(&result.batches)?.to_string();
            text.push('\n');
            text.push_str(&summary(result));
            text.push('\n');
            Ok(text.into_bytes())
        }
        Format::Csv => {
            let mut out = Vec::new();
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if result.batches.is_empty() {
                writer.write(&RecordBatch::new_empty(result.schema.clone()))?;
            }
            for batch in &result.batches {
                writer.write(batch)?;
            }
            drop(writer);
            Ok(out)
        }
        Format::Json => {
            let body = json!({
                "columns": columns(&result.schema),
                "rows": rows_json(&result.batches)?,
                "row_count": result.row_count(),
                "truncated": result.truncated,
                "elapsed_ms": result.elapsed.as_secs_f64() * 1000.0,
            });
            Ok(serde_json::to_vec(&body).unwrap_or_default())
        }
        Format::Arrow => {
            let mut out = Vec::new();
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &result.schema)?;
            for batch in &result.batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            drop(writer);
            Ok(out)
        }
    }
}

/// `12 rows in 3.4 ms` (and a note when the row cap cut the answer).
pub fn summary(result: &QueryResult) -> String {
    let rows = result.row_count();
    let noun = if rows == 1 { "row" } else { "rows" };
    let mut text = format!(
        "{rows} {noun} in {:.1} ms",
        result.elapsed.as_secs_f64() * 1000.0
    );
    if result.truncated {
        text.push_str(" (cut at the row limit; add LIMIT or raise sql.maxRows)");
    }
    text
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
