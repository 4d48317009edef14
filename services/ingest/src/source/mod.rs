//! Where a dataset's rows come from, a chunk at a time: the bundled digits, the seeded
//! synthetic generator, or a file read with the Apache Arrow crates (Parquet row group by row
//! group, CSV block by block), so no pass over a file ever holds more than one chunk of it.
//!
//! - [`columns`]: Arrow columns to rows of `f32` features and class labels, every value checked.
//! - [`parquet`](mod@parquet), [`csv`](mod@csv): the file readers.

pub mod columns;
pub mod csv;
pub mod parquet;

use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::ArrowError;
use tandem_model::{Dataset, SyntheticRows, SyntheticSpec};

use crate::IngestError;
use columns::Layout;

/// Rows read from a source at a time (and per Arrow record batch).
pub const CHUNK_ROWS: usize = 8192;

/// Consecutive rows of a source: row-major features and one label per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The source's 0-based index of the first row.
    pub first_row: u64,
    pub features: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A dataset's origin, as `--dataset` names it.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// The bundled 8x8 digits (1,797 rows).
    Digits,
    /// `synthetic:ROWS:FEATURES:CLASSES`, drawn from the seed.
    Synthetic { spec: SyntheticSpec, seed: u64 },
    /// A `.parquet` (or `.parq`, `.pq`) file.
    Parquet(PathBuf),
    /// Any other path: a CSV file with a header line.
    Csv(PathBuf),
}

/// One pass over a source's rows.
pub struct Rows {
    /// The feature columns' names, in the order of each row's values.
    pub feature_names: Vec<String>,
    chunks: Box<dyn Iterator<Item = Result<Chunk, IngestError>> + Send>,
}

impl Iterator for Rows {
    type Item = Result<Chunk, IngestError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.chunks.next()
    }
}

impl Source {
    /// The source `--dataset` names (`seed` draws synthetic data).
    pub fn parse(dataset: &str, seed: u64) -> Result<Source, IngestError> {
        if dataset == "digits" {
            return Ok(Source::Digits);
        }
        let spec = SyntheticSpec::parse(dataset)
            .map_err(|error| IngestError::Dataset { source_name: dataset.to_string(), error })?;
        if let Some(spec) = spec {
            return Ok(Source::Synthetic { spec, seed });
        }
        let path = PathBuf::from(dataset);
        let parquet = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| ["parquet", "parq", "pq"].contains(&e.to_ascii_lowercase().as_str()));
        Ok(if parquet { Source::Parquet(path) } else { Source::Csv(path) })
    }

    /// Opens a pass over the rows. A file's columns are checked here, before any row is read:
    /// the label column must exist and every column must be numeric.
    pub fn open(&self, label_column: &str) -> Result<Rows, IngestError> {
        match self {
            Source::Digits => Ok(in_memory(Dataset::digits())),
            Source::Synthetic { spec, seed } => {
                let mut generator = SyntheticRows::new(*spec, *seed);
                let mut first_row = 0u64;
                let chunks = std::iter::from_fn(move || {
                    let (features, labels) = generator.next_chunk(CHUNK_ROWS)?;
                    let chunk = Chunk { first_row, features, labels };
                    first_row += chunk.len() as u64;
                    Some(Ok(chunk))
                });
                Ok(Rows { feature_names: numbered_features(spec.features), chunks: Box::new(chunks) })
            }
            Source::Parquet(path) => parquet::open(path, label_column),
            Source::Csv(path) => csv::open(path, label_column),
        }
    }

    /// How the source is named in the manifest and in messages.
    pub fn name(&self) -> String {
        match self {
            Source::Digits => "digits".into(),
            Source::Synthetic { spec, .. } => spec.to_string(),
            Source::Parquet(path) | Source::Csv(path) => path.display().to_string(),
        }
    }
}

/// A pass over `batches`, the Arrow record batches of the file at `path`, each turned into a
/// [`Chunk`] by `layout`; the first error ends the pass. `locate` names a row in messages
/// (`line 3`, `row 9 (0-based) in row group 0`); `read_error` words a batch that could not be
/// read, given the row it would have started at.
fn rows_of(
    path: &Path,
    layout: Layout,
    batches: impl Iterator<Item = Result<RecordBatch, ArrowError>> + Send + 'static,
    locate: impl Fn(u64) -> String + Send + 'static,
    read_error: impl Fn(u64, ArrowError) -> String + Send + 'static,
) -> Rows {
    let feature_names = layout.feature_names();
    let path = path.to_path_buf();
    let mut next_row = 0u64;
    let mut failed = false;
    let chunks = batches.map_while(move |batch| {
        if failed {
            return None;
        }
        let chunk = batch
            .map_err(|e| file_error(&path, read_error(next_row, e)))
            .and_then(|batch| {
                layout.chunk(&batch, next_row).map_err(|bad| {
                    file_error(&path, format!("{}, column '{}': {}", locate(bad.row), bad.column, bad.problem))
                })
            })
            .inspect(|chunk: &Chunk| next_row += chunk.len() as u64);
        failed = chunk.is_err();
        Some(chunk)
    });
    Rows { feature_names, chunks: Box::new(chunks) }
}

/// An error about the file at `path`.
pub fn file_error(path: &Path, problem: impl Into<String>) -> IngestError {
    IngestError::File { path: path.display().to_string(), problem: problem.into() }
}

fn numbered_features(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("f{i}")).collect()
}

fn in_memory(dataset: Dataset) -> Rows {
    let width = dataset.num_features();
    let (features, labels) = (dataset.features().to_vec(), dataset.labels().to_vec());
    let chunks = features
        .chunks(CHUNK_ROWS * width)
        .zip(labels.chunks(CHUNK_ROWS))
        .enumerate()
        .map(|(i, (features, labels))| {
            Ok(Chunk { first_row: (i * CHUNK_ROWS) as u64, features: features.to_vec(), labels: labels.to_vec() })
        })
        .collect::<Vec<_>>();
    Rows { feature_names: numbered_features(width), chunks: Box::new(chunks.into_iter()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_named_by_their_spelling_and_extension() {
        assert_eq!(Source::parse("digits", 1).unwrap(), Source::Digits);
        assert!(matches!(Source::parse("synthetic:100:4:2", 1).unwrap(), Source::Synthetic { seed: 1, .. }));
        assert_eq!(Source::parse("/d/x.parquet", 1).unwrap(), Source::Parquet("/d/x.parquet".into()));
        assert_eq!(Source::parse("/d/x.PQ", 1).unwrap(), Source::Parquet("/d/x.PQ".into()));
        assert_eq!(Source::parse("/d/x.csv", 1).unwrap(), Source::Csv("/d/x.csv".into()));
        assert!(Source::parse("synthetic:1:2", 1).is_err());
    }

    #[test]
    fn synthetic_chunks_are_the_rows_of_the_in_memory_dataset() {
        let spec = SyntheticSpec { rows: 20_000, features: 3, classes: 4 };
        let whole = Dataset::synthetic(spec, 9);
        let rows: Vec<Chunk> = Source::Synthetic { spec, seed: 9 }.open("label").unwrap().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].first_row, CHUNK_ROWS as u64);
        let features: Vec<f32> = rows.iter().flat_map(|c| c.features.clone()).collect();
        let labels: Vec<u32> = rows.iter().flat_map(|c| c.labels.clone()).collect();
        assert_eq!((features.as_slice(), labels.as_slice()), (whole.features(), whole.labels()));
    }

    /// Reads every row of `path`, answering the first error's message.
    fn read_all(path: &Path, label: &str) -> Result<usize, String> {
        let source = Source::parse(path.to_str().unwrap(), 1).unwrap();
        let mut rows = 0;
        for chunk in source.open(label).map_err(|e| e.to_string())? {
            rows += chunk.map_err(|e| e.to_string())?.len();
        }
        Ok(rows)
    }

    fn write_parquet(path: &Path, groups: Vec<Vec<(&str, ArrayRef)>>) {
        // Every column nullable, as pandas writes them.
        let table = |group: Vec<(&str, ArrayRef)>| {
            RecordBatch::try_from_iter_with_nullable(group.into_iter().map(|(n, a)| (n, a, true))).unwrap()
        };
        let schema = table(groups[0].clone()).schema();
        let properties = ::parquet::file::properties::WriterProperties::builder().set_max_row_group_size(1_000).build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = ::parquet::arrow::ArrowWriter::try_new(file, schema, Some(properties)).unwrap();
        for group in groups {
            writer.write(&table(group)).unwrap();
            writer.flush().unwrap();
        }
        writer.close().unwrap();
    }

    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};

    fn floats(values: Vec<Option<f64>>) -> ArrayRef {
        Arc::new(Float64Array::from(values))
    }

    #[test]
    fn bad_parquet_files_are_named_with_the_column_and_the_row_group() {
        let dir = tempfile::tempdir().unwrap();
        let good = || {
            vec![
                ("x", floats(vec![Some(1.0), Some(2.0)])),
                ("label", Arc::new(Int64Array::from(vec![0, 1])) as ArrayRef),
            ]
        };
        let path = dir.path().join("good.parquet");
        write_parquet(&path, vec![good(), good(), good()]);
        assert_eq!(read_all(&path, "label"), Ok(6));

        let err = read_all(&path, "class").unwrap_err();
        assert_eq!(err, format!("dataset file {}: no label column 'class' (columns: x, label)", path.display()));

        let path = dir.path().join("null.parquet");
        let with_null =
            vec![("x", floats(vec![Some(1.0), None])), ("label", Arc::new(Int64Array::from(vec![0, 1])) as ArrayRef)];
        write_parquet(&path, vec![good(), with_null]);
        let err = read_all(&path, "label").unwrap_err();
        assert!(err.ends_with("null.parquet: row 3 (0-based) in row group 1, column 'x': no value (null)"), "{err}");

        // Labels stored as floats are fine while they are whole; a fraction in a later row group is named.
        let path = dir.path().join("fraction.parquet");
        let labels =
            |values: Vec<Option<f64>>| vec![("x", floats(vec![Some(1.0), Some(2.0)])), ("label", floats(values))];
        write_parquet(&path, vec![labels(vec![Some(0.0), Some(1.0)]), labels(vec![Some(2.0), Some(0.5)])]);
        let err = read_all(&path, "label").unwrap_err();
        assert!(
            err.ends_with(
                "row 3 (0-based) in row group 1, column 'label': label 0.5 is not a class index (an integer >= 0)"
            ),
            "{err}"
        );

        let path = dir.path().join("text-label.parquet");
        let text =
            vec![("x", floats(vec![Some(1.0)])), ("label", Arc::new(StringArray::from(vec!["cat"])) as ArrayRef)];
        write_parquet(&path, vec![text]);
        let err = read_all(&path, "label").unwrap_err();
        assert!(err.contains("text-label.parquet: the label column 'label' holds Utf8 values"), "{err}");

        // Cut short: the footer is gone.
        let path = dir.path().join("truncated.parquet");
        let bytes = std::fs::read(dir.path().join("good.parquet")).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_all(&path, "label").unwrap_err();
        assert!(err.contains("truncated.parquet: not a readable Parquet file (truncated or damaged?)"), "{err}");

        let err = read_all(&dir.path().join("missing.parquet"), "label").unwrap_err();
        assert!(err.contains("missing.parquet: cannot open it"), "{err}");
    }

    #[test]
    fn bad_csv_files_are_named_with_the_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("ragged.csv", "a,b,label\n1,2,0\n3,4\n", "incorrect number of fields for line 3, expected 3 got 2"),
            ("nan.csv", "a,b,label\n1,2,0\n3,oops,1\n", "line 3, column 'b': 'oops' is not a finite number"),
            ("missing.csv", "a,b,label\n1,,0\n", "line 2, column 'b': no value"),
            ("no-label.csv", "a,b,c\n1,2,0\n", "line 1 (the header): no label column 'label' (columns: a, b, c)"),
            ("cat.csv", "a,b,label\n1,2,0\n3,4,cat\n", "line 3, column 'label': label 'cat' is not a class index"),
            ("empty.csv", "", "empty: expected a header line"),
        ];
        for (name, text, expected) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = read_all(&path, "label").unwrap_err();
            assert!(err.contains(name) && err.contains(expected), "{name}: {err}");
        }
        let path = dir.path().join("good.csv");
        std::fs::write(&path, "a, \"b\",label\n1,2.5,0\n-3,4e2,1\n").unwrap();
        assert_eq!(read_all(&path, "label"), Ok(2));
    }
}
