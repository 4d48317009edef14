//! CSV files with a header line, read with `arrow-csv` a block of rows at a time. Every column
//! is read as text and parsed here, so a bad field is named by its line and column name.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arrow_csv::reader::{Format, ReaderBuilder};
use arrow_schema::{DataType, Field, Schema};

use super::columns::Layout;
use super::{CHUNK_ROWS, Rows, file_error, rows_of};
use crate::IngestError;

/// Opens a pass over the CSV file at `path`: its header is read and checked here; rows are
/// parsed as the pass goes.
pub fn open(path: &Path, label_column: &str) -> Result<Rows, IngestError> {
    let open = || File::open(path).map_err(|e| file_error(path, format!("cannot open it: {e}")));
    let mut file = open()?;
    let format = Format::default().with_header(true);
    let (header, _) = format
        .infer_schema(&mut file, Some(0))
        .map_err(|e| file_error(path, format!("cannot read its header: {e}")))?;
    let names: Vec<String> = header.fields().iter().map(|f| f.name().trim().to_string()).collect();
    if names.iter().all(String::is_empty) {
        return Err(file_error(path, "empty: expected a header line with the column names"));
    }
    let layout = Layout::text(names.clone(), label_column)
        .map_err(|problem| file_error(path, format!("line 1 (the header): {problem}")))?;
    let schema = Schema::new(names.iter().map(|name| Field::new(name, DataType::Utf8, true)).collect::<Vec<_>>());
    file.seek(SeekFrom::Start(0)).map_err(|e| file_error(path, format!("cannot read it: {e}")))?;
    let reader = ReaderBuilder::new(Arc::new(schema))
        .with_format(format)
        .with_batch_size(CHUNK_ROWS)
        .build(file)
        .map_err(|e| file_error(path, format!("cannot read it: {e}")))?;
    // Line 1 is the header; arrow-csv's own errors name the line.
    Ok(rows_of(path, layout, reader, |row| format!("line {}", row + 2), |_, e| e.to_string()))
}
