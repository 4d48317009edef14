//! tandem-ingest: stage 1 of the AI pipeline.
//!
//! Reads the digits dataset (bundled, works offline), a seeded synthetic one, or a user's
//! Parquet or CSV file (with the Apache Arrow crates, a chunk of rows at a time, never the whole
//! file), in two passes. The first checks every value (a bad one stops ingest naming the file,
//! column and row before anything is published), splits the rows train/test by a seeded hash of
//! their position, cuts each split into batches, hashes them into the dataset version and fits
//! the scaler (per-feature mean and standard deviation) on the train split. The second publishes
//! the batches on `dataset.raw`, each with the version, its index and count and the scaler,
//! then one end-of-dataset marker with the counts. The scaler is fitted before anything is
//! published (as tf.Transform analyzes before it transforms), so preprocess can standardize
//! every batch the moment it arrives and never has to bounce one. The dataset manifest is kept
//! in its state (`manifest/VERSION`, `manifest/latest`); a restarted ingest that finds its
//! dataset already published completely does not publish it again.
//!
//! - [`source`]: where rows come from, a chunk at a time (digits, synthetic, Parquet, CSV).
//! - [`batching`]: the streaming split and the cut into batches.
//! - [`prepare`](mod@prepare): options, the first pass, the version, the scaler ([`Prepared`]).
//! - [`publish`]: the service ([`Ingest`]): `status`, `probe_ack`, the second pass.
//! - [`synth`]: writes the seeded synthetic dataset to a Parquet or CSV file of any size.

pub mod batching;
pub mod prepare;
pub mod publish;
pub mod source;
pub mod synth;

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
