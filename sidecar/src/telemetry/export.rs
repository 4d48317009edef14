//! Exporting finished spans over OTLP/gRPC without ever holding up a call.
//!
//! [`ExportQueue`] is the span processor: when a span ends it is put in a bounded queue with
//! a non-blocking `try_send`; a full queue drops the span and counts it. A thread of its own
//! (`otlp-export`, with its own single-threaded tokio runtime, so that encoding and sending
//! never run on the sidecar's runtime) takes spans off the queue in batches, every
//! `OTEL_BSP_SCHEDULE_DELAY` or as soon as a full batch waits, and hands each batch to the
//! OTLP exporter with a timeout. A batch whose export fails is dropped and
//! counted too: an unreachable collector costs calls nothing but the queueing.
//!
//! The SDK's own batch processor is not used because it does not report what it drops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use tokio::sync::{Notify, mpsc, oneshot};

use super::counters;

/// Queue and batch sizes, from the standard `OTEL_BSP_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans waiting for export at most; more are dropped.
    pub max_queue_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY` (ms): how long a batch that is not full waits for more spans.
    pub schedule_delay: Duration,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: spans per export call at most.
    pub max_export_batch_size: usize,
    /// `OTEL_BSP_EXPORT_TIMEOUT` (ms): how long one export may take before its batch is dropped.
    pub export_timeout: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            max_queue_size: 2048,
            schedule_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
            export_timeout: Duration::from_millis(30_000),
        }
    }
}

impl QueueSettings {
    /// Reads the `OTEL_BSP_*` variables through `var`; a set but invalid one is an error
    /// naming it.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<QueueSettings, String> {
        let mut settings = QueueSettings::default();
        let number = |name: &str| -> Result<Option<u64>, String> {
            match var(name).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Some)
                    .ok_or_else(|| format!("{name}='{v}' is not a positive whole number")),
            }
        };
        if let Some(n) = number("OTEL_BSP_MAX_QUEUE_SIZE")? {
            settings.max_queue_size = n as usize;
        }
        if let Some(ms) = number("OTEL_BSP_SCHEDULE_DELAY")? {
            settings.schedule_delay = Duration::from_millis(ms);
        }
        if let Some(n) = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")? {
            settings.max_export_batch_size = n as usize;
        }
        if let Some(ms) = number("OTEL_BSP_EXPORT_TIMEOUT")? {
            settings.export_timeout = Duration::from_millis(ms);
        }
        settings.max_export_batch_size = settings.max_export_batch_size.min(settings.max_queue_size);
        Ok(settings)
    }
}

/// The span processor that feeds the export thread.
#[derive(Debug)]
pub struct ExportQueue {
    spans: mpsc::Sender<SpanData>,
    /// Rung when a batch's worth of spans is queued.
    batch_ready: Arc<Notify>,
    /// Queue capacity less this: the free room at which a full batch waits.
    ring_below: usize,
    /// Tells the export thread to send what is queued and stop; taken on shutdown.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// Closed by the export thread when it has stopped.
    stopped: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl ExportQueue {
    /// Starts the export thread, which builds the OTLP exporter for `endpoint` in its own
    /// runtime. Fails when the exporter cannot be built (e.g. an endpoint that is not a URL).
    pub fn start(endpoint: String, resource: Resource, settings: QueueSettings) -> Result<ExportQueue, String> {
        let (spans, queue) = mpsc::channel(settings.max_queue_size);
        let batch_ready = Arc::new(Notify::new());
        let ring_below = settings.max_queue_size.saturating_sub(settings.max_export_batch_size);
        let (stop, stop_rx) = oneshot::channel();
        let (built_tx, built_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stopped_tx, stopped) = std::sync::mpsc::channel::<()>();
        let ready = batch_ready.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = built_tx.send(Err(format!("cannot start the export runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let exporter = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone())
                        .build()
                        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT '{endpoint}': {e}"));
                    let mut exporter = match exporter {
                        Ok(exporter) => {
                            let _ = built_tx.send(Ok(()));
                            exporter
                        }
                        Err(e) => {
                            let _ = built_tx.send(Err(e));
                            return;
                        }
                    };
                    exporter.set_resource(&resource);
                    run_exports(exporter, queue, ready, stop_rx, settings, endpoint).await;
                });
                drop(stopped_tx);
            })
            .map_err(|e| format!("cannot start the span export thread: {e}"))?;
        built_rx.recv().map_err(|_| "the span export thread ended while starting".to_string())??;
        Ok(ExportQueue {
            spans,
            batch_ready,
            ring_below,
            stop: Mutex::new(Some(stop)),
            stopped: Mutex::new(Some(stopped)),
        })
    }
}

impl SpanProcessor for ExportQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // Never waits: a full queue (collector slow or away) drops the span.
        if self.spans.try_send(span).is_err() {
            counters().spans_dropped.inc();
        }
        if self.spans.capacity() <= self.ring_below {
            self.batch_ready.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    /// Exports what is queued (within `timeout`) and stops the export thread.
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let Some(stop) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(OTelSdkError::AlreadyShutdown);
        };
        let _ = stop.send(());
        let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner()).take();
        match stopped.map(|s| s.recv_timeout(timeout)) {
            Some(Err(std::sync::mpsc::RecvTimeoutError::Timeout)) => Err(OTelSdkError::Timeout(timeout)),
            _ => Ok(()),
        }
    }
}

/// The export thread's loop: every `schedule_delay`, or as soon as a full batch waits, it
/// sends what is queued in batches of up to `max_export_batch_size`; until `stop`, then what
/// is left is sent once.
///
/// It never waits on the queue itself: a receiver waiting there would be woken by every span
/// (a thread wake-up per span, paid by the sidecar's thread); instead the sending side rings
/// `batch_ready` once a batch's worth is queued.
async fn run_exports(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queue: mpsc::Receiver<SpanData>,
    batch_ready: Arc<Notify>,
    mut stop: oneshot::Receiver<()>,
    settings: QueueSettings,
    endpoint: String,
) {
    let mut failing = false;
    let mut stopping = false;
    while !stopping {
        tokio::select! {
            _ = &mut stop => stopping = true,
            _ = batch_ready.notified() => {}
            _ = tokio::time::sleep(settings.schedule_delay) => {}
        }
        // Send everything queued now, batch by batch.
        loop {
            let mut batch = Vec::with_capacity(settings.max_export_batch_size.min(queue.len()));
            while batch.len() < settings.max_export_batch_size {
                match queue.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let full = batch.len() == settings.max_export_batch_size;
            export(&exporter, batch, &settings, &endpoint, &mut failing).await;
            if !full {
                break;
            }
        }
    }
    let _ = exporter.shutdown();
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    settings: &QueueSettings,
    endpoint: &str,
    failing: &mut bool,
) {
    let spans = batch.len() as u64;
    let outcome = match tokio::time::timeout(settings.export_timeout, exporter.export(batch)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", settings.export_timeout)),
    };
    match outcome {
        Ok(()) => {
            counters().spans_exported.inc_by(spans);
            if std::mem::replace(failing, false) {
                tracing::info!(endpoint, "exporting spans works again");
            }
        }
        Err(error) => {
            counters().spans_dropped.inc_by(spans);
            // Said once per outage, not once per batch.
            if !std::mem::replace(failing, true) {
                tracing::warn!(endpoint, %error, spans, "cannot export spans; they are dropped (counted in tandem_trace_spans_dropped_total)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn queue_settings_come_from_the_standard_variables() {
        let vars: HashMap<&str, &str> = [("OTEL_BSP_SCHEDULE_DELAY", "200"), ("OTEL_BSP_MAX_QUEUE_SIZE", "100")].into();
        let settings = QueueSettings::from_vars(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(settings.schedule_delay, Duration::from_millis(200));
        assert_eq!(settings.max_queue_size, 100);
        assert_eq!(settings.max_export_batch_size, 100, "a batch never exceeds the queue");
        assert_eq!(settings.export_timeout, QueueSettings::default().export_timeout);
        let err = QueueSettings::from_vars(|k| (k == "OTEL_BSP_EXPORT_TIMEOUT").then(|| "soon".to_string()));
        assert!(err.unwrap_err().contains("OTEL_BSP_EXPORT_TIMEOUT='soon'"));
    }
}
