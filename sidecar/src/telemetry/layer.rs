//! [`TraceLayer`]: a tower layer for tandemd's gRPC servers that makes one server span per
//! call, a child of the caller's `traceparent` when it sent a valid one (a new trace
//! otherwise; a malformed one is counted), and runs the call inside it, so that log lines of
//! the call carry its trace id and the calls it makes continue its trace.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::Instrument;

use super::context::{self, Incoming};

/// Calls whose handlers make a span per item they carry (a batch), so the call gets none.
pub const PER_ITEM_SPANS: &[&str] =
    &["/tandem.internal.v1.Mesh/DeliverEvents", "/tandem.internal.v1.Mesh/StreamDeliverEvents"];

/// Wraps a gRPC service in [`Traced`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner }
    }
}

/// A gRPC service whose calls each run in a server span (see the module docs).
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<R>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if PER_ITEM_SPANS.contains(&request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let span = server_span(request.uri().path(), context::from_headers(request.headers()));
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.instrument(span.clone()).await;
            if let Ok(response) = &response {
                let code = record_status(&span, response.headers());
                // At trace level only: a line per call costs too much at any other.
                let _inside = span.enter();
                tracing::trace!(grpc_status = code.unwrap_or(0), "call answered");
            }
            response
        })
    }
}

/// The span of one call of `path` (`/package.Service/Method`), child of `incoming`.
pub fn server_span(path: &str, incoming: Incoming) -> tracing::Span {
    let name = path.strip_prefix('/').unwrap_or(path);
    let span = tracing::info_span!(
        target: super::SPAN_TARGET,
        "grpc",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    super::start_span(&span, incoming, name);
    span
}

/// A call that failed answers trailers-only, with `grpc-status` among the headers; a call
/// that succeeded sends its status in the trailers later and is left unset (OK).
fn record_status(span: &tracing::Span, headers: &http::HeaderMap) -> Option<i64> {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok())?;
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "error");
    }
    Some(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::counters;

    #[test]
    fn a_malformed_traceparent_is_counted_and_the_call_goes_on() {
        let before = counters().invalid_trace_context.get();
        let span = server_span("/dapr.proto.runtime.v1.Dapr/InvokeService", Incoming::Malformed);
        assert!(counters().invalid_trace_context.get() > before);
        drop(span);
    }
}
