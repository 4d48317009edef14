//! tandem-ingest: stage 1 of the AI pipeline.
//!
//! Loads the digits dataset (bundled, works offline), a seeded synthetic one or a user's CSV file, splits it into train
//! and test deterministically from a seed, fits the scaler (per-feature mean and standard
//! deviation) on the train split, and publishes it on `dataset.raw` in batches that carry the
//! dataset version (a content hash of both splits and the batching), their index and count and
//! the scaler, followed by one end-of-dataset marker with the counts. The scaler is fitted
//! before anything is published (as tf.Transform analyzes before it transforms), so
//! preprocess can standardize every batch the moment it arrives and never has to bounce one. The dataset manifest is kept in
//! its state (`manifest/VERSION`, `manifest/latest`); a restarted ingest that finds its dataset
//! already published completely does not publish it again.
//!
//! - [`prepare`](mod@prepare): options, loading, splitting, batching, the version ([`Prepared`]).
//! - [`publish`]: the service ([`Ingest`]): `status`, `probe_ack`, publishing.

pub mod prepare;
pub mod publish;

pub use prepare::{DatasetOptions, IngestError, Prepared, prepare};
pub use publish::Ingest;

use clap::Parser;
use tandem_pipeline::service::ServiceArgs;

/// `tandem-ingest`'s flags.
#[derive(Debug, Clone, Parser)]
#[command(name = "tandem-ingest", about = "Tandem AI pipeline: publishes a dataset in versioned batches")]
pub struct Options {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub dataset: DatasetOptions,
}
