//! What to ingest, and the first pass over it: the split, the batches' contents hashed into
//! the dataset version, the scaler fitted on the train split, the counts. Publishing re-reads
//! the source ([`Prepared::batches`]) and checks it still hashes to the same version.

use clap::Args;
use sha2::{Digest, Sha256};
use tandem_model::DatasetError;
use tandem_pipeline::messages::{Batch, DatasetManifest, RawEnd, ScalerParams, Split, SplitCounts};
use tandem_pipeline::moments::{self, BatchMoments};

use crate::batching::{Cut, Cutter};
use crate::source::{Rows, Source};

/// What to ingest and how to cut it.
#[derive(Debug, Clone, Args)]
pub struct DatasetOptions {
    /// `digits` (the bundled 8x8 digits set), `synthetic:ROWS:FEATURES:CLASSES` (a seeded
    /// synthetic classification set, drawn from --seed), or the path of a Parquet file
    /// (`.parquet`, `.parq`, `.pq`) or of a CSV file with a header line (any other name).
    #[arg(long, env = "TANDEM_DATASET", default_value = "digits")]
    pub dataset: String,
    /// The column holding the class label (integers from 0); every other column is a feature.
    #[arg(long, env = "TANDEM_LABEL_COLUMN", default_value = "label")]
    pub label_column: String,
    /// Seed of the train/test split.
    #[arg(long, env = "TANDEM_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Share of the rows that goes to the test split (each row independently, by a seeded hash
    /// of its position).
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
    /// The dataset's description or its split is unusable.
    #[error("dataset {source_name}: {error}")]
    Dataset { source_name: String, error: DatasetError },
    /// The file is unusable; the problem names the column and the row (or line) when one is at fault.
    #[error("dataset file {path}: {problem}")]
    File { path: String, problem: String },
}

/// A dataset read once and ready to publish: its manifest and the scaler fitted on its train
/// split. Its batches are read again when published ([`Prepared::batches`]).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub manifest: DatasetManifest,
    pub scaler: ScalerParams,
    source: Source,
    options: DatasetOptions,
}

impl Prepared {
    pub fn end_marker(&self) -> RawEnd {
        RawEnd {
            dataset_version: self.manifest.dataset_version.clone(),
            feature_count: self.manifest.feature_count,
            class_count: self.manifest.class_count,
            counts: self.manifest.counts,
            scaler: self.scaler.clone(),
        }
    }

    /// The second pass: every batch in publish order (each split's in index order, the two
    /// interleaved as rows come), read from the source again. Ends with an error instead if the
    /// source no longer hashes to the manifest's version (the file changed meanwhile).
    pub fn batches(&self) -> Result<Batches, IngestError> {
        let rows = self.source.open(&self.options.label_column)?;
        let cutter = cutter(&rows, &self.options);
        Ok(Batches {
            rows,
            cutter: Some(cutter),
            ready: Default::default(),
            digest: ContentHash::new(self.options.batch_size),
            done: false,
            manifest: self.manifest.clone(),
            source_name: self.source.name(),
        })
    }
}

/// The batches of [`Prepared::batches`].
pub struct Batches {
    rows: Rows,
    cutter: Option<Cutter>,
    ready: std::collections::VecDeque<Cut>,
    digest: ContentHash,
    done: bool,
    manifest: DatasetManifest,
    source_name: String,
}

impl Iterator for Batches {
    type Item = Result<Batch, IngestError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(cut) = self.ready.pop_front() {
                self.digest.add(&cut);
                let manifest = &self.manifest;
                return Some(Ok(Batch {
                    dataset_version: manifest.dataset_version.clone(),
                    split: cut.split,
                    batch_index: cut.index,
                    batch_count: manifest.counts.batches(cut.split),
                    feature_count: manifest.feature_count,
                    features: cut.rows,
                    labels: cut.labels,
                }));
            }
            if self.done {
                return None;
            }
            let Some(cutter) = self.cutter.as_mut() else {
                self.done = true;
                return self.changed();
            };
            match self.rows.next() {
                Some(Ok(chunk)) => self.ready.extend(cutter.push(&chunk)),
                Some(Err(error)) => {
                    self.done = true;
                    return Some(Err(error));
                }
                None => {
                    let cutter = self.cutter.take().expect("the cutter is there while reading");
                    self.ready.extend(cutter.finish());
                }
            }
        }
    }
}

impl Batches {
    /// After the last batch: an error if what was read differs from the first pass.
    fn changed(&mut self) -> Option<Result<Batch, IngestError>> {
        let digest = std::mem::replace(&mut self.digest, ContentHash::new(0));
        let counts = digest.counts;
        let version = digest.version();
        (version != self.manifest.dataset_version || counts != self.manifest.counts).then(|| {
            Err(IngestError::File {
                path: self.source_name.clone(),
                problem: format!(
                    "changed while it was published: read first as version {} ({} rows), now as {version} ({} rows)",
                    self.manifest.dataset_version,
                    self.manifest.counts.train_samples + self.manifest.counts.test_samples,
                    counts.train_samples + counts.test_samples,
                ),
            })
        })
    }
}

fn cutter(rows: &Rows, options: &DatasetOptions) -> Cutter {
    Cutter::new(rows.feature_names.len(), options.batch_size as usize, options.seed, options.test_fraction)
}

/// The content hash and counts of a sequence of batches.
struct ContentHash {
    hasher: Sha256,
    counts: SplitCounts,
}

impl ContentHash {
    fn new(batch_size: u32) -> ContentHash {
        let mut hasher = Sha256::new();
        hasher.update(b"tandem-pipeline-dataset-v2");
        hasher.update(batch_size.to_le_bytes());
        ContentHash { hasher, counts: SplitCounts::default() }
    }

    fn add(&mut self, cut: &Cut) {
        let samples = cut.labels.len() as u32;
        match cut.split {
            Split::Train => (self.counts.train_batches += 1, self.counts.train_samples += samples),
            Split::Test => (self.counts.test_batches += 1, self.counts.test_samples += samples),
        };
        self.hasher.update([cut.split as u8]);
        self.hasher.update(cut.index.to_le_bytes());
        self.hasher.update(samples.to_le_bytes());
        // One update per row: the hasher's per-call cost would dominate at one per value.
        let mut bytes = Vec::with_capacity(4 * (cut.rows.first().map_or(0, Vec::len) + 1));
        for (row, label) in cut.rows.iter().zip(&cut.labels) {
            bytes.clear();
            bytes.extend_from_slice(&label.to_le_bytes());
            bytes.extend(row.iter().flat_map(|value| value.to_le_bytes()));
            self.hasher.update(&bytes);
        }
    }

    /// The dataset version: the hash of every batch's split, index and contents, and the batch
    /// size, so another seed, split, batching or content is another version.
    fn version(self) -> String {
        self.hasher.finalize().iter().take(8).map(|byte| format!("{byte:02x}")).collect()
    }
}

/// The first pass over the dataset: checks every value, splits and cuts it, hashes it into
/// the version and fits the scaler on the train split. Holds one chunk and one unfinished
/// batch per split at a time, whatever the dataset's size.
pub fn prepare(options: &DatasetOptions) -> Result<Prepared, IngestError> {
    let source = Source::parse(&options.dataset, options.seed)?;
    let source_name = source.name();
    let fail = |error| IngestError::Dataset { source_name: source_name.clone(), error };
    if !(options.test_fraction > 0.0 && options.test_fraction < 1.0) {
        return Err(fail(DatasetError::BadTestFraction(options.test_fraction)));
    }
    let rows = source.open(&options.label_column)?;
    let feature_count = rows.feature_names.len() as u32;
    let mut cutter = cutter(&rows, options);
    let mut digest = ContentHash::new(options.batch_size);
    // The train batches' moments, folded in batch order as they come (constant memory).
    let mut train_moments = moments::Fold::default();
    let mut classes = 0u32;
    let mut take = |cut: Cut| {
        digest.add(&cut);
        classes = classes.max(cut.labels.iter().max().map_or(0, |&max| max + 1));
        if cut.split == Split::Train {
            // Every batch has the source's width: the fold cannot refuse one.
            let _ = train_moments.add(&BatchMoments::of(&cut.rows));
        }
    };
    for chunk in rows {
        cutter.push(&chunk?).into_iter().for_each(&mut take);
    }
    cutter.finish().into_iter().for_each(&mut take);
    let counts = digest.counts;
    if counts.train_samples + counts.test_samples == 0 {
        return Err(fail(DatasetError::NoSamples));
    }
    // The moments folded in batch order: the same bits whoever computes them.
    let Some(scaler) = train_moments.finish().filter(|_| counts.test_samples > 0) else {
        return Err(fail(DatasetError::BadTestFraction(options.test_fraction)));
    };
    let manifest = DatasetManifest {
        dataset_version: digest.version(),
        source: source_name,
        seed: options.seed,
        test_fraction: options.test_fraction,
        batch_size: options.batch_size,
        feature_count,
        class_count: classes,
        counts,
        created_at: tandem_pipeline::service::now_rfc3339(),
        complete: false,
    };
    Ok(Prepared { manifest, scaler, source, options: options.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(prepared: &Prepared) -> Vec<Batch> {
        prepared.batches().unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn digits_are_cut_into_versioned_batches_deterministically() {
        let a = prepare(&DatasetOptions::default()).unwrap();
        let b = prepare(&DatasetOptions::default()).unwrap();
        assert_eq!(a.manifest.dataset_version, b.manifest.dataset_version);
        assert_eq!(batches(&a), batches(&b));
        let counts = a.manifest.counts;
        assert_eq!(counts.train_samples + counts.test_samples, 1797);
        assert!((300..420).contains(&counts.test_samples), "{counts:?}");
        assert_eq!(batches(&a).len() as u32, counts.total_batches());
        assert_eq!(a.manifest.feature_count, 64);
        assert_eq!(a.manifest.class_count, 10);
        assert_eq!(a.scaler.samples, u64::from(counts.train_samples));
        let other_seed = prepare(&DatasetOptions { seed: 7, ..Default::default() }).unwrap();
        assert_ne!(other_seed.manifest.dataset_version, a.manifest.dataset_version);
    }

    #[test]
    fn the_scaler_is_fitted_on_the_train_batches_alone() {
        let prepared = prepare(&DatasetOptions { dataset: "synthetic:3000:4:3".into(), ..Default::default() }).unwrap();
        let train: Vec<Vec<f32>> =
            batches(&prepared).into_iter().filter(|b| b.split == Split::Train).flat_map(|b| b.features).collect();
        let whole = moments::fit(&[BatchMoments::of(&train)]).unwrap();
        assert_eq!(prepared.scaler.samples, train.len() as u64);
        for i in 0..4 {
            assert!((prepared.scaler.mean[i] - whole.mean[i]).abs() < 1e-4, "mean {i}");
            assert!((prepared.scaler.std[i] - whole.std[i]).abs() < 1e-4, "std {i}");
        }
    }

    #[test]
    fn synthetic_datasets_are_drawn_from_the_seed_and_bad_specs_named() {
        let options = DatasetOptions { dataset: "synthetic:500:8:3".into(), ..Default::default() };
        let a = prepare(&options).unwrap();
        assert_eq!(batches(&a), batches(&prepare(&options).unwrap()));
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
        let fraction = DatasetOptions { test_fraction: 1.0, ..Default::default() };
        assert!(prepare(&fraction).unwrap_err().to_string().contains("test fraction 1"));
    }
}
