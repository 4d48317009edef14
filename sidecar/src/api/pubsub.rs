//! Dapr's PublishEvent and BulkPublishEvent on top of the pub/sub components: validation,
//! and the CloudEvent 1.0 attributes the subscriber receives (none for a `rawPayload` publish,
//! see [`crate::pubsub::raw`]).

use std::collections::HashSet;
use std::sync::Arc;

use std::pin::Pin;

use crate::pubsub::streams::StreamSubscriptions;
use prost::bytes::Bytes;
use tandem_proto::runtime::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as RequestType;
use tandem_proto::runtime::subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as ResponseType;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tandem_proto::runtime::{
    BulkPublishRequest, BulkPublishResponse, BulkPublishResponseFailedEntry, PublishEventRequest, RegisteredComponents,
    TopicEventRequest,
};
use tandem_proto::runtime::{SubscribeTopicEventsRequestAlpha1, SubscribeTopicEventsResponseAlpha1};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tonic::Streaming;

use super::error::ApiError;
use crate::pubsub::{PubSub, PubSubs, raw};
use tandem_proto::prost_types;

/// The CloudEvent `type` of events published through the API (Dapr's).
pub const EVENT_TYPE: &str = "com.dapr.event.sent";

pub struct PubSubApi {
    app_id: String,
    pubsubs: PubSubs,
    max_event_bytes: usize,
    streams: Arc<StreamSubscriptions>,
}

/// The events of a streaming subscription, as tonic sends them.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<SubscribeTopicEventsResponseAlpha1, Status>> + Send>>;

impl PubSubApi {
    pub fn new(app_id: String, pubsubs: PubSubs, max_event_bytes: usize, streams: Arc<StreamSubscriptions>) -> Self {
        PubSubApi { app_id, pubsubs, max_event_bytes, streams }
    }

    /// `SubscribeTopicEventsAlpha1`: the first message names the subscription; events then flow
    /// to the app and its answers back, until either side closes the stream.
    pub async fn subscribe(
        &self,
        mut incoming: Streaming<SubscribeTopicEventsRequestAlpha1>,
    ) -> Result<EventStream, Status> {
        let first = incoming
            .message()
            .await?
            .and_then(|m| m.subscribe_topic_events_request_type)
            .ok_or_else(|| Status::invalid_argument("the stream's first message must be the initial request"))?;
        let RequestType::InitialRequest(initial) = first else {
            return Err(Status::invalid_argument(
                "the stream's first message must be the initial request, not an answer",
            ));
        };
        self.target(&initial.pubsub_name, &initial.topic).map_err(Status::from)?;
        let ordered = initial
            .metadata
            .get(tandem_proto::SUBSCRIPTION_ORDERED)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let dead_letter_topic = initial.dead_letter_topic.unwrap_or_default();
        let (handle, events) = self
            .streams
            .open(&initial.pubsub_name, &initial.topic, &dead_letter_topic, ordered)
            .await
            .map_err(Status::unavailable)?;
        tracing::info!(pubsub = %initial.pubsub_name, topic = %initial.topic, "streaming subscription opened");
        // The app's answers: read until the app closes its side; the handle (and with it the
        // stream's registration) goes when both directions are done.
        let handle = Arc::new(handle);
        let answers = handle.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = incoming.message().await {
                if let Some(RequestType::EventProcessed(processed)) = message.subscribe_topic_events_request_type {
                    let status = processed
                        .status
                        .and_then(|s| TopicEventResponseStatus::try_from(s.status).ok())
                        .unwrap_or(TopicEventResponseStatus::Retry);
                    answers.answer(&processed.id, status);
                }
            }
        });
        let initial = SubscribeTopicEventsResponseAlpha1 {
            subscribe_topic_events_response_type: Some(ResponseType::InitialResponse(Default::default())),
        };
        let events = ReceiverStream::new(events).map(move |event| {
            // Holding the handle here keeps the stream registered while the app can still receive.
            let _open = &handle;
            Ok(SubscribeTopicEventsResponseAlpha1 {
                subscribe_topic_events_response_type: Some(ResponseType::EventMessage(event)),
            })
        });
        Ok(Box::pin(tokio_stream::once(Ok(initial)).chain(events)))
    }

    pub fn registered_components(&self) -> Vec<RegisteredComponents> {
        self.pubsubs
            .iter()
            .map(|(name, pubsub)| RegisteredComponents {
                name: name.clone(),
                r#type: pubsub.kind().into(),
                version: "v1".into(),
                capabilities: Vec::new(),
            })
            .collect()
    }

    pub async fn publish_event(&self, request: PublishEventRequest) -> Result<(), ApiError> {
        let pubsub = self.target(&request.pubsub_name, &request.topic)?;
        let raw = raw::requested(&request.metadata)
            .map_err(|e| {
                ApiError::pubsub_metadata(&request.pubsub_name, format!("publish to topic '{}': {e}", request.topic))
            })?
            .unwrap_or(false);
        self.check_size(&request.topic, request.data.len())
            .map_err(|e| ApiError::too_large("ERR_PUBSUB_PUBLISH_MESSAGE", e))?;
        let event = self.event(&request.pubsub_name, &request.topic, request.data, request.data_content_type, raw)?;
        pubsub.publish(event).await.map_err(|e| ApiError::publish(&request.pubsub_name, &request.topic, e))
    }

    /// BulkPublishEvent (and its Alpha1 name): the request is checked as a whole like
    /// PublishEvent, plus its entry ids and `rawPayload` values; each entry is then published
    /// as its own CloudEvent, or raw where the request's metadata asks for it (an entry's own
    /// `rawPayload` overrides the request's). Entries that are too large or cannot be stored
    /// are listed in the answer, with why.
    pub async fn bulk_publish_event(&self, request: BulkPublishRequest) -> Result<BulkPublishResponse, ApiError> {
        let pubsub = self.target(&request.pubsub_name, &request.topic)?;
        let raw_all = raw::requested(&request.metadata)
            .map_err(|e| {
                ApiError::pubsub_metadata(
                    &request.pubsub_name,
                    format!("bulk publish to topic '{}': {e}", request.topic),
                )
            })?
            .unwrap_or(false);
        let mut raw_entries = Vec::with_capacity(request.entries.len());
        let mut ids = HashSet::with_capacity(request.entries.len());
        for (index, entry) in request.entries.iter().enumerate() {
            if entry.entry_id.is_empty() {
                return Err(ApiError::pubsub_events(
                    &request.pubsub_name,
                    format!(
                        "entry {index} of the bulk publish to topic '{}' has an empty entry_id; every entry needs one",
                        request.topic
                    ),
                ));
            }
            if !ids.insert(entry.entry_id.as_str()) {
                return Err(ApiError::pubsub_events(
                    &request.pubsub_name,
                    format!(
                        "entry_id '{}' appears more than once in the bulk publish to topic '{}'; entry ids must be unique",
                        entry.entry_id, request.topic
                    ),
                ));
            }
            let raw = raw::requested(&entry.metadata).map_err(|e| {
                ApiError::pubsub_metadata(
                    &request.pubsub_name,
                    format!("entry '{}' of the bulk publish to topic '{}': {e}", entry.entry_id, request.topic),
                )
            })?;
            raw_entries.push(raw.unwrap_or(raw_all));
        }
        // (position in the request, entry id, why it failed), sorted back into request order.
        let mut failed = Vec::new();
        let mut accepted = Vec::with_capacity(request.entries.len());
        let mut events = Vec::with_capacity(request.entries.len());
        for ((index, entry), raw) in request.entries.into_iter().enumerate().zip(raw_entries) {
            if let Err(error) = self.check_size(&request.topic, entry.event.len()) {
                failed.push((index, entry.entry_id, error));
                continue;
            }
            match self.event(&request.pubsub_name, &request.topic, entry.event, entry.content_type, raw) {
                Ok(event) => events.push(event),
                Err(error) => {
                    failed.push((index, entry.entry_id, error.message));
                    continue;
                }
            }
            accepted.push((index, entry.entry_id));
        }
        let outcomes = pubsub.publish_all(events).await;
        for ((index, entry_id), outcome) in accepted.into_iter().zip(outcomes) {
            if let Err(e) = outcome {
                failed.push((index, entry_id, e.to_string()));
            }
        }
        failed.sort_by_key(|(index, ..)| *index);
        if !failed.is_empty() {
            tracing::warn!(pubsub = %request.pubsub_name, topic = %request.topic, failed = failed.len(), first_error = %failed[0].2, "bulk publish: some entries failed");
        }
        let failed_entries =
            failed.into_iter().map(|(_, entry_id, error)| BulkPublishResponseFailedEntry { entry_id, error }).collect();
        Ok(BulkPublishResponse { failed_entries })
    }

    /// The component `pubsub_name`, for a sender of its own (the transactional outbox).
    pub fn component(&self, pubsub_name: &str) -> Option<Arc<dyn PubSub>> {
        self.pubsubs.get(pubsub_name).cloned()
    }

    /// The CloudEvent the transactional outbox publishes for one upsert of a transaction, as
    /// Dapr builds it: id `outbox-{uuid}`, this app as the source, `data` with the operation's
    /// `contentType`, and the operation's other metadata as extension attributes.
    pub fn outbox_event(
        &self,
        pubsub_name: &str,
        topic: &str,
        data: Vec<u8>,
        metadata: &std::collections::HashMap<String, String>,
    ) -> Result<TopicEventRequest, ApiError> {
        self.target(pubsub_name, topic)?;
        self.check_size(topic, data.len()).map_err(|e| ApiError::too_large("ERR_STATE_TRANSACTION", e))?;
        let content_type = metadata.get("contentType").cloned().unwrap_or_default();
        let mut event = self.cloud_event(pubsub_name, topic, Bytes::from(data), content_type);
        event.id = format!("outbox-{}", uuid::Uuid::new_v4());
        let fields = &mut event.extensions.get_or_insert_with(Default::default).fields;
        for (key, value) in metadata {
            if !matches!(key.as_str(), "data" | "id" | "contentType" | super::outbox::PROJECTION) {
                fields.insert(
                    key.clone(),
                    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(value.clone())) },
                );
            }
        }
        Ok(event)
    }

    /// The component a publish names, once the pub/sub and topic are known to be valid.
    fn target(&self, pubsub_name: &str, topic: &str) -> Result<&Arc<dyn PubSub>, ApiError> {
        if pubsub_name.is_empty() {
            return Err(ApiError::pubsub_name_empty());
        }
        let pubsub = self.pubsubs.get(pubsub_name).ok_or_else(|| {
            let names = self.pubsubs.keys().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
            ApiError::pubsub_not_found(pubsub_name, &names)
        })?;
        if topic.is_empty() {
            return Err(ApiError::topic_empty(pubsub_name));
        }
        Ok(pubsub)
    }

    /// Why an event of `bytes` bytes cannot be published, if it is over --max-body-size.
    fn check_size(&self, topic: &str, bytes: usize) -> Result<(), String> {
        if bytes > self.max_event_bytes {
            return Err(format!(
                "the event for topic '{topic}' is {bytes} bytes, over the limit of {} bytes (--max-body-size)",
                self.max_event_bytes
            ));
        }
        Ok(())
    }

    /// A new event (with a new id) carrying `data`: a CloudEvent sent by this app, or with
    /// `raw`, the bare payload (see [`raw`]).
    fn event(
        &self,
        pubsub_name: &str,
        topic: &str,
        data: impl Into<Bytes>,
        content_type: String,
        raw: bool,
    ) -> Result<TopicEventRequest, ApiError> {
        let data = data.into();
        if !raw && is_cloud_event(&content_type) {
            return self.given_cloud_event(pubsub_name, topic, &data);
        }
        if !raw {
            return Ok(self.cloud_event(pubsub_name, topic, data, content_type));
        }
        raw::check_content_type(&content_type)
            .map_err(|e| ApiError::pubsub_metadata(pubsub_name, format!("publish to topic '{topic}': {e}")))?;
        Ok(raw::event(uuid::Uuid::new_v4().to_string(), pubsub_name, topic, data, &content_type))
    }

    /// A payload that is a CloudEvent already (`application/cloudevents+json`) is the event, as in
    /// Dapr: `topic`, `pubsubname` and the trace attributes are set, `source` (`Dapr`), `type`,
    /// `specversion` and `time` filled when absent, everything else kept (other attributes
    /// travel as extensions). Unlike Dapr, an event without an `id` gets one: deliveries are
    /// settled by id.
    fn given_cloud_event(&self, pubsub_name: &str, topic: &str, payload: &[u8]) -> Result<TopicEventRequest, ApiError> {
        let mut envelope = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(serde_json::Value::Object(envelope)) => envelope,
            Ok(_) => {
                return Err(ApiError::cloud_event(
                    &self.app_id,
                    pubsub_name,
                    "cannot create cloudevent: the payload is not a JSON object",
                ));
            }
            Err(e) => {
                return Err(ApiError::cloud_event(
                    &self.app_id,
                    pubsub_name,
                    format!("cannot create cloudevent: the payload is not JSON: {e}"),
                ));
            }
        };
        let mut take = |key: &str| match envelope.remove(key) {
            Some(serde_json::Value::String(text)) => Some(text),
            Some(serde_json::Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        };
        let id = take("id").unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let source = take("source").unwrap_or_else(|| "Dapr".into());
        let r#type = take("type").unwrap_or_else(|| EVENT_TYPE.into());
        let spec_version = take("specversion").unwrap_or_else(|| "1.0".into());
        let declared_type = take("datacontenttype");
        envelope.remove("topic");
        envelope.remove("pubsubname");
        let (data, data_content_type) = match (envelope.remove("data_base64"), envelope.remove("data")) {
            (Some(serde_json::Value::String(encoded)), _) => {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|e| {
                    ApiError::cloud_event(
                        &self.app_id,
                        pubsub_name,
                        format!("cannot create cloudevent: data_base64 is not base64: {e}"),
                    )
                })?;
                (bytes, declared_type.unwrap_or_else(|| "application/octet-stream".into()))
            }
            (_, Some(serde_json::Value::String(text))) if !declared_type.as_deref().is_some_and(is_json) => {
                (text.into_bytes(), declared_type.unwrap_or_else(|| "text/plain".into()))
            }
            (_, Some(value)) => (
                serde_json::to_vec(&value).expect("a JSON value always encodes"),
                declared_type.unwrap_or_else(|| "application/json".into()),
            ),
            (_, None) => (Vec::new(), declared_type.unwrap_or_default()),
        };
        let mut event = self.cloud_event(pubsub_name, topic, Bytes::from(data), data_content_type);
        event.id = id;
        event.source = source;
        event.r#type = r#type;
        event.spec_version = spec_version;
        let fields = &mut event.extensions.get_or_insert_with(Default::default).fields;
        let given_time = envelope.remove("time");
        for (key, value) in envelope {
            // The trace attributes are this publish's, whatever the payload said.
            if !matches!(key.as_str(), "traceid" | "traceparent" | "tracestate") {
                fields.insert(key, json_to_value(value));
            }
        }
        if let Some(time) = given_time {
            fields.insert("time".into(), json_to_value(time));
        }
        Ok(event)
    }

    /// A new CloudEvent (with a new id) carrying `data`, sent by this app.
    fn cloud_event(&self, pubsub_name: &str, topic: &str, data: Bytes, content_type: String) -> TopicEventRequest {
        let data_content_type =
            if content_type.is_empty() { default_content_type(&data).to_string() } else { content_type };
        // The publish call's span is the parent of every delivery of the event (as Dapr does).
        let mut extensions = None;
        crate::telemetry::context::inject_extensions(&crate::telemetry::current(), &mut extensions);
        // Every attribute Dapr's envelope has: the trace ones empty without a span (as in Dapr),
        // and the publish time.
        let fields = &mut extensions.get_or_insert_with(Default::default).fields;
        let text = |s: String| prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(s)) };
        for key in ["traceid", "traceparent", "tracestate"] {
            fields.entry(key.to_string()).or_insert_with(|| text(String::new()));
        }
        fields.insert("time".into(), text(super::state::rfc3339(std::time::SystemTime::now())));
        TopicEventRequest {
            id: uuid::Uuid::new_v4().to_string(),
            source: self.app_id.clone(),
            r#type: EVENT_TYPE.into(),
            spec_version: "1.0".into(),
            data_content_type,
            topic: topic.to_string(),
            data,
            pubsub_name: pubsub_name.to_string(),
            path: String::new(),
            extensions,
        }
    }
}

/// Whether `content_type` says the payload is a CloudEvent in JSON.
fn is_cloud_event(content_type: &str) -> bool {
    content_type.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/cloudevents+json")
}

/// Whether `content_type` is JSON (`application/json` or `*/*+json`).
fn is_json(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    base == "application/json" || base.ends_with("+json")
}

/// A JSON value as a protobuf `Value` (for CloudEvent extensions).
fn json_to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.into_iter().map(json_to_value).collect() })
        }
        serde_json::Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map.into_iter().map(|(k, v)| (k, json_to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Without a content type: JSON when the payload parses as JSON, bytes otherwise.
fn default_content_type(data: &[u8]) -> &'static str {
    if serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok() {
        "application/json"
    } else {
        "application/octet-stream"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_content_type_defaults_by_payload() {
        assert_eq!(default_content_type(br#"{"a":1}"#), "application/json");
        assert_eq!(default_content_type(b"[1,2]"), "application/json");
        assert_eq!(default_content_type(&[0xff, 0x00]), "application/octet-stream");
        assert_eq!(default_content_type(b""), "application/octet-stream");
    }
}
