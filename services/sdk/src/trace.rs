//! Trace context for app code: continue, in the app's own spans, the trace that a call or an
//! event belongs to, and hand a span on to the calls the app makes, so that a chain of apps
//! and sidecars is one trace.
//!
//! ```no_run
//! # async fn demo(sidecar: tandem_sdk::SidecarClient, call: tandem_sdk::Invocation) {
//! use opentelemetry::trace::{Span, Tracer};
//! use tandem_sdk::{CallOptions, TraceContext};
//! let tracer = opentelemetry::global::tracer("my-app");
//! // The handler's span, a child of the sidecar's span that delivered the call.
//! let parent = call.trace.as_ref().map(TraceContext::to_context).unwrap_or_default();
//! let span = tracer.start_with_context("handle", &parent);
//! let mine = TraceContext::from_span_context(span.span_context().clone());
//! // The next call continues the trace from the handler's span.
//! let options = CallOptions::default().trace_context(mine);
//! let _ = sidecar.invoke_with("other-app", "method", b"x".to_vec(), options).await;
//! # }
//! ```
//!
//! Without an explicit context, [`crate::SidecarClient`] sends the span of
//! `opentelemetry::Context::current()` when there is one.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tonic::metadata::{MetadataMap, MetadataValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A W3C trace context: the span a call or event came from, or the one to hand on.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceContext {
    span: SpanContext,
}

impl TraceContext {
    /// Parses `traceparent` (and `tracestate`) as W3C Trace Context; `None` when malformed.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let fields_ok = hex(version, 2) && version != "ff" && hex(trace_id, 32) && hex(span_id, 16) && hex(flags, 2);
        if !fields_ok || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace_id).ok().filter(|id| *id != TraceId::INVALID)?;
        let span_id = SpanId::from_hex(span_id).ok().filter(|id| *id != SpanId::INVALID)?;
        let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED;
        let state = tracestate.and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
        Some(TraceContext { span: SpanContext::new(trace_id, span_id, flags, true, state) })
    }

    /// The trace context in gRPC metadata (what the sidecar sends with a call or an event).
    pub fn from_metadata(metadata: &MetadataMap) -> Option<TraceContext> {
        let traceparent = metadata.get(TRACEPARENT)?.to_str().ok()?;
        Self::parse(traceparent, metadata.get(TRACESTATE).and_then(|v| v.to_str().ok()))
    }

    /// A span of the app's own (`span.span_context()`), to hand on; `None` when not valid.
    pub fn from_span_context(span: SpanContext) -> Option<TraceContext> {
        span.is_valid().then_some(TraceContext { span })
    }

    /// The span active in `context`, if any.
    pub fn from_context(context: &opentelemetry::Context) -> Option<TraceContext> {
        Self::from_span_context(context.span().span_context().clone())
    }

    /// The span of `opentelemetry::Context::current()`, if any.
    pub fn current() -> Option<TraceContext> {
        Self::from_context(&opentelemetry::Context::current())
    }

    /// The trace id, 32 hex digits.
    pub fn trace_id(&self) -> String {
        self.span.trace_id().to_string()
    }

    /// The span id, 16 hex digits.
    pub fn span_id(&self) -> String {
        self.span.span_id().to_string()
    }

    pub fn is_sampled(&self) -> bool {
        self.span.is_sampled()
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.span.trace_id(), self.span.span_id(), self.span.trace_flags().to_u8())
    }

    /// The `tracestate` header value (empty when there is none).
    pub fn tracestate(&self) -> String {
        self.span.trace_state().header()
    }

    pub fn span_context(&self) -> &SpanContext {
        &self.span
    }

    /// An OpenTelemetry context with this span as the (remote) parent: pass it to
    /// `Tracer::start_with_context` to make the app's span a child.
    pub fn to_context(&self) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(self.span.clone())
    }

    /// Writes `traceparent` (and `tracestate`) onto outgoing metadata.
    pub(crate) fn inject(&self, metadata: &mut MetadataMap) {
        if let Ok(value) = MetadataValue::try_from(self.traceparent()) {
            metadata.insert(TRACEPARENT, value);
        }
        let state = self.tracestate();
        if !state.is_empty()
            && let Ok(value) = MetadataValue::try_from(state)
        {
            metadata.insert(TRACESTATE, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_garbage_is_refused() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(value, Some("k=v")).unwrap();
        assert_eq!(context.traceparent(), value);
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.tracestate(), "k=v");
        assert!(context.is_sampled());
        let mut metadata = MetadataMap::new();
        context.inject(&mut metadata);
        assert_eq!(TraceContext::from_metadata(&metadata), Some(context));
        for bad in ["", "x", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad}");
        }
        assert!(TraceContext::from_span_context(SpanContext::empty_context()).is_none());
    }
}
