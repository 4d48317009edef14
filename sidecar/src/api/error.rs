//! The app-facing API's one error type and its two mappings: [`ApiError`] becomes a gRPC status
//! (code, message, and Dapr's rich details in `grpc-status-details-bin`) for the gRPC front end,
//! and an HTTP status with Dapr's JSON error body (`{"errorCode": "ERR_...", "message": "...",
//! "details": [...]}`) for the HTTP front end. Every building block reports its failures as an
//! `ApiError`, built by the constructors here with Dapr's codes, reasons and details, so the two
//! front ends cannot disagree.
//!
//! Details are Google's richer error model as Dapr sends it: an `ErrorInfo` (domain `dapr.io`,
//! a reason such as `DAPR_STATE_NOT_FOUND`, metadata), a `ResourceInfo` naming the component,
//! a `BadRequest` naming the field.

use std::collections::{BTreeMap, HashMap};

use axum::http::StatusCode;
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::{BadRequest, ErrorDetail, ErrorInfo, ResourceInfo, StatusExt};

use crate::error::MeshError;
use crate::pubsub::PubSubError;
use crate::state::StateError;

/// A failed call of the app-facing API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The gRPC status code.
    pub code: Code,
    /// The HTTP status.
    pub http: StatusCode,
    /// Dapr's error code (`ERR_STATE_STORE_NOT_FOUND`, ...), the HTTP body's `errorCode`.
    pub error_code: &'static str,
    pub message: String,
    /// Dapr's rich error details, where Dapr sends them.
    pub details: Vec<Detail>,
}

/// One detail of Google's richer error model, as Dapr fills it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    /// `google.rpc.ErrorInfo` with domain `dapr.io`.
    Info { reason: &'static str, metadata: BTreeMap<String, String> },
    /// `google.rpc.ResourceInfo`: the component (`state`, `pubsub`) and its name.
    Resource { kind: &'static str, name: String, description: String },
    /// `google.rpc.BadRequest` with one field violation.
    BadField { field: String, description: String },
}

/// The domain of Dapr's `ErrorInfo` details.
pub const DAPR_DOMAIN: &str = "dapr.io";

/// What a state operation was doing when its store failed, for Dapr's error code and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateWork<'a> {
    Get { key: &'a str },
    Save,
    Delete { key: &'a str },
    Transaction,
}

impl ApiError {
    pub fn new(code: Code, http: StatusCode, error_code: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, http, error_code, message: message.into(), details: Vec::new() }
    }

    /// Adds Dapr's `ErrorInfo` with `reason` and `metadata`.
    pub fn with_info<'a>(
        mut self,
        reason: &'static str,
        metadata: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let metadata = metadata.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.details.push(Detail::Info { reason, metadata });
        self
    }

    /// Adds a `ResourceInfo` naming the component.
    pub fn with_resource(mut self, kind: &'static str, name: &str) -> Self {
        let description = self.message.clone();
        self.details.push(Detail::Resource { kind, name: name.to_string(), description });
        self
    }

    /// Adds a `BadRequest` naming the field that was wrong.
    pub fn with_bad_field(mut self, field: &str) -> Self {
        let description = self.message.clone();
        self.details.push(Detail::BadField { field: field.to_string(), description });
        self
    }

    /// A request that cannot be understood (400 `ERR_MALFORMED_REQUEST`, INVALID_ARGUMENT).
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, StatusCode::BAD_REQUEST, "ERR_MALFORMED_REQUEST", message)
    }

    /// `store` is not one of this sidecar's state stores.
    pub fn state_store_not_found(app_id: &str, store: &str, known: &str) -> Self {
        Self::new(
            Code::InvalidArgument,
            StatusCode::BAD_REQUEST,
            "ERR_STATE_STORE_NOT_FOUND",
            format!("state store {store} is not found (stores here: {known})"),
        )
        .with_info("DAPR_STATE_NOT_FOUND", [("appID", app_id)])
        .with_resource("state", store)
    }

    /// The sidecar has no state store at all.
    pub fn state_stores_not_configured(app_id: &str, store: &str) -> Self {
        Self::new(
            Code::FailedPrecondition,
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_STATE_STORE_NOT_CONFIGURED",
            format!("state store {store} is not configured"),
        )
        .with_info("DAPR_STATE_NOT_CONFIGURED", [("appID", app_id)])
    }

    /// A state key that cannot be stored (empty, or with `||`, the prefix separator).
    pub fn invalid_state_key(store: &str, key: &str, message: impl Into<String>) -> Self {
        Self::malformed(message)
            .with_info("DAPR_STATE_ILLEGAL_KEY", [])
            .with_resource("state", store)
            .with_bad_field(key)
    }

    /// An unsupported operation type in a transaction.
    pub fn unsupported_state_operation(operation: &str) -> Self {
        Self::new(
            Code::InvalidArgument,
            StatusCode::BAD_REQUEST,
            "ERR_NOT_SUPPORTED_STATE_OPERATION",
            format!("operation type {operation} not supported (use 'upsert' or 'delete')"),
        )
    }

    /// A store failure during `work` on store `store`, with Dapr's code and message per
    /// operation: an ETag mismatch is 409 (ABORTED) for a save or delete and, as in Dapr, a
    /// failed transaction (500) inside a transaction.
    pub fn state(store: &str, work: StateWork<'_>, error: StateError) -> Self {
        let (code, http) = match (&error, work) {
            (StateError::EtagMismatch { .. }, StateWork::Transaction) => {
                (Code::Aborted, StatusCode::INTERNAL_SERVER_ERROR)
            }
            (StateError::EtagMismatch { .. }, _) => (Code::Aborted, StatusCode::CONFLICT),
            (StateError::TooLarge(_), _) => (Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE),
            (StateError::DiskFull(_), _) => (Code::ResourceExhausted, StatusCode::INSUFFICIENT_STORAGE),
            (StateError::Unavailable(_), _) => (Code::Unavailable, StatusCode::INTERNAL_SERVER_ERROR),
            (StateError::Corrupt(_), _) => (Code::DataLoss, StatusCode::INTERNAL_SERVER_ERROR),
            (StateError::Internal(_), _) => (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        };
        let detail = match &error {
            StateError::EtagMismatch { .. } => format!("possible etag mismatch. error from state store: {error}"),
            _ => error.to_string(),
        };
        let (error_code, message) = match work {
            StateWork::Get { key } => {
                ("ERR_STATE_GET", format!("fail to get {key} from state store {store}: {detail}"))
            }
            StateWork::Save => ("ERR_STATE_SAVE", format!("failed saving state in state store {store}: {detail}")),
            StateWork::Delete { key } => {
                ("ERR_STATE_DELETE", format!("failed deleting state with key {key}: {detail}"))
            }
            StateWork::Transaction => {
                ("ERR_STATE_TRANSACTION", format!("error while executing state transaction: {detail}"))
            }
        };
        Self::new(code, http, error_code, message)
    }

    /// A value over `--max-body-size`.
    pub fn too_large(error_code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Code::ResourceExhausted, StatusCode::PAYLOAD_TOO_LARGE, error_code, message)
    }

    /// `pubsub` is not one of this sidecar's pub/sub components.
    pub fn pubsub_not_found(pubsub: &str, known: &str) -> Self {
        Self::new(
            Code::InvalidArgument,
            StatusCode::NOT_FOUND,
            "ERR_PUBSUB_NOT_FOUND",
            format!("pubsub {pubsub} is not found (pub/subs here: {known})"),
        )
        .with_info("DAPR_PUBSUB_NOT_FOUND", [])
    }

    pub fn pubsub_name_empty() -> Self {
        Self::new(Code::InvalidArgument, StatusCode::NOT_FOUND, "ERR_PUBSUB_EMPTY", "pubsub name is empty")
            .with_info("DAPR_PUBSUB_NAME_EMPTY", [])
            .with_resource("pubsub", "")
    }

    pub fn topic_empty(pubsub: &str) -> Self {
        Self::new(
            Code::InvalidArgument,
            StatusCode::NOT_FOUND,
            "ERR_TOPIC_NAME_EMPTY",
            format!("topic is empty in pubsub {pubsub}"),
        )
        .with_info("DAPR_PUBSUB_TOPIC_NAME_EMPTY", [])
        .with_resource("pubsub", pubsub)
    }

    /// Bad publish metadata (`rawPayload` that is not a boolean, ...).
    pub fn pubsub_metadata(pubsub: &str, message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, StatusCode::BAD_REQUEST, "ERR_PUBSUB_REQUEST_METADATA", message)
            .with_info("DAPR_PUBSUB_METADATA_DESERIALIZATION", [])
            .with_resource("pubsub", pubsub)
    }

    /// A bulk publish whose entries cannot be read.
    pub fn pubsub_events(pubsub: &str, message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, StatusCode::BAD_REQUEST, "ERR_PUBSUB_EVENTS_SER", message)
            .with_info("DAPR_PUBSUB_UNMARSHAL_EVENTS", [])
            .with_resource("pubsub", pubsub)
    }

    /// A published `application/cloudevents+json` payload that is not a JSON object.
    pub fn cloud_event(app_id: &str, pubsub: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        let error = message.clone();
        Self::new(Code::InvalidArgument, StatusCode::BAD_REQUEST, "ERR_PUBSUB_CLOUD_EVENTS_SER", message)
            .with_info("DAPR_PUBSUB_CLOUD_EVENT_CREATION", [("appID", app_id), ("error", error.as_str())])
            .with_resource("pubsub", pubsub)
    }

    /// Publishing failed in the component.
    pub fn publish(pubsub: &str, topic: &str, error: PubSubError) -> Self {
        let (code, http) = match &error {
            PubSubError::BacklogFull { .. } | PubSubError::Refused(_) => {
                (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS)
            }
            PubSubError::RoutingNotReady | PubSubError::Unavailable(_) => {
                (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE)
            }
            PubSubError::Storage(_) => (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
            PubSubError::DiskFull(_) => (Code::ResourceExhausted, StatusCode::INSUFFICIENT_STORAGE),
        };
        let cause = error.to_string();
        Self::new(
            code,
            http,
            "ERR_PUBSUB_PUBLISH_MESSAGE",
            format!("error when publishing to topic {topic} in pubsub {pubsub}: {error}"),
        )
        .with_info("DAPR_PUBSUB_PUBLISH_MESSAGE", [("topic", topic), ("error", cause.as_str())])
        .with_resource("pubsub", pubsub)
    }

    /// An invocation that failed in the mesh (not the app's own answer): 500
    /// `ERR_DIRECT_INVOKE` as in Dapr, 400 for a request the sidecar refuses, 403 when the
    /// callee's access control denied it, 504 past the caller's deadline, 503 when every
    /// instance refused it as busy (load shed).
    pub fn invoke(app_id: &str, error: &MeshError) -> Self {
        let code = error.code();
        let http = match code {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(code, http, "ERR_DIRECT_INVOKE", format!("failed to invoke, id: {app_id}, err: {error}"))
    }

    /// The JSON body of the HTTP answer (the details as Dapr writes them: protojson with `@type`).
    pub fn http_body(&self) -> String {
        let mut body = json!({ "errorCode": self.error_code, "message": self.message });
        if !self.details.is_empty() {
            body["details"] = Value::Array(self.details.iter().map(Detail::to_json).collect());
        }
        body.to_string()
    }
}

impl Detail {
    fn to_json(&self) -> Value {
        match self {
            Detail::Info { reason, metadata } => {
                let mut info = json!({
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "domain": DAPR_DOMAIN,
                    "reason": reason,
                });
                // protojson leaves an empty map out.
                if !metadata.is_empty() {
                    info["metadata"] = json!(metadata);
                }
                info
            }
            Detail::Resource { kind, name, description } => json!({
                "@type": "type.googleapis.com/google.rpc.ResourceInfo",
                "description": description,
                "owner": "",
                "resource_name": name,
                "resource_type": kind,
            }),
            Detail::BadField { field, description } => json!({
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "field_violations": [{"field": field, "description": description}],
            }),
        }
    }

    fn to_grpc(&self) -> ErrorDetail {
        match self {
            Detail::Info { reason, metadata } => ErrorInfo::new(
                *reason,
                DAPR_DOMAIN,
                metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<HashMap<_, _>>(),
            )
            .into(),
            Detail::Resource { kind, name, description } => {
                ResourceInfo::new(*kind, name.clone(), "", description.clone()).into()
            }
            Detail::BadField { field, description } => {
                BadRequest::with_violation(field.clone(), description.clone()).into()
            }
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        if error.details.is_empty() {
            return Status::new(error.code, error.message);
        }
        let details: Vec<ErrorDetail> = error.details.iter().map(Detail::to_grpc).collect();
        Status::with_error_details_vec(error.code, error.message, details)
    }
}

/// The HTTP status Dapr gives a gRPC code (`HTTPStatusFromCode`), for answers of gRPC apps
/// reached through the HTTP API.
pub fn http_status_of(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The gRPC code for an HTTP app's error status, for gRPC callers (Dapr's `CodeFromHTTPStatus`).
pub fn code_of_http(status: u16) -> Code {
    match status {
        200..=399 => Code::Ok,
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 | 499 => Code::Cancelled,
        409 => Code::Aborted,
        412 => Code::FailedPrecondition,
        416 => Code::OutOfRange,
        429 => Code::ResourceExhausted,
        501 => Code::Unimplemented,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_failures_carry_daprs_codes_per_operation() {
        let mismatch = || StateError::EtagMismatch { key: "k".into(), reason: "etag 3 is not 4".into() };
        let save = ApiError::state("s", StateWork::Save, mismatch());
        assert_eq!((save.code, save.http, save.error_code), (Code::Aborted, StatusCode::CONFLICT, "ERR_STATE_SAVE"));
        assert!(save.message.starts_with("failed saving state in state store s: possible etag mismatch."), "{save}");
        let delete = ApiError::state("s", StateWork::Delete { key: "k" }, mismatch());
        assert_eq!((delete.http, delete.error_code), (StatusCode::CONFLICT, "ERR_STATE_DELETE"));
        assert!(delete.message.starts_with("failed deleting state with key k: "), "{delete}");
        let transaction = ApiError::state("s", StateWork::Transaction, mismatch());
        assert_eq!(
            (transaction.http, transaction.error_code),
            (StatusCode::INTERNAL_SERVER_ERROR, "ERR_STATE_TRANSACTION")
        );
        let get = ApiError::state("s", StateWork::Get { key: "k" }, StateError::Unavailable("down".into()));
        assert_eq!((get.code, get.error_code), (Code::Unavailable, "ERR_STATE_GET"));
    }

    #[test]
    fn both_front_ends_see_the_same_error_and_details() {
        let error = ApiError::state_store_not_found("shop", "nope", "'statestore'");
        let body: Value = serde_json::from_str(&error.http_body()).unwrap();
        assert_eq!(body["errorCode"], "ERR_STATE_STORE_NOT_FOUND");
        assert_eq!(body["message"], "state store nope is not found (stores here: 'statestore')");
        assert_eq!(
            body["details"],
            json!([
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "domain": "dapr.io", "metadata": {"appID": "shop"}, "reason": "DAPR_STATE_NOT_FOUND"},
                {"@type": "type.googleapis.com/google.rpc.ResourceInfo", "resource_type": "state", "resource_name": "nope", "owner": "",
                 "description": "state store nope is not found (stores here: 'statestore')"},
            ])
        );
        let status = Status::from(error);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "state store nope is not found (stores here: 'statestore')");
        let info = status.get_details_error_info().expect("an ErrorInfo");
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("DAPR_STATE_NOT_FOUND", "dapr.io"));
        assert_eq!(info.metadata.get("appID").map(String::as_str), Some("shop"));
        assert_eq!(status.get_details_resource_info().expect("a ResourceInfo").resource_name, "nope");

        let key = Status::from(ApiError::invalid_state_key(
            "statestore",
            "a||b",
            "input key/keyPrefix 'a||b' can't contain '||'",
        ));
        assert_eq!(key.get_details_resource_info().unwrap().resource_name, "statestore");
        assert_eq!(key.get_details_bad_request().unwrap().field_violations[0].field, "a||b");
    }
}
