//! `dapr.proto.runtime.v1.Dapr`: InvokeService, the state API (see [`super::state`]),
//! PublishEvent and BulkPublishEvent (see [`super::pubsub`]), GetMetadata and Shutdown.
//! Methods of Dapr's service that Tandem does not implement are absent from its proto and
//! answer UNIMPLEMENTED.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_proto::common::InvokeResponse;
use tandem_proto::runtime::dapr_server::Dapr;
use tandem_proto::runtime::{
    AppConnectionProperties, BulkPublishRequest, BulkPublishResponse, DeleteBulkStateRequest, DeleteStateRequest,
    ExecuteStateTransactionRequest, GetBulkStateRequest, GetBulkStateResponse, GetMetadataRequest, GetMetadataResponse,
    GetStateRequest, GetStateResponse, InvokeServiceRequest, PublishEventRequest, SaveStateRequest, ShutdownRequest,
    SubscribeTopicEventsRequestAlpha1,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::pubsub::{EventStream, PubSubApi};
use super::state::StateApi;
use crate::deadline;
use crate::error::MeshError;
use crate::invoke::{Invocation, Invoker, headers};
use crate::metrics::Metrics;

/// What GetMetadata reports about this sidecar.
#[derive(Debug, Clone)]
pub struct SidecarInfo {
    pub app_id: String,
    pub namespace: String,
    pub instance_id: String,
    pub internal_address: String,
    pub app_host: String,
    pub app_port: Option<u16>,
}

pub struct DaprApi {
    info: SidecarInfo,
    invoker: Arc<Invoker>,
    state: Arc<StateApi>,
    pubsub: Arc<PubSubApi>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl DaprApi {
    /// `shutdown` is cancelled by the Shutdown RPC; the runtime then drains and exits.
    pub fn new(
        info: SidecarInfo,
        invoker: Arc<Invoker>,
        state: Arc<StateApi>,
        pubsub: Arc<PubSubApi>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        DaprApi { info, invoker, state, pubsub, metrics, shutdown }
    }

    async fn invoke(&self, request: Request<InvokeServiceRequest>) -> Result<Response<InvokeResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata()).map_err(Status::invalid_argument)?;
        let metadata = headers::outgoing(request.metadata());
        let InvokeServiceRequest { id, message } = request.into_inner();
        let message = message.ok_or_else(|| {
            Status::from(MeshError::InvalidArgument(format!(
                "the call to app-id '{id}' has no message (field 'message')"
            )))
        })?;
        let target = id.clone();
        let reply = self
            .invoker
            .invoke(Invocation { target_app_id: id, message, metadata, deadline })
            .await
            .map_err(Status::from);
        self.metrics.invocation(&target, &reply);
        let reply = reply?;
        let mut response = Response::new(reply.message);
        headers::apply(&reply.metadata, response.metadata_mut());
        Ok(response)
    }

    /// What GetMetadata answers.
    fn metadata(&self) -> GetMetadataResponse {
        let info = &self.info;
        let extended_metadata = HashMap::from([
            ("tandem.namespace".to_string(), info.namespace.clone()),
            ("tandem.instance-id".to_string(), info.instance_id.clone()),
            ("tandem.internal-address".to_string(), info.internal_address.clone()),
        ]);
        GetMetadataResponse {
            id: info.app_id.clone(),
            runtime_version: RUNTIME_VERSION.to_string(),
            extended_metadata,
            registered_components: [self.state.registered_components(), self.pubsub.registered_components()].concat(),
            app_connection_properties: Some(AppConnectionProperties {
                port: info.app_port.map(i32::from).unwrap_or(0),
                protocol: "grpc".into(),
                channel_address: info.app_host.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

pub const RUNTIME_VERSION: &str = concat!("tandem-", env!("CARGO_PKG_VERSION"));

#[tonic::async_trait]
impl Dapr for DaprApi {
    async fn invoke_service(&self, request: Request<InvokeServiceRequest>) -> Result<Response<InvokeResponse>, Status> {
        self.metrics.observe_api("InvokeService", self.invoke(request)).await
    }

    async fn get_metadata(&self, _: Request<GetMetadataRequest>) -> Result<Response<GetMetadataResponse>, Status> {
        self.metrics.observe_api("GetMetadata", async { Ok(self.metadata()) }).await.map(Response::new)
    }

    async fn shutdown(&self, _: Request<ShutdownRequest>) -> Result<Response<()>, Status> {
        tracing::info!("shutdown requested through the API");
        self.shutdown.cancel();
        self.metrics.observe_api("Shutdown", async { Ok(()) }).await.map(Response::new)
    }

    async fn get_state(&self, request: Request<GetStateRequest>) -> Result<Response<GetStateResponse>, Status> {
        self.metrics.observe_api("GetState", self.state.get_state(request.into_inner())).await.map(Response::new)
    }

    async fn get_bulk_state(
        &self,
        request: Request<GetBulkStateRequest>,
    ) -> Result<Response<GetBulkStateResponse>, Status> {
        self.metrics
            .observe_api("GetBulkState", self.state.get_bulk_state(request.into_inner()))
            .await
            .map(Response::new)
    }

    async fn save_state(&self, request: Request<SaveStateRequest>) -> Result<Response<()>, Status> {
        self.metrics.observe_api("SaveState", self.state.save_state(request.into_inner())).await.map(Response::new)
    }

    async fn delete_state(&self, request: Request<DeleteStateRequest>) -> Result<Response<()>, Status> {
        self.metrics.observe_api("DeleteState", self.state.delete_state(request.into_inner())).await.map(Response::new)
    }

    async fn delete_bulk_state(&self, request: Request<DeleteBulkStateRequest>) -> Result<Response<()>, Status> {
        self.metrics
            .observe_api("DeleteBulkState", self.state.delete_bulk_state(request.into_inner()))
            .await
            .map(Response::new)
    }

    async fn execute_state_transaction(
        &self,
        request: Request<ExecuteStateTransactionRequest>,
    ) -> Result<Response<()>, Status> {
        self.metrics
            .observe_api("ExecuteStateTransaction", self.state.execute_state_transaction(request.into_inner()))
            .await
            .map(Response::new)
    }

    type SubscribeTopicEventsAlpha1Stream = EventStream;

    async fn subscribe_topic_events_alpha1(
        &self,
        request: Request<tonic::Streaming<SubscribeTopicEventsRequestAlpha1>>,
    ) -> Result<Response<EventStream>, Status> {
        self.metrics
            .observe_api("SubscribeTopicEventsAlpha1", self.pubsub.subscribe(request.into_inner()))
            .await
            .map(Response::new)
    }

    async fn publish_event(&self, request: Request<PublishEventRequest>) -> Result<Response<()>, Status> {
        self.metrics
            .observe_api("PublishEvent", self.pubsub.publish_event(request.into_inner()))
            .await
            .map(Response::new)
    }

    async fn bulk_publish_event_alpha1(
        &self,
        request: Request<BulkPublishRequest>,
    ) -> Result<Response<BulkPublishResponse>, Status> {
        let call = self.pubsub.bulk_publish_event(request.into_inner());
        self.metrics.observe_api("BulkPublishEventAlpha1", call).await.map(Response::new)
    }

    async fn bulk_publish_event(
        &self,
        request: Request<BulkPublishRequest>,
    ) -> Result<Response<BulkPublishResponse>, Status> {
        let call = self.pubsub.bulk_publish_event(request.into_inner());
        self.metrics.observe_api("BulkPublishEvent", call).await.map(Response::new)
    }
}
