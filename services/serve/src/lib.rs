//! tandem-serve: stage 4 of the AI pipeline.
//!
//! `predict` takes raw features (one sample or many), applies the model's own preprocessing
//! (the scaler stored with it in train's registry), and answers classes, probabilities and the
//! model version. Bad input is INVALID_ARGUMENT naming the sample and feature; before any model
//! is loaded, UNAVAILABLE says so.
//!
//! - Dynamic batching ([`batcher`]): concurrent requests queue; one forward pass takes every
//!   sample queued when it starts, up to `--max-batch-size`, and requests that arrive while it
//!   runs make up the next one. By default a pass never waits for more (a lone request runs at
//!   once); `--max-batch-wait-ms` above 0 lets a pass that is not full wait that long for more.
//!   `--max-batch-size 1` turns batching off (the benchmark's baseline).
//! - Hot swap ([`model`]): on `model.ready` the new entry is fetched from train (`get_model`
//!   through the mesh) and decoded off the request path; the swap itself replaces one `Arc`
//!   under a lock held for a pointer write. A batch in flight keeps the model it started with,
//!   so no request fails or waits for a swap. Versions only move forward (`sequence`).
//!   Because a `model.ready` published while serve was down or not yet subscribed is not
//!   kept, serve also asks train for its latest version at start and every `--model-poll-secs`.
//! - [`request`]: parsing and checking `predict` requests.
//! - [`service`]: [`Serve`], the handlers.

pub mod batcher;
pub mod model;
pub mod request;
pub mod service;

pub use batcher::BatchingOptions;
pub use service::Serve;

use std::time::Duration;

use clap::Parser;
use tandem_pipeline::service::ServiceArgs;

/// `tandem-serve`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(name = "tandem-serve", about = "Tandem AI pipeline: serves predictions with dynamic batching")]
pub struct Options {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Most samples in one forward pass (1: no batching).
    #[arg(long, env = "TANDEM_MAX_BATCH_SIZE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_batch_size: u32,
    /// Longest wait for more requests after the first one of a batch, in milliseconds. 0 (the
    /// default): a batch takes what is queued and starts; under load the requests that arrive
    /// during one forward pass fill the next.
    #[arg(long, env = "TANDEM_MAX_BATCH_WAIT_MS", default_value_t = 0)]
    pub max_batch_wait_ms: u64,
    /// burn device: cpu (flex), cuda, cuda:N, vulkan, vulkan:N (GPUs need a tandem-model feature).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: String,
    /// How often to ask train for its latest model version (a missed model.ready is caught up).
    #[arg(long, env = "TANDEM_MODEL_POLL_SECS", default_value_t = 10)]
    pub model_poll_secs: u64,
}

impl Options {
    pub fn batching(&self) -> BatchingOptions {
        BatchingOptions {
            max_batch_size: self.max_batch_size as usize,
            max_wait: Duration::from_millis(self.max_batch_wait_ms),
        }
    }

    pub fn model_poll(&self) -> Duration {
        Duration::from_secs(self.model_poll_secs.max(1))
    }
}
