//! The gRPC front end: `dapr.proto.runtime.v1.Dapr` (InvokeService, the state API,
//! PublishEvent and BulkPublishEvent, GetMetadata and Shutdown) over the shared building blocks
//! of [`super::universal`]. Methods of Dapr's service that Tandem does not implement are absent
//! from its proto and answer UNIMPLEMENTED.

use std::sync::Arc;

use tandem_proto::common::InvokeResponse;
use tandem_proto::runtime::dapr_server::Dapr;
use tandem_proto::runtime::{
    BulkPublishRequest, BulkPublishResponse, DeleteBulkStateRequest, DeleteStateRequest,
    ExecuteStateTransactionRequest, GetBulkStateRequest, GetBulkStateResponse, GetMetadataRequest, GetMetadataResponse,
    GetStateRequest, GetStateResponse, InvokeServiceRequest, PublishEventRequest, SaveStateRequest, SetMetadataRequest,
    ShutdownRequest, SubscribeTopicEventsRequestAlpha1,
};
use tonic::{Request, Response, Status};

use super::pubsub::EventStream;
use super::universal::Universal;
use crate::deadline;
use crate::error::MeshError;
use crate::invoke::{Invocation, headers};

/// Dapr's gRPC API over the shared building blocks.
pub struct DaprApi {
    universal: Arc<Universal>,
}

impl DaprApi {
    pub fn new(universal: Arc<Universal>) -> Self {
        DaprApi { universal }
    }

    async fn invoke(&self, request: Request<InvokeServiceRequest>) -> Result<Response<InvokeResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata()).map_err(Status::invalid_argument)?;
        let metadata = headers::outgoing(request.metadata());
        let instance = headers::target_instance(request.metadata());
        let InvokeServiceRequest { id, message } = request.into_inner();
        let message = message.ok_or_else(|| {
            Status::from(MeshError::InvalidArgument(format!(
                "the call to app-id '{id}' has no message (field 'message')"
            )))
        })?;
        let target = id.clone();
        let reply = self
            .universal
            .invoker
            .invoke(Invocation { target_app_id: id, message, metadata, deadline, instance })
            .await
            .map_err(Status::from);
        self.universal.metrics.invocation(&target, &reply);
        let reply = reply?;
        // An HTTP app's error status becomes the gRPC error Dapr gives it, its body the message.
        if let Some(status) = reply.http_status
            && !(200..400).contains(&status)
        {
            let body = reply.message.data.map(|any| any.value).unwrap_or_default();
            let message = format!("the app answered HTTP {status}: {}", String::from_utf8_lossy(&body));
            return Err(Status::new(crate::api::error::code_of_http(status), message));
        }
        let mut response = Response::new(reply.message);
        headers::apply(&reply.metadata, response.metadata_mut());
        Ok(response)
    }
}

#[tonic::async_trait]
impl Dapr for DaprApi {
    async fn invoke_service(&self, request: Request<InvokeServiceRequest>) -> Result<Response<InvokeResponse>, Status> {
        self.universal.metrics.observe_api("InvokeService", self.invoke(request)).await
    }

    async fn get_metadata(&self, _: Request<GetMetadataRequest>) -> Result<Response<GetMetadataResponse>, Status> {
        self.universal
            .metrics
            .observe_api("GetMetadata", async { Ok(self.universal.metadata()) })
            .await
            .map(Response::new)
    }

    async fn set_metadata(&self, request: Request<SetMetadataRequest>) -> Result<Response<()>, Status> {
        let SetMetadataRequest { key, value } = request.into_inner();
        self.universal.set_metadata(key, value);
        self.universal.metrics.observe_api("SetMetadata", async { Ok(()) }).await.map(Response::new)
    }

    async fn shutdown(&self, _: Request<ShutdownRequest>) -> Result<Response<()>, Status> {
        self.universal.shutdown();
        self.universal.metrics.observe_api("Shutdown", async { Ok(()) }).await.map(Response::new)
    }

    async fn get_state(&self, request: Request<GetStateRequest>) -> Result<Response<GetStateResponse>, Status> {
        self.universal
            .metrics
            .observe_api("GetState", async {
                self.universal.state.get_state(request.into_inner()).await.map_err(Status::from)
            })
            .await
            .map(Response::new)
    }

    async fn get_bulk_state(
        &self,
        request: Request<GetBulkStateRequest>,
    ) -> Result<Response<GetBulkStateResponse>, Status> {
        self.universal
            .metrics
            .observe_api("GetBulkState", async {
                self.universal.state.get_bulk_state(request.into_inner()).await.map_err(Status::from)
            })
            .await
            .map(Response::new)
    }

    async fn save_state(&self, request: Request<SaveStateRequest>) -> Result<Response<()>, Status> {
        self.universal
            .metrics
            .observe_api("SaveState", async {
                self.universal.state.save_state(request.into_inner()).await.map_err(Status::from)
            })
            .await
            .map(Response::new)
    }

    async fn delete_state(&self, request: Request<DeleteStateRequest>) -> Result<Response<()>, Status> {
        self.universal
            .metrics
            .observe_api("DeleteState", async {
                self.universal.state.delete_state(request.into_inner()).await.map_err(Status::from)
            })
            .await
            .map(Response::new)
    }

    async fn delete_bulk_state(&self, request: Request<DeleteBulkStateRequest>) -> Result<Response<()>, Status> {
        self.universal
            .metrics
            .observe_api("DeleteBulkState", async {
                self.universal.state.delete_bulk_state(request.into_inner()).await.map_err(Status::from)
            })
            .await
            .map(Response::new)
    }

    async fn execute_state_transaction(
        &self,
        request: Request<ExecuteStateTransactionRequest>,
    ) -> Result<Response<()>, Status> {
        self.universal
            .metrics
            .observe_api("ExecuteStateTransaction", async {
                self.universal.state.execute_state_transaction(request.into_inner()).await.map_err(Status::from)
            })
            .await
            .map(Response::new)
    }

    type SubscribeTopicEventsAlpha1Stream = EventStream;

    async fn subscribe_topic_events_alpha1(
        &self,
        request: Request<tonic::Streaming<SubscribeTopicEventsRequestAlpha1>>,
    ) -> Result<Response<EventStream>, Status> {
        self.universal
            .metrics
            .observe_api("SubscribeTopicEventsAlpha1", self.universal.pubsub.subscribe(request.into_inner()))
            .await
            .map(Response::new)
    }

    async fn publish_event(&self, request: Request<PublishEventRequest>) -> Result<Response<()>, Status> {
        self.universal
            .metrics
            .observe_api("PublishEvent", async {
                self.universal.pubsub.publish_event(request.into_inner()).await.map_err(Status::from)
            })
            .await
            .map(Response::new)
    }

    async fn bulk_publish_event_alpha1(
        &self,
        request: Request<BulkPublishRequest>,
    ) -> Result<Response<BulkPublishResponse>, Status> {
        let call = async { self.universal.pubsub.bulk_publish_event(request.into_inner()).await.map_err(Status::from) };
        self.universal.metrics.observe_api("BulkPublishEventAlpha1", call).await.map(Response::new)
    }

    async fn bulk_publish_event(
        &self,
        request: Request<BulkPublishRequest>,
    ) -> Result<Response<BulkPublishResponse>, Status> {
        let call = async { self.universal.pubsub.bulk_publish_event(request.into_inner()).await.map_err(Status::from) };
        self.universal.metrics.observe_api("BulkPublishEvent", call).await.map(Response::new)
    }
}
