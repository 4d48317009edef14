//! Writes the seeded synthetic dataset (`synthetic:ROWS:FEATURES:CLASSES` of `--dataset`) to a
//! Parquet or CSV file, a chunk at a time, so a file of any size is written in bounded memory.
//! The file holds exactly the rows ingest draws for that spec and seed: ingesting the file or
//! the spec gives the same dataset version. `tandem dataset synth` is its command line.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float32Array, Int32Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tandem_model::{SyntheticRows, SyntheticSpec};

use crate::IngestError;
use crate::source::{CHUNK_ROWS, Source, file_error};

/// Rows per Parquet row group: the writer buffers one group, so this bounds its memory.
const ROW_GROUP_ROWS: usize = 65_536;

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

/// Writes `spec`'s rows drawn from `seed` to `out` (`.parquet`/`.parq`/`.pq`: Parquet with
/// snappy-compressed row groups; `.csv`: CSV), columns `f0..fN` and `label`. The file appears
/// complete or not at all (written beside it, then renamed).
pub fn write(spec: SyntheticSpec, seed: u64, out: &Path) -> Result<Written, IngestError> {
    let partial = out.with_file_name(format!(
        ".{}.partial",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    let written = match Source::parse(&out.display().to_string(), seed)? {
        Source::Parquet(_) => write_parquet(spec, seed, &partial),
        Source::Csv(_) if out.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) => {
            write_csv(spec, seed, &partial)
        }
        _ => Err("name it FILE.parquet (or .parq, .pq) or FILE.csv".to_string()),
    };
    let finished = written.and_then(|()| std::fs::rename(&partial, out).map_err(|e| e.to_string()));
    if let Err(problem) = finished {
        let _ = std::fs::remove_file(&partial);
        return Err(file_error(out, format!("cannot write the synthetic dataset: {problem}")));
    }
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(Written { path: out.to_path_buf(), rows: spec.rows as u64, bytes })
}

fn schema(features: usize) -> Arc<Schema> {
    let mut fields: Vec<Field> = (0..features).map(|i| Field::new(format!("f{i}"), DataType::Float32, false)).collect();
    fields.push(Field::new("label", DataType::Int32, false));
    Arc::new(Schema::new(fields))
}

fn write_parquet(spec: SyntheticSpec, seed: u64, path: &Path) -> Result<(), String> {
    let schema = schema(spec.features);
    let properties =
        WriterProperties::builder().set_compression(Compression::SNAPPY).set_max_row_group_size(ROW_GROUP_ROWS).build();
    let file = File::create(path).map_err(|e| e.to_string())?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(|e| e.to_string())?;
    let mut rows = SyntheticRows::new(spec, seed);
    while let Some((features, labels)) = rows.next_chunk(CHUNK_ROWS) {
        let mut columns: Vec<ArrayRef> = (0..spec.features)
            .map(|j| {
                Arc::new(Float32Array::from_iter_values(features.iter().skip(j).step_by(spec.features).copied()))
                    as ArrayRef
            })
            .collect();
        columns.push(Arc::new(Int32Array::from_iter_values(labels.iter().map(|&l| l as i32))));
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?;
        writer.write(&batch).map_err(|e| e.to_string())?;
    }
    writer.close().map_err(|e| e.to_string())?;
    Ok(())
}

fn write_csv(spec: SyntheticSpec, seed: u64, path: &Path) -> Result<(), String> {
    let mut out = BufWriter::new(File::create(path).map_err(|e| e.to_string())?);
    let header: Vec<String> = schema(spec.features).fields().iter().map(|f| f.name().clone()).collect();
    let mut write = || -> std::io::Result<()> {
        writeln!(out, "{}", header.join(","))?;
        let mut rows = SyntheticRows::new(spec, seed);
        while let Some((features, labels)) = rows.next_chunk(CHUNK_ROWS) {
            for (row, label) in features.chunks(spec.features).zip(labels) {
                for value in row {
                    // Display writes the shortest text that reads back as the same f32.
                    write!(out, "{value},")?;
                }
                writeln!(out, "{label}")?;
            }
        }
        out.flush()
    };
    write().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DatasetOptions, prepare};

    #[test]
    fn a_written_file_is_ingested_as_the_spec_it_was_drawn_from() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec { rows: 10_000, features: 5, classes: 3 };
        let from_spec = prepare(&DatasetOptions { dataset: spec.to_string(), seed: 4, ..Default::default() }).unwrap();
        for name in ["d.parquet", "d.csv"] {
            let path = dir.path().join(name);
            let written = write(spec, 4, &path).unwrap();
            assert_eq!(written.rows, 10_000);
            assert!(written.bytes > 0);
            let options = DatasetOptions { dataset: path.display().to_string(), seed: 4, ..Default::default() };
            let from_file = prepare(&options).unwrap();
            assert_eq!(from_file.manifest.dataset_version, from_spec.manifest.dataset_version, "{name}");
            assert_eq!(from_file.scaler, from_spec.scaler, "{name}");
            assert_eq!(from_file.manifest.class_count, 3);
        }
        let err = write(spec, 4, &dir.path().join("d.txt")).unwrap_err().to_string();
        assert!(err.contains("d.txt") && err.contains("FILE.parquet"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no partial file is left");
    }
}
