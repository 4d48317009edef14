//! The admin HTTP server: liveness, readiness and Dapr's health paths (metrics join later).
//!
//! - `GET /healthz`: 200 while the process serves at all.
//! - `GET /readyz`: 200 when registered in etcd, the routing table is loaded and the app's
//!   health check passes; 503 with
//!   every reason otherwise.
//! - `GET /v1.0/healthz`: Dapr's readiness path, 204 when ready, 500 `ERR_HEALTH_NOT_READY`
//!   with the reasons otherwise.
//! - `GET /v1.0/healthz/outbound`: 204 once the sidecar can route calls (routing table
//!   loaded from etcd), 500 `ERR_OUTBOUND_HEALTH_NOT_READY` before. Dapr SDKs poll it before
//!   they connect. Both are also served on the HTTP API's port ([`dapr_health`]).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::api::error::ApiError;
use crate::discovery::RoutingTable;
use crate::metrics::Metrics;
use crate::pubsub::PubSubs;
use crate::readiness::Readiness;

#[derive(Clone)]
struct AdminState {
    readiness: Arc<Readiness>,
    routing: RoutingTable,
    metrics: Arc<Metrics>,
    pubsubs: PubSubs,
}

pub fn router(readiness: Arc<Readiness>, routing: RoutingTable, metrics: Arc<Metrics>, pubsubs: PubSubs) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { readiness: readiness.clone(), routing: routing.clone(), metrics, pubsubs })
        .merge(dapr_health(readiness, routing))
}

/// Dapr's health paths, served on the admin port and on the HTTP API's port alike.
#[derive(Clone)]
struct DaprHealth {
    readiness: Arc<Readiness>,
    routing: RoutingTable,
}

/// `GET /v1.0/healthz` and `GET /v1.0/healthz/outbound`.
pub fn dapr_health(readiness: Arc<Readiness>, routing: RoutingTable) -> Router {
    Router::new()
        .route("/v1.0/healthz", get(dapr_healthz))
        .route("/v1.0/healthz/outbound", get(dapr_outbound))
        .with_state(DaprHealth { readiness, routing })
}

async fn metrics_text(State(state): State<AdminState>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let routing = state.routing.current();
    let live: Vec<(String, usize)> =
        routing.apps().map(|(app, instances)| (app.to_string(), instances.len())).collect();
    let backlogs: Vec<(String, usize)> =
        state.pubsubs.iter().filter_map(|(name, p)| p.backlog().map(|b| (name.clone(), b))).collect();
    let text = state.metrics.render(&live, &backlogs);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

pub async fn serve(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()> + Send + 'static) {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on an admin connection");
        }
    });
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "admin server failed");
    }
}

/// Every reason the sidecar is not ready, none when it is.
fn not_ready_reasons(readiness: &Readiness, routing: &RoutingTable) -> Vec<String> {
    let mut reasons = readiness.check().err().unwrap_or_default();
    if !routing.current().synced {
        reasons.push("routing table not loaded from etcd yet".into());
    }
    reasons
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    let reasons = not_ready_reasons(&state.readiness, &state.routing);
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; ")))
    }
}

async fn dapr_healthz(State(state): State<DaprHealth>) -> Response {
    let reasons = not_ready_reasons(&state.readiness, &state.routing);
    if reasons.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    let message = format!("dapr is not ready: {}", reasons.join("; "));
    ApiError::new(tonic::Code::Unavailable, StatusCode::INTERNAL_SERVER_ERROR, "ERR_HEALTH_NOT_READY", message)
        .into_response()
}

async fn dapr_outbound(State(state): State<DaprHealth>) -> Response {
    if state.routing.current().synced && !state.readiness.is_shutting_down() {
        return StatusCode::NO_CONTENT.into_response();
    }
    let message = if state.readiness.is_shutting_down() {
        "dapr outbound is not ready: shutting down"
    } else {
        "dapr outbound is not ready: routing table not loaded from etcd yet"
    };
    ApiError::new(tonic::Code::Unavailable, StatusCode::INTERNAL_SERVER_ERROR, "ERR_OUTBOUND_HEALTH_NOT_READY", message)
        .into_response()
}
