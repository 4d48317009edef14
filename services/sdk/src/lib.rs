//! tandem-sdk: what a Rust app needs to live beside `tandemd`.
//!
//! - [`client`]: [`SidecarClient`], a client for the local sidecar's Dapr-compatible API
//!   (invoke other apps, keep state, publish events one at a time or in bulk, read the
//!   sidecar's metadata, ask it to shut down).
//! - [`app`]: [`AppServer`], which serves the app-callback API (`AppCallback.OnInvoke`,
//!   `ListTopicSubscriptions`, `OnTopicEvent`, `AppCallbackHealthCheck.HealthCheck`) from plain
//!   async handler functions.
//! - [`stream`]: [`EventStream`], a streaming subscription (`SidecarClient::subscribe`): a
//!   topic's events read from a stream to the sidecar and answered on it, with no callback API.
//! - [`group`]: [`GroupMember`], a replica's membership in a training group (Tandem's own API):
//!   rounds with a rank and world size, all-reduce and broadcast through the sidecars.
//! - [`trace`]: [`TraceContext`], the W3C trace context that handlers receive with each call
//!   and event and that calls can carry, so app code continues the trace in its own spans.
//!
//! Payloads are bytes with a content type, carried in Dapr's `google.protobuf.Any` the way
//! Dapr SDKs carry them, so Tandem apps and Dapr apps can call each other.

pub mod app;
pub mod client;
pub mod group;
pub mod stream;
pub mod trace;

pub use app::{AppServer, EventOutcome, Invocation, Reply, SubscriptionOptions, TopicEvent};
pub use client::{BulkEntry, BulkFailure, CallOptions, ConditionalWrite, SidecarClient, StateEntry, WriteCondition};
pub use group::{AllReduced, GroupMember, GroupOptions, Round, RoundMember, Waiting};
pub use stream::{EventStream, StreamAnswers};
pub use tandem_proto as proto;
pub use tonic::{Code, Status};
pub use trace::TraceContext;

/// The metadata key under which the callee sees the caller's app-id.
pub const CALLER_APP_ID: &str = "dapr-caller-app-id";
