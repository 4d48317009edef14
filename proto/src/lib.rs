//! Generated gRPC code for Tandem.
//!
//! - [`common`] and [`runtime`]: the app-facing API, wire-compatible with Dapr's runtime API
//!   (`dapr.proto.common.v1`, `dapr.proto.runtime.v1`) for the methods Tandem implements.
//! - [`group`]: `tandem.group.v1`, the training-group API apps call beside Dapr's (join a
//!   group, all-reduce, broadcast).
//! - [`internal`]: `tandem.internal.v1`, spoken only between sidecars.
//!
//! The `.proto` sources live beside this crate under `dapr/` and `tandem/`; the module tree
//! mirrors the proto packages so that cross-package references resolve.

#![allow(clippy::all, missing_docs)]

pub mod dapr {
    pub mod proto {
        pub mod common {
            pub mod v1 {
                tonic::include_proto!("dapr.proto.common.v1");
            }
        }
        pub mod runtime {
            pub mod v1 {
                tonic::include_proto!("dapr.proto.runtime.v1");
            }
        }
    }
}

pub mod tandem {
    pub mod group {
        pub mod v1 {
            tonic::include_proto!("tandem.group.v1");
        }
    }
    pub mod internal {
        pub mod v1 {
            tonic::include_proto!("tandem.internal.v1");
        }
    }
}

/// Subscription metadata (`TopicSubscription.metadata`) by which an app asks tandemd to deliver
/// a topic's events in publish order; the value is `"true"`.
pub const SUBSCRIPTION_ORDERED: &str = "tandem.ordered";

pub use dapr::proto::common::v1 as common;
pub use dapr::proto::runtime::v1 as runtime;
pub use prost_types;
pub use tandem::group::v1 as group;
pub use tandem::internal::v1 as internal;
