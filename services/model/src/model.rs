//! The MLP classifier: architecture ([`MlpConfig`]), seeded initialisation, prediction,
//! evaluation and weights to and from bytes.
//!
//! The network is `Linear -> ReLU` per hidden layer, then a `Linear` to one logit per class;
//! probabilities are the softmax of the logits. Weights serialise as a burn `ModuleRecord`
//! (burnpack bytes); loading them checks every tensor against the architecture.

use burn::module::{Module, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, Relu};
use burn::optim::GradientsParams;
use burn::store::ModuleRecord;
use burn::tensor::activation::softmax;
use burn::tensor::{Bytes, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::rng::SeededRng;

/// Samples [`Classifier::evaluate`] runs through the model at once.
pub const EVALUATION_CHUNK: usize = 8192;

/// Why a model could not be built, loaded or applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A sample has a different number of features than the model takes.
    #[error("sample {sample} has {found} features, the model takes {expected}")]
    FeatureCount {
        /// 0-based sample index in the request.
        sample: usize,
        /// Features the model takes.
        expected: usize,
        /// Features given.
        found: usize,
    },
    /// A feature value is NaN or infinite.
    #[error("sample {sample}, feature {feature}: {value} is not a finite number")]
    NonFinite {
        /// 0-based sample index in the request.
        sample: usize,
        /// 0-based feature index.
        feature: usize,
        /// The value.
        value: f32,
    },
    /// No samples were given.
    #[error("no samples given")]
    NoSamples,
    /// A label is outside the model's classes.
    #[error("sample {sample} has label {label}, but the model has only {num_classes} classes")]
    LabelOutOfRange {
        /// 0-based sample index.
        sample: usize,
        /// The label.
        label: u32,
        /// Classes of the model.
        num_classes: usize,
    },
    /// The architecture or training configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The bytes are not a weights record at all.
    #[error("weights bytes are not a burn record: {0}")]
    NotARecord(String),
    /// The bytes are a weights record for another architecture.
    #[error("weights do not match the architecture {architecture}: {reason}")]
    ArchitectureMismatch {
        /// The expected architecture, e.g. `64-128-10`.
        architecture: String,
        /// burn's validation message.
        reason: String,
    },
    /// burn failed to serialise or read back a tensor.
    #[error("tensor backend error: {0}")]
    Backend(String),
}

/// The classifier's architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Features per sample (inputs).
    pub num_features: usize,
    /// Width of each hidden layer, input side first.
    pub hidden: Vec<usize>,
    /// Number of classes (outputs).
    pub num_classes: usize,
}

impl MlpConfig {
    /// The layer widths joined by dashes, e.g. `64-128-10`.
    pub fn architecture(&self) -> String {
        self.widths().iter().map(usize::to_string).collect::<Vec<_>>().join("-")
    }

    /// Weights and biases in all: the length of the flat parameter buffer (see
    /// [`crate::data_parallel`]: per layer, its `[fan_in, fan_out]` weight row-major, then its bias).
    pub fn parameter_count(&self) -> usize {
        self.widths().windows(2).map(|pair| pair[0] * pair[1] + pair[1]).sum()
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths = vec![self.num_features];
        widths.extend_from_slice(&self.hidden);
        widths.push(self.num_classes);
        widths
    }

    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        if self.widths().contains(&0) {
            return Err(ModelError::Config(format!("every layer needs a width > 0, got {}", self.architecture())));
        }
        if self.num_classes < 2 {
            return Err(ModelError::Config(format!("a classifier needs >= 2 classes, got {}", self.num_classes)));
        }
        Ok(())
    }
}

/// The burn module: hidden `Linear` layers with ReLU, then the output layer.
#[derive(Module, Debug)]
pub(crate) struct Mlp {
    layers: Vec<Linear>,
    activation: Relu,
}

impl Mlp {
    /// Initialises weights and biases from `U(-k, k)`, `k = 1/sqrt(fan_in)` (PyTorch's default for
    /// `nn.Linear`), drawn from `rng`. Parameter ids are fixed (their position) so that the
    /// weights bytes depend only on the values.
    pub(crate) fn init(config: &MlpConfig, rng: &mut SeededRng, device: &Device) -> Self {
        Self::from_flat(config, &initial_parameters(config, rng), device)
    }

    /// The module holding `values` (the flat layout of [`MlpConfig::parameter_count`]), with the
    /// fixed parameter ids of [`Mlp::init`], ready to train on `device`.
    pub(crate) fn from_flat(config: &MlpConfig, values: &[f32], device: &Device) -> Self {
        assert_eq!(values.len(), config.parameter_count(), "flat parameters of the wrong length");
        let mut offset = 0;
        let mut take = |len: usize| {
            let slice = &values[offset..offset + len];
            offset += len;
            slice.to_vec()
        };
        let layers = config
            .widths()
            .windows(2)
            .enumerate()
            .map(|(index, pair)| {
                let (fan_in, fan_out) = (pair[0], pair[1]);
                let weight = Tensor::<2>::from_data(TensorData::new(take(fan_in * fan_out), [fan_in, fan_out]), device);
                let bias = Tensor::<1>::from_data(TensorData::new(take(fan_out), [fan_out]), device);
                Linear {
                    weight: Param::initialized(ParamId::from(2 * index as u64), weight).set_require_grad(true),
                    bias: Some(Param::initialized(ParamId::from(2 * index as u64 + 1), bias).set_require_grad(true)),
                }
            })
            .collect();
        Self { layers, activation: Relu::new() }
    }

    /// Every weight and bias in the flat layout of [`Mlp::from_flat`].
    pub(crate) fn to_flat(&self) -> Result<Vec<f32>, ModelError> {
        let mut values = Vec::new();
        for layer in &self.layers {
            values.extend(tensor_values(layer.weight.val())?);
            if let Some(bias) = &layer.bias {
                values.extend(tensor_values(bias.val())?);
            }
        }
        Ok(values)
    }

    /// The gradient of every parameter in the flat layout of [`Mlp::from_flat`] (zeros for a
    /// parameter the loss does not depend on).
    pub(crate) fn flat_gradients(&self, grads: &mut GradientsParams) -> Result<Vec<f32>, ModelError> {
        let mut values = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            let [fan_in, fan_out] = layer.weight.val().dims();
            match grads.remove::<2>(ParamId::from(2 * index as u64)) {
                Some(grad) => values.extend(tensor_values(grad)?),
                None => values.resize(values.len() + fan_in * fan_out, 0.0),
            }
            match grads.remove::<1>(ParamId::from(2 * index as u64 + 1)) {
                Some(grad) => values.extend(tensor_values(grad)?),
                None => values.resize(values.len() + fan_out, 0.0),
            }
        }
        Ok(values)
    }

    /// Logits `[batch, num_classes]` for inputs `[batch, num_features]`.
    pub(crate) fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut x = input;
        for (index, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if index < last {
                x = self.activation.forward(x);
            }
        }
        x
    }
}

/// Seeded initial parameters in the flat layout of [`Mlp::from_flat`]: every weight and bias of a
/// layer from `U(-k, k)`, `k = 1/sqrt(fan_in)` (PyTorch's default for `nn.Linear`).
pub(crate) fn initial_parameters(config: &MlpConfig, rng: &mut SeededRng) -> Vec<f32> {
    let mut values = Vec::with_capacity(config.parameter_count());
    for pair in config.widths().windows(2) {
        let (fan_in, fan_out) = (pair[0], pair[1]);
        let bound = 1.0 / (fan_in as f32).sqrt();
        values.extend((0..fan_in * fan_out + fan_out).map(|_| rng.uniform_f32(-bound, bound)));
    }
    values
}

/// One prediction: the most probable class and the probability of every class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The class with the highest probability.
    pub class: u32,
    /// Softmax probabilities, one per class (they sum to 1).
    pub probabilities: Vec<f32>,
}

/// Accuracy and mean cross-entropy loss on a labelled dataset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Fraction of samples whose predicted class is the label, in `[0, 1]`.
    pub accuracy: f32,
    /// Mean cross-entropy loss.
    pub loss: f32,
    /// Samples evaluated.
    pub samples: usize,
}

/// A trained (or freshly initialised) MLP classifier on a device, ready to predict.
#[derive(Debug, Clone)]
pub struct Classifier {
    config: MlpConfig,
    model: Mlp,
    device: Device,
}

impl Classifier {
    /// A classifier with seeded random weights (what [`crate::train()`] starts from).
    pub fn new(config: &MlpConfig, seed: u64, device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        let model = Mlp::init(config, &mut SeededRng::new(seed), device);
        Ok(Self { config: config.clone(), model, device: device.clone() })
    }

    /// A classifier holding `values`, flat parameters of `config` (see [`crate::data_parallel`]).
    pub fn from_parameters(config: &MlpConfig, values: &[f32], device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        if values.len() != config.parameter_count() {
            return Err(ModelError::ArchitectureMismatch {
                architecture: config.architecture(),
                reason: format!("{} parameters given, it has {}", values.len(), config.parameter_count()),
            });
        }
        Ok(Self { config: config.clone(), model: Mlp::from_flat(config, values, device), device: device.clone() })
    }

    /// Every weight and bias, flat (see [`crate::data_parallel`]).
    pub fn parameters(&self) -> Result<Vec<f32>, ModelError> {
        self.model.to_flat()
    }

    /// The architecture.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights as bytes (a burn record in the burnpack format). Same weights, same bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let bytes =
            self.model.clone().into_record().into_bytes().map_err(|err| ModelError::Backend(err.to_string()))?;
        Ok(bytes.to_vec())
    }

    /// Loads weights written by [`Classifier::to_bytes`] into a classifier of architecture
    /// `config` on `device`. Bytes of another architecture or not a record at all are refused.
    pub fn from_bytes(config: &MlpConfig, bytes: &[u8], device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
            .map_err(|err| ModelError::NotARecord(err.to_string()))?;
        let model = Mlp::init(config, &mut SeededRng::new(0), device).try_load_record(record).map_err(|err| {
            ModelError::ArchitectureMismatch { architecture: config.architecture(), reason: err.to_string() }
        })?;
        Ok(Self { config: config.clone(), model, device: device.clone() })
    }

    /// Predicts one sample.
    pub fn predict_one(&self, features: &[f32]) -> Result<Prediction, ModelError> {
        let mut predictions = self.predict(&[features])?;
        Ok(predictions.remove(0))
    }

    /// Predicts many samples in one forward pass (what a dynamic batch does).
    pub fn predict<R: AsRef<[f32]>>(&self, samples: &[R]) -> Result<Vec<Prediction>, ModelError> {
        let input = self.input_tensor(samples)?;
        let probabilities = softmax(self.model.forward(input), 1);
        let values = tensor_values(probabilities)?;
        Ok(values
            .chunks(self.config.num_classes)
            .map(|probabilities| Prediction { class: argmax(probabilities), probabilities: probabilities.to_vec() })
            .collect())
    }

    /// Accuracy and mean loss on `data` (its labels must be `< num_classes`), evaluated
    /// [`EVALUATION_CHUNK`] samples at a time.
    pub fn evaluate(&self, data: &Dataset) -> Result<Evaluation, ModelError> {
        let num_classes = self.config.num_classes;
        if let Some((sample, &label)) = data.labels().iter().enumerate().find(|&(_, &l)| l as usize >= num_classes) {
            return Err(ModelError::LabelOutOfRange { sample, label, num_classes });
        }
        if data.num_features() != self.config.num_features {
            return Err(ModelError::FeatureCount {
                sample: 0,
                expected: self.config.num_features,
                found: data.num_features(),
            });
        }
        // A chunk at a time: the whole set at once would hold a copy of it and every layer's
        // activations for all of its samples (close to a gigabyte for a million rows).
        let width = data.num_features();
        let loss_function = CrossEntropyLossConfig::new().init(&self.device);
        let (mut correct, mut loss_sum) = (0usize, 0f64);
        for (features, labels) in
            data.features().chunks(EVALUATION_CHUNK * width).zip(data.labels().chunks(EVALUATION_CHUNK))
        {
            let input = Tensor::<2>::from_data(TensorData::new(features.to_vec(), [labels.len(), width]), &self.device);
            let targets = labels_tensor(labels, &self.device);
            let logits = self.model.forward(input);
            let loss = loss_function.forward(logits.clone(), targets.clone());
            loss_sum += f64::from(scalar(loss)?) * labels.len() as f64;
            correct += count_correct(logits, targets)?;
        }
        let samples = data.len();
        Ok(Evaluation { accuracy: correct as f32 / samples as f32, loss: (loss_sum / samples as f64) as f32, samples })
    }

    fn input_tensor<R: AsRef<[f32]>>(&self, samples: &[R]) -> Result<Tensor<2>, ModelError> {
        let expected = self.config.num_features;
        let flat = flatten_samples(samples, expected)?;
        Ok(Tensor::<2>::from_data(TensorData::new(flat, [samples.len(), expected]), &self.device))
    }
}

/// Class labels as a burn `Int` tensor `[n]`.
pub(crate) fn labels_tensor(labels: &[u32], device: &Device) -> Tensor<1, Int> {
    let labels: Vec<i64> = labels.iter().map(|&label| i64::from(label)).collect();
    let len = labels.len();
    Tensor::<1, Int>::from_data(TensorData::new(labels, [len]), device)
}

/// How many rows of `logits` have their maximum at the target class.
pub(crate) fn count_correct(logits: Tensor<2>, targets: Tensor<1, Int>) -> Result<usize, ModelError> {
    let [rows, _] = logits.dims();
    let predicted = logits.argmax(1).reshape([rows]);
    let correct = predicted.equal(targets).int().sum();
    let correct: i64 = correct.try_into_scalar().map_err(|err| ModelError::Backend(format!("{err:?}")))?;
    Ok(correct as usize)
}

/// The single value of a one-element float tensor.
pub(crate) fn scalar(tensor: Tensor<1>) -> Result<f32, ModelError> {
    tensor.try_into_scalar().map_err(|err| ModelError::Backend(format!("{err:?}")))
}

fn tensor_values<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>, ModelError> {
    let data = tensor.try_into_data().map_err(|err| ModelError::Backend(format!("{err:?}")))?;
    data.try_into_vec::<f32>().map_err(|err| ModelError::Backend(format!("{err:?}")))
}

/// Index of the largest value (the first one on ties).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (index, value) in values.iter().enumerate() {
        if *value > values[best] {
            best = index;
        }
    }
    best as u32
}

/// `samples` as one row-major buffer, once each is checked: at least one sample, `expected`
/// values each, all finite (errors name the sample and feature).
pub(crate) fn flatten_samples<R: AsRef<[f32]>>(samples: &[R], expected: usize) -> Result<Vec<f32>, ModelError> {
    if samples.is_empty() {
        return Err(ModelError::NoSamples);
    }
    let mut flat = Vec::with_capacity(samples.len() * expected);
    for (sample, row) in samples.iter().enumerate() {
        let row = row.as_ref();
        if row.len() != expected {
            return Err(ModelError::FeatureCount { sample, expected, found: row.len() });
        }
        if let Some(feature) = row.iter().position(|value| !value.is_finite()) {
            return Err(ModelError::NonFinite { sample, feature, value: row[feature] });
        }
        flat.extend_from_slice(row);
    }
    Ok(flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Device {
        crate::parse_device("cpu").unwrap()
    }

    fn config(hidden: Vec<usize>) -> MlpConfig {
        MlpConfig { num_features: 4, hidden, num_classes: 3 }
    }

    #[test]
    fn classifier_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Classifier>();
    }

    #[test]
    fn same_seed_same_weights_bytes_and_bytes_round_trip() {
        let a = Classifier::new(&config(vec![8]), 5, &cpu()).unwrap();
        let b = Classifier::new(&config(vec![8]), 5, &cpu()).unwrap();
        let c = Classifier::new(&config(vec![8]), 6, &cpu()).unwrap();
        let bytes = a.to_bytes().unwrap();
        assert_eq!(bytes, b.to_bytes().unwrap());
        assert_ne!(bytes, c.to_bytes().unwrap());

        let loaded = Classifier::from_bytes(&config(vec![8]), &bytes, &cpu()).unwrap();
        assert_eq!(loaded.to_bytes().unwrap(), bytes);
        let samples = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]];
        assert_eq!(loaded.predict(&samples).unwrap(), a.predict(&samples).unwrap());
    }

    #[test]
    fn bytes_of_another_architecture_or_garbage_are_refused() {
        let bytes = Classifier::new(&config(vec![8]), 1, &cpu()).unwrap().to_bytes().unwrap();
        let err = Classifier::from_bytes(&config(vec![16]), &bytes, &cpu()).unwrap_err();
        assert!(matches!(err, ModelError::ArchitectureMismatch { .. }), "{err:?}");
        assert!(err.to_string().starts_with("weights do not match the architecture 4-16-3: "), "{err}");
        let err = Classifier::from_bytes(&config(vec![8, 8]), &bytes, &cpu()).unwrap_err();
        assert!(err.to_string().starts_with("weights do not match the architecture 4-8-8-3: "), "{err}");
        let err = Classifier::from_bytes(&config(vec![8]), b"not weights", &cpu()).unwrap_err();
        assert!(matches!(err, ModelError::NotARecord(_)), "{err:?}");
        assert!(err.to_string().starts_with("weights bytes are not a burn record: "), "{err}");
    }

    #[test]
    fn predict_gives_probabilities_and_refuses_bad_samples() {
        let classifier = Classifier::new(&config(vec![8]), 1, &cpu()).unwrap();
        let one = classifier.predict_one(&[0.1, 0.2, 0.3, 0.4]).unwrap();
        assert_eq!(one.probabilities.len(), 3);
        assert!((one.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(one.class, argmax(&one.probabilities));

        let err = classifier.predict(&[vec![0.0; 4], vec![0.0; 5]]).unwrap_err();
        assert_eq!(err.to_string(), "sample 1 has 5 features, the model takes 4");
        let err = classifier.predict_one(&[0.0, f32::NAN, 0.0, 0.0]).unwrap_err();
        assert_eq!(err.to_string(), "sample 0, feature 1: NaN is not a finite number");
        assert_eq!(classifier.predict::<Vec<f32>>(&[]), Err(ModelError::NoSamples));
    }

    #[test]
    fn evaluate_refuses_labels_outside_the_classes() {
        let classifier = Classifier::new(&config(vec![8]), 1, &cpu()).unwrap();
        let data = Dataset::from_rows(&[vec![0.0; 4], vec![1.0; 4]], vec![0, 3]).unwrap();
        let err = classifier.evaluate(&data).unwrap_err();
        assert_eq!(err.to_string(), "sample 1 has label 3, but the model has only 3 classes");
    }

    #[test]
    fn evaluating_in_chunks_counts_every_sample_once() {
        let classifier = Classifier::new(&config(vec![8]), 1, &cpu()).unwrap();
        // More than two chunks and a partial one: labels are what the model predicts for the
        // first 10,000 samples and something else after, so the accuracy says which were seen.
        let rows: Vec<Vec<f32>> = (0..2 * EVALUATION_CHUNK + 100)
            .map(|i| (0..4).map(|j| ((i * 7 + j * 3) % 11) as f32 / 11.0).collect())
            .collect();
        let predicted: Vec<u32> = classifier.predict(&rows).unwrap().iter().map(|p| p.class as u32).collect();
        let labels: Vec<u32> =
            predicted.iter().enumerate().map(|(i, &class)| if i < 10_000 { class } else { (class + 1) % 3 }).collect();
        let evaluation = classifier.evaluate(&Dataset::from_rows(&rows, labels).unwrap()).unwrap();
        assert_eq!(evaluation.samples, rows.len());
        assert_eq!(evaluation.accuracy, 10_000.0 / rows.len() as f32);
        assert!(evaluation.loss.is_finite() && evaluation.loss > 0.0, "{evaluation:?}");
    }

    #[test]
    fn architectures_without_width_or_classes_are_refused() {
        let err = Classifier::new(&config(vec![0]), 1, &cpu()).unwrap_err();
        assert_eq!(err.to_string(), "invalid configuration: every layer needs a width > 0, got 4-0-3");
        let one_class = MlpConfig { num_features: 4, hidden: vec![], num_classes: 1 };
        assert!(Classifier::new(&one_class, 1, &cpu()).is_err());
    }
}
