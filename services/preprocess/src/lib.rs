//! tandem-preprocess: stage 2 of the AI pipeline.
//!
//! Subscribes to `dataset.raw`, standardizes every batch with a scaler (per-feature mean and
//! standard deviation) fitted on the TRAIN split only, and publishes the results on
//! `dataset.features`, ending with a marker that carries the scaler.
//!
//! # Why this design: competing replicas that give the same result as one
//!
//! Replicas compete for raw batches, so no replica sees the whole train split, yet the scaler
//! must be fitted on all of it, and two replicas must produce exactly what one produces.
//!
//! - Each train batch's sufficient statistics ([`moments::BatchMoments`]: count, mean, sum of
//!   squared deviations) are written under `stats/VERSION/INDEX` in a state store SHARED by the
//!   replicas (`state.etcd`, declared in `components/preprocess/statestore.yaml`). The write is
//!   idempotent: a redelivered batch writes the same value again.
//! - Once every train batch's statistics are present (the count travels in each batch), any
//!   replica combines them IN INDEX ORDER (Chan et al.'s pairwise update) into the scaler. The
//!   order is fixed, so the floating-point result is the same bit for bit whichever replica
//!   computes it, and however the batches were spread. It is stored under `scaler/VERSION`;
//!   a replica that finds one stored uses that one (the first write wins), so even a different
//!   computation could never mix two scalers in one dataset version.
//! - A batch that arrives before the scaler exists (every test batch that comes early, and the
//!   train batches until the last one is in) is answered RETRY: the pub/sub redelivers it with
//!   backoff. The component's retry policy (`components/*/pubsub.yaml`: `maxDeliveryAttempts`,
//!   `initialRetryDelay`, `maxRetryDelay`) allows enough attempts for that wait.
//! - The transform runs on burn tensors (tandem-model's `Standardizer`), per batch; batches are
//!   independent, so who transforms which batch does not change any value.
//!
//! Modules: [`moments`] (per-batch statistics and their deterministic combination), [`service`]
//! ([`Preprocess`]: the event handler, `status`, `probe_ack`).

pub mod moments;
pub mod service;

pub use service::Preprocess;

use clap::Parser;
use tandem_pipeline::service::ServiceArgs;

/// `tandem-preprocess`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(name = "tandem-preprocess", about = "Tandem AI pipeline: standardizes raw batches (scaler fitted on train)")]
pub struct Options {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// burn device for the transform: cpu (flex), cuda, cuda:N, vulkan, vulkan:N (GPUs need a tandem-model feature).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: String,
}
