//! A client for the local sidecar's app-facing API.

use std::time::Duration;

use tandem_proto::common::InvokeRequest;
use tandem_proto::common::state_options::StateConcurrency;
use tandem_proto::common::{Etag, StateItem, StateOptions};
use tandem_proto::group::training_group_client::TrainingGroupClient;
use tandem_proto::prost_types::Any;
use tandem_proto::runtime::dapr_client::DaprClient;
use tandem_proto::runtime::{
    BulkPublishRequest, BulkPublishRequestEntry, DeleteStateRequest, ExecuteStateTransactionRequest,
    GetMetadataRequest, GetMetadataResponse, GetStateRequest, InvokeServiceRequest, PublishEventRequest,
    SaveStateRequest, SetMetadataRequest, ShutdownRequest, TransactionalStateOperation,
};
use tandem_transport::GrpcConnection;
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use crate::TraceContext;

/// The metadata header that pins an invocation to one instance (tandemd's).
pub const TARGET_INSTANCE: &str = "tandem-target-instance";
/// The key of a sidecar's instance id in its extended metadata (tandemd's).
const INSTANCE_ID_KEY: &str = "tandem.instance-id";

/// Options of one call: deadline, extra metadata and the trace it belongs to.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    pub timeout: Option<Duration>,
    pub metadata: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// The span the call continues (its parent); `None`: the span of
    /// `opentelemetry::Context::current()`, if there is one.
    pub trace: Option<TraceContext>,
}

impl CallOptions {
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Pins the call to one instance of the target app (its [`SidecarClient::instance_id`]):
    /// no other instance takes it, and NOT_FOUND comes back when that one is not live.
    pub fn instance(self, instance_id: impl Into<String>) -> Self {
        self.header(TARGET_INSTANCE, instance_id)
    }

    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Makes the call continue `trace` (e.g. the app's own span); `None` keeps the default.
    pub fn trace_context(mut self, trace: Option<TraceContext>) -> Self {
        self.trace = trace;
        self
    }
}

/// An answer from another app: its bytes, content type and response metadata.
#[derive(Debug, Clone)]
pub struct Response {
    pub data: Vec<u8>,
    pub content_type: String,
    pub metadata: MetadataMap,
}

/// A stored value and its version (pass the ETag back to write only if nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    pub value: Vec<u8>,
    pub etag: String,
}

/// What must hold for one write of [`SidecarClient::write_state_atomically`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteCondition {
    /// The key still has this ETag.
    Etag(String),
    /// The key does not exist yet.
    Absent,
    /// Whatever the key holds: the write wins (last-write concurrency).
    Any,
}

/// One conditional write of an atomic batch.
#[derive(Debug, Clone)]
pub struct ConditionalWrite {
    pub key: String,
    pub value: Vec<u8>,
    pub condition: WriteCondition,
}

/// One event of a bulk publish; `entry_id` (unique in the request) names it if it fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkEntry {
    pub entry_id: String,
    pub data: Vec<u8>,
    /// Empty: JSON when the data parses as JSON, bytes otherwise.
    pub content_type: String,
}

impl BulkEntry {
    pub fn new(entry_id: impl Into<String>, data: impl Into<Vec<u8>>, content_type: &str) -> Self {
        BulkEntry { entry_id: entry_id.into(), data: data.into(), content_type: content_type.into() }
    }
}

/// An entry of a bulk publish that was not published, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkFailure {
    pub entry_id: String,
    pub error: String,
}

/// The environment variable an app's sidecar API token comes from (Dapr's).
pub const API_TOKEN_VARIABLE: &str = "DAPR_API_TOKEN";
/// The header (gRPC metadata key) that carries it.
const API_TOKEN_HEADER: &str = "dapr-api-token";

/// The channel to the sidecar: one connection, with the API token on every call.
pub(crate) type Channel = InterceptedService<GrpcConnection, ApiToken>;

/// Adds the sidecar's API token to every call, when the app has one.
#[derive(Clone)]
pub(crate) struct ApiToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ApiToken(set)" } else { "ApiToken(none)" })
    }
}

impl Interceptor for ApiToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert(API_TOKEN_HEADER, token.clone());
        }
        Ok(request)
    }
}

/// A client of the local sidecar. Cheap to clone: clones share one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct SidecarClient {
    pub(crate) inner: DaprClient<Channel>,
    pub(crate) group: TrainingGroupClient<Channel>,
}

impl SidecarClient {
    /// Connects to `address` (`host:port`); the connection is made on first use. Every call
    /// carries `DAPR_API_TOKEN` when the environment sets it, as Dapr's SDKs do.
    pub fn new(address: &str) -> Result<Self, Status> {
        let token = std::env::var(API_TOKEN_VARIABLE).ok();
        Self::with_api_token(address, token.as_deref())
    }

    /// Like [`SidecarClient::new`], with the sidecar's API token given (`None` or empty: none).
    pub fn with_api_token(address: &str, token: Option<&str>) -> Result<Self, Status> {
        let connection =
            GrpcConnection::new(address).map_err(|e| Status::invalid_argument(format!("the sidecar address: {e}")))?;
        let token = token
            .filter(|token| !token.is_empty())
            .map(|token| {
                MetadataValue::try_from(token).map_err(|_| {
                    Status::invalid_argument(format!("{API_TOKEN_VARIABLE} is not valid as a header value"))
                })
            })
            .transpose()?;
        let channel = InterceptedService::new(connection.clone(), ApiToken(token));
        let inner = DaprClient::with_origin(channel.clone(), connection.origin())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let group = TrainingGroupClient::with_origin(channel, connection.origin())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Ok(SidecarClient { inner, group })
    }

    /// Connects to the sidecar on 127.0.0.1 at `DAPR_GRPC_PORT` (50001 when unset), as Dapr SDKs do.
    pub fn from_env() -> Result<Self, Status> {
        let port = std::env::var("DAPR_GRPC_PORT").unwrap_or_else(|_| "50001".into());
        Self::new(&format!("127.0.0.1:{port}"))
    }

    /// Invokes `method` on app `app_id` through the mesh with a byte payload.
    pub async fn invoke(&self, app_id: &str, method: &str, data: impl Into<Vec<u8>>) -> Result<Response, Status> {
        self.invoke_with(app_id, method, data, CallOptions::default()).await
    }

    pub async fn invoke_with(
        &self,
        app_id: &str,
        method: &str,
        data: impl Into<Vec<u8>>,
        options: CallOptions,
    ) -> Result<Response, Status> {
        let message = InvokeRequest {
            method: method.to_string(),
            data: Some(Any { type_url: String::new(), value: data.into() }),
            content_type: options.content_type.clone().unwrap_or_else(|| "application/octet-stream".into()),
            http_extension: None,
        };
        let mut request = Request::new(InvokeServiceRequest { id: app_id.to_string(), message: Some(message) });
        apply_options(&mut request, &options)?;
        let mut client = self.inner.clone();
        let response = within(options.timeout, client.invoke_service(request), |timeout| {
            format!("no answer from app-id '{app_id}' within {timeout:?}")
        })
        .await?;
        let metadata = response.metadata().clone();
        let response = response.into_inner();
        Ok(Response {
            data: response.data.map(|any| any.value).unwrap_or_default(),
            content_type: response.content_type,
            metadata,
        })
    }

    /// Publishes `data` to `topic` of pub/sub component `pubsub`; returns once the event is
    /// stored durably (delivery happens after).
    pub async fn publish(
        &self,
        pubsub: &str,
        topic: &str,
        data: impl Into<Vec<u8>>,
        content_type: &str,
    ) -> Result<(), Status> {
        self.publish_with(pubsub, topic, data, content_type, CallOptions::default()).await
    }

    /// Like [`SidecarClient::publish`], with a deadline, metadata and the trace the event
    /// belongs to (its deliveries continue it) given in `options`.
    pub async fn publish_with(
        &self,
        pubsub: &str,
        topic: &str,
        data: impl Into<Vec<u8>>,
        content_type: &str,
        options: CallOptions,
    ) -> Result<(), Status> {
        let mut request = Request::new(PublishEventRequest {
            pubsub_name: pubsub.into(),
            topic: topic.into(),
            data: data.into().into(),
            data_content_type: content_type.into(),
            metadata: Default::default(),
        });
        apply_options(&mut request, &options)?;
        let mut client = self.inner.clone();
        within(options.timeout, client.publish_event(request), |timeout| {
            format!("the sidecar did not confirm the publish within {timeout:?}")
        })
        .await?;
        Ok(())
    }

    /// Publishes each of `entries` to `topic` as its own event; returns once those published
    /// are stored durably. The entries that were not published come back with the reason
    /// (none when all were); the call itself fails only for a bad request (an unknown
    /// pub/sub, an empty topic, a missing or repeated entry id).
    pub async fn bulk_publish(
        &self,
        pubsub: &str,
        topic: &str,
        entries: Vec<BulkEntry>,
    ) -> Result<Vec<BulkFailure>, Status> {
        let request = BulkPublishRequest {
            pubsub_name: pubsub.into(),
            topic: topic.into(),
            entries: entries
                .into_iter()
                .map(|e| BulkPublishRequestEntry {
                    entry_id: e.entry_id,
                    event: e.data,
                    content_type: e.content_type,
                    metadata: Default::default(),
                })
                .collect(),
            metadata: Default::default(),
        };
        let response = self.inner.clone().bulk_publish_event(request).await?.into_inner();
        Ok(response.failed_entries.into_iter().map(|f| BulkFailure { entry_id: f.entry_id, error: f.error }).collect())
    }

    /// The value of `key` in `store` and its ETag; `None` when the key does not exist.
    pub async fn get_state(&self, store: &str, key: &str) -> Result<Option<StateEntry>, Status> {
        let request = GetStateRequest { store_name: store.into(), key: key.into(), ..Default::default() };
        let found = self.inner.clone().get_state(request).await?.into_inner();
        Ok((!found.etag.is_empty()).then_some(StateEntry { value: found.data, etag: found.etag }))
    }

    /// Saves `value` under `key` (last write wins).
    pub async fn save_state(&self, store: &str, key: &str, value: impl Into<Vec<u8>>) -> Result<(), Status> {
        self.save_state_with(store, key, value, None, None).await
    }

    /// Saves `value` under `key`, only if the key still has `etag` when one is given (ABORTED
    /// otherwise), expiring after `ttl` when one is given.
    pub async fn save_state_with(
        &self,
        store: &str,
        key: &str,
        value: impl Into<Vec<u8>>,
        etag: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<(), Status> {
        let metadata =
            ttl.map(|ttl| [("ttlInSeconds".to_string(), ttl.as_secs().max(1).to_string())].into()).unwrap_or_default();
        let item = StateItem {
            key: key.into(),
            value: value.into(),
            etag: etag.map(|value| Etag { value: value.into() }),
            metadata,
            options: None,
        };
        self.inner.clone().save_state(SaveStateRequest { store_name: store.into(), states: vec![item] }).await?;
        Ok(())
    }

    /// Saves `value` under `key` only if the key does not exist yet (first write wins, without
    /// an ETag): `Ok(true)` when written, `Ok(false)` when the key was already there.
    pub async fn save_state_if_absent(
        &self,
        store: &str,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<bool, Status> {
        let item = StateItem {
            key: key.into(),
            value: value.into(),
            etag: None,
            metadata: Default::default(),
            options: Some(StateOptions { concurrency: StateConcurrency::ConcurrencyFirstWrite as i32, consistency: 0 }),
        };
        match self.inner.clone().save_state(SaveStateRequest { store_name: store.into(), states: vec![item] }).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::Aborted => Ok(false),
            Err(status) => Err(status),
        }
    }

    /// Applies `writes` as one state transaction: every condition holds and all are written
    /// (`Ok(true)`), or one fails and none is (`Ok(false)`).
    pub async fn write_state_atomically(&self, store: &str, writes: Vec<ConditionalWrite>) -> Result<bool, Status> {
        let operations = writes
            .into_iter()
            .map(|write| {
                // First-write concurrency: with an ETag it must match, without one the key must be
                // absent; `Any` writes with last-write concurrency, unconditionally.
                let (etag, concurrency) = match write.condition {
                    WriteCondition::Etag(value) => (Some(Etag { value }), StateConcurrency::ConcurrencyFirstWrite),
                    WriteCondition::Absent => (None, StateConcurrency::ConcurrencyFirstWrite),
                    WriteCondition::Any => (None, StateConcurrency::ConcurrencyLastWrite),
                };
                let request = StateItem {
                    key: write.key,
                    value: write.value,
                    etag,
                    metadata: Default::default(),
                    options: Some(StateOptions { concurrency: concurrency as i32, consistency: 0 }),
                };
                TransactionalStateOperation { operation_type: "upsert".into(), request: Some(request) }
            })
            .collect();
        let request =
            ExecuteStateTransactionRequest { store_name: store.into(), operations, metadata: Default::default() };
        match self.inner.clone().execute_state_transaction(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::Aborted => Ok(false),
            Err(status) => Err(status),
        }
    }

    /// Deletes `key` (only if it still has `etag`, when one is given).
    pub async fn delete_state(&self, store: &str, key: &str, etag: Option<&str>) -> Result<(), Status> {
        let request = DeleteStateRequest {
            store_name: store.into(),
            key: key.into(),
            etag: etag.map(|value| Etag { value: value.into() }),
            ..Default::default()
        };
        self.inner.clone().delete_state(request).await?;
        Ok(())
    }

    /// The sidecar's own description (app-id, runtime version, connection properties).
    pub async fn metadata(&self) -> Result<GetMetadataResponse, Status> {
        Ok(self.inner.clone().get_metadata(GetMetadataRequest {}).await?.into_inner())
    }

    /// This instance's id in the mesh (its sidecar's `tandem.instance-id`): what another
    /// instance pins a call to with [`CallOptions::instance`]. It changes when the sidecar restarts.
    pub async fn instance_id(&self) -> Result<String, Status> {
        let metadata = self.metadata().await?;
        metadata
            .extended_metadata
            .get(INSTANCE_ID_KEY)
            .cloned()
            .ok_or_else(|| Status::internal(format!("the sidecar's metadata has no '{INSTANCE_ID_KEY}'")))
    }

    /// Sets `key` of the sidecar's extended metadata (shown by [`SidecarClient::metadata`]).
    pub async fn set_metadata(&self, key: &str, value: &str) -> Result<(), Status> {
        let request = SetMetadataRequest { key: key.into(), value: value.into() };
        self.inner.clone().set_metadata(request).await?;
        Ok(())
    }

    /// Asks the sidecar to shut down gracefully.
    pub async fn shutdown(&self) -> Result<(), Status> {
        self.inner.clone().shutdown(ShutdownRequest {}).await?;
        Ok(())
    }
}

/// Waits for `call` at most `timeout` (when there is one), then answers DEADLINE_EXCEEDED with
/// `message(timeout)`. The sidecar gets the deadline too (`grpc-timeout`) and answers it
/// itself; this bounds the wait should it not answer at all.
async fn within<T>(
    timeout: Option<Duration>,
    call: impl Future<Output = Result<T, Status>>,
    message: impl FnOnce(Duration) -> String,
) -> Result<T, Status> {
    match timeout {
        None => call.await,
        Some(timeout) => {
            tokio::time::timeout(timeout, call).await.map_err(|_| Status::deadline_exceeded(message(timeout)))?
        }
    }
}

fn apply_options<T>(request: &mut Request<T>, options: &CallOptions) -> Result<(), Status> {
    if let Some(timeout) = options.timeout {
        request.set_timeout(timeout);
    }
    for (key, value) in &options.metadata {
        let name = MetadataKey::from_bytes(key.as_bytes())
            .map_err(|_| Status::invalid_argument(format!("'{key}' is not a valid metadata key")))?;
        let value = MetadataValue::try_from(value.as_str())
            .map_err(|_| Status::invalid_argument(format!("the value of metadata '{key}' is not valid ASCII")))?;
        request.metadata_mut().insert(name, value);
    }
    if let Some(trace) = options.trace.clone().or_else(TraceContext::current) {
        trace.inject(request.metadata_mut());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn an_address_without_a_port_is_refused_by_name() {
        let status = SidecarClient::new("localhost").unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("'localhost'") && status.message().contains("host:port"), "{status:?}");
        assert!(SidecarClient::new("127.0.0.1:50001").is_ok());
    }

    #[tokio::test]
    async fn a_call_that_outlives_its_deadline_answers_deadline_exceeded() {
        let never = std::future::pending::<Result<(), Status>>();
        let status =
            within(Some(Duration::from_millis(20)), never, |t| format!("nothing within {t:?}")).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(status.message(), "nothing within 20ms");
        let answered = within(Some(Duration::from_secs(60)), async { Ok(7) }, |_| String::new()).await;
        assert_eq!(answered.unwrap(), 7);
        assert_eq!(within(None, async { Ok(8) }, |_| String::new()).await.unwrap(), 8);
    }
}
