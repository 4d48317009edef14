//! An OTLP/gRPC trace collector inside the test process (the `TraceService` of
//! `opentelemetry-proto`, on a free loopback port), and OpenTelemetry tracers for test apps
//! that export to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::eventually;

/// One span as the collector received it; ids in hex (an empty parent: a root span).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// OTLP's span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
}

#[derive(Clone, Default)]
struct Received {
    /// Kept spans; `None` when the collector only counts.
    spans: Option<Arc<Mutex<Vec<CollectedSpan>>>>,
    count: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let request = request.into_inner();
        let mut kept = Vec::new();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                self.count.fetch_add(scope_spans.spans.len() as u64, Ordering::Relaxed);
                if self.spans.is_none() {
                    continue;
                }
                kept.extend(scope_spans.spans.into_iter().map(|span| CollectedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                }));
            }
        }
        if let Some(spans) = &self.spans {
            spans.lock().unwrap().extend(kept);
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running collector; stopped when dropped.
pub struct Collector {
    address: std::net::SocketAddr,
    received: Received,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Collector {
    /// A collector that keeps every span it receives.
    pub async fn start() -> Collector {
        Self::serve(Received { spans: Some(Arc::default()), count: Arc::default() }).await
    }

    /// A collector that only counts spans (for long benchmark runs).
    pub async fn counting() -> Collector {
        Self::serve(Received::default()).await
    }

    async fn serve(received: Received) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the collector");
        let address = listener.local_addr().expect("bound");
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(received.clone()).max_decoding_message_size(64 << 20);
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
                    let _ = stopped.await;
                })
                .await
                .expect("the OTLP collector failed");
        });
        Collector { address, received, stop: Some(stop), task }
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Spans received so far (none for a counting collector).
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.received.spans.as_ref().map(|s| s.lock().unwrap().clone()).unwrap_or_default()
    }

    /// How many spans were received.
    pub fn count(&self) -> u64 {
        self.received.count.load(Ordering::Relaxed)
    }

    /// The spans of trace `trace_id` once there are at least `n` of them (bounded wait).
    pub async fn wait_for_trace(&self, trace_id: &str, n: usize) -> Vec<CollectedSpan> {
        let of_trace = || self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect::<Vec<_>>();
        let what = format!("{n} spans of trace {trace_id}");
        let wait = eventually(Duration::from_secs(20), &what, || {
            let found = of_trace().len();
            async move { found >= n }
        });
        if tokio::time::timeout(Duration::from_secs(21), wait).await.is_err() {
            panic!("{what}; have {:#?}", of_trace());
        }
        of_trace()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A tracer provider for a test app named `service`, exporting to `endpoint` in batches.
/// Must be made inside a tokio runtime; [`flush`] before looking for its spans.
pub fn app_tracer_provider(service: &str, endpoint: &str) -> SdkTracerProvider {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .expect("building an OTLP exporter");
    SdkTracerProvider::builder()
        .with_resource(Resource::builder_empty().with_service_name(service.to_string()).build())
        .with_batch_exporter(exporter)
        .build()
}

/// Exports what `provider` holds (blocking, so off the runtime's threads).
pub async fn flush(provider: &SdkTracerProvider) {
    let provider = provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush()).await.expect("flush task").expect("flushing spans");
}

/// Spans by name, asserting each name appears once.
pub fn by_name(spans: &[CollectedSpan]) -> HashMap<&str, &CollectedSpan> {
    let mut named = HashMap::new();
    for span in spans {
        assert!(named.insert(span.name.as_str(), span).is_none(), "span '{}' appears twice in {spans:#?}", span.name);
    }
    named
}
