//! Loading, splitting and batching the dataset.

use std::path::PathBuf;

use clap::Args;
use sha2::{Digest, Sha256};
use tandem_model::{Dataset, DatasetError, SyntheticSpec};
use tandem_pipeline::messages::{Batch, DatasetManifest, RawBatch, RawEnd, ScalerParams, Split, SplitCounts};
use tandem_pipeline::moments::{self, BatchMoments};

/// What to ingest and how to cut it.
#[derive(Debug, Clone, Args)]
pub struct DatasetOptions {
    /// `digits` (the bundled 8x8 digits set), `synthetic:ROWS:FEATURES:CLASSES` (a seeded
    /// synthetic classification set, drawn from --seed) or the path of a CSV file with a header line.
    #[arg(long, env = "TANDEM_DATASET", default_value = "digits")]
    pub dataset: String,
    /// The CSV column holding the class label (integers from 0); every other column is a feature.
    #[arg(long, env = "TANDEM_LABEL_COLUMN", default_value = "label")]
    pub label_column: String,
    /// Seed of the train/test split.
    #[arg(long, env = "TANDEM_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Share of each class that goes to the test split.
    #[arg(long, env = "TANDEM_TEST_FRACTION", default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Samples per published batch.
    #[arg(long, env = "TANDEM_BATCH_SIZE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions {
            dataset: "digits".into(),
            label_column: "label".into(),
            seed: 42,
            test_fraction: 0.2,
            batch_size: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The CSV (or the split) is unusable; the message names the line and column.
    #[error("dataset {source_name}: {error}")]
    Dataset { source_name: String, error: DatasetError },
}

/// A dataset ready to publish: its batches in publish order (train, then test), its manifest
/// and the scaler fitted on its train split.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub manifest: DatasetManifest,
    pub batches: Vec<Batch>,
    pub scaler: ScalerParams,
}

impl Prepared {
    /// `batch` as it goes on `dataset.raw`: with the scaler.
    pub fn raw_batch(&self, batch: &Batch) -> RawBatch {
        RawBatch { batch: batch.clone(), scaler: self.scaler.clone() }
    }

    pub fn end_marker(&self) -> RawEnd {
        RawEnd {
            dataset_version: self.manifest.dataset_version.clone(),
            feature_count: self.manifest.feature_count,
            class_count: self.manifest.class_count,
            counts: self.manifest.counts,
            scaler: self.scaler.clone(),
        }
    }
}

/// Loads and splits the dataset and cuts it into batches.
pub fn prepare(options: &DatasetOptions) -> Result<Prepared, IngestError> {
    let source_name = options.dataset.clone();
    let fail = |error| IngestError::Dataset { source_name: source_name.clone(), error };
    let dataset = if options.dataset == "digits" {
        Dataset::digits()
    } else if let Some(spec) = SyntheticSpec::parse(&options.dataset).map_err(fail)? {
        Dataset::synthetic(spec, options.seed)
    } else {
        Dataset::from_csv_file(&PathBuf::from(&options.dataset), &options.label_column).map_err(fail)?
    };
    let split = dataset.split(options.test_fraction, options.seed).map_err(fail)?;
    let batch_size = options.batch_size as usize;
    let dataset_version = version(&split.train, &split.test, options.batch_size);
    let mut batches = Vec::new();
    for (kind, part) in [(Split::Train, &split.train), (Split::Test, &split.test)] {
        let rows = part.to_rows();
        let count = rows.len().div_ceil(batch_size) as u32;
        for (index, (rows, labels)) in rows.chunks(batch_size).zip(part.labels().chunks(batch_size)).enumerate() {
            batches.push(Batch {
                dataset_version: dataset_version.clone(),
                split: kind,
                batch_index: index as u32,
                batch_count: count,
                feature_count: dataset.num_features() as u32,
                features: rows.to_vec(),
                labels: labels.to_vec(),
            });
        }
    }
    // The scaler: every train batch's moments, combined in batch order (deterministic bits).
    let train_moments: Vec<BatchMoments> =
        batches.iter().filter(|b| b.split == Split::Train).map(|b| BatchMoments::of(&b.features)).collect();
    // The split leaves samples on both sides, so there is a train batch.
    let scaler = moments::fit(&train_moments).ok_or_else(|| fail(DatasetError::NoSamples))?;
    let counts = SplitCounts {
        train_batches: split.train.len().div_ceil(batch_size) as u32,
        test_batches: split.test.len().div_ceil(batch_size) as u32,
        train_samples: split.train.len() as u32,
        test_samples: split.test.len() as u32,
    };
    let manifest = DatasetManifest {
        dataset_version,
        source: options.dataset.clone(),
        seed: options.seed,
        test_fraction: options.test_fraction,
        batch_size: options.batch_size,
        feature_count: dataset.num_features() as u32,
        class_count: dataset.num_classes() as u32,
        counts,
        created_at: tandem_pipeline::service::now_rfc3339(),
        complete: false,
    };
    Ok(Prepared { manifest, batches, scaler })
}

/// The dataset version: a hash over both splits' contents and the batch size (downstream
/// bookkeeping is per batch), so another seed, split or batching is another version.
fn version(train: &Dataset, test: &Dataset, batch_size: u32) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"tandem-pipeline-dataset-v1");
    hasher.update(train.version().as_bytes());
    hasher.update(test.version().as_bytes());
    hasher.update(batch_size.to_le_bytes());
    hasher.finalize().iter().take(8).map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_cut_into_versioned_batches_deterministically() {
        let a = prepare(&DatasetOptions::default()).unwrap();
        let b = prepare(&DatasetOptions::default()).unwrap();
        assert_eq!(a.manifest.dataset_version, b.manifest.dataset_version);
        assert_eq!(a.batches, b.batches);
        let counts = a.manifest.counts;
        assert_eq!(counts.train_samples + counts.test_samples, 1797);
        assert_eq!(a.batches.len() as u32, counts.total_batches());
        assert_eq!(a.manifest.feature_count, 64);
        assert_eq!(a.manifest.class_count, 10);
        let other_seed = prepare(&DatasetOptions { seed: 7, ..Default::default() }).unwrap();
        assert_ne!(other_seed.manifest.dataset_version, a.manifest.dataset_version);
    }

    #[test]
    fn synthetic_datasets_are_drawn_from_the_seed_and_bad_specs_named() {
        let options = DatasetOptions { dataset: "synthetic:500:8:3".into(), ..Default::default() };
        let a = prepare(&options).unwrap();
        assert_eq!(a.batches, prepare(&options).unwrap().batches);
        let counts = a.manifest.counts;
        assert_eq!(
            (counts.train_samples + counts.test_samples, a.manifest.feature_count, a.manifest.class_count),
            (500, 8, 3)
        );
        let other_seed = prepare(&DatasetOptions { seed: 7, ..options }).unwrap();
        assert_ne!(other_seed.manifest.dataset_version, a.manifest.dataset_version);
        let bad = DatasetOptions { dataset: "synthetic:500:8".into(), ..Default::default() };
        let err = prepare(&bad).unwrap_err().to_string();
        assert!(err.contains("synthetic dataset 'synthetic:500:8': 2 numbers given, 3 needed"), "{err}");
    }

    #[test]
    fn a_bad_csv_is_named_with_line_and_column() {
        let dir = std::env::temp_dir().join(format!("tandem-ingest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.csv");
        std::fs::write(&path, "a,b,label\n1,2,0\n3,x,1\n").unwrap();
        let options = DatasetOptions { dataset: path.display().to_string(), ..Default::default() };
        let err = prepare(&options).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("'b'"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
