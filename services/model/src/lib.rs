//! `tandem-model`: the model and data code that Tandem's AI pipeline services share
//! (ingest, preprocess, train, serve).
//!
//! - [`device`]: pick a burn [`Device`] by name at run time (`"cpu"`/`"flex"` by default,
//!   `"cuda"`/`"cuda:N"` when built with the `cuda` feature).
//! - [`dataset`]: an in-memory labelled [`Dataset`] (the bundled digits set or a user's CSV file),
//!   its content-hash [`Dataset::version`] and a seeded, stratified [`Dataset::split`].
//! - [`standardize`]: the [`Standardizer`] (per-feature mean/std fitted with burn tensors) and the
//!   mergeable [`FeatureMoments`] it can be built from when batches are seen by several workers.
//! - [`model`]: the MLP [`Classifier`] (architecture in [`MlpConfig`]): predict classes and
//!   probabilities, evaluate, weights to and from bytes.
//! - [`train`]: the seeded training loop ([`train()`], Adam, shuffled minibatches) with a
//!   per-epoch progress callback.
//! - [`rng`]: the small seeded generator behind every random choice (splits, shuffles, weights),
//!   so a seed gives the same model on every run, independent of burn's global RNG.
//!
//! Everything random takes an explicit seed: the same data, configuration and seed give the same
//! weights bytes and the same test accuracy on every run (see `tests` in [`train`]).

pub mod dataset;
pub mod device;
pub mod model;
pub mod rng;
pub mod standardize;
pub mod train;

pub use burn::tensor::Device;
pub use dataset::{Dataset, DatasetError, TrainTestSplit};
pub use device::{DeviceError, parse_device};
pub use model::{Classifier, Evaluation, MlpConfig, ModelError, Prediction};
pub use standardize::{FeatureMoments, Standardizer};
pub use train::{EpochProgress, TrainingConfig, train};
