//! Standardization: per-feature `(x - mean) / std`, fitted on training data with burn tensors.
//!
//! [`Standardizer::fit`] fits in one go. When the training samples arrive in batches, possibly
//! at several workers, each batch's [`FeatureMoments`] can be computed where it is and merged;
//! [`Standardizer::from_moments`] then gives the same scaler as fitting all samples at once
//! (up to float rounding). Constant features get `std = 1`, so they map to 0, never NaN.

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::model::ModelError;

/// Per-feature mean and standard deviation (population std, like scikit-learn's StandardScaler).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    /// Mean of each feature over the fitted samples.
    pub mean: Vec<f32>,
    /// Standard deviation of each feature; 1 for (near-)constant features.
    pub std: Vec<f32>,
}

/// Count, sum and sum of squares per feature: what a standardizer is fitted from, mergeable
/// across batches. Sums are `f64` so that merging many batches loses no precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureMoments {
    /// Samples seen.
    pub count: u64,
    /// Per-feature sum.
    pub sum: Vec<f64>,
    /// Per-feature sum of squares.
    pub sum_squares: Vec<f64>,
}

impl FeatureMoments {
    /// Moments of no samples with `num_features` features (the identity of [`merge`](Self::merge)).
    pub fn empty(num_features: usize) -> Self {
        Self { count: 0, sum: vec![0.0; num_features], sum_squares: vec![0.0; num_features] }
    }

    /// Moments of the samples in `data`, computed with burn tensors on `device`.
    pub fn of(data: &Dataset, device: &Device) -> Self {
        let x = features_tensor(data.features(), data.num_features(), device);
        let sum = x.clone().sum_dim(0);
        let sum_squares = (x.clone() * x).sum_dim(0);
        Self { count: data.len() as u64, sum: to_f64(sum), sum_squares: to_f64(sum_squares) }
    }

    /// Adds `other`'s samples to these moments.
    pub fn merge(&mut self, other: &FeatureMoments) -> Result<(), ModelError> {
        if other.sum.len() != self.sum.len() {
            return Err(ModelError::FeatureCount { sample: 0, expected: self.sum.len(), found: other.sum.len() });
        }
        self.count += other.count;
        for (mine, theirs) in self.sum.iter_mut().zip(&other.sum) {
            *mine += theirs;
        }
        for (mine, theirs) in self.sum_squares.iter_mut().zip(&other.sum_squares) {
            *mine += theirs;
        }
        Ok(())
    }
}

impl Standardizer {
    /// Fits mean and std of every feature of `data` (the training split) on `device`.
    pub fn fit(data: &Dataset, device: &Device) -> Self {
        let x = features_tensor(data.features(), data.num_features(), device);
        let mean = x.clone().mean_dim(0);
        let variance = x.var_bias(0);
        let mean = to_f32(mean);
        let std =
            to_f32(variance).into_iter().zip(&mean).map(|(var, &mean)| usable_std(var.max(0.0).sqrt(), mean)).collect();
        Self { mean, std }
    }

    /// The standardizer of the samples the moments were taken from.
    pub fn from_moments(moments: &FeatureMoments) -> Result<Self, ModelError> {
        if moments.count == 0 {
            return Err(ModelError::NoSamples);
        }
        let count = moments.count as f64;
        let mut mean = Vec::with_capacity(moments.sum.len());
        let mut std = Vec::with_capacity(moments.sum.len());
        for (&sum, &sum_squares) in moments.sum.iter().zip(&moments.sum_squares) {
            let feature_mean = sum / count;
            let variance = (sum_squares / count - feature_mean * feature_mean).max(0.0);
            mean.push(feature_mean as f32);
            std.push(usable_std(variance.sqrt() as f32, feature_mean as f32));
        }
        Ok(Self { mean, std })
    }

    /// Number of features it was fitted on.
    pub fn num_features(&self) -> usize {
        self.mean.len()
    }

    /// Standardizes a `[batch, num_features]` tensor on its own device.
    pub fn transform_tensor(&self, x: Tensor<2>) -> Tensor<2> {
        let device = x.device();
        let width = self.mean.len();
        let mean = Tensor::<2>::from_data(TensorData::new(self.mean.clone(), [1, width]), &device);
        let std = Tensor::<2>::from_data(TensorData::new(self.std.clone(), [1, width]), &device);
        (x - mean) / std
    }

    /// Standardizes the features of `data` (labels unchanged).
    pub fn transform(&self, data: &Dataset, device: &Device) -> Result<Dataset, ModelError> {
        if data.num_features() != self.num_features() {
            return Err(ModelError::FeatureCount {
                sample: 0,
                expected: self.num_features(),
                found: data.num_features(),
            });
        }
        let x = self.transform_tensor(features_tensor(data.features(), data.num_features(), device));
        Dataset::from_flat(data.num_features(), to_f32(x), data.labels().to_vec())
            .map_err(|err| ModelError::Backend(format!("standardized data: {err}")))
    }

    /// Standardizes rows of raw features (e.g. a predict request); every row needs
    /// `num_features()` finite values.
    pub fn transform_rows<R: AsRef<[f32]>>(&self, rows: &[R], device: &Device) -> Result<Vec<Vec<f32>>, ModelError> {
        let expected = self.num_features();
        let flat = crate::model::flatten_samples(rows, expected)?;
        let x = self.transform_tensor(features_tensor(&flat, expected, device));
        Ok(to_f32(x).chunks(expected).map(<[f32]>::to_vec).collect())
    }
}

/// A std usable as a divisor: a feature whose spread is zero or below f32 resolution at its
/// mean is constant, and dividing by 1 maps it to 0 instead of NaN or a huge value.
fn usable_std(std: f32, mean: f32) -> f32 {
    if std.is_finite() && std > f32::EPSILON * mean.abs().max(f32::MIN_POSITIVE) * 4.0 && std > 0.0 { std } else { 1.0 }
}

fn features_tensor(features: &[f32], num_features: usize, device: &Device) -> Tensor<2> {
    let rows = features.len() / num_features.max(1);
    Tensor::<2>::from_data(TensorData::new(features.to_vec(), [rows, num_features]), device)
}

fn to_f32<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().try_into_vec::<f32>().expect("float tensors read back as f32")
}

fn to_f64<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    to_f32(tensor).into_iter().map(f64::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Device {
        crate::parse_device("cpu").unwrap()
    }

    #[test]
    fn fit_gives_mean_and_population_std_and_constant_features_map_to_zero() {
        let data = Dataset::from_rows(&[vec![1.0, 5.0, 0.0], vec![3.0, 5.0, 0.0], vec![5.0, 5.0, 0.0]], vec![0, 1, 0])
            .unwrap();
        let scaler = Standardizer::fit(&data, &cpu());
        assert_eq!(scaler.mean, vec![3.0, 5.0, 0.0]);
        let expected_std = (8.0f32 / 3.0).sqrt();
        assert!((scaler.std[0] - expected_std).abs() < 1e-6, "{:?}", scaler.std);
        assert_eq!(&scaler.std[1..], &[1.0, 1.0]);

        let out = scaler.transform(&data, &cpu()).unwrap();
        assert!(out.features().iter().all(|v| v.is_finite()));
        assert_eq!(out.labels(), data.labels());
        let rows = out.to_rows();
        assert!((rows[0][0] + 3.0f32.sqrt() / 2.0f32.sqrt()).abs() < 1e-5, "{rows:?}");
        assert_eq!(rows[1], vec![0.0, 0.0, 0.0]);
        assert_eq!(rows[2][1..], [0.0, 0.0]);
    }

    #[test]
    fn standardized_training_data_has_zero_mean_unit_std() {
        let train = Dataset::digits().split(0.2, 3).unwrap().train;
        let scaler = Standardizer::fit(&train, &cpu());
        let out = scaler.transform(&train, &cpu()).unwrap();
        let refit = Standardizer::fit(&out, &cpu());
        for (feature, (&mean, &std)) in refit.mean.iter().zip(&refit.std).enumerate() {
            assert!(mean.abs() < 1e-4, "feature {feature}: mean {mean}");
            assert!((std - 1.0).abs() < 1e-3, "feature {feature}: std {std}");
        }
    }

    #[test]
    fn merged_batch_moments_give_the_same_scaler_as_one_fit() {
        let train = Dataset::digits().split(0.2, 3).unwrap().train;
        let whole = Standardizer::fit(&train, &cpu());
        let mut moments = FeatureMoments::empty(train.num_features());
        let indices: Vec<usize> = (0..train.len()).collect();
        for chunk in indices.chunks(100) {
            moments.merge(&FeatureMoments::of(&train.select(chunk), &cpu())).unwrap();
        }
        let merged = Standardizer::from_moments(&moments).unwrap();
        for feature in 0..train.num_features() {
            assert!((whole.mean[feature] - merged.mean[feature]).abs() < 1e-4);
            assert!((whole.std[feature] - merged.std[feature]).abs() < 1e-3, "feature {feature}");
        }
        assert!(FeatureMoments::empty(3).merge(&FeatureMoments::empty(4)).is_err());
        assert_eq!(Standardizer::from_moments(&FeatureMoments::empty(3)), Err(ModelError::NoSamples));
    }

    #[test]
    fn transform_rows_checks_width_and_finiteness() {
        let scaler = Standardizer { mean: vec![1.0, 2.0], std: vec![2.0, 1.0] };
        assert_eq!(scaler.transform_rows(&[vec![3.0, 2.0]], &cpu()).unwrap(), vec![vec![1.0, 0.0]]);
        let err = scaler.transform_rows(&[vec![1.0, 2.0], vec![1.0]], &cpu()).unwrap_err();
        assert_eq!(err.to_string(), "sample 1 has 1 features, the model takes 2");
        let err = scaler.transform_rows(&[vec![1.0, f32::INFINITY]], &cpu()).unwrap_err();
        assert_eq!(err.to_string(), "sample 0, feature 1: inf is not a finite number");
        assert_eq!(scaler.transform_rows::<Vec<f32>>(&[], &cpu()), Err(ModelError::NoSamples));
    }
}
