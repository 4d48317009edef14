//! The app-facing API: Dapr's `dapr.proto.runtime.v1.Dapr` service, and Tandem's own
//! `tandem.group.v1.TrainingGroup` ([`group`]), thin layers that turn protos into domain calls
//! and domain errors into gRPC statuses.

pub mod dapr;
pub mod group;
pub mod pubsub;
pub mod state;

pub use dapr::DaprApi;
