//! The tables SQL sees, registered over the Parquet files of the data dir, and for the two
//! archived tables of a running server, over the archiver's rows not yet committed too
//! ([`LiveTable`]).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExecBuilder;
use datafusion::physical_plan::union::UnionExec;
use datafusion::prelude::{SessionContext, col};

use crate::archive::live::{Chunk, LiveRows};

use crate::catalog;
use crate::config::{Aggregation, Config};

/// The archivers' uncommitted rows of a running server, by table; none when SQL runs over a
/// data dir on its own (`northstar sql`).
#[derive(Debug, Clone, Default)]
pub struct LiveTables {
    /// The events archiver's buffer.
    pub events: Option<Arc<LiveRows>>,
    /// The rejected-messages archiver's buffer.
    pub rejected: Option<Arc<LiveRows>>,
}

impl LiveTables {
    fn of(&self, table: &str) -> Option<Arc<LiveRows>> {
        match table {
            name if name == catalog::EVENTS.name => self.events.clone(),
            name if name == catalog::REJECTED_EVENTS.name => self.rejected.clone(),
            _ => None,
        }
    }
}

/// Registers every table of `data_dir` in `ctx`, and the `metered_events` view of `config`'s
/// meters. A table whose directory does not exist yet is created empty, so queries on a new
/// install answer with no rows rather than an error. The archived tables read `live`'s rows
/// beside their files.
pub(crate) async fn register_all(
    ctx: &SessionContext,
    data_dir: &Path,
    config: &Config,
    live: &LiveTables,
) -> Result<()> {
    for table in catalog::ALL {
        let dir = data_dir.join(table.dir);
        std::fs::create_dir_all(&dir)?;
        let order: Vec<_> = table
            .sorted_by
            .iter()
            .map(|c| col(*c).sort(true, true))
            .collect();
        let orders = if order.is_empty() {
            vec![]
        } else {
            vec![order]
        };
        let files = parquet_dir(&dir, (table.schema)(), table.partitions, orders)?;
        let provider: Arc<dyn TableProvider> = match live.of(table.name) {
            Some(live) => Arc::new(LiveTable::new(files, live)?),
            None => files,
        };
        ctx.register_table(table.name, provider)?;
    }
    ctx.sql(&format!(
        "CREATE VIEW metered_events AS {}",
        metered_events_sql(config)
    ))
    .await?;
    ctx.sql(EVENTS_RESOLVED).await?;
    ctx.sql(super::persons::PERSONS_VIEW).await?;
    ctx.sql(super::persons::GROUPS_VIEW).await?;
    Ok(())
}

/// A hive-partitioned listing of the Parquet files under `dir`.
fn parquet_dir(
    dir: &Path,
    schema: SchemaRef,
    partitions: &[&str],
    order: Vec<Vec<datafusion::logical_expr::SortExpr>>,
) -> Result<Arc<dyn TableProvider>> {
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(
            partitions
                .iter()
                .map(|p| (p.to_string(), DataType::Utf8))
                .collect(),
        )
        .with_file_sort_order(order);
    let url = ListingTableUrl::parse(format!("{}/", dir.canonicalize()?.display()))?;
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(read_schema(&schema));
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// An archived table of a running server: its committed files and the archiver's sealed rows
/// after them (see [`crate::archive::live`]). A scan takes one snapshot of the buffer, reads
/// the files with `seq <= committed` of that snapshot, and the snapshot's rows beside them, so
/// a commit finishing during the query neither hides rows nor shows them twice.
#[derive(Debug)]
pub(crate) struct LiveTable {
    files: Arc<dyn TableProvider>,
    live: Arc<LiveRows>,
    /// Index of the `seq` column in the table's schema.
    seq: usize,
}

impl LiveTable {
    /// Wraps the listing of `files` (whose schema has a `seq` column) with `live`'s rows.
    pub(crate) fn new(files: Arc<dyn TableProvider>, live: Arc<LiveRows>) -> Result<Self> {
        let seq = files.schema().index_of("seq")?;
        Ok(Self { files, live, seq })
    }

    /// The snapshot's chunks in the table's schema: identifier columns as views (as
    /// [`read_schema`] reads them) and the `date` partition column added.
    fn memory_batches(&self, chunks: &[Chunk]) -> Result<Vec<RecordBatch>> {
        let schema = self.files.schema();
        chunks
            .iter()
            .map(|chunk| {
                let rows = chunk.batch.num_rows();
                let columns = schema
                    .fields()
                    .iter()
                    .map(|field| {
                        let column = match chunk.batch.column_by_name(field.name()) {
                            Some(column) => column.clone(),
                            None if field.name() == "date" => {
                                Arc::new(StringArray::from(vec![chunk.date.as_str(); rows]))
                                    as ArrayRef
                            }
                            None => new_null_array(field.data_type(), rows),
                        };
                        if column.data_type() == field.data_type() {
                            Ok(column)
                        } else {
                            Ok(cast(&column, field.data_type())?)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(RecordBatch::try_new(schema.clone(), columns)?)
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl TableProvider for LiveTable {
    fn schema(&self) -> SchemaRef {
        self.files.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // The files prune with them; the buffered rows are filtered above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snapshot = self.live.snapshot();
        if snapshot.chunks.is_empty() {
            // Nothing is buffered: the files hold every row up to the archive's position,
            // and one more commit seen here is only fresher.
            return self.files.scan(state, projection, filters, limit).await;
        }
        let wanted: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.schema().fields().len()).collect());
        let mut read = wanted.clone();
        let seq_at = match read.iter().position(|&i| i == self.seq) {
            Some(at) => at,
            None => {
                read.push(self.seq);
                read.len() - 1
            }
        };
        let files = self.files.scan(state, Some(&read), filters, None).await?;
        let committed = BinaryExpr::new(
            Arc::new(Column::new("seq", seq_at)),
            Operator::LtEq,
            Arc::new(Literal::new(ScalarValue::UInt64(Some(snapshot.committed)))),
        );
        let files = FilterExecBuilder::new(Arc::new(committed), files)
            .apply_projection(Some((0..wanted.len()).collect()))?
            .build()?;
        let memory = MemorySourceConfig::try_new_exec(
            &[self.memory_batches(&snapshot.chunks)?],
            self.schema(),
            Some(wanted),
        )?;
        UnionExec::try_new(vec![Arc::new(files), memory])
    }
}

/// The schema a table is read with: identifier and name columns as string views, which the
/// Parquet reader decodes into directly. Short ids are stored inline in a view, so the joins
/// and groupings on them (people, events, customers) hash and compare without chasing offsets.
/// JSON text columns stay plain strings.
fn read_schema(schema: &SchemaRef) -> SchemaRef {
    let fields = schema
        .fields()
        .iter()
        .map(|field| {
            if field.data_type() == &DataType::Utf8 && VIEW_COLUMNS.contains(&field.name().as_str())
            {
                Arc::new(field.as_ref().clone().with_data_type(DataType::Utf8View))
            } else {
                field.clone()
            }
        })
        .collect::<Vec<_>>();
    Arc::new(arrow::datatypes::Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    ))
}

/// Columns read as string views (see [`read_schema`]).
const VIEW_COLUMNS: &[&str] = &[
    "event",
    "user_id",
    "anonymous_id",
    "customer_id",
    "id",
    "person_id",
];

/// `events_resolved`: every event with the person it belongs to, through identity merges
/// (an anonymous id that was identified, an alias, a merged user id), else its own id.
pub const EVENTS_RESOLVED: &str = "CREATE VIEW events_resolved AS \
    SELECT e.*, coalesce(iu.person_id, e.user_id, ia.person_id, e.anonymous_id) AS person_id \
    FROM events e \
    LEFT JOIN identities iu ON iu.id = e.user_id \
    LEFT JOIN identities ia ON ia.id = e.anonymous_id";

/// The `metered_events` view: one row per event and meter it counts for, with the feature and
/// its exact quantity (1 per event without a value property), as the meter counts them.
pub(crate) fn metered_events_sql(config: &Config) -> String {
    let quote = super::string_literal;
    let mut parts = Vec::new();
    for event in &config.events {
        let Some(metering) = &event.metering else {
            continue;
        };
        let select = |quantity: &str| {
            format!(
                "SELECT customer_id, {feature} AS feature, event_id, seq, \"timestamp\", date, {quantity} AS quantity, properties \
                 FROM events WHERE event = {event} AND customer_id IS NOT NULL",
                feature = quote(&metering.feature_id),
                event = quote(&event.name),
            )
        };
        parts.push(match (&metering.value_property, metering.aggregation) {
            // The meter's own parser reads the quantity, once per row; a row it would skip is
            // left out here too.
            (Some(property), Aggregation::Sum | Aggregation::Max | Aggregation::Latest) => {
                let parsed = format!(
                    "{}(json_as_text(properties, {}))",
                    super::quantity::NAME,
                    quote(property)
                );
                format!(
                    "SELECT * FROM ({}) WHERE quantity IS NOT NULL",
                    select(&parsed)
                )
            }
            _ => select("CAST(1 AS DECIMAL(38, 10))"),
        });
    }
    if parts.is_empty() {
        return "SELECT customer_id, CAST(NULL AS VARCHAR) AS feature, event_id, seq, \"timestamp\", date, \
                CAST(1 AS DECIMAL(38, 10)) AS quantity, properties FROM events WHERE false"
            .to_string();
    }
    parts.join(" UNION ALL ")
}
