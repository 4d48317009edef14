//! Parquet files, read with `parquet::arrow` a record batch at a time (at most
//! [`CHUNK_ROWS`] rows decoded at once, whatever the row groups' size).

use std::fs::File;
use std::path::Path;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::columns::Layout;
use super::{CHUNK_ROWS, Rows, file_error, rows_of};
use crate::IngestError;

/// Opens a pass over the Parquet file at `path`: its footer and schema are read and checked
/// here; rows are decoded as the pass goes.
pub fn open(path: &Path, label_column: &str) -> Result<Rows, IngestError> {
    let file = File::open(path).map_err(|e| file_error(path, format!("cannot open it: {e}")))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| file_error(path, format!("not a readable Parquet file (truncated or damaged?): {e}")))?;
    let layout = Layout::typed(builder.schema(), label_column).map_err(|problem| file_error(path, problem))?;
    // Where each row group starts, to name the group of a bad row.
    let group_starts: Vec<u64> = builder
        .metadata()
        .row_groups()
        .iter()
        .scan(0u64, |start, group| {
            let this = *start;
            *start += group.num_rows().max(0) as u64;
            Some(this)
        })
        .collect();
    let reader = builder
        .with_batch_size(CHUNK_ROWS)
        .build()
        .map_err(|e| file_error(path, format!("cannot read its row groups: {e}")))?;
    let locate = move |row: u64| {
        let group = group_starts.partition_point(|&start| start <= row).saturating_sub(1);
        format!("row {row} (0-based) in row group {group}")
    };
    let unreadable = locate.clone();
    let read_error = move |row: u64, e| format!("cannot decode {}: {e}", unreadable(row));
    Ok(rows_of(path, layout, reader, locate, read_error))
}
