//! The app-facing API. The building blocks' logic is written once ([`universal`], [`state`],
//! [`pubsub`]) and reports failures as one [`error::ApiError`]; two front ends translate it:
//! [`grpc`] (Dapr's `dapr.proto.runtime.v1.Dapr` service) and [`http`] (Dapr's HTTP API on
//! `--http-port`). [`group`] serves Tandem's own `tandem.group.v1.TrainingGroup`. [`outbox`]
//! is Dapr's transactional outbox, where a state transaction publishes.

pub mod error;
pub mod group;
pub mod grpc;
pub mod http;
pub mod outbox;
pub mod pubsub;
pub mod state;
pub mod token;
pub mod universal;

pub use grpc::DaprApi;
pub use universal::Universal;
