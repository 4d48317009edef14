//! Which gRPC metadata travels with an invocation, caller to callee and back.
//!
//! Everything the caller app sets travels, except headers that describe one hop (transport,
//! encoding, deadline: each hop sets its own) and the identity headers that only sidecars may
//! set, so an app cannot claim to be another app-id.

use std::collections::HashMap;

use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataMap, MetadataValue};

/// The calling app's id, as the callee app sees it (Dapr's header name).
pub const CALLER_APP_ID: &str = "dapr-caller-app-id";
/// The called app's id, as the callee app sees it (Dapr's header name).
pub const CALLEE_APP_ID: &str = "dapr-callee-app-id";
/// Tandem's own: pins an invocation to one instance of the target app (the instance's
/// `tandem.instance-id` from GetMetadata), with no failover to another, for state that only
/// that instance holds (e.g. a train replica's local batches).
pub const TARGET_INSTANCE: &str = "tandem-target-instance";

/// The instance an invocation is pinned to ([`TARGET_INSTANCE`]), if any.
pub fn target_instance(metadata: &MetadataMap) -> Option<String> {
    metadata.get(TARGET_INSTANCE).and_then(|v| v.to_str().ok()).map(str::to_string).filter(|v| !v.is_empty())
}

/// [`target_instance`] of a call through the HTTP API.
pub fn target_instance_http(headers: &http::HeaderMap) -> Option<String> {
    headers.get(TARGET_INSTANCE).and_then(|v| v.to_str().ok()).map(str::to_string).filter(|v| !v.is_empty())
}

const HOP_HEADERS: &[&str] = &[
    "te",
    "host",
    "content-type",
    "user-agent",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "grpc-status",
    "grpc-message",
    "dapr-app-id",
    "dapr-api-token",
    CALLER_APP_ID,
    CALLEE_APP_ID,
    // Trace context is per hop too: each sidecar sends its own span as the parent.
    crate::telemetry::context::TRACEPARENT,
    crate::telemetry::context::TRACESTATE,
];

/// Whether a header named `key` travels from one app to another (the rule of this module).
pub fn travels(key: &str) -> bool {
    !(key.starts_with(':') || key.starts_with("tandem-") || HOP_HEADERS.contains(&key))
}

/// The ASCII metadata that travels to the next hop. Binary (`-bin`) entries stay behind:
/// the internal API carries text only.
pub fn outgoing(metadata: &MetadataMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for entry in metadata.iter() {
        if let KeyAndValueRef::Ascii(key, value) = entry
            && travels(key.as_str())
            && let Ok(value) = value.to_str()
        {
            out.insert(key.as_str().to_string(), value.to_string());
        }
    }
    out
}

/// The HTTP headers of a call through the HTTP API that travel to the callee, as metadata (the
/// same rule as [`outgoing`]; values that are not visible ASCII stay behind).
pub fn outgoing_http(headers: &http::HeaderMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (key, value) in headers {
        if travels(key.as_str())
            && key != http::header::CONTENT_LENGTH
            && key != http::header::CONNECTION
            && key != http::header::TRANSFER_ENCODING
            && let Ok(value) = value.to_str()
        {
            out.insert(key.as_str().to_string(), value.to_string());
        }
    }
    out
}

/// Writes carried metadata onto HTTP headers (an answer of the HTTP API); entries that are not
/// valid header names or values are skipped.
pub fn apply_http(carried: &HashMap<String, String>, target: &mut http::HeaderMap) {
    for (key, value) in carried {
        if !travels(key) {
            continue;
        }
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(value))
        {
            target.insert(name, value);
        }
    }
}

/// Writes carried metadata onto a request or response; entries that are not valid gRPC
/// metadata (they never come from a well-behaved peer) are skipped.
pub fn apply(carried: &HashMap<String, String>, target: &mut MetadataMap) {
    for (key, value) in carried {
        if !travels(key) {
            continue;
        }
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str()))
        {
            target.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_headers_travel_and_hop_and_identity_headers_do_not() {
        let mut md = MetadataMap::new();
        md.insert("x-request-kind", "batch".parse().unwrap());
        md.insert("grpc-timeout", "5S".parse().unwrap());
        md.insert("dapr-app-id", "b".parse().unwrap());
        md.insert(CALLER_APP_ID, "spoofed".parse().unwrap());
        md.insert("tandem-not-delivered", "true".parse().unwrap());
        md.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        md.insert_bin("trace-bin", tonic::metadata::MetadataValue::from_bytes(b"\x01"));
        let out = outgoing(&md);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out["x-request-kind"], "batch");

        let mut carried = out.clone();
        carried.insert(CALLER_APP_ID.into(), "spoofed".into());
        carried.insert("bad key".into(), "x".into());
        let mut target = MetadataMap::new();
        apply(&carried, &mut target);
        assert_eq!(target.get("x-request-kind").unwrap(), "batch");
        assert!(target.get(CALLER_APP_ID).is_none());
        assert_eq!(target.len(), 1);
    }
}
