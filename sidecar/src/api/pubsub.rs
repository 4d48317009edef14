//! Dapr's PublishEvent on top of the pub/sub components: validation, and the CloudEvent 1.0
//! attributes the subscriber receives.

use tandem_proto::runtime::{PublishEventRequest, RegisteredComponents, TopicEventRequest};
use tonic::Status;

use crate::pubsub::{EMBEDDED, PubSubs};

/// The CloudEvent `type` of events published through the API (Dapr's).
pub const EVENT_TYPE: &str = "com.dapr.event.sent";

pub struct PubSubApi {
    app_id: String,
    pubsubs: PubSubs,
    max_event_bytes: usize,
}

impl PubSubApi {
    pub fn new(app_id: String, pubsubs: PubSubs, max_event_bytes: usize) -> Self {
        PubSubApi { app_id, pubsubs, max_event_bytes }
    }

    pub fn registered_components(&self) -> Vec<RegisteredComponents> {
        self.pubsubs
            .keys()
            .map(|name| RegisteredComponents {
                name: name.clone(),
                r#type: EMBEDDED.into(),
                version: "v1".into(),
                capabilities: Vec::new(),
            })
            .collect()
    }

    pub async fn publish_event(&self, request: PublishEventRequest) -> Result<(), Status> {
        let names = || self.pubsubs.keys().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
        let pubsub = self.pubsubs.get(&request.pubsub_name).ok_or_else(|| {
            Status::invalid_argument(format!(
                "pub/sub '{}' is not found; pub/subs here: {}",
                request.pubsub_name,
                names()
            ))
        })?;
        if request.topic.is_empty() {
            return Err(Status::invalid_argument(format!("the topic is empty (pub/sub '{}')", request.pubsub_name)));
        }
        if request.data.len() > self.max_event_bytes {
            return Err(Status::resource_exhausted(format!(
                "the event for topic '{}' is {} bytes, over the limit of {} bytes (--max-body-size)",
                request.topic,
                request.data.len(),
                self.max_event_bytes
            )));
        }
        let data_content_type = if request.data_content_type.is_empty() {
            default_content_type(&request.data).to_string()
        } else {
            request.data_content_type
        };
        let event = TopicEventRequest {
            id: uuid::Uuid::new_v4().to_string(),
            source: self.app_id.clone(),
            r#type: EVENT_TYPE.into(),
            spec_version: "1.0".into(),
            data_content_type,
            topic: request.topic,
            data: request.data,
            pubsub_name: request.pubsub_name,
            path: String::new(),
            extensions: None,
        };
        pubsub.publish(event).await.map(|_| ()).map_err(Status::from)
    }
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
