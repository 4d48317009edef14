//! `tandem-model`: the model and data code that Tandem's AI pipeline services share
//! (ingest, preprocess, train, serve).
//!
//! - [`device`]: pick a burn [`Device`] by name at run time (`"cpu"`/`"flex"` by default,
//!   `"cuda"`/`"cuda:N"` with the `cuda` feature, `"vulkan"`/`"vulkan:N"` with the `vulkan` feature).
//! - [`dataset`]: an in-memory labelled [`Dataset`] (the bundled digits set or a user's CSV file),
//!   its content-hash [`Dataset::version`], a seeded, stratified [`Dataset::split`], and seeded
//!   synthetic data of any size ([`Dataset::synthetic`], `synthetic:ROWS:FEATURES:CLASSES`).
//! - [`standardize`]: the [`Standardizer`] (per-feature mean/std fitted with burn tensors) and the
//!   mergeable [`FeatureMoments`] it can be built from when batches are seen by several workers.
//! - [`model`]: the MLP [`Classifier`] (architecture in [`MlpConfig`]): predict classes and
//!   probabilities, evaluate, weights to and from bytes.
//! - [`data_parallel`]: the replica-independent half of data-parallel training: global batches
//!   and each rank's shard, gradients and parameters as flat buffers, Adam on them, and the
//!   trainer state (weights, moments, step) as bytes for a replica that joins late.
//! - [`train`](mod@train): the seeded training loop ([`train()`], Adam, shuffled minibatches) with a
//!   per-epoch progress callback.
//! - [`rng`]: the small seeded generator behind every random choice (splits, shuffles, weights),
//!   so a seed gives the same model on every run, independent of burn's global RNG.
//!
//! The whole flow, as ingest, preprocess, train and serve split it between them:
//!
//! ```no_run
//! use tandem_model::{Classifier, Dataset, Standardizer, TrainingConfig, parse_device, train};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = parse_device("cpu")?;
//! // ingest: load, version, split.
//! let data = Dataset::digits(); // or Dataset::from_csv_file(path, "label")?
//! let version = data.version();
//! let split = data.split(0.2, 42)?;
//! // preprocess: fit on the training split only, transform both.
//! let scaler = Standardizer::fit(&split.train, &device);
//! let (train_set, test_set) = (scaler.transform(&split.train, &device)?, scaler.transform(&split.test, &device)?);
//! // train: seeded loop with progress, evaluate, keep the weights as bytes.
//! let classifier = train(&train_set, &TrainingConfig::default(), &device, |p| {
//!     println!("epoch {}/{} loss {:.4} train accuracy {:.3}", p.epoch, p.epochs, p.loss, p.train_accuracy)
//! })?;
//! let accuracy = classifier.evaluate(&test_set)?.accuracy;
//! let (config, weights) = (classifier.config().clone(), classifier.to_bytes()?);
//! // serve: rebuild from bytes, standardize raw features with the model's scaler, predict.
//! let served = Classifier::from_bytes(&config, &weights, &device)?;
//! let raw = vec![vec![0.0f32; 64]];
//! let predictions = served.predict(&scaler.transform_rows(&raw, &device)?)?;
//! println!("{version}: accuracy {accuracy}, class {}", predictions[0].class);
//! # Ok(())
//! # }
//! ```
//!
//! Everything random takes an explicit seed: the same data, configuration and seed give the same
//! weights bytes and the same test accuracy on every run (see `tests` in [`train`](mod@train)).

pub mod data_parallel;
pub mod dataset;
pub mod device;
pub mod model;
pub mod rng;
pub mod standardize;
pub mod train;

pub use burn::tensor::Device;
pub use data_parallel::{GlobalBatches, Shard, StepGradients, StepOutcome, Trainer, TrainerState};
pub use dataset::{Dataset, DatasetError, SyntheticRows, SyntheticSpec, TrainTestSplit};
pub use device::{DeviceError, parse_device};
pub use model::{Classifier, Evaluation, MlpConfig, ModelError, Prediction};
pub use standardize::{FeatureMoments, Standardizer};
pub use train::{EpochProgress, TrainingConfig, train};
