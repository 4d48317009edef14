//! tandem-pipeline: what the four AI pipeline services (`tandem-ingest`, `tandem-preprocess`,
//! `tandem-train`, `tandem-serve`) share, so none of them depends on another.
//!
//! - [`messages`]: every JSON payload on the wire (topics, invocation requests and answers,
//!   status objects), app-ids, topic and method names. The one place the contract is written down.
//! - [`service`]: the common flags (`--app-port`, `--app-host`, `--sidecar`), logging, waiting for
//!   the sidecar with bounded retry, serving until SIGINT/SIGTERM.
//! - [`arrow_batch`]: feature batches as Arrow IPC streams, on the wire and in train's state.
//! - [`json`]: JSON replies and requests (malformed JSON is INVALID_ARGUMENT).
//! - [`moments`]: per-batch feature statistics and their deterministic combination into a scaler.
//! - [`probe`]: waiting until a topic has a subscriber before publishing to it.
//! - [`weights`]: model weights as base64 text inside JSON.

pub mod arrow_batch;
pub mod json;
pub mod messages;
pub mod moments;
pub mod probe;
pub mod service;
pub mod weights;
