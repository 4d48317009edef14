//! The receiving side: `tandem.internal.v1.Mesh` served on the internal port, delivering each
//! call to the app this sidecar fronts.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, Stream};
use tandem_proto::common::InvokeRequest;
use tandem_proto::common::http_extension::Verb;
use tandem_proto::internal::mesh_server::Mesh;
use tandem_proto::internal::{
    AnsweredEvent, DeliverEventRequest, DeliverEventResponse, DeliverEventsRequest, DeliverEventsResponse,
    EventDelivery, EventDeliveryOutcome, InternalInvokeRequest, InternalInvokeResponse,
};
use tandem_proto::runtime::{TopicEventRequest, TopicEventResponse};
use tandem_transport::{PeerIdentity, SpiffeId};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::channels::never_sent;
use super::headers::{self, CALLEE_APP_ID, CALLER_APP_ID};
use super::within_deadline;
use crate::acl::AccessControl;
use crate::app_channel::AppChannel;
use crate::deadline;
use crate::error::MeshError;
use crate::pubsub::streams::{Handover, StreamSubscriptions};
use crate::telemetry;

/// The method whose server span each event of a batched delivery gets, so that a trace looks
/// the same whether its event travelled alone or in a batch (the batch has no span of its own:
/// [`telemetry::layer::PER_ITEM_SPANS`]).
const DELIVER_EVENT_PATH: &str = "/tandem.internal.v1.Mesh/DeliverEvent";

#[derive(Clone)]
pub struct MeshInbound {
    app_id: String,
    app: Option<AppChannel>,
    streams: Arc<StreamSubscriptions>,
    /// Who may invoke what (`--config`); `None`: everyone everything.
    access: Option<Arc<AccessControl>>,
}

/// The answers of a `StreamDeliverEvents` call, each sent once the app has given it.
pub type AnsweredEvents = Pin<Box<dyn Stream<Item = Result<AnsweredEvent, Status>> + Send>>;

/// How long an event waits for the app's answer on a subscription stream without a deadline.
const STREAM_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl MeshInbound {
    pub fn new(
        app_id: String,
        app: Option<AppChannel>,
        streams: Arc<StreamSubscriptions>,
        access: Option<Arc<AccessControl>>,
    ) -> Self {
        MeshInbound { app_id, app, streams, access }
    }

    /// Refuses the call when access control does not allow `caller` the operation.
    fn check_access(&self, caller: Option<&SpiffeId>, message: &InvokeRequest) -> Result<(), MeshError> {
        let Some(access) = &self.access else { return Ok(()) };
        let verb = message.http_extension.as_ref().map(|extension| extension.verb()).filter(|verb| *verb != Verb::None);
        access.check(caller, &message.method, verb.map(|verb| verb.as_str_name())).map_err(|denied| {
            tracing::warn!(app_id = %self.app_id, %denied, "refused an invocation");
            MeshError::AccessDenied(denied.to_string())
        })
    }

    /// The app this sidecar fronts, when `target` names it and it can be called.
    fn local_app(&self, target: String) -> Result<&AppChannel, MeshError> {
        self.check_target(target)?;
        self.app()
    }

    fn app(&self) -> Result<&AppChannel, MeshError> {
        self.app.as_ref().ok_or_else(|| MeshError::AppHasNoPort { app_id: self.app_id.clone() })
    }

    /// A failed call to the app: never sent means it is not listening (and the caller may try
    /// another instance); anything else is the app's own answer.
    fn app_failure(&self, app: &AppChannel, status: Status) -> MeshError {
        if never_sent(&status) {
            MeshError::AppNotListening {
                app_id: self.app_id.clone(),
                address: app.address().to_string(),
                reason: status.message().to_string(),
            }
        } else {
            MeshError::Remote(status)
        }
    }

    async fn deliver(&self, request: Request<InternalInvokeRequest>) -> Result<InternalInvokeResponse, MeshError> {
        let deadline = deadline::from_metadata(request.metadata()).map_err(MeshError::InvalidArgument)?;
        // Under mutual TLS the caller is who its certificate says, whatever the call claims.
        let verified_caller = request.extensions().get::<PeerIdentity>().map(|PeerIdentity(peer)| peer.clone());
        let call = request.into_inner();
        let caller_app_id = verified_caller.as_ref().map_or(call.caller_app_id, |peer| peer.app_id.clone());
        let app = self.local_app(call.target_app_id)?;
        let message =
            call.message.ok_or_else(|| MeshError::InvalidArgument("the invocation carries no message".into()))?;
        self.check_access(verified_caller.as_deref(), &message)?;
        let method = message.method.clone();

        let mut app_request = Request::new(message);
        headers::apply(&call.metadata, app_request.metadata_mut());
        let caller = MetadataValue::try_from(caller_app_id.as_str()).map_err(|_| {
            MeshError::InvalidArgument(format!("caller app-id '{caller_app_id}' is not valid metadata"))
        })?;
        app_request.metadata_mut().insert(CALLER_APP_ID, caller);
        if let Ok(callee) = MetadataValue::try_from(self.app_id.as_str()) {
            app_request.metadata_mut().insert(CALLEE_APP_ID, callee);
        }
        if let Some(deadline) = deadline {
            app_request.set_timeout(deadline::remaining(deadline));
        }
        // The app continues the trace from this sidecar's span.
        crate::telemetry::inject_current(app_request.metadata_mut());

        let describe = || (self.app_id.clone(), method.clone());
        let result = within_deadline(deadline, describe, Box::pin(app.invoke(app_request))).await?;
        match result {
            Ok(answer) => Ok(InternalInvokeResponse {
                message: Some(answer.message),
                metadata: answer.metadata,
                http_status: answer.http_status.map_or(0, u32::from),
            }),
            Err(status) => Err(self.app_failure(app, status)),
        }
    }

    /// Hands a pub/sub event to the app's `OnTopicEvent`; the app's answer goes back as is.
    async fn deliver_event(&self, request: Request<DeliverEventRequest>) -> Result<DeliverEventResponse, MeshError> {
        let deadline = deadline::from_metadata(request.metadata()).map_err(MeshError::InvalidArgument)?;
        let call = request.into_inner();
        self.check_target(call.target_app_id)?;
        let event = call.event.ok_or_else(|| MeshError::InvalidArgument("the delivery carries no event".into()))?;
        let response = self.event_to_app(event, deadline).await?;
        Ok(DeliverEventResponse { response: Some(response) })
    }

    /// Hands each event of a batch to the app, all at once; one outcome per event, in order.
    async fn deliver_events(&self, request: Request<DeliverEventsRequest>) -> Result<DeliverEventsResponse, MeshError> {
        let deadline = deadline::from_metadata(request.metadata()).map_err(MeshError::InvalidArgument)?;
        let call = request.into_inner();
        self.check_target(call.target_app_id)?;
        let answers = call.deliveries.into_iter().map(|delivery| self.answer(delivery, deadline));
        Ok(DeliverEventsResponse { outcomes: futures_util::future::join_all(answers).await })
    }

    /// Hands each event of a batch to the app, all at once, and sends each outcome as soon as
    /// the app has given it, so that a slow event holds back no other.
    async fn stream_deliver_events(&self, request: Request<DeliverEventsRequest>) -> Result<AnsweredEvents, MeshError> {
        let deadline = deadline::from_metadata(request.metadata()).map_err(MeshError::InvalidArgument)?;
        let call = request.into_inner();
        self.check_target(call.target_app_id)?;
        let inbound = Arc::new(self.clone());
        let answers: FuturesUnordered<_> = call
            .deliveries
            .into_iter()
            .enumerate()
            .map(|(index, delivery)| {
                let inbound = inbound.clone();
                async move {
                    let outcome = inbound.answer(delivery, deadline).await;
                    Ok(AnsweredEvent { index: index as u32, outcome: Some(outcome) })
                }
            })
            .collect();
        Ok(Box::pin(answers))
    }

    /// One event of a batch to the app, in a span of its own (child of its delivery attempt,
    /// as for `DeliverEvent`), so that a trace looks the same whether it travelled alone or not.
    async fn answer(&self, delivery: EventDelivery, deadline: Option<Instant>) -> EventDeliveryOutcome {
        let parent = telemetry::context::from_fields(&delivery.traceparent, &delivery.tracestate);
        let span = telemetry::layer::server_span(DELIVER_EVENT_PATH, parent);
        let answer = async move {
            let event = delivery
                .event
                .ok_or_else(|| MeshError::InvalidArgument("a delivery of the batch carries no event".into()))?;
            Box::pin(self.event_to_app(event, deadline)).await
        };
        let answer = answer.instrument(span.clone()).await;
        if answer.is_err() {
            telemetry::record_error(&span);
        }
        outcome(answer)
    }

    fn check_target(&self, target: String) -> Result<(), MeshError> {
        if target != self.app_id {
            return Err(MeshError::WrongApp { local: self.app_id.clone(), requested: target });
        }
        Ok(())
    }

    /// One event to the app: a streaming subscription of the app takes it before
    /// `OnTopicEvent` would, which takes only the topics the app lists (others wait for a stream).
    async fn event_to_app(
        &self,
        event: TopicEventRequest,
        deadline: Option<std::time::Instant>,
    ) -> Result<TopicEventResponse, MeshError> {
        let wait = deadline.map(deadline::remaining).unwrap_or(STREAM_ANSWER_TIMEOUT);
        let event = match self.streams.deliver(event, wait).await {
            Handover::Answered(Ok(status)) => return Ok(TopicEventResponse { status: status as i32 }),
            Handover::Answered(Err(reason)) => return Err(MeshError::Remote(Status::unavailable(reason))),
            Handover::Waits(reason) => return Err(MeshError::NoStreamOpen { reason }),
            Handover::ToApp(event) => event,
        };
        let app = self.app()?;
        let topic = event.topic.clone();
        let mut app_request = Request::new(event);
        if let Some(deadline) = deadline {
            app_request.set_timeout(deadline::remaining(deadline));
        }
        // The hop's parent in the metadata; the event's extensions keep the publisher's.
        crate::telemetry::inject_current(app_request.metadata_mut());
        let describe = || (self.app_id.clone(), format!("OnTopicEvent({topic})"));
        let result = within_deadline(deadline, describe, Box::pin(app.topic_event(app_request))).await?;
        match result {
            Ok(response) => Ok(response),
            Err(status) => Err(self.app_failure(app, status)),
        }
    }
}

/// A batched event's outcome, as `DeliverEvent` would have answered it.
fn outcome(answer: Result<TopicEventResponse, MeshError>) -> EventDeliveryOutcome {
    match answer {
        Ok(response) => EventDeliveryOutcome { response: Some(response), ..Default::default() },
        Err(error) => {
            let not_delivered = error.is_not_delivered();
            let status = Status::from(error);
            EventDeliveryOutcome {
                response: None,
                code: status.code() as i32,
                message: status.message().to_string(),
                not_delivered,
            }
        }
    }
}

#[tonic::async_trait]
impl Mesh for MeshInbound {
    async fn deliver_event(
        &self,
        request: Request<DeliverEventRequest>,
    ) -> Result<Response<DeliverEventResponse>, Status> {
        MeshInbound::deliver_event(self, request).await.map(Response::new).map_err(Status::from)
    }

    async fn deliver_events(
        &self,
        request: Request<DeliverEventsRequest>,
    ) -> Result<Response<DeliverEventsResponse>, Status> {
        MeshInbound::deliver_events(self, request).await.map(Response::new).map_err(Status::from)
    }

    type StreamDeliverEventsStream = AnsweredEvents;

    async fn stream_deliver_events(
        &self,
        request: Request<DeliverEventsRequest>,
    ) -> Result<Response<AnsweredEvents>, Status> {
        MeshInbound::stream_deliver_events(self, request).await.map(Response::new).map_err(Status::from)
    }

    async fn invoke(
        &self,
        request: Request<InternalInvokeRequest>,
    ) -> Result<Response<InternalInvokeResponse>, Status> {
        self.deliver(request).await.map(Response::new).map_err(Status::from)
    }
}
