//! The calling side: pick a live instance of the target app, send the call to its sidecar,
//! and try another instance only when the call provably never reached an app.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tandem_proto::common::{InvokeRequest, InvokeResponse};

use tandem_proto::internal::mesh_client::MeshClient;
use tandem_proto::internal::{
    AnsweredEvent, DeliverEventRequest, DeliverEventsRequest, EventDelivery, EventDeliveryOutcome,
    InternalInvokeRequest,
};
use tandem_proto::runtime::TopicEventResponse;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;

use super::balance::{Balancer, Health};
use super::channels::{PeerChannels, never_sent};
use super::within_deadline;
use crate::config::validate_name;
use crate::deadline;
use crate::discovery::{Instance, RoutingTable};
use crate::error::{MeshError, status_says_not_delivered, strip_not_delivered};
use crate::pubsub::delivery::{Answered, Deliver, DeliveryError, EventToDeliver};
use crate::telemetry;
use tandem_transport::GrpcConnection;
use tokio::sync::mpsc;
use tracing::Instrument;

/// One call an app asked its sidecar to make.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub target_app_id: String,
    pub message: InvokeRequest,
    /// The caller's metadata that travels to the callee (see [`super::headers`]).
    pub metadata: HashMap<String, String>,
    pub deadline: Option<Instant>,
    /// Only this instance of the target app may take the call (see [`super::headers::TARGET_INSTANCE`]).
    pub instance: Option<String>,
}

#[derive(Debug, Clone)]
pub struct InvocationReply {
    pub message: InvokeResponse,
    pub metadata: HashMap<String, String>,
    /// The status an HTTP app answered with; `None` for a gRPC app.
    pub http_status: Option<u16>,
}

/// Routes invocations and event deliveries over the live instances in the routing table, as
/// the [`Balancer`] orders them.
#[derive(Debug)]
pub struct Invoker {
    app_id: String,
    namespace: String,
    routing: RoutingTable,
    peers: PeerChannels,
    balancer: Balancer,
}

impl Invoker {
    pub fn new(
        app_id: String,
        namespace: String,
        routing: RoutingTable,
        peers: PeerChannels,
        balancer: Balancer,
    ) -> Self {
        Invoker { app_id, namespace, routing, peers, balancer }
    }

    pub async fn invoke(&self, invocation: Invocation) -> Result<InvocationReply, MeshError> {
        let Invocation { target_app_id, message, metadata, deadline, instance: pinned } = invocation;
        if target_app_id.is_empty() {
            return Err(MeshError::InvalidArgument("the target app-id (field 'id') is empty".into()));
        }
        validate_name("target app-id", &target_app_id).map_err(MeshError::InvalidArgument)?;
        if message.method.is_empty() {
            return Err(MeshError::InvalidArgument(format!(
                "the method (field 'message.method') is empty in the call to app-id '{target_app_id}'"
            )));
        }

        let mut instances = self.candidates(&target_app_id, true)?;
        if let Some(pinned) = pinned {
            instances.retain(|instance| instance.instance_id == pinned);
            if instances.is_empty() {
                return Err(MeshError::InstanceNotLive { app_id: target_app_id, instance: pinned });
            }
        }
        // Every instance refused a call a moment ago: shed this one here rather than send it
        // across the mesh to be refused there (under overload the mesh's CPU is what is short).
        if let Some(reason) = self.balancer.refusing(&instances) {
            return Err(MeshError::Shed { app_id: target_app_id, reason });
        }
        let method = message.method.clone();
        let describe = || (target_app_id.clone(), method.clone());
        let mut last_error = String::new();
        // The last instance that refused the call as busy (RESOURCE_EXHAUSTED), if any did.
        let mut busy: Option<tonic::Status> = None;
        let mut message = Some(message);
        // Instances passed over because they hold as many calls as their refusals allow.
        let mut at_limit: Option<(usize, usize)> = None;
        for (attempt, instance) in instances.iter().enumerate() {
            // Counted in flight from here; past the instance's limit, passed over.
            let call = match self.balancer.try_start(&target_app_id, instance) {
                Ok(call) => call,
                Err(full) => {
                    at_limit = Some(full);
                    continue;
                }
            };
            let mut client = match self.mesh_client(&instance.internal_address, &target_app_id) {
                Ok(client) => client,
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            // Keep a copy only while another instance may still need it.
            let body = if attempt + 1 == instances.len() { message.take() } else { message.clone() };
            let mut request = tonic::Request::new(InternalInvokeRequest {
                caller_app_id: self.app_id.clone(),
                target_app_id: target_app_id.clone(),
                message: body,
                metadata: metadata.clone(),
            });
            if let Some(deadline) = deadline {
                request.set_timeout(deadline::remaining(deadline));
            }
            // One span per attempt; the peer's server span is its child.
            let span = telemetry::invoke_span(&target_app_id, &method);
            telemetry::context::inject_metadata(&telemetry::context::of_span(&span), request.metadata_mut());
            let result =
                within_deadline(deadline, describe, Box::pin(client.invoke(request))).instrument(span.clone()).await;
            if !matches!(result, Ok(Ok(_))) {
                telemetry::record_error(&span);
            }
            let result = result?;
            match result {
                Ok(response) => {
                    call.finish(Health::Answered);
                    let response = response.into_inner();
                    return Ok(InvocationReply {
                        message: response.message.unwrap_or_default(),
                        metadata: response.metadata,
                        http_status: u16::try_from(response.http_status).ok().filter(|s| *s != 0),
                    });
                }
                Err(status) if never_sent(&status) || status_says_not_delivered(&status) => {
                    call.finish(Health::Failed);
                    tracing::debug!(instance = %instance.instance_id, error = %status.message(), "not delivered; trying the next instance");
                    last_error = format!("{}: {}", instance.internal_address, status.message());
                }
                // The app refused it without running it (Tandem's contract for RESOURCE_EXHAUSTED,
                // e.g. serve's full queue): another instance may have room.
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    call.finish(Health::Refused { reason: status.message().to_string() });
                    tracing::debug!(instance = %instance.instance_id, error = %status.message(), "busy; trying the next instance");
                    busy = Some(strip_not_delivered(status));
                }
                Err(status) => {
                    let unavailable = status.code() == tonic::Code::Unavailable;
                    call.finish(if unavailable { Health::Failed } else { Health::Answered });
                    return Err(MeshError::Remote(strip_not_delivered(status)));
                }
            }
        }
        if let Some(refusal) = busy {
            return Err(MeshError::AllBusy { app_id: target_app_id, tried: instances.len(), refusal });
        }
        if let Some((in_flight, limit)) = at_limit {
            let reason = format!(
                "{in_flight} calls in flight to an instance whose refusals set its limit at {limit} (--concurrency-limit adaptive)"
            );
            return Err(MeshError::Shed { app_id: target_app_id, reason });
        }
        Err(MeshError::PeersUnreachable { app_id: target_app_id, tried: instances.len(), last_error })
    }

    /// The live instances of `app_id` (only those with an app behind them when `need_app`), in
    /// the order the balancer would try them.
    fn candidates(&self, app_id: &str, need_app: bool) -> Result<Vec<Instance>, MeshError> {
        let routing = self.routing.current();
        if !routing.synced {
            return Err(MeshError::DiscoveryNotReady);
        }
        let instances: Vec<Instance> = routing
            .instances(app_id)
            .ok_or_else(|| MeshError::AppNotFound { app_id: app_id.to_string(), namespace: self.namespace.clone() })?
            .iter()
            .filter(|i| i.has_app || !need_app)
            .cloned()
            .collect();
        if instances.is_empty() {
            return Err(MeshError::NoLiveInstance { app_id: app_id.to_string() });
        }
        Ok(self.balancer.order(instances))
    }

    fn mesh_client(&self, address: &str, app_id: &str) -> Result<MeshClient<GrpcConnection>, String> {
        let connection = self.peers.get(address, app_id)?;
        let origin = connection.origin();
        Ok(MeshClient::with_origin(connection, origin)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}

#[tonic::async_trait]
impl Deliver for Invoker {
    /// Like an invocation: each event to one live instance, moving on with only the events that
    /// provably did not reach an app. Several events travel in one `StreamDeliverEvents` call,
    /// whose answers come back one by one as the app gives them.
    async fn deliver(
        &self,
        app_id: &str,
        events: Vec<EventToDeliver>,
        timeout: Duration,
        answered: mpsc::UnboundedSender<Answered>,
    ) {
        let instances = match self.candidates(app_id, false) {
            Ok(instances) => instances,
            Err(e) => {
                for index in 0..events.len() {
                    let _ = answered.send((index, Err(DeliveryError::SubscriberAway(e.to_string()))));
                }
                return;
            }
        };
        let mut settled = vec![false; events.len()];
        let mut last_error = String::new();
        for instance in &instances {
            let waiting: Vec<usize> = (0..events.len()).filter(|i| !settled[*i]).collect();
            if waiting.is_empty() {
                break;
            }
            let client = match self.mesh_client(&instance.internal_address, app_id) {
                Ok(client) => client,
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            let batch: Vec<&EventToDeliver> = waiting.iter().map(|i| &events[*i]).collect();
            let mut health = Health::Answered;
            let mut on_answer = |position: usize, answer: Answer| {
                let index = waiting[position];
                match answer {
                    Answer::Settled(outcome) => {
                        settled[index] = true;
                        let _ = answered.send((index, outcome));
                    }
                    Answer::NotDelivered(why) => {
                        health = Health::Failed;
                        last_error = format!("{}: {why}", instance.internal_address);
                    }
                }
            };
            let call = self.balancer.start(app_id, instance);
            if let [one] = batch.as_slice() {
                on_answer(0, deliver_one(client, app_id, one, timeout).await);
            } else {
                deliver_streamed(client, app_id, &batch, timeout, &mut on_answer).await;
            }
            call.finish(health);
        }
        for index in (0..events.len()).filter(|i| !settled[*i]) {
            let _ = answered.send((
                index,
                Err(DeliveryError::SubscriberAway(format!(
                    "no instance of app-id '{app_id}' could take the event ({} tried): {last_error}",
                    instances.len()
                ))),
            ));
        }
    }
}

/// What one instance made of one event.
enum Answer {
    /// The app answered, or failed it (an attempt used up).
    Settled(Result<TopicEventResponseStatus, DeliveryError>),
    /// It provably did not reach the app; another instance may take it.
    NotDelivered(String),
}

/// One event, in a `DeliverEvent` call of its own.
async fn deliver_one(
    mut client: MeshClient<GrpcConnection>,
    app_id: &str,
    delivery: &EventToDeliver,
    timeout: Duration,
) -> Answer {
    let mut request = tonic::Request::new(DeliverEventRequest {
        target_app_id: app_id.to_string(),
        event: Some(delivery.event.clone()),
    });
    request.set_timeout(timeout);
    // The delivery attempt's span is the subscriber side's parent.
    telemetry::context::inject_metadata(&delivery.parent, request.metadata_mut());
    match tokio::time::timeout(timeout, Box::pin(client.deliver_event(request))).await {
        Err(_) => Answer::Settled(Err(no_answer(app_id, timeout))),
        Ok(Ok(response)) => Answer::Settled(event_status(app_id, response.into_inner().response)),
        Ok(Err(status)) if never_sent(&status) || status_says_not_delivered(&status) => {
            Answer::NotDelivered(status.message().to_string())
        }
        Ok(Err(status)) => Answer::Settled(Err(failed(app_id, status.code(), status.message()))),
    }
}

/// Several events in one `StreamDeliverEvents` call: `on_answer` gets each event's answer (by
/// its place in `batch`) as it comes, exactly once per event.
async fn deliver_streamed(
    mut client: MeshClient<GrpcConnection>,
    app_id: &str,
    batch: &[&EventToDeliver],
    timeout: Duration,
    on_answer: &mut (dyn FnMut(usize, Answer) + Send),
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut every = |answer: &dyn Fn() -> Answer| (0..batch.len()).for_each(|i| on_answer(i, answer()));
    let mut stream = match tokio::time::timeout_at(
        deadline,
        Box::pin(client.stream_deliver_events(batch_request(app_id, batch, timeout))),
    )
    .await
    {
        Err(_) => return every(&|| Answer::Settled(Err(no_answer(app_id, timeout)))),
        Ok(Err(status)) if never_sent(&status) || status_says_not_delivered(&status) => {
            return every(&|| Answer::NotDelivered(status.message().to_string()));
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            // A sidecar from before streamed answers: all of them at the end of the call.
            let answers = deliver_batch(client, app_id, batch, timeout).await;
            return answers.into_iter().enumerate().for_each(|(i, answer)| on_answer(i, answer));
        }
        Ok(Err(status)) => return every(&|| Answer::Settled(Err(failed(app_id, status.code(), status.message())))),
        Ok(Ok(response)) => response.into_inner(),
    };
    let mut answered = vec![false; batch.len()];
    // Why the events still without an answer have none, once the stream stops giving them.
    let unanswered = loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => break no_answer(app_id, timeout),
            Ok(Ok(Some(AnsweredEvent { index, outcome }))) => {
                let index = index as usize;
                if answered.get(index) != Some(&false) {
                    break DeliveryError::Failed(format!(
                        "app-id '{app_id}': its sidecar answered event {index} of {} twice or out of range",
                        batch.len()
                    ));
                }
                answered[index] = true;
                on_answer(index, answer_of(app_id, outcome.unwrap_or_default()));
            }
            Ok(Ok(None)) => {
                break DeliveryError::Failed(format!("app-id '{app_id}': its sidecar ended the answers early"));
            }
            Ok(Err(status)) => break failed(app_id, status.code(), status.message()),
        }
        if answered.iter().all(|done| *done) {
            return;
        }
    };
    // Sent, so maybe delivered: each counts as an attempt.
    for (index, _) in answered.iter().enumerate().filter(|(_, done)| !**done) {
        on_answer(index, Answer::Settled(Err(unanswered.clone())));
    }
}

/// Several events in one `DeliverEvents` call; one answer per event, in order.
async fn deliver_batch(
    mut client: MeshClient<GrpcConnection>,
    app_id: &str,
    batch: &[&EventToDeliver],
    timeout: Duration,
) -> Vec<Answer> {
    let every = |answer: &dyn Fn() -> Answer| batch.iter().map(|_| answer()).collect::<Vec<_>>();
    match tokio::time::timeout(timeout, Box::pin(client.deliver_events(batch_request(app_id, batch, timeout)))).await {
        Err(_) => every(&|| Answer::Settled(Err(no_answer(app_id, timeout)))),
        Ok(Err(status)) if never_sent(&status) || status_says_not_delivered(&status) => {
            every(&|| Answer::NotDelivered(status.message().to_string()))
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            // A sidecar from before batched delivery: one call per event.
            let singles = batch.iter().map(|delivery| deliver_one(client.clone(), app_id, delivery, timeout));
            futures_util::future::join_all(singles).await
        }
        Ok(Err(status)) => every(&|| Answer::Settled(Err(failed(app_id, status.code(), status.message())))),
        Ok(Ok(response)) => {
            let outcomes = response.into_inner().outcomes;
            if outcomes.len() != batch.len() {
                let why = format!("answered {} outcomes for {} events", outcomes.len(), batch.len());
                return every(&|| Answer::Settled(Err(DeliveryError::Failed(format!("app-id '{app_id}': {why}")))));
            }
            outcomes.into_iter().map(|outcome| answer_of(app_id, outcome)).collect()
        }
    }
}

/// The request of a batched delivery: each event with its delivery attempt's trace context.
fn batch_request(app_id: &str, batch: &[&EventToDeliver], timeout: Duration) -> tonic::Request<DeliverEventsRequest> {
    let deliveries = batch
        .iter()
        .map(|delivery| {
            let (traceparent, tracestate) = telemetry::context::to_fields(&delivery.parent);
            EventDelivery { event: Some(delivery.event.clone()), traceparent, tracestate }
        })
        .collect();
    let mut request = tonic::Request::new(DeliverEventsRequest { target_app_id: app_id.to_string(), deliveries });
    request.set_timeout(timeout);
    request
}

/// What the subscriber's sidecar made of one event of a batch.
fn answer_of(app_id: &str, outcome: EventDeliveryOutcome) -> Answer {
    match outcome {
        EventDeliveryOutcome { not_delivered: true, message, .. } => Answer::NotDelivered(message),
        EventDeliveryOutcome { response: Some(response), .. } => Answer::Settled(event_status(app_id, Some(response))),
        EventDeliveryOutcome { code, message, .. } => {
            Answer::Settled(Err(failed(app_id, tonic::Code::from(code), &message)))
        }
    }
}

fn event_status(app_id: &str, response: Option<TopicEventResponse>) -> Result<TopicEventResponseStatus, DeliveryError> {
    let status = response.map(|r| r.status).unwrap_or_default();
    TopicEventResponseStatus::try_from(status)
        .map_err(|_| DeliveryError::Failed(format!("app-id '{app_id}' answered an unknown event status {status}")))
}

fn no_answer(app_id: &str, timeout: Duration) -> DeliveryError {
    DeliveryError::Failed(format!("no answer from app-id '{app_id}' within {timeout:?}"))
}

fn failed(app_id: &str, code: tonic::Code, message: &str) -> DeliveryError {
    DeliveryError::Failed(format!("app-id '{app_id}': {code:?}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tandem_proto::internal::mesh_server::{Mesh, MeshServer};
    use tandem_proto::internal::{
        DeliverEventResponse, DeliverEventsResponse, InternalInvokeRequest as InvokeCall, InternalInvokeResponse,
    };
    use tandem_proto::runtime::TopicEventRequest;
    use tonic::{Request, Response, Status};

    /// A sidecar from before batched delivery: `DeliverEvents` and `StreamDeliverEvents` are
    /// unknown to it.
    #[derive(Default)]
    struct OldPeer {
        single_calls: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl Mesh for OldPeer {
        async fn invoke(&self, _: Request<InvokeCall>) -> Result<Response<InternalInvokeResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn deliver_event(
            &self,
            request: Request<DeliverEventRequest>,
        ) -> Result<Response<DeliverEventResponse>, Status> {
            self.single_calls.fetch_add(1, Ordering::SeqCst);
            let status = if request.into_inner().event.is_some_and(|e| e.id == "refused") {
                TopicEventResponseStatus::Drop
            } else {
                TopicEventResponseStatus::Success
            };
            Ok(Response::new(DeliverEventResponse { response: Some(TopicEventResponse { status: status as i32 }) }))
        }

        async fn deliver_events(
            &self,
            _: Request<DeliverEventsRequest>,
        ) -> Result<Response<DeliverEventsResponse>, Status> {
            Err(Status::unimplemented("unknown method"))
        }

        type StreamDeliverEventsStream = super::super::inbound::AnsweredEvents;

        async fn stream_deliver_events(
            &self,
            _: Request<DeliverEventsRequest>,
        ) -> Result<Response<Self::StreamDeliverEventsStream>, Status> {
            Err(Status::unimplemented("unknown method"))
        }
    }

    fn event(id: &str) -> EventToDeliver {
        EventToDeliver {
            event: TopicEventRequest { id: id.into(), topic: "t".into(), ..Default::default() },
            parent: opentelemetry::trace::SpanContext::empty_context(),
        }
    }

    #[tokio::test]
    async fn a_peer_without_batched_or_streamed_delivery_gets_one_call_per_event() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let peer = OldPeer::default();
        let single_calls = peer.single_calls.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MeshServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let connection = GrpcConnection::new(&address).unwrap();
        let client = MeshClient::with_origin(connection.clone(), connection.origin());
        let events = [event("a"), event("refused"), event("c")];
        let batch: Vec<&EventToDeliver> = events.iter().collect();
        let mut answers: Vec<Option<Answer>> = batch.iter().map(|_| None).collect();
        let mut on_answer = |index: usize, answer: Answer| {
            assert!(answers[index].replace(answer).is_none(), "event {index} answered twice");
        };
        deliver_streamed(client, "app", &batch, Duration::from_secs(10), &mut on_answer).await;
        let statuses: Vec<_> = answers
            .into_iter()
            .map(|answer| match answer {
                Some(Answer::Settled(Ok(status))) => status,
                Some(Answer::Settled(Err(e))) => panic!("failed: {e:?}"),
                Some(Answer::NotDelivered(why)) => panic!("not delivered: {why}"),
                None => panic!("an event got no answer"),
            })
            .collect();
        use TopicEventResponseStatus::{Drop, Success};
        assert_eq!(statuses, [Success, Drop, Success], "each event's own answer, in order");
        assert_eq!(single_calls.load(Ordering::SeqCst), 3);
        server.abort();
    }
}
