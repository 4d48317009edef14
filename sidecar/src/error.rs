//! The domain errors and their one mapping to `tonic::Status`: [`MeshError`] for the
//! invocation path, [`StateError`] for the state stores, [`PubSubError`] for pub/sub.

use tonic::{Code, Status};

use crate::pubsub::PubSubError;
use crate::state::StateError;

/// Response metadata a sidecar sets when it refused a call before it reached its app,
/// so the calling sidecar may safely try another instance.
pub const NOT_DELIVERED_HEADER: &str = "tandem-not-delivered";

/// What can go wrong between an app's call and the answer of the app it calls.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{0}")]
    InvalidArgument(String),

    #[error("app-id '{app_id}' is not known in namespace '{namespace}'")]
    AppNotFound { app_id: String, namespace: String },

    #[error("app-id '{app_id}' has no live instance")]
    NoLiveInstance { app_id: String },

    /// A call pinned to one instance, which is not (or no longer) live with its app.
    #[error("instance '{instance}' of app-id '{app_id}' is not live (the call was pinned to it)")]
    InstanceNotLive { app_id: String, instance: String },

    #[error("discovery has not loaded the routing table from etcd yet; is etcd reachable?")]
    DiscoveryNotReady,

    #[error("no instance of app-id '{app_id}' could be reached ({tried} tried): {last_error}")]
    PeersUnreachable { app_id: String, tried: usize, last_error: String },

    /// Set by the callee's sidecar: the app's callback port refused the connection.
    #[error("app '{app_id}' is not listening on {address}: {reason}")]
    AppNotListening { app_id: String, address: String, reason: String },

    #[error("app '{app_id}' has no app port configured, so it cannot be invoked")]
    AppHasNoPort { app_id: String },

    /// An event of a streaming subscription while none of its streams is open here, for an app
    /// that does not list the topic itself: it waits for a stream (an attempt not used).
    #[error("{reason}")]
    NoStreamOpen { reason: String },

    #[error("this sidecar fronts app-id '{local}', not '{requested}' (stale routing entry)")]
    WrongApp { local: String, requested: String },

    #[error("deadline exceeded after {elapsed_ms} ms invoking '{method}' on app-id '{app_id}'")]
    DeadlineExceeded { app_id: String, method: String, elapsed_ms: u128 },

    /// Every instance tried refused the call as busy (RESOURCE_EXHAUSTED: it did not run).
    #[error("every instance of app-id '{app_id}' is busy ({tried} tried): {}", .refusal.message())]
    AllBusy { app_id: String, tried: usize, refusal: Status },

    /// Every instance refused a call as busy a moment ago: this one was not sent.
    #[error("every instance of app-id '{app_id}' is busy (shed by the caller's sidecar): {reason}")]
    Shed { app_id: String, reason: String },

    /// The callee's access control refused the call (the message names the caller's SPIFFE id
    /// and the operation).
    #[error("{0}")]
    AccessDenied(String),

    /// A status from the peer sidecar or the callee app, passed through unchanged.
    #[error("{}", .0.message())]
    Remote(Status),
}

impl MeshError {
    /// True when the call provably did not reach an app, so another instance may take it.
    pub fn is_not_delivered(&self) -> bool {
        matches!(
            self,
            MeshError::AppNotListening { .. }
                | MeshError::AppHasNoPort { .. }
                | MeshError::NoStreamOpen { .. }
                | MeshError::WrongApp { .. }
        )
    }
}

impl MeshError {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            MeshError::InvalidArgument(_) => Code::InvalidArgument,
            MeshError::AppNotFound { .. } | MeshError::InstanceNotLive { .. } => Code::NotFound,
            MeshError::NoLiveInstance { .. }
            | MeshError::DiscoveryNotReady
            | MeshError::PeersUnreachable { .. }
            | MeshError::AppNotListening { .. }
            | MeshError::AppHasNoPort { .. }
            | MeshError::NoStreamOpen { .. }
            | MeshError::WrongApp { .. } => Code::Unavailable,
            MeshError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            MeshError::AccessDenied(_) => Code::PermissionDenied,
            MeshError::AllBusy { .. } | MeshError::Shed { .. } => Code::ResourceExhausted,
            MeshError::Remote(status) => status.code(),
        }
    }
}

impl From<MeshError> for Status {
    fn from(err: MeshError) -> Status {
        let not_delivered = err.is_not_delivered();
        let code = match &err {
            MeshError::Remote(status) => return strip_not_delivered(status.clone()),
            other => other.code(),
        };
        let mut status = Status::new(code, err.to_string());
        if not_delivered {
            status.metadata_mut().insert(NOT_DELIVERED_HEADER, tonic::metadata::MetadataValue::from_static("true"));
        }
        status
    }
}

impl From<StateError> for Status {
    fn from(err: StateError) -> Status {
        let code = match &err {
            // Dapr answers a failed ETag check with ABORTED.
            StateError::EtagMismatch { .. } => Code::Aborted,
            StateError::TooLarge(_) | StateError::DiskFull(_) => Code::ResourceExhausted,
            StateError::Unavailable(_) => Code::Unavailable,
            StateError::Corrupt(_) => Code::DataLoss,
            StateError::Internal(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

impl From<PubSubError> for Status {
    fn from(err: PubSubError) -> Status {
        match &err {
            PubSubError::BacklogFull { .. } => Status::resource_exhausted(err.to_string()),
            PubSubError::RoutingNotReady => Status::unavailable(err.to_string()),
            PubSubError::Storage(_) => Status::internal(err.to_string()),
            PubSubError::Unavailable(_) => Status::unavailable(err.to_string()),
            PubSubError::Refused(_) | PubSubError::DiskFull(_) => Status::resource_exhausted(err.to_string()),
        }
    }
}

/// Whether a status from a peer sidecar says the call never reached its app.
pub fn status_says_not_delivered(status: &Status) -> bool {
    status.metadata().get(NOT_DELIVERED_HEADER).is_some()
}

/// The marker is for sidecars only; apps never see it.
pub fn strip_not_delivered(mut status: Status) -> Status {
    status.metadata_mut().remove(NOT_DELIVERED_HEADER);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_codes_and_name_the_app() {
        let s: Status = MeshError::AppNotFound { app_id: "nope".into(), namespace: "default".into() }.into();
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("'nope'"));

        let s: Status = MeshError::NoLiveInstance { app_id: "b".into() }.into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!status_says_not_delivered(&s));

        let s: Status =
            MeshError::AppNotListening { app_id: "b".into(), address: "127.0.0.1:1".into(), reason: "refused".into() }
                .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("not listening"));
        assert!(status_says_not_delivered(&s));

        let s: Status = MeshError::InvalidArgument("method is empty".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
    }

    #[test]
    fn remote_statuses_pass_through_without_the_marker() {
        let mut remote = Status::new(Code::PermissionDenied, "no");
        remote.metadata_mut().insert(NOT_DELIVERED_HEADER, "true".parse().unwrap());
        let s: Status = MeshError::Remote(remote).into();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "no");
        assert!(!status_says_not_delivered(&s));
    }
}
