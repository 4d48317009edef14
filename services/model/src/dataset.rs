//! Labelled tabular data: the bundled digits set or a user's CSV file, its content version and
//! a seeded train/test split.
//!
//! A [`Dataset`] holds `len()` samples of `num_features()` finite `f32` features each, row-major,
//! and one class label per sample (`0..num_classes()`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::rng::SeededRng;

/// Why data could not be loaded, built or split. CSV errors name the 1-based line and the column.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DatasetError {
    /// The CSV file could not be read.
    #[error("cannot read CSV file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The CSV text has no header line.
    #[error("CSV is empty: expected a header line with the column names")]
    EmptyCsv,
    /// The header has no column of the requested label name (or has it twice).
    #[error("line 1: {problem} label column '{label_column}' in the CSV header (columns: {columns})")]
    LabelColumn {
        /// `no` or `more than one`.
        problem: &'static str,
        /// The requested name.
        label_column: String,
        /// The header's column names, comma separated.
        columns: String,
    },
    /// A line has a different number of fields than the header.
    #[error("line {line}: {found} fields, but the header has {expected} columns")]
    Ragged {
        /// 1-based line number in the file.
        line: usize,
        /// Fields on that line.
        found: usize,
        /// Columns in the header.
        expected: usize,
    },
    /// A feature field is not a finite number.
    #[error("line {line}, column '{column}': '{value}' is not a finite number")]
    NotANumber {
        /// 1-based line number in the file.
        line: usize,
        /// Column name from the header.
        column: String,
        /// The offending field.
        value: String,
    },
    /// A label field is not a class index.
    #[error("line {line}, column '{column}': label '{value}' is not a class index (an integer >= 0)")]
    BadLabel {
        /// 1-based line number in the file.
        line: usize,
        /// The label column's name.
        column: String,
        /// The offending field.
        value: String,
    },
    /// The header names only the label column.
    #[error("CSV has no feature columns besides the label column '{0}'")]
    NoFeatures(String),
    /// No data lines after the header, or no samples at all.
    #[error("dataset has no samples")]
    NoSamples,
    /// Rows of different widths, or a label count different from the row count.
    #[error("inconsistent data: {0}")]
    Shape(String),
    /// A feature value is NaN or infinite.
    #[error("sample {sample}, feature {feature}: {value} is not a finite number")]
    NonFinite {
        /// 0-based sample index.
        sample: usize,
        /// 0-based feature index.
        feature: usize,
        /// The value.
        value: f32,
    },
    /// A `synthetic:ROWS:FEATURES:CLASSES` description that does not parse or is out of range.
    #[error(
        "synthetic dataset '{spec}': {reason} (expected synthetic:ROWS:FEATURES:CLASSES, e.g. synthetic:60000:64:10)"
    )]
    Synthetic {
        /// The description as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The test fraction leaves one side of the split empty or is out of range.
    #[error("test fraction {0} must be > 0 and < 1 and leave samples on both sides of the split")]
    BadTestFraction(f64),
}

/// Labelled samples with a fixed feature count (row-major `f32` features, `u32` class labels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    num_features: usize,
    features: Vec<f32>,
    labels: Vec<u32>,
}

/// The shape of a seeded synthetic classification dataset, written `synthetic:ROWS:FEATURES:CLASSES`
/// (see [`Dataset::synthetic`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    /// Samples.
    pub rows: usize,
    /// Features per sample.
    pub features: usize,
    /// Classes (labels `0..classes`).
    pub classes: usize,
}

impl SyntheticSpec {
    /// The prefix that marks a dataset name as synthetic.
    pub const PREFIX: &'static str = "synthetic:";

    /// Parses `synthetic:ROWS:FEATURES:CLASSES`; `Ok(None)` when `text` does not start with
    /// `synthetic:` (it names another dataset).
    pub fn parse(text: &str) -> Result<Option<Self>, DatasetError> {
        let Some(rest) = text.strip_prefix(Self::PREFIX) else { return Ok(None) };
        let fail = |reason: String| DatasetError::Synthetic { spec: text.to_string(), reason };
        let parts: Vec<&str> = rest.split(':').collect();
        let [rows, features, classes] = parts.as_slice() else {
            return Err(fail(format!("{} numbers given, 3 needed", parts.len())));
        };
        let number = |name: &str, value: &str, min: usize| match value.trim().parse::<usize>() {
            Ok(n) if n >= min => Ok(n),
            Ok(n) => Err(fail(format!("{name} is {n}, it must be at least {min}"))),
            Err(_) => Err(fail(format!("{name} '{value}' is not a whole number"))),
        };
        let spec = Self {
            rows: number("ROWS", rows, 2)?,
            features: number("FEATURES", features, 1)?,
            classes: number("CLASSES", classes, 2)?,
        };
        if spec.rows < spec.classes {
            return Err(fail(format!("{} rows cannot hold {} classes", spec.rows, spec.classes)));
        }
        Ok(Some(spec))
    }
}

impl std::fmt::Display for SyntheticSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}:{}:{}", Self::PREFIX, self.rows, self.features, self.classes)
    }
}

/// The rows of [`Dataset::synthetic`], drawn a chunk at a time: a file of any size can be
/// written (or read) without holding it, and the rows are those of the in-memory dataset.
#[derive(Debug, Clone)]
pub struct SyntheticRows {
    spec: SyntheticSpec,
    rng: SeededRng,
    centres: Vec<f32>,
    next_row: usize,
}

impl SyntheticRows {
    const CLUSTERS_PER_CLASS: usize = 2;
    const CENTRE_DISTANCE: f32 = 6.0;

    pub fn new(spec: SyntheticSpec, seed: u64) -> Self {
        let mut rng = SeededRng::new(seed ^ 0x5EED_DA7A_5E70_0001);
        // Two random centres differ by spread * sqrt(2 * features) on average.
        let spread = Self::CENTRE_DISTANCE / (2.0 * spec.features as f32).sqrt();
        let centres: Vec<f32> =
            (0..spec.classes * Self::CLUSTERS_PER_CLASS * spec.features).map(|_| rng.normal_f32() * spread).collect();
        Self { spec, rng, centres, next_row: 0 }
    }

    /// Up to `max_rows` more rows (row-major features, labels); `None` when all are drawn.
    pub fn next_chunk(&mut self, max_rows: usize) -> Option<(Vec<f32>, Vec<u32>)> {
        let spec = self.spec;
        let rows = max_rows.min(spec.rows - self.next_row);
        if rows == 0 {
            return None;
        }
        let mut features = Vec::with_capacity(rows * spec.features);
        let mut labels = Vec::with_capacity(rows);
        for row in self.next_row..self.next_row + rows {
            // The first `classes` rows name every class once; the rest are uniform.
            let label = if row < spec.classes { row } else { self.rng.below(spec.classes) };
            let cluster = label * Self::CLUSTERS_PER_CLASS + self.rng.below(Self::CLUSTERS_PER_CLASS);
            let centre = &self.centres[cluster * spec.features..(cluster + 1) * spec.features];
            for c in centre {
                features.push(c + self.rng.normal_f32());
            }
            labels.push(label as u32);
        }
        self.next_row += rows;
        Some((features, labels))
    }
}

/// The two sides of [`Dataset::split`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTestSplit {
    /// Samples to train (and fit preprocessing) on.
    pub train: Dataset,
    /// Held-out samples to evaluate on.
    pub test: Dataset,
}

impl Dataset {
    /// Builds a dataset from rows of features and one label per row. Every row must have the same,
    /// non-zero width and only finite values.
    pub fn from_rows(rows: &[Vec<f32>], labels: Vec<u32>) -> Result<Self, DatasetError> {
        let num_features = rows.first().map(Vec::len).ok_or(DatasetError::NoSamples)?;
        if let Some((index, row)) = rows.iter().enumerate().find(|(_, row)| row.len() != num_features) {
            return Err(DatasetError::Shape(format!(
                "row {index} has {} features, row 0 has {num_features}",
                row.len()
            )));
        }
        Self::from_flat(num_features, rows.concat(), labels)
    }

    /// Builds a dataset from row-major features (`labels.len() * num_features` values).
    pub fn from_flat(num_features: usize, features: Vec<f32>, labels: Vec<u32>) -> Result<Self, DatasetError> {
        if labels.is_empty() {
            return Err(DatasetError::NoSamples);
        }
        if num_features == 0 || features.len() != labels.len() * num_features {
            return Err(DatasetError::Shape(format!(
                "{} feature values for {} labels of {num_features} features each",
                features.len(),
                labels.len()
            )));
        }
        if let Some(position) = features.iter().position(|value| !value.is_finite()) {
            return Err(DatasetError::NonFinite {
                sample: position / num_features,
                feature: position % num_features,
                value: features[position],
            });
        }
        Ok(Self { num_features, features, labels })
    }

    /// The digits dataset bundled with smartcore: 1,797 8x8 grey-level images of handwritten
    /// digits (64 features with values 0..=16), labels 0..=9.
    pub fn digits() -> Self {
        let raw = smartcore::dataset::digits::load_dataset();
        let labels = raw.target.iter().map(|&label| label as u32).collect();
        Self::from_flat(raw.num_features, raw.data, labels).expect("the bundled digits dataset is well formed")
    }

    /// A seeded synthetic classification dataset of `spec`'s shape: the same seed gives the same
    /// samples. Each class is a mixture of two Gaussian clusters (unit variance per feature)
    /// whose centres are drawn from the seed, about six standard deviations apart, so the task
    /// is learnable (an MLP reaches well above chance) but not linearly separable by design;
    /// labels are uniform over the classes (every class has at least one sample).
    pub fn synthetic(spec: SyntheticSpec, seed: u64) -> Self {
        let mut rows = SyntheticRows::new(spec, seed);
        let (features, labels) = rows.next_chunk(spec.rows).unwrap_or_default();
        Self { num_features: spec.features, features, labels }
    }

    /// Loads a CSV file with a header line; `label_column` names the class-label column, every
    /// other column is a numeric feature. See [`Dataset::from_csv_str`].
    pub fn from_csv_file(path: &Path, label_column: &str) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| DatasetError::Read { path: path.display().to_string(), reason: err.to_string() })?;
        Self::from_csv_str(&text, label_column)
    }

    /// Parses CSV text: a header line of column names, then one sample per line. Fields are
    /// separated by commas (optionally in double quotes, no embedded commas); blank lines are
    /// skipped. Features must be finite numbers, labels integers `>= 0`.
    pub fn from_csv_str(text: &str, label_column: &str) -> Result<Self, DatasetError> {
        let mut lines = text.lines().enumerate().map(|(index, line)| (index + 1, line));
        let (_, header) = lines.by_ref().find(|(_, line)| !line.trim().is_empty()).ok_or(DatasetError::EmptyCsv)?;
        let columns: Vec<String> = split_fields(header).map(str::to_string).collect();
        let label_positions: Vec<usize> = (0..columns.len()).filter(|&i| columns[i] == label_column).collect();
        let label_index = match label_positions.as_slice() {
            [index] => *index,
            found => {
                return Err(DatasetError::LabelColumn {
                    problem: if found.is_empty() { "no" } else { "more than one" },
                    label_column: label_column.to_string(),
                    columns: columns.join(", "),
                });
            }
        };
        if columns.len() < 2 {
            return Err(DatasetError::NoFeatures(label_column.to_string()));
        }

        let mut features = Vec::new();
        let mut labels = Vec::new();
        for (line_number, line) in lines.filter(|(_, line)| !line.trim().is_empty()) {
            let fields: Vec<&str> = split_fields(line).collect();
            if fields.len() != columns.len() {
                return Err(DatasetError::Ragged { line: line_number, found: fields.len(), expected: columns.len() });
            }
            for (index, field) in fields.iter().enumerate() {
                if index == label_index {
                    let label = field.parse::<u32>().map_err(|_| DatasetError::BadLabel {
                        line: line_number,
                        column: columns[index].clone(),
                        value: field.to_string(),
                    })?;
                    labels.push(label);
                } else {
                    match field.parse::<f32>() {
                        Ok(value) if value.is_finite() => features.push(value),
                        _ => {
                            return Err(DatasetError::NotANumber {
                                line: line_number,
                                column: columns[index].clone(),
                                value: field.to_string(),
                            });
                        }
                    }
                }
            }
        }
        Self::from_flat(columns.len() - 1, features, labels)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Always false: a dataset has at least one sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per sample.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// Number of classes, `max label + 1`.
    pub fn num_classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&max| max as usize + 1)
    }

    /// All features, row-major (`len() * num_features()` values).
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// One label per sample.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The features of sample `index`.
    pub fn row(&self, index: usize) -> &[f32] {
        &self.features[index * self.num_features..(index + 1) * self.num_features]
    }

    /// Rows as owned vectors (the shape JSON payloads use).
    pub fn to_rows(&self) -> Vec<Vec<f32>> {
        self.features.chunks(self.num_features).map(<[f32]>::to_vec).collect()
    }

    /// The samples at `indices`, in that order (indices must be `< len()`).
    pub fn select(&self, indices: &[usize]) -> Self {
        let mut features = Vec::with_capacity(indices.len() * self.num_features);
        for &index in indices {
            features.extend_from_slice(self.row(index));
        }
        let labels = indices.iter().map(|&index| self.labels[index]).collect();
        Self { num_features: self.num_features, features, labels }
    }

    /// Appends the samples of `other` (same feature count), e.g. when gathering batches.
    pub fn extend(&mut self, other: &Dataset) -> Result<(), DatasetError> {
        if other.num_features != self.num_features {
            return Err(DatasetError::Shape(format!(
                "cannot append samples of {} features to a dataset of {} features",
                other.num_features, self.num_features
            )));
        }
        self.features.extend_from_slice(&other.features);
        self.labels.extend_from_slice(&other.labels);
        Ok(())
    }

    /// The dataset's version: the lowercase hex SHA-256 of its shape, features (little-endian
    /// `f32` bits) and labels. Same content, same version; any change, another version.
    pub fn version(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"tandem-dataset-v1");
        hasher.update((self.num_features as u64).to_le_bytes());
        hasher.update((self.labels.len() as u64).to_le_bytes());
        for value in &self.features {
            hasher.update(value.to_le_bytes());
        }
        for label in &self.labels {
            hasher.update(label.to_le_bytes());
        }
        hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Splits into train and test deterministically from `seed`, stratified: each class puts
    /// `round(count * test_fraction)` of its samples (chosen by the seeded shuffle) into test.
    /// Both sides keep the original sample order.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<TrainTestSplit, DatasetError> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(DatasetError::BadTestFraction(test_fraction));
        }
        let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (index, &label) in self.labels.iter().enumerate() {
            by_class.entry(label).or_default().push(index);
        }
        let mut rng = SeededRng::new(seed);
        let mut test = Vec::new();
        let mut train = Vec::new();
        for (_, mut indices) in by_class {
            rng.shuffle(&mut indices);
            let take = (indices.len() as f64 * test_fraction).round() as usize;
            test.extend_from_slice(&indices[..take]);
            train.extend_from_slice(&indices[take..]);
        }
        if train.is_empty() || test.is_empty() {
            return Err(DatasetError::BadTestFraction(test_fraction));
        }
        train.sort_unstable();
        test.sort_unstable();
        Ok(TrainTestSplit { train: self.select(&train), test: self.select(&test) })
    }
}

/// Splits one CSV line into trimmed fields, dropping one pair of surrounding double quotes.
fn split_fields(line: &str) -> impl Iterator<Item = &str> {
    line.split(',').map(|field| {
        let field = field.trim();
        field.strip_prefix('"').and_then(|f| f.strip_suffix('"')).unwrap_or(field)
    })
}

#[cfg(test)]
mod tests {
    use crate::{TrainingConfig, parse_device, train};

    #[test]
    fn synthetic_specs_parse_and_bad_ones_name_the_problem() {
        assert_eq!(SyntheticSpec::parse("digits").unwrap(), None);
        let spec = SyntheticSpec::parse("synthetic:1000:64:10").unwrap().unwrap();
        assert_eq!(spec, SyntheticSpec { rows: 1000, features: 64, classes: 10 });
        assert_eq!(spec.to_string(), "synthetic:1000:64:10");
        for (text, reason) in [
            ("synthetic:10:4", "2 numbers given, 3 needed"),
            ("synthetic:ten:4:2", "ROWS 'ten' is not a whole number"),
            ("synthetic:10:0:2", "FEATURES is 0, it must be at least 1"),
            ("synthetic:10:4:1", "CLASSES is 1, it must be at least 2"),
            ("synthetic:3:4:5", "3 rows cannot hold 5 classes"),
        ] {
            let err = SyntheticSpec::parse(text).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "synthetic dataset '{text}': {reason} (expected synthetic:ROWS:FEATURES:CLASSES, e.g. synthetic:60000:64:10)"
                )
            );
        }
    }

    #[test]
    fn synthetic_data_is_seeded_covers_every_class_and_is_learnable() {
        let spec = SyntheticSpec { rows: 3000, features: 16, classes: 4 };
        let data = Dataset::synthetic(spec, 1);
        assert_eq!((data.len(), data.num_features(), data.num_classes()), (3000, 16, 4));
        assert_eq!(data, Dataset::synthetic(spec, 1));
        assert_ne!(data.version(), Dataset::synthetic(spec, 2).version());
        let tiny = Dataset::synthetic(SyntheticSpec { rows: 5, features: 2, classes: 5 }, 3);
        assert_eq!(tiny.labels(), &[0, 1, 2, 3, 4]);

        let device = parse_device("cpu").unwrap();
        let split = data.split(0.2, 1).unwrap();
        let config = TrainingConfig { epochs: 5, hidden: vec![32], ..TrainingConfig::default() };
        let model = train(&split.train, &config, &device, |_| {}).unwrap();
        let accuracy = model.evaluate(&split.test).unwrap().accuracy;
        assert!(accuracy > 0.9, "test accuracy {accuracy} on 4 classes (chance: 0.25)");
    }
    use super::*;

    #[test]
    fn digits_has_1797_samples_of_64_features_in_10_classes() {
        let digits = Dataset::digits();
        assert_eq!(digits.len(), 1797);
        assert_eq!(digits.num_features(), 64);
        assert_eq!(digits.num_classes(), 10);
        assert!(digits.features().iter().all(|&v| (0.0..=16.0).contains(&v)));
    }

    #[test]
    fn csv_loads_features_and_named_label_column() {
        let data = Dataset::from_csv_str("a, label ,b\n1,2,3\n\n\"4.5\",0,-6e1\n", "label").unwrap();
        assert_eq!(data.num_features(), 2);
        assert_eq!(data.to_rows(), vec![vec![1.0, 3.0], vec![4.5, -60.0]]);
        assert_eq!(data.labels(), &[2, 0]);
        assert_eq!(data.num_classes(), 3);
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let cases = [
            ("", "label", "CSV is empty: expected a header line with the column names"),
            ("a,b,class\n1,2,0\n", "label", "line 1: no label column 'label' in the CSV header (columns: a, b, class)"),
            (
                "a,label,label\n1,2,0\n",
                "label",
                "line 1: more than one label column 'label' in the CSV header (columns: a, label, label)",
            ),
            ("label\n1\n", "label", "CSV has no feature columns besides the label column 'label'"),
            ("a,b,label\n1,2,0\n1,2\n", "label", "line 3: 2 fields, but the header has 3 columns"),
            ("a,b,label\n1,2,0\n\n1,2,0,9\n", "label", "line 4: 4 fields, but the header has 3 columns"),
            ("a,b,label\n1,x7,0\n", "label", "line 2, column 'b': 'x7' is not a finite number"),
            ("a,b,label\n1,,0\n", "label", "line 2, column 'b': '' is not a finite number"),
            ("a,b,label\nNaN,1,0\n", "label", "line 2, column 'a': 'NaN' is not a finite number"),
            ("a,b,label\n1,inf,0\n", "label", "line 2, column 'b': 'inf' is not a finite number"),
            (
                "a,b,label\n1,2,0\n1,2,cat\n",
                "label",
                "line 3, column 'label': label 'cat' is not a class index (an integer >= 0)",
            ),
            (
                "a,b,label\n1,2,-1\n",
                "label",
                "line 2, column 'label': label '-1' is not a class index (an integer >= 0)",
            ),
            ("a,b,label\n", "label", "dataset has no samples"),
        ];
        for (text, label, expected) in cases {
            let err = Dataset::from_csv_str(text, label).unwrap_err();
            assert_eq!(err.to_string(), expected, "for CSV {text:?}");
        }
    }

    #[test]
    fn missing_csv_file_names_the_path() {
        let err = Dataset::from_csv_file(Path::new("/nonexistent/data.csv"), "label").unwrap_err();
        assert!(err.to_string().starts_with("cannot read CSV file /nonexistent/data.csv:"), "{err}");
    }

    #[test]
    fn from_rows_refuses_ragged_rows_and_non_finite_values() {
        let err = Dataset::from_rows(&[vec![1.0, 2.0], vec![3.0]], vec![0, 1]).unwrap_err();
        assert_eq!(err.to_string(), "inconsistent data: row 1 has 1 features, row 0 has 2");
        let err = Dataset::from_rows(&[vec![1.0, f32::NAN]], vec![0]).unwrap_err();
        assert_eq!(err.to_string(), "sample 0, feature 1: NaN is not a finite number");
        let err = Dataset::from_rows(&[vec![1.0]], vec![0, 1]).unwrap_err();
        assert!(err.to_string().starts_with("inconsistent data"), "{err}");
    }

    #[test]
    fn split_is_deterministic_stratified_and_disjoint() {
        let digits = Dataset::digits();
        let a = digits.split(0.2, 42).unwrap();
        let b = digits.split(0.2, 42).unwrap();
        let c = digits.split(0.2, 43).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.test, c.test);
        assert_eq!(a.train.len() + a.test.len(), digits.len());
        assert!((355..=365).contains(&a.test.len()), "test size {}", a.test.len());
        // Stratified: every class on both sides in about the right proportion.
        for class in 0..10u32 {
            let in_test = a.test.labels().iter().filter(|&&l| l == class).count();
            let in_all = digits.labels().iter().filter(|&&l| l == class).count();
            assert_eq!(in_test, (in_all as f64 * 0.2).round() as usize);
        }
        // Disjoint and complete: the two sides together are the dataset's rows.
        let mut rows: Vec<Vec<u32>> = a
            .train
            .to_rows()
            .into_iter()
            .chain(a.test.to_rows())
            .map(|r| r.iter().map(|v| v.to_bits()).collect())
            .collect();
        let mut all: Vec<Vec<u32>> =
            digits.to_rows().into_iter().map(|r| r.iter().map(|v| v.to_bits()).collect()).collect();
        rows.sort();
        all.sort();
        assert_eq!(rows, all);
    }

    #[test]
    fn split_refuses_fractions_that_empty_a_side() {
        let digits = Dataset::digits();
        for fraction in [0.0, 1.0, -0.5, f64::NAN] {
            assert!(matches!(digits.split(fraction, 1), Err(DatasetError::BadTestFraction(_))));
        }
        let tiny = Dataset::from_rows(&[vec![1.0], vec![2.0]], vec![0, 1]).unwrap();
        assert!(tiny.split(0.2, 1).is_err());
    }

    #[test]
    fn version_is_a_content_hash() {
        let digits = Dataset::digits();
        let version = digits.version();
        assert_eq!(version.len(), 64);
        assert_eq!(version, Dataset::digits().version());
        let split = digits.split(0.2, 1).unwrap();
        assert_ne!(split.train.version(), version);
        let mut changed = digits.clone();
        changed.labels[0] = (changed.labels[0] + 1) % 10;
        assert_ne!(changed.version(), version);
    }
}
