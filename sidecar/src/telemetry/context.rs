//! W3C trace context (`traceparent`, `tracestate`): read from gRPC metadata (HTTP/2 headers)
//! and CloudEvent extensions, written to outgoing requests and to the CloudEvents of published
//! events.
//!
//! Parsing is done here rather than by a propagator, so that a malformed `traceparent` can be
//! told apart from an absent one (it is counted, then ignored: a new trace starts).

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tandem_proto::prost_types::{Struct, Value, value::Kind};
use tonic::metadata::{MetadataMap, MetadataValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// Dapr's CloudEvent attribute that repeats `traceparent` (kept for Dapr apps that read it).
pub const TRACEID: &str = "traceid";

/// What a request or event said about the trace it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// No `traceparent`: a new trace starts.
    Absent,
    /// A valid `traceparent` (with its `tracestate`, if any): the new span is its child.
    Parent(SpanContext),
    /// A `traceparent` that is not W3C trace context: ignored (a new trace starts) and counted.
    Malformed,
}

impl Incoming {
    fn from_values(traceparent: Option<&str>, tracestate: Option<&str>) -> Incoming {
        match traceparent {
            None => Incoming::Absent,
            Some(value) => parse(value, tracestate).map(Incoming::Parent).unwrap_or(Incoming::Malformed),
        }
    }

    /// The parent context a new span starts from (empty: a new trace).
    pub fn into_context(self) -> opentelemetry::Context {
        match self {
            Incoming::Parent(parent) => opentelemetry::Context::new().with_remote_span_context(parent),
            Incoming::Absent | Incoming::Malformed => opentelemetry::Context::new(),
        }
    }
}

/// The trace context in HTTP/2 request headers (gRPC metadata).
pub fn from_headers(headers: &http::HeaderMap) -> Incoming {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    Incoming::from_values(text(TRACEPARENT), text(TRACESTATE))
}

/// The trace context in a CloudEvent's extensions (set by the publishing sidecar).
pub fn from_extensions(extensions: Option<&Struct>) -> Incoming {
    let text = |name: &str| {
        extensions?.fields.get(name).map(|v| match &v.kind {
            Some(Kind::StringValue(s)) => s.as_str(),
            _ => "\u{0}",
        })
    };
    Incoming::from_values(text(TRACEPARENT), text(TRACESTATE))
}

/// The trace context carried as two plain fields (empty `traceparent`: none), as batched
/// deliveries between sidecars carry one per event.
pub fn from_fields(traceparent: &str, tracestate: &str) -> Incoming {
    Incoming::from_values(
        (!traceparent.is_empty()).then_some(traceparent),
        (!tracestate.is_empty()).then_some(tracestate),
    )
}

/// `span` as (`traceparent`, `tracestate`) field values; empty for an invalid span context.
pub fn to_fields(span: &SpanContext) -> (String, String) {
    if !span.is_valid() {
        return (String::new(), String::new());
    }
    (traceparent(span), span.trace_state().header())
}

/// Parses a `traceparent` (and its `tracestate`) as the W3C Trace Context spec says: version
/// `00` is exactly `00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`; a later version
/// may append fields; version `ff`, all-zero ids and upper-case hex are invalid.
pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let value = traceparent.trim();
    let mut parts = value.split('-');
    let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex(version, 2) || version == "ff" || !lower_hex(trace_id, 32) || !lower_hex(span_id, 16) {
        return None;
    }
    if !lower_hex(flags, 2) || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok().filter(|id| *id != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span_id).ok().filter(|id| *id != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    // Only the sampled bit is defined; the others are not passed on (as the spec asks).
    let flags = TraceFlags::new(flags) & TraceFlags::SAMPLED;
    // A malformed tracestate is dropped on its own; the traceparent still holds.
    let state = tracestate.and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// The `traceparent` value naming `span` as the parent.
pub fn traceparent(span: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", span.trace_id(), span.span_id(), span.trace_flags().to_u8())
}

/// Writes `span` as `traceparent`/`tracestate` onto outgoing gRPC metadata, replacing what
/// was there. An invalid span context (no trace) writes nothing and removes stale values.
pub fn inject_metadata(span: &SpanContext, metadata: &mut MetadataMap) {
    metadata.remove(TRACEPARENT);
    metadata.remove(TRACESTATE);
    if !span.is_valid() {
        return;
    }
    if let Ok(value) = MetadataValue::try_from(traceparent(span)) {
        metadata.insert(TRACEPARENT, value);
    }
    let state = span.trace_state().header();
    if !state.is_empty()
        && let Ok(value) = MetadataValue::try_from(state)
    {
        metadata.insert(TRACESTATE, value);
    }
}

/// Writes `span` into a CloudEvent's extensions as Dapr does: `traceparent`, `tracestate`
/// and `traceid` (the same value as `traceparent`). Other extensions are kept.
pub fn inject_extensions(span: &SpanContext, extensions: &mut Option<Struct>) {
    if !span.is_valid() {
        return;
    }
    let fields = &mut extensions.get_or_insert_with(Struct::default).fields;
    let text = |s: String| Value { kind: Some(Kind::StringValue(s)) };
    let parent = traceparent(span);
    fields.insert(TRACEID.into(), text(parent.clone()));
    fields.insert(TRACEPARENT.into(), text(parent));
    let state = span.trace_state().header();
    if state.is_empty() {
        fields.remove(TRACESTATE);
    } else {
        fields.insert(TRACESTATE.into(), text(state));
    }
}

/// The span context of the `tracing` span `span` (the invalid context when it has none,
/// e.g. when tracing is not set up).
pub fn of_span(span: &tracing::Span) -> SpanContext {
    if super::propagate::installed() {
        return super::propagate::of_span(span).unwrap_or_else(SpanContext::empty_context);
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    span.context().span().span_context().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let parent = parse(VALID, Some("vendor=abc")).unwrap();
        assert_eq!(parent.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id().to_string(), "00f067aa0ba902b7");
        assert!(parent.is_sampled() && parent.is_remote());
        assert_eq!(traceparent(&parent), VALID);
        assert_eq!(parent.trace_state().header(), "vendor=abc");
        // A later version may carry more fields.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra", None).is_some());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(parse(bad, None).is_none(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn plain_fields_carry_the_context_and_tell_absent_from_malformed() {
        let span = parse(VALID, Some("k=v")).unwrap();
        let (parent, state) = to_fields(&span);
        assert_eq!((parent.as_str(), state.as_str()), (VALID, "k=v"));
        assert_eq!(from_fields(&parent, &state), Incoming::Parent(span));
        assert_eq!(from_fields("", ""), Incoming::Absent);
        assert_eq!(from_fields("00-zz", ""), Incoming::Malformed);
        assert_eq!(to_fields(&SpanContext::empty_context()), (String::new(), String::new()));
    }

    #[test]
    fn headers_tell_absent_from_malformed() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(from_headers(&headers), Incoming::Absent);
        headers.insert(TRACEPARENT, "nonsense".parse().unwrap());
        assert_eq!(from_headers(&headers), Incoming::Malformed);
        headers.insert(TRACEPARENT, VALID.parse().unwrap());
        assert!(matches!(from_headers(&headers), Incoming::Parent(_)));
    }

    #[test]
    fn cloud_event_extensions_carry_the_context_like_dapr() {
        let span = parse(VALID, Some("k=v")).unwrap();
        let mut extensions = None;
        inject_extensions(&span, &mut extensions);
        let fields = &extensions.as_ref().unwrap().fields;
        let text = |k: &str| match &fields[k].kind {
            Some(Kind::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(text(TRACEPARENT), VALID);
        assert_eq!(text(TRACEID), VALID);
        assert_eq!(text(TRACESTATE), "k=v");
        assert_eq!(from_extensions(extensions.as_ref()), Incoming::Parent(span));
        assert_eq!(from_extensions(None), Incoming::Absent);
    }

    #[test]
    fn metadata_gets_the_new_parent_and_loses_the_old_one() {
        let mut metadata = MetadataMap::new();
        metadata.insert(TRACEPARENT, "stale".parse().unwrap());
        metadata.insert(TRACESTATE, "stale=1".parse().unwrap());
        inject_metadata(&parse(VALID, None).unwrap(), &mut metadata);
        assert_eq!(metadata.get(TRACEPARENT).unwrap(), VALID);
        assert!(metadata.get(TRACESTATE).is_none());
        inject_metadata(&SpanContext::empty_context(), &mut metadata);
        assert!(metadata.get(TRACEPARENT).is_none());
    }
}
