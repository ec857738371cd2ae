//! `information_schema` as a Postgres client reads it: the engine's own, but `columns` names
//! Postgres types (`timestamp with time zone`, `text`, `bigint`) where the engine's names
//! Arrow's (`Timestamp(µs, "UTC")`, `Utf8View`). Grafana's query builder finds time columns by
//! these names, and BI tools map them to their own types.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::information_schema::InformationSchemaProvider;
use datafusion::catalog::{CatalogProviderList, SchemaProvider, Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_postgres::arrow_pg::datatypes::into_pg_type;
use pgwire::api::Type;

/// The engine's `information_schema`, with [`Columns`] for `columns`.
#[derive(Debug)]
pub(crate) struct PgInformationSchema {
    inner: InformationSchemaProvider,
    catalogs: Arc<dyn CatalogProviderList>,
    /// The database the types are said to belong to (`udt_catalog`).
    database: &'static str,
}

impl PgInformationSchema {
    pub(crate) fn new(catalogs: Arc<dyn CatalogProviderList>, database: &'static str) -> Self {
        Self {
            inner: InformationSchemaProvider::new(catalogs.clone()),
            catalogs,
            database,
        }
    }
}

#[async_trait]
impl SchemaProvider for PgInformationSchema {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if name.eq_ignore_ascii_case("columns") {
            return Ok(Some(Arc::new(Columns {
                catalogs: self.catalogs.clone(),
                database: self.database,
            })));
        }
        self.inner.table(name).await
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// `information_schema.columns` with Postgres type names, made when a statement reads it.
#[derive(Debug)]
struct Columns {
    catalogs: Arc<dyn CatalogProviderList>,
    database: &'static str,
}

fn columns_schema() -> SchemaRef {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let number = |name: &str| Field::new(name, DataType::Int64, true);
    Arc::new(Schema::new(vec![
        text("table_catalog", false),
        text("table_schema", false),
        text("table_name", false),
        text("column_name", false),
        Field::new("ordinal_position", DataType::Int64, false),
        text("column_default", true),
        text("is_nullable", false),
        text("data_type", false),
        number("character_maximum_length"),
        number("numeric_precision"),
        number("numeric_precision_radix"),
        number("numeric_scale"),
        number("datetime_precision"),
        text("udt_catalog", false),
        text("udt_schema", false),
        text("udt_name", false),
    ]))
}

#[async_trait]
impl TableProvider for Columns {
    fn schema(&self) -> SchemaRef {
        columns_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = self.rows().await?;
        MemTable::try_new(batch.schema(), vec![vec![batch]])?
            .scan(state, projection, filters, limit)
            .await
    }
}

/// One builder per column of [`columns_schema`].
#[derive(Default)]
struct Rows {
    catalog: StringBuilder,
    schema: StringBuilder,
    table: StringBuilder,
    column: StringBuilder,
    position: Int64Builder,
    default: StringBuilder,
    nullable: StringBuilder,
    data_type: StringBuilder,
    max_length: Int64Builder,
    precision: Int64Builder,
    radix: Int64Builder,
    scale: Int64Builder,
    datetime_precision: Int64Builder,
    udt_catalog: StringBuilder,
    udt_schema: StringBuilder,
    udt_name: StringBuilder,
}

impl Columns {
    async fn rows(&self) -> Result<RecordBatch> {
        let mut rows = Rows::default();
        for catalog_name in self.catalogs.catalog_names() {
            let Some(catalog) = self.catalogs.catalog(&catalog_name) else {
                continue;
            };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else {
                    continue;
                };
                for table_name in schema.table_names() {
                    let Some(table) = schema.table(&table_name).await? else {
                        continue;
                    };
                    for (i, field) in table.schema().fields().iter().enumerate() {
                        rows.catalog.append_value(&catalog_name);
                        rows.schema.append_value(&schema_name);
                        rows.table.append_value(&table_name);
                        rows.column.append_value(field.name());
                        rows.position.append_value(i as i64 + 1);
                        rows.default.append_null();
                        rows.nullable
                            .append_value(if field.is_nullable() { "YES" } else { "NO" });
                        rows.describe(field.data_type(), self.database);
                    }
                }
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(rows.catalog.finish()),
            Arc::new(rows.schema.finish()),
            Arc::new(rows.table.finish()),
            Arc::new(rows.column.finish()),
            Arc::new(rows.position.finish()),
            Arc::new(rows.default.finish()),
            Arc::new(rows.nullable.finish()),
            Arc::new(rows.data_type.finish()),
            Arc::new(rows.max_length.finish()),
            Arc::new(rows.precision.finish()),
            Arc::new(rows.radix.finish()),
            Arc::new(rows.scale.finish()),
            Arc::new(rows.datetime_precision.finish()),
            Arc::new(rows.udt_catalog.finish()),
            Arc::new(rows.udt_schema.finish()),
            Arc::new(rows.udt_name.finish()),
        ];
        RecordBatch::try_new(columns_schema(), columns).map_err(DataFusionError::from)
    }
}

impl Rows {
    /// The type columns of one column of type `data_type`.
    fn describe(&mut self, data_type: &DataType, database: &str) {
        let pg = into_pg_type(data_type).unwrap_or(Type::TEXT);
        self.data_type.append_value(sql_type_name(&pg));
        self.udt_catalog.append_value(database);
        self.udt_schema.append_value("pg_catalog");
        self.udt_name.append_value(pg.name());
        self.max_length.append_null();
        let (precision, radix, scale) = match data_type {
            DataType::Int8 | DataType::Int16 | DataType::UInt8 => (Some(16), Some(2), Some(0)),
            DataType::Int32 | DataType::UInt16 => (Some(32), Some(2), Some(0)),
            DataType::Int64 | DataType::UInt32 => (Some(64), Some(2), Some(0)),
            DataType::Float32 => (Some(24), Some(2), None),
            DataType::Float64 => (Some(53), Some(2), None),
            DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => {
                (Some(i64::from(*p)), Some(10), Some(i64::from(*s)))
            }
            _ => (None, None, None),
        };
        self.precision.append_option(precision);
        self.radix.append_option(radix);
        self.scale.append_option(scale);
        let datetime = match data_type {
            DataType::Timestamp(unit, _) | DataType::Time64(unit) | DataType::Duration(unit) => {
                Some(match unit {
                    arrow::datatypes::TimeUnit::Second => 0,
                    arrow::datatypes::TimeUnit::Millisecond => 3,
                    _ => 6,
                })
            }
            DataType::Date32 | DataType::Date64 => Some(0),
            _ => None,
        };
        self.datetime_precision.append_option(datetime);
    }
}

/// The name `information_schema.columns.data_type` gives a type: the SQL standard's for the
/// built-in ones, `ARRAY` for arrays, else the type's own name.
fn sql_type_name(pg: &Type) -> String {
    // Array types are named after their element, with a leading underscore (`_int4`).
    if pg.name().starts_with('_') {
        return "ARRAY".into();
    }
    let name = match *pg {
        Type::BOOL => "boolean",
        Type::INT2 => "smallint",
        Type::INT4 => "integer",
        Type::INT8 => "bigint",
        Type::FLOAT4 => "real",
        Type::FLOAT8 => "double precision",
        Type::VARCHAR => "character varying",
        Type::BPCHAR => "character",
        Type::TIME => "time without time zone",
        Type::TIMESTAMP => "timestamp without time zone",
        Type::TIMESTAMPTZ => "timestamp with time zone",
        _ => return pg.name().to_string(),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_take_their_postgres_names() {
        let named = |data_type: DataType| {
            sql_type_name(&into_pg_type(&data_type).expect("a Postgres type"))
        };
        assert_eq!(
            named(DataType::Timestamp(
                arrow::datatypes::TimeUnit::Microsecond,
                Some("UTC".into())
            )),
            "timestamp with time zone"
        );
        assert_eq!(named(DataType::Utf8View), "text");
        assert_eq!(named(DataType::Int64), "bigint");
        assert_eq!(named(DataType::Float64), "double precision");
        assert_eq!(named(DataType::Decimal128(38, 10)), "numeric");
        assert_eq!(named(DataType::Boolean), "boolean");
    }
}
