//! tandem-train: stage 3 of the AI pipeline.
//!
//! Subscribes to `dataset.features`. Every standardized batch is written to its state before it
//! is acknowledged (`batch/VERSION/SPLIT/INDEX`), with the dataset's progress
//! (`gather/VERSION`: which batches are in, the end marker), so a restart loses nothing and a
//! redelivered batch counts once. When the end marker's counts are all in, it trains the MLP
//! (tandem-model, seeded Adam loop, logging each epoch's loss and accuracy), evaluates it on the
//! test split, stores a versioned model registry entry (`model/vN`: weights, dataset version,
//! preprocessing parameters, metrics, time; `model/latest`), and publishes `model.ready` with
//! a reference. `get_model` answers an entry, `status` the progress.
//!
//! One train instance per pipeline: the registry's sequence numbers and the gathering records
//! are read-modify-written by this process alone (a mutex orders its own writers).
//!
//! Modules: [`registry`] (model entries in state), [`service`] ([`Train`]).

pub mod registry;
pub mod service;

pub use service::Train;

use clap::Parser;
use tandem_model::TrainingConfig;
use tandem_pipeline::service::ServiceArgs;

/// `tandem-train`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(name = "tandem-train", about = "Tandem AI pipeline: trains the MLP and keeps the model registry")]
pub struct Options {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Passes over the training data.
    #[arg(long, env = "TANDEM_EPOCHS", default_value_t = TrainingConfig::default().epochs as u32)]
    pub epochs: u32,
    /// Seeds the weight initialisation and the minibatch order.
    #[arg(long, env = "TANDEM_TRAIN_SEED", default_value_t = TrainingConfig::DEFAULT_SEED)]
    pub seed: u64,
    /// Adam's learning rate.
    #[arg(long, env = "TANDEM_LEARNING_RATE", default_value_t = TrainingConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Samples per training minibatch.
    #[arg(long, env = "TANDEM_TRAIN_BATCH_SIZE", default_value_t = TrainingConfig::default().batch_size as u32)]
    pub train_batch_size: u32,
    /// Hidden layer widths, comma-separated.
    #[arg(long, env = "TANDEM_HIDDEN", value_delimiter = ',', default_values_t = TrainingConfig::default().hidden)]
    pub hidden: Vec<usize>,
    /// burn device: cpu (flex), cuda, cuda:N, vulkan, vulkan:N (GPUs need a tandem-model feature).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: String,
}

impl Options {
    pub fn training_config(&self) -> TrainingConfig {
        TrainingConfig {
            epochs: self.epochs as usize,
            batch_size: self.train_batch_size as usize,
            learning_rate: self.learning_rate,
            seed: self.seed,
            hidden: self.hidden.clone(),
        }
    }
}
