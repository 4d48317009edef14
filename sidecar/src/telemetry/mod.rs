//! Traces and logs: tandemd's spans, W3C trace context carried across every hop, export over
//! OTLP/gRPC, and log lines that carry the trace id of the call they belong to.
//!
//! - [`context`]: `traceparent`/`tracestate` read from and written to gRPC metadata and
//!   CloudEvent extensions.
//! - [`layer`]: [`TraceLayer`], the tower layer that gives every call of the app-facing API
//!   and of the internal API a server span.
//! - [`export`]: the bounded export queue and its thread; spans it drops are counted.
//! - [`log_fields`]: text log lines without the fields meant for OpenTelemetry.
//! - [`propagate`]: when nothing is exported, the span context each span carries, without
//!   OpenTelemetry spans.
//!
//! Spans are `tracing` spans (target [`SPAN_TARGET`]) turned into OpenTelemetry spans by
//! `tracing-opentelemetry`, so a log line written inside a call shows the call's span and its
//! `trace_id` field. Which spans there are, per hop:
//!
//! | where | span | kind | parent |
//! |---|---|---|---|
//! | every API call (invoke, state, publish, ...) | `dapr.proto.runtime.v1.Dapr/<Method>` | server | the app's `traceparent`, or a new trace |
//! | each attempt to reach a peer sidecar | `invoke <app-id>/<method>` | client | the API call |
//! | the callee's sidecar | `tandem.internal.v1.Mesh/Invoke` | server | the attempt |
//! | a pub/sub delivery attempt (publisher's sidecar) | `deliver <topic> to <app-id>` | producer | the publish call (from the CloudEvent) |
//! | the subscriber's sidecar | `tandem.internal.v1.Mesh/DeliverEvent` | server | the delivery attempt |
//!
//! Configuration is OpenTelemetry's standard environment: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; unset: nothing is exported, and each span carries only
//! its trace context, so that it still flows from hop to hop), `OTEL_SERVICE_NAME` (default: the app-id),
//! `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`),
//! `OTEL_BSP_*` for the export queue and `OTEL_EXPORTER_OTLP_TIMEOUT`.

pub mod context;
pub mod export;
pub mod layer;
pub mod log_fields;
pub mod propagate;

use std::sync::LazyLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus_client::metrics::counter::Counter;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Registry;
use tracing_subscriber::filter::{EnvFilter, FilterExt, FilterFn, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

pub use context::Incoming;
pub use export::QueueSettings;
pub use layer::TraceLayer;

use crate::config::LogFormat;

/// The `tracing` target of tandemd's spans: these, and only these, become OpenTelemetry spans.
pub const SPAN_TARGET: &str = "tandem::trace";

/// Counters of what happened to trace context and spans, shown on /metrics. Process-wide,
/// like the tracing subscriber they belong to.
pub struct TraceCounters {
    /// `traceparent` values that were not W3C trace context (ignored; a new trace started).
    pub invalid_trace_context: Counter,
    /// Spans not exported: the export queue was full, or their export failed.
    pub spans_dropped: Counter,
    /// Spans the collector took.
    pub spans_exported: Counter,
}

static COUNTERS: LazyLock<TraceCounters> = LazyLock::new(|| TraceCounters {
    invalid_trace_context: Counter::default(),
    spans_dropped: Counter::default(),
    spans_exported: Counter::default(),
});

pub fn counters() -> &'static TraceCounters {
    &COUNTERS
}

/// Where and how spans are exported, from the OpenTelemetry environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSettings {
    /// The OTLP/gRPC collector; `None`: no export.
    pub endpoint: Option<String>,
    pub service_name: String,
    pub queue: QueueSettings,
}

impl TraceSettings {
    /// Reads the standard variables through `var` (`std::env::var` in tandemd); the service
    /// name defaults to `app_id`.
    pub fn from_vars(app_id: &str, var: impl Fn(&str) -> Option<String>) -> Result<TraceSettings, String> {
        let set = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let endpoint = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"));
        if let Some(endpoint) = &endpoint {
            let uri: http::Uri = endpoint.parse().map_err(|_| {
                format!("OTEL_EXPORTER_OTLP_ENDPOINT '{endpoint}' is not a URL (want http://host:4317)")
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(format!("OTEL_EXPORTER_OTLP_ENDPOINT '{endpoint}' needs http:// or https:// and a host"));
            }
        }
        validate_sampler(set("OTEL_TRACES_SAMPLER").as_deref(), set("OTEL_TRACES_SAMPLER_ARG").as_deref())?;
        let service_name = set("OTEL_SERVICE_NAME").unwrap_or_else(|| app_id.to_string());
        Ok(TraceSettings { endpoint, service_name, queue: QueueSettings::from_vars(&var)? })
    }
}

/// Checks `OTEL_TRACES_SAMPLER`/`_ARG` (which the OpenTelemetry SDK reads itself, but would
/// silently replace with its default when wrong): a sampler tandemd does not know, or a ratio
/// outside 0..=1, stops it at start with a message naming the variable.
fn validate_sampler(sampler: Option<&str>, arg: Option<&str>) -> Result<(), String> {
    const KNOWN: &[&str] = &[
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ];
    let Some(sampler) = sampler else { return Ok(()) };
    if !KNOWN.contains(&sampler) {
        return Err(format!("OTEL_TRACES_SAMPLER '{sampler}' is not a sampler tandemd knows ({})", KNOWN.join(", ")));
    }
    if sampler.ends_with("traceidratio")
        && let Some(arg) = arg
        && !arg.parse::<f64>().is_ok_and(|ratio| (0.0..=1.0).contains(&ratio))
    {
        return Err(format!("OTEL_TRACES_SAMPLER_ARG '{arg}' is not a ratio between 0 and 1"));
    }
    Ok(())
}

/// The installed tracing set-up; [`Telemetry::shutdown`] sends the spans still queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Exports what is queued, waiting at most `timeout` for the collector.
    pub fn shutdown(self, timeout: Duration) {
        if self.exporting
            && let Err(e) = self.provider.shutdown_with_timeout(timeout)
        {
            tracing::warn!(error = %e, "spans still queued at exit may be lost");
        }
    }
}

/// Installs the process's tracing subscriber: log lines in `format` filtered by `log_level`
/// (EnvFilter syntax; an invalid one falls back to `info` with a warning), and tandemd's spans
/// exported as [`TraceSettings`] say. Fails only for an exporter that cannot be built.
pub fn init(log_level: &str, format: LogFormat, settings: &TraceSettings) -> Result<Telemetry, String> {
    let (log_filter, bad_filter) = match EnvFilter::try_new(log_level) {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
    };
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("tandem.component", "tandemd"))
        .build();
    let mut provider = SdkTracerProvider::builder().with_resource(resource.clone());
    if let Some(endpoint) = &settings.endpoint {
        provider = provider.with_span_processor(export::ExportQueue::start(
            endpoint.clone(),
            resource,
            settings.queue.clone(),
        )?);
    }
    let provider = provider.build();
    // Exporting: OpenTelemetry spans. Not: only their context, carried from hop to hop.
    let exporting = settings.endpoint.is_some();
    let span_layer = if exporting {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tandemd"))
            .with_location(false)
            .with_threads(false)
            .with_level(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(span_filter())
            .boxed()
    } else {
        propagate::PropagationLayer::install().with_filter(span_filter()).boxed()
    };
    subscriber(log_filter, format, span_layer)
        .try_init()
        .map_err(|e| format!("cannot install the tracing subscriber: {e}"))?;
    if let Some(bad) = bad_filter {
        tracing::warn!("--log-level '{log_level}' is not a valid filter ({bad}); using info");
    }
    match &settings.endpoint {
        Some(endpoint) => {
            tracing::info!(endpoint, service_name = %settings.service_name, "exporting spans over OTLP/gRPC")
        }
        None => tracing::debug!("OTEL_EXPORTER_OTLP_ENDPOINT is not set; spans are not exported"),
    }
    Ok(Telemetry { provider, exporting })
}

/// What makes tandemd's spans: OpenTelemetry's layer, or the [`propagate::PropagationLayer`].
type SpanLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The process's subscriber: log lines in `format` through `log_filter`, and `span_layer`
/// (filtered to tandemd's spans). Every layer is filtered, and none is an `Option`: a layer
/// without a filter (a `None` one included) wants every callsite, which made every
/// dependency's span up to the log level a real one (h2's connection span, entered on every
/// poll of every connection).
fn subscriber(log_filter: EnvFilter, format: LogFormat, span_layer: SpanLayer) -> impl Subscriber + Send + Sync {
    // Request spans pass the log filter whatever the level, so every line logged inside a
    // call shows the call's trace id.
    // The hints (tandemd's spans are INFO) keep the global level filter honest: without them it
    // would be TRACE, and every `log` record of a dependency (sled logs a lot at debug/trace)
    // would be turned into a tracing event only to be filtered out.
    let log_filter = log_filter
        .or(filter_fn(|meta| meta.is_span() && meta.target() == SPAN_TARGET).with_max_level_hint(tracing::Level::INFO));
    let log_layer = match format {
        LogFormat::Text => fmt::layer().with_ansi(false).fmt_fields(log_fields::LogFields::new()).boxed(),
        LogFormat::Json => fmt::layer().json().boxed(),
    };
    tracing_subscriber::registry().with(span_layer).with(log_layer.with_filter(log_filter))
}

/// tandemd's spans only; its warnings and errors too where they become span events.
fn span_filter() -> FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    filter_fn(|meta| {
        if meta.is_span() {
            meta.target() == SPAN_TARGET
        } else {
            *meta.level() <= tracing::Level::WARN && meta.target().starts_with("tandem_sidecar")
        }
    })
    .with_max_level_hint(tracing::Level::INFO)
}

/// Makes `span` a child of `incoming` (counting a malformed one) and records its trace id as
/// the `trace_id` field, which log lines inside it show. `what` names the call in the log.
pub(crate) fn start_span(span: &tracing::Span, incoming: Incoming, what: &str) {
    match incoming {
        Incoming::Absent => {}
        Incoming::Malformed => {
            counters().invalid_trace_context.inc();
            tracing::debug!(call = what, "malformed traceparent ignored; the call starts a new trace");
        }
        Incoming::Parent(parent) if propagate::installed() => {
            propagate::set_parent(span, &parent);
        }
        Incoming::Parent(parent) => {
            let _ = span.set_parent(Incoming::Parent(parent).into_context());
        }
    }
    if span.is_disabled() {
        return;
    }
    let started = context::of_span(span);
    if started.is_valid() {
        span.record("trace_id", tracing::field::display(started.trace_id()));
    }
}

/// The span of one attempt to reach a peer sidecar with an invocation (inside the API call's span).
pub fn invoke_span(target_app_id: &str, method: &str) -> tracing::Span {
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "invoke",
        otel.name = %format_args!("invoke {target_app_id}/{method}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    start_span(&span, Incoming::Absent, "invoke");
    span
}

/// The span of one delivery attempt of a pub/sub event to a subscriber app, child of the
/// publish call whose context the event carries in its extensions.
pub fn delivery_span(pubsub: &str, event: &tandem_proto::runtime::TopicEventRequest, app_id: &str) -> tracing::Span {
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        parent: None,
        "deliver",
        otel.name = %format_args!("deliver {} to {app_id}", event.topic),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        pubsub,
        event_id = %event.id,
        trace_id = tracing::field::Empty,
    );
    start_span(&span, context::from_extensions(event.extensions.as_ref()), "delivery");
    span
}

/// Marks the current span as failed (for the OpenTelemetry status).
pub fn record_error(span: &tracing::Span) {
    span.record("otel.status_code", "error");
}

/// The span context of the current span: what the next hop gets as its parent.
pub fn current() -> opentelemetry::trace::SpanContext {
    context::of_span(&tracing::Span::current())
}

/// Writes the current span as the parent into outgoing gRPC metadata.
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    context::inject_metadata(&current(), metadata);
}

/// The trace id of the current span, as hex (for tests and logs); `None` outside a span.
pub fn current_trace_id() -> Option<String> {
    let id = current().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn settings_come_from_the_standard_variables() {
        let vars: HashMap<&str, &str> =
            [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"), ("OTEL_SERVICE_NAME", "orders")].into();
        let settings = TraceSettings::from_vars("svc-a", |k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(settings.endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(settings.service_name, "orders");

        let settings = TraceSettings::from_vars("svc-a", |_| None).unwrap();
        assert_eq!(settings.endpoint, None, "no endpoint, no export");
        assert_eq!(settings.service_name, "svc-a");

        let err = TraceSettings::from_vars("a", |k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "localhost".into()));
        assert!(err.unwrap_err().contains("'localhost'"));
    }

    #[test]
    fn only_tandemds_spans_are_made_whatever_the_log_level() {
        let span_layer = propagate::PropagationLayer::for_test().with_filter(span_filter()).boxed();
        let subscriber = subscriber(EnvFilter::new("info,tandem_sidecar=debug"), LogFormat::Text, span_layer);
        tracing::subscriber::with_default(subscriber, || {
            let ours = tracing::info_span!(target: SPAN_TARGET, "grpc");
            assert!(!ours.is_disabled(), "tandemd's spans are made");
            // What h2 makes for every connection and enters on every poll of it.
            let dependency = tracing::debug_span!(target: "h2::proto::connection", "Connection");
            assert!(dependency.is_disabled(), "a dependency's debug span is not made at log level info");
            let own_debug = tracing::debug_span!(target: "tandem_sidecar::pubsub", "work");
            assert!(!own_debug.is_disabled(), "the log level still enables tandemd's own debug spans");
        });
    }

    #[test]
    fn samplers_are_checked_at_start() {
        assert!(validate_sampler(None, None).is_ok());
        assert!(validate_sampler(Some("parentbased_traceidratio"), Some("0.25")).is_ok());
        assert!(validate_sampler(Some("always_off"), Some("whatever")).is_ok(), "the arg is for ratios only");
        assert!(validate_sampler(Some("sometimes"), None).unwrap_err().contains("'sometimes'"));
        assert!(validate_sampler(Some("traceidratio"), Some("1.5")).unwrap_err().contains("OTEL_TRACES_SAMPLER_ARG"));
    }
}
