//! Serving the app-callback API from handler functions.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tandem_sdk::{AppServer, Reply};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! AppServer::new()
//!     .handler("echo", |call| async move { Ok(Reply::bytes(call.data)) })
//!     .serve(listener, std::future::pending())
//!     .await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::common::{InvokeRequest, InvokeResponse};
use tandem_proto::prost_types::Any;
use tandem_proto::prost_types::value::Kind;
use tandem_proto::runtime::app_callback_health_check_server::{AppCallbackHealthCheck, AppCallbackHealthCheckServer};
use tandem_proto::runtime::app_callback_server::{AppCallback, AppCallbackServer};
use tandem_proto::runtime::topic_event_response::TopicEventResponseStatus;
use tandem_proto::runtime::{
    HealthCheckResponse, ListTopicSubscriptionsResponse, TopicEventRequest, TopicEventResponse, TopicRoutes,
    TopicSubscription,
};
use tandem_transport::token::{ApiToken, ApiTokenLayer};
use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use tower::Layer;

use crate::TraceContext;

/// One call delivered to the app.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub method: String,
    pub data: Vec<u8>,
    pub content_type: String,
    /// For a call made through Dapr's HTTP API: its verb (`GET`, `POST`, ...); empty otherwise.
    pub http_verb: String,
    /// For a call made through Dapr's HTTP API: its query string, as sent.
    pub query_string: String,
    /// The caller's app-id, set by the sidecars (never by the caller itself).
    pub caller_app_id: Option<String>,
    pub metadata: MetadataMap,
    /// The span of the sidecar that delivered the call: the parent of the handler's spans.
    pub trace: Option<TraceContext>,
}

/// A handler's answer.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub data: Vec<u8>,
    pub content_type: String,
    /// Response metadata, handed back to the calling app.
    pub metadata: Vec<(String, String)>,
}

impl Reply {
    pub fn bytes(data: impl Into<Vec<u8>>) -> Self {
        Reply { data: data.into(), content_type: "application/octet-stream".into(), metadata: Vec::new() }
    }

    pub fn text(text: impl Into<String>) -> Self {
        Reply { data: text.into().into_bytes(), content_type: "text/plain".into(), metadata: Vec::new() }
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }
}

/// One pub/sub event delivered to the app.
#[derive(Debug, Clone)]
pub struct TopicEvent {
    pub id: String,
    pub source: String,
    pub kind: String,
    pub pubsub_name: String,
    pub topic: String,
    pub data: Vec<u8>,
    pub data_content_type: String,
    /// The route of the subscription that took the event ([`SubscriptionOptions::route`]);
    /// empty when it has none.
    pub path: String,
    /// The trace the event belongs to: the span of the sidecar that delivered it when the
    /// delivery carried one, else the publisher's span from the CloudEvent's `traceparent`
    /// extension.
    pub trace: Option<TraceContext>,
}

/// How to subscribe: what happens to events that exhaust their deliveries, and their route.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionOptions {
    /// Where events that exhaust their deliveries go (a topic of the same component); empty:
    /// they are dropped.
    pub dead_letter_topic: String,
    /// The subscription's default route (Dapr's `routes.default`), handed back with every
    /// event as [`TopicEvent::path`]. Dapr's `match` rules are not supported by tandemd.
    pub route: String,
    /// Receive this topic's events in publish order (per publisher), one at a time; a
    /// retried event holds back the ones after it.
    pub ordered: bool,
}

impl From<TopicEventRequest> for TopicEvent {
    fn from(event: TopicEventRequest) -> TopicEvent {
        let extension = |name: &str| match event.extensions.as_ref()?.fields.get(name)?.kind.as_ref()? {
            Kind::StringValue(value) => Some(value.as_str()),
            _ => None,
        };
        let trace = extension(crate::trace::TRACEPARENT)
            .and_then(|traceparent| TraceContext::parse(traceparent, extension(crate::trace::TRACESTATE)));
        TopicEvent {
            trace,
            id: event.id,
            source: event.source,
            kind: event.r#type,
            pubsub_name: event.pubsub_name,
            topic: event.topic,
            data: event.data.into(),
            data_content_type: event.data_content_type,
            path: event.path,
        }
    }
}

/// What the app did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// Processed; not delivered again.
    Success,
    /// Deliver it again later.
    Retry,
    /// Not processed, and not to be delivered again.
    Drop,
}

impl From<EventOutcome> for TopicEventResponseStatus {
    fn from(outcome: EventOutcome) -> Self {
        match outcome {
            EventOutcome::Success => TopicEventResponseStatus::Success,
            EventOutcome::Retry => TopicEventResponseStatus::Retry,
            EventOutcome::Drop => TopicEventResponseStatus::Drop,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(Invocation) -> BoxFuture<Result<Reply, Status>> + Send + Sync>;
type HealthCheck = Arc<dyn Fn() -> BoxFuture<Result<(), Status>> + Send + Sync>;
type EventHandler = Arc<dyn Fn(TopicEvent) -> BoxFuture<EventOutcome> + Send + Sync>;

struct Subscription {
    options: SubscriptionOptions,
    handler: EventHandler,
}

/// The variable holding the token the app requires of its sidecar (Dapr's name).
pub const APP_API_TOKEN_VARIABLE: &str = "APP_API_TOKEN";

/// The app's callback server: a handler per method, a handler per subscribed topic and an
/// optional health check.
#[derive(Clone, Default)]
pub struct AppServer {
    handlers: HashMap<String, Handler>,
    subscriptions: HashMap<(String, String), Arc<Subscription>>,
    health: Option<HealthCheck>,
    token: Option<ApiToken>,
}

impl AppServer {
    /// A server that, when `APP_API_TOKEN` is set (and not empty), requires every call to carry
    /// it in `dapr-api-token`, as the sidecar started with the same variable sends it: any
    /// other caller is answered UNAUTHENTICATED before a handler runs.
    pub fn new() -> Self {
        let token = std::env::var(APP_API_TOKEN_VARIABLE).ok();
        Self::default().app_api_token(token.as_deref())
    }

    /// Requires `token` of every call (`None` or empty: no token required).
    pub fn app_api_token(mut self, token: Option<&str>) -> Self {
        self.token = token.filter(|token| !token.is_empty()).map(|token| ApiToken::new(token, "this app"));
        self
    }

    /// Registers the handler of `method`; calls to methods without one answer UNIMPLEMENTED.
    pub fn handler<F, Fut>(mut self, method: &str, handler: F) -> Self
    where
        F: Fn(Invocation) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, Status>> + Send + 'static,
    {
        self.handlers.insert(method.to_string(), Arc::new(move |call| Box::pin(handler(call))));
        self
    }

    /// Subscribes to `topic` of pub/sub component `pubsub`; `handler` decides each event's fate.
    pub fn subscribe<F, Fut>(self, pubsub: &str, topic: &str, handler: F) -> Self
    where
        F: Fn(TopicEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = EventOutcome> + Send + 'static,
    {
        self.subscribe_with_dead_letter(pubsub, topic, "", handler)
    }

    /// Like [`AppServer::subscribe`]; events that exhaust their deliveries go to
    /// `dead_letter_topic` (of the same component) instead of being dropped.
    pub fn subscribe_with_dead_letter<F, Fut>(
        self,
        pubsub: &str,
        topic: &str,
        dead_letter_topic: &str,
        handler: F,
    ) -> Self
    where
        F: Fn(TopicEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = EventOutcome> + Send + 'static,
    {
        let options = SubscriptionOptions { dead_letter_topic: dead_letter_topic.to_string(), ..Default::default() };
        self.subscribe_with(pubsub, topic, options, handler)
    }

    /// Like [`AppServer::subscribe`], with a dead-letter topic and a route (see
    /// [`SubscriptionOptions`]).
    pub fn subscribe_with<F, Fut>(mut self, pubsub: &str, topic: &str, options: SubscriptionOptions, handler: F) -> Self
    where
        F: Fn(TopicEvent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = EventOutcome> + Send + 'static,
    {
        let handler: EventHandler = Arc::new(move |event| Box::pin(handler(event)));
        let subscription = Subscription { options, handler };
        self.subscriptions.insert((pubsub.to_string(), topic.to_string()), Arc::new(subscription));
        self
    }

    /// Answers the sidecar's health probe; without one the app counts as healthy while it serves.
    pub fn health_check<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        self.health = Some(Arc::new(move || Box::pin(check())));
        self
    }

    /// Serves on `listener` (TCP_NODELAY on; a busy connection's writes sent together:
    /// [`tandem_transport::Coalescing`]) until `shutdown` resolves, then stops accepting and
    /// gives the calls in flight up to [`DRAIN`] to finish.
    ///
    /// A handler runs to its end even after the caller's deadline has passed: the sidecar
    /// answers the caller DEADLINE_EXCEEDED itself, and the server does not arm a timer per
    /// call to cancel the handler (tonic's `Server` did, at a cost on every call).
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let health = HealthService { check: self.health.clone() };
        let token = ApiTokenLayer::new(self.token.clone());
        let routes = Routes::new(
            AppCallbackServer::new(self).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX),
        )
        .add_service(AppCallbackHealthCheckServer::new(health));
        tandem_transport::serve_grpc(listener, token.layer(routes), shutdown, DRAIN).await
    }
}

/// How long [`AppServer::serve`] waits, once told to stop, for the calls in flight.
pub const DRAIN: Duration = Duration::from_secs(10);

#[tonic::async_trait]
impl AppCallback for AppServer {
    async fn on_invoke(&self, request: Request<InvokeRequest>) -> Result<Response<InvokeResponse>, Status> {
        let metadata = request.metadata().clone();
        let caller_app_id = metadata.get(crate::CALLER_APP_ID).and_then(|v| v.to_str().ok()).map(String::from);
        let message = request.into_inner();
        let handler = self
            .handlers
            .get(&message.method)
            .ok_or_else(|| Status::unimplemented(format!("this app has no handler for method '{}'", message.method)))?;
        let (http_verb, query_string) = match message.http_extension {
            Some(http) => {
                let verb = tandem_proto::common::http_extension::Verb::try_from(http.verb)
                    .map(|verb| verb.as_str_name().to_string())
                    .unwrap_or_default();
                (if verb == "NONE" { String::new() } else { verb }, http.querystring)
            }
            None => (String::new(), String::new()),
        };
        let call = Invocation {
            method: message.method,
            data: message.data.map(|any| any.value).unwrap_or_default(),
            content_type: message.content_type,
            http_verb,
            query_string,
            caller_app_id,
            trace: TraceContext::from_metadata(&metadata),
            metadata,
        };
        let reply = handler(call).await?;
        let mut response = Response::new(InvokeResponse {
            data: Some(Any { type_url: String::new(), value: reply.data }),
            content_type: reply.content_type,
        });
        for (key, value) in reply.metadata {
            let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes())
                .map_err(|_| Status::internal(format!("the handler set an invalid metadata key '{key}'")))?;
            let value = value
                .parse()
                .map_err(|_| Status::internal(format!("the handler set a non-ASCII value for metadata '{key}'")))?;
            response.metadata_mut().insert(key, value);
        }
        Ok(response)
    }

    async fn list_topic_subscriptions(
        &self,
        _: Request<()>,
    ) -> Result<Response<ListTopicSubscriptionsResponse>, Status> {
        let mut subscriptions: Vec<TopicSubscription> = self
            .subscriptions
            .iter()
            .map(|((pubsub, topic), subscription)| TopicSubscription {
                pubsub_name: pubsub.clone(),
                topic: topic.clone(),
                metadata: if subscription.options.ordered {
                    HashMap::from([(tandem_proto::SUBSCRIPTION_ORDERED.to_string(), "true".to_string())])
                } else {
                    HashMap::new()
                },
                routes: Some(TopicRoutes { rules: Vec::new(), default: subscription.options.route.clone() }),
                dead_letter_topic: subscription.options.dead_letter_topic.clone(),
            })
            .collect();
        subscriptions.sort_by(|a, b| (&a.pubsub_name, &a.topic).cmp(&(&b.pubsub_name, &b.topic)));
        Ok(Response::new(ListTopicSubscriptionsResponse { subscriptions }))
    }

    async fn on_topic_event(
        &self,
        request: Request<TopicEventRequest>,
    ) -> Result<Response<TopicEventResponse>, Status> {
        let hop = TraceContext::from_metadata(request.metadata());
        let event = request.into_inner();
        let Some(subscription) = self.subscriptions.get(&(event.pubsub_name.clone(), event.topic.clone())) else {
            tracing::warn!(pubsub = %event.pubsub_name, topic = %event.topic, "event for a topic this app does not subscribe to; dropped");
            return Ok(Response::new(TopicEventResponse { status: TopicEventResponseStatus::Drop as i32 }));
        };
        let mut event = TopicEvent::from(event);
        if hop.is_some() {
            event.trace = hop;
        }
        let status = TopicEventResponseStatus::from((subscription.handler)(event).await);
        Ok(Response::new(TopicEventResponse { status: status as i32 }))
    }
}

struct HealthService {
    check: Option<HealthCheck>,
}

#[tonic::async_trait]
impl AppCallbackHealthCheck for HealthService {
    async fn health_check(&self, _: Request<()>) -> Result<Response<HealthCheckResponse>, Status> {
        if let Some(check) = &self.check {
            check().await?;
        }
        Ok(Response::new(HealthCheckResponse {}))
    }
}
