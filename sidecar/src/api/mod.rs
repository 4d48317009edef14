//! The app-facing API: Dapr's `dapr.proto.runtime.v1.Dapr` service, a thin layer that turns
//! protos into domain calls and domain errors into gRPC statuses.

pub mod dapr;
pub mod pubsub;
pub mod state;

pub use dapr::DaprApi;
