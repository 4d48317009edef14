//! The calling side: pick a live instance of the target app, send the call to its sidecar,
//! and try another instance only when the call provably never reached an app.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tandem_proto::common::{InvokeRequest, InvokeResponse};
use tandem_proto::internal::InternalInvokeRequest;
use tandem_proto::internal::mesh_client::MeshClient;

use super::channels::{PeerChannels, never_sent};
use super::within_deadline;
use crate::config::validate_name;
use crate::deadline;
use crate::discovery::RoutingTable;
use crate::error::{MeshError, status_says_not_delivered, strip_not_delivered};

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

        let routing = self.routing.current();
        if !routing.synced {
            return Err(MeshError::DiscoveryNotReady);
        }
        let instances = routing.instances(&target_app_id).ok_or_else(|| MeshError::AppNotFound {
            app_id: target_app_id.clone(),
            namespace: self.namespace.clone(),
        })?;
        if instances.is_empty() {
            return Err(MeshError::NoLiveInstance { app_id: target_app_id });
        }

        let method = message.method.clone();
        let describe = || (target_app_id.clone(), method.clone());
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::new();
        let mut message = Some(message);
        for attempt in 0..instances.len() {
            let instance = &instances[(start + attempt) % instances.len()];
            let connection = match self.peers.get(&instance.internal_address) {
                Ok(connection) => connection,
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
            let origin = connection.origin();
            let mut client = MeshClient::with_origin(connection, origin)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            let result = within_deadline(deadline, describe, client.invoke(request)).await?;
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
}
