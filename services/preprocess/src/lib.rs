//! tandem-preprocess: stage 2 of the AI pipeline.
//!
//! Subscribes to `dataset.raw`, standardizes every batch with the scaler that comes with it
//! (per-feature mean and standard deviation, fitted by ingest on the TRAIN split only), and
//! publishes the results on `dataset.features`, ending with a marker that carries the scaler.
//!
//! # Why this design: competing replicas, and no batch ever bounced
//!
//! Replicas compete for raw batches, and two replicas must produce exactly what one produces.
//!
//! - The scaler is fitted before any batch is published (ingest reads the whole train split
//!   first, combining per-batch moments in batch order, see `tandem_pipeline::moments`), and
//!   every raw batch carries it. A batch can be transformed the moment it arrives, by any
//!   replica, so none is answered RETRY for want of a scaler: the pipeline does not depend on
//!   a component's redelivery budget, and runs with tandemd's default delivery policy.
//! - Nothing is published on `dataset.features` before train subscribed (a topic without
//!   subscribers keeps nothing). A replica acknowledges ingest's probe only after its own probe
//!   found train, so ingest publishes nothing before the chain can take it; a batch that reaches
//!   a replica still finishing its probe is held in the handler (bounded) rather than bounced.
//! - The transform runs on burn tensors (tandem-model's `Standardizer`), per batch; batches are
//!   independent, so who transforms which batch does not change any value.
//! - The replicas share a state store (`state.etcd`, `components/preprocess/`) for one thing:
//!   train's acknowledgements of their probes, which reach whichever replica the mesh picks.
//!
//! Modules: [`service`] ([`Preprocess`]: the event handler, `status`, `probe_ack`).

pub mod service;

pub use service::Preprocess;

use clap::Parser;
use tandem_pipeline::service::ServiceArgs;

/// `tandem-preprocess`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tandem-preprocess",
    about = "Tandem AI pipeline: standardizes raw batches with the train split's scaler"
)]
pub struct Options {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// burn device for the transform: cpu (flex), cuda, cuda:N, vulkan, vulkan:N (GPUs need a tandem-model feature).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: String,
}
