//! [`LogFields`]: how text log lines show fields, leaving out those of tandemd's spans that
//! are meant for OpenTelemetry (`otel.*`, `rpc.*`).
//!
//! The log layer formats a span's fields when the span is made, for every request span (so
//! that a line logged inside shows its `trace_id`), although a line is rarely logged inside.
//! `otel.name` costs a `format!` per span and says nothing a log reader needs; `trace_id` and
//! the span's own fields stay.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing_subscriber::field::{MakeVisitor, RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields};

/// The text log layer's field formatter: [`DefaultFields`] without OpenTelemetry's fields.
#[derive(Debug, Default)]
pub struct LogFields {
    inner: DefaultFields,
}

impl LogFields {
    pub fn new() -> Self {
        Self::default()
    }
}

fn for_opentelemetry(field: &Field) -> bool {
    let name = field.name();
    name.starts_with("otel.") || name.starts_with("rpc.")
}

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = WithoutOpenTelemetry(self.inner.make_visitor(writer));
        fields.record(&mut visitor);
        visitor.0.finish()
    }

    /// As the default, without a separator when every new field is left out.
    fn add_fields(&self, current: &mut FormattedFields<Self>, fields: &Record<'_>) -> fmt::Result {
        let mut more = String::new();
        self.format_fields(Writer::new(&mut more), fields)?;
        if !more.is_empty() {
            if !current.fields.is_empty() {
                current.fields.push(' ');
            }
            current.fields.push_str(&more);
        }
        Ok(())
    }
}

/// Passes every field but OpenTelemetry's on to the wrapped visitor: the methods
/// [`DefaultVisitor`](tracing_subscriber::fmt::format::DefaultVisitor) has of its own; numbers
/// and booleans reach `record_debug` through `Visit`'s defaults, as they would there.
struct WithoutOpenTelemetry<V>(V);

impl<V: Visit> Visit for WithoutOpenTelemetry<V> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !for_opentelemetry(field) {
            self.0.record_debug(field, value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !for_opentelemetry(field) {
            self.0.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !for_opentelemetry(field) {
            self.0.record_error(field, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// Collects what the log layer writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_keep_the_trace_id_and_leave_out_opentelemetry_fields() {
        let lines = Lines::default();
        let writer = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .fmt_fields(LogFields::new())
            .with_writer(move || writer.clone());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            let span = tracing::info_span!(
                "grpc",
                otel.name = "dapr.proto.runtime.v1.Dapr/PublishEvent",
                otel.kind = "server",
                rpc.grpc.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            span.record("trace_id", tracing::field::display("4bf92f3577b34da6a3ce929d0e0e4736"));
            span.record("rpc.grpc.status_code", 3);
            span.in_scope(|| tracing::warn!(topic = "orders", "cannot publish"));
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("trace_id=4bf92f3577b34da6a3ce929d0e0e4736"), "{text}");
        assert!(text.contains("cannot publish") && text.contains("topic=\"orders\""), "{text}");
        assert!(!text.contains("otel.") && !text.contains("rpc."), "{text}");
        assert!(text.contains("grpc{trace_id=4bf92f3577b34da6a3ce929d0e0e4736}"), "no stray separator: {text}");
    }
}
