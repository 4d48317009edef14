//! The connection from the sidecar to its own app, in the app's protocol (`--app-protocol`):
//! [`grpc`] (Dapr's `AppCallback` services) or [`http`] (Dapr's HTTP app contract: methods as
//! paths, `GET /dapr/subscribe`, CloudEvents POSTed to routes). [`AppChannel`] is what the rest
//! of the sidecar sees: invoke a method, hand over an event, list subscriptions, probe health.
//!
//! Failures are gRPC statuses either way; a call that provably never reached the app (the
//! connection was refused) carries tonic's `ConnectError` as its source, which
//! [`crate::invoke::channels::never_sent`] recognizes, so another instance may take it.

pub mod grpc;
pub mod http;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::common::{InvokeRequest, InvokeResponse};
use tandem_proto::runtime::{TopicEventRequest, TopicEventResponse, TopicSubscription};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::readiness::Readiness;

pub use grpc::GrpcApp;
pub use http::HttpApp;

/// The protocol the app speaks (`--app-protocol`); Dapr's default is HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppProtocol {
    Http,
    Grpc,
}

impl AppProtocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Grpc => "grpc",
        }
    }
}

/// What the app answered an invocation.
#[derive(Debug, Clone, Default)]
pub struct AppAnswer {
    pub message: InvokeResponse,
    /// The app's answer headers that travel back to the caller.
    pub metadata: HashMap<String, String>,
    /// An HTTP app's status code (it answers errors with a status, not a gRPC error).
    pub http_status: Option<u16>,
}

/// The app this sidecar fronts.
#[derive(Debug, Clone)]
pub enum AppChannel {
    Grpc(GrpcApp),
    // Boxed: the HTTP client's pool is large beside a gRPC connection handle.
    Http(Box<HttpApp>),
}

impl AppChannel {
    pub fn address(&self) -> &str {
        match self {
            AppChannel::Grpc(app) => app.address(),
            AppChannel::Http(app) => app.address(),
        }
    }

    pub fn protocol(&self) -> AppProtocol {
        match self {
            AppChannel::Grpc(_) => AppProtocol::Grpc,
            AppChannel::Http(_) => AppProtocol::Http,
        }
    }

    /// Calls the method `request` names; its metadata (caller, trace, deadline) goes along.
    pub async fn invoke(&self, request: Request<InvokeRequest>) -> Result<AppAnswer, Status> {
        match self {
            AppChannel::Grpc(app) => app.invoke(request).await,
            AppChannel::Http(app) => app.invoke(request).await,
        }
    }

    /// Hands a pub/sub event to the app; its answer says what becomes of the event.
    pub async fn topic_event(&self, request: Request<TopicEventRequest>) -> Result<TopicEventResponse, Status> {
        match self {
            AppChannel::Grpc(app) => app.topic_event(request).await,
            AppChannel::Http(app) => app.topic_event(request).await,
        }
    }

    /// The topics the app subscribes to (an app that subscribes to none may not answer at all).
    pub async fn subscriptions(&self) -> Result<Vec<TopicSubscription>, String> {
        match self {
            AppChannel::Grpc(app) => app.subscriptions().await,
            AppChannel::Http(app) => app.subscriptions().await,
        }
    }

    /// One health probe: `None` when healthy, else the reason.
    pub async fn check_health(&self, timeout: Duration) -> Option<String> {
        match self {
            AppChannel::Grpc(app) => app.check_health(timeout).await,
            AppChannel::Http(app) => app.check_health(timeout).await,
        }
    }

    /// Probes every `interval` until `stop`, reporting each change to `readiness`.
    pub async fn probe_health(self, readiness: Arc<Readiness>, interval: Duration, stop: CancellationToken) {
        let mut last: Option<Option<String>> = None;
        loop {
            let problem = self.check_health(interval.max(Duration::from_millis(500))).await;
            if last.as_ref() != Some(&problem) {
                match &problem {
                    None => {
                        tracing::info!(app = %self.address(), protocol = self.protocol().as_str(), "app is healthy")
                    }
                    Some(reason) => tracing::warn!(app = %self.address(), reason, "app is not healthy"),
                }
                readiness.set_app_health(problem.clone());
                last = Some(problem);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
