//! tandemd, the Tandem sidecar, as a library (the `tandemd` binary is a thin `main` over
//! [`runtime::run`]).
//!
//! Modules, one per concern:
//! - [`config`]: flags and environment variables.
//! - [`runtime`]: wires the pieces together; start-up and the ordered shutdown.
//! - [`api`]: the app-facing API: the building blocks written once, Dapr's gRPC and HTTP front
//!   ends over them, and Tandem's training-group API.
//! - [`invoke`]: service invocation, outbound (routing, balancing, failover) and inbound (to the app).
//! - [`acl`]: access control of invocations from Dapr's `Configuration` (`--config`), checked
//!   against the caller's verified SPIFFE id; mutual TLS itself is `tandem_transport::tls`.
//! - [`discovery`]: registration in etcd under a lease and the routing table watched from etcd.
//! - [`state`]: the state stores (`state.sled`, `state.etcd`) behind one trait.
//! - [`pubsub`]: `pubsub.embedded`, durable at-least-once delivery between sidecars.
//! - [`group`]: training groups: rounds formed through etcd, all-reduce and broadcast carried
//!   sidecar to sidecar (the app-facing half is [`api::group`]).
//! - [`components`]: Dapr-format component files.
//! - [`durability`]: how sled databases are opened and flushed (one flush at a time in the process).
//! - [`disk`]: free space under the data dir: writes refused before the disk is full, a reserve.
//! - [`app_channel`]: the connection to the local app and its health probe.
//! - [`admin`]: /healthz, /readyz, Dapr's health paths and /metrics.
//! - [`metrics`]: the Prometheus metrics.
//! - [`telemetry`]: spans for every call and delivery, W3C trace context across hops, OTLP
//!   export, and the log set-up (log lines inside a call carry its trace id).
//! - gRPC is served by `tandem_transport::serve_grpc` (HTTP/2 on gathering sockets, graceful drain).
//! - [`deadline`]: the caller's deadline, carried hop to hop.
//! - [`error`]: the domain error and its one mapping to `tonic::Status`.
//! - [`readiness`]: what /readyz reports.
//! - [`probe`]: `tandemd probe`, /readyz as an exit code for container health checks.

pub mod acl;
pub mod admin;
pub mod api;
pub mod app_channel;
pub mod components;
pub mod config;
pub mod configuration;
pub mod deadline;
pub mod discovery;
pub mod disk;
pub mod durability;
pub mod error;
pub mod group;
pub mod invoke;
pub mod metrics;
pub mod probe;
pub mod pubsub;
pub mod readiness;
pub mod runtime;
pub mod state;
pub mod telemetry;

pub use config::Config;
pub use runtime::{BoundAddresses, StartError, run};
