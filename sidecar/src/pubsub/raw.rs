//! Raw payloads: an event published with Dapr's `rawPayload: "true"` metadata travels without
//! a CloudEvent envelope, for subscribers that are not Dapr apps and want the bytes as they
//! were published.
//!
//! Over gRPC the app still gets a `TopicEventRequest`, as Dapr's own subscriber side makes one:
//! - `data` exactly as published; `data_content_type` as given, else
//!   `application/octet-stream` (no guessing from the payload);
//! - no publisher attributes: `source`, `type` and `spec_version` are empty and there are no
//!   extensions, so no `traceparent` either (a delivery of a raw event starts its own trace);
//! - `id`, `topic`, `pubsub_name` and `path` are filled all the same, because routing,
//!   answers and dead-lettering need them.
//!
//! Inside tandemd a raw event is a `TopicEventRequest` without `spec_version` ([`is_raw`]);
//! `pubsub.embedded` stores and delivers it as it is, and `pubsub.jetstream` puts the bare
//! payload on the stream (see its module docs).

use std::collections::HashMap;

use tandem_proto::runtime::TopicEventRequest;

/// The publish metadata key (Dapr's).
pub const RAW_PAYLOAD: &str = "rawPayload";

/// The content type of a raw event published without one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// Whether publish `metadata` asks for a raw payload; `None` when it does not say. A value that
/// is not a boolean (as Go's `strconv.ParseBool` reads them, which Dapr uses) is an error that
/// names the key and the value.
pub fn requested(metadata: &HashMap<String, String>) -> Result<Option<bool>, String> {
    let Some(value) = metadata.get(RAW_PAYLOAD) else { return Ok(None) };
    match value.as_str() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(Some(true)),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(Some(false)),
        other => Err(format!("metadata '{RAW_PAYLOAD}' is '{other}', which is not a boolean (use true or false)")),
    }
}

/// Why `content_type` cannot be carried with a raw event, if it cannot: brokers carry it as a
/// header, which holds no control characters.
pub fn check_content_type(content_type: &str) -> Result<(), String> {
    if content_type.chars().any(char::is_control) {
        return Err(format!(
            "the content type {content_type:?} of a raw-payload event holds control characters; it travels as a header"
        ));
    }
    Ok(())
}

/// A raw event: `data` and its content type, and what delivery needs.
pub fn event(
    id: String,
    pubsub_name: &str,
    topic: &str,
    data: impl Into<prost::bytes::Bytes>,
    content_type: &str,
) -> TopicEventRequest {
    TopicEventRequest {
        id,
        data_content_type: if content_type.is_empty() { DEFAULT_CONTENT_TYPE } else { content_type }.to_string(),
        data: data.into(),
        topic: topic.to_string(),
        pubsub_name: pubsub_name.to_string(),
        ..Default::default()
    }
}

/// Whether `event` is raw: every CloudEvent that tandemd makes has a `spec_version`.
pub fn is_raw(event: &TopicEventRequest) -> bool {
    event.spec_version.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> HashMap<String, String> {
        HashMap::from([(RAW_PAYLOAD.to_string(), value.to_string())])
    }

    #[test]
    fn the_flag_reads_like_dapr_and_names_a_bad_value() {
        assert_eq!(requested(&HashMap::new()), Ok(None));
        assert_eq!(requested(&metadata("true")), Ok(Some(true)));
        assert_eq!(requested(&metadata("1")), Ok(Some(true)));
        assert_eq!(requested(&metadata("False")), Ok(Some(false)));
        let err = requested(&metadata("yes")).unwrap_err();
        assert!(err.contains("'rawPayload'") && err.contains("'yes'"), "{err}");
        assert!(requested(&metadata("")).is_err());
    }

    #[test]
    fn a_raw_event_has_no_cloudevent_attributes() {
        let event = event("id-1".into(), "pubsub", "t", b"{}".to_vec(), "");
        assert!(is_raw(&event));
        assert_eq!(event.data_content_type, DEFAULT_CONTENT_TYPE, "no guessing from the payload");
        assert!(event.source.is_empty() && event.r#type.is_empty() && event.extensions.is_none());
        assert_eq!((event.id.as_str(), event.topic.as_str(), event.pubsub_name.as_str()), ("id-1", "t", "pubsub"));
        assert!(check_content_type("text/plain; charset=utf-8").is_ok());
        assert!(check_content_type("text/plain\r\nX: y").is_err());
    }
}
