//! The admin HTTP server: liveness, readiness and Dapr's health paths (metrics join later).
//!
//! - `GET /healthz`: 200 while the process serves at all.
//! - `GET /readyz`: 200 when registered in etcd, the routing table is loaded and the app's
//!   health check passes; 503 with
//!   every reason otherwise.
//! - `GET /v1.0/healthz`: Dapr's readiness path, 204 when ready, 500 otherwise.
//! - `GET /v1.0/healthz/outbound`: 204 once the sidecar can route calls (routing table
//!   loaded from etcd), 500 before. Dapr SDKs poll it before they connect.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

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
        .route("/v1.0/healthz", get(dapr_healthz))
        .route("/v1.0/healthz/outbound", get(dapr_outbound))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { readiness, routing, metrics, pubsubs })
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
fn not_ready_reasons(state: &AdminState) -> Vec<String> {
    let mut reasons = state.readiness.check().err().unwrap_or_default();
    if !state.routing.current().synced {
        reasons.push("routing table not loaded from etcd yet".into());
    }
    reasons
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    let reasons = not_ready_reasons(&state);
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; ")))
    }
}

async fn dapr_healthz(State(state): State<AdminState>) -> StatusCode {
    if not_ready_reasons(&state).is_empty() { StatusCode::NO_CONTENT } else { StatusCode::INTERNAL_SERVER_ERROR }
}

async fn dapr_outbound(State(state): State<AdminState>) -> StatusCode {
    if state.routing.current().synced && !state.readiness.is_shutting_down() {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}
