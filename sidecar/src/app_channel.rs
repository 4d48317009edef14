//! The connection from the sidecar to its own app's callback server, and the health probe
//! that feeds /readyz.

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::runtime::app_callback_client::AppCallbackClient;
use tandem_proto::runtime::app_callback_health_check_client::AppCallbackHealthCheckClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::readiness::Readiness;
use tandem_transport::GrpcConnection;

/// The one HTTP/2 connection to the app (`host:port`), made on first use.
#[derive(Debug, Clone)]
pub struct AppChannel {
    connection: GrpcConnection,
}

impl AppChannel {
    pub fn new(host: &str, port: u16) -> Result<Self, String> {
        Ok(AppChannel { connection: GrpcConnection::new(&format!("{host}:{port}"))? })
    }

    pub fn address(&self) -> &str {
        self.connection.address()
    }

    /// A client of the app's `AppCallback` service, without message size limits (the
    /// sidecar enforces its own).
    pub fn callback_client(&self) -> AppCallbackClient<GrpcConnection> {
        AppCallbackClient::with_origin(self.connection.clone(), self.connection.origin())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// One probe: `None` when healthy, else the reason. An app that serves gRPC but not the
    /// optional `AppCallbackHealthCheck` service counts as healthy, as in Dapr.
    pub async fn check_health(&self, timeout: Duration) -> Option<String> {
        let mut client = AppCallbackHealthCheckClient::with_origin(self.connection.clone(), self.connection.origin());
        match tokio::time::timeout(timeout, client.health_check(())).await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) if status.code() == Code::Unimplemented => None,
            Ok(Err(status)) if crate::invoke::channels::never_sent(&status) => {
                Some(format!("app is not listening on {}", self.address()))
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
                    None => tracing::info!(app = %self.address(), "app is healthy"),
                    Some(reason) => tracing::warn!(app = %self.address(), reason, "app is not healthy"),
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
