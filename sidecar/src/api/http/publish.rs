//! `/v1.0/publish/...` as Dapr defines it over the shared pub/sub API:
//!
//! - `POST|PUT /v1.0/publish/{pubsub}/{topic}`: the body is the event's data, its
//!   `Content-Type` the data's content type (`text/plain` when absent, as in Dapr); query
//!   parameters `metadata.KEY` (e.g. `metadata.rawPayload=true`) are the publish's metadata.
//!   204 once the event is durably accepted.
//! - `POST|PUT /v1.0-alpha1/publish/bulk/{pubsub}/{topic}` (and `/v1.0/publish/bulk/...`): a JSON
//!   array of `{entryId, event, contentType, metadata?}`. 204 when every entry is published;
//!   otherwise 500 with `{"failedEntries": [{entryId, error}], "errorCode": ...}`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use tandem_proto::runtime::{BulkPublishRequest, BulkPublishRequestEntry, PublishEventRequest};

use super::{HttpApi, json_response, no_content, query_metadata, query_params, read_body};
use crate::api::error::ApiError;

/// `POST|PUT /v1.0/publish/{pubsub}/{topic}`.
pub async fn one(
    State(api): State<HttpApi>,
    Path((pubsub, topic)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let data = read_body(body, api.max_body).await?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        Some(value) => value.to_str().map_err(|_| ApiError::malformed("the Content-Type header is not ASCII text"))?,
        None => "text/plain",
    };
    let request = PublishEventRequest {
        pubsub_name: pubsub,
        topic,
        data: data.to_vec().into(),
        data_content_type: content_type.to_string(),
        metadata: query_metadata(&query_params(query.as_deref())),
    };
    api.universal.pubsub.publish_event(request).await?;
    Ok(no_content())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkEntry {
    #[serde(default)]
    entry_id: String,
    event: Value,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    metadata: std::collections::HashMap<String, String>,
}

/// The bytes of a bulk entry's `event`, by its content type (Dapr's `ConvertEventToBytes`):
/// base64 text for `application/octet-stream`, a JSON string for `text/*` and XML, the JSON
/// itself for JSON and CloudEvents.
fn event_bytes(entry: &BulkEntry) -> Result<Vec<u8>, String> {
    let content_type = entry.content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match content_type.as_str() {
        "application/octet-stream" => match &entry.event {
            Value::String(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("the event is not base64 ({e}), as contentType {content_type} needs")),
            _ => Err(format!("contentType {content_type} needs the event as a base64 string")),
        },
        t if t.starts_with("text/") || t == "application/xml" => match &entry.event {
            Value::String(text) => Ok(text.clone().into_bytes()),
            _ => Err(format!("contentType {content_type} needs the event as a JSON string")),
        },
        "" | "application/json" | "application/cloudevents+json" => {
            Ok(serde_json::to_vec(&entry.event).expect("a JSON value always encodes"))
        }
        t if t.ends_with("+json") => Ok(serde_json::to_vec(&entry.event).expect("a JSON value always encodes")),
        other => Err(format!("mismatch between contentType '{other}' and the event")),
    }
}

/// `POST|PUT /v1.0-alpha1/publish/bulk/{pubsub}/{topic}` and `/v1.0/publish/bulk/...`.
pub async fn bulk(
    State(api): State<HttpApi>,
    Path((pubsub, topic)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, api.max_body).await?;
    let entries: Vec<BulkEntry> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::pubsub_events(
            &pubsub,
            format!("error when unmarshaling the request for topic {topic} pubsub {pubsub}: {e}"),
        )
    })?;
    let mut converted = Vec::with_capacity(entries.len());
    for entry in &entries {
        let event = event_bytes(entry).map_err(|e| {
            ApiError::pubsub_events(
                &pubsub,
                format!(
                    "error when marshalling cloud event envelope for topic {topic} pubsub {pubsub}: entry '{}': {e}",
                    entry.entry_id
                ),
            )
        })?;
        let content_type = if entry.content_type.is_empty() { "application/json" } else { &entry.content_type };
        converted.push(BulkPublishRequestEntry {
            entry_id: entry.entry_id.clone(),
            event,
            content_type: content_type.to_string(),
            metadata: entry.metadata.clone(),
        });
    }
    let request = BulkPublishRequest {
        pubsub_name: pubsub,
        topic,
        entries: converted,
        metadata: query_metadata(&query_params(query.as_deref())),
    };
    let answer = api.universal.pubsub.bulk_publish_event(request).await?;
    if answer.failed_entries.is_empty() {
        return Ok(no_content());
    }
    let failed: Vec<Value> =
        answer.failed_entries.iter().map(|f| json!({"entryId": f.entry_id, "error": f.error})).collect();
    let body = json!({"failedEntries": failed, "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE"});
    Ok(json_response(StatusCode::INTERNAL_SERVER_ERROR, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event: Value, content_type: &str) -> BulkEntry {
        BulkEntry { entry_id: "1".into(), event, content_type: content_type.into(), metadata: Default::default() }
    }

    #[test]
    fn bulk_events_become_bytes_by_their_content_type() {
        assert_eq!(event_bytes(&entry(json!({"a": 1}), "application/json")).unwrap(), br#"{"a":1}"#);
        assert_eq!(event_bytes(&entry(json!("hi"), "text/plain")).unwrap(), b"hi");
        assert_eq!(event_bytes(&entry(json!("AAE="), "application/octet-stream")).unwrap(), vec![0, 1]);
        assert!(event_bytes(&entry(json!({"a": 1}), "text/plain")).unwrap_err().contains("JSON string"));
        assert!(event_bytes(&entry(json!("!!"), "application/octet-stream")).unwrap_err().contains("base64"));
        assert!(event_bytes(&entry(json!(1), "image/png")).unwrap_err().contains("mismatch"));
    }
}
