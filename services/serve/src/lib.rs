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
//! - Load shedding ([`batcher`]): at most `--max-queue` samples wait; a request past that is
//!   refused at once with RESOURCE_EXHAUSTED, which the caller's sidecar takes as "busy" and
//!   hands to another replica.
//! - [`metrics`]: queue depth, requests in flight, batch sizes, predictions per model version
//!   and requests shed, on `--metrics-port`'s `/metrics`.
//! - [`request`]: parsing and checking `predict` requests.
//! - [`service`]: [`Serve`], the handlers.

pub mod batcher;
pub mod metrics;
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
    /// Most samples waiting for a forward pass; a request past it is refused at once with
    /// RESOURCE_EXHAUSTED (load shedding). A request that finds nothing waiting is always taken.
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,
    /// Port of `/metrics` (Prometheus text); none when not given, 0 for a free one.
    #[arg(long, env = "TANDEM_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Address `/metrics` listens on (0.0.0.0 for a scraper in another pod).
    #[arg(long, env = "TANDEM_METRICS_HOST", default_value = "127.0.0.1")]
    pub metrics_host: String,
    /// Extra time every forward pass takes, in milliseconds: a slow replica for tests and
    /// benchmarks (0, the default: none).
    #[arg(long, env = "TANDEM_SLOW_MS", default_value_t = 0)]
    pub slow_ms: u64,
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
            max_queue: self.max_queue as usize,
            slow: Duration::from_millis(self.slow_ms),
        }
    }

    pub fn model_poll(&self) -> Duration {
        Duration::from_secs(self.model_poll_secs.max(1))
    }
}
