//! The pipeline's wire format: every JSON payload that travels between the services, or
//! between a client and a service, as one serde type each. The field names here ARE the
//! contract (see /work/notes/pipeline-contract.md); the CLI reads them from this file.
//!
//! - `dataset.raw` (ingest -> preprocess): batches as Arrow IPC (`crate::arrow_batch`, a
//!   [`RawBatch`] each), the end marker and probes as JSON [`RawMessage`] (`{"kind":"end",..}`)
//! - `dataset.features` (preprocess -> train): batches as Arrow IPC (a [`Batch`] each), the end
//!   marker and probes as JSON [`FeatureMessage`]
//!
//! An event's content type says which: `application/vnd.apache.arrow.stream` or `application/json`.
//! - `model.ready` (train -> serve): [`ModelReady`]
//! - invocation `status` on every service: [`IngestStatus`], [`PreprocessStatus`], [`TrainStatus`], [`ServeStatus`]
//! - train `get_model`: [`GetModelRequest`] -> [`ModelEntry`]
//! - serve `predict`: [`PredictRequest`] (parsed by hand, see `tandem-serve`) -> [`PredictResponse`]

use serde::{Deserialize, Serialize};

/// App ids of the four services.
pub mod app_ids {
    pub const INGEST: &str = "ingest";
    pub const PREPROCESS: &str = "preprocess";
    pub const TRAIN: &str = "train";
    pub const SERVE: &str = "serve";
}

/// Topics of the pub/sub component [`PUBSUB`].
pub mod topics {
    pub const DATASET_RAW: &str = "dataset.raw";
    pub const DATASET_FEATURES: &str = "dataset.features";
    pub const MODEL_READY: &str = "model.ready";
}

/// Invocation methods.
pub mod methods {
    /// Every service: progress as JSON.
    pub const STATUS: &str = "status";
    /// train: a model registry entry.
    pub const GET_MODEL: &str = "get_model";
    /// serve: classes and probabilities of raw samples.
    pub const PREDICT: &str = "predict";
    /// ingest and preprocess: a subscriber acknowledges a [`super::Probe`] (`{"nonce": ..}`).
    pub const PROBE_ACK: &str = "probe_ack";
}

/// The pub/sub component every service uses.
pub const PUBSUB: &str = "pubsub";
/// The state store every service uses (for preprocess it is the `state.etcd` store its
/// replicas share, see `components/preprocess/`).
pub const STATE_STORE: &str = "statestore";
/// The content type of every payload.
pub const JSON: &str = "application/json";

/// Which part of the dataset a batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many batches and samples each split has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SplitCounts {
    pub train_batches: u32,
    pub test_batches: u32,
    pub train_samples: u32,
    pub test_samples: u32,
}

impl SplitCounts {
    pub fn batches(&self, split: Split) -> u32 {
        match split {
            Split::Train => self.train_batches,
            Split::Test => self.test_batches,
        }
    }

    pub fn total_batches(&self) -> u32 {
        self.train_batches + self.test_batches
    }
}

/// A batch of samples: raw on `dataset.raw`, standardized on `dataset.features` (as Arrow IPC
/// on both and in train's state, see `crate::arrow_batch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Content hash of the whole dataset (features, labels, split), from ingest.
    pub dataset_version: String,
    pub split: Split,
    /// 0-based index within its split.
    pub batch_index: u32,
    /// How many batches its split has.
    pub batch_count: u32,
    pub feature_count: u32,
    /// One row of `feature_count` values per sample.
    pub features: Vec<Vec<f32>>,
    /// Class of each sample, `0..class_count`.
    pub labels: Vec<u32>,
}

impl Batch {
    /// The batch's identity, for idempotent bookkeeping: `VERSION/SPLIT/INDEX`.
    pub fn key(&self) -> String {
        batch_key(&self.dataset_version, self.split, self.batch_index)
    }
}

/// `VERSION/SPLIT/INDEX`: how a batch is named in state keys.
pub fn batch_key(dataset_version: &str, split: Split, index: u32) -> String {
    format!("{dataset_version}/{split}/{index}")
}

/// A raw batch on `dataset.raw` (Arrow IPC, see `crate::arrow_batch`), with the scaler of its
/// dataset: ingest fits it on the train split before it publishes anything, so every batch can
/// be standardized the moment it arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct RawBatch {
    pub batch: Batch,
    pub scaler: ScalerParams,
}

/// The end-of-dataset marker on `dataset.raw`: what a complete dataset holds, and its scaler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawEnd {
    pub dataset_version: String,
    pub feature_count: u32,
    pub class_count: u32,
    pub counts: SplitCounts,
    pub scaler: ScalerParams,
}

/// A JSON event on `dataset.raw` (batches travel as Arrow IPC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RawMessage {
    End(RawEnd),
    Probe(Probe),
}

/// Standardization parameters, fitted on the train split only: `x' = (x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalerParams {
    pub mean: Vec<f32>,
    /// Never 0: a constant feature gets 1 (it standardizes to 0).
    pub std: Vec<f32>,
    /// How many train samples it was fitted on.
    pub samples: u64,
}

/// The end-of-dataset marker on `dataset.features`: the raw marker plus the scaler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturesEnd {
    pub dataset_version: String,
    pub feature_count: u32,
    pub class_count: u32,
    pub counts: SplitCounts,
    pub scaler: ScalerParams,
}

/// A JSON event on `dataset.features` (batches travel as Arrow IPC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeatureMessage {
    End(FeaturesEnd),
    Probe(Probe),
}

/// A subscription probe (see `tandem_pipeline::probe`): a publisher sends it until the
/// subscriber answers by invoking `reply_to`'s [`methods::PROBE_ACK`] with the nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub nonce: String,
    /// The app-id to acknowledge to.
    pub reply_to: String,
}

/// `model.ready`: a new model is in train's registry (a reference, not the weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReady {
    pub model_version: String,
    /// Increases with every model train registers; serve never swaps to a lower one.
    pub sequence: u64,
    pub dataset_version: String,
    pub test_accuracy: f32,
}

/// train `get_model`: `{"version": null}` for the latest.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GetModelRequest {
    #[serde(default)]
    pub version: Option<String>,
}

/// How a model was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingParams {
    pub epochs: u32,
    pub seed: u64,
    pub learning_rate: f64,
    pub batch_size: u32,
}

/// What a model achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub test_accuracy: f32,
    pub train_accuracy: f32,
    /// Mean training loss of the last epoch.
    pub final_loss: f32,
    pub train_samples: u32,
    pub test_samples: u32,
    pub training_seconds: f64,
}

/// A model registry entry (train's state, `model/VERSION`), as `get_model` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub model_version: String,
    pub sequence: u64,
    pub dataset_version: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub feature_count: u32,
    pub class_count: u32,
    /// Widths of the hidden layers.
    pub hidden: Vec<u32>,
    /// The model's weights (tandem-model's record bytes), base64 (standard alphabet, padded).
    pub weights: String,
    /// The preprocessing the model expects its inputs to go through.
    pub preprocessing: ScalerParams,
    pub metrics: ModelMetrics,
    pub training: TrainingParams,
}

/// serve `predict`: `{"features": [f32; n]}` (one sample) or `{"features": [[f32; n], ...]}`.
/// Values may also be the strings `"NaN"`, `"Infinity"`, `"-Infinity"` (which are refused as
/// non-finite, by name, rather than as malformed JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictRequest {
    pub features: serde_json::Value,
}

/// One sample's prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub class: u32,
    pub probabilities: Vec<f32>,
}

/// serve `predict`'s answer, one prediction per sample in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictResponse {
    pub model_version: String,
    pub predictions: Vec<Prediction>,
}

/// ingest's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngestPhase {
    Publishing,
    Done,
}

/// ingest `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestStatus {
    pub phase: IngestPhase,
    pub dataset_version: String,
    pub published_batches: u32,
    pub total_batches: u32,
}

/// What ingest keeps in its state (`manifest/VERSION` and `manifest/latest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub dataset_version: String,
    /// `digits`, or the CSV file's path.
    pub source: String,
    pub seed: u64,
    pub test_fraction: f64,
    pub batch_size: u32,
    pub feature_count: u32,
    pub class_count: u32,
    pub counts: SplitCounts,
    /// RFC 3339, UTC: when ingest started publishing it.
    pub created_at: String,
    /// Whether every batch and the end marker were published.
    pub complete: bool,
}

/// preprocess `status` (per replica: `transformed_batches` counts this replica's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessStatus {
    /// Whether this replica holds the scaler of `dataset_version` (it comes with every raw batch).
    pub scaler_fitted: bool,
    pub transformed_batches: u64,
    /// The dataset version of the last event this replica handled.
    pub dataset_version: Option<String>,
}

/// train's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPhase {
    Gathering,
    Training,
    Ready,
}

/// train `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainStatus {
    pub phase: TrainPhase,
    pub dataset_version: Option<String>,
    pub batches_received: u32,
    pub batches_expected: Option<u32>,
    pub epoch: u32,
    pub epochs: u32,
    pub loss: f32,
    pub test_accuracy: Option<f32>,
    pub model_version: Option<String>,
    /// This replica's training group while it trains (absent in the status of a train that
    /// predates groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupProgress>,
}

/// A train replica's place in its training group and how the group's training goes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupProgress {
    /// The group's name (one group per training run).
    pub group: String,
    /// Why this replica is in no round yet, while it waits for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The current round (0: none yet); every change of membership is a new round.
    pub round: u64,
    pub rank: u32,
    pub world_size: u32,
    /// The round's members in rank order.
    pub members: Vec<GroupMemberInfo>,
    /// Steps completed, and of how many.
    pub step: u64,
    pub total_steps: u64,
    /// The global batch's mean loss at the last step.
    pub step_loss: f32,
    /// Samples the whole group trains on per second (global batches over the last steps).
    pub samples_per_second: f64,
    /// Where this replica's steps go (means over the last steps, in milliseconds): computing
    /// its shard's gradients, the all-reduce as the app sees it (to its sidecar, across the
    /// group and back), applying the update.
    #[serde(default)]
    pub compute_ms: f64,
    #[serde(default)]
    pub all_reduce_ms: f64,
    #[serde(default)]
    pub apply_ms: f64,
    /// Rounds this replica has been in.
    pub rounds: u64,
    /// SHA-256 of the parameters after the last step: the same on every replica of a round.
    pub parameters_hash: String,
}

/// One member of a training group's round.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMemberInfo {
    pub rank: u32,
    /// The member's sidecar instance and Join stream.
    pub member_id: String,
}

/// serve `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeStatus {
    pub model_version: Option<String>,
    /// `predict` calls answered (successfully or not).
    pub requests: u64,
    /// Samples predicted.
    pub samples: u64,
    /// Forward passes run (each holds one or more requests).
    pub batches: u64,
    /// `predict` calls refused because the queue was full (`--max-queue`).
    #[serde(default)]
    pub shed: u64,
    /// Samples waiting for a forward pass now.
    #[serde(default)]
    pub queued: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_messages_are_tagged_by_kind() {
        let end = RawMessage::End(RawEnd {
            dataset_version: "v".into(),
            feature_count: 2,
            class_count: 3,
            counts: SplitCounts::default(),
            scaler: ScalerParams { mean: vec![0.5, 1.0], std: vec![1.0, 2.0], samples: 9 },
        });
        let json = serde_json::to_value(&end).unwrap();
        assert_eq!(json["kind"], "end");
        assert_eq!(serde_json::from_value::<RawMessage>(json).unwrap(), end);
        // Batches are Arrow IPC, never a JSON message.
        let batch = serde_json::json!({"kind":"batch","dataset_version":"v","split":"test","batch_index":1});
        assert!(serde_json::from_value::<RawMessage>(batch).is_err());
        assert_eq!(batch_key("v", Split::Test, 1), "v/test/1");
    }
}
