//! Streaming subscriptions (Dapr's `SubscribeTopicEventsAlpha1`): the app opens a stream to its
//! sidecar, reads a topic's events from it and answers each on the same stream, instead of
//! serving `OnTopicEvent`. Useful for apps that serve no callback API, and cheaper per event:
//! events and answers are messages of one long-lived HTTP/2 stream rather than a call each.

use std::collections::HashMap;

use tandem_proto::runtime::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as RequestType;
use tandem_proto::runtime::subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as ResponseType;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tandem_proto::runtime::{
    SubscribeTopicEventsRequestAlpha1, SubscribeTopicEventsRequestInitialAlpha1,
    SubscribeTopicEventsRequestProcessedAlpha1, SubscribeTopicEventsResponseAlpha1, TopicEventResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Status, Streaming};

use crate::{EventOutcome, SidecarClient, SubscriptionOptions, TopicEvent};

/// An open streaming subscription: [`EventStream::next`] gives its events, and each needs an
/// answer ([`EventStream::answer`]); an event not answered before the sidecar's delivery timeout
/// is delivered again. Dropping it closes the stream; the subscription stays recorded, so events
/// published meanwhile wait for the next stream or subscriber of this app.
pub struct EventStream {
    events: Streaming<SubscribeTopicEventsResponseAlpha1>,
    answers: StreamAnswers,
}

/// Answers events of an [`EventStream`] from anywhere (cheap to clone), for apps that handle
/// events on tasks of their own.
#[derive(Debug, Clone)]
pub struct StreamAnswers {
    // Unbounded, yet bounded in practice: the app cannot answer more events than it received,
    // and the sidecar has at most its delivery window of them in flight.
    sender: mpsc::UnboundedSender<SubscribeTopicEventsRequestAlpha1>,
}

impl SidecarClient {
    /// Subscribes to `topic` of pub/sub component `pubsub` over a stream. Returns once the
    /// sidecar has recorded the subscription in etcd, where publishers' sidecars find it (their
    /// routing follows etcd within moments); from then on events of the topic are kept for this
    /// app, also while no stream of it is open. `options.route` must be empty: a stream receives
    /// all of its topic's events.
    pub async fn subscribe(
        &self,
        pubsub: &str,
        topic: &str,
        options: &SubscriptionOptions,
    ) -> Result<EventStream, Status> {
        if !options.route.is_empty() {
            return Err(Status::invalid_argument(format!(
                "a streaming subscription to topic '{topic}' has no route (got '{}'); subscribe through AppServer for routes",
                options.route
            )));
        }
        let metadata = if options.ordered {
            HashMap::from([(tandem_proto::SUBSCRIPTION_ORDERED.to_string(), "true".to_string())])
        } else {
            HashMap::new()
        };
        let (sender, outgoing) = mpsc::unbounded_channel();
        let initial = SubscribeTopicEventsRequestInitialAlpha1 {
            pubsub_name: pubsub.into(),
            topic: topic.into(),
            metadata,
            dead_letter_topic: (!options.dead_letter_topic.is_empty()).then(|| options.dead_letter_topic.clone()),
        };
        // The receiver is alive: it is moved into the call below.
        let _ = sender.send(SubscribeTopicEventsRequestAlpha1 {
            subscribe_topic_events_request_type: Some(RequestType::InitialRequest(initial)),
        });
        let mut events = self
            .inner
            .clone()
            .subscribe_topic_events_alpha1(UnboundedReceiverStream::new(outgoing))
            .await?
            .into_inner();
        match events.message().await? {
            Some(SubscribeTopicEventsResponseAlpha1 {
                subscribe_topic_events_response_type: Some(ResponseType::InitialResponse(_)),
            }) => Ok(EventStream { events, answers: StreamAnswers { sender } }),
            Some(_) => Err(Status::internal("the sidecar sent an event before confirming the subscription")),
            None => Err(Status::unavailable("the sidecar closed the subscription stream before confirming it")),
        }
    }
}

impl EventStream {
    /// The next event; `None` once the sidecar has closed the stream.
    pub async fn next(&mut self) -> Result<Option<TopicEvent>, Status> {
        while let Some(message) = self.events.message().await? {
            if let Some(ResponseType::EventMessage(event)) = message.subscribe_topic_events_response_type {
                return Ok(Some(TopicEvent::from(event)));
            }
        }
        Ok(None)
    }

    /// Answers event `id` (a [`TopicEvent::id`] from this stream).
    pub fn answer(&self, id: &str, outcome: EventOutcome) -> Result<(), Status> {
        self.answers.answer(id, outcome)
    }

    /// A handle that answers this stream's events from other tasks.
    pub fn answers(&self) -> StreamAnswers {
        self.answers.clone()
    }
}

impl StreamAnswers {
    /// Answers event `id`; fails once the stream is closed.
    pub fn answer(&self, id: &str, outcome: EventOutcome) -> Result<(), Status> {
        let processed = SubscribeTopicEventsRequestProcessedAlpha1 {
            id: id.to_string(),
            status: Some(TopicEventResponse { status: TopicEventResponseStatus::from(outcome) as i32 }),
        };
        self.sender
            .send(SubscribeTopicEventsRequestAlpha1 {
                subscribe_topic_events_request_type: Some(RequestType::EventProcessed(processed)),
            })
            .map_err(|_| {
                Status::unavailable(format!("the subscription stream is closed; event '{id}' was not answered"))
            })
    }
}
