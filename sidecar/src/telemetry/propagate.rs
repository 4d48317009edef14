//! Trace context without OpenTelemetry spans: what tandemd's spans carry when no span is
//! exported (no `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! Every hop must still continue its caller's trace, so that a collector behind the app or a
//! later hop sees one trace. But an OpenTelemetry span per hop that nobody exports was about
//! a tenth of each sidecar's CPU under pub/sub load (BENCHMARKS.md): `tracing-opentelemetry`
//! collects its attributes and builds and ends an SDK span. [`PropagationLayer`] instead keeps
//! one [`SpanContext`] per span in the span's extensions: the parent's trace id, a new span id,
//! and the sampling decision of the configured sampler (`OTEL_TRACES_SAMPLER`), as the SDK
//! would have made it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceState};
use opentelemetry_sdk::trace::{Config, IdGenerator, SamplingDecision, ShouldSample};
use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The span context a span carries in its extensions.
#[derive(Clone)]
struct Carried(SpanContext);

/// The sampler and id generator of the OpenTelemetry environment, read once.
struct Ids {
    sampler: Box<dyn ShouldSample>,
    ids: Box<dyn IdGenerator>,
}

fn ids() -> &'static Ids {
    static IDS: OnceLock<Ids> = OnceLock::new();
    IDS.get_or_init(|| {
        let config = Config::default();
        Ids { sampler: config.sampler, ids: config.id_generator }
    })
}

/// Set once the layer is installed as the process's span layer.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Whether this process carries trace context with [`PropagationLayer`] (else through
/// OpenTelemetry spans).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// A new span's context, child of `parent` (a new trace when there is none).
fn child_of(parent: Option<&SpanContext>, name: &str) -> SpanContext {
    continued(parent, name, ids().ids.new_span_id())
}

/// The context of span `span_id` as a child of `parent`: its trace, the sampler's decision.
fn continued(parent: Option<&SpanContext>, name: &str, span_id: SpanId) -> SpanContext {
    let ids = ids();
    let parent = parent.filter(|p| p.is_valid());
    let trace_id = parent.map_or_else(|| ids.ids.new_trace_id(), |p| p.trace_id());
    let parent_context = parent.map(|p| opentelemetry::Context::new().with_remote_span_context(p.clone()));
    let sampling = ids.sampler.should_sample(parent_context.as_ref(), trace_id, name, &SpanKind::Internal, &[], &[]);
    let flags = match sampling.decision {
        SamplingDecision::RecordAndSample => TraceFlags::SAMPLED,
        SamplingDecision::Drop | SamplingDecision::RecordOnly => TraceFlags::default(),
    };
    let state = if sampling.trace_state.header().is_empty() {
        parent.map_or_else(TraceState::default, |p| p.trace_state().clone())
    } else {
        sampling.trace_state
    };
    SpanContext::new(trace_id, span_id, flags, false, state)
}

/// Gives each span it sees (filter it to tandemd's spans) a span context: see the module docs.
pub struct PropagationLayer(());

impl PropagationLayer {
    /// The layer for the process's subscriber; [`installed`] says so from now on.
    pub fn install() -> Self {
        INSTALLED.store(true, Ordering::Relaxed);
        PropagationLayer(())
    }

    #[cfg(test)]
    pub(super) fn for_test() -> Self {
        PropagationLayer(())
    }
}

impl<S> Layer<S> for PropagationLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let parent = if let Some(parent) = attrs.parent() {
            ctx.span(parent)
        } else if attrs.is_contextual() {
            ctx.lookup_current()
        } else {
            None
        };
        let parent = parent.and_then(|p| p.extensions().get::<Carried>().map(|c| c.0.clone()));
        let context = child_of(parent.as_ref(), attrs.metadata().name());
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Carried(context));
        }
    }
}

/// Runs `f` on `span`'s carried context, when the propagation layer gave it one.
fn with_carried<T>(span: &tracing::Span, f: impl FnOnce(&mut SpanContext) -> T) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let span = registry.span(id)?;
        let mut extensions = span.extensions_mut();
        extensions.get_mut::<Carried>().map(|carried| f(&mut carried.0))
    })
    .flatten()
}

/// `span`'s context, when the propagation layer gave it one.
pub fn of_span(span: &tracing::Span) -> Option<SpanContext> {
    with_carried(span, |context| context.clone())
}

/// Makes `span` (given a context by the layer) a child of `parent`; `false` when the span has
/// no context of the layer's.
pub fn set_parent(span: &tracing::Span, parent: &SpanContext) -> bool {
    let name = span.metadata().map_or("span", |m| m.name());
    // The span keeps its own id; trace, flags and state come from the new parent.
    with_carried(span, |context| *context = continued(Some(parent), name, context.span_id())).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn with_layer(test: impl FnOnce()) {
        let subscriber = tracing_subscriber::registry().with(PropagationLayer::for_test());
        tracing::subscriber::with_default(subscriber, test);
    }

    #[test]
    fn children_continue_their_parents_trace_with_ids_of_their_own() {
        with_layer(|| {
            let root = tracing::info_span!("root");
            let root_context = of_span(&root).expect("the layer gives every span a context");
            assert!(root_context.is_valid() && root_context.is_sampled(), "a new trace, sampled by default");
            let child = root.in_scope(|| tracing::info_span!("child"));
            let child_context = of_span(&child).unwrap();
            assert_eq!(child_context.trace_id(), root_context.trace_id());
            assert_ne!(child_context.span_id(), root_context.span_id());
            let other = tracing::info_span!(parent: None, "other");
            assert_ne!(of_span(&other).unwrap().trace_id(), root_context.trace_id(), "no parent, a new trace");
        });
    }

    #[test]
    fn a_remote_parent_gives_its_trace_and_sampling_decision() {
        with_layer(|| {
            let remote = crate::telemetry::context::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                Some("vendor=x"),
            )
            .unwrap();
            let span = tracing::info_span!("call");
            let own = of_span(&span).unwrap().span_id();
            assert!(set_parent(&span, &remote));
            let context = of_span(&span).unwrap();
            assert_eq!(context.trace_id(), remote.trace_id());
            assert_eq!(context.span_id(), own, "the span keeps its id");
            assert!(!context.is_sampled(), "an unsampled parent's child is not sampled (parent-based default)");
            assert_eq!(context.trace_state().header(), "vendor=x");
            let child = span.in_scope(|| tracing::info_span!("child"));
            assert_eq!(of_span(&child).unwrap().trace_id(), remote.trace_id());
        });
    }

    #[test]
    fn without_the_layer_spans_carry_nothing() {
        let span = tracing::info_span!("alone");
        assert!(of_span(&span).is_none());
        assert!(!set_parent(&span, &SpanContext::empty_context()));
    }
}
