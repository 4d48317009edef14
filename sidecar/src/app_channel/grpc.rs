//! A gRPC app: Dapr's `AppCallback` (`OnInvoke`, `ListTopicSubscriptions`, `OnTopicEvent`) and
//! the optional `AppCallbackHealthCheck`, on one HTTP/2 connection made on first use.

use std::time::Duration;

use tandem_proto::common::InvokeRequest;
use tandem_proto::runtime::app_callback_client::AppCallbackClient;
use tandem_proto::runtime::app_callback_health_check_client::AppCallbackHealthCheckClient;
use tandem_proto::runtime::{TopicEventRequest, TopicEventResponse, TopicSubscription};
use tandem_transport::GrpcConnection;
use tonic::{Code, Request, Status};

use super::AppAnswer;
use crate::invoke::headers;

#[derive(Debug, Clone)]
pub struct GrpcApp {
    connection: GrpcConnection,
}

impl GrpcApp {
    pub fn new(host: &str, port: u16) -> Result<Self, String> {
        Ok(GrpcApp { connection: GrpcConnection::new(&format!("{host}:{port}"))? })
    }

    pub fn address(&self) -> &str {
        self.connection.address()
    }

    /// A client of the app's `AppCallback` service, without message size limits (the
    /// sidecar enforces its own).
    fn callback_client(&self) -> AppCallbackClient<GrpcConnection> {
        AppCallbackClient::with_origin(self.connection.clone(), self.connection.origin())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    pub async fn invoke(&self, request: Request<InvokeRequest>) -> Result<AppAnswer, Status> {
        let response = self.callback_client().on_invoke(request).await?;
        let metadata = headers::outgoing(response.metadata());
        Ok(AppAnswer { message: response.into_inner(), metadata, http_status: None })
    }

    pub async fn topic_event(&self, request: Request<TopicEventRequest>) -> Result<TopicEventResponse, Status> {
        Ok(self.callback_client().on_topic_event(request).await?.into_inner())
    }

    pub async fn subscriptions(&self) -> Result<Vec<TopicSubscription>, String> {
        match self.callback_client().list_topic_subscriptions(()).await {
            Ok(response) => Ok(response.into_inner().subscriptions),
            // An app that subscribes to nothing need not serve the method.
            Err(status) if status.code() == Code::Unimplemented => Ok(Vec::new()),
            Err(status) => Err(format!("ListTopicSubscriptions: {}", status.message())),
        }
    }

    /// `None` when healthy, else the reason. An app that serves gRPC but not the optional
    /// `AppCallbackHealthCheck` service counts as healthy, as in Dapr.
    pub async fn check_health(&self, timeout: Duration) -> Option<String> {
        let mut client = AppCallbackHealthCheckClient::with_origin(self.connection.clone(), self.connection.origin());
        match tokio::time::timeout(timeout, client.health_check(())).await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) if status.code() == Code::Unimplemented => None,
            Ok(Err(status)) if crate::invoke::channels::never_sent(&status) => {
                Some(format!("app is not listening on {}", self.address()))
            }
            Ok(Err(status)) => Some(format!("health check failed: {:?}: {}", status.code(), status.message())),
            Err(_) => Some(format!("health check timed out after {timeout:?}")),
        }
    }
}
