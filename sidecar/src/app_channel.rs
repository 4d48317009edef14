//! The connection from the sidecar to its own app's callback server, and the health probe
//! that feeds /readyz.

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::runtime::app_callback_health_check_client::AppCallbackHealthCheckClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::invoke::channels::lazy_channel;
use crate::readiness::Readiness;

/// A pooled, lazily connected channel to the app (`host:port`).
#[derive(Debug, Clone)]
pub struct AppChannel {
    address: String,
    channel: Channel,
}

impl AppChannel {
    pub fn new(host: &str, port: u16) -> Result<Self, String> {
        let address = format!("{host}:{port}");
        let channel = lazy_channel(&address)?;
        Ok(AppChannel { address, channel })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// One probe: `None` when healthy, else the reason. An app that serves gRPC but not the
    /// optional `AppCallbackHealthCheck` service counts as healthy, as in Dapr.
    pub async fn check_health(&self, timeout: Duration) -> Option<String> {
        let mut client = AppCallbackHealthCheckClient::new(self.channel());
        match tokio::time::timeout(timeout, client.health_check(())).await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) if status.code() == Code::Unimplemented => None,
            Ok(Err(status)) if crate::invoke::channels::never_sent(&status) => {
                Some(format!("app is not listening on {}", self.address))
            }
            Ok(Err(status)) => Some(format!("health check failed: {:?}: {}", status.code(), status.message())),
            Err(_) => Some(format!("health check timed out after {timeout:?}")),
        }
    }

    /// Probes every `interval` until `stop`, reporting each change to `readiness`.
    pub async fn probe_health(self, readiness: Arc<Readiness>, interval: Duration, stop: CancellationToken) {
        let mut last: Option<Option<String>> = None;
        loop {
            let problem = self.check_health(interval.max(Duration::from_millis(500))).await;
            if last.as_ref() != Some(&problem) {
                match &problem {
                    None => tracing::info!(app = %self.address, "app is healthy"),
                    Some(reason) => tracing::warn!(app = %self.address, reason, "app is not healthy"),
                }
                readiness.set_app_health(problem.clone());
                last = Some(problem);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
