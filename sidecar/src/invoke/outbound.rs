//! The calling side: pick a live instance of the target app, send the call to its sidecar,
//! and try another instance only when the call provably never reached an app.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use std::time::Duration;
use tandem_proto::common::{InvokeRequest, InvokeResponse};

use tandem_proto::internal::mesh_client::MeshClient;
use tandem_proto::internal::{DeliverEventRequest, InternalInvokeRequest};
use tandem_proto::runtime::TopicEventRequest;
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;

use super::channels::{PeerChannels, never_sent};
use super::connection::GrpcConnection;
use super::within_deadline;
use crate::config::validate_name;
use crate::deadline;
use crate::discovery::{Instance, RoutingTable};
use crate::error::{MeshError, status_says_not_delivered, strip_not_delivered};
use crate::pubsub::delivery::{Deliver, DeliveryError};
use crate::telemetry;
use tracing::Instrument;

/// One call an app asked its sidecar to make.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub target_app_id: String,
    pub message: InvokeRequest,
    /// The caller's metadata that travels to the callee (see [`super::headers`]).
    pub metadata: HashMap<String, String>,
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct InvocationReply {
    pub message: InvokeResponse,
    pub metadata: HashMap<String, String>,
}

/// Routes invocations over the live instances in the routing table, round robin.
#[derive(Debug)]
pub struct Invoker {
    app_id: String,
    namespace: String,
    routing: RoutingTable,
    peers: PeerChannels,
    next: AtomicUsize,
}

impl Invoker {
    pub fn new(app_id: String, namespace: String, routing: RoutingTable, peers: PeerChannels) -> Self {
        Invoker { app_id, namespace, routing, peers, next: AtomicUsize::new(0) }
    }

    pub async fn invoke(&self, invocation: Invocation) -> Result<InvocationReply, MeshError> {
        let Invocation { target_app_id, message, metadata, deadline } = invocation;
        if target_app_id.is_empty() {
            return Err(MeshError::InvalidArgument("the target app-id (field 'id') is empty".into()));
        }
        validate_name("target app-id", &target_app_id).map_err(MeshError::InvalidArgument)?;
        if message.method.is_empty() {
            return Err(MeshError::InvalidArgument(format!(
                "the method (field 'message.method') is empty in the call to app-id '{target_app_id}'"
            )));
        }

        let instances = self.candidates(&target_app_id, true)?;
        let method = message.method.clone();
        let describe = || (target_app_id.clone(), method.clone());
        let mut last_error = String::new();
        let mut message = Some(message);
        for (attempt, instance) in instances.iter().enumerate() {
            let mut client = match self.mesh_client(&instance.internal_address) {
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
            let result = within_deadline(deadline, describe, client.invoke(request)).instrument(span.clone()).await;
            if !matches!(result, Ok(Ok(_))) {
                telemetry::record_error(&span);
            }
            let result = result?;
            match result {
                Ok(response) => {
                    let response = response.into_inner();
                    return Ok(InvocationReply {
                        message: response.message.unwrap_or_default(),
                        metadata: response.metadata,
                    });
                }
                Err(status) if never_sent(&status) || status_says_not_delivered(&status) => {
                    tracing::debug!(instance = %instance.instance_id, error = %status.message(), "not delivered; trying the next instance");
                    last_error = format!("{}: {}", instance.internal_address, status.message());
                }
                Err(status) => return Err(MeshError::Remote(strip_not_delivered(status))),
            }
        }
        Err(MeshError::PeersUnreachable { app_id: target_app_id, tried: instances.len(), last_error })
    }

    /// The live instances of `app_id` (only those with an app behind them when `need_app`),
    /// starting with the next one in round-robin order.
    fn candidates(&self, app_id: &str, need_app: bool) -> Result<Vec<Instance>, MeshError> {
        let routing = self.routing.current();
        if !routing.synced {
            return Err(MeshError::DiscoveryNotReady);
        }
        let instances: Vec<&Instance> = routing
            .instances(app_id)
            .ok_or_else(|| MeshError::AppNotFound { app_id: app_id.to_string(), namespace: self.namespace.clone() })?
            .iter()
            .filter(|i| i.has_app || !need_app)
            .collect();
        if instances.is_empty() {
            return Err(MeshError::NoLiveInstance { app_id: app_id.to_string() });
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % instances.len();
        Ok(instances[start..].iter().chain(&instances[..start]).map(|i| (*i).clone()).collect())
    }

    fn mesh_client(&self, address: &str) -> Result<MeshClient<GrpcConnection>, String> {
        let connection = self.peers.get(address)?;
        let origin = connection.origin();
        Ok(MeshClient::with_origin(connection, origin)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}

#[tonic::async_trait]
impl Deliver for Invoker {
    /// Like an invocation: to one live instance, moving on only when the event provably did
    /// not reach an app.
    async fn deliver(
        &self,
        app_id: &str,
        event: TopicEventRequest,
        timeout: Duration,
    ) -> Result<TopicEventResponseStatus, DeliveryError> {
        let instances = self.candidates(app_id, false).map_err(|e| DeliveryError::SubscriberAway(e.to_string()))?;
        let mut last_error = String::new();
        for instance in &instances {
            let mut client = match self.mesh_client(&instance.internal_address) {
                Ok(client) => client,
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            let mut request = tonic::Request::new(DeliverEventRequest {
                target_app_id: app_id.to_string(),
                event: Some(event.clone()),
            });
            request.set_timeout(timeout);
            // The delivery attempt's span (made by the delivery loop) is the subscriber side's parent.
            telemetry::inject_current(request.metadata_mut());
            match tokio::time::timeout(timeout, client.deliver_event(request)).await {
                Err(_) => {
                    return Err(DeliveryError::Failed(format!("no answer from app-id '{app_id}' within {timeout:?}")));
                }
                Ok(Ok(response)) => {
                    let status = response.into_inner().response.map(|r| r.status).unwrap_or_default();
                    return TopicEventResponseStatus::try_from(status).map_err(|_| {
                        DeliveryError::Failed(format!("app-id '{app_id}' answered an unknown event status {status}"))
                    });
                }
                Ok(Err(status)) if never_sent(&status) || status_says_not_delivered(&status) => {
                    last_error = format!("{}: {}", instance.internal_address, status.message());
                }
                Ok(Err(status)) => {
                    return Err(DeliveryError::Failed(format!(
                        "app-id '{app_id}': {:?}: {}",
                        status.code(),
                        status.message()
                    )));
                }
            }
        }
        Err(DeliveryError::SubscriberAway(format!(
            "no instance of app-id '{app_id}' could take the event ({} tried): {last_error}",
            instances.len()
        )))
    }
}
