//! tandem-train: stage 3 of the AI pipeline, as any number of replicas that train together.
//!
//! Subscribes to `dataset.features`. Every standardized batch is kept by the replica that
//! received it, in its own store on its own disk (`batches`, state.sled), and counted in the
//! dataset's progress in train's shared store (state.etcd: `gather/VERSION`, updated by
//! compare-and-swap, with a marker naming the batch's keeper), so etcd stays small however
//! large the data; a replica that trains reads its peers' batches from them. When a
//! dataset is complete, every replica trains it as a member of one training group (the sidecars'
//! `tandem.group.v1` API): the group forms rounds through etcd, each replica computes the
//! gradients of its shard of every global batch, the sidecars sum them, and every replica
//! applies the same Adam update (see `tandem_model::data_parallel`). A replica that dies is
//! absorbed (the survivors carry on from the step they hold); one that starts later joins at a
//! step boundary with the group's state. The run's one model goes to the registry (`model/vN`,
//! `model/latest`; the first replica to claim `run/RUN` names its version) and `model.ready` is
//! published. `get_model` answers an entry, `status` the progress and the replica's group.
//!
//! With `--dataset`, a replica trains that dataset itself (split and standardized as the
//! pipeline does) instead of gathering batches: a data-parallel job on its own.
//!
//! Modules: [`gather`] (batches kept per replica, counted in shared state), [`replica`] (one replica's part in a group),
//! [`registry`] (model entries, registered once per run), [`progress`] (status, step log),
//! [`service`] ([`Train`]).

pub mod gather;
pub mod progress;
pub mod registry;
pub mod replica;
pub mod service;

pub use service::Train;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tandem_model::TrainingConfig;
use tandem_pipeline::service::ServiceArgs;

use crate::replica::GroupSettings;

/// `tandem-train`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tandem-train",
    about = "Tandem AI pipeline: trains the MLP with its replicas and keeps the model registry"
)]
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
    /// Samples per global training batch (split across the replicas of a round).
    #[arg(long, env = "TANDEM_TRAIN_BATCH_SIZE", default_value_t = TrainingConfig::default().batch_size as u32)]
    pub train_batch_size: u32,
    /// Hidden layer widths, comma-separated (e.g. 1024,1024).
    #[arg(long, env = "TANDEM_HIDDEN", value_delimiter = ',', default_values_t = TrainingConfig::default().hidden)]
    pub hidden: Vec<usize>,
    /// burn device: cpu (flex), cuda, cuda:N, vulkan, vulkan:N (GPUs need a tandem-model feature).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: String,
    /// The training group the replicas form (one per app; each run's fingerprint says what it trains).
    #[arg(long, env = "TANDEM_TRAIN_GROUP", default_value = "train")]
    pub group: String,
    /// A round of the group starts once this many replicas wait (and a short last call passed).
    #[arg(long, env = "TANDEM_MIN_REPLICAS", default_value_t = 1)]
    pub min_replicas: u32,
    /// A round starts at once with this many replicas; more wait for the next round. 0: no limit.
    #[arg(long, env = "TANDEM_MAX_REPLICAS", default_value_t = 0)]
    pub max_replicas: u32,
    /// How long a round waits for more replicas once the minimum wait, in milliseconds
    /// (default: the sidecar's, 2 s).
    #[arg(long, env = "TANDEM_LAST_CALL_MS")]
    pub last_call_ms: Option<u64>,
    /// Train this dataset on its own instead of gathering the pipeline's batches: digits,
    /// synthetic:ROWS:FEATURES:CLASSES (seeded by --seed) or a CSV file.
    #[arg(long, env = "TANDEM_TRAIN_DATASET")]
    pub dataset: Option<String>,
    /// With --dataset FILE.csv: the label column.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// With --dataset: the share of samples held out for the test accuracy.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Writes a JSON line per training step to this file (step, round, rank, world size, loss,
    /// parameters hash), to compare replicas and runs.
    #[arg(long, env = "TANDEM_STEP_LOG")]
    pub step_log: Option<PathBuf>,
    /// Adds the parameters themselves to the step log's first N steps.
    #[arg(long, default_value_t = 0)]
    pub step_log_parameters: u64,
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

    /// The group settings; min above max is refused, naming both.
    pub fn group_settings(&self) -> Result<GroupSettings, String> {
        if self.min_replicas == 0 {
            return Err("--min-replicas must be at least 1".into());
        }
        if self.max_replicas != 0 && self.min_replicas > self.max_replicas {
            return Err(format!(
                "--min-replicas {} is more than --max-replicas {}",
                self.min_replicas, self.max_replicas
            ));
        }
        tandem_model::TrainingConfig::validate(&self.training_config()).map_err(|e| e.to_string())?;
        Ok(GroupSettings {
            group: self.group.clone(),
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            last_call: self.last_call_ms.map(Duration::from_millis),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> Options {
        let mut all = vec!["tandem-train", "--app-port", "1"];
        all.extend_from_slice(args);
        Options::parse_from(all)
    }

    #[test]
    fn min_above_max_and_unusable_training_settings_are_refused() {
        assert_eq!(
            options(&["--min-replicas", "3", "--max-replicas", "2"]).group_settings().unwrap_err(),
            "--min-replicas 3 is more than --max-replicas 2"
        );
        assert_eq!(
            options(&["--min-replicas", "0"]).group_settings().unwrap_err(),
            "--min-replicas must be at least 1"
        );
        assert_eq!(
            options(&["--epochs", "0"]).group_settings().unwrap_err(),
            "invalid configuration: epochs (0) and batch size (32) must be > 0"
        );
        let settings = options(&["--min-replicas", "2", "--last-call-ms", "500"]).group_settings().unwrap();
        assert_eq!(
            settings,
            GroupSettings {
                group: "train".into(),
                min_replicas: 2,
                max_replicas: 0,
                last_call: Some(Duration::from_millis(500))
            }
        );
    }
}
