//! serve's Prometheus metrics, on `GET /metrics` of `--metrics-port` when it is given: what
//! an autoscaler scales serve on (the queue) and what shows how batching and shedding behave.
//!
//! - `tandem_serve_queue_depth_samples`: samples waiting for a forward pass (the bound is
//!   `--max-queue`);
//! - `tandem_serve_requests_in_flight`: `predict` calls being handled;
//! - `tandem_serve_batch_size`: samples per forward pass;
//! - `tandem_serve_predictions_total{model_version}`: `predict` calls answered, by the model
//!   version that computed them;
//! - `tandem_serve_shed_total`: `predict` calls refused with RESOURCE_EXHAUSTED (queue full).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub model_version: String,
}

/// serve's metrics; clones share the same series.
#[derive(Clone)]
pub struct ServeMetrics {
    registry: Arc<Registry>,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub batch_size: Histogram,
    pub predictions: Family<VersionLabels, Counter>,
    pub shed: Counter,
}

impl Default for ServeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServeMetrics {
    pub fn new() -> ServeMetrics {
        let mut registry = Registry::default();
        let queue_depth = Gauge::default();
        let in_flight = Gauge::default();
        // 1, 2, 4, ... 4096 samples.
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        let predictions = Family::<VersionLabels, Counter>::default();
        let shed = Counter::default();
        registry.register(
            "tandem_serve_queue_depth_samples",
            "Samples waiting for a forward pass",
            queue_depth.clone(),
        );
        registry.register("tandem_serve_requests_in_flight", "predict calls being handled", in_flight.clone());
        registry.register("tandem_serve_batch_size", "Samples per forward pass", batch_size.clone());
        registry.register(
            "tandem_serve_predictions",
            "predict calls answered, by the model version that computed them",
            predictions.clone(),
        );
        registry.register("tandem_serve_shed", "predict calls refused because the queue was full", shed.clone());
        ServeMetrics { registry: Arc::new(registry), queue_depth, in_flight, batch_size, predictions, shed }
    }

    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }

    /// Serves `GET /metrics` on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        use axum::http::header::CONTENT_TYPE;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let text = self.encode();
                async move { ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text) }
            }),
        );
        axum::serve(listener, app).await
    }

    /// Binds the metrics port (0: a free one) on `host`.
    pub async fn bind(host: &str, port: u16) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind((host, port)).await?;
        let address = listener.local_addr()?;
        Ok((listener, address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_in_the_exposition() {
        let metrics = ServeMetrics::new();
        metrics.queue_depth.set(3);
        metrics.batch_size.observe(8.0);
        metrics.predictions.get_or_create(&VersionLabels { model_version: "v7".into() }).inc();
        metrics.shed.inc();
        let text = metrics.encode();
        for series in [
            "tandem_serve_queue_depth_samples 3",
            "tandem_serve_requests_in_flight 0",
            "tandem_serve_batch_size_count 1",
            r#"tandem_serve_predictions_total{model_version="v7"} 1"#,
            "tandem_serve_shed_total 1",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
