//! Delivery to the app behind this sidecar, for components whose events are consumed on the
//! subscriber's side (`pubsub.jetstream`): an open streaming subscription of the topic takes an
//! event first, as in the mesh's inbound delivery; otherwise the app's `OnTopicEvent`, if the
//! app lists the topic (else the event waits for a stream).

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::runtime::TopicEventRequest;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;

use super::delivery::DeliveryError;
use super::streams::{Handover, StreamSubscriptions};
use crate::app_channel::AppChannel;
use crate::invoke::channels::never_sent;
use crate::readiness::Readiness;

pub struct LocalApp {
    pub app_id: String,
    pub app: Option<AppChannel>,
    pub streams: Arc<StreamSubscriptions>,
    pub readiness: Arc<Readiness>,
}

impl LocalApp {
    /// Whether an event of `topic` could be handed over now: a stream of it is open, or the app
    /// lists the topic and passes its health check. While not, consumers wait rather than use
    /// up attempts.
    pub fn can_take(&self, pubsub: &str, topic: &str) -> bool {
        self.streams.has_stream(pubsub, topic)
            || (self.app.is_some() && self.readiness.app_is_healthy() && self.streams.is_listed(pubsub, topic))
    }

    /// The app's answer to `event`, or why there was none.
    pub async fn deliver(
        &self,
        event: TopicEventRequest,
        timeout: Duration,
    ) -> Result<TopicEventResponseStatus, DeliveryError> {
        let event = match self.streams.deliver(event, timeout).await {
            Handover::Answered(answer) => return answer.map_err(DeliveryError::SubscriberAway),
            Handover::Waits(reason) => return Err(DeliveryError::SubscriberAway(reason)),
            Handover::ToApp(event) => event,
        };
        let Some(app) = &self.app else {
            return Err(DeliveryError::SubscriberAway(format!(
                "app-id '{}' has no app port and no streaming subscription to topic '{}' is open",
                self.app_id, event.topic
            )));
        };
        let mut request = tonic::Request::new(event);
        request.set_timeout(timeout);
        // The hop's parent in the metadata; the event's extensions keep the publisher's.
        crate::telemetry::inject_current(request.metadata_mut());
        match tokio::time::timeout(timeout, app.topic_event(request)).await {
            Err(_) => Err(DeliveryError::Failed(format!("no answer from the app within {timeout:?}"))),
            Ok(Ok(response)) => {
                let status = response.status;
                TopicEventResponseStatus::try_from(status)
                    .map_err(|_| DeliveryError::Failed(format!("the app answered an unknown event status {status}")))
            }
            Ok(Err(status)) if never_sent(&status) => Err(DeliveryError::SubscriberAway(format!(
                "the app is not listening on {}: {}",
                app.address(),
                status.message()
            ))),
            Ok(Err(status)) => {
                Err(DeliveryError::Failed(format!("delivering to the app: {:?}: {}", status.code(), status.message())))
            }
        }
    }
}
