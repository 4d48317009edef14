//! A gRPC app: Dapr's `AppCallback` (`OnInvoke`, `ListTopicSubscriptions`, `OnTopicEvent`) and
//! the optional `AppCallbackHealthCheck`, on one HTTP/2 connection made on first use.

use std::time::Duration;

use tandem_proto::common::InvokeRequest;
use tandem_proto::runtime::app_callback_client::AppCallbackClient;
use tandem_proto::runtime::app_callback_health_check_client::AppCallbackHealthCheckClient;
use tandem_proto::runtime::{TopicEventRequest, TopicEventResponse, TopicSubscription};
use tandem_transport::GrpcConnection;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Request, Status};

use super::AppAnswer;
use crate::api::token::HEADER as TOKEN_HEADER;
use crate::invoke::headers;

#[derive(Debug, Clone)]
pub struct GrpcApp {
    connection: GrpcConnection,
    /// `APP_API_TOKEN`, sent in the `dapr-api-token` metadata of every call.
    token: Option<MetadataValue<Ascii>>,
}

impl GrpcApp {
    pub fn new(host: &str, port: u16, token: Option<&str>) -> Result<Self, String> {
        let token = token
            .map(|token| {
                MetadataValue::try_from(token).map_err(|_| "APP_API_TOKEN is not valid as a header value".to_string())
            })
            .transpose()?;
        Ok(GrpcApp { connection: GrpcConnection::new(&format!("{host}:{port}"))?, token })
    }

    /// `request` with the app's token, when there is one.
    fn with_token<T>(&self, mut request: Request<T>) -> Request<T> {
        if let Some(token) = &self.token {
            request.metadata_mut().insert(TOKEN_HEADER, token.clone());
        }
        request
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
        let response = self.callback_client().on_invoke(self.with_token(request)).await?;
        let metadata = headers::outgoing(response.metadata());
        Ok(AppAnswer { message: response.into_inner(), metadata, http_status: None })
    }

    pub async fn topic_event(&self, request: Request<TopicEventRequest>) -> Result<TopicEventResponse, Status> {
        Ok(self.callback_client().on_topic_event(self.with_token(request)).await?.into_inner())
    }

    pub async fn subscriptions(&self) -> Result<Vec<TopicSubscription>, String> {
        match self.callback_client().list_topic_subscriptions(self.with_token(Request::new(()))).await {
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
        match tokio::time::timeout(timeout, client.health_check(self.with_token(Request::new(())))).await {
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
