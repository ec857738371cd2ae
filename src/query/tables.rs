//! The tables SQL sees, registered over the Parquet files of the data dir.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::Result;
use datafusion::prelude::{SessionContext, col};

use crate::event::events_schema;
use crate::rejected::rejected_schema;

/// A hive-partitioned Parquet table under the data dir.
pub struct TableDef {
    /// SQL name.
    pub name: &'static str,
    /// Directory under the data dir.
    pub dir: &'static str,
    /// File schema (the `date` partition column is added).
    pub schema: fn() -> SchemaRef,
    /// Order each file is sorted in, so plans can use it.
    pub sorted_by: &'static [&'static str],
}

/// The archived tables.
pub const TABLES: &[TableDef] = &[
    TableDef {
        name: "events",
        dir: "events",
        schema: events_schema,
        sorted_by: &["customer_id", "timestamp"],
    },
    TableDef {
        name: "rejected_events",
        dir: "rejected",
        schema: rejected_schema,
        sorted_by: &["received_at"],
    },
];

/// Registers every table of `data_dir` in `ctx`. A table whose directory does not exist yet
/// is created empty, so queries on a new install answer with no rows rather than an error.
pub fn register_all(ctx: &SessionContext, data_dir: &Path) -> Result<()> {
    for table in TABLES {
        let dir = data_dir.join(table.dir);
        std::fs::create_dir_all(&dir)?;
        register_parquet_dir(ctx, table, &dir)?;
    }
    Ok(())
}

fn register_parquet_dir(ctx: &SessionContext, table: &TableDef, dir: &Path) -> Result<()> {
    let order = table
        .sorted_by
        .iter()
        .map(|c| col(*c).sort(true, true))
        .collect::<Vec<_>>();
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![("date".to_string(), DataType::Utf8)])
        .with_file_sort_order(vec![order]);
    let url = ListingTableUrl::parse(format!("{}/", dir.canonicalize()?.display()))?;
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema((table.schema)());
    ctx.register_table(table.name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}
